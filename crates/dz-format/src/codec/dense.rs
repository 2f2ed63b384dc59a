//! `dense` (SPEC.md section 3.1): plain little-endian values of a float dtype, row-major. Part: `values`.

use half::{bf16, f16};

use super::{checked_mul, invalid_payload, Dense};
use crate::error::Result;
use crate::manifest::Dtype;

impl Dense {
    /// Stores `values` (`rows * cols`, row-major) as `dtype`, rounding to nearest even for f16 and bf16.
    ///
    /// # Panics
    /// If `values.len() != rows * cols`.
    pub fn from_f32(rows: usize, cols: usize, dtype: Dtype, values: &[f32]) -> Dense {
        assert_eq!(
            Some(values.len()),
            rows.checked_mul(cols),
            "Dense::from_f32: {rows} x {cols} needs rows * cols values"
        );
        let data = match dtype {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::Bf16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        };
        Dense {
            rows,
            cols,
            dtype,
            data,
        }
    }

    /// The values as f32, row-major (exact: every f16 and bf16 is an f32).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::Bf16 => self
                .data
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }

    pub(super) fn validate(&self, tensor: &str) -> Result<()> {
        let n = checked_mul(tensor, "values", self.rows, self.cols)?;
        let bytes = checked_mul(tensor, "values", n, self.dtype.size())?;
        if self.data.len() != bytes {
            return Err(invalid_payload(
                tensor,
                format!(
                    "values has {} bytes, {} x {} {} needs {bytes}",
                    self.data.len(),
                    self.rows,
                    self.cols,
                    self.dtype.as_str()
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn pack(&self) -> Vec<Vec<u8>> {
        vec![self.data.clone()]
    }

    /// Any bytes of the right length (checked by the caller) are valid dense values.
    pub(super) fn unpack(dtype: Dtype, rows: usize, cols: usize, parts: &[&[u8]]) -> Result<Dense> {
        Ok(Dense {
            rows,
            cols,
            dtype,
            data: parts[0].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_bytes() {
        // 1 + 2^-11 is halfway between two f16s: ties to even gives 1.0; 1 + 3 * 2^-11 rounds up.
        let v = [1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), -2.0];
        let d = Dense::from_f32(1, 3, Dtype::F16, &v);
        assert_eq!(d.data, [0x00, 0x3C, 0x02, 0x3C, 0x00, 0xC0]);
        assert_eq!(d.to_f32(), [1.0, 1.0 + 2f32.powi(-9), -2.0]);
        // bf16 keeps the top 16 bits of the f32, rounding to nearest even.
        let d = Dense::from_f32(1, 2, Dtype::Bf16, &[1.0, 1.0 + 2f32.powi(-8)]);
        assert_eq!(d.data, [0x80, 0x3F, 0x80, 0x3F]);
        let d = Dense::from_f32(1, 1, Dtype::F32, &[0.5]);
        assert_eq!(d.data, 0.5f32.to_le_bytes());
        assert_eq!(d.to_f32(), [0.5]);
    }
}

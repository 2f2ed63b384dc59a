//! The quantization grid shared by `quant`, `sparse24` and `sparse` (SPEC.md section 3, "Quantization
//! grid"): per-group f16 scales and zero points, and the one decode formula.

use half::f16;

use super::{check_finite, check_len, checked_mul, f16_bytes, read_f16s, Grid};
use crate::error::{Error, Result};
use crate::manifest::QuantParams;

impl Grid {
    /// The value of code `q` in column `col` of row `row`, for a matrix of `cols` columns:
    /// `((q as f32) - z) * (s as f32) * global_scale`, in that order, with `z = 2^(bits-1)` when symmetric.
    ///
    /// # Panics
    /// If `(row, col)` is outside the grid's tables.
    #[inline]
    pub fn decode(&self, row: usize, col: usize, cols: usize, q: u8) -> f32 {
        let p = &self.params;
        let g = row * p.n_groups(cols) + p.group_of(col);
        let z = match &self.zeros {
            None => (1u32 << (p.bits - 1)) as f32,
            Some(zeros) => zeros[g].to_f32(),
        };
        (f32::from(q) - z) * self.scales[g].to_f32() * p.global_scale
    }

    /// Checks the tables against `rows x cols`: lengths, zeros present iff asymmetric, all finite.
    pub(super) fn validate(&self, tensor: &str, rows: usize, cols: usize) -> Result<()> {
        let per_row = self.params.n_groups(cols);
        let n = checked_mul(tensor, "the grid", rows, per_row)?;
        check_len(tensor, "scales", self.scales.len(), n)?;
        check_finite(tensor, "scales", &self.scales, per_row)?;
        match (&self.zeros, self.params.symmetric) {
            (None, true) => {}
            (Some(zeros), false) => {
                check_len(tensor, "zeros", zeros.len(), n)?;
                check_finite(tensor, "zeros", zeros, per_row)?;
            }
            (Some(_), true) => {
                return Err(Error::InvalidPayload {
                    tensor: tensor.to_string(),
                    reason: "a symmetric grid has no zeros".into(),
                })
            }
            (None, false) => {
                return Err(Error::InvalidPayload {
                    tensor: tensor.to_string(),
                    reason: "an asymmetric grid needs zeros".into(),
                })
            }
        }
        Ok(())
    }

    /// Appends the `scales` and (asymmetric) `zeros` parts.
    pub(super) fn pack_into(&self, parts: &mut Vec<Vec<u8>>) {
        parts.push(f16_bytes(&self.scales));
        if let Some(zeros) = &self.zeros {
            parts.push(f16_bytes(zeros));
        }
    }

    /// Reads the grid from its parts (`rest` = `scales` then, if asymmetric, `zeros`; lengths already
    /// checked against the layout) and checks that every value is finite.
    pub(super) fn unpack(
        tensor: &str,
        params: &QuantParams,
        cols: usize,
        rest: &[&[u8]],
    ) -> Result<Grid> {
        let per_row = params.n_groups(cols);
        let scales = read_f16s(rest.first().copied().unwrap_or_default());
        check_finite(tensor, "scales", &scales, per_row)?;
        let zeros = if params.symmetric {
            None
        } else {
            let zeros: Vec<f16> = read_f16s(rest.get(1).copied().unwrap_or_default());
            check_finite(tensor, "zeros", &zeros, per_row)?;
            Some(zeros)
        };
        Ok(Grid {
            params: *params,
            scales,
            zeros,
        })
    }
}

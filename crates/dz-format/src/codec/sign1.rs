//! `sign1` (SPEC.md section 3.5): one sign bit per entry (1 = +1, 0 = -1) and one f16 scale per row
//! (BitDelta). Parts: `signs`, `scales`.

use super::{
    check_finite, check_len, checked_mul, f16_bytes, pack_rows, read_f16s, unpack_rows, Sign1,
};
use crate::error::Result;

impl Sign1 {
    pub(super) fn validate(&self, tensor: &str) -> Result<()> {
        let n = checked_mul(tensor, "signs", self.rows, self.cols)?;
        check_len(tensor, "signs", self.signs.len(), n)?;
        check_len(tensor, "scales", self.scales.len(), self.rows)?;
        check_finite(tensor, "scales", &self.scales, 1)
    }

    pub(super) fn pack(&self, tensor: &str) -> Result<Vec<Vec<u8>>> {
        let signs: Vec<u8> = self.signs.iter().map(|&s| u8::from(s)).collect();
        Ok(vec![
            pack_rows(tensor, &signs, self.rows, self.cols, 1)?,
            f16_bytes(&self.scales),
        ])
    }

    pub(super) fn unpack(
        tensor: &str,
        global_scale: f32,
        rows: usize,
        cols: usize,
        parts: &[&[u8]],
    ) -> Result<Sign1> {
        let signs = unpack_rows(tensor, "signs", parts[0], rows, cols, 1)?;
        let scales = read_f16s(parts[1]);
        check_finite(tensor, "scales", &scales, 1)?;
        Ok(Sign1 {
            rows,
            cols,
            global_scale,
            signs: signs.iter().map(|&s| s == 1).collect(),
            scales,
        })
    }

    /// `(±1.0) * (scales[r] as f32) * global_scale`.
    pub(super) fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.signs.len());
        for (row, s) in self.signs.chunks_exact(self.cols).zip(&self.scales) {
            let s = s.to_f32();
            out.extend(row.iter().map(|&plus| {
                let sign = if plus { 1.0f32 } else { -1.0f32 };
                sign * s * self.global_scale
            }));
        }
        out
    }
}

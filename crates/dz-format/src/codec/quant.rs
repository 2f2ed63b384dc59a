//! `quant` (SPEC.md section 3.2): every entry quantized. Parts: `codes`, `scales`, [`zeros`].

use super::{check_codes, check_len, checked_mul, pack_rows, unpack_rows, Grid, Quant};
use crate::error::Result;
use crate::manifest::QuantParams;

impl Quant {
    pub(super) fn validate(&self, tensor: &str) -> Result<()> {
        let n = checked_mul(tensor, "codes", self.rows, self.cols)?;
        check_len(tensor, "codes", self.codes.len(), n)?;
        check_codes(
            tensor,
            "codes",
            &self.codes,
            self.cols,
            self.grid.params.bits,
        )?;
        self.grid.validate(tensor, self.rows, self.cols)
    }

    /// Packs a validated payload.
    pub(super) fn pack(&self, tensor: &str) -> Result<Vec<Vec<u8>>> {
        let bits = self.grid.params.bits;
        let mut parts = vec![pack_rows(tensor, &self.codes, self.rows, self.cols, bits)?];
        self.grid.pack_into(&mut parts);
        Ok(parts)
    }

    /// Decodes parts whose count and lengths match the layout.
    pub(super) fn unpack(
        tensor: &str,
        params: &QuantParams,
        rows: usize,
        cols: usize,
        parts: &[&[u8]],
    ) -> Result<Quant> {
        let codes = unpack_rows(tensor, "codes", parts[0], rows, cols, params.bits)?;
        let grid = Grid::unpack(tensor, params, cols, &parts[1..])?;
        Ok(Quant {
            rows,
            cols,
            grid,
            codes,
        })
    }

    /// `rows * cols` f32, row-major (SPEC.md section 3 formula).
    pub(super) fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.codes.len());
        for (r, row) in self.codes.chunks_exact(self.cols).enumerate() {
            out.extend(
                row.iter()
                    .enumerate()
                    .map(|(k, &q)| self.grid.decode(r, k, self.cols, q)),
            );
        }
        out
    }
}

//! `sparse` (SPEC.md section 3.4): unstructured sparsity, kept entries quantized. Parts: `mask` (one bit
//! per entry), `row_ptr` (`N + 1` u32 byte offsets into `codes`), `codes` (one bit-stream row per matrix
//! row, of that row's kept codes), `scales`, [`zeros`].

use super::{
    bits, check_len, checked_mul, invalid_part, invalid_payload, nonzero_padding, overflow,
    pack_rows, unpack_rows, Grid, Sparse,
};
use crate::error::Result;
use crate::layout::stride;
use crate::manifest::QuantParams;

/// `row_ptr` as the mask implies it: `row_ptr[0] = 0`, `row_ptr[r+1] = row_ptr[r] + stride(nnz_r, bits)`.
fn row_ptr_of(tensor: &str, nnz: &[usize], bits: u8) -> Result<Vec<u32>> {
    let mut ptr = Vec::with_capacity(nnz.len() + 1);
    let mut at = 0u32;
    ptr.push(at);
    for &n in nnz {
        let len = stride(n, bits)
            .and_then(|s| u32::try_from(s).ok())
            .ok_or_else(|| overflow(tensor, "row_ptr"))?;
        at = at
            .checked_add(len)
            .ok_or_else(|| overflow(tensor, "row_ptr (codes exceed u32 bytes)"))?;
        ptr.push(at);
    }
    Ok(ptr)
}

impl Sparse {
    pub(super) fn validate(&self, tensor: &str) -> Result<()> {
        let n = checked_mul(tensor, "mask", self.rows, self.cols)?;
        check_len(tensor, "mask", self.mask.len(), n)?;
        let kept = self.mask.iter().filter(|&&m| m).count();
        check_len(
            tensor,
            "codes (one per set mask bit)",
            self.codes.len(),
            kept,
        )?;
        let bits = self.grid.params.bits;
        if let Some(i) = self.codes.iter().position(|&q| u16::from(q) >= 1 << bits) {
            return Err(invalid_payload(
                tensor,
                format!(
                    "codes: kept code {i} is {}, which does not fit in {bits} bits",
                    self.codes[i]
                ),
            ));
        }
        self.grid.validate(tensor, self.rows, self.cols)
    }

    /// Kept entries per row.
    fn nnz(&self) -> Vec<usize> {
        self.mask
            .chunks_exact(self.cols)
            .map(|row| row.iter().filter(|&&m| m).count())
            .collect()
    }

    pub(super) fn pack(&self, tensor: &str) -> Result<Vec<Vec<u8>>> {
        let bits = self.grid.params.bits;
        let mask: Vec<u8> = self.mask.iter().map(|&m| u8::from(m)).collect();
        let mask = pack_rows(tensor, &mask, self.rows, self.cols, 1)?;
        let nnz = self.nnz();
        let ptr = row_ptr_of(tensor, &nnz, bits)?;
        let mut codes = vec![0u8; ptr[self.rows] as usize];
        let mut next = 0;
        for (r, &n) in nnz.iter().enumerate() {
            let dst = &mut codes[ptr[r] as usize..ptr[r + 1] as usize];
            bits::pack_row(&self.codes[next..next + n], bits, dst);
            next += n;
        }
        let row_ptr = ptr.iter().flat_map(|p| p.to_le_bytes()).collect();
        let mut parts = vec![mask, row_ptr, codes];
        self.grid.pack_into(&mut parts);
        Ok(parts)
    }

    pub(super) fn unpack(
        tensor: &str,
        params: &QuantParams,
        rows: usize,
        cols: usize,
        parts: &[&[u8]],
    ) -> Result<Sparse> {
        let bits = params.bits;
        let mask = unpack_rows(tensor, "mask", parts[0], rows, cols, 1)?;
        let nnz: Vec<usize> = mask
            .chunks_exact(cols)
            .map(|row| row.iter().filter(|&&m| m == 1).count())
            .collect();
        let expected = row_ptr_of(tensor, &nnz, bits)?;
        let got = parts[1]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        if let Some((r, (g, e))) = got.zip(&expected).enumerate().find(|(_, (g, e))| g != *e) {
            return Err(invalid_payload(
                tensor,
                format!("row_ptr[{r}] is {g} but the mask implies {e}"),
            ));
        }
        let src = parts[2];
        let total = expected[rows] as usize;
        if src.len() != total {
            return Err(invalid_part(
                tensor,
                "codes",
                format!("is {} bytes but row_ptr[N] is {total}", src.len()),
            ));
        }
        let mut codes = vec![0u8; nnz.iter().sum()];
        let mut next = 0;
        for (r, &n) in nnz.iter().enumerate() {
            let row = &src[expected[r] as usize..expected[r + 1] as usize];
            bits::unpack_row(row, n, bits, &mut codes[next..next + n]);
            if !bits::padding_is_zero(row, n, bits) {
                return Err(nonzero_padding(tensor, "codes", r));
            }
            next += n;
        }
        let grid = Grid::unpack(tensor, params, cols, &parts[3..])?;
        Ok(Sparse {
            rows,
            cols,
            grid,
            mask: mask.iter().map(|&m| m == 1).collect(),
            codes,
        })
    }

    pub(super) fn dequantize(&self) -> Vec<f32> {
        let cols = self.cols;
        let mut codes = self.codes.iter();
        let mut out = vec![0.0f32; self.mask.len()];
        for (i, (o, &kept)) in out.iter_mut().zip(&self.mask).enumerate() {
            if kept {
                let q = *codes
                    .next()
                    .expect("a valid payload has one code per set mask bit");
                *o = self.grid.decode(i / cols, i % cols, cols, q);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_ptr_from_counts() {
        // stride(0, 4) = 0, stride(5, 4) = 16, stride(33, 4) = 32.
        assert_eq!(row_ptr_of("t", &[0, 5, 33], 4).unwrap(), [0, 0, 16, 48]);
    }
}

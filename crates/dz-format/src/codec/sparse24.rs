//! `sparse24` (SPEC.md section 3.3): 2:4 structured sparsity along the columns, kept entries quantized.
//! Parts: `codes` (`cols/2` codes a row), `meta` (one nibble `i0 | i1 << 2` per run of 4), `scales`,
//! [`zeros`].

use super::{
    check_codes, check_len, checked_mul, invalid_payload, pack_rows, unpack_rows, Grid, Sparse24,
};
use crate::error::Result;
use crate::manifest::QuantParams;

/// The metadata nibble of a run whose kept entries are at positions `i0 < i1`.
pub(super) fn meta_nibble(i0: u8, i1: u8) -> u8 {
    i0 | (i1 << 2)
}

/// The positions `(i0, i1)` of a metadata nibble, if it is one of the six valid ones (`i0 < i1`).
pub(super) fn meta_positions(nibble: u8) -> Option<(u8, u8)> {
    let (i0, i1) = (nibble & 3, (nibble >> 2) & 3);
    (nibble < 16 && i0 < i1).then_some((i0, i1))
}

/// Whether every metadata nibble of `rows` rows of `runs` nibbles (4-bit rows, packed from the low
/// nibble up, padded to `stride`) names two positions `i0 < i1`: what [`Sparse24::unpack`] checks, on
/// the packed bytes. Lengths and padding are checked apart.
pub(super) fn nibbles_pass(meta: &[u8], rows: usize, runs: usize) -> bool {
    // A byte of two data nibbles passes when both do.
    const fn table() -> [bool; 256] {
        let mut t = [false; 256];
        let mut b = 0;
        while b < 256 {
            let (lo, hi) = (b & 15, b >> 4);
            t[b] = (lo & 3) < ((lo >> 2) & 3) && (hi & 3) < ((hi >> 2) & 3);
            b += 1;
        }
        t
    }
    const BYTE_PASSES: [bool; 256] = table();
    let Some(row_bytes) = crate::layout::stride(runs, 4) else {
        return false;
    };
    if rows == 0 || runs == 0 {
        return true;
    }
    meta.chunks_exact(row_bytes).take(rows).all(|row| {
        let full = &row[..runs / 2];
        full.iter().all(|&b| BYTE_PASSES[b as usize])
            && (runs.is_multiple_of(2) || meta_positions(row[runs / 2] & 15).is_some())
    })
}

impl Sparse24 {
    pub(super) fn validate(&self, tensor: &str) -> Result<()> {
        // check_codec has checked cols % 4 == 0.
        let n = checked_mul(tensor, "codes", self.rows, self.cols / 2)?;
        check_len(tensor, "codes", self.codes.len(), n)?;
        check_len(tensor, "positions", self.positions.len(), n)?;
        check_codes(
            tensor,
            "codes",
            &self.codes,
            self.cols / 2,
            self.grid.params.bits,
        )?;
        let runs = self.cols / 4;
        for (i, pair) in self.positions.chunks_exact(2).enumerate() {
            if !(pair[0] < pair[1] && pair[1] < 4) {
                return Err(invalid_payload(
                    tensor,
                    format!(
                        "positions at row {}, run {} are ({}, {}); need i0 < i1 < 4",
                        i / runs,
                        i % runs,
                        pair[0],
                        pair[1]
                    ),
                ));
            }
        }
        self.grid.validate(tensor, self.rows, self.cols)
    }

    pub(super) fn pack(&self, tensor: &str) -> Result<Vec<Vec<u8>>> {
        let bits = self.grid.params.bits;
        let codes = pack_rows(tensor, &self.codes, self.rows, self.cols / 2, bits)?;
        let nibbles: Vec<u8> = self
            .positions
            .chunks_exact(2)
            .map(|pair| meta_nibble(pair[0], pair[1]))
            .collect();
        let meta = pack_rows(tensor, &nibbles, self.rows, self.cols / 4, 4)?;
        let mut parts = vec![codes, meta];
        self.grid.pack_into(&mut parts);
        Ok(parts)
    }

    pub(super) fn unpack(
        tensor: &str,
        params: &QuantParams,
        rows: usize,
        cols: usize,
        parts: &[&[u8]],
    ) -> Result<Sparse24> {
        let runs = cols / 4;
        let codes = unpack_rows(tensor, "codes", parts[0], rows, cols / 2, params.bits)?;
        let nibbles = unpack_rows(tensor, "meta", parts[1], rows, runs, 4)?;
        let mut positions = Vec::with_capacity(codes.len());
        for (i, &nib) in nibbles.iter().enumerate() {
            let (i0, i1) = meta_positions(nib).ok_or_else(|| {
                invalid_payload(
                    tensor,
                    format!(
                        "meta: row {}, run {} has nibble {nib:#x}; must be one of 0x4, 0x8, 0xc, \
                         0x9, 0xd, 0xe (positions i0 < i1)",
                        i / runs,
                        i % runs
                    ),
                )
            })?;
            positions.extend([i0, i1]);
        }
        let grid = Grid::unpack(tensor, params, cols, &parts[2..])?;
        Ok(Sparse24 {
            rows,
            cols,
            grid,
            codes,
            positions,
        })
    }

    pub(super) fn dequantize(&self) -> Vec<f32> {
        let cols = self.cols;
        let mut out = vec![0.0f32; self.rows * cols];
        let kept = self.codes.iter().zip(&self.positions);
        for (i, (&q, &pos)) in kept.enumerate() {
            // Kept entry i is code 2c + j of row r, at column 4c + pos.
            let (r, m) = (i / (cols / 2), i % (cols / 2));
            let col = 4 * (m / 2) + pos as usize;
            out[r * cols + col] = self.grid.decode(r, col, cols, q);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles() {
        let valid: Vec<u8> = (0..16).filter(|&n| meta_positions(n).is_some()).collect();
        assert_eq!(valid, [0x4, 0x8, 0x9, 0xC, 0xD, 0xE]);
        assert_eq!(meta_nibble(1, 3), 0xD);
        assert_eq!(meta_positions(0xD), Some((1, 3)));
        assert_eq!(meta_positions(0x6), None); // i0 = 2, i1 = 1
        assert_eq!(meta_positions(0x5), None); // i0 = i1 = 1
    }
}

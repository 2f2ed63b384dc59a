//! CPU decoder of `sparse`: count the kept entries before the chunk (a popcount of the mask prefix),
//! unpack the chunk's kept codes, then walk the mask, branch-free: every column computes its value from
//! the next code and keeps it or zero.

use dz_format::layout::stride;
use dz_format::QuantParams;

use crate::codec::{affine, unpack, GridView, RowDecode, CHUNK};
use crate::cpu::HostDelta;

/// Decoder of `sparse` with `B`-bit codes.
pub(crate) struct SparseDec<'a, const B: usize> {
    mask: &'a [u8],
    mask_stride: usize,
    row_ptr: &'a [u8],
    codes: &'a [u8],
    grid: GridView<'a>,
    rows: usize,
    cols: usize,
}

impl<'a, const B: usize> SparseDec<'a, B> {
    /// `h` holds a validated `sparse` payload with `p.bits == B` (`row_ptr` agrees with `mask`).
    pub(crate) fn new(h: &HostDelta<'a>, p: &QuantParams) -> Self {
        debug_assert_eq!(p.bits as usize, B);
        SparseDec {
            mask: h.parts[0],
            mask_stride: stride(h.k, 1).expect("validated layout"),
            row_ptr: h.parts[1],
            codes: h.parts[2],
            grid: GridView::new(p, h.k, &h.parts[3..]),
            rows: h.n_stored,
            cols: h.k,
        }
    }

    #[inline(always)]
    fn ptr(&self, i: usize) -> usize {
        let b = &self.row_ptr[4 * i..4 * i + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    }
}

/// Set bits of `bytes`.
#[inline(always)]
fn popcount(bytes: &[u8]) -> usize {
    let mut words = bytes.chunks_exact(8);
    let mut n: usize = words
        .by_ref()
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")).count_ones() as usize)
        .sum();
    n += words
        .remainder()
        .iter()
        .map(|b| b.count_ones() as usize)
        .sum::<usize>();
    n
}

impl<const B: usize> RowDecode for SparseDec<'_, B> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    #[inline(always)]
    fn decode(&self, r: usize, c0: usize, out: &mut [f32]) {
        let n = out.len();
        let mask = &self.mask[r * self.mask_stride..(r + 1) * self.mask_stride];
        let codes = &self.codes[self.ptr(r)..self.ptr(r + 1)];
        // c0 % 32 == 0: the prefix is whole bytes.
        let before = popcount(&mask[..c0 / 8]);
        let mut keep = [0u8; CHUNK];
        let keep = &mut keep[..n];
        unpack::<1>(mask, c0, keep);
        let nnz = keep.iter().map(|&k| usize::from(k)).sum::<usize>();
        // One spare code: the branch-free walk below reads the next code even after the last kept one.
        let mut q = [0u8; CHUNK + 1];
        unpack::<B>(codes, before, &mut q[..nnz]);
        let mut next = 0;
        let gs = self.grid.global_scale();
        for (lo, hi, s, z) in self.grid.segments(r, c0, n) {
            for (o, &k) in out[lo..hi].iter_mut().zip(&keep[lo..hi]) {
                let v = affine(q[next], z, s, gs);
                *o = if k != 0 { v } else { 0.0 };
                next += usize::from(k);
            }
        }
    }
}

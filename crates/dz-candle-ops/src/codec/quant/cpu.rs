//! CPU decoder of `quant`: per group segment of the chunk, the codes become floats in one fused loop
//! (unpack + the SPEC formula with the group's scale and zero point).

use dz_format::layout::stride;
use dz_format::QuantParams;

use crate::codec::{decode_affine, GridView, RowDecode};
use crate::cpu::HostDelta;

/// Decoder of `quant` with `B`-bit codes.
pub(crate) struct QuantDec<'a, const B: usize> {
    codes: &'a [u8],
    stride: usize,
    grid: GridView<'a>,
    rows: usize,
    cols: usize,
}

impl<'a, const B: usize> QuantDec<'a, B> {
    /// `h` holds a validated `quant` payload with `p.bits == B`.
    pub(crate) fn new(h: &HostDelta<'a>, p: &QuantParams) -> Self {
        debug_assert_eq!(p.bits as usize, B);
        QuantDec {
            codes: h.parts[0],
            stride: stride(h.k, p.bits).expect("validated layout"),
            grid: GridView::new(p, h.k, &h.parts[1..]),
            rows: h.n_stored,
            cols: h.k,
        }
    }
}

impl<const B: usize> RowDecode for QuantDec<'_, B> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    #[inline(always)]
    fn decode(&self, r: usize, c0: usize, out: &mut [f32]) {
        // Group segments start at multiples of 4 columns (group sizes are), so for 2, 4 and 8 bits every
        // segment starts on a byte.
        let row = &self.codes[r * self.stride..(r + 1) * self.stride];
        let gs = self.grid.global_scale();
        for (lo, hi, s, z) in self.grid.segments(r, c0, out.len()) {
            decode_affine::<B>(row, c0 + lo, &mut out[lo..hi], z, s, gs);
        }
    }
}

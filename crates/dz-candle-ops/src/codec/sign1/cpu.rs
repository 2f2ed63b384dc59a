//! CPU decoder of `sign1`: `(±1) * s * global_scale` is `±(s * global_scale)` exactly (negation commutes
//! with rounding), so a chunk is one magnitude with the sign bit set from the stream.

use dz_format::layout::stride;

use crate::codec::{f16_at, unpack, RowDecode};
use crate::cpu::HostDelta;

/// Decoder of `sign1`.
pub(crate) struct Sign1Dec<'a> {
    signs: &'a [u8],
    stride: usize,
    scales: &'a [u8],
    global_scale: f32,
    rows: usize,
    cols: usize,
}

impl<'a> Sign1Dec<'a> {
    /// `h` holds a validated `sign1` payload.
    pub(crate) fn new(h: &HostDelta<'a>, global_scale: f32) -> Self {
        Sign1Dec {
            signs: h.parts[0],
            stride: stride(h.k, 1).expect("validated layout"),
            scales: h.parts[1],
            global_scale,
            rows: h.n_stored,
            cols: h.k,
        }
    }
}

impl RowDecode for Sign1Dec<'_> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    #[inline(always)]
    fn decode(&self, r: usize, c0: usize, out: &mut [f32]) {
        let row = &self.signs[r * self.stride..(r + 1) * self.stride];
        // (+1 * s) * gs = s * gs, as the SPEC formula; a 0 bit flips the sign.
        let plus = (f16_at(self.scales, r) * self.global_scale).to_bits();
        // c0 % 32 == 0: whole bytes, 8 values each, then the tail of the row.
        let whole = out.len() / 8;
        let (head, tail) = out.split_at_mut(whole * 8);
        for (o, &b) in head.as_chunks_mut::<8>().0.iter_mut().zip(&row[c0 / 8..]) {
            for (i, v) in o.iter_mut().enumerate() {
                *v = signed(plus, (b >> i) & 1);
            }
        }
        let mut bits = [0u8; 8];
        let bits = &mut bits[..tail.len()];
        unpack::<1>(row, c0 + whole * 8, bits);
        for (o, &b) in tail.iter_mut().zip(bits.iter()) {
            *o = signed(plus, b);
        }
    }
}

/// `plus` (the bits of a positive f32) with its sign flipped when `bit` is 0.
#[inline(always)]
fn signed(plus: u32, bit: u8) -> f32 {
    f32::from_bits(plus ^ (u32::from(bit ^ 1) << 31))
}

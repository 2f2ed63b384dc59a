//! CPU decoder of `sparse24`: unpack the kept codes and the metadata nibbles of a chunk, then expand each
//! run of 4 columns: every slot takes the kept value whose position its nibble names, or zero.

use dz_format::layout::stride;
use dz_format::QuantParams;

use crate::codec::{affine, unpack, GridView, RowDecode, CHUNK};
use crate::cpu::HostDelta;

/// Decoder of `sparse24` with `B`-bit codes.
pub(crate) struct Sparse24Dec<'a, const B: usize> {
    codes: &'a [u8],
    codes_stride: usize,
    meta: &'a [u8],
    meta_stride: usize,
    grid: GridView<'a>,
    rows: usize,
    cols: usize,
}

impl<'a, const B: usize> Sparse24Dec<'a, B> {
    /// `h` holds a validated `sparse24` payload with `p.bits == B` (so `K % 4 == 0` and every nibble is
    /// one of the six valid ones).
    pub(crate) fn new(h: &HostDelta<'a>, p: &QuantParams) -> Self {
        debug_assert_eq!(p.bits as usize, B);
        Sparse24Dec {
            codes: h.parts[0],
            codes_stride: stride(h.k / 2, p.bits).expect("validated layout"),
            meta: h.parts[1],
            meta_stride: stride(h.k / 4, 4).expect("validated layout"),
            grid: GridView::new(p, h.k, &h.parts[2..]),
            rows: h.n_stored,
            cols: h.k,
        }
    }
}

impl<const B: usize> RowDecode for Sparse24Dec<'_, B> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    #[inline(always)]
    fn decode(&self, r: usize, c0: usize, out: &mut [f32]) {
        // K % 4 == 0 and c0 % 32 == 0: the chunk holds whole runs, and group boundaries (multiples of 4)
        // never split a run.
        let n = out.len();
        let runs = n / 4;
        let codes = &self.codes[r * self.codes_stride..(r + 1) * self.codes_stride];
        let meta = &self.meta[r * self.meta_stride..(r + 1) * self.meta_stride];
        let mut q = [0u8; CHUNK / 2];
        let mut m = [0u8; CHUNK / 4];
        unpack::<B>(codes, c0 / 2, &mut q[..2 * runs]);
        unpack::<4>(meta, c0 / 4, &mut m[..runs]);
        let gs = self.grid.global_scale();
        let (runs_out, _) = out.as_chunks_mut::<4>();
        for (lo, hi, s, z) in self.grid.segments(r, c0, n) {
            let (lo, hi) = (lo / 4, hi / 4);
            let seg = runs_out[lo..hi]
                .iter_mut()
                .zip(&m[lo..hi])
                .zip(q[2 * lo..2 * hi].as_chunks::<2>().0);
            // Branch-free: a select per slot, which the compiler vectorizes across runs.
            for ((o, &nib), kept) in seg {
                let (i0, i1) = (nib & 3, nib >> 2);
                let v0 = affine(kept[0], z, s, gs);
                let v1 = affine(kept[1], z, s, gs);
                for (slot, v) in (0u8..).zip(o.iter_mut()) {
                    *v = if slot == i0 {
                        v0
                    } else if slot == i1 {
                        v1
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

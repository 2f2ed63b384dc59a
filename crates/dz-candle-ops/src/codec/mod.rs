//! Per-codec decoding of the packed layouts of SPEC.md sections 3-4.
//!
//! One directory per codec; each has a `cpu.rs` with a [`RowDecode`] implementation (a CUDA `cuda.rs`
//! comes with dz-kernels). A decoder turns a chunk of one stored row (at most [`CHUNK`] columns, starting
//! at a multiple of 32) into f32, straight from the packed bytes. Decoders are generic over the bit width,
//! so the inner loops hold no branch on codec or bits: [`visit`] matches the codec once per op call and
//! hands a concrete decoder to a [`DecodeVisitor`], which the CPU engines are.
//!
//! Every decoder applies the SPEC formula `((q as f32) - z) * (s as f32) * global_scale` in that order,
//! so the values it produces are bit-identical to `dz_format::codec::Payload::dequantize`.

pub(crate) mod dense;
pub(crate) mod quant;
pub(crate) mod sign1;
pub(crate) mod sparse;
pub(crate) mod sparse24;
pub(crate) mod zero;

use dz_format::{Codec, Dtype};
use half::f16;

use crate::cpu::HostDelta;

/// Most columns decoded at once: a chunk of f32 stays in L1. A multiple of 32, so that every chunk starts
/// at a byte boundary of every bit stream (32 values of `b` bits, `K/2` codes, `K/4` nibbles).
pub(crate) const CHUNK: usize = 512;

/// Decodes chunks of the stored rows of one packed delta.
pub(crate) trait RowDecode: Sync {
    /// Every value is zero (the `zero` codec): engines skip the work.
    const ZERO: bool = false;
    /// Stored rows.
    fn rows(&self) -> usize;
    /// Columns (`K`).
    fn cols(&self) -> usize;
    /// Writes columns `c0 .. c0 + out.len()` of stored row `r` to `out`. The caller guarantees
    /// `r < rows()`, `c0 % 32 == 0`, `out.len() <= CHUNK` and `c0 + out.len() <= cols()`.
    fn decode(&self, r: usize, c0: usize, out: &mut [f32]);

    /// Decodes columns `c0 .. c0 + out.len()` of row `r` in chunks (any length, `c0 % 32 == 0`).
    #[inline(always)]
    fn decode_span(&self, r: usize, c0: usize, out: &mut [f32]) {
        for (i, chunk) in out.chunks_mut(CHUNK).enumerate() {
            self.decode(r, c0 + i * CHUNK, chunk);
        }
    }
}

/// Something to run with a concrete decoder (a generic closure).
pub(crate) trait DecodeVisitor {
    /// What it returns.
    type Output;
    /// Runs with decoder `d`.
    fn visit<D: RowDecode>(self, d: &D) -> Self::Output;
}

/// Builds the decoder of `h`'s codec and bit width and runs `v` with it.
pub(crate) fn visit<V: DecodeVisitor>(h: &HostDelta<'_>, v: V) -> V::Output {
    match h.codec {
        Codec::Dense { dtype } => match dtype {
            Dtype::F32 => v.visit(&dense::DenseDec::<dense::F32>::new(h)),
            Dtype::F16 => v.visit(&dense::DenseDec::<dense::F16>::new(h)),
            Dtype::Bf16 => v.visit(&dense::DenseDec::<dense::Bf16>::new(h)),
        },
        Codec::Quant(p) => match p.bits {
            2 => v.visit(&quant::QuantDec::<2>::new(h, &p)),
            3 => v.visit(&quant::QuantDec::<3>::new(h, &p)),
            4 => v.visit(&quant::QuantDec::<4>::new(h, &p)),
            _ => v.visit(&quant::QuantDec::<8>::new(h, &p)),
        },
        Codec::Sparse24(p) => match p.bits {
            2 => v.visit(&sparse24::Sparse24Dec::<2>::new(h, &p)),
            3 => v.visit(&sparse24::Sparse24Dec::<3>::new(h, &p)),
            4 => v.visit(&sparse24::Sparse24Dec::<4>::new(h, &p)),
            _ => v.visit(&sparse24::Sparse24Dec::<8>::new(h, &p)),
        },
        Codec::Sparse(p) => match p.bits {
            2 => v.visit(&sparse::SparseDec::<2>::new(h, &p)),
            3 => v.visit(&sparse::SparseDec::<3>::new(h, &p)),
            4 => v.visit(&sparse::SparseDec::<4>::new(h, &p)),
            _ => v.visit(&sparse::SparseDec::<8>::new(h, &p)),
        },
        Codec::Sign1 { global_scale } => v.visit(&sign1::Sign1Dec::new(h, global_scale)),
        Codec::Zero => v.visit(&zero::ZeroDec::new(h)),
    }
}

/// Value `idx` of a bit stream of `B`-bit values, one at a time (`B <= 8`: it spans at most two bytes).
#[inline(always)]
fn unpack_one<const B: usize>(src: &[u8], idx: usize) -> u8 {
    let bit = idx * B;
    let (byte, shift) = (bit / 8, bit % 8);
    let mut w = u16::from(src[byte]);
    if shift + B > 8 {
        w |= u16::from(src[byte + 1]) << 8;
    }
    ((w >> shift) as u8) & mask::<B>()
}

#[inline(always)]
const fn mask<const B: usize>() -> u8 {
    ((1u16 << B) - 1) as u8
}

/// Unpacks values `first .. first + out.len()` of a bit stream of `B`-bit values (SPEC.md section 3:
/// LSB first) into `out`.
///
/// When `first` is byte-aligned (`first * B % 8 == 0`, always the case for the chunk starts the engines
/// use) and `B` divides 8, the main loop splits whole bytes into `8 / B` values each: a loop with a fixed
/// interleave that the compiler vectorizes. Otherwise (3 bits, unaligned starts), blocks of 8 values
/// (exactly `B` bytes, one `u64` load) make the main loop. Leftover values go one at a time.
///
/// Panics (a bug, not bad input: the parts are validated) if `src` is too short.
#[inline(always)]
pub(crate) fn unpack<const B: usize>(src: &[u8], first: usize, out: &mut [u8]) {
    if 8 % B == 0 && (first * B).is_multiple_of(8) {
        let per = 8 / B;
        let whole = out.len() / per;
        let bytes = &src[first * B / 8..first * B / 8 + whole];
        let (head, tail) = out.split_at_mut(whole * per);
        match B {
            8 => head.copy_from_slice(bytes),
            4 => {
                for (o, &b) in head.as_chunks_mut::<2>().0.iter_mut().zip(bytes) {
                    *o = [b & 15, b >> 4];
                }
            }
            2 => {
                for (o, &b) in head.as_chunks_mut::<4>().0.iter_mut().zip(bytes) {
                    *o = [b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6];
                }
            }
            _ => {
                for (o, &b) in head.as_chunks_mut::<8>().0.iter_mut().zip(bytes) {
                    for (i, v) in o.iter_mut().enumerate() {
                        *v = (b >> i) & 1;
                    }
                }
            }
        }
        for (i, o) in tail.iter_mut().enumerate() {
            *o = unpack_one::<B>(src, first + whole * per + i);
        }
        return;
    }
    let n = out.len();
    let mut j = 0;
    while j < n && !(first + j).is_multiple_of(8) {
        out[j] = unpack_one::<B>(src, first + j);
        j += 1;
    }
    let mut byte = (first + j) / 8 * B;
    while j + 8 <= n && byte + B <= src.len() {
        let mut w = [0u8; 8];
        w[..B].copy_from_slice(&src[byte..byte + B]);
        let w = u64::from_le_bytes(w);
        for (i, o) in out[j..j + 8].iter_mut().enumerate() {
            *o = (w >> (i * B)) as u8 & mask::<B>();
        }
        j += 8;
        byte += B;
    }
    while j < n {
        out[j] = unpack_one::<B>(src, first + j);
        j += 1;
    }
}

/// The SPEC decode formula, in its order: `((q as f32) - z) * s * gs`.
#[inline(always)]
pub(crate) fn affine(q: u8, z: f32, s: f32, gs: f32) -> f32 {
    (f32::from(q) - z) * s * gs
}

/// `out[i] = affine(value first + i)` of a bit stream of `B`-bit codes, fused: for `B` in {2, 4, 8} and a
/// byte-aligned `first`, each byte becomes `8 / B` floats in one vectorizable loop; otherwise the codes
/// are unpacked to a byte buffer first.
#[inline(always)]
pub(crate) fn decode_affine<const B: usize>(
    src: &[u8],
    first: usize,
    out: &mut [f32],
    z: f32,
    s: f32,
    gs: f32,
) {
    if B != 1 && 8 % B == 0 && (first * B).is_multiple_of(8) {
        let per = 8 / B;
        let whole = out.len() / per;
        let bytes = &src[first * B / 8..first * B / 8 + whole];
        let (head, tail) = out.split_at_mut(whole * per);
        match B {
            8 => {
                for (o, &b) in head.iter_mut().zip(bytes) {
                    *o = affine(b, z, s, gs);
                }
            }
            4 => {
                for (o, &b) in head.as_chunks_mut::<2>().0.iter_mut().zip(bytes) {
                    o[0] = affine(b & 15, z, s, gs);
                    o[1] = affine(b >> 4, z, s, gs);
                }
            }
            _ => {
                for (o, &b) in head.as_chunks_mut::<4>().0.iter_mut().zip(bytes) {
                    o[0] = affine(b & 3, z, s, gs);
                    o[1] = affine((b >> 2) & 3, z, s, gs);
                    o[2] = affine((b >> 4) & 3, z, s, gs);
                    o[3] = affine(b >> 6, z, s, gs);
                }
            }
        }
        for (i, o) in tail.iter_mut().enumerate() {
            *o = affine(unpack_one::<B>(src, first + whole * per + i), z, s, gs);
        }
        return;
    }
    let mut q = [0u8; CHUNK];
    for (i, oc) in out.chunks_mut(CHUNK).enumerate() {
        let q = &mut q[..oc.len()];
        unpack::<B>(src, first + i * CHUNK, q);
        for (o, &c) in oc.iter_mut().zip(q.iter()) {
            *o = affine(c, z, s, gs);
        }
    }
}

/// Reads f16 number `i` of a little-endian f16 table as f32.
#[inline(always)]
pub(crate) fn f16_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32()
}

/// The quantization grid of `quant`, `sparse24` and `sparse` (scales, zeros, global scale), read from
/// its packed parts.
#[derive(Clone, Copy)]
pub(crate) struct GridView<'a> {
    scales: &'a [u8],
    zeros: Option<&'a [u8]>,
    n_groups: usize,
    /// Columns per group; `usize::MAX` when the whole row is one group.
    group: usize,
    global_scale: f32,
    /// `2^(bits-1)`, the zero point of a symmetric grid.
    z_sym: f32,
}

impl<'a> GridView<'a> {
    /// `rest` = the `scales` part then, when asymmetric, the `zeros` part.
    pub(crate) fn new(p: &dz_format::QuantParams, cols: usize, rest: &[&'a [u8]]) -> Self {
        GridView {
            scales: rest[0],
            zeros: if p.symmetric { None } else { Some(rest[1]) },
            n_groups: p.n_groups(cols),
            group: if p.group_size == 0 {
                usize::MAX
            } else {
                p.group_size as usize
            },
            global_scale: p.global_scale,
            z_sym: (1u32 << (p.bits - 1)) as f32,
        }
    }

    /// The group segments of columns `c0 .. c0 + n` of row `r`: `(lo, hi, s, z)` with `lo, hi` relative
    /// to `c0`; the decode formula is then `((q as f32) - z) * s * global_scale`.
    ///
    /// An iterator, not a callback: a closure would be compiled on its own, outside the ISA-specific
    /// kernel it is called from, when the compiler chooses not to inline it.
    #[inline(always)]
    pub(crate) fn segments(&self, r: usize, c0: usize, n: usize) -> Segments<'a> {
        Segments {
            grid: *self,
            r,
            c0,
            c: c0,
            end: c0 + n,
        }
    }

    /// The global scale.
    #[inline(always)]
    pub(crate) fn global_scale(&self) -> f32 {
        self.global_scale
    }
}

/// See [`GridView::segments`].
pub(crate) struct Segments<'a> {
    grid: GridView<'a>,
    r: usize,
    c0: usize,
    c: usize,
    end: usize,
}

impl Iterator for Segments<'_> {
    type Item = (usize, usize, f32, f32);

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.c >= self.end {
            return None;
        }
        let g = &self.grid;
        let (group, c) = (g.group, self.c);
        let (gi, seg_end) = if group == usize::MAX {
            (0, self.end)
        } else {
            (c / group, ((c / group + 1) * group).min(self.end))
        };
        let at = self.r * g.n_groups + gi;
        let s = f16_at(g.scales, at);
        let z = match g.zeros {
            None => g.z_sym,
            Some(zeros) => f16_at(zeros, at),
        };
        self.c = seg_end;
        Some((c - self.c0, seg_end - self.c0, s, z))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dz_format::codec::bits::pack_row;

    fn check<const B: usize>() {
        let n = 77;
        let vals: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8 & mask::<B>()).collect();
        let mut packed = vec![0u8; dz_format::layout::stride(n, B as u8).unwrap()];
        pack_row(&vals, B as u8, &mut packed);
        for first in [0, 1, 5, 8, 16, 33] {
            for len in [0, 1, 7, 8, 9, 30, n - first] {
                let len = len.min(n - first);
                let mut out = vec![0xFF; len];
                unpack::<B>(&packed, first, &mut out);
                assert_eq!(
                    out,
                    vals[first..first + len],
                    "B={B} first={first} len={len}"
                );
            }
        }
        // The last block may not have B whole bytes left in a tight buffer.
        let tight = &packed[..dz_format::codec::bits::packed_len(n, B as u8).unwrap()];
        let mut out = vec![0; n];
        unpack::<B>(tight, 0, &mut out);
        assert_eq!(out, vals);
    }

    #[test]
    fn unpack_matches_dz_format() {
        check::<1>();
        check::<2>();
        check::<3>();
        check::<4>();
        check::<8>();
    }
}

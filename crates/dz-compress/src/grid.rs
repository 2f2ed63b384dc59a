//! Fitting a group's quantization grid and rounding values onto it (SPEC.md section 3, "Quantization grid").
//!
//! A value's code is chosen with the *stored* grid (the f16-rounded scale and zero point times the global
//! scale), so the value a method feeds back into its error correction is bit for bit what a reader's
//! dequantization gives: `((q as f32) - z) * (s as f32) * global_scale`.

use std::ops::Range;

use dz_format::QuantParams;
use half::f16;

/// The largest code of a `bits`-bit grid: `2^bits - 1`.
pub fn max_code(bits: u8) -> u32 {
    (1u32 << bits) - 1
}

/// The zero point of a symmetric `bits`-bit grid: `2^(bits-1)`.
pub fn symmetric_zero(bits: u8) -> f32 {
    (1u32 << (bits - 1)) as f32
}

/// The columns of each group of a row of `cols` columns: `[g*G, min((g+1)*G, cols))`, or the whole row
/// when `group_size` is 0.
pub fn group_ranges(cols: usize, group_size: u32) -> impl Iterator<Item = Range<usize>> {
    let g = if group_size == 0 {
        cols.max(1)
    } else {
        group_size as usize
    };
    (0..cols)
        .step_by(g)
        .map(move |start| start..(start + g).min(cols))
}

/// The (unscaled) range a group's grid must cover: `[min(x, 0), max(x, 0)]` asymmetric, `[-a, a]` with
/// `a = max |x|` symmetric. Zero is always inside it, as in GPTQ.
fn range(values: &[f32], symmetric: bool) -> (f32, f32) {
    let (lo, hi) = values
        .iter()
        .fold((0.0f32, 0.0f32), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    if symmetric {
        let a = hi.max(-lo);
        (-a, a)
    } else {
        (lo, hi)
    }
}

/// The grid step a group needs before global scaling: `2 * max|x| / (2^bits - 1)` symmetric (GPTQ's
/// symmetric mode), `(max - min) / (2^bits - 1)` asymmetric. Zero for an all-zero group.
pub fn raw_scale(values: &[f32], bits: u8, symmetric: bool) -> f32 {
    let (lo, hi) = range(values, symmetric);
    (hi - lo) / max_code(bits) as f32
}

/// The power of two that brings the largest group step near 1 in f16: `2^floor(log2(max_raw_scale))`,
/// so stored scales of that magnitude lie in `[1, 2)` and small deltas (~1e-4) do not fall into f16's
/// subnormal range. A power of two so that multiplying by it is exact. 1 when `max_raw_scale` is zero or not
/// finite.
pub fn global_scale_for(max_raw_scale: f32) -> f32 {
    if !(max_raw_scale.is_finite() && max_raw_scale > 0.0) {
        return 1.0;
    }
    let e = max_raw_scale.log2().floor() as i32;
    // Normal f32 powers of two only: exact, finite and > 0.
    let e = e.clamp(-126, 127);
    f32::from_bits(((e + 127) as u32) << 23)
}

/// The global scale for a `rows x cols` matrix (row-major) under a grid of `bits`, `group_size` and
/// `symmetric`: [`global_scale_for`] of the largest [`raw_scale`] over all groups.
pub fn choose_global_scale(
    d: &[f32],
    cols: usize,
    bits: u8,
    group_size: u32,
    symmetric: bool,
) -> f32 {
    let max = d
        .chunks(cols.max(1))
        .flat_map(|row| group_ranges(row.len(), group_size).map(move |r| &row[r]))
        .map(|g| raw_scale(g, bits, symmetric))
        .fold(0.0f32, f32::max);
    global_scale_for(max)
}

/// `x` as an f16 scale: finite and > 0. Values below f16's smallest subnormal become that subnormal (the grid
/// is then coarser than needed, never too narrow); values above f16's max become the max.
fn stored_scale(x: f32) -> f16 {
    let s = f16::from_f32(x);
    if s.is_infinite() {
        f16::MAX
    } else if s.to_f32() > 0.0 {
        s
    } else {
        // Zero, an underflow, or NaN.
        f16::from_bits(1)
    }
}

/// One group's stored grid: what a reader will decode with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupGrid {
    /// The stored f16 scale (before the global scale).
    pub scale: f16,
    /// The stored f16 zero point when asymmetric; `None` when symmetric.
    pub zero: Option<f16>,
    bits: u8,
    /// `scale * global_scale` in f32 (exact: the global scale is a power of two).
    step: f32,
    global_scale: f32,
    /// The zero point as decoded.
    z: f32,
}

impl GroupGrid {
    /// Fits a group's grid to `values` under `params` (bits, symmetry, global scale; `group_size` is not
    /// looked at). An all-zero (or empty) group gets scale 1 and an integer zero point, so that its codes
    /// decode to exactly 0.
    ///
    /// Asymmetric grids store a real-valued zero point `z = -min / step`, rounded to f16, so that `min` and
    /// `max` both land on codes.
    pub fn fit(values: &[f32], params: &QuantParams) -> GroupGrid {
        let (bits, gs) = (params.bits, params.global_scale);
        let (lo, hi) = range(values, params.symmetric);
        let (scale, zero) = if hi - lo > 0.0 {
            let scale = stored_scale((hi - lo) / max_code(bits) as f32 / gs);
            let zero = (!params.symmetric).then(|| {
                let step = scale.to_f32() * gs;
                f16::from_f32((-lo / step).clamp(0.0, max_code(bits) as f32))
            });
            (scale, zero)
        } else {
            let zero = (!params.symmetric).then(|| f16::from_f32(symmetric_zero(bits)));
            (f16::ONE, zero)
        };
        GroupGrid::new(scale, zero, bits, gs)
    }

    /// A grid from stored values.
    pub fn new(scale: f16, zero: Option<f16>, bits: u8, global_scale: f32) -> GroupGrid {
        let z = zero.map_or_else(|| symmetric_zero(bits), f16::to_f32);
        GroupGrid {
            scale,
            zero,
            bits,
            step: scale.to_f32() * global_scale,
            global_scale,
            z,
        }
    }

    /// The code whose decoded value is nearest `x` (clamped to `[0, 2^bits - 1]`).
    #[inline]
    pub fn code(&self, x: f32) -> u8 {
        let q = (x / self.step + self.z).round();
        q.clamp(0.0, max_code(self.bits) as f32) as u8
    }

    /// The decoded value of code `q`, exactly as SPEC.md section 3 computes it.
    #[inline]
    pub fn decode(&self, q: u8) -> f32 {
        (f32::from(q) - self.z) * self.scale.to_f32() * self.global_scale
    }

    /// [`GroupGrid::code`] and its decoded value.
    #[inline]
    pub fn quantize(&self, x: f32) -> (u8, f32) {
        let q = self.code(x);
        (q, self.decode(q))
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn params(bits: u8, symmetric: bool, global_scale: f32) -> QuantParams {
        QuantParams {
            bits,
            group_size: 0,
            symmetric,
            global_scale,
        }
    }

    #[test]
    fn group_ranges_cover_the_row() {
        let r: Vec<_> = group_ranges(10, 4).collect();
        assert_eq!(r, vec![0..4, 4..8, 8..10]);
        assert_eq!(group_ranges(10, 0).collect::<Vec<_>>(), vec![0..10]);
        assert_eq!(group_ranges(8, 8).collect::<Vec<_>>(), vec![0..8]);
    }

    #[test]
    fn global_scale_is_a_power_of_two_bringing_scales_near_one() {
        for (x, want) in [
            (3e-5f32, 2f32.powi(-16)),
            (1.0, 1.0),
            (1.5, 1.0),
            (0.75, 0.5),
            (300.0, 256.0),
        ] {
            let g = global_scale_for(x);
            assert_eq!(g, want, "{x}");
            assert!((1.0..2.0).contains(&(x / g)), "{x}");
        }
        assert_eq!(global_scale_for(0.0), 1.0);
        assert_eq!(global_scale_for(f32::NAN), 1.0);
        assert_eq!(global_scale_for(f32::INFINITY), 1.0);
        assert_eq!(global_scale_for(1e-44), 2f32.powi(-126));
    }

    #[test]
    fn codes_are_the_nearest_stored_values() {
        let mut rng = StdRng::seed_from_u64(3);
        for bits in [2u8, 3, 4, 8] {
            for symmetric in [true, false] {
                // Deltas around 1e-4: the stored scales would be subnormal in f16 without a global scale.
                let values: Vec<f32> = (0..64).map(|_| rng.gen_range(-2e-4..3e-4)).collect();
                let gs = global_scale_for(raw_scale(&values, bits, symmetric));
                let p = params(bits, symmetric, gs);
                let grid = GroupGrid::fit(&values, &p);
                assert!(
                    grid.scale.is_normal() && grid.scale.to_f32() >= 1.0,
                    "{:?}",
                    grid.scale
                );
                assert_eq!(grid.zero.is_none(), symmetric);
                let step = grid.scale.to_f32() * gs;
                for &x in &values {
                    let (q, v) = grid.quantize(x);
                    assert!(u32::from(q) <= max_code(bits));
                    // The decode formula of SPEC.md section 3, in that order.
                    let z = grid.zero.map_or(symmetric_zero(bits), f16::to_f32);
                    assert_eq!(v, (f32::from(q) - z) * grid.scale.to_f32() * gs);
                    // Nearest: no other code is closer (up to rounding), and the error is at most half a
                    // step except where the symmetric grid's top code clips.
                    let best = (0..=max_code(bits) as u8)
                        .map(|c| (grid.decode(c) - x).abs())
                        .fold(f32::MAX, f32::min);
                    assert!(
                        (v - x).abs() <= best + 1e-6 * step,
                        "bits {bits} sym {symmetric} x {x}"
                    );
                    let clip = if symmetric { 1.0 } else { 0.51 };
                    assert!(
                        (v - x).abs() <= clip * step,
                        "bits {bits} sym {symmetric} x {x}"
                    );
                }
            }
        }
    }

    #[test]
    fn degenerate_groups_decode_to_zero() {
        for symmetric in [true, false] {
            for bits in [2u8, 3, 4, 8] {
                let p = params(bits, symmetric, 2f32.powi(-10));
                for values in [&[][..], &[0.0, 0.0, -0.0][..]] {
                    let grid = GroupGrid::fit(values, &p);
                    assert!(grid.scale.to_f32() > 0.0 && grid.scale.is_finite());
                    assert_eq!(grid.quantize(0.0).1, 0.0);
                }
                // A value far below the smallest f16 step still gets a finite, non-zero scale.
                let grid = GroupGrid::fit(&[1e-30, -1e-30], &p);
                assert!(grid.scale.to_f32() > 0.0 && grid.scale.is_finite());
                assert!(grid.quantize(1e-30).1.abs() < 1e-9);
                // A huge value against a tiny global scale saturates instead of overflowing.
                let grid = GroupGrid::fit(&[1e30], &p);
                assert_eq!(grid.scale, f16::MAX);
            }
        }
    }
}

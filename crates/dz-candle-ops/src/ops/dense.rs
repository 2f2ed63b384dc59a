//! The dense route for many input rows: the delta formed once as a dense weight in `x`'s dtype (the
//! dequantize kernel writing `x`'s dtype: the codes read once, the weight written once), then one
//! matmul (cuBLAS on CUDA).
//!
//! Why: the delta kernels stream the codes and decode them for every tile of input rows, which wins while
//! the rows are few (decode) and loses when they are many (prefill). The H200 benchmark of session 4
//! (`bench/results/kernels-h200.md`, tensor-core v3 kernels) measured 4096 x 4096 4-bit 2:4 at 256 rows
//! in 132.9 us against cuBLAS bf16's 20.9 us; forming the bf16 weight moves ~67 MB (~20 us at the
//! measured copy bandwidth), so the route should take about 40 us there. A delta that keeps only the v4
//! layout is merged by the v4 dequantize kernel (a row subset of one keeps the kernels).

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Tensor};

use super::dequant::dequantize_as;
use super::Fill;
use crate::delta::DeviceDelta;

/// Input rows (per delta) from which the CUDA ops take the dense route, by default. Measured on the H200
/// (session 10, `bench/results/h200-s10-2026-11-30.md`, 4-bit 2:4, bf16; the route dequantizes into x's
/// dtype with the coalesced kernel): the route beats the kernels from 64 rows on the 7B shapes
/// (4096 x 4096: 37 us vs 46; 11008 x 4096: 81 vs 100; 4096 x 11008: 91 vs 119) and is about even or
/// slower at 32 (38 vs 40; 80 vs 55; 88 vs 107). Session 9's route (a merge into zeros, before the
/// coalesced stores) crossed over at 256.
pub const DEFAULT_DENSE_ROWS: usize = 64;

/// A delta that keeps only the v4 layout takes the route from at most this many rows: its kernels run
/// many rows as repeated 16-row tiles, each decoding the whole delta again. In the serving benchmark
/// (session 9, 7B, 32 fine-tunes, `--v4-kernels`) the route from 64 rows gave 176-206 tokens/s against
/// 157-171 without it. With the staged v4 dequantize (session 10) the route takes 46 us at 4096 x 4096
/// and 64 rows (the kernels: 46), 102 at 11008 x 4096 (100), 105 at 4096 x 11008 (119).
pub const V4_ONLY_DENSE_ROWS: usize = 64;

static DENSE_ROWS: AtomicUsize = AtomicUsize::new(DEFAULT_DENSE_ROWS);

/// Sets the number of input rows (per delta: a `delta_matmul` call's rows, an `sbmm` segment's rows) from
/// which `delta_matmul`, `delta_matmul_add` and `sbmm` on CUDA, with f16 or bf16 inputs, form the delta
/// as a dense weight and use one matmul instead of the delta kernels. 0 turns the route off. A delta that
/// keeps only the v4 layout takes it from `rows.min(V4_ONLY_DENSE_ROWS)` rows. The CPU never takes it.
/// Default [`DEFAULT_DENSE_ROWS`].
pub fn set_dense_rows(rows: usize) {
    DENSE_ROWS.store(rows, Ordering::Relaxed);
    DENSE_ROWS_SET.store(true, Ordering::Relaxed);
}

/// Whether [`set_dense_rows`] was called: then its threshold holds for every delta (no
/// [`V4_WIDE_DENSE_ROWS`] floor).
static DENSE_ROWS_SET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The threshold [`set_dense_rows`] set.
pub fn dense_rows() -> usize {
    DENSE_ROWS.load(Ordering::Relaxed)
}

/// With the 32-row v4 matmul tile ([`crate::set_v4_wide_tiles`], on by default) and the default threshold
/// (no [`set_dense_rows`] call), a `delta_matmul` of a delta that has a v4 layout takes the dense route
/// from at least this many rows (`sbmm` segments, which
/// run as 16-row tiles, keep [`dense_rows`]). Measured on the H200 (session 12,
/// `bench/results/h200-s12-2026-11-30.md`): the tile was faster than the route at 32-128 rows on every
/// 7B/13B shape and v4 codec (4096 x 4096 4b 2:4 at 64 rows: 25.1 vs 40.1 us; 13824 x 5120 at 128: 82.6
/// vs 123.3); at 256 rows the route was 5-15% faster on the four larger shapes and 15% slower on
/// 4096 x 4096 (43.9 vs 37.3), and past 256 the tile's time keeps growing with the rows, the route's
/// barely.
pub const V4_WIDE_DENSE_ROWS: usize = 256;

/// [`takes_dense`] for a `delta_matmul` / `delta_matmul_add` of `rows` rows: under the default threshold
/// (no [`set_dense_rows`] call), a delta the 32-row v4 tile takes goes dense from
/// `max(dense_rows(), V4_WIDE_DENSE_ROWS)` rows.
pub(crate) fn takes_dense_matmul(delta: &DeviceDelta, rows: usize, x_dtype: DType) -> bool {
    let wide = !DENSE_ROWS_SET.load(Ordering::Relaxed)
        && crate::v4_kernels()
        && crate::v4_wide_tiles()
        && delta.v4_parts().is_some();
    if wide && rows < V4_WIDE_DENSE_ROWS {
        return false;
    }
    takes_dense(delta, rows, x_dtype)
}

static SBMM_WIDE_SEGMENTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lets `sbmm` (and `sbmm_planned`, `sbmm_slots`) run each segment of more than 16 and fewer than
/// [`V4_WIDE_DENSE_ROWS`] rows of a delta that keeps only its v4 layout (prefill) as one `delta_matmul_add`
/// through the 32-row v4 tile, instead of 16-row pieces (each of which decodes the whole delta again) or
/// the dense route. On the H200 (session 13, 4-bit 2:4, bf16) the tile took 25 us at 64-128 rows of
/// 4096 x 4096 against 48-51 for the v4 dense route and 60-100 for the pieces; 55 against 106 and
/// 123-230 on 4096 x 11008; 45-83 against 152 and 214-376 on 13824 x 5120 (`kernels-wide.md`: `dz-sx`,
/// `dense-v4`, `v4-16`). On by default since session 14: `cuda_check`'s "wide segments" passed and
/// a 7B serving run with 32 fine-tunes (4-bit 2:4) gave 206.3 / 296.0 / 283.0 tokens/s at 4 / 16 / 64
/// req/s against 203.3 / 226.6 / 316.6 without (`deltazip serve --no-sbmm-wide-segments`). CUDA, f16 and bf16 only, deltas uploaded for the v4 kernels
/// only (`DeviceDelta::v4_only`), with the wide tiles on ([`crate::set_v4_wide_tiles`]).
pub fn set_sbmm_wide_segments(enabled: bool) {
    SBMM_WIDE_SEGMENTS.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_sbmm_wide_segments`] turned the wide segments on.
pub fn sbmm_wide_segments() -> bool {
    SBMM_WIDE_SEGMENTS.load(Ordering::Relaxed)
}

/// Whether an sbmm segment of `rows` input rows of `x_dtype` through `delta` runs as its own
/// `delta_matmul_add` through the 32-row tile ([`set_sbmm_wide_segments`]): from
/// [`crate::v4_wide_from`] rows (past 16, or from 9 on the largest shapes, where
/// `delta_matmul` takes that tile too).
pub(crate) fn takes_wide(delta: &DeviceDelta, rows: usize, x_dtype: DType) -> bool {
    let (n, k) = delta.dims();
    sbmm_wide_segments()
        && crate::v4_wide_tiles()
        && delta.device().is_cuda()
        && delta.v4_only()
        && rows >= crate::v4_wide_from(n, k) as usize
        && rows < V4_WIDE_DENSE_ROWS
        && matches!(x_dtype, DType::F16 | DType::BF16)
}

/// Whether an sbmm segment leaves the shared kernel launch: the wide tile ([`takes_wide`]) or the dense
/// route ([`takes_dense`]).
pub(crate) fn takes_own_route(delta: &DeviceDelta, rows: usize, x_dtype: DType) -> bool {
    takes_wide(delta, rows, x_dtype) || takes_dense(delta, rows, x_dtype)
}

/// Whether `rows` input rows of `x_dtype` through `delta` take the dense route.
pub(crate) fn takes_dense(delta: &DeviceDelta, rows: usize, x_dtype: DType) -> bool {
    let t = match dense_rows() {
        t if delta.v4_only() => t.min(V4_ONLY_DENSE_ROWS),
        t => t,
    };
    t > 0
        && rows >= t
        && delta.device().is_cuda()
        && matches!(x_dtype, DType::F16 | DType::BF16)
        && (!delta.v4_only() || delta.row_index().is_none())
}

/// `x · Dᵀ` through the dense weight, `x` `[.., K]` -> `[.., N_total]` in `x`'s dtype (checked by the
/// caller: contiguous, on the delta's device).
pub(crate) fn dense_matmul(x: &Tensor, delta: &DeviceDelta) -> candle_core::Result<Tensor> {
    let (n, k) = delta.dims();
    let w = dequantize_as(delta, x.dtype(), Fill::Uninit)?;
    let lead = &x.dims()[..x.rank() - 1];
    let m: usize = lead.iter().product();
    let y = x.reshape((m, k))?.matmul(&w.t()?)?;
    let mut dims = lead.to_vec();
    dims.push(n);
    y.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use dz_format::codec::{Grid, Payload, Sparse24};

    /// The route itself (on the CPU, where the ops never take it): the same numbers as the kernels.
    #[test]
    fn the_dense_route_is_the_same_product() {
        let (n, k, m) = (24, 256, 70);
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let params = dz_format::QuantParams {
            bits: 4,
            group_size: 128,
            symmetric: true,
            global_scale: 1.0 / 64.0,
        };
        let mut u = |below: u32| ((next() + 0.5) * below as f32) as u32 % below;
        let scales = (0..n * k / 128)
            .map(|_| half::f16::from_f32(0.25 + u(7) as f32 * 0.25))
            .collect();
        let codes = (0..n * k / 2).map(|_| u(16) as u8).collect();
        let positions = (0..n * k / 4)
            .flat_map(|_| {
                let a = u(3) as u8;
                [a, a + 1 + u(3 - a as u32) as u8]
            })
            .collect();
        let payload = Payload::Sparse24(Sparse24 {
            rows: n,
            cols: k,
            grid: Grid {
                params,
                scales,
                zeros: None,
            },
            codes,
            positions,
        });
        let delta = DeviceDelta::from_payload(&payload, None, &Device::Cpu).unwrap();
        let xs: Vec<f32> = (0..m * k).map(|_| next()).collect();
        let x = Tensor::from_vec(xs, (2, m / 2, k), &Device::Cpu).unwrap();
        let want = crate::delta_matmul(&x, &delta).unwrap();
        let got = dense_matmul(&x, &delta).unwrap();
        assert_eq!(got.dims(), want.dims());
        let diff = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // f32 on both sides; only the order of the sums differs.
        assert!(diff < 1e-4, "max |dense - kernel| = {diff}");
        // The CPU never takes the route, whatever the threshold.
        assert!(!takes_dense(&delta, 1 << 20, DType::BF16));
        // The route's weight in a half dtype: the bits of `merge` into zeros (one rounding of the f32
        // value), without the zeros.
        for dtype in [DType::F16, DType::BF16] {
            let w = dequantize_as(&delta, dtype, Fill::Uninit).unwrap();
            let zeros = Tensor::zeros((n, k), dtype, &Device::Cpu).unwrap();
            let merged = crate::merge(&zeros, &delta).unwrap();
            assert_eq!(w.dtype(), dtype);
            let bits = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(bits(&w), bits(&merged), "{dtype:?}");
        }
    }
}

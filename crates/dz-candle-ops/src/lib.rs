//! # dz-candle-ops
//!
//! candle custom ops over packed fine-tune deltas: the delta side of DeltaZip's serving system (Yao, Hu,
//! Klimovic, arXiv 2312.05215: base and delta computation decoupled, and the Selective Batched Matrix
//! Multiplication, SBMM, that serves many compressed deltas in one batch). A fine-tuned linear layer is
//! `y = x · (W + D)ᵀ = x · Wᵀ + x · Dᵀ`: the base product `x · Wᵀ` is shared by every fine-tune in a
//! batch, and each fine-tune adds its own low-bit, sparse `x · Dᵀ`, decoded on the fly from its packed
//! form.
//!
//! - [`DeviceDelta`]: one packed delta tensor resident on a device, built from dz-format parts with one
//!   copy ([`DeviceDelta::from_parts`], [`DeviceDelta::from_tensor_data`], [`DeviceDelta::from_payload`]),
//!   or one tensor-parallel rank's slice of it ([`DeviceDelta::from_shard`]).
//! - [`delta_matmul`] (`x · Dᵀ`), [`delta_matmul_add`] (`base_out + x · Dᵀ`, fused), and [`sbmm`]: the
//!   rows of one batch grouped into [`Segment`]s, each with its own delta (or none), in one call;
//!   [`SbmmPlan`] + [`sbmm_planned`]: the same, planned once for a batch layout and run many times (every
//!   layer of a decode step, consecutive steps of one batch), without the per-call planning.
//! - [`dequantize`] (the dense delta), [`merge`] (`W + D` in `W`'s dtype) and [`embedding_delta_add`]
//!   (`base_emb_out + D[ids]`; [`embedding_delta_add_unchecked`]: the same without reading CUDA ids back
//!   to check them). An `lm_head` delta is a linear delta: use [`delta_matmul_add`].
//!
//! Codecs: `quant` (2/3/4/8 bits, any group size), `sparse24` (2:4 structured, 2/3/4/8 bits), `sparse`
//! (unstructured), `sign1` (BitDelta), `dense` and `zero`, in the exact layouts of dz-format's SPEC.md
//! (sections 3-4). Inputs are f32, f16 or bf16 with any leading dims; products accumulate in f32 and the
//! output has the input's dtype.
//!
//! Every op is one private struct implementing candle's `CustomOp1`/`CustomOp2`, with a CPU and a CUDA
//! forward pass behind the same functions. The CUDA passes (the `cuda` feature) launch dz-kernels' fused
//! kernels, which read each packed byte once and decode it in registers (no dense copy of a delta is ever
//! made); [`sbmm`] is one launch per codec variant in the batch. The CPU forward passes are multithreaded
//! (rayon): few input rows stream each packed row once, decoding it chunk by chunk and dotting it with
//! every input row; more rows decode tiles and multiply them with the `gemm` crate. The hot loops are
//! compiled for the baseline and again for AVX2/FMA and AVX-512, picked at run time. Each op has a slow
//! twin in [`reference`](mod@reference) (dz-format's reference decoder and an f64 triple loop), which the
//! tests compare against under named tolerances ([`reference::DZ_TOL_F32`], [`reference::DZ_TOL_F16`],
//! [`reference::DZ_TOL_BF16`]; [`dequantize`] is bit-exact, [`reference::DZ_EXACT`]). The CUDA passes are
//! checked against the same twins over the same cases by `examples/cuda_check.rs` (on a GPU; the
//! [`poisoned`] ops fill outputs with NaN first so an element a kernel skips fails).
//!
//! Bad inputs (dtype, shape, device, non-contiguous, a `full` tensor used as a delta, segments that do not
//! cover the batch, deltas of different shapes in one `sbmm`) are refused with an [`OpError`] carried in a
//! `candle_core::Error` whose message starts with the op's name; nothing panics on them.
//!
//! # Example: a fine-tuned linear layer in another candle project
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use dz_candle_ops::{delta_matmul_add, sbmm, DeviceDelta, Segment};
//! use dz_format::codec::{Grid, Payload, Quant};
//! use dz_format::QuantParams;
//! use half::f16;
//!
//! /// A base linear layer plus one fine-tune's packed delta: `x · (W + D)ᵀ`.
//! struct DeltaLinear {
//!     base: candle_nn::Linear,
//!     delta: DeviceDelta,
//! }
//!
//! impl Module for DeltaLinear {
//!     fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
//!         let base_out = self.base.forward(x)?;
//!         delta_matmul_add(x, &base_out, &self.delta)
//!     }
//! }
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let (out_features, in_features) = (6, 64);
//! // A 4-bit delta with groups of 32 columns. A real one comes from a delta file:
//! // `DeviceDelta::from_tensor_data(&file.read(name)?, &dev)`.
//! let payload = Payload::Quant(Quant {
//!     rows: out_features,
//!     cols: in_features,
//!     grid: Grid {
//!         params: QuantParams { bits: 4, group_size: 32, symmetric: true, global_scale: 1e-3 },
//!         scales: vec![f16::ONE; out_features * 2],
//!         zeros: None,
//!     },
//!     codes: (0..out_features * in_features).map(|i| (i % 16) as u8).collect(),
//! });
//! let delta = DeviceDelta::from_payload(&payload, None, &dev)?;
//!
//! let w = Tensor::randn(0f32, 1.0, (out_features, in_features), &dev)?;
//! let layer = DeltaLinear { base: candle_nn::Linear::new(w.clone(), None), delta: delta.clone() };
//! let x = Tensor::randn(0f32, 1.0, (2, 3, in_features), &dev)?; // [batch, seq, hidden]
//! let y = layer.forward(&x)?;
//! assert_eq!(y.dims(), &[2, 3, out_features]);
//!
//! // The same as multiplying with the merged weight W + D.
//! let merged = dz_candle_ops::merge(&w, &delta)?;
//! let want = x.broadcast_matmul(&merged.t()?)?;
//! let err = (y - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
//! assert!(err < 1e-4);
//!
//! // A batch of 5 rows (flattened [M, K]) where rows 0..2 use this fine-tune, row 2 the base
//! // model alone, and rows 3..5 the fine-tune again: one sbmm call.
//! let x = Tensor::randn(0f32, 1.0, (5, in_features), &dev)?;
//! let base_out = x.matmul(&w.t()?)?.to_dtype(DType::BF16)?; // (candle's CPU matmul has no bf16)
//! let x = x.to_dtype(DType::BF16)?;
//! let segments = Segment::runs(&[Some(0), Some(0), None, Some(0), Some(0)]);
//! let y = sbmm(&x, &base_out, &[&delta], &segments)?;
//! assert_eq!(y.dtype(), DType::BF16);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod codec;
mod cpu;
// The CUDA forward passes (dz-kernels); without the `cuda` feature, a stub of the same functions that
// answers candle's `NotCompiledWithCudaSupport` (no CUDA tensor can exist then anyway).
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
mod cuda;
mod delta;
mod error;
mod ops;
mod pinned;
pub mod poisoned;
mod pool;
pub mod reference;
pub mod relayout;
pub mod trace;

pub use delta::{CheckedParts, DeviceDelta, PreparedDelta, RowSubset};
pub use error::{OpError, Result};
pub use ops::{
    delta_matmul, delta_matmul_add, dense_rows, dequantize, embedding_delta_add,
    embedding_delta_add_unchecked, merge, norm_delta_add, sbmm, sbmm_planned, sbmm_slots,
    sbmm_wide_segments, set_dense_rows, set_sbmm_wide_segments, try_sbmm_slots, SbmmPlan, Segment,
    SlotDeltas, SlotSegments, DEFAULT_DENSE_ROWS, V4_ONLY_DENSE_ROWS, V4_WIDE_DENSE_ROWS,
};
pub use pinned::{HostPins, MIN_PINNED_BYTES};
pub use pool::{set_pool_release_threshold, trim_pool};

static TENSOR_CORES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lets the CUDA `delta_matmul` / `sbmm` use the tensor-core kernels where a delta qualifies (f16 or bf16
/// inputs; quant 2/4 bits, sparse24 2/4 bits or sign1; see `dz_kernels::tc::tc_supports`). On by default;
/// off, every launch takes the generic kernels (what benchmarks and the CUDA check compare against). The
/// two paths agree within the same named tolerances. No effect on the CPU.
pub fn set_tensor_cores(enabled: bool) {
    TENSOR_CORES.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_tensor_cores`] allows the tensor-core kernels (the default).
pub fn tensor_cores() -> bool {
    TENSOR_CORES.load(std::sync::atomic::Ordering::Relaxed)
}

static V4_KERNELS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the v4 kernels on or off for this process. **Off by default** (issue #5; they passed the CUDA
/// check on an H200 in session 7): a [`DeviceDelta`] made on CUDA while they are on gets the v4 layout of
/// its codes (a CPU re-layout at upload) and, unless [`set_v4_keep_packed`], keeps only that layout on
/// the device: every `delta_matmul` and `sbmm` of such a delta takes the v4 kernels (more than 16 rows run
/// as 32-row tiles in a matmul, [`set_v4_wide_tiles`], and as 16-row pieces in an sbmm). With them on (and the tensor cores), launches of at most 16 input rows
/// per segment take the v4 kernels for deltas that have that layout ([`DeviceDelta::v4_parts`]); off,
/// the tensor-core v3 kernels. No effect on the CPU.
pub fn set_v4_kernels(enabled: bool) {
    V4_KERNELS.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_v4_kernels`] turned the v4 kernels on (off by default).
pub fn v4_kernels() -> bool {
    V4_KERNELS.load(std::sync::atomic::Ordering::Relaxed)
}

static V4_SPLIT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// How many warps the v4 kernels split each item over along K (sbmm: a segment's 16-row tile of its delta;
/// `delta_matmul`: 8 or 16 input rows' 16-row tile): 1, 2, 4 or 8; 0 (the default) picks per launch, the
/// most that keep the launch within one wave of resident warps (1 when the items alone fill it). For
/// benchmarks and checks (`kernel_bench` and `cuda_check` sweep it); every value computes the same sums
/// up to f32 summation order.
///
/// # Panics
/// If `split` is not 0, 1, 2, 4 or 8.
pub fn set_v4_split(split: u32) {
    assert!(
        matches!(split, 0 | 1 | 2 | 4 | 8),
        "v4 split must be 0 (auto), 1, 2, 4 or 8, not {split}"
    );
    V4_SPLIT.store(split, std::sync::atomic::Ordering::Relaxed);
}

/// What [`set_v4_split`] set (0: automatic).
pub fn v4_split_setting() -> u32 {
    V4_SPLIT.load(std::sync::atomic::Ordering::Relaxed)
}

static V4_WIDE_TILES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lets the CUDA `delta_matmul` / `delta_matmul_add` of more than 16 input rows take the v4 kernel's
/// 32-row tile (`dz_v4_<variant>_matmul_add_<t>_n4`; more than 32 rows as several 32-row x tiles) where
/// the v4 kernels run for the delta ([`set_v4_kernels`], f16/bf16 inputs, a v4 layout). **On by
/// default** (issue #5's rows 17-256). Off, those calls take what they took before it: the tensor-core
/// v3 kernels for a delta that kept its packed parts, 16-row v4 tiles for one that keeps only its v4
/// layout (`kernel_bench`'s `v3` and `v4-16` paths time them beside it). `sbmm` is unchanged either way
/// (its segments run as tiles of at most 16 rows). Under the default dense-route threshold, the matmul of
/// such a delta takes the route from [`V4_WIDE_DENSE_ROWS`] (256) rows instead of [`DEFAULT_DENSE_ROWS`].
/// Measured on the H200 (session 12, `bench/results/h200-s12-2026-11-30.md`): 1.6-4x faster than the
/// best earlier path at 32-128 rows, faster than cuBLAS's bf16 matmul at 32 rows of the tall shapes
/// (13824 x 5120 4b 2:4: 29.9 vs 40.2 us), 0.5-0.9x of it elsewhere. No effect on the CPU.
pub fn set_v4_wide_tiles(enabled: bool) {
    V4_WIDE_TILES.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_v4_wide_tiles`] allows the 32-row v4 matmul tile (the default).
pub fn v4_wide_tiles() -> bool {
    V4_WIDE_TILES.load(std::sync::atomic::Ordering::Relaxed)
}

static V4_WIDE_FROM: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Overrides from how many input rows of one delta the 32-row tile runs ([`set_v4_wide_tiles`]; in
/// `delta_matmul` and sbmm's wide segments): `rows` (1-17; more counts as 17, past 16 rows the tile runs
/// anyway), or 0 (the default) for
/// `dz_kernels::v4::v4_wide_from_rows`'s rule by shape (9 rows on deltas of at least 40 M weights, 17
/// elsewhere). For benchmarks and checks: `kernel_bench --wide-from`, and `cuda_check`, which runs the
/// tile at fewer rows on small shapes.
pub fn set_v4_wide_from(rows: u32) {
    V4_WIDE_FROM.store(rows, std::sync::atomic::Ordering::Relaxed);
}

/// The fewest input rows of an `n x k` delta that take the 32-row tile: the [`set_v4_wide_from`]
/// override, else the rule by shape.
pub fn v4_wide_from(n: usize, k: usize) -> u32 {
    match V4_WIDE_FROM.load(std::sync::atomic::Ordering::Relaxed) {
        0 => dz_kernels::v4::v4_wide_from_rows(n, k),
        rows => rows.min(dz_kernels::v4::V4_MAX_ROWS + 1),
    }
}

static V4_WIDE64_FROM: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// From how many input rows of one delta the 64-row tile ([`V4WideX::Shared64`]) runs where the 32-row
/// tile would, under [`V4WideX::Auto`] (in `delta_matmul` and sbmm's own-route segments: a prompt's rows
/// of one fine-tune); 0 (the default) never. Experimental: session 18's H200 checked it (correct) and
/// timed it no faster than the 32-row tile at 32-256 rows (geometric mean 0.97-0.99x at 128-256 rows);
/// `deltazip serve --v4-wide64-from N`. It takes precedence over the pair tile ([`set_v4_pair`]).
pub fn set_v4_wide64_from(rows: u32) {
    V4_WIDE64_FROM.store(rows, std::sync::atomic::Ordering::Relaxed);
}

/// Whether `m` input rows take the 64-row tile where the 32-row tile would: [`V4WideX::Shared64`]
/// forced, or [`V4WideX::Auto`] with `m` at least [`set_v4_wide64_from`]'s rows.
pub fn v4_takes_wide64(m: u32) -> bool {
    match v4_wide_x() {
        V4WideX::Shared64 => true,
        V4WideX::Auto => match V4_WIDE64_FROM.load(std::sync::atomic::Ordering::Relaxed) {
            0 => false,
            from => m >= from,
        },
        _ => false,
    }
}

static V4_PAIR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lets [`V4WideX::Auto`] run the 32-row tile's launches as the pair tile ([`V4WideX::SharedPair`]) where
/// [`v4_auto_takes_pair`] says (sessions 18-19's H200 measurements). On by default;
/// `deltazip serve --no-v4-pair` turns it off.
pub fn set_v4_pair(enabled: bool) {
    V4_PAIR.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_v4_pair`] lets the automatic choice take the pair tile.
pub fn v4_pair() -> bool {
    V4_PAIR.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether [`V4WideX::Auto`] takes the pair tile for `m` input rows of a delta of `n_stored` stored rows
/// and `k` columns (`sparse24`: a 2:4 codec) where it would take the 32-row tile, whose launch would have
/// `blocks` blocks on a GPU of `sms` SMs: from 128 rows on a delta larger than 4096 x 4096; the quant
/// codecs at 128-255 rows only where those blocks spread unevenly over the SMs ([`v4_grid_uneven`]).
///
/// Session 18's H200 sweep (`bench/results/h200-s18-2026-11-30.md`: 4 shapes x 4 codecs x 32-256 rows,
/// both forced beside the automatic choice): the pair tile took 0.81-0.95x the 32-row tile's time at 256
/// rows on every shape but 4096 x 4096 (11008 x 4096 4b 2:4: 81.9 vs 96.8 us), and at 128 rows on the
/// 2:4 codecs there (50.8 vs 54.6) and on 13824 x 5120 (65.8 vs 81.0); it was slower below 128 rows, at
/// 4096 x 4096 (30.0 vs 26.9 at 128 rows), and for the quant codecs at 128 rows of 11008 x 4096 and
/// 4096 x 11008 (71.2 vs 66.9). Session 19's sweep of 6 shapes (`h200-s19-2026-12-01.md`) found the quant
/// codecs at 128 rows at 0.67-0.87x the time on the pair tile where the 32-row tile's 160 blocks put
/// two blocks on 28 of the 132 SMs and one on the rest (5120 x 5120 4b g128: 48.8 vs 57.0 us; 5120 x
/// 13824: 91.4 vs 133.7), and within the noise (+-6%) where its grid is even (4096 x 11008: 128 blocks)
/// or nearly so (11008 x 4096: 344 blocks, 0.87 of 3 a SM).
pub fn v4_auto_takes_pair(
    sparse24: bool,
    n_stored: u32,
    k: u32,
    m: u32,
    blocks: u64,
    sms: u64,
) -> bool {
    v4_pair()
        && m >= 128
        && u64::from(n_stored) * u64::from(k) > 4096 * 4096
        && (m >= 256 || sparse24 || v4_grid_uneven(blocks, sms))
}

/// Whether a launch of `blocks` blocks leaves the busiest of `sms` SMs with much more than the mean: more
/// blocks than SMs, and the mean under 0.85 of the most any SM gets (`ceil(blocks / sms)`). 160 blocks on
/// 132 SMs: 0.61 (uneven); 432: 0.82 (uneven); 344: 0.87; 128: one each at most (even).
pub fn v4_grid_uneven(blocks: u64, sms: u64) -> bool {
    let sms = sms.max(1);
    blocks > sms && 100 * blocks < 85 * sms * blocks.div_ceil(sms)
}

/// Where the v4 32-row matmul tile ([`set_v4_wide_tiles`]) reads x from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V4WideX {
    /// Per launch: [`V4WideX::SharedSplit`] when the launch's blocks of 8 row tiles (x tiles x
    /// `ceil(tiles / 8)`) are at most half the GPU's SMs ([`v4_wide_split`]; session 14), else
    /// [`V4WideX::Shared`] for sparse 2:4 deltas, and for quant deltas when those blocks are at least a
    /// quarter of the GPU's SMs, else [`V4WideX::Global`] (few blocks would leave SMs idle; the global
    /// kernel splits K over warps instead). The default; the rules are session 12's and 14's H200 sweeps
    /// (bench/kernels/V4.md, "Session 12", "Session 14").
    Auto,
    /// Each lane's x words from global memory (L1) right before each mma, items split over warps along K
    /// as the 8- and 16-row tiles (`dz_v4_<variant>_matmul_add_<t>_n4`).
    Global,
    /// x staged in shared memory per block, 8 row tiles a block sharing it (`dz_v4_<variant>_matmul_sx_<t>_n4`).
    Shared,
    /// As [`V4WideX::Shared`], the codes too staged in shared memory by cp.async, in one ring of 6-8 K blocks
    /// with x (`dz_v4_<variant>_matmul_sxd_<t>_n4`, ~100 KB of shared memory a block): 3-6x the code bytes
    /// in flight per warp. Written in session 12 without a GPU (bench/kernels/V4.md, "a deeper code ring");
    /// measured in session 13: 1-7% slower than [`V4WideX::Shared`]. Taken only when forced.
    SharedDeep,
    /// As [`V4WideX::Shared`], K split over 4 blocks (`dz_v4_<variant>_matmul_sxk4_<t>_n4`) when the launch
    /// has at most a block for two SMs: [`v4_wide_split`] (else unsplit). Written in session 13 after Nsight
    /// Compute showed the shared kernel's time to be one block's K loop (4096 x 4096 at 32 rows: 32 blocks
    /// for 132 SMs). Session 13 reduced the blocks' partial sums in a cluster (distributed shared memory):
    /// 31.2 us at 32 rows against 23.8 unsplit, though the unsplit kernel over a quarter of K takes 10.8.
    /// Since session 14 each block writes its partial sums to a workspace (L2) and the last of an item's
    /// blocks adds them in a fixed order: 17.3 us (cuBLAS bf16 17.6), and 26.1 against 52.9 on 4096 x
    /// 11008. [`V4WideX::Auto`] takes it where it splits.
    SharedSplit,
    /// x staged in shared memory per block, 64 rows an x tile (`dz_v4_<variant>_matmul_sx_<t>_n8`, 67.6 KB of
    /// dynamic shared memory), for inputs the 32-row tile takes: each decoded A fragment feeds 8 n-tiles'
    /// mma instead of 4, halving the decode work per input row. Written in session 17 without a GPU, after
    /// serving's profile put the prompt steps' deltas (the 32-row tile at 45-220 rows, ~2x cuBLAS at
    /// 64-256 rows) at 10.6 ms of GPU time a step (bench/kernels/V4.md, "Session 17"). Taken only when
    /// forced, until a GPU has checked and timed it. Session 18 (H200): correct (1008 cases), but no faster
    /// than the 32-row tile at 32-256 rows on the 7B / 13B shapes: its whole-item blocks filled 0.65 of a
    /// wave at 128 rows of 11008 x 4096. Since session 18 it runs on the balanced schedule (every block the
    /// same work to within one chunk of K, as [`V4WideX::SharedBalanced`]).
    Shared64,
    /// The 32-row tile on the balanced schedule (`dz_v4_<variant>_matmul_sxb_<t>_n4`, session 18): the
    /// items' chunks of K spread evenly over the resident blocks, an item cut between blocks summed through
    /// a workspace as the K split's. Session 18's Nsight Compute run put the 32-row tile at 1.30 waves at
    /// 128 rows of 11008 x 4096 (its 344 blocks for 264 resident: "the partial wave may account for up to
    /// 50% of the runtime"). Correct on the H200 but no faster (0.93-0.97x `Auto`'s speed, session 18):
    /// taken only when forced.
    SharedBalanced,
    /// The pair tile on the balanced schedule (`dz_v4_<variant>_matmul_sxp_<t>_n4`, session 18): each warp
    /// takes two consecutive 16-row tiles of the delta, so every x fragment it reads from shared memory
    /// feeds two mma. Session 18's Nsight Compute run put L1 (shared memory) at 73% of its peak in the
    /// 32-row tile at 128 rows, the busiest unit, the x fragments ~3/4 of its traffic. Code rings 1 deep,
    /// 2 blocks an SM (128 registers). `Auto` takes it where [`v4_auto_takes_pair`] says.
    SharedPair,
    /// The pair tile with code rings 2 deep at 1 block an SM (`_sxp2_`, 218-255 registers). Forced only.
    SharedPairDeep,
    /// The pair tile on the 32-row tile's plain grid-stride launch (`_sxq_`: blocks of 16 tiles of one x
    /// tile, whole K rows, no workspace; session 18). Session 19 on the H200: correct, but slower than
    /// [`V4WideX::SharedPair`] on every shape but 4096 x 4096 (too few blocks). Forced only.
    SharedPairGrid,
}

/// The split (blocks an item) the 32-row tile takes for a launch of `blocks` blocks (x tiles x 8-tile
/// groups) on a GPU that keeps `resident` blocks of it at once (2 an SM): 4 (`matmul_sxk4`) when `4 x
/// blocks <= resident`, i.e. at most a block for two SMs, else 1 (no split). Session 14's H200 sweep (6
/// shapes, 4 codecs, 32-256 rows; `kernels-sxk.md`): every such launch was faster split (0.45-0.88x the
/// time), and a 2-way split of 67-132 blocks, or a 4-way one past 66, was no faster (0.96-1.17x).
pub fn v4_wide_split(blocks: u64, resident: u64) -> u32 {
    if blocks * 4 <= resident {
        4
    } else {
        1
    }
}

static V4_WIDE_X: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets where the v4 32-row matmul tile reads x from ([`V4WideX`]; [`V4WideX::Auto`] by default). For
/// benchmarks and checks (`kernel_bench`'s `dz-gx` / `dz-sx` / `dz-sxd` / `dz-sxk` / `dz-sx64` / `dz-sxb` / `dz-sxp` / `dz-sxp2` / `dz-sxq` paths, `cuda_check`); all
/// compute the same sums up to f32 summation order.
pub fn set_v4_wide_x(mode: V4WideX) {
    let v = match mode {
        V4WideX::Auto => 0,
        V4WideX::Global => 1,
        V4WideX::Shared => 2,
        V4WideX::SharedDeep => 3,
        V4WideX::SharedSplit => 4,
        V4WideX::Shared64 => 5,
        V4WideX::SharedBalanced => 6,
        V4WideX::SharedPair => 7,
        V4WideX::SharedPairDeep => 8,
        V4WideX::SharedPairGrid => 9,
    };
    V4_WIDE_X.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// What [`set_v4_wide_x`] set.
pub fn v4_wide_x() -> V4WideX {
    match V4_WIDE_X.load(std::sync::atomic::Ordering::Relaxed) {
        1 => V4WideX::Global,
        2 => V4WideX::Shared,
        3 => V4WideX::SharedDeep,
        4 => V4WideX::SharedSplit,
        5 => V4WideX::Shared64,
        6 => V4WideX::SharedBalanced,
        7 => V4WideX::SharedPair,
        8 => V4WideX::SharedPairDeep,
        9 => V4WideX::SharedPairGrid,
        _ => V4WideX::Auto,
    }
}

static V4_SBMM_SMEM_X: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets the v4 `sbmm` take its shared-memory variant where it applies: x staged once per block in shared
/// memory, a deeper ring of code loads per warp (`dz_v4_<variant>_sbmm_sx_*`). It applies to launches whose
/// items each get one warp (the automatic split chose 1, or [`set_v4_split`]`(1)`), whose deltas all
/// have the same stored rows, a multiple of 128. **Off by default and experimental:** correct on the H200
/// (session 11's CUDA check) but slower than the split-1 sbmm it replaces (32 deltas x 32 rows of 4096 x
/// 4096 4b 2:4: 88-93 vs 75-77 us; ncu: barrier stalls), kept for the record and for `kernel_bench`'s
/// `dz-sx`. Either way the results are the same sums up to f32 summation order.
pub fn set_v4_sbmm_smem_x(enabled: bool) {
    V4_SBMM_SMEM_X.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_v4_sbmm_smem_x`] turned the shared-memory sbmm on (off by default).
pub fn v4_sbmm_smem_x() -> bool {
    V4_SBMM_SMEM_X.load(std::sync::atomic::Ordering::Relaxed)
}

static V4_SBMM_RING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets the v4 decode `sbmm` take its per-warp ring variant where it applies: each warp streams its
/// item's codes, metadata and scale words through its own ring of 8 K blocks in shared memory (cp.async,
/// synchronized per warp only, no block barrier), so about 2-3x the code bytes are in flight per SM
/// (`dz_v4_<variant>_sbmm_ring_*_n1`). It applies to launches of the 8-row tile (segments of at most 8
/// rows) whose items each get one warp (the automatic split chose 1, or [`set_v4_split`]`(1)`), and takes
/// precedence over [`set_v4_sbmm_smem_x`]. **Off by default and experimental:** written without a GPU
/// (bench/kernels/V4.md, "a per-warp code ring for the sbmm"). Either way the results are the same sums
/// in the same order as the split-1 sbmm.
pub fn set_v4_sbmm_ring(enabled: bool) {
    V4_SBMM_RING.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_v4_sbmm_ring`] turned the per-warp ring sbmm on (off by default).
pub fn v4_sbmm_ring() -> bool {
    V4_SBMM_RING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Which x-direct decode sbmm tile runs ([`set_v4_sbmm_x_direct`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V4XDirect {
    /// The default decode tile: x rides in the load ring, 3 K blocks deep, 2 blocks an SM.
    Off,
    /// `dz_v4_<variant>_sbmm_xd_*_n1`: the ring holds only codes and goes 6 K blocks deep, 2 blocks an SM.
    Deep,
    /// `dz_v4_<variant>_sbmm_xo_*_n1`: a 3-deep ring of codes in 80 registers, 3 blocks an SM.
    Occupancy,
}

static V4_SBMM_X_DIRECT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Lets launches of the v4 decode `sbmm` tile (segments of at most 8 rows, any split) take an x-direct
/// variant ([`V4XDirect`]): x is loaded right before each mma, as the 32-row tile does, instead of riding
/// in the load ring, whose stages then hold only codes, metadata and the scale word (9 registers instead
/// of 25). `Deep` spends them on a 6-deep ring (twice the code bytes in flight a warp, 126 registers);
/// `Occupancy` on a third block an SM (80 registers, a 3-deep ring). Session 15's Nsight Compute on the
/// decode sbmm (32 deltas x 1 row, 4096 x 4096 4b 2:4): 25% occupancy (120 registers a thread), 39% of
/// the stall cycles on global loads, 61% of DRAM bandwidth. **Off by default: slower.** Session 16 on the
/// H200 (the same case): `Deep` 96-98 us, `Occupancy` 111-114, the default tile 77-82; ncu put `Deep` at
/// 47% of DRAM bandwidth (x's loads right before each mma expose their latency in every K block) and
/// `Occupancy` at 0.32 instructions issued a cycle. Kept for the record and checked by `cuda_check`. The
/// shared-memory variants ([`set_v4_sbmm_ring`], [`set_v4_sbmm_smem_x`]) take
/// precedence where they apply. Either way the results are the same sums in the same order.
pub fn set_v4_sbmm_x_direct(mode: V4XDirect) {
    let v = match mode {
        V4XDirect::Off => 0,
        V4XDirect::Deep => 1,
        V4XDirect::Occupancy => 2,
    };
    V4_SBMM_X_DIRECT.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// The x-direct decode sbmm [`set_v4_sbmm_x_direct`] chose ([`V4XDirect::Off`] by default).
pub fn v4_sbmm_x_direct() -> V4XDirect {
    match V4_SBMM_X_DIRECT.load(std::sync::atomic::Ordering::Relaxed) {
        1 => V4XDirect::Deep,
        2 => V4XDirect::Occupancy,
        _ => V4XDirect::Off,
    }
}

static V4_SBMM_PAIR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lets launches of the v4 decode `sbmm` tile (segments of at most 8 rows, any split) take the pair
/// variant (`dz_v4_<variant>_sbmm_p2_*_n1`): each warp takes two consecutive 16-row tiles of a segment,
/// loads each x word once for both, and runs two independent chains of loads, decodes and mma (2 blocks
/// of codes in flight each). Written in session 19 after serving found 2b 2:4 deltas as fast as 4b 2:4
/// ones (the decode sbmm bound by its instruction chains, not its bytes; session 15's Nsight Compute: 61%
/// of DRAM bandwidth, 25% occupancy, long-scoreboard stalls). Measured on the H200 in session 19
/// (`bench/results/h200-s19-2026-12-01.md`, 4096 x 4096): 32 deltas x 1 row 68.5 against 76.8 us (4b
/// 2:4; 1.38x of streaming the deltas once, against 1.55x) and 61.1 against 77.1 (2b 2:4); 64 deltas x
/// 4 rows 136.7 against 215.6; 16 deltas x 2 rows 38.0 against 44.8. **On by default**; `deltazip serve
/// --no-v4-sbmm-pair` turns it off. The experimental variants ([`set_v4_sbmm_x_direct`],
/// [`set_v4_sbmm_ring`], [`set_v4_sbmm_smem_x`]), when turned on, replace it. Either way the results are
/// the same sums in the same order.
pub fn set_v4_sbmm_pair(enabled: bool) {
    V4_SBMM_PAIR.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_v4_sbmm_pair`] lets the decode sbmm take the pair tile (on by default).
pub fn v4_sbmm_pair() -> bool {
    V4_SBMM_PAIR.load(std::sync::atomic::Ordering::Relaxed)
}

static V4_SBMM_TAIL_SPLIT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Lets a v4 `sbmm` launch at split 1 whose last wave of items would run part-empty split only that
/// wave's items along K (`dz_kernels::v4::v4_sbmm_tail`: the whole waves' items at split 1, the rest at
/// the largest of 8, 4 and 2 warps an item that fits one wave; the entries read it from their `split`
/// word). Written in session 21 after the kernel benchmark found the decode sbmm's time following its
/// rounds of whole K chains: 20 deltas x 1 row of 4096 x 4096 4b 2:4 (1.21 waves of pair items, a decode
/// step's usual count at 32 sequences over 32 fine-tunes) took 58.4 us, 16 deltas (one wave) 38.5.
/// **Off by default** until measured on a GPU; `deltazip serve --v4-sbmm-tail-split` turns it on. The
/// tail's items sum their K blocks in another order (f32 partial sums of each warp, then added), so
/// results differ from split 1 by rounding only.
pub fn set_v4_sbmm_tail_split(enabled: bool) {
    V4_SBMM_TAIL_SPLIT.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_v4_sbmm_tail_split`] turned the tail split on (off by default).
pub fn v4_sbmm_tail_split() -> bool {
    V4_SBMM_TAIL_SPLIT.load(std::sync::atomic::Ordering::Relaxed)
}

static V4_SBMM_PREFETCH: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// How far ahead (K blocks of each warp's) the pair decode sbmm ([`set_v4_sbmm_pair`]) asks L2 for its
/// codes, metadata and scale words: 0 (the default) for no prefetch, else one of
/// `dz_kernels::v4::V4_SBMM_PREFETCH` (4 or 8; the `dz_v4_<variant>_sbmm_p2f<PF>_*_n1` entries). Written in
/// session 21: Nsight Compute put the pair at 70% of DRAM bandwidth with 52% of its cycles lacking an
/// eligible warp, its loads in flight bounded by the registers of its ring; a prefetch is bounded by
/// nothing the warp holds. Measured on the H200 the same session (`bench/results/h200-s21-2026-12-01.md`
/// section 4): **slower**, 13-27% (32 deltas x 1 row of 4096 x 4096 4b 2:4: 84.2 and 86.2 against 68.5
/// us; L2 hits 8% -> 35%, DRAM throughput 70% -> 60-62%), so off by default, an experiment. Every value
/// computes the same sums in the same order.
///
/// # Panics
/// If `blocks` is neither 0 nor one of `V4_SBMM_PREFETCH`.
pub fn set_v4_sbmm_prefetch(blocks: u32) {
    assert!(
        blocks == 0 || dz_kernels::v4::V4_SBMM_PREFETCH.contains(&blocks),
        "the v4 sbmm prefetch must be 0 (off) or one of {:?} blocks, not {blocks}",
        dz_kernels::v4::V4_SBMM_PREFETCH
    );
    V4_SBMM_PREFETCH.store(blocks, std::sync::atomic::Ordering::Relaxed);
}

/// What [`set_v4_sbmm_prefetch`] set (0: no prefetch).
pub fn v4_sbmm_prefetch() -> u32 {
    V4_SBMM_PREFETCH.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the decode sbmm's launches take the pair tile: [`v4_sbmm_pair`], and no experimental decode
/// variant turned on.
#[cfg(feature = "cuda")]
pub(crate) fn v4_sbmm_pair_active() -> bool {
    v4_sbmm_pair() && !v4_sbmm_ring() && !v4_sbmm_smem_x() && v4_sbmm_x_direct() == V4XDirect::Off
}

static V4_KEEP_PACKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a CUDA [`DeviceDelta`] that gets the v4 layout also keeps the file's packed parts on the
/// device. Off by default: the v4 layout alone serves every `delta_matmul` and `sbmm`, and keeping both
/// would double the device bytes of every delta (session 7 measured it: 32 7B deltas no longer fit the
/// GPU budget and thrashed). On, the v3 and tensor-core kernels can run on the same delta: the kernel
/// benchmark and the CUDA check compare them that way. Embedding deltas always keep their packed parts
/// (the embedding op reads them); `dequantize` and `merge` of a delta that keeps only the v4 layout run
/// the v4 dequantize kernel over it (a row subset of one fails with a named error).
pub fn set_v4_keep_packed(keep: bool) {
    V4_KEEP_PACKED.store(keep, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`set_v4_keep_packed`] asked deltas to keep their packed parts besides the v4 layout.
pub fn v4_keep_packed() -> bool {
    V4_KEEP_PACKED.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::v4_wide_split;

    /// The H200: 132 SMs, 2 blocks of the tile an SM.
    #[test]
    fn the_k_split_fills_the_resident_blocks_without_a_second_wave() {
        let resident = 2 * 132;
        // 4096 x 4096 at 32 rows: 32 blocks of 8 row tiles.
        assert_eq!(v4_wide_split(32, resident), 4);
        assert_eq!(v4_wide_split(66, resident), 4);
        assert_eq!(v4_wide_split(67, resident), 1);
        // 4096 x 4096 at 128 rows.
        assert_eq!(v4_wide_split(128, resident), 1);
        assert_eq!(v4_wide_split(1, 1), 1);
    }

    /// The 64-row tile: never by default, from `set_v4_wide64_from`'s rows under `Auto`, always when
    /// forced, never under another forced mode. (Only the CUDA ops read these switches.)
    #[test]
    fn the_64_row_tile_runs_when_forced_or_from_its_rows() {
        use super::{set_v4_wide64_from, set_v4_wide_x, v4_takes_wide64, V4WideX};
        assert!(!v4_takes_wide64(256));
        set_v4_wide64_from(64);
        assert!(!v4_takes_wide64(63));
        assert!(v4_takes_wide64(64));
        set_v4_wide_x(V4WideX::Shared);
        assert!(!v4_takes_wide64(256));
        set_v4_wide_x(V4WideX::Shared64);
        set_v4_wide64_from(0);
        assert!(v4_takes_wide64(17));
        set_v4_wide_x(V4WideX::Auto);
        assert!(!v4_takes_wide64(256));
    }

    /// The pair tile under `Auto`: the shapes and rows sessions 18-19 measured it faster on, and nothing when
    /// turned off. (Only the CUDA ops read this switch.)
    #[test]
    fn the_pair_tile_takes_the_rows_and_shapes_it_won() {
        use super::{set_v4_pair, v4_auto_takes_pair, v4_grid_uneven};
        assert!(v4_grid_uneven(160, 132) && v4_grid_uneven(432, 132));
        assert!(
            !v4_grid_uneven(344, 132) && !v4_grid_uneven(128, 132) && !v4_grid_uneven(264, 132)
        );
        // The 32-row tile's blocks at m rows of n stored rows: 8 row tiles of 16 a block, x tiles of 32.
        let blocks = |n: u64, m: u64| n.div_ceil(16 * 8) * m.div_ceil(32);
        let takes = |sparse24: bool, n: u32, k: u32, m: u32| {
            v4_auto_takes_pair(sparse24, n, k, m, blocks(n.into(), m.into()), 132)
        };
        // 11008 x 4096 (gate / up of a 7B layer): 2:4 from 128 rows, quant from 256 (344 blocks at 128
        // rows on 132 SMs: nearly even).
        assert!(takes(true, 11008, 4096, 128));
        assert!(!takes(true, 11008, 4096, 127));
        assert!(!takes(false, 11008, 4096, 128));
        assert!(takes(false, 11008, 4096, 256));
        // Quant from 128 rows where the grid is uneven: 13824 x 5120 (432 blocks), 5120 x 5120 and
        // 5120 x 13824 (160); not 4096 x 11008 (128: one a SM). 4096 x 4096: never.
        assert!(takes(false, 13824, 5120, 128));
        assert!(takes(false, 5120, 5120, 128));
        assert!(takes(false, 5120, 13824, 128));
        assert!(!takes(false, 4096, 11008, 128));
        assert!(!takes(true, 4096, 4096, 255));
        assert!(!takes(true, 4096, 4096, 1024));
        set_v4_pair(false);
        assert!(!takes(true, 11008, 4096, 256));
        set_v4_pair(true);
    }
}

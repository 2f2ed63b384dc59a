//! The ops with their output buffers filled with NaN before the kernels write them.
//!
//! For kernel checks (`examples/cuda_check.rs`, compute-sanitizer runs): on CUDA, an op allocates its output
//! without initializing it, so an element a kernel forgets to write could hold anything, including the right
//! value from an earlier run. These variants fill every byte with 0xFF first (NaN in f32, f16 and bf16), so
//! such an element is NaN and fails any comparison. Otherwise they are the plain ops: same checks, same
//! kernels, same results. Where an op initializes its output itself before the kernel (`sbmm` copies
//! `base_out`; a row-subset delta's matmul starts from `base_out` or zeros), the fill comes first and is
//! overwritten. On the CPU, outputs are always built whole, and these are exactly the plain ops.

use candle_core::{DType, Device, Tensor};

use crate::ops::{self, Fill};
use crate::{DeviceDelta, SbmmPlan, Segment};

/// [`crate::delta_matmul`], output filled with NaN first.
pub fn delta_matmul(x: &Tensor, delta: &DeviceDelta) -> candle_core::Result<Tensor> {
    ops::delta_matmul_with(x, delta, Fill::Nan)
}

/// [`crate::delta_matmul_add`], output filled with NaN first.
pub fn delta_matmul_add(
    x: &Tensor,
    base_out: &Tensor,
    delta: &DeviceDelta,
) -> candle_core::Result<Tensor> {
    ops::delta_matmul_add_with(x, base_out, delta, Fill::Nan)
}

/// [`crate::sbmm`], output filled with NaN first.
pub fn sbmm(
    x: &Tensor,
    base_out: &Tensor,
    deltas: &[&DeviceDelta],
    segments: &[Segment],
) -> candle_core::Result<Tensor> {
    ops::sbmm_with(x, base_out, deltas, segments, Fill::Nan)
}

/// [`crate::SbmmPlan::new`] for [`crate::sbmm_planned`] with its output filled with NaN first (the plan
/// also takes no dense route, like this module's [`sbmm`]).
pub fn sbmm_plan(
    deltas: &[&DeviceDelta],
    segments: &[Segment],
    m: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<SbmmPlan> {
    SbmmPlan::with_fill(deltas, segments, m, dtype, device, Fill::Nan)
}

/// [`crate::dequantize`], output filled with NaN first.
pub fn dequantize(delta: &DeviceDelta) -> candle_core::Result<Tensor> {
    ops::dequantize_with(delta, Fill::Nan)
}

/// [`crate::merge`], output filled with NaN first.
pub fn merge(base_w: &Tensor, delta: &DeviceDelta) -> candle_core::Result<Tensor> {
    ops::merge_with(base_w, delta, Fill::Nan)
}

/// [`crate::embedding_delta_add`], output filled with NaN first.
pub fn embedding_delta_add(
    ids: &Tensor,
    base_emb_out: &Tensor,
    delta: &DeviceDelta,
) -> candle_core::Result<Tensor> {
    ops::embedding_delta_add_with(ids, base_emb_out, delta, Fill::Nan, true)
}

/// [`crate::embedding_delta_add_unchecked`], output filled with NaN first.
pub fn embedding_delta_add_unchecked(
    ids: &Tensor,
    base_emb_out: &Tensor,
    delta: &DeviceDelta,
) -> candle_core::Result<Tensor> {
    ops::embedding_delta_add_with(ids, base_emb_out, delta, Fill::Nan, false)
}

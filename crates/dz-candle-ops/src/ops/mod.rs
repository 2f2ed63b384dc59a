//! The ops: one private struct implementing candle's `CustomOp1/2` per op, with a kebab-case `name()`,
//! its CPU forward pass and its CUDA forward pass ([`crate::cuda`], dz-kernels' entry points; without the
//! `cuda` feature a stub that answers candle's `NotCompiledWithCudaSupport`), and a thin public wrapper that
//! checks everything a `Tensor` can tell before the op runs.
//!
//! Checks made by every wrapper, each a named [`OpError`]: dtype, shape, device (same as
//! the delta's), contiguity, and whether the delta's role fits the op. The forward passes check again what
//! only the storage can tell (its kind, its contiguity) and never index out of bounds.
//!
//! [`poisoned`](crate::poisoned) runs the same ops with [`Fill::Nan`].

mod dense;
mod dequant;
mod embedding;
mod matmul;
mod norm;
mod sbmm;
mod slots;

pub(crate) use dense::{dense_matmul, takes_dense_matmul, takes_own_route, takes_wide};
pub use dense::{
    dense_rows, sbmm_wide_segments, set_dense_rows, set_sbmm_wide_segments, DEFAULT_DENSE_ROWS,
    V4_ONLY_DENSE_ROWS, V4_WIDE_DENSE_ROWS,
};
pub use dequant::{dequantize, merge};
pub(crate) use dequant::{dequantize_with, merge_with};
pub(crate) use embedding::embedding_delta_add_with;
pub use embedding::{embedding_delta_add, embedding_delta_add_unchecked};
pub use matmul::{delta_matmul, delta_matmul_add};
pub(crate) use matmul::{delta_matmul_add_kernels, delta_matmul_add_with, delta_matmul_with};
pub use norm::norm_delta_add;
pub(crate) use sbmm::sbmm_with;
pub use sbmm::{sbmm, sbmm_planned, SbmmPlan, Segment};
pub(crate) use slots::SlotStat;
pub use slots::{sbmm_slots, try_sbmm_slots, SlotDeltas, SlotSegments};

use candle_core::{DType, Tensor};
use dz_format::Role;

use crate::delta::DeviceDelta;
use crate::error::{OpError, Result};

/// What an op's output buffer holds before its kernel writes it (the CUDA path; the CPU path always
/// builds its output from scratch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Whatever the allocator gives (the plain ops).
    Uninit,
    /// Every byte 0xFF (NaN in f32, f16 and bf16): an element a kernel fails to write shows up as NaN.
    Nan,
}

/// The input dtypes every op takes.
const FLOATS: &str = "f32, f16 or bf16";

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// `t` is f32, f16 or bf16.
fn check_float(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    if !is_float(t.dtype()) {
        return Err(OpError::Dtype {
            op,
            arg,
            got: t.dtype(),
            expected: FLOATS.into(),
        });
    }
    Ok(())
}

/// `t` has dtype `dtype` (the dtype of `like`, named in the message).
fn check_same_dtype(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    dtype: DType,
    like: &str,
) -> Result<()> {
    if t.dtype() != dtype {
        return Err(OpError::Dtype {
            op,
            arg,
            got: t.dtype(),
            expected: format!("{dtype:?} (the dtype of {like})"),
        });
    }
    Ok(())
}

/// `t` lives on the delta's device.
fn check_device(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    delta: &DeviceDelta,
) -> Result<()> {
    if !t.device().same_device(delta.device()) {
        return Err(OpError::Device {
            op,
            arg,
            got: t.device().location(),
            delta: delta.name().to_string(),
            expected: delta.device().location(),
        });
    }
    Ok(())
}

/// `t` is contiguous (row-major; an offset is fine).
fn check_contiguous(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    if !t.is_contiguous() {
        return Err(OpError::NotContiguous {
            op,
            arg,
            shape: t.dims().to_vec(),
            stride: t.stride().to_vec(),
        });
    }
    Ok(())
}

/// `t` has rank >= 1 and last dimension `k`.
fn check_last_dim(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    k: usize,
    what: &str,
) -> Result<()> {
    if t.dims().last() != Some(&k) {
        return Err(OpError::Shape {
            op,
            arg,
            got: t.dims().to_vec(),
            expected: format!("[.., {k}] ({what})"),
        });
    }
    Ok(())
}

/// `t` has exactly `dims`.
fn check_dims(
    op: &'static str,
    arg: &'static str,
    t: &Tensor,
    dims: &[usize],
    what: &str,
) -> Result<()> {
    if t.dims() != dims {
        return Err(OpError::Shape {
            op,
            arg,
            got: t.dims().to_vec(),
            expected: format!("{dims:?} ({what})"),
        });
    }
    Ok(())
}

/// A `full` tensor is the fine-tune's own value, not a delta: adding it to a base (or multiplying it as a
/// delta) would silently compute the wrong thing.
fn check_is_delta(op: &'static str, delta: &DeviceDelta) -> Result<()> {
    if delta.role() == Some(Role::Full) {
        return Err(mismatch(
            op,
            delta,
            "role `full` stores the fine-tune's own value, which replaces the base tensor; \
             it is not a delta to add",
        ));
    }
    Ok(())
}

fn mismatch(op: &'static str, delta: &DeviceDelta, reason: &str) -> OpError {
    OpError::Mismatch {
        op,
        delta: delta.name().to_string(),
        codec: delta.codec().describe(),
        reason: reason.to_string(),
    }
}

/// `dims` with its last dimension replaced by `n`.
fn with_last(dims: &[usize], n: usize) -> Vec<usize> {
    let mut out = dims.to_vec();
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    out
}

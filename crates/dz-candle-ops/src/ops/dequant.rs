//! `dequantize` (the dense delta) and `merge` (`base_w + D`, for serving a fine-tune merged).

use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::{check_contiguous, check_device, check_float, check_is_delta, Fill, OpError};
use crate::cpu::engine::{add_into, dequantize_into};
use crate::cpu::{floats, to_storage, Locked};
use crate::delta::DeviceDelta;

struct Dequantize<'a> {
    delta: &'a DeviceDelta,
    fill: Fill,
    /// The output's dtype (f32 for [`dequantize`]; the dense route asks for its input's).
    dtype: DType,
}

impl CustomOp1 for Dequantize<'_> {
    fn name(&self) -> &'static str {
        "dequantize"
    }

    /// `s` is a one-byte anchor on the delta's device (its content is not read): the op reads the delta's
    /// own tensors, as every op here does.
    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let locked = Locked::new(self.delta);
        let h = locked.host(self.name())?;
        let mut out = vec![0.0f32; h.n_total * h.k];
        dequantize_into(&h, &mut out);
        Ok((to_storage(out, self.dtype), Shape::from((h.n_total, h.k))))
    }

    fn cuda_fwd(&self, s: &CudaStorage, _l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        crate::cuda::dequantize(self.name(), self.delta, s, None, self.fill, self.dtype)
    }
}

/// The delta as a dense f32 tensor `[N_total, K]` on its device (rows not in a row subset are zero).
///
/// Bit-identical to dz-format's reference `Payload::dequantize`: the same formula, in the same order.
pub fn dequantize(delta: &DeviceDelta) -> candle_core::Result<Tensor> {
    dequantize_with(delta, Fill::Uninit)
}

pub(crate) fn dequantize_with(delta: &DeviceDelta, fill: Fill) -> candle_core::Result<Tensor> {
    dequantize_as(delta, DType::F32, fill)
}

/// The dense delta in `dtype` (f32, f16 or bf16): each value formed in f32 as [`dequantize`] forms it,
/// then rounded once, so the same bits as `merge` into zeros without the zeros (the dense route's weight).
pub(crate) fn dequantize_as(
    delta: &DeviceDelta,
    dtype: DType,
    fill: Fill,
) -> candle_core::Result<Tensor> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(OpError::Dtype {
            op: "dequantize",
            arg: "dtype",
            got: dtype,
            expected: "f32, f16 or bf16".into(),
        }
        .into());
    }
    // The op needs a tensor to run on: a one-byte anchor picks the device (no lock on the delta's own
    // storages is taken twice).
    let anchor = Tensor::zeros(1, DType::U8, delta.device())?;
    anchor.apply_op1_no_bwd(&Dequantize { delta, fill, dtype })
}

struct Merge<'a> {
    delta: &'a DeviceDelta,
    fill: Fill,
}

impl CustomOp1 for Merge<'_> {
    fn name(&self) -> &'static str {
        "merge"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (base, dtype) = floats(op, "base_w", s, l)?;
        let locked = Locked::new(self.delta);
        let h = locked.host(op)?;
        let mut out = base.into_owned();
        add_into(&h, &mut out);
        Ok((to_storage(out, dtype), Shape::from(l.dims())))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        crate::cuda::dequantize(self.name(), self.delta, s, Some(l), self.fill, DType::F32)
    }
}

/// `base_w + D` in `base_w`'s dtype (the sum is formed in f32 and rounded once): the fine-tuned weight.
///
/// `base_w` is f32, f16 or bf16, contiguous, on the delta's device, and its matrix view is the delta's
/// (`[N_total, K]`, or any shape whose last dim is `K` and whose other dims multiply to `N_total`, as
/// SPEC.md section 2 views tensors). The output has `base_w`'s shape.
pub fn merge(base_w: &Tensor, delta: &DeviceDelta) -> candle_core::Result<Tensor> {
    merge_with(base_w, delta, Fill::Uninit)
}

pub(crate) fn merge_with(
    base_w: &Tensor,
    delta: &DeviceDelta,
    fill: Fill,
) -> candle_core::Result<Tensor> {
    let op = Merge { delta, fill };
    let name = op.name();
    check_is_delta(name, delta)?;
    check_float(name, "base_w", base_w)?;
    check_device(name, "base_w", base_w, delta)?;
    check_contiguous(name, "base_w", base_w)?;
    let (n, k) = delta.dims();
    let dims = base_w.dims();
    let view = dims
        .split_last()
        .map(|(&last, rest)| (rest.iter().product::<usize>(), last));
    if view != Some((n, k)) {
        return Err(OpError::Shape {
            op: name,
            arg: "base_w",
            got: dims.to_vec(),
            expected: format!(
                "[{n}, {k}] (the delta's N_total x K, or a shape with that matrix view)"
            ),
        }
        .into());
    }
    base_w.apply_op1_no_bwd(&op)
}

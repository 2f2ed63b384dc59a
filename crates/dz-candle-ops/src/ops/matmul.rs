//! `delta-matmul` (`y = x · Dᵀ`) and `delta-matmul-add` (`y = base_out + x · Dᵀ`, fused).

use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::{
    check_contiguous, check_device, check_dims, check_float, check_is_delta, check_last_dim,
    check_same_dtype, dense_matmul, takes_dense_matmul, with_last, Fill,
};
use crate::cpu::engine::{matmul_t, scatter_add};
use crate::cpu::{floats, to_storage, Locked};
use crate::delta::DeviceDelta;
use crate::error::Result;

/// The checks both ops make on `x`.
fn check_x(op: &'static str, x: &Tensor, delta: &DeviceDelta) -> Result<()> {
    check_is_delta(op, delta)?;
    check_float(op, "x", x)?;
    check_device(op, "x", x, delta)?;
    check_contiguous(op, "x", x)?;
    check_last_dim(op, "x", x, delta.dims().1, "K, the delta's columns")
}

/// `x · Dᵀ` for `x` (f32 values of `m` rows of `K`), as `[m, N_total]` f32: stored rows through the
/// engine, rows not stored stay zero (or `base`, when given).
fn cpu_matmul(
    op: &'static str,
    delta: &DeviceDelta,
    x: &[f32],
    base: Option<Vec<f32>>,
) -> Result<Vec<f32>> {
    let (n, k) = delta.dims();
    let m = x.len() / k;
    let locked = Locked::new(delta);
    let h = locked.host(op)?;
    let yt = matmul_t(&h, x, m);
    let mut out = base.unwrap_or_else(|| vec![0.0f32; m * n]);
    scatter_add(&h, &yt, m, &mut out);
    Ok(out)
}

struct DeltaMatmul<'a> {
    delta: &'a DeviceDelta,
    fill: Fill,
}

impl CustomOp1 for DeltaMatmul<'_> {
    fn name(&self) -> &'static str {
        "delta-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (x, dtype) = floats(op, "x", s, l)?;
        let out = cpu_matmul(op, self.delta, &x, None)?;
        let shape = Shape::from(with_last(l.dims(), self.delta.dims().0));
        Ok((to_storage(out, dtype), shape))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let shape = Shape::from(with_last(l.dims(), self.delta.dims().0));
        crate::cuda::matmul(self.name(), self.delta, (s, l), None, shape, self.fill)
    }
}

/// `y = x · Dᵀ`: the delta's contribution to a linear layer's output.
///
/// `x` is `[.., K]` (any leading dims, any number of rows) in f32, f16 or bf16, contiguous, on the
/// delta's device; `y` is `[.., N_total]` in `x`'s dtype. Products are accumulated in f32 and rounded to
/// the output dtype once. Rows of `D` not in a row subset contribute zero.
///
/// An `lm_head` delta is a linear like any other: `delta_matmul(hidden, lm_head_delta)` gives the delta
/// logits (`N_total` = vocabulary size).
pub fn delta_matmul(x: &Tensor, delta: &DeviceDelta) -> candle_core::Result<Tensor> {
    delta_matmul_with(x, delta, Fill::Uninit)
}

pub(crate) fn delta_matmul_with(
    x: &Tensor,
    delta: &DeviceDelta,
    fill: Fill,
) -> candle_core::Result<Tensor> {
    let op = DeltaMatmul { delta, fill };
    check_x(op.name(), x, delta)?;
    if fill == Fill::Uninit && takes_dense_matmul(delta, rows_of(x), x.dtype()) {
        return dense_matmul(x, delta);
    }
    x.apply_op1_no_bwd(&op)
}

/// Input rows of `x` (`[.., K]`).
fn rows_of(x: &Tensor) -> usize {
    x.dims()[..x.rank().saturating_sub(1)].iter().product()
}

struct DeltaMatmulAdd<'a> {
    delta: &'a DeviceDelta,
    fill: Fill,
}

impl CustomOp2 for DeltaMatmulAdd<'_> {
    fn name(&self) -> &'static str {
        "delta-matmul-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (x, dtype) = floats(op, "x", s1, l1)?;
        let (base, _) = floats(op, "base_out", s2, l2)?;
        let out = cpu_matmul(op, self.delta, &x, Some(base.into_owned()))?;
        Ok((to_storage(out, dtype), Shape::from(l2.dims())))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let shape = Shape::from(l2.dims());
        crate::cuda::matmul(
            self.name(),
            self.delta,
            (s1, l1),
            Some((s2, l2)),
            shape,
            self.fill,
        )
    }
}

/// `y = base_out + x · Dᵀ`, fused: the fine-tune's linear output from the base layer's output.
///
/// `x` as for [`delta_matmul`]; `base_out` has `y`'s shape (`[.., N_total]`, the leading dims of `x`) and
/// `x`'s dtype, and is contiguous on the delta's device. The sum is formed in f32 and rounded once.
pub fn delta_matmul_add(
    x: &Tensor,
    base_out: &Tensor,
    delta: &DeviceDelta,
) -> candle_core::Result<Tensor> {
    delta_matmul_add_with(x, base_out, delta, Fill::Uninit)
}

/// [`delta_matmul_add`] through the delta kernels whatever the dense route's threshold (an sbmm's wide
/// segment, `takes_wide`); the caller has checked the inputs as `sbmm` does.
pub(crate) fn delta_matmul_add_kernels(
    x: &Tensor,
    base_out: &Tensor,
    delta: &DeviceDelta,
) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(
        base_out,
        &DeltaMatmulAdd {
            delta,
            fill: Fill::Uninit,
        },
    )
}

pub(crate) fn delta_matmul_add_with(
    x: &Tensor,
    base_out: &Tensor,
    delta: &DeviceDelta,
    fill: Fill,
) -> candle_core::Result<Tensor> {
    let op = DeltaMatmulAdd { delta, fill };
    let name = op.name();
    check_x(name, x, delta)?;
    check_same_dtype(name, "base_out", base_out, x.dtype(), "x")?;
    check_device(name, "base_out", base_out, delta)?;
    check_contiguous(name, "base_out", base_out)?;
    check_dims(
        name,
        "base_out",
        base_out,
        &with_last(x.dims(), delta.dims().0),
        "x's leading dims, then N_total",
    )?;
    if fill == Fill::Uninit && takes_dense_matmul(delta, rows_of(x), x.dtype()) {
        // Rounded twice (the product, then the sum) where the fused kernel rounds once.
        return base_out + dense_matmul(x, delta)?;
    }
    x.apply_op2_no_bwd(base_out, &op)
}

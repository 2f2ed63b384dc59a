//! `norm-delta-add`: an RMS norm's weight delta per batch row, added to the base norm's output in one op.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Shape, Tensor};

use super::{check_contiguous, check_dims, check_float, check_same_dtype};
use crate::cpu::{floats, to_storage};
use crate::error::OpError;

const OP: &str = "norm-delta-add";

struct NormDeltaAdd {
    /// Input rows per row of the delta table (a sequence's tokens share its fine-tune's delta).
    per: usize,
    width: usize,
    eps: f32,
}

impl CustomOp3 for NormDeltaAdd {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, dtype) = floats(OP, "x", s1, l1)?;
        let (base, _) = floats(OP, "base_out", s2, l2)?;
        let (d, _) = floats(OP, "deltas", s3, l3)?;
        Ok((
            to_storage(norm_delta_add_f32(&x, &base, &d, self), dtype),
            Shape::from(l2.dims()),
        ))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        crate::cuda::norm_delta_add(
            OP,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            (self.width, self.per, self.eps),
        )
    }
}

/// The CPU twin of the CUDA kernel (`dz_rows_norm_delta_add_<t>`): per input row the sum of squares in
/// f32, then `base + x * rsqrt(mean + eps) * d`, formed in f32.
fn norm_delta_add_f32(x: &[f32], base: &[f32], d: &[f32], op: &NormDeltaAdd) -> Vec<f32> {
    let w = op.width;
    let mut out = Vec::with_capacity(base.len());
    for (i, (xr, br)) in x.chunks_exact(w).zip(base.chunks_exact(w)).enumerate() {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / w as f32 + op.eps).sqrt();
        let dr = &d[(i / op.per) * w..(i / op.per + 1) * w];
        out.extend((xr.iter().zip(br).zip(dr)).map(|((&xv, &bv), &dv)| bv + xv * inv * dv));
    }
    out
}

/// `base_out + rms_norm(x) · d_b` per input row: the part an RMS norm's weight delta adds to the base
/// norm's output (`rms_norm(x) · (g + d) = rms_norm(x) · g + rms_norm(x) · d`), row `i` of `x` taking row
/// `i / (M / B)` of `deltas` (a batch of `B` sequences of `M / B` tokens each, one fine-tune per sequence).
/// One kernel launch on CUDA; the sum is formed in f32 and rounded once (`rms_norm(x) = x /
/// sqrt(mean(x²) + eps)`, the mean over the last dim).
///
/// `x` and `base_out` are `[.., W]` with the same shape; `deltas` is `[B, W]` with `B` dividing the rows `M`
/// (a base row takes a row of zeros); all three contiguous, of one float dtype, on one device; `eps >= 0`.
/// Each is a named [`OpError`].
pub fn norm_delta_add(
    x: &Tensor,
    base_out: &Tensor,
    deltas: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    check_float(OP, "x", x)?;
    check_same_dtype(OP, "base_out", base_out, x.dtype(), "x")?;
    check_same_dtype(OP, "deltas", deltas, x.dtype(), "x")?;
    for (arg, t) in [("base_out", base_out), ("deltas", deltas)] {
        if !t.device().same_device(x.device()) {
            return Err(OpError::Storage {
                op: OP,
                reason: format!(
                    "{arg} is on {:?} but x is on {:?}",
                    t.device().location(),
                    x.device().location()
                ),
            }
            .into());
        }
    }
    for (arg, t) in [("x", x), ("base_out", base_out), ("deltas", deltas)] {
        check_contiguous(OP, arg, t)?;
    }
    let Some(&width) = x.dims().last().filter(|&&w| w > 0) else {
        return Err(OpError::Shape {
            op: OP,
            arg: "x",
            got: x.dims().to_vec(),
            expected: "[.., W] with W > 0".into(),
        }
        .into());
    };
    check_dims(OP, "base_out", base_out, x.dims(), "x's shape")?;
    let m = x.elem_count() / width;
    let b = deltas.dims().first().copied().unwrap_or(0);
    if deltas.rank() != 2 || deltas.dims()[1] != width || b == 0 || !m.is_multiple_of(b) {
        return Err(OpError::Shape {
            op: OP,
            arg: "deltas",
            got: deltas.dims().to_vec(),
            expected: format!("[B, {width}] with B dividing x's {m} rows"),
        }
        .into());
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(OpError::Storage {
            op: OP,
            reason: format!("eps is {eps}; it must be finite and >= 0"),
        }
        .into());
    }
    x.apply_op3_no_bwd(
        base_out,
        deltas,
        &NormDeltaAdd {
            per: m / b,
            width,
            eps: eps as f32,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    /// The composite the hook ran before: an RMS norm with unit weights, times the table row, plus base.
    fn composite(x: &Tensor, base: &Tensor, d: &Tensor, eps: f64) -> Tensor {
        let (m, w) = (
            x.elem_count() / x.dim(D::Minus1).unwrap(),
            x.dim(D::Minus1).unwrap(),
        );
        let b = d.dim(0).unwrap();
        let x2 = x
            .reshape((b, m / b, w))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let ms = x2.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let unit = x2
            .broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
            .unwrap();
        let dd = d.to_dtype(DType::F32).unwrap().unsqueeze(1).unwrap();
        let y = (unit.broadcast_mul(&dd).unwrap()
            + base
                .reshape((b, m / b, w))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap())
        .unwrap();
        y.reshape(base.dims()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn the_op_is_the_composite_per_sequence() {
        let dev = Device::Cpu;
        // 3 sequences of 4 tokens, width 96; the middle sequence is a base row (zeros).
        let x = Tensor::randn(0f32, 1.0, (3, 4, 96), &dev).unwrap();
        let base = Tensor::randn(0f32, 1.0, (3, 4, 96), &dev).unwrap();
        let d = Tensor::randn(0f32, 0.05, (3, 96), &dev).unwrap();
        let zero = Tensor::zeros((1, 96), DType::F32, &dev).unwrap();
        let d = Tensor::cat(
            &[
                &d.narrow(0, 0, 1).unwrap(),
                &zero,
                &d.narrow(0, 2, 1).unwrap(),
            ],
            0,
        )
        .unwrap();
        let got = norm_delta_add(&x, &base, &d, 1e-5).unwrap();
        assert_eq!(got.dims(), &[3, 4, 96]);
        let want = composite(&x, &base, &d, 1e-5);
        // f32 on both sides: only the order of the sums differs.
        const F32_TOL: f32 = 1e-5;
        assert!(max_diff(&got, &want) < F32_TOL, "{}", max_diff(&got, &want));
        // The base row is the base's output exactly.
        assert_eq!(
            max_diff(
                &got.narrow(0, 1, 1).unwrap(),
                &base.narrow(0, 1, 1).unwrap()
            ),
            0.0
        );
        // bf16: rounded once, against the composite in f32 rounded once.
        let (xb, bb, db) = (
            x.to_dtype(DType::BF16).unwrap(),
            base.to_dtype(DType::BF16).unwrap(),
            d.to_dtype(DType::BF16).unwrap(),
        );
        let got = norm_delta_add(&xb, &bb, &db, 1e-5).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want = composite(&xb, &bb, &db, 1e-5)
            .to_dtype(DType::BF16)
            .unwrap();
        // One bf16 ulp at the outputs' magnitude (|y| < 8 here: 2^-7 * 8).
        const BF16_TOL: f32 = 0.0625;
        assert!(
            max_diff(&got, &want) <= BF16_TOL,
            "{}",
            max_diff(&got, &want)
        );
    }

    #[test]
    fn bad_inputs_are_named_errors() {
        let dev = Device::Cpu;
        let x = Tensor::ones((4, 8), DType::F32, &dev).unwrap();
        let d = Tensor::ones((2, 8), DType::F32, &dev).unwrap();
        let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
        // Three table rows do not divide four input rows.
        let d3 = Tensor::ones((3, 8), DType::F32, &dev).unwrap();
        assert!(err(norm_delta_add(&x, &x, &d3, 1e-6)).contains("B dividing x's 4 rows"));
        // Widths differ.
        let d9 = Tensor::ones((2, 9), DType::F32, &dev).unwrap();
        assert!(err(norm_delta_add(&x, &x, &d9, 1e-6)).contains("deltas"));
        // base_out of another shape, another dtype.
        let b = Tensor::ones((2, 8), DType::F32, &dev).unwrap();
        assert!(err(norm_delta_add(&x, &b, &d, 1e-6)).contains("base_out"));
        let b16 = x.to_dtype(DType::F16).unwrap();
        assert!(err(norm_delta_add(&x, &b16, &d, 1e-6)).contains("wrong dtype"));
        // Not contiguous.
        let xt = Tensor::ones((8, 4), DType::F32, &dev).unwrap().t().unwrap();
        assert!(err(norm_delta_add(&xt, &x, &d, 1e-6)).contains("contiguous"));
        // eps.
        assert!(err(norm_delta_add(&x, &x, &d, f64::NAN)).contains("eps"));
        assert!(norm_delta_add(&x, &x, &d, 1e-6).is_ok());
    }
}

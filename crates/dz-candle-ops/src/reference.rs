//! The slow twins of every op, and the tolerances that fast paths are held to.
//!
//! Each function here computes what the op of the same name computes, plainly: it copies the packed
//! parts to the host, decodes them with dz-format's reference `Payload::unpack` + `Payload::dequantize`
//! (the SPEC formulas, one value at a time), and multiplies with a naive triple loop in f64. It shares no
//! code with the fast paths (CPU or CUDA) beyond dz-format, works on any device (results come back to the
//! input's device) and is meant for tests and debugging, not for speed.
//!
//! [`compare`] checks a fast result against a twin's with a named [`Tolerance`] and reports every
//! failure with its index, value, expected value and tolerance.

use std::cmp::Ordering;

use candle_core::{bail, DType, Result, Tensor};
use dz_format::codec::{scatter_rows, Payload};

use crate::{DeviceDelta, Segment};

/// The delta as dense f32 `[N_total, K]`, row-major, on the host.
pub fn dense(delta: &DeviceDelta) -> Result<Vec<f32>> {
    let parts = delta
        .parts()
        .iter()
        .map(|t| t.to_vec1::<u8>())
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let (n_total, k) = delta.dims();
    let payload = Payload::unpack(delta.name(), delta.codec(), delta.stored_rows(), k, &refs)
        .map_err(candle_core::Error::wrap)?;
    let stored = payload.dequantize();
    Ok(match delta.row_index() {
        None => stored,
        Some(idx) => scatter_rows(&idx.to_vec1::<u32>()?, &stored, k, n_total),
    })
}

/// Twin of [`crate::dequantize`].
pub fn dequantize(delta: &DeviceDelta) -> Result<Tensor> {
    Tensor::from_vec(dense(delta)?, delta.dims(), delta.device())
}

/// A float tensor's values as f64 (exact for f32, f16, bf16).
fn values(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// f64 values as a tensor of `dtype` and `dims` on `like`'s device (one rounding, to nearest even).
fn tensor(v: Vec<f64>, dims: &[usize], dtype: DType, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, dims, like.device())?.to_dtype(dtype)
}

/// `out[i][r] += sum_k x[i][k] * d[r][k]` over `m` rows, in f64.
fn naive(x: &[f64], m: usize, k: usize, d: &[f32], n: usize, out: &mut [f64]) {
    for i in 0..m {
        for r in 0..n {
            let mut s = 0.0f64;
            for c in 0..k {
                s += x[i * k + c] * f64::from(d[r * k + c]);
            }
            out[i * n + r] += s;
        }
    }
}

fn x_rows(x: &Tensor, k: usize) -> Result<usize> {
    if x.dims().last() != Some(&k) {
        bail!("reference: x is {:?}, expected [.., {k}]", x.dims())
    }
    Ok(x.elem_count() / k)
}

/// Twin of [`crate::delta_matmul`].
pub fn delta_matmul(x: &Tensor, delta: &DeviceDelta) -> Result<Tensor> {
    let (n, k) = delta.dims();
    let m = x_rows(x, k)?;
    let mut out = vec![0.0f64; m * n];
    naive(&values(x)?, m, k, &dense(delta)?, n, &mut out);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    tensor(out, &dims, x.dtype(), x)
}

/// Twin of [`crate::delta_matmul_add`].
pub fn delta_matmul_add(x: &Tensor, base_out: &Tensor, delta: &DeviceDelta) -> Result<Tensor> {
    let (n, k) = delta.dims();
    let m = x_rows(x, k)?;
    let mut out = values(base_out)?;
    if out.len() != m * n {
        bail!("reference: base_out is {:?}", base_out.dims())
    }
    naive(&values(x)?, m, k, &dense(delta)?, n, &mut out);
    tensor(out, base_out.dims(), x.dtype(), x)
}

/// Twin of [`crate::sbmm`].
pub fn sbmm(
    x: &Tensor,
    base_out: &Tensor,
    deltas: &[&DeviceDelta],
    segments: &[Segment],
) -> Result<Tensor> {
    let k = *x.dims().last().unwrap_or(&0);
    let n = *base_out.dims().last().unwrap_or(&0);
    let xs = values(x)?;
    let mut out = values(base_out)?;
    let dense = deltas
        .iter()
        .map(|d| dense(d))
        .collect::<Result<Vec<_>>>()?;
    let mut next = 0;
    for s in segments {
        if s.start != next {
            bail!("reference: segments do not cover the rows in order")
        }
        next = s.start + s.len;
        if let Some(d) = s.delta {
            let Some(dd) = dense.get(d) else {
                bail!("reference: no delta {d}")
            };
            naive(
                &xs[s.start * k..next * k],
                s.len,
                k,
                dd,
                n,
                &mut out[s.start * n..next * n],
            );
        }
    }
    tensor(out, base_out.dims(), x.dtype(), x)
}

/// Twin of [`crate::merge`].
pub fn merge(base_w: &Tensor, delta: &DeviceDelta) -> Result<Tensor> {
    let mut out = values(base_w)?;
    let d = dense(delta)?;
    if out.len() != d.len() {
        bail!("reference: base_w is {:?}", base_w.dims())
    }
    for (o, v) in out.iter_mut().zip(d) {
        *o += f64::from(v);
    }
    tensor(out, base_w.dims(), base_w.dtype(), base_w)
}

/// Twin of [`crate::embedding_delta_add`].
pub fn embedding_delta_add(
    ids: &Tensor,
    base_emb_out: &Tensor,
    delta: &DeviceDelta,
) -> Result<Tensor> {
    let (n, k) = delta.dims();
    let ids = ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    let mut out = values(base_emb_out)?;
    let d = dense(delta)?;
    for (t, &id) in ids.iter().enumerate() {
        if id < 0 || id as usize >= n {
            bail!("reference: id {id} out of range")
        }
        let row = &d[id as usize * k..(id as usize + 1) * k];
        for (o, &v) in out[t * k..(t + 1) * k].iter_mut().zip(row) {
            *o += f64::from(v);
        }
    }
    tensor(out, base_emb_out.dims(), base_emb_out.dtype(), base_emb_out)
}

/// How far a fast result may be from its twin's, per output element:
///
/// `|got - expected| <= rel * magnitude + ulp * max(|got|, |expected|) + abs`
///
/// where `magnitude` is the sum of the absolute values of the terms that make the element (for a matmul,
/// `|base| + sum_k |x_k| |d_k|`): the accumulation error of any summation order is bounded by it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// The name the failure message quotes.
    pub name: &'static str,
    /// Relative to the magnitude: the accumulation error of f32 sums (fast) against f64 sums (twin).
    pub rel: f64,
    /// One unit in the last place of the output dtype, relative: the fast path and the twin each round
    /// their sum to the output dtype once, and sums that differ slightly may round to neighbours.
    pub ulp: f64,
    /// Absolute floor: the spacing of the output dtype's subnormals.
    pub abs: f64,
}

/// f32 output. `1e-5` relative to the magnitude: f32 sums of `K` terms (the fast paths' chunked dot
/// products and GEMM blocks, against the twin's f64 sum) err by about `sqrt(K) * 2^-24 * magnitude`
/// (`4e-6 * magnitude` at `K = 4096`), and by at most `K * 2^-24 * magnitude` in a worst case that random
/// inputs do not reach. Tight enough that a decoder off by a factor `1 + 1e-4` on half of its values
/// fails it.
pub const DZ_TOL_F32: Tolerance = Tolerance {
    name: "DZ_TOL_F32",
    rel: 1e-5,
    ulp: 0.0,
    abs: 0.0,
};

/// f16 output: [`DZ_TOL_F32`]'s accumulation term, plus one f16 ulp (`2^-10` relative, 11-bit
/// significand), plus the f16 subnormal spacing `2^-24`.
pub const DZ_TOL_F16: Tolerance = Tolerance {
    name: "DZ_TOL_F16",
    rel: 1e-5,
    ulp: 1.0 / 1024.0,
    abs: 5.960_464_477_539_063e-8,
};

/// bf16 output: [`DZ_TOL_F32`]'s accumulation term, plus one bf16 ulp (`2^-7` relative, 8-bit
/// significand). bf16 has f32's range, so no practical absolute floor.
pub const DZ_TOL_BF16: Tolerance = Tolerance {
    name: "DZ_TOL_BF16",
    rel: 1e-5,
    ulp: 1.0 / 128.0,
    abs: 1e-38,
};

/// Bit-exact: for results whose math is the same sequence of f32 operations in both (dequantize).
pub const DZ_EXACT: Tolerance = Tolerance {
    name: "DZ_EXACT",
    rel: 0.0,
    ulp: 0.0,
    abs: 0.0,
};

impl Tolerance {
    /// The tolerance for outputs of `dtype` (f32, f16, bf16; any other gets the f32 one).
    pub fn for_dtype(dtype: DType) -> Tolerance {
        match dtype {
            DType::F16 => DZ_TOL_F16,
            DType::BF16 => DZ_TOL_BF16,
            _ => DZ_TOL_F32,
        }
    }

    /// The bound for one element.
    pub fn bound(&self, got: f64, expected: f64, magnitude: f64) -> f64 {
        self.rel * magnitude + self.ulp * got.abs().max(expected.abs()) + self.abs
    }
}

/// Compares `got` with `expected` (same shape) element by element under `tol`, with per-element
/// magnitudes (same shape; `None` = `|expected|`).
///
/// Returns the number of elements compared, or a message naming `what`, the number of failures and the
/// first ten: multi-index, value, expected, difference and tolerance. NaNs never pass.
pub fn compare(
    what: &str,
    got: &Tensor,
    expected: &Tensor,
    magnitude: Option<&Tensor>,
    tol: &Tolerance,
) -> std::result::Result<usize, String> {
    let fail = |e: candle_core::Error| format!("{what}: {e}");
    if got.dims() != expected.dims() {
        return Err(format!(
            "{what}: shape {:?}, expected {:?}",
            got.dims(),
            expected.dims()
        ));
    }
    if got.dtype() != expected.dtype() {
        return Err(format!(
            "{what}: dtype {:?}, expected {:?}",
            got.dtype(),
            expected.dtype()
        ));
    }
    let g = values(got).map_err(fail)?;
    let e = values(expected).map_err(fail)?;
    let mag = match magnitude {
        Some(m) => values(m).map_err(fail)?,
        None => e.iter().map(|v| v.abs()).collect(),
    };
    if mag.len() != e.len() {
        return Err(format!("{what}: magnitude has {} elements", mag.len()));
    }
    let dims = got.dims();
    let mut failures = Vec::new();
    let mut count = 0usize;
    for (i, ((&a, &b), &m)) in g.iter().zip(&e).zip(&mag).enumerate() {
        let bound = tol.bound(a, b, m);
        let diff = (a - b).abs();
        // A NaN compares as nothing, so it fails.
        let within = matches!(
            diff.partial_cmp(&bound),
            Some(Ordering::Less | Ordering::Equal)
        );
        if !within {
            count += 1;
            if failures.len() < 10 {
                failures.push(format!(
                    "  at {:?}: value {a:e}, expected {b:e}, |diff| {diff:e} > tolerance {bound:e} \
                     ({}: rel {:e} x magnitude {m:e} + ulp {:e} + abs {:e})",
                    unravel(i, dims),
                    tol.name,
                    tol.rel,
                    tol.ulp,
                    tol.abs
                ));
            }
        }
    }
    if count > 0 {
        return Err(format!(
            "{what}: {count} of {} elements out of tolerance {}:\n{}",
            g.len(),
            tol.name,
            failures.join("\n")
        ));
    }
    Ok(g.len())
}

/// The multi-index of flat index `i` in a row-major tensor of `dims`.
fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for (slot, &d) in idx.iter_mut().zip(dims).rev() {
        if d > 0 {
            *slot = i % d;
            i /= d;
        }
    }
    idx
}

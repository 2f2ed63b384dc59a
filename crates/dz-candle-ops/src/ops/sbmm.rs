//! `sbmm`: selective batched matmul (DeltaZip's SBMM): the rows of one batch belong to different
//! fine-tunes, and each contiguous run of rows adds its own delta's `x · Dᵀ` to the shared base output.

use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor};

use super::{
    check_contiguous, check_device, check_dims, check_float, check_is_delta, check_last_dim,
    check_same_dtype, dense_matmul, takes_dense, with_last, Fill,
};
use crate::cpu::engine::{matmul_t, scatter_add};
use crate::cpu::{floats, to_storage, Locked};
use crate::delta::DeviceDelta;
use crate::error::{OpError, Result};

/// A contiguous run of rows of an [`sbmm`] batch that shares one delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First row (of `x` flattened to `[M, K]`).
    pub start: usize,
    /// Rows in the run (0 allowed).
    pub len: usize,
    /// Index into the `deltas` of the call, or `None`: the base model alone (the output rows are the
    /// `base_out` rows).
    pub delta: Option<usize>,
}

impl Segment {
    /// The segments of a batch whose row `i` uses `row_deltas[i]`: one segment per run of equal entries,
    /// in order, covering every row.
    pub fn runs(row_deltas: &[Option<usize>]) -> Vec<Segment> {
        let mut out: Vec<Segment> = Vec::new();
        for (i, &d) in row_deltas.iter().enumerate() {
            match out.last_mut() {
                Some(s) if s.delta == d => s.len += 1,
                _ => out.push(Segment {
                    start: i,
                    len: 1,
                    delta: d,
                }),
            }
        }
        out
    }
}

/// Segments cover `0..m` exactly, in order, and name existing deltas.
fn check_segments(op: &'static str, segments: &[Segment], m: usize, n_deltas: usize) -> Result<()> {
    let bad = |reason: String| OpError::Segments { op, reason };
    let mut next = 0usize;
    for (i, s) in segments.iter().enumerate() {
        if s.start != next {
            return Err(bad(format!(
                "segment {i} starts at row {} but the previous one ends at row {next} \
                 (segments must cover the rows in order, without gaps or overlaps)",
                s.start
            )));
        }
        next = s
            .start
            .checked_add(s.len)
            .filter(|&e| e <= m)
            .ok_or_else(|| {
                bad(format!(
                    "segment {i} (rows {}..{}+{}) runs past the {m} rows of x",
                    s.start, s.start, s.len
                ))
            })?;
        if let Some(d) = s.delta {
            if d >= n_deltas {
                return Err(bad(format!(
                    "segment {i} uses delta {d}, but only {n_deltas} deltas were given"
                )));
            }
        }
    }
    if next != m {
        return Err(bad(format!(
            "the segments cover rows 0..{next}, x has {m} rows"
        )));
    }
    Ok(())
}

struct Sbmm<'a> {
    deltas: &'a [&'a DeviceDelta],
    segments: &'a [Segment],
    k: usize,
    n: usize,
    fill: Fill,
}

impl CustomOp2 for Sbmm<'_> {
    fn name(&self) -> &'static str {
        "sbmm"
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
        let mut out = base.into_owned();
        let (k, n) = (self.k, self.n);
        for s in self.segments {
            let (Some(d), true) = (s.delta, s.len > 0) else {
                continue;
            };
            // One delta's storages are locked at a time (a delta listed twice is never locked twice).
            let locked = Locked::new(self.deltas[d]);
            let h = locked.host(op)?;
            let xs = &x[s.start * k..(s.start + s.len) * k];
            let yt = matmul_t(&h, xs, s.len);
            scatter_add(&h, &yt, s.len, &mut out[s.start * n..(s.start + s.len) * n]);
        }
        Ok((to_storage(out, dtype), Shape::from(l2.dims())))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        crate::cuda::sbmm(
            self.name(),
            self.deltas,
            self.segments,
            (self.k, self.n),
            (s1, l1),
            (s2, l2),
            self.fill,
        )
    }
}

/// Selective batched matmul: `y[rows of s] = base_out[rows of s] + x[rows of s] · D_sᵀ` for each
/// segment `s` (`D_s = deltas[s.delta]`), and `y[rows] = base_out[rows]` for base-only segments.
///
/// `x` is `[.., K]` and `base_out` is `[.., N_total]` with the same leading dims (`M` rows once
/// flattened), both contiguous, of one dtype (f32, f16 or bf16), on the deltas' device. `segments` must
/// cover rows `0..M` exactly, in order (empty segments are fine). Every delta has the same `(N_total, K)`;
/// codecs may differ. The output has `base_out`'s shape and dtype.
///
/// One call serves any number of deltas (64 and more). On CUDA it is one kernel launch per codec variant
/// (codec and bits) present among the deltas, each covering every segment of every delta of that variant,
/// after one copy of `base_out` into the output.
pub fn sbmm(
    x: &Tensor,
    base_out: &Tensor,
    deltas: &[&DeviceDelta],
    segments: &[Segment],
) -> candle_core::Result<Tensor> {
    sbmm_with(x, base_out, deltas, segments, Fill::Uninit)
}

pub(crate) fn sbmm_with(
    x: &Tensor,
    base_out: &Tensor,
    deltas: &[&DeviceDelta],
    segments: &[Segment],
    fill: Fill,
) -> candle_core::Result<Tensor> {
    const OP: &str = "sbmm";
    check_float(OP, "x", x)?;
    check_same_dtype(OP, "base_out", base_out, x.dtype(), "x")?;
    check_contiguous(OP, "x", x)?;
    check_contiguous(OP, "base_out", base_out)?;
    if x.rank() == 0 {
        return Err(OpError::Shape {
            op: OP,
            arg: "x",
            got: vec![],
            expected: "[.., K]".into(),
        }
        .into());
    }
    if let Some((first, _)) = deltas.split_first() {
        for (i, d) in deltas.iter().enumerate() {
            check_is_delta(OP, d)?;
            check_device(OP, "x", x, d)?;
            check_device(OP, "base_out", base_out, d)?;
            if d.dims() != first.dims() {
                return Err(OpError::DeltaShapes {
                    op: OP,
                    index: i,
                    name: d.name().to_string(),
                    got: d.dims(),
                    first: first.name().to_string(),
                    expected: first.dims(),
                }
                .into());
            }
        }
    } else if !x.device().same_device(base_out.device()) {
        return Err(OpError::Device {
            op: OP,
            arg: "base_out",
            got: base_out.device().location(),
            delta: "(none)".into(),
            expected: x.device().location(),
        }
        .into());
    }
    let k = *x.dims().last().unwrap_or(&0);
    let n = match deltas.first() {
        Some(d) => {
            check_last_dim(OP, "x", x, d.dims().1, "K, the deltas' columns")?;
            d.dims().0
        }
        None => *base_out.dims().last().unwrap_or(&0),
    };
    check_dims(
        OP,
        "base_out",
        base_out,
        &with_last(x.dims(), n),
        "x's leading dims, then N_total",
    )?;
    let m: usize = x.dims()[..x.rank() - 1].iter().product();
    check_segments(OP, segments, m, deltas.len())?;
    // Segments with many rows (prefill) take the dense route: the kernels see them as base-only rows,
    // then each adds its product.
    let dense = |s: &Segment| {
        s.delta
            .is_some_and(|d| fill == Fill::Uninit && takes_dense(deltas[d], s.len, x.dtype()))
    };
    if !segments.iter().any(dense) {
        return x.apply_op2_no_bwd(
            base_out,
            &Sbmm {
                deltas,
                segments,
                k,
                n,
                fill,
            },
        );
    }
    let kernel_segments: Vec<Segment> = segments
        .iter()
        .map(|s| Segment {
            delta: if dense(s) { None } else { s.delta },
            ..*s
        })
        .collect();
    let mut y = x
        .apply_op2_no_bwd(
            base_out,
            &Sbmm {
                deltas,
                segments: &kernel_segments,
                k,
                n,
                fill,
            },
        )?
        .reshape((m, n))?;
    let x2 = x.reshape((m, k))?;
    for s in segments.iter().filter(|s| dense(s)) {
        let d = deltas[s.delta.unwrap_or_default()];
        let part =
            (y.narrow(0, s.start, s.len)? + dense_matmul(&x2.narrow(0, s.start, s.len)?, d)?)?;
        y = y.slice_assign(&[s.start..s.start + s.len, 0..n], &part)?;
    }
    y.reshape(base_out.dims())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs() {
        let s = Segment::runs(&[Some(1), Some(1), None, Some(0), Some(1)]);
        let want = [
            (0, 2, Some(1)),
            (2, 1, None),
            (3, 1, Some(0)),
            (4, 1, Some(1)),
        ]
        .map(|(start, len, delta)| Segment { start, len, delta });
        assert_eq!(s, want);
        assert!(Segment::runs(&[]).is_empty());
    }

    #[test]
    fn segment_checks() {
        let seg = |start, len, delta| Segment { start, len, delta };
        assert!(check_segments(
            "t",
            &[seg(0, 2, None), seg(2, 0, Some(0)), seg(2, 1, Some(0))],
            3,
            1
        )
        .is_ok());
        assert!(check_segments("t", &[], 0, 0).is_ok());
        for bad in [
            vec![seg(0, 2, None)],                  // short
            vec![seg(0, 2, None), seg(1, 2, None)], // overlap
            vec![seg(0, 1, None), seg(2, 1, None)], // gap
            vec![seg(0, 4, None)],                  // past the end
            vec![seg(0, 3, Some(1))],               // missing delta
            vec![seg(1, 2, None)],                  // does not start at 0
            vec![seg(0, usize::MAX, None)],         // overflow
        ] {
            assert!(check_segments("t", &bad, 3, 1).is_err(), "{bad:?}");
        }
    }
}

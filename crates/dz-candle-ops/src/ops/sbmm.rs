//! `sbmm`: selective batched matmul (DeltaZip's SBMM): the rows of one batch belong to different
//! fine-tunes, and each contiguous run of rows adds its own delta's `x · Dᵀ` to the shared base output.

use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};

use super::{
    check_contiguous, check_device, check_dims, check_float, check_is_delta, check_last_dim,
    check_same_dtype, delta_matmul_add_kernels, dense_matmul, is_float, takes_own_route,
    takes_wide, with_last, Fill,
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

/// The deltas of one sbmm: the caller's (the plain op) or an [`SbmmPlan`]'s own clones.
#[derive(Clone, Copy)]
enum Deltas<'a> {
    Borrowed(&'a [&'a DeviceDelta]),
    Owned(&'a [DeviceDelta]),
}

impl<'a> Deltas<'a> {
    fn get(self, i: usize) -> &'a DeviceDelta {
        match self {
            Deltas::Borrowed(d) => d[i],
            Deltas::Owned(d) => &d[i],
        }
    }
}

struct Sbmm<'a> {
    deltas: Deltas<'a>,
    /// The segments the kernels compute (those of the dense route as base-only).
    segments: &'a [Segment],
    k: usize,
    n: usize,
    fill: Fill,
    /// The CUDA launches, when planned for a CUDA device.
    launches: Option<&'a crate::cuda::SbmmLaunches>,
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
            let locked = Locked::new(self.deltas.get(d));
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
        let Some(launches) = self.launches else {
            return Err(OpError::Storage {
                op: self.name(),
                reason: "x is on a CUDA device but the sbmm was not planned for one".into(),
            }
            .into());
        };
        crate::cuda::sbmm_run(self.name(), launches, (s1, l1), (s2, l2), self.fill)
    }
}

/// What one batch layout (deltas, segments, rows, dtype, device) needs before any input is seen: the
/// segments of the dense route and, on CUDA, the uploaded segment and descriptor table with the launches
/// over it. The plain [`sbmm`] builds one per call; an [`SbmmPlan`] keeps one.
struct Prepared {
    m: usize,
    /// The deltas' `(K, N_total)`; `None` without deltas (then any `K` and `N_total`).
    kn: Option<(usize, usize)>,
    dtype: DType,
    device: Device,
    fill: Fill,
    /// The segments the kernels see when some take the dense route (those as base-only), else `None`:
    /// the segments as given.
    kernel_segments: Option<Vec<Segment>>,
    /// Every segment with rows takes its own route or is base-only (a prompt step of one fine-tune):
    /// nothing is launched over the segments, and [`Prepared::run`] assembles the output from the
    /// routes' products and `base_out`'s rows, without the shared op's copy of `base_out`.
    own_only: bool,
    /// On a CUDA device: the launches (none when `own_only`).
    launches: Option<crate::cuda::SbmmLaunches>,
}

impl Prepared {
    /// Plans `segments` over `deltas` (checked by the caller: segments cover `0..m`, deltas of one shape
    /// `kn` on `device`) for inputs of `dtype`.
    fn new(
        deltas: &[&DeviceDelta],
        segments: &[Segment],
        m: usize,
        kn: Option<(usize, usize)>,
        dtype: DType,
        device: &Device,
        fill: Fill,
    ) -> candle_core::Result<Self> {
        // Segments with many rows (prefill) take the 32-row tile (`takes_wide`) or the dense route: the
        // kernels see them as base-only rows, then each adds its product.
        let dense = |s: &Segment| {
            s.delta
                .is_some_and(|d| fill == Fill::Uninit && takes_own_route(deltas[d], s.len, dtype))
        };
        let kernel_segments = segments.iter().any(dense).then(|| {
            segments
                .iter()
                .map(|s| Segment {
                    delta: if dense(s) { None } else { s.delta },
                    ..*s
                })
                .collect::<Vec<_>>()
        });
        let own_only = kernel_segments
            .as_ref()
            .is_some_and(|ks| ks.iter().all(|s| s.delta.is_none() || s.len == 0));
        let launches = match device {
            Device::Cuda(_) if own_only => None,
            Device::Cuda(dev) => Some(crate::cuda::sbmm_prepare(
                OP,
                deltas,
                kernel_segments.as_deref().unwrap_or(segments),
                m,
                // Without deltas nothing launches, and K and N_total are not read.
                kn.unwrap_or((0, 0)),
                dtype,
                dev,
            )?),
            _ => None,
        };
        Ok(Prepared {
            m,
            kn,
            dtype,
            device: device.clone(),
            fill,
            kernel_segments,
            own_only,
            launches,
        })
    }

    /// Runs the planned sbmm on inputs checked against the plan (`x` `[.., K]` with `m` rows, `base_out`
    /// `[.., N_total]` with the same leading dims, contiguous, of the plan's dtype, on its device).
    fn run(
        &self,
        deltas: Deltas<'_>,
        segments: &[Segment],
        x: &Tensor,
        base_out: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let k = *x.dims().last().unwrap_or(&0);
        let n = *base_out.dims().last().unwrap_or(&0);
        if self.own_only {
            return self.run_own_routes(deltas, segments, x, base_out, (k, n));
        }
        let y = x.apply_op2_no_bwd(
            base_out,
            &Sbmm {
                deltas,
                segments: self.kernel_segments.as_deref().unwrap_or(segments),
                k,
                n,
                fill: self.fill,
                launches: self.launches.as_ref(),
            },
        )?;
        let Some(kernel_segments) = &self.kernel_segments else {
            return Ok(y);
        };
        let m = self.m;
        // `y` is this call's own buffer: each routed segment's rows are written into it in place (a
        // `slice_assign` would copy all of `y` once per segment).
        let y = y.reshape((m, n))?;
        let x2 = x.reshape((m, k))?;
        for (s, _) in segments
            .iter()
            .zip(kernel_segments)
            .filter(|(s, ks)| s.delta != ks.delta)
        {
            let d = deltas.get(s.delta.unwrap_or_default());
            let (xs, ys) = (x2.narrow(0, s.start, s.len)?, y.narrow(0, s.start, s.len)?);
            y.slice_set(&own_route(&xs, &ys, d, self.dtype)?, 0, s.start)?;
        }
        y.reshape(base_out.dims())
    }

    /// [`Prepared::run`] when every segment takes its own route or is base-only (`own_only`): each
    /// routed segment's product over its rows of `base_out`, base-only rows as they are, concatenated
    /// (one segment: its product is the output). The same values as the shared op's copy of `base_out`
    /// followed by each route's product written over its rows.
    fn run_own_routes(
        &self,
        deltas: Deltas<'_>,
        segments: &[Segment],
        x: &Tensor,
        base_out: &Tensor,
        (k, n): (usize, usize),
    ) -> candle_core::Result<Tensor> {
        let m = self.m;
        let (x2, b2) = (x.reshape((m, k))?, base_out.reshape((m, n))?);
        let y = assemble_rows(segments, &b2, |s, i, bs| {
            own_route(
                &x2.narrow(0, s.start, s.len)?,
                bs,
                deltas.get(i),
                self.dtype,
            )
        })?;
        y.reshape(base_out.dims())
    }
}

/// `base` (`[m, N]`) with the rows of each segment that names a delta `i` replaced by
/// `product(segment, i, its rows of base)`: the products and the base-only rows concatenated in the
/// segments' order (empty segments skipped); one non-empty segment's product is the output as it is.
fn assemble_rows(
    segments: &[Segment],
    base: &Tensor,
    mut product: impl FnMut(&Segment, usize, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let mut pieces = Vec::new();
    for s in segments.iter().filter(|s| s.len > 0) {
        let bs = base.narrow(0, s.start, s.len)?;
        pieces.push(match s.delta {
            Some(i) => product(s, i, &bs)?,
            None => bs,
        });
    }
    match pieces.len() {
        0 => base.copy(),
        1 => Ok(pieces.remove(0)),
        _ => Tensor::cat(&pieces, 0),
    }
}

/// `base + xs · Dᵀ` for one segment that leaves the shared launch ([`takes_own_route`]): the 32-row tile
/// ([`takes_wide`]) or the dense route. `xs` and `base` are the segment's rows, contiguous.
fn own_route(
    xs: &Tensor,
    base: &Tensor,
    d: &DeviceDelta,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let _s = crate::trace::span("sbmm own route: one segment's product");
    if takes_wide(d, xs.dim(0)?, dtype) {
        delta_matmul_add_kernels(xs, base, d)
    } else {
        base + dense_matmul(xs, d)?
    }
}

const OP: &str = "sbmm";

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
///
/// Each call plans the batch first (on CUDA: describes every delta, groups the segments, picks the
/// kernels and uploads a segment and descriptor table); a caller that runs the same deltas over the same
/// segments again (every layer of a decode step, and consecutive steps of one batch) can plan once with
/// [`SbmmPlan::new`] and call [`sbmm_planned`]: the same results, bit for bit.
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
            check_shape_of(i, d, first)?;
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
    Prepared::new(
        deltas,
        segments,
        m,
        Some((k, n)),
        x.dtype(),
        x.device(),
        fill,
    )?
    .run(Deltas::Borrowed(deltas), segments, x, base_out)
}

/// Delta `i` has the shape of the first one.
fn check_shape_of(i: usize, d: &DeviceDelta, first: &DeviceDelta) -> Result<()> {
    if d.dims() != first.dims() {
        return Err(OpError::DeltaShapes {
            op: OP,
            index: i,
            name: d.name().to_string(),
            got: d.dims(),
            first: first.name().to_string(),
            expected: first.dims(),
        });
    }
    Ok(())
}

/// An [`sbmm`] planned once for one batch layout, to run on many inputs: the deltas (clones, which keep
/// their device memory alive), the segments, the rows `M`, the dtype and the device, and on CUDA the
/// uploaded segment and descriptor table and the launches (kernel, tile, split and grid of each), so that
/// [`sbmm_planned`] only checks its inputs, copies `base_out` and launches.
///
/// Built for what one decode step repeats: every linear layer of a step sees the same rows of the same
/// fine-tunes (only the layer's deltas differ), and consecutive steps of one batch the same again. A
/// plan holds its deltas' device memory (clones share their buffers): drop it when a delta is evicted.
///
/// The kernels are chosen when the plan is built, under the settings of that moment
/// ([`crate::set_tensor_cores`], [`crate::set_v4_kernels`], [`crate::set_v4_split`],
/// [`crate::set_v4_sbmm_smem_x`], [`crate::set_dense_rows`]); a plan built later follows later settings.
///
/// On CUDA the plan keeps the device pointers of its deltas' parts and takes no lock on their storages
/// when it runs (the plain [`sbmm`] locks each delta while it describes it): a delta is immutable once
/// built (its tensors are private, never written after the upload, which completes before the delta
/// exists or is queued ahead on the device's stream; candle never replaces a storage's buffer), the
/// plan's clones keep the buffers allocated, and they are freed on the device's one stream, where the
/// launches are queued too, so every launch runs after the parts were written and before their free.
pub struct SbmmPlan {
    deltas: Vec<DeviceDelta>,
    segments: Vec<Segment>,
    prepared: Prepared,
}

impl std::fmt::Debug for SbmmPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SbmmPlan")
            .field(
                "deltas",
                &self
                    .deltas
                    .iter()
                    .map(DeviceDelta::name)
                    .collect::<Vec<_>>(),
            )
            .field("segments", &self.segments.len())
            .field("rows", &self.prepared.m)
            .field("dtype", &self.prepared.dtype)
            .field("device", &self.prepared.device.location())
            .field(
                "launches",
                &self.prepared.launches.as_ref().map(|l| l.len()),
            )
            .finish()
    }
}

impl SbmmPlan {
    /// Plans [`sbmm`] of `segments` over `deltas` for inputs of `m` rows (`x` flattened to `[m, K]`) in
    /// `dtype` (f32, f16 or bf16) on `device`. The same checks as [`sbmm`] on what it can see: every delta
    /// a delta (not a `full` tensor) on `device`, all of one shape; `segments` cover rows `0..m` exactly,
    /// in order, and name existing deltas. Each is a named [`OpError`].
    pub fn new(
        deltas: &[&DeviceDelta],
        segments: &[Segment],
        m: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        Self::with_fill(deltas, segments, m, dtype, device, Fill::Uninit)
    }

    pub(crate) fn with_fill(
        deltas: &[&DeviceDelta],
        segments: &[Segment],
        m: usize,
        dtype: DType,
        device: &Device,
        fill: Fill,
    ) -> candle_core::Result<Self> {
        if !is_float(dtype) {
            return Err(OpError::Dtype {
                op: OP,
                arg: "dtype",
                got: dtype,
                expected: "f32, f16 or bf16".into(),
            }
            .into());
        }
        if let Some((first, _)) = deltas.split_first() {
            for (i, d) in deltas.iter().enumerate() {
                check_is_delta(OP, d)?;
                if !d.device().same_device(device) {
                    return Err(OpError::Device {
                        op: OP,
                        arg: "device",
                        got: device.location(),
                        delta: d.name().to_string(),
                        expected: d.device().location(),
                    }
                    .into());
                }
                check_shape_of(i, d, first)?;
            }
        }
        check_segments(OP, segments, m, deltas.len())?;
        let kn = deltas.first().map(|d| (d.dims().1, d.dims().0));
        let prepared = {
            let _s = crate::trace::span("sbmm plan: prepare");
            Prepared::new(deltas, segments, m, kn, dtype, device, fill)?
        };
        let _s = crate::trace::span("sbmm plan: keep the deltas and segments");
        Ok(SbmmPlan {
            deltas: deltas.iter().map(|d| (*d).clone()).collect(),
            segments: segments.to_vec(),
            prepared,
        })
    }

    /// The deltas (the plan's clones, in the order given).
    pub fn deltas(&self) -> &[DeviceDelta] {
        &self.deltas
    }

    /// The segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The rows `M` the plan takes.
    pub fn rows(&self) -> usize {
        self.prepared.m
    }

    /// The input dtype the plan takes.
    pub fn dtype(&self) -> DType {
        self.prepared.dtype
    }

    /// The device the plan runs on.
    pub fn device(&self) -> &Device {
        &self.prepared.device
    }

    /// `x` and `base_out` fit the plan: its dtype and device, contiguous, `x` `[.., K]` with the plan's
    /// `M` rows, `base_out` `[.., N_total]` with `x`'s leading dims.
    fn check_inputs(&self, x: &Tensor, base_out: &Tensor) -> Result<()> {
        let p = &self.prepared;
        check_same_dtype(OP, "x", x, p.dtype, "the sbmm plan")?;
        check_same_dtype(OP, "base_out", base_out, p.dtype, "the sbmm plan")?;
        check_contiguous(OP, "x", x)?;
        check_contiguous(OP, "base_out", base_out)?;
        let delta = self
            .deltas
            .first()
            .map_or("(none: the sbmm plan's device)", DeviceDelta::name);
        for (arg, t) in [("x", x), ("base_out", base_out)] {
            if !t.device().same_device(&p.device) {
                return Err(OpError::Device {
                    op: OP,
                    arg,
                    got: t.device().location(),
                    delta: delta.to_string(),
                    expected: p.device.location(),
                });
            }
        }
        let m = match x.dims().split_last() {
            Some((_, lead)) => lead.iter().product::<usize>(),
            None => 0,
        };
        if x.rank() == 0 || m != p.m {
            return Err(OpError::Shape {
                op: OP,
                arg: "x",
                got: x.dims().to_vec(),
                expected: format!("[.., K] with {} rows (the sbmm plan's)", p.m),
            });
        }
        let n = match p.kn {
            Some((k, n)) => {
                check_last_dim(OP, "x", x, k, "K, the sbmm plan's deltas' columns")?;
                n
            }
            None => *base_out.dims().last().unwrap_or(&0),
        };
        check_dims(
            OP,
            "base_out",
            base_out,
            &with_last(x.dims(), n),
            "x's leading dims, then N_total",
        )
    }
}

/// [`sbmm`] over a plan ([`SbmmPlan::new`]): `y = base_out + x · D_sᵀ` per segment, with the plan's
/// deltas and segments, bit for bit what `sbmm(x, base_out, deltas, segments)` gives. `x` and `base_out`
/// must fit the plan (its dtype and device, `x` `[.., K]` with its `M` rows, `base_out` `[.., N_total]`
/// with `x`'s leading dims, both contiguous), else a named [`OpError`]. On CUDA this copies `base_out` to
/// the output and queues the planned launches: no delta is locked or described and nothing is uploaded.
pub fn sbmm_planned(x: &Tensor, base_out: &Tensor, plan: &SbmmPlan) -> candle_core::Result<Tensor> {
    let _s = crate::trace::span("sbmm planned: the whole call");
    {
        let _s = crate::trace::span("sbmm planned: check the inputs");
        plan.check_inputs(x, base_out)?;
    }
    plan.prepared
        .run(Deltas::Owned(&plan.deltas), &plan.segments, x, base_out)
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
    fn assemble_rows_replaces_each_named_segments_rows_in_order() {
        let (m, n) = (6usize, 3usize);
        let base = Tensor::arange(0f32, (m * n) as f32, &Device::Cpu)
            .unwrap()
            .reshape((m, n))
            .unwrap();
        let seg = |start, len, delta| Segment { start, len, delta };
        // delta i adds 10 (i + 1) to its rows.
        let add = |_: &Segment, i: usize, bs: &Tensor| bs + 10.0 * (i as f64 + 1.0);
        let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
        let want = |adds: [f32; 6]| -> Vec<Vec<f32>> {
            (0..m)
                .map(|r| (0..n).map(|c| (r * n + c) as f32 + adds[r]).collect())
                .collect()
        };
        let segments = [
            seg(0, 2, Some(0)),
            seg(2, 1, None),
            seg(3, 0, Some(1)),
            seg(3, 3, Some(1)),
        ];
        let y = assemble_rows(&segments, &base, add).unwrap();
        assert_eq!(rows(&y), want([10., 10., 0., 20., 20., 20.]));
        // One segment: its product.
        let y = assemble_rows(&[seg(0, 6, Some(2))], &base, add).unwrap();
        assert_eq!(rows(&y), want([30.; 6]));
        // Only base-only rows (and an empty named segment): base's values.
        let y = assemble_rows(&[seg(0, 0, Some(0)), seg(0, 6, None)], &base, add).unwrap();
        assert_eq!(rows(&y), want([0.; 6]));
        let y = assemble_rows(&[seg(0, 2, None), seg(2, 4, None)], &base, add).unwrap();
        assert_eq!(rows(&y), want([0.; 6]));
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

//! `sbmm_slots`: [`sbmm`](super::sbmm) over tables that survive batch changes (issue #9).
//!
//! Under continuous batching the batch layout changes almost every decode step, so an
//! [`SbmmPlan`](super::SbmmPlan) cached per layer and keyed by the layout rarely serves. The kernels take
//! the segment table and the descriptor table as two device pointers, so the two are split by how long
//! they live:
//! - [`SlotDeltas`], one per linear layer: the layer's delta of each resident fine-tune, indexed by a
//!   stable small integer (the fine-tune's *slot*), described and uploaded once per change of the set
//!   of deltas (on the first CUDA call after [`SlotDeltas::set`]), not per step;
//! - [`SlotSegments`], one per forward pass and shared by every layer: the rows' runs of equal slot,
//!   uploaded once (split into pieces of at most a kernel tile's rows, per tile size met).
//!
//! A call then allocates the output, copies `base_out` and makes one launch with both tables, when the
//! layer's deltas of the batch's slots take one launch in the plain op (one codec variant and
//! v4-ness), no segment takes the dense route, and every slot the pass uses without a delta in this
//! layer can ride along in the launch (the v4 kernels skip a descriptor with no stored rows); otherwise
//! [`try_sbmm_slots`] answers `None` and [`sbmm_slots`] runs the plain op. Either way the output is bit
//! for bit what [`sbmm`](super::sbmm) gives: the kernel, tile, split and descriptors are chosen by the
//! plain op's rules over the same deltas and segments.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CudaStorage, CustomOp2, Device, Layout, Shape, Tensor};

use super::{
    check_contiguous, check_float, check_is_delta, check_last_dim, check_same_dtype,
    takes_own_route, with_last, Segment,
};
use crate::delta::DeviceDelta;
use crate::error::{OpError, Result};

const OP: &str = "sbmm-slots";

/// One linear layer's deltas by fine-tune slot: `get(slot)` is the layer's delta of the fine-tune that
/// holds `slot` (`None`: no fine-tune there, or one that leaves this layer alone). Holds clones of the
/// deltas, so the device pointers of its descriptor table stay valid until it is changed or dropped (a
/// delta's buffers are freed on its device's stream, after the launches queued on it).
pub struct SlotDeltas {
    device: Device,
    deltas: Vec<Option<DeviceDelta>>,
    /// The CUDA descriptor tables, built on the first CUDA call after a change.
    descs: Mutex<Option<Arc<crate::cuda::SlotDescs>>>,
}

impl std::fmt::Debug for SlotDeltas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotDeltas")
            .field("device", &self.device.location())
            .field(
                "deltas",
                &self
                    .deltas
                    .iter()
                    .map(|d| d.as_ref().map(DeviceDelta::name))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl SlotDeltas {
    /// An empty table (no slot) for deltas on `device`.
    pub fn new(device: &Device) -> Self {
        SlotDeltas {
            device: device.clone(),
            deltas: Vec::new(),
            descs: Mutex::new(None),
        }
    }

    /// Sets `slot`'s delta (`None`: rows of that slot add nothing in this layer), growing the table as
    /// needed. The delta must be a delta (not a `full` tensor) on the table's device, of the shape of
    /// the others; each is a named [`OpError`]. The device tables are rebuilt on the next CUDA call.
    pub fn set(&mut self, slot: usize, delta: Option<&DeviceDelta>) -> Result<()> {
        if let Some(d) = delta {
            check_is_delta(OP, d)?;
            if !d.device().same_device(&self.device) {
                return Err(OpError::Device {
                    op: OP,
                    arg: "delta",
                    got: d.device().location(),
                    delta: d.name().to_string(),
                    expected: self.device.location(),
                });
            }
            let other = (self.deltas.iter().enumerate())
                .find_map(|(i, o)| o.as_ref().filter(|_| i != slot));
            if let Some(first) = other.filter(|o| o.dims() != d.dims()) {
                return Err(OpError::DeltaShapes {
                    op: OP,
                    index: slot,
                    name: d.name().to_string(),
                    got: d.dims(),
                    first: first.name().to_string(),
                    expected: first.dims(),
                });
            }
        }
        if self.deltas.len() <= slot {
            self.deltas.resize(slot + 1, None);
        }
        self.deltas[slot] = delta.cloned();
        *self.descs.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    /// `slot`'s delta.
    pub fn get(&self, slot: usize) -> Option<&DeviceDelta> {
        self.deltas.get(slot).and_then(Option::as_ref)
    }

    /// Slots in the table (one past the highest set).
    pub fn slots(&self) -> usize {
        self.deltas.len()
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The deltas' `(N_total, K)`, when one is set.
    pub fn dims(&self) -> Option<(usize, usize)> {
        self.deltas.iter().flatten().next().map(DeviceDelta::dims)
    }

    /// The CUDA descriptor tables (built now if a change dropped them).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn descs(
        &self,
        dev: &candle_core::CudaDevice,
    ) -> candle_core::Result<Arc<crate::cuda::SlotDescs>> {
        let mut descs = self.descs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = descs.as_ref() {
            return Ok(d.clone());
        }
        let d = Arc::new(crate::cuda::slot_descs(OP, &self.deltas, dev)?);
        *descs = Some(d.clone());
        Ok(d)
    }
}

/// Per distinct slot of a pass: the slot, its runs and its longest run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotStat {
    pub(crate) slot: usize,
    pub(crate) runs: usize,
    pub(crate) longest: usize,
}

/// One forward pass's rows as runs of equal fine-tune slot, shared by every layer of the pass: built
/// once from the rows' slots, uploaded on the first CUDA call (once per kernel tile size met: decode
/// steps meet one).
pub struct SlotSegments {
    device: Device,
    m: usize,
    /// The runs, covering `0..m` in order; `delta` is the slot (`None`: the base).
    segments: Vec<Segment>,
    stats: Vec<SlotStat>,
    /// The uploaded pieces, by the tile rows they were split at.
    pieces: Mutex<Vec<(u32, Arc<crate::cuda::SlotPieces>)>>,
}

impl std::fmt::Debug for SlotSegments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotSegments")
            .field("rows", &self.m)
            .field("segments", &self.segments.len())
            .field("slots", &self.stats.len())
            .finish()
    }
}

impl SlotSegments {
    /// The segments of a batch whose row `i` (of `x` flattened to `[M, K]`) uses slot `row_slots[i]`
    /// (`None`: the base), for inputs on `device`.
    pub fn new(row_slots: &[Option<usize>], device: &Device) -> Self {
        let segments = Segment::runs(row_slots);
        let mut stats: Vec<SlotStat> = Vec::new();
        for s in &segments {
            let Some(slot) = s.delta else { continue };
            match stats.iter_mut().find(|t| t.slot == slot) {
                Some(t) => {
                    t.runs += 1;
                    t.longest = t.longest.max(s.len);
                }
                None => stats.push(SlotStat {
                    slot,
                    runs: 1,
                    longest: s.len,
                }),
            }
        }
        SlotSegments {
            device: device.clone(),
            m: row_slots.len(),
            segments,
            stats,
            pieces: Mutex::new(Vec::new()),
        }
    }

    /// The rows `M`.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// The runs (`delta` is the slot).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The distinct slots, in order of first appearance.
    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.stats.iter().map(|s| s.slot)
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Segment tables uploaded so far (one per kernel tile size met; 0 on the CPU).
    pub fn uploads(&self) -> usize {
        self.pieces.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Checks `x`, `base_out` and the tables against each other (the plain op's checks, plus the slots).
fn check(
    x: &Tensor,
    base_out: &Tensor,
    segments: &SlotSegments,
    deltas: &SlotDeltas,
) -> Result<()> {
    check_float(OP, "x", x)?;
    check_same_dtype(OP, "base_out", base_out, x.dtype(), "x")?;
    check_contiguous(OP, "x", x)?;
    check_contiguous(OP, "base_out", base_out)?;
    let first = deltas.deltas.iter().flatten().next();
    let delta = first.map_or("(none: the slot table's device)", DeviceDelta::name);
    for (arg, dev) in [
        ("x", x.device()),
        ("base_out", base_out.device()),
        ("segments", &segments.device),
    ] {
        if !dev.same_device(&deltas.device) {
            return Err(OpError::Device {
                op: OP,
                arg,
                got: dev.location(),
                delta: delta.to_string(),
                expected: deltas.device.location(),
            });
        }
    }
    let m = match x.dims().split_last() {
        Some((_, lead)) => lead.iter().product::<usize>(),
        None => 0,
    };
    if x.rank() == 0 || m != segments.m {
        return Err(OpError::Shape {
            op: OP,
            arg: "x",
            got: x.dims().to_vec(),
            expected: format!("[.., K] with {} rows (the segments')", segments.m),
        });
    }
    let n = match first {
        Some(d) => {
            check_last_dim(OP, "x", x, d.dims().1, "K, the deltas' columns")?;
            d.dims().0
        }
        None => *base_out.dims().last().unwrap_or(&0),
    };
    super::check_dims(
        OP,
        "base_out",
        base_out,
        &with_last(x.dims(), n),
        "x's leading dims, then N_total",
    )?;
    if let Some(s) = segments.stats.iter().find(|s| s.slot >= deltas.slots()) {
        return Err(OpError::Slot {
            op: OP,
            slot: s.slot,
            slots: deltas.slots(),
        });
    }
    Ok(())
}

/// The plain op over the same deltas and segments: the slots' deltas in order of first appearance.
fn plain(
    x: &Tensor,
    base_out: &Tensor,
    segments: &SlotSegments,
    deltas: &SlotDeltas,
) -> candle_core::Result<Tensor> {
    let mut used: Vec<&DeviceDelta> = Vec::new();
    let mut index_of: Vec<Option<usize>> = vec![None; deltas.slots()];
    for s in &segments.stats {
        if let Some(d) = deltas.get(s.slot) {
            index_of[s.slot] = Some(used.len());
            used.push(d);
        }
    }
    let segs: Vec<Segment> = (segments.segments.iter())
        .map(|s| Segment {
            delta: s.delta.and_then(|slot| index_of[slot]),
            ..*s
        })
        .collect();
    super::sbmm(x, base_out, &used, &segs)
}

/// [`sbmm`](super::sbmm) of the pass's `segments` over the layer's `deltas`: `y = base_out + x · D_sᵀ`
/// for each run of rows of slot `s` (`D_s = deltas.get(s)`; rows of the base, or of a slot without a
/// delta here, get `base_out`), bit for bit what the plain op gives for the same deltas and segments.
/// When the shared tables cannot serve this call (see the module docs) it runs the plain op.
///
/// `x` `[.., K]` with the segments' `M` rows and `base_out` `[.., N_total]` with `x`'s leading dims,
/// contiguous, of one float dtype, on the tables' device; every slot the segments use is below
/// [`SlotDeltas::slots`]. Each is a named [`OpError`].
pub fn sbmm_slots(
    x: &Tensor,
    base_out: &Tensor,
    segments: &SlotSegments,
    deltas: &SlotDeltas,
) -> candle_core::Result<Tensor> {
    match try_sbmm_slots(x, base_out, segments, deltas)? {
        Some(y) => Ok(y),
        None => plain(x, base_out, segments, deltas),
    }
}

/// [`sbmm_slots`], or `None` when the shared tables cannot serve this call on CUDA (more than one
/// launch, a segment on the dense route, or a slot without a delta in this layer that the chosen kernel
/// cannot skip): the caller then takes its own path (a per-layer [`SbmmPlan`](super::SbmmPlan)). On the
/// CPU this is always the plain op.
pub fn try_sbmm_slots(
    x: &Tensor,
    base_out: &Tensor,
    segments: &SlotSegments,
    deltas: &SlotDeltas,
) -> candle_core::Result<Option<Tensor>> {
    check(x, base_out, segments, deltas)?;
    let Device::Cuda(dev) = x.device() else {
        return plain(x, base_out, segments, deltas).map(Some);
    };
    let dtype = x.dtype();
    // Segments with many rows (prefill) take the 32-row tile or the dense route in the plain op: not
    // one launch.
    let dense = (segments.stats.iter()).any(|s| {
        deltas
            .get(s.slot)
            .is_some_and(|d| takes_own_route(d, s.longest, dtype))
    });
    if dense {
        return Ok(None);
    }
    let descs = deltas.descs(dev)?;
    let k = *x.dims().last().unwrap_or(&0);
    let n = *base_out.dims().last().unwrap_or(&0);
    let Some(launch) = crate::cuda::slot_launch(
        OP,
        &segments.segments,
        &segments.stats,
        &segments.pieces,
        &descs,
        &deltas.deltas,
        (segments.m, k, n),
        dtype,
        dev,
    )?
    else {
        return Ok(None);
    };
    x.apply_op2_no_bwd(base_out, &SbmmSlots { launch: &launch })
        .map(Some)
}

struct SbmmSlots<'a> {
    launch: &'a crate::cuda::SlotLaunch,
}

impl CustomOp2 for SbmmSlots<'_> {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(OpError::Storage {
            op: OP,
            reason: "x is on the CPU but the slot launch was planned for a CUDA device".into(),
        }
        .into())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        crate::cuda::slot_run(OP, self.launch, (s1, l1), (s2, l2))
    }
}

//! Multi-tenant mode: one copy of the base, and the packed deltas of many fine-tunes applied per batch
//! row (DeltaZip, arXiv 2312.05215, section 4: base and delta computation decoupled, the deltas of a
//! batch in one SBMM).
//!
//! A fine-tune's deltas travel in two forms: [`HostDelta`] (its tensors' packed bytes in CPU memory,
//! checksums verified and payloads checked once: what a CPU cache holds) and [`FineTuneDeltas`] (the same on a device, ready for
//! the ops). The [`DeltaRegistry`] maps fine-tune names to the resident [`FineTuneDeltas`] and may change
//! at run time (hot load, eviction). Installed as the host's [`LinearHook`] (seam 4,
//! `host/patches/mistralrs-quant/0002-linear-hook.patch` and `mistralrs-core/0004-module-hooks.patch`),
//! it wraps every linear layer of the base in a [`DeltaLinear`] and attaches a delta to every token
//! embedding and RMS norm. At run time each of them reads which fine-tune every batch row is for from
//! the host's row-tags scope (seams 1-3), looks the fine-tunes up in the registry, and adds their deltas:
//! one sbmm per linear layer (planned once per batch layout and layer: [`SbmmPlan`], [`sbmm_planned`]),
//! bias and norm deltas as per-row tables, embedding deltas per run of rows. Rows for the base, for an
//! unknown name or for a fine-tune that leaves a module alone cost no delta work.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Instant;

use rayon::prelude::*;

use candle_core::{DType, Device, Result as CResult, Tensor};
use dz_candle_ops::{
    embedding_delta_add_unchecked, norm_delta_add, sbmm_planned, trace, try_sbmm_slots,
    CheckedParts, DeviceDelta, HostPins, PreparedDelta, SbmmPlan, Segment, SlotDeltas,
    SlotSegments,
};
use dz_format::shard::{shard_range, tensor_split, tp_layer, TpLayer};
use dz_format::{DeltaFile, Manifest, Role, TensorData, TensorEntry};
use mistralrs_quant::{
    current_row_tags, IsqType, LinearHook, ModuleDelta, ModuleKind, QuantMethod, QuantMethodConfig,
    QuantizeOntoGuard, QuantizedSerde, RowTags,
};

use crate::error::{Error, Result};
use crate::profile::{Part, Profile};
use crate::tp::TpRank;

static SLOT_TABLES: AtomicBool = AtomicBool::new(true);

/// Lets every [`DeltaLinear`] add its weight deltas through tables that survive batch changes (issue
/// #9): a per-layer descriptor array indexed by each resident fine-tune's stable slot (rebuilt after an
/// insert or remove, on the layer's next call) and one segment table per forward pass shared by every
/// layer (`dz_candle_ops::try_sbmm_slots`), instead of the per-layer plan keyed by the batch layout
/// (which misses whenever a sequence joins or ends). Layers the shared tables cannot serve (bias
/// deltas, more than one kernel launch, the dense route of prefill) take the per-layer plan as before.
/// The outputs are the same bit for bit. **On by default** since session 17: on the H200, `deltazip bench
/// hook --slot-tables --phases` (7B, 32 rows over 32 fine-tunes, a pass over the seven linear layers
/// with another batch each pass, synchronized every 8 calls so that the launch queue never fills) took
/// 39.5 us of CPU a call against 71.4 with the per-layer plans, whose build (26 us: describing 32 deltas,
/// uploading the table) runs on ~80% of serving's decode calls; with the same batch every pass the slot
/// tables cost 3.5 us more (39.9 against 36.4). `deltazip serve --no-slot-tables` turns it off.
pub fn set_slot_tables(enabled: bool) {
    SLOT_TABLES.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_slot_tables`] turned the slot tables on.
pub fn slot_tables() -> bool {
    SLOT_TABLES.load(Ordering::Relaxed)
}

static FUSED_NORM_DELTAS: AtomicBool = AtomicBool::new(true);

/// Lets every RMS norm's weight delta be added in one op (`dz_candle_ops::norm_delta_add`, one kernel
/// launch on CUDA) instead of three (an RMS norm with unit weights, a multiply, an add; session 12
/// measured 54 us of CPU a call, 65 calls a 7B decode step). The sum is formed in f32 and rounded once
/// (the three ops round three times). On by default since session 14: on the H200 `cuda_check`'s
/// "norm delta" family passed, `bench hook` measured 11 us of CPU a norm against 28 (32 rows), and a 7B
/// serving run with 32 fine-tunes gave 204.6 / 256.6 / 312.3 tokens/s at 4 / 16 / 64 req/s against
/// 203.3 / 226.6 / 316.6 (`deltazip serve --no-fused-norm-deltas` turns it off).
pub fn set_fused_norm_deltas(enabled: bool) {
    FUSED_NORM_DELTAS.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_fused_norm_deltas`] turned the one-op norm delta on.
pub fn fused_norm_deltas() -> bool {
    FUSED_NORM_DELTAS.load(Ordering::Relaxed)
}

static PIN_HOST_DELTAS: AtomicBool = AtomicBool::new(true);

/// Whether [`HostDelta::read_for`] page-locks a delta's large host buffers for its CUDA device
/// (`dz_candle_ops::HostPins`), so that each upload, the first and every one after a GPU eviction, is a
/// direct DMA copy instead of one staged through the driver's pageable path. On by default; a server
/// whose CPU tier should stay swappable turns it off (`deltazip serve --no-pin-host`). Locked pages are
/// the CPU tier's own budget (`--cpu-cache`), never more.
pub fn set_pin_host_deltas(enabled: bool) {
    PIN_HOST_DELTAS.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_pin_host_deltas`] left page-locking on.
pub fn pin_host_deltas() -> bool {
    PIN_HOST_DELTAS.load(Ordering::Relaxed)
}

/// The output head's name (a tied head, the embedding table used as `lm_head`, is wrapped under it too).
pub const TIED_HEAD: &str = "lm_head";

/// A tensor's module: `model.layers.0.self_attn.q_proj.weight` -> (`model.layers.0.self_attn.q_proj`, weight).
fn split_param(name: &str) -> Option<(&str, bool)> {
    if let Some(p) = name.strip_suffix(".weight") {
        Some((p, false))
    } else {
        name.strip_suffix(".bias").map(|p| (p, true))
    }
}

/// One stored tensor of a delta in CPU memory: its packed parts, or (for a CUDA device with the v4
/// kernels on, [`HostDelta::read_for`]) its checked v4 layout instead.
struct HostTensor {
    entry: TensorEntry,
    parts: Vec<Vec<u8>>,
    prepared: Option<PreparedDelta>,
    /// The payload check of `parts`, made once when read (not for dense tensors).
    checked: Option<CheckedParts>,
}

impl HostTensor {
    /// The whole tensor on `device`, without the payload check when it was made at read.
    fn build(&self, parts: &[&[u8]], device: &Device) -> dz_candle_ops::Result<DeviceDelta> {
        match &self.checked {
            Some(c) => DeviceDelta::from_checked_parts(&self.entry, parts, c, device),
            None => DeviceDelta::from_parts(&self.entry, parts, device),
        }
    }
}

/// A fine-tune's delta in CPU memory: every non-zero tensor's packed parts, read from its file with
/// checksums verified. Uploading it ([`HostDelta::upload`]) needs no file access.
pub struct HostDelta {
    /// Declared first so that it drops first: the buffers below are unregistered before they are freed.
    pins: HostPins,
    name: Arc<str>,
    tensors: Vec<HostTensor>,
    bytes: u64,
    /// The delta's manifest without its tensor list (the architecture: how tensor parallelism cuts
    /// its k/v projections).
    manifest: Manifest,
}

impl fmt::Debug for HostDelta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostDelta")
            .field("name", &self.name)
            .field("tensors", &self.tensors.len())
            .field("bytes", &self.bytes)
            .field("pinned", &self.pins.bytes())
            .finish()
    }
}

impl HostDelta {
    /// Reads the delta of fine-tune `name` from `file`, checksums verified and every payload checked
    /// (SPEC.md section 7) once, here: its uploads then only copy. The check decodes every code
    /// (billions for a 7B delta); session 8 measured ~15 s per 7B upload that checked and re-laid. Tensors stored as `full` values cannot be served on a shared base and
    /// are refused.
    pub fn read(name: &str, file: &DeltaFile) -> Result<Self> {
        Self::read_as(name, file, false)
    }

    /// [`HostDelta::read`] for uploads to `device` alone (no tensor parallelism): on a CUDA device with
    /// the v4 kernels on, every linear delta they take is checked and re-laid now
    /// ([`PreparedDelta`]) and its packed parts dropped, so each upload (the first and every one after
    /// a GPU eviction) is a plain copy. Elsewhere the same as `read`.
    ///
    /// On a CUDA device its large buffers are also page-locked ([`set_pin_host_deltas`], on by default).
    pub fn read_for(name: &str, file: &DeltaFile, device: &Device) -> Result<Self> {
        let mut d = Self::read_as(name, file, device.is_cuda() && dz_candle_ops::v4_kernels())?;
        if device.is_cuda() && pin_host_deltas() {
            // SAFETY: the buffers are the delta's own, never changed after this read; `pins` is
            // declared before them in `HostDelta`, so it unregisters them before they are freed.
            d.pins = unsafe { HostPins::register(device, d.buffers()) };
        }
        Ok(d)
    }

    /// Every host buffer an upload copies (packed parts and v4 layouts).
    fn buffers(&self) -> impl Iterator<Item = &[u8]> {
        self.tensors.iter().flat_map(|t| {
            let prepared = t.prepared.iter().flat_map(|p| p.host_buffers());
            t.parts.iter().map(Vec::as_slice).chain(prepared)
        })
    }

    /// Bytes of it page-locked for uploads (0 unless read with [`HostDelta::read_for`] for a CUDA device).
    pub fn pinned_bytes(&self) -> usize {
        self.pins.bytes()
    }

    fn read_as(name: &str, file: &DeltaFile, prepare: bool) -> Result<Self> {
        // Tensor by tensor on all cores (checksums, zstd, the payload check, the v4 re-layout): one
        // thread took ~7 s per 7B delta on the H200's host (session 9). The first failing tensor, in
        // file order, names the error.
        let read: Vec<Result<Option<HostTensor>>> = (0..file.manifest().tensors.len())
            .into_par_iter()
            .map(|j| Self::read_tensor(name, file, j, prepare))
            .collect();
        let mut tensors = Vec::with_capacity(read.len());
        let mut bytes = 0u64;
        for t in read {
            if let Some(t) = t? {
                bytes += t.parts.iter().map(|p| p.len() as u64).sum::<u64>();
                bytes += t.prepared.as_ref().map_or(0, |p| p.nbytes() as u64);
                tensors.push(t);
            }
        }
        let mut manifest = file.manifest().clone();
        manifest.tensors.clear();
        Ok(Self {
            pins: HostPins::none(),
            name: Arc::from(name),
            tensors,
            bytes,
            manifest,
        })
    }

    /// Tensor `j` of `file` as [`HostDelta::read_as`] keeps it (`None`: a `zero` tensor, nothing to add).
    fn read_tensor(
        name: &str,
        file: &DeltaFile,
        j: usize,
        prepare: bool,
    ) -> Result<Option<HostTensor>> {
        let t = &file.manifest().tensors[j];
        if t.codec.kind() == "zero" {
            return Ok(None);
        }
        if t.role == Role::Full {
            return Err(Error::Host(format!(
                "{name}: tensor `{}` is stored as the fine-tune's full value, which multi-tenant \
                 mode cannot add to a shared base; serve this delta with mode = \"merge\"",
                t.name
            )));
        }
        let data = file.read_at(j)?;
        let prepared = match (prepare, t.role) {
            (true, Role::Linear | Role::LmHead) => {
                let parts: Vec<&[u8]> = data.parts.iter().map(|p| p.as_ref()).collect();
                PreparedDelta::prepare(t, &parts)
                    .map_err(|e| Error::Host(format!("{name}: {e}")))?
            }
            _ => None,
        };
        let parts: Vec<Vec<u8>> = match prepared {
            Some(_) => Vec::new(),
            None => data.parts.into_iter().map(|p| p.into_owned()).collect(),
        };
        // Checked once here, on the buffers kept: every upload of them is then a copy.
        let checked = match (&prepared, t.role) {
            (None, Role::Linear | Role::LmHead | Role::Embedding) => {
                let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                Some(
                    DeviceDelta::check_parts(t, &refs)
                        .map_err(|e| Error::Host(format!("{name}: {e}")))?,
                )
            }
            _ => None,
        };
        Ok(Some(HostTensor {
            entry: t.clone(),
            parts,
            prepared,
            checked,
        }))
    }

    /// The fine-tune's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Serves the same deltas under another fine-tune name (names that share one delta file).
    pub fn set_name(&mut self, name: &str) {
        self.name = Arc::from(name);
    }

    /// Bytes held: the packed parts, or the v4 layouts of tensors prepared by [`HostDelta::read_for`].
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes the device form takes on `device` ([`DeviceDelta::device_nbytes`] per tensor: the packed
    /// parts, the v4 kernels' layout, or both, as the upload will keep them; dense tensors as f32): an
    /// upper bound of [`FineTuneDeltas::bytes`] for the same delta on one device.
    pub fn device_bytes(&self, device: &Device) -> u64 {
        self.tensors
            .iter()
            .map(|t| {
                if let Some(p) = &t.prepared {
                    p.nbytes() as u64
                } else if t.entry.role == Role::DenseDelta {
                    4 * t.entry.shape.iter().product::<u64>()
                } else {
                    let packed = t.parts.iter().map(|p| p.len() as u64).sum::<u64>();
                    match t.entry.stored_dims() {
                        Ok((n, k)) => DeviceDelta::device_nbytes(
                            Some(t.entry.role),
                            &t.entry.codec,
                            n,
                            k,
                            packed,
                            device.is_cuda(),
                        ),
                        Err(_) => packed,
                    }
                }
            })
            .sum()
    }

    /// Puts the delta on `device`. `tied_head`: the base's output head is its embedding table, so an
    /// embedding delta also applies to the head (unless the delta has a head delta of its own).
    pub fn upload(&self, device: &Device, tied_head: bool) -> Result<FineTuneDeltas> {
        self.upload_rank(device, tied_head, TpRank::SINGLE)
    }

    /// [`HostDelta::upload`] for rank `tp.rank` of `tp.world` tensor-parallel ranks: the slice of each
    /// delta that matches the host's slice of its layer ([`crate::tp`]): column-parallel weights and
    /// biases by output features, row-parallel weights by input features, everything else whole. A
    /// row-parallel layer's bias delta is added by rank 0 only (the ranks' outputs are summed).
    pub fn upload_rank(
        &self,
        device: &Device,
        tied_head: bool,
        tp: TpRank,
    ) -> Result<FineTuneDeltas> {
        let host = |e: &dyn fmt::Display| Error::Host(format!("{}: {e}", self.name));
        if tp.rank >= tp.world.max(1) {
            return Err(Error::Host(format!(
                "{}: rank {} of {} tensor-parallel ranks",
                self.name, tp.rank, tp.world
            )));
        }
        // The uploads below run on a loader thread: make the device's context current on it first
        // (a buffer freed on a thread without one leaks; see `gpu_mem::bind`).
        crate::gpu_mem::bind(device);
        let mut out = FineTuneDeltas {
            name: self.name.clone(),
            linear: HashMap::new(),
            bias: HashMap::new(),
            norm: HashMap::new(),
            norms: None,
            embedding: HashMap::new(),
            bytes: 0,
            device: device.clone(),
        };
        for t in &self.tensors {
            let Some((module, is_bias)) = split_param(&t.entry.name) else {
                return Err(Error::Host(format!(
                    "{}: tensor `{}` is neither a weight nor a bias",
                    self.name, t.entry.name
                )));
            };
            let parts: Vec<&[u8]> = t.parts.iter().map(Vec::as_slice).collect();
            let split = if tp.world > 1 {
                tensor_split(&self.manifest, &t.entry, tp.world)?
                    .map(|(axis, ranges)| (axis, ranges[tp.rank].clone()))
            } else {
                None
            };
            if split.is_none()
                && tp.rank > 0
                && is_bias
                && tp_layer(&t.entry.name) == TpLayer::RowParallel
            {
                continue;
            }
            match (t.entry.role, is_bias) {
                (Role::Linear | Role::LmHead, false) => {
                    let d = match (&split, &t.prepared) {
                        (_, Some(_)) if tp.world > 1 => {
                            return Err(Error::Host(format!(
                                "{}: `{}` was prepared for one device (HostDelta::read_for), not for \
                                 {} tensor-parallel ranks: read it with HostDelta::read",
                                self.name, t.entry.name, tp.world
                            )));
                        }
                        (_, Some(p)) => DeviceDelta::from_prepared(p, device),
                        (None, None) => t.build(&parts, device),
                        (Some((axis, range)), None) => {
                            let shard = shard_range(&t.entry, &parts, *axis, range.clone())?;
                            DeviceDelta::from_shard(&shard, device)
                        }
                    }
                    .map_err(|e| host(&e))?;
                    out.bytes += d.nbytes() as u64;
                    out.linear.insert(module.to_string(), d);
                }
                (Role::Embedding, false) => {
                    let d = t.build(&parts, device).map_err(|e| host(&e))?;
                    out.bytes += d.nbytes() as u64;
                    out.embedding.insert(module.to_string(), d);
                }
                (Role::DenseDelta, _) => {
                    let data = TensorData {
                        entry: &t.entry,
                        parts: t.parts.iter().map(|p| p.as_slice().into()).collect(),
                    };
                    let (rows, _) = t.entry.matrix_dims()?;
                    let mut v = data.decode()?.to_f32(rows);
                    if let Some((_, range)) = &split {
                        // A column-parallel bias: this rank's output features.
                        v = v[range.clone()].to_vec();
                    }
                    out.bytes += 4 * v.len() as u64;
                    let len = v.len();
                    let v = Tensor::from_vec(v, len, device).map_err(|e| host(&e))?;
                    if is_bias {
                        out.bias.insert(module.to_string(), v);
                    } else {
                        out.norm.insert(module.to_string(), v);
                    }
                }
                (role, _) => {
                    return Err(Error::Host(format!(
                        "{}: tensor `{}` has role `{}`, which multi-tenant mode does not apply",
                        self.name,
                        t.entry.name,
                        role.as_str()
                    )))
                }
            }
        }
        if tied_head && !out.linear.contains_key(TIED_HEAD) {
            if let Some(e) = out.embedding.values().next() {
                out.linear.insert(TIED_HEAD.to_string(), e.clone());
            }
        }
        out.norms = NormStack::of(&out.norm).map_err(|e| host(&e))?;
        Ok(out)
    }
}

/// Every RMS-norm delta of one fine-tune stacked `[n, width]` (f32), in name order: a forward step builds
/// the norm tables of its rows once from these ([`DeltaRegistry::norm_table`]) and each norm takes its
/// slice. Built per norm call instead, a table of 32 rows took ~35 launches (session 9's H200 profile:
/// 13 ms a step for 65 norms, 193 us a call).
struct NormStack {
    /// The norms' module names, sorted (`stack` row `i` is `names[i]`).
    names: Arc<[String]>,
    stack: Tensor,
}

impl NormStack {
    /// The stack of `norm`'s deltas; `None` when there are none or their widths differ (then each norm
    /// call builds its own table).
    fn of(norm: &HashMap<String, Tensor>) -> CResult<Option<NormStack>> {
        let mut names: Vec<&String> = norm.keys().collect();
        names.sort_unstable();
        let Some(width) = names.first().map(|n| norm[*n].elem_count()) else {
            return Ok(None);
        };
        if names.iter().any(|n| norm[*n].elem_count() != width) {
            return Ok(None);
        }
        let rows: Vec<Tensor> = names
            .iter()
            .map(|n| norm[*n].reshape(width))
            .collect::<CResult<_>>()?;
        Ok(Some(NormStack {
            names: names.into_iter().cloned().collect(),
            stack: Tensor::stack(&rows, 0)?,
        }))
    }
}

/// The norm tables of one batch ([`DeltaRegistry::norm_table`]), kept while the batch's rows stay the
/// same. Weak references: a cached batch does not keep an evicted fine-tune's deltas on the device,
/// and its address cannot be reused while the entry lives.
struct NormTable {
    rows: Vec<Option<Weak<FineTuneDeltas>>>,
    dtype: DType,
    names: Arc<[String]>,
    /// `[n, rows, width]` in `dtype`: norm `i`'s deltas for every row (zeros for the base's rows).
    /// Norm-major, so that each norm's slice is contiguous (no copy per norm call).
    table: Tensor,
    /// `[width]` ones in `dtype`: the weight of the unit RMS norm every norm call computes.
    ones: Tensor,
}

/// What [`DeltaRegistry::norm_table`] hands each norm: the norms' names (sorted), their table
/// (`[n, rows, width]`) and `[width]` ones, in the batch's dtype.
type NormParts = (Arc<[String]>, Tensor, Tensor);

impl NormTable {
    fn serves(&self, plan: &RowPlan, dtype: DType) -> bool {
        self.dtype == dtype
            && self.rows.len() == plan.len()
            && self
                .rows
                .iter()
                .enumerate()
                .all(|(b, c)| match (c, plan.fine_tune(b)) {
                    (None, None) => true,
                    (Some(c), Some(r)) => std::ptr::eq(c.as_ptr(), Arc::as_ptr(r)),
                    _ => false,
                })
    }
}

/// One fine-tune's deltas on a device, by module name (the weights' prefix).
pub struct FineTuneDeltas {
    name: Arc<str>,
    linear: HashMap<String, DeviceDelta>,
    bias: HashMap<String, Tensor>,
    norm: HashMap<String, Tensor>,
    /// `norm` stacked, when every norm has the same width (the per-step tables are built from it).
    norms: Option<NormStack>,
    embedding: HashMap<String, DeviceDelta>,
    bytes: u64,
    /// The device the deltas live on.
    device: Device,
}

/// The last reference to a fine-tune's deltas can go on any thread (a loader evicting it, an HTTP
/// handler dropping a drained one): the device's context is made current first, or cudarc's frees fail
/// on a thread that has none and the memory leaks (session 7, the merged engines' INVALID_CONTEXT).
impl Drop for FineTuneDeltas {
    fn drop(&mut self) {
        crate::gpu_mem::bind(&self.device);
    }
}

impl fmt::Debug for FineTuneDeltas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FineTuneDeltas")
            .field("name", &self.name)
            .field("linear", &self.linear.len())
            .field("bias", &self.bias.len())
            .field("norm", &self.norm.len())
            .field("embedding", &self.embedding.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl FineTuneDeltas {
    /// Reads fine-tune `name`'s delta from `file` onto `device` ([`HostDelta::read`], then
    /// [`HostDelta::upload`]).
    pub fn load(name: &str, file: &DeltaFile, device: &Device, tied_head: bool) -> Result<Self> {
        HostDelta::read(name, file)?.upload(device, tied_head)
    }

    /// The fine-tune's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Serves the same deltas under another fine-tune name (names that share one delta file).
    pub fn set_name(&mut self, name: &str) {
        self.name = Arc::from(name);
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The packed delta of linear layer (or output head) `module`, as this device holds it (under tensor
    /// parallelism: this rank's slice).
    pub fn linear(&self, module: &str) -> Option<&DeviceDelta> {
        self.linear.get(module)
    }

    /// The bias delta of linear layer `module` (f32, this rank's output features).
    pub fn bias(&self, module: &str) -> Option<&Tensor> {
        self.bias.get(module)
    }

    /// The weight delta of RMS norm `module` (f32).
    pub fn norm(&self, module: &str) -> Option<&Tensor> {
        self.norm.get(module)
    }

    /// The packed delta of token embedding `module`.
    pub fn embedding(&self, module: &str) -> Option<&DeviceDelta> {
        self.embedding.get(module)
    }

    /// The modules this fine-tune changes, sorted.
    pub fn module_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = (self.linear.keys())
            .chain(self.bias.keys())
            .chain(self.norm.keys())
            .chain(self.embedding.keys())
            .map(String::as_str)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// The fine-tunes whose deltas are resident on the serving device, by name. Shared by every wrapped
/// module of the base; changes at run time (a fine-tune added after its deltas are uploaded, removed
/// before they are freed) are seen by the next forward pass.
#[derive(Default)]
pub struct DeltaRegistry {
    resident: RwLock<HashMap<Arc<str>, Arc<FineTuneDeltas>>>,
    /// The most distinct resident fine-tunes one forward pass has served.
    widest: AtomicUsize,
    /// Tokens the output head computed, by requested model (`default` for untagged rows).
    tokens: std::sync::Mutex<HashMap<String, u64>>,
    /// Forward passes the output head ended, their rows, their distinct requested models and their runs
    /// of rows of one model ([`PassCounts`]).
    passes: [AtomicU64; 4],
    /// Where the forward passes spend their time (`DZ_PROFILE=1`).
    profile: Profile,
    /// The last batch's RMS-norm tables (every norm of a forward pass sees the same rows).
    norm_table: Mutex<Option<NormTable>>,
    /// Bumped by every change of `resident`: a cached [`RowPlan`] is for one generation.
    generation: AtomicU64,
    /// The last forward pass's [`RowPlan`], with the row tags and generation it was made for.
    plan: Mutex<Option<CachedPlan>>,
    /// Every wrapped linear layer's cached [`LayerPlan`] slot: emptied by every change of `resident`, so
    /// that no cached plan keeps a removed fine-tune's deltas on the device.
    layer_plans: Mutex<Vec<Weak<PlanSlot>>>,
    /// The resident fine-tunes by stable slot ([`set_slot_tables`]): a fine-tune takes the lowest free
    /// slot at `insert` (or keeps its name's), frees it at `remove`. Changed under the `resident` write
    /// lock, with the generation bumped under this lock.
    slots: Mutex<Vec<Option<Arc<FineTuneDeltas>>>>,
    /// The last forward pass's segments by slot, shared by every layer of the pass.
    slot_segments: Mutex<Option<CachedSegments>>,
    /// Segment tables built (once per pass whose slot layout differs from the last one's).
    segment_builds: AtomicUsize,
    /// Per-layer slot tables built (once per layer after each insert or remove).
    slot_table_builds: AtomicUsize,
    /// Linear-layer calls by how they found their deltas' launches ([`PlanCounts`]), by [`Outcome`].
    plan_counts: [AtomicUsize; 4],
    /// [`DeltaRegistry::force_slot_tables`]: 0 follows [`set_slot_tables`], 1 on, 2 off.
    slot_mode: std::sync::atomic::AtomicU8,
    /// [`DeltaRegistry::force_fused_norm_deltas`]: 0 follows [`set_fused_norm_deltas`], 1 on, 2 off.
    norm_mode: std::sync::atomic::AtomicU8,
}

/// Linear-layer calls by how they found their deltas' launches ([`DeltaRegistry::plan_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanCounts {
    /// The layer's cached plan served the batch layout.
    pub plan_reused: usize,
    /// The layer built a plan (the layout changed, or the layer had none).
    pub plan_built: usize,
    /// The slot tables served the call ([`set_slot_tables`]: one shared launch, or none where no slot has
    /// a delta in the layer).
    pub slot_shared: usize,
    /// The slot tables could not serve it (a bias delta, the dense route or a wide segment, more than
    /// one launch, an older generation); the layer plan did.
    pub slot_fallback: usize,
}

/// What the forward passes served so far ([`DeltaRegistry::pass_counts`]; `deltazip serve`'s `/metrics`:
/// `deltazip_forward_*_total`): their means per pass say how wide the batches were and how many distinct
/// fine-tunes (so deltas to stream) a pass had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassCounts {
    /// Forward passes (output-head calls with row tags).
    pub passes: u64,
    /// Their rows (sequences), summed.
    pub rows: u64,
    /// Their distinct requested models (the base, untagged rows, counts as one), summed.
    pub models: u64,
    /// Their runs of consecutive rows of one requested model, summed: the segments a pass's sbmm
    /// launches (a fine-tune with rows in two runs has its delta streamed twice). Equal to `models` when
    /// the host groups each model's rows (its patch 0015 does for decode batches).
    pub runs: u64,
}

/// How a linear-layer call found its launches: the index of its count in [`DeltaRegistry::plan_counts`].
#[derive(Clone, Copy)]
enum Outcome {
    PlanReused,
    PlanBuilt,
    SlotShared,
    SlotFallback,
}

/// A pass's [`SlotSegments`], keyed by the [`RowPlan`]'s rows (by identity, then by value: a later pass
/// with the same slot layout reuses it) and the input rows.
struct CachedSegments {
    row_ft: Arc<[Option<u32>]>,
    generation: u64,
    row_slots: Vec<Option<usize>>,
    segments: Arc<SlotSegments>,
}

/// The fine-tunes of one batch's rows, resolved once per forward pass and shared by every layer of it
/// ([`DeltaRegistry::rows`]): each of ~300 modules of a 7B forward pass used to look up and clone every
/// row's fine-tune (two string-keyed lookups and an `Arc` clone per row and layer; session 11's host
/// profile: 86 us of CPU per linear layer at 32-64 rows).
#[derive(Clone)]
pub struct RowPlan {
    /// The distinct fine-tunes of the batch, in order of first appearance over its rows.
    fts: Vec<Arc<FineTuneDeltas>>,
    /// Per batch row: its fine-tune's index in `fts`, or `None` (the base, or a name not resident).
    row_ft: Arc<[Option<u32>]>,
    /// The registry's generation the fine-tunes were resolved under ([`DeltaRegistry::rows`]); `None` for
    /// a plan made otherwise ([`RowPlan::of_rows`]). Layers keep plans built for it only while it is
    /// current.
    generation: Option<u64>,
}

impl RowPlan {
    /// The plan of rows given as each row's fine-tune (`None`: the base).
    pub fn of_rows(rows: &[Option<Arc<FineTuneDeltas>>]) -> RowPlan {
        let mut fts: Vec<Arc<FineTuneDeltas>> = Vec::new();
        let row_ft = rows
            .iter()
            .map(|r| {
                r.as_ref().map(|f| {
                    let i = fts
                        .iter()
                        .position(|g| Arc::ptr_eq(g, f))
                        .unwrap_or_else(|| {
                            fts.push(f.clone());
                            fts.len() - 1
                        });
                    i as u32
                })
            })
            .collect();
        RowPlan {
            fts,
            row_ft,
            generation: None,
        }
    }

    /// Batch rows.
    pub fn len(&self) -> usize {
        self.row_ft.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.row_ft.is_empty()
    }

    /// The distinct fine-tunes, in order of first appearance.
    pub fn fine_tunes(&self) -> &[Arc<FineTuneDeltas>] {
        &self.fts
    }

    /// Row `b`'s fine-tune, as an index into [`RowPlan::fine_tunes`].
    pub fn fine_tune_of(&self, b: usize) -> Option<usize> {
        self.row_ft.get(b).copied().flatten().map(|i| i as usize)
    }

    /// Row `b`'s fine-tune.
    pub fn fine_tune(&self, b: usize) -> Option<&Arc<FineTuneDeltas>> {
        self.fine_tune_of(b).map(|i| &self.fts[i])
    }
}

/// A [`RowPlan`] kept for the forward pass it was made in: the pass's row tags (one `Arc` per pass,
/// held so its address is not reused) and the registry's generation. Weak references: the cache keeps
/// no evicted fine-tune's deltas on the device.
struct CachedPlan {
    tags: RowTags,
    generation: u64,
    fts: Vec<Weak<FineTuneDeltas>>,
    row_ft: Arc<[Option<u32>]>,
}

impl fmt::Debug for DeltaRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeltaRegistry")
            .field("resident", &self.names())
            .finish()
    }
}

impl DeltaRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `deltas` the resident deltas of its fine-tune (replacing any previous ones).
    pub fn insert(&self, deltas: Arc<FineTuneDeltas>) {
        let name = deltas.name.clone();
        let old = {
            let mut map = self.write();
            let old = map.insert(name.clone(), deltas.clone());
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let at = (slots.iter())
                .position(|s| s.as_ref().is_some_and(|f| f.name == name))
                .or_else(|| slots.iter().position(Option::is_none))
                .unwrap_or_else(|| {
                    slots.push(None);
                    slots.len() - 1
                });
            slots[at] = Some(deltas);
            self.generation.fetch_add(1, Ordering::Relaxed);
            old
        };
        self.clear_layer_plans();
        drop(old);
    }

    /// Removes fine-tune `name`'s deltas; returns them if they were resident. The layers' cached plans
    /// are dropped with it (they may hold its deltas): once the caller drops the returned deltas (and
    /// any forward pass in flight ends), their device memory is free.
    pub fn remove(&self, name: &str) -> Option<Arc<FineTuneDeltas>> {
        let out = {
            let mut map = self.write();
            let out = map.remove(name);
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            for s in slots.iter_mut() {
                if s.as_ref().is_some_and(|f| &*f.name == name) {
                    *s = None;
                }
            }
            self.generation.fetch_add(1, Ordering::Relaxed);
            out
        };
        self.clear_layer_plans();
        out
    }

    /// A new layer's plan slot, emptied with the others by every change of the resident set.
    fn plan_slot(&self) -> Arc<PlanSlot> {
        let slot = Arc::new(PlanSlot::default());
        let mut slots = self.layer_plans.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|w| w.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        slot
    }

    /// Empties every layer's plan slot. Called after the generation changed: a layer stores a plan only
    /// under its slot's lock and only while the plan's generation is current, so no plan made before the
    /// change is stored after this (see [`DeltaLinear::layer_plan`]).
    fn clear_layer_plans(&self) {
        let slots: Vec<Arc<PlanSlot>> = {
            let slots = self.layer_plans.lock().unwrap_or_else(|e| e.into_inner());
            slots.iter().filter_map(Weak::upgrade).collect()
        };
        for slot in slots {
            let old = slot.plan.lock().unwrap_or_else(|e| e.into_inner()).take();
            drop(old);
            let old = slot.slots.lock().unwrap_or_else(|e| e.into_inner()).take();
            drop(old);
        }
    }

    /// The pass's segments by fine-tune slot for `m` input rows (`m / plan.len()` per batch row), built
    /// once per pass (and reused by a later pass with the same slot layout); `None` when the row plan was
    /// resolved under an older generation (its fine-tunes' slots may be gone).
    fn slot_segments(
        &self,
        plan: &RowPlan,
        m: usize,
        device: &Device,
    ) -> CResult<Option<Arc<SlotSegments>>> {
        let Some(generation) = plan.generation else {
            return Ok(None);
        };
        let mut cached = self.slot_segments.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cached.as_ref().filter(|c| {
            c.generation == generation
                && Arc::ptr_eq(&c.row_ft, &plan.row_ft)
                && c.segments.rows() == m
                && c.segments.device().same_device(device)
        }) {
            return Ok(Some(c.segments.clone()));
        }
        let slot_of: Vec<usize> = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            if self.generation.load(Ordering::Relaxed) != generation {
                return Ok(None);
            }
            let found: Option<Vec<usize>> = (plan.fts.iter())
                .map(|f| (slots.iter()).position(|s| s.as_ref().is_some_and(|s| Arc::ptr_eq(s, f))))
                .collect();
            match found {
                Some(v) => v,
                None => return Ok(None),
            }
        };
        let rows = plan.len();
        if rows == 0 || !m.is_multiple_of(rows) {
            candle_core::bail!("{m} input rows do not split into {rows} batch rows");
        }
        let per = m / rows;
        let row_slots: Vec<Option<usize>> = (0..m)
            .map(|i| plan.fine_tune_of(i / per).map(|f| slot_of[f]))
            .collect();
        if let Some(c) = cached
            .as_mut()
            .filter(|c| c.row_slots == row_slots && c.segments.device().same_device(device))
        {
            c.row_ft = plan.row_ft.clone();
            c.generation = generation;
            return Ok(Some(c.segments.clone()));
        }
        let segments = Arc::new(SlotSegments::new(&row_slots, device));
        self.segment_builds.fetch_add(1, Ordering::Relaxed);
        *cached = Some(CachedSegments {
            row_ft: plan.row_ft.clone(),
            generation,
            row_slots,
            segments: segments.clone(),
        });
        Ok(Some(segments))
    }

    /// Turns the slot tables on or off for the layers of this registry only (`None`: follow the process
    /// setting, [`set_slot_tables`]): for tests and benchmarks that compare both paths in one process.
    pub fn force_slot_tables(&self, on: Option<bool>) {
        let mode = match on {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        };
        self.slot_mode.store(mode, Ordering::Relaxed);
    }

    /// Turns the one-op norm delta on or off for this registry's norms only (`None`: follow the process
    /// setting, [`set_fused_norm_deltas`]): for tests and benchmarks that compare both in one process.
    pub fn force_fused_norm_deltas(&self, on: Option<bool>) {
        let mode = match on {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        };
        self.norm_mode.store(mode, Ordering::Relaxed);
    }

    /// Whether this registry's norms add their deltas in one op
    /// ([`DeltaRegistry::force_fused_norm_deltas`], else [`set_fused_norm_deltas`]).
    pub fn uses_fused_norm_deltas(&self) -> bool {
        match self.norm_mode.load(Ordering::Relaxed) {
            0 => fused_norm_deltas(),
            m => m == 1,
        }
    }

    /// Whether this registry's layers use the slot tables ([`DeltaRegistry::force_slot_tables`], else
    /// [`set_slot_tables`]).
    pub fn uses_slot_tables(&self) -> bool {
        match self.slot_mode.load(Ordering::Relaxed) {
            0 => slot_tables(),
            m => m == 1,
        }
    }

    /// Segment tables built so far by the passes ([`set_slot_tables`]; for tests and benchmarks).
    pub fn slot_segment_builds(&self) -> usize {
        self.segment_builds.load(Ordering::Relaxed)
    }

    /// Per-layer slot tables built so far ([`set_slot_tables`]; for tests and benchmarks).
    pub fn slot_table_builds(&self) -> usize {
        self.slot_table_builds.load(Ordering::Relaxed)
    }

    /// How the linear layers' calls with deltas found their launches so far (`deltazip serve`'s
    /// `/metrics`: `deltazip_linear_delta_calls_total`): how often a batch change cost a layer a new plan.
    pub fn plan_counts(&self) -> PlanCounts {
        let c = |o: Outcome| self.plan_counts[o as usize].load(Ordering::Relaxed);
        PlanCounts {
            plan_reused: c(Outcome::PlanReused),
            plan_built: c(Outcome::PlanBuilt),
            slot_shared: c(Outcome::SlotShared),
            slot_fallback: c(Outcome::SlotFallback),
        }
    }

    fn count_plan(&self, outcome: Outcome) {
        self.plan_counts[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many linear layers hold a cached plan (for tests and metrics).
    pub fn cached_layer_plans(&self) -> usize {
        let slots = self.layer_plans.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|s| s.plan.lock().unwrap_or_else(|e| e.into_inner()).is_some())
            .count()
    }

    /// Fine-tune `name`'s deltas, if resident.
    pub fn get(&self, name: &str) -> Option<Arc<FineTuneDeltas>> {
        self.read().get(name).cloned()
    }

    /// The resident fine-tunes, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.read().keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    /// Device bytes of every resident fine-tune.
    pub fn bytes(&self) -> u64 {
        self.read().values().map(|d| d.bytes).sum()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Arc<FineTuneDeltas>>> {
        self.resident.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Arc<str>, Arc<FineTuneDeltas>>> {
        self.resident.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The RMS-norm deltas of every row of a batch, `[n, rows, width]` in `dtype`, with the norms' names
    /// (row `i` of dim 0 is `names[i]`) and `[width]` ones: built once per batch of rows and reused by
    /// each norm of the forward pass (and by later passes over the same rows). `None` when the rows'
    /// fine-tunes do not all have the same norms stacked (then each norm call builds its own table).
    fn norm_table(&self, plan: &RowPlan, dtype: DType) -> CResult<Option<NormParts>> {
        let mut cached = self.norm_table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cached.as_ref().filter(|c| c.serves(plan, dtype)) {
            return Ok(Some((c.names.clone(), c.table.clone(), c.ones.clone())));
        }
        let mut stacks = plan.fine_tunes().iter().map(|f| f.norms.as_ref());
        let Some(Some(first)) = stacks.next() else {
            return Ok(None);
        };
        if !stacks.all(|s| s.is_some_and(|s| s.names == first.names)) {
            return Ok(None);
        }
        let zero = first.stack.zeros_like()?;
        let parts: Vec<Tensor> = (0..plan.len())
            .map(|b| match plan.fine_tune(b).and_then(|f| f.norms.as_ref()) {
                Some(s) => s.stack.clone(),
                None => zero.clone(),
            })
            .collect();
        let table = Tensor::stack(&parts, 1)?.to_dtype(dtype)?;
        let ones = Tensor::ones(table.dim(2)?, dtype, table.device())?;
        let names = first.names.clone();
        *cached = Some(NormTable {
            rows: (0..plan.len())
                .map(|b| plan.fine_tune(b).map(Arc::downgrade))
                .collect(),
            dtype,
            names: names.clone(),
            table: table.clone(),
            ones: ones.clone(),
        });
        Ok(Some((names, table, ones)))
    }

    /// The fine-tune of each batch row under the current row tags (`None`: the base, or a name not
    /// resident), or `None` when no scope is active or no row has a resident fine-tune.
    fn rows(&self) -> Option<RowPlan> {
        let tags = current_row_tags()?;
        let generation = self.generation.load(Ordering::Relaxed);
        let mut cached = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cached
            .as_ref()
            .filter(|c| Arc::ptr_eq(&c.tags, &tags) && c.generation == generation)
        {
            let fts: Option<Vec<Arc<FineTuneDeltas>>> = c.fts.iter().map(Weak::upgrade).collect();
            if let Some(fts) = fts {
                return (!fts.is_empty()).then(|| RowPlan {
                    fts,
                    row_ft: c.row_ft.clone(),
                    generation: Some(generation),
                });
            }
        }
        let plan = {
            let map = self.read();
            let rows: Vec<Option<Arc<FineTuneDeltas>>> = tags
                .iter()
                .map(|t| t.as_ref().and_then(|n| map.get(n).cloned()))
                .collect();
            RowPlan {
                generation: Some(generation),
                ..RowPlan::of_rows(&rows)
            }
        };
        *cached = Some(CachedPlan {
            tags,
            generation,
            fts: plan.fts.iter().map(Arc::downgrade).collect(),
            row_ft: plan.row_ft.clone(),
        });
        if plan.fts.is_empty() {
            return None;
        }
        self.widest.fetch_max(plan.fts.len(), Ordering::Relaxed);
        Some(plan)
    }

    /// Counts one token for each row of the current batch under its requested model, and the pass
    /// ([`PassCounts`]) (called by the output head, once per forward pass).
    fn count_tokens(&self) {
        let Some(tags) = current_row_tags() else {
            return;
        };
        let names: Vec<Option<&str>> = tags.iter().map(|t| t.as_deref()).collect();
        let (models, runs) = models_and_runs(&names);
        for (counter, n) in self.passes.iter().zip([1, tags.len(), models, runs]) {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        let mut map = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        for t in &names {
            let name = t.unwrap_or("default");
            match map.get_mut(name) {
                Some(n) => *n += 1,
                None => {
                    map.insert(name.to_string(), 1);
                }
            }
        }
    }

    /// Tokens computed so far by every output head wrapped over this registry, by requested model
    /// (`default` for rows with no model name).
    pub fn tokens(&self) -> std::collections::BTreeMap<String, u64> {
        let map = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// The forward passes the output heads wrapped over this registry have ended so far: their rows,
    /// distinct requested models and runs of rows of one model.
    pub fn pass_counts(&self) -> PassCounts {
        let [passes, rows, models, runs] = &self.passes;
        PassCounts {
            passes: passes.load(Ordering::Relaxed),
            rows: rows.load(Ordering::Relaxed),
            models: models.load(Ordering::Relaxed),
            runs: runs.load(Ordering::Relaxed),
        }
    }

    /// The forward-pass profile of every module wrapped over this registry (on with `DZ_PROFILE=1`).
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The most distinct fine-tunes one forward pass has served so far (batches mixing fine-tunes
    /// show here).
    pub fn widest_batch(&self) -> usize {
        self.widest.load(Ordering::Relaxed)
    }

    /// Wraps `base` (the linear layer named `name`) in a [`DeltaLinear`] over this registry.
    pub fn wrap_layer(
        self: &Arc<Self>,
        name: &str,
        base: Arc<dyn QuantMethod>,
    ) -> Arc<dyn QuantMethod> {
        Arc::new(DeltaLinear {
            base,
            name: name.to_string(),
            registry: self.clone(),
            plan: self.plan_slot(),
        })
    }
}

/// The host's linear-layer hook over a [`DeltaRegistry`]: every linear layer of the model becomes a
/// [`DeltaLinear`], every token embedding and RMS norm gets a delta.
pub struct DeltaHook(pub Arc<DeltaRegistry>);

impl LinearHook for DeltaHook {
    fn wrap(&self, name: &str, layer: Arc<dyn QuantMethod>) -> CResult<Arc<dyn QuantMethod>> {
        Ok(self.0.wrap_layer(name, layer))
    }

    fn module(&self, name: &str, kind: ModuleKind) -> CResult<Option<Arc<dyn ModuleDelta>>> {
        Ok(Some(Arc::new(ModuleDeltas {
            name: name.to_string(),
            kind,
            registry: self.0.clone(),
        })))
    }
}

/// Per-row deltas of a token embedding or an RMS norm.
struct ModuleDeltas {
    name: String,
    kind: ModuleKind,
    registry: Arc<DeltaRegistry>,
}

impl fmt::Debug for ModuleDeltas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModuleDeltas")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

/// Checks that a module input's leading dimension is the batch of `rows` row tags.
fn batch_of(name: &str, t: &Tensor, rows: usize) -> CResult<()> {
    let b = t.dims().first().copied().unwrap_or(0);
    if b != rows {
        candle_core::bail!("{name}: a batch of {b} rows under {rows} row tags");
    }
    Ok(())
}

impl ModuleDelta for ModuleDeltas {
    fn forward(&self, input: &Tensor, base_out: Tensor) -> CResult<Tensor> {
        let profile = &self.registry.profile;
        let Some(plan) = profile.time(Part::RowLookup, input.device(), false, || {
            Ok(self.registry.rows())
        })?
        else {
            return Ok(base_out);
        };
        let part = match self.kind {
            ModuleKind::Embedding => Part::EmbeddingDelta,
            ModuleKind::RmsNorm { .. } => Part::NormDelta,
        };
        profile.time(part, input.device(), true, || {
            let _s = trace::span(match self.kind {
                ModuleKind::Embedding => "embedding delta: the whole call",
                ModuleKind::RmsNorm { .. } => "norm delta: the whole call",
            });
            self.add_deltas(input, base_out, &plan)
        })
    }
}

impl ModuleDeltas {
    /// `base_out` plus the deltas of each row's fine-tune (the plan's row `b` for batch row `b`).
    fn add_deltas(&self, input: &Tensor, base_out: Tensor, plan: &RowPlan) -> CResult<Tensor> {
        let rows = plan.len();
        match self.kind {
            ModuleKind::Embedding => {
                let deltas: Vec<Option<&DeviceDelta>> = (0..rows)
                    .map(|b| plan.fine_tune(b).and_then(|f| f.embedding.get(&self.name)))
                    .collect();
                if deltas.iter().all(Option::is_none) {
                    return Ok(base_out);
                }
                batch_of(&self.name, input, rows)?;
                // Runs of consecutive rows with the same delta: one op per run.
                let mut pieces = Vec::new();
                let mut start = 0;
                while start < deltas.len() {
                    let mut end = start + 1;
                    while end < deltas.len() && same(deltas[end], deltas[start]) {
                        end += 1;
                    }
                    let out = base_out.narrow(0, start, end - start)?;
                    pieces.push(match deltas[start] {
                        None => out,
                        Some(d) => {
                            let ids = input.narrow(0, start, end - start)?.contiguous()?;
                            // The ids indexed the base embedding already: on CUDA they are not read
                            // back to be checked again (a synchronization per run of rows).
                            embedding_delta_add_unchecked(&ids, &out.contiguous()?, d)?
                        }
                    });
                    start = end;
                }
                Tensor::cat(&pieces, 0)
            }
            ModuleKind::RmsNorm { eps } => {
                let dtype = base_out.dtype();
                // Each row's delta of this norm, `[rows, 1, width]` in `dtype` (zeros for the base): a
                // slice of the batch's table, or (fine-tunes with differing norms) stacked here.
                let (d, ones) = match self.registry.norm_table(plan, dtype)? {
                    // `[1, rows, width]`, contiguous.
                    Some((names, table, ones)) => match names.binary_search(&self.name) {
                        Ok(i) => (table.narrow(0, i, 1)?, Some(ones)),
                        Err(_) => return Ok(base_out), // no row's fine-tune changes this norm
                    },
                    None => {
                        let deltas: Vec<Option<&Tensor>> = (0..rows)
                            .map(|b| plan.fine_tune(b).and_then(|f| f.norm.get(&self.name)))
                            .collect();
                        let Some(width) = deltas.iter().flatten().map(|t| t.elem_count()).next()
                        else {
                            return Ok(base_out);
                        };
                        let zero = Tensor::zeros(width, DType::F32, input.device())?;
                        let table: Vec<Tensor> = deltas
                            .iter()
                            .map(|d| d.cloned().unwrap_or_else(|| zero.clone()))
                            .collect();
                        (
                            Tensor::stack(&table, 0)?.unsqueeze(1)?.to_dtype(dtype)?,
                            None,
                        )
                    }
                };
                batch_of(&self.name, input, rows)?;
                let width = d.dims().last().copied().unwrap_or(0);
                let mut shape = vec![rows];
                shape.extend(std::iter::repeat_n(1, input.rank().saturating_sub(2)));
                shape.push(width);
                let d = if d.dims() == shape.as_slice() {
                    d
                } else {
                    d.contiguous()?.reshape(shape)?
                };
                // rms_norm(x) * (g + dg) = rms_norm(x) * g + (x / rms(x)) * dg, per row.
                if self.registry.uses_fused_norm_deltas() && input.dtype() == dtype {
                    let table = d.contiguous()?.reshape((rows, width))?;
                    return norm_delta_add(
                        &input.contiguous()?,
                        &base_out.contiguous()?,
                        &table,
                        eps,
                    );
                }
                let ones = match ones {
                    Some(o) if o.dtype() == input.dtype() => o,
                    _ => Tensor::ones(width, input.dtype(), input.device())?,
                };
                let unit = candle_nn::ops::rms_norm(&input.contiguous()?, &ones, eps as f32)?;
                base_out + unit.to_dtype(dtype)?.broadcast_mul(&d)?
            }
        }
    }
}

fn same(a: Option<&DeviceDelta>, b: Option<&DeviceDelta>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

/// A base linear layer (any host `QuantMethod`) plus the deltas of the resident fine-tunes: row `r` of a
/// batch computes `x_r · (W + D_f)ᵀ (+ b + Δb_f)` for the fine-tune `f` its row tag names, and the base's
/// `x_r · Wᵀ (+ b)` when it names none (or one that is not resident, or leaves this layer alone).
pub struct DeltaLinear {
    base: Arc<dyn QuantMethod>,
    name: String,
    registry: Arc<DeltaRegistry>,
    /// The plan of the last batch layout this layer saw (registered with the registry, which empties it
    /// when the resident set changes).
    plan: Arc<PlanSlot>,
}

/// One linear layer's caches, emptied by the registry on every insert and remove: the [`LayerPlan`] of
/// the last batch layout, and the layer's [`LayerSlots`] ([`set_slot_tables`]).
#[derive(Default)]
struct PlanSlot {
    plan: Mutex<Option<Arc<LayerPlan>>>,
    slots: Mutex<Option<Arc<LayerSlots>>>,
}

/// One linear layer's deltas by fine-tune slot for one generation of the registry (every resident
/// fine-tune's, so that any batch of them shares the pass's segment table), built on the layer's first
/// call after an insert or remove. It holds the deltas (clones): the registry drops it on every change.
struct LayerSlots {
    generation: u64,
    deltas: SlotDeltas,
    /// Whether a resident fine-tune has a bias delta here (then the layer takes its [`LayerPlan`]).
    bias: bool,
}

/// As [`LayerPlan`]'s drop: the device's context is made current first.
impl Drop for LayerSlots {
    fn drop(&mut self) {
        crate::gpu_mem::bind(self.deltas.device());
    }
}

/// What one linear layer adds for one batch layout, built once and reused while the layout repeats:
/// every decode step calls each layer with the same rows, and consecutive steps of one batch see the same
/// layout again (session 11's host profile: 86 us of CPU per linear-delta call, ~47 us of it the sbmm's
/// per-call table work with 32 deltas).
///
/// Keyed by the batch's fine-tunes (by identity: weak references, so that their addresses are not reused
/// while the entry lives, and a fine-tune's deltas never change), which of them each row uses, the input
/// rows and the dtype; a hit compares those (pointers first) and allocates nothing. It holds the layer's
/// deltas (in the sbmm plan): the registry drops every layer's plan when a fine-tune is inserted or
/// removed.
struct LayerPlan {
    fts: Vec<Weak<FineTuneDeltas>>,
    row_ft: Arc<[Option<u32>]>,
    m: usize,
    n: usize,
    dtype: DType,
    /// The weight deltas' sbmm, when a row's fine-tune has one for this layer.
    sbmm: Option<SbmmPlan>,
    /// The bias deltas per batch row, `[rows, 1, n]` in `dtype` (zeros for rows without one), when a
    /// row's fine-tune has one: broadcast over each row's inputs at use, so a prefill-sized plan does
    /// not keep an `[m, n]` table per biased layer.
    bias: Option<Tensor>,
}

impl LayerPlan {
    fn serves(&self, plan: &RowPlan, m: usize, n: usize, dtype: DType) -> bool {
        self.m == m
            && self.n == n
            && self.dtype == dtype
            && (Arc::ptr_eq(&self.row_ft, &plan.row_ft) || self.row_ft[..] == plan.row_ft[..])
            && self.fts.len() == plan.fts.len()
            && (self.fts.iter())
                .zip(&plan.fts)
                .all(|(w, f)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(f)))
    }
}

/// A plan may hold the last reference to deltas (after their fine-tune left the registry): the device's
/// context is made current first, as for [`FineTuneDeltas`].
impl Drop for LayerPlan {
    fn drop(&mut self) {
        if let Some(p) = &self.sbmm {
            crate::gpu_mem::bind(p.device());
        }
    }
}

impl fmt::Debug for DeltaLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeltaLinear")
            .field("name", &self.name)
            .field("base", &self.base)
            .finish()
    }
}

impl DeltaLinear {
    /// `base_out + deltas` for input `x`, with the plan's row `b` for batch row `b`.
    fn add_deltas(&self, x: &Tensor, base_out: Tensor, plan: &RowPlan) -> CResult<Tensor> {
        let k = x.dim(candle_core::D::Minus1)?;
        let n = base_out.dim(candle_core::D::Minus1)?;
        let m = x.elem_count() / k.max(1);
        if self.registry.uses_slot_tables() {
            if let Some(y) = self.add_slot_deltas(x, &base_out, plan, (m, k, n))? {
                self.registry.count_plan(Outcome::SlotShared);
                return Ok(y);
            }
            self.registry.count_plan(Outcome::SlotFallback);
        }
        let lp = {
            let _s = trace::span("linear delta: the layer plan");
            self.layer_plan(plan, m, n, base_out.dtype(), x.device())?
        };
        if lp.sbmm.is_none() && lp.bias.is_none() {
            return Ok(base_out);
        }
        let shape = base_out.shape().clone();
        let mut out = base_out.reshape((m, n))?;
        if let Some(p) = &lp.sbmm {
            let x2 = {
                let _s = trace::span("linear delta: reshape the inputs");
                out = out.contiguous()?;
                x.reshape((m, k))?.contiguous()?
            };
            out = sbmm_planned(&x2, &out, p)?;
        }
        if let Some(bias) = &lp.bias {
            let rows = bias.dim(0)?;
            out = out
                .reshape((rows, m / rows, n))?
                .broadcast_add(bias)?
                .reshape((m, n))?;
        }
        out.reshape(shape)
    }

    /// This layer's plan for the batch layout: the cached one when it serves, else a new one, cached when
    /// the row plan's generation is still the registry's. The check and the store happen under the slot's
    /// lock, and the registry bumps its generation before it empties the slots: a plan of fine-tunes
    /// resolved before a change is never stored after the change emptied the slot.
    fn layer_plan(
        &self,
        plan: &RowPlan,
        m: usize,
        n: usize,
        dtype: DType,
        device: &Device,
    ) -> CResult<Arc<LayerPlan>> {
        let mut slot = self.plan.plan.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lp) = slot.as_ref().filter(|lp| lp.serves(plan, m, n, dtype)) {
            self.registry.count_plan(Outcome::PlanReused);
            return Ok(lp.clone());
        }
        self.registry.count_plan(Outcome::PlanBuilt);
        let lp = {
            let _s = trace::span("layer plan: build");
            Arc::new(self.build_plan(plan, m, n, dtype, device)?)
        };
        let current = self.registry.generation.load(Ordering::Relaxed);
        let _s = trace::span("layer plan: store it, drop the old one");
        *slot = (plan.generation == Some(current)).then(|| lp.clone());
        Ok(lp)
    }

    /// `base_out + deltas` through the slot tables, or `None` when they cannot serve this call (the pass
    /// resolved its rows under an older generation, a bias delta, or a batch the shared launch cannot
    /// express: `try_sbmm_slots`); the caller then takes the layer plan.
    fn add_slot_deltas(
        &self,
        x: &Tensor,
        base_out: &Tensor,
        plan: &RowPlan,
        (m, k, n): (usize, usize, usize),
    ) -> CResult<Option<Tensor>> {
        let Some(generation) = plan.generation else {
            return Ok(None);
        };
        let table = {
            let _s = trace::span("slot tables: the layer's table");
            self.layer_slots(generation, x.device())?
        };
        let Some(table) = table else {
            return Ok(None);
        };
        if table.bias {
            return Ok(None);
        }
        let segments = {
            let _s = trace::span("slot tables: the pass's segments");
            self.registry.slot_segments(plan, m, x.device())?
        };
        let Some(segments) = segments else {
            return Ok(None);
        };
        if segments.slots().all(|s| table.deltas.get(s).is_none()) {
            return Ok(Some(base_out.clone()));
        }
        let x2 = x.reshape((m, k))?.contiguous()?;
        let b2 = base_out.reshape((m, n))?.contiguous()?;
        let _s = trace::span("slot tables: the shared launch");
        try_sbmm_slots(&x2, &b2, &segments, &table.deltas)?
            .map(|y| y.reshape(base_out.shape()))
            .transpose()
    }

    /// This layer's slot table for `generation`: the cached one, else one built from the registry's
    /// slots and cached, when `generation` is still the registry's (`None` otherwise: a pass that
    /// resolved its rows before a change).
    fn layer_slots(&self, generation: u64, device: &Device) -> CResult<Option<Arc<LayerSlots>>> {
        let mut cached = self.plan.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cached.as_ref().filter(|t| t.generation == generation) {
            return Ok(Some(t.clone()));
        }
        let mut deltas = SlotDeltas::new(device);
        let mut bias = false;
        {
            let slots = self
                .registry
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if self.registry.generation.load(Ordering::Relaxed) != generation {
                return Ok(None);
            }
            for (i, f) in slots.iter().enumerate() {
                let d = f.as_ref().and_then(|f| f.linear.get(&self.name));
                deltas
                    .set(i, d)
                    .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", self.name)))?;
                bias |= f.as_ref().is_some_and(|f| f.bias.contains_key(&self.name));
            }
        }
        self.registry
            .slot_table_builds
            .fetch_add(1, Ordering::Relaxed);
        let t = Arc::new(LayerSlots {
            generation,
            deltas,
            bias,
        });
        // Stored under the lock the registry empties after bumping the generation (as `layer_plan`).
        if self.registry.generation.load(Ordering::Relaxed) == generation {
            *cached = Some(t.clone());
        }
        Ok(Some(t))
    }

    fn build_plan(
        &self,
        plan: &RowPlan,
        m: usize,
        n: usize,
        dtype: DType,
        device: &Device,
    ) -> CResult<LayerPlan> {
        let mut lp = LayerPlan {
            fts: plan.fts.iter().map(Arc::downgrade).collect(),
            row_ft: plan.row_ft.clone(),
            m,
            n,
            dtype,
            sbmm: None,
            bias: None,
        };
        // Per distinct fine-tune (not per row): its delta and bias delta of this layer.
        let fts = plan.fine_tunes();
        let weight: Vec<Option<&DeviceDelta>> =
            fts.iter().map(|f| f.linear.get(&self.name)).collect();
        let bias: Vec<Option<&Tensor>> = fts.iter().map(|f| f.bias.get(&self.name)).collect();
        if weight.iter().all(Option::is_none) && bias.iter().all(Option::is_none) {
            return Ok(lp);
        }
        let rows = plan.len();
        if rows == 0 || !m.is_multiple_of(rows) {
            candle_core::bail!(
                "{}: {m} input rows do not split into {rows} batch rows",
                self.name
            );
        }
        let per = m / rows;

        // Weight deltas: one sbmm over the fine-tunes present, slots in order of first appearance over
        // the rows (the plan's fine-tunes are in that order; two names sharing one delta share a slot).
        if weight.iter().any(Option::is_some) {
            let mut used: Vec<&DeviceDelta> = Vec::new();
            let slot_of_ft: Vec<Option<usize>> = weight
                .iter()
                .map(|d| {
                    d.map(|d| match used.iter().position(|u| std::ptr::eq(*u, d)) {
                        Some(s) => s,
                        None => {
                            used.push(d);
                            used.len() - 1
                        }
                    })
                })
                .collect();
            let token_slots: Vec<Option<usize>> = (0..m)
                .map(|i| plan.fine_tune_of(i / per).and_then(|f| slot_of_ft[f]))
                .collect();
            lp.sbmm = Some(SbmmPlan::new(
                &used,
                &Segment::runs(&token_slots),
                m,
                dtype,
                device,
            )?);
        }

        // Bias deltas: one table row per batch row (zeros for rows without one), repeated per input row.
        if let Some(width) = bias.iter().flatten().map(|t| t.elem_count()).next() {
            if width != n {
                candle_core::bail!("{}: a bias delta of {width} for {n} outputs", self.name);
            }
            let zero = Tensor::zeros(n, DType::F32, device)?;
            let table: Vec<Tensor> = (0..rows)
                .map(|b| {
                    plan.fine_tune_of(b)
                        .and_then(|f| bias[f])
                        .cloned()
                        .unwrap_or_else(|| zero.clone())
                })
                .collect();
            lp.bias = Some(Tensor::stack(&table, 0)?.to_dtype(dtype)?.unsqueeze(1)?);
        }
        Ok(lp)
    }
}

impl QuantizedSerde for DeltaLinear {
    fn name(&self) -> &'static str {
        "deltazip-delta-linear"
    }
}

impl QuantMethod for DeltaLinear {
    fn new(_method: QuantMethodConfig) -> CResult<Self> {
        candle_core::bail!(
            "DeltaLinear is built by dz-loader's DeltaRegistry, not from a QuantMethodConfig"
        )
    }

    fn dequantize_w(&self) -> CResult<Tensor> {
        self.base.dequantize_w()
    }

    fn forward(&self, a: &Tensor) -> CResult<Tensor> {
        let profile = &self.registry.profile;
        if self.name == TIED_HEAD {
            self.registry.count_tokens();
            profile.head_at(Instant::now());
        }
        let dev = a.device();
        // A prompt step: more than one token per sequence (`a` is [sequences, tokens, features]).
        let prefill = a.rank() == 3 && a.dim(1).is_ok_and(|t| t > 1);
        let (base_part, delta_part) = if prefill {
            (Part::BaseLinearPrefill, Part::LinearDeltaPrefill)
        } else {
            (Part::BaseLinear, Part::LinearDelta)
        };
        let base_out = profile.time(base_part, dev, true, || {
            let _s = trace::span("linear: the base layer");
            self.base.forward(a)
        })?;
        let rows = {
            let _s = trace::span("linear: the row lookup");
            profile.time(Part::RowLookup, dev, false, || Ok(self.registry.rows()))?
        };
        let out = match rows {
            None => base_out,
            Some(plan) => profile.time(delta_part, dev, true, || {
                let _s = trace::span("linear delta: the whole call");
                self.add_deltas(a, base_out, &plan)
            })?,
        };
        if self.name == TIED_HEAD {
            profile.head_wait(dev)?;
            profile.pass_end(Instant::now());
        }
        Ok(out)
    }

    fn quantized_act_type(&self) -> Option<DType> {
        self.base.quantized_act_type()
    }

    fn dtype_and_device(&self) -> (DType, Device) {
        self.base.dtype_and_device()
    }

    fn add_delta_w(&self, delta: &Tensor) -> CResult<Arc<dyn QuantMethod>> {
        Ok(Arc::new(Self {
            base: self.base.add_delta_w(delta)?,
            name: self.name.clone(),
            registry: self.registry.clone(),
            plan: self.registry.plan_slot(),
        }))
    }

    fn apply_isq(
        self: Arc<Self>,
        _dtype: Option<IsqType>,
        _device: Device,
        _n_quantized: &AtomicUsize,
        _imatrix_weight: Option<Vec<f32>>,
        _guard: QuantizeOntoGuard,
    ) -> CResult<Arc<dyn QuantMethod>> {
        candle_core::bail!(
            "{}: in-situ quantization of a multi-tenant layer is not supported",
            self.name
        )
    }

    fn unquant_weight_bias(&self) -> Option<(Tensor, Option<Tensor>)> {
        self.base.unquant_weight_bias()
    }
}

/// A pass's distinct requested models and its runs of consecutive rows of one model, from its rows'
/// requested models in row order.
fn models_and_runs(names: &[Option<&str>]) -> (usize, usize) {
    let runs = names.chunk_by(|a, b| a == b).count();
    let mut distinct = names.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    (distinct.len(), runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fine-tune with only norm deltas: `norms[i]` is `names[i]`'s delta (width 6); `stacked` decides
    /// whether the per-step tables may be built from it.
    fn fine_tune(name: &str, values: &[[f32; 6]], stacked: bool) -> Arc<FineTuneDeltas> {
        let names = ["model.layers.0.input_layernorm", "model.norm"];
        let norm: HashMap<String, Tensor> = names
            .iter()
            .zip(values)
            .map(|(n, v)| (n.to_string(), Tensor::new(v, &Device::Cpu).unwrap()))
            .collect();
        let norms = if stacked {
            NormStack::of(&norm).unwrap()
        } else {
            None
        };
        Arc::new(FineTuneDeltas {
            name: name.into(),
            linear: HashMap::new(),
            bias: HashMap::new(),
            norm,
            norms,
            embedding: HashMap::new(),
            bytes: 0,
            device: Device::Cpu,
        })
    }

    const LAYER: &str = "model.layers.0.mlp.up_proj";
    const N: usize = 6;
    const K: usize = 64;

    /// A fine-tune with a 4-bit delta (seeded codes) for [`LAYER`] and, when `bias`, a bias delta.
    fn linear_fine_tune(name: &str, seed: u8, bias: bool) -> Arc<FineTuneDeltas> {
        use dz_format::codec::{Grid, Payload, Quant};
        let payload = Payload::Quant(Quant {
            rows: N,
            cols: K,
            grid: Grid {
                params: dz_format::QuantParams {
                    bits: 4,
                    group_size: 32,
                    symmetric: true,
                    global_scale: 1e-2,
                },
                scales: vec![half::f16::ONE; N * 2],
                zeros: None,
            },
            codes: (0..N * K)
                .map(|i| ((i * 7 + usize::from(seed) * 5) % 16) as u8)
                .collect(),
        });
        let delta = DeviceDelta::from_payload(&payload, None, &Device::Cpu).unwrap();
        let mut biases = HashMap::new();
        if bias {
            let b: Vec<f32> = (0..N)
                .map(|i| 0.25 * (i as f32 + f32::from(seed)))
                .collect();
            biases.insert(
                LAYER.to_string(),
                Tensor::from_vec(b, N, &Device::Cpu).unwrap(),
            );
        }
        Arc::new(FineTuneDeltas {
            name: name.into(),
            linear: HashMap::from([(LAYER.to_string(), delta)]),
            bias: biases,
            norm: HashMap::new(),
            norms: None,
            embedding: HashMap::new(),
            bytes: 0,
            device: Device::Cpu,
        })
    }

    /// [`LAYER`] over a seeded base weight, wrapped as the hook wraps it (its plan slot registered).
    fn linear_layer(registry: &Arc<DeltaRegistry>) -> DeltaLinear {
        let w: Vec<f32> = (0..N * K).map(|i| (i as f32 * 0.13).sin()).collect();
        let w = Tensor::from_vec(w, (N, K), &Device::Cpu).unwrap();
        let base = <mistralrs_quant::UnquantLinear as QuantMethod>::new(
            QuantMethodConfig::Unquantized(candle_nn::Linear::new(w, None)),
        )
        .unwrap();
        DeltaLinear {
            base: Arc::new(base),
            name: LAYER.to_string(),
            registry: registry.clone(),
            plan: registry.plan_slot(),
        }
    }

    /// What the layer must give under `rows` (each row's fine-tune, `None`: the base), computed with the
    /// plain sbmm and the bias table built here.
    fn expected(
        layer: &DeltaLinear,
        x: &Tensor,
        rows: &[Option<&Arc<FineTuneDeltas>>],
    ) -> Vec<f32> {
        let m = rows.len();
        let x2 = x.reshape((m, K)).unwrap();
        let base = layer.base.forward(&x2).unwrap();
        let mut used: Vec<&DeviceDelta> = Vec::new();
        let slots: Vec<Option<usize>> = rows
            .iter()
            .map(|f| {
                f.map(|f| {
                    let d = &f.linear[LAYER];
                    used.iter()
                        .position(|u| std::ptr::eq(*u, d))
                        .unwrap_or_else(|| {
                            used.push(d);
                            used.len() - 1
                        })
                })
            })
            .collect();
        let y = dz_candle_ops::sbmm(&x2, &base, &used, &Segment::runs(&slots)).unwrap();
        let zero = Tensor::zeros(N, DType::F32, &Device::Cpu).unwrap();
        let bias: Vec<Tensor> = rows
            .iter()
            .map(|f| f.and_then(|f| f.bias.get(LAYER)).unwrap_or(&zero).clone())
            .collect();
        let y = if rows.iter().flatten().any(|f| f.bias.contains_key(LAYER)) {
            (y + Tensor::stack(&bias, 0).unwrap()).unwrap()
        } else {
            y
        };
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn cached(layer: &DeltaLinear) -> Option<Arc<LayerPlan>> {
        layer.plan.plan.lock().unwrap().clone()
    }

    /// The pass counters' models and runs: a model's rows in two places are two runs, the base (no
    /// model) counts as a model, and an empty pass has neither.
    #[test]
    fn a_pass_counts_its_models_and_runs_of_rows() {
        use super::models_and_runs;
        let (a, b, c) = (Some("a"), Some("b"), Some("c"));
        assert_eq!(models_and_runs(&[a, None, b, c, a]), (4, 5));
        assert_eq!(models_and_runs(&[None, a, a, b, c]), (4, 4));
        assert_eq!(models_and_runs(&[a, a, a]), (1, 1));
        assert_eq!(models_and_runs(&[]), (0, 0));
    }

    /// A linear layer builds its plan on the first call of a batch layout and reuses it on the next calls
    /// of the pass and of later passes over the same rows (new row tags, same fine-tunes); another layout
    /// rebuilds it; the outputs are the plain sbmm's (and bias table's) bit for bit every time. Removing
    /// a fine-tune drops every cached plan (they hold deltas), and a pass that resolved its rows before
    /// the removal does not cache one after it.
    #[test]
    fn linear_layers_reuse_their_plan_while_the_batch_repeats() {
        use mistralrs_quant::with_row_tags;
        let registry = Arc::new(DeltaRegistry::new());
        let a = linear_fine_tune("a", 1, false);
        let b = linear_fine_tune("b", 2, true);
        registry.insert(a.clone());
        registry.insert(b.clone());
        let layer = linear_layer(&registry);
        // The layer plans, whatever another test set the process-wide slot-table switch to.
        registry.force_slot_tables(Some(false));
        let tag = |t: &str| Some(Arc::<str>::from(t));
        let x: Vec<f32> = (0..4 * K).map(|i| (i as f32 * 0.71).cos()).collect();
        let x = Tensor::from_vec(x, (4, 1, K), &Device::Cpu).unwrap();
        let run = |tags: &RowTags| -> Vec<f32> {
            with_row_tags(Some(tags.clone()), || layer.forward(&x))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(registry.cached_layer_plans(), 0);

        let tags: RowTags = Arc::from(vec![tag("a"), None, tag("b"), tag("a")]);
        let want = expected(&layer, &x, &[Some(&a), None, Some(&b), Some(&a)]);
        assert_eq!(run(&tags), want);
        let first = cached(&layer).expect("the first call caches its plan");
        assert_eq!(registry.cached_layer_plans(), 1);
        assert_eq!(run(&tags), want);
        assert!(
            Arc::ptr_eq(&first, &cached(&layer).unwrap()),
            "the same pass reuses the plan"
        );
        let next_pass: RowTags = Arc::from(tags.to_vec());
        assert_eq!(run(&next_pass), want);
        assert!(
            Arc::ptr_eq(&first, &cached(&layer).unwrap()),
            "a pass over the same rows reuses the plan"
        );

        let other: RowTags = Arc::from(vec![tag("b"), tag("b"), None, tag("a")]);
        assert_eq!(
            run(&other),
            expected(&layer, &x, &[Some(&b), Some(&b), None, Some(&a)])
        );
        let second = cached(&layer).unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "another batch rebuilds it");
        drop(first);
        assert_eq!(run(&tags), want, "and the first batch again");
        // Built for the first batch, reused by the same pass and the next one over its rows, built for
        // the other batch and for the first one again (one plan a layer).
        assert_eq!(
            registry.plan_counts(),
            PlanCounts {
                plan_reused: 2,
                plan_built: 3,
                ..PlanCounts::default()
            }
        );

        // A pass that resolved its rows before a removal runs, but caches nothing after it.
        let in_flight = with_row_tags(Some(tags.clone()), || registry.rows()).unwrap();
        let held = Arc::downgrade(&cached(&layer).unwrap());
        drop(second);
        registry.remove("a");
        assert_eq!(
            registry.cached_layer_plans(),
            0,
            "a removal drops the plans"
        );
        assert!(held.upgrade().is_none(), "and with them their deltas");
        let base_out = layer.base.forward(&x).unwrap();
        let y = layer.add_deltas(&x, base_out, &in_flight).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        assert_eq!(
            registry.cached_layer_plans(),
            0,
            "a plan of fine-tunes resolved before the removal is not kept"
        );
        // After the removal: row "a" is the base's.
        assert_eq!(
            run(&tags),
            expected(&layer, &x, &[None, None, Some(&b), None])
        );
        assert_eq!(registry.cached_layer_plans(), 1);
        // An insert (another fine-tune's deltas) drops them too.
        let c = linear_fine_tune("c", 3, false);
        registry.insert(c.clone());
        assert_eq!(registry.cached_layer_plans(), 0);

        // Several inputs per batch row (a prompt): each row's bias delta reaches all its inputs.
        let x3: Vec<f32> = (0..6 * K).map(|i| (i as f32 * 0.37).sin()).collect();
        let x3 = Tensor::from_vec(x3, (2, 3, K), &Device::Cpu).unwrap();
        let tags3: RowTags = Arc::from(vec![tag("b"), tag("c")]);
        let got = with_row_tags(Some(tags3.clone()), || layer.forward(&x3))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let per_input = [Some(&b), Some(&b), Some(&b), Some(&c), Some(&c), Some(&c)];
        assert_eq!(got, expected(&layer, &x3, &per_input));
    }

    /// With the slot tables on, mixed batches (base rows, a fine-tune without a delta in the layer)
    /// give the layer-plan path's outputs bit for bit; the pass's segment table is built once for all
    /// layers (and reused by a later pass with the same slot layout), each layer's slot table only
    /// after an insert or remove; a removed fine-tune's slot is reused; a bias delta takes the plan.
    #[test]
    fn slot_tables_match_the_layer_plans_and_are_built_once() {
        use mistralrs_quant::with_row_tags;
        let registry = Arc::new(DeltaRegistry::new());
        registry.force_slot_tables(Some(true));
        let a = linear_fine_tune("a", 1, false);
        let b = linear_fine_tune("b", 2, false);
        let none = Arc::new(FineTuneDeltas {
            name: "none".into(),
            linear: HashMap::new(),
            bias: HashMap::new(),
            norm: HashMap::new(),
            norms: None,
            embedding: HashMap::new(),
            bytes: 0,
            device: Device::Cpu,
        });
        registry.insert(a.clone());
        registry.insert(none.clone());
        registry.insert(b.clone());
        let layers = [linear_layer(&registry), linear_layer(&registry)];
        let tag = |t: &str| Some(Arc::<str>::from(t));
        let x: Vec<f32> = (0..5 * K).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Tensor::from_vec(x, (5, 1, K), &Device::Cpu).unwrap();
        let run = |tags: &RowTags| -> Vec<Vec<f32>> {
            layers
                .iter()
                .map(|l| {
                    with_row_tags(Some(tags.clone()), || l.forward(&x))
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect()
        };
        let plans = |tags: &RowTags| -> Vec<Vec<f32>> {
            registry.force_slot_tables(Some(false));
            let out = run(tags);
            registry.force_slot_tables(Some(true));
            out
        };
        let builds = || (registry.slot_segment_builds(), registry.slot_table_builds());

        let tags: RowTags = Arc::from(vec![tag("a"), None, tag("none"), tag("b"), tag("a")]);
        let want = expected(&layers[0], &x, &[Some(&a), None, None, Some(&b), Some(&a)]);
        assert_eq!(run(&tags), vec![want.clone(), want.clone()]);
        assert_eq!(
            builds(),
            (1, 2),
            "one segment table for the pass, a slot table per layer"
        );
        assert_eq!(registry.cached_layer_plans(), 0, "no layer plan was needed");
        assert_eq!(
            run(&tags),
            plans(&tags),
            "the layer plans agree bit for bit"
        );
        assert_eq!(builds(), (1, 2));
        // A later pass over the same rows (new tags) reuses both.
        let again: RowTags = Arc::from(tags.to_vec());
        assert_eq!(run(&again)[1], want);
        assert_eq!(builds(), (1, 2));
        // Another batch: a new segment table, the same slot tables.
        let other: RowTags = Arc::from(vec![tag("b"), tag("b"), tag("a"), None, tag("none")]);
        let want_other = expected(&layers[0], &x, &[Some(&b), Some(&b), Some(&a), None, None]);
        assert_eq!(run(&other), vec![want_other.clone(), want_other]);
        assert_eq!(builds(), (2, 2));

        // b leaves: the slot tables are dropped and rebuilt on the next call; c takes b's slot.
        let b_slot = registry
            .slots
            .lock()
            .unwrap()
            .iter()
            .position(|s| s.as_ref().is_some_and(|f| Arc::ptr_eq(f, &b)));
        registry.remove("b");
        let c = linear_fine_tune("c", 3, false);
        registry.insert(c.clone());
        let c_slot = registry
            .slots
            .lock()
            .unwrap()
            .iter()
            .position(|s| s.as_ref().is_some_and(|f| Arc::ptr_eq(f, &c)));
        assert_eq!(c_slot, b_slot, "a freed slot is reused");
        assert_eq!(builds(), (2, 2), "built lazily, on the next call");
        let tags_c: RowTags = Arc::from(vec![tag("c"), tag("a"), tag("b"), tag("c"), None]);
        let want_c = expected(&layers[0], &x, &[Some(&c), Some(&a), None, Some(&c), None]);
        assert_eq!(run(&tags_c), vec![want_c.clone(), want_c]);
        assert_eq!(builds(), (3, 4));
        assert_eq!(run(&tags_c), plans(&tags_c));

        // A bias delta in the layer: the layer plan serves (and agrees).
        let d = linear_fine_tune("d", 4, true);
        registry.insert(d.clone());
        let tags_d: RowTags = Arc::from(vec![tag("d"), tag("a"), None, tag("c"), tag("d")]);
        let want_d = expected(
            &layers[0],
            &x,
            &[Some(&d), Some(&a), None, Some(&c), Some(&d)],
        );
        assert_eq!(run(&tags_d), vec![want_d.clone(), want_d]);
        assert_eq!(registry.cached_layer_plans(), 2);
    }

    fn norm_module(registry: &Arc<DeltaRegistry>, name: &str) -> ModuleDeltas {
        ModuleDeltas {
            name: name.to_string(),
            kind: ModuleKind::RmsNorm { eps: 1e-5 },
            registry: registry.clone(),
        }
    }

    /// The rows' fine-tunes are resolved once per forward pass (one row-tags `Arc`), again after any
    /// change of the resident set, and again for another pass; the plan lists the distinct fine-tunes in
    /// order of first appearance and maps each row to one (names not resident and untagged rows: none).
    #[test]
    fn the_row_plan_is_made_once_per_pass_and_after_each_change() {
        use mistralrs_quant::with_row_tags;
        let registry = DeltaRegistry::new();
        registry.insert(fine_tune("a", &[[1.0; 6], [2.0; 6]], true));
        registry.insert(fine_tune("b", &[[3.0; 6], [4.0; 6]], true));
        let tag = |t: &str| Some(Arc::<str>::from(t));
        let tags: RowTags = Arc::from(vec![tag("b"), None, tag("a"), tag("b"), tag("zzz")]);
        let rows = |t: &RowTags| with_row_tags(Some(t.clone()), || registry.rows());
        let plan = rows(&tags).expect("two fine-tunes are resident");
        let names: Vec<&str> = plan.fine_tunes().iter().map(|f| &*f.name).collect();
        assert_eq!(names, ["b", "a"]);
        let of = |p: &RowPlan| (0..p.len()).map(|i| p.fine_tune_of(i)).collect::<Vec<_>>();
        assert_eq!(of(&plan), [Some(0), None, Some(1), Some(0), None]);
        let again = rows(&tags).unwrap();
        assert!(
            Arc::ptr_eq(&plan.row_ft, &again.row_ft),
            "the same pass reuses its plan"
        );
        registry.remove("a");
        let after = rows(&tags).unwrap();
        assert!(
            !Arc::ptr_eq(&plan.row_ft, &after.row_ft),
            "a change rebuilds it"
        );
        assert_eq!(of(&after), [Some(0), None, None, Some(0), None]);
        let other_pass: RowTags = Arc::from(tags.to_vec());
        let next = rows(&other_pass).unwrap();
        assert!(
            !Arc::ptr_eq(&after.row_ft, &next.row_ft),
            "another pass rebuilds it"
        );
        assert_eq!(of(&next), of(&after));
        registry.remove("b");
        assert!(
            rows(&other_pass).is_none(),
            "no row's fine-tune is resident"
        );
        assert!(registry.rows().is_none(), "no row tags outside a pass");
    }

    /// The per-step table (one stack per batch of rows) gives the same outputs as building each norm's
    /// table on its own, bit for bit, for rows of two fine-tunes and the base, at rank 3 and rank 2; and
    /// the one-op norm delta (`norm_delta_add`, `force_fused_norm_deltas`) gives the three ops' outputs
    /// (f32: up to the order of the sums) from either table, leaving the base's row alone.
    #[test]
    fn stacked_norm_tables_match_per_call_tables() {
        let a = [
            [0.5, -1.0, 0.25, 2.0, 0.0, 1.5],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        ];
        let b = [
            [-0.5, 1.0, 0.0, -2.0, 3.0, 0.5],
            [1.0, 1.0, -1.0, -1.0, 0.5, 0.5],
        ];
        let stacked = RowPlan::of_rows(&[
            Some(fine_tune("a", &a, true)),
            None,
            Some(fine_tune("b", &b, true)),
        ]);
        let per_call = RowPlan::of_rows(&[
            Some(fine_tune("a", &a, false)),
            None,
            Some(fine_tune("b", &b, false)),
        ]);
        let registry = Arc::new(DeltaRegistry::new());
        let xs: Vec<f32> = (0..3 * 2 * 6).map(|i| (i as f32 * 0.37).sin()).collect();
        for dims in [vec![3, 2, 6], vec![3, 6]] {
            let n: usize = dims.iter().product();
            let input = Tensor::from_slice(&xs[..n], dims.as_slice(), &Device::Cpu).unwrap();
            let base_out = (&input * 0.5).unwrap();
            for norm in ["model.layers.0.input_layernorm", "model.norm"] {
                let m = norm_module(&registry, norm);
                registry.force_fused_norm_deltas(Some(false));
                let got = m.add_deltas(&input, base_out.clone(), &stacked).unwrap();
                let want = m.add_deltas(&input, base_out.clone(), &per_call).unwrap();
                assert_eq!(got.dims(), want.dims());
                let (g, w) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert_eq!(g, w, "{norm} at rank {}", dims.len());
                registry.force_fused_norm_deltas(Some(true));
                let fused: Vec<(bool, Tensor)> = [(true, &stacked), (false, &per_call)]
                    .into_iter()
                    .map(|(s, plan)| (s, m.add_deltas(&input, base_out.clone(), plan).unwrap()))
                    .collect();
                registry.force_fused_norm_deltas(None);
                // And the base's row is the base's output, on every path.
                let base_want = base_out.narrow(0, 1, 1).unwrap().flatten_all().unwrap();
                for (label, out) in [("three ops", &got)]
                    .into_iter()
                    .chain(fused.iter().map(|(_, t)| ("one op", t)))
                {
                    let base_row = out.narrow(0, 1, 1).unwrap().flatten_all().unwrap();
                    assert_eq!(
                        base_row.to_vec1::<f32>().unwrap(),
                        base_want.to_vec1::<f32>().unwrap(),
                        "{label}"
                    );
                }
                for (stacked, f) in &fused {
                    assert_eq!(f.dims(), want.dims());
                    let diff = (f - &want)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    const F32_TOL: f32 = 1e-5;
                    assert!(
                        diff < F32_TOL,
                        "{norm} rank {} stacked {stacked}: {diff}",
                        dims.len()
                    );
                }
            }
        }
    }

    /// One table per batch of rows: the same rows (and dtype) reuse it, other rows or another dtype
    /// rebuild it, and fine-tunes whose norms differ fall back to per-call tables.
    #[test]
    fn the_norm_table_is_built_once_per_batch_of_rows() {
        let a = fine_tune("a", &[[1.0; 6], [2.0; 6]], true);
        let b = fine_tune("b", &[[3.0; 6], [4.0; 6]], true);
        let registry = DeltaRegistry::new();
        let rows = vec![Some(a.clone()), Some(b.clone())];
        let (names, t1, ones) = registry
            .norm_table(&RowPlan::of_rows(&rows), DType::F32)
            .unwrap()
            .unwrap();
        assert_eq!(&*names, ["model.layers.0.input_layernorm", "model.norm"]);
        // Norm-major: [norms, rows, width]; norm 1 ("model.norm") over rows a, b.
        assert_eq!(t1.dims(), [2, 2, 6]);
        assert!(t1.narrow(0, 1, 1).unwrap().is_contiguous());
        assert_eq!(
            t1.narrow(0, 1, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [[2.0f32; 6], [4.0; 6]].concat()
        );
        assert_eq!(ones.to_vec1::<f32>().unwrap(), [1.0f32; 6]);
        let (_, t2, _) = registry
            .norm_table(&RowPlan::of_rows(&rows.clone()), DType::F32)
            .unwrap()
            .unwrap();
        assert_eq!(t1.id(), t2.id(), "the same rows reuse the table");
        let (_, t3, _) = registry
            .norm_table(
                &RowPlan::of_rows(&[Some(b.clone()), Some(a.clone())]),
                DType::F32,
            )
            .unwrap()
            .unwrap();
        assert_ne!(t1.id(), t3.id(), "other rows rebuild it");
        let (_, t4, _) = registry
            .norm_table(
                &RowPlan::of_rows(&[Some(b.clone()), Some(a.clone())]),
                DType::F16,
            )
            .unwrap()
            .unwrap();
        assert_eq!(t4.dtype(), DType::F16);
        // A fine-tune with another set of norms: no shared table.
        let mut other = HashMap::new();
        other.insert(
            "model.norm".to_string(),
            Tensor::new(&[1f32; 6], &Device::Cpu).unwrap(),
        );
        let c = Arc::new(FineTuneDeltas {
            name: "c".into(),
            linear: HashMap::new(),
            bias: HashMap::new(),
            norms: NormStack::of(&other).unwrap(),
            norm: other,
            embedding: HashMap::new(),
            bytes: 0,
            device: Device::Cpu,
        });
        assert!(registry
            .norm_table(&RowPlan::of_rows(&[Some(a), Some(c)]), DType::F32)
            .unwrap()
            .is_none());
        // Only the base: nothing to add.
        assert!(registry
            .norm_table(&RowPlan::of_rows(&[None, None]), DType::F32)
            .unwrap()
            .is_none());
    }
}

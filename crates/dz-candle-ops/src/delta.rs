//! [`DeviceDelta`]: one packed delta tensor resident on a candle device.

use std::sync::RwLockReadGuard;

use candle_core::{Device, Layout, Storage, Tensor};
use dz_format::codec::{pack_row_index, unpack_row_index, Payload};
use dz_format::shard::TensorShard;
use dz_format::{Codec, Role, TensorData, TensorEntry};

use crate::relayout::V4Layout;

use crate::error::{OpError, Result};

/// The rows a row-subset delta stores (SPEC.md section 3.6), for [`DeviceDelta::from_payload`].
#[derive(Debug, Clone, Copy)]
pub struct RowSubset<'a> {
    /// The stored rows: strictly increasing, each `< total_rows`, one per payload row.
    pub index: &'a [u32],
    /// `N_total`, the rows of the full matrix (an embedding's vocabulary size, say).
    pub total_rows: usize,
}

/// A packed delta resident on a device, in the exact kernel-facing layout of SPEC.md sections 3-4.
///
/// The matrix is `N_total x K` (`dims()`): for a linear layer's weight `[out, in]`, `N_total = out` and
/// `K = in`, so [`delta_matmul`](crate::delta_matmul) computes `x · Dᵀ` like a linear layer. When only some
/// rows are stored (a row subset, typical for embedding and `lm_head` deltas), `row_index` lists them and
/// every other row is zero.
///
/// The packed parts are candle tensors of dtype `U8` and shape `[len]` (on CPU a `CpuStorage::U8`), in the
/// codec's part order without `row_index`; `row_index` is a `U32` tensor of shape `[R]`. They are copied
/// from the file's bytes once, at construction, after dz-format has checked their layout and content, so
/// the ops never re-validate and never see a malformed payload.
///
/// Cloning is cheap: candle tensors share their storage.
#[derive(Debug, Clone)]
pub struct DeviceDelta {
    name: String,
    role: Option<Role>,
    codec: Codec,
    n_total: usize,
    k: usize,
    n_stored: usize,
    row_index: Option<Tensor>,
    parts: Vec<Tensor>,
    /// The v4 layout (`relayout`) of the codes, metadata and scales, `[codes, meta, scales]`, on CUDA
    /// devices for the codecs the v4 kernels take ([`crate::relayout::v4_kind`]).
    v4: Option<Vec<Tensor>>,
    device: Device,
}

/// Whether a delta keeps its packed parts on the device: always without a v4 layout; with one, only
/// when asked ([`crate::set_v4_keep_packed`]) or when the embedding op reads them.
fn keeps_packed(has_v4: bool, role: Option<Role>) -> bool {
    !has_v4 || crate::v4_keep_packed() || role == Some(Role::Embedding)
}

/// The whole check of SPEC.md section 7 for a payload's parts (`Payload::check`, streaming over the
/// packed bytes: ~30x faster than unpacking sparse24); then, when `relayout` says so for the codec, its
/// codes re-laid for the v4 kernels straight from the packed parts (`None`: the kernels do not take the
/// codec, or not asked). No logical form is built.
fn checked_layout(
    name: &str,
    codec: &Codec,
    n_stored: usize,
    k: usize,
    parts: &[&[u8]],
    relayout: impl Fn(&Codec) -> bool,
) -> Result<Option<V4Layout>> {
    Payload::check(name, codec, n_stored, k, parts).map_err(|source| OpError::Format {
        tensor: name.to_string(),
        source,
    })?;
    Ok(if relayout(codec) {
        crate::relayout::relayout_v4_packed(codec, n_stored, k, parts)
    } else {
        None
    })
}

/// What [`DeviceDelta::check_parts`] checked: the address and length of every part. Held next to the
/// parts (a CPU cache's immutable buffers), it lets [`DeviceDelta::from_checked_parts`] skip the payload
/// check; any other buffers get the whole check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedParts {
    parts: Vec<(usize, usize)>,
}

impl CheckedParts {
    fn of(parts: &[&[u8]]) -> Self {
        Self {
            parts: parts
                .iter()
                .map(|b| (b.as_ptr() as usize, b.len()))
                .collect(),
        }
    }

    /// Whether `parts` are the very buffers checked.
    fn covers(&self, parts: &[&[u8]]) -> bool {
        *self == Self::of(parts)
    }
}

/// A manifest entry's parts split into the row index (checked) and the codec's parts.
struct Parsed<'a> {
    n_total: usize,
    k: usize,
    n_stored: usize,
    row_index: Option<Vec<u32>>,
    codec_parts: &'a [&'a [u8]],
}

impl<'a> Parsed<'a> {
    fn of(entry: &TensorEntry, parts: &'a [&'a [u8]]) -> Result<Self> {
        let fmt = |source| OpError::Format {
            tensor: entry.name.clone(),
            source,
        };
        entry.validate().map_err(fmt)?;
        let (n_total, k) = entry.matrix_dims().map_err(fmt)?;
        let (n_stored, _) = entry.stored_dims().map_err(fmt)?;
        let (row_index, codec_parts) = match entry.rows {
            None => (None, parts),
            Some(_) => {
                let Some((first, rest)) = parts.split_first() else {
                    return Err(fmt(dz_format::Error::InvalidPart {
                        tensor: entry.name.clone(),
                        part: "row_index".into(),
                        reason: "missing: the entry stores a row subset".into(),
                    }));
                };
                let idx = unpack_row_index(&entry.name, first, n_total).map_err(fmt)?;
                if idx.len() != n_stored {
                    return Err(fmt(dz_format::Error::InvalidPart {
                        tensor: entry.name.clone(),
                        part: "row_index".into(),
                        reason: format!("holds {} rows, the entry says {n_stored}", idx.len()),
                    }));
                }
                (Some(idx), rest)
            }
        };
        Ok(Self {
            n_total,
            k,
            n_stored,
            row_index,
            codec_parts,
        })
    }
}

/// A tensor's delta checked and re-laid for the v4 kernels on the CPU, ahead of its upload: what a CPU
/// cache can hold instead of the packed parts (about the same bytes), so that uploading it again after
/// a GPU eviction is a plain copy ([`DeviceDelta::from_prepared`]). Session 8 measured ~15 s per upload
/// of a 7B delta when every upload re-checked and re-laid its codes.
pub struct PreparedDelta {
    name: String,
    role: Option<Role>,
    codec: Codec,
    n_total: usize,
    k: usize,
    n_stored: usize,
    row_index: Option<Vec<u32>>,
    layout: V4Layout,
}

impl std::fmt::Debug for PreparedDelta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedDelta")
            .field("name", &self.name)
            .field("codec", &self.codec)
            .field("dims", &(self.n_total, self.k))
            .field("bytes", &self.nbytes())
            .finish()
    }
}

impl PreparedDelta {
    /// Checks `entry`'s parts (as [`DeviceDelta::from_parts`] does) and re-lays its codes, when a CUDA
    /// upload now would keep only the v4 layout: the v4 kernels on ([`crate::set_v4_kernels`]), their
    /// codec, no packed parts kept ([`crate::set_v4_keep_packed`] off, not an embedding). `None`
    /// otherwise: keep the packed parts and upload them with [`DeviceDelta::from_parts`].
    pub fn prepare(entry: &TensorEntry, parts: &[&[u8]]) -> Result<Option<Self>> {
        let role = Some(entry.role);
        if !crate::v4_kernels() || keeps_packed(true, role) {
            return Ok(None);
        }
        let p = Parsed::of(entry, parts)?;
        let layout = checked_layout(
            &entry.name,
            &entry.codec,
            p.n_stored,
            p.k,
            p.codec_parts,
            |_| true,
        )?;
        Ok(layout.map(|layout| Self {
            name: entry.name.clone(),
            role,
            codec: entry.codec,
            n_total: p.n_total,
            k: p.k,
            n_stored: p.n_stored,
            row_index: p.row_index,
            layout,
        }))
    }

    /// The host buffers its upload copies (codes, metadata, scales; the row index is left out: 4
    /// bytes per stored row), for page-locking ([`crate::HostPins`]).
    pub fn host_buffers(&self) -> [&[u8]; 3] {
        let l = &self.layout;
        [&l.codes, &l.meta, &l.scales]
    }

    /// Bytes held (the layout and the row index): what its upload puts on the device.
    pub fn nbytes(&self) -> usize {
        let l = &self.layout;
        l.codes.len()
            + l.meta.len().max(1)
            + l.scales.len()
            + 4 * self.row_index.as_ref().map_or(0, Vec::len)
    }
}

impl DeviceDelta {
    /// Builds a delta from a manifest entry and its raw parts (zstd already undone), in the order of
    /// SPEC.md section 4, **including** `row_index` first when `entry.rows` is set: exactly the parts of
    /// a [`TensorData`].
    ///
    /// The layout and content are validated once (by `Payload::unpack`, whose logical form is then
    /// dropped); each part is then copied to `device` once.
    pub fn from_parts(entry: &TensorEntry, parts: &[&[u8]], device: &Device) -> Result<Self> {
        Self::from_parts_as(entry, parts, device, true)
    }

    /// [`DeviceDelta::from_parts`], keeping the file's packed parts only: no v4 layout, whatever
    /// [`crate::set_v4_kernels`] says. For a delta that is merged or dequantized and then dropped
    /// (merge mode): those ops read the packed parts, and the re-layout would be wasted work.
    pub fn from_tensor_data_packed(data: &TensorData<'_>, device: &Device) -> Result<Self> {
        let parts: Vec<&[u8]> = data.parts.iter().map(|p| p.as_ref()).collect();
        Self::from_parts_as(data.entry, &parts, device, false)
    }

    fn from_parts_as(
        entry: &TensorEntry,
        parts: &[&[u8]],
        device: &Device,
        v4_allowed: bool,
    ) -> Result<Self> {
        Self::from_parts_checked_as(entry, parts, device, v4_allowed, false)
    }

    /// Checks `entry`'s parts as [`DeviceDelta::from_parts`] does (the manifest entry, the row index and
    /// the whole payload check of SPEC.md section 7), without building anything. The answer vouches for
    /// these very buffers: [`DeviceDelta::from_checked_parts`] then skips the payload check, the costly
    /// part (it decodes every code: seconds for a 7B model's delta). A CPU cache checks what it reads
    /// once, so that every upload of it (the first, and each one after a GPU eviction) is a copy.
    pub fn check_parts(entry: &TensorEntry, parts: &[&[u8]]) -> Result<CheckedParts> {
        let p = Parsed::of(entry, parts)?;
        checked_layout(
            &entry.name,
            &entry.codec,
            p.n_stored,
            p.k,
            p.codec_parts,
            |_| false,
        )?;
        Ok(CheckedParts::of(parts))
    }

    /// [`DeviceDelta::from_parts`] for parts that passed [`DeviceDelta::check_parts`]: the cheap checks
    /// again (entry, row index), not the payload check (unless the codes are re-laid for the v4 kernels,
    /// which decodes them anyway). Parts other than the ones checked (other buffers or lengths) get the
    /// whole check.
    pub fn from_checked_parts(
        entry: &TensorEntry,
        parts: &[&[u8]],
        checked: &CheckedParts,
        device: &Device,
    ) -> Result<Self> {
        Self::from_parts_checked_as(entry, parts, device, true, checked.covers(parts))
    }

    fn from_parts_checked_as(
        entry: &TensorEntry,
        parts: &[&[u8]],
        device: &Device,
        v4_allowed: bool,
        checked: bool,
    ) -> Result<Self> {
        let p = Parsed::of(entry, parts)?;
        Self::build(
            &entry.name,
            Some(entry.role),
            entry.codec,
            p.n_total,
            p.k,
            p.n_stored,
            p.row_index.as_deref(),
            p.codec_parts,
            device,
            v4_allowed,
            checked,
        )
    }

    /// Uploads a delta prepared on the CPU ([`PreparedDelta`]: checked and re-laid for the v4 kernels):
    /// a plain copy of its layout, with no check or re-layout left to do. CUDA only (the v4 kernels'
    /// layout is what it holds).
    pub fn from_prepared(p: &PreparedDelta, device: &Device) -> Result<Self> {
        if !device.is_cuda() {
            return Err(OpError::Storage {
                op: "device-delta",
                reason: format!(
                    "{:?} was prepared for the v4 kernels, which run on CUDA devices, not {device:?}",
                    p.name
                ),
            });
        }
        Self::assemble(
            &p.name,
            p.role,
            p.codec,
            (p.n_total, p.k, p.n_stored),
            p.row_index.as_deref(),
            Some(&p.layout),
            &[],
            device,
        )
    }

    /// Packs a logical payload (dz-format's reference packer) and builds the delta from its parts.
    ///
    /// `rows` is `Some` for a row subset: the payload then holds `rows.index.len()` rows of the
    /// `rows.total_rows`-row matrix. The delta is named `"payload"` in errors and has no role.
    pub fn from_payload(
        payload: &Payload,
        rows: Option<RowSubset<'_>>,
        device: &Device,
    ) -> Result<Self> {
        const NAME: &str = "payload";
        let fmt = |source| OpError::Format {
            tensor: NAME.to_string(),
            source,
        };
        let parts = payload.pack_named(NAME).map_err(fmt)?;
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let (n_stored, k) = payload.dims();
        let (n_total, index) = match rows {
            None => (n_stored, None),
            Some(r) => {
                // Round-trip through the on-disk form: one set of checks for both constructors.
                let idx =
                    unpack_row_index(NAME, &pack_row_index(r.index), r.total_rows).map_err(fmt)?;
                if idx.len() != n_stored {
                    return Err(fmt(dz_format::Error::InvalidPart {
                        tensor: NAME.into(),
                        part: "row_index".into(),
                        reason: format!("holds {} rows, the payload has {n_stored}", idx.len()),
                    }));
                }
                (r.total_rows, Some(idx))
            }
        };
        Self::build(
            NAME,
            None,
            payload.codec(),
            n_total,
            k,
            n_stored,
            index.as_deref(),
            &refs,
            device,
            true,
            false,
        )
    }

    /// Builds the delta of one tensor read from a delta file ([`dz_format::DeltaFile::read`]).
    pub fn from_tensor_data(data: &TensorData<'_>, device: &Device) -> Result<Self> {
        let parts: Vec<&[u8]> = data.parts.iter().map(|p| p.as_ref()).collect();
        Self::from_parts(data.entry, &parts, device)
    }

    /// Builds one rank's delta from a tensor-parallel shard ([`dz_format::shard`]: a slice of a stored
    /// tensor's rows or columns in the same packed layout), e.g.
    /// `DeviceDelta::from_shard(&shard_rank(entry, &parts, Axis::Rows, rank, world)?, &dev)`.
    ///
    /// The shard is an ordinary tensor to every op: a column-parallel rank (rows cut) computes its slice
    /// of the outputs, `x · D_rᵀ`; a row-parallel rank (columns cut) takes its slice of the inputs, `x_r`,
    /// and the ranks' `x_r · D_rᵀ` sum to `x · Dᵀ` (the host's all-reduce).
    pub fn from_shard(shard: &TensorShard, device: &Device) -> Result<Self> {
        Self::from_parts(&shard.entry, &shard.part_refs(), device)
    }

    /// Validates the codec parts and copies everything to `device`. `row_index` is already checked.
    #[allow(clippy::too_many_arguments)]
    fn build(
        name: &str,
        role: Option<Role>,
        codec: Codec,
        n_total: usize,
        k: usize,
        n_stored: usize,
        row_index: Option<&[u32]>,
        parts: &[&[u8]],
        device: &Device,
        v4_allowed: bool,
        checked: bool,
    ) -> Result<Self> {
        let relayout = v4_allowed
            && device.is_cuda()
            && crate::v4_kernels()
            && crate::relayout::v4_kind(&codec, k).is_some();
        // Parts checked before (`CheckedParts`) are not unpacked again unless re-laid.
        let v4 = if checked && !relayout {
            None
        } else {
            checked_layout(name, &codec, n_stored, k, parts, |_| relayout)?
        };
        let packed: &[&[u8]] = if keeps_packed(v4.is_some(), role) {
            parts
        } else {
            &[]
        };
        Self::assemble(
            name,
            role,
            codec,
            (n_total, k, n_stored),
            row_index,
            v4.as_ref(),
            packed,
            device,
        )
    }

    /// Copies a checked delta's buffers to `device`: the v4 layout if any, the packed parts given (none
    /// for a delta that keeps only its v4 layout) and the row index.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        name: &str,
        role: Option<Role>,
        codec: Codec,
        (n_total, k, n_stored): (usize, usize, usize),
        row_index: Option<&[u32]>,
        v4: Option<&V4Layout>,
        packed: &[&[u8]],
        device: &Device,
    ) -> Result<Self> {
        let candle = |e: candle_core::Error| OpError::Storage {
            op: "device-delta",
            reason: format!("copying delta {name:?} to {device:?}: {e}"),
        };
        // One delta's copies to a CUDA device at a time in the process (the re-layout stays parallel):
        // session 7 measured uploads from several loader threads at once failing on an H200 ("copying
        // delta ... to Cuda", 13B base, `load_threads = 4`), while one thread never did.
        let _upload = device.is_cuda().then(|| {
            CUDA_UPLOADS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        });
        let v4 = v4
            .map(|l| {
                // An empty `meta` (quant) is a one-byte buffer: the kernels never read it.
                let meta: &[u8] = if l.meta.is_empty() { &[0u8] } else { &l.meta };
                [&l.codes[..], meta, &l.scales[..]]
                    .iter()
                    .map(|p| upload(p, device))
                    .collect::<candle_core::Result<Vec<_>>>()
            })
            .transpose()
            .map_err(candle)?;
        let parts = packed
            .iter()
            .map(|p| upload(p, device))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(candle)?;
        let row_index = row_index
            .map(|idx| Tensor::from_slice(idx, idx.len(), device))
            .transpose()
            .map_err(candle)?;
        Ok(Self {
            name: name.to_string(),
            role,
            codec,
            n_total,
            k,
            n_stored,
            row_index,
            parts,
            v4,
            device: device.clone(),
        })
    }

    /// The bytes a delta of this `role`, `codec` and stored shape, with `packed_bytes` of packed parts,
    /// takes on a CUDA device (`cuda`) or the CPU when built now: the v4 kernels' layout when they are on
    /// and take the codec, plus the packed parts unless only the v4 layout is kept (the same rule as
    /// the build). A tier that counts device bytes before uploading uses this, so it neither counts a
    /// layout that is not there (session 8: counting both halved the GPU tier of `--v4-kernels`) nor
    /// misses one that is. The row index of a row subset (4 bytes a stored row) is not included.
    pub fn device_nbytes(
        role: Option<Role>,
        codec: &Codec,
        n_stored: usize,
        k: usize,
        packed_bytes: u64,
        cuda: bool,
    ) -> u64 {
        let v4 = if cuda && crate::v4_kernels() {
            crate::relayout::v4_nbytes(codec, n_stored, k) as u64
        } else {
            0
        };
        v4 + if keeps_packed(v4 > 0, role) {
            packed_bytes
        } else {
            0
        }
    }

    /// The tensor's name (from the manifest; `"payload"` for [`DeviceDelta::from_payload`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor's role, when built from a manifest entry.
    pub fn role(&self) -> Option<Role> {
        self.role
    }

    /// The codec and its parameters.
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// `(N_total, K)`: the rows (output features) and columns (input features) of the full matrix.
    pub fn dims(&self) -> (usize, usize) {
        (self.n_total, self.k)
    }

    /// The number of stored rows: `N_total`, or `R` for a row subset.
    pub fn stored_rows(&self) -> usize {
        self.n_stored
    }

    /// The stored rows of a row subset: a `U32` tensor of shape `[R]`, strictly increasing.
    pub fn row_index(&self) -> Option<&Tensor> {
        self.row_index.as_ref()
    }

    /// The packed parts: `U8` tensors of shape `[len]`, in the codec's order (SPEC.md section 4),
    /// without `row_index`. Empty for a delta that keeps only its v4 layout ([`DeviceDelta::v4_only`]).
    pub fn parts(&self) -> &[Tensor] {
        &self.parts
    }

    /// Whether the delta keeps only its v4 layout on the device (CUDA, the v4 kernels on and
    /// [`crate::set_v4_keep_packed`] off): `delta_matmul` and `sbmm` read it through the v4 kernels,
    /// `dequantize` and `merge` through the v4 dequantize kernel (not for a row subset); the embedding op
    /// cannot (embedding deltas keep their packed parts).
    pub fn v4_only(&self) -> bool {
        self.v4.is_some() && self.parts.is_empty()
    }

    /// The id of the delta's first device buffer (a packed part, else a v4 part): two deltas with the
    /// same id share their buffers. `None` for the `zero` codec.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn buffer_id(&self) -> Option<candle_core::TensorId> {
        self.parts
            .first()
            .or_else(|| self.v4.as_ref().and_then(|v| v.first()))
            .map(Tensor::id)
    }

    /// The v4 layout's parts `[codes, meta, scales]` (`U8`), when the delta has one: on CUDA devices, for
    /// quant and sparse24 deltas of 2 or 4 bits with symmetric grids and groups of 0 or a multiple of 128
    /// columns ([`crate::relayout`]). They are held besides [`DeviceDelta::parts`], which the other
    /// kernels (more than 16 input rows, dequantize, merge, embedding) read.
    pub fn v4_parts(&self) -> Option<&[Tensor]> {
        self.v4.as_deref()
    }

    /// A copy with its own device buffers (every part, the row index and the v4 layout copied on the
    /// device), for benchmarks that rotate copies of one delta past the L2 cache.
    pub fn deep_clone(&self) -> Result<Self> {
        let candle = |e: candle_core::Error| OpError::Storage {
            op: "device-delta",
            reason: format!("copying delta {:?} on {:?}: {e}", self.name, self.device),
        };
        let copy = |ts: &[Tensor]| {
            ts.iter()
                .map(Tensor::copy)
                .collect::<candle_core::Result<Vec<_>>>()
        };
        Ok(Self {
            parts: copy(&self.parts).map_err(candle)?,
            row_index: self
                .row_index
                .as_ref()
                .map(Tensor::copy)
                .transpose()
                .map_err(candle)?,
            v4: self.v4.as_deref().map(copy).transpose().map_err(candle)?,
            ..self.clone()
        })
    }

    /// The device the parts live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes held on the device (parts, row index, and the v4 layout when there is one).
    pub fn nbytes(&self) -> usize {
        let parts: usize = self.parts.iter().map(Tensor::elem_count).sum();
        let v4: usize = self.v4.iter().flatten().map(Tensor::elem_count).sum();
        parts + v4 + self.row_index.as_ref().map_or(0, |t| 4 * t.elem_count())
    }

    /// Bytes of the packed parts and row index only (what the v3 kernels read; without the v4 layout; only
    /// the row index for a [`DeviceDelta::v4_only`] delta).
    pub fn packed_nbytes(&self) -> usize {
        let parts: usize = self.parts.iter().map(Tensor::elem_count).sum();
        parts + self.row_index.as_ref().map_or(0, |t| 4 * t.elem_count())
    }
}

/// Held while a delta's buffers are copied to a CUDA device (see [`DeviceDelta::from_parts`]'s build).
static CUDA_UPLOADS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One part as a `U8` tensor of shape `[len]` on `device`. An empty part (the `codes` of a `sparse` delta
/// that keeps nothing) is an empty view of a one-byte buffer: CUDA cannot allocate zero bytes.
fn upload(p: &[u8], device: &Device) -> candle_core::Result<Tensor> {
    if p.is_empty() {
        return Tensor::from_slice(&[0u8], 1, device)?.narrow(0, 0, 0);
    }
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => side_upload(p, dev),
        _ => Tensor::from_slice(p, p.len(), device),
    }
}

/// Copies `p` to `dev` on a stream of its own ([`upload_stream`]), then hands the buffer to the device's
/// stream, which frees it in order after the kernels that read it.
///
/// candle has one stream per device, so `Tensor::from_slice` queues the copy ahead of every kernel issued
/// after it: a 2.6 GB delta loading on demand (a pageable copy, a few hundred ms) held up each decode
/// step queued behind it (session 12, 64 fine-tunes on a GPU that holds 34: 1.6 s per token). Here the
/// copy runs beside the decode steps; a load thread waits for it, never the model.
#[cfg(feature = "cuda")]
fn side_upload(p: &[u8], dev: &candle_core::CudaDevice) -> candle_core::Result<Tensor> {
    use candle_core::cuda_backend::WrapErr;
    let side = upload_stream(dev)?;
    let slice = side.clone_htod(p).w()?;
    // The copy is complete before any kernel can see the buffer (the caller builds the delta after this).
    side.synchronize().w()?;
    let len = slice.len();
    let ptr = slice.leak();
    // SAFETY: `ptr` is a live allocation of `len` bytes that nothing owns any more (`leak` gave it up
    // without freeing it, after its stream finished the copy into it), in the device's context: the
    // device's stream takes it over and frees it (stream-ordered) when the tensor goes.
    let slice = unsafe { dev.cuda_stream().upgrade_device_ptr::<u8>(ptr, len) };
    let storage = candle_core::CudaStorage::wrap_cuda_slice(slice, dev.clone());
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        len,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// The stream delta copies to `dev`'s context run on: one per context, made on first use and kept for the
/// process.
#[cfg(feature = "cuda")]
fn upload_stream(
    dev: &candle_core::CudaDevice,
) -> candle_core::Result<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>> {
    use candle_core::cuda_backend::cudarc::driver::CudaStream;
    use candle_core::cuda_backend::WrapErr;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    static STREAMS: Mutex<Option<HashMap<usize, Arc<CudaStream>>>> = Mutex::new(None);
    let main = dev.cuda_stream();
    let key = main.context().cu_ctx() as usize;
    let mut streams = STREAMS.lock().unwrap_or_else(|e| e.into_inner());
    let streams = streams.get_or_insert_with(HashMap::new);
    if let Some(s) = streams.get(&key) {
        return Ok(s.clone());
    }
    let s = main.context().new_stream().w()?;
    streams.insert(key, s.clone());
    Ok(s)
}

type Guard<'t> = (RwLockReadGuard<'t, Storage>, &'t Layout);

/// Read locks on the storages of a delta's tensors, held while an op reads them (the CPU path borrows
/// their bytes, the CUDA path their device pointers).
pub(crate) struct Locked<'t> {
    pub(crate) delta: &'t DeviceDelta,
    pub(crate) parts: Vec<Guard<'t>>,
    pub(crate) row_index: Option<Guard<'t>>,
    /// The v4 parts (CUDA only; the CPU path never reads them).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) v4: Vec<Guard<'t>>,
}

impl<'t> Locked<'t> {
    /// Takes a read lock on every tensor of `delta`.
    pub(crate) fn new(delta: &'t DeviceDelta) -> Self {
        Locked {
            delta,
            parts: delta
                .parts()
                .iter()
                .map(|t| t.storage_and_layout())
                .collect(),
            row_index: delta.row_index().map(|t| t.storage_and_layout()),
            v4: delta
                .v4_parts()
                .into_iter()
                .flatten()
                .map(|t| t.storage_and_layout())
                .collect(),
        }
    }
}

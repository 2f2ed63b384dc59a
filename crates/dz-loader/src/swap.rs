//! Swap mode: the baseline a host without deltas has. Each fine-tune is served as its **full merged
//! weights** `W_ft = W_base + Δ`, a few models on the GPU at once and the rest in CPU memory, copied in
//! whole on demand (the DeltaZip paper's vLLM baseline, arXiv 2312.05215, section 6.1). It exists so
//! the serving benchmark compares multi-tenant deltas against swapping inside the same engine, the same
//! batching and the same kernels: only the cost model differs.
//!
//! - [`MergedWeights`]: a fine-tune's every tensor, decoded once from its delta file on the CPU (base +
//!   delta, in the serving dtype). A [`SwapStore`] keeps one copy per delta *file*: benchmarks list
//!   one file under many names (RAM cannot hold 32 full 7B models), and each name is still a model of
//!   its own on the GPU.
//! - [`SwapModel`]: every weight of one fine-tune on the device (all linear layers, embeddings, norms,
//!   head), made by copying all of [`MergedWeights`] there: the full-model copy the baseline pays on a
//!   miss. The [`SwapRegistry`] holds the models the layers may use (resident), by name.
//! - [`SwapHook`], the host's linear hook, wraps another hook (the multi-tenant [`crate::DeltaHook`]):
//!   each linear layer becomes a [`SwapLinear`] that computes the rows of resident swap models with
//!   their own dense weights (one matmul per model present, the host's own unquantized layer) and
//!   hands only the remaining rows, under their row tags, to the wrapped layer; token embeddings and
//!   RMS norms use the swap model's own tables and weights for its rows. No base work is spent on a
//!   swap row.
//!
//! Which swap models are resident is the server's residency manager's business (dz-scheduler-ext under
//! a GPU budget of `swap_gpu_models` models); [`crate::serve`] without one puts every swap model on the
//! device.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Device, Module, Result as CResult, Tensor};
use dz_compress::hf::HfModel;
use dz_format::shard::{tp_layer, TpLayer};
use dz_format::{DeltaFile, Role};
use mistralrs_quant::{
    current_row_tags, with_row_tags, IsqType, LinearHook, ModuleDelta, ModuleKind, QuantMethod,
    QuantMethodConfig, QuantizeOntoGuard, QuantizedSerde, RowTags, UnquantLinear,
};
use rayon::prelude::*;

use crate::config::CheckedDelta;
use crate::error::{Error, Result};
use crate::multi_tenant::TIED_HEAD;

fn host<E: fmt::Display>(what: &str, e: E) -> Error {
    Error::Host(format!("{what}: {e}"))
}

/// A fine-tune's full weights in CPU memory: every tensor of the base, plus the delta (or the stored
/// value of a `full` tensor), in the serving dtype.
pub struct MergedWeights {
    tensors: HashMap<String, Tensor>,
    bytes: u64,
}

impl fmt::Debug for MergedWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MergedWeights")
            .field("tensors", &self.tensors.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl MergedWeights {
    /// Decodes `base + delta` for every tensor of `base` (f32 sums, then `dtype`), on the CPU, except
    /// the biases of row-parallel layers (o_proj, down_proj): their fine-tune's minus the base's, since
    /// the host adds the base's after the swap model's layer there. The delta was checked against this
    /// base ([`crate::Config::load`]); shapes are checked again here.
    pub fn decode(base: &HfModel, delta: &DeltaFile, dtype: DType) -> Result<Self> {
        let index: HashMap<&str, usize> = (delta.manifest().tensors.iter().enumerate())
            .map(|(j, t)| (t.name.as_str(), j))
            .collect();
        let names: Vec<&str> = base.names().collect();
        // One tensor per task: a 7B model is ~300 tensors, decoded at start-up.
        let tensors = names
            .par_iter()
            .map(|&name| {
                Ok((
                    name.to_string(),
                    Self::tensor(base, delta, &index, name, dtype)?,
                ))
            })
            .collect::<Result<HashMap<String, Tensor>>>()?;
        let bytes = tensors
            .values()
            .map(|t| (t.elem_count() * dtype.size_in_bytes()) as u64)
            .sum();
        Ok(Self { tensors, bytes })
    }

    /// Base tensor `name` plus its delta, in `dtype`, on the CPU.
    fn tensor(
        base: &HfModel,
        delta: &DeltaFile,
        index: &HashMap<&str, usize>,
        name: &str,
        dtype: DType,
    ) -> Result<Tensor> {
        let info = base
            .info(name)
            .ok_or_else(|| Error::Host(format!("base tensor `{name}` vanished")))?;
        let mut w = base.to_f32(name)?;
        // A row-parallel layer's bias: the fine-tune's minus the base's. The host's linear hook wraps
        // that layer's inner weight, and the layer adds the base's bias after it (host patch 0002), so
        // the swap model's layer carries only what the fine-tune changes there.
        let row_parallel_bias =
            (name.ends_with(".bias") && tp_layer(name) == TpLayer::RowParallel).then(|| w.clone());
        if let Some(&j) = index.get(name) {
            let data = delta.read_at(j)?;
            let entry = data.entry;
            if entry.codec.kind() != "zero" {
                let (rows, _) = entry.matrix_dims()?;
                let d = data.decode()?.to_f32(rows);
                if d.len() != w.len() {
                    return Err(Error::Host(format!(
                        "delta tensor `{name}` has {} values, the base's {}",
                        d.len(),
                        w.len()
                    )));
                }
                if entry.role == Role::Full {
                    w = d;
                } else {
                    for (a, b) in w.iter_mut().zip(&d) {
                        *a += b;
                    }
                }
            }
        }
        if let Some(base_bias) = row_parallel_bias {
            for (a, b) in w.iter_mut().zip(&base_bias) {
                *a -= b;
            }
        }
        Tensor::from_vec(w, info.shape.as_slice(), &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| host(name, e))
    }

    /// Bytes held (and copied to the device by [`SwapModel::upload`]).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The tensors, by name.
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }
}

/// The CPU copies of the swap models' full weights, one per delta file (names listing the same file
/// share it), decoded on first use and kept for the store's lifetime: the baseline keeps every model
/// in CPU memory.
pub struct SwapStore {
    base: PathBuf,
    dtype: DType,
    by_file: Mutex<HashMap<PathBuf, Arc<MergedWeights>>>,
}

impl fmt::Debug for SwapStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwapStore")
            .field("base", &self.base)
            .field("dtype", &self.dtype)
            .field("files", &self.files())
            .finish()
    }
}

impl SwapStore {
    /// A store for deltas of the base at `base`, decoded to `dtype`.
    pub fn new(base: PathBuf, dtype: DType) -> Self {
        Self {
            base,
            dtype,
            by_file: Mutex::new(HashMap::new()),
        }
    }

    /// The serving dtype the weights are decoded to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The merged weights of `delta` (decoded now unless its file was decoded before). Decoding holds
    /// the store's lock: one file at a time, never twice.
    pub fn get(&self, delta: &CheckedDelta) -> Result<Arc<MergedWeights>> {
        let key = delta
            .spec
            .path
            .canonicalize()
            .unwrap_or_else(|_| delta.spec.path.clone());
        let mut map = self.by_file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = map.get(&key) {
            return Ok(w.clone());
        }
        let base = HfModel::open(&self.base)?;
        let w = Arc::new(MergedWeights::decode(&base, &delta.file, self.dtype)?);
        map.insert(key, w.clone());
        Ok(w)
    }

    /// Distinct delta files decoded.
    pub fn files(&self) -> usize {
        self.by_file.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// CPU bytes of every decoded file (each counted once).
    pub fn bytes(&self) -> u64 {
        let map = self.by_file.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(|w| w.bytes).sum()
    }
}

/// Every weight of one swap model on the device: its linear layers as the host's own unquantized
/// layers (weight and bias), its norm weights and embedding tables as tensors.
pub struct SwapModel {
    name: Arc<str>,
    linear: HashMap<String, Arc<dyn QuantMethod>>,
    vectors: HashMap<String, Tensor>,
    tables: HashMap<String, Tensor>,
    bytes: u64,
    /// The device it lives on: its context is made current on the thread that drops it.
    device: Device,
}

/// The last reference to a swap model can go on any thread (the residency's loader evicting it): the
/// device's context is made current first. Otherwise cudarc's frees fail on a thread with none, the
/// memory leaks, and cudarc reports the error at the engine's next step: session 10's `swap:32` run
/// failed 4 of 24 requests with `CUDA_ERROR_INVALID_CONTEXT` that way (as the multi-tenant deltas
/// did in session 7, fixed in `FineTuneDeltas`).
impl Drop for SwapModel {
    fn drop(&mut self) {
        crate::gpu_mem::bind(&self.device);
    }
}

impl fmt::Debug for SwapModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwapModel")
            .field("name", &self.name)
            .field("linear", &self.linear.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl SwapModel {
    /// Copies every tensor of `weights` to `device` (the whole model: the cost of a swap-in).
    pub fn upload(name: &str, weights: &MergedWeights, device: &Device) -> Result<Self> {
        // A loader thread: the device's context current on it before the copies (and the frees of a
        // failed upload).
        crate::gpu_mem::bind(device);
        let mut on_device: HashMap<&str, Tensor> = HashMap::new();
        let mut bytes = 0u64;
        for (n, t) in &weights.tensors {
            let d = t.to_device(device).map_err(|e| host(n, e))?;
            bytes += (d.elem_count() * d.dtype().size_in_bytes()) as u64;
            on_device.insert(n.as_str(), d);
        }
        let mut linear: HashMap<String, Arc<dyn QuantMethod>> = HashMap::new();
        let mut vectors = HashMap::new();
        let mut tables = HashMap::new();
        for (n, t) in &on_device {
            let Some(module) = n.strip_suffix(".weight") else {
                continue;
            };
            if t.rank() == 2 {
                let bias = on_device.get(format!("{module}.bias").as_str()).cloned();
                let layer = UnquantLinear::new(QuantMethodConfig::Unquantized(
                    candle_nn::Linear::new(t.clone(), bias),
                ))
                .map_err(|e| host(n, e))?;
                linear.insert(module.to_string(), Arc::new(layer));
                tables.insert(module.to_string(), t.clone());
            } else {
                vectors.insert(module.to_string(), t.clone());
            }
        }
        Ok(Self {
            name: Arc::from(name),
            linear,
            vectors,
            tables,
            bytes,
            device: device.clone(),
        })
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Linear layer `module` (a weight matrix `{module}.weight`, with its bias if any).
    fn layer(&self, module: &str, fallback: Option<&str>) -> CResult<&Arc<dyn QuantMethod>> {
        self.linear
            .get(module)
            .or_else(|| fallback.and_then(|f| self.linear.get(f)))
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "swap model {}: no weight for layer `{module}`",
                    self.name
                ))
            })
    }
}

/// The swap models resident on the serving device, by name; shared by every wrapped module. Changes at
/// run time (a model activated after its upload, deactivated before it is freed) are seen by the next
/// forward pass.
#[derive(Default)]
pub struct SwapRegistry {
    resident: RwLock<HashMap<Arc<str>, Arc<SwapModel>>>,
    /// The dtype of the wrapped layers (the serving dtype), seen at load.
    dtype: Mutex<Option<DType>>,
    /// The most distinct swap models one forward pass has served.
    widest: AtomicUsize,
    /// Tokens the output head computed for swap rows, by model.
    tokens: Mutex<HashMap<String, u64>>,
}

impl fmt::Debug for SwapRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwapRegistry")
            .field("resident", &self.names())
            .finish()
    }
}

/// The swap model of each batch row (`None`: a row for something else).
type Rows = Vec<Option<Arc<SwapModel>>>;

impl SwapRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `model` resident under its name (replacing any previous one).
    pub fn insert(&self, model: Arc<SwapModel>) {
        let name = model.name.clone();
        self.write().insert(name, model);
    }

    /// Removes model `name`; returns it if it was resident.
    pub fn remove(&self, name: &str) -> Option<Arc<SwapModel>> {
        self.write().remove(name)
    }

    /// Model `name`, if resident.
    pub fn get(&self, name: &str) -> Option<Arc<SwapModel>> {
        self.read().get(name).cloned()
    }

    /// The resident models, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.read().keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    /// Device bytes of every resident model.
    pub fn bytes(&self) -> u64 {
        self.read().values().map(|m| m.bytes).sum()
    }

    /// The dtype of the layers wrapped at load (`None` before a model was loaded under the hook).
    pub fn dtype(&self) -> Option<DType> {
        *self.dtype.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most distinct swap models one forward pass has served so far.
    pub fn widest_batch(&self) -> usize {
        self.widest.load(Ordering::Relaxed)
    }

    /// Tokens computed for swap rows so far, by model.
    pub fn tokens(&self) -> std::collections::BTreeMap<String, u64> {
        let map = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Arc<SwapModel>>> {
        self.resident.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Arc<str>, Arc<SwapModel>>> {
        self.resident.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The current row tags and each row's resident swap model, or `None` when no scope is active or
    /// no row is for a resident swap model.
    fn rows(&self) -> Option<(RowTags, Rows)> {
        let tags = current_row_tags()?;
        let map = self.read();
        if map.is_empty() {
            return None;
        }
        let rows: Rows = tags
            .iter()
            .map(|t| t.as_ref().and_then(|n| map.get(n).cloned()))
            .collect();
        let mut distinct: Vec<*const SwapModel> = rows.iter().flatten().map(Arc::as_ptr).collect();
        if distinct.is_empty() {
            return None;
        }
        distinct.sort_unstable();
        distinct.dedup();
        self.widest.fetch_max(distinct.len(), Ordering::Relaxed);
        Some((tags, rows))
    }

    fn count_tokens(&self, rows: &Rows) {
        let mut map = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        for m in rows.iter().flatten() {
            *map.entry(m.name.to_string()).or_insert(0) += 1;
        }
    }
}

/// Batch rows grouped by who computes them: the rows of no swap model first (`None`), then each swap
/// model's rows, models in order of first appearance. Rows keep their order within a group.
fn groups(rows: &Rows) -> Vec<(Option<Arc<SwapModel>>, Vec<u32>)> {
    let mut out: Vec<(Option<Arc<SwapModel>>, Vec<u32>)> = Vec::new();
    let rest: Vec<u32> = (0..rows.len() as u32)
        .filter(|&i| rows[i as usize].is_none())
        .collect();
    if !rest.is_empty() {
        out.push((None, rest));
    }
    for (i, r) in rows.iter().enumerate() {
        let Some(m) = r else { continue };
        match out
            .iter_mut()
            .find(|(g, _)| g.as_ref().is_some_and(|g| Arc::ptr_eq(g, m)))
        {
            Some((_, idx)) => idx.push(i as u32),
            None => out.push((Some(m.clone()), vec![i as u32])),
        }
    }
    out
}

/// Computes each group's rows with `f` (a tensor whose leading dimension is the group's rows) and
/// puts the results back in batch-row order.
fn per_group(
    rows: &Rows,
    device: &Device,
    mut f: impl FnMut(Option<&Arc<SwapModel>>, &[u32]) -> CResult<Tensor>,
) -> CResult<Tensor> {
    let groups = groups(rows);
    let mut pieces = Vec::with_capacity(groups.len());
    let mut order: Vec<u32> = Vec::with_capacity(rows.len());
    for (m, idx) in &groups {
        pieces.push(f(m.as_ref(), idx)?);
        order.extend_from_slice(idx);
    }
    let out = if pieces.len() == 1 {
        pieces.pop().unwrap_or_else(|| unreachable!())
    } else {
        Tensor::cat(&pieces, 0)?
    };
    if order.iter().enumerate().all(|(i, &r)| i as u32 == r) {
        return Ok(out);
    }
    // out[j] is batch row order[j]: gather with the inverse permutation.
    let mut inverse = vec![0u32; order.len()];
    for (j, &r) in order.iter().enumerate() {
        inverse[r as usize] = j as u32;
    }
    let inverse = Tensor::from_vec(inverse, order.len(), device)?;
    out.index_select(&inverse, 0)
}

/// Rows `idx` of `t` along its leading dimension (the whole tensor when they are all of it).
fn select(t: &Tensor, idx: &[u32], batch: usize) -> CResult<Tensor> {
    if idx.len() == batch && idx.iter().enumerate().all(|(i, &r)| i as u32 == r) {
        return Ok(t.clone());
    }
    if let (Some(&first), Some(&last)) = (idx.first(), idx.last()) {
        if (last - first) as usize + 1 == idx.len() {
            return t.narrow(0, first as usize, idx.len());
        }
    }
    let ids = Tensor::from_vec(idx.to_vec(), idx.len(), t.device())?;
    t.contiguous()?.index_select(&ids, 0)
}

fn batch_of(name: &str, t: &Tensor, rows: usize) -> CResult<()> {
    let b = t.dims().first().copied().unwrap_or(0);
    if b != rows {
        candle_core::bail!("{name}: a batch of {b} rows under {rows} row tags");
    }
    Ok(())
}

/// The host's linear-layer hook for swap models, over another hook for everything else (the
/// multi-tenant [`crate::DeltaHook`]): every linear layer becomes a [`SwapLinear`] around the other
/// hook's layer, every token embedding and RMS norm gets the swap models' own weights for their rows.
pub struct SwapHook {
    registry: Arc<SwapRegistry>,
    inner: Arc<dyn LinearHook>,
    /// The token embedding's name, seen before a tied output head is wrapped (the head's weight).
    embedding: Mutex<Option<String>>,
}

impl SwapHook {
    /// Swap rows over `registry`, the rest through `inner`.
    pub fn new(registry: Arc<SwapRegistry>, inner: Arc<dyn LinearHook>) -> Self {
        Self {
            registry,
            inner,
            embedding: Mutex::new(None),
        }
    }
}

impl LinearHook for SwapHook {
    fn wrap(&self, name: &str, layer: Arc<dyn QuantMethod>) -> CResult<Arc<dyn QuantMethod>> {
        {
            let mut dtype = self
                .registry
                .dtype
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if dtype.is_none() {
                *dtype = Some(layer.dtype_and_device().0);
            }
        }
        let fallback = if name == TIED_HEAD {
            self.embedding
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        } else {
            None
        };
        Ok(Arc::new(SwapLinear {
            inner: self.inner.wrap(name, layer)?,
            name: name.to_string(),
            fallback,
            registry: self.registry.clone(),
        }))
    }

    fn module(&self, name: &str, kind: ModuleKind) -> CResult<Option<Arc<dyn ModuleDelta>>> {
        if kind == ModuleKind::Embedding {
            *self.embedding.lock().unwrap_or_else(|e| e.into_inner()) = Some(name.to_string());
        }
        Ok(Some(Arc::new(SwapModule {
            inner: self.inner.module(name, kind)?,
            name: name.to_string(),
            kind,
            registry: self.registry.clone(),
        })))
    }
}

/// An embedding or RMS norm: rows of swap models computed with the model's own table or weight.
struct SwapModule {
    inner: Option<Arc<dyn ModuleDelta>>,
    name: String,
    kind: ModuleKind,
    registry: Arc<SwapRegistry>,
}

impl fmt::Debug for SwapModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwapModule")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

impl ModuleDelta for SwapModule {
    fn forward(&self, input: &Tensor, base_out: Tensor) -> CResult<Tensor> {
        // The inner deltas see swap rows as rows of no delta (their names are not its fine-tunes'),
        // and those rows are replaced below.
        let out = match &self.inner {
            Some(d) => d.forward(input, base_out)?,
            None => base_out,
        };
        let Some((_, rows)) = self.registry.rows() else {
            return Ok(out);
        };
        batch_of(&self.name, input, rows.len())?;
        batch_of(&self.name, &out, rows.len())?;
        let b = rows.len();
        let missing = |m: &SwapModel| {
            candle_core::Error::Msg(format!(
                "swap model {}: no weight for `{}`",
                m.name, self.name
            ))
        };
        per_group(&rows, out.device(), |m, idx| {
            let Some(m) = m else {
                return select(&out, idx, b);
            };
            let x = select(input, idx, b)?;
            match self.kind {
                ModuleKind::Embedding => {
                    let table = m.tables.get(&self.name).ok_or_else(|| missing(m))?;
                    let hidden = table.dim(1)?;
                    let e = candle_nn::Embedding::new(table.clone(), hidden).forward(&x)?;
                    e.to_dtype(out.dtype())
                }
                ModuleKind::RmsNorm { eps } => {
                    let w = m.vectors.get(&self.name).ok_or_else(|| missing(m))?;
                    let w = w.to_dtype(x.dtype())?;
                    let y = candle_nn::ops::rms_norm(&x.contiguous()?, &w, eps as f32)?;
                    y.to_dtype(out.dtype())
                }
            }
        })
    }
}

/// A linear layer serving swap models' rows with their own dense weights and the rest through the
/// layer it wraps (a base layer, or a multi-tenant [`crate::multi_tenant::DeltaLinear`]), which runs
/// under the row tags of its rows only.
pub struct SwapLinear {
    inner: Arc<dyn QuantMethod>,
    name: String,
    /// The weight a tied output head uses (the token embedding's name).
    fallback: Option<String>,
    registry: Arc<SwapRegistry>,
}

impl fmt::Debug for SwapLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwapLinear")
            .field("name", &self.name)
            .field("inner", &self.inner)
            .finish()
    }
}

impl SwapLinear {
    fn forward_rows(&self, a: &Tensor, tags: &RowTags, rows: &Rows) -> CResult<Tensor> {
        let b = rows.len();
        let dims = a.dims().to_vec();
        let k = a.dim(candle_core::D::Minus1)?;
        let m = a.elem_count() / k.max(1);
        if b == 0 || !m.is_multiple_of(b) {
            candle_core::bail!(
                "{}: {m} input rows do not split into {b} batch rows",
                self.name
            );
        }
        let per = m / b;
        // The shape of a group of `g` rows, as the input's (batch leading, or rows flattened).
        let shape_of = |g: usize| -> CResult<Vec<usize>> {
            let mut s = dims.clone();
            if dims.first() == Some(&b) {
                s[0] = g;
            } else if dims.len() == 2 {
                s[0] = g * per;
            } else {
                candle_core::bail!(
                    "{}: input {dims:?} has no batch dimension of {b}",
                    self.name
                );
            }
            Ok(s)
        };
        let x3 = a.reshape((b, per, k))?;
        let mut n_out = None;
        let out = per_group(rows, a.device(), |m, idx| {
            let x = select(&x3, idx, b)?.reshape(shape_of(idx.len())?)?;
            let y = match m {
                None => {
                    let sub: RowTags = idx.iter().map(|&i| tags[i as usize].clone()).collect();
                    with_row_tags(Some(sub), || self.inner.forward(&x))?
                }
                Some(m) => m.layer(&self.name, self.fallback.as_deref())?.forward(&x)?,
            };
            let n = y.dim(candle_core::D::Minus1)?;
            n_out = Some(n);
            y.reshape((idx.len(), per, n))
        })?;
        let mut shape = dims.clone();
        if let (Some(last), Some(n)) = (shape.last_mut(), n_out) {
            *last = n;
        }
        out.reshape(shape)
    }
}

impl QuantizedSerde for SwapLinear {
    fn name(&self) -> &'static str {
        "deltazip-swap-linear"
    }
}

impl QuantMethod for SwapLinear {
    fn new(_method: QuantMethodConfig) -> CResult<Self> {
        candle_core::bail!(
            "SwapLinear is built by dz-loader's SwapHook, not from a QuantMethodConfig"
        )
    }

    fn dequantize_w(&self) -> CResult<Tensor> {
        self.inner.dequantize_w()
    }

    fn forward(&self, a: &Tensor) -> CResult<Tensor> {
        let Some((tags, rows)) = self.registry.rows() else {
            return self.inner.forward(a);
        };
        if self.name == TIED_HEAD {
            self.registry.count_tokens(&rows);
        }
        self.forward_rows(a, &tags, &rows)
    }

    fn quantized_act_type(&self) -> Option<DType> {
        self.inner.quantized_act_type()
    }

    fn dtype_and_device(&self) -> (DType, Device) {
        self.inner.dtype_and_device()
    }

    fn add_delta_w(&self, delta: &Tensor) -> CResult<Arc<dyn QuantMethod>> {
        Ok(Arc::new(Self {
            inner: self.inner.add_delta_w(delta)?,
            name: self.name.clone(),
            fallback: self.fallback.clone(),
            registry: self.registry.clone(),
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
            "{}: in-situ quantization of a swap-mode layer is not supported",
            self.name
        )
    }

    fn unquant_weight_bias(&self) -> Option<(Tensor, Option<Tensor>)> {
        self.inner.unquant_weight_bias()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_put_other_rows_first_then_models_by_first_appearance() {
        let a = Arc::new(SwapModel {
            name: Arc::from("a"),
            linear: HashMap::new(),
            vectors: HashMap::new(),
            tables: HashMap::new(),
            bytes: 0,
            device: Device::Cpu,
        });
        let b = Arc::new(SwapModel {
            name: Arc::from("b"),
            linear: HashMap::new(),
            vectors: HashMap::new(),
            tables: HashMap::new(),
            bytes: 0,
            device: Device::Cpu,
        });
        let rows: Rows = vec![
            Some(b.clone()),
            None,
            Some(a.clone()),
            Some(b.clone()),
            None,
        ];
        let g = groups(&rows);
        let got: Vec<(Option<&str>, Vec<u32>)> = g
            .iter()
            .map(|(m, idx)| (m.as_ref().map(|m| m.name()), idx.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (None, vec![1, 4]),
                (Some("b"), vec![0, 3]),
                (Some("a"), vec![2]),
            ]
        );
        // per_group puts each row back where it was.
        let t = Tensor::arange(0f32, 5.0, &Device::Cpu)
            .unwrap()
            .reshape((5, 1))
            .unwrap();
        let back = per_group(&rows, &Device::Cpu, |_, idx| select(&t, idx, 5)).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 1.0, 2.0, 3.0, 4.0]
        );
    }
}

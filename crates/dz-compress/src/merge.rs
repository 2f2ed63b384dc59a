//! Applying a delta: `base + delta` back to plain weights, as an HF directory (`deltazip merge`) or as a
//! model in memory (`deltazip eval` of base + delta).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use dz_format::{DeltaFile, Dtype, Role, TensorData};

use crate::error::{Error, Result};
use crate::hf::{self, HfModel, OwnedTensor};
use crate::model::LlamaModel;

/// A base model with one delta on top, checked to belong together.
pub struct Applied {
    /// The base.
    pub base: HfModel,
    /// The delta.
    pub delta: DeltaFile,
    index: HashMap<String, usize>,
}

impl Applied {
    /// Opens `base` and `delta`, and refuses the pair unless the delta was made against exactly this base
    /// (its fingerprint) and every tensor it holds exists in the base with its shape.
    pub fn open(base: &Path, delta: &Path) -> Result<Self> {
        let base = HfModel::open(base)?;
        let delta = DeltaFile::open(delta)?;
        let fp = base.fingerprint()?;
        delta.manifest().base.check_base(&fp)?;
        let mut index = HashMap::new();
        for (i, t) in delta.manifest().tensors.iter().enumerate() {
            let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            match base.info(&t.name) {
                Some(info) if info.shape == shape => {}
                Some(info) if t.role != Role::Full => {
                    return Err(Error::Mismatch(format!(
                        "delta tensor {:?} has shape {shape:?}, the base's has {:?}",
                        t.name, info.shape
                    )))
                }
                None if t.role != Role::Full => {
                    return Err(Error::Mismatch(format!(
                        "delta tensor {:?} is not in the base",
                        t.name
                    )))
                }
                _ => {}
            }
            index.insert(t.name.clone(), i);
        }
        Ok(Self { base, delta, index })
    }

    /// The fine-tune's architecture config (from the delta's manifest).
    pub fn config_json(&self) -> &serde_json::Value {
        &self.delta.manifest().architecture
    }

    /// One tensor of the fine-tune, as f32: the base's plus the decoded delta (or the stored value for
    /// `full` tensors; the base's own for tensors the delta does not hold).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let Some(&i) = self.index.get(name) else {
            return self.base.to_f32(name);
        };
        let data = self.delta.read_at(i)?;
        let entry = data.entry;
        let (n_total, _) = entry.matrix_dims()?;
        let d = data.decode()?.to_f32(n_total);
        if entry.role == Role::Full {
            return Ok(d);
        }
        let mut w = self.base.to_f32(name)?;
        for (a, b) in w.iter_mut().zip(&d) {
            *a += b;
        }
        Ok(w)
    }

    /// Every tensor name of the fine-tune: the base's, plus `full` tensors the base lacks.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.base.names().map(str::to_string).collect();
        for t in &self.delta.manifest().tensors {
            if self.base.info(&t.name).is_none() {
                n.push(t.name.clone());
            }
        }
        n
    }

    /// The fine-tune as a model on `device`.
    pub fn model(&self, device: &Device) -> Result<LlamaModel> {
        let arch = crate::arch::ArchConfig::from_json(self.config_json())?;
        LlamaModel::load(&arch, device, |n| self.tensor_f32(n))
    }
}

/// What `merge` wrote.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// The output directory.
    pub dir: PathBuf,
    /// Tensors written.
    pub tensors: usize,
}

/// One tensor that a delta changes (role not `full`), handed to [`merge_with`]'s `add`.
pub struct AddJob<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// Its shape, the base's and the fine-tune's.
    pub shape: &'a [usize],
    /// The base's tensor as stored: little-endian, row-major, `base_dtype`.
    pub base: &'a [u8],
    /// The base tensor's dtype.
    pub base_dtype: Dtype,
    /// The delta's tensor, as read from the file.
    pub delta: &'a TensorData<'a>,
    /// The dtype the merged tensor is written in (the fine-tune's, from the delta's manifest).
    pub dtype: Dtype,
}

/// `base + delta` on the CPU: the base in f32 plus the delta as dz-format's reference decoder gives it,
/// rounded once to `job.dtype` (what [`merge`] writes).
pub fn add_cpu(job: &AddJob<'_>) -> Result<Vec<u8>> {
    let (n_total, _) = job.delta.entry.matrix_dims()?;
    let d = job.delta.decode()?.to_f32(n_total);
    let mut w = hf::decode_f32(job.base, job.base_dtype);
    if w.len() != d.len() {
        return Err(Error::Mismatch(format!(
            "delta tensor {:?} has {} values, the base's has {}",
            job.name,
            d.len(),
            w.len()
        )));
    }
    for (a, b) in w.iter_mut().zip(&d) {
        *a += b;
    }
    Ok(hf::encode_f32(&w, job.dtype))
}

/// Writes base + delta as a plain HF directory at `out` (config from the delta's manifest, tokenizer
/// copied from the base), each tensor in the fine-tune's dtype. Written atomically.
pub fn merge(
    base: &Path,
    delta: &Path,
    out: &Path,
    overwrite: bool,
    progress: impl FnMut(&str),
) -> Result<MergeReport> {
    merge_with(base, delta, out, overwrite, progress, add_cpu)
}

/// [`merge`], with each tensor the delta changes formed by `add` (which returns it encoded in
/// `job.dtype`); [`add_cpu`] is `merge`'s. Tensors the delta does not hold are the base's, and `full`
/// tensors the delta's stored values, as in [`merge`]. dz-loader passes one that runs dz-candle-ops'
/// `merge` op on a GPU.
pub fn merge_with(
    base: &Path,
    delta: &Path,
    out: &Path,
    overwrite: bool,
    mut progress: impl FnMut(&str),
    mut add: impl FnMut(&AddJob<'_>) -> Result<Vec<u8>>,
) -> Result<MergeReport> {
    let applied = Applied::open(base, delta)?;
    let names = applied.names();
    let mut tensors: Vec<OwnedTensor> = Vec::with_capacity(names.len());
    for name in &names {
        let (dtype, shape, bytes) = match applied.index.get(name) {
            Some(&i) => {
                let t = &applied.delta.manifest().tensors[i];
                let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
                let bytes = match (t.role, applied.base.info(name)) {
                    (Role::Full, _) | (_, None) => {
                        hf::encode_f32(&applied.tensor_f32(name)?, t.dtype)
                    }
                    (_, Some(info)) => add(&AddJob {
                        name,
                        shape: &shape,
                        base: applied.base.raw(name)?,
                        base_dtype: info.dtype,
                        delta: &applied.delta.read_at(i)?,
                        dtype: t.dtype,
                    })?,
                };
                (t.dtype, shape, bytes)
            }
            None => {
                let info = applied
                    .base
                    .info(name)
                    .ok_or_else(|| Error::InvalidModel(format!("no tensor {name}")))?;
                let bytes = hf::encode_f32(&applied.base.to_f32(name)?, info.dtype);
                (info.dtype, info.shape, bytes)
            }
        };
        tensors.push((name.clone(), dtype, shape, bytes));
        progress(name);
    }
    let tokenizer = applied
        .base
        .tokenizer_path()
        .map(|p| std::fs::read(&p).map_err(|e| Error::Io { path: p, source: e }))
        .transpose()?;
    let extra: Vec<(&str, &[u8])> = tokenizer
        .as_deref()
        .map(|t| vec![(hf::TOKENIZER_FILE, t)])
        .unwrap_or_default();
    let n = tensors.len();
    hf::write_model(
        out,
        applied.config_json(),
        tensors,
        hf::DEFAULT_MAX_SHARD_BYTES,
        &extra,
        overwrite,
    )?;
    Ok(MergeReport {
        dir: out.to_path_buf(),
        tensors: n,
    })
}

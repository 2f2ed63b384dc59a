//! Hugging Face-style model directories: `config.json` plus safetensors weights, in one file or sharded
//! (`model-00001-of-0000N.safetensors` + `model.safetensors.index.json`), in f32, f16 or bf16.
//!
//! ΔCompress (DeltaZip, arXiv 2312.05215, section 4.1) reads a base and a fine-tune from such directories,
//! and the merged fine-tune it can write back is one too. [`HfModel`] memory-maps every shard and indexes
//! the tensors by name without copying them; [`write_model`] writes a directory atomically (a temporary
//! sibling directory renamed into place).
//!
//! Every error names the file, and the tensor where there is one: a checkpoint is input, never trusted.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use dz_format::fingerprint::tensor_hash;
use dz_format::{BaseFingerprint, Dtype};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{SafeTensorError, View};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::arch::ArchConfig;
use crate::error::{Error, Result};

/// The model's configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// The weights of an unsharded model.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded model: `weight_map` from tensor name to shard file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The tokenizer, when the directory has one.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Tensors that are buffers rather than weights, and that [`HfModel::check_matches_arch`] ignores.
pub const IGNORED_SUFFIX: &str = ".rotary_emb.inv_freq";
/// The shard size `transformers` uses by default (`max_shard_size="5GB"`).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The dtype and shape of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Number of elements (the product of the dimensions; 1 for a scalar). Saturates at `usize::MAX`,
    /// which no tensor [`HfModel::info`] returns can reach: their shapes were checked against their bytes.
    pub fn numel(&self) -> usize {
        self.shape.iter().fold(1usize, |a, &d| a.saturating_mul(d))
    }
}

/// One memory-mapped safetensors file.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range within the shard's file (not within its data section).
    range: Range<usize>,
}

/// An opened HF-style model directory: its `config.json` and an index of its memory-mapped tensors.
#[derive(Debug)]
pub struct HfModel {
    dir: PathBuf,
    config: Value,
    arch: ArchConfig,
    shards: Vec<Shard>,
    index: BTreeMap<String, Entry>,
}

/// `model.safetensors.index.json` as written by `transformers`.
#[derive(Deserialize, Serialize)]
struct IndexJson {
    #[serde(default)]
    metadata: Option<Value>,
    weight_map: BTreeMap<String, String>,
}

fn invalid(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::InvalidModel(format!("{}: {msg}", path.display()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Maps a safetensors dtype to ours; anything but F32/F16/BF16 is refused.
fn dtype_of(d: safetensors::Dtype) -> Option<Dtype> {
    match d {
        safetensors::Dtype::F32 => Some(Dtype::F32),
        safetensors::Dtype::F16 => Some(Dtype::F16),
        safetensors::Dtype::BF16 => Some(Dtype::Bf16),
        _ => None,
    }
}

fn st_dtype(d: Dtype) -> safetensors::Dtype {
    match d {
        Dtype::F32 => safetensors::Dtype::F32,
        Dtype::F16 => safetensors::Dtype::F16,
        Dtype::Bf16 => safetensors::Dtype::BF16,
    }
}

/// The name `transformers` writes in `torch_dtype` for a dtype.
pub fn torch_dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "float32",
        Dtype::F16 => "float16",
        Dtype::Bf16 => "bfloat16",
    }
}

/// A plain file name: no directory part, not `.` or `..`, not empty.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

impl HfModel {
    /// Opens a model directory: parses `config.json` (into an [`ArchConfig`]), finds the weights
    /// (`model.safetensors`, else the shards named by `model.safetensors.index.json`, else every
    /// `*.safetensors` in the directory, sorted), memory-maps and parses each shard and indexes its tensors.
    ///
    /// Refused, with the file (and tensor) named: a missing or unparsable `config.json` or one whose
    /// architecture is not supported; a malformed or truncated shard; a tensor whose dtype is not
    /// F32/F16/BF16; a tensor in two shards; an index whose `weight_map` names a missing shard, a tensor its
    /// shard lacks, or misses a tensor a shard has.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
        let config: Value = serde_json::from_str(&text).map_err(|e| invalid(&config_path, e))?;
        let arch = ArchConfig::from_json(&config).map_err(|e| match e {
            Error::InvalidModel(m) => invalid(&dir, m),
            other => other,
        })?;

        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (shard_paths, weight_map) = if single_path.is_file() {
            (vec![single_path], None)
        } else if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(io(&index_path))?;
            let idx: IndexJson =
                serde_json::from_str(&text).map_err(|e| invalid(&index_path, e))?;
            let files: BTreeSet<&String> = idx.weight_map.values().collect();
            let mut paths = Vec::with_capacity(files.len());
            for f in files {
                if !is_plain_file_name(f) {
                    return Err(invalid(
                        &index_path,
                        format!(
                            "weight_map names {f:?}, which is not a file name in the directory"
                        ),
                    ));
                }
                let p = dir.join(f);
                if !p.is_file() {
                    return Err(invalid(
                        &index_path,
                        format!("weight_map names shard {f:?}, which does not exist"),
                    ));
                }
                paths.push(p);
            }
            (paths, Some(idx.weight_map))
        } else {
            let mut paths = Vec::new();
            for ent in std::fs::read_dir(&dir).map_err(io(&dir))? {
                let ent = ent.map_err(io(&dir))?;
                let p = ent.path();
                if p.extension().is_some_and(|e| e == "safetensors") && p.is_file() {
                    paths.push(p);
                }
            }
            paths.sort();
            if paths.is_empty() {
                return Err(invalid(
                    &dir,
                    format!("no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file"),
                ));
            }
            (paths, None)
        };

        let mut shards = Vec::with_capacity(shard_paths.len());
        let mut index: BTreeMap<String, Entry> = BTreeMap::new();
        for (si, path) in shard_paths.into_iter().enumerate() {
            let file = File::open(&path).map_err(io(&path))?;
            // SAFETY: the map is read-only and lives as long as the model. A file changed underneath by
            // another process can change what we read (as with any mmap-based loader, safetensors'
            // included) but not break memory safety of the slices we hand out: they stay in bounds of the
            // mapping, whose length is fixed at map time.
            let map = unsafe { Mmap::map(&file) }.map_err(io(&path))?;
            let (n, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| invalid(&path, format!("not a valid safetensors file: {e}")))?;
            // read_metadata checked 8 + n + data_len == file length.
            let data_start = 8 + n;
            let mut names: Vec<(String, &safetensors::tensor::TensorInfo)> =
                meta.tensors().into_iter().collect();
            names.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, info) in names {
                let dtype = dtype_of(info.dtype).ok_or_else(|| {
                    invalid(
                        &path,
                        format!(
                            "tensor {name:?} has dtype {}; only F32, F16 and BF16 are supported",
                            info.dtype
                        ),
                    )
                })?;
                let (s, e) = info.data_offsets;
                let range = data_start
                    .checked_add(s)
                    .zip(data_start.checked_add(e))
                    .map(|(a, b)| a..b)
                    .filter(|r| r.start <= r.end && r.end <= map.len())
                    .ok_or_else(|| {
                        invalid(&path, format!("tensor {name:?}: data offsets out of range"))
                    })?;
                let numel = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if numel.and_then(|n| n.checked_mul(dtype.size())) != Some(range.len()) {
                    return Err(invalid(
                        &path,
                        format!(
                            "tensor {name:?}: shape {:?} does not match its bytes",
                            info.shape
                        ),
                    ));
                }
                if let Some(prev) = index.get(&name) {
                    let other: &Shard = &shards[prev.shard];
                    return Err(invalid(
                        &path,
                        format!(
                            "tensor {name:?} is also in {}; a tensor must be in one shard",
                            other.path.display()
                        ),
                    ));
                }
                index.insert(
                    name,
                    Entry {
                        shard: si,
                        dtype,
                        shape: info.shape.clone(),
                        range,
                    },
                );
            }
            shards.push(Shard { path, map });
        }

        if let Some(wm) = weight_map {
            for (name, file) in &wm {
                match index.get(name) {
                    None => {
                        return Err(invalid(
                            &index_path,
                            format!("weight_map puts tensor {name:?} in {file:?}, which lacks it"),
                        ))
                    }
                    Some(e) => {
                        let actual = &shards[e.shard].path;
                        if actual.file_name().and_then(|f| f.to_str()) != Some(file.as_str()) {
                            return Err(invalid(
                                &index_path,
                                format!(
                                    "weight_map puts tensor {name:?} in {file:?}, but it is in {}",
                                    actual.display()
                                ),
                            ));
                        }
                    }
                }
            }
            if let Some((name, e)) = index.iter().find(|(n, _)| !wm.contains_key(*n)) {
                return Err(invalid(
                    &shards[e.shard].path,
                    format!("tensor {name:?} is missing from {INDEX_FILE}'s weight_map"),
                ));
            }
        }

        Ok(Self {
            dir,
            config,
            arch,
            shards,
            index,
        })
    }

    /// The directory this model was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json` as parsed JSON, every key kept.
    pub fn config_json(&self) -> &Value {
        &self.config
    }

    /// The architecture `config.json` describes.
    pub fn arch(&self) -> &ArchConfig {
        &self.arch
    }

    /// The safetensors files, in the order they were read.
    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when the weights hold no tensor at all.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The dtype and shape of a tensor, or `None` when the model has no tensor of that name.
    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        self.index.get(name).map(|e| TensorInfo {
            dtype: e.dtype,
            shape: e.shape.clone(),
        })
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.index
            .get(name)
            .ok_or_else(|| invalid(&self.dir, format!("the model has no tensor {name:?}")))
    }

    fn bytes_of(&self, e: &Entry) -> &[u8] {
        // The range was checked against the map's length when indexed; `get` keeps this panic-free anyway.
        self.shards[e.shard].map.get(e.range.clone()).unwrap_or(&[])
    }

    /// The tensor's bytes as stored (little-endian, row-major), borrowed from the memory map.
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        Ok(self.bytes_of(self.entry(name)?))
    }

    /// The tensor's values converted to f32 (exact for every supported dtype).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        Ok(decode_f32(self.bytes_of(e), e.dtype))
    }

    /// The base fingerprint of this model (dz-format SPEC.md section 6): every tensor hashed with
    /// [`tensor_hash`] over its name, dtype, shape and stored bytes, in parallel.
    pub fn fingerprint(&self) -> Result<BaseFingerprint> {
        let hashes: BTreeMap<String, String> = self
            .index
            .par_iter()
            .map(|(name, e)| {
                let shape: Vec<u64> = e.shape.iter().map(|&d| d as u64).collect();
                let h = tensor_hash(name, e.dtype.as_str(), &shape, self.bytes_of(e));
                (name.clone(), h)
            })
            .collect();
        Ok(BaseFingerprint::from_tensor_hashes(hashes))
    }

    /// `dir/tokenizer.json`, when it exists.
    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        let p = self.dir.join(TOKENIZER_FILE);
        p.is_file().then_some(p)
    }

    /// Checks the tensors against [`ArchConfig::tensor_shapes`]: each expected tensor is present with that
    /// shape, and nothing else is there. A tied model may still carry `lm_head.weight` (of the embedding's
    /// shape); buffers named `*.rotary_emb.inv_freq` are ignored. The error lists the problems, by name.
    pub fn check_matches_arch(&self) -> Result<()> {
        let expected = self.arch.tensor_shapes();
        let (mut missing, mut shapes, mut unexpected) = (Vec::new(), Vec::new(), Vec::new());
        let mut known: HashSet<&str> = HashSet::with_capacity(expected.len() + 1);
        let mut check = |name: &str, shape: &[usize]| match self.index.get(name) {
            None => missing.push(format!("{name:?}")),
            Some(e) if e.shape != shape => shapes.push(format!(
                "{name:?} is {:?}, config.json implies {shape:?}",
                e.shape
            )),
            Some(_) => {}
        };
        for (name, shape) in &expected {
            known.insert(name.as_str());
            check(name, shape);
        }
        if self.arch.tie_word_embeddings && self.index.contains_key("lm_head.weight") {
            known.insert("lm_head.weight");
            check(
                "lm_head.weight",
                &[self.arch.vocab_size, self.arch.hidden_size],
            );
        }
        for name in self.index.keys() {
            if !known.contains(name.as_str()) && !name.ends_with(IGNORED_SUFFIX) {
                unexpected.push(format!("{name:?}"));
            }
        }
        let mut parts = Vec::new();
        for (what, list) in [
            ("missing tensor", missing),
            ("wrong shape", shapes),
            ("unexpected tensor", unexpected),
        ] {
            if !list.is_empty() {
                parts.push(format!("{} {what}(s): {}", list.len(), shown(&list)));
            }
        }
        if parts.is_empty() {
            return Ok(());
        }
        Err(invalid(
            &self.dir,
            format!(
                "the weights do not match config.json ({}): {}",
                self.arch.model_type,
                parts.join("; ")
            ),
        ))
    }
}

/// The first few items of a list, and how many more there are.
fn shown(list: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut s = list
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if list.len() > SHOWN {
        s.push_str(&format!(" and {} more", list.len() - SHOWN));
    }
    s
}

/// Decodes little-endian values of `dtype` to f32 (exact for all three dtypes). Trailing bytes that do not
/// make a whole value are ignored.
pub fn decode_f32(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// Encodes f32 values as little-endian `dtype`, rounding to nearest, ties to even (f16 overflows to ±inf,
/// NaN stays NaN).
pub fn encode_f32(values: &[f32], dtype: Dtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        Dtype::Bf16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
    }
    out
}

/// Rounds f32 values through `dtype` and back (what storing them in `dtype` keeps).
pub fn round_to(values: &[f32], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => values.to_vec(),
        Dtype::F16 => values
            .iter()
            .map(|v| half::f16::from_f32(*v).to_f32())
            .collect(),
        Dtype::Bf16 => values
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect(),
    }
}

/// One tensor to write: name, dtype, shape and its bytes (little-endian, row-major, `dtype`).
pub type OwnedTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// A borrowed tensor for safetensors' serializer.
struct TensorRef<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl View for TensorRef<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        st_dtype(self.dtype)
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes one safetensors file (with `{"format": "pt"}` metadata, as `transformers` expects) and syncs it.
fn write_shard(path: &Path, tensors: &[OwnedTensor]) -> Result<()> {
    let views = tensors.iter().map(|(name, dtype, shape, data)| {
        (
            name.as_str(),
            TensorRef {
                dtype: *dtype,
                shape,
                data,
            },
        )
    });
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| match e {
        SafeTensorError::IoError(source) => Error::Io {
            path: path.to_path_buf(),
            source,
        },
        other => invalid(path, format!("cannot serialize: {other}")),
    })?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// True when `dir` exists and holds at least one entry.
fn non_empty_dir(dir: &Path) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut it) => Ok(it.next().is_some()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// Writes an HF-style model directory: `config.json` (pretty-printed), the weights, and `extra_files`
/// (for instance `("tokenizer.json", bytes)`).
///
/// The weights go to one `model.safetensors` when they fit in `max_shard_bytes`, else to
/// `model-00001-of-0000N.safetensors`... (a new shard starts when the next tensor would overflow the
/// current one; a tensor larger than the limit gets a shard of its own) plus `model.safetensors.index.json`
/// with `metadata.total_size` and the `weight_map`, as `transformers`' `save_pretrained` does. Tensors are
/// consumed one at a time: at most one shard is held in memory.
///
/// Everything is written into a temporary sibling directory that is renamed to `dir` at the end, so a
/// crash never leaves a half-written model under `dir`. An existing non-empty `dir` is refused unless
/// `overwrite` is set (then it is replaced as a whole).
///
/// Refused: a tensor whose byte length does not match its shape and dtype, a name given twice, an extra
/// file whose name is not a plain file name or collides with the weights or `config.json`.
pub fn write_model<I>(
    dir: &Path,
    config: &Value,
    tensors: I,
    max_shard_bytes: u64,
    extra_files: &[(&str, &[u8])],
    overwrite: bool,
) -> Result<()>
where
    I: IntoIterator<Item = OwnedTensor>,
{
    if dir.is_file() {
        return Err(invalid(dir, "exists and is a file, not a directory"));
    }
    if !overwrite && non_empty_dir(dir)? {
        return Err(invalid(
            dir,
            "exists and is not empty; refusing to overwrite it",
        ));
    }
    for (name, _) in extra_files {
        let reserved = *name == CONFIG_FILE
            || *name == INDEX_FILE
            || name.ends_with(".safetensors")
            || name.starts_with(".dz-");
        if !is_plain_file_name(name) || reserved {
            return Err(invalid(
                dir,
                format!("extra file {name:?} is not a plain file name, or collides with the model's own files"),
            ));
        }
    }
    let file_name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| invalid(dir, "has no usable directory name"))?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}.tmp-"))
        .tempdir_in(parent)
        .map_err(io(parent))?;

    // Shards are first written as `.dz-shard-N` and renamed once their count is known.
    let mut pending: Vec<OwnedTensor> = Vec::new();
    let mut pending_bytes: u64 = 0;
    let mut shard_files: Vec<(PathBuf, Vec<String>)> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut total_size: u64 = 0;
    let flush = |pending: &mut Vec<OwnedTensor>,
                 shard_files: &mut Vec<(PathBuf, Vec<String>)>|
     -> Result<()> {
        let path = tmp.path().join(format!(".dz-shard-{}", shard_files.len()));
        write_shard(&path, pending)?;
        let names = pending.drain(..).map(|t| t.0).collect();
        shard_files.push((path, names));
        Ok(())
    };
    for t in tensors {
        let (name, dtype, shape, data) = &t;
        let want = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size()));
        if want != Some(data.len()) {
            return Err(invalid(
                dir,
                format!(
                    "tensor {name:?}: {} bytes, but shape {shape:?} in {} needs {}",
                    data.len(),
                    dtype.as_str(),
                    want.map_or("more than usize::MAX".to_string(), |n| n.to_string())
                ),
            ));
        }
        if name.is_empty() || !seen.insert(name.clone()) {
            return Err(invalid(
                dir,
                format!("tensor name {name:?} is empty or given twice"),
            ));
        }
        let len = data.len() as u64;
        total_size = total_size.saturating_add(len);
        if !pending.is_empty() && pending_bytes.saturating_add(len) > max_shard_bytes {
            flush(&mut pending, &mut shard_files)?;
            pending_bytes = 0;
        }
        pending_bytes = pending_bytes.saturating_add(len);
        pending.push(t);
    }
    if !pending.is_empty() || shard_files.is_empty() {
        flush(&mut pending, &mut shard_files)?;
    }

    let n = shard_files.len();
    if n == 1 {
        let to = tmp.path().join(SINGLE_FILE);
        std::fs::rename(&shard_files[0].0, &to).map_err(io(&to))?;
    } else {
        let mut weight_map = BTreeMap::new();
        for (i, (path, names)) in shard_files.iter().enumerate() {
            let fname = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            let to = tmp.path().join(&fname);
            std::fs::rename(path, &to).map_err(io(&to))?;
            for name in names {
                weight_map.insert(name.clone(), fname.clone());
            }
        }
        let idx = IndexJson {
            metadata: Some(serde_json::json!({ "total_size": total_size })),
            weight_map,
        };
        let text = serde_json::to_string_pretty(&idx)
            .map_err(|e| invalid(dir, format!("cannot serialize {INDEX_FILE}: {e}")))?;
        write_synced(&tmp.path().join(INDEX_FILE), text.as_bytes())?;
    }
    let text = serde_json::to_string_pretty(config)
        .map_err(|e| invalid(dir, format!("cannot serialize {CONFIG_FILE}: {e}")))?;
    write_synced(&tmp.path().join(CONFIG_FILE), text.as_bytes())?;
    for (name, bytes) in extra_files {
        write_synced(&tmp.path().join(name), bytes)?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // tempdir creates 0700; a model directory is an ordinary directory.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(io(tmp.path()))?;
    }

    // Move the finished directory into place. An existing (empty, or overwritten) `dir` is first moved
    // aside, so that `dir` always holds either the old or the new model in full.
    let tmp_path = tmp.keep();
    let result = (|| {
        if dir.exists() {
            let trash = tempfile::Builder::new()
                .prefix(&format!(".{file_name}.old-"))
                .tempdir_in(parent)
                .map_err(io(parent))?;
            let aside = trash.path().join("old");
            std::fs::rename(dir, &aside).map_err(io(dir))?;
            if let Err(e) = std::fs::rename(&tmp_path, dir) {
                // Put the old model back; dropping `trash` then removes only the empty trash directory.
                let _ = std::fs::rename(&aside, dir);
                return Err(Error::Io {
                    path: dir.to_path_buf(),
                    source: e,
                });
            }
            // Dropping `trash` removes the old model.
            drop(trash);
            Ok(())
        } else {
            std::fs::rename(&tmp_path, dir).map_err(io(dir))
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp_path);
    }
    result
}

/// Writes a small file and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_and_rounding() {
        let v = [0.0f32, -1.5, 3.140625, 1e-3, 65504.0, -0.0];
        for d in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let b = encode_f32(&v, d);
            assert_eq!(b.len(), v.len() * d.size());
            let back = decode_f32(&b, d);
            assert_eq!(back, round_to(&v, d));
            // Re-encoding what was decoded is bit-exact.
            assert_eq!(encode_f32(&back, d), b);
        }
        assert_eq!(decode_f32(&encode_f32(&v, Dtype::F32), Dtype::F32), v);
        // Ties to even: 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7; even is 1.
        let tie = 1.0 + 2f32.powi(-8);
        assert_eq!(round_to(&[tie], Dtype::Bf16), vec![1.0]);
        let tie_up = 1.0 + 3.0 * 2f32.powi(-8);
        assert_eq!(round_to(&[tie_up], Dtype::Bf16), vec![1.0 + 2f32.powi(-6)]);
        // Trailing partial value ignored.
        assert_eq!(decode_f32(&[0, 0, 128, 63, 1], Dtype::F32), vec![1.0]);
    }

    #[test]
    fn plain_file_names() {
        assert!(is_plain_file_name("tokenizer.json"));
        for bad in ["", ".", "..", "a/b", "..\\x", "/etc/passwd"] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }
}

//! The `base+delta` config: what to serve, as TOML.
//!
//! ```toml
//! [base]
//! path = "models/llama-7b"     # HF-style directory: config.json, *.safetensors, tokenizer.json
//! dtype = "bf16"               # auto | f32 | f16 | bf16
//!
//! [[delta]]
//! name = "llama-7b-sql"        # the name clients send as `model`
//! path = "deltas/sql.dz"
//! mode = "multi-tenant"        # or "merge", or "swap" (the full-model baseline)
//! ```
//!
//! `examples/serve.toml` is a commented example with every key. Relative paths are relative to the config
//! file's directory. [`Config::load`] refuses a bad config with one message that names the file and the
//! field: unknown keys and wrong types (with line and column), missing files, duplicate names, and deltas
//! that were made for another architecture or another base (the base fingerprint of dz-format).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dz_compress::arch::ArchConfig;
use dz_compress::hf::HfModel;
use dz_format::DeltaFile;
use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};

/// A whole config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The shared base model.
    pub base: BaseSpec,
    /// The fine-tunes, each a delta against the base (`[[delta]]` tables).
    #[serde(default, rename = "delta")]
    pub deltas: Vec<DeltaSpec>,
    /// Where and with how much memory to run.
    #[serde(default)]
    pub runtime: RuntimeSpec,
    /// Batching across fine-tunes (used by dz-scheduler-ext).
    #[serde(default)]
    pub scheduler: SchedulerSpec,
    /// The file this config was read from (set by [`Config::load`] / [`Config::parse`]).
    #[serde(skip)]
    pub file: PathBuf,
}

/// `[base]`: the model every delta is applied to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseSpec {
    /// HF-style directory: `config.json`, `*.safetensors` (sharded or not), `tokenizer.json`.
    pub path: PathBuf,
    /// The dtype weights are computed in.
    #[serde(default)]
    pub dtype: DtypeSpec,
    /// The name clients send as `model` for the base itself (default: the directory's name).
    #[serde(default)]
    pub name: Option<String>,
    /// Serve the base itself under its name (default true; a merge-only config can save its memory).
    #[serde(default = "yes")]
    pub serve: bool,
}

fn yes() -> bool {
    true
}

/// `[[delta]]`: one fine-tune.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaSpec {
    /// The name clients send as `model`; unique across the config.
    pub name: String,
    /// The `.dz` delta file (written by `deltazip compress`).
    pub path: PathBuf,
    /// How the fine-tune is served.
    #[serde(default)]
    pub mode: Mode,
}

/// How a fine-tune is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One copy of the base; each linear layer computes `base + delta` per row on the packed delta
    /// (many fine-tunes in one batch).
    #[default]
    MultiTenant,
    /// base + delta materialised into plain weights at start-up: one model of its own, no run-time
    /// overhead, every host feature works.
    Merge,
    /// The baseline without deltas: the fine-tune's full merged weights (decoded once from the delta on
    /// the CPU), at most `runtime.swap_gpu_models` such models on the GPU at once, the rest in CPU
    /// memory and copied in whole on demand ([`crate::swap`]). Batched with the base's engine.
    Swap,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::MultiTenant => "multi-tenant",
            Mode::Merge => "merge",
            Mode::Swap => "swap",
        })
    }
}

/// The dtype weights are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeSpec {
    /// The host's choice for the device (bf16 where supported, else f32 on CPU).
    #[default]
    Auto,
    /// f32.
    F32,
    /// f16.
    F16,
    /// bf16.
    Bf16,
}

/// `[runtime]`: where and with how much memory to run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSpec {
    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    #[serde(default)]
    pub device: DeviceSpec,
    /// GPU memory for resident deltas (multi-tenant mode), as bytes or a string such as `"8GiB"`.
    /// `deltazip serve` checks it against the memory left after the base and its KV cache
    /// ([`crate::gpu_mem::check_delta_budget`]).
    #[serde(default, deserialize_with = "de_opt_bytes")]
    pub gpu_delta_bytes: Option<u64>,
    /// CPU memory for the cache of deltas not on the GPU, as bytes or a string such as `"16GiB"`.
    #[serde(default, deserialize_with = "de_opt_bytes")]
    pub cpu_cache_bytes: Option<u64>,
    /// Where merge mode writes merged fine-tunes (default: `.deltazip-merged` beside the config file).
    #[serde(default)]
    pub merged_dir: Option<PathBuf>,
    /// Shard the base and every delta over this many GPUs (0..N), one process per GPU, through the
    /// host's NCCL path (a build with the `nccl` feature; see [`crate::tp`]). Default 1.
    #[serde(default = "default_tensor_parallel")]
    pub tensor_parallel: usize,
    /// Swap mode: how many swap models' full weights may be on the GPU at once (the swap tier's GPU
    /// budget is this many times one model's bytes). Default 2.
    #[serde(default = "default_swap_gpu_models")]
    pub swap_gpu_models: usize,
    /// Merge mode: how many merge-mode fine-tunes' engines may be loaded at once (the host's own
    /// unload/reload of models, [`crate::engines`]: a request for an unloaded one waits while the
    /// least recently used idle engine is unloaded and its own is reloaded). Default: no cap, every
    /// merged fine-tune is loaded at start-up and stays.
    #[serde(default)]
    pub merged_gpu_models: Option<usize>,
    /// Merge mode under `merged_gpu_models`: how many seconds a request waits for its model's engine
    /// (to be loaded, or to stop draining) before it fails, naming the loaded engines with their
    /// requests in flight (HTTP 503): a bound for when no engine becomes idle. 0 waits without limit;
    /// at most [`MAX_MERGED_WAIT_S`]. Default [`DEFAULT_MERGED_WAIT_S`]; see [`Self::merged_wait`].
    #[serde(default = "default_merged_wait_s")]
    pub merged_wait_s: u64,
    /// How the KV cache is kept: `paged` (the host's PagedAttention: fixed blocks in one pool of
    /// `kv_cache_bytes`; a decode step batches every running sequence whatever its length) or
    /// `contiguous` (one growing cache per sequence; the host then batches only sequences of equal
    /// length). Default `auto`: paged on a CUDA device in a CUDA build, contiguous otherwise (the host
    /// has no PagedAttention on the CPU).
    #[serde(default)]
    pub kv_cache: KvCacheSpec,
    /// GPU memory for the paged KV cache of each model engine, as bytes or a string such as
    /// `"16GiB"` (default [`DEFAULT_KV_CACHE_BYTES`]). Allocated when the model loads, before any
    /// delta, so it is not shared with `gpu_delta_bytes`.
    #[serde(default, deserialize_with = "de_opt_bytes")]
    pub kv_cache_bytes: Option<u64>,
    /// Background threads that move deltas disk -> CPU -> GPU (several loads in flight: reading and
    /// checking one delta overlaps copying another). At least 1; default 4.
    #[serde(default = "default_load_threads")]
    pub load_threads: usize,
}

fn default_load_threads() -> usize {
    4
}

/// `runtime.merged_wait_s` when not given: two minutes.
pub const DEFAULT_MERGED_WAIT_S: u64 = 120;

/// The longest `runtime.merged_wait_s` accepted (a day; 0 waits without limit).
pub const MAX_MERGED_WAIT_S: u64 = 86_400;

fn default_merged_wait_s() -> u64 {
    DEFAULT_MERGED_WAIT_S
}

/// The paged KV cache's size when `runtime.kv_cache_bytes` is not given: 8 GiB (a 7B Llama in f16
/// keeps 512 KiB per token: 16 384 tokens).
pub const DEFAULT_KV_CACHE_BYTES: u64 = 8 << 30;

/// `runtime.kv_cache`: see [`RuntimeSpec::kv_cache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheSpec {
    /// Paged on CUDA (in a CUDA build), contiguous elsewhere.
    #[default]
    Auto,
    /// The host's PagedAttention (CUDA only).
    Paged,
    /// One contiguous cache per sequence.
    Contiguous,
}

impl RuntimeSpec {
    /// Whether models load with the paged KV cache (`kv_cache` resolved for this device and build).
    pub fn paged_kv_cache(&self) -> bool {
        let cuda = matches!(self.device, DeviceSpec::Cuda(_)) && cfg!(feature = "cuda");
        match self.kv_cache {
            KvCacheSpec::Auto => cuda,
            KvCacheSpec::Paged => true,
            KvCacheSpec::Contiguous => false,
        }
    }

    /// How long a request for a merged model waits for its engine (`merged_wait_s`; `None`: without
    /// limit).
    pub fn merged_wait(&self) -> Option<Duration> {
        (self.merged_wait_s > 0).then(|| Duration::from_secs(self.merged_wait_s))
    }
}

fn default_swap_gpu_models() -> usize {
    2
}

fn default_tensor_parallel() -> usize {
    1
}

impl Default for RuntimeSpec {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Cpu,
            gpu_delta_bytes: None,
            cpu_cache_bytes: None,
            merged_dir: None,
            tensor_parallel: default_tensor_parallel(),
            swap_gpu_models: default_swap_gpu_models(),
            merged_gpu_models: None,
            merged_wait_s: default_merged_wait_s(),
            kv_cache: KvCacheSpec::Auto,
            kv_cache_bytes: None,
            load_threads: default_load_threads(),
        }
    }
}

/// A device: `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad =
            || serde::de::Error::custom(format!("device {s:?}: expected cpu, cuda or cuda:N"));
        match s.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(bad),
        }
    }
}

/// `[scheduler]`: batching across fine-tunes (read by dz-scheduler-ext).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSpec {
    /// Most sequences decoded in one step.
    #[serde(default = "default_max_seqs")]
    pub max_seqs: usize,
    /// Most distinct deltas in one step (each costs one SBMM segment per layer).
    #[serde(default = "default_max_deltas_per_step")]
    pub max_deltas_per_step: usize,
}

fn default_max_seqs() -> usize {
    32
}

fn default_max_deltas_per_step() -> usize {
    8
}

impl Default for SchedulerSpec {
    fn default() -> Self {
        Self {
            max_seqs: default_max_seqs(),
            max_deltas_per_step: default_max_deltas_per_step(),
        }
    }
}

/// Bytes as an integer or a string with a unit: `"512MiB"`, `"8GiB"`, `"2GB"`, `"4096"`.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: u64 = num.replace('_', "").parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    num.checked_mul(mult)
}

fn de_opt_bytes<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(Some(n)),
        Raw::Str(s) => parse_bytes(&s).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{s:?} is not a size: expected bytes or a number with KB/MB/GB/KiB/MiB/GiB"
            ))
        }),
    }
}

/// A delta checked against the base: the file is open, made for this base and this architecture.
pub struct CheckedDelta {
    /// Its entry in the config (path resolved).
    pub spec: DeltaSpec,
    /// The open delta file.
    pub file: DeltaFile,
}

impl Config {
    /// Parses `text` as the config file `file` (paths stay as written; see [`Config::load`] for checks).
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let mut config: Config = toml::from_str(text).map_err(|e| parse_error(&e, text, file))?;
        config.file = file.to_path_buf();
        Ok(config)
    }

    /// Reads, parses and checks a config file: every path resolved against the file's directory and
    /// present, names unique, and every delta made for this base (architecture, then fingerprint).
    /// Returns the config and its deltas, open.
    pub fn load(file: &Path) -> Result<(Self, Vec<CheckedDelta>)> {
        let text = std::fs::read_to_string(file).map_err(|source| Error::Io {
            path: file.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text, file)?;
        config.resolve_paths();
        config.check_static()?;
        let deltas = config.check_deltas()?;
        Ok((config, deltas))
    }

    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Config {
            file: self.file.clone(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// Makes relative paths relative to the config file's directory.
    pub fn resolve_paths(&mut self) {
        let dir = self
            .file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        fix(&mut self.base.path);
        for d in &mut self.deltas {
            fix(&mut d.path);
        }
        if let Some(m) = &mut self.runtime.merged_dir {
            fix(m);
        }
    }

    /// The name clients send for the base itself.
    pub fn base_name(&self) -> String {
        self.base.name.clone().unwrap_or_else(|| {
            self.base
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "base".to_string())
        })
    }

    /// How models load their KV cache ([`RuntimeSpec::paged_kv_cache`], sized by
    /// `runtime.kv_cache_bytes`).
    pub fn kv_cache(&self) -> crate::host::KvCache {
        if self.runtime.paged_kv_cache() {
            crate::host::KvCache::Paged {
                bytes: self
                    .runtime
                    .kv_cache_bytes
                    .unwrap_or(DEFAULT_KV_CACHE_BYTES),
            }
        } else {
            crate::host::KvCache::Contiguous
        }
    }

    /// Where merge mode writes merged fine-tunes.
    pub fn merged_dir(&self) -> PathBuf {
        self.runtime.merged_dir.clone().unwrap_or_else(|| {
            self.file
                .parent()
                .unwrap_or(Path::new(""))
                .join(".deltazip-merged")
        })
    }

    /// The checks that need no delta decoding: files present, names well-formed and unique, sizes sane.
    pub fn check_static(&self) -> Result<()> {
        let base = &self.base.path;
        if !base.is_dir() {
            return Err(self.err(
                "base.path",
                format!("{}: no such directory", base.display()),
            ));
        }
        for f in ["config.json", "tokenizer.json"] {
            if !base.join(f).is_file() {
                return Err(self.err(
                    "base.path",
                    format!("{}: no {f} in the base directory", base.display()),
                ));
            }
        }
        let mut names: HashMap<String, String> = HashMap::new();
        if let Some(n) = &self.base.name {
            check_name(n).map_err(|m| self.err("base.name", m))?;
        }
        names.insert(self.base_name(), "base.name".to_string());
        for (i, d) in self.deltas.iter().enumerate() {
            let field = format!("delta[{i}]");
            check_name(&d.name).map_err(|m| self.err(format!("{field}.name"), m))?;
            if let Some(prev) = names.insert(d.name.clone(), format!("{field}.name")) {
                return Err(self.err(
                    format!("{field}.name"),
                    format!("duplicate name {:?} (also {prev})", d.name),
                ));
            }
            if !d.path.is_file() {
                return Err(self.err(
                    format!("{field}.path"),
                    format!("{}: no such file", d.path.display()),
                ));
            }
        }
        if self.scheduler.max_seqs == 0 {
            return Err(self.err("scheduler.max_seqs", "must be at least 1"));
        }
        if self.scheduler.max_deltas_per_step == 0 {
            return Err(self.err("scheduler.max_deltas_per_step", "must be at least 1"));
        }
        let tp = self.runtime.tensor_parallel;
        if tp == 0 {
            return Err(self.err("runtime.tensor_parallel", "must be at least 1"));
        }
        if tp > 1 && self.runtime.device == DeviceSpec::Cpu {
            return Err(self.err(
                "runtime.tensor_parallel",
                format!("tensor_parallel = {tp} needs device = \"cuda\""),
            ));
        }
        if self.runtime.swap_gpu_models == 0 {
            return Err(self.err(
                "runtime.swap_gpu_models",
                "must be at least 1 (swap models run only from the GPU)",
            ));
        }
        if self.runtime.merged_gpu_models == Some(0) {
            return Err(self.err(
                "runtime.merged_gpu_models",
                "must be at least 1 (a merged fine-tune answers only while its engine is loaded)",
            ));
        }
        if self.runtime.merged_wait_s > MAX_MERGED_WAIT_S {
            return Err(self.err(
                "runtime.merged_wait_s",
                format!(
                    "{} seconds: at most {MAX_MERGED_WAIT_S} (a day); 0 waits without limit",
                    self.runtime.merged_wait_s
                ),
            ));
        }
        if tp > 1 && self.runtime.merged_gpu_models.is_some() {
            return Err(self.err(
                "runtime.merged_gpu_models",
                format!(
                    "unloading and reloading merged engines is single-GPU (tensor_parallel = {tp})"
                ),
            ));
        }
        if self.runtime.kv_cache == KvCacheSpec::Paged {
            if self.runtime.device == DeviceSpec::Cpu {
                return Err(self.err(
                    "runtime.kv_cache",
                    "\"paged\" needs device = \"cuda\" (the host has no PagedAttention on the CPU)",
                ));
            }
            if !cfg!(feature = "cuda") {
                return Err(self.err(
                    "runtime.kv_cache",
                    "\"paged\" needs a CUDA build (cargo build --features cuda)",
                ));
            }
        }
        if self.runtime.load_threads == 0 {
            return Err(self.err("runtime.load_threads", "must be at least 1"));
        }
        if self.runtime.kv_cache_bytes == Some(0) {
            return Err(self.err("runtime.kv_cache_bytes", "must be more than 0"));
        }
        if tp > 1 {
            if let Some(i) = self.deltas.iter().position(|d| d.mode == Mode::Swap) {
                return Err(self.err(
                    format!("delta[{i}].mode"),
                    format!("mode = \"swap\" is single-GPU (tensor_parallel = {tp})"),
                ));
            }
        }
        Ok(())
    }

    /// With `tensor_parallel = N > 1`: the base's heads and features divide evenly over N ranks (as
    /// the host shards them) and every multi-tenant delta can be cut the same way.
    fn check_tensor_parallel(&self, base: &ArchConfig, deltas: &[CheckedDelta]) -> Result<()> {
        let tp = self.runtime.tensor_parallel;
        if tp <= 1 {
            return Ok(());
        }
        for (what, n) in [
            ("num_attention_heads", base.num_heads),
            ("intermediate_size", base.intermediate_size),
            ("hidden_size", base.hidden_size),
        ] {
            if n % tp != 0 {
                return Err(self.err(
                    "runtime.tensor_parallel",
                    format!("the base's {what} ({n}) does not divide over {tp} GPUs"),
                ));
            }
        }
        for (i, d) in deltas.iter().enumerate() {
            if d.spec.mode != Mode::MultiTenant {
                continue;
            }
            let plan = dz_format::shard::tp_plan(&d.file, tp)
                .map_err(|e| self.err(format!("delta[{i}].path"), e.to_string()))?;
            let refused = plan.refused().next().map(|t| {
                let why = match &t.placement {
                    dz_format::shard::Placement::Refused { reason, .. } => reason.clone(),
                    _ => String::new(),
                };
                (t.name.clone(), why)
            });
            if let Some((name, why)) = refused {
                return Err(self.err(
                    format!("delta[{i}].path"),
                    format!(
                        "{}: tensor `{name}` cannot be split over {tp} GPUs as the host splits its \
                         layer ({why}); serve it with mode = \"merge\" or another tensor_parallel",
                        d.spec.path.display(),
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Opens every delta and refuses those made for another architecture or another base: first the
    /// architecture (cheap, and the clearer message), then the base fingerprint (hashes the base once).
    pub fn check_deltas(&self) -> Result<Vec<CheckedDelta>> {
        if self.deltas.is_empty() {
            return Ok(Vec::new());
        }
        let base =
            HfModel::open(&self.base.path).map_err(|e| self.err("base.path", e.to_string()))?;
        let mut files = Vec::with_capacity(self.deltas.len());
        for (i, d) in self.deltas.iter().enumerate() {
            let field = format!("delta[{i}].path");
            let file = DeltaFile::open(&d.path)
                .map_err(|e| self.err(&field, format!("{}: {e}", d.path.display())))?;
            let arch = ArchConfig::from_json(&file.manifest().architecture)
                .map_err(|e| self.err(&field, format!("{}: {e}", d.path.display())))?;
            if let Some(why) = arch_mismatch(base.arch(), &arch) {
                return Err(self.err(
                    &field,
                    format!(
                        "{}: the delta is for another architecture than the base ({why})",
                        d.path.display()
                    ),
                ));
            }
            files.push(file);
        }
        let fp = base
            .fingerprint()
            .map_err(|e| self.err("base.path", e.to_string()))?;
        let mut out = Vec::with_capacity(files.len());
        for (i, (d, file)) in self.deltas.iter().zip(files).enumerate() {
            if let Err(e) = file.manifest().base.check_base(&fp) {
                return Err(self.err(
                    format!("delta[{i}].path"),
                    format!(
                        "{}: the delta was made for another base than {}: {e}",
                        d.path.display(),
                        self.base.path.display()
                    ),
                ));
            }
            out.push(CheckedDelta {
                spec: d.clone(),
                file,
            });
        }
        self.check_tensor_parallel(base.arch(), &out)?;
        Ok(out)
    }
}

/// Names travel in requests and URLs: printable, no whitespace, no `/`.
fn check_name(n: &str) -> std::result::Result<(), String> {
    if n.is_empty() {
        return Err("must not be empty".to_string());
    }
    if n.len() > 128 {
        return Err(format!("{n:?} is longer than 128 bytes"));
    }
    if let Some(c) = n
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '/')
    {
        return Err(format!(
            "{n:?} contains {c:?} (no whitespace, control characters or '/')"
        ));
    }
    Ok(())
}

/// Why a fine-tune's architecture cannot run on the base, or `None` when it can.
fn arch_mismatch(base: &ArchConfig, ft: &ArchConfig) -> Option<String> {
    let pairs: [(&str, String, String); 9] = [
        ("model_type", base.model_type.clone(), ft.model_type.clone()),
        (
            "hidden_size",
            base.hidden_size.to_string(),
            ft.hidden_size.to_string(),
        ),
        (
            "intermediate_size",
            base.intermediate_size.to_string(),
            ft.intermediate_size.to_string(),
        ),
        (
            "num_hidden_layers",
            base.num_layers.to_string(),
            ft.num_layers.to_string(),
        ),
        (
            "num_attention_heads",
            base.num_heads.to_string(),
            ft.num_heads.to_string(),
        ),
        (
            "num_key_value_heads",
            base.num_kv_heads.to_string(),
            ft.num_kv_heads.to_string(),
        ),
        (
            "head_dim",
            base.head_dim.to_string(),
            ft.head_dim.to_string(),
        ),
        (
            "vocab_size",
            base.vocab_size.to_string(),
            ft.vocab_size.to_string(),
        ),
        (
            "tie_word_embeddings",
            base.tie_word_embeddings.to_string(),
            ft.tie_word_embeddings.to_string(),
        ),
    ];
    pairs
        .into_iter()
        .find(|(_, b, f)| b != f)
        .map(|(k, b, f)| format!("{k}: base {b}, delta {f}"))
}

/// One line for a TOML error: position, the table it is in, and the parser's message (which names the key).
fn parse_error(e: &toml::de::Error, text: &str, file: &Path) -> Error {
    let (line, column, context) = match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            (line, column, table_context(before))
        }
        None => (0, 0, String::new()),
    };
    Error::Parse {
        file: file.to_path_buf(),
        line,
        column,
        context,
        message: e.message().trim().to_string(),
    }
}

/// The table header in force at the end of `before`: `[base] `, `[[delta]] #2 ` (1-based), or empty.
fn table_context(before: &str) -> String {
    let mut current = String::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in before.lines() {
        let l = line.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            *n += 1;
            current = format!("[[{name}]] #{n}: ");
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            current = format!("[{}]: ", name.trim());
        }
    }
    current
}

/// The base's identity (architecture and weight fingerprint), computed once, to check deltas that
/// arrive after start-up (a server's hot loads) the way [`Config::check_deltas`] checks the config's.
pub struct BaseIdentity {
    arch: ArchConfig,
    fingerprint: dz_format::BaseFingerprint,
}

impl BaseIdentity {
    /// Reads the base at `path` and fingerprints its weights (hashes every tensor once).
    pub fn of(path: &Path) -> Result<Self> {
        let base = HfModel::open(path)?;
        let fingerprint = base.fingerprint()?;
        Ok(Self {
            arch: base.arch().clone(),
            fingerprint,
        })
    }

    /// Opens the delta at `path` for a fine-tune to be served as `name`, in `mode`, and checks it
    /// against this base: the name is valid, the file a delta, made for this architecture and this
    /// base. The error says which, in one line.
    pub fn check(
        &self,
        name: &str,
        path: &Path,
        mode: Mode,
    ) -> std::result::Result<CheckedDelta, String> {
        check_name(name).map_err(|e| format!("name: {e}"))?;
        let file = DeltaFile::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let arch = ArchConfig::from_json(&file.manifest().architecture)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(why) = arch_mismatch(&self.arch, &arch) {
            return Err(format!(
                "{}: the delta is for another architecture than the base ({why})",
                path.display()
            ));
        }
        file.manifest()
            .base
            .check_base(&self.fingerprint)
            .map_err(|e| {
                format!(
                    "{}: the delta was made for another base: {e}",
                    path.display()
                )
            })?;
        Ok(CheckedDelta {
            spec: DeltaSpec {
                name: name.to_string(),
                path: path.to_path_buf(),
                mode,
            },
            file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("x.toml"))
    }

    #[test]
    fn minimal_and_full_configs_parse() {
        let c = parse("[base]\npath = \"m\"\n").unwrap();
        assert_eq!(c.base.dtype, DtypeSpec::Auto);
        assert!(c.deltas.is_empty());
        assert_eq!(c.runtime.device, DeviceSpec::Cpu);
        let c = parse(
            r#"
            [base]
            path = "m"
            dtype = "bf16"
            name = "llama"
            [runtime]
            device = "cuda:1"
            gpu_delta_bytes = "8GiB"
            cpu_cache_bytes = 1000
            [scheduler]
            max_seqs = 4
            max_deltas_per_step = 2
            [[delta]]
            name = "a"
            path = "a.dz"
            [[delta]]
            name = "b"
            path = "b.dz"
            mode = "merge"
            "#,
        )
        .unwrap();
        assert_eq!(c.base.dtype, DtypeSpec::Bf16);
        assert_eq!(c.runtime.device, DeviceSpec::Cuda(1));
        assert_eq!(c.runtime.gpu_delta_bytes, Some(8 << 30));
        assert_eq!(c.runtime.cpu_cache_bytes, Some(1000));
        assert_eq!(c.deltas[0].mode, Mode::MultiTenant);
        assert_eq!(c.deltas[1].mode, Mode::Merge);
        assert_eq!(c.scheduler.max_deltas_per_step, 2);
    }

    #[test]
    fn unknown_key_names_the_key_the_table_and_the_line() {
        let text = "[base]\npath = \"m\"\n[[delta]]\nname = \"a\"\npath = \"a.dz\"\n[[delta]]\nnmae = \"b\"\n";
        let e = parse(text).unwrap_err().to_string();
        assert!(
            e.starts_with("x.toml:7:1: [[delta]] #2: unknown field `nmae`"),
            "{e}"
        );
        let e = parse("[base]\npath = \"m\"\ncolour = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x.toml:3:1: [base]: unknown field `colour`"),
            "{e}"
        );
        let e = parse("[base]\npath = \"m\"\n[server]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `server`"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e =
            parse("[base]\npath = \"m\"\n[[delta]]\nname = \"a\"\npath = \"a\"\nmode = \"fast\"\n")
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("x.toml:6:") && e.contains("unknown variant `fast`"),
            "{e}"
        );
        let e = parse("[base]\npath = \"m\"\ndtype = \"f64\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml:3:") && e.contains("f64"), "{e}");
        let e = parse("[base]\npath = \"m\"\n[runtime]\ndevice = \"tpu\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.toml:4:") && e.contains("expected cpu, cuda or cuda:N"),
            "{e}"
        );
        let e = parse("[base]\npath = \"m\"\n[runtime]\ncpu_cache_bytes = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"lots\" is not a size"), "{e}");
        let e = parse("[base]\ndtype = \"f32\"\n").unwrap_err().to_string();
        assert!(e.contains("missing field `path`"), "{e}");
        let e = parse("[[delta]]\nname = \"a\"\npath = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `base`"), "{e}");
    }

    #[test]
    fn the_commented_example_parses() {
        let text = include_str!("../../../examples/serve.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.deltas.len(), 2);
        assert_eq!(c.deltas[0].mode, Mode::Merge);
        assert_eq!(c.runtime.device, DeviceSpec::Cuda(0));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("2 GB"), Some(2_000_000_000));
        assert_eq!(parse_bytes("1_000KB"), Some(1_000_000));
        assert_eq!(parse_bytes("3 parsecs"), None);
        assert_eq!(parse_bytes("GiB"), None);
        assert_eq!(parse_bytes("99999999999999TiB"), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("llama-7b-sql").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("../x").is_err());
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let mut c = Config::parse(
            "[base]\npath = \"m\"\n[[delta]]\nname = \"a\"\npath = \"/abs/a.dz\"\n",
            Path::new("/etc/dz/x.toml"),
        )
        .unwrap();
        c.resolve_paths();
        assert_eq!(c.base.path, Path::new("/etc/dz/m"));
        assert_eq!(c.deltas[0].path, Path::new("/abs/a.dz"));
        assert_eq!(c.merged_dir(), Path::new("/etc/dz/.deltazip-merged"));
        assert_eq!(c.base_name(), "m");
    }
}

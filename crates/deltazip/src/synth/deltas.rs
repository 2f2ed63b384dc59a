//! `deltazip synth deltas`: random delta files for a base, valid in every way the reader, `inspect
//! --verify` and the loader check, generated directly in packed form (no dense delta, no compressor).
//!
//! Each file holds what `deltazip compress` writes by default: every linear layer of every block in the
//! chosen codec (group 128, symmetric), the output head (all rows) and the token embedding (a seeded
//! subset of about 30% of its rows, as a fine-tune moves only the rows of tokens it saw) as 4-bit
//! `quant`, and a dense f32 delta for every RMSNorm (and bias). Codes are uniform random, 2:4 metadata
//! is one of the six valid nibbles at random, and group scales are chosen so that the delta's RMS is
//! `scale` times the base tensor's RMS (norms: `0.2 * scale`), each scale jittered by ±25%. The base is
//! fingerprinted once for all files; file `i` has its own seed, so every file differs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dz_compress::hf::HfModel;
use dz_format::codec::pack_row_index;
use dz_format::layout::{part_layout, stride, PartLen};
use dz_format::{
    Codec, Compression, DeltaWriter, Dtype, EncodedPart, EncodedTensor, QuantParams, Recipe, Role,
};
use rayon::prelude::*;

use super::rng::{name_hash, Stream};
use super::Bar;

/// Columns per quantization group (the compressor's default).
pub const GROUP_SIZE: u32 = 128;
/// Bits of the embedding and output-head deltas (the compressor's default `--embed-bits`).
pub const EMBED_BITS: u8 = 4;
/// The fraction of embedding rows a synthetic fine-tune moves.
pub const EMBED_ROWS_MOVED: f32 = 0.3;
/// Norm deltas relative to `scale`: a norm moves less than a weight matrix does.
pub const NORM_SCALE: f32 = 0.2;

/// The codec of the linear layers, named as `deltazip bench quality` names its recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthCodec {
    /// 4-bit, 2:4 sparse (`sparse24 4b g128 sym`): `deltazip compress`'s default.
    #[value(name = "4b24")]
    Q4S24,
    /// 2-bit, 2:4 sparse (`sparse24 2b g128 sym`).
    #[value(name = "2b24")]
    Q2S24,
    /// 4-bit dense (`quant 4b g128 sym`).
    #[value(name = "4b")]
    Q4,
    /// 2-bit dense (`quant 2b g128 sym`).
    #[value(name = "2b")]
    Q2,
    /// 8-bit dense (`quant 8b g128 sym`).
    #[value(name = "8b")]
    Q8,
}

impl SynthCodec {
    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            SynthCodec::Q4S24 => "4b24",
            SynthCodec::Q2S24 => "2b24",
            SynthCodec::Q4 => "4b",
            SynthCodec::Q2 => "2b",
            SynthCodec::Q8 => "8b",
        }
    }

    fn bits(self) -> u8 {
        match self {
            SynthCodec::Q4S24 | SynthCodec::Q4 => 4,
            SynthCodec::Q2S24 | SynthCodec::Q2 => 2,
            SynthCodec::Q8 => 8,
        }
    }

    fn two_four(self) -> bool {
        matches!(self, SynthCodec::Q4S24 | SynthCodec::Q2S24)
    }

    /// The codec of linear deltas.
    pub fn codec(self) -> Codec {
        let p = params(self.bits());
        if self.two_four() {
            Codec::Sparse24(p)
        } else {
            Codec::Quant(p)
        }
    }
}

fn params(bits: u8) -> QuantParams {
    QuantParams {
        bits,
        group_size: GROUP_SIZE,
        symmetric: true,
        global_scale: 1.0,
    }
}

/// Options of `deltazip synth deltas`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeltasArgs {
    /// The base model directory (config.json + safetensors), e.g. from `deltazip synth model`.
    #[arg(long)]
    pub base: PathBuf,
    /// Codec of the linear layers: 4b24, 2b24 (2:4 sparse), 4b, 2b, 8b (dense); group 128, symmetric.
    #[arg(long, value_enum, default_value = "4b24")]
    pub codec: SynthCodec,
    /// Number of delta files: ft-00.dz, ft-01.dz, ...
    #[arg(long, default_value_t = 8)]
    pub count: usize,
    /// Seed; file i is made from (seed, i), so every file differs and the same seed gives the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// RMS of each linear/embedding/head delta relative to the base tensor's RMS (norm deltas: 0.2 x this).
    #[arg(long, default_value_t = 0.05)]
    pub scale: f32,
    /// Directory for the delta files (created if needed).
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Also write a serve config (TOML) naming the base and every delta as multi-tenant.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// `runtime.device` of the serve config: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Files written at once (each is generated in parallel too; each needs twice its size on disk while
    /// in flight).
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
}

/// What one tensor of a synthetic delta is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// A linear layer: the chosen codec.
    Linear,
    /// The untied output head: 4-bit, every row.
    Head,
    /// The token embedding (and a tied head): 4-bit, a subset of rows.
    Embedding,
    /// A norm or bias: dense f32.
    Dense,
    /// Anything else (buffers): a zero delta.
    Zero,
}

/// One tensor to generate in every file.
#[derive(Debug, Clone)]
struct Item {
    name: String,
    role: Role,
    kind: Kind,
    shape: Vec<u64>,
    dtype: Dtype,
    rows: usize,
    cols: usize,
    /// RMS of the base tensor (sampled).
    rms: f32,
}

/// What [`write_deltas`] wrote.
#[derive(Debug, Clone)]
pub struct DeltasReport {
    /// The delta files, in order.
    pub files: Vec<PathBuf>,
    /// Bytes of all files.
    pub bytes: u64,
    /// Seconds spent fingerprinting the base (and sampling its RMS).
    pub fingerprint_seconds: f64,
    /// Seconds spent generating and writing the files.
    pub write_seconds: f64,
    /// The serve config written, if any.
    pub config: Option<PathBuf>,
}

/// RMS of up to 65536 evenly spaced values of a tensor's stored bytes.
fn sampled_rms(bytes: &[u8], dtype: Dtype) -> f32 {
    let size = dtype.size();
    let n = bytes.len() / size;
    if n == 0 {
        return 0.0;
    }
    let step = n.div_ceil(65536).max(1);
    let (mut sum, mut count) = (0f64, 0usize);
    for i in (0..n).step_by(step) {
        let b = &bytes[i * size..(i + 1) * size];
        let v = match dtype {
            Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        };
        if v.is_finite() {
            sum += f64::from(v) * f64::from(v);
            count += 1;
        }
    }
    (sum / count.max(1) as f64).sqrt() as f32
}

/// Every tensor of the base, in the order `deltazip compress` writes them: linear layers block by block
/// (q, k, v, o, gate, up, down), the output head, the embedding, then the rest by name.
fn plan(base: &HfModel, codec: SynthCodec) -> Result<Vec<Item>> {
    let arch = base.arch();
    let mut linear = Vec::new();
    for i in 0..arch.num_layers {
        for group in arch.linear_groups(i) {
            linear.extend(group);
        }
    }
    let tied = arch.tie_word_embeddings || base.info("lm_head.weight").is_none();
    let embedding = "model.embed_tokens.weight".to_string();
    let mut order: Vec<(String, Role, Kind)> = linear
        .iter()
        .map(|n| (n.clone(), Role::Linear, Kind::Linear))
        .collect();
    if !tied {
        order.push(("lm_head.weight".into(), Role::LmHead, Kind::Head));
    }
    order.push((embedding.clone(), Role::Embedding, Kind::Embedding));
    let taken: BTreeSet<String> = order.iter().map(|o| o.0.clone()).collect();
    for n in base.names().filter(|n| !taken.contains(*n)) {
        let kind = if n.ends_with("norm.weight") || n.ends_with(".bias") {
            Kind::Dense
        } else {
            Kind::Zero
        };
        order.push((n.to_string(), Role::DenseDelta, kind));
    }
    order
        .into_par_iter()
        .map(|(name, role, kind)| {
            let info = base
                .info(&name)
                .with_context(|| format!("the base has no tensor {name:?}"))?;
            let k = info.shape.last().copied().unwrap_or(1).max(1);
            let rows = info.numel() / k;
            if kind == Kind::Linear && codec.two_four() && !k.is_multiple_of(4) {
                bail!(
                    "{name}: {k} columns; 2:4 sparsity ({}) needs a multiple of 4",
                    codec.as_str()
                );
            }
            let rms = sampled_rms(base.raw(&name)?, info.dtype);
            Ok(Item {
                shape: info.shape.iter().map(|&d| d as u64).collect(),
                dtype: info.dtype,
                rows,
                cols: k,
                rms,
                name,
                role,
                kind,
            })
        })
        .collect()
}

/// Mean square of the symmetric grid's values `q - 2^(bits-1)` over uniform codes.
fn code_mean_square(bits: u8) -> f32 {
    let z = (1i64 << (bits - 1)) as f64;
    let n = 1i64 << bits;
    ((0..n).map(|q| (q as f64 - z).powi(2)).sum::<f64>() / n as f64) as f32
}

/// `E[(0.75 + 0.5u)^2]` for uniform `u`: the mean square of the scales' jitter.
const JITTER_MEAN_SQUARE: f32 = 0.5625 + 0.375 + 0.25 / 3.0;

/// Random bit-stream rows: `rows` rows of `per_row` values of `bits` bits, zero padding.
fn random_rows(stream: Stream, rows: usize, per_row: usize, bits: u8) -> Vec<u8> {
    let row_bytes = stride(per_row, bits).unwrap_or(0);
    let used_bits = per_row * bits as usize;
    let data = used_bits.div_ceil(8);
    let mut out = vec![0u8; rows * row_bytes];
    if row_bytes == 0 {
        return out;
    }
    out.par_chunks_mut(row_bytes)
        .enumerate()
        .for_each(|(r, row)| {
            // Row starts are 16-byte aligned: word w of row r is word r * row_bytes / 8 + w of the stream.
            let base = (r * row_bytes / 8) as u64;
            for (w, dst) in row[..data].chunks_mut(8).enumerate() {
                let bytes = stream.word(base + w as u64).to_le_bytes();
                dst.copy_from_slice(&bytes[..dst.len()]);
            }
            if !used_bits.is_multiple_of(8) {
                row[data - 1] &= (1u8 << (used_bits % 8)) - 1;
            }
        });
    out
}

/// Random 2:4 metadata: `rows` rows of `runs` nibbles, each one of the six valid `i0 | i1 << 2` (i0 < i1).
fn random_meta(stream: Stream, rows: usize, runs: usize) -> Vec<u8> {
    const VALID: [u8; 6] = [0x4, 0x8, 0x9, 0xC, 0xD, 0xE];
    let row_bytes = stride(runs, 4).unwrap_or(0);
    let mut out = vec![0u8; rows * row_bytes];
    if row_bytes == 0 {
        return out;
    }
    out.par_chunks_mut(row_bytes)
        .enumerate()
        .for_each(|(r, row)| {
            let base = (r * row_bytes / 2) as u64;
            // One word gives four nibbles (16 bits each, mapped onto 0..6 by a multiply-shift).
            for (w, pair) in row[..runs.div_ceil(2)].chunks_mut(2).enumerate() {
                let word = stream.word(base + w as u64);
                for (j, byte) in pair.iter_mut().enumerate() {
                    let nib = |s: u32| VALID[((((word >> s) & 0xFFFF) * 6) >> 16) as usize];
                    let lo = nib(32 * j as u32);
                    let hi = nib(32 * j as u32 + 16);
                    *byte = lo | (hi << 4);
                }
            }
            if runs % 2 == 1 {
                row[runs / 2] &= 0x0F;
            }
        });
    out
}

/// `n` f16 group scales around `s`, each jittered by a factor in [0.75, 1.25).
fn random_scales(stream: Stream, n: usize, s: f32) -> Vec<u8> {
    let mut out = vec![0u8; n * 2];
    out.par_chunks_mut(2).enumerate().for_each(|(i, d)| {
        let v = s * (0.75 + 0.5 * stream.uniform(i as u64));
        d.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    });
    out
}

/// The encoded tensor `item` of the file seeded `file_seed`.
fn generate(item: &Item, codec: SynthCodec, file_seed: u64, scale: f32) -> Result<EncodedTensor> {
    let key = name_hash(&item.name);
    let stream = |part: u64| Stream::new(&[file_seed, key, part]);
    let (codec, subset): (Codec, Option<Vec<u32>>) = match item.kind {
        Kind::Linear => (codec.codec(), None),
        Kind::Head => (Codec::Quant(params(EMBED_BITS)), None),
        Kind::Embedding => {
            let s = stream(0);
            let mut rows: Vec<u32> = (0..item.rows as u32)
                .filter(|&r| s.uniform(u64::from(r)) < EMBED_ROWS_MOVED)
                .collect();
            if rows.is_empty() {
                rows.push((s.word(u64::MAX) % item.rows.max(1) as u64) as u32);
            }
            let subset = (rows.len() < item.rows).then_some(rows);
            (Codec::Quant(params(EMBED_BITS)), subset)
        }
        Kind::Dense => (Codec::Dense { dtype: Dtype::F32 }, None),
        Kind::Zero => (Codec::Zero, None),
    };
    let n = subset.as_ref().map_or(item.rows, Vec::len);
    let k = item.cols;
    let layout = part_layout(&item.name, &codec, n, k, subset.is_some())?;
    let mut parts = Vec::with_capacity(layout.len());
    for (i, spec) in layout.iter().enumerate() {
        let s = stream(1 + i as u64);
        let bytes = match (spec.name, &codec) {
            ("row_index", _) => pack_row_index(subset.as_deref().unwrap_or_default()),
            ("codes", Codec::Sparse24(p)) => random_rows(s, n, k / 2, p.bits),
            ("codes", Codec::Quant(p)) => random_rows(s, n, k, p.bits),
            ("meta", Codec::Sparse24(_)) => random_meta(s, n, k / 4),
            ("scales", Codec::Sparse24(p) | Codec::Quant(p)) => {
                let density: f32 = if matches!(codec, Codec::Sparse24(_)) {
                    0.5
                } else {
                    1.0
                };
                let target = scale * item.rms;
                let per_scale =
                    target / (code_mean_square(p.bits) * density * JITTER_MEAN_SQUARE).sqrt();
                random_scales(s, n * p.n_groups(k), per_scale)
            }
            ("values", Codec::Dense { .. }) => {
                let std = NORM_SCALE * scale * item.rms;
                (0..n * k)
                    .flat_map(|j| (std * s.normal(j as u64)).to_le_bytes())
                    .collect()
            }
            (other, c) => bail!(
                "internal: no generator for part {other:?} of codec {}",
                c.describe()
            ),
        };
        if let PartLen::Exact(len) = spec.len {
            if bytes.len() != len {
                bail!(
                    "internal: {} part {} is {} bytes, the layout needs {len}",
                    item.name,
                    spec.name,
                    bytes.len()
                );
            }
        }
        parts.push(EncodedPart {
            name: spec.name.to_string(),
            raw_len: bytes.len() as u64,
            compression: Compression::None,
            bytes,
        });
    }
    Ok(EncodedTensor {
        name: item.name.clone(),
        role: item.role,
        shape: item.shape.clone(),
        dtype: item.dtype,
        codec,
        rows: subset.map(|r| r.len() as u64),
        parts,
    })
}

/// A file written: its path and length.
type Written = (PathBuf, u64);

/// The name of delta `i` of `count`: `ft-00`, `ft-01`, ... (at least two digits).
pub fn delta_name(i: usize, count: usize) -> String {
    let width = count.saturating_sub(1).to_string().len().max(2);
    format!("ft-{i:0width$}")
}

/// The seed of file `i`.
fn file_seed(seed: u64, i: usize) -> u64 {
    super::rng::key(&[seed, 0xde17a, i as u64])
}

/// TOML basic string.
fn toml_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The serve config: the base and every delta, multi-tenant.
fn serve_config(base: &Path, files: &[(String, PathBuf)], device: &str) -> String {
    let mut s = String::from(
        "# Written by `deltazip synth deltas`: a base with random weights and synthetic fine-tunes,\n\
         # every one multi-tenant (see examples/serve.toml for the other keys).\n\n[base]\n",
    );
    let _ = writeln!(s, "path = {}", toml_quote(&base.to_string_lossy()));
    let _ = writeln!(s, "name = \"base\"\n");
    for (name, path) in files {
        let _ = writeln!(
            s,
            "[[delta]]\nname = {}\npath = {}\nmode = \"multi-tenant\"\n",
            toml_quote(name),
            toml_quote(&path.to_string_lossy())
        );
    }
    let _ = writeln!(s, "[runtime]\ndevice = {}", toml_quote(device));
    s
}

/// Runs `deltazip synth deltas`.
pub fn write_deltas(args: &DeltasArgs, bar: &Bar) -> Result<DeltasReport> {
    if !args.base.is_dir() {
        bail!("--base {}: no such directory", args.base.display());
    }
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    if !(args.scale.is_finite() && args.scale > 0.0) {
        bail!("--scale must be a number > 0, got {}", args.scale);
    }
    if args.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    if !matches!(args.device.as_str(), "cpu" | "cuda")
        && args
            .device
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .is_none()
    {
        bail!("--device {:?}: expected cpu, cuda or cuda:N", args.device);
    }
    let t0 = Instant::now();
    let base =
        HfModel::open(&args.base).with_context(|| format!("--base {}", args.base.display()))?;
    base.check_matches_arch()?;
    if base.arch().family != dz_compress::arch::Family::Llama {
        bail!(
            "--base {}: model_type {:?}; synthetic deltas are made for Llama-layout models (no biases)",
            args.base.display(),
            base.arch().model_type
        );
    }
    bar.start_count(1, "fingerprint");
    let fingerprint = base.fingerprint()?;
    let items = plan(&base, args.codec)?;
    bar.finish();
    let fingerprint_seconds = t0.elapsed().as_secs_f64();

    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let t1 = Instant::now();
    let mut recipe = Recipe {
        tool: format!("deltazip {} synth", env!("CARGO_PKG_VERSION")),
        method: "synth".into(),
        bits: Some(args.codec.bits()),
        sparsity: Some(if args.codec.two_four() { "2:4" } else { "none" }.into()),
        group_size: Some(GROUP_SIZE),
        symmetric: Some(true),
        target_ratio: None,
        extra: BTreeMap::new(),
    };
    recipe.extra.insert("embed_bits".into(), EMBED_BITS.into());
    recipe
        .extra
        .insert("synth_codec".into(), args.codec.as_str().into());
    recipe
        .extra
        .insert("synth_scale".into(), f64::from(args.scale).into());

    bar.start_count((args.count * items.len()) as u64, "deltas");
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Result<Written>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..args.jobs.min(args.count) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.count {
                    break;
                }
                let name = delta_name(i, args.count);
                let path = args.out_dir.join(format!("{name}.dz"));
                let r = (|| -> Result<Written> {
                    let fs = file_seed(args.seed, i);
                    let mut recipe = recipe.clone();
                    recipe.extra.insert("synth_seed".into(), fs.into());
                    let mut w = DeltaWriter::create(
                        &path,
                        &name,
                        base.config_json().clone(),
                        fingerprint.clone(),
                        recipe,
                    )?;
                    for item in &items {
                        w.add(generate(item, args.codec, fs, args.scale)?)?;
                        bar.inc(1);
                    }
                    let summary = w.finish()?;
                    Ok((summary.path, summary.file_len))
                })()
                .with_context(|| format!("writing {}", path.display()));
                let failed = r.is_err();
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, r));
                if failed {
                    // Let the other workers stop after their current file.
                    next.store(args.count, Ordering::Relaxed);
                }
            });
        }
    });
    bar.finish();
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|r| r.0);
    let mut files = Vec::with_capacity(args.count);
    let mut bytes = 0;
    for (_, r) in results {
        let (p, len) = r?;
        files.push(p);
        bytes += len;
    }
    let write_seconds = t1.elapsed().as_secs_f64();

    let config = match &args.config {
        None => None,
        Some(path) => {
            let abs = |p: &Path| {
                std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))
            };
            let named: Vec<(String, PathBuf)> = files
                .iter()
                .enumerate()
                .map(|(i, p)| Ok((delta_name(i, args.count), abs(p)?)))
                .collect::<Result<_>>()?;
            let text = serve_config(&abs(&args.base)?, &named, &args.device);
            dz_loader::Config::parse(&text, path)
                .context("internal: the serve config written does not parse")?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let tmp = path.with_extension("toml.tmp");
            std::fs::write(&tmp, &text)
                .and_then(|()| std::fs::rename(&tmp, path))
                .with_context(|| format!("writing {}", path.display()))?;
            Some(path.clone())
        }
    };
    Ok(DeltasReport {
        files,
        bytes,
        fingerprint_seconds,
        write_seconds,
        config,
    })
}

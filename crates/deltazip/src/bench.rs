//! `deltazip bench compress`: how long ΔCompress takes, on a real model pair or on a generated stack of
//! layers of a 7B/13B shape (random weights of realistic scale, never zeros), on CPU or CUDA.
//!
//! Results go to a markdown table and a JSON file (machine, GPU, commit, date, numbers), for
//! `bench/results/`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dz_compress::arch::Family;
use dz_compress::fixtures::{self, TinySpec};
use dz_compress::pipeline::{self, Progress, TensorReport};
use dz_format::Dtype;

use crate::compress::{parse_device, parse_sparsity, Bars};

/// `deltazip bench ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// Time ΔCompress on a model pair, or on a generated layer stack of a given shape.
    Compress(BenchCompressArgs),
}

/// Options of `deltazip bench compress`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchCompressArgs {
    /// A real base model directory (with --finetuned); otherwise a pair is generated from --shape.
    #[arg(long, requires = "finetuned")]
    pub base: Option<PathBuf>,
    /// The fine-tune to compress against --base.
    #[arg(long, requires = "base")]
    pub finetuned: Option<PathBuf>,
    /// Shape of the generated pair: 7b (4096/11008, 32 heads), 13b (5120/13824, 40 heads), smollm2.
    #[arg(long, default_value = "7b")]
    pub shape: String,
    /// Decoder layers of the generated stack.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Vocabulary of the generated stack.
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    /// Working directory for the generated pair and the delta (default: a temporary directory).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`: where activations and Hessians are computed.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Bits of linear deltas.
    #[arg(long, default_value_t = 4)]
    pub bits: u8,
    /// Sparsity: 2:4, none, or a pruned fraction.
    #[arg(long, default_value = "2:4", value_parser = parse_sparsity)]
    pub sparsity: dz_compress::Sparsity,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Calibration text (default: the built-in text).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Write `<stem>.md` and `<stem>.json` with the results.
    #[arg(long, value_name = "STEM")]
    pub results: Option<PathBuf>,
    /// The commit measured (default: `git rev-parse HEAD`, when there is a repository).
    #[arg(long)]
    pub commit: Option<String>,
}

/// Records when each phase and step happened.
struct Timeline {
    bars: Bars,
    t0: Instant,
    phases: Vec<(String, f64)>,
    steps: Vec<(String, f64)>,
    tensors: Vec<TensorReport>,
}

impl Progress for Timeline {
    fn phase(&mut self, name: &str, total: usize) {
        self.phases
            .push((name.to_string(), self.t0.elapsed().as_secs_f64()));
        self.bars.phase(name, total);
    }
    fn step(&mut self, msg: &str) {
        self.steps
            .push((msg.to_string(), self.t0.elapsed().as_secs_f64()));
        self.bars.step(msg);
    }
    fn tensor(&mut self, r: &TensorReport) {
        self.tensors.push(r.clone());
    }
    fn note(&mut self, msg: &str) {
        self.bars.note(msg);
    }
}

fn preset(shape: &str, layers: usize, vocab: usize) -> Result<TinySpec> {
    let (hidden, ffn, heads, kv) = match shape {
        "7b" => (4096, 11008, 32, 32),
        "13b" => (5120, 13824, 40, 40),
        "smollm2" => (576, 1536, 9, 3),
        _ => bail!("unknown shape {shape:?} (7b, 13b, smollm2)"),
    };
    Ok(TinySpec {
        family: Family::Llama,
        hidden,
        layers,
        heads,
        kv_heads: kv,
        ffn,
        vocab,
        tied: false,
        dtype: Dtype::Bf16,
        seed: 7,
    })
}

fn sh(cmd: &str, args: &[&str]) -> Option<String> {
    let o = std::process::Command::new(cmd).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The machine: CPU model and cores, GPU name if any.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let gpu = sh(
        "nvidia-smi",
        &[
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader",
        ],
    );
    serde_json::json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "gpu": gpu,
    })
}

/// Runs `deltazip bench compress`; returns the table to print.
pub fn run_compress(args: &BenchCompressArgs) -> Result<String> {
    let device = parse_device(&args.device)?;
    let tmp;
    let work = match &args.workdir {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            w.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let t_gen = Instant::now();
    let (base, ft, label) = match (&args.base, &args.finetuned) {
        (Some(b), Some(f)) => (
            b.clone(),
            f.clone(),
            format!("{} vs {}", f.display(), b.display()),
        ),
        _ => {
            let spec = preset(&args.shape, args.layers, args.vocab)?;
            let root = work.join(format!("{}-{}l", args.shape, args.layers));
            let fam = if root.join("base").join("config.json").exists() {
                fixtures::TinyFamily {
                    base: root.join("base"),
                    finetunes: vec![root.join("ft-0")],
                    calib_text: root.join("calib.txt"),
                }
            } else {
                eprintln!(
                    "generating a {}-shaped stack of {} layers (bf16, random weights)...",
                    args.shape, args.layers
                );
                fixtures::write_family(&root, &spec, 1).context("generating the model pair")?
            };
            (
                fam.base,
                fam.finetunes[0].clone(),
                format!(
                    "{}-shaped stack, {} layers, vocab {}",
                    args.shape, args.layers, args.vocab
                ),
            )
        }
    };
    let gen_s = t_gen.elapsed().as_secs_f64();
    let mut opts = pipeline::CompressOptions {
        device,
        samples: args.samples,
        seq_len: args.seq_len,
        calib_text: args.calib.clone(),
        ..Default::default()
    };
    opts.quant.bits = args.bits;
    opts.quant.sparsity = args.sparsity;
    let out = work.join("bench.dz");
    let mut tl = Timeline {
        bars: Bars::default(),
        t0: Instant::now(),
        phases: Vec::new(),
        steps: Vec::new(),
        tensors: Vec::new(),
    };
    let report = pipeline::compress(&base, &ft, &out, &opts, &mut tl)?;
    let total = tl.t0.elapsed().as_secs_f64();
    drop(std::mem::take(&mut tl.bars));

    let phase_secs: Vec<(String, f64)> = tl
        .phases
        .iter()
        .enumerate()
        .map(|(i, (n, t))| {
            let end = tl.phases.get(i + 1).map_or(total, |p| p.1);
            (n.clone(), end - t)
        })
        .collect();
    let layers = dz_compress::hf::HfModel::open(&ft)?.arch().num_layers;
    let compress_s = phase_secs
        .iter()
        .find(|(n, _)| n == "compress")
        .map_or(0.0, |p| p.1);
    let commit = args
        .commit
        .clone()
        .or_else(|| sh("git", &["rev-parse", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let date = sh("date", &["-u", "+%Y-%m-%d"]).unwrap_or_default();
    let json = serde_json::json!({
        "bench": "compress",
        "model": label,
        "machine": machine(),
        "device": args.device,
        "commit": commit,
        "date": date,
        "recipe": format!("{} bits, sparsity {:?}, group 128, OBS", args.bits, args.sparsity),
        "samples": report.calib_windows,
        "seq_len": args.seq_len,
        "layers": layers,
        "generate_s": gen_s,
        "total_s": total,
        "phases_s": phase_secs.iter().map(|(n, s)| serde_json::json!({"phase": n, "seconds": s})).collect::<Vec<_>>(),
        "seconds_per_layer": compress_s / layers.max(1) as f64,
        "file_bytes": report.file_bytes,
        "bf16_bytes": report.bf16_bytes,
        "ratio": report.ratio(),
    });
    let mut md = String::new();
    let _ = writeln!(md, "## ΔCompress time: {label}\n");
    let _ = writeln!(
        md,
        "machine: {} | device `{}` | commit `{}` | {}\n",
        json["machine"], args.device, commit, date
    );
    let _ = writeln!(md, "| phase | seconds |\n|---|---|");
    for (n, s) in &phase_secs {
        let _ = writeln!(md, "| {n} | {s:.1} |");
    }
    let _ = writeln!(md, "| **total** | **{total:.1}** |");
    let _ = writeln!(
        md,
        "\n{layers} layers, {:.2} s per layer (calibration + OBS), {} calibration windows of {} tokens; \
         delta {} bytes, {:.2}x smaller than bf16 ({} bits, {:?}).",
        compress_s / layers.max(1) as f64,
        report.calib_windows,
        args.seq_len,
        report.file_bytes,
        report.ratio(),
        args.bits,
        args.sparsity
    );
    if let Some(stem) = &args.results {
        std::fs::write(stem.with_extension("md"), &md)?;
        std::fs::write(
            stem.with_extension("json"),
            serde_json::to_string_pretty(&json)?,
        )?;
    }
    Ok(md)
}

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
    /// How much of each fine-tune survives compression: size, perplexity, gain kept, KL, per recipe.
    Quality(BenchQualityArgs),
    /// Load-test an OpenAI-compatible server: Poisson arrivals over many models, throughput, TTFT, TPOT.
    #[command(long_about = crate::bench_serve::LONG_ABOUT)]
    Serve(crate::bench_serve::BenchServeArgs),
    /// The multi-tenant hook's CPU cost per module call (one decoder layer, many fine-tunes), in seconds.
    Hook(crate::bench_hook::BenchHookArgs),
}

/// Options of `deltazip bench quality`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchQualityArgs {
    /// The base model directory.
    #[arg(long)]
    pub base: PathBuf,
    /// Fine-tuned model directories, each `NAME=DIR` or `DIR`; repeat the flag for several.
    #[arg(long, required = true)]
    pub finetuned: Vec<String>,
    /// Per fine-tune, its domain text (`NAME=FILE`, or one FILE for all); the last 10% is held out.
    #[arg(long, required = true)]
    pub domain_text: Vec<String>,
    /// General text for forgetting (the last 10% is used).
    #[arg(long)]
    pub general_text: PathBuf,
    /// Recipes: 8b, 4b24, 2b24, 2b50 (2-bit, 50% unstructured), 4b, 2b, sign, t10 (target ratio 10), t16.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "8b,4b24,2b24,2b50,sign,t10,t16"
    )]
    pub recipes: Vec<String>,
    /// Methods to run each recipe with: obs (ours) and rtn (baseline); sign runs once. A target ratio
    /// with rtn chooses among RTN recipes by their plain (uncalibrated) error.
    #[arg(long, value_delimiter = ',', default_value = "obs,rtn")]
    pub methods: Vec<String>,
    /// Bits of embedding (and lm_head) deltas in the fixed recipes.
    #[arg(long, default_value_t = 4)]
    pub embed_bits: u8,
    /// Bits of embedding deltas in the target-ratio recipes (tNN): a model's embeddings are part of the
    /// budget, and at 4 bits SmolLM2's alone (21% of its weights) cap the file near 7x.
    #[arg(long, default_value_t = 2)]
    pub target_embed_bits: u8,
    /// How the target-ratio recipes (tNN) with obs rank tensors: absolute, weighted, plain (RTN's
    /// ranking) or auto (all three, keeping the one closest to the fine-tune on the calibration windows).
    #[arg(long, default_value = "auto", value_parser = crate::compress::parse_budget_error)]
    pub budget_error: dz_compress::pipeline::BudgetError,
    /// OBS damping, relative to the mean of each Hessian's diagonal (`compress --damp`).
    #[arg(long, default_value_t = crate::compress::DEFAULT_DAMP, value_parser = crate::compress::parse_damp)]
    pub damp: f32,
    /// OBS damping of a tied embedding table (`compress --table-damp`).
    #[arg(long, default_value_t = crate::compress::DEFAULT_TIED_TABLE_DAMP, value_parser = crate::compress::parse_damp)]
    pub table_damp: f32,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Calibration text (default: the built-in text).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Evaluation windows per text.
    #[arg(long, default_value_t = 16)]
    pub eval_windows: usize,
    /// Tokens per evaluation window.
    #[arg(long, default_value_t = 512)]
    pub eval_seq_len: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where deltas are written (default: a temporary directory).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Write `<stem>.md` and `<stem>.json` with the results.
    #[arg(long, value_name = "STEM")]
    pub results: Option<PathBuf>,
    /// The commit measured (default: the commit this binary was built from).
    #[arg(long)]
    pub commit: Option<String>,
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
    /// The commit measured (default: the commit this binary was built from).
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

/// The trimmed stdout of a command that succeeded with some output.
pub(crate) fn sh(cmd: &str, args: &[&str]) -> Option<String> {
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
        "gpu": gpu.map(|g| gpu_summary(&g)),
    })
}

/// One line for `nvidia-smi`'s one line per GPU: `2 x NAME, MEMORY, DRIVER` when the GPUs are alike.
fn gpu_summary(lines: &str) -> String {
    let gpus: Vec<&str> = lines
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    match gpus.as_slice() {
        [] => String::new(),
        [one] => one.to_string(),
        [first, rest @ ..] if rest.iter().all(|g| g == first) => {
            format!("{} x {first}", gpus.len())
        }
        _ => gpus.join(" / "),
    }
}

/// The directory to work in: `dir` (created), else a temporary one, removed when the guard drops.
pub fn work_dir(dir: Option<&std::path::Path>) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            Ok((d.to_path_buf(), None))
        }
        None => {
            let t = tempfile::tempdir().context("creating a temporary directory")?;
            Ok((t.path().to_path_buf(), Some(t)))
        }
    }
}

/// Runs `deltazip bench compress`; returns the table to print.
pub fn run_compress(args: &BenchCompressArgs) -> Result<String> {
    let device = parse_device(&args.device)?;
    let (work, _tmp) = work_dir(args.workdir.as_deref())?;
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
        .unwrap_or_else(|| env!("DZ_GIT_COMMIT").to_string());
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

/// A recipe of `bench quality`, applied with a method.
fn recipe_options(
    recipe: &str,
    method: &str,
    base: &pipeline::CompressOptions,
    target_embed_bits: u8,
) -> Result<Option<pipeline::CompressOptions>> {
    use dz_compress::pipeline::Method;
    use dz_compress::Sparsity;
    let mut o = base.clone();
    o.method = match method {
        "obs" => Method::Obs,
        "rtn" => Method::Rtn,
        _ => bail!("unknown method {method:?} (obs, rtn)"),
    };
    let (bits, sparsity) = match recipe {
        "8b" => (8, Sparsity::None),
        "4b" => (4, Sparsity::None),
        "2b" => (2, Sparsity::None),
        "4b24" => (4, Sparsity::TwoFour),
        "2b24" => (2, Sparsity::TwoFour),
        "2b50" => (2, Sparsity::Unstructured { density: 0.5 }),
        "sign" => {
            // No calibration in BitDelta's 1 bit: run it once, under the `obs` pass.
            if method != "obs" {
                return Ok(None);
            }
            o.method = Method::Sign;
            (4, Sparsity::None)
        }
        t if t.starts_with('t') => {
            let r: f64 = t[1..]
                .parse()
                .with_context(|| format!("bad target-ratio recipe {t:?}"))?;
            o.target_ratio = Some(r);
            o.embed_bits = target_embed_bits;
            (4, Sparsity::TwoFour)
        }
        _ => bail!("unknown recipe {recipe:?}"),
    };
    o.quant.bits = bits;
    o.quant.sparsity = sparsity;
    Ok(Some(o))
}

/// How many tensors got each codec (`sparse24 4b g128 sym`, ...; row counts of row subsets left out), and
/// stored bytes per role: where a delta's bytes go.
fn summarize(tensors: &[TensorReport]) -> (serde_json::Value, serde_json::Value) {
    let mut codecs = std::collections::BTreeMap::<String, u64>::new();
    let mut roles = std::collections::BTreeMap::<String, u64>::new();
    for t in tensors {
        let c = t
            .codec
            .rsplit_once(' ')
            .filter(|(_, last)| {
                last.ends_with('r') && last[..last.len() - 1].parse::<u64>().is_ok()
            })
            .map_or(t.codec.as_str(), |(head, _)| head);
        *codecs.entry(c.to_string()).or_default() += 1;
        *roles.entry(format!("{:?}", t.role)).or_default() += t.stored_bytes;
    }
    (serde_json::json!(codecs), serde_json::json!(roles))
}

/// The `n` tensors with the largest relative error (calibrated where measured, else Frobenius): where a
/// delta loses most.
fn worst_tensors(tensors: &[TensorReport], n: usize) -> serde_json::Value {
    let err = |t: &TensorReport| t.calibrated_error.unwrap_or(t.frobenius_error);
    let mut v: Vec<&TensorReport> = tensors.iter().collect();
    v.sort_by(|a, b| err(b).total_cmp(&err(a)));
    v.iter()
        .take(n)
        .map(|t| {
            serde_json::json!({
                "name": t.name, "codec": t.codec, "calibrated_error": t.calibrated_error,
                "frobenius_error": t.frobenius_error,
            })
        })
        .collect()
}

/// `NAME=VALUE` or `VALUE` (named after the value's last path component).
fn named(s: &str) -> (String, PathBuf) {
    match s.split_once('=') {
        Some((n, v)) => (n.to_string(), PathBuf::from(v)),
        None => {
            let p = PathBuf::from(s);
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| s.to_string());
            (n, p)
        }
    }
}

/// The last 10% of a text's tokens, at most `windows * seq_len` of them.
fn held_out(
    tok: &std::path::Path,
    text: &std::path::Path,
    windows: usize,
    seq_len: usize,
) -> Result<Vec<u32>> {
    let t = dz_compress::calib_data::tokenize_file(tok, text)?;
    let start = t.len() - t.len() / 10;
    let held = &t[start..];
    Ok(held[..held.len().min(windows * seq_len)].to_vec())
}

/// Runs `deltazip bench quality`; returns the table to print.
pub fn run_quality(args: &BenchQualityArgs) -> Result<String> {
    use dz_compress::hf::HfModel;
    use dz_compress::model::{kl_divergence, LlamaModel};
    let device = parse_device(&args.device)?;
    let (work, _tmp) = work_dir(args.workdir.as_deref())?;
    let base_hf = HfModel::open(&args.base)?;
    let tok = base_hf
        .tokenizer_path()
        .context("the base has no tokenizer.json")?;
    let base_model = LlamaModel::load(base_hf.arch(), &device, |n| base_hf.to_f32(n))?;
    let general = held_out(
        &tok,
        &args.general_text,
        args.eval_windows,
        args.eval_seq_len,
    )?;
    let texts: Vec<(String, PathBuf)> = args.domain_text.iter().map(|s| named(s)).collect();
    let bf16_bytes: u64 = base_hf
        .names()
        .filter_map(|n| base_hf.info(n))
        .map(|i| i.numel() as u64 * 2)
        .sum();
    let common = pipeline::CompressOptions {
        device: device.clone(),
        samples: args.samples,
        seq_len: args.seq_len,
        calib_text: args.calib.clone(),
        embed_bits: args.embed_bits,
        budget_error: args.budget_error,
        damp: args.damp,
        tied_table_damp: args.table_damp,
        ..Default::default()
    };
    let ppl = |m: &LlamaModel, t: &[u32]| -> Result<f64> {
        Ok(m.perplexity(t, args.eval_seq_len, None)?.ppl)
    };
    let mut rows = Vec::new();
    for ft in &args.finetuned {
        let (name, dir) = named(ft);
        let text = texts
            .iter()
            .find(|(n, _)| *n == name)
            .or(if texts.len() == 1 {
                texts.first()
            } else {
                None
            })
            .with_context(|| format!("no --domain-text for fine-tune {name:?}"))?
            .1
            .clone();
        let domain = held_out(&tok, &text, args.eval_windows, args.eval_seq_len)?;
        let ft_hf = HfModel::open(&dir)?;
        let ft_model = LlamaModel::load(ft_hf.arch(), &device, |n| ft_hf.to_f32(n))?;
        let (pb_d, pb_g) = (ppl(&base_model, &domain)?, ppl(&base_model, &general)?);
        let (pf_d, pf_g) = (ppl(&ft_model, &domain)?, ppl(&ft_model, &general)?);
        let kl_base = kl_divergence(&ft_model, &base_model, &domain, args.eval_seq_len, None)?;
        eprintln!(
            "{name}: base ppl {pb_d:.3} (general {pb_g:.3}), fine-tune {pf_d:.3} (general {pf_g:.3}), \
             drop {:.1}%",
            100.0 * (1.0 - pf_d / pb_d)
        );
        rows.push(serde_json::json!({
            "finetune": name, "recipe": "finetune", "method": "-", "ratio": 1.0,
            "ppl_domain": pf_d, "ppl_general": pf_g, "gain_kept": 1.0, "kl": 0.0,
            "kl_base": kl_base, "ppl_base_domain": pb_d, "ppl_base_general": pb_g, "seconds": 0.0,
        }));
        for recipe in &args.recipes {
            for method in &args.methods {
                let Some(o) = recipe_options(recipe, method, &common, args.target_embed_bits)?
                else {
                    continue;
                };
                let out = work.join(format!("{name}-{recipe}-{method}.dz"));
                let t0 = Instant::now();
                let report = match pipeline::compress(
                    &args.base,
                    &dir,
                    &out,
                    &o,
                    &mut Bars::quiet(),
                ) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("{name} {recipe} {method}: {e}");
                        rows.push(serde_json::json!({
                            "finetune": name, "recipe": recipe, "method": method, "error": e.to_string(),
                        }));
                        continue;
                    }
                };
                let secs = t0.elapsed().as_secs_f64();
                let m = dz_compress::merge::Applied::open(&args.base, &out)?.model(&device)?;
                let (pc_d, pc_g) = (ppl(&m, &domain)?, ppl(&m, &general)?);
                let kl = kl_divergence(&ft_model, &m, &domain, args.eval_seq_len, None)?;
                let kept = (pb_d - pc_d) / (pb_d - pf_d);
                eprintln!(
                    "{name} {recipe:>5} {method}: {:.2}x, ppl {pc_d:.3} (general {pc_g:.3}), kept {:.1}%, \
                     KL {kl:.2e}, {secs:.0}s",
                    report.ratio(),
                    100.0 * kept
                );
                let (codecs, bytes_by_role) = summarize(&report.tensors);
                rows.push(serde_json::json!({
                    "finetune": name, "recipe": recipe, "method": o.method.as_str(),
                    "ratio": report.ratio(), "file_bytes": report.file_bytes,
                    "bf16_bytes": report.bf16_bytes, "embed_bits": o.embed_bits,
                    "ppl_domain": pc_d, "ppl_general": pc_g, "gain_kept": kept, "kl": kl,
                    "seconds": secs, "codecs": codecs, "bytes_by_role": bytes_by_role,
                    "worst_tensors": worst_tensors(&report.tensors, 8),
                    "budget_trials": report.budget_trials.iter()
                        .map(|(b, kl)| serde_json::json!({"ranking": b.as_str(), "calib_kl": kl}))
                        .collect::<Vec<_>>(),
                }));
                let _ = std::fs::remove_file(&out);
            }
        }
    }
    let commit = args
        .commit
        .clone()
        .unwrap_or_else(|| env!("DZ_GIT_COMMIT").to_string());
    let date = sh("date", &["-u", "+%Y-%m-%d"]).unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "## Quality of compressed fine-tunes\n");
    let _ = writeln!(
        md,
        "base `{}` ({} as bf16) | machine {} | device `{}` | commit `{commit}` | {date} | calibration {} x {} \
         tokens | eval {} x {} held-out tokens per text\n",
        args.base.display(),
        crate::inspect::human(bf16_bytes),
        machine(),
        args.device,
        args.samples,
        args.seq_len,
        args.eval_windows,
        args.eval_seq_len
    );
    let _ = writeln!(
        md,
        "| fine-tune | recipe | method | ratio | ppl domain | ppl general | gain kept | KL(ft‖c) | compress s |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        if let Some(e) = r.get("error") {
            let _ = writeln!(
                md,
                "| {} | {} | {} | error: {} |||||| ",
                r["finetune"], r["recipe"], r["method"], e
            );
            continue;
        }
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        if r["recipe"] == "finetune" {
            let _ = writeln!(
                md,
                "| {} | *base* | | | {:.3} | {:.3} | 0% | {:.2e} | |",
                r["finetune"].as_str().unwrap_or(""),
                f("ppl_base_domain"),
                f("ppl_base_general"),
                f("kl_base")
            );
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2}x | {:.3} | {:.3} | {:.1}% | {:.2e} | {:.0} |",
            r["finetune"].as_str().unwrap_or(""),
            r["recipe"].as_str().unwrap_or(""),
            r["method"].as_str().unwrap_or(""),
            f("ratio"),
            f("ppl_domain"),
            f("ppl_general"),
            100.0 * f("gain_kept"),
            f("kl"),
            f("seconds")
        );
    }
    let json = serde_json::json!({
        "bench": "quality", "base": args.base, "machine": machine(), "device": args.device,
        "commit": commit, "date": date, "samples": args.samples, "seq_len": args.seq_len,
        "eval_windows": args.eval_windows, "eval_seq_len": args.eval_seq_len, "rows": rows,
    });
    if let Some(stem) = &args.results {
        std::fs::write(stem.with_extension("md"), &md)?;
        std::fs::write(
            stem.with_extension("json"),
            serde_json::to_string_pretty(&json)?,
        )?;
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::gpu_summary;

    #[test]
    fn gpu_summary_is_one_line() {
        let h200 = "NVIDIA H200, 143771 MiB, 580.159.04";
        assert_eq!(gpu_summary(h200), h200);
        assert_eq!(
            gpu_summary(&format!("{h200}\n{h200}\n")),
            format!("2 x {h200}")
        );
        assert_eq!(
            gpu_summary("A, 1 MiB, 1\nB, 2 MiB, 1"),
            "A, 1 MiB, 1 / B, 2 MiB, 1"
        );
        assert_eq!(gpu_summary(""), "");
    }
}

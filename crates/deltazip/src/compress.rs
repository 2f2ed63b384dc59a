//! `deltazip compress`, `deltazip merge` and `deltazip eval`: the command-line face of dz-compress.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use dz_compress::pipeline::{
    self, BudgetError, CompressOptions, CompressReport, Estimate, Method, Progress, TensorReport,
};
use dz_compress::{QuantConfig, Sparsity};
use dz_format::Lossless;
use indicatif::{ProgressBar, ProgressStyle};

use crate::inspect::human;

/// Options of `deltazip compress`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompressArgs {
    /// The base model: an HF-style directory (config.json + *.safetensors).
    #[arg(long)]
    pub base: PathBuf,
    /// The fine-tuned model, same architecture as the base.
    #[arg(long)]
    pub finetuned: PathBuf,
    /// The delta file to write (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// obs: calibrated second-order pruning + quantization (best); rtn: round-to-nearest after magnitude
    /// pruning (baseline, no calibration); sign: 1 bit per weight + per-row scale (BitDelta).
    #[arg(long, default_value = "obs", value_parser = parse_method)]
    pub method: Method,
    /// Bits per stored weight of linear deltas: 2, 3, 4 or 8.
    #[arg(long, default_value_t = 4)]
    pub bits: u8,
    /// `2:4` (structured, kernel-friendly), a fraction of weights to prune like `0.5` (unstructured),
    /// or `none`.
    #[arg(long, default_value = "2:4", value_parser = parse_sparsity)]
    pub sparsity: Sparsity,
    /// Quantization group size in columns (a multiple of 4), or `row` for one group per row.
    #[arg(long, default_value = "128", value_parser = parse_group)]
    pub group: u32,
    /// Asymmetric grids (a zero point per group) instead of symmetric ones.
    #[arg(long)]
    pub asym: bool,
    /// Bits of the embedding and lm_head deltas (only rows the fine-tune moved are stored).
    #[arg(long, default_value_t = 4)]
    pub embed_bits: u8,
    /// Choose bits and sparsity per tensor so the file is R times smaller than the bf16 fine-tune,
    /// minimising the total calibrated error (overrides --bits/--sparsity for linear layers). A file more
    /// than 3% smaller than asked is redone with the budget it measured (at most three passes).
    #[arg(long, value_name = "R")]
    pub target_ratio: Option<f64>,
    /// How --target-ratio with --method obs ranks tensors against each other: `absolute` (calibrated
    /// output errors), `weighted` (calibrated errors relative to each delta, times its size), `plain`
    /// (RTN's calibration-free ranking: round-to-nearest Frobenius errors; the recipes are still
    /// written with OBS) or `auto` (all three, keeping the file closest to the fine-tune on the
    /// calibration windows; a writing pass each, the errors are measured once).
    #[arg(long, default_value = "auto", value_parser = parse_budget_error)]
    pub budget_error: BudgetError,
    /// Calibration text file (default: a built-in mix of English prose and Python).
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Calibration windows per forward batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// OBS damping, relative to the mean of each Hessian's diagonal (more: closer to plain rounding,
    /// less fitted to the calibration windows).
    #[arg(long, default_value_t = DEFAULT_DAMP, value_parser = parse_damp)]
    pub damp: f32,
    /// OBS damping of a tied embedding table (SmolLM2's: the output head is the embedding), relative to
    /// the mean of the head's Hessian diagonal (more: closer to plain rounding).
    #[arg(long, default_value_t = DEFAULT_TIED_TABLE_DAMP, value_parser = parse_damp)]
    pub table_damp: f32,
    /// Device for activations and Hessians: `cpu`, `cuda` or `cuda:N` (needs the `cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The fine-tune's name in the delta (default: the fine-tune directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// zstd level of the lossless stage (0 turns it off).
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// Only estimate the delta's size; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also write the per-tensor report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// List every tensor in the final table, not only per layer.
    #[arg(long)]
    pub verbose: bool,
}

fn parse_method(s: &str) -> std::result::Result<Method, String> {
    match s {
        "obs" => Ok(Method::Obs),
        "rtn" | "magnitude" => Ok(Method::Rtn),
        "sign" | "sign1" | "bitdelta" => Ok(Method::Sign),
        _ => Err(format!("unknown method {s:?} (obs, rtn, sign)")),
    }
}

/// Parses `2:4`, `none`, or a pruned fraction like `0.5`.
pub fn parse_sparsity(s: &str) -> std::result::Result<Sparsity, String> {
    match s {
        "2:4" => Ok(Sparsity::TwoFour),
        "none" | "0" | "dense" => Ok(Sparsity::None),
        _ => {
            let f: f32 = s.parse().map_err(|_| {
                format!("sparsity must be 2:4, none, or a fraction in [0, 1), got {s:?}")
            })?;
            if !(0.0..1.0).contains(&f) {
                return Err(format!("sparsity fraction must be in [0, 1), got {f}"));
            }
            Ok(if f == 0.0 {
                Sparsity::None
            } else {
                Sparsity::Unstructured { density: 1.0 - f }
            })
        }
    }
}

fn parse_group(s: &str) -> std::result::Result<u32, String> {
    if s == "row" || s == "0" {
        return Ok(0);
    }
    let g: u32 = s
        .parse()
        .map_err(|_| format!("group must be a number or `row`, got {s:?}"))?;
    if g < 4 || !g.is_multiple_of(4) {
        return Err(format!("group must be a multiple of 4, got {g}"));
    }
    Ok(g)
}

/// Parses `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).context("cannot use CUDA device 0"),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::new_cuda(n).with_context(|| format!("cannot use CUDA device {n}")),
            None => bail!("unknown device {s:?} (cpu, cuda, cuda:N)"),
        },
    }
}

/// `absolute`, `weighted`, `plain` or `auto` ([`BudgetError`]).
pub fn parse_budget_error(s: &str) -> std::result::Result<BudgetError, String> {
    [
        BudgetError::Absolute,
        BudgetError::DeltaWeighted,
        BudgetError::Plain,
        BudgetError::Auto,
    ]
    .into_iter()
    .find(|b| b.as_str() == s)
    .ok_or_else(|| format!("expected absolute, weighted, plain or auto, got {s:?}"))
}

/// [`CompressOptions::damp`]'s and [`CompressOptions::tied_table_damp`]'s defaults.
pub use dz_compress::pipeline::{DEFAULT_DAMP, DEFAULT_TIED_TABLE_DAMP};

/// A finite damping > 0 and at most 10.
pub fn parse_damp(s: &str) -> std::result::Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 10.0 => Ok(v),
        _ => Err(format!("expected a damping in (0, 10], got {s:?}")),
    }
}

impl CompressArgs {
    /// The pipeline options these arguments ask for.
    pub fn options(&self) -> Result<CompressOptions> {
        Ok(CompressOptions {
            name: self.name.clone(),
            method: self.method,
            quant: QuantConfig {
                bits: self.bits,
                group_size: self.group,
                symmetric: !self.asym,
                sparsity: self.sparsity,
            },
            embed_bits: self.embed_bits,
            target_ratio: self.target_ratio,
            budget_error: self.budget_error,
            calib_text: self.calib.clone(),
            samples: self.samples,
            seq_len: self.seq_len,
            batch_size: self.batch_size,
            damp: self.damp,
            tied_table_damp: self.table_damp,
            lossless: if self.zstd_level == 0 {
                Lossless::None
            } else {
                Lossless::Zstd(self.zstd_level)
            },
            device: parse_device(&self.device)?,
            ..CompressOptions::default()
        })
    }
}

/// Progress bars on stderr (hidden when stderr is not a terminal).
#[derive(Default)]
pub struct Bars {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Bars {
    /// Bars that draw nothing (for tests and `--json` runs).
    pub fn quiet() -> Self {
        Self {
            bar: None,
            quiet: true,
        }
    }
}

impl Progress for Bars {
    fn phase(&mut self, name: &str, total: usize) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if self.quiet {
            return;
        }
        let b = ProgressBar::new(total as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {pos}/{len} {wide_msg} {elapsed_precise} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_prefix(name.to_string());
        b.enable_steady_tick(Duration::from_millis(250));
        self.bar = Some(b);
    }

    fn step(&mut self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
            b.inc(1);
        }
    }

    fn note(&mut self, msg: &str) {
        if self.quiet {
            return;
        }
        // A hidden bar (stderr is not a terminal) would swallow the line.
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(msg),
            _ => eprintln!("{msg}"),
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Runs `deltazip compress`; returns the text to print.
pub fn run(args: &CompressArgs, progress: &mut dyn Progress) -> Result<String> {
    let opts = args.options()?;
    if args.dry_run {
        let e = pipeline::estimate(&args.base, &args.finetuned, &opts)?;
        return Ok(estimate_text(&e));
    }
    let report = pipeline::compress(&args.base, &args.finetuned, &args.out, &opts, progress)
        .with_context(|| format!("compressing {}", args.finetuned.display()))?;
    if let Some(p) = &args.report {
        std::fs::write(p, report_json(&report).to_string())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(report_text(&report, args.verbose))
}

fn estimate_text(e: &Estimate) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:<20} {:>8} {:>12}", "class", "tensors", "est. bytes");
    for (c, n, b) in &e.classes {
        let _ = writeln!(s, "{c:<20} {n:>8} {:>12}", human(*b));
    }
    let _ = writeln!(
        s,
        "estimated delta {} vs bf16 fine-tune {}: about {:.2}x smaller before zstd (dry run, nothing written)",
        human(e.delta_bytes),
        human(e.bf16_bytes),
        e.ratio()
    );
    s
}

/// The layer a tensor belongs to (`model.layers.N.`), or its name's class.
fn layer_of(name: &str) -> String {
    name.strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next())
        .map(|n| format!("layer {n:>3}"))
        .unwrap_or_else(|| name.to_string())
}

/// The final table: per layer (or per tensor with `verbose`), then totals.
pub fn report_text(r: &CompressReport, verbose: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<44} {:>5} {:>12} {:>12} {:>8} {:>10}",
        if verbose { "tensor" } else { "layer" },
        "bits",
        "stored",
        "bf16",
        "ratio",
        "rel.err"
    );
    let mut rows: BTreeMap<(usize, String), Vec<&TensorReport>> = BTreeMap::new();
    for (i, t) in r.tensors.iter().enumerate() {
        let key = if verbose {
            (i, t.name.clone())
        } else {
            let l = layer_of(&t.name);
            let order = if l.starts_with("layer") { 0 } else { 1 };
            (order, l)
        };
        rows.entry(key).or_default().push(t);
    }
    for ((_, label), ts) in &rows {
        let stored: u64 = ts.iter().map(|t| t.stored_bytes).sum();
        let bf16: u64 = ts.iter().map(|t| t.bf16_bytes).sum();
        let bits: Vec<u8> = ts.iter().filter_map(|t| t.bits).collect();
        let bits = match (bits.iter().min(), bits.iter().max()) {
            (Some(a), Some(b)) if a == b => a.to_string(),
            (Some(a), Some(b)) => format!("{a}-{b}"),
            _ => "-".into(),
        };
        // Calibrated relative error where measured, else Frobenius; averaged over the row's tensors.
        let errs: Vec<f64> = ts
            .iter()
            .filter(|t| t.stored_bytes > 0)
            .map(|t| t.calibrated_error.unwrap_or(t.frobenius_error))
            .collect();
        let err = if errs.is_empty() {
            "-".into()
        } else {
            format!("{:.2e}", errs.iter().sum::<f64>() / errs.len() as f64)
        };
        let label = if verbose {
            format!("{label} [{}]", ts[0].codec)
        } else {
            label.clone()
        };
        let _ = writeln!(
            s,
            "{:<44} {:>5} {:>12} {:>12} {:>7.1}x {:>10}",
            truncate(&label, 44),
            bits,
            human(stored),
            human(bf16),
            bf16 as f64 / stored.max(1) as f64,
            err
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "wrote {} ({}), {:.2}x smaller than the bf16 fine-tune ({}), in {:.1}s{}",
        r.path.display(),
        human(r.file_bytes),
        r.ratio(),
        human(r.bf16_bytes),
        r.seconds,
        if r.calib_windows > 0 {
            format!(", {} calibration windows", r.calib_windows)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "rel.err: calibrated ||(D-D^)X||^2/||DX||^2 where a Hessian was used, else ||D-D^||/||D||"
    );
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(['…']).collect()
    }
}

/// The report as JSON.
pub fn report_json(r: &CompressReport) -> serde_json::Value {
    serde_json::json!({
        "path": r.path,
        "file_bytes": r.file_bytes,
        "bf16_bytes": r.bf16_bytes,
        "ratio": r.ratio(),
        "seconds": r.seconds,
        "calib_windows": r.calib_windows,
        "tensors": r.tensors.iter().map(|t| serde_json::json!({
            "name": t.name,
            "role": t.role.as_str(),
            "codec": t.codec,
            "bits": t.bits,
            "stored_bytes": t.stored_bytes,
            "bf16_bytes": t.bf16_bytes,
            "calibrated_error": t.calibrated_error,
            "frobenius_error": t.frobenius_error,
        })).collect::<Vec<_>>(),
    })
}

/// Options of `deltazip merge`.
#[derive(Debug, Clone, clap::Args)]
pub struct MergeArgs {
    /// The base model directory the delta was made against (checked by fingerprint).
    #[arg(long)]
    pub base: PathBuf,
    /// The delta file.
    #[arg(long)]
    pub delta: PathBuf,
    /// The directory to write the merged fine-tune to (an HF-style directory, written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` if it exists and is not empty.
    #[arg(long)]
    pub overwrite: bool,
    /// Where the sums are formed: `cpu`, or `cuda` / `cuda:N` (dz-candle-ops' `merge` op on the GPU;
    /// needs the `cuda` build). Both write the same bytes.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Runs `deltazip merge`.
pub fn run_merge(args: &MergeArgs) -> Result<String> {
    let device = parse_device(&args.device)?;
    let r = dz_loader::merge::merge(&args.base, &args.delta, &args.out, args.overwrite, &device)
        .with_context(|| {
            format!(
                "merging {} into {}",
                args.delta.display(),
                args.base.display()
            )
        })?;
    Ok(format!(
        "wrote {} ({} tensors): base + delta as a plain model\n",
        r.dir.display(),
        r.tensors
    ))
}

/// Options of `deltazip eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// A plain model directory to evaluate.
    #[arg(long, conflicts_with_all = ["base", "delta"], required_unless_present = "base")]
    pub model: Option<PathBuf>,
    /// The base model, to evaluate base + delta (with --delta).
    #[arg(long, requires = "delta")]
    pub base: Option<PathBuf>,
    /// The delta file applied to --base.
    #[arg(long, requires = "base")]
    pub delta: Option<PathBuf>,
    /// The text to measure perplexity on.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// At most this many windows (default: the whole text).
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `deltazip eval`: perplexity of a model, or of base + delta, on a text file.
pub fn run_eval(args: &EvalArgs) -> Result<String> {
    let device = parse_device(&args.device)?;
    let (model, tok, what) = match (&args.model, &args.base, &args.delta) {
        (Some(m), _, _) => {
            let hf = dz_compress::hf::HfModel::open(m)?;
            let model = dz_compress::model::LlamaModel::load(hf.arch(), &device, |n| hf.to_f32(n))?;
            let tok = hf.tokenizer_path();
            (model, tok, m.display().to_string())
        }
        (None, Some(b), Some(d)) => {
            let applied = dz_compress::merge::Applied::open(b, d)
                .with_context(|| format!("applying {} to {}", d.display(), b.display()))?;
            let model = applied.model(&device)?;
            (
                model,
                applied.base.tokenizer_path(),
                format!("{} + {}", b.display(), d.display()),
            )
        }
        _ => bail!("give --model DIR, or --base DIR --delta FILE"),
    };
    let tok = tok.context("the model directory has no tokenizer.json")?;
    let tokens = dz_compress::calib_data::tokenize_file(&tok, &args.text)?;
    let r = model.perplexity(&tokens, args.seq_len, args.max_windows)?;
    if args.json {
        return Ok(serde_json::json!({
            "model": what, "text": args.text, "ppl": r.ppl, "nll": r.nll, "tokens": r.tokens,
        })
        .to_string()
            + "\n");
    }
    Ok(format!(
        "{what}: perplexity {:.4} (mean NLL {:.4} over {} tokens of {})\n",
        r.ppl,
        r.nll,
        r.tokens,
        args.text.display()
    ))
}

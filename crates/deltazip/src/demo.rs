//! `deltazip demo`: the pipeline end to end on a seeded tiny model family, with no downloads.
//!
//! 1. Compress: generate a base and a few fine-tunes, compress each with calibrated OBS (and one with
//!    the RTN baseline for comparison), inspect and verify every delta, check that base + delta
//!    reproduces the fine-tune, and measure how much of each fine-tune's behaviour the delta keeps (KL
//!    divergence of the next-token distributions).
//! 2. Serve ([`serve_stage`], unless `--no-serve`): every delta in multi-tenant mode behind one
//!    `deltazip serve` started in this process, under GPU and CPU delta budgets smaller than the set;
//!    a mixed workload from concurrent clients (every fine-tune and the base, streamed and not), each
//!    answer checked against the same request sent alone to the merged fine-tune; throughput and
//!    per-tier hit rates. Any error or mismatch fails the demo.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use dz_compress::fixtures::{self, TinySpec};
use dz_compress::pipeline::{self, CompressOptions, Method};
use dz_compress::{QuantConfig, Sparsity};

use crate::compress::Bars;
use crate::inspect::{self, human, InspectArgs};

pub mod serve_stage;
pub use serve_stage::{ServeOptions, ServeReport};

/// Options of `deltazip demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Keep everything (models, deltas) in this directory; by default a temporary one is removed at the end.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the model family.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Number of fine-tunes to generate and compress (fine-tune 0 twice: OBS and RTN, so N + 1 deltas).
    #[arg(long, default_value_t = 4)]
    pub finetunes: usize,
    /// Print the full inspect report of every delta.
    #[arg(long)]
    pub verbose: bool,
    /// Skip the serving stage (after compressing, the demo serves every delta multi-tenant from one
    /// in-process server and checks a concurrent workload against the merged fine-tunes).
    #[arg(long)]
    pub no_serve: bool,
    /// Serving stage: requests in the workload (every fine-tune and the base, round robin in a seeded
    /// order; prompts and streamed-or-not drawn with --seed).
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Serving stage: concurrent clients sending the requests.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Serving stage: tokens generated per request, at most (greedy).
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Serving stage: the GPU delta budget, in deltas (the largest); fewer than the deltas served, so
    /// that switching between fine-tunes evicts and reloads.
    #[arg(long, default_value_t = 2)]
    pub gpu_deltas: usize,
    /// Serving stage: the CPU cache budget, in deltas (the largest); a delta evicted from both tiers is
    /// read from disk again.
    #[arg(long, default_value_t = 3)]
    pub cpu_deltas: usize,
}

impl DemoArgs {
    /// The serving stage's options (`None` with `--no-serve`).
    pub fn serve_options(&self) -> Option<ServeOptions> {
        (!self.no_serve).then_some(ServeOptions {
            requests: self.requests,
            clients: self.clients,
            max_tokens: self.max_tokens,
            gpu_deltas: self.gpu_deltas,
            cpu_deltas: self.cpu_deltas,
            seed: self.seed,
        })
    }
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// One row per delta (compress stage).
    pub rows: Vec<DemoRow>,
    /// The serving stage (`None` with `--no-serve`).
    pub serve: Option<ServeReport>,
}

/// One fine-tune's outcome.
#[derive(Debug, Clone)]
pub struct DemoRow {
    /// The fine-tune's name.
    pub name: String,
    /// The method.
    pub method: &'static str,
    /// Delta file bytes.
    pub delta_bytes: u64,
    /// Ratio vs the bf16 fine-tune.
    pub ratio: f64,
    /// KL(fine-tune || base) per token: how far the fine-tune moved.
    pub kl_base: f64,
    /// KL(fine-tune || base + delta) per token: what the delta loses.
    pub kl_delta: f64,
    /// Largest |merged - fine-tune| over all weights, relative to the largest |delta|.
    pub merge_err: f64,
}

impl DemoRow {
    /// The share of the fine-tune's divergence from the base that the delta recovers.
    pub fn kept(&self) -> f64 {
        1.0 - self.kl_delta / self.kl_base.max(f64::MIN_POSITIVE)
    }
}

/// Runs the demo; prints as it goes (unless `quiet`) and returns what it measured (for tests). Errors
/// and mismatches of the serving stage are counted in the report, not returned as `Err` ([`run`] does
/// that).
pub fn run_report(args: &DemoArgs, quiet: bool) -> Result<DemoReport> {
    if let Some(opts) = args.serve_options() {
        opts.validate()?;
    }
    let (root, _tmp) = crate::bench::work_dir(args.out.as_deref())?;
    let say = |s: &str| {
        if !quiet {
            println!("{s}");
        }
    };
    let spec = TinySpec {
        seed: args.seed,
        ..TinySpec::llama()
    };
    let family = fixtures::write_family(&root.join("family"), &spec, args.finetunes)
        .context("generating the tiny model family")?;
    say(&format!(
        "generated a tiny Llama family in {}: base + {} fine-tunes (hidden {}, {} layers, vocab {}, seed {})",
        root.display(),
        args.finetunes,
        spec.hidden,
        spec.layers,
        spec.vocab,
        spec.seed
    ));

    let device = Device::Cpu;
    let base = dz_compress::hf::HfModel::open(&family.base)?;
    let base_model =
        dz_compress::model::LlamaModel::load(base.arch(), &device, |n| base.to_f32(n))?;
    let tok = base
        .tokenizer_path()
        .context("the generated base has no tokenizer")?;
    let tokens = dz_compress::calib_data::tokenize_file(&tok, &family.calib_text)?;
    // Evaluate on the last quarter of the text; calibrate on the rest.
    let split = tokens.len() * 3 / 4;
    let eval_tokens = &tokens[split..];
    let calib_path = root.join("calib-train.txt");
    let text = std::fs::read_to_string(&family.calib_text)?;
    // Cut at a character boundary: the text is UTF-8, not ASCII.
    let cut = (text.len() * 3 / 4..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    std::fs::write(&calib_path, &text[..cut])?;

    let mut rows = Vec::new();
    let mut deltas = Vec::new();
    for (i, ft_dir) in family.finetunes.iter().enumerate() {
        let ft = dz_compress::hf::HfModel::open(ft_dir)?;
        let ft_model = dz_compress::model::LlamaModel::load(ft.arch(), &device, |n| ft.to_f32(n))?;
        let kl_base =
            dz_compress::model::kl_divergence(&ft_model, &base_model, eval_tokens, 64, None)?;
        let methods: &[Method] = if i == 0 {
            &[Method::Obs, Method::Rtn]
        } else {
            &[Method::Obs]
        };
        for &method in methods {
            let name = format!("ft-{i}");
            let out = root.join(format!("{name}-{}.dz", method.as_str()));
            let opts = CompressOptions {
                name: Some(name.clone()),
                method,
                quant: QuantConfig {
                    bits: 4,
                    group_size: 32,
                    symmetric: true,
                    sparsity: Sparsity::TwoFour,
                },
                embed_bits: 8,
                calib_text: Some(calib_path.clone()),
                samples: 32,
                seq_len: 64,
                ..CompressOptions::default()
            };
            let mut bars = if quiet {
                Bars::quiet()
            } else {
                Bars::default()
            };
            let report = pipeline::compress(&family.base, ft_dir, &out, &opts, &mut bars)
                .with_context(|| format!("compressing {name}"))?;
            drop(bars);
            let inspected = inspect::run(&InspectArgs {
                file: out.clone(),
                verify: true,
                json: false,
                all: false,
                tp: None,
            })?;
            if args.verbose {
                say(&inspected);
            }
            let applied = dz_compress::merge::Applied::open(&family.base, &out)?;
            let merged = applied.model(&device)?;
            let kl_delta =
                dz_compress::model::kl_divergence(&ft_model, &merged, eval_tokens, 64, None)?;
            // Base + delta against the fine-tune, weight by weight.
            let (mut worst, mut scale) = (0f32, 0f32);
            for n in ft.names() {
                let w_ft = ft.to_f32(n)?;
                let w_m = applied.tensor_f32(n)?;
                let w_b = base.to_f32(n)?;
                for ((a, b), c) in w_ft.iter().zip(&w_m).zip(&w_b) {
                    worst = worst.max((a - b).abs());
                    scale = scale.max((a - c).abs());
                }
            }
            deltas.push((format!("{name}-{}", method.as_str()), out.clone()));
            rows.push(DemoRow {
                name,
                method: method.as_str(),
                delta_bytes: report.file_bytes,
                ratio: report.ratio(),
                kl_base,
                kl_delta,
                merge_err: (worst / scale.max(f32::MIN_POSITIVE)) as f64,
            });
        }
    }
    say(&table(&rows));
    let serve = match args.serve_options() {
        None => None,
        Some(opts) => Some(serve_stage::run(&root, &family.base, &deltas, &opts, &say)?),
    };
    if args.out.is_none() {
        say("(temporary files removed; pass --out DIR to keep the models, deltas and configs)");
    }
    Ok(DemoReport { rows, serve })
}

/// Runs `deltazip demo`: fails when the serving stage saw an error or a mismatch.
pub fn run(args: &DemoArgs) -> Result<()> {
    let report = run_report(args, false)?;
    match &report.serve {
        Some(serve) => serve.check(),
        None => Ok(()),
    }
}

fn table(rows: &[DemoRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{:<8} {:<6} {:>10} {:>8} {:>12} {:>12} {:>8} {:>10}",
        "delta", "method", "size", "ratio", "KL(ft||base)", "KL(ft||b+d)", "kept", "max|err|"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<8} {:<6} {:>10} {:>7.2}x {:>12.3e} {:>12.3e} {:>7.1}% {:>10.3}",
            r.name,
            r.method,
            human(r.delta_bytes),
            r.ratio,
            r.kl_base,
            r.kl_delta,
            100.0 * r.kept(),
            r.merge_err
        );
    }
    let _ = writeln!(
        s,
        "\nkept = 1 - KL(ft||base+delta) / KL(ft||base): the share of the fine-tune's change in next-token \
         distributions\nthat the compressed delta reproduces; max|err| = largest weight error of base+delta \
         vs the fine-tune,\nrelative to the largest weight change. Ratios are low on a model this tiny: \
         per-group scales and 2:4 metadata\nweigh more on 64-wide rows than on real models."
    );
    s
}

//! `deltazip bench serve`: an open-loop load generator for any OpenAI-compatible server (issue 9's
//! serving benchmark: many fine-tunes as deltas vs swapping full models vs the base alone).
//!
//! Per rate, a seeded plan ([`workload`]) of Poisson arrivals, each request to a model drawn by
//! popularity with a prompt window of a text corpus and an output length; requests are sent at their
//! arrival times whatever the server's progress (at most `--max-inflight` at once), streamed and timed
//! ([`client`]), and summarized ([`stats`]) per rate and per model. Results go to `STEM.md` and
//! `STEM.json` (one row per system x rate; `--append` adds rows to an existing file, so several systems
//! share one report). [`mock`] is a mock server for tests.

pub mod client;
pub mod mock;
pub mod stats;
pub mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use client::{Api, Outcome, Target};
use workload::{Corpus, CountRange, Length, Mix, Planned, Popularity};

/// The long help of `deltazip bench serve` (clap takes the subcommand's help from its variant).
pub const LONG_ABOUT: &str = "Load-test an OpenAI-compatible server: open-loop Poisson arrivals at one or more rates, \
                  requests spread over several models by a popularity law, streamed responses timed per \
                  token.\n\n\
                  For each rate, requests are sent at their planned arrival times whatever the server's \
                  progress (open loop, at most --max-inflight at once). Throughput counts completed \
                  requests and their streamed tokens over the window from the rate's start to its last \
                  response; TTFT and end-to-end latency count from each request's planned arrival. Errors \
                  (HTTP status, timeouts, broken, malformed or unterminated streams) are counted by kind and reported, \
                  never fatal.\n\n\
                  Example: deltazip bench serve --url http://127.0.0.1:1234 --models-from-server \
                  --rates 1,2,4,8 --requests 200 --popularity zipf:1.0 --system dz-4b24 \
                  --out bench/results/serving --append";

/// Options of `deltazip bench serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchServeArgs {
    /// The server: `http://host:port` (a trailing `/v1` is accepted). Requests go to
    /// `/v1/completions` or `/v1/chat/completions` (see --api), streamed (`stream: true`, SSE).
    #[arg(long)]
    pub url: String,
    /// `completions`: a `prompt` to POST /v1/completions; `chat`: one user message to
    /// POST /v1/chat/completions.
    #[arg(long, value_enum, default_value = "completions")]
    pub api: Api,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// The models to spread requests over, comma-separated, most popular first (zipf and hot rank
    /// them in this order).
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "models_from_server",
        conflicts_with = "models_from_server"
    )]
    pub models: Vec<String>,
    /// Take the models from the server's GET /v1/models, sorted by name.
    #[arg(long)]
    pub models_from_server: bool,
    /// Arrival rates in requests/s, comma-separated, run one after another (each a fresh Poisson
    /// stream; `inf` sends a rate's requests all at once).
    #[arg(
        long,
        visible_alias = "rate",
        value_delimiter = ',',
        default_value = "1"
    )]
    pub rates: Vec<f64>,
    /// Requests per rate (default 100 when --duration is not given).
    #[arg(long, conflicts_with = "duration")]
    pub requests: Option<usize>,
    /// Seconds of arrivals per rate, instead of a number of requests (the rate then ends when its
    /// last request does).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// How requests spread over the models: `uniform`; `zipf:S` (model i has weight 1/(i+1)^S,
    /// decreasing with its position in --models); `hot:F` (the first model gets fraction F, the rest
    /// share the remainder uniformly).
    #[arg(long, default_value = "uniform")]
    pub popularity: Popularity,
    /// A text file prompts are cut from (random windows of words). Default: the built-in text
    /// (the calibration text of dz-compress).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Words per prompt: `N` or a range `A..B` (inclusive, drawn uniformly per request).
    #[arg(long, default_value = "128")]
    pub prompt_words: CountRange,
    /// `max_tokens` per request: `N` or a range `A..B` (drawn uniformly per request). Servers may stop
    /// earlier at an end of sequence: the report counts the tokens actually streamed.
    #[arg(long, default_value = "128")]
    pub max_tokens: CountRange,
    /// Seed of the plan: the same seed gives the same requests (model, prompt, length) in the same
    /// order at every rate, and the same arrival times at a given rate.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most requests in flight at once; an arrival beyond it waits for a slot (and that wait counts in
    /// its latency).
    #[arg(long, default_value_t = 256)]
    pub max_inflight: usize,
    /// Seconds one request may take, stream included, before it counts as a `timeout` error.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    pub timeout: f64,
    /// A JSON object merged into every request body (e.g. `{"temperature":0}`).
    #[arg(long, value_name = "JSON")]
    pub extra_body: Option<String>,
    /// The name of the system measured, written in every result row (e.g. dz-4b24, swap, base).
    #[arg(long, default_value = "server")]
    pub system: String,
    /// Before the first rate, send one short request (a few prompt words, 2 tokens) to every model at
    /// once and wait for all of them: the server loads what it loads on first use (a fine-tune's
    /// delta), so the rates measure a warm server. Not counted; its time is printed and recorded.
    #[arg(long)]
    pub warmup: bool,
    /// Write `STEM.md` (tables and settings) and `STEM.json` (one row per rate).
    #[arg(long, value_name = "STEM")]
    pub out: Option<PathBuf>,
    /// Add this run's rows to an existing STEM.json (and rewrite STEM.md from all rows) instead of
    /// replacing it.
    #[arg(long, requires = "out")]
    pub append: bool,
    /// The commit measured (default: the commit this binary was built from).
    #[arg(long)]
    pub commit: Option<String>,
    /// No progress bar on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl BenchServeArgs {
    fn length(&self) -> Length {
        match (self.requests, self.duration) {
            (_, Some(d)) => Length::Duration(d),
            (n, None) => Length::Requests(n.unwrap_or(100)),
        }
    }

    fn extra(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let Some(text) = &self.extra_body else {
            return Ok(Default::default());
        };
        match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            _ => bail!("--extra-body {text:?}: expected a JSON object"),
        }
    }
}

/// Runs `deltazip bench serve`: measures, writes `--out`, returns the tables to print.
pub fn run(args: &BenchServeArgs) -> Result<String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let rows = rt.block_on(measure(args))?;
    if let Some(stem) = &args.out {
        write_results(stem, &rows, args.append)?;
    }
    Ok(render(&rows))
}

/// Measures every rate; one JSON row per rate (must run inside a tokio runtime with time and IO).
pub async fn measure(args: &BenchServeArgs) -> Result<Vec<serde_json::Value>> {
    if args.max_inflight == 0 {
        bail!("--max-inflight must be at least 1");
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds");
    }
    if args.rates.is_empty() {
        bail!("--rates: no rate given");
    }
    let target = Arc::new(Target::new(
        &args.url,
        args.api,
        args.api_key.clone(),
        args.extra()?,
        Duration::from_secs_f64(args.timeout),
    )?);
    let models = if args.models_from_server {
        target.list_models().await?
    } else {
        let m: Vec<String> = args
            .models
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if m.is_empty() {
            bail!("--models: no model named");
        }
        m
    };
    let models = Arc::new(models);
    let (corpus, corpus_name) = match &args.corpus {
        Some(p) => (Corpus::from_file(p)?, p.display().to_string()),
        None => (
            Corpus::new(dz_compress::calib_data::default_calib_text())?,
            "built-in text".to_string(),
        ),
    };
    let mix = Mix {
        n_models: models.len(),
        popularity: args.popularity,
        corpus: &corpus,
        prompt_words: args.prompt_words,
        max_tokens: args.max_tokens,
        seed: args.seed,
    };
    let length = args.length();
    let run_info = serde_json::json!({
        "url": target.base(),
        "api": format!("{:?}", args.api).to_lowercase(),
        "length": match length {
            Length::Requests(n) => format!("{n} requests"),
            Length::Duration(d) => format!("{d} s of arrivals"),
        },
        "corpus": corpus_name,
        "prompt_words": args.prompt_words.to_string(),
        "max_tokens": args.max_tokens.to_string(),
        "max_inflight": args.max_inflight,
        "timeout_s": args.timeout,
        "extra_body": args.extra()?,
        "seed": args.seed,
        "machine": crate::bench::machine(),
        "commit": args.commit.clone().unwrap_or_else(|| env!("DZ_GIT_COMMIT").to_string()),
        "date": crate::bench::sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default(),
    });

    let mut run_info = run_info;
    if args.warmup {
        let (secs, failed) = warm_up(&target, &models, &corpus).await;
        if !args.quiet {
            eprintln!(
                "warm-up: {} models in {secs:.1} s{}",
                models.len(),
                if failed > 0 {
                    format!(", {failed} failed")
                } else {
                    String::new()
                }
            );
        }
        run_info["warmup_s"] = secs.into();
        run_info["warmup_failed"] = failed.into();
    }

    let mut rows = Vec::new();
    for (ri, &rate) in args.rates.iter().enumerate() {
        let plan = workload::plan(&mix, rate, length, ri)?;
        let bar = progress_bar(args.quiet, plan.len(), rate);
        let outcomes = drive(
            target.clone(),
            models.clone(),
            plan,
            args.max_inflight,
            bar.clone(),
        )
        .await;
        bar.finish_and_clear();
        let window = outcomes.iter().map(|o| o.end_s).fold(0.0, f64::max);
        let total = stats::summarize(&outcomes, window);
        if !args.quiet {
            eprintln!("{}", one_line(rate, &total));
        }
        let per_model: Vec<serde_json::Value> = models
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let s = stats::summarize(outcomes.iter().filter(|o| o.model == i), window);
                let mut v = s.to_json();
                v["model"] = name.as_str().into();
                v
            })
            .collect();
        let mut samples = BTreeMap::new();
        for o in &outcomes {
            if let (Some(k), Some(d)) = (&o.error, &o.detail) {
                samples.entry(k.clone()).or_insert_with(|| d.clone());
            }
        }
        let mut row = serde_json::json!({
            "system": args.system,
            "n_models": models.len(),
            "popularity": args.popularity.to_string(),
            "rate": rate_json(rate),
        });
        if let (Some(r), serde_json::Value::Object(s)) = (row.as_object_mut(), total.to_json()) {
            r.extend(s);
            r.insert("error_samples".into(), serde_json::json!(samples));
            r.insert("models".into(), serde_json::json!(*models));
            r.insert("per_model".into(), per_model.into());
            r.insert("run".into(), run_info.clone());
        }
        rows.push(row);
    }
    Ok(rows)
}

/// [`BenchServeArgs::warmup`]: one short request per model, all at once; the seconds until the last
/// answer and how many failed.
async fn warm_up(target: &Arc<Target>, models: &Arc<Vec<String>>, corpus: &Corpus) -> (f64, usize) {
    use rand::SeedableRng;
    let prompt = corpus.window(8, &mut rand::rngs::StdRng::seed_from_u64(0));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, m) in models.iter().enumerate() {
        let (target, m, prompt) = (target.clone(), m.clone(), prompt.clone());
        tasks.spawn(async move { target.send((i, &m), &prompt, 2, 0.0, t0).await });
    }
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        if r.map_or(true, |o| o.error.is_some()) {
            failed += 1;
        }
    }
    (t0.elapsed().as_secs_f64(), failed)
}

/// A rate as JSON: a number, or `"inf"` (JSON has no infinity).
fn rate_json(rate: f64) -> serde_json::Value {
    if rate.is_finite() {
        rate.into()
    } else {
        "inf".into()
    }
}

fn progress_bar(quiet: bool, len: usize, rate: f64) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template(
            "{prefix:>14} [{bar:30}] {pos}/{len} {wide_msg} {elapsed_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b.set_prefix(format!("{rate} req/s"));
    b.enable_steady_tick(Duration::from_millis(250));
    b
}

/// Sends `plan` open-loop: each request at its arrival time (or as soon as a slot of `max_inflight`
/// frees), all streamed concurrently; returns every outcome, in plan order.
async fn drive(
    target: Arc<Target>,
    models: Arc<Vec<String>>,
    plan: Vec<Planned>,
    max_inflight: usize,
    bar: ProgressBar,
) -> Vec<Outcome> {
    let slots = Arc::new(Semaphore::new(max_inflight));
    let errors = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(plan.len());
    for p in plan {
        tokio::time::sleep_until(t0 + Duration::from_secs_f64(p.at)).await;
        // The semaphore is never closed; were it, the remaining requests would just not be sent.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (target, models, bar, errors, slots) = (
            target.clone(),
            models.clone(),
            bar.clone(),
            errors.clone(),
            slots.clone(),
        );
        let model = p.model;
        tasks.push((
            model,
            p.at,
            tokio::spawn(async move {
                let name = models.get(p.model).map_or("", String::as_str);
                let o = target
                    .send((p.model, name), &p.prompt, p.max_tokens, p.at, t0)
                    .await;
                drop(permit);
                let e = if o.error.is_some() {
                    errors.fetch_add(1, Ordering::Relaxed) + 1
                } else {
                    errors.load(Ordering::Relaxed)
                };
                bar.set_message(format!(
                    "in flight {}, errors {e}",
                    max_inflight - slots.available_permits()
                ));
                bar.inc(1);
                o
            }),
        ));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for (model, at, task) in tasks {
        out.push(task.await.unwrap_or_else(|e| Outcome {
            model,
            arrival_s: at,
            sent_s: at,
            end_s: t0.elapsed().as_secs_f64(),
            error: Some("client_panic".into()),
            detail: Some(e.to_string()),
            ..Default::default()
        }));
    }
    out
}

fn secs(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{:.*}", digits, x * scale))
}

fn one_line(rate: f64, s: &stats::Summary) -> String {
    let errors: Vec<String> = s.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
    format!(
        "rate {rate} req/s: {} sent, {} ok, {} errors{} | {:.1} tok/s (mid {}), {:.2} req/s | TTFT p50 {} s, \
         p99 {} s | TPOT p50 {} ms, p99 {} ms",
        s.requests,
        s.completed,
        s.requests - s.completed,
        if errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", errors.join(", "))
        },
        s.tokens_per_s,
        secs(s.mid_tokens_per_s, 1.0, 1),
        s.requests_per_s,
        secs(s.ttft_p50_s, 1.0, 3),
        secs(s.ttft_p99_s, 1.0, 3),
        secs(s.tpot_p50_ms, 1.0, 1),
        secs(s.tpot_p99_ms, 1.0, 1),
    )
}

fn num(v: &serde_json::Value, key: &str, digits: usize) -> String {
    match &v[key] {
        serde_json::Value::Number(n) => n
            .as_f64()
            .map_or_else(|| n.to_string(), |x| format!("{x:.digits$}")),
        serde_json::Value::String(s) => s.clone(),
        _ => "-".into(),
    }
}

fn text<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("?")
}

/// The markdown report of `rows` (this run's, or a whole appended file's): one settings line per run,
/// the main table, errors, and per-model tables.
pub fn render(rows: &[serde_json::Value]) -> String {
    let mut md = String::from("# Serving benchmark (`deltazip bench serve`)\n\n");
    let mut runs: Vec<(&serde_json::Value, Vec<&str>)> = Vec::new();
    for r in rows {
        let sys = text(r, "system");
        match runs.iter_mut().find(|(info, _)| *info == &r["run"]) {
            Some((_, systems)) if !systems.contains(&sys) => systems.push(sys),
            Some(_) => {}
            None => runs.push((&r["run"], vec![sys])),
        }
    }
    for (run, systems) in &runs {
        let m = &run["machine"];
        let _ = writeln!(
            md,
            "- **{}**: `{}` ({}), {} per rate, prompts of {} words from {}, max_tokens {}, at most {} in \
             flight, seed {} | {} ({} cores), GPU {} | commit `{}` | {}",
            systems.join(", "),
            text(run, "url"),
            text(run, "api"),
            text(run, "length"),
            text(run, "prompt_words"),
            text(run, "corpus"),
            text(run, "max_tokens"),
            run["max_inflight"],
            run["seed"],
            text(m, "cpu"),
            m["cores"],
            m["gpu"].as_str().unwrap_or("none"),
            text(run, "commit"),
            text(run, "date"),
        );
    }
    md.push_str(
        "\nThroughput: completed requests and their streamed tokens over each rate's window (start to \
         last response); mid tokens/s: between the 10th and the 90th percentile of the completion times, \
         each request's tokens spread evenly from its first token to its end (the ramp-up and the drain \
         left out). TTFT and end-to-end latency from each request's planned arrival; TPOT = \
         (end - first token) / (tokens - 1).\n\n\
         | system | models | popularity | rate (req/s) | sent | ok | errors | tokens/s | req/s | TTFT p50 (s) \
         | TTFT p99 (s) | TPOT p50 (ms) | TPOT p99 (ms) | E2E p50 (s) | E2E p99 (s) | mid tokens/s |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            text(r, "system"),
            r["n_models"],
            text(r, "popularity"),
            num(r, "rate", 2),
            r["requests"],
            r["completed"],
            r["errors"],
            num(r, "tokens_per_s", 1),
            num(r, "requests_per_s", 2),
            num(r, "ttft_p50_s", 3),
            num(r, "ttft_p99_s", 3),
            num(r, "tpot_p50_ms", 1),
            num(r, "tpot_p99_ms", 1),
            num(r, "e2e_p50_s", 2),
            num(r, "e2e_p99_s", 2),
            num(r, "mid_tokens_per_s", 1),
        );
    }
    let failed: Vec<_> = rows
        .iter()
        .filter(|r| r["errors"].as_u64().unwrap_or(0) > 0)
        .collect();
    if !failed.is_empty() {
        md.push_str("\nErrors (kind x count: first message):\n\n");
        for r in failed {
            let kinds: Vec<String> = r["errors_by_kind"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, n)| {
                    let sample = r["error_samples"][k].as_str().unwrap_or("");
                    format!("{k} x {n}: {sample}")
                })
                .collect();
            let _ = writeln!(
                md,
                "- {} at {} req/s: {}",
                text(r, "system"),
                num(r, "rate", 2),
                kinds.join("; ")
            );
        }
    }
    md.push_str("\n<details><summary>Per model</summary>\n");
    for r in rows {
        let _ = write!(
            md,
            "\n**{}**, {}, {} req/s\n\n\
             | model | sent | ok | errors | tokens/s | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) | E2E p50 (s) |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            text(r, "system"),
            text(r, "popularity"),
            num(r, "rate", 2)
        );
        for m in r["per_model"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                text(m, "model"),
                m["requests"],
                m["completed"],
                m["errors"],
                num(m, "tokens_per_s", 1),
                num(m, "ttft_p50_s", 3),
                num(m, "ttft_p99_s", 3),
                num(m, "tpot_p50_ms", 1),
                num(m, "e2e_p50_s", 2),
            );
        }
    }
    md.push_str("\n</details>\n");
    md
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes `STEM.json` (after the rows already there with `append`) and `STEM.md` from all its rows.
pub fn write_results(stem: &Path, rows: &[serde_json::Value], append: bool) -> Result<()> {
    let with = |ext: &str| {
        let mut p = stem.as_os_str().to_owned();
        p.push(ext);
        PathBuf::from(p)
    };
    let (json_path, md_path) = (with(".json"), with(".md"));
    let mut all = Vec::new();
    if append && json_path.exists() {
        let text = std::fs::read_to_string(&json_path)
            .with_context(|| format!("reading {}", json_path.display()))?;
        match serde_json::from_str(&text) {
            Ok(serde_json::Value::Array(old)) => all = old,
            _ => bail!(
                "{}: --append needs a JSON list of result rows",
                json_path.display()
            ),
        }
    }
    all.extend(rows.iter().cloned());
    let json = serde_json::to_string_pretty(&all).context("encoding the results")?;
    write_atomic(&json_path, format!("{json}\n").as_bytes())?;
    write_atomic(&md_path, render(&all).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests;

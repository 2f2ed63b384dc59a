//! The demo's serving stage: every compressed fine-tune behind one `deltazip serve`, checked against
//! the merged fine-tunes.
//!
//! 1. Budgets from the deltas' own sizes: GPU room for `gpu_deltas` of them and a CPU cache for
//!    `cpu_deltas`, both fewer than the set, so the mixed workload below evicts and reloads.
//! 2. References: `reference.toml` (every fine-tune in merge mode: base + delta written out as plain
//!    weights, one model each) loaded into the host engine, which answers each distinct (model,
//!    prompt) of the plan once, one request at a time. Then it is dropped.
//! 3. The server under test over `serve.toml` (the base and every delta in multi-tenant mode, the
//!    budgets above), on 127.0.0.1 and a free port, in this process: `clients` concurrent clients send
//!    the plan's `requests` (greedy; models round robin in a seeded order, prompts and streaming drawn
//!    with the seed). First, alone: every (model, prompt)'s plain answer must equal the merged
//!    fine-tune's (text and tokens), and each streamed pair's stream is recorded. Then, concurrently,
//!    every plain answer must equal the merged fine-tune's and every stream the same stream alone
//!    (streams spell the tiny random model's non-UTF-8 bytes differently from a whole decode, so a
//!    stream is compared with a stream; its tokens are tied to the merged fine-tune by the plain check).
//! 4. Throughput and the tiers' counters, read from the server's `GET /metrics`.
//!
//! References and server both decode greedily (top-k 1) through the same host, so a difference is one
//! of serving (multi-tenant deltas, batching across fine-tunes, residency), not of sampling.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::bench_serve::client::{Api, SseReader};
use crate::inspect::human;
use crate::serve::{start, ServeArgs};

/// The base's name in both configs.
pub const BASE: &str = "base";

/// The prompts requests draw from (byte-level tokenizer: any text works).
const PROMPTS: [&str; 6] = [
    "def main():\n    ",
    "Once upon a time, ",
    "The quick brown fox",
    "SELECT name FROM users WHERE ",
    "fn parse(input: &str) -> ",
    "In 1905 the physicist ",
];

/// How long one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// What the serving stage sends, and with how much room.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeOptions {
    /// Requests in the workload.
    pub requests: usize,
    /// Concurrent clients sending them.
    pub clients: usize,
    /// Tokens generated per request (at most; a request stops at the end-of-text token).
    pub max_tokens: usize,
    /// GPU delta budget, in deltas (the largest ones).
    pub gpu_deltas: usize,
    /// CPU cache budget, in deltas (the largest ones).
    pub cpu_deltas: usize,
    /// Seeds the order of the models, the prompts and which requests stream.
    pub seed: u64,
}

impl ServeOptions {
    /// Refuses options the stage cannot run with, naming the demo's flag.
    pub fn validate(&self) -> Result<()> {
        for (flag, v) in [
            ("--requests", self.requests),
            ("--clients", self.clients),
            ("--max-tokens", self.max_tokens),
            ("--gpu-deltas", self.gpu_deltas),
        ] {
            if v == 0 {
                bail!("{flag} 0: the serving stage needs at least 1 (or pass --no-serve)");
            }
        }
        Ok(())
    }
}

/// One tier's counters over the stage (from `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TierCounts {
    /// Lookups the tier answered (GPU: a delta ready when the scheduler asked; CPU: a load that found
    /// the host form cached).
    pub hits: u64,
    /// Lookups it could not (GPU: not ready yet; CPU: the delta had to be read from disk).
    pub misses: u64,
    /// Completed loads into the tier (GPU: uploads; CPU: reads from disk).
    pub loads: u64,
    /// Deltas evicted from the tier to make room.
    pub evictions: u64,
}

impl TierCounts {
    /// hits / (hits + misses), or `None` when nothing was looked up.
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| self.hits as f64 / n as f64)
    }
}

/// What the serving stage measured.
#[derive(Debug, Clone, Default)]
pub struct ServeReport {
    /// The models served: the base and every delta.
    pub models: usize,
    /// Requests sent.
    pub requests: usize,
    /// Of them, streamed.
    pub streamed: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Requests that failed (HTTP status, broken stream, timeout).
    pub errors: usize,
    /// Requests answered with other text or another token count than their reference.
    pub mismatches: usize,
    /// The first few errors and mismatches, one line each.
    pub problems: Vec<String>,
    /// Reference (model, prompt) pairs answered by the merged fine-tunes.
    pub references: usize,
    /// Wall time of the workload, first request sent to last answer.
    pub wall_s: f64,
    /// Tokens generated during the workload (the server's `deltazip_tokens_total`).
    pub generated_tokens: u64,
    /// GPU tier.
    pub gpu: TierCounts,
    /// CPU tier.
    pub cpu: TierCounts,
    /// The GPU delta budget, bytes.
    pub gpu_budget: u64,
    /// The CPU cache budget, bytes.
    pub cpu_budget: u64,
    /// Device bytes of all the deltas.
    pub set_device_bytes: u64,
    /// Host bytes of all the deltas.
    pub set_host_bytes: u64,
}

impl ServeReport {
    /// Requests per second over the workload.
    pub fn requests_per_s(&self) -> f64 {
        self.requests as f64 / self.wall_s.max(1e-9)
    }

    /// Generated tokens per second over the workload.
    pub fn tokens_per_s(&self) -> f64 {
        self.generated_tokens as f64 / self.wall_s.max(1e-9)
    }

    /// `Err` naming the errors and mismatches, if any.
    pub fn check(&self) -> Result<()> {
        if self.errors == 0 && self.mismatches == 0 {
            return Ok(());
        }
        bail!(
            "serve stage: {} errors and {} mismatches in {} requests (first: {})",
            self.errors,
            self.mismatches,
            self.requests,
            self.problems.first().map_or("-", String::as_str)
        )
    }
}

/// One planned request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Planned {
    model: String,
    prompt: &'static str,
    stream: bool,
}

/// An answer: its text and how many tokens it had.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    text: String,
    tokens: u64,
}

/// Runs the stage in `dir` (configs and merged models go there) over `base` and the `deltas`
/// (name, file); `say` prints progress.
pub fn run(
    dir: &Path,
    base: &Path,
    deltas: &[(String, PathBuf)],
    opts: &ServeOptions,
    say: &dyn Fn(&str),
) -> Result<ServeReport> {
    opts.validate()?;
    if deltas.is_empty() {
        bail!("serve stage: no deltas to serve");
    }
    let mut report = ServeReport {
        models: deltas.len() + 1,
        requests: opts.requests,
        clients: opts.clients,
        ..ServeReport::default()
    };

    // 1. Budgets, from what the server will count: each delta's host and device bytes.
    let mut host_bytes = Vec::new();
    let mut device_bytes = Vec::new();
    for (name, path) in deltas {
        let file = dz_format::DeltaFile::open(path)
            .with_context(|| format!("serve stage: opening {}", path.display()))?;
        let host = dz_loader::HostDelta::read(name, &file)
            .with_context(|| format!("serve stage: reading {}", path.display()))?;
        host_bytes.push(host.bytes());
        device_bytes.push(host.device_bytes(&candle_core::Device::Cpu)); // the demo serves on the CPU
    }
    let largest = |v: &[u64], n: usize| -> u64 {
        let mut v = v.to_vec();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.iter().take(n).sum()
    };
    report.gpu_budget = largest(&device_bytes, opts.gpu_deltas);
    report.cpu_budget = largest(&host_bytes, opts.cpu_deltas);
    report.set_device_bytes = device_bytes.iter().sum();
    report.set_host_bytes = host_bytes.iter().sum();

    // 2. Configs.
    let reference_toml = dir.join("reference.toml");
    let serve_toml = dir.join("serve.toml");
    std::fs::write(&reference_toml, reference_config(dir, base, deltas)?)
        .with_context(|| format!("writing {}", reference_toml.display()))?;
    std::fs::write(&serve_toml, serve_config(dir, base, deltas, &report, opts)?)
        .with_context(|| format!("writing {}", serve_toml.display()))?;
    say(&format!(
        "\nserving: {} with the base and {} multi-tenant deltas; GPU delta budget {} ({} of {} deltas, \
         set {}), CPU cache {} ({} of {}, set {})",
        serve_toml.display(),
        deltas.len(),
        human(report.gpu_budget),
        opts.gpu_deltas.min(deltas.len()),
        deltas.len(),
        human(report.set_device_bytes),
        human(report.cpu_budget),
        opts.cpu_deltas.min(deltas.len()),
        deltas.len(),
        human(report.set_host_bytes),
    ));
    if opts.gpu_deltas >= deltas.len() && opts.cpu_deltas >= deltas.len() {
        say("  (both budgets hold every delta: nothing will be evicted)");
    }

    let plan = plan(deltas, opts);
    report.streamed = plan.iter().filter(|p| p.stream).count();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the demo's client runtime")?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .context("building the HTTP client")?;

    // 3. References: each distinct (model, prompt) once, alone, through the merged fine-tunes. They
    //    run on the host engine directly (dz-loader's `Engine`, which sends each request to its
    //    model's engine): mistralrs-server-core 0.8.1's `/v1/completions` sends every request to the
    //    default engine whatever its `model`, so over HTTP a merged fine-tune would answer as the base.
    let t = Instant::now();
    let mut distinct: Vec<(String, &'static str)> =
        plan.iter().map(|p| (p.model.clone(), p.prompt)).collect();
    distinct.sort();
    distinct.dedup();
    let mut references = BTreeMap::new();
    {
        let (config, checked) = dz_loader::Config::load(&reference_toml)
            .with_context(|| format!("loading {}", reference_toml.display()))?;
        let served =
            dz_loader::serve(&config, &checked).context("loading the merged fine-tunes")?;
        for (model, prompt) in &distinct {
            let g = served
                .engine
                .generate(model, prompt, opts.max_tokens)
                .with_context(|| format!("reference {model} {prompt:?}"))?;
            let answer = Answer {
                text: g.text,
                tokens: g.tokens.len() as u64,
            };
            references.insert((model.clone(), *prompt), answer);
        }
    }
    report.references = distinct.len();
    say(&format!(
        "references: {} distinct (model, prompt) pairs answered by the merged fine-tunes and the base \
         (merge mode, {}), one request at a time ({:.1} s)",
        distinct.len(),
        reference_toml.display(),
        t.elapsed().as_secs_f64()
    ));

    // 4. The server under test, and the workload.
    let server =
        start(&ServeArgs::loopback(&serve_toml)).context("starting the multi-tenant server")?;
    let url = format!("http://{}", server.addr);
    // Alone on this server first: each pair's plain answer must be the merged fine-tune's (text and
    // tokens), and each streamed pair's stream is recorded. A stream renders the same tokens
    // incrementally, and this tiny random model emits bytes that are not UTF-8, which incremental
    // and whole decoding spell differently; so a streamed answer is compared with the same stream
    // alone, whose tokens are the merged fine-tune's by the plain check.
    let mut streamed_alone = BTreeMap::new();
    for (model, prompt) in &distinct {
        let want = &references[&(model.clone(), *prompt)];
        for stream in [false, true] {
            let p = Planned {
                model: model.clone(),
                prompt,
                stream,
            };
            if stream && !plan.contains(&p) {
                continue;
            }
            let got = rt
                .block_on(send(&client, &url, &p, opts.max_tokens))
                .map_err(|e| anyhow::anyhow!("{model} {prompt:?} alone: {e}"))?;
            if stream {
                streamed_alone.insert((model.clone(), *prompt), got);
            } else if &got != want {
                report.mismatches += 1;
                note(
                    &mut report.problems,
                    format!(
                        "{model} alone, prompt {prompt:?}: got {:?} ({} tokens), the merged fine-tune \
                         gives {:?} ({} tokens)",
                        got.text, got.tokens, want.text, want.tokens
                    ),
                );
            }
        }
    }
    say(&format!(
        "alone on the multi-tenant server: {} plain answers checked against the merged fine-tunes, \
         {} mismatches",
        distinct.len(),
        report.mismatches
    ));
    let before = rt.block_on(metrics(&client, &url))?;
    say(&format!(
        "workload: {} requests ({} streamed) from {} concurrent clients, {} tokens each at most, \
         greedy ...",
        plan.len(),
        report.streamed,
        opts.clients,
        opts.max_tokens
    ));
    let plan = Arc::new(plan);
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let results: Vec<(usize, Result<Answer, String>)> = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..opts.clients {
            let (plan, next, client, url) =
                (plan.clone(), next.clone(), client.clone(), url.clone());
            let max_tokens = opts.max_tokens;
            set.spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = plan.get(i) else { break };
                    out.push((i, send(&client, &url, p, max_tokens).await));
                }
                out
            });
        }
        let mut all = Vec::new();
        while let Some(done) = set.join_next().await {
            match done {
                Ok(v) => all.extend(v),
                Err(e) => all.push((usize::MAX, Err(format!("a client task failed: {e}")))),
            }
        }
        all
    });
    report.wall_s = t.elapsed().as_secs_f64();
    let after = rt.block_on(metrics(&client, &url))?;
    drop(server);

    // 5. Every answer against its reference.
    let mut answered = vec![false; plan.len()];
    for (i, result) in results {
        let Some(p) = plan.get(i) else {
            report.errors += 1;
            note(&mut report.problems, result.err().unwrap_or_default());
            continue;
        };
        answered[i] = true;
        let how = if p.stream { "streamed" } else { "plain" };
        match result {
            Err(e) => {
                report.errors += 1;
                note(
                    &mut report.problems,
                    format!("request {i} ({}, {how}): {e}", p.model),
                );
            }
            Ok(got) => {
                let key = (p.model.clone(), p.prompt);
                let want = if p.stream {
                    &streamed_alone[&key]
                } else {
                    &references[&key]
                };
                if &got != want {
                    report.mismatches += 1;
                    note(
                        &mut report.problems,
                        format!(
                            "request {i} ({}, {how}, prompt {:?}): got {:?} ({} tokens), alone: {:?} \
                             ({} tokens)",
                            p.model, p.prompt, got.text, got.tokens, want.text, want.tokens
                        ),
                    );
                }
            }
        }
    }
    let unanswered = answered.iter().filter(|a| !**a).count();
    if unanswered > 0 {
        report.errors += unanswered;
        note(
            &mut report.problems,
            format!("{unanswered} requests got no answer"),
        );
    }

    // 6. Counters.
    let tier = |m: &Prom, tier: &str| TierCounts {
        hits: m.get("deltazip_delta_hits_total", tier),
        misses: m.get("deltazip_delta_misses_total", tier),
        loads: m.get("deltazip_delta_loads_total", tier),
        evictions: m.get("deltazip_delta_evictions_total", tier),
    };
    let diff = |a: TierCounts, b: TierCounts| TierCounts {
        hits: a.hits - b.hits.min(a.hits),
        misses: a.misses - b.misses.min(a.misses),
        loads: a.loads - b.loads.min(a.loads),
        evictions: a.evictions - b.evictions.min(a.evictions),
    };
    report.gpu = diff(tier(&after, "gpu"), tier(&before, "gpu"));
    report.cpu = diff(tier(&after, "cpu"), tier(&before, "cpu"));
    report.generated_tokens = after.tokens.saturating_sub(before.tokens);
    say(&table(&report));
    Ok(report)
}

fn note(problems: &mut Vec<String>, line: String) {
    if problems.len() < 5 {
        problems.push(line);
    }
}

/// `path` as a TOML string, relative to `dir` when it is inside it.
fn toml_path(dir: &Path, path: &Path) -> Result<String> {
    let p = path.strip_prefix(dir).unwrap_or(path);
    let s = p
        .to_str()
        .with_context(|| format!("{}: not UTF-8", p.display()))?;
    // A JSON string is a valid TOML basic string (the same escapes).
    Ok(serde_json::to_string(s)?)
}

fn reference_config(dir: &Path, base: &Path, deltas: &[(String, PathBuf)]) -> Result<String> {
    let mut s = String::from(
        "# deltazip demo: the serve stage's reference. Every fine-tune merged (base + delta written out\n\
         # as plain weights under merged_dir), each its own model, asked one request at a time.\n",
    );
    let _ = writeln!(
        s,
        "[base]\npath = {}\ndtype = \"f32\"\nname = \"{BASE}\"\n",
        toml_path(dir, base)?
    );
    for (name, path) in deltas {
        let _ = writeln!(
            s,
            "[[delta]]\nname = {}\npath = {}\nmode = \"merge\"\n",
            serde_json::to_string(name)?,
            toml_path(dir, path)?
        );
    }
    s.push_str(
        "[runtime]\ndevice = \"cpu\"\nmerged_dir = \"merged\"\n\n[scheduler]\nmax_seqs = 1\n",
    );
    Ok(s)
}

fn serve_config(
    dir: &Path,
    base: &Path,
    deltas: &[(String, PathBuf)],
    report: &ServeReport,
    opts: &ServeOptions,
) -> Result<String> {
    let mut s = String::from(
        "# deltazip demo: the serve stage's server. The base and every fine-tune as a multi-tenant delta\n\
         # (one copy of the base; each batch row adds its fine-tune's delta), with delta budgets smaller\n\
         # than the set so that the mixed workload evicts and reloads. Run it yourself with\n\
         # `deltazip serve --config serve.toml` (from the demo's --out directory).\n",
    );
    let _ = writeln!(
        s,
        "[base]\npath = {}\ndtype = \"f32\"\nname = \"{BASE}\"\n",
        toml_path(dir, base)?
    );
    for (name, path) in deltas {
        let _ = writeln!(
            s,
            "[[delta]]\nname = {}\npath = {}\nmode = \"multi-tenant\"\n",
            serde_json::to_string(name)?,
            toml_path(dir, path)?
        );
    }
    let _ = writeln!(
        s,
        "[runtime]\ndevice = \"cpu\"\n# {} of the {} deltas' device forms\ngpu_delta_bytes = {}\n\
         # {} of their packed host forms\ncpu_cache_bytes = {}\n\n[scheduler]\nmax_seqs = {}",
        opts.gpu_deltas.min(deltas.len()),
        deltas.len(),
        report.gpu_budget,
        opts.cpu_deltas.min(deltas.len()),
        report.cpu_budget,
        opts.clients.clamp(1, 32),
    );
    Ok(s)
}

/// The workload: models round robin (all deltas and the base, in a seeded order), prompts and
/// streaming drawn with the seed.
fn plan(deltas: &[(String, PathBuf)], opts: &ServeOptions) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x5e7e_5e7e);
    let mut models: Vec<String> = deltas.iter().map(|(n, _)| n.clone()).collect();
    models.push(BASE.to_string());
    models.shuffle(&mut rng);
    (0..opts.requests)
        .map(|i| Planned {
            model: models[i % models.len()].clone(),
            prompt: PROMPTS[rng.gen_range(0..PROMPTS.len())],
            stream: rng.gen_bool(0.5),
        })
        .collect()
}

/// One greedy completion; the answer's text and token count (streamed: the chunks with text;
/// otherwise `usage.completion_tokens`).
async fn send(
    client: &reqwest::Client,
    url: &str,
    p: &Planned,
    max_tokens: usize,
) -> Result<Answer, String> {
    let body = serde_json::json!({
        "model": p.model,
        "prompt": p.prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_k": 1,
        "stream": p.stream,
    });
    let request = client
        .post(format!("{url}/v1/completions"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .timeout(REQUEST_TIMEOUT)
        .send();
    let mut resp = request.await.map_err(|e| format!("{e:#}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("HTTP {status}: {}", text.trim()));
    }
    if !p.stream {
        let text = resp.text().await.map_err(|e| format!("{e:#}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text}"))?;
        let (Some(text), Some(tokens)) = (
            v["choices"][0]["text"].as_str(),
            v["usage"]["completion_tokens"].as_u64(),
        ) else {
            return Err(format!(
                "no choices[0].text or usage.completion_tokens in {v}"
            ));
        };
        return Ok(Answer {
            text: text.to_string(),
            tokens,
        });
    }
    let mut sse = SseReader::new(Api::Completions);
    loop {
        match resp.chunk().await {
            Ok(Some(bytes)) => {
                if sse
                    .feed(&bytes)
                    .map_err(|(kind, d)| format!("{kind}: {d}"))?
                {
                    return Ok(Answer {
                        text: sse.text,
                        tokens: sse.tokens as u64,
                    });
                }
            }
            // A stream that stops at the end-of-text token ends without a final chunk and without
            // `[DONE]` (mistral.rs 0.8.1 sends no chunk when the last token adds no text); what it
            // streamed is still compared with the reference, which ends the same way.
            Ok(None) => {
                return Ok(Answer {
                    text: sse.text,
                    tokens: sse.tokens as u64,
                })
            }
            Err(e) => return Err(format!("{e:#}")),
        }
    }
}

/// The counters of a `/metrics` text that the stage reads.
struct Prom {
    lines: Vec<(String, u64)>,
    /// `deltazip_tokens_total`, summed over models.
    tokens: u64,
}

impl Prom {
    fn get(&self, name: &str, tier: &str) -> u64 {
        let key = format!("{name}{{tier=\"{tier}\"}}");
        self.lines
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(0, |(_, v)| *v)
    }
}

async fn metrics(client: &reqwest::Client, url: &str) -> Result<Prom> {
    let text = client
        .get(format!("{url}/metrics"))
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .context("GET /metrics")?
        .text()
        .await
        .context("GET /metrics")?;
    let mut lines = Vec::new();
    let mut tokens = 0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        // Counters are integers; gauges such as load seconds are skipped.
        let Ok(v) = value.parse::<u64>() else {
            continue;
        };
        if key.starts_with("deltazip_tokens_total{") {
            tokens += v;
        }
        lines.push((key.to_string(), v));
    }
    Ok(Prom { lines, tokens })
}

fn rate(r: Option<f64>) -> String {
    r.map_or("-".to_string(), |r| format!("{:.0}%", 100.0 * r))
}

fn table(r: &ServeReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{:>8} {:>8} {:>10} {:>8} {:>10} {:>12}",
        "requests", "errors", "mismatches", "wall", "requests/s", "gen tokens/s"
    );
    let _ = writeln!(
        s,
        "{:>8} {:>8} {:>10} {:>7.2}s {:>10.1} {:>12.1}",
        r.requests,
        r.errors,
        r.mismatches,
        r.wall_s,
        r.requests_per_s(),
        r.tokens_per_s()
    );
    let _ = writeln!(
        s,
        "\n{:<5} {:>6} {:>7} {:>9} {:>6} {:>10}",
        "tier", "hits", "misses", "hit rate", "loads", "evictions"
    );
    for (name, t) in [("GPU", r.gpu), ("CPU", r.cpu)] {
        let _ = writeln!(
            s,
            "{:<5} {:>6} {:>7} {:>9} {:>6} {:>10}",
            name,
            t.hits,
            t.misses,
            rate(t.hit_rate()),
            t.loads,
            t.evictions
        );
    }
    let _ = writeln!(
        s,
        "\n{} requests ({} streamed) over {} models (the base and {} deltas) from {} clients, each \
         compared with the\nsame request alone (plain: the merged fine-tune's answer; streamed: the same stream alone on this server,\nwhose pair's plain answer matched the merged fine-tune): same text and token count. \
         GPU hits/misses: the\nscheduler's lookups of a waiting fine-tune's delta (ready / not yet); GPU \
         loads: uploads. CPU hits: uploads\nthat found the delta in the CPU cache; CPU misses = CPU loads: \
         reads from disk. {} generated tokens.",
        r.requests,
        r.streamed,
        r.models,
        r.models - 1,
        r.clients,
        r.generated_tokens
    );
    for p in &r.problems {
        let _ = writeln!(s, "  {p}");
    }
    s
}

//! `dz-unpatched-check`: greedy generation and next-token logits from crates.io mistralrs-core 0.8.1 as
//! published, without host/patches, for the test that the patched host with no deltas answers like it
//! (crates/dz-loader/tests/loader/unpatched_host.rs: logits bit for bit, the same tokens).
//!
//! ```text
//! dz-unpatched-check --model DIR [--dtype auto|f32|f16|bf16] [--max-tokens N] [--max-seqs N]
//!                    --prompt ID,ID,.. [--prompt ..]
//! ```
//!
//! Every call into the host mirrors crates/dz-loader/src/host.rs (keep them in step): the normal loader
//! with a hand-built `LocalModelPaths` (weights and config.json from DIR, tokenizer from DIR), the CPU,
//! the default scheduler with `max_seqs`, no prefix cache, `SamplingParams::deterministic()` with
//! [`TOP_LOGPROBS`] log-probabilities, one request at a time. For each prompt it prints the greedy
//! completion of `max_tokens` tokens (text, each token's text, score and top entries) and the raw
//! next-token logits after the prompt and after each prefix of the completion but the whole (one prefill
//! each). Floats are printed as their f32 bit patterns (`f32::to_bits`), so a comparison is exact.
//!
//! Output, one JSON object on stdout:
//! `{"host": "...", "results": [{"prompt": [ids], "text": "..", "tokens": [{"text": "..", "logprob":
//! bits, "top": [[id, bits], ..]}], "logits": [[bits, ..], ..]}]}`.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use mistralrs_core::{
    AdapterPaths, Constraint, DefaultSchedulerMethod, DeviceMapSetting, LocalModelPaths, MistralRs,
    MistralRsBuilder, ModelDType, ModelPaths, NormalLoaderBuilder, NormalRequest,
    NormalSpecificConfig, Request, RequestMessage, Response, SamplingParams, SchedulerConfig,
};
use serde_json::{json, Value};

/// As dz-loader's `host::TOP_LOGPROBS`.
const TOP_LOGPROBS: usize = 3;
/// The name the model is served under (requests name it).
const MODEL: &str = "base";

struct Args {
    model: PathBuf,
    dtype: ModelDType,
    max_tokens: usize,
    max_seqs: usize,
    prompts: Vec<Vec<u32>>,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut model = None;
    let mut dtype = ModelDType::Auto;
    let mut max_tokens = 12;
    let mut max_seqs = 32;
    let mut prompts = Vec::new();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{flag}: needs a value"));
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--dtype" => {
                dtype = match value()?.as_str() {
                    "auto" => ModelDType::Auto,
                    "f32" => ModelDType::F32,
                    "f16" => ModelDType::F16,
                    "bf16" => ModelDType::BF16,
                    other => bail!("--dtype {other:?}: expected auto, f32, f16 or bf16"),
                }
            }
            "--max-tokens" => max_tokens = value()?.parse().context("--max-tokens")?,
            "--max-seqs" => max_seqs = value()?.parse().context("--max-seqs")?,
            "--prompt" => prompts.push(
                value()?
                    .split(',')
                    .map(|t| t.trim().parse::<u32>())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .context("--prompt: token ids separated by commas")?,
            ),
            other => bail!("unknown argument {other:?} (see the doc at the top of main.rs)"),
        }
    }
    let model = model.ok_or_else(|| anyhow!("--model DIR is required"))?;
    if prompts.is_empty() {
        bail!("at least one --prompt is required");
    }
    Ok(Args {
        model,
        dtype,
        max_tokens,
        max_seqs,
        prompts,
    })
}

/// dz-loader's `host::local_paths(dir, dir)`.
fn local_paths(dir: &Path) -> Result<LocalModelPaths<PathBuf>> {
    let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| dir.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    weights.sort();
    if weights.is_empty() {
        bail!("{}: no *.safetensors files", dir.display());
    }
    let opt = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    Ok(LocalModelPaths {
        tokenizer_filename: dir.join("tokenizer.json"),
        config_filename: dir.join("config.json"),
        template_filename: opt("tokenizer_config.json"),
        filenames: weights,
        adapter_paths: AdapterPaths::None,
        gen_conf: opt("generation_config.json"),
        preprocessor_config: None,
        processor_config: None,
        chat_template_json_filename: opt("chat_template.jinja"),
    })
}

/// dz-loader's `host::load_pipeline` and `Engine::add` (first model, contiguous KV cache).
fn build(rt: &tokio::runtime::Runtime, args: &Args) -> Result<Arc<MistralRs>> {
    let loader = NormalLoaderBuilder::new(
        NormalSpecificConfig::default(),
        None,
        None,
        Some(args.model.to_string_lossy().into_owned()),
        false,
        None,
    )
    .build(None)?;
    let paths: Box<dyn ModelPaths> = Box::new(local_paths(&args.model)?);
    let pipeline = loader.load_model_from_path(
        &paths,
        &args.dtype,
        &Device::Cpu,
        true,
        DeviceMapSetting::dummy(),
        None,
        None,
    )?;
    let scheduler = SchedulerConfig::DefaultScheduler {
        method: DefaultSchedulerMethod::Fixed(
            NonZeroUsize::new(args.max_seqs).unwrap_or(NonZeroUsize::MIN),
        ),
    };
    let builder = MistralRsBuilder::new(pipeline, scheduler, false, None)
        .with_model_id(MODEL)
        .with_no_prefix_cache(true)
        .with_no_kv_cache(false);
    Ok(rt.block_on(builder.build()))
}

/// dz-loader's `Engine::send` + `Engine::receive`: one greedy request, its final response.
fn request(
    rt: &tokio::runtime::Runtime,
    m: &MistralRs,
    tokens: &[u32],
    max_tokens: usize,
    raw_logits: bool,
) -> Result<Response> {
    let sender = m.get_sender(Some(MODEL)).map_err(|e| anyhow!("{e}"))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let mut sampling = SamplingParams::deterministic();
    sampling.max_len = Some(max_tokens);
    sampling.top_n_logprobs = TOP_LOGPROBS;
    let request = NormalRequest {
        messages: RequestMessage::CompletionTokens(tokens.to_vec()),
        sampling_params: sampling,
        response: tx,
        return_logprobs: !raw_logits,
        is_streaming: false,
        id: m.next_request_id(),
        constraint: Constraint::None,
        suffix: None,
        tools: None,
        tool_choice: None,
        logits_processors: None,
        return_raw_logits: raw_logits,
        web_search_options: None,
        model_id: Some(MODEL.to_string()),
        truncate_sequence: false,
    };
    rt.block_on(async {
        sender
            .send(Request::Normal(Box::new(request)))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        match rx.recv().await {
            Some(Response::CompletionModelError(e, _)) => Err(anyhow!("{e}")),
            Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
                Err(anyhow!("{e}"))
            }
            Some(r) => Ok(r),
            None => Err(anyhow!("the engine dropped the request")),
        }
    })
}

/// dz-loader's `Engine::generate_tokens`: (text, token entries as JSON, greedy ids).
fn generate(
    rt: &tokio::runtime::Runtime,
    m: &MistralRs,
    prompt: &[u32],
    max_tokens: usize,
) -> Result<(String, Vec<Value>, Vec<u32>)> {
    let Response::CompletionDone(r) = request(rt, m, prompt, max_tokens, false)? else {
        bail!("unexpected response kind");
    };
    let choice = r
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("a completion with no choices"))?;
    let mut ids = Vec::new();
    let mut tokens = Vec::new();
    for l in choice.logprobs.and_then(|l| l.content).unwrap_or_default() {
        let top: Vec<Value> = l
            .top_logprobs
            .iter()
            .map(|t| json!([t.token, t.logprob.to_bits()]))
            .collect();
        let id = l
            .top_logprobs
            .first()
            .map(|t| t.token)
            .ok_or_else(|| anyhow!("a generated token without top log-probabilities"))?;
        ids.push(id);
        tokens.push(json!({"text": l.token, "logprob": l.logprob.to_bits(), "top": top}));
    }
    Ok((choice.text, tokens, ids))
}

/// dz-loader's `Engine::next_logits`, as bit patterns.
fn next_logits(rt: &tokio::runtime::Runtime, m: &MistralRs, tokens: &[u32]) -> Result<Vec<u32>> {
    let Response::Raw { logits_chunks, .. } = request(rt, m, tokens, 1, true)? else {
        bail!("expected raw logits");
    };
    let last = logits_chunks
        .last()
        .ok_or_else(|| anyhow!("no logits returned"))?;
    let v = last
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let vocab = last.dims().last().copied().unwrap_or(v.len()).max(1);
    Ok(v[v.len() - vocab.min(v.len())..]
        .iter()
        .map(|x| x.to_bits())
        .collect())
}

fn run(args: &Args) -> Result<Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let m = build(&rt, args)?;
    let mut results = Vec::new();
    for prompt in &args.prompts {
        let (text, tokens, ids) = generate(&rt, &m, prompt, args.max_tokens)?;
        let mut ctx = prompt.clone();
        let mut logits = Vec::new();
        for &id in &ids {
            logits.push(next_logits(&rt, &m, &ctx)?);
            ctx.push(id);
        }
        results.push(json!({"prompt": prompt, "text": text, "tokens": tokens, "logits": logits}));
    }
    // MistralRs's Drop stops its engine threads; drop it inside the runtime's context (as dz-loader).
    {
        let _guard = rt.enter();
        drop(m);
    }
    Ok(json!({
        "host": "mistralrs-core 0.8.1 (crates.io, unpatched)",
        "results": results,
    }))
}

fn main() {
    let out = parse_args().and_then(|a| run(&a));
    match out {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("dz-unpatched-check: {e:#}");
            std::process::exit(1);
        }
    }
}

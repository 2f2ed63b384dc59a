//! A short full-parameter fine-tune of a Llama-family HF model on a text file, with candle's autograd: real
//! fine-tunes (base + delta pairs) to measure how much of a fine-tune survives delta compression (DeltaZip,
//! arXiv 2312.05215, compresses the deltas of full-parameter fine-tunes).
//!
//! ```text
//! cargo run --release -p dz-compress --example finetune -- --model DIR --text FILE --out DIR \
//!     [--steps 30 --batch 4 --seq-len 128 --lr 1e-4 --seed 0 --dtype f32|bf16 --eval-tokens 8192]
//! ```
//!
//! The text is split at the first line break after 90% of its bytes: training draws `batch` random (seeded)
//! windows of `seq-len` tokens per step from the first part; the held-out last 10% measures perplexity
//! (evenly spaced windows of `eval-seq-len` tokens) of the base before and of the written fine-tune after.
//! The training loop is `dz_compress::train` (AdamW, weight decay 0, on the mean next-token cross-entropy,
//! every weight trainable; tied embeddings stay one variable). The fine-tune is written with `hf::write_model`: the base's
//! config.json (with `torch_dtype` set to `--dtype`), its tokenizer.json, the weights in `--dtype`, and
//! `finetune.json` recording the run (arguments, losses, step times, perplexities).
//!
//! Speed on the CPU: candle's matmuls use every rayon thread (`RAYON_NUM_THREADS`, default all cores) but its
//! elementwise ops run on one, so the AdamW update, about a dozen passes over every weight, is split into one
//! optimizer per thread over disjoint, equally sized sets of variables, stepped in parallel (the same math as
//! one AdamW: its update is per element). Every candle op allocates its output afresh; [`ReuseLargeBlocks`]
//! keeps large freed blocks for the next step instead of returning them to the kernel.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Parser, ValueEnum};
use dz_compress::calib_data::{load_tokenizer, token_windows, tokenize};
use dz_compress::hf::{self, HfModel};
use dz_compress::model::{Kernels, LlamaModel};
use dz_compress::train::{self, TrainConfig};
use dz_format::Dtype;

/// Blocks of at least this many bytes are kept for reuse when freed.
const REUSE_MIN_BYTES: usize = 1 << 20;
/// At most this many bytes are kept.
const REUSE_MAX_BYTES: usize = 6 << 30;

/// A global allocator that keeps freed blocks of [`REUSE_MIN_BYTES`] or more, by exact size and alignment
/// (up to [`REUSE_MAX_BYTES`] in all), and hands them out again.
///
/// Why: candle allocates every op's output afresh, and glibc returns blocks above its mmap threshold (32 MiB
/// at most) to the kernel on free, so each step faulted in and zeroed gigabytes of new pages (`perf`: a
/// quarter of a step in `clear_page_erms` and page faults). A training step allocates the same sizes as the
/// step before, so exact-size reuse catches nearly all of them. Smaller blocks go to the system allocator.
struct ReuseLargeBlocks;

/// Free blocks by (size, align), as addresses, and their total size.
type FreeBlocks = (BTreeMap<(usize, usize), Vec<usize>>, usize);
static FREE_BLOCKS: std::sync::Mutex<FreeBlocks> = std::sync::Mutex::new((BTreeMap::new(), 0));

impl ReuseLargeBlocks {
    /// A kept block for `layout`, if any. The map's own allocations are small, so they never come back here
    /// while the lock is held.
    fn take(layout: Layout) -> Option<*mut u8> {
        let mut guard = FREE_BLOCKS.lock().ok()?;
        let (map, bytes) = &mut *guard;
        let ptr = map.get_mut(&(layout.size(), layout.align()))?.pop()?;
        *bytes -= layout.size();
        Some(ptr as *mut u8)
    }

    /// Keeps `ptr` for reuse; false when the cache is full (the caller frees it).
    fn keep(ptr: *mut u8, layout: Layout) -> bool {
        let Ok(mut guard) = FREE_BLOCKS.lock() else {
            return false;
        };
        let (map, bytes) = &mut *guard;
        if *bytes + layout.size() > REUSE_MAX_BYTES {
            return false;
        }
        map.entry((layout.size(), layout.align()))
            .or_default()
            .push(ptr as usize);
        *bytes += layout.size();
        true
    }
}

// SAFETY: every block handed out was allocated by `System` with exactly the same size and alignment, and is
// handed out at most once until it is freed again; blocks are only ever freed through `System`.
unsafe impl GlobalAlloc for ReuseLargeBlocks {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= REUSE_MIN_BYTES {
            if let Some(p) = Self::take(layout) {
                return p;
            }
        }
        // SAFETY: the caller's contract for `layout` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= REUSE_MIN_BYTES {
            if let Some(p) = Self::take(layout) {
                // SAFETY: `p` is a live block of `layout.size()` bytes that nothing else uses.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                return p;
            }
        }
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= REUSE_MIN_BYTES && Self::keep(ptr, layout) {
            return;
        }
        // SAFETY: `ptr` came from `System` with `layout` (directly, or kept and handed out again).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < REUSE_MIN_BYTES && new_size < REUSE_MIN_BYTES {
            // SAFETY: a small block always comes straight from `System`; the caller's contract holds.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees a valid `new_size` for `layout.align()`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as in `alloc`; then both blocks are live and at least `min(old, new)` bytes long.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[global_allocator]
static ALLOC: ReuseLargeBlocks = ReuseLargeBlocks;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutDtype {
    F32,
    Bf16,
}

/// Full-parameter fine-tune of an HF Llama-family model on a text file (AdamW, next-token cross-entropy).
#[derive(Debug, Parser)]
struct Args {
    /// The base model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The training text; its last 10% is held out for perplexity.
    #[arg(long)]
    text: PathBuf,
    /// Where to write the fine-tuned model directory.
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Windows per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per training window.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Steps of linear warmup to the peak learning rate.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// After warmup, decay the learning rate along a cosine to 10% of the peak at the last step (else
    /// constant).
    #[arg(long)]
    cosine: bool,
    /// Seed of the training windows.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dtype of the written weights.
    #[arg(long, value_enum, default_value_t = OutDtype::F32)]
    dtype: OutDtype,
    /// Held-out tokens to measure perplexity on, before and after (0: skip the evaluation).
    #[arg(long, default_value_t = 8192)]
    eval_tokens: usize,
    /// Tokens per evaluation window.
    #[arg(long, default_value_t = 512)]
    eval_seq_len: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Replace an existing non-empty output directory.
    #[arg(long)]
    overwrite: bool,
}

fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        _ => match s.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(i)) => Device::new_cuda(i)?,
            _ => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
        },
    })
}

/// Splits `text` at the start of the first line that begins at or after 90% of its bytes: (train, held out).
fn split_held_out(text: &str) -> (&str, &str) {
    let at = text.len() - text.len() / 10;
    // A byte just after b'\n' is always a char boundary.
    let cut = text.as_bytes()[at..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(text.len(), |i| at + i + 1);
    text.split_at(cut)
}

/// Held-out perplexity on `windows` (non-overlapping, each `seq_len` tokens), with the fused kernels.
fn held_out_ppl(model: &LlamaModel, windows: &[Vec<u32>], seq_len: usize) -> Result<f64> {
    let tokens: Vec<u32> = windows.concat();
    Ok(model.perplexity(&tokens, seq_len, None)?.ppl)
}

fn write_finetune(
    args: &Args,
    base: &HfModel,
    tensors: Vec<(String, Tensor)>,
    record: &serde_json::Value,
) -> Result<()> {
    let dtype = match args.dtype {
        OutDtype::F32 => Dtype::F32,
        OutDtype::Bf16 => Dtype::Bf16,
    };
    let mut config = base.config_json().clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert("torch_dtype".into(), hf::torch_dtype_name(dtype).into());
    }
    let tok_path = base
        .tokenizer_path()
        .context("the base model directory has no tokenizer.json")?;
    let tok = std::fs::read(&tok_path).with_context(|| tok_path.display().to_string())?;
    let record = serde_json::to_vec_pretty(record)?;
    let owned = tensors
        .into_iter()
        .map(|(name, t)| -> Result<hf::OwnedTensor> {
            let shape = t.dims().to_vec();
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            Ok((name, dtype, shape, hf::encode_f32(&values, dtype)))
        })
        .collect::<Result<Vec<_>>>()?;
    hf::write_model(
        &args.out,
        &config,
        owned,
        hf::DEFAULT_MAX_SHARD_BYTES,
        &[(hf::TOKENIZER_FILE, &tok), ("finetune.json", &record)],
        args.overwrite,
    )?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.steps >= 1 && args.batch >= 1,
        "--steps and --batch must be >= 1"
    );
    ensure!(args.seq_len >= 2, "--seq-len must be >= 2");
    ensure!(args.lr > 0.0, "--lr must be > 0");
    let device = parse_device(&args.device)?;
    let t0 = Instant::now();
    let secs = |t: Instant| t.elapsed().as_secs_f64();

    let base = HfModel::open(&args.model)?;
    base.check_matches_arch()?;
    let arch = base.arch().clone();
    let tok_path = base
        .tokenizer_path()
        .context("the base model directory has no tokenizer.json")?;
    let tokenizer = load_tokenizer(&tok_path)?;
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let (train_text, held_text) = split_held_out(&text);
    let train = tokenize(&tokenizer, train_text)?;
    let held = tokenize(&tokenizer, held_text)?;
    ensure!(
        train.len() > args.seq_len,
        "the training part has {} tokens; a window needs {}",
        train.len(),
        args.seq_len + 1
    );
    println!(
        "{}: {} bytes; training on the first {} ({} tokens), holding out the last {} ({} tokens) [{:.1}s]",
        args.text.display(),
        text.len(),
        train_text.len(),
        train.len(),
        held_text.len(),
        held.len(),
        secs(t0)
    );
    let eval_windows = if args.eval_tokens == 0 {
        Vec::new()
    } else {
        let n = (args.eval_tokens / args.eval_seq_len).max(1);
        token_windows(&held, n, args.eval_seq_len)?
    };

    let base_model = LlamaModel::load(&arch, &device, |n| base.to_f32(n))?;
    let ppl_before = if eval_windows.is_empty() {
        None
    } else {
        let t = Instant::now();
        let ppl = held_out_ppl(&base_model, &eval_windows, args.eval_seq_len)?;
        println!(
            "base: held-out perplexity {ppl:.4} ({} windows of {}) [{:.1}s]",
            eval_windows.len(),
            args.eval_seq_len,
            secs(t)
        );
        Some(ppl)
    };
    let vars = base_model.to_vars()?;
    drop(base_model);
    let model = LlamaModel::from_vars(&arch, &vars)?;
    assert_eq!(model.kernels(), Kernels::Primitive);
    let params: usize = vars.values().map(|v| v.elem_count()).sum();
    let cfg = TrainConfig {
        steps: args.steps,
        batch: args.batch,
        seq_len: args.seq_len,
        lr: args.lr,
        warmup: args.warmup,
        cosine: args.cosine,
        seed: args.seed,
    };
    println!(
        "training {params} parameters ({} variables, AdamW in {} parallel sets), {} steps of {} x {} tokens, \
         lr {:e}{}{}, seed {}",
        vars.len(),
        rayon::current_num_threads().min(vars.len()),
        args.steps,
        args.batch,
        args.seq_len,
        args.lr,
        if args.warmup > 0 {
            format!(", warmup {}", args.warmup)
        } else {
            String::new()
        },
        if args.cosine { ", cosine" } else { "" },
        args.seed
    );

    let mut step_secs = Vec::with_capacity(args.steps);
    let train_t0 = Instant::now();
    let losses = train::train(&model, &vars, &train, &cfg, &device, |r| {
        step_secs.push(r.step_s);
        println!(
            "step {:>4}/{}  loss {:.4}  lr {:.2e}  | fwd {:.2}s bwd {:.2}s opt {:.2}s = {:.2}s  | elapsed {:.0}s",
            r.step,
            args.steps,
            r.loss,
            r.lr,
            r.fwd_s,
            r.bwd_s,
            r.step_s - r.fwd_s - r.bwd_s,
            r.step_s,
            secs(train_t0)
        );
    })?;
    let train_secs = secs(train_t0);
    let k = (args.steps / 5).clamp(1, 10);
    let mean = |xs: &[f32]| xs.iter().map(|&x| f64::from(x)).sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&losses[..k]), mean(&losses[losses.len() - k..]));
    let median_step = {
        let mut s = step_secs.clone();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    println!(
        "trained in {train_secs:.0}s ({median_step:.2}s per step, median); mean loss of the first {k} steps \
         {first:.4}, of the last {k} {last:.4}"
    );

    let record = serde_json::json!({
        "base": args.model, "text": args.text, "steps": args.steps, "batch": args.batch,
        "seq_len": args.seq_len, "lr": args.lr, "warmup": args.warmup, "cosine": args.cosine,
        "seed": args.seed, "dtype": format!("{:?}", args.dtype).to_lowercase(),
        "train_bytes": train_text.len(), "held_out_bytes": held_text.len(),
        "eval_windows": eval_windows.len(), "eval_seq_len": args.eval_seq_len,
        "ppl_before": ppl_before, "losses": losses, "step_secs": step_secs,
    });
    write_finetune(&args, &base, model.tensors(), &record)?;
    drop(model);
    drop(vars);
    println!("wrote {} [{:.0}s]", args.out.display(), secs(t0));

    if let Some(before) = ppl_before {
        // Measure what was written (in --dtype), not the variables.
        let t = Instant::now();
        let ft = HfModel::open(&args.out)?;
        let ft_model = LlamaModel::load(ft.arch(), &device, |n| ft.to_f32(n))?;
        let after = held_out_ppl(&ft_model, &eval_windows, args.eval_seq_len)?;
        println!(
            "fine-tune: held-out perplexity {after:.4} (base {before:.4}: {:+.1}%) [{:.1}s]",
            100.0 * (after / before - 1.0),
            secs(t)
        );
        add_to_record(&args.out, "ppl_after", after.into())?;
    }
    println!("total {:.0}s", secs(t0));
    Ok(())
}

/// Adds one field to `dir/finetune.json` (written with the model, before the fine-tune was evaluated).
fn add_to_record(dir: &Path, key: &str, value: serde_json::Value) -> Result<()> {
    let path = dir.join("finetune.json");
    let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    if let Some(obj) = record.as_object_mut() {
        obj.insert(key.into(), value);
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&record)?)?;
    Ok(())
}

//! `deltazip synth`: random-weight base models and random delta files of any size, for serving
//! benchmarks and tests (no downloads, no compressor run).
//!
//! - [`model`]: an HF-style Llama directory (config.json, sharded safetensors, tokenizer.json) with
//!   seeded random weights of realistic scale, streamed to disk by parallel chunk generators.
//! - [`deltas`]: N delta files for a base, with packed payloads generated directly at random (valid
//!   codes, 2:4 metadata and scales of a realistic delta magnitude), bound to the base's fingerprint,
//!   and optionally a serve config naming them all.
//!
//! Randomness is counter-based ([`rng`]), so the bytes depend only on the seed, never on thread count.

pub mod deltas;
pub mod model;
pub mod rng;

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use crate::inspect::human;

/// `deltazip synth` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SynthCommand {
    /// Write a Llama model directory with random weights (streamed, sharded, seeded).
    #[command(
        long_about = "Write an HF-style Llama directory that mistral.rs (and `deltazip serve`) \
        loads: config.json (LlamaForCausalLM), safetensors shards of at most --max-shard-bytes with \
        model.safetensors.index.json when there are several, and tokenizer.json.\n\n\
        Weights are seeded random values, never zeros: linear layers, the embedding and the output head \
        N(0, 0.02^2) (an Irwin-Hall approximation of the normal), RMSNorm weights 1 + N(0, 0.02^2). \
        Every chunk is generated from (seed, tensor name, index) on all cores, so a seed gives the same \
        bytes on any machine, and the model is streamed to disk, never held in memory. The directory is \
        written under a temporary name and renamed when complete.\n\n\
        vocab_size is the tokenizer's vocabulary, or --vocab when it is at least that. Without \
        --tokenizer a built-in byte-level BPE tokenizer is written (512 learned ids, padded with filler \
        tokens to --vocab or the preset's vocabulary).\n\n\
        Example: deltazip synth model --shape llama-13b --dtype bf16 --seed 1 --out /data/llama-13b"
    )]
    Model(model::ModelArgs),
    /// Write N random delta files for a base (and a serve config naming them).
    #[command(
        long_about = "Write --count delta files (ft-00.dz, ft-01.dz, ...) for --base that \
        `deltazip inspect --verify` and the loader accept: bound to the base's fingerprint (computed \
        once), its config.json as architecture, and every tensor `deltazip compress` writes by default: \
        each linear layer in --codec (group 128, symmetric), the output head as 4-bit (every row), the \
        embedding as 4-bit on a seeded ~30% of its rows, dense f32 deltas for the norms.\n\n\
        Payloads are generated directly in packed form: uniform random codes, random valid 2:4 \
        metadata, group scales such that each delta's RMS is --scale times the base tensor's RMS \
        (norms 0.2 x --scale), so base + delta is a small perturbation. File i is seeded by (--seed, i): \
        every file differs, and a seed gives the same bytes. No compressor runs, so writing dominates.\n\n\
        Example: deltazip synth deltas --base /data/llama-13b --codec 4b24 --count 32 --seed 7 \
        --out-dir /data/deltas --config /data/serve.toml"
    )]
    Deltas(deltas::DeltasArgs),
}

/// A progress bar on stderr, shared by threads (hidden when quiet or when stderr is not a terminal).
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    /// A bar that draws on stderr.
    pub fn stderr() -> Self {
        Self {
            bar: ProgressBar::new(0),
        }
    }

    /// A bar that draws nothing (tests).
    pub fn quiet() -> Self {
        Self {
            bar: ProgressBar::hidden(),
        }
    }

    fn restart(&self, total: u64, prefix: &str, template: &str) {
        self.bar.reset();
        self.bar.set_length(total);
        self.bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        self.bar.set_prefix(prefix.to_string());
        self.bar.enable_steady_tick(Duration::from_millis(250));
    }

    /// Starts a phase counted in bytes.
    pub fn start(&self, total: u64, prefix: &str) {
        self.restart(
            total,
            prefix,
            "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed_precise} ETA {eta}",
        );
    }

    /// Starts a phase counted in steps.
    pub fn start_count(&self, total: u64, prefix: &str) {
        self.restart(
            total,
            prefix,
            "{prefix:>12} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
        );
    }

    /// Advances the current phase.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Ends the current phase (clears the line).
    pub fn finish(&self) {
        self.bar.disable_steady_tick();
        self.bar.finish_and_clear();
    }
}

/// Runs a `deltazip synth` subcommand; returns the text to print.
pub fn run(cmd: &SynthCommand, bar: &Bar) -> Result<String> {
    let mut s = String::new();
    match cmd {
        SynthCommand::Model(args) => {
            let r = model::write_model(args, bar)?;
            let _ = writeln!(
                s,
                "wrote {}: {:.3}B parameters, {} tensors, {} in {} file(s), vocab {}, tokenizer {}",
                r.dir.display(),
                r.params as f64 / 1e9,
                r.tensors,
                human(r.weight_bytes),
                r.shards,
                r.vocab,
                r.tokenizer
            );
            let _ = writeln!(s, "in {:.1}s ({:.2} GB/s)", r.seconds, r.gb_per_s());
        }
        SynthCommand::Deltas(args) => {
            let r = deltas::write_deltas(args, bar)?;
            let per = r.bytes / r.files.len().max(1) as u64;
            let _ = writeln!(
                s,
                "wrote {} deltas ({}) to {}: {} each, {} in all",
                r.files.len(),
                args.codec.as_str(),
                args.out_dir.display(),
                human(per),
                human(r.bytes)
            );
            let _ = writeln!(
                s,
                "base fingerprint {:.1}s; deltas {:.1}s ({:.2} files/s, {:.2} GB/s)",
                r.fingerprint_seconds,
                r.write_seconds,
                r.files.len() as f64 / r.write_seconds.max(1e-9),
                r.bytes as f64 / 1e9 / r.write_seconds.max(1e-9)
            );
            if let Some(c) = &r.config {
                let _ = writeln!(
                    s,
                    "serve config: {} (deltazip serve --config {})",
                    c.display(),
                    c.display()
                );
            }
        }
    }
    Ok(s)
}

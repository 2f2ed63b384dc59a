//! The `deltazip` command line: compress fine-tunes into deltas, inspect them, and (later) serve them.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "deltazip",
    version,
    about = "Serve many full-parameter fine-tunes from one GPU as compressed deltas against a shared base model.",
    long_about = "deltazip stores each fine-tune of a base model as a compressed delta (sparse, low-bit, \
                  bound to its base by a fingerprint) and serves many of them at once.\n\n\
                  Start with `deltazip demo`: it builds a tiny seeded model family, compresses its fine-tunes \
                  and inspects the deltas, with no downloads."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compress a fine-tune into a delta against its base (calibrated OBS pruning + quantization).
    Compress(deltazip::compress::CompressArgs),
    /// Apply a delta to its base and write the fine-tune back as a plain model directory.
    Merge(deltazip::compress::MergeArgs),
    /// Perplexity of a model, or of base + delta, on a text file.
    Eval(deltazip::compress::EvalArgs),
    /// Show what a delta file holds: manifest, per-tensor codec/shape/bytes, total size and ratio.
    Inspect(deltazip::inspect::InspectArgs),
    /// Generate with one model of a config (the base or a fine-tune, merge mode) through mistral.rs.
    Run(deltazip::run::RunArgs),
    /// Serve a config's base and fine-tunes over an OpenAI-compatible HTTP API (multi-tenant batching).
    Serve(deltazip::serve::ServeArgs),
    /// Run the whole pipeline on a seeded tiny model family generated on the spot (no downloads).
    Demo(deltazip::demo::DemoArgs),
    /// Benchmarks whose results go to bench/results/.
    #[command(subcommand)]
    Bench(deltazip::bench::BenchCommand),
    /// Random-weight base models and random deltas of any size, for benchmarks (no downloads).
    #[command(subcommand)]
    Synth(deltazip::synth::SynthCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compress(args) => {
            let mut bars = deltazip::compress::Bars::default();
            deltazip::compress::run(&args, &mut bars).map(|s| {
                drop(bars);
                print!("{s}")
            })
        }
        Command::Merge(args) => deltazip::compress::run_merge(&args).map(|s| print!("{s}")),
        Command::Eval(args) => deltazip::compress::run_eval(&args).map(|s| print!("{s}")),
        Command::Inspect(args) => deltazip::inspect::run(&args).map(|s| print!("{s}")),
        Command::Demo(args) => deltazip::demo::run(&args),
        Command::Run(args) => deltazip::run::run(&args).map(|s| print!("{s}")),
        Command::Serve(args) => deltazip::serve::run(&args),
        Command::Bench(deltazip::bench::BenchCommand::Compress(args)) => {
            deltazip::bench::run_compress(&args).map(|s| print!("{s}"))
        }
        Command::Bench(deltazip::bench::BenchCommand::Quality(args)) => {
            deltazip::bench::run_quality(&args).map(|s| print!("{s}"))
        }
        Command::Bench(deltazip::bench::BenchCommand::Serve(args)) => {
            deltazip::bench_serve::run(&args).map(|s| print!("{s}"))
        }
        Command::Bench(deltazip::bench::BenchCommand::Hook(args)) => {
            deltazip::bench_hook::run_hook(&args).map(|s| print!("{s}"))
        }
        Command::Synth(cmd) => {
            let bar = deltazip::synth::Bar::stderr();
            deltazip::synth::run(&cmd, &bar).map(|s| print!("{s}"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line: the context chain joined, as anyhow's alternate format does.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

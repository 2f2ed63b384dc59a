//! `deltazip run`: one greedy generation by one model of a config (the base or a fine-tune), through
//! mistral.rs.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

/// Arguments of `deltazip run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The config (TOML): base, deltas, runtime; see examples/serve.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Which model: the base's name or a delta's `name`.
    #[arg(long)]
    pub model: String,
    /// The prompt (completed as plain text, no chat template).
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate (stops earlier at the end-of-sequence token).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
}

/// Loads the config (all checks), loads only the model asked for, and returns its completion.
pub fn run(args: &RunArgs) -> Result<String> {
    let (mut config, deltas) = dz_loader::Config::load(&args.config)?;
    let base_name = config.base_name();
    let chosen: Vec<dz_loader::CheckedDelta> = deltas
        .into_iter()
        .filter(|d| d.spec.name == args.model)
        .collect();
    if chosen.is_empty() && args.model != base_name {
        let (_, all) = dz_loader::Config::load(&args.config)?;
        let names: Vec<String> = std::iter::once(base_name)
            .chain(all.iter().map(|d| d.spec.name.clone()))
            .collect();
        bail!(
            "no model {:?} in {}; it has: {}",
            args.model,
            args.config.display(),
            names.join(", ")
        );
    }
    config.base.serve = chosen.is_empty();
    let served =
        dz_loader::serve(&config, &chosen).with_context(|| format!("loading {:?}", args.model))?;
    let g = served
        .engine
        .generate(&args.model, &args.prompt, args.max_tokens)?;
    Ok(format!("{}\n", g.text))
}

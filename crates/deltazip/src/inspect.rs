//! `deltazip inspect`: what a delta file holds, how big each part is, and whether its checksums hold.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use dz_format::shard::{tp_plan, Placement, TpPlan};
use dz_format::{DeltaFile, Manifest, TensorEntry};

/// Options of `deltazip inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// The delta file (.dz).
    pub file: std::path::PathBuf,
    /// Verify every payload checksum and decode every tensor (reads the whole file).
    #[arg(long)]
    pub verify: bool,
    /// Print the manifest and a per-tensor summary as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// List every tensor (by default large files list the first 40 and summarise the rest).
    #[arg(long)]
    pub all: bool,
    /// Also print the tensor-parallel plan over N ranks: how each tensor splits (mistral.rs's layout of
    /// Llama-family layers) and the bytes each rank holds.
    #[arg(long, value_name = "N")]
    pub tp: Option<usize>,
}

/// Runs `deltazip inspect`, returning the text to print.
pub fn run(args: &InspectArgs) -> Result<String> {
    let f = DeltaFile::open(&args.file)
        .with_context(|| format!("cannot read delta {}", args.file.display()))?;
    let verified = if args.verify {
        f.verify()
            .with_context(|| format!("{} failed verification", args.file.display()))?;
        Some(
            f.manifest()
                .tensors
                .iter()
                .map(|t| t.parts.len())
                .sum::<usize>(),
        )
    } else {
        None
    };
    if args.json {
        return Ok(json_report(&f, verified));
    }
    let mut out = text_report(&args.file, &f, verified, args.all);
    if let Some(world) = args.tp {
        let plan = tp_plan(&f, world)
            .with_context(|| format!("cannot plan {} over {world} ranks", args.file.display()))?;
        out.push_str(&tp_report(&plan, args.all));
    }
    Ok(out)
}

/// The `--tp N` section: per tensor its host layer, split and bytes per rank; then the totals per rank.
fn tp_report(plan: &TpPlan, all: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "tensor parallel over {} ranks (mistral.rs's layout; bytes in memory per rank, zstd undone)",
        plan.world
    );
    let _ = writeln!(
        s,
        "{:<48} {:<10} {:<24} {:>11} {:>11}",
        "tensor", "layer", "split", "per rank", "whole"
    );
    let limit = if all { usize::MAX } else { 40 };
    for t in plan.tensors.iter().take(limit) {
        let split = match &t.placement {
            Placement::Split { axis, ranges } => {
                let len = ranges.first().map_or(0, |r| r.end - r.start);
                format!("{} {len} each", axis.as_str())
            }
            Placement::Replicated => "replicated".to_string(),
            Placement::Refused { axis, .. } => format!("REFUSED ({})", axis.as_str()),
        };
        let (lo, hi) = (
            t.rank_bytes.iter().min().copied().unwrap_or(0),
            t.rank_bytes.iter().max().copied().unwrap_or(0),
        );
        let per_rank = if lo == hi {
            human(hi)
        } else {
            format!("{}-{}", human(lo), human(hi))
        };
        let _ = writeln!(
            s,
            "{:<48} {:<10} {:<24} {:>11} {:>11}",
            truncate(&t.name, 48),
            t.layer.as_str(),
            split,
            per_rank,
            human(t.bytes)
        );
    }
    if plan.tensors.len() > limit {
        let _ = writeln!(
            s,
            "... and {} more tensors (--all lists them)",
            plan.tensors.len() - limit
        );
    }
    let per_rank: Vec<String> = plan.rank_bytes().iter().map(|&b| human(b)).collect();
    let _ = writeln!(
        s,
        "per rank   {} (unsharded {})",
        per_rank.join(", "),
        human(plan.total_bytes())
    );
    let refused: Vec<_> = plan.refused().collect();
    if refused.is_empty() {
        let _ = writeln!(
            s,
            "refused    none: every split layer's delta shards exactly"
        );
    } else {
        let _ = writeln!(
            s,
            "refused    {} tensors cannot be cut for {} ranks (not servable so as stored):",
            refused.len(),
            plan.world
        );
        for t in refused {
            if let Placement::Refused { reason, .. } = &t.placement {
                let _ = writeln!(s, "  {}: {reason}", t.name);
            }
        }
    }
    s
}

/// Size totals of a delta.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    /// Bytes of all stored parts.
    pub stored: u64,
    /// Bytes of the file.
    pub file: u64,
    /// Bytes of the fine-tune's tensors, dense, in their own dtypes.
    pub dense: u64,
    /// Bytes of the fine-tune's tensors, dense, in bf16.
    pub dense_bf16: u64,
}

/// Computes a delta's size totals.
pub fn totals<S: AsRef<[u8]>>(f: &DeltaFile<S>) -> Totals {
    let m = f.manifest();
    Totals {
        stored: m.stored_bytes(),
        file: f.file_len(),
        dense: m.tensors.iter().map(TensorEntry::dense_bytes).sum(),
        dense_bf16: m
            .tensors
            .iter()
            .map(|t| t.shape.iter().product::<u64>() * 2)
            .sum(),
    }
}

fn json_report<S: AsRef<[u8]>>(f: &DeltaFile<S>, verified: Option<usize>) -> String {
    let t = totals(f);
    let tensors: Vec<_> = f
        .manifest()
        .tensors
        .iter()
        .map(|e| {
            serde_json::json!({
                "name": e.name,
                "role": e.role.as_str(),
                "shape": e.shape,
                "dtype": e.dtype.as_str(),
                "codec": e.codec.describe(),
                "rows": e.rows,
                "stored_bytes": e.stored_bytes(),
                "dense_bytes": e.dense_bytes(),
            })
        })
        .collect();
    let out = serde_json::json!({
        "version": f.version().to_string(),
        "file_bytes": t.file,
        "stored_bytes": t.stored,
        "dense_bytes": t.dense,
        "dense_bf16_bytes": t.dense_bf16,
        "ratio_vs_bf16": t.dense_bf16 as f64 / t.file as f64,
        "verified_parts": verified,
        "manifest": f.manifest(),
        "tensors": tensors,
    });
    serde_json::to_string_pretty(&out).unwrap_or_default()
}

fn text_report<S: AsRef<[u8]>>(
    path: &Path,
    f: &DeltaFile<S>,
    verified: Option<usize>,
    all: bool,
) -> String {
    let m = f.manifest();
    let t = totals(f);
    let mut s = String::new();
    let _ = writeln!(s, "delta      {}", path.display());
    let _ = writeln!(s, "format     {}", f.version());
    let _ = writeln!(s, "name       {}", m.name);
    let _ = writeln!(s, "arch       {}", describe_arch(m));
    let _ = writeln!(
        s,
        "base       {} ({} tensors fingerprinted)",
        &m.base.combined[..16],
        m.base.tensors.len()
    );
    let _ = writeln!(s, "recipe     {}", describe_recipe(m));
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<48} {:<11} {:>14} {:<22} {:>11} {:>11} {:>7}",
        "tensor", "role", "shape", "codec", "stored", "dense", "ratio"
    );
    let limit = if all { usize::MAX } else { 40 };
    for e in m.tensors.iter().take(limit) {
        let shape = e
            .shape
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("x");
        let mut codec = e.codec.describe();
        if let Some(r) = e.rows {
            let _ = write!(codec, " {r}r");
        }
        let z = e
            .parts
            .iter()
            .any(|p| p.compression == dz_format::Compression::Zstd);
        if z {
            codec.push_str(" +z");
        }
        let r = if e.stored_bytes() == 0 {
            "-".to_string()
        } else {
            format!("{:.1}x", ratio(e.dense_bytes(), e.stored_bytes()))
        };
        let _ = writeln!(
            s,
            "{:<48} {:<11} {:>14} {:<22} {:>11} {:>11} {:>7}",
            truncate(&e.name, 48),
            e.role.as_str(),
            shape,
            codec,
            human(e.stored_bytes()),
            human(e.dense_bytes()),
            r,
        );
    }
    if m.tensors.len() > limit {
        let _ = writeln!(
            s,
            "... and {} more tensors (--all lists them)",
            m.tensors.len() - limit
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "tensors    {}   parts {}",
        m.tensors.len(),
        m.tensors.iter().map(|t| t.parts.len()).sum::<usize>()
    );
    let _ = writeln!(
        s,
        "size       file {} (payload {}), fine-tune dense {} ({} as bf16)",
        human(t.file),
        human(t.stored),
        human(t.dense),
        human(t.dense_bf16)
    );
    let r = ratio(t.dense_bf16, t.file);
    let _ = writeln!(
        s,
        "ratio      {r:.2}x {} than the bf16 fine-tune (whole file, embeddings and lm_head included)",
        if r >= 1.0 { "smaller" } else { "LARGER" }
    );
    match verified {
        Some(n) => {
            let _ = writeln!(s, "checksums  OK: {n} parts verified, every tensor decoded");
        }
        None => {
            let _ = writeln!(s, "checksums  not verified (pass --verify)");
        }
    }
    s
}

fn describe_arch(m: &Manifest) -> String {
    let a = &m.architecture;
    let get = |k: &str| a.get(k).map(|v| v.to_string());
    let mut parts = Vec::new();
    if let Some(t) = a.get("model_type").and_then(|v| v.as_str()) {
        parts.push(t.to_string());
    }
    for (k, label) in [
        ("hidden_size", "hidden"),
        ("num_hidden_layers", "layers"),
        ("num_attention_heads", "heads"),
        ("num_key_value_heads", "kv-heads"),
        ("intermediate_size", "ffn"),
        ("vocab_size", "vocab"),
    ] {
        if let Some(v) = get(k) {
            parts.push(format!("{label} {v}"));
        }
    }
    if parts.is_empty() {
        "(no config)".into()
    } else {
        parts.join(", ")
    }
}

fn describe_recipe(m: &Manifest) -> String {
    let r = &m.recipe;
    let mut s = format!("method {}", r.method);
    if let Some(b) = r.bits {
        let _ = write!(s, ", {b} bits");
    }
    if let Some(sp) = &r.sparsity {
        let _ = write!(s, ", sparsity {sp}");
    }
    if let Some(g) = r.group_size {
        let _ = write!(
            s,
            ", group {}",
            if g == 0 { "row".into() } else { g.to_string() }
        );
    }
    if let Some(sym) = r.symmetric {
        s.push_str(if sym { ", symmetric" } else { ", asymmetric" });
    }
    if let Some(t) = r.target_ratio {
        let _ = write!(s, ", target ratio {t}");
    }
    for (k, v) in &r.extra {
        let _ = write!(s, ", {k} {v}");
    }
    let _ = write!(s, " ({})", r.tool);
    s
}

fn ratio(dense: u64, stored: u64) -> f64 {
    dense as f64 / stored.max(1) as f64
}

/// Bytes as a short human string (KiB/MiB/GiB).
pub fn human(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(n - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}

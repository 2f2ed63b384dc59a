//! `deltazip serve --dry-run`: what a config would put on each GPU, without loading anything.
//!
//! The config is checked exactly as at start-up (files, names, every delta against the base's
//! architecture and fingerprint, and with `tensor_parallel = N` that the base and every multi-tenant delta
//! divide over N ranks). Then, per rank: the base's weights in the serving dtype (column-parallel layers
//! by output features, row-parallel ones by input features, the rest whole, as mistral.rs shards them)
//! and each multi-tenant delta's slices (dz-format's `tp_plan`: packed bytes as a rank holds them).

use std::fmt;

use anyhow::Result;
use dz_format::shard::{tp_layer, tp_plan, TpLayer};
use dz_loader::config::RuntimeSpec;
use dz_loader::{CheckedDelta, Config, DeviceSpec, DtypeSpec, Mode};

use crate::inspect::human;

/// Bytes per rank of one thing the server holds.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRow {
    /// What it is (`base`, a fine-tune's name).
    pub name: String,
    /// Bytes on each rank.
    pub rank_bytes: Vec<u64>,
}

/// What a config puts on each GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct ServePlan {
    /// Ranks (GPUs).
    pub world: usize,
    /// The device of rank 0.
    pub device: DeviceSpec,
    /// Bytes per element of the served base.
    pub dtype_bytes: u64,
    /// The base's weights.
    pub base: PlanRow,
    /// Every multi-tenant delta, in config order.
    pub deltas: Vec<PlanRow>,
    /// Fine-tunes served merged (each a full model of its own, not sharded here).
    pub merged: Vec<String>,
    /// Fine-tunes served as swap models (full models, `swap_gpu_models` of them on the GPU at once).
    pub swap: Vec<String>,
    /// `runtime.swap_gpu_models`.
    pub swap_gpu_models: usize,
    /// `runtime.merged_gpu_models`: merged engines loaded at most (`None`: all of them).
    pub merged_gpu_models: Option<usize>,
    /// What each merged engine holds on its device (`None` without merged fine-tunes).
    pub merged_engine: Option<dz_loader::EngineBudget>,
    /// The GPU delta budget per rank, when the config sets one.
    pub gpu_delta_bytes: Option<u64>,
}

impl ServePlan {
    /// All multi-tenant deltas' bytes on each rank.
    pub fn delta_bytes(&self) -> Vec<u64> {
        (0..self.world)
            .map(|r| self.deltas.iter().map(|d| d.rank_bytes[r]).sum())
            .collect()
    }

    /// Base + deltas on each rank.
    pub fn total_bytes(&self) -> Vec<u64> {
        let d = self.delta_bytes();
        (0..self.world)
            .map(|r| self.base.rank_bytes[r] + d[r])
            .collect()
    }
}

/// Bytes per element the base is served in.
fn dtype_bytes(dtype: DtypeSpec, runtime: &RuntimeSpec) -> u64 {
    match dtype {
        DtypeSpec::F32 => 4,
        DtypeSpec::F16 | DtypeSpec::Bf16 => 2,
        // The host's choice: bf16 on a GPU, f32 on the CPU.
        DtypeSpec::Auto => match runtime.device {
            DeviceSpec::Cpu => 4,
            DeviceSpec::Cuda(_) => 2,
        },
    }
}

/// The plan of a loaded, checked config.
pub fn serve_plan(config: &Config, deltas: &[CheckedDelta]) -> Result<ServePlan> {
    let world = config.runtime.tensor_parallel.max(1);
    let model = dz_compress::hf::HfModel::open(&config.base.path)?;
    let arch = model.arch().clone();
    let mut base = vec![0u64; world];
    for name in model.names() {
        let Some(info) = model.info(name) else {
            continue;
        };
        let numel = info.numel() as u64;
        let per_rank: Vec<u64> = match (tp_layer(name), info.shape.len()) {
            (TpLayer::Replicated, _) | (TpLayer::RowParallel, 1) => vec![numel; world],
            (TpLayer::ColumnParallel, _) | (TpLayer::RowParallel, _) => {
                let is_kv = name.contains("self_attn.k_proj") || name.contains("self_attn.v_proj");
                if is_kv && world > arch.num_kv_heads {
                    // One KV head per rank (heads replicated), as the host's compute_kv_shard.
                    vec![numel / arch.num_kv_heads as u64; world]
                } else {
                    vec![numel / world as u64; world]
                }
            }
        };
        for (b, n) in base.iter_mut().zip(per_rank) {
            *b += n;
        }
    }
    let elem = dtype_bytes(config.base.dtype, &config.runtime);
    let base = PlanRow {
        name: config.base_name(),
        rank_bytes: base.into_iter().map(|n| n * elem).collect(),
    };
    let mut rows = Vec::new();
    let mut merged = Vec::new();
    let mut swap = Vec::new();
    for d in deltas {
        match d.spec.mode {
            Mode::MultiTenant => {
                let plan = tp_plan(&d.file, world)?;
                rows.push(PlanRow {
                    name: d.spec.name.clone(),
                    rank_bytes: plan.rank_bytes(),
                });
            }
            Mode::Merge => merged.push(d.spec.name.clone()),
            Mode::Swap => swap.push(d.spec.name.clone()),
        }
    }
    let merged_engine = if merged.is_empty() {
        None
    } else {
        Some(dz_loader::merged_engine_budget(config)?)
    };
    Ok(ServePlan {
        world,
        device: config.runtime.device,
        dtype_bytes: elem,
        base,
        deltas: rows,
        merged,
        swap,
        swap_gpu_models: config.runtime.swap_gpu_models,
        merged_gpu_models: config.runtime.merged_gpu_models,
        merged_engine,
        gpu_delta_bytes: config.runtime.gpu_delta_bytes,
    })
}

impl fmt::Display for ServePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let device = match self.device {
            DeviceSpec::Cpu => "cpu".to_string(),
            DeviceSpec::Cuda(n) if self.world == 1 => format!("cuda:{n}"),
            DeviceSpec::Cuda(_) => format!("cuda:0..{}", self.world),
        };
        writeln!(
            f,
            "tensor_parallel = {} on {device}{}",
            self.world,
            if self.world > 1 && !dz_loader::tp::NCCL_BUILT {
                " (this build has no NCCL: rebuild with --features nccl to serve it)"
            } else {
                ""
            }
        )?;
        let cell = |b: u64| format!("{:>12}", human(b));
        write!(f, "{:<28}", "")?;
        for r in 0..self.world {
            write!(f, "{:>12}", format!("rank {r}"))?;
        }
        writeln!(f)?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, bytes: &[u64]| -> fmt::Result {
            write!(f, "{name:<28}")?;
            for &b in bytes {
                write!(f, "{}", cell(b))?;
            }
            writeln!(f)
        };
        row(
            f,
            &format!("base ({} B/weight)", self.dtype_bytes),
            &self.base.rank_bytes,
        )?;
        for d in &self.deltas {
            row(f, &format!("  {}", d.name), &d.rank_bytes)?;
        }
        row(
            f,
            &format!("{} deltas", self.deltas.len()),
            &self.delta_bytes(),
        )?;
        row(f, "total", &self.total_bytes())?;
        if !self.merged.is_empty() {
            writeln!(
                f,
                "merged (full models of their own): {}",
                self.merged.join(", ")
            )?;
            if let Some(k) = self.merged_gpu_models {
                writeln!(
                    f,
                    "  at most {} of them loaded at once (merged_gpu_models = {k}; the host unloads \
                     and reloads the others on demand)",
                    k.min(self.merged.len())
                )?;
            }
            if let Some(b) = &self.merged_engine {
                let loaded = self
                    .merged_gpu_models
                    .unwrap_or(self.merged.len())
                    .min(self.merged.len());
                writeln!(
                    f,
                    "  each engine: {} weights + {} KV cache (kv_cache_bytes) + {} working memory = \
                     {}; {loaded} loaded: {}{}",
                    human(b.weights),
                    human(b.kv_cache),
                    human(b.working),
                    human(b.per_engine()),
                    human(b.per_engine() * loaded as u64),
                    match self.device {
                        DeviceSpec::Cuda(_) => " (checked against the GPU's free memory at start-up)",
                        DeviceSpec::Cpu => "",
                    }
                )?;
            }
        }
        if !self.swap.is_empty() {
            let model: u64 = self.base.rank_bytes.iter().sum();
            let k = self.swap_gpu_models.min(self.swap.len());
            writeln!(
                f,
                "swap (full models, {k} of {} on the GPU at once, {} each): {} on the GPU",
                self.swap.len(),
                human(model),
                human(model * k as u64)
            )?;
        }
        if let Some(budget) = self.gpu_delta_bytes {
            let need = self.delta_bytes().into_iter().max().unwrap_or(0);
            let verdict = if need <= budget {
                "all deltas fit".to_string()
            } else if self.world > 1 {
                format!(
                    "does not fit: with tensor parallelism every delta stays resident, {} needed",
                    human(need)
                )
            } else {
                "deltas beyond it wait on the CPU tier and load when requested".to_string()
            };
            writeln!(f, "gpu_delta_bytes = {} per rank: {verdict}", human(budget))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dz_compress::fixtures::{self, TinySpec};
    use dz_compress::pipeline::{compress, CompressOptions, Method, Quiet};
    use dz_compress::{QuantConfig, Sparsity};

    /// A tiny Llama family in a temp dir and its first fine-tune compressed (4-bit 2:4, RTN) to `ft.dz`.
    fn family_with_delta() -> (tempfile::TempDir, fixtures::TinyFamily, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let fam = fixtures::write_family(dir.path(), &TinySpec::llama(), 1).unwrap();
        let delta = dir.path().join("ft.dz");
        let opts = CompressOptions {
            method: Method::Rtn,
            quant: QuantConfig {
                bits: 4,
                group_size: 8,
                symmetric: true,
                sparsity: Sparsity::TwoFour,
            },
            ..CompressOptions::default()
        };
        compress(&fam.base, &fam.finetunes[0], &delta, &opts, &mut Quiet).unwrap();
        (dir, fam, delta)
    }

    #[test]
    fn dry_run_plan_splits_base_and_deltas_over_ranks() {
        let (dir, fam, delta) = family_with_delta();
        let cfg = dir.path().join("serve.toml");
        let text = |tp: usize| {
            format!(
                "[base]\npath = {:?}\nname = \"base\"\n[[delta]]\nname = \"ft\"\npath = {:?}\n\
                 [runtime]\ndevice = \"cuda\"\ntensor_parallel = {tp}\ngpu_delta_bytes = \"1MiB\"\n",
                fam.base, delta
            )
        };
        std::fs::write(&cfg, text(1)).unwrap();
        let (config, deltas) = Config::load(&cfg).unwrap();
        let one = serve_plan(&config, &deltas).unwrap();
        std::fs::write(&cfg, text(2)).unwrap();
        let (config, deltas) = Config::load(&cfg).unwrap();
        let two = serve_plan(&config, &deltas).unwrap();

        assert_eq!((one.world, two.world), (1, 2));
        // bf16 on a GPU: 2 bytes per weight, every tensor of the base counted once on one rank.
        let model = dz_compress::hf::HfModel::open(&fam.base).unwrap();
        let params: u64 = model
            .names()
            .map(|n| model.info(n).unwrap().numel() as u64)
            .sum();
        assert_eq!(one.base.rank_bytes, vec![2 * params]);
        // Two ranks: the same bytes each; sharded layers halved, embeddings/norms/head whole on both.
        let b = &two.base.rank_bytes;
        assert_eq!(b[0], b[1]);
        assert!(
            b[0] > params && b[0] < 2 * params,
            "{b:?} of {}",
            2 * params
        );
        // The delta: tp_plan's bytes per rank, less than the whole on each.
        let d = &two.deltas[0].rank_bytes;
        assert_eq!(d[0], d[1]);
        assert!(d[0] < one.deltas[0].rank_bytes[0]);
        let shown = two.to_string();
        for s in [
            "tensor_parallel = 2",
            "rank 0",
            "rank 1",
            "  ft",
            "1 deltas",
            "total",
        ] {
            assert!(shown.contains(s), "{s:?} in\n{shown}");
        }
        assert!(
            shown.contains("gpu_delta_bytes = 1.0 MiB per rank"),
            "{shown}"
        );
    }

    #[test]
    fn dry_run_plan_shows_what_each_merged_engine_holds() {
        let (dir, fam, delta) = family_with_delta();
        let cfg = dir.path().join("serve.toml");
        std::fs::write(
            &cfg,
            format!(
                "[base]\npath = {:?}\nname = \"base\"\nserve = false\n\
                 [[delta]]\nname = \"a\"\npath = {:?}\nmode = \"merge\"\n\
                 [[delta]]\nname = \"b\"\npath = {:?}\nmode = \"merge\"\n\
                 [runtime]\ndevice = \"cuda\"\nmerged_gpu_models = 1\nkv_cache_bytes = \"1GiB\"\n",
                fam.base, delta, delta
            ),
        )
        .unwrap();
        let (config, deltas) = Config::load(&cfg).unwrap();
        let plan = serve_plan(&config, &deltas).unwrap();
        let b = plan.merged_engine.expect("merged engines");
        // bf16 on a GPU: the base's weights, 2 bytes each.
        assert_eq!(b.weights, plan.base.rank_bytes[0]);
        // The paged pool where this build pages the KV cache (CUDA builds), else nothing up front.
        let kv = match config.kv_cache() {
            dz_loader::KvCache::Paged { bytes } => bytes,
            dz_loader::KvCache::Contiguous => 0,
        };
        assert_eq!(b.kv_cache, kv);
        assert_eq!(b.per_engine(), b.weights + b.kv_cache + b.working);
        let shown = plan.to_string();
        assert!(
            shown.contains("each engine:")
                && shown.contains(&format!("{} KV cache", human(kv)))
                && shown.contains("checked against the GPU's free memory at start-up"),
            "{shown}"
        );
    }
}

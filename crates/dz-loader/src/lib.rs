//! # dz-loader
//!
//! `base+delta` model specs from a TOML config ([`config`]) into mistral.rs: **merge** mode (base + delta
//! materialised into plain weights, loaded by the host's normal pipeline: one fine-tune, no run-time
//! overhead) and **multi-tenant** mode (one base, each linear layer computing `base + delta` per row on
//! the packed deltas with dz-candle-ops; DeltaZip, arXiv 2312.05215, section 4). Every delta's base
//! fingerprint and architecture are checked before anything is loaded.
//!
//! [`serve`] turns a checked config into a host [`Engine`] that serves the base and each fine-tune by
//! name. Multi-tenant mode runs through the host seams of `host/patches/` (see ARCHITECTURE.md), and so
//! does **swap** mode ([`swap`]), the baseline the benchmarks compare against: each fine-tune as its
//! full merged weights, a few on the GPU, the rest in CPU memory, copied in whole on demand.

#![deny(missing_docs)]

pub mod config;
pub mod engines;
mod error;
pub mod gpu_mem;
pub mod host;
pub mod merge;
pub mod multi_tenant;
pub mod profile;
pub mod swap;
pub mod tp;

use std::sync::Arc;

use candle_core::Device;

pub use config::{
    BaseIdentity, CheckedDelta, Config, DeltaSpec, DeviceSpec, DtypeSpec, KvCacheSpec, Mode,
    DEFAULT_KV_CACHE_BYTES,
};
/// Runs prefill segments of more than 16 rows of a v4-only delta through the 32-row tile
/// (`dz_candle_ops::set_sbmm_wide_segments`, on by default; `deltazip serve --no-sbmm-wide-segments`).
pub use dz_candle_ops::set_sbmm_wide_segments;
/// Whether deltas uploaded with the v4 kernels on keep their packed parts too (see
/// `dz_candle_ops::set_v4_keep_packed`; `deltazip serve --v4-keep-packed`).
pub use dz_candle_ops::set_v4_keep_packed;
/// The v4 delta kernels switch (experimental, off by default; see `dz_candle_ops::set_v4_kernels`:
/// deltas uploaded while it is on keep only the v4 layout on the GPU), for servers that turn it on
/// before any delta is uploaded.
pub use dz_candle_ops::set_v4_kernels;
/// Whether the v4 kernels' automatic choice takes the pair tile where the H200 measured it faster (on by
/// default; see `dz_candle_ops::set_v4_pair`; `deltazip serve --no-v4-pair`).
pub use dz_candle_ops::set_v4_pair;
/// The pair v4 decode sbmm (on by default; see `dz_candle_ops::set_v4_sbmm_pair`; `deltazip serve
/// --no-v4-sbmm-pair`).
pub use dz_candle_ops::set_v4_sbmm_pair;
/// The per-warp ring v4 decode sbmm (experimental, off by default; see
/// `dz_candle_ops::set_v4_sbmm_ring`; `deltazip serve --v4-sbmm-ring`).
pub use dz_candle_ops::set_v4_sbmm_ring;
/// The shared-memory v4 sbmm (experimental, off by default; see `dz_candle_ops::set_v4_sbmm_smem_x`;
/// `deltazip serve --v4-sbmm-smem-x`).
pub use dz_candle_ops::set_v4_sbmm_smem_x;
/// The v4 sbmm's tail split (experimental, off by default; see `dz_candle_ops::set_v4_sbmm_tail_split`;
/// `deltazip serve --v4-sbmm-tail-split`).
pub use dz_candle_ops::set_v4_sbmm_tail_split;
/// From how many rows of one delta the 64-row v4 tile runs (experimental, off by default; see
/// `dz_candle_ops::set_v4_wide64_from`; `deltazip serve --v4-wide64-from`).
pub use dz_candle_ops::set_v4_wide64_from;
/// From how many input rows of one delta the CUDA ops take the dense route (the delta merged into a
/// dense weight, then one cuBLAS matmul; see `dz_candle_ops::set_dense_rows`; `deltazip serve
/// --dense-rows`).
pub use dz_candle_ops::{set_dense_rows, DEFAULT_DENSE_ROWS};
/// The x-direct v4 decode sbmm (experimental, off by default; see
/// `dz_candle_ops::set_v4_sbmm_x_direct`; `deltazip serve --v4-sbmm-x-direct`).
pub use dz_candle_ops::{set_v4_sbmm_x_direct, V4XDirect};
pub use engines::{EngineBudget, EngineLease, EngineSwap, EngineSwapStats, GpuRoom};
pub use error::{Error, Result};
pub use host::{Engine, GeneratedToken, Generation, KvCache};
pub use multi_tenant::{
    fused_norm_deltas, pin_host_deltas, set_fused_norm_deltas, set_pin_host_deltas,
    set_slot_tables, slot_tables, DeltaHook, DeltaRegistry, FineTuneDeltas, HostDelta, PlanCounts,
};
pub use swap::{MergedWeights, SwapHook, SwapModel, SwapRegistry, SwapStore};
pub use tp::TpRank;

/// The candle device for a config's `runtime.device`.
pub fn device(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => {
            Device::new_cuda(n).map_err(|e| Error::Host(format!("cuda:{n}: {e}")))
        }
    }
}

/// What [`serve`] built: the engine, and the registry of resident multi-tenant deltas (empty when the
/// config has none; a scheduler may load and evict deltas through it at run time).
pub struct Served {
    /// The host engine: the base under [`Config::base_name`], each fine-tune under its name.
    pub engine: Engine,
    /// The deltas the base's layers add per row.
    pub registry: Arc<DeltaRegistry>,
    /// The device the base runs on.
    pub device: Device,
    /// The base's output head is its embedding table (embedding deltas also apply to the head).
    pub tied_head: bool,
    /// This process's tensor-parallel rank (rank 0 of 1 without tensor parallelism).
    pub tp: TpRank,
    /// The swap models the base's layers serve from their own weights (empty without swap models).
    pub swap: Arc<SwapRegistry>,
    /// The swap models' full weights in CPU memory, one copy per delta file (`None` without swap
    /// models).
    pub swap_store: Option<Arc<SwapStore>>,
    /// The cap on loaded merged engines (`runtime.merged_gpu_models`; `None` without it or without
    /// merge-mode deltas): requests for merged fine-tunes acquire their engine from it.
    pub engine_swap: Option<Arc<EngineSwap>>,
}

/// Loads what `config` describes into one host engine: the base under [`Config::base_name`] and each
/// delta under its name. Merge-mode deltas are materialised first ([`merge::materialise`], once per
/// delta file) and served as models of their own (with `runtime.merged_gpu_models = K`, at most K of
/// them loaded at once: [`engines`]); multi-tenant deltas are uploaded into a [`DeltaRegistry`] and served as aliases
/// of the base, whose layers were wrapped at load ([`DeltaHook`]): requests for them share the base's
/// batches. With multi-tenant deltas the base is loaded (and served) even if `base.serve = false`.
pub fn serve(config: &Config, deltas: &[CheckedDelta]) -> Result<Served> {
    serve_with(config, deltas, true)
}

/// [`serve`], with `preload = false`: multi-tenant deltas are registered as names (aliases of the base)
/// but not uploaded; whoever manages residency (dz-scheduler-ext) puts them in [`Served::registry`]
/// when they are needed. Requests for a name that is not resident run as the base, so such a server
/// needs the admission hook (`mistralrs_core::set_admission_hook`) to hold them until it is. Likewise
/// swap models: decoded into [`Served::swap_store`], put in [`Served::swap`] by the residency manager.
///
/// With `runtime.tensor_parallel = N > 1` (an `nccl` build; [`tp`]) this is called in every rank's
/// process: each rank uploads its slice of every delta, so `preload` must be true. In the host's worker
/// processes (rank > 0) it never returns: their engine runs in lock step with rank 0's.
pub fn serve_with(config: &Config, deltas: &[CheckedDelta], preload: bool) -> Result<Served> {
    let tp = tp::prepare(config)?;
    if tp.world > 1 && !preload {
        return Err(Error::Host(format!(
            "tensor_parallel = {}: every rank loads its slices of the deltas at start-up \
             (on-demand residency is single-GPU only)",
            tp.world
        )));
    }
    let mut device = device(config.runtime.device)?;
    let mut engine = Engine::new(config.scheduler.max_seqs)?;
    let kv_cache = config.kv_cache();
    let base = &config.base.path;
    let registry = Arc::new(DeltaRegistry::new());
    let tied_head = dz_compress::hf::HfModel::open(base)?
        .arch()
        .tie_word_embeddings;
    let multi: Vec<&CheckedDelta> = deltas
        .iter()
        .filter(|d| d.spec.mode == Mode::MultiTenant)
        .collect();
    let swapped: Vec<&CheckedDelta> = deltas
        .iter()
        .filter(|d| d.spec.mode == Mode::Swap)
        .collect();
    let swap = Arc::new(SwapRegistry::new());
    let mut swap_store = None;
    let base_name = config.base_name();
    // The base's layers are wrapped for multi-tenant and swap models, and under `DZ_PROFILE` for a
    // served base alone too, so that a base-only server's profile times its linear layers and steps
    // (the wrapper then only times them: no row names a fine-tune).
    let profile_base = config.base.serve && registry.profile().enabled();
    if !multi.is_empty() || !swapped.is_empty() || profile_base {
        let delta_hook: Arc<dyn mistralrs_quant::LinearHook> =
            Arc::new(DeltaHook(registry.clone()));
        // Swap models wrap the multi-tenant layers (their rows never reach them); without swap
        // models the multi-tenant path is exactly as before.
        let hook: Arc<dyn mistralrs_quant::LinearHook> = if swapped.is_empty() {
            delta_hook
        } else {
            Arc::new(SwapHook::new(swap.clone(), delta_hook))
        };
        let p = mistralrs_quant::with_linear_hook(hook, || {
            host::load_pipeline(base, base, config.base.dtype, &device, kv_cache)
        })?;
        // The host may have made its own device for this rank (tensor parallelism): the deltas go
        // where the base's layers are.
        device = host::pipeline_device(&p)?;
        // Before the engine starts: a worker's engine never returns.
        if preload {
            preload_multi_tenant(&multi, &registry, &device, tied_head, tp)?;
        }
        if !swapped.is_empty() {
            let dtype = swap.dtype().ok_or_else(|| {
                Error::Host(
                    "the base loaded without a linear layer: no dtype for swap models".into(),
                )
            })?;
            let store = Arc::new(SwapStore::new(base.clone(), dtype));
            for d in &swapped {
                store.get(d)?;
            }
            if preload {
                let k = config.runtime.swap_gpu_models;
                if swapped.len() > k {
                    return Err(Error::Host(format!(
                        "{} swap models, and without a residency manager every one is put on the \
                         device: runtime.swap_gpu_models = {k} allows {k}",
                        swapped.len()
                    )));
                }
                for d in &swapped {
                    let w = store.get(d)?;
                    swap.insert(Arc::new(SwapModel::upload(&d.spec.name, &w, &device)?));
                }
            }
            swap_store = Some(store);
        }
        engine.add(&base_name, p)?;
        for d in multi.iter().chain(&swapped) {
            engine.add_alias(&d.spec.name, &base_name)?;
        }
    } else if config.base.serve {
        let p = host::load_pipeline(base, base, config.base.dtype, &device, kv_cache)?;
        engine.add(&base_name, p)?;
    }
    // Once, on the device the base's layers ended up on (with tensor parallelism, the host's own).
    gpu_mem::keep_pool_memory(&device)?;
    // Merge mode: an engine per fine-tune. A delta file that several names list is materialised once
    // and their engines load the same directory (each its own copy of the weights).
    let mut dirs: Vec<(&std::path::Path, std::path::PathBuf)> = Vec::new();
    let mut merged = Vec::new();
    for d in deltas.iter().filter(|d| d.spec.mode == Mode::Merge) {
        let dir = match dirs.iter().find(|(p, _)| *p == d.spec.path.as_path()) {
            Some((_, dir)) => dir.clone(),
            None => {
                let dir = merge::materialise(base, &config.merged_dir(), d, &device)?;
                dirs.push((&d.spec.path, dir.clone()));
                dir
            }
        };
        merged.push((d.spec.name.clone(), dir));
    }
    let mut engine_swap = None;
    match config.runtime.merged_gpu_models {
        None => {
            for (name, dir) in &merged {
                let p = host::load_pipeline(dir, base, config.base.dtype, &device, kv_cache)?;
                engine.add(name, p)?;
            }
        }
        Some(k) if !merged.is_empty() => {
            engine_swap = Some(serve_swapped_engines(
                &mut engine,
                &merged,
                k,
                config,
                &device,
            )?);
        }
        Some(_) => {}
    }
    Ok(Served {
        engine,
        registry,
        device,
        tied_head,
        tp,
        swap,
        swap_store,
        engine_swap,
    })
}

/// Merged fine-tunes (`(name, directory)`) under `runtime.merged_gpu_models = capacity`: each added to
/// the host with a loader config, so that the host can unload and reload it ([`engines`]); the first
/// `capacity` loaded now, the rest registered as unloaded (their first request loads them). Every load
/// goes through the host's own loader ([`host::load_reloadable`]), the one its reloads use.
fn serve_swapped_engines(
    engine: &mut Engine,
    merged: &[(String, std::path::PathBuf)],
    capacity: usize,
    config: &Config,
    device: &Device,
) -> Result<Arc<EngineSwap>> {
    let base = &config.base.path;
    let loaders = merged
        .iter()
        .map(|(name, dir)| {
            let l =
                host::reloadable_config(dir, base, config.base.dtype, device, config.kv_cache())?;
            Ok((name.clone(), l))
        })
        .collect::<Result<Vec<_>>>()?;
    let start = capacity.min(loaders.len());
    // On a GPU: the engines that start loaded must fit in what is free now (whatever was loaded
    // before them counted), and the swap checks the room again before every reload.
    let budget = merged_engine_budget(config)?;
    let before = match gpu_mem::mem_info(device) {
        Some(Ok(m)) => {
            budget
                .check(start, m.free)
                .map_err(|message| Error::Config {
                    file: config.file.clone(),
                    field: "runtime.merged_gpu_models".into(),
                    message,
                })?;
            Some(m.free)
        }
        Some(Err(e)) => {
            eprintln!(
                "dz-loader: the GPU's free memory: {e} (merged engines not checked for room)"
            );
            None
        }
        None => None,
    };
    let (first_name, first_loader) = &loaders[0];
    let first = host::load_reloadable(first_loader)?;
    // What the first engine really took (its weights, KV cache, and what the host allocates with
    // them), if more than the estimate: the room one more engine needs.
    let mut engine_bytes = budget.per_engine();
    if let (Some(before), Some(Ok(after))) = (before, gpu_mem::mem_info(device)) {
        let took = before.saturating_sub(after.free);
        engine_bytes = engine_bytes.max(took + budget.working);
        if std::env::var("DZ_ENGINE_TRACE").is_ok_and(|v| !v.is_empty() && v != "0") {
            eprintln!(
                "dz-engine-trace: start-up: {first_name} took {} on the GPU (estimate: {} weights + \
                 {} KV cache), {} free; one more engine needs {}",
                gpu_mem::gib(took),
                gpu_mem::gib(budget.weights),
                gpu_mem::gib(budget.kv_cache),
                gpu_mem::gib(after.free),
                gpu_mem::gib(engine_bytes)
            );
        }
    }
    // Before the first model's engine starts (the placeholder must be a pipeline no engine runs).
    for (name, loader) in &loaders[start..] {
        engine.add_unloaded(name, &first, loader.clone())?;
    }
    engine.add_reloadable(first_name, first, first_loader.clone())?;
    for (name, loader) in &loaders[1..start] {
        let p = host::load_reloadable(loader)?;
        engine.add_reloadable(name, p, loader.clone())?;
    }
    let m = engine
        .mistralrs()
        .ok_or_else(|| Error::Host("no engine after adding the merged models".into()))?;
    // The host made the first model it was given the default, and unloading it unset that.
    if matches!(m.get_default_model_id(), Ok(None)) {
        m.set_default_model_id(first_name).map_err(Error::Host)?;
    }
    let names: Vec<String> = loaders.iter().map(|(n, _)| n.clone()).collect();
    let gpu = before.map(|_| GpuRoom {
        device: device.clone(),
        engine_bytes,
    });
    let swap = EngineSwap::new(m, capacity, &names, &names[..start], gpu)?;
    swap.set_max_wait(config.runtime.merged_wait());
    engine.set_engine_swap(swap.clone());
    Ok(swap)
}

/// What one merged engine holds on the device under `config`: the base's weights in the serving dtype
/// (a merged fine-tune has the base's shapes), the paged KV cache's pool (`runtime.kv_cache_bytes`; 0
/// for a contiguous cache) and [`engines::ENGINE_WORKING_BYTES`].
pub fn merged_engine_budget(config: &Config) -> Result<EngineBudget> {
    let model = dz_compress::hf::HfModel::open(&config.base.path)?;
    let elem: u64 = match (config.base.dtype, config.runtime.device) {
        (DtypeSpec::F32, _) | (DtypeSpec::Auto, DeviceSpec::Cpu) => 4,
        (DtypeSpec::F16 | DtypeSpec::Bf16, _) | (DtypeSpec::Auto, DeviceSpec::Cuda(_)) => 2,
    };
    let weights = model
        .names()
        .filter_map(|n| model.info(n))
        .map(|i| i.numel() as u64 * elem)
        .sum();
    let kv_cache = match config.kv_cache() {
        KvCache::Paged { bytes } => bytes,
        KvCache::Contiguous => 0,
    };
    Ok(EngineBudget {
        weights,
        kv_cache,
        working: engines::ENGINE_WORKING_BYTES,
    })
}

/// Reads and uploads every multi-tenant delta of `multi` before the engine starts (this rank's slice of
/// each). A file that several names share is read once; each name still gets its own device copy, as
/// if the files were distinct. A reader thread reads the next file while this thread cuts and uploads
/// the last one, so start-up costs about the larger of the two, not their sum.
fn preload_multi_tenant(
    multi: &[&CheckedDelta],
    registry: &DeltaRegistry,
    device: &Device,
    tied_head: bool,
    tp: TpRank,
) -> Result<()> {
    let mut groups: Vec<Vec<&CheckedDelta>> = Vec::new();
    for &d in multi {
        match groups.iter_mut().find(|g| g[0].spec.path == d.spec.path) {
            Some(g) => g.push(d),
            None => groups.push(vec![d]),
        }
    }
    std::thread::scope(|s| {
        // One file ahead: at most two read files are held at once.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<HostDelta>>(0);
        let reader = &groups;
        s.spawn(move || {
            for g in reader {
                let read = HostDelta::read(&g[0].spec.name, &g[0].file);
                let failed = read.is_err();
                if tx.send(read).is_err() || failed {
                    break;
                }
            }
        });
        for (g, read) in groups.iter().zip(rx) {
            let mut host = read?;
            for d in g {
                host.set_name(&d.spec.name);
                registry.insert(Arc::new(host.upload_rank(device, tied_head, tp)?));
            }
        }
        Ok(())
    })
}

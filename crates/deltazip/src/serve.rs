//! `deltazip serve`: the multi-tenant OpenAI-compatible server.
//!
//! The host's own OpenAI router (`mistralrs-server-core`: chat and text completions, streaming) serves
//! generation; requests name a fine-tune in `model`. Fine-tunes in multi-tenant mode are aliases of the
//! base's engine: their sequences share the base's batches, and the base's layers add each row's delta
//! (dz-loader). Which deltas are on the device is dz-scheduler-ext's business: a [`Scheduler`] over
//! dz-loader's delta forms ([`LoaderBackend`]), consulted by the host's default scheduler once per step
//! through the admission seam (`host/patches/mistralrs-core/0005-admission-hook.patch`): a sequence
//! starts only once its delta is on the device, and its delta stays there while it runs.
//!
//! Swap-mode fine-tunes (the baseline) are aliases of the base's engine too, computed by their own full
//! weights ([`dz_loader::swap`]); a second [`Scheduler`], over [`SwapBackend`], keeps at most
//! `runtime.swap_gpu_models` of them on the device (the rest in CPU memory, copied in whole on a miss),
//! and the admission seam asks both schedulers: a sequence starts when each admits it.
//!
//! Merged fine-tunes are engines of their own. With `runtime.merged_gpu_models = K` at most K of them
//! are loaded ([`dz_loader::engines`]: the host's own unload/reload, issue #9's other swap baseline): a
//! completion request for a merged model first waits until its engine is loaded, and holds it until
//! its response body is sent (or dropped), so an engine is never unloaded under a request
//! (`deltazip_engine_swap_*` metrics); it waits at most `runtime.merged_wait_s`, then is answered 503
//! with the state of the loaded engines.
//!
//! Our routes, in front of the host's (which answer everything else):
//! - `GET /v1/models`: the base, every fine-tune (multi-tenant, merged and swap);
//! - `POST /v1/deltas` `{"name", "path"}`: hot-load a delta from inside `--delta-dir` (checked against
//!   the base like the config's); `DELETE /v1/deltas/{name}`: unload (drain, then drop: requests
//!   already started finish first);
//! - `GET /metrics` (Prometheus text) and `GET /health`.
//!
//! With `--api-key` (or `DELTAZIP_API_KEY`) every route but `/health` needs `Authorization: Bearer KEY`.
//!
//! A completion request whose `model` this server does not serve (never had, or unloaded) is answered
//! 404 here, before it reaches the host (which would answer 500 for a name it does not know, or, for an
//! unloaded delta, queue it and refuse it).
//!
//! Unloading while requests are in flight is drain, then drop: a sequence that started before the
//! unload (in the running batch, or moved back to the host's waiting queue: set aside between decode
//! steps by its length bucketing, or preempted when paged KV blocks ran out; the admission seam
//! reports those as in flight) keeps the delta and finishes with it; the delta leaves every tier once
//! the last of them has. A sequence that had not started (waiting for its delta or for a batch slot)
//! ends at the next step with HTTP 422 `delta "NAME" was unregistered` (streamed: that message as the
//! stream's only event); a request that arrives after the unload gets 404.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use candle_core::Device;
use clap::Args;
use dz_loader::{
    BaseIdentity, CheckedDelta, DeltaRegistry, EngineLease, EngineSwap, FineTuneDeltas, HostDelta,
    MergedWeights, Mode, SwapModel, SwapRegistry, SwapStore,
};
use dz_scheduler_ext::{Backend, Decision, Scheduler, SchedulerOptions, Unregistered};
use serde_json::json;

/// `deltazip serve`'s arguments.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The config (TOML: [base], [[delta]], [runtime], [scheduler]; see examples/serve.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start-up).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health (default: the DELTAZIP_API_KEY
    /// environment variable, if set).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The directory `POST /v1/deltas` may load delta files from (paths outside it, `..` included, are
    /// refused). Without it, hot loading is off.
    #[arg(long)]
    pub delta_dir: Option<PathBuf>,
    /// Check the config as start-up does and print what it would put on each GPU (base and delta
    /// bytes per tensor-parallel rank), then exit without loading anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Experimental (issue #5; checked on an H200, 1.5x faster sbmm over 32 deltas x 1 row than v3):
    /// the v4 delta kernels. Deltas of the codecs they take (quant and 2:4 sparse, 2 and 4 bits,
    /// symmetric) are re-laid when the CPU cache reads them and keep only that layout on the GPU (the
    /// same bytes); their matmuls take the v4 kernels, but from 64 rows of one fine-tune (prefill; or
    /// --dense-rows, if lower) the dense route. No effect on the CPU.
    #[arg(long)]
    pub v4_kernels: bool,
    /// With --v4-kernels: keep each delta's packed parts on the GPU besides the v4 layout (twice the
    /// delta bytes), so that segments of more than 4 rows of one fine-tune (a popular fine-tune's decode
    /// rows, prefill) take the faster tensor-core v3 kernels; the v4 kernels keep 1-4 rows.
    #[arg(long, requires = "v4_kernels")]
    pub v4_keep_packed: bool,
    /// With --v4-kernels, experimental (correct, but ~15% slower on the H200): the sbmm variant that
    /// stages x in shared memory per block for a deeper load ring (see dz_candle_ops::set_v4_sbmm_smem_x).
    #[arg(long, requires = "v4_kernels")]
    pub v4_sbmm_smem_x: bool,
    /// With --v4-kernels, experimental (correct, but no faster on the H200: 91 us against 79 for 32
    /// deltas x 32 rows, session 13): the decode sbmm variant that streams each warp's codes through its
    /// own shared-memory ring (see dz_candle_ops::set_v4_sbmm_ring; takes precedence over
    /// --v4-sbmm-smem-x).
    #[arg(long, requires = "v4_kernels")]
    pub v4_sbmm_ring: bool,
    /// With --v4-kernels, experimental (session 15; correct but slower on the H200 in session 16: 96-114
    /// against 77-82 us for 32 deltas x 1 row of 4096 x 4096): the decode sbmm variants that load x
    /// right before each mma instead of in the load ring: `deep` (the default with the flag) keeps a
    /// 6-deep ring of codes, `occupancy` a 3-deep one at 3 blocks an SM (see
    /// dz_candle_ops::set_v4_sbmm_x_direct; the shared-memory variants take precedence).
    #[arg(long, requires = "v4_kernels", value_name = "deep|occupancy", num_args = 0..=1,
          default_missing_value = "deep", value_parser = parse_x_direct)]
    pub v4_sbmm_x_direct: Option<dz_loader::V4XDirect>,
    /// With --v4-kernels, experimental (session 17; correct on the H200 in session 18, but no faster): from
    /// this many input rows of one fine-tune (a prompt), the 64-row v4 tile instead of the 32-row one,
    /// which decodes each weight once per 64 rows instead of per 32 (see
    /// dz_candle_ops::set_v4_wide64_from). 0 (the default): never.
    #[arg(
        long,
        requires = "v4_kernels",
        default_value_t = 0,
        value_name = "ROWS"
    )]
    pub v4_wide64_from: u32,
    /// With --v4-kernels: keep prompts of 128 rows and more on the 32-row v4 tile instead of the pair
    /// tile (two 16-row tiles a warp sharing each x fragment), which the H200 measured 5-19% faster on
    /// the larger 7B / 13B shapes there (see dz_candle_ops::set_v4_pair). For A/B runs.
    #[arg(long, requires = "v4_kernels")]
    pub no_v4_pair: bool,
    /// With --v4-kernels: run the decode sbmm with one 16-row tile of a fine-tune's delta a warp instead of
    /// two (the pair, which loads each x word once for both tiles and which the H200 measured at 0.61-0.89x
    /// the one-tile kernel's time for 16-64 fine-tunes a step; see dz_candle_ops::set_v4_sbmm_pair). For
    /// A/B runs.
    #[arg(long, requires = "v4_kernels")]
    pub no_v4_sbmm_pair: bool,
    /// With --v4-kernels: when a delta sbmm launch's last wave of work would run part-empty (e.g. ~20
    /// fine-tunes in a decode step of 32 sequences), split only that wave's work along K so that it
    /// finishes sooner (see dz_candle_ops::set_v4_sbmm_tail_split). Experimental, for A/B runs.
    #[arg(long, requires = "v4_kernels")]
    pub v4_sbmm_tail_split: bool,
    /// From this many input rows of one fine-tune in a step (prefill), a delta is merged into a dense
    /// weight once and multiplied with one cuBLAS matmul instead of the delta kernels (CUDA, f16/bf16).
    /// The default is the crossover the H200 measured (bench/results/h200-s10-2026-11-30.md); a delta kept
    /// only in the v4 layout (--v4-kernels) takes the route from 64 rows at most. 0: never.
    #[arg(long, default_value_t = dz_loader::DEFAULT_DENSE_ROWS)]
    pub dense_rows: usize,
    /// Add the linear layers' deltas through a per-layer plan rebuilt whenever a sequence joins or ends
    /// (as before session 17), not through the slot tables that survive batch changes (each layer's
    /// deltas by fine-tune slot, rebuilt only after a load or eviction; one segment table per forward
    /// pass shared by every layer). The slot tables cost 39.5 us of CPU a decode call on the H200 where
    /// the batch changes, against 71.4 (see dz_loader::set_slot_tables).
    #[arg(long)]
    pub no_slot_tables: bool,
    /// With --v4-kernels: run each prefill segment of 17-255 rows of one fine-tune as 16-row pieces (up
    /// to 63 rows) or through the dense route (from --dense-rows), not as its own matmul through the
    /// 32-row v4 tile (the default; 1.4-2x faster than either at 32-128 rows on the H200, and 296 against
    /// 227 tokens/s at 16 req/s with 32 fine-tunes; see dz_candle_ops::set_sbmm_wide_segments).
    #[arg(long, requires = "v4_kernels")]
    pub no_sbmm_wide_segments: bool,
    /// Add each RMS norm's weight delta in three ops (an RMS norm with unit weights, a multiply, an add),
    /// not in one (the default: one kernel launch, 11 against 28 us of CPU a norm on the H200, the sum
    /// rounded once); see dz_loader::set_fused_norm_deltas.
    #[arg(long)]
    pub no_fused_norm_deltas: bool,
    /// Leave the CPU cache's deltas pageable. By default, on a CUDA device, each delta read into CPU
    /// memory is page-locked (within --cpu-cache's budget) so that its uploads to the GPU are direct DMA
    /// copies; see dz_loader::set_pin_host_deltas.
    #[arg(long)]
    pub no_pin_host: bool,
    /// Let each CUDA device's stream-ordered memory pool keep up to this much freed memory across
    /// synchronizations (e.g. 4GiB; 0, the default, leaves the driver's default of giving it all back
    /// at every synchronization, so each decode step's allocations map memory again). Experimental:
    /// on the H200, one A/B (session 15) served 7B x 32 fine-tunes 11-18% faster with 4GiB, two more
    /// (session 16) +2%, both within the noise between runs; see
    /// dz_loader::gpu_mem::set_pool_keep_bytes.
    #[arg(long, default_value = "0", value_parser = parse_pool_keep)]
    pub pool_keep: u64,
}

/// `--v4-sbmm-x-direct`: `deep` or `occupancy`.
fn parse_x_direct(s: &str) -> std::result::Result<dz_loader::V4XDirect, String> {
    match s {
        "deep" => Ok(dz_loader::V4XDirect::Deep),
        "occupancy" => Ok(dz_loader::V4XDirect::Occupancy),
        _ => Err(format!("{s:?} is not an x-direct sbmm (deep or occupancy)")),
    }
}

/// `--pool-keep`: bytes, with an optional unit (`4GiB`, `512MiB`).
fn parse_pool_keep(s: &str) -> std::result::Result<u64, String> {
    dz_loader::config::parse_bytes(s)
        .ok_or_else(|| format!("{s:?} is not a size in bytes (e.g. 4GiB, 512MiB, 0)"))
}

impl ServeArgs {
    /// `config` on loopback, a free port, no API key, no hot loading, the default kernels (for
    /// programs and tests that start a server in-process; `..ServeArgs::loopback(c)` sets the rest).
    pub fn loopback(config: impl Into<PathBuf>) -> Self {
        ServeArgs {
            config: config.into(),
            host: "127.0.0.1".to_string(),
            port: 0,
            api_key: None,
            delta_dir: None,
            dry_run: false,
            v4_kernels: false,
            v4_keep_packed: false,
            v4_sbmm_smem_x: false,
            v4_sbmm_ring: false,
            v4_sbmm_x_direct: None,
            v4_wide64_from: 0,
            no_v4_pair: false,
            no_v4_sbmm_pair: false,
            v4_sbmm_tail_split: false,
            dense_rows: dz_loader::DEFAULT_DENSE_ROWS,
            no_slot_tables: false,
            no_sbmm_wide_segments: false,
            no_fused_norm_deltas: false,
            no_pin_host: false,
            pool_keep: 0,
        }
    }
}

/// dz-loader's delta forms as dz-scheduler-ext's tiers: a checked delta file on disk, its packed bytes
/// in CPU memory ([`HostDelta`]), its device form ([`FineTuneDeltas`]) made visible to the base's
/// layers through the [`DeltaRegistry`].
pub struct LoaderBackend {
    device: Device,
    tied_head: bool,
    registry: Arc<DeltaRegistry>,
}

impl Backend for LoaderBackend {
    type Source = Arc<CheckedDelta>;
    type Host = HostDelta;
    type Device = FineTuneDeltas;
    type Error = String;

    fn read(&self, name: &str, source: &Self::Source) -> std::result::Result<HostDelta, String> {
        let host =
            HostDelta::read_for(name, &source.file, &self.device).map_err(|e| e.to_string())?;
        if host.pinned_bytes() > 0 {
            eprintln!(
                "deltazip serve: {name} read into CPU memory, {:.2} of {:.2} GiB page-locked for uploads",
                host.pinned_bytes() as f64 / (1u64 << 30) as f64,
                host.bytes() as f64 / (1u64 << 30) as f64,
            );
        }
        Ok(host)
    }

    fn host_bytes(&self, host: &HostDelta) -> u64 {
        host.bytes()
    }

    fn device_bytes(&self, host: &HostDelta) -> u64 {
        host.device_bytes(&self.device)
    }

    fn upload(&self, _name: &str, host: &HostDelta) -> std::result::Result<FineTuneDeltas, String> {
        host.upload(&self.device, self.tied_head)
            .map_err(|e| e.to_string())
    }

    fn activate(
        &self,
        _name: &str,
        device: &Arc<FineTuneDeltas>,
    ) -> std::result::Result<(), String> {
        self.registry.insert(device.clone());
        Ok(())
    }

    fn deactivate(&self, name: &str) {
        self.registry.remove(name);
    }
}

/// The swap baseline's models as dz-scheduler-ext's tiers: the checked delta (disk), the full merged
/// weights in CPU memory ([`MergedWeights`], one copy per delta file in the [`SwapStore`], decoded at
/// start-up), every weight of the model on the device ([`SwapModel`]: a swap-in copies the whole
/// model), made visible to the base's layers through the [`SwapRegistry`].
pub struct SwapBackend {
    device: Device,
    store: Arc<SwapStore>,
    registry: Arc<SwapRegistry>,
    /// Bytes copied to the device so far (every swap-in, whole models).
    copied: AtomicU64,
}

impl SwapBackend {
    /// A backend uploading to `device` from `store`, activating into `registry`.
    pub fn new(device: Device, store: Arc<SwapStore>, registry: Arc<SwapRegistry>) -> Self {
        Self {
            device,
            store,
            registry,
            copied: AtomicU64::new(0),
        }
    }

    /// Bytes copied to the device so far.
    pub fn copied_bytes(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }
}

impl Backend for SwapBackend {
    type Source = Arc<CheckedDelta>;
    type Host = Arc<MergedWeights>;
    type Device = SwapModel;
    type Error = String;

    fn read(&self, _name: &str, source: &Self::Source) -> std::result::Result<Self::Host, String> {
        self.store.get(source).map_err(|e| e.to_string())
    }

    fn host_bytes(&self, host: &Self::Host) -> u64 {
        host.bytes()
    }

    fn device_bytes(&self, host: &Self::Host) -> u64 {
        host.bytes()
    }

    fn upload(&self, name: &str, host: &Self::Host) -> std::result::Result<SwapModel, String> {
        let m = SwapModel::upload(name, host, &self.device).map_err(|e| e.to_string())?;
        self.copied.fetch_add(m.bytes(), Ordering::Relaxed);
        Ok(m)
    }

    fn activate(&self, _name: &str, device: &Arc<SwapModel>) -> std::result::Result<(), String> {
        self.registry.insert(device.clone());
        Ok(())
    }

    fn deactivate(&self, name: &str) {
        self.registry.remove(name);
    }
}

/// One scheduler's admission step, whatever its backend.
trait StepAdmission: Send + Sync {
    fn decide(
        &self,
        running: &[Option<&str>],
        waiting: &[Option<&str>],
        free: usize,
    ) -> Vec<Decision>;

    /// Nothing runs and every waiting sequence waits: block until something may have changed (a
    /// load finished), at most `timeout`, instead of letting the host's loop ask again at once.
    fn idle(&self, _timeout: Duration) {}
}

impl<B: Backend> StepAdmission for Scheduler<B> {
    fn decide(
        &self,
        running: &[Option<&str>],
        waiting: &[Option<&str>],
        free: usize,
    ) -> Vec<Decision> {
        self.admit_decisions(running, waiting, free)
    }

    fn idle(&self, timeout: Duration) {
        self.residency().wait_for_change(timeout);
    }
}

/// How long an idle engine step waits for a delta load before the host asks again ([`StepAdmission::idle`]).
const IDLE_WAIT: Duration = Duration::from_millis(5);

/// The schedulers as the host's admission hook: each in turn decides over the sequences the ones
/// before it admitted (a name that is not one of a scheduler's is base-like to it, admitted), so a
/// sequence starts when every scheduler admits it; a wait or a refusal is the first one's. Every
/// scheduler is asked every step, with the sequences in flight, even when nothing is left to decide
/// (that is when it unpins what finished).
///
/// The hook is process-wide, so the engines of merged fine-tunes call it too, for their own steps.
/// Those are not the base engine's: their sequences name only models served by engines of their own
/// (`other_engines`), are admitted at once, and the schedulers are not asked (each scheduler takes
/// the sequences in flight it is given as all there are: a merged engine's step would unpin the
/// base engine's deltas, and drop a draining one under its running sequences).
struct AdmissionSeam {
    tiers: Vec<Arc<dyn StepAdmission>>,
    other_engines: BTreeSet<String>,
}

impl mistralrs_core::AdmissionHook for AdmissionSeam {
    fn admit(
        &self,
        running: &[Option<&str>],
        waiting: &[Option<&str>],
        free_slots: usize,
    ) -> Vec<mistralrs_core::Admission> {
        let _s = dz_candle_ops::trace::span("scheduler: the admission hook");
        let mut decisions = vec![Decision::Admit; waiting.len()];
        let other_engine = running
            .iter()
            .chain(waiting)
            .all(|m| m.is_some_and(|n| self.other_engines.contains(n)));
        let tiers = if other_engine {
            &[][..]
        } else {
            &self.tiers[..]
        };
        let mut open: Vec<usize> = (0..waiting.len()).collect();
        for tier in tiers {
            let sub: Vec<Option<&str>> = open.iter().map(|&i| waiting[i]).collect();
            let mut next = Vec::with_capacity(open.len());
            for (&i, d) in open.iter().zip(tier.decide(running, &sub, free_slots)) {
                match d {
                    Decision::Admit => next.push(i),
                    other => decisions[i] = other,
                }
            }
            open = next;
        }
        if running.is_empty()
            && !waiting.is_empty()
            && decisions.iter().all(|d| matches!(d, Decision::Wait))
        {
            for tier in tiers {
                tier.idle(IDLE_WAIT);
            }
        }
        decisions
            .into_iter()
            .map(|d| match d {
                Decision::Admit => mistralrs_core::Admission::Admit,
                Decision::Wait => mistralrs_core::Admission::Wait,
                Decision::Refuse(why) => mistralrs_core::Admission::Refuse(why),
            })
            .collect()
    }
}

/// The admission hook under tensor parallelism: every rank's process runs its own copy of the host's
/// scheduler, so their decisions must be a pure function of what the host passes in (no residency, no
/// timing): admit waiting sequences in order while the step's distinct fine-tunes stay within the cap;
/// the base and merged models ride along.
struct CapAdmission {
    cap: usize,
    multi_tenant: BTreeSet<String>,
}

impl mistralrs_core::AdmissionHook for CapAdmission {
    fn admit(
        &self,
        running: &[Option<&str>],
        waiting: &[Option<&str>],
        _free_slots: usize,
    ) -> Vec<mistralrs_core::Admission> {
        let mut live: BTreeSet<&str> = running
            .iter()
            .filter_map(|m| m.filter(|n| self.multi_tenant.contains(*n)))
            .collect();
        waiting
            .iter()
            .map(|w| match w.filter(|n| self.multi_tenant.contains(*n)) {
                None => mistralrs_core::Admission::Admit,
                Some(n) if live.contains(n) || live.len() < self.cap => {
                    live.insert(n);
                    mistralrs_core::Admission::Admit
                }
                Some(_) => mistralrs_core::Admission::Wait,
            })
            .collect()
    }
}

/// What the handlers share.
struct AppState {
    /// GPUs the base and deltas are sharded over (1: no tensor parallelism).
    tensor_parallel: usize,
    scheduler: Arc<Scheduler<LoaderBackend>>,
    registry: Arc<DeltaRegistry>,
    /// The swap baseline's scheduler (`None` without swap models), its registry and its CPU store.
    swap: Option<Arc<Scheduler<SwapBackend>>>,
    swap_registry: Arc<SwapRegistry>,
    swap_store: Option<Arc<SwapStore>>,
    swap_names: Vec<String>,
    /// The base's identity, computed on the first hot load (Config::load fingerprinted the base for the
    /// config's deltas already; start-up does not hash it twice).
    identity: std::sync::OnceLock<BaseIdentity>,
    base_path: PathBuf,
    base_name: String,
    merged: Vec<String>,
    /// The cap on loaded merged engines (`runtime.merged_gpu_models`), when there is one.
    engine_swap: Option<Arc<EngineSwap>>,
    multi_tenant: Mutex<BTreeSet<String>>,
    mistralrs: Arc<mistralrs_core::MistralRs>,
    api_key: Option<String>,
    delta_dir: Option<PathBuf>,
    gpu_budget: u64,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Generation requests open at the HTTP layer ([`Generating`]).
    generating: AtomicUsize,
    started: Instant,
}

impl AppState {
    /// Whether `model` names a model this server serves now.
    fn serves(&self, model: &str) -> bool {
        model == "default"
            || model == self.base_name
            || self.merged.iter().any(|m| m == model)
            || self.swap_names.iter().any(|m| m == model)
            || self.multi_tenant().contains(model)
    }

    fn multi_tenant(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.multi_tenant
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running server: its address, and what keeps it alive (dropping it stops the server and the host).
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<dz_loader::Served>,
}

impl Running {
    /// Serves until the process is interrupted (Ctrl-C).
    pub fn wait(mut self) -> Result<()> {
        let rt = self.runtime.as_ref().expect("runtime");
        rt.block_on(tokio::signal::ctrl_c())
            .context("waiting for Ctrl-C")?;
        self.stop();
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
        mistralrs_core::set_admission_hook(None);
        self.served.take();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "message": message.into(), "type": status.canonical_reason().unwrap_or("error") } });
    (status, Json(body)).into_response()
}

/// Refuses a GPU delta budget that leaves a serving step no room, before any request runs into the
/// device's memory limit mid-serving (`dz_loader::gpu_mem::check_delta_budget`, against the memory free
/// now that the base and its KV cache are loaded, and the largest multi-tenant delta file). Nothing on
/// the CPU, or without multi-tenant deltas.
fn check_gpu_room(
    device: &candle_core::Device,
    config: &dz_loader::Config,
    deltas: &[dz_loader::CheckedDelta],
    budget: u64,
) -> Result<()> {
    let largest = (deltas.iter())
        .filter(|d| d.spec.mode == Mode::MultiTenant)
        .filter_map(|d| std::fs::metadata(&d.spec.path).ok())
        .map(|m| m.len())
        .max();
    let (Some(largest), Some(info)) = (largest, dz_loader::gpu_mem::mem_info(device)) else {
        return Ok(());
    };
    let info = info.map_err(|e| anyhow::anyhow!("reading {device:?}'s free memory: {e}"))?;
    let what = if config.runtime.gpu_delta_bytes.is_some() {
        "runtime.gpu_delta_bytes"
    } else {
        "the default GPU delta budget"
    };
    let keep = dz_loader::gpu_mem::pool_keep_bytes();
    dz_loader::gpu_mem::check_delta_budget(what, budget, info.free, largest, keep)
        .map_err(anyhow::Error::msg)
}

/// Loads the config and starts serving it on `args.host:args.port` (returns once listening).
pub fn start(args: &ServeArgs) -> Result<Running> {
    let (config, deltas) = dz_loader::Config::load(&args.config)?;
    dz_loader::set_dense_rows(args.dense_rows);
    dz_loader::set_slot_tables(!args.no_slot_tables);
    dz_loader::set_pin_host_deltas(!args.no_pin_host);
    dz_loader::gpu_mem::set_pool_keep_bytes(args.pool_keep);
    dz_loader::set_fused_norm_deltas(!args.no_fused_norm_deltas);
    if std::env::var_os("DZ_TRACE").is_some_and(|v| v == "1") {
        dz_candle_ops::trace::set_enabled(true);
    }
    if args.v4_kernels {
        // Before any delta is read: the v4 layout is made when the CPU cache reads it.
        dz_loader::set_v4_kernels(true);
        dz_loader::set_v4_keep_packed(args.v4_keep_packed);
        dz_loader::set_v4_sbmm_smem_x(args.v4_sbmm_smem_x);
        dz_loader::set_v4_sbmm_ring(args.v4_sbmm_ring);
        dz_loader::set_v4_sbmm_x_direct(args.v4_sbmm_x_direct.unwrap_or(dz_loader::V4XDirect::Off));
        dz_loader::set_v4_wide64_from(args.v4_wide64_from);
        dz_loader::set_v4_pair(!args.no_v4_pair);
        dz_loader::set_v4_sbmm_pair(!args.no_v4_sbmm_pair);
        dz_loader::set_v4_sbmm_tail_split(args.v4_sbmm_tail_split);
        dz_loader::set_sbmm_wide_segments(!args.no_sbmm_wide_segments);
    }
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("DELTAZIP_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let delta_dir = match &args.delta_dir {
        None => None,
        Some(d) => Some(
            d.canonicalize()
                .with_context(|| format!("--delta-dir {}", d.display()))?,
        ),
    };
    eprintln!(
        "deltazip serve: loading {} ({} deltas)",
        config.base.path.display(),
        deltas.len()
    );
    // Tensor parallelism: every rank's process (the host re-runs this command once per GPU) loads its
    // slices of all deltas at start-up, and the ranks must batch identically, so there is no on-demand
    // residency and the admission hook is a pure cap ([`CapAdmission`]); on one GPU the scheduler's
    // tiers load deltas when needed.
    let tensor_parallel = config.runtime.tensor_parallel;
    let sharded = tensor_parallel > 1;
    if sharded {
        // Before the engine starts: in the host's worker processes serve_with never returns.
        mistralrs_core::set_admission_hook(Some(Arc::new(CapAdmission {
            cap: config.scheduler.max_deltas_per_step,
            multi_tenant: deltas
                .iter()
                .filter(|d| d.spec.mode == Mode::MultiTenant)
                .map(|d| d.spec.name.clone())
                .collect(),
        })));
    }
    let served = dz_loader::serve_with(&config, &deltas, sharded)?;
    let mistralrs = served
        .engine
        .mistralrs()
        .context("the config serves no model")?;
    let options = SchedulerOptions {
        max_deltas_per_step: config.scheduler.max_deltas_per_step,
        gpu_bytes: config
            .runtime
            .gpu_delta_bytes
            .unwrap_or(SchedulerOptions::default().gpu_bytes),
        cpu_bytes: config
            .runtime
            .cpu_cache_bytes
            .unwrap_or(SchedulerOptions::default().cpu_bytes),
        load_threads: config.runtime.load_threads,
        ..SchedulerOptions::default()
    };
    let gpu_budget = options.gpu_bytes;
    if !sharded {
        check_gpu_room(&served.device, &config, &deltas, gpu_budget)?;
    }
    let backend = LoaderBackend {
        device: served.device.clone(),
        tied_head: served.tied_head,
        registry: served.registry.clone(),
    };
    let scheduler = Arc::new(Scheduler::new(backend, options)?);
    let mut multi = BTreeSet::new();
    let mut merged = Vec::new();
    let mut swapped = Vec::new();
    for d in deltas {
        match d.spec.mode {
            Mode::MultiTenant => {
                multi.insert(d.spec.name.clone());
                if !sharded {
                    scheduler.register(&d.spec.name.clone(), Arc::new(d))?;
                }
            }
            Mode::Merge => merged.push(d.spec.name.clone()),
            Mode::Swap => swapped.push(d),
        }
    }
    let swap_names: Vec<String> = swapped.iter().map(|d| d.spec.name.clone()).collect();
    // The swap baseline: a GPU budget of `swap_gpu_models` whole models (all models of one base have
    // the same bytes), the CPU tier unbounded (the store holds every model already).
    let swap = match &served.swap_store {
        Some(store) if !swapped.is_empty() => {
            let k = config.runtime.swap_gpu_models;
            let mut model_bytes = 0;
            for d in &swapped {
                model_bytes = u64::max(model_bytes, store.get(d)?.bytes());
            }
            let options = SchedulerOptions {
                max_deltas_per_step: k,
                gpu_bytes: model_bytes.saturating_mul(k as u64),
                cpu_bytes: u64::MAX,
                load_threads: config.runtime.load_threads,
                ..SchedulerOptions::default()
            };
            eprintln!(
                "deltazip serve: {} swap models over {} delta files ({} GiB in CPU memory), {k} on \
                 the GPU at once ({:.2} GiB each)",
                swapped.len(),
                store.files(),
                store.bytes() >> 30,
                model_bytes as f64 / (1u64 << 30) as f64
            );
            let backend =
                SwapBackend::new(served.device.clone(), store.clone(), served.swap.clone());
            let s = Arc::new(Scheduler::new(backend, options)?);
            for d in swapped {
                s.register(&d.spec.name.clone(), Arc::new(d))?;
            }
            Some(s)
        }
        _ => None,
    };
    if !sharded {
        let mut tiers: Vec<Arc<dyn StepAdmission>> = Vec::new();
        if let Some(s) = &swap {
            tiers.push(s.clone());
        }
        tiers.push(scheduler.clone());
        mistralrs_core::set_admission_hook(Some(Arc::new(AdmissionSeam {
            tiers,
            other_engines: merged.iter().cloned().collect(),
        })));
    }
    let state = Arc::new(AppState {
        tensor_parallel,
        scheduler,
        registry: served.registry.clone(),
        swap,
        swap_registry: served.swap.clone(),
        swap_store: served.swap_store.clone(),
        swap_names,
        identity: std::sync::OnceLock::new(),
        base_path: config.base.path.clone(),
        base_name: config.base_name(),
        merged,
        engine_swap: served.engine_swap.clone(),
        multi_tenant: Mutex::new(multi),
        mistralrs: mistralrs.clone(),
        api_key,
        delta_dir,
        gpu_budget,
        requests: Mutex::new(BTreeMap::new()),
        generating: AtomicUsize::new(0),
        started: Instant::now(),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("deltazip-serve")
        .build()
        .context("starting the server's runtime")?;
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("--host {} --port {}", args.host, args.port))?;
    let (listener, router) = runtime.block_on(async {
        let host = mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder::new()
            .with_mistralrs(mistralrs)
            .build()
            .await
            .context("building the host's OpenAI router")?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        anyhow::Ok((listener, router(state, host)))
    })?;
    let addr = listener.local_addr().context("the listener's address")?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    eprintln!("deltazip serve: listening on http://{addr}");
    Ok(Running {
        addr,
        runtime: Some(runtime),
        shutdown: Some(tx),
        served: Some(served),
    })
}

/// `deltazip serve`: start, then serve until Ctrl-C.
pub fn run(args: &ServeArgs) -> Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        // The host's log (load progress, throughput, errors) on stderr, filtered by RUST_LOG.
        mistralrs_core::initialize_logging();
    }
    if args.dry_run {
        let (config, deltas) = dz_loader::Config::load(&args.config)?;
        print!("{}", crate::plan::serve_plan(&config, &deltas)?);
        return Ok(());
    }
    start(args)?.wait()
}

fn router(state: Arc<AppState>, host: Router) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/deltas", post(load_delta).get(list_deltas))
        .route("/v1/deltas/{name}", delete(unload_delta))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .route("/v1/completions", post(completions))
        .fallback_service(host)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            known_model,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Authentication and request counting, in front of every route.
async fn guard(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    if let Some(key) = &state.api_key {
        let ok = path == "/health"
            || request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|given| constant_time_eq(given.as_bytes(), key.as_bytes()));
        if !ok {
            return count(
                &state,
                &path,
                error(StatusCode::UNAUTHORIZED, "missing or wrong API key"),
            );
        }
    }
    let response = next.run(request).await;
    count(&state, &path, response)
}

/// `POST /v1/completions`: the host's own handler, except that the request goes to the engine of the
/// model it names. mistralrs-server-core 0.8.1 sends every text completion to the default engine (its
/// chat completions do route by model), so a merged fine-tune, which has an engine of its own, would
/// answer as the base. Parsing, streaming and errors are the host's (`completions::parse_request`,
/// `create_streamer`, `process_non_streaming_response`).
async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<
        Json<mistralrs_server_core::openai::CompletionRequest>,
        axum::extract::rejection::JsonRejection,
    >,
) -> Response {
    use mistralrs_server_core::completions::{
        create_streamer, handle_error, parse_request, process_non_streaming_response,
        CompletionResponder,
    };
    use mistralrs_server_core::handler_core::{create_response_channel, send_request_with_model};
    let Json(request) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let host = state.mistralrs.clone();
    let model = (request.model != "default").then(|| request.model.clone());
    let (tx, mut rx) = create_response_channel(None);
    let (request, is_streaming) = match parse_request(request, host.clone(), tx) {
        Ok(x) => x,
        Err(e) => return handle_error(host, e.into()).into_response(),
    };
    if let Err(e) = send_request_with_model(&host, request, model.as_deref()).await {
        return handle_error(host, e.into()).into_response();
    }
    if is_streaming {
        CompletionResponder::Sse(create_streamer(rx, host, None, None)).into_response()
    } else {
        process_non_streaming_response(&mut rx, host)
            .await
            .into_response()
    }
}

/// The largest request body read here to find its `model` (the host router's own limit).
const MAX_BODY: usize =
    mistralrs_server_core::mistralrs_server_router_builder::DEFAULT_MAX_BODY_LIMIT;

/// Answers 404 for a completion request naming a model this server does not serve (the base, a
/// multi-tenant delta registered now, a merged fine-tune, or the host's `default`). Other requests,
/// and bodies that are not JSON or name no model, go on to the host unchanged (it reports their
/// errors).
async fn known_model(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let generation = matches!(
        request.uri().path(),
        "/v1/completions" | "/v1/chat/completions"
    );
    if !generation || request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    // Open before the model is checked: an unload that finds no request open drops its delta at once.
    let generating = Generating::new(&state);
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body: {e} (at most {MAX_BODY} bytes)"),
            )
        }
    };
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<String>,
    }
    let mut lease = None;
    if let Ok(Named { model: Some(model) }) = serde_json::from_slice::<Named>(&bytes) {
        if !state.serves(&model) {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "model {model:?} is not served here (unknown, or its delta was unloaded); \
                     GET /v1/models lists the models"
                ),
            );
        }
        if let Some(swap) = &state.engine_swap {
            match engine_lease(swap, &state.mistralrs, &model).await {
                Ok(l) => lease = l,
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        }
    }
    let response = next
        .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await;
    let (parts, body) = response.into_parts();
    Response::from_parts(
        parts,
        axum::body::Body::new(LeasedBody {
            body,
            _lease: lease,
            _generating: generating,
        }),
    )
}

/// A generation request open at the HTTP layer: from before it reaches an engine until its response
/// body is dropped (sent to its end, or the client went away). When the last one closes, the deltas
/// unloaded while requests used them (draining) are dropped at once: no sequence of theirs is in flight
/// then (but one whose client went away and whose output nobody reads), and an idle engine runs no
/// scheduling step that would drop them.
struct Generating(Arc<AppState>);

impl Generating {
    fn new(state: &Arc<AppState>) -> Self {
        state.generating.fetch_add(1, Ordering::SeqCst);
        Self(state.clone())
    }
}

impl Drop for Generating {
    fn drop(&mut self) {
        if self.0.generating.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.scheduler.residency().drop_draining();
        }
    }
}

/// For a request naming `model` (or `default`, the host's default engine): a lease on its engine when
/// that is a merged engine under `merged_gpu_models` (waits until it is loaded), else none.
async fn engine_lease(
    swap: &EngineSwap,
    mistralrs: &mistralrs_core::MistralRs,
    model: &str,
) -> dz_loader::Result<Option<EngineLease>> {
    if model != "default" {
        if !swap.manages(model) {
            return Ok(None);
        }
        return swap.acquire(model).await.map(Some);
    }
    // The default engine changes only when it is unloaded: hold the one that is the default once held.
    loop {
        let Ok(Some(id)) = mistralrs.get_default_model_id() else {
            return Ok(None);
        };
        if !swap.manages(&id) {
            return Ok(None);
        }
        let lease = swap.acquire(&id).await?;
        if matches!(mistralrs.get_default_model_id(), Ok(Some(now)) if now == id) {
            return Ok(Some(lease));
        }
    }
}

/// A generation response's body, holding until it is dropped (sent to its end, or the client went
/// away) the request's [`Generating`] mark and, for a merged engine under `merged_gpu_models`, its
/// lease: a streamed completion keeps its engine loaded until its last event.
struct LeasedBody {
    body: axum::body::Body,
    _lease: Option<EngineLease>,
    _generating: Generating,
}

impl http_body::Body for LeasedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<Self::Data>, Self::Error>>>
    {
        http_body::Body::poll_frame(std::pin::Pin::new(&mut self.body), cx)
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.body)
    }
}

fn count(state: &AppState, path: &str, response: Response) -> Response {
    // Route families, not raw paths (names in URLs would make unbounded label sets).
    let route = match path {
        "/v1/completions"
        | "/v1/chat/completions"
        | "/v1/models"
        | "/v1/deltas"
        | "/metrics"
        | "/health" => path,
        p if p.starts_with("/v1/deltas/") => "/v1/deltas/{name}",
        _ => "other",
    };
    *state
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry((route.to_string(), response.status().as_u16()))
        .or_default() += 1;
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let entry = |id: &str, kind: &str| json!({ "id": id, "object": "model", "created": created, "owned_by": "deltazip", "deltazip": kind });
    let mut data = vec![entry(&state.base_name, "base")];
    data.extend(
        state
            .multi_tenant()
            .iter()
            .map(|n| entry(n, "multi-tenant")),
    );
    data.extend(state.merged.iter().map(|n| entry(n, "merged")));
    data.extend(state.swap_names.iter().map(|n| entry(n, "swap")));
    Json(json!({ "object": "list", "data": data })).into_response()
}

async fn list_deltas(State(state): State<Arc<AppState>>) -> Response {
    let names: Vec<String> = state.multi_tenant().iter().cloned().collect();
    let deltas: Vec<_> = names
        .iter()
        .map(|n| json!({ "name": n, "state": format!("{:?}", state.scheduler.residency().state(n)) }))
        .collect();
    Json(json!({ "deltas": deltas })).into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    name: String,
    path: PathBuf,
}

/// `path` resolved inside `dir` (relative paths are relative to it), or why not.
fn inside(dir: &Path, path: &Path) -> std::result::Result<PathBuf, String> {
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    };
    let real = full
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !real.starts_with(dir) {
        return Err(format!("{} is outside the delta directory", path.display()));
    }
    Ok(real)
}

async fn load_delta(
    State(state): State<Arc<AppState>>,
    body: Result<Json<LoadRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if state.tensor_parallel > 1 {
        return error(
            StatusCode::CONFLICT,
            format!(
                "hot loading is not available with tensor_parallel = {} (every rank's process would \
                 have to load its slices): list the delta in the config",
                state.tensor_parallel
            ),
        );
    }
    let Some(dir) = &state.delta_dir else {
        return error(
            StatusCode::FORBIDDEN,
            "hot loading is off: start the server with --delta-dir",
        );
    };
    let path = match inside(dir, &req.path) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::FORBIDDEN, e),
    };
    if req.name == state.base_name
        || state.merged.contains(&req.name)
        || state.swap_names.contains(&req.name)
    {
        return error(
            StatusCode::CONFLICT,
            format!("{:?} is already a model of this server", req.name),
        );
    }
    let name = req.name.clone();
    // Off the async workers: the first hot load fingerprints the base (hashes its weights), every one
    // opens the delta's manifest.
    let checked = tokio::task::block_in_place(|| {
        let identity = match state.identity.get() {
            Some(i) => i,
            None => {
                let i = BaseIdentity::of(&state.base_path)
                    .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
                state.identity.get_or_init(|| i)
            }
        };
        identity
            .check(&name, &path, Mode::MultiTenant)
            .map_err(|e| (StatusCode::BAD_REQUEST, e))
    });
    let checked = match checked {
        Ok(c) => c,
        Err((status, e)) => return error(status, e),
    };
    if let Err(e) = state.scheduler.register(&name, Arc::new(checked)) {
        return error(StatusCode::CONFLICT, e.to_string());
    }
    if let Err(e) = state
        .mistralrs
        .register_model_alias(name.clone(), &state.base_name)
    {
        let _ = state.scheduler.unregister(&name);
        return error(StatusCode::INTERNAL_SERVER_ERROR, e);
    }
    state.multi_tenant().insert(name.clone());
    // Start the load now (prefetch): the first request finds it on the device or on its way.
    let st = state.scheduler.residency().prefetch(&name);
    (
        StatusCode::CREATED,
        Json(json!({ "name": name, "state": format!("{st:?}") })),
    )
        .into_response()
}

async fn unload_delta(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    if state.tensor_parallel > 1 {
        return error(
            StatusCode::CONFLICT,
            format!(
                "unloading is not available with tensor_parallel = {}: the deltas stay for the \
                 server's lifetime",
                state.tensor_parallel
            ),
        );
    }
    match state.scheduler.unregister(&name) {
        Ok(how) => {
            state.multi_tenant().remove(&name);
            let status = match how {
                Unregistered::Dropped => "dropped",
                // Pinned by the last scheduling step, but no generation request is open: nothing
                // of it is in flight (the engine went idle without a step to unpin it).
                Unregistered::Draining if state.generating.load(Ordering::SeqCst) == 0 => {
                    state.scheduler.residency().drop_draining();
                    "dropped"
                }
                Unregistered::Draining => "draining",
            };
            Json(json!({ "name": name, "status": status })).into_response()
        }
        Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut out = state.scheduler.to_prometheus();
    if let Some(swap) = &state.swap {
        // The swap baseline's full-model loads: deltazip_swap_{loads,load_seconds,evictions,..}.
        out.push_str(&swap.to_prometheus_named("swap"));
        out.push_str(
            "# HELP deltazip_swap_copied_bytes_total Bytes of full models copied to the GPU.\n",
        );
        out.push_str("# TYPE deltazip_swap_copied_bytes_total counter\n");
        out.push_str(&format!(
            "deltazip_swap_copied_bytes_total {}\n",
            swap.residency().backend().copied_bytes()
        ));
        out.push_str("# HELP deltazip_swap_model_bytes Device bytes of the resident swap models, and CPU bytes of their store (one copy per delta file).\n");
        out.push_str("# TYPE deltazip_swap_model_bytes gauge\n");
        out.push_str(&format!(
            "deltazip_swap_model_bytes{{kind=\"gpu\"}} {}\ndeltazip_swap_model_bytes{{kind=\"cpu\"}} {}\n",
            state.swap_registry.bytes(),
            state.swap_store.as_ref().map_or(0, |s| s.bytes())
        ));
    }
    if let Some(es) = &state.engine_swap {
        // The engines baseline: merged engines unloaded and reloaded by the host.
        let st = es.stats();
        for (name, kind, help, value) in [
            ("loads_total", "counter", "Merged engines reloaded on demand (the host's reload_model; start-up loads not counted).", st.loads as f64),
            ("load_seconds_total", "counter", "Seconds spent reloading merged engines.", st.load_seconds),
            ("unloads_total", "counter", "Merged engines unloaded (the host's unload_model) to make room.", st.unloads as f64),
            ("unload_seconds_total", "counter", "Seconds spent unloading merged engines (until the engine let go of its model).", st.unload_seconds),
            ("load_failures_total", "counter", "Reloads of merged engines that failed.", st.load_failures as f64),
            ("loaded_models", "gauge", "Merged engines loaded now.", st.loaded as f64),
            ("capacity", "gauge", "runtime.merged_gpu_models: merged engines loaded at most.", st.capacity as f64),
            ("models", "gauge", "Merged models under the cap.", st.models as f64),
            ("waiting_requests", "gauge", "Requests waiting for their merged engine to be loaded.", st.waiting as f64),
            ("oldest_lease_seconds", "gauge", "Age of the oldest request holding a merged engine (0 when none does).", st.oldest_lease_seconds),
        ] {
            out.push_str(&format!(
                "# HELP deltazip_engine_swap_{name} {help}\n# TYPE deltazip_engine_swap_{name} {kind}\ndeltazip_engine_swap_{name} {value}\n"
            ));
        }
    }
    out.push_str("# HELP deltazip_requests_total HTTP requests by route and status.\n");
    out.push_str("# TYPE deltazip_requests_total counter\n");
    for ((route, status), n) in state
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        out.push_str(&format!(
            "deltazip_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n"
        ));
    }
    let mut tokens = state.registry.tokens();
    for (model, n) in state.swap_registry.tokens() {
        *tokens.entry(model).or_insert(0) += n;
    }
    let total: u64 = tokens.values().sum();
    out.push_str("# HELP deltazip_tokens_total Tokens generated by the base's engine (one per sequence per step), by requested model.\n");
    out.push_str("# TYPE deltazip_tokens_total counter\n");
    for (model, n) in &tokens {
        out.push_str(&format!("deltazip_tokens_total{{model=\"{model}\"}} {n}\n"));
    }
    let secs = state.started.elapsed().as_secs_f64().max(1e-9);
    out.push_str("# HELP deltazip_tokens_per_second Tokens per second since start-up.\n");
    out.push_str("# TYPE deltazip_tokens_per_second gauge\n");
    out.push_str(&format!(
        "deltazip_tokens_per_second {:.3}\n",
        total as f64 / secs
    ));
    out.push_str(
        "# HELP deltazip_gpu_delta_bytes Device bytes of the resident deltas, and the budget.\n",
    );
    out.push_str("# TYPE deltazip_gpu_delta_bytes gauge\n");
    out.push_str(&format!(
        "deltazip_gpu_delta_bytes{{kind=\"used\"}} {}\ndeltazip_gpu_delta_bytes{{kind=\"budget\"}} {}\n",
        state.registry.bytes(),
        state.gpu_budget
    ));
    let c = state.registry.plan_counts();
    out.push_str(
        "# HELP deltazip_linear_delta_calls_total Linear-layer calls with deltas, by how they found their \
         launches: the layer's cached plan, a plan built (the batch layout changed), the slot tables' shared \
         launch, or a fallback from the slot tables to the layer plan (counted again there).\n",
    );
    out.push_str("# TYPE deltazip_linear_delta_calls_total counter\n");
    for (outcome, n) in [
        ("plan_reused", c.plan_reused),
        ("plan_built", c.plan_built),
        ("slot_shared", c.slot_shared),
        ("slot_fallback", c.slot_fallback),
    ] {
        out.push_str(&format!(
            "deltazip_linear_delta_calls_total{{outcome=\"{outcome}\"}} {n}\n"
        ));
    }
    let p = state.registry.pass_counts();
    for (name, help, n) in [
        ("passes", "Forward passes of the multi-tenant model (output-head calls).", p.passes),
        ("rows", "Rows (sequences) of those passes, summed.", p.rows),
        (
            "models",
            "Distinct requested models (fine-tunes; the base counts as one) of those passes, summed.",
            p.models,
        ),
        (
            "runs",
            "Runs of consecutive rows of one requested model in those passes, summed (the segments each \
             linear layer's sbmm launches; equal to the models when each model's rows are grouped).",
            p.runs,
        ),
    ] {
        out.push_str(&format!(
            "# HELP deltazip_forward_{name}_total {help}\n# TYPE deltazip_forward_{name}_total counter\n\
             deltazip_forward_{name}_total {n}\n"
        ));
    }
    let profile = state.registry.profile();
    if profile.enabled() {
        let p = profile.snapshot();
        let seconds_help = format!(
            "Forward-pass time by part (DZ_PROFILE mode {}).",
            profile.mode()
        );
        for (metric, help, seconds) in [
            ("seconds", seconds_help.as_str(), true),
            ("calls", "Calls of each profiled part.", false),
        ] {
            out.push_str(&format!(
                "# HELP deltazip_profile_{metric}_total {help}\n# TYPE deltazip_profile_{metric}_total counter\n"
            ));
            for (part, secs, calls) in &p.parts {
                let value = if seconds {
                    format!("{secs:.6}")
                } else {
                    calls.to_string()
                };
                out.push_str(&format!(
                    "deltazip_profile_{metric}_total{{part=\"{}\"}} {value}\n",
                    part.as_str()
                ));
            }
        }
        out.push_str(&format!(
            "# HELP deltazip_profile_steps_total Steps (output-head calls under a second apart).\n\
             # TYPE deltazip_profile_steps_total counter\ndeltazip_profile_steps_total {}\n\
             # HELP deltazip_profile_step_seconds_total Seconds of those steps.\n\
             # TYPE deltazip_profile_step_seconds_total counter\ndeltazip_profile_step_seconds_total {:.6}\n\
             # HELP deltazip_profile_passes_total Forward passes timed from their first profiled part to the end of their output head.\n\
             # TYPE deltazip_profile_passes_total counter\ndeltazip_profile_passes_total {}\n\
             # HELP deltazip_profile_pass_seconds_total Seconds of those passes (a step minus its pass: the host's sampling, responses, scheduling and input preparation).\n\
             # TYPE deltazip_profile_pass_seconds_total counter\ndeltazip_profile_pass_seconds_total {:.6}\n",
            p.steps, p.step_seconds, p.passes, p.pass_seconds
        ));
    }
    if dz_candle_ops::trace::enabled() {
        let phases = dz_candle_ops::trace::snapshot();
        for (metric, help) in [
            (
                "seconds",
                "CPU time of named phases of the hook and the ops (DZ_TRACE=1; phases nest).",
            ),
            ("spans", "Spans of each traced phase."),
        ] {
            out.push_str(&format!(
                "# HELP deltazip_trace_{metric}_total {help}\n# TYPE deltazip_trace_{metric}_total counter\n"
            ));
            for p in &phases {
                let value = match metric {
                    "seconds" => format!("{:.6}", p.total.as_secs_f64()),
                    _ => p.calls.to_string(),
                };
                out.push_str(&format!(
                    "deltazip_trace_{metric}_total{{phase=\"{}\"}} {value}\n",
                    p.name
                ));
            }
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mistralrs_core::{Admission, AdmissionHook};

    #[test]
    fn x_direct_takes_its_two_names_and_names_a_bad_one() {
        assert_eq!(parse_x_direct("deep"), Ok(dz_loader::V4XDirect::Deep));
        assert_eq!(
            parse_x_direct("occupancy"),
            Ok(dz_loader::V4XDirect::Occupancy)
        );
        let e = parse_x_direct("fast").unwrap_err();
        assert!(e.contains("deep or occupancy"), "{e}");
    }

    #[test]
    fn x_direct_flag_defaults_to_deep_and_takes_a_name() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let parse = |extra: &[&str]| {
            let args = ["serve", "--config", "c.toml", "--v4-kernels"]
                .iter()
                .chain(extra);
            Cli::try_parse_from(args).map(|c| c.serve.v4_sbmm_x_direct)
        };
        assert_eq!(parse(&[]).unwrap(), None);
        let deep = parse(&["--v4-sbmm-x-direct", "--no-slot-tables"]).unwrap();
        assert_eq!(deep, Some(dz_loader::V4XDirect::Deep));
        let occupancy = parse(&["--v4-sbmm-x-direct", "occupancy"]).unwrap();
        assert_eq!(occupancy, Some(dz_loader::V4XDirect::Occupancy));
        assert!(parse(&["--v4-sbmm-x-direct", "fast"]).is_err());
        // The 64-row tile's rows: 0 (never) by default, a count with the flag, and only with --v4-kernels.
        let wide64 = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.serve.v4_wide64_from);
        let base = ["serve", "--config", "c.toml"];
        assert_eq!(wide64(&[&base[..], &["--v4-kernels"]].concat()).unwrap(), 0);
        let flag = ["--v4-kernels", "--v4-wide64-from", "64"];
        assert_eq!(wide64(&[&base[..], &flag].concat()).unwrap(), 64);
        assert!(wide64(&[&base[..], &flag[1..]].concat()).is_err());
        // The pair tile: on by default; --no-v4-pair turns it off, only with --v4-kernels.
        let pair = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.serve.no_v4_pair);
        assert!(!pair(&[&base[..], &["--v4-kernels"]].concat()).unwrap());
        assert!(pair(&[&base[..], &["--v4-kernels", "--no-v4-pair"]].concat()).unwrap());
        assert!(pair(&[&base[..], &["--no-v4-pair"]].concat()).is_err());
    }

    #[test]
    fn pool_keep_takes_sizes_with_units_and_names_a_bad_one() {
        assert_eq!(parse_pool_keep("4GiB"), Ok(4 << 30));
        assert_eq!(parse_pool_keep("0"), Ok(0));
        let e = parse_pool_keep("lots").unwrap_err();
        assert!(e.contains("\"lots\" is not a size"), "{e}");
    }

    #[test]
    fn cap_admission_is_a_pure_cap_on_distinct_fine_tunes() {
        let hook = CapAdmission {
            cap: 2,
            multi_tenant: ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect(),
        };
        let running = [Some("a"), Some("base")];
        let waiting = [
            Some("b"),
            Some("c"),
            None,
            Some("a"),
            Some("d"),
            Some("base"),
            Some("b"),
        ];
        let got = hook.admit(&running, &waiting, 8);
        let want = [
            Admission::Admit, // b: the second distinct fine-tune
            Admission::Wait,  // c: over the cap
            Admission::Admit, // untagged: the base
            Admission::Admit, // a: already in the step
            Admission::Wait,  // d: over the cap
            Admission::Admit, // the base by name
            Admission::Admit, // b again
        ];
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                std::mem::discriminant(g),
                std::mem::discriminant(w),
                "waiting[{i}]"
            );
        }
        // The same inputs give the same decisions (every rank decides alike).
        let again = hook.admit(&running, &waiting, 8);
        assert_eq!(format!("{got:?}"), format!("{again:?}"));
    }

    /// A tier that admits everything but `"wait"`, and records the sequences in flight it is given
    /// and how often it was asked to idle.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Vec<Option<String>>>>, AtomicUsize);

    impl StepAdmission for Recorder {
        fn decide(
            &self,
            running: &[Option<&str>],
            waiting: &[Option<&str>],
            _free: usize,
        ) -> Vec<Decision> {
            let running = running.iter().map(|m| m.map(str::to_owned)).collect();
            self.0.lock().unwrap().push(running);
            waiting
                .iter()
                .map(|w| match w {
                    Some("wait") => Decision::Wait,
                    _ => Decision::Admit,
                })
                .collect()
        }

        fn idle(&self, _timeout: Duration) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_admission_seam_idles_only_when_nothing_runs_and_everything_waits() {
        let tier = Arc::new(Recorder::default());
        let seam = AdmissionSeam {
            tiers: vec![tier.clone()],
            other_engines: BTreeSet::new(),
        };
        let idles = || tier.1.load(Ordering::Relaxed);
        // Sequences running: the step decodes them, no wait.
        seam.admit(&[Some("a")], &[Some("wait")], 4);
        assert_eq!(idles(), 0);
        // One waiting sequence can start: no wait.
        seam.admit(&[], &[Some("wait"), Some("a")], 4);
        assert_eq!(idles(), 0);
        // Nothing to wait for.
        seam.admit(&[], &[], 4);
        assert_eq!(idles(), 0);
        // Nothing runs and every waiting sequence waits for its delta: the tier idles once.
        let got = seam.admit(&[], &[Some("wait"), Some("wait")], 4);
        assert!(
            matches!(got[..], [Admission::Wait, Admission::Wait]),
            "{got:?}"
        );
        assert_eq!(idles(), 1);
    }

    #[test]
    fn the_admission_seam_leaves_the_schedulers_out_of_merged_engines_steps() {
        let tier = Arc::new(Recorder::default());
        let seam = AdmissionSeam {
            tiers: vec![tier.clone()],
            other_engines: ["merged".to_string()].into_iter().collect(),
        };
        // A merged engine's step: admitted, the scheduler not asked (it would take `merged` for all
        // the sequences in flight there are, and unpin the base engine's deltas).
        let got = seam.admit(&[Some("merged")], &[Some("merged"), Some("merged")], 4);
        assert!(got.iter().all(|d| matches!(d, Admission::Admit)), "{got:?}");
        assert!(tier.0.lock().unwrap().is_empty());
        // The base engine's steps: asked, with the sequences in flight.
        let got = seam.admit(&[Some("a"), None], &[Some("wait"), Some("a")], 4);
        assert!(
            matches!(got[..], [Admission::Wait, Admission::Admit]),
            "{got:?}"
        );
        let got = seam.admit(&[], &[None], 4);
        assert!(matches!(got[..], [Admission::Admit]), "{got:?}");
        assert_eq!(
            *tier.0.lock().unwrap(),
            vec![vec![Some("a".to_string()), None], vec![]]
        );
    }
}

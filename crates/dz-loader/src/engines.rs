//! At most K merged fine-tunes loaded at once (`runtime.merged_gpu_models = K`): the way a platform
//! without deltas serves many full fine-tunes with mistral.rs, one host engine per model and the host's
//! own `MistralRs::unload_model` / `reload_model` (issue #9's first "swap" baseline; the second is
//! [`crate::swap`]).
//!
//! What the host does not do, done here:
//! - The host reloads an unloaded model when a request names it (`get_sender`), with no cap on how
//!   many are loaded, and a second request arriving during that reload is refused
//!   (`ModelReloading`). Here a request first [`EngineSwap::acquire`]s its model: it waits until the
//!   model is loaded (a worker thread unloads the least recently used idle engine when K are loaded,
//!   then reloads the wanted one) and holds an [`EngineLease`] until it is answered; the host never
//!   sees a request for an unloaded model.
//! - `unload_model` ends the engine at once (`Request::Terminate`): sequences it was running are
//!   dropped. Here an engine is unloaded only when no lease holds it. When every loaded engine is
//!   busy, the least recently used one is *drained*: new requests for it wait like those for an
//!   unloaded model, and it is unloaded when its last request is answered.
//! - `unload_model` returns before the engine has let go of its weights; the worker unloads with
//!   `unload_model_and_wait` (host patch 0014), which returns once the engine's thread has exited and
//!   freed its model on that thread, under its CUDA context. Only then is the next model loaded, so
//!   K + 1 models are never on the device.
//! - On a GPU ([`GpuRoom`]) the worker also checks, before each load, that the device has room for one
//!   more engine (its weights, KV cache and working memory): when it has not, it unloads an idle engine
//!   first (fewer than K may then be loaded), or waits for a busy one to finish, or, with no engine left
//!   to unload, refuses the load at once with the numbers.
//! - A reload that failed or was refused fails the requests waiting for it, and for
//!   [`RELOAD_RETRY_AFTER`] every new request for that model fails at once with the same reason
//!   instead of waiting for another doomed load.
//! - A request waits at most `runtime.merged_wait_s` ([`EngineSwap::set_max_wait`]; default
//!   [`DEFAULT_MERGED_WAIT_S`](crate::config::DEFAULT_MERGED_WAIT_S)): when no engine becomes idle
//!   (every loaded one holds a request that does not finish), it fails with the state of the loaded
//!   engines (requests in flight, for how long, which drains) and what the worker is doing.
//!
//! Wanted models are loaded oldest waiting request first. One load or unload runs at a time. With
//! `DZ_ENGINE_TRACE=1` every unload and load is logged on stderr with the GPU's free memory before and
//! after it (and a pending CUDA error, if the device's context holds one).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use candle_core::Device;
use mistralrs_core::MistralRs;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::gpu_mem::{self, gib};

/// How long after a failed (or refused) reload new requests for that model fail at once with its reason.
pub const RELOAD_RETRY_AFTER: Duration = Duration::from_secs(10);

/// Working memory one engine needs besides its weights and KV cache (activations of a step of
/// `max_seqs` sequences, the logits, cuBLAS workspace): an estimate, counted in [`EngineBudget`].
pub const ENGINE_WORKING_BYTES: u64 = 2 << 30;

/// What one merged engine holds on its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineBudget {
    /// The model's weights.
    pub weights: u64,
    /// The paged KV cache's pool (`runtime.kv_cache_bytes`; 0 for a contiguous cache, which grows with
    /// the sequences).
    pub kv_cache: u64,
    /// Working memory ([`ENGINE_WORKING_BYTES`]).
    pub working: u64,
}

impl EngineBudget {
    /// Bytes one engine needs.
    pub fn per_engine(&self) -> u64 {
        self.weights + self.kv_cache + self.working
    }

    /// Whether `engines` engines fit in `free` bytes; the error names the config fields to change and
    /// what would fit.
    pub fn check(&self, engines: usize, free: u64) -> std::result::Result<(), String> {
        let n = engines as u64;
        let need = self.per_engine() * n;
        if need <= free {
            return Ok(());
        }
        let fit = free / self.per_engine().max(1);
        let mut fixes = Vec::new();
        if fit >= 1 {
            fixes.push(format!("runtime.merged_gpu_models = {fit}"));
        }
        let kv_fits = (free / n.max(1)).saturating_sub(self.weights + self.working);
        if self.kv_cache > 0 && kv_fits >= 1 << 30 {
            fixes.push(format!("runtime.kv_cache_bytes = \"{}GiB\"", kv_fits >> 30));
        }
        let fixes = if fixes.is_empty() {
            "not even one engine fits".to_string()
        } else {
            format!("what fits: {}", fixes.join(", or "))
        };
        Err(format!(
            "runtime.merged_gpu_models = {engines} engines of {} weights + {} KV cache \
             (runtime.kv_cache_bytes) + {} working memory need {}, the GPU has {} free; {fixes}",
            gib(self.weights),
            gib(self.kv_cache),
            gib(self.working),
            gib(need),
            gib(free)
        ))
    }
}

/// The device the merged engines run on, when it is a GPU: the swap checks its free memory before
/// each load, and frees models only on threads with its CUDA context current.
#[derive(Debug, Clone)]
pub struct GpuRoom {
    /// The engines' device.
    pub device: Device,
    /// Bytes one more engine needs free before its load starts.
    pub engine_bytes: u64,
}

/// One managed model.
#[derive(Debug, Default)]
struct Slot {
    loaded: bool,
    /// Leases held (requests in flight on its engine): lease id (a tick) -> when it was taken.
    leases: BTreeMap<u64, Instant>,
    /// Since when it has had leases without a pause (`None` while idle).
    busy_since: Option<Instant>,
    /// Requests waiting for it, by ticket (arrival order).
    waiting: BTreeSet<u64>,
    /// No new leases: it is about to be unloaded (idle), or will be once its leases end (busy).
    draining: bool,
    last_used: u64,
    /// The last reload failed (or was refused): when, and why.
    failed: Option<(Instant, String)>,
}

#[derive(Debug, Default)]
struct State {
    slots: BTreeMap<String, Slot>,
    clock: u64,
    /// Tickets whose load failed, with why (their requests get the error).
    failed: BTreeMap<u64, String>,
    /// How long a request waits for its engine before it fails (`None`: without limit).
    max_wait: Option<Duration>,
    /// What the worker is doing outside the lock ("unloading m0"), since when: for a request that
    /// gave up waiting.
    doing: Option<(String, Instant)>,
    stop: bool,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn loaded(&self) -> usize {
        self.slots.values().filter(|s| s.loaded).count()
    }
}

/// Counters, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineSwapStats {
    /// The cap on loaded engines.
    pub capacity: usize,
    /// Models managed.
    pub models: usize,
    /// Engines loaded now.
    pub loaded: usize,
    /// Requests waiting for their model's engine now.
    pub waiting: usize,
    /// Reloads on demand (start-up loads not counted).
    pub loads: u64,
    /// Seconds spent in them.
    pub load_seconds: f64,
    /// Unloads.
    pub unloads: u64,
    /// Seconds spent in them (until the engine let go of its model).
    pub unload_seconds: f64,
    /// Reloads that failed, or were refused for want of GPU memory.
    pub load_failures: u64,
    /// Age in seconds of the oldest lease held now (the longest-running request on a merged engine;
    /// 0 when none is held).
    pub oldest_lease_seconds: f64,
}

struct Inner {
    mistralrs: Arc<MistralRs>,
    capacity: usize,
    gpu: Option<GpuRoom>,
    trace: bool,
    started: Instant,
    state: Mutex<State>,
    /// Bumped on every change of `state` that may let a request or the worker proceed.
    changed: watch::Sender<u64>,
    loads: AtomicU64,
    load_nanos: AtomicU64,
    unloads: AtomicU64,
    unload_nanos: AtomicU64,
    load_failures: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Notes what the worker does next outside the lock (`None`: done).
    fn doing(&self, what: Option<String>) {
        self.lock().doing = what.map(|w| (w, Instant::now()));
    }

    /// The GPU's free bytes now (`None` on the CPU, or when the driver would not say).
    fn free_bytes(&self) -> Option<u64> {
        let gpu = self.gpu.as_ref()?;
        match gpu_mem::mem_info(&gpu.device)? {
            Ok(m) => Some(m.free),
            Err(e) => {
                eprintln!("dz-loader: the GPU's free memory: {e}");
                None
            }
        }
    }

    /// `DZ_ENGINE_TRACE=1`: the GPU's memory, for a trace line.
    fn trace_memory(&self) -> String {
        let Some(gpu) = &self.gpu else {
            return "gpu n/a".to_string();
        };
        match gpu_mem::mem_info(&gpu.device) {
            None => "gpu n/a".to_string(),
            Some(Err(e)) => format!("gpu memory unknown ({e})"),
            Some(Ok(m)) => {
                let pending = m
                    .pending_error
                    .map_or(String::new(), |e| format!(", pending CUDA error {e}"));
                format!("gpu free {} of {}{pending}", gib(m.free), gib(m.total))
            }
        }
    }

    fn trace(&self, line: std::fmt::Arguments<'_>) {
        if self.trace {
            eprintln!(
                "dz-engine-trace: {:9.3}s {line}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// Whether `DZ_ENGINE_TRACE` asks for the engine swap's trace.
fn trace_enabled() -> bool {
    std::env::var("DZ_ENGINE_TRACE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The cap on loaded merged engines: requests [`acquire`](EngineSwap::acquire) their model's engine, a
/// worker thread unloads and reloads engines through the host. Dropping it stops the worker.
pub struct EngineSwap {
    inner: Arc<Inner>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A request's hold on a loaded engine: the engine is not unloaded while any lease on it lives.
pub struct EngineLease {
    inner: Arc<Inner>,
    name: String,
    id: u64,
}

impl Drop for EngineLease {
    fn drop(&mut self) {
        if let Some(s) = self.inner.lock().slots.get_mut(&self.name) {
            s.leases.remove(&self.id);
            if s.leases.is_empty() {
                s.busy_since = None;
            }
        }
        self.inner.bump();
    }
}

/// A request waiting for its model (dropped when it gets a lease, fails, or is cancelled).
struct Ticket<'a> {
    inner: &'a Inner,
    name: &'a str,
    id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        {
            let mut st = self.inner.lock();
            if let Some(s) = st.slots.get_mut(self.name) {
                s.waiting.remove(&self.id);
            }
            st.failed.remove(&self.id);
        }
        self.inner.bump();
    }
}

impl EngineSwap {
    /// Manages `models` (names the host knows, each added with a loader config so that it can be
    /// unloaded and reloaded) under a cap of `capacity` loaded at once; `loaded` are those loaded now
    /// (at most `capacity`), the rest unloaded. `gpu`: the device, when the engines run on a GPU.
    pub fn new(
        mistralrs: Arc<MistralRs>,
        capacity: usize,
        models: &[String],
        loaded: &[String],
        gpu: Option<GpuRoom>,
    ) -> Result<Arc<Self>> {
        if capacity == 0 || loaded.len() > capacity {
            return Err(Error::Host(format!(
                "{} merged engines loaded under a cap of {capacity}",
                loaded.len()
            )));
        }
        let mut st = State {
            max_wait: Some(Duration::from_secs(crate::config::DEFAULT_MERGED_WAIT_S)),
            ..State::default()
        };
        for m in models {
            let loaded = loaded.contains(m);
            let tick = st.tick();
            st.slots.insert(
                m.clone(),
                Slot {
                    loaded,
                    last_used: tick,
                    ..Slot::default()
                },
            );
        }
        let inner = Arc::new(Inner {
            mistralrs,
            capacity,
            gpu,
            trace: trace_enabled(),
            started: Instant::now(),
            state: Mutex::new(st),
            changed: watch::channel(0).0,
            loads: AtomicU64::new(0),
            load_nanos: AtomicU64::new(0),
            unloads: AtomicU64::new(0),
            unload_nanos: AtomicU64::new(0),
            load_failures: AtomicU64::new(0),
        });
        let worker_inner = inner.clone();
        let worker = std::thread::Builder::new()
            .name("dz-engine-swap".into())
            .spawn(move || worker(&worker_inner))
            .map_err(|source| Error::Io {
                path: "<engine swap thread>".into(),
                source,
            })?;
        Ok(Arc::new(Self {
            inner,
            worker: Mutex::new(Some(worker)),
        }))
    }

    /// Whether `name` is one of the models managed here.
    pub fn manages(&self, name: &str) -> bool {
        self.inner.lock().slots.contains_key(name)
    }

    /// The models whose engines are loaded now.
    pub fn loaded(&self) -> Vec<String> {
        let st = self.inner.lock();
        st.slots
            .iter()
            .filter(|(_, s)| s.loaded)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// How long a request waits for its engine before it fails with the engines' state (`None`:
    /// without limit); `runtime.merged_wait_s`, default
    /// [`DEFAULT_MERGED_WAIT_S`](crate::config::DEFAULT_MERGED_WAIT_S). Applies to waits that start
    /// after it.
    pub fn set_max_wait(&self, limit: Option<Duration>) {
        self.inner.lock().max_wait = limit;
    }

    /// Waits until model `name`'s engine is loaded (and not draining), then holds it until the lease
    /// is dropped. Fails only for a name not managed here, a reload that failed (or was refused: not
    /// enough GPU memory) while it waited or less than [`RELOAD_RETRY_AFTER`] before it came, a wait
    /// longer than [`set_max_wait`](Self::set_max_wait)'s (the error names the loaded engines with
    /// their requests in flight, and is logged on stderr), or a stopped swap.
    pub async fn acquire(&self, name: &str) -> Result<EngineLease> {
        let inner = &*self.inner;
        let mut rx = inner.changed.subscribe();
        let mut ticket: Option<Ticket<'_>> = None;
        let started = Instant::now();
        // The limit, and when it runs out (`None`: never), fixed when the request starts waiting.
        let mut deadline: Option<(Duration, Instant)> = None;
        loop {
            rx.borrow_and_update();
            {
                let mut st = inner.lock();
                if st.stop {
                    return Err(Error::Host(format!("{name}: the server is stopping")));
                }
                if let Some(t) = &ticket {
                    if let Some(why) = st.failed.remove(&t.id) {
                        return Err(Error::Host(format!("loading {name}: {why}")));
                    }
                }
                let tick = st.tick();
                let max_wait = st.max_wait;
                let slot = st.slots.get_mut(name).ok_or_else(|| {
                    Error::Host(format!(
                        "{name:?} is not a merged model with a swapped engine"
                    ))
                })?;
                if slot.loaded && !slot.draining {
                    let now = Instant::now();
                    slot.leases.insert(tick, now);
                    slot.busy_since.get_or_insert(now);
                    slot.last_used = tick;
                    drop(st);
                    drop(ticket);
                    return Ok(EngineLease {
                        inner: self.inner.clone(),
                        name: name.to_string(),
                        id: tick,
                    });
                }
                if ticket.is_none() {
                    if let Some((at, why)) = &slot.failed {
                        let ago = at.elapsed();
                        if ago < RELOAD_RETRY_AFTER {
                            return Err(Error::Host(format!(
                                "loading {name} failed {:.1}s ago (tried again {}s after a \
                                 failure): {why}",
                                ago.as_secs_f64(),
                                RELOAD_RETRY_AFTER.as_secs()
                            )));
                        }
                    }
                    slot.waiting.insert(tick);
                    ticket = Some(Ticket {
                        inner,
                        name,
                        id: tick,
                    });
                    deadline = max_wait.and_then(|w| Some((w, started.checked_add(w)?)));
                    drop(st);
                    // Wake the worker: a new wanted model.
                    inner.bump();
                } else if let Some((limit, _)) = deadline.filter(|&(_, at)| Instant::now() >= at) {
                    let why = waited_too_long(&st, name, started.elapsed(), limit, inner.capacity);
                    drop(st);
                    eprintln!("dz-loader: {why}");
                    return Err(Error::Host(why));
                }
            }
            let changed = match deadline {
                None => rx.changed().await,
                Some((_, at)) => {
                    let left = at.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, rx.changed()).await {
                        Ok(changed) => changed,
                        // Out of time: the state is looked at once more, above, before it fails.
                        Err(_) => continue,
                    }
                }
            };
            if changed.is_err() {
                return Err(Error::Host(format!("{name}: the server is stopping")));
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> EngineSwapStats {
        let st = self.inner.lock();
        let i = &self.inner;
        EngineSwapStats {
            capacity: i.capacity,
            models: st.slots.len(),
            loaded: st.loaded(),
            waiting: st.slots.values().map(|s| s.waiting.len()).sum(),
            loads: i.loads.load(Ordering::Relaxed),
            load_seconds: i.load_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            unloads: i.unloads.load(Ordering::Relaxed),
            unload_seconds: i.unload_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            load_failures: i.load_failures.load(Ordering::Relaxed),
            oldest_lease_seconds: st
                .slots
                .values()
                .filter_map(|s| s.leases.values().min())
                .min()
                .map_or(0.0, |t| t.elapsed().as_secs_f64()),
        }
    }
}

/// Why a request for `name` gave up after `waited` (its limit `limit`): the loaded engines with their
/// requests in flight (the oldest's age), how long each has been busy, which drains; the requests
/// waiting; what the worker is doing.
fn waited_too_long(
    st: &State,
    name: &str,
    waited: Duration,
    limit: Duration,
    capacity: usize,
) -> String {
    let now = Instant::now();
    let secs = |t: Instant| now.saturating_duration_since(t).as_secs_f64();
    let engines: Vec<String> = st
        .slots
        .iter()
        .filter(|(_, s)| s.loaded)
        .map(|(n, s)| {
            let mut e = match (s.leases.values().min(), s.busy_since) {
                (Some(&oldest), Some(since)) => format!(
                    "{n}: {} in flight (the oldest for {:.1}s), busy for {:.1}s",
                    s.leases.len(),
                    secs(oldest),
                    secs(since)
                ),
                _ => format!("{n}: idle"),
            };
            if s.draining {
                e.push_str(", draining");
            }
            e
        })
        .collect();
    let engines = if engines.is_empty() {
        "none".to_string()
    } else {
        engines.join("; ")
    };
    let waiting: usize = st.slots.values().map(|s| s.waiting.len()).sum();
    let worker = match &st.doing {
        Some((what, since)) => format!("{what} for {:.1}s", secs(*since)),
        None => "idle".to_string(),
    };
    format!(
        "no engine for {name} after waiting {:.1}s (runtime.merged_wait_s = {}): {} of {capacity} \
         merged engines loaded: {engines}; {waiting} requests waiting for an engine (this one \
         included); the swap's worker: {worker}",
        waited.as_secs_f64(),
        limit.as_secs_f64(),
        st.loaded()
    )
}

impl Drop for EngineSwap {
    fn drop(&mut self) {
        self.inner.lock().stop = true;
        self.inner.bump();
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = worker {
            let _ = w.join();
        }
    }
}

/// What the worker does next.
#[derive(Debug, PartialEq)]
enum Action {
    Load(String),
    Unload(String),
    /// Fail the requests waiting for `model`: the GPU has no room for it and nothing to unload.
    Refuse {
        model: String,
        why: String,
    },
    /// Wake the requests: an engine stopped draining, those parked on it may take a lease.
    Wake,
    /// Nothing until the state changes.
    Wait,
}

/// The next step, decided under the lock (marks an engine to unload as draining, so that no lease is
/// taken on it meanwhile; clears that mark when nobody waits any more, and then asks for a wake-up).
fn next_action(st: &mut State, capacity: usize) -> Action {
    // The wanted model: not loaded, with the oldest waiting request.
    let target = st
        .slots
        .iter()
        .filter(|(_, s)| !s.loaded)
        .filter_map(|(n, s)| s.waiting.first().map(|&t| (t, n.clone())))
        .min();
    let Some((_, target)) = target else {
        // Nobody waits for an unloaded model: drain nothing. Requests that came for a draining engine
        // wait on it: they must hear that it is open again (nothing else may change for a long time).
        let mut undrained = false;
        for s in st.slots.values_mut() {
            undrained |= std::mem::take(&mut s.draining);
        }
        return if undrained {
            Action::Wake
        } else {
            Action::Wait
        };
    };
    if st.loaded() < capacity {
        return Action::Load(target);
    }
    make_way(st).unwrap_or(Action::Wait)
}

/// Before loading `target` on a GPU with `free` bytes free, when one engine needs `need`: the load, or
/// first an unload (of an idle engine; or a busy one drained, waited for), or, with no engine loaded
/// to make room, a refusal with the numbers.
fn make_room(st: &mut State, target: &str, free: u64, need: u64) -> Action {
    if free >= need {
        return Action::Load(target.to_string());
    }
    make_way(st).unwrap_or_else(|| Action::Refuse {
        model: target.to_string(),
        why: format!(
            "not enough GPU memory: one merged engine needs {} (weights, KV cache, working \
             memory) and the GPU has {} free with no merged engine loaded (another process, or \
             memory a previous engine did not give back?)",
            gib(need),
            gib(free)
        ),
    })
}

/// One engine fewer: the least recently used idle engine to unload (one already draining first), or,
/// when every loaded engine is busy, [`Action::Wait`] with the least recently used busy one draining (one
/// at a time). `None` when no engine is loaded.
///
/// An engine with requests waiting for it and not draining is not idle: it was just loaded for them,
/// and they have not taken their leases yet (they wake after the load). Session 10 measured what
/// happens otherwise with one engine (K = 1) and requests for several models: the engine just loaded
/// was the least recently used, so it was unloaded at once for the next model, and reloaded for its
/// own waiters, for ever (`unload ft-03`, `load ft-03`, ... every 2.3 s; no request answered).
fn make_way(st: &mut State) -> Option<Action> {
    let idle = st
        .slots
        .iter()
        .filter(|(_, s)| s.loaded && s.leases.is_empty() && (s.draining || s.waiting.is_empty()))
        .min_by_key(|(_, s)| (!s.draining, s.last_used))
        .map(|(n, _)| n.clone());
    if let Some(victim) = idle {
        if let Some(s) = st.slots.get_mut(&victim) {
            s.draining = true;
        }
        return Some(Action::Unload(victim));
    }
    if !st.slots.values().any(|s| s.loaded) {
        return None;
    }
    if !st.slots.values().any(|s| s.loaded && s.draining) {
        // Not one just loaded for its waiters (no lease yet): they take their leases first.
        if let Some(s) = st
            .slots
            .values_mut()
            .filter(|s| s.loaded && !s.leases.is_empty())
            .min_by_key(|s| s.last_used)
        {
            s.draining = true;
        }
    }
    Some(Action::Wait)
}

fn worker(inner: &Inner) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        inner.lock().stop = true;
        inner.bump();
        return;
    };
    // A model whose load fails halfway is freed on this thread.
    if let Some(gpu) = &inner.gpu {
        gpu_mem::bind(&gpu.device);
    }
    let mut rx = inner.changed.subscribe();
    loop {
        rx.borrow_and_update();
        let mut action = {
            let mut st = inner.lock();
            if st.stop {
                return;
            }
            next_action(&mut st, inner.capacity)
        };
        if let (Action::Load(name), Some(gpu)) = (&action, &inner.gpu) {
            // Asked outside the lock: it waits for the device's queued work.
            inner.doing(Some(format!("asking the GPU's free memory to load {name}")));
            let free = inner.free_bytes();
            inner.doing(None);
            if let Some(free) = free {
                action = make_room(&mut inner.lock(), name, free, gpu.engine_bytes);
            }
        }
        match action {
            Action::Wake => inner.bump(),
            Action::Wait => {
                // Also wake now and then: a change is always bumped, this only bounds a lost one.
                let _ = rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(1), rx.changed()).await
                });
            }
            Action::Unload(name) => unload(inner, &name),
            Action::Load(name) => load(inner, &rt, &name),
            Action::Refuse { model, why } => {
                inner.trace(format_args!("refuse {model}: {why}"));
                fail(inner, &model, why);
            }
        }
    }
}

/// Unloads `name` through the host and waits until its engine's thread has exited, having freed the
/// model (weights, KV cache) on that thread.
fn unload(inner: &Inner, name: &str) {
    if inner.trace {
        inner.trace(format_args!("unload {name}: {}", inner.trace_memory()));
    }
    let t0 = Instant::now();
    inner.doing(Some(format!("unloading {name}")));
    let unloaded = inner
        .mistralrs
        .unload_model_and_wait(name)
        .map_err(|e| e.to_string());
    let took = t0.elapsed();
    {
        let mut st = inner.lock();
        st.doing = None;
        if let Some(s) = st.slots.get_mut(name) {
            s.draining = false;
            if unloaded.is_ok() {
                s.loaded = false;
            }
        }
    }
    match &unloaded {
        Ok(()) => {
            inner.unloads.fetch_add(1, Ordering::Relaxed);
            inner
                .unload_nanos
                .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        }
        Err(e) => eprintln!("dz-loader: unloading {name}: {e}"),
    }
    if inner.trace {
        let outcome = match &unloaded {
            Ok(()) => "unloaded".to_string(),
            Err(e) => format!("FAILED ({e})"),
        };
        inner.trace(format_args!(
            "unload {name}: {outcome} in {:.3}s, {}",
            took.as_secs_f64(),
            inner.trace_memory()
        ));
    }
    inner.bump();
    if unloaded.is_err() {
        // Not in a tight loop: the next decision may pick it again.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reloads `name` through the host; on failure its waiting requests get the error.
fn load(inner: &Inner, rt: &tokio::runtime::Runtime, name: &str) {
    if inner.trace {
        inner.trace(format_args!("load {name}: {}", inner.trace_memory()));
    }
    let t0 = Instant::now();
    inner.doing(Some(format!("loading {name}")));
    // A panic in the host's loader fails this load, not the worker (every request would then wait
    // for ever).
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(inner.mistralrs.reload_model(name))
    }))
    .map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        format!("the host's loader panicked: {what}")
    })
    .and_then(|r| r.map_err(|e| e.to_string()));
    let took = t0.elapsed();
    inner.doing(None);
    if inner.trace {
        let outcome = match &loaded {
            Ok(()) => "loaded".to_string(),
            Err(e) => format!("FAILED ({e})"),
        };
        inner.trace(format_args!(
            "load {name}: {outcome} in {:.3}s, {}",
            took.as_secs_f64(),
            inner.trace_memory()
        ));
    }
    match loaded {
        Ok(()) => {
            if let Some(s) = inner.lock().slots.get_mut(name) {
                s.loaded = true;
                s.failed = None;
            }
            inner.loads.fetch_add(1, Ordering::Relaxed);
            inner
                .load_nanos
                .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
            // The host's default engine is unset when every engine was unloaded (K = 1 and no
            // base), and a reload does not set it: requests naming no model need one.
            if matches!(inner.mistralrs.get_default_model_id(), Ok(None)) {
                let _ = inner.mistralrs.set_default_model_id(name);
            }
            inner.bump();
        }
        Err(why) => fail(inner, name, why),
    }
}

/// A load of `name` failed or was refused: the requests waiting now get `why`, and so do those that
/// come within [`RELOAD_RETRY_AFTER`]; later ones try again.
fn fail(inner: &Inner, name: &str, why: String) {
    eprintln!("dz-loader: reloading {name}: {why}");
    inner.load_failures.fetch_add(1, Ordering::Relaxed);
    {
        let mut st = inner.lock();
        let tickets: Vec<u64> = st
            .slots
            .get_mut(name)
            .map(|s| {
                s.failed = Some((Instant::now(), why.clone()));
                std::mem::take(&mut s.waiting).into_iter().collect()
            })
            .unwrap_or_default();
        for t in tickets {
            st.failed.insert(t, why.clone());
        }
    }
    inner.bump();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots `(name, loaded, leases held, waiting tickets, last used)`.
    fn state(slots: &[(&str, bool, usize, &[u64], u64)]) -> State {
        let mut st = State::default();
        let now = Instant::now();
        for &(n, loaded, in_flight, waiting, last_used) in slots {
            st.slots.insert(
                n.to_string(),
                Slot {
                    loaded,
                    leases: (0..in_flight as u64).map(|i| (1000 + i, now)).collect(),
                    busy_since: (in_flight > 0).then_some(now),
                    waiting: waiting.iter().copied().collect(),
                    draining: false,
                    last_used,
                    failed: None,
                },
            );
        }
        st.clock = 100;
        st
    }

    /// Its requests are answered: no lease left.
    fn idle(st: &mut State, name: &str) {
        let s = st.slots.get_mut(name).unwrap();
        s.leases.clear();
        s.busy_since = None;
    }

    #[test]
    fn loads_the_oldest_wanted_model_while_there_is_room() {
        let mut st = state(&[
            ("a", true, 1, &[], 5),
            ("b", false, 0, &[9], 1),
            ("c", false, 0, &[7], 2),
        ]);
        assert_eq!(next_action(&mut st, 2), Action::Load("c".into()));
        let mut st = state(&[("a", true, 1, &[], 5), ("b", false, 0, &[], 1)]);
        assert_eq!(next_action(&mut st, 1), Action::Wait);
    }

    #[test]
    fn unloads_the_least_recently_used_idle_engine() {
        let mut st = state(&[
            ("a", true, 0, &[], 5),
            ("b", true, 0, &[], 3),
            ("c", true, 2, &[], 1),
            ("d", false, 0, &[10], 0),
        ]);
        assert_eq!(next_action(&mut st, 3), Action::Unload("b".into()));
        // Marked: no lease is taken on it before the unload.
        assert!(st.slots["b"].draining);
    }

    #[test]
    fn drains_a_busy_engine_and_waits_for_it() {
        let mut st = state(&[
            ("a", true, 2, &[], 5),
            ("b", true, 1, &[], 3),
            ("c", false, 0, &[10], 0),
        ]);
        assert_eq!(next_action(&mut st, 2), Action::Wait);
        assert!(st.slots["b"].draining && !st.slots["a"].draining);
        // Still busy: still one draining, still waiting.
        assert_eq!(next_action(&mut st, 2), Action::Wait);
        assert!(!st.slots["a"].draining);
        // Its last request is answered: it goes.
        idle(&mut st, "b");
        assert_eq!(next_action(&mut st, 2), Action::Unload("b".into()));
        // Nobody waits any more: nothing drains.
        let mut st = state(&[
            ("a", true, 2, &[], 5),
            ("b", true, 1, &[], 3),
            ("c", false, 0, &[10], 0),
        ]);
        assert_eq!(next_action(&mut st, 2), Action::Wait);
        st.slots.get_mut("c").unwrap().waiting.clear();
        assert_eq!(next_action(&mut st, 2), Action::Wake);
        assert!(st.slots.values().all(|s| !s.draining));
    }

    /// Session 10's thrash (K = 1): the engine just loaded for its waiters is the least recently used,
    /// but it is not unloaded for the next model before they take their leases; then it drains as any
    /// busy engine, and goes once they are answered.
    #[test]
    fn keeps_an_engine_just_loaded_for_its_waiters() {
        let mut st = state(&[("a", true, 0, &[5], 1), ("b", false, 0, &[3], 2)]);
        assert_eq!(next_action(&mut st, 1), Action::Wait);
        assert!(!st.slots["a"].draining, "its waiters must get their leases");
        // They take them (a ticket leaves `waiting` when its lease is taken).
        let a = st.slots.get_mut("a").unwrap();
        a.waiting.clear();
        a.leases.insert(5, Instant::now());
        assert_eq!(next_action(&mut st, 1), Action::Wait);
        assert!(st.slots["a"].draining);
        // A request that comes while it drains waits on it, and does not keep it loaded.
        st.slots.get_mut("a").unwrap().waiting.insert(7);
        idle(&mut st, "a");
        assert_eq!(next_action(&mut st, 1), Action::Unload("a".into()));
        // With two engines, the other (idle, used earlier) goes first.
        let mut st = state(&[
            ("a", true, 0, &[5], 1),
            ("c", true, 0, &[], 4),
            ("b", false, 0, &[3], 2),
        ]);
        assert_eq!(next_action(&mut st, 2), Action::Unload("c".into()));
    }

    /// The request that made an engine drain gave up (or was answered elsewhere): the engine opens
    /// again, and the requests parked on it are woken (a plain `Wait` would leave them asleep until
    /// some unrelated change).
    #[test]
    fn undraining_an_engine_wakes_its_waiters() {
        let mut st = state(&[("a", true, 1, &[], 5), ("b", false, 0, &[10], 0)]);
        assert_eq!(next_action(&mut st, 1), Action::Wait);
        assert!(st.slots["a"].draining);
        // A request for a came meanwhile and waits on the draining engine; b's request leaves.
        st.slots.get_mut("a").unwrap().waiting.insert(11);
        st.slots.get_mut("b").unwrap().waiting.clear();
        assert_eq!(next_action(&mut st, 1), Action::Wake);
        assert!(!st.slots["a"].draining);
        // Woken once: nothing more to do.
        assert_eq!(next_action(&mut st, 1), Action::Wait);
    }

    /// A request that waited too long is told which engines hold the device, with their requests in
    /// flight, how long they have been busy, which drains, and what the worker does.
    #[test]
    fn a_wait_too_long_names_the_busy_engines() {
        let mut st = state(&[
            ("a", true, 2, &[], 5),
            ("b", true, 0, &[], 3),
            ("c", false, 0, &[10, 12], 0),
        ]);
        let ago = |s: u64| Instant::now().checked_sub(Duration::from_secs(s)).unwrap();
        let a = st.slots.get_mut("a").unwrap();
        a.draining = true;
        a.leases = [(1, ago(5)), (2, ago(1))].into();
        a.busy_since = Some(ago(9));
        st.doing = Some(("unloading b".into(), ago(3)));
        let why = waited_too_long(
            &st,
            "c",
            Duration::from_millis(1500),
            Duration::from_secs(1),
            2,
        );
        for want in [
            "no engine for c after waiting 1.5s (runtime.merged_wait_s = 1)",
            "2 of 2 merged engines loaded",
            "a: 2 in flight (the oldest for 5.",
            "s), busy for 9.",
            "s, draining; b: idle;",
            "2 requests waiting",
            "worker: unloading b for 3.",
        ] {
            assert!(why.contains(want), "{want:?} not in {why}");
        }
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn loads_only_with_room_and_unloads_an_idle_engine_first() {
        // Room under the cap (2 of 3 loaded) but not on the GPU: an idle engine goes first.
        let mut st = state(&[
            ("a", true, 0, &[], 5),
            ("b", true, 1, &[], 3),
            ("c", false, 0, &[10], 0),
        ]);
        assert_eq!(next_action(&mut st, 3), Action::Load("c".into()));
        assert_eq!(
            make_room(&mut st, "c", 20 * GIB, 30 * GIB),
            Action::Unload("a".into())
        );
        assert!(st.slots["a"].draining);
        // Unloaded: now it fits.
        let a = st.slots.get_mut("a").unwrap();
        a.loaded = false;
        a.draining = false;
        assert_eq!(
            make_room(&mut st, "c", 50 * GIB, 30 * GIB),
            Action::Load("c".into())
        );
    }

    #[test]
    fn waits_for_a_busy_engine_when_the_gpu_is_full() {
        let mut st = state(&[
            ("a", true, 2, &[], 5),
            ("b", true, 1, &[], 3),
            ("c", false, 0, &[10], 0),
        ]);
        assert_eq!(make_room(&mut st, "c", GIB, 30 * GIB), Action::Wait);
        assert!(st.slots["b"].draining && !st.slots["a"].draining);
        idle(&mut st, "b");
        assert_eq!(
            make_room(&mut st, "c", GIB, 30 * GIB),
            Action::Unload("b".into())
        );
    }

    #[test]
    fn refuses_at_once_with_nothing_to_unload() {
        let mut st = state(&[("a", false, 0, &[], 5), ("c", false, 0, &[10], 0)]);
        let Action::Refuse { model, why } = make_room(&mut st, "c", 12 * GIB, 30 * GIB) else {
            panic!("not refused");
        };
        assert_eq!(model, "c");
        assert!(
            why.contains("30.0 GiB") && why.contains("12.0 GiB free"),
            "{why}"
        );
    }

    #[test]
    fn budget_check_names_the_fields_and_what_fits() {
        // 7B bf16: 12.6 GiB weights, 16 GiB KV, 2 GiB working: 30.6 GiB per engine.
        let b = EngineBudget {
            weights: 12_600 * (GIB / 1000),
            kv_cache: 16 * GIB,
            working: ENGINE_WORKING_BYTES,
        };
        assert!(b.check(4, 139 * GIB).is_ok());
        let why = b.check(4, 100 * GIB).unwrap_err();
        for want in [
            "runtime.merged_gpu_models = 4",
            "runtime.kv_cache_bytes",
            "100.0 GiB free",
            "runtime.merged_gpu_models = 3",
            "runtime.kv_cache_bytes = \"10GiB\"",
        ] {
            assert!(why.contains(want), "{want:?} not in {why}");
        }
        // Not even one.
        let why = b.check(1, 10 * GIB).unwrap_err();
        assert!(why.contains("not even one engine fits"), "{why}");
    }
}

//! Delta residency in tiers: disk (the source, always there) -> CPU cache -> GPU slots.
//!
//! [`Residency`] keeps every registered delta's state and moves deltas between tiers on background
//! load threads, so the engine's scheduling step asks ([`Residency::request`]) and never waits on I/O.
//! What a tier holds is the [`Backend`]'s business; this module only counts bytes and orders work.
//!
//! # Tiers and budgets
//! - **Disk**: the [`Backend::Source`] given at [`Residency::register`]; always there, never evicted.
//! - **CPU cache**: host forms ([`Backend::Host`]) under `cpu_bytes`, counted with
//!   [`Backend::host_bytes`], least recently used first out. The CPU cache is independent of the GPU
//!   tier: a delta on the GPU *may* stay in the CPU cache (while the LRU keeps it), so a GPU eviction
//!   followed by a reload is a CPU hit rather than a disk read. We keep it rather than dropping it on
//!   upload because the CPU budget is there to be used, and a reload is the common case under a GPU
//!   budget smaller than the working set. A host form larger than the whole CPU budget is uploaded
//!   but not cached; a host form being uploaded is held by the load thread even if the cache evicts
//!   it meanwhile (so host memory may exceed the budget by the loads in flight).
//! - **GPU slots**: device forms ([`Backend::Device`]) under `gpu_bytes`, counted with
//!   [`Backend::device_bytes`], reserved *before* the upload starts (bytes in flight count as used).
//!   Room is made by evicting unpinned ready deltas, least recently used first; a pinned delta is
//!   never evicted. When the pinned deltas leave no room, the load waits
//!   ([`DeltaState::Queued`]) and is retried when a delta is unpinned or dropped; a delta larger than
//!   the whole GPU budget fails with a message saying so.
//!
//! # Pinning
//! The engine says once per scheduling step which deltas its sequences in flight use
//! ([`Residency::set_running`]), and pins each delta it admits a new sequence for
//! ([`Residency::pin`], which also confirms the delta is still on the GPU, atomically). The pinned
//! set is exactly that, until the next `set_running`. A sequence is *in flight* from its admission
//! until it finishes, whether or not it is in this step's batch: a host that moves started
//! sequences back to its waiting queue (mistral.rs's length bucketing sets them aside between
//! steps; its paged scheduler preempts them when KV blocks run out) reports them as in flight too
//! (seam 5), so their deltas stay on the GPU for them.
//!
//! # Unregistering: drain, then drop
//! [`Residency::unregister`] of a delta that sequences in flight use (pinned) does not take it away
//! from them: the delta is *draining* ([`DeltaState::Draining`]): it stays on the GPU and activated,
//! a request or a pin for it is refused (new sequences are not admitted), and it is dropped from
//! every tier at the first [`Residency::set_running`] that no longer names it, that is once every
//! sequence admitted before the unregister has finished. Which sequences those are is the engine's
//! to say (it knows them; this module sees names only): the contract is that `set_running` names
//! every sequence in flight, and that a sequence in flight is never presented for admission again.
//!
//! # Callbacks
//! [`Backend::activate`] / [`Backend::deactivate`] run under this module's lock, so that the model's
//! registry always agrees with the residency state (an evict and a reload of the same name cannot
//! reorder). They must be quick (a map insert/remove) and must not call back into the [`Residency`]
//! (that would deadlock). Reads and uploads run without the lock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::metrics::{DeltaMetrics, Metrics, TierMetrics};

/// What the tiers hold and how a delta moves between them: the seam to the real deltas (dz-loader's
/// device deltas) and to the model layers' registry.
///
/// Every method may be called from several threads at once (`read` and `upload` from the load
/// threads, the others under the residency's lock).
pub trait Backend: Send + Sync + 'static {
    /// Where a delta comes from (a path, a checked delta file): the disk tier, always available.
    type Source: Send + Sync + 'static;
    /// A delta in host memory (the CPU cache tier).
    type Host: Send + Sync + 'static;
    /// A delta on the device (the GPU tier), ready for the model layers.
    type Device: Send + Sync + 'static;
    /// A failed read, upload or activation; its `Display` is what [`DeltaState::Failed`] reports.
    type Error: fmt::Display;

    /// Reads a source into host memory (disk -> CPU). Runs on a load thread.
    fn read(&self, name: &str, source: &Self::Source) -> Result<Self::Host, Self::Error>;
    /// Bytes `host` takes in host memory (counted against the CPU budget).
    fn host_bytes(&self, host: &Self::Host) -> u64;
    /// Bytes the device form of `host` will take (counted against the GPU budget, reserved before
    /// [`Backend::upload`] is called, so it must not under-count).
    fn device_bytes(&self, host: &Self::Host) -> u64;
    /// Copies a host form to the device (CPU -> GPU). Runs on a load thread.
    fn upload(&self, name: &str, host: &Self::Host) -> Result<Self::Device, Self::Error>;
    /// `device` is now usable under `name`: make the model layers see it. Called under the
    /// residency's lock (be quick, do not call back). An error fails the load.
    fn activate(&self, name: &str, device: &Arc<Self::Device>) -> Result<(), Self::Error>;
    /// `name` is no longer usable (evicted or unregistered): the layers must stop seeing it. Called
    /// under the residency's lock. Only called for a name that was activated.
    fn deactivate(&self, name: &str);
}

/// Budgets and threads of a [`Residency`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidencyOptions {
    /// GPU bytes for device forms ([`Backend::device_bytes`]).
    pub gpu_bytes: u64,
    /// CPU bytes for the cache of host forms ([`Backend::host_bytes`]); 0 disables the cache.
    pub cpu_bytes: u64,
    /// Background load threads (several loads may be in flight); at least 1.
    pub load_threads: usize,
    /// How long a failed load stays [`DeltaState::Failed`] before a [`Residency::request`] retries
    /// it (so a broken delta is not re-read every scheduling step).
    pub retry_after: Duration,
    /// How long a delta that just reached the GPU is kept from eviction while no sequence has been
    /// admitted for it yet. Without it, when more deltas are wanted than the GPU holds, each load
    /// evicted the previous load's delta before its sequences could start: session 12 served 64
    /// 7B fine-tunes on a GPU that holds 34 at 21.7 tokens/s and 1.6 s a token, most loads wasted.
    /// With it, such a load waits ([`DeltaState::Queued`]) until a delta is used or unpinned.
    pub fresh_grace: Duration,
}

impl Default for ResidencyOptions {
    fn default() -> Self {
        Self {
            gpu_bytes: 8 << 30,
            cpu_bytes: 16 << 30,
            load_threads: 2,
            retry_after: Duration::from_secs(5),
            fresh_grace: Duration::from_secs(5),
        }
    }
}

/// Where a delta stands, as [`Residency::request`] and [`Residency::state`] answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaState {
    /// On the GPU and activated: sequences for it can run.
    Ready,
    /// A load (disk -> CPU -> GPU) is in flight.
    Loading,
    /// Read, but waiting for GPU room: the GPU budget is full of pinned deltas.
    Queued,
    /// Registered, not on the GPU, no load in flight (only [`Residency::state`] answers this;
    /// `request` starts a load instead).
    Idle,
    /// The last load failed with this message; a `request` after `retry_after` tries again.
    Failed(String),
    /// Unregistered and still on the GPU for the sequences in flight that use it (they run on until
    /// they finish, then it is dropped): admits nothing new.
    Draining,
    /// Unregistered and gone (or never loaded): admits nothing.
    Unregistered,
    /// Never registered under this name.
    Unknown,
}

/// What [`Residency::unregister`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unregistered {
    /// The delta is gone from every tier (and deactivated if it was on the GPU).
    Dropped,
    /// Sequences in flight still use it: it admits nothing new, serves them until they finish, and
    /// is dropped at the first [`Residency::set_running`] that no longer names it.
    Draining,
}

enum Gpu<D> {
    Idle,
    Loading,
    Queued,
    Ready { device: Arc<D>, bytes: u64 },
    Failed { message: String, at: Instant },
}

struct Cached<H> {
    host: Arc<H>,
    bytes: u64,
    last_use: u64,
}

struct Entry<B: Backend> {
    /// Distinguishes this registration from an earlier one of the same name (stale jobs).
    generation: u64,
    source: Arc<B::Source>,
    gpu: Gpu<B::Device>,
    gpu_last_use: u64,
    cpu: Option<Cached<B::Host>>,
    /// Unregistered while pinned: dropped once unpinned.
    draining: bool,
    /// Loaded onto the GPU and not yet pinned (no sequence admitted for it since): not evicted until
    /// then or this instant, whichever comes first (see [`ResidencyOptions::fresh_grace`]).
    fresh_until: Option<Instant>,
    /// A [`Residency::request`] (a sequence waits for it) since its last load began or ended: the
    /// load, once done, makes the delta fresh.
    wanted: bool,
}

#[derive(Clone)]
struct Job {
    name: String,
    generation: u64,
}

#[derive(Default)]
struct Counters {
    gpu_hits: u64,
    gpu_misses: u64,
    cpu_hits: u64,
    cpu_misses: u64,
    gpu_loads: u64,
    cpu_loads: u64,
    gpu_load_seconds: f64,
    cpu_load_seconds: f64,
    gpu_evictions: u64,
    cpu_evictions: u64,
    failures: u64,
}

struct State<B: Backend> {
    entries: HashMap<String, Entry<B>>,
    /// Names unregistered (draining or dropped, and not registered again): once dropped, `request`
    /// says `Unregistered`, not `Unknown`, so sequences still waiting for them are refused rather
    /// than run on the base.
    unregistered: HashSet<String>,
    pinned: HashSet<String>,
    jobs: VecDeque<Job>,
    /// Loads waiting for GPU room, oldest first.
    queued: VecDeque<Job>,
    gpu_used: u64,
    gpu_reserved: u64,
    cpu_used: u64,
    tick: u64,
    next_generation: u64,
    counters: Counters,
    shutdown: bool,
}

struct Shared<B: Backend> {
    backend: B,
    options: ResidencyOptions,
    state: Mutex<State<B>>,
    /// Signals the load threads: a job or shutdown.
    work: Condvar,
    /// Signals waiters: some delta's state changed.
    changed: Condvar,
}

/// Delta residency across disk, CPU cache and GPU slots, with background loads (see the module docs).
///
/// All methods take `&self` and are safe to call from several threads; dropping it stops the load
/// threads after the loads in flight finish.
pub struct Residency<B: Backend> {
    shared: Arc<Shared<B>>,
    workers: Vec<JoinHandle<()>>,
}

impl<B: Backend> fmt::Debug for Residency<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("Residency")
            .field("deltas", &st.entries.len())
            .field("gpu_used", &st.gpu_used)
            .field("cpu_used", &st.cpu_used)
            .field("options", &self.shared.options)
            .finish()
    }
}

impl<B: Backend> Residency<B> {
    /// Starts the load threads. Nothing is registered yet.
    pub fn new(backend: B, options: ResidencyOptions) -> Result<Self> {
        if options.load_threads == 0 {
            return Err(Error::NoLoadThreads);
        }
        let shared = Arc::new(Shared {
            backend,
            state: Mutex::new(State {
                entries: HashMap::new(),
                unregistered: HashSet::new(),
                pinned: HashSet::new(),
                jobs: VecDeque::new(),
                queued: VecDeque::new(),
                gpu_used: 0,
                gpu_reserved: 0,
                cpu_used: 0,
                tick: 0,
                next_generation: 0,
                counters: Counters::default(),
                shutdown: false,
            }),
            options,
            work: Condvar::new(),
            changed: Condvar::new(),
        });
        let mut residency = Self {
            shared,
            workers: Vec::new(),
        };
        for i in 0..residency.shared.options.load_threads {
            let shared = Arc::clone(&residency.shared);
            let handle = std::thread::Builder::new()
                .name(format!("dz-delta-load-{i}"))
                .spawn(move || shared.worker())
                .map_err(Error::Spawn)?;
            // On an error above, dropping `residency` stops the threads already started.
            residency.workers.push(handle);
        }
        Ok(residency)
    }

    /// The backend (for its own state: the registry, counters in tests).
    pub fn backend(&self) -> &B {
        &self.shared.backend
    }

    /// The budgets this residency was started with.
    pub fn options(&self) -> &ResidencyOptions {
        &self.shared.options
    }

    /// Registers a delta under `name` (hot: at any time). Nothing is read until it is requested.
    pub fn register(&self, name: &str, source: B::Source) -> Result<()> {
        if name.is_empty() {
            return Err(Error::EmptyName);
        }
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        if let Some(e) = st.entries.get(name) {
            let name = name.to_owned();
            return Err(if e.draining {
                Error::StillDraining { name }
            } else {
                Error::AlreadyRegistered { name }
            });
        }
        let generation = st.next_generation;
        st.next_generation += 1;
        st.unregistered.remove(name);
        st.entries.insert(
            name.to_owned(),
            Entry {
                generation,
                source: Arc::new(source),
                gpu: Gpu::Idle,
                gpu_last_use: 0,
                cpu: None,
                draining: false,
                fresh_until: None,
                wanted: false,
            },
        );
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Unregisters `name` (hot). A delta on the GPU that sequences in flight use (pinned) stops being
    /// admitted, stays for them and is dropped once no longer pinned ([`Unregistered::Draining`]);
    /// otherwise it is dropped now, an in-flight load included (its result is discarded).
    pub fn unregister(&self, name: &str) -> Result<Unregistered> {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let unknown = || Error::UnknownDelta {
            name: name.to_owned(),
        };
        let entry = st.entries.get_mut(name).ok_or_else(unknown)?;
        if entry.draining {
            return Err(unknown());
        }
        let out = if matches!(entry.gpu, Gpu::Ready { .. }) && st.pinned.contains(name) {
            entry.draining = true;
            st.unregistered.insert(name.to_owned());
            Unregistered::Draining
        } else {
            self.shared.drop_entry(st, name);
            Unregistered::Dropped
        };
        self.shared.changed.notify_all();
        Ok(out)
    }

    /// Where `name` stands, starting a background load when it is not on the GPU (and not failed
    /// within `retry_after`). Never blocks on I/O. Counts a GPU hit when the answer is
    /// [`DeltaState::Ready`], a miss otherwise (for a registered delta).
    pub fn request(&self, name: &str) -> DeltaState {
        self.request_as(name, true)
    }

    /// [`Residency::request`] for a delta no sequence waits for yet (a hot load's prefetch): the same
    /// load, but once on the GPU the delta is an ordinary LRU delta, not kept by
    /// [`ResidencyOptions::fresh_grace`] (a later `request` for a waiting sequence, before the load
    /// ends, makes it fresh after all).
    pub fn prefetch(&self, name: &str) -> DeltaState {
        self.request_as(name, false)
    }

    fn request_as(&self, name: &str, wanted: bool) -> DeltaState {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let tick = st.bump();
        let Some(e) = st.entries.get_mut(name) else {
            return st.absent_state(name);
        };
        if e.draining {
            return DeltaState::Draining;
        }
        let retry = match &e.gpu {
            Gpu::Ready { .. } => {
                e.gpu_last_use = tick;
                st.counters.gpu_hits += 1;
                return DeltaState::Ready;
            }
            Gpu::Loading | Gpu::Queued => false,
            Gpu::Idle => true,
            Gpu::Failed { at, .. } => at.elapsed() >= self.shared.options.retry_after,
        };
        st.counters.gpu_misses += 1;
        e.wanted |= wanted;
        if retry {
            e.gpu = Gpu::Loading;
            st.jobs.push_back(Job {
                name: name.to_owned(),
                generation: e.generation,
            });
            self.shared.work.notify_one();
            self.shared.changed.notify_all();
        }
        state_of(e)
    }

    /// Where `name` stands, without side effects (no load, no counters, no LRU touch).
    pub fn state(&self, name: &str) -> DeltaState {
        let st = self.shared.lock();
        st.state(name)
    }

    /// Whether `name` failed to load and a [`Residency::request`] now would retry it.
    pub fn retryable(&self, name: &str) -> bool {
        let st = self.shared.lock();
        st.entries.get(name).is_some_and(|e| {
            !e.draining
                && matches!(&e.gpu, Gpu::Failed { at, .. }
                    if at.elapsed() >= self.shared.options.retry_after)
        })
    }

    /// The device form of `name` when it is ready (for the host seam; the layers normally see it
    /// through [`Backend::activate`]).
    pub fn device(&self, name: &str) -> Option<Arc<B::Device>> {
        let st = self.shared.lock();
        match &st.entries.get(name)?.gpu {
            Gpu::Ready { device, .. } => Some(Arc::clone(device)),
            _ => None,
        }
    }

    /// Replaces the pinned set with the deltas the sequences in flight use (call once per scheduling
    /// step with every sequence admitted and not finished, in the batch or waiting again;
    /// names that are not deltas are ignored). Unpinning may free room for queued loads and drops
    /// draining deltas that are no longer used.
    pub fn set_running<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let tick = st.bump();
        let new: HashSet<String> = names.into_iter().map(str::to_owned).collect();
        let shrank = st.pinned.iter().any(|n| !new.contains(n));
        for n in &new {
            if let Some(e) = st.entries.get_mut(n) {
                e.gpu_last_use = tick;
                e.fresh_until = None;
            }
        }
        st.pinned = new;
        // A fresh delta whose grace ran out is evictable again: loads waiting for room retry.
        let now = Instant::now();
        let mut expired = false;
        for e in st.entries.values_mut() {
            if e.fresh_until.is_some_and(|t| t <= now) {
                e.fresh_until = None;
                expired = true;
            }
        }
        let expired = expired && !st.queued.is_empty();
        if expired && !shrank {
            self.shared.wake_queued(st);
        }
        if shrank {
            let done: Vec<String> = st
                .entries
                .iter()
                .filter(|(n, e)| e.draining && !st.pinned.contains(*n))
                .map(|(n, _)| n.clone())
                .collect();
            for n in done {
                self.shared.drop_entry(st, &n);
            }
            self.shared.wake_queued(st);
            self.shared.changed.notify_all();
        }
    }

    /// Drops every draining delta now, pinned or not; returns how many. For a caller that knows no
    /// sequence in flight uses them (a server with no generation request open): otherwise a draining
    /// delta waits for the next [`Residency::set_running`], which an idle engine never calls.
    pub fn drop_draining(&self) -> usize {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let done: Vec<String> = st
            .entries
            .iter()
            .filter(|(_, e)| e.draining)
            .map(|(n, _)| n.clone())
            .collect();
        for n in &done {
            st.pinned.remove(n);
            self.shared.drop_entry(st, n);
        }
        if !done.is_empty() {
            self.shared.wake_queued(st);
            self.shared.changed.notify_all();
        }
        done.len()
    }

    /// Pins `name` until the next [`Residency::set_running`] if it is ready (and registered);
    /// returns whether it did. The scheduler calls it for each delta it admits a new sequence for,
    /// so an admitted delta cannot be evicted between the admission and the next step.
    pub fn pin(&self, name: &str) -> bool {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let tick = st.bump();
        match st.entries.get_mut(name) {
            Some(e) if !e.draining && matches!(e.gpu, Gpu::Ready { .. }) => {
                e.gpu_last_use = tick;
                e.fresh_until = None;
                st.pinned.insert(name.to_owned());
                true
            }
            _ => false,
        }
    }

    /// Whether `name` is a delta this residency knows (registered, or draining).
    pub fn contains(&self, name: &str) -> bool {
        self.shared.lock().entries.contains_key(name)
    }

    /// Blocks until `name`'s state satisfies `done`, or `timeout` passes; returns the last state.
    /// For callers that want to wait for a load (an admin endpoint, tests); the scheduling step
    /// never calls it.
    pub fn wait_until(
        &self,
        name: &str,
        timeout: Duration,
        done: impl Fn(&DeltaState) -> bool,
    ) -> DeltaState {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            let s = st.state(name);
            let now = Instant::now();
            if done(&s) || now >= deadline {
                return s;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Blocks until some delta's state changes (a load finished or failed, a load started, ...) or
    /// `timeout` passes. For a host loop with nothing to run but sequences waiting for loads: without
    /// it, such a loop asks [`Residency::request`] again at once (session 8 counted ~1 million GPU
    /// "misses" a second: a spinning engine thread).
    pub fn wait_for_change(&self, timeout: Duration) {
        let st = self.shared.lock();
        drop(
            self.shared
                .changed
                .wait_timeout(st, timeout)
                .unwrap_or_else(PoisonError::into_inner),
        );
    }

    /// Blocks until `name` is not [`DeltaState::Loading`] (ready, queued, failed, ...), or `timeout`
    /// passes; returns the state.
    pub fn wait(&self, name: &str, timeout: Duration) -> DeltaState {
        self.wait_until(name, timeout, |s| *s != DeltaState::Loading)
    }

    /// A snapshot of the counters, the bytes per tier and every delta's state.
    pub fn metrics(&self) -> Metrics {
        let st = self.shared.lock();
        let c = &st.counters;
        let mut deltas: Vec<DeltaMetrics> = st
            .entries
            .iter()
            .map(|(name, e)| DeltaMetrics {
                name: name.clone(),
                state: state_of(e),
                registered: !e.draining,
                pinned: st.pinned.contains(name),
                gpu_bytes: match &e.gpu {
                    Gpu::Ready { bytes, .. } => *bytes,
                    _ => 0,
                },
                cpu_bytes: e.cpu.as_ref().map_or(0, |c| c.bytes),
            })
            .collect();
        deltas.sort_by(|a, b| a.name.cmp(&b.name));
        Metrics {
            gpu: TierMetrics {
                hits: c.gpu_hits,
                misses: c.gpu_misses,
                loads: c.gpu_loads,
                load_seconds: c.gpu_load_seconds,
                evictions: c.gpu_evictions,
                bytes_used: st.gpu_used + st.gpu_reserved,
                bytes_budget: self.shared.options.gpu_bytes,
            },
            cpu: TierMetrics {
                hits: c.cpu_hits,
                misses: c.cpu_misses,
                loads: c.cpu_loads,
                load_seconds: c.cpu_load_seconds,
                evictions: c.cpu_evictions,
                bytes_used: st.cpu_used,
                bytes_budget: self.shared.options.cpu_bytes,
            },
            load_failures: c.failures,
            loads_in_flight: st
                .entries
                .values()
                .filter(|e| matches!(e.gpu, Gpu::Loading))
                .count(),
            deltas,
        }
    }

    /// [`Residency::metrics`] as Prometheus text (see [`Metrics::to_prometheus`]).
    pub fn to_prometheus(&self) -> String {
        self.metrics().to_prometheus()
    }
}

impl<B: Backend> Drop for Residency<B> {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            // A load thread that panicked has nothing left to clean up.
            let _ = w.join();
        }
    }
}

fn state_of<B: Backend>(e: &Entry<B>) -> DeltaState {
    match &e.gpu {
        Gpu::Ready { .. } => DeltaState::Ready,
        Gpu::Loading => DeltaState::Loading,
        Gpu::Queued => DeltaState::Queued,
        Gpu::Idle => DeltaState::Idle,
        Gpu::Failed { message, .. } => DeltaState::Failed(message.clone()),
    }
}

impl<B: Backend> State<B> {
    fn bump(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn absent_state(&self, name: &str) -> DeltaState {
        if self.unregistered.contains(name) {
            DeltaState::Unregistered
        } else {
            DeltaState::Unknown
        }
    }

    fn state(&self, name: &str) -> DeltaState {
        match self.entries.get(name) {
            None => self.absent_state(name),
            Some(e) if e.draining => DeltaState::Draining,
            Some(e) => state_of(e),
        }
    }

    /// The entry `job` is for, if it is still that registration and still wants its load.
    fn live(&mut self, job: &Job) -> Option<&mut Entry<B>> {
        self.entries
            .get_mut(&job.name)
            .filter(|e| e.generation == job.generation && matches!(e.gpu, Gpu::Loading))
    }
}

impl<B: Backend> Shared<B> {
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        // A panic under the lock (in a backend callback) leaves the state consistent: every
        // mutation completes before a callback runs or is a plain assignment after it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn worker(&self) {
        loop {
            let job = {
                let mut st = self.lock();
                loop {
                    if st.shutdown {
                        return;
                    }
                    if let Some(j) = st.jobs.pop_front() {
                        break j;
                    }
                    st = self.work.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
            };
            self.run(job);
        }
    }

    /// One load: CPU cache or disk, then GPU room, then the upload and activation.
    fn run(&self, job: Job) {
        // 1. The host form: from the CPU cache, or the source to read it from.
        let cached = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let tick = st.bump();
            let Some(e) = st.live(&job) else { return };
            match &mut e.cpu {
                Some(c) => {
                    c.last_use = tick;
                    let host = Arc::clone(&c.host);
                    st.counters.cpu_hits += 1;
                    Ok(host)
                }
                None => {
                    let source = Arc::clone(&e.source);
                    st.counters.cpu_misses += 1;
                    Err(source)
                }
            }
        };
        let host = match cached {
            Ok(host) => host,
            Err(source) => {
                let t = Instant::now();
                let read = guarded(|| self.backend.read(&job.name, &source));
                let seconds = t.elapsed().as_secs_f64();
                let mut guard = self.lock();
                let st = &mut *guard;
                match read {
                    Err(message) => return self.fail(st, &job, format!("read: {message}")),
                    Ok(host) => {
                        st.counters.cpu_loads += 1;
                        st.counters.cpu_load_seconds += seconds;
                        let host = Arc::new(host);
                        self.cache_host(st, &job, &host);
                        host
                    }
                }
            }
        };

        // 2. GPU room, reserved before the upload.
        let need = {
            let mut guard = self.lock();
            let st = &mut *guard;
            if st.live(&job).is_none() {
                return;
            }
            let need = self.backend.device_bytes(&host);
            let budget = self.options.gpu_bytes;
            if need > budget {
                let message = format!(
                    "needs {need} bytes on the GPU, more than the whole GPU budget of {budget} bytes"
                );
                return self.fail(st, &job, message);
            }
            if !self.make_room(st, need) {
                if let Some(e) = st.live(&job) {
                    e.gpu = Gpu::Queued;
                }
                st.queued.push_back(job);
                self.changed.notify_all();
                return;
            }
            st.gpu_reserved += need;
            need
        };

        // 3. Upload, then activate under the lock.
        let t = Instant::now();
        let uploaded = guarded(|| self.backend.upload(&job.name, &host));
        let seconds = t.elapsed().as_secs_f64();
        let mut guard = self.lock();
        let st = &mut *guard;
        st.gpu_reserved -= need;
        let device = match uploaded {
            Ok(d) => Arc::new(d),
            Err(message) => {
                self.fail(st, &job, format!("upload: {message}"));
                return self.wake_queued(st);
            }
        };
        if st.live(&job).is_none() {
            // Unregistered meanwhile: the device form is dropped here, its bytes are free again.
            drop(device);
            self.changed.notify_all();
            return self.wake_queued(st);
        }
        if let Err(message) = self.backend.activate(&job.name, &device) {
            self.fail(st, &job, format!("activate: {message}"));
            return self.wake_queued(st);
        }
        let tick = st.bump();
        let fresh_until = Instant::now() + self.options.fresh_grace;
        if let Some(e) = st.live(&job) {
            e.gpu = Gpu::Ready {
                device,
                bytes: need,
            };
            e.gpu_last_use = tick;
            e.fresh_until = e.wanted.then_some(fresh_until);
            e.wanted = false;
        }
        st.gpu_used += need;
        st.counters.gpu_loads += 1;
        st.counters.gpu_load_seconds += seconds;
        self.changed.notify_all();
        // A load queued behind this one's reservation may fit now (these bytes are evictable
        // unless pinned).
        self.wake_queued(st);
    }

    fn fail(&self, st: &mut State<B>, job: &Job, message: String) {
        if let Some(e) = st.live(job) {
            e.gpu = Gpu::Failed {
                message,
                at: Instant::now(),
            };
            st.counters.failures += 1;
            self.changed.notify_all();
        }
    }

    /// Puts a freshly read host form in the CPU cache, evicting least recently used ones; a form
    /// larger than the whole budget is not cached.
    fn cache_host(&self, st: &mut State<B>, job: &Job, host: &Arc<B::Host>) {
        let bytes = self.backend.host_bytes(host);
        let budget = self.options.cpu_bytes;
        if bytes > budget || st.live(job).is_none() {
            return;
        }
        while st.cpu_used + bytes > budget {
            let victim = st
                .entries
                .iter()
                .filter_map(|(n, e)| e.cpu.as_ref().map(|c| (c.last_use, n)))
                .min()
                .map(|(_, n)| n.clone());
            let Some(victim) = victim else { break };
            if let Some(c) = st.entries.get_mut(&victim).and_then(|e| e.cpu.take()) {
                st.cpu_used -= c.bytes;
                st.counters.cpu_evictions += 1;
            }
        }
        let tick = st.bump();
        if let Some(e) = st.live(job) {
            e.cpu = Some(Cached {
                host: Arc::clone(host),
                bytes,
                last_use: tick,
            });
            st.cpu_used += bytes;
        }
    }

    /// Evicts unpinned ready deltas, least recently used first, until `need` bytes are free; evicts
    /// nothing and returns false when even evicting all of them would not do.
    fn make_room(&self, st: &mut State<B>, need: u64) -> bool {
        let budget = self.options.gpu_bytes;
        let mut free = budget.saturating_sub(st.gpu_used + st.gpu_reserved);
        if free >= need {
            return true;
        }
        let now = Instant::now();
        let mut candidates: Vec<(u64, String, u64)> = st
            .entries
            .iter()
            .filter(|(n, _)| !st.pinned.contains(*n))
            .filter(|(_, e)| e.fresh_until.is_none_or(|t| t <= now))
            .filter_map(|(n, e)| match &e.gpu {
                Gpu::Ready { bytes, .. } => Some((e.gpu_last_use, n.clone(), *bytes)),
                _ => None,
            })
            .collect();
        candidates.sort();
        let mut victims = Vec::new();
        for (_, name, bytes) in candidates {
            if free >= need {
                break;
            }
            free += bytes;
            victims.push(name);
        }
        if free < need {
            return false;
        }
        for name in victims {
            if let Some(e) = st.entries.get_mut(&name) {
                if let Gpu::Ready { bytes, .. } = e.gpu {
                    e.gpu = Gpu::Idle;
                    st.gpu_used -= bytes;
                    st.counters.gpu_evictions += 1;
                    self.backend.deactivate(&name);
                }
            }
        }
        true
    }

    /// Sends the loads waiting for GPU room back to the load threads (room may have been freed).
    fn wake_queued(&self, st: &mut State<B>) {
        let mut woke = false;
        while let Some(job) = st.queued.pop_front() {
            if let Some(e) = st
                .entries
                .get_mut(&job.name)
                .filter(|e| e.generation == job.generation && matches!(e.gpu, Gpu::Queued))
            {
                e.gpu = Gpu::Loading;
                st.jobs.push_back(job);
                woke = true;
            }
        }
        if woke {
            self.work.notify_all();
            self.changed.notify_all();
        }
    }

    /// Removes `name` from every tier (deactivating it if it was on the GPU) and remembers it as
    /// unregistered.
    fn drop_entry(&self, st: &mut State<B>, name: &str) {
        let Some(e) = st.entries.remove(name) else {
            return;
        };
        if let Gpu::Ready { bytes, .. } = e.gpu {
            st.gpu_used -= bytes;
            self.backend.deactivate(name);
        }
        if let Some(c) = e.cpu {
            st.cpu_used -= c.bytes;
        }
        st.pinned.remove(name);
        st.unregistered.insert(name.to_owned());
        self.wake_queued(st);
    }
}

/// Runs a backend call, turning a panic into an error message (a load thread must survive a
/// backend bug, and the delta must not stay `Loading` forever).
fn guarded<T, E: fmt::Display>(f: impl FnOnce() -> Result<T, E>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(match panic.downcast_ref::<&str>() {
            Some(s) => format!("panicked: {s}"),
            None => match panic.downcast_ref::<String>() {
                Some(s) => format!("panicked: {s}"),
                None => "panicked".to_owned(),
            },
        }),
    }
}

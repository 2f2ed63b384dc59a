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
//! - `unload_model` returns before the engine has let go of its weights; the worker waits for the
//!   engine's request channel to close (the engine has exited and dropped its pipeline) before it
//!   loads the next model, so K + 1 models are never on the device.
//!
//! Wanted models are loaded oldest waiting request first. One load or unload runs at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mistralrs_core::MistralRs;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// One managed model.
#[derive(Debug, Default)]
struct Slot {
    loaded: bool,
    /// Leases held (requests in flight on its engine).
    in_flight: usize,
    /// Requests waiting for it, by ticket (arrival order).
    waiting: BTreeSet<u64>,
    /// No new leases: it is about to be unloaded (idle), or will be once its leases end (busy).
    draining: bool,
    last_used: u64,
}

#[derive(Debug, Default)]
struct State {
    slots: BTreeMap<String, Slot>,
    clock: u64,
    /// Tickets whose load failed, with why (their requests get the error).
    failed: BTreeMap<u64, String>,
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
    /// Reloads that failed.
    pub load_failures: u64,
}

struct Inner {
    mistralrs: Arc<MistralRs>,
    capacity: usize,
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
}

impl Drop for EngineLease {
    fn drop(&mut self) {
        if let Some(s) = self.inner.lock().slots.get_mut(&self.name) {
            s.in_flight = s.in_flight.saturating_sub(1);
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
    /// (at most `capacity`), the rest unloaded.
    pub fn new(
        mistralrs: Arc<MistralRs>,
        capacity: usize,
        models: &[String],
        loaded: &[String],
    ) -> Result<Arc<Self>> {
        if capacity == 0 || loaded.len() > capacity {
            return Err(Error::Host(format!(
                "{} merged engines loaded under a cap of {capacity}",
                loaded.len()
            )));
        }
        let mut st = State::default();
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

    /// Waits until model `name`'s engine is loaded (and not draining), then holds it until the lease
    /// is dropped. Fails only for a name not managed here, a reload that failed, or a stopped swap.
    pub async fn acquire(&self, name: &str) -> Result<EngineLease> {
        let inner = &*self.inner;
        let mut rx = inner.changed.subscribe();
        let mut ticket: Option<Ticket<'_>> = None;
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
                let slot = st.slots.get_mut(name).ok_or_else(|| {
                    Error::Host(format!(
                        "{name:?} is not a merged model with a swapped engine"
                    ))
                })?;
                if slot.loaded && !slot.draining {
                    slot.in_flight += 1;
                    slot.last_used = tick;
                    drop(st);
                    drop(ticket);
                    return Ok(EngineLease {
                        inner: self.inner.clone(),
                        name: name.to_string(),
                    });
                }
                if ticket.is_none() {
                    slot.waiting.insert(tick);
                    ticket = Some(Ticket {
                        inner,
                        name,
                        id: tick,
                    });
                    drop(st);
                    // Wake the worker: a new wanted model.
                    inner.bump();
                }
            }
            if rx.changed().await.is_err() {
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
        }
    }
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
    /// Nothing until the state changes.
    Wait,
}

/// The next step, decided under the lock (marks an engine to unload as draining, so that no lease is
/// taken on it meanwhile).
fn next_action(st: &mut State, capacity: usize) -> Action {
    // The wanted model: not loaded, with the oldest waiting request.
    let target = st
        .slots
        .iter()
        .filter(|(_, s)| !s.loaded)
        .filter_map(|(n, s)| s.waiting.first().map(|&t| (t, n.clone())))
        .min();
    let Some((_, target)) = target else {
        // Nobody waits for an unloaded model: drain nothing.
        for s in st.slots.values_mut() {
            s.draining = false;
        }
        return Action::Wait;
    };
    if st.loaded() < capacity {
        return Action::Load(target);
    }
    // An idle engine: a draining one first (it was chosen before), else the least recently used.
    let idle = st
        .slots
        .iter()
        .filter(|(_, s)| s.loaded && s.in_flight == 0)
        .min_by_key(|(_, s)| (!s.draining, s.last_used))
        .map(|(n, _)| n.clone());
    if let Some(victim) = idle {
        if let Some(s) = st.slots.get_mut(&victim) {
            s.draining = true;
        }
        return Action::Unload(victim);
    }
    // Every engine is busy: drain the least recently used one (one at a time).
    if !st.slots.values().any(|s| s.loaded && s.draining) {
        if let Some(s) = st
            .slots
            .values_mut()
            .filter(|s| s.loaded)
            .min_by_key(|s| s.last_used)
        {
            s.draining = true;
        }
    }
    Action::Wait
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
    let mut rx = inner.changed.subscribe();
    loop {
        rx.borrow_and_update();
        let action = {
            let mut st = inner.lock();
            if st.stop {
                return;
            }
            next_action(&mut st, inner.capacity)
        };
        match action {
            Action::Wait => {
                // Also wake now and then: a change is always bumped, this only bounds a lost one.
                let _ = rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(1), rx.changed()).await
                });
            }
            Action::Unload(name) => {
                let t0 = Instant::now();
                let unloaded = unload(inner, &rt, &name);
                {
                    let mut st = inner.lock();
                    if let Some(s) = st.slots.get_mut(&name) {
                        s.draining = false;
                        if unloaded.is_ok() {
                            s.loaded = false;
                        }
                    }
                }
                if let Err(e) = unloaded {
                    eprintln!("dz-loader: unloading {name}: {e}");
                    // Not in a tight loop: the next decision may pick it again.
                    std::thread::sleep(Duration::from_millis(100));
                } else {
                    inner.unloads.fetch_add(1, Ordering::Relaxed);
                    inner
                        .unload_nanos
                        .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                inner.bump();
            }
            Action::Load(name) => {
                let t0 = Instant::now();
                let loaded = rt
                    .block_on(inner.mistralrs.reload_model(&name))
                    .map_err(|e| e.to_string());
                {
                    let mut st = inner.lock();
                    match &loaded {
                        Ok(()) => {
                            if let Some(s) = st.slots.get_mut(&name) {
                                s.loaded = true;
                            }
                        }
                        Err(why) => {
                            // The requests waiting now get the error; later ones try again.
                            let tickets: Vec<u64> = st
                                .slots
                                .get_mut(&name)
                                .map(|s| std::mem::take(&mut s.waiting).into_iter().collect())
                                .unwrap_or_default();
                            for t in tickets {
                                st.failed.insert(t, why.clone());
                            }
                        }
                    }
                }
                match loaded {
                    Ok(()) => {
                        inner.loads.fetch_add(1, Ordering::Relaxed);
                        inner
                            .load_nanos
                            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        // The host's default engine is unset when every engine was unloaded (K = 1
                        // and no base), and a reload does not set it: requests naming no model need one.
                        if matches!(inner.mistralrs.get_default_model_id(), Ok(None)) {
                            let _ = inner.mistralrs.set_default_model_id(&name);
                        }
                    }
                    Err(e) => {
                        inner.load_failures.fetch_add(1, Ordering::Relaxed);
                        eprintln!("dz-loader: reloading {name}: {e}");
                    }
                }
                inner.bump();
            }
        }
    }
}

/// Unloads `name` through the host and waits until its engine has exited (its request channel
/// closes when the engine is dropped, with its pipeline: the model's weights and KV cache).
fn unload(inner: &Inner, rt: &tokio::runtime::Runtime, name: &str) -> Result<()> {
    let m = &inner.mistralrs;
    let sender = m
        .get_sender(Some(name))
        .map_err(|e| Error::Host(e.to_string()))?;
    m.unload_model(name)
        .map_err(|e| Error::Host(e.to_string()))?;
    rt.block_on(sender.closed());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(slots: &[(&str, bool, usize, &[u64], u64)]) -> State {
        let mut st = State::default();
        for &(n, loaded, in_flight, waiting, last_used) in slots {
            st.slots.insert(
                n.to_string(),
                Slot {
                    loaded,
                    in_flight,
                    waiting: waiting.iter().copied().collect(),
                    draining: false,
                    last_used,
                },
            );
        }
        st.clock = 100;
        st
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
        st.slots.get_mut("b").unwrap().in_flight = 0;
        assert_eq!(next_action(&mut st, 2), Action::Unload("b".into()));
        // Nobody waits any more: nothing drains.
        let mut st = state(&[
            ("a", true, 2, &[], 5),
            ("b", true, 1, &[], 3),
            ("c", false, 0, &[10], 0),
        ]);
        assert_eq!(next_action(&mut st, 2), Action::Wait);
        st.slots.get_mut("c").unwrap().waiting.clear();
        assert_eq!(next_action(&mut st, 2), Action::Wait);
        assert!(st.slots.values().all(|s| !s.draining));
    }
}

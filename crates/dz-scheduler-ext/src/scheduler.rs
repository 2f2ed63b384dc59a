//! [`Scheduler`]: residency and admission behind one `&self` call per scheduling step.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::admission::{Admission, AdmissionStats, Decision, DeltaLookup, Policy, Readiness};
use crate::error::Result;
use crate::metrics::Metrics;
use crate::residency::{Backend, DeltaState, Residency, ResidencyOptions, Unregistered};

/// Everything a [`Scheduler`] is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerOptions {
    /// Most distinct deltas in one step, running ones included (each costs one SBMM segment per
    /// layer). Default 8, as `[scheduler] max_deltas_per_step` in the config.
    pub max_deltas_per_step: usize,
    /// GPU bytes for resident deltas (`[runtime] gpu_delta_bytes`). Default 8 GiB.
    pub gpu_bytes: u64,
    /// CPU bytes for the cache of deltas (`[runtime] cpu_cache_bytes`). Default 16 GiB.
    pub cpu_bytes: u64,
    /// Background load threads. Default 2.
    pub load_threads: usize,
    /// How long a failed load is reported before a new request retries it. Default 5 s.
    pub retry_after: Duration,
    /// How long a delta that just reached the GPU is kept from eviction until a sequence is admitted
    /// for it ([`ResidencyOptions::fresh_grace`]). Default 5 s.
    pub fresh_grace: Duration,
    /// The admission order. Default [`Policy::Fair`].
    pub policy: Policy,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        let r = ResidencyOptions::default();
        Self {
            max_deltas_per_step: 8,
            gpu_bytes: r.gpu_bytes,
            cpu_bytes: r.cpu_bytes,
            load_threads: r.load_threads,
            retry_after: r.retry_after,
            fresh_grace: r.fresh_grace,
            policy: Policy::Fair,
        }
    }
}

/// A snapshot of a [`Scheduler`]: the residency's metrics and the admission counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerMetrics {
    /// Tiers and deltas.
    pub residency: Metrics,
    /// Admission counters.
    pub admission: AdmissionStats,
}

impl SchedulerMetrics {
    /// Both parts as Prometheus text.
    pub fn to_prometheus(&self) -> String {
        let mut out = self.residency.to_prometheus();
        out.push_str(&self.admission.to_prometheus());
        out
    }

    /// [`SchedulerMetrics::to_prometheus`] with the series named `deltazip_<subject>_*` and
    /// `deltazip_<subject>_scheduler_*` (a second scheduler in one process).
    pub fn to_prometheus_named(&self, subject: &str) -> String {
        let mut out = self.residency.to_prometheus_named(subject);
        out.push_str(
            &self
                .admission
                .to_prometheus_named(&format!("{subject}_scheduler")),
        );
        out
    }
}

/// Delta residency and admission across fine-tunes, for the host engine's scheduling step.
///
/// `Send + Sync`: the engine calls [`Scheduler::admit`] once per step while the server registers
/// and unregisters deltas and reads metrics from other threads. One scheduler per engine (per
/// device): each `admit` replaces the pinned set with that call's sequences in flight.
pub struct Scheduler<B: Backend> {
    residency: Residency<B>,
    admission: Mutex<Admission>,
}

impl<B: Backend> fmt::Debug for Scheduler<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("residency", &self.residency)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Scheduler<B> {
    /// Starts the residency's load threads; no delta is registered yet.
    pub fn new(backend: B, options: SchedulerOptions) -> Result<Self> {
        let residency = Residency::new(
            backend,
            ResidencyOptions {
                gpu_bytes: options.gpu_bytes,
                cpu_bytes: options.cpu_bytes,
                load_threads: options.load_threads,
                retry_after: options.retry_after,
                fresh_grace: options.fresh_grace,
            },
        )?;
        Ok(Self {
            residency,
            admission: Mutex::new(Admission::new(options.policy, options.max_deltas_per_step)),
        })
    }

    /// The residency (states, waits, device forms, the backend).
    pub fn residency(&self) -> &Residency<B> {
        &self.residency
    }

    /// Registers a delta (hot); see [`Residency::register`].
    pub fn register(&self, name: &str, source: B::Source) -> Result<()> {
        self.residency.register(name, source)
    }

    /// Unregisters a delta (hot); see [`Residency::unregister`].
    pub fn unregister(&self, name: &str) -> Result<Unregistered> {
        self.residency.unregister(name)
    }

    /// One scheduling step: which `waiting` sequences start, one bool each. `running` and `waiting`
    /// name each sequence's fine-tune (`None`: the base; a name that is not a registered delta,
    /// such as a merged model served by another engine, is treated as the base: admitted, no delta).
    /// Pins the running sequences' deltas and those admitted, and starts loads for waiting ones.
    /// Sequences that [`Scheduler::admit_decisions`] would refuse are `false` here: a host that
    /// only reads bools leaves them waiting.
    ///
    /// The host's side of the contract: `running` names every sequence *in flight* (admitted by an
    /// earlier step and not finished), in this step's batch or not: a sequence the host moved back
    /// to its waiting queue (mistral.rs sets sequences aside between steps by length, and preempts
    /// them when paged KV blocks run out; seams 5 and 5b in ARCHITECTURE.md) is `running`, and
    /// rejoins without being asked again. `waiting` names only sequences that have not started. So
    /// a sequence, once admitted, keeps its delta until it finishes: a delta unregistered meanwhile
    /// drains ([`Residency::unregister`]) and only sequences asked about after the unregister are
    /// refused; a host that put a started sequence back in `waiting` would have it refused
    /// mid-stream.
    pub fn admit(
        &self,
        running: &[Option<&str>],
        waiting: &[Option<&str>],
        free_slots: usize,
    ) -> Vec<bool> {
        self.admit_decisions(running, waiting, free_slots)
            .into_iter()
            .map(|d| d == Decision::Admit)
            .collect()
    }

    /// [`Scheduler::admit`] with the reason for each sequence left out: [`Decision::Refuse`] names a
    /// delta that failed to load or was unregistered, for the host to end that sequence with an
    /// error.
    pub fn admit_decisions(
        &self,
        running: &[Option<&str>],
        waiting: &[Option<&str>],
        free_slots: usize,
    ) -> Vec<Decision> {
        let mut admission = self
            .admission
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.residency
            .set_running(running.iter().flatten().copied());
        admission.decide(running, waiting, free_slots, &self.residency)
    }

    /// A snapshot of the tiers, the deltas and the admission counters.
    pub fn metrics(&self) -> SchedulerMetrics {
        let admission = self
            .admission
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stats();
        SchedulerMetrics {
            residency: self.residency.metrics(),
            admission,
        }
    }

    /// [`Scheduler::metrics`] as Prometheus text.
    pub fn to_prometheus(&self) -> String {
        self.metrics().to_prometheus()
    }

    /// [`Scheduler::metrics`] as Prometheus text under `deltazip_<subject>_*` names
    /// ([`SchedulerMetrics::to_prometheus_named`]).
    pub fn to_prometheus_named(&self, subject: &str) -> String {
        self.metrics().to_prometheus_named(subject)
    }
}

impl<B: Backend> DeltaLookup for Residency<B> {
    fn is_delta(&self, name: &str) -> bool {
        self.contains(name)
    }

    fn request(&self, name: &str) {
        Residency::request(self, name);
    }

    fn peek(&self, name: &str) -> Readiness {
        if self.retryable(name) {
            return Readiness::Loading;
        }
        readiness(name, self.state(name))
    }

    fn pin(&self, name: &str) -> bool {
        Residency::pin(self, name)
    }
}

fn readiness(name: &str, state: DeltaState) -> Readiness {
    match state {
        DeltaState::Ready => Readiness::Ready,
        DeltaState::Loading | DeltaState::Idle => Readiness::Loading,
        DeltaState::Queued => Readiness::NoRoom,
        DeltaState::Failed(m) => Readiness::Refused(format!("delta {name:?} failed to load: {m}")),
        // A draining delta still serves the sequences in flight (they are `running`, never asked
        // about again); a sequence asked about now has not started: it is new to the delta.
        DeltaState::Draining | DeltaState::Unregistered => {
            Readiness::Refused(format!("delta {name:?} was unregistered"))
        }
        DeltaState::Unknown => Readiness::NotADelta,
    }
}

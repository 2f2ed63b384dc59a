//! Where a multi-tenant forward pass spends its time (`DZ_PROFILE=1`), for the serving benchmark's
//! question "what bounds dz": the base's linear layers, the delta work of the linear layers (sbmm), the
//! embedding and norm deltas, and the CPU bookkeeping of finding each row's fine-tune. The linear parts
//! of prompt steps (more than one token per sequence) count apart (`*_prefill`) from decode steps'.
//!
//! Off by default and free when off (one relaxed atomic load per layer). Three modes:
//! - `DZ_PROFILE=1` (device): every measured part is bracketed by device synchronizations, so its time is
//!   the part's own (GPU work queued before it finishes first) at the cost of the overlap between CPU and
//!   GPU: a profiled server runs slower than an unprofiled one, and the parts say how the time splits, not
//!   how fast it can go.
//! - `DZ_PROFILE=host`: no synchronization; each part's time is the CPU's, issuing its work (lookups,
//!   tables, launches). The server runs at its own speed. Where the parts' host time approaches the step
//!   interval, the CPU, not the GPU, bounds the step.
//! - `DZ_PROFILE=wait`: host mode, plus one wait where the host's sampling waits anyway: right after
//!   the output head, a one-byte copy to the host, timed as `head_wait` (the GPU's backlog at the end of
//!   the forward pass: how much the GPU, not the CPU, bounds the step).
//! - `DZ_PROFILE=events` (CUDA; elsewhere as `host`): no synchronization; each part is bracketed by two
//!   CUDA events on the device's stream, and its time is the GPU timeline's between them, read once the
//!   end event has completed (queried, never waited for, at later calls and at each snapshot). That is
//!   the part's kernels plus any gap in which the GPU waited for the CPU to queue them: where a part's
//!   event time is near its host time the CPU bounds it, where it is well above, the GPU does.
//!
//! The step interval (one output-head call to the next, while they come less than a second apart) bounds
//! everything else (attention, sampling, the host's scheduler): `interval - sum(parts)`. Each forward
//! pass's span, from its first timed part to the end of its output head's call ([`Profile::pass_end`]),
//! splits that rest in two: what the host runs inside the pass (attention, activations, the other
//! layers' launches) and between passes (sampling, responses, scheduling, the next pass's inputs; the
//! interval less the span). Session 20 found dz's slow serving mode in the second.
//!
//! A base served alone (no multi-tenant or swap model) is wrapped under `DZ_PROFILE` too
//! ([`crate::serve_with`]), so that its profile gives the same split for comparison: its linear layers
//! and steps, and no delta part.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result as CResult, Tensor};

/// A part of the forward pass that the profile times (its discriminant is its index in [`Part::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The base's own linear layers (the host's `QuantMethod::forward`).
    BaseLinear,
    /// The deltas of linear layers: the sbmm over the batch's fine-tunes and bias deltas.
    LinearDelta,
    /// Token-embedding deltas.
    EmbeddingDelta,
    /// RMS-norm deltas.
    NormDelta,
    /// Looking up each row's fine-tune (CPU only, no synchronization).
    RowLookup,
    /// [`Part::BaseLinear`] in calls with more than one token per sequence (prompt steps).
    BaseLinearPrefill,
    /// [`Part::LinearDelta`] in calls with more than one token per sequence (prompt steps: the dense
    /// route or repeated tiles), apart from the decode steps' sbmm.
    LinearDeltaPrefill,
    /// Wait mode only (`DZ_PROFILE=wait`): the wait for the GPU's queued work right after the output
    /// head's is queued: how far the GPU runs behind the CPU at the end of a step's forward pass (the
    /// host's sampling waits there anyway, as it reads the tokens). Near 0: the CPU bounds the step;
    /// large: the GPU does, by about that much.
    HeadWait,
}

impl Part {
    /// Every part, in the order of [`Profile::snapshot`] (and of the discriminants).
    pub const ALL: [Part; 8] = [
        Part::BaseLinear,
        Part::LinearDelta,
        Part::EmbeddingDelta,
        Part::NormDelta,
        Part::RowLookup,
        Part::BaseLinearPrefill,
        Part::LinearDeltaPrefill,
        Part::HeadWait,
    ];

    /// The label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::BaseLinear => "base_linear",
            Part::LinearDelta => "linear_delta",
            Part::EmbeddingDelta => "embedding_delta",
            Part::NormDelta => "norm_delta",
            Part::RowLookup => "row_lookup",
            Part::BaseLinearPrefill => "base_linear_prefill",
            Part::LinearDeltaPrefill => "linear_delta_prefill",
            Part::HeadWait => "head_wait",
        }
    }
}

/// Step intervals longer than this are idle gaps, not steps.
const MAX_STEP: Duration = Duration::from_secs(1);

/// The profile's counters (see the module docs). One per [`crate::multi_tenant::DeltaRegistry`].
#[derive(Debug)]
pub struct Profile {
    enabled: AtomicBool,
    /// Host mode: parts are timed without device synchronizations.
    host_only: AtomicBool,
    /// Events mode (`DZ_PROFILE=events`): CUDA parts are timed by event pairs.
    events: AtomicBool,
    /// Wait mode (`DZ_PROFILE=wait`): host mode plus [`Part::HeadWait`].
    head_wait: AtomicBool,
    /// The one-byte tensor [`Profile::head_wait`] copies to the host (made on first use).
    probe: Mutex<Option<Tensor>>,
    #[cfg(feature = "cuda")]
    pending: events::Pending,
    nanos: [AtomicU64; Part::ALL.len()],
    calls: [AtomicU64; Part::ALL.len()],
    steps: AtomicU64,
    step_nanos: AtomicU64,
    last_head: Mutex<Option<Instant>>,
    /// When the open forward pass's first timed part began, in nanoseconds after `epoch` plus one (0: no
    /// pass open; [`Profile::pass_end`] closes it).
    pass_start: AtomicU64,
    epoch: Instant,
    passes: AtomicU64,
    pass_nanos: AtomicU64,
}

impl Default for Profile {
    fn default() -> Self {
        let mode = std::env::var("DZ_PROFILE").unwrap_or_default();
        Profile {
            enabled: AtomicBool::new(matches!(mode.as_str(), "1" | "host" | "events" | "wait")),
            host_only: AtomicBool::new(matches!(mode.as_str(), "host" | "wait")),
            events: AtomicBool::new(mode == "events"),
            head_wait: AtomicBool::new(mode == "wait"),
            probe: Mutex::new(None),
            #[cfg(feature = "cuda")]
            pending: Default::default(),
            nanos: Default::default(),
            calls: Default::default(),
            steps: AtomicU64::new(0),
            step_nanos: AtomicU64::new(0),
            last_head: Mutex::new(None),
            pass_start: AtomicU64::new(0),
            epoch: Instant::now(),
            passes: AtomicU64::new(0),
            pass_nanos: AtomicU64::new(0),
        }
    }
}

/// What a profile has counted so far.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileSnapshot {
    /// Per part (in [`Part::ALL`] order): seconds and calls.
    pub parts: Vec<(Part, f64, u64)>,
    /// Steps seen (output-head calls less than a second after the previous one) and their seconds.
    pub steps: u64,
    /// Seconds of those steps.
    pub step_seconds: f64,
    /// Forward passes timed from their first profiled part to the end of their output head (the head's
    /// wait included), those under a second.
    pub passes: u64,
    /// Seconds of those passes. A step minus its pass is the host's work between passes: sampling,
    /// responses, scheduling and the next pass's inputs.
    pub pass_seconds: f64,
}

impl Profile {
    /// Whether the profile is on (`DZ_PROFILE=1` or `host` when the registry was made, or
    /// [`Profile::set_enabled`]).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Turns the profile on or off.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Whether parts are timed on the host only, without device synchronizations (`DZ_PROFILE=host`).
    pub fn host_only(&self) -> bool {
        self.host_only.load(Ordering::Relaxed)
    }

    /// Sets host mode (see [`Profile::host_only`]).
    pub fn set_host_only(&self, on: bool) {
        self.host_only.store(on, Ordering::Relaxed);
    }

    /// Whether CUDA parts are timed by event pairs (`DZ_PROFILE=events`).
    pub fn events(&self) -> bool {
        self.events.load(Ordering::Relaxed)
    }

    /// Sets events mode (see [`Profile::events`]).
    pub fn set_events(&self, on: bool) {
        self.events.store(on, Ordering::Relaxed);
    }

    /// What the parts' seconds mean, for reports.
    pub fn mode(&self) -> &'static str {
        if self.events() {
            "events: each CUDA part's span on the GPU timeline between two events, no synchronization"
        } else if self.host_only() && self.head_wait.load(Ordering::Relaxed) {
            "wait: the CPU's time issuing each part, and the wait for the GPU's work after the output head"
        } else if self.host_only() {
            "host: the CPU's time issuing each part, no device synchronization"
        } else {
            "device: each part between device synchronizations"
        }
    }

    /// Runs `f` as `part`: when the profile is on, after synchronizing `device` and timing until `f`'s
    /// work has finished on it (`sync` false, or host mode: CPU time only, no synchronization).
    pub fn time<T>(
        &self,
        part: Part,
        device: &Device,
        sync: bool,
        f: impl FnOnce() -> CResult<T>,
    ) -> CResult<T> {
        if !self.enabled() {
            return f();
        }
        self.pass_begin();
        #[cfg(feature = "cuda")]
        if sync && self.events() {
            if let Device::Cuda(dev) = device {
                return self.pending.time(dev, part, f, |p, d| self.add(p, d));
            }
        }
        let sync = sync && !self.host_only() && !self.events();
        if sync {
            device.synchronize()?;
        }
        let start = Instant::now();
        let out = f()?;
        if sync {
            device.synchronize()?;
        }
        self.add(part, start.elapsed());
        Ok(out)
    }

    /// Sets wait mode (host mode plus [`Part::HeadWait`]; `DZ_PROFILE=wait`).
    pub fn set_head_wait(&self, on: bool) {
        self.head_wait.store(on, Ordering::Relaxed);
    }

    /// In wait mode, waits for the work queued on `device` (the output head's has just been queued) and
    /// adds the wait to [`Part::HeadWait`]; nothing in the other modes or when the profile is off.
    ///
    /// The wait is a one-byte copy to the host, the kind of wait the host's sampling makes at every
    /// step when it reads the tokens, not a device synchronization: session 17's first version
    /// synchronized the device, and that run's steps looked perturbed (its embedding deltas took 46 ms
    /// a call, against 0.5 in host mode), possibly because a synchronization lets the stream-ordered
    /// memory pool give its free memory back, which the next step's allocations then map again.
    pub fn head_wait(&self, device: &Device) -> CResult<()> {
        if !self.enabled() || !self.host_only() || !self.head_wait.load(Ordering::Relaxed) {
            return Ok(());
        }
        let probe = {
            let mut probe = self.probe.lock().unwrap_or_else(|e| e.into_inner());
            match probe.as_ref().filter(|t| t.device().same_device(device)) {
                Some(t) => t.clone(),
                None => probe.insert(Tensor::zeros(1, DType::U8, device)?).clone(),
            }
        };
        let start = Instant::now();
        probe.to_vec1::<u8>()?;
        self.add(Part::HeadWait, start.elapsed());
        Ok(())
    }

    /// Adds `d` to `part` (one call).
    pub fn add(&self, part: Part, d: Duration) {
        let i = part as usize;
        self.nanos[i].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.calls[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Opens a forward pass at its first timed part (nothing while one is open).
    fn pass_begin(&self) {
        if self.pass_start.load(Ordering::Relaxed) == 0 {
            let at = self.epoch.elapsed().as_nanos() as u64 + 1;
            let _ = self
                .pass_start
                .compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Closes the open forward pass at `now` (the end of its output head's call): its span from the
    /// first timed part counts as a pass when shorter than a second.
    pub fn pass_end(&self, now: Instant) {
        if !self.enabled() {
            return;
        }
        let start = self.pass_start.swap(0, Ordering::Relaxed);
        if start == 0 {
            return;
        }
        let end = now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1;
        let d = end.saturating_sub(start);
        if d < MAX_STEP.as_nanos() as u64 {
            self.passes.fetch_add(1, Ordering::Relaxed);
            self.pass_nanos.fetch_add(d, Ordering::Relaxed);
        }
    }

    /// Marks an output-head call at `now`: the interval since the previous one is a step when shorter
    /// than a second.
    pub fn head_at(&self, now: Instant) {
        if !self.enabled() {
            return;
        }
        let mut last = self.last_head.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(prev) = *last {
            let d = now.saturating_duration_since(prev);
            if d < MAX_STEP {
                self.steps.fetch_add(1, Ordering::Relaxed);
                self.step_nanos
                    .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
            }
        }
        *last = Some(now);
    }

    /// The counts so far (in events mode: of the parts whose end event has completed).
    pub fn snapshot(&self) -> ProfileSnapshot {
        #[cfg(feature = "cuda")]
        self.pending.resolve(|p, d| self.add(p, d));
        ProfileSnapshot {
            parts: Part::ALL
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    (
                        *p,
                        self.nanos[i].load(Ordering::Relaxed) as f64 * 1e-9,
                        self.calls[i].load(Ordering::Relaxed),
                    )
                })
                .collect(),
            steps: self.steps.load(Ordering::Relaxed),
            step_seconds: self.step_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            passes: self.passes.load(Ordering::Relaxed),
            pass_seconds: self.pass_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }
}

/// Events mode: the parts timed by CUDA event pairs, read when they complete.
#[cfg(feature = "cuda")]
mod events {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::Duration;

    use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaEvent};
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::Result as CResult;

    use super::Part;

    /// Parts recorded and not yet read, oldest first, and events to record again.
    #[derive(Default)]
    pub(super) struct Pending {
        parts: Mutex<VecDeque<(Part, CudaEvent, CudaEvent)>>,
        spare: Mutex<Vec<CudaEvent>>,
    }

    impl std::fmt::Debug for Pending {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let n = self.parts.lock().map_or(0, |p| p.len());
            f.debug_struct("Pending").field("parts", &n).finish()
        }
    }

    fn cuda_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("DZ_PROFILE=events: {what}: {e:?}"))
    }

    impl Pending {
        /// An event recorded on `dev`'s stream now (a spare one, or a new one with timing).
        fn record(&self, dev: &CudaDevice) -> CResult<CudaEvent> {
            let stream = dev.cuda_stream();
            let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let event = match spare.filter(|e| e.context() == stream.context()) {
                Some(e) => e,
                None => stream
                    .context()
                    .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| cuda_err("creating an event", e))?,
            };
            event
                .record(&stream)
                .map_err(|e| cuda_err("recording an event", e))?;
            Ok(event)
        }

        /// Runs `f` between two events on `dev`'s stream; reads the parts that have completed.
        pub(super) fn time<T>(
            &self,
            dev: &CudaDevice,
            part: Part,
            f: impl FnOnce() -> CResult<T>,
            add: impl Fn(Part, Duration),
        ) -> CResult<T> {
            let start = self.record(dev)?;
            let out = f()?;
            let end = self.record(dev)?;
            self.parts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back((part, start, end));
            self.resolve(add);
            Ok(out)
        }

        /// Adds the time of every part at the front whose end event has completed (queried, not
        /// waited for: a synchronization would change what is measured).
        pub(super) fn resolve(&self, add: impl Fn(Part, Duration)) {
            let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
            while let Some((_, _, end)) = parts.front() {
                if !matches!(end.try_is_complete(), Ok(true)) {
                    break;
                }
                let Some((part, start, end)) = parts.pop_front() else {
                    break;
                };
                // SAFETY: both events are live, of one context, recorded and complete.
                if let Ok(ms) = unsafe { result::event::elapsed(start.cu_event(), end.cu_event()) }
                {
                    add(part, Duration::from_secs_f64(f64::from(ms.max(0.0)) * 1e-3));
                }
                let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
                spare.push(start);
                spare.push(end);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_counts_nothing_and_on_counts_each_part() {
        for (i, part) in Part::ALL.iter().enumerate() {
            assert_eq!(
                *part as usize, i,
                "{part:?}: its discriminant indexes the counters"
            );
        }
        let p = Profile::default();
        p.set_enabled(false);
        p.time(Part::LinearDelta, &Device::Cpu, true, || Ok(()))
            .unwrap();
        p.head_at(Instant::now());
        let s = p.snapshot();
        assert!(s
            .parts
            .iter()
            .all(|(_, secs, calls)| *secs == 0.0 && *calls == 0));
        assert_eq!(s.steps, 0);

        p.set_enabled(true);
        let v = p
            .time(Part::LinearDelta, &Device::Cpu, true, || {
                std::thread::sleep(Duration::from_millis(2));
                Ok(7)
            })
            .unwrap();
        assert_eq!(v, 7);
        p.add(Part::NormDelta, Duration::from_millis(3));
        let s = p.snapshot();
        let get = |part| s.parts.iter().find(|(q, _, _)| *q == part).unwrap();
        assert!(get(Part::LinearDelta).1 >= 0.002 && get(Part::LinearDelta).2 == 1);
        assert_eq!(get(Part::NormDelta).2, 1);
        assert!((get(Part::NormDelta).1 - 0.003).abs() < 1e-9);
        assert_eq!(get(Part::BaseLinear).2, 0);

        // Events mode on the CPU times the part on the host, as host mode does.
        p.set_events(true);
        assert!(p.mode().starts_with("events"));
        p.time(Part::BaseLinear, &Device::Cpu, true, || {
            std::thread::sleep(Duration::from_millis(1));
            Ok(())
        })
        .unwrap();
        let s = p.snapshot();
        let get = |part| s.parts.iter().find(|(q, _, _)| *q == part).unwrap();
        assert!(get(Part::BaseLinear).1 >= 0.001 && get(Part::BaseLinear).2 == 1);
    }

    #[test]
    fn a_pass_spans_its_first_part_to_the_end_of_its_head() {
        let p = Profile::default();
        p.set_enabled(true);
        p.set_host_only(true);
        // No part timed yet: closing is a no-op.
        p.pass_end(Instant::now());
        assert_eq!(p.snapshot().passes, 0);
        let before = Instant::now();
        for _ in 0..2 {
            p.time(Part::BaseLinear, &Device::Cpu, false, || {
                std::thread::sleep(Duration::from_millis(2));
                Ok(())
            })
            .unwrap();
        }
        std::thread::sleep(Duration::from_millis(3));
        p.pass_end(Instant::now());
        let outer = before.elapsed().as_secs_f64();
        let s = p.snapshot();
        assert_eq!(s.passes, 1);
        // Both parts and the gap after them, and no more than the whole span around them.
        assert!(
            s.pass_seconds >= 0.007 && s.pass_seconds <= outer,
            "{} s of {outer}",
            s.pass_seconds
        );
        // Closed: a second end adds nothing; the next part opens the next pass.
        p.pass_end(Instant::now());
        assert_eq!(p.snapshot().passes, 1);
        p.time(Part::NormDelta, &Device::Cpu, false, || Ok(()))
            .unwrap();
        p.pass_end(Instant::now());
        assert_eq!(p.snapshot().passes, 2);
        // Off: nothing opens or closes.
        p.set_enabled(false);
        p.time(Part::NormDelta, &Device::Cpu, false, || Ok(()))
            .unwrap();
        p.pass_end(Instant::now());
        assert_eq!(p.snapshot().passes, 2);
    }

    #[test]
    fn host_mode_times_without_synchronizing() {
        let p = Profile::default();
        p.set_enabled(true);
        p.set_host_only(true);
        assert!(p.mode().starts_with("host"));
        // (A CPU device's synchronization is free, so this checks the mode and the count, not that no
        // synchronization ran: that is the `sync && !host_only` in `time`.)
        let v = p
            .time(Part::LinearDelta, &Device::Cpu, true, || {
                std::thread::sleep(Duration::from_millis(2));
                Ok(3)
            })
            .unwrap();
        assert_eq!(v, 3);
        let s = p.snapshot();
        let (_, secs, calls) = s.parts[Part::LinearDelta as usize];
        assert!(secs >= 0.002 && calls == 1, "{secs} s, {calls} calls");
        // The head's wait is timed in wait mode only.
        p.head_wait(&Device::Cpu).unwrap();
        assert_eq!(p.snapshot().parts[Part::HeadWait as usize].2, 0);
        p.set_head_wait(true);
        assert!(p.mode().starts_with("wait"));
        p.head_wait(&Device::Cpu).unwrap();
        p.head_wait(&Device::Cpu).unwrap();
        assert_eq!(p.snapshot().parts[Part::HeadWait as usize].2, 2);
        p.set_head_wait(false);
        p.set_host_only(false);
        assert!(p.mode().starts_with("device"));
    }

    #[test]
    fn steps_are_head_intervals_under_a_second() {
        let p = Profile::default();
        p.set_enabled(true);
        let t0 = Instant::now();
        p.head_at(t0);
        p.head_at(t0 + Duration::from_millis(100));
        p.head_at(t0 + Duration::from_millis(150));
        // An idle gap: not a step.
        p.head_at(t0 + Duration::from_secs(5));
        let s = p.snapshot();
        assert_eq!(s.steps, 2);
        assert!((s.step_seconds - 0.150).abs() < 1e-6);
    }

    #[test]
    fn an_error_in_the_part_is_returned_and_not_counted() {
        let p = Profile::default();
        p.set_enabled(true);
        let r: CResult<()> = p.time(Part::BaseLinear, &Device::Cpu, true, || {
            candle_core::bail!("boom")
        });
        assert!(r.unwrap_err().to_string().contains("boom"));
        assert_eq!(p.snapshot().parts[0].2, 0);
    }
}

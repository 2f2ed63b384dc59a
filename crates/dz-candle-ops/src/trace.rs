//! CPU time of named phases of the ops' host-side work (planning, describing deltas, table uploads,
//! launches), for finding where a call's CPU goes: `deltazip bench hook --phases` reports them, and a
//! server started with `DZ_TRACE=1` adds them to its metrics (`deltazip_trace_*`).
//!
//! Off by default and free when off (one relaxed atomic load per span). When on, each span adds its
//! wall time on the calling thread to its name's total; spans may nest (a phase's total includes the
//! phases inside it). The CPU time of an op is what it costs the thread that issues the GPU's work: in
//! serving it comes before the GPU's work in every step (session 18 on the H200: a dz step spent 15.3 ms
//! more CPU than a base step before the output head, and its GPU ended 7.1 ms further behind).
//!
//! ```
//! dz_candle_ops::trace::set_enabled(true);
//! {
//!     let _s = dz_candle_ops::trace::span("my phase");
//! }
//! assert_eq!(dz_candle_ops::trace::snapshot()[0].calls, 1);
//! let totals = dz_candle_ops::trace::take();
//! assert_eq!(totals[0].name, "my phase");
//! assert_eq!(totals[0].calls, 1);
//! assert!(dz_candle_ops::trace::snapshot().is_empty());
//! dz_candle_ops::trace::set_enabled(false);
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Option<HashMap<&'static str, (u64, Duration)>>> = Mutex::new(None);

/// Turns the phase timers on or off (process-wide).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the phase timers are on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A running span: on drop, its time is added to its phase's total.
#[must_use = "a span measures until it is dropped"]
pub struct Span {
    name: &'static str,
    start: Instant,
}

impl Drop for Span {
    fn drop(&mut self) {
        let took = self.start.elapsed();
        let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        let entry = totals
            .get_or_insert_with(HashMap::new)
            .entry(self.name)
            .or_default();
        entry.0 += 1;
        entry.1 += took;
    }
}

/// Times the phase `name` until the returned guard drops; `None` (nothing timed) when the timers are off.
#[inline]
pub fn span(name: &'static str) -> Option<Span> {
    enabled().then(|| Span {
        name,
        start: Instant::now(),
    })
}

/// One phase's totals since the last [`take`].
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseTotal {
    /// The phase's name, as given to [`span`].
    pub name: &'static str,
    /// How many spans ended.
    pub calls: u64,
    /// Their summed time.
    pub total: Duration,
}

/// Every phase's totals since the last [`take`] (largest total first), and resets them.
pub fn take() -> Vec<PhaseTotal> {
    let totals = TOTALS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    sorted(totals.into_iter())
}

/// Every phase's totals since the last [`take`] (largest total first), without resetting them: for a
/// server's metrics, read while it runs.
pub fn snapshot() -> Vec<PhaseTotal> {
    let totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    sorted(totals.iter().flatten().map(|(&name, &entry)| (name, entry)))
}

fn sorted(totals: impl Iterator<Item = (&'static str, (u64, Duration))>) -> Vec<PhaseTotal> {
    let mut out: Vec<PhaseTotal> = totals
        .map(|(name, (calls, total))| PhaseTotal { name, calls, total })
        .collect();
    out.sort_by(|a, b| b.total.cmp(&a.total).then(a.name.cmp(b.name)));
    out
}

//! Snapshots of the residency's counters and their Prometheus text form.

use std::fmt::Write;

use crate::admission::AdmissionStats;
use crate::residency::DeltaState;

/// Counters and bytes of one tier.
///
/// GPU tier: `hits`/`misses` count [`crate::Residency::request`] answers (ready / not ready; the
/// scheduler asks once per step for each waiting fine-tune whose delta is ready or next in line to
/// load), `loads` count uploads, `evictions` deltas
/// evicted to make room, `bytes_used` includes bytes reserved by uploads in flight. CPU tier:
/// `hits`/`misses` count loads that found the host form in the cache / had to read the source,
/// `loads` count reads from the source (disk).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TierMetrics {
    /// Answers from this tier.
    pub hits: u64,
    /// Misses of this tier.
    pub misses: u64,
    /// Completed loads into this tier.
    pub loads: u64,
    /// Seconds spent in completed loads into this tier.
    pub load_seconds: f64,
    /// Deltas evicted from this tier to make room.
    pub evictions: u64,
    /// Bytes in this tier now.
    pub bytes_used: u64,
    /// This tier's budget.
    pub bytes_budget: u64,
}

/// One delta in a [`Metrics`] snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaMetrics {
    /// Its name.
    pub name: String,
    /// Its GPU state (`Ready` for a draining delta still on the GPU).
    pub state: DeltaState,
    /// False for a delta unregistered but still used by sequences in flight (draining).
    pub registered: bool,
    /// Whether sequences in flight (or just admitted) use it.
    pub pinned: bool,
    /// Its bytes on the GPU (0 when not there).
    pub gpu_bytes: u64,
    /// Its bytes in the CPU cache (0 when not there).
    pub cpu_bytes: u64,
}

/// A snapshot of [`crate::Residency`]: per-tier counters and bytes, and every delta's state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// The GPU tier.
    pub gpu: TierMetrics,
    /// The CPU cache tier.
    pub cpu: TierMetrics,
    /// Loads that failed (read, upload, activation, or too big for the GPU budget).
    pub load_failures: u64,
    /// Loads in flight now.
    pub loads_in_flight: usize,
    /// Every delta the residency holds, by name.
    pub deltas: Vec<DeltaMetrics>,
}

/// Quotes a Prometheus label value (backslash, double quote and newline escaped).
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn state_label(s: &DeltaState) -> &'static str {
    match s {
        DeltaState::Ready => "ready",
        DeltaState::Loading => "loading",
        DeltaState::Queued => "queued",
        DeltaState::Idle => "idle",
        DeltaState::Failed(_) => "failed",
        DeltaState::Draining => "draining",
        DeltaState::Unregistered => "unregistered",
        DeltaState::Unknown => "unknown",
    }
}

impl Metrics {
    /// The snapshot as Prometheus text exposition (version 0.0.4): `deltazip_delta_*` series with a
    /// `tier="gpu"|"cpu"` label for the per-tier ones and a `delta="name"` label for the per-delta
    /// ones.
    pub fn to_prometheus(&self) -> String {
        self.to_prometheus_named("delta")
    }

    /// [`Metrics::to_prometheus`] with the series named `deltazip_<subject>_*` (a second residency in
    /// one process, such as the swap baseline's full models, next to the deltas').
    pub fn to_prometheus_named(&self, subject: &str) -> String {
        let mut out = String::new();
        let tiers = [("gpu", &self.gpu), ("cpu", &self.cpu)];
        type Field = fn(&TierMetrics) -> String;
        let series: [(&str, &str, &str, Field); 7] = [
            (
                "hits_total",
                "counter",
                "Delta lookups answered by the tier.",
                |t| t.hits.to_string(),
            ),
            (
                "misses_total",
                "counter",
                "Delta lookups the tier could not answer.",
                |t| t.misses.to_string(),
            ),
            (
                "loads_total",
                "counter",
                "Completed delta loads into the tier.",
                |t| t.loads.to_string(),
            ),
            (
                "load_seconds_total",
                "counter",
                "Seconds spent loading deltas into the tier.",
                |t| format!("{:.6}", t.load_seconds),
            ),
            (
                "evictions_total",
                "counter",
                "Deltas evicted from the tier to make room.",
                |t| t.evictions.to_string(),
            ),
            (
                "bytes_used",
                "gauge",
                "Bytes of deltas in the tier (GPU: including uploads in flight).",
                |t| t.bytes_used.to_string(),
            ),
            ("bytes_budget", "gauge", "Byte budget of the tier.", |t| {
                t.bytes_budget.to_string()
            }),
        ];
        for (suffix, kind, help, value) in series {
            let name = &format!("deltazip_{subject}_{suffix}");
            header(&mut out, name, kind, help);
            for (tier, t) in tiers {
                let _ = writeln!(out, "{name}{{tier=\"{tier}\"}} {}", value(t));
            }
        }
        header(
            &mut out,
            &format!("deltazip_{subject}_load_failures_total"),
            "counter",
            "Delta loads that failed.",
        );
        let _ = writeln!(
            out,
            "deltazip_{subject}_load_failures_total {}",
            self.load_failures
        );
        header(
            &mut out,
            &format!("deltazip_{subject}_loads_in_flight"),
            "gauge",
            "Delta loads in flight.",
        );
        let _ = writeln!(
            out,
            "deltazip_{subject}_loads_in_flight {}",
            self.loads_in_flight
        );
        header(
            &mut out,
            &format!("deltazip_{subject}_state"),
            "gauge",
            "1 for each delta's current state (ready, loading, queued, idle, failed, draining).",
        );
        for d in &self.deltas {
            let _ = writeln!(
                out,
                "deltazip_{subject}_state{{delta={},state=\"{}\"}} 1",
                label(&d.name),
                if d.registered {
                    state_label(&d.state)
                } else {
                    "draining"
                }
            );
        }
        header(
            &mut out,
            &format!("deltazip_{subject}_pinned"),
            "gauge",
            "1 when sequences in flight (or just admitted) use the delta.",
        );
        for d in &self.deltas {
            let _ = writeln!(
                out,
                "deltazip_{subject}_pinned{{delta={}}} {}",
                label(&d.name),
                u8::from(d.pinned)
            );
        }
        header(
            &mut out,
            &format!("deltazip_{subject}_resident_bytes"),
            "gauge",
            "Bytes of each delta per tier.",
        );
        for d in &self.deltas {
            for (tier, bytes) in [("gpu", d.gpu_bytes), ("cpu", d.cpu_bytes)] {
                let _ = writeln!(
                    out,
                    "deltazip_{subject}_resident_bytes{{delta={},tier=\"{tier}\"}} {bytes}",
                    label(&d.name)
                );
            }
        }
        out
    }
}

impl AdmissionStats {
    /// The counters as Prometheus text (`deltazip_scheduler_*`).
    pub fn to_prometheus(&self) -> String {
        self.to_prometheus_named("scheduler")
    }

    /// [`AdmissionStats::to_prometheus`] with the series named `deltazip_<subject>_*`.
    pub fn to_prometheus_named(&self, subject: &str) -> String {
        let mut out = String::new();
        for (suffix, help, v) in [
            ("steps_total", "Scheduling steps.", self.steps),
            (
                "admitted_total",
                "Waiting sequences admitted.",
                self.admitted,
            ),
            (
                "refused_total",
                "Waiting sequences refused (their delta failed or was unregistered).",
                self.refused,
            ),
            (
                "deferred_total",
                "Waiting sequences left waiting, summed over steps.",
                self.deferred,
            ),
        ] {
            let name = &format!("deltazip_{subject}_{suffix}");
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
    }
}

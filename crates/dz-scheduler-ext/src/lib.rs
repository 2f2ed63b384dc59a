//! # dz-scheduler-ext
//!
//! Continuous batching across fine-tunes inside the host engine (DeltaZip, arXiv 2312.05215,
//! section 5: the serving system), generic over the delta itself so it builds and is tested
//! without mistral.rs, candle or a GPU. Two parts, and a [`Scheduler`] that combines them behind one
//! `&self` call per scheduling step:
//!
//! - [`residency`]: every registered delta lives in tiers, **disk** (its source, always there) ->
//!   **CPU cache** (host forms, LRU under a byte budget) -> **GPU slots** (device forms under a
//!   byte budget, LRU among unpinned deltas). A miss starts an asynchronous load on background
//!   threads (disk -> CPU -> GPU), so the scheduling step never waits on I/O. Deltas that sequences
//!   in flight use are pinned and never evicted; when pinned deltas fill the GPU budget a load
//!   waits (queued) instead of failing. Deltas are registered and unregistered at run time (an
//!   unregistered delta in use drains: the sequences in flight finish with it). What a
//!   tier holds is a [`Backend`]'s: dz-loader's device deltas in the server, fakes in tests.
//! - [`admission`]: which waiting sequences start this step, under the free batch slots and a cap
//!   on distinct deltas per step (each costs one SBMM segment per layer), with a fairness policy
//!   (least recently served fine-tune first, round robin) so a popular fine-tune cannot starve the
//!   others; base-only sequences ride along.
//!
//! ```text
//! engine step ──admit(running, waiting, free)──► Scheduler ─► Admission (policy, cap, slots)
//!                                                    │              │ request / peek / pin
//!                                                    ▼              ▼
//!                                                Residency ── jobs ──► load threads
//!                                   disk ─read─► CPU LRU ─upload─► GPU slots ─activate─► layers
//! ```

#![deny(missing_docs)]

pub mod admission;
mod error;
pub mod metrics;
pub mod residency;
mod scheduler;

pub use admission::{Admission, AdmissionStats, Decision, DeltaLookup, Policy, Readiness};
pub use error::{Error, Result};
pub use metrics::{DeltaMetrics, Metrics, TierMetrics};
pub use residency::{Backend, DeltaState, Residency, ResidencyOptions, Unregistered};
pub use scheduler::{Scheduler, SchedulerMetrics, SchedulerOptions};

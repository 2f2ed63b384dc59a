//! # dz-scheduler-ext
//!
//! Continuous batching across fine-tunes inside the host engine (DeltaZip, arXiv 2312.05215, section 5.2):
//! rows grouped by delta, a cap on distinct deltas per step with fairness, and delta residency in tiers
//! (disk -> CPU LRU -> GPU slots) with prefetch and hot load/unload. Nothing is implemented yet.

//! # dz-loader
//!
//! Loads `base+delta` model specs from a TOML config into mistral.rs: merge mode (materialise base + delta
//! into plain weights) and multi-tenant mode (one base, compressed deltas per linear layer, computed per row
//! with dz-candle-ops). It will check every delta's base fingerprint before use. Nothing is implemented yet.

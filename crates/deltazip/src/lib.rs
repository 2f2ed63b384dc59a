//! # deltazip
//!
//! The facade over the deltazip crates, and the library half of the `deltazip` binary (each subcommand is
//! a module here, so integration tests drive the same code the binary runs).
#![deny(missing_docs)]

pub use dz_compress as compressor;
pub use dz_format as format;
pub use dz_loader as loader;
pub use dz_scheduler_ext as scheduler;

pub mod bench;
pub mod bench_hook;
pub mod bench_serve;
pub mod compress;
pub mod demo;
pub mod inspect;
pub mod plan;
pub mod run;
pub mod serve;
pub mod synth;

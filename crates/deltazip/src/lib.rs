//! # deltazip
//!
//! The facade over the deltazip crates and the `deltazip` binary's library half.
#![deny(missing_docs)]

pub use dz_format as format;

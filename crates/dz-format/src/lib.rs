//! # dz-format
//!
//! The on-disk format of one compressed fine-tune delta (DeltaZip, arXiv 2312.05215, section 4: the
//! compressed delta that the serving system loads). Pure Rust: no candle, no CUDA, no devices.
//!
//! A delta file is a safetensors file whose metadata carries a JSON manifest (SPEC.md beside this crate
//! describes every byte). This crate owns:
//! - the manifest types and their validation ([`Manifest`], [`TensorEntry`], [`Codec`]);
//! - the kernel-facing part layouts ([`layout`]);
//! - reference pack/unpack/dequantize for every codec ([`codec`]);
//! - a memory-mapped, lazily verifying reader ([`DeltaFile`]) and a streaming, atomic writer ([`DeltaWriter`]);
//! - the base-model fingerprint that binds a delta to its base ([`fingerprint`]);
//! - shards of packed tensors for tensor parallelism, and the per-rank plan of a file ([`shard`]).
#![deny(missing_docs)]

pub mod codec;
mod error;
pub mod fingerprint;
pub mod layout;
mod manifest;
mod reader;
pub mod shard;
mod writer;

pub use error::{Error, Result};
pub use manifest::{
    matrix_dims, BaseFingerprint, Codec, Compression, Dtype, FormatVersion, Manifest, PartEntry,
    QuantParams, Recipe, Role, TensorEntry, FORMAT_VERSION, MAX_DIMS,
};
pub use reader::{
    part_key, DecodedTensor, DeltaFile, TensorData, FORMAT_MAGIC, MAX_HEADER_LEN, META_FORMAT,
    META_MANIFEST, META_VERSION,
};
pub use writer::{encode_part, DeltaWriter, EncodedPart, EncodedTensor, Lossless, WriteSummary};

//! # dz-compress
//!
//! ΔCompress (DeltaZip, arXiv 2312.05215, section 4.1): turns a (base, fine-tune) pair into a dz-format delta.
//! It will own calibration (layer-by-layer activations, Hessians `H = 2/n * sum(x x^T)`), second-order
//! pruning and quantization with error feedback (SparseGPT/GPTQ-style OBS), the RTN and magnitude baselines, the
//! 1-bit sign mode, per-layer bit allocation under a size budget, and the lossless stage.
//!
//! The numerical core, one weight delta `D` (`rows x cols` = `out x in`, row-major f32) at a time:
//! - [`grid`]: fitting a group's quantization grid and rounding onto the *stored* (f16) grid, and the
//!   power-of-two global scale that keeps small deltas out of f16's subnormal range (SPEC.md section 3);
//! - [`mod@rtn`]: the baselines: round-to-nearest, magnitude pruning (2:4 or unstructured) + RTN, and BitDelta's
//!   1-bit sign with a per-row scale;
//! - [`mod@obs`]: SparseGPT/GPTQ-style joint pruning and quantization with OBS error feedback under the layer's
//!   input Hessian;
//! - [`calibrated_error`]: `trace((D - D^) H (D - D^)^T)`, the metric OBS minimizes and every method is judged by.
//!
//! Every method returns the logical payload of a dz-format codec ([`dz_format::codec::Payload`]): `Quant`,
//! `Sparse24`, `Sparse` or `Sign1`, whose dequantization is exactly what the method measured.
//!
//! Around it, on a whole model: [`mod@model`] is a Llama-family forward pass in candle (f32, any device) with a
//! staged per-layer API, perplexity and KL helpers; [`mod@calibrate`] runs sequential layer-by-layer calibration
//! over it, handing each linear group's input Hessian to a compressor and installing what it returns;
//! [`mod@train`] makes full-parameter fine-tunes with candle's autograd (for examples and tests).
#![deny(missing_docs)]

pub mod arch;
mod assemble;
pub mod calib_data;
pub mod calibrate;
mod config;
mod error;
pub mod fixtures;
pub mod grid;
pub mod hf;
pub mod merge;
pub mod model;
pub mod obs;
pub mod pipeline;
pub mod rtn;
pub mod train;

pub use config::{QuantConfig, Sparsity};
pub use error::{calibrated_error, Error, Result};
pub use obs::{obs, ObsConfig, ObsOutput};
pub use rtn::{magnitude_mask, rtn, sign1};

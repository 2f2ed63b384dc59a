//! # dz-compress
//!
//! ΔCompress (DeltaZip, arXiv 2312.05215, section 4.1): turns a (base, fine-tune) pair into a dz-format delta.
//! It will own calibration (layer-by-layer activations, Hessians `H = 2/n * sum(x x^T)`), second-order
//! pruning and quantization with error feedback (SparseGPT/GPTQ-style OBS), the RTN and magnitude baselines, the
//! 1-bit sign mode, per-layer bit allocation under a size budget, and the lossless stage.

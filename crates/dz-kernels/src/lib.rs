//! # dz-kernels
//!
//! CUDA kernels for the packed delta codecs of dz-format (DeltaZip, arXiv 2312.05215, section 5: the fused
//! decompress-and-multiply kernels and selective batched matmul). It will own the `.cu` sources under
//! `kernels/<codec>/` and a build script that compiles them with nvcc, only under the `cuda` feature; the
//! default build compiles no CUDA code.

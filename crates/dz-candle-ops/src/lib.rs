//! # dz-candle-ops
//!
//! candle custom ops over packed deltas: `delta_matmul`, the fused `delta_matmul_add`, `sbmm` (each row of a
//! batch uses its own delta, one launch), `dequantize`, `merge`, embedding-delta gather, and the
//! `DeviceDelta` handle for a delta resident on a device. Every fast path (CPU and CUDA) will have a plain
//! reference twin in this crate. Nothing is implemented yet.

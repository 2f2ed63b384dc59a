//! `dense` (SPEC.md section 3.1): plain little-endian values, row-major, no row padding. Part: `values`.
//! Not what a delta matmul is for, but supported by every op for completeness.

mod cpu;

pub(crate) use cpu::{Bf16, DenseDec, F16, F32};

//! `sign1` (SPEC.md section 3.5): one sign bit per entry (1 = +1) and one f16 scale per row (BitDelta).
//! Parts: `signs` (`N` bit-stream rows of `K` bits), `scales` (`N` f16).

mod cpu;

pub(crate) use cpu::Sign1Dec;

//! `zero` (SPEC.md section 3.6): an exactly zero delta, no parts. The engines skip it
//! ([`RowDecode::ZERO`](crate::codec::RowDecode::ZERO)); the decoder exists so that every op takes
//! every codec.

mod cpu;

pub(crate) use cpu::ZeroDec;

//! `sparse24` (SPEC.md section 3.3): 2:4 structured sparsity along `K`. Parts: `codes` (`K/2` kept codes
//! a row), `meta` (`K/4` nibbles `i0 | i1 << 2` a row), `scales`, \[`zeros`\] (groups over the original
//! column).

mod cpu;

pub(crate) use cpu::Sparse24Dec;

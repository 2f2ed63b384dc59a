//! `quant` (SPEC.md section 3.2): every entry quantized. Parts: `codes` (`N` bit-stream rows of `K`
//! codes, `stride(K, bits)` bytes each), `scales`, \[`zeros`\] (`N * n_groups` f16 each).

mod cpu;

pub(crate) use cpu::QuantDec;

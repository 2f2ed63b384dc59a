//! `sparse` (SPEC.md section 3.4): unstructured sparsity. Parts: `mask` (one bit per entry), `row_ptr`
//! (`N + 1` u32 byte offsets into `codes`), `codes` (each row's kept codes as one bit-stream row),
//! `scales`, \[`zeros`\].

mod cpu;

pub(crate) use cpu::SparseDec;

//! Codecs: the logical (unpacked) form of every codec, and reference pack/unpack/dequantize
//! (SPEC.md section 3). These are the plain, obviously-correct implementations that every fast path
//! (CPU SIMD, CUDA) is tested against.
//!
//! Logical forms hold one value per `u8` (codes, positions) or `bool` (mask, sign bits): easy to read and to
//! generate in tests, not compact. `pack` turns them into the kernel-facing byte layout; `unpack` checks
//! and reverses it.

use half::f16;

use crate::manifest::{Dtype, QuantParams};

/// Dense values of a float dtype, as raw little-endian bytes (`rows * cols * dtype.size()`).
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    /// Rows of the matrix view.
    pub rows: usize,
    /// Columns of the matrix view.
    pub cols: usize,
    /// The stored dtype.
    pub dtype: Dtype,
    /// The values, row-major, little-endian.
    pub data: Vec<u8>,
}

/// Scales and zero points of a quantization grid: `rows * params.n_groups(cols)` each, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// The grid's parameters.
    pub params: QuantParams,
    /// One f16 scale per group.
    pub scales: Vec<f16>,
    /// One f16 zero point per group when asymmetric; `None` when symmetric.
    pub zeros: Option<Vec<f16>>,
}

/// Every entry quantized (`quant` codec).
#[derive(Debug, Clone, PartialEq)]
pub struct Quant {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Scales and zeros.
    pub grid: Grid,
    /// `rows * cols` codes, each `< 2^bits`, row-major.
    pub codes: Vec<u8>,
}

/// 2:4 structured sparse, kept entries quantized (`sparse24` codec).
#[derive(Debug, Clone, PartialEq)]
pub struct Sparse24 {
    /// Rows.
    pub rows: usize,
    /// Columns (a multiple of 4).
    pub cols: usize,
    /// Scales and zeros (groups over the original column index).
    pub grid: Grid,
    /// `rows * cols / 2` codes of the kept entries, in column order.
    pub codes: Vec<u8>,
    /// `rows * cols / 2` positions (0..4) within each run of 4 of the kept entries; each pair strictly increasing.
    pub positions: Vec<u8>,
}

/// Unstructured sparse, kept entries quantized (`sparse` codec).
#[derive(Debug, Clone, PartialEq)]
pub struct Sparse {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Scales and zeros (groups over the original column index).
    pub grid: Grid,
    /// `rows * cols`: which entries are stored.
    pub mask: Vec<bool>,
    /// Codes of the stored entries, row-major (as many as `mask` has `true`s).
    pub codes: Vec<u8>,
}

/// One sign bit per entry and one scale per row (`sign1` codec).
#[derive(Debug, Clone, PartialEq)]
pub struct Sign1 {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Multiplies every row scale.
    pub global_scale: f32,
    /// `rows * cols`: `true` = +1, `false` = -1.
    pub signs: Vec<bool>,
    /// `rows` f16 scales.
    pub scales: Vec<f16>,
}

/// The logical form of one tensor's codec payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// `dense`.
    Dense(Dense),
    /// `quant`.
    Quant(Quant),
    /// `sparse24`.
    Sparse24(Sparse24),
    /// `sparse`.
    Sparse(Sparse),
    /// `sign1`.
    Sign1(Sign1),
}

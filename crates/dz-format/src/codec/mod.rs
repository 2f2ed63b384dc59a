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
    /// `zero`: an exactly zero delta of `rows x cols`.
    Zero {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
}

// ---------------------------------------------------------------------------------------------------------
// Reference pack / unpack / dequantize.
//
// One file per codec (dense, quant, sparse24, sparse, sign1) holds its checks, its packing and its
// dequantization; the grid (scales, zeros, the SPEC formula) is shared in grid.rs, and the helpers below
// are shared by all. `Payload` only dispatches.

pub mod bits;
mod dense;
mod grid;
mod quant;
mod rows;
mod sign1;
mod sparse;
mod sparse24;

pub use rows::{pack_row_index, scatter_rows, unpack_row_index};

use crate::error::{Error, Result};
use crate::layout::{part_layout, stride, PartLen};
use crate::manifest::Codec;

impl Payload {
    /// The codec (with its parameters) this payload packs to.
    pub fn codec(&self) -> Codec {
        match self {
            Payload::Dense(d) => Codec::Dense { dtype: d.dtype },
            Payload::Quant(q) => Codec::Quant(q.grid.params),
            Payload::Sparse24(s) => Codec::Sparse24(s.grid.params),
            Payload::Sparse(s) => Codec::Sparse(s.grid.params),
            Payload::Sign1(s) => Codec::Sign1 {
                global_scale: s.global_scale,
            },
            Payload::Zero { .. } => Codec::Zero,
        }
    }

    /// `(rows, cols)` of the matrix view.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Payload::Dense(d) => (d.rows, d.cols),
            Payload::Quant(q) => (q.rows, q.cols),
            Payload::Sparse24(s) => (s.rows, s.cols),
            Payload::Sparse(s) => (s.rows, s.cols),
            Payload::Sign1(s) => (s.rows, s.cols),
            Payload::Zero { rows, cols } => (*rows, *cols),
        }
    }

    /// Checks the logical form: the codec's parameters, every vector's length against `rows` and `cols`,
    /// codes `< 2^bits`, 2:4 positions, finite scales and zeros. `tensor` only names the tensor in errors.
    ///
    /// Dense values are not looked at: any bits (NaN included) are valid.
    pub fn validate(&self, tensor: &str) -> Result<()> {
        let (rows, cols) = self.dims();
        check_dims(tensor, rows, cols)?;
        check_codec(tensor, &self.codec(), cols)?;
        match self {
            Payload::Dense(d) => d.validate(tensor),
            Payload::Quant(q) => q.validate(tensor),
            Payload::Sparse24(s) => s.validate(tensor),
            Payload::Sparse(s) => s.validate(tensor),
            Payload::Sign1(s) => s.validate(tensor),
            Payload::Zero { .. } => Ok(()),
        }
    }

    /// Packs the payload into its parts, in the order of SPEC.md section 4 (without `row_index`; see
    /// [`pack_row_index`]). Checks the logical form first ([`Payload::validate`]).
    ///
    /// Errors name no tensor (the payload does not know its name); see [`Payload::pack_named`].
    pub fn pack(&self) -> Result<Vec<Vec<u8>>> {
        self.pack_named("")
    }

    /// [`Payload::pack`], naming `tensor` in its errors.
    pub fn pack_named(&self, tensor: &str) -> Result<Vec<Vec<u8>>> {
        self.validate(tensor)?;
        match self {
            Payload::Dense(d) => Ok(d.pack()),
            Payload::Quant(q) => q.pack(tensor),
            Payload::Sparse24(s) => s.pack(tensor),
            Payload::Sparse(s) => s.pack(tensor),
            Payload::Sign1(s) => s.pack(tensor),
            Payload::Zero { .. } => Ok(Vec::new()),
        }
    }

    /// Decodes and checks the parts of a tensor of `rows x cols` packed with `codec` (parts in the order of
    /// SPEC.md section 4, without `row_index`, already zstd-decoded).
    ///
    /// Checks the codec's parameters, the part count and every part's length against
    /// [`part_layout`], then the content: zero padding bits in every bit-stream row, valid 2:4 metadata,
    /// `row_ptr` equal to what the mask implies (and `codes` of `row_ptr[N]` bytes), finite scales and zeros.
    /// Any input gives a named error, never a panic.
    pub fn unpack(
        tensor: &str,
        codec: &Codec,
        rows: usize,
        cols: usize,
        parts: &[&[u8]],
    ) -> Result<Payload> {
        check_parts_layout(tensor, codec, rows, cols, parts)?;
        Ok(match codec {
            Codec::Dense { dtype } => Payload::Dense(Dense::unpack(*dtype, rows, cols, parts)?),
            Codec::Quant(p) => Payload::Quant(Quant::unpack(tensor, p, rows, cols, parts)?),
            Codec::Sparse24(p) => {
                Payload::Sparse24(Sparse24::unpack(tensor, p, rows, cols, parts)?)
            }
            Codec::Sparse(p) => Payload::Sparse(Sparse::unpack(tensor, p, rows, cols, parts)?),
            Codec::Sign1 { global_scale } => {
                Payload::Sign1(Sign1::unpack(tensor, *global_scale, rows, cols, parts)?)
            }
            Codec::Zero => Payload::Zero { rows, cols },
        })
    }

    /// [`Payload::unpack`]'s verdict without its result: `Ok(())` exactly when `unpack` succeeds, and
    /// `unpack`'s error when it fails. For `quant` and `sparse24` (the codecs served on GPUs) the checks
    /// run on the packed bytes as they stream (row lengths, zero padding, the 2:4 metadata nibbles, the
    /// grid), without building the logical form (a byte per code, the positions): what a server checks
    /// once per delta it reads. Any failure, and every other codec, is answered by `unpack` itself, so
    /// both say the same thing.
    pub fn check(
        tensor: &str,
        codec: &Codec,
        rows: usize,
        cols: usize,
        parts: &[&[u8]],
    ) -> Result<()> {
        let passes = check_parts_layout(tensor, codec, rows, cols, parts).is_ok()
            && match codec {
                Codec::Quant(p) => {
                    rows_pass(parts[0], rows, cols, p.bits)
                        && Grid::unpack(tensor, p, cols, &parts[1..]).is_ok()
                }
                Codec::Sparse24(p) => {
                    let runs = cols / 4;
                    rows_pass(parts[0], rows, cols / 2, p.bits)
                        && rows_pass(parts[1], rows, runs, 4)
                        && sparse24::nibbles_pass(parts[1], rows, runs)
                        && Grid::unpack(tensor, p, cols, &parts[2..]).is_ok()
                }
                _ => false,
            };
        if passes {
            return Ok(());
        }
        Payload::unpack(tensor, codec, rows, cols, parts).map(|_| ())
    }
}

/// The checks of [`Payload::unpack`] before any part is decoded: dimensions, codec parameters, the
/// number of parts and the exact lengths the layout fixes.
fn check_parts_layout(
    tensor: &str,
    codec: &Codec,
    rows: usize,
    cols: usize,
    parts: &[&[u8]],
) -> Result<()> {
    check_dims(tensor, rows, cols)?;
    check_codec(tensor, codec, cols)?;
    let layout = part_layout(tensor, codec, rows, cols, false)?;
    if parts.len() != layout.len() {
        let names: Vec<_> = layout.iter().map(|p| p.name).collect();
        return Err(Error::InvalidPart {
            tensor: tensor.to_string(),
            part: layout.get(parts.len()).map_or("", |p| p.name).to_string(),
            reason: format!(
                "codec {} has {} parts ({}), got {}",
                codec.kind(),
                layout.len(),
                names.join(", "),
                parts.len()
            ),
        });
    }
    for (spec, part) in layout.iter().zip(parts) {
        if let PartLen::Exact(len) = spec.len {
            if part.len() != len {
                return Err(invalid_part(
                    tensor,
                    spec.name,
                    format!("is {} bytes but the layout needs {len}", part.len()),
                ));
            }
        }
    }
    Ok(())
}

impl Payload {
    /// The values as `rows * cols` f32, row-major: the SPEC.md section 3 formulas exactly
    /// (`((q as f32) - z) * (s as f32) * global_scale`, in that order), zero for entries a sparse codec
    /// does not store.
    ///
    /// # Panics
    /// If the payload is not valid ([`Payload::validate`]); payloads from [`Payload::unpack`] are.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            Payload::Dense(d) => d.to_f32(),
            Payload::Quant(q) => q.dequantize(),
            Payload::Sparse24(s) => s.dequantize(),
            Payload::Sparse(s) => s.dequantize(),
            Payload::Sign1(s) => s.dequantize(),
            Payload::Zero { rows, cols } => vec![0.0; rows * cols],
        }
    }
}

/// Every codec needs at least one row and one column (SPEC.md section 2: dims >= 1, `R >= 1`). This also
/// bounds the work `unpack` does by the bytes it is given: every part then holds at least one byte per row.
fn check_dims(tensor: &str, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(Error::InvalidShape {
            tensor: tensor.to_string(),
            reason: format!("a payload needs at least one row and one column, got {rows} x {cols}"),
        });
    }
    Ok(())
}

/// The codec parameter checks of SPEC.md section 7 that concern the payload (the same as
/// `TensorEntry::validate` makes from the manifest).
fn check_codec(tensor: &str, codec: &Codec, cols: usize) -> Result<()> {
    let bad = |reason: String| Error::InvalidCodec {
        tensor: tensor.to_string(),
        reason,
    };
    match codec {
        Codec::Dense { .. } | Codec::Zero => {}
        Codec::Quant(p) | Codec::Sparse(p) => p.validate().map_err(bad)?,
        Codec::Sparse24(p) => {
            p.validate().map_err(bad)?;
            if !cols.is_multiple_of(4) {
                return Err(bad(format!(
                    "2:4 sparsity needs the column count to be a multiple of 4, got {cols}"
                )));
            }
        }
        Codec::Sign1 { global_scale } => {
            if !(global_scale.is_finite() && *global_scale > 0.0) {
                return Err(bad(format!(
                    "global_scale must be finite and > 0, got {global_scale}"
                )));
            }
        }
    }
    Ok(())
}

fn invalid_payload(tensor: &str, reason: String) -> Error {
    Error::InvalidPayload {
        tensor: tensor.to_string(),
        reason,
    }
}

fn invalid_part(tensor: &str, part: &str, reason: String) -> Error {
    Error::InvalidPart {
        tensor: tensor.to_string(),
        part: part.to_string(),
        reason,
    }
}

fn overflow(tensor: &str, what: &str) -> Error {
    Error::Overflow(format!("{what} of tensor {tensor:?}"))
}

/// `a * b`, or an overflow error naming `what`.
fn checked_mul(tensor: &str, what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| overflow(tensor, what))
}

/// Checks that a logical vector has the length the dims imply.
fn check_len(tensor: &str, what: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(invalid_payload(
            tensor,
            format!("{what} has {got} entries, expected {expected}"),
        ));
    }
    Ok(())
}

/// Checks that every one of `rows * per_row` codes (row-major) is `< 2^bits`.
fn check_codes(tensor: &str, part: &str, codes: &[u8], per_row: usize, bits: u8) -> Result<()> {
    let limit = 1u16 << bits;
    match codes.iter().position(|&q| u16::from(q) >= limit) {
        None => Ok(()),
        Some(i) => Err(invalid_payload(
            tensor,
            format!(
                "{part}: code {} at row {}, index {} does not fit in {bits} bits",
                codes[i],
                i / per_row.max(1),
                i % per_row.max(1)
            ),
        )),
    }
}

/// Packs `rows` bit-stream rows of `per_row` values each (`values` row-major) into `rows * stride` bytes.
fn pack_rows(
    tensor: &str,
    values: &[u8],
    rows: usize,
    per_row: usize,
    bits: u8,
) -> Result<Vec<u8>> {
    let row_bytes = stride(per_row, bits).ok_or_else(|| overflow(tensor, "a row stride"))?;
    let mut out = vec![0u8; checked_mul(tensor, "a bit-stream part", rows, row_bytes)?];
    if row_bytes > 0 {
        for (dst, src) in out
            .chunks_exact_mut(row_bytes)
            .zip(values.chunks(per_row.max(1)))
        {
            bits::pack_row(src, bits, dst);
        }
    }
    Ok(out)
}

/// Unpacks `rows` bit-stream rows of `per_row` values each from `src` (whose length the caller checked to
/// be `rows * stride(per_row, bits)`), rejecting non-zero padding bits.
fn unpack_rows(
    tensor: &str,
    part: &str,
    src: &[u8],
    rows: usize,
    per_row: usize,
    bits: u8,
) -> Result<Vec<u8>> {
    let row_bytes = stride(per_row, bits).ok_or_else(|| overflow(tensor, "a row stride"))?;
    let total = checked_mul(tensor, part, rows, per_row)?;
    if src.len() != checked_mul(tensor, part, rows, row_bytes)? {
        return Err(invalid_part(
            tensor,
            part,
            format!(
                "is {} bytes, {rows} rows of {row_bytes} bytes expected",
                src.len()
            ),
        ));
    }
    let mut out = vec![0u8; total];
    for r in 0..rows {
        let row = &src[r * row_bytes..(r + 1) * row_bytes];
        bits::unpack_row(row, per_row, bits, &mut out[r * per_row..(r + 1) * per_row]);
        if !bits::padding_is_zero(row, per_row, bits) {
            return Err(nonzero_padding(tensor, part, r));
        }
    }
    Ok(out)
}

/// Whether [`unpack_rows`] would accept `src` (its length, every row's zero padding), without unpacking.
fn rows_pass(src: &[u8], rows: usize, per_row: usize, bits: u8) -> bool {
    let Some(row_bytes) = stride(per_row, bits) else {
        return false;
    };
    rows.checked_mul(per_row).is_some()
        && rows.checked_mul(row_bytes) == Some(src.len())
        && (row_bytes == 0
            || src
                .chunks_exact(row_bytes)
                .all(|row| bits::padding_is_zero(row, per_row, bits)))
}

fn nonzero_padding(tensor: &str, part: &str, row: usize) -> Error {
    invalid_payload(
        tensor,
        format!("{part}: row {row} has non-zero padding bits after its last value"),
    )
}

/// Little-endian f16 values.
fn f16_bytes(values: &[f16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Reads little-endian f16 values (a trailing odd byte is ignored; lengths are checked before).
fn read_f16s(bytes: &[u8]) -> Vec<f16> {
    bytes
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Checks that every f16 of a per-row table (`per_row` entries a row) is finite.
fn check_finite(tensor: &str, what: &str, values: &[f16], per_row: usize) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(invalid_payload(
            tensor,
            format!(
                "{what}: {} at row {}, group {} is not finite",
                values[i],
                i / per_row.max(1),
                i % per_row.max(1)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    //! Literal bytes for each codec's layout: these pin SPEC.md section 3 down.
    use super::*;

    fn params(bits: u8, group_size: u32, symmetric: bool, global_scale: f32) -> QuantParams {
        QuantParams {
            bits,
            group_size,
            symmetric,
            global_scale,
        }
    }

    fn f16s(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    fn row16(prefix: &[u8]) -> Vec<u8> {
        let mut r = prefix.to_vec();
        r.resize(16, 0);
        r
    }

    fn roundtrip(p: &Payload) -> Vec<Vec<u8>> {
        let parts = p.pack().unwrap();
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let (rows, cols) = p.dims();
        assert_eq!(
            &Payload::unpack("t", &p.codec(), rows, cols, &refs).unwrap(),
            p
        );
        parts
    }

    #[test]
    fn quant_asymmetric_two_groups() {
        // 6 columns, groups of 4: columns 0..4 and 4..6.
        let p = Payload::Quant(Quant {
            rows: 1,
            cols: 6,
            grid: Grid {
                params: params(2, 4, false, 2.0),
                scales: f16s(&[1.0, 0.5]),
                zeros: Some(f16s(&[1.0, 2.0])),
            },
            codes: vec![0, 1, 2, 3, 3, 0],
        });
        let parts = roundtrip(&p);
        assert_eq!(parts[0], row16(&[0xE4, 0x03]));
        assert_eq!(parts[1], [0x00, 0x3C, 0x00, 0x38]); // f16 1.0, 0.5
        assert_eq!(parts[2], [0x00, 0x3C, 0x00, 0x40]); // f16 1.0, 2.0
        assert_eq!(p.dequantize(), [-2.0, 0.0, 2.0, 4.0, 1.0, -2.0]);
    }

    #[test]
    fn sparse24_meta_nibbles() {
        // Run 0 keeps columns 1 and 3 (nibble 1 | 3 << 2 = 0xD), run 1 keeps 4 + 0 and 4 + 2 (0x8).
        let p = Payload::Sparse24(Sparse24 {
            rows: 1,
            cols: 8,
            grid: Grid {
                params: params(4, 0, true, 1.0),
                scales: f16s(&[1.0]),
                zeros: None,
            },
            codes: vec![1, 2, 3, 4],
            positions: vec![1, 3, 0, 2],
        });
        let parts = roundtrip(&p);
        assert_eq!(parts[0], row16(&[0x21, 0x43]));
        assert_eq!(parts[1], row16(&[0x8D]));
        assert_eq!(parts[2], [0x00, 0x3C]);
        // Symmetric 4-bit: z = 8.
        assert_eq!(p.dequantize(), [0.0, -7.0, 0.0, -6.0, -5.0, 0.0, -4.0, 0.0]);
    }

    #[test]
    fn sparse_mask_and_row_ptr() {
        let mask = [1, 0, 0, 1, 1, 0, 0, 0, 0, 0].map(|b| b == 1).to_vec();
        let p = Payload::Sparse(Sparse {
            rows: 2,
            cols: 5,
            grid: Grid {
                params: params(8, 4, true, 0.25),
                scales: f16s(&[1.0, 2.0, 1.0, 1.0]),
                zeros: None,
            },
            mask,
            codes: vec![10, 20, 30],
        });
        let parts = roundtrip(&p);
        let mut mask_bytes = row16(&[0b1_1001]);
        mask_bytes.extend(row16(&[]));
        assert_eq!(parts[0], mask_bytes);
        // Row 0 keeps 3 codes (one 16-byte row), row 1 none (0 bytes).
        assert_eq!(parts[1], [0, 0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0]);
        assert_eq!(parts[2], row16(&[10, 20, 30]));
        // z = 128; column 4 is in group 1 (scale 2.0).
        let want = [
            (10.0 - 128.0) * 0.25,
            0.0,
            0.0,
            (20.0 - 128.0) * 0.25,
            (30.0 - 128.0) * 2.0 * 0.25,
        ];
        assert_eq!(&p.dequantize()[..5], &want);
        assert_eq!(&p.dequantize()[5..], &[0.0; 5]);
    }

    #[test]
    fn sign1_bits() {
        let p = Payload::Sign1(Sign1 {
            rows: 2,
            cols: 3,
            global_scale: 0.5,
            signs: vec![true, false, true, false, false, true],
            scales: f16s(&[2.0, 1.0]),
        });
        let parts = roundtrip(&p);
        let mut signs = row16(&[0b101]);
        signs.extend(row16(&[0b100]));
        assert_eq!(parts[0], signs);
        assert_eq!(parts[1], [0x00, 0x40, 0x00, 0x3C]);
        assert_eq!(p.dequantize(), [1.0, -1.0, 1.0, -0.5, -0.5, 0.5]);
    }

    #[test]
    fn dense_bytes_are_kept() {
        let p = Payload::Dense(Dense {
            rows: 1,
            cols: 2,
            dtype: Dtype::Bf16,
            data: vec![0xC1, 0xFF, 0x80, 0x3F], // a NaN, then 1.0
        });
        let parts = roundtrip(&p);
        assert_eq!(parts, [vec![0xC1, 0xFF, 0x80, 0x3F]]);
        let v = p.dequantize();
        assert!(v[0].is_nan());
        assert_eq!(v[1], 1.0);
    }
}

//! Part layouts: which parts a codec has and how many bytes each takes (SPEC.md sections 3 and 4).
//!
//! These formulas are the contract between the format and the kernels: a kernel reads a part at the
//! strides computed here.

use crate::error::{Error, Result};
use crate::manifest::{Codec, QuantParams};

/// Alignment of every part in the file, and of the data section.
pub const PART_ALIGN: usize = 64;
/// Alignment of every bit-stream row.
pub const ROW_ALIGN: usize = 16;

/// Bytes of one bit-stream row of `n` values of `bits` bits: `round_up(ceil(n*bits/8), 16)`.
pub fn stride(n: usize, bits: u8) -> Option<usize> {
    let total_bits = n.checked_mul(bits as usize)?;
    let bytes = total_bits.div_ceil(8);
    bytes.checked_next_multiple_of(ROW_ALIGN)
}

/// `round_up(len, PART_ALIGN)`.
pub fn padded(len: u64) -> Option<u64> {
    len.checked_next_multiple_of(PART_ALIGN as u64)
}

/// The length a part's raw bytes must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartLen {
    /// Fixed by the codec and the dims.
    Exact(usize),
    /// Data-dependent (the `sparse` codec's `codes`: `row_ptr[N]`); checked when the payload is decoded.
    FromRowPtr,
}

/// One part of a codec's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartSpec {
    /// The part's name.
    pub name: &'static str,
    /// Its raw length.
    pub len: PartLen,
}

/// The parts of `codec` for `n` stored rows of `k` columns, in order; `row_subset` adds `row_index` first.
pub fn part_layout(
    tensor: &str,
    codec: &Codec,
    n: usize,
    k: usize,
    row_subset: bool,
) -> Result<Vec<PartSpec>> {
    let of = || Error::Overflow(format!("the layout of tensor {tensor:?}"));
    let mul = |a: usize, b: usize| a.checked_mul(b).ok_or_else(of);
    let exact = |name, len| PartSpec {
        name,
        len: PartLen::Exact(len),
    };
    let rows_stride =
        |vals: usize, bits: u8| -> Result<usize> { mul(n, stride(vals, bits).ok_or_else(of)?) };
    let grid = |p: &QuantParams, parts: &mut Vec<PartSpec>| -> Result<()> {
        let g = mul(n, p.n_groups(k))?;
        parts.push(exact("scales", mul(g, 2)?));
        if !p.symmetric {
            parts.push(exact("zeros", mul(g, 2)?));
        }
        Ok(())
    };
    let mut parts = Vec::with_capacity(6);
    if row_subset {
        parts.push(exact("row_index", mul(n, 4)?));
    }
    match codec {
        Codec::Dense { dtype } => parts.push(exact("values", mul(mul(n, k)?, dtype.size())?)),
        Codec::Quant(p) => {
            parts.push(exact("codes", rows_stride(k, p.bits)?));
            grid(p, &mut parts)?;
        }
        Codec::Sparse24(p) => {
            parts.push(exact("codes", rows_stride(k / 2, p.bits)?));
            parts.push(exact("meta", rows_stride(k / 4, 4)?));
            grid(p, &mut parts)?;
        }
        Codec::Sparse(p) => {
            parts.push(exact("mask", rows_stride(k, 1)?));
            parts.push(exact("row_ptr", mul(n.checked_add(1).ok_or_else(of)?, 4)?));
            parts.push(PartSpec {
                name: "codes",
                len: PartLen::FromRowPtr,
            });
            grid(p, &mut parts)?;
        }
        Codec::Sign1 { .. } => {
            parts.push(exact("signs", rows_stride(k, 1)?));
            parts.push(exact("scales", mul(n, 2)?));
        }
        Codec::Zero => {}
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides() {
        assert_eq!(stride(0, 4), Some(0));
        assert_eq!(stride(1, 4), Some(16));
        assert_eq!(stride(32, 4), Some(16));
        assert_eq!(stride(33, 4), Some(32));
        assert_eq!(stride(32, 3), Some(16)); // 96 bits = 12 bytes
        assert_eq!(stride(4096, 3), Some(1536));
        assert_eq!(stride(usize::MAX, 8), None);
    }

    #[test]
    fn sparse24_layout() {
        let p = QuantParams {
            bits: 4,
            group_size: 128,
            symmetric: false,
            global_scale: 1.0,
        };
        let l = part_layout("t", &Codec::Sparse24(p), 3, 256, true).unwrap();
        let names: Vec<_> = l.iter().map(|p| p.name).collect();
        assert_eq!(names, ["row_index", "codes", "meta", "scales", "zeros"]);
        let lens: Vec<_> = l.iter().map(|p| p.len).collect();
        assert_eq!(
            lens,
            [
                PartLen::Exact(12),
                PartLen::Exact(3 * 64),
                PartLen::Exact(3 * 32),
                PartLen::Exact(3 * 2 * 2),
                PartLen::Exact(3 * 2 * 2)
            ]
        );
    }
}

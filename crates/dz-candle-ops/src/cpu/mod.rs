//! The CPU side of every op: host views of a delta's parts, dtype conversions, and the engines
//! ([`engine`]) that run the per-codec decoders of [`crate::codec`].

pub(crate) mod engine;
mod isa;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Storage};
use dz_format::Codec;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::borrow::Cow;

pub(crate) use crate::delta::Locked;
use crate::error::{OpError, Result};

/// A delta's parts as host byte slices (borrowed from the CPU storages of its tensors).
pub(crate) struct HostDelta<'a> {
    /// The codec.
    pub codec: Codec,
    /// Rows of the full matrix.
    pub n_total: usize,
    /// Columns.
    pub k: usize,
    /// Stored rows.
    pub n_stored: usize,
    /// The stored rows of a row subset.
    pub row_index: Option<&'a [u32]>,
    /// The codec's parts, in order, without `row_index`.
    pub parts: Vec<&'a [u8]>,
}

impl HostDelta<'_> {
    /// The stored row holding row `row` of the full matrix, if any (`row_index` is strictly increasing).
    #[inline]
    pub(crate) fn stored_row(&self, row: usize) -> Option<usize> {
        match self.row_index {
            None => Some(row),
            Some(idx) => u32::try_from(row)
                .ok()
                .and_then(|r| idx.binary_search(&r).ok()),
        }
    }
}

impl Locked<'_> {
    /// The host view; an error if a storage is not a contiguous CPU storage of the expected dtype.
    pub(crate) fn host(&self, op: &'static str) -> Result<HostDelta<'_>> {
        let d = self.delta;
        let bad = |what: String| OpError::Storage {
            op,
            reason: format!("delta {:?}: {what}", d.name()),
        };
        let mut parts = Vec::with_capacity(self.parts.len());
        for (i, (s, l)) in self.parts.iter().enumerate() {
            let (a, b) = l
                .contiguous_offsets()
                .ok_or_else(|| bad(format!("part {i} is not contiguous")))?;
            match &**s {
                Storage::Cpu(CpuStorage::U8(v)) => parts.push(&v[a..b]),
                other => {
                    return Err(bad(format!(
                        "part {i} is {:?} on {:?}, expected U8 on the CPU",
                        other.dtype(),
                        other.device().location()
                    )))
                }
            }
        }
        let row_index = match &self.row_index {
            None => None,
            Some((s, l)) => {
                let (a, b) = l
                    .contiguous_offsets()
                    .ok_or_else(|| bad("row_index is not contiguous".into()))?;
                match &**s {
                    Storage::Cpu(CpuStorage::U32(v)) => Some(&v[a..b]),
                    other => {
                        return Err(bad(format!(
                            "row_index is {:?} on {:?}, expected U32 on the CPU",
                            other.dtype(),
                            other.device().location()
                        )))
                    }
                }
            }
        };
        let (n_total, k) = d.dims();
        Ok(HostDelta {
            codec: *d.codec(),
            n_total,
            k,
            n_stored: d.stored_rows(),
            row_index,
            parts,
        })
    }
}

/// The `[start, end)` of a contiguous layout in its storage, or a `NotContiguous` error.
pub(crate) fn contiguous(
    op: &'static str,
    arg: &'static str,
    l: &Layout,
) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| OpError::NotContiguous {
            op,
            arg,
            shape: l.dims().to_vec(),
            stride: l.stride().to_vec(),
        })
}

/// A float input (f32, f16 or bf16) as f32: borrowed when it already is f32.
pub(crate) fn floats<'s>(
    op: &'static str,
    arg: &'static str,
    s: &'s CpuStorage,
    l: &Layout,
) -> Result<(Cow<'s, [f32]>, DType)> {
    let (a, b) = contiguous(op, arg, l)?;
    Ok(match s {
        CpuStorage::F32(v) => (Cow::Borrowed(&v[a..b]), DType::F32),
        CpuStorage::F16(v) => {
            let mut out = vec![0.0f32; b - a];
            v[a..b].convert_to_f32_slice(&mut out);
            (Cow::Owned(out), DType::F16)
        }
        CpuStorage::BF16(v) => {
            let mut out = vec![0.0f32; b - a];
            v[a..b].convert_to_f32_slice(&mut out);
            (Cow::Owned(out), DType::BF16)
        }
        other => {
            return Err(OpError::Dtype {
                op,
                arg,
                got: other.dtype(),
                expected: "f32, f16 or bf16".into(),
            })
        }
    })
}

/// f32 values rounded (to nearest even) to `dtype` (f32, f16 or bf16).
pub(crate) fn to_storage(v: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::F16 => {
            let mut out = vec![f16::ZERO; v.len()];
            out.convert_from_f32_slice(&v);
            CpuStorage::F16(out)
        }
        DType::BF16 => {
            let mut out = vec![bf16::ZERO; v.len()];
            out.convert_from_f32_slice(&v);
            CpuStorage::BF16(out)
        }
        _ => CpuStorage::F32(v),
    }
}

//! The kernel descriptor of a delta (dz-kernels' [`DzDelta`]): its parts as device pointers, and per codec
//! the numbers the decoder needs (SPEC.md sections 3-4).

use candle_core::{CudaDevice, Storage};
use dz_format::layout::stride;
use dz_format::{Codec, Dtype, QuantParams};
use dz_kernels::desc::{CODEC_DENSE, CODEC_QUANT, CODEC_SIGN1, CODEC_SPARSE, CODEC_SPARSE24};
use dz_kernels::{DzDelta, ValueDtype, Variant, MAX_DIM};

use super::Ptrs;
use crate::delta::Locked;
use crate::error::{OpError, Result};

/// A delta ready for a launch: its variant (which entry points) and its descriptor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Described {
    pub(crate) variant: Variant,
    pub(crate) desc: DzDelta,
    /// The descriptor of the v4 layout (the same numbers, `parts` = the v4 parts `[codes, meta, scales]`),
    /// when the delta has one.
    pub(crate) v4: Option<DzDelta>,
}

/// `v` as u32, if it is at most [`MAX_DIM`].
pub(crate) fn dim(op: &'static str, arg: &'static str, v: usize, dims: &[usize]) -> Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|&v| v <= MAX_DIM)
        .ok_or_else(|| OpError::Shape {
            op,
            arg,
            got: dims.to_vec(),
            expected: format!("at most {MAX_DIM} rows and columns (the CUDA kernels' limit)"),
        })
}

/// The descriptor of `locked`'s delta, with the device pointers of its parts taken through `ptrs` (which
/// keeps the stream-ordering guards until the launch); `None` for the `zero` codec (no kernel runs).
///
/// Checks what only the storages can tell: every part is a contiguous `U8` CUDA storage on `dev` (the
/// row index `U32`), 16-byte aligned (the kernels load bit-stream rows with 16-byte vector loads).
pub(crate) fn describe<'a>(
    op: &'static str,
    locked: &'a Locked<'_>,
    dev: &CudaDevice,
    ptrs: &mut Ptrs<'a>,
) -> Result<Option<Described>> {
    let d = locked.delta;
    let bad = |what: String| OpError::Storage {
        op,
        reason: format!("delta {:?}: {what}", d.name()),
    };
    let (variant, mut desc) = match variant_and_params(d.codec(), d.dims().1) {
        Some(v) => v,
        None => return Ok(None),
    };
    let (n_total, k) = d.dims();
    desc.n_total = dim(op, "delta", n_total, &[n_total, k])?;
    desc.k = dim(op, "delta", k, &[n_total, k])?;
    desc.n_stored = dim(op, "delta", d.stored_rows(), &[n_total, k])?;
    let mut parts = [0u64; 5];
    if locked.parts.len() > parts.len() {
        return Err(bad(format!("{} parts", locked.parts.len())));
    }
    for (i, (s, l)) in locked.parts.iter().enumerate() {
        let (a, _) = l
            .contiguous_offsets()
            .ok_or_else(|| bad(format!("part {i} is not contiguous")))?;
        let Storage::Cuda(cs) = &**s else {
            return Err(bad(format!(
                "part {i} is on {:?}, expected CUDA",
                s.device().location()
            )));
        };
        if cs.device.id() != dev.id() {
            return Err(bad(format!("part {i} is on another CUDA device")));
        }
        let slice = cs
            .as_cuda_slice::<u8>()
            .map_err(|e| bad(format!("part {i}: {e}")))?;
        parts[i] = ptrs.read(slice, a);
        if parts[i] % 16 != 0 {
            return Err(bad(format!(
                "part {i} is not 16-byte aligned on the device"
            )));
        }
    }
    desc.parts = parts;
    let mut v4 = None;
    if !locked.v4.is_empty() {
        let mut v4_parts = [0u64; 5];
        if locked.v4.len() > v4_parts.len() {
            return Err(bad(format!("{} v4 parts", locked.v4.len())));
        }
        for (i, (s, l)) in locked.v4.iter().enumerate() {
            let (a, _) = l
                .contiguous_offsets()
                .ok_or_else(|| bad(format!("v4 part {i} is not contiguous")))?;
            let Storage::Cuda(cs) = &**s else {
                return Err(bad(format!("v4 part {i} is not on a CUDA device")));
            };
            if cs.device.id() != dev.id() {
                return Err(bad(format!("v4 part {i} is on another CUDA device")));
            }
            let slice = cs
                .as_cuda_slice::<u8>()
                .map_err(|e| bad(format!("v4 part {i}: {e}")))?;
            v4_parts[i] = ptrs.read(slice, a);
            if v4_parts[i] % 16 != 0 {
                return Err(bad(format!(
                    "v4 part {i} is not 16-byte aligned on the device"
                )));
            }
        }
        v4 = Some(v4_parts);
    }
    if let Some((s, l)) = &locked.row_index {
        let (a, _) = l
            .contiguous_offsets()
            .ok_or_else(|| bad("row_index is not contiguous".into()))?;
        let Storage::Cuda(cs) = &**s else {
            return Err(bad(format!(
                "row_index is on {:?}, expected CUDA",
                s.device().location()
            )));
        };
        let slice = cs
            .as_cuda_slice::<u32>()
            .map_err(|e| bad(format!("row_index: {e}")))?;
        desc.row_index = ptrs.read(slice, a);
    }
    let v4 = v4.map(|parts| DzDelta { parts, ..desc });
    Ok(Some(Described { variant, desc, v4 }))
}

/// The variant and the codec fields of the descriptor (dims and pointers are the caller's); `None` for
/// `zero`.
fn variant_and_params(codec: &Codec, k: usize) -> Option<(Variant, DzDelta)> {
    // Strides of validated payloads: `stride` fails only on overflow, which their sizes exclude.
    let stride32 = |n: usize, bits: u8| stride(n, bits).map_or(u32::MAX, |s| s as u32);
    let grid = |p: &QuantParams, codec: u32, stride0: u32, stride1: u32| DzDelta {
        codec,
        bits: u32::from(p.bits),
        group_size: p.group_size,
        n_groups: p.n_groups(k) as u32,
        symmetric: u32::from(p.symmetric),
        global_scale: p.global_scale,
        stride0,
        stride1,
        ..Default::default()
    };
    Some(match codec {
        Codec::Quant(p) => (
            Variant::Quant(p.bits),
            grid(p, CODEC_QUANT, stride32(k, p.bits), 0),
        ),
        Codec::Sparse24(p) => (
            Variant::Sparse24(p.bits),
            grid(
                p,
                CODEC_SPARSE24,
                stride32(k / 2, p.bits),
                stride32(k / 4, 4),
            ),
        ),
        Codec::Sparse(p) => (
            Variant::Sparse(p.bits),
            grid(p, CODEC_SPARSE, stride32(k, 1), 0),
        ),
        Codec::Sign1 { global_scale } => (
            Variant::Sign1,
            DzDelta {
                codec: CODEC_SIGN1,
                global_scale: *global_scale,
                stride0: stride32(k, 1),
                ..Default::default()
            },
        ),
        Codec::Dense { dtype } => {
            let v = match dtype {
                Dtype::F32 => ValueDtype::F32,
                Dtype::F16 => ValueDtype::F16,
                Dtype::Bf16 => ValueDtype::Bf16,
            };
            (
                Variant::Dense(v),
                DzDelta {
                    codec: CODEC_DENSE,
                    value_dtype: v as u32,
                    ..Default::default()
                },
            )
        }
        Codec::Zero => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_follow_the_spec_strides() {
        let p = QuantParams {
            bits: 3,
            group_size: 20,
            symmetric: false,
            global_scale: 0.5,
        };
        let (v, d) = variant_and_params(&Codec::Sparse24(p), 108).unwrap();
        assert_eq!(v, Variant::Sparse24(3));
        assert!(v.entries().is_some());
        // 54 codes of 3 bits = 21 bytes -> 32; 27 nibbles = 14 bytes -> 16.
        assert_eq!((d.stride0, d.stride1), (32, 16));
        assert_eq!(
            (d.bits, d.group_size, d.n_groups, d.symmetric),
            (3, 20, 6, 0)
        );
        let (v, d) = variant_and_params(&Codec::Quant(p), 33).unwrap();
        assert_eq!(v, Variant::Quant(3));
        assert_eq!(d.stride0, 16);
        let (_, d) = variant_and_params(&Codec::Sign1 { global_scale: 2.0 }, 129).unwrap();
        assert_eq!((d.stride0, d.global_scale), (32, 2.0));
        assert!(variant_and_params(&Codec::Zero, 4).is_none());
    }
}

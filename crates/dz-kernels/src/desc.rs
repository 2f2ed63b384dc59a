//! The descriptors the kernels read, shared with `kernels/common/dz_common.cuh` (same layout, checked on
//! both sides: size and offset assertions here, `static_assert`s there).

use std::mem::{offset_of, size_of};

/// [`DzDelta::codec`] of a `quant` delta.
pub const CODEC_QUANT: u32 = 1;
/// [`DzDelta::codec`] of a `sparse24` delta.
pub const CODEC_SPARSE24: u32 = 2;
/// [`DzDelta::codec`] of a `sparse` delta.
pub const CODEC_SPARSE: u32 = 3;
/// [`DzDelta::codec`] of a `sign1` delta.
pub const CODEC_SIGN1: u32 = 4;
/// [`DzDelta::codec`] of a `dense` delta.
pub const CODEC_DENSE: u32 = 5;

/// One packed delta on the device, in the layout of SPEC.md sections 3-4: what a kernel needs to decode it.
///
/// The kernels trust it: the host fills it from a validated payload (dz-candle-ops' `DeviceDelta`), with
/// the device pointers of its parts.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DzDelta {
    /// Device pointers of the codec's parts in SPEC.md section 4 order, without `row_index`; 0 past the
    /// codec's last part. Bit-stream parts must be 16-byte aligned, the others aligned to their element.
    pub parts: [u64; 5],
    /// Device pointer of the `row_index` (`n_stored` u32, strictly increasing), or 0 when every row is
    /// stored.
    pub row_index: u64,
    /// Rows of the full matrix (`N_total`).
    pub n_total: u32,
    /// Columns (`K`).
    pub k: u32,
    /// Stored rows (`N`, or `R` for a row subset).
    pub n_stored: u32,
    /// `CODEC_*`.
    pub codec: u32,
    /// Code bits (quant, sparse24, sparse); 0 otherwise.
    pub bits: u32,
    /// Columns per group; 0 = the whole row is one group.
    pub group_size: u32,
    /// Groups per row.
    pub n_groups: u32,
    /// 1: symmetric grid (zero point `2^(bits-1)`); 0: a `zeros` part follows `scales`.
    pub symmetric: u32,
    /// Multiplies every scale.
    pub global_scale: f32,
    /// Bytes per row of part 0 (`codes`, `mask` or `signs`): `stride(..)` of SPEC.md section 3.
    pub stride0: u32,
    /// Bytes per row of part 1 (`meta` of sparse24); 0 otherwise.
    pub stride1: u32,
    /// A dense delta's value dtype: [`ValueDtype`] as u32.
    pub value_dtype: u32,
}

const _: () = assert!(size_of::<DzDelta>() == 96);
const _: () = assert!(offset_of!(DzDelta, row_index) == 40);
const _: () = assert!(offset_of!(DzDelta, n_total) == 48);
const _: () = assert!(offset_of!(DzDelta, codec) == 60);
const _: () = assert!(offset_of!(DzDelta, global_scale) == 80);
const _: () = assert!(offset_of!(DzDelta, value_dtype) == 92);

/// A run of at most `M_TILES[t]` input rows of an sbmm launch (`_m<M_TILES[t]>`) that uses one delta.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DzSegment {
    /// First row of `x` (flattened to `[M, K]`).
    pub start: u32,
    /// Rows: 1 to the launch's tile.
    pub len: u32,
    /// Index into the launch's [`DzDelta`] array.
    pub delta: u32,
    /// Zero.
    pub reserved: u32,
}

const _: () = assert!(size_of::<DzSegment>() == 16);
const _: () = assert!(offset_of!(DzSegment, delta) == 8);

/// A dense delta's stored dtype ([`DzDelta::value_dtype`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ValueDtype {
    /// f32.
    F32 = 0,
    /// f16.
    F16 = 1,
    /// bf16.
    Bf16 = 2,
}

/// Plain-old-data descriptors: `#[repr(C)]`, only `u32`/`u64`/`f32` fields, no padding (the size
/// assertions above add up the fields), so every byte is initialized and any byte pattern is a value.
///
/// # Safety
/// Implement only for such types.
pub unsafe trait Pod: Copy {}

// SAFETY: repr(C), fields u64/u32/f32 only, size asserted equal to the sum of the fields (no padding).
unsafe impl Pod for DzDelta {}
// SAFETY: repr(C), four u32, size asserted 16 (no padding).
unsafe impl Pod for DzSegment {}

/// The bytes of a slice of descriptors, for a host-to-device copy.
pub fn as_bytes<T: Pod>(items: &[T]) -> &[u8] {
    // SAFETY: `T: Pod` has no padding and no invalid bit patterns, so its memory is `size_of_val(items)`
    // initialized bytes; the returned slice borrows `items` and lives no longer.
    unsafe { std::slice::from_raw_parts(items.as_ptr().cast::<u8>(), std::mem::size_of_val(items)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_bytes_are_little_endian_fields() {
        let d = DzDelta {
            n_total: 0x0102_0304,
            global_scale: 1.5,
            ..Default::default()
        };
        let b = as_bytes(std::slice::from_ref(&d));
        assert_eq!(b.len(), 96);
        assert_eq!(&b[48..52], &0x0102_0304u32.to_ne_bytes());
        assert_eq!(&b[80..84], &1.5f32.to_ne_bytes());
        let s = [DzSegment {
            start: 1,
            len: 2,
            delta: 3,
            reserved: 0,
        }; 2];
        assert_eq!(as_bytes(&s).len(), 32);
    }
}

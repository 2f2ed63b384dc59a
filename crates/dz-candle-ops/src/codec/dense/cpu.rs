//! CPU decoder of `dense`: convert the chunk's little-endian values to f32 (exact for every dtype).

use std::marker::PhantomData;

use half::{bf16, f16};

use crate::codec::RowDecode;
use crate::cpu::HostDelta;

/// A stored dtype: its size and its little-endian decoding.
pub(crate) trait Elem: Sync {
    /// Bytes per value.
    const SIZE: usize;
    /// The value of `b` (`SIZE` bytes) as f32.
    fn read(b: &[u8]) -> f32;
}

/// `f32` values.
pub(crate) struct F32;
/// `f16` values.
pub(crate) struct F16;
/// `bf16` values.
pub(crate) struct Bf16;

impl Elem for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn read(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Elem for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn read(b: &[u8]) -> f32 {
        f16::from_le_bytes([b[0], b[1]]).to_f32()
    }
}

impl Elem for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn read(b: &[u8]) -> f32 {
        bf16::from_le_bytes([b[0], b[1]]).to_f32()
    }
}

/// Decoder of `dense` values of dtype `E`.
pub(crate) struct DenseDec<'a, E> {
    values: &'a [u8],
    rows: usize,
    cols: usize,
    elem: PhantomData<E>,
}

impl<'a, E: Elem> DenseDec<'a, E> {
    /// `h` holds a validated `dense` payload of dtype `E`.
    pub(crate) fn new(h: &HostDelta<'a>) -> Self {
        DenseDec {
            values: h.parts[0],
            rows: h.n_stored,
            cols: h.k,
            elem: PhantomData,
        }
    }
}

impl<E: Elem> RowDecode for DenseDec<'_, E> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    #[inline(always)]
    fn decode(&self, r: usize, c0: usize, out: &mut [f32]) {
        let at = (r * self.cols + c0) * E::SIZE;
        let src = &self.values[at..at + out.len() * E::SIZE];
        for (o, b) in out.iter_mut().zip(src.chunks_exact(E::SIZE)) {
            *o = E::read(b);
        }
    }
}

//! The one error type of this crate, and its conversion into candle's error.
//!
//! Every op checks its inputs before it touches memory and answers a bad input with one of these variants.
//! The public functions return `candle_core::Result` (they are candle ops), so an [`OpError`] travels as
//! `candle_core::Error::Wrapped`: its message is kept verbatim, and starts with the op's name.

use candle_core::{DType, DeviceLocation};

/// A `Result` whose error is [`OpError`].
pub type Result<T> = std::result::Result<T, OpError>;

/// What can be wrong with the inputs of an op, or with the parts a [`DeviceDelta`](crate::DeviceDelta)
/// is built from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    /// An input has a dtype the op does not take.
    #[error("{op}: wrong dtype: {arg} is {got:?}, expected {expected}")]
    Dtype {
        /// The op (its kebab-case name).
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// Its dtype.
        got: DType,
        /// What the op takes.
        expected: String,
    },
    /// An input has a shape the op does not take.
    #[error("{op}: wrong shape: {arg} is {got:?}, expected {expected}")]
    Shape {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// Its dims.
        got: Vec<usize>,
        /// What the op takes.
        expected: String,
    },
    /// An input lives on another device than the delta.
    #[error("{op}: wrong device: {arg} is on {got:?}, the delta {delta:?} is on {expected:?}")]
    Device {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// Its device.
        got: DeviceLocation,
        /// The delta's name.
        delta: String,
        /// The delta's device.
        expected: DeviceLocation,
    },
    /// An input is not contiguous in memory (row-major, possibly with an offset).
    #[error("{op}: not contiguous: {arg} (shape {shape:?}, stride {stride:?}); call .contiguous() first")]
    NotContiguous {
        /// The op.
        op: &'static str,
        /// The argument.
        arg: &'static str,
        /// Its dims.
        shape: Vec<usize>,
        /// Its strides.
        stride: Vec<usize>,
    },
    /// The delta cannot be used by this op (its role or codec does not fit the op).
    #[error("{op}: codec/op mismatch: delta {delta:?} ({codec}): {reason}")]
    Mismatch {
        /// The op.
        op: &'static str,
        /// The delta's name.
        delta: String,
        /// The delta's codec, described.
        codec: String,
        /// Why.
        reason: String,
    },
    /// The segment list of `sbmm` does not cover the rows exactly, in order, or names a missing delta.
    #[error("{op}: bad segments: {reason}")]
    Segments {
        /// The op.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A slot-table `sbmm` ([`crate::sbmm_slots`]) names a slot past the layer's [`crate::SlotDeltas`].
    #[error(
        "{op}: the segments use slot {slot}, but the layer's slot table has {slots} slots \
         (set every slot the batch uses, with None where the layer has no delta)"
    )]
    Slot {
        /// The op.
        op: &'static str,
        /// The slot.
        slot: usize,
        /// Slots in the layer's table.
        slots: usize,
    },
    /// The deltas of one `sbmm` call differ in shape.
    #[error(
        "{op}: delta shapes differ: delta {index} ({name:?}) is {got:?} \
         but delta 0 ({first:?}) is {expected:?}"
    )]
    DeltaShapes {
        /// The op.
        op: &'static str,
        /// Index of the first delta that differs.
        index: usize,
        /// Its name.
        name: String,
        /// Its `(N_total, K)`.
        got: (usize, usize),
        /// The first delta's name.
        first: String,
        /// The first delta's `(N_total, K)`.
        expected: (usize, usize),
    },
    /// A token id is not a row of the embedding delta.
    #[error("{op}: token id {id} at position {position} is not below the {rows} rows of delta {delta:?}")]
    IdOutOfRange {
        /// The op.
        op: &'static str,
        /// The id.
        id: i64,
        /// Its position in the flattened ids.
        position: usize,
        /// The delta's `N_total`.
        rows: usize,
        /// The delta's name.
        delta: String,
    },
    /// A storage is not what the op's device path expects (a delta part that is not `U8` on this device).
    #[error("{op}: storage: {reason}")]
    Storage {
        /// The op.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The packed parts of a delta do not form a valid payload (layout or content), as dz-format says.
    #[error("delta {tensor:?}: invalid parts: {source}")]
    Format {
        /// The tensor's name.
        tensor: String,
        /// dz-format's error.
        #[source]
        source: dz_format::Error,
    },
}

impl From<OpError> for candle_core::Error {
    fn from(e: OpError) -> Self {
        candle_core::Error::wrap(e)
    }
}

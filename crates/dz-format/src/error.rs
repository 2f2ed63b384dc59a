//! The one error type of dz-format.

use std::path::PathBuf;

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can be wrong with a delta file, its manifest, or a payload.
///
/// Each variant names one failure; readers never panic on malformed input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than the 8-byte header length.
    #[error("file is {len} bytes, too short for a delta file (needs at least 8)")]
    TooShort {
        /// The file's length.
        len: u64,
    },
    /// The header length is larger than the limit.
    #[error("header length {len} exceeds the limit of {max} bytes")]
    HeaderTooLarge {
        /// The header length read from the file.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The header extends past the end of the file (a truncated file).
    #[error("truncated file: header needs {needed} bytes but the file has {file_len}")]
    HeaderOutOfBounds {
        /// Bytes needed for the length prefix plus the header.
        needed: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The header is not valid UTF-8 JSON of the safetensors shape.
    #[error("invalid safetensors header: {0}")]
    InvalidHeader(String),
    /// A safetensors file that is not a deltazip delta (its metadata lacks `format = deltazip`).
    #[error("not a deltazip delta: {0}")]
    NotADeltaFile(String),
    /// The version string cannot be parsed.
    #[error("invalid format version {0:?} (expected MAJOR.MINOR)")]
    InvalidVersion(String),
    /// The file's major version differs from the one this reader implements.
    #[error(
        "unsupported format version {found}: this reader implements major version {supported}"
    )]
    UnsupportedMajor {
        /// The file's version.
        found: String,
        /// The reader's major version.
        supported: u32,
    },
    /// The file's minor version is newer than this reader's.
    #[error("format version {found} is newer than this reader's {supported}: upgrade deltazip")]
    NewerMinor {
        /// The file's version.
        found: String,
        /// The reader's version.
        supported: String,
    },
    /// The manifest JSON does not parse or has a field of the wrong type.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// Two tensors share a name.
    #[error("duplicate tensor {0:?} in manifest")]
    DuplicateTensor(String),
    /// A tensor's shape or dtype is invalid.
    #[error("tensor {tensor:?}: invalid shape: {reason}")]
    InvalidShape {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A codec's parameters are invalid for the tensor.
    #[error("tensor {tensor:?}: invalid codec: {reason}")]
    InvalidCodec {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The parts listed for a tensor are not the codec's parts, or their lengths disagree with the layout.
    #[error("tensor {tensor:?}: part {part:?}: {reason}")]
    InvalidPart {
        /// The tensor.
        tensor: String,
        /// The part.
        part: String,
        /// What is wrong.
        reason: String,
    },
    /// The safetensors entries do not mirror the manifest.
    #[error("safetensors header disagrees with the manifest: {0}")]
    HeaderMismatch(String),
    /// The data section's length is not what the manifest implies (truncated or trailing bytes).
    #[error("data section is {got} bytes but the manifest implies {expected} (truncated or extended file)")]
    DataLength {
        /// Bytes implied by the manifest.
        expected: u64,
        /// Bytes present.
        got: u64,
    },
    /// The header length does not put the data section at a 64-byte boundary.
    #[error("data section starts at offset {offset}, which is not 64-byte aligned")]
    Misaligned {
        /// The data section's offset.
        offset: u64,
    },
    /// A padding byte after a part is not zero.
    #[error("tensor {tensor:?}: part {part:?}: non-zero padding byte")]
    NonZeroPadding {
        /// The tensor.
        tensor: String,
        /// The part.
        part: String,
    },
    /// A part's stored bytes do not match their checksum (a corrupt file).
    #[error("tensor {tensor:?}: part {part:?}: checksum mismatch (expected {expected}, got {got}): the file is corrupt")]
    ChecksumMismatch {
        /// The tensor.
        tensor: String,
        /// The part.
        part: String,
        /// The checksum in the manifest.
        expected: String,
        /// The checksum of the bytes.
        got: String,
    },
    /// A zstd frame fails to decode or decodes to the wrong length.
    #[error("tensor {tensor:?}: part {part:?}: zstd: {reason}")]
    Decompress {
        /// The tensor.
        tensor: String,
        /// The part.
        part: String,
        /// What went wrong.
        reason: String,
    },
    /// A payload's decoded content is invalid (bad 2:4 metadata, row pointers, row index, non-finite scale).
    #[error("tensor {tensor:?}: invalid payload: {reason}")]
    InvalidPayload {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// Size arithmetic overflowed.
    #[error("size overflow computing {0}")]
    Overflow(String),
    /// A tensor was asked for that the file does not hold.
    #[error("no tensor {0:?} in this delta")]
    UnknownTensor(String),
    /// The delta was made against another base model.
    #[error("delta was made against another base model: {reason} (delta's base {expected}, this base {got})")]
    BaseMismatch {
        /// Which tensor differs or is missing, or another explanation.
        reason: String,
        /// The delta's combined base fingerprint.
        expected: String,
        /// The given base's combined fingerprint.
        got: String,
    },
    /// A tensor cannot be cut into the asked shard for tensor parallelism (SPEC.md section 8): the
    /// range does not divide evenly, or it would cut a quantization group or a 2:4 run.
    #[error("tensor {tensor:?}: cannot shard {split}: {reason}")]
    Unshardable {
        /// The tensor.
        tensor: String,
        /// The split asked for: the axis and, when known, the range.
        split: String,
        /// Why not.
        reason: String,
    },
    /// The writer was used wrongly (e.g. a tensor's data does not fit its declared layout).
    #[error("writer: {0}")]
    Writer(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

//! The manifest: what a delta file holds (SPEC.md section 2), and its validation.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout::{part_layout, PartLen};

/// The format version this crate reads and writes.
pub const FORMAT_VERSION: FormatVersion = FormatVersion { major: 1, minor: 0 };

/// A `MAJOR.MINOR` format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FormatVersion {
    /// Incompatible changes.
    pub major: u32,
    /// Compatible additions (new codecs or fields).
    pub minor: u32,
}

impl FormatVersion {
    /// Parses `MAJOR.MINOR` (decimal, no leading zeros, no sign).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::InvalidVersion(s.to_string());
        let (ma, mi) = s.split_once('.').ok_or_else(bad)?;
        let num = |p: &str| -> Result<u32> {
            let ok = !p.is_empty()
                && p.len() <= 9
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p == "0" || !p.starts_with('0'));
            if !ok {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        Ok(Self {
            major: num(ma)?,
            minor: num(mi)?,
        })
    }

    /// Checks that a file of version `self` can be read by this crate.
    pub fn check_supported(self) -> Result<()> {
        if self.major != FORMAT_VERSION.major {
            return Err(Error::UnsupportedMajor {
                found: self.to_string(),
                supported: FORMAT_VERSION.major,
            });
        }
        if self.minor > FORMAT_VERSION.minor {
            return Err(Error::NewerMinor {
                found: self.to_string(),
                supported: FORMAT_VERSION.to_string(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The manifest of one delta file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The fine-tune's name.
    pub name: String,
    /// The fine-tune's `config.json`, verbatim.
    pub architecture: serde_json::Value,
    /// The fingerprint of the base model the delta was made against.
    pub base: BaseFingerprint,
    /// How the delta was made.
    pub recipe: Recipe,
    /// The stored tensors, in file order.
    pub tensors: Vec<TensorEntry>,
}

/// Content hashes of the base weights (SPEC.md section 6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseFingerprint {
    /// BLAKE3 over all tensor hashes, lowercase hex.
    pub combined: String,
    /// Per base tensor: BLAKE3 of its name, dtype, shape and bytes, lowercase hex.
    pub tensors: BTreeMap<String, String>,
}

/// How a delta was made. Known keys are typed; others are kept verbatim in `extra`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Recipe {
    /// The program and version that wrote the file.
    pub tool: String,
    /// `obs`, `rtn`, `magnitude`, `sign`, `mixed`, ...
    pub method: String,
    /// Bits per stored value, when one value applies to all linear tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u8>,
    /// `2:4`, a density like `0.5`, or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<String>,
    /// Quantization group size (0 = whole row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<u32>,
    /// Symmetric quantization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric: Option<bool>,
    /// The size budget asked for, as a ratio against the dense fine-tune.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ratio: Option<f64>,
    /// Any other keys.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// What a stored tensor means relative to the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Delta of a linear layer's weight.
    Linear,
    /// Delta of the token embedding.
    Embedding,
    /// Delta of the output head.
    LmHead,
    /// Delta of a norm, bias or other small tensor, stored dense.
    DenseDelta,
    /// The fine-tune's own value, replacing (or adding) a base tensor.
    Full,
}

impl Role {
    /// The name used in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Linear => "linear",
            Role::Embedding => "embedding",
            Role::LmHead => "lm_head",
            Role::DenseDelta => "dense_delta",
            Role::Full => "full",
        }
    }
}

/// A floating-point dtype of a fine-tune tensor or of dense values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl Dtype {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// The name used in the manifest and in fingerprints.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// The parameters of a quantization grid (SPEC.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantParams {
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u8,
    /// Columns per group; 0 = the whole row is one group.
    pub group_size: u32,
    /// Symmetric grid (zero point `2^(bits-1)`), else a stored f16 zero point per group.
    pub symmetric: bool,
    /// Multiplies every scale; finite and > 0.
    pub global_scale: f32,
}

impl QuantParams {
    /// Number of groups in a row of `k` columns.
    pub fn n_groups(&self, k: usize) -> usize {
        if self.group_size == 0 {
            1
        } else {
            k.div_ceil(self.group_size as usize)
        }
    }

    /// The group of column `col`.
    pub fn group_of(&self, col: usize) -> usize {
        if self.group_size == 0 {
            0
        } else {
            col / self.group_size as usize
        }
    }

    /// Checks the parameters (bits, group size, global scale).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !matches!(self.bits, 2 | 3 | 4 | 8) {
            return Err(format!("bits must be 2, 3, 4 or 8, got {}", self.bits));
        }
        if self.group_size != 0 && (self.group_size < 4 || !self.group_size.is_multiple_of(4)) {
            return Err(format!(
                "group_size must be 0 or a multiple of 4 that is at least 4, got {}",
                self.group_size
            ));
        }
        if !(self.global_scale.is_finite() && self.global_scale > 0.0) {
            return Err(format!(
                "global_scale must be finite and > 0, got {}",
                self.global_scale
            ));
        }
        Ok(())
    }
}

/// How a tensor's values are packed (SPEC.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Codec {
    /// Plain values of a float dtype.
    Dense {
        /// The stored dtype.
        dtype: Dtype,
    },
    /// Every entry quantized.
    Quant(QuantParams),
    /// 2:4 structured sparse, kept entries quantized.
    Sparse24(QuantParams),
    /// Unstructured sparse (bitmap), kept entries quantized.
    Sparse(QuantParams),
    /// One sign bit per entry and one scale per row.
    Sign1 {
        /// Multiplies every row scale; finite and > 0.
        global_scale: f32,
    },
    /// An exactly zero delta: the fine-tune left this tensor as the base has it. No parts.
    Zero,
}

impl Codec {
    /// The codec's name in the manifest.
    pub fn kind(&self) -> &'static str {
        match self {
            Codec::Dense { .. } => "dense",
            Codec::Quant(_) => "quant",
            Codec::Sparse24(_) => "sparse24",
            Codec::Sparse(_) => "sparse",
            Codec::Sign1 { .. } => "sign1",
            Codec::Zero => "zero",
        }
    }

    /// The quantization grid, for the codecs that have one.
    pub fn quant_params(&self) -> Option<&QuantParams> {
        match self {
            Codec::Quant(p) | Codec::Sparse24(p) | Codec::Sparse(p) => Some(p),
            Codec::Dense { .. } | Codec::Sign1 { .. } | Codec::Zero => None,
        }
    }

    /// A short human description, e.g. `sparse24 4b g128 sym`.
    pub fn describe(&self) -> String {
        match self {
            Codec::Dense { dtype } => format!("dense {}", dtype.as_str()),
            Codec::Sign1 { .. } => "sign1".to_string(),
            Codec::Zero => "zero".to_string(),
            Codec::Quant(p) | Codec::Sparse24(p) | Codec::Sparse(p) => {
                let g = if p.group_size == 0 {
                    "row".to_string()
                } else {
                    format!("g{}", p.group_size)
                };
                let s = if p.symmetric { "sym" } else { "asym" };
                format!("{} {}b {} {}", self.kind(), p.bits, g, s)
            }
        }
    }
}

/// How a part's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is.
    None,
    /// One zstd frame.
    Zstd,
}

/// One part of a stored tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartEntry {
    /// The part's name (see SPEC.md section 4).
    pub name: String,
    /// Stored bytes.
    pub len: u64,
    /// Bytes after the lossless stage is undone.
    pub raw_len: u64,
    /// How the bytes are stored.
    pub compression: Compression,
    /// BLAKE3-256 of the stored bytes, lowercase hex.
    pub blake3: String,
}

/// One stored tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// The fine-tune's tensor name.
    pub name: String,
    /// What the stored values mean.
    pub role: Role,
    /// The original shape.
    pub shape: Vec<u64>,
    /// The fine-tune's dtype for this tensor.
    pub dtype: Dtype,
    /// How the values are packed.
    pub codec: Codec,
    /// The number of stored rows, when only some rows are stored.
    #[serde(default)]
    pub rows: Option<u64>,
    /// The parts, in the codec's order.
    pub parts: Vec<PartEntry>,
}

/// Largest number of dimensions of a stored tensor.
pub const MAX_DIMS: usize = 4;

impl TensorEntry {
    /// The matrix view `(N_total, K)` of the shape (SPEC.md section 2).
    pub fn matrix_dims(&self) -> Result<(usize, usize)> {
        matrix_dims(&self.name, &self.shape)
    }

    /// `(N, K)`: the stored rows and the columns.
    pub fn stored_dims(&self) -> Result<(usize, usize)> {
        let (n_total, k) = self.matrix_dims()?;
        match self.rows {
            None => Ok((n_total, k)),
            Some(r) => Ok((usize::try_from(r).map_err(|_| overflow(&self.name))?, k)),
        }
    }

    /// Total stored bytes of all parts.
    pub fn stored_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.len).sum()
    }

    /// Bytes the tensor takes dense in its own dtype.
    pub fn dense_bytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size() as u64
    }

    /// Checks shape, codec and part list against SPEC.md (everything that needs no payload bytes).
    pub fn validate(&self) -> Result<()> {
        let (n_total, k) = self.matrix_dims()?;
        let bad_codec = |reason: String| Error::InvalidCodec {
            tensor: self.name.clone(),
            reason,
        };
        match &self.codec {
            Codec::Dense { .. } => {}
            Codec::Zero => {
                if self.role == Role::Full {
                    return Err(bad_codec(
                        "a `full` tensor holds values, it cannot be `zero`".into(),
                    ));
                }
                if self.rows.is_some() {
                    return Err(bad_codec("a `zero` tensor stores no rows".into()));
                }
            }
            Codec::Quant(p) | Codec::Sparse(p) => p.validate().map_err(bad_codec)?,
            Codec::Sparse24(p) => {
                p.validate().map_err(bad_codec)?;
                if k % 4 != 0 {
                    return Err(bad_codec(format!(
                        "2:4 sparsity needs the column count to be a multiple of 4, got {k}"
                    )));
                }
            }
            Codec::Sign1 { global_scale } => {
                if !(global_scale.is_finite() && *global_scale > 0.0) {
                    return Err(bad_codec(format!(
                        "global_scale must be finite and > 0, got {global_scale}"
                    )));
                }
            }
        }
        if let Some(r) = self.rows {
            if self.role == Role::Full {
                return Err(bad_codec(
                    "a `full` tensor cannot store a row subset".into(),
                ));
            }
            if r == 0 || r > n_total as u64 {
                return Err(Error::InvalidShape {
                    tensor: self.name.clone(),
                    reason: format!("rows = {r} must be in 1..={n_total}"),
                });
            }
        }
        let (n, _) = self.stored_dims()?;
        let layout = part_layout(&self.name, &self.codec, n, k, self.rows.is_some())?;
        if layout.len() != self.parts.len() {
            return Err(Error::InvalidPart {
                tensor: self.name.clone(),
                part: self
                    .parts
                    .get(layout.len())
                    .map_or("", |p| &p.name)
                    .to_string(),
                reason: format!(
                    "codec {} has {} parts ({}), the manifest lists {}",
                    self.codec.kind(),
                    layout.len(),
                    layout.iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
                    self.parts.len()
                ),
            });
        }
        for (spec, part) in layout.iter().zip(&self.parts) {
            let bad = |reason: String| Error::InvalidPart {
                tensor: self.name.clone(),
                part: part.name.clone(),
                reason,
            };
            if spec.name != part.name {
                return Err(bad(format!("expected part {:?} here", spec.name)));
            }
            match spec.len {
                PartLen::Exact(len) if part.raw_len != len as u64 => {
                    return Err(bad(format!(
                        "raw_len is {} but the layout needs {len}",
                        part.raw_len
                    )));
                }
                PartLen::FromRowPtr => {
                    // At most every entry stored: bounds what a reader may allocate for it.
                    let bits = self.codec.quant_params().map_or(8, |p| p.bits);
                    let max = crate::layout::stride(k, bits)
                        .and_then(|s| s.checked_mul(n))
                        .ok_or_else(|| overflow(&self.name))?;
                    if part.raw_len > max as u64 {
                        return Err(bad(format!(
                            "raw_len {} exceeds {max}, the size with every entry stored",
                            part.raw_len
                        )));
                    }
                }
                PartLen::Exact(_) => {}
            }
            if part.compression == Compression::None && part.len != part.raw_len {
                return Err(bad(format!(
                    "uncompressed part has len {} != raw_len {}",
                    part.len, part.raw_len
                )));
            }
            if !is_hex_digest(&part.blake3) {
                return Err(bad("blake3 must be 64 lowercase hex characters".into()));
            }
        }
        Ok(())
    }
}

impl Manifest {
    /// Validates every tensor entry and the uniqueness of names.
    pub fn validate(&self) -> Result<()> {
        if !is_hex_digest(&self.base.combined) {
            return Err(Error::InvalidManifest(
                "base.combined must be 64 lowercase hex characters".into(),
            ));
        }
        if let Some((name, _)) = self.base.tensors.iter().find(|(_, h)| !is_hex_digest(h)) {
            return Err(Error::InvalidManifest(format!(
                "base.tensors[{name:?}] must be 64 lowercase hex characters"
            )));
        }
        let mut seen = HashSet::with_capacity(self.tensors.len());
        for t in &self.tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(Error::DuplicateTensor(t.name.clone()));
            }
            t.validate()?;
        }
        Ok(())
    }

    /// The entry of a tensor, by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Total stored bytes of all parts (without file padding and header).
    pub fn stored_bytes(&self) -> u64 {
        self.tensors.iter().map(TensorEntry::stored_bytes).sum()
    }
}

/// The matrix view `(N_total, K)` of a shape (SPEC.md section 2), checked.
pub fn matrix_dims(tensor: &str, shape: &[u64]) -> Result<(usize, usize)> {
    let bad = |reason: String| Error::InvalidShape {
        tensor: tensor.to_string(),
        reason,
    };
    if shape.is_empty() || shape.len() > MAX_DIMS {
        return Err(bad(format!(
            "must have 1 to {MAX_DIMS} dimensions, has {}",
            shape.len()
        )));
    }
    if shape.contains(&0) {
        return Err(bad(format!("dimensions must be >= 1, got {shape:?}")));
    }
    let (last, rest) = shape.split_last().expect("non-empty");
    let n = rest
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| overflow(tensor))?;
    // Every entry must be addressable in bytes even as f32.
    n.checked_mul(*last)
        .and_then(|e| e.checked_mul(4))
        .filter(|&b| b <= isize::MAX as u64)
        .ok_or_else(|| overflow(tensor))?;
    let n = usize::try_from(n).map_err(|_| overflow(tensor))?;
    let k = usize::try_from(*last).map_err(|_| overflow(tensor))?;
    Ok((n, k))
}

fn overflow(tensor: &str) -> Error {
    Error::Overflow(format!("the size of tensor {tensor:?}"))
}

pub(crate) fn is_hex_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parse_and_support() {
        assert_eq!(
            FormatVersion::parse("1.0").unwrap(),
            FormatVersion { major: 1, minor: 0 }
        );
        for bad in [
            "", "1", "1.", ".1", "01.0", "1.00", "a.b", "-1.0", "1.0.0", "1.+1",
        ] {
            assert!(
                matches!(FormatVersion::parse(bad), Err(Error::InvalidVersion(_))),
                "{bad:?} should not parse"
            );
        }
        assert!(FormatVersion::parse("1.0")
            .unwrap()
            .check_supported()
            .is_ok());
        assert!(matches!(
            FormatVersion::parse("2.0").unwrap().check_supported(),
            Err(Error::UnsupportedMajor { .. })
        ));
        assert!(matches!(
            FormatVersion::parse("1.1").unwrap().check_supported(),
            Err(Error::NewerMinor { .. })
        ));
    }

    #[test]
    fn codec_json_shape() {
        let c = Codec::Sparse24(QuantParams {
            bits: 4,
            group_size: 128,
            symmetric: true,
            global_scale: 0.5,
        });
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(
            j,
            r#"{"kind":"sparse24","bits":4,"group_size":128,"symmetric":true,"global_scale":0.5}"#
        );
        assert_eq!(serde_json::from_str::<Codec>(&j).unwrap(), c);
        let d: Codec = serde_json::from_str(r#"{"kind":"dense","dtype":"bf16"}"#).unwrap();
        assert_eq!(d, Codec::Dense { dtype: Dtype::Bf16 });
    }

    #[test]
    fn matrix_view() {
        assert_eq!(matrix_dims("t", &[7]).unwrap(), (1, 7));
        assert_eq!(matrix_dims("t", &[3, 5]).unwrap(), (3, 5));
        assert_eq!(matrix_dims("t", &[2, 3, 5]).unwrap(), (6, 5));
        assert!(matches!(
            matrix_dims("t", &[]),
            Err(Error::InvalidShape { .. })
        ));
        assert!(matches!(
            matrix_dims("t", &[3, 0]),
            Err(Error::InvalidShape { .. })
        ));
        assert!(matches!(
            matrix_dims("t", &[u64::MAX, 2]),
            Err(Error::Overflow(_))
        ));
    }
}

//! The base-model fingerprint (SPEC.md section 6): content hashes that bind a delta to the exact base
//! weights it was made against.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::manifest::BaseFingerprint;

/// BLAKE3 of one base tensor: `name || 0 || dtype || 0 || u64 ndims || u64 dims... || bytes`, lowercase hex.
///
/// `dtype` is the lowercase safetensors dtype name (`f32`, `f16`, `bf16`, ...); `bytes` the tensor's data as
/// stored (little-endian, row-major).
pub fn tensor_hash(name: &str, dtype: &str, shape: &[u64], bytes: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(name.as_bytes());
    h.update(&[0]);
    h.update(dtype.as_bytes());
    h.update(&[0]);
    h.update(&(shape.len() as u64).to_le_bytes());
    for d in shape {
        h.update(&d.to_le_bytes());
    }
    h.update(bytes);
    h.finalize().to_hex().to_string()
}

impl BaseFingerprint {
    /// Builds a fingerprint from per-tensor hashes (as returned by [`tensor_hash`]).
    pub fn from_tensor_hashes(tensors: BTreeMap<String, String>) -> Self {
        let mut h = blake3::Hasher::new();
        for (name, hash) in &tensors {
            h.update(name.as_bytes());
            h.update(&[0]);
            h.update(&hex_to_bytes(hash));
        }
        Self {
            combined: h.finalize().to_hex().to_string(),
            tensors,
        }
    }

    /// Recomputes `combined` from `tensors` and checks it equals the stored value.
    pub fn is_consistent(&self) -> bool {
        Self::from_tensor_hashes(self.tensors.clone()).combined == self.combined
    }

    /// Checks that `base` (the fingerprint of the base a user supplied) is the base this delta was made
    /// against. The error names the first tensor that differs, is missing, or is extra.
    pub fn check_base(&self, base: &BaseFingerprint) -> Result<()> {
        if self.combined == base.combined && self.tensors == base.tensors {
            return Ok(());
        }
        let reason = self
            .tensors
            .iter()
            .find_map(|(name, hash)| match base.tensors.get(name) {
                None => Some(format!("the base lacks tensor {name:?}")),
                Some(h) if h != hash => Some(format!("tensor {name:?} differs")),
                Some(_) => None,
            })
            .or_else(|| {
                base.tensors
                    .keys()
                    .find(|n| !self.tensors.contains_key(*n))
                    .map(|n| format!("the base has an extra tensor {n:?}"))
            })
            .unwrap_or_else(|| "the combined hash differs".to_string());
        Err(Error::BaseMismatch {
            reason,
            expected: short(&self.combined),
            got: short(&base.combined),
        })
    }
}

fn short(hex: &str) -> String {
    hex.get(..16).unwrap_or(hex).to_string()
}

/// Decodes a lowercase hex digest; characters that are not hex digits decode as zero nibbles (callers
/// validate digests with the manifest first).
fn hex_to_bytes(hex: &str) -> Vec<u8> {
    let nib = |c: u8| match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => 0,
    };
    hex.as_bytes()
        .chunks(2)
        .map(|p| (nib(p[0]) << 4) | p.get(1).map_or(0, |&c| nib(c)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(pairs: &[(&str, &[u8])]) -> BaseFingerprint {
        BaseFingerprint::from_tensor_hashes(
            pairs
                .iter()
                .map(|(n, b)| {
                    (
                        n.to_string(),
                        tensor_hash(n, "f32", &[b.len() as u64 / 4], b),
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn hash_covers_name_dtype_shape_bytes() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let h = tensor_hash("a", "f32", &[2], &b);
        assert_eq!(h.len(), 64);
        assert_ne!(h, tensor_hash("b", "f32", &[2], &b));
        assert_ne!(h, tensor_hash("a", "f16", &[2], &b));
        assert_ne!(h, tensor_hash("a", "f32", &[1, 2], &b));
        assert_ne!(h, tensor_hash("a", "f32", &[2], &[1, 2, 3, 4, 5, 6, 7, 9]));
    }

    #[test]
    fn check_base_names_the_difference() {
        let a = fp(&[("x", &[0, 0, 128, 63]), ("y", &[0, 0, 0, 64])]);
        assert!(a.is_consistent());
        a.check_base(&a.clone()).unwrap();
        let b = fp(&[("x", &[0, 0, 128, 63]), ("y", &[0, 0, 64, 64])]);
        let e = a.check_base(&b).unwrap_err().to_string();
        assert!(e.contains("tensor \"y\" differs"), "{e}");
        let c = fp(&[("x", &[0, 0, 128, 63])]);
        let e = a.check_base(&c).unwrap_err().to_string();
        assert!(e.contains("lacks tensor \"y\""), "{e}");
        let e = c.check_base(&a).unwrap_err().to_string();
        assert!(e.contains("extra tensor \"y\""), "{e}");
    }
}

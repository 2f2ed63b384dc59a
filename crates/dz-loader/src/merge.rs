//! Merge mode: base + delta materialised into plain weights that the host loads like any model.
//!
//! The merged fine-tune is written once, as an HF directory under the config's `merged_dir`, named by the
//! delta's name and a hash of its manifest (which holds every part's checksum and the base fingerprint),
//! so a changed delta or base never reuses a stale merge and an unchanged one is not merged again.

use std::path::{Path, PathBuf};

use crate::config::CheckedDelta;
use crate::error::{Error, Result};

/// The directory the merge of `delta` goes to, under `merged_dir`.
pub fn merged_path(merged_dir: &Path, delta: &CheckedDelta) -> Result<PathBuf> {
    let manifest = serde_json::to_vec(delta.file.manifest())
        .map_err(|e| Error::Host(format!("manifest of {}: {e}", delta.spec.name)))?;
    let hash = blake3::hash(&manifest).to_hex();
    let short = hash.get(..16).unwrap_or(&hash);
    Ok(merged_dir.join(format!("{}-{short}", delta.spec.name)))
}

/// Writes base + delta as an HF directory under `merged_dir` unless an earlier run did (the write is
/// atomic, so a present directory is complete). Returns the directory.
pub fn materialise(base: &Path, merged_dir: &Path, delta: &CheckedDelta) -> Result<PathBuf> {
    let out = merged_path(merged_dir, delta)?;
    if out.join("config.json").is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(merged_dir).map_err(|source| Error::Io {
        path: merged_dir.to_path_buf(),
        source,
    })?;
    dz_compress::merge::merge(base, &delta.spec.path, &out, true, |_| {})?;
    Ok(out)
}

//! Merge mode: base + delta materialised into plain weights that the host loads like any model.
//!
//! The merged fine-tune is written once, as an HF directory under the config's `merged_dir`, named by the
//! delta's name and a hash of its manifest (which holds every part's checksum and the base fingerprint),
//! so a changed delta or base never reuses a stale merge and an unchanged one is not merged again.
//!
//! Where the sums are formed follows the config's device ([`merge`]): on the CPU, dz-compress's merge
//! (dz-format's reference decoder, f32 sums); on a GPU, dz-candle-ops' `merge` op ([`merge_on_device`]):
//! each base tensor and its packed delta are uploaded, the op adds them there, and the sum is copied
//! back to be written. Both write the same bytes: the op's decoding is bit-identical to the reference
//! decoder (`dequantize_is_bit_exact` in dz-candle-ops; the kernels compute the SPEC formula without
//! contraction) and both add in f32 and round once. The one difference: a base element equal to `-0.0`
//! in a row the delta does not store (a `zero` delta, a row subset's other rows) can stay `-0.0` on
//! the op path where the CPU path adds `+0.0` and writes `+0.0`: the same number.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dz_candle_ops::DeviceDelta;
use dz_compress::hf;
use dz_compress::merge::{AddJob, MergeReport};
use dz_format::Dtype;

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
/// atomic, so a present directory is complete), the sums formed on `device` (the config's
/// `runtime.device`; see [`merge`]). Returns the directory.
pub fn materialise(
    base: &Path,
    merged_dir: &Path,
    delta: &CheckedDelta,
    device: &Device,
) -> Result<PathBuf> {
    let out = merged_path(merged_dir, delta)?;
    if out.join("config.json").is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(merged_dir).map_err(|source| Error::Io {
        path: merged_dir.to_path_buf(),
        source,
    })?;
    merge(base, &delta.spec.path, &out, true, device)?;
    Ok(out)
}

/// Writes base + delta as a plain HF directory at `out` (`dz_compress::merge::merge`'s layout, written
/// atomically; an existing non-empty `out` is refused unless `overwrite`), the sums formed on `device`:
/// on the CPU by dz-compress's merge, on any other device by [`merge_on_device`].
pub fn merge(
    base: &Path,
    delta: &Path,
    out: &Path,
    overwrite: bool,
    device: &Device,
) -> Result<MergeReport> {
    if device.is_cpu() {
        Ok(dz_compress::merge::merge(
            base,
            delta,
            out,
            overwrite,
            |_| {},
        )?)
    } else {
        merge_on_device(base, delta, out, overwrite, device)
    }
}

/// [`merge`] through dz-candle-ops' `merge` op on `device`, whatever it is (the CPU too: that is how the
/// tests compare this path with dz-compress's). For each tensor the delta changes: the base tensor goes
/// to `device` (in its own dtype when the fine-tune's is the same, so the op rounds the f32 sum once to
/// it; else in f32, and the f32 sum is rounded here), the delta as a [`DeviceDelta`] (its packed parts,
/// one copy), the op adds, and the sum comes back to be written. One tensor at a time is on the device.
pub fn merge_on_device(
    base: &Path,
    delta: &Path,
    out: &Path,
    overwrite: bool,
    device: &Device,
) -> Result<MergeReport> {
    let add = |job: &AddJob<'_>| add_on(device, job).map_err(dz_compress::Error::Candle);
    Ok(dz_compress::merge::merge_with(
        base,
        delta,
        out,
        overwrite,
        |_| {},
        add,
    )?)
}

fn candle_dtype(d: Dtype) -> DType {
    match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

/// One tensor through the op on `device`, encoded in `job.dtype`.
fn add_on(device: &Device, job: &AddJob<'_>) -> candle_core::Result<Vec<u8>> {
    let same = job.base_dtype == job.dtype;
    let base = if same {
        Tensor::from_raw_buffer(job.base, candle_dtype(job.dtype), job.shape, device)?
    } else {
        Tensor::from_vec(hf::decode_f32(job.base, job.base_dtype), job.shape, device)?
    };
    let delta = DeviceDelta::from_tensor_data_packed(job.delta, device)?;
    let sum = dz_candle_ops::merge(&base, &delta)?
        .to_device(&Device::Cpu)?
        .flatten_all()?;
    if !same {
        return Ok(hf::encode_f32(&sum.to_vec1::<f32>()?, job.dtype));
    }
    Ok(match job.dtype {
        Dtype::F32 => le_bytes(sum.to_vec1::<f32>()?, f32::to_le_bytes),
        Dtype::F16 => le_bytes(sum.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
        Dtype::Bf16 => le_bytes(sum.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
    })
}

fn le_bytes<T: Copy, const N: usize>(v: Vec<T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
    v.into_iter().flat_map(f).collect()
}

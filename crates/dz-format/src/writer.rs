//! The writer: streams tensors to a temporary file and renames the finished delta into place, so a crash
//! or an error never leaves half a delta behind.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::codec::{self, Payload};
use crate::error::{Error, Result};
use crate::layout::{padded, PART_ALIGN};
use crate::manifest::{
    BaseFingerprint, Compression, Dtype, Manifest, PartEntry, Recipe, Role, TensorEntry,
    FORMAT_VERSION,
};
use crate::reader::{part_key, FORMAT_MAGIC, META_FORMAT, META_MANIFEST, META_VERSION};

/// Whether and how hard to apply the lossless stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lossless {
    /// Store every part as is.
    None,
    /// Try zstd at this level on every part; keep it only where it saves bytes.
    Zstd(i32),
}

impl Default for Lossless {
    fn default() -> Self {
        Lossless::Zstd(3)
    }
}

/// One part, encoded for storage (see [`encode_part`]).
#[derive(Debug, Clone)]
pub struct EncodedPart {
    /// The part's name.
    pub name: String,
    /// Bytes after the lossless stage is undone.
    pub raw_len: u64,
    /// How `bytes` are stored.
    pub compression: Compression,
    /// The stored bytes.
    pub bytes: Vec<u8>,
}

/// Applies the lossless stage to one part's raw bytes. Pure: callers run it in parallel across tensors.
pub fn encode_part(name: &str, raw: Vec<u8>, lossless: Lossless) -> EncodedPart {
    let raw_len = raw.len() as u64;
    if let Lossless::Zstd(level) = lossless {
        if raw.len() >= 64 {
            if let Ok(z) = zstd::bulk::compress(&raw, level) {
                if z.len() < raw.len() {
                    return EncodedPart {
                        name: name.to_string(),
                        raw_len,
                        compression: Compression::Zstd,
                        bytes: z,
                    };
                }
            }
        }
    }
    EncodedPart {
        name: name.to_string(),
        raw_len,
        compression: Compression::None,
        bytes: raw,
    }
}

/// One tensor ready to be written: metadata plus encoded parts in the codec's order.
#[derive(Debug, Clone)]
pub struct EncodedTensor {
    /// The fine-tune's tensor name.
    pub name: String,
    /// What the values mean.
    pub role: Role,
    /// The original shape.
    pub shape: Vec<u64>,
    /// The fine-tune's dtype.
    pub dtype: Dtype,
    /// The codec.
    pub codec: crate::manifest::Codec,
    /// Number of stored rows for a row subset.
    pub rows: Option<u64>,
    /// Encoded parts (`row_index` first for a row subset).
    pub parts: Vec<EncodedPart>,
}

impl EncodedTensor {
    /// Packs a logical payload (and an optional row subset) and applies the lossless stage.
    pub fn from_payload(
        name: &str,
        role: Role,
        shape: &[u64],
        dtype: Dtype,
        row_index: Option<&[u32]>,
        payload: &Payload,
        lossless: Lossless,
    ) -> Result<Self> {
        let mut raw = Vec::with_capacity(6);
        if let Some(idx) = row_index {
            raw.push(codec::pack_row_index(idx));
        }
        raw.extend(payload.pack()?);
        let n = shape.len();
        let codec = payload.codec();
        let k = shape.last().copied().unwrap_or(0) as usize;
        let layout =
            crate::layout::part_layout(name, &codec, payload.dims().0, k, row_index.is_some())?;
        if n == 0 || layout.len() != raw.len() {
            return Err(Error::Writer(format!(
                "tensor {name:?}: payload does not match shape {shape:?}"
            )));
        }
        let parts = layout
            .iter()
            .zip(raw)
            .map(|(spec, bytes)| encode_part(spec.name, bytes, lossless))
            .collect();
        Ok(Self {
            name: name.to_string(),
            role,
            shape: shape.to_vec(),
            dtype,
            codec,
            rows: row_index.map(|r| r.len() as u64),
            parts,
        })
    }
}

/// What [`DeltaWriter::finish`] wrote.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    /// The final path.
    pub path: PathBuf,
    /// The file's length in bytes.
    pub file_len: u64,
    /// Number of tensors.
    pub tensors: usize,
}

/// Streams tensors into a new delta file.
///
/// Payload bytes go to a temporary file beside the destination as they arrive (memory stays bounded by
/// one tensor); [`DeltaWriter::finish`] writes header + payloads to a second temporary file, syncs it and
/// renames it over the destination. Dropping the writer without `finish` removes the temporaries.
pub struct DeltaWriter {
    path: PathBuf,
    data: BufWriter<tempfile::NamedTempFile>,
    data_len: u64,
    name: String,
    architecture: serde_json::Value,
    base: BaseFingerprint,
    recipe: Recipe,
    tensors: Vec<TensorEntry>,
    names: HashSet<String>,
}

impl DeltaWriter {
    /// Starts a delta that will be written to `path`.
    pub fn create(
        path: impl AsRef<Path>,
        name: &str,
        architecture: serde_json::Value,
        base: BaseFingerprint,
        recipe: Recipe,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let dir = parent_dir(&path);
        let tmp = tempfile::Builder::new()
            .prefix(".dz-data-")
            .tempfile_in(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        Ok(Self {
            path,
            data: BufWriter::with_capacity(1 << 20, tmp),
            data_len: 0,
            name: name.to_string(),
            architecture,
            base,
            recipe,
            tensors: Vec::new(),
            names: HashSet::new(),
        })
    }

    /// Appends one tensor. Its entry is validated against the layout before any byte is written.
    pub fn add(&mut self, t: EncodedTensor) -> Result<()> {
        if self.names.contains(&t.name) {
            return Err(Error::DuplicateTensor(t.name));
        }
        let entry = TensorEntry {
            name: t.name,
            role: t.role,
            shape: t.shape,
            dtype: t.dtype,
            codec: t.codec,
            rows: t.rows,
            parts: t
                .parts
                .iter()
                .map(|p| PartEntry {
                    name: p.name.clone(),
                    len: p.bytes.len() as u64,
                    raw_len: p.raw_len,
                    compression: p.compression,
                    blake3: blake3::hash(&p.bytes).to_hex().to_string(),
                })
                .collect(),
        };
        entry.validate()?;
        let io = |e| Error::io(&self.path, e);
        for p in &t.parts {
            self.data.write_all(&p.bytes).map_err(io)?;
            let pad = padded(p.bytes.len() as u64).unwrap_or(0) - p.bytes.len() as u64;
            self.data
                .write_all(&[0u8; PART_ALIGN][..pad as usize])
                .map_err(io)?;
            self.data_len += p.bytes.len() as u64 + pad;
        }
        self.names.insert(entry.name.clone());
        self.tensors.push(entry);
        Ok(())
    }

    /// Writes the header, the payloads, syncs, and renames the file into place.
    pub fn finish(self) -> Result<WriteSummary> {
        let path = self.path;
        let io = |e| Error::io(&path, e);
        let manifest = Manifest {
            name: self.name,
            architecture: self.architecture,
            base: self.base,
            recipe: self.recipe,
            tensors: self.tensors,
        };
        manifest.validate()?;
        let header = build_header(&manifest)?;

        let mut data = self
            .data
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        data.as_file_mut().seek(SeekFrom::Start(0)).map_err(io)?;
        let dir = parent_dir(&path);
        let out = tempfile::Builder::new()
            .prefix(".dz-tmp-")
            .tempfile_in(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, out);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        let copied = std::io::copy(data.as_file_mut(), &mut w).map_err(io)?;
        if copied != self.data_len {
            return Err(Error::Writer(format!(
                "copied {copied} payload bytes, expected {}",
                self.data_len
            )));
        }
        let out = w
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        // Temporary files are created 0600; a delta is an ordinary artifact that others may read.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            out.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(io)?;
        }
        out.as_file().sync_all().map_err(io)?;
        let file_len = 8 + header.len() as u64 + self.data_len;
        out.persist(&path).map_err(|e| Error::io(&path, e.error))?;
        Ok(WriteSummary {
            path,
            file_len,
            tensors: manifest.tensors.len(),
        })
    }
}

/// Builds the safetensors header for `manifest`, padded with spaces so that `8 + len` is 64-aligned.
pub(crate) fn build_header(manifest: &Manifest) -> Result<Vec<u8>> {
    let manifest_json = serde_json::to_string(manifest)
        .map_err(|e| Error::Writer(format!("manifest JSON: {e}")))?;
    let mut meta = BTreeMap::new();
    meta.insert(META_FORMAT, FORMAT_MAGIC.to_string());
    meta.insert(META_VERSION, FORMAT_VERSION.to_string());
    meta.insert(META_MANIFEST, manifest_json);
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(meta).map_err(json_err)?,
    );
    let mut offset = 0u64;
    for t in &manifest.tensors {
        for p in &t.parts {
            let plen = padded(p.len).ok_or_else(|| Error::Overflow("part length".into()))?;
            header.insert(
                part_key(&t.name, &p.name),
                serde_json::json!({ "dtype": "U8", "shape": [plen], "data_offsets": [offset, offset + plen] }),
            );
            offset += plen;
        }
    }
    let mut bytes = serde_json::to_vec(&header).map_err(json_err)?;
    let total = (8 + bytes.len()).next_multiple_of(PART_ALIGN);
    bytes.resize(total - 8, b' ');
    Ok(bytes)
}

fn json_err(e: serde_json::Error) -> Error {
    Error::Writer(format!("header JSON: {e}"))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

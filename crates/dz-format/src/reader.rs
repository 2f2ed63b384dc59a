//! The reader: memory-mapped, validated up front, lazy per tensor (SPEC.md sections 1 and 7).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::codec::{self, Payload};
use crate::error::{Error, Result};
use crate::layout::padded;
use crate::manifest::{Compression, FormatVersion, Manifest, TensorEntry};

/// Largest header accepted, as safetensors does.
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;
/// The `__metadata__` key holding the magic.
pub const META_FORMAT: &str = "format";
/// The magic value of [`META_FORMAT`].
pub const FORMAT_MAGIC: &str = "deltazip";
/// The `__metadata__` key holding the version.
pub const META_VERSION: &str = "deltazip_version";
/// The `__metadata__` key holding the manifest JSON.
pub const META_MANIFEST: &str = "deltazip_manifest";

/// One safetensors tensor entry as it appears in the header.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// An open delta file: the manifest is parsed and the layout checked; payloads are read on demand.
///
/// `S` is the byte storage: a memory map for [`DeltaFile::open`], or any byte buffer for
/// [`DeltaFile::from_bytes`].
pub struct DeltaFile<S = memmap2::Mmap> {
    data: S,
    path: Option<PathBuf>,
    version: FormatVersion,
    manifest: Manifest,
    /// Per tensor, per part: the byte range of its stored bytes in `data`.
    ranges: Vec<Vec<Range<usize>>>,
    index: HashMap<String, usize>,
}

impl<S> std::fmt::Debug for DeltaFile<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.manifest.tensors.len())
            .finish()
    }
}

/// One tensor's entry and its part bytes, checksummed and with the lossless stage undone.
#[derive(Debug)]
pub struct TensorData<'a> {
    /// The manifest entry.
    pub entry: &'a TensorEntry,
    /// The raw bytes of each part, in the codec's order (`row_index` first when present): borrowed from
    /// the file when stored uncompressed, owned when zstd had to be undone.
    pub parts: Vec<Cow<'a, [u8]>>,
}

/// One tensor decoded to its logical form.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedTensor {
    /// The stored rows, when only some rows are stored.
    pub row_index: Option<Vec<u32>>,
    /// The codec payload over the stored rows.
    pub payload: Payload,
}

impl DecodedTensor {
    /// The full `N_total x K` matrix as f32 (rows not stored are zero).
    pub fn to_f32(&self, n_total: usize) -> Vec<f32> {
        let stored = self.payload.dequantize();
        match &self.row_index {
            None => stored,
            Some(idx) => codec::scatter_rows(idx, &stored, self.payload.dims().1, n_total),
        }
    }
}

impl DeltaFile<memmap2::Mmap> {
    /// Opens and validates a delta file (everything but the payload checksums, which are checked when a
    /// tensor is read, or all at once by [`DeltaFile::verify`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath by another process can change what we
        // read, which the per-part checksums catch before bytes are used as a payload.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut f = Self::from_bytes(map)?;
        f.path = Some(path.to_path_buf());
        Ok(f)
    }
}

impl<S: AsRef<[u8]>> DeltaFile<S> {
    /// Parses and validates a delta held in memory.
    pub fn from_bytes(data: S) -> Result<Self> {
        let bytes = data.as_ref();
        let file_len = bytes.len() as u64;
        let prefix: [u8; 8] = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or(Error::TooShort { len: file_len })?;
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_HEADER_LEN {
            return Err(Error::HeaderTooLarge {
                len: header_len,
                max: MAX_HEADER_LEN,
            });
        }
        let data_start = 8 + header_len; // cannot overflow: header_len <= 100 MiB
        if data_start > file_len {
            return Err(Error::HeaderOutOfBounds {
                needed: data_start,
                file_len,
            });
        }
        let data_start = data_start as usize;
        let header = std::str::from_utf8(&bytes[8..data_start])
            .map_err(|e| Error::InvalidHeader(format!("not UTF-8: {e}")))?;
        let mut header: BTreeMap<String, serde_json::Value> = serde_json::from_str(header)
            .map_err(|e| Error::InvalidHeader(format!("not a JSON object: {e}")))?;

        let meta: BTreeMap<String, String> = match header.remove("__metadata__") {
            None => return Err(Error::NotADeltaFile("no __metadata__ in header".into())),
            Some(v) => serde_json::from_value(v).map_err(|e| {
                Error::InvalidHeader(format!("__metadata__ must map strings to strings: {e}"))
            })?,
        };
        match meta.get(META_FORMAT) {
            Some(m) if m == FORMAT_MAGIC => {}
            Some(m) => {
                return Err(Error::NotADeltaFile(format!(
                    "__metadata__.{META_FORMAT} is {m:?}, not {FORMAT_MAGIC:?}"
                )))
            }
            None => {
                return Err(Error::NotADeltaFile(format!(
                    "__metadata__ has no {META_FORMAT:?} key (a plain safetensors file?)"
                )))
            }
        }
        let version = meta.get(META_VERSION).ok_or_else(|| {
            Error::NotADeltaFile(format!("__metadata__ has no {META_VERSION:?} key"))
        })?;
        let version = FormatVersion::parse(version)?;
        version.check_supported()?;
        let manifest = meta.get(META_MANIFEST).ok_or_else(|| {
            Error::InvalidManifest(format!("__metadata__ has no {META_MANIFEST:?} key"))
        })?;
        let manifest: Manifest =
            serde_json::from_str(manifest).map_err(|e| Error::InvalidManifest(e.to_string()))?;
        manifest.validate()?;

        if !data_start.is_multiple_of(crate::layout::PART_ALIGN) {
            return Err(Error::Misaligned {
                offset: data_start as u64,
            });
        }

        // The safetensors entries must mirror the manifest exactly.
        let mut entries: BTreeMap<String, StEntry> = header
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_value(v)
                    .map(|e| (k.clone(), e))
                    .map_err(|e| Error::InvalidHeader(format!("tensor entry {k:?}: {e}")))
            })
            .collect::<Result<_>>()?;
        let data_len = file_len - data_start as u64;
        let mut offset = 0u64;
        let mut ranges = Vec::with_capacity(manifest.tensors.len());
        for t in &manifest.tensors {
            let mut tr = Vec::with_capacity(t.parts.len());
            for p in &t.parts {
                let key = part_key(&t.name, &p.name);
                let e = entries
                    .remove(&key)
                    .ok_or_else(|| Error::HeaderMismatch(format!("no entry {key:?}")))?;
                let plen = padded(p.len).ok_or_else(|| Error::Overflow(format!("part {key:?}")))?;
                let end = offset
                    .checked_add(plen)
                    .ok_or_else(|| Error::Overflow(format!("part {key:?}")))?;
                if e.dtype != "U8" || e.shape != [plen] || e.data_offsets != [offset, end] {
                    return Err(Error::HeaderMismatch(format!(
                        "entry {key:?} is {} {:?} at {:?}, the manifest implies U8 [{plen}] at [{offset}, {end}]",
                        e.dtype, e.shape, e.data_offsets
                    )));
                }
                if end <= data_len {
                    let abs = data_start + offset as usize;
                    tr.push(abs..abs + p.len as usize);
                }
                offset = end;
            }
            ranges.push(tr);
        }
        if let Some(k) = entries.keys().next() {
            return Err(Error::HeaderMismatch(format!(
                "entry {k:?} is not in the manifest"
            )));
        }
        if offset != data_len {
            return Err(Error::DataLength {
                expected: offset,
                got: data_len,
            });
        }
        // Padding after every part is zero.
        for (t, tr) in manifest.tensors.iter().zip(&ranges) {
            for (p, r) in t.parts.iter().zip(tr) {
                let pad_end = r.start + padded(p.len).unwrap_or(0) as usize;
                if bytes[r.end..pad_end].iter().any(|&b| b != 0) {
                    return Err(Error::NonZeroPadding {
                        tensor: t.name.clone(),
                        part: p.name.clone(),
                    });
                }
            }
        }
        let index = manifest
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            data,
            path: None,
            version,
            manifest,
            ranges,
            index,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The file's format version.
    pub fn version(&self) -> FormatVersion {
        self.version
    }

    /// The path the file was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The file's total length in bytes.
    pub fn file_len(&self) -> u64 {
        self.data.as_ref().len() as u64
    }

    /// Reads one tensor's parts by name: checksums verified, zstd undone.
    pub fn read(&self, name: &str) -> Result<TensorData<'_>> {
        let i = *self
            .index
            .get(name)
            .ok_or_else(|| Error::UnknownTensor(name.to_string()))?;
        self.read_at(i)
    }

    /// Reads the `i`-th tensor in manifest order (see [`DeltaFile::read`]).
    pub fn read_at(&self, i: usize) -> Result<TensorData<'_>> {
        let entry = self
            .manifest
            .tensors
            .get(i)
            .ok_or_else(|| Error::UnknownTensor(format!("#{i}")))?;
        let bytes = self.data.as_ref();
        let parts = entry
            .parts
            .iter()
            .zip(&self.ranges[i])
            .map(|(p, r)| {
                let stored = &bytes[r.clone()];
                let got = blake3::hash(stored).to_hex();
                if got.as_str() != p.blake3 {
                    return Err(Error::ChecksumMismatch {
                        tensor: entry.name.clone(),
                        part: p.name.clone(),
                        expected: p.blake3.clone(),
                        got: got.to_string(),
                    });
                }
                match p.compression {
                    Compression::None => Ok(Cow::Borrowed(stored)),
                    Compression::Zstd => {
                        decompress(stored, p.raw_len)
                            .map(Cow::Owned)
                            .map_err(|reason| Error::Decompress {
                                tensor: entry.name.clone(),
                                part: p.name.clone(),
                                reason,
                            })
                    }
                }
            })
            .collect::<Result<_>>()?;
        Ok(TensorData { entry, parts })
    }

    /// Reads and decodes one tensor to its logical form, validating the payload's content.
    pub fn decode(&self, name: &str) -> Result<DecodedTensor> {
        self.read(name)?.decode()
    }

    /// Reads and decodes every tensor: every checksum, zstd frame and payload is checked.
    pub fn verify(&self) -> Result<()> {
        for i in 0..self.manifest.tensors.len() {
            self.read_at(i)?.decode()?;
        }
        Ok(())
    }
}

impl TensorData<'_> {
    /// Decodes the parts to the logical form, validating their content.
    pub fn decode(&self) -> Result<DecodedTensor> {
        let e = self.entry;
        let (n_total, _) = e.matrix_dims()?;
        let (n, k) = e.stored_dims()?;
        let mut parts: Vec<&[u8]> = self.parts.iter().map(|p| p.as_ref()).collect();
        let row_index = match e.rows {
            None => None,
            Some(_) => {
                let idx = parts.remove(0);
                Some(codec::unpack_row_index(&e.name, idx, n_total)?)
            }
        };
        let payload = Payload::unpack(&e.name, &e.codec, n, k, &parts)?;
        Ok(DecodedTensor { row_index, payload })
    }
}

/// The safetensors entry name of part `part` of tensor `tensor`.
pub fn part_key(tensor: &str, part: &str) -> String {
    format!("{tensor}:{part}")
}

/// Decodes one zstd frame to exactly `raw_len` bytes. Memory grows with the bytes actually produced, so a
/// hostile `raw_len` cannot make us allocate more than the frame really decodes to.
fn decompress(stored: &[u8], raw_len: u64) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(raw_len.min(1 << 24) as usize);
    let dec = zstd::stream::read::Decoder::with_buffer(stored).map_err(|e| e.to_string())?;
    let mut dec = dec.single_frame();
    // Read one byte past raw_len so that a longer frame is caught.
    (&mut dec)
        .take(raw_len.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    if out.len() as u64 != raw_len {
        return Err(format!(
            "frame decodes to {}{} bytes, expected {raw_len}",
            out.len(),
            if out.len() as u64 > raw_len { "+" } else { "" }
        ));
    }
    Ok(out)
}

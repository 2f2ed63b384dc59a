//! Shards of packed deltas for tensor parallelism (SPEC.md section 8): one rank's slice of a tensor, in the
//! same packed layout, so the kernels run on a shard unchanged.
//!
//! A host that shards a linear layer over `world` ranks gives each rank a contiguous slice of the weight
//! `[out, in]`: a *column-parallel* layer (q/k/v/gate/up) splits the output features, the **rows** of the
//! matrix view; a *row-parallel* layer (o/down) splits the input features, the **columns**, and sums the
//! ranks' outputs. The delta of that layer must be sliced the same way: [`shard_range`] cuts the matrix
//! view of one packed tensor along an [`Axis`], and [`shard_rank`] cuts rank `r` of `world` equal slices.
//!
//! A shard is exact: it dequantizes bit for bit to the same slice of the unsharded dequantized matrix.
//! Codes, scales, zero points, signs, masks and dense values are copied, never re-quantized: whole rows of
//! bytes for a row split, and bit ranges of each packed row (re-padded to the 16-byte row stride) for a
//! column split. Only derived data is recomputed: `row_ptr` of `sparse`, the rebased `row_index` of a row
//! subset, and the checksums of the shard's manifest entry.
//!
//! What each codec supports:
//!
//! | codec | rows (output features) | columns (input features) |
//! |---|---|---|
//! | `dense`, `sign1`, `zero` | any range | any range |
//! | `quant`, `sparse` | any range | a range that starts on a group boundary or lies inside one group (`group_size` 0: any range) |
//! | `sparse24` | any range | as `quant`, and starting and ending on a multiple of 4 (a 2:4 run is never cut) |
//! | row subsets | any range; a range holding no stored row gives a `zero` shard | as the codec |
//!
//! Every refusal is [`Error::Unshardable`] naming the tensor, the split and the reason. Bit-stream
//! alignment never refuses a split: a column range that starts inside a byte is shifted into place.

mod plan;

use std::ops::Range;

pub use plan::{tensor_split, tp_layer, tp_plan, Placement, TensorPlan, TpLayer, TpPlan};

use crate::codec::{self, unpack_row_index, Payload};
use crate::error::{Error, Result};
use crate::layout::{part_layout, stride, PartLen};
use crate::manifest::{Codec, Compression, Dtype, PartEntry, QuantParams, Role, TensorEntry};
use crate::reader::DecodedTensor;
use crate::writer::{EncodedTensor, Lossless};

/// Which axis of a tensor's matrix view (SPEC.md section 2) a shard cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Axis {
    /// Rows: the output features of a linear weight `[out, in]` (a column-parallel layer).
    Rows,
    /// Columns: the input features of a linear weight (a row-parallel layer), or the only dimension of a
    /// 1-D tensor (the bias of a column-parallel layer).
    Cols,
}

impl Axis {
    /// `rows` or `columns`.
    pub fn as_str(self) -> &'static str {
        match self {
            Axis::Rows => "rows",
            Axis::Cols => "columns",
        }
    }
}

/// One tensor's shard: a manifest entry (shape, codec, `rows`, and its parts with checksums of the raw,
/// uncompressed bytes) and the parts themselves, `row_index` first for a row subset: exactly what
/// [`DeltaFile::read`](crate::DeltaFile::read) gives for a stored tensor, so anything that consumes a stored
/// tensor consumes a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorShard {
    /// The shard's entry: the tensor's name, role and dtype; the shard's shape.
    pub entry: TensorEntry,
    /// The raw parts, in the order of SPEC.md section 4.
    pub parts: Vec<Vec<u8>>,
}

impl TensorShard {
    /// A whole tensor as a (one-rank) shard, from its logical payload: its entry and raw parts, as a
    /// file would store it uncompressed. For cutting payloads that are not in a file (tests, a
    /// compressor's output) with [`shard_range`] / [`shard_rank`].
    pub fn from_payload(
        name: &str,
        role: Role,
        shape: &[u64],
        dtype: Dtype,
        row_index: Option<&[u32]>,
        payload: &Payload,
    ) -> Result<TensorShard> {
        let t = EncodedTensor::from_payload(
            name,
            role,
            shape,
            dtype,
            row_index,
            payload,
            Lossless::None,
        )?;
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
                .map(|p| part_entry(&p.name, &p.bytes))
                .collect(),
        };
        entry.validate()?;
        Ok(TensorShard {
            entry,
            parts: t.parts.into_iter().map(|p| p.bytes).collect(),
        })
    }

    /// The parts as slices.
    pub fn part_refs(&self) -> Vec<&[u8]> {
        self.parts.iter().map(Vec::as_slice).collect()
    }

    /// Decodes the shard to its logical form (full content checks, as for a stored tensor).
    pub fn decode(&self) -> Result<DecodedTensor> {
        crate::TensorData {
            entry: &self.entry,
            parts: self.parts.iter().map(|p| p.as_slice().into()).collect(),
        }
        .decode()
    }

    /// Total bytes of the parts.
    pub fn nbytes(&self) -> usize {
        self.parts.iter().map(Vec::len).sum()
    }
}

/// The range of rank `rank` of `world` equal contiguous slices of `len`: `rank * len / world ..`.
///
/// Refused ([`Error::Unshardable`]) when `world` is 0, `rank >= world`, or `world` does not divide `len`.
pub fn even_range(
    tensor: &str,
    axis: Axis,
    len: usize,
    rank: usize,
    world: usize,
) -> Result<Range<usize>> {
    let bad = |reason: String| unshardable(tensor, axis, None, reason);
    if world == 0 || rank >= world {
        return Err(bad(format!("rank {rank} of {world} ranks")));
    }
    if !len.is_multiple_of(world) {
        return Err(bad(format!(
            "{len} {} do not divide into {world} equal slices",
            axis.as_str()
        )));
    }
    let part = len / world;
    Ok(rank * part..(rank + 1) * part)
}

/// The ranges of all `world` ranks of an even split of `entry` along `axis`, each checked with
/// [`check_split`]: an even split is possible for every rank or for none. Reads no payload bytes.
pub fn check_even_split(
    entry: &TensorEntry,
    axis: Axis,
    world: usize,
) -> Result<Vec<Range<usize>>> {
    let (n_total, k) = entry.matrix_dims()?;
    let len = match axis {
        Axis::Rows => n_total,
        Axis::Cols => k,
    };
    (0..world.max(1))
        .map(|r| {
            let range = even_range(&entry.name, axis, len, r, world)?;
            check_split(entry, axis, range.clone())?;
            Ok(range)
        })
        .collect()
}

/// Checks that `entry` can be cut to `range` along `axis` (the table in the module docs), from the
/// manifest alone: the entry is valid, the range is non-empty and inside the matrix, the shard has a
/// shape, and a column range cuts no quantization group or 2:4 run.
pub fn check_split(entry: &TensorEntry, axis: Axis, range: Range<usize>) -> Result<()> {
    entry.validate()?;
    let (n_total, k) = entry.matrix_dims()?;
    let bad = |reason: String| unshardable(&entry.name, axis, Some(&range), reason);
    let len = match axis {
        Axis::Rows => n_total,
        Axis::Cols => k,
    };
    if range.start >= range.end || range.end > len {
        return Err(bad(format!(
            "the tensor has {len} {}; a shard needs a non-empty range inside them",
            axis.as_str()
        )));
    }
    shard_shape(entry, axis, &range)?;
    if axis == Axis::Rows {
        return Ok(());
    }
    let (c0, c1) = (range.start, range.end);
    if let Codec::Sparse24(_) = entry.codec {
        if !c0.is_multiple_of(4) || !c1.is_multiple_of(4) {
            return Err(bad(
                "2:4 sparsity packs runs of 4 columns; the range must start and end on a multiple \
                 of 4 (it would cut a 2:4 run)"
                    .into(),
            ));
        }
    }
    if let Some(p) = entry.codec.quant_params() {
        let g = p.group_size as usize;
        if g != 0 && !c0.is_multiple_of(g) && p.group_of(c0) != p.group_of(c1 - 1) {
            let grp = p.group_of(c0);
            return Err(bad(format!(
                "it cuts quantization group {grp} (columns {}..{}) of group_size {g}: the shard's \
                 first group would need another group's scale",
                grp * g,
                ((grp + 1) * g).min(k)
            )));
        }
    }
    Ok(())
}

/// Rank `rank` of an even split of `entry` into `world` slices along `axis` ([`even_range`]); refused
/// unless every rank's slice can be cut ([`check_even_split`]). `parts` are the tensor's raw parts
/// (`row_index` first for a row subset, zstd undone), as in [`TensorData`](crate::TensorData).
pub fn shard_rank(
    entry: &TensorEntry,
    parts: &[&[u8]],
    axis: Axis,
    rank: usize,
    world: usize,
) -> Result<TensorShard> {
    let ranges = check_even_split(entry, axis, world)?;
    let range = ranges
        .get(rank)
        .cloned()
        .ok_or_else(|| unshardable(&entry.name, axis, None, format!("rank {rank} of {world}")))?;
    shard_range(entry, parts, axis, range)
}

/// The shard of `entry` holding `range` of its matrix view's rows or columns ([`check_split`] says which
/// ranges are possible). `parts` are the tensor's raw parts (`row_index` first for a row subset, zstd
/// undone), as in [`TensorData`](crate::TensorData); their lengths are checked against the layout, and any
/// malformed input is a named error. The shard's own content is not re-validated here: consumers that
/// decode it ([`TensorShard::decode`], dz-candle-ops' `DeviceDelta::from_parts`) check it as they check a
/// stored tensor.
pub fn shard_range(
    entry: &TensorEntry,
    parts: &[&[u8]],
    axis: Axis,
    range: Range<usize>,
) -> Result<TensorShard> {
    check_split(entry, axis, range.clone())?;
    let (n_total, k) = entry.matrix_dims()?;
    let (n, _) = entry.stored_dims()?;
    let layout = part_layout(&entry.name, &entry.codec, n, k, entry.rows.is_some())?;
    if parts.len() != layout.len() {
        return Err(bad_part(
            entry,
            layout.get(parts.len()).map_or("", |p| p.name),
            format!("the codec has {} parts, got {}", layout.len(), parts.len()),
        ));
    }
    for (spec, part) in layout.iter().zip(parts) {
        if let PartLen::Exact(len) = spec.len {
            if part.len() != len {
                return Err(bad_part(
                    entry,
                    spec.name,
                    format!("is {} bytes, the layout needs {len}", part.len()),
                ));
            }
        }
    }
    let (row_index, codec_parts) = match entry.rows {
        None => (None, parts),
        Some(_) => (
            Some(unpack_row_index(&entry.name, parts[0], n_total)?),
            &parts[1..],
        ),
    };
    let cut = Cut {
        entry,
        n,
        k,
        parts: codec_parts,
    };
    let (codec, rows, new_index, new_parts) = match axis {
        Axis::Rows => {
            // The stored rows inside the range: all of them, or a contiguous run of a row subset.
            let (s, e) = match &row_index {
                None => (range.start, range.end),
                Some(idx) => (
                    idx.partition_point(|&r| (r as usize) < range.start),
                    idx.partition_point(|&r| (r as usize) < range.end),
                ),
            };
            if s == e {
                // A row subset with no stored row in the range: the shard is exactly zero.
                (Codec::Zero, 0, None, Vec::new())
            } else {
                let new_index = row_index.as_ref().map(|idx| {
                    idx[s..e]
                        .iter()
                        .map(|&r| r - range.start as u32)
                        .collect::<Vec<u32>>()
                });
                (entry.codec, e - s, new_index, cut.rows(s..e)?)
            }
        }
        Axis::Cols => (entry.codec, n, row_index, cut.cols(range.clone())?),
    };
    let shape = shard_shape(entry, axis, &range)?;
    let (_, shard_k) = crate::manifest::matrix_dims(&entry.name, &shape)?;
    let mut all = Vec::with_capacity(new_parts.len() + 1);
    if let Some(idx) = &new_index {
        all.push(codec::pack_row_index(idx));
    }
    all.extend(new_parts);
    let names = part_layout(&entry.name, &codec, rows, shard_k, new_index.is_some())?;
    let shard_entry = TensorEntry {
        name: entry.name.clone(),
        role: entry.role,
        shape,
        dtype: entry.dtype,
        codec,
        rows: new_index.as_ref().map(|i| i.len() as u64),
        parts: names
            .iter()
            .zip(&all)
            .map(|(spec, bytes)| part_entry(spec.name, bytes))
            .collect(),
    };
    shard_entry.validate()?;
    Ok(TensorShard {
        entry: shard_entry,
        parts: all,
    })
}

/// The shape of the shard: the cut axis shortened. A row cut of a tensor of more than 2 dimensions must
/// cover whole slices of its first dimension (the matrix view's rows are the other dims flattened).
fn shard_shape(entry: &TensorEntry, axis: Axis, range: &Range<usize>) -> Result<Vec<u64>> {
    let mut shape = entry.shape.clone();
    let len = (range.end - range.start) as u64;
    match axis {
        Axis::Cols => *shape.last_mut().expect("validated: 1 to 4 dims") = len,
        Axis::Rows => match shape.len() {
            1 => {} // one row: the range is 0..1
            2 => shape[0] = len,
            _ => {
                let inner: u64 = shape[1..shape.len() - 1].iter().product();
                if !(range.start as u64).is_multiple_of(inner) || !len.is_multiple_of(inner) {
                    return Err(unshardable(
                        &entry.name,
                        axis,
                        Some(range),
                        format!(
                            "shape {:?}: a row range must cover whole slices of {inner} rows of the \
                             first dimension",
                            entry.shape
                        ),
                    ));
                }
                shape[0] = len / inner;
            }
        },
    }
    Ok(shape)
}

/// The codec parts of one tensor (without `row_index`), `n` stored rows of `k` columns, lengths checked.
struct Cut<'a> {
    entry: &'a TensorEntry,
    n: usize,
    k: usize,
    parts: &'a [&'a [u8]],
}

impl Cut<'_> {
    /// Stored rows `rows` of every part: whole rows of bytes (each part but `sparse`'s `row_ptr` and
    /// `codes` holds a fixed number of bytes per row), `row_ptr` rebased.
    fn rows(&self, rows: Range<usize>) -> Result<Vec<Vec<u8>>> {
        let names = part_layout(&self.entry.name, &self.entry.codec, self.n, self.k, false)?;
        let sparse = matches!(self.entry.codec, Codec::Sparse(_));
        let mut out = Vec::with_capacity(self.parts.len());
        for (spec, part) in names.iter().zip(self.parts) {
            if sparse && spec.name == "row_ptr" {
                let ptr = self.row_ptr()?;
                let base = ptr[rows.start];
                out.push(
                    ptr[rows.start..=rows.end]
                        .iter()
                        .flat_map(|p| (p - base).to_le_bytes())
                        .collect(),
                );
            } else if sparse && spec.name == "codes" {
                let ptr = self.row_ptr()?;
                out.push(part[ptr[rows.start] as usize..ptr[rows.end] as usize].to_vec());
            } else {
                let w = part.len() / self.n;
                out.push(part[rows.start * w..rows.end * w].to_vec());
            }
        }
        Ok(out)
    }

    /// Columns `cols` of every stored row.
    fn cols(&self, cols: Range<usize>) -> Result<Vec<Vec<u8>>> {
        let (c0, kk) = (cols.start, cols.end - cols.start);
        let p = &self.parts;
        Ok(match &self.entry.codec {
            Codec::Zero => Vec::new(),
            Codec::Dense { dtype } => {
                let s = dtype.size();
                let row = self.k * s;
                let v = p[0]
                    .chunks_exact(row)
                    .flat_map(|r| &r[c0 * s..(c0 + kk) * s])
                    .copied()
                    .collect();
                vec![v]
            }
            Codec::Quant(q) => {
                let mut v = vec![self.bit_rows(p[0], self.k, c0, kk, q.bits)?];
                v.extend(self.grid(q, &p[1..], &cols));
                v
            }
            Codec::Sparse24(q) => {
                let codes = self.bit_rows(p[0], self.k / 2, c0 / 2, kk / 2, q.bits)?;
                let meta = self.bit_rows(p[1], self.k / 4, c0 / 4, kk / 4, 4)?;
                let mut v = vec![codes, meta];
                v.extend(self.grid(q, &p[2..], &cols));
                v
            }
            Codec::Sparse(q) => self.sparse_cols(q, &cols)?,
            Codec::Sign1 { .. } => vec![self.bit_rows(p[0], self.k, c0, kk, 1)?, p[1].to_vec()],
        })
    }

    /// Values `v0 .. v0 + count` of every bit-stream row of `per_row` values of `bits` bits, as rows of
    /// `count` values (each padded to its own stride).
    fn bit_rows(
        &self,
        part: &[u8],
        per_row: usize,
        v0: usize,
        count: usize,
        bits: u8,
    ) -> Result<Vec<u8>> {
        let b = bits as usize;
        let src_stride = stride(per_row, bits).ok_or_else(|| self.overflow())?;
        let dst_stride = stride(count, bits).ok_or_else(|| self.overflow())?;
        let mut out = vec![0u8; self.n * dst_stride];
        for (src, dst) in part
            .chunks_exact(src_stride)
            .zip(out.chunks_exact_mut(dst_stride))
        {
            copy_bits(src, v0 * b, count * b, dst);
        }
        Ok(out)
    }

    /// The grid tables (`scales`, [`zeros`]) of the shard's groups: shard group `g` of a row is the
    /// original group of column `c0 + g * group_size` ([`check_split`] made that the same scale for every
    /// column of the group).
    fn grid(&self, q: &QuantParams, tables: &[&[u8]], cols: &Range<usize>) -> Vec<Vec<u8>> {
        let (g_in, g_out) = (q.n_groups(self.k), q.n_groups(cols.end - cols.start));
        let gs = q.group_size as usize;
        let src: Vec<usize> = (0..g_out)
            .map(|g| q.group_of(cols.start + g * gs))
            .collect();
        tables
            .iter()
            .map(|t| {
                let mut v = Vec::with_capacity(self.n * g_out * 2);
                for row in t.chunks_exact(g_in * 2) {
                    for &g in &src {
                        v.extend_from_slice(&row[2 * g..2 * g + 2]);
                    }
                }
                v
            })
            .collect()
    }

    /// `sparse`: the mask's columns, each row's kept codes in the range, `row_ptr` recomputed.
    fn sparse_cols(&self, q: &QuantParams, cols: &Range<usize>) -> Result<Vec<Vec<u8>>> {
        let (c0, kk) = (cols.start, cols.end - cols.start);
        let mask = self.bit_rows(self.parts[0], self.k, c0, kk, 1)?;
        let ptr = self.row_ptr()?;
        let mask_stride = stride(self.k, 1).ok_or_else(|| self.overflow())?;
        let mut codes = Vec::new();
        let mut new_ptr = Vec::with_capacity(self.n + 1);
        new_ptr.push(0u32);
        for r in 0..self.n {
            let m = &self.parts[0][r * mask_stride..(r + 1) * mask_stride];
            let before = count_ones(m, 0, c0);
            let kept = count_ones(m, c0, c0 + kk);
            let src = &self.parts[2][ptr[r] as usize..ptr[r + 1] as usize];
            let b = q.bits as usize;
            if (before + kept) * b > src.len() * 8 {
                return Err(bad_payload(
                    self.entry,
                    format!("codes of row {r} are shorter than its mask implies"),
                ));
            }
            let len = stride(kept, q.bits).ok_or_else(|| self.overflow())?;
            let at = codes.len();
            codes.resize(at + len, 0);
            copy_bits(src, before * b, kept * b, &mut codes[at..]);
            let end = u32::try_from(codes.len()).map_err(|_| self.overflow())?;
            new_ptr.push(end);
        }
        let mut v = vec![
            mask,
            new_ptr.iter().flat_map(|p| p.to_le_bytes()).collect(),
            codes,
        ];
        v.extend(self.grid(q, &self.parts[3..], cols));
        Ok(v)
    }

    /// `sparse`'s `row_ptr`, checked: starts at 0, never decreases, ends at the length of `codes`.
    fn row_ptr(&self) -> Result<Vec<u32>> {
        let ptr: Vec<u32> = self.parts[1]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let ok = ptr.first() == Some(&0)
            && ptr.windows(2).all(|w| w[0] <= w[1])
            && ptr.last().map(|&p| p as usize) == Some(self.parts[2].len());
        if !ok {
            return Err(bad_payload(
                self.entry,
                "row_ptr must start at 0, never decrease and end at the length of codes".into(),
            ));
        }
        Ok(ptr)
    }

    fn overflow(&self) -> Error {
        Error::Overflow(format!("the shard of tensor {:?}", self.entry.name))
    }
}

/// Copies stream bits `off .. off + n` of `src` to bits `0 .. n` of `dst`, and clears the rest of the last
/// byte written. Bytes of `src` past its end read as zero. `dst` must hold `ceil(n / 8)` bytes (the
/// callers size it to a whole row stride, zeroed).
fn copy_bits(src: &[u8], off: usize, n: usize, dst: &mut [u8]) {
    let (b0, s) = (off / 8, off % 8);
    let nbytes = n.div_ceil(8);
    let at = |i: usize| src.get(i).copied().unwrap_or(0);
    if s == 0 {
        let end = (b0 + nbytes).min(src.len());
        let got = end.saturating_sub(b0);
        dst[..got].copy_from_slice(&src[b0.min(end)..end]);
    } else {
        for (i, d) in dst[..nbytes].iter_mut().enumerate() {
            *d = (at(b0 + i) >> s) | (at(b0 + i + 1) << (8 - s));
        }
    }
    if !n.is_multiple_of(8) {
        dst[nbytes - 1] &= (1u8 << (n % 8)) - 1;
    }
}

/// Set bits in stream bits `from .. to` of `row`.
fn count_ones(row: &[u8], from: usize, to: usize) -> usize {
    (from..to)
        .filter(|&i| row[i / 8] >> (i % 8) & 1 == 1)
        .count()
}

/// The entry of an uncompressed part.
fn part_entry(name: &str, bytes: &[u8]) -> PartEntry {
    PartEntry {
        name: name.to_string(),
        len: bytes.len() as u64,
        raw_len: bytes.len() as u64,
        compression: Compression::None,
        blake3: blake3::hash(bytes).to_hex().to_string(),
    }
}

fn unshardable(tensor: &str, axis: Axis, range: Option<&Range<usize>>, reason: String) -> Error {
    let split = match range {
        Some(r) => format!("{} {}..{}", axis.as_str(), r.start, r.end),
        None => axis.as_str().to_string(),
    };
    Error::Unshardable {
        tensor: tensor.to_string(),
        split,
        reason,
    }
}

fn bad_part(entry: &TensorEntry, part: &str, reason: String) -> Error {
    Error::InvalidPart {
        tensor: entry.name.clone(),
        part: part.to_string(),
        reason,
    }
}

fn bad_payload(entry: &TensorEntry, reason: String) -> Error {
    Error::InvalidPayload {
        tensor: entry.name.clone(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_bits_shifts_and_masks() {
        let src = [0b1011_0110u8, 0b1100_1010, 0xFF];
        let mut dst = [0u8; 2];
        copy_bits(&src, 3, 9, &mut dst);
        // bits 3..12 of the stream: 10110 (bits 3..8 of byte 0) then 1010 (bits 0..4 of byte 1).
        assert_eq!(dst, [0b0101_0110, 0b0000_0001]);
        let mut dst = [0u8; 2];
        copy_bits(&src, 8, 5, &mut dst);
        assert_eq!(dst, [0b0000_1010, 0]);
        let mut dst = [0u8; 1];
        copy_bits(&src, 20, 8, &mut dst); // reads past the end as zero
        assert_eq!(dst, [0b0000_1111]);
    }

    #[test]
    fn count_ones_ranges() {
        let row = [0b1010_1010u8, 0b0000_0001];
        assert_eq!(count_ones(&row, 0, 8), 4);
        assert_eq!(count_ones(&row, 1, 9), 5);
        assert_eq!(count_ones(&row, 3, 3), 0);
    }
}

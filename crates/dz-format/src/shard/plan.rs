//! The tensor-parallel plan of a delta file: for `world` ranks, which tensors are cut along which axis,
//! what each rank holds, and the bytes per rank.
//!
//! The layers are recognised by their Llama-family names, sharded as mistral.rs 0.8.1 shards the base
//! (`models/llama.rs`, `mistralrs-quant`'s `distributed/layers.rs`):
//!
//! | tensor | host layer | delta |
//! |---|---|---|
//! | `*.self_attn.{q}_proj.weight`, `*.mlp.{gate,up}_proj.weight` | column-parallel | rows (output features), even |
//! | `*.self_attn.{k,v}_proj.weight` | column-parallel over KV heads | rows, even; when `world` exceeds `num_key_value_heads`, each rank holds one head (`compute_kv_shard`: heads replicated) |
//! | biases of the above (1-D) | column-parallel | the same ranges, on their only dimension |
//! | `*.self_attn.o_proj.weight`, `*.mlp.down_proj.weight` | row-parallel | columns (input features), even |
//! | biases of row-parallel layers, `model.embed_tokens`, `lm_head`, norms, anything else | replicated | whole, on every rank |
//!
//! Bytes are raw (zstd undone): what a rank holds in memory. They come from the layout formulas, except for
//! `sparse` tensors and row subsets, whose shard sizes depend on the data: those are read and cut.

use std::ops::Range;

use super::{check_split, even_range, shard_range, Axis};
use crate::error::{Error, Result};
use crate::layout::{part_layout, PartLen};
use crate::manifest::{matrix_dims, Codec, Manifest, TensorEntry};
use crate::reader::DeltaFile;

/// How the host shards the layer a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TpLayer {
    /// Output features split (q/k/v/gate/up).
    ColumnParallel,
    /// Input features split, outputs summed across ranks (o/down).
    RowParallel,
    /// The whole tensor on every rank.
    Replicated,
}

impl TpLayer {
    /// `column`, `row` or `replicated`.
    pub fn as_str(self) -> &'static str {
        match self {
            TpLayer::ColumnParallel => "column",
            TpLayer::RowParallel => "row",
            TpLayer::Replicated => "replicated",
        }
    }
}

/// Where a tensor's delta goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Rank `r` holds `ranges[r]` of the matrix view along `axis` (ranges may repeat: replicated KV heads).
    Split {
        /// The cut axis.
        axis: Axis,
        /// One range per rank.
        ranges: Vec<Range<usize>>,
    },
    /// Every rank holds the whole tensor.
    Replicated,
    /// The host splits this layer but the delta cannot be cut so ([`Error::Unshardable`]'s message):
    /// this delta cannot be served at this `world` as it is.
    Refused {
        /// The axis the host splits.
        axis: Axis,
        /// Why not.
        reason: String,
    },
}

/// One tensor of a [`TpPlan`].
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    /// The tensor's name.
    pub name: String,
    /// The host layer it belongs to.
    pub layer: TpLayer,
    /// Its placement.
    pub placement: Placement,
    /// Raw bytes of the whole tensor.
    pub bytes: u64,
    /// Raw bytes per rank (the whole tensor on every rank when replicated or refused).
    pub rank_bytes: Vec<u64>,
}

/// The plan of a delta file for `world` ranks ([`tp_plan`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TpPlan {
    /// The number of ranks.
    pub world: usize,
    /// Per tensor, in manifest order.
    pub tensors: Vec<TensorPlan>,
}

impl TpPlan {
    /// Raw bytes per rank, all tensors.
    pub fn rank_bytes(&self) -> Vec<u64> {
        (0..self.world)
            .map(|r| self.tensors.iter().map(|t| t.rank_bytes[r]).sum())
            .collect()
    }

    /// Raw bytes of the unsharded delta.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// The tensors whose layer is split but whose delta cannot be.
    pub fn refused(&self) -> impl Iterator<Item = &TensorPlan> {
        self.tensors
            .iter()
            .filter(|t| matches!(t.placement, Placement::Refused { .. }))
    }
}

/// The host layer of a tensor, by its Llama-family name (the module docs' table).
pub fn tp_layer(name: &str) -> TpLayer {
    let layer = name
        .strip_suffix(".weight")
        .or_else(|| name.strip_suffix(".bias"))
        .unwrap_or(name);
    let is = |suffix: &str| layer.ends_with(suffix);
    if ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        .iter()
        .chain(&["mlp.gate_proj", "mlp.up_proj"])
        .any(|s| is(s))
    {
        TpLayer::ColumnParallel
    } else if is("self_attn.o_proj") || is("mlp.down_proj") {
        TpLayer::RowParallel
    } else {
        TpLayer::Replicated
    }
}

/// The plan of `file` for `world` ranks. Reads the payload of `sparse` tensors and row subsets that are
/// split (their shard sizes depend on the data); every other size comes from the manifest.
pub fn tp_plan<S: AsRef<[u8]>>(file: &DeltaFile<S>, world: usize) -> Result<TpPlan> {
    if world == 0 {
        return Err(Error::Unshardable {
            tensor: String::new(),
            split: "0 ranks".into(),
            reason: "tensor parallelism needs at least one rank".into(),
        });
    }
    let manifest = file.manifest();
    let kv = KvHeads::of(manifest);
    let mut tensors = Vec::with_capacity(manifest.tensors.len());
    for entry in &manifest.tensors {
        let bytes: u64 = entry.parts.iter().map(|p| p.raw_len).sum();
        let layer = tp_layer(&entry.name);
        let whole = |placement| TensorPlan {
            name: entry.name.clone(),
            layer,
            placement,
            bytes,
            rank_bytes: vec![bytes; world],
        };
        let Some((axis, ranges)) = split_of(entry, layer, world, kv) else {
            tensors.push(whole(Placement::Replicated));
            continue;
        };
        let ranges = match ranges.and_then(|rs| {
            rs.iter()
                .try_for_each(|r| check_split(entry, axis, r.clone()))
                .map(|()| rs)
        }) {
            Ok(rs) => rs,
            Err(Error::Unshardable { split, reason, .. }) => {
                tensors.push(whole(Placement::Refused {
                    axis,
                    reason: format!("{split}: {reason}"),
                }));
                continue;
            }
            Err(e) => return Err(e),
        };
        let rank_bytes = shard_bytes(file, entry, axis, &ranges)?;
        tensors.push(TensorPlan {
            name: entry.name.clone(),
            layer,
            placement: Placement::Split { axis, ranges },
            bytes,
            rank_bytes,
        });
    }
    Ok(TpPlan { world, tensors })
}

/// How the host cuts one tensor of a delta made for `manifest`'s architecture over `world` ranks: the axis
/// and each rank's range, or `None` when every rank holds it whole (replicated layers, norms, embeddings,
/// the head, row-parallel biases). A split the codec cannot make is [`Error::Unshardable`]. This is the
/// per-tensor form of [`tp_plan`] (a loader cuts with it, then [`shard_range`](super::shard_range)).
pub fn tensor_split(
    manifest: &Manifest,
    entry: &TensorEntry,
    world: usize,
) -> Result<Option<(Axis, Vec<Range<usize>>)>> {
    if world == 0 {
        return Err(Error::Unshardable {
            tensor: entry.name.clone(),
            split: "0 ranks".into(),
            reason: "tensor parallelism needs at least one rank".into(),
        });
    }
    let Some((axis, ranges)) = split_of(entry, tp_layer(&entry.name), world, KvHeads::of(manifest))
    else {
        return Ok(None);
    };
    let ranges = ranges?;
    for r in &ranges {
        check_split(entry, axis, r.clone())?;
    }
    Ok(Some((axis, ranges)))
}

/// The KV heads of the architecture, when `config.json` says (for k/v projections with `world` above
/// the head count).
#[derive(Debug, Clone, Copy)]
struct KvHeads {
    heads: usize,
    head_dim: usize,
}

impl KvHeads {
    fn of(manifest: &Manifest) -> Option<KvHeads> {
        let a = &manifest.architecture;
        let get = |k: &str| a.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        let attn = get("num_attention_heads")?;
        let heads = get("num_key_value_heads").unwrap_or(attn);
        let head_dim = get("head_dim").or_else(|| Some(get("hidden_size")? / attn.max(1)))?;
        (heads > 0 && head_dim > 0).then_some(KvHeads { heads, head_dim })
    }
}

/// The axis and per-rank ranges the host cuts a tensor of `layer` into; `None` when it is replicated.
fn split_of(
    entry: &TensorEntry,
    layer: TpLayer,
    world: usize,
    kv: Option<KvHeads>,
) -> Option<(Axis, Result<Vec<Range<usize>>>)> {
    let one_d = entry.shape.len() == 1;
    let axis = match (layer, one_d) {
        (TpLayer::Replicated, _) | (TpLayer::RowParallel, true) => return None,
        (TpLayer::ColumnParallel, false) => Axis::Rows,
        // The bias of a column-parallel layer: its only dimension is the output features.
        (TpLayer::ColumnParallel, true) | (TpLayer::RowParallel, false) => Axis::Cols,
    };
    let ranges = (|| {
        let (n_total, k) = matrix_dims(&entry.name, &entry.shape)?;
        let len = if axis == Axis::Rows { n_total } else { k };
        let is_kv =
            entry.name.contains("self_attn.k_proj") || entry.name.contains("self_attn.v_proj");
        match kv {
            // mistral.rs's compute_kv_shard: each rank holds one KV head, `world / heads` ranks per head.
            Some(KvHeads { heads, head_dim })
                if is_kv && world > heads && len == heads * head_dim =>
            {
                let replicate = world / heads;
                Ok((0..world)
                    .map(|r| {
                        let h = (r / replicate).min(heads - 1);
                        h * head_dim..(h + 1) * head_dim
                    })
                    .collect())
            }
            _ => (0..world)
                .map(|r| even_range(&entry.name, axis, len, r, world))
                .collect(),
        }
    })();
    Some((axis, ranges))
}

/// Raw bytes of each range's shard: from the layout when it fixes every part's length, else by cutting
/// the tensor (read once).
fn shard_bytes<S: AsRef<[u8]>>(
    file: &DeltaFile<S>,
    entry: &TensorEntry,
    axis: Axis,
    ranges: &[Range<usize>],
) -> Result<Vec<u64>> {
    let data_dependent = entry.rows.is_some() || matches!(entry.codec, Codec::Sparse(_));
    if data_dependent {
        let data = file.read(&entry.name)?;
        let parts: Vec<&[u8]> = data.parts.iter().map(|p| p.as_ref()).collect();
        return ranges
            .iter()
            .map(|r| Ok(shard_range(entry, &parts, axis, r.clone())?.nbytes() as u64))
            .collect();
    }
    let (n, k) = entry.matrix_dims()?;
    ranges
        .iter()
        .map(|range| {
            let (n, k) = match axis {
                Axis::Rows => (range.end - range.start, k),
                Axis::Cols => (n, range.end - range.start),
            };
            part_layout(&entry.name, &entry.codec, n, k, false)?
                .iter()
                .map(|p| match p.len {
                    PartLen::Exact(len) => Ok(len as u64),
                    PartLen::FromRowPtr => Err(Error::Overflow(format!(
                        "the plan of tensor {:?}: a data-dependent part",
                        entry.name
                    ))),
                })
                .sum()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names() {
        for (name, layer) in [
            (
                "model.layers.0.self_attn.q_proj.weight",
                TpLayer::ColumnParallel,
            ),
            (
                "model.layers.12.self_attn.k_proj.bias",
                TpLayer::ColumnParallel,
            ),
            ("model.layers.3.mlp.up_proj.weight", TpLayer::ColumnParallel),
            (
                "model.layers.3.mlp.gate_proj.weight",
                TpLayer::ColumnParallel,
            ),
            (
                "model.layers.3.self_attn.o_proj.weight",
                TpLayer::RowParallel,
            ),
            ("model.layers.3.mlp.down_proj.weight", TpLayer::RowParallel),
            ("model.embed_tokens.weight", TpLayer::Replicated),
            ("lm_head.weight", TpLayer::Replicated),
            ("model.norm.weight", TpLayer::Replicated),
            ("model.layers.3.input_layernorm.weight", TpLayer::Replicated),
        ] {
            assert_eq!(tp_layer(name), layer, "{name}");
        }
    }
}

//! Multi-tenant mode: one copy of the base, and in each linear layer the packed deltas of many
//! fine-tunes, applied per batch row (DeltaZip, arXiv 2312.05215, section 4: base and delta computation
//! decoupled, the deltas of a batch in one SBMM).
//!
//! [`DeltaSet`] holds every fine-tune's linear deltas on the device, by layer. As a host
//! [`LinearHook`] (seam 4, `host/patches/mistralrs-quant/0002-linear-hook.patch`) it wraps each linear
//! layer that some fine-tune changes in a [`DeltaLinear`]; the layer reads which fine-tune each batch row
//! is for from the host's row-tags scope (seams 1-3) and adds `x · Dᵀ` (and a bias delta) for those rows
//! with one [`sbmm`]. Rows for the base, or for a fine-tune that leaves this layer alone, cost no delta
//! work.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use candle_core::{DType, Device, Result as CResult, Tensor};
use dz_candle_ops::{sbmm, DeviceDelta, Segment};
use dz_format::Role;
use mistralrs_quant::{
    current_row_tags, IsqType, LinearHook, QuantMethod, QuantMethodConfig, QuantizeOntoGuard,
    QuantizedSerde,
};

use crate::config::CheckedDelta;
use crate::error::{Error, Result};

/// The deltas of one linear layer, one slot per fine-tune of the [`DeltaSet`].
struct LayerDeltas {
    /// The weight delta of each fine-tune (`None`: the fine-tune leaves the weight alone).
    weight: Vec<Option<DeviceDelta>>,
    /// Bias deltas as a `[fine-tunes + 1, out]` f32 table whose last row is zero (the base's row), or
    /// `None` when no fine-tune changes the bias.
    bias: Option<Tensor>,
}

/// The linear deltas of several fine-tunes of one base, on one device, by layer name.
pub struct DeltaSet {
    names: HashMap<Arc<str>, usize>,
    layers: HashMap<String, Arc<LayerDeltas>>,
    n: usize,
}

impl fmt::Debug for DeltaSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeltaSet")
            .field("fine_tunes", &self.n)
            .field("layers", &self.layers.len())
            .finish()
    }
}

/// A tensor's layer: `model.layers.0.self_attn.q_proj.weight` -> (`model.layers.0.self_attn.q_proj`, weight).
fn split_param(name: &str) -> Option<(&str, bool)> {
    if let Some(p) = name.strip_suffix(".weight") {
        Some((p, false))
    } else {
        name.strip_suffix(".bias").map(|p| (p, true))
    }
}

impl DeltaSet {
    /// Reads the linear-layer deltas (weights of `linear` and `lm_head` role, and the biases of those
    /// layers) of `deltas` onto `device`. Fine-tune `i` answers to `deltas[i].spec.name`.
    pub fn load(deltas: &[CheckedDelta], device: &Device) -> Result<Self> {
        let n = deltas.len();
        let mut weights: HashMap<String, Vec<Option<DeviceDelta>>> = HashMap::new();
        for (i, d) in deltas.iter().enumerate() {
            for (j, t) in d.file.manifest().tensors.iter().enumerate() {
                if !matches!(t.role, Role::Linear | Role::LmHead) || t.codec.kind() == "zero" {
                    continue;
                }
                let Some((layer, false)) = split_param(&t.name) else {
                    continue;
                };
                let data = d.file.read_at(j)?;
                let dd = DeviceDelta::from_tensor_data(&data, device)
                    .map_err(|e| Error::Host(format!("{}: {e}", d.spec.name)))?;
                weights
                    .entry(layer.to_string())
                    .or_insert_with(|| vec![None; n])[i] = Some(dd);
            }
        }
        let mut biases: HashMap<String, Vec<Option<Vec<f32>>>> = HashMap::new();
        for (i, d) in deltas.iter().enumerate() {
            for (j, t) in d.file.manifest().tensors.iter().enumerate() {
                let Some((layer, true)) = split_param(&t.name) else {
                    continue;
                };
                if t.role != Role::DenseDelta || t.codec.kind() == "zero" {
                    continue;
                }
                let data = d.file.read_at(j)?;
                let (rows, _) = t.matrix_dims()?;
                let v = data.decode()?.to_f32(rows);
                biases
                    .entry(layer.to_string())
                    .or_insert_with(|| vec![None; n])[i] = Some(v);
            }
        }
        let mut layers = HashMap::new();
        let mut all: Vec<String> = weights.keys().chain(biases.keys()).cloned().collect();
        all.sort();
        all.dedup();
        for layer in all {
            let weight = weights.remove(&layer).unwrap_or_else(|| vec![None; n]);
            let bias = match biases.remove(&layer) {
                None => None,
                Some(b) => Some(bias_table(&b, device)?),
            };
            layers.insert(layer, Arc::new(LayerDeltas { weight, bias }));
        }
        let names = deltas
            .iter()
            .enumerate()
            .map(|(i, d)| (Arc::<str>::from(d.spec.name.as_str()), i))
            .collect();
        Ok(Self { names, layers, n })
    }

    /// The layers (weight prefixes) some fine-tune changes.
    pub fn layer_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.layers.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Wraps `base` (the layer named `name`) in a [`DeltaLinear`] when some fine-tune changes it.
    pub fn wrap_layer(
        self: &Arc<Self>,
        name: &str,
        base: Arc<dyn QuantMethod>,
    ) -> Arc<dyn QuantMethod> {
        match self.layers.get(name) {
            None => base,
            Some(deltas) => Arc::new(DeltaLinear {
                base,
                name: name.to_string(),
                set: self.clone(),
                deltas: deltas.clone(),
            }),
        }
    }
}

fn bias_table(rows: &[Option<Vec<f32>>], device: &Device) -> Result<Tensor> {
    let width = rows
        .iter()
        .flatten()
        .map(Vec::len)
        .next()
        .unwrap_or_default();
    let mut table = Vec::with_capacity((rows.len() + 1) * width);
    for r in rows {
        match r {
            Some(v) if v.len() == width => table.extend_from_slice(v),
            Some(v) => {
                return Err(Error::Host(format!(
                    "bias deltas of one layer differ in length ({} vs {width})",
                    v.len()
                )))
            }
            None => table.extend(std::iter::repeat_n(0f32, width)),
        }
    }
    table.extend(std::iter::repeat_n(0f32, width));
    Tensor::from_vec(table, (rows.len() + 1, width), device).map_err(|e| Error::Host(e.to_string()))
}

/// The host's linear-layer hook: every layer some fine-tune of the set changes becomes a [`DeltaLinear`].
pub struct DeltaHook(pub Arc<DeltaSet>);

impl LinearHook for DeltaHook {
    fn wrap(&self, name: &str, layer: Arc<dyn QuantMethod>) -> CResult<Arc<dyn QuantMethod>> {
        Ok(self.0.wrap_layer(name, layer))
    }
}

/// A base linear layer (any host `QuantMethod`) plus the packed deltas of many fine-tunes: row `r` of a
/// batch computes `x_r · (W + D_f)ᵀ (+ b + Δb_f)` for the fine-tune `f` its row tag names, and the base's
/// `x_r · Wᵀ (+ b)` when it names none (or one this layer does not know).
pub struct DeltaLinear {
    base: Arc<dyn QuantMethod>,
    name: String,
    set: Arc<DeltaSet>,
    deltas: Arc<LayerDeltas>,
}

impl fmt::Debug for DeltaLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeltaLinear")
            .field("name", &self.name)
            .field("base", &self.base)
            .finish()
    }
}

impl DeltaLinear {
    /// The fine-tune index of each batch row under the current row tags, or `None` when no row needs
    /// this layer's deltas.
    fn row_fine_tunes(&self) -> Option<Vec<Option<usize>>> {
        let tags = current_row_tags()?;
        let rows: Vec<Option<usize>> = tags
            .iter()
            .map(|t| t.as_ref().and_then(|n| self.set.names.get(n).copied()))
            .collect();
        let needed = rows.iter().flatten().any(|&f| {
            self.deltas.weight.get(f).is_some_and(Option::is_some) || self.deltas.bias.is_some()
        });
        needed.then_some(rows)
    }

    /// `base_out + deltas` for input `x`, with `rows[b]` the fine-tune of batch row `b`.
    fn add_deltas(&self, x: &Tensor, base_out: &Tensor, rows: &[Option<usize>]) -> CResult<Tensor> {
        let k = x.dim(candle_core::D::Minus1)?;
        let n = base_out.dim(candle_core::D::Minus1)?;
        let m = x.elem_count() / k.max(1);
        if rows.is_empty() || !m.is_multiple_of(rows.len()) {
            candle_core::bail!(
                "{}: {m} input rows do not split into {} batch rows",
                self.name,
                rows.len()
            );
        }
        let per = m / rows.len();
        let token_ft = |i: usize| rows[i / per];
        let mut out = base_out.reshape((m, n))?;

        // Weight deltas: one sbmm over the fine-tunes present, in order of first appearance.
        let mut slot_of: HashMap<usize, usize> = HashMap::new();
        let mut used: Vec<&DeviceDelta> = Vec::new();
        let mut row_slots: Vec<Option<usize>> = Vec::with_capacity(m);
        for i in 0..m {
            let slot = token_ft(i).and_then(|f| {
                let d = self.deltas.weight.get(f)?.as_ref()?;
                Some(*slot_of.entry(f).or_insert_with(|| {
                    used.push(d);
                    used.len() - 1
                }))
            });
            row_slots.push(slot);
        }
        if !used.is_empty() {
            let x2 = x.reshape((m, k))?.contiguous()?;
            out = sbmm(&x2, &out.contiguous()?, &used, &Segment::runs(&row_slots))?;
        }

        // Bias deltas: one gathered row per input row (the zero row for the base).
        if let Some(table) = &self.deltas.bias {
            let zero = self.set.n as u32;
            let ids: Vec<u32> = (0..m)
                .map(|i| token_ft(i).map_or(zero, |f| f as u32))
                .collect();
            let ids = Tensor::from_vec(ids, m, table.device())?;
            let add = table.index_select(&ids, 0)?.to_dtype(out.dtype())?;
            out = (out + add)?;
        }
        out.reshape(base_out.shape())
    }
}

impl QuantizedSerde for DeltaLinear {
    fn name(&self) -> &'static str {
        "deltazip-delta-linear"
    }
}

impl QuantMethod for DeltaLinear {
    fn new(_method: QuantMethodConfig) -> CResult<Self> {
        candle_core::bail!(
            "DeltaLinear is built by dz-loader's DeltaSet, not from a QuantMethodConfig"
        )
    }

    fn dequantize_w(&self) -> CResult<Tensor> {
        self.base.dequantize_w()
    }

    fn forward(&self, a: &Tensor) -> CResult<Tensor> {
        let base_out = self.base.forward(a)?;
        match self.row_fine_tunes() {
            None => Ok(base_out),
            Some(rows) => self.add_deltas(a, &base_out, &rows),
        }
    }

    fn quantized_act_type(&self) -> Option<DType> {
        self.base.quantized_act_type()
    }

    fn dtype_and_device(&self) -> (DType, Device) {
        self.base.dtype_and_device()
    }

    fn add_delta_w(&self, delta: &Tensor) -> CResult<Arc<dyn QuantMethod>> {
        Ok(Arc::new(Self {
            base: self.base.add_delta_w(delta)?,
            name: self.name.clone(),
            set: self.set.clone(),
            deltas: self.deltas.clone(),
        }))
    }

    fn apply_isq(
        self: Arc<Self>,
        _dtype: Option<IsqType>,
        _device: Device,
        _n_quantized: &AtomicUsize,
        _imatrix_weight: Option<Vec<f32>>,
        _guard: QuantizeOntoGuard,
    ) -> CResult<Arc<dyn QuantMethod>> {
        candle_core::bail!(
            "{}: in-situ quantization of a multi-tenant layer is not supported",
            self.name
        )
    }

    fn unquant_weight_bias(&self) -> Option<(Tensor, Option<Tensor>)> {
        self.base.unquant_weight_bias()
    }
}

//! A Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2) in candle, on any candle [`Device`], computing
//! in f32, with a *staged* per-layer API so that calibration ([`crate::calibrate`], DeltaZip section 4.1) can
//! capture the input of each linear group and swap weights between stages.
//!
//! The math is HF `modeling_llama.py`'s: RMSNorm, causal self-attention with grouped-query heads and
//! non-interleaved ("rotate_half") RoPE, a SiLU-gated MLP, residual connections, a final RMSNorm and an lm_head
//! that may share the embedding's weights. Qwen2 differs only by biases on q/k/v. `tests/model.rs` checks the
//! logits against candle-transformers' own `llama` and `qwen2` models on the same weights.
//!
//! One layer, in stages (`h` is the residual stream, `[batch, seq, hidden]`):
//!
//! ```text
//! x    = attn_input(i, h)        input of q/k/v        [b, t, hidden]
//! core = attn_core(i, x)         input of o_proj       [b, t, heads * head_dim]
//! h    = attn_out(i, h, core)    h + o_proj(core)
//! x    = mlp_input(i, h)         input of gate/up      [b, t, hidden]
//! m    = mlp_core(i, x)          input of down_proj    [b, t, intermediate]
//! h    = mlp_out(i, h, m)        h + down_proj(m)
//! ```
//!
//! Evaluation helpers: [`LlamaModel::perplexity`] over non-overlapping windows and [`kl_divergence`] between
//! two models' next-token distributions on the same windows.
//!
//! Training (making real fine-tunes to compress): RMSNorm, softmax and RoPE run as candle-nn's fused ops by
//! default, which candle 0.10 builds with `apply_op*_no_bwd`: gradients stop at them. [`Kernels::Primitive`]
//! computes the same math from primitive candle ops that all have a backward, and [`LlamaModel::from_vars`]
//! builds the model on `candle_core::Var`s, so that [`LlamaModel::next_token_loss`]`.backward()` reaches every
//! weight. The primitive versions are also the slow twins the fused ones are tested against.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};

use crate::arch::ArchConfig;
use crate::error::{Error, Result};

/// Tokens per forward batch in [`LlamaModel::perplexity`] and [`kl_divergence`] (at least one window).
const EVAL_BATCH_TOKENS: usize = 4096;
/// Rows of logits materialized at once (`rows x vocab` f32), to bound memory with large vocabularies.
const LOGIT_ROWS: usize = 512;

/// The per-layer tensors, in the order of [`LAYER_TENSORS`].
const LAYER_TENSORS: [&str; 9] = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];
const IN_NORM: usize = 0;
const Q: usize = 1;
const K: usize = 2;
const V: usize = 3;
const O: usize = 4;
const POST_NORM: usize = 5;
const GATE: usize = 6;
const UP: usize = 7;
const DOWN: usize = 8;
/// The optional per-layer biases (q, k, v), present when `attention_bias`.
const LAYER_BIASES: [&str; 3] = [
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
];

#[derive(Debug, Clone)]
struct Layer {
    t: [Tensor; 9],
    bias: [Option<Tensor>; 3],
}

/// Perplexity over non-overlapping windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerplexityReport {
    /// `exp(nll)`.
    pub ppl: f64,
    /// Mean negative log-likelihood (nats) per predicted token.
    pub nll: f64,
    /// Predicted tokens: `windows * (seq_len - 1)` (the first token of a window has no prediction).
    pub tokens: usize,
}

/// How [`LlamaModel`] computes RMSNorm, softmax and RoPE (everything else is the same in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// candle-nn's fused ops (`ops::rms_norm`, `ops::softmax_last_dim`, `rotary_emb::rope`): fastest, but
    /// without a backward in candle 0.10, so gradients do not flow through them.
    #[default]
    Fused,
    /// The same math from primitive candle ops (square, sum, sqrt, exp, narrow, cat, ...), each with a
    /// backward: what training needs, and the slow twin of [`Kernels::Fused`]. On the CPU the two give
    /// bit-identical logits (the same f32 operations in the same order; `tests/model.rs` checks).
    Primitive,
}

/// A Llama-family decoder with all weights in f32 on one device.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    arch: ArchConfig,
    device: Device,
    kernels: Kernels,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `None` when tied to the embedding.
    lm_head: Option<Tensor>,
}

impl LlamaModel {
    /// Builds the model from `get`, which returns each tensor of [`ArchConfig::tensor_shapes`] by its HF name,
    /// row-major f32. When `tie_word_embeddings`, lm_head is the embedding and `lm_head.weight` is not asked for.
    /// The kernels are [`Kernels::Fused`].
    pub fn load(
        arch: &ArchConfig,
        device: &Device,
        mut get: impl FnMut(&str) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        Self::load_with(arch, device, |name, shape| {
            let values = get(name)?;
            let expected = shape.iter().product::<usize>();
            if values.len() != expected {
                return Err(Error::InvalidModel(format!(
                    "{name}: expected {shape:?} ({expected} values), got {} values",
                    values.len()
                )));
            }
            Ok(Tensor::from_vec(values, shape, device)?)
        })
    }

    /// Builds the model from ready tensors: `get(name, shape)` returns each tensor of
    /// [`ArchConfig::tensor_shapes`], f32 on `device` in that shape, which the model then uses as is (no
    /// copy): a `Var`'s tensor stays that variable, so gradients reach it. Tied embeddings are asked for once.
    /// A tensor of another shape, dtype or device is refused, by name. The kernels are [`Kernels::Fused`].
    pub fn load_with(
        arch: &ArchConfig,
        device: &Device,
        mut get: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        let mut load = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = get(name, shape)?;
            if t.dims() != shape || t.dtype() != DType::F32 || !t.device().same_device(device) {
                return Err(Error::InvalidModel(format!(
                    "{name}: expected f32 {shape:?} on {device:?}, got {:?} {:?} on {:?}",
                    t.dtype(),
                    t.dims(),
                    t.device()
                )));
            }
            Ok(t)
        };
        let shapes = arch.tensor_shapes();
        let shape_of = |name: &str| -> Result<&[usize]> {
            shapes
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.as_slice())
                .ok_or_else(|| Error::InvalidModel(format!("no shape for {name}")))
        };
        let embed = load(
            "model.embed_tokens.weight",
            shape_of("model.embed_tokens.weight")?,
        )?;
        let mut layers = Vec::with_capacity(arch.num_layers);
        for i in 0..arch.num_layers {
            let mut tensors = Vec::with_capacity(LAYER_TENSORS.len());
            for suffix in LAYER_TENSORS {
                let name = format!("model.layers.{i}.{suffix}");
                tensors.push(load(&name, shape_of(&name)?)?);
            }
            let t: [Tensor; 9] = tensors
                .try_into()
                .map_err(|_| Error::InvalidModel("layer tensor count".into()))?;
            let mut bias = [None, None, None];
            if arch.attention_bias {
                for (slot, suffix) in bias.iter_mut().zip(LAYER_BIASES) {
                    let name = format!("model.layers.{i}.{suffix}");
                    *slot = Some(load(&name, shape_of(&name)?)?);
                }
            }
            layers.push(Layer { t, bias });
        }
        let norm = load("model.norm.weight", shape_of("model.norm.weight")?)?;
        let lm_head = if arch.tie_word_embeddings {
            None
        } else {
            Some(load("lm_head.weight", shape_of("lm_head.weight")?)?)
        };
        Ok(Self {
            arch: arch.clone(),
            device: device.clone(),
            kernels: Kernels::Fused,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Builds the model on trainable variables, one per tensor of [`ArchConfig::tensor_shapes`] by HF name
    /// (with tied embeddings, the one `model.embed_tokens.weight` variable is lm_head too), with
    /// [`Kernels::Primitive`] so that gradients flow. The device is the embedding's. Extra entries are ignored.
    pub fn from_vars(arch: &ArchConfig, vars: &HashMap<String, Var>) -> Result<Self> {
        let device = vars
            .get("model.embed_tokens.weight")
            .ok_or_else(|| Error::InvalidModel("no variable model.embed_tokens.weight".into()))?
            .device()
            .clone();
        let mut m = Self::load_with(arch, &device, |name, _| {
            vars.get(name)
                .map(|v| v.as_tensor().clone())
                .ok_or_else(|| Error::InvalidModel(format!("no variable {name}")))
        })?;
        m.kernels = Kernels::Primitive;
        Ok(m)
    }

    /// A fresh trainable copy of every weight, by HF name ([`Self::tensors`]' names), for [`Self::from_vars`].
    pub fn to_vars(&self) -> Result<HashMap<String, Var>> {
        self.tensors()
            .into_iter()
            .map(|(name, t)| Ok((name, Var::from_tensor(&t.detach())?)))
            .collect()
    }

    /// Every weight by HF name, in [`ArchConfig::tensor_shapes`] order (no `lm_head.weight` when tied): cheap
    /// handles that share storage with the model (with [`Self::from_vars`], the variables' current values).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.arch
            .tensor_shapes()
            .into_iter()
            .filter_map(|(name, _)| self.tensor(&name).cloned().map(|t| (name, t)))
            .collect()
    }

    /// How RMSNorm, softmax and RoPE are computed.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Switches between the fused kernels and the differentiable primitive ones (same weights).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// The architecture.
    pub fn arch(&self) -> &ArchConfig {
        &self.arch
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn layer(&self, i: usize) -> Result<&Layer> {
        self.layers.get(i).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "layer {i} does not exist (the model has {})",
                self.layers.len()
            ))
        })
    }

    fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    fn tensor(&self, name: &str) -> Option<&Tensor> {
        match name {
            "model.embed_tokens.weight" => Some(&self.embed),
            "model.norm.weight" => Some(&self.norm),
            "lm_head.weight" => self.lm_head.as_ref(),
            _ => {
                let (i, suffix) = split_layer_name(name)?;
                let l = self.layers.get(i)?;
                if let Some(k) = LAYER_TENSORS.iter().position(|s| *s == suffix) {
                    Some(&l.t[k])
                } else {
                    let k = LAYER_BIASES.iter().position(|s| *s == suffix)?;
                    l.bias[k].as_ref()
                }
            }
        }
    }

    fn tensor_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        match name {
            "model.embed_tokens.weight" => Some(&mut self.embed),
            "model.norm.weight" => Some(&mut self.norm),
            "lm_head.weight" => self.lm_head.as_mut(),
            _ => {
                let (i, suffix) = split_layer_name(name)?;
                let l = self.layers.get_mut(i)?;
                if let Some(k) = LAYER_TENSORS.iter().position(|s| *s == suffix) {
                    Some(&mut l.t[k])
                } else {
                    let k = LAYER_BIASES.iter().position(|s| *s == suffix)?;
                    l.bias[k].as_mut()
                }
            }
        }
    }

    /// One tensor by its HF name (a cheap handle; candle tensors share storage).
    pub fn weight(&self, name: &str) -> Result<Tensor> {
        self.tensor(name)
            .cloned()
            .ok_or_else(|| Error::InvalidModel(format!("the model has no tensor {name}")))
    }

    /// Replaces one tensor (in practice a linear weight: base + decompressed delta), row-major f32 in the
    /// tensor's own shape. With tied embeddings, replacing the embedding replaces lm_head too. The new tensor
    /// is a constant: on a model built [`Self::from_vars`], that weight is no longer the variable.
    pub fn set_weight(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let device = self.device.clone();
        let slot = self
            .tensor_mut(name)
            .ok_or_else(|| Error::InvalidModel(format!("the model has no tensor {name}")))?;
        let shape = slot.shape().clone();
        if values.len() != shape.elem_count() {
            return Err(Error::ShapeMismatch {
                what: "set_weight values",
                expected: shape.elem_count(),
                got: values.len(),
            });
        }
        *slot = Tensor::from_slice(values, shape, &device)?;
        Ok(())
    }

    /// Token ids `[b, t]` (u32) to embeddings `[b, t, hidden]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        Ok(self
            .embed
            .index_select(&flat, 0)?
            .reshape((b, t, self.arch.hidden_size))?)
    }

    /// `input_layernorm(h)`: the input of q/k/v.
    pub fn attn_input(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        self.rms_norm(h, &self.layer(i)?.t[IN_NORM])
    }

    /// Causal self-attention of the q/k/v projections of `x` (`[b, t, hidden]`): the input of o_proj,
    /// `[b, t, heads * head_dim]`.
    pub fn attn_core(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let l = self.layer(i)?;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, d) = (
            self.arch.num_heads,
            self.arch.num_kv_heads,
            self.arch.head_dim,
        );
        let g = nh / nkv;
        let heads = |w: usize, bias: Option<&Tensor>, n: usize| -> Result<Tensor> {
            Ok(linear(x, &l.t[w], bias)?
                .reshape((b, t, n, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = heads(Q, l.bias[0].as_ref(), nh)?;
        let k = heads(K, l.bias[1].as_ref(), nkv)?;
        let v = heads(V, l.bias[2].as_ref(), nkv)?;
        let (cos, sin) = self.rope_tables(t)?;
        let q = self.rope(&q, &cos, &sin)?;
        let k = self.rope(&k, &cos, &sin)?;
        // GQA without copying k/v: query head `kv * g + j` attends with kv head `kv` (HF's repeat_kv), so
        // [b, heads, t, d] viewed as [b, kv_heads, g * t, d] lines every query row up with its kv head.
        let q = (q * (1.0 / (d as f64).sqrt()))?.reshape((b, nkv, g * t, d))?;
        let att = q.matmul(&k.t()?)?.reshape((b * nh, t, t))?;
        let att = att.broadcast_add(&self.causal_mask(t)?)?;
        let att = self.softmax_last_dim(&att)?.reshape((b, nkv, g * t, t))?;
        let y = att.matmul(&v)?.reshape((b, nh, t, d))?;
        Ok(y.transpose(1, 2)?.reshape((b, t, nh * d))?)
    }

    /// `h + o_proj(core)`.
    pub fn attn_out(&self, i: usize, h: &Tensor, core: &Tensor) -> Result<Tensor> {
        Ok((h + linear(core, &self.layer(i)?.t[O], None)?)?)
    }

    /// `post_attention_layernorm(h)`: the input of gate/up.
    pub fn mlp_input(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        self.rms_norm(h, &self.layer(i)?.t[POST_NORM])
    }

    /// `silu(gate(x)) * up(x)`: the input of down_proj, `[b, t, intermediate]`.
    pub fn mlp_core(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let l = self.layer(i)?;
        let gate = linear(x, &l.t[GATE], None)?.silu()?;
        Ok((gate * linear(x, &l.t[UP], None)?)?)
    }

    /// `h + down_proj(m)`.
    pub fn mlp_out(&self, i: usize, h: &Tensor, m: &Tensor) -> Result<Tensor> {
        Ok((h + linear(m, &self.layer(i)?.t[DOWN], None)?)?)
    }

    /// One decoder layer: the six stages chained.
    pub fn layer_forward(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        let core = self.attn_core(i, &self.attn_input(i, h)?)?;
        let h = self.attn_out(i, h, &core)?;
        let m = self.mlp_core(i, &self.mlp_input(i, &h)?)?;
        self.mlp_out(i, &h, &m)
    }

    /// The residual stream after the last layer (before the final norm), `[b, t, hidden]`.
    pub fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let mut h = self.embed(ids)?;
        for i in 0..self.layers.len() {
            h = self.layer_forward(i, &h)?;
        }
        Ok(h)
    }

    /// `norm(h)`: the final RMSNorm, whose output is lm_head's input.
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        self.rms_norm(h, &self.norm)
    }

    /// `lm_head(norm(h))`: `[.., hidden]` to `[.., vocab]`.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        linear(&self.final_norm(h)?, self.lm_head(), None)
    }

    /// Token ids `[b, t]` to logits `[b, t, vocab]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.logits(&self.hidden(ids)?)
    }

    /// Mean next-token cross-entropy (nats) of windows `[b, t]` (u32, `t >= 2`): position `j` predicts token
    /// `j + 1`, as in [`Self::perplexity`]. A scalar; with [`Kernels::Primitive`] on variables
    /// ([`Self::from_vars`]), its `backward()` reaches every weight.
    pub fn next_token_loss(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t < 2 {
            return Err(Error::Calibration(format!(
                "a next-token loss needs windows of at least 2 tokens, got {t}"
            )));
        }
        let rows = b * (t - 1);
        let h = self
            .hidden(ids)?
            .narrow(1, 0, t - 1)?
            .reshape((rows, self.arch.hidden_size))?;
        let targets = ids.narrow(1, 1, t - 1)?.flatten_all()?.unsqueeze(1)?;
        let lp = log_softmax_last_dim(&self.logits(&h)?)?;
        Ok((lp.gather(&targets, 1)?.sum_all()? * (-1.0 / rows as f64))?)
    }

    /// Token ids `[b, t]` to next-token log-probabilities `[b, t, vocab]` (a log-softmax of [`Self::forward`]).
    pub fn next_token_logprobs(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(&self.forward(ids)?, D::Minus1)?)
    }

    /// Perplexity over non-overlapping windows of `seq_len` tokens (the last partial window is dropped), at most
    /// `max_windows` of them, batched. Each window predicts its tokens `1..seq_len` from their prefixes.
    pub fn perplexity(
        &self,
        tokens: &[u32],
        seq_len: usize,
        max_windows: Option<usize>,
    ) -> Result<PerplexityReport> {
        if seq_len < 2 {
            return Err(Error::Calibration(format!(
                "perplexity needs windows of at least 2 tokens, got seq_len {seq_len}"
            )));
        }
        let windows = windows(tokens, seq_len, max_windows, self.arch.vocab_size)?;
        let mut nll = 0f64;
        let mut count = 0usize;
        for batch in windows.chunks(windows_per_batch(seq_len)) {
            let ids = ids_tensor(batch, &self.device)?;
            let b = batch.len();
            let h = self
                .hidden(&ids)?
                .narrow(1, 0, seq_len - 1)?
                .reshape((b * (seq_len - 1), self.arch.hidden_size))?;
            let targets = ids.narrow(1, 1, seq_len - 1)?.flatten_all()?;
            let rows = b * (seq_len - 1);
            for start in (0..rows).step_by(LOGIT_ROWS) {
                let n = LOGIT_ROWS.min(rows - start);
                let lp =
                    candle_nn::ops::log_softmax(&self.logits(&h.narrow(0, start, n)?)?, D::Minus1)?;
                let picked = lp
                    .gather(&targets.narrow(0, start, n)?.unsqueeze(1)?, 1)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                nll -= picked.iter().map(|&v| f64::from(v)).sum::<f64>();
                count += n;
            }
        }
        let nll = nll / count as f64;
        Ok(PerplexityReport {
            ppl: nll.exp(),
            nll,
            tokens: count,
        })
    }

    fn rms_norm(&self, h: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.arch.rms_norm_eps as f32;
        match self.kernels {
            Kernels::Fused => Ok(candle_nn::ops::rms_norm(&h.contiguous()?, w, eps)?),
            Kernels::Primitive => rms_norm_primitive(h, w, eps),
        }
    }

    fn softmax_last_dim(&self, x: &Tensor) -> Result<Tensor> {
        match self.kernels {
            Kernels::Fused => Ok(candle_nn::ops::softmax_last_dim(x)?),
            Kernels::Primitive => softmax_last_dim_primitive(x),
        }
    }

    /// Non-interleaved RoPE of `x` (`[b, heads, t, head_dim]`, contiguous) with tables `[t, head_dim / 2]`.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match self.kernels {
            Kernels::Fused => Ok(candle_nn::rotary_emb::rope(x, cos, sin)?),
            Kernels::Primitive => rope_primitive(x, cos, sin),
        }
    }

    /// RoPE tables `[t, head_dim / 2]` for positions `0..t`, angles computed in f64.
    fn rope_tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let d = self.arch.head_dim;
        let half = d / 2;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in 0..t {
            for k in 0..half {
                let inv_freq = 1.0 / self.arch.rope_theta.powf((2 * k) as f64 / d as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), &self.device)?,
            Tensor::from_vec(sin, (t, half), &self.device)?,
        ))
    }

    /// Additive causal mask `[t, t]`: 0 on and below the diagonal, -inf above.
    fn causal_mask(&self, t: usize) -> Result<Tensor> {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Ok(Tensor::from_vec(mask, (t, t), &self.device)?)
    }
}

/// Mean over positions of `KL(p || q)` between the next-token distributions of two models (same vocabulary)
/// on the same non-overlapping windows of `seq_len` tokens (at most `max_windows`). Every position of every
/// window counts. Zero when the models are equal; grows as `q` (say a compressed fine-tune) drifts from `p`.
pub fn kl_divergence(
    p: &LlamaModel,
    q: &LlamaModel,
    tokens: &[u32],
    seq_len: usize,
    max_windows: Option<usize>,
) -> Result<f64> {
    if p.arch.vocab_size != q.arch.vocab_size {
        return Err(Error::Mismatch(format!(
            "vocabularies differ: {} vs {}",
            p.arch.vocab_size, q.arch.vocab_size
        )));
    }
    if seq_len == 0 {
        return Err(Error::Calibration("seq_len must be >= 1".into()));
    }
    let windows = windows(tokens, seq_len, max_windows, p.arch.vocab_size)?;
    let mut total = 0f64;
    let mut count = 0usize;
    for batch in windows.chunks(windows_per_batch(seq_len)) {
        let rows = batch.len() * seq_len;
        let hp = p
            .hidden(&ids_tensor(batch, &p.device)?)?
            .reshape((rows, p.arch.hidden_size))?;
        let hq = q
            .hidden(&ids_tensor(batch, &q.device)?)?
            .reshape((rows, q.arch.hidden_size))?;
        for start in (0..rows).step_by(LOGIT_ROWS) {
            let n = LOGIT_ROWS.min(rows - start);
            let lp = candle_nn::ops::log_softmax(&p.logits(&hp.narrow(0, start, n)?)?, D::Minus1)?;
            let lq = candle_nn::ops::log_softmax(&q.logits(&hq.narrow(0, start, n)?)?, D::Minus1)?;
            let lq = lq.to_device(&p.device)?;
            let kl = (lp.exp()? * (&lp - &lq)?)?
                .sum(D::Minus1)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            total += kl.iter().sum::<f64>();
            count += n;
        }
    }
    Ok(total / count as f64)
}

/// RMSNorm over the last dimension from primitive ops, as candle-nn's fused `rms_norm` computes it:
/// `x / sqrt(mean(x^2) + eps) * w`.
fn rms_norm_primitive(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let n = Tensor::new(&[x.dim(D::Minus1)? as f32], x.device())?;
    // A true division by the width, as the fused op does (`Tensor / f64` multiplies by its reciprocal).
    let ms = x.sqr()?.sum_keepdim(D::Minus1)?.broadcast_div(&n)?;
    let rms = (ms + f64::from(eps))?.sqrt()?;
    Ok(x.broadcast_div(&rms)?.broadcast_mul(w)?)
}

/// Softmax over the last dimension from primitive ops: `exp(x - max) / sum(exp(x - max))`. The max is
/// detached: softmax does not depend on the shift, so its exact gradient through the max is zero, and
/// skipping it saves a pass over the scores. Every row needs one finite entry (a causal row has its diagonal).
fn softmax_last_dim_primitive(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Log-softmax over the last dimension: `x - max - log(sum(exp(x - max)))`, the max detached as in
/// [`softmax_last_dim_primitive`] (the result does not depend on it).
fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Non-interleaved ("rotate_half") RoPE from primitive ops, as candle-nn's fused `rope` computes it: with
/// `x = [x1, x2]` split in halves of the last dimension, `[x1 cos - x2 sin, x2 cos + x1 sin]`.
/// `x` is `[b, heads, t, d]`, `cos`/`sin` are `[t, d / 2]`.
fn rope_primitive(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, half)?,
        x.narrow(D::Minus1, half, half)?,
    );
    let (cos, sin) = (
        cos.unsqueeze(0)?.unsqueeze(0)?,
        sin.unsqueeze(0)?.unsqueeze(0)?,
    );
    let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let y2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Ok(Tensor::cat(&[&y1, &y2], D::Minus1)?)
}

/// `x @ w^T + b` over the last dimension of `x`, as one 2-D matmul.
fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let mut dims = x.dims().to_vec();
    let rows = x.elem_count() / inp.max(1);
    let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    Ok(y.reshape(dims)?)
}

/// `model.layers.{i}.{suffix}` to `(i, suffix)`.
fn split_layer_name(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (i, suffix) = rest.split_once('.')?;
    Some((i.parse().ok()?, suffix))
}

fn windows_per_batch(seq_len: usize) -> usize {
    (EVAL_BATCH_TOKENS / seq_len).max(1)
}

/// Non-overlapping windows of `seq_len` tokens, at most `max_windows`, every id checked against the vocabulary.
fn windows(
    tokens: &[u32],
    seq_len: usize,
    max_windows: Option<usize>,
    vocab: usize,
) -> Result<Vec<&[u32]>> {
    let mut out: Vec<&[u32]> = tokens.chunks_exact(seq_len).collect();
    if let Some(m) = max_windows {
        out.truncate(m);
    }
    if out.is_empty() {
        return Err(Error::Calibration(format!(
            "{} tokens make no window of {seq_len}",
            tokens.len()
        )));
    }
    check_ids(out.iter().flat_map(|w| w.iter()), vocab)?;
    Ok(out)
}

/// Every id must index the embedding.
pub(crate) fn check_ids<'a>(ids: impl IntoIterator<Item = &'a u32>, vocab: usize) -> Result<()> {
    match ids.into_iter().find(|&&id| id as usize >= vocab) {
        None => Ok(()),
        Some(id) => Err(Error::Calibration(format!(
            "token id {id} is outside the vocabulary ({vocab})"
        ))),
    }
}

/// Equal-length rows to a `[rows, len]` u32 tensor.
pub(crate) fn ids_tensor<S: AsRef<[u32]>>(rows: &[S], device: &Device) -> Result<Tensor> {
    let len = rows.first().map_or(0, |r| r.as_ref().len());
    let flat: Vec<u32> = rows
        .iter()
        .flat_map(|r| r.as_ref().iter().copied())
        .collect();
    if flat.len() != rows.len() * len {
        return Err(Error::Calibration("token rows differ in length".into()));
    }
    Ok(Tensor::from_vec(flat, (rows.len(), len), device)?)
}

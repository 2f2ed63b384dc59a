//! The Llama-family architecture read from an HF `config.json` (Llama 2/3, Mistral, Qwen2, SmolLM2), and
//! the tensor naming that goes with it.

use serde::Deserialize;

use crate::error::{Error, Result};

/// Which family member: decides biases and naming details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3, SmolLM2, and Mistral (same layout, no biases).
    Llama,
    /// Qwen2: biases on q/k/v.
    Qwen2,
}

/// The parts of `config.json` that the model's shapes and forward pass depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchConfig {
    /// The family.
    pub family: Family,
    /// `model_type` as written.
    pub model_type: String,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// lm_head shares the embedding's weights.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2, or `attention_bias` in Llama configs).
    pub attention_bias: bool,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
}

impl ArchConfig {
    /// Parses a `config.json` value, refusing architectures this crate does not handle.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let raw: RawConfig = serde_json::from_value(v.clone())
            .map_err(|e| Error::InvalidModel(format!("config.json: {e}")))?;
        let model_type = raw.model_type.unwrap_or_else(|| "llama".to_string());
        let family = match model_type.as_str() {
            "llama" | "mistral" => Family::Llama,
            "qwen2" => Family::Qwen2,
            other => {
                return Err(Error::InvalidModel(format!(
                    "config.json: model_type {other:?} is not supported (llama, mistral, qwen2)"
                )))
            }
        };
        if let Some(rs) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(Error::InvalidModel(format!(
                "config.json: rope_scaling {rs} is not supported yet"
            )));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let bad = |what: &str| Error::InvalidModel(format!("config.json: {what}"));
        if raw.hidden_size == 0
            || raw.num_attention_heads == 0
            || raw.num_hidden_layers == 0
            || raw.vocab_size == 0
            || raw.intermediate_size == 0
        {
            return Err(bad("sizes must be >= 1"));
        }
        if num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(
                "num_attention_heads must be a multiple of num_key_value_heads",
            ));
        }
        let head_dim = match raw.head_dim {
            Some(h) => h,
            None => {
                if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
                    return Err(bad("hidden_size must be a multiple of num_attention_heads"));
                }
                raw.hidden_size / raw.num_attention_heads
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad("head_dim must be even and >= 2"));
        }
        Ok(Self {
            family,
            model_type,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(family == Family::Qwen2),
        })
    }

    /// The linear layers of decoder layer `i`, in calibration order: q/k/v, o, gate/up, down.
    /// Each inner slice shares one input (and so one Hessian).
    pub fn linear_groups(&self, i: usize) -> [Vec<String>; 4] {
        let p = format!("model.layers.{i}");
        [
            vec![
                format!("{p}.self_attn.q_proj.weight"),
                format!("{p}.self_attn.k_proj.weight"),
                format!("{p}.self_attn.v_proj.weight"),
            ],
            vec![format!("{p}.self_attn.o_proj.weight")],
            vec![
                format!("{p}.mlp.gate_proj.weight"),
                format!("{p}.mlp.up_proj.weight"),
            ],
            vec![format!("{p}.mlp.down_proj.weight")],
        ]
    }

    /// Every tensor the model has, with its shape `[rows, cols]` (or `[len]`), in a canonical order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for i in 0..self.num_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            if self.attention_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_config() {
        let c = ArchConfig::from_json(&serde_json::json!({
            "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "tie_word_embeddings": true
        }))
        .unwrap();
        assert_eq!(c.head_dim, 64);
        assert!(!c.attention_bias);
        let shapes = c.tensor_shapes();
        assert_eq!(shapes.len(), 1 + 30 * 9 + 1);
        assert!(!shapes.iter().any(|(n, _)| n == "lm_head.weight"));
    }

    #[test]
    fn refuses_unknown_and_inconsistent() {
        let e = ArchConfig::from_json(&serde_json::json!({"model_type": "gpt2"})).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
        let e = ArchConfig::from_json(&serde_json::json!({
            "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3,
            "vocab_size": 100
        }))
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
    }
}

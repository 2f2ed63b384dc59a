//! Seeded tiny model families for tests and demos: a random base in the Llama or Qwen2 layout, synthetic
//! fine-tunes of it, a byte-level BPE tokenizer and a calibration text, all written as HF-style
//! directories. Nothing is downloaded.
//!
//! The fine-tunes are shaped like real ones as DeltaZip observes them (arXiv 2312.05215, section 3): the
//! delta of every linear layer is small against the weight (about `strength` of its RMS) and mostly low-rank;
//! norms and biases move slightly; only some embedding rows move (the tokens the fine-tuning data used),
//! the others stay bit-identical to the base.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use dz_format::Dtype;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::arch::{ArchConfig, Family};
use crate::calib_data::DEFAULT_CALIB_TEXT;
use crate::error::{Error, Result};
use crate::hf::{self, encode_f32, OwnedTensor};

/// One tensor of a generated model: name, shape, values (row-major).
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The fine-tune strength [`write_family`] uses: deltas of about 5% of each weight's RMS.
pub const DEFAULT_FT_STRENGTH: f32 = 0.05;
/// The fraction of embedding rows a fine-tune changes.
pub const EMBED_ROWS_CHANGED: f64 = 0.3;
/// The rank of the low-rank part of a synthetic linear delta.
pub const DELTA_RANK: usize = 4;
/// The special token every fixture tokenizer has, at id `vocab - 1` (also BOS and EOS in the config).
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// The smallest vocabulary a fixture tokenizer can have: 256 byte symbols and [`EOS_TOKEN`].
pub const MIN_VOCAB: usize = 257;
/// Bytes of calibration text [`write_family`] writes.
pub const FAMILY_CALIB_BYTES: usize = 32 * 1024;

/// The sizes and seed of a tiny model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    /// Llama (no biases) or Qwen2 (q/k/v biases).
    pub family: Family,
    /// Residual width.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP width.
    pub ffn: usize,
    /// Vocabulary (at least [`MIN_VOCAB`] for [`write_family`]).
    pub vocab: usize,
    /// lm_head shares the embedding.
    pub tied: bool,
    /// The dtype the weights are written in.
    pub dtype: Dtype,
    /// Seeds the base weights (and, mixed with each fine-tune's seed, the fine-tunes).
    pub seed: u64,
}

impl TinySpec {
    /// A Llama-layout model: hidden 64, 2 layers, 4 heads (2 KV heads), FFN 160, vocab 320, untied, f32.
    pub fn llama() -> Self {
        Self {
            family: Family::Llama,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 160,
            vocab: 320,
            tied: false,
            dtype: Dtype::F32,
            seed: 0x11a3a,
        }
    }

    /// A Qwen2-layout model: the sizes of [`TinySpec::llama`], with q/k/v biases and tied embeddings.
    pub fn qwen2() -> Self {
        Self {
            family: Family::Qwen2,
            tied: true,
            seed: 0x9e2,
            ..Self::llama()
        }
    }

    /// The HF-style `config.json` of this model.
    pub fn config_json(&self) -> Value {
        let eos = self.vocab.saturating_sub(1);
        let mut c = json!({
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tied,
            "max_position_embeddings": 512,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "bos_token_id": eos,
            "eos_token_id": eos,
            "use_cache": true,
            "torch_dtype": hf::torch_dtype_name(self.dtype),
        });
        let extra = match self.family {
            Family::Llama => json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "attention_bias": false,
                "mlp_bias": false,
            }),
            Family::Qwen2 => json!({
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "use_sliding_window": false,
                "sliding_window": 512,
                "max_window_layers": self.layers,
            }),
        };
        if let (Some(c), Value::Object(e)) = (c.as_object_mut(), extra) {
            c.extend(e);
        }
        c
    }

    /// The architecture, as parsed back from [`TinySpec::config_json`]: refuses inconsistent sizes.
    pub fn arch(&self) -> Result<ArchConfig> {
        ArchConfig::from_json(&self.config_json())
    }

    /// The architecture without validation, so that generation never fails (`tensor_shapes` is total).
    fn arch_unchecked(&self) -> ArchConfig {
        ArchConfig {
            family: self.family,
            model_type: match self.family {
                Family::Llama => "llama",
                Family::Qwen2 => "qwen2",
            }
            .to_string(),
            hidden_size: self.hidden,
            intermediate_size: self.ffn,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.hidden / self.heads.max(1),
            vocab_size: self.vocab,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: self.tied,
            attention_bias: self.family == Family::Qwen2,
        }
    }

    /// Random base weights in the order of [`ArchConfig::tensor_shapes`]: linear weights `N(0, 1/fan_in)`
    /// (activations keep their scale through the layers), the embedding `N(0, 0.02^2)`, norms
    /// `1 + N(0, 0.02^2)`, biases `N(0, 0.02^2)`. Each tensor has its own stream, seeded by the spec's seed
    /// and the tensor's name.
    pub fn generate_base(&self) -> Vec<NamedTensor> {
        self.arch_unchecked()
            .tensor_shapes()
            .into_par_iter()
            .map(|(name, shape)| {
                let mut rng = StdRng::seed_from_u64(mix(&[self.seed, 0xba5e, name_hash(&name)]));
                let n: usize = shape.iter().product();
                let values: Vec<f32> = match kind(&name, &shape) {
                    Kind::Embedding => (0..n).map(|_| 0.02 * normal(&mut rng)).collect(),
                    Kind::Linear { cols, .. } | Kind::LmHead { cols, .. } => {
                        let std = 1.0 / (cols.max(1) as f32).sqrt();
                        (0..n).map(|_| std * normal(&mut rng)).collect()
                    }
                    Kind::Norm => (0..n).map(|_| 1.0 + 0.02 * normal(&mut rng)).collect(),
                    Kind::Bias => (0..n).map(|_| 0.02 * normal(&mut rng)).collect(),
                };
                (name, shape, values)
            })
            .collect()
    }

    /// A synthetic fine-tune of `base` (as returned by [`TinySpec::generate_base`], or read from a model):
    /// - linear weights: a rank-[`DELTA_RANK`] delta plus dense noise, together of RMS about
    ///   `strength` times the weight's RMS (95% of the energy in the low-rank part); `lm_head` this way too,
    ///   so all its rows change;
    /// - the embedding: rows of a seeded subset of token ids (about [`EMBED_ROWS_CHANGED`], at least one,
    ///   never all) move by noise of RMS `strength` x the embedding's RMS; every other row is bit-identical;
    /// - norms move by `N(0, (0.2 strength rms)^2)`, biases by `N(0, (strength rms)^2)`.
    ///
    /// A tensor whose values do not match its shape is only given dense noise.
    pub fn finetune(&self, base: &[NamedTensor], ft_seed: u64, strength: f32) -> Vec<NamedTensor> {
        base.par_iter()
            .map(|(name, shape, w)| {
                let mut rng =
                    StdRng::seed_from_u64(mix(&[self.seed, 0xf1e7, ft_seed, name_hash(name)]));
                let rms = rms(w);
                let k = kind(name, shape);
                let dims_ok = shape.iter().product::<usize>() == w.len();
                let out = match k {
                    Kind::Linear { rows, cols } | Kind::LmHead { rows, cols } if dims_ok => {
                        low_rank_delta(&mut rng, w, rows, cols, strength * rms)
                    }
                    Kind::Embedding if dims_ok => {
                        embedding_delta(&mut rng, w, shape, strength * rms)
                    }
                    Kind::Norm => noise(&mut rng, w, 0.2 * strength * rms),
                    _ => noise(&mut rng, w, strength * rms),
                };
                (name.clone(), shape.clone(), out)
            })
            .collect()
    }
}

/// What a tensor is, from its name and shape.
enum Kind {
    Embedding,
    LmHead { rows: usize, cols: usize },
    Linear { rows: usize, cols: usize },
    Norm,
    Bias,
}

fn kind(name: &str, shape: &[usize]) -> Kind {
    match (name, shape) {
        ("model.embed_tokens.weight", [_, _]) => Kind::Embedding,
        ("lm_head.weight", &[rows, cols]) => Kind::LmHead { rows, cols },
        (_, &[rows, cols]) => Kind::Linear { rows, cols },
        (n, _) if n.ends_with(".bias") => Kind::Bias,
        _ => Kind::Norm,
    }
}

/// A standard normal sample (Box-Muller; rand 0.8 has no normal distribution without rand_distr).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn rms(w: &[f32]) -> f32 {
    if w.is_empty() {
        return 0.0;
    }
    let ss: f64 = w.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    (ss / w.len() as f64).sqrt() as f32
}

fn noise(rng: &mut StdRng, w: &[f32], std: f32) -> Vec<f32> {
    w.iter().map(|&v| v + std * normal(rng)).collect()
}

/// `w + U V^T + noise`, with the low-rank part carrying 95% of the delta's energy and `target` its RMS.
fn low_rank_delta(rng: &mut StdRng, w: &[f32], rows: usize, cols: usize, target: f32) -> Vec<f32> {
    let r = DELTA_RANK.min(rows).min(cols).max(1);
    let u: Vec<f32> = (0..rows * r).map(|_| normal(rng)).collect();
    let v: Vec<f32> = (0..cols * r).map(|_| normal(rng)).collect();
    // Entries of U V^T with standard normal factors have variance r.
    let lr = target * 0.95f32.sqrt() / (r as f32).sqrt();
    let dense = target * 0.05f32.sqrt();
    let mut out = Vec::with_capacity(w.len());
    for i in 0..rows {
        let ui = &u[i * r..(i + 1) * r];
        for j in 0..cols {
            let vj = &v[j * r..(j + 1) * r];
            let d: f32 = ui.iter().zip(vj).map(|(a, b)| a * b).sum();
            out.push(w[i * cols + j] + lr * d + dense * normal(rng));
        }
    }
    out
}

/// Moves a seeded subset of rows (at least one, never all when there are two or more); the rest stay
/// bit-identical.
fn embedding_delta(rng: &mut StdRng, w: &[f32], shape: &[usize], std: f32) -> Vec<f32> {
    let &[rows, cols] = shape else {
        return w.to_vec();
    };
    let mut changed: Vec<bool> = (0..rows)
        .map(|_| rng.gen_bool(EMBED_ROWS_CHANGED))
        .collect();
    if rows > 0 && !changed.contains(&true) {
        changed[rng.gen_range(0..rows)] = true;
    }
    if rows > 1 && !changed.contains(&false) {
        changed[rng.gen_range(0..rows)] = false;
    }
    let mut out = w.to_vec();
    for (row, _) in changed.iter().enumerate().filter(|(_, c)| **c) {
        for v in &mut out[row * cols..(row + 1) * cols] {
            *v += std * normal(rng);
        }
    }
    out
}

/// SplitMix64 over a sequence of words: independent-looking seeds from structured inputs.
fn mix(words: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &w in words {
        h ^= w;
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h = z ^ (z >> 31);
    }
    h
}

/// FNV-1a of a tensor name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The paths of a family written by [`write_family`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyFamily {
    /// `root/base`.
    pub base: PathBuf,
    /// `root/ft-0`, `root/ft-1`, ...
    pub finetunes: Vec<PathBuf>,
    /// `root/calib.txt`: calibration and evaluation text.
    pub calib_text: PathBuf,
}

/// The seed of fine-tune `i` of a family.
pub fn finetune_seed(i: usize) -> u64 {
    1000 + i as u64
}

fn to_owned_tensors(tensors: Vec<NamedTensor>, dtype: Dtype) -> Vec<OwnedTensor> {
    tensors
        .into_iter()
        .map(|(name, shape, values)| {
            let bytes = encode_f32(&values, dtype);
            (name, dtype, shape, bytes)
        })
        .collect()
}

/// Writes a tiny family under `root`: `root/base` and `root/ft-0` .. `root/ft-{n-1}` as HF-style
/// directories (weights in `spec.dtype`, one `model.safetensors` each, plus `config.json` and
/// `tokenizer.json`), and `root/calib.txt`, [`FAMILY_CALIB_BYTES`] of the default calibration text starting
/// at a seeded line. Fine-tune `i` is [`TinySpec::finetune`] with [`finetune_seed`]`(i)` and
/// [`DEFAULT_FT_STRENGTH`], made from the base as stored (after rounding to `spec.dtype`).
///
/// Refuses a spec whose config does not parse ([`ArchConfig::from_json`]) or whose vocabulary is below
/// [`MIN_VOCAB`], and (like [`hf::write_model`]) model directories that exist and are not empty.
pub fn write_family(root: &Path, spec: &TinySpec, n_finetunes: usize) -> Result<TinyFamily> {
    spec.arch()?;
    if spec.vocab < MIN_VOCAB {
        return Err(Error::InvalidConfig(format!(
            "tiny model: vocab {} is below {MIN_VOCAB} (256 byte symbols and {EOS_TOKEN})",
            spec.vocab
        )));
    }
    std::fs::create_dir_all(root).map_err(|source| Error::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let config = spec.config_json();
    let tokenizer = tokenizer_json(spec.vocab);
    let extra: [(&str, &[u8]); 1] = [(hf::TOKENIZER_FILE, tokenizer.as_bytes())];

    // Round the base to its stored dtype first, so that fine-tunes are made from what a reader sees.
    let base: Vec<NamedTensor> = spec
        .generate_base()
        .into_iter()
        .map(|(n, s, v)| {
            let v = hf::round_to(&v, spec.dtype);
            (n, s, v)
        })
        .collect();
    let base_dir = root.join("base");
    let owned = to_owned_tensors(base.clone(), spec.dtype);
    hf::write_model(&base_dir, &config, owned, u64::MAX, &extra, false)?;

    let mut finetunes = Vec::with_capacity(n_finetunes);
    for i in 0..n_finetunes {
        let ft = spec.finetune(&base, finetune_seed(i), DEFAULT_FT_STRENGTH);
        let dir = root.join(format!("ft-{i}"));
        hf::write_model(
            &dir,
            &config,
            to_owned_tensors(ft, spec.dtype),
            u64::MAX,
            &extra,
            false,
        )?;
        finetunes.push(dir);
    }

    let calib_text = root.join("calib.txt");
    let text = calib_slice(spec.seed, FAMILY_CALIB_BYTES);
    let tmp = root.join(".calib.txt.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &calib_text))
        .map_err(|source| Error::Io {
            path: calib_text.clone(),
            source,
        })?;
    Ok(TinyFamily {
        base: base_dir,
        finetunes,
        calib_text,
    })
}

/// About `bytes` of [`DEFAULT_CALIB_TEXT`], from a line start chosen by `seed` to a line end.
fn calib_slice(seed: u64, bytes: usize) -> &'static str {
    let text = DEFAULT_CALIB_TEXT;
    if text.len() <= bytes {
        return text;
    }
    let mut rng = StdRng::seed_from_u64(mix(&[seed, 0xca11b]));
    let at = rng.gen_range(0..text.len() - bytes);
    // The text is ASCII-only, but stay on char boundaries regardless.
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end_max = (start + bytes).min(text.len());
    let end = text
        .get(start..end_max)
        .and_then(|s| s.rfind('\n'))
        .map_or(end_max, |i| start + i + 1);
    text.get(start..end).unwrap_or(text)
}

/// GPT-2's byte-to-symbol table: printable bytes stand for themselves, the others are shifted to U+0100+.
fn byte_symbols() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let b = b as u32;
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        *slot = char::from_u32(c).unwrap_or('?');
    }
    table
}

/// A byte-level BPE `tokenizer.json` (HF tokenizers format, GPT-2 style) with `vocab` ids: ids 0..255 are
/// the byte symbols (id = byte value), `vocab - 1` is [`EOS_TOKEN`], and the ids between are BPE merges
/// learned (greedily, deterministically) from [`DEFAULT_CALIB_TEXT`]. Any text round-trips through
/// encode/decode. A `vocab` below [`MIN_VOCAB`] is raised to it.
pub fn tokenizer_json(vocab: usize) -> String {
    let vocab = vocab.max(MIN_VOCAB);
    let symbols = byte_symbols();
    let mut tokens: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
    let merges = learn_merges(&mut tokens, vocab - 1);
    let eos_id = vocab - 1;
    let mut vocab_map: BTreeMap<String, usize> = BTreeMap::new();
    for (id, t) in tokens.iter().enumerate() {
        vocab_map.insert(t.clone(), id);
    }
    vocab_map.insert(EOS_TOKEN.to_string(), eos_id);
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    let merges: Vec<String> = merges
        .iter()
        .map(|&(a, b)| format!("{} {}", tokens[a], tokens[b]))
        .collect();
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": eos_id, "content": EOS_TOKEN, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges,
        }
    });
    serde_json::to_string_pretty(&tok).unwrap_or_default()
}

/// Greedy BPE training on the byte-level pre-tokenized default text until `tokens` holds `target` entries
/// (or no pair is left). Returns the merges in rank order, as pairs of token ids; ties go to the smaller
/// ids, so the result is deterministic.
fn learn_merges(tokens: &mut Vec<String>, target: usize) -> Vec<(usize, usize)> {
    let mut merges = Vec::new();
    if tokens.len() >= target {
        return merges;
    }
    // Pre-tokenize as GPT-2's ByteLevel does (words, a leading space, digit runs, punctuation runs,
    // whitespace), so that merges never span what the tokenizer will keep apart.
    let mut counts: HashMap<Vec<usize>, u64> = HashMap::new();
    for piece in gpt2_pieces(DEFAULT_CALIB_TEXT) {
        let ids: Vec<usize> = piece.bytes().map(usize::from).collect();
        if ids.len() >= 2 {
            *counts.entry(ids).or_default() += 1;
        }
    }
    let mut words: Vec<(Vec<usize>, u64)> = counts.into_iter().collect();
    words.sort();
    let mut by_string: HashMap<String, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i))
        .collect();
    // Pair counts are kept up to date incrementally: only the words a merge touches are recounted.
    let mut pairs: HashMap<(usize, usize), u64> = HashMap::new();
    let count = |pairs: &mut HashMap<(usize, usize), u64>, w: &[usize], c: u64, add: bool| {
        for p in w.windows(2) {
            let e = pairs.entry((p[0], p[1])).or_default();
            *e = if add { *e + c } else { e.saturating_sub(c) };
        }
    };
    for (w, c) in &words {
        count(&mut pairs, w, *c, true);
    }
    while tokens.len() < target {
        let Some((&best, _)) = pairs
            .iter()
            .filter(|(_, &c)| c > 0)
            .max_by(|(pa, ca), (pb, cb)| ca.cmp(cb).then(pb.cmp(pa)))
        else {
            break;
        };
        let merged = format!("{}{}", tokens[best.0], tokens[best.1]);
        let id = match by_string.get(&merged) {
            Some(&id) => id,
            None => {
                tokens.push(merged.clone());
                by_string.insert(merged, tokens.len() - 1);
                tokens.len() - 1
            }
        };
        merges.push(best);
        for (w, c) in &mut words {
            if !w.windows(2).any(|p| (p[0], p[1]) == best) {
                continue;
            }
            count(&mut pairs, w, *c, false);
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && (w[i], w[i + 1]) == best {
                    out.push(id);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            count(&mut pairs, &out, *c, true);
            *w = out;
        }
        pairs.retain(|_, c| *c > 0);
    }
    merges
}

/// Splits text the way GPT-2's pre-tokenizer regex does, approximately (ASCII classes): contractions,
/// ` ?letters`, ` ?digits`, ` ?other`, whitespace. Merges learned across a different split would only go
/// unused, never break the tokenizer.
fn gpt2_pieces(text: &str) -> Vec<&str> {
    #[derive(PartialEq, Clone, Copy)]
    enum C {
        L,
        N,
        S,
        O,
    }
    let class = |c: char| {
        if c.is_alphabetic() {
            C::L
        } else if c.is_numeric() {
            C::N
        } else if c.is_whitespace() {
            C::S
        } else {
            C::O
        }
    };
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let start = chars[i].0;
        let mut j = i;
        if chars[j].1 == ' ' && j + 1 < chars.len() && class(chars[j + 1].1) != C::S {
            j += 1;
        }
        let c = class(chars[j].1);
        let mut k = j + 1;
        while k < chars.len() && class(chars[k].1) == c {
            k += 1;
        }
        // A whitespace run keeps its last space for the next word.
        if c == C::S && k < chars.len() && k - j > 1 && chars[k - 1].1 == ' ' {
            k -= 1;
        }
        let end = chars.get(k).map_or(text.len(), |x| x.0);
        out.push(&text[start..end]);
        i = k;
    }
    out
}

/// Compresses fine-tune `ft` against `base` into `out` (named `name`) with 8-bit round-to-nearest, group
/// 32, no pruning and no calibration: a nearly lossless delta, the reference tests compare serving
/// paths with.
pub fn compress_rtn8(
    base: &Path,
    ft: &Path,
    out: &Path,
    name: &str,
) -> Result<crate::pipeline::CompressReport> {
    use crate::pipeline::{CompressOptions, Method, Quiet};
    let opts = CompressOptions {
        name: Some(name.to_string()),
        method: Method::Rtn,
        quant: crate::QuantConfig {
            bits: 8,
            group_size: 32,
            symmetric: true,
            sparsity: crate::Sparsity::None,
        },
        embed_bits: 8,
        ..CompressOptions::default()
    };
    crate::pipeline::compress(base, ft, out, &opts, &mut Quiet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_is_seeded_and_realistic() {
        let spec = TinySpec::llama();
        let a = spec.generate_base();
        assert_eq!(a, spec.generate_base());
        let shapes = spec.arch().unwrap().tensor_shapes();
        assert_eq!(a.len(), shapes.len());
        for ((n, s, v), (en, es)) in a.iter().zip(&shapes) {
            assert_eq!((n, s), (en, es));
            assert_eq!(v.len(), s.iter().product::<usize>());
            assert!(v.iter().any(|&x| x != 0.0), "{n} is all zero");
            assert!(v.iter().all(|x| x.is_finite()));
        }
        let other = TinySpec { seed: 7, ..spec }.generate_base();
        assert_ne!(a[1].2, other[1].2);
    }

    #[test]
    fn finetune_is_small_low_rank_and_sparse_in_embedding() {
        let spec = TinySpec::qwen2();
        let base = spec.generate_base();
        let ft = spec.finetune(&base, 3, DEFAULT_FT_STRENGTH);
        assert_eq!(ft, spec.finetune(&base, 3, DEFAULT_FT_STRENGTH));
        assert_ne!(ft, spec.finetune(&base, 4, DEFAULT_FT_STRENGTH));
        for ((n, s, w), (_, _, f)) in base.iter().zip(&ft) {
            let d: Vec<f32> = f.iter().zip(w).map(|(a, b)| a - b).collect();
            let rel = rms(&d) / rms(w);
            if n == "model.embed_tokens.weight" {
                let cols = s[1];
                let moved = d
                    .chunks(cols)
                    .filter(|r| r.iter().any(|&x| x != 0.0))
                    .count();
                let frac = moved as f64 / s[0] as f64;
                assert!((0.2..0.4).contains(&frac), "{frac}");
            } else if s.len() == 2 {
                assert!((0.03..0.07).contains(&rel), "{n}: {rel}");
            } else {
                assert!(rel > 0.0 && rel < 0.07, "{n}: {rel}");
            }
        }
    }

    #[test]
    fn pieces_cover_the_text() {
        let t = "Hello,  world 42!\n\n  def f(x):\n\treturn x's";
        assert_eq!(gpt2_pieces(t).concat(), t);
        assert!(gpt2_pieces(t).contains(&" world"));
    }
}

//! A tiny model family with deltas, written once per test binary to a temp dir.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Tensor;
use dz_compress::fixtures::{self, TinyFamily, TinySpec};
use dz_loader::Engine;

/// A family and deltas of its fine-tunes.
pub struct Fixture {
    /// Keeps the directory alive.
    _dir: tempfile::TempDir,
    /// The family's root.
    pub root: PathBuf,
    /// Base and fine-tunes.
    pub family: TinyFamily,
    /// `ft-i` compressed with 8-bit RTN (no pruning, group 32): nearly lossless.
    pub deltas8: Vec<PathBuf>,
}

/// Compresses `ft` against `base` into `out` with 8-bit RTN (no calibration).
pub fn compress8(base: &Path, ft: &Path, out: &Path, name: &str) {
    fixtures::compress_rtn8(base, ft, out, name).expect("compress");
}

fn build(spec: TinySpec, n: usize) -> Fixture {
    build_with(spec, n, |_| {})
}

/// Like `build`, with `edit` applied to every model's config.json before compressing.
fn build_with(spec: TinySpec, n: usize, edit: impl Fn(&mut serde_json::Value)) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let family = fixtures::write_family(&root, &spec, n).expect("family");
    for d in std::iter::once(&family.base).chain(&family.finetunes) {
        let p = d.join("config.json");
        let mut c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&p).expect("read config")).expect("config");
        edit(&mut c);
        std::fs::write(&p, serde_json::to_vec_pretty(&c).expect("json")).expect("write config");
    }
    let deltas8 = family
        .finetunes
        .iter()
        .enumerate()
        .map(|(i, ft)| {
            let out = root.join(format!("ft-{i}-rtn8.dz"));
            compress8(&family.base, ft, &out, &format!("ft-{i}"));
            out
        })
        .collect();
    Fixture {
        _dir: dir,
        root,
        family,
        deltas8,
    }
}

/// The Llama-layout family (2 fine-tunes), built once.
pub fn llama() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| build(TinySpec::llama(), 2))
}

/// The Llama-layout family with 3 fine-tunes (mixed batches of 3 fine-tunes and the base), built once.
pub fn llama_three() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| build(TinySpec::llama(), 3))
}

/// The Llama layout declared as Mistral (`MistralForCausalLM`, no sliding window), 1 fine-tune.
pub fn mistral() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        build_with(TinySpec::llama(), 1, |c| {
            c["model_type"] = "mistral".into();
            c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
            c["sliding_window"] = serde_json::Value::Null;
        })
    })
}

/// The Qwen2-layout family (biases, tied embeddings; 1 fine-tune), built once.
pub fn qwen2() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| build(TinySpec::qwen2(), 1))
}

/// The Qwen2-layout family with 2 fine-tunes, built once.
pub fn qwen2_two() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| build(TinySpec::qwen2(), 2))
}

/// Writes `text` as a config file in a fresh temp dir; returns the dir (keep it) and the file.
pub fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("serve.toml");
    std::fs::write(&file, text).expect("write config");
    (dir, file)
}

/// A path as it goes into TOML (quoted, escaped).
pub fn q(p: &Path) -> String {
    toml_quote(&p.to_string_lossy())
}

fn toml_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Largest logit difference allowed between the merged fine-tune (8-bit delta) and the fine-tune itself.
pub const LOGIT_TOL: f32 = 0.02;

/// Tokens generated per prompt by the engine tests.
pub const MAX_TOKENS: usize = 12;

/// Model `merged` follows model `direct`: along `direct`'s own greedy continuation, its
/// next-token logits are within `tol` at every position, and its greedy tokens are the same up to
/// the first position where the fine-tune's top two logits are closer than the logits' error (a near-tie
/// that 8-bit noise may break either way).
pub fn assert_follows(
    engine: &Engine,
    merged: &str,
    direct: &str,
    prompt: &[u32],
    tol: f32,
) -> usize {
    let want = engine
        .generate_tokens(direct, prompt, MAX_TOKENS)
        .unwrap()
        .token_ids();
    let got = engine
        .generate_tokens(merged, prompt, MAX_TOKENS)
        .unwrap()
        .token_ids();
    assert!(!want.is_empty(), "nothing generated");
    let mut ctx = prompt.to_vec();
    let mut agreed = 0;
    let mut parted = false;
    for (i, &tok) in want.iter().enumerate() {
        let tok = tok.expect("a token id");
        let a = engine.next_logits(merged, &ctx).unwrap();
        let c = engine.next_logits(direct, &ctx).unwrap();
        let err = a
            .iter()
            .zip(&c)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            err <= tol,
            "position {i}: {merged} vs {direct}: logits differ by {err} > {tol}"
        );
        let mut sorted = c.clone();
        sorted.sort_by(|x, y| y.total_cmp(x));
        let gap = sorted[0] - sorted[1];
        let argmax = c
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .map(|x| x.0 as u32);
        assert_eq!(
            argmax,
            Some(tok),
            "position {i}: greedy decoding is not the argmax of the logits"
        );
        if !parted {
            match got.get(i) {
                Some(&g) if g == Some(tok) => agreed += 1,
                _ => {
                    assert!(
                        gap <= 2.0 * err,
                        "position {i}: greedy tokens part with top-2 gap {gap} > 2 x error {err}"
                    );
                    parted = true;
                }
            }
        }
        ctx.push(tok);
    }
    agreed
}

/// The largest absolute difference of two tensors' elements (f32).
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `dir` loaded by the host as a plain model (f32, CPU, contiguous KV cache), with `base`'s tokenizer.
pub fn load_plain(dir: &Path, base: &Path) -> dz_loader::host::SharedPipeline {
    dz_loader::host::load_pipeline(
        dir,
        base,
        dz_loader::DtypeSpec::F32,
        &candle_core::Device::Cpu,
        dz_loader::host::KvCache::Contiguous,
    )
    .unwrap()
}

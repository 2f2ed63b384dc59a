//! A tiny model family with deltas, written once per test binary to a temp dir.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dz_compress::fixtures::{self, TinyFamily, TinySpec};
use dz_compress::pipeline::{self, CompressOptions, Method, Quiet};
use dz_compress::{QuantConfig, Sparsity};

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
    let opts = CompressOptions {
        name: Some(name.to_string()),
        method: Method::Rtn,
        quant: QuantConfig {
            bits: 8,
            group_size: 32,
            symmetric: true,
            sparsity: Sparsity::None,
        },
        embed_bits: 8,
        ..CompressOptions::default()
    };
    pipeline::compress(base, ft, out, &opts, &mut Quiet).expect("compress");
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

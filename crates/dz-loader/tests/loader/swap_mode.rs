//! Swap mode (the full-model baseline) through the host engine: a swap fine-tune is computed by its
//! own full merged weights inside the base's engine, so it generates what the same delta merged and
//! loaded as a model of its own generates; a batch mixing swap models, multi-tenant deltas and the
//! base gives each row what it gets alone.

use crate::common;

use common::{q, write_config, MAX_TOKENS};
use dz_loader::{Config, Served};

/// Swap (the fine-tune's full weights, f32, computed by the host's own unquantized layer on the swap
/// rows) vs the same delta merged and loaded by the host: the same weights, so rounding of the
/// matrix products only (differently sized batches).
const SWAP_VS_MERGED_TOL: f32 = 1e-4;

/// A multi-tenant row vs the same row computed alone (the loader's mixed-batch tolerance).
const BATCH_TOL: f32 = 1e-3;

fn ids(prompt: &str) -> Vec<u32> {
    prompt.bytes().map(u32::from).collect()
}

/// Serves `[[delta]]` entries `(name, delta index, mode)` of fixture `f` over its base (f32).
fn serve(
    f: &common::Fixture,
    entries: &[(&str, usize, &str)],
    swap_gpu_models: usize,
) -> (Served, tempfile::TempDir, tempfile::TempDir) {
    let merged = tempfile::tempdir().unwrap();
    let mut text = format!(
        "[base]\npath = {}\ndtype = \"f32\"\nname = \"base\"\n[runtime]\nmerged_dir = {}\nswap_gpu_models = {swap_gpu_models}\n",
        q(&f.family.base),
        q(merged.path())
    );
    for (name, i, mode) in entries {
        text += &format!(
            "[[delta]]\nname = \"{name}\"\npath = {}\nmode = \"{mode}\"\n",
            q(&f.deltas8[*i])
        );
    }
    let (dir, file) = write_config(&text);
    let (config, deltas) = Config::load(&file).unwrap();
    (dz_loader::serve(&config, &deltas).unwrap(), dir, merged)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn check_family(f: &common::Fixture) {
    let (served, _dir, _merged) = serve(
        f,
        &[("ft-0-swap", 0, "swap"), ("ft-0-merged", 0, "merge")],
        2,
    );
    let engine = &served.engine;
    assert_eq!(served.swap.names(), ["ft-0-swap"]);
    let store = served.swap_store.as_ref().expect("a swap store");
    assert_eq!(store.files(), 1);
    assert!(served.swap.bytes() > 0 && served.swap.bytes() == store.bytes());
    let mut differs_from_base = false;
    for prompt in ["def main():\n    ", "Once upon a time, "] {
        let p = ids(prompt);
        let swap = engine.generate_tokens("ft-0-swap", &p, MAX_TOKENS).unwrap();
        let merged = engine
            .generate_tokens("ft-0-merged", &p, MAX_TOKENS)
            .unwrap();
        assert_eq!(
            swap.token_ids(),
            merged.token_ids(),
            "{prompt:?}: swap vs merged greedy tokens"
        );
        assert_eq!(swap.tokens.len(), MAX_TOKENS);
        // Logits along the continuation.
        let mut ctx = p.clone();
        for (i, t) in swap.token_ids().into_iter().enumerate() {
            let a = engine.next_logits("ft-0-swap", &ctx).unwrap();
            let b = engine.next_logits("ft-0-merged", &ctx).unwrap();
            let d = max_diff(&a, &b);
            assert!(
                d <= SWAP_VS_MERGED_TOL,
                "{prompt:?} position {i}: swap vs merged logits differ by {d} > {SWAP_VS_MERGED_TOL}"
            );
            ctx.push(t.expect("a token id"));
        }
        let base = engine.generate_tokens("base", &p, MAX_TOKENS).unwrap();
        differs_from_base |= base.token_ids() != swap.token_ids();
    }
    assert!(
        differs_from_base,
        "the fine-tune generates like the base: vacuous test"
    );
    let tokens = served.swap.tokens();
    assert!(
        tokens.get("ft-0-swap").copied().unwrap_or(0) >= MAX_TOKENS as u64,
        "{tokens:?}"
    );
}

#[test]
fn swap_llama_generates_like_merged() {
    check_family(common::llama());
}

/// Qwen2: biases in q/k/v, and a tied head (the swap model's own embedding table is its head).
#[test]
fn swap_qwen2_generates_like_merged() {
    check_family(common::qwen2());
}

/// Rows of two swap models, two multi-tenant fine-tunes and the base in one batch (same prompt length,
/// so the host batches prefill and decode), each get the greedy tokens and log-probabilities they get
/// alone; a swap fine-tune and the same delta multi-tenant agree.
#[test]
fn a_mixed_batch_of_swap_multi_tenant_and_base_rows() {
    let f = common::llama_three();
    let (served, _dir, _merged) = serve(
        f,
        &[
            ("s0", 0, "swap"),
            ("s1", 1, "swap"),
            ("s0-again", 0, "swap"),
            ("mt2", 2, "multi-tenant"),
            ("mt0", 0, "multi-tenant"),
        ],
        3,
    );
    let engine = &served.engine;
    // Two names over one delta file: one CPU copy, two models on the device.
    let store = served.swap_store.as_ref().expect("a swap store");
    assert_eq!(store.files(), 2);
    assert_eq!(served.swap.names(), ["s0", "s0-again", "s1"]);
    let prompts: Vec<Vec<u32>> = [
        "abcdefgh", "The fox!", "12345678", "fn main", "zyxwvuts", "qwertyui", "mnbvcxz.",
    ]
    .iter()
    .map(|p| ids(&format!("{p:8}")))
    .collect();
    let names = ["s0", "base", "mt2", "s1", "mt0", "s0", "s0-again"];
    let requests: Vec<(&str, &[u32])> = names
        .iter()
        .zip(&prompts)
        .map(|(n, p)| (*n, p.as_slice()))
        .collect();
    let together = engine.generate_tokens_batch(&requests, MAX_TOKENS).unwrap();
    assert!(
        served.swap.widest_batch() >= 2,
        "the host never batched rows of different swap models (widest: {})",
        served.swap.widest_batch()
    );
    assert!(
        served.registry.widest_batch() >= 2,
        "the multi-tenant rows never shared a batch (widest: {})",
        served.registry.widest_batch()
    );
    for ((name, p), got) in requests.iter().zip(&together) {
        let alone = engine.generate_tokens(name, p, MAX_TOKENS).unwrap();
        assert_eq!(
            got.token_ids(),
            alone.token_ids(),
            "{name}: batched vs alone"
        );
        for (a, b) in got.tokens.iter().zip(&alone.tokens) {
            let d = (a.logprob - b.logprob).abs();
            assert!(d <= BATCH_TOL, "{name}: log-probs differ by {d}");
        }
    }
    // The rows are really their own models: the two swap models differ, a swap model and the same
    // delta multi-tenant agree.
    let p = &prompts[0];
    let s0 = engine.next_logits("s0", p).unwrap();
    let s1 = engine.next_logits("s1", p).unwrap();
    let mt0 = engine.next_logits("mt0", p).unwrap();
    assert!(
        max_diff(&s0, &s1) > 10.0 * BATCH_TOL,
        "s0 and s1 agree: vacuous test"
    );
    assert!(
        max_diff(&s0, &mt0) <= BATCH_TOL,
        "swap vs multi-tenant of one delta: {}",
        max_diff(&s0, &mt0)
    );
    // Tokens by model: swap rows in the swap registry, the others in the delta registry.
    assert!(served.swap.tokens().get("s1").copied().unwrap_or(0) >= MAX_TOKENS as u64);
    assert!(served.registry.tokens().get("mt2").copied().unwrap_or(0) >= MAX_TOKENS as u64);
    assert!(!served.registry.tokens().contains_key("s1"));
}

/// Without a residency manager every swap model is on the device, so more than `swap_gpu_models` of
/// them is refused.
#[test]
fn serve_without_a_residency_manager_holds_every_swap_model() {
    let f = common::llama();
    let merged = tempfile::tempdir().unwrap();
    let text = format!(
        "[base]\npath = {}\ndtype = \"f32\"\n[runtime]\nmerged_dir = {}\nswap_gpu_models = 1\n\
         [[delta]]\nname = \"a\"\npath = {}\nmode = \"swap\"\n\
         [[delta]]\nname = \"b\"\npath = {}\nmode = \"swap\"\n",
        q(&f.family.base),
        q(merged.path()),
        q(&f.deltas8[0]),
        q(&f.deltas8[1])
    );
    let (_dir, file) = write_config(&text);
    let (config, deltas) = Config::load(&file).unwrap();
    let e = match dz_loader::serve(&config, &deltas) {
        Ok(_) => panic!("2 swap models with swap_gpu_models = 1 were served"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("swap_gpu_models = 1 allows 1"), "{e}");
}

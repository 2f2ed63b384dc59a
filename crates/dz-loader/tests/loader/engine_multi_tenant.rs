//! Multi-tenant mode through the host engine: the base's layers wrapped at load (seam 4), fine-tunes
//! served as aliases of the base (seam 1) with their rows tagged (seams 2-3). Per architecture:
//! greedy generation by a multi-tenant fine-tune follows the same delta merged, and the uncompressed
//! fine-tune; the base through the wrapped layers is bit-identical to a plain load of the base; a batch
//! mixing rows of 3 fine-tunes and the base gives each row what running it alone gives.

use crate::common;

use common::{assert_follows, q, write_config, LOGIT_TOL, MAX_TOKENS};
use dz_loader::{Config, Served};

/// Multi-tenant (x·W + x·D) vs the same delta merged (x·(W + D)), both f32: rounding only.
const MT_VS_MERGED_TOL: f32 = 1e-3;

const PROMPTS: [&str; 2] = ["def main():\n    ", "Once upon a time, "];

fn ids(prompt: &str) -> Vec<u32> {
    prompt.bytes().map(u32::from).collect()
}

/// Serves every fine-tune of `f` multi-tenant (`ft-i`), fine-tune 0 also merged (`ft-0-merged`), plus
/// the uncompressed fine-tune 0 (`ft-0-direct`) and a plain load of the base (`base-plain`).
fn serve(f: &common::Fixture, merged_dir: &std::path::Path) -> (Served, tempfile::TempDir) {
    let mut text = format!(
        "[base]\npath = {}\ndtype = \"f32\"\nname = \"base\"\n[runtime]\nmerged_dir = {}\n",
        q(&f.family.base),
        q(merged_dir)
    );
    for (i, d) in f.deltas8.iter().enumerate() {
        text += &format!("[[delta]]\nname = \"ft-{i}\"\npath = {}\n", q(d));
    }
    text += &format!(
        "[[delta]]\nname = \"ft-0-merged\"\npath = {}\nmode = \"merge\"\n",
        q(&f.deltas8[0])
    );
    let (dir, file) = write_config(&text);
    let (config, deltas) = Config::load(&file).unwrap();
    let mut served = dz_loader::serve(&config, &deltas).unwrap();
    let load = |d: &std::path::Path| common::load_plain(d, &f.family.base);
    served
        .engine
        .add("ft-0-direct", load(&f.family.finetunes[0]))
        .unwrap();
    served
        .engine
        .add("base-plain", load(&f.family.base))
        .unwrap();
    (served, dir)
}

fn check_family(f: &common::Fixture) {
    let merged = tempfile::tempdir().unwrap();
    let (served, _config_dir) = serve(f, merged.path());
    let engine = &served.engine;
    let n = f.deltas8.len();
    let mut models = engine.models().unwrap();
    models.sort();
    let mut want: Vec<String> = ["base", "base-plain", "ft-0-direct", "ft-0-merged"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    want.extend((0..n).map(|i| format!("ft-{i}")));
    want.sort();
    // Aliases are listed with their model or not at all, depending on the host; the engines are these.
    for m in &models {
        assert!(want.contains(m), "unexpected model {m}");
    }
    assert_eq!(served.registry.names().len(), n);

    let mut differs_from_base = false;
    let mut agreed = 0;
    for prompt in PROMPTS {
        let p = ids(prompt);
        // Multi-tenant vs merged: the same delta, so the same tokens up to rounding near-ties.
        agreed += assert_follows(engine, "ft-0", "ft-0-merged", &p, MT_VS_MERGED_TOL);
        // ... and vs the uncompressed fine-tune, within the 8-bit delta's error.
        assert_follows(engine, "ft-0", "ft-0-direct", &p, LOGIT_TOL);
        // The base through the wrapped layers is exactly a plain load of the base.
        let a = engine.next_logits("base", &p).unwrap();
        let b = engine.next_logits("base-plain", &p).unwrap();
        assert_eq!(a, b, "the hooked base differs from the plain base");
        let mt = engine.generate_tokens("ft-0", &p, MAX_TOKENS).unwrap();
        let base = engine.generate_tokens("base", &p, MAX_TOKENS).unwrap();
        differs_from_base |= mt.token_ids() != base.token_ids();
    }
    assert!(
        differs_from_base,
        "the fine-tune generates like the base: vacuous test"
    );
    assert!(
        agreed >= PROMPTS.len() * MAX_TOKENS - 2,
        "only {agreed} greedy tokens agree between multi-tenant and merged"
    );
    // The text path (the host's tokenizer) works for an alias too.
    assert!(!engine
        .generate("ft-0", "Hello", 4)
        .unwrap()
        .tokens
        .is_empty());
}

#[test]
fn multi_tenant_llama_generates_like_merged_and_direct() {
    check_family(common::llama());
}

#[test]
fn multi_tenant_mistral_generates_like_merged_and_direct() {
    check_family(common::mistral());
}

/// Qwen2: bias deltas, and tied embeddings (the embedding delta also applies to the output head).
#[test]
fn multi_tenant_qwen2_generates_like_merged_and_direct() {
    check_family(common::qwen2());
}

/// Rows of 3 fine-tunes and the base, sent together (same prompt length: the host batches their prompt
/// and decode steps), each get the greedy tokens and log-probabilities of running alone. (This caught
/// the host's CPU decode-attention bug with batches of more than one row, fixed by
/// `host/patches/mistralrs-core/0006-cpu-decode-attention-batch.patch`.)
#[test]
fn a_mixed_batch_gives_each_row_its_own_fine_tune() {
    let f = common::llama_three();
    let merged = tempfile::tempdir().unwrap();
    let (served, _config_dir) = serve(f, merged.path());
    let engine = &served.engine;
    let prompts: Vec<Vec<u32>> = ["abcdefgh", "The fox!", "12345678", "fn main", "zyxwvuts"]
        .iter()
        .map(|p| ids(&format!("{p:8}")))
        .collect();
    let names = ["ft-0", "base", "ft-1", "ft-2", "ft-0"];
    let requests: Vec<(&str, &[u32])> = names
        .iter()
        .zip(&prompts)
        .map(|(n, p)| (*n, p.as_slice()))
        .collect();
    let together = engine.generate_tokens_batch(&requests, MAX_TOKENS).unwrap();
    assert!(
        served.registry.widest_batch() >= 2,
        "the host never batched rows of different fine-tunes (widest: {})",
        served.registry.widest_batch()
    );
    // The pass counters: 5 rows of 4 requested models at most a pass, and more than one model in some.
    let pc = served.registry.pass_counts();
    assert!(pc.passes > 0, "{pc:?}");
    assert!(pc.rows >= pc.passes && pc.rows <= 5 * pc.passes, "{pc:?}");
    assert!(
        pc.models > pc.passes && pc.models <= 4 * pc.passes && pc.models <= pc.rows,
        "{pc:?}"
    );
    // Each pass has at least a run a model and at most one a row (which passes split the rows into more
    // runs than models depends on how the host's scheduler ordered them: `models_and_runs`' test).
    assert!(pc.runs >= pc.models && pc.runs <= pc.rows, "{pc:?}");
    for ((name, p), got) in requests.iter().zip(&together) {
        let alone = engine.generate_tokens(name, p, MAX_TOKENS).unwrap();
        assert_eq!(
            got.token_ids(),
            alone.token_ids(),
            "{name}: batched vs alone"
        );
        for (a, b) in got.tokens.iter().zip(&alone.tokens) {
            let d = (a.logprob - b.logprob).abs();
            assert!(d <= MT_VS_MERGED_TOL, "{name}: log-probs differ by {d}");
        }
    }
    // Each fine-tune's row is its own: fine-tunes differ from one another on the same prompt.
    let p = &prompts[0];
    let a = engine.next_logits("ft-1", p).unwrap();
    let b = engine.next_logits("ft-2", p).unwrap();
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        d > 10.0 * MT_VS_MERGED_TOL,
        "ft-1 and ft-2 agree: vacuous test"
    );
    // The output head counted the batch's tokens per requested model.
    let tokens = served.registry.tokens();
    assert!(
        tokens.get("ft-2").copied().unwrap_or(0) >= MAX_TOKENS as u64,
        "{tokens:?}"
    );
}

/// `DZ_PROFILE` on a base served alone: its layers are wrapped (as a multi-tenant server's) so that the
/// profile times its linear layers and steps, and the wrapped base generates as a plain load does.
#[test]
fn a_profiled_base_alone_times_its_linear_layers_and_steps() {
    use dz_loader::profile::Part;
    let f = common::llama();
    let text = format!(
        "[base]\npath = {}\ndtype = \"f32\"\nname = \"base\"\n",
        q(&f.family.base)
    );
    let (_dir, file) = write_config(&text);
    let (config, deltas) = Config::load(&file).unwrap();
    // Read once, when the server's registry is made. Other tests of this binary that make a registry
    // meanwhile profile too, which changes none of their results (host mode: no synchronization).
    std::env::set_var("DZ_PROFILE", "host");
    let served = dz_loader::serve(&config, &deltas);
    std::env::remove_var("DZ_PROFILE");
    let mut served = served.unwrap();
    assert!(served.registry.profile().enabled());
    let plain = common::load_plain(&f.family.base, &f.family.base);
    served.engine.add("base-plain", plain).unwrap();
    let p = ids("Hello");
    let got = served.engine.generate_tokens("base", &p, 4).unwrap();
    let want = served.engine.generate_tokens("base-plain", &p, 4).unwrap();
    assert_eq!(got.token_ids(), want.token_ids());
    let snap = served.registry.profile().snapshot();
    let calls = |part: Part| {
        let (_, _, calls) = snap.parts.iter().find(|(p, _, _)| *p == part).unwrap();
        *calls
    };
    // The prompt step's and the decode steps' linear layers (the tiny Llama has at least 8 a pass).
    assert!(calls(Part::BaseLinearPrefill) >= 8, "{snap:?}");
    assert!(calls(Part::BaseLinear) >= 8 * 3, "{snap:?}");
    for part in [
        Part::LinearDelta,
        Part::LinearDeltaPrefill,
        Part::EmbeddingDelta,
        Part::NormDelta,
    ] {
        assert_eq!(calls(part), 0, "{part:?}: no fine-tune, no delta work");
    }
    // 4 tokens: 4 output-head calls, 3 intervals between them.
    assert!(snap.steps >= 3, "{snap:?}");
}

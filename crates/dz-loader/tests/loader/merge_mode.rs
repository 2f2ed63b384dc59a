//! Merge mode through the host engine: greedy generation with the merged fine-tune (base + 8-bit delta)
//! gives the tokens of the uncompressed fine-tune loaded directly, and differs from the base's.

use crate::common;

use candle_core::Device;
use common::{q, write_config};
use dz_loader::{host, Config, DtypeSpec, Engine};

const PROMPTS: [&str; 3] = [
    "def main():\n    ",
    "The quick brown fox",
    "Once upon a time, ",
];
const MAX_TOKENS: usize = 12;

/// Largest logit difference allowed between the merged fine-tune (8-bit delta) and the fine-tune itself.
const LOGIT_TOL: f32 = 0.02;

/// The merged fine-tune follows the fine-tune itself: along the fine-tune's own greedy continuation, its
/// next-token logits are within [`LOGIT_TOL`] at every position, and its greedy tokens are the same up to
/// the first position where the fine-tune's top two logits are closer than the logits' error (a near-tie
/// that 8-bit noise may break either way).
fn assert_follows(engine: &Engine, merged: &str, direct: &str, prompt: &[u32]) -> usize {
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
            err <= LOGIT_TOL,
            "position {i}: logits differ by {err} > {LOGIT_TOL}"
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

fn check_family(f: &common::Fixture) {
    let merged = tempfile::tempdir().unwrap();
    let text = format!(
        "[base]\npath = {}\ndtype = \"f32\"\nname = \"base\"\n\
         [runtime]\nmerged_dir = {}\n\
         [[delta]]\nname = \"ft-0\"\npath = {}\nmode = \"merge\"\n",
        q(&f.family.base),
        q(merged.path()),
        q(&f.deltas8[0])
    );
    let (_dir, file) = write_config(&text);
    let (config, deltas) = Config::load(&file).unwrap();
    let mut engine = dz_loader::serve(&config, &deltas).unwrap();
    let direct = host::load_pipeline(
        &f.family.finetunes[0],
        &f.family.base,
        DtypeSpec::F32,
        &Device::Cpu,
    )
    .unwrap();
    engine.add("ft-0-direct", direct).unwrap();
    let mut models = engine.models().unwrap();
    models.sort();
    assert_eq!(models, ["base", "ft-0", "ft-0-direct"]);

    let mut differs_from_base = false;
    let mut agreed = 0;
    for prompt in PROMPTS {
        let ids: Vec<u32> = prompt.bytes().map(u32::from).collect();
        agreed += assert_follows(&engine, "ft-0", "ft-0-direct", &ids);
        let merged = engine.generate_tokens("ft-0", &ids, MAX_TOKENS).unwrap();
        let base = engine.generate_tokens("base", &ids, MAX_TOKENS).unwrap();
        differs_from_base |= merged.token_ids() != base.token_ids();
        // The text path (the host's tokenizer) works too.
        assert!(!engine
            .generate("ft-0", prompt, 4)
            .unwrap()
            .tokens
            .is_empty());
    }
    assert!(
        differs_from_base,
        "the fine-tune generates like the base: vacuous test"
    );
    assert!(
        agreed >= PROMPTS.len() * MAX_TOKENS / 2,
        "only {agreed} greedy tokens agree"
    );

    // The merge is written once: a second start-up reuses it.
    let dirs: Vec<_> = std::fs::read_dir(merged.path()).unwrap().collect();
    assert_eq!(dirs.len(), 1);
    let (config, deltas) = Config::load(&file).unwrap();
    let dir = dz_loader::merge::merged_path(&config.merged_dir(), &deltas[0]).unwrap();
    let before = std::fs::metadata(dir.join("config.json"))
        .unwrap()
        .modified()
        .unwrap();
    drop(engine);
    let again =
        dz_loader::merge::materialise(&config.base.path, &config.merged_dir(), &deltas[0]).unwrap();
    assert_eq!(again, dir);
    let after = std::fs::metadata(dir.join("config.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
}

#[test]
fn merged_llama_generates_like_the_uncompressed_fine_tune() {
    check_family(common::llama());
}

#[test]
fn merged_mistral_generates_like_the_uncompressed_fine_tune() {
    check_family(common::mistral());
}

#[test]
fn merged_qwen2_generates_like_the_uncompressed_fine_tune() {
    check_family(common::qwen2());
}

#[test]
fn multi_tenant_mode_is_refused_until_implemented() {
    let f = common::llama();
    let text = format!(
        "[base]\npath = {}\n[[delta]]\nname = \"ft-0\"\npath = {}\n",
        q(&f.family.base),
        q(&f.deltas8[0])
    );
    let (_dir, file) = write_config(&text);
    let (config, deltas) = Config::load(&file).unwrap();
    let e = match dz_loader::serve(&config, &deltas) {
        Ok(_) => panic!("multi-tenant accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("delta[0].mode: multi-tenant mode is not implemented yet"),
        "{e}"
    );
}

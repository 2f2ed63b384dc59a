//! Merge mode through the host engine: greedy generation with the merged fine-tune (base + 8-bit delta)
//! gives the tokens of the uncompressed fine-tune loaded directly, and differs from the base's.

use crate::common;

use candle_core::Device;
use common::{assert_follows, q, write_config, LOGIT_TOL, MAX_TOKENS};
use dz_loader::{host, Config, DtypeSpec};

const PROMPTS: [&str; 3] = [
    "def main():\n    ",
    "The quick brown fox",
    "Once upon a time, ",
];

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
    let mut engine = dz_loader::serve(&config, &deltas).unwrap().engine;
    let direct = host::load_pipeline(
        &f.family.finetunes[0],
        &f.family.base,
        DtypeSpec::F32,
        &Device::Cpu,
        host::KvCache::Contiguous,
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
        agreed += assert_follows(&engine, "ft-0", "ft-0-direct", &ids, LOGIT_TOL);
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

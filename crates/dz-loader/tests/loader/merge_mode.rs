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
    let again = dz_loader::merge::materialise(
        &config.base.path,
        &config.merged_dir(),
        &deltas[0],
        &Device::Cpu,
    )
    .unwrap();
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

/// The files of two model directories, name by name, are byte for byte the same.
fn assert_same_files(what: &str, a: &std::path::Path, b: &std::path::Path) {
    let list = |d: &std::path::Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let names = list(a);
    assert_eq!(names, list(b), "{what}: the directories hold other files");
    assert!(names
        .iter()
        .any(|n| n.to_string_lossy().ends_with(".safetensors")));
    for n in names {
        let (x, y) = (
            std::fs::read(a.join(&n)).unwrap(),
            std::fs::read(b.join(&n)).unwrap(),
        );
        assert!(x == y, "{what}: {n:?} differs");
    }
}

/// The op path of merge mode (dz-candle-ops' `merge`, what a CUDA device runs), here on the CPU, writes
/// exactly the files of the CPU path (dz-compress's merge): the codecs the compressor writes (`quant`
/// 8-bit grouped and 4-bit row subsets for embeddings and heads, `sparse24` 4-bit asymmetric, `sparse`
/// 2-bit per row, `sign1`, dense norm and bias deltas), f32 and bf16 weights, Llama and Qwen2 (biases, a
/// tied head).
#[test]
fn merge_through_the_op_writes_the_cpu_merge() {
    use dz_compress::fixtures::{self, TinySpec};
    use dz_compress::pipeline::{self, CompressOptions, Method, Quiet};
    use dz_compress::{QuantConfig, Sparsity};

    let dir = tempfile::tempdir().unwrap();
    let bf16 = fixtures::write_family(
        &dir.path().join("bf16"),
        &TinySpec {
            dtype: dz_format::Dtype::Bf16,
            ..TinySpec::llama()
        },
        1,
    )
    .unwrap();
    let recipes = [
        ("rtn4-24-asym", Method::Rtn, 4, 32, false, Sparsity::TwoFour),
        (
            "rtn2-sparse",
            Method::Rtn,
            2,
            0,
            true,
            Sparsity::Unstructured { density: 0.5 },
        ),
        ("sign", Method::Sign, 4, 32, true, Sparsity::None),
    ];
    let families = [
        ("llama", &common::llama().family),
        ("qwen2", &common::qwen2().family),
        ("llama-bf16", &bf16),
    ];
    let mut cases = vec![
        (
            "llama rtn8".to_string(),
            common::llama().family.base.clone(),
            common::llama().deltas8[0].clone(),
        ),
        (
            "qwen2 rtn8".to_string(),
            common::qwen2().family.base.clone(),
            common::qwen2().deltas8[0].clone(),
        ),
    ];
    for (fam, f) in families {
        for (name, method, bits, group_size, symmetric, sparsity) in recipes {
            let out = dir.path().join(format!("{fam}-{name}.dz"));
            let opts = CompressOptions {
                name: Some(name.to_string()),
                method,
                quant: QuantConfig {
                    bits,
                    group_size,
                    symmetric,
                    sparsity,
                },
                embed_bits: 4,
                ..CompressOptions::default()
            };
            pipeline::compress(&f.base, &f.finetunes[0], &out, &opts, &mut Quiet).unwrap();
            cases.push((format!("{fam} {name}"), f.base.clone(), out));
        }
    }
    for (i, (what, base, delta)) in cases.iter().enumerate() {
        let cpu = dir.path().join(format!("cpu-{i}"));
        let op = dir.path().join(format!("op-{i}"));
        dz_compress::merge::merge(base, delta, &cpu, false, |_| {}).unwrap();
        let r = dz_loader::merge::merge_on_device(base, delta, &op, false, &Device::Cpu).unwrap();
        assert!(r.tensors > 0);
        assert_same_files(what, &cpu, &op);
    }
}

/// `runtime.merged_gpu_models = 2` over three merged fine-tunes, the base not served (the first model
/// the host is given is then one registered as unloaded, over a placeholder): every request answers
/// with the greedy tokens of its fine-tune loaded with no cap, at most two engines are loaded, the
/// host keeps a default model, and the loads and unloads are counted.
#[test]
fn merged_engines_under_a_cap_without_the_base() {
    let f = common::llama_three();
    let merged = tempfile::tempdir().unwrap();
    let text = |cap: &str| {
        let mut t = format!(
            "[base]\npath = {}\ndtype = \"f32\"\nname = \"base\"\nserve = false\n\
             [runtime]\nmerged_dir = {}\n{cap}",
            q(&f.family.base),
            q(merged.path()),
        );
        for (i, d) in f.deltas8.iter().enumerate() {
            t.push_str(&format!(
                "[[delta]]\nname = \"m{i}\"\npath = {}\nmode = \"merge\"\n",
                q(d)
            ));
        }
        t
    };
    let names = ["m0", "m1", "m2"];
    assert_eq!(f.deltas8.len(), names.len());
    let ids: Vec<u32> = PROMPTS[1].bytes().map(u32::from).collect();
    let want: Vec<_> = {
        let (_dir, file) = write_config(&text(""));
        let (config, deltas) = Config::load(&file).unwrap();
        let served = dz_loader::serve(&config, &deltas).unwrap();
        names
            .iter()
            .map(|m| {
                served
                    .engine
                    .generate_tokens(m, &ids, MAX_TOKENS)
                    .unwrap()
                    .token_ids()
            })
            .collect()
    };
    assert!(want[0] != want[1] || want[1] != want[2], "vacuous test");

    let (_dir, file) = write_config(&text("merged_gpu_models = 2\n"));
    let (config, deltas) = Config::load(&file).unwrap();
    let served = dz_loader::serve(&config, &deltas).unwrap();
    let swap = served.engine_swap.clone().expect("an engine swap");
    let mut loaded = swap.loaded();
    loaded.sort();
    assert_eq!(loaded, ["m0", "m1"]);
    let host = served.engine.mistralrs().unwrap();
    let mut order = Vec::new();
    for round in 0..3 {
        for i in [2, 0, 1, 2] {
            let got = served
                .engine
                .generate_tokens(names[i], &ids, MAX_TOKENS)
                .unwrap()
                .token_ids();
            assert_eq!(got, want[i], "{}, round {round}", names[i]);
            assert!(swap.loaded().len() <= 2);
            order.push(names[i]);
            let default = host
                .get_default_model_id()
                .unwrap()
                .expect("a default model");
            assert!(
                swap.loaded().contains(&default),
                "default {default} not loaded"
            );
        }
    }
    let st = swap.stats();
    assert_eq!(
        (st.capacity, st.models, st.loaded, st.waiting),
        (2, 3, 2, 0)
    );
    assert!(st.loads >= 3 && st.unloads == st.loads, "{st:?}");
    assert_eq!(st.load_failures, 0);
}

/// A reload that fails (the merged model's weights are gone) fails the request waiting for it with the
/// host's reason, after the loaded engine was unloaded to make room (never two loaded under a cap of
/// one); a new request for that model within `RELOAD_RETRY_AFTER` fails at once with the same reason
/// and no second load; another model still loads and answers.
#[test]
fn a_failed_reload_fails_its_requests_at_once() {
    let f = common::llama_three();
    let merged = tempfile::tempdir().unwrap();
    let mut text = format!(
        "[base]\npath = {}\ndtype = \"f32\"\nname = \"base\"\nserve = false\n\
         [runtime]\nmerged_dir = {}\nmerged_gpu_models = 1\n",
        q(&f.family.base),
        q(merged.path()),
    );
    for (i, d) in f.deltas8.iter().enumerate() {
        text.push_str(&format!(
            "[[delta]]\nname = \"m{i}\"\npath = {}\nmode = \"merge\"\n",
            q(d)
        ));
    }
    let (_dir, file) = write_config(&text);
    let (config, deltas) = Config::load(&file).unwrap();
    let served = dz_loader::serve(&config, &deltas).unwrap();
    let swap = served.engine_swap.clone().expect("an engine swap");
    assert_eq!(swap.loaded(), ["m0"]);
    let ids: Vec<u32> = PROMPTS[1].bytes().map(u32::from).collect();
    let m0 = served
        .engine
        .generate_tokens("m0", &ids, MAX_TOKENS)
        .unwrap()
        .token_ids();

    // Every merged model's weights hidden: m0 is loaded, the others cannot be.
    let mut hidden = Vec::new();
    for dir in std::fs::read_dir(merged.path()).unwrap() {
        for entry in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "safetensors") {
                let h = p.with_extension("hidden");
                std::fs::rename(&p, &h).unwrap();
                hidden.push((p, h));
            }
        }
    }
    assert!(!hidden.is_empty());
    let err = served
        .engine
        .generate_tokens("m1", &ids, MAX_TOKENS)
        .unwrap_err()
        .to_string();
    assert!(err.contains("loading m1"), "{err}");
    let st = swap.stats();
    assert_eq!(
        (st.load_failures, st.loads, st.unloads),
        (1, 0, 1),
        "{st:?}"
    );
    assert!(swap.loaded().is_empty(), "m0 went to make room first");

    let t0 = std::time::Instant::now();
    let again = served
        .engine
        .generate_tokens("m1", &ids, MAX_TOKENS)
        .unwrap_err()
        .to_string();
    assert!(t0.elapsed() < dz_loader::engines::RELOAD_RETRY_AFTER);
    assert!(
        again.contains("loading m1 failed") && again.contains("s ago"),
        "{again}"
    );
    assert_eq!(swap.stats().load_failures, 1, "no second load");

    // Another model, its weights back: loads and answers as before.
    for (p, h) in &hidden {
        std::fs::rename(h, p).unwrap();
    }
    let got = served
        .engine
        .generate_tokens("m0", &ids, MAX_TOKENS)
        .unwrap()
        .token_ids();
    assert_eq!(got, m0);
    assert_eq!(swap.loaded(), ["m0"]);
    // m1 still within its back-off: refused without a load.
    assert!(served
        .engine
        .generate_tokens("m1", &ids, MAX_TOKENS)
        .is_err());
    assert_eq!(swap.stats().load_failures, 1);
}

/// `runtime.merged_wait_s` bounds a request's wait: under a cap of one with m0's engine held, a request
/// for m1 fails after about a second naming m0 as busy and draining; a request for m0 that arrived
/// while m0 drained is woken and gets its engine once m1's request is gone; with m0 free, m1 loads.
#[test]
fn a_request_waits_for_a_busy_engine_at_most_merged_wait_s() {
    use std::time::{Duration, Instant};

    let f = common::llama_three();
    let merged = tempfile::tempdir().unwrap();
    let mut text = format!(
        "[base]\npath = {}\ndtype = \"f32\"\nname = \"base\"\nserve = false\n\
         [runtime]\nmerged_dir = {}\nmerged_gpu_models = 1\nmerged_wait_s = 1\n",
        q(&f.family.base),
        q(merged.path()),
    );
    for (i, d) in f.deltas8[..2].iter().enumerate() {
        text.push_str(&format!(
            "[[delta]]\nname = \"m{i}\"\npath = {}\nmode = \"merge\"\n",
            q(d)
        ));
    }
    let (_dir, file) = write_config(&text);
    let (config, deltas) = Config::load(&file).unwrap();
    assert_eq!(config.runtime.merged_wait(), Some(Duration::from_secs(1)));
    let served = dz_loader::serve(&config, &deltas).unwrap();
    let swap = served.engine_swap.clone().expect("an engine swap");
    // What `deltazip serve` does with the config's limit.
    swap.set_max_wait(config.runtime.merged_wait());
    assert_eq!(swap.loaded(), ["m0"]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let held = swap.acquire("m0").await.unwrap();
        let s = swap.clone();
        let m1 = tokio::spawn(async move {
            let t0 = Instant::now();
            let r = s.acquire("m1").await.map(drop);
            (r, t0.elapsed())
        });
        // m0 drains for m1's request meanwhile: this one waits on it, without a limit of its own (only
        // the wake-up when m0 stops draining lets it through).
        tokio::time::sleep(Duration::from_millis(300)).await;
        swap.set_max_wait(None);
        let s = swap.clone();
        let m0 = tokio::spawn(async move { s.acquire("m0").await });

        let (r, waited) = m1.await.unwrap();
        let why = r
            .expect_err("m1 got an engine while m0's was held")
            .to_string();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_secs(3),
            "failed after {waited:?}: {why}"
        );
        for want in [
            "no engine for m1 after waiting 1.",
            "(runtime.merged_wait_s = 1)",
            "1 of 1 merged engines loaded",
            "m0: 1 in flight (the oldest for ",
            "busy for ",
            "draining",
        ] {
            assert!(why.contains(want), "{want:?} not in {why}");
        }
        assert!(
            swap.stats().oldest_lease_seconds >= 1.0,
            "{:?}",
            swap.stats()
        );

        // Nobody waits for m1 any more: m0 opens again and the request parked on it gets it.
        let second = tokio::time::timeout(Duration::from_secs(5), m0)
            .await
            .expect("the request parked on m0 was never woken")
            .unwrap()
            .expect("m0 once m1's request left");
        drop((held, second));
        assert_eq!(swap.stats().oldest_lease_seconds, 0.0);

        // m0 free: m1's next request unloads it and loads m1.
        let lease = swap.acquire("m1").await.unwrap();
        assert_eq!(swap.loaded(), ["m1"]);
        drop(lease);
    });
    let st = swap.stats();
    assert_eq!(
        (st.loads, st.unloads, st.load_failures),
        (1, 1, 0),
        "{st:?}"
    );
}

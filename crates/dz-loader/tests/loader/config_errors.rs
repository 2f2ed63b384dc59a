//! Every way a config can be refused at start-up, each with one message naming the file and the field.

use crate::common;

use std::path::Path;

use common::{compress8, q, write_config};
use dz_compress::fixtures::{self, TinySpec};
use dz_loader::Config;

fn load_err(text: &str) -> (String, String) {
    let (dir, file) = write_config(text);
    let e = match Config::load(&file) {
        Ok(_) => panic!("config accepted:\n{text}"),
        Err(e) => e.to_string(),
    };
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    drop(dir);
    (e, file.display().to_string())
}

fn one_delta(base: &Path, delta: &Path) -> String {
    format!(
        "[base]\npath = {}\n[[delta]]\nname = \"a\"\npath = {}\nmode = \"merge\"\n",
        q(base),
        q(delta)
    )
}

#[test]
fn a_good_config_loads_and_opens_its_deltas() {
    let f = common::llama();
    let (_dir, file) = write_config(&one_delta(&f.family.base, &f.deltas8[0]));
    let (config, deltas) = Config::load(&file).unwrap();
    assert_eq!(deltas.len(), 1);
    assert_eq!(deltas[0].spec.name, "a");
    assert_eq!(config.base_name(), "base");
}

#[test]
fn unknown_key() {
    let f = common::llama();
    let text = format!(
        "[base]\npath = {}\n[[delta]]\nname = \"a\"\npath = {}\nbits = 4\n",
        q(&f.family.base),
        q(&f.deltas8[0])
    );
    let (e, file) = load_err(&text);
    assert!(
        e.starts_with(&format!("{file}:6:1: [[delta]] #1: unknown field `bits`")),
        "{e}"
    );
}

#[test]
fn missing_base_directory() {
    let f = common::llama();
    let (e, file) = load_err(&one_delta(&f.root.join("nope"), &f.deltas8[0]));
    assert!(e.starts_with(&format!("{file}: base.path: ")), "{e}");
    assert!(e.contains("no such directory"), "{e}");
}

#[test]
fn base_without_tokenizer() {
    let f = common::llama();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        f.family.base.join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let (e, _) = load_err(&one_delta(dir.path(), &f.deltas8[0]));
    assert!(
        e.contains("base.path: ") && e.contains("no tokenizer.json"),
        "{e}"
    );
}

#[test]
fn missing_delta_file() {
    let f = common::llama();
    let (e, file) = load_err(&one_delta(&f.family.base, &f.root.join("missing.dz")));
    assert!(e.starts_with(&format!("{file}: delta[0].path: ")), "{e}");
    assert!(e.contains("missing.dz: no such file"), "{e}");
}

#[test]
fn duplicate_names() {
    let f = common::llama();
    let text = format!(
        "[base]\npath = {b}\n[[delta]]\nname = \"a\"\npath = {d}\n[[delta]]\nname = \"b\"\npath = {d}\n\
         [[delta]]\nname = \"a\"\npath = {d}\n",
        b = q(&f.family.base),
        d = q(&f.deltas8[0])
    );
    let (e, file) = load_err(&text);
    assert_eq!(
        e,
        format!("{file}: delta[2].name: duplicate name \"a\" (also delta[0].name)")
    );
    // A delta may not take the base's name either.
    let text = format!(
        "[base]\npath = {b}\nname = \"m\"\n[[delta]]\nname = \"m\"\npath = {d}\n",
        b = q(&f.family.base),
        d = q(&f.deltas8[0])
    );
    let (e, _) = load_err(&text);
    assert!(
        e.contains("delta[0].name: duplicate name \"m\" (also base.name)"),
        "{e}"
    );
}

#[test]
fn not_a_delta_file() {
    let f = common::llama();
    let bogus = f.root.join("calib.txt");
    let (e, file) = load_err(&one_delta(&f.family.base, &bogus));
    assert!(e.starts_with(&format!("{file}: delta[0].path: ")), "{e}");
}

#[test]
fn delta_for_another_base() {
    // Same architecture, other weights: only the fingerprint tells them apart.
    let f = common::llama();
    let other_root = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        seed: 0xbad,
        ..TinySpec::llama()
    };
    let other = fixtures::write_family(other_root.path(), &spec, 1).unwrap();
    let delta = other_root.path().join("other.dz");
    compress8(&other.base, &other.finetunes[0], &delta, "other");
    let (e, file) = load_err(&one_delta(&f.family.base, &delta));
    assert!(e.starts_with(&format!("{file}: delta[0].path: ")), "{e}");
    assert!(e.contains("the delta was made for another base"), "{e}");
}

#[test]
fn delta_for_another_architecture() {
    let f = common::llama();
    let q2 = common::qwen2();
    let (e, file) = load_err(&one_delta(&f.family.base, &q2.deltas8[0]));
    assert!(e.starts_with(&format!("{file}: delta[0].path: ")), "{e}");
    assert!(
        e.contains("another architecture than the base (model_type: base llama, delta qwen2)"),
        "{e}"
    );
}

fn one_swap(base: &Path, delta: &Path, runtime: &str) -> String {
    format!(
        "[base]\npath = {}\n[[delta]]\nname = \"a\"\npath = {}\nmode = \"swap\"\n[runtime]\n{runtime}",
        q(base),
        q(delta)
    )
}

#[test]
fn swap_gpu_models_zero() {
    let f = common::llama();
    let (e, file) = load_err(&one_swap(
        &f.family.base,
        &f.deltas8[0],
        "swap_gpu_models = 0\n",
    ));
    assert!(
        e.starts_with(&format!(
            "{file}: runtime.swap_gpu_models: must be at least 1"
        )),
        "{e}"
    );
    // The default is accepted.
    let (_dir, ok) = write_config(&one_swap(&f.family.base, &f.deltas8[0], ""));
    let (config, deltas) = Config::load(&ok).unwrap();
    assert_eq!(config.runtime.swap_gpu_models, 2);
    assert_eq!(deltas[0].spec.mode, dz_loader::Mode::Swap);
}

#[test]
fn swap_delta_for_another_base() {
    // Swap mode decodes full weights from the delta, so it gets the same checks as the other modes.
    let f = common::llama();
    let other_root = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        seed: 0xbad,
        ..TinySpec::llama()
    };
    let other = fixtures::write_family(other_root.path(), &spec, 1).unwrap();
    let delta = other_root.path().join("other.dz");
    compress8(&other.base, &other.finetunes[0], &delta, "other");
    let (e, file) = load_err(&one_swap(&f.family.base, &delta, ""));
    assert!(e.starts_with(&format!("{file}: delta[0].path: ")), "{e}");
    assert!(e.contains("the delta was made for another base"), "{e}");
    let q2 = common::qwen2();
    let (e, _) = load_err(&one_swap(&f.family.base, &q2.deltas8[0], ""));
    assert!(e.contains("another architecture than the base"), "{e}");
}

#[test]
fn swap_is_single_gpu() {
    let f = common::llama();
    let (e, file) = load_err(&one_swap(
        &f.family.base,
        &f.deltas8[0],
        "device = \"cuda\"\ntensor_parallel = 2\n",
    ));
    assert!(
        e.starts_with(&format!(
            "{file}: delta[0].mode: mode = \"swap\" is single-GPU"
        )),
        "{e}"
    );
}

fn one_merge(base: &Path, delta: &Path, runtime: &str) -> String {
    format!(
        "[base]\npath = {}\n[[delta]]\nname = \"a\"\npath = {}\nmode = \"merge\"\n[runtime]\n{runtime}",
        q(base),
        q(delta)
    )
}

#[test]
fn merged_gpu_models() {
    let f = common::llama();
    let (e, file) = load_err(&one_merge(
        &f.family.base,
        &f.deltas8[0],
        "merged_gpu_models = 0\n",
    ));
    assert!(
        e.starts_with(&format!(
            "{file}: runtime.merged_gpu_models: must be at least 1"
        )),
        "{e}"
    );
    let (e, file) = load_err(&one_merge(
        &f.family.base,
        &f.deltas8[0],
        "merged_gpu_models = -1\n",
    ));
    // Serde names the table and the line and column of the value.
    assert!(
        e.starts_with(&format!(
            "{file}:8:21: [runtime]: invalid value: integer `-1`"
        )),
        "{e}"
    );
    let (e, file) = load_err(&one_merge(
        &f.family.base,
        &f.deltas8[0],
        "device = \"cuda\"\ntensor_parallel = 2\nmerged_gpu_models = 1\n",
    ));
    assert!(
        e.starts_with(&format!(
            "{file}: runtime.merged_gpu_models: unloading and reloading merged engines is single-GPU"
        )),
        "{e}"
    );
    // No cap by default; a cap is accepted.
    let (_dir, ok) = write_config(&one_merge(&f.family.base, &f.deltas8[0], ""));
    let (config, _) = Config::load(&ok).unwrap();
    assert_eq!(config.runtime.merged_gpu_models, None);
    let (_dir, ok) = write_config(&one_merge(
        &f.family.base,
        &f.deltas8[0],
        "merged_gpu_models = 3\n",
    ));
    let (config, _) = Config::load(&ok).unwrap();
    assert_eq!(config.runtime.merged_gpu_models, Some(3));
}

#[test]
fn merged_wait_s() {
    let f = common::llama();
    let with = |runtime: &str| one_merge(&f.family.base, &f.deltas8[0], runtime);
    let (e, file) = load_err(&with("merged_gpu_models = 2\nmerged_wait_s = -1\n"));
    assert!(
        e.starts_with(&format!(
            "{file}:9:17: [runtime]: invalid value: integer `-1`"
        )),
        "{e}"
    );
    let (e, _) = load_err(&with("merged_wait_s = 1.5\n"));
    assert!(e.contains("invalid type: floating point `1.5`"), "{e}");
    let (e, file) = load_err(&with("merged_wait_s = 100000\n"));
    assert!(
        e.starts_with(&format!(
            "{file}: runtime.merged_wait_s: 100000 seconds: at most 86400 (a day); 0 waits without limit"
        )),
        "{e}"
    );
    // Two minutes by default; 0 waits without limit.
    let wait = |runtime: &str| {
        let (_dir, ok) = write_config(&with(runtime));
        Config::load(&ok).unwrap().0.runtime.merged_wait()
    };
    assert_eq!(wait(""), Some(std::time::Duration::from_secs(120)));
    assert_eq!(wait("merged_wait_s = 0\n"), None);
    assert_eq!(
        wait("merged_wait_s = 86400\n"),
        Some(std::time::Duration::from_secs(86_400))
    );
}

#[test]
fn runtime_kv_cache_and_load_threads() {
    let f = common::llama();
    let with = |runtime: &str| {
        format!(
            "{}[runtime]\n{runtime}",
            one_delta(&f.family.base, &f.deltas8[0])
        )
    };
    // PagedAttention is CUDA-only in the host.
    let (e, file) = load_err(&with("kv_cache = \"paged\"\n"));
    assert!(
        e.starts_with(&format!(
            "{file}: runtime.kv_cache: \"paged\" needs device = \"cuda\""
        )),
        "{e}"
    );
    let (e, _) = load_err(&with("kv_cache = \"big\"\n"));
    assert!(e.contains("unknown variant `big`"), "{e}");
    let (e, file) = load_err(&with("kv_cache_bytes = 0\n"));
    assert!(
        e.starts_with(&format!(
            "{file}: runtime.kv_cache_bytes: must be more than 0"
        )),
        "{e}"
    );
    let (e, file) = load_err(&with("load_threads = 0\n"));
    assert!(
        e.starts_with(&format!("{file}: runtime.load_threads: must be at least 1")),
        "{e}"
    );
    // auto on the CPU is the contiguous cache; the size parses as the other byte settings do.
    let (_dir, ok) = write_config(&with("kv_cache_bytes = \"16GiB\"\n"));
    let (config, _) = Config::load(&ok).unwrap();
    assert_eq!(config.runtime.kv_cache, dz_loader::KvCacheSpec::Auto);
    assert_eq!(config.runtime.kv_cache_bytes, Some(16 << 30));
    assert_eq!(config.kv_cache(), dz_loader::KvCache::Contiguous);
    assert_eq!(config.runtime.load_threads, 4);
    let (_dir, ok) = write_config(&with("kv_cache = \"contiguous\"\n"));
    assert_eq!(
        Config::load(&ok).unwrap().0.kv_cache(),
        dz_loader::KvCache::Contiguous
    );
}

//! HF-style model directories, the tiny fixture families and the calibration data: round trips (f32, bf16,
//! sharded, mixed dtypes), fingerprints, the fine-tunes' untouched embedding rows, the fixture tokenizer,
//! and one negative test per way a directory or a text can be unusable.

use std::path::Path;

use dz_compress::arch::Family;
use dz_compress::calib_data::{
    default_calib_text, load_token_samples, load_tokenizer, token_samples, tokenize_file,
};
use dz_compress::fixtures::{
    self, finetune_seed, tokenizer_json, write_family, TinySpec, DEFAULT_FT_STRENGTH, EOS_TOKEN,
};
use dz_compress::hf::{
    decode_f32, encode_f32, round_to, write_model, HfModel, OwnedTensor, INDEX_FILE, SINGLE_FILE,
};
use dz_compress::Error;
use dz_format::Dtype;
use serde_json::Value;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// A one-layer Llama spec: the smallest model that still has every tensor kind.
fn small_llama() -> TinySpec {
    TinySpec {
        layers: 1,
        ..TinySpec::llama()
    }
}

fn owned(spec: &TinySpec, dtype_of: impl Fn(&str) -> Dtype) -> Vec<OwnedTensor> {
    spec.generate_base()
        .into_iter()
        .map(|(n, s, v)| {
            let d = dtype_of(&n);
            let b = encode_f32(&v, d);
            (n, d, s, b)
        })
        .collect()
}

/// A safetensors file from a literal header and data section.
fn st_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn write_config(dir: &Path, spec: &TinySpec) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&spec.config_json()).unwrap(),
    )
    .unwrap();
}

fn invalid_model_msg(e: Error) -> String {
    match e {
        Error::InvalidModel(m) => m,
        other => panic!("expected InvalidModel, got {other:?}"),
    }
}

fn assert_model_equals(m: &HfModel, expected: &[OwnedTensor]) {
    let mut names: Vec<&str> = expected.iter().map(|t| t.0.as_str()).collect();
    names.sort();
    assert_eq!(m.names().collect::<Vec<_>>(), names);
    for (n, d, s, b) in expected {
        let info = m.info(n).unwrap();
        assert_eq!((info.dtype, &info.shape), (*d, s), "{n}");
        assert_eq!(m.raw(n).unwrap(), b.as_slice(), "{n}");
        assert_eq!(m.to_f32(n).unwrap(), decode_f32(b, *d), "{n}");
    }
}

#[test]
fn llama_f32_family_round_trips() {
    let root = tmp();
    let spec = TinySpec::llama();
    let fam = write_family(root.path(), &spec, 2).unwrap();
    assert_eq!(fam.finetunes.len(), 2);
    let base = HfModel::open(&fam.base).unwrap();
    base.check_matches_arch().unwrap();
    assert_eq!(base.arch().family, Family::Llama);
    assert_eq!(base.config_json()["model_type"], "llama");
    assert_eq!(base.tokenizer_path(), Some(fam.base.join("tokenizer.json")));
    assert_eq!(base.shard_paths().count(), 1);
    let expected = owned(&spec, |_| Dtype::F32);
    assert_model_equals(&base, &expected);
    assert!(base.info("lm_head.weight").is_some());

    // Fine-tune 0 is exactly what `finetune` computes from the stored base.
    let ft = HfModel::open(&fam.finetunes[0]).unwrap();
    ft.check_matches_arch().unwrap();
    let ft_expected = spec.finetune(&spec.generate_base(), finetune_seed(0), DEFAULT_FT_STRENGTH);
    for (n, _, v) in &ft_expected {
        assert_eq!(&ft.to_f32(n).unwrap(), v, "{n}");
    }

    // Fingerprints: stable across opens, different between base and fine-tune and between fine-tunes.
    let fp = base.fingerprint().unwrap();
    assert!(fp.is_consistent());
    assert_eq!(fp, HfModel::open(&fam.base).unwrap().fingerprint().unwrap());
    assert_eq!(fp.tensors.len(), base.len());
    let fp_ft = ft.fingerprint().unwrap();
    assert_ne!(fp.combined, fp_ft.combined);
    let fp_ft1 = HfModel::open(&fam.finetunes[1])
        .unwrap()
        .fingerprint()
        .unwrap();
    assert_ne!(fp_ft.combined, fp_ft1.combined);
    fp.check_base(&fp).unwrap();
    assert!(fp.check_base(&fp_ft).is_err());

    // The calibration text is there and sized as documented.
    let text = std::fs::read_to_string(&fam.calib_text).unwrap();
    assert!(
        text.len() > 4096 && text.len() <= fixtures::FAMILY_CALIB_BYTES,
        "{}",
        text.len()
    );
    // No temporary directories are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Rows of the embedding that the fine-tune left alone are bit-identical; about 30% moved.
fn check_embedding_rows(base: &HfModel, ft: &HfModel, hidden: usize) -> (usize, usize) {
    let name = "model.embed_tokens.weight";
    let d = base.info(name).unwrap().dtype;
    let row_bytes = hidden * d.size();
    let (b, f) = (base.raw(name).unwrap(), ft.raw(name).unwrap());
    assert_eq!(b.len(), f.len());
    let rows = b.len() / row_bytes;
    let same = b
        .chunks(row_bytes)
        .zip(f.chunks(row_bytes))
        .filter(|(x, y)| x == y)
        .count();
    (same, rows)
}

#[test]
fn qwen2_bf16_family_round_trips_and_keeps_untouched_rows() {
    let root = tmp();
    let spec = TinySpec {
        dtype: Dtype::Bf16,
        ..TinySpec::qwen2()
    };
    let fam = write_family(root.path(), &spec, 1).unwrap();
    let base = HfModel::open(&fam.base).unwrap();
    base.check_matches_arch().unwrap();
    assert_eq!(base.arch().family, Family::Qwen2);
    assert!(base.arch().tie_word_embeddings);
    assert!(base.info("lm_head.weight").is_none());
    assert!(base.info("model.layers.0.self_attn.q_proj.bias").is_some());
    assert_eq!(base.config_json()["torch_dtype"], "bfloat16");
    let expected = owned(&spec, |_| Dtype::Bf16);
    assert_model_equals(&base, &expected);
    for (n, _, v) in spec.generate_base() {
        assert_eq!(base.to_f32(&n).unwrap(), round_to(&v, Dtype::Bf16), "{n}");
    }

    let ft = HfModel::open(&fam.finetunes[0]).unwrap();
    let (same, rows) = check_embedding_rows(&base, &ft, spec.hidden);
    let moved = rows - same;
    assert!(same > 0 && moved > 0);
    let frac = moved as f64 / rows as f64;
    assert!((0.2..0.4).contains(&frac), "{moved}/{rows} rows moved");
    // Every linear weight moved (bf16 keeps a 5% delta visible).
    for n in base.names() {
        if n.ends_with("_proj.weight") {
            assert_ne!(base.raw(n).unwrap(), ft.raw(n).unwrap(), "{n}");
        }
    }
    assert_ne!(
        base.fingerprint().unwrap().combined,
        ft.fingerprint().unwrap().combined
    );
}

#[test]
fn llama_f32_untouched_embedding_rows_are_bit_identical() {
    let root = tmp();
    let spec = TinySpec::llama();
    let fam = write_family(root.path(), &spec, 1).unwrap();
    let base = HfModel::open(&fam.base).unwrap();
    let ft = HfModel::open(&fam.finetunes[0]).unwrap();
    let (same, rows) = check_embedding_rows(&base, &ft, spec.hidden);
    assert!(same > rows / 2 && same < rows, "{same}/{rows}");
    // lm_head (untied) changes in every row.
    let row_bytes = spec.hidden * 4;
    let (b, f) = (
        base.raw("lm_head.weight").unwrap(),
        ft.raw("lm_head.weight").unwrap(),
    );
    assert!(b
        .chunks(row_bytes)
        .zip(f.chunks(row_bytes))
        .all(|(x, y)| x != y));
}

#[test]
fn sharded_write_round_trips() {
    let root = tmp();
    let spec = TinySpec {
        dtype: Dtype::F16,
        ..small_llama()
    };
    let tensors = owned(&spec, |_| Dtype::F16);
    let total: usize = tensors.iter().map(|t| t.3.len()).sum();
    let dir = root.path().join("sharded");
    let extra: [(&str, &[u8]); 2] = [
        ("tokenizer.json", b"{}"),
        ("generation_config.json", b"{\"do_sample\": false}"),
    ];
    write_model(
        &dir,
        &spec.config_json(),
        tensors.clone(),
        16 * 1024,
        &extra,
        false,
    )
    .unwrap();
    assert!(!dir.join(SINGLE_FILE).exists());
    let idx: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(idx["metadata"]["total_size"], total as u64);
    let wm = idx["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), tensors.len());
    let mut shards: Vec<&str> = wm.values().map(|v| v.as_str().unwrap()).collect();
    shards.sort();
    shards.dedup();
    let n = shards.len();
    assert!(n >= 3, "{n} shards");
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(*s, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        // A shard's tensors fit the limit, unless it holds one tensor that alone is larger.
        let in_shard: Vec<&OwnedTensor> = tensors
            .iter()
            .filter(|t| wm[&t.0].as_str() == Some(*s))
            .collect();
        let bytes: usize = in_shard.iter().map(|t| t.3.len()).sum();
        assert!(in_shard.len() == 1 || bytes <= 16 * 1024, "{s}: {bytes}");
    }
    assert_eq!(
        std::fs::read(dir.join("generation_config.json")).unwrap(),
        b"{\"do_sample\": false}"
    );
    let m = HfModel::open(&dir).unwrap();
    assert_eq!(m.shard_paths().count(), n);
    m.check_matches_arch().unwrap();
    assert_model_equals(&m, &tensors);

    // Without the index, every *.safetensors in the directory is read (sorted): same model.
    std::fs::remove_file(dir.join(INDEX_FILE)).unwrap();
    let m2 = HfModel::open(&dir).unwrap();
    assert_model_equals(&m2, &tensors);
    assert_eq!(m.fingerprint().unwrap(), m2.fingerprint().unwrap());
}

#[test]
fn mixed_bf16_f32_model_is_allowed() {
    let root = tmp();
    let spec = small_llama();
    let pick = |n: &str| {
        if n.ends_with("norm.weight") {
            Dtype::F32
        } else {
            Dtype::Bf16
        }
    };
    let tensors = owned(&spec, pick);
    let dir = root.path().join("mixed");
    write_model(
        &dir,
        &spec.config_json(),
        tensors.clone(),
        u64::MAX,
        &[],
        false,
    )
    .unwrap();
    let m = HfModel::open(&dir).unwrap();
    m.check_matches_arch().unwrap();
    assert_model_equals(&m, &tensors);
    assert_eq!(m.info("model.norm.weight").unwrap().dtype, Dtype::F32);
    assert_eq!(
        m.info("model.layers.0.mlp.up_proj.weight").unwrap().dtype,
        Dtype::Bf16
    );
}

#[test]
fn write_refuses_non_empty_dir_unless_overwrite() {
    let root = tmp();
    let spec = small_llama();
    let dir = root.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    // An existing empty directory is fine.
    write_model(
        &dir,
        &spec.config_json(),
        owned(&spec, |_| Dtype::F32),
        u64::MAX,
        &[],
        false,
    )
    .unwrap();
    let e = write_model(
        &dir,
        &spec.config_json(),
        owned(&spec, |_| Dtype::F32),
        u64::MAX,
        &[],
        false,
    )
    .unwrap_err();
    let msg = invalid_model_msg(e);
    assert!(msg.contains("not empty") && msg.contains("/m"), "{msg}");
    let spec2 = TinySpec { seed: 99, ..spec };
    let t2 = owned(&spec2, |_| Dtype::Bf16);
    write_model(&dir, &spec2.config_json(), t2.clone(), u64::MAX, &[], true).unwrap();
    assert_model_equals(&HfModel::open(&dir).unwrap(), &t2);
    let names: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["m".to_string()]);
}

#[test]
fn write_refuses_bad_tensors_and_extra_files() {
    let root = tmp();
    let spec = small_llama();
    let cfg = spec.config_json();
    let bad_len = vec![("a".to_string(), Dtype::F32, vec![2, 3], vec![0u8; 20])];
    let msg = invalid_model_msg(
        write_model(&root.path().join("x"), &cfg, bad_len, u64::MAX, &[], false).unwrap_err(),
    );
    assert!(msg.contains("\"a\"") && msg.contains("needs 24"), "{msg}");
    let twice = vec![
        ("a".to_string(), Dtype::F32, vec![1], vec![0u8; 4]),
        ("a".to_string(), Dtype::F32, vec![1], vec![0u8; 4]),
    ];
    let msg = invalid_model_msg(
        write_model(&root.path().join("x"), &cfg, twice, u64::MAX, &[], false).unwrap_err(),
    );
    assert!(msg.contains("twice"), "{msg}");
    for name in ["../evil", "config.json", "model.safetensors", ""] {
        let extra: [(&str, &[u8]); 1] = [(name, b"x")];
        let e = write_model(
            &root.path().join("x"),
            &cfg,
            Vec::new(),
            u64::MAX,
            &extra,
            false,
        );
        assert!(e.is_err(), "{name:?}");
    }
    assert!(!root.path().join("x").exists());
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

#[test]
fn fixture_tokenizer_loads_round_trips_and_windows_have_the_right_shape() {
    let root = tmp();
    let spec = TinySpec::llama();
    let fam = write_family(root.path(), &spec, 0).unwrap();
    let tok_path = HfModel::open(&fam.base).unwrap().tokenizer_path().unwrap();
    let tok = load_tokenizer(&tok_path).unwrap();
    assert_eq!(tok.get_vocab_size(true), spec.vocab);
    assert_eq!(tok.token_to_id(EOS_TOKEN), Some(spec.vocab as u32 - 1));
    for text in [
        "In the beginning God created the heaven and the earth.\n",
        "def f(x):\n    return {'a': x ** 2}  # über naïve 日本 🙂\r\n\t",
        &default_calib_text()[..20_000],
    ] {
        let enc = tok.encode(text, false).unwrap();
        let ids = enc.get_ids();
        assert!(ids.iter().all(|&i| (i as usize) < spec.vocab));
        assert_eq!(tok.decode(ids, false).unwrap(), text);
    }
    // The merges compress English: fewer tokens than bytes.
    let text = std::fs::read_to_string(&fam.calib_text).unwrap();
    let all = tokenize_file(&tok_path, &fam.calib_text).unwrap();
    assert!(
        all.len() < text.len() * 4 / 5,
        "{} tokens for {} bytes",
        all.len(),
        text.len()
    );

    let w = load_token_samples(&tok_path, &fam.calib_text, 8, 64).unwrap();
    assert_eq!(w.len(), 8);
    assert!(w.iter().all(|x| x.len() == 64));
    assert_eq!(w[0], all[..64]);
    // More than fit: as many as fit.
    let fit = all.len() / 1024;
    let w = load_token_samples(&tok_path, &fam.calib_text, fit + 5, 1024).unwrap();
    assert_eq!(w.len(), fit);
    // The embedded default text through the same tokenizer.
    let w = token_samples(&tok, default_calib_text(), 16, 128).unwrap();
    assert_eq!((w.len(), w[15].len()), (16, 128));
    // A larger vocabulary also loads and round-trips.
    let big = root.path().join("tok-1000.json");
    std::fs::write(&big, tokenizer_json(1000)).unwrap();
    let tok = load_tokenizer(&big).unwrap();
    assert_eq!(tok.get_vocab_size(true), 1000);
    let ids = tok
        .encode("And God said, Let there be light", false)
        .unwrap();
    assert_eq!(
        tok.decode(ids.get_ids(), false).unwrap(),
        "And God said, Let there be light"
    );
}

#[test]
fn text_too_short_for_one_window_is_a_calibration_error() {
    let root = tmp();
    let p = root.path().join("tokenizer.json");
    std::fs::write(&p, tokenizer_json(300)).unwrap();
    let text = root.path().join("short.txt");
    std::fs::write(&text, "Jesus wept.").unwrap();
    let e = load_token_samples(&p, &text, 4, 512).unwrap_err();
    let Error::Calibration(msg) = e else {
        panic!("expected Calibration, got {e:?}")
    };
    assert!(msg.contains("short.txt") && msg.contains("512"), "{msg}");
    // Not UTF-8, not a tokenizer, a missing file.
    std::fs::write(&text, [0xff, 0xfe, 0x00]).unwrap();
    assert!(matches!(
        load_token_samples(&p, &text, 1, 1),
        Err(Error::Calibration(_))
    ));
    std::fs::write(&p, "{\"model\": 3}").unwrap();
    assert!(matches!(load_tokenizer(&p), Err(Error::Calibration(_))));
    assert!(matches!(
        load_tokenizer(&root.path().join("nope.json")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn write_family_refuses_bad_specs() {
    let root = tmp();
    let e = write_family(
        root.path(),
        &TinySpec {
            vocab: 100,
            ..TinySpec::llama()
        },
        0,
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)), "{e:?}");
    let e = write_family(
        root.path(),
        &TinySpec {
            kv_heads: 3,
            ..TinySpec::llama()
        },
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("multiple"), "{e}");
}

// ---- Negative tests: every way a model directory can be unusable. ----

#[test]
fn missing_config_json_is_an_io_error_naming_it() {
    let root = tmp();
    match HfModel::open(root.path()).unwrap_err() {
        Error::Io { path, source } => {
            assert!(path.ends_with("config.json"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_config_json_is_named() {
    let root = tmp();
    std::fs::write(root.path().join("config.json"), "{ not json").unwrap();
    let msg = invalid_model_msg(HfModel::open(root.path()).unwrap_err());
    assert!(msg.contains("config.json"), "{msg}");
    std::fs::write(
        root.path().join("config.json"),
        "{\"model_type\": \"gpt2\", \"hidden_size\": 8}",
    )
    .unwrap();
    let msg = invalid_model_msg(HfModel::open(root.path()).unwrap_err());
    assert!(msg.contains("config.json"), "{msg}");
    let mut cfg = small_llama().config_json();
    cfg["model_type"] = "gpt_neox".into();
    std::fs::write(root.path().join("config.json"), cfg.to_string()).unwrap();
    let msg = invalid_model_msg(HfModel::open(root.path()).unwrap_err());
    assert!(msg.contains("gpt_neox"), "{msg}");
}

#[test]
fn no_weights_is_named() {
    let root = tmp();
    write_config(root.path(), &small_llama());
    let msg = invalid_model_msg(HfModel::open(root.path()).unwrap_err());
    assert!(msg.contains("safetensors"), "{msg}");
}

#[test]
fn truncated_or_garbage_shards_are_named() {
    let root = tmp();
    let spec = small_llama();
    let dir = root.path().join("m");
    write_model(
        &dir,
        &spec.config_json(),
        owned(&spec, |_| Dtype::F32),
        u64::MAX,
        &[],
        false,
    )
    .unwrap();
    let file = dir.join(SINGLE_FILE);
    let bytes = std::fs::read(&file).unwrap();
    // Cut at several points: inside the length, the header, the data.
    for cut in [0, 5, 8, 40, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&file, &bytes[..cut]).unwrap();
        let msg = invalid_model_msg(HfModel::open(&dir).unwrap_err());
        assert!(msg.contains("model.safetensors"), "cut {cut}: {msg}");
    }
    // Seeded garbage, and a header length far beyond the file.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..20 {
        let n = rng.gen_range(0..200);
        let g: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        std::fs::write(&file, &g).unwrap();
        assert!(matches!(HfModel::open(&dir), Err(Error::InvalidModel(_))));
    }
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    std::fs::write(&file, huge).unwrap();
    assert!(matches!(HfModel::open(&dir), Err(Error::InvalidModel(_))));
    // Offsets that do not match the shape.
    std::fs::write(
        &file,
        st_bytes(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
    )
    .unwrap();
    assert!(matches!(HfModel::open(&dir), Err(Error::InvalidModel(_))));
}

#[test]
fn unsupported_dtype_is_named_with_its_tensor() {
    let root = tmp();
    write_config(root.path(), &small_llama());
    std::fs::write(
        root.path().join(SINGLE_FILE),
        st_bytes(
            r#"{"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"position_ids":{"dtype":"I32","shape":[2],"data_offsets":[8,16]}}"#,
            &[0; 16],
        ),
    )
    .unwrap();
    let msg = invalid_model_msg(HfModel::open(root.path()).unwrap_err());
    assert!(
        msg.contains("position_ids") && msg.contains("I32") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

/// Writes a two-shard model by hand: shard 1 holds `a`, shard 2 holds `b` (and whatever `extra_b` adds).
fn two_shards(dir: &Path, extra_b: bool) {
    write_config(dir, &small_llama());
    std::fs::write(
        dir.join("model-00001-of-00002.safetensors"),
        st_bytes(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &[0, 0, 128, 63],
        ),
    )
    .unwrap();
    let b = if extra_b {
        st_bytes(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]}}"#,
            &[0, 0, 128, 63, 128, 63, 0, 64],
        )
    } else {
        st_bytes(
            r#"{"b":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#,
            &[128, 63, 0, 64],
        )
    };
    std::fs::write(dir.join("model-00002-of-00002.safetensors"), b).unwrap();
}

fn write_index(dir: &Path, map: &[(&str, &str)]) {
    let wm: serde_json::Map<String, Value> = map
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect();
    std::fs::write(
        dir.join(INDEX_FILE),
        serde_json::json!({"metadata": {}, "weight_map": wm}).to_string(),
    )
    .unwrap();
}

#[test]
fn index_errors_are_named() {
    let root = tmp();
    let dir = root.path();
    two_shards(dir, false);
    let s1 = "model-00001-of-00002.safetensors";
    let s2 = "model-00002-of-00002.safetensors";
    // A consistent index opens, and values decode.
    write_index(dir, &[("a", s1), ("b", s2)]);
    let m = HfModel::open(dir).unwrap();
    assert_eq!(m.to_f32("a").unwrap(), vec![1.0]);
    assert_eq!(m.to_f32("b").unwrap(), vec![1.0, 2.0]);
    assert_eq!(m.info("b").unwrap().dtype, Dtype::Bf16);
    let msg = invalid_model_msg(m.raw("c").unwrap_err());
    assert!(msg.contains("\"c\""), "{msg}");
    // The weights do not match the (Llama) config: listed by name.
    let msg = invalid_model_msg(m.check_matches_arch().unwrap_err());
    assert!(
        msg.contains("missing tensor(s): \"model.embed_tokens.weight\"")
            && msg.contains("2 unexpected tensor(s): \"a\", \"b\""),
        "{msg}"
    );

    // A missing shard.
    write_index(dir, &[("a", s1), ("b", "model-00003-of-00003.safetensors")]);
    let msg = invalid_model_msg(HfModel::open(dir).unwrap_err());
    assert!(
        msg.contains(INDEX_FILE) && msg.contains("model-00003-of-00003.safetensors"),
        "{msg}"
    );
    // A path outside the directory.
    write_index(dir, &[("a", s1), ("b", "../model.safetensors")]);
    let msg = invalid_model_msg(HfModel::open(dir).unwrap_err());
    assert!(msg.contains("../model.safetensors"), "{msg}");
    // A tensor its shard lacks.
    write_index(dir, &[("a", s1), ("b", s2), ("c", s2)]);
    let msg = invalid_model_msg(HfModel::open(dir).unwrap_err());
    assert!(msg.contains("\"c\"") && msg.contains(s2), "{msg}");
    // Tensors put in the wrong shards.
    write_index(dir, &[("a", s2), ("b", s1)]);
    let msg = invalid_model_msg(HfModel::open(dir).unwrap_err());
    assert!(
        msg.contains("tensor \"a\" in \"model-00002-of-00002.safetensors\", but it is in")
            && msg.contains(s1),
        "{msg}"
    );
    // Only the shards the index names are read: a shard it leaves out is ignored, as transformers does.
    write_index(dir, &[("a", s1)]);
    assert_eq!(
        HfModel::open(dir).unwrap().names().collect::<Vec<_>>(),
        ["a"]
    );
    // A tensor of a listed shard that the index forgets.
    two_shards(dir, true);
    write_index(dir, &[("b", s2)]);
    let msg = invalid_model_msg(HfModel::open(dir).unwrap_err());
    assert!(
        msg.contains(s2) && msg.contains("\"a\" is missing from") && msg.contains("weight_map"),
        "{msg}"
    );
    // Not JSON.
    std::fs::write(dir.join(INDEX_FILE), "[1, 2").unwrap();
    let msg = invalid_model_msg(HfModel::open(dir).unwrap_err());
    assert!(msg.contains(INDEX_FILE), "{msg}");
}

#[test]
fn tensor_in_two_shards_is_named() {
    let root = tmp();
    two_shards(root.path(), true);
    // Without an index, both shards are read.
    let msg = invalid_model_msg(HfModel::open(root.path()).unwrap_err());
    assert!(
        msg.contains("\"a\"")
            && msg.contains("model-00001-of-00002.safetensors")
            && msg.contains("model-00002-of-00002.safetensors"),
        "{msg}"
    );
}

#[test]
fn check_matches_arch_reports_shapes_extras_and_ignores_inv_freq() {
    let root = tmp();
    let spec = small_llama();
    let mut tensors = owned(&spec, |_| Dtype::F32);
    tensors.push((
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        Dtype::F32,
        vec![8],
        encode_f32(&[1.0; 8], Dtype::F32),
    ));
    let dir = root.path().join("ok");
    write_model(
        &dir,
        &spec.config_json(),
        tensors.clone(),
        u64::MAX,
        &[],
        false,
    )
    .unwrap();
    HfModel::open(&dir).unwrap().check_matches_arch().unwrap();

    // Wrong shape, extra tensor, missing tensor.
    let mut bad = tensors.clone();
    let i = bad.iter().position(|t| t.0 == "model.norm.weight").unwrap();
    bad[i] = (
        "model.norm.weight".into(),
        Dtype::F32,
        vec![32],
        vec![0; 128],
    );
    bad.retain(|t| t.0 != "model.layers.0.mlp.down_proj.weight");
    bad.push((
        "model.layers.0.mlp.extra.weight".into(),
        Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    let dir = root.path().join("bad");
    write_model(&dir, &spec.config_json(), bad, u64::MAX, &[], false).unwrap();
    let msg = invalid_model_msg(
        HfModel::open(&dir)
            .unwrap()
            .check_matches_arch()
            .unwrap_err(),
    );
    assert!(
        msg.contains("1 wrong shape(s): \"model.norm.weight\" is [32], config.json implies [64]"),
        "{msg}"
    );
    assert!(
        msg.contains("1 missing tensor(s): \"model.layers.0.mlp.down_proj.weight\""),
        "{msg}"
    );
    assert!(
        msg.contains("1 unexpected tensor(s): \"model.layers.0.mlp.extra.weight\""),
        "{msg}"
    );

    // A tied model may carry lm_head of the embedding's shape.
    let spec = TinySpec {
        layers: 1,
        ..TinySpec::qwen2()
    };
    let mut tied = owned(&spec, |_| Dtype::F32);
    let emb = tied[0].clone();
    assert_eq!(emb.0, "model.embed_tokens.weight");
    tied.push(("lm_head.weight".into(), emb.1, emb.2, emb.3));
    let dir = root.path().join("tied");
    write_model(&dir, &spec.config_json(), tied, u64::MAX, &[], false).unwrap();
    HfModel::open(&dir).unwrap().check_matches_arch().unwrap();
}

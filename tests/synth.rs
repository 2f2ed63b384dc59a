//! `deltazip synth`: a seeded random model that mistral.rs loads and runs, and random deltas for it that
//! the reader verifies, the loader accepts for that base only, and that serve multi-tenant exactly like
//! the same delta merged.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use deltazip::synth::deltas::{self, DeltasArgs, SynthCodec};
use deltazip::synth::model::{self, ModelArgs, Preset};
use deltazip::synth::Bar;
use dz_compress::hf::HfModel;
use dz_format::{Codec, DeltaFile, Dtype, Role};
use dz_loader::{BaseIdentity, Config, Mode};

/// A model of about 0.1 MB: 2 layers, hidden 64, MLP 128 (two quantization groups in down_proj's rows
/// would need 256; 128 is one), 4 heads over 2 KV heads, the built-in tokenizer's 512 ids.
fn small(out: &Path, seed: u64, dtype: Dtype) -> ModelArgs {
    ModelArgs {
        shape: Preset::Tiny,
        layers: Some(2),
        hidden: Some(64),
        intermediate: Some(160),
        heads: Some(4),
        kv_heads: Some(2),
        vocab: None,
        dtype,
        seed,
        tokenizer: None,
        max_shard_bytes: 200_000,
        out: out.to_path_buf(),
    }
}

fn deltas_args(
    base: &Path,
    out_dir: &Path,
    codec: SynthCodec,
    count: usize,
    seed: u64,
) -> DeltasArgs {
    DeltasArgs {
        base: base.to_path_buf(),
        codec,
        count,
        seed,
        scale: 0.05,
        out_dir: out_dir.to_path_buf(),
        config: None,
        device: "cpu".into(),
        jobs: 2,
    }
}

fn rms(v: &[f32]) -> f32 {
    (v.iter().map(|x| x * x).sum::<f32>() / v.len().max(1) as f32).sqrt()
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn synth_model_is_seeded_sharded_realistic_and_loads_through_mistralrs() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let r = model::write_model(&small(&a, 1, Dtype::F32), &Bar::quiet()).unwrap();
    assert!(r.shards > 1, "a 200 kB shard limit should shard the model");
    assert_eq!(r.vocab, 512);
    assert!(a.join("model.safetensors.index.json").is_file());
    assert!(a.join("tokenizer.json").is_file());

    let hf = HfModel::open(&a).unwrap();
    hf.check_matches_arch().unwrap();
    let arch = hf.arch();
    assert_eq!(
        (arch.num_layers, arch.hidden_size, arch.vocab_size),
        (2, 64, 512)
    );
    assert!(!arch.tie_word_embeddings);
    for name in hf.names() {
        let v = hf.to_f32(name).unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        if name.ends_with("norm.weight") {
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            assert!((mean - 1.0).abs() < 0.02, "{name}: mean {mean}");
        } else {
            let r = rms(&v);
            assert!((0.017..0.023).contains(&r), "{name}: rms {r}");
        }
    }

    // The same seed gives the same bytes; another seed other weights.
    let b = dir.path().join("b");
    model::write_model(&small(&b, 1, Dtype::F32), &Bar::quiet()).unwrap();
    assert_eq!(files_of(&a), files_of(&b));
    let c = dir.path().join("c");
    model::write_model(&small(&c, 2, Dtype::F32), &Bar::quiet()).unwrap();
    assert_ne!(
        hf.fingerprint().unwrap(),
        HfModel::open(&c).unwrap().fingerprint().unwrap()
    );
    // Nothing left behind but the three models.
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["a", "b", "c"]);

    // mistral.rs loads the sharded directory and generates.
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!("[base]\npath = {:?}\ndtype = \"f32\"\nname = \"base\"\n", a),
    )
    .unwrap();
    let (config, checked) = Config::load(&config).unwrap();
    let served = dz_loader::serve(&config, &checked).unwrap();
    let g = served
        .engine
        .generate_tokens("base", &[72, 101, 108, 108, 111], 6)
        .unwrap();
    assert_eq!(g.tokens.len(), 6);
    let logits = served.engine.next_logits("base", &[1, 2, 3]).unwrap();
    assert_eq!(logits.len(), 512);
    assert!(logits.iter().all(|x| x.is_finite()));
    assert!(rms(&logits) > 0.0);
}

#[test]
fn refuses_bad_shapes_tokenizers_and_vocabularies() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let mut args = small(&out, 1, Dtype::Bf16);
    args.heads = Some(3);
    let e = model::write_model(&args, &Bar::quiet()).unwrap_err();
    assert!(format!("{e:#}").contains("bad shape"), "{e:#}");

    let mut args = small(&out, 1, Dtype::Bf16);
    args.tokenizer = Some(dir.path().join("missing.json"));
    let e = model::write_model(&args, &Bar::quiet()).unwrap_err();
    assert!(
        format!("{e:#}").contains("missing.json: no such file"),
        "{e:#}"
    );

    // A given tokenizer sets the vocabulary; --vocab may only raise it.
    let (tok, _) = model::builtin_tokenizer(300).unwrap();
    let tok_path = dir.path().join("tok.json");
    std::fs::write(&tok_path, tok).unwrap();
    let mut args = small(&out, 1, Dtype::Bf16);
    args.tokenizer = Some(tok_path.clone());
    args.vocab = Some(299);
    let e = model::write_model(&args, &Bar::quiet()).unwrap_err();
    assert!(
        format!("{e:#}").contains("smaller than the vocabulary"),
        "{e:#}"
    );
    args.vocab = None;
    assert_eq!(model::write_model(&args, &Bar::quiet()).unwrap().vocab, 300);
    // The directory now exists and is not empty.
    let e = model::write_model(&args, &Bar::quiet()).unwrap_err();
    assert!(format!("{e:#}").contains("not empty"), "{e:#}");

    let e = deltas::write_deltas(
        &deltas_args(
            &dir.path().join("nope"),
            dir.path(),
            SynthCodec::Q4S24,
            1,
            0,
        ),
        &Bar::quiet(),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("no such directory"), "{e:#}");
}

/// Writes a base for the delta tests.
fn base(dir: &Path, seed: u64) -> PathBuf {
    let p = dir.join(format!("base-{seed}"));
    let mut args = small(&p, seed, Dtype::F32);
    args.max_shard_bytes = u64::MAX;
    model::write_model(&args, &Bar::quiet()).unwrap();
    p
}

#[test]
fn synth_deltas_verify_in_every_codec_and_bind_to_their_base() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), 1);
    let other = base(dir.path(), 2);
    let hf = HfModel::open(&b).unwrap();
    let identity = BaseIdentity::of(&b).unwrap();
    let other_identity = BaseIdentity::of(&other).unwrap();
    for codec in [
        SynthCodec::Q4S24,
        SynthCodec::Q2S24,
        SynthCodec::Q4,
        SynthCodec::Q2,
        SynthCodec::Q8,
    ] {
        let out = dir.path().join(codec.as_str());
        let r = deltas::write_deltas(&deltas_args(&b, &out, codec, 2, 5), &Bar::quiet()).unwrap();
        assert_eq!(r.files.len(), 2);
        for p in &r.files {
            let f = DeltaFile::open(p).unwrap();
            f.verify().unwrap();
            let m = f.manifest();
            // Every tensor of the base, in its role.
            assert_eq!(m.tensors.len(), hf.len());
            for t in &m.tensors {
                let d = f
                    .decode(&t.name)
                    .unwrap()
                    .to_f32(t.matrix_dims().unwrap().0);
                let w = hf.to_f32(&t.name).unwrap();
                let rel = rms(&d) / rms(&w);
                match t.role {
                    Role::Linear => {
                        assert_eq!(t.codec, codec.codec(), "{}", t.name);
                        assert!(
                            (0.035..0.065).contains(&rel),
                            "{} {}: {rel}",
                            codec.as_str(),
                            t.name
                        );
                        if matches!(codec, SynthCodec::Q4S24 | SynthCodec::Q2S24) {
                            let zeros = d.iter().filter(|&&x| x == 0.0).count();
                            assert!(zeros * 2 >= d.len(), "{}: 2:4 keeps half", t.name);
                        }
                    }
                    Role::LmHead => {
                        assert!(matches!(t.codec, Codec::Quant(p) if p.bits == 4));
                        assert_eq!(t.rows, None);
                        assert!((0.035..0.065).contains(&rel), "{}: {rel}", t.name);
                    }
                    Role::Embedding => {
                        let rows = t.rows.expect("a row subset") as f64;
                        let frac = rows / t.shape[0] as f64;
                        assert!((0.2..0.4).contains(&frac), "{frac}");
                    }
                    Role::DenseDelta => {
                        assert_eq!(t.codec, Codec::Dense { dtype: Dtype::F32 });
                        assert!(rel > 0.0 && rel < 0.02, "{}: {rel}", t.name);
                    }
                    Role::Full => panic!("no full tensors"),
                }
            }
            // Accepted for its base, refused for another with the reason.
            identity.check("ft", p, Mode::MultiTenant).unwrap();
            let e = other_identity
                .check("ft", p, Mode::MultiTenant)
                .err()
                .expect("another base");
            assert!(e.contains("made for another base"), "{e}");
        }
    }

    // Same seed, same bytes; other seeds or files, other deltas.
    let again = dir.path().join("again");
    deltas::write_deltas(
        &deltas_args(&b, &again, SynthCodec::Q4S24, 2, 5),
        &Bar::quiet(),
    )
    .unwrap();
    assert_eq!(files_of(&again), files_of(&dir.path().join("4b24")));
    let seeded = dir.path().join("seeded");
    deltas::write_deltas(
        &deltas_args(&b, &seeded, SynthCodec::Q4S24, 1, 6),
        &Bar::quiet(),
    )
    .unwrap();
    let q = "model.layers.0.self_attn.q_proj.weight";
    let decode = |p: PathBuf| DeltaFile::open(p).unwrap().decode(q).unwrap().to_f32(64);
    let d0 = decode(dir.path().join("4b24/ft-00.dz"));
    assert_ne!(d0, decode(dir.path().join("4b24/ft-01.dz")));
    assert_ne!(d0, decode(seeded.join("ft-00.dz")));
}

#[test]
fn multi_tenant_synth_delta_serves_like_the_same_delta_merged() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), 3);
    let out = dir.path().join("deltas");
    let config = dir.path().join("serve.toml");
    let mut args = deltas_args(&b, &out, SynthCodec::Q4S24, 2, 9);
    args.config = Some(config.clone());
    let r = deltas::write_deltas(&args, &Bar::quiet()).unwrap();
    assert_eq!(r.config.as_deref(), Some(config.as_path()));
    // The config written names every delta, multi-tenant, and passes every check of the loader.
    let (mut cfg, checked) = Config::load(&config).unwrap();
    assert_eq!(checked.len(), 2);
    assert!(checked.iter().all(|d| d.spec.mode == Mode::MultiTenant));
    assert_eq!(cfg.deltas[1].name, "ft-01");

    // Serve ft-00 multi-tenant and merged (f32 compute), next to the base.
    let text = format!(
        "[base]\npath = {:?}\ndtype = \"f32\"\nname = \"base\"\n[runtime]\nmerged_dir = {:?}\n\
         [[delta]]\nname = \"ft-00\"\npath = {:?}\n\
         [[delta]]\nname = \"ft-00-merged\"\npath = {:?}\nmode = \"merge\"\n",
        b,
        dir.path().join("merged"),
        r.files[0],
        r.files[0]
    );
    std::fs::write(&config, text).unwrap();
    let checked;
    (cfg, checked) = Config::load(&config).unwrap();
    let served = dz_loader::serve(&cfg, &checked).unwrap();
    let e = &served.engine;
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let mut moved = 0f32;
    for prompt in [
        &[72u32, 101, 108, 108, 111][..],
        &[1, 300, 17, 42, 9, 250, 3],
    ] {
        let mt = e.next_logits("ft-00", prompt).unwrap();
        let merged = e.next_logits("ft-00-merged", prompt).unwrap();
        let base = e.next_logits("base", prompt).unwrap();
        let err = max_diff(&mt, &merged);
        assert!(err <= 1e-3, "multi-tenant vs merged: {err}");
        moved = moved.max(max_diff(&mt, &base));
    }
    assert!(
        moved > 1e-2,
        "the delta does not move the logits ({moved}): vacuous test"
    );
    let a = e
        .generate_tokens("ft-00", &[5, 6, 7], 8)
        .unwrap()
        .token_ids();
    let m = e
        .generate_tokens("ft-00-merged", &[5, 6, 7], 8)
        .unwrap()
        .token_ids();
    assert_eq!(a, m);
}

fn deltazip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deltazip"))
        .args(args)
        .output()
        .expect("run deltazip")
}

#[test]
fn cli_synth_model_and_deltas_and_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = deltazip(&[
        "synth",
        "model",
        "--shape",
        "tiny",
        "--layers",
        "1",
        "--hidden",
        "64",
        "--intermediate",
        "128",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--dtype",
        "bf16",
        "--seed",
        "3",
        "--out",
        &s(&m),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("GB/s"));
    let o = deltazip(&[
        "synth",
        "deltas",
        "--base",
        &s(&m),
        "--codec",
        "2b24",
        "--count",
        "3",
        "--out-dir",
        &s(&dir.path().join("d")),
        "--config",
        &s(&dir.path().join("serve.toml")),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.path().join("d/ft-02.dz").is_file());
    let o = deltazip(&["inspect", "--verify", &s(&dir.path().join("d/ft-01.dz"))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("sparse24 2b g128 sym"));

    for (args, want) in [
        (
            vec!["synth", "model", "--shape", "huge", "--out", "x"],
            "invalid value 'huge'",
        ),
        (
            vec![
                "synth",
                "model",
                "--shape",
                "tiny",
                "--tokenizer",
                "/nonexistent/t.json",
                "--out",
                "x",
            ],
            "no such file",
        ),
        (
            vec![
                "synth",
                "deltas",
                "--base",
                "/nonexistent/base",
                "--out-dir",
                "x",
            ],
            "no such directory",
        ),
    ] {
        let o = deltazip(&args);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// `deltazip bench hook` on a synthetic base and deltas (CPU): a row per module of the layer, each with
/// a positive time, the wrapped layer slower than the base layer alone (it adds the deltas' products),
/// and the per-layer sum; bad numbers give one line.
#[test]
fn cli_bench_hook_times_every_module_of_a_layer() {
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let m = dir.path().join("m");
    deltazip_ok(&[
        "synth",
        "model",
        "--shape",
        "tiny",
        "--layers",
        "2",
        "--out",
        &s(&m),
    ]);
    let config = dir.path().join("serve.toml");
    deltazip_ok(&[
        "synth",
        "deltas",
        "--base",
        &s(&m),
        "--count",
        "2",
        "--out-dir",
        &s(&dir.path().join("d")),
        "--config",
        &s(&config),
        "--device",
        "cpu",
    ]);
    let out = deltazip_ok(&[
        "bench",
        "hook",
        "--config",
        &s(&config),
        "--fine-tunes",
        "3",
        "--rows",
        "4",
        "--layer",
        "1",
        "--iters",
        "2",
        "--slot-tables",
    ]);
    let passes = out
        .lines()
        .filter(|l| l.starts_with("| 7 linear layers, another batch each pass"))
        .count();
    assert_eq!(
        passes, 2,
        "the plans' and the slot tables' pass rows:\n{out}"
    );
    assert!(out.contains("slot tables"), "{out}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with("| model.layers.1."))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    assert_eq!(
        rows.len(),
        14,
        "7 linear layers, 2 norms (each also as one op), the new-pass, new-batch and slot-table \
         rows:\n{out}"
    );
    assert_eq!(
        rows.iter().filter(|r| r[1].ends_with("(one op)")).count(),
        2,
        "each norm also as one op:\n{out}"
    );
    for r in &rows {
        let host: f64 = r[3].parse().unwrap();
        assert!(host > 0.0, "{r:?}");
        if !r[2].is_empty() {
            let base: f64 = r[2].parse().unwrap();
            assert!(host > base, "the wrapped layer adds work: {r:?}");
        }
    }
    assert!(
        out.contains("Per decoder layer (7 linear layers, 2 norms)"),
        "{out}"
    );
    let o = deltazip(&["bench", "hook", "--config", &s(&config), "--rows", "0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--rows"));
}

fn deltazip_ok(args: &[&str]) -> String {
    let o = deltazip(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

//! ΔCompress end to end on seeded tiny Llama and Qwen2 families: compress -> merge reproduces the
//! fine-tune within each recipe's named tolerance, OBS beats RTN on the model's own outputs, the size
//! budget holds, and bad input gives a clear error.

use std::path::{Path, PathBuf};

use candle_core::Device;
use dz_compress::fixtures::{self, NamedTensor, TinyFamily, TinySpec};
use dz_compress::hf::{self, HfModel};
use dz_compress::merge::{self, Applied};
use dz_compress::model::{kl_divergence, LlamaModel};
use dz_compress::pipeline::{self, CompressOptions, CompressReport, Method, Quiet};
use dz_compress::{Error, QuantConfig, Sparsity};
use dz_format::{Codec, DeltaFile, Role};

/// Relative Frobenius error of the reconstructed delta, per recipe (measured on these fixtures with margin:
/// see each test). Pruning half the entries of a rank-4 + noise delta loses a large share of its energy,
/// which OBS moves where the inputs do not look.
const TOL_8BIT: f64 = 0.02;
const TOL_4BIT_DENSE: f64 = 0.2;
const TOL_4BIT_24: f64 = 0.85;
/// OBS's KL to the fine-tune must be at most this share of RTN's at the same bits and sparsity.
const OBS_OVER_RTN_KL: f64 = 0.85;

fn family(spec: &TinySpec, n: usize) -> (tempfile::TempDir, TinyFamily) {
    let dir = tempfile::tempdir().unwrap();
    let fam = fixtures::write_family(&dir.path().join("fam"), spec, n).unwrap();
    (dir, fam)
}

fn opts(method: Method, bits: u8, sparsity: Sparsity, calib: &Path) -> CompressOptions {
    CompressOptions {
        method,
        quant: QuantConfig {
            bits,
            group_size: 32,
            symmetric: true,
            sparsity,
        },
        embed_bits: 8,
        calib_text: Some(calib.to_path_buf()),
        samples: 16,
        seq_len: 64,
        ..CompressOptions::default()
    }
}

fn compress(fam: &TinyFamily, i: usize, o: &CompressOptions, out: &Path) -> CompressReport {
    pipeline::compress(&fam.base, &fam.finetunes[i], out, o, &mut Quiet).unwrap()
}

fn rel(a: &[f32], b: &[f32], base: &[f32]) -> f64 {
    // ||(a - base) - (b - base)|| / ||a - base||
    let (mut num, mut den) = (0f64, 0f64);
    for ((x, y), z) in a.iter().zip(b).zip(base) {
        num += ((x - y) as f64).powi(2);
        den += ((x - z) as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Merges `delta` into the family's base and checks every tensor of the result against the fine-tune:
/// linear deltas within `tol` (relative Frobenius), everything else exact.
fn check_merge(fam: &TinyFamily, i: usize, delta: &Path, tol: f64) -> f64 {
    let out = delta.with_extension("merged");
    merge::merge(&fam.base, delta, &out, false, |_| {}).unwrap();
    let merged = HfModel::open(&out).unwrap();
    let ft = HfModel::open(&fam.finetunes[i]).unwrap();
    let base = HfModel::open(&fam.base).unwrap();
    let file = DeltaFile::open(delta).unwrap();
    let mut worst = 0f64;
    for name in ft.names() {
        assert_eq!(
            merged.info(name).unwrap(),
            ft.info(name).unwrap(),
            "{name}: dtype/shape"
        );
        let (a, b, z) = (
            ft.to_f32(name).unwrap(),
            merged.to_f32(name).unwrap(),
            base.to_f32(name).unwrap(),
        );
        let e = rel(&a, &b, &z);
        let entry = file.manifest().tensor(name).unwrap();
        match entry.role {
            Role::Linear | Role::LmHead | Role::Embedding => {
                assert!(
                    e <= tol,
                    "{name}: relative delta error {e:.4} > tolerance {tol}"
                );
                worst = worst.max(e);
            }
            Role::DenseDelta | Role::Full => {
                // Dense f32 deltas are exact for f32 models; for bf16 ones, exact after rounding.
                assert_eq!(
                    a, b,
                    "{name}: dense delta must reproduce the fine-tune exactly"
                );
            }
        }
    }
    assert_eq!(
        merged.tokenizer_path().is_some(),
        base.tokenizer_path().is_some()
    );
    worst
}

fn eval_tokens(fam: &TinyFamily) -> Vec<u32> {
    let base = HfModel::open(&fam.base).unwrap();
    let tok =
        dz_compress::calib_data::tokenize_file(&base.tokenizer_path().unwrap(), &fam.calib_text)
            .unwrap();
    tok[tok.len() / 2..].to_vec()
}

fn kl_to_ft(fam: &TinyFamily, i: usize, delta: &Path, tokens: &[u32]) -> f64 {
    let dev = Device::Cpu;
    let ft = HfModel::open(&fam.finetunes[i]).unwrap();
    let ftm = LlamaModel::load(ft.arch(), &dev, |n| ft.to_f32(n)).unwrap();
    let m = Applied::open(&fam.base, delta)
        .unwrap()
        .model(&dev)
        .unwrap();
    kl_divergence(&ftm, &m, tokens, 64, None).unwrap()
}

#[test]
fn llama_obs_recipes_merge_within_tolerance_and_beat_rtn() {
    let (dir, fam) = family(&TinySpec::llama(), 1);
    let d = |n: &str| dir.path().join(n);
    let tokens = eval_tokens(&fam);

    // 8-bit dense: near-lossless.
    let r8 = compress(
        &fam,
        0,
        &opts(Method::Obs, 8, Sparsity::None, &fam.calib_text),
        &d("8.dz"),
    );
    let e8 = check_merge(&fam, 0, &d("8.dz"), TOL_8BIT);
    let kl8 = kl_to_ft(&fam, 0, &d("8.dz"), &tokens);

    // 4-bit dense.
    compress(
        &fam,
        0,
        &opts(Method::Obs, 4, Sparsity::None, &fam.calib_text),
        &d("4.dz"),
    );
    let e4 = check_merge(&fam, 0, &d("4.dz"), TOL_4BIT_DENSE);

    // 4-bit 2:4, OBS against the RTN/magnitude baseline at the same recipe.
    let r24 = compress(
        &fam,
        0,
        &opts(Method::Obs, 4, Sparsity::TwoFour, &fam.calib_text),
        &d("obs.dz"),
    );
    compress(
        &fam,
        0,
        &opts(Method::Rtn, 4, Sparsity::TwoFour, &fam.calib_text),
        &d("rtn.dz"),
    );
    let e24 = check_merge(&fam, 0, &d("obs.dz"), TOL_4BIT_24);
    let kl_obs = kl_to_ft(&fam, 0, &d("obs.dz"), &tokens);
    let kl_rtn = kl_to_ft(&fam, 0, &d("rtn.dz"), &tokens);
    eprintln!(
        "rel. delta error: 8b {e8:.4}, 4b {e4:.4}, 4b 2:4 {e24:.4}; KL 8b {kl8:.2e}, obs {kl_obs:.2e}, \
         rtn {kl_rtn:.2e}; ratio 8b {:.2}x, 4b 2:4 {:.2}x",
        r8.ratio(),
        r24.ratio()
    );
    assert!(
        kl_obs <= OBS_OVER_RTN_KL * kl_rtn,
        "OBS KL {kl_obs:.3e} should be <= {OBS_OVER_RTN_KL} x RTN KL {kl_rtn:.3e}"
    );
    assert!(
        kl8 < 0.05 * kl_obs,
        "8-bit KL {kl8:.2e} should be far below 4-bit 2:4's {kl_obs:.2e}"
    );
    assert!(r24.ratio() > r8.ratio());

    // The 2:4 codec holds exactly 2 of every 4, in every linear tensor.
    let f = DeltaFile::open(d("obs.dz")).unwrap();
    let mut sparse24 = 0;
    for t in &f.manifest().tensors {
        if let Codec::Sparse24(_) = t.codec {
            sparse24 += 1;
            let dense = f.decode(&t.name).unwrap().payload.dequantize();
            let (_, k) = t.matrix_dims().unwrap();
            for run in dense.chunks(4) {
                assert!(run.iter().filter(|v| **v != 0.0).count() <= 2, "{}", t.name);
            }
            assert_eq!(k % 4, 0);
        }
    }
    assert_eq!(sparse24, 2 * 7, "every linear of both layers is 2:4");
    // Every tensor of the fine-tune is in the delta, and the delta is bound to the base.
    let ft = HfModel::open(&fam.finetunes[0]).unwrap();
    assert_eq!(f.manifest().tensors.len(), ft.len());
    let base = HfModel::open(&fam.base).unwrap();
    f.manifest()
        .base
        .check_base(&base.fingerprint().unwrap())
        .unwrap();
}

#[test]
fn qwen2_bf16_tied_with_biases() {
    let spec = TinySpec {
        dtype: dz_format::Dtype::Bf16,
        ..TinySpec::qwen2()
    };
    let (dir, fam) = family(&spec, 1);
    let out = dir.path().join("q.dz");
    let r = compress(
        &fam,
        0,
        &opts(Method::Obs, 4, Sparsity::None, &fam.calib_text),
        &out,
    );
    check_merge(&fam, 0, &out, TOL_4BIT_DENSE);
    let f = DeltaFile::open(&out).unwrap();
    let emb = f.manifest().tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(emb.role, Role::Embedding);
    assert!(emb.rows.is_some(), "only moved embedding rows are stored");
    assert!(
        f.manifest().tensor("lm_head.weight").is_none(),
        "tied: no separate head"
    );
    let bias = f
        .manifest()
        .tensor("model.layers.0.self_attn.q_proj.bias")
        .unwrap();
    assert_eq!(bias.role, Role::DenseDelta);
    assert!(r.tensors.iter().any(|t| t.calibrated_error.is_some()));
}

/// Writes an HF directory with the family's config and tokenizer and the given tensors.
fn write_dir(
    dir: &Path,
    spec: &TinySpec,
    tensors: &[NamedTensor],
    config: Option<serde_json::Value>,
) {
    let owned = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                spec.dtype,
                s.clone(),
                hf::encode_f32(v, spec.dtype),
            )
        })
        .collect::<Vec<_>>();
    let tok = fixtures::tokenizer_json(spec.vocab);
    hf::write_model(
        dir,
        &config.unwrap_or_else(|| spec.config_json()),
        owned,
        u64::MAX,
        &[("tokenizer.json", tok.as_bytes())],
        false,
    )
    .unwrap();
}

#[test]
fn untouched_tensors_become_zero_and_merge_exactly() {
    let spec = TinySpec::llama();
    let dir = tempfile::tempdir().unwrap();
    let base = spec.generate_base();
    let mut ft = base.clone();
    // Only one linear weight changes.
    let (_, _, w) = ft
        .iter_mut()
        .find(|(n, _, _)| n == "model.layers.1.mlp.up_proj.weight")
        .unwrap();
    for (i, v) in w.iter_mut().enumerate() {
        *v += 1e-3 * ((i % 7) as f32 - 3.0);
    }
    let (b, f) = (dir.path().join("base"), dir.path().join("ft"));
    write_dir(&b, &spec, &base, None);
    write_dir(&f, &spec, &ft, None);
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, dz_compress::calib_data::default_calib_text()).unwrap();
    let out = dir.path().join("z.dz");
    pipeline::compress(
        &b,
        &f,
        &out,
        &opts(Method::Obs, 4, Sparsity::TwoFour, &calib),
        &mut Quiet,
    )
    .unwrap();
    let file = DeltaFile::open(&out).unwrap();
    let zeros = file
        .manifest()
        .tensors
        .iter()
        .filter(|t| t.codec == Codec::Zero)
        .count();
    assert_eq!(zeros, file.manifest().tensors.len() - 1);
    let merged = dir.path().join("m");
    merge::merge(&b, &out, &merged, false, |_| {}).unwrap();
    let m = HfModel::open(&merged).unwrap();
    for (n, _, v) in &base {
        if n != "model.layers.1.mlp.up_proj.weight" {
            assert_eq!(
                &m.to_f32(n).unwrap(),
                v,
                "{n} must be the base's, bit for bit"
            );
        }
    }
}

fn expect_err(base: &Path, ft: &Path, o: &CompressOptions) -> Error {
    let out = base.parent().unwrap().join("never.dz");
    let e = pipeline::compress(base, ft, &out, o, &mut Quiet).unwrap_err();
    assert!(!out.exists(), "a failed compression must leave no file");
    e
}

#[test]
fn bad_inputs_give_clear_errors() {
    let spec = TinySpec::llama();
    let dir = tempfile::tempdir().unwrap();
    let base = spec.generate_base();
    let b = dir.path().join("base");
    write_dir(&b, &spec, &base, None);
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, dz_compress::calib_data::default_calib_text()).unwrap();
    let o = opts(Method::Obs, 4, Sparsity::TwoFour, &calib);

    // Another architecture (wider MLP): refused before any work.
    let wide = TinySpec {
        ffn: 192,
        ..spec.clone()
    };
    let w = dir.path().join("wide");
    write_dir(&w, &wide, &wide.generate_base(), None);
    let e = expect_err(&b, &w, &o);
    assert!(matches!(e, Error::Mismatch(_)), "{e}");

    // A tensor missing from the fine-tune.
    let missing: Vec<_> = base
        .iter()
        .filter(|(n, _, _)| n != "model.layers.0.mlp.down_proj.weight")
        .cloned()
        .collect();
    let m = dir.path().join("missing");
    write_dir(&m, &spec, &missing, None);
    let e = expect_err(&b, &m, &o);
    assert!(e.to_string().contains("down_proj"), "{e}");

    // A calibration text too short for one window.
    let f = dir.path().join("ft");
    write_dir(&f, &spec, &spec.finetune(&base, 1, 0.05), None);
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let e = expect_err(&b, &f, &opts(Method::Obs, 4, Sparsity::TwoFour, &short));
    assert!(matches!(e, Error::Calibration(_)), "{e}");
    assert!(e.to_string().contains("short.txt"), "{e}");

    // A missing calibration file names the file.
    let e = expect_err(
        &b,
        &f,
        &opts(
            Method::Obs,
            4,
            Sparsity::TwoFour,
            &dir.path().join("nope.txt"),
        ),
    );
    assert!(e.to_string().contains("nope.txt"), "{e}");

    // A directory that is not a model.
    let e = expect_err(&b, dir.path(), &o);
    assert!(e.to_string().contains("config.json"), "{e}");

    // Invalid recipes.
    let e = expect_err(&b, &f, &opts(Method::Obs, 5, Sparsity::TwoFour, &calib));
    assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
    let mut unreachable = o.clone();
    unreachable.target_ratio = Some(1000.0);
    let e = expect_err(&b, &f, &unreachable);
    assert!(e.to_string().contains("out of reach"), "{e}");
}

#[test]
fn target_ratio_meets_its_budget_and_mixes_recipes() {
    let (dir, fam) = family(&TinySpec::llama(), 1);
    let out = dir.path().join("t.dz");
    let mut o = opts(Method::Obs, 4, Sparsity::TwoFour, &fam.calib_text);
    o.embed_bits = 4;
    let target = 3.2;
    o.target_ratio = Some(target);
    let r = compress(&fam, 0, &o, &out);
    // At the target, and not far past it: a file that overshoots by more than 3% (the budget is set on
    // bytes before zstd) gets another allocation with the budget the file measured (up to three passes).
    assert!(
        r.ratio() >= target && r.ratio() <= target * 1.06,
        "ratio {:.3} for the target {target}",
        r.ratio()
    );
    assert!(!out.with_extension("dz.refine").exists());
    let f = DeltaFile::open(&out).unwrap();
    assert_eq!(f.manifest().recipe.method, "obs-mixed");
    assert!(f.manifest().recipe.extra.contains_key("allocation"));
    check_merge(&fam, 0, &out, 1.0);

    // The dry-run estimate is in the right neighbourhood of the real file (before zstd, all rows).
    let mut plain = o.clone();
    plain.target_ratio = None;
    let est = pipeline::estimate(&fam.base, &fam.finetunes[0], &plain).unwrap();
    let real = compress(&fam, 0, &plain, &dir.path().join("p.dz"));
    let q = est.delta_bytes as f64 / real.file_bytes as f64;
    assert!(
        (0.8..1.6).contains(&q),
        "estimate {} vs real {}",
        est.delta_bytes,
        real.file_bytes
    );
}

#[test]
fn target_ratio_with_rtn_and_below_one_bit_per_weight() {
    let (dir, fam) = family(&TinySpec::llama(), 1);
    // RTN takes a size budget too: recipes chosen by their plain (uncalibrated) error.
    let out = dir.path().join("rtn.dz");
    let mut o = opts(Method::Rtn, 4, Sparsity::TwoFour, &fam.calib_text);
    o.embed_bits = 4;
    o.target_ratio = Some(3.2);
    let r = compress(&fam, 0, &o, &out);
    assert!(r.ratio() >= 3.2, "ratio {:.3}", r.ratio());
    let f = DeltaFile::open(&out).unwrap();
    assert_eq!(f.manifest().recipe.method, "rtn-mixed");
    check_merge(&fam, 0, &out, 1.0);

    // A budget well below what 1-bit sign everywhere takes: the allocation drops the deltas that matter
    // least (stored as `zero`: those weights stay the base's) instead of refusing. (1.5x the sign-only
    // estimate: that estimate counts every embedding row and no zstd, so at 1.1x the refined passes could
    // keep every delta of these random fine-tunes, at 2-4 bits and one sign, and dropped none.)
    let est_sign = {
        let mut s = opts(Method::Sign, 4, Sparsity::None, &fam.calib_text);
        s.embed_bits = 2;
        pipeline::estimate(&fam.base, &fam.finetunes[0], &s)
            .unwrap()
            .ratio()
    };
    let out = dir.path().join("deep.dz");
    let mut o = opts(Method::Obs, 4, Sparsity::TwoFour, &fam.calib_text);
    o.embed_bits = 2;
    o.target_ratio = Some(est_sign * 1.5);
    let r = compress(&fam, 0, &o, &out);
    assert!(
        r.ratio() >= est_sign * 1.5,
        "ratio {:.3} vs sign-only {est_sign:.3}",
        r.ratio()
    );
    let f = DeltaFile::open(&out).unwrap();
    let mix = f.manifest().recipe.extra["allocation"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(mix.contains("dropped"), "{mix}");
    let dropped = r
        .tensors
        .iter()
        .filter(|t| t.role == Role::Linear && t.codec == "zero")
        .count();
    assert!(dropped > 0, "{mix}");
    // A dropped delta is reported as wholly lost, and the merge keeps the base's weights there.
    assert!(r
        .tensors
        .iter()
        .filter(|t| t.role == Role::Linear && t.codec == "zero")
        .all(|t| (t.frobenius_error - 1.0).abs() < 1e-9));
}

#[test]
fn merge_refuses_a_delta_for_another_base() {
    let (dir, fam) = family(&TinySpec::llama(), 1);
    let out = dir.path().join("a.dz");
    compress(
        &fam,
        0,
        &opts(Method::Rtn, 4, Sparsity::TwoFour, &fam.calib_text),
        &out,
    );
    // The other family's base has the same shapes but other weights.
    let other = TinySpec {
        seed: 7,
        ..TinySpec::llama()
    };
    let ob: PathBuf = dir.path().join("other-base");
    write_dir(&ob, &other, &other.generate_base(), None);
    let e = merge::merge(&ob, &out, &dir.path().join("m"), false, |_| {}).unwrap_err();
    assert!(
        matches!(e, Error::Format(dz_format::Error::BaseMismatch { .. })),
        "{e}"
    );
    assert!(!dir.path().join("m").exists());
}

//! The quality benchmark (bench/quality/) at CI size: a seeded tiny Llama is "pretrained" on one kind of
//! text, fine-tuned (full-parameter, candle autograd) on another, and the fine-tune is compressed; the
//! compressed delta must keep most of the fine-tune's perplexity gain on held-out text of its domain.
//!
//! Texts: the built-in calibration text interleaves slices of the King James Bible, the Python docs and the
//! Python standard library. The base learns the Python slices (docs + code); the fine-tune learns the
//! Bible's verses, whose last 10% is held out. Gain kept = (ppl_base - ppl_c) / (ppl_base - ppl_ft).

use std::path::{Path, PathBuf};

use candle_core::Device;
use dz_compress::calib_data::{load_tokenizer, tokenize, DEFAULT_CALIB_TEXT};
use dz_compress::fixtures::{self, TinySpec};
use dz_compress::hf::{self, HfModel};
use dz_compress::merge::Applied;
use dz_compress::model::{kl_divergence, LlamaModel};
use dz_compress::pipeline::{self, BudgetError, CompressOptions, Method, Quiet};
use dz_compress::train::{self, TrainConfig};
use dz_compress::{QuantConfig, Sparsity};

/// The fine-tune must lower held-out domain perplexity by at least this share (the quality issue's bar for
/// real fine-tunes; this one measures 54%), or the gain is too small to measure.
const MIN_FT_DROP: f64 = 0.25;
/// 4-bit 2:4 OBS must keep at least this share of the gain: it measures 99.7% here (RTN 99.0%). The issue's
/// bar for real fine-tunes is 99% at >= 10x; this tiny model's base is weak (held-out ppl 65 -> 30), so
/// the perplexity gain forgives more than it would on a real one: KL to the fine-tune is checked too.
const MIN_GAIN_KEPT_4B24_OBS: f64 = 0.95;
/// 8-bit dense (nearly lossless) must keep at least this share (measures 100.0%).
const MIN_GAIN_KEPT_8B: f64 = 0.99;

const EVAL_SEQ: usize = 64;

/// Bible verses (`  N text` lines and `Book N` headings) vs everything else, in text order.
fn split_domains(text: &str) -> (String, String) {
    let (mut bible, mut other) = (String::new(), String::new());
    for line in text.lines() {
        let t = line.trim_start();
        let verse = line.starts_with("  ")
            && t.split_once(' ')
                .is_some_and(|(n, rest)| n.parse::<u32>().is_ok() && !rest.is_empty());
        let heading = !line.starts_with(' ')
            && line.rsplit_once(' ').is_some_and(|(book, n)| {
                n.parse::<u32>().is_ok() && book.chars().all(|c| c.is_alphabetic() || c == ' ')
            })
            && line.len() < 30;
        if verse || heading {
            bible.push_str(line);
            bible.push('\n');
        } else {
            other.push_str(line);
            other.push('\n');
        }
    }
    (bible, other)
}

fn ppl(m: &LlamaModel, tokens: &[u32]) -> f64 {
    m.perplexity(tokens, EVAL_SEQ, None).unwrap().ppl
}

/// Trains a copy of the model in `from` on `tokens` and writes it to `to` (f32, tokenizer copied).
fn train_to(from: &Path, to: &Path, tokens: &[u32], cfg: &TrainConfig) -> Vec<f32> {
    let src = HfModel::open(from).unwrap();
    let m = LlamaModel::load(src.arch(), &Device::Cpu, |n| src.to_f32(n)).unwrap();
    let vars = m.to_vars().unwrap();
    drop(m);
    let model = LlamaModel::from_vars(src.arch(), &vars).unwrap();
    let losses = train::train(&model, &vars, tokens, cfg, &Device::Cpu, |_| {}).unwrap();
    let tok = std::fs::read(src.tokenizer_path().unwrap()).unwrap();
    let owned = model
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let shape = t.dims().to_vec();
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                name,
                dz_format::Dtype::F32,
                shape,
                hf::encode_f32(&v, dz_format::Dtype::F32),
            )
        })
        .collect::<Vec<hf::OwnedTensor>>();
    hf::write_model(
        to,
        src.config_json(),
        owned,
        u64::MAX,
        &[(hf::TOKENIZER_FILE, tok.as_slice())],
        false,
    )
    .unwrap();
    losses
}

/// A base pretrained here on the general text and its fine-tune on the Bible's verses, written under a
/// temporary directory, with what the checks compare against.
struct Tuned {
    t0: std::time::Instant,
    dir: tempfile::TempDir,
    base: PathBuf,
    ft: PathBuf,
    /// The calibration text: the fine-tune's training part (as the benchmark calibrates).
    calib: PathBuf,
    /// The domain's held-out tokens.
    held: Vec<u32>,
    /// Held-out perplexity of the base and of the fine-tune.
    pb: f64,
    pf: f64,
    ft_model: LlamaModel,
}

/// [`Tuned`] for `spec`, pretrained for `pretrain_steps`; the fine-tune must lower the held-out
/// perplexity by at least [`MIN_FT_DROP`].
fn pretrain_and_tune(spec: &TinySpec, pretrain_steps: usize) -> Tuned {
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let fam = fixtures::write_family(&dir.path().join("init"), spec, 0).unwrap();
    let tok = load_tokenizer(&fam.base.join(hf::TOKENIZER_FILE)).unwrap();
    let (bible, other) = split_domains(DEFAULT_CALIB_TEXT);
    assert!(
        bible.len() > 40_000 && other.len() > 100_000,
        "{} / {}",
        bible.len(),
        other.len()
    );
    let general = tokenize(&tok, &other).unwrap();
    let domain = tokenize(&tok, &bible).unwrap();
    let split = domain.len() - domain.len() / 10;
    let (train_d, held) = (&domain[..split], &domain[split..]);
    let calib = dir.path().join("calib.txt");
    let cut = bible.len() * 85 / 100;
    let cut = bible[..cut].rfind('\n').unwrap() + 1;
    std::fs::write(&calib, &bible[..cut]).unwrap();

    // "Pretraining": the random fixture base learns the Python text.
    let base = dir.path().join("base");
    let pre = TrainConfig {
        steps: pretrain_steps,
        batch: 16,
        seq_len: 64,
        lr: 3e-3,
        warmup: 10,
        cosine: true,
        seed: 1,
    };
    let l = train_to(&fam.base, &base, &general, &pre);
    eprintln!(
        "pretrain: loss {:.3} -> {:.3} [{:.1}s]",
        l[0],
        l[l.len() - 1],
        t0.elapsed().as_secs_f64()
    );
    // The fine-tune: the Bible's verses.
    let ft = dir.path().join("ft");
    let tune = TrainConfig {
        steps: 60,
        batch: 16,
        seq_len: 64,
        lr: 1e-3,
        warmup: 5,
        cosine: true,
        seed: 2,
    };
    let l = train_to(&base, &ft, train_d, &tune);
    eprintln!(
        "fine-tune: loss {:.3} -> {:.3} [{:.1}s]",
        l[0],
        l[l.len() - 1],
        t0.elapsed().as_secs_f64()
    );

    let load = |d: &Path| {
        let m = HfModel::open(d).unwrap();
        LlamaModel::load(m.arch(), &Device::Cpu, |n| m.to_f32(n)).unwrap()
    };
    let (pb, pf) = (ppl(&load(&base), held), ppl(&load(&ft), held));
    let drop = 1.0 - pf / pb;
    eprintln!(
        "held-out domain perplexity: base {pb:.3}, fine-tune {pf:.3} ({:.1}% drop)",
        100.0 * drop
    );
    assert!(
        drop >= MIN_FT_DROP,
        "the fine-tune lowered perplexity by only {:.1}%",
        100.0 * drop
    );
    Tuned {
        t0,
        ft_model: load(&ft),
        dir,
        base,
        ft,
        calib,
        held: held.to_vec(),
        pb,
        pf,
    }
}

#[test]
fn compressed_finetune_keeps_its_gain() {
    let Tuned {
        t0,
        dir,
        base,
        ft,
        calib,
        held,
        pb,
        pf,
        ft_model,
    } = pretrain_and_tune(&TinySpec::llama(), 150);
    let held = held.as_slice();
    // (gain kept, KL(ft || compressed)) of one recipe.
    let kept = |method: Method, bits: u8, sparsity: Sparsity| -> (f64, f64) {
        let o = CompressOptions {
            method,
            quant: QuantConfig {
                bits,
                group_size: 32,
                symmetric: true,
                sparsity,
            },
            embed_bits: 8,
            calib_text: Some(calib.clone()),
            samples: 32,
            seq_len: 64,
            ..CompressOptions::default()
        };
        let out = dir
            .path()
            .join(format!("{}-{bits}-{sparsity:?}.dz", method.as_str()));
        let r = pipeline::compress(&base, &ft, &out, &o, &mut Quiet).unwrap();
        let m = Applied::open(&base, &out)
            .unwrap()
            .model(&Device::Cpu)
            .unwrap();
        let pc = ppl(&m, held);
        let k = (pb - pc) / (pb - pf);
        let kl = kl_divergence(&ft_model, &m, held, EVAL_SEQ, None).unwrap();
        eprintln!(
            "{} {bits}b {sparsity:?}: {:.2}x, ppl {pc:.3}, gain kept {:.1}%, KL {kl:.2e} [{:.1}s]",
            method.as_str(),
            r.ratio(),
            100.0 * k,
            t0.elapsed().as_secs_f64()
        );
        (k, kl)
    };
    let (k8, _) = kept(Method::Obs, 8, Sparsity::None);
    let (k4, kl4) = kept(Method::Obs, 4, Sparsity::TwoFour);
    let (k4_rtn, kl4_rtn) = kept(Method::Rtn, 4, Sparsity::TwoFour);
    assert!(
        k8 >= MIN_GAIN_KEPT_8B,
        "8-bit OBS kept {:.1}% of the gain",
        100.0 * k8
    );
    assert!(
        k4 >= MIN_GAIN_KEPT_4B24_OBS,
        "4-bit 2:4 OBS kept {:.1}% of the gain (RTN {:.1}%)",
        100.0 * k4,
        100.0 * k4_rtn
    );
    // OBS is closer to the fine-tune than RTN at the same size (the "OBS beats RTN").
    assert!(
        kl4 < kl4_rtn,
        "4-bit 2:4: OBS KL {kl4:.3e} is not below RTN's {kl4_rtn:.3e}"
    );
}

/// At 10x and 16x OBS (calibrated allocation and compression) must be at least as close to the fine-tune
/// as the RTN baseline (Frobenius allocation, RTN/magnitude/sign), within this factor on KL. At 10x it
/// measures 0.75 (0.84 before `tied_table_damp`). At 16x the absolute calibrated ranking alone loses here
/// (1.16; 1.25 before), as it did on the H200's gcide: on this tiny model it drops the first layer's whole
/// attention block. `BudgetError::DeltaWeighted` holds the bound (0.98), and the default,
/// `BudgetError::Auto`, keeps whichever of the two is closer to the fine-tune on the calibration windows
/// (on SmolLM2 the absolute ranking won; bench/quality/README.md).
const MAX_KL_OBS_OVER_RTN_BUDGETED: f64 = 1.05;

/// A tied-embedding Llama (as SmolLM2), big enough that a 16x budget leaves the linear deltas under one
/// bit per weight after the 2-bit embeddings and the per-tensor overhead, as on SmolLM2 (t16 there: 0.8).
fn budget_spec() -> TinySpec {
    TinySpec {
        hidden: 128,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        ffn: 384,
        tied: true,
        seed: 0xb0d6e7,
        ..TinySpec::llama()
    }
}

/// The quality benchmark's `t10`/`t16` recipes (2-bit embeddings, size budget) on a tied tiny Llama
/// pretrained and fine-tuned here: OBS must not lose to RTN.
#[test]
fn budgeted_obs_is_not_worse_than_rtn() {
    let Tuned {
        t0,
        dir,
        base,
        ft,
        calib,
        held,
        pb,
        pf,
        ft_model,
    } = pretrain_and_tune(&budget_spec(), 120);
    let held = held.as_slice();
    // KL to the fine-tune of one compression, and its report.
    let run = |tag: &str, ratio: f64, o: CompressOptions| -> (f64, pipeline::CompressReport) {
        let o = CompressOptions {
            target_ratio: Some(ratio),
            embed_bits: 2,
            calib_text: Some(calib.clone()),
            samples: 32,
            seq_len: 64,
            ..o
        };
        let out = dir.path().join(format!("{tag}-t{ratio}.dz"));
        let r = pipeline::compress(&base, &ft, &out, &o, &mut Quiet).unwrap();
        let m = Applied::open(&base, &out)
            .unwrap()
            .model(&Device::Cpu)
            .unwrap();
        let pc = ppl(&m, held);
        let k = kl_divergence(&ft_model, &m, held, EVAL_SEQ, None).unwrap();
        eprintln!(
            "t{ratio} {tag}: {:.2}x, ppl {pc:.3}, gain kept {:.1}%, KL {k:.3e}, rankings tried {:?} [{:.1}s]",
            r.ratio(),
            100.0 * (pb - pc) / (pb - pf),
            r.budget_trials,
            t0.elapsed().as_secs_f64()
        );
        assert!(r.ratio() >= ratio, "t{ratio} {tag}: {:.2}x", r.ratio());
        (k, r)
    };
    let obs = CompressOptions::default();
    assert_eq!(obs.budget_error, BudgetError::Auto);
    let rtn = CompressOptions {
        method: Method::Rtn,
        ..CompressOptions::default()
    };
    let check = |ratio: f64, what: &str, kl_obs: f64, kl_rtn: f64| {
        assert!(
            kl_obs <= kl_rtn * MAX_KL_OBS_OVER_RTN_BUDGETED,
            "t{ratio} {what}: OBS KL {kl_obs:.3e} vs RTN {kl_rtn:.3e} (ratio {:.3}, tolerance \
             {MAX_KL_OBS_OVER_RTN_BUDGETED})",
            kl_obs / kl_rtn
        );
    };
    check(
        10.0,
        "obs",
        run("obs", 10.0, obs.clone()).0,
        run("rtn", 10.0, rtn.clone()).0,
    );
    let kl_rtn16 = run("rtn", 16.0, rtn).0;
    let (kl_auto16, auto16) = run("obs", 16.0, obs.clone());
    // Every ranking tried, the kept one first with the lowest calibration KL, and no candidate left over.
    let trials = &auto16.budget_trials;
    assert_eq!(trials.len(), 3, "{trials:?}");
    assert!(trials.iter().all(|t| trials[0].1 <= t.1), "{trials:?}");
    let mut kinds: Vec<&str> = trials.iter().map(|t| t.0.as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["absolute", "plain", "weighted"], "{trials:?}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("obs-t16.dz."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    check(16.0, "obs (auto ranking)", kl_auto16, kl_rtn16);
    // The tied table's damping: OBS under the head's Hessian alone (the linear damping) is further off
    // (both with the absolute ranking, where it was measured).
    let absolute = CompressOptions {
        budget_error: BudgetError::Absolute,
        ..obs
    };
    let kl_abs16 = run("obs-absolute", 16.0, absolute.clone()).0;
    let old = CompressOptions {
        tied_table_damp: absolute.damp,
        ..absolute
    };
    let kl_old = run("obs-table-damp-0.01", 16.0, old).0;
    assert!(
        kl_abs16 < kl_old,
        "t16: tied_table_damp 1 gives KL {kl_abs16:.3e}, 0.01 gives {kl_old:.3e}"
    );
}

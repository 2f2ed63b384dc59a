//! The Llama-family forward pass against candle-transformers' own `llama` and `qwen2` (the slow twins, on the
//! same tiny seeded weights), the fused kernels against the primitive (differentiable) ones, gradients
//! against finite differences, the evaluation helpers against plain f64 host math, and sequential
//! calibration: group order and widths, Hessians against a direct computation from the staged inputs, and the
//! final hidden states against a plain forward of the model it leaves behind.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2};
use dz_compress::arch::ArchConfig;
use dz_compress::calibrate::{calibrate, HessianAccumulator, Progress};
use dz_compress::model::{kl_divergence, Kernels, LlamaModel};
use dz_compress::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Max |logit difference| allowed between our forward and candle-transformers' (both f32).
const DZ_MAX_LOGIT_DIFF_VS_CANDLE: f32 = 1e-4;
/// Max |logit difference| between [`Kernels::Fused`] and [`Kernels::Primitive`] (both f32, same weights) on
/// CUDA. On the CPU they are bit-exact: the primitive twins do the same f32 operations in the same order
/// (sequential sums, a true division by the width, `x / rms * w`, `x1 cos - x2 sin`).
const DZ_MAX_LOGIT_DIFF_FUSED_VS_PRIMITIVE_CUDA: f32 = 1e-5;
/// Relative tolerance of a directional derivative from autograd against a central finite difference in f32
/// (measured: about 1e-4).
const DZ_GRAD_FD_REL_TOL: f64 = 2e-3;
/// Relative tolerance (to the largest entry) of a Hessian against the f64 host computation.
const DZ_HESSIAN_REL_TOL: f64 = 1e-5;

/// One test per device: `_cpu` always, `_cuda` under the `cuda` feature.
macro_rules! test_device {
    ($body:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() -> Result<()> {
            $body(&Device::Cpu)
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() -> Result<()> {
            $body(&Device::new_cuda(0)?)
        }
    };
}

fn tiny_arch(model_type: &str, tied: bool, rope_theta: f64) -> ArchConfig {
    ArchConfig::from_json(&serde_json::json!({
        "model_type": model_type, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 320, "rms_norm_eps": 1e-5, "rope_theta": rope_theta,
        "tie_word_embeddings": tied
    }))
    .expect("valid tiny config")
}

/// Seeded weights at realistic scales: linear weights uniform in +-2/sqrt(cols), norms around 1, embeddings
/// in +-0.5, biases in +-0.5.
fn random_weights(arch: &ArchConfig, seed: u64) -> HashMap<String, Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    arch.tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values = if name.ends_with("norm.weight") {
                (0..n).map(|_| rng.gen_range(0.8f32..1.2)).collect()
            } else if name.ends_with(".bias") || name == "model.embed_tokens.weight" {
                (0..n).map(|_| rng.gen_range(-0.5f32..0.5)).collect()
            } else {
                let a = 2.0 / (shape[1] as f32).sqrt();
                (0..n).map(|_| rng.gen_range(-a..a)).collect()
            };
            (name, values)
        })
        .collect()
}

fn load(arch: &ArchConfig, w: &HashMap<String, Vec<f32>>, device: &Device) -> Result<LlamaModel> {
    LlamaModel::load(arch, device, |name| {
        w.get(name)
            .cloned()
            .ok_or_else(|| Error::InvalidModel(format!("test weights lack {name}")))
    })
}

fn var_builder(
    arch: &ArchConfig,
    w: &HashMap<String, Vec<f32>>,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let mut tensors = HashMap::new();
    for (name, shape) in arch.tensor_shapes() {
        tensors.insert(name.clone(), Tensor::from_slice(&w[&name], shape, device)?);
    }
    Ok(VarBuilder::from_tensors(tensors, DType::F32, device))
}

fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()
}

/// Max |got - want|; panics with index, value, expected and tolerance past `tol`.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = (0, 0f32);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(d.is_finite(), "{what}: non-finite at {i}: {g} vs {w}");
        if d > worst.1 {
            worst = (i, d);
        }
    }
    let (i, d) = worst;
    assert!(
        d <= tol,
        "{what}: index {i}: got {}, expected {}, |diff| {d} > tolerance {tol}",
        got[i],
        want[i]
    );
    d
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

fn forward_matches_llama(device: &Device) -> Result<()> {
    for tied in [false, true] {
        let arch = tiny_arch("llama", tied, 10_000.0);
        let w = random_weights(&arch, 11 + tied as u64);
        let ours = load(&arch, &w, device)?;
        let cfg = llama::Config {
            hidden_size: 64,
            intermediate_size: 160,
            vocab_size: 320,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            use_flash_attn: false,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            bos_token_id: None,
            eos_token_id: None,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: tied,
        };
        let reference = llama::Llama::load(var_builder(&arch, &w, device)?, &cfg)?;
        let (b, t) = (2, 12);
        let toks = random_tokens(b * t, 320, 5);
        let ids = Tensor::from_vec(toks, (b, t), device)?;
        let logits = ours.forward(&ids)?;
        let mut worst = 0f32;
        // candle-transformers' llama returns the last position only: run every prefix without a KV cache.
        for k in 1..=t {
            let mut cache = llama::Cache::new(false, DType::F32, &cfg, device)?;
            let want = reference.forward(&ids.narrow(1, 0, k)?, 0, &mut cache)?;
            let got = logits.narrow(1, k - 1, 1)?.squeeze(1)?;
            worst = worst.max(assert_close(
                &format!("llama tied={tied} position {}", k - 1),
                &flat(&got)?,
                &flat(&want)?,
                DZ_MAX_LOGIT_DIFF_VS_CANDLE,
            ));
        }
        println!("llama tied={tied}: max |logit diff| vs candle-transformers {worst:e}");
    }
    Ok(())
}
test_device!(
    forward_matches_llama,
    forward_matches_candle_llama_cpu,
    forward_matches_candle_llama_cuda
);

fn forward_matches_qwen2(device: &Device) -> Result<()> {
    for tied in [true, false] {
        let arch = tiny_arch("qwen2", tied, 1_000_000.0);
        assert!(arch.attention_bias);
        let w = random_weights(&arch, 21 + tied as u64);
        let ours = load(&arch, &w, device)?;
        let cfg = qwen2::Config {
            vocab_size: 320,
            hidden_size: 64,
            intermediate_size: 160,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 64,
            sliding_window: 64,
            max_window_layers: 2,
            tie_word_embeddings: tied,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-5,
            use_sliding_window: false,
            hidden_act: candle_nn::Activation::Silu,
        };
        let mut reference = qwen2::Model::new(&cfg, var_builder(&arch, &w, device)?)?;
        let (b, t) = (3, 16);
        let ids = Tensor::from_vec(random_tokens(b * t, 320, 6), (b, t), device)?;
        // qwen2::Model returns norm(h) at every position; apply the head here.
        let head = if tied {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let head = Tensor::from_slice(&w[head], (320, 64), device)?;
        let want = reference
            .forward(&ids, 0, None)?
            .reshape((b * t, 64))?
            .matmul(&head.t()?)?;
        let got = ours.forward(&ids)?;
        assert_eq!(got.dims(), &[b, t, 320]);
        let worst = assert_close(
            &format!("qwen2 tied={tied}"),
            &flat(&got)?,
            &flat(&want)?,
            DZ_MAX_LOGIT_DIFF_VS_CANDLE,
        );
        println!("qwen2 tied={tied}: max |logit diff| vs candle-transformers {worst:e}");
    }
    Ok(())
}
test_device!(
    forward_matches_qwen2,
    forward_matches_candle_qwen2_cpu,
    forward_matches_candle_qwen2_cuda
);

fn staged_api_composes(device: &Device) -> Result<()> {
    let arch = tiny_arch("llama", false, 10_000.0);
    let w = random_weights(&arch, 31);
    let m = load(&arch, &w, device)?;
    let ids = Tensor::from_vec(random_tokens(2 * 7, 320, 7), (2, 7), device)?;
    let mut h = m.embed(&ids)?;
    assert_eq!(h.dims(), &[2, 7, 64]);
    for i in 0..arch.num_layers {
        let x = m.attn_input(i, &h)?;
        let core = m.attn_core(i, &x)?;
        assert_eq!(core.dims(), &[2, 7, 64]);
        let h2 = m.attn_out(i, &h, &core)?;
        let mc = m.mlp_core(i, &m.mlp_input(i, &h2)?)?;
        assert_eq!(mc.dims(), &[2, 7, 160]);
        let next = m.mlp_out(i, &h2, &mc)?;
        assert_close(
            "layer_forward vs stages",
            &flat(&m.layer_forward(i, &h)?)?,
            &flat(&next)?,
            0.0,
        );
        h = next;
    }
    assert_close(
        "forward vs logits(stages)",
        &flat(&m.forward(&ids)?)?,
        &flat(&m.logits(&h)?)?,
        0.0,
    );
    // Causality: changing the last token leaves earlier positions' logits unchanged.
    let mut toks = random_tokens(7, 320, 8);
    let a = m.forward(&Tensor::from_slice(&toks, (1, 7), device)?)?;
    toks[6] = (toks[6] + 1) % 320;
    let b = m.forward(&Tensor::from_slice(&toks, (1, 7), device)?)?;
    assert_close(
        "causal prefix",
        &flat(&a.narrow(1, 0, 6)?)?,
        &flat(&b.narrow(1, 0, 6)?)?,
        1e-6,
    );
    Ok(())
}
test_device!(
    staged_api_composes,
    staged_api_composes_cpu,
    staged_api_composes_cuda
);

fn set_weight_and_errors(device: &Device) -> Result<()> {
    let arch = tiny_arch("llama", true, 10_000.0);
    let w = random_weights(&arch, 41);
    let mut m = load(&arch, &w, device)?;
    let name = "model.layers.1.mlp.down_proj.weight";
    let new: Vec<f32> = w[name].iter().map(|v| v * 0.5).collect();
    let before = m.forward(&Tensor::from_slice(&[1u32, 2, 3], (1, 3), device)?)?;
    m.set_weight(name, &new)?;
    assert_eq!(m.weight(name)?.dims(), &[64, 160]);
    assert_eq!(flat(&m.weight(name)?)?, new);
    let after = m.forward(&Tensor::from_slice(&[1u32, 2, 3], (1, 3), device)?)?;
    assert_ne!(flat(&before)?, flat(&after)?);

    assert!(matches!(
        m.set_weight(name, &new[1..]),
        Err(Error::ShapeMismatch {
            expected: 10240,
            got: 10239,
            ..
        })
    ));
    assert!(matches!(
        m.set_weight("lm_head.weight", &[0.0]),
        Err(Error::InvalidModel(_))
    ));
    assert!(matches!(
        m.weight("model.layers.2.mlp.up_proj.weight"),
        Err(Error::InvalidModel(_))
    ));
    assert!(matches!(
        m.weight("model.layers.0.self_attn.q_proj.bias"),
        Err(Error::InvalidModel(_))
    ));
    // Loading refuses a tensor of the wrong size.
    let mut bad = w.clone();
    if let Some(v) = bad.get_mut("model.norm.weight") {
        v.pop();
    }
    let e = load(&arch, &bad, device).unwrap_err();
    assert!(e.to_string().contains("model.norm.weight"), "{e}");
    // Evaluation refuses ids outside the vocabulary and windows that do not fit.
    let e = m.perplexity(&[1, 2, 320, 4], 4, None).unwrap_err();
    assert!(matches!(e, Error::Calibration(_)), "{e}");
    let e = m.perplexity(&[1, 2, 3], 4, None).unwrap_err();
    assert!(matches!(e, Error::Calibration(_)), "{e}");
    assert!(m.perplexity(&[1, 2, 3, 4], 1, None).is_err());
    Ok(())
}
test_device!(
    set_weight_and_errors,
    set_weight_and_errors_cpu,
    set_weight_and_errors_cuda
);

/// Log-softmax of each row of `[rows, vocab]` logits, in f64.
fn log_softmax_rows(logits: &[f32], vocab: usize) -> Vec<Vec<f64>> {
    logits
        .chunks(vocab)
        .map(|row| {
            let max = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let lse = max
                + row
                    .iter()
                    .map(|&v| (f64::from(v) - max).exp())
                    .sum::<f64>()
                    .ln();
            row.iter().map(|&v| f64::from(v) - lse).collect()
        })
        .collect()
}

fn perplexity_and_kl_match_host(device: &Device) -> Result<()> {
    let arch = tiny_arch("qwen2", false, 1_000_000.0);
    let w = random_weights(&arch, 51);
    let p = load(&arch, &w, device)?;
    let mut q = p.clone();
    let name = "model.layers.0.mlp.up_proj.weight";
    q.set_weight(name, &w[name].iter().map(|v| v * 0.8).collect::<Vec<_>>())?;
    let (seq, vocab) = (9, 320);
    // Three full windows and a partial one; at most two are used.
    let toks = random_tokens(3 * seq + 4, vocab, 9);

    let mut nll = 0f64;
    let mut kl = 0f64;
    for win in toks.chunks_exact(seq).take(2) {
        let ids = Tensor::from_slice(win, (1, seq), device)?;
        let lp = log_softmax_rows(&flat(&p.forward(&ids)?)?, vocab);
        let lq = log_softmax_rows(&flat(&q.forward(&ids)?)?, vocab);
        for pos in 0..seq - 1 {
            nll -= lp[pos][win[pos + 1] as usize];
        }
        for pos in 0..seq {
            kl += (0..vocab)
                .map(|v| lp[pos][v].exp() * (lp[pos][v] - lq[pos][v]))
                .sum::<f64>();
        }
    }
    let nll = nll / (2 * (seq - 1)) as f64;
    let kl = kl / (2 * seq) as f64;

    let r = p.perplexity(&toks, seq, Some(2))?;
    assert_eq!(r.tokens, 2 * (seq - 1));
    assert!((r.nll - nll).abs() < 1e-5, "nll {} vs host {nll}", r.nll);
    assert!(
        (r.ppl - nll.exp()).abs() < 1e-4 * nll.exp(),
        "ppl {} vs host {}",
        r.ppl,
        nll.exp()
    );
    assert!(r.ppl > 1.0 && r.ppl.is_finite());
    let all = p.perplexity(&toks, seq, None)?;
    assert_eq!(all.tokens, 3 * (seq - 1));

    let got = kl_divergence(&p, &q, &toks, seq, Some(2))?;
    assert!(
        kl > 1e-4,
        "the perturbation should move the distribution, kl {kl}"
    );
    assert!((got - kl).abs() < 1e-5 + 1e-4 * kl, "kl {got} vs host {kl}");
    let same = kl_divergence(&p, &p, &toks, seq, None)?;
    assert!(same.abs() < 1e-6, "KL(p || p) = {same}");
    Ok(())
}
test_device!(
    perplexity_and_kl_match_host,
    perplexity_and_kl_match_host_cpu,
    perplexity_and_kl_match_host_cuda
);

fn primitive_kernels_match_fused(device: &Device) -> Result<()> {
    let cases = [
        ("llama", false, 10_000.0),
        ("llama", true, 10_000.0),
        ("qwen2", true, 1_000_000.0),
    ];
    for (i, &(model_type, tied, theta)) in cases.iter().enumerate() {
        // Widths that are not powers of two (hidden 96, ffn 200), where dividing by the width and
        // multiplying by its reciprocal round differently.
        let arch = ArchConfig::from_json(&serde_json::json!({
            "model_type": model_type, "hidden_size": 96, "intermediate_size": 200,
            "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 3,
            "vocab_size": 320, "rms_norm_eps": 1e-5, "rope_theta": theta,
            "tie_word_embeddings": tied
        }))?;
        let w = random_weights(&arch, 101 + i as u64);
        let mut m = load(&arch, &w, device)?;
        assert_eq!(m.kernels(), Kernels::Fused);
        let (b, t) = (3, 37);
        let ids = Tensor::from_vec(random_tokens(b * t, 320, 102 + i as u64), (b, t), device)?;
        let fused = m.forward(&ids)?;
        let loss_fused = m.next_token_loss(&ids)?.to_scalar::<f32>()?;
        m.set_kernels(Kernels::Primitive);
        let primitive = m.forward(&ids)?;
        let loss_primitive = m.next_token_loss(&ids)?.to_scalar::<f32>()?;
        let what = format!("{model_type} tied={tied}: fused vs primitive");
        let tol = if device.is_cpu() {
            0.0
        } else {
            DZ_MAX_LOGIT_DIFF_FUSED_VS_PRIMITIVE_CUDA
        };
        let worst = assert_close(&what, &flat(&fused)?, &flat(&primitive)?, tol);
        println!("{what}: max |logit diff| {worst:e}");
        // The loss is perplexity's mean NLL over the same windows.
        let nll = m.perplexity(&flat_ids(&ids)?, t, None)?.nll;
        for loss in [loss_fused, loss_primitive] {
            assert!(
                (f64::from(loss) - nll).abs() < 1e-5 * nll,
                "{what}: loss {loss} vs perplexity's nll {nll}"
            );
        }
    }
    Ok(())
}
test_device!(
    primitive_kernels_match_fused,
    primitive_kernels_match_fused_cpu,
    primitive_kernels_match_fused_cuda
);

fn flat_ids(ids: &Tensor) -> Result<Vec<u32>> {
    Ok(ids.flatten_all()?.to_vec1::<u32>()?)
}

/// Sets every variable to `base + eps * dir` and returns the loss.
fn loss_at(
    m: &LlamaModel,
    vars: &HashMap<String, Var>,
    base: &HashMap<String, Tensor>,
    dir: &HashMap<String, Tensor>,
    eps: f64,
    ids: &Tensor,
) -> Result<f64> {
    for (name, v) in vars {
        v.set(&(&base[name] + (&dir[name] * eps)?)?)?;
    }
    Ok(f64::from(m.next_token_loss(ids)?.to_scalar::<f32>()?))
}

fn gradients_match_finite_differences(device: &Device) -> Result<()> {
    for (model_type, tied) in [("llama", true), ("qwen2", false)] {
        let arch = tiny_arch(model_type, tied, 10_000.0);
        let w = random_weights(&arch, 111 + tied as u64);
        let vars = load(&arch, &w, device)?.to_vars()?;
        let names: Vec<String> = arch.tensor_shapes().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            vars.len(),
            names.len(),
            "one variable per tensor (tied: one)"
        );
        let m = LlamaModel::from_vars(&arch, &vars)?;
        assert_eq!(m.kernels(), Kernels::Primitive);
        let ids = Tensor::from_vec(random_tokens(2 * 9, 320, 112), (2, 9), device)?;

        let grads = m.next_token_loss(&ids)?.backward()?;
        // Every weight gets a finite, non-zero gradient: none is cut off by an op without a backward.
        let mut g_dot_dir = 0f64;
        let mut rng = StdRng::seed_from_u64(113);
        let mut dir = HashMap::new();
        let mut base = HashMap::new();
        for name in &names {
            let v = &vars[name];
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{model_type} tied={tied}: no gradient for {name}"));
            let gv = flat(g)?;
            assert!(
                gv.iter().all(|x| x.is_finite()),
                "{name}: non-finite gradient"
            );
            assert!(gv.iter().any(|&x| x != 0.0), "{name}: all-zero gradient");
            let d: Vec<f32> = (0..gv.len()).map(|_| rng.gen_range(-1f32..1.0)).collect();
            g_dot_dir += gv
                .iter()
                .zip(&d)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum::<f64>();
            dir.insert(name.clone(), Tensor::from_vec(d, v.shape(), device)?);
            base.insert(name.clone(), v.as_tensor().copy()?);
        }
        // Autograd's directional derivative against a central difference along the same random direction.
        let eps = 1e-3;
        let fd = (loss_at(&m, &vars, &base, &dir, eps, &ids)?
            - loss_at(&m, &vars, &base, &dir, -eps, &ids)?)
            / (2.0 * eps);
        loss_at(&m, &vars, &base, &dir, 0.0, &ids)?;
        let rel = (fd - g_dot_dir).abs() / g_dot_dir.abs().max(1e-6);
        println!("{model_type} tied={tied}: <grad, dir> {g_dot_dir:.6}, finite difference {fd:.6}, rel {rel:.2e}");
        assert!(
            rel <= DZ_GRAD_FD_REL_TOL,
            "{model_type} tied={tied}: <grad, dir> {g_dot_dir}, finite difference {fd}, rel {rel} > {DZ_GRAD_FD_REL_TOL}"
        );

        // With the fused kernels, gradients stop at RMSNorm: the first layer's norm gets none.
        let mut fused = m.clone();
        fused.set_kernels(Kernels::Fused);
        let grads = fused.next_token_loss(&ids)?.backward()?;
        assert!(grads
            .get(vars["model.layers.0.input_layernorm.weight"].as_tensor())
            .is_none());
    }
    Ok(())
}
test_device!(
    gradients_match_finite_differences,
    gradients_match_finite_differences_cpu,
    gradients_match_finite_differences_cuda
);

#[test]
fn load_with_refuses_wrong_tensors() -> Result<()> {
    let arch = tiny_arch("llama", true, 10_000.0);
    let w = random_weights(&arch, 121);
    let device = Device::Cpu;
    let m = load(&arch, &w, &device)?;
    // Round trip through tensors(): same weights, same logits.
    let named: HashMap<String, Tensor> = m.tensors().into_iter().collect();
    assert_eq!(named.len(), arch.tensor_shapes().len());
    let again = LlamaModel::load_with(&arch, &device, |n, _| Ok(named[n].clone()))?;
    let ids = Tensor::from_slice(&[3u32, 1, 4, 1, 5], (1, 5), &device)?;
    assert_eq!(flat(&m.forward(&ids)?)?, flat(&again.forward(&ids)?)?);
    // Wrong dtype, wrong shape, a missing variable.
    let e = LlamaModel::load_with(&arch, &device, |n, _| Ok(named[n].to_dtype(DType::F64)?))
        .unwrap_err();
    assert!(e.to_string().contains("model.embed_tokens.weight"), "{e}");
    let e = LlamaModel::load_with(&arch, &device, |n, _| {
        let t = &named[n];
        Ok(if n == "model.norm.weight" {
            t.narrow(0, 0, 63)?
        } else {
            t.clone()
        })
    })
    .unwrap_err();
    assert!(e.to_string().contains("model.norm.weight"), "{e}");
    let mut vars = m.to_vars()?;
    vars.remove("model.layers.1.mlp.up_proj.weight");
    let e = LlamaModel::from_vars(&arch, &vars).unwrap_err();
    assert!(
        e.to_string().contains("model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
    Ok(())
}

/// What the compress callback saw for one group.
struct Seen {
    layer: usize,
    names: Vec<String>,
    cols: usize,
    h: Vec<f32>,
}

/// Calibrates a copy of `w`'s model, installing `edit(name, weights)` for every linear; returns what each
/// call saw, the progress reports, the final hidden states and the weights left installed.
#[allow(clippy::type_complexity)]
fn run_calibration(
    arch: &ArchConfig,
    w: &HashMap<String, Vec<f32>>,
    samples: &[Vec<u32>],
    batch: usize,
    device: &Device,
    edit: impl Fn(&str, &[f32]) -> Vec<f32>,
) -> Result<(Vec<Seen>, Vec<Progress>, Tensor, HashMap<String, Vec<f32>>)> {
    let mut model = load(arch, w, device)?;
    let mut seen = Vec::new();
    let mut reports = Vec::new();
    let mut installed = w.clone();
    let hidden = calibrate(
        &mut model,
        samples,
        batch,
        |layer, names, h, cols| {
            seen.push(Seen {
                layer,
                names: names.to_vec(),
                cols,
                h: h.to_vec(),
            });
            Ok(names
                .iter()
                .map(|n| {
                    let new = edit(n, &w[n]);
                    installed.insert(n.clone(), new.clone());
                    (n.clone(), new)
                })
                .collect())
        },
        |p| reports.push(p),
    )?;
    Ok((seen, reports, hidden, installed))
}

/// The hidden states of `m` on `samples`, batch by batch, concatenated.
fn plain_hidden(m: &LlamaModel, samples: &[Vec<u32>], batch: usize) -> Result<Tensor> {
    let mut out = Vec::new();
    for chunk in samples.chunks(batch) {
        let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (chunk.len(), chunk[0].len()), m.device())?;
        out.push(m.hidden(&ids)?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

fn calibration_samples(n: usize, seq: usize, seed: u64) -> Vec<Vec<u32>> {
    random_tokens(n * seq, 320, seed)
        .chunks(seq)
        .map(<[u32]>::to_vec)
        .collect()
}

fn calibration_identity_is_forward(device: &Device) -> Result<()> {
    let arch = tiny_arch("qwen2", true, 1_000_000.0);
    let w = random_weights(&arch, 61);
    // Five samples in batches of two: the last batch is short.
    let samples = calibration_samples(5, 10, 10);
    let (seen, reports, hidden, _) =
        run_calibration(&arch, &w, &samples, 2, device, |_, v| v.to_vec())?;

    let want = plain_hidden(&load(&arch, &w, device)?, &samples, 2)?;
    assert_eq!(hidden.dims(), &[5, 10, 64]);
    let d = assert_close(
        "identity calibration vs forward",
        &flat(&hidden)?,
        &flat(&want)?,
        1e-5,
    );
    println!("identity calibration: max |hidden diff| vs forward {d:e}");

    // Groups in order, with their input widths.
    let mut expected = Vec::new();
    for i in 0..arch.num_layers {
        let groups = arch.linear_groups(i);
        for (g, cols) in groups.into_iter().zip([64, 64, 64, 160]) {
            expected.push((i, g, cols));
        }
    }
    let got: Vec<_> = seen
        .iter()
        .map(|s| (s.layer, s.names.clone(), s.cols))
        .collect();
    assert_eq!(got, expected);
    assert!(seen[0].names[0].ends_with("q_proj.weight"));
    assert!(seen[3].names[0].ends_with("down_proj.weight"));
    for s in &seen {
        assert_eq!(s.h.len(), s.cols * s.cols);
    }
    let want_reports: Vec<_> = (0..8)
        .map(|k| Progress {
            layer: k / 4,
            group: k % 4,
            done: k + 1,
            total: 8,
        })
        .collect();
    assert_eq!(reports, want_reports);
    Ok(())
}
test_device!(
    calibration_identity_is_forward,
    calibration_identity_is_forward_cpu,
    calibration_identity_is_forward_cuda
);

/// `2/n * sum(x x^T)` over the rows of `x` (`[.., cols]`), in f64 on the host.
fn host_hessian(xs: &[Tensor], cols: usize) -> Result<Vec<f64>> {
    let mut h = vec![0f64; cols * cols];
    let mut n = 0usize;
    for x in xs {
        let v = flat(x)?;
        for row in v.chunks(cols) {
            n += 1;
            for i in 0..cols {
                let a = f64::from(row[i]);
                for j in 0..cols {
                    h[i * cols + j] += a * f64::from(row[j]);
                }
            }
        }
    }
    Ok(h.into_iter().map(|v| 2.0 * v / n as f64).collect())
}

fn calibration_feeds_compressed_activations(device: &Device) -> Result<()> {
    let arch = tiny_arch("llama", false, 10_000.0);
    let w = random_weights(&arch, 71);
    let samples = calibration_samples(6, 11, 12);
    let batch = 4;
    // A coarse "compression": round every weight to a grid of 1/8 of its tensor's max magnitude.
    let round = |_: &str, v: &[f32]| -> Vec<f32> {
        let step = v.iter().fold(0f32, |m, x| m.max(x.abs())) / 8.0;
        v.iter().map(|x| (x / step).round() * step).collect()
    };
    let (seen, _, hidden, installed) = run_calibration(&arch, &w, &samples, batch, device, round)?;
    let (seen_id, _, _, _) =
        run_calibration(&arch, &w, &samples, batch, device, |_, v| v.to_vec())?;

    // The model calibration leaves behind, loaded afresh.
    let fin = load(&arch, &installed, device)?;
    let want = plain_hidden(&fin, &samples, batch)?;
    let d = assert_close(
        "calibrated hidden vs final model",
        &flat(&hidden)?,
        &flat(&want)?,
        1e-5,
    );
    println!("rounded calibration: max |hidden diff| vs final model {d:e}");

    // Each group's Hessian equals the direct one from its inputs in the final model: a group's input depends
    // only on the groups before it, which calibration had already replaced.
    let mut k = 0;
    for i in 0..arch.num_layers {
        let mut inputs: [Vec<Tensor>; 4] = Default::default();
        for chunk in samples.chunks(batch) {
            let flat_ids: Vec<u32> = chunk.iter().flatten().copied().collect();
            let ids = Tensor::from_vec(flat_ids, (chunk.len(), 11), device)?;
            let mut h = fin.embed(&ids)?;
            for j in 0..i {
                h = fin.layer_forward(j, &h)?;
            }
            let x0 = fin.attn_input(i, &h)?;
            let core = fin.attn_core(i, &x0)?;
            let h2 = fin.attn_out(i, &h, &core)?;
            let x2 = fin.mlp_input(i, &h2)?;
            let m = fin.mlp_core(i, &x2)?;
            for (slot, x) in inputs.iter_mut().zip([x0, core, x2, m]) {
                slot.push(x);
            }
        }
        for xs in &inputs {
            let s = &seen[k];
            let direct = host_hessian(xs, s.cols)?;
            let scale = direct.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (idx, (&got, &want)) in s.h.iter().zip(&direct).enumerate() {
                let err = (f64::from(got) - want).abs();
                assert!(
                    err <= DZ_HESSIAN_REL_TOL * scale,
                    "layer {i} group {:?}: H[{idx}] = {got}, expected {want}, |diff| {err} > {} (rel tol \
                     {DZ_HESSIAN_REL_TOL} x max {scale})",
                    s.names,
                    DZ_HESSIAN_REL_TOL * scale
                );
            }
            // Exactly symmetric, nonnegative diagonal, v^T H v >= 0 for random v (up to rounding).
            let c = s.cols;
            for a in 0..c {
                assert!(s.h[a * c + a] >= 0.0);
                for b in 0..a {
                    assert_eq!(s.h[a * c + b], s.h[b * c + a], "H[{a},{b}] != H[{b},{a}]");
                }
            }
            let mut rng = StdRng::seed_from_u64(k as u64);
            for _ in 0..8 {
                let v: Vec<f64> = (0..c).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let mut quad = 0f64;
                let mut norm = 0f64;
                for a in 0..c {
                    norm += v[a] * v[a];
                    for b in 0..c {
                        quad += v[a] * f64::from(s.h[a * c + b]) * v[b];
                    }
                }
                assert!(quad >= -1e-5 * scale * norm, "v^T H v = {quad}");
            }
            k += 1;
        }
    }

    // Compressed activations feed forward: from the o group of layer 0 on, Hessians differ from the
    // uncompressed run; the very first group (embeddings only) is identical.
    assert_eq!(seen[0].h, seen_id[0].h);
    for (s, s0) in seen.iter().zip(&seen_id).skip(1) {
        assert_ne!(s.h, s0.h, "{:?}", s.names);
    }
    Ok(())
}
test_device!(
    calibration_feeds_compressed_activations,
    calibration_feeds_compressed_activations_cpu,
    calibration_feeds_compressed_activations_cuda
);

#[test]
fn calibration_refuses_bad_input() -> Result<()> {
    let arch = tiny_arch("llama", true, 10_000.0);
    let w = random_weights(&arch, 81);
    let device = Device::Cpu;
    let mut m = load(&arch, &w, &device)?;
    let ok = |_: usize, _: &[String], _: &[f32], _: usize| Ok(Vec::new());
    let e = calibrate(&mut m, &[], 8, ok, |_| ()).unwrap_err();
    assert!(matches!(e, Error::Calibration(_)), "{e}");
    let e = calibrate(&mut m, &[vec![1, 2, 3], vec![1, 2]], 8, ok, |_| ()).unwrap_err();
    assert!(e.to_string().contains("sample 1"), "{e}");
    let e = calibrate(&mut m, &[vec![1, 2, 999]], 8, ok, |_| ()).unwrap_err();
    assert!(e.to_string().contains("999"), "{e}");
    let e = calibrate(&mut m, &[vec![1, 2, 3]], 0, ok, |_| ()).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
    // A compressor that answers for a tensor outside the group.
    let foreign = |_: usize, _: &[String], _: &[f32], _: usize| {
        Ok(vec![("model.norm.weight".to_string(), vec![1.0; 64])])
    };
    let e = calibrate(&mut m, &[vec![1, 2, 3]], 8, foreign, |_| ()).unwrap_err();
    assert!(e.to_string().contains("model.norm.weight"), "{e}");
    // A compressor's own error comes back as is.
    let failing =
        |_: usize, _: &[String], _: &[f32], _: usize| Err(Error::InvalidConfig("nope".into()));
    let e = calibrate(&mut m, &[vec![1, 2, 3]], 8, failing, |_| ()).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    // The accumulator refuses a mismatched width and an empty finish.
    let mut acc = HessianAccumulator::new(4);
    assert!(acc
        .add(&Tensor::zeros((2, 3), DType::F32, &device)?)
        .is_err());
    assert!(HessianAccumulator::new(4).finish().is_err());
    Ok(())
}

/// SmolLM2-135M shapes (hidden 576, 9 heads / 3 kv, ffn 1536, vocab 49152) with 128 x 512 tokens, over
/// `DZ_CALIB_LAYERS` layers (default 2; the real model has 30): prints seconds per layer.
/// `cargo test --release -p dz-compress --test model -- --ignored --nocapture calibration_timing`
#[test]
#[ignore = "timing, minutes on 2 cores"]
fn calibration_timing_smollm2_shapes() -> Result<()> {
    let layers: usize = std::env::var("DZ_CALIB_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let arch = ArchConfig::from_json(&serde_json::json!({
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": layers, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": true
    }))?;
    let w = random_weights(&arch, 91);
    let mut m = load(&arch, &w, &Device::Cpu)?;
    let samples: Vec<Vec<u32>> = random_tokens(128 * 512, 49152, 92)
        .chunks(512)
        .map(<[u32]>::to_vec)
        .collect();
    let start = std::time::Instant::now();
    let mut last = start;
    calibrate(
        &mut m,
        &samples,
        8,
        |_, names, _, _| Ok(names.iter().map(|n| (n.clone(), w[n].clone())).collect()),
        |p| {
            let now = std::time::Instant::now();
            println!(
                "layer {} group {} ({}/{}): {:.1}s",
                p.layer,
                p.group,
                p.done,
                p.total,
                (now - last).as_secs_f64()
            );
            last = now;
        },
    )?;
    let s = start.elapsed().as_secs_f64();
    println!(
        "{layers} layers: {s:.1}s, {:.1}s per layer, ~{:.0}s for 30",
        s / layers as f64,
        30.0 * s / layers as f64
    );
    Ok(())
}

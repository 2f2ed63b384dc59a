//! DeltaLinear: a mixed batch of rows for several fine-tunes and the base gives each row what the
//! fine-tune's own (merged) weights give it, through the host's row-tags scope.

use crate::common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{max_diff, q, write_config};
use dz_compress::hf::HfModel;
use dz_compress::merge::Applied;
use dz_loader::{CheckedDelta, Config, DeltaRegistry, FineTuneDeltas};
use mistralrs_quant::{with_row_tags, QuantMethod, QuantMethodConfig, RowTags, UnquantLinear};

const TOL: f32 = 1e-4;

fn config(f: &common::Fixture) -> String {
    let mut text = format!("[base]\npath = {}\n", q(&f.family.base));
    for (i, d) in f.deltas8.iter().enumerate() {
        text += &format!("[[delta]]\nname = \"ft-{i}\"\npath = {}\n", q(d));
    }
    text
}

/// Every delta of the config, resident.
fn registry(deltas: &[CheckedDelta], tied_head: bool) -> Arc<DeltaRegistry> {
    let r = Arc::new(DeltaRegistry::new());
    for d in deltas {
        let ft = FineTuneDeltas::load(&d.spec.name, &d.file, &Device::Cpu, tied_head).unwrap();
        r.insert(Arc::new(ft));
    }
    r
}

fn tensor(values: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn linear(w: Tensor, b: Option<Tensor>) -> Arc<dyn QuantMethod> {
    Arc::new(
        <UnquantLinear as QuantMethod>::new(QuantMethodConfig::Unquantized(
            candle_nn::Linear::new(w, b),
        ))
        .unwrap(),
    )
}

/// Checks layer `layer` of the fixture: rows tagged with fine-tune names (or nothing) against each
/// fine-tune's merged weights.
fn check_layer(f: &common::Fixture, layer: &str, with_bias: bool) {
    let (_dir, file) = write_config(&config(f));
    let (_, deltas) = Config::load(&file).unwrap();
    let set = registry(&deltas, false);
    let ft1 = set.get("ft-1").unwrap();
    assert!(
        ft1.module_names().contains(&layer),
        "{:?}",
        ft1.module_names()
    );

    let base = HfModel::open(&f.family.base).unwrap();
    let wname = format!("{layer}.weight");
    let bname = format!("{layer}.bias");
    let shape = base.info(&wname).unwrap().shape;
    let (n, k) = (shape[0], shape[1]);
    let w = tensor(base.to_f32(&wname).unwrap(), &[n, k]);
    let b = with_bias.then(|| tensor(base.to_f32(&bname).unwrap(), &[n]));
    let wrapped = set.wrap_layer(layer, linear(w.clone(), b.clone()));
    assert_eq!(wrapped.name(), "deltazip-delta-linear");

    // Each fine-tune's own layer, from base + delta merged on the host.
    let merged: Vec<Arc<dyn QuantMethod>> = f
        .deltas8
        .iter()
        .map(|d| {
            let a = Applied::open(&f.family.base, d).unwrap();
            let w = tensor(a.tensor_f32(&wname).unwrap(), &[n, k]);
            let b = with_bias.then(|| tensor(a.tensor_f32(&bname).unwrap(), &[n]));
            linear(w, b)
        })
        .collect();
    let plain = linear(w, b);

    let batch_tags: Vec<Option<&str>> =
        vec![Some("ft-1"), None, Some("ft-0"), Some("ft-1"), Some("nope")];
    let x = Tensor::randn(0f32, 1.0, (batch_tags.len(), 3, k), &Device::Cpu).unwrap();
    let tags: RowTags = batch_tags
        .iter()
        .map(|t| t.map(Arc::<str>::from))
        .collect::<Vec<_>>()
        .into();

    // No scope: exactly the base layer.
    let y_base = plain.forward(&x).unwrap();
    assert_eq!(max_diff(&wrapped.forward(&x).unwrap(), &y_base), 0.0);

    let y = with_row_tags(Some(tags), || wrapped.forward(&x)).unwrap();
    assert_eq!(y.dims(), y_base.dims());
    for (r, t) in batch_tags.iter().enumerate() {
        let xr = x.narrow(0, r, 1).unwrap();
        let want = match t
            .and_then(|t| t.strip_prefix("ft-"))
            .and_then(|i| i.parse::<usize>().ok())
        {
            Some(i) => merged[i].forward(&xr).unwrap(),
            None => plain.forward(&xr).unwrap(),
        };
        let got = y.narrow(0, r, 1).unwrap();
        let d = max_diff(&got, &want);
        assert!(d <= TOL, "{layer} row {r} ({t:?}): max diff {d} > {TOL}");
    }
    // The fine-tunes do differ from the base on this layer (the test is not vacuous).
    let x0 = x.narrow(0, 0, 1).unwrap();
    assert!(
        max_diff(
            &merged[1].forward(&x0).unwrap(),
            &plain.forward(&x0).unwrap()
        ) > 10.0 * TOL
    );
}

#[test]
fn mixed_batch_rows_get_their_own_fine_tune_llama() {
    let f = common::llama();
    for layer in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "lm_head",
    ] {
        check_layer(f, layer, false);
    }
}

#[test]
fn mixed_batch_rows_get_their_own_fine_tune_with_bias_deltas_qwen2() {
    let f = common::qwen2_two();
    check_layer(f, "model.layers.0.self_attn.k_proj", true);
    check_layer(f, "model.layers.1.mlp.gate_proj", false);
}

/// Half-precision activations (f16: candle's CPU matmul has no bf16) give the f32 result, rounded.
#[test]
fn f16_activations() {
    let f = common::llama();
    let (_dir, file) = write_config(&config(f));
    let (_, deltas) = Config::load(&file).unwrap();
    let set = registry(&deltas, false);
    let base = HfModel::open(&f.family.base).unwrap();
    let layer = "model.layers.0.mlp.up_proj";
    let shape = base.info(&format!("{layer}.weight")).unwrap().shape;
    let w = tensor(base.to_f32(&format!("{layer}.weight")).unwrap(), &shape);
    let wrapped32 = set.wrap_layer(layer, linear(w.clone(), None));
    let wrapped16 = set.wrap_layer(layer, linear(w.to_dtype(DType::F16).unwrap(), None));
    let x = Tensor::randn(0f32, 1.0, (3, 2, shape[1]), &Device::Cpu).unwrap();
    let tags: RowTags = vec![
        Some(Arc::<str>::from("ft-0")),
        None,
        Some(Arc::<str>::from("ft-1")),
    ]
    .into();
    let y32 = with_row_tags(Some(tags.clone()), || wrapped32.forward(&x)).unwrap();
    let x16 = x.to_dtype(DType::F16).unwrap();
    let y16 = with_row_tags(Some(tags), || wrapped16.forward(&x16)).unwrap();
    assert_eq!(y16.dtype(), DType::F16);
    let d = max_diff(&y16.to_dtype(DType::F32).unwrap(), &y32);
    assert!(d < 0.05, "f16 vs f32: {d}");
}

/// Fine-tunes come and go at run time: a row whose fine-tune is not resident gets the base, and gets its
/// fine-tune again once the deltas are back.
#[test]
fn registry_changes_are_seen_by_the_next_forward() {
    let f = common::llama();
    let (_dir, file) = write_config(&config(f));
    let (_, deltas) = Config::load(&file).unwrap();
    let set = registry(&deltas, false);
    let base = HfModel::open(&f.family.base).unwrap();
    let layer = "model.layers.1.self_attn.v_proj";
    let shape = base.info(&format!("{layer}.weight")).unwrap().shape;
    let w = tensor(base.to_f32(&format!("{layer}.weight")).unwrap(), &shape);
    let plain = linear(w.clone(), None);
    let wrapped = set.wrap_layer(layer, linear(w, None));
    let x = Tensor::randn(0f32, 1.0, (2, 1, shape[1]), &Device::Cpu).unwrap();
    let tags: RowTags = vec![Some(Arc::<str>::from("ft-0")), None].into();
    let run = || with_row_tags(Some(tags.clone()), || wrapped.forward(&x)).unwrap();
    let y_base = plain.forward(&x).unwrap();
    let with = run();
    assert!(max_diff(&with, &y_base) > 10.0 * TOL);
    let removed = set.remove("ft-0").unwrap();
    assert_eq!(set.names(), ["ft-1"]);
    assert_eq!(max_diff(&run(), &y_base), 0.0);
    set.insert(removed);
    assert_eq!(max_diff(&run(), &with), 0.0);
    assert_eq!(set.widest_batch(), 1);
}

/// The CPU tier reads a delta's tensors in parallel; a file with two corrupt tensors still fails on the
/// first of them in file order, by name, whatever order the threads finish in.
#[test]
fn a_corrupt_delta_names_its_first_bad_tensor() {
    let f = common::llama();
    let full = std::fs::read(&f.deltas8[0]).unwrap();
    let file = dz_format::DeltaFile::open(&f.deltas8[0]).unwrap();
    let manifest = file.manifest().clone();
    // Two tensors with stored parts, the later one corrupted too.
    let stored: Vec<usize> = (0..manifest.tensors.len())
        .filter(|&i| !manifest.tensors[i].parts.is_empty())
        .collect();
    assert!(stored.len() >= 6, "{} stored tensors", stored.len());
    let (first, later) = (stored[2], stored[stored.len() - 2]);
    let n = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&full[8..8 + n]).unwrap();
    let mut bytes = full.clone();
    for i in [later, first] {
        let t = &manifest.tensors[i];
        let key = format!("{}:{}", t.name, t.parts[0].name);
        let off = 8 + n + header[&key]["data_offsets"][0].as_u64().unwrap() as usize;
        bytes[off] ^= 0x5a;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.dz");
    std::fs::write(&path, bytes).unwrap();
    let corrupt = dz_format::DeltaFile::open(&path).unwrap();
    for _ in 0..3 {
        let e = dz_loader::HostDelta::read("ft-0", &corrupt)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&manifest.tensors[first].name), "{e}");
        assert!(!e.contains(&manifest.tensors[later].name), "{e}");
    }
    // The intact file reads.
    dz_loader::HostDelta::read("ft-0", &file).unwrap();
}

//! `dequantize` (bit-exact), `merge`, `embedding_delta_add` against the reference twins, and the
//! `DeviceDelta` constructors from a real delta file.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use common::*;
use dz_candle_ops::reference::{self, Tolerance, DZ_EXACT};
use dz_candle_ops::{
    dequantize, embedding_delta_add, embedding_delta_add_unchecked, merge, DeviceDelta,
};
use dz_format::fingerprint::tensor_hash;
use dz_format::{
    BaseFingerprint, DeltaFile, DeltaWriter, Dtype, EncodedTensor, Lossless, Recipe, Role,
};

#[test]
fn dequantize_is_bit_exact() {
    let mut t = Tester::new("dequantize");
    for spec in dequantize_specs() {
        let config = spec.label();
        t.expect(config.clone());
        let d = spec.build(&Device::Cpu);
        let got = dequantize(&d).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let want = reference::dequantize(&d).unwrap();
        t.record(
            config.clone(),
            assert_close(&config, &got, &want, None, &DZ_EXACT),
        );
    }
    // Row subsets: rows not stored are zero.
    let index = [1u32, 2, 7];
    let d = subset_delta(Cfg::Sign1, 9, &index, 40, 3);
    let got = dequantize(&d).unwrap();
    assert_eq!(got.dims(), &[9, 40]);
    for (r, row) in got.to_vec2::<f32>().unwrap().iter().enumerate() {
        let stored = index.contains(&(r as u32));
        assert_eq!(row.iter().any(|&v| v != 0.0), stored, "row {r}");
    }
    t.finish();
}

#[test]
fn merge_matches_reference() {
    let mut t = Tester::new("merge");
    for case in merge_cases() {
        let config = format!(
            "{} {:?} base {:?}",
            case.delta.label(),
            case.dtype,
            case.dims
        );
        t.expect(config.clone());
        let d = case.delta.build(&Device::Cpu);
        let base = input(&case.dims, case.dtype, case.base_seed);
        let got = merge(&base, &d).unwrap();
        assert_eq!(got.dims(), case.dims.as_slice());
        let want = reference::merge(&base, &d).unwrap();
        let mag = merge_magnitude(&base, &d);
        let tol = Tolerance::for_dtype(case.dtype);
        t.record(
            config.clone(),
            assert_close(&config, &got, &want, Some(&mag), &tol),
        );
    }
    t.finish();
}

#[test]
fn embedding_delta_add_matches_reference() {
    let mut t = Tester::new("embedding");
    for case in embedding_cases() {
        let config = case.label();
        t.expect(config.clone());
        let d = case.delta.build(&Device::Cpu);
        let (ids, base) = (case.ids(), case.base());
        let got = embedding_delta_add(&ids, &base, &d).unwrap();
        let want = reference::embedding_delta_add(&ids, &base, &d).unwrap();
        // Without the CUDA path's host check the CPU op computes the same, bit for bit.
        let unchecked = embedding_delta_add_unchecked(&ids, &base, &d).unwrap();
        assert_close(&config, &unchecked, &got, None, &DZ_EXACT);
        let mag = embedding_magnitude(&ids, &base, &d);
        let tol = Tolerance::for_dtype(case.dtype);
        t.record(
            config.clone(),
            assert_close(&config, &got, &want, Some(&mag), &tol),
        );
    }
    t.finish();
}

/// `from_tensor_data` / `from_parts` on a real delta file (zstd parts, a row subset, every codec) build
/// the same delta as `from_payload`.
#[test]
fn from_tensor_data_matches_from_payload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.dz");
    let mut hashes = BTreeMap::new();
    hashes.insert("w".to_string(), tensor_hash("w", "f32", &[1], &[0u8; 4]));
    let recipe = Recipe {
        tool: "dz-candle-ops tests".into(),
        method: "test".into(),
        ..Default::default()
    };
    let mut w = DeltaWriter::create(
        &path,
        "t",
        serde_json::json!({}),
        BaseFingerprint::from_tensor_hashes(hashes),
        recipe,
    )
    .unwrap();
    let (n, k) = (12, 72);
    let index: Vec<u32> = vec![2, 3, 11];
    let mut expected = Vec::new();
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        let subset = ci % 3 == 0 && cfg != Cfg::Zero;
        let stored = if subset { index.len() } else { n };
        let p = payload(cfg, stored, k, ci as u64);
        let name = format!("t{ci}");
        let lossless = if ci % 2 == 0 {
            Lossless::Zstd(3)
        } else {
            Lossless::None
        };
        let idx = subset.then_some(index.as_slice());
        w.add(
            EncodedTensor::from_payload(
                &name,
                Role::Linear,
                &[n as u64, k as u64],
                Dtype::Bf16,
                idx,
                &p,
                lossless,
            )
            .unwrap(),
        )
        .unwrap();
        let rows = subset.then_some(dz_candle_ops::RowSubset {
            index: &index,
            total_rows: n,
        });
        expected.push((
            name,
            DeviceDelta::from_payload(&p, rows, &Device::Cpu).unwrap(),
        ));
    }
    w.finish().unwrap();
    let file = DeltaFile::open(&path).unwrap();
    for (name, want) in expected {
        let got = DeviceDelta::from_tensor_data(&file.read(&name).unwrap(), &Device::Cpu).unwrap();
        assert_eq!(got.name(), name);
        assert_eq!(got.role(), Some(Role::Linear));
        assert_eq!(got.dims(), want.dims());
        assert_eq!(got.codec(), want.codec());
        assert_eq!(got.stored_rows(), want.stored_rows());
        assert_eq!(got.nbytes(), want.nbytes());
        for (a, b) in got.parts().iter().zip(want.parts()) {
            assert_eq!(a.dtype(), DType::U8);
            assert_eq!(
                a.to_vec1::<u8>().unwrap(),
                b.to_vec1::<u8>().unwrap(),
                "{name}"
            );
        }
        let x = input(&[3, k], DType::F32, 1);
        let a = dz_candle_ops::delta_matmul(&x, &got).unwrap();
        let b = dz_candle_ops::delta_matmul(&x, &want).unwrap();
        assert_close(&name, &a, &b, None, &DZ_EXACT);
    }
}

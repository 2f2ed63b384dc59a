//! `SbmmPlan` + `sbmm_planned` against the plain `sbmm`: bit for bit on every case of the sbmm matrix
//! (one delta, two, 17 mixed codecs, base-only and empty segments, no deltas) plus repeated deltas, in
//! every dtype; a plan reused on other inputs of its shape; inputs that do not fit the plan, and plans
//! that cannot be built, refused with named errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use dz_candle_ops::reference::{self, Tolerance};
use dz_candle_ops::{poisoned, sbmm, sbmm_planned, DeviceDelta, SbmmPlan, Segment};
use dz_format::Role;

/// `got` and `want` hold the same bits (both of one dtype; compared as f32, which f16 and bf16 convert
/// to exactly).
fn assert_same_bits(config: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{config}: dims");
    assert_eq!(got.dtype(), want.dtype(), "{config}: dtype");
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    };
    let (g, w) = (bits(got), bits(want));
    if let Some(i) = (0..g.len()).find(|&i| g[i] != w[i]) {
        panic!(
            "{config}: element {i}: planned {} but sbmm {}",
            f32::from_bits(g[i]),
            f32::from_bits(w[i])
        );
    }
}

/// The sbmm matrix's cases and one with repeated deltas: the same delta listed twice, and a clone of it
/// (sharing its buffers) as a third.
fn cases() -> Vec<(String, Vec<DeviceDelta>, Vec<Segment>)> {
    let mut out: Vec<(String, Vec<DeviceDelta>, Vec<Segment>)> = sbmm_cases()
        .into_iter()
        .enumerate()
        .map(|(ci, case)| {
            let deltas = case
                .delta_specs(ci)
                .iter()
                .map(|s| s.build(&Device::Cpu))
                .collect();
            (case.name.to_string(), deltas, segs(&case.segments))
        })
        .collect();
    let d0 = delta(q4(), SBMM_N, SBMM_K, 41);
    let d1 = delta(Cfg::Sign1, SBMM_N, SBMM_K, 42);
    out.push((
        "repeated deltas".into(),
        vec![d0.clone(), d1, d0.clone(), d0],
        segs(&[
            (2, Some(0)),
            (1, Some(2)),
            (3, None),
            (1, Some(1)),
            (4, Some(3)),
            (1, Some(0)),
        ]),
    ));
    out
}

/// The planned sbmm gives the plain sbmm's bits on every case and dtype, with rank-2 and rank-3 inputs,
/// and on a second pair of inputs through the same plan (also within tolerance of the reference).
#[test]
fn planned_sbmm_equals_sbmm_bit_for_bit() {
    let mut t = Tester::new("sbmm-planned");
    for (ci, (name, deltas, segments)) in cases().into_iter().enumerate() {
        let refs: Vec<&DeviceDelta> = deltas.iter().collect();
        let m: usize = segments.iter().map(|s| s.len).sum();
        for (di, &dtype) in DTYPES.iter().enumerate() {
            let plan = SbmmPlan::new(&refs, &segments, m, dtype, &Device::Cpu)
                .unwrap_or_else(|e| panic!("{name} {dtype:?}: {e}"));
            assert_eq!(
                (plan.rows(), plan.dtype(), plan.deltas().len()),
                (m, dtype, deltas.len())
            );
            assert_eq!(plan.segments(), segments.as_slice());
            for (round, lead) in [vec![m], vec![1, m]].into_iter().enumerate() {
                let config = format!("{name} {dtype:?} round {round}");
                t.expect(config.clone());
                let seed = (ci * 100 + di * 10 + round) as u64;
                let dims = |w: usize| [lead.as_slice(), &[w]].concat();
                let x = input(&dims(SBMM_K), dtype, seed);
                let base = input(&dims(SBMM_N), dtype, seed + 50);
                let got =
                    sbmm_planned(&x, &base, &plan).unwrap_or_else(|e| panic!("{config}: {e}"));
                let want = sbmm(&x, &base, &refs, &segments).unwrap();
                assert_same_bits(&config, &got, &want);
                let reference = reference::sbmm(&x, &base, &refs, &segments).unwrap();
                let mag = sbmm_magnitude(&x, &base, &refs, &segments);
                t.record(
                    config.clone(),
                    assert_close(
                        &config,
                        &got,
                        &reference,
                        Some(&mag),
                        &Tolerance::for_dtype(dtype),
                    ),
                );
            }
        }
    }
    t.finish();
}

/// The poisoned plan (the kernel checks' NaN-filled outputs) computes the same on the CPU.
#[test]
fn poisoned_plan_equals_sbmm() {
    let (name, deltas, segments) = cases().pop().unwrap();
    let refs: Vec<&DeviceDelta> = deltas.iter().collect();
    let m: usize = segments.iter().map(|s| s.len).sum();
    let plan = poisoned::sbmm_plan(&refs, &segments, m, DType::BF16, &Device::Cpu).unwrap();
    let x = input(&[m, SBMM_K], DType::BF16, 5);
    let base = input(&[m, SBMM_N], DType::BF16, 6);
    let got = sbmm_planned(&x, &base, &plan).unwrap();
    let want = poisoned::sbmm(&x, &base, &refs, &segments).unwrap();
    assert_same_bits(&name, &got, &want);
}

fn fails<T: std::fmt::Debug>(r: candle_core::Result<T>, needles: &[&str]) {
    let e = r.expect_err("expected an error").to_string();
    for n in needles {
        assert!(e.contains(n), "error {e:?} does not contain {n:?}");
    }
}

/// Inputs that do not fit the plan: each a named error, nothing computed.
#[test]
fn planned_sbmm_refuses_inputs_that_do_not_fit() {
    let d = delta(q4(), SBMM_N, SBMM_K, 1);
    let segments = segs(&[(2, Some(0)), (1, None), (1, Some(0))]);
    let plan = SbmmPlan::new(&[&d], &segments, 4, DType::F32, &Device::Cpu).unwrap();
    let f32s = |dims: &[usize]| input(dims, DType::F32, 9);
    let (x, base) = (f32s(&[4, SBMM_K]), f32s(&[4, SBMM_N]));
    sbmm_planned(&x, &base, &plan).unwrap();
    fails(
        sbmm_planned(&x.to_dtype(DType::F16).unwrap(), &base, &plan),
        &["sbmm", "wrong dtype", "x is F16", "the sbmm plan"],
    );
    fails(
        sbmm_planned(&x, &base.to_dtype(DType::BF16).unwrap(), &plan),
        &["sbmm", "wrong dtype", "base_out is BF16", "the sbmm plan"],
    );
    fails(
        sbmm_planned(&f32s(&[5, SBMM_K]), &f32s(&[5, SBMM_N]), &plan),
        &["sbmm", "wrong shape", "x", "with 4 rows (the sbmm plan's)"],
    );
    fails(
        sbmm_planned(&f32s(&[2, 2, SBMM_K]), &f32s(&[4, SBMM_N]), &plan),
        &["sbmm", "wrong shape", "base_out"],
    );
    fails(
        sbmm_planned(&f32s(&[4, SBMM_K + 1]), &base, &plan),
        &[
            "sbmm",
            "wrong shape",
            "x",
            "K, the sbmm plan's deltas' columns",
        ],
    );
    fails(
        sbmm_planned(&x, &f32s(&[4, SBMM_N + 1]), &plan),
        &["sbmm", "wrong shape", "base_out"],
    );
    fails(
        sbmm_planned(&f32s(&[SBMM_K, 4]).t().unwrap(), &base, &plan),
        &["sbmm", "not contiguous", "x"],
    );
    fails(
        sbmm_planned(&Tensor::new(1f32, &Device::Cpu).unwrap(), &base, &plan),
        &["sbmm", "wrong shape", "x"],
    );
    // Without deltas: any N_total, but x's rows still the plan's.
    let empty = SbmmPlan::new(&[], &segs(&[(4, None)]), 4, DType::F32, &Device::Cpu).unwrap();
    let y = sbmm_planned(&x, &f32s(&[4, 3]), &empty).unwrap();
    assert_same_bits("no deltas", &y, &f32s(&[4, 3]));
    fails(
        sbmm_planned(&f32s(&[3, SBMM_K]), &f32s(&[3, 3]), &empty),
        &["sbmm", "wrong shape", "x"],
    );
}

/// Plans that cannot be built: the plain sbmm's checks, each a named error.
#[test]
fn sbmm_plan_refuses_what_sbmm_refuses() {
    let d = delta(q4(), SBMM_N, SBMM_K, 1);
    let cpu = &Device::Cpu;
    let one = segs(&[(2, Some(0))]);
    fails(
        SbmmPlan::new(&[&d], &one, 2, DType::U32, cpu),
        &["sbmm", "wrong dtype", "dtype is U32"],
    );
    fails(
        SbmmPlan::new(&[&d], &one, 3, DType::F32, cpu),
        &["sbmm", "bad segments", "cover rows 0..2, x has 3 rows"],
    );
    fails(
        SbmmPlan::new(&[&d], &segs(&[(2, Some(1))]), 2, DType::F32, cpu),
        &["sbmm", "bad segments", "only 1 deltas"],
    );
    let other = delta(Cfg::Sign1, SBMM_N + 1, SBMM_K, 2);
    fails(
        SbmmPlan::new(&[&d, &other], &one, 2, DType::F32, cpu),
        &["sbmm", "delta shapes differ"],
    );
    let payload = payload(q4(), SBMM_N, SBMM_K, 3);
    let parts = payload.pack().unwrap();
    let entry = entry_for(&payload, Role::Full, None, &parts);
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let full = DeviceDelta::from_parts(&entry, &refs, cpu).unwrap();
    fails(
        SbmmPlan::new(&[&full], &one, 2, DType::F32, cpu),
        &["sbmm", "codec/op mismatch"],
    );
}

//! `sbmm`, fast path against the reference twin: one delta, two, many (17, mixed codecs), base-only and
//! empty segments, every dtype.

mod common;

use candle_core::DType;
use common::*;
use dz_candle_ops::reference::{self, compare, Tolerance, DZ_EXACT};
use dz_candle_ops::{delta_matmul_add, sbmm, DeviceDelta};

#[test]
fn sbmm_matches_reference() {
    let mut t = Tester::new("sbmm");
    for (ci, case) in sbmm_cases().into_iter().enumerate() {
        let deltas: Vec<DeviceDelta> = case
            .delta_specs(ci)
            .iter()
            .map(|s| s.build(&candle_core::Device::Cpu))
            .collect();
        let refs: Vec<&DeviceDelta> = deltas.iter().collect();
        let segments = segs(&case.segments);
        let m = case.rows();
        for (di, &dtype) in DTYPES.iter().enumerate() {
            let config = format!("{} {dtype:?}", case.name);
            t.expect(config.clone());
            // Leading dims [1, m] exercise the flattening.
            let x = input(&[1, m, SBMM_K], dtype, (ci * 10 + di) as u64);
            let base = input(&[1, m, SBMM_N], dtype, (ci * 10 + di + 5) as u64);
            let got = sbmm(&x, &base, &refs, &segments).unwrap_or_else(|e| panic!("{config}: {e}"));
            let want = reference::sbmm(&x, &base, &refs, &segments).unwrap();
            let mag = sbmm_magnitude(&x, &base, &refs, &segments);
            let tol = Tolerance::for_dtype(dtype);
            t.record(
                config.clone(),
                assert_close(&config, &got, &want, Some(&mag), &tol),
            );
        }
    }
    t.finish();
}

/// A segment's rows get exactly what `delta_matmul_add` gives those rows alone (same engine choice for the
/// same row count), and base-only rows are `base_out` bit for bit. The same delta may be listed twice.
#[test]
fn sbmm_rows_equal_per_segment_ops() {
    let d0 = delta(q4(), SBMM_N, SBMM_K, 1);
    let d1 = delta(Cfg::Sign1, SBMM_N, SBMM_K, 2);
    let deltas = [&d0, &d1, &d0];
    let spec = [
        (3, Some(1)),
        (2, None),
        (11, Some(0)),
        (4, Some(2)),
        (1, Some(0)),
    ];
    let segments = segs(&spec);
    let x = input(&[21, SBMM_K], DType::BF16, 3);
    let base = input(&[21, SBMM_N], DType::BF16, 4);
    let y = sbmm(&x, &base, &deltas, &segments).unwrap();
    for s in &segments {
        let got = y.narrow(0, s.start, s.len).unwrap();
        let b = base.narrow(0, s.start, s.len).unwrap();
        let want = match s.delta {
            None => b.clone(),
            Some(i) => {
                let xs = x.narrow(0, s.start, s.len).unwrap();
                delta_matmul_add(&xs, &b, deltas[i]).unwrap()
            }
        };
        compare("segment", &got, &want, None, &DZ_EXACT).unwrap_or_else(|m| panic!("{m}"));
    }
}

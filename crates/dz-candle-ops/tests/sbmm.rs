//! `sbmm`, fast path against the reference twin: one delta, two, many (17, mixed codecs), base-only and
//! empty segments, every dtype.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use dz_candle_ops::reference::{self, compare, Tolerance, DZ_EXACT};
use dz_candle_ops::{delta_matmul_add, sbmm, DeviceDelta, Segment};

/// Per-row magnitudes: each segment's rows use its own delta's.
fn sbmm_magnitude(
    x: &Tensor,
    base: &Tensor,
    deltas: &[&DeviceDelta],
    segments: &[Segment],
) -> Tensor {
    let k = *x.dims().last().unwrap();
    let n = *base.dims().last().unwrap();
    let x2 = x.reshape(((), k)).unwrap();
    let b2 = base.reshape(((), n)).unwrap();
    let mut rows = Vec::new();
    for s in segments {
        if s.len == 0 {
            continue;
        }
        let xs = x2.narrow(0, s.start, s.len).unwrap();
        let bs = b2.narrow(0, s.start, s.len).unwrap();
        rows.push(match s.delta {
            Some(d) => magnitude(&xs, Some(&bs), deltas[d]),
            None => bs.to_dtype(DType::F32).unwrap().abs().unwrap(),
        });
    }
    Tensor::cat(&rows, 0).unwrap().reshape(base.dims()).unwrap()
}

struct Case {
    name: &'static str,
    /// `(rows, delta)` per segment.
    segments: Vec<(usize, Option<usize>)>,
    deltas: Vec<Cfg>,
}

fn segs(spec: &[(usize, Option<usize>)]) -> Vec<Segment> {
    let mut start = 0;
    spec.iter()
        .map(|&(len, delta)| {
            let s = Segment { start, len, delta };
            start += len;
            s
        })
        .collect()
}

fn q4() -> Cfg {
    Cfg::Quant {
        bits: 4,
        group: 32,
        sym: true,
    }
}

fn cases() -> Vec<Case> {
    let many: Vec<Cfg> = common::all_cfgs()
        .into_iter()
        .filter(|c| c.fits(SBMM_K))
        .step_by(3)
        .take(17)
        .collect();
    assert_eq!(many.len(), 17);
    // 17 deltas: decode-like single rows, a prefill-like run, and base-only rows between them.
    let mut many_segs = Vec::new();
    for i in 0..17 {
        let rows = match i % 4 {
            0 => 1,
            1 => 3,
            2 => 12,
            _ => 0,
        };
        many_segs.push((rows, Some(i)));
        if i % 5 == 0 {
            many_segs.push((2, None));
        }
    }
    vec![
        Case {
            name: "one delta, all rows",
            segments: vec![(40, Some(0))],
            deltas: vec![q4()],
        },
        Case {
            name: "one delta, decode",
            segments: vec![(3, Some(0))],
            deltas: vec![Cfg::Sign1],
        },
        Case {
            name: "two deltas",
            segments: vec![(5, Some(1)), (20, Some(0)), (1, Some(1))],
            deltas: vec![
                q4(),
                Cfg::Sparse24 {
                    bits: 2,
                    group: 128,
                    sym: false,
                },
            ],
        },
        Case {
            name: "17 deltas, base-only rows",
            segments: many_segs,
            deltas: many,
        },
        Case {
            name: "base only, empty segments",
            segments: vec![(0, Some(0)), (4, None), (0, None), (3, None), (0, Some(0))],
            deltas: vec![q4()],
        },
        Case {
            name: "no deltas at all",
            segments: vec![(6, None)],
            deltas: vec![],
        },
        Case {
            name: "empty segments between deltas",
            segments: vec![
                (0, None),
                (2, Some(0)),
                (0, Some(1)),
                (9, Some(1)),
                (0, None),
            ],
            deltas: vec![
                Cfg::Sparse {
                    bits: 8,
                    group: 32,
                    sym: false,
                },
                Cfg::Zero,
            ],
        },
    ]
}

const SBMM_N: usize = 19;
const SBMM_K: usize = 140;

#[test]
fn sbmm_matches_reference() {
    let mut t = Tester::new("sbmm");
    for (ci, case) in cases().into_iter().enumerate() {
        let deltas: Vec<DeviceDelta> = case
            .deltas
            .iter()
            .enumerate()
            .map(|(i, &c)| delta(c, SBMM_N, SBMM_K, (ci * 100 + i) as u64))
            .collect();
        let refs: Vec<&DeviceDelta> = deltas.iter().collect();
        let segments = segs(&case.segments);
        let m: usize = case.segments.iter().map(|s| s.0).sum();
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

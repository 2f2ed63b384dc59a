//! `delta_matmul` and `delta_matmul_add`, fast path against the reference twin, over every codec
//! configuration x dtype x shape x row count.

mod common;

use candle_core::Tensor;
use common::*;
use dz_candle_ops::reference::{self, Tolerance};
use dz_candle_ops::{delta_matmul, delta_matmul_add, DeviceDelta};

fn check_matmul(t: &mut Tester, config: String, x: &Tensor, d: &DeviceDelta) {
    let got = delta_matmul(x, d).unwrap_or_else(|e| panic!("{config}: {e}"));
    let want = reference::delta_matmul(x, d).unwrap();
    let mag = magnitude(x, None, d);
    let tol = Tolerance::for_dtype(x.dtype());
    let n = assert_close(&config, &got, &want, Some(&mag), &tol);
    t.record(config, n);
}

fn check_matmul_add(t: &mut Tester, config: String, x: &Tensor, base: &Tensor, d: &DeviceDelta) {
    let got = delta_matmul_add(x, base, d).unwrap_or_else(|e| panic!("{config}: {e}"));
    let want = reference::delta_matmul_add(x, base, d).unwrap();
    let mag = magnitude(x, Some(base), d);
    let tol = Tolerance::for_dtype(x.dtype());
    let n = assert_close(&config, &got, &want, Some(&mag), &tol);
    t.record(config, n);
}

/// Runs the matmul cases of `groups` (common's matrices) on the CPU.
fn run_groups(name: &'static str, groups: Vec<MatmulGroup>) -> Tester {
    let mut t = Tester::new(name);
    for g in groups {
        let d = g.delta.build(&candle_core::Device::Cpu);
        let (n, k) = d.dims();
        for run in &g.runs {
            let config = format!("{} {}", g.delta.label(), run.label());
            t.expect(config.clone());
            let x = run.x(k);
            match run.base(n) {
                None => check_matmul(&mut t, config, &x, &d),
                Some(base) => check_matmul_add(&mut t, config, &x, &base, &d),
            }
        }
    }
    t
}

#[test]
fn delta_matmul_matches_reference() {
    run_groups("delta_matmul", delta_matmul_groups()).finish();
}

#[test]
fn delta_matmul_add_matches_reference() {
    run_groups("delta_matmul_add", delta_matmul_add_groups()).finish();
}

/// Row-subset deltas (embedding / lm_head style): rows not stored contribute zero.
#[test]
fn row_subsets_match_reference() {
    run_groups("row subsets", row_subset_groups()).finish();
    for g in row_subset_groups() {
        let d = g.delta.build(&candle_core::Device::Cpu);
        assert_eq!(d.dims(), (SUBSET_N, SUBSET_K));
        assert_eq!(d.stored_rows(), SUBSET_INDEX.len());
        // Columns of rows not stored are exactly zero.
        let y = delta_matmul(&input(&[3, SUBSET_K], candle_core::DType::F32, 5), &d).unwrap();
        let y = y.to_vec2::<f32>().unwrap();
        for row in &y {
            for (c, &v) in row.iter().enumerate() {
                if !SUBSET_INDEX.contains(&(c as u32)) {
                    assert_eq!(v, 0.0, "{}: column {c} is not stored", g.delta.label());
                }
            }
        }
    }
}

/// The boundaries between the engines (8 and 9 rows), a single column, zero rows.
#[test]
fn edge_shapes() {
    let mut t = Tester::new("edge shapes");
    let cfg = Cfg::Quant {
        bits: 3,
        group: 4,
        sym: false,
    };
    for (n, k) in [(1, 1), (1, 4), (3, 33), (70, 40)] {
        let d = delta(cfg, n, k, 11);
        for rows in [8, 9, 65] {
            let x = input(&[rows, k], candle_core::DType::F32, rows as u64);
            check_matmul(&mut t, format!("{n}x{k} rows={rows}"), &x, &d);
        }
    }
    // Zero rows: an empty output of the right shape.
    let d = delta(cfg, 5, 12, 1);
    let x = Tensor::zeros((0, 12), candle_core::DType::F16, &candle_core::Device::Cpu).unwrap();
    let y = delta_matmul(&x, &d).unwrap();
    assert_eq!(y.dims(), &[0, 5]);
    assert_eq!(y.dtype(), candle_core::DType::F16);
    // A view with an offset (contiguous) is fine.
    let x = input(&[10, 12], candle_core::DType::F32, 3);
    let xs = x.narrow(0, 4, 3).unwrap();
    check_matmul(&mut t, "narrowed view".into(), &xs, &d);
    t.finish();
}

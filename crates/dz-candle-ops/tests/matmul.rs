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

#[test]
fn delta_matmul_matches_reference() {
    let mut t = Tester::new("delta_matmul");
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        for (si, &(n, k)) in SHAPES.iter().enumerate() {
            let d = delta(cfg, n, k, (ci * 10 + si) as u64);
            for (di, &dtype) in DTYPES.iter().enumerate() {
                for &rows in &ROWS {
                    let config = format!("{} {dtype:?} {n}x{k} rows={rows}", cfg.label());
                    t.expect(config.clone());
                    let x = input(
                        &x_dims(rows, k),
                        dtype,
                        (1000 + ci * 100 + si * 10 + di) as u64,
                    );
                    check_matmul(&mut t, config, &x, &d);
                }
            }
        }
    }
    t.finish();
}

#[test]
fn delta_matmul_add_matches_reference() {
    let mut t = Tester::new("delta_matmul_add");
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        // One shape per configuration, in turn: the shapes are covered by delta_matmul above.
        let (n, k) = SHAPES[ci % SHAPES.len()];
        let d = delta(cfg, n, k, 500 + ci as u64);
        for (di, &dtype) in DTYPES.iter().enumerate() {
            for &rows in &[1, 7, 64, 300] {
                let config = format!("{} {dtype:?} {n}x{k} rows={rows}", cfg.label());
                t.expect(config.clone());
                let dims = x_dims(rows, k);
                let x = input(&dims, dtype, (3000 + ci * 10 + di) as u64);
                let mut out_dims = dims.clone();
                *out_dims.last_mut().unwrap() = n;
                let base = input(&out_dims, dtype, (4000 + ci * 10 + di) as u64);
                check_matmul_add(&mut t, config, &x, &base, &d);
            }
        }
    }
    t.finish();
}

/// Row-subset deltas (embedding / lm_head style): rows not stored contribute zero.
#[test]
fn row_subsets_match_reference() {
    let mut t = Tester::new("row subsets");
    let index: Vec<u32> = vec![0, 3, 4, 10, 17, 29, 36];
    let (n_total, k) = (37, 72);
    let cfgs = [
        Cfg::Quant {
            bits: 4,
            group: 32,
            sym: false,
        },
        Cfg::Sparse24 {
            bits: 2,
            group: 0,
            sym: true,
        },
        Cfg::Sparse {
            bits: 3,
            group: 32,
            sym: false,
        },
        Cfg::Sign1,
    ];
    for (ci, cfg) in cfgs.into_iter().enumerate() {
        let d = subset_delta(cfg, n_total, &index, k, 70 + ci as u64);
        assert_eq!(d.dims(), (n_total, k));
        assert_eq!(d.stored_rows(), index.len());
        for (di, &dtype) in DTYPES.iter().enumerate() {
            for &rows in &[1, 9, 64] {
                let dims = x_dims(rows, k);
                let x = input(&dims, dtype, (ci * 10 + di) as u64);
                check_matmul(
                    &mut t,
                    format!("matmul {} {dtype:?} rows={rows}", cfg.label()),
                    &x,
                    &d,
                );
                let mut out_dims = dims.clone();
                *out_dims.last_mut().unwrap() = n_total;
                let base = input(&out_dims, dtype, 99);
                check_matmul_add(
                    &mut t,
                    format!("matmul_add {} {dtype:?} rows={rows}", cfg.label()),
                    &x,
                    &base,
                    &d,
                );
            }
        }
        // Columns of rows not stored are exactly zero.
        let y = delta_matmul(&input(&[3, k], candle_core::DType::F32, 5), &d).unwrap();
        let y = y.to_vec2::<f32>().unwrap();
        for row in &y {
            for (c, &v) in row.iter().enumerate() {
                if !index.contains(&(c as u32)) {
                    assert_eq!(v, 0.0, "{}: column {c} is not stored", cfg.label());
                }
            }
        }
    }
    t.finish();
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

//! Tensor-parallel shards (dz-format's `shard`) under the ops: a column-parallel split (the delta's rows,
//! the output features) computes each rank's slice of the outputs, which concatenated equal the unsharded
//! `delta_matmul` / `delta_matmul_add`; a row-parallel split (the columns, the input features) takes each
//! rank's slice of `x`, and the ranks' outputs summed equal the unsharded op. Every codec configuration of
//! the shared matrix x world sizes x dtypes x row counts, on the CPU.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::*;
use dz_candle_ops::reference::Tolerance;
use dz_candle_ops::{delta_matmul, delta_matmul_add, DeviceDelta};
use dz_format::shard::{check_even_split, shard_rank, Axis, TensorShard};
use dz_format::{Dtype, Error, Role};

const WORLDS: [usize; 4] = [1, 2, 4, 8];
/// `(N, K)`: both divisible by 8; K = 96 leaves some group sizes uncut (0, 12-column slices inside
/// groups of 32 at 8 ranks: refused for some) and K = 256 others.
const TP_SHAPES: [(usize, usize); 2] = [(16, 256), (24, 96)];
const TP_ROWS: [usize; 3] = [1, 9, 64];

/// The whole tensor (a row subset when `index` is given) as a one-rank shard, and its delta.
fn whole(cfg: Cfg, n: usize, k: usize, index: Option<&[u32]>, seed: u64) -> TensorShard {
    let stored = index.map_or(n, <[u32]>::len);
    let role = if index.is_some() {
        Role::LmHead
    } else {
        Role::Linear
    };
    let p = payload(cfg, stored, k, seed);
    TensorShard::from_payload("t", role, &[n as u64, k as u64], Dtype::Bf16, index, &p)
        .unwrap_or_else(|e| panic!("{}: {e}", cfg.label()))
}

/// The tolerance of a row-parallel sum against the unsharded op: each rank rounds its partial output to
/// the output dtype before the sum, so on top of `tol` each element may move by one output ulp of each
/// partial, and `|partial_r| <= magnitude_r` with `sum_r magnitude_r = magnitude`: `tol.ulp` joins the
/// magnitude term. For f32 outputs (`ulp = 0`) this is `DZ_TOL_F32` itself.
fn row_parallel_tolerance(tol: Tolerance) -> Tolerance {
    Tolerance {
        name: match tol.name {
            "DZ_TOL_F16" => "DZ_TOL_F16 + one f16 ulp of the magnitude per rank",
            "DZ_TOL_BF16" => "DZ_TOL_BF16 + one bf16 ulp of the magnitude per rank",
            other => other,
        },
        rel: tol.rel + tol.ulp,
        ..tol
    }
}

/// One delta cut `world` ways along `axis`, compared with the unsharded op over every dtype and row count
/// (`delta_matmul`, and `delta_matmul_add` with a `base_out` split as the host splits it). `false` if the
/// split is refused (an `Unshardable` error, checked).
fn check_delta(t: &mut Tester, label: &str, w: &TensorShard, axis: Axis, world: usize) -> bool {
    let dev = Device::Cpu;
    let refs = w.part_refs();
    let ranges = match check_even_split(&w.entry, axis, world) {
        Ok(r) => r,
        Err(e) => {
            assert!(matches!(e, Error::Unshardable { .. }), "{label}: {e}");
            return false;
        }
    };
    let full = DeviceDelta::from_shard(w, &dev).unwrap();
    let shards: Vec<DeviceDelta> = (0..world)
        .map(|r| {
            let s = shard_rank(&w.entry, &refs, axis, r, world)
                .unwrap_or_else(|e| panic!("{label}: rank {r}: {e}"));
            DeviceDelta::from_shard(&s, &dev).unwrap_or_else(|e| panic!("{label}: rank {r}: {e}"))
        })
        .collect();
    let (n, k) = full.dims();
    for (di, &dtype) in DTYPES.iter().enumerate() {
        for &rows in &TP_ROWS {
            let x = input(&x_dims(rows, k), dtype, (di * 100 + rows) as u64);
            let mut base_dims = x_dims(rows, k);
            *base_dims.last_mut().unwrap() = n;
            let base = input(&base_dims, dtype, (di * 100 + rows + 7) as u64);
            for with_base in [false, true] {
                let config = format!("{label} {dtype:?} rows={rows} add={with_base}");
                t.expect(config.clone());
                let want = if with_base {
                    delta_matmul_add(&x, &base, &full).unwrap()
                } else {
                    delta_matmul(&x, &full).unwrap()
                };
                let mag = magnitude(&x, with_base.then_some(&base), &full);
                let tol = Tolerance::for_dtype(dtype);
                let got = match axis {
                    // Column-parallel: every rank sees all of x and makes its slice of the outputs.
                    Axis::Rows => {
                        let outs: Vec<Tensor> = shards
                            .iter()
                            .zip(&ranges)
                            .map(|(d, r)| {
                                if with_base {
                                    let b = base
                                        .narrow(D::Minus1, r.start, r.end - r.start)
                                        .unwrap()
                                        .contiguous()
                                        .unwrap();
                                    delta_matmul_add(&x, &b, d).unwrap()
                                } else {
                                    delta_matmul(&x, d).unwrap()
                                }
                            })
                            .collect();
                        Tensor::cat(&outs, D::Minus1).unwrap()
                    }
                    // Row-parallel: rank r sees its slice of x; the partial outputs are summed (the
                    // host's all-reduce), the base output added once (rank 0's partial here).
                    Axis::Cols => {
                        let mut sum: Option<Tensor> = None;
                        for (r, (d, range)) in shards.iter().zip(&ranges).enumerate() {
                            let xr = x
                                .narrow(D::Minus1, range.start, range.end - range.start)
                                .unwrap()
                                .contiguous()
                                .unwrap();
                            let y = if with_base && r == 0 {
                                delta_matmul_add(&xr, &base, d).unwrap()
                            } else {
                                delta_matmul(&xr, d).unwrap()
                            };
                            let y = y.to_dtype(DType::F32).unwrap();
                            sum = Some(match sum {
                                None => y,
                                Some(s) => (s + y).unwrap(),
                            });
                        }
                        sum.unwrap().to_dtype(dtype).unwrap()
                    }
                };
                let tol = match axis {
                    Axis::Rows => tol,
                    Axis::Cols => row_parallel_tolerance(tol),
                };
                t.record(
                    config.clone(),
                    assert_close(&config, &got, &want, Some(&mag), &tol),
                );
            }
        }
    }
    true
}

#[test]
fn column_parallel_shards_concatenate_to_the_unsharded_op() {
    let mut t = Tester::new("column-parallel shards");
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        for (si, &(n, k)) in TP_SHAPES.iter().enumerate() {
            if !cfg.fits(k) {
                continue;
            }
            let w = whole(cfg, n, k, None, (ci * 10 + si) as u64);
            for world in WORLDS {
                let label = format!("{} {n}x{k} rows/{world}", cfg.label());
                // A row split of a full tensor is never refused when N divides.
                assert!(
                    check_delta(&mut t, &label, &w, Axis::Rows, world),
                    "{label}"
                );
            }
        }
    }
    t.finish();
}

#[test]
fn row_parallel_shards_sum_to_the_unsharded_op() {
    let mut t = Tester::new("row-parallel shards");
    let mut refused = 0;
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        for (si, &(n, k)) in TP_SHAPES.iter().enumerate() {
            if !cfg.fits(k) {
                continue;
            }
            let w = whole(cfg, n, k, None, (ci * 10 + si) as u64);
            for world in WORLDS {
                let label = format!("{} {n}x{k} cols/{world}", cfg.label());
                if !check_delta(&mut t, &label, &w, Axis::Cols, world) {
                    refused += 1;
                }
            }
        }
    }
    assert!(refused > 0, "no refused split was exercised");
    t.finish();
}

/// Row subsets (lm_head style) cut both ways: ranks with no stored row hold a `zero` delta.
#[test]
fn row_subset_shards() {
    let mut t = Tester::new("row-subset shards");
    let index = [0u32, 3, 4, 10, 17, 29, 30, 31];
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        if cfg == Cfg::Zero || !cfg.fits(64) {
            continue;
        }
        let w = whole(cfg, 40, 64, Some(&index), 90 + ci as u64);
        for world in [2, 8] {
            for axis in [Axis::Rows, Axis::Cols] {
                let label = format!("{} subset {}/{world}", cfg.label(), axis.as_str());
                check_delta(&mut t, &label, &w, axis, world);
            }
        }
    }
    t.finish();
}

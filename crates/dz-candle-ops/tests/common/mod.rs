//! Shared test helpers: seeded payload generators for every codec, seeded inputs, the magnitude that
//! scales the tolerances, and a tester that fails if a configuration ran nothing.
#![allow(dead_code)]

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use dz_candle_ops::reference::{self, compare, Tolerance};
use dz_candle_ops::{DeviceDelta, RowSubset};
use dz_format::codec::{Dense, Grid, Payload, Quant, Sign1, Sparse, Sparse24};
use dz_format::{Dtype, QuantParams};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One codec configuration of the test matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cfg {
    Quant { bits: u8, group: u32, sym: bool },
    Sparse24 { bits: u8, group: u32, sym: bool },
    Sparse { bits: u8, group: u32, sym: bool },
    Sign1,
    Dense(Dtype),
    Zero,
}

impl Cfg {
    pub fn label(&self) -> String {
        let s = |sym: bool| if sym { "sym" } else { "asym" };
        match *self {
            Cfg::Quant { bits, group, sym } => format!("quant {bits}b g{group} {}", s(sym)),
            Cfg::Sparse24 { bits, group, sym } => format!("sparse24 {bits}b g{group} {}", s(sym)),
            Cfg::Sparse { bits, group, sym } => format!("sparse {bits}b g{group} {}", s(sym)),
            Cfg::Sign1 => "sign1".into(),
            Cfg::Dense(d) => format!("dense {}", d.as_str()),
            Cfg::Zero => "zero".into(),
        }
    }

    /// Whether the codec can pack `k` columns (2:4 needs `k % 4 == 0`).
    pub fn fits(&self, k: usize) -> bool {
        !matches!(self, Cfg::Sparse24 { .. }) || k.is_multiple_of(4)
    }
}

/// Every codec configuration: quant 2/3/4/8 bits x group 0/32/128/20 (20: remainders for every tested K)
/// x sym/asym; sparse24 and sparse at every width with a few grids; sign1; dense in each dtype; zero.
pub fn all_cfgs() -> Vec<Cfg> {
    let mut v = Vec::new();
    for bits in [2, 3, 4, 8] {
        for group in [0, 32, 128, 20] {
            for sym in [true, false] {
                v.push(Cfg::Quant { bits, group, sym });
            }
        }
    }
    for bits in [2, 3, 4, 8] {
        for (group, sym) in [(0, true), (128, false), (32, true)] {
            v.push(Cfg::Sparse24 { bits, group, sym });
        }
    }
    for bits in [2, 3, 4, 8] {
        for (group, sym) in [(0, true), (32, false)] {
            v.push(Cfg::Sparse { bits, group, sym });
        }
    }
    v.push(Cfg::Sign1);
    for d in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        v.push(Cfg::Dense(d));
    }
    v.push(Cfg::Zero);
    v
}

/// `(N, K)` test shapes: K is not a multiple of any group size (32, 128, 20) and N is odd or small;
/// the last one spans three decode chunks (512) and two GEMM column tiles (1024).
pub const SHAPES: [(usize, usize); 3] = [(13, 108), (8, 268), (5, 1108)];

/// Input row counts: the streaming engine (<= 8 rows) and the GEMM engine.
pub const ROWS: [usize; 5] = [1, 2, 7, 64, 300];

/// The float dtypes.
pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn params(bits: u8, group: u32, sym: bool, global_scale: f32) -> QuantParams {
    QuantParams {
        bits,
        group_size: group,
        symmetric: sym,
        global_scale,
    }
}

fn grid(rng: &mut StdRng, p: QuantParams, rows: usize, cols: usize) -> Grid {
    let g = rows * p.n_groups(cols);
    let levels = (1u32 << p.bits) as f32;
    Grid {
        params: p,
        scales: (0..g)
            .map(|_| {
                let s: f32 = rng.gen_range(0.25..2.0);
                f16::from_f32(if rng.gen_bool(0.2) { -s } else { s })
            })
            .collect(),
        zeros: (!p.symmetric).then(|| {
            (0..g)
                .map(|_| f16::from_f32(rng.gen_range(0.0..levels)))
                .collect()
        }),
    }
}

/// A seeded payload of `rows x cols` for `cfg`.
pub fn payload(cfg: Cfg, rows: usize, cols: usize, seed: u64) -> Payload {
    let mut rng = rng(seed);
    let gs = 1.0 / 64.0;
    match cfg {
        Cfg::Quant { bits, group, sym } => {
            let p = params(bits, group, sym, gs);
            Payload::Quant(Quant {
                rows,
                cols,
                grid: grid(&mut rng, p, rows, cols),
                codes: (0..rows * cols)
                    .map(|_| rng.gen_range(0..(1u16 << bits)) as u8)
                    .collect(),
            })
        }
        Cfg::Sparse24 { bits, group, sym } => {
            let p = params(bits, group, sym, gs);
            let positions = (0..rows * cols / 4)
                .flat_map(|_| {
                    let a = rng.gen_range(0..3u8);
                    let b = rng.gen_range(a + 1..4u8);
                    [a, b]
                })
                .collect();
            Payload::Sparse24(Sparse24 {
                rows,
                cols,
                grid: grid(&mut rng, p, rows, cols),
                codes: (0..rows * cols / 2)
                    .map(|_| rng.gen_range(0..(1u16 << bits)) as u8)
                    .collect(),
                positions,
            })
        }
        Cfg::Sparse { bits, group, sym } => {
            let p = params(bits, group, sym, gs);
            // Row 0 keeps nothing, row 1 everything, the rest about a third.
            let mask: Vec<bool> = (0..rows * cols)
                .map(|i| match i / cols {
                    0 => false,
                    1 => true,
                    _ => rng.gen_bool(0.35),
                })
                .collect();
            let kept = mask.iter().filter(|&&m| m).count();
            Payload::Sparse(Sparse {
                rows,
                cols,
                grid: grid(&mut rng, p, rows, cols),
                codes: (0..kept)
                    .map(|_| rng.gen_range(0..(1u16 << bits)) as u8)
                    .collect(),
                mask,
            })
        }
        Cfg::Sign1 => Payload::Sign1(Sign1 {
            rows,
            cols,
            global_scale: gs,
            signs: (0..rows * cols).map(|_| rng.gen_bool(0.5)).collect(),
            scales: (0..rows)
                .map(|_| f16::from_f32(rng.gen_range(0.25..2.0)))
                .collect(),
        }),
        Cfg::Dense(dtype) => {
            let v: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-0.1..0.1)).collect();
            Payload::Dense(Dense::from_f32(rows, cols, dtype, &v))
        }
        Cfg::Zero => Payload::Zero { rows, cols },
    }
}

/// A delta of `n x k` for `cfg` (all rows stored).
pub fn delta(cfg: Cfg, n: usize, k: usize, seed: u64) -> DeviceDelta {
    DeviceDelta::from_payload(&payload(cfg, n, k, seed), None, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", cfg.label()))
}

/// A row-subset delta: `index.len()` stored rows of an `n_total x k` matrix.
pub fn subset_delta(cfg: Cfg, n_total: usize, index: &[u32], k: usize, seed: u64) -> DeviceDelta {
    let rows = RowSubset {
        index,
        total_rows: n_total,
    };
    DeviceDelta::from_payload(
        &payload(cfg, index.len(), k, seed),
        Some(rows),
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", cfg.label()))
}

/// Seeded uniform values in `[-1, 1)` of `dims`, in `dtype`.
pub fn input(dims: &[usize], dtype: DType, seed: u64) -> Tensor {
    let mut rng = rng(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// `x` of `rows` rows of `k`, with leading dims that vary with the row count (rank 1 for one row,
/// `[4, 16, k]` for 64).
pub fn x_dims(rows: usize, k: usize) -> Vec<usize> {
    match rows {
        1 => vec![k],
        64 => vec![4, 16, k],
        _ => vec![rows, k],
    }
}

/// The magnitude of each output element of `base + x · Dᵀ`: `|base| + |x| · |D|ᵀ` (f32; it scales the
/// tolerance, it need not be exact).
pub fn magnitude(x: &Tensor, base: Option<&Tensor>, d: &DeviceDelta) -> Tensor {
    let (n, k) = d.dims();
    let dense = reference::dequantize(d).unwrap().abs().unwrap();
    let xs = x
        .to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .reshape(((), k))
        .unwrap();
    let mut m = xs.matmul(&dense.t().unwrap()).unwrap();
    if let Some(b) = base {
        let b = b
            .to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .reshape(((), n))
            .unwrap();
        m = (m + b).unwrap();
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap() = n;
    m.reshape(dims).unwrap()
}

/// Compares under `tol` and panics with the comparison's message; returns the elements compared.
#[track_caller]
pub fn assert_close(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    mag: Option<&Tensor>,
    tol: &Tolerance,
) -> usize {
    match compare(what, got, want, mag, tol) {
        Ok(n) => n,
        Err(m) => panic!("{m}"),
    }
}

/// Counts the elements each declared configuration compared and fails if one compared nothing (a
/// configuration silently skipped, or a comparison of empty tensors), like grep-searcher's tester.
pub struct Tester {
    name: &'static str,
    runs: BTreeMap<String, usize>,
}

impl Tester {
    pub fn new(name: &'static str) -> Self {
        Tester {
            name,
            runs: BTreeMap::new(),
        }
    }

    /// Declares a configuration that must run.
    pub fn expect(&mut self, config: impl Into<String>) {
        self.runs.entry(config.into()).or_insert(0);
    }

    /// Records `compared` elements for `config` (declaring it if needed).
    pub fn record(&mut self, config: impl Into<String>, compared: usize) {
        *self.runs.entry(config.into()).or_insert(0) += compared;
    }

    /// Panics if nothing was declared, or if a declared configuration compared no element.
    pub fn finish(self) {
        assert!(!self.runs.is_empty(), "{}: no configuration ran", self.name);
        let empty: Vec<_> = self
            .runs
            .iter()
            .filter(|(_, &n)| n == 0)
            .map(|(c, _)| c.as_str())
            .collect();
        assert!(
            empty.is_empty(),
            "{}: {} configuration(s) ran nothing:\n  {}",
            self.name,
            empty.len(),
            empty.join("\n  ")
        );
        let total: usize = self.runs.values().sum();
        eprintln!(
            "{}: {} configurations, {total} elements compared",
            self.name,
            self.runs.len()
        );
    }
}

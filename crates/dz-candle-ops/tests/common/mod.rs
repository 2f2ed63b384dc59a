//! Shared test helpers: seeded payload generators for every codec, seeded inputs, the magnitudes that
//! scale the tolerances, a tester that fails if a configuration ran nothing, and the case matrices (which
//! deltas, dtypes, row counts and seeds each op is checked on). The matrices are shared with
//! `examples/cuda_check.rs`, which runs them on CUDA against the same reference twins.
#![allow(dead_code)]

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use dz_candle_ops::reference::{self, compare, Tolerance};
use dz_candle_ops::{DeviceDelta, RowSubset, Segment};
use dz_format::codec::{Dense, Grid, Payload, Quant, Sign1, Sparse, Sparse24};
use dz_format::{Dtype, PartEntry, QuantParams, Role, TensorEntry};
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
    DeltaSpec::full(cfg, n, k, seed).build(&Device::Cpu)
}

/// A row-subset delta: `index.len()` stored rows of an `n_total x k` matrix.
pub fn subset_delta(cfg: Cfg, n_total: usize, index: &[u32], k: usize, seed: u64) -> DeviceDelta {
    DeltaSpec::subset(cfg, n_total, index, k, seed).build(&Device::Cpu)
}

/// A seeded delta: the payload of `cfg` (`index.len()` rows of a row subset, else `n`), `n x k` in all.
#[derive(Debug, Clone)]
pub struct DeltaSpec {
    pub cfg: Cfg,
    /// `N_total`.
    pub n: usize,
    pub k: usize,
    pub seed: u64,
    /// The stored rows of a row subset.
    pub index: Option<Vec<u32>>,
}

impl DeltaSpec {
    pub fn full(cfg: Cfg, n: usize, k: usize, seed: u64) -> Self {
        DeltaSpec {
            cfg,
            n,
            k,
            seed,
            index: None,
        }
    }

    pub fn subset(cfg: Cfg, n_total: usize, index: &[u32], k: usize, seed: u64) -> Self {
        DeltaSpec {
            cfg,
            n: n_total,
            k,
            seed,
            index: Some(index.to_vec()),
        }
    }

    /// The delta on `dev` (the same bytes on every device).
    pub fn build(&self, dev: &Device) -> DeviceDelta {
        let rows = self.index.as_ref().map_or(self.n, Vec::len);
        let subset = self.index.as_deref().map(|index| RowSubset {
            index,
            total_rows: self.n,
        });
        DeviceDelta::from_payload(&payload(self.cfg, rows, self.k, self.seed), subset, dev)
            .unwrap_or_else(|e| panic!("{}: {e}", self.cfg.label()))
    }

    /// `<codec> <n>x<k>`, and the stored rows of a subset.
    pub fn label(&self) -> String {
        match &self.index {
            None => format!("{} {}x{}", self.cfg.label(), self.n, self.k),
            Some(i) => format!(
                "{} {}x{} subset of {} rows",
                self.cfg.label(),
                self.n,
                self.k,
                i.len()
            ),
        }
    }
}

/// One input of a matmul case: `x` of `rows` rows (`x_dims`) in `dtype`, and for `delta_matmul_add` a
/// seeded `base_out`.
#[derive(Debug, Clone, Copy)]
pub struct MatmulRun {
    pub dtype: DType,
    pub rows: usize,
    pub x_seed: u64,
    /// `Some`: `delta_matmul_add` with a `base_out` of this seed; `None`: `delta_matmul`.
    pub base_seed: Option<u64>,
}

impl MatmulRun {
    /// `x` on the CPU.
    pub fn x(&self, k: usize) -> Tensor {
        input(&x_dims(self.rows, k), self.dtype, self.x_seed)
    }

    /// `base_out` on the CPU (`None` for `delta_matmul`).
    pub fn base(&self, n: usize) -> Option<Tensor> {
        let mut dims = x_dims(self.rows, 1);
        *dims.last_mut().expect("rank >= 1") = n;
        self.base_seed.map(|s| input(&dims, self.dtype, s))
    }

    pub fn label(&self) -> String {
        let op = if self.base_seed.is_some() {
            "matmul_add"
        } else {
            "matmul"
        };
        format!("{op} {:?} rows={}", self.dtype, self.rows)
    }
}

/// One delta and the inputs it is multiplied with.
#[derive(Debug, Clone)]
pub struct MatmulGroup {
    pub delta: DeltaSpec,
    pub runs: Vec<MatmulRun>,
}

/// `delta_matmul`: every configuration x shape x dtype x row count.
pub fn delta_matmul_groups() -> Vec<MatmulGroup> {
    let mut out = Vec::new();
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        for (si, &(n, k)) in SHAPES.iter().enumerate() {
            let mut runs = Vec::new();
            for (di, &dtype) in DTYPES.iter().enumerate() {
                for &rows in &ROWS {
                    runs.push(MatmulRun {
                        dtype,
                        rows,
                        x_seed: (1000 + ci * 100 + si * 10 + di) as u64,
                        base_seed: None,
                    });
                }
            }
            out.push(MatmulGroup {
                delta: DeltaSpec::full(cfg, n, k, (ci * 10 + si) as u64),
                runs,
            });
        }
    }
    out
}

/// `delta_matmul_add`: every configuration (one shape each, in turn: the shapes are covered by
/// `delta_matmul`) x dtype x row count.
pub fn delta_matmul_add_groups() -> Vec<MatmulGroup> {
    let mut out = Vec::new();
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        let (n, k) = SHAPES[ci % SHAPES.len()];
        let mut runs = Vec::new();
        for (di, &dtype) in DTYPES.iter().enumerate() {
            for &rows in &[1, 7, 64, 300] {
                runs.push(MatmulRun {
                    dtype,
                    rows,
                    x_seed: (3000 + ci * 10 + di) as u64,
                    base_seed: Some((4000 + ci * 10 + di) as u64),
                });
            }
        }
        out.push(MatmulGroup {
            delta: DeltaSpec::full(cfg, n, k, 500 + ci as u64),
            runs,
        });
    }
    out
}

/// The stored rows of the row-subset matmul cases, of `SUBSET_N x SUBSET_K`.
pub const SUBSET_INDEX: [u32; 7] = [0, 3, 4, 10, 17, 29, 36];
pub const SUBSET_N: usize = 37;
pub const SUBSET_K: usize = 72;

/// Row-subset deltas (embedding / lm_head style): `delta_matmul` and `delta_matmul_add`, every dtype.
pub fn row_subset_groups() -> Vec<MatmulGroup> {
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
    let mut out = Vec::new();
    for (ci, cfg) in cfgs.into_iter().enumerate() {
        let mut runs = Vec::new();
        for (di, &dtype) in DTYPES.iter().enumerate() {
            for &rows in &[1, 9, 64] {
                for base_seed in [None, Some(99)] {
                    runs.push(MatmulRun {
                        dtype,
                        rows,
                        x_seed: (ci * 10 + di) as u64,
                        base_seed,
                    });
                }
            }
        }
        out.push(MatmulGroup {
            delta: DeltaSpec::subset(cfg, SUBSET_N, &SUBSET_INDEX, SUBSET_K, 70 + ci as u64),
            runs,
        });
    }
    out
}

/// `dequantize`: every configuration x shape.
pub fn dequantize_specs() -> Vec<DeltaSpec> {
    let mut out = Vec::new();
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        for (si, &(n, k)) in SHAPES.iter().enumerate() {
            out.push(DeltaSpec::full(cfg, n, k, (ci * 10 + si) as u64));
        }
    }
    out.push(DeltaSpec::subset(Cfg::Sign1, 9, &[1, 2, 7], 40, 3));
    out
}

/// One `merge` case: `base_w` of `dims` (the delta's matrix view), seeded, in `dtype`.
#[derive(Debug, Clone)]
pub struct MergeCase {
    pub delta: DeltaSpec,
    pub dtype: DType,
    pub dims: Vec<usize>,
    pub base_seed: u64,
}

/// `merge`: every configuration (one shape each, in turn) x dtype, and a 3-D weight over a row subset.
pub fn merge_cases() -> Vec<MergeCase> {
    let mut out = Vec::new();
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        let (n, k) = SHAPES[ci % SHAPES.len()];
        for (di, &dtype) in DTYPES.iter().enumerate() {
            out.push(MergeCase {
                delta: DeltaSpec::full(cfg, n, k, 40 + ci as u64),
                dtype,
                dims: vec![n, k],
                base_seed: (ci * 10 + di) as u64,
            });
        }
    }
    out.push(MergeCase {
        delta: DeltaSpec::subset(
            Cfg::Quant {
                bits: 8,
                group: 0,
                sym: false,
            },
            6,
            &[0, 5],
            10,
            9,
        ),
        dtype: DType::F16,
        dims: vec![2, 3, 10],
        base_seed: 1,
    });
    out
}

/// One `embedding_delta_add` case: ids of shape `[2, 7]` in `id_dtype`, `base_emb_out` `[2, 7, K]`.
#[derive(Debug, Clone)]
pub struct EmbeddingCase {
    pub delta: DeltaSpec,
    pub dtype: DType,
    pub id_dtype: DType,
    pub ids: Vec<u32>,
    pub base_seed: u64,
}

impl EmbeddingCase {
    /// The ids on the CPU.
    pub fn ids(&self) -> Tensor {
        Tensor::from_vec(self.ids.clone(), (2, 7), &Device::Cpu)
            .unwrap()
            .to_dtype(self.id_dtype)
            .unwrap()
    }

    /// `base_emb_out` on the CPU.
    pub fn base(&self) -> Tensor {
        input(&[2, 7, self.delta.k], self.dtype, self.base_seed)
    }

    pub fn label(&self) -> String {
        format!(
            "{} {:?} ids {:?}",
            self.delta.label(),
            self.dtype,
            self.id_dtype
        )
    }
}

/// `embedding_delta_add`: every configuration (full, or a row subset every other one) x dtype x id dtype,
/// with repeated ids and ids of rows a subset does not store.
pub fn embedding_cases() -> Vec<EmbeddingCase> {
    let (vocab, hidden) = (50, 68);
    let index: Vec<u32> = (0..50).filter(|r| r % 3 != 1).collect();
    let mut out = Vec::new();
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        let delta = if ci % 2 == 0 {
            DeltaSpec::full(cfg, vocab, hidden, ci as u64)
        } else {
            DeltaSpec::subset(cfg, vocab, &index, hidden, ci as u64)
        };
        for (di, &dtype) in DTYPES.iter().enumerate() {
            for id_dtype in [DType::U32, DType::I64] {
                out.push(EmbeddingCase {
                    delta: delta.clone(),
                    dtype,
                    id_dtype,
                    ids: (0..14)
                        .map(|i| ((i * 7 + ci + di) % vocab) as u32)
                        .collect(),
                    base_seed: (ci * 10 + di) as u64,
                });
            }
        }
    }
    out
}

pub const SBMM_N: usize = 19;
pub const SBMM_K: usize = 140;

/// One `sbmm` case: the deltas (`SBMM_N x SBMM_K`, seeded by case and position) and `(rows, delta)` per
/// segment.
#[derive(Debug, Clone)]
pub struct SbmmCase {
    pub name: &'static str,
    pub segments: Vec<(usize, Option<usize>)>,
    pub deltas: Vec<Cfg>,
}

impl SbmmCase {
    /// The deltas of case number `ci`.
    pub fn delta_specs(&self, ci: usize) -> Vec<DeltaSpec> {
        self.deltas
            .iter()
            .enumerate()
            .map(|(i, &c)| DeltaSpec::full(c, SBMM_N, SBMM_K, (ci * 100 + i) as u64))
            .collect()
    }

    /// The rows of the batch.
    pub fn rows(&self) -> usize {
        self.segments.iter().map(|s| s.0).sum()
    }
}

/// Segments of `(len, delta)` laid end to end from row 0.
pub fn segs(spec: &[(usize, Option<usize>)]) -> Vec<Segment> {
    let mut start = 0;
    spec.iter()
        .map(|&(len, delta)| {
            let s = Segment { start, len, delta };
            start += len;
            s
        })
        .collect()
}

pub fn q4() -> Cfg {
    Cfg::Quant {
        bits: 4,
        group: 32,
        sym: true,
    }
}

/// One delta, two, many (17, mixed codecs), base-only and empty segments.
pub fn sbmm_cases() -> Vec<SbmmCase> {
    let many: Vec<Cfg> = all_cfgs()
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
        SbmmCase {
            name: "one delta, all rows",
            segments: vec![(40, Some(0))],
            deltas: vec![q4()],
        },
        SbmmCase {
            name: "one delta, decode",
            segments: vec![(3, Some(0))],
            deltas: vec![Cfg::Sign1],
        },
        SbmmCase {
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
        SbmmCase {
            name: "17 deltas, base-only rows",
            segments: many_segs,
            deltas: many,
        },
        SbmmCase {
            name: "base only, empty segments",
            segments: vec![(0, Some(0)), (4, None), (0, None), (3, None), (0, Some(0))],
            deltas: vec![q4()],
        },
        SbmmCase {
            name: "no deltas at all",
            segments: vec![(6, None)],
            deltas: vec![],
        },
        SbmmCase {
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

/// Per-row magnitudes of an sbmm: each segment's rows use its own delta's (all tensors on the CPU).
pub fn sbmm_magnitude(
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

/// The magnitude of each element of `base_w + D`: `|base_w| + |D|`.
pub fn merge_magnitude(base: &Tensor, d: &DeviceDelta) -> Tensor {
    let dense = reference::dequantize(d).unwrap().abs().unwrap();
    let b = base.to_dtype(DType::F32).unwrap().abs().unwrap();
    (b.reshape(dense.dims()).unwrap() + dense)
        .unwrap()
        .reshape(base.dims())
        .unwrap()
}

/// The magnitude of each element of `base + D[ids]`: `|base| + |D[ids]|`.
pub fn embedding_magnitude(ids: &Tensor, base: &Tensor, d: &DeviceDelta) -> Tensor {
    let dense = reference::dequantize(d).unwrap().abs().unwrap();
    let flat = ids.flatten_all().unwrap().to_dtype(DType::U32).unwrap();
    let rows = dense.index_select(&flat, 0).unwrap();
    let b = base.to_dtype(DType::F32).unwrap().abs().unwrap();
    (b.reshape(rows.dims()).unwrap() + rows)
        .unwrap()
        .reshape(base.dims())
        .unwrap()
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

/// A manifest entry for packed `parts` of `p` (checksums are not looked at by `from_parts`).
pub fn entry_for(
    p: &Payload,
    role: Role,
    rows: Option<(usize, u64)>,
    parts: &[Vec<u8>],
) -> TensorEntry {
    let (n, k) = p.dims();
    let layout = dz_format::layout::part_layout("w", &p.codec(), n, k, rows.is_some()).unwrap();
    let mut lens: Vec<u64> = parts.iter().map(|b| b.len() as u64).collect();
    if let Some((_, r)) = rows {
        lens.insert(0, 4 * r);
    }
    TensorEntry {
        name: "w".into(),
        role,
        shape: vec![rows.map_or(n, |(total, _)| total) as u64, k as u64],
        dtype: Dtype::Bf16,
        codec: p.codec(),
        rows: rows.map(|(_, r)| r),
        parts: layout
            .iter()
            .zip(lens)
            .map(|(spec, len)| PartEntry {
                name: spec.name.into(),
                len,
                raw_len: len,
                compression: dz_format::Compression::None,
                blake3: "0".repeat(64),
            })
            .collect(),
    }
}

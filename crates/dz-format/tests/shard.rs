//! Shards for tensor parallelism (SPEC.md section 8): for every codec, shape, world size and axis, each
//! rank's shard decodes bit for bit to its slice of the unsharded matrix, the slices put back together
//! are the whole, and every refused split is a named `Unshardable` error for the documented reason. Then
//! the per-rank plan of a small Llama-shaped delta file.

use std::collections::BTreeMap;
use std::ops::Range;

use dz_format::codec::{Dense, Grid, Payload, Quant, Sign1, Sparse, Sparse24};
use dz_format::shard::{
    check_even_split, shard_range, shard_rank, tp_plan, Axis, Placement, TensorShard, TpLayer,
};
use dz_format::{
    BaseFingerprint, Codec, DeltaFile, DeltaWriter, Dtype, EncodedTensor, Error, Lossless,
    QuantParams, Recipe, Role,
};
use half::f16;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------------------
// Seeded payloads of every codec.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cfg {
    Quant { bits: u8, group: u32, sym: bool },
    Sparse24 { bits: u8, group: u32, sym: bool },
    Sparse { bits: u8, group: u32, sym: bool },
    Sign1,
    Dense(Dtype),
    Zero,
}

impl Cfg {
    fn label(&self) -> String {
        format!("{self:?}")
    }

    fn fits(&self, k: usize) -> bool {
        !matches!(self, Cfg::Sparse24 { .. }) || k.is_multiple_of(4)
    }

    fn group(&self) -> Option<u32> {
        match *self {
            Cfg::Quant { group, .. } | Cfg::Sparse24 { group, .. } | Cfg::Sparse { group, .. } => {
                Some(group)
            }
            _ => None,
        }
    }
}

fn all_cfgs() -> Vec<Cfg> {
    let mut v = Vec::new();
    for bits in [2, 3, 4, 8] {
        for group in [0, 32, 128, 20] {
            for sym in [true, false] {
                v.push(Cfg::Quant { bits, group, sym });
            }
        }
        for (group, sym) in [(0, true), (128, false), (32, true), (12, false)] {
            v.push(Cfg::Sparse24 { bits, group, sym });
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

fn grid(rng: &mut StdRng, p: QuantParams, rows: usize, cols: usize) -> Grid {
    let g = rows * p.n_groups(cols);
    let levels = (1u32 << p.bits) as f32;
    Grid {
        params: p,
        scales: (0..g)
            .map(|_| f16::from_f32(rng.gen_range(-2.0..2.0)))
            .collect(),
        zeros: (!p.symmetric).then(|| {
            (0..g)
                .map(|_| f16::from_f32(rng.gen_range(0.0..levels)))
                .collect()
        }),
    }
}

fn payload(cfg: Cfg, rows: usize, cols: usize, seed: u64) -> Payload {
    let mut rng = StdRng::seed_from_u64(seed);
    let p = |bits, group_size, symmetric| QuantParams {
        bits,
        group_size,
        symmetric,
        global_scale: 1.0 / 64.0,
    };
    let code = |rng: &mut StdRng, bits: u8| rng.gen_range(0..(1u16 << bits)) as u8;
    match cfg {
        Cfg::Quant { bits, group, sym } => {
            let grid = grid(&mut rng, p(bits, group, sym), rows, cols);
            Payload::Quant(Quant {
                rows,
                cols,
                grid,
                codes: (0..rows * cols).map(|_| code(&mut rng, bits)).collect(),
            })
        }
        Cfg::Sparse24 { bits, group, sym } => {
            let grid = grid(&mut rng, p(bits, group, sym), rows, cols);
            let positions = (0..rows * cols / 4)
                .flat_map(|_| {
                    let a = rng.gen_range(0..3u8);
                    [a, rng.gen_range(a + 1..4u8)]
                })
                .collect();
            Payload::Sparse24(Sparse24 {
                rows,
                cols,
                grid,
                codes: (0..rows * cols / 2).map(|_| code(&mut rng, bits)).collect(),
                positions,
            })
        }
        Cfg::Sparse { bits, group, sym } => {
            let grid = grid(&mut rng, p(bits, group, sym), rows, cols);
            // Row 0 keeps nothing, row 1 everything (when there are two), the rest about a third.
            let mask: Vec<bool> = (0..rows * cols)
                .map(|i| match i / cols {
                    0 if rows > 1 => false,
                    1 => true,
                    _ => rng.gen_bool(0.35),
                })
                .collect();
            let kept = mask.iter().filter(|&&m| m).count();
            Payload::Sparse(Sparse {
                rows,
                cols,
                grid,
                codes: (0..kept).map(|_| code(&mut rng, bits)).collect(),
                mask,
            })
        }
        Cfg::Sign1 => Payload::Sign1(Sign1 {
            rows,
            cols,
            global_scale: 1.0 / 64.0,
            signs: (0..rows * cols).map(|_| rng.gen_bool(0.5)).collect(),
            scales: (0..rows)
                .map(|_| f16::from_f32(rng.gen_range(0.25..2.0)))
                .collect(),
        }),
        Cfg::Dense(dtype) => {
            let v: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            Payload::Dense(Dense::from_f32(rows, cols, dtype, &v))
        }
        Cfg::Zero => Payload::Zero { rows, cols },
    }
}

/// A whole tensor of `n_total x k` (a row subset when `index` is given) as a one-rank shard.
fn whole(cfg: Cfg, n_total: usize, k: usize, index: Option<&[u32]>, seed: u64) -> TensorShard {
    let stored = index.map_or(n_total, <[u32]>::len);
    let p = payload(cfg, stored, k, seed);
    let role = if index.is_some() {
        Role::Embedding
    } else {
        Role::Linear
    };
    TensorShard::from_payload(
        "t",
        role,
        &[n_total as u64, k as u64],
        Dtype::Bf16,
        index,
        &p,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", cfg.label()))
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The dequantized matrix of a shard (its full `N_total x K`).
fn dense_of(s: &TensorShard) -> (usize, usize, Vec<f32>) {
    let (n, k) = s.entry.matrix_dims().unwrap();
    let d = s
        .decode()
        .unwrap_or_else(|e| panic!("shard does not decode: {e}"));
    (n, k, d.to_f32(n))
}

/// `range` of the rows or columns of a row-major `n x k` matrix.
fn slice(m: &[f32], k: usize, axis: Axis, range: &Range<usize>) -> Vec<f32> {
    match axis {
        Axis::Rows => m[range.start * k..range.end * k].to_vec(),
        Axis::Cols => m
            .chunks_exact(k)
            .flat_map(|row| &row[range.clone()])
            .copied()
            .collect(),
    }
}

/// Whether an even split must succeed: the rules of the shard module's table, restated.
fn splittable(cfg: Cfg, n: usize, k: usize, axis: Axis, world: usize) -> bool {
    match axis {
        Axis::Rows => n.is_multiple_of(world),
        Axis::Cols => {
            if !k.is_multiple_of(world) {
                return false;
            }
            let w = k / world;
            if matches!(cfg, Cfg::Sparse24 { .. }) && !w.is_multiple_of(4) {
                return false;
            }
            match cfg.group() {
                Some(g) if g > 0 => {
                    let g = g as usize;
                    (0..world).all(|r| {
                        let (c0, c1) = (r * w, (r + 1) * w);
                        c0 % g == 0 || c0 / g == (c1 - 1) / g
                    })
                }
                _ => true,
            }
        }
    }
}

/// Cuts `t` into `world` shards along `axis` and checks each against the unsharded matrix, bit for bit,
/// and the shards put back together against the whole. Returns whether the split was possible; a refusal
/// must be `Unshardable` and expected.
fn check_split(label: &str, t: &TensorShard, cfg: Cfg, axis: Axis, world: usize) -> bool {
    let (n, k, full) = dense_of(t);
    let refs = t.part_refs();
    let expect = splittable(cfg, n, k, axis, world);
    let ranges = match check_even_split(&t.entry, axis, world) {
        Ok(r) => r,
        Err(e) => {
            assert!(
                matches!(e, Error::Unshardable { .. }),
                "{label}: refused with the wrong error: {e}"
            );
            assert!(!expect, "{label}: refused but should split: {e}");
            // Every rank is refused alike.
            for r in 0..world {
                let got = shard_rank(&t.entry, &refs, axis, r, world);
                assert!(
                    matches!(got, Err(Error::Unshardable { .. })),
                    "{label}: rank {r}"
                );
            }
            return false;
        }
    };
    assert!(expect, "{label}: split but the rules say it cannot be");
    let mut pieces = Vec::new();
    for (r, range) in ranges.iter().enumerate() {
        let s = shard_rank(&t.entry, &refs, axis, r, world)
            .unwrap_or_else(|e| panic!("{label}: rank {r}: {e}"));
        let (sn, sk, got) = dense_of(&s);
        let want = slice(&full, k, axis, range);
        let len = range.end - range.start;
        assert_eq!(
            (sn, sk),
            match axis {
                Axis::Rows => (len, k),
                Axis::Cols => (n, len),
            },
            "{label}: rank {r} dims"
        );
        assert_eq!(f32_bits(&got), f32_bits(&want), "{label}: rank {r} values");
        // The shard is in the same format: same codec and parameters (or zero).
        assert!(
            s.entry.codec == t.entry.codec || s.entry.codec == Codec::Zero,
            "{label}: rank {r} codec {:?}",
            s.entry.codec
        );
        pieces.push(got);
    }
    // Put back together: rows one after the other, or each row's column slices side by side.
    let back: Vec<f32> = match axis {
        Axis::Rows => pieces.concat(),
        Axis::Cols => {
            let w = k / world;
            (0..n)
                .flat_map(|row| pieces.iter().flat_map(move |p| &p[row * w..(row + 1) * w]))
                .copied()
                .collect()
        }
    };
    assert_eq!(f32_bits(&back), f32_bits(&full), "{label}: reassembled");
    true
}

const WORLDS: [usize; 4] = [1, 2, 4, 8];
/// `(N, K)`: divisible by 8 with groups that align or not; 2:4 runs cut at 8 ranks (K = 40); not
/// divisible (12 x 100 at 8 ranks).
const SHAPES: [(usize, usize); 4] = [(16, 256), (8, 96), (24, 40), (12, 100)];

#[test]
fn every_codec_shape_world_and_axis() {
    // Per codec kind and axis: (splits, refusals), so that a matrix that only refuses fails.
    let mut seen: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        for (si, &(n, k)) in SHAPES.iter().enumerate() {
            if !cfg.fits(k) {
                continue;
            }
            let t = whole(cfg, n, k, None, (ci * 10 + si) as u64);
            for world in WORLDS {
                for axis in [Axis::Rows, Axis::Cols] {
                    let label = format!("{} {n}x{k} {} / {world}", cfg.label(), axis.as_str());
                    let ok = check_split(&label, &t, cfg, axis, world);
                    let kind = format!("{} {}", t.entry.codec.kind(), axis.as_str());
                    let e = seen.entry(kind).or_default();
                    if ok {
                        e.0 += 1
                    } else {
                        e.1 += 1
                    }
                }
            }
        }
    }
    for (kind, (ok, refused)) in &seen {
        assert!(*ok > 0, "{kind}: no split ran");
        // Rows always split when N divides; 12 rows over 8 ranks is the refusal of every codec.
        assert!(*refused > 0, "{kind}: no refusal was exercised");
    }
    assert_eq!(seen.len(), 12, "{seen:?}");
}

/// A row split re-slices bytes: the ranks' parts, concatenated, are the whole tensor's parts (but
/// `sparse`'s `row_ptr`, which each shard rebases).
#[test]
fn row_split_is_byte_slicing() {
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        let t = whole(cfg, 16, 96, None, ci as u64);
        let refs = t.part_refs();
        let shards: Vec<_> = (0..4)
            .map(|r| shard_rank(&t.entry, &refs, Axis::Rows, r, 4).unwrap())
            .collect();
        for (i, spec) in t.entry.parts.iter().enumerate() {
            if spec.name == "row_ptr" {
                continue;
            }
            let cat: Vec<u8> = shards.iter().flat_map(|s| s.parts[i].clone()).collect();
            assert_eq!(cat, t.parts[i], "{}: part {}", cfg.label(), spec.name);
        }
    }
}

/// Row subsets (embedding / lm_head style): rows split into ranks that hold some stored rows, or none (a
/// `zero` shard); columns split keeps the index.
#[test]
fn row_subsets() {
    let index = [0u32, 3, 4, 10, 17, 29, 30, 31];
    let (n, k) = (40, 64);
    for (ci, cfg) in all_cfgs().into_iter().enumerate() {
        if cfg == Cfg::Zero {
            continue; // a zero tensor stores no rows
        }
        let t = whole(cfg, n, k, Some(&index), 300 + ci as u64);
        for world in WORLDS {
            for axis in [Axis::Rows, Axis::Cols] {
                let label = format!("{} subset {} / {world}", cfg.label(), axis.as_str());
                check_split(&label, &t, cfg, axis, world);
            }
        }
        // 8 ranks of 5 rows: rank 4 (rows 20..25) stores none, rank 5 (25..30) row 29 only.
        let refs = t.part_refs();
        let s4 = shard_rank(&t.entry, &refs, Axis::Rows, 4, 8).unwrap();
        assert_eq!(s4.entry.codec, Codec::Zero, "{}", cfg.label());
        assert!(s4.parts.is_empty() && s4.entry.rows.is_none());
        let s5 = shard_rank(&t.entry, &refs, Axis::Rows, 5, 8).unwrap();
        assert_eq!(s5.entry.rows, Some(1));
        assert_eq!(
            s5.parts[0],
            4u32.to_le_bytes(),
            "row 29 is row 4 of the shard"
        );
    }
}

/// Refusals name the tensor, the split and the reason.
#[test]
fn refusals_are_named() {
    let refused = |t: &TensorShard, axis, world, needle: &str| {
        let err = shard_rank(&t.entry, &t.part_refs(), axis, 0, world).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Unshardable { .. }), "{msg}");
        assert!(msg.contains("\"t\"") && msg.contains(needle), "{msg}");
    };
    let q = |group| Cfg::Quant {
        bits: 4,
        group,
        sym: true,
    };
    // Not divisible.
    refused(
        &whole(q(0), 12, 100, None, 1),
        Axis::Rows,
        8,
        "do not divide",
    );
    refused(
        &whole(q(0), 12, 100, None, 1),
        Axis::Cols,
        8,
        "do not divide",
    );
    // Rank 1 would start inside group 6 (columns 120..140) of 20.
    refused(
        &whole(q(20), 4, 256, None, 1),
        Axis::Cols,
        2,
        "quantization group 6",
    );
    // 40 columns over 4 ranks: 10 each, which cuts a 2:4 run.
    let s24 = Cfg::Sparse24 {
        bits: 4,
        group: 0,
        sym: true,
    };
    refused(&whole(s24, 4, 40, None, 1), Axis::Cols, 4, "2:4 run");
    // Bad rank / world.
    refused(&whole(q(0), 4, 64, None, 1), Axis::Rows, 0, "rank 0 of 0");
    // An explicit range outside the matrix.
    let t = whole(q(0), 4, 64, None, 1);
    let err = shard_range(&t.entry, &t.part_refs(), Axis::Cols, 60..68).unwrap_err();
    assert!(matches!(err, Error::Unshardable { .. }), "{err}");
    // Parts that do not match the layout are the format's named errors, not panics.
    let mut parts = t.part_refs();
    parts[0] = &parts[0][1..];
    let err = shard_range(&t.entry, &parts, Axis::Cols, 0..32).unwrap_err();
    assert!(matches!(err, Error::InvalidPart { .. }), "{err}");
}

/// A group may be cut when every rank's slice lies inside one group (each shard has one group).
#[test]
fn slices_inside_one_group() {
    let t = whole(
        Cfg::Quant {
            bits: 3,
            group: 128,
            sym: false,
        },
        4,
        256,
        None,
        7,
    );
    // 8 ranks of 32 columns: 4 ranks per group.
    assert!(check_split(
        "quant g128 8 ranks",
        &t,
        Cfg::Quant {
            bits: 3,
            group: 128,
            sym: false
        },
        Axis::Cols,
        8
    ));
    let s = shard_rank(&t.entry, &t.part_refs(), Axis::Cols, 5, 8).unwrap();
    let Payload::Quant(q) = s.decode().unwrap().payload else {
        panic!("not quant")
    };
    assert_eq!(q.grid.scales.len(), 4, "one group per row");
}

// ---------------------------------------------------------------------------------------------------------
// The same property over random payloads and ranges.

fn any_cfg() -> impl Strategy<Value = Cfg> {
    let g = (0u32..=16).prop_map(|g| g * 4);
    let bits = prop::sample::select(vec![2u8, 3, 4, 8]);
    prop_oneof![
        (bits.clone(), g.clone(), any::<bool>()).prop_map(|(bits, group, sym)| Cfg::Quant {
            bits,
            group,
            sym
        }),
        (bits.clone(), g.clone(), any::<bool>()).prop_map(|(bits, group, sym)| Cfg::Sparse24 {
            bits,
            group,
            sym
        }),
        (bits, g, any::<bool>()).prop_map(|(bits, group, sym)| Cfg::Sparse { bits, group, sym }),
        Just(Cfg::Sign1),
        prop::sample::select(vec![Dtype::F32, Dtype::F16, Dtype::Bf16]).prop_map(Cfg::Dense),
        Just(Cfg::Zero),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Even splits: every rank decodes to its slice; refusals only where the rules say.
    #[test]
    fn even_splits(
        cfg in any_cfg(),
        n in 1usize..20,
        k4 in 1usize..40,
        world in prop::sample::select(WORLDS.to_vec()),
        rows in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let k = if matches!(cfg, Cfg::Sparse24 { .. }) { 4 * k4 } else { k4 * 3 };
        let t = whole(cfg, n, k, None, seed);
        let axis = if rows { Axis::Rows } else { Axis::Cols };
        check_split(&format!("{} {n}x{k} / {world}", cfg.label()), &t, cfg, axis, world);
    }

    /// Any range, including ones that start inside a byte of a bit stream: exact or refused.
    #[test]
    fn any_range(
        cfg in any_cfg(),
        n in 1usize..12,
        k4 in 1usize..40,
        a in 0usize..1000,
        b in 0usize..1000,
        rows in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let k = 4 * k4;
        let t = whole(cfg, n, k, None, seed);
        let (axis, len) = if rows { (Axis::Rows, n) } else { (Axis::Cols, k) };
        let (a, b) = (a % len, b % len);
        let range = a.min(b)..a.max(b) + 1;
        let (_, _, full) = dense_of(&t);
        match shard_range(&t.entry, &t.part_refs(), axis, range.clone()) {
            Ok(s) => {
                let (_, _, got) = dense_of(&s);
                prop_assert_eq!(f32_bits(&got), f32_bits(&slice(&full, k, axis, &range)));
            }
            Err(e) => {
                prop_assert!(matches!(e, Error::Unshardable { .. }), "{}", e);
                prop_assert!(!rows, "a row range is never refused: {}", e);
                let refused_24 = matches!(cfg, Cfg::Sparse24 { .. })
                    && (range.start % 4 != 0 || range.end % 4 != 0);
                let g = cfg.group().unwrap_or(0) as usize;
                let refused_group = g > 0
                    && range.start % g != 0
                    && range.start / g != (range.end - 1) / g;
                prop_assert!(refused_24 || refused_group, "{}", e);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The plan of a file.

fn encoded(
    name: &str,
    role: Role,
    shape: &[u64],
    cfg: Cfg,
    index: Option<&[u32]>,
) -> EncodedTensor {
    let (n, k) = (
        shape[..shape.len() - 1].iter().product::<u64>() as usize,
        *shape.last().unwrap() as usize,
    );
    let rows = index.map_or(n, <[u32]>::len);
    let seed = name.len() as u64;
    EncodedTensor::from_payload(
        name,
        role,
        shape,
        Dtype::Bf16,
        index,
        &payload(cfg, rows, k, seed),
        Lossless::Zstd(3),
    )
    .unwrap()
}

/// A one-layer Llama-shaped delta: hidden 64, 4 heads of 16, 2 KV heads, intermediate 96, vocab 40.
fn llama_delta(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tiny.dz");
    let arch = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 40
    });
    let hex = "0".repeat(64);
    let base = BaseFingerprint {
        combined: hex.clone(),
        tensors: [("model.embed_tokens.weight".to_string(), hex)].into(),
    };
    let mut w = DeltaWriter::create(&path, "tiny", arch, base, Recipe::default()).unwrap();
    let q4 = |group| Cfg::Quant {
        bits: 4,
        group,
        sym: false,
    };
    let s24 = Cfg::Sparse24 {
        bits: 2,
        group: 32,
        sym: true,
    };
    let sp = Cfg::Sparse {
        bits: 3,
        group: 0,
        sym: true,
    };
    let l = "model.layers.0";
    let index: Vec<u32> = vec![1, 2, 7, 30, 39];
    for t in [
        encoded(
            "model.embed_tokens.weight",
            Role::Embedding,
            &[40, 64],
            q4(32),
            Some(&index),
        ),
        encoded(
            &format!("{l}.self_attn.q_proj.weight"),
            Role::Linear,
            &[64, 64],
            s24,
            None,
        ),
        encoded(
            &format!("{l}.self_attn.q_proj.bias"),
            Role::DenseDelta,
            &[64],
            Cfg::Dense(Dtype::F32),
            None,
        ),
        encoded(
            &format!("{l}.self_attn.k_proj.weight"),
            Role::Linear,
            &[32, 64],
            sp,
            None,
        ),
        encoded(
            &format!("{l}.self_attn.v_proj.weight"),
            Role::Linear,
            &[32, 64],
            Cfg::Sign1,
            None,
        ),
        encoded(
            &format!("{l}.self_attn.o_proj.weight"),
            Role::Linear,
            &[64, 64],
            q4(0),
            None,
        ),
        encoded(
            &format!("{l}.mlp.gate_proj.weight"),
            Role::Linear,
            &[96, 64],
            q4(32),
            None,
        ),
        encoded(
            &format!("{l}.mlp.up_proj.weight"),
            Role::Linear,
            &[96, 64],
            Cfg::Zero,
            None,
        ),
        encoded(
            &format!("{l}.mlp.down_proj.weight"),
            Role::Linear,
            &[64, 96],
            q4(8),
            None,
        ),
        encoded(
            &format!("{l}.input_layernorm.weight"),
            Role::DenseDelta,
            &[64],
            Cfg::Dense(Dtype::Bf16),
            None,
        ),
        encoded("lm_head.weight", Role::LmHead, &[40, 64], sp, Some(&index)),
    ] {
        w.add(t).unwrap();
    }
    w.finish().unwrap();
    path
}

#[test]
fn plan_of_a_llama_delta() {
    let dir = tempfile::tempdir().unwrap();
    let file = DeltaFile::open(llama_delta(dir.path())).unwrap();
    for world in [1, 2, 4, 8] {
        let plan = tp_plan(&file, world).unwrap();
        assert_eq!(plan.world, world);
        assert_eq!(plan.tensors.len(), file.manifest().tensors.len());
        for tp in &plan.tensors {
            let entry = file.manifest().tensor(&tp.name).unwrap();
            let data = file.read(&tp.name).unwrap();
            let parts: Vec<&[u8]> = data.parts.iter().map(|p| p.as_ref()).collect();
            let layer_name = tp.name.rsplit_once('.').unwrap().0;
            let want_layer = if layer_name.ends_with("o_proj") || layer_name.ends_with("down_proj")
            {
                TpLayer::RowParallel
            } else if layer_name.ends_with("_proj") {
                TpLayer::ColumnParallel
            } else {
                TpLayer::Replicated
            };
            assert_eq!(tp.layer, want_layer, "{}", tp.name);
            match &tp.placement {
                Placement::Split { axis, ranges } => {
                    // Per-rank bytes are those of the real shards.
                    for (r, range) in ranges.iter().enumerate() {
                        let s = shard_range(entry, &parts, *axis, range.clone()).unwrap();
                        assert_eq!(tp.rank_bytes[r], s.nbytes() as u64, "{} rank {r}", tp.name);
                    }
                    let want_axis = match (tp.layer, entry.shape.len()) {
                        (TpLayer::ColumnParallel, 2) => Axis::Rows,
                        _ => Axis::Cols,
                    };
                    assert_eq!(*axis, want_axis, "{}", tp.name);
                }
                Placement::Replicated => {
                    assert!(
                        tp.layer == TpLayer::Replicated || entry.shape.len() == 1,
                        "{}",
                        tp.name
                    );
                    assert_eq!(tp.rank_bytes, vec![tp.bytes; world]);
                }
                Placement::Refused { .. } => {
                    assert_eq!(tp.rank_bytes, vec![tp.bytes; world]);
                }
            }
        }
        let refused: Vec<&str> = plan.refused().map(|t| t.name.as_str()).collect();
        match world {
            // down_proj: 96 columns in groups of 8; 8 ranks of 12 columns: rank 1 starts inside group 1 (8..16).
            8 => assert_eq!(refused, ["model.layers.0.mlp.down_proj.weight"]),
            _ => assert!(refused.is_empty(), "{world}: {refused:?}"),
        }
        let totals = plan.rank_bytes();
        assert_eq!(totals.len(), world);
        if world == 1 {
            assert_eq!(totals, [plan.total_bytes()]);
        }
    }
    // 4 ranks, 2 KV heads of 16: each head on two ranks (mistral.rs's compute_kv_shard).
    let plan = tp_plan(&file, 4).unwrap();
    let k = plan
        .tensors
        .iter()
        .find(|t| t.name.ends_with("k_proj.weight"))
        .unwrap();
    assert_eq!(
        k.placement,
        Placement::Split {
            axis: Axis::Rows,
            ranges: vec![0..16, 0..16, 16..32, 16..32]
        }
    );
    let q = plan
        .tensors
        .iter()
        .find(|t| t.name.ends_with("q_proj.weight"))
        .unwrap();
    assert_eq!(
        q.placement,
        Placement::Split {
            axis: Axis::Rows,
            ranges: vec![0..16, 16..32, 32..48, 48..64]
        }
    );
    assert!(tp_plan(&file, 0).is_err());
}

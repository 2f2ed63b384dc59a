//! Writes small valid delta files, one per codec plus a mixed one, as the fuzzer's seed corpus.
//!
//! `cargo run -p dz-format --example write_fuzz_seeds -- fuzz/seeds`

use std::collections::BTreeMap;

use dz_format::codec::{Dense, Grid, Payload, Quant, Sign1, Sparse, Sparse24};
use dz_format::fingerprint::tensor_hash;
use dz_format::{
    BaseFingerprint, DeltaWriter, Dtype, EncodedTensor, Lossless, QuantParams, Recipe, Role,
};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn grid(rng: &mut StdRng, params: QuantParams, rows: usize, cols: usize) -> Grid {
    let g = rows * params.n_groups(cols);
    Grid {
        params,
        scales: (0..g)
            .map(|_| f16::from_f32(rng.gen_range(0.1..2.0)))
            .collect(),
        zeros: (!params.symmetric).then(|| {
            (0..g)
                .map(|_| f16::from_f32(rng.gen_range(0.0..3.0)))
                .collect()
        }),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/seeds".into());
    std::fs::create_dir_all(&dir)?;
    let mut rng = StdRng::seed_from_u64(1);
    let (r, c) = (4, 16);
    let p = |bits, group_size, symmetric| QuantParams {
        bits,
        group_size,
        symmetric,
        global_scale: 0.01,
    };
    let positions: Vec<u8> = (0..r * c / 4).flat_map(|i| [(i % 3) as u8, 3]).collect();
    let mask: Vec<bool> = (0..r * c).map(|i| i % 3 == 0).collect();
    let nnz = mask.iter().filter(|&&m| m).count();
    let payloads = vec![
        (
            "quant",
            Payload::Quant(Quant {
                rows: r,
                cols: c,
                grid: grid(&mut rng, p(4, 8, false), r, c),
                codes: (0..r * c).map(|i| (i % 16) as u8).collect(),
            }),
        ),
        (
            "sparse24",
            Payload::Sparse24(Sparse24 {
                rows: r,
                cols: c,
                grid: grid(&mut rng, p(2, 0, true), r, c),
                codes: (0..r * c / 2).map(|i| (i % 4) as u8).collect(),
                positions,
            }),
        ),
        (
            "sparse",
            Payload::Sparse(Sparse {
                rows: r,
                cols: c,
                grid: grid(&mut rng, p(3, 4, true), r, c),
                mask,
                codes: (0..nnz).map(|i| (i % 8) as u8).collect(),
            }),
        ),
        (
            "sign1",
            Payload::Sign1(Sign1 {
                rows: r,
                cols: c,
                global_scale: 0.5,
                signs: (0..r * c).map(|i| i % 5 < 2).collect(),
                scales: vec![f16::ONE; r],
            }),
        ),
        (
            "dense",
            Payload::Dense(Dense::from_f32(
                1,
                c,
                Dtype::F16,
                &(0..c).map(|i| i as f32).collect::<Vec<_>>(),
            )),
        ),
    ];
    let base = BaseFingerprint::from_tensor_hashes(BTreeMap::from([(
        "w".to_string(),
        tensor_hash("w", "f32", &[1], &[0; 4]),
    )]));
    let recipe = Recipe {
        tool: "seeds".into(),
        method: "test".into(),
        ..Default::default()
    };
    let mut all = Vec::new();
    for (i, (name, payload)) in payloads.into_iter().enumerate() {
        let shape = [payload.dims().0 as u64, payload.dims().1 as u64];
        let role = if matches!(payload, Payload::Dense(_)) {
            Role::DenseDelta
        } else {
            Role::Linear
        };
        let lossless = if i % 2 == 0 {
            Lossless::Zstd(3)
        } else {
            Lossless::None
        };
        let t =
            EncodedTensor::from_payload(name, role, &shape, Dtype::F16, None, &payload, lossless)?;
        let mut w = DeltaWriter::create(
            format!("{dir}/{name}.dz"),
            name,
            serde_json::json!({}),
            base.clone(),
            recipe.clone(),
        )?;
        w.add(t.clone())?;
        w.finish()?;
        all.push(t);
    }
    // A tensor the fine-tune left untouched.
    all.push(EncodedTensor::from_payload(
        "untouched",
        Role::Linear,
        &[r as u64, c as u64],
        Dtype::F16,
        None,
        &Payload::Zero { rows: r, cols: c },
        Lossless::None,
    )?);
    // A row subset of an embedding.
    let emb = Payload::Quant(Quant {
        rows: 2,
        cols: c,
        grid: grid(&mut rng, p(8, 0, true), 2, c),
        codes: (0..2 * c).map(|i| i as u8).collect(),
    });
    all.push(EncodedTensor::from_payload(
        "emb",
        Role::Embedding,
        &[6, c as u64],
        Dtype::F16,
        Some(&[1, 4]),
        &emb,
        Lossless::Zstd(3),
    )?);
    let mut w = DeltaWriter::create(
        format!("{dir}/mixed.dz"),
        "mixed",
        serde_json::json!({"model_type": "llama"}),
        base,
        recipe,
    )?;
    for t in all {
        w.add(t)?;
    }
    w.finish()?;
    println!("wrote seeds to {dir}");
    Ok(())
}

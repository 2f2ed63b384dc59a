//! How long checking a packed payload takes: `Payload::unpack` (builds the logical form: a byte per code,
//! the 2:4 positions) against `Payload::check` (the same verdict, streaming over the packed bytes), on
//! the delta shapes of a 7B Llama layer, one thread. What a server pays per delta it reads.
//!
//! ```text
//! cargo run --release -p dz-format --example check_bench [REPEATS]
//! ```

use std::time::Instant;

use dz_format::codec::{Grid, Payload, Quant, Sparse24};
use dz_format::QuantParams;
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn grid(rng: &mut StdRng, rows: usize, cols: usize, bits: u8) -> Grid {
    let params = QuantParams {
        bits,
        group_size: 128,
        symmetric: true,
        global_scale: 1.0 / 64.0,
    };
    Grid {
        params,
        scales: (0..rows * params.n_groups(cols))
            .map(|_| f16::from_f32(rng.gen_range(0.25f32..2.0)))
            .collect(),
        zeros: None,
    }
}

fn payloads(rows: usize, cols: usize) -> Vec<(&'static str, Payload)> {
    let mut rng = StdRng::seed_from_u64(7);
    const PAIRS: [(u8, u8); 6] = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)];
    let mut v = Vec::new();
    for bits in [4u8, 2] {
        let grid24 = grid(&mut rng, rows, cols, bits);
        let mut positions = Vec::with_capacity(rows * cols / 2);
        for _ in 0..rows * cols / 4 {
            let (a, b) = PAIRS[rng.gen_range(0..6)];
            positions.extend([a, b]);
        }
        let codes = (0..rows * cols / 2)
            .map(|_| rng.gen_range(0..1u8 << bits))
            .collect();
        v.push((
            if bits == 4 {
                "sparse24 4b g128"
            } else {
                "sparse24 2b g128"
            },
            Payload::Sparse24(Sparse24 {
                rows,
                cols,
                grid: grid24,
                codes,
                positions,
            }),
        ));
    }
    let g = grid(&mut rng, rows, cols, 4);
    let codes = (0..rows * cols).map(|_| rng.gen_range(0..16u8)).collect();
    v.push((
        "quant 4b g128",
        Payload::Quant(Quant {
            rows,
            cols,
            grid: g,
            codes,
        }),
    ));
    v
}

fn main() {
    let repeats: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!("| shape | codec | packed MB | unpack ms | check ms | speedup |");
    println!("|---|---|---:|---:|---:|---:|");
    for (rows, cols) in [(4096usize, 4096usize), (11008, 4096), (4096, 11008)] {
        for (name, p) in payloads(rows, cols) {
            let parts = p.pack().expect("pack");
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let codec = p.codec();
            let mb = parts.iter().map(Vec::len).sum::<usize>() as f64 / 1e6;
            let time = |f: &dyn Fn()| {
                let mut best = f64::INFINITY;
                for _ in 0..repeats {
                    let t = Instant::now();
                    f();
                    best = best.min(t.elapsed().as_secs_f64() * 1e3);
                }
                best
            };
            let unpack = time(&|| {
                Payload::unpack("w", &codec, rows, cols, &refs).expect("valid");
            });
            let check = time(&|| Payload::check("w", &codec, rows, cols, &refs).expect("valid"));
            println!(
                "| {rows} x {cols} | {name} | {mb:.1} | {unpack:.1} | {check:.1} | {:.1}x |",
                unpack / check
            );
        }
    }
}

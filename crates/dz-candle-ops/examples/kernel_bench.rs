//! Baseline timing of the CUDA `delta_matmul` kernels against candle's cuBLAS bf16 matmul on the same
//! shapes (the first step of the kernel-speed issue: the kernels are correct, not tuned yet).
//!
//! `cargo build --release -p dz-candle-ops --features cuda --example kernel_bench`, then on the GPU:
//! `kernel_bench [--quick] [--out FILE.json]`. Prints a markdown table.
//!
//! Each case: x is bf16 `[rows, K]`; the delta has N x K. Time = mean over a batch of launches between two
//! device synchronisations (launch overhead included), median of several batches, after warm-up; several
//! copies of the weights are rotated so that L2 (60 MB) does not hold them. Bytes = packed delta + x + y.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use common::{payload, Cfg};
use dz_candle_ops::{delta_matmul, DeviceDelta};

/// Device copy bandwidth measured on the H200 (shared/gpu/README.md).
const COPY_BW: f64 = 4.3e12;
const L2_BYTES: usize = 60 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Mean seconds per call of `f` over batches of `iters`, median of `batches`.
fn time(
    dev: &Device,
    iters: usize,
    batches: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    for i in 0..3 {
        f(i)?;
    }
    dev.synchronize()?;
    let mut v = Vec::with_capacity(batches);
    for b in 0..batches {
        let t = Instant::now();
        for i in 0..iters {
            f(b * iters + i)?;
        }
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() / iters as f64);
    }
    Ok(median(v))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1).cloned());
    let dev = Device::new_cuda(0).context("no CUDA device")?;
    let shapes: &[(usize, usize)] = if quick {
        &[(4096, 4096), (1536, 576)]
    } else {
        &[
            (4096, 4096),
            (11008, 4096),
            (4096, 11008),
            (5120, 5120),
            (13824, 5120),
            (5120, 13824),
            (1536, 576),
        ]
    };
    let rows_list: &[usize] = if quick {
        &[1, 64]
    } else {
        &[1, 2, 4, 8, 16, 32, 64, 128, 256]
    };
    let cfgs = [
        (
            "4b 2:4",
            Cfg::Sparse24 {
                bits: 4,
                group: 128,
                sym: true,
            },
        ),
        (
            "2b 2:4",
            Cfg::Sparse24 {
                bits: 2,
                group: 128,
                sym: true,
            },
        ),
        (
            "4b g128",
            Cfg::Quant {
                bits: 4,
                group: 128,
                sym: true,
            },
        ),
        (
            "2b g128",
            Cfg::Quant {
                bits: 2,
                group: 128,
                sym: true,
            },
        ),
        ("1b sign", Cfg::Sign1),
    ];
    println!("| N x K | codec | rows | dz us | cuBLAS bf16 us | speedup | dz GB/s | % copy BW | byte ratio |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut json = Vec::new();
    for &(n, k) in shapes {
        // Dense bf16 weights for cuBLAS, rotated past L2.
        let w_bytes = n * k * 2;
        let copies_w = (2 * L2_BYTES / w_bytes).clamp(2, 8);
        let ws: Vec<Tensor> = (0..copies_w)
            .map(|_| Tensor::randn(0f32, 0.02, (n, k), &dev).and_then(|t| t.to_dtype(DType::BF16)))
            .collect::<candle_core::Result<_>>()?;
        for (label, cfg) in cfgs {
            let host = payload(cfg, n, k, 7);
            let one = DeviceDelta::from_payload(&host, None, &dev)?;
            let d_bytes = one.nbytes();
            let copies = (2 * L2_BYTES / d_bytes.max(1)).clamp(2, 8);
            let mut deltas = vec![one];
            for _ in 1..copies {
                deltas.push(DeviceDelta::from_payload(&host, None, &dev)?);
            }
            for &rows in rows_list {
                let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?.to_dtype(DType::BF16)?;
                let iters = 50;
                let t_dz = time(&dev, iters, 7, |i| {
                    delta_matmul(&x, &deltas[i % deltas.len()])?;
                    Ok(())
                })?;
                let t_cb = time(&dev, iters, 7, |i| {
                    x.matmul(&ws[i % ws.len()].t()?)?;
                    Ok(())
                })?;
                let bytes = d_bytes + rows * k * 2 + rows * n * 2;
                let bw = bytes as f64 / t_dz;
                let byte_ratio = (w_bytes + rows * k * 2 + rows * n * 2) as f64 / bytes as f64;
                println!(
                    "| {n} x {k} | {label} | {rows} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0}% | {:.2} |",
                    t_dz * 1e6,
                    t_cb * 1e6,
                    t_cb / t_dz,
                    bw / 1e9,
                    100.0 * bw / COPY_BW,
                    byte_ratio
                );
                json.push(serde_json::json!({
                    "op": "delta_matmul", "codec": label, "rows": rows, "n": n, "k": k, "deltas": 1,
                    "time_us": t_dz * 1e6, "cublas_us": t_cb * 1e6, "bytes": bytes,
                    "pct_bw": 100.0 * bw / COPY_BW, "speedup_vs_cublas": t_cb / t_dz,
                    "byte_ratio": byte_ratio,
                }));
            }
        }
    }
    if let Some(path) = out {
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

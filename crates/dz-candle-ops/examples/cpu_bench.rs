//! CPU benchmark: the delta matmul fast path against candle's dense f32 matmul on the same shapes.
//!
//! ```sh
//! cargo run --release -p dz-candle-ops --example cpu_bench            # full run
//! cargo run --release -p dz-candle-ops --example cpu_bench -- --quick # one shape, fewer repeats
//! ```
//!
//! Writes `bench/results/cpu-ops-<date>.md` and `.json` (or under `--out DIR`) with the machine (CPU
//! model, cores), the git commit and the date. Every delta is first checked against its merged dense
//! weight, so nothing wrong is timed.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use dz_candle_ops::{delta_matmul, dequantize, DeviceDelta};
use dz_format::codec::{Grid, Payload, Quant, Sign1, Sparse24};
use dz_format::QuantParams;
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Clone, Copy)]
enum Codec {
    Quant { bits: u8 },
    Sparse24 { bits: u8 },
    Sign1,
}

impl Codec {
    fn label(self) -> String {
        match self {
            Codec::Quant { bits } => format!("quant {bits}b g128"),
            Codec::Sparse24 { bits } => format!("sparse24 {bits}b g128"),
            Codec::Sign1 => "sign1".into(),
        }
    }
}

fn payload(codec: Codec, n: usize, k: usize, rng: &mut StdRng) -> Payload {
    let grid = |bits: u8, rng: &mut StdRng| {
        let p = QuantParams {
            bits,
            group_size: 128,
            symmetric: true,
            global_scale: 1.0 / 1024.0,
        };
        Grid {
            params: p,
            scales: (0..n * p.n_groups(k))
                .map(|_| f16::from_f32(rng.gen_range(0.25..2.0)))
                .collect(),
            zeros: None,
        }
    };
    match codec {
        Codec::Quant { bits } => Payload::Quant(Quant {
            rows: n,
            cols: k,
            grid: grid(bits, rng),
            codes: (0..n * k)
                .map(|_| rng.gen_range(0..(1u16 << bits)) as u8)
                .collect(),
        }),
        Codec::Sparse24 { bits } => Payload::Sparse24(Sparse24 {
            rows: n,
            cols: k,
            grid: grid(bits, rng),
            codes: (0..n * k / 2)
                .map(|_| rng.gen_range(0..(1u16 << bits)) as u8)
                .collect(),
            positions: (0..n * k / 4)
                .flat_map(|_| {
                    let a = rng.gen_range(0..3u8);
                    [a, rng.gen_range(a + 1..4u8)]
                })
                .collect(),
        }),
        Codec::Sign1 => Payload::Sign1(Sign1 {
            rows: n,
            cols: k,
            global_scale: 1.0 / 1024.0,
            signs: (0..n * k).map(|_| rng.gen_bool(0.5)).collect(),
            scales: (0..n)
                .map(|_| f16::from_f32(rng.gen_range(0.25..2.0)))
                .collect(),
        }),
    }
}

/// The median times of `a` and `b`, called alternately (so that both see the same machine load: other
/// jobs on a shared machine come and go), after one warm-up call each, over at least `min_iters` pairs
/// and `min_time`.
fn time_pair(
    min_iters: usize,
    min_time: Duration,
    mut a: impl FnMut() -> Result<()>,
    mut b: impl FnMut() -> Result<()>,
) -> Result<(Duration, Duration)> {
    a()?;
    b()?;
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while ta.len() < min_iters || start.elapsed() < min_time {
        let t = Instant::now();
        a()?;
        ta.push(t.elapsed());
        let t = Instant::now();
        b()?;
        tb.push(t.elapsed());
        if ta.len() >= 200 {
            break;
        }
    }
    ta.sort();
    tb.sort();
    Ok((ta[ta.len() / 2], tb[tb.len() / 2]))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_flags() -> String {
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("flags"))
                .map(|l| l.to_string())
        })
        .unwrap_or_default();
    ["avx2", "fma", "avx512f", "f16c"]
        .iter()
        .filter(|f| flags.split_whitespace().any(|w| w == **f))
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The 1-minute load average (`/proc/loadavg`), or "unknown".
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

fn git_commit(dir: &std::path::Path) -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match run(&["rev-parse", "HEAD"]) {
        None => "unknown".into(),
        Some(c) => {
            let dirty = run(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c} (working tree modified)")
            } else {
                c
            }
        }
    }
}

/// `YYYY-MM-DD` (UTC) of the Unix time `secs` (Howard Hinnant's civil-from-days).
fn date(secs: u64) -> String {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

struct Row {
    shape: (usize, usize),
    rows: usize,
    codec: String,
    packed_mib: f64,
    delta_ms: f64,
    dense_ms: f64,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out_dir = match args.iter().position(|a| a == "--out") {
        Some(i) => args.get(i + 1).context("--out needs a directory")?.into(),
        None => root.join("bench/results"),
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run with --release for meaningful numbers");
    }
    let shapes: &[(usize, usize)] = if quick {
        &[(2048, 2048)]
    } else {
        &[(2048, 2048), (4096, 4096)]
    };
    // `--rows 1,8` and `--codec sparse24` narrow the run (for profiling); results are then not written.
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let row_counts: Vec<usize> = match arg("--rows") {
        None => vec![1, 8, 64, 256],
        Some(r) => r
            .split(',')
            .map(|v| v.parse().context("--rows takes numbers"))
            .collect::<Result<_>>()?,
    };
    let filter = arg("--codec");
    let narrowed = filter.is_some() || arg("--rows").is_some();
    let codecs: Vec<Codec> = [
        Codec::Quant { bits: 4 },
        Codec::Quant { bits: 2 },
        Codec::Sparse24 { bits: 4 },
        Codec::Sign1,
    ]
    .into_iter()
    .filter(|c| {
        filter
            .as_ref()
            .is_none_or(|f| c.label().contains(f.as_str()))
    })
    .collect();
    let (min_iters, min_time) = if quick {
        (3, Duration::from_millis(100))
    } else {
        (5, Duration::from_millis(400))
    };
    let load_start = load_average();
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(2312_05215);
    let mut results = Vec::new();
    for &(n, k) in shapes {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let deltas = codecs
            .iter()
            .map(|&c| {
                Ok((
                    c,
                    DeviceDelta::from_payload(&payload(c, n, k, &mut rng), None, &dev)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        for &m in &row_counts {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let wt = w.t()?;
            for (c, d) in &deltas {
                // Correctness first: against candle's matmul with the dequantized delta.
                let got = delta_matmul(&x, d)?;
                let want = x.matmul(&dequantize(d)?.t()?)?;
                let err = (&got - &want)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                if err > 1e-4 * scale.max(1e-6) {
                    bail!(
                        "{} {n}x{k} rows={m}: max error {err} vs scale {scale}",
                        c.label()
                    );
                }
                let (dense, t) = time_pair(
                    min_iters,
                    min_time,
                    || {
                        x.matmul(&wt)?;
                        Ok(())
                    },
                    || {
                        delta_matmul(&x, d)?;
                        Ok(())
                    },
                )?;
                let row = Row {
                    shape: (n, k),
                    rows: m,
                    codec: c.label(),
                    packed_mib: d.nbytes() as f64 / (1 << 20) as f64,
                    delta_ms: t.as_secs_f64() * 1e3,
                    dense_ms: dense.as_secs_f64() * 1e3,
                };
                eprintln!(
                    "{n}x{k} rows={m:<4} {:<18} {:>9.3} ms   dense f32 {:>9.3} ms",
                    row.codec, row.delta_ms, row.dense_ms
                );
                results.push(row);
            }
        }
    }

    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    let day = date(now);
    let cpu = cpu_model();
    let flags = cpu_flags();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let threads = rayon::current_num_threads();
    let commit = git_commit(&root);
    let load_end = load_average();

    let mut md = format!(
        "# CPU delta matmul vs dense f32 matmul ({day})\n\n\
         - machine: {cpu} ({flags}), {cores} cores available, {threads} rayon threads; 1-minute load \
         average {load_start} at the start, {load_end} at the end (a shared machine: other jobs ran)\n\
         - commit: {commit}\n\
         - command: `cargo run --release -p dz-candle-ops --example cpu_bench{}`\n\
         - `delta` = `dz_candle_ops::delta_matmul(x, D)` (`y = x · Dᵀ`, f32 input, decoding the packed \
         delta on the fly); `dense f32` = candle `x.matmul(&W.t())` with a dense f32 `W` of the same shape \
         (candle's CPU matmul, the `gemm` crate). Median of >= {min_iters} runs after a warm-up, delta and dense runs alternating \
         (so that both see the same load on a shared machine). \
         `GB/s` = packed delta bytes / delta time. `speedup` = dense time / delta time.\n\
         - Reading it: the same dense `W` is multiplied again and again, so at 2048 x 2048 (16 MiB) it \
         stays in the CPU's last-level cache, a best case for the dense baseline that a server holding \
         many fine-tunes does not get; at 4096 x 4096 (64 MiB) it streams from memory. The delta path \
         is bound by decoding (about 10 G values/s on these 2 cores), not by the bytes it reads.\n\n\
         | N x K | rows | codec | packed MiB | dense f32 MiB | delta ms | dense f32 ms | speedup | delta GB/s |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|\n",
        if quick { " -- --quick" } else { "" }
    );
    let mut js = Vec::new();
    for r in &results {
        let (n, k) = r.shape;
        let dense_mib = (n * k * 4) as f64 / (1 << 20) as f64;
        let gbs = r.packed_mib * (1 << 20) as f64 / (r.delta_ms * 1e-3) / 1e9;
        md.push_str(&format!(
            "| {n} x {k} | {} | {} | {:.2} | {:.1} | {:.3} | {:.3} | {:.2} | {:.1} |\n",
            r.rows,
            r.codec,
            r.packed_mib,
            dense_mib,
            r.delta_ms,
            r.dense_ms,
            r.dense_ms / r.delta_ms,
            gbs
        ));
        js.push(json!({
            "n": n, "k": k, "rows": r.rows, "codec": r.codec,
            "packed_bytes": (r.packed_mib * (1 << 20) as f64).round() as u64,
            "delta_ms": r.delta_ms, "dense_f32_ms": r.dense_ms,
            "speedup": r.dense_ms / r.delta_ms, "delta_gb_per_s": gbs,
        }));
    }
    let doc = json!({
        "benchmark": "dz-candle-ops cpu_bench",
        "date": day,
        "machine": {
            "cpu": cpu, "flags": flags, "cores": cores, "rayon_threads": threads,
            "load_average_start": load_start, "load_average_end": load_end,
        },
        "commit": commit,
        "quick": quick,
        "results": js,
    });
    if narrowed {
        println!("{md}");
        eprintln!("a narrowed run (--rows/--codec): no result file written");
        return Ok(());
    }
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let base = out_dir.join(format!("cpu-ops-{day}"));
    std::fs::write(base.with_extension("md"), &md)?;
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    println!("{md}");
    eprintln!("wrote {}.{{md,json}}", base.display());
    Ok(())
}

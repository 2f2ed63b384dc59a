//! The kernel benchmark (the kernel-speed issue): `delta_matmul` and `sbmm` on CUDA against candle's cuBLAS
//! bf16 matmul with the dense weight of the same shape, side by side in one run.
//!
//! `cargo build --release -p dz-candle-ops --features cuda --example kernel_bench`, then on the GPU:
//! `kernel_bench [--quick] [--out STEM] [--commit SHA]` writes `STEM.md` and `STEM.json` and prints the table;
//! `--shapes NxK,...` and `--rows R,...` run only those shapes and row counts (and no sbmm cases).
//!
//! Method:
//! - time = median over `ITERS` launches of the CUDA-event time around each launch, after warm-up. Before the
//!   launches are queued the stream is given a few milliseconds of other work, so the GPU never waits for the
//!   host between the events (candle's per-op host work is not measured, for any side);
//! - the weights (packed deltas, dense bf16 matrices) are rotated over enough copies to exceed twice the
//!   60 MB L2, so every launch reads them from HBM; x is one tensor (activations are fresh in L2 in a model);
//! - bytes = what must move: the packed delta (or the bf16 weight) + x + y (+ base_out for sbmm);
//!   % BW = bytes / time against the device-to-device copy bandwidth measured at the start of the same run
//!   (read + write bytes / time of a 1 GiB copy);
//! - `dz` is the op as users get it with the v4 kernels on (where the delta has a v4 layout: the v4 kernels
//!   at 1-4 rows, the tensor-core v3 kernels at 5-16, the v4 32-row tile past 16 (`set_v4_wide_tiles`);
//!   the tensor-core v3 kernels for the other codecs); `v3` the same op with the v4 kernels off (rows 1-16
//!   of the codecs v4 takes) or, past 16 rows, with the 32-row tile off (what `dz` ran before it);
//!   `v4-16` past 16 rows: the deltas keeping only their v4 layout with the 32-row tile off (16-row tiles,
//!   what `serve --v4-kernels` ran before it); `generic` with the tensor cores off (the earlier kernels),
//!   for a few shapes; each `dz` result is compared with the `generic` one for agreement (max |diff| /
//!   max |value|), `v3` and `v4-16` with `dz`;
//! - bytes count the packed delta as the file stores it (`packed_nbytes`; the v4 layout is the same bytes
//!   reordered, plus padding to 16 x 128 packets and 32 bytes of scales per packet);
//! - rows 1-16: `vs copy same bytes` = time / the driver's copy that moves the same bytes (read + write)
//!   at that size, timed the same way: the floor launch, ramp-up and tail leave a transfer that small;
//! - `dz-s1` .. `dz-s8`: the v4 `delta_matmul` with its split along K forced (1-4 rows and past 16 rows,
//!   there with x from global memory; `dz` picks it); past 16 rows `dz-gx` / `dz-sx`: the 32-row tile
//!   with x read from global memory (split automatic) / staged in shared memory (`set_v4_wide_x`; `dz`
//!   picks one per launch); `dz-sxd`: x and the codes in the deep shared-memory ring (forced only);
//!   `dz-sxk`: K split over 4 blocks; `dz-sx64`: the 64-row tile (session 17, forced only; on the
//!   balanced schedule since session 18); `dz-sxb`: the 32-row tile on the balanced schedule; `dz-sxp` /
//!   `dz-sxp2`: two 16-row tiles a warp on it, code rings 1 / 2 deep; `dz-sxq`: the pair tile on the
//!   plain grid-stride launch (session 18, forced only);
//! - sbmm at 1-4 rows a delta: `dz-s1` .. `dz-s8` (the split forced), `dz-sx` (x in shared memory per
//!   block), `dz-ring` (each warp's codes through its own shared-memory ring, `set_v4_sbmm_ring`) and
//!   `dz-xd` / `dz-xo` (x loaded before each mma; a 6-deep code ring, or a 3-deep one at 3 blocks an SM;
//!   `set_v4_sbmm_x_direct`), `dz-1t` (one 16-row tile a warp: `set_v4_sbmm_pair(false)`; `dz` runs the
//!   pair since session 19), `dz-pf4` / `dz-pf8` (the pair with an L2 prefetch 4 / 8 blocks ahead:
//!   `set_v4_sbmm_prefetch`; session 21), `dz-tail` (the last partial wave's items split along K:
//!   `set_v4_sbmm_tail_split`; session 21), the last eight compared with split 1; `dz-1r` / `dz-1r-tail`:
//!   8-64 deltas x 1 row each, without and with the tail split (the waves; 4096 x 4096 and, for 4b 2:4,
//!   the MLP's 11008 x 4096 and 4096 x 11008).
//!
//! Rows 32-256 of issue #5 (the 32-row tile beside cuBLAS, v3 and the dense route):
//! `kernel_bench --rows 32,64,128,256 --out STEM` (all the 7B/13B shapes; `--shapes 4096x4096` for one).
//!
//! `--host`: the CPU's cost of issuing each op (no GPU waits), next to candle's matmul and add.
//! `--upload`: host-to-device copy speed of a delta's host buffers, pageable against page-locked.
//!
//! `--decode`: only rows 1-16 (1, 2, 4, 8, 16), `generic` only at 1 row, and the sbmm cases: the serving
//! decode regime in a few minutes. `--sbmm`: only the sbmm cases.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::{sys::CUevent_flags, CudaStream};
use candle_core::{DType, Device, Tensor};
use common::{payload, Cfg};
use dz_candle_ops::{
    delta_matmul, sbmm, set_dense_rows, set_tensor_cores, set_v4_kernels, set_v4_split,
    set_v4_wide_tiles, set_v4_wide_x, DeviceDelta, Segment, V4WideX, V4XDirect,
};

const L2_BYTES: usize = 60 << 20;
const ITERS: usize = 40;

struct Bench {
    dev: Device,
    stream: Arc<CudaStream>,
    /// Two 8192 x 8192 bf16 matrices whose product keeps the GPU busy for ~1.5 ms.
    busy: (Tensor, Tensor),
}

impl Bench {
    fn new() -> Result<Self> {
        let dev = Device::new_cuda(0).context("no CUDA device")?;
        let stream = dev.as_cuda_device()?.cuda_stream();
        let a = Tensor::randn(0f32, 1.0, (8192, 8192), &dev)?.to_dtype(DType::BF16)?;
        let b = Tensor::randn(0f32, 1.0, (8192, 8192), &dev)?.to_dtype(DType::BF16)?;
        Ok(Bench {
            dev,
            stream,
            busy: (a, b),
        })
    }

    /// Median microseconds of `f(i)` over `iters` launches, each between two CUDA events, queued behind
    /// enough work that the GPU runs them back to back. The outputs `f` returns are kept until the end: a
    /// freed buffer can cost a device synchronisation (cudarc frees synchronously where the device has no
    /// memory pools), which would let the GPU drain and time the host.
    fn time(&self, iters: usize, mut f: impl FnMut(usize) -> Result<Vec<Tensor>>) -> Result<f64> {
        let mut keep = Vec::with_capacity(iters + 8);
        for i in 0..3 {
            keep.push(f(i)?);
        }
        for _ in 0..4 {
            keep.push(vec![self.busy.0.matmul(&self.busy.1)?]);
        }
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let mut events = Vec::with_capacity(iters);
        for i in 0..iters {
            let start = self.stream.record_event(flags)?;
            keep.push(f(i)?);
            let end = self.stream.record_event(flags)?;
            events.push((start, end));
        }
        let mut v = Vec::with_capacity(iters);
        for (s, e) in &events {
            v.push(f64::from(s.elapsed_ms(e)?) * 1e3);
        }
        drop(keep);
        v.sort_by(|a, b| a.total_cmp(b));
        Ok(v[v.len() / 2])
    }

    /// Device-to-device copy bandwidth (read + write bytes per second): a 1 GiB buffer copied into a
    /// preallocated one by the driver (`cuMemcpyDtoDAsync`; an allocation inside the timed region would
    /// time the memory pool's growth). Session 9 found that candle's own copy (`slice_set`, an
    /// element-wise kernel) reaches only ~2.0 TB/s, half of what the driver's copy moves (~4.3 TB/s,
    /// the device library's KINDS.md), so it is no ceiling; it is printed beside, for reference.
    fn copy_bandwidth(&self) -> Result<f64> {
        let n = 1usize << 28;
        let src = self.stream.alloc_zeros::<f32>(n)?;
        let mut dst = self.stream.alloc_zeros::<f32>(n)?;
        let us = self.time(20, |_| {
            self.stream.memcpy_dtod(&src, &mut dst)?;
            Ok(Vec::new())
        })?;
        drop((src, dst));
        let candle_src = Tensor::ones(n, DType::F32, &self.dev)?;
        let candle_dst = Tensor::zeros(n, DType::F32, &self.dev)?;
        let candle_us = self.time(20, |_| {
            candle_dst.slice_set(&candle_src, 0, 0)?;
            Ok(Vec::new())
        })?;
        let bw = |us: f64| 2.0 * (4 * n) as f64 / (us * 1e-6);
        eprintln!(
            "copy of 1 GiB: driver {:.0} GB/s, candle slice_set {:.0} GB/s (read + write)",
            bw(us) / 1e9,
            bw(candle_us) / 1e9
        );
        Ok(bw(us))
    }
}

impl Bench {
    /// Median microseconds of the driver's device-to-device copy of `bytes / 2` bytes (so `bytes` move,
    /// read + write), rotated over buffer pairs past the L2.
    fn copy_same_bytes(&self, bytes: usize) -> Result<f64> {
        let half = (bytes / 2).max(4) / 4;
        let pairs = (2 * L2_BYTES / (8 * half) + 1).clamp(2, 32);
        let mut bufs = Vec::with_capacity(pairs);
        for _ in 0..pairs {
            bufs.push((
                self.stream.alloc_zeros::<f32>(half)?,
                self.stream.alloc_zeros::<f32>(half)?,
            ));
        }
        let bufs = std::cell::RefCell::new(bufs);
        self.time(ITERS, |i| {
            let mut b = bufs.borrow_mut();
            let n = b.len();
            let (src, dst) = &mut b[i % n];
            self.stream.memcpy_dtod(src, dst)?;
            Ok(Vec::new())
        })
    }
}

/// Copies of one packed delta on the device, enough to exceed twice the L2.
fn delta_copies(cfg: Cfg, n: usize, k: usize, dev: &Device) -> Result<Vec<DeviceDelta>> {
    let host = payload(cfg, n, k, 7);
    let one = DeviceDelta::from_payload(&host, None, dev)?;
    let copies = (2 * L2_BYTES / one.packed_nbytes().max(1) + 1).clamp(2, 32);
    let mut v = Vec::with_capacity(copies);
    for _ in 1..copies {
        v.push(one.deep_clone()?);
    }
    v.push(one);
    Ok(v)
}

/// Max |a - b| / max |b|.
fn disagreement(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .max(f32::MIN_POSITIVE);
    Ok(f64::from(diff / scale))
}

#[derive(Clone)]
struct Row {
    op: &'static str,
    path: &'static str,
    codec: String,
    rows: usize,
    n: usize,
    k: usize,
    deltas: usize,
    time_us: f64,
    bytes: usize,
    cublas_us: f64,
    cublas_bytes: usize,
    copy_bw: f64,
    /// Stream-once time of the deltas' bytes (sbmm), microseconds.
    stream_once_us: Option<f64>,
    /// The driver's device-to-device copy that moves the case's bytes (read + write) at this size,
    /// microseconds: what launch, ramp-up and tail leave of the bandwidth for a transfer this small.
    copy_same_us: Option<f64>,
    agree: Option<f64>,
}

impl Row {
    fn pct_bw(&self) -> f64 {
        100.0 * self.bytes as f64 / (self.time_us * 1e-6) / self.copy_bw
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "op": self.op, "path": self.path, "codec": self.codec, "rows": self.rows, "n": self.n,
            "k": self.k, "deltas": self.deltas, "time_us": self.time_us, "bytes": self.bytes,
            "gbps": self.bytes as f64 / (self.time_us * 1e-6) / 1e9, "pct_bw": self.pct_bw(),
            "cublas_us": self.cublas_us, "speedup_vs_cublas": self.cublas_us / self.time_us,
            "byte_ratio": self.cublas_bytes as f64 / self.bytes as f64,
            "stream_once_us": self.stream_once_us,
            "vs_stream_once": self.stream_once_us.map(|s| self.time_us / s),
            "copy_same_bytes_us": self.copy_same_us,
            "vs_copy_same_bytes": self.copy_same_us.map(|s| self.time_us / s),
            "agree_max_rel_diff": self.agree,
        })
    }
    fn md(&self) -> String {
        format!(
            "| {} | {} | {} x {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.0} | {:.0}% | {} | {} | {} |",
            self.op,
            self.path,
            self.n,
            self.k,
            self.codec,
            self.deltas,
            self.rows,
            self.time_us,
            self.cublas_us,
            self.cublas_us / self.time_us,
            self.cublas_bytes as f64 / self.bytes as f64,
            self.bytes as f64 / (self.time_us * 1e-6) / 1e9,
            self.pct_bw(),
            self.stream_once_us
                .map(|s| format!("{:.2}x", self.time_us / s))
                .unwrap_or_default(),
            self.copy_same_us
                .map(|s| format!("{:.2}x", self.time_us / s))
                .unwrap_or_default(),
            self.agree.map(|a| format!("{a:.1e}")).unwrap_or_default(),
        )
    }
}

const CODECS: [(&str, Cfg); 5] = [
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

/// `--upload`: host-to-device copies of a 7B delta's worth of host buffers (16 x 160 MiB), from pageable
/// memory (the driver stages them) and after `HostPins::register` (direct DMA), each buffer copied and
/// synchronized as a delta upload does; the best of three passes each, and the registration's own cost.
fn upload_bandwidth(b: &Bench) -> Result<()> {
    const BUFFERS: usize = 16;
    const LEN: usize = 160 << 20;
    let bufs: Vec<Vec<u8>> = (0..BUFFERS)
        .map(|i| (0..LEN).map(|j| (i * 31 + j) as u8).collect())
        .collect();
    let total = (BUFFERS * LEN) as f64;
    let pass = || -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            for buf in &bufs {
                let d = b.stream.clone_htod(buf.as_slice())?;
                b.stream.synchronize()?;
                drop(d);
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let pageable = pass()?;
    let t0 = std::time::Instant::now();
    // SAFETY: `bufs` is neither changed nor dropped before `pins` (declared later, so dropped first).
    let pins = unsafe { dz_candle_ops::HostPins::register(&b.dev, bufs.iter().map(Vec::as_slice)) };
    let register = t0.elapsed().as_secs_f64();
    let pinned = pass()?;
    println!("| host source | GiB | s | GB/s |");
    println!("|---|---:|---:|---:|");
    let gib = total / (1u64 << 30) as f64;
    println!(
        "| pageable | {gib:.2} | {pageable:.3} | {:.1} |",
        total / pageable / 1e9
    );
    println!(
        "| page-locked ({} of {BUFFERS} buffers registered) | {gib:.2} | {pinned:.3} | {:.1} |",
        pins.buffers(),
        total / pinned / 1e9
    );
    println!(
        "\nregistration: {register:.3} s ({:.1} GB/s); page-locked / pageable speed: {:.2}x",
        pins.bytes() as f64 / register / 1e9,
        pageable / pinned
    );
    Ok(())
}

/// `--host`: the CPU's cost of issuing each op (the serving profile's host mode found the CPU's share of
/// a decode step large): `CALLS` calls queued without a synchronization, behind enough GPU work that
/// none of them waits for the GPU, then the wall time per call until the GPU has run them all. Both per
/// call, microseconds, with candle's own matmul and add beside them as the host's unit of cost.
///
/// Event tracking is turned off first, as mistral.rs does for its devices (every pipeline load calls
/// `disable_event_tracking`): with it on (cudarc's default), each device pointer an op takes costs a
/// stream wait and an event record, which a server never pays. Session 11's first run left it on.
fn host_costs(b: &Bench) -> Result<()> {
    const CALLS: usize = 100;
    let (n, k) = (4096, 4096);
    let dev = &b.dev;
    // SAFETY: one stream per device here (candle's), so the cross-stream ordering that the events keep
    // is not needed; only buffers allocated after this call go untracked.
    unsafe { dev.as_cuda_device()?.disable_event_tracking() };
    let host = payload(CODECS[0].1, n, k, 9);
    let first = DeviceDelta::from_payload(&host, None, dev)?;
    let pool: Vec<DeviceDelta> = (0..32)
        .map(|_| first.deep_clone())
        .collect::<dz_candle_ops::Result<_>>()?;
    let w = Tensor::randn(0f32, 0.02, (n, k), dev)?.to_dtype(DType::BF16)?;
    let x32 = Tensor::randn(0f32, 1.0, (32, k), dev)?.to_dtype(DType::BF16)?;
    let x1 = x32.narrow(0, 0, 1)?.contiguous()?;
    let y32 = Tensor::randn(0f32, 1.0, (32, n), dev)?.to_dtype(DType::BF16)?;
    let all: Vec<&DeviceDelta> = pool.iter().collect();
    let one_row_each: Vec<Segment> = (0..32)
        .map(|d| Segment {
            start: d,
            len: 1,
            delta: Some(d),
        })
        .collect();
    let four_rows_each: Vec<Segment> = (0..8)
        .map(|d| Segment {
            start: 4 * d,
            len: 4,
            delta: Some(d),
        })
        .collect();
    type Kept = Box<dyn std::any::Any>;
    type Case<'a> = (&'a str, Box<dyn Fn() -> Result<Kept> + 'a>);
    let kept = |t: Tensor| -> Kept { Box::new(t) };
    let table = vec![0u8; 1536];
    let cases: Vec<Case> = vec![
        (
            "candle matmul 32 x 4096 x 4096",
            Box::new(|| Ok(kept(x32.matmul(&w.t()?)?))),
        ),
        (
            "candle add 32 x 4096",
            Box::new(|| Ok(kept((&x32 + &y32)?))),
        ),
        (
            "driver: 1.5 KB host-to-device copy into a new buffer",
            Box::new(|| Ok(Box::new(b.stream.clone_htod(&table)?) as Kept)),
        ),
        (
            "delta_matmul 1 row",
            Box::new(|| Ok(kept(delta_matmul(&x1, &pool[0])?))),
        ),
        (
            "sbmm 32 deltas x 1 row",
            Box::new(|| Ok(kept(sbmm(&x32, &y32, &all, &one_row_each)?))),
        ),
        (
            "sbmm 8 deltas x 4 rows",
            Box::new(|| Ok(kept(sbmm(&x32, &y32, &all[..8], &four_rows_each)?))),
        ),
    ];
    println!("| op | host us / call | wall us / call (GPU included) |");
    println!("|---|---:|---:|");
    for (label, f) in &cases {
        let mut keep = Vec::with_capacity(CALLS + 8);
        for _ in 0..3 {
            keep.push(f()?);
        }
        b.stream.synchronize()?;
        // ~6 ms of GPU work ahead, so the calls below never wait for the GPU.
        for _ in 0..4 {
            keep.push(kept(b.busy.0.matmul(&b.busy.1)?));
        }
        let t0 = std::time::Instant::now();
        for _ in 0..CALLS {
            keep.push(f()?);
        }
        let host_us = t0.elapsed().as_secs_f64() * 1e6 / CALLS as f64;
        b.stream.synchronize()?;
        let t1 = std::time::Instant::now();
        for _ in 0..CALLS {
            keep.push(f()?);
        }
        b.stream.synchronize()?;
        let wall_us = t1.elapsed().as_secs_f64() * 1e6 / CALLS as f64;
        println!("| {label} | {host_us:.1} | {wall_us:.1} |");
        drop(keep);
    }
    Ok(())
}

/// `--profile`: a few cases, each launched twice, for Nsight Compute (`ncu --kernel-name regex:...`).
fn profile(b: &Bench) -> Result<()> {
    let (n, k) = (11008, 4096);
    let mut keep = Vec::new();
    for (label, cfg) in [CODECS[0], CODECS[2]] {
        let d = DeviceDelta::from_payload(&payload(cfg, n, k, 7), None, &b.dev)?;
        for rows in [1usize, 16, 256] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &b.dev)?.to_dtype(DType::BF16)?;
            for _ in 0..2 {
                keep.push(delta_matmul(&x, &d)?);
            }
            eprintln!("profiled {label} {n}x{k} rows {rows}");
        }
    }
    // The 32-row tile (`dz_v4_sparse24_matmul_sx_bf16_n4` for 4-bit 2:4) on 4096 x 4096, whose time is
    // flat at ~24 us over 32-128 rows (session 12) and did not move with a deeper code ring (`_sxd`,
    // session 13): its stall reasons.
    let d = DeviceDelta::from_payload(&payload(CODECS[0].1, 4096, 4096, 8), None, &b.dev)?;
    for rows in [32usize, 128] {
        let x = Tensor::randn(0f32, 1.0, (rows, 4096), &b.dev)?.to_dtype(DType::BF16)?;
        for _ in 0..2 {
            keep.push(delta_matmul(&x, &d)?);
        }
        eprintln!("profiled {} 4096x4096 rows {rows}", CODECS[0].0);
    }
    // The 32-row and 64-row tiles at 128 rows of 11008 x 4096 4-bit 2:4 (session 18: the 64-row tile took the
    // same time per SM as the 32-row one at 256 rows, so what bounds both is not the decode alone): their
    // pipes, shared-memory traffic and stalls beside cuBLAS's at the same rows (below).
    let d = DeviceDelta::from_payload(&payload(CODECS[0].1, n, k, 10), None, &b.dev)?;
    let x = Tensor::randn(0f32, 1.0, (128, k), &b.dev)?.to_dtype(DType::BF16)?;
    // (`Auto` takes the pair tile here since session 18; `Shared` keeps the 32-row tile beside it.)
    for wide in [
        V4WideX::Auto,
        V4WideX::Shared,
        V4WideX::Shared64,
        V4WideX::SharedBalanced,
        V4WideX::SharedPair,
        V4WideX::SharedPairDeep,
        V4WideX::SharedPairGrid,
    ] {
        set_v4_wide_x(wide);
        for _ in 0..2 {
            keep.push(delta_matmul(&x, &d)?);
        }
        eprintln!("profiled {} {n}x{k} rows 128, {wide:?}", CODECS[0].0);
    }
    set_v4_wide_x(V4WideX::Auto);
    let w = Tensor::randn(0f32, 0.02, (n, k), &b.dev)?.to_dtype(DType::BF16)?;
    for rows in [1usize, 16, 128, 256] {
        let x = Tensor::randn(0f32, 1.0, (rows, k), &b.dev)?.to_dtype(DType::BF16)?;
        keep.push(x.matmul(&w.t()?)?);
    }
    let host = payload(CODECS[0].1, 4096, 4096, 9);
    let ds: Vec<DeviceDelta> = (0..32)
        .map(|_| DeviceDelta::from_payload(&host, None, &b.dev))
        .collect::<dz_candle_ops::Result<_>>()?;
    let refs: Vec<&DeviceDelta> = ds.iter().collect();
    let segments: Vec<Segment> = (0..32)
        .map(|d| Segment {
            start: d,
            len: 1,
            delta: Some(d),
        })
        .collect();
    let x = Tensor::randn(0f32, 1.0, (32, 4096), &b.dev)?.to_dtype(DType::BF16)?;
    let base = Tensor::randn(0f32, 1.0, (32, 4096), &b.dev)?.to_dtype(DType::BF16)?;
    // Split 1 (what the automatic choice takes here) and 8 (every item over 8 warps, as session 9's kernel).
    for split in [1u32, 8] {
        set_v4_split(split);
        for _ in 0..2 {
            keep.push(sbmm(&x, &base, &refs, &segments)?);
        }
        eprintln!("profiled sbmm 32 deltas x 1 row, split {split}");
    }
    // And the shared-memory variant (kernel name `..._sbmm_sx_...`).
    set_v4_split(1);
    dz_candle_ops::set_v4_sbmm_smem_x(true);
    for _ in 0..2 {
        keep.push(sbmm(&x, &base, &refs, &segments)?);
    }
    dz_candle_ops::set_v4_sbmm_smem_x(false);
    eprintln!("profiled sbmm 32 deltas x 1 row, smem-x");
    // And the per-warp code ring (kernel name `..._sbmm_ring_...`).
    dz_candle_ops::set_v4_sbmm_ring(true);
    for _ in 0..2 {
        keep.push(sbmm(&x, &base, &refs, &segments)?);
    }
    dz_candle_ops::set_v4_sbmm_ring(false);
    eprintln!("profiled sbmm 32 deltas x 1 row, ring");
    // And the x-direct decode tiles (kernel names `..._sbmm_xd_...`, `..._sbmm_xo_...`), the split
    // automatic.
    set_v4_split(0);
    for mode in [V4XDirect::Deep, V4XDirect::Occupancy] {
        dz_candle_ops::set_v4_sbmm_x_direct(mode);
        for _ in 0..2 {
            keep.push(sbmm(&x, &base, &refs, &segments)?);
        }
        eprintln!("profiled sbmm 32 deltas x 1 row, x-direct {mode:?}");
    }
    dz_candle_ops::set_v4_sbmm_x_direct(V4XDirect::Off);
    // And the decode tile with one 16-row tile a warp (the pair, `..._sbmm_p2_...`, is the default).
    dz_candle_ops::set_v4_sbmm_pair(false);
    for _ in 0..2 {
        keep.push(sbmm(&x, &base, &refs, &segments)?);
    }
    dz_candle_ops::set_v4_sbmm_pair(true);
    eprintln!("profiled sbmm 32 deltas x 1 row, one tile a warp");
    // And the pair with each L2 prefetch distance (`..._sbmm_p2f<PF>_...`).
    for blocks in dz_kernels::v4::V4_SBMM_PREFETCH {
        dz_candle_ops::set_v4_sbmm_prefetch(blocks);
        for _ in 0..2 {
            keep.push(sbmm(&x, &base, &refs, &segments)?);
        }
        eprintln!("profiled sbmm 32 deltas x 1 row, pair with prefetch {blocks}");
    }
    dz_candle_ops::set_v4_sbmm_prefetch(0);
    set_v4_split(0);
    b.dev.synchronize()?;
    Ok(())
}

/// sbmm: D deltas of 4096 x 4096 4b 2:4, then 2b 2:4 (session 19: served as fast as 4b, so the time is not
/// the bytes'), the rows split evenly over them, against the same launch on v3, a loop of per-delta
/// delta_matmul calls, and one dense bf16 matmul of all rows; then a serving-like decode step of 32 rows
/// over 20 deltas in arrival order and grouped by delta (`dz-20a`, `dz-20g`).
fn sbmm_cases(b: &Bench, copy_bw: f64, rows_out: &mut Vec<Row>) -> Result<()> {
    for (label, cfg) in CODECS.iter().take(2) {
        sbmm_cases_of(b, copy_bw, rows_out, label, *cfg)?;
    }
    // The waves (session 21): the 2:4 codecs at 4096 x 4096, 4b 2:4 at the MLP's shapes.
    for (i, (label, cfg)) in CODECS.iter().take(2).enumerate() {
        let shapes: &[(usize, usize)] = if i == 0 {
            &[(4096, 4096), (11008, 4096), (4096, 11008)]
        } else {
            &[(4096, 4096)]
        };
        for &(n, k) in shapes {
            sbmm_waves(b, copy_bw, rows_out, label, *cfg, (n, k))?;
        }
    }
    Ok(())
}

/// The sbmm cases' 64 device copies of one N x K delta of `cfg` (rotated so that L2 does not hold
/// them), its packed bytes, and a dense bf16 weight of the shape for cuBLAS.
fn sbmm_pool(
    b: &Bench,
    cfg: Cfg,
    (n, k): (usize, usize),
) -> Result<(Vec<DeviceDelta>, usize, Tensor)> {
    let host = payload(cfg, n, k, 9);
    let first = DeviceDelta::from_payload(&host, None, &b.dev)?;
    let pool: Vec<DeviceDelta> = (0..64)
        .map(|_| first.deep_clone())
        .collect::<dz_candle_ops::Result<_>>()?;
    drop(first);
    let d_bytes = pool[0].packed_nbytes();
    let w = Tensor::randn(0f32, 0.02, (n, k), &b.dev)?.to_dtype(DType::BF16)?;
    Ok((pool, d_bytes, w))
}

/// An sbmm case of `deltas` deltas of `d_bytes` packed bytes each over `rows` rows of an N x K shape.
struct SbmmShape<'a> {
    label: &'a str,
    rows: usize,
    n: usize,
    k: usize,
    deltas: usize,
    d_bytes: usize,
}

impl SbmmShape<'_> {
    /// The table row of `path` at `time_us`, beside cuBLAS's `cublas_us` for the dense weight.
    fn row(&self, path: &'static str, time_us: f64, cublas_us: f64, copy_bw: f64) -> Row {
        let Self {
            label,
            rows,
            n,
            k,
            deltas,
            d_bytes,
        } = *self;
        Row {
            op: "sbmm",
            path,
            codec: label.to_string(),
            rows,
            n,
            k,
            deltas,
            time_us,
            bytes: deltas * d_bytes + rows * k * 2 + 2 * rows * n * 2,
            cublas_us,
            cublas_bytes: n * k * 2 + rows * k * 2 + rows * n * 2,
            copy_bw,
            stream_once_us: Some((deltas * d_bytes) as f64 / copy_bw * 1e6),
            copy_same_us: None,
            agree: None,
        }
    }
}

/// The decode sbmm's time against its waves (session 21): D deltas x 1 row each (a decode step's
/// grouped batch) for D from 8 to 64, `dz-1r` with the defaults and `dz-1r-tail` with the tail split
/// (`set_v4_sbmm_tail_split`; the same launch where no partial wave has a tail to split), the pair's
/// items D x ceil(N / 32) against the device's resident warps (2112 on an H200).
fn sbmm_waves(
    b: &Bench,
    copy_bw: f64,
    rows_out: &mut Vec<Row>,
    label: &str,
    cfg: Cfg,
    (n, k): (usize, usize),
) -> Result<()> {
    let (pool, d_bytes, w) = sbmm_pool(b, cfg, (n, k))?;
    for used in [8usize, 16, 17, 20, 24, 28, 32, 40, 48, 64] {
        let rows = used;
        let x = Tensor::randn(0f32, 1.0, (rows, k), &b.dev)?.to_dtype(DType::BF16)?;
        let base = Tensor::randn(0f32, 1.0, (rows, n), &b.dev)?.to_dtype(DType::BF16)?;
        let t_dense = b.time(ITERS, |_| Ok(vec![x.matmul(&w.t()?)?]))?;
        let segments: Vec<Segment> = (0..used)
            .map(|d| Segment {
                start: d,
                len: 1,
                delta: Some(d),
            })
            .collect();
        let sets = (64 / used).max(1);
        let set = |i: usize| -> Vec<&DeviceDelta> {
            let s = i % sets;
            (0..used).map(|d| &pool[(s * used + d) % 64]).collect()
        };
        let t_plain = b.time(ITERS, |i| Ok(vec![sbmm(&x, &base, &set(i), &segments)?]))?;
        let y_plain = sbmm(&x, &base, &set(0), &segments)?;
        dz_candle_ops::set_v4_sbmm_tail_split(true);
        let t_tail = b.time(ITERS, |i| Ok(vec![sbmm(&x, &base, &set(i), &segments)?]));
        let y_tail = sbmm(&x, &base, &set(0), &segments);
        dz_candle_ops::set_v4_sbmm_tail_split(false);
        let a = disagreement(&y_tail?, &y_plain)?;
        if a > 2e-2 {
            eprintln!(
                "MISMATCH sbmm waves {used} x 1 {n}x{k}: dz-1r-tail and dz-1r differ by {a:.2e}"
            );
        }
        for (path, t) in [("dz-1r", t_plain), ("dz-1r-tail", t_tail?)] {
            let shape = SbmmShape {
                label,
                rows,
                n,
                k,
                deltas: used,
                d_bytes,
            };
            let row = shape.row(path, t, t_dense, copy_bw);
            eprintln!("{}", row.md());
            rows_out.push(row);
        }
    }
    Ok(())
}

fn sbmm_cases_of(
    b: &Bench,
    copy_bw: f64,
    rows_out: &mut Vec<Row>,
    label: &str,
    cfg: Cfg,
) -> Result<()> {
    let (n, k) = (4096, 4096);
    let (pool, d_bytes, w) = sbmm_pool(b, cfg, (n, k))?;
    for &rows in &[32usize, 256] {
        let x = Tensor::randn(0f32, 1.0, (rows, k), &b.dev)?.to_dtype(DType::BF16)?;
        let base = Tensor::randn(0f32, 1.0, (rows, n), &b.dev)?.to_dtype(DType::BF16)?;
        let t_dense = b.time(ITERS, |_| Ok(vec![x.matmul(&w.t()?)?]))?;
        for &want in &[1usize, 4, 16, 32, 64] {
            let used = want.min(rows);
            // Rotate over disjoint sets of `used` deltas where the pool allows it.
            let sets = (64 / used).max(1);
            let per = rows / used;
            let segments: Vec<Segment> = (0..used)
                .map(|d| Segment {
                    start: d * per,
                    len: if d + 1 == used { rows - d * per } else { per },
                    delta: Some(d),
                })
                .collect();
            let set = |i: usize| -> Vec<&DeviceDelta> {
                let s = i % sets;
                (0..used).map(|d| &pool[(s * used + d) % 64]).collect()
            };
            let t_sbmm = b.time(ITERS, |i| Ok(vec![sbmm(&x, &base, &set(i), &segments)?]))?;
            // v3: the same launch with the v4 kernels off (only where v4 runs: segments of <= 16 rows).
            let t_v3 = if rows.div_ceil(used) <= 16 {
                set_v4_kernels(false);
                let t = b.time(ITERS, |i| Ok(vec![sbmm(&x, &base, &set(i), &segments)?]))?;
                set_v4_kernels(true);
                Some(t)
            } else {
                None
            };
            let t_loop = b.time(ITERS, |i| {
                let ds = set(i);
                segments
                    .iter()
                    .zip(&ds)
                    .map(|(seg, d)| Ok(delta_matmul(&x.narrow(0, seg.start, seg.len)?, d)?))
                    .collect()
            })?;
            let bytes = used * d_bytes + rows * k * 2 + 2 * rows * n * 2;
            let stream_once = (used * d_bytes) as f64 / copy_bw * 1e6;
            let mk = |op, path, time_us| Row {
                op,
                path,
                codec: label.to_string(),
                rows,
                n,
                k,
                deltas: used,
                time_us,
                bytes,
                cublas_us: t_dense,
                cublas_bytes: n * k * 2 + rows * k * 2 + rows * n * 2,
                copy_bw,
                stream_once_us: Some(stream_once),
                copy_same_us: None,
                agree: None,
            };
            let mut rs = vec![mk("sbmm", "dz", t_sbmm)];
            // The v4 kernel's warps per item, swept (where v4 runs: segments of <= 4 rows here, the
            // deltas keeping both layouts).
            if rows.div_ceil(used) <= 4 {
                for (split, path) in [(1u32, "dz-s1"), (2, "dz-s2"), (4, "dz-s4"), (8, "dz-s8")] {
                    set_v4_split(split);
                    let t = b.time(ITERS, |i| Ok(vec![sbmm(&x, &base, &set(i), &segments)?]));
                    set_v4_split(0);
                    rs.push(mk("sbmm", path, t?));
                }
                // The shared-memory variant (experimental): split 1, x staged per block.
                set_v4_split(1);
                dz_candle_ops::set_v4_sbmm_smem_x(true);
                let t = b.time(ITERS, |i| Ok(vec![sbmm(&x, &base, &set(i), &segments)?]));
                let y_sx = sbmm(&x, &base, &set(0), &segments)?;
                dz_candle_ops::set_v4_sbmm_smem_x(false);
                let y_s1 = sbmm(&x, &base, &set(0), &segments)?;
                set_v4_split(0);
                let a = disagreement(&y_sx, &y_s1)?;
                if a > 2e-2 {
                    eprintln!(
                        "MISMATCH sbmm {used} x {rows}: smem-x and split 1 differ by {a:.2e}"
                    );
                }
                rs.push(mk("sbmm", "dz-sx", t?));
                // The per-warp code ring (experimental): split 1, the 8-row tile, each warp's codes
                // through its own shared-memory ring (the 16-row tile falls back to split 1).
                set_v4_split(1);
                dz_candle_ops::set_v4_sbmm_ring(true);
                let t = b.time(ITERS, |i| Ok(vec![sbmm(&x, &base, &set(i), &segments)?]));
                let y_ring = sbmm(&x, &base, &set(0), &segments)?;
                dz_candle_ops::set_v4_sbmm_ring(false);
                set_v4_split(0);
                let a = disagreement(&y_ring, &y_s1)?;
                if a > 2e-2 {
                    eprintln!("MISMATCH sbmm {used} x {rows}: ring and split 1 differ by {a:.2e}");
                }
                rs.push(mk("sbmm", "dz-ring", t?));
                // The decode variants below, each turned on by `on` and off again by `off`, timed and
                // compared with split 1 (the split automatic, as `dz`).
                let mut variant =
                    |path: &'static str, on: &dyn Fn(), off: &dyn Fn()| -> Result<()> {
                        on();
                        let t = b.time(ITERS, |i| Ok(vec![sbmm(&x, &base, &set(i), &segments)?]));
                        let y = sbmm(&x, &base, &set(0), &segments);
                        off();
                        let a = disagreement(&y?, &y_s1)?;
                        if a > 2e-2 {
                            eprintln!(
                            "MISMATCH sbmm {used} x {rows}: {path} and split 1 differ by {a:.2e}"
                        );
                        }
                        rs.push(mk("sbmm", path, t?));
                        Ok(())
                    };
                // The x-direct decode tiles (experimental): x loaded before each mma, a 6-deep code
                // ring (`dz-xd`) or a 3-deep one at 3 blocks an SM (`dz-xo`).
                let xd_off = || dz_candle_ops::set_v4_sbmm_x_direct(V4XDirect::Off);
                variant(
                    "dz-xd",
                    &|| dz_candle_ops::set_v4_sbmm_x_direct(V4XDirect::Deep),
                    &xd_off,
                )?;
                variant(
                    "dz-xo",
                    &|| dz_candle_ops::set_v4_sbmm_x_direct(V4XDirect::Occupancy),
                    &xd_off,
                )?;
                // The decode tile with one 16-row tile a warp (`dz-1t`; the default before session 19,
                // whose pair tile `dz` now runs).
                variant("dz-1t", &|| dz_candle_ops::set_v4_sbmm_pair(false), &|| {
                    dz_candle_ops::set_v4_sbmm_pair(true)
                })?;
                // The pair with an L2 prefetch (session 21).
                let pf_off = || dz_candle_ops::set_v4_sbmm_prefetch(0);
                variant(
                    "dz-pf4",
                    &|| dz_candle_ops::set_v4_sbmm_prefetch(4),
                    &pf_off,
                )?;
                variant(
                    "dz-pf8",
                    &|| dz_candle_ops::set_v4_sbmm_prefetch(8),
                    &pf_off,
                )?;
                // The tail split (session 21): the last partial wave's items split along K (where a
                // launch has one; else the same launch as `dz`).
                variant(
                    "dz-tail",
                    &|| dz_candle_ops::set_v4_sbmm_tail_split(true),
                    &|| dz_candle_ops::set_v4_sbmm_tail_split(false),
                )?;
            }
            if let Some(t) = t_v3 {
                rs.push(mk("sbmm", "v3", t));
            }
            rs.push(mk("sbmm", "loop", t_loop));
            for r in rs {
                eprintln!("{}", r.md());
                rows_out.push(r);
            }
        }
    }

    // A decode step as serving sees it (session 19): 32 rows over 20 distinct deltas, 12 of them with
    // two rows. `dz-20a`: the rows in arrival order, each its own segment, the 12 repeated deltas
    // coming back 20 rows later (streamed twice unless L2 still holds them); `dz-20g`: each delta's
    // rows next to one another, one segment a delta (the host's decode batch since its patch 0015).
    // The same rows, deltas and products; the two times say what the repeats cost.
    let (rows, used) = (32usize, 20usize);
    let x = Tensor::randn(0f32, 1.0, (rows, k), &b.dev)?.to_dtype(DType::BF16)?;
    let base = Tensor::randn(0f32, 1.0, (rows, n), &b.dev)?.to_dtype(DType::BF16)?;
    let t_dense = b.time(ITERS, |_| Ok(vec![x.matmul(&w.t()?)?]))?;
    let sets = 64 / used;
    let set = |i: usize| -> Vec<&DeviceDelta> {
        let s = i % sets;
        (0..used).map(|d| &pool[s * used + d]).collect()
    };
    let arrival: Vec<usize> = (0..used).chain(0..rows - used).collect();
    let mut grouped = arrival.clone();
    grouped.sort_unstable();
    // `dz-20g-pf4` / `-pf8`: grouped, with the pair's L2 prefetch (session 21).
    for (order, path, prefetch, tail) in [
        (&arrival, "dz-20a", 0u32, false),
        (&grouped, "dz-20g", 0, false),
        (&grouped, "dz-20g-pf4", 4, false),
        (&grouped, "dz-20g-pf8", 8, false),
        (&grouped, "dz-20g-tail", 0, true),
    ] {
        let mut segments: Vec<Segment> = Vec::new();
        for (r, &d) in order.iter().enumerate() {
            match segments.last_mut() {
                Some(s) if s.delta == Some(d) => s.len += 1,
                _ => segments.push(Segment {
                    start: r,
                    len: 1,
                    delta: Some(d),
                }),
            }
        }
        dz_candle_ops::set_v4_sbmm_prefetch(prefetch);
        dz_candle_ops::set_v4_sbmm_tail_split(tail);
        let t = b.time(ITERS, |i| Ok(vec![sbmm(&x, &base, &set(i), &segments)?]));
        dz_candle_ops::set_v4_sbmm_prefetch(0);
        dz_candle_ops::set_v4_sbmm_tail_split(false);
        let shape = SbmmShape {
            label,
            rows,
            n,
            k,
            deltas: used,
            d_bytes,
        };
        let row = shape.row(path, t?, t_dense, copy_bw);
        eprintln!("{}", row.md());
        rows_out.push(row);
    }

    Ok(())
}

fn main() -> Result<()> {
    // Off by default in the library; the benchmark compares v4 with v3 on the same deltas, so they keep
    // their packed parts besides the v4 layout (`deltazip serve --v4-kernels` keeps only the v4 layout).
    set_v4_kernels(true);
    dz_candle_ops::set_v4_keep_packed(true);
    // "dz" times the kernels at every row count (as the earlier tables did); "dense" times the dense
    // route on its own.
    set_dense_rows(0);
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: kernel_bench [--quick | --decode | --sbmm] [--shapes NxK,..] [--rows R,..] [--wide-from N] \
             [--out STEM] [--commit SHA] | --profile | --host | --upload"
        );
        return Ok(());
    }
    let quick = args.iter().any(|a| a == "--quick");
    let decode = args.iter().any(|a| a == "--decode");
    let sbmm_only = args.iter().any(|a| a == "--sbmm");
    let out = flag("--out");
    let commit = flag("--commit").unwrap_or_else(|| "unknown".into());
    // `--wide-from N`: the 32-row tile from N rows whatever the shape (`set_v4_wide_from`), to time it
    // below the rule's threshold.
    if let Some(n) = flag("--wide-from") {
        dz_candle_ops::set_v4_wide_from(n.parse().context("--wide-from: a row count")?);
    }
    let b = Bench::new()?;
    if args.iter().any(|a| a == "--profile") {
        return profile(&b);
    }
    if args.iter().any(|a| a == "--host") {
        return host_costs(&b);
    }
    if args.iter().any(|a| a == "--upload") {
        return upload_bandwidth(&b);
    }
    let copy_bw = b.copy_bandwidth()?;
    eprintln!("device copy bandwidth: {:.0} GB/s", copy_bw / 1e9);

    // `--shapes NxK,...` and `--rows R,...` narrow a run to some cases (e.g. the dense route's crossover).
    let list = |name: &str| -> Result<Option<Vec<String>>> {
        Ok(flag(name).map(|v| v.split(',').map(|s| s.trim().to_string()).collect()))
    };
    let shapes_arg: Option<Vec<(usize, usize)>> = list("--shapes")?
        .map(|v| {
            v.iter()
                .map(|s| {
                    let (n, k) = s
                        .split_once('x')
                        .with_context(|| format!("--shapes: {s:?} is not NxK"))?;
                    Ok((n.parse()?, k.parse()?))
                })
                .collect::<Result<_>>()
        })
        .transpose()?;
    let rows_arg: Option<Vec<usize>> = list("--rows")?
        .map(|v| {
            v.iter()
                .map(|s| Ok(s.parse::<usize>()?))
                .collect::<Result<_>>()
        })
        .transpose()?;
    let shapes: &[(usize, usize)] = if let Some(s) = &shapes_arg {
        s
    } else if quick {
        &[(4096, 4096), (1536, 576)]
    } else {
        &[
            (4096, 4096),
            (11008, 4096),
            (4096, 11008),
            (5120, 5120),
            (13824, 5120),
            (5120, 13824),
            (576, 576),
            (1536, 576),
            (576, 1536),
        ]
    };
    let with_generic = |n: usize, k: usize| (n, k) == (4096, 4096) || (n, k) == (11008, 4096);
    let rows_list: &[usize] = if let Some(r) = &rows_arg {
        r
    } else if quick {
        &[1, 16, 256]
    } else if decode {
        &[1, 2, 4, 8, 16]
    } else {
        &[1, 2, 4, 8, 16, 32, 64, 128, 256]
    };
    let mut rows_out: Vec<Row> = Vec::new();
    if decode || sbmm_only {
        // The serving decode regime's key case first (a run cut short still has it).
        sbmm_cases(&b, copy_bw, &mut rows_out)?;
    }
    for &(n, k) in shapes.iter().filter(|_| !sbmm_only) {
        let w_bytes = n * k * 2;
        let copies_w = (2 * L2_BYTES / w_bytes + 1).clamp(2, 32);
        let ws: Vec<Tensor> = (0..copies_w)
            .map(|_| {
                Tensor::randn(0f32, 0.02, (n, k), &b.dev).and_then(|t| t.to_dtype(DType::BF16))
            })
            .collect::<candle_core::Result<_>>()?;
        let mut cublas = Vec::new();
        for &rows in rows_list {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &b.dev)?.to_dtype(DType::BF16)?;
            let t = b.time(ITERS, |i| Ok(vec![x.matmul(&ws[i % ws.len()].t()?)?]))?;
            cublas.push(t);
        }
        drop(ws);
        for (label, cfg) in CODECS {
            let deltas = delta_copies(cfg, n, k, &b.dev)?;
            let d_bytes = deltas[0].packed_nbytes();
            let has_v4 = deltas[0].v4_parts().is_some();
            // The same deltas keeping only the v4 layout (`serve --v4-kernels`): their dense route
            // merges with the v4 dequantize kernel, the others with the generic one.
            let v4_only = if has_v4 && !decode {
                dz_candle_ops::set_v4_keep_packed(false);
                let v = delta_copies(cfg, n, k, &b.dev);
                dz_candle_ops::set_v4_keep_packed(true);
                Some(v?)
            } else {
                None
            };
            for (ri, &rows) in rows_list.iter().enumerate() {
                let x = Tensor::randn(0f32, 1.0, (rows, k), &b.dev)?.to_dtype(DType::BF16)?;
                let io = rows * k * 2 + rows * n * 2;
                // Rows 1-16 (the bandwidth target's range): what the driver's copy of the same bytes
                // takes at this size, the floor a kernel of that many bytes meets in this timing.
                let copy_same = if rows <= 16 {
                    Some(b.copy_same_bytes(d_bytes + io)?)
                } else {
                    None
                };
                let row = |path, time_us, agree| Row {
                    op: "delta_matmul",
                    path,
                    codec: label.to_string(),
                    rows,
                    n,
                    k,
                    deltas: 1,
                    time_us,
                    bytes: d_bytes + io,
                    cublas_us: cublas[ri],
                    cublas_bytes: w_bytes + io,
                    copy_bw,
                    stream_once_us: None,
                    copy_same_us: copy_same,
                    agree,
                };
                set_tensor_cores(true);
                let fast = b.time(ITERS, |i| {
                    Ok(vec![delta_matmul(&x, &deltas[i % deltas.len()])?])
                })?;
                // v3: the same with the v4 kernels off, where v4 would run (past 16 rows: the 32-row
                // tile off, so the tensor-core v3 kernels run as before it).
                let v3 = if has_v4 {
                    let old = |on: bool| {
                        if rows <= 16 {
                            set_v4_kernels(on);
                        } else {
                            set_v4_wide_tiles(on);
                        }
                    };
                    old(false);
                    let t = b.time(ITERS, |i| {
                        Ok(vec![delta_matmul(&x, &deltas[i % deltas.len()])?])
                    });
                    let y_v3 = delta_matmul(&x, &deltas[0]);
                    old(true);
                    let y_v4 = delta_matmul(&x, &deltas[0])?;
                    Some((t?, disagreement(&y_v3?, &y_v4)?))
                } else {
                    None
                };
                // v4-16: the v4-only deltas past 16 rows with the 32-row tile off (16-row tiles).
                let v4_16 = match v4_only.as_deref() {
                    Some(ds) if rows > 16 => {
                        set_v4_wide_tiles(false);
                        let t = b.time(ITERS, |i| Ok(vec![delta_matmul(&x, &ds[i % ds.len()])?]));
                        let y = delta_matmul(&x, &ds[0]);
                        set_v4_wide_tiles(true);
                        Some((t?, y?))
                    }
                    _ => None,
                };
                set_tensor_cores(false);
                let generic = if (with_generic(n, k) && !decode) || rows == 1 || rows == 256 {
                    Some(b.time(ITERS, |i| {
                        Ok(vec![delta_matmul(&x, &deltas[i % deltas.len()])?])
                    })?)
                } else {
                    None
                };
                let y_generic = delta_matmul(&x, &deltas[0])?;
                set_tensor_cores(true);
                let y_fast = delta_matmul(&x, &deltas[0])?;
                let agree = disagreement(&y_fast, &y_generic)?;
                if agree > 2e-2 {
                    eprintln!("MISMATCH {label} {n}x{k} rows {rows}: tensor-core and generic results differ by {agree:.2e}");
                }
                let r = row("dz", fast, Some(agree));
                eprintln!("{}", r.md());
                rows_out.push(r);
                if let Some((t, y)) = v4_16 {
                    let a = disagreement(&y, &y_fast)?;
                    if a > 2e-2 {
                        eprintln!("MISMATCH {label} {n}x{k} rows {rows}: v4 16-row tiles and dz differ by {a:.2e}");
                    }
                    let r = row("v4-16", t, Some(a));
                    eprintln!("{}", r.md());
                    rows_out.push(r);
                }
                // The 32-row tile's four kernels, the 64-row tile (session 17), and the 32-row tile and
                // the pair tiles on the balanced schedule (session 18), each forced.
                if has_v4 && rows > 16 {
                    for (mode, path) in [
                        (V4WideX::Global, "dz-gx"),
                        (V4WideX::Shared, "dz-sx"),
                        (V4WideX::SharedDeep, "dz-sxd"),
                        (V4WideX::SharedSplit, "dz-sxk"),
                        (V4WideX::Shared64, "dz-sx64"),
                        (V4WideX::SharedBalanced, "dz-sxb"),
                        (V4WideX::SharedPair, "dz-sxp"),
                        (V4WideX::SharedPairDeep, "dz-sxp2"),
                        (V4WideX::SharedPairGrid, "dz-sxq"),
                    ] {
                        set_v4_wide_x(mode);
                        let t = b.time(ITERS, |i| {
                            Ok(vec![delta_matmul(&x, &deltas[i % deltas.len()])?])
                        });
                        let y = delta_matmul(&x, &deltas[0]);
                        set_v4_wide_x(V4WideX::Auto);
                        let a = disagreement(&y?, &y_fast)?;
                        if a > 2e-2 {
                            eprintln!("MISMATCH {label} {n}x{k} rows {rows}: {path} and dz differ by {a:.2e}");
                        }
                        let r = row(path, t?, Some(a));
                        eprintln!("{}", r.md());
                        rows_out.push(r);
                    }
                }
                // The v4 kernel's warps per item, swept where it runs (1-4 rows and past 16 here: these
                // deltas keep both layouts); split 8 with a block per item is sessions 7-10's launch
                // shape.
                if has_v4 && (rows <= 4 || rows > 16) {
                    for (split, path) in [(1u32, "dz-s1"), (2, "dz-s2"), (4, "dz-s4"), (8, "dz-s8")]
                    {
                        set_v4_split(split);
                        // (the shared-memory 32-row kernel has no split)
                        set_v4_wide_x(V4WideX::Global);
                        let t = b.time(ITERS, |i| {
                            Ok(vec![delta_matmul(&x, &deltas[i % deltas.len()])?])
                        });
                        let y = delta_matmul(&x, &deltas[0]);
                        set_v4_wide_x(V4WideX::Auto);
                        set_v4_split(0);
                        let a = disagreement(&y?, &y_fast)?;
                        if a > 2e-2 {
                            eprintln!("MISMATCH {label} {n}x{k} rows {rows}: split {split} and auto differ by {a:.2e}");
                        }
                        let r = row(path, t?, Some(a));
                        eprintln!("{}", r.md());
                        rows_out.push(r);
                    }
                }
                // The dense route (the delta formed as a bf16 weight, then cuBLAS): where it overtakes
                // the kernels decides `DEFAULT_DENSE_ROWS`.
                if rows >= 8 {
                    let routes = std::iter::once(("dense", deltas.as_slice()))
                        .chain(v4_only.as_deref().map(|v| ("dense-v4", v)));
                    for (path, ds) in routes {
                        set_dense_rows(1);
                        let t =
                            b.time(ITERS, |i| Ok(vec![delta_matmul(&x, &ds[i % ds.len()])?]))?;
                        let a = disagreement(&delta_matmul(&x, &ds[0])?, &y_fast)?;
                        set_dense_rows(0);
                        if a > 2e-2 {
                            eprintln!("MISMATCH {label} {n}x{k} rows {rows}: {path} route and kernels differ by {a:.2e}");
                        }
                        let r = row(path, t, Some(a));
                        eprintln!("{}", r.md());
                        rows_out.push(r);
                    }
                }
                if let Some((t, a)) = v3 {
                    if a > 2e-2 {
                        eprintln!("MISMATCH {label} {n}x{k} rows {rows}: v4 and v3 results differ by {a:.2e}");
                    }
                    let r = row("v3", t, Some(a));
                    eprintln!("{}", r.md());
                    rows_out.push(r);
                }
                if let Some(g) = generic.filter(|_| with_generic(n, k)) {
                    rows_out.push(row("generic", g, None));
                }
            }
        }
    }

    // (A run narrowed by --shapes or --rows leaves the sbmm cases out.)
    if !decode && !sbmm_only && shapes_arg.is_none() && rows_arg.is_none() {
        sbmm_cases(&b, copy_bw, &mut rows_out)?;
    }

    let gpu = b.dev.as_cuda_device()?.cuda_stream().context().name()?;
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut md = String::new();
    writeln!(
        md,
        "GPU {gpu} | commit `{commit}` | {date} | measured copy bandwidth {:.0} GB/s (read + write) | \
         median of {ITERS} CUDA-event-timed launches, weights rotated past L2 | x bf16\n",
        copy_bw / 1e9
    )?;
    writeln!(
        md,
        "| op | path | N x K | codec | deltas | rows | time us | cuBLAS bf16 us | speedup | byte ratio | GB/s | \
         % copy BW | vs stream once | vs copy same bytes | agree |"
    )?;
    writeln!(
        md,
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for r in &rows_out {
        writeln!(md, "{}", r.md())?;
    }
    println!("{md}");
    if let Some(stem) = out {
        std::fs::write(format!("{stem}.md"), &md)?;
        let json: Vec<serde_json::Value> = rows_out.iter().map(Row::json).collect();
        std::fs::write(
            format!("{stem}.json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "gpu": gpu, "commit": commit, "date": date, "copy_bw_bytes_per_s": copy_bw,
                "iters": ITERS, "results": json,
            }))?,
        )?;
    }
    Ok(())
}

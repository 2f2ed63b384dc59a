//! The CPU engines: multithreaded (rayon) loops that decode chunks of packed rows into small f32 buffers
//! and multiply them. Every hot loop is a [`Kernel`] run through [`dispatch`], so it is compiled for
//! AVX2/AVX-512 when the CPU has them.
//!
//! - Few input rows (`M <= SMALL_M`, decode): the op is bandwidth-bound. Each packed row is streamed once,
//!   chunk by chunk, and every chunk is dotted with all `M` input rows while it sits in L1 (one load of
//!   the decoded value feeds `M` multiply-adds).
//! - More rows (prefill, batches): a tile of up to `MAX_TILE_ROWS x TILE_COLS` decoded values is
//!   multiplied with the input by the `gemm` crate (the GEMM candle itself uses, which picks its own
//!   SIMD kernels at run time), accumulating over the column tiles.
//!
//! A loop of less than [`PARALLEL_WORK`] (decoded weights times input rows) runs on the calling thread:
//! entering rayon's pool costs more than such a loop.
//!
//! Both write `yt`, the result transposed (`[stored rows, M]`), so each task owns a contiguous slice;
//! [`scatter_add`] then adds it into the `[M, N_total]` output through `row_index`.

use rayon::prelude::*;

use super::isa::{dispatch, Isa, Kernel, Level};
use super::HostDelta;
use crate::codec::{visit, DecodeVisitor, RowDecode, CHUNK};

/// Largest `M` for the streaming dot-product engine.
pub(crate) const SMALL_M: usize = 8;
/// Stored rows per rayon task in the streaming engine.
const STREAM_ROWS: usize = 16;
/// Decoded rows of one GEMM tile: between these, as the rows and threads allow.
const MIN_TILE_ROWS: usize = 32;
const MAX_TILE_ROWS: usize = 256;
/// Decoded columns of one GEMM tile (a multiple of `CHUNK`, so that every chunk starts 32-aligned).
const TILE_COLS: usize = 2 * CHUNK;
const _: () = assert!(TILE_COLS.is_multiple_of(CHUNK) && CHUNK.is_multiple_of(32));

/// Work (decoded weights times input rows) below which a loop runs on the calling thread instead of
/// rayon's pool: a parallel loop entered from outside the pool queues its job and waits on a latch for
/// the pool's threads, tens of microseconds that made most of a small call's time (a 64 x 64 delta at
/// 32 rows: ~520 us a layer's sbmm, mostly in the kernel's thread wake-ups and yields).
const PARALLEL_WORK: usize = 1 << 16;

/// The threshold in force: [`PARALLEL_WORK`], or a test's override (every loop gives the same values
/// either way: its chunks are independent).
static PARALLEL_FROM: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(PARALLEL_WORK);

/// Whether a loop of `work` runs on rayon's pool.
fn parallel(work: usize) -> bool {
    work >= PARALLEL_FROM.load(std::sync::atomic::Ordering::Relaxed)
}

/// `f(i, chunk i)` over `s` in chunks of `chunk` elements, on rayon's pool when `parallel`.
fn for_each_chunk<T: Send>(
    s: &mut [T],
    chunk: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if parallel {
        s.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        s.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// `yt[r * m + i] = sum_k x[i * K + k] * D[r][k]` for every stored row `r` of `h` and input row `i < m`:
/// the product of `m` input rows with the stored rows, transposed.
pub(crate) fn matmul_t(h: &HostDelta<'_>, x: &[f32], m: usize) -> Vec<f32> {
    matmul_t_at(h, x, m, Level::detect())
}

/// [`matmul_t`] with the kernels compiled for `level` (or the best level the CPU has, if lower).
pub(crate) fn matmul_t_at(h: &HostDelta<'_>, x: &[f32], m: usize, level: Level) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * h.k);
    visit(h, MatmulT { x, m, level })
}

struct MatmulT<'x> {
    x: &'x [f32],
    m: usize,
    level: Level,
}

impl DecodeVisitor for MatmulT<'_> {
    type Output = Vec<f32>;

    fn visit<D: RowDecode>(self, d: &D) -> Vec<f32> {
        let mut yt = vec![0.0f32; d.rows() * self.m];
        if D::ZERO || self.m == 0 || d.rows() == 0 {
            return yt;
        }
        if self.m <= SMALL_M {
            stream(d, self.x, self.m, &mut yt, self.level);
        } else {
            tiled(d, self.x, self.m, &mut yt, self.level);
        }
        yt
    }
}

/// The streaming engine: one pass over each packed row, dotted with all `m <= SMALL_M` input rows.
fn stream<D: RowDecode>(d: &D, x: &[f32], m: usize, yt: &mut [f32], level: Level) {
    let work = d.rows() * d.cols() * m;
    for_each_chunk(yt, STREAM_ROWS * m, parallel(work), |task, ys| {
        let r0 = task * STREAM_ROWS;
        match m {
            1 => dispatch(level, Stream::<D, 1> { d, x, r0, ys }),
            2 => dispatch(level, Stream::<D, 2> { d, x, r0, ys }),
            3 => dispatch(level, Stream::<D, 3> { d, x, r0, ys }),
            4 => dispatch(level, Stream::<D, 4> { d, x, r0, ys }),
            5 => dispatch(level, Stream::<D, 5> { d, x, r0, ys }),
            6 => dispatch(level, Stream::<D, 6> { d, x, r0, ys }),
            7 => dispatch(level, Stream::<D, 7> { d, x, r0, ys }),
            _ => dispatch(level, Stream::<D, 8> { d, x, r0, ys }),
        }
    });
}

/// Rows `r0 ..` of the streaming engine, for `M` input rows.
struct Stream<'a, D, const M: usize> {
    d: &'a D,
    x: &'a [f32],
    r0: usize,
    ys: &'a mut [f32],
}

impl<D: RowDecode, const M: usize> Kernel for Stream<'_, D, M> {
    type Output = ();

    #[inline(always)]
    unsafe fn run<I: Isa>(self) {
        let k = self.d.cols();
        let mut buf = [0.0f32; CHUNK];
        for (i, y) in self.ys.chunks_exact_mut(M).enumerate() {
            let r = self.r0 + i;
            let mut acc = [0.0f32; M];
            for c0 in (0..k).step_by(CHUNK) {
                let n = CHUNK.min(k - c0);
                let w = &mut buf[..n];
                self.d.decode(r, c0, w);
                let mut xs: [&[f32]; M] = [&[]; M];
                for (j, xr) in xs.iter_mut().enumerate() {
                    *xr = &self.x[j * k + c0..j * k + c0 + n];
                }
                // SAFETY: the caller of `run::<I>` guarantees I's features.
                let part = unsafe { I::dots::<M>(&xs, w) };
                for (a, p) in acc.iter_mut().zip(part) {
                    *a += p;
                }
            }
            y.copy_from_slice(&acc);
        }
    }
}

/// The tiled engine: decode `tile_rows x TILE_COLS` tiles and multiply them with GEMM.
fn tiled<D: RowDecode>(d: &D, x: &[f32], m: usize, yt: &mut [f32], level: Level) {
    let k = d.cols();
    // Tall tiles amortise GEMM's packing of the input over more rows; keep two tasks per thread.
    let tile_rows = d
        .rows()
        .div_ceil(2 * rayon::current_num_threads())
        .next_multiple_of(16)
        .clamp(MIN_TILE_ROWS, MAX_TILE_ROWS);
    let tile_cols = TILE_COLS;
    for_each_chunk(yt, tile_rows * m, parallel(d.rows() * k * m), |task, ys| {
        let r0 = task * tile_rows;
        let rows = ys.len() / m;
        let mut tile = vec![0.0f32; rows * tile_cols.min(k)];
        for k0 in (0..k).step_by(tile_cols) {
            let kc = tile_cols.min(k - k0);
            let tile = &mut tile[..rows * kc];
            dispatch(
                level,
                DecodeTile {
                    d,
                    r0,
                    k0,
                    kc,
                    tile,
                },
            );
            // ys[rows, m] (+)= tile[rows, kc] · x[:, k0..k0 + kc]ᵀ
            // SAFETY: every pointer/stride pair addresses memory inside its slice: `ys` is
            // rows x m with row stride m; `tile` is rows x kc with row stride kc; the rhs element
            // (kk, i) is x[i * k + k0 + kk] with kk < kc <= k - k0 and i < m, inside `x` (m * k).
            // The three slices do not overlap (`ys` is the only mutable one).
            unsafe {
                gemm::gemm(
                    rows,
                    m,
                    kc,
                    ys.as_mut_ptr(),
                    1,
                    m as isize,
                    k0 > 0,
                    tile.as_ptr(),
                    1,
                    kc as isize,
                    x.as_ptr().add(k0),
                    k as isize,
                    1,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
}

/// Decodes columns `k0 .. k0 + kc` of stored rows `r0 ..` into `tile` (`rows x kc`, row-major).
struct DecodeTile<'a, D> {
    d: &'a D,
    r0: usize,
    k0: usize,
    kc: usize,
    tile: &'a mut [f32],
}

impl<D: RowDecode> Kernel for DecodeTile<'_, D> {
    type Output = ();

    #[inline(always)]
    unsafe fn run<I: Isa>(self) {
        for (i, row) in self.tile.chunks_exact_mut(self.kc).enumerate() {
            self.d.decode_span(self.r0 + i, self.k0, row);
        }
    }
}

/// `out[i * n_total + row(r)] += yt[r * m + i]`, where `row(r)` is `row_index[r]` (or `r`): the
/// transposed result added into the `[M, N_total]` output. Blocks of `SCATTER_ROWS` output rows read
/// `yt` a cache line at a time.
pub(crate) fn scatter_add(h: &HostDelta<'_>, yt: &[f32], m: usize, out: &mut [f32]) {
    const SCATTER_ROWS: usize = 16;
    let n = h.n_total;
    debug_assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    for_each_chunk(out, SCATTER_ROWS * n, parallel(yt.len()), |b, o| {
        let i0 = b * SCATTER_ROWS;
        let rows = o.len() / n;
        for (r, y) in yt.chunks_exact(m).enumerate() {
            let col = match h.row_index {
                None => r,
                Some(idx) => idx[r] as usize,
            };
            for (i, &v) in y[i0..i0 + rows].iter().enumerate() {
                o[i * n + col] += v;
            }
        }
    });
}

/// `out[row] = D[row]` for every row of the full matrix (`out` is `[N_total, K]`, zero-initialised).
pub(crate) fn dequantize_into(h: &HostDelta<'_>, out: &mut [f32]) {
    dequantize_into_at(h, out, Level::detect())
}

/// [`dequantize_into`] with the kernels compiled for `level`.
pub(crate) fn dequantize_into_at(h: &HostDelta<'_>, out: &mut [f32], level: Level) {
    visit(
        h,
        Rows {
            h,
            out,
            add: false,
            level,
        },
    )
}

/// `out[row] += D[row]` for every row of the full matrix (`out` is `[N_total, K]`).
pub(crate) fn add_into(h: &HostDelta<'_>, out: &mut [f32]) {
    visit(
        h,
        Rows {
            h,
            out,
            add: true,
            level: Level::detect(),
        },
    )
}

struct Rows<'h, 'a, 'o> {
    h: &'h HostDelta<'a>,
    out: &'o mut [f32],
    add: bool,
    level: Level,
}

impl DecodeVisitor for Rows<'_, '_, '_> {
    type Output = ();

    fn visit<D: RowDecode>(self, d: &D) {
        if D::ZERO {
            if !self.add {
                self.out.fill(0.0);
            }
            return;
        }
        let k = d.cols();
        let (h, add, level) = (self.h, self.add, self.level);
        let work = self.out.len();
        for_each_chunk(self.out, k, parallel(work), |row, o| {
            if let Some(r) = h.stored_row(row) {
                dispatch(level, AddRow { d, r, o, add });
            }
        });
    }
}

/// `o = D[r]` (or `o += D[r]` when `add`), chunk by chunk.
struct AddRow<'a, D> {
    d: &'a D,
    r: usize,
    o: &'a mut [f32],
    add: bool,
}

impl<D: RowDecode> Kernel for AddRow<'_, D> {
    type Output = ();

    #[inline(always)]
    unsafe fn run<I: Isa>(self) {
        let (d, r) = (self.d, self.r);
        if !self.add {
            d.decode_span(r, 0, self.o);
            return;
        }
        let mut buf = [0.0f32; CHUNK];
        for (i, oc) in self.o.chunks_mut(CHUNK).enumerate() {
            let w = &mut buf[..oc.len()];
            d.decode(r, i * CHUNK, w);
            for (a, b) in oc.iter_mut().zip(w.iter()) {
                *a += b;
            }
        }
    }
}

/// `out[t] += D[ids[t]]` for every token `t` (`out` is `[T, K]`; ids are checked `< N_total`).
pub(crate) fn gather_add(h: &HostDelta<'_>, ids: &[usize], out: &mut [f32]) {
    visit(h, Gather { h, ids, out })
}

struct Gather<'h, 'a, 'i, 'o> {
    h: &'h HostDelta<'a>,
    ids: &'i [usize],
    out: &'o mut [f32],
}

impl DecodeVisitor for Gather<'_, '_, '_, '_> {
    type Output = ();

    fn visit<D: RowDecode>(self, d: &D) {
        if D::ZERO {
            return;
        }
        let k = d.cols();
        let (h, ids) = (self.h, self.ids);
        let work = self.out.len();
        for_each_chunk(self.out, k, parallel(work), |t, o| {
            if let Some(r) = ids.get(t).and_then(|&id| h.stored_row(id)) {
                dispatch(Level::detect(), AddRow { d, r, o, add: true });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    //! Every ISA level the CPU has, on every codec and both engines, against dz-format's dequantize and
    //! an f64 product (the integration tests only reach the best level).
    use dz_format::codec::{Grid, Payload, Quant, Sign1, Sparse, Sparse24};
    use dz_format::QuantParams;
    use half::f16;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn payloads(n: usize, k: usize, rng: &mut StdRng) -> Vec<Payload> {
        let mut out = Vec::new();
        for bits in [2u8, 3, 4, 8] {
            let p = QuantParams {
                bits,
                group_size: 20,
                symmetric: bits % 2 == 0,
                global_scale: 0.01,
            };
            let grid = |rng: &mut StdRng| Grid {
                params: p,
                scales: (0..n * p.n_groups(k))
                    .map(|_| f16::from_f32(rng.gen_range(-2.0..2.0)))
                    .collect(),
                zeros: (!p.symmetric).then(|| {
                    (0..n * p.n_groups(k))
                        .map(|_| f16::from_f32(rng.gen_range(0.0..8.0)))
                        .collect()
                }),
            };
            let codes = |len: usize, rng: &mut StdRng| -> Vec<u8> {
                (0..len)
                    .map(|_| rng.gen_range(0..(1u16 << bits)) as u8)
                    .collect()
            };
            out.push(Payload::Quant(Quant {
                rows: n,
                cols: k,
                grid: grid(rng),
                codes: codes(n * k, rng),
            }));
            out.push(Payload::Sparse24(Sparse24 {
                rows: n,
                cols: k,
                grid: grid(rng),
                codes: codes(n * k / 2, rng),
                positions: (0..n * k / 4)
                    .flat_map(|_| {
                        let a = rng.gen_range(0..3u8);
                        [a, rng.gen_range(a + 1..4u8)]
                    })
                    .collect(),
            }));
            let mask: Vec<bool> = (0..n * k).map(|_| rng.gen_bool(0.4)).collect();
            let kept = mask.iter().filter(|&&b| b).count();
            out.push(Payload::Sparse(Sparse {
                rows: n,
                cols: k,
                grid: grid(rng),
                mask,
                codes: codes(kept, rng),
            }));
        }
        out.push(Payload::Sign1(Sign1 {
            rows: n,
            cols: k,
            global_scale: 0.01,
            signs: (0..n * k).map(|_| rng.gen_bool(0.5)).collect(),
            scales: (0..n)
                .map(|_| f16::from_f32(rng.gen_range(0.5..2.0)))
                .collect(),
        }));
        out
    }

    /// `p` (packed into `parts`) as an `n x k` delta that stores every row.
    fn host_delta<'a>(p: &Payload, parts: &'a [Vec<u8>], n: usize, k: usize) -> HostDelta<'a> {
        HostDelta {
            codec: p.codec(),
            n_total: n,
            k,
            n_stored: n,
            row_index: None,
            parts: parts.iter().map(Vec::as_slice).collect(),
        }
    }

    /// Every loop gives the same bits on rayon's pool and on the calling thread ([`PARALLEL_WORK`]).
    #[test]
    fn the_pool_and_the_calling_thread_give_the_same_bits() {
        use std::sync::atomic::Ordering;
        let mut rng = StdRng::seed_from_u64(11);
        let (n, k) = (37, 600);
        let run = |h: &HostDelta<'_>, x: &[f32], m: usize, ids: &[usize]| {
            let yt = matmul_t(h, x, m);
            let mut out = vec![0.5f32; m * n];
            scatter_add(h, &yt, m, &mut out);
            let mut dense = vec![f32::NAN; n * k];
            dequantize_into(h, &mut dense);
            let mut gathered = vec![0.25f32; ids.len() * k];
            gather_add(h, ids, &mut gathered);
            (yt, out, dense, gathered)
        };
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for p in payloads(n, k, &mut rng) {
            let parts = p.pack().unwrap();
            let h = host_delta(&p, &parts, n, k);
            let ids: Vec<usize> = (0..9).map(|_| rng.gen_range(0..n)).collect();
            // Both engines: streaming (m <= SMALL_M) and tiled.
            for m in [2, 20] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
                PARALLEL_FROM.store(0, Ordering::Relaxed);
                let pool = run(&h, &x, m, &ids);
                PARALLEL_FROM.store(usize::MAX, Ordering::Relaxed);
                let here = run(&h, &x, m, &ids);
                PARALLEL_FROM.store(PARALLEL_WORK, Ordering::Relaxed);
                let what = p.codec().describe();
                assert_eq!(bits(&pool.0), bits(&here.0), "{what} m={m}: matmul");
                assert_eq!(bits(&pool.1), bits(&here.1), "{what} m={m}: scatter");
                assert_eq!(bits(&pool.2), bits(&here.2), "{what}: dequantize");
                assert_eq!(bits(&pool.3), bits(&here.3), "{what}: gather");
            }
        }
    }

    #[test]
    fn every_isa_level_matches_the_reference() {
        let mut rng = StdRng::seed_from_u64(7);
        // K spans three decode chunks and two GEMM column tiles; N leaves a partial task.
        let (n, k) = (21, 1108);
        let mut ran = 0;
        for p in payloads(n, k, &mut rng) {
            let parts = p.pack().unwrap();
            let h = host_delta(&p, &parts, n, k);
            let dense = p.dequantize();
            for m in [1, 3, 8, 9, 40] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
                for level in Level::available() {
                    let yt = matmul_t_at(&h, &x, m, level);
                    for r in 0..n {
                        for i in 0..m {
                            let (mut want, mut mag) = (0.0f64, 0.0f64);
                            for c in 0..k {
                                let t = f64::from(x[i * k + c]) * f64::from(dense[r * k + c]);
                                want += t;
                                mag += t.abs();
                            }
                            let got = f64::from(yt[r * m + i]);
                            assert!(
                                (got - want).abs() <= 1e-5 * mag,
                                "{} {level:?} m={m} at row {r}, input {i}: value {got}, expected \
                                 {want}, tolerance {}",
                                p.codec().describe(),
                                1e-5 * mag
                            );
                        }
                    }
                    ran += 1;
                }
            }
            for level in Level::available() {
                let mut out = vec![f32::NAN; n * k];
                dequantize_into_at(&h, &mut out, level);
                assert!(
                    out.iter()
                        .zip(&dense)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} {level:?}: dequantize is not bit-exact",
                    p.codec().describe()
                );
            }
        }
        assert!(ran > 0, "no configuration ran");
    }
}

//! The v4 family (`kernels/v4/v4.cu`): `delta_matmul` and `sbmm` for 1 to 16 input rows (decode), f16 and
//! bf16 inputs, over a delta's codes *re-laid at upload* into mma fragment order (dz-candle-ops'
//! `relayout` module defines the layout and has the CPU twin of these kernels' index arithmetic). quant 2/4
//! bits run on mma.sync m16n8k16, sparse24 2/4 bits on mma.sp m16n8k32 (the 2:4 metadata goes to the
//! tensor cores as stored); symmetric grids, groups of 0 or a multiple of 128, K a multiple of 32
//! ([`v4_supports`]).
//!
//! Entry points, with the generic kernels' signatures (crate docs), the descriptor's `parts` being the v4
//! parts `[codes, meta, scales]` (`meta` unused by quant):
//! - `dz_v4_<variant>_matmul_add_<t>_n<NT>(DzDelta d, const T* x, const T* base, T* out, u32 m, u32 split)`:
//!   `split` (1, 2, 4 or 8) = warps per (8 NT input rows, 16-row tile) item along K; NT in 1, 2, 4 (the
//!   32-row tile, issue #5's rows 17-256: any `m`, as `ceil(m / 32)` x tiles; it loads x right before each
//!   mma instead of in the load ring).
//! - `dz_v4_<variant>_matmul_sx_<t>_n4(DzDelta d, const T* x, const T* base, T* out, u32 m)`: the 32-row
//!   tile with x staged in shared memory, a block's 8 warps taking 8 consecutive 16-row tiles of one
//!   32-row x tile over the whole of K (no split): a 1-D grid of at most `ceil(m / 32) *
//!   ceil(n_stored / 128)` blocks, grid-stride.
//! - `dz_v4_<variant>_matmul_sxk4_<t>_n4(DzDelta d, const T* x, const T* base, T* out, u32 m, float* ws,
//!   u32* counters)`: as `matmul_sx`, K split over `S` = 4 consecutive blocks; each writes its
//!   partial sums to `ws` and counts itself in at its item's counter, and the last one adds the `S`
//!   partials in rank order and stores: a grid of `S` x `matmul_sx`'s blocks, `ws` and `counters` of
//!   [`v4_matmul_sxk_workspace`] bytes, the counters zero at launch.
//! - `dz_v4_<variant>_matmul_sxd_<t>_n4` (same signature and grid): as `matmul_sx`, x and the codes in a
//!   deep ring of K blocks in dynamic shared memory; launch it with [`v4_matmul_sxd_smem`] bytes of it
//!   (raising the function's limit past 48 KB first).
//! - `dz_v4_<variant>_sbmm_<t>_n<NT>(const DzSegment* segs, u32 n_segs, const DzDelta* deltas, const T* x,
//!   T* out, u32 k, u32 n_total, u32 tiles, u32 split)`: every segment at most `8 NT` rows; `tiles` =
//!   16-row tiles of the tallest delta, `split` (1, 2, 4 or 8) = warps per (segment, tile) item along K,
//!   or a tail-split word from [`v4_sbmm_tail`] (with its grid) for every sbmm entry that takes a split.
//! - `dz_v4_<variant>_sbmm_ring_<t>_n1(const DzSegment* segs, u32 n_segs, const DzDelta* deltas, const T* x,
//!   T* out, u32 k, u32 n_total, u32 tiles)`: the decode sbmm (segments of at most 8 rows, one item a warp
//!   over its whole K row, as `split` 1) with each warp's codes streamed through its own ring in dynamic
//!   shared memory; launch it with [`v4_sbmm_ring_smem`] bytes of it (experimental, off by default).
//! - `dz_v4_<variant>_sbmm_xd_<t>_n1` and `_sbmm_xo_` (the `sbmm` signature and launch): the decode tile
//!   with x loaded right before each mma instead of in the load ring, and a 6-deep ring of codes (xd) or
//!   a 3-deep one at 3 blocks an SM (xo) (experimental, off by default).
//! - `dz_v4_<variant>_sbmm_p2_<t>_n1` (the `sbmm` signature): the decode tile with two consecutive 16-row
//!   tiles a warp sharing each x word; `tiles` as for `sbmm`, the items (segment, pair of tiles):
//!   `n_segs * ceil(tiles / 2)`, each split over `split` warps (experimental, off by default).
//! - `dz_v4_<variant>_dequantize_<t>(DzDelta d, const T* base, T* out)` for `t` in `f32`, `f16`, `bf16`:
//!   `out = base + D` (`D` when base is 0), no row subset; what `merge`, `dequantize` and the dense route
//!   of a delta that keeps only its v4 layout run.
//!
//! for `variant` in `quant2`, `quant4`, `sparse24_2`, `sparse24_4`, `t` in `f16`, `bf16`, `NT` in 1, 2
//! (matmul also 4).
//! A block has [`V4_THREADS`] threads (8 warps). Both launch on a 1-D grid over their items, `8 / split`
//! items a block, grid-stride: matmul's items are `ceil(m / (8 NT)) * ceil(n_stored / 16)` (x-tile-major),
//! sbmm's `n_segs * tiles`.

use crate::{Dtype, Variant};

/// Threads per block of every v4 kernel (8 warps).
pub const V4_THREADS: u32 = 256;

/// Stored rows per block (one 16-row tile of the re-laid codes).
pub const V4_TILE_ROWS: u32 = 16;

/// Most input rows a v4 launch takes per segment (the `_n2` tile) with the ring-fed tiles, and per sbmm
/// segment.
pub const V4_MAX_ROWS: u32 = 16;

/// Input rows of the widest v4 matmul tile (`_n4`): a `delta_matmul` of more rows runs it over
/// `ceil(m / 32)` x tiles (each decodes the codes again; after the first x tile they come mostly from L2).
pub const V4_WIDE_ROWS: u32 = 32;

/// The module name the v4 PTX is loaded under.
pub const V4_MODULE: &str = "dz_v4";

/// The v4 entry point names of one variant.
#[derive(Debug)]
pub struct V4Entries {
    /// The variant's name (`quant4`, ...).
    pub variant: &'static str,
    /// `dz_v4_<variant>_matmul_add_<t>_n<NT>`, by dtype (f16, bf16) then tile (n1, n2, n4).
    pub matmul_add: [[&'static str; 3]; 2],
    /// `dz_v4_<variant>_matmul_sx_<t>_n4`, by dtype: the 32-row tile with x in shared memory.
    pub matmul_sx: [&'static str; 2],
    /// `dz_v4_<variant>_matmul_sxd_<t>_n4`, by dtype: the 32-row tile with x and the codes in a deep
    /// shared-memory ring ([`v4_matmul_sxd_smem`] bytes of dynamic shared memory).
    pub matmul_sxd: [&'static str; 2],
    /// `dz_v4_<variant>_matmul_sx_<t>_n8`, by dtype: the 64-row tile with x in shared memory on the balanced
    /// schedule ([`V4_MATMUL_SX64_SMEM`] bytes of dynamic shared memory; experimental,
    /// [`V4Entries::matmul_sx64`]).
    pub matmul_sx64: [&'static str; 2],
    /// `dz_v4_<variant>_matmul_sxb_<t>_n4`, by dtype: the 32-row tile on the balanced schedule
    /// ([`V4_MATMUL_SXB_SMEM`] bytes of dynamic shared memory; experimental, [`V4Entries::matmul_sxb`]).
    pub matmul_sxb: [&'static str; 2],
    /// `dz_v4_<variant>_matmul_sxp_<t>_n4` and `_sxp2_`, by dtype then entry: the 32-row tile on the
    /// balanced schedule with two 16-row tiles a warp sharing each x fragment (code rings 1 deep, 2 blocks
    /// an SM; 2 deep, 1 block an SM); experimental, [`V4Entries::matmul_sxp`].
    pub matmul_sxp: [[&'static str; 2]; 2],
    /// `dz_v4_<variant>_matmul_sxq_<t>_n4`, by dtype: the pair tile on the plain grid-stride launch
    /// (experimental, [`V4Entries::matmul_sxq`]).
    pub matmul_sxq: [&'static str; 2],
    /// `dz_v4_<variant>_matmul_sxk4_<t>_n4`, by dtype: the 32-row tile with x in shared memory, K split
    /// over 4 blocks, reduced through a workspace (S = 2 measured no faster than no split in session 14).
    pub matmul_sxk: [&'static str; 2],
    /// `dz_v4_<variant>_sbmm_<t>_n<NT>`, by dtype then tile.
    pub sbmm: [[&'static str; 2]; 2],
    /// `dz_v4_<variant>_sbmm_sx_<t>_n<NT>`, by dtype then tile: the sbmm with x staged in shared memory
    /// (experimental, [`V4Entries::sbmm_sx`]).
    pub sbmm_sx: [[&'static str; 2]; 2],
    /// `dz_v4_<variant>_sbmm_ring_<t>_n1`, by dtype: the decode sbmm with a per-warp shared-memory code
    /// ring (experimental, [`V4Entries::sbmm_ring`]).
    pub sbmm_ring: [&'static str; 2],
    /// `dz_v4_<variant>_sbmm_xd_<t>_n1`, by dtype: the decode sbmm with x loaded right before each mma and a
    /// 6-deep code ring (experimental, [`V4Entries::sbmm_xd`]).
    pub sbmm_xd: [&'static str; 2],
    /// `dz_v4_<variant>_sbmm_xo_<t>_n1`, by dtype: the same with a 3-deep code ring in 80 registers, 3
    /// blocks an SM (experimental, [`V4Entries::sbmm_xo`]).
    pub sbmm_xo: [&'static str; 2],
    /// `dz_v4_<variant>_sbmm_p2_<t>_n1`, by dtype: the decode sbmm with two tiles a warp (experimental,
    /// [`V4Entries::sbmm_pair`]).
    pub sbmm_p2: [&'static str; 2],
    /// `dz_v4_<variant>_sbmm_p2f<PF>_<t>_n1`, by prefetch distance ([`V4_SBMM_PREFETCH`]) and dtype: the pair
    /// with an L2 prefetch PF blocks ahead ([`V4Entries::sbmm_pair_prefetch`]).
    pub sbmm_p2f: [[&'static str; 2]; 2],
    /// `dz_v4_<variant>_dequantize_<t>` (f32, f16, bf16): `out = base + D` (base 0: `D`) for a delta
    /// without a row subset, one thread per lane of a packet ([`V4_DEQUANTIZE_THREADS`] a block).
    pub dequantize: [&'static str; 3],
}

/// Threads per block of the v4 `dequantize` entry points (8 packets of 32 lanes).
pub const V4_DEQUANTIZE_THREADS: u32 = 256;

impl V4Entries {
    fn index(dtype: Dtype, rows: u32) -> Option<(usize, usize)> {
        let d = match dtype {
            Dtype::F16 => 0,
            Dtype::Bf16 => 1,
            Dtype::F32 => return None,
        };
        match rows {
            0..=8 => Some((d, 0)),
            9..=16 => Some((d, 1)),
            _ => None,
        }
    }

    /// The matmul entry point whose tile is [`v4_matmul_tile_rows`]`(rows)`: the 8- or 16-row tile up to
    /// 16 rows, else the 32-row tile (which loops over x tiles of 32 rows); `None` for f32.
    pub fn matmul_add(&self, dtype: Dtype, rows: u32) -> Option<&'static str> {
        let d = Self::index(dtype, 1)?.0;
        Some(match v4_matmul_tile_rows(rows) {
            8 => self.matmul_add[d][0],
            16 => self.matmul_add[d][1],
            _ => self.matmul_add[d][2],
        })
    }

    /// The 32-row matmul tile with x staged in shared memory (`(DzDelta d, const T* x, const T* base, T* out,
    /// u32 m)`, no split); `None` for f32.
    pub fn matmul_sx(&self, dtype: Dtype) -> Option<&'static str> {
        Self::index(dtype, 1).map(|(d, _)| self.matmul_sx[d])
    }

    /// The 32-row matmul tile with x and the codes in a deep shared-memory ring (the signature of
    /// [`V4Entries::matmul_sx`], [`v4_matmul_sxd_smem`] bytes of dynamic shared memory); `None` for f32.
    pub fn matmul_sxd(&self, dtype: Dtype) -> Option<&'static str> {
        Self::index(dtype, 1).map(|(d, _)| self.matmul_sxd[d])
    }

    /// The 64-row matmul tile with x staged in shared memory, on the balanced schedule: `(DzDelta d, const T*
    /// x, const T* base, T* out, u32 m, float* ws, u32* counters)`, [`V4_MATMUL_SX64_SMEM`] bytes of
    /// dynamic shared memory, a 1-D grid of [`SxbPartition::new`]'s `grid` blocks of 256 threads and the workspace
    /// of [`v4_matmul_sxb_workspace`] (counters zero); `None` for f32. Each decoded A fragment feeds 8
    /// n-tiles' mma instead of 4 (session 17); the balanced schedule gives every block the same work to
    /// within one chunk of K (session 18). Taken only when forced.
    pub fn matmul_sx64(&self, dtype: Dtype) -> Option<&'static str> {
        Self::index(dtype, 1).map(|(d, _)| self.matmul_sx64[d])
    }

    /// The 32-row matmul tile on the balanced schedule (the signature and launch of
    /// [`V4Entries::matmul_sx64`] with 32-row x tiles and [`V4_MATMUL_SXB_SMEM`] bytes of dynamic shared
    /// memory); `None` for f32. Taken only when forced.
    pub fn matmul_sxb(&self, dtype: Dtype) -> Option<&'static str> {
        Self::index(dtype, 1).map(|(d, _)| self.matmul_sxb[d])
    }

    /// The pair tile on the balanced schedule: [`V4Entries::matmul_sxb`]'s signature, launch and shared
    /// memory, with each warp on two consecutive 16-row tiles of the delta, so each x fragment a warp reads
    /// from shared memory feeds two mma (session 18: shared memory was the busiest unit of the 32-row tile
    /// at 128 rows). `deep`: code rings 2 blocks deep at 1 block an SM (`_sxp2_`), else 1 deep at 2 (`_sxp_`).
    /// Its [`SxbPartition`] takes `mt` = 2. `None` for f32. Taken only when forced.
    pub fn matmul_sxp(&self, dtype: Dtype, deep: bool) -> Option<&'static str> {
        Self::index(dtype, 1).map(|(d, _)| self.matmul_sxp[d][usize::from(deep)])
    }

    /// The pair tile (code rings 1 deep, 2 blocks an SM) on [`V4Entries::matmul_sx`]'s plain launch: its
    /// signature, a 1-D grid of at most `ceil(m / 32) x ceil(tiles / 16)` blocks (each 16 consecutive
    /// 16-row tiles of one 32-row x tile, whole K rows), grid-stride, no workspace; `None` for f32. Written
    /// at the end of session 18 (the balanced schedule cost 3-7% on the 32-row tile); not yet run on a GPU.
    pub fn matmul_sxq(&self, dtype: Dtype) -> Option<&'static str> {
        Self::index(dtype, 1).map(|(d, _)| self.matmul_sxq[d])
    }

    /// The 32-row matmul tile with K split over `split` blocks (4 only; the signature of
    /// [`V4Entries::matmul_sx`] plus the workspace and counters of [`v4_matmul_sxk_workspace`], `split` x
    /// its blocks); `None` for f32 or another split.
    pub fn matmul_sxk(&self, dtype: Dtype, split: u32) -> Option<&'static str> {
        if split != 4 {
            return None;
        }
        Self::index(dtype, 1).map(|(d, _)| self.matmul_sxk[d])
    }

    /// The sbmm entry point for segments of at most `rows` input rows.
    pub fn sbmm(&self, dtype: Dtype, rows: u32) -> Option<&'static str> {
        Self::index(dtype, rows).map(|(d, t)| self.sbmm[d][t])
    }

    /// The sbmm entry point with x staged in shared memory, for segments of at most `rows` input rows:
    /// `(const DzSegment* segs, u32 n_segs, const DzDelta* deltas, const T* x, T* out, u32 k, u32 n_total,
    /// u32 tiles)`, one item (segment, 16-row tile) a warp over its whole K row, 8 consecutive tiles of one
    /// segment a block (so `tiles` must be a multiple of 8, and every delta of the launch must have
    /// `tiles` tiles of stored rows); a 1-D grid of `n_segs * tiles / 8` blocks at most, grid-stride.
    /// Written in session 10; on the H200 (session 11) correct but slower than the split-1 sbmm.
    pub fn sbmm_sx(&self, dtype: Dtype, rows: u32) -> Option<&'static str> {
        Self::index(dtype, rows).map(|(d, t)| self.sbmm_sx[d][t])
    }

    /// The decode sbmm with each warp's codes in its own shared-memory ring, for segments of at most
    /// `rows` input rows (`None` past 8, or for f32): the signature of [`V4Entries::sbmm_sx`], one item
    /// (segment, 16-row tile) a warp over its whole K row (split 1), a 1-D grid of `ceil(n_segs * tiles /
    /// 8)` blocks at most, grid-stride, [`v4_sbmm_ring_smem`] bytes of dynamic shared memory. Written in
    /// session 12 without a GPU.
    pub fn sbmm_ring(&self, dtype: Dtype, rows: u32) -> Option<&'static str> {
        match Self::index(dtype, rows)? {
            (d, 0) => Some(self.sbmm_ring[d]),
            _ => None,
        }
    }

    /// The decode sbmm with x loaded from global memory right before each mma (as the 32-row tile does)
    /// instead of in the load ring, whose stages then hold only the codes, metadata and scale word and go
    /// 6 blocks deep, for segments of at most `rows` input rows (`None` past 8, or for f32): the signature
    /// and launch of [`V4Entries::sbmm`] (split included). Written in session 15, after Nsight Compute put
    /// the decode sbmm at 25% occupancy (120 registers) with 39% of its stalls on loads; slower on the
    /// H200 in session 16 (96-98 against 77-82 us for 32 deltas x 1 row of 4096 x 4096).
    pub fn sbmm_xd(&self, dtype: Dtype, rows: u32) -> Option<&'static str> {
        match Self::index(dtype, rows)? {
            (d, 0) => Some(self.sbmm_xd[d]),
            _ => None,
        }
    }

    /// As [`V4Entries::sbmm_xd`], a 3-deep code ring in at most 80 registers, so 3 blocks an SM instead of
    /// 2 (1.5x the warps and the loads in flight).
    pub fn sbmm_xo(&self, dtype: Dtype, rows: u32) -> Option<&'static str> {
        match Self::index(dtype, rows)? {
            (d, 0) => Some(self.sbmm_xo[d]),
            _ => None,
        }
    }

    /// The decode sbmm with two consecutive 16-row tiles of a segment a warp, for segments of at most
    /// `rows` input rows (`None` past 8, or for f32): the signature of [`V4Entries::sbmm`], launched over
    /// `ceil(tiles / 2)` items a segment ([`V4_SBMM_PAIR_TILES`]). Each x word is loaded once for both
    /// tiles, and each warp runs two independent chains of loads, decodes and mma. Written in session 19
    /// without a GPU (bench/kernels/V4.md, "Session 19").
    pub fn sbmm_pair(&self, dtype: Dtype, rows: u32) -> Option<&'static str> {
        match Self::index(dtype, rows)? {
            (d, 0) => Some(self.sbmm_p2[d]),
            _ => None,
        }
    }

    /// The pair decode sbmm ([`V4Entries::sbmm_pair`]) with lane 0 of each warp asking L2 for each tile's
    /// K block `blocks` blocks ahead of the one it computes (`cp.async.bulk.prefetch.L2`), so that the
    /// ring's loads meet L2 rather than DRAM; `blocks` one of [`V4_SBMM_PREFETCH`], else `None` (as past 8
    /// rows or for f32). The same sums as the pair. Written in session 21: Nsight Compute put the pair at
    /// 70% of DRAM bandwidth, latency-bound (23% occupancy, 52% of cycles with no eligible warp). Measured
    /// the same session: 13-27% slower than the pair (experimental, off by default).
    pub fn sbmm_pair_prefetch(&self, dtype: Dtype, rows: u32, blocks: u32) -> Option<&'static str> {
        let p = V4_SBMM_PREFETCH.iter().position(|&b| b == blocks)?;
        match Self::index(dtype, rows)? {
            (d, 0) => Some(self.sbmm_p2f[p][d]),
            _ => None,
        }
    }

    /// [`v4_sbmm_ring_smem`] of this variant.
    pub fn sbmm_ring_smem(&self) -> Option<u32> {
        v4_sbmm_ring_smem(match self.variant {
            "quant2" => Variant::Quant(2),
            "quant4" => Variant::Quant(4),
            "sparse24_2" => Variant::Sparse24(2),
            "sparse24_4" => Variant::Sparse24(4),
            _ => return None,
        })
    }

    /// The dequantize entry point for outputs of `dtype`.
    pub fn dequantize(&self, dtype: Dtype) -> &'static str {
        self.dequantize[match dtype {
            Dtype::F32 => 0,
            Dtype::F16 => 1,
            Dtype::Bf16 => 2,
        }]
    }

    /// Every entry point of the variant.
    pub fn all(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.matmul_add
            .iter()
            .flatten()
            .chain(&self.matmul_sx)
            .chain(&self.matmul_sxd)
            .chain(&self.matmul_sx64)
            .chain(&self.matmul_sxb)
            .chain(self.matmul_sxp.iter().flatten())
            .chain(&self.matmul_sxq)
            .chain(self.matmul_sxk.iter())
            .chain(&self.sbmm_ring)
            .chain(&self.sbmm_xd)
            .chain(&self.sbmm_xo)
            .chain(&self.sbmm_p2)
            .chain(self.sbmm_p2f.iter().flatten())
            .chain(self.sbmm.iter().chain(&self.sbmm_sx).flatten())
            .chain(&self.dequantize)
            .copied()
    }
}

/// The 16-row tiles a warp of [`V4Entries::sbmm_pair`] takes: its launch has `ceil(tiles / 2)` items a
/// segment.
pub const V4_SBMM_PAIR_TILES: u32 = 2;

/// The prefetch distances (K blocks ahead) [`V4Entries::sbmm_pair_prefetch`] has entries for.
pub const V4_SBMM_PREFETCH: [u32; 2] = [4, 8];

/// A v4 sbmm launch whose last, partial wave of items is split along K (session 21): the split word the
/// sbmm entries take in their `split` argument and the launch's blocks (a 1-D grid of
/// [`V4_THREADS`]-thread blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V4SbmmTail {
    /// Bits 0-3: the split of items `[0, head)` (1); bits 4-7: the tail's split (2, 4 or 8); bits 8-31:
    /// `head`, a multiple of the items a block takes at split 1.
    pub word: u32,
    /// The launch's blocks: the head's, one item a warp, then the tail's, `8 / split` items a block.
    pub blocks: u64,
}

impl V4SbmmTail {
    /// The items at split 1 (whole waves of resident warps), as the kernels read them from the word.
    pub fn head(&self) -> u64 {
        u64::from(self.word >> 8)
    }

    /// The tail's split, as the kernels read it from the word.
    pub fn split(&self) -> u32 {
        (self.word >> 4) & 15
    }
}

/// Where an sbmm launch of `items` items (segment x tile, or pair of tiles) at `split` warps an item
/// would run its last wave part-empty, the launch that splits only that wave's items along K: the items
/// of the whole waves (`resident` warps each, one item a warp) stay at split 1, the rest take the largest
/// of 8, 4 and 2 warps an item that keeps them within one wave. `None` where that does not apply: a split
/// other than 1 (the launch fits one wave already), no partial wave, a tail of at least half a wave, or a
/// head past the word's 24 bits.
///
/// Why (H200, session 21, `bench/results/h200-s21-2026-12-01.md` section 4): the decode sbmm's time
/// follows its rounds of whole K chains, not its bytes. 4096 x 4096 4b 2:4 pair items, 1 row a delta:
/// 16 deltas (one wave) 38.5 us, 32 (two) 68.5, and 20 (1.21 waves, serving's case at 32 sequences over
/// 32 fine-tunes) 58.4 us, 1.90x of streaming its bytes once. A forced split on every item costs 15-43%
/// (16 deltas: split 2 45.7 us, split 4 56.8), so only the tail is split.
pub fn v4_sbmm_tail(items: u64, resident: u64, split: u32) -> Option<V4SbmmTail> {
    let per_block = u64::from(V4_THREADS / 32);
    if split != 1 || resident < per_block || items <= resident {
        return None;
    }
    let waves = items / resident;
    let head = waves * resident - (waves * resident) % per_block;
    let tail = items - head;
    if tail == 0 {
        return None;
    }
    let t = [8u32, 4, 2]
        .into_iter()
        .find(|&t| tail * u64::from(t) <= resident)?;
    if head >= 1 << 24 {
        return None;
    }
    Some(V4SbmmTail {
        word: 1 | (t << 4) | ((head as u32) << 8),
        blocks: head / per_block + tail.div_ceil(per_block / u64::from(t)),
    })
}

/// Input rows per tile of the entry point taking segments of at most `rows` rows (8 or 16).
pub fn v4_tile_rows(rows: u32) -> u32 {
    if rows <= 8 {
        8
    } else {
        16
    }
}

/// Input rows per tile of the matmul entry point for `rows` input rows: 8, 16, or [`V4_WIDE_ROWS`] past 16
/// (more than 32 rows run as several 32-row x tiles).
pub fn v4_matmul_tile_rows(rows: u32) -> u32 {
    if rows <= V4_MAX_ROWS {
        v4_tile_rows(rows)
    } else {
        V4_WIDE_ROWS
    }
}

/// Weights (`N x K`) from which 9 or more input rows run through the 32-row tile ([`v4_wide_from_rows`]):
/// the 7B and 13B MLP shapes (4096 x 11008 is 45 M), not 5120 x 5120 (26 M).
pub const V4_WIDE_FROM_WEIGHTS: u64 = 40 << 20;

/// The fewest input rows of a delta of at least [`V4_WIDE_FROM_WEIGHTS`] weights that take the 32-row
/// tile ([`v4_wide_from_rows`]).
pub const V4_WIDE_FROM_ROWS_LARGE: u32 = 9;

/// The fewest input rows of one delta that take the 32-row tile ([`V4_WIDE_ROWS`]) instead of the 8- or
/// 16-row tiles, for an `n x k` delta of any v4 codec. Measured on the H200 (bf16):
/// - session 15: on the four shapes of at least [`V4_WIDE_FROM_WEIGHTS`], 16 rows took 27-39% less time
///   through the 32-row tile than through the 16-row tile, for every 2:4 and g128 codec;
/// - session 16, after the tile's staging zero-filled the rows past `rows` (it had copied the last row
///   there): 9-12 rows through it take about its 32-row time on all four shapes and codecs (12 rows:
///   1-35% less time than the 16-row tile; 11008 x 4096 4b 2:4 26.1 against 37.7 us). At 8 rows the
///   8-row tile stays: the 32-row tile took 0-15% less for 2:4 codecs but up to 32% more for g128
///   (5120 x 13824 2b g128 43.4 against 32.8 us).
///
/// On smaller shapes the 32-row tile loses below 17 rows (session 16, 4096 x 4096 4b 2:4 at 12 rows:
/// 17.7 against 16.8 us; 5120 x 5120 2b g128 at 16, session 15: 28.8 against 26.9; 576 x 576 14.6 against
/// 8.3), so they keep the ring-fed tiles up to [`V4_MAX_ROWS`].
pub fn v4_wide_from_rows(n: usize, k: usize) -> u32 {
    if n as u64 * k as u64 >= V4_WIDE_FROM_WEIGHTS {
        V4_WIDE_FROM_ROWS_LARGE
    } else {
        V4_MAX_ROWS + 1
    }
}

macro_rules! v4_tiles {
    ($v:literal, $op:literal, $t:literal) => {
        [
            concat!("dz_v4_", $v, "_", $op, "_", $t, "_n1"),
            concat!("dz_v4_", $v, "_", $op, "_", $t, "_n2"),
        ]
    };
    ($v:literal, $op:literal, $t:literal, wide) => {
        [
            concat!("dz_v4_", $v, "_", $op, "_", $t, "_n1"),
            concat!("dz_v4_", $v, "_", $op, "_", $t, "_n2"),
            concat!("dz_v4_", $v, "_", $op, "_", $t, "_n4"),
        ]
    };
}

macro_rules! v4_entries {
    ($v:literal) => {
        V4Entries {
            variant: $v,
            matmul_add: [
                v4_tiles!($v, "matmul_add", "f16", wide),
                v4_tiles!($v, "matmul_add", "bf16", wide),
            ],
            matmul_sx: [
                concat!("dz_v4_", $v, "_matmul_sx_f16_n4"),
                concat!("dz_v4_", $v, "_matmul_sx_bf16_n4"),
            ],
            matmul_sxd: [
                concat!("dz_v4_", $v, "_matmul_sxd_f16_n4"),
                concat!("dz_v4_", $v, "_matmul_sxd_bf16_n4"),
            ],
            matmul_sx64: [
                concat!("dz_v4_", $v, "_matmul_sx_f16_n8"),
                concat!("dz_v4_", $v, "_matmul_sx_bf16_n8"),
            ],
            matmul_sxb: [
                concat!("dz_v4_", $v, "_matmul_sxb_f16_n4"),
                concat!("dz_v4_", $v, "_matmul_sxb_bf16_n4"),
            ],
            matmul_sxp: [
                [
                    concat!("dz_v4_", $v, "_matmul_sxp_f16_n4"),
                    concat!("dz_v4_", $v, "_matmul_sxp2_f16_n4"),
                ],
                [
                    concat!("dz_v4_", $v, "_matmul_sxp_bf16_n4"),
                    concat!("dz_v4_", $v, "_matmul_sxp2_bf16_n4"),
                ],
            ],
            matmul_sxq: [
                concat!("dz_v4_", $v, "_matmul_sxq_f16_n4"),
                concat!("dz_v4_", $v, "_matmul_sxq_bf16_n4"),
            ],
            matmul_sxk: [
                concat!("dz_v4_", $v, "_matmul_sxk4_f16_n4"),
                concat!("dz_v4_", $v, "_matmul_sxk4_bf16_n4"),
            ],
            sbmm: [v4_tiles!($v, "sbmm", "f16"), v4_tiles!($v, "sbmm", "bf16")],
            sbmm_sx: [
                v4_tiles!($v, "sbmm_sx", "f16"),
                v4_tiles!($v, "sbmm_sx", "bf16"),
            ],
            sbmm_ring: [
                concat!("dz_v4_", $v, "_sbmm_ring_f16_n1"),
                concat!("dz_v4_", $v, "_sbmm_ring_bf16_n1"),
            ],
            sbmm_xd: [
                concat!("dz_v4_", $v, "_sbmm_xd_f16_n1"),
                concat!("dz_v4_", $v, "_sbmm_xd_bf16_n1"),
            ],
            sbmm_xo: [
                concat!("dz_v4_", $v, "_sbmm_xo_f16_n1"),
                concat!("dz_v4_", $v, "_sbmm_xo_bf16_n1"),
            ],
            sbmm_p2: [
                concat!("dz_v4_", $v, "_sbmm_p2_f16_n1"),
                concat!("dz_v4_", $v, "_sbmm_p2_bf16_n1"),
            ],
            sbmm_p2f: [
                [
                    concat!("dz_v4_", $v, "_sbmm_p2f4_f16_n1"),
                    concat!("dz_v4_", $v, "_sbmm_p2f4_bf16_n1"),
                ],
                [
                    concat!("dz_v4_", $v, "_sbmm_p2f8_f16_n1"),
                    concat!("dz_v4_", $v, "_sbmm_p2f8_bf16_n1"),
                ],
            ],
            dequantize: [
                concat!("dz_v4_", $v, "_dequantize_f32"),
                concat!("dz_v4_", $v, "_dequantize_f16"),
                concat!("dz_v4_", $v, "_dequantize_bf16"),
            ],
        }
    };
}

/// Every v4 variant's entry points.
pub const V4: [V4Entries; 4] = [
    v4_entries!("quant2"),
    v4_entries!("quant4"),
    v4_entries!("sparse24_2"),
    v4_entries!("sparse24_4"),
];

/// The v4 entry points of `variant`, if it has them.
pub fn v4_entries(variant: Variant) -> Option<&'static V4Entries> {
    match variant {
        Variant::Quant(2) => Some(&V4[0]),
        Variant::Quant(4) => Some(&V4[1]),
        Variant::Sparse24(2) => Some(&V4[2]),
        Variant::Sparse24(4) => Some(&V4[3]),
        _ => None,
    }
}

/// The dynamic shared memory (bytes) a block of `dz_v4_<variant>_matmul_sxd_<t>_n4` needs: R stages of
/// one K block each, a stage holding the 32 staged x rows (68 words apart) and each of the 8 warps' packet,
/// metadata slots (sparse24) and scale words; R = 6 for quant4, 7 for sparse24-4, 8 for the 2-bit codecs,
/// the most that keep two blocks on an SM of 228 KB. The kernel's `WideSxd::SMEM` (v4.cu) is the same
/// number, and the kernel traps when launched with less. `None` for a variant without v4 kernels.
pub fn v4_matmul_sxd_smem(variant: Variant) -> Option<u32> {
    const X_STAGE: u32 = 32 * (128 / 2 + 4) * 4;
    let (packet, meta, stages) = match variant {
        Variant::Quant(2) => (512, 0, 8),
        Variant::Quant(4) => (1024, 0, 6),
        Variant::Sparse24(2) => (256, 256, 8),
        Variant::Sparse24(4) => (512, 256, 7),
        _ => return None,
    };
    Some(stages * (X_STAGE + 8 * (packet + meta + 32)))
}

/// Input rows per x tile of `dz_v4_<variant>_matmul_sx_<t>_n8` (the 64-row tile).
pub const V4_WIDE64_ROWS: u32 = 64;

/// The dynamic shared memory (bytes) a block of `dz_v4_<variant>_matmul_sx_<t>_n8` needs: x double-buffered,
/// 2 buffers of 64 rows of 2 K blocks (132 words a row: `WideSx<C, T, 8>::BUF` in v4.cu).
pub const V4_MATMUL_SX64_SMEM: u32 = 2 * V4_WIDE64_ROWS * (2 * 128 / 2 + 4) * 4;

/// The dynamic shared memory (bytes) a block of `dz_v4_<variant>_matmul_sxb_<t>_n4` needs: x
/// double-buffered, 2 buffers of 32 rows of 2 K blocks (`WideSx<C, T, 4>::BUF` in v4.cu).
pub const V4_MATMUL_SXB_SMEM: u32 = 2 * V4_WIDE_ROWS * (2 * 128 / 2 + 4) * 4;

/// K blocks (of 128 columns) per unit of the balanced schedule: one chunk of staged x (`WideSx::XC`).
const SXB_CHUNK_BLOCKS: u64 = 2;

/// How the balanced schedule (`matmul_sxb` in v4.cu: the 64-row tile, `matmul_sxb_<t>_n4` and the pair
/// tiles) cuts a launch, with the kernel's arithmetic: `items` (x tiles x groups of 8 `mt` consecutive
/// 16-row tiles) of `chunks` units each (chunks of 2 K blocks), item-major, over `grid` blocks, block `g`
/// taking units `[g U / G, (g + 1) U / G)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SxbPartition {
    /// Items: x tiles x groups of 8 `mt` consecutive 16-row tiles.
    pub items: u64,
    /// Units (chunks of 2 K blocks) an item.
    pub chunks: u64,
    /// Blocks of the launch.
    pub grid: u64,
}

impl SxbPartition {
    /// The partition of a launch over `m` input rows of `x_rows`-row x tiles (32 or 64), a delta of
    /// `n_stored` stored rows and `k` columns, `mt` 16-row tiles a warp (1, or 2 for the pair tiles), on a
    /// GPU that keeps `resident` blocks of the kernel at once: as many blocks as are resident, or as there
    /// are units if fewer.
    pub fn new(m: u32, x_rows: u32, n_stored: u32, k: u32, mt: u32, resident: u64) -> SxbPartition {
        let groups = u64::from(n_stored.div_ceil(16).div_ceil(8 * mt));
        let items = u64::from(m.div_ceil(x_rows)) * groups;
        let chunks = u64::from(k.div_ceil(128)).div_ceil(SXB_CHUNK_BLOCKS);
        let grid = (items * chunks).min(resident.max(1)).max(1);
        SxbPartition {
            items,
            chunks,
            grid,
        }
    }

    fn units(&self) -> u64 {
        self.items * self.chunks
    }

    /// Block `g`'s first unit (`g` = `grid`: the end).
    pub fn first_unit(&self, g: u64) -> u64 {
        g * self.units() / self.grid
    }

    /// The block whose range holds unit `u`.
    pub fn block_of(&self, u: u64) -> u64 {
        ((u + 1) * self.grid - 1) / self.units()
    }

    /// Block `g`'s workspace slot for its partial sums of item `b`, which it shares with other blocks: 2 g
    /// for the item its range starts in, 2 g + 1 for the one it ends in.
    pub fn slot(&self, g: u64, b: u64) -> u64 {
        2 * g + u64::from(self.first_unit(g) / self.chunks != b)
    }
}

/// The workspace of a balanced-schedule launch (`matmul_sx_<t>_n8`, `matmul_sxb_<t>_n4`, the pair tiles)
/// whose warps each hold `sums` accumulator tiles (n-tiles x 16-row tiles a warp: 8 x 1 for the 64-row
/// tile, 4 x 2 for the pair tiles, 4 x 1 for `_sxb_`), 4 `f32` a thread each: `(counters, total)` bytes,
/// the counters (one `u32` an item, zero before the launch) first, padded to 256 bytes, then two slots a
/// block of `sums` x 4 `f32` partial sums a thread of 256. 64 rows of
/// 11008 x 4096 on 264 blocks: ~17 MB.
pub fn v4_matmul_sxb_workspace(p: &SxbPartition, sums: u32) -> (usize, usize) {
    let counters = (p.items as usize * 4).div_ceil(256) * 256;
    (
        counters,
        counters + 2 * p.grid as usize * sums as usize * 4 * 256 * 4,
    )
}

/// The workspace of a `dz_v4_<variant>_matmul_sxk<S>_<t>_n4` launch over `blocks` blocks of `matmul_sx`
/// (x tiles x 8-tile groups) split `split` ways: `(counters, total)` bytes, the counters (one `u32` a
/// block, zero before the launch) first, padded to 256 bytes, then the partial sums (`split` x 16 `f32` a
/// thread of 256 a block). 32 rows of 4096 x 4096 split 4 ways: 2 MiB.
pub fn v4_matmul_sxk_workspace(blocks: u64, split: u32) -> (usize, usize) {
    let counters = (blocks as usize * 4).div_ceil(256) * 256;
    (
        counters,
        counters + blocks as usize * split as usize * 16 * 256 * 4,
    )
}

/// The dynamic shared memory (bytes) a block of `dz_v4_<variant>_sbmm_ring_<t>_n1` needs: 8 warps x R = 8
/// slots of one K block each, a slot holding the warp's packet, metadata slots (sparse24) and scale words
/// (quant4 1056 B, sparse24-4 800 B, the 2-bit codecs 544 B). The kernel's `RingTile::SMEM` (v4.cu) is the
/// same number, and the kernel traps when launched with less. `None` for a variant without v4 kernels.
pub fn v4_sbmm_ring_smem(variant: Variant) -> Option<u32> {
    const STAGES: u32 = 8;
    let (packet, meta) = match variant {
        Variant::Quant(2) => (512, 0),
        Variant::Quant(4) => (1024, 0),
        Variant::Sparse24(2) => (256, 256),
        Variant::Sparse24(4) => (512, 256),
        _ => return None,
    };
    Some(8 * STAGES * (packet + meta + 32))
}

/// Whether a delta of `variant` with `k` columns, `group_size` and `symmetric` grid has v4 kernels (and so
/// is re-laid at upload): quant or sparse24 of 2 or 4 bits, symmetric, groups of 0 or a multiple of 128,
/// K a positive multiple of 32.
pub fn v4_supports(variant: Variant, k: u32, group_size: u32, symmetric: bool) -> bool {
    v4_entries(variant).is_some()
        && symmetric
        && group_size.is_multiple_of(128)
        && k.is_multiple_of(32)
        && k > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The balanced schedule's walk as v4.cu's `matmul_sxb` takes it: every chunk of every item computed
    /// once, an item cut between blocks reduced from distinct slots (at most two a block, below 2 G), and
    /// no block past the resident ones or without work.
    #[test]
    fn sxb_partition_covers_every_chunk_once() {
        for &(m, x_rows, n, k, mt, resident) in &[
            (128u32, 32u32, 11008u32, 4096u32, 1u32, 264u64),
            (128, 32, 11008, 4096, 2, 264),
            (128, 64, 11008, 4096, 1, 264),
            (64, 64, 4096, 4096, 1, 264),
            (256, 64, 4096, 11008, 1, 132),
            (33, 32, 5120, 13824, 2, 264),
            (1, 64, 16, 32, 1, 264),
            (200, 64, 13824, 5120, 1, 7),
        ] {
            let p = SxbPartition::new(m, x_rows, n, k, mt, resident);
            assert!(p.grid <= resident && p.grid <= p.items * p.chunks && p.grid > 0);
            let nkb = u64::from(k.div_ceil(128));
            let mut covered = vec![vec![0u32; nkb as usize]; p.items as usize];
            let mut slots = std::collections::HashSet::new();
            for g in 0..p.grid {
                let (mut u, end) = (p.first_unit(g), p.first_unit(g + 1));
                assert!(u < end, "block {g} of {p:?} has no work");
                while u < end {
                    let b = u / p.chunks;
                    let (lo, hi) = (b * p.chunks, (b + 1) * p.chunks);
                    let e = end.min(hi);
                    for kb in (u - lo) * 2..((e - lo) * 2).min(nkb) {
                        covered[b as usize][kb as usize] += 1;
                    }
                    let (g0, g1) = (p.block_of(lo), p.block_of(hi - 1));
                    assert!(g0 <= g && g <= g1);
                    if g0 != g1 {
                        let s = p.slot(g, b);
                        assert!(
                            s < 2 * p.grid && slots.insert(s),
                            "slot {s} of block {g} reused"
                        );
                    }
                    u = e;
                }
            }
            assert!(covered.iter().flatten().all(|&c| c == 1), "{p:?}");
            let (counters, total) = v4_matmul_sxb_workspace(&p, 8);
            assert!(counters >= p.items as usize * 4 && total > counters);
        }
    }

    #[test]
    fn sbmm_tail_splits_only_a_partial_last_wave() {
        let resident = 132 * 16;
        // 20 deltas x 128 pairs: one whole wave (2112 items) and 448 more, split 4 (1792 warps).
        let t = v4_sbmm_tail(2560, resident, 1).expect("a tail");
        assert_eq!((t.head(), t.split()), (2112, 4));
        assert_eq!(t.word, 1 | (4 << 4) | (2112 << 8));
        assert_eq!(t.blocks, 2112 / 8 + 448 / 2);
        // Each item covered once: the head's blocks take 8 items each, the tail's 8 / split.
        assert_eq!(t.head() + (t.blocks - t.head() / 8) * 2, 2560);
        // A small tail takes split 8; 4096 items (two whole waves less 128) leave 1984: past half a wave.
        assert_eq!(
            v4_sbmm_tail(2112 + 100, resident, 1).map(|t| t.split()),
            Some(8)
        );
        assert!(v4_sbmm_tail(4096, resident, 1).is_none());
        // Within one wave, at a split past 1, or with no partial wave: nothing to do.
        assert!(v4_sbmm_tail(2000, resident, 1).is_none());
        assert!(v4_sbmm_tail(2560, resident, 2).is_none());
        assert!(v4_sbmm_tail(2 * resident, resident, 1).is_none());
        // A head past 24 bits does not fit the word.
        assert!(v4_sbmm_tail((1 << 24) + 10, 1 << 20, 1).is_none());
        // Resident warps not a multiple of a block's: the head is rounded down to whole blocks.
        let t = v4_sbmm_tail(110, 100, 1).expect("a tail");
        assert_eq!((t.head(), t.split(), t.blocks), (96, 4, 12 + 7));
    }

    #[test]
    fn names_and_support() {
        let n: usize = V4.iter().map(|e| e.all().count()).sum();
        assert_eq!(n, 4 * 45);
        assert_eq!(
            V4[0].sbmm_pair(Dtype::F16, 8),
            Some("dz_v4_quant2_sbmm_p2_f16_n1")
        );
        assert_eq!(
            V4[3].sbmm_pair_prefetch(Dtype::Bf16, 1, 8),
            Some("dz_v4_sparse24_4_sbmm_p2f8_bf16_n1")
        );
        assert_eq!(
            V4[0].sbmm_pair_prefetch(Dtype::F16, 8, 4),
            Some("dz_v4_quant2_sbmm_p2f4_f16_n1")
        );
        assert!(V4[0].sbmm_pair_prefetch(Dtype::F16, 8, 6).is_none());
        assert!(V4[0].sbmm_pair_prefetch(Dtype::F16, 16, 4).is_none());
        assert!(V4[0].sbmm_pair_prefetch(Dtype::F32, 1, 4).is_none());
        assert!(
            V4[0].sbmm_pair(Dtype::F16, 16).is_none() && V4[0].sbmm_pair(Dtype::F32, 8).is_none()
        );
        assert_eq!(
            V4[3].matmul_sxp(Dtype::Bf16, true),
            Some("dz_v4_sparse24_4_matmul_sxp2_bf16_n4")
        );
        assert_eq!(
            V4[3].matmul_sx64(Dtype::Bf16),
            Some("dz_v4_sparse24_4_matmul_sx_bf16_n8")
        );
        assert!(V4[3].matmul_sx64(Dtype::F32).is_none());
        assert_eq!(
            V4[3].matmul_sxk(Dtype::Bf16, 4),
            Some("dz_v4_sparse24_4_matmul_sxk4_bf16_n4")
        );
        assert_eq!(
            V4[0].matmul_sxk(Dtype::F16, 4),
            Some("dz_v4_quant2_matmul_sxk4_f16_n4")
        );
        assert!(V4[0].matmul_sxk(Dtype::F16, 2).is_none());
        assert!(V4[0].matmul_sxk(Dtype::F32, 2).is_none());
        assert_eq!(
            V4[3].sbmm_ring(Dtype::Bf16, 1),
            Some("dz_v4_sparse24_4_sbmm_ring_bf16_n1")
        );
        assert_eq!(
            V4[1].sbmm_ring(Dtype::F16, 8),
            Some("dz_v4_quant4_sbmm_ring_f16_n1")
        );
        assert!(V4[1].sbmm_ring(Dtype::F16, 9).is_none());
        assert_eq!(
            V4[2].sbmm_xd(Dtype::Bf16, 8),
            Some("dz_v4_sparse24_2_sbmm_xd_bf16_n1")
        );
        assert!(V4[2].sbmm_xd(Dtype::Bf16, 9).is_none());
        assert!(V4[2].sbmm_xd(Dtype::F32, 1).is_none());
        assert_eq!(
            V4[1].sbmm_xo(Dtype::F16, 1),
            Some("dz_v4_quant4_sbmm_xo_f16_n1")
        );
        assert!(V4[1].sbmm_ring(Dtype::F32, 1).is_none());
        let ring = [
            Variant::Quant(2),
            Variant::Quant(4),
            Variant::Sparse24(2),
            Variant::Sparse24(4),
        ]
        .map(|v| v4_sbmm_ring_smem(v).unwrap_or(u32::MAX));
        assert_eq!(ring, [34_816, 67_584, 34_816, 51_200]);
        assert!(ring.iter().all(|&b| 2 * (b + 1024) <= 228 * 1024));
        assert!(v4_sbmm_ring_smem(Variant::Sign1).is_none());
        assert_eq!(V4.map(|e| e.sbmm_ring_smem()), ring.map(Some));
        assert_eq!(
            V4[3].matmul_sxd(Dtype::F16),
            Some("dz_v4_sparse24_4_matmul_sxd_f16_n4")
        );
        assert!(V4[3].matmul_sxd(Dtype::F32).is_none());
        // Two blocks an SM of 228 KB (1 KB reserved a block); the numbers of V4.md.
        let smem = [
            Variant::Quant(2),
            Variant::Quant(4),
            Variant::Sparse24(2),
            Variant::Sparse24(4),
        ]
        .map(|v| v4_matmul_sxd_smem(v).unwrap_or(u32::MAX));
        assert_eq!(smem, [104_448, 102_912, 104_448, 105_728]);
        assert!(smem.iter().all(|&b| 2 * (b + 1024) <= 228 * 1024));
        assert!(v4_matmul_sxd_smem(Variant::Sign1).is_none());
        assert_eq!(
            V4[2].matmul_sx(Dtype::Bf16),
            Some("dz_v4_sparse24_2_matmul_sx_bf16_n4")
        );
        assert!(V4[2].matmul_sx(Dtype::F32).is_none());
        assert_eq!(
            V4[3].dequantize(Dtype::Bf16),
            "dz_v4_sparse24_4_dequantize_bf16"
        );
        assert_eq!(
            v4_entries(Variant::Sparse24(4)).and_then(|e| e.sbmm(Dtype::Bf16, 9)),
            Some("dz_v4_sparse24_4_sbmm_bf16_n2")
        );
        assert_eq!(
            v4_entries(Variant::Quant(4)).and_then(|e| e.sbmm_sx(Dtype::F16, 3)),
            Some("dz_v4_quant4_sbmm_sx_f16_n1")
        );
        assert_eq!(
            v4_entries(Variant::Quant(2)).and_then(|e| e.matmul_add(Dtype::F16, 1)),
            Some("dz_v4_quant2_matmul_add_f16_n1")
        );
        assert_eq!(
            V4[1].matmul_add(Dtype::Bf16, 17),
            Some("dz_v4_quant4_matmul_add_bf16_n4")
        );
        assert_eq!(
            V4[3].matmul_add(Dtype::F16, 256),
            Some("dz_v4_sparse24_4_matmul_add_f16_n4")
        );
        assert_eq!(
            V4[3].matmul_add(Dtype::F16, 16),
            Some("dz_v4_sparse24_4_matmul_add_f16_n2")
        );
        assert!(V4[0].sbmm(Dtype::Bf16, 17).is_none());
        assert!(V4[0].matmul_add(Dtype::F32, 1).is_none());
        assert!(V4[0].matmul_add(Dtype::F32, 40).is_none());
        assert!(v4_supports(Variant::Quant(4), 4096, 0, true));
        assert!(!v4_supports(Variant::Quant(4), 4096, 128, false));
        assert!(!v4_supports(Variant::Quant(3), 4096, 128, true));
        assert!(!v4_supports(Variant::Sign1, 4096, 0, true));
        assert!(!v4_supports(Variant::Sparse24(2), 100, 0, true));
        assert_eq!((v4_tile_rows(1), v4_tile_rows(9)), (8, 16));
        assert_eq!(
            [1, 9, 16, 17, 32, 33, 256].map(v4_matmul_tile_rows),
            [8, 16, 16, 32, 32, 32, 32]
        );
        // The 32-row tile from 9 rows on the 7B / 13B MLP shapes, past 16 elsewhere.
        assert_eq!(v4_wide_from_rows(11008, 4096), 9);
        assert_eq!(v4_wide_from_rows(4096, 11008), 9);
        assert_eq!(v4_wide_from_rows(13824, 5120), 9);
        assert_eq!(v4_wide_from_rows(5120, 5120), 17);
        assert_eq!(v4_wide_from_rows(576, 1536), 17);
    }

    /// Every v4 entry point is in the PTX, and nothing else is.
    #[cfg(feature = "cuda")]
    #[test]
    fn every_v4_entry_point_is_in_the_ptx() {
        use std::collections::HashSet;
        let in_ptx: HashSet<&str> = crate::v4_ptx()
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
            .map(|l| l.split('(').next().unwrap_or(l).trim())
            .collect();
        let named: HashSet<&str> = V4.iter().flat_map(|e| e.all()).collect();
        assert_eq!(in_ptx, named);
    }
}

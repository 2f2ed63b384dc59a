//! The v4 device layout: a delta's packed codes (and 2:4 metadata, and scales) re-laid at upload into the
//! order the v4 kernels (`dz-kernels`' `kernels/v4/v4.cu`) read, so that every lane loads contiguous 16-byte
//! words with fully coalesced loads and turns a pair of codes into a pair of f16/bf16 with 2 instructions.
//! The file format does not change: this is a device-side representation, made from the validated logical
//! payload by [`relayout_v4`], a pure permutation of its codes (proved by the tests: decoding the v4 bytes
//! in the kernel's order gives back exactly the dense delta of dz-format's reference decoder).
//!
//! The matrix is cut into *packets*: 16 stored rows (a row tile `rt`) x 128 columns (a block `kb`), padded
//! with the zero point `2^(bits-1)` as code (weight exactly 0; metadata nibble `0x4`) past the stored rows
//! and past K; packets are stored row tile by
//! row tile, `(rt * n_kb + kb)`. Lane `l = 4 g + c` of the warp that computes a packet reads its *piece* of
//! `P` bytes: for `P >= 16`, 16-byte chunk `i` of every lane lies at `i * 512 + 16 l` (one chunk of the
//! 32 lanes is 512 contiguous bytes), else at `P l`. Piece word `u` (u32, little-endian) holds code pairs
//! `p = u * (16 / B) + j` for `j < 16 / B`: the low code at bit `B j`, the high code at bit `16 + B j`
//! (so `(w >> sh) & (mask << within) | magic` makes both halves of an f16/bf16 pair at once). Pair `p` is
//! mma step `s = p / 4` and A-fragment register `f = p % 4` (rows `g` for even `f`, `g + 8` for odd):
//! - `quant` (B = 2, 4; mma.sync m16n8k16, 8 steps of 16 columns per block): register `f` of step `s` of
//!   lane `(g, c)` holds columns `32 c + 4 s + 2 (f >> 1) + {0, 1}` of its row. Lane `(g, c)` thus owns
//!   columns `32 c .. 32 c + 31` of the block, and x's B fragments are its natural words `2 s` and `2 s + 1`
//!   of those columns (one 64-byte span per lane and input row). `P = 8 B` bytes.
//! - `sparse24` (B = 2, 4; mma.sp m16n8k32, 4 steps of 32 columns = 8 runs of 4 per block): register `f`
//!   of step `s` holds the two kept codes of run `8 s + c + 4 (f >> 1)` of the block. `P = 4 B`. The
//!   metadata packet (256 bytes) has 16 slots of 16 bytes, slot `2 g + e` word `s` = the nibbles of runs
//!   `8 s + 4 e + t` (t = 0..3, nibble t) of row `g` in bits 0-15 and of row `g + 8` in bits 16-31: the
//!   register threads `(g, 0)` and `(g, 1)` hand mma.sp (sparsity selector 0).
//! - scales: per packet 8 u32 words, word `g` = the f16 scales of rows `g` (low half) and `g + 8` (high
//!   half) of the block's group (groups are 0 = the whole row, or a multiple of 128 columns).
//!
//! Only symmetric grids are re-laid (the v4 kernels subtract `2^(bits-1)` while decoding).

use dz_format::codec::Payload;
use dz_format::Codec;
use half::f16;
use rayon::prelude::*;

/// Stored rows per packet.
pub const V4_TILE_ROWS: usize = 16;
/// Columns per packet.
pub const V4_BLOCK_COLS: usize = 128;
/// Bytes of a sparse24 metadata packet.
pub const V4_META_PACKET: usize = 256;
/// Bytes of a scales packet.
pub const V4_SCALE_PACKET: usize = 32;

/// The re-laid parts of one delta: `codes`, `meta` (sparse24; empty for quant) and `scales`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V4Layout {
    /// Code packets, `n_rt * n_kb * packet_bytes`.
    pub codes: Vec<u8>,
    /// Metadata packets (sparse24), `n_rt * n_kb * 256`; empty for quant.
    pub meta: Vec<u8>,
    /// Scale packets, `n_rt * n_kb * 32`.
    pub scales: Vec<u8>,
}

/// Which v4 kernel family a codec takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V4Kind {
    /// `quant`, dense mma.
    Quant,
    /// `sparse24`, sparse mma.
    Sparse24,
}

/// The v4 kind of a codec with `k` columns, if the v4 kernels take it: quant or sparse24 of 2 or 4 bits,
/// symmetric, groups of 0 or a multiple of 128 columns, K a multiple of 32.
pub fn v4_kind(codec: &Codec, k: usize) -> Option<V4Kind> {
    let (kind, p) = match codec {
        Codec::Quant(p) => (V4Kind::Quant, p),
        Codec::Sparse24(p) => (V4Kind::Sparse24, p),
        _ => return None,
    };
    (matches!(p.bits, 2 | 4)
        && p.symmetric
        && p.group_size.is_multiple_of(128)
        && k.is_multiple_of(32)
        && k > 0)
        .then_some(kind)
}

/// Bytes of one lane's piece of a code packet.
pub fn piece_bytes(kind: V4Kind, bits: u32) -> usize {
    match kind {
        V4Kind::Quant => 8 * bits as usize,
        V4Kind::Sparse24 => 4 * bits as usize,
    }
}

/// Offset in a packet of byte `o` of lane `lane`'s piece of `piece` bytes.
pub fn piece_offset(piece: usize, lane: usize, o: usize) -> usize {
    if piece >= 16 {
        (o / 16) * 512 + lane * 16 + o % 16
    } else {
        lane * piece + o
    }
}

/// Where pair `p` of lane `(g, c)` of packet `(rt, kb)` comes from: `(row, first column)` for quant (the
/// pair is that column and the next), `(row, run)` for sparse24 (the pair is the run's two kept codes).
pub fn pair_source(
    kind: V4Kind,
    rt: usize,
    kb: usize,
    g: usize,
    c: usize,
    p: usize,
) -> (usize, usize) {
    let (s, f) = (p / 4, p % 4);
    let row = V4_TILE_ROWS * rt + g + 8 * (f & 1);
    match kind {
        V4Kind::Quant => (row, V4_BLOCK_COLS * kb + 32 * c + 4 * s + 2 * (f >> 1)),
        V4Kind::Sparse24 => (row, 32 * kb + 8 * s + c + 4 * (f >> 1)),
    }
}

/// Bytes of the v4 layout of an `n_stored x k` delta of `codec` (what a CUDA [`crate::DeviceDelta`] holds
/// besides its packed parts), 0 when the codec is not re-laid.
pub fn v4_nbytes(codec: &Codec, n_stored: usize, k: usize) -> usize {
    let Some(kind) = v4_kind(codec, k) else {
        return 0;
    };
    let bits = match codec {
        Codec::Quant(p) | Codec::Sparse24(p) => u32::from(p.bits),
        _ => return 0,
    };
    let (n_kb, n_rt) = packets(n_stored, k);
    let meta = match kind {
        V4Kind::Quant => 1,
        V4Kind::Sparse24 => n_rt * n_kb * V4_META_PACKET,
    };
    n_rt * n_kb * (32 * piece_bytes(kind, bits) + V4_SCALE_PACKET) + meta
}

/// Packets per row tile and row tiles: `(n_kb, n_rt)`.
pub fn packets(n_stored: usize, k: usize) -> (usize, usize) {
    (k.div_ceil(V4_BLOCK_COLS), n_stored.div_ceil(V4_TILE_ROWS))
}

/// Where the re-layout reads a delta's codes, metadata nibbles and scales: its logical form
/// ([`relayout_v4`]) or its packed parts as a file stores them ([`relayout_v4_packed`]).
struct Source<'a> {
    /// `(bytes, row stride, bits)`: packed rows of `bits`-bit codes (`bits` 8 for one byte a code).
    codes: (&'a [u8], usize, u32),
    /// The same for the 2:4 metadata: one nibble a run (packed), or the positions (two bytes a run).
    meta: Option<Meta<'a>>,
    /// The f16 scales, row-major, `n_groups` a row.
    scales: Scales<'a>,
    n_groups: usize,
    group: usize,
}

enum Meta<'a> {
    Positions(&'a [u8]),
    Packed(&'a [u8], usize),
}

enum Scales<'a> {
    Values(&'a [f16]),
    Bytes(&'a [u8]),
}

impl Source<'_> {
    /// Code `idx` of stored row `row`.
    fn code(&self, row: usize, idx: usize) -> u32 {
        let (src, stride, bits) = self.codes;
        if bits == 8 {
            return u32::from(src[row * stride + idx]);
        }
        let bit = idx * bits as usize;
        let at = row * stride + bit / 8;
        let shift = bit % 8;
        let mut w = u32::from(src[at]);
        if shift + bits as usize > 8 {
            w |= u32::from(src[at + 1]) << 8;
        }
        (w >> shift) & ((1 << bits) - 1)
    }

    /// The metadata nibble (`i0 | i1 << 2`) of run `run` of row `row` (per-row runs `runs`).
    fn nibble(&self, row: usize, run: usize, runs: usize) -> u32 {
        match &self.meta {
            Some(Meta::Positions(p)) => {
                let at = row * 2 * runs + 2 * run;
                u32::from(p[at]) | (u32::from(p[at + 1]) << 2)
            }
            Some(Meta::Packed(m, stride)) => {
                u32::from(m[row * stride + run / 2] >> (4 * (run % 2))) & 15
            }
            None => 0x4,
        }
    }

    /// The f16 bits of the scale of row `row` for the block starting at column `col`.
    fn scale(&self, row: usize, col: usize) -> u16 {
        let gi = col.checked_div(self.group).unwrap_or(0);
        let i = row * self.n_groups + gi;
        match self.scales {
            Scales::Values(v) => v[i].to_bits(),
            Scales::Bytes(b) => u16::from_le_bytes([b[2 * i], b[2 * i + 1]]),
        }
    }
}

/// The v4 layout of a validated payload, or `None` when the v4 kernels do not take its codec.
pub fn relayout_v4(payload: &Payload) -> Option<V4Layout> {
    let codec = payload.codec();
    let (n, k) = payload.dims();
    let (grid, codes, meta) = match payload {
        Payload::Quant(q) => (&q.grid, (&q.codes[..], k, 8), None),
        Payload::Sparse24(s) => (
            &s.grid,
            (&s.codes[..], k / 2, 8),
            Some(Meta::Positions(&s.positions[..])),
        ),
        _ => return None,
    };
    let src = Source {
        codes,
        meta,
        scales: Scales::Values(&grid.scales),
        n_groups: grid.scales.len() / n.max(1),
        group: grid.params.group_size as usize,
    };
    relayout_from(&codec, n, k, &src)
}

/// [`relayout_v4`] straight from the packed parts (SPEC.md section 4's order: codes, then for sparse24
/// the metadata, then the scales), without unpacking them: a byte per code and the positions for a 7B
/// delta are gigabytes. The parts must have passed `Payload::check`, which this does not repeat (hence
/// crate-private). `None` when the v4 kernels do not take the codec. Gives the same bytes as
/// `relayout_v4(&Payload::unpack(..))` (tested).
pub(crate) fn relayout_v4_packed(
    codec: &Codec,
    n: usize,
    k: usize,
    parts: &[&[u8]],
) -> Option<V4Layout> {
    v4_kind(codec, k)?;
    let p = match codec {
        Codec::Quant(p) | Codec::Sparse24(p) => p,
        _ => return None,
    };
    let bits = u32::from(p.bits);
    let stride = |per_row: usize, b: u8| dz_format::layout::stride(per_row, b);
    let (codes, meta, scales) = match codec {
        Codec::Quant(_) => ((parts[0], stride(k, p.bits)?, bits), None, parts[1]),
        _ => (
            (parts[0], stride(k / 2, p.bits)?, bits),
            Some(Meta::Packed(parts[1], stride(k / 4, 4)?)),
            parts[2],
        ),
    };
    let src = Source {
        codes,
        meta,
        scales: Scales::Bytes(scales),
        n_groups: p.n_groups(k),
        group: p.group_size as usize,
    };
    relayout_from(codec, n, k, &src)
}

fn relayout_from(codec: &Codec, n: usize, k: usize, src: &Source<'_>) -> Option<V4Layout> {
    let kind = v4_kind(codec, k)?;
    let bits = match codec {
        Codec::Quant(p) | Codec::Sparse24(p) => u32::from(p.bits),
        _ => return None,
    };
    let (n_kb, n_rt) = packets(n, k);
    let piece = piece_bytes(kind, bits);
    let packet = 32 * piece;
    let pairs_per_word = 16 / bits as usize;
    let words = piece / 4;
    let mut codes = vec![0u8; n_rt * n_kb * packet];
    // Past the data (rows past N, columns past K) the code is the zero point, so the weight is exactly 0
    // whatever x the kernel has in its registers there (it does not load x past K).
    let pad = 1u32 << (bits - 1);
    // The code of pair `p`'s low (`h = 0`) or high half.
    let code = |rt, kb, g, c, p, h: usize| -> u32 {
        let (row, at) = pair_source(kind, rt, kb, g, c, p);
        if row >= n {
            return pad;
        }
        match kind {
            V4Kind::Quant => {
                let col = at + h;
                if col < k {
                    src.code(row, col)
                } else {
                    pad
                }
            }
            V4Kind::Sparse24 => {
                let run = at;
                if 4 * run < k {
                    src.code(row, 2 * run + h)
                } else {
                    pad
                }
            }
        }
    };
    // Row tiles in parallel (a 7B model's deltas hold billions of codes).
    codes
        .par_chunks_mut(n_kb * packet)
        .enumerate()
        .for_each(|(rt, tile)| {
            for kb in 0..n_kb {
                let base = kb * packet;
                for lane in 0..32 {
                    let (g, c) = (lane / 4, lane % 4);
                    for u in 0..words {
                        let mut w = 0u32;
                        for j in 0..pairs_per_word {
                            let p = u * pairs_per_word + j;
                            w |= code(rt, kb, g, c, p, 0) << (bits as usize * j);
                            w |= code(rt, kb, g, c, p, 1) << (16 + bits as usize * j);
                        }
                        for (b, byte) in w.to_le_bytes().into_iter().enumerate() {
                            tile[base + piece_offset(piece, lane, 4 * u + b)] = byte;
                        }
                    }
                }
            }
        });
    let mut meta = Vec::new();
    if kind == V4Kind::Sparse24 {
        meta = vec![0u8; n_rt * n_kb * V4_META_PACKET];
        let nibble = |row: usize, run: usize| -> u32 {
            if row >= n || 4 * run >= k {
                return 0x4;
            }
            src.nibble(row, run, k / 4)
        };
        meta.par_chunks_mut(n_kb * V4_META_PACKET)
            .enumerate()
            .for_each(|(rt, tile)| {
                for kb in 0..n_kb {
                    let base = kb * V4_META_PACKET;
                    for g in 0..8 {
                        for e in 0..2 {
                            for st in 0..4 {
                                let mut w = 0u32;
                                for t in 0..4 {
                                    let run = 32 * kb + 8 * st + 4 * e + t;
                                    w |= nibble(V4_TILE_ROWS * rt + g, run) << (4 * t);
                                    w |= nibble(V4_TILE_ROWS * rt + g + 8, run) << (16 + 4 * t);
                                }
                                let at = base + (2 * g + e) * 16 + 4 * st;
                                tile[at..at + 4].copy_from_slice(&w.to_le_bytes());
                            }
                        }
                    }
                }
            });
    }
    let mut scales = vec![0u8; n_rt * n_kb * V4_SCALE_PACKET];
    let scale = |row: usize, kb: usize| -> u16 {
        if row >= n {
            return 0;
        }
        src.scale(row, V4_BLOCK_COLS * kb)
    };
    for rt in 0..n_rt {
        for kb in 0..n_kb {
            let base = (rt * n_kb + kb) * V4_SCALE_PACKET;
            for g in 0..8 {
                let w = u32::from(scale(V4_TILE_ROWS * rt + g, kb))
                    | (u32::from(scale(V4_TILE_ROWS * rt + g + 8, kb)) << 16);
                scales[base + 4 * g..base + 4 * g + 4].copy_from_slice(&w.to_le_bytes());
            }
        }
    }
    Some(V4Layout {
        codes,
        meta,
        scales,
    })
}

/// The parameters a v4 decoder needs besides the bytes.
#[derive(Debug, Clone, Copy)]
pub struct V4Params {
    /// quant or sparse24.
    pub kind: V4Kind,
    /// Code bits (2 or 4).
    pub bits: u32,
    /// Stored rows.
    pub n: usize,
    /// Columns.
    pub k: usize,
    /// The global scale.
    pub global_scale: f32,
}

impl V4Params {
    /// The parameters of a payload's codec, if the v4 kernels take it.
    pub fn of(codec: &Codec, n: usize, k: usize) -> Option<V4Params> {
        let kind = v4_kind(codec, k)?;
        let p = match codec {
            Codec::Quant(p) | Codec::Sparse24(p) => p,
            _ => return None,
        };
        Some(V4Params {
            kind,
            bits: u32::from(p.bits),
            n,
            k,
            global_scale: p.global_scale,
        })
    }
}

/// The A fragments of one mma step as a v4 kernel lane decodes them, for every lane of packet
/// `(rt, kb)`: `a[lane][f] = [lo, hi]` integer code values minus the zero point (quant: 16 columns per
/// step; sparse24: the kept values of 8 runs), the scales of rows `g` and `g + 8` (`s[lane]`), and for
/// sparse24 the metadata register of every lane (`meta[lane]`, slot `2 g + (c & 1)`).
pub struct StepFragments {
    /// `[lane][register f][half]`.
    pub a: [[[f32; 2]; 4]; 32],
    /// `[lane]`: the u32 metadata register (sparse24).
    pub meta: [u32; 32],
    /// `[lane]`: the scales of rows `g`, `g + 8`.
    pub scales: [[f32; 2]; 32],
}

/// Decodes step `s` of packet `(rt, kb)` from the v4 bytes with the kernel's index arithmetic (the CPU
/// twin of `kernels/v4/v4.cu`'s decode: the same byte offsets, word and bit positions).
pub fn step_fragments(
    v4: &V4Layout,
    p: &V4Params,
    rt: usize,
    kb: usize,
    s: usize,
) -> StepFragments {
    let (n_kb, _) = packets(p.n, p.k);
    let piece = piece_bytes(p.kind, p.bits);
    let packet = 32 * piece;
    let ppw = 16 / p.bits as usize;
    let mask = (1u32 << p.bits) - 1;
    let z = (1u32 << (p.bits - 1)) as f32;
    let mut out = StepFragments {
        a: [[[0.0; 2]; 4]; 32],
        meta: [0; 32],
        scales: [[0.0; 2]; 32],
    };
    let word = |bytes: &[u8], at: usize| -> u32 {
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
    };
    for lane in 0..32 {
        let (g, c) = (lane / 4, lane % 4);
        let base = (rt * n_kb + kb) * packet;
        for f in 0..4 {
            let pair = 4 * s + f;
            let (u, j) = (pair / ppw, pair % ppw);
            let w = word(&v4.codes, base + piece_offset(piece, lane, 4 * u));
            let bit = p.bits as usize * j;
            let lo = (w >> bit) & mask;
            let hi = (w >> (16 + bit)) & mask;
            out.a[lane][f] = [lo as f32 - z, hi as f32 - z];
        }
        if p.kind == V4Kind::Sparse24 {
            let mb = (rt * n_kb + kb) * V4_META_PACKET + (2 * g + (c & 1)) * 16 + 4 * s;
            out.meta[lane] = word(&v4.meta, mb);
        }
        let sw = word(&v4.scales, (rt * n_kb + kb) * V4_SCALE_PACKET + 4 * g);
        out.scales[lane] = [
            f16::from_bits(sw as u16).to_f32(),
            f16::from_bits((sw >> 16) as u16).to_f32(),
        ];
    }
    out
}

/// The x column of B-fragment register `i` (half `h`) of lane `(g, c)` in step `s` of block `kb`, as the
/// v4 kernels load it (quant: words `2 s`, `2 s + 1` of the lane's 32 columns; sparse24: word
/// `16 s + 4 i + c` of the block).
pub fn b_column(kind: V4Kind, kb: usize, c: usize, s: usize, i: usize, h: usize) -> usize {
    match kind {
        V4Kind::Quant => V4_BLOCK_COLS * kb + 32 * c + 2 * (2 * s + i) + h,
        V4Kind::Sparse24 => V4_BLOCK_COLS * kb + 2 * (16 * s + 4 * i + c) + h,
    }
}

/// The CPU twin of a v4 kernel's `y[m][r] = sum_k x[m][k] D[r][k]` (f64), computed from the v4 bytes the
/// way the kernel does: per packet and step, the lanes' A fragments (decoded as above) and B fragments (x
/// at [`b_column`]) multiplied by the PTX definition of the mma (m16n8k16 for quant; m16n8k32 with 2:4
/// metadata, sparsity selector 0, for sparse24), each block's partial sum scaled by its rows' scale, the
/// global scale last. `x` is `m x k` row-major; the result is `m x n` row-major. Past K (and for input
/// rows past `m`) the B fragments hold a large finite value, as the kernel's registers hold stale x there:
/// the padding codes must make those products exactly 0. Every tile of the kernels (8, 16 or 32 input
/// rows) is 8-row n-tiles of this arithmetic, each with its own accumulators, so the twin covers them all.
pub fn matmul_twin(v4: &V4Layout, p: &V4Params, x: &[f32], m: usize) -> Vec<f64> {
    let (n_kb, n_rt) = packets(p.n, p.k);
    let steps = match p.kind {
        V4Kind::Quant => 8,
        V4Kind::Sparse24 => 4,
    };
    let xv = |row: usize, col: usize| -> f64 {
        if row < m && col < p.k {
            f64::from(x[row * p.k + col])
        } else {
            1.0e3
        }
    };
    let mut y = vec![0f64; m * p.n];
    for rt in 0..n_rt {
        for n0 in (0..m).step_by(8) {
            let mut acc = [[0f64; 8]; 16];
            for kb in 0..n_kb {
                let mut part = [[0f64; 8]; 16];
                for s in 0..steps {
                    let fr = step_fragments(v4, p, rt, kb, s);
                    // The A tile [16][K_step] and B tile [K_step][8] the mma sees.
                    let kstep = if p.kind == V4Kind::Quant { 16 } else { 32 };
                    let mut a = vec![[0f64; 32]; 16];
                    let mut b = vec![[0f64; 8]; 32];
                    for lane in 0..32 {
                        let (g, c) = (lane / 4, lane % 4);
                        for f in 0..4 {
                            let row = g + 8 * (f & 1);
                            // Dense: a0/a1 columns 2c, 2c+1; a2/a3 columns 2c+8, 2c+9. Sparse: the same
                            // places in the compressed 16 x 16 A.
                            let col = 2 * c + 8 * (f >> 1);
                            for h in 0..2 {
                                a[row][col + h] = f64::from(fr.a[lane][f][h]);
                            }
                        }
                        let nb = if p.kind == V4Kind::Quant { 2 } else { 4 };
                        for i in 0..nb {
                            for h in 0..2 {
                                let kk = 2 * c + 8 * i + h;
                                b[kk][g] = xv(n0 + g, b_column(p.kind, kb, c, s, i, h));
                            }
                        }
                    }
                    let a_full: Vec<[f64; 32]> = if p.kind == V4Kind::Quant {
                        a
                    } else {
                        // Expand the compressed A with the metadata: row r, chunk j (4 columns) is
                        // described by nibble j % 4 of bits 16 (r >= 8) of the register of lane
                        // 4 (r % 8) + j / 4.
                        let mut full = vec![[0f64; 32]; 16];
                        for (r, fr_row) in full.iter_mut().enumerate() {
                            for j in 0..8 {
                                let e = fr.meta[4 * (r % 8) + j / 4];
                                let nib = (e >> (16 * (r / 8) + 4 * (j % 4))) & 15;
                                let (i0, i1) = ((nib & 3) as usize, (nib >> 2) as usize);
                                assert!(i0 < i1, "metadata nibble {nib:#x} is not ordered");
                                fr_row[4 * j + i0] += a[r][2 * j];
                                fr_row[4 * j + i1] += a[r][2 * j + 1];
                            }
                        }
                        full
                    };
                    for r in 0..16 {
                        for nn in 0..8 {
                            for kk in 0..kstep {
                                part[r][nn] += a_full[r][kk] * b[kk][nn];
                            }
                        }
                    }
                }
                // The block's scale per row (lane (g, 0) holds rows g and g + 8).
                let fr = step_fragments(v4, p, rt, kb, 0);
                for r in 0..16 {
                    let sc = f64::from(fr.scales[4 * (r % 8)][r / 8]);
                    for nn in 0..8 {
                        acc[r][nn] += sc * part[r][nn];
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                let row = V4_TILE_ROWS * rt + r;
                for (nn, v) in acc_r.iter().enumerate() {
                    if row < p.n && n0 + nn < m {
                        y[(n0 + nn) * p.n + row] = v * f64::from(p.global_scale);
                    }
                }
            }
        }
    }
    y
}

/// The dense delta (`n x k`, f32) decoded from the v4 bytes with the kernel's index arithmetic, each value
/// by the SPEC formula `((q - z) * s) * global_scale` in f32: bit-identical to dz-format's decoder when
/// the re-layout is a pure permutation.
pub fn dequantize_v4(v4: &V4Layout, p: &V4Params) -> Vec<f32> {
    let (n_kb, n_rt) = packets(p.n, p.k);
    let mut out = vec![0f32; p.n * p.k];
    let mut seen = vec![false; p.n * p.k];
    let steps = match p.kind {
        V4Kind::Quant => 8,
        V4Kind::Sparse24 => 4,
    };
    for rt in 0..n_rt {
        for kb in 0..n_kb {
            for s in 0..steps {
                let fr = step_fragments(v4, p, rt, kb, s);
                for lane in 0..32 {
                    let (g, c) = (lane / 4, lane % 4);
                    for f in 0..4 {
                        let (row, at) = pair_source(p.kind, rt, kb, g, c, 4 * s + f);
                        if row >= p.n {
                            continue;
                        }
                        let sc = fr.scales[lane][f & 1];
                        let cols: [usize; 2] = match p.kind {
                            V4Kind::Quant => [at, at + 1],
                            V4Kind::Sparse24 => {
                                // The lane of register pair (g, c < 2) holding this row's metadata.
                                let run = at;
                                let j = run % 8; // chunk of the step
                                let e = fr.meta[4 * g + j / 4];
                                let nib = (e >> (16 * (f & 1) + 4 * (j % 4))) & 15;
                                [4 * run + (nib & 3) as usize, 4 * run + (nib >> 2) as usize]
                            }
                        };
                        for (h, &col) in cols.iter().enumerate() {
                            if col >= p.k {
                                continue;
                            }
                            let v = fr.a[lane][f][h] * sc * p.global_scale;
                            let at = row * p.k + col;
                            assert!(!seen[at], "row {row} column {col} decoded twice");
                            seen[at] = true;
                            out[at] = v;
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dz_format::codec::{Grid, Quant, Sparse24};
    use dz_format::QuantParams;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn grid(rng: &mut StdRng, n: usize, k: usize, bits: u8, group: u32) -> Grid {
        let params = QuantParams {
            bits,
            group_size: group,
            symmetric: true,
            global_scale: 0.5,
        };
        let ng = params.n_groups(k);
        Grid {
            params,
            scales: (0..n * ng)
                .map(|_| f16::from_f32(rng.gen_range(0.01f32..2.0)))
                .collect(),
            zeros: None,
        }
    }

    fn quant(seed: u64, n: usize, k: usize, bits: u8, group: u32) -> Payload {
        let mut rng = StdRng::seed_from_u64(seed);
        let grid = grid(&mut rng, n, k, bits, group);
        Payload::Quant(Quant {
            rows: n,
            cols: k,
            grid,
            codes: (0..n * k).map(|_| rng.gen_range(0..1u8 << bits)).collect(),
        })
    }

    fn sparse24(seed: u64, n: usize, k: usize, bits: u8, group: u32) -> Payload {
        let mut rng = StdRng::seed_from_u64(seed);
        let grid = grid(&mut rng, n, k, bits, group);
        const PAIRS: [(u8, u8); 6] = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)];
        let mut positions = Vec::with_capacity(n * k / 2);
        for _ in 0..n * k / 4 {
            let (a, b) = PAIRS[rng.gen_range(0..6)];
            positions.push(a);
            positions.push(b);
        }
        Payload::Sparse24(Sparse24 {
            rows: n,
            cols: k,
            grid,
            codes: (0..n * k / 2)
                .map(|_| rng.gen_range(0..1u8 << bits))
                .collect(),
            positions,
        })
    }

    /// Every configuration the v4 kernels take, on odd shapes (N not a multiple of 16, K not a multiple
    /// of 128, a single partial packet), whole-row groups and groups of 128 and 256.
    fn cases() -> Vec<(String, Payload)> {
        let mut v = Vec::new();
        let mut seed = 1;
        for (n, k) in [(1usize, 32usize), (16, 128), (17, 96), (40, 416), (33, 256)] {
            for bits in [2u8, 4] {
                for group in [0u32, 128, 256] {
                    seed += 1;
                    v.push((
                        format!("quant {bits}b g{group} {n}x{k}"),
                        quant(seed, n, k, bits, group),
                    ));
                    v.push((
                        format!("sparse24 {bits}b g{group} {n}x{k}"),
                        sparse24(seed, n, k, bits, group),
                    ));
                }
            }
        }
        v
    }

    #[test]
    fn relayout_is_a_pure_permutation() {
        for (name, payload) in cases() {
            payload.validate("t").unwrap();
            let v4 = relayout_v4(&payload).unwrap_or_else(|| panic!("{name}: not re-laid"));
            let (n, k) = payload.dims();
            let p = V4Params::of(&payload.codec(), n, k).unwrap();
            let (n_kb, n_rt) = packets(n, k);
            assert_eq!(
                v4.codes.len(),
                n_rt * n_kb * 32 * piece_bytes(p.kind, p.bits),
                "{name}"
            );
            let meta = if v4.meta.is_empty() { 1 } else { v4.meta.len() };
            assert_eq!(
                v4_nbytes(&payload.codec(), n, k),
                v4.codes.len() + meta + v4.scales.len(),
                "{name}"
            );
            let got = dequantize_v4(&v4, &p);
            let want = payload.dequantize();
            // Bit-identical: the same codes and scales through the same f32 formula.
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{name}: element {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn relayout_from_the_packed_parts_is_the_same() {
        for (name, payload) in cases() {
            let (n, k) = payload.dims();
            let parts = payload.pack().unwrap();
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let packed = relayout_v4_packed(&payload.codec(), n, k, &refs);
            assert_eq!(packed, relayout_v4(&payload), "{name}");
            assert!(packed.is_some(), "{name}");
        }
    }

    #[test]
    fn kernel_twin_matches_the_reference_matmul() {
        let mut rng = StdRng::seed_from_u64(99);
        for (name, payload) in cases() {
            let v4 = relayout_v4(&payload).unwrap();
            let (n, k) = payload.dims();
            let p = V4Params::of(&payload.codec(), n, k).unwrap();
            let dense = payload.dequantize();
            // 33 and 70: the 32-row tile's rows (its x tiles are 8-row n-tiles of the same
            // arithmetic, one partial).
            for m in [1usize, 3, 8, 9, 16, 33, 70] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1f32..1.0)).collect();
                let got = matmul_twin(&v4, &p, &x, m);
                for mi in 0..m {
                    for r in 0..n {
                        let mut want = 0f64;
                        let mut mag = 0f64;
                        for kk in 0..k {
                            let t = f64::from(x[mi * k + kk]) * f64::from(dense[r * k + kk]);
                            want += t;
                            mag += t.abs();
                        }
                        let g = got[mi * n + r];
                        assert!(
                            (g - want).abs() <= 1e-9 * mag.max(1e-30),
                            "{name} m={m}: y[{mi}][{r}] = {g}, expected {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn what_v4_takes() {
        let p = |bits, group_size, symmetric| QuantParams {
            bits,
            group_size,
            symmetric,
            global_scale: 1.0,
        };
        assert_eq!(
            v4_kind(&Codec::Quant(p(4, 128, true)), 4096),
            Some(V4Kind::Quant)
        );
        assert_eq!(
            v4_kind(&Codec::Sparse24(p(2, 0, true)), 96),
            Some(V4Kind::Sparse24)
        );
        assert_eq!(v4_kind(&Codec::Quant(p(4, 128, false)), 4096), None);
        assert_eq!(v4_kind(&Codec::Quant(p(3, 128, true)), 4096), None);
        assert_eq!(v4_kind(&Codec::Quant(p(4, 64, true)), 4096), None);
        assert_eq!(v4_kind(&Codec::Quant(p(4, 128, true)), 100), None);
        assert_eq!(v4_kind(&Codec::Sign1 { global_scale: 1.0 }, 4096), None);
        // Every sparse24 metadata nibble the format allows is one mma.sp accepts (i0 < i1), and the
        // padding nibble 0x4 too.
        for nib in [0x4u32, 0x8, 0xC, 0x9, 0xD, 0xE] {
            assert!((nib & 3) < (nib >> 2));
        }
    }
}

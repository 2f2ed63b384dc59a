// The kernel bodies shared by every codec, templated on a decoder `Dec` (kernels/<codec>/<codec>.cu), the
// input dtype T (float, __half, __nv_bfloat16) and, for the matmuls, the input rows per tile MT; and the
// macro that instantiates the C entry points of one decoder for every dtype.
//
// A decoder is a struct with:
//   static constexpr int SCRATCH;   u32 words of shared memory per (warp, row) it needs (sparse: staged codes)
//   static constexpr bool SPARSE;   the matmul visits stored entries only (`nonzeros`), not 32 columns
//   struct Row;                     one stored row: pointers, grid, running state (per lane)
//   struct Unit;                    a lane's raw bits for one warp step
//   static Row row(const DzDelta&, uint32_t r, uint32_t* scratch);
//   static Unit load(const DzDelta&, Row&, uint32_t c0, uint32_t lane);   whole warp; c0 = step + 32 lane
//   static void decode(const DzDelta&, Row&, const Unit&, uint32_t c0, float (&v)[32]);  v[j] = D[r][c0 + j]
//                                   (0 past K and for entries a sparse codec does not store)
//   template <class F> static void nonzeros(const DzDelta&, Row&, const Unit&, uint32_t c0, F&& f);  (SPARSE only)
//                                   f(col, value) for each stored entry of the unit, columns increasing
// `decode` and `nonzeros` produce the values of the SPEC formula bit for bit (dz::Grid::value).
//
// Matmul (`y[i][col(r)] = base[i][col(r)] + sum_k x[i][k] * D[r][k]`): a block of DZ_WARPS warps owns
// DZ_ROWS_PER_BLOCK stored rows (each warp DZ_ROWS_PER_WARP of them) and a tile of at most MT input rows. It
// walks K in chunks of DZ_CHUNK columns: the block stages the chunk of its MT rows of x in shared memory as
// f32 (converted once, read by all its warps: the reuse of x across outputs), then every warp streams its
// rows' packed bytes for the chunk once (one unit of 32 columns per lane, coalesced), decodes them in
// registers and accumulates in f32 (fmaf). A butterfly of shuffles sums the lanes; lane i writes input row
// i's output, rounded once to T. No dense copy of the delta exists anywhere, not even in shared memory.
//
// x in shared memory is laid out [column][MT] with a pad after every 32 columns (1 float for MT = 1, 4 for
// MT = 8): the lanes of a warp read different 32-column units, and the pad spreads them over all banks.
#pragma once

#include "dz_common.cuh"

namespace dz {

template <int MT>
struct XTile {
  static constexpr int PAD = MT == 1 ? 1 : 4;
  // Floats of one chunk: DZ_CHUNK columns x MT rows, plus the pads.
  static constexpr int FLOATS = DZ_CHUNK * MT + (DZ_CHUNK / 32) * PAD;
  // Offset of column c (of the chunk) in the tile.
  static __device__ __forceinline__ uint32_t at(uint32_t c) { return c * MT + (c / 32) * PAD; }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// acc[i] += w * x[i] for the MT values of one column of the staged tile (16-byte aligned for MT % 4 == 0).
template <int MT>
__device__ __forceinline__ void fma_column(float (&acc)[MT], float w, const float* xc) {
  if constexpr (MT % 4 == 0) {
#pragma unroll
    for (int i = 0; i < MT; i += 4) {
      const float4 xv = *reinterpret_cast<const float4*>(xc + i);
      acc[i + 0] = fmaf(w, xv.x, acc[i + 0]);
      acc[i + 1] = fmaf(w, xv.y, acc[i + 1]);
      acc[i + 2] = fmaf(w, xv.z, acc[i + 2]);
      acc[i + 3] = fmaf(w, xv.w, acc[i + 3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[i] = fmaf(w, xc[i], acc[i]);
  }
}

// One block's share of one tile: stored rows r_block .. r_block + DZ_ROWS_PER_BLOCK (those < n_stored) times
// input rows 0 .. rows (<= MT) of `x` ([rows, K] contiguous). Writes out[i][col(r)] = base[i][col(r)] + acc
// (`base` may be null: + 0, or equal to `out`: in place; both [rows, n_total] contiguous).
// Every thread of the block calls it (it synchronizes the block).
template <class Dec, typename T, int MT>
__device__ __forceinline__ void matmul_tile(const DzDelta& d, const T* __restrict__ x, uint32_t rows, const T* base,
                                            T* out, uint32_t r_block, float* xs, uint32_t* scratch) {
  using Tile = XTile<MT>;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t K = d.k;

  float acc[DZ_ROWS_PER_WARP][MT];
  typename Dec::Row row[DZ_ROWS_PER_WARP];
  bool valid[DZ_ROWS_PER_WARP];  // the same in every lane of the warp
#pragma unroll
  for (int rr = 0; rr < DZ_ROWS_PER_WARP; ++rr) {
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[rr][i] = 0.f;
    const uint32_t r = r_block + warp * DZ_ROWS_PER_WARP + rr;
    valid[rr] = r < d.n_stored;
    // Rows past the delta's stay idle; they point at the block's first row (which exists) to stay defined.
    row[rr] = Dec::row(d, valid[rr] ? r : r_block, scratch + (warp * DZ_ROWS_PER_WARP + rr) * Dec::SCRATCH);
  }

  for (uint32_t k0 = 0; k0 < K; k0 += DZ_CHUNK) {
    __syncthreads();  // the previous chunk (or tile) is read by every warp
    for (uint32_t c = threadIdx.x; c < DZ_CHUNK; c += DZ_THREADS) {
      float* dst = xs + Tile::at(c);
      const bool in = k0 + c < K;
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        dst[i] = (in && uint32_t(i) < rows) ? to_f32(x[size_t(i) * K + k0 + c]) : 0.f;
      }
    }
    __syncthreads();

    const uint32_t c0 = k0 + lane * 32;
    typename Dec::Unit u[DZ_ROWS_PER_WARP];
#pragma unroll
    for (int rr = 0; rr < DZ_ROWS_PER_WARP; ++rr) {
      if (valid[rr]) u[rr] = Dec::load(d, row[rr], c0, lane);
    }
#pragma unroll
    for (int rr = 0; rr < DZ_ROWS_PER_WARP; ++rr) {
      if (!valid[rr]) continue;
      if constexpr (Dec::SPARSE) {
        Dec::nonzeros(d, row[rr], u[rr], c0,
                      [&](uint32_t col, float w) { fma_column<MT>(acc[rr], w, xs + Tile::at(col - k0)); });
      } else {
        float v[32];
        Dec::decode(d, row[rr], u[rr], c0, v);
        const float* xl = xs + Tile::at(lane * 32);
#pragma unroll
        for (int j = 0; j < 32; ++j) fma_column<MT>(acc[rr], v[j], xl + j * MT);
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < DZ_ROWS_PER_WARP; ++rr) {
    if (!valid[rr]) continue;
    const uint32_t r = r_block + warp * DZ_ROWS_PER_WARP + rr;
    const uint32_t col = output_col(d, r);
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const float v = warp_sum(acc[rr][i]);
      if (lane == uint32_t(i) && uint32_t(i) < rows) {
        const size_t o = size_t(i) * d.n_total + col;
        const float b = base ? to_f32(base[o]) : 0.f;
        out[o] = from_f32<T>(b + v);
      }
    }
  }
}

template <class Dec, int MT>
struct Shared {
  static constexpr int SCRATCH = Dec::SCRATCH > 0 ? DZ_WARPS * DZ_ROWS_PER_WARP * Dec::SCRATCH : 1;
};

// `delta_matmul_add`: out = base + x · Dᵀ for x [m, K]; base null (plain delta_matmul), a separate buffer,
// or `out` itself (in place: the host copied base_out there, for a row subset). Grid: x over stored-row
// blocks, y over tiles of MT input rows (grid-stride).
template <class Dec, typename T, int MT>
__device__ __forceinline__ void matmul_add(const DzDelta& d, const T* x, const T* base, T* out, uint32_t m) {
  __shared__ __align__(16) float xs[XTile<MT>::FLOATS];
  __shared__ uint32_t scratch[Shared<Dec, MT>::SCRATCH];
  const uint32_t r_block = blockIdx.x * DZ_ROWS_PER_BLOCK;
  if (r_block >= d.n_stored) return;
  const uint32_t tiles = (m + MT - 1) / MT;
  for (uint32_t t = blockIdx.y; t < tiles; t += gridDim.y) {
    const uint32_t i0 = t * MT;
    const size_t o = size_t(i0) * d.n_total;
    matmul_tile<Dec, T, MT>(d, x + size_t(i0) * d.k, min(uint32_t(MT), m - i0), base ? base + o : nullptr,
                            out + o, r_block, xs, scratch);
  }
}

// `sbmm`: for every segment s (at most MT rows, delta segs[s].delta of `deltas`), in place:
// out[rows of s] += x[rows of s] · D_sᵀ (the host copied base_out to out). Grid: x over stored-row blocks
// (of the largest delta of the launch; blocks past a smaller delta's rows skip its segments), y over
// segments (grid-stride). All deltas of one launch share this decoder (codec and bits) and dtype.
template <class Dec, typename T, int MT>
__device__ __forceinline__ void sbmm(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas, const T* x,
                                     T* out, uint32_t k, uint32_t n_total) {
  __shared__ __align__(16) float xs[XTile<MT>::FLOATS];
  __shared__ uint32_t scratch[Shared<Dec, MT>::SCRATCH];
  const uint32_t r_block = blockIdx.x * DZ_ROWS_PER_BLOCK;
  for (uint32_t s = blockIdx.y; s < n_segs; s += gridDim.y) {
    const DzSegment seg = segs[s];
    const DzDelta d = deltas[seg.delta];
    if (r_block >= d.n_stored) continue;
    T* o = out + size_t(seg.start) * n_total;
    matmul_tile<Dec, T, MT>(d, x + size_t(seg.start) * k, seg.len, o, o, r_block, xs, scratch);
  }
}

// Rows of the dense delta added to rows of `base`: out[t][c] = base[t][c] + D[id(t)][c] for t < n_rows, where
// id(t) = ids[t] (embedding gather; ids checked < n_total by the host) or t (dequantize: base null and T
// float; merge). Rows a row subset does not store add zero. Every element of out is written. Each warp owns
// one output row at a time (grid-stride), streaming its packed row once.
//
// A lane decodes 32 consecutive columns (c0 .. c0+31), the decoders' unit. Stored as decoded, a warp's
// store (and base load) would touch 32 addresses 32 columns apart: 32 sectors per instruction, and a
// 4096 x 4096 bf16 merge took 245 us on the H200 (session 9), ~10x its bytes' time. So the values go
// through shared memory (padded: conflict-free both ways) and pass j stores columns k0 + 32 j + lane:
// consecutive lanes, consecutive addresses. The values and their order of arithmetic are unchanged.
template <class Dec, typename T>
__device__ __forceinline__ void rows_add(const DzDelta& d, const uint32_t* ids, uint32_t n_rows, const T* base,
                                         T* out) {
  __shared__ uint32_t scratch[Dec::SCRATCH > 0 ? DZ_WARPS * Dec::SCRATCH : 1];
  __shared__ float stage[DZ_WARPS][32 * 33];
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* st = stage[warp];
  const uint32_t K = d.k;
  for (uint32_t t = blockIdx.x * DZ_WARPS + warp; t < n_rows; t += gridDim.x * DZ_WARPS) {
    const int64_t r = stored_row(d, ids ? __ldg(ids + t) : t);
    typename Dec::Row row;
    if (r >= 0) row = Dec::row(d, uint32_t(r), scratch + warp * Dec::SCRATCH);
    for (uint32_t k0 = 0; k0 < K; k0 += DZ_CHUNK) {
      const uint32_t c0 = k0 + lane * 32;
      float v[32];
      if (r >= 0) {
        const typename Dec::Unit u = Dec::load(d, row, c0, lane);
        Dec::decode(d, row, u, c0, v);
      } else {
#pragma unroll
        for (int j = 0; j < 32; ++j) v[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < 32; ++j) st[lane * 33 + j] = v[j];
      __syncwarp();
      const size_t o = size_t(t) * K + k0;
#pragma unroll 8
      for (uint32_t j = 0; j < 32; ++j) {
        const uint32_t c = j * 32 + lane;  // lane j decoded it, as its value lane
        if (k0 + c < K) {
          const float dv = st[j * 33 + lane];
          out[o + c] = base ? from_f32<T>(to_f32(base[o + c]) + dv) : from_f32<T>(dv);
        }
      }
      __syncwarp();
    }
  }
}

}  // namespace dz

// The C entry points of decoder `Dec` for input dtype T (named `tname`), for variant `variant`:
//   dz_<variant>_matmul_add_<tname>_m<MT>(DzDelta d, const T* x, const T* base, T* out, uint32_t m)
//   dz_<variant>_sbmm_<tname>_m<MT>(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas,
//                                   const T* x, T* out, uint32_t k, uint32_t n_total)
//   dz_<variant>_dequantize_<tname>(DzDelta d, const T* base, T* out)          rows 0..n_total of D (+ base)
//   dz_<variant>_embedding_add_<tname>(DzDelta d, const uint32_t* ids, uint32_t n_ids, const T* base, T* out)
// src/lib.rs names the same entry points (and a test checks that each is in the PTX).
// (A tool that compiles these sources for something else, such as a CPU emulation, may define its own
// DZ_INSTANTIATE first.)
#ifndef DZ_INSTANTIATE
#define DZ_MATMUL_ENTRIES(variant, Dec, T, tname, MT)                                                        \
  extern "C" __global__ void __launch_bounds__(DZ_THREADS)                                                  \
      dz_##variant##_matmul_add_##tname##_m##MT(DzDelta d, const T* x, const T* base, T* out, uint32_t m) { \
    dz::matmul_add<Dec, T, MT>(d, x, base, out, m);                                                         \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(DZ_THREADS)                                                  \
      dz_##variant##_sbmm_##tname##_m##MT(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas,    \
                                          const T* x, T* out, uint32_t k, uint32_t n_total) {               \
    dz::sbmm<Dec, T, MT>(segs, n_segs, deltas, x, out, k, n_total);                                         \
  }

#define DZ_DTYPE_ENTRIES(variant, Dec, T, tname)                                                                 \
  DZ_MATMUL_ENTRIES(variant, Dec, T, tname, 1)                                                                   \
  DZ_MATMUL_ENTRIES(variant, Dec, T, tname, 8)                                                                   \
  extern "C" __global__ void __launch_bounds__(DZ_THREADS)                                                      \
      dz_##variant##_dequantize_##tname(DzDelta d, const T* base, T* out) {                                     \
    dz::rows_add<Dec, T>(d, nullptr, d.n_total, base, out);                                                     \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(DZ_THREADS)                                                      \
      dz_##variant##_embedding_add_##tname(DzDelta d, const uint32_t* ids, uint32_t n_ids, const T* base, T* out) { \
    dz::rows_add<Dec, T>(d, ids, n_ids, base, out);                                                             \
  }

static_assert(DZ_MT_SMALL == 1 && DZ_MT_LARGE == 8, "DZ_DTYPE_ENTRIES spells the tiles out: _m1 and _m8");

#define DZ_INSTANTIATE(variant, Dec)                      \
  DZ_DTYPE_ENTRIES(variant, Dec, float, f32)              \
  DZ_DTYPE_ENTRIES(variant, Dec, __half, f16)             \
  DZ_DTYPE_ENTRIES(variant, Dec, __nv_bfloat16, bf16)
#endif

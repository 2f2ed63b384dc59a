// v4: delta matmul and sbmm for 1-16 input rows (the serving decode regime) on the *re-laid* codes of
// dz-candle-ops' `relayout` module (its docs define the byte layout; `relayout::matmul_twin` is this file's
// CPU twin, with the same index arithmetic). quant 2/4 bits on mma.sync m16n8k16, sparse24 2/4 bits on
// mma.sp m16n8k32 (the 2:4 metadata goes to the tensor cores as it is stored), symmetric grids, groups of
// 0 or a multiple of 128 columns, f16/bf16 inputs, f32 accumulation.
//
// Why tensor cores at 1 row too: per 16 x 16 weights a lane decodes 4 code pairs either way (the decode is
// the cost); the mma then takes 1 instruction per 8 input rows, a CUDA-core GEMV 8 FFMA per lane and row.
//
// Per 128-column block a lane loads its piece of the packet (quant4: 2 x 16 B, quant2 / sparse24-4: 16 B,
// sparse24-2: 8 B; + 16 B of metadata for sparse24) with coalesced 16-byte loads, and makes each pair of
// f16/bf16 with a shift (shared by several pairs), one LOP3 ((w >> sh) & mask | magic) and one HFMA2
// (scale by 2^-within and subtract magic + zero point, exact). Loads run D = 3 (8-row tiles) or 2 (16-row
// tiles) blocks ahead (codes, meta, scales and x); the loop is unrolled by D so the ring is indexed by
// constants.
//
// Launch: block = 8 warps (V4_THREADS), a 1-D grid, grid-stride. The work is items: (tile of 8 NT input
// rows, 16-row tile of the delta) for matmul, (segment, 16-row tile) for sbmm; each item is split over
// `split` warps along K (the host picks 1, 2, 4 or 8 by the number of items), warp p of an item taking
// the blocks p, p + split, ... of K; a split item's partial sums meet in shared memory; 8 / split items a
// block. Rows of x past `rows` are read as row `rows - 1` (valid memory; their outputs are not written).
#include "dz_common.cuh"


namespace dz {
namespace v4 {

constexpr int WK = 8;   // warps per block, along K
constexpr int KB = 128;  // columns per block

template <typename T>
struct Num;
template <>
struct Num<__half> {
  static constexpr uint32_t MAGIC = 0x64006400u;  // (1024, 1024): integers 1024..2047 exact
  static constexpr float MAGIC_F = 1024.f;
  static constexpr int WITHIN = 8;  // a code may sit at bits 0..7 of its half (1024 + 255 < 2048)
};
template <>
struct Num<__nv_bfloat16> {
  static constexpr uint32_t MAGIC = 0x43004300u;  // (128, 128): integers 128..255 exact
  static constexpr float MAGIC_F = 128.f;
  static constexpr int WITHIN = 4;  // bits 0..3 of its half: 7 mantissa bits (128 + 15 << 3 overflows)
};

template <typename T>
__device__ __forceinline__ uint32_t pair_of(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pair_of<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pair_of<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// a * b + c on both halves (exact here: small integers and powers of two).
template <typename T>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c);
template <>
__device__ __forceinline__ uint32_t fma2<__half>(uint32_t a, uint32_t b, uint32_t c) {
  __half2 r = __hfma2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b),
                      *reinterpret_cast<__half2*>(&c));
  return *reinterpret_cast<uint32_t*>(&r);
}
template <>
__device__ __forceinline__ uint32_t fma2<__nv_bfloat16>(uint32_t a, uint32_t b, uint32_t c) {
  __nv_bfloat162 r = __hfma2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b),
                             *reinterpret_cast<__nv_bfloat162*>(&c));
  return *reinterpret_cast<uint32_t*>(&r);
}

// The mma instructions, f32 accumulate.
template <typename T>
__device__ __forceinline__ void mma16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Sparse: A is the 16 x 16 compressed tile (kept values), B 32 x 8, `e` the metadata (selector 0: threads
// 0 and 1 of each quad supply it; nibbles i0 | i1 << 2 with i0 < i1, as dz-format stores them).
template <typename T>
__device__ __forceinline__ void mma32sp(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                        uint32_t e);
template <>
__device__ __forceinline__ void mma32sp<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                                uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
      "{%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}
template <>
__device__ __forceinline__ void mma32sp<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                       const uint32_t (&b)[4], uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
      "{%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// The code stream (read once): not allocated in L1, so that x (re-read by every row tile on the SM) stays.
__device__ __forceinline__ uint4 ldg16_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
// Asks L2 to fetch `bytes` (a multiple of 16) from `p` (16-byte aligned) ahead of the loads that read them: one
// instruction, no register and no completion to wait for (sm_90 `cp.async.bulk.prefetch.L2`).
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" : : "l"(p), "r"(bytes) : "memory");
}

__device__ __forceinline__ uint2 ldg8_stream(const void* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// One codec's v4 form. SP: sparse24 (mma.sp), else quant (dense mma). B: code bits.
template <int B, bool SP>
struct Codec {
  static constexpr int PIECE = SP ? 4 * B : 8 * B;  // bytes per lane per block
  static constexpr int PACKET = 32 * PIECE;
  static constexpr int CW = PIECE / 4;     // code words per lane per block
  static constexpr int MW = SP ? 4 : 0;    // metadata words per lane per block
  static constexpr int STEPS = SP ? 4 : 8;  // mma steps per block
  static constexpr int XW = 16;            // x words (pairs) per lane, input row and block
  static constexpr int PPW = 16 / B;       // code pairs per word
  static constexpr uint32_t MASK = ((1u << B) - 1u) * 0x00010001u;
  static constexpr bool sparse = SP;
  static constexpr int BITS = B;
};

// Whether the load ring carries x (8- and 16-row tiles) or only the stream loads (32- and 64-row tiles,
// whose x words would take 64 / 128 registers a stage: they load each step's x right before its mma).
// `XD` (x direct, session 15): the decode sbmm's 8-row tile without x in the ring either, which frees its 16
// registers a stage: XD_DEEP = a deeper code ring (`_sbmm_xd_`, `depth`), XD_OCCUPANCY = the same 3-deep
// ring in 80 registers, 3 blocks an SM (`_sbmm_xo_`); 0 = x in the ring.
constexpr int XD_DEEP = 1;
constexpr int XD_OCCUPANCY = 2;
template <int NT, int XD = 0>
__host__ __device__ constexpr bool x_in_ring() {
  return NT <= 2 && XD == 0;
}

// The loads of one block for one lane: codes, metadata, scale word, x (x only where `x_in_ring`; the
// one-word array of the wide tiles is never touched, so it takes no register).
template <class C, int NT, int XD = 0>
struct Stage {
  uint32_t w[C::CW];
  uint32_t m[C::MW > 0 ? C::MW : 1];
  uint32_t s;
  uint32_t x[x_in_ring<NT, XD>() ? NT : 1][x_in_ring<NT, XD>() ? C::XW : 1];
};

// (a & b) | c in one LOP3 (C code with two constants becomes an AND and an OR).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// Where a warp's next block of loads comes from: pointers that advance by WK blocks per load.
template <class C, typename T, int NT, int XD = 0>
struct Cursor {
  const uint8_t* codes;     // this lane's first chunk in the packet
  const uint8_t* meta;      // this lane's metadata slot in the packet
  const uint32_t* scales;   // this lane's scale word
  const unsigned int* x[x_in_ring<NT, XD>() ? NT : 1];  // this lane's first x word of the block, per n-tile
  uint32_t kb;              // the block
};

// Blocks of loads in flight per warp (the ring's depth): 3 for 8-row tiles, 2 for 16-row tiles (whose x
// words take twice the registers); both fit 128 registers without spills (ptxas -v). The 32-row tile's
// ring holds only the stream loads (9 registers a stage at most), 2 deep: its accumulators and partial
// sums take 32 registers, and at 3 deep ptxas spills in the loop. (A 64-row tile, NT = 8, spilled in the
// loop even 1 deep: 64 registers of sums; so more than 32 rows run as several 32-row x tiles.)
// With XD_DEEP, 6 blocks (the stream loads only, 9 registers a stage; 126 registers without spills for
// sparse24-4, ptxas -v): twice the code bytes in flight a warp of the 3-deep ring with x (session 15's
// Nsight Compute on the decode sbmm: 25% occupancy, 39% of the stall cycles waiting on global loads, 61%
// of DRAM bandwidth). With XD_OCCUPANCY, 3 blocks in 80 registers (8 bytes spilled for sparse24-4, none
// for the others), so 3 blocks an SM: 1.5x the warps and the stages in flight.
template <int NT, int XD = 0>
constexpr int depth() {
  return XD == XD_DEEP ? 6 : XD == XD_OCCUPANCY ? 3 : NT == 1 ? 3 : 2;
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
}

// The decode sbmm pair's code rings (`Tile::accumulate_mt`): 2 blocks deep for each of its 2 tiles, so 4
// blocks of codes in flight a warp (the single tile's ring: 3), x in the first tile's stages only.
constexpr int PAIR_DEPTH = 2;

template <class C, typename T, int NT, int XD = 0>
struct Tile {
  static constexpr int D = depth<NT, XD>();
  using St = Stage<C, NT, XD>;
  using Cur = Cursor<C, T, NT, XD>;
  // Issues the loads of the cursor's block and moves the cursor `split` blocks on. The cursor never leaves the
  // row tile's last block (it stays there once `kb` passes it), so every load is in bounds without a
  // branch: the loads of a block past the last are repeats (cache hits) that nothing uses. x words past K
  // are not loaded (the registers keep older, finite x values, or the prologue's zeros): the re-laid
  // codes there are the zero point, so the weights they meet are exactly 0.
  // The stream loads (codes, metadata, scale word) of the cursor's block.
  static __device__ __forceinline__ void load_codes(St& st, const Cur& cur) {
    if constexpr (C::PIECE >= 16) {
#pragma unroll
      for (int i = 0; i < C::PIECE / 16; ++i) {
        const uint4 v = ldg16_stream(cur.codes + i * 512);
        st.w[4 * i] = v.x;
        st.w[4 * i + 1] = v.y;
        st.w[4 * i + 2] = v.z;
        st.w[4 * i + 3] = v.w;
      }
    } else {
      const uint2 v = ldg8_stream(cur.codes);
      st.w[0] = v.x;
      st.w[1] = v.y;
    }
    if constexpr (C::sparse) {
      const uint4 v = ldg16_stream(cur.meta);
      st.m[0] = v.x;
      st.m[1] = v.y;
      st.m[2] = v.z;
      st.m[3] = v.w;
    }
    st.s = __ldg(cur.scales);
  }

  static __device__ __forceinline__ void load(St& st, Cur& cur, uint32_t nkb, uint32_t K,
                                              uint32_t lane, uint32_t split) {
    const uint32_t c = lane % 4;
    load_codes(st, cur);
    const uint32_t k0 = min(cur.kb, nkb - 1) * KB;
    const bool full = k0 + KB <= K;  // uniform: only the last block of a row can be partial
#pragma unroll
    for (int t = 0; t < (x_in_ring<NT, XD>() ? NT : 0); ++t) {
      const unsigned int* xw = cur.x[t];
      if constexpr (!C::sparse) {
        // Columns 32 c .. 32 c + 31 of the block (xw points there): 4 x 16 bytes (K is a multiple of 32: all
        // in or all out).
        if (full || k0 + 32 * c < K) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint4 v = ldg16(xw + 4 * i);
            st.x[t][4 * i] = v.x;
            st.x[t][4 * i + 1] = v.y;
            st.x[t][4 * i + 2] = v.z;
            st.x[t][4 * i + 3] = v.w;
          }
        }
      } else {
        // Word 16 s + 4 i + c of the block for B register i of step s (xw points at word c).
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          if (full || k0 + 32 * s < K) {
#pragma unroll
            for (int i = 0; i < 4; ++i) st.x[t][4 * s + i] = __ldg(xw + 16 * s + 4 * i);
          }
        }
      }
    }
    if (cur.kb + split < nkb) {
      cur.codes += split * C::PACKET;
      cur.meta += split * 256;
      cur.scales += split * 8;
#pragma unroll
      for (int t = 0; t < (x_in_ring<NT, XD>() ? NT : 0); ++t) cur.x[t] += split * (KB / 2);
    }
    cur.kb += split;
  }

  // A register f of step s: pair p = 4 s + f of the lane's piece.
  static __device__ __forceinline__ uint32_t a_pair(const St& st, int s, int f, const uint32_t (&mul)[4],
                                                    const uint32_t (&add)[4], const uint32_t (&mask)[4],
                                                    uint32_t magic) {
    const int p = 4 * s + f;
    const int u = p / C::PPW, j = p % C::PPW;
    const int bit = C::BITS * j;
    const int within = bit % Num<T>::WITHIN;
    const int sh = bit - within;
    // within is 0, 2, 4 or 6 (a multiple of 2): index by within / 2.
    const uint32_t v = and_or(st.w[u] >> sh, mask[within / 2], magic);
    return fma2<T>(v, mul[within / 2], add[within / 2]);
  }

  // part += this block's products: the codes (A) of stage `st`, the x words (B) of stage `sx` (the same
  // stage, or the stage of the warp's first tile in `accumulate_mt`).
  static __device__ __forceinline__ void compute_ax(const St& st, const St& sx, float (&part)[NT][4],
                                                    const uint32_t (&mul)[4], const uint32_t (&add)[4],
                                                    const uint32_t (&mask)[4], uint32_t magic) {
#pragma unroll
    for (int s = 0; s < C::STEPS; ++s) {
      uint32_t a[4];
#pragma unroll
      for (int f = 0; f < 4; ++f) a[f] = a_pair(st, s, f, mul, add, mask, magic);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if constexpr (C::sparse) {
          const uint32_t b[4] = {sx.x[t][4 * s], sx.x[t][4 * s + 1], sx.x[t][4 * s + 2], sx.x[t][4 * s + 3]};
          mma32sp<T>(part[t], a, b, st.m[s]);
        } else {
          mma16<T>(part[t], a, sx.x[t][2 * s], sx.x[t][2 * s + 1]);
        }
      }
    }
  }

  // part += this block's products.
  static __device__ __forceinline__ void compute(const St& st, float (&part)[NT][4],
                                                 const uint32_t (&mul)[4], const uint32_t (&add)[4],
                                                 const uint32_t (&mask)[4], uint32_t magic) {
    compute_ax(st, st, part, mul, add, mask, magic);
  }

  // part += this block's products for the wide tiles (x not in the ring): each step's x words are loaded
  // right before its mma (quant: one 16-byte load per n-tile and pair of steps; sparse24: 4 words per
  // n-tile and step), from L1 (x is read by every row tile of the delta). `xb` points at this lane's first
  // x word of block `kb` in input row 0 of the item; row 8 t + g is read (clamped to `rows - 1`). x words
  // past K are not loaded but taken as 0 (the codes there are the zero point: the weights are exactly 0).
  static __device__ __forceinline__ void compute_wide(const St& st, float (&part)[NT][4],
                                                      const uint32_t (&mul)[4], const uint32_t (&add)[4],
                                                      const uint32_t (&mask)[4], uint32_t magic,
                                                      const unsigned int* xb, uint32_t rows, uint32_t K,
                                                      uint32_t kb, uint32_t lane) {
    const uint32_t g = lane / 4, c = lane % 4;
    const uint32_t k0 = kb * KB, words = K / 2;
    const bool full = k0 + KB <= K;  // uniform: only the last block of a row can be partial
    if constexpr (!C::sparse) {
      const bool in = full || k0 + 32 * c < K;  // the lane's 32 columns: all in or all out
#pragma unroll
      for (int s2 = 0; s2 < C::STEPS / 2; ++s2) {
        uint32_t a0[4], a1[4];
#pragma unroll
        for (int f = 0; f < 4; ++f) {
          a0[f] = a_pair(st, 2 * s2, f, mul, add, mask, magic);
          a1[f] = a_pair(st, 2 * s2 + 1, f, mul, add, mask, magic);
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const unsigned int* xw = xb + size_t(min(uint32_t(8 * t) + g, rows - 1)) * words;
          const uint4 v = in ? ldg16(xw + 4 * s2) : make_uint4(0u, 0u, 0u, 0u);
          mma16<T>(part[t], a0, v.x, v.y);
          mma16<T>(part[t], a1, v.z, v.w);
        }
      }
    } else {
#pragma unroll
      for (int s = 0; s < C::STEPS; ++s) {
        uint32_t a[4];
#pragma unroll
        for (int f = 0; f < 4; ++f) a[f] = a_pair(st, s, f, mul, add, mask, magic);
        const bool in = full || k0 + 32 * s < K;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const unsigned int* xw = xb + size_t(min(uint32_t(8 * t) + g, rows - 1)) * words + 16 * s;
          uint32_t b[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) b[i] = in ? __ldg(xw + 4 * i) : 0u;
          mma32sp<T>(part[t], a, b, st.m[s]);
        }
      }
    }
  }

  // Points the cursor's streams at packet `first` (row tile * blocks + block), this lane's place in it.
  static __device__ __forceinline__ void codes_at(Cur& cur, const DzDelta& d, size_t first,
                                                  uint32_t lane) {
    const uint32_t g = lane / 4, c = lane % 4;
    cur.codes = reinterpret_cast<const uint8_t*>(d.parts[0]) + first * C::PACKET +
                (C::PIECE >= 16 ? lane * 16 : lane * C::PIECE);
    cur.meta = reinterpret_cast<const uint8_t*>(d.parts[1]) + first * 256 + (2 * g + (c & 1)) * 16;
    cur.scales = reinterpret_cast<const uint32_t*>(d.parts[2]) + first * 8 + g;
  }

  // Decode constants: v * 2^-within - (magic * 2^-within + z), per within = 0, 2, 4, 6.
  static __device__ __forceinline__ void decode_constants(uint32_t bits, uint32_t (&mul)[4], uint32_t (&add)[4],
                                                          uint32_t (&mask)[4]) {
    const float z = float(1u << (bits - 1));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float m = 1.f / float(1u << (2 * i));
      mask[i] = C::MASK << (2 * i);
      mul[i] = pair_of<T>(m, m);
      add[i] = pair_of<T>(-(Num<T>::MAGIC_F * m + z), -(Num<T>::MAGIC_F * m + z));
    }
  }

  // acc += a block's products `p`, scaled by its scale word (rows g and g + 8).
  static __device__ __forceinline__ void add_scaled(float (&acc)[NT][4], const float (&p)[NT][4], uint32_t sw) {
    const float sa = __half2float(__ushort_as_half(uint16_t(sw & 0xFFFFu)));
    const float sb = __half2float(__ushort_as_half(uint16_t(sw >> 16)));
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      acc[t][0] = fmaf(sa, p[t][0], acc[t][0]);
      acc[t][1] = fmaf(sa, p[t][1], acc[t][1]);
      acc[t][2] = fmaf(sb, p[t][2], acc[t][2]);
      acc[t][3] = fmaf(sb, p[t][3], acc[t][3]);
    }
  }

  // acc += sum over this warp's blocks of K (part, part + split, ...) of x[i][k] D[r][k], for the 16 stored
  // rows of tile `rt` and the `rows` (<= 8 NT) rows of x (unscaled by the global scale).
  static __device__ __forceinline__ void accumulate(const DzDelta& d, const T* x, uint32_t rows, uint32_t rt,
                                                    uint32_t part, uint32_t split, float (&acc)[NT][4]) {
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t g = lane / 4, c = lane % 4;
    const uint32_t K = d.k;
    const uint32_t nkb = (K + KB - 1) / KB;
    // The cursor at this warp's first block (part), this lane's place in it.
    Cur cur;
    cur.kb = part;
    const uint32_t wk0 = min(part, nkb - 1);  // a warp with no block of its own still loads in bounds
    codes_at(cur, d, size_t(rt) * nkb + wk0, lane);
#pragma unroll
    for (int t = 0; t < (x_in_ring<NT, XD>() ? NT : 0); ++t) {
      const T* row = x + size_t(min(uint32_t(8 * t) + g, rows - 1)) * K + size_t(wk0) * KB;
      cur.x[t] = reinterpret_cast<const unsigned int*>(row) + (C::sparse ? c : 16 * c);
    }
    // The wide tiles' x: this lane's first word in input row 0 (compute_wide adds the row and the block).
    const unsigned int* xl = reinterpret_cast<const unsigned int*>(x) + (C::sparse ? c : 16 * c);

    uint32_t mul[4], add[4], mask[4];
    decode_constants(d.bits, mul, add, mask);
    const uint32_t magic = Num<T>::MAGIC;

    St ring[D];
#pragma unroll
    for (int i = 0; i < D; ++i) {
#pragma unroll
      for (int t = 0; t < (x_in_ring<NT, XD>() ? NT : 0); ++t)
#pragma unroll
        for (int j = 0; j < C::XW; ++j) ring[i].x[t][j] = 0;  // x words past K stay finite (zero)
      load(ring[i], cur, nkb, K, lane, split);
    }
    for (uint32_t kb0 = part; kb0 < nkb; kb0 += D * split) {
#pragma unroll
      for (int i = 0; i < D; ++i) {
        const uint32_t kb = kb0 + i * split;
        if (kb >= nkb) break;
        float p[NT][4];
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) p[t][e] = 0.f;
        if constexpr (x_in_ring<NT, XD>()) {
          compute(ring[i], p, mul, add, mask, magic);
        } else {
          compute_wide(ring[i], p, mul, add, mask, magic, xl + size_t(kb) * (KB / 2), rows, K, kb, lane);
        }
        add_scaled(acc, p, ring[i].s);
        load(ring[i], cur, nkb, K, lane, split);
      }
    }
  }

  // The decode sbmm's pair (session 19, `_sbmm_p2_`): acc[i] += the products of tile
  // `rt + i` (the last tile where that is past it: computed, not stored), i < MT, as `accumulate` does for
  // one tile, each x word loaded once for the MT tiles (it rides in the first tile's stages; the others
  // carry codes, metadata and scale only). Two streams of codes a warp, each ring PAIR_DEPTH blocks deep.
  // Each tile's sums are added in the order `accumulate` adds them, so the outputs are the same bits.
  //
  // PF > 0 (`_sbmm_p2f<PF>_`, session 21): lane 0 also asks L2 for each tile's block PF blocks (of this warp's)
  // ahead of the one computed, so the ring's loads meet L2 instead of DRAM: the loads in flight a warp are
  // bounded by the ring's registers, the prefetches by nothing the warp holds. The sums are the same.
  // Measured on the H200 (session 21): 13-27% slower than PF = 0 (L2 hits 8% -> 35%, DRAM 70% -> 60-62%
  // of peak): an experiment, off by default.
  template <int MT, int PF = 0>
  static __device__ __forceinline__ void accumulate_mt(const DzDelta& d, const T* x, uint32_t rows, uint32_t rt,
                                                       uint32_t part, uint32_t split, float (&acc)[MT][NT][4]) {
    static_assert(x_in_ring<NT, XD>(), "the pair keeps x in its first tile's ring");
    constexpr int DP = PAIR_DEPTH;
    static_assert(PF == 0 || PF > DP, "a prefetch reaches past the ring");
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t g = lane / 4, c = lane % 4;
    const uint32_t K = d.k;
    const uint32_t nkb = (K + KB - 1) / KB;
    const uint32_t last_tile = (d.n_stored + 15) / 16 - 1;
    Cur cur[MT];
    const uint32_t wk0 = min(part, nkb - 1);  // a warp with no block of its own still loads in bounds
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      cur[i].kb = part;
      codes_at(cur[i], d, size_t(min(rt + i, last_tile)) * nkb + wk0, lane);
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const T* row = x + size_t(min(uint32_t(8 * t) + g, rows - 1)) * K + size_t(wk0) * KB;
      cur[0].x[t] = reinterpret_cast<const unsigned int*>(row) + (C::sparse ? c : 16 * c);
    }
    uint32_t mul[4], add[4], mask[4];
    decode_constants(d.bits, mul, add, mask);
    const uint32_t magic = Num<T>::MAGIC;

    St ring[DP][MT];
#pragma unroll
    for (int r = 0; r < DP; ++r) {
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int j = 0; j < C::XW; ++j) ring[r][0].x[t][j] = 0;  // x words past K stay finite (zero)
      load(ring[r][0], cur[0], nkb, K, lane, split);
#pragma unroll
      for (int i = 1; i < MT; ++i) load_stream(ring[r][i], cur[i], nkb, split);
    }
    // The cursors are at block part + DP split now: prefetch blocks DP .. PF - 1 of the warp's.
    if constexpr (PF > 0) {
      if (lane == 0) {
        for (uint32_t j = DP; j < PF && part + j * split < nkb; ++j) {
#pragma unroll
          for (int i = 0; i < MT; ++i) prefetch_block(cur[i], (j - DP) * split);
        }
      }
    }
    for (uint32_t kb0 = part; kb0 < nkb; kb0 += DP * split) {
#pragma unroll
      for (int r = 0; r < DP; ++r) {
        const uint32_t kb = kb0 + r * split;
        if (kb >= nkb) break;
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          float p[NT][4];
          zero(p);
          compute_ax(ring[r][i], ring[r][0], p, mul, add, mask, magic);
          add_scaled(acc[i], p, ring[r][i].s);
        }
        load(ring[r][0], cur[0], nkb, K, lane, split);
#pragma unroll
        for (int i = 1; i < MT; ++i) load_stream(ring[r][i], cur[i], nkb, split);
        // Block kb + PF split; the cursors are at kb + (DP + 1) split (moved on, not held at the last
        // block, whenever the prefetched block exists).
        if constexpr (PF > 0) {
          if (lane == 0 && kb + PF * split < nkb) {
#pragma unroll
            for (int i = 0; i < MT; ++i) prefetch_block(cur[i], (PF - DP - 1) * split);
          }
        }
      }
    }
  }

  // Lane 0 only (its stream pointers are the block's first bytes): L2 prefetch of the codes, metadata and
  // scale words of the block `ahead` blocks past the cursor's.
  static __device__ __forceinline__ void prefetch_block(const Cur& cur, uint32_t ahead) {
    prefetch_l2(cur.codes + size_t(ahead) * C::PACKET, C::PACKET);
    if constexpr (C::sparse) prefetch_l2(cur.meta + size_t(ahead) * 256, 256);
    prefetch_l2(cur.scales + size_t(ahead) * 8, 32);
  }

  // Moves the cursor's streams (codes, metadata, scale word; not x) `split` blocks on; they stay on the row
  // tile's last block once past it (as `load` moves them).
  static __device__ __forceinline__ void advance_stream(Cur& cur, uint32_t nkb, uint32_t split) {
    if (cur.kb + split < nkb) {
      cur.codes += split * C::PACKET;
      cur.meta += split * 256;
      cur.scales += split * 8;
    }
    cur.kb += split;
  }

  // The stream loads of the cursor's block (no x), then the cursor `split` blocks on.
  static __device__ __forceinline__ void load_stream(St& st, Cur& cur, uint32_t nkb, uint32_t split) {
    load_codes(st, cur);
    advance_stream(cur, nkb, split);
  }

  // out[i][col(r)] = base[i][col(r)] + global_scale * acc for the 16 stored rows of tile `rt` and the `rows`
  // (<= 8 NT) rows of x (base may alias out).
  static __device__ __forceinline__ void store(const DzDelta& d, uint32_t rows, const T* base, T* out, uint32_t rt,
                                               const float (&acc)[NT][4]) {
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t g = lane / 4, c = lane % 4;
    const uint32_t last = d.n_stored - 1;
    const uint32_t ra = rt * 16 + g, rb = ra + 8;
    const uint32_t col_a = ra <= last ? output_col(d, ra) : 0, col_b = rb <= last ? output_col(d, rb) : 0;
    const float gs = d.global_scale;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t n = 8 * t + 2 * c + (e & 1);
        const bool lower = e >= 2;
        if (n >= rows || (lower ? rb : ra) > last) continue;
        const size_t o = size_t(n) * d.n_total + (lower ? col_b : col_a);
        const float v = acc[t][e] * gs;
        const float bv = base ? to_f32(base[o]) : 0.f;
        out[o] = from_f32<T>(bv + v);
      }
    }
  }
};

// Sums `acc` over each group of `split` consecutive warps of the block (1, 2, 4 or 8; uniform) through
// shared memory; true on each group's first warp, which then holds the sum. Every warp of the block must
// call it (it has barriers when split > 1).
template <int NT>
__device__ __forceinline__ bool reduce_split(float (&acc)[NT][4], uint32_t split, float* red) {
  if (split == 1) return true;
  const uint32_t wk = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t p = wk % split;
  __syncthreads();  // `red` is free (an earlier item of this block has read it)
  if (p > 0) {
    float* dst = red + (wk * 32 + lane) * NT * 4;
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[t * 4 + e] = acc[t][e];
  }
  __syncthreads();
  if (p > 0) return false;
  for (uint32_t w = 1; w < split; ++w) {
    const float* src = red + ((wk + w) * 32 + lane) * NT * 4;
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][e] += src[t * 4 + e];
  }
  return true;
}

// matmul: the work is `x_tiles * tiles` items (tile of 8 NT input rows, 16-row tile of the delta),
// x-tile-major, split over `split` warps each along K as in the sbmm below, grid-stride over a 1-D grid.
// Split 8 with one block per item is session 7-10's launch shape (8 warps on one tile); the host picks the
// most warps per item that keep the launch within one wave (a 13824 x 5120 delta has 864 tiles: split 2
// runs it in one wave of 20-block streams per warp, where 8 warps a tile ran 3.3 waves of 5-block streams:
// 15.4 vs 21.5 us on the H200).
template <class C, typename T, int NT>
__device__ __forceinline__ void matmul_add(const DzDelta& d, const T* x, const T* base, T* out, uint32_t m,
                                           uint32_t split) {
  __shared__ float red[WK * 32 * NT * 4];
  const uint32_t wk = threadIdx.x / 32;
  const uint32_t per_block = WK / split;
  const uint32_t tiles = (d.n_stored + 15) / 16;
  const uint64_t items = uint64_t((m + 8 * NT - 1) / (8 * NT)) * tiles;
  for (uint64_t first = uint64_t(blockIdx.x) * per_block; first < items; first += uint64_t(gridDim.x) * per_block) {
    const uint64_t item = first + wk / split;
    const bool live = item < items;
    const uint32_t xt = live ? uint32_t(item / tiles) : 0, rt = live ? uint32_t(item % tiles) : 0;
    const uint32_t i0 = xt * 8 * NT;
    const uint32_t rows = min(uint32_t(8 * NT), m - i0);
    float acc[NT][4];
    zero(acc);
    if (live) Tile<C, T, NT>::accumulate(d, x + size_t(i0) * d.k, rows, rt, wk % split, split, acc);
    if (reduce_split<NT>(acc, split, red) && live) {
      const size_t o = size_t(i0) * d.n_total;
      Tile<C, T, NT>::store(d, rows, base ? base + o : nullptr, out + o, rt, acc);
    }
  }
}

// The work of an sbmm launch is `n_segs * tiles` items (segment, 16-row tile of its delta), segment-major
// (consecutive items share x). Each item is split over `split` warps along K (1, 2, 4 or 8, chosen by the
// host), so a block takes WK / split consecutive items at a time, grid-stride. With split 1 a warp streams
// a whole tile row of K (32 blocks at K = 4096) with no barrier and no reduction: session 9's one launch
// shape (8 warps x 4 blocks of K per item, then a shared-memory reduction) spent most of each short block
// in its prologue and reduction (32 deltas x 1 row: 36-39% of copy bandwidth).
//
// MT > 1, the decode tile only (`dz_v4_<variant>_sbmm_p2_<t>_n1`, MT = 2; session 19, the default decode
// sbmm since): an item is MT consecutive tiles of a segment (`n_segs * ceil(tiles / MT)` items), a warp
// running `Tile::accumulate_mt`. Why: 2b 2:4 deltas served as fast as 4b 2:4 ones in session 19 (half the
// bytes), and the one-tile sbmm ran at 61% of DRAM bandwidth with 25% occupancy and long-scoreboard stalls
// (session 15's ncu): bound by each warp's chain of loads, decodes and mma, not by bytes. Two tiles a warp
// make two independent chains and load each x word once for both (x was 4 of a block's 7 load
// instructions). Session 19 on the H200: 0.61-0.89x the one-tile kernel's time for 16-64 deltas.
//
// The split word `sw` (session 21's tail split): bits 0-3 the split of items [0, head), bits 4-7 the split of
// items [head, items) (0: every item at the first split, grid-stride), bits 8-31 `head`. With a tail split,
// blocks [0, head / (WK / split)) take the head's items at its split and the rest the tail's at the tail's,
// one round (the host's grid covers every item; `head` a multiple of WK / the head's split). Why: a launch
// of 1.2 waves of items ran as two rounds of whole K chains (20 deltas x 1 row of 4096 x 4096: 58.4 us
// against 38.5 for 16 deltas, one wave); splitting only the last, partial wave's items along K shortens
// that second round.
template <class C, typename T, int NT, int XD = 0, int MT = 1, int PF = 0>
__device__ __forceinline__ void sbmm(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas, const T* x,
                                     T* out, uint32_t k, uint32_t n_total, uint32_t tiles, uint32_t sw) {
  __shared__ float red[WK * 32 * MT * NT * 4];
  const uint32_t wk = threadIdx.x / 32;
  const uint32_t units = (tiles + MT - 1) / MT;  // items a segment
  const uint64_t items = uint64_t(n_segs) * units;
  const uint32_t head_split = sw & 15u, tail_split = (sw >> 4) & 15u;
  uint32_t split = head_split;
  uint64_t start = uint64_t(blockIdx.x) * (WK / split), end = items;
  uint64_t stride = uint64_t(gridDim.x) * (WK / split);
  if (tail_split != 0) {
    const uint32_t head = sw >> 8, head_blocks = head / (WK / head_split);
    if (blockIdx.x < head_blocks) {
      end = head;
    } else {
      split = tail_split;
      start = head + uint64_t(blockIdx.x - head_blocks) * (WK / split);
    }
    stride = items;  // one round
  }
  for (uint64_t first = start; first < end; first += stride) {
    const uint64_t item = first + wk / split;
    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) zero(acc[i]);
    bool live = false;
    uint32_t rt = 0;
    DzSegment seg{};
    if (item < end) {
      seg = segs[item / units];
      rt = uint32_t(item % units) * MT;
      live = rt * 16 < deltas[seg.delta].n_stored;
    }
    // The descriptor is read where it is used (not copied and kept live across the K loop: registers).
    if (live) {
      const T* xs = x + size_t(seg.start) * k;
      if constexpr (MT == 1) {
        Tile<C, T, NT, XD>::accumulate(deltas[seg.delta], xs, seg.len, rt, wk % split, split, acc[0]);
      } else {
        Tile<C, T, NT, XD>::template accumulate_mt<MT, PF>(deltas[seg.delta], xs, seg.len, rt, wk % split,
                                                           split, acc);
      }
    }
    if (reduce_split<MT * NT>(reinterpret_cast<float(&)[MT * NT][4]>(acc), split, red) && live) {
      T* o = out + size_t(seg.start) * n_total;
#pragma unroll
      for (int i = 0; i < MT; ++i) Tile<C, T, NT, XD>::store(deltas[seg.delta], seg.len, o, o, rt + i, acc[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// sbmm with x staged in shared memory (`dz_v4_<variant>_sbmm_sx_<t>_n<NT>`; the host takes it with
// `set_v4_sbmm_smem_x(true)`, off by default). Experimental: written in session 10 after the measurements
// (bench/kernels/V4.md). Session 11 on the H200: correct, but slower than split 1 (32 deltas x 32 rows:
// 88-93 vs 75-77 us; ncu: 94 vs 86 us, barrier stall ratio 3100, DRAM 47% vs 51% of peak).
//
// Why: the split-1 sbmm keeps each K block's x words (16 a lane and n-tile) in its load ring next to the
// codes, so the ring holds 3 blocks (25 registers a stage); ncu showed 23% warps active with long-scoreboard
// stalls. Here the block's 8 warps take 8 consecutive tiles of one segment (the host launches this only
// when every item is split 1, the tiles are a multiple of 8 and every delta of the launch has the same
// stored rows), so they share x: the block copies x into shared memory a chunk of XC K-blocks at a time
// (cp.async, double-buffered, one barrier pair per chunk), and the ring holds only codes, metadata and the
// scale word (9 registers a stage), D blocks deep. The x words each lane reads from shared memory are the
// words the global version reads (same rows, clamped at `rows - 1`; same offsets in the block); columns past
// K are staged as zeros (their codes are the zero point).
template <int NT>
constexpr int sx_chunk_blocks() {
  return NT == 1 ? 8 : 4;  // 8 x 1024 or 16 x 512 bf16 a chunk: 2 buffers ~33 KB
}
template <int NT>
constexpr int sx_depth() {
  return NT == 1 ? 8 : 4;  // divides the chunk, so chunk boundaries fall on the ring's round starts
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, uint32_t src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <class C, typename T, int NT>
struct SxTile {
  using Tl = Tile<C, T, NT>;
  static constexpr int XC = sx_chunk_blocks<NT>();
  static constexpr int XR = 8 * NT;                 // staged x rows
  static constexpr int STRIDE = XC * KB / 2 + 4;    // words a staged row: = 4 (mod 32), rows g on distinct banks
  static constexpr int BUF = XR * STRIDE;           // words a buffer
  static constexpr int D = sx_depth<NT>();
  static_assert(XC % D == 0, "chunk boundaries must fall on round starts");

  // Chunk `ch` of the segment's x into `buf` (every thread of the block takes part): row r = x row
  // min(r, rows - 1), columns ch XC KB .. + XC KB, those past K zero. K is a multiple of 32, so a 16-byte
  // piece (8 elements) is all in or all out; an out piece copies 0 bytes from a valid address.
  static __device__ __forceinline__ void stage(uint32_t* buf, const T* x, uint32_t rows, uint32_t K, uint32_t ch) {
    constexpr uint32_t PIECES = XC * KB / 8;  // 16-byte pieces a row
    for (uint32_t p = threadIdx.x; p < XR * PIECES; p += blockDim.x) {
      const uint32_t r = p / PIECES, q = p % PIECES;
      const uint32_t col = ch * XC * KB + q * 8;
      const T* src = x + size_t(min(r, rows - 1)) * K + min(col, K - 8);
      cp_async16(buf + r * STRIDE + q * 4, src, col < K ? 16u : 0u);
    }
  }

  // Block j (of the chunk in `buf`) of x into the stage's x words, as Tile::load reads them from global memory.
  static __device__ __forceinline__ void x_from(Stage<C, NT>& st, const uint32_t* buf, uint32_t j, uint32_t lane) {
    const uint32_t g = lane / 4, c = lane % 4;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const uint32_t* row = buf + (8 * t + g) * STRIDE + j * (KB / 2);
      if constexpr (!C::sparse) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint4 v = *reinterpret_cast<const uint4*>(row + 16 * c + 4 * i);
          st.x[t][4 * i] = v.x;
          st.x[t][4 * i + 1] = v.y;
          st.x[t][4 * i + 2] = v.z;
          st.x[t][4 * i + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
          for (int i = 0; i < 4; ++i) st.x[t][4 * s + i] = row[16 * s + 4 * i + c];
      }
    }
  }

  // acc += this warp's whole K row of tile `rt` (split 1), x from the block's staged chunks in `xs` (two
  // buffers). Every warp of the block calls it with the same delta shape (the barriers).
  static __device__ __forceinline__ void accumulate(const DzDelta& d, const T* x, uint32_t rows, uint32_t rt,
                                                    uint32_t* xs, float (&acc)[NT][4]) {
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t K = d.k;
    const uint32_t nkb = (K + KB - 1) / KB;
    const uint32_t nchunks = (nkb + XC - 1) / XC;
    Cursor<C, T, NT> cur;
    cur.kb = 0;
    Tl::codes_at(cur, d, size_t(rt) * nkb, lane);
    uint32_t mul[4], add[4], mask[4];
    Tl::decode_constants(d.bits, mul, add, mask);
    const uint32_t magic = Num<T>::MAGIC;

    Stage<C, NT> ring[D];
#pragma unroll
    for (int i = 0; i < D; ++i) {
      Tl::load_codes(ring[i], cur);
      Tl::advance_stream(cur, nkb, 1);
    }
    __syncthreads();  // the buffers are free (an earlier item of this block has read them)
    stage(xs, x, rows, K, 0);
    cp_async_commit();
    for (uint32_t kb0 = 0; kb0 < nkb; kb0 += D) {
      const uint32_t ch = kb0 / XC;
      if (kb0 % XC == 0) {
        if (ch > 0) __syncthreads();  // chunk ch - 1 read by every warp: its buffer takes chunk ch + 1
        if (ch + 1 < nchunks) stage(xs + ((ch + 1) % 2) * BUF, x, rows, K, ch + 1);
        cp_async_commit();    // (an empty group past the last chunk keeps the count)
        cp_async_wait_one();  // this thread's copies of chunk ch have landed
        __syncthreads();      // and every thread's
      }
      const uint32_t* buf = xs + (ch % 2) * BUF;
#pragma unroll
      for (int i = 0; i < D; ++i) {
        const uint32_t kb = kb0 + i;
        if (kb >= nkb) break;
        x_from(ring[i], buf, kb % XC, lane);
        float p[NT][4];
        zero(p);
        Tl::compute(ring[i], p, mul, add, mask, magic);
        Tl::add_scaled(acc, p, ring[i].s);
        Tl::load_codes(ring[i], cur);
        Tl::advance_stream(cur, nkb, 1);
      }
    }
  }
};

// The launch: a 1-D grid over the items in groups of WK (each a block: consecutive tiles of one segment),
// grid-stride; the host guarantees tiles % WK == 0, so a group never spans two segments.
template <class C, typename T, int NT>
__device__ __forceinline__ void sbmm_sx(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas, const T* x,
                                        T* out, uint32_t k, uint32_t n_total, uint32_t tiles) {
  __shared__ __align__(16) uint32_t xs[2 * SxTile<C, T, NT>::BUF];
  const uint32_t wk = threadIdx.x / 32;
  const uint64_t items = uint64_t(n_segs) * tiles;
  for (uint64_t first = uint64_t(blockIdx.x) * WK; first < items; first += uint64_t(gridDim.x) * WK) {
    const DzSegment seg = segs[first / tiles];
    const uint32_t rt = uint32_t(first % tiles) + wk;
    float acc[NT][4];
    zero(acc);
    SxTile<C, T, NT>::accumulate(deltas[seg.delta], x + size_t(seg.start) * k, seg.len, rt, xs, acc);
    T* o = out + size_t(seg.start) * n_total;
    if (rt * 16 < deltas[seg.delta].n_stored) Tile<C, T, NT>::store(deltas[seg.delta], seg.len, o, o, rt, acc);
  }
}

// The 16-byte piece q of a staged x row sits at piece wide_swz(q) (see WideSx below: quarter warps of the quant
// loads on 8 distinct bank groups).
__device__ __forceinline__ uint32_t wide_swz(uint32_t q) { return q ^ (((q >> 3) & 1u) << 1); }

// part[i] += block j (of the staged x rows in `buf`, as `wide_compute` below) of a warp's products for
// MT consecutive 16-row tiles of the delta, tile i's stage in `st[i]` (session 18): the tiles share every
// B fragment of x (one ldmatrix or 16-byte load for MT mma).
// Nsight Compute on the 32-row tile (MT = 1) at 128 rows of 11008 x 4096 put L1 (shared memory) at 73% of
// its peak, the busiest unit, and the x fragments are ~3/4 of its traffic there.
template <class C, typename T, int STRIDE, int NT, int MT>
__device__ __forceinline__ void wide_compute_mt(const Stage<C, NT> (&st)[MT], float (&part)[MT][NT][4],
                                                const uint32_t (&mul)[4], const uint32_t (&add)[4],
                                                const uint32_t (&mask)[4], uint32_t magic, const uint32_t* buf,
                                                uint32_t j, uint32_t lane) {
  using Tl = Tile<C, T, NT>;
  const uint32_t g = lane / 4, c = lane % 4;
  if constexpr (!C::sparse) {
#pragma unroll
    for (int s2 = 0; s2 < C::STEPS / 2; ++s2) {
      uint32_t a0[MT][4], a1[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int f = 0; f < 4; ++f) {
          a0[i][f] = Tl::a_pair(st[i], 2 * s2, f, mul, add, mask, magic);
          a1[i][f] = Tl::a_pair(st[i], 2 * s2 + 1, f, mul, add, mask, magic);
        }
      // Words 16 c + 4 s2 .. + 3 of the block (the re-laid quant order: lane c's 32 columns).
      const uint32_t* at = buf + wide_swz(16 * j + 4 * c + s2) * 4;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const uint4 v = *reinterpret_cast<const uint4*>(at + (8 * t + g) * STRIDE);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma16<T>(part[i][t], a0[i], v.x, v.y);
          mma16<T>(part[i][t], a1[i], v.z, v.w);
        }
      }
    }
  } else {
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(buf));
    const uint32_t lr = lane % 8, li = lane / 8;  // the ldmatrix row this lane addresses: matrix li, row lr
#pragma unroll
    for (int s = 0; s < C::STEPS; ++s) {
      uint32_t a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int f = 0; f < 4; ++f) a[i][f] = Tl::a_pair(st[i], s, f, mul, add, mask, magic);
      const uint32_t piece = wide_swz(16 * j + 4 * s + li);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        uint32_t b[4];
        const uint32_t addr = base + ((8 * t + lr) * STRIDE + piece * 4) * 4;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                     : "r"(addr));
#pragma unroll
        for (int i = 0; i < MT; ++i) mma32sp<T>(part[i][t], a[i], b, st[i].m[s]);
      }
    }
  }
}

// part += block j (of the staged x rows in `buf`, STRIDE words apart, pieces swizzled by `wide_swz`) of a
// warp's products for the 32-row tile (NT = 4) or the 64-row one (NT = 8), the stage's codes already in
// registers: the shared-memory half of WideSx (x double-buffered in chunks) and WideSxd (x and codes in one
// ring of K blocks). One tile of the delta: `wide_compute_mt` with MT = 1.
template <class C, typename T, int STRIDE, int NT = 4>
__device__ __forceinline__ void wide_compute(const Stage<C, NT>& st, float (&part)[NT][4], const uint32_t (&mul)[4],
                                             const uint32_t (&add)[4], const uint32_t (&mask)[4], uint32_t magic,
                                             const uint32_t* buf, uint32_t j, uint32_t lane) {
  wide_compute_mt<C, T, STRIDE, NT, 1>(reinterpret_cast<const Stage<C, NT>(&)[1]>(st),
                                       reinterpret_cast<float(&)[1][NT][4]>(part), mul, add, mask, magic, buf, j,
                                       lane);
}

// ---------------------------------------------------------------------------------------------------------
// The 32-row matmul tile with x staged in shared memory (`dz_v4_<variant>_matmul_sx_<t>_n4`; issue #5, rows
// 17-256; written in session 12 without a GPU). The 32-row tile above loads each lane's x words from global
// memory right before its mma: every 16-row tile of the delta reads the whole x tile again through L1 (32
// rows x 256 B a K block, 4x the code bytes), and those loads touch 8 rows (8 to 16 cache lines) an
// instruction. Here a block's 8 warps take 8 consecutive row tiles of one x tile, each its whole K row
// (no split, no reduction), and share x: the block copies it into shared memory a chunk of XC K blocks at a
// time (cp.async, double-buffered, one barrier pair a chunk; as the sbmm's `SxTile`), and each mma's B
// fragment comes from there: sparse24 with one ldmatrix.x4 (exactly the m16n8k32 B fragment: matrix i =
// columns 8 i .. 8 i + 7 of the step), quant with one 16-byte load a pair of steps. Rows are 132 words
// apart (4 mod 32: the 8 rows of an ldmatrix phase on distinct banks) and the 16-byte pieces of a row are
// swizzled (piece q at q ^ 2 ((q >> 3) & 1)) so that the quant loads (lane (g, c): piece 4 c + s2) hit 8
// distinct bank groups in each quarter warp. Rows past `rows` and columns past K are staged as zeros (a
// 0-byte copy from a valid address: nothing is read; session 15 found 8-12 rows slower than 32 when those
// rows copied row `rows - 1`, 24 rows of every block reading the same bytes). Launched where there are
// enough blocks of 8 tiles to fill the GPU (the host's rule).
// `NT_ = 8` (session 17): the 64-row tile, `dz_v4_<variant>_matmul_sx_<t>_n8` below.
template <class C, typename T, int NT_ = 4>
struct WideSx {
  static constexpr int NT = NT_;
  using Tl = Tile<C, T, NT>;
  static constexpr int XC = 2;                    // K blocks a chunk
  static constexpr int XR = 8 * NT;               // staged x rows
  static constexpr int PIECES = XC * KB / 8;      // 16-byte pieces a row
  static constexpr int STRIDE = XC * KB / 2 + 4;  // words a staged row: 4 (mod 32)
  static constexpr int BUF = XR * STRIDE;         // words a buffer
  static constexpr int D = 2;                     // the code ring's depth; divides XC
  static_assert(XC % D == 0, "chunk boundaries must fall on round starts");

  static __device__ __forceinline__ uint32_t swz(uint32_t q) { return wide_swz(q); }

  // Chunk `ch` of the x tile into `buf` (every thread of the block takes part).
  static __device__ __forceinline__ void stage(uint32_t* buf, const T* x, uint32_t rows, uint32_t K, uint32_t ch) {
    for (uint32_t p = threadIdx.x; p < XR * PIECES; p += blockDim.x) {
      const uint32_t r = p / PIECES, q = p % PIECES;
      const uint32_t col = ch * XC * KB + q * 8;
      const T* src = x + size_t(min(r, rows - 1)) * K + min(col, K - 8);
      cp_async16(buf + r * STRIDE + swz(q) * 4, src, col < K && r < rows ? 16u : 0u);
    }
  }

  // acc[i] += this warp's K blocks `kb_lo .. kb_hi` (whole chunks: `kb_lo` a multiple of XC; `0 .. nkb` for
  // the whole K row) of tile `rt + i` (the last tile where that is past it: computed, not stored) against the
  // block's x tile (`rows` rows at `x`), for i < MT. Every warp of the block calls it with the same x tile,
  // delta and range (the barriers). MT > 1 (session 18): the MT tiles share each x fragment
  // (`wide_compute_mt`), their codes in MT rings DM blocks deep.
  template <int MT, int DM>
  static __device__ __forceinline__ void accumulate_mt(const DzDelta& d, const T* x, uint32_t rows, uint32_t rt,
                                                       uint32_t* xs, float (&acc)[MT][NT][4], uint32_t kb_lo,
                                                       uint32_t kb_hi) {
    static_assert(XC % DM == 0, "chunk boundaries must fall on round starts");
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t K = d.k;
    const uint32_t nkb = (K + KB - 1) / KB;
    const uint32_t last_tile = (d.n_stored + 15) / 16 - 1;
    const uint32_t ch_lo = kb_lo / XC, ch_end = (kb_hi + XC - 1) / XC;
    Cursor<C, T, NT> cur[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      cur[i].kb = kb_lo;
      Tl::codes_at(cur[i], d, size_t(min(rt + i, last_tile)) * nkb + kb_lo, lane);
    }
    uint32_t mul[4], add[4], mask[4];
    Tl::decode_constants(d.bits, mul, add, mask);
    const uint32_t magic = Num<T>::MAGIC;

    Stage<C, NT> ring[DM][MT];
#pragma unroll
    for (int r = 0; r < DM; ++r)
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        Tl::load_codes(ring[r][i], cur[i]);
        Tl::advance_stream(cur[i], kb_hi, 1);
      }
    __syncthreads();  // the buffers are free (an earlier x tile of this block has been read)
    stage(xs, x, rows, K, ch_lo);
    cp_async_commit();
    for (uint32_t kb0 = kb_lo; kb0 < kb_hi; kb0 += DM) {
      const uint32_t ch = kb0 / XC;
      if (kb0 % XC == 0) {
        if (ch > ch_lo) __syncthreads();  // chunk ch - 1 read by every warp: its buffer takes chunk ch + 1
        if (ch + 1 < ch_end) stage(xs + ((ch + 1 - ch_lo) % 2) * BUF, x, rows, K, ch + 1);
        cp_async_commit();    // (an empty group past the last chunk keeps the count)
        cp_async_wait_one();  // this thread's copies of chunk ch have landed
        __syncthreads();      // and every thread's
      }
      const uint32_t* buf = xs + ((ch - ch_lo) % 2) * BUF;
#pragma unroll
      for (int r = 0; r < DM; ++r) {
        const uint32_t kb = kb0 + r;
        if (kb >= kb_hi) break;
        float p[MT][NT][4];
#pragma unroll
        for (int i = 0; i < MT; ++i) zero(p[i]);
        wide_compute_mt<C, T, STRIDE, NT, MT>(ring[r], p, mul, add, mask, magic, buf, kb % XC, lane);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          Tl::add_scaled(acc[i], p[i], ring[r][i].s);
          Tl::load_codes(ring[r][i], cur[i]);
          Tl::advance_stream(cur[i], kb_hi, 1);
        }
      }
    }
  }

  // acc += this warp's K blocks `kb_lo .. kb_hi` of tile `rt`: `accumulate_mt` with MT = 1.
  static __device__ __forceinline__ void accumulate(const DzDelta& d, const T* x, uint32_t rows, uint32_t rt,
                                                    uint32_t* xs, float (&acc)[NT][4], uint32_t kb_lo,
                                                    uint32_t kb_hi) {
    accumulate_mt<1, D>(d, x, rows, rt, xs, reinterpret_cast<float(&)[1][NT][4]>(acc), kb_lo, kb_hi);
  }
};

// The 32-row tile's launch walk (`matmul_sx`, `matmul_sxd`): a 1-D grid over blocks of (x tile of 32 rows, 8
// consecutive 16-row tiles), x-tile-major, grid-stride. A warp past the last tile computes the last tile
// again (in bounds, so that it keeps the block's barriers) and stores nothing. MT > 1 (the balanced
// schedule's pair tile, session 18): a warp takes MT consecutive tiles, a block 8 MT.
template <int NT, int MT = 1>
struct WideWalk {
  uint32_t tiles, groups;
  uint64_t blocks;

  struct Item {
    uint32_t i0, rows, rt;  // the x tile's first row and rows, this warp's 16-row tile
  };

  __device__ __forceinline__ WideWalk(const DzDelta& d, uint32_t m)
      : tiles((d.n_stored + 15) / 16),
        groups((tiles + WK * MT - 1) / (WK * MT)),
        blocks(uint64_t((m + 8 * NT - 1) / (8 * NT)) * groups) {}

  // Block `b`'s item for this warp.
  __device__ __forceinline__ Item item(uint64_t b, uint32_t m) const {
    const uint32_t i0 = uint32_t(b / groups) * 8 * NT;
    return {i0, min(uint32_t(8 * NT), m - i0), (uint32_t(b % groups) * WK + threadIdx.x / 32) * MT};
  }

  // The tile this warp computes (its own, or the last one past the end).
  __device__ __forceinline__ uint32_t tile(const Item& it) const { return min(it.rt, tiles - 1); }

  // out (= base +) acc for the item, when this warp has a tile of its own.
  template <class C, typename T>
  __device__ __forceinline__ void store(const DzDelta& d, const Item& it, const T* base, T* out,
                                        const float (&acc)[NT][4]) const {
    if (it.rt < tiles) {
      const size_t o = size_t(it.i0) * d.n_total;
      Tile<C, T, NT>::store(d, it.rows, base ? base + o : nullptr, out + o, it.rt, acc);
    }
  }

  // The same for each of the warp's MT tiles (tile rt + i from acc[i]).
  template <class C, typename T>
  __device__ __forceinline__ void store_mt(const DzDelta& d, const Item& it, const T* base, T* out,
                                           const float (&acc)[MT][NT][4]) const {
#pragma unroll
    for (int i = 0; i < MT; ++i) store<C, T>(d, {it.i0, it.rows, it.rt + i}, base, out, acc[i]);
  }
};

// MT 16-row tiles a warp (code rings DM deep) on the plain grid-stride launch: the 32-row tile unsplit
// (MT = 1: `matmul_sx` with S = 1) and the pair tile (MT = 2, `dz_v4_<variant>_matmul_sxq_<t>_n4`; session
// 18, after the balanced schedule below showed a fixed cost of its own on the 32-row tile; session 19:
// slower than the balanced pair tile): blocks of (x tile of 32 rows, 8 MT consecutive 16-row tiles), whole K
// rows, no workspace.
template <class C, typename T, int MT, int DM>
__device__ __forceinline__ void matmul_sx_mt(const DzDelta& d, const T* x, const T* base, T* out, uint32_t m) {
  using W = WideSx<C, T>;
  constexpr int NT = W::NT;
  __shared__ __align__(16) uint32_t xs[2 * W::BUF];
  const WideWalk<NT, MT> walk(d, m);
  const uint32_t nkb = (d.k + KB - 1) / KB;
  for (uint64_t b = blockIdx.x; b < walk.blocks; b += gridDim.x) {
    const auto it = walk.item(b, m);
    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) zero(acc[i]);
    W::template accumulate_mt<MT, DM>(d, x + size_t(it.i0) * d.k, it.rows, walk.tile(it), xs, acc, 0, nkb);
    walk.template store_mt<C, T>(d, it, base, out, acc);
  }
}

// The sum of an item cut between blocks (the K split's ranks in `matmul_sx`, the balanced schedule's blocks
// in `matmul_sxb`): blocks `r0 .. r1` each hold the partial sums of a share of the item's K, `P` floats a
// thread. Each writes its own to its slot (`slot(r)`: this thread's first word of block r's partials, word
// e at `slot(r) + e blockDim.x`, so a warp's stores are coalesced), fences, and counts itself in at
// `counter` (zero at launch). The block that counts last adds the partials in block order (its own, block
// `me`'s, from registers) into `sum` and returns true: the same inputs give the same bits whichever block
// finishes last. Every thread of the block calls it (barriers).
template <int P, typename I, class SlotOf>
__device__ __forceinline__ bool sum_cut_item(const float (&acc)[P], uint32_t* counter, I r0, I r1, I me, SlotOf slot,
                                             float (&sum)[P]) {
  float* mine = slot(me);
#pragma unroll
  for (int e = 0; e < P; ++e) __stcg(mine + e * blockDim.x, acc[e]);
  __threadfence();  // this thread's sums are visible GPU-wide before the block counts itself in
  __shared__ uint32_t last;
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == uint32_t(r1 - r0);
  __syncthreads();
  if (!last) return false;
  __threadfence();  // the other blocks' sums, fenced before their counts, are read after ours
#pragma unroll
  for (int e = 0; e < P; ++e) sum[e] = 0.f;
  for (I r = r0; r <= r1; ++r) {
    const float* p = slot(r);
#pragma unroll
    for (int e = 0; e < P; ++e) sum[e] += r == me ? acc[e] : __ldcg(p + e * blockDim.x);
  }
  return true;
}

// `matmul_sx` (S = 1, `dz_v4_<variant>_matmul_sx_<t>_n4`: `matmul_sx_mt` with one tile a warp) and its K
// split over S blocks (`dz_v4_<variant>_matmul_sxk<S>_<t>_n4`; issue #5). Nsight Compute on the S = 1 kernel at 4096 x 4096
// (session 13): 32 blocks for 132 SMs at 32 rows, 12% occupancy, 7% of the DRAM bandwidth, and the same
// 21 us at 128 rows with 128 blocks: the time is one block's K loop. With S > 1 the S consecutive blocks of
// an item (ranks 0 .. S - 1) take the same x tile and 8 row tiles, each a 1/S share of the K blocks in
// whole chunks. Session 13 reduced the shares in a cluster (distributed shared memory): 31.2 us at 32 rows,
// though `_sx` over a quarter of K alone takes 10.8 (session 14's probe). Here the ranks' partial sums meet
// through `ws` (global memory, so L2) in `sum_cut_item`: the rank that counts in last at `counters[item]`
// (zero before the launch) adds them in rank order and stores `out` (= base +) once.
// `ws`: S x 16 floats a thread of each item (`v4_matmul_sxk_workspace` on the host), laid out so that a
// warp's stores are coalesced. The grid is S x the items, grid-stride.
template <class C, typename T, int S>
__device__ __forceinline__ void matmul_sx(const DzDelta& d, const T* x, const T* base, T* out, uint32_t m,
                                          float* ws = nullptr, uint32_t* counters = nullptr) {
  if constexpr (S == 1) {
    matmul_sx_mt<C, T, 1, WideSx<C, T>::D>(d, x, base, out, m);
  } else {
    constexpr int NT = WideSx<C, T>::NT;
    constexpr int XC = WideSx<C, T>::XC;
    constexpr uint32_t PART = NT * 4;  // partial sums a thread
    __shared__ __align__(16) uint32_t xs[2 * WideSx<C, T>::BUF];
    const WideWalk<NT> walk(d, m);
    const uint32_t nkb = (d.k + KB - 1) / KB;
    const uint32_t rank = blockIdx.x % S;
    const uint32_t per = ((nkb + XC - 1) / XC + S - 1) / S * XC;  // K blocks a rank: whole chunks
    const uint32_t kb_lo = min(rank * per, nkb);
    const uint32_t kb_hi = min(kb_lo + per, nkb);
    for (uint64_t b = blockIdx.x / S; b < walk.blocks; b += gridDim.x / S) {
      const auto it = walk.item(b, m);
      float acc[NT][4];
      zero(acc);
      if (kb_lo < kb_hi) {
        WideSx<C, T>::accumulate(d, x + size_t(it.i0) * d.k, it.rows, walk.tile(it), xs, acc, kb_lo, kb_hi);
      }
      // Rank r's sums of item b: word e of thread t at ((b S + r) PART + e) blockDim + t.
      const size_t item0 = size_t(b) * S * PART * blockDim.x + threadIdx.x;
      const auto slot = [&](uint32_t r) { return ws + item0 + size_t(r) * PART * blockDim.x; };
      float sum[NT][4];
      if (sum_cut_item(reinterpret_cast<const float(&)[PART]>(acc), counters + b, 0u, uint32_t(S - 1), rank, slot,
                       reinterpret_cast<float(&)[PART]>(sum))) {
        walk.template store<C, T>(d, it, base, out, sum);
      }
    }
  }
}

// The balanced schedule of the shared-x tiles (`matmul_sxb<NT>`; session 18, written after Nsight Compute on
// the H200): the 64-row tile (`dz_v4_<variant>_matmul_sx_<t>_n8`, NT = 8) and the 32-row tile's balanced
// entry (`dz_v4_<variant>_matmul_sxb_<t>_n4`, NT = 4). Session 18 measured the 64-row tile (session 17's
// grid-stride launch of ceil(m / 64) x ceil(tiles / 8) blocks) no faster than the 32-row one: at 128 rows
// of 11008 x 4096 4-bit 2:4 its 172 blocks filled 0.65 of a wave (40 SMs ran two blocks, 92 one: 57.6 us),
// and the 32-row tile's 344 blocks 1.30 waves (51.2 us; ncu: "the partial wave may account for up to 50%
// of the runtime"). Per unit of work the 64-row tile was ~15% cheaper, but the whole-item blocks left SMs
// idle at the end.
//
// Here the work is cut into units of one chunk (XC = 2 K blocks) of one item (x tile, 8 consecutive
// 16-row tiles), item-major: U = items x nch units. The grid is G blocks (the host launches at most as
// many as are resident at once, so no block waits for another wave), and block g takes units
// [g U / G, (g + 1) U / G): every block the same work to within one chunk. A block walks its range item by
// item (each piece a `WideSx::accumulate` over whole chunks, all 8 warps in step as there). An item inside
// one block's range is stored directly. An item cut between blocks g0 .. g1 is summed as the K split's
// (`sum_cut_item`: each writes its partial sums to a slot of `ws`, and the block that counts in last at
// `counters[item]` adds them in block order), so the output's bits do not depend on which block finishes
// last. A block cuts at most two items (the first and the last of its range), so `ws` has two
// slots a block: slot 2 g for the item its range starts in, 2 g + 1 for the one it ends in
// (`v4_matmul_sxb_workspace` on the host: counters for every item, then 2 G slots of MT x NT x 4 floats
// a thread). x is double-buffered in dynamic shared memory (`V4_MATMUL_SX64_SMEM` / `V4_MATMUL_SXB_SMEM`).
// ptxas -v (nvcc 13.0, sm_90): the 64-row sparse24 entries fit 128 registers without spills (2 blocks an
// SM); the 64-row quant ones spilled there (24-100 bytes), so they take 1 block an SM (179-199 registers
// on the balanced schedule).
struct SxbPartition {
  uint64_t units, grid;
  uint32_t nch;
  // The block whose range holds unit u: the largest g with g U / G <= u.
  __device__ __forceinline__ uint64_t block_of(uint64_t u) const { return ((u + 1) * grid - 1) / units; }
  __device__ __forceinline__ uint64_t first_unit(uint64_t g) const { return g * units / grid; }
  // Block g's slot for its partial sums of item b (which it cuts).
  __device__ __forceinline__ uint64_t slot(uint64_t g, uint64_t b) const {
    return 2 * g + (first_unit(g) / nch == b ? 0 : 1);
  }
};

template <class C, typename T, int NT, int MT = 1, int DM = WideSx<C, T, NT>::D>
__device__ __forceinline__ void matmul_sxb(const DzDelta& d, const T* x, const T* base, T* out, uint32_t m,
                                           float* ws, uint32_t* counters) {
  using W = WideSx<C, T, NT>;
  constexpr uint32_t XC = W::XC;
  constexpr uint32_t PART = MT * NT * 4;  // partial sums a thread
  extern __shared__ __align__(16) uint32_t xs_dyn[];
  const WideWalk<NT, MT> walk(d, m);
  const uint32_t nkb = (d.k + KB - 1) / KB;
  const uint32_t nch = (nkb + XC - 1) / XC;
  const SxbPartition part{walk.blocks * nch, gridDim.x, nch};
  const uint64_t g = blockIdx.x;
  const uint64_t u_end = part.first_unit(g + 1);
  for (uint64_t u = part.first_unit(g); u < u_end;) {
    const uint64_t b = u / nch;
    const uint64_t item_lo = b * nch, item_end = item_lo + nch;
    const uint64_t e = min(u_end, item_end);
    const uint32_t kb_lo = uint32_t(u - item_lo) * XC, kb_hi = min(uint32_t(e - item_lo) * XC, nkb);
    const auto it = walk.item(b, m);
    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) zero(acc[i]);
    W::template accumulate_mt<MT, DM>(d, x + size_t(it.i0) * d.k, it.rows, walk.tile(it), xs_dyn, acc, kb_lo, kb_hi);
    const uint64_t g0 = part.block_of(item_lo), g1 = part.block_of(item_end - 1);
    if (g0 == g1) {
      walk.template store_mt<C, T>(d, it, base, out, acc);
    } else {
      // Slot s's sums: word e of thread t at (s PART + e) blockDim + t.
      const auto slot = [&](uint64_t r) { return ws + size_t(part.slot(r, b)) * PART * blockDim.x + threadIdx.x; };
      float sum[MT][NT][4];
      if (sum_cut_item(reinterpret_cast<const float(&)[PART]>(acc), counters + b, g0, g1, g, slot,
                       reinterpret_cast<float(&)[PART]>(sum))) {
        walk.template store_mt<C, T>(d, it, base, out, sum);
      }
    }
    u = e;
  }
}

// ---------------------------------------------------------------------------------------------------------
// The 32-row matmul tile with x AND the codes in shared memory, a deep ring of K blocks
// (`dz_v4_<variant>_matmul_sxd_<t>_n4`; issue #5, written in session 12 after the `_sx` measurements,
// without a GPU; the host takes it only when forced, `V4WideX::SharedDeep`). `_sx` ran 4096 x 4096 at
// ~1500 cycles a K block and warp from 32 to 128 rows, flat: with one block an SM (32-128 blocks for 132
// SMs) only 8 warps x 1-2 blocks of codes were in flight (6-13 KB for 4-bit 2:4, against ~26 KB to cover
// DRAM latency at full bandwidth), and its register ring could not go deeper (120-128 registers).
//
// Here the codes, metadata and scale words of each warp's K block go to shared memory by cp.async as well,
// next to the block's x block, in one ring of R stages of one K block each (CUTLASS's multistage shape):
// stage = the 32 staged x rows of the block (68 words apart: 4 mod 32; pieces swizzled as WideSx's, so
// `wide_compute` reads them unchanged with j = 0) + each warp's packet bytes, metadata slots and scale
// words, byte for byte as in global memory (a lane then reads its piece, slot and word at the offsets of
// the global loads: the 16-byte piece reads are 512 contiguous bytes a warp, conflict-free). At block kb a
// thread waits for its group of block kb (cp.async.wait_group R - 2), the block meets at ONE barrier (every
// thread's copies of kb have landed, and every warp is done with block kb - 1, whose stage is refilled
// now), issues the copies of block kb + R - 1 (one commit group a block, empty past the last), then
// computes kb from shared memory: R - 1 K blocks of codes and x in flight per warp, and no register ring
// (the codes move to registers right before their decode). R is the most stages that keep 2 blocks an SM
// (2 x (R stage bytes + 1 KB reserved) <= 228 KB): quant4 6 (17152 B a stage), sparse24-4 7 (15104 B),
// the 2-bit codecs 8 (13056 B); ~103-106 KB of dynamic shared memory a block, which the host grants
// (cuFuncSetAttribute) and passes at launch; the kernel traps if it gets less (`v4_matmul_sxd_smem` on the
// host computes the same number).
// One warp's stream of a delta tile through shared memory (WideSxd's per-warp part of a stage, RingTile's
// slots): each K block's packet bytes, metadata slots and scale words, byte for byte as in global memory,
// copied by cp.async as 16-byte pieces (piece p of a block at word 4 p), then read by each lane at the
// offsets of the global loads (Tile::load_codes, codes_at).
template <class C>
struct WarpStream {
  static constexpr int META = C::sparse ? 256 : 0;
  static constexpr int BYTES = C::PACKET + META + 32;  // a block's bytes (packet, meta, scales)
  static constexpr int PIECES = BYTES / 16;
  static constexpr int WORDS = BYTES / 4;
  static constexpr int N = (PIECES + 31) / 32;  // pieces a lane copies a block (at most)
  static_assert(BYTES % 16 == 0, "16-byte pieces");

  // The lane's pieces at the tile's block 0 (null: none) and their bytes from one block to the next
  // (packet, 256 or 32).
  struct Copies {
    const uint8_t* src[N];
    uint32_t step[N];
  };

  static __device__ __forceinline__ Copies copies(const DzDelta& d, size_t packet0, uint32_t lane) {
    Copies cp;
    const uint8_t* codes = reinterpret_cast<const uint8_t*>(d.parts[0]) + packet0 * C::PACKET;
    const uint8_t* meta = reinterpret_cast<const uint8_t*>(d.parts[1]) + packet0 * 256;
    const uint8_t* scales = reinterpret_cast<const uint8_t*>(d.parts[2]) + packet0 * 32;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const uint32_t p = lane + 32 * i;
      constexpr uint32_t P0 = C::PACKET / 16, P1 = P0 + META / 16;
      cp.src[i] = p < P0                   ? codes + p * 16
                  : p < P1                 ? meta + (p - P0) * 16
                  : p < uint32_t(PIECES) ? scales + (p - P1) * 16
                                           : nullptr;
      cp.step[i] = p < P0 ? C::PACKET : p < P1 ? 256 : 32;
    }
    return cp;
  }

  // The lane's copies of K block kb to `cw` (the warp's words for that block).
  static __device__ __forceinline__ void load(uint32_t* cw, const Copies& cp, uint32_t kb, uint32_t lane) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (32 * (i + 1) <= PIECES || cp.src[i] != nullptr) {
        cp_async16(cw + 4 * (lane + 32 * i), cp.src[i] + size_t(kb) * cp.step[i], 16u);
      }
    }
  }

  // The lane's codes, metadata and scale word of the block at `cw`.
  template <int NT>
  static __device__ __forceinline__ void codes_from(Stage<C, NT>& s, const uint32_t* cw, uint32_t lane) {
    const uint32_t g = lane / 4, c = lane % 4;
    if constexpr (C::PIECE >= 16) {
#pragma unroll
      for (int i = 0; i < C::PIECE / 16; ++i) {
        const uint4 v = *reinterpret_cast<const uint4*>(cw + i * 128 + lane * 4);
        s.w[4 * i] = v.x;
        s.w[4 * i + 1] = v.y;
        s.w[4 * i + 2] = v.z;
        s.w[4 * i + 3] = v.w;
      }
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(cw + lane * 2);
      s.w[0] = v.x;
      s.w[1] = v.y;
    }
    if constexpr (C::sparse) {
      const uint4 v = *reinterpret_cast<const uint4*>(cw + C::PACKET / 4 + (2 * g + (c & 1)) * 4);
      s.m[0] = v.x;
      s.m[1] = v.y;
      s.m[2] = v.z;
      s.m[3] = v.w;
    }
    s.s = cw[(C::PACKET + META) / 4 + g];
  }
};

template <class C>
constexpr int sxd_stages() {
  return C::BITS == 4 ? (C::sparse ? 7 : 6) : 8;
}

template <class C, typename T>
struct WideSxd {
  static constexpr int NT = 4;
  using Tl = Tile<C, T, NT>;
  static constexpr int XR = 8 * NT;               // staged x rows
  static constexpr int XPIECES = KB / 8;          // 16-byte pieces of a staged row (one K block)
  static constexpr int STRIDE = KB / 2 + 4;       // words a staged row: 4 (mod 32)
  static constexpr int XWORDS = XR * STRIDE;      // x words a stage
  using Stream = WarpStream<C>;
  static constexpr int CWORDS = Stream::WORDS;        // a warp's stream words a block
  static constexpr int STAGE = XWORDS + WK * CWORDS;  // words a stage
  static constexpr int R = sxd_stages<C>();
  static constexpr uint32_t SMEM = uint32_t(R) * STAGE * 4;  // dynamic shared memory bytes a block
  static_assert((XWORDS * 4) % 16 == 0, "16-byte pieces");
  static_assert(2 * (SMEM + 1024) <= 228 * 1024, "two blocks an SM");
  static_assert((XR * XPIECES) % (WK * 32) == 0, "x pieces split evenly over the block's threads");

  static constexpr int XN = XR * XPIECES / (WK * 32);  // x pieces a thread copies a block (2)

  // What a thread copies each block, worked out once an item: its x pieces (column piece q of rows
  // r0 + 16 i; 256 threads = 16 rows x 16 pieces, so q is the same for both) and its stream pieces.
  struct Copies {
    const T* xsrc;            // row r0 (clamped at `rows - 1`), column 8 q of block 0 (clamped at K - 8)
    uint32_t xrow;            // elements from row r0's source to row r0 + 16's (clamped)
    uint32_t xdst;            // words into a stage of row r0's piece
    uint32_t xcol;            // 8 q
    typename Stream::Copies stream;  // the lane's stream pieces
  };

  static __device__ __forceinline__ Copies copies(const DzDelta& d, const T* x, uint32_t rows, uint32_t K,
                                                  size_t packet0, uint32_t lane) {
    static_assert(XN == 2 && XPIECES == 16, "the x copies assume 16 rows x 16 pieces a pass");
    Copies cp;
    const uint32_t r0 = threadIdx.x / XPIECES, q = threadIdx.x % XPIECES;
    cp.xsrc = x + size_t(min(r0, rows - 1)) * K + min(q * 8, K - 8);  // (= 8 q wherever a piece is in)
    cp.xrow = (min(r0 + 16, rows - 1) - min(r0, rows - 1)) * K;
    cp.xdst = r0 * STRIDE + wide_swz(q) * 4;
    cp.xcol = q * 8;
    cp.stream = Stream::copies(d, packet0, lane);
    return cp;
  }

  // The copies of K block kb into stage `st` (words): every thread its share of the x block (rows clamped
  // at `rows - 1`, columns past K zero: K is a multiple of 32, so a piece is all in or all out, and an out
  // piece copies 0 bytes from block 0's valid address), each warp its tile's packet, metadata slots and
  // scale words, byte for byte (piece p of the lane at word 4 p of the warp's part of the stage).
  static __device__ __forceinline__ void load(uint32_t* st, const Copies& cp, uint32_t K, uint32_t kb,
                                              uint32_t lane) {
    const bool in = kb * KB + cp.xcol < K;
    const T* xs = cp.xsrc + (in ? kb * KB : 0u);
    cp_async16(st + cp.xdst, xs, in ? 16u : 0u);
    cp_async16(st + cp.xdst + 16 * STRIDE, xs + cp.xrow, in ? 16u : 0u);
    Stream::load(st + XWORDS + (threadIdx.x / 32) * CWORDS, cp.stream, kb, lane);
  }

  // The lane's codes, metadata and scale word of the warp's block in stage `st`.
  static __device__ __forceinline__ void codes_from(Stage<C, NT>& s, const uint32_t* st, uint32_t lane) {
    Stream::template codes_from<NT>(s, st + XWORDS + (threadIdx.x / 32) * CWORDS, lane);
  }

  // acc += this warp's whole K row of tile `rt` against the block's x tile (`rows` rows at `x`), through
  // the ring in `ring` (R stages). Every warp of the block calls it with the same x tile and delta (the
  // barriers).
  static __device__ __forceinline__ void accumulate(const DzDelta& d, const T* x, uint32_t rows, uint32_t rt,
                                                    uint32_t* ring, float (&acc)[NT][4]) {
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t K = d.k;
    const uint32_t nkb = (K + KB - 1) / KB;
    const size_t packet0 = size_t(rt) * nkb;
    uint32_t mul[4], add[4], mask[4];
    Tl::decode_constants(d.bits, mul, add, mask);
    const uint32_t magic = Num<T>::MAGIC;

    const Copies cp = copies(d, x, rows, K, packet0, lane);
    __syncthreads();  // the ring is free (an earlier x tile of this block has been read)
#pragma unroll
    for (int i = 0; i < R - 1; ++i) {
      if (uint32_t(i) < nkb) load(ring + i * STAGE, cp, K, i, lane);
      cp_async_commit();  // (an empty group past the last block keeps the count)
    }
    uint32_t cur = 0;      // the stage of block kb
    uint32_t nxt = R - 1;  // the stage of block kb + R - 1
    for (uint32_t kb = 0; kb < nkb; ++kb) {
      cp_async_wait<R - 2>();  // this thread's copies of block kb have landed
      __syncthreads();         // and every thread's; every warp is done with block kb - 1 (stage nxt)
      const uint32_t ahead = kb + R - 1;
      if (ahead < nkb) load(ring + nxt * STAGE, cp, K, ahead, lane);
      cp_async_commit();
      const uint32_t* st = ring + cur * STAGE;
      Stage<C, NT> s;
      codes_from(s, st, lane);
      float p[NT][4];
      zero(p);
      wide_compute<C, T, STRIDE>(s, p, mul, add, mask, magic, st, 0, lane);
      Tl::add_scaled(acc, p, s.s);
      cur = cur + 1 == uint32_t(R) ? 0 : cur + 1;
      nxt = nxt + 1 == uint32_t(R) ? 0 : nxt + 1;
    }
  }
};

__device__ __forceinline__ uint32_t dynamic_smem_bytes() {
  uint32_t v;
  asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(v));
  return v;
}

// The launch: `WideWalk`'s (as matmul_sx), the ring in WideSxd::SMEM bytes of dynamic shared memory.
template <class C, typename T>
__device__ __forceinline__ void matmul_sxd(const DzDelta& d, const T* x, const T* base, T* out, uint32_t m) {
  using W = WideSxd<C, T>;
  constexpr int NT = W::NT;
  extern __shared__ __align__(16) uint32_t dz_v4_dyn[];
  if (dynamic_smem_bytes() < W::SMEM) __trap();  // the host launched it with too little (a host bug)
  const WideWalk<NT> walk(d, m);
  for (uint64_t b = blockIdx.x; b < walk.blocks; b += gridDim.x) {
    const auto it = walk.item(b, m);
    float acc[NT][4];
    zero(acc);
    W::accumulate(d, x + size_t(it.i0) * d.k, it.rows, walk.tile(it), dz_v4_dyn, acc);
    walk.template store<C, T>(d, it, base, out, acc);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The decode sbmm (8-row tile, split 1) with each warp's codes in its OWN ring in shared memory
// (`dz_v4_<variant>_sbmm_ring_<t>_n1`; issue #5, written in session 12 without a GPU; the host takes it
// only with `set_v4_sbmm_ring(true)`). Session 11's ncu of the split-1 sbmm (32 deltas x 1 row): DRAM 51% of
// peak, 23% warps active, long-scoreboard stalls: 16 warps an SM with a 3-deep register ring of code loads
// (512-1056 B a block) do not keep enough bytes in flight, and 120 registers leave no room for a deeper
// ring. `_sbmm_sx_` (x in shared memory, a block-wide barrier pair a chunk) lost to barrier stalls.
//
// Here a warp copies its item's packet bytes, metadata slots and scale words of each K block into its own
// region of dynamic shared memory by cp.async (byte for byte as in global memory, WideSxd's per-warp part
// of a stage), R blocks deep, and synchronizes only with itself: at block kb a lane waits for its commit
// group of block kb (cp.async.wait_group R - 2), the warp meets at __syncwarp (every lane's copies of kb
// have landed; every lane is done reading block kb - 1, whose slot is refilled now with block kb + R - 1),
// then the lane moves its codes to registers and computes kb. No block barrier anywhere in the K loop: the
// warps of a block run unrelated items. x (1-8 rows) stays as in the register ring of the split-1 kernel:
// loaded D = 3 blocks ahead into registers (from L1/L2), the loop unrolled by D. Every item is computed by
// one warp over its whole K row, as the split-1 sbmm, with the same per-block sums (decode, then
// acc += scale * block sum), so the results are bit-identical to it.
template <class C>
constexpr int ring_stages() {
  return 8;  // 7 K blocks of codes in flight a warp; 8 warps x 8 x 1056 B = 66 KB a block at most
}

template <class C, typename T>
struct RingTile {
  static constexpr int NT = 1;
  using Tl = Tile<C, T, NT>;
  using Stream = WarpStream<C>;
  static constexpr int CWORDS = Stream::WORDS;  // a warp's stream words a block
  static constexpr int R = ring_stages<C>();
  static constexpr int WARP_WORDS = R * CWORDS;                 // a warp's ring
  static constexpr uint32_t SMEM = uint32_t(WK) * WARP_WORDS * 4;  // dynamic shared memory bytes a block
  static constexpr int DX = depth<NT>();                        // x blocks in registers ahead (3)
  static_assert(2 * (SMEM + 1024) <= 228 * 1024, "two blocks an SM");

  // x words of block kb (clamped at the last block) for this lane, as Tile::load reads them: `xp` is the
  // lane's first word of block 0 in its row. Words past K are not loaded (the registers keep older finite
  // values: the codes there are the zero point).
  static __device__ __forceinline__ void load_x(uint32_t (&xw)[C::XW], const unsigned int* xp, uint32_t kb,
                                                uint32_t nkb, uint32_t K, uint32_t lane) {
    const uint32_t c = lane % 4;
    const uint32_t kbc = min(kb, nkb - 1);
    const uint32_t k0 = kbc * KB;
    const bool full = k0 + KB <= K;
    const unsigned int* w = xp + size_t(kbc) * (KB / 2);
    if constexpr (!C::sparse) {
      if (full || k0 + 32 * c < K) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint4 v = ldg16(w + 4 * i);
          xw[4 * i] = v.x;
          xw[4 * i + 1] = v.y;
          xw[4 * i + 2] = v.z;
          xw[4 * i + 3] = v.w;
        }
      }
    } else {
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        if (full || k0 + 32 * s < K) {
#pragma unroll
          for (int i = 0; i < 4; ++i) xw[4 * s + i] = __ldg(w + 16 * s + 4 * i);
        }
      }
    }
  }

  // acc += this warp's whole K row of tile `rt` against the `rows` (<= 8) rows of x at `x`, the codes
  // through the warp's ring `ring` (WARP_WORDS words).
  static __device__ __forceinline__ void accumulate(const DzDelta& d, const T* x, uint32_t rows, uint32_t rt,
                                                    uint32_t* ring, float (&acc)[NT][4]) {
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t g = lane / 4, c = lane % 4;
    const uint32_t K = d.k;
    const uint32_t nkb = (K + KB - 1) / KB;
    uint32_t mul[4], add[4], mask[4];
    Tl::decode_constants(d.bits, mul, add, mask);
    const uint32_t magic = Num<T>::MAGIC;
    const typename Stream::Copies cp = Stream::copies(d, size_t(rt) * nkb, lane);
    const unsigned int* xp = reinterpret_cast<const unsigned int*>(x + size_t(min(g, rows - 1)) * K) +
                             (C::sparse ? c : 16 * c);

    __syncwarp();  // the ring is free (every lane has read the warp's previous item)
#pragma unroll
    for (int i = 0; i < R - 1; ++i) {
      if (uint32_t(i) < nkb) Stream::load(ring + i * CWORDS, cp, i, lane);
      cp_async_commit();  // (an empty group past the last block keeps the count)
    }
    uint32_t xr[DX][C::XW];
#pragma unroll
    for (int i = 0; i < DX; ++i) {
#pragma unroll
      for (int j = 0; j < C::XW; ++j) xr[i][j] = 0;  // x words past K stay finite (zero)
      load_x(xr[i], xp, i, nkb, K, lane);
    }
    uint32_t cur = 0;      // the slot of block kb
    uint32_t nxt = R - 1;  // the slot of block kb + R - 1
    for (uint32_t kb0 = 0; kb0 < nkb; kb0 += DX) {
#pragma unroll
      for (int i = 0; i < DX; ++i) {
        const uint32_t kb = kb0 + i;
        if (kb >= nkb) break;
        cp_async_wait<R - 2>();  // this lane's copies of block kb have landed
        __syncwarp();            // and every lane's; every lane is done with block kb - 1 (slot nxt)
        const uint32_t ahead = kb + R - 1;
        if (ahead < nkb) Stream::load(ring + nxt * CWORDS, cp, ahead, lane);
        cp_async_commit();
        Stage<C, NT> s;
        Stream::template codes_from<NT>(s, ring + cur * CWORDS, lane);
#pragma unroll
        for (int j = 0; j < C::XW; ++j) s.x[0][j] = xr[i][j];
        float p[NT][4];
        zero(p);
        Tl::compute(s, p, mul, add, mask, magic);
        Tl::add_scaled(acc, p, s.s);
        load_x(xr[i], xp, kb + DX, nkb, K, lane);
        cur = cur + 1 == uint32_t(R) ? 0 : cur + 1;
        nxt = nxt + 1 == uint32_t(R) ? 0 : nxt + 1;
      }
    }
  }
};

// The launch: the split-1 sbmm's items (segment, 16-row tile), one a warp, grid-stride over a 1-D grid of
// ceil(n_segs * tiles / 8) blocks at most; the warps of a block never wait on each other. Each warp's ring
// is its WARP_WORDS of RingTile::SMEM bytes of dynamic shared memory.
template <class C, typename T>
__device__ __forceinline__ void sbmm_ring(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas, const T* x,
                                          T* out, uint32_t k, uint32_t n_total, uint32_t tiles) {
  using W = RingTile<C, T>;
  extern __shared__ __align__(16) uint32_t dz_v4_dyn[];
  if (dynamic_smem_bytes() < W::SMEM) __trap();  // the host launched it with too little (a host bug)
  const uint32_t wk = threadIdx.x / 32;
  uint32_t* ring = dz_v4_dyn + wk * W::WARP_WORDS;
  const uint64_t items = uint64_t(n_segs) * tiles;
  for (uint64_t item = uint64_t(blockIdx.x) * WK + wk; item < items; item += uint64_t(gridDim.x) * WK) {
    const DzSegment seg = segs[item / tiles];
    const uint32_t rt = uint32_t(item % tiles);
    if (rt * 16 >= deltas[seg.delta].n_stored) continue;  // uniform over the warp
    float acc[1][4];
    zero(acc);
    W::accumulate(deltas[seg.delta], x + size_t(seg.start) * k, seg.len, rt, ring, acc);
    T* o = out + size_t(seg.start) * n_total;
    Tile<C, T, 1>::store(deltas[seg.delta], seg.len, o, o, rt, acc);
  }
}

// out = base + D (base may be null: out = D), for a delta without a row subset: the dense delta decoded
// from the v4 bytes, each value by the SPEC formula ((q - z) * s) * global_scale in f32, then added to base
// and rounded once (bit-identical to the generic `dequantize` kernels). One warp per packet (rt, kb), the
// inverse of the re-layout: pair p of lane (g, c) is register f = p % 4 of step s = p / 4; quant: columns
// 32 c + 4 s + 2 (f >> 1) + {0, 1} of row 16 rt + g + 8 (f & 1); sparse24: the two kept entries of run
// 8 s + c + 4 (f >> 1) of the block, at the positions of its metadata nibble (slot 2 g + (f >> 1), word s,
// nibble c, high half for rows g + 8), the run's other two entries 0. The CPU twin is dz-candle-ops'
// `relayout::dequantize_v4`.
//
// Decoded in place, a lane's values land on 8 rows and scattered columns: every store touched its own
// sector, and 4096 x 4096 took 142 us on the H200 (~1 ms for quant g128), ~10x its bytes' time (session
// 9). So the packet goes through shared memory, 8 rows (one half, f & 1) at a time, and is written row
// by row, each lane 4 consecutive columns: a warp's store covers 128 consecutive columns. The staging
// index (rows 132 words apart, one more word per 32 columns) keeps the quant decode's writes and the row
// reads free of bank conflicts (sparse24's writes: 2-way). An emulation of both versions' index
// arithmetic (every element written once, the same values) is in bench/kernels/emu_v4_dequantize.py. Every element of rows < n_stored and columns < K is written exactly once
// (the padding past them is skipped).
constexpr int DQ_WARPS = 8;  // V4_DEQUANTIZE_THREADS / 32 (the entry points launch 256 threads)
constexpr int DQ_STRIDE = KB + 4;  // staging words per row: 4 (mod 32) keeps rows g = 0..7 apart; col >> 5 fits

__device__ __forceinline__ uint32_t dq_at(uint32_t row, uint32_t col) { return row * DQ_STRIDE + col + (col >> 5); }

// Four consecutive elements of T, aligned as one vector access (8 bytes for f16 / bf16, 16 for f32).
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

// Whether `p` is aligned for a `Quad<T>` access.
template <typename T>
__device__ __forceinline__ bool aligned4(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

template <class C, typename T>
__device__ __forceinline__ void dequantize(const DzDelta& d, const T* base, T* out) {
  __shared__ float stage[DQ_WARPS][8 * DQ_STRIDE];
  const uint32_t nkb = (d.k + KB - 1) / KB;
  const uint64_t packets = uint64_t((d.n_stored + 15) / 16) * nkb;
  const uint64_t gid = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint64_t packet = gid / 32;
  if (packet >= packets) return;  // uniform over the warp
  float* st = stage[threadIdx.x / 32];
  const uint32_t lane = gid % 32, g = lane / 4, c = lane % 4;
  const uint32_t rt = uint32_t(packet / nkb), kb = uint32_t(packet % nkb);
  const uint8_t* codes = reinterpret_cast<const uint8_t*>(d.parts[0]) + packet * C::PACKET;
  const uint8_t* meta = reinterpret_cast<const uint8_t*>(d.parts[1]) + packet * 256;
  const uint32_t sw = reinterpret_cast<const uint32_t*>(d.parts[2])[packet * 8 + g];
  const float scale[2] = {__half2float(__ushort_as_half(uint16_t(sw & 0xffffu))),
                          __half2float(__ushort_as_half(uint16_t(sw >> 16)))};
  const float z = float(1u << (C::BITS - 1));
  constexpr uint32_t mask = (1u << C::BITS) - 1u;
#pragma unroll
  for (uint32_t h = 0; h < 2; ++h) {
#pragma unroll 4
    for (int p = 0; p < C::STEPS * 4; ++p) {
      const int s = p / 4, f = p % 4;
      if (uint32_t(f & 1) != h) continue;
      const int u = p / C::PPW, j = p % C::PPW;
      const uint32_t off = C::PIECE >= 16 ? (4 * u / 16) * 512 + lane * 16 + (4 * u) % 16 : lane * C::PIECE + 4 * u;
      const uint32_t w = *reinterpret_cast<const uint32_t*>(codes + off);
      const float sc = scale[h];
      const float lo = ((float((w >> (C::BITS * j)) & mask) - z) * sc) * d.global_scale;
      const float hi = ((float((w >> (16 + C::BITS * j)) & mask) - z) * sc) * d.global_scale;
      if constexpr (!C::sparse) {
        const uint32_t col = 32 * c + 4 * s + 2 * (f >> 1);  // within the block
        st[dq_at(g, col)] = lo;
        st[dq_at(g, col + 1)] = hi;
      } else {
        const uint32_t run = 8 * s + c + 4 * (f >> 1);  // within the block
        if (4 * (32 * kb + run) >= d.k) continue;
        const uint32_t mw = *reinterpret_cast<const uint32_t*>(meta + (2 * g + (f >> 1)) * 16 + 4 * s);
        const uint32_t nib = (mw >> (16 * h + 4 * c)) & 15u;
#pragma unroll
        for (uint32_t q = 0; q < 4; ++q)
          st[dq_at(g, 4 * run + q)] = q == (nib & 3u) ? lo : q == (nib >> 2) ? hi : 0.f;
      }
    }
    __syncwarp();
    for (uint32_t i = 0; i < 8; ++i) {
      const uint32_t row = 16 * rt + 8 * h + i;
      if (row >= d.n_stored) break;
      const uint32_t col0 = KB * kb + 4 * lane;
      const size_t at0 = size_t(row) * d.k + col0;
      // The lane's 4 columns in one aligned vector store (and base load) where they are all inside K: a
      // warp writes a row's 128 columns in one instruction (session 15: the scalar stores took the v4
      // dense route of 11008 x 4096 to ~100 us, ~3x its bytes). The same values, rounded the same way.
      const bool whole = col0 + 4 <= d.k && aligned4(out + at0) && (!base || aligned4(base + at0));
      if (whole) {
        Quad<T> q;
        if (base) q = *reinterpret_cast<const Quad<T>*>(base + at0);
#pragma unroll
        for (uint32_t e = 0; e < 4; ++e) {
          const float v = st[dq_at(i, 4 * lane + e)];
          q.v[e] = from_f32<T>(base ? to_f32(q.v[e]) + v : v);
        }
        *reinterpret_cast<Quad<T>*>(out + at0) = q;
        continue;
      }
#pragma unroll
      for (uint32_t e = 0; e < 4; ++e) {
        const uint32_t cl = 4 * lane + e, col = KB * kb + cl;
        if (col >= d.k) continue;
        const size_t at = size_t(row) * d.k + col;
        const float v = st[dq_at(i, cl)];
        out[at] = from_f32<T>(base ? to_f32(base[at]) + v : v);
      }
    }
    __syncwarp();  // the next half overwrites the staging rows
  }
}

}  // namespace v4
}  // namespace dz

// dz_v4_<variant>_dequantize_<t>(DzDelta d, const T* base, T* out): out = base + D (base 0: out = D), the
// generic kernels' `dequantize` signature; 256 threads a block, one per lane of a packet (8 packets).
#define DZ_V4_DEQUANTIZE(variant, C, T, tname)                                                               \
  extern "C" __global__ void __launch_bounds__(256)                                                         \
      dz_v4_##variant##_dequantize_##tname(DzDelta d, const T* base, T* out) {                              \
    dz::v4::dequantize<C, T>(d, base, out);                                                                  \
  }

// Entry points: dz_v4_<variant>_matmul_add_<t>_n<NT> (NT = 1, 2, 4), dz_v4_<variant>_sbmm_<t>_n<NT>
// (NT = 1, 2), with the generic kernels' signatures plus the split (and sbmm's tiles); the descriptor's
// parts are the v4 parts (codes, meta, scales). 2 blocks of 256 threads per SM: at most 128 registers.
#define DZ_V4_MATMUL(variant, C, T, tname, NT)                                                               \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_matmul_add_##tname##_n##NT(DzDelta d, const T* x, const T* base, T* out, uint32_t m,  \
                                                  uint32_t split) {                                          \
    dz::v4::matmul_add<C, T, NT>(d, x, base, out, m, split);                                                 \
  }
// dz_v4_<variant>_matmul_sx_<t>_n4(DzDelta d, const T* x, const T* base, T* out, u32 m): the 32-row tile with
// x in shared memory; a 1-D grid of at most ceil(m / 32) * ceil(tiles / 8) blocks of 256 threads.
#define DZ_V4_MATMUL_SX(variant, C, T, tname)                                                                \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_matmul_sx_##tname##_n4(DzDelta d, const T* x, const T* base, T* out, uint32_t m) {   \
    dz::v4::matmul_sx<C, T, 1>(d, x, base, out, m);                                                          \
  }
// dz_v4_<variant>_matmul_sx_<t>_n8(DzDelta d, const T* x, const T* base, T* out, u32 m, float* ws,
// u32* counters): the 64-row tile on the balanced schedule (matmul_sxb, NT = 8), `MINB` blocks an SM (2 for
// sparse24, 1 for quant); a 1-D grid of at most the resident blocks and of at most its units, ws and
// counters of v4_matmul_sxb_workspace bytes (the counters zero), V4_MATMUL_SX64_SMEM bytes of dynamic
// shared memory. dz_v4_<variant>_matmul_sxb_<t>_n4 (same signature): the 32-row tile on it (NT = 4,
// 2 blocks an SM, V4_MATMUL_SXB_SMEM bytes).
#define DZ_V4_MATMUL_SXB(variant, C, T, tname, MINB)                                                         \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, MINB)                                       \
      dz_v4_##variant##_matmul_sx_##tname##_n8(DzDelta d, const T* x, const T* base, T* out, uint32_t m,     \
                                               float* ws, uint32_t* counters) {                              \
    dz::v4::matmul_sxb<C, T, 8>(d, x, base, out, m, ws, counters);                                           \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_matmul_sxb_##tname##_n4(DzDelta d, const T* x, const T* base, T* out, uint32_t m,    \
                                                float* ws, uint32_t* counters) {                             \
    dz::v4::matmul_sxb<C, T, 4>(d, x, base, out, m, ws, counters);                                           \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_matmul_sxp_##tname##_n4(DzDelta d, const T* x, const T* base, T* out, uint32_t m,    \
                                                float* ws, uint32_t* counters) {                             \
    dz::v4::matmul_sxb<C, T, 4, 2, 1>(d, x, base, out, m, ws, counters);                                     \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 1)                                          \
      dz_v4_##variant##_matmul_sxp2_##tname##_n4(DzDelta d, const T* x, const T* base, T* out, uint32_t m,   \
                                                 float* ws, uint32_t* counters) {                            \
    dz::v4::matmul_sxb<C, T, 4, 2, 2>(d, x, base, out, m, ws, counters);                                     \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_matmul_sxq_##tname##_n4(DzDelta d, const T* x, const T* base, T* out, uint32_t m) {  \
    dz::v4::matmul_sx_mt<C, T, 2, 1>(d, x, base, out, m);                                                    \
  }
// dz_v4_<variant>_matmul_sxk<S>_<t>_n4(DzDelta d, const T* x, const T* base, T* out, u32 m, float* ws,
// u32* counters): as matmul_sx, K split over S blocks (S = 4), reduced through `ws`; a grid of S x the
// blocks of matmul_sx; `counters` (one a block of matmul_sx) zero at launch.
#define DZ_V4_MATMUL_SXK(variant, C, T, tname, S)                                                            \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_matmul_sxk##S##_##tname##_n4(DzDelta d, const T* x, const T* base, T* out,           \
                                                      uint32_t m, float* ws, uint32_t* counters) {           \
    dz::v4::matmul_sx<C, T, S>(d, x, base, out, m, ws, counters);                                            \
  }
// dz_v4_<variant>_matmul_sxd_<t>_n4(DzDelta d, const T* x, const T* base, T* out, u32 m): as matmul_sx, x and
// the codes in a deep ring in dynamic shared memory (v4_matmul_sxd_smem on the host: the bytes to pass).
#define DZ_V4_MATMUL_SXD(variant, C, T, tname)                                                               \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_matmul_sxd_##tname##_n4(DzDelta d, const T* x, const T* base, T* out, uint32_t m) {  \
    dz::v4::matmul_sxd<C, T>(d, x, base, out, m);                                                            \
  }
// dz_v4_<variant>_sbmm_ring_<t>_n1: the sbmm_sx signature (no split), the decode tile, each warp's codes
// in its own shared-memory ring (v4_sbmm_ring_smem on the host: the dynamic shared memory bytes to pass).
#define DZ_V4_SBMM_RING(variant, C, T, tname)                                                                \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_sbmm_ring_##tname##_n1(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas,  \
                                              const T* x, T* out, uint32_t k, uint32_t n_total,              \
                                              uint32_t tiles) {                                              \
    dz::v4::sbmm_ring<C, T>(segs, n_segs, deltas, x, out, k, n_total, tiles);                                \
  }
// dz_v4_<variant>_sbmm_xd_<t>_n1 and _sbmm_xo_: the sbmm signature, the decode tile with x loaded right
// before each mma (not in the load ring) and a 6-deep code ring at 2 blocks an SM (xd), or a 3-deep one at
// 3 blocks an SM (xo) (`set_v4_sbmm_x_direct` on the host; session 15; slower on the H200, session 16: 96 / 111 against 77 us).
#define DZ_V4_SBMM_XD(variant, C, T, tname)                                                                  \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_sbmm_xd_##tname##_n1(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas,    \
                                            const T* x, T* out, uint32_t k, uint32_t n_total, uint32_t tiles, \
                                            uint32_t split) {                                                \
    dz::v4::sbmm<C, T, 1, dz::v4::XD_DEEP>(segs, n_segs, deltas, x, out, k, n_total, tiles, split);          \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 3)                                          \
      dz_v4_##variant##_sbmm_xo_##tname##_n1(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas,    \
                                            const T* x, T* out, uint32_t k, uint32_t n_total, uint32_t tiles, \
                                            uint32_t split) {                                                \
    dz::v4::sbmm<C, T, 1, dz::v4::XD_OCCUPANCY>(segs, n_segs, deltas, x, out, k, n_total, tiles, split);     \
  }
// dz_v4_<variant>_sbmm_p2_<t>_n1: the sbmm signature and launch over pairs of tiles (`sbmm`, MT = 2;
// `set_v4_sbmm_pair` on the host, on by default since session 19).
#define DZ_V4_SBMM_PAIR(variant, C, T, tname)                                                                \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_sbmm_p2_##tname##_n1(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas,    \
                                            const T* x, T* out, uint32_t k, uint32_t n_total, uint32_t tiles, \
                                            uint32_t split) {                                                \
    dz::v4::sbmm<C, T, 1, 0, 2>(segs, n_segs, deltas, x, out, k, n_total, tiles, split);                     \
  }                                                                                                          \
  DZ_V4_SBMM_PAIR_PF(variant, C, T, tname, 4)                                                                \
  DZ_V4_SBMM_PAIR_PF(variant, C, T, tname, 8)
// dz_v4_<variant>_sbmm_p2f<PF>_<t>_n1: the pair with an L2 prefetch PF blocks ahead (session 21;
// `set_v4_sbmm_prefetch` on the host).
#define DZ_V4_SBMM_PAIR_PF(variant, C, T, tname, PF)                                                         \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_sbmm_p2f##PF##_##tname##_n1(const DzSegment* segs, uint32_t n_segs,                    \
                                                   const DzDelta* deltas, const T* x, T* out, uint32_t k,     \
                                                   uint32_t n_total, uint32_t tiles, uint32_t split) {        \
    dz::v4::sbmm<C, T, 1, 0, 2, PF>(segs, n_segs, deltas, x, out, k, n_total, tiles, split);                 \
  }
#define DZ_V4_ENTRIES(variant, C, T, tname, NT)                                                              \
  DZ_V4_MATMUL(variant, C, T, tname, NT)                                                                     \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_sbmm_##tname##_n##NT(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas,   \
                                            const T* x, T* out, uint32_t k, uint32_t n_total, uint32_t tiles, \
                                            uint32_t split) {                                                \
    dz::v4::sbmm<C, T, NT>(segs, n_segs, deltas, x, out, k, n_total, tiles, split);                          \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(dz::v4::WK * 32, 2)                                          \
      dz_v4_##variant##_sbmm_sx_##tname##_n##NT(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas, \
                                               const T* x, T* out, uint32_t k, uint32_t n_total,             \
                                               uint32_t tiles) {                                             \
    dz::v4::sbmm_sx<C, T, NT>(segs, n_segs, deltas, x, out, k, n_total, tiles);                              \
  }

#define DZ_V4_VARIANT(variant, C, MINB64)               \
  DZ_V4_ENTRIES(variant, C, __half, f16, 1)            \
  DZ_V4_ENTRIES(variant, C, __half, f16, 2)            \
  DZ_V4_MATMUL(variant, C, __half, f16, 4)             \
  DZ_V4_MATMUL_SX(variant, C, __half, f16)             \
  DZ_V4_MATMUL_SXB(variant, C, __half, f16, MINB64)   \
  DZ_V4_MATMUL_SXK(variant, C, __half, f16, 4)         \
  DZ_V4_MATMUL_SXD(variant, C, __half, f16)            \
  DZ_V4_SBMM_RING(variant, C, __half, f16)             \
  DZ_V4_SBMM_XD(variant, C, __half, f16)               \
  DZ_V4_SBMM_PAIR(variant, C, __half, f16) \
  DZ_V4_ENTRIES(variant, C, __nv_bfloat16, bf16, 1)    \
  DZ_V4_ENTRIES(variant, C, __nv_bfloat16, bf16, 2)    \
  DZ_V4_MATMUL(variant, C, __nv_bfloat16, bf16, 4)     \
  DZ_V4_MATMUL_SX(variant, C, __nv_bfloat16, bf16)     \
  DZ_V4_MATMUL_SXB(variant, C, __nv_bfloat16, bf16, MINB64) \
  DZ_V4_MATMUL_SXK(variant, C, __nv_bfloat16, bf16, 4) \
  DZ_V4_MATMUL_SXD(variant, C, __nv_bfloat16, bf16)    \
  DZ_V4_SBMM_RING(variant, C, __nv_bfloat16, bf16)     \
  DZ_V4_SBMM_XD(variant, C, __nv_bfloat16, bf16)       \
  DZ_V4_SBMM_PAIR(variant, C, __nv_bfloat16, bf16) \
  DZ_V4_DEQUANTIZE(variant, C, float, f32)             \
  DZ_V4_DEQUANTIZE(variant, C, __half, f16)            \
  DZ_V4_DEQUANTIZE(variant, C, __nv_bfloat16, bf16)

namespace dz {
namespace v4 {
using Quant2 = Codec<2, false>;
using Quant4 = Codec<4, false>;
using Sparse24_2 = Codec<2, true>;
using Sparse24_4 = Codec<4, true>;
}  // namespace v4
}  // namespace dz

DZ_V4_VARIANT(quant2, dz::v4::Quant2, 1)
DZ_V4_VARIANT(quant4, dz::v4::Quant4, 1)
DZ_V4_VARIANT(sparse24_2, dz::v4::Sparse24_2, 2)
DZ_V4_VARIANT(sparse24_4, dz::v4::Sparse24_4, 2)

// Tensor-core delta matmul and sbmm (mma.sync m16n8k16, f32 accumulate) for f16 and bf16 inputs, for the
// codecs most deltas use: quant 2/4 bits (group 0 or a multiple of 128, symmetric or not), sparse24 2/4 bits
// (symmetric) and sign1. The generic kernels (kernels/common/dz_kernels.cuh) cover everything else.
//
// The weights are the mma's A operand (16 stored rows of the delta, "features", per warp tile) and x is B
// (8 input rows per n-tile). Nothing is rounded on the way in: A holds the *integer* code values
// (q - z for symmetric grids, q for asymmetric ones, +-1 for signs), which f16 and bf16 hold exactly, and
// the per-group scale multiplies the f32 partial sum of each 128-column block afterwards (a group is a
// multiple of 128 columns, so a block never straddles two); the asymmetric zero point is subtracted as
// z * sum(x) over the block. So the only roundings are the f32 sums, like the generic kernels'.
//
// Column order. An mma sums over k in any order as long as A and B agree, so each lane picks the k-slots
// that are cheapest to decode. A 128-column block is 4 units of 32 columns; lane (g, c) (g = lane / 4,
// c = lane % 4) owns unit c, i.e. columns 32c..32c+31 of the block, of rows g and g + 8 of its warp tile:
// the bytes it loads are the unit's packed bits, one contiguous span per row, as in the generic kernels.
// The block's 8 k-steps of 16 each take 4 of every lane's 32 columns:
// - quant and sign1 (b bits, P = 32 / b codes per u32 word, half = P / 2): the pair of codes (j, j + half)
//   of a word sits at bits (b j, b j + 16), so `(w >> b j) & mask | magic` makes two f16/bf16 at once
//   (magic: 1024 for f16, 128 for bf16, whose spacing is 1; then subtract magic + z); step s of word i
//   takes the pairs (2h, 2h + half) and (2h + 1, 2h + 1 + half), h = s mod (P / 4), and B gets the same
//   columns of x with two byte permutes of the natural pairs;
// - sparse24: step s is run s of the unit (its 4 columns in order, x in natural order); the two kept codes
//   are made into a pair with the magic trick, then placed into the run's 4 slots (zeros elsewhere) by two
//   byte permutes whose selectors come from a 16-entry table indexed by the run's metadata nibble.
//
// x: with tiles of 8 or 16 input rows, each lane loads its B words (row g of each n-tile, unit c: 64 bytes)
// straight into registers, one 128-column block ahead; with 32-row tiles, each warp stages its block of x in
// shared memory with coalesced 16-byte loads (padded so the fragment reads are conflict-free). The weights'
// units are loaded two blocks ahead (registers).
//
// Launch: block = WN x WK warps; warp (wn, wk) owns stored rows feat0 + 16 wn .. + 16 and the 128-column
// blocks wk, wk + WK, ...; the WK partial results meet in shared memory. Grid x = stored-row tiles of
// 16 WN, y = tiles of 8 NT input rows (matmul) or segments (sbmm), grid-stride.
#include "dz_common.cuh"

namespace dz {
namespace tc {

// ---------------------------------------------------------------------------------------------------------
// f16 / bf16 pairs.
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct Num;
template <>
struct Num<__half> {
  static constexpr uint32_t MAGIC = 0x64006400u;  // (1024, 1024)
  static constexpr float MAGIC_F = 1024.f;
  static constexpr uint32_t ONE = 0x3C003C00u;  // (1, 1)
};
template <>
struct Num<__nv_bfloat16> {
  static constexpr uint32_t MAGIC = 0x43004300u;  // (128, 128)
  static constexpr float MAGIC_F = 128.f;
  static constexpr uint32_t ONE = 0x3F803F80u;  // (1, 1)
};

// a - b on both halves (exact for the integers used here).
template <typename T>
__device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b);
template <>
__device__ __forceinline__ uint32_t sub2<__half>(uint32_t a, uint32_t b) {
  __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}
template <>
__device__ __forceinline__ uint32_t sub2<__nv_bfloat16>(uint32_t a, uint32_t b) {
  __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}

// Both halves of a pair as f32, summed.
template <typename T>
__device__ __forceinline__ float pair_sum(uint32_t p);
template <>
__device__ __forceinline__ float pair_sum<__half>(uint32_t p) {
  const float2 f = __half22float2(*reinterpret_cast<__half2*>(&p));
  return f.x + f.y;
}
template <>
__device__ __forceinline__ float pair_sum<__nv_bfloat16>(uint32_t p) {
  const float2 f = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&p));
  return f.x + f.y;
}

// (v, v) as a pair of T (v an integer the type holds exactly).
template <typename T>
__device__ __forceinline__ uint32_t splat(float v) {
  const T h = from_f32<T>(v);
  const uint32_t u = *reinterpret_cast<const unsigned short*>(&h);
  return u | (u << 16);
}

// d += a * b for one m16n8k16 tile.
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                   uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// u32 word `j` (a pair of T) of x's row, through the non-coherent cache.
__device__ __forceinline__ uint32_t xword(const void* row, uint32_t j) {
  return __ldg(reinterpret_cast<const unsigned int*>(row) + j);
}

// ---------------------------------------------------------------------------------------------------------
// Decoders. Each gives, for a lane's unit (32 columns of one stored row):
//   Unit load(row, c0)                    the packed bits (zeros past the row's data)
//   void a(unit, s, zsub, lut, lo, hi)     step s's two A pairs (columns of slots 0-1 and 2-3)
//   void xw(s, ja, jb)                    the x words (natural pairs of the unit) step s needs
//   uint32_t b(xa, xb, which)             B pair `which` (0, 1) of step s from those words
// ---------------------------------------------------------------------------------------------------------

// Per-row pointers of a packed row.
struct RowPtrs {
  const uint8_t* p0;  // codes / signs
  const uint8_t* p1;  // sparse24 meta
  int avail0;         // data bytes of part 0 in the row
  int avail1;         // data bytes of part 1
};

// quant (B = 2 or 4) and sign1 (B = 1): the magic-pair column order.
template <int B, bool SIGN>
struct Packed {
  static constexpr int WORDS = B;  // u32 words per unit
  static constexpr int P = 32 / B;  // codes per word
  static constexpr int SPW = P / 4;  // steps per word
  static constexpr uint32_t MASK = ((1u << B) - 1u) * 0x00010001u;
  static constexpr bool ASYM_OK = !SIGN;
  static constexpr bool GROUPS = !SIGN;  // sign1: one scale per row
  static constexpr int SCALES = 1;      // part index of the scales (zeros follow)
  struct Unit {
    uint32_t w[WORDS];
  };

  static __device__ __forceinline__ RowPtrs row(const DzDelta& d, uint32_t r) {
    RowPtrs p;
    p.p0 = reinterpret_cast<const uint8_t*>(d.parts[0]) + size_t(r) * d.stride0;
    p.p1 = nullptr;
    p.avail0 = int(data_bytes(d.k, B));
    p.avail1 = 0;
    return p;
  }

  static __device__ __forceinline__ Unit load(const RowPtrs& p, uint32_t c0) {
    const int at = int((c0 / 32) * 4 * B);
    const Bits<4 * B> b = load_bits<4 * B>(p.p0 + at, p.avail0 - at);
    Unit u;
#pragma unroll
    for (int i = 0; i < WORDS; ++i) u.w[i] = b.w[i];
    return u;
  }

  template <typename T>
  static __device__ __forceinline__ void a(const Unit& u, int s, uint32_t zsub, const uint2*, uint32_t& lo,
                                           uint32_t& hi) {
    const int i = s / SPW, h = s % SPW;
    if constexpr (SIGN) {
      const uint32_t nw = ~u.w[i];
      // Sign bit (bit 15 of each half) = the complement of the stored bit (set = +1).
      lo = Num<T>::ONE | (((nw >> (2 * h)) & 0x00010001u) << 15);
      hi = Num<T>::ONE | (((nw >> (2 * h + 1)) & 0x00010001u) << 15);
    } else {
      lo = sub2<T>(((u.w[i] >> (B * 2 * h)) & MASK) | Num<T>::MAGIC, zsub);
      hi = sub2<T>(((u.w[i] >> (B * (2 * h + 1))) & MASK) | Num<T>::MAGIC, zsub);
    }
  }

  static __device__ __forceinline__ void xw(int s, uint32_t& ja, uint32_t& jb) {
    const int i = s / SPW, h = s % SPW;
    ja = uint32_t(P * i / 2 + h);
    jb = ja + uint32_t(P / 4);
  }

  static __device__ __forceinline__ uint32_t b(uint32_t xa, uint32_t xb, int which) {
    return __byte_perm(xa, xb, which ? 0x7632 : 0x5410);
  }
};

// sparse24 (B = 2 or 4): one run per step, x in natural order.
template <int B>
struct S24 {
  static constexpr int WORDS = (2 * B + 3) / 4 + 1;  // codes (2B bytes), then one word of meta
  static constexpr int CW = WORDS - 1;
  static constexpr uint32_t M1 = (1u << B) - 1u;
  static constexpr bool ASYM_OK = false;
  static constexpr bool GROUPS = true;
  static constexpr int SCALES = 2;
  struct Unit {
    uint32_t w[WORDS];
  };

  static __device__ __forceinline__ RowPtrs row(const DzDelta& d, uint32_t r) {
    RowPtrs p;
    p.p0 = reinterpret_cast<const uint8_t*>(d.parts[0]) + size_t(r) * d.stride0;
    p.p1 = reinterpret_cast<const uint8_t*>(d.parts[1]) + size_t(r) * d.stride1;
    p.avail0 = int(data_bytes(d.k / 2, B));
    p.avail1 = int(data_bytes(d.k / 4, 4));
    return p;
  }

  static __device__ __forceinline__ Unit load(const RowPtrs& p, uint32_t c0) {
    const int at = int((c0 / 32) * 2 * B);
    const Bits<2 * B> b = load_bits<2 * B>(p.p0 + at, p.avail0 - at);
    Unit u;
#pragma unroll
    for (int i = 0; i < CW; ++i) u.w[i] = b.w[i];
    const int m = int(c0 / 8);
    u.w[CW] = load_bits<4>(p.p1 + m, p.avail1 - m).w[0];
    return u;
  }

  template <typename T>
  static __device__ __forceinline__ void a(const Unit& u, int s, uint32_t zsub, const uint2* lut, uint32_t& lo,
                                           uint32_t& hi) {
    const int bit = 2 * s * B;
    const uint32_t x = u.w[bit / 32] >> (bit % 32);
    const uint32_t pair = sub2<T>((x & M1) | (((x >> B) & M1) << 16) | Num<T>::MAGIC, zsub);
    const uint2 sel = lut[(u.w[CW] >> (4 * s)) & 15u];
    lo = __byte_perm(pair, 0u, sel.x);
    hi = __byte_perm(pair, 0u, sel.y);
  }

  static __device__ __forceinline__ void xw(int s, uint32_t& ja, uint32_t& jb) {
    ja = uint32_t(2 * s);
    jb = ja + 1;
  }

  static __device__ __forceinline__ uint32_t b(uint32_t xa, uint32_t xb, int which) { return which ? xb : xa; }
};

// The 16 byte-permute selector pairs of sparse24: for metadata nibble i0 | i1 << 2, slot i0 takes the pair's
// low half (bytes 0, 1), slot i1 its high half (bytes 2, 3), the other slots zero (byte 4 of a zero word).
__device__ __forceinline__ void init_lut(uint2* lut) {
  if (threadIdx.x < 16) {
    const uint32_t i0 = threadIdx.x & 3u, i1 = threadIdx.x >> 2;
    uint32_t sel[2] = {0, 0};
#pragma unroll
    for (uint32_t slot = 0; slot < 4; ++slot) {
      const uint32_t lo_b = slot == i0 ? 0u : (slot == i1 ? 2u : 4u);
      const uint32_t hi_b = slot == i0 ? 1u : (slot == i1 ? 3u : 4u);
      const uint32_t at = (slot % 2) * 8;
      sel[slot / 2] |= (lo_b << at) | (hi_b << (at + 4));
    }
    lut[threadIdx.x] = make_uint2(sel[0], sel[1]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The tile.
// ---------------------------------------------------------------------------------------------------------

// f16 number `i` of a table (scales, zeros).
__device__ __forceinline__ float f16_of(uint64_t part, size_t i) {
  return f16_at(reinterpret_cast<const uint8_t*>(part), i);
}

template <class Dec, typename T, int NT, int WN, int WK>
struct Tile {
  static constexpr int WARPS = WN * WK;
  static constexpr int THREADS = WARPS * 32;
  // Partial results of warps wk > 0: (WK - 1) x WN x 32 lanes x NT x 4 floats.
  static constexpr int RED = WK > 1 ? (WK - 1) * WN * 32 * NT * 4 : 1;
  // Each warp stages its 128-column block of x (8 NT rows) in shared memory, as u32 words (pairs of T):
  // row n at word 68 n, unit c (32 columns, 16 words) at + 17 c. The pads make the B-fragment reads
  // conflict-free: lane (g, c) reads word 68 g + 17 c + j, and (68 g + 17 c) mod 32 differs for all 32 lanes.
  static constexpr bool XREG = NT <= 2;
  // x of the next block is loaded one block ahead for the 8-row tile (the 16-row tile lacks the registers).
  static constexpr bool XPREF = NT == 1;
  static constexpr int XROW = 68;
  static constexpr int XWARP = XREG ? 1 : 8 * NT * XROW;
  static constexpr int XS = WARPS * XWARP;

  // This lane's B words of block `blk` (zeros past `rows`, past K and past the last block): row 8 t + g,
  // unit c, as 16 natural pairs.
  static __device__ __forceinline__ void load_x(const T* const (&xr)[NT], uint32_t blk, uint32_t nblk,
                                                uint32_t K, uint32_t c, uint32_t (&X)[NT][16]) {
    const uint32_t c0 = blk * 128 + 32 * c;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (xr[t] != nullptr && blk < nblk && c0 < K) {
        const uint4* p = reinterpret_cast<const uint4*>(xr[t] + c0);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint4 v = __ldg(p + i);
          X[t][4 * i] = v.x;
          X[t][4 * i + 1] = v.y;
          X[t][4 * i + 2] = v.z;
          X[t][4 * i + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int j = 0; j < 16; ++j) X[t][j] = 0;
      }
    }
  }

  static __device__ __forceinline__ void load_units(const RowPtrs& pa, const RowPtrs& pb, uint32_t blk,
                                                    uint32_t nblk, uint32_t K, uint32_t c,
                                                    typename Dec::Unit& ua, typename Dec::Unit& ub) {
    const uint32_t c0 = blk * 128 + 32 * c;
    if (blk < nblk && c0 < K) {
      ua = Dec::load(pa, c0);
      ub = Dec::load(pb, c0);
    } else {
#pragma unroll
      for (int i = 0; i < Dec::WORDS; ++i) ua.w[i] = ub.w[i] = 0;
    }
  }

  // out[i][col(r)] = base[i][col(r)] + sum_k x[i][k] D[r][k] for the block's stored rows from feat0 and the
  // `rows` (<= 8 NT) rows of x.
  static __device__ __forceinline__ void run(const DzDelta& d, const T* x, uint32_t rows, const T* base, T* out,
                                             uint32_t feat0, float* red, const uint2* lut, uint32_t* xs_all) {
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t g = lane / 4, c = lane % 4;
    const uint32_t wn = warp % WN, wk = warp / WN;
    const uint32_t r0 = feat0 + 16 * wn;
    const uint32_t ra = r0 + g, rb = r0 + g + 8;
    const uint32_t last = d.n_stored - 1;
    const RowPtrs pa = Dec::row(d, min(ra, last)), pb = Dec::row(d, min(rb, last));
    const uint32_t K = d.k;
    const uint32_t nblk = (K + 127) / 128;
    const bool asym = Dec::ASYM_OK && !d.symmetric;
    const float zi = asym || d.bits == 0 ? 0.f : float(1u << (d.bits - 1));
    const uint32_t zsub = splat<T>(Num<T>::MAGIC_F + zi);
    const uint32_t group = Dec::GROUPS ? d.group_size : 0;
    // Scale table index of the rows' first group (sign1's descriptor has n_groups 0: one scale per row).
    const uint32_t ng = max(d.n_groups, 1u);
    const size_t ga = size_t(min(ra, last)) * ng, gb = size_t(min(rb, last)) * ng;
    uint32_t* xs = xs_all + warp * XWARP;
    if constexpr (!XREG) {
      // Rows of the tile past `rows` stay zero (their products land in output rows nobody writes).
      __syncwarp();
      for (uint32_t i = lane; i < uint32_t(XWARP); i += 32) xs[i] = 0;
    }
    // x rows of this lane's B fragments (n = 8 t + g), null past `rows` (XREG only).
    const T* xr[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) xr[t] = uint32_t(8 * t) + g < rows ? x + size_t(8 * t + g) * K : nullptr;

    float acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;

    // The group of the current block, tracked without a division per block: blocks per group `bpg` (a group
    // is a multiple of 128 columns), the block's index within its group `rem`.
    const uint32_t bpg = group ? group / 128 : 1;
    uint32_t gi = wk / bpg, rem = wk % bpg;

    // Units of the current block and the next two are in flight at any time (and x of the next block).
    typename Dec::Unit ua, ub, na, nb;
    load_units(pa, pb, wk, nblk, K, c, ua, ub);
    load_units(pa, pb, wk + WK, nblk, K, c, na, nb);
    uint32_t X[NT][16], XN[NT][16];
    if constexpr (XPREF) load_x(xr, wk, nblk, K, c, X);
    for (uint32_t blk = wk; blk < nblk; blk += WK) {
      const uint32_t k0 = blk * 128;
      typename Dec::Unit fa, fb;
      load_units(pa, pb, blk + 2 * WK, nblk, K, c, fa, fb);
      if constexpr (XPREF) {
        load_x(xr, blk + WK, nblk, K, c, XN);
      } else if constexpr (XREG) {
        load_x(xr, blk, nblk, K, c, X);
      } else {
        // Stage x[0..rows][k0 .. k0 + 128] (16-byte loads; K is a multiple of 32, so a load is all in or out).
        __syncwarp();  // every lane has read the previous block's tile
        for (uint32_t q = lane; q < rows * 16; q += 32) {
          const uint32_t n = q / 16, ch = q % 16;
          const uint32_t col = k0 + ch * 8;
          uint4 v = make_uint4(0, 0, 0, 0);
          if (col < K) v = __ldg(reinterpret_cast<const uint4*>(x + size_t(n) * K + col));
          uint32_t* dst = xs + n * XROW + 17 * (ch / 4) + 4 * (ch % 4);
          dst[0] = v.x;
          dst[1] = v.y;
          dst[2] = v.z;
          dst[3] = v.w;
        }
        __syncwarp();
      }

      float part[NT][4];
      float xsum[NT];
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        xsum[t] = 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) part[t][e] = 0.f;
      }
      const uint32_t* xl = xs + g * XROW + 17 * c;
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        uint32_t a[4];
        Dec::template a<T>(ua, s, zsub, lut, a[0], a[2]);
        Dec::template a<T>(ub, s, zsub, lut, a[1], a[3]);
        uint32_t ja, jb;
        Dec::xw(s, ja, jb);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          uint32_t xa, xb;
          if constexpr (XREG) {
            xa = X[t][ja];
            xb = X[t][jb];
          } else {
            xa = xl[t * 8 * XROW + ja];
            xb = xl[t * 8 * XROW + jb];
          }
          if (asym) xsum[t] += pair_sum<T>(xa) + pair_sum<T>(xb);
          mma<T>(part[t], a, Dec::b(xa, xb, 0), Dec::b(xa, xb, 1));
        }
      }
      // Scale the block's partial sums by the rows' group scale (1 for a whole-row group: applied last).
      float sa = 1.f, sb = 1.f, za = 0.f, zb = 0.f;
      // The rows' group of this block: `gi` (a whole-row group is group 0, whatever `gi` counts).
      const uint32_t gcur = group ? gi : 0;
      if (group) {
        sa = f16_of(d.parts[Dec::SCALES], ga + gcur);
        sb = f16_of(d.parts[Dec::SCALES], gb + gcur);
      }
      if (asym) {
        za = f16_of(d.parts[Dec::SCALES + 1], ga + gcur);
        zb = f16_of(d.parts[Dec::SCALES + 1], gb + gcur);
      }
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        float x0 = 0.f, x1 = 0.f;
        if (asym) {
          // The block's sum of x for input rows 2c and 2c + 1 of the n-tile: lanes 4n .. 4n + 3 hold row n's.
          float v = xsum[t];
          v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
          v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
          x0 = __shfl_sync(0xFFFFFFFFu, v, 8 * c);
          x1 = __shfl_sync(0xFFFFFFFFu, v, 8 * c + 4);
        }
        acc[t][0] = fmaf(sa, part[t][0] - za * x0, acc[t][0]);
        acc[t][1] = fmaf(sa, part[t][1] - za * x1, acc[t][1]);
        acc[t][2] = fmaf(sb, part[t][2] - zb * x0, acc[t][2]);
        acc[t][3] = fmaf(sb, part[t][3] - zb * x1, acc[t][3]);
      }
#pragma unroll
      for (int i = 0; i < Dec::WORDS; ++i) {
        ua.w[i] = na.w[i];
        ub.w[i] = nb.w[i];
        na.w[i] = fa.w[i];
        nb.w[i] = fb.w[i];
      }
      if constexpr (XPREF) {
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int j = 0; j < 16; ++j) X[t][j] = XN[t][j];
      }
      rem += WK;
      while (rem >= bpg) {
        rem -= bpg;
        ++gi;
      }
    }

    if constexpr (WK > 1) {
      __syncthreads();  // `red` is free (an earlier tile of this block has read it)
      if (wk > 0) {
        float* dst = red + (((wk - 1) * WN + wn) * 32 + lane) * NT * 4;
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) dst[t * 4 + e] = acc[t][e];
      }
      __syncthreads();
      if (wk > 0) return;
#pragma unroll
      for (uint32_t w = 1; w < WK; ++w) {
        const float* src = red + (((w - 1) * WN + wn) * 32 + lane) * NT * 4;
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[t][e] += src[t * 4 + e];
      }
    }

    // Whole-row scale (group 0, and sign1's row scale), then the global scale.
    float fa = d.global_scale, fb = d.global_scale;
    if (!group) {
      // One scale per row.
      fa *= f16_of(d.parts[Dec::SCALES], ga);
      fb *= f16_of(d.parts[Dec::SCALES], gb);
    }
    const uint32_t col_a = ra <= last ? output_col(d, ra) : 0, col_b = rb <= last ? output_col(d, rb) : 0;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t n = 8 * t + 2 * c + (e & 1);
        const bool lower = e >= 2;
        if (n >= rows || (lower ? rb : ra) > last) continue;
        const size_t o = size_t(n) * d.n_total + (lower ? col_b : col_a);
        const float v = acc[t][e] * (lower ? fb : fa);
        const float bv = base ? to_f32(base[o]) : 0.f;
        out[o] = from_f32<T>(bv + v);
      }
    }
  }
};

template <class Dec, typename T, int NT, int WN, int WK>
__device__ __forceinline__ void matmul_add(const DzDelta& d, const T* x, const T* base, T* out, uint32_t m) {
  using Tl = Tile<Dec, T, NT, WN, WK>;
  __shared__ float red[Tl::RED];
  __shared__ uint2 lut[16];
  __shared__ __align__(16) uint32_t xs[Tl::XS];
  init_lut(lut);
  __syncthreads();
  const uint32_t feat0 = blockIdx.x * 16 * WN;
  if (feat0 >= d.n_stored) return;
  const uint32_t tiles = (m + 8 * NT - 1) / (8 * NT);
  for (uint32_t t = blockIdx.y; t < tiles; t += gridDim.y) {
    const uint32_t i0 = t * 8 * NT;
    const size_t o = size_t(i0) * d.n_total;
    Tl::run(d, x + size_t(i0) * d.k, min(uint32_t(8 * NT), m - i0), base ? base + o : nullptr, out + o, feat0, red,
            lut, xs);
  }
}

template <class Dec, typename T, int NT, int WN, int WK>
__device__ __forceinline__ void sbmm(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas, const T* x,
                                     T* out, uint32_t k, uint32_t n_total) {
  using Tl = Tile<Dec, T, NT, WN, WK>;
  __shared__ float red[Tl::RED];
  __shared__ uint2 lut[16];
  __shared__ __align__(16) uint32_t xs[Tl::XS];
  init_lut(lut);
  __syncthreads();
  const uint32_t feat0 = blockIdx.x * 16 * WN;
  for (uint32_t s = blockIdx.y; s < n_segs; s += gridDim.y) {
    const DzSegment seg = segs[s];
    const DzDelta d = deltas[seg.delta];
    if (feat0 >= d.n_stored) continue;
    T* o = out + size_t(seg.start) * n_total;
    Tl::run(d, x + size_t(seg.start) * k, seg.len, o, o, feat0, red, lut, xs);
  }
}

}  // namespace tc
}  // namespace dz

// Entry points: dz_tc_<variant>_matmul_add_<t>_n<NT> and dz_tc_<variant>_sbmm_<t>_n<NT> with the signatures
// of the generic kernels (src/lib.rs, `TC`). NT = 1 and 2: 1 x 4 warps (4-way split of K: enough blocks
// for small N); NT = 4: 2 x 2 warps.
// Blocks per SM the register allocation must allow: the small tiles are memory-bound and need many warps
// in flight (4 blocks: at most 128 registers), the 32-row tile has more accumulators (3: 170).
#define DZ_TC_MIN_BLOCKS(NT) ((NT) == 4 ? 3 : 4)
#define DZ_TC_ENTRIES(variant, Dec, T, tname, NT, WN, WK)                                                     \
  extern "C" __global__ void __launch_bounds__(WN * WK * 32, DZ_TC_MIN_BLOCKS(NT))                         \
      dz_tc_##variant##_matmul_add_##tname##_n##NT(DzDelta d, const T* x, const T* base, T* out, uint32_t m) { \
    dz::tc::matmul_add<Dec, T, NT, WN, WK>(d, x, base, out, m);                                             \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(WN * WK * 32, DZ_TC_MIN_BLOCKS(NT))                         \
      dz_tc_##variant##_sbmm_##tname##_n##NT(const DzSegment* segs, uint32_t n_segs, const DzDelta* deltas,  \
                                            const T* x, T* out, uint32_t k, uint32_t n_total) {             \
    dz::tc::sbmm<Dec, T, NT, WN, WK>(segs, n_segs, deltas, x, out, k, n_total);                             \
  }

#define DZ_TC_DTYPE(variant, Dec, T, tname)          \
  DZ_TC_ENTRIES(variant, Dec, T, tname, 1, 1, 4)     \
  DZ_TC_ENTRIES(variant, Dec, T, tname, 2, 1, 4)     \
  DZ_TC_ENTRIES(variant, Dec, T, tname, 4, 2, 2)

#define DZ_TC_VARIANT(variant, Dec)                   \
  DZ_TC_DTYPE(variant, Dec, __half, f16)              \
  DZ_TC_DTYPE(variant, Dec, __nv_bfloat16, bf16)

namespace dz {
namespace tc {
using Quant2 = Packed<2, false>;
using Quant4 = Packed<4, false>;
using Sign1 = Packed<1, true>;
}  // namespace tc
}  // namespace dz

DZ_TC_VARIANT(quant2, dz::tc::Quant2)
DZ_TC_VARIANT(quant4, dz::tc::Quant4)
DZ_TC_VARIANT(sign1, dz::tc::Sign1)
DZ_TC_VARIANT(sparse24_2, dz::tc::S24<2>)
DZ_TC_VARIANT(sparse24_4, dz::tc::S24<4>)

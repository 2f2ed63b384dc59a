// Common device code of the delta kernels: the descriptors shared with Rust (src/desc.rs), dtype
// conversions, bit-stream loads and extraction (SPEC.md section 3: LSB first, rows 16-byte aligned), and the
// quantization grid (SPEC.md section 3, "Quantization grid").
//
// Every codec decoder (kernels/<codec>/*.cuh) works on a lane's *unit*: 32 consecutive columns starting at
// a multiple of 32. A unit's packed bits start on a byte of every bit stream, so a lane loads them with a
// few aligned vector loads, and the 32 lanes of a warp load one contiguous span of the packed row: each
// compressed byte is read from global memory once, by one lane, in a coalesced access.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stddef.h>
#include <stdint.h>

// Launch shape, passed by build.rs from src/params.rs.
#if !defined(DZ_WARPS) || !defined(DZ_ROWS_PER_WARP) || !defined(DZ_CHUNK) || !defined(DZ_MT_SMALL) || \
    !defined(DZ_MT_LARGE)
#error "build.rs passes DZ_WARPS, DZ_ROWS_PER_WARP, DZ_CHUNK, DZ_MT_SMALL and DZ_MT_LARGE (src/params.rs)"
#endif
#define DZ_THREADS (DZ_WARPS * 32)
#define DZ_ROWS_PER_BLOCK (DZ_WARPS * DZ_ROWS_PER_WARP)
static_assert(DZ_CHUNK == 32 * 32, "a warp step is 32 lanes x 32 columns");
static_assert(DZ_MT_SMALL == 1, "the small tile is one input row");
static_assert(DZ_MT_LARGE % 4 == 0, "the large tile reads x from shared memory as float4");

// ---------------------------------------------------------------------------------------------------------
// Descriptors (src/desc.rs has the same structs, with the same size and offset assertions).
// ---------------------------------------------------------------------------------------------------------

#define DZ_CODEC_QUANT 1u
#define DZ_CODEC_SPARSE24 2u
#define DZ_CODEC_SPARSE 3u
#define DZ_CODEC_SIGN1 4u
#define DZ_CODEC_DENSE 5u

// One packed delta on the device: pointers to its parts (SPEC.md section 4 order, without row_index) and
// the numbers a decoder needs.
struct DzDelta {
  uint64_t parts[5];     // device pointers of the parts, 0 past the codec's last part
  uint64_t row_index;    // device pointer of `n_stored` u32 (a row subset), or 0
  uint32_t n_total;      // rows of the full matrix
  uint32_t k;            // columns
  uint32_t n_stored;     // stored rows
  uint32_t codec;        // DZ_CODEC_*
  uint32_t bits;         // code bits (quant, sparse24, sparse)
  uint32_t group_size;   // columns per group, 0 = the whole row
  uint32_t n_groups;     // groups per row
  uint32_t symmetric;    // 1: zero point 2^(bits-1); 0: f16 zeros part
  float global_scale;    // multiplies every scale
  uint32_t stride0;      // bytes per row of part 0 (codes, mask or signs)
  uint32_t stride1;      // bytes per row of part 1 (sparse24 meta)
  uint32_t value_dtype;  // dense: 0 f32, 1 f16, 2 bf16
};
static_assert(sizeof(DzDelta) == 96, "DzDelta layout (src/desc.rs)");
static_assert(offsetof(DzDelta, row_index) == 40, "DzDelta layout (src/desc.rs)");
static_assert(offsetof(DzDelta, n_total) == 48, "DzDelta layout (src/desc.rs)");
static_assert(offsetof(DzDelta, codec) == 60, "DzDelta layout (src/desc.rs)");
static_assert(offsetof(DzDelta, global_scale) == 80, "DzDelta layout (src/desc.rs)");
static_assert(offsetof(DzDelta, value_dtype) == 92, "DzDelta layout (src/desc.rs)");

// A run of at most MT input rows of an sbmm batch that use delta `delta` of the descriptor array.
struct DzSegment {
  uint32_t start;  // first row of x (flattened to [M, K])
  uint32_t len;    // rows, 1..=MT
  uint32_t delta;  // index into the DzDelta array
  uint32_t reserved;
};
static_assert(sizeof(DzSegment) == 16, "DzSegment layout (src/desc.rs)");
static_assert(offsetof(DzSegment, delta) == 8, "DzSegment layout (src/desc.rs)");

namespace dz {

// ---------------------------------------------------------------------------------------------------------
// Dtypes.
// ---------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Element `i` of a read-only array of T, through the non-coherent cache.
__device__ __forceinline__ float load_f32(const float* p, size_t i) { return __ldg(p + i); }
__device__ __forceinline__ float load_f32(const __half* p, size_t i) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p) + i)));
}
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p, size_t i) {
  return __bfloat162float(__ushort_as_bfloat16(__ldg(reinterpret_cast<const unsigned short*>(p) + i)));
}

// f16 number `i` of a packed f16 table (scales, zeros), as f32 (exact).
__device__ __forceinline__ float f16_at(const uint8_t* table, size_t i) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(table) + i)));
}

// ---------------------------------------------------------------------------------------------------------
// Bit streams.
// ---------------------------------------------------------------------------------------------------------

// NB bytes of a bit stream as little-endian u32 words (stream bit i = bit i % 32 of word i / 32).
template <int NB>
struct Bits {
  uint32_t w[(NB + 3) / 4];
};

// Loads NB bytes (4, 6, 8, 12, 16 or 32) at `p`, which is aligned to the access the size implies (16 for
// 16 and 32; 8 for 8; 4 for 4 and 12; 2 for 6). `avail` is how many bytes from `p` on belong to the row's
// data (may be <= 0): when the unit runs past them (the last unit of a row), only those are read, byte by
// byte, and the rest is zero, so no load ever leaves the row's bytes (rows are 16-byte aligned and padded
// to 16 bytes, but a unit of 32 bytes or of 12 bytes can end past the padding).
template <int NB>
__device__ __forceinline__ Bits<NB> load_bits(const uint8_t* p, int avail) {
  Bits<NB> b;
  if (avail >= NB) {
    if constexpr (NB == 4) {
      b.w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
    } else if constexpr (NB == 6) {
      const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
      b.w[0] = uint32_t(__ldg(h)) | (uint32_t(__ldg(h + 1)) << 16);
      b.w[1] = uint32_t(__ldg(h + 2));
    } else if constexpr (NB == 8) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
      b.w[0] = v.x;
      b.w[1] = v.y;
    } else if constexpr (NB == 12) {
      const unsigned int* q = reinterpret_cast<const unsigned int*>(p);
      b.w[0] = __ldg(q);
      b.w[1] = __ldg(q + 1);
      b.w[2] = __ldg(q + 2);
    } else if constexpr (NB == 16) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
      b.w[0] = v.x;
      b.w[1] = v.y;
      b.w[2] = v.z;
      b.w[3] = v.w;
    } else {
      static_assert(NB == 32, "unit sizes: 4, 6, 8, 12, 16, 32 bytes");
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + 1);
      b.w[0] = v.x;
      b.w[1] = v.y;
      b.w[2] = v.z;
      b.w[3] = v.w;
      b.w[4] = u.x;
      b.w[5] = u.y;
      b.w[6] = u.z;
      b.w[7] = u.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < (NB + 3) / 4; ++i) b.w[i] = 0;
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      if (i < avail) b.w[i / 4] |= uint32_t(__ldg(p + i)) << (8 * (i % 4));
    }
  }
  return b;
}

// Value `j` of a stream of B-bit values held in `w`; `j` is a compile-time constant once the caller's loop
// is unrolled, so this is a shift and a mask (a funnel shift when the value straddles two words).
template <int B, int NW>
__device__ __forceinline__ uint32_t bits_at(const uint32_t (&w)[NW], int j) {
  const int bit = j * B;
  const int wi = bit >> 5;
  const int sh = bit & 31;
  uint32_t v = w[wi] >> sh;
  if (sh + B > 32) v |= w[wi + 1] << (32 - sh);
  return v & ((1u << B) - 1u);
}

// The B-bit value at bit `pos` of words staged in shared memory (a run-time position).
template <int B>
__device__ __forceinline__ uint32_t bits_at_shared(const uint32_t* s, uint32_t pos) {
  const uint32_t wi = pos >> 5;
  const uint32_t sh = pos & 31;
  uint32_t v = s[wi] >> sh;
  if (sh + B > 32) v |= s[wi + 1] << (32 - sh);
  return v & ((1u << B) - 1u);
}

// Bytes of a bit-stream row of n values of b bits, without the padding: ceil(n * b / 8).
__device__ __forceinline__ uint32_t data_bytes(uint32_t n, uint32_t b) {
  return uint32_t((uint64_t(n) * b + 7) / 8);
}

// ---------------------------------------------------------------------------------------------------------
// The quantization grid of one row: ((q - z) * s) * global_scale, with s and z of the column's group.
// A lane walks its columns in increasing order: `start` at its first column, `at` before each later one.
// ---------------------------------------------------------------------------------------------------------

struct Grid {
  const uint8_t* scales;  // this row's n_groups f16
  const uint8_t* zeros;   // this row's n_groups f16, or null (symmetric)
  float z_sym;            // 2^(bits-1)
  float gs;               // global scale
  uint32_t group;         // columns per group, 0 = one group
  uint32_t g;             // current group
  uint32_t next;          // first column of the next group (UINT32_MAX: none)
  float s, z;             // current scale and zero point

  __device__ __forceinline__ void init(const DzDelta& d, uint32_t r, uint32_t scales_part) {
    const size_t at = size_t(r) * d.n_groups;
    scales = reinterpret_cast<const uint8_t*>(d.parts[scales_part]) + 2 * at;
    zeros = d.symmetric ? nullptr : reinterpret_cast<const uint8_t*>(d.parts[scales_part + 1]) + 2 * at;
    z_sym = float(1u << (d.bits - 1));
    gs = d.global_scale;
    group = d.group_size;
  }

  __device__ __forceinline__ void load() {
    s = f16_at(scales, g);
    z = zeros ? f16_at(zeros, g) : z_sym;
  }

  // `col` < K.
  __device__ __forceinline__ void start(uint32_t col) {
    g = group ? col / group : 0;
    next = group ? (g + 1) * group : 0xFFFFFFFFu;
    load();
  }

  // `col` < K, and not below the previous column.
  __device__ __forceinline__ void at(uint32_t col) {
    while (col >= next) {
      ++g;
      next += group;
      load();
    }
  }

  // The SPEC formula, in its order, without contraction: bit-identical to dz-format's dequantize.
  __device__ __forceinline__ float value(uint32_t q) const {
    return __fmul_rn(__fmul_rn(__fsub_rn(float(q), z), s), gs);
  }
};

// The stored row holding row `full` of the matrix, or -1 (a row subset that does not store it). The whole
// warp computes the same answer.
__device__ __forceinline__ int64_t stored_row(const DzDelta& d, uint32_t full) {
  if (d.row_index == 0) return full < d.n_stored ? int64_t(full) : -1;
  const uint32_t* idx = reinterpret_cast<const uint32_t*>(d.row_index);
  uint32_t lo = 0, hi = d.n_stored;
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (__ldg(idx + mid) < full) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return (lo < d.n_stored && __ldg(idx + lo) == full) ? int64_t(lo) : -1;
}

// The column of the output that stored row r fills.
__device__ __forceinline__ uint32_t output_col(const DzDelta& d, uint32_t r) {
  return d.row_index ? __ldg(reinterpret_cast<const uint32_t*>(d.row_index) + r) : r;
}

}  // namespace dz

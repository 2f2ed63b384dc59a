// `sign1` (SPEC.md section 3.5, BitDelta): one sign bit per entry, one f16 scale per row. Parts: signs
// (N rows of stride0 bytes), scales.
//
// A lane's unit of 32 columns is one u32 of sign bits; the warp reads 128 contiguous bytes. The value is
// (+-1 * s) * global_scale = +-(s * global_scale) exactly (negation commutes with rounding).
#include "dz_kernels.cuh"

namespace dz {

struct Sign1Dec {
  static constexpr int SCRATCH = 0;
  static constexpr bool SPARSE = false;

  struct Row {
    const uint8_t* signs;
    uint32_t data;
    float plus;  // s * global_scale
  };
  struct Unit {
    uint32_t bits;
  };

  static __device__ __forceinline__ Row row(const DzDelta& d, uint32_t r, uint32_t*) {
    Row w;
    w.signs = reinterpret_cast<const uint8_t*>(d.parts[0]) + size_t(r) * d.stride0;
    w.data = data_bytes(d.k, 1);
    w.plus = __fmul_rn(f16_at(reinterpret_cast<const uint8_t*>(d.parts[1]), r), d.global_scale);
    return w;
  }

  static __device__ __forceinline__ Unit load(const DzDelta& d, Row& w, uint32_t c0, uint32_t) {
    Unit u;
    u.bits = c0 < d.k ? load_bits<4>(w.signs + c0 / 8, int(w.data) - int(c0 / 8)).w[0] : 0u;
    return u;
  }

  static __device__ __forceinline__ void decode(const DzDelta& d, Row& w, const Unit& u, uint32_t c0,
                                                float (&v)[32]) {
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const float s = ((u.bits >> j) & 1u) ? w.plus : -w.plus;
      v[j] = c0 + j < d.k ? s : 0.f;
    }
  }

};

}  // namespace dz

DZ_INSTANTIATE(sign1, dz::Sign1Dec)

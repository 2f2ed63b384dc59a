// `quant` (SPEC.md section 3.2): every entry is a B-bit code. Parts: codes (N rows of stride0 bytes),
// scales, [zeros].
//
// A lane's unit of 32 columns is 32 codes = 4B bytes of its row, at byte 4B * (column / 32): one 8-byte
// (2 bits), three 4-byte (3 bits), one 16-byte (4 bits) or two 16-byte (8 bits) loads; the warp's 32 lanes
// read 128B contiguous bytes. Codes are extracted with constant shifts, the group's scale and zero point
// change at most at every 4th column.
#include "dz_kernels.cuh"

namespace dz {

template <int B>
struct QuantDec {
  static constexpr int SCRATCH = 0;
  static constexpr bool SPARSE = false;
  static constexpr int NB = 4 * B;  // bytes of 32 codes

  struct Row {
    const uint8_t* codes;
    uint32_t data;  // bytes of codes in the row (without padding)
    Grid grid;
  };
  struct Unit {
    Bits<NB> b;
  };

  static __device__ __forceinline__ Row row(const DzDelta& d, uint32_t r, uint32_t*) {
    Row w;
    w.codes = reinterpret_cast<const uint8_t*>(d.parts[0]) + size_t(r) * d.stride0;
    w.data = data_bytes(d.k, B);
    w.grid.init(d, r, 1);
    return w;
  }

  static __device__ __forceinline__ Unit load(const DzDelta& d, Row& w, uint32_t c0, uint32_t) {
    Unit u;
    if (c0 < d.k) {
      const uint32_t at = (c0 / 32) * NB;
      u.b = load_bits<NB>(w.codes + at, int(w.data) - int(at));
    } else {
#pragma unroll
      for (int i = 0; i < (NB + 3) / 4; ++i) u.b.w[i] = 0;
    }
    return u;
  }

  static __device__ __forceinline__ void decode(const DzDelta& d, Row& w, const Unit& u, uint32_t c0,
                                                float (&v)[32]) {
    if (c0 >= d.k) {
#pragma unroll
      for (int j = 0; j < 32; ++j) v[j] = 0.f;
      return;
    }
    w.grid.start(c0);
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const uint32_t c = c0 + j;
      // Groups are multiples of 4 columns: they change only at every 4th column.
      if ((j & 3) == 0 && c < d.k) w.grid.at(c);
      v[j] = c < d.k ? w.grid.value(bits_at<B>(u.b.w, j)) : 0.f;
    }
  }

};

}  // namespace dz

DZ_INSTANTIATE(quant2, dz::QuantDec<2>)
DZ_INSTANTIATE(quant3, dz::QuantDec<3>)
DZ_INSTANTIATE(quant4, dz::QuantDec<4>)
DZ_INSTANTIATE(quant8, dz::QuantDec<8>)

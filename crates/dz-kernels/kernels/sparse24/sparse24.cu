// `sparse24` (SPEC.md section 3.3): 2:4 structured sparsity along K. Parts: codes (N rows of K/2 B-bit codes,
// stride0 bytes), meta (N rows of K/4 nibbles i0 | i1 << 2, stride1 bytes), scales, [zeros].
//
// A lane's unit of 32 columns is 8 runs of 4: 16 codes (2B bytes at byte 2B * (column / 32)) and 8 nibbles
// (one u32 at byte column / 8); the warp reads 64B contiguous bytes of codes and 128 of meta. The matmul
// visits the 2 kept entries of each run (2 multiply-adds a run, the x column picked by the nibble); the
// dense decode (dequantize, merge, embedding) writes each of the 4 slots with a select.
#include "dz_kernels.cuh"

namespace dz {

template <int B>
struct Sparse24Dec {
  static constexpr int SCRATCH = 0;
  static constexpr bool SPARSE = true;
  static constexpr int NB = 2 * B;  // bytes of 16 codes

  struct Row {
    const uint8_t* codes;
    const uint8_t* meta;
    uint32_t codes_data;  // bytes of codes in the row
    uint32_t meta_data;   // bytes of meta in the row
    Grid grid;
  };
  struct Unit {
    Bits<NB> codes;
    uint32_t meta;
  };

  static __device__ __forceinline__ Row row(const DzDelta& d, uint32_t r, uint32_t*) {
    Row w;
    w.codes = reinterpret_cast<const uint8_t*>(d.parts[0]) + size_t(r) * d.stride0;
    w.meta = reinterpret_cast<const uint8_t*>(d.parts[1]) + size_t(r) * d.stride1;
    w.codes_data = data_bytes(d.k / 2, B);
    w.meta_data = data_bytes(d.k / 4, 4);
    w.grid.init(d, r, 2);
    return w;
  }

  static __device__ __forceinline__ Unit load(const DzDelta& d, Row& w, uint32_t c0, uint32_t) {
    Unit u;
    if (c0 < d.k) {
      const uint32_t at = (c0 / 32) * NB;
      u.codes = load_bits<NB>(w.codes + at, int(w.codes_data) - int(at));
      u.meta = load_bits<4>(w.meta + c0 / 8, int(w.meta_data) - int(c0 / 8)).w[0];
    } else {
#pragma unroll
      for (int i = 0; i < (NB + 3) / 4; ++i) u.codes.w[i] = 0;
      u.meta = 0;
    }
    return u;
  }

  // f(column, value) for the two kept entries of every run of the unit inside the row (K % 4 == 0: runs
  // are whole, and groups, multiples of 4 columns, never split one).
  template <class F>
  static __device__ __forceinline__ void nonzeros(const DzDelta& d, Row& w, const Unit& u, uint32_t c0, F&& f) {
    if (c0 >= d.k) return;
    w.grid.start(c0);
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const uint32_t c = c0 + 4 * t;
      if (c < d.k) {
        w.grid.at(c);
        const uint32_t nib = (u.meta >> (4 * t)) & 15u;
        f(c + (nib & 3u), w.grid.value(bits_at<B>(u.codes.w, 2 * t)));
        f(c + (nib >> 2), w.grid.value(bits_at<B>(u.codes.w, 2 * t + 1)));
      }
    }
  }

  static __device__ __forceinline__ void decode(const DzDelta& d, Row& w, const Unit& u, uint32_t c0,
                                                float (&v)[32]) {
#pragma unroll
    for (int j = 0; j < 32; ++j) v[j] = 0.f;
    if (c0 >= d.k) return;
    w.grid.start(c0);
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const uint32_t c = c0 + 4 * t;
      if (c < d.k) {
        w.grid.at(c);
        const uint32_t nib = (u.meta >> (4 * t)) & 15u;
        const uint32_t i0 = nib & 3u, i1 = nib >> 2;
        const float v0 = w.grid.value(bits_at<B>(u.codes.w, 2 * t));
        const float v1 = w.grid.value(bits_at<B>(u.codes.w, 2 * t + 1));
#pragma unroll
        for (uint32_t s = 0; s < 4; ++s) v[4 * t + s] = s == i0 ? v0 : (s == i1 ? v1 : 0.f);
      }
    }
  }
};

}  // namespace dz

DZ_INSTANTIATE(sparse24_2, dz::Sparse24Dec<2>)
DZ_INSTANTIATE(sparse24_3, dz::Sparse24Dec<3>)
DZ_INSTANTIATE(sparse24_4, dz::Sparse24Dec<4>)
DZ_INSTANTIATE(sparse24_8, dz::Sparse24Dec<8>)

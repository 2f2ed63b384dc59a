// `dense` (SPEC.md section 3.1): plain values of dtype V, row-major, no row padding. Part: values.
// Not what the delta kernels are for (a dense delta is as large as the weight), but every op takes every
// codec. A lane reads its 32 values one by one (rows are not aligned to anything but the element size).
#include "dz_kernels.cuh"

namespace dz {

template <typename V>
struct DenseDec {
  static constexpr int SCRATCH = 0;
  static constexpr bool SPARSE = false;

  struct Row {
    const V* values;  // this row
  };
  struct Unit {};

  static __device__ __forceinline__ Row row(const DzDelta& d, uint32_t r, uint32_t*) {
    Row w;
    w.values = reinterpret_cast<const V*>(d.parts[0]) + size_t(r) * d.k;
    return w;
  }

  static __device__ __forceinline__ Unit load(const DzDelta&, Row&, uint32_t, uint32_t) { return Unit{}; }

  static __device__ __forceinline__ void decode(const DzDelta& d, Row& w, const Unit&, uint32_t c0,
                                                float (&v)[32]) {
#pragma unroll
    for (int j = 0; j < 32; ++j) v[j] = c0 + j < d.k ? load_f32(w.values, c0 + j) : 0.f;
  }

};

}  // namespace dz

DZ_INSTANTIATE(dense_f32, dz::DenseDec<float>)
DZ_INSTANTIATE(dense_f16, dz::DenseDec<__half>)
DZ_INSTANTIATE(dense_bf16, dz::DenseDec<__nv_bfloat16>)

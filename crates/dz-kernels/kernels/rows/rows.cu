// Per-row ops of the multi-tenant hook (not codecs): `dz_rows_norm_delta_add_<t>` (issue #9, session 13).
//
// out[i, :] = base[i, :] + x[i, :] * rsqrt(mean(x[i, :]^2) + eps) * d[i / per, :]
//
// The RMS norm of a fine-tune whose norm weight is g + d, given the base's own output rms_norm(x) * g:
// the delta's part in one launch, the sum formed in f32 and rounded once (the hook otherwise ran an RMS
// norm with unit weights, a multiply and an add: three launches and two intermediate tensors a call).
// x, base and out are [rows, width] of T; d is [rows / per, width] of T (each batch row's norm delta; a
// sequence's `per` tokens share one). One block of DZ_ROWS_THREADS threads a row: the sum of squares by
// warp shuffles and one shared-memory step, then each thread its columns.
#include "dz_common.cuh"

#define DZ_ROWS_THREADS 256

namespace dz {
namespace rows {

template <typename T>
__device__ __forceinline__ void norm_delta_add(const T* x, const T* base, const T* d, T* out, uint32_t width,
                                               uint32_t per, float eps) {
  __shared__ float red[DZ_ROWS_THREADS / 32];
  const size_t i = blockIdx.x;
  const T* xr = x + i * width;
  float ss = 0.f;
  for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) {
    const float v = to_f32(xr[j]);
    ss += v * v;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < DZ_ROWS_THREADS / 32; ++w) total += red[w];  // the same order in every thread
  const float inv = rsqrtf(total / float(width) + eps);
  const T* dr = d + (i / per) * width;
  const T* br = base + i * width;
  T* orow = out + i * width;
  for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) {
    orow[j] = from_f32<T>(to_f32(br[j]) + to_f32(xr[j]) * inv * to_f32(dr[j]));
  }
}

}  // namespace rows
}  // namespace dz

// dz_rows_norm_delta_add_<t>(const T* x, const T* base, const T* d, T* out, u32 width, u32 per, f32 eps):
// grid = rows, block = DZ_ROWS_THREADS.
#define DZ_ROWS_NORM(T, tname)                                                                              \
  extern "C" __global__ void __launch_bounds__(DZ_ROWS_THREADS)                                            \
      dz_rows_norm_delta_add_##tname(const T* x, const T* base, const T* d, T* out, uint32_t width,         \
                                     uint32_t per, float eps) {                                             \
    dz::rows::norm_delta_add<T>(x, base, d, out, width, per, eps);                                           \
  }

DZ_ROWS_NORM(float, f32)
DZ_ROWS_NORM(__half, f16)
DZ_ROWS_NORM(__nv_bfloat16, bf16)

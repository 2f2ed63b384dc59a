// `sparse` (SPEC.md section 3.4): unstructured sparsity. Parts: mask (N rows of K bits, stride0 bytes),
// row_ptr (N + 1 u32 byte offsets into codes), codes (row r's kept codes as one bit-stream row at
// row_ptr[r]), scales, [zeros].
//
// A lane's unit of 32 columns is one u32 of mask (the warp reads 128 contiguous bytes). Where a lane's codes
// start depends on the set bits before it: per warp step, a warp scan of the lanes' popcounts gives each
// lane its first code, and the warp copies the step's codes (one contiguous run of at most 1024 codes, at
// most 32B + 1 words) from global memory to a per-(warp, row) shared buffer with coalesced u32 loads. Each
// lane then extracts its codes from shared memory at run-time bit positions. `base` (codes of the row
// before this step) is the same in every lane.
#include "dz_kernels.cuh"

namespace dz {

template <int B>
struct SparseDec {
  // One warp step: at most 1024 codes of B bits = 32 B words, plus one when the run does not start on a word.
  static constexpr int SCRATCH = 32 * B + 1;
  static constexpr bool SPARSE = true;

  struct Row {
    const uint8_t* mask;
    const uint32_t* codes;  // this row's codes (row_ptr[r] is a multiple of 16)
    uint32_t* scratch;      // SCRATCH words of shared memory for this (warp, row)
    uint32_t mask_data;     // bytes of mask in the row
    uint64_t base;          // codes before the current step
    Grid grid;
  };
  struct Unit {
    uint32_t mask;  // the unit's mask bits, none past K
    uint32_t pos;   // bit position in `scratch` of the unit's first code
  };

  static __device__ __forceinline__ Row row(const DzDelta& d, uint32_t r, uint32_t* scratch) {
    Row w;
    w.mask = reinterpret_cast<const uint8_t*>(d.parts[0]) + size_t(r) * d.stride0;
    const uint32_t start = __ldg(reinterpret_cast<const uint32_t*>(d.parts[1]) + r);
    w.codes = reinterpret_cast<const uint32_t*>(reinterpret_cast<const uint8_t*>(d.parts[2]) + start);
    w.scratch = scratch;
    w.mask_data = data_bytes(d.k, 1);
    w.base = 0;
    w.grid.init(d, r, 3);
    return w;
  }

  // The whole warp calls this (shuffles and __syncwarp), with c0 = step + 32 * lane.
  static __device__ __forceinline__ Unit load(const DzDelta& d, Row& w, uint32_t c0, uint32_t lane) {
    uint32_t m = 0;
    if (c0 < d.k) {
      m = load_bits<4>(w.mask + c0 / 8, int(w.mask_data) - int(c0 / 8)).w[0];
      if (d.k - c0 < 32) m &= (1u << (d.k - c0)) - 1u;
    }
    const uint32_t pop = __popc(m);
    uint32_t incl = pop;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t n = __shfl_up_sync(0xFFFFFFFFu, incl, o);
      if (lane >= uint32_t(o)) incl += n;
    }
    const uint32_t total = __shfl_sync(0xFFFFFFFFu, incl, 31);
    // The step's codes are values [base, base + total): bits [base * B, (base + total) * B).
    const uint64_t w0 = (w.base * B) >> 5;
    const uint64_t w1 = ((w.base + total) * B + 31) >> 5;
    __syncwarp();  // every lane is done with the previous step's codes
    for (uint64_t i = w0 + lane; i < w1; i += 32) w.scratch[i - w0] = __ldg(w.codes + i);
    __syncwarp();
    Unit u;
    u.mask = m;
    u.pos = uint32_t(w.base * B - w0 * 32) + (incl - pop) * B;
    w.base += total;
    return u;
  }

  // f(column, value) for the unit's stored entries, in column order.
  template <class F>
  static __device__ __forceinline__ void nonzeros(const DzDelta&, Row& w, const Unit& u, uint32_t c0, F&& f) {
    uint32_t m = u.mask;
    if (m == 0) return;
    uint32_t pos = u.pos;
    w.grid.start(c0);
    while (m) {
      const uint32_t j = __ffs(m) - 1;
      m &= m - 1;
      const uint32_t c = c0 + j;
      w.grid.at(c);
      f(c, w.grid.value(bits_at_shared<B>(w.scratch, pos)));
      pos += B;
    }
  }

  static __device__ __forceinline__ void decode(const DzDelta& d, Row& w, const Unit& u, uint32_t c0,
                                                float (&v)[32]) {
#pragma unroll
    for (int j = 0; j < 32; ++j) v[j] = 0.f;
    if (u.mask == 0) return;
    uint32_t pos = u.pos;
    w.grid.start(c0);
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const uint32_t c = c0 + j;
      if ((j & 3) == 0 && c < d.k) w.grid.at(c);
      if ((u.mask >> j) & 1u) {
        v[j] = w.grid.value(bits_at_shared<B>(w.scratch, pos));
        pos += B;
      }
    }
  }
};

}  // namespace dz

DZ_INSTANTIATE(sparse2, dz::SparseDec<2>)
DZ_INSTANTIATE(sparse3, dz::SparseDec<3>)
DZ_INSTANTIATE(sparse4, dz::SparseDec<4>)
DZ_INSTANTIATE(sparse8, dz::SparseDec<8>)

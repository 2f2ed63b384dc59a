// The launch shape shared by the kernels and the host code. This file is `include!`d by both `lib.rs` and
// `build.rs`; build.rs passes every constant to nvcc as `-DDZ_<NAME>=<value>`, so the two sides cannot
// drift (kernels/common/dz_common.cuh checks the values it relies on with static_asserts).

/// Warps per block, in every kernel.
pub const WARPS: u32 = 4;

/// Threads per block, in every kernel.
pub const THREADS: u32 = WARPS * 32;

/// Stored rows of the delta that one warp of a matmul block computes, interleaved (their loads are issued
/// together).
pub const ROWS_PER_WARP: u32 = 2;

/// Stored rows of the delta per matmul block: the block's `x` tile in shared memory is reused by all of them.
pub const ROWS_PER_BLOCK: u32 = WARPS * ROWS_PER_WARP;

/// Columns per warp step: 32 lanes x 32 consecutive columns. Also the columns of the `x` chunk a matmul block
/// stages in shared memory. A lane's 32 columns start on a byte of every bit stream (32 codes of `b` bits
/// are `4b` bytes; 32 sign or mask bits are one `u32`; 8 runs of 2:4 are 16 codes and one `u32` of meta).
pub const CHUNK: u32 = 1024;

/// Input rows per matmul tile: `M_TILES[0]` when every segment of a launch has one row (decode), else
/// `M_TILES[1]`. The `_m1` / `_m8` suffix of the matmul and sbmm entry points.
pub const M_TILES: [u32; 2] = [1, 8];

/// Largest `N_total`, `K` and number of input rows the kernels take (their column and row arithmetic is
/// 32-bit; byte offsets are 64-bit).
pub const MAX_DIM: u32 = (1 << 31) - 1;

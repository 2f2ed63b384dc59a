//! The PTX of every family, compiled by build.rs (`cuda` feature only).

use crate::Family;

/// `nvcc --version`'s release line of the nvcc that compiled the PTX.
pub const NVCC_VERSION: &str = env!("DZ_NVCC_VERSION");

/// The compute capability the PTX targets (`sm_<this>`).
pub const CUDA_COMPUTE_CAP: &str = env!("DZ_CUDA_COMPUTE_CAP");

/// `"yes"` when the PTX carries source line info (built with `DZ_KERNELS_LINEINFO=1`), else `"no"`.
pub const LINEINFO: &str = env!("DZ_KERNELS_LINEINFO");

const QUANT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/quant.ptx"));
const SPARSE24_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sparse24.ptx"));
const SPARSE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sparse.ptx"));
const SIGN1_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sign1.ptx"));
const DENSE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dense.ptx"));
const TC_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/tc.ptx"));
const V4_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/v4.ptx"));
const ROWS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rows.ptx"));

impl Family {
    /// The family's PTX (every entry point of its variants).
    pub fn ptx(self) -> &'static str {
        match self {
            Family::Quant => QUANT_PTX,
            Family::Sparse24 => SPARSE24_PTX,
            Family::Sparse => SPARSE_PTX,
            Family::Sign1 => SIGN1_PTX,
            Family::Dense => DENSE_PTX,
        }
    }
}

/// The PTX of the tensor-core family (`kernels/tc/tc.cu`, every [`crate::tc`] entry point).
pub fn tc_ptx() -> &'static str {
    TC_PTX
}

/// The PTX of the v4 family (`kernels/v4/v4.cu`, every [`crate::v4`] entry point).
pub fn v4_ptx() -> &'static str {
    V4_PTX
}

/// The PTX of the per-row ops (`kernels/rows/rows.cu`, every [`crate::rows`] entry point).
pub fn rows_ptx() -> &'static str {
    ROWS_PTX
}

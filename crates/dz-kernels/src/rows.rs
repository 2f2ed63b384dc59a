//! Per-row ops of the multi-tenant hook (`kernels/rows/rows.cu`): not codecs, the kernels around them.
//!
//! - `dz_rows_norm_delta_add_<t>(const T* x, const T* base, const T* d, T* out, u32 width, u32 per,
//!   f32 eps)` for `t` in `f32`, `f16`, `bf16`: `out[i, :] = base[i, :] + x[i, :] * rsqrt(mean(x[i, :]²) +
//!   eps) * d[i / per, :]`, the sum formed in f32 and rounded once (an RMS norm's weight delta, given the
//!   base norm's output). `x`, `base`, `out`: `[rows, width]`; `d`: `[rows / per, width]`. Grid: one block
//!   of [`ROWS_THREADS`] threads a row.

use crate::Dtype;

/// The module name the per-row entry points load under.
pub const ROWS_MODULE: &str = "dz_rows";

/// Threads a block of every per-row entry point.
pub const ROWS_THREADS: u32 = 256;

/// `dz_rows_norm_delta_add_<t>` for inputs of `dtype`.
pub fn norm_delta_add(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "dz_rows_norm_delta_add_f32",
        Dtype::F16 => "dz_rows_norm_delta_add_f16",
        Dtype::Bf16 => "dz_rows_norm_delta_add_bf16",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every per-row entry point is in the PTX, and nothing else is.
    #[cfg(feature = "cuda")]
    #[test]
    fn every_rows_entry_point_is_in_the_ptx() {
        use std::collections::HashSet;
        let in_ptx: HashSet<&str> = crate::rows_ptx()
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
            .map(|l| l.split('(').next().unwrap_or(l).trim())
            .collect();
        let named: HashSet<&str> = [Dtype::F32, Dtype::F16, Dtype::Bf16]
            .map(norm_delta_add)
            .into_iter()
            .collect();
        assert_eq!(in_ptx, named);
    }

    #[test]
    fn names() {
        assert_eq!(norm_delta_add(Dtype::Bf16), "dz_rows_norm_delta_add_bf16");
        assert_eq!(ROWS_THREADS % 32, 0);
    }
}

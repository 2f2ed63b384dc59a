//! The tensor-core family (`kernels/tc/tc.cu`): `delta_matmul` and `sbmm` for f16 and bf16 inputs on the
//! mma.sync m16n8k16 instruction, for the codecs most deltas use. The generic kernels remain the path for
//! everything else (f32 inputs, other codecs and bit widths, groups that are not a multiple of 128).
//!
//! Entry points, with the generic kernels' signatures (crate docs):
//! - `dz_tc_<variant>_matmul_add_<t>_n<NT>(DzDelta d, const T* x, const T* base, T* out, u32 m)`
//! - `dz_tc_<variant>_sbmm_<t>_n<NT>(const DzSegment* segs, u32 n_segs, const DzDelta* deltas, const T* x,
//!   T* out, u32 k, u32 n_total)`: every segment at most `8 NT` rows.
//!
//! for `variant` in `quant2`, `quant4`, `sparse24_2`, `sparse24_4`, `sign1`, `t` in `f16`, `bf16`, and
//! `NT` in [`TC_TILES`]. A block has [`TC_THREADS`] threads and covers [`TcTile::stored_rows`] stored rows;
//! grid x = stored-row tiles, y = tiles of `8 NT` input rows (matmul) or segments (sbmm), at most 65535
//! (the kernels stride over the rest).

use crate::{Dtype, Variant};

/// Threads per block of every tensor-core kernel (4 warps).
pub const TC_THREADS: u32 = 128;

/// The n-tile counts of the entry points (`_n1`, `_n2`, `_n4`): input rows per tile = 8 x this.
pub const TC_TILES: [u32; 3] = [1, 2, 4];

/// One tensor-core tile shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcTile {
    /// 8 input rows, 16 stored rows per block, K split over the 4 warps.
    N1,
    /// 16 input rows, 16 stored rows per block, K split over the 4 warps.
    N2,
    /// 32 input rows, 32 stored rows per block, K split over 2 warps.
    N4,
}

impl TcTile {
    /// The smallest tile that holds `rows` input rows (the largest past 32).
    pub fn for_rows(rows: usize) -> TcTile {
        match rows {
            0..=8 => TcTile::N1,
            9..=16 => TcTile::N2,
            _ => TcTile::N4,
        }
    }

    /// Input rows per tile.
    pub fn rows(self) -> u32 {
        8 * TC_TILES[self.index()]
    }

    /// Stored rows of the delta per block (16 per warp column: 1, 1, 2 columns).
    pub fn stored_rows(self) -> u32 {
        match self {
            TcTile::N1 | TcTile::N2 => 16,
            TcTile::N4 => 32,
        }
    }

    fn index(self) -> usize {
        match self {
            TcTile::N1 => 0,
            TcTile::N2 => 1,
            TcTile::N4 => 2,
        }
    }
}

/// The tensor-core entry point names of one variant.
#[derive(Debug)]
pub struct TcEntries {
    /// The variant's name (`quant4`, ...).
    pub variant: &'static str,
    /// `dz_tc_<variant>_matmul_add_<t>_n<NT>`, by dtype (f16, bf16) then tile.
    pub matmul_add: [[&'static str; 3]; 2],
    /// `dz_tc_<variant>_sbmm_<t>_n<NT>`, by dtype (f16, bf16) then tile.
    pub sbmm: [[&'static str; 3]; 2],
}

impl TcEntries {
    fn dtype_index(dtype: Dtype) -> Option<usize> {
        match dtype {
            Dtype::F16 => Some(0),
            Dtype::Bf16 => Some(1),
            Dtype::F32 => None,
        }
    }

    /// The matmul entry point; `None` for f32.
    pub fn matmul_add(&self, dtype: Dtype, tile: TcTile) -> Option<&'static str> {
        Self::dtype_index(dtype).map(|d| self.matmul_add[d][tile.index()])
    }

    /// The sbmm entry point; `None` for f32.
    pub fn sbmm(&self, dtype: Dtype, tile: TcTile) -> Option<&'static str> {
        Self::dtype_index(dtype).map(|d| self.sbmm[d][tile.index()])
    }

    /// Every entry point of the variant.
    pub fn all(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.matmul_add.iter().chain(&self.sbmm).flatten().copied()
    }
}

macro_rules! tc_tiles {
    ($v:literal, $op:literal, $t:literal) => {
        [
            concat!("dz_tc_", $v, "_", $op, "_", $t, "_n1"),
            concat!("dz_tc_", $v, "_", $op, "_", $t, "_n2"),
            concat!("dz_tc_", $v, "_", $op, "_", $t, "_n4"),
        ]
    };
}

macro_rules! tc_entries {
    ($v:literal) => {
        TcEntries {
            variant: $v,
            matmul_add: [
                tc_tiles!($v, "matmul_add", "f16"),
                tc_tiles!($v, "matmul_add", "bf16"),
            ],
            sbmm: [tc_tiles!($v, "sbmm", "f16"), tc_tiles!($v, "sbmm", "bf16")],
        }
    };
}

const _: () = assert!(TC_TILES[0] == 1 && TC_TILES[1] == 2 && TC_TILES[2] == 4);

/// Every tensor-core variant's entry points.
pub const TC: [TcEntries; 5] = [
    tc_entries!("quant2"),
    tc_entries!("quant4"),
    tc_entries!("sparse24_2"),
    tc_entries!("sparse24_4"),
    tc_entries!("sign1"),
];

/// The module name the tensor-core PTX is loaded under.
pub const TC_MODULE: &str = "dz_tc";

/// The entry points of `variant` on tensor cores, if it has them. What else a delta must satisfy (K a
/// multiple of 32; quant and sparse24 groups of 0 or a multiple of 128 columns; sparse24 symmetric) is
/// [`tc_supports`]'s to say.
pub fn tc_entries(variant: Variant) -> Option<&'static TcEntries> {
    match variant {
        Variant::Quant(2) => Some(&TC[0]),
        Variant::Quant(4) => Some(&TC[1]),
        Variant::Sparse24(2) => Some(&TC[2]),
        Variant::Sparse24(4) => Some(&TC[3]),
        Variant::Sign1 => Some(&TC[4]),
        _ => None,
    }
}

/// Whether a delta of `variant` with `k` columns, `group_size` (0: one group per row) and `symmetric`
/// grid runs on the tensor-core kernels.
pub fn tc_supports(variant: Variant, k: u32, group_size: u32, symmetric: bool) -> bool {
    let grouped_ok = group_size.is_multiple_of(128);
    k.is_multiple_of(32)
        && match variant {
            Variant::Quant(2 | 4) => grouped_ok,
            Variant::Sparse24(2 | 4) => grouped_ok && symmetric,
            Variant::Sign1 => true,
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_support() {
        let mut n = 0;
        for e in &TC {
            for name in e.all() {
                assert!(name.starts_with(&format!("dz_tc_{}_", e.variant)), "{name}");
                n += 1;
            }
        }
        assert_eq!(n, 5 * 12);
        assert_eq!(
            tc_entries(Variant::Quant(4)).and_then(|e| e.matmul_add(Dtype::Bf16, TcTile::N2)),
            Some("dz_tc_quant4_matmul_add_bf16_n2")
        );
        assert!(tc_entries(Variant::Quant(3)).is_none());
        assert!(TC[0].matmul_add(Dtype::F32, TcTile::N1).is_none());
        assert!(tc_supports(Variant::Quant(4), 4096, 128, false));
        assert!(!tc_supports(Variant::Quant(4), 4096, 64, true));
        assert!(!tc_supports(Variant::Sparse24(4), 4096, 128, false));
        assert!(!tc_supports(Variant::Sign1, 100, 0, true));
        assert_eq!(TcTile::for_rows(1), TcTile::N1);
        assert_eq!(TcTile::for_rows(16), TcTile::N2);
        assert_eq!(TcTile::for_rows(300).rows(), 32);
    }

    /// Every tensor-core entry point is in the PTX, and nothing else is.
    #[cfg(feature = "cuda")]
    #[test]
    fn every_tc_entry_point_is_in_the_ptx() {
        use std::collections::HashSet;
        let in_ptx: HashSet<&str> = crate::tc_ptx()
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
            .map(|l| l.split('(').next().unwrap_or(l).trim())
            .collect();
        let named: HashSet<&str> = TC.iter().flat_map(|e| e.all()).collect();
        assert_eq!(in_ptx, named);
    }
}

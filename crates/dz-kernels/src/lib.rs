//! # dz-kernels
//!
//! CUDA kernels for the packed delta codecs of dz-format (DeltaZip, arXiv 2312.05215, section 5: the fused
//! decompress-and-multiply kernels and the selective batched matmul, SBMM). The sources live in
//! `kernels/<codec>/<codec>.cu` (one kernel family per codec: `quant`, `sparse24`, `sparse`, `sign1`, and
//! `dense` for completeness) over a common header (`kernels/common/`: bit-stream loads and extraction, the
//! quantization grid, dtype conversion, the matmul / sbmm / row kernels templated on a codec decoder).
//! Under the `cuda` feature, `build.rs` compiles each family to PTX for `sm_$CUDA_COMPUTE_CAP` (default 90)
//! with nvcc 13.0, and this crate embeds it (`Family::ptx`, `cuda` only). Without the feature nothing is
//! compiled and no CUDA toolkit is needed; the names, descriptors and launch shape are still here.
//!
//! What this crate gives the host (dz-candle-ops launches the kernels through candle):
//! - the launch shape ([`THREADS`], [`ROWS_PER_BLOCK`], [`CHUNK`], [`M_TILES`], [`MAX_DIM`]), which build.rs
//!   also passes to nvcc, so both sides agree;
//! - the descriptors ([`desc::DzDelta`], [`desc::DzSegment`]), `#[repr(C)]` with size assertions matched by
//!   `static_assert`s in the `.cuh`;
//! - the entry point names of every variant ([`Variant::entries`], [`Entries`]), and under `cuda` the PTX of
//!   every family.
//!
//! ## Entry points
//! Per variant (a codec with its bits: `quant2` .. `quant8`, `sparse24_2` .., `sparse2` .., `sign1`,
//! `dense_f32`/`dense_f16`/`dense_bf16`) and input dtype `<t>` (`f32`, `f16`, `bf16`), C linkage:
//! - `dz_<variant>_matmul_add_<t>_m<MT>(DzDelta d, const T* x, const T* base, T* out, u32 m)`:
//!   `out = base + x · Dᵀ` for `x` `[m, K]`; `base` may be null (plain `x · Dᵀ`) or equal to `out` (in place).
//!   Only the output columns of stored rows are written (a row subset: the host fills the others first).
//!   Grid `(ceil(n_stored / ROWS_PER_BLOCK), min(ceil(m / MT), 65535))`, [`THREADS`] threads.
//! - `dz_<variant>_sbmm_<t>_m<MT>(const DzSegment* segs, u32 n_segs, const DzDelta* deltas, const T* x,
//!   T* out, u32 k, u32 n_total)`: in place, `out[rows of s] += x[rows of s] · D_sᵀ` for every segment (at
//!   most MT rows each) of one launch; every delta of the launch is of this variant. Grid
//!   `(ceil(max n_stored / ROWS_PER_BLOCK), min(n_segs, 65535))`.
//! - `dz_<variant>_dequantize_<t>(DzDelta d, const T* base, T* out)`: `out = base + D` over the full
//!   `[n_total, K]` matrix (rows a subset does not store are `base`, or 0); `base` null with `T = f32` is
//!   the dense delta, bit-identical to dz-format's reference. Grid `ceil(n_total / WARPS)` (grid-stride).
//! - `dz_<variant>_embedding_add_<t>(DzDelta d, const u32* ids, u32 n_ids, const T* base, T* out)`:
//!   `out[t] = base[t] + D[ids[t]]` (ids checked `< n_total` by the host). Grid `ceil(n_ids / WARPS)`.
//!
//! `MT` is `M_TILES[0] = 1` (every segment one row: decode) or `M_TILES[1] = 8`.
//!
//! The tensor-core family ([`tc`], `kernels/tc/tc.cu`) has faster `matmul_add` and `sbmm` entry points
//! for f16/bf16 inputs and the common codecs (quant 2/4, sparse24 2/4, sign1); the host picks them when a
//! delta qualifies ([`tc::tc_supports`]). The v4 family ([`v4`], `kernels/v4/v4.cu`) takes 1-16 input rows
//! of quant 2/4 and sparse24 2/4 deltas over codes re-laid at upload ([`v4::v4_supports`]).
#![deny(missing_docs)]

pub mod desc;
pub mod rows;
pub mod tc;
pub mod v4;
mod params {
    include!("params.rs");
}
#[cfg(feature = "cuda")]
mod ptx;

pub use desc::{DzDelta, DzSegment, ValueDtype};
pub use params::{CHUNK, MAX_DIM, M_TILES, ROWS_PER_BLOCK, ROWS_PER_WARP, THREADS, WARPS};
#[cfg(feature = "cuda")]
pub use ptx::{rows_ptx, tc_ptx, v4_ptx, CUDA_COMPUTE_CAP, LINEINFO, NVCC_VERSION};

/// An input dtype of the kernels, in the index order of the [`Entries`] arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// f32.
    F32,
    /// f16.
    F16,
    /// bf16.
    Bf16,
}

impl Dtype {
    /// Every dtype, in index order.
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    fn index(self) -> usize {
        match self {
            Dtype::F32 => 0,
            Dtype::F16 => 1,
            Dtype::Bf16 => 2,
        }
    }
}

/// The input rows of a matmul tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tile {
    /// `M_TILES[0]` (one row): every segment of the launch has one row.
    Small,
    /// `M_TILES[1]`.
    Large,
}

impl Tile {
    /// Input rows per tile.
    pub fn rows(self) -> u32 {
        M_TILES[self.index()]
    }

    fn index(self) -> usize {
        match self {
            Tile::Small => 0,
            Tile::Large => 1,
        }
    }
}

/// A kernel family: one `.cu` file, one PTX module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `kernels/quant/quant.cu`.
    Quant,
    /// `kernels/sparse24/sparse24.cu`.
    Sparse24,
    /// `kernels/sparse/sparse.cu`.
    Sparse,
    /// `kernels/sign1/sign1.cu`.
    Sign1,
    /// `kernels/dense/dense.cu`.
    Dense,
}

impl Family {
    /// Every family.
    pub const ALL: [Family; 5] = [
        Family::Quant,
        Family::Sparse24,
        Family::Sparse,
        Family::Sign1,
        Family::Dense,
    ];

    /// The module name to load the family's PTX under (unique per family).
    pub fn module_name(self) -> &'static str {
        match self {
            Family::Quant => "dz_quant",
            Family::Sparse24 => "dz_sparse24",
            Family::Sparse => "dz_sparse",
            Family::Sign1 => "dz_sign1",
            Family::Dense => "dz_dense",
        }
    }

    /// The family's variants.
    pub fn variants(self) -> &'static [Variant] {
        match self {
            Family::Quant => &[
                Variant::Quant(2),
                Variant::Quant(3),
                Variant::Quant(4),
                Variant::Quant(8),
            ],
            Family::Sparse24 => &[
                Variant::Sparse24(2),
                Variant::Sparse24(3),
                Variant::Sparse24(4),
                Variant::Sparse24(8),
            ],
            Family::Sparse => &[
                Variant::Sparse(2),
                Variant::Sparse(3),
                Variant::Sparse(4),
                Variant::Sparse(8),
            ],
            Family::Sign1 => &[Variant::Sign1],
            Family::Dense => &[
                Variant::Dense(ValueDtype::F32),
                Variant::Dense(ValueDtype::F16),
                Variant::Dense(ValueDtype::Bf16),
            ],
        }
    }
}

/// One kernel variant: a codec with its code bits (or a dense delta's value dtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// `quant` with 2, 3, 4 or 8 bits.
    Quant(u8),
    /// `sparse24` with 2, 3, 4 or 8 bits.
    Sparse24(u8),
    /// `sparse` with 2, 3, 4 or 8 bits.
    Sparse(u8),
    /// `sign1`.
    Sign1,
    /// `dense` of a value dtype.
    Dense(ValueDtype),
}

impl Variant {
    /// Its family (module).
    pub fn family(self) -> Family {
        match self {
            Variant::Quant(_) => Family::Quant,
            Variant::Sparse24(_) => Family::Sparse24,
            Variant::Sparse(_) => Family::Sparse,
            Variant::Sign1 => Family::Sign1,
            Variant::Dense(_) => Family::Dense,
        }
    }

    /// Its entry points; `None` for a bit width without kernels.
    pub fn entries(self) -> Option<&'static Entries> {
        let by_bits = |set: &'static [Entries; 4], bits: u8| match bits {
            2 => Some(&set[0]),
            3 => Some(&set[1]),
            4 => Some(&set[2]),
            8 => Some(&set[3]),
            _ => None,
        };
        match self {
            Variant::Quant(b) => by_bits(&QUANT, b),
            Variant::Sparse24(b) => by_bits(&SPARSE24, b),
            Variant::Sparse(b) => by_bits(&SPARSE, b),
            Variant::Sign1 => Some(&SIGN1),
            Variant::Dense(ValueDtype::F32) => Some(&DENSE[0]),
            Variant::Dense(ValueDtype::F16) => Some(&DENSE[1]),
            Variant::Dense(ValueDtype::Bf16) => Some(&DENSE[2]),
        }
    }
}

/// The entry point names of one variant (see the crate docs for their signatures).
#[derive(Debug)]
pub struct Entries {
    /// The variant's name in the entry points (`quant4`, `sparse24_2`, `dense_bf16`, ...).
    pub variant: &'static str,
    /// `dz_<variant>_matmul_add_<t>_m<MT>`, by [`Dtype`] then [`Tile`].
    pub matmul_add: [[&'static str; 2]; 3],
    /// `dz_<variant>_sbmm_<t>_m<MT>`, by [`Dtype`] then [`Tile`].
    pub sbmm: [[&'static str; 2]; 3],
    /// `dz_<variant>_dequantize_<t>`, by [`Dtype`].
    pub dequantize: [&'static str; 3],
    /// `dz_<variant>_embedding_add_<t>`, by [`Dtype`].
    pub embedding_add: [&'static str; 3],
}

impl Entries {
    /// The matmul entry point for `dtype` and `tile`.
    pub fn matmul_add(&self, dtype: Dtype, tile: Tile) -> &'static str {
        self.matmul_add[dtype.index()][tile.index()]
    }

    /// The sbmm entry point for `dtype` and `tile`.
    pub fn sbmm(&self, dtype: Dtype, tile: Tile) -> &'static str {
        self.sbmm[dtype.index()][tile.index()]
    }

    /// The dequantize (and merge) entry point for `dtype`.
    pub fn dequantize(&self, dtype: Dtype) -> &'static str {
        self.dequantize[dtype.index()]
    }

    /// The embedding gather-add entry point for `dtype`.
    pub fn embedding_add(&self, dtype: Dtype) -> &'static str {
        self.embedding_add[dtype.index()]
    }

    /// Every entry point of the variant.
    pub fn all(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.matmul_add
            .iter()
            .chain(&self.sbmm)
            .flatten()
            .chain(&self.dequantize)
            .chain(&self.embedding_add)
            .copied()
    }
}

macro_rules! dtype_tiles {
    ($v:literal, $op:literal) => {
        [
            [
                concat!("dz_", $v, "_", $op, "_f32_m1"),
                concat!("dz_", $v, "_", $op, "_f32_m8"),
            ],
            [
                concat!("dz_", $v, "_", $op, "_f16_m1"),
                concat!("dz_", $v, "_", $op, "_f16_m8"),
            ],
            [
                concat!("dz_", $v, "_", $op, "_bf16_m1"),
                concat!("dz_", $v, "_", $op, "_bf16_m8"),
            ],
        ]
    };
}

macro_rules! dtypes {
    ($v:literal, $op:literal) => {
        [
            concat!("dz_", $v, "_", $op, "_f32"),
            concat!("dz_", $v, "_", $op, "_f16"),
            concat!("dz_", $v, "_", $op, "_bf16"),
        ]
    };
}

macro_rules! entries {
    ($v:literal) => {
        Entries {
            variant: $v,
            matmul_add: dtype_tiles!($v, "matmul_add"),
            sbmm: dtype_tiles!($v, "sbmm"),
            dequantize: dtypes!($v, "dequantize"),
            embedding_add: dtypes!($v, "embedding_add"),
        }
    };
}

// The tile suffixes above spell out M_TILES.
const _: () = assert!(M_TILES[0] == 1 && M_TILES[1] == 8);

/// `quant` with 2, 3, 4, 8 bits.
pub const QUANT: [Entries; 4] = [
    entries!("quant2"),
    entries!("quant3"),
    entries!("quant4"),
    entries!("quant8"),
];
/// `sparse24` with 2, 3, 4, 8 bits.
pub const SPARSE24: [Entries; 4] = [
    entries!("sparse24_2"),
    entries!("sparse24_3"),
    entries!("sparse24_4"),
    entries!("sparse24_8"),
];
/// `sparse` with 2, 3, 4, 8 bits.
pub const SPARSE: [Entries; 4] = [
    entries!("sparse2"),
    entries!("sparse3"),
    entries!("sparse4"),
    entries!("sparse8"),
];
/// `sign1`.
pub const SIGN1: Entries = entries!("sign1");
/// `dense` with f32, f16, bf16 values.
pub const DENSE: [Entries; 3] = [
    entries!("dense_f32"),
    entries!("dense_f16"),
    entries!("dense_bf16"),
];

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn all_variants() -> impl Iterator<Item = Variant> {
        Family::ALL
            .into_iter()
            .flat_map(|f| f.variants().iter().copied())
    }

    #[test]
    fn names_are_unique_and_match_their_variant() {
        let mut seen = HashSet::new();
        let mut n = 0;
        for v in all_variants() {
            let e = v.entries().expect("every listed variant has entries");
            for name in e.all() {
                assert!(
                    name.starts_with(&format!("dz_{}_", e.variant)),
                    "{name} of {v:?}"
                );
                assert!(seen.insert(name), "{name} twice");
                n += 1;
            }
        }
        // 16 variants x (6 matmul + 6 sbmm + 3 dequantize + 3 embedding).
        assert_eq!(n, 16 * 18);
        assert!(Variant::Quant(5).entries().is_none());
        assert_eq!(
            QUANT[2].matmul_add(Dtype::Bf16, Tile::Large),
            "dz_quant4_matmul_add_bf16_m8"
        );
        assert_eq!(SIGN1.sbmm(Dtype::F16, Tile::Small), "dz_sign1_sbmm_f16_m1");
    }

    #[test]
    fn launch_shape() {
        assert_eq!(CHUNK, 32 * 32);
        assert_eq!(THREADS, WARPS * 32);
        assert_eq!(ROWS_PER_BLOCK, WARPS * ROWS_PER_WARP);
        assert_eq!(Tile::Small.rows(), 1);
        assert_eq!(Tile::Large.rows(), 8);
    }

    /// Every named entry point is in its family's PTX, and the PTX has no entry point without a name here.
    #[cfg(feature = "cuda")]
    #[test]
    fn every_entry_point_is_in_the_ptx() {
        for family in Family::ALL {
            let ptx = family.ptx();
            let in_ptx: HashSet<&str> = ptx
                .lines()
                .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
                .map(|l| l.split('(').next().unwrap_or(l).trim())
                .collect();
            let named: HashSet<&str> = family
                .variants()
                .iter()
                .flat_map(|v| v.entries().expect("entries").all())
                .collect();
            assert_eq!(in_ptx, named, "{family:?}");
            assert!(
                ptx.contains(&format!(".target sm_{CUDA_COMPUTE_CAP}")),
                "{family:?}: target"
            );
        }
        assert!(NVCC_VERSION.contains("release"), "{NVCC_VERSION}");
    }
}

//! What to store: bits, grid and sparsity, shared by every method that produces a gridded codec.

use dz_format::QuantParams;

use crate::error::{Error, Result};

/// Which entries of a row are stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sparsity {
    /// Every entry (`quant` codec).
    None,
    /// 2 of every aligned run of 4 columns (`sparse24` codec); `cols` must be a multiple of 4.
    TwoFour,
    /// A fraction of each row (`sparse` codec).
    Unstructured {
        /// The fraction of entries kept, in `(0, 1]`.
        density: f32,
    },
}

/// Bits, grid and sparsity of a gridded codec (`quant`, `sparse24`, `sparse`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantConfig {
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u8,
    /// Columns per group; 0 = the whole row is one group.
    pub group_size: u32,
    /// Symmetric grid (zero point `2^(bits-1)`), else an f16 zero point per group.
    pub symmetric: bool,
    /// Which entries are stored.
    pub sparsity: Sparsity,
}

impl QuantConfig {
    /// Checks the configuration against a matrix of `cols` columns.
    pub fn validate(&self, cols: usize) -> Result<()> {
        self.params(1.0).validate().map_err(Error::InvalidConfig)?;
        match self.sparsity {
            Sparsity::None => {}
            Sparsity::TwoFour => {
                if !cols.is_multiple_of(4) {
                    return Err(Error::InvalidConfig(format!(
                        "2:4 sparsity needs a multiple of 4 columns, got {cols}"
                    )));
                }
            }
            Sparsity::Unstructured { density } => {
                if !(density > 0.0 && density <= 1.0) {
                    return Err(Error::InvalidConfig(format!(
                        "density must be in (0, 1], got {density}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The format's grid parameters with the given global scale.
    pub fn params(&self, global_scale: f32) -> QuantParams {
        QuantParams {
            bits: self.bits,
            group_size: self.group_size,
            symmetric: self.symmetric,
            global_scale,
        }
    }
}

/// How many of `n` entries a density keeps: `round(density * n)`, at most `n`.
pub(crate) fn kept_count(density: f32, n: usize) -> usize {
    ((f64::from(density) * n as f64).round() as usize).min(n)
}

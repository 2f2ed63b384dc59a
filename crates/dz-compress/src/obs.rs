//! Second-order joint pruning and quantization with error feedback (DeltaZip section 4.1, after SparseGPT
//! and GPTQ): the Optimal Brain Surgeon update applied column by column.
//!
//! For a delta `D` (`rows x cols`) and the layer's input Hessian `H = 2/n * sum(x x^T)` (`cols x cols`), the
//! sweep visits columns left to right. Each column is pruned (by the mask) or rounded onto its group's stored
//! grid, and the error is spread over the not-yet-visited columns through the upper Cholesky factor `U` of
//! `H^-1` (`H^-1 = U^T U`), which is what keeps `||(D - D^) X||^2` low. As in GPTQ:
//! - dampening: `damp * mean(diag H)` is added to the diagonal; inputs that never fire (`H_ii == 0`) get
//!   `H_ii = 1` and their weight column is zeroed;
//! - lazy batch updates: inside a block of `block_size` columns the update is applied per column; the rest of
//!   the matrix is updated once per block with one matrix product;
//! - group grids are fitted lazily, when the sweep reaches a group's first column, to the values as updated
//!   so far (GPTQ's `static_groups=False`);
//! - 2:4 masks are chosen when the sweep reaches each run of 4, keeping the 2 of largest OBS saliency
//!   `w^2 / U_ii^2` (SparseGPT's `prunen`/`prunem`); unstructured masks are chosen at the start of each block,
//!   per row, keeping the `round(density * block)` entries of largest saliency.
//!
//! Rows are independent given `U` (only the sweep order couples columns), so each block's sweep runs in
//! parallel over rows. The factorizations use faer, in f64 for headroom on ill-conditioned Hessians.

use dz_format::codec::Payload;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use half::f16;
use rayon::prelude::*;

use crate::assemble::{keep_top, keep_two_of_four, Coded};
use crate::config::{kept_count, QuantConfig, Sparsity};
use crate::error::{calibrated_error, check_dims, check_finite, check_len, Error, Result};
use crate::grid::{choose_global_scale, GroupGrid};

/// How many dampings [`obs`] tries before giving up with [`Error::NotPositiveDefinite`].
pub const DAMP_ATTEMPTS: usize = 4;

/// Configuration of [`obs`].
///
/// The grid and sparsity are a [`QuantConfig`] (shared with [`crate::rtn::rtn`], so a baseline and OBS at the
/// same setting are one value apart), plus the two OBS-only knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObsConfig {
    /// What to store.
    pub quant: QuantConfig,
    /// Columns per lazy-update block (GPTQ and SparseGPT use 128). A multiple of 4 for 2:4.
    pub block_size: usize,
    /// Relative dampening: `damp * mean(diag H)` is added to the diagonal (GPTQ's `percdamp`, 0.01).
    pub damp: f32,
}

impl ObsConfig {
    /// `quant` with GPTQ's defaults: blocks of 128 columns, dampening 0.01.
    pub fn new(quant: QuantConfig) -> ObsConfig {
        ObsConfig {
            quant,
            block_size: 128,
            damp: 0.01,
        }
    }

    /// Checks the configuration against a matrix of `cols` columns.
    pub fn validate(&self, cols: usize) -> Result<()> {
        self.quant.validate(cols)?;
        if self.block_size == 0 {
            return Err(Error::InvalidConfig("block_size must be at least 1".into()));
        }
        if self.quant.sparsity == Sparsity::TwoFour && !self.block_size.is_multiple_of(4) {
            return Err(Error::InvalidConfig(format!(
                "2:4 sparsity needs a block_size that is a multiple of 4, got {}",
                self.block_size
            )));
        }
        if !(self.damp.is_finite() && self.damp >= 0.0) {
            return Err(Error::InvalidConfig(format!(
                "damp must be finite and >= 0, got {}",
                self.damp
            )));
        }
        Ok(())
    }
}

/// What [`obs`] produced for one matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct ObsOutput {
    /// The compressed delta.
    pub payload: Payload,
    /// Its calibrated error `trace((D - D^) H (D - D^)^T)` under the undamped Hessian given
    /// ([`calibrated_error`]).
    pub error: f64,
    /// The relative dampening that was used (`cfg.damp`, or larger if the Cholesky factorization needed it).
    pub damp: f64,
    /// How many inputs were dead (`H_ii == 0`); their weight columns were zeroed.
    pub dead_inputs: usize,
}

/// The relative dampings tried, in order: `damp`, then `max(damp, 0.01)` times 10, 100, 1000.
fn damp_schedule(damp: f64) -> [f64; DAMP_ATTEMPTS] {
    let base = damp.max(0.01);
    std::array::from_fn(|k| {
        if k == 0 {
            damp
        } else {
            base * 10f64.powi(k as i32)
        }
    })
}

/// The upper Cholesky factor `U` of `(H + damp * mean(diag H) * I)^-1` (`H^-1 = U^T U`), row-major f32, with
/// dead inputs' diagonal set to 1 first. Returns `U` and the relative damping used.
fn inverse_factor(h: &[f32], cols: usize, dead: &[bool], damp: f64) -> Result<(Vec<f32>, f64)> {
    let mut hm = Mat::<f64>::from_fn(cols, cols, |i, j| f64::from(h[i * cols + j]));
    for (i, &is_dead) in dead.iter().enumerate() {
        if is_dead {
            hm[(i, i)] = 1.0;
        }
    }
    let mean_diag = (0..cols).map(|i| hm[(i, i)]).sum::<f64>() / cols as f64;
    let schedule = damp_schedule(damp);
    for &rel in &schedule {
        let mut hd = hm.clone();
        for i in 0..cols {
            hd[(i, i)] += rel * mean_diag;
        }
        let Ok(llt) = hd.llt(Side::Lower) else {
            continue;
        };
        let hinv = faer::linalg::solvers::DenseSolveCore::inverse(&llt);
        let Ok(llt_inv) = hinv.llt(Side::Lower) else {
            continue;
        };
        let l = llt_inv.L();
        // U = L^T: U[i][j] = L[j][i] for j >= i.
        let mut u = vec![0.0f32; cols * cols];
        for (i, urow) in u.chunks_exact_mut(cols).enumerate() {
            for (j, uij) in urow.iter_mut().enumerate().skip(i) {
                *uij = l[(j, i)] as f32;
            }
        }
        let positive_diag = (0..cols).all(|i| u[i * cols + i] > 0.0);
        if positive_diag && u.iter().all(|x| x.is_finite()) {
            return Ok((u, rel));
        }
    }
    Err(Error::NotPositiveDefinite {
        dim: cols,
        max_damp: schedule[DAMP_ATTEMPTS - 1],
        attempts: DAMP_ATTEMPTS,
    })
}

/// Second-order pruning and quantization of one delta `d` (`rows x cols`, row-major) under the Hessian `h`
/// (`cols x cols`, row-major, symmetric positive semi-definite; the factorization reads its lower triangle).
/// See the module docs for the algorithm.
///
/// The global scale is chosen from the original delta ([`choose_global_scale`]). Every value fed back into
/// the error correction is the stored grid's decoded value, so the returned error is the error a reader sees.
///
/// Errors: [`Error::BadDims`], [`Error::ShapeMismatch`], [`Error::NonFinite`], [`Error::InvalidConfig`],
/// [`Error::NotPositiveDefinite`] (after [`DAMP_ATTEMPTS`] dampings).
pub fn obs(d: &[f32], rows: usize, cols: usize, h: &[f32], cfg: &ObsConfig) -> Result<ObsOutput> {
    let n = check_dims(rows, cols)?;
    check_len("delta", d.len(), n)?;
    let hn = cols
        .checked_mul(cols)
        .ok_or(Error::BadDims { rows, cols })?;
    check_len("hessian", h.len(), hn)?;
    check_finite("delta", d)?;
    check_finite("hessian", h)?;
    cfg.validate(cols)?;

    let dead: Vec<bool> = (0..cols).map(|i| h[i * cols + i] == 0.0).collect();
    let dead_inputs = dead.iter().filter(|&&x| x).count();
    let (u, damp) = inverse_factor(h, cols, &dead, f64::from(cfg.damp))?;

    let q = cfg.quant;
    let params = q.params(choose_global_scale(
        d,
        cols,
        q.bits,
        q.group_size,
        q.symmetric,
    ));
    let ng = params.n_groups(cols);

    // The working copy: columns of dead inputs zeroed, then updated by the sweep.
    let mut w = d.to_vec();
    for row in w.chunks_exact_mut(cols) {
        for (x, &is_dead) in row.iter_mut().zip(&dead) {
            if is_dead {
                *x = 0.0;
            }
        }
    }
    let mut out = Coded::new(rows, cols, params);
    let mut d_hat = vec![0.0f32; n];
    let bs = cfg.block_size.min(cols);
    let mut err = vec![0.0f32; rows * bs];
    let ctx = Sweep {
        u: &u,
        cols,
        grid: params,
        sparsity: q.sparsity,
    };

    for i1 in (0..cols).step_by(bs) {
        let i2 = (i1 + bs).min(cols);
        let count = i2 - i1;
        let err = &mut err[..rows * count];
        w.par_chunks_mut(cols)
            .zip(d_hat.par_chunks_mut(cols))
            .zip(out.codes.par_chunks_mut(cols))
            .zip(out.kept.par_chunks_mut(cols))
            .zip(out.scales.par_chunks_mut(ng))
            .zip(out.zeros.par_chunks_mut(ng))
            .zip(err.par_chunks_mut(count))
            .for_each(|((((((w, d_hat), codes), kept), scales), zeros), err)| {
                let mut row = RowOut {
                    w,
                    d_hat,
                    codes,
                    kept,
                    scales,
                    zeros,
                    err,
                };
                ctx.block(&mut row, i1, i2);
            });
        if i2 < cols {
            // W[:, i2..] -= Err @ U[i1..i2, i2..]
            let rest = cols - i2;
            let dst = MatMut::from_row_major_slice_mut(&mut w, rows, cols)
                .submatrix_mut(0, i2, rows, rest);
            let lhs = MatRef::from_row_major_slice(err, rows, count);
            let rhs = MatRef::from_row_major_slice(&u, cols, cols).submatrix(i1, i2, count, rest);
            matmul(dst, Accum::Add, lhs, rhs, -1.0f32, Par::rayon(0));
        }
    }
    drop(w);
    let error = calibrated_error(d, &d_hat, h, rows, cols)?;
    Ok(ObsOutput {
        payload: out.into_payload(q.sparsity),
        error,
        damp,
        dead_inputs,
    })
}

/// One row's buffers during a block's sweep.
struct RowOut<'a> {
    /// The row's working values (whole row).
    w: &'a mut [f32],
    /// The decoded values (whole row).
    d_hat: &'a mut [f32],
    codes: &'a mut [u8],
    kept: &'a mut [bool],
    scales: &'a mut [f16],
    zeros: &'a mut [f16],
    /// The scaled errors `(w - q) / U_ii` of the block's columns.
    err: &'a mut [f32],
}

/// What every row's sweep shares.
struct Sweep<'a> {
    /// `U`, row-major `cols x cols`.
    u: &'a [f32],
    cols: usize,
    grid: dz_format::QuantParams,
    sparsity: Sparsity,
}

impl Sweep<'_> {
    /// `U_ii`.
    #[inline]
    fn diag(&self, i: usize) -> f32 {
        self.u[i * self.cols + i]
    }

    /// The OBS saliency of pruning `w` in column `i`: `w^2 / U_ii^2` (`U_ii^2` is `[H^-1]_ii` with the
    /// columns before `i` already fixed).
    #[inline]
    fn saliency(&self, w: f32, i: usize) -> f32 {
        let dii = self.diag(i);
        w * w / (dii * dii)
    }

    /// Sweeps columns `i1..i2` of one row.
    fn block(&self, row: &mut RowOut<'_>, i1: usize, i2: usize) {
        if let Sparsity::Unstructured { density } = self.sparsity {
            let s: Vec<f32> = (i1..i2).map(|j| self.saliency(row.w[j], j)).collect();
            keep_top(&s, kept_count(density, i2 - i1), &mut row.kept[i1..i2]);
        }
        let gsz = self.grid.group_size as usize;
        let mut grid = GroupGrid::new(f16::ONE, None, self.grid.bits, 1.0);
        for i in i1..i2 {
            let at_group_start = if gsz == 0 { i == 0 } else { i % gsz == 0 };
            let g = self.grid.group_of(i);
            if at_group_start {
                let end = if gsz == 0 {
                    self.cols
                } else {
                    (i + gsz).min(self.cols)
                };
                grid = GroupGrid::fit(&row.w[i..end], &self.grid);
                row.scales[g] = grid.scale;
                row.zeros[g] = grid.zero.unwrap_or(f16::ZERO);
            } else if i == i1 {
                // A group that started in an earlier block: rebuild its grid from what was stored.
                let zero = (!self.grid.symmetric).then_some(row.zeros[g]);
                grid = GroupGrid::new(row.scales[g], zero, self.grid.bits, self.grid.global_scale);
            }
            if self.sparsity == Sparsity::TwoFour && i % 4 == 0 {
                let s = std::array::from_fn(|k| self.saliency(row.w[i + k], i + k));
                keep_two_of_four(s, &mut row.kept[i..i + 4]);
            }
            let x = row.w[i];
            let (code, value) = if row.kept[i] {
                grid.quantize(x)
            } else {
                (0, 0.0)
            };
            row.codes[i] = code;
            row.d_hat[i] = value;
            let e = (x - value) / self.diag(i);
            row.err[i - i1] = e;
            let urow = &self.u[i * self.cols..(i + 1) * self.cols];
            for (wj, &uij) in row.w[i + 1..i2].iter_mut().zip(&urow[i + 1..i2]) {
                *wj -= e * uij;
            }
        }
    }
}

//! Baselines (DeltaZip section 6 compares against them): round-to-nearest quantization, magnitude pruning
//! followed by round-to-nearest, and BitDelta's 1-bit sign with a per-row scale.
//!
//! None of these look at calibration data; they are what OBS ([`mod@crate::obs`]) must beat at equal size.

use dz_format::codec::{Payload, Sign1};
use half::f16;
use rayon::prelude::*;

use crate::assemble::{keep_top, keep_two_of_four, Coded};
use crate::config::{kept_count, QuantConfig, Sparsity};
use crate::error::{check_dims, check_finite, check_len, Result};
use crate::grid::{choose_global_scale, global_scale_for, group_ranges, GroupGrid};

/// Checks `d` against `rows x cols`: non-empty, right length, finite.
fn check_delta(d: &[f32], rows: usize, cols: usize) -> Result<()> {
    let n = check_dims(rows, cols)?;
    check_len("delta", d.len(), n)?;
    check_finite("delta", d)
}

/// Marks the entries of one row that magnitude pruning keeps: the 2 largest `|w|` of every aligned run of 4
/// (2:4), or the `round(density * cols)` largest of the row (unstructured), or all.
fn magnitude_row(row: &[f32], sparsity: Sparsity, kept: &mut [bool]) {
    match sparsity {
        Sparsity::None => kept.fill(true),
        Sparsity::TwoFour => {
            for (run, k) in row.chunks_exact(4).zip(kept.chunks_exact_mut(4)) {
                keep_two_of_four(std::array::from_fn(|i| run[i].abs()), k);
            }
        }
        Sparsity::Unstructured { density } => {
            let score: Vec<f32> = row.iter().map(|w| w.abs()).collect();
            keep_top(&score, kept_count(density, row.len()), kept);
        }
    }
}

/// The mask magnitude pruning keeps (`true` = stored) for a `rows x cols` delta: see [`Sparsity`]. Ties go
/// to the lower column.
pub fn magnitude_mask(
    d: &[f32],
    rows: usize,
    cols: usize,
    sparsity: Sparsity,
) -> Result<Vec<bool>> {
    check_delta(d, rows, cols)?;
    QuantConfig {
        bits: 8,
        group_size: 0,
        symmetric: true,
        sparsity,
    }
    .validate(cols)?;
    let mut kept = vec![true; d.len()];
    d.par_chunks(cols)
        .zip(kept.par_chunks_mut(cols))
        .for_each(|(row, k)| magnitude_row(row, sparsity, k));
    Ok(kept)
}

/// Round-to-nearest: prunes by magnitude as `cfg.sparsity` says, fits each group's grid to the kept values,
/// and rounds every kept value to its nearest code. Gives `Payload::Quant`, `Payload::Sparse24` or
/// `Payload::Sparse`.
///
/// The global scale is chosen from the whole delta ([`choose_global_scale`]).
pub fn rtn(d: &[f32], rows: usize, cols: usize, cfg: &QuantConfig) -> Result<Payload> {
    check_delta(d, rows, cols)?;
    cfg.validate(cols)?;
    let gs = choose_global_scale(d, cols, cfg.bits, cfg.group_size, cfg.symmetric);
    let params = cfg.params(gs);
    let ng = params.n_groups(cols);
    let mut out = Coded::new(rows, cols, params);
    d.par_chunks(cols)
        .zip(out.codes.par_chunks_mut(cols))
        .zip(out.kept.par_chunks_mut(cols))
        .zip(out.scales.par_chunks_mut(ng))
        .zip(out.zeros.par_chunks_mut(ng))
        .for_each(|((((row, codes), kept), scales), zeros)| {
            magnitude_row(row, cfg.sparsity, kept);
            let mut buf = Vec::new();
            for (g, cols) in group_ranges(row.len(), params.group_size).enumerate() {
                buf.clear();
                buf.extend(cols.clone().filter(|&c| kept[c]).map(|c| row[c]));
                let grid = GroupGrid::fit(&buf, &params);
                scales[g] = grid.scale;
                zeros[g] = grid.zero.unwrap_or(f16::ZERO);
                for c in cols {
                    codes[c] = if kept[c] { grid.code(row[c]) } else { 0 };
                }
            }
        });
    Ok(out.into_payload(cfg.sparsity))
}

/// BitDelta's 1-bit mode: each entry stores its sign (`d >= 0` is +1), each row the scale `mean |d|` over the
/// row, which minimizes the row's squared error for those signs. The global scale is the power of two that
/// brings the largest row scale into `[1, 2)`. A row of zeros gets scale 0 and decodes to zeros.
pub fn sign1(d: &[f32], rows: usize, cols: usize) -> Result<Payload> {
    check_delta(d, rows, cols)?;
    let means: Vec<f32> = d
        .par_chunks(cols)
        .map(|row| (row.iter().map(|&w| f64::from(w.abs())).sum::<f64>() / cols as f64) as f32)
        .collect();
    let global_scale = global_scale_for(means.iter().copied().fold(0.0, f32::max));
    let scales = means
        .iter()
        .map(|&m| {
            let s = f16::from_f32(m / global_scale);
            // Keep a non-zero row non-zero: underflow goes to the smallest subnormal, never to 0.
            if m > 0.0 && s.to_f32() == 0.0 {
                f16::from_bits(1)
            } else {
                s
            }
        })
        .collect();
    Ok(Payload::Sign1(Sign1 {
        rows,
        cols,
        global_scale,
        signs: d.iter().map(|&w| w >= 0.0).collect(),
        scales,
    }))
}

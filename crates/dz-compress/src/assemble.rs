//! Turns per-entry codes and a kept mask into the codec's logical payload (dz-format's `Quant`, `Sparse24`,
//! `Sparse`). Shared by every gridded method, so RTN and OBS cannot disagree on the layout.

use dz_format::codec::{Grid, Payload, Quant, Sparse, Sparse24};
use dz_format::QuantParams;
use half::f16;

use crate::config::Sparsity;

/// What a gridded method computed for a `rows x cols` matrix: one code per entry (ignored where not kept),
/// which entries are kept, and one scale (and zero point when asymmetric) per group.
pub(crate) struct Coded {
    pub rows: usize,
    pub cols: usize,
    pub params: QuantParams,
    pub codes: Vec<u8>,
    pub kept: Vec<bool>,
    pub scales: Vec<f16>,
    pub zeros: Vec<f16>,
}

impl Coded {
    /// Zeroed buffers for a `rows x cols` matrix; every entry kept.
    pub fn new(rows: usize, cols: usize, params: QuantParams) -> Coded {
        let n_groups = rows * params.n_groups(cols);
        Coded {
            rows,
            cols,
            params,
            codes: vec![0; rows * cols],
            kept: vec![true; rows * cols],
            scales: vec![f16::ZERO; n_groups],
            // Allocated even when symmetric (then dropped), so rows can be zipped uniformly.
            zeros: vec![f16::ZERO; n_groups],
        }
    }

    /// The payload of the codec `sparsity` selects. For 2:4, `kept` must hold exactly 2 of every run of 4
    /// (every caller builds it so).
    pub fn into_payload(self, sparsity: Sparsity) -> Payload {
        let Coded {
            rows,
            cols,
            params,
            codes,
            kept,
            scales,
            zeros,
        } = self;
        let grid = Grid {
            params,
            scales,
            zeros: (!params.symmetric).then_some(zeros),
        };
        match sparsity {
            Sparsity::None => Payload::Quant(Quant {
                rows,
                cols,
                grid,
                codes,
            }),
            Sparsity::TwoFour => {
                let mut kept_codes = Vec::with_capacity(rows * cols / 2);
                let mut positions = Vec::with_capacity(rows * cols / 2);
                for (run_codes, run_kept) in codes.chunks_exact(4).zip(kept.chunks_exact(4)) {
                    for p in 0..4 {
                        if run_kept[p] {
                            kept_codes.push(run_codes[p]);
                            positions.push(p as u8);
                        }
                    }
                }
                debug_assert_eq!(kept_codes.len(), rows * cols / 2);
                Payload::Sparse24(Sparse24 {
                    rows,
                    cols,
                    grid,
                    codes: kept_codes,
                    positions,
                })
            }
            Sparsity::Unstructured { .. } => {
                let kept_codes = codes
                    .iter()
                    .zip(&kept)
                    .filter_map(|(&c, &k)| k.then_some(c))
                    .collect();
                Payload::Sparse(Sparse {
                    rows,
                    cols,
                    grid,
                    mask: kept,
                    codes: kept_codes,
                })
            }
        }
    }
}

/// Marks the `keep` entries of largest `score` in `kept` (others false). Ties go to the lower index, so the
/// choice is deterministic.
pub(crate) fn keep_top(score: &[f32], keep: usize, kept: &mut [bool]) {
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    kept.fill(false);
    for &i in order.iter().take(keep) {
        kept[i] = true;
    }
}

/// Marks the 2 entries of largest `score` of a run of 4 (ties to the lower index): [`keep_top`] without
/// allocating, for the per-run hot loop.
#[inline]
pub(crate) fn keep_two_of_four(score: [f32; 4], kept: &mut [bool]) {
    // An entry is kept when fewer than two others rank above it. `total_cmp` plus the index make the ranking a
    // strict total order (NaN included), so exactly two are kept.
    for i in 0..4 {
        let beaten_by = (0..4)
            .filter(|&j| j != i && score[j].total_cmp(&score[i]).then(i.cmp(&j)).is_gt())
            .count();
        kept[i] = beaten_by < 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_of_four_matches_keep_top() {
        let runs: [[f32; 4]; 6] = [
            [1.0, 2.0, 3.0, 4.0],
            [4.0, 3.0, 2.0, 1.0],
            [0.0, 0.0, 0.0, 0.0],
            [1.0, 5.0, 1.0, 5.0],
            [2.0, 1.0, 1.0, 1.0],
            [f32::NAN, 1.0, 0.0, 3.0],
        ];
        for run in runs {
            let (mut fast, mut slow) = ([false; 4], [false; 4]);
            keep_two_of_four(run, &mut fast);
            keep_top(&run, 2, &mut slow);
            assert_eq!(fast, slow, "{run:?}");
            assert_eq!(fast.iter().filter(|&&k| k).count(), 2, "{run:?}");
        }
    }
}

//! The crate's error type, and the calibrated error metric that every method is judged by.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};

/// Everything that can go wrong while compressing one matrix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A buffer's length does not match the dimensions given with it.
    #[error("{what}: expected {expected} values, got {got}")]
    ShapeMismatch {
        /// Which buffer.
        what: &'static str,
        /// The length the dimensions imply.
        expected: usize,
        /// The buffer's length.
        got: usize,
    },
    /// A matrix with no rows or no columns, or one whose size overflows `usize`.
    #[error("a {rows} x {cols} matrix cannot be compressed")]
    BadDims {
        /// Rows given.
        rows: usize,
        /// Columns given.
        cols: usize,
    },
    /// A NaN or an infinity in an input.
    #[error("{what}: value at index {index} is not finite")]
    NonFinite {
        /// Which input.
        what: &'static str,
        /// The first offending index (row-major).
        index: usize,
    },
    /// The damped Hessian (or its inverse) has no Cholesky factor, even after raising the damping.
    #[error(
        "the {dim} x {dim} Hessian is not positive definite, even with damping {max_damp} x mean(diag H) \
         ({attempts} attempts)"
    )]
    NotPositiveDefinite {
        /// The Hessian's dimension.
        dim: usize,
        /// The largest relative damping tried.
        max_damp: f64,
        /// How many dampings were tried.
        attempts: usize,
    },
    /// A configuration that no codec can store or no method can run.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A model directory, its config.json or its weights are unusable (the message names the file or tensor).
    #[error("{0}")]
    InvalidModel(String),
    /// Base and fine-tune do not match (architecture, tensor set, shapes).
    #[error("base and fine-tune do not match: {0}")]
    Mismatch(String),
    /// The calibration data cannot be used (too short, not tokenizable).
    #[error("calibration: {0}")]
    Calibration(String),
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An error from the delta format (writing or reading a delta).
    #[error(transparent)]
    Format(#[from] dz_format::Error),
    /// An error from candle (a tensor op, a device).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// `rows * cols`, or [`Error::BadDims`] when either is zero or the product overflows.
pub(crate) fn check_dims(rows: usize, cols: usize) -> Result<usize> {
    match rows.checked_mul(cols) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(Error::BadDims { rows, cols }),
    }
}

/// Checks a buffer's length.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            what,
            expected,
            got,
        })
    }
}

/// Checks that every value is finite.
pub(crate) fn check_finite(what: &'static str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite { what, index }),
    }
}

/// The calibrated error of a reconstruction `d_hat` of `d` (both `rows x cols`, row-major) under the Hessian
/// `h` (`cols x cols`, row-major): `trace((D - D^) H (D - D^)^T)`.
///
/// With `H = 2/n * sum(x x^T)` over calibration inputs this is `2/n * ||(D - D^) X||_F^2`: the squared error
/// the compressed delta adds to the layer's outputs on the calibration set, which is what OBS minimizes
/// (DeltaZip section 4.1). Accumulated in f64.
///
/// Returns a `Result` rather than a bare `f64` because the dimensions come from the caller: a mismatch is
/// [`Error::ShapeMismatch`], never a panic.
pub fn calibrated_error(
    d: &[f32],
    d_hat: &[f32],
    h: &[f32],
    rows: usize,
    cols: usize,
) -> Result<f64> {
    let n = check_dims(rows, cols)?;
    check_len("delta", d.len(), n)?;
    check_len("reconstruction", d_hat.len(), n)?;
    let hn = cols
        .checked_mul(cols)
        .ok_or(Error::BadDims { rows, cols })?;
    check_len("hessian", h.len(), hn)?;
    let e = Mat::<f64>::from_fn(rows, cols, |r, c| {
        f64::from(d[r * cols + c]) - f64::from(d_hat[r * cols + c])
    });
    let hm = Mat::<f64>::from_fn(cols, cols, |i, j| f64::from(h[i * cols + j]));
    let mut eh = Mat::<f64>::zeros(rows, cols);
    matmul(
        eh.as_mut(),
        Accum::Replace,
        e.as_ref(),
        hm.as_ref(),
        1.0,
        Par::rayon(0),
    );
    let mut total = 0.0;
    for c in 0..cols {
        let (a, b) = (eh.col(c), e.col(c));
        for r in 0..rows {
            total += a[r] * b[r];
        }
    }
    Ok(total)
}

//! CPU decoder of `zero`: zeros.

use crate::codec::RowDecode;
use crate::cpu::HostDelta;

/// Decoder of `zero`.
pub(crate) struct ZeroDec {
    rows: usize,
    cols: usize,
}

impl ZeroDec {
    /// `h` holds a `zero` delta (no parts).
    pub(crate) fn new(h: &HostDelta<'_>) -> Self {
        ZeroDec {
            rows: h.n_stored,
            cols: h.k,
        }
    }
}

impl RowDecode for ZeroDec {
    const ZERO: bool = true;

    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    #[inline(always)]
    fn decode(&self, _r: usize, _c0: usize, out: &mut [f32]) {
        out.fill(0.0);
    }
}

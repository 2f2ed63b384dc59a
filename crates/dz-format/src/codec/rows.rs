//! Row subsets (SPEC.md section 3.6): the `row_index` part lists the stored rows of the matrix.

use super::invalid_part;
use super::invalid_payload;
use crate::error::Result;

/// The `row_index` part: the stored rows as little-endian `u32`.
pub fn pack_row_index(rows: &[u32]) -> Vec<u8> {
    rows.iter().flat_map(|r| r.to_le_bytes()).collect()
}

/// Decodes and checks a `row_index` part: a whole number of `u32`, at least one, strictly increasing,
/// each `< n_total`.
pub fn unpack_row_index(tensor: &str, bytes: &[u8], n_total: usize) -> Result<Vec<u32>> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return Err(invalid_part(
            tensor,
            "row_index",
            format!("is {} bytes; must be a non-zero multiple of 4", bytes.len()),
        ));
    }
    let rows: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for (i, &r) in rows.iter().enumerate() {
        if r as usize >= n_total {
            return Err(invalid_payload(
                tensor,
                format!("row_index[{i}] = {r} is not below the {n_total} rows of the matrix"),
            ));
        }
        if i > 0 && rows[i - 1] >= r {
            return Err(invalid_payload(
                tensor,
                format!(
                    "row_index is not strictly increasing: row_index[{}] = {}, row_index[{i}] = {r}",
                    i - 1,
                    rows[i - 1]
                ),
            ));
        }
    }
    Ok(rows)
}

/// Expands the stored rows of a row subset to the full `n_total x cols` matrix, row-major; rows not in
/// `row_index` are zero.
///
/// # Panics
/// If `stored.len() != row_index.len() * cols` or an index is `>= n_total` (a checked row index from
/// [`unpack_row_index`] and a payload of its rows satisfy both).
pub fn scatter_rows(row_index: &[u32], stored: &[f32], cols: usize, n_total: usize) -> Vec<f32> {
    assert_eq!(
        stored.len(),
        row_index.len() * cols,
        "scatter_rows: {} stored rows of {cols} columns",
        row_index.len()
    );
    let mut out = vec![0.0f32; n_total * cols];
    if cols == 0 {
        return out;
    }
    for (&r, row) in row_index.iter().zip(stored.chunks_exact(cols)) {
        let r = r as usize;
        assert!(r < n_total, "scatter_rows: row {r} is not below {n_total}");
        out[r * cols..(r + 1) * cols].copy_from_slice(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn row_index_bytes() {
        let b = pack_row_index(&[1, 258]);
        assert_eq!(b, [1, 0, 0, 0, 2, 1, 0, 0]);
        assert_eq!(unpack_row_index("t", &b, 259).unwrap(), [1, 258]);
        assert!(matches!(
            unpack_row_index("t", &b, 258),
            Err(Error::InvalidPayload { .. })
        ));
        assert!(matches!(
            unpack_row_index("t", &pack_row_index(&[3, 3]), 10),
            Err(Error::InvalidPayload { .. })
        ));
        assert!(matches!(
            unpack_row_index("t", &b[..7], 259),
            Err(Error::InvalidPart { .. })
        ));
        assert!(matches!(
            unpack_row_index("t", &[], 259),
            Err(Error::InvalidPart { .. })
        ));
    }

    #[test]
    fn scatter() {
        let out = scatter_rows(&[0, 2], &[1.0, 2.0, 3.0, 4.0], 2, 4);
        assert_eq!(out, [1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0]);
    }
}

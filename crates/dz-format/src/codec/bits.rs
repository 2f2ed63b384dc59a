//! LSB-first bit streams (SPEC.md section 3).
//!
//! A bit stream of `n` values of `b` bits stores value `j` in stream bits `[j*b, (j+1)*b)`, and stream bit
//! `i` is bit `i % 8` (LSB = 0) of byte `i / 8`. A row is padded with zero bits to
//! [`stride(n, b)`](crate::layout::stride) bytes.
//!
//! These are the slow, obviously-correct twins of every fast unpacker: one value at a time, no word tricks.
//! They panic on misuse (an unsupported width, a short buffer, a value that does not fit): their callers
//! check lengths and values from files first and turn failures into named errors.

/// The value widths a bit stream supports.
pub const SUPPORTED_BITS: [u8; 5] = [1, 2, 3, 4, 8];

/// Bytes that hold `n` values of `bits` bits, without row padding: `ceil(n * bits / 8)`.
///
/// `None` when `n * bits` overflows.
pub fn packed_len(n: usize, bits: u8) -> Option<usize> {
    Some(n.checked_mul(bits as usize)?.div_ceil(8))
}

fn check_bits(bits: u8) {
    assert!(
        SUPPORTED_BITS.contains(&bits),
        "bit stream width must be one of {SUPPORTED_BITS:?}, got {bits}"
    );
}

/// The largest value of `bits` bits.
fn max_value(bits: u8) -> u8 {
    // bits <= 8, so this fits in a u8.
    ((1u16 << bits) - 1) as u8
}

/// Packs `values` (each `< 2^bits`) into one bit stream row in `out`.
///
/// Every byte of `out` is written: the values first, then zero bits to the end of `out` (pass a slice of
/// [`stride(values.len(), bits)`](crate::layout::stride) bytes to get a padded row).
///
/// # Panics
/// If `bits` is not one of [`SUPPORTED_BITS`], if `out` is shorter than
/// [`packed_len(values.len(), bits)`](packed_len), or if a value does not fit in `bits` bits.
pub fn pack_row(values: &[u8], bits: u8, out: &mut [u8]) {
    check_bits(bits);
    let need = packed_len(values.len(), bits).expect("bit stream length overflows usize");
    assert!(
        out.len() >= need,
        "{} values of {bits} bits need {need} bytes, the output has {}",
        values.len(),
        out.len()
    );
    out.fill(0);
    let b = bits as usize;
    let max = max_value(bits);
    for (j, &v) in values.iter().enumerate() {
        assert!(
            v <= max,
            "value {v} at index {j} does not fit in {bits} bits"
        );
        let bit = j * b;
        let (byte, shift) = (bit / 8, bit % 8);
        // shift <= 7 and b <= 8: the value spans at most two bytes.
        let w = u16::from(v) << shift;
        out[byte] |= w as u8;
        if shift + b > 8 {
            out[byte + 1] |= (w >> 8) as u8;
        }
    }
}

/// Unpacks the first `n` values of `bits` bits from the bit stream row `src` into `out[..n]`.
///
/// Padding bits after value `n - 1` are not looked at; see [`padding_is_zero`].
///
/// # Panics
/// If `bits` is not one of [`SUPPORTED_BITS`], if `src` is shorter than
/// [`packed_len(n, bits)`](packed_len), or if `out` is shorter than `n`.
pub fn unpack_row(src: &[u8], n: usize, bits: u8, out: &mut [u8]) {
    check_bits(bits);
    let need = packed_len(n, bits).expect("bit stream length overflows usize");
    assert!(
        src.len() >= need,
        "{n} values of {bits} bits need {need} bytes, the source has {}",
        src.len()
    );
    assert!(
        out.len() >= n,
        "output holds {} values, asked for {n}",
        out.len()
    );
    let b = bits as usize;
    let max = max_value(bits);
    for (j, o) in out[..n].iter_mut().enumerate() {
        let bit = j * b;
        let (byte, shift) = (bit / 8, bit % 8);
        let mut w = u16::from(src[byte]);
        if shift + b > 8 {
            w |= u16::from(src[byte + 1]) << 8;
        }
        *o = (w >> shift) as u8 & max;
    }
}

/// Whether every bit of `src` after the first `n` values of `bits` bits is zero.
///
/// # Panics
/// If `bits` is not one of [`SUPPORTED_BITS`] or `src` is shorter than [`packed_len(n, bits)`](packed_len).
pub fn padding_is_zero(src: &[u8], n: usize, bits: u8) -> bool {
    check_bits(bits);
    let used = n
        .checked_mul(bits as usize)
        .expect("bit stream length overflows usize");
    let need = used.div_ceil(8);
    assert!(
        src.len() >= need,
        "{n} values of {bits} bits need {need} bytes, the source has {}",
        src.len()
    );
    let (full, shift) = (used / 8, used % 8);
    let partial_ok = shift == 0 || src[full] >> shift == 0;
    partial_ok && src[need..].iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::stride;

    fn packed(values: &[u8], bits: u8) -> Vec<u8> {
        let mut out = vec![0xAA; stride(values.len(), bits).unwrap()];
        pack_row(values, bits, &mut out);
        out
    }

    fn unpacked(src: &[u8], n: usize, bits: u8) -> Vec<u8> {
        let mut out = vec![0; n];
        unpack_row(src, n, bits, &mut out);
        out
    }

    /// The literal example of the brief: value 0 in the low nibble of byte 0.
    #[test]
    fn four_bits() {
        let row = packed(&[1, 2, 3], 4);
        let mut want = [0u8; 16];
        want[..2].copy_from_slice(&[0x21, 0x03]);
        assert_eq!(row, want);
        assert_eq!(unpacked(&row, 3, 4), [1, 2, 3]);
        assert!(padding_is_zero(&row, 3, 4));
    }

    #[test]
    fn one_two_eight_bits() {
        // bit j of the stream is bit j % 8 of byte j / 8.
        let row = packed(&[1, 0, 1, 1, 0, 0, 0, 0, 1, 1], 1);
        assert_eq!(&row[..2], &[0b0000_1101, 0b0000_0011]);
        assert_eq!(row.len(), 16);
        let row = packed(&[3, 0, 1, 2, 1], 2);
        assert_eq!(&row[..2], &[0b10_01_00_11, 0b01]);
        let row = packed(&[0xAB, 0x01, 0xFF], 8);
        assert_eq!(&row[..4], &[0xAB, 0x01, 0xFF, 0x00]);
    }

    /// Three-bit values cross byte boundaries: value 2 spans bytes 0 and 1, value 5 bytes 1 and 2.
    #[test]
    fn three_bits_cross_bytes() {
        let vals = [5u8, 3, 6, 1, 7, 2, 4, 0];
        // stream: 101 110 011 100 111 010 001 000 (value j's LSB first at bit 3j)
        // bits 0..8  = 1,0,1, 1,1,0, 0,1   -> byte 0 = 0b1001_1101 = 0x9D
        // bits 8..16 = 1, 1,0,0, 1,1,1, 0  -> byte 1 = 0b0111_0011 = 0x73
        // bits 16..24 = 1,0, 0,0,1, 0,0,0  -> byte 2 = 0b0001_0001 = 0x11
        let row = packed(&vals, 3);
        assert_eq!(&row[..3], &[0x9D, 0x73, 0x11]);
        assert!(row[3..].iter().all(|&b| b == 0));
        assert_eq!(unpacked(&row, 8, 3), vals);
        // As SPEC.md says, 32 three-bit values fill exactly three little-endian u32 words.
        let vals: Vec<u8> = (0..32).map(|i| (i * 5 % 8) as u8).collect();
        let row = packed(&vals, 3);
        let words: Vec<u32> = row[..12]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let big = words[0] as u128 | (words[1] as u128) << 32 | (words[2] as u128) << 64;
        for (j, &v) in vals.iter().enumerate() {
            assert_eq!((big >> (3 * j)) & 7, v as u128, "value {j}");
        }
        assert_eq!(unpacked(&row, 32, 3), vals);
    }

    #[test]
    fn padding() {
        let mut row = packed(&[7, 7, 7], 3);
        assert_eq!(&row[..2], &[0xFF, 0x01]);
        assert!(padding_is_zero(&row, 3, 3));
        row[1] |= 0x02; // bit 9: the first padding bit
        assert!(!padding_is_zero(&row, 3, 3));
        assert_eq!(unpacked(&row, 3, 3), [7, 7, 7]);
        row[1] = 0x01;
        row[15] = 0x80; // the last byte of the row
        assert!(!padding_is_zero(&row, 3, 3));
        assert!(padding_is_zero(&[], 0, 4));
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn value_too_wide() {
        packed(&[4], 2);
    }
}

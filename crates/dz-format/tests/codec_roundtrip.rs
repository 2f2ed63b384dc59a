//! Codec round trips (pack -> unpack -> equal, dequantize agrees, part lengths match the layout) over random
//! valid payloads, and one negative test per way a payload can be wrong.

use dz_format::codec::bits::{pack_row, unpack_row};
use dz_format::codec::{
    pack_row_index, scatter_rows, unpack_row_index, Dense, Grid, Payload, Quant, Sign1, Sparse,
    Sparse24,
};
use dz_format::layout::{part_layout, stride, PartLen};
use dz_format::{Codec, Dtype, Error, QuantParams};
use half::f16;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const CASES: u32 = 96;

// ---------------------------------------------------------------------------------------------------------
// Strategies.

/// Any finite f16, from its bits (subnormals, signed zeros and the extremes included).
fn finite_f16() -> impl Strategy<Value = f16> {
    any::<u16>().prop_map(|b| {
        let b = if b & 0x7C00 == 0x7C00 { b & !0x4000 } else { b };
        f16::from_bits(b)
    })
}

fn params(max_group: u32) -> impl Strategy<Value = QuantParams> {
    (
        prop::sample::select(vec![2u8, 3, 4, 8]),
        // 0 = one group per row; otherwise 4, 8, ..., often not dividing the column count.
        (0..=max_group / 4).prop_map(|g| g * 4),
        any::<bool>(),
        prop::sample::select(vec![1.0f32, 1e-4, 3.0e-2, 0.7, 12.5]),
    )
        .prop_map(|(bits, group_size, symmetric, global_scale)| QuantParams {
            bits,
            group_size,
            symmetric,
            global_scale,
        })
}

fn grid(p: QuantParams, rows: usize, cols: usize) -> impl Strategy<Value = Grid> {
    let n = rows * p.n_groups(cols);
    let zeros = if p.symmetric {
        Just(None).boxed()
    } else {
        prop::collection::vec(finite_f16(), n)
            .prop_map(Some)
            .boxed()
    };
    (prop::collection::vec(finite_f16(), n), zeros).prop_map(move |(scales, zeros)| Grid {
        params: p,
        scales,
        zeros,
    })
}

fn codes(n: usize, bits: u8) -> impl Strategy<Value = Vec<u8>> {
    let max = ((1u16 << bits) - 1) as u8;
    prop::collection::vec(0..=max, n)
}

fn quant() -> impl Strategy<Value = Payload> {
    (1usize..9, 1usize..70, params(24)).prop_flat_map(|(rows, cols, p)| {
        (grid(p, rows, cols), codes(rows * cols, p.bits)).prop_map(move |(grid, codes)| {
            Payload::Quant(Quant {
                rows,
                cols,
                grid,
                codes,
            })
        })
    })
}

/// The six valid (i0, i1) pairs of a 2:4 run.
const PAIRS: [(u8, u8); 6] = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)];

fn sparse24() -> impl Strategy<Value = Payload> {
    (1usize..9, 1usize..18, params(24)).prop_flat_map(|(rows, runs, p)| {
        let cols = runs * 4;
        (
            grid(p, rows, cols),
            codes(rows * cols / 2, p.bits),
            prop::collection::vec(prop::sample::select(PAIRS.to_vec()), rows * runs),
        )
            .prop_map(move |(grid, codes, pairs)| {
                Payload::Sparse24(Sparse24 {
                    rows,
                    cols,
                    grid,
                    codes,
                    positions: pairs.iter().flat_map(|&(a, b)| [a, b]).collect(),
                })
            })
    })
}

fn sparse() -> impl Strategy<Value = Payload> {
    (1usize..9, 1usize..70, params(24), 0.0f64..=1.0).prop_flat_map(|(rows, cols, p, density)| {
        (
            grid(p, rows, cols),
            prop::collection::vec(prop::bool::weighted(density), rows * cols),
        )
            .prop_flat_map(move |(grid, mask)| {
                let kept = mask.iter().filter(|&&m| m).count();
                codes(kept, p.bits).prop_map(move |codes| {
                    Payload::Sparse(Sparse {
                        rows,
                        cols,
                        grid: grid.clone(),
                        mask: mask.clone(),
                        codes,
                    })
                })
            })
    })
}

fn sign1() -> impl Strategy<Value = Payload> {
    (
        1usize..9,
        1usize..150,
        prop::sample::select(vec![1.0f32, 2e-4, 0.3]),
    )
        .prop_flat_map(|(rows, cols, global_scale)| {
            (
                prop::collection::vec(any::<bool>(), rows * cols),
                prop::collection::vec(finite_f16(), rows),
            )
                .prop_map(move |(signs, scales)| {
                    Payload::Sign1(Sign1 {
                        rows,
                        cols,
                        global_scale,
                        signs,
                        scales,
                    })
                })
        })
}

fn dense() -> impl Strategy<Value = Payload> {
    (
        1usize..9,
        1usize..40,
        prop::sample::select(vec![Dtype::F32, Dtype::F16, Dtype::Bf16]),
    )
        .prop_flat_map(|(rows, cols, dtype)| {
            // Any bytes: NaNs and infinities are valid dense values.
            prop::collection::vec(any::<u8>(), rows * cols * dtype.size()).prop_map(move |data| {
                Payload::Dense(Dense {
                    rows,
                    cols,
                    dtype,
                    data,
                })
            })
        })
}

// ---------------------------------------------------------------------------------------------------------
// The round-trip property.

fn as_refs(parts: &[Vec<u8>]) -> Vec<&[u8]> {
    parts.iter().map(Vec::as_slice).collect()
}

/// Flips bit `bit` of byte `byte` of part `part`, for each flip (empty parts are left alone).
fn flip_bits(parts: &mut [Vec<u8>], flips: &[(prop::sample::Index, prop::sample::Index, u8)]) {
    let n_parts = parts.len();
    for (part, byte, bit) in flips {
        let part = &mut parts[part.index(n_parts)];
        if !part.is_empty() {
            let i = byte.index(part.len());
            part[i] ^= 1 << bit;
        }
    }
}

fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn check_roundtrip(p: &Payload) -> Result<(), TestCaseError> {
    let (rows, cols) = p.dims();
    let codec = p.codec();
    let parts = p.pack().map_err(|e| TestCaseError::fail(e.to_string()))?;

    let layout = part_layout("t", &codec, rows, cols, false).unwrap();
    prop_assert_eq!(parts.len(), layout.len());
    for (spec, part) in layout.iter().zip(&parts) {
        match spec.len {
            PartLen::Exact(len) => prop_assert_eq!(part.len(), len, "part {}", spec.name),
            PartLen::FromRowPtr => {
                // row_ptr is the part before codes; its last entry is the length of codes.
                let ptr = &parts[1];
                let last = u32::from_le_bytes(ptr[ptr.len() - 4..].try_into().unwrap());
                prop_assert_eq!(part.len(), last as usize);
            }
        }
    }

    let back = Payload::unpack("t", &codec, rows, cols, &as_refs(&parts))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, p);
    let (a, b) = (p.dequantize(), back.dequantize());
    prop_assert_eq!(a.len(), rows * cols);
    prop_assert_eq!(bits_of(&a), bits_of(&b));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn quant_roundtrip(p in quant()) { check_roundtrip(&p)?; }

    #[test]
    fn sparse24_roundtrip(p in sparse24()) { check_roundtrip(&p)?; }

    #[test]
    fn sparse_roundtrip(p in sparse()) { check_roundtrip(&p)?; }

    #[test]
    fn sign1_roundtrip(p in sign1()) { check_roundtrip(&p)?; }

    #[test]
    fn dense_roundtrip(p in dense()) { check_roundtrip(&p)?; }

    /// The packed bits are exactly SPEC.md's stream: value j's bit t is stream bit j*b + t, which is bit
    /// (j*b + t) % 8 of byte (j*b + t) / 8; everything after is zero.
    #[test]
    fn bit_stream_matches_spec(
        bits in prop::sample::select(vec![1u8, 2, 3, 4, 8]),
        seed in prop::collection::vec(any::<u8>(), 0..80),
    ) {
        let values: Vec<u8> = seed.iter().map(|v| v & ((1u16 << bits) - 1) as u8).collect();
        let mut row = vec![0xFF; stride(values.len(), bits).unwrap()];
        pack_row(&values, bits, &mut row);
        let b = bits as usize;
        for i in 0..row.len() * 8 {
            let got = (row[i / 8] >> (i % 8)) & 1;
            let want = values.get(i / b).map_or(0, |v| (v >> (i % b)) & 1);
            prop_assert_eq!(got, want, "stream bit {}", i);
        }
        let mut out = vec![0; values.len()];
        unpack_row(&row, values.len(), bits, &mut out);
        prop_assert_eq!(out, values);
    }

    #[test]
    fn row_index_roundtrip(
        (n_total, picked) in (1usize..40).prop_flat_map(|n| (Just(n), prop::collection::vec(any::<bool>(), n))),
        cols in 1usize..6,
    ) {
        let index: Vec<u32> = (0..n_total as u32).filter(|&r| picked[r as usize]).collect();
        prop_assume!(!index.is_empty());
        let bytes = pack_row_index(&index);
        prop_assert_eq!(bytes.len(), index.len() * 4);
        prop_assert_eq!(&unpack_row_index("t", &bytes, n_total).unwrap(), &index);
        let stored: Vec<f32> = (0..index.len() * cols).map(|i| i as f32 + 1.0).collect();
        let full = scatter_rows(&index, &stored, cols, n_total);
        prop_assert_eq!(full.len(), n_total * cols);
        let mut next = 0;
        for r in 0..n_total {
            let row = &full[r * cols..(r + 1) * cols];
            if picked[r] {
                prop_assert_eq!(row, &stored[next * cols..(next + 1) * cols]);
                next += 1;
            } else {
                prop_assert!(row.iter().all(|&v| v == 0.0));
            }
        }
    }

    /// Hostile bytes: parts of the layout's lengths (codes of any length for `sparse`) with random content
    /// give a payload or a named error, never a panic.
    #[test]
    fn unpack_never_panics(
        p in prop_oneof![quant(), sparse24(), sparse(), sign1()],
        noise in prop::collection::vec(any::<u8>(), 1..64),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), 0u8..8), 1..4),
    ) {
        let (rows, cols) = p.dims();
        let mut parts = p.pack().unwrap();
        flip_bits(&mut parts, &flips);
        if let Payload::Sparse(_) = p {
            parts[2].extend(noise.iter().take(noise[0] as usize % 4));
        }
        match Payload::unpack("t", &p.codec(), rows, cols, &as_refs(&parts)) {
            Ok(back) => prop_assert_eq!(back.dequantize().len(), rows * cols),
            Err(Error::InvalidPayload { .. } | Error::InvalidPart { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4 * CASES))]

    /// `Payload::check` (streaming, on the packed bytes) says what `unpack` says: Ok exactly when it
    /// succeeds, its error when it fails, for valid payloads and for bit flips, truncations and extra
    /// bytes in any part (the serving codecs quant and sparse24 take the streaming path; the others
    /// are unpacked).
    #[test]
    fn check_agrees_with_unpack(
        p in prop_oneof![quant(), sparse24(), sparse(), sign1()],
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), 0u8..8), 0..3),
        cut in prop::option::of((any::<prop::sample::Index>(), 0usize..3, any::<bool>())),
    ) {
        let (rows, cols) = p.dims();
        let mut parts = p.pack().unwrap();
        let n_parts = parts.len();
        flip_bits(&mut parts, &flips);
        if let Some((part, n, grow)) = cut {
            let part = &mut parts[part.index(n_parts)];
            if grow {
                part.extend(std::iter::repeat_n(0u8, n + 1));
            } else {
                part.truncate(part.len().saturating_sub(n + 1));
            }
        }
        let refs = as_refs(&parts);
        let unpacked = Payload::unpack("t", &p.codec(), rows, cols, &refs).map(|_| ());
        let checked = Payload::check("t", &p.codec(), rows, cols, &refs);
        prop_assert_eq!(
            checked.as_ref().map_err(|e| e.to_string()),
            unpacked.as_ref().map_err(|e| e.to_string())
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// Negative tests: each bad payload gives its named error.

fn sym4() -> QuantParams {
    QuantParams {
        bits: 4,
        group_size: 0,
        symmetric: true,
        global_scale: 1.0,
    }
}

fn one_scale_per_row(rows: usize) -> Grid {
    Grid {
        params: sym4(),
        scales: vec![f16::ONE; rows],
        zeros: None,
    }
}

fn unpack(
    codec: &Codec,
    rows: usize,
    cols: usize,
    parts: &[Vec<u8>],
) -> dz_format::Result<Payload> {
    Payload::unpack("t", codec, rows, cols, &as_refs(parts))
}

fn sample_sparse24() -> Payload {
    Payload::Sparse24(Sparse24 {
        rows: 2,
        cols: 8,
        grid: one_scale_per_row(2),
        codes: vec![1, 2, 3, 4, 5, 6, 7, 8],
        positions: vec![0, 1, 2, 3, 1, 3, 0, 2],
    })
}

fn sample_quant() -> Payload {
    Payload::Quant(Quant {
        rows: 2,
        cols: 3,
        grid: one_scale_per_row(2),
        codes: vec![1, 2, 3, 4, 5, 6],
    })
}

fn sample_sparse() -> Payload {
    Payload::Sparse(Sparse {
        rows: 2,
        cols: 5,
        grid: one_scale_per_row(2),
        mask: [1, 0, 1, 1, 0, 0, 1, 0, 0, 0].map(|b| b == 1).to_vec(),
        codes: vec![9, 8, 7, 6],
    })
}

#[test]
fn bad_meta_nibble() {
    let p = sample_sparse24();
    let mut parts = p.pack().unwrap();
    assert_eq!(parts[1][16], 0x8D); // row 1: runs (1, 3) and (0, 2)
    for bad in [0x0, 0x1, 0x2, 0x3, 0x5, 0x6, 0x7, 0xA, 0xB, 0xF] {
        parts[1][16] = 0x80 | bad; // run 0 of row 1
        let err = unpack(&p.codec(), 2, 8, &parts).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidPayload { reason, .. } if reason.contains("row 1, run 0")),
            "nibble {bad:#x}: {err}"
        );
    }
}

#[test]
fn wrong_row_ptr() {
    let p = sample_sparse();
    let mut parts = p.pack().unwrap();
    assert_eq!(parts[1], [0, 0, 0, 0, 16, 0, 0, 0, 32, 0, 0, 0]);
    parts[1][4] = 17;
    let err = unpack(&p.codec(), 2, 5, &parts).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidPayload { reason, .. } if reason.contains("row_ptr[1]")),
        "{err}"
    );
}

#[test]
fn sparse_codes_length_must_match_row_ptr() {
    let p = sample_sparse();
    let mut parts = p.pack().unwrap();
    parts[2].push(0);
    let err = unpack(&p.codec(), 2, 5, &parts).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidPart { part, .. } if part == "codes"),
        "{err}"
    );
}

#[test]
fn nonzero_padding_bits() {
    let p = sample_quant();
    let codec = p.codec();
    let clean = p.pack().unwrap();
    // Row 0 holds 3 four-bit codes: the high nibble of byte 1 is padding, as are bytes 2..16.
    for (byte, mask) in [(1, 0x10), (2, 0x01), (15, 0x80), (16 + 1, 0x80)] {
        let mut parts = clean.clone();
        parts[0][byte] |= mask;
        let err = unpack(&codec, 2, 3, &parts).unwrap_err();
        let row = byte / 16;
        assert!(
            matches!(&err, Error::InvalidPayload { reason, .. }
                if reason.contains("padding") && reason.contains(&format!("row {row}"))),
            "byte {byte}: {err}"
        );
    }
    // The same for a mask, sign bits and the codes of a sparse row.
    let p = sample_sparse();
    for part in [0, 2] {
        let mut parts = p.pack().unwrap();
        parts[part][15] = 1;
        assert!(matches!(
            unpack(&p.codec(), 2, 5, &parts),
            Err(Error::InvalidPayload { .. })
        ));
    }
}

#[test]
fn truncated_or_missing_part() {
    let p = sample_sparse24();
    let codec = p.codec();
    for i in 0..3 {
        let mut parts = p.pack().unwrap();
        parts[i].pop();
        let err = unpack(&codec, 2, 8, &parts).unwrap_err();
        assert!(matches!(err, Error::InvalidPart { .. }), "part {i}: {err}");
    }
    let mut parts = p.pack().unwrap();
    parts.pop();
    let err = unpack(&codec, 2, 8, &parts).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidPart { part, .. } if part == "scales"),
        "{err}"
    );
}

#[test]
fn code_too_wide_for_bits() {
    let Payload::Quant(mut q) = sample_quant() else {
        unreachable!()
    };
    q.codes[4] = 16;
    let err = Payload::Quant(q).pack_named("w").unwrap_err();
    assert!(
        matches!(&err, Error::InvalidPayload { tensor, reason }
            if tensor == "w" && reason.contains("row 1, index 1")),
        "{err}"
    );
    let Payload::Sparse(mut s) = sample_sparse() else {
        unreachable!()
    };
    s.codes[0] = 200;
    assert!(matches!(
        Payload::Sparse(s).pack(),
        Err(Error::InvalidPayload { .. })
    ));
}

#[test]
fn bad_logical_forms() {
    let Payload::Sparse24(s) = sample_sparse24() else {
        unreachable!()
    };
    for positions in [[1u8, 1], [2, 1], [3, 4]] {
        let mut s = s.clone();
        s.positions[..2].copy_from_slice(&positions);
        assert!(matches!(
            Payload::Sparse24(s).pack(),
            Err(Error::InvalidPayload { .. })
        ));
    }
    let mut odd = s.clone();
    odd.cols = 6;
    assert!(matches!(
        Payload::Sparse24(odd).pack(),
        Err(Error::InvalidCodec { .. })
    ));
    let mut short = s.clone();
    short.codes.pop();
    assert!(matches!(
        Payload::Sparse24(short).pack(),
        Err(Error::InvalidPayload { .. })
    ));

    let Payload::Sparse(sp) = sample_sparse() else {
        unreachable!()
    };
    let mut extra = sp.clone();
    extra.codes.push(1);
    assert!(matches!(
        Payload::Sparse(extra).pack(),
        Err(Error::InvalidPayload { .. })
    ));

    let Payload::Quant(q) = sample_quant() else {
        unreachable!()
    };
    let mut inf = q.clone();
    inf.grid.scales[1] = f16::INFINITY;
    assert!(matches!(
        Payload::Quant(inf).pack(),
        Err(Error::InvalidPayload { .. })
    ));
    let mut asym_without_zeros = q.clone();
    asym_without_zeros.grid.params.symmetric = false;
    assert!(matches!(
        Payload::Quant(asym_without_zeros).pack(),
        Err(Error::InvalidPayload { .. })
    ));
    let mut five_bits = q.clone();
    five_bits.grid.params.bits = 5;
    assert!(matches!(
        Payload::Quant(five_bits).pack(),
        Err(Error::InvalidCodec { .. })
    ));

    let d = Payload::Dense(Dense {
        rows: 2,
        cols: 2,
        dtype: Dtype::F16,
        data: vec![0; 6],
    });
    assert!(matches!(d.pack(), Err(Error::InvalidPayload { .. })));
}

#[test]
fn non_finite_scale_or_zero_in_file() {
    let p = Payload::Quant(Quant {
        rows: 1,
        cols: 4,
        grid: Grid {
            params: QuantParams {
                symmetric: false,
                ..sym4()
            },
            scales: vec![f16::ONE],
            zeros: Some(vec![f16::ONE]),
        },
        codes: vec![0, 1, 2, 3],
    });
    for part in [1, 2] {
        let mut parts = p.pack().unwrap();
        parts[part] = f16::NAN.to_le_bytes().to_vec();
        let err = unpack(&p.codec(), 1, 4, &parts).unwrap_err();
        assert!(matches!(err, Error::InvalidPayload { .. }), "{err}");
    }
    let s = Payload::Sign1(Sign1 {
        rows: 1,
        cols: 2,
        global_scale: 1.0,
        signs: vec![true, false],
        scales: vec![f16::ONE],
    });
    let mut parts = s.pack().unwrap();
    parts[1] = f16::NEG_INFINITY.to_le_bytes().to_vec();
    assert!(matches!(
        unpack(&s.codec(), 1, 2, &parts),
        Err(Error::InvalidPayload { .. })
    ));
}

#[test]
fn bad_codec_or_dims_in_unpack() {
    let p = sample_quant();
    let parts = p.pack().unwrap();
    let bad = Codec::Quant(QuantParams {
        group_size: 6,
        ..sym4()
    });
    assert!(matches!(
        unpack(&bad, 2, 3, &parts),
        Err(Error::InvalidCodec { .. })
    ));
    let bad = Codec::Sign1 {
        global_scale: f32::NAN,
    };
    assert!(matches!(
        unpack(&bad, 2, 3, &parts),
        Err(Error::InvalidCodec { .. })
    ));
    assert!(matches!(
        unpack(&p.codec(), 0, 3, &parts),
        Err(Error::InvalidShape { .. })
    ));
    // Dims whose layout overflows are an error, not a wrap.
    assert!(matches!(
        unpack(&p.codec(), usize::MAX, usize::MAX / 2, &parts),
        Err(Error::Overflow(_))
    ));
}

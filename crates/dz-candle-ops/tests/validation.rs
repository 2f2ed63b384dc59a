//! Every bad input gets a named error (never a panic): one test per error case.
//!
//! Not testable here: a device mismatch needs a second device (CUDA or Metal); the check is the same
//! `same_device` comparison for every argument, and `examples/cuda_check.rs` exercises it on a GPU.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use dz_candle_ops::{
    delta_matmul, delta_matmul_add, dequantize, embedding_delta_add, embedding_delta_add_unchecked,
    merge, sbmm, DeviceDelta, RowSubset, Segment,
};
use dz_format::codec::pack_row_index;
use dz_format::{Codec, Role};

fn q() -> DeviceDelta {
    delta(
        Cfg::Quant {
            bits: 4,
            group: 16,
            sym: true,
        },
        6,
        32,
        1,
    )
}

/// Asserts `r` failed with a message containing every one of `needles`.
#[track_caller]
fn fails<T: std::fmt::Debug>(r: candle_core::Result<T>, needles: &[&str]) {
    let e = r.expect_err("expected an error").to_string();
    for n in needles {
        assert!(e.contains(n), "error {e:?} does not contain {n:?}");
    }
}

fn f32s(dims: &[usize]) -> Tensor {
    input(dims, DType::F32, 7)
}

#[test]
fn wrong_dtype() {
    let d = q();
    let x = Tensor::zeros((2, 32), DType::U8, &Device::Cpu).unwrap();
    fails(
        delta_matmul(&x, &d),
        &["delta-matmul", "wrong dtype", "x", "U8"],
    );
    let x = f32s(&[2, 32]);
    let base = input(&[2, 6], DType::F16, 1);
    fails(
        delta_matmul_add(&x, &base, &d),
        &["delta-matmul-add", "wrong dtype", "base_out", "F16"],
    );
    fails(
        sbmm(
            &x,
            &base,
            &[&d],
            &[Segment {
                start: 0,
                len: 2,
                delta: Some(0),
            }],
        ),
        &["sbmm", "wrong dtype", "base_out"],
    );
    let w = Tensor::zeros((6, 32), DType::F64, &Device::Cpu).unwrap();
    fails(merge(&w, &d), &["merge", "wrong dtype", "base_w", "F64"]);
    let emb = delta(Cfg::Sign1, 10, 8, 2);
    let ids = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    fails(
        embedding_delta_add(&ids, &f32s(&[3, 8]), &emb),
        &["embedding-delta-add", "wrong dtype", "ids"],
    );
    let ids = Tensor::zeros(3, DType::U32, &Device::Cpu).unwrap();
    let base = Tensor::zeros((3, 8), DType::I64, &Device::Cpu).unwrap();
    fails(
        embedding_delta_add(&ids, &base, &emb),
        &["wrong dtype", "base_emb_out"],
    );
}

#[test]
fn wrong_shape() {
    let d = q();
    fails(
        delta_matmul(&f32s(&[2, 31]), &d),
        &["delta-matmul", "wrong shape", "x", "[2, 31]"],
    );
    let scalar = Tensor::new(1f32, &Device::Cpu).unwrap();
    fails(delta_matmul(&scalar, &d), &["wrong shape"]);
    fails(
        delta_matmul_add(&f32s(&[2, 32]), &f32s(&[2, 5]), &d),
        &["delta-matmul-add", "wrong shape", "base_out", "[2, 6]"],
    );
    fails(
        delta_matmul_add(&f32s(&[2, 32]), &f32s(&[1, 2, 6]), &d),
        &["wrong shape", "base_out"],
    );
    fails(
        merge(&f32s(&[6, 31]), &d),
        &["merge", "wrong shape", "base_w"],
    );
    fails(merge(&f32s(&[5, 32]), &d), &["merge", "wrong shape"]);
    let emb = delta(Cfg::Sign1, 10, 8, 2);
    let ids = Tensor::zeros((2, 3), DType::U32, &Device::Cpu).unwrap();
    fails(
        embedding_delta_add(&ids, &f32s(&[6, 8]), &emb),
        &["embedding-delta-add", "wrong shape", "[2, 3, 8]"],
    );
    fails(
        sbmm(
            &f32s(&[2, 32]),
            &f32s(&[3, 6]),
            &[&d],
            &[Segment {
                start: 0,
                len: 2,
                delta: Some(0),
            }],
        ),
        &["sbmm", "wrong shape", "base_out"],
    );
    fails(
        sbmm(
            &f32s(&[2, 30]),
            &f32s(&[2, 6]),
            &[&d],
            &[Segment {
                start: 0,
                len: 2,
                delta: Some(0),
            }],
        ),
        &["sbmm", "wrong shape", "x"],
    );
}

#[test]
fn not_contiguous() {
    let d = q();
    let x = f32s(&[32, 2]).t().unwrap();
    fails(
        delta_matmul(&x, &d),
        &["delta-matmul", "not contiguous", "x", ".contiguous()"],
    );
    let base = f32s(&[6, 2]).t().unwrap();
    fails(
        delta_matmul_add(&f32s(&[2, 32]), &base, &d),
        &["not contiguous", "base_out"],
    );
    fails(
        sbmm(
            &x,
            &f32s(&[2, 6]),
            &[&d],
            &[Segment {
                start: 0,
                len: 2,
                delta: Some(0),
            }],
        ),
        &["sbmm", "not contiguous"],
    );
    fails(
        merge(&f32s(&[32, 6]).t().unwrap(), &d),
        &["merge", "not contiguous"],
    );
    let emb = delta(Cfg::Sign1, 10, 8, 2);
    let ids = Tensor::zeros((3, 2), DType::U32, &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    fails(
        embedding_delta_add(&ids, &f32s(&[2, 3, 8]), &emb),
        &["embedding-delta-add", "not contiguous", "ids"],
    );
}

/// A delta built from a manifest entry of role `role`.
fn with_role(role: Role) -> DeviceDelta {
    let p = payload(
        Cfg::Quant {
            bits: 2,
            group: 0,
            sym: true,
        },
        6,
        32,
        3,
    );
    let parts = p.pack().unwrap();
    let entry = entry_for(&p, role, None, &parts);
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    DeviceDelta::from_parts(&entry, &refs, &Device::Cpu).unwrap()
}

#[test]
fn codec_op_mismatch() {
    let full = with_role(Role::Full);
    let x = f32s(&[2, 32]);
    fails(
        delta_matmul(&x, &full),
        &["delta-matmul", "codec/op mismatch", "full"],
    );
    fails(
        delta_matmul_add(&x, &f32s(&[2, 6]), &full),
        &["codec/op mismatch"],
    );
    fails(
        merge(&f32s(&[6, 32]), &full),
        &["merge", "codec/op mismatch"],
    );
    fails(
        sbmm(
            &x,
            &f32s(&[2, 6]),
            &[&full],
            &[Segment {
                start: 0,
                len: 2,
                delta: Some(0),
            }],
        ),
        &["sbmm", "codec/op mismatch"],
    );
    // A full tensor still dequantizes: it is just values.
    assert_eq!(dz_candle_ops::dequantize(&full).unwrap().dims(), &[6, 32]);
    let linear = with_role(Role::Linear);
    let ids = Tensor::zeros(2, DType::U32, &Device::Cpu).unwrap();
    fails(
        embedding_delta_add(&ids, &f32s(&[2, 32]), &linear),
        &["embedding-delta-add", "codec/op mismatch", "linear"],
    );
    // An embedding-role delta is fine for the embedding op.
    let emb = with_role(Role::Embedding);
    embedding_delta_add(&ids, &f32s(&[2, 32]), &emb).unwrap();
}

#[test]
fn bad_segments() {
    let d = q();
    let x = f32s(&[4, 32]);
    let base = f32s(&[4, 6]);
    let s = |start, len, delta| Segment { start, len, delta };
    for (segments, needle) in [
        (vec![s(0, 3, Some(0))], "cover rows 0..3"),
        (vec![s(0, 2, Some(0)), s(1, 3, None)], "starts at row 1"),
        (vec![s(0, 1, None), s(2, 2, None)], "starts at row 2"),
        (vec![s(0, 5, None)], "runs past"),
        (vec![s(0, 4, Some(1))], "only 1 deltas"),
        (vec![], "cover rows 0..0"),
    ] {
        fails(
            sbmm(&x, &base, &[&d], &segments),
            &["sbmm", "bad segments", needle],
        );
    }
}

#[test]
fn delta_shapes_differ() {
    let a = q();
    let b = delta(Cfg::Sign1, 7, 32, 2);
    let x = f32s(&[2, 32]);
    fails(
        sbmm(
            &x,
            &f32s(&[2, 6]),
            &[&a, &b],
            &[Segment {
                start: 0,
                len: 2,
                delta: Some(0),
            }],
        ),
        &[
            "sbmm",
            "delta shapes differ",
            "delta 1",
            "(7, 32)",
            "(6, 32)",
        ],
    );
}

#[test]
fn id_out_of_range() {
    let emb = subset_delta(Cfg::Sign1, 10, &[1, 4], 8, 2);
    let ids = Tensor::new(&[3u32, 10], &Device::Cpu).unwrap();
    fails(
        embedding_delta_add(&ids, &f32s(&[2, 8]), &emb),
        &[
            "embedding-delta-add",
            "token id 10 at position 1",
            "10 rows",
        ],
    );
    let ids = Tensor::new(&[-1i64], &Device::Cpu).unwrap();
    fails(
        embedding_delta_add(&ids, &f32s(&[1, 8]), &emb),
        &["token id -1 at position 0"],
    );
    // The unchecked op skips only the CUDA path's read-back: the CPU still checks every id.
    let ids = Tensor::new(&[3u32, 10], &Device::Cpu).unwrap();
    fails(
        embedding_delta_add_unchecked(&ids, &f32s(&[2, 8]), &emb),
        &["embedding-delta-add", "token id 10 at position 1"],
    );
}

#[test]
fn invalid_parts_are_refused() {
    let p = payload(
        Cfg::Sparse24 {
            bits: 4,
            group: 0,
            sym: true,
        },
        3,
        16,
        4,
    );
    let parts = p.pack().unwrap();
    let entry = entry_for(&p, Role::Linear, None, &parts);
    let refs = |parts: &[Vec<u8>]| parts.iter().map(|v| v.to_vec()).collect::<Vec<_>>();
    let build = |parts: &[Vec<u8>]| {
        let r: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        DeviceDelta::from_parts(&entry, &r, &Device::Cpu).map(|_| ())
    };
    build(&parts).unwrap();
    // A metadata nibble with i0 >= i1.
    let mut bad = refs(&parts);
    bad[1][0] = 0x06;
    let e = build(&bad).unwrap_err().to_string();
    assert!(e.contains("invalid parts") && e.contains("nibble"), "{e}");
    // A part of the wrong length.
    let mut bad = refs(&parts);
    bad[0].pop();
    let e = build(&bad).unwrap_err().to_string();
    assert!(e.contains("invalid parts") && e.contains("codes"), "{e}");
    // A part missing.
    let e = build(&parts[..2]).unwrap_err().to_string();
    assert!(e.contains("invalid parts"), "{e}");
    // A non-finite scale.
    let mut bad = refs(&parts);
    bad[2][0..2].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
    let e = build(&bad).unwrap_err().to_string();
    assert!(e.contains("not finite"), "{e}");

    // Row subsets: row_index missing, unsorted, out of range, or of the wrong count.
    let sub = payload(Cfg::Sign1, 2, 8, 1);
    let sub_parts = sub.pack().unwrap();
    let entry = entry_for(&sub, Role::Embedding, Some((5, 2)), &sub_parts);
    let build = |idx: &[u32]| {
        let ri = pack_row_index(idx);
        let mut r: Vec<&[u8]> = vec![&ri];
        r.extend(sub_parts.iter().map(Vec::as_slice));
        DeviceDelta::from_parts(&entry, &r, &Device::Cpu).map(|_| ())
    };
    build(&[0, 4]).unwrap();
    for (idx, needle) in [
        (&[3u32, 1][..], "strictly increasing"),
        (&[1, 5][..], "not below"),
        (&[1][..], "row_index"),
    ] {
        let e = build(idx).unwrap_err().to_string();
        assert!(e.contains(needle), "{idx:?}: {e}");
    }
    let e = DeviceDelta::from_parts(&entry, &[], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("row_index"), "{e}");
    // from_payload checks its row subset the same way.
    let e = DeviceDelta::from_payload(
        &sub,
        Some(RowSubset {
            index: &[4, 2],
            total_rows: 5,
        }),
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("strictly increasing"), "{e}");
    let e = DeviceDelta::from_payload(
        &sub,
        Some(RowSubset {
            index: &[0, 1, 2],
            total_rows: 5,
        }),
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("holds 3 rows"), "{e}");
    // A codec whose parameters are invalid.
    let mut entry = entry_for(&p, Role::Linear, None, &parts);
    if let Codec::Sparse24(q) = &mut entry.codec {
        q.bits = 5;
    }
    let r: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let e = DeviceDelta::from_parts(&entry, &r, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bits"), "{e}");
}

#[test]
fn a_packed_only_build_is_the_same_delta_to_merge_and_dequantize() {
    // Merge mode builds its deltas with `from_tensor_data_packed` (never the v4 layout, which only a
    // CUDA device with the v4 kernels on gets): on the CPU both constructors give the same delta.
    let p = payload(
        Cfg::Sparse24 {
            bits: 4,
            group: 128,
            sym: true,
        },
        8,
        256,
        5,
    );
    let parts = p.pack().unwrap();
    let entry = entry_for(&p, Role::Linear, None, &parts);
    let data = dz_format::TensorData {
        entry: &entry,
        parts: parts
            .iter()
            .map(|b| std::borrow::Cow::Borrowed(b.as_slice()))
            .collect(),
    };
    let packed = DeviceDelta::from_tensor_data_packed(&data, &Device::Cpu).unwrap();
    let usual = DeviceDelta::from_tensor_data(&data, &Device::Cpu).unwrap();
    assert!(!packed.v4_only() && packed.v4_parts().is_none());
    let base = f32s(&[8, 256]);
    let (a, b) = (
        merge(&base, &packed).unwrap(),
        merge(&base, &usual).unwrap(),
    );
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    let (a, b) = (dequantize(&packed).unwrap(), dequantize(&usual).unwrap());
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
}

#[test]
fn checked_parts_skip_only_the_check_they_vouch_for() {
    let p = payload(
        Cfg::Sparse24 {
            bits: 4,
            group: 128,
            sym: true,
        },
        8,
        256,
        11,
    );
    let parts = p.pack().unwrap();
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let entry = entry_for(&p, Role::Linear, None, &parts);
    let checked = DeviceDelta::check_parts(&entry, &refs).unwrap();
    let x = f32s(&[3, 256]);
    let want = delta_matmul(
        &x,
        &DeviceDelta::from_parts(&entry, &refs, &Device::Cpu).unwrap(),
    )
    .unwrap()
    .to_vec2::<f32>()
    .unwrap();
    let fast = DeviceDelta::from_checked_parts(&entry, &refs, &checked, &Device::Cpu).unwrap();
    assert_eq!(
        delta_matmul(&x, &fast).unwrap().to_vec2::<f32>().unwrap(),
        want
    );

    // A corrupt payload (a 2:4 position pair not increasing) fails the check by name ...
    let mut bad = parts.clone();
    let meta = bad.len() - 1;
    bad[meta].iter_mut().for_each(|b| *b = 0xFF);
    let bad_refs: Vec<&[u8]> = bad.iter().map(Vec::as_slice).collect();
    let e = DeviceDelta::check_parts(&entry, &bad_refs).unwrap_err();
    assert!(
        matches!(e, dz_candle_ops::OpError::Format { ref tensor, .. } if tensor == "w"),
        "{e}"
    );
    // ... and the token of the good parts does not vouch for other buffers: they get the whole check.
    let e = DeviceDelta::from_checked_parts(&entry, &bad_refs, &checked, &Device::Cpu).unwrap_err();
    assert!(
        matches!(e, dz_candle_ops::OpError::Format { ref tensor, .. } if tensor == "w"),
        "{e}"
    );
}

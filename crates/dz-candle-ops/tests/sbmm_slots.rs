//! `sbmm_slots` (a layer's deltas by fine-tune slot + one pass's segments by slot) against the plain
//! `sbmm`: bit for bit on every case of the sbmm matrix laid out over scattered slots, in every dtype,
//! with slots of the pass that have no delta in the layer, and across changes of the table between
//! passes (a slot emptied, reused by another delta); bad inputs refused with named errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use dz_candle_ops::{
    sbmm, sbmm_slots, try_sbmm_slots, DeviceDelta, OpError, Segment, SlotDeltas, SlotSegments,
};

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn assert_same_bits(config: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{config}: dims");
    assert_eq!(got.dtype(), want.dtype(), "{config}: dtype");
    let (g, w) = (bits(got), bits(want));
    if let Some(i) = (0..g.len()).find(|&i| g[i] != w[i]) {
        panic!(
            "{config}: element {i}: slots {} but sbmm {}",
            f32::from_bits(g[i]),
            f32::from_bits(w[i])
        );
    }
}

/// Row slots of `segments` with delta `i` at slot `slot_of[i]`.
fn row_slots(segments: &[Segment], slot_of: &[usize]) -> Vec<Option<usize>> {
    segments
        .iter()
        .flat_map(|s| std::iter::repeat_n(s.delta.map(|d| slot_of[d]), s.len))
        .collect()
}

/// Checks `sbmm_slots` (and `try_sbmm_slots`) against `sbmm` over `deltas` / `segments` for one input.
fn check_case(
    config: &str,
    table: &SlotDeltas,
    rows: &[Option<usize>],
    deltas: &[&DeviceDelta],
    segments: &[Segment],
    dtype: DType,
    seed: u64,
) {
    let m = rows.len();
    let pass = SlotSegments::new(rows, &Device::Cpu);
    assert_eq!(pass.rows(), m);
    for lead in [vec![m], vec![1, m]] {
        let dims = |w: usize| [lead.as_slice(), &[w]].concat();
        let x = input(&dims(SBMM_K), dtype, seed);
        let base = input(&dims(SBMM_N), dtype, seed + 50);
        let want = sbmm(&x, &base, deltas, segments).unwrap();
        let got = sbmm_slots(&x, &base, &pass, table).unwrap_or_else(|e| panic!("{config}: {e}"));
        assert_same_bits(config, &got, &want);
        let tried = try_sbmm_slots(&x, &base, &pass, table)
            .unwrap()
            .expect("the CPU always serves");
        assert_same_bits(config, &tried, &want);
    }
    assert_eq!(
        pass.uploads(),
        0,
        "{config}: nothing is uploaded on the CPU"
    );
}

/// Every sbmm case over scattered slots (delta `i` at slot `3 i + 2`, slots between empty), every dtype.
#[test]
fn slot_sbmm_equals_sbmm_bit_for_bit() {
    let mut ran = 0;
    for (ci, case) in sbmm_cases().into_iter().enumerate() {
        let deltas: Vec<DeviceDelta> = (case.delta_specs(ci).iter())
            .map(|s| s.build(&Device::Cpu))
            .collect();
        let refs: Vec<&DeviceDelta> = deltas.iter().collect();
        let segments = segs(&case.segments);
        let slot_of: Vec<usize> = (0..deltas.len()).map(|i| 3 * i + 2).collect();
        let mut table = SlotDeltas::new(&Device::Cpu);
        for (d, &slot) in deltas.iter().zip(&slot_of) {
            table.set(slot, Some(d)).unwrap();
        }
        let rows = row_slots(&segments, &slot_of);
        for (di, &dtype) in DTYPES.iter().enumerate() {
            let config = format!("{} {dtype:?}", case.name);
            check_case(
                &config,
                &table,
                &rows,
                &refs,
                &segments,
                dtype,
                (ci * 10 + di) as u64,
            );
            ran += 1;
        }
    }
    assert!(ran > 10);
}

/// A pass whose fine-tunes change between layers and passes: a slot without a delta in this layer
/// (its rows get the base), a delta removed and its slot reused by another, a new slot past the end.
#[test]
fn slot_tables_follow_changes_between_passes() {
    let a = delta(q4(), SBMM_N, SBMM_K, 1);
    let b = delta(Cfg::Sign1, SBMM_N, SBMM_K, 2);
    let c = delta(
        Cfg::Sparse24 {
            bits: 2,
            group: 128,
            sym: false,
        },
        SBMM_N,
        SBMM_K,
        3,
    );
    let mut table = SlotDeltas::new(&Device::Cpu);
    table.set(0, Some(&a)).unwrap();
    table.set(1, None).unwrap(); // a fine-tune that leaves this layer alone
    table.set(2, Some(&b)).unwrap();
    assert_eq!(table.slots(), 3);
    assert_eq!(table.dims(), Some((SBMM_N, SBMM_K)));
    // Rows: a, base, slot 1 (no delta here), b, a, slot 1.
    let rows = [Some(0), None, Some(1), Some(2), Some(2), Some(0), Some(1)];
    let want_segs = segs(&[
        (1, Some(0)),
        (1, None),
        (1, None),
        (2, Some(1)),
        (1, Some(0)),
        (1, None),
    ]);
    check_case(
        "no delta in a layer",
        &table,
        &rows,
        &[&a, &b],
        &want_segs,
        DType::BF16,
        7,
    );

    // b's fine-tune leaves; c takes its slot; a new fine-tune at slot 4 with a.
    table.set(2, None).unwrap();
    table.set(2, Some(&c)).unwrap();
    table.set(4, Some(&a)).unwrap();
    assert!(table.get(3).is_none());
    let rows = [Some(2), Some(4), Some(4), None, Some(0)];
    let want_segs = segs(&[(1, Some(0)), (2, Some(1)), (1, None), (1, Some(1))]);
    check_case(
        "slot reused",
        &table,
        &rows,
        &[&c, &a],
        &want_segs,
        DType::F16,
        8,
    );
    check_case(
        "slot reused",
        &table,
        &rows,
        &[&c, &a],
        &want_segs,
        DType::F32,
        9,
    );

    // Every delta gone: the output is base_out.
    for slot in [0, 2, 4] {
        table.set(slot, None).unwrap();
    }
    check_case(
        "all gone",
        &table,
        &rows,
        &[],
        &segs(&[(5, None)]),
        DType::F32,
        10,
    );
}

fn fails<T: std::fmt::Debug>(r: candle_core::Result<T>, needles: &[&str]) {
    let e = r.expect_err("expected an error").to_string();
    for n in needles {
        assert!(e.contains(n), "error {e:?} does not contain {n:?}");
    }
}

#[test]
fn slot_sbmm_refuses_bad_inputs() {
    let cpu = &Device::Cpu;
    let d = delta(q4(), SBMM_N, SBMM_K, 1);
    let other = delta(q4(), SBMM_N + 1, SBMM_K, 2);
    let mut table = SlotDeltas::new(cpu);
    table.set(0, Some(&d)).unwrap();
    // A delta of another shape.
    let e = table.set(1, Some(&other)).unwrap_err();
    assert!(matches!(e, OpError::DeltaShapes { index: 1, .. }), "{e}");
    // Replacing the only delta by one of another shape is fine.
    let mut lone = SlotDeltas::new(cpu);
    lone.set(0, Some(&d)).unwrap();
    lone.set(0, Some(&other)).unwrap();

    let x = input(&[2, SBMM_K], DType::F32, 3);
    let base = input(&[2, SBMM_N], DType::F32, 4);
    // A slot past the table.
    let pass = SlotSegments::new(&[Some(0), Some(5)], cpu);
    fails(sbmm_slots(&x, &base, &pass, &table), &["slot 5", "1 slots"]);
    // Rows that do not match the segments'.
    let pass = SlotSegments::new(&[Some(0), None, None], cpu);
    fails(
        sbmm_slots(&x, &base, &pass, &table),
        &["sbmm-slots", "x", "3 rows"],
    );
    // Dtypes.
    let pass = SlotSegments::new(&[Some(0), None], cpu);
    let xh = x.to_dtype(DType::F16).unwrap();
    fails(sbmm_slots(&xh, &base, &pass, &table), &["base_out", "F16"]);
    let xi = x.to_dtype(DType::U32).unwrap();
    fails(
        sbmm_slots(&xi, &base, &pass, &table),
        &["x", "f32, f16 or bf16"],
    );
    // Shapes.
    let xk = input(&[2, SBMM_K + 1], DType::F32, 5);
    fails(sbmm_slots(&xk, &base, &pass, &table), &["x", "K"]);
    let bn = input(&[2, SBMM_N + 2], DType::F32, 6);
    fails(sbmm_slots(&x, &bn, &pass, &table), &["base_out", "N_total"]);
    // Contiguity.
    let xt = input(&[SBMM_K, 2], DType::F32, 7).t().unwrap();
    fails(sbmm_slots(&xt, &base, &pass, &table), &["x", "contiguous"]);
    // Sanity: the good call works.
    let y = sbmm_slots(&x, &base, &pass, &table).unwrap();
    assert_eq!(y.dims(), &[2, SBMM_N]);
}

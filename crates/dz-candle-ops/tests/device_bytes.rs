//! `DeviceDelta::device_nbytes`: the bytes a tier counts before an upload follow the build's rule
//! (v4 layout, packed parts, or both), and `PreparedDelta` holds what its upload keeps. Its own test
//! binary: it turns the process-wide v4 switches on.

mod common;

use dz_candle_ops::relayout::v4_nbytes;
use dz_candle_ops::{set_v4_keep_packed, set_v4_kernels, DeviceDelta};
use dz_format::{Codec, QuantParams, Role};

const PACKED: u64 = 12_345;

/// The v4 switches are process-wide: one test at a time here.
static SWITCHES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn q(bits: u8) -> QuantParams {
    QuantParams {
        bits,
        group_size: 128,
        symmetric: true,
        global_scale: 1.0,
    }
}

#[test]
fn device_bytes_follow_the_builds_layout_rule() {
    let _one = SWITCHES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (n, k) = (96, 512);
    let s24 = Codec::Sparse24(q(4));
    let v4 = v4_nbytes(&s24, n, k) as u64;
    assert!(v4 > 0, "the v4 kernels take 4-bit 2:4 g128 at k = {k}");
    let linear = Some(Role::Linear);
    let bytes =
        |role, codec: &Codec, cuda| DeviceDelta::device_nbytes(role, codec, n, k, PACKED, cuda);

    // v4 kernels off (the default): the packed parts, on any device.
    assert_eq!(bytes(linear, &s24, true), PACKED);
    assert_eq!(bytes(linear, &s24, false), PACKED);

    set_v4_kernels(true);
    // On the CPU nothing changes.
    assert_eq!(bytes(linear, &s24, false), PACKED);
    // On CUDA a linear delta keeps only the v4 layout ...
    assert_eq!(bytes(linear, &s24, true), v4);
    // ... an embedding delta keeps its packed parts too (the embedding op reads them) ...
    assert_eq!(bytes(Some(Role::Embedding), &s24, true), v4 + PACKED);
    // ... and a codec the v4 kernels do not take keeps its packed parts only.
    let q8 = Codec::Quant(q(8));
    assert_eq!(v4_nbytes(&q8, n, k), 0);
    assert_eq!(bytes(linear, &q8, true), PACKED);

    // Both layouts when asked.
    set_v4_keep_packed(true);
    assert_eq!(bytes(linear, &s24, true), v4 + PACKED);
    set_v4_keep_packed(false);
    set_v4_kernels(false);
}

#[test]
fn a_prepared_delta_holds_what_its_upload_keeps() {
    let _one = SWITCHES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // A 4-bit 2:4 g128 linear delta, packed as a file stores it.
    let (n, k) = (40, 256);
    let payload = common::payload(
        common::Cfg::Sparse24 {
            bits: 4,
            group: 128,
            sym: true,
        },
        n,
        k,
        9,
    );
    let parts = payload.pack().unwrap();
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let entry = |role| common::entry_for(&payload, role, None, &parts);

    // v4 kernels off: nothing to prepare.
    set_v4_kernels(false);
    assert!(
        dz_candle_ops::PreparedDelta::prepare(&entry(Role::Linear), &refs)
            .unwrap()
            .is_none()
    );
    set_v4_kernels(true);
    let p = dz_candle_ops::PreparedDelta::prepare(&entry(Role::Linear), &refs)
        .unwrap()
        .expect("a 4-bit 2:4 g128 linear delta is prepared");
    // Its bytes are the v4 layout's, as a CUDA build of the same delta keeps.
    let packed: u64 = parts.iter().map(|b| b.len() as u64).sum();
    assert_eq!(
        p.nbytes() as u64,
        DeviceDelta::device_nbytes(Some(Role::Linear), &payload.codec(), n, k, packed, true)
    );
    // An embedding keeps its packed parts (the embedding op reads them): not prepared.
    assert!(
        dz_candle_ops::PreparedDelta::prepare(&entry(Role::Embedding), &refs)
            .unwrap()
            .is_none()
    );
    // Only a CUDA device takes it, and the error says so.
    let e = DeviceDelta::from_prepared(&p, &candle_core::Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("CUDA"), "{e}");
    // A corrupt part is refused while preparing, by name.
    let mut bad = parts.clone();
    bad[0].truncate(3);
    let bad_refs: Vec<&[u8]> = bad.iter().map(Vec::as_slice).collect();
    let e = dz_candle_ops::PreparedDelta::prepare(&entry(Role::Linear), &bad_refs).unwrap_err();
    assert!(e.to_string().contains('w'), "{e}");
    set_v4_kernels(false);
}

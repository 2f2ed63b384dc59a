//! `DeviceDelta::device_nbytes`: the bytes a tier counts before an upload follow the build's rule
//! (v4 layout, packed parts, or both). Its own test binary: it turns the process-wide v4 switches on.

use dz_candle_ops::relayout::v4_nbytes;
use dz_candle_ops::{set_v4_keep_packed, set_v4_kernels, DeviceDelta};
use dz_format::{Codec, QuantParams, Role};

const PACKED: u64 = 12_345;

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

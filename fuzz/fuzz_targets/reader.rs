//! Fuzzes the delta reader: any byte string must give a `DeltaFile` or a named error, never a panic,
//! a hang, or an allocation beyond what the input's own bytes justify.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = dz_format::DeltaFile::from_bytes(data) {
        // Read and decode every tensor: checksums, zstd, payload validation, dequantization.
        for i in 0..f.manifest().tensors.len() {
            if let Ok(t) = f.read_at(i) {
                if let Ok(d) = t.decode() {
                    if let Ok((n_total, _)) = t.entry.matrix_dims() {
                        let _ = d.to_f32(n_total);
                    }
                }
            }
        }
    }
});

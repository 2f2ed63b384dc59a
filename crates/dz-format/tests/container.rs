//! The container: write/read round trips, standard safetensors tooling, and one negative test per error
//! variant, built from literal bytes or from a valid file with one thing changed.

use std::collections::BTreeMap;

use dz_format::codec::{Dense, Grid, Payload, Quant, Sign1, Sparse, Sparse24};
use dz_format::fingerprint::tensor_hash;
use dz_format::{
    BaseFingerprint, DeltaFile, DeltaWriter, Dtype, EncodedTensor, Error, Lossless, QuantParams,
    Recipe, Role,
};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn params(bits: u8, group_size: u32, symmetric: bool) -> QuantParams {
    QuantParams {
        bits,
        group_size,
        symmetric,
        global_scale: 1.0 / 1024.0,
    }
}

fn grid(rng: &mut StdRng, p: QuantParams, rows: usize, cols: usize) -> Grid {
    let g = rows * p.n_groups(cols);
    Grid {
        params: p,
        scales: (0..g)
            .map(|_| f16::from_f32(rng.gen_range(0.1..2.0)))
            .collect(),
        zeros: (!p.symmetric).then(|| {
            (0..g)
                .map(|_| f16::from_f32(rng.gen_range(0.0..(1 << p.bits) as f32)))
                .collect()
        }),
    }
}

fn base() -> BaseFingerprint {
    let mut t = BTreeMap::new();
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
    ] {
        t.insert(name.to_string(), tensor_hash(name, "f32", &[4], &[7u8; 16]));
    }
    BaseFingerprint::from_tensor_hashes(t)
}

/// A delta with one tensor of every codec, a row subset, and both lossless modes.
fn sample_tensors(seed: u64) -> Vec<EncodedTensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let (r, c) = (6, 40);
    let p = params(4, 16, true);
    let quant = Payload::Quant(Quant {
        rows: r,
        cols: c,
        grid: grid(&mut rng, p, r, c),
        codes: (0..r * c).map(|_| rng.gen_range(0..16)).collect(),
    });
    out.push((
        "model.layers.0.self_attn.q_proj.weight",
        Role::Linear,
        vec![r as u64, c as u64],
        None,
        quant,
        Lossless::Zstd(3),
    ));

    let p = params(2, 8, false);
    let positions = (0..r * c / 4)
        .flat_map(|_| {
            let a = rng.gen_range(0..3u8);
            let b = rng.gen_range(a + 1..4u8);
            [a, b]
        })
        .collect();
    let s24 = Payload::Sparse24(Sparse24 {
        rows: r,
        cols: c,
        grid: grid(&mut rng, p, r, c),
        codes: (0..r * c / 2).map(|_| rng.gen_range(0..4)).collect(),
        positions,
    });
    out.push((
        "model.layers.0.mlp.up_proj.weight",
        Role::Linear,
        vec![r as u64, c as u64],
        None,
        s24,
        Lossless::None,
    ));

    let p = params(3, 0, true);
    let mask: Vec<bool> = (0..r * c).map(|_| rng.gen_bool(0.3)).collect();
    let nnz = mask.iter().filter(|&&m| m).count();
    let sparse = Payload::Sparse(Sparse {
        rows: r,
        cols: c,
        grid: grid(&mut rng, p, r, c),
        mask,
        codes: (0..nnz).map(|_| rng.gen_range(0..8)).collect(),
    });
    out.push((
        "model.layers.0.mlp.down_proj.weight",
        Role::Linear,
        vec![r as u64, c as u64],
        None,
        sparse,
        Lossless::Zstd(1),
    ));

    let sign = Payload::Sign1(Sign1 {
        rows: r,
        cols: c,
        global_scale: 0.001,
        signs: (0..r * c).map(|_| rng.gen()).collect(),
        scales: (0..r)
            .map(|_| f16::from_f32(rng.gen_range(0.5..1.5)))
            .collect(),
    });
    out.push((
        "lm_head.weight",
        Role::LmHead,
        vec![r as u64, c as u64],
        None,
        sign,
        Lossless::None,
    ));

    // An embedding delta storing 3 of its 10 rows.
    let p = params(8, 0, true);
    let emb = Payload::Quant(Quant {
        rows: 3,
        cols: c,
        grid: grid(&mut rng, p, 3, c),
        codes: (0..3 * c).map(|_| rng.gen()).collect(),
    });
    out.push((
        "model.embed_tokens.weight",
        Role::Embedding,
        vec![10, c as u64],
        Some(vec![1u32, 4, 9]),
        emb,
        Lossless::Zstd(3),
    ));

    let vals: Vec<f32> = (0..c).map(|_| rng.gen_range(-0.01..0.01)).collect();
    let norm = Payload::Dense(Dense::from_f32(1, c, Dtype::Bf16, &vals));
    out.push((
        "model.norm.weight",
        Role::DenseDelta,
        vec![c as u64],
        None,
        norm,
        Lossless::Zstd(3),
    ));

    // A tensor the fine-tune left untouched.
    out.push((
        "model.layers.0.self_attn.k_proj.weight",
        Role::Linear,
        vec![r as u64, c as u64],
        None,
        Payload::Zero { rows: r, cols: c },
        Lossless::None,
    ));

    out.into_iter()
        .map(|(name, role, shape, rows, payload, lossless)| {
            EncodedTensor::from_payload(
                name,
                role,
                &shape,
                Dtype::Bf16,
                rows.as_deref(),
                &payload,
                lossless,
            )
            .unwrap()
        })
        .collect()
}

fn recipe() -> Recipe {
    Recipe {
        tool: "dz-format tests".into(),
        method: "test".into(),
        ..Default::default()
    }
}

fn write_sample(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("sample.dz");
    let mut w = DeltaWriter::create(
        &path,
        "sample",
        json!({"model_type": "llama"}),
        base(),
        recipe(),
    )
    .unwrap();
    for t in sample_tensors(7) {
        w.add(t).unwrap();
    }
    w.finish().unwrap();
    path
}

fn sample_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::read(write_sample(dir.path())).unwrap()
}

#[test]
fn round_trip_every_codec() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path());
    // Nothing but the delta is left in the directory: temporaries are gone.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["sample.dz"]);

    let f = DeltaFile::open(&path).unwrap();
    f.verify().unwrap();
    assert_eq!(f.manifest().name, "sample");
    assert_eq!(f.manifest().base, base());
    assert_eq!(f.file_len() % 64, 0);
    // Zstd was kept only where it saved bytes, and used at least once.
    let parts: Vec<_> = f.manifest().tensors.iter().flat_map(|t| &t.parts).collect();
    assert!(parts
        .iter()
        .any(|p| p.compression == dz_format::Compression::Zstd));
    assert!(parts.iter().all(|p| p.len <= p.raw_len));

    // Every tensor decodes to exactly the payload that was written.
    let mut rng_tensors = sample_tensors(7).into_iter();
    for t in &f.manifest().tensors {
        let expected = rng_tensors.next().unwrap();
        assert_eq!(t.name, expected.name);
        let data = f.read(&t.name).unwrap();
        for (got, want) in data.parts.iter().zip(&expected.parts) {
            let want_raw = match want.compression {
                dz_format::Compression::None => want.bytes.clone(),
                dz_format::Compression::Zstd => {
                    zstd::bulk::decompress(&want.bytes, want.raw_len as usize).unwrap()
                }
            };
            assert_eq!(
                got.as_ref(),
                want_raw.as_slice(),
                "{} {}",
                t.name,
                t.parts.len()
            );
        }
        let dec = data.decode().unwrap();
        let (n_total, k) = t.matrix_dims().unwrap();
        assert_eq!(dec.to_f32(n_total).len(), n_total * k);
    }
    let emb = f.decode("model.embed_tokens.weight").unwrap();
    assert_eq!(emb.row_index.as_deref(), Some(&[1u32, 4, 9][..]));
    let full = emb.to_f32(10);
    assert!(
        full[..40].iter().all(|&v| v == 0.0),
        "row 0 is not stored, so zero"
    );
    assert!(full[40..80].iter().any(|&v| v != 0.0));
    assert!(matches!(f.read("nope"), Err(Error::UnknownTensor(_))));
    let zero = f.decode("model.layers.0.self_attn.k_proj.weight").unwrap();
    assert_eq!(zero.to_f32(6), vec![0.0; 6 * 40]);
    assert!(f.manifest().tensors.last().unwrap().parts.is_empty());
}

#[test]
fn standard_safetensors_tooling_lists_the_parts() {
    let bytes = sample_bytes();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert!(names.contains(&"model.layers.0.mlp.up_proj.weight:meta"));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().as_ref().unwrap();
    assert_eq!(meta["format"], "deltazip");
    assert_eq!(meta["deltazip_version"], "1.0");
    for (_, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::U8);
        assert_eq!(view.data().len() % 64, 0);
    }
}

#[test]
fn dropped_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.dz");
    {
        let mut w = DeltaWriter::create(&path, "x", json!({}), base(), recipe()).unwrap();
        w.add(sample_tensors(1).remove(0)).unwrap();
        // Adding the same name twice is refused and leaves the writer usable.
        assert!(matches!(
            w.add(sample_tensors(1).remove(0)),
            Err(Error::DuplicateTensor(_))
        ));
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn rewriting_over_an_existing_delta_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path());
    let before = std::fs::read(&path).unwrap();
    // A writer that fails (invalid tensor) leaves the old file intact.
    let mut w = DeltaWriter::create(&path, "y", json!({}), base(), recipe()).unwrap();
    let mut bad = sample_tensors(2).remove(0);
    bad.shape = vec![7, 40];
    assert!(matches!(w.add(bad), Err(Error::InvalidPart { .. })));
    drop(w);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

// ---- Negative tests: one per error variant ----

/// Wraps a header JSON string in the 8-byte length prefix, padding it to the 64-byte data alignment.
fn with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    h.resize((8 + h.len()).next_multiple_of(64) - 8, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

fn meta_header(format: &str, version: &str, manifest: &str) -> String {
    json!({"__metadata__": {"format": format, "deltazip_version": version, "deltazip_manifest": manifest}})
        .to_string()
}

/// Splits a valid file into (header JSON, data section).
fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Rebuilds a valid file after `edit` changes its manifest (the safetensors entries stay as they were).
fn edit_manifest(bytes: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let (mut header, data) = split(bytes);
    let mut manifest: Value = serde_json::from_str(
        header["__metadata__"]["deltazip_manifest"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    edit(&mut manifest);
    header["__metadata__"]["deltazip_manifest"] = Value::String(manifest.to_string());
    with_header(&header.to_string(), &data)
}

fn open(bytes: Vec<u8>) -> Result<DeltaFile<Vec<u8>>, Error> {
    DeltaFile::from_bytes(bytes)
}

/// Opens, then reads every tensor: the error of whichever step fails.
fn open_and_verify(bytes: Vec<u8>) -> Result<(), Error> {
    open(bytes)?.verify()
}

/// Offset in the file of the stored bytes of `tensor:part`.
fn part_offset(bytes: &[u8], key: &str) -> usize {
    let (header, _) = split(bytes);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    8 + n + header[key]["data_offsets"][0].as_u64().unwrap() as usize
}

#[test]
fn err_too_short() {
    assert!(matches!(
        open(b"\x01\x00\x00".to_vec()),
        Err(Error::TooShort { len: 3 })
    ));
}

#[test]
fn err_header_too_large() {
    let mut b = (200u64 << 20).to_le_bytes().to_vec();
    b.extend(b"{}");
    assert!(matches!(open(b), Err(Error::HeaderTooLarge { .. })));
}

#[test]
fn err_truncated_file() {
    // Cut inside the header...
    let full = sample_bytes();
    assert!(matches!(
        open(full[..100].to_vec()),
        Err(Error::HeaderOutOfBounds { .. })
    ));
    // ...and inside the data section.
    let e = open(full[..full.len() - 10].to_vec()).unwrap_err();
    assert!(matches!(e, Error::DataLength { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn err_trailing_bytes() {
    let mut full = sample_bytes();
    full.extend([0u8; 64]);
    assert!(matches!(open(full), Err(Error::DataLength { .. })));
}

#[test]
fn err_invalid_header() {
    assert!(matches!(
        open(with_header("{not json", b"")),
        Err(Error::InvalidHeader(_))
    ));
    let mut b = 4u64.to_le_bytes().to_vec();
    b.extend([0xff, 0xfe, b'{', b'}']);
    assert!(matches!(open(b), Err(Error::InvalidHeader(_))));
    assert!(matches!(
        open(with_header(r#"{"__metadata__": {"format": 7}}"#, b"")),
        Err(Error::InvalidHeader(_))
    ));
}

#[test]
fn err_not_a_delta_file() {
    // A plain safetensors file, as any tool writes it.
    let plain = with_header(
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0, 0, 128, 63],
    );
    assert!(matches!(open(plain), Err(Error::NotADeltaFile(_))));
    assert!(matches!(
        open(with_header(&meta_header("pytorch", "1.0", "{}"), b"")),
        Err(Error::NotADeltaFile(_))
    ));
}

#[test]
fn err_versions() {
    assert!(matches!(
        open(with_header(&meta_header("deltazip", "one", "{}"), b"")),
        Err(Error::InvalidVersion(_))
    ));
    let e = open(with_header(&meta_header("deltazip", "2.0", "{}"), b"")).unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedMajor { supported: 1, .. }),
        "{e}"
    );
    let e = open(with_header(&meta_header("deltazip", "1.3", "{}"), b"")).unwrap_err();
    assert!(matches!(e, Error::NewerMinor { .. }));
    assert!(e.to_string().contains("upgrade deltazip"), "{e}");
    // The version is checked before the manifest: a real file with its major bumped is refused as such.
    let full = sample_bytes();
    let (mut header, data) = split(&full);
    header["__metadata__"]["deltazip_version"] = json!("3.0");
    assert!(matches!(
        open(with_header(&header.to_string(), &data)),
        Err(Error::UnsupportedMajor { .. })
    ));
}

#[test]
fn err_invalid_manifest() {
    assert!(matches!(
        open(with_header(&meta_header("deltazip", "1.0", "{}"), b"")),
        Err(Error::InvalidManifest(_))
    ));
    let full = sample_bytes();
    let b = edit_manifest(&full, |m| m["base"]["combined"] = json!("xyz"));
    assert!(matches!(open(b), Err(Error::InvalidManifest(_))));
    let b = edit_manifest(&full, |m| m["surprise"] = json!(1));
    assert!(matches!(open(b), Err(Error::InvalidManifest(_))));
}

#[test]
fn err_duplicate_tensor() {
    let b = edit_manifest(&sample_bytes(), |m| {
        let t0 = m["tensors"][0].clone();
        m["tensors"].as_array_mut().unwrap().push(t0);
    });
    assert!(matches!(open(b), Err(Error::DuplicateTensor(_))));
}

#[test]
fn err_invalid_shape_codec_part_overflow() {
    let full = sample_bytes();
    let b = edit_manifest(&full, |m| m["tensors"][0]["shape"] = json!([6, 0]));
    assert!(matches!(open(b), Err(Error::InvalidShape { .. })));
    let b = edit_manifest(&full, |m| m["tensors"][0]["codec"]["bits"] = json!(5));
    assert!(matches!(open(b), Err(Error::InvalidCodec { .. })));
    let b = edit_manifest(&full, |m| m["tensors"][1]["shape"] = json!([6, 42]));
    assert!(
        matches!(open(b), Err(Error::InvalidCodec { .. })),
        "2:4 needs K % 4 == 0"
    );
    let b = edit_manifest(&full, |m| m["tensors"][0]["shape"] = json!([7, 40]));
    assert!(matches!(open(b), Err(Error::InvalidPart { .. })));
    let b = edit_manifest(&full, |m| {
        m["tensors"][0]["shape"] = json!([1u64 << 62, 1u64 << 62])
    });
    assert!(matches!(open(b), Err(Error::Overflow(_))));
}

#[test]
fn err_header_mismatch() {
    let full = sample_bytes();
    let (mut header, data) = split(&full);
    let key = "model.layers.0.mlp.up_proj.weight:meta";
    header[key]["dtype"] = json!("F32");
    assert!(matches!(
        open(with_header(&header.to_string(), &data)),
        Err(Error::HeaderMismatch(_))
    ));
    let (mut header, data) = split(&full);
    header["extra:part"] = json!({"dtype": "U8", "shape": [0], "data_offsets": [0, 0]});
    assert!(matches!(
        open(with_header(&header.to_string(), &data)),
        Err(Error::HeaderMismatch(_))
    ));
}

#[test]
fn err_misaligned() {
    let full = sample_bytes();
    let (header, data) = split(&full);
    let h = header.to_string();
    let mut b = (h.len() as u64 + 1).to_le_bytes().to_vec();
    b.extend(h.as_bytes());
    b.push(b' ');
    if b.len().is_multiple_of(64) {
        b.push(b' ');
        let n = (b.len() - 8) as u64;
        b[..8].copy_from_slice(&n.to_le_bytes());
    }
    b.extend(data);
    assert!(matches!(open(b), Err(Error::Misaligned { .. })));
}

#[test]
fn err_nonzero_padding() {
    let full = sample_bytes();
    let f = open(full.clone()).unwrap();
    let t = &f.manifest().tensors[0];
    let p = &t.parts[0];
    assert_ne!(p.len % 64, 0, "fixture part needs padding");
    let mut b = full.clone();
    b[part_offset(&full, &format!("{}:{}", t.name, p.name)) + p.len as usize] = 1;
    assert!(matches!(open(b), Err(Error::NonZeroPadding { .. })));
}

#[test]
fn err_flipped_payload_byte() {
    let full = sample_bytes();
    let mut b = full.clone();
    b[part_offset(&full, "model.layers.0.mlp.up_proj.weight:codes") + 3] ^= 0x10;
    // Opening succeeds (payloads are checked lazily); reading the tensor names the corruption.
    let f = open(b).unwrap();
    let e = f.read("model.layers.0.mlp.up_proj.weight").unwrap_err();
    assert!(matches!(e, Error::ChecksumMismatch { .. }), "{e}");
    assert!(e.to_string().contains("corrupt"), "{e}");
    f.read("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert!(matches!(f.verify(), Err(Error::ChecksumMismatch { .. })));
}

/// Replaces the stored bytes of part `part` of tensor `ti` (same length) and fixes its checksum.
fn replace_part(full: &[u8], ti: usize, part: &str, f: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let d = open(full.to_vec()).unwrap();
    let t = &d.manifest().tensors[ti];
    let pi = t.parts.iter().position(|p| p.name == part).unwrap();
    let off = part_offset(full, &format!("{}:{}", t.name, part));
    let mut b = full.to_vec();
    let len = t.parts[pi].len as usize;
    f(&mut b[off..off + len]);
    let sum = blake3::hash(&b[off..off + len]).to_hex().to_string();
    edit_manifest(&b, |m| m["tensors"][ti]["parts"][pi]["blake3"] = json!(sum))
}

#[test]
fn err_decompress() {
    let full = sample_bytes();
    let f = open(full.clone()).unwrap();
    let (ti, t) = f
        .manifest()
        .tensors
        .iter()
        .enumerate()
        .find(|(_, t)| {
            t.parts
                .iter()
                .any(|p| p.compression == dz_format::Compression::Zstd)
        })
        .unwrap();
    let part = t
        .parts
        .iter()
        .find(|p| p.compression == dz_format::Compression::Zstd)
        .unwrap()
        .name
        .clone();
    let b = replace_part(&full, ti, &part, |s| {
        let n = s.len();
        s[n / 2..].iter_mut().for_each(|x| *x = 0xA5)
    });
    assert!(matches!(open_and_verify(b), Err(Error::Decompress { .. })));
}

#[test]
fn err_invalid_payload() {
    let full = sample_bytes();
    // tensor 1 is the 2:4 one: nibble 0x0 is not a valid pair of positions.
    let b = replace_part(&full, 1, "meta", |s| s[0] = 0x00);
    let e = open_and_verify(b).unwrap_err();
    assert!(matches!(e, Error::InvalidPayload { .. }), "{e}");
    // tensor 2 is unstructured sparse: a row pointer that disagrees with the mask.
    let b = replace_part(&full, 2, "row_ptr", |s| s[4] ^= 0x10);
    assert!(matches!(
        open_and_verify(b),
        Err(Error::InvalidPayload { .. })
    ));
}

#[test]
fn err_delta_for_another_base() {
    let f = open(sample_bytes()).unwrap();
    let mut other = BTreeMap::new();
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
    ] {
        other.insert(name.to_string(), tensor_hash(name, "f32", &[4], &[8u8; 16]));
    }
    let other = BaseFingerprint::from_tensor_hashes(other);
    let e = f.manifest().base.check_base(&other).unwrap_err();
    assert!(matches!(e, Error::BaseMismatch { .. }));
    assert!(e.to_string().contains("another base"), "{e}");
    f.manifest().base.check_base(&base()).unwrap();
}

#[test]
fn err_io_names_the_path() {
    let e = DeltaFile::open("/nonexistent/dir/x.dz").unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/dir/x.dz"));
}

#[test]
fn writer_refuses_a_payload_that_does_not_fit() {
    let mut t = sample_tensors(3).remove(0);
    t.parts.pop();
    let dir = tempfile::tempdir().unwrap();
    let mut w =
        DeltaWriter::create(dir.path().join("z.dz"), "z", json!({}), base(), recipe()).unwrap();
    assert!(matches!(w.add(t), Err(Error::InvalidPart { .. })));
    let payload = Payload::Dense(Dense::from_f32(1, 2, Dtype::F32, &[1.0, 2.0]));
    let e = EncodedTensor::from_payload(
        "e",
        Role::Full,
        &[],
        Dtype::F32,
        None,
        &payload,
        Lossless::None,
    );
    assert!(matches!(e, Err(Error::Writer(_))));
}

//! Using deltazip as a library: compress a fine-tune into a delta, read it back, and run base + delta.
//!
//! `cargo run --release -p deltazip --example compress_and_apply`
//!
//! It makes its own seeded tiny model family (no downloads); point `base`/`finetuned` at real HF
//! directories to do the same with your models.

use anyhow::Result;
use deltazip::compressor::fixtures::{self, TinySpec};
use deltazip::compressor::merge::Applied;
use deltazip::compressor::model::kl_divergence;
use deltazip::compressor::pipeline::{self, CompressOptions, Quiet};
use deltazip::format::DeltaFile;

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fam = fixtures::write_family(&dir.path().join("family"), &TinySpec::llama(), 1)?;
    let (base, finetuned) = (&fam.base, &fam.finetunes[0]);

    // 1. Compress: calibrated OBS, 4-bit 2:4 (the defaults), on the family's own text.
    let out = dir.path().join("ft.dz");
    let opts = CompressOptions {
        calib_text: Some(fam.calib_text.clone()),
        samples: 16,
        seq_len: 64,
        ..CompressOptions::default()
    };
    let report = pipeline::compress(base, finetuned, &out, &opts, &mut Quiet)?;
    println!(
        "delta: {} bytes, {:.2}x smaller than bf16",
        report.file_bytes,
        report.ratio()
    );

    // 2. Read it: every tensor lazily, checksums verified on read.
    let delta = DeltaFile::open(&out)?;
    for t in delta.manifest().tensors.iter().take(3) {
        println!(
            "  {:<44} {:<24} {} bytes",
            t.name,
            t.codec.describe(),
            t.stored_bytes()
        );
    }

    // 3. Run base + delta (refused if the delta belongs to another base) and compare with the fine-tune.
    let applied = Applied::open(base, &out)?;
    let model = applied.model(&candle_core::Device::Cpu)?;
    let ft = deltazip::compressor::hf::HfModel::open(finetuned)?;
    let ft_model =
        deltazip::compressor::model::LlamaModel::load(ft.arch(), &candle_core::Device::Cpu, |n| {
            ft.to_f32(n)
        })?;
    let tokens: Vec<u32> = (0..256).map(|i| (i * 7 % 300) as u32).collect();
    println!(
        "KL(fine-tune || base + delta) = {:.2e} per token",
        kl_divergence(&ft_model, &model, &tokens, 64, None)?
    );
    Ok(())
}

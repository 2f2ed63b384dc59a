//! Compresses one fine-tune under a size budget and measures how close the result stays to the fine-tune:
//! the experiment behind the budgeted allocation's choices (issue 6, "OBS beats RTN at every ratio").
//!
//! ```text
//! cargo run --release -p dz-compress --example budget_ab -- BASE FT TEXT CALIB RATIO|4b24 obs|rtn [SAMPLES SEQ]
//! ```
//!
//! `DZ_TABLE_DAMP=x` sets `tied_table_damp`, `DZ_DAMP=x` the linear layers' OBS damping,
//! `DZ_BUDGET_ERROR=absolute|weighted|plain|auto` the size budget's ranking (default auto, as the
//! pipeline's).
//!
//! Prints the file's ratio, the allocation's mix, held-out perplexity (last 10% of TEXT, 4 windows of 512)
//! and KL(fine-tune || compressed) on the same windows.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use dz_compress::calib_data::tokenize_file;
use dz_compress::hf::HfModel;
use dz_compress::merge::Applied;
use dz_compress::model::{kl_divergence, LlamaModel};
use dz_compress::pipeline::{self, CompressOptions, Method, Progress};

struct Notes;

impl Progress for Notes {
    fn note(&mut self, msg: &str) {
        eprintln!("note: {msg}");
    }
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [base, ft, text, calib, ratio, method, rest @ ..] = a.as_slice() else {
        anyhow::bail!("usage: BASE FT TEXT CALIB RATIO obs|rtn [SAMPLES SEQ]");
    };
    let (base, ft) = (PathBuf::from(base), PathBuf::from(ft));
    let samples: usize = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(16);
    let seq: usize = rest.get(1).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let mut o = CompressOptions {
        method: if method == "obs" {
            Method::Obs
        } else {
            Method::Rtn
        },
        target_ratio: None,
        embed_bits: 2,
        calib_text: Some(calib.into()),
        samples,
        seq_len: seq,
        ..CompressOptions::default()
    };
    // RATIO is a target ratio, or `4b24` for the fixed recipe (4-bit 2:4, 4-bit embeddings).
    if ratio == "4b24" {
        o.embed_bits = 4;
    } else {
        o.target_ratio = Some(ratio.parse()?);
    }
    // DZ_TABLE_DAMP / DZ_BUDGET_ERROR=weighted: the options under study.
    if let Ok(v) = std::env::var("DZ_TABLE_DAMP") {
        o.tied_table_damp = v.parse()?;
    }
    if let Ok(v) = std::env::var("DZ_DAMP") {
        o.damp = v.parse()?;
    }
    match std::env::var("DZ_BUDGET_ERROR").as_deref() {
        Ok("weighted") => o.budget_error = pipeline::BudgetError::DeltaWeighted,
        Ok("absolute") => o.budget_error = pipeline::BudgetError::Absolute,
        Ok("plain") => o.budget_error = pipeline::BudgetError::Plain,
        Ok("auto") | Err(_) => o.budget_error = pipeline::BudgetError::Auto,
        Ok(other) => {
            anyhow::bail!("DZ_BUDGET_ERROR: absolute, weighted, plain or auto, got {other:?}")
        }
    }
    let out = std::env::temp_dir().join(format!("budget_ab-{}.dz", std::process::id()));
    let t0 = std::time::Instant::now();
    let r = pipeline::compress(&base, &ft, &out, &o, &mut Notes)?;
    let secs = t0.elapsed().as_secs_f64();
    let bh = HfModel::open(&base)?;
    let tok = bh.tokenizer_path().context("tokenizer")?;
    let t = tokenize_file(&tok, std::path::Path::new(text))?;
    let held = &t[t.len() - t.len() / 10..];
    let held = &held[..held.len().min(4 * 512)];
    let fh = HfModel::open(&ft)?;
    let fm = LlamaModel::load(fh.arch(), &Device::Cpu, |n| fh.to_f32(n))?;
    let bm = LlamaModel::load(bh.arch(), &Device::Cpu, |n| bh.to_f32(n))?;
    let cm = Applied::open(&base, &out)?.model(&Device::Cpu)?;
    let (pb, pf, pc) = (
        bm.perplexity(held, 512, None)?.ppl,
        fm.perplexity(held, 512, None)?.ppl,
        cm.perplexity(held, 512, None)?.ppl,
    );
    let kl = kl_divergence(&fm, &cm, held, 512, None)?;
    let emb: Vec<_> = r
        .tensors
        .iter()
        .filter(|t| t.role != dz_format::Role::Linear && t.role != dz_format::Role::DenseDelta)
        .map(|t| format!("{} {} frob {:.3}", t.name, t.codec, t.frobenius_error))
        .collect();
    println!(
        "{method} t{ratio}: {:.2}x in {secs:.0}s, ppl base {pb:.3} ft {pf:.3} c {pc:.3} (kept {:.1}%), KL {kl:.4e}; \
         rankings tried {:?}; {}",
        r.ratio(),
        100.0 * (pb - pc) / (pb - pf),
        r.budget_trials,
        emb.join("; ")
    );
    let _ = std::fs::remove_file(&out);
    Ok(())
}

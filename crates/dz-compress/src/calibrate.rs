//! Sequential layer-by-layer calibration (DeltaZip section 4.1, as in GPTQ and SparseGPT).
//!
//! For each decoder layer in order, and each linear group of that layer in order (q/k/v, o, gate/up, down;
//! [`ArchConfig::linear_groups`](crate::arch::ArchConfig::linear_groups)), [`calibrate`] runs every sample
//! through the model's stages up to the group's input with the *current* weights, accumulates the input
//! Hessian `H = 2/n * sum(x x^T)` over all `n` tokens, and hands it to a `compress` callback whose answer
//! (base plus decompressed delta) is installed before the next group. So compressed activations feed forward: the o
//! group sees the attention output of the compressed q/k/v, the next layer sees the compressed layer's output.
//!
//! Each stage is computed once per layer: the outputs that a later group of the same layer needs (attention
//! core, post-attention residual, MLP core) are kept on the device between groups rather than recomputed,
//! which is equivalent because a group's input depends only on groups before it. Hidden states stay on the
//! device between layers; earlier layers are never re-run. Peak memory is about
//! `tokens * (2 * hidden + intermediate) * 4` bytes on top of the model.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::{check_ids, ids_tensor, LlamaModel};

/// Samples per forward batch unless told otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 8;

/// Where calibration is: reported after each group has been compressed and installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Decoder layer.
    pub layer: usize,
    /// Group within the layer: 0 q/k/v, 1 o, 2 gate/up, 3 down.
    pub group: usize,
    /// Groups done so far, this one included (1-based).
    pub done: usize,
    /// Groups in the whole model: `4 * num_layers`.
    pub total: usize,
}

/// Accumulates `H = 2/n * sum(x x^T)` over the rows `x` of activation batches: each batch's `X^T X` is one
/// f32 matmul on the batch's device, summed across batches in f64.
#[derive(Debug)]
pub struct HessianAccumulator {
    cols: usize,
    sum: Option<Tensor>,
    tokens: usize,
}

impl HessianAccumulator {
    /// An empty accumulator for inputs of width `cols`.
    pub fn new(cols: usize) -> Self {
        Self {
            cols,
            sum: None,
            tokens: 0,
        }
    }

    /// Adds every row of `x` (`[.., cols]`, f32) as one token.
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        let cols = x.dims().last().copied().unwrap_or(0);
        if cols != self.cols {
            return Err(Error::ShapeMismatch {
                what: "hessian input width",
                expected: self.cols,
                got: cols,
            });
        }
        let rows = x.elem_count() / cols.max(1);
        let x = x.reshape((rows, cols))?.to_dtype(DType::F32)?;
        let xtx = x.t()?.matmul(&x)?.to_dtype(DType::F64)?;
        self.sum = Some(match self.sum.take() {
            None => xtx,
            Some(s) => (s + xtx)?,
        });
        self.tokens += rows;
        Ok(())
    }

    /// Tokens added so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// `2/n * sum(x x^T)`, row-major `cols x cols`, made exactly symmetric.
    pub fn finish(self) -> Result<Vec<f32>> {
        let Some(sum) = self.sum.filter(|_| self.tokens > 0) else {
            return Err(Error::Calibration(
                "no tokens were seen for a Hessian".into(),
            ));
        };
        let scale = 2.0 / self.tokens as f64;
        let h = ((&sum + &sum.t()?)? * (0.5 * scale))?.to_dtype(DType::F32)?;
        Ok(h.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Runs sequential calibration over `samples` (token rows, all of one length, at least one), in forward
/// batches of `batch_size` samples.
///
/// For each layer `i` and each of its four groups, calls `compress(i, names, h, cols)` with the group's tensor
/// names (from [`ArchConfig::linear_groups`](crate::arch::ArchConfig::linear_groups)), its input Hessian `h`
/// (`cols x cols`, row-major) and the input width `cols` (hidden for q/k/v and gate/up, `heads * head_dim`
/// for o, intermediate for down). The callback returns `(name, weights)` pairs in the model's `[rows, cols]`
/// layout, each naming a tensor of the group; they are installed with [`LlamaModel::set_weight`] (a tensor it
/// leaves out keeps its weights). `progress` is called after each group.
///
/// Returns the residual stream after the last layer, `[samples, seq_len, hidden]`, computed with the
/// installed weights: with a callback that returns the weights unchanged it equals a plain forward.
pub fn calibrate<C, P>(
    model: &mut LlamaModel,
    samples: &[Vec<u32>],
    batch_size: usize,
    mut compress: C,
    mut progress: P,
) -> Result<Tensor>
where
    C: FnMut(usize, &[String], &[f32], usize) -> Result<Vec<(String, Vec<f32>)>>,
    P: FnMut(Progress),
{
    let arch = model.arch().clone();
    let device: Device = model.device().clone();
    let seq_len = samples.first().map_or(0, Vec::len);
    if seq_len == 0 {
        return Err(Error::Calibration(
            "no calibration samples, or empty ones".into(),
        ));
    }
    if let Some(bad) = samples.iter().position(|s| s.len() != seq_len) {
        return Err(Error::Calibration(format!(
            "sample {bad} has {} tokens, sample 0 has {seq_len}",
            samples[bad].len()
        )));
    }
    if batch_size == 0 {
        return Err(Error::InvalidConfig(
            "calibration batch size must be >= 1".into(),
        ));
    }
    check_ids(samples.iter().flatten(), arch.vocab_size)?;

    let mut hs = samples
        .chunks(batch_size)
        .map(|batch| model.embed(&ids_tensor(batch, &device)?))
        .collect::<Result<Vec<_>>>()?;
    let total = 4 * arch.num_layers;
    let cols = [
        arch.hidden_size,
        arch.num_heads * arch.head_dim,
        arch.hidden_size,
        arch.intermediate_size,
    ];
    let mut done = 0;
    for i in 0..arch.num_layers {
        let groups = arch.linear_groups(i);
        let mut step = |model: &mut LlamaModel, group: usize, acc: HessianAccumulator| {
            install(model, i, &groups[group], acc, cols[group], &mut compress)?;
            done += 1;
            progress(Progress {
                layer: i,
                group,
                done,
                total,
            });
            Ok::<(), Error>(())
        };

        // q/k/v: input_layernorm(h).
        let mut acc = HessianAccumulator::new(cols[0]);
        for h in &hs {
            acc.add(&model.attn_input(i, h)?)?;
        }
        step(model, 0, acc)?;

        // o: attention of the compressed q/k/v.
        let mut acc = HessianAccumulator::new(cols[1]);
        let mut cores = Vec::with_capacity(hs.len());
        for h in &hs {
            let core = model.attn_core(i, &model.attn_input(i, h)?)?;
            acc.add(&core)?;
            cores.push(core);
        }
        step(model, 1, acc)?;

        // gate/up: post_attention_layernorm of the residual after the compressed o.
        let mut acc = HessianAccumulator::new(cols[2]);
        let mut mids = Vec::with_capacity(hs.len());
        for (h, core) in std::mem::take(&mut hs).into_iter().zip(cores) {
            let mid = model.attn_out(i, &h, &core)?;
            acc.add(&model.mlp_input(i, &mid)?)?;
            mids.push(mid);
        }
        step(model, 2, acc)?;

        // down: silu(gate) * up of the compressed gate/up.
        let mut acc = HessianAccumulator::new(cols[3]);
        let mut ms = Vec::with_capacity(mids.len());
        for mid in &mids {
            let m = model.mlp_core(i, &model.mlp_input(i, mid)?)?;
            acc.add(&m)?;
            ms.push(m);
        }
        step(model, 3, acc)?;

        // Advance every sample through the compressed layer.
        hs = mids
            .iter()
            .zip(&ms)
            .map(|(mid, m)| model.mlp_out(i, mid, m))
            .collect::<Result<Vec<_>>>()?;
    }
    Ok(Tensor::cat(&hs, 0)?)
}

/// Finishes a group's Hessian, asks the callback for the group's new weights and installs them.
fn install<C>(
    model: &mut LlamaModel,
    layer: usize,
    names: &[String],
    acc: HessianAccumulator,
    cols: usize,
    compress: &mut C,
) -> Result<()>
where
    C: FnMut(usize, &[String], &[f32], usize) -> Result<Vec<(String, Vec<f32>)>>,
{
    let h = acc.finish()?;
    for (name, values) in compress(layer, names, &h, cols)? {
        if !names.contains(&name) {
            return Err(Error::Calibration(format!(
                "the compressor returned {name}, which is not in the group {names:?}"
            )));
        }
        model.set_weight(&name, &values)?;
    }
    Ok(())
}

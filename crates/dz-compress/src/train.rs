//! Full-parameter fine-tuning with candle's autograd: the loop behind `examples/finetune.rs` and the
//! CI-sized quality test, so that both make fine-tunes the same way (DeltaZip compresses the deltas of
//! full-parameter fine-tunes, arXiv 2312.05215).
//!
//! AdamW (weight decay 0) on the mean next-token cross-entropy ([`LlamaModel::next_token_loss`]) of `batch`
//! random windows per step (seeded), every weight trainable; tied embeddings stay one variable. Linear
//! warmup, then constant or cosine decay to 10% of the peak. The update is split into one optimizer per
//! rayon thread over disjoint, equally sized sets of variables, stepped in parallel (the same math as one
//! AdamW, whose update is per element): candle's elementwise ops run on one thread.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::LlamaModel;

/// How to train.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Windows per step.
    pub batch: usize,
    /// Tokens per training window.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warmup to the peak.
    pub warmup: usize,
    /// After warmup, decay along a cosine to 10% of the peak at the last step (else constant).
    pub cosine: bool,
    /// Seed of the training windows.
    pub seed: u64,
}

impl TrainConfig {
    /// The learning rate at `step` (1-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step <= self.warmup {
            return self.lr * step as f64 / self.warmup as f64;
        }
        if !self.cosine || self.steps <= self.warmup + 1 {
            return self.lr;
        }
        let progress = (step - self.warmup - 1) as f64 / (self.steps - self.warmup - 1) as f64;
        let min = 0.1 * self.lr;
        min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// One finished step, for progress output.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// 1-based.
    pub step: usize,
    /// The step's mean loss (nats per token).
    pub loss: f32,
    /// The learning rate used.
    pub lr: f64,
    /// Seconds in the forward pass, the backward pass, and the whole step.
    pub fwd_s: f64,
    /// Seconds in the backward pass.
    pub bwd_s: f64,
    /// Seconds for the whole step.
    pub step_s: f64,
}

/// One AdamW per rayon thread over disjoint sets of variables of about equal size (largest first into the
/// lightest set).
pub fn parallel_adamw(vars: &HashMap<String, Var>, lr: f64) -> Result<Vec<AdamW>> {
    let threads = rayon::current_num_threads().max(1);
    let mut by_size: Vec<(&String, &Var)> = vars.iter().collect();
    // Name as the tie-break: the same sets on every run.
    by_size.sort_by(|a, b| b.1.elem_count().cmp(&a.1.elem_count()).then(a.0.cmp(b.0)));
    let mut sets: Vec<(usize, Vec<Var>)> = (0..threads).map(|_| (0, Vec::new())).collect();
    for (_, v) in by_size {
        if let Some(set) = sets.iter_mut().min_by_key(|(n, _)| *n) {
            set.0 += v.elem_count();
            set.1.push(v.clone());
        }
    }
    let params = ParamsAdamW {
        lr,
        weight_decay: 0.0,
        ..ParamsAdamW::default()
    };
    Ok(sets
        .into_iter()
        .filter(|(_, vs)| !vs.is_empty())
        .map(|(_, vs)| AdamW::new(vs, params.clone()))
        .collect::<candle_core::Result<_>>()?)
}

/// Trains `model` (built by [`LlamaModel::from_vars`] on `vars`) on random windows of `tokens`; calls
/// `on_step` after every step and returns the losses. Refuses a text too short for one window, a zero
/// step or batch count, and stops with [`Error::Calibration`] on a non-finite loss.
pub fn train(
    model: &LlamaModel,
    vars: &HashMap<String, Var>,
    tokens: &[u32],
    cfg: &TrainConfig,
    device: &Device,
    mut on_step: impl FnMut(&StepReport),
) -> Result<Vec<f32>> {
    if cfg.steps == 0 || cfg.batch == 0 || cfg.seq_len < 2 || cfg.lr.is_nan() || cfg.lr <= 0.0 {
        return Err(Error::InvalidConfig(format!(
            "training needs steps >= 1, batch >= 1, seq_len >= 2 and lr > 0; got {cfg:?}"
        )));
    }
    if tokens.len() <= cfg.seq_len {
        return Err(Error::Calibration(format!(
            "the training text has {} tokens; a window needs {}",
            tokens.len(),
            cfg.seq_len + 1
        )));
    }
    let mut opts = parallel_adamw(vars, cfg.lr_at(1))?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut losses = Vec::with_capacity(cfg.steps);
    for step in 1..=cfg.steps {
        let t = Instant::now();
        let starts: Vec<usize> = (0..cfg.batch)
            .map(|_| rng.gen_range(0..=tokens.len() - cfg.seq_len))
            .collect();
        let ids: Vec<u32> = starts
            .iter()
            .flat_map(|&s| tokens[s..s + cfg.seq_len].iter().copied())
            .collect();
        let ids = Tensor::from_vec(ids, (cfg.batch, cfg.seq_len), device)?;
        let loss = model.next_token_loss(&ids)?;
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            return Err(Error::Calibration(format!(
                "step {step}: the loss is {loss_value}"
            )));
        }
        let fwd_s = t.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        drop(loss);
        let bwd_s = t.elapsed().as_secs_f64() - fwd_s;
        let lr = cfg.lr_at(step);
        opts.par_iter_mut().try_for_each(|o| {
            o.set_learning_rate(lr);
            o.step(&grads)
        })?;
        drop(grads);
        losses.push(loss_value);
        on_step(&StepReport {
            step,
            loss: loss_value,
            lr,
            fwd_s,
            bwd_s,
            step_s: t.elapsed().as_secs_f64(),
        });
    }
    Ok(losses)
}

//! `deltazip bench hook`: what the multi-tenant hook costs the CPU per module call, apart from a server.
//!
//! Session 11's serving profile (`DZ_PROFILE=host`) found that at 16-64 req/s the CPU issuing a decode
//! step bounds it about as much as the GPU does, and that the delta parts take 32 ms of CPU per 76 ms step.
//! A serving run takes minutes and varies by ~10% between runs; this takes seconds. It loads a config's
//! deltas under `--fine-tunes` names, wraps one decoder layer's linear layers and RMS norms as the
//! server does, and calls each under row tags that spread `--rows` decode rows over the names:
//! - `host us`: the CPU's time per call, `--iters` calls queued without a synchronization;
//! - `wall us`: per call until the device has run them all (what the GPU adds, when it is the slower);
//! - for each linear layer the base layer alone too, so that `delta us` is the hook's own share.
//!
//! Every call of the timed loop sees the same row tags, as the ~300 modules of one forward pass do: the
//! pass's `RowPlan` is made once, and each linear layer runs the sbmm plan it cached on its first call
//! (`dz_candle_ops::SbmmPlan`: on CUDA no delta is described and no table uploaded per call). Two rows
//! of the first linear layer show the rest: "a new pass each call" (new row tags over the same rows:
//! the `RowPlan` made again, the layer's plan reused, as in consecutive decode steps of one batch) and
//! "another batch each call" (the rows alternate between two layouts: the layer's plan built each call,
//! what every call cost before the plans were cached).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use dz_compress::hf::HfModel;
use dz_loader::{Config, DeltaHook, DeltaRegistry, FineTuneDeltas};
use mistralrs_quant::{
    with_row_tags, LinearHook, ModuleKind, QuantMethod, QuantMethodConfig, RowTags, UnquantLinear,
};

use crate::compress::parse_device;

/// Options of `deltazip bench hook`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchHookArgs {
    /// A serve config (TOML) with multi-tenant deltas, e.g. from `deltazip synth deltas --config`.
    #[arg(long)]
    pub config: PathBuf,
    /// Fine-tune names to load: the config's deltas cycled, each name its own copy on the device.
    #[arg(long, default_value_t = 32)]
    pub fine_tunes: usize,
    /// Batch rows (decode: one token each), row b for name b mod fine-tunes.
    #[arg(long, default_value_t = 32)]
    pub rows: usize,
    /// The decoder layer whose modules are called.
    #[arg(long, default_value_t = 0)]
    pub layer: usize,
    /// Calls timed per module (keep calls x launches under the driver's queue of ~1000 launches).
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
    /// cpu, cuda or cuda:N (default: the config's runtime.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Upload the deltas for the v4 kernels (`serve --v4-kernels`).
    #[arg(long)]
    pub v4_kernels: bool,
    /// Also time the slot tables (`serve --slot-tables`, dz_loader::set_slot_tables): the layer's
    /// deltas by fine-tune slot and one segment table per pass, beside the per-layer plans, in rows
    /// where the batch changes every pass (the serving case).
    #[arg(long)]
    pub slot_tables: bool,
    /// Also time a prompt step of this many tokens (one sequence of one fine-tune) through each linear
    /// layer, against the base layer alone: a new prompt every call (the fine-tune alternates), so the
    /// layer's plan is built every time, as in serving. 0: off.
    #[arg(long, default_value_t = 0)]
    pub prefill: usize,
    /// Also report where each timed call's CPU goes: the named phases of the hook and the ops
    /// (`dz_candle_ops::trace`: the layer plan's build, the deltas described, the table uploaded, the
    /// output allocated, the launches), in microseconds per call.
    #[arg(long)]
    pub phases: bool,
}

/// One linear layer of the timed decoder layer: the base layer alone and wrapped by the hook.
struct Layer {
    module: String,
    base: Arc<dyn QuantMethod>,
    wrapped: Arc<dyn QuantMethod>,
    /// Its input width.
    k: usize,
}

/// One timed module.
struct Timed {
    module: String,
    base_host_us: Option<f64>,
    host_us: f64,
    wall_us: f64,
    /// The ops' CPU phases over the timed calls (empty without `--phases`).
    phases: Vec<dz_candle_ops::trace::PhaseTotal>,
}

/// Calls queued between two synchronizations while timing: few enough that their launches stay well
/// inside the driver's queue (~1000 launches), so that the host time is the CPU's issuing, not a wait for
/// a full queue (a pass of seven sbmm layers queues ~30 launches a call).
const CALLS_PER_SYNC: usize = 8;

/// What [`time_calls`] measured, per call.
struct Times {
    /// The CPU's time issuing one call (the synchronizations every [`CALLS_PER_SYNC`] calls excluded).
    host: f64,
    /// Until the device has run them all (the synchronizations included).
    wall: f64,
    /// The ops' CPU phases (`dz_candle_ops::trace`, with `--phases`) over the timed calls.
    phases: Vec<dz_candle_ops::trace::PhaseTotal>,
}

/// Microseconds per call of `f`, `iters` calls (after 3 untimed ones).
fn time_calls(
    device: &Device,
    iters: usize,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> Result<Times> {
    let mut keep = Vec::with_capacity(iters + 3);
    for _ in 0..3 {
        keep.push(f()?);
    }
    device.synchronize()?;
    dz_candle_ops::trace::take();
    let mut host = 0.0;
    let t0 = Instant::now();
    for chunk in 0..iters.div_ceil(CALLS_PER_SYNC) {
        let calls = CALLS_PER_SYNC.min(iters - chunk * CALLS_PER_SYNC);
        let t = Instant::now();
        for _ in 0..calls {
            keep.push(f()?);
        }
        host += t.elapsed().as_secs_f64();
        device.synchronize()?;
    }
    let wall = t0.elapsed().as_secs_f64();
    let phases = dz_candle_ops::trace::take();
    let per = |s: f64| s * 1e6 / iters.max(1) as f64;
    Ok(Times {
        host: per(host),
        wall: per(wall),
        phases,
    })
}

/// Runs `deltazip bench hook`; returns the markdown report.
pub fn run_hook(args: &BenchHookArgs) -> Result<String> {
    if args.fine_tunes == 0 || args.rows == 0 || args.iters == 0 {
        bail!("--fine-tunes, --rows and --iters must be at least 1");
    }
    let (config, deltas) = Config::load(&args.config)?;
    if deltas.is_empty() {
        bail!("{}: no deltas to load", args.config.display());
    }
    let device = match &args.device {
        Some(d) => parse_device(d)?,
        None => dz_loader::device(config.runtime.device)?,
    };
    if device.is_cuda() {
        dz_loader::set_v4_kernels(args.v4_kernels);
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = &device {
        // As mistral.rs does for the devices it loads onto (a server never pays for event tracking).
        // SAFETY: one stream per device (candle's); buffers allocated from here on go untracked.
        unsafe { dev.disable_event_tracking() };
    }
    let dtype = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let base = HfModel::open(&config.base.path)?;
    let arch = base.arch().clone();

    let registry = Arc::new(DeltaRegistry::new());
    let t0 = Instant::now();
    for i in 0..args.fine_tunes {
        let d = &deltas[i % deltas.len()];
        let mut ft = FineTuneDeltas::load(&d.spec.name, &d.file, &device, arch.tie_word_embeddings)
            .with_context(|| format!("loading {} onto {device:?}", d.spec.path.display()))?;
        ft.set_name(&format!("ft-{i:02}"));
        registry.insert(Arc::new(ft));
    }
    let load_s = t0.elapsed().as_secs_f64();
    dz_candle_ops::trace::set_enabled(args.phases);
    let names: Vec<Option<Arc<str>>> = (0..args.rows)
        .map(|b| Some(Arc::<str>::from(format!("ft-{:02}", b % args.fine_tunes))))
        .collect();
    let tags: RowTags = Arc::from(names.clone());
    let hook = DeltaHook(registry.clone());

    let prefix = format!("model.layers.{}", args.layer);
    let mut timed = Vec::new();
    // Activations of unit scale (their values do not change the time).
    let input = |width: usize| -> Result<Tensor> {
        let t = Tensor::randn(0f32, 1.0, (args.rows, 1, width), &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(&device)?)
    };
    // Layer `module` of the base as the host builds it (an unquantized linear layer, no bias).
    let base_linear = |module: &str| -> Result<(Arc<dyn QuantMethod>, usize)> {
        let wname = format!("{module}.weight");
        let info = base
            .info(&wname)
            .with_context(|| format!("the base has no {wname}"))?;
        let &[n, k] = info.shape.as_slice() else {
            bail!("{wname}: shape {:?}, expected [out, in]", info.shape);
        };
        let w = Tensor::from_vec(base.to_f32(&wname)?, (n, k), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(&device)?;
        let linear: Arc<dyn QuantMethod> = Arc::new(<UnquantLinear as QuantMethod>::new(
            QuantMethodConfig::Unquantized(candle_nn::Linear::new(w, None)),
        )?);
        Ok((linear, k))
    };
    // The first linear layer, kept for the new-pass row below; every wrapped linear layer, for the
    // rows of a pass over all seven.
    let mut first: Option<(String, Arc<dyn QuantMethod>, Tensor)> = None;
    let mut linears: Vec<(Arc<dyn QuantMethod>, Tensor)> = Vec::new();
    // Per linear layer, for the prompt rows.
    let mut layers: Vec<Layer> = Vec::new();
    for name in [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ] {
        let module = format!("{prefix}.{name}");
        let (linear, k) = base_linear(&module)?;
        let wrapped = hook.wrap(&module, linear.clone())?;
        let x = input(k)?;
        let base_host = time_calls(&device, args.iters, || linear.forward(&x))?.host;
        let t = with_row_tags(Some(tags.clone()), || {
            time_calls(&device, args.iters, || wrapped.forward(&x))
        })?;
        linears.push((wrapped.clone(), x.clone()));
        layers.push(Layer {
            module: module.clone(),
            base: linear.clone(),
            wrapped: wrapped.clone(),
            k,
        });
        if first.is_none() {
            first = Some((module.clone(), wrapped, x));
        }
        timed.push(Timed {
            module,
            base_host_us: Some(base_host),
            host_us: t.host,
            wall_us: t.wall,
            phases: t.phases,
        });
    }
    for name in ["input_layernorm", "post_attention_layernorm"] {
        let module = format!("{prefix}.{name}");
        let Some(delta) = hook.module(
            &module,
            ModuleKind::RmsNorm {
                eps: arch.rms_norm_eps,
            },
        )?
        else {
            continue;
        };
        let x = input(arch.hidden_size)?;
        let base_out = input(arch.hidden_size)?;
        // The three-op path, then the one op (`dz_loader::set_fused_norm_deltas`).
        for (fused, label) in [(false, ""), (true, " (one op)")] {
            registry.force_fused_norm_deltas(Some(fused));
            let t = with_row_tags(Some(tags.clone()), || {
                time_calls(&device, args.iters, || delta.forward(&x, base_out.clone()))
            })?;
            timed.push(Timed {
                module: format!("{module}{label}"),
                base_host_us: None,
                host_us: t.host,
                wall_us: t.wall,
                phases: t.phases,
            });
        }
        registry.force_fused_norm_deltas(None);
    }
    // The first module of each pass: new row tags every call, so the pass's plan is made each time.
    let (q, wrapped, x) = first.context("no linear layer was timed")?;
    registry.force_slot_tables(Some(false));
    let t = time_calls(&device, args.iters, || {
        let fresh: RowTags = Arc::from(names.clone());
        with_row_tags(Some(fresh), || wrapped.forward(&x))
    })?;
    timed.push(Timed {
        module: format!("{q} (a new pass each call: its row plan made, the layer's reused)"),
        base_host_us: None,
        host_us: t.host,
        wall_us: t.wall,
        phases: t.phases,
    });
    // Another layout every call: the names rotated by one row (one name: the first row untagged), so
    // the layer's cached plan never serves and is built each time.
    let mut other = names.clone();
    if args.fine_tunes > 1 {
        other.rotate_left(1);
    } else {
        other[0] = None;
    }
    let mut flip = false;
    let t = time_calls(&device, args.iters, || {
        flip = !flip;
        let fresh: RowTags = Arc::from(if flip { other.clone() } else { names.clone() });
        with_row_tags(Some(fresh), || wrapped.forward(&x))
    })?;
    timed.push(Timed {
        module: format!("{q} (another batch each call: the layer's plan built)"),
        base_host_us: None,
        host_us: t.host,
        wall_us: t.wall,
        phases: t.phases,
    });

    // A pass over the seven linear layers with another batch every pass (what continuous batching
    // does): per module call, the per-layer plans (each built every pass) and, with --slot-tables, the
    // slot tables (one segment table a pass, the layers' slot tables built once).
    let per_pass = |label: &str| -> Result<Timed> {
        let mut flip = false;
        let t = time_calls(&device, args.iters, || {
            flip = !flip;
            let fresh: RowTags = Arc::from(if flip { other.clone() } else { names.clone() });
            with_row_tags(Some(fresh), || {
                let mut last = None;
                for (l, x) in &linears {
                    last = Some(l.forward(x)?);
                }
                last.ok_or_else(|| candle_core::Error::Msg("no linear layer".into()))
            })
        })?;
        let per = linears.len().max(1) as f64;
        Ok(Timed {
            module: format!("7 linear layers, another batch each pass, per call: {label}"),
            base_host_us: None,
            host_us: t.host / per,
            wall_us: t.wall / per,
            phases: t.phases,
        })
    };
    registry.force_slot_tables(Some(false));
    timed.push(per_pass("the layers' plans built")?);
    let mut slot_builds = None;
    if args.slot_tables {
        registry.force_slot_tables(Some(true));
        let before = (registry.slot_segment_builds(), registry.slot_table_builds());
        timed.push(per_pass("slot tables")?);
        let (q, wrapped, x) = (&q, &wrapped, &x);
        let t = with_row_tags(Some(tags.clone()), || {
            time_calls(&device, args.iters, || wrapped.forward(x))
        })?;
        timed.push(Timed {
            module: format!("{q} (slot tables, the same pass each call)"),
            base_host_us: None,
            host_us: t.host,
            wall_us: t.wall,
            phases: t.phases,
        });
        let after = (registry.slot_segment_builds(), registry.slot_table_builds());
        slot_builds = Some((after.0 - before.0, after.1 - before.1));
    }
    registry.force_slot_tables(None);

    // Prompt steps: one sequence of `prefill` tokens, `[1, prefill, K]`, tagged with one fine-tune that
    // alternates between calls (with one name: tagged, then untagged).
    if args.prefill > 0 {
        let tag = |i: usize| -> RowTags {
            let name = (args.fine_tunes > 1 || i == 0)
                .then(|| Arc::<str>::from(format!("ft-{:02}", i % args.fine_tunes)));
            Arc::from(vec![name])
        };
        for Layer {
            module,
            base: linear,
            wrapped,
            k,
        } in &layers
        {
            let x = Tensor::randn(0f32, 1.0, (1, args.prefill, *k), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(&device)?;
            let base_host = time_calls(&device, args.iters, || linear.forward(&x))?.host;
            let mut flip = 0;
            let t = time_calls(&device, args.iters, || {
                flip ^= 1;
                with_row_tags(Some(tag(flip)), || wrapped.forward(&x))
            })?;
            timed.push(Timed {
                module: format!(
                    "{module} (a prompt of {} tokens, another fine-tune each call)",
                    args.prefill
                ),
                base_host_us: Some(base_host),
                host_us: t.host,
                wall_us: t.wall,
                phases: t.phases,
            });
        }
    }

    let mut md = String::new();
    writeln!(
        md,
        "# `deltazip bench hook`: the multi-tenant hook's CPU cost per module call\n\n\
         - config `{}`, {} fine-tune names over {} delta files (loaded in {load_s:.1} s), {} decode rows, \
         layer {}, {} calls a module, {device:?}, {dtype:?}{}\n",
        args.config.display(),
        args.fine_tunes,
        deltas.len(),
        args.rows,
        args.layer,
        args.iters,
        if args.v4_kernels { ", v4 kernels" } else { "" }
    )?;
    if args.slot_tables {
        writeln!(
            md,
            "Rows marked \"slot tables\" run `dz_loader::set_slot_tables`'s path (a layer's deltas by \
             fine-tune slot, one segment table a pass); the others the per-layer plans. While timed: \
             {} segment tables and {} layer slot tables built.\n",
            slot_builds.map_or(0, |b| b.0),
            slot_builds.map_or(0, |b| b.1)
        )?;
    }
    writeln!(
        md,
        "| module | base host us | host us | delta host us | wall us |\n|---|---:|---:|---:|---:|"
    )?;
    let (mut sum_host, mut sum_delta) = (0.0, 0.0);
    for t in &timed {
        let delta = t.base_host_us.map(|b| t.host_us - b);
        if !t.module.contains("each call") && !t.module.ends_with("(one op)") {
            sum_host += t.host_us;
            sum_delta += delta.unwrap_or(t.host_us);
        }
        writeln!(
            md,
            "| {} | {} | {:.1} | {} | {:.1} |",
            t.module,
            t.base_host_us
                .map(|b| format!("{b:.1}"))
                .unwrap_or_default(),
            t.host_us,
            delta.map(|d| format!("{d:.1}")).unwrap_or_default(),
            t.wall_us
        )?;
    }
    writeln!(
        md,
        "\nPer decoder layer (7 linear layers, 2 norms): {sum_host:.0} us of CPU, of which the deltas' \
         {sum_delta:.0} us; x {} layers = {:.1} ms a decode step.",
        arch.num_layers,
        sum_delta * arch.num_layers as f64 / 1e3
    )?;
    if args.phases {
        dz_candle_ops::trace::set_enabled(false);
        write_phases(&mut md, &timed, args.iters)?;
    }
    Ok(md)
}

/// The `--phases` section: per timed row with phases, each phase's spans and microseconds per call
/// (phases nest: a phase's time includes the phases inside it).
fn write_phases(md: &mut String, timed: &[Timed], iters: usize) -> std::fmt::Result {
    writeln!(
        md,
        "\n## Where a call's CPU goes (`--phases`)\n\nPer timed iteration (one module call; for the \
         rows of a pass over the seven linear layers, one pass of seven calls): each named phase's spans \
         and time. Phases nest (\"the whole call\" includes the rest); \"host us\" above includes what \
         no phase names (candle's op dispatch, the output's reshape).\n"
    )?;
    let per = iters.max(1) as f64;
    for t in timed.iter().filter(|t| !t.phases.is_empty()) {
        writeln!(
            md,
            "### {} (host {:.1} us a call)\n\n| phase | spans an iteration | us an iteration |\n\
             |---|---:|---:|",
            t.module, t.host_us
        )?;
        for p in &t.phases {
            writeln!(
                md,
                "| {} | {:.2} | {:.1} |",
                p.name,
                p.calls as f64 / per,
                p.total.as_secs_f64() * 1e6 / per
            )?;
        }
        writeln!(md)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::deltas::{write_deltas, DeltasArgs, SynthCodec};
    use crate::synth::model::{write_model, ModelArgs, Preset};
    use crate::synth::Bar;

    /// A tiny synthetic base and two deltas on the CPU: every row of the report, the prompt rows too.
    #[test]
    fn reports_every_module_and_the_prompt_rows() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        write_model(
            &ModelArgs {
                shape: Preset::Tiny,
                layers: Some(1),
                hidden: Some(64),
                intermediate: Some(128),
                heads: Some(2),
                kv_heads: Some(1),
                vocab: None,
                dtype: dz_format::Dtype::F32,
                seed: 1,
                tokenizer: None,
                max_shard_bytes: dz_compress::hf::DEFAULT_MAX_SHARD_BYTES,
                out: base.clone(),
            },
            &Bar::quiet(),
        )
        .unwrap();
        let config = dir.path().join("serve.toml");
        write_deltas(
            &DeltasArgs {
                base,
                codec: SynthCodec::Q4S24,
                count: 2,
                seed: 7,
                scale: 0.05,
                out_dir: dir.path().join("d"),
                config: Some(config.clone()),
                device: "cpu".into(),
                jobs: 1,
            },
            &Bar::quiet(),
        )
        .unwrap();
        let md = run_hook(&BenchHookArgs {
            config,
            fine_tunes: 3,
            rows: 4,
            layer: 0,
            iters: 2,
            device: Some("cpu".into()),
            v4_kernels: false,
            slot_tables: true,
            prefill: 5,
            phases: true,
        })
        .unwrap();
        for module in [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ] {
            let prompt = format!("{module} (a prompt of 5 tokens, another fine-tune each call) |");
            let row = md
                .lines()
                .find(|l| l.contains(&prompt))
                .unwrap_or_else(|| panic!("no prompt row for {module}:\n{md}"));
            // base host us, host us, delta host us, wall us: all measured.
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            for cell in &cells[2..6] {
                let us: f64 = cell.parse().unwrap_or_else(|_| panic!("{row}"));
                assert!(us.is_finite(), "{row}");
            }
        }
        assert!(md.contains("slot tables"), "{md}");
        assert!(md.contains("Per decoder layer"), "{md}");
        // --phases: the plan-building row names the layer plan's build, once a call, with its time.
        let (_, section) = md
            .split_once("another batch each call: the layer's plan built) (host")
            .unwrap_or_else(|| panic!("no phases for the plan-building row:\n{md}"));
        let build = section
            .lines()
            .find(|l| l.starts_with("| layer plan: build |"))
            .unwrap_or_else(|| panic!("no layer plan build phase:\n{md}"));
        let cells: Vec<&str> = build.split('|').map(str::trim).collect();
        assert_eq!(cells[2], "1.00", "{build}");
        assert!(cells[3].parse::<f64>().unwrap() > 0.0, "{build}");
    }
}

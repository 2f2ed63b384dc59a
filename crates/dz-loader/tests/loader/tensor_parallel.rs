//! Tensor parallelism on the CPU: each rank's slice of a fine-tune's deltas (`HostDelta::upload_rank`)
//! computes exactly its part of the unsharded delta's output, the way the host combines ranks: the
//! column-parallel ranks' outputs side by side, the row-parallel ranks' partial products summed (the
//! host's all-reduce), replicated modules whole on every rank. The multi-GPU run itself needs NCCL and
//! GPUs (bench/gpu/tp_serve.sh); this is the data layout it relies on, and (simulated with threads) the
//! place of the delta in a row-parallel layer: before the all-reduce.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Barrier, Mutex};

use candle_core::{Device, Tensor};
use common::{max_diff, q, write_config};
use dz_candle_ops::delta_matmul;
use dz_compress::pipeline::{compress, CompressOptions, Method, Quiet};
use dz_compress::{QuantConfig, Sparsity};
use dz_format::shard::{tp_layer, TpLayer};
use dz_format::DeltaFile;
use dz_loader::{Config, DeltaRegistry, FineTuneDeltas, HostDelta, TpRank};
use mistralrs_quant::{
    with_row_tags, IsqType, QuantMethod, QuantMethodConfig, QuantizeOntoGuard, QuantizedSerde,
    RowTags, UnquantLinear,
};

/// Sharded and unsharded agree to f32 rounding of a differently ordered sum.
const TOL: f32 = 1e-5;

/// A 4-bit 2:4 delta with groups of 8, so that every split of the tiny models over 2 and 4 ranks lands
/// on a group boundary (the host's ranges: 64 / 4 = 16, 160 / 4 = 40 input features).
fn compress_4b24_g8(base: &Path, ft: &Path, out: &Path) -> PathBuf {
    let opts = CompressOptions {
        name: Some("ft-tp".into()),
        method: Method::Rtn,
        quant: QuantConfig {
            bits: 4,
            group_size: 8,
            symmetric: true,
            sparsity: Sparsity::TwoFour,
        },
        embed_bits: 8,
        ..CompressOptions::default()
    };
    compress(base, ft, out, &opts, &mut Quiet).expect("compress");
    out.to_path_buf()
}

fn scale(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Every module of `whole` against its slices on `world` ranks.
fn check_ranks(file: &DeltaFile, tied: bool, world: usize) -> usize {
    let host = HostDelta::read("ft-tp", file).unwrap();
    let whole = host.upload(&Device::Cpu, tied).unwrap();
    let ranks: Vec<FineTuneDeltas> = (0..world)
        .map(|rank| {
            host.upload_rank(&Device::Cpu, tied, TpRank { rank, world })
                .unwrap()
        })
        .collect();
    let arch = &file.manifest().architecture;
    let kv_heads = arch["num_key_value_heads"].as_u64().unwrap() as usize;
    let mut checked = 0;
    for module in whole.module_names() {
        if let Some(d) = whole.linear(module) {
            let (n, k) = d.dims();
            let x = Tensor::randn(0f32, 1.0, (3, k), &Device::Cpu).unwrap();
            let want = delta_matmul(&x, d).unwrap();
            let got = match tp_layer(&format!("{module}.weight")) {
                TpLayer::ColumnParallel => {
                    let outs: Vec<Tensor> = ranks
                        .iter()
                        .map(|r| delta_matmul(&x, r.linear(module).unwrap()).unwrap())
                        .collect();
                    let is_kv = module.contains("k_proj") || module.contains("v_proj");
                    if is_kv && world > kv_heads {
                        // One KV head per rank, `world / kv_heads` ranks per head: the first rank of
                        // each head's group.
                        let step = world / kv_heads;
                        let heads: Vec<Tensor> = outs.iter().step_by(step).cloned().collect();
                        for (r, o) in outs.iter().enumerate() {
                            assert!(max_diff(o, &outs[r - r % step]) == 0.0, "{module} rank {r}");
                        }
                        Tensor::cat(&heads, 1).unwrap()
                    } else {
                        Tensor::cat(&outs, 1).unwrap()
                    }
                }
                TpLayer::RowParallel => {
                    let cols = k / world;
                    let mut sum =
                        Tensor::zeros((3, n), candle_core::DType::F32, &Device::Cpu).unwrap();
                    for (r, rank) in ranks.iter().enumerate() {
                        let xr = x.narrow(1, r * cols, cols).unwrap().contiguous().unwrap();
                        let shard = rank.linear(module).unwrap();
                        assert_eq!(shard.dims(), (n, cols), "{module} rank {r}");
                        sum = (sum + delta_matmul(&xr, shard).unwrap()).unwrap();
                    }
                    sum
                }
                TpLayer::Replicated => {
                    for (r, rank) in ranks.iter().enumerate() {
                        let o = delta_matmul(&x, rank.linear(module).unwrap()).unwrap();
                        assert!(max_diff(&o, &want) == 0.0, "{module} rank {r}");
                    }
                    want.clone()
                }
            };
            assert_eq!(got.dims(), want.dims(), "{module}");
            let diff = max_diff(&got, &want);
            assert!(
                diff <= TOL * scale(&want).max(1.0),
                "{module} over {world} ranks: {diff}"
            );
            checked += 1;
        }
        if let Some(b) = whole.bias(module) {
            let parts: Vec<Tensor> = ranks
                .iter()
                .filter_map(|r| r.bias(module).cloned())
                .collect();
            match tp_layer(&format!("{module}.bias")) {
                TpLayer::ColumnParallel
                    if !((module.contains("k_proj") || module.contains("v_proj"))
                        && world > kv_heads) =>
                {
                    let got = Tensor::cat(&parts, 0).unwrap();
                    assert!(max_diff(&got, b) == 0.0, "bias {module}");
                }
                TpLayer::RowParallel => {
                    // Added once, by rank 0, before the ranks' outputs are summed.
                    assert_eq!(parts.len(), 1, "bias {module}");
                    assert!(ranks[0].bias(module).is_some());
                }
                _ => {}
            }
            checked += 1;
        }
        if let Some(g) = whole.norm(module) {
            for r in &ranks {
                assert!(max_diff(r.norm(module).unwrap(), g) == 0.0, "norm {module}");
            }
            checked += 1;
        }
        if let Some(e) = whole.embedding(module) {
            for r in &ranks {
                assert_eq!(r.embedding(module).unwrap().dims(), e.dims());
            }
            checked += 1;
        }
    }
    // Each rank holds less than the whole: the sharded layers' bytes are split.
    for r in &ranks {
        assert!(
            r.bytes() < whole.bytes(),
            "{} vs {}",
            r.bytes(),
            whole.bytes()
        );
    }
    checked
}

#[test]
fn rank_slices_compose_to_the_whole_delta() {
    for (fixture, tied) in [(common::llama(), false), (common::qwen2(), true)] {
        let out = fixture.root.join("ft-0-tp-4b24g8.dz");
        if !out.exists() {
            compress_4b24_g8(&fixture.family.base, &fixture.family.finetunes[0], &out);
        }
        let file = DeltaFile::open(&out).unwrap();
        for world in [2, 4] {
            let n = check_ranks(&file, tied, world);
            // 2 layers x (q, k, v, o, gate, up, down) at least, plus head, norms, embedding.
            assert!(n >= 14, "{n} modules checked");
        }
    }
}

#[test]
fn config_refuses_unshardable_deltas_and_cpu_tensor_parallel() {
    let f = common::llama();
    // 8-bit groups of 32: down_proj's 160 input features split over 2 ranks at 80, inside a group.
    let text = format!(
        "[base]\npath = {}\n[[delta]]\nname = \"ft-0\"\npath = {}\n[runtime]\ndevice = \"cuda\"\n\
         tensor_parallel = 2\n",
        q(&f.family.base),
        q(&f.deltas8[0])
    );
    let (_dir, file) = write_config(&text);
    let err = Config::load(&file).err().expect("refused").to_string();
    assert!(err.contains("delta[0].path"), "{err}");
    assert!(err.contains("cannot be split over 2 GPUs"), "{err}");
    assert!(err.contains("down_proj"), "{err}");

    let text = format!(
        "[base]\npath = {}\n[runtime]\ndevice = \"cpu\"\ntensor_parallel = 2\n",
        q(&f.family.base)
    );
    let (_dir, file) = write_config(&text);
    let err = Config::load(&file).err().expect("refused").to_string();
    assert!(err.contains("runtime.tensor_parallel"), "{err}");
    assert!(err.contains("needs device = \"cuda\""), "{err}");

    // 3 ranks do not divide the base's 4 heads.
    let text = format!(
        "[base]\npath = {}\n[[delta]]\nname = \"ft-0\"\npath = {}\n[runtime]\ndevice = \"cuda\"\n\
         tensor_parallel = 3\n",
        q(&f.family.base),
        q(&f.deltas8[0])
    );
    let (_dir, file) = write_config(&text);
    let err = Config::load(&file).err().expect("refused").to_string();
    assert!(err.contains("does not divide over 3 GPUs"), "{err}");
}

/// NCCL's sum all-reduce over `world` threads (each rank's thread calls `sum` once per forward).
#[derive(Debug)]
struct SimAllReduce {
    world: usize,
    slots: Mutex<Vec<Option<Tensor>>>,
    barrier: Barrier,
}

impl SimAllReduce {
    fn new(world: usize) -> Arc<Self> {
        Arc::new(Self {
            world,
            slots: Mutex::new(vec![None; world]),
            barrier: Barrier::new(world),
        })
    }

    fn sum(&self, rank: usize, t: &Tensor) -> candle_core::Result<Tensor> {
        self.slots.lock().unwrap()[rank] = Some(t.clone());
        self.barrier.wait();
        let sum = {
            let slots = self.slots.lock().unwrap();
            let mut acc = slots[0].clone().expect("rank 0's part");
            for part in slots.iter().take(self.world).skip(1) {
                acc = (acc + part.as_ref().expect("every rank's part"))?;
            }
            acc
        };
        self.barrier.wait();
        Ok(sum)
    }
}

/// The host's `RowParallelLayer::forward` (mistralrs-quant `distributed/layers.rs`): the inner weight's
/// partial product of the rank's input slice, then the sum over the ranks.
#[derive(Debug)]
struct SimRowParallel {
    weight: Arc<dyn QuantMethod>,
    rank: usize,
    all_reduce: Arc<SimAllReduce>,
}

impl QuantizedSerde for SimRowParallel {
    fn name(&self) -> &'static str {
        "sim-row-parallel"
    }
}

impl QuantMethod for SimRowParallel {
    fn new(_method: QuantMethodConfig) -> candle_core::Result<Self> {
        candle_core::bail!("built by the test")
    }
    fn dequantize_w(&self) -> candle_core::Result<Tensor> {
        self.weight.dequantize_w()
    }
    fn forward(&self, a: &Tensor) -> candle_core::Result<Tensor> {
        let partial = self.weight.forward(a)?;
        self.all_reduce.sum(self.rank, &partial.contiguous()?)
    }
    fn quantized_act_type(&self) -> Option<candle_core::DType> {
        None
    }
    fn dtype_and_device(&self) -> (candle_core::DType, Device) {
        self.weight.dtype_and_device()
    }
    fn add_delta_w(&self, _delta: &Tensor) -> candle_core::Result<Arc<dyn QuantMethod>> {
        candle_core::bail!("not used")
    }
    fn apply_isq(
        self: Arc<Self>,
        _dtype: Option<IsqType>,
        _device: Device,
        _n_quantized: &AtomicUsize,
        _imatrix_weight: Option<Vec<f32>>,
        _guard: QuantizeOntoGuard,
    ) -> candle_core::Result<Arc<dyn QuantMethod>> {
        candle_core::bail!("not used")
    }
}

fn unquant(w: Tensor) -> Arc<dyn QuantMethod> {
    Arc::new(
        <UnquantLinear as QuantMethod>::new(QuantMethodConfig::Unquantized(
            candle_nn::Linear::new(w, None),
        ))
        .expect("an unquantized layer"),
    )
}

/// Where the delta hook wraps a row-parallel layer.
#[derive(Clone, Copy, PartialEq)]
enum Seam {
    /// The inner weight, before the all-reduce (host patch 0002 since session 10).
    InnerWeight,
    /// The finished layer, after the all-reduce (patch 0002 before session 10).
    WholeLayer,
}

/// Each rank's output of row-parallel `module` (a random base weight plus the fine-tune's delta, one
/// sequence of 3 rows tagged with it) over `world` simulated ranks, with the hook at `seam`; and the
/// unsharded layer's output.
fn row_parallel(host: &HostDelta, module: &str, world: usize, seam: Seam) -> (Tensor, Vec<Tensor>) {
    let whole = Arc::new(host.upload(&Device::Cpu, false).unwrap());
    let (n, k) = whole.linear(module).expect("a linear delta").dims();
    let w = Tensor::randn(0f32, 0.1, (n, k), &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 3, k), &Device::Cpu).unwrap();
    let tags: RowTags = Arc::from(vec![Some(Arc::<str>::from("ft-tp"))]);
    let registry = Arc::new(DeltaRegistry::new());
    registry.insert(whole);
    let layer = registry.wrap_layer(module, unquant(w.clone()));
    let want = with_row_tags(Some(tags.clone()), || layer.forward(&x)).unwrap();

    let cols = k / world;
    let all_reduce = SimAllReduce::new(world);
    let got = std::thread::scope(|s| {
        let ranks: Vec<_> = (0..world)
            .map(|rank| {
                let (all_reduce, tags, w, x) = (all_reduce.clone(), tags.clone(), &w, &x);
                s.spawn(move || {
                    let registry = Arc::new(DeltaRegistry::new());
                    let slice = host.upload_rank(&Device::Cpu, false, TpRank { rank, world });
                    registry.insert(Arc::new(slice.unwrap()));
                    let w_rank = w
                        .narrow(1, rank * cols, cols)
                        .unwrap()
                        .contiguous()
                        .unwrap();
                    let layer: Arc<dyn QuantMethod> = match seam {
                        Seam::InnerWeight => Arc::new(SimRowParallel {
                            weight: registry.wrap_layer(module, unquant(w_rank)),
                            rank,
                            all_reduce,
                        }),
                        Seam::WholeLayer => registry.wrap_layer(
                            module,
                            Arc::new(SimRowParallel {
                                weight: unquant(w_rank),
                                rank,
                                all_reduce,
                            }),
                        ),
                    };
                    let x_rank = x
                        .narrow(2, rank * cols, cols)
                        .unwrap()
                        .contiguous()
                        .unwrap();
                    with_row_tags(Some(tags), || layer.forward(&x_rank)).unwrap()
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    (want, got)
}

/// Session 10's two-H200 finding, on the CPU: with the delta hook on the row-parallel layer's inner
/// weight every rank computes the unsharded output; on the finished layer (after the all-reduce) each
/// rank adds only its own slice of the delta's product, never summed (TP2 fine-tunes' log-probs were
/// 0.16-0.50 off TP1's in f32, the base exact). The second half is the control: the check can see that.
#[test]
fn row_parallel_deltas_go_in_before_the_all_reduce() {
    let fixture = common::llama();
    let out = fixture.root.join("ft-0-tp-4b24g8.dz");
    if !out.exists() {
        compress_4b24_g8(&fixture.family.base, &fixture.family.finetunes[0], &out);
    }
    let file = DeltaFile::open(&out).unwrap();
    let host = HostDelta::read("ft-tp", &file).unwrap();
    for module in [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ] {
        let (want, got) = row_parallel(&host, module, 2, Seam::InnerWeight);
        for (rank, g) in got.iter().enumerate() {
            let d = max_diff(g, &want);
            assert!(
                d <= TOL * scale(&want).max(1.0),
                "{module} rank {rank}: {d:e} from the unsharded layer"
            );
        }
        let (want, got) = row_parallel(&host, module, 2, Seam::WholeLayer);
        for (rank, g) in got.iter().enumerate() {
            let d = max_diff(g, &want);
            assert!(
                d > 100.0 * TOL * scale(&want).max(1.0),
                "{module} rank {rank}: the hook after the all-reduce should miss the other rank's \
                 part of the delta, but is {d:e} from the unsharded layer"
            );
        }
    }
}

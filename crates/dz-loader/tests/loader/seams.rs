//! The host seams, end to end through the engine: a linear-layer hook sees every projection as it is
//! built (seam 4), and a request sent to an alias of the model reaches those layers as the row tag of its
//! batch row (seams 1-3). Without a hook or tags, generation is exactly the unhooked host's.

use crate::common;

use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};
use dz_loader::{host, DtypeSpec, Engine};
use mistralrs_quant::{
    current_row_tags, with_linear_hook, IsqType, LinearHook, QuantMethod, QuantMethodConfig,
    QuantizeOntoGuard, QuantizedSerde,
};

type Seen = Arc<Mutex<Vec<Vec<Option<String>>>>>;

/// Wraps each layer in a [`Spy`] and remembers its name, and the type of what it was given (the first word
/// of its `Debug`).
struct SpyHook {
    names: Arc<Mutex<Vec<String>>>,
    given: Arc<Mutex<Vec<(String, String)>>>,
    seen: Seen,
}

impl LinearHook for SpyHook {
    fn wrap(&self, name: &str, layer: Arc<dyn QuantMethod>) -> Result<Arc<dyn QuantMethod>> {
        self.names.lock().unwrap().push(name.to_string());
        let debug = format!("{layer:?}");
        let kind = debug
            .split(|c: char| !c.is_alphanumeric())
            .next()
            .unwrap_or_default()
            .to_string();
        self.given.lock().unwrap().push((name.to_string(), kind));
        Ok(Arc::new(Spy {
            inner: layer,
            seen: self.seen.clone(),
        }))
    }
}

/// Passes everything through; records the row tags its forward pass sees.
struct Spy {
    inner: Arc<dyn QuantMethod>,
    seen: Seen,
}

impl fmt::Debug for Spy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Spy")
    }
}

impl QuantizedSerde for Spy {
    fn name(&self) -> &'static str {
        "spy"
    }
}

impl QuantMethod for Spy {
    fn new(_: QuantMethodConfig) -> Result<Self> {
        candle_core::bail!("not from a config")
    }
    fn dequantize_w(&self) -> Result<Tensor> {
        self.inner.dequantize_w()
    }
    fn forward(&self, a: &Tensor) -> Result<Tensor> {
        if let Some(tags) = current_row_tags() {
            let tags = tags
                .iter()
                .map(|t| t.as_deref().map(str::to_string))
                .collect();
            self.seen.lock().unwrap().push(tags);
        }
        self.inner.forward(a)
    }
    fn quantized_act_type(&self) -> Option<DType> {
        self.inner.quantized_act_type()
    }
    fn dtype_and_device(&self) -> (DType, Device) {
        self.inner.dtype_and_device()
    }
    fn add_delta_w(&self, delta: &Tensor) -> Result<Arc<dyn QuantMethod>> {
        self.inner.add_delta_w(delta)
    }
    fn apply_isq(
        self: Arc<Self>,
        _: Option<IsqType>,
        _: Device,
        _: &AtomicUsize,
        _: Option<Vec<f32>>,
        _: QuantizeOntoGuard,
    ) -> Result<Arc<dyn QuantMethod>> {
        candle_core::bail!("no isq")
    }
}

#[test]
fn hook_sees_every_projection_and_rows_carry_the_requested_name() {
    let f = common::llama();
    let names = Arc::new(Mutex::new(Vec::new()));
    let given = Arc::new(Mutex::new(Vec::new()));
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let hook = Arc::new(SpyHook {
        names: names.clone(),
        given: given.clone(),
        seen: seen.clone(),
    });
    let spied = with_linear_hook(hook, || {
        host::load_pipeline(
            &f.family.base,
            &f.family.base,
            DtypeSpec::F32,
            &Device::Cpu,
            host::KvCache::Contiguous,
        )
    })
    .unwrap();
    let plain = common::load_plain(&f.family.base, &f.family.base);

    // Seam 4: every projection of both layers and the (untied) lm_head went through the hook.
    let mut got = names.lock().unwrap().clone();
    got.sort();
    let mut want = vec!["lm_head".to_string()];
    for i in 0..2 {
        for p in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
        ] {
            want.push(format!("model.layers.{i}.{p}"));
        }
        for p in ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
            want.push(format!("model.layers.{i}.{p}"));
        }
    }
    want.sort();
    assert_eq!(got, want);
    // A row-parallel layer (o_proj, down_proj) hands the hook its inner weight, not itself: a wrapper's
    // partial product must join the base's before the layer's all-reduce (session 10: after it, each
    // tensor-parallel rank added only its own slice of the delta).
    for (name, kind) in given.lock().unwrap().iter() {
        if name.ends_with("o_proj") || name.ends_with("down_proj") {
            assert_ne!(
                kind, "RowParallelLayer",
                "{name}: the hook got the whole layer"
            );
            assert_eq!(kind, "UnquantLinear", "{name}: the hook got {kind}");
        }
    }

    let mut engine = Engine::new(4).unwrap();
    engine.add("spied", spied).unwrap();
    engine.add("plain", plain).unwrap();
    engine.add_alias("some-fine-tune", "spied").unwrap();

    // Seams 1-3: the alias a request was sent to is its row's tag inside every layer.
    let by_alias = engine.generate("some-fine-tune", "Hello", 4).unwrap();
    {
        let seen = seen.lock().unwrap();
        assert!(!seen.is_empty(), "no layer saw row tags");
        for tags in seen.iter() {
            assert_eq!(tags, &[Some("some-fine-tune".to_string())]);
        }
    }
    // A request for the model's own name carries that name.
    seen.lock().unwrap().clear();
    let by_name = engine.generate("spied", "Hello", 4).unwrap();
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .all(|t| t == &[Some("spied".to_string())]));

    // No-op: wrapped layers that ignore the tags generate exactly what the plain host does.
    let plain_out = engine.generate("plain", "Hello", 4).unwrap();
    assert_eq!(by_alias, plain_out);
    assert_eq!(by_name, plain_out);
}

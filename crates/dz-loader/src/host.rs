//! The host (mistral.rs) side: a local HF directory into a pipeline, pipelines into one engine per model,
//! and greedy generation through the engine. Every mistral.rs API this crate relies on is called here
//! (ARCHITECTURE.md lists them).
//!
//! `host/unpatched-check/src/main.rs` makes the same calls on the unpatched host, for the test that ours
//! answers like it: keep the two in step.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use mistralrs_core::{
    AdapterPaths, AddModelConfig, AutoDeviceMapParams, Constraint, DefaultSchedulerMethod,
    DeviceMapSetting, EngineConfig, LoaderBuilder, LocalModelPaths, MemoryGpuConfig, MistralRs,
    MistralRsBuilder, ModelDType, ModelLoaderConfig, ModelPaths, ModelSelected,
    NormalLoaderBuilder, NormalRequest, NormalSpecificConfig, PagedAttentionConfig, PagedCacheType,
    Pipeline, Request, RequestMessage, Response, SamplingParams, SchedulerConfig, TokenSource,
};
use tokio::sync::Mutex;

use crate::config::DtypeSpec;
use crate::engines::EngineSwap;
use crate::error::{Error, Result};

/// A pipeline as the host hands it around.
pub type SharedPipeline = Arc<Mutex<dyn Pipeline>>;

fn host<E: std::fmt::Display>(e: E) -> Error {
    Error::Host(e.to_string())
}

/// The host's dtype for ours.
pub fn model_dtype(d: DtypeSpec) -> ModelDType {
    match d {
        DtypeSpec::Auto => ModelDType::Auto,
        DtypeSpec::F32 => ModelDType::F32,
        DtypeSpec::F16 => ModelDType::F16,
        DtypeSpec::Bf16 => ModelDType::BF16,
    }
}

/// The files of a local HF directory, as the host's `ModelPaths` (no hub access: every path is given):
/// weights and `config.json` from `dir`, the tokenizer and the chat template and generation config
/// (where present) from `aux` (the base's directory: a merged fine-tune shares them).
pub fn local_paths(dir: &Path, aux: &Path) -> Result<LocalModelPaths<PathBuf>> {
    let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    weights.sort();
    if weights.is_empty() {
        return Err(Error::Host(format!(
            "{}: no *.safetensors files",
            dir.display()
        )));
    }
    let opt = |name: &str| Some(aux.join(name)).filter(|p| p.is_file());
    Ok(LocalModelPaths {
        tokenizer_filename: aux.join("tokenizer.json"),
        config_filename: dir.join("config.json"),
        template_filename: opt("tokenizer_config.json"),
        filenames: weights,
        adapter_paths: AdapterPaths::None,
        gen_conf: opt("generation_config.json"),
        preprocessor_config: None,
        processor_config: None,
        chat_template_json_filename: opt("chat_template.jinja"),
    })
}

/// How a loaded model keeps its KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCache {
    /// One growing cache per sequence (the host's default scheduler: it batches only sequences of
    /// equal length).
    Contiguous,
    /// The host's PagedAttention: a pool of this many bytes on the model's device, allocated at load
    /// (CUDA builds only); the engine then uses the host's PagedAttention scheduler.
    Paged {
        /// The pool's size.
        bytes: u64,
    },
}

impl KvCache {
    fn host_config(self) -> Result<Option<PagedAttentionConfig>> {
        match self {
            Self::Contiguous => Ok(None),
            Self::Paged { bytes } => {
                let mb = usize::try_from(bytes.div_ceil(1 << 20)).unwrap_or(usize::MAX);
                PagedAttentionConfig::new(None, MemoryGpuConfig::MbAmount(mb), PagedCacheType::Auto)
                    .map(Some)
                    .map_err(host)
            }
        }
    }
}

/// Loads a local HF directory through the host's normal (unquantized) loader, the architecture chosen
/// by the host from `config.json`'s `architectures` (`aux`: see [`local_paths`]).
pub fn load_pipeline(
    dir: &Path,
    aux: &Path,
    dtype: DtypeSpec,
    device: &Device,
    kv_cache: KvCache,
) -> Result<SharedPipeline> {
    let model_id = dir.to_string_lossy().into_owned();
    let loader = NormalLoaderBuilder::new(
        NormalSpecificConfig::default(),
        None,
        None,
        Some(model_id),
        false,
        None,
    )
    .build(None)
    .map_err(host)?;
    let paths: Box<dyn ModelPaths> = Box::new(local_paths(dir, aux)?);
    let pipeline = loader
        .load_model_from_path(
            &paths,
            &model_dtype(dtype),
            device,
            true,
            DeviceMapSetting::dummy(),
            None,
            kv_cache.host_config()?,
        )
        .map_err(host)?;
    Ok(pipeline)
}

/// The files besides the weights and `config.json` that [`local_paths`] takes from `aux`.
const AUX_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// What the host needs to load a local HF directory by itself, and to load it again after
/// `MistralRs::unload_model` (its `reload_model` rebuilds the pipeline from this): a plain model through
/// the host's own `LoaderBuilder` and `load_model_from_hf`, which for a local directory lists and reads
/// its files and never reaches the hub. That path reads the tokenizer, generation config and chat
/// template from `dir` itself, so the ones [`local_paths`] would take from `aux` (the base's) are
/// copied into `dir` where it lacks them (a merged fine-tune has only its tokenizer): loaded either
/// way, the model is the same.
pub fn reloadable_config(
    dir: &Path,
    aux: &Path,
    dtype: DtypeSpec,
    device: &Device,
    kv_cache: KvCache,
) -> Result<ModelLoaderConfig> {
    for name in AUX_FILES {
        let (from, to) = (aux.join(name), dir.join(name));
        if from.is_file() && !to.exists() {
            let tmp = dir.join(format!(".{name}.tmp"));
            let io = |path: &Path| {
                let path = path.to_path_buf();
                move |source| Error::Io { path, source }
            };
            std::fs::copy(&from, &tmp).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &to).map_err(io(&to))?;
        }
    }
    let path = |p: &Path| p.to_string_lossy().into_owned();
    Ok(ModelLoaderConfig {
        model_selected: ModelSelected::Plain {
            model_id: path(dir),
            tokenizer_json: Some(path(&dir.join("tokenizer.json")))
                .filter(|_| dir.join("tokenizer.json").is_file()),
            arch: None,
            dtype: model_dtype(dtype),
            topology: None,
            organization: None,
            write_uqff: None,
            from_uqff: None,
            imatrix: None,
            calibration_file: None,
            max_seq_len: AutoDeviceMapParams::DEFAULT_MAX_SEQ_LEN,
            max_batch_size: AutoDeviceMapParams::DEFAULT_MAX_BATCH_SIZE,
            hf_cache_path: None,
            matformer_config_path: None,
            matformer_slice_name: None,
        },
        token_source: TokenSource::None,
        hf_revision: None,
        dtype: model_dtype(dtype),
        device: device.clone(),
        device_map_setting: DeviceMapSetting::dummy(),
        isq: None,
        paged_attn_config: kv_cache.host_config()?,
        silent: true,
        chat_template: None,
        jinja_explicit: None,
    })
}

/// Loads a pipeline the way the host's `reload_model` does from `config` (so a model's first load and
/// every reload after an unload are the same code).
pub fn load_reloadable(config: &ModelLoaderConfig) -> Result<SharedPipeline> {
    let loader = LoaderBuilder::new(config.model_selected.clone())
        .with_chat_template(config.chat_template.clone())
        .with_jinja_explicit(config.jinja_explicit.clone())
        .build()
        .map_err(host)?;
    let pipeline = loader
        .load_model_from_hf(
            config.hf_revision.clone(),
            config.token_source.clone(),
            &config.dtype,
            &config.device,
            config.silent,
            config.device_map_setting.clone(),
            config.isq,
            config.paged_attn_config,
        )
        .map_err(host)?;
    Ok(pipeline)
}

/// The device a loaded pipeline runs on (under tensor parallelism, the host's device for this rank).
pub fn pipeline_device(pipeline: &SharedPipeline) -> Result<Device> {
    let p = pipeline
        .try_lock()
        .map_err(|_| Error::Host("the pipeline is in use (asked for its device)".into()))?;
    Ok(p.device())
}

/// How many sequences one engine batches.
pub const DEFAULT_MAX_SEQS: usize = 32;

/// Several models, one host engine each, reachable by name (the host's `MistralRs`), and a runtime to
/// drive them from synchronous code.
pub struct Engine {
    runtime: tokio::runtime::Runtime,
    mistralrs: Option<Arc<MistralRs>>,
    max_seqs: NonZeroUsize,
    no_kv_cache: bool,
    /// The cap on loaded merged engines, when there is one: requests for the models it manages wait
    /// for theirs to be loaded and keep it loaded until answered.
    swap: Option<Arc<EngineSwap>>,
}

/// One completion: the generated text and its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated text (prompt excluded).
    pub text: String,
    /// Each generated token.
    pub tokens: Vec<GeneratedToken>,
}

/// One generated token, with the model's [`TOP_LOGPROBS`] most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    /// The token as the tokenizer spells it.
    pub text: String,
    /// Its score as the host reports it (under argmax decoding, mistral.rs 0.8.1 reports `log10` of the
    /// raw logit, not a log-probability).
    pub logprob: f32,
    /// The most likely tokens at this position, `(id, score)`, most likely first (greedy decoding picked
    /// the first).
    pub top: Vec<(u32, f32)>,
}

/// How many of the most likely tokens [`Engine::generate`] reports per position.
pub const TOP_LOGPROBS: usize = 3;

impl Generation {
    /// The tokens' spellings.
    pub fn token_strings(&self) -> Vec<&str> {
        self.tokens.iter().map(|t| t.text.as_str()).collect()
    }

    /// The generated token ids (each position's most likely token).
    pub fn token_ids(&self) -> Vec<Option<u32>> {
        self.tokens
            .iter()
            .map(|t| t.top.first().map(|&(id, _)| id))
            .collect()
    }
}

impl Engine {
    /// An engine with no models yet; each model batches up to `max_seqs` sequences.
    pub fn new(max_seqs: usize) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::Io {
                path: PathBuf::from("<tokio runtime>"),
                source,
            })?;
        Ok(Self {
            runtime,
            mistralrs: None,
            max_seqs: NonZeroUsize::new(max_seqs).unwrap_or(NonZeroUsize::MIN),
            no_kv_cache: false,
            swap: None,
        })
    }

    /// Models added from now on recompute the whole sequence at every step instead of keeping a KV cache
    /// (slow; for checking the cached path against the uncached one).
    pub fn set_no_kv_cache(&mut self, no_kv_cache: bool) {
        self.no_kv_cache = no_kv_cache;
    }

    /// The host's PagedAttention scheduler for a pipeline loaded with [`KvCache::Paged`], its default
    /// scheduler otherwise.
    fn scheduler(&self, pipeline: &SharedPipeline) -> SchedulerConfig {
        let cache = self
            .runtime
            .block_on(pipeline.lock())
            .get_metadata()
            .cache_config
            .clone();
        match cache {
            Some(config) => SchedulerConfig::PagedAttentionMeta {
                max_num_seqs: self.max_seqs.get(),
                config,
            },
            None => SchedulerConfig::DefaultScheduler {
                method: DefaultSchedulerMethod::Fixed(self.max_seqs),
            },
        }
    }

    /// Adds a model under `name` (the name requests use). The prefix cache is off: one engine per model
    /// keeps KV per model, and generation is compared bit for bit in tests.
    pub fn add(&mut self, name: &str, pipeline: SharedPipeline) -> Result<()> {
        self.add_with(name, pipeline, None)
    }

    /// [`Engine::add`] of a model the host can unload and reload by itself (`loader`: see
    /// [`reloadable_config`]; `pipeline` loaded from it by [`load_reloadable`]).
    pub fn add_reloadable(
        &mut self,
        name: &str,
        pipeline: SharedPipeline,
        loader: ModelLoaderConfig,
    ) -> Result<()> {
        self.add_with(name, pipeline, Some(loader))
    }

    /// Registers model `name` with the host as unloaded: `reload_model` loads it from `loader` when it
    /// is wanted. The host has no call for that, so this adds an engine over `placeholder` (any loaded
    /// pipeline of the same architecture that no engine runs yet: an engine takes its pipeline's lock
    /// as it starts), unloads it at once and waits for that engine's thread to exit. Start-up thus
    /// loads only the models that start loaded.
    pub fn add_unloaded(
        &mut self,
        name: &str,
        placeholder: &SharedPipeline,
        loader: ModelLoaderConfig,
    ) -> Result<()> {
        self.add_with(name, placeholder.clone(), Some(loader))?;
        self.host_handle(name)?
            .unload_model_and_wait(name)
            .map_err(host)
    }

    fn add_with(
        &mut self,
        name: &str,
        pipeline: SharedPipeline,
        loader: Option<ModelLoaderConfig>,
    ) -> Result<()> {
        let scheduler = self.scheduler(&pipeline);
        match &self.mistralrs {
            None => {
                let mut builder = MistralRsBuilder::new(pipeline, scheduler, false, None)
                    .with_model_id(name)
                    .with_no_prefix_cache(true)
                    .with_no_kv_cache(self.no_kv_cache);
                if let Some(loader) = loader {
                    builder = builder.with_loader_config(loader);
                }
                self.mistralrs = Some(self.runtime.block_on(builder.build()));
                Ok(())
            }
            Some(m) => {
                let mut config = AddModelConfig::new(EngineConfig {
                    no_prefix_cache: true,
                    no_kv_cache: self.no_kv_cache,
                    throughput_logging_enabled: false,
                    ..EngineConfig::default()
                });
                if let Some(loader) = loader {
                    config = config.with_loader_config(loader);
                }
                self.runtime
                    .block_on(m.add_model(name.to_string(), pipeline, scheduler, config))
                    .map_err(Error::Host)
            }
        }
    }

    fn host_handle(&self, name: &str) -> Result<&Arc<MistralRs>> {
        self.mistralrs
            .as_ref()
            .ok_or_else(|| Error::Host(format!("no model {name:?}: the engine is empty")))
    }

    /// Requests for the models `swap` manages wait for their engine and hold it while they run.
    pub fn set_engine_swap(&mut self, swap: Arc<EngineSwap>) {
        self.swap = Some(swap);
    }

    /// Whether model `name`'s engine is loaded and unloaded on demand (under `merged_gpu_models`).
    fn swapped(&self, name: &str) -> Option<&Arc<EngineSwap>> {
        self.swap.as_ref().filter(|s| s.manages(name))
    }

    /// Makes `alias` another name of model `model`: requests for it run on `model`'s engine, and the
    /// patched host tags their batch rows with `alias` (multi-tenant mode's fine-tune names).
    pub fn add_alias(&self, alias: &str, model: &str) -> Result<()> {
        let m = self
            .mistralrs
            .as_ref()
            .ok_or_else(|| Error::Host(format!("no model {model:?}: the engine is empty")))?;
        m.register_model_alias(alias, model).map_err(host)
    }

    /// The host's `MistralRs` (for its OpenAI router), once a model was added.
    pub fn mistralrs(&self) -> Option<Arc<MistralRs>> {
        self.mistralrs.clone()
    }

    /// The names of the models the engine serves.
    pub fn models(&self) -> Result<Vec<String>> {
        match &self.mistralrs {
            None => Ok(Vec::new()),
            Some(m) => m.list_models().map_err(Error::Host),
        }
    }

    /// Sends one greedy request for model `name`; its response arrives on the returned channel.
    fn send(
        &self,
        name: &str,
        messages: RequestMessage,
        max_tokens: usize,
        raw_logits: bool,
    ) -> Result<tokio::sync::mpsc::Receiver<Response>> {
        let m = self
            .mistralrs
            .as_ref()
            .ok_or_else(|| Error::Host(format!("no model {name:?}: the engine is empty")))?;
        let sender = m.get_sender(Some(name)).map_err(host)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // Greedy decoding is top-k 1 (`neutral()` did not pick the top logit in our tests; ARCHITECTURE.md).
        let mut sampling = SamplingParams::deterministic();
        sampling.max_len = Some(max_tokens);
        sampling.top_n_logprobs = TOP_LOGPROBS;
        let request = NormalRequest {
            messages,
            sampling_params: sampling,
            response: tx,
            return_logprobs: !raw_logits,
            is_streaming: false,
            id: m.next_request_id(),
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: None,
            return_raw_logits: raw_logits,
            web_search_options: None,
            model_id: Some(name.to_string()),
            truncate_sequence: false,
        };
        self.runtime.block_on(async {
            sender
                .send(Request::Normal(Box::new(request)))
                .await
                .map_err(host)
        })?;
        Ok(rx)
    }

    /// The final response on `rx` (errors as [`Error::Host`]).
    fn receive(&self, mut rx: tokio::sync::mpsc::Receiver<Response>) -> Result<Response> {
        self.runtime.block_on(async {
            match rx.recv().await {
                Some(Response::CompletionModelError(e, _)) => Err(Error::Host(e)),
                Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
                    Err(host(e))
                }
                Some(r) => Ok(r),
                None => Err(Error::Host("the engine dropped the request".to_string())),
            }
        })
    }

    fn request(
        &self,
        name: &str,
        messages: RequestMessage,
        max_tokens: usize,
        raw_logits: bool,
    ) -> Result<Response> {
        // A model whose engine may be unloaded: wait for it to be loaded, and keep it until answered.
        let _lease = match self.swapped(name) {
            Some(s) => Some(self.runtime.block_on(s.acquire(name))?),
            None => None,
        };
        let rx = self.send(name, messages, max_tokens, raw_logits)?;
        self.receive(rx)
    }

    fn completion(response: Response) -> Result<Generation> {
        let Response::CompletionDone(r) = response else {
            return Err(Error::Host("unexpected response kind".to_string()));
        };
        let choice = r
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| Error::Host("a completion with no choices".to_string()))?;
        let tokens = choice
            .logprobs
            .and_then(|l| l.content)
            .unwrap_or_default()
            .into_iter()
            .map(|l| GeneratedToken {
                text: l.token,
                logprob: l.logprob,
                top: l
                    .top_logprobs
                    .iter()
                    .map(|t| (t.token, t.logprob))
                    .collect(),
            })
            .collect();
        Ok(Generation {
            text: choice.text,
            tokens,
        })
    }

    /// Greedy completion of `prompt` by model `name`, at most `max_tokens` new tokens (stops at EOS).
    pub fn generate(&self, name: &str, prompt: &str, max_tokens: usize) -> Result<Generation> {
        let messages = RequestMessage::Completion {
            text: prompt.to_string(),
            echo_prompt: false,
            best_of: None,
        };
        Self::completion(self.request(name, messages, max_tokens, false)?)
    }

    /// Greedy completion of the token ids `prompt` by model `name`.
    pub fn generate_tokens(
        &self,
        name: &str,
        prompt: &[u32],
        max_tokens: usize,
    ) -> Result<Generation> {
        let messages = RequestMessage::CompletionTokens(prompt.to_vec());
        Self::completion(self.request(name, messages, max_tokens, false)?)
    }

    /// [`Engine::generate_tokens`] for several requests sent together before any answer is awaited, so
    /// the host may batch them (requests for one model and its aliases share that model's engine).
    pub fn generate_tokens_batch(
        &self,
        requests: &[(&str, &[u32])],
        max_tokens: usize,
    ) -> Result<Vec<Generation>> {
        if requests
            .iter()
            .any(|(name, _)| self.swapped(name).is_some())
        {
            // Holding one model's engine while waiting for another's could wait forever under the
            // cap: one at a time.
            return requests
                .iter()
                .map(|(name, prompt)| self.generate_tokens(name, prompt, max_tokens))
                .collect();
        }
        let pending = requests
            .iter()
            .map(|(name, prompt)| {
                self.send(
                    name,
                    RequestMessage::CompletionTokens(prompt.to_vec()),
                    max_tokens,
                    false,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        pending
            .into_iter()
            .map(|rx| Self::completion(self.receive(rx)?))
            .collect()
    }

    /// The logits model `name` gives the token after `tokens` (one forward pass over them). The host
    /// answers raw logits for a batch of one only, so such requests are never sent together.
    pub fn next_logits(&self, name: &str, tokens: &[u32]) -> Result<Vec<f32>> {
        let messages = RequestMessage::CompletionTokens(tokens.to_vec());
        let Response::Raw { logits_chunks, .. } = self.request(name, messages, 1, true)? else {
            return Err(Error::Host("expected raw logits".to_string()));
        };
        let last = logits_chunks
            .last()
            .ok_or_else(|| Error::Host("no logits returned".to_string()))?;
        let v = last
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(host)?;
        let vocab = last.dims().last().copied().unwrap_or(v.len()).max(1);
        Ok(v[v.len() - vocab.min(v.len())..].to_vec())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // MistralRs's own Drop stops its engine threads; drop it inside the runtime's context.
        let _guard = self.runtime.enter();
        self.mistralrs.take();
    }
}

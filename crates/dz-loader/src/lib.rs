//! # dz-loader
//!
//! `base+delta` model specs from a TOML config ([`config`]) into mistral.rs: **merge** mode (base + delta
//! materialised into plain weights, loaded by the host's normal pipeline: one fine-tune, no run-time
//! overhead) and **multi-tenant** mode (one base, each linear layer computing `base + delta` per row on
//! the packed deltas with dz-candle-ops; DeltaZip, arXiv 2312.05215, section 4). Every delta's base
//! fingerprint and architecture are checked before anything is loaded.
//!
//! [`serve`] turns a checked config into a host [`Engine`] that serves the base and each fine-tune by
//! name. Multi-tenant mode needs the host seams of `host/patches/` and is not implemented yet: such a
//! delta is refused with a message naming its field.

#![deny(missing_docs)]

pub mod config;
mod error;
pub mod host;
pub mod merge;
pub mod multi_tenant;

use candle_core::Device;

pub use config::{CheckedDelta, Config, DeltaSpec, DeviceSpec, DtypeSpec, Mode};
pub use error::{Error, Result};
pub use host::{Engine, GeneratedToken, Generation};

/// The candle device for a config's `runtime.device`.
pub fn device(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => {
            Device::new_cuda(n).map_err(|e| Error::Host(format!("cuda:{n}: {e}")))
        }
    }
}

/// Loads what `config` describes into one host engine: the base under [`Config::base_name`] (unless
/// `base.serve = false`) and each delta under its name. Merge-mode deltas are materialised first
/// ([`merge::materialise`]).
pub fn serve(config: &Config, deltas: &[CheckedDelta]) -> Result<Engine> {
    if let Some(i) = deltas.iter().position(|d| d.spec.mode == Mode::MultiTenant) {
        return Err(Error::Config {
            file: config.file.clone(),
            field: format!("delta[{i}].mode"),
            message: "multi-tenant mode is not implemented yet; use mode = \"merge\"".to_string(),
        });
    }
    let device = device(config.runtime.device)?;
    let mut engine = Engine::new(config.scheduler.max_seqs)?;
    let base = &config.base.path;
    if config.base.serve {
        let p = host::load_pipeline(base, base, config.base.dtype, &device)?;
        engine.add(&config.base_name(), p)?;
    }
    for d in deltas {
        let dir = merge::materialise(base, &config.merged_dir(), d)?;
        let p = host::load_pipeline(&dir, base, config.base.dtype, &device)?;
        engine.add(&d.spec.name, p)?;
    }
    Ok(engine)
}

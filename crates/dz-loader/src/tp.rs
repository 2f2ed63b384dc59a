//! Tensor parallelism across GPUs (`[runtime] tensor_parallel = N`), through the host's own NCCL path.
//!
//! mistral.rs 0.8.1 built with its `nccl` feature shards a model over every visible GPU with one process
//! per GPU: the process a user starts is rank 0; while it loads the model it re-runs the same executable
//! with the same arguments once per other GPU (rank `r` on GPU `r`, told so by the environment variable
//! [`WORKER_ENV`]), and afterwards copies every request to those workers, which decode in lock step with it.
//! A worker never returns from building its engine. Column-parallel layers (q/k/v/gate/up) hold a slice of
//! the output features, row-parallel ones (o/down) a slice of the input features with their outputs summed
//! across ranks; embeddings, norms and the head are whole on every rank.
//!
//! Deltas follow the base: each rank uploads its slice of every packed delta (dz-format's `tensor_split`
//! and `shard_range`, the same cut as the base's; exact, never re-quantized), so a column-parallel rank
//! computes its outputs' slice of `x · Dᵀ` and the row-parallel ranks' partial products are summed by the
//! host's all-reduce together with the base's: the linear hook wraps a row-parallel layer's inner weight,
//! before the all-reduce (host patch 0002; until session 10 it wrapped the finished layer, so each rank
//! added its partial after the sum, and TP2 fine-tunes drifted from TP1's on two H200s while the base
//! matched; `tests/loader/tensor_parallel.rs` simulates both places). What this module owns: the
//! process's [`TpRank`], and the environment the host reads ([`prepare`]).

use crate::config::{Config, DeviceSpec};
use crate::error::{Error, Result};

/// The environment variable through which mistral.rs tells a worker process its rank (`distributed.rs`:
/// `{"Init": {"id": .., "worker_rank": r - 1}}` for rank `r`).
pub const WORKER_ENV: &str = "__MISTRALRS_DAEMON_INTERNAL";

/// This process's place in a tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpRank {
    /// 0 for the process the user started, `1..world` for the host's workers.
    pub rank: usize,
    /// The number of ranks (GPUs).
    pub world: usize,
}

impl TpRank {
    /// A single process, no sharding.
    pub const SINGLE: TpRank = TpRank { rank: 0, world: 1 };

    /// This process's rank in a group of `world` ranks: read from [`WORKER_ENV`] in a worker, 0 otherwise.
    pub fn current(world: usize) -> Result<TpRank> {
        let world = world.max(1);
        let rank = worker_rank()?.unwrap_or(0);
        if rank >= world {
            return Err(Error::Host(format!(
                "tensor parallelism: this process is rank {rank} but the config asks for \
                 tensor_parallel = {world}"
            )));
        }
        Ok(TpRank { rank, world })
    }

    /// Whether this process is one of the host's workers (rank > 0).
    pub fn is_worker(self) -> bool {
        self.rank > 0
    }
}

/// The rank of this process when the host started it as a worker, from [`WORKER_ENV`].
pub fn worker_rank() -> Result<Option<usize>> {
    let Ok(payload) = std::env::var(WORKER_ENV) else {
        return Ok(None);
    };
    let bad = |why: &str| {
        Error::Host(format!(
            "tensor parallelism: {WORKER_ENV} is set but {why}: {:?}",
            payload.chars().take(80).collect::<String>()
        ))
    };
    let v: serde_json::Value =
        serde_json::from_str(&payload).map_err(|_| bad("is not the host's JSON"))?;
    let r = v
        .get("Init")
        .and_then(|i| i.get("worker_rank"))
        .and_then(|r| r.as_u64())
        .ok_or_else(|| bad("has no Init.worker_rank"))?;
    Ok(Some(r as usize + 1))
}

/// Whether this build can shard across GPUs (the `nccl` feature).
pub const NCCL_BUILT: bool = cfg!(feature = "nccl");

/// Checks the config's `tensor_parallel` against this build and the machine, and sets the environment
/// the host reads before it loads anything: with `tensor_parallel = 1` (or on the CPU) the host's NCCL
/// path is switched off (`MISTRALRS_NO_NCCL=1`), so an `nccl` build behaves as a plain one; with `N > 1`,
/// `MISTRALRS_MN_LOCAL_WORLD_SIZE=N` (GPUs 0..N of those visible), and NVLink multicast stays off
/// (`NCCL_NVLS_ENABLE=0` unless already set). Call it before the first host call, while the process has
/// one thread. Returns this process's rank.
pub fn prepare(config: &Config) -> Result<TpRank> {
    let world = config.runtime.tensor_parallel;
    if world <= 1 || config.runtime.device == DeviceSpec::Cpu {
        if world > 1 {
            return Err(Error::Config {
                file: config.file.clone(),
                field: "runtime.tensor_parallel".into(),
                message: format!("tensor_parallel = {world} needs device = \"cuda\""),
            });
        }
        if NCCL_BUILT {
            std::env::set_var("MISTRALRS_NO_NCCL", "1");
        }
        return Ok(TpRank::SINGLE);
    }
    if !NCCL_BUILT {
        return Err(Error::Config {
            file: config.file.clone(),
            field: "runtime.tensor_parallel".into(),
            message: format!(
                "tensor_parallel = {world} needs a build with NCCL: cargo build --release -p deltazip \
                 --features nccl (and libnccl at run time)"
            ),
        });
    }
    if config.runtime.device != DeviceSpec::Cuda(0) {
        return Err(Error::Config {
            file: config.file.clone(),
            field: "runtime.device".into(),
            message: format!(
                "with tensor_parallel = {world} the ranks use GPUs 0..{world}: set device = \"cuda\" \
                 (choose GPUs with CUDA_VISIBLE_DEVICES)"
            ),
        });
    }
    std::env::remove_var("MISTRALRS_NO_NCCL");
    std::env::set_var("MISTRALRS_MN_LOCAL_WORLD_SIZE", world.to_string());
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
    let rank = TpRank::current(world)?;
    if rank.is_worker() {
        exit_with_parent();
    }
    Ok(rank)
}

/// A worker outlives nothing: the host's workers spin forever once their engine runs, so a worker ends
/// itself when rank 0 (its parent) is gone.
fn exit_with_parent() {
    #[cfg(unix)]
    {
        let parent = std::os::unix::process::parent_id();
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(500));
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(0);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_process_is_rank_zero() {
        // The test process is never a host worker.
        assert_eq!(worker_rank().unwrap(), None);
        assert_eq!(TpRank::current(4).unwrap(), TpRank { rank: 0, world: 4 });
        assert!(!TpRank::current(4).unwrap().is_worker());
        assert_eq!(TpRank::current(0).unwrap(), TpRank::SINGLE);
    }
}

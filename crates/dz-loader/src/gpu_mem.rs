//! The GPU's memory as the merged-engine swap sees it ([`crate::engines`]): free bytes for its room
//! checks and its trace (`DZ_ENGINE_TRACE=1`), and binding the device's CUDA context on a thread that
//! may free device memory. Everything here is a no-op, or `None`, on the CPU and in builds without the
//! `cuda` feature.

use candle_core::Device;

static POOL_KEEP_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How much freed memory each CUDA device [`crate::serve`] uses keeps in its stream-ordered memory pool
/// across synchronizations (`dz_candle_ops::set_pool_release_threshold`; `deltazip serve --pool-keep`).
/// 0 (the default) leaves the driver's default: the pool gives freed memory back at every
/// synchronization, and a serving step's allocations after its synchronization map memory again.
/// Session 15 on the H200: with 4 GiB kept, a synchronized embedding delta took 0.6 ms instead of 36 (the
/// first part of a pass after a synchronization), and one serving A/B gave dz +11-18% tokens/s; session
/// 16's two more gave +2% (dz) and -9% (the base), all within the runs' noise. [`mem_info`] trims the
/// pool before it measures either way.
pub fn set_pool_keep_bytes(bytes: u64) {
    POOL_KEEP_BYTES.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// What [`set_pool_keep_bytes`] set.
pub fn pool_keep_bytes() -> u64 {
    POOL_KEEP_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Applies [`set_pool_keep_bytes`]'s setting to `device`'s memory pool (nothing when it is 0, on the
/// CPU, or on a device without memory pools).
pub(crate) fn keep_pool_memory(device: &Device) -> crate::Result<()> {
    let keep = pool_keep_bytes();
    if keep == 0 {
        return Ok(());
    }
    if dz_candle_ops::set_pool_release_threshold(device, keep)
        .map_err(|e| crate::Error::Host(format!("{device:?}: {e}")))?
    {
        eprintln!(
            "deltazip serve: {device:?}'s memory pool keeps up to {} of freed memory across synchronizations",
            gib(keep)
        );
    }
    Ok(())
}

/// A device's memory at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemInfo {
    /// Bytes free.
    pub free: u64,
    /// Bytes in all.
    pub total: u64,
    /// A CUDA error that a call could not return (cudarc records a failed free, made in a `Drop`, on
    /// the device's context; the next call that checks the context, on any thread, returns it). Left
    /// pending: whichever call it surfaces in still gets it.
    pub pending_error: Option<String>,
}

/// `device`'s memory now, after its queued work (frees queued on the stream count as free, and the
/// stream-ordered allocator's pool is trimmed, so memory it kept under [`set_pool_keep_bytes`] counts
/// as free); `None` on the CPU. Makes the device's context current on the calling thread.
pub fn mem_info(device: &Device) -> Option<Result<MemInfo, String>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return Some(cuda::mem_info(dev));
    }
    let _ = device;
    None
}

/// Makes `device`'s CUDA context current on the calling thread (nothing on the CPU). cudarc frees a
/// buffer without doing so, and a free on a thread with no current context fails (the memory stays
/// allocated; see [`MemInfo::pending_error`]): a thread that may drop the last reference to a model
/// binds the context first.
pub fn bind(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        if let Err(e) = cuda::bind(dev) {
            eprintln!("dz-loader: making the CUDA context current: {e:?}");
        }
    }
    let _ = device;
}

/// GPU memory a serving step needs besides the resident deltas (activations, the host's and cuBLAS's
/// workspaces), in [`delta_room`]'s check.
pub const STEP_RESERVE_BYTES: u64 = 4 << 30;

/// The most bytes of deltas a GPU can hold beside what serving needs, given `free` bytes after the base
/// and its KV cache: [`STEP_RESERVE_BYTES`], the pool's kept memory (`pool_keep`), and two of the
/// largest delta (`largest`): an evicted delta stays allocated until the step that uses it ends, so a
/// load can overlap one (session 15: a 13B config of 90 GiB of 4.6 GiB deltas, 16 GiB of KV cache and
/// the base in 140 GiB ran out of memory mid-serving).
pub fn delta_room(free: u64, largest: u64, pool_keep: u64) -> u64 {
    free.saturating_sub(STEP_RESERVE_BYTES)
        .saturating_sub(pool_keep)
        .saturating_sub(largest.saturating_mul(2))
}

/// Checks a GPU delta budget (`budget`, from `what`: the config key or the default) against
/// [`delta_room`]; the error says what fits and what to change.
pub fn check_delta_budget(
    what: &str,
    budget: u64,
    free: u64,
    largest: u64,
    pool_keep: u64,
) -> Result<(), String> {
    let room = delta_room(free, largest, pool_keep);
    if budget <= room {
        return Ok(());
    }
    Err(format!(
        "{what} ({}) does not fit this GPU: {} is free after the base and its KV cache, and serving \
         needs {} of it besides the deltas ({} for a step, {} kept by the memory pool, and twice the \
         largest delta, {}, for a load that overlaps an eviction); at most {} fits. Lower \
         runtime.gpu_delta_bytes, or runtime.kv_cache_bytes, or --pool-keep",
        gib(budget),
        gib(free),
        gib(free.saturating_sub(room)),
        gib(STEP_RESERVE_BYTES),
        gib(pool_keep),
        gib(largest),
        gib(room),
    ))
}

/// Bytes in GiB, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{result, DriverError};
    use candle_core::cuda_backend::CudaDevice;

    use super::MemInfo;

    pub(super) fn bind(dev: &CudaDevice) -> Result<(), DriverError> {
        let stream = dev.cuda_stream();
        // SAFETY: the context is the device's retained primary context, alive while `dev` is; making
        // it current does not check or clear the error cudarc may have recorded on it (as
        // `CudaContext::bind_to_thread` would).
        unsafe { result::ctx::set_current(stream.context().cu_ctx()) }
    }

    pub(super) fn mem_info(dev: &CudaDevice) -> Result<MemInfo, String> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        // Taken and put back: only looked at.
        let pending_error = match ctx.check_err() {
            Ok(()) => None,
            Err(e) => {
                ctx.record_err::<()>(Err(e));
                Some(format!("{e:?}"))
            }
        };
        bind(dev).map_err(|e| format!("{e:?}"))?;
        result::ctx::synchronize().map_err(|e| format!("{e:?}"))?;
        dz_candle_ops::trim_pool(&candle_core::Device::Cuda(dev.clone()), 0)
            .map_err(|e| format!("{e}"))?;
        let (free, total) = result::mem_get_info().map_err(|e| format!("{e:?}"))?;
        Ok(MemInfo {
            free: free as u64,
            total: total as u64,
            pending_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_delta_budget_that_leaves_no_room_for_a_step_is_refused_with_what_fits() {
        // Session 15's 13B run: ~99.6 GiB free, 4.6 GiB deltas, 4 GiB kept by the pool.
        let (free, largest, keep) = (99 * GIB + GIB / 2, 46 * GIB / 10, 4 * GIB);
        let room = delta_room(free, largest, keep);
        assert_eq!(room, free - 4 * GIB - keep - 2 * largest);
        let e = check_delta_budget("runtime.gpu_delta_bytes", 90 * GIB, free, largest, keep)
            .unwrap_err();
        assert!(
            e.contains("runtime.gpu_delta_bytes (90.0 GiB) does not fit"),
            "{e}"
        );
        assert!(e.contains(&format!("at most {} fits", gib(room))), "{e}");
        assert!(check_delta_budget("b", room, free, largest, keep).is_ok());
        // The 7B runs: 2.3 GiB deltas, ~111 GiB free.
        assert!(check_delta_budget("b", 90 * GIB, 111 * GIB, 23 * GIB / 10, keep).is_ok());
        // Nothing free: no room at all, not an underflow.
        assert_eq!(delta_room(GIB, largest, keep), 0);
        assert!(check_delta_budget("b", 1, GIB, largest, keep).is_err());
    }
}

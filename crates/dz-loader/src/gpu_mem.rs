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
/// Not yet measured on a GPU (session 14); [`mem_info`] trims the pool before it measures either way.
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

//! How much freed memory the CUDA device's stream-ordered memory pool keeps across synchronizations
//! ([`set_pool_release_threshold`]).
//!
//! candle allocates every CUDA tensor with `cuMemAllocAsync` from the device's current memory pool
//! (cudarc, where the device supports memory pools). That pool's release threshold defaults to 0:
//! at every stream, event or context synchronization it gives the memory its freed blocks held back
//! to the driver, and the allocations after that map memory again. A serving process synchronizes at
//! least once a decode step (the sampled tokens), so each step's working set (activations, sbmm
//! outputs, workspaces) may be mapped anew every step. A threshold of a few GiB keeps it.
//!
//! The pool is the device's, shared by every context and library in the process that allocates from
//! it (the host's engine included). Memory the pool keeps counts as used in `cuMemGetInfo`;
//! [`trim_pool`] returns it first where free memory is measured.

use candle_core::Device;

/// Lets `device`'s current memory pool keep up to `bytes` of freed memory across synchronizations
/// (`CU_MEMPOOL_ATTR_RELEASE_THRESHOLD`; the driver's default is 0). Returns whether it was set:
/// `false` on the CPU, without the `cuda` feature, or on a device without memory pools.
pub fn set_pool_release_threshold(device: &Device, bytes: u64) -> candle_core::Result<bool> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::set_release_threshold(dev, bytes),
        _ => {
            let _ = bytes;
            Ok(false)
        }
    }
}

/// Returns the freed memory `device`'s current memory pool holds beyond `keep` bytes to the driver
/// (`cuMemPoolTrimTo`), e.g. before measuring free memory. Nothing on the CPU, without the `cuda`
/// feature, or on a device without memory pools.
pub fn trim_pool(device: &Device, keep: usize) -> candle_core::Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::trim(dev, keep),
        _ => {
            let _ = keep;
            Ok(())
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::ffi::c_void;

    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;

    /// The device's current memory pool, or `None` when the device has none.
    fn current_pool(dev: &CudaDevice) -> candle_core::Result<Option<sys::CUmemoryPool>> {
        let ctx = dev.cuda_stream().context().clone();
        if !ctx.has_async_alloc() {
            return Ok(None);
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out pointer; the device handle is the context's own.
        unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .map_err(|e| candle_core::Error::Msg(format!("cuDeviceGetMemPool: {e:?}")))?;
        Ok(Some(pool))
    }

    pub(super) fn set_release_threshold(dev: &CudaDevice, bytes: u64) -> candle_core::Result<bool> {
        let Some(pool) = current_pool(dev)? else {
            return Ok(false);
        };
        let mut value = bytes;
        // SAFETY: the attribute takes a `cuuint64_t` read through the pointer, which points to one.
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut value as *mut u64).cast::<c_void>(),
            )
        }
        .result()
        .map_err(|e| candle_core::Error::Msg(format!("cuMemPoolSetAttribute: {e:?}")))?;
        Ok(true)
    }

    pub(super) fn trim(dev: &CudaDevice, keep: usize) -> candle_core::Result<()> {
        let Some(pool) = current_pool(dev)? else {
            return Ok(());
        };
        // SAFETY: `pool` is the device's pool; trimming only returns memory no allocation holds.
        unsafe { sys::cuMemPoolTrimTo(pool, keep) }
            .result()
            .map_err(|e| candle_core::Error::Msg(format!("cuMemPoolTrimTo: {e:?}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_pool_to_set_or_trim() {
        assert!(!set_pool_release_threshold(&Device::Cpu, 4 << 30).unwrap());
        trim_pool(&Device::Cpu, 0).unwrap();
    }
}

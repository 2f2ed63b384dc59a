//! Page-locking host buffers that are copied to a CUDA device many times ([`HostPins`]).
//!
//! A host-to-device copy from pageable memory goes through the driver's own staging buffers: the CPU
//! copies each chunk into page-locked memory, then the DMA engine moves it. From page-locked memory the
//! DMA engine reads the buffer directly. A serving process's CPU tier keeps each fine-tune's delta in
//! host memory and uploads it again after every GPU eviction (session 13, 64 fine-tunes on a GPU that
//! holds 34: 276 uploads of 2.6 GB in one run), so registering those buffers once, when the delta is
//! read, moves every later upload onto the direct path.

use candle_core::Device;

/// Buffers shorter than this are left pageable: small allocations share pages with their neighbours
/// (two registrations of one page fail), and their copies are too short for the staging to matter.
pub const MIN_PINNED_BYTES: usize = 1 << 20;

/// Host buffers page-locked for copies to one CUDA device's context (`cuMemHostRegister`, portable to
/// every context), unregistered when this is dropped. On other devices, or without the `cuda` feature,
/// it registers nothing.
///
/// Registration is best effort: a buffer the driver refuses (one that shares a page with a buffer
/// registered already, or when the OS will not lock more memory) stays pageable, and its copies take
/// the staged path. [`HostPins::bytes`] says how much was locked.
pub struct HostPins {
    #[cfg(feature = "cuda")]
    inner: Option<cuda::Registered>,
    bytes: usize,
    buffers: usize,
    refused: usize,
}

impl std::fmt::Debug for HostPins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPins")
            .field("bytes", &self.bytes)
            .field("buffers", &self.buffers)
            .field("refused", &self.refused)
            .finish()
    }
}

impl HostPins {
    /// Nothing registered.
    pub fn none() -> Self {
        HostPins {
            #[cfg(feature = "cuda")]
            inner: None,
            bytes: 0,
            buffers: 0,
            refused: 0,
        }
    }

    /// Page-locks each of `buffers` of at least [`MIN_PINNED_BYTES`] for copies to `device` (nothing
    /// unless it is a CUDA device).
    ///
    /// # Safety
    /// Each buffer's memory must stay allocated, at the same address, until the returned value is
    /// dropped: a `Vec` that owns one may move, but must not grow, shrink or be freed before then
    /// (declare the `HostPins` before the buffers in a struct, so that it drops first).
    pub unsafe fn register<'a>(
        device: &Device,
        buffers: impl IntoIterator<Item = &'a [u8]>,
    ) -> Self {
        let big = buffers.into_iter().filter(|b| b.len() >= MIN_PINNED_BYTES);
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                // SAFETY: the caller's contract, passed on.
                unsafe { cuda::register(dev, big) }
            }
            _ => {
                drop(big);
                Self::none()
            }
        }
    }

    /// Bytes page-locked.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Buffers page-locked.
    pub fn buffers(&self) -> usize {
        self.buffers
    }

    /// Buffers of at least [`MIN_PINNED_BYTES`] the driver refused (left pageable).
    pub fn refused(&self) -> usize {
        self.refused
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::ffi::c_void;
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaContext};
    use candle_core::cuda_backend::CudaDevice;

    use super::HostPins;

    /// The registered base addresses and the context they were registered in.
    pub(super) struct Registered {
        ctx: Arc<CudaContext>,
        ptrs: Vec<usize>,
    }

    impl Drop for Registered {
        fn drop(&mut self) {
            // SAFETY: the context is alive (held here); making it current does not touch any state
            // cudarc keeps.
            if unsafe { result::ctx::set_current(self.ctx.cu_ctx()) }.is_err() {
                // Without a current context the calls below fail; the pages stay locked until exit.
                return;
            }
            for &p in &self.ptrs {
                // SAFETY: `p` is a base address this value registered and has not unregistered; its
                // memory is still allocated (the contract of `HostPins::register`).
                unsafe { sys::cuMemHostUnregister(p as *mut c_void) };
            }
        }
    }

    /// # Safety
    /// As [`HostPins::register`].
    pub(super) unsafe fn register<'a>(
        dev: &CudaDevice,
        buffers: impl Iterator<Item = &'a [u8]>,
    ) -> HostPins {
        let ctx = dev.cuda_stream().context().clone();
        let mut pins = HostPins::none();
        // SAFETY: as in `Drop` above.
        if unsafe { result::ctx::set_current(ctx.cu_ctx()) }.is_err() {
            return pins;
        }
        let mut ptrs = Vec::new();
        for b in buffers {
            // SAFETY: `b` is live host memory of `b.len()` bytes that stays allocated until the
            // registration is undone (the caller's contract). The driver only locks its pages and
            // never writes it; PORTABLE: every context (every GPU of a tensor-parallel server) sees it
            // as page-locked.
            let r = unsafe {
                sys::cuMemHostRegister_v2(
                    b.as_ptr() as *mut c_void,
                    b.len(),
                    sys::CU_MEMHOSTREGISTER_PORTABLE,
                )
            };
            if r == sys::CUresult::CUDA_SUCCESS {
                ptrs.push(b.as_ptr() as usize);
                pins.bytes += b.len();
                pins.buffers += 1;
            } else {
                pins.refused += 1;
            }
        }
        pins.inner = Some(Registered { ctx, ptrs });
        pins
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_registered_off_cuda() {
        let big = vec![1u8; 2 * MIN_PINNED_BYTES];
        // SAFETY: `big` outlives `pins` (declared later, dropped first).
        let pins = unsafe { HostPins::register(&Device::Cpu, [big.as_slice()]) };
        assert_eq!((pins.bytes(), pins.buffers(), pins.refused()), (0, 0, 0));
        assert_eq!(big[0], 1);
    }
}

//! The CUDA forward passes of every op: dz-kernels' entry points launched on candle's stream.
//!
//! Each function checks what only the storages can tell (dtype, contiguity, device, alignment, the kernels'
//! 32-bit limits; for the embedding, every id `< N_total`), with the same [`OpError`]s as the CPU path,
//! allocates the output, fills what the kernel does not write, and launches:
//! - Where a delta qualifies (f16/bf16 inputs, quant 2/4, sparse24 2/4, sign1: `dz_kernels::tc`) and
//!   [`crate::tensor_cores`] allows, `matmul` and `sbmm` launch the tensor-core kernels (tiles of 8, 16 or
//!   32 input rows), else the generic ones.
//! - [`matmul`]: one launch of `matmul_add` (tile of 1 input row when `M = 1`, else 8). A row-subset delta
//!   writes only its stored rows' output columns, so the output first gets `base_out` (or zeros) and the
//!   kernel adds in place; otherwise the kernel reads `base_out` and writes every element.
//! - `sbmm`, in two steps: [`sbmm_prepare`] groups the segments by variant (codec and bits, or dense value
//!   dtype), picks each group's kernel, tile and grid, and uploads the segments (split into runs of at
//!   most the tile's rows) and the deltas' descriptors in one copy; [`sbmm_run`] copies `base_out` to the
//!   output, then makes ONE launch per variant present among the deltas, covering every segment of every
//!   delta of that variant. The plain op runs both per call; an `SbmmPlan` keeps the first one's
//!   [`SbmmLaunches`] and runs only the second. Base-only and empty segments, and `zero` deltas, launch
//!   nothing.
//! - [`dequantize`] (also `merge`) and [`embedding`]: one launch that writes every output element.
//!
//! The descriptors hold raw device pointers to the deltas' parts; the read locks on their storages and
//! cudarc's stream-ordering guards ([`Ptrs`]) are held until the launches are queued (`sbmm`: until its
//! table is built; the caller of [`sbmm_run`] keeps the deltas alive instead), and candle runs everything
//! on one stream, so the parts outlive the kernels that read them.

mod desc;

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    result as driver, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape};
use dz_kernels::desc::as_bytes;
use dz_kernels::tc::{tc_entries, tc_supports, TcEntries, TcTile, TC_MODULE, TC_THREADS};
use dz_kernels::v4::{
    v4_entries, v4_matmul_sxb_workspace, v4_matmul_sxd_smem, v4_matmul_sxk_workspace,
    v4_matmul_tile_rows, v4_sbmm_tail, v4_tile_rows, SxbPartition, V4Entries,
    V4_DEQUANTIZE_THREADS, V4_MATMUL_SX64_SMEM, V4_MATMUL_SXB_SMEM, V4_MAX_ROWS, V4_MODULE,
    V4_THREADS, V4_TILE_ROWS, V4_WIDE64_ROWS, V4_WIDE_ROWS,
};
use dz_kernels::{DzDelta, DzSegment, Tile, Variant, ROWS_PER_BLOCK, THREADS, WARPS};
use half::{bf16, f16};

use crate::delta::{DeviceDelta, Locked};
use crate::error::{OpError, Result};
use crate::ops::{Fill, Segment};
use desc::{describe, dim, Described};

type Arg<'a> = (&'a CudaStorage, &'a Layout);
type Out = candle_core::Result<(CudaStorage, Shape)>;

/// The grid's y (and the x of the row kernels) is at most this; the kernels stride over the rest.
const MAX_GRID_Y: u32 = 65_535;

/// An input/output dtype of the kernels.
trait Elem: CudaDType + DeviceRepr {
    const KIND: dz_kernels::Dtype;
}

impl Elem for f32 {
    const KIND: dz_kernels::Dtype = dz_kernels::Dtype::F32;
}

impl Elem for f16 {
    const KIND: dz_kernels::Dtype = dz_kernels::Dtype::F16;
}

impl Elem for bf16 {
    const KIND: dz_kernels::Dtype = dz_kernels::Dtype::Bf16;
}

/// Runs `$f::<T>(args)` for the Rust type of a float `DType`; other dtypes are a [`OpError::Dtype`].
macro_rules! by_dtype {
    ($op:expr, $arg:expr, $dtype:expr, $f:ident($($a:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($a),*),
            DType::F16 => $f::<f16>($($a),*),
            DType::BF16 => $f::<bf16>($($a),*),
            other => Err(OpError::Dtype {
                op: $op,
                arg: $arg,
                got: other,
                expected: "f32, f16 or bf16".into(),
            }
            .into()),
        }
    };
}

/// A descriptor passed by value as a kernel argument.
#[repr(transparent)]
struct DescArg(DzDelta);

// SAFETY: `DzDelta` is `#[repr(C)]` plain old data (dz-kernels' `Pod`), the layout of the kernels'
// `DzDelta` parameter (asserted on both sides).
unsafe impl DeviceRepr for DescArg {}

/// Raw device pointers for kernel arguments, with cudarc's guards that order the stream around them (the
/// stream waits for earlier writers; on drop, reads and writes are recorded after the launches).
pub(crate) struct Ptrs<'a> {
    stream: &'a Arc<CudaStream>,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Ptrs<'a> {
    fn new(stream: &'a Arc<CudaStream>) -> Self {
        Ptrs {
            stream,
            guards: Vec::new(),
        }
    }

    /// The address of element `offset` of `s`, to read.
    pub(crate) fn read<T>(&mut self, s: &'a CudaSlice<T>, offset: usize) -> u64 {
        let (p, guard) = s.device_ptr(self.stream);
        self.guards.push(guard);
        p + (offset * std::mem::size_of::<T>()) as u64
    }

    /// The address of `s`, to write.
    fn write<T>(&mut self, s: &'a mut CudaSlice<T>) -> u64 {
        let (p, guard) = s.device_ptr_mut(self.stream);
        self.guards.push(guard);
        p
    }
}

/// A contiguous float input of dtype `T`: its slice, offset and length (elements).
fn input<'s, T: Elem>(
    op: &'static str,
    arg: &'static str,
    a: Arg<'s>,
) -> Result<(&'s CudaSlice<T>, usize, usize)> {
    let (s, l) = a;
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| OpError::NotContiguous {
            op,
            arg,
            shape: l.dims().to_vec(),
            stride: l.stride().to_vec(),
        })?;
    let slice = T::as_cuda_slice(s).map_err(|_| OpError::Dtype {
        op,
        arg,
        got: s.dtype(),
        expected: format!("{:?}", T::KIND),
    })?;
    Ok((slice, start, end - start))
}

/// An uninitialized output of `len` elements (one, when `len` is 0: CUDA cannot allocate zero bytes).
fn alloc<T: Elem>(dev: &CudaDevice, len: usize) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: the memory is uninitialized; every op fills or writes all `len` elements before the output
    // is handed to candle (the kernels write what the fill and copies leave).
    unsafe { dev.alloc::<T>(len.max(1)) }
}

/// `bytes` bytes of `value` at `p` (queued on the stream).
fn memset(stream: &CudaStream, p: u64, value: u8, bytes: usize) -> candle_core::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: `p` points to at least `bytes` bytes of a live allocation (the caller's output buffer),
    // guarded by `Ptrs` until the op returns.
    unsafe { driver::memset_d8_async(p, value, bytes, stream.cu_stream()) }.w()
}

/// Copies `bytes` bytes from `src` to `dst` (distinct live device buffers), queued on the stream.
fn copy(stream: &CudaStream, dst: u64, src: u64, bytes: usize) -> candle_core::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: `dst` and `src` address at least `bytes` bytes each of two live, distinct allocations (the
    // op's output and an input), guarded by `Ptrs` until the op returns.
    unsafe { driver::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }.w()
}

/// Fills `len` elements of `T` at `out` for [`Fill::Nan`].
fn poison<T: Elem>(
    stream: &CudaStream,
    out: u64,
    len: usize,
    fill: Fill,
) -> candle_core::Result<()> {
    match fill {
        Fill::Uninit => Ok(()),
        Fill::Nan => memset(stream, out, 0xFF, len * std::mem::size_of::<T>()),
    }
}

/// `out = base` (or zeros when there is no base) over `bytes` bytes: the elements a kernel will not write.
fn init(stream: &CudaStream, out: u64, base: Option<u64>, bytes: usize) -> candle_core::Result<()> {
    match base {
        Some(b) => copy(stream, out, b, bytes),
        None => memset(stream, out, 0, bytes),
    }
}

/// The function `name` of `variant`'s family (its PTX module is loaded once per device, by candle).
fn function(dev: &CudaDevice, variant: Variant, name: &str) -> candle_core::Result<CudaFunction> {
    let family = variant.family();
    Ok(dev
        .get_or_load_custom_func(name, family.module_name(), family.ptx())?
        .into_cuda_function())
}

// Both families launch blocks of the same size.
const _: () = assert!(TC_THREADS == THREADS);

/// The tensor-core entry points for a described delta with inputs of `dtype`, when they are enabled
/// ([`crate::set_tensor_cores`]) and the delta qualifies.
fn tc_of(d: &Described, dtype: dz_kernels::Dtype) -> Option<&'static TcEntries> {
    if !crate::tensor_cores() || dtype == dz_kernels::Dtype::F32 {
        return None;
    }
    let e = tc_entries(d.variant)?;
    tc_supports(
        d.variant,
        d.desc.k,
        d.desc.group_size,
        d.desc.symmetric != 0,
    )
    .then_some(e)
}

/// The v4 entry points for a described delta with inputs of `dtype`, when the v4 kernels and the tensor
/// cores are enabled and the delta has a v4 layout.
fn v4_of(d: &Described, dtype: dz_kernels::Dtype) -> Option<&'static V4Entries> {
    if !crate::tensor_cores() || !crate::v4_kernels() || dtype == dz_kernels::Dtype::F32 {
        return None;
    }
    d.v4.and(v4_entries(d.variant))
}

/// The v4 entries of a delta that keeps only its v4 layout ([`DeviceDelta::v4_only`]): no other kernel
/// can read it, so f32 inputs, or the v4 kernels or tensor cores turned off since it was built, are an
/// error.
fn v4_only_entries(
    op: &'static str,
    delta: &DeviceDelta,
    d: &Described,
    dtype: dz_kernels::Dtype,
) -> Result<&'static V4Entries> {
    v4_of(d, dtype).ok_or_else(|| OpError::Storage {
        op,
        reason: format!(
            "{} (its v4 kernels take f16 or bf16 inputs with the v4 kernels and tensor cores on; \
             got {dtype:?} inputs, v4 kernels {}, tensor cores {})",
            v4_only_error(op, delta),
            crate::v4_kernels(),
            crate::tensor_cores()
        ),
    })
}

/// The error of an op that needs the packed parts of a delta that keeps only its v4 layout.
fn v4_only_error(op: &'static str, delta: &DeviceDelta) -> OpError {
    OpError::Storage {
        op,
        reason: format!(
            "delta {:?} keeps only its v4 layout on the device (built with the v4 kernels on; \
             dz_candle_ops::set_v4_keep_packed(true) before building keeps the packed parts too)",
            delta.name()
        ),
    }
}

fn config(grid: (u32, u32)) -> LaunchConfig {
    config_threads(grid, THREADS)
}

fn config_threads(grid: (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0.max(1), grid.1.max(1), 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The entry points of a variant (its bits were validated when the delta was built).
fn entries(op: &'static str, variant: Variant) -> Result<&'static dz_kernels::Entries> {
    variant.entries().ok_or_else(|| OpError::Storage {
        op,
        reason: format!("no CUDA kernels for {variant:?}"),
    })
}

/// Forward pass of `delta-matmul` (`base` None) and `delta-matmul-add`.
pub(crate) fn matmul(
    op: &'static str,
    delta: &DeviceDelta,
    x: Arg<'_>,
    base: Option<Arg<'_>>,
    shape: Shape,
    fill: Fill,
) -> Out {
    by_dtype!(
        op,
        "x",
        x.0.dtype(),
        matmul_t(op, delta, x, base, shape, fill)
    )
}

fn matmul_t<T: Elem>(
    op: &'static str,
    delta: &DeviceDelta,
    x: Arg<'_>,
    base: Option<Arg<'_>>,
    shape: Shape,
    fill: Fill,
) -> Out {
    let dev = x.0.device().clone();
    let (n, k) = delta.dims();
    let (xs, x_off, x_len) = input::<T>(op, "x", x)?;
    let base = base.map(|b| input::<T>(op, "base_out", b)).transpose()?;
    let m = x_len / k.max(1);
    let m32 = dim(op, "x", m, x.1.dims())?;
    let len = m * n;
    let stream = dev.cuda_stream();
    let _s = crate::trace::span("delta matmul (CUDA): lock, describe, allocate, launch");
    let locked = Locked::new(delta);
    let mut out = alloc::<T>(&dev, len)?;
    // The K-split 32-row tile's workspace (`v4_matmul_sxk_workspace`), freed on the stream after the launch.
    let mut scratch: Option<CudaSlice<u8>> = None;
    {
        let mut ptrs = Ptrs::new(&stream);
        let described = describe(op, &locked, &dev, &mut ptrs)?;
        let x_p = ptrs.read(xs, x_off);
        let base_p = base.map(|(s, o, _)| ptrs.read(s, o));
        let out_p = ptrs.write(&mut out);
        poison::<T>(&stream, out_p, len, fill)?;
        // `zero` writes nothing and a row subset only its stored rows' columns: start from base_out (or 0).
        let in_place = described.is_none_or(|d| d.desc.row_index != 0);
        if in_place {
            init(&stream, out_p, base_p, len * std::mem::size_of::<T>())?;
        }
        if let (Some(d), true) = (described, m > 0) {
            let wide_from = crate::v4_wide_from(n, k);
            let kernel = if delta.v4_only() {
                Kernel::v4_matmul_any_rows(v4_only_entries(op, delta, &d, T::KIND)?, m32, wide_from)
            } else {
                let (tc, v4) = (tc_of(&d, T::KIND), v4_of(&d, T::KIND));
                Kernel::pick_matmul(d.variant, tc, v4, m32, wide_from)
            };
            let tiles = d.desc.n_stored.div_ceil(kernel.stored_rows());
            let x_tiles = m32.div_ceil(kernel.rows());
            // The automatic choice takes the pair tile where sessions 18-19 measured it faster (the
            // rule reads the 32-row tile's grid: its blocks of 8 row tiles of one x tile, and the SMs).
            let wide_x = match crate::v4_wide_x() {
                crate::V4WideX::Auto
                    if matches!(kernel, Kernel::V4(_, V4_WIDE_ROWS))
                        && crate::v4_auto_takes_pair(
                            matches!(d.variant, Variant::Sparse24(_)),
                            d.desc.n_stored,
                            d.desc.k,
                            m32,
                            u64::from(x_tiles) * u64::from(tiles.div_ceil(WARPS_V4)),
                            resident_warps(&dev)? / u64::from(2 * WARPS_V4),
                        ) =>
                {
                    crate::V4WideX::SharedPair
                }
                w => w,
            };
            // The shared-x tiles' launch: (entry, blocks, dynamic shared memory, K split, and on the
            // balanced schedule its partition and the partial sums a lane / 4).
            let sx = match kernel {
                // The balanced schedule: the 64-row tile (forced, or from `set_v4_wide64_from`'s rows;
                // 2 blocks an SM for sparse24, 1 for quant: its registers), the 32-row tile's balanced
                // entry or the pair tiles (forced), on as many blocks as are resident.
                Kernel::V4(e, V4_WIDE_ROWS)
                    if crate::v4_takes_wide64(m32)
                        || matches!(
                            wide_x,
                            crate::V4WideX::SharedBalanced
                                | crate::V4WideX::SharedPair
                                | crate::V4WideX::SharedPairDeep
                        ) =>
                {
                    let sms = resident_warps(&dev)? / u64::from(2 * WARPS_V4);
                    // (entry, x rows, shared memory, blocks an SM, 16-row tiles a warp, accumulator
                    // tiles a warp: `v4_matmul_sxb_workspace`'s `sums`)
                    let (name, x_rows, smem, per_sm, mt, sums) = match wide_x {
                        _ if crate::v4_takes_wide64(m32) => {
                            let per_sm = if matches!(d.variant, Variant::Sparse24(_)) {
                                2
                            } else {
                                1
                            };
                            (
                                e.matmul_sx64(T::KIND),
                                V4_WIDE64_ROWS,
                                V4_MATMUL_SX64_SMEM,
                                per_sm,
                                1,
                                8,
                            )
                        }
                        crate::V4WideX::SharedPair => (
                            e.matmul_sxp(T::KIND, false),
                            V4_WIDE_ROWS,
                            V4_MATMUL_SXB_SMEM,
                            2,
                            2,
                            8,
                        ),
                        crate::V4WideX::SharedPairDeep => (
                            e.matmul_sxp(T::KIND, true),
                            V4_WIDE_ROWS,
                            V4_MATMUL_SXB_SMEM,
                            1,
                            2,
                            8,
                        ),
                        _ => (
                            e.matmul_sxb(T::KIND),
                            V4_WIDE_ROWS,
                            V4_MATMUL_SXB_SMEM,
                            2,
                            1,
                            4,
                        ),
                    };
                    let part =
                        SxbPartition::new(m32, x_rows, d.desc.n_stored, d.desc.k, mt, sms * per_sm);
                    name.map(|name| (name, part.grid, smem, 1, Some((part, sums))))
                }
                // The pair tile on the plain launch (forced): blocks of 16 row tiles of one x tile.
                Kernel::V4(e, V4_WIDE_ROWS) if wide_x == crate::V4WideX::SharedPairGrid => {
                    let blocks = u64::from(x_tiles) * u64::from(tiles.div_ceil(2 * WARPS_V4));
                    e.matmul_sxq(T::KIND).map(|name| (name, blocks, 0, 1, None))
                }
                // The 32-row tile with x in shared memory: blocks of 8 row tiles of one x tile.
                Kernel::V4(e, V4_WIDE_ROWS) => {
                    let blocks = u64::from(x_tiles) * u64::from(tiles.div_ceil(WARPS_V4));
                    // 4 blocks an item where the launch has at most a block for two SMs (session 14:
                    // 0.45-0.88x the unsplit kernel's time at every such launch of its sweep, and faster
                    // than the global kernel there too).
                    let split = match crate::v4_wide_x() {
                        crate::V4WideX::Auto | crate::V4WideX::SharedSplit => crate::v4_wide_split(
                            blocks,
                            resident_warps(&dev)? / u64::from(WARPS_V4),
                        ),
                        _ => 1,
                    };
                    let shared = match crate::v4_wide_x() {
                        // sparse24: always (measured faster at every shape and row count of session
                        // 12's sweep, 32-256 rows: 4096 x 4096 4b 2:4 at 32 rows 23.5 vs 28.3 us); quant:
                        // from a block per four SMs (resident warps = SMs x 2 blocks x 8 warps), below
                        // which the split kernel won (4096 x 4096 4b g128 at 32 rows, 32 blocks: 19.5 vs
                        // 26.2 us; 5120 x 5120, 40 blocks: 31.2 vs 33.7 shared), or split.
                        crate::V4WideX::Auto => {
                            split > 1
                                || matches!(d.variant, Variant::Sparse24(_))
                                || blocks * 8 * u64::from(WARPS_V4) >= resident_warps(&dev)?
                        }
                        crate::V4WideX::Global => false,
                        crate::V4WideX::Shared
                        | crate::V4WideX::SharedDeep
                        | crate::V4WideX::SharedSplit
                        | crate::V4WideX::Shared64
                        | crate::V4WideX::SharedBalanced
                        | crate::V4WideX::SharedPair
                        | crate::V4WideX::SharedPairDeep
                        | crate::V4WideX::SharedPairGrid => true,
                    };
                    // The deep ring (x and codes in shared memory; measured slower) only when forced.
                    let deep = crate::v4_wide_x() == crate::V4WideX::SharedDeep;
                    let name = if deep {
                        e.matmul_sxd(T::KIND)
                    } else if split > 1 {
                        e.matmul_sxk(T::KIND, split)
                    } else {
                        e.matmul_sx(T::KIND)
                    };
                    let smem = if deep {
                        v4_matmul_sxd_smem(d.variant)
                    } else {
                        Some(0)
                    };
                    name.zip(smem)
                        .filter(|_| shared)
                        .map(|(name, smem)| (name, blocks, smem, split, None))
                }
                _ => None,
            };
            let func = match sx {
                Some((name, _, smem, _, _)) => {
                    let f = dev
                        .get_or_load_custom_func(name, V4_MODULE, dz_kernels::v4_ptx())?
                        .into_cuda_function();
                    if smem > 0 {
                        allow_dynamic_smem(op, &f, smem)?;
                    }
                    f
                }
                None => kernel.function(op, &dev, T::KIND, Launch::Matmul)?,
            };
            // v4: a 1-D grid over the (x tile, delta tile) items, each split over `split` warps.
            let (grid, v4_split) = match kernel {
                // The K-split entries take `split` consecutive blocks per block of the others, one
                // item each (the workspace has a slot per item).
                Kernel::V4(..) if sx.is_some() => {
                    let (blocks, split) = sx.map_or((1, 1), |(_, b, _, s, _)| (b, s));
                    let groups = blocks.min(u64::from(MAX_GRID_X / split)) as u32;
                    ((groups * split, 1), None)
                }
                Kernel::V4(..) => {
                    let (split, grid) =
                        v4_launch(u64::from(x_tiles) * u64::from(tiles), resident_warps(&dev)?);
                    (grid, Some(split))
                }
                _ => ((tiles, x_tiles.min(MAX_GRID_Y)), None),
            };
            // The K split's (or the balanced schedule's) partial sums and counters (zeroed here, on
            // the stream).
            let workspace = match sx {
                Some((.., Some((part, sums)))) => Some(v4_matmul_sxb_workspace(&part, sums)),
                Some((_, blocks, _, split, None)) if split > 1 => {
                    Some(v4_matmul_sxk_workspace(blocks, split))
                }
                _ => None,
            };
            let sxk = match workspace {
                Some((counters, total)) => {
                    // SAFETY: uninitialized: the counters are zeroed below, and the kernel reads a
                    // partial sum only after the block that writes it has counted itself in.
                    let buf = unsafe { dev.alloc::<u8>(total) }?;
                    let p = ptrs.write(scratch.insert(buf));
                    memset(&stream, p, 0, counters)?;
                    Some((p + counters as u64, p))
                }
                _ => None,
            };
            let desc = DescArg(kernel.desc(&d));
            let base_arg = if in_place { out_p } else { base_p.unwrap_or(0) };
            let mut b = stream.launch_builder(&func);
            b.arg(&desc);
            b.arg(&x_p);
            b.arg(&base_arg);
            b.arg(&out_p);
            b.arg(&m32);
            if let Some(split) = &v4_split {
                b.arg(split);
            }
            if let Some((ws, counters)) = &sxk {
                b.arg(ws);
                b.arg(counters);
            }
            // SAFETY: the arguments match `dz_<v>_matmul_add_<t>_m<MT>(DzDelta, const T*, const T*, T*,
            // u32)` (and the tensor-core `dz_tc_<v>_matmul_add_<t>_n<NT>`, same signature; the v4
            // entries take one more u32, the split: 1, 2, 4 or 8; the v4 `matmul_sx` entries take none,
            // their grid-stride loop covering ceil(m / 32) x ceil(tiles / 8) blocks, and `matmul_sxk<S>`
            // takes S times those blocks and two more pointers, its workspace of
            // `v4_matmul_sxk_workspace` bytes with the counters zeroed, alive until the stream frees it
            // after the launch): x holds m rows of
            // K elements of T, base (0, or m x N_total) and out (m x N_total) are T buffers, and the
            // descriptor points to the delta's parts (the v4 parts for a v4 kernel), checked by
            // `describe`. The `matmul_sxd` entries get the dynamic shared memory they need
            // (`v4_matmul_sxd_smem`, allowed on the function above; they trap with less). The
            // `matmul_sxq_<t>_n4` entries take matmul_sx's arguments on ceil(m / 32) x ceil(tiles / 16)
            // blocks; the `matmul_sx_<t>_n8`, `matmul_sxb_<t>_n4` and `matmul_sxp[2]_<t>_n4` entries take
            // matmul_sxk's arguments on the partition's grid, with its workspace of
            // `v4_matmul_sxb_workspace` bytes (the counters zeroed) and their double-buffered x
            // (`V4_MATMUL_SX64_SMEM` / `V4_MATMUL_SXB_SMEM`, allowed above).
            let mut cfg = kernel.config(grid);
            cfg.shared_mem_bytes = sx.map_or(0, |(_, _, smem, ..)| smem);
            unsafe { b.launch(cfg) }.w()?;
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// An sbmm batch planned for the CUDA kernels ([`sbmm_prepare`]): the segment and descriptor table on the
/// device and the launches over it. It holds raw device pointers to the deltas' parts (in the table) but
/// no reference to the deltas: whoever holds it keeps them alive (the plain `sbmm` borrows them for the
/// call; `SbmmPlan` holds clones).
pub(crate) struct SbmmLaunches {
    /// The kernels' input dtype.
    dtype: DType,
    /// The device the table lives on and the kernels were loaded for.
    device: CudaDevice,
    /// The segments (16 bytes each), then the descriptors; `None` when nothing launches (base-only or
    /// empty segments, `zero` deltas, no rows).
    table: Option<CudaSlice<u8>>,
    /// Byte offset of the descriptors in `table`.
    descs_offset: u64,
    launches: Vec<SbmmLaunch>,
    /// The rows the segments cover.
    m: usize,
    k32: u32,
    n32: u32,
}

impl SbmmLaunches {
    /// The kernel launches of one run.
    pub(crate) fn len(&self) -> usize {
        self.launches.len()
    }
}

/// One launch of an [`SbmmLaunches`].
struct SbmmLaunch {
    kernel: Kernel,
    func: CudaFunction,
    grid: (u32, u32),
    /// Byte offset of its first segment in the table.
    segs_offset: u64,
    /// Its segments.
    count: u32,
    /// The v4 kernels' extra arguments: the 16-row tiles of the group's tallest delta, and the split
    /// (`None` for the shared-memory entries, which take `tiles` only).
    v4: Option<(u32, Option<u32>)>,
    /// Dynamic shared memory bytes a block (the per-warp ring entries; 0 for the others).
    smem: u32,
}

/// Plans `sbmm` over `m` rows of `dtype` on `dev` (`kn`: the deltas' `(K, N_total)`): locks and describes
/// each distinct delta once, groups the segments by kernel variant, picks each group's kernel, tile, split
/// and grid, and uploads the segment and descriptor table (one copy). The deltas and segments were checked
/// by the caller (segments cover `0..m`, every delta of one shape, on `dev`).
///
/// The kernels are picked under the settings of this moment ([`crate::set_tensor_cores`],
/// [`crate::set_v4_kernels`], [`crate::set_v4_split`], [`crate::set_v4_sbmm_smem_x`]).
pub(crate) fn sbmm_prepare(
    op: &'static str,
    deltas: &[&DeviceDelta],
    segments: &[Segment],
    m: usize,
    kn: (usize, usize),
    dtype: DType,
    dev: &CudaDevice,
) -> candle_core::Result<SbmmLaunches> {
    by_dtype!(
        op,
        "x",
        dtype,
        sbmm_prepare_t(op, deltas, segments, m, kn, dtype, dev)
    )
}

/// Forward pass of `sbmm` over a plan: `out = base_out`, then the planned launches. `x` holds the plan's
/// `m` rows of `K` and `base_out` `m` rows of `N_total`, in the plan's dtype (checked by the wrapper; the
/// storages' kind, dtype and contiguity again here).
pub(crate) fn sbmm_run(
    op: &'static str,
    plan: &SbmmLaunches,
    x: Arg<'_>,
    base: Arg<'_>,
    fill: Fill,
) -> Out {
    if x.0.dtype() != plan.dtype {
        return Err(OpError::Dtype {
            op,
            arg: "x",
            got: x.0.dtype(),
            expected: format!("{:?} (the dtype the sbmm was planned for)", plan.dtype),
        }
        .into());
    }
    if x.0.device().id() != plan.device.id() {
        return Err(OpError::Storage {
            op,
            reason: "x is on another CUDA device than the one the sbmm was planned on".into(),
        }
        .into());
    }
    by_dtype!(op, "x", plan.dtype, sbmm_run_t(op, plan, x, base, fill))
}

/// The segments of one launch.
struct Group {
    variant: Variant,
    /// The tensor-core entries, when every delta of the group qualifies.
    tc: Option<&'static TcEntries>,
    /// The v4 entries, when every delta of the group has a v4 layout.
    v4: Option<&'static V4Entries>,
    /// Whether a delta of the group keeps only its v4 layout: then the group takes the v4 kernels
    /// whatever its segments' rows (and every delta of the group has the v4 layout: groups are keyed by
    /// variant and whether the v4 kernels can run).
    v4_only: bool,
    /// `(start, len, descriptor slot)` of each segment.
    segments: Vec<(u32, u32, u32)>,
    /// Largest stored-row count among its deltas.
    max_stored: u32,
    /// Smallest stored-row count among its deltas (the shared-memory sbmm wants them all equal).
    min_stored: u32,
}

fn sbmm_prepare_t<T: Elem>(
    op: &'static str,
    deltas: &[&DeviceDelta],
    segments: &[Segment],
    m: usize,
    (k, n): (usize, usize),
    dtype: DType,
    dev: &CudaDevice,
) -> candle_core::Result<SbmmLaunches> {
    let (m32, k32, n32) = (
        dim(op, "x", m, &[m, k])?,
        dim(op, "x", k, &[m, k])?,
        dim(op, "base_out", n, &[m, n])?,
    );
    let mut plan = SbmmLaunches {
        dtype,
        device: dev.clone(),
        table: None,
        descs_offset: 0,
        launches: Vec::new(),
        m,
        k32,
        n32,
    };

    // Each distinct delta is locked and described once (a delta listed twice, or two clones sharing their
    // tensors, would otherwise take the same read lock twice). `zero` deltas have no parts and no slot.
    let mut slot_of: Vec<Option<usize>> = Vec::with_capacity(deltas.len());
    let mut unique: Vec<&DeviceDelta> = Vec::new();
    for d in deltas {
        let key = d.buffer_id();
        slot_of.push(key.map(|key| {
            unique
                .iter()
                .position(|u| u.buffer_id() == Some(key))
                .unwrap_or_else(|| {
                    unique.push(d);
                    unique.len() - 1
                })
        }));
    }
    // The read locks are held while the parts' device pointers are taken, not until the launches: the
    // pointers stay valid while the deltas live (a storage's buffer is never replaced, in-place writes
    // reuse it; a delta's tensors are private and never written after it is built), which the plan's
    // holder guarantees; the parts were written before the delta was built (an upload completed, or
    // queued earlier on the device's stream), and their buffers are freed on that one stream of their
    // device (`describe` checks it is `dev`), so launches queued on it run after the writes and before
    // the free.
    let describe_span = crate::trace::span("sbmm prepare: lock and describe the deltas");
    let locks: Vec<Locked<'_>> = unique.iter().map(|d| Locked::new(d)).collect();
    let stream = dev.cuda_stream();
    let mut ptrs = Ptrs::new(&stream);
    let described = locks
        .iter()
        .map(|l| describe(op, l, dev, &mut ptrs))
        .collect::<Result<Vec<_>>>()?;
    drop(describe_span);

    let group_span = crate::trace::span("sbmm prepare: group the segments");
    let mut groups: Vec<Group> = Vec::new();
    for s in segments {
        let Some(slot) = s.delta.and_then(|d| slot_of.get(d).copied().flatten()) else {
            continue;
        };
        let Some(d) = described[slot] else { continue };
        if s.len == 0 {
            continue;
        }
        let v4_only = unique[slot].v4_only();
        let v4 = if v4_only {
            Some(v4_only_entries(op, unique[slot], &d, T::KIND)?)
        } else {
            v4_of(&d, T::KIND)
        };
        let at = match groups
            .iter()
            .position(|g| g.variant == d.variant && g.v4.is_some() == v4.is_some())
        {
            Some(at) => at,
            None => {
                groups.push(Group {
                    variant: d.variant,
                    tc: tc_of(&d, T::KIND),
                    v4,
                    v4_only: false,
                    segments: Vec::new(),
                    max_stored: 0,
                    min_stored: u32::MAX,
                });
                groups.len() - 1
            }
        };
        let g = &mut groups[at];
        if tc_of(&d, T::KIND).is_none() {
            g.tc = None;
        }
        g.v4_only |= v4_only;
        // Segments lie inside 0..m (checked by the wrapper), so they fit u32 like m.
        g.segments.push((s.start as u32, s.len as u32, slot as u32));
        g.max_stored = g.max_stored.max(d.desc.n_stored);
        g.min_stored = g.min_stored.min(d.desc.n_stored);
    }
    if groups.is_empty() || m32 == 0 {
        return Ok(plan);
    }

    // Per group: the tile (one row when every segment is one row: decode), the segments split into
    // runs of at most the tile's rows, all groups' runs in one array.
    let mut pieces: Vec<DzSegment> = Vec::new();
    let mut launches: Vec<(Kernel, usize, u32, u32, u32)> = Vec::new();
    // Per descriptor slot: whether its group launches a v4 kernel (then the slot gets the v4
    // descriptor; a slot's delta belongs to one group).
    let mut slot_v4 = vec![false; described.len()];
    for g in &groups {
        let longest = g.segments.iter().map(|s| s.1).max().unwrap_or(1);
        let kernel = match (g.v4, g.v4_only) {
            (Some(e), true) => Kernel::v4_any_rows(e, longest),
            _ => Kernel::pick(g.variant, g.tc, g.v4, longest),
        };
        if matches!(kernel, Kernel::V4(..)) {
            for &(_, _, slot) in &g.segments {
                slot_v4[slot as usize] = true;
            }
        }
        let first = pieces.len();
        for &(start, len, slot) in &g.segments {
            let mut r = 0;
            while r < len {
                let take = (len - r).min(kernel.rows());
                pieces.push(DzSegment {
                    start: start + r,
                    len: take,
                    delta: slot,
                    reserved: 0,
                });
                r += take;
            }
        }
        let count = (pieces.len() - first) as u32;
        launches.push((kernel, first, count, g.max_stored, g.min_stored));
    }
    let descs: Vec<DzDelta> = described
        .iter()
        .zip(&slot_v4)
        .map(|(d, &v4)| match d {
            Some(d) if v4 => d.v4.unwrap_or(d.desc),
            Some(d) => d.desc,
            None => DzDelta::default(),
        })
        .collect();
    // One upload for both tables: the segments first (16 bytes each, so the descriptors after them stay
    // 16-byte aligned), then the descriptors.
    let pieces_bytes = std::mem::size_of_val(pieces.as_slice());
    let mut table = Vec::with_capacity(pieces_bytes + std::mem::size_of_val(descs.as_slice()));
    table.extend_from_slice(as_bytes(&pieces));
    table.extend_from_slice(as_bytes(&descs));
    drop(group_span);
    let upload_span = crate::trace::span("sbmm prepare: allocate and upload the table");
    plan.table = Some(stream.clone_htod(&table).w()?);
    plan.descs_offset = pieces_bytes as u64;
    drop(upload_span);
    let release_span = crate::trace::span("sbmm prepare: release the pointers' guards");
    drop(ptrs);
    drop(release_span);
    let _launch_span = crate::trace::span("sbmm prepare: kernels and grids");

    for (kernel, first, count, max_stored, min_stored) in launches {
        let tiles = max_stored.div_ceil(kernel.stored_rows());
        let per_item = sbmm_tiles_an_item(kernel, T::KIND);
        let items = u64::from(count) * u64::from(tiles.div_ceil(per_item));
        // v4: items (segment, tile) split over `split` warps each, 8 / split items a block (1-D grid).
        let v4 = match kernel {
            Kernel::V4(..) => {
                let resident = resident_warps(dev)?;
                Some(v4_sbmm_launch(v4_split(items, resident), items, resident))
            }
            _ => None,
        };
        let v4_split = v4.map(|(split, _)| split);
        // The shared-memory variants (experimental, off by default): the per-warp code ring (the 8-row
        // tile at split 1), else x in shared memory (split 1, whole blocks of 8 tiles of one segment,
        // every delta with the same stored rows).
        let sx = match kernel {
            Kernel::V4(e, rows) if v4_split == Some(1) && per_item == 1 => {
                v4_sbmm_shared::<T>(e, rows, tiles, min_stored == max_stored)
            }
            _ => None,
        };
        let (func, grid) = match (sx, v4) {
            // One item a warp, WARPS_V4 items a block (a whole number for the x variant).
            (Some((name, smem)), _) => (
                {
                    let f = dev
                        .get_or_load_custom_func(name, V4_MODULE, dz_kernels::v4_ptx())?
                        .into_cuda_function();
                    if smem > 0 {
                        allow_dynamic_smem(op, &f, smem)?;
                    }
                    f
                },
                (
                    items
                        .div_ceil(u64::from(WARPS_V4))
                        .min(u64::from(MAX_GRID_X)) as u32,
                    1,
                ),
            ),
            (None, Some((_, grid))) => (kernel.function(op, dev, T::KIND, Launch::Sbmm)?, grid),
            (None, None) => (
                kernel.function(op, dev, T::KIND, Launch::Sbmm)?,
                (tiles, count.min(MAX_GRID_Y)),
            ),
        };
        plan.launches.push(SbmmLaunch {
            kernel,
            func,
            grid,
            segs_offset: (first * std::mem::size_of::<DzSegment>()) as u64,
            count,
            v4: v4_split.map(|split| (tiles, sx.is_none().then_some(split))),
            smem: sx.map_or(0, |(_, smem)| smem),
        });
    }
    Ok(plan)
}

fn sbmm_run_t<T: Elem>(
    op: &'static str,
    plan: &SbmmLaunches,
    x: Arg<'_>,
    base: Arg<'_>,
    fill: Fill,
) -> Out {
    let dev = x.0.device().clone();
    let shape = Shape::from(base.1.dims());
    let (xs, x_off, x_len) = input::<T>(op, "x", x)?;
    let (bs, b_off, len) = input::<T>(op, "base_out", base)?;
    // The wrapper checked the shapes against the plan; the launches rely on these two.
    let (k, n) = (plan.k32 as usize, plan.n32 as usize);
    if !plan.launches.is_empty() && (x_len != plan.m * k || len != plan.m * n) {
        return Err(OpError::Storage {
            op,
            reason: format!(
                "x has {x_len} and base_out {len} elements, the plan takes {} rows of {k} and {n}",
                plan.m
            ),
        }
        .into());
    }
    let stream = dev.cuda_stream();
    let alloc_span = crate::trace::span("sbmm run: allocate the output, copy base_out");
    let mut out = alloc::<T>(&dev, len)?;
    {
        let mut ptrs = Ptrs::new(&stream);
        let x_p = ptrs.read(xs, x_off);
        let b_p = ptrs.read(bs, b_off);
        let out_p = ptrs.write(&mut out);
        poison::<T>(&stream, out_p, len, fill)?;
        init(&stream, out_p, Some(b_p), len * std::mem::size_of::<T>())?;
        drop(alloc_span);
        let _launch_span = crate::trace::span("sbmm run: launch");
        if let Some(table) = &plan.table {
            let table_p = ptrs.read(table, 0);
            let descs_p = table_p + plan.descs_offset;
            for l in &plan.launches {
                let args = SbmmArgs {
                    segs: table_p + l.segs_offset,
                    count: l.count,
                    descs: descs_p,
                    x: x_p,
                    out: out_p,
                    k: plan.k32,
                    n: plan.n32,
                    v4: l.v4,
                };
                // SAFETY: the arguments match `dz_<v>_sbmm_<t>_m<MT>(const DzSegment*, u32, const
                // DzDelta*, const T*, T*, u32, u32)` (the v4 entries take two more u32: `tiles`, the
                // 16-row tiles of the group's tallest delta, and `split`, 1, 2, 4 or 8 or a tail-split
                // word from `v4_sbmm_tail` whose grid `v4_sbmm_launch` gave, the x-direct
                // `_sbmm_xd_` / `_sbmm_xo_` entries the same; the shared-memory
                // v4 entries `tiles` only, a multiple of 8 with every delta of the launch holding that
                // many tiles of stored rows, checked by `sbmm_prepare`; the per-warp ring entries
                // `tiles` only, items past a delta's stored rows skipped as in the split entries): `count` segments of at most MT
                // rows inside the plan's m rows, each naming a descriptor of this variant in the plan's
                // table (the v4 descriptors for a v4 kernel), whose parts the plan's holder keeps alive
                // and whose writes precede these launches (see `sbmm_prepare_t`); x is m x K and out
                // m x N_total of T
                // (m, K and N_total the plan's, checked by the wrapper), and the table lives as long as
                // the plan, whose drop frees it on this stream, after these launches. The ring entries
                // get the dynamic shared memory they need (`v4_sbmm_ring_smem`, allowed on the function
                // when it was planned; they trap with less).
                let mut cfg = l.kernel.config(l.grid);
                cfg.shared_mem_bytes = l.smem;
                unsafe { launch_sbmm(&stream, &l.func, &args, cfg) }?;
            }
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// The arguments of an sbmm entry point (`dz_<v>_sbmm_<t>_m<MT>` and the v4 entries), in their order.
struct SbmmArgs {
    segs: u64,
    count: u32,
    descs: u64,
    x: u64,
    out: u64,
    k: u32,
    n: u32,
    /// The v4 entries' `tiles`, then `split` (the entries without a split take `tiles` only).
    v4: Option<(u32, Option<u32>)>,
}

/// Launches `func`, an sbmm entry point, with `args` on `stream`.
///
/// # Safety
/// `func` takes exactly `args`' arguments (`split` only when given), and they satisfy its contract: the
/// segment table's `count` pieces lie inside x's rows and name descriptors of the table at `descs` whose
/// parts outlive the launch, x and out hold rows x K and rows x N of the kernel's element type, and
/// `cfg` gives the entry the dynamic shared memory it needs.
unsafe fn launch_sbmm(
    stream: &Arc<CudaStream>,
    func: &CudaFunction,
    args: &SbmmArgs,
    cfg: LaunchConfig,
) -> candle_core::Result<()> {
    let mut b = stream.launch_builder(func);
    b.arg(&args.segs);
    b.arg(&args.count);
    b.arg(&args.descs);
    b.arg(&args.x);
    b.arg(&args.out);
    b.arg(&args.k);
    b.arg(&args.n);
    if let Some((tiles, split)) = &args.v4 {
        b.arg(tiles);
        if let Some(split) = split {
            b.arg(split);
        }
    }
    // SAFETY: the caller's contract above.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Warps of a v4 block.
const WARPS_V4: u32 = V4_THREADS / 32;

/// Most blocks of a 1-D grid.
const MAX_GRID_X: u32 = (1 << 31) - 1;

/// Warps the v4 kernels keep resident on the device: 2 blocks of 8 warps per SM (their launch bounds).
/// Read once per process (the lent machines have one kind of GPU).
/// Lets `func` take `bytes` of dynamic shared memory a block (past the default 48 KB limit), preferring
/// the largest shared-memory carveout (the v4 `matmul_sxd` entries: ~100 KB a block, two blocks an SM; the
/// v4 `sbmm_ring` entries: 35-68 KB a block).
/// Setting the attribute again costs a driver call, not a synchronization.
fn allow_dynamic_smem(op: &'static str, func: &CudaFunction, bytes: u32) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    let bad = |e| OpError::Storage {
        op,
        reason: format!("cannot allow {bytes} bytes of dynamic shared memory: {e}"),
    };
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .map_err(bad)?;
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        100,
    )
    .map_err(bad)
}

fn resident_warps(dev: &CudaDevice) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    static RESIDENT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if let Some(&r) = RESIDENT.get() {
        return Ok(r);
    }
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| OpError::Storage {
            op: "sbmm",
            reason: format!("cannot read the device's SM count: {e}"),
        })?;
    Ok(*RESIDENT.get_or_init(|| sms.max(1) as u64 * 2 * u64::from(WARPS_V4)))
}

/// The warps each item of a v4 launch (sbmm: segment x 16-row tile; matmul: 8, 16 or 32 input rows x
/// 16-row tile) is split over along K: what [`crate::set_v4_split`] set, else the largest of 8, 4, 2 that keeps
/// the launch within one wave of resident warps (`items * split <= resident`), or 1 when the items alone
/// fill it. Fewer warps per item means longer streams per warp (the load ring's prologue paid once per
/// item, no shared-memory reduction); more keeps a launch of few items from leaving SMs idle; past one
/// wave, the second, partial wave costs more than the longer streams save. Measured on the H200 (session
/// 11, `h200-s11-2026-11-30.md`): single deltas of 256 / 320 / 688 / 864 tiles ran fastest at split
/// 8 / 4 / 2 / 2, the choice of this rule (13824 x 5120 4b 2:4, one row: 15.4 us at split 2, 17.6 at
/// split 4, which session 10's "fewest splits that fill a wave" picked); sbmm launches of 4096 and more
/// items at split 1.
fn v4_split(items: u64, resident: u64) -> u32 {
    match crate::v4_split_setting() {
        0 => [8u32, 4, 2]
            .into_iter()
            .find(|&s| items * u64::from(s) <= resident)
            .unwrap_or(1),
        s => s,
    }
}

/// The split ([`v4_split`]) and the 1-D grid of a v4 launch over `items` items: `8 / split` items a
/// block, at most [`MAX_GRID_X`] blocks (the kernels stride over the rest).
fn v4_launch(items: u64, resident: u64) -> (u32, (u32, u32)) {
    let split = v4_split(items, resident);
    let blocks = items.div_ceil(u64::from(WARPS_V4 / split));
    (split, (blocks.min(u64::from(MAX_GRID_X)) as u32, 1))
}

/// The split word ([`v4_sbmm_tail`]'s, or a plain split) and the 1-D grid of a v4 sbmm launch over
/// `items` items, `all_items` with the slots a slot-table launch carries without a delta here (the grid
/// covers them; the split follows `items`, as the plain op's): [`v4_launch`]'s, or with
/// [`crate::set_v4_sbmm_tail_split`] the launch that splits only the last, partial wave's items along K.
fn v4_sbmm_launch(split: u32, all_items: u64, resident: u64) -> (u32, (u32, u32)) {
    let tail = crate::v4_sbmm_tail_split()
        .then(|| v4_sbmm_tail(all_items, resident, split))
        .flatten()
        .filter(|t| t.blocks <= u64::from(MAX_GRID_X));
    match tail {
        Some(t) => (t.word, (t.blocks as u32, 1)),
        None => (
            split,
            (
                all_items
                    .div_ceil(u64::from(WARPS_V4 / split))
                    .min(u64::from(MAX_GRID_X)) as u32,
                1,
            ),
        ),
    }
}

/// The v4 sbmm entry (the `sbmm` signature and split) a launch of the `rows`-row tile runs: the pair
/// decode tile ([`crate::set_v4_sbmm_pair`], the default; with its L2 prefetch where
/// [`crate::set_v4_sbmm_prefetch`] turned it on) or an x-direct one
/// ([`crate::set_v4_sbmm_x_direct`]) where turned on and applicable (segments of at most 8 rows), else
/// the plain tile.
fn v4_sbmm_entry(e: &V4Entries, dtype: dz_kernels::Dtype, rows: u32) -> Option<&'static str> {
    crate::v4_sbmm_pair_active()
        .then(|| match crate::v4_sbmm_prefetch() {
            0 => e.sbmm_pair(dtype, rows),
            blocks => e.sbmm_pair_prefetch(dtype, rows, blocks),
        })
        .flatten()
        .or_else(|| match crate::v4_sbmm_x_direct() {
            crate::V4XDirect::Off => None,
            crate::V4XDirect::Deep => e.sbmm_xd(dtype, rows),
            crate::V4XDirect::Occupancy => e.sbmm_xo(dtype, rows),
        })
        .or_else(|| e.sbmm(dtype, rows))
}

/// The 16-row tiles of a segment each item of an sbmm launch of `kernel` takes: 2 for the pair decode
/// tile ([`v4_sbmm_entry`]), else 1. The launch has `ceil(tiles / this)` items a segment.
fn sbmm_tiles_an_item(kernel: Kernel, dtype: dz_kernels::Dtype) -> u32 {
    match kernel {
        Kernel::V4(e, rows)
            if crate::v4_sbmm_pair_active() && e.sbmm_pair(dtype, rows).is_some() =>
        {
            dz_kernels::v4::V4_SBMM_PAIR_TILES
        }
        _ => 1,
    }
}

/// The shared-memory v4 sbmm entry for a launch at split 1 of the `rows`-row tile, with its dynamic shared
/// memory bytes, if one is turned on and applies: the per-warp code ring ([`crate::set_v4_sbmm_ring`]) for
/// the 8-row tile, else x in shared memory ([`crate::set_v4_sbmm_smem_x`]) when `tiles` is a multiple of 8
/// and every delta of the launch has the same stored rows (`same_stored`). Both take `tiles` and no split.
fn v4_sbmm_shared<T: Elem>(
    e: &'static V4Entries,
    rows: u32,
    tiles: u32,
    same_stored: bool,
) -> Option<(&'static str, u32)> {
    let ring = crate::v4_sbmm_ring()
        .then(|| {
            let smem = e.sbmm_ring_smem()?;
            e.sbmm_ring(T::KIND, rows).map(|name| (name, smem))
        })
        .flatten();
    ring.or_else(|| {
        (crate::v4_sbmm_smem_x() && tiles.is_multiple_of(WARPS_V4) && same_stored)
            .then(|| e.sbmm_sx(T::KIND, rows).map(|name| (name, 0)))
            .flatten()
    })
}

/// Most rows per segment for which a delta that has both layouts takes the v4 kernels rather than the
/// tensor-core v3 ones: the crossover measured on an H200 (session 7, `kernels-h200-v4-2026-11-29.md`):
/// v4 is faster at 1-4 rows (4096 x 4096 4b 2:4, one row: 9.1 vs 13.4 us; sbmm 32 deltas x 1 row:
/// 124 vs 187 us), about even at 4 (sbmm 64 x 4: 389 vs 371 us) and slower at 8-16 (16 rows: 27.0 vs
/// 20.1 us; sbmm 32 x 8: 331 vs 212 us).
const V4_OVER_V3_ROWS: u32 = 4;

/// The kernel of one matmul or sbmm launch: the tensor cores' where the delta qualifies, else the generic
/// family's.
#[derive(Clone, Copy)]
enum Kernel {
    Generic(Variant, Tile),
    Tc(&'static TcEntries, TcTile),
    /// The v4 entries and the tile's input rows (8 or 16; a matmul also 32, [`Kernel::pick_matmul`]).
    V4(&'static V4Entries, u32),
}

/// Which entry point of a kernel.
#[derive(Clone, Copy)]
enum Launch {
    Matmul,
    Sbmm,
}

impl Kernel {
    /// The kernel for segments of at most `longest` rows: v4 with `v4` up to 16 rows, or up to
    /// [`V4_OVER_V3_ROWS`] when the tensor-core kernels can run too (`tc`: the delta kept its packed
    /// parts); else tensor cores with `tc`, else the generic one-row tile when every segment has one row
    /// (decode), the larger tile otherwise.
    fn pick(
        variant: Variant,
        tc: Option<&'static TcEntries>,
        v4: Option<&'static V4Entries>,
        longest: u32,
    ) -> Kernel {
        match (v4, tc) {
            (Some(e), None) if longest <= V4_MAX_ROWS => Kernel::V4(e, v4_tile_rows(longest)),
            (Some(e), Some(_)) if longest <= V4_OVER_V3_ROWS => {
                Kernel::V4(e, v4_tile_rows(longest))
            }
            (_, Some(e)) => Kernel::Tc(e, TcTile::for_rows(longest as usize)),
            _ if longest <= 1 => Kernel::Generic(variant, Tile::Small),
            _ => Kernel::Generic(variant, Tile::Large),
        }
    }

    /// The v4 kernel for a delta that keeps only its v4 layout, whatever the rows: more than 16 rows run
    /// as 16-row tiles (the matmul entry loops over them; sbmm splits segments into runs).
    fn v4_any_rows(e: &'static V4Entries, longest: u32) -> Kernel {
        Kernel::V4(e, v4_tile_rows(longest.min(V4_MAX_ROWS)))
    }

    /// The kernel of a `delta_matmul` of `m` input rows: from `wide_from` rows
    /// ([`crate::v4_wide_from`]: past 16, or from 9 on the largest shapes), the v4 32-row tile where
    /// the v4 kernels run for the delta and [`crate::set_v4_wide_tiles`] allows it (predicted to beat
    /// the tensor-core v3 kernels there: one decode of the codes per 32 rows instead of v3's decode per
    /// 32-row tile at a third of the bytes per instruction, see bench/kernels/V4.md, "32-row tile");
    /// else [`Kernel::pick`], as sbmm.
    fn pick_matmul(
        variant: Variant,
        tc: Option<&'static TcEntries>,
        v4: Option<&'static V4Entries>,
        m: u32,
        wide_from: u32,
    ) -> Kernel {
        match v4 {
            Some(e) if m >= wide_from && crate::v4_wide_tiles() => Kernel::V4(e, V4_WIDE_ROWS),
            _ => Kernel::pick(variant, tc, v4, m),
        }
    }

    /// [`Kernel::v4_any_rows`] for a `delta_matmul` of `m` rows: the 32-row tile from `wide_from` rows
    /// unless [`crate::set_v4_wide_tiles`] turned it off.
    fn v4_matmul_any_rows(e: &'static V4Entries, m: u32, wide_from: u32) -> Kernel {
        if !crate::v4_wide_tiles() {
            Kernel::v4_any_rows(e, m)
        } else if m >= wide_from {
            Kernel::V4(e, V4_WIDE_ROWS)
        } else {
            Kernel::V4(e, v4_matmul_tile_rows(m))
        }
    }

    /// The descriptor this kernel reads: the v4 layout's for a v4 kernel.
    fn desc(self, d: &Described) -> DzDelta {
        match self {
            Kernel::V4(..) => d.v4.unwrap_or(d.desc),
            _ => d.desc,
        }
    }

    /// The launch configuration of a grid (v4 blocks have 8 warps).
    fn config(self, grid: (u32, u32)) -> LaunchConfig {
        match self {
            Kernel::V4(..) => config_threads(grid, V4_THREADS),
            _ => config(grid),
        }
    }

    /// The entry point for inputs of `dtype` (each family's PTX module is loaded once per device).
    fn function(
        self,
        op: &'static str,
        dev: &CudaDevice,
        dtype: dz_kernels::Dtype,
        launch: Launch,
    ) -> candle_core::Result<CudaFunction> {
        match self {
            Kernel::Generic(variant, tile) => {
                let e = entries(op, variant)?;
                let name = match launch {
                    Launch::Matmul => e.matmul_add(dtype, tile),
                    Launch::Sbmm => e.sbmm(dtype, tile),
                };
                function(dev, variant, name)
            }
            Kernel::Tc(e, tile) => {
                let name = match launch {
                    Launch::Matmul => e.matmul_add(dtype, tile),
                    Launch::Sbmm => e.sbmm(dtype, tile),
                }
                .ok_or_else(|| OpError::Storage {
                    op,
                    reason: format!("no tensor-core kernels for {dtype:?} inputs"),
                })?;
                Ok(dev
                    .get_or_load_custom_func(name, TC_MODULE, dz_kernels::tc_ptx())?
                    .into_cuda_function())
            }
            Kernel::V4(e, rows) => {
                let name = match launch {
                    Launch::Matmul => e.matmul_add(dtype, rows),
                    Launch::Sbmm => v4_sbmm_entry(e, dtype, rows),
                }
                .ok_or_else(|| OpError::Storage {
                    op,
                    reason: format!("no v4 kernels for {dtype:?} inputs"),
                })?;
                Ok(dev
                    .get_or_load_custom_func(name, V4_MODULE, dz_kernels::v4_ptx())?
                    .into_cuda_function())
            }
        }
    }

    /// Most input rows of one segment.
    fn rows(self) -> u32 {
        match self {
            Kernel::Generic(_, t) => t.rows(),
            Kernel::Tc(_, t) => t.rows(),
            Kernel::V4(_, rows) => rows,
        }
    }

    /// Stored rows of a delta per block.
    fn stored_rows(self) -> u32 {
        match self {
            Kernel::Generic(..) => ROWS_PER_BLOCK,
            Kernel::Tc(_, t) => t.stored_rows(),
            Kernel::V4(..) => V4_TILE_ROWS,
        }
    }
}

/// Forward pass of `dequantize` (`base` None: the dense delta in `dtype`; `anchor` only picks the device)
/// and of `merge` (`base` = the layout of `anchor`, which is `base_w`; `dtype` is not read).
pub(crate) fn dequantize(
    op: &'static str,
    delta: &DeviceDelta,
    anchor: &CudaStorage,
    base: Option<&Layout>,
    fill: Fill,
    dtype: DType,
) -> Out {
    let dev = anchor.device().clone();
    match base {
        None => {
            let shape = Shape::from(delta.dims());
            by_dtype!(
                op,
                "dtype",
                dtype,
                rows_t(op, delta, &dev, None, None, shape, fill)
            )
        }
        Some(l) => {
            let shape = Shape::from(l.dims());
            by_dtype!(
                op,
                "base_w",
                anchor.dtype(),
                rows_t(op, delta, &dev, Some((anchor, l)), None, shape, fill)
            )
        }
    }
}

/// The token ids of an embedding launch.
#[derive(Clone, Copy)]
enum Ids<'a> {
    /// Read back and checked on the host ([`host_ids`]); uploaded for the launch.
    Host(&'a [u32]),
    /// u32 ids on the device, `len` of them from element `offset`, not checked (the kernel adds nothing
    /// for an id past the stored rows).
    Device {
        slice: &'a CudaSlice<u32>,
        offset: usize,
        len: usize,
    },
}

impl Ids<'_> {
    fn len(&self) -> usize {
        match self {
            Ids::Host(ids) => ids.len(),
            Ids::Device { len, .. } => *len,
        }
    }
}

/// Forward pass of `embedding-delta-add` (`checked`: the ids read back and checked on the host; else u32
/// ids go to the kernel from the device, without a synchronization).
pub(crate) fn embedding(
    op: &'static str,
    delta: &DeviceDelta,
    ids: Arg<'_>,
    base: Arg<'_>,
    fill: Fill,
    checked: bool,
) -> Out {
    let dev = base.0.device().clone();
    let shape = Shape::from(base.1.dims());
    let host;
    let ids = match (checked, ids.0.dtype()) {
        (false, DType::U32) => {
            let (s, l) = ids;
            let (a, b) = ids_range(op, l)?;
            let slice = s.as_cuda_slice::<u32>().map_err(|e| OpError::Storage {
                op,
                reason: format!("the ids: {e}"),
            })?;
            Ids::Device {
                slice,
                offset: a,
                len: b - a,
            }
        }
        _ => {
            host = host_ids(op, delta, ids)?;
            Ids::Host(&host)
        }
    };
    by_dtype!(
        op,
        "base_emb_out",
        base.0.dtype(),
        rows_t(op, delta, &dev, Some(base), Some(ids), shape, fill)
    )
}

/// Forward pass of `norm-delta-add` (`dz_rows_norm_delta_add_<t>`): `(width, per, eps)` checked by the
/// op (`per` input rows a table row).
pub(crate) fn norm_delta_add(
    op: &'static str,
    x: Arg<'_>,
    base: Arg<'_>,
    deltas: Arg<'_>,
    dims: (usize, usize, f32),
) -> Out {
    by_dtype!(
        op,
        "x",
        x.0.dtype(),
        norm_delta_add_t(op, x, base, deltas, dims)
    )
}

fn norm_delta_add_t<T: Elem>(
    op: &'static str,
    x: Arg<'_>,
    base: Arg<'_>,
    deltas: Arg<'_>,
    (width, per, eps): (usize, usize, f32),
) -> Out {
    let dev = x.0.device().clone();
    let shape = Shape::from(base.1.dims());
    let (xs, x_off, x_len) = input::<T>(op, "x", x)?;
    let (bs, b_off, _) = input::<T>(op, "base_out", base)?;
    let (ds, d_off, _) = input::<T>(op, "deltas", deltas)?;
    let rows = x_len / width.max(1);
    let mut out = alloc::<T>(&dev, x_len)?;
    if rows > 0 {
        let stream = dev.cuda_stream();
        let name = dz_kernels::rows::norm_delta_add(T::KIND);
        let func = dev
            .get_or_load_custom_func(name, dz_kernels::rows::ROWS_MODULE, dz_kernels::rows_ptx())?
            .into_cuda_function();
        let grid = u32::try_from(rows).map_err(|_| OpError::Storage {
            op,
            reason: format!("{rows} rows exceed one launch's grid"),
        })?;
        let (w32, per32) = (
            dim(op, "x", width, x.1.dims())?,
            dim(op, "deltas", per, deltas.1.dims())?,
        );
        let mut ptrs = Ptrs::new(&stream);
        let (x_p, b_p, d_p) = (
            ptrs.read(xs, x_off),
            ptrs.read(bs, b_off),
            ptrs.read(ds, d_off),
        );
        let out_p = ptrs.write(&mut out);
        let mut b = stream.launch_builder(&func);
        b.arg(&x_p);
        b.arg(&b_p);
        b.arg(&d_p);
        b.arg(&out_p);
        b.arg(&w32);
        b.arg(&per32);
        b.arg(&eps);
        // SAFETY: the arguments match `dz_rows_norm_delta_add_<t>(const T* x, const T* base, const T* d,
        // T* out, u32 width, u32 per, f32 eps)`: x, base and out hold `rows x width` elements of T, d
        // `rows / per x width` (checked by the op), one block a row.
        unsafe { b.launch(config_threads((grid, 1), dz_kernels::rows::ROWS_THREADS)) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// The element range of contiguous ids.
fn ids_range(op: &'static str, l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| OpError::NotContiguous {
            op,
            arg: "ids",
            shape: l.dims().to_vec(),
            stride: l.stride().to_vec(),
        })
}

/// The ids as u32 row numbers on the host, each checked `< N_total` (the CPU path's check and error).
fn host_ids(op: &'static str, delta: &DeviceDelta, (s, l): Arg<'_>) -> Result<Vec<u32>> {
    let (a, b) = ids_range(op, l)?;
    let n = delta.dims().0;
    let check = |position: usize, id: i64| -> Result<u32> {
        usize::try_from(id)
            .ok()
            .filter(|&r| r < n)
            .and_then(|r| u32::try_from(r).ok())
            .ok_or_else(|| OpError::IdOutOfRange {
                op,
                id,
                position,
                rows: n,
                delta: delta.name().to_string(),
            })
    };
    if a == b {
        return Ok(Vec::new());
    }
    let stream = s.device.cuda_stream();
    let storage = |e: candle_core::Error| OpError::Storage {
        op,
        reason: format!("reading the ids: {e}"),
    };
    match s.dtype() {
        DType::U32 => {
            let v = s.as_cuda_slice::<u32>().map_err(storage)?;
            let v = stream.clone_dtoh(&v.slice(a..b)).w().map_err(storage)?;
            v.iter()
                .enumerate()
                .map(|(i, &id)| check(i, i64::from(id)))
                .collect()
        }
        DType::I64 => {
            let v = s.as_cuda_slice::<i64>().map_err(storage)?;
            let v = stream.clone_dtoh(&v.slice(a..b)).w().map_err(storage)?;
            v.iter().enumerate().map(|(i, &id)| check(i, id)).collect()
        }
        other => Err(OpError::Dtype {
            op,
            arg: "ids",
            got: other,
            expected: "u32 or i64".into(),
        }),
    }
}

/// `out[t] = base[t] + D[id(t)]` for every output row `t`: `id(t) = ids[t]` (embedding) or `t` (dequantize,
/// merge: all `N_total` rows). Every element is written.
/// `dequantize` / `merge` of a delta that keeps only its v4 layout (no row subset): the v4 dequantize
/// kernel over the re-laid bytes, one thread per lane of a packet.
fn v4_dequantize<T: Elem>(
    op: &'static str,
    delta: &DeviceDelta,
    dev: &CudaDevice,
    base: Option<Arg<'_>>,
    shape: Shape,
    fill: Fill,
) -> Out {
    let (n, k) = delta.dims();
    dim(op, "delta", n, shape.dims())?;
    dim(op, "delta", k, shape.dims())?;
    let len = n * k;
    let base = base.map(|b| input::<T>(op, "base", b)).transpose()?;
    let stream = dev.cuda_stream();
    let locked = Locked::new(delta);
    let mut out = alloc::<T>(dev, len)?;
    {
        let mut ptrs = Ptrs::new(&stream);
        let described = describe(op, &locked, dev, &mut ptrs)?;
        let base_p = base.map(|(s, o, _)| ptrs.read(s, o));
        let out_p = ptrs.write(&mut out);
        poison::<T>(&stream, out_p, len, fill)?;
        let (Some(d), Some(e)) = (
            described.as_ref().and_then(|d| d.v4),
            described.as_ref().and_then(|d| v4_entries(d.variant)),
        ) else {
            return Err(v4_only_error(op, delta).into());
        };
        if len > 0 {
            let func = dev
                .get_or_load_custom_func(e.dequantize(T::KIND), V4_MODULE, dz_kernels::v4_ptx())?
                .into_cuda_function();
            let threads = n.div_ceil(V4_TILE_ROWS as usize) * k.div_ceil(128) * 32;
            let blocks =
                u32::try_from(threads.div_ceil(V4_DEQUANTIZE_THREADS as usize)).map_err(|_| {
                    OpError::Storage {
                        op,
                        reason: format!("{n} x {k}: too many packets for one launch"),
                    }
                })?;
            let desc = DescArg(d);
            let base_arg = base_p.unwrap_or(0);
            let mut b = stream.launch_builder(&func);
            b.arg(&desc);
            b.arg(&base_arg);
            b.arg(&out_p);
            // SAFETY: the arguments match `dz_v4_<v>_dequantize_<t>(DzDelta, const T*, T*)`: the descriptor
            // holds the v4 parts (checked by `describe`), base (0 or N x K) and out (N x K) are T buffers;
            // every thread past the last packet returns.
            unsafe { b.launch(config_threads((blocks, 1), V4_DEQUANTIZE_THREADS)) }.w()?;
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
}

fn rows_t<T: Elem>(
    op: &'static str,
    delta: &DeviceDelta,
    dev: &CudaDevice,
    base: Option<Arg<'_>>,
    ids: Option<Ids<'_>>,
    shape: Shape,
    fill: Fill,
) -> Out {
    if delta.v4_only() {
        return match ids {
            None if delta.row_index().is_none() => {
                v4_dequantize::<T>(op, delta, dev, base, shape, fill)
            }
            _ => Err(v4_only_error(op, delta).into()),
        };
    }
    let (n, k) = delta.dims();
    let rows = ids.map_or(n, |i| i.len());
    let rows32 = dim(op, "ids", rows, shape.dims())?;
    let len = rows * k;
    let base = base.map(|b| input::<T>(op, "base", b)).transpose()?;
    let stream = dev.cuda_stream();
    let locked = Locked::new(delta);
    let ids_up = match ids {
        Some(Ids::Host(ids)) if !ids.is_empty() => Some(stream.clone_htod(ids).w()?),
        _ => None,
    };
    let mut out = alloc::<T>(dev, len)?;
    {
        let mut ptrs = Ptrs::new(&stream);
        let described = describe(op, &locked, dev, &mut ptrs)?;
        let base_p = base.map(|(s, o, _)| ptrs.read(s, o));
        let ids_p = match ids {
            Some(Ids::Device { slice, offset, len }) if len > 0 => Some(ptrs.read(slice, offset)),
            _ => ids_up.as_ref().map(|s| ptrs.read(s, 0)),
        };
        let out_p = ptrs.write(&mut out);
        poison::<T>(&stream, out_p, len, fill)?;
        match described {
            // `zero`: the output is the base (or zeros).
            None => init(&stream, out_p, base_p, len * std::mem::size_of::<T>())?,
            Some(d) if rows > 0 => {
                let e = entries(op, d.variant)?;
                let desc = DescArg(d.desc);
                let base_arg = base_p.unwrap_or(0);
                let grid = (rows32.div_ceil(WARPS).min(MAX_GRID_Y), 1);
                match ids_p {
                    None => {
                        let func = function(dev, d.variant, e.dequantize(T::KIND))?;
                        let mut b = stream.launch_builder(&func);
                        b.arg(&desc);
                        b.arg(&base_arg);
                        b.arg(&out_p);
                        // SAFETY: the arguments match `dz_<v>_dequantize_<t>(DzDelta, const T*, T*)`: base (0
                        // or N_total x K) and out (N_total x K) are T buffers; the descriptor is checked.
                        unsafe { b.launch(config(grid)) }.w()?;
                    }
                    Some(ids_p) => {
                        let func = function(dev, d.variant, e.embedding_add(T::KIND))?;
                        let mut b = stream.launch_builder(&func);
                        b.arg(&desc);
                        b.arg(&ids_p);
                        b.arg(&rows32);
                        b.arg(&base_arg);
                        b.arg(&out_p);
                        // SAFETY: the arguments match `dz_<v>_embedding_add_<t>(DzDelta, const u32*, u32,
                        // const T*, T*)`: `rows` ids (each < N_total checked on the host, or unchecked
                        // device ids: the kernel looks each up with `stored_row`, which yields no row
                        // past the stored ones, so none is read out of bounds), base and out are rows x
                        // K buffers of T; the descriptor is checked.
                        unsafe { b.launch(config(grid)) }.w()?;
                    }
                }
            }
            Some(_) => {}
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
}

/// One layer's descriptor tables by fine-tune slot ([`crate::SlotDeltas`]): every slot's descriptor
/// (the default one, with no stored rows, for a slot without a delta or with a `zero` delta), then every
/// slot's v4 descriptor (the packed one where a delta has no v4 layout), in one upload. It holds raw
/// device pointers to the deltas' parts but no reference to the deltas: the `SlotDeltas` that owns it
/// holds them, and drops it whenever a delta changes.
pub(crate) struct SlotDescs {
    device: CudaDevice,
    /// Per slot: the delta described (`None`: no delta, or `zero`).
    described: Vec<Option<Described>>,
    /// The packed descriptors, then (at `v4_offset`) the v4 ones; `None` when no slot has a delta.
    table: Option<CudaSlice<u8>>,
    v4_offset: u64,
    /// The entry points met so far, by name (each `get_or_load_custom_func` is a driver call).
    funcs: std::sync::Mutex<Vec<(&'static str, CudaFunction)>>,
}

/// One pass's segments split into pieces of at most `rows` rows (a kernel tile), uploaded: the runs of
/// every slot, those whose slot has no delta in a layer included (the v4 kernels skip them).
pub(crate) struct SlotPieces {
    table: CudaSlice<u8>,
    count: u32,
}

/// What one slot-table sbmm launches: the plain op's kernel, tile, split and grid for the same deltas
/// and segments, over the shared pieces and the layer's descriptors.
pub(crate) struct SlotLaunch {
    dtype: DType,
    device: CudaDevice,
    m: usize,
    k32: u32,
    n32: u32,
    /// `None` when nothing launches (no slot of the pass has a delta here, or no rows).
    launch: Option<SlotKernel>,
}

struct SlotKernel {
    descs: Arc<SlotDescs>,
    pieces: Arc<SlotPieces>,
    /// Byte offset of the descriptors this kernel reads (the v4 ones for a v4 kernel).
    descs_offset: u64,
    kernel: Kernel,
    func: CudaFunction,
    grid: (u32, u32),
    /// As [`SbmmLaunch::v4`].
    v4: Option<(u32, Option<u32>)>,
    /// As [`SbmmLaunch::smem`].
    smem: u32,
}

/// Describes every slot's delta (each distinct delta locked once, as [`sbmm_prepare_t`]) and uploads
/// the descriptor tables.
pub(crate) fn slot_descs(
    op: &'static str,
    deltas: &[Option<DeviceDelta>],
    dev: &CudaDevice,
) -> candle_core::Result<SlotDescs> {
    let mut unique: Vec<&DeviceDelta> = Vec::new();
    let slot_of: Vec<Option<usize>> = deltas
        .iter()
        .map(|d| {
            let d = d.as_ref()?;
            let key = d.buffer_id()?;
            Some(
                unique
                    .iter()
                    .position(|u| u.buffer_id() == Some(key))
                    .unwrap_or_else(|| {
                        unique.push(d);
                        unique.len() - 1
                    }),
            )
        })
        .collect();
    // As in `sbmm_prepare_t`: the read locks are held while the parts' pointers are taken; the holder of
    // the table (`SlotDeltas`) keeps the deltas alive, their parts were written before they were built,
    // and their buffers are freed on this device's one stream, after the launches queued on it.
    let locks: Vec<Locked<'_>> = unique.iter().map(|d| Locked::new(d)).collect();
    let stream = dev.cuda_stream();
    let mut ptrs = Ptrs::new(&stream);
    let described_unique = locks
        .iter()
        .map(|l| describe(op, l, dev, &mut ptrs))
        .collect::<Result<Vec<_>>>()?;
    let described: Vec<Option<Described>> = slot_of
        .iter()
        .map(|u| u.and_then(|u| described_unique[u]))
        .collect();
    let mut out = SlotDescs {
        device: dev.clone(),
        described,
        table: None,
        v4_offset: 0,
        funcs: std::sync::Mutex::new(Vec::new()),
    };
    if out.described.iter().any(Option::is_some) {
        let packed: Vec<DzDelta> = (out.described.iter())
            .map(|d| d.map(|d| d.desc).unwrap_or_default())
            .collect();
        let v4: Vec<DzDelta> = (out.described.iter())
            .map(|d| d.map(|d| d.v4.unwrap_or(d.desc)).unwrap_or_default())
            .collect();
        let mut table = Vec::with_capacity(2 * std::mem::size_of_val(packed.as_slice()));
        table.extend_from_slice(as_bytes(&packed));
        table.extend_from_slice(as_bytes(&v4));
        out.v4_offset = std::mem::size_of_val(packed.as_slice()) as u64;
        out.table = Some(stream.clone_htod(&table).w()?);
    }
    drop(ptrs);
    Ok(out)
}

impl SlotDescs {
    /// `kernel`'s sbmm entry point for `T` (`sx`: the shared-memory v4 entry and its dynamic shared
    /// memory bytes, allowed on the function), loaded once per table.
    fn function<T: Elem>(
        &self,
        op: &'static str,
        kernel: Kernel,
        sx: Option<(&'static str, u32)>,
    ) -> candle_core::Result<CudaFunction> {
        let name = match (sx, kernel) {
            (Some((name, _)), _) => name,
            (None, Kernel::Generic(variant, tile)) => entries(op, variant)?.sbmm(T::KIND, tile),
            (None, Kernel::Tc(e, tile)) => {
                e.sbmm(T::KIND, tile).ok_or_else(|| OpError::Storage {
                    op,
                    reason: format!("no tensor-core kernels for {:?} inputs", T::KIND),
                })?
            }
            (None, Kernel::V4(e, rows)) => {
                v4_sbmm_entry(e, T::KIND, rows).ok_or_else(|| OpError::Storage {
                    op,
                    reason: format!("no v4 kernels for {:?} inputs", T::KIND),
                })?
            }
        };
        let mut funcs = self.funcs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, f)) = funcs.iter().find(|(n, _)| std::ptr::eq(*n, name)) {
            return Ok(f.clone());
        }
        let f = match sx {
            Some((name, smem)) => {
                let f = self
                    .device
                    .get_or_load_custom_func(name, V4_MODULE, dz_kernels::v4_ptx())?
                    .into_cuda_function();
                if smem > 0 {
                    allow_dynamic_smem(op, &f, smem)?;
                }
                f
            }
            None => kernel.function(op, &self.device, T::KIND, Launch::Sbmm)?,
        };
        funcs.push((name, f.clone()));
        Ok(f)
    }
}

/// The pass's pieces at `rows` rows a piece (uploaded on first use).
fn slot_pieces(
    segments: &[Segment],
    cache: &std::sync::Mutex<Vec<(u32, Arc<SlotPieces>)>>,
    rows: u32,
    dev: &CudaDevice,
) -> candle_core::Result<Arc<SlotPieces>> {
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = cache.iter().find(|(r, _)| *r == rows) {
        return Ok(p.clone());
    }
    let mut pieces: Vec<DzSegment> = Vec::new();
    for s in segments {
        let Some(slot) = s.delta else { continue };
        // Rows and slots fit u32 (checked against m by the caller; slots index a table of u32 length).
        let (start, len) = (s.start as u32, s.len as u32);
        let mut r = 0;
        while r < len {
            let take = (len - r).min(rows);
            pieces.push(DzSegment {
                start: start + r,
                len: take,
                delta: slot as u32,
                reserved: 0,
            });
            r += take;
        }
    }
    let count = pieces.len() as u32;
    // One element at least: CUDA cannot allocate zero bytes (a launch of no pieces never happens).
    if pieces.is_empty() {
        pieces.push(DzSegment::default());
    }
    let table = dev.cuda_stream().clone_htod(as_bytes(&pieces)).w()?;
    let p = Arc::new(SlotPieces { table, count });
    cache.push((rows, p.clone()));
    Ok(p)
}

/// Plans one slot-table sbmm of `segments` (runs of slots; `stats` per distinct slot) over `descs` (of
/// `deltas`) for `m` rows of `K` and `N_total` in `dtype`, or `None` when the plain op over the same
/// deltas and segments would not make exactly one launch that the shared tables can express. The
/// choice of kernel, tile, split and grid is [`sbmm_prepare_t`]'s, over the slots with a delta here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn slot_launch(
    op: &'static str,
    segments: &[Segment],
    stats: &[crate::ops::SlotStat],
    pieces: &std::sync::Mutex<Vec<(u32, Arc<SlotPieces>)>>,
    descs: &Arc<SlotDescs>,
    deltas: &[Option<DeviceDelta>],
    mkn: (usize, usize, usize),
    dtype: DType,
    dev: &CudaDevice,
) -> candle_core::Result<Option<SlotLaunch>> {
    by_dtype!(
        op,
        "x",
        dtype,
        slot_launch_t(op, segments, stats, pieces, descs, deltas, mkn, dtype, dev)
    )
}

#[allow(clippy::too_many_arguments)]
fn slot_launch_t<T: Elem>(
    op: &'static str,
    segments: &[Segment],
    stats: &[crate::ops::SlotStat],
    pieces: &std::sync::Mutex<Vec<(u32, Arc<SlotPieces>)>>,
    descs: &Arc<SlotDescs>,
    deltas: &[Option<DeviceDelta>],
    (m, k, n): (usize, usize, usize),
    dtype: DType,
    dev: &CudaDevice,
) -> candle_core::Result<Option<SlotLaunch>> {
    if descs.device.id() != dev.id() {
        return Err(OpError::Storage {
            op,
            reason: "x is on another CUDA device than the layer's slot table".into(),
        }
        .into());
    }
    let (m32, k32, n32) = (
        dim(op, "x", m, &[m, k])?,
        dim(op, "x", k, &[m, k])?,
        dim(op, "base_out", n, &[m, n])?,
    );
    let mut out = SlotLaunch {
        dtype,
        device: dev.clone(),
        m,
        k32,
        n32,
        launch: None,
    };
    // The one group of `sbmm_prepare_t` (over the distinct slots instead of each segment: the same
    // fold), or `None` when there would be two.
    let mut group: Option<Group> = None;
    // Runs of slots without a delta here (they ride along in the launch), and the longest run and the
    // runs of the slots with one.
    let (mut absent, mut longest) = (false, 0u32);
    for s in stats {
        let Some(d) = descs.described.get(s.slot).copied().flatten() else {
            absent = true;
            continue;
        };
        let Some(Some(delta)) = deltas.get(s.slot) else {
            return Err(OpError::Storage {
                op,
                reason: format!("slot {} is described but holds no delta", s.slot),
            }
            .into());
        };
        let v4_only = delta.v4_only();
        let v4 = if v4_only {
            Some(v4_only_entries(op, delta, &d, T::KIND)?)
        } else {
            v4_of(&d, T::KIND)
        };
        let g = match &mut group {
            Some(g) if g.variant == d.variant && g.v4.is_some() == v4.is_some() => g,
            Some(_) => return Ok(None),
            None => group.insert(Group {
                variant: d.variant,
                tc: tc_of(&d, T::KIND),
                v4,
                v4_only: false,
                segments: Vec::new(),
                max_stored: 0,
                min_stored: u32::MAX,
            }),
        };
        if tc_of(&d, T::KIND).is_none() {
            g.tc = None;
        }
        g.v4_only |= v4_only;
        g.max_stored = g.max_stored.max(d.desc.n_stored);
        g.min_stored = g.min_stored.min(d.desc.n_stored);
        longest = longest.max(s.longest as u32);
    }
    let Some(g) = group else {
        return Ok(Some(out));
    };
    if m32 == 0 {
        return Ok(Some(out));
    }
    let kernel = match (g.v4, g.v4_only) {
        (Some(e), true) => Kernel::v4_any_rows(e, longest),
        _ => Kernel::pick(g.variant, g.tc, g.v4, longest),
    };
    // Only the v4 kernels skip a descriptor with no stored rows (an item past a delta's stored tiles
    // does nothing); the others would read its parts.
    let is_v4 = matches!(kernel, Kernel::V4(..));
    if absent && !is_v4 {
        return Ok(None);
    }
    let rows = kernel.rows();
    let shared = slot_pieces(segments, pieces, rows, dev)?;
    // The pieces the plain op would launch: those of slots with a delta here.
    let count = if absent {
        (segments.iter())
            .filter(|s| {
                s.delta
                    .is_some_and(|slot| descs.described.get(slot).copied().flatten().is_some())
            })
            .map(|s| (s.len as u32).div_ceil(rows))
            .sum::<u32>()
    } else {
        shared.count
    };
    let tiles = g.max_stored.div_ceil(kernel.stored_rows());
    let per_item = sbmm_tiles_an_item(kernel, T::KIND);
    let items = u64::from(count) * u64::from(tiles.div_ceil(per_item));
    // With absent slots the launch covers more pieces than the plain op's: the same split (so each
    // live item is computed exactly as there, unless a tail split applies: it follows the launch's
    // items), a grid over all of them.
    let all_items = u64::from(shared.count) * u64::from(tiles.div_ceil(per_item));
    let v4 = match kernel {
        Kernel::V4(..) => {
            let resident = resident_warps(dev)?;
            Some(v4_sbmm_launch(
                v4_split(items, resident),
                all_items,
                resident,
            ))
        }
        _ => None,
    };
    let v4_split = v4.map(|(split, _)| split);
    let sx = match kernel {
        Kernel::V4(e, rows) if v4_split == Some(1) && per_item == 1 => {
            let sx = v4_sbmm_shared::<T>(e, rows, tiles, g.min_stored == g.max_stored);
            // The x entries read every item's descriptor: no absent slots (the ring entries skip an
            // item past its delta's stored rows, as the split ones).
            if absent && sx.is_some_and(|(_, smem)| smem == 0) {
                return Ok(None);
            }
            sx
        }
        _ => None,
    };
    let grid = match (sx, v4) {
        (Some(_), _) => (
            all_items
                .div_ceil(u64::from(WARPS_V4))
                .min(u64::from(MAX_GRID_X)) as u32,
            1,
        ),
        (None, Some((_, grid))) => grid,
        (None, None) => (tiles, shared.count.min(MAX_GRID_Y)),
    };
    let func = descs.function::<T>(op, kernel, sx)?;
    out.launch = Some(SlotKernel {
        descs: descs.clone(),
        pieces: shared,
        descs_offset: if is_v4 { descs.v4_offset } else { 0 },
        kernel,
        func,
        grid,
        v4: v4_split.map(|split| (tiles, sx.is_none().then_some(split))),
        smem: sx.map_or(0, |(_, smem)| smem),
    });
    Ok(Some(out))
}

/// Forward pass of a slot-table sbmm: `out = base_out`, then the planned launch.
pub(crate) fn slot_run(op: &'static str, launch: &SlotLaunch, x: Arg<'_>, base: Arg<'_>) -> Out {
    if x.0.dtype() != launch.dtype {
        return Err(OpError::Dtype {
            op,
            arg: "x",
            got: x.0.dtype(),
            expected: format!("{:?} (the dtype the launch was planned for)", launch.dtype),
        }
        .into());
    }
    if x.0.device().id() != launch.device.id() {
        return Err(OpError::Storage {
            op,
            reason: "x is on another CUDA device than the one the launch was planned on".into(),
        }
        .into());
    }
    by_dtype!(op, "x", launch.dtype, slot_run_t(op, launch, x, base))
}

fn slot_run_t<T: Elem>(op: &'static str, launch: &SlotLaunch, x: Arg<'_>, base: Arg<'_>) -> Out {
    let dev = x.0.device().clone();
    let shape = Shape::from(base.1.dims());
    let (xs, x_off, x_len) = input::<T>(op, "x", x)?;
    let (bs, b_off, len) = input::<T>(op, "base_out", base)?;
    let (k, n) = (launch.k32 as usize, launch.n32 as usize);
    if launch.launch.is_some() && (x_len != launch.m * k || len != launch.m * n) {
        return Err(OpError::Storage {
            op,
            reason: format!(
                "x has {x_len} and base_out {len} elements, the launch takes {} rows of {k} and {n}",
                launch.m
            ),
        }
        .into());
    }
    let stream = dev.cuda_stream();
    let mut out = alloc::<T>(&dev, len)?;
    {
        let mut ptrs = Ptrs::new(&stream);
        let x_p = ptrs.read(xs, x_off);
        let b_p = ptrs.read(bs, b_off);
        let out_p = ptrs.write(&mut out);
        init(&stream, out_p, Some(b_p), len * std::mem::size_of::<T>())?;
        if let Some(l) = &launch.launch {
            if let Some(table) = &l.descs.table {
                let args = SbmmArgs {
                    segs: ptrs.read(&l.pieces.table, 0),
                    count: l.pieces.count,
                    descs: ptrs.read(table, 0) + l.descs_offset,
                    x: x_p,
                    out: out_p,
                    k: launch.k32,
                    n: launch.n32,
                    v4: l.v4,
                };
                // SAFETY: the arguments match the sbmm entry points as in `sbmm_run_t`: `count` pieces of
                // at most the kernel's tile rows inside the launch's m rows (the pass's segments, checked
                // against x by the wrapper), each naming a slot below the layer's table length (checked
                // by the wrapper); every slot's descriptor is that of its delta, of this launch's one
                // variant (checked by `slot_launch_t`), or, only for a v4 kernel, the default descriptor
                // with no stored rows, which the v4 kernels skip (`live = rt * 16 < n_stored`); the v4
                // descriptors for a v4 kernel. The deltas' parts are kept alive by the `SlotDeltas` the
                // caller borrows for the call and were written before the deltas existed; x is m x K
                // and out m x N_total of T; the two tables live in `l` (Arcs) and are freed on this
                // stream, after this launch. The ring entries get their dynamic shared memory (allowed
                // on the function when it was loaded).
                let mut cfg = l.kernel.config(l.grid);
                cfg.shared_mem_bytes = l.smem;
                unsafe { launch_sbmm(&stream, &l.func, &args, cfg) }?;
            }
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

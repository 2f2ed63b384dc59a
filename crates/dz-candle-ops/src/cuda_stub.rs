//! The CUDA forward passes without the `cuda` feature: every one answers candle's
//! `NotCompiledWithCudaSupport` (unreachable in practice: without the feature no CUDA tensor exists).

use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape};

use crate::ops::{Fill, Segment};
use crate::DeviceDelta;

type Out = candle_core::Result<(CudaStorage, Shape)>;
type Arg<'a> = (&'a CudaStorage, &'a Layout);

pub(crate) fn matmul(
    _op: &'static str,
    _delta: &DeviceDelta,
    _x: Arg<'_>,
    _base: Option<Arg<'_>>,
    _shape: Shape,
    _fill: Fill,
) -> Out {
    Err(candle_core::Error::NotCompiledWithCudaSupport)
}

/// No CUDA sbmm can be planned without the feature: this type has no values.
pub(crate) enum SbmmLaunches {}

impl SbmmLaunches {
    pub(crate) fn len(&self) -> usize {
        match *self {}
    }
}

pub(crate) fn sbmm_prepare(
    _op: &'static str,
    _deltas: &[&DeviceDelta],
    _segments: &[Segment],
    _m: usize,
    _kn: (usize, usize),
    _dtype: DType,
    _dev: &CudaDevice,
) -> candle_core::Result<SbmmLaunches> {
    Err(candle_core::Error::NotCompiledWithCudaSupport)
}

pub(crate) fn sbmm_run(
    _op: &'static str,
    plan: &SbmmLaunches,
    _x: Arg<'_>,
    _base: Arg<'_>,
    _fill: Fill,
) -> Out {
    match *plan {}
}

pub(crate) fn dequantize(
    _op: &'static str,
    _delta: &DeviceDelta,
    _anchor: &CudaStorage,
    _base: Option<&Layout>,
    _fill: Fill,
    _dtype: DType,
) -> Out {
    Err(candle_core::Error::NotCompiledWithCudaSupport)
}

pub(crate) fn embedding(
    _op: &'static str,
    _delta: &DeviceDelta,
    _ids: Arg<'_>,
    _base: Arg<'_>,
    _fill: Fill,
    _checked: bool,
) -> Out {
    Err(candle_core::Error::NotCompiledWithCudaSupport)
}

pub(crate) fn norm_delta_add(
    _op: &'static str,
    _x: Arg<'_>,
    _base: Arg<'_>,
    _deltas: Arg<'_>,
    _dims: (usize, usize, f32),
) -> Out {
    Err(candle_core::Error::NotCompiledWithCudaSupport)
}

/// No slot tables exist without the feature: these types have no values.
pub(crate) enum SlotDescs {}

/// See [`SlotDescs`].
pub(crate) enum SlotPieces {}

/// See [`SlotDescs`].
pub(crate) enum SlotLaunch {}

pub(crate) fn slot_descs(
    _op: &'static str,
    _deltas: &[Option<DeviceDelta>],
    _dev: &CudaDevice,
) -> candle_core::Result<SlotDescs> {
    Err(candle_core::Error::NotCompiledWithCudaSupport)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn slot_launch(
    _op: &'static str,
    _segments: &[Segment],
    _stats: &[crate::ops::SlotStat],
    _pieces: &std::sync::Mutex<Vec<(u32, std::sync::Arc<SlotPieces>)>>,
    descs: &SlotDescs,
    _deltas: &[Option<DeviceDelta>],
    _mkn: (usize, usize, usize),
    _dtype: DType,
    _dev: &CudaDevice,
) -> candle_core::Result<Option<SlotLaunch>> {
    match *descs {}
}

pub(crate) fn slot_run(_op: &'static str, launch: &SlotLaunch, _x: Arg<'_>, _base: Arg<'_>) -> Out {
    match *launch {}
}

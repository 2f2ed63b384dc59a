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
) -> Out {
    Err(candle_core::Error::NotCompiledWithCudaSupport)
}

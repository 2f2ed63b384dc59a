//! `embedding-delta-add`: the embedding layer of a fine-tune, from the base embedding's output.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};
use dz_format::Role;

use super::{
    check_contiguous, check_device, check_dims, check_float, check_is_delta, mismatch, Fill,
};
use crate::cpu::engine::gather_add;
use crate::cpu::{contiguous, floats, to_storage, Locked};
use crate::delta::DeviceDelta;
use crate::error::{OpError, Result};

struct EmbeddingDeltaAdd<'a> {
    delta: &'a DeviceDelta,
    fill: Fill,
    /// Whether the CUDA path reads the ids back to check them ([`embedding_delta_add_unchecked`]).
    checked: bool,
}

impl EmbeddingDeltaAdd<'_> {
    /// The ids as row numbers, each checked `< N_total`.
    fn rows(&self, s: &CpuStorage, l: &Layout) -> Result<Vec<usize>> {
        let op = self.name();
        let (a, b) = contiguous(op, "ids", l)?;
        let n = self.delta.dims().0;
        let check = |position: usize, id: i64| -> Result<usize> {
            usize::try_from(id)
                .ok()
                .filter(|&r| r < n)
                .ok_or_else(|| OpError::IdOutOfRange {
                    op,
                    id,
                    position,
                    rows: n,
                    delta: self.delta.name().to_string(),
                })
        };
        match s {
            CpuStorage::U32(v) => v[a..b]
                .iter()
                .enumerate()
                .map(|(i, &id)| check(i, i64::from(id)))
                .collect(),
            CpuStorage::I64(v) => v[a..b]
                .iter()
                .enumerate()
                .map(|(i, &id)| check(i, id))
                .collect(),
            other => Err(OpError::Dtype {
                op,
                arg: "ids",
                got: other.dtype(),
                expected: IDS.into(),
            }),
        }
    }
}

const IDS: &str = "u32 or i64";

impl CustomOp2 for EmbeddingDeltaAdd<'_> {
    fn name(&self) -> &'static str {
        "embedding-delta-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.name();
        let ids = self.rows(s1, l1)?;
        let (base, dtype) = floats(op, "base_emb_out", s2, l2)?;
        let locked = Locked::new(self.delta);
        let h = locked.host(op)?;
        let mut out = base.into_owned();
        gather_add(&h, &ids, &mut out);
        Ok((to_storage(out, dtype), Shape::from(l2.dims())))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        crate::cuda::embedding(
            self.name(),
            self.delta,
            (s1, l1),
            (s2, l2),
            self.fill,
            self.checked,
        )
    }
}

/// `base_emb_out + D[ids]`: adds the delta's row of every token id to the base embedding's output (rows
/// not in a row subset add zero).
///
/// `ids` is u32 or i64 of any shape `[..]`; `base_emb_out` is `[.., K]` (the ids' shape, then the hidden
/// size `K`) in f32, f16 or bf16; both contiguous on the delta's device. An id `>= N_total` (the
/// vocabulary of the delta) is an error. The output has `base_emb_out`'s shape and dtype; the sum is
/// formed in f32 and rounded once.
///
/// For the output head, use [`delta_matmul_add`](crate::delta_matmul_add): an `lm_head` delta is a
/// linear delta whose rows are the vocabulary.
pub fn embedding_delta_add(
    ids: &Tensor,
    base_emb_out: &Tensor,
    delta: &DeviceDelta,
) -> candle_core::Result<Tensor> {
    embedding_delta_add_with(ids, base_emb_out, delta, Fill::Uninit, true)
}

/// [`embedding_delta_add`] without reading the ids back on CUDA: there the op checks every id against
/// `N_total` on the host, which copies the ids from the device (a synchronization, each call). Here u32
/// ids on a CUDA device go to the kernel as they are, and an id `>= N_total` adds nothing to its row
/// (the kernel finds no stored row for it). For callers whose ids have indexed the base embedding
/// already (a serving step's; `dz_loader`'s hook): the same output for valid ids. i64 ids, and the CPU,
/// are checked as [`embedding_delta_add`] checks them.
pub fn embedding_delta_add_unchecked(
    ids: &Tensor,
    base_emb_out: &Tensor,
    delta: &DeviceDelta,
) -> candle_core::Result<Tensor> {
    embedding_delta_add_with(ids, base_emb_out, delta, Fill::Uninit, false)
}

pub(crate) fn embedding_delta_add_with(
    ids: &Tensor,
    base_emb_out: &Tensor,
    delta: &DeviceDelta,
    fill: Fill,
    checked: bool,
) -> candle_core::Result<Tensor> {
    let op = EmbeddingDeltaAdd {
        delta,
        fill,
        checked,
    };
    let name = op.name();
    check_is_delta(name, delta)?;
    if delta.role() == Some(Role::Linear) {
        return Err(mismatch(
            name,
            delta,
            "role `linear`: its rows are output channels, not token embeddings",
        )
        .into());
    }
    if !matches!(ids.dtype(), DType::U32 | DType::I64) {
        return Err(OpError::Dtype {
            op: name,
            arg: "ids",
            got: ids.dtype(),
            expected: IDS.into(),
        }
        .into());
    }
    check_float(name, "base_emb_out", base_emb_out)?;
    check_device(name, "ids", ids, delta)?;
    check_device(name, "base_emb_out", base_emb_out, delta)?;
    check_contiguous(name, "ids", ids)?;
    check_contiguous(name, "base_emb_out", base_emb_out)?;
    let mut want = ids.dims().to_vec();
    want.push(delta.dims().1);
    check_dims(
        name,
        "base_emb_out",
        base_emb_out,
        &want,
        "the ids' shape, then K",
    )?;
    ids.apply_op2_no_bwd(base_emb_out, &op)
}

//! NCCL all-reduce between CUDA GPUs for data-parallel peers.
//!
//! burn 0.21 has a backend-level all-reduce (its `distributed` feature), but turning that
//! feature on makes `Autodiff<B>` require a distributed backend for every `B`, and the CPU
//! backend is not one: the CPU could no longer train in a CUDA build. So the sum is a custom
//! operation in burn's fusion stream instead (the same mechanism as the custom kernels in
//! `models::kernels`): it hands the gradient's buffer to cubecl's CUDA runtime, whose
//! `all_reduce` creates the NCCL communicator for the device group on first use and runs
//! `ncclAllReduce` on its communication stream; the compute stream waits for it before the
//! result is read.

use std::marker::PhantomData;

use burn::tensor::ops::FloatTensor;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cubecl::device::{Device as _, DeviceId};

use super::peers::PeerOps;

type Backend<R, F, I, BT> = Fusion<CubeBackend<R, F, I, BT>>;

/// The peer operations of CUDA GPUs: nothing to join or leave (the communicator is made on the
/// first sum), sums through NCCL.
pub(super) fn nccl_ops<R, F, I, BT>() -> PeerOps<Backend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    PeerOps {
        join: |_, _, _| Ok(()),
        sum: |_, tensor, devices| Ok(all_reduce_sum::<R, F, I, BT>(tensor, devices)),
        leave: |_| {},
    }
}

/// The element-wise sum of `tensor` over the GPUs `devices` (each calls it with its own part,
/// in the same order).
fn all_reduce_sum<R, F, I, BT>(tensor: FloatTensor<Backend<R, F, I, BT>>, devices: &[R::Device]) -> FloatTensor<Backend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let client = tensor.client.clone();
    let streams = OperationStreams::with_inputs([&tensor]);
    let out = TensorIr::uninit(client.create_empty_handle(), tensor.shape.clone(), tensor.dtype);
    let desc = CustomOpIr::new("rfstudio_nccl_all_reduce_sum", &[tensor.into_ir()], &[out]);
    let op = AllReduceSum::<R, F, I, BT> {
        desc: desc.clone(),
        devices: devices.iter().map(|d| d.to_id()).collect(),
        _b: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op).output()
}

struct AllReduceSum<R, F, I, BT> {
    desc: CustomOpIr,
    devices: Vec<DeviceId>,
    _b: PhantomData<fn() -> (R, F, I, BT)>,
}

impl<R, F, I, BT> core::fmt::Debug for AllReduceSum<R, F, I, BT> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AllReduceSum").field("desc", &self.desc).field("devices", &self.devices).finish()
    }
}

impl<R, F, I, BT> Operation<<CubeBackend<R, F, I, BT> as FusionBackend>::FusionRuntime> for AllReduceSum<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn execute(&self, handles: &mut HandleContainer<<<CubeBackend<R, F, I, BT> as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let ([input], [out]) = self.desc.as_fixed();
        let x = into_contiguous(handles.get_float_tensor::<CubeBackend<R, F, I, BT>>(input));
        // out of place: the input buffer may be shared with other tensors
        let y = empty_device_contiguous_dtype::<R>(x.client.clone(), x.device.clone(), out.shape.clone(), out.dtype);
        let mut client = x.client.clone();
        client.all_reduce(
            x.handle.clone(),
            y.handle.clone(),
            out.dtype.into(),
            self.devices.clone(),
            cubecl::server::ReduceOperation::Sum,
        );
        client.sync_collective();
        handles.register_float_tensor::<CubeBackend<R, F, I, BT>>(&out.id, y);
    }
}

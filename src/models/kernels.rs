//! rfstudio's own GPU kernels, for inference on burn's cubecl backends (CUDA and wgpu).
//!
//! Model code stays generic over `B: Backend`: the entry points in `fused` check at run time
//! whether `B` is exactly `burn::backend::Cuda`, `Wgpu` or `Vulkan` (all `Fusion<CubeBackend<..>>`)
//! and only then run these kernels, registered as custom operations in burn's fusion stream.
//! Every other backend (burn-flex on the CPU) takes burn's own ops, unchanged, as do these when
//! the job's policy says `RFSTUDIO_GROUPNORM=burn`.

use burn::nn::GroupNorm;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;

use super::policy::FlashKernel;

/// GroupNorm (+ SiLU)'s operands taken out of a `GroupNorm` module, for rfstudio's own ops.
pub(crate) struct GroupNormArgs<B: Backend> {
    pub x: Tensor<B, 4>,
    /// `[C]`; `None` (with `beta`) for a module without affine parameters.
    pub gamma: Option<Tensor<B, 1>>,
    pub beta: Option<Tensor<B, 1>>,
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

impl<B: Backend> GroupNormArgs<B> {
    /// `Err(x)` when `x` and `norm` do not fit each other (channel count, groups, affine
    /// parameters present exactly when `affine`, of shape `[C]`) or `x` is empty: burn's own
    /// GroupNorm then handles (or reports) it.
    pub fn new(x: Tensor<B, 4>, norm: &GroupNorm<B>, silu: bool) -> Result<Self, Tensor<B, 4>> {
        let [n, c, h, w] = x.dims();
        let groups = norm.num_groups;
        let (gamma, beta) = match (&norm.gamma, &norm.beta) {
            (Some(g), Some(b)) if norm.affine => (Some(g.val()), Some(b.val())),
            (None, None) if !norm.affine => (None, None),
            _ => return Err(x),
        };
        let fits = groups > 0 && c > 0 && c == norm.num_channels && c % groups == 0 && n * h * w > 0;
        if !fits || !gamma.iter().chain(beta.iter()).all(|t| t.dims() == [c]) {
            return Err(x);
        }
        Ok(Self {
            x,
            gamma,
            beta,
            groups,
            eps: norm.epsilon,
            silu,
        })
    }
}

/// Non-causal attention `softmax(Q K^T / sqrt(d)) V` on `[batch, heads, n, d]` queries,
/// `[batch, heads, m, d]` keys and `[batch, heads, m, dv]` values with one of cubek's
/// flash-attention kernels, chosen by the caller instead of by autotune, registered as a custom
/// op in burn's fusion stream. `Err` gives the inputs back where it does not apply: a backend
/// other than exactly `Cuda`, `Wgpu` or `Vulkan`, mismatched or broadcast shapes, mixed or
/// unsupported dtypes, or sequence lengths that are not whole multiples of the kernel's tiles
/// ([`FlashKernel::multiples`]). Head dims are the caller's business: the tensor-core kernels need
/// multiples of 16 (see `fused::sdpa_padded`). When the kernel cannot be set up on the
/// device (no tensor cores, too little shared memory) the op computes burn's unfused
/// attention instead and notes why: [`flash_failures`].
pub fn flash_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    kernel: FlashKernel,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    cubek_attention((q, k, v), CubekAttention::Kernel(kernel))
}

/// burn's attention op as burn runs it on the cubecl backends (autotuned among its unfused
/// fallback and cubek's flash kernels), but on contiguous copies of the inputs (no copy when they
/// already are): cubek's kernels read views such as the models' split heads wrongly (see
/// `launch_cubek`), and burn hands them views. Registered as the same custom op as
/// [`flash_attention`]; `Err` gives the inputs back on other backends or mismatched shapes.
pub fn autotuned_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causal: bool,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    cubek_attention((q, k, v), CubekAttention::Autotuned { causal })
}

/// How the custom attention op picks its kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CubekAttention {
    /// This flash kernel, falling back to burn's unfused attention where it cannot be set up.
    Kernel(FlashKernel),
    /// burn's autotune (its fallback and cubek's flash kernels).
    Autotuned { causal: bool },
}

/// The custom attention op for [`flash_attention`] and [`autotuned_attention`]: `Err` gives the
/// inputs back for mismatched or broadcast shapes, empty tensors, mixed dtypes, a named kernel
/// whose tiles do not divide the sequence lengths, or a backend without the op.
#[allow(clippy::type_complexity)]
fn cubek_attention<B: Backend>(
    qkv: (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>),
    mode: CubekAttention,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    let (q, k, v) = &qkv;
    let ([b, h, n, d], [bk, hk, m, dk], [bv, hv, mv, dv]) = (q.dims(), k.dims(), v.dims());
    let tiles = match mode {
        CubekAttention::Kernel(kernel) => kernel.takes(n, m),
        CubekAttention::Autotuned { .. } => true,
    };
    let fits = (bk, hk, dk) == (b, h, d)
        && (bv, hv, mv) == (b, h, m)
        && b * h * n * m * d * dv > 0
        && tiles
        && q.dtype() == k.dtype()
        && q.dtype() == v.dtype();
    if !fits {
        return Err(qkv);
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        cube::try_attention(qkv, mode)
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = mode;
        Err(qkv)
    }
}

/// The flash-attention kernels that could not be set up on this device since the process
/// started (or since the last [`clear_flash_failures`]), each with cubek's reason; their calls
/// ran burn's unfused attention instead.
pub fn flash_failures() -> Vec<(FlashKernel, String)> {
    FLASH_FAILURES.lock().map(|f| f.clone()).unwrap_or_default()
}

/// Forget the failures [`flash_failures`] reports (`bench ops` does before each kernel).
pub fn clear_flash_failures() {
    if let Ok(mut f) = FLASH_FAILURES.lock() {
        f.clear();
    }
}

static FLASH_FAILURES: std::sync::Mutex<Vec<(FlashKernel, String)>> = std::sync::Mutex::new(Vec::new());

/// Notes (once per kernel, with a warning in the log) that `kernel` fell back.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn note_flash_failure(kernel: FlashKernel, reason: &str) {
    // cubek's messages span several lines: one line for logs and JSON.
    let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    let Ok(mut f) = FLASH_FAILURES.lock() else {
        return;
    };
    if !f.iter().any(|(k, _)| *k == kernel) {
        tracing::warn!("flash-attention kernel {kernel} unavailable here ({reason}); computing unfused attention instead");
        f.push((kernel, reason));
    }
}

/// burn's own ops: `silu(norm.forward(x))`, or `norm.forward(x)`.
pub fn burn_group_norm_silu<B: Backend>(x: Tensor<B, 4>, norm: &GroupNorm<B>, act: bool) -> Tensor<B, 4> {
    let y = norm.forward(x);
    if act { silu(y) } else { y }
}

/// How many times the custom GroupNorm op was registered (tests check it ran, not the fallback).
#[cfg(all(test, feature = "wgpu"))]
pub(crate) static CUSTOM_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The fused GroupNorm (+ SiLU) kernel when `B` is exactly `Cuda`, `Wgpu` or `Vulkan` and the
/// job's policy does not ask for burn's ops; `Err` gives the operands back otherwise.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) fn try_cube_group_norm_silu<B: Backend>(args: GroupNormArgs<B>) -> Result<Tensor<B, 4>, GroupNormArgs<B>> {
    cube::try_group_norm_silu(args)
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod cube {
    use std::marker::PhantomData;

    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
    use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

    use super::{CubekAttention, FlashKernel, GroupNormArgs, note_flash_failure};
    use crate::models::dispatch::via;

    /// Threads per cube (one cube per (batch, group)); capped by the device's limits.
    const BLOCK: u32 = 1024;

    /// The custom op when `B` is a backend it supports and the call fits it; `Err` gives the
    /// operands back, untouched, otherwise.
    pub(super) fn try_group_norm_silu<B: Backend>(args: GroupNormArgs<B>) -> Result<Tensor<B, 4>, GroupNormArgs<B>> {
        if crate::models::policy::current().burn_group_norm {
            return Err(args);
        }
        #[cfg(feature = "cuda")]
        let args = match via::<B, burn::backend::Cuda, _, _, _, _>(args, <burn::backend::Cuda as CubeFusion>::group_norm_silu) {
            Ok(y) => return Ok(y),
            Err(args) => args,
        };
        #[cfg(feature = "wgpu")]
        let args = match via::<B, burn::backend::Wgpu, _, _, _, _>(args, <burn::backend::Wgpu as CubeFusion>::group_norm_silu) {
            Ok(y) => return Ok(y),
            Err(args) => args,
        };
        // The same runtime as `Wgpu` (SPIR-V on Vulkan adapters) with `u8` booleans: its own type.
        #[cfg(feature = "vulkan")]
        let args = match via::<B, burn::backend::Vulkan, _, _, _, _>(args, <burn::backend::Vulkan as CubeFusion>::group_norm_silu) {
            Ok(y) => return Ok(y),
            Err(args) => args,
        };
        Err(args)
    }

    type Qkv<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

    /// The custom attention op when `B` is a backend it supports (the caller checked the shapes).
    pub(super) fn try_attention<B: Backend>(qkv: Qkv<B>, mode: CubekAttention) -> Result<Tensor<B, 4>, Qkv<B>> {
        #[cfg(feature = "cuda")]
        let qkv = match via::<B, burn::backend::Cuda, _, _, _, _>(qkv, |qkv| {
            <burn::backend::Cuda as CubeFusion>::attention(qkv, mode)
        }) {
            Ok(y) => return Ok(y),
            Err(qkv) => qkv,
        };
        #[cfg(feature = "wgpu")]
        let qkv = match via::<B, burn::backend::Wgpu, _, _, _, _>(qkv, |qkv| {
            <burn::backend::Wgpu as CubeFusion>::attention(qkv, mode)
        }) {
            Ok(y) => return Ok(y),
            Err(qkv) => qkv,
        };
        #[cfg(feature = "vulkan")]
        let qkv = match via::<B, burn::backend::Vulkan, _, _, _, _>(qkv, |qkv| {
            <burn::backend::Vulkan as CubeFusion>::attention(qkv, mode)
        }) {
            Ok(y) => return Ok(y),
            Err(qkv) => qkv,
        };
        Err(qkv)
    }

    /// A fusion-on-cubecl backend the custom ops run on.
    trait CubeFusion: Backend {
        fn group_norm_silu(args: GroupNormArgs<Self>) -> Result<Tensor<Self, 4>, GroupNormArgs<Self>>;
        fn attention(qkv: Qkv<Self>, mode: CubekAttention) -> Result<Tensor<Self, 4>, Qkv<Self>>;
    }

    impl<R, F, I, BT> CubeFusion for Fusion<CubeBackend<R, F, I, BT>>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
    {
        fn group_norm_silu(args: GroupNormArgs<Self>) -> Result<Tensor<Self, 4>, GroupNormArgs<Self>> {
            fused::<R, F, I, BT>(args)
        }

        fn attention(qkv: Qkv<Self>, mode: CubekAttention) -> Result<Tensor<Self, 4>, Qkv<Self>> {
            fused_attention::<R, F, I, BT>(qkv, mode)
        }
    }

    fn supported(dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Registers the op in the fusion stream; gives the operands back (`Err`) for anything it does
    /// not cover.
    #[allow(clippy::type_complexity)]
    fn fused<R, F, I, BT>(
        args: GroupNormArgs<Fusion<CubeBackend<R, F, I, BT>>>,
    ) -> Result<Tensor<Fusion<CubeBackend<R, F, I, BT>>, 4>, GroupNormArgs<Fusion<CubeBackend<R, F, I, BT>>>>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
    {
        type B<R, F, I, BT> = Fusion<CubeBackend<R, F, I, BT>>;
        let [n, c, h, w] = args.x.dims();
        let dtype = args.x.dtype();
        let same_dtype = args.gamma.iter().chain(args.beta.iter()).all(|t| t.dtype() == dtype);
        let fits = supported(dtype)
            && same_dtype
            && n <= u16::MAX as usize
            && args.groups <= u16::MAX as usize
            && n.checked_mul(c * h * w).is_some_and(|e| e < u32::MAX as usize);
        if !fits {
            return Err(args);
        }
        let GroupNormArgs { x, gamma, beta, groups, eps, silu } = args;
        let device = x.device();
        let gamma = gamma.unwrap_or_else(|| Tensor::<B<R, F, I, BT>, 1>::ones([c], (&device, dtype)));
        let beta = beta.unwrap_or_else(|| Tensor::<B<R, F, I, BT>, 1>::zeros([c], (&device, dtype)));
        let (xp, gp, bp) = match (x.into_primitive(), gamma.into_primitive(), beta.into_primitive()) {
            (TensorPrimitive::Float(x), TensorPrimitive::Float(g), TensorPrimitive::Float(b)) => (x, g, b),
            // Quantized operands: burn's own ops.
            (x, g, b) => {
                let (gamma, beta) = (Some(Tensor::from_primitive(g)), Some(Tensor::from_primitive(b)));
                return Err(GroupNormArgs { x: Tensor::from_primitive(x), gamma, beta, groups, eps, silu });
            }
        };

        let launch = GroupNormLaunch { groups, eps: eps as f32, silu };
        let y = register3::<R, F, I, BT, _>("rfstudio_group_norm_silu", [xp, gp, bp], Shape::new([n, c, h, w]), dtype, launch);
        #[cfg(all(test, feature = "wgpu"))]
        super::CUSTOM_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Tensor::from_primitive(TensorPrimitive::Float(y)))
    }

    /// The GPU work of one of rfstudio's custom ops: three float tensors in, one out.
    trait Launch3: core::fmt::Debug + Send + Sync + 'static {
        fn launch<R: CubeRuntime>(&self, a: CubeTensor<R>, b: CubeTensor<R>, c: CubeTensor<R>) -> CubeTensor<R>;
    }

    /// Registers `launch` on `inputs` in their fusion stream as the custom op `name`, giving a
    /// `shape`d `dtype` output.
    fn register3<R, F, I, BT, L>(
        name: &'static str,
        inputs: [FusionTensor<<CubeBackend<R, F, I, BT> as FusionBackend>::FusionRuntime>; 3],
        shape: Shape,
        dtype: DType,
        launch: L,
    ) -> FusionTensor<<CubeBackend<R, F, I, BT> as FusionBackend>::FusionRuntime>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
        L: Launch3,
    {
        let client = inputs[0].client.clone();
        let streams = OperationStreams::with_inputs(&inputs);
        let out = TensorIr::uninit(client.create_empty_handle(), shape, dtype);
        let desc = CustomOpIr::new(name, &inputs.map(|t| t.into_ir()), &[out]);
        let op = CustomOp::<R, F, I, BT, L> {
            desc: desc.clone(),
            launch,
            _b: PhantomData,
        };
        client.register(streams, OperationIr::Custom(desc), op).output()
    }

    struct CustomOp<R, F, I, BT, L> {
        desc: CustomOpIr,
        launch: L,
        _b: PhantomData<fn() -> (R, F, I, BT)>,
    }

    impl<R, F, I, BT, L: Launch3> core::fmt::Debug for CustomOp<R, F, I, BT, L> {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("CustomOp").field("desc", &self.desc).field("launch", &self.launch).finish()
        }
    }

    impl<R, F, I, BT, L> Operation<<CubeBackend<R, F, I, BT> as FusionBackend>::FusionRuntime> for CustomOp<R, F, I, BT, L>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
        L: Launch3,
    {
        fn execute(
            &self,
            handles: &mut HandleContainer<
                <<CubeBackend<R, F, I, BT> as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle,
            >,
        ) {
            let ([a, b, c], [out]) = self.desc.as_fixed();
            let a = handles.get_float_tensor::<CubeBackend<R, F, I, BT>>(a);
            let b = handles.get_float_tensor::<CubeBackend<R, F, I, BT>>(b);
            let c = handles.get_float_tensor::<CubeBackend<R, F, I, BT>>(c);
            let y = self.launch.launch::<R>(a, b, c);
            handles.register_float_tensor::<CubeBackend<R, F, I, BT>>(&out.id, y);
        }
    }

    /// GroupNorm (+ SiLU) on `x`, `gamma`, `beta`.
    #[derive(Debug)]
    struct GroupNormLaunch {
        groups: usize,
        eps: f32,
        silu: bool,
    }

    impl Launch3 for GroupNormLaunch {
        fn launch<R: CubeRuntime>(&self, x: CubeTensor<R>, gamma: CubeTensor<R>, beta: CubeTensor<R>) -> CubeTensor<R> {
            launch::<R>(x, gamma, beta, self.groups, self.eps, self.silu)
        }
    }

    impl Launch3 for CubekAttention {
        fn launch<R: CubeRuntime>(&self, q: CubeTensor<R>, k: CubeTensor<R>, v: CubeTensor<R>) -> CubeTensor<R> {
            launch_cubek::<R>(q, k, v, *self)
        }
    }

    /// Launches the kernel on contiguous copies of the inputs (no copy when already contiguous).
    /// The caller (`fused`) checked the shapes, dtypes and sizes.
    pub(super) fn launch<R: CubeRuntime>(
        x: CubeTensor<R>,
        gamma: CubeTensor<R>,
        beta: CubeTensor<R>,
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> CubeTensor<R> {
        let x = into_contiguous(x);
        let gamma = into_contiguous(gamma);
        let beta = into_contiguous(beta);
        let shape = x.meta.shape().clone();
        let (n, c) = (shape[0], shape[1]);
        let hw = shape[2] * shape[3];
        let client = x.client.clone();
        let dtype = x.dtype;
        let out = empty_device_contiguous_dtype::<R>(client.clone(), x.device.clone(), shape, dtype);

        let hardware = &client.properties().hardware;
        let limit = BLOCK.min(hardware.max_cube_dim.0).min(hardware.max_units_per_cube).max(1);
        // A power of two, for the tree reduction.
        let block = 1u32 << (31 - limit.leading_zeros());

        kernel::group_norm_kernel::launch::<R>(
            &client,
            CubeCount::Static(groups as u32, n as u32, 1),
            CubeDim::new_1d(block),
            x.into_tensor_arg(),
            gamma.into_tensor_arg(),
            beta.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            (c / groups) as u32,
            hw as u32,
            eps,
            block as usize,
            silu,
            dtype.into(),
        );
        out
    }

    /// Registers the attention op in the fusion stream; gives the inputs back (`Err`) for dtypes
    /// it does not cover or quantized tensors.
    #[allow(clippy::type_complexity)]
    fn fused_attention<R, F, I, BT>(
        qkv: Qkv<Fusion<CubeBackend<R, F, I, BT>>>,
        mode: CubekAttention,
    ) -> Result<Tensor<Fusion<CubeBackend<R, F, I, BT>>, 4>, Qkv<Fusion<CubeBackend<R, F, I, BT>>>>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
    {
        let (q, k, v) = qkv;
        let dtype = q.dtype();
        let [b, h, n, _] = q.dims();
        let dv = v.dims()[3];
        if !supported(dtype) {
            return Err((q, k, v));
        }
        let (qp, kp, vp) = match (q.into_primitive(), k.into_primitive(), v.into_primitive()) {
            (TensorPrimitive::Float(q), TensorPrimitive::Float(k), TensorPrimitive::Float(v)) => (q, k, v),
            (q, k, v) => return Err((Tensor::from_primitive(q), Tensor::from_primitive(k), Tensor::from_primitive(v))),
        };
        let y = register3::<R, F, I, BT, _>("rfstudio_attention", [qp, kp, vp], Shape::new([b, h, n, dv]), dtype, mode);
        Ok(Tensor::from_primitive(TensorPrimitive::Float(y)))
    }

    /// cubek's flash attention with the kernel given (validated by cubek before it launches),
    /// burn's unfused attention when cubek cannot set it up here (noted in `flash_failures`); or
    /// burn's autotuned attention. Always on contiguous inputs.
    pub(super) fn launch_cubek<R: CubeRuntime>(
        q: CubeTensor<R>,
        k: CubeTensor<R>,
        v: CubeTensor<R>,
        mode: CubekAttention,
    ) -> CubeTensor<R> {
        use burn::tensor::ops::AttentionModuleOptions;
        use burn_cubecl::kernel::attention::{AttentionStrategy, attention, flash_attention};
        use cubek::attention::launch::{BlueprintStrategy, Strategy};
        use cubek::attention::routines::blackbox_accelerated::BlackboxAcceleratedStrategy;

        // cubek's kernels read views wrongly: the heads swapped out of `[batch, tokens, heads, d]`
        // (how the models split heads) gave max |diff| 1.2 against the matmul form on lavapipe.
        let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
        let is_causal = matches!(mode, CubekAttention::Autotuned { causal: true });
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal,
        };
        let kernel = match mode {
            CubekAttention::Kernel(kernel) => kernel,
            CubekAttention::Autotuned { .. } => {
                return match attention(q.clone(), k.clone(), v.clone(), None, None, options, AttentionStrategy::default()) {
                    Ok(out) => out,
                    // Autotune always has burn's fallback to run; kept for the type's sake.
                    Err(_) => burn::tensor::ops::attention::attention_fallback::<CubeBackend<R, f32, i32, u8>>(q, k, v, None, None, options),
                };
            }
        };
        let strategy = match kernel {
            FlashKernel::TensorCore { planes, seq_q, seq_kv } => {
                Strategy::BlackboxAccelerated(BlueprintStrategy::Inferred(BlackboxAcceleratedStrategy {
                    num_planes: planes,
                    seq_q,
                    seq_kv,
                }))
            }
            FlashKernel::Unit => Strategy::Unit(BlueprintStrategy::Inferred(())),
        };
        match flash_attention(q.clone(), k.clone(), v.clone(), None, None, options, strategy) {
            Ok(out) => out,
            Err(err) => {
                note_flash_failure(kernel, &format!("{err:?}"));
                burn::tensor::ops::attention::attention_fallback::<CubeBackend<R, f32, i32, u8>>(q, k, v, None, None, options)
            }
        }
    }

    /// The cubecl kernel (its own module: cubecl's prelude shadows burn's `Tensor`).
    mod kernel {
        use burn_cubecl::cubecl;
        use burn_cubecl::cubecl::prelude::*;

        /// Sums `value` over the cube (`CUBE_DIM_X` a power of two) through `shared`; every unit gets
        /// the total. Ends with a barrier, so `shared` can be reused right after.
        #[cube]
        fn cube_sum(value: f32, shared: &mut SharedMemory<f32>) -> f32 {
            let tid = UNIT_POS_X as usize;
            shared[tid] = value;
            sync_cube();
            let mut s = (CUBE_DIM_X / 2) as usize;
            while s > 0 {
                if tid < s {
                    shared[tid] = shared[tid] + shared[tid + s];
                }
                sync_cube();
                s /= 2;
            }
            let total = shared[0];
            sync_cube();
            total
        }

        /// `(v - mean) * rstd * gamma[ch] + beta[ch]`, then `y * sigmoid(y)` when `silu`, in f32.
        #[cube]
        fn normalise<F: Float>(
            v: F,
            ch: usize,
            mean: f32,
            rstd: f32,
            gamma: &Tensor<F>,
            beta: &Tensor<F>,
            #[comptime] silu: bool,
        ) -> F {
            let mut y = (f32::cast_from(v) - mean) * (rstd * f32::cast_from(gamma[ch])) + f32::cast_from(beta[ch]);
            if silu {
                y = y / (f32::new(1.0) + f32::exp(f32::new(0.0) - y));
            }
            F::cast_from(y)
        }

        /// This unit's share of the sum over the group's `len` elements from `base` of `x - centre`
        /// (or of its square when `squared`), in f32. Four independent loads per iteration keep
        /// more memory requests in flight.
        #[cube]
        fn partial_sum<F: Float>(x: &Tensor<F>, base: usize, len: usize, centre: f32, #[comptime] squared: bool) -> f32 {
            let step = CUBE_DIM_X as usize;
            let step4 = step * 4;
            let mut a0 = f32::new(0.0);
            let mut a1 = f32::new(0.0);
            let mut a2 = f32::new(0.0);
            let mut a3 = f32::new(0.0);
            let mut i = UNIT_POS_X as usize;
            while i + 3 * step < len {
                a0 += term::<F>(x[base + i], centre, squared);
                a1 += term::<F>(x[base + i + step], centre, squared);
                a2 += term::<F>(x[base + i + 2 * step], centre, squared);
                a3 += term::<F>(x[base + i + 3 * step], centre, squared);
                i += step4;
            }
            while i < len {
                a0 += term::<F>(x[base + i], centre, squared);
                i += step;
            }
            (a0 + a1) + (a2 + a3)
        }

        /// `v - centre` in f32, squared when `squared`.
        #[cube]
        fn term<F: Float>(v: F, centre: f32, #[comptime] squared: bool) -> f32 {
            let d = f32::cast_from(v) - centre;
            if squared { d * d } else { d }
        }

        /// One cube per (group, batch) = (`CUBE_POS_X`, `CUBE_POS_Y`) over a contiguous
        /// `[N, C, H, W]` input: the group's `cpg * hw` elements are contiguous. Two passes in f32
        /// (mean, then the centred variance), then `y = (x - mean) * rstd * gamma[c] + beta[c]`,
        /// optionally `y * sigmoid(y)`, written in the input's dtype.
        #[cube(launch)]
        pub(super) fn group_norm_kernel<F: Float>(
            x: &Tensor<F>,
            gamma: &Tensor<F>,
            beta: &Tensor<F>,
            out: &mut Tensor<F>,
            cpg: u32,
            hw: u32,
            eps: f32,
            #[comptime] block: usize,
            #[comptime] silu: bool,
            #[define(F)] _dtype: StorageType,
        ) {
            let g = CUBE_POS_X as usize;
            let batch = CUBE_POS_Y as usize;
            let groups = CUBE_COUNT_X as usize;
            let cpg = cpg as usize;
            let hw = hw as usize;
            let len = cpg * hw;
            let base = (batch * groups + g) * len;
            let tid = UNIT_POS_X as usize;
            let step = CUBE_DIM_X as usize;
            let mut shared = SharedMemory::<f32>::new(block);
            let count = f32::cast_from(len as u32);

            let mean = cube_sum(partial_sum::<F>(x, base, len, f32::new(0.0), false), &mut shared) / count;
            let var = cube_sum(partial_sum::<F>(x, base, len, mean, true), &mut shared) / count;
            let rstd = f32::new(1.0) / f32::sqrt(var + eps);

            let first = g * cpg;
            let step4 = step * 4;
            let mut i = tid;
            while i + 3 * step < len {
                let v0 = x[base + i];
                let v1 = x[base + i + step];
                let v2 = x[base + i + 2 * step];
                let v3 = x[base + i + 3 * step];
                out[base + i] = normalise::<F>(v0, first + i / hw, mean, rstd, gamma, beta, silu);
                out[base + i + step] = normalise::<F>(v1, first + (i + step) / hw, mean, rstd, gamma, beta, silu);
                out[base + i + 2 * step] =
                    normalise::<F>(v2, first + (i + 2 * step) / hw, mean, rstd, gamma, beta, silu);
                out[base + i + 3 * step] =
                    normalise::<F>(v3, first + (i + 3 * step) / hw, mean, rstd, gamma, beta, silu);
                i += step4;
            }
            while i < len {
                out[base + i] = normalise::<F>(x[base + i], first + i / hw, mean, rstd, gamma, beta, silu);
                i += step;
            }
        }
    }
}


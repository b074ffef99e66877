//! rfstudio's own GPU kernels, for inference on burn's cubecl backends (CUDA and wgpu).
//!
//! Model code stays generic over `B: Backend`: [`group_norm_silu`] checks at run time whether `B`
//! is exactly `burn::backend::Cuda`, `Wgpu` or `Vulkan` (all `Fusion<CubeBackend<..>>`)
//! and only then runs the custom kernel, registered as a custom operation in burn's fusion
//! stream. Every other backend (burn-flex on the CPU) takes burn's own ops, unchanged, with
//! `RFSTUDIO_GROUPNORM=burn` on these too (read once). `Autodiff<..>` (training) takes
//! `autodiff_ops`' GroupNorm with its memory-efficient backward (`RFSTUDIO_GROUPNORM_BACKWARD=plain`
//! for burn's autodiff of its ops).

use burn::nn::GroupNorm;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;

/// `silu(norm.forward(x))` (or `norm.forward(x)` when `silu` is false), with one fused kernel
/// (mean and variance in f32, normalise, affine, SiLU) on the CUDA and wgpu backends.
///
/// Under autodiff (RFFT's gradient pass) it takes [`super::autodiff_ops::try_group_norm_silu`],
/// whose backward recomputes the normalised input instead of storing burn's intermediates.
pub fn group_norm_silu<B: Backend>(x: Tensor<B, 4>, norm: &GroupNorm<B>, silu: bool) -> Tensor<B, 4> {
    let args = match GroupNormArgs::new(x, norm, silu) {
        Ok(args) => args,
        Err(x) => return burn_group_norm_silu(x, norm, silu),
    };
    let args = if B::ad_enabled(&args.x.device()) {
        match super::autodiff_ops::try_group_norm_silu(args) {
            Ok(y) => return y,
            Err(args) => args,
        }
    } else {
        args
    };
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    let args = match cube::try_group_norm_silu(args) {
        Ok(y) => return y,
        Err(args) => args,
    };
    burn_group_norm_silu(args.x, norm, silu)
}

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

/// burn's own ops: `silu(norm.forward(x))`, or `norm.forward(x)`.
pub fn burn_group_norm_silu<B: Backend>(x: Tensor<B, 4>, norm: &GroupNorm<B>, act: bool) -> Tensor<B, 4> {
    let y = norm.forward(x);
    if act { silu(y) } else { y }
}

/// Whether `RFSTUDIO_GROUPNORM=burn` asks for burn's ops (read once).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn forced_burn() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| {
        std::env::var("RFSTUDIO_GROUPNORM").is_ok_and(|v| v.trim().eq_ignore_ascii_case("burn"))
    })
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
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

    use super::GroupNormArgs;
    use crate::models::dispatch::via;

    /// Threads per cube (one cube per (batch, group)); capped by the device's limits.
    const BLOCK: u32 = 1024;

    /// The custom op when `B` is a backend it supports and the call fits it; `Err` gives the
    /// operands back, untouched, otherwise.
    pub(super) fn try_group_norm_silu<B: Backend>(args: GroupNormArgs<B>) -> Result<Tensor<B, 4>, GroupNormArgs<B>> {
        if super::forced_burn() {
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

    /// A fusion-on-cubecl backend the custom op runs on.
    trait CubeFusion: Backend {
        fn group_norm_silu(args: GroupNormArgs<Self>) -> Result<Tensor<Self, 4>, GroupNormArgs<Self>>;
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

        let client = xp.client.clone();
        let streams = OperationStreams::with_inputs([&xp, &gp, &bp]);
        let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([n, c, h, w]), dtype);
        let desc = CustomOpIr::new("rfstudio_group_norm_silu", &[xp.into_ir(), gp.into_ir(), bp.into_ir()], &[out]);
        let op = GroupNormOp::<R, F, I, BT> {
            desc: desc.clone(),
            groups,
            eps: eps as f32,
            silu,
            _b: PhantomData,
        };
        let y = client.register(streams, OperationIr::Custom(desc), op).output();
        #[cfg(all(test, feature = "wgpu"))]
        super::tests::CUSTOM_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Tensor::from_primitive(TensorPrimitive::Float(y)))
    }

    struct GroupNormOp<R, F, I, BT> {
        desc: CustomOpIr,
        groups: usize,
        eps: f32,
        silu: bool,
        _b: PhantomData<fn() -> (R, F, I, BT)>,
    }

    impl<R, F, I, BT> core::fmt::Debug for GroupNormOp<R, F, I, BT> {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("GroupNormOp")
                .field("desc", &self.desc)
                .field("groups", &self.groups)
                .field("eps", &self.eps)
                .field("silu", &self.silu)
                .finish()
        }
    }

    impl<R, F, I, BT> Operation<<CubeBackend<R, F, I, BT> as FusionBackend>::FusionRuntime> for GroupNormOp<R, F, I, BT>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
    {
        fn execute(
            &self,
            handles: &mut HandleContainer<
                <<CubeBackend<R, F, I, BT> as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle,
            >,
        ) {
            let ([x, gamma, beta], [out]) = self.desc.as_fixed();
            let x = handles.get_float_tensor::<CubeBackend<R, F, I, BT>>(x);
            let gamma = handles.get_float_tensor::<CubeBackend<R, F, I, BT>>(gamma);
            let beta = handles.get_float_tensor::<CubeBackend<R, F, I, BT>>(beta);
            let y = launch::<R>(x, gamma, beta, self.groups, self.eps, self.silu);
            handles.register_float_tensor::<CubeBackend<R, F, I, BT>>(&out.id, y);
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

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use burn::module::Param;
    use burn::nn::GroupNormConfig;
    use burn::tensor::{Distribution, Tensor};

    use super::{burn_group_norm_silu, group_norm_silu};

    /// How many times the custom op was registered (to check it ran, not the fallback).
    pub(super) static CUSTOM_CALLS: AtomicUsize = AtomicUsize::new(0);

    #[test]
    fn kernels_group_norm_silu_matches_burn_on_wgpu() {
        match crate::device::probe_wgpu() {
            Ok(adapters) if !adapters.is_empty() => {}
            other => {
                println!("kernels_group_norm_silu_matches_burn_on_wgpu skipped: no wgpu adapter ({other:?})");
                return;
            }
        }
        let device = burn::backend::wgpu::WgpuDevice::default();
        matches_burn::<burn::backend::Wgpu>("Wgpu", &device);
        // `Vulkan` is its own backend type (see `try_group_norm_silu`), on the same adapter.
        #[cfg(feature = "vulkan")]
        matches_burn::<burn::backend::Vulkan>("Vulkan", &device);
    }

    fn matches_burn<W: burn::tensor::backend::Backend>(name: &str, device: &W::Device) {
        let cases: [([usize; 4], usize, bool); 4] = [
            ([2, 320, 8, 8], 32, true),
            ([1, 64, 5, 7], 8, true),
            ([3, 32, 16, 16], 32, true),
            ([1, 64, 5, 7], 8, false),
        ];
        for (shape, groups, affine) in cases {
            let mut norm = GroupNormConfig::new(groups, shape[1])
                .with_epsilon(1e-5)
                .with_affine(affine)
                .init::<W>(device);
            if affine {
                let c = shape[1];
                norm.gamma = Some(Param::from_tensor(Tensor::random([c], Distribution::Normal(1.0, 0.5), device)));
                norm.beta = Some(Param::from_tensor(Tensor::random([c], Distribution::Normal(0.0, 0.5), device)));
            }
            let x = Tensor::<W, 4>::random(shape, Distribution::Normal(0.0, 1.0), device) * 3.0 + 1.0;
            for act in [true, false] {
                let before = CUSTOM_CALLS.load(Ordering::Relaxed);
                let ours = group_norm_silu(x.clone(), &norm, act);
                assert_eq!(CUSTOM_CALLS.load(Ordering::Relaxed), before + 1, "custom op did not run");
                let reference = burn_group_norm_silu(x.clone(), &norm, act);
                assert_eq!(ours.dims(), shape);
                let diff: f32 = burn::tensor::ElementConversion::elem((ours - reference).abs().max().into_scalar());
                println!("{name} group_norm_silu {shape:?} G{groups} affine={affine} silu={act}: max |diff| {diff:.3e}");
                assert!(diff < 1e-4, "{shape:?} G{groups} silu={act}: max |diff| {diff}");
            }
        }
    }
}

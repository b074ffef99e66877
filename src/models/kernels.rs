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

/// Which of cubek's flash-attention kernels [`flash_attention`] launches (burn 0.21's autotune only
/// ever tries `tc:2|4|8:1:1` and `unit`, and benchmarks them on every new shape). Written
/// `tc:PLANES:Q:KV` or `unit` (see [`FlashKernel::from_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlashKernel {
    /// Tensor-core (cmma, 16x16x16) tiles: `planes` planes per cube, each taking `seq_q` query
    /// tiles of 16 rows against `seq_kv` key tiles of 16 per step of its loop.
    TensorCore { planes: u8, seq_q: u8, seq_kv: u8 },
    /// Per-unit register tiles, no tensor cores (one plane-wide stage of 8-row query tiles).
    Unit,
}

impl FlashKernel {
    /// The kernel `--attention flash` uses (not yet chosen by measurement: see README).
    pub const DEFAULT: FlashKernel = FlashKernel::TensorCore { planes: 4, seq_q: 1, seq_kv: 1 };

    /// The candidates `bench ops` times side by side.
    pub const CANDIDATES: [FlashKernel; 9] = [
        FlashKernel::TensorCore { planes: 2, seq_q: 1, seq_kv: 1 },
        FlashKernel::TensorCore { planes: 4, seq_q: 1, seq_kv: 1 },
        FlashKernel::TensorCore { planes: 8, seq_q: 1, seq_kv: 1 },
        FlashKernel::TensorCore { planes: 4, seq_q: 1, seq_kv: 2 },
        FlashKernel::TensorCore { planes: 4, seq_q: 1, seq_kv: 4 },
        FlashKernel::TensorCore { planes: 4, seq_q: 2, seq_kv: 1 },
        FlashKernel::TensorCore { planes: 4, seq_q: 2, seq_kv: 2 },
        FlashKernel::TensorCore { planes: 8, seq_q: 1, seq_kv: 2 },
        FlashKernel::Unit,
    ];

    /// Query rows and keys a call must be a whole multiple of (and at least) for this kernel:
    /// cubek 0.2 decides whether to check bounds with the divisibility test the wrong way round
    /// (`stage % problem` instead of `problem % stage`), so a sequence shorter than one stage that
    /// divides it would be read out of bounds; whole multiples never need the checks.
    pub fn multiples(self) -> (usize, usize) {
        match self {
            FlashKernel::TensorCore { planes, seq_q, seq_kv } => {
                (16 * planes.max(1) as usize * seq_q.max(1) as usize, 16 * seq_kv.max(1) as usize)
            }
            // 8-row tiles times one plane (up to 64 units): 512 rows; key tiles of at most 16.
            FlashKernel::Unit => (512, 16),
        }
    }

    /// Whether `queries` x `keys` is a whole number of this kernel's tiles ([`Self::multiples`]).
    pub fn takes(self, queries: usize, keys: usize) -> bool {
        let (mq, mkv) = self.multiples();
        queries >= mq && queries % mq == 0 && keys >= mkv && keys % mkv == 0
    }
}

impl std::fmt::Display for FlashKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlashKernel::TensorCore { planes, seq_q, seq_kv } => write!(f, "tc:{planes}:{seq_q}:{seq_kv}"),
            FlashKernel::Unit => write!(f, "unit"),
        }
    }
}

impl std::str::FromStr for FlashKernel {
    type Err = String;
    /// `unit`, or `tc:PLANES:Q:KV` with PLANES in 1..=16 and Q, KV in 1..=8.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        if s == "unit" {
            return Ok(FlashKernel::Unit);
        }
        let bad = || format!("unknown flash-attention kernel `{s}` (use `unit` or `tc:PLANES:Q:KV`, e.g. `tc:4:1:2`)");
        let parts: Vec<&str> = s.split(':').collect();
        let [tag, planes, q, kv] = parts.as_slice() else {
            return Err(bad());
        };
        if *tag != "tc" {
            return Err(bad());
        }
        let num = |v: &str, max: u8| v.parse::<u8>().ok().filter(|n| (1..=max).contains(n));
        match (num(planes, 16), num(q, 8), num(kv, 8)) {
            (Some(planes), Some(seq_q), Some(seq_kv)) => Ok(FlashKernel::TensorCore { planes, seq_q, seq_kv }),
            _ => Err(bad()),
        }
    }
}

/// Non-causal attention `softmax(Q K^T / sqrt(d)) V` on `[batch, heads, n, d]` queries,
/// `[batch, heads, m, d]` keys and `[batch, heads, m, dv]` values with one of cubek's
/// flash-attention kernels, chosen by the caller instead of by autotune, registered as a custom
/// op in burn's fusion stream. `Err` gives the inputs back where it does not apply: a backend
/// other than exactly `Cuda`, `Wgpu` or `Vulkan`, mismatched or broadcast shapes, mixed or
/// unsupported dtypes, or sequence lengths that are not whole multiples of the kernel's tiles
/// ([`FlashKernel::multiples`]). Head dims are the caller's business: the tensor-core kernels need
/// multiples of 16 (see `diffusers_blocks::sdpa_padded`). When the kernel cannot be set up on the
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
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

    use super::{CubekAttention, FlashKernel, GroupNormArgs, note_flash_failure};
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
        super::tests::CUSTOM_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use burn::module::Param;
    use burn::nn::GroupNormConfig;
    use burn::tensor::{Distribution, Tensor};

    use super::{burn_group_norm_silu, group_norm_silu};

    /// How many times the custom op was registered (to check it ran, not the fallback).
    pub(super) static CUSTOM_CALLS: AtomicUsize = AtomicUsize::new(0);

    /// Whether a wgpu adapter is present; says that `test` is skipped when not.
    fn wgpu_adapter(test: &str) -> bool {
        match crate::device::probe_wgpu() {
            Ok(adapters) if !adapters.is_empty() => true,
            other => {
                println!("{test} skipped: no wgpu adapter ({other:?})");
                false
            }
        }
    }

    #[test]
    fn kernels_group_norm_silu_matches_burn_on_wgpu() {
        if !wgpu_adapter("kernels_group_norm_silu_matches_burn_on_wgpu") {
            return;
        }
        let device = burn::backend::wgpu::WgpuDevice::default();
        matches_burn::<burn::backend::Wgpu>("Wgpu", &device);
        // `Vulkan` is its own backend type (see `try_group_norm_silu`), on the same adapter.
        #[cfg(feature = "vulkan")]
        matches_burn::<burn::backend::Vulkan>("Vulkan", &device);
    }

    /// cubek's flash kernels through the custom op against the matmul form: `unit` runs on any
    /// Vulkan device with subgroups (its tiles are f16, hence the tolerance); the tensor-core
    /// kernels run where the device has cooperative matrices and otherwise must report why and
    /// give burn's unfused attention (then exact to rounding).
    #[test]
    fn kernels_flash_attention_matches_matmul_on_wgpu() {
        use crate::models::diffusers_blocks::sdpa_matmul;

        use super::{FlashKernel, clear_flash_failures, flash_attention, flash_failures};

        if !wgpu_adapter("kernels_flash_attention_matches_matmul_on_wgpu") {
            return;
        }
        type W = burn::backend::Wgpu;
        let device = burn::backend::wgpu::WgpuDevice::default();
        for (n, m, d, dv) in [(512usize, 512usize, 48usize, 48usize), (1024, 64, 16, 32)] {
            let q = Tensor::<W, 4>::random([2, 3, n, d], Distribution::Normal(0.0, 1.0), &device);
            let k = Tensor::<W, 4>::random([2, 3, m, d], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<W, 4>::random([2, 3, m, dv], Distribution::Normal(0.0, 1.0), &device);
            let reference = sdpa_matmul(q.clone(), k.clone(), v.clone(), false);
            for kernel in [FlashKernel::Unit, FlashKernel::DEFAULT, FlashKernel::TensorCore { planes: 4, seq_q: 2, seq_kv: 2 }] {
                clear_flash_failures();
                let Ok(out) = flash_attention(q.clone(), k.clone(), v.clone(), kernel) else {
                    panic!("{kernel} {n}x{m}: the op did not take a shape that is a whole number of its tiles");
                };
                assert_eq!(out.dims(), [2, 3, n, dv]);
                let diff: f32 = burn::tensor::ElementConversion::elem((out - reference.clone()).abs().max().into_scalar());
                let failed = flash_failures().into_iter().find(|(k, _)| *k == kernel);
                println!("flash {kernel} {n}x{m} d{d}/{dv}: max |diff| {diff:.3e}, {}", failed.as_ref().map_or("ran".to_string(), |(_, why)| format!("fell back: {why}")));
                let tolerance = if failed.is_some() { 1e-5 } else { 3e-3 };
                assert!(diff < tolerance, "{kernel} {n}x{m}: max |diff| {diff}");
                if kernel == FlashKernel::Unit {
                    assert!(failed.is_none(), "the unit kernel needs no tensor cores: {failed:?}");
                }
            }
        }
        // Inputs as the models give them at head dims that need no padding (80, 160): views with
        // the heads swapped out of `[batch, tokens, heads, d]`, not contiguous.
        let view = |t: usize, d: usize| Tensor::<W, 4>::random([1, t, 2, d], Distribution::Normal(0.0, 1.0), &device).swap_dims(1, 2);
        let (q, k, v) = (view(512, 32), view(512, 32), view(512, 32));
        let reference = sdpa_matmul(q.clone(), k.clone(), v.clone(), false);
        let Ok(out) = flash_attention(q.clone(), k.clone(), v.clone(), FlashKernel::Unit) else {
            panic!("unit 512x512 on views: not taken");
        };
        let diff: f32 = burn::tensor::ElementConversion::elem((out - reference.clone()).abs().max().into_scalar());
        println!("flash unit on swapped-head views 512x512 d32: max |diff| {diff:.3e}");
        assert!(diff < 3e-3, "views: max |diff| {diff}");
        // burn's autotuned op through the custom op (contiguous inputs), and burn's own op on the
        // views as it is (printed only: which kernel autotune picks depends on the device).
        let Ok(tuned) = super::autotuned_attention(q.clone(), k.clone(), v.clone(), false) else {
            panic!("autotuned attention on views: not taken");
        };
        let diff: f32 = burn::tensor::ElementConversion::elem((tuned - reference.clone()).abs().max().into_scalar());
        println!("autotuned attention (contiguous inputs) on swapped-head views 512x512 d32: max |diff| {diff:.3e}");
        assert!(diff < 3e-3, "autotuned on views: max |diff| {diff}");
        let burn_op = crate::models::diffusers_blocks::sdpa_fused(q, k, v, false);
        let diff: f32 = burn::tensor::ElementConversion::elem((burn_op - reference).abs().max().into_scalar());
        println!("burn's attention op on swapped-head views 512x512 d32: max |diff| {diff:.3e}");
        // Shapes that are not whole tiles, and a broadcast key, are given back.
        let q = Tensor::<W, 4>::random([1, 2, 100, 16], Distribution::Normal(0.0, 1.0), &device);
        assert!(flash_attention(q.clone(), q.clone(), q.clone(), FlashKernel::DEFAULT).is_err());
        let q = Tensor::<W, 4>::random([1, 2, 512, 16], Distribution::Normal(0.0, 1.0), &device);
        let kb = Tensor::<W, 4>::random([1, 1, 512, 16], Distribution::Normal(0.0, 1.0), &device);
        assert!(flash_attention(q, kb.clone(), kb, FlashKernel::Unit).is_err());
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

//! Building blocks shared by diffusers' UNet, ControlNet and VAE, named after their diffusers
//! classes and checkpoint keys so that real weights load without remapping:
//!
//! | ours                  | diffusers                                         |
//! |-----------------------|---------------------------------------------------|
//! | `ResnetBlock2D`       | `models/resnet.py::ResnetBlock2D`                 |
//! | `SpatialAttention`    | `models/attention_processor.py::Attention` with `norm_num_groups` (VAE / mid blocks) |
//! | `UNetMidBlock2D`      | `models/unets/unet_2d_blocks.py::UNetMidBlock2D`  |

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::kernels::{self, FlashKernel, group_norm_silu};

/// A 3x3 convolution with padding 1 (the diffusers default everywhere).
pub fn conv3x3<B: Backend>(cin: usize, cout: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([cin, cout], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

/// A 1x1 convolution.
pub fn conv1x1<B: Backend>(cin: usize, cout: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([cin, cout], [1, 1]).init(device)
}

pub fn group_norm<B: Backend>(groups: usize, channels: usize, eps: f64, device: &B::Device) -> GroupNorm<B> {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// `ResnetBlock2D` (pre-norm, SiLU, optional time embedding, 1x1 shortcut when channels change).
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    pub norm1: GroupNorm<B>,
    pub conv1: Conv2d<B>,
    pub time_emb_proj: Option<Linear<B>>,
    pub norm2: GroupNorm<B>,
    pub conv2: Conv2d<B>,
    pub conv_shortcut: Option<Conv2d<B>>,
}

/// Shape of a `ResnetBlock2D`.
#[derive(Clone, Debug)]
pub struct ResnetBlock2DConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Time-embedding width, or `None` (VAE).
    pub temb_channels: Option<usize>,
    /// GroupNorm groups (32 in SD).
    pub groups: usize,
    /// GroupNorm epsilon (1e-5 in the UNet, 1e-6 in the VAE).
    pub eps: f64,
}

impl ResnetBlock2DConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> ResnetBlock2D<B> {
        let (cin, cout) = (self.in_channels, self.out_channels);
        ResnetBlock2D {
            norm1: group_norm(self.groups, cin, self.eps, device),
            conv1: conv3x3(cin, cout, device),
            time_emb_proj: self
                .temb_channels
                .map(|t| LinearConfig::new(t, cout).init(device)),
            norm2: group_norm(self.groups, cout, self.eps, device),
            conv2: conv3x3(cout, cout, device),
            conv_shortcut: (cin != cout).then(|| conv1x1(cin, cout, device)),
        }
    }
}

impl<B: Backend> ResnetBlock2D<B> {
    /// `x`: [B, C, H, W]; `temb`: [B, T] (already the time embedding, before SiLU).
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<&Tensor<B, 2>>) -> Tensor<B, 4> {
        // 1. first conv
        let h = self.conv1.forward(group_norm_silu(x.clone(), &self.norm1, true));
        // 2. add the projected time embedding per channel
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(silu(t.clone()));
                let [b, c] = t.dims();
                h + t.reshape([b, c, 1, 1])
            }
            _ => h,
        };
        // 3. second conv
        let h = self.conv2.forward(group_norm_silu(h, &self.norm2, true));
        // 4. residual
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        shortcut + h
    }
}

/// Split [B, N, heads*d] into [B, heads, N, d].
pub fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, n, c] = x.dims();
    x.reshape([b, n, heads, c / heads]).swap_dims(1, 2)
}

/// Merge [B, heads, N, d] into [B, N, heads*d].
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, n, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, n, h * d])
}

/// How [`sdpa`] computes attention. burn 0.21 offers a fused (flash) attention op with autotune;
/// on an H100 with SD 1.5's 40-wide heads, a plain `softmax(QK^T)V` of three kernels was faster
/// for self-attention over 4096 tokens (f16, 2x8 heads: 2.46 ms vs 3.80 ms) and slightly slower
/// for cross-attention over 77 text tokens (0.213 vs 0.192 ms). Both are exact to rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Fused everywhere, except long key sequences (>= 1024) on backends that asked for the
    /// matmul form with [`prefer_matmul_for_long_attention`] (the CUDA backend does).
    Auto,
    /// burn's `attention` op (flash attention where the backend has one, picked by autotune).
    Fused,
    /// `softmax(Q K^T * scale) V` with two matmuls.
    Matmul,
    /// On the cubecl backends (CUDA, wgpu), cubek's flash-attention kernel named here, without
    /// autotune ([`kernels::flash_attention`]); shapes it cannot tile take the matmul form.
    /// Elsewhere the same as `Fused`.
    Flash(FlashKernel),
}

static ATTENTION_IMPL: std::sync::RwLock<AttentionImpl> = std::sync::RwLock::new(AttentionImpl::Auto);
static LONG_ATTENTION_MATMUL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Key-sequence length from which [`AttentionImpl::Auto`] may use the matmul form.
pub const LONG_ATTENTION: usize = 1024;

/// Choose the attention implementation for the whole process (e.g. from `RFSTUDIO_ATTENTION`).
pub fn set_attention_impl(imp: AttentionImpl) {
    *ATTENTION_IMPL.write().unwrap_or_else(|e| e.into_inner()) = imp;
}

/// Called by the device layer: whether `Auto` uses the matmul form for long key sequences.
pub fn prefer_matmul_for_long_attention(on: bool) {
    LONG_ATTENTION_MATMUL.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The attention implementation in use.
pub fn attention_impl() -> AttentionImpl {
    *ATTENTION_IMPL.read().unwrap_or_else(|e| e.into_inner())
}

impl std::str::FromStr for AttentionImpl {
    type Err = String;
    /// `auto`, `fused`, `matmul`, `flash` (the default kernel) or `flash:KERNEL` (`flash:unit`,
    /// `flash:tc:4:1:2`, see [`FlashKernel`]).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => return Ok(Self::Auto),
            "fused" => return Ok(Self::Fused),
            "matmul" | "naive" => return Ok(Self::Matmul),
            "flash" => return Ok(Self::Flash(FlashKernel::DEFAULT)),
            _ => {}
        }
        match s.strip_prefix("flash:") {
            Some(kernel) => kernel.parse().map(Self::Flash),
            None => Err(format!(
                "unknown attention implementation `{s}` (use auto, fused, matmul, flash or flash:KERNEL, e.g. flash:tc:4:1:2)"
            )),
        }
    }
}

impl std::fmt::Display for AttentionImpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttentionImpl::Auto => write!(f, "auto"),
            AttentionImpl::Fused => write!(f, "fused"),
            AttentionImpl::Matmul => write!(f, "matmul"),
            AttentionImpl::Flash(kernel) => write!(f, "flash:{kernel}"),
        }
    }
}

/// Scaled dot-product attention on [B, heads, N, d] tensors, by [`attention_impl`].
///
/// Under autodiff (RFFT's gradient pass) non-causal calls take [`super::autodiff_ops`]'s op, whose
/// backward recomputes the attention probabilities instead of storing them.
pub fn sdpa<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, causal: bool) -> Tensor<B, 4> {
    let (q, k, v) = if !causal && B::ad_enabled(&q.device()) {
        match super::autodiff_ops::try_attention(q, k, v) {
            Ok(out) => return out,
            Err(qkv) => qkv,
        }
    } else {
        (q, k, v)
    };
    let matmul = match attention_impl() {
        AttentionImpl::Fused => false,
        AttentionImpl::Matmul => true,
        AttentionImpl::Auto => {
            LONG_ATTENTION_MATMUL.load(std::sync::atomic::Ordering::Relaxed) && k.dims()[2] >= LONG_ATTENTION
        }
        AttentionImpl::Flash(kernel) if !causal && flash_shaping() => {
            return sdpa_flash(q, k, v, kernel);
        }
        AttentionImpl::Flash(_) => false,
    };
    if matmul { sdpa_matmul(q, k, v, causal) } else { sdpa_fused(q, k, v, causal) }
}

/// Non-causal attention with the cubek flash kernel `kernel` ([`kernels::flash_attention`]):
/// head dims padded to a multiple of 16 for the tensor-core tiles ([`sdpa_padded`]); calls it
/// does not take (sequence lengths that are not whole multiples of its tiles, head dims above
/// [`FLASH_MAX_HEAD_DIM`] such as the VAE's single 512-wide head, backends other than the cubecl
/// ones) take [`sdpa_matmul`].
pub fn sdpa_flash<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, kernel: FlashKernel) -> Tensor<B, 4> {
    let wide = q.dims()[3].max(v.dims()[3]) > FLASH_MAX_HEAD_DIM;
    if !flash_shaping() || wide || !kernel.takes(q.dims()[2], k.dims()[2]) {
        return sdpa_matmul(q, k, v, false);
    }
    sdpa_padded(q, k, v, FLASH_HEAD_MULTIPLE, |q, k, v| match kernels::flash_attention(q, k, v, kernel) {
        Ok(out) => out,
        Err((q, k, v)) => sdpa_matmul(q, k, v, false),
    })
}

/// burn's fused `attention` op with the default 1/sqrt(d) scale.
///
/// On backends that asked for it with [`shape_attention_for_flash`] (the cubecl ones: CUDA, wgpu),
/// the call is shaped for cubecl's tensor-core flash-attention kernel, which burn 0.21's autotune
/// only picks when the head dim is a multiple of 16 and the query length a multiple of 16 x its plane
/// count (else it runs an *unfused* softmax(QK^T)V fallback, 3.8 ms against 2.5 ms for our matmul
/// form on the H100): head dims like SD 1.5's 40 are zero-padded ([`sdpa_fused_padded`]), and query
/// lengths that are not a multiple of [`FLASH_SEQ_MULTIPLE`] or key lengths that are not a multiple
/// of [`FLASH_KV_MULTIPLE`] (the 77 text tokens of cross-attention, whose partial tiles the kernel
/// cannot tile at long query lengths) take [`sdpa_matmul`]. The latter also
/// keeps every call that reaches the kernel valid for it: cubecl's autotune cache rounds shapes to
/// buckets, and a bucket tuned to the flash kernel would otherwise panic on an invalid shape.
/// There the op runs through [`kernels::autotuned_attention`], which hands burn contiguous
/// tensors: cubek's flash kernels read views such as [`split_heads`]' wrongly.
pub fn sdpa_fused<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, causal: bool) -> Tensor<B, 4> {
    if flash_shaping() {
        // burn's autodiff backend always computes `attention` with its unfused fallback (there
        // is no flash backward): padding would only add work there.
        if B::ad_enabled(&q.device()) {
            return sdpa_matmul(q, k, v, causal);
        }
        if q.dims()[2] % FLASH_SEQ_MULTIPLE != 0 || k.dims()[2] % FLASH_KV_MULTIPLE != 0 {
            return sdpa_matmul(q, k, v, causal);
        }
        return sdpa_padded(q, k, v, FLASH_HEAD_MULTIPLE, |q, k, v| match kernels::autotuned_attention(q, k, v, causal) {
            Ok(out) => out,
            Err((q, k, v)) => fused_op(q, k, v, causal),
        });
    }
    fused_op(q, k, v, causal)
}

fn fused_op<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, causal: bool) -> Tensor<B, 4> {
    attention(
        q,
        k,
        v,
        None,
        None,
        AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: causal,
        },
    )
}

/// `op` (an attention with the default 1/sqrt(head dim) scale: burn's fused op, a cubek flash
/// kernel) with the head dims of Q/K and of V zero-padded to a multiple of `multiple`; exact:
/// zero columns add nothing to QK^T, Q is pre-scaled by sqrt(d_padded / d) so that the op's own
/// 1/sqrt(d_padded) scale (an explicit scale would send burn to its unfused fallback) gives
/// 1/sqrt(d), and the padded output columns are cut off.
pub fn sdpa_padded<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    multiple: usize,
    op: impl FnOnce(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let round_up = |n: usize| n.div_ceil(multiple.max(1)) * multiple.max(1);
    let d = q.dims()[3];
    let dv = v.dims()[3];
    let (dp, dvp) = (round_up(d), round_up(dv));
    if dp == d && dvp == dv {
        return op(q, k, v);
    }
    let pad = |t: Tensor<B, 4>, to: usize| {
        let [b, h, n, c] = t.dims();
        if to == c {
            return t;
        }
        let zeros = Tensor::<B, 4>::zeros([b, h, n, to - c], &t.device()).cast(t.dtype());
        Tensor::cat(vec![t, zeros], 3)
    };
    let q = pad(q.mul_scalar((dp as f64 / d as f64).sqrt()), dp);
    let out = op(q, pad(k, dp), pad(v, dvp));
    let [b, h, n, _] = out.dims();
    out.slice([0..b, 0..h, 0..n, 0..dv])
}

/// Head-dim multiple of cubecl's tensor-core attention tiles (16x16x16 in f16).
pub const FLASH_HEAD_MULTIPLE: usize = 16;
/// Widest head [`sdpa_flash`] gives a flash kernel (SD 1.5's UNet tops out at 160): a flash
/// kernel keeps a query tile's whole head in registers / shared memory.
pub const FLASH_MAX_HEAD_DIM: usize = 160;
/// Query-length multiple that every plane count burn's autotune tries (2, 4, 8 planes of 16 rows) accepts.
pub const FLASH_SEQ_MULTIPLE: usize = 128;

/// Key-length multiple for the flash kernel (whole 16-key tiles for every partition we rely on).
pub const FLASH_KV_MULTIPLE: usize = 64;

static FLASH_SHAPES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Called by the device layer for the cubecl backends: shape fused-attention calls for the
/// tensor-core flash kernel (see [`sdpa_fused`]).
pub fn shape_attention_for_flash(on: bool) {
    FLASH_SHAPES.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the device layer asked for [`shape_attention_for_flash`] (a cubecl backend runs).
pub fn flash_shaping() -> bool {
    FLASH_SHAPES.load(std::sync::atomic::Ordering::Relaxed)
}

/// `softmax(Q K^T / sqrt(d) [+ causal mask]) V` in two matmuls.
pub fn sdpa_matmul<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, causal: bool) -> Tensor<B, 4> {
    let [_, _, nq, d] = q.dims();
    let nk = k.dims()[2];
    let scores = q.mul_scalar(1.0 / (d as f64).sqrt()).matmul(k.swap_dims(2, 3));
    let scores = if causal {
        let mask = Tensor::<B, 2, burn::tensor::Bool>::tril_mask([nq, nk], 0, &scores.device());
        scores.mask_fill(mask.unsqueeze::<4>(), f32::NEG_INFINITY)
    } else {
        scores
    };
    burn::tensor::activation::softmax(scores, 3).matmul(v)
}

/// diffusers `Attention` over the spatial positions of a feature map, with its own GroupNorm and
/// a residual connection (the VAE's and `UNetMidBlock2D`'s attention).
#[derive(Module, Debug)]
pub struct SpatialAttention<B: Backend> {
    pub group_norm: GroupNorm<B>,
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    /// `to_out.0` (diffusers keeps a dropout at index 1, which has no weights).
    pub to_out: Vec<Linear<B>>,
    pub heads: usize,
}

impl<B: Backend> SpatialAttention<B> {
    pub fn new(channels: usize, head_dim: usize, groups: usize, eps: f64, device: &B::Device) -> Self {
        let lin = || LinearConfig::new(channels, channels).init(device);
        Self {
            group_norm: group_norm(groups, channels, eps, device),
            to_q: lin(),
            to_k: lin(),
            to_v: lin(),
            to_out: vec![lin()],
            heads: (channels / head_dim.max(1)).max(1),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        // 1. normalise and flatten to tokens [B, HW, C]
        let tokens = group_norm_silu(x, &self.group_norm, false)
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        // 2. attention over the HW tokens
        let q = split_heads(self.to_q.forward(tokens.clone()), self.heads);
        let k = split_heads(self.to_k.forward(tokens.clone()), self.heads);
        let v = split_heads(self.to_v.forward(tokens), self.heads);
        let out = merge_heads(sdpa(q, k, v, false));
        // 3. project back and restore the map
        let out = self.to_out[0]
            .forward(out)
            .swap_dims(1, 2)
            .reshape([b, c, h, w]);
        out + residual
    }
}

/// `UNetMidBlock2D`: resnet, (attention, resnet) x layers. Used by the VAE encoder and decoder.
#[derive(Module, Debug)]
pub struct UNetMidBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<SpatialAttention<B>>,
}

/// Shape of a `UNetMidBlock2D`.
#[derive(Clone, Debug)]
pub struct UNetMidBlock2DConfig {
    /// Channels (unchanged through the block).
    pub channels: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// Attention head dimension (the VAE uses one head of `channels`).
    pub head_dim: usize,
    /// Time-embedding width (`None` for the VAE).
    pub temb_channels: Option<usize>,
}

impl UNetMidBlock2DConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> UNetMidBlock2D<B> {
        let resnet = ResnetBlock2DConfig {
            in_channels: self.channels,
            out_channels: self.channels,
            temb_channels: self.temb_channels,
            groups: self.groups,
            eps: self.eps,
        };
        UNetMidBlock2D {
            resnets: vec![resnet.init(device), resnet.init(device)],
            attentions: vec![SpatialAttention::new(
                self.channels,
                self.head_dim,
                self.groups,
                self.eps,
                device,
            )],
        }
    }
}

impl<B: Backend> UNetMidBlock2D<B> {
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<&Tensor<B, 2>>) -> Tensor<B, 4> {
        let mut h = self.resnets[0].forward(x, temb);
        for (attn, resnet) in self.attentions.iter().zip(self.resnets.iter().skip(1)) {
            h = attn.forward(h);
            h = resnet.forward(h, temb);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type B = burn::backend::Flex;

    /// The two attention implementations agree, with and without the causal mask.
    #[test]
    fn attention_impls_agree() {
        let device = Default::default();
        let q = Tensor::<B, 4>::random([2, 3, 7, 8], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<B, 4>::random([2, 3, 7, 8], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<B, 4>::random([2, 3, 7, 8], Distribution::Normal(0.0, 1.0), &device);
        for causal in [false, true] {
            let fused = sdpa_fused(q.clone(), k.clone(), v.clone(), causal);
            let plain = sdpa_matmul(q.clone(), k.clone(), v.clone(), causal);
            let err = (fused - plain).abs().max().into_scalar();
            assert!(err < 1e-5, "causal {causal}: max abs difference {err}");
        }
        // The causal mask really masks: the first query sees only the first key.
        let out = sdpa_matmul(q.clone(), k.clone(), v.clone(), true);
        let first = out.slice([0..2, 0..3, 0..1, 0..8]);
        let err = (first - v.slice([0..2, 0..3, 0..1, 0..8])).abs().max().into_scalar();
        assert!(err < 1e-6, "first causal row must equal v[0]: {err}");
    }

    /// `--attention` values: the flash kernels by name, and clear errors for the rest.
    #[test]
    fn attention_impl_parses_flash_kernels() {
        let parse = |s: &str| s.parse::<AttentionImpl>();
        assert_eq!(parse("flash"), Ok(AttentionImpl::Flash(FlashKernel::DEFAULT)));
        assert_eq!(parse("flash:unit"), Ok(AttentionImpl::Flash(FlashKernel::Unit)));
        assert_eq!(
            parse(" FLASH:TC:8:2:1 "),
            Ok(AttentionImpl::Flash(FlashKernel::TensorCore { planes: 8, seq_q: 2, seq_kv: 1 }))
        );
        assert_eq!(parse("fused"), Ok(AttentionImpl::Fused));
        for bad in ["flash:tc:0:1:1", "flash:tc:4:1", "flash:tc:4:1:9", "flash:tc:a:1:1", "flash:wgmma", "flashy", ""] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("flash") && err.contains('`'), "{bad}: {err}");
        }
        // Display gives back what parses to the same choice.
        for imp in FlashKernel::CANDIDATES.map(AttentionImpl::Flash).into_iter().chain([AttentionImpl::Auto, AttentionImpl::Matmul]) {
            assert_eq!(parse(&imp.to_string()), Ok(imp));
        }
        assert_eq!(FlashKernel::TensorCore { planes: 4, seq_q: 2, seq_kv: 2 }.multiples(), (128, 32));
    }

    /// Off the cubecl backends (and for shapes its tiles do not cover) a flash call is the matmul
    /// form (to rounding: `padded_attention_is_exact` may switch the cubecl shaping on meanwhile,
    /// and the padded form rounds differently).
    #[test]
    fn sdpa_flash_elsewhere_is_the_matmul_form() {
        let device = Default::default();
        for (n, m) in [(64usize, 64usize), (7, 77)] {
            let q = Tensor::<B, 4>::random([1, 2, n, 40], Distribution::Normal(0.0, 1.0), &device);
            let k = Tensor::<B, 4>::random([1, 2, m, 40], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<B, 4>::random([1, 2, m, 40], Distribution::Normal(0.0, 1.0), &device);
            for kernel in FlashKernel::CANDIDATES {
                let flash = sdpa_flash(q.clone(), k.clone(), v.clone(), kernel);
                let err = (flash - sdpa_matmul(q.clone(), k.clone(), v.clone(), false)).abs().max().into_scalar();
                assert!(err < 1e-5, "{kernel} {n}x{m}: max abs difference {err}");
            }
            assert!(kernels::flash_attention(q.clone(), k.clone(), v.clone(), FlashKernel::DEFAULT).is_err());
        }
    }

    /// Padding the head dims for the flash kernel (40 -> 48 as SD 1.5's, and a V narrower than Q/K)
    /// gives the same attention.
    #[test]
    fn padded_attention_is_exact() {
        let device = Default::default();
        for (d, dv) in [(40usize, 40usize), (5, 3), (16, 16)] {
            let q = Tensor::<B, 4>::random([2, 3, 9, d], Distribution::Normal(0.0, 1.0), &device);
            let k = Tensor::<B, 4>::random([2, 3, 11, d], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<B, 4>::random([2, 3, 11, dv], Distribution::Normal(0.0, 1.0), &device);
            let padded = sdpa_padded(q.clone(), k.clone(), v.clone(), FLASH_HEAD_MULTIPLE, |q, k, v| sdpa_fused(q, k, v, false));
            assert_eq!(padded.dims(), [2, 3, 9, dv]);
            let plain = sdpa_matmul(q, k, v, false);
            let err = (padded - plain).abs().max().into_scalar();
            assert!(err < 1e-5, "d {d} dv {dv}: max abs difference {err}");
        }
        // With the cubecl shaping on (a process-wide switch; every path it picks is exact, so
        // other tests running meanwhile are unaffected): padded at 128 queries and 64 keys, matmul
        // at 7 queries or 77 keys.
        shape_attention_for_flash(true);
        for (n, m) in [(128usize, 64usize), (7, 64), (128, 77)] {
            let q = Tensor::<B, 4>::random([1, 2, n, 40], Distribution::Normal(0.0, 1.0), &device);
            let k = Tensor::<B, 4>::random([1, 2, m, 40], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<B, 4>::random([1, 2, m, 40], Distribution::Normal(0.0, 1.0), &device);
            let err = (sdpa_fused(q.clone(), k.clone(), v.clone(), false) - sdpa_matmul(q, k, v, false))
                .abs()
                .max()
                .into_scalar();
            assert!(err < 1e-5, "{n} queries, {m} keys: max abs difference {err}");
        }
        // Under autodiff (RFFT's gradient pass) the matmul form runs, and gradients reach Q.
        type AB = burn::backend::Autodiff<B>;
        let q = Tensor::<AB, 4>::random([1, 2, 128, 40], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let k = Tensor::<AB, 4>::random([1, 2, 64, 40], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<AB, 4>::random([1, 2, 64, 40], Distribution::Normal(0.0, 1.0), &device);
        let out = sdpa_fused(q.clone(), k.clone(), v.clone(), false);
        let err = (out.clone() - sdpa_matmul(q.clone(), k, v, false)).abs().max().into_scalar();
        assert!(err < 1e-5, "autodiff: max abs difference {err}");
        let grads = out.powf_scalar(2.0).sum().backward();
        let g = q.grad(&grads).expect("a gradient for Q");
        assert_eq!(g.dims(), [1, 2, 128, 40]);
        shape_attention_for_flash(false);
    }
}

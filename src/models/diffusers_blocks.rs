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
use super::fused::{group_norm_silu, sdpa};

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


//! `AutoencoderKL` (the SD VAE): encoder to the latent distribution, decoder back to pixels,
//! quant / post-quant 1x1 convolutions, built from `vae/config.json`.
//!
//! | ours                 | diffusers                                                     |
//! |----------------------|---------------------------------------------------------------|
//! | `Encoder`            | `autoencoders/vae.py::Encoder`                                |
//! | `Decoder`            | `autoencoders/vae.py::Decoder`                                |
//! | `EncoderBlock`       | `DownEncoderBlock2D` (downsample: pad (0,1,0,1), conv s2 p0)  |
//! | `DecoderBlock`       | `UpDecoderBlock2D`                                            |
//! | `AutoencoderKL`      | `autoencoders/autoencoder_kl.py::AutoencoderKL`               |
//!
//! Older SD 1.x VAE files name the mid-block attention `query/key/value/proj_attn` (sometimes as
//! 1x1-conv shaped tensors); `vae_remap` maps them to `to_q/to_k/to_v/to_out.0`.

use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::Deserialize;

use super::diffusers_blocks::{
    ResnetBlock2D, ResnetBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig, conv1x1, conv3x3,
    group_norm,
};
use super::unet::{ConfigError, Upsample2D, read_config};
use super::fused::group_norm_silu;
use super::weights::KeyRemap;

/// `vae/config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    /// (128, 256, 512, 512) in SD 1.5.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (2); decoder blocks have one more.
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// 4 in SD 1.5.
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups32")]
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding (0.18215 for SD 1.5).
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn groups32() -> usize {
    32
}
fn sd_scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

const VAE_EPS: f64 = 1e-6;

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let c: Self = read_config(path)?;
        c.validate(&path.display().to_string())
    }

    /// A config given as JSON (inferred from a single-file checkpoint); `label` names it.
    pub fn from_value(value: serde_json::Value, label: &str) -> Result<Self, ConfigError> {
        let c: Self = serde_json::from_value(value).map_err(|e| ConfigError::Read {
            path: label.to_string(),
            reason: format!("invalid config: {e}"),
        })?;
        c.validate(label)
    }

    fn validate(self, path: &str) -> Result<Self, ConfigError> {
        let c = self;
        if c.block_out_channels.is_empty() {
            return Err(ConfigError::Unsupported {
                path: path.to_string(),
                field: "block_out_channels",
                value: "[]".into(),
                hint: "at least one block",
            });
        }
        if !c.mid_block_add_attention {
            return Err(ConfigError::Unsupported {
                path: path.to_string(),
                field: "mid_block_add_attention",
                value: "false".into(),
                hint: "true",
            });
        }
        Ok(c)
    }

    /// Pixels per latent cell along each side (8 for SD).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    fn resnet(&self, cin: usize, cout: usize) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: VAE_EPS,
        }
    }

    fn mid<B: Backend>(&self, device: &B::Device) -> UNetMidBlock2D<B> {
        let c = *self.block_out_channels.last().unwrap_or(&1);
        UNetMidBlock2DConfig {
            channels: c,
            groups: self.norm_num_groups,
            eps: VAE_EPS,
            head_dim: c,
            temb_channels: None,
        }
        .init(device)
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> AutoencoderKL<B> {
        let boc = &self.block_out_channels;
        let n = boc.len();
        let last = boc[n - 1];
        let mut out_ch = boc[0];
        let down_blocks = (0..n)
            .map(|i| {
                let in_ch = out_ch;
                out_ch = boc[i];
                EncoderBlock {
                    resnets: (0..self.layers_per_block)
                        .map(|j| self.resnet(if j == 0 { in_ch } else { out_ch }, out_ch).init(device))
                        .collect(),
                    downsamplers: if i == n - 1 {
                        Vec::new()
                    } else {
                        vec![VaeDownsample {
                            conv: Conv2dConfig::new([out_ch, out_ch], [3, 3])
                                .with_stride([2, 2])
                                .with_padding(PaddingConfig2d::Valid)
                                .init(device),
                        }]
                    },
                }
            })
            .collect();
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        let up_blocks = (0..n)
            .map(|i| {
                let prev = out_ch;
                out_ch = rev[i];
                DecoderBlock {
                    resnets: (0..self.layers_per_block + 1)
                        .map(|j| self.resnet(if j == 0 { prev } else { out_ch }, out_ch).init(device))
                        .collect(),
                    upsamplers: if i == n - 1 {
                        Vec::new()
                    } else {
                        vec![Upsample2D::new(out_ch, device)]
                    },
                }
            })
            .collect();
        let z = self.latent_channels;
        AutoencoderKL {
            encoder: Encoder {
                conv_in: conv3x3(self.in_channels, boc[0], device),
                down_blocks,
                mid_block: self.mid(device),
                conv_norm_out: group_norm(self.norm_num_groups, last, VAE_EPS, device),
                conv_out: conv3x3(last, 2 * z, device),
            },
            decoder: Decoder {
                conv_in: conv3x3(z, last, device),
                mid_block: self.mid(device),
                up_blocks,
                conv_norm_out: group_norm(self.norm_num_groups, boc[0], VAE_EPS, device),
                conv_out: conv3x3(boc[0], self.out_channels, device),
            },
            quant_conv: self.use_quant_conv.then(|| conv1x1(2 * z, 2 * z, device)),
            post_quant_conv: self.use_post_quant_conv.then(|| conv1x1(z, z, device)),
            scaling_factor: self.scaling_factor,
        }
    }
}

/// The encoder's downsampler: zero pad right/bottom by one, then a 3x3 stride-2 conv.
#[derive(Module, Debug)]
pub struct VaeDownsample<B: Backend> {
    pub conv: Conv2d<B>,
}

impl<B: Backend> VaeDownsample<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let device = x.device();
        let x = Tensor::cat(vec![x, Tensor::zeros([b, c, h, 1], &device)], 3);
        let x = Tensor::cat(vec![x, Tensor::zeros([b, c, 1, w + 1], &device)], 2);
        self.conv.forward(x)
    }
}

#[derive(Module, Debug)]
pub struct EncoderBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub downsamplers: Vec<VaeDownsample<B>>,
}

#[derive(Module, Debug)]
pub struct DecoderBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub upsamplers: Vec<Upsample2D<B>>,
}

#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub down_blocks: Vec<EncoderBlock<B>>,
    pub mid_block: UNetMidBlock2D<B>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub mid_block: UNetMidBlock2D<B>,
    pub up_blocks: Vec<DecoderBlock<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

#[derive(Module, Debug)]
pub struct AutoencoderKL<B: Backend> {
    pub encoder: Encoder<B>,
    pub decoder: Decoder<B>,
    pub quant_conv: Option<Conv2d<B>>,
    pub post_quant_conv: Option<Conv2d<B>>,
    pub scaling_factor: f64,
}

/// The encoder's diagonal Gaussian over latents.
pub struct LatentDist<B: Backend> {
    pub mean: Tensor<B, 4>,
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> LatentDist<B> {
    /// mean + std * noise, with logvar clamped to [-30, 20] as diffusers does.
    pub fn sample(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        let std = self.logvar.clone().clamp(-30.0, 20.0).mul_scalar(0.5).exp();
        self.mean.clone() + std * noise
    }
}

impl<B: Backend> AutoencoderKL<B> {
    /// `image`: [B, 3, H, W] in [-1, 1] -> latent distribution (unscaled).
    pub fn encode(&self, image: Tensor<B, 4>) -> LatentDist<B> {
        let e = &self.encoder;
        let mut h = e.conv_in.forward(image);
        for block in &e.down_blocks {
            for r in &block.resnets {
                h = r.forward(h, None);
            }
            for d in &block.downsamplers {
                h = d.forward(h);
            }
        }
        h = e.mid_block.forward(h, None);
        h = e.conv_out.forward(group_norm_silu(h, &e.conv_norm_out, true));
        if let Some(q) = &self.quant_conv {
            h = q.forward(h);
        }
        let [b, c2, hh, ww] = h.dims();
        let c = c2 / 2;
        LatentDist {
            mean: h.clone().slice([0..b, 0..c, 0..hh, 0..ww]),
            logvar: h.slice([0..b, c..c2, 0..hh, 0..ww]),
        }
    }

    /// `latent` (unscaled, i.e. already divided by `scaling_factor`) -> image in about [-1, 1].
    pub fn decode(&self, latent: Tensor<B, 4>) -> Tensor<B, 4> {
        let d = &self.decoder;
        let mut h = match &self.post_quant_conv {
            Some(p) => p.forward(latent),
            None => latent,
        };
        h = d.conv_in.forward(h);
        h = d.mid_block.forward(h, None);
        for block in &d.up_blocks {
            for r in &block.resnets {
                h = r.forward(h, None);
            }
            for u in &block.upsamplers {
                h = u.forward(h);
            }
        }
        d.conv_out.forward(group_norm_silu(h, &d.conv_norm_out, true))
    }
}

/// Legacy attention names of older SD VAE files -> the current diffusers names.
pub fn vae_remap() -> KeyRemap {
    [
        (r"\.attentions\.(\d+)\.query\.", ".attentions.$1.to_q."),
        (r"\.attentions\.(\d+)\.key\.", ".attentions.$1.to_k."),
        (r"\.attentions\.(\d+)\.value\.", ".attentions.$1.to_v."),
        (r"\.attentions\.(\d+)\.proj_attn\.", ".attentions.$1.to_out.0."),
    ]
    .into_iter()
    .try_fold(KeyRemap::new(), |r, (p, rep)| r.rule(p, rep))
    .unwrap_or_default()
}

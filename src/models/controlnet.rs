//! `ControlNetModel` (SD 1.x ControlNet, e.g. canny): the conditioning embedding of the control
//! image, a copy of the UNet's down and mid blocks, and the zero convolutions that produce the
//! residuals added to the UNet. Built from the ControlNet folder's own `config.json`.
//!
//! | ours                          | diffusers (`controlnets/controlnet.py`)        |
//! |-------------------------------|------------------------------------------------|
//! | `ConditioningEmbedding`       | `ControlNetConditioningEmbedding`              |
//! | `controlnet_down_blocks`      | zero 1x1 convs, one per UNet skip connection   |
//! | `controlnet_mid_block`        | zero 1x1 conv after the mid block              |
//! | `ControlNetModel::forward`    | `ControlNetModel.forward` (guess_mode = False) |

use std::path::Path;

use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use serde::Deserialize;

use super::diffusers_blocks::{conv1x1, conv3x3};
use super::unet::{
    ConfigError, ControlResiduals, DownBlock, MidBlockCrossAttn, TimestepEmbedding, UNetConfig,
    read_config,
};

/// ControlNet `config.json`: the UNet fields plus the conditioning-embedding settings.
#[derive(Clone, Debug, Deserialize)]
pub struct ControlNetConfig {
    #[serde(flatten)]
    pub unet: ControlNetUNetFields,
    /// Channels of the conditioning embedding's stages ((16, 32, 96, 256) by default).
    #[serde(default = "default_cond_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    #[serde(default = "three")]
    pub conditioning_channels: usize,
    #[serde(default = "rgb")]
    pub controlnet_conditioning_channel_order: String,
    #[serde(default)]
    pub global_pool_conditions: bool,
}

/// A ControlNet config has no `out_channels`/`up_block_types`; we reuse the UNet config with
/// those filled in.
#[derive(Clone, Debug, Deserialize)]
pub struct ControlNetUNetFields {
    #[serde(flatten)]
    pub raw: serde_json::Map<String, serde_json::Value>,
}

fn default_cond_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}
fn three() -> usize {
    3
}
fn rgb() -> String {
    "rgb".into()
}

impl ControlNetConfig {
    pub fn from_file(path: &Path) -> Result<(Self, UNetConfig), ConfigError> {
        let c: Self = read_config(path)?;
        c.split(&path.display().to_string())
    }

    /// Parse a config given as JSON text (`label` names it in errors).
    pub fn from_json(text: &str, label: &str) -> Result<(Self, UNetConfig), ConfigError> {
        let c: Self = serde_json::from_str(text).map_err(|e| ConfigError::Read {
            path: label.to_string(),
            reason: format!("invalid config: {e}"),
        })?;
        c.split(label)
    }

    /// The UNet half of the config (with the fields ControlNet configs omit filled in).
    fn split(self, shown: &str) -> Result<(Self, UNetConfig), ConfigError> {
        let c = self;
        let shown = shown.to_string();
        let mut raw = c.unet.raw.clone();
        let n = raw
            .get("block_out_channels")
            .and_then(|v| v.as_array())
            .map(|a| a.len())
            .unwrap_or(0);
        raw.entry("out_channels").or_insert(serde_json::json!(4));
        raw.entry("up_block_types")
            .or_insert(serde_json::json!(vec!["UpBlock2D"; n]));
        let unet: UNetConfig = serde_json::from_value(serde_json::Value::Object(raw)).map_err(|e| {
            ConfigError::Read {
                path: shown.clone(),
                reason: format!("invalid ControlNet config: {e}"),
            }
        })?;
        unet.validate(&shown)?;
        if c.controlnet_conditioning_channel_order != "rgb" {
            return Err(ConfigError::Unsupported {
                path: shown,
                field: "controlnet_conditioning_channel_order",
                value: c.controlnet_conditioning_channel_order.clone(),
                hint: "rgb",
            });
        }
        if c.global_pool_conditions {
            return Err(ConfigError::Unsupported {
                path: shown,
                field: "global_pool_conditions",
                value: "true".into(),
                hint: "false",
            });
        }
        Ok((c, unet))
    }

    pub fn init<B: Backend>(&self, unet: &UNetConfig, device: &B::Device) -> ControlNetModel<B> {
        let boc = &unet.block_out_channels;
        let cond = &self.conditioning_embedding_out_channels;
        let first = cond.first().copied().unwrap_or(16);
        let last = cond.last().copied().unwrap_or(first);
        let blocks = cond
            .windows(2)
            .flat_map(|w| {
                [
                    conv3x3(w[0], w[0], device),
                    Conv2dConfig::new([w[0], w[1]], [3, 3])
                        .with_stride([2, 2])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(device),
                ]
            })
            .collect();
        let down_blocks = unet.init_down_blocks(device);
        let mut zero_convs = vec![conv1x1(boc[0], boc[0], device)];
        for (i, block) in down_blocks.iter().enumerate() {
            let c = boc[i];
            for _ in 0..block.resnets.len() + block.downsamplers.len() {
                zero_convs.push(conv1x1(c, c, device));
            }
        }
        let mid = *boc.last().unwrap_or(&1);
        ControlNetModel {
            conv_in: conv3x3(unet.in_channels, boc[0], device),
            time_embedding: TimestepEmbedding::new(boc[0], unet.time_embed_dim(), device),
            controlnet_cond_embedding: ConditioningEmbedding {
                conv_in: conv3x3(self.conditioning_channels, first, device),
                blocks,
                conv_out: conv3x3(last, boc[0], device),
            },
            down_blocks,
            controlnet_down_blocks: zero_convs,
            mid_block: unet.init_mid_block(device),
            controlnet_mid_block: conv1x1(mid, mid, device),
            time_dim: boc[0],
            flip_sin_to_cos: unet.flip_sin_to_cos,
            freq_shift: unet.freq_shift,
        }
    }
}

/// `ControlNetConditioningEmbedding`: the control image (in [0, 1], full resolution) down to
/// the latent resolution.
#[derive(Module, Debug)]
pub struct ConditioningEmbedding<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub blocks: Vec<Conv2d<B>>,
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> ConditioningEmbedding<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut h = silu(self.conv_in.forward(x));
        for conv in &self.blocks {
            h = silu(conv.forward(h));
        }
        self.conv_out.forward(h)
    }
}

#[derive(Module, Debug)]
pub struct ControlNetModel<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub time_embedding: TimestepEmbedding<B>,
    pub controlnet_cond_embedding: ConditioningEmbedding<B>,
    pub down_blocks: Vec<DownBlock<B>>,
    pub controlnet_down_blocks: Vec<Conv2d<B>>,
    pub mid_block: MidBlockCrossAttn<B>,
    pub controlnet_mid_block: Conv2d<B>,
    pub time_dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl<B: Backend> ControlNetModel<B> {
    /// How much smaller than the control image its features are (8 for SD 1.5 ControlNets: one
    /// stride-2 conv per pair of blocks); the latents must have that size.
    pub fn cond_downscale(&self) -> usize {
        1 << (self.controlnet_cond_embedding.blocks.len() / 2)
    }

    /// `sample`: noisy latents [B, 4, h, w]; `cond`: control image [B, 3, 8h, 8w] in [0, 1];
    /// returns the residuals multiplied by `scale`.
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timestep: f32,
        context: &Tensor<B, 3>,
        cond: Tensor<B, 4>,
        scale: f32,
    ) -> ControlResiduals<B> {
        let device = sample.device();
        let batch = sample.dims()[0];
        // 1. time embedding
        let temb = self
            .time_embedding
            .embed(timestep, batch, self.time_dim, self.flip_sin_to_cos, self.freq_shift, &device);
        // 2. pre-process: latent conv + conditioning embedding
        let mut h = self.conv_in.forward(sample) + self.controlnet_cond_embedding.forward(cond);
        // 3. down
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(h, &temb, context, &mut skips);
        }
        // 4. mid
        h = self.mid_block.forward(h, &temb, context);
        // 5. zero convolutions and scaling
        let down = skips
            .into_iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(s, conv)| conv.forward(s).mul_scalar(scale))
            .collect();
        let mid = self.controlnet_mid_block.forward(h).mul_scalar(scale);
        ControlResiduals { down, mid }
    }
}

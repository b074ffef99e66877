//! `UNet2DConditionModel` for SD 1.x, built from the checkpoint's `unet/config.json`, with module
//! paths equal to diffusers' checkpoint keys (no remapping needed).
//!
//! | ours                    | diffusers                                              |
//! |-------------------------|--------------------------------------------------------|
//! | `timestep_embedding`    | `embeddings.get_timestep_embedding` (`time_proj`)      |
//! | `TimestepEmbedding`     | `embeddings.TimestepEmbedding` (`time_embedding`)      |
//! | `CrossAttention`        | `attention_processor.Attention` (attn1 / attn2)        |
//! | `FeedForward`           | `attention.FeedForward` with GEGLU                     |
//! | `BasicTransformerBlock` | `attention.BasicTransformerBlock`                      |
//! | `Transformer2DModel`    | `transformers.transformer_2d.Transformer2DModel`       |
//! | `DownBlock`             | `CrossAttnDownBlock2D` / `DownBlock2D` (no attentions) |
//! | `UpBlock`               | `CrossAttnUpBlock2D` / `UpBlock2D`                     |
//! | `MidBlockCrossAttn`     | `UNetMidBlock2DCrossAttn`                              |
//! | `UNet2DConditionModel`  | `unets.unet_2d_condition.UNet2DConditionModel`         |

use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::{gelu, silu};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::Deserialize;

use super::weights::KeyRemap;
use super::diffusers_blocks::{
    ResnetBlock2D, ResnetBlock2DConfig, conv1x1, conv3x3, group_norm, merge_heads, split_heads,
};
use super::fused::sdpa;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: unsupported {field} = {value}: rfstudio implements the SD 1.x architecture ({hint})")]
    Unsupported {
        path: String,
        field: &'static str,
        value: String,
        hint: &'static str,
    },
}

/// An int or a per-block list (diffusers accepts both for head settings).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.get(i).or(v.last()).copied().unwrap_or(1),
        }
    }
}

/// `unet/config.json` (diffusers `UNet2DConditionModel`); the fields SD 1.x uses.
#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in (4).
    pub in_channels: usize,
    /// Latent channels out (4).
    pub out_channels: usize,
    /// Channels per resolution (320, 640, 1280, 1280).
    pub block_out_channels: Vec<usize>,
    /// `CrossAttnDownBlock2D` x3 + `DownBlock2D` in SD 1.5.
    pub down_block_types: Vec<String>,
    /// `UpBlock2D` + `CrossAttnUpBlock2D` x3 in SD 1.5.
    pub up_block_types: Vec<String>,
    /// Resnets per down block (2); up blocks have one more.
    pub layers_per_block: usize,
    /// Text-embedding width (768).
    pub cross_attention_dim: usize,
    /// Legacy name: the NUMBER of heads in SD 1.x (8) when `num_attention_heads` is null.
    #[serde(default = "eight")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "groups32")]
    pub norm_num_groups: usize,
    #[serde(default = "eps5")]
    pub norm_eps: f64,
    /// Linear instead of 1x1-conv `proj_in`/`proj_out` (SD 2.x); false for SD 1.x.
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub only_cross_attention: Option<serde_json::Value>,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub transformer_layers_per_block: Option<PerBlock>,
}

fn eight() -> PerBlock {
    PerBlock::One(8)
}
fn groups32() -> usize {
    32
}
fn eps5() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn default_shift() -> String {
    "default".into()
}

/// Read a diffusers config.json into `T`, naming the file in errors.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        reason: format!("invalid config: {e}"),
    })
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let c: Self = read_config(path)?;
        c.validate(&path.display().to_string())?;
        Ok(c)
    }

    /// A config given as JSON (inferred from a single-file checkpoint); `label` names it.
    pub fn from_value(value: serde_json::Value, label: &str) -> Result<Self, ConfigError> {
        let c: Self = serde_json::from_value(value).map_err(|e| ConfigError::Read {
            path: label.to_string(),
            reason: format!("invalid config: {e}"),
        })?;
        c.validate(label)?;
        Ok(c)
    }

    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let unsupported = |field, value: String, hint| {
            Err(ConfigError::Unsupported {
                path: path.to_string(),
                field,
                value,
                hint,
            })
        };
        if self.class_embed_type.is_some() {
            return unsupported("class_embed_type", format!("{:?}", self.class_embed_type), "null");
        }
        if self.addition_embed_type.is_some() {
            return unsupported(
                "addition_embed_type",
                format!("{:?}", self.addition_embed_type),
                "null (SDXL is not supported)",
            );
        }
        if self.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim", "set".into(), "null");
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported(
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift.clone(),
                "default",
            );
        }
        if matches!(&self.only_cross_attention, Some(serde_json::Value::Bool(true))) {
            return unsupported("only_cross_attention", "true".into(), "false");
        }
        if self.transformer_layers_per_block.iter().any(|t| match t {
            PerBlock::One(v) => *v != 1,
            PerBlock::Each(v) => v.iter().any(|&x| x != 1),
        }) {
            return unsupported("transformer_layers_per_block", "> 1".into(), "1");
        }
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return unsupported(
                "block types",
                format!(
                    "{} down / {} up for {} channel entries",
                    self.down_block_types.len(),
                    self.up_block_types.len(),
                    n
                ),
                "one down and one up block per entry of block_out_channels",
            );
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !matches!(
                t.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                return unsupported("block type", t.clone(), "CrossAttn/Down/Up Block2D");
            }
        }
        Ok(())
    }

    /// Heads of block `i` (diffusers: `num_attention_heads or attention_head_dim`).
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }

    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    fn resnet(&self, cin: usize, cout: usize) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(self.time_embed_dim()),
            groups: self.norm_num_groups,
            eps: self.norm_eps,
        }
    }

    fn transformer<B: Backend>(&self, channels: usize, heads: usize, device: &B::Device) -> Transformer2DModel<B> {
        Transformer2DModel::new(
            channels,
            heads,
            self.cross_attention_dim,
            self.norm_num_groups,
            self.use_linear_projection,
            device,
        )
    }

    /// The down blocks (shared with ControlNet).
    pub fn init_down_blocks<B: Backend>(&self, device: &B::Device) -> Vec<DownBlock<B>> {
        let n = self.block_out_channels.len();
        let mut out_ch = self.block_out_channels[0];
        (0..n)
            .map(|i| {
                let in_ch = out_ch;
                out_ch = self.block_out_channels[i];
                let cross = self.down_block_types[i].starts_with("CrossAttn");
                let is_final = i == n - 1;
                DownBlock {
                    resnets: (0..self.layers_per_block)
                        .map(|j| {
                            self.resnet(if j == 0 { in_ch } else { out_ch }, out_ch)
                                .init(device)
                        })
                        .collect(),
                    attentions: if cross {
                        (0..self.layers_per_block)
                            .map(|_| self.transformer(out_ch, self.heads(i), device))
                            .collect()
                    } else {
                        Vec::new()
                    },
                    downsamplers: if is_final {
                        Vec::new()
                    } else {
                        vec![Downsample2D::new(out_ch, device)]
                    },
                }
            })
            .collect()
    }

    /// The cross-attention mid block (shared with ControlNet).
    pub fn init_mid_block<B: Backend>(&self, device: &B::Device) -> MidBlockCrossAttn<B> {
        let c = *self.block_out_channels.last().unwrap_or(&0);
        let heads = self.heads(self.block_out_channels.len() - 1);
        MidBlockCrossAttn {
            resnets: vec![self.resnet(c, c).init(device), self.resnet(c, c).init(device)],
            attentions: vec![self.transformer(c, heads, device)],
        }
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> UNet2DConditionModel<B> {
        let boc = &self.block_out_channels;
        let n = boc.len();
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        let up_blocks = (0..n)
            .map(|i| {
                let prev_out = out_ch;
                out_ch = rev[i];
                let in_ch = rev[(i + 1).min(n - 1)];
                let cross = self.up_block_types[i].starts_with("CrossAttn");
                let layers = self.layers_per_block + 1;
                let heads = self.heads(n - 1 - i);
                UpBlock {
                    resnets: (0..layers)
                        .map(|j| {
                            let skip = if j == layers - 1 { in_ch } else { out_ch };
                            let res_in = if j == 0 { prev_out } else { out_ch };
                            self.resnet(res_in + skip, out_ch).init(device)
                        })
                        .collect(),
                    attentions: if cross {
                        (0..layers)
                            .map(|_| self.transformer(out_ch, heads, device))
                            .collect()
                    } else {
                        Vec::new()
                    },
                    upsamplers: if i == n - 1 {
                        Vec::new()
                    } else {
                        vec![Upsample2D::new(out_ch, device)]
                    },
                }
            })
            .collect();
        UNet2DConditionModel {
            conv_in: conv3x3(self.in_channels, boc[0], device),
            time_embedding: TimestepEmbedding::new(boc[0], self.time_embed_dim(), device),
            down_blocks: self.init_down_blocks(device),
            mid_block: self.init_mid_block(device),
            up_blocks,
            conv_norm_out: group_norm(self.norm_num_groups, boc[0], self.norm_eps, device),
            conv_out: conv3x3(boc[0], self.out_channels, device),
            time_dim: boc[0],
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
        }
    }
}

/// Sinusoidal timestep features, as diffusers' `get_timestep_embedding` (computed in f32).
pub fn timestep_embedding<B: Backend>(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &B::Device,
) -> Tensor<B, 2> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = -(10000f32.ln()) * (i as f32) / (half as f32 - freq_shift as f32);
            exponent.exp()
        })
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let (first, second): (Vec<f32>, Vec<f32>) = if flip_sin_to_cos {
            (args.iter().map(|a| a.cos()).collect(), args.iter().map(|a| a.sin()).collect())
        } else {
            (args.iter().map(|a| a.sin()).collect(), args.iter().map(|a| a.cos()).collect())
        };
        data.extend(first);
        data.extend(second);
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_data(TensorData::new(data, [timesteps.len(), dim]), device)
}

/// `time_embedding`: linear_1 -> SiLU -> linear_2.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    pub fn new(cin: usize, dim: usize, device: &B::Device) -> Self {
        Self {
            linear_1: LinearConfig::new(cin, dim).init(device),
            linear_2: LinearConfig::new(dim, dim).init(device),
        }
    }
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }

    /// `time_proj` + `time_embedding` for one timestep shared by a batch: [batch, dim * 4].
    pub fn embed(&self, timestep: f32, batch: usize, dim: usize, flip_sin_to_cos: bool, freq_shift: f64, device: &B::Device) -> Tensor<B, 2> {
        self.forward(timestep_embedding::<B>(&vec![timestep; batch], dim, flip_sin_to_cos, freq_shift, device))
    }
}

/// `Attention` as used inside transformer blocks: q/k/v without bias, `to_out.0` with bias.
#[derive(Module, Debug)]
pub struct CrossAttention<B: Backend> {
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    pub to_out: Vec<Linear<B>>,
    pub heads: usize,
}

impl<B: Backend> CrossAttention<B> {
    pub fn new(dim: usize, context_dim: usize, heads: usize, device: &B::Device) -> Self {
        let nb = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Self {
            to_q: nb(dim, dim),
            to_k: nb(context_dim, dim),
            to_v: nb(context_dim, dim),
            to_out: vec![LinearConfig::new(dim, dim).init(device)],
            heads,
        }
    }

    /// Self-attention when `context` is None.
    pub fn forward(&self, x: Tensor<B, 3>, context: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
        let ctx = context.cloned().unwrap_or_else(|| x.clone());
        let q = split_heads(self.to_q.forward(x), self.heads);
        let k = split_heads(self.to_k.forward(ctx.clone()), self.heads);
        let v = split_heads(self.to_v.forward(ctx), self.heads);
        self.to_out[0].forward(merge_heads(sdpa(q, k, v, false)))
    }
}

/// GEGLU projection: `proj` to 2x width, value * gelu(gate).
#[derive(Module, Debug)]
pub struct Geglu<B: Backend> {
    pub proj: Linear<B>,
}

/// `FeedForward`. diffusers keeps its layers in a list `net` (0 = GEGLU, 1 = dropout, 2 = Linear);
/// `unet_remap` maps `ff.net.0.` -> `ff.geglu.` and `ff.net.2.` -> `ff.out.`.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    pub geglu: Geglu<B>,
    pub out: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    pub fn new(dim: usize, device: &B::Device) -> Self {
        let inner = dim * 4;
        Self {
            geglu: Geglu {
                proj: LinearConfig::new(dim, inner * 2).init(device),
            },
            out: LinearConfig::new(inner, dim).init(device),
        }
    }
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.geglu.proj.forward(x);
        let [b, n, c2] = h.dims();
        let value = h.clone().slice([0..b, 0..n, 0..c2 / 2]);
        let gate = h.slice([0..b, 0..n, c2 / 2..c2]);
        self.out.forward(value * gelu(gate))
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward (pre-norm).
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn1: CrossAttention<B>,
    pub norm2: LayerNorm<B>,
    pub attn2: CrossAttention<B>,
    pub norm3: LayerNorm<B>,
    pub ff: FeedForward<B>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    pub fn forward(&self, x: Tensor<B, 3>, context: &Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self.attn2.forward(self.norm2.forward(x.clone()), Some(context)) + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// `Transformer2DModel` over a feature map, with a residual connection. `proj_in`/`proj_out`
/// are 1x1 convs in SD 1.x; with `use_linear_projection` they are Linears, stored in the
/// `*_linear` fields (`unet_remap` renames the checkpoint keys accordingly).
#[derive(Module, Debug)]
pub struct Transformer2DModel<B: Backend> {
    pub norm: GroupNorm<B>,
    pub proj_in: Option<Conv2d<B>>,
    pub proj_in_linear: Option<Linear<B>>,
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    pub proj_out: Option<Conv2d<B>>,
    pub proj_out_linear: Option<Linear<B>>,
}

impl<B: Backend> Transformer2DModel<B> {
    pub fn new(
        channels: usize,
        heads: usize,
        context_dim: usize,
        groups: usize,
        linear_projection: bool,
        device: &B::Device,
    ) -> Self {
        let conv = || (!linear_projection).then(|| conv1x1(channels, channels, device));
        let lin = || linear_projection.then(|| LinearConfig::new(channels, channels).init(device));
        let ln = || LayerNormConfig::new(channels).init(device);
        Self {
            norm: group_norm(groups, channels, 1e-6, device),
            proj_in: conv(),
            proj_in_linear: lin(),
            transformer_blocks: vec![BasicTransformerBlock {
                norm1: ln(),
                attn1: CrossAttention::new(channels, channels, heads, device),
                norm2: ln(),
                attn2: CrossAttention::new(channels, context_dim, heads, device),
                norm3: ln(),
                ff: FeedForward::new(channels, device),
            }],
            proj_out: conv(),
            proj_out_linear: lin(),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>, context: &Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = super::fused::group_norm_silu(x, &self.norm, false);
        let to_tokens = |x: Tensor<B, 4>| x.reshape([b, c, h * w]).swap_dims(1, 2);
        let mut tokens = match (&self.proj_in, &self.proj_in_linear) {
            (Some(conv), _) => to_tokens(conv.forward(x)),
            (None, Some(lin)) => lin.forward(to_tokens(x)),
            (None, None) => to_tokens(x),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context);
        }
        let to_map = |t: Tensor<B, 3>| t.swap_dims(1, 2).reshape([b, c, h, w]);
        let out = match (&self.proj_out, &self.proj_out_linear) {
            (Some(conv), _) => conv.forward(to_map(tokens)),
            (None, Some(lin)) => to_map(lin.forward(tokens)),
            (None, None) => to_map(tokens),
        };
        out + residual
    }
}

/// `Downsample2D` (UNet flavour): 3x3 conv, stride 2, padding 1.
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    pub conv: Conv2d<B>,
}

impl<B: Backend> Downsample2D<B> {
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            conv: Conv2dConfig::new([channels, channels], [3, 3])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device),
        }
    }
}

/// Nearest-neighbour 2x upsampling (exactly torch's `interpolate(scale_factor=2, mode="nearest")`).
pub fn upsample_nearest2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, h * 2, w * 2])
}

/// `Upsample2D`: nearest 2x then a 3x3 conv.
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    pub conv: Conv2d<B>,
}

impl<B: Backend> Upsample2D<B> {
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            conv: conv3x3(channels, channels, device),
        }
    }
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(upsample_nearest2x(x))
    }
}

/// `CrossAttnDownBlock2D` (with attentions) or `DownBlock2D` (attentions empty).
#[derive(Module, Debug)]
pub struct DownBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
    pub downsamplers: Vec<Downsample2D<B>>,
}

impl<B: Backend> DownBlock<B> {
    /// Returns the output and the skip states it produced (one per layer, one after downsampling).
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        skips: &mut Vec<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let mut h = x;
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(h, Some(temb));
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(h, context);
            }
            skips.push(h.clone());
        }
        for down in &self.downsamplers {
            h = down.conv.forward(h);
            skips.push(h.clone());
        }
        h
    }
}

/// `CrossAttnUpBlock2D` / `UpBlock2D`.
#[derive(Module, Debug)]
pub struct UpBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
    pub upsamplers: Vec<Upsample2D<B>>,
}

impl<B: Backend> UpBlock<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        skips: &mut Vec<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let mut h = x;
        for (j, resnet) in self.resnets.iter().enumerate() {
            if let Some(skip) = skips.pop() {
                h = Tensor::cat(vec![h, skip], 1);
            }
            h = resnet.forward(h, Some(temb));
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(h, context);
            }
        }
        for up in &self.upsamplers {
            h = up.forward(h);
        }
        h
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, (transformer, resnet).
#[derive(Module, Debug)]
pub struct MidBlockCrossAttn<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
}

impl<B: Backend> MidBlockCrossAttn<B> {
    pub fn forward(&self, x: Tensor<B, 4>, temb: &Tensor<B, 2>, context: &Tensor<B, 3>) -> Tensor<B, 4> {
        let mut h = self.resnets[0].forward(x, Some(temb));
        for (attn, resnet) in self.attentions.iter().zip(self.resnets.iter().skip(1)) {
            h = attn.forward(h, context);
            h = resnet.forward(h, Some(temb));
        }
        h
    }
}

/// ControlNet outputs added to the UNet's skip connections and mid block.
#[derive(Clone, Debug)]
pub struct ControlResiduals<B: Backend> {
    pub down: Vec<Tensor<B, 4>>,
    pub mid: Tensor<B, 4>,
}

#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub time_embedding: TimestepEmbedding<B>,
    pub down_blocks: Vec<DownBlock<B>>,
    pub mid_block: MidBlockCrossAttn<B>,
    pub up_blocks: Vec<UpBlock<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
    pub time_dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Predict the noise. `timestep` is shared by the batch; `context` is [B, 77, 768];
    /// `residuals` are ControlNet's (already scaled) outputs.
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timestep: f32,
        context: &Tensor<B, 3>,
        residuals: Option<&ControlResiduals<B>>,
    ) -> Tensor<B, 4> {
        let device = sample.device();
        let batch = sample.dims()[0];
        // 1. time embedding
        let temb = self
            .time_embedding
            .embed(timestep, batch, self.time_dim, self.flip_sin_to_cos, self.freq_shift, &device);
        // 2. pre-process
        let mut h = self.conv_in.forward(sample);
        // 3. down
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(h, &temb, context, &mut skips);
        }
        if let Some(r) = residuals {
            skips = skips
                .into_iter()
                .zip(r.down.iter())
                .map(|(s, add)| s + add.clone())
                .collect();
        }
        // 4. mid
        h = self.mid_block.forward(h, &temb, context);
        if let Some(r) = residuals {
            h = h + r.mid.clone();
        }
        // 5. up
        for block in &self.up_blocks {
            h = block.forward(h, &temb, context, &mut skips);
        }
        // 6. post-process
        self.conv_out.forward(super::fused::group_norm_silu(h, &self.conv_norm_out, true))
    }

    /// Number of skip connections a ControlNet must provide.
    pub fn num_skips(&self) -> usize {
        1 + self
            .down_blocks
            .iter()
            .map(|b| b.resnets.len() + b.downsamplers.len())
            .sum::<usize>()
    }
}

/// Checkpoint key -> module path rewrites for UNet and ControlNet files (the only two places
/// where our module tree differs from diffusers' keys).
///
/// | checkpoint key              | module path             |
/// |-----------------------------|-------------------------|
/// | `*.ff.net.0.proj.*`         | `*.ff.geglu.proj.*`     |
/// | `*.ff.net.2.*`              | `*.ff.out.*`            |
/// | `*.proj_in.*` (linear only) | `*.proj_in_linear.*`    |
/// | `*.proj_out.*` (linear only)| `*.proj_out_linear.*`   |
/// A UNet / ControlNet module path -> the diffusers checkpoint key (the inverse of `unet_remap`).
pub fn unet_public_key(path: &str) -> String {
    path.replace(".ff.geglu.proj.", ".ff.net.0.proj.")
        .replace(".ff.out.", ".ff.net.2.")
        .replace(".proj_in_linear.", ".proj_in.")
        .replace(".proj_out_linear.", ".proj_out.")
}

pub fn unet_remap(linear_projection: bool) -> KeyRemap {
    let mut rules = vec![
        (r"\.ff\.net\.0\.proj\.", ".ff.geglu.proj."),
        (r"\.ff\.net\.2\.", ".ff.out."),
    ];
    if linear_projection {
        rules.push((r"\.proj_(in|out)\.", ".proj_${1}_linear."));
    }
    rules
        .into_iter()
        .try_fold(KeyRemap::new(), |r, (p, rep)| r.rule(p, rep))
        .unwrap_or_default()
}

//! DPT monocular depth, as transformers' `DPTForDepthEstimation`, for both public variants:
//! `Intel/dpt-large` (ViT backbone) and `Intel/dpt-hybrid-midas` (ViT-hybrid: a BiT ResNet stem
//! whose stage-3 map becomes the tokens, stages 1-2 feed the neck directly; the one
//! ControlNet-depth uses). Built from the checkpoint's config.json; module paths equal the
//! checkpoint keys.
//!
//! | ours                     | transformers (`models/dpt`, `models/bit`)                    |
//! |--------------------------|---------------------------------------------------------------|
//! | `DptEmbeddings`          | `DPTViTEmbeddings` / `DPTViTHybridEmbeddings`                 |
//! | `BitBackbone`            | `BitBackbone` (weight-standardised convs, TF "SAME" padding)  |
//! | `VitLayer`               | `DPTViTLayer`                                                 |
//! | `ReassembleStage`        | `DPTReassembleStage` (readout project/add/ignore)             |
//! | `FusionLayer`            | `DPTFeatureFusionLayer`                                       |
//! | `DptForDepthEstimation`  | `DPTForDepthEstimation` (+ `DPTDepthEstimationHead`)          |
//! | `DepthEstimator`         | `DPTImageProcessor` + post-processing to a 0..1 inverse-depth map |

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{GroupNorm, LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::{gelu, relu};
use burn::tensor::backend::Backend;
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor};
use serde::Deserialize;

use super::diffusers_blocks::{group_norm, merge_heads, split_heads};
use super::fused::sdpa;
use super::manifest::find_weights;
use super::ops::{pad2d, resize_bilinear, same_padding};
use super::unet::{ConfigError, read_config};
use super::weights::{KeyRemap, Unused, WeightError, Weights, load_module};

#[derive(Debug, thiserror::Error)]
pub enum DptError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Weights(#[from] WeightError),
    #[error("{folder}: no model.safetensors")]
    NoWeights { folder: String },
}

/// The BiT backbone config of the hybrid variant (`backbone_config`).
#[derive(Clone, Debug, Deserialize)]
pub struct BitConfig {
    /// Bottleneck layers per stage ([3, 4, 9] in dpt-hybrid-midas).
    pub depths: Vec<usize>,
    /// Output channels per stage ([256, 512, 1024]).
    pub hidden_sizes: Vec<usize>,
    /// Stem channels (64).
    #[serde(default = "sixty_four")]
    pub embedding_size: usize,
    /// GroupNorm groups (32).
    #[serde(default = "thirty_two")]
    pub num_groups: usize,
    /// "SAME" (TF-style) or null.
    #[serde(default)]
    pub global_padding: Option<String>,
    /// "bottleneck" (hybrid) or "preactivation" (unsupported here).
    #[serde(default = "bottleneck")]
    pub layer_type: String,
    /// Dynamic SAME padding of the stem max-pool.
    #[serde(default)]
    pub embedding_dynamic_padding: bool,
    #[serde(default = "one_f")]
    pub width_factor: f64,
}

fn sixty_four() -> usize {
    64
}
fn thirty_two() -> usize {
    32
}
fn bottleneck() -> String {
    "bottleneck".into()
}
fn one_f() -> f64 {
    1.0
}

/// `config.json` of a DPT checkpoint.
#[derive(Clone, Debug, Deserialize)]
pub struct DptConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu_name")]
    pub hidden_act: String,
    #[serde(default = "ln_eps")]
    pub layer_norm_eps: f64,
    /// Training resolution (384); position embeddings are resized to other sizes.
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "three")]
    pub num_channels: usize,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub is_hybrid: bool,
    pub backbone_out_indices: Vec<usize>,
    #[serde(default = "project")]
    pub readout_type: String,
    pub reassemble_factors: Vec<f64>,
    pub neck_hidden_sizes: Vec<usize>,
    pub fusion_hidden_size: usize,
    #[serde(default)]
    pub add_projection: bool,
    #[serde(default)]
    pub use_batch_norm_in_fusion_residual: bool,
    #[serde(default)]
    pub neck_ignore_stages: Vec<usize>,
    #[serde(default)]
    pub backbone_config: Option<BitConfig>,
    #[serde(default)]
    pub backbone_featmap_shape: Option<Vec<usize>>,
}

fn gelu_name() -> String {
    "gelu".into()
}
fn ln_eps() -> f64 {
    1e-12
}
fn three() -> usize {
    3
}
fn yes() -> bool {
    true
}
fn project() -> String {
    "project".into()
}

/// timm's `make_div`: round to a multiple of 8, not below 90% of the value.
fn make_div(v: f64) -> usize {
    let d: f64 = 8.0;
    let mut n = d.max(((v + d / 2.0) / d).floor() * d);
    if n < 0.9 * v {
        n += d;
    }
    n as usize
}

impl DptConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let c: Self = read_config(path)?;
        let shown = path.display().to_string();
        let unsupported = |field, value: String, hint| ConfigError::Unsupported {
            path: shown.clone(),
            field,
            value,
            hint,
        };
        if !matches!(c.readout_type.as_str(), "project" | "add" | "ignore") {
            return Err(unsupported("readout_type", c.readout_type.clone(), "project, add or ignore"));
        }
        if c.use_batch_norm_in_fusion_residual {
            return Err(unsupported("use_batch_norm_in_fusion_residual", "true".into(), "false"));
        }
        if c.backbone_out_indices.len() != 4 || c.reassemble_factors.len() != 4 || c.neck_hidden_sizes.len() != 4 {
            return Err(unsupported("neck", "not 4 stages".into(), "4 backbone outputs, factors and neck sizes"));
        }
        if c.is_hybrid {
            match &c.backbone_config {
                Some(b) if b.layer_type == "bottleneck" && b.hidden_sizes.len() == 3 => {}
                _ => {
                    return Err(unsupported(
                        "backbone_config",
                        "missing or not a 3-stage BiT bottleneck".into(),
                        "the dpt-hybrid-midas BiT backbone",
                    ));
                }
            }
        }
        Ok(c)
    }

    fn bit_widths(&self) -> Vec<usize> {
        self.backbone_config
            .as_ref()
            .map(|b| b.hidden_sizes.iter().map(|h| make_div(*h as f64 * b.width_factor)).collect())
            .unwrap_or_default()
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> DptForDepthEstimation<B> {
        let h = self.hidden_size;
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let ln = || LayerNormConfig::new(h).with_epsilon(self.layer_norm_eps).init(device);
        let lin_qkv = |i, o| LinearConfig::new(i, o).with_bias(self.qkv_bias).init(device);
        // 1. embeddings
        let grid = self.image_size / self.patch_size;
        let embeddings = if self.is_hybrid {
            let bit = self.backbone_config.as_ref();
            let widths = self.bit_widths();
            let stem = bit.map(|b| b.embedding_size).unwrap_or(64);
            let groups = bit.map(|b| b.num_groups).unwrap_or(32);
            let depths = bit.map(|b| b.depths.clone()).unwrap_or_default();
            let mut prev = stem;
            let stages = widths
                .iter()
                .zip(&depths)
                .enumerate()
                .map(|(si, (&out, &depth))| {
                    let stride = if si == 0 { 1 } else { 2 };
                    let layers = (0..depth)
                        .map(|li| {
                            let cin = if li == 0 { prev } else { out };
                            let mid = make_div(out as f64 * 0.25);
                            BitBottleneck {
                                conv1: ws_conv(cin, mid, 1, 1, device),
                                norm1: group_norm(groups, mid, 1e-5, device),
                                conv2: ws_conv(mid, mid, 3, if li == 0 { stride } else { 1 }, device),
                                norm2: group_norm(groups, mid, 1e-5, device),
                                conv3: ws_conv(mid, out, 1, 1, device),
                                norm3: group_norm(groups, out, 1e-5, device),
                                downsample: (li == 0).then(|| BitDownsample {
                                    conv: ws_conv(cin, out, 1, stride, device),
                                    norm: group_norm(groups, out, 1e-5, device),
                                }),
                            }
                        })
                        .collect();
                    prev = out;
                    BitStage { layers }
                })
                .collect();
            let feat = self
                .backbone_featmap_shape
                .as_ref()
                .and_then(|s| s.get(1).copied())
                .unwrap_or(*widths.last().unwrap_or(&h));
            DptEmbeddings {
                cls_token: Param::from_tensor(Tensor::zeros([1, 1, h], device)),
                position_embeddings: Param::from_tensor(Tensor::zeros([1, grid * grid + 1, h], device)),
                patch_embeddings: None,
                backbone: Some(BitBackbone {
                    bit: BitModel {
                        embedder: BitEmbedder {
                            convolution: ws_conv(self.num_channels, stem, 7, 2, device),
                            norm: group_norm(groups, stem, 1e-5, device),
                        },
                        encoder: BitEncoder { stages },
                    },
                }),
                projection: Some(Conv2dConfig::new([feat, h], [1, 1]).init(device)),
                patch_size: self.patch_size,
                dynamic_pool_padding: bit.map(|b| b.embedding_dynamic_padding).unwrap_or(false),
                same_padding: bit
                    .and_then(|b| b.global_padding.as_ref())
                    .map(|p| p.eq_ignore_ascii_case("same"))
                    .unwrap_or(false),
            }
        } else {
            DptEmbeddings {
                cls_token: Param::from_tensor(Tensor::zeros([1, 1, h], device)),
                position_embeddings: Param::from_tensor(Tensor::zeros([1, grid * grid + 1, h], device)),
                patch_embeddings: Some(PatchEmbeddings {
                    projection: Conv2dConfig::new([self.num_channels, h], [self.patch_size, self.patch_size])
                        .with_stride([self.patch_size, self.patch_size])
                        .init(device),
                }),
                backbone: None,
                projection: None,
                patch_size: self.patch_size,
                dynamic_pool_padding: false,
                same_padding: false,
            }
        };
        // 2. ViT encoder
        let heads = self.num_attention_heads;
        let layer = (0..self.num_hidden_layers)
            .map(|_| VitLayer {
                attention: VitAttention {
                    attention: VitSelfAttention {
                        query: lin_qkv(h, h),
                        key: lin_qkv(h, h),
                        value: lin_qkv(h, h),
                        heads,
                    },
                    output: Dense { dense: lin(h, h) },
                },
                intermediate: Dense {
                    dense: lin(h, self.intermediate_size),
                },
                output: Dense {
                    dense: lin(self.intermediate_size, h),
                },
                layernorm_before: ln(),
                layernorm_after: ln(),
            })
            .collect();
        // 3. neck
        let ignored = |i: usize| self.is_hybrid && self.neck_ignore_stages.contains(&i);
        let reassemble_layers = (0..4)
            .map(|i| {
                if ignored(i) {
                    return ReassembleLayer {
                        projection: None,
                        resize: None,
                    };
                }
                let ch = self.neck_hidden_sizes[i];
                let f = self.reassemble_factors[i];
                let resize = if f > 1.0 {
                    let k = f.round() as usize;
                    Some(Resize::Up(
                        ConvTranspose2dConfig::new([ch, ch], [k, k]).with_stride([k, k]).init(device),
                    ))
                } else if f < 1.0 {
                    let s = (1.0 / f).round() as usize;
                    Some(Resize::Down(
                        Conv2dConfig::new([ch, ch], [3, 3])
                            .with_stride([s, s])
                            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                            .init(device),
                    ))
                } else {
                    None
                };
                ReassembleLayer {
                    projection: Some(Conv2dConfig::new([h, ch], [1, 1]).init(device)),
                    resize,
                }
            })
            .collect();
        let readout_projects = (0..4)
            .map(|i| {
                if ignored(i) || self.readout_type != "project" {
                    Vec::new()
                } else {
                    vec![lin(2 * h, h)]
                }
            })
            .collect();
        let f = self.fusion_hidden_size;
        let conv3 = |cin, cout, bias| {
            Conv2dConfig::new([cin, cout], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(bias)
                .init(device)
        };
        let unit = || ResidualUnit {
            convolution1: conv3(f, f, true),
            convolution2: conv3(f, f, true),
        };
        DptForDepthEstimation {
            dpt: DptModel {
                embeddings,
                encoder: VitEncoder { layer },
                layernorm: ln(),
            },
            neck: DptNeck {
                reassemble_stage: ReassembleStage {
                    layers: reassemble_layers,
                    readout_projects,
                },
                convs: self.neck_hidden_sizes.iter().map(|&c| conv3(c, f, false)).collect(),
                fusion_stage: FusionStage {
                    layers: (0..4)
                        .map(|_| FusionLayer {
                            projection: Conv2dConfig::new([f, f], [1, 1]).init(device),
                            residual_layer1: unit(),
                            residual_layer2: unit(),
                        })
                        .collect(),
                },
            },
            head: DepthHead {
                projection: self.add_projection.then(|| conv3(f, f, true)),
                head: vec![
                    Some(conv3(f, f / 2, true)),
                    None,
                    Some(conv3(f / 2, 32, true)),
                    None,
                    Some(Conv2dConfig::new([32, 1], [1, 1]).init(device)),
                ],
            },
            readout: match self.readout_type.as_str() {
                "add" => 1,
                "ignore" => 2,
                _ => 0,
            },
            out_indices: self.backbone_out_indices.clone(),
            hybrid: self.is_hybrid,
            ignore_stages: if self.is_hybrid { self.neck_ignore_stages.clone() } else { Vec::new() },
        }
    }
}

/// A weight-standardised conv (BiT): `convolution.weight` like a bias-free Conv2d.
fn ws_conv<B: Backend>(cin: usize, cout: usize, k: usize, stride: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_bias(false)
        .init(device)
}

/// Weight standardisation (per output channel, biased variance, eps 1e-8) + TF "SAME" padding.
fn ws_forward<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>, same: bool) -> Tensor<B, 4> {
    let w = conv.weight.val();
    let [o, i, kh, kw] = w.dims();
    let flat = w.reshape([o, i * kh * kw]);
    let mean = flat.clone().mean_dim(1);
    let centred = flat - mean;
    let var = centred.clone().powf_scalar(2.0).mean_dim(1);
    let w = (centred / var.add_scalar(1e-8).sqrt()).reshape([o, i, kh, kw]);
    let s = conv.stride[0];
    let [_, _, h, wd] = x.dims();
    let x = if same {
        let ph = same_padding(h, kh, s, 1);
        let pw = same_padding(wd, kw, s, 1);
        pad2d(x, pw / 2, pw - pw / 2, ph / 2, ph - ph / 2, 0.0)
    } else {
        x
    };
    conv2d(x, w, None, ConvOptions::new([s, s], [0, 0], [1, 1], 1))
}

#[derive(Module, Debug)]
pub struct PatchEmbeddings<B: Backend> {
    pub projection: Conv2d<B>,
}

#[derive(Module, Debug)]
pub struct BitEmbedder<B: Backend> {
    pub convolution: Conv2d<B>,
    pub norm: GroupNorm<B>,
}

#[derive(Module, Debug)]
pub struct BitDownsample<B: Backend> {
    pub conv: Conv2d<B>,
    pub norm: GroupNorm<B>,
}

#[derive(Module, Debug)]
pub struct BitBottleneck<B: Backend> {
    pub conv1: Conv2d<B>,
    pub norm1: GroupNorm<B>,
    pub conv2: Conv2d<B>,
    pub norm2: GroupNorm<B>,
    pub conv3: Conv2d<B>,
    pub norm3: GroupNorm<B>,
    pub downsample: Option<BitDownsample<B>>,
}

impl<B: Backend> BitBottleneck<B> {
    fn forward(&self, x: Tensor<B, 4>, same: bool) -> Tensor<B, 4> {
        let shortcut = match &self.downsample {
            Some(d) => d.norm.forward(ws_forward(&d.conv, x.clone(), same)),
            None => x.clone(),
        };
        let h = relu(self.norm1.forward(ws_forward(&self.conv1, x, same)));
        let h = relu(self.norm2.forward(ws_forward(&self.conv2, h, same)));
        let h = self.norm3.forward(ws_forward(&self.conv3, h, same));
        relu(h + shortcut)
    }
}

#[derive(Module, Debug)]
pub struct BitStage<B: Backend> {
    pub layers: Vec<BitBottleneck<B>>,
}

#[derive(Module, Debug)]
pub struct BitEncoder<B: Backend> {
    pub stages: Vec<BitStage<B>>,
}

#[derive(Module, Debug)]
pub struct BitModel<B: Backend> {
    pub embedder: BitEmbedder<B>,
    pub encoder: BitEncoder<B>,
}

#[derive(Module, Debug)]
pub struct BitBackbone<B: Backend> {
    pub bit: BitModel<B>,
}

#[derive(Module, Debug)]
pub struct DptEmbeddings<B: Backend> {
    pub cls_token: Param<Tensor<B, 3>>,
    pub position_embeddings: Param<Tensor<B, 3>>,
    pub patch_embeddings: Option<PatchEmbeddings<B>>,
    pub backbone: Option<BitBackbone<B>>,
    pub projection: Option<Conv2d<B>>,
    pub patch_size: usize,
    pub dynamic_pool_padding: bool,
    pub same_padding: bool,
}

impl<B: Backend> DptEmbeddings<B> {
    /// Position embeddings resized (bilinear, align_corners=False) to a gh x gw token grid.
    fn positions(&self, gh: usize, gw: usize) -> Tensor<B, 3> {
        let pos = self.position_embeddings.val();
        let [_, n, c] = pos.dims();
        let old = ((n - 1) as f64).sqrt().round() as usize;
        let tok = pos.clone().slice([0..1, 0..1, 0..c]);
        let grid = pos
            .slice([0..1, 1..n, 0..c])
            .reshape([1, old, old, c])
            .permute([0, 3, 1, 2]);
        let grid = resize_bilinear(grid, gh, gw, false)
            .permute([0, 2, 3, 1])
            .reshape([1, gh * gw, c]);
        Tensor::cat(vec![tok, grid], 1)
    }

    /// Tokens [B, 1 + gh*gw, C] and, for the hybrid, BiT stage-1 and stage-2 maps.
    fn forward(&self, x: Tensor<B, 4>) -> (Tensor<B, 3>, Vec<Tensor<B, 4>>, usize, usize) {
        let [b, _, h, w] = x.dims();
        let (gh, gw) = (h / self.patch_size, w / self.patch_size);
        let (maps, residuals) = match (&self.patch_embeddings, &self.backbone, &self.projection) {
            (Some(p), _, _) => (p.projection.forward(x), Vec::new()),
            (None, Some(bb), Some(proj)) => {
                let bit = &bb.bit;
                let same = self.same_padding;
                // stem: WS conv 7x7/2 -> GroupNorm+ReLU -> max-pool 3x3/2 (dynamic SAME, zeros)
                let mut h = ws_forward(&bit.embedder.convolution, x, same);
                h = relu(bit.embedder.norm.forward(h));
                if self.dynamic_pool_padding {
                    let [_, _, hh, ww] = h.dims();
                    let ph = same_padding(hh, 3, 2, 1);
                    let pw = same_padding(ww, 3, 2, 1);
                    h = pad2d(h, pw / 2, pw - pw / 2, ph / 2, ph - ph / 2, 0.0);
                }
                h = max_pool2d(h, [3, 3], [2, 2], [0, 0], [1, 1], false);
                let mut stage_maps = Vec::new();
                for stage in &bit.encoder.stages {
                    for layer in &stage.layers {
                        h = layer.forward(h, same);
                    }
                    stage_maps.push(h.clone());
                }
                let last = stage_maps.last().cloned().unwrap_or(h);
                (proj.forward(last), stage_maps.into_iter().take(2).collect())
            }
            _ => unreachable_embeddings(x),
        };
        let [_, c, mh, mw] = maps.dims();
        let tokens = maps.reshape([b, c, mh * mw]).swap_dims(1, 2);
        let cls = self.cls_token.val().expand([b, 1, c]);
        let tokens = Tensor::cat(vec![cls, tokens], 1) + self.positions(gh, gw);
        (tokens, residuals, gh, gw)
    }
}

/// Embeddings without a patch projection or a backbone cannot be built by `DptConfig::init`.
fn unreachable_embeddings<B: Backend>(x: Tensor<B, 4>) -> (Tensor<B, 4>, Vec<Tensor<B, 4>>) {
    (x, Vec::new())
}

#[derive(Module, Debug)]
pub struct Dense<B: Backend> {
    pub dense: Linear<B>,
}

#[derive(Module, Debug)]
pub struct VitSelfAttention<B: Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct VitAttention<B: Backend> {
    pub attention: VitSelfAttention<B>,
    pub output: Dense<B>,
}

#[derive(Module, Debug)]
pub struct VitLayer<B: Backend> {
    pub attention: VitAttention<B>,
    pub intermediate: Dense<B>,
    pub output: Dense<B>,
    pub layernorm_before: LayerNorm<B>,
    pub layernorm_after: LayerNorm<B>,
}

impl<B: Backend> VitLayer<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let a = &self.attention.attention;
        let n = self.layernorm_before.forward(x.clone());
        let q = split_heads(a.query.forward(n.clone()), a.heads);
        let k = split_heads(a.key.forward(n.clone()), a.heads);
        let v = split_heads(a.value.forward(n), a.heads);
        let x = self.attention.output.dense.forward(merge_heads(sdpa(q, k, v, false))) + x;
        let n = self.layernorm_after.forward(x.clone());
        self.output.dense.forward(gelu(self.intermediate.dense.forward(n))) + x
    }
}

#[derive(Module, Debug)]
pub struct VitEncoder<B: Backend> {
    pub layer: Vec<VitLayer<B>>,
}

#[derive(Module, Debug)]
pub struct DptModel<B: Backend> {
    pub embeddings: DptEmbeddings<B>,
    pub encoder: VitEncoder<B>,
    /// Present in checkpoints; the depth model feeds the neck before it.
    pub layernorm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub enum Resize<B: Backend> {
    Up(ConvTranspose2d<B>),
    Down(Conv2d<B>),
}

#[derive(Module, Debug)]
pub struct ReassembleLayer<B: Backend> {
    pub projection: Option<Conv2d<B>>,
    pub resize: Option<Resize<B>>,
}

#[derive(Module, Debug)]
pub struct ReassembleStage<B: Backend> {
    pub layers: Vec<ReassembleLayer<B>>,
    /// `readout_projects.i.0` (Linear 2C -> C, then GELU); empty for ignored stages.
    pub readout_projects: Vec<Vec<Linear<B>>>,
}

#[derive(Module, Debug)]
pub struct ResidualUnit<B: Backend> {
    pub convolution1: Conv2d<B>,
    pub convolution2: Conv2d<B>,
}

impl<B: Backend> ResidualUnit<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.convolution1.forward(relu(x.clone()));
        self.convolution2.forward(relu(h)) + x
    }
}

#[derive(Module, Debug)]
pub struct FusionLayer<B: Backend> {
    pub projection: Conv2d<B>,
    pub residual_layer1: ResidualUnit<B>,
    pub residual_layer2: ResidualUnit<B>,
}

impl<B: Backend> FusionLayer<B> {
    fn forward(&self, hidden: Tensor<B, 4>, residual: Option<Tensor<B, 4>>) -> Tensor<B, 4> {
        let mut h = hidden;
        if let Some(r) = residual {
            let [_, _, hh, ww] = h.dims();
            let r = resize_bilinear(r, hh, ww, false);
            h = h + self.residual_layer1.forward(r);
        }
        h = self.residual_layer2.forward(h);
        let [_, _, hh, ww] = h.dims();
        h = resize_bilinear(h, hh * 2, ww * 2, true);
        self.projection.forward(h)
    }
}

#[derive(Module, Debug)]
pub struct FusionStage<B: Backend> {
    pub layers: Vec<FusionLayer<B>>,
}

#[derive(Module, Debug)]
pub struct DptNeck<B: Backend> {
    pub reassemble_stage: ReassembleStage<B>,
    pub convs: Vec<Conv2d<B>>,
    pub fusion_stage: FusionStage<B>,
}

#[derive(Module, Debug)]
pub struct DepthHead<B: Backend> {
    pub projection: Option<Conv2d<B>>,
    /// `head.0` conv, `head.1` upsample, `head.2` conv, `head.3` ReLU, `head.4` conv (+ ReLU).
    pub head: Vec<Option<Conv2d<B>>>,
}

#[derive(Module, Debug)]
pub struct DptForDepthEstimation<B: Backend> {
    pub dpt: DptModel<B>,
    pub neck: DptNeck<B>,
    pub head: DepthHead<B>,
    /// 0 project, 1 add, 2 ignore.
    pub readout: usize,
    pub out_indices: Vec<usize>,
    pub hybrid: bool,
    pub ignore_stages: Vec<usize>,
}

impl<B: Backend> DptForDepthEstimation<B> {
    /// `pixels`: [B, 3, H, W] normalised as the image processor does -> predicted (relative
    /// inverse) depth [B, H', W'].
    pub fn forward(&self, pixels: Tensor<B, 4>) -> Tensor<B, 3> {
        // 1. embeddings (+ BiT maps for the hybrid)
        let (mut h, residual_maps, gh, gw) = self.dpt.embeddings.forward(pixels);
        // 2. ViT layers, keeping the outputs the neck reads
        let mut outs = Vec::new();
        for layer in &self.dpt.encoder.layer {
            h = layer.forward(h);
            outs.push(h.clone());
        }
        let chosen: Vec<Tensor<B, 3>> = if self.hybrid {
            self.out_indices[2..].iter().filter_map(|&i| outs.get(i).cloned()).collect()
        } else {
            self.out_indices.iter().filter_map(|&i| outs.get(i).cloned()).collect()
        };
        // 3. reassemble to feature maps
        let mut maps: Vec<Tensor<B, 4>> = Vec::new();
        let mut tokens = chosen.into_iter();
        for i in 0..4 {
            if self.ignore_stages.contains(&i) {
                if let Some(m) = residual_maps.get(i) {
                    maps.push(m.clone());
                }
                continue;
            }
            let Some(t) = tokens.next() else { break };
            let [b, n, c] = t.dims();
            let cls = t.clone().slice([0..b, 0..1, 0..c]);
            let patches = t.slice([0..b, 1..n, 0..c]);
            let patches = match self.readout {
                0 => {
                    let readout = cls.expand([b, n - 1, c]);
                    let proj = &self.neck.reassemble_stage.readout_projects[i];
                    match proj.first() {
                        Some(lin) => gelu(lin.forward(Tensor::cat(vec![patches, readout], 2))),
                        None => patches,
                    }
                }
                1 => patches + cls.expand([b, n - 1, c]),
                _ => patches,
            };
            let map = patches.swap_dims(1, 2).reshape([b, c, gh, gw]);
            let layer = &self.neck.reassemble_stage.layers[i];
            let mut m = match &layer.projection {
                Some(p) => p.forward(map),
                None => map,
            };
            m = match &layer.resize {
                Some(Resize::Up(t)) => t.forward(m),
                Some(Resize::Down(d)) => d.forward(m),
                None => m,
            };
            maps.push(m);
        }
        // 4. neck convs and fusion (deepest first)
        let features: Vec<Tensor<B, 4>> = maps
            .into_iter()
            .zip(&self.neck.convs)
            .map(|(m, conv)| conv.forward(m))
            .collect();
        let mut fused: Option<Tensor<B, 4>> = None;
        for (feature, layer) in features.into_iter().rev().zip(&self.neck.fusion_stage.layers) {
            fused = Some(match fused {
                None => layer.forward(feature, None),
                Some(prev) => layer.forward(prev, Some(feature)),
            });
        }
        let Some(mut x) = fused else {
            return Tensor::zeros([1, 1, 1], &self.dpt.embeddings.cls_token.val().device());
        };
        // 5. head
        if let Some(p) = &self.head.projection {
            x = relu(p.forward(x));
        }
        let conv = |i: usize, x: Tensor<B, 4>| match self.head.head.get(i).and_then(Option::as_ref) {
            Some(c) => c.forward(x),
            None => x,
        };
        x = conv(0, x);
        let [_, _, hh, ww] = x.dims();
        x = resize_bilinear(x, hh * 2, ww * 2, true);
        x = relu(conv(2, x));
        x = relu(conv(4, x));
        let [b, _, hh, ww] = x.dims();
        x.reshape([b, hh, ww])
    }
}

/// Load a DPT folder (`config.json` + `model.safetensors`).
pub fn load_dpt<B: Backend>(dir: &Path, dtype: DType, device: &B::Device) -> Result<DptForDepthEstimation<B>, DptError> {
    let config = DptConfig::from_file(&dir.join("config.json"))?;
    let file = find_weights(dir, &["model.safetensors", "model.fp16.safetensors"]).ok_or_else(|| DptError::NoWeights {
        folder: dir.display().to_string(),
    })?;
    let weights = Weights::open(&[file])?;
    // The auxiliary/segmentation heads of other DPT checkpoints are not used for depth.
    let (model, report) = load_module(config.init::<B>(device), &weights, &KeyRemap::new(), dtype, Unused::Allow)?;
    if let Some(extra) = report
        .unused
        .iter()
        .find(|k| !k.starts_with("auxiliary_head.") && !k.ends_with("num_batches_tracked"))
    {
        return Err(DptError::Weights(WeightError::Unused {
            files: weights.file_list(),
            unused: vec![extra.clone()],
        }));
    }
    Ok(model)
}

/// `preprocessor_config.json` fields we use (DPTImageProcessor defaults otherwise).
#[derive(Clone, Debug, Deserialize)]
pub struct DptPreprocess {
    #[serde(default = "size384")]
    pub size: serde_json::Value,
    #[serde(default = "half3")]
    pub image_mean: Vec<f32>,
    #[serde(default = "half3")]
    pub image_std: Vec<f32>,
}

fn size384() -> serde_json::Value {
    serde_json::json!({"height": 384, "width": 384})
}
fn half3() -> Vec<f32> {
    vec![0.5, 0.5, 0.5]
}

impl Default for DptPreprocess {
    fn default() -> Self {
        Self {
            size: size384(),
            image_mean: half3(),
            image_std: half3(),
        }
    }
}

impl DptPreprocess {
    /// A model folder's `preprocessor_config.json`, or the DPTImageProcessor defaults without one.
    pub fn from_folder(dir: &Path) -> Self {
        std::fs::read_to_string(dir.join("preprocessor_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    pub fn side(&self) -> (u32, u32) {
        match &self.size {
            serde_json::Value::Number(n) => {
                let s = n.as_u64().unwrap_or(384) as u32;
                (s, s)
            }
            v => (
                v["height"].as_u64().unwrap_or(384) as u32,
                v["width"].as_u64().unwrap_or(384) as u32,
            ),
        }
    }
}

//! RFNet, the reliability classifier of PAPER.md ("Recurrent generation with RFNet"): a ResNet-50
//! image encoder (shared by the product I_o, the generated image I_g, its depth I_d and saliency
//! I_s), a BERT caption encoder, N1 Feature Filter Modules, N2 self-attention fusion layers and a
//! five-class classifier.
//!
//! | part | what it computes |
//! |---|---|
//! | `image_proj.m` | 1x1 conv of ResNet-50's pre-pool map to the fusion width, one per modality m (0 product, 1 generated, 2 depth, 3 saliency) |
//! | `text_proj` | Linear of BERT's last hidden state to the fusion width (e_c) |
//! | `ffm.i` | e_f = out_conv(attn_conv(CrossAttention(q = e_o, k = v = e_c)) * gate_conv(e_o)) + e_o |
//! | `fusion.i` | pre-norm transformer layer (multi-head self-attention + GELU MLP) over Concat(e_f, e_g, e_d, e_s) tokens, with learned position and modality embeddings |
//! | `classifier` | LayerNorm, mean over tokens, Linear to the 5 classes |
//!
//! A checkpoint folder is self-contained: `config.json` (this config, with the encoders'
//! configs), `model.safetensors` (all weights; encoder keys under `image_encoder.` and
//! `text_encoder.` under the public layouts' names, torchvision's and transformers', see
//! `save_rfnet`; older files with rfstudio's module paths still load, see `rfnet_remap`),
//! `vocab.txt` (+ `tokenizer_config.json`).
//! Modalities can be switched off for the paper's ablation (`modalities`).

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Int, Tensor};
use serde::{Deserialize, Serialize};

use super::bert::{BertConfig, BertModel};
use super::diffusers_blocks::{merge_heads, split_heads};
use super::resnet::{ResNet, ResNetConfig};
use super::weights::{KeyRemap, Unused, WeightError, Weights, load_module};

pub const NUM_CLASSES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum RfNetError {
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
    #[error("{0}")]
    Weights(#[from] WeightError),
    #[error("{0}")]
    Other(String),
}

/// Which inputs RFNet sees (the paper's ablation switches them off one at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Modalities {
    pub product: bool,
    pub generated: bool,
    pub depth: bool,
    pub saliency: bool,
    pub caption: bool,
}

impl Default for Modalities {
    fn default() -> Self {
        Self {
            product: true,
            generated: true,
            depth: true,
            saliency: true,
            caption: true,
        }
    }
}

/// `config.json` of an RFNet checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RfNetConfig {
    /// Fusion width (384).
    pub width: usize,
    /// Attention heads (8).
    pub heads: usize,
    /// Feature Filter Modules (N1 = 1).
    pub ffm_layers: usize,
    /// Self-attention fusion layers (N2 = 3).
    pub fusion_layers: usize,
    /// Input images are resized to this side (384).
    pub input_size: usize,
    /// Caption tokens (titles are short; 32).
    pub max_caption_tokens: usize,
    pub modalities: Modalities,
    /// The ResNet-50 layout (width divisor 1 for the real encoder).
    pub image_encoder: ResNetConfig,
    /// The BERT config (the text encoder folder's config.json).
    pub text_encoder: serde_json::Value,
}

impl RfNetConfig {
    /// The paper's configuration on top of the given encoders.
    pub fn paper(image_encoder: ResNetConfig, text_encoder: serde_json::Value) -> Self {
        Self {
            width: 384,
            heads: 8,
            ffm_layers: 1,
            fusion_layers: 3,
            input_size: 384,
            max_caption_tokens: 32,
            modalities: Modalities::default(),
            image_encoder,
            text_encoder,
        }
    }

    /// A small configuration for tests and CPU demos.
    pub fn tiny(image_encoder: ResNetConfig, text_encoder: serde_json::Value) -> Self {
        Self {
            width: 32,
            heads: 4,
            ffm_layers: 1,
            fusion_layers: 1,
            input_size: 64,
            max_caption_tokens: 16,
            modalities: Modalities::default(),
            image_encoder,
            text_encoder,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, RfNetError> {
        let text = std::fs::read_to_string(path).map_err(|e| RfNetError::Config {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let c: Self = serde_json::from_str(&text).map_err(|e| RfNetError::Config {
            path: path.display().to_string(),
            reason: format!("not an RFNet config: {e}"),
        })?;
        c.validate().map_err(|reason| RfNetError::Config {
            path: path.display().to_string(),
            reason,
        })?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.width == 0 || self.heads == 0 || self.width % self.heads != 0 {
            return Err(format!("width {} must be a positive multiple of heads {}", self.width, self.heads));
        }
        if self.input_size < 32 || self.input_size % 32 != 0 {
            return Err(format!("input_size {} must be a multiple of 32", self.input_size));
        }
        let m = self.modalities;
        if !(m.product || m.generated || m.depth || m.saliency) {
            return Err("at least one image modality must be on".into());
        }
        Ok(())
    }

    pub fn bert(&self) -> Result<BertConfig, String> {
        serde_json::from_value(self.text_encoder.clone()).map_err(|e| format!("text_encoder config: {e}"))
    }

    /// Tokens per image modality (the ResNet map is input/32 on each side).
    pub fn grid(&self) -> usize {
        self.input_size / 32
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<RfNet<B>, String> {
        let w = self.width;
        let bert = self.bert()?;
        let text_hidden = bert.hidden_size;
        let channels = self.image_encoder.feature_channels();
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let conv1 = |i, o| Conv2dConfig::new([i, o], [1, 1]).init(device);
        let ln = || LayerNormConfig::new(w).init(device);
        let g = self.grid();
        Ok(RfNet {
            image_encoder: self.image_encoder.init(device),
            // RFNet reads BERT's last hidden state only: no pooler.
            text_encoder: bert.init_with_pooler(false, device),
            image_proj: (0..4).map(|_| conv1(channels, w)).collect(),
            text_proj: lin(text_hidden, w),
            ffm: (0..self.ffm_layers)
                .map(|_| FeatureFilter {
                    attn: MultiHeadAttention::new(w, self.heads, device),
                    attn_conv: conv1(w, w),
                    gate_conv: conv1(w, w),
                    out_conv: conv1(w, w),
                })
                .collect(),
            position: Param::from_tensor(Tensor::random(
                [g * g, w],
                burn::tensor::Distribution::Normal(0.0, 0.02),
                device,
            )),
            modality: Param::from_tensor(Tensor::random(
                [4, w],
                burn::tensor::Distribution::Normal(0.0, 0.02),
                device,
            )),
            fusion: (0..self.fusion_layers)
                .map(|_| FusionLayer {
                    norm1: ln(),
                    attn: MultiHeadAttention::new(w, self.heads, device),
                    norm2: ln(),
                    fc1: lin(w, 4 * w),
                    fc2: lin(4 * w, w),
                })
                .collect(),
            norm: ln(),
            classifier: lin(w, NUM_CLASSES),
            modalities: [
                self.modalities.product,
                self.modalities.generated,
                self.modalities.depth,
                self.modalities.saliency,
                self.modalities.caption,
            ],
        })
    }
}

/// Multi-head attention with separate q/k/v/out projections.
#[derive(Module, Debug)]
pub struct MultiHeadAttention<B: Backend> {
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub out: Linear<B>,
    pub heads: usize,
}

impl<B: Backend> MultiHeadAttention<B> {
    pub fn new(width: usize, heads: usize, device: &B::Device) -> Self {
        let lin = || LinearConfig::new(width, width).init(device);
        Self {
            q: lin(),
            k: lin(),
            v: lin(),
            out: lin(),
            heads,
        }
    }

    /// `key_padding`: [B, S_k] true where the key is padding.
    pub fn forward(&self, query: Tensor<B, 3>, context: Tensor<B, 3>, key_padding: Option<Tensor<B, 2, Bool>>) -> Tensor<B, 3> {
        let [b, nq, _] = query.dims();
        let nk = context.dims()[1];
        let q = split_heads(self.q.forward(query), self.heads);
        let k = split_heads(self.k.forward(context.clone()), self.heads);
        let v = split_heads(self.v.forward(context), self.heads);
        let mask = key_padding.map(|m| m.reshape([b, 1, 1, nk]).expand([b, self.heads, nq, nk]));
        let out = attention(
            q,
            k,
            v,
            mask,
            None,
            AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: false,
            },
        );
        self.out.forward(merge_heads(out))
    }
}

/// Feature Filter Module: the product embedding filtered by the caption.
#[derive(Module, Debug)]
pub struct FeatureFilter<B: Backend> {
    pub attn: MultiHeadAttention<B>,
    pub attn_conv: Conv2d<B>,
    pub gate_conv: Conv2d<B>,
    pub out_conv: Conv2d<B>,
}

impl<B: Backend> FeatureFilter<B> {
    /// `e_o`: [B, W, g, g]; `e_c`: [B, S, W] with its padding mask.
    pub fn forward(&self, e_o: Tensor<B, 4>, e_c: Tensor<B, 3>, padding: Tensor<B, 2, Bool>) -> Tensor<B, 4> {
        let [b, w, g, _] = e_o.dims();
        // 1. cross-attention: product tokens query the caption
        let tokens = e_o.clone().reshape([b, w, g * g]).swap_dims(1, 2);
        let a = self.attn.forward(tokens, e_c, Some(padding));
        let a = a.swap_dims(1, 2).reshape([b, w, g, g]);
        // 2. conv(conv(attention) * conv(e_o)) + e_o
        let gated = self.attn_conv.forward(a) * self.gate_conv.forward(e_o.clone());
        self.out_conv.forward(gated) + e_o
    }
}

/// Pre-norm transformer layer of the fusion stage.
#[derive(Module, Debug)]
pub struct FusionLayer<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: MultiHeadAttention<B>,
    pub norm2: LayerNorm<B>,
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> FusionLayer<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let n = self.norm1.forward(x.clone());
        let x = x + self.attn.forward(n.clone(), n, None);
        let n = self.norm2.forward(x.clone());
        x + self.fc2.forward(gelu(self.fc1.forward(n)))
    }
}

#[derive(Module, Debug)]
pub struct RfNet<B: Backend> {
    pub image_encoder: ResNet<B>,
    pub text_encoder: BertModel<B>,
    pub image_proj: Vec<Conv2d<B>>,
    pub text_proj: Linear<B>,
    pub ffm: Vec<FeatureFilter<B>>,
    /// Learned position embedding of the g x g tokens of each modality.
    pub position: Param<Tensor<B, 2>>,
    /// Learned modality embedding (product, generated, depth, saliency).
    pub modality: Param<Tensor<B, 2>>,
    pub fusion: Vec<FusionLayer<B>>,
    pub norm: LayerNorm<B>,
    pub classifier: Linear<B>,
    /// product, generated, depth, saliency, caption
    pub modalities: [bool; 5],
}

/// One batch of RFNet inputs (images ImageNet-normalised, maps replicated to 3 channels).
#[derive(Clone, Debug)]
pub struct RfNetInput<B: Backend> {
    pub product: Tensor<B, 4>,
    pub generated: Tensor<B, 4>,
    pub depth: Tensor<B, 4>,
    pub saliency: Tensor<B, 4>,
    pub caption_ids: Tensor<B, 2, Int>,
    pub caption_mask: Tensor<B, 2, Int>,
}

impl<B: Backend> RfNet<B> {
    /// Class logits [B, 5]. `frozen_encoders` detaches the encoders' outputs (no gradient).
    pub fn forward(&self, input: RfNetInput<B>, frozen_encoders: bool) -> Tensor<B, 2> {
        let [b, _, _, _] = input.generated.dims();
        let detach4 = |t: Tensor<B, 4>| if frozen_encoders { t.detach() } else { t };
        let position = self.position.val();
        let [n, w] = position.dims();
        let modality = self.modality.val();
        let token = |map: Tensor<B, 4>, m: usize| {
            let tokens = map.reshape([b, w, n]).swap_dims(1, 2);
            tokens + position.clone().unsqueeze::<3>() + modality.clone().slice([m..m + 1, 0..w]).unsqueeze::<3>()
        };
        // 1. image embeddings: every active modality through the shared encoder in one batch
        let images: Vec<(usize, Tensor<B, 4>)> = [input.product, input.generated, input.depth, input.saliency]
            .into_iter()
            .enumerate()
            .filter(|(m, _)| self.modalities[*m])
            .collect();
        let active: Vec<usize> = images.iter().map(|(m, _)| *m).collect();
        let features = detach4(
            self.image_encoder
                .forward_features(Tensor::cat(images.into_iter().map(|(_, x)| x).collect(), 0)),
        );
        let [_, c, g, _] = features.dims();
        let mut maps: Vec<Option<Tensor<B, 4>>> = vec![None, None, None, None];
        for (k, &m) in active.iter().enumerate() {
            let f = features.clone().slice([k * b..(k + 1) * b, 0..c, 0..g, 0..g]);
            maps[m] = Some(self.image_proj[m].forward(f));
        }
        let mut parts = Vec::new();
        if let Some(mut e) = maps[0].take() {
            // 2. Feature Filter Modules with the caption
            if self.modalities[4] {
                let text = self
                    .text_encoder
                    .forward(input.caption_ids, input.caption_mask.clone(), None)
                    .last_hidden_state;
                let text = if frozen_encoders { text.detach() } else { text };
                let e_c = self.text_proj.forward(text);
                let padding = input.caption_mask.equal_elem(0);
                for f in &self.ffm {
                    e = f.forward(e, e_c.clone(), padding.clone());
                }
            }
            parts.push(token(e, 0));
        }
        for (m, map) in maps.into_iter().enumerate().skip(1) {
            if let Some(map) = map {
                parts.push(token(map, m));
            }
        }
        // 3. fusion over all tokens
        let mut x = Tensor::cat(parts, 1);
        for layer in &self.fusion {
            x = layer.forward(x);
        }
        // 4. classifier
        let pooled = self.norm.forward(x).mean_dim(1).squeeze_dim::<2>(1);
        self.classifier.forward(pooled)
    }

    /// Class probabilities [B, 5].
    pub fn probabilities(&self, input: RfNetInput<B>) -> Tensor<B, 2> {
        softmax(self.forward(input, true), 1)
    }
}

/// Load an RFNet checkpoint folder (config.json + model.safetensors).
pub fn load_rfnet<B: Backend>(dir: &Path, dtype: DType, device: &B::Device) -> Result<(RfNet<B>, RfNetConfig), RfNetError> {
    let config = RfNetConfig::from_file(&dir.join("config.json"))?;
    let file = dir.join("model.safetensors");
    let weights = Weights::open(std::slice::from_ref(&file))?;
    let model = config.init::<B>(device).map_err(|reason| RfNetError::Config {
        path: dir.join("config.json").display().to_string(),
        reason,
    })?;
    let (model, report) = load_module(model, &weights, &rfnet_remap(), dtype, Unused::Allow)?;
    // Only BatchNorm step counters, BERT's position-id buffer and the unused BERT pooler that
    // older checkpoints carried may be left over.
    let extra: Vec<String> = report
        .unused
        .into_iter()
        .filter(|k| !k.ends_with("num_batches_tracked") && !k.ends_with("position_ids") && !k.starts_with("text_encoder.pooler."))
        .collect();
    if !extra.is_empty() {
        return Err(RfNetError::Weights(WeightError::Unused {
            files: weights.file_list(),
            unused: extra,
        }));
    }
    Ok((model, config))
}

/// Save an RFNet's weights (f32, atomically) with the encoders under their public names, so that
/// the `image_encoder.` tensors load in torchvision's `resnet50` and the `text_encoder.` ones in
/// transformers' `BertModel` as they are (`public_key`).
pub fn save_rfnet<B: Backend>(model: &RfNet<B>, path: &Path) -> Result<usize, WeightError> {
    super::weights::save_module_renamed(model, path, &[("format", "pt"), ("rfstudio", "rfnet")], &public_key)
}

/// A module path -> the key the public checkpoints use: torchvision's `downsample.0/1` for the
/// ResNet shortcut, transformers' `attention.self` and `LayerNorm` for BERT. The inverse of
/// `rfnet_remap` on those parts; every other key is unchanged.
pub fn public_key(path: &str) -> String {
    if let Some(rest) = path.strip_prefix("image_encoder.") {
        let rest = rest.replace(".downsample.conv.", ".downsample.0.").replace(".downsample.bn.", ".downsample.1.");
        return format!("image_encoder.{rest}");
    }
    if let Some(rest) = path.strip_prefix("text_encoder.") {
        let rest = rest.replace(".self_attn.", ".self.");
        let rest = match rest.strip_suffix(".layer_norm.weight") {
            Some(head) => format!("{head}.LayerNorm.weight"),
            None => match rest.strip_suffix(".layer_norm.bias") {
                Some(head) => format!("{head}.LayerNorm.bias"),
                None => rest,
            },
        };
        return format!("text_encoder.{rest}");
    }
    path.to_string()
}

/// Checkpoint keys in the encoders' public layouts (torchvision `downsample.0/1`, transformers
/// `attention.self` / `LayerNorm`) -> module paths. rfstudio writes the public names
/// (`save_rfnet`); checkpoints it wrote before, with the module paths, pass through unchanged.
pub fn rfnet_remap() -> KeyRemap {
    [
        (r"^(image_encoder\..*)\.downsample\.0\.(.*)$", "${1}.downsample.conv.${2}"),
        (r"^(image_encoder\..*)\.downsample\.1\.(.*)$", "${1}.downsample.bn.${2}"),
        (r"^(text_encoder\..*)\.attention\.self\.(.*)$", "${1}.attention.self_attn.${2}"),
        (r"^(text_encoder\..*)\.LayerNorm\.(weight|bias)$", "${1}.layer_norm.${2}"),
        (r"^(text_encoder\..*)\.LayerNorm\.gamma$", "${1}.layer_norm.weight"),
        (r"^(text_encoder\..*)\.LayerNorm\.beta$", "${1}.layer_norm.bias"),
    ]
    .into_iter()
    .try_fold(KeyRemap::new(), |r, (p, rep)| r.rule(p, rep))
    .unwrap_or_default()
}

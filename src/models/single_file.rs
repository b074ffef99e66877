//! Single-file checkpoints in the original layouts, as A1111, ComfyUI and civitai ship them:
//! Stable Diffusion 1.x in the LDM layout (`model.diffusion_model.*` UNet, `first_stage_model.*`
//! VAE, `cond_stage_model.transformer.*` CLIP text encoder, optionally EMA copies under
//! `model_ema.*`, f32 or f16) and ControlNets in the `control_model.*` layout (v1.1
//! `control_v11p_sd15_canny`, or the v1.0 `control_sd15_canny` files that also carry a whole SD
//! model). The counterpart of diffusers' `loaders/single_file_utils.py`.
//!
//! Nothing is converted on disk: each component is loaded from the memory-mapped file through a
//! key *view* (`KeyRemap::with_view`) that renames the original keys to diffusers' (and hides the
//! other components' tensors), followed by the component's usual diffusers remap. The
//! configurations are inferred from the tensors' names and shapes; what tensors cannot tell takes
//! SD 1.x's values (8 UNet heads, CLIP heads of width 64, GroupNorm with 32 groups, the VAE scaling
//! factor 0.18215), as diffusers' own SD 1.x configs do.
//!
//! | original key | diffusers key |
//! |---|---|
//! | `time_embed.0` / `time_embed.2` | `time_embedding.linear_1` / `linear_2` |
//! | `input_blocks.0.0` | `conv_in` |
//! | `input_blocks.I.0` (resnet; `in_layers.0/2`, `emb_layers.1`, `out_layers.0/3`, `skip_connection`) | `down_blocks.B.resnets.L` (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`), B = (I-1)/(n+1), L = (I-1)%(n+1), n = layers per block |
//! | `input_blocks.I.0.op` | `down_blocks.B.downsamplers.0.conv` |
//! | `input_blocks.I.1` | `down_blocks.B.attentions.L` |
//! | `middle_block.0/1/2` | `mid_block.resnets.0` / `attentions.0` / `resnets.1` |
//! | `output_blocks.I.0` / `.1` / `.1.conv` or `.2.conv` | `up_blocks.B.resnets.L` / `attentions.L` / `upsamplers.0.conv`, B = I/(n+1), L = I%(n+1) |
//! | `out.0` / `out.2` | `conv_norm_out` / `conv_out` |
//! | `zero_convs.I.0` / `middle_block_out.0` | `controlnet_down_blocks.I` / `controlnet_mid_block` |
//! | `input_hint_block.0` / `.2k` / last | `controlnet_cond_embedding.conv_in` / `blocks.(k-1)` / `conv_out` |
//! | VAE `encoder.down.I.block.J` / `.downsample.conv` | `encoder.down_blocks.I.resnets.J` / `downsamplers.0.conv` |
//! | VAE `decoder.up.I.block.J` / `.upsample.conv` | `decoder.up_blocks.(N-1-I).resnets.J` / `upsamplers.0.conv` |
//! | VAE `mid.block_1/2`, `mid.attn_1.{norm,q,k,v,proj_out}` | `mid_block.resnets.0/1`, `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (1x1 convs read as Linear) |
//! | VAE `norm_out`, `nin_shortcut` | `conv_norm_out`, `conv_shortcut` |
//! | `cond_stage_model.transformer.text_model.*` | `text_model.*` |

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use super::pth::{PthError, StateDict, safetensors_f32_bytes};
use super::weights::{SafetensorsFile, TensorEntry, WeightError};

/// The UNet's prefix in an SD single file.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// The VAE's prefix (`vae.` in a few community files).
pub const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];
/// The CLIP text encoder's prefix.
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// The ControlNet's prefix.
pub const CONTROL_PREFIX: &str = "control_model.";

/// What a checkpoint file holds, as far as its tensor names and shapes tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detected {
    /// Stable Diffusion 1.x in the LDM layout (`ema`: EMA copies are present and ignored).
    Sd1 { ema: bool },
    /// An SD 1.x inpainting UNet (9 input channels).
    Sd1Inpainting,
    /// Stable Diffusion 2.x (OpenCLIP text encoder, 1024-wide context).
    Sd2,
    /// Stable Diffusion XL (two text encoders, `conditioner.*`).
    Sdxl,
    /// A ControlNet in the `control_model.*` layout (`with_sd`: the v1.0 files that also carry a
    /// whole SD model).
    ControlNet { with_sd: bool },
    /// A LoRA (kohya `lora_down`/`lora_up` or PEFT `lora_A`/`lora_B` tensors).
    Lora,
    /// One diffusers component's weights (`down_blocks.*` keys), not a whole checkpoint.
    DiffusersComponent,
    Unknown,
}

impl Detected {
    /// How `info` and error messages name the layout.
    pub fn describe(&self) -> String {
        match self {
            Detected::Sd1 { ema: false } => crate::tr!("models.detected_sd1").into(),
            Detected::Sd1 { ema: true } => crate::tr!("models.detected_sd1_ema").into(),
            Detected::Sd1Inpainting => crate::tr!("models.detected_sd1_inpainting").into(),
            Detected::Sd2 => crate::tr!("models.detected_sd2").into(),
            Detected::Sdxl => crate::tr!("models.detected_sdxl").into(),
            Detected::ControlNet { with_sd: false } => crate::tr!("models.detected_controlnet").into(),
            Detected::ControlNet { with_sd: true } => crate::tr!("models.detected_controlnet_with_sd").into(),
            Detected::Lora => crate::tr!("models.detected_lora").into(),
            Detected::DiffusersComponent => crate::tr!("models.detected_diffusers_component").into(),
            Detected::Unknown => crate::tr!("models.detected_unknown").into(),
        }
    }
}

/// Detect the layout of a checkpoint from its tensor index.
pub fn detect(tensors: &BTreeMap<String, TensorEntry>) -> Detected {
    let any = |f: &dyn Fn(&str) -> bool| tensors.keys().any(|k| f(k));
    if any(&|k| k.contains("lora_down") || k.contains("lora_up") || k.contains("lora_A") || k.contains("lora_B") || k.contains(".lora.")) {
        return Detected::Lora;
    }
    let has_control = any(&|k| k.starts_with(CONTROL_PREFIX)) || tensors.contains_key("input_hint_block.0.weight");
    let has_unet = any(&|k| k.starts_with(UNET_PREFIX));
    if has_control {
        return Detected::ControlNet { with_sd: has_unet };
    }
    if any(&|k| k.starts_with("conditioner.embedders.")) || tensors.contains_key(&format!("{UNET_PREFIX}label_emb.0.0.weight")) {
        return Detected::Sdxl;
    }
    let context_1024 = tensors
        .iter()
        .any(|(k, e)| k.starts_with(UNET_PREFIX) && k.ends_with("attn2.to_k.weight") && e.shape.get(1) == Some(&1024));
    if any(&|k| k.starts_with("cond_stage_model.model.")) || context_1024 {
        return Detected::Sd2;
    }
    if let Some(e) = tensors.get(&format!("{UNET_PREFIX}input_blocks.0.0.weight")) {
        if e.shape.get(1) == Some(&9) {
            return Detected::Sd1Inpainting;
        }
        let ema = any(&|k| k.starts_with("model_ema."));
        return Detected::Sd1 { ema };
    }
    if any(&|k| k.starts_with("down_blocks.") || k.starts_with("unet.down_blocks.")) {
        return Detected::DiffusersComponent;
    }
    Detected::Unknown
}

/// Why a configuration could not be inferred (the caller names the file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot infer the {component} configuration: {reason}")]
pub struct InferError {
    pub component: &'static str,
    pub reason: String,
}

/// Tensor shapes under one prefix.
struct Shapes<'a> {
    tensors: &'a BTreeMap<String, TensorEntry>,
    prefix: &'a str,
    component: &'static str,
}

impl<'a> Shapes<'a> {
    fn get(&self, key: &str) -> Option<&'a [usize]> {
        self.tensors.get(&format!("{}{key}", self.prefix)).map(|e| e.shape.as_slice())
    }
    fn need(&self, key: &str) -> Result<&'a [usize], InferError> {
        self.get(key).ok_or_else(|| self.err(format!("no tensor {}{key}", self.prefix)))
    }
    fn dim(&self, key: &str, i: usize) -> Result<usize, InferError> {
        let s = self.need(key)?;
        s.get(i)
            .copied()
            .ok_or_else(|| self.err(format!("{}{key} has shape {s:?}", self.prefix)))
    }
    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
    /// The distinct integers N of keys `{prefix}{head}N.` (e.g. `input_blocks.` -> 0..12).
    fn indices(&self, head: &str) -> BTreeSet<usize> {
        let start = format!("{}{head}", self.prefix);
        self.tensors
            .keys()
            .filter_map(|k| k.strip_prefix(&start))
            .filter_map(|rest| rest.split('.').next()?.parse().ok())
            .collect()
    }
    fn err(&self, reason: String) -> InferError {
        InferError {
            component: self.component,
            reason,
        }
    }
}

/// The down path shared by SD UNets and ControlNets: layers per block, channels and which levels
/// have attention, as a diffusers config's fields.
fn infer_down_path(s: &Shapes) -> Result<serde_json::Map<String, serde_json::Value>, InferError> {
    let conv_in = s.need("input_blocks.0.0.weight")?;
    if conv_in.len() != 4 {
        return Err(s.err(format!("input_blocks.0.0.weight has shape {conv_in:?}, not a conv kernel")));
    }
    let blocks = s.indices("input_blocks.");
    let n_in = blocks.iter().max().map_or(0, |m| m + 1);
    if n_in < 2 || blocks.len() != n_in {
        return Err(s.err(format!("input_blocks are not numbered 0..N ({} found)", blocks.len())));
    }
    // The first downsampler sits after `layers_per_block` resnets.
    let first_op = (1..n_in).find(|i| s.has(&format!("input_blocks.{i}.0.op.weight")));
    let layers = first_op.map_or(n_in - 1, |i| i - 1);
    if layers == 0 || n_in % (layers + 1) != 0 {
        return Err(s.err(format!("{n_in} input blocks do not form levels of {layers} resnets + a downsampler")));
    }
    let levels = n_in / (layers + 1);
    let mut channels = Vec::new();
    let mut attention = Vec::new();
    for l in 0..levels {
        let i = 1 + l * (layers + 1);
        channels.push(s.dim(&format!("input_blocks.{i}.0.out_layers.3.weight"), 0)?);
        attention.push(s.has(&format!("input_blocks.{i}.1.proj_in.weight")));
    }
    // Cross-attention width and the projection kind from the first transformer.
    let attn_block = (0..levels)
        .find(|&l| attention[l])
        .map(|l| format!("input_blocks.{}.1", 1 + l * (layers + 1)))
        .unwrap_or_else(|| "middle_block.1".into());
    let cross = s.dim(&format!("{attn_block}.transformer_blocks.0.attn2.to_k.weight"), 1)?;
    let linear_projection = s.need(&format!("{attn_block}.proj_in.weight"))?.len() == 2;
    let depth = s.indices(&format!("{attn_block}.transformer_blocks.")).len().max(1);
    let mut c = serde_json::Map::new();
    c.insert("in_channels".into(), json!(conv_in[1]));
    c.insert("block_out_channels".into(), json!(channels));
    c.insert(
        "down_block_types".into(),
        json!(attention.iter().map(|&a| if a { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect::<Vec<_>>()),
    );
    c.insert("layers_per_block".into(), json!(layers));
    c.insert("cross_attention_dim".into(), json!(cross));
    c.insert("use_linear_projection".into(), json!(linear_projection));
    c.insert("transformer_layers_per_block".into(), json!(depth));
    // Not in the tensors: SD 1.x's values.
    c.insert("attention_head_dim".into(), json!(8));
    c.insert("norm_num_groups".into(), json!(32));
    c.insert("norm_eps".into(), json!(1e-5));
    c.insert("flip_sin_to_cos".into(), json!(true));
    c.insert("freq_shift".into(), json!(0));
    c.insert("downsample_padding".into(), json!(1));
    c.insert("act_fn".into(), json!("silu"));
    c.insert("mid_block_type".into(), json!("UNetMidBlock2DCrossAttn"));
    Ok(c)
}

/// The diffusers `unet/config.json` of an SD 1.x single file.
pub fn infer_unet_config(tensors: &BTreeMap<String, TensorEntry>) -> Result<serde_json::Value, InferError> {
    let s = Shapes {
        tensors,
        prefix: UNET_PREFIX,
        component: "UNet",
    };
    let mut c = infer_down_path(&s)?;
    let layers = c["layers_per_block"].as_u64().unwrap_or(2) as usize;
    let levels = c["block_out_channels"].as_array().map_or(0, Vec::len);
    // Up level j mirrors down level levels-1-j; its attention shows at output block j*(n+1).
    let up: Vec<&str> = (0..levels)
        .map(|j| {
            if s.has(&format!("output_blocks.{}.1.proj_in.weight", j * (layers + 1))) {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    c.insert("_class_name".into(), json!("UNet2DConditionModel"));
    c.insert("up_block_types".into(), json!(up));
    c.insert("out_channels".into(), json!(s.dim("out.2.weight", 0)?));
    c.insert("sample_size".into(), json!(64));
    Ok(serde_json::Value::Object(c))
}

/// The diffusers ControlNet `config.json` of a `control_model.*` single file (`prefix` is
/// `control_model.`, or empty for files stored without it).
pub fn infer_controlnet_config(tensors: &BTreeMap<String, TensorEntry>, prefix: &str) -> Result<serde_json::Value, InferError> {
    let s = Shapes {
        tensors,
        prefix,
        component: "ControlNet",
    };
    let mut c = infer_down_path(&s)?;
    let hint = s.indices("input_hint_block.");
    let last = hint.iter().max().copied().unwrap_or(0);
    let conv_in = s.need("input_hint_block.0.weight")?;
    // conv_in, then pairs (same width, next width with stride 2), then conv_out.
    let mut widths = vec![conv_in[0]];
    for k in (4..last).step_by(4) {
        widths.push(s.dim(&format!("input_hint_block.{k}.weight"), 0)?);
    }
    if last < 2 || hint.iter().any(|i| i % 2 != 0) {
        return Err(s.err(format!("input_hint_block indices {hint:?} are not the conditioning embedding's convs")));
    }
    c.insert("_class_name".into(), json!("ControlNetModel"));
    c.insert("conditioning_channels".into(), json!(conv_in[1]));
    c.insert("conditioning_embedding_out_channels".into(), json!(widths));
    c.insert("controlnet_conditioning_channel_order".into(), json!("rgb"));
    c.insert("global_pool_conditions".into(), json!(false));
    Ok(serde_json::Value::Object(c))
}

/// The VAE prefix a file uses.
pub fn vae_prefix(tensors: &BTreeMap<String, TensorEntry>) -> &'static str {
    VAE_PREFIXES
        .iter()
        .copied()
        .find(|p| tensors.contains_key(&format!("{p}encoder.conv_in.weight")))
        .unwrap_or(VAE_PREFIXES[0])
}

/// The diffusers `vae/config.json` of an SD 1.x single file.
pub fn infer_vae_config(tensors: &BTreeMap<String, TensorEntry>) -> Result<serde_json::Value, InferError> {
    let s = Shapes {
        tensors,
        prefix: vae_prefix(tensors),
        component: "VAE",
    };
    let levels = s.indices("encoder.down.").len();
    if levels == 0 {
        return Err(s.err("no encoder.down.* blocks".into()));
    }
    let layers = s.indices("encoder.down.0.block.").len();
    let channels = (0..levels)
        .map(|i| s.dim(&format!("encoder.down.{i}.block.0.conv2.weight"), 0))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json!({
        "_class_name": "AutoencoderKL",
        "in_channels": s.dim("encoder.conv_in.weight", 1)?,
        "out_channels": s.dim("decoder.conv_out.weight", 0)?,
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "layers_per_block": layers,
        "latent_channels": s.dim("decoder.conv_in.weight", 1)?,
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
        "use_quant_conv": s.has("quant_conv.weight"),
        "use_post_quant_conv": s.has("post_quant_conv.weight"),
        "mid_block_add_attention": s.has("encoder.mid.attn_1.q.weight"),
        "act_fn": "silu",
        "sample_size": 512,
    }))
}

/// The transformers `text_encoder/config.json` of an SD 1.x single file.
pub fn infer_clip_config(tensors: &BTreeMap<String, TensorEntry>) -> Result<serde_json::Value, InferError> {
    let s = Shapes {
        tensors,
        prefix: CLIP_PREFIX,
        component: "CLIP text encoder",
    };
    // Some files omit transformers' `text_model.` level.
    let m = if s.has("text_model.embeddings.token_embedding.weight") { "text_model." } else { "" };
    let token = s.need(&format!("{m}embeddings.token_embedding.weight"))?;
    let hidden = *token.get(1).ok_or_else(|| s.err(format!("token_embedding has shape {token:?}")))?;
    Ok(json!({
        "model_type": "clip_text_model",
        "vocab_size": token[0],
        "hidden_size": hidden,
        "intermediate_size": s.dim(&format!("{m}encoder.layers.0.mlp.fc1.weight"), 0)?,
        "num_hidden_layers": s.indices(&format!("{m}encoder.layers.")).len(),
        // CLIP's heads are 64 wide (ViT-L/14: 768 = 12 x 64).
        "num_attention_heads": (hidden / 64).max(1),
        "max_position_embeddings": s.dim(&format!("{m}embeddings.position_embedding.weight"), 0)?,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }))
}

// ---------------------------------------------------------------------------------------------
// Key views
// ---------------------------------------------------------------------------------------------

/// LDM resnet names -> diffusers.
fn resnet_part(rest: &str) -> String {
    rest.replace("in_layers.0", "norm1")
        .replace("in_layers.2", "conv1")
        .replace("out_layers.0", "norm2")
        .replace("out_layers.3", "conv2")
        .replace("emb_layers.1", "time_emb_proj")
        .replace("skip_connection", "conv_shortcut")
}

/// `head.N.rest` -> (N, rest).
fn numbered<'k>(key: &'k str, head: &str) -> Option<(usize, &'k str)> {
    let rest = key.strip_prefix(head)?;
    let (n, rest) = rest.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// An LDM UNet / ControlNet key (prefix removed) -> its diffusers key. `layers`: resnets per
/// down block. Keys of no known part come back unchanged (and are then reported as unused).
pub fn ldm_unet_key(key: &str, layers: usize) -> String {
    let n = layers + 1;
    for (from, to) in [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block_out.0.", "controlnet_mid_block."),
    ] {
        if let Some(rest) = key.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    if let Some((i, rest)) = numbered(key, "input_blocks.") {
        let (b, l) = ((i - 1) / n, (i - 1) % n);
        if let Some(r) = rest.strip_prefix("0.op.") {
            return format!("down_blocks.{b}.downsamplers.0.conv.{r}");
        }
        if let Some(r) = rest.strip_prefix("0.") {
            return format!("down_blocks.{b}.resnets.{l}.{}", resnet_part(r));
        }
        if let Some(r) = rest.strip_prefix("1.") {
            return format!("down_blocks.{b}.attentions.{l}.{r}");
        }
    }
    if let Some((i, rest)) = numbered(key, "middle_block.") {
        return match i {
            1 => format!("mid_block.attentions.0.{rest}"),
            _ => format!("mid_block.resnets.{}.{}", i / 2, resnet_part(rest)),
        };
    }
    if let Some((i, rest)) = numbered(key, "output_blocks.") {
        let (b, l) = (i / n, i % n);
        if let Some(r) = rest.strip_prefix("0.") {
            return format!("up_blocks.{b}.resnets.{l}.{}", resnet_part(r));
        }
        if let Some(r) = rest.strip_prefix("1.conv.").or_else(|| rest.strip_prefix("2.conv.")) {
            return format!("up_blocks.{b}.upsamplers.0.conv.{r}");
        }
        if let Some(r) = rest.strip_prefix("1.") {
            return format!("up_blocks.{b}.attentions.{l}.{r}");
        }
    }
    if let Some((i, rest)) = numbered(key, "zero_convs.") {
        if let Some(r) = rest.strip_prefix("0.") {
            return format!("controlnet_down_blocks.{i}.{r}");
        }
    }
    key.to_string()
}

/// A ControlNet conditioning-embedding key (`input_hint_block.K.*`, prefix removed) -> diffusers;
/// `last`: the index of the final conv.
fn hint_key(key: &str, last: usize) -> Option<String> {
    let (k, rest) = numbered(key, "input_hint_block.")?;
    Some(match k {
        0 => format!("controlnet_cond_embedding.conv_in.{rest}"),
        k if k == last => format!("controlnet_cond_embedding.conv_out.{rest}"),
        k => format!("controlnet_cond_embedding.blocks.{}.{rest}", k / 2 - 1),
    })
}

/// An LDM VAE key (prefix removed) -> diffusers; `levels`: the number of resolution levels.
pub fn ldm_vae_key(key: &str, levels: usize) -> String {
    let (side, rest) = match key.split_once('.') {
        Some((s @ ("encoder" | "decoder"), r)) => (s, r),
        _ => return key.to_string(),
    };
    let mapped = if let Some((i, r)) = numbered(rest, "down.") {
        match r.strip_prefix("downsample.conv.") {
            Some(c) => format!("down_blocks.{i}.downsamplers.0.conv.{c}"),
            None => match numbered(r, "block.") {
                Some((j, c)) => format!("down_blocks.{i}.resnets.{j}.{c}"),
                None => rest.to_string(),
            },
        }
    } else if let Some((i, r)) = numbered(rest, "up.") {
        let b = levels.saturating_sub(1 + i);
        match r.strip_prefix("upsample.conv.") {
            Some(c) => format!("up_blocks.{b}.upsamplers.0.conv.{c}"),
            None => match numbered(r, "block.") {
                Some((j, c)) => format!("up_blocks.{b}.resnets.{j}.{c}"),
                None => rest.to_string(),
            },
        }
    } else if let Some(c) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{c}")
    } else if let Some(c) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{c}")
    } else if let Some(c) = rest.strip_prefix("mid.attn_1.") {
        let c = match c.split_once('.') {
            Some(("norm", p)) => format!("group_norm.{p}"),
            Some(("q", p)) => format!("to_q.{p}"),
            Some(("k", p)) => format!("to_k.{p}"),
            Some(("v", p)) => format!("to_v.{p}"),
            Some(("proj_out", p)) => format!("to_out.0.{p}"),
            _ => c.to_string(),
        };
        format!("mid_block.attentions.0.{c}")
    } else if let Some(c) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{c}")
    } else {
        rest.to_string()
    };
    format!("{side}.{}", mapped.replace("nin_shortcut", "conv_shortcut"))
}

use super::weights::KeyView as View;

/// The view of an SD single file's UNet (diffusers keys; other components hidden).
pub fn unet_view(layers: usize) -> View {
    Arc::new(move |k: &str| k.strip_prefix(UNET_PREFIX).map(|rest| ldm_unet_key(rest, layers)))
}

/// The view of an SD single file's VAE.
pub fn vae_view(prefix: &'static str, levels: usize) -> View {
    Arc::new(move |k: &str| k.strip_prefix(prefix).map(|rest| ldm_vae_key(rest, levels)))
}

/// The view of an SD single file's CLIP text encoder (transformers keys).
pub fn clip_view() -> View {
    Arc::new(|k: &str| k.strip_prefix(CLIP_PREFIX).map(str::to_string))
}

/// The view of a ControlNet single file (`prefix` as in `infer_controlnet_config`).
pub fn controlnet_view(prefix: &'static str, layers: usize, hint_last: usize) -> View {
    Arc::new(move |k: &str| {
        let rest = k.strip_prefix(prefix)?;
        // A v1.0 file stored without the prefix also holds the SD model: hide it.
        if prefix.is_empty() && [UNET_PREFIX, "first_stage_model.", "cond_stage_model.", "model_ema."].iter().any(|p| k.starts_with(p)) {
            return None;
        }
        Some(hint_key(rest, hint_last).unwrap_or_else(|| ldm_unet_key(rest, layers)))
    })
}

/// The ControlNet prefix a file uses (`control_model.`, or none for files saved bare).
pub fn controlnet_prefix(tensors: &BTreeMap<String, TensorEntry>) -> &'static str {
    if tensors.keys().any(|k| k.starts_with(CONTROL_PREFIX)) { CONTROL_PREFIX } else { "" }
}

/// The index of the conditioning embedding's last conv.
pub fn hint_last(tensors: &BTreeMap<String, TensorEntry>, prefix: &str) -> usize {
    Shapes {
        tensors,
        prefix,
        component: "ControlNet",
    }
    .indices("input_hint_block.")
    .into_iter()
    .max()
    .unwrap_or(14)
}

/// Whether a model path names a single file (rather than a diffusers folder).
pub fn is_single_file(path: &Path) -> bool {
    path.is_file() && matches!(path.extension().and_then(|e| e.to_str()), Some("safetensors" | "ckpt" | "pth" | "pt" | "bin"))
}

/// Why a single-file checkpoint could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(transparent)]
    Pth(#[from] PthError),
    #[error("{}: cannot store its safetensors conversion in {}: {reason}", path.display(), cache.display())]
    Cache { path: PathBuf, cache: PathBuf, reason: String },
}

/// Open a single-file checkpoint: a `.safetensors` directly (memory-mapped); a PyTorch `.pth` /
/// `.ckpt` is converted once to f32 safetensors in the user cache (`~/.cache/rfstudio/converted`,
/// keyed by the file's path, size and modification time) and that copy is opened.
pub fn open_checkpoint(path: &Path) -> Result<SafetensorsFile, OpenError> {
    let is_safetensors = path.extension().and_then(|e| e.to_str()) == Some("safetensors");
    if is_safetensors {
        return Ok(SafetensorsFile::open(path)?);
    }
    let cache = crate::files::user_cache_dir()
        .map(|d| d.join("converted"))
        .unwrap_or_else(|| std::env::temp_dir().join("rfstudio-converted"));
    let meta = std::fs::metadata(path).map_err(|source| WeightError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let stamp = format!(
        "{}|{}|{:?}",
        path.canonicalize().unwrap_or_else(|_| path.to_path_buf()).display(),
        meta.len(),
        meta.modified().ok()
    );
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(stamp.as_bytes()).iter().take(12).map(|b| format!("{b:02x}")).collect::<String>()
    };
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let converted = cache.join(format!("{stem}-{digest}.safetensors"));
    if let Ok(file) = SafetensorsFile::open(&converted) {
        return Ok(file);
    }
    let dict = StateDict::open(path)?;
    let tensors = dict
        .shapes()
        .keys()
        .filter(|k| matches!(dict.dtype(k), Some(burn::tensor::DType::F64 | burn::tensor::DType::F32 | burn::tensor::DType::F16 | burn::tensor::DType::BF16)))
        .map(|k| Ok((k.clone(), dict.read_f32(k)?)))
        .collect::<Result<BTreeMap<_, _>, PthError>>()?;
    let meta = [("converted_from".to_string(), path.display().to_string())].into_iter().collect();
    let bytes = safetensors_f32_bytes(&converted, &tensors, meta)?;
    let cache_err = |reason: String| OpenError::Cache {
        path: path.to_path_buf(),
        cache: cache.clone(),
        reason,
    };
    std::fs::create_dir_all(&cache).map_err(|e| cache_err(e.to_string()))?;
    crate::files::write_atomic(&converted, &bytes).map_err(|e| cache_err(e.to_string()))?;
    Ok(SafetensorsFile::open(&converted)?)
}

// ---------------------------------------------------------------------------------------------
// Writing the original ControlNet layout
// ---------------------------------------------------------------------------------------------

/// diffusers resnet names -> LDM.
fn resnet_part_ldm(rest: &str) -> String {
    rest.replace("norm1", "in_layers.0")
        .replace("conv1", "in_layers.2")
        .replace("norm2", "out_layers.0")
        .replace("conv2", "out_layers.3")
        .replace("time_emb_proj", "emb_layers.1")
        .replace("conv_shortcut", "skip_connection")
}

/// A diffusers ControlNet key -> the `control_model.*` key A1111's ControlNet extension and
/// ComfyUI read (the inverse of `controlnet_view`). `layers`: resnets per down block;
/// `hint_blocks`: the conditioning embedding's inner convs (6 for SD 1.5 ControlNets).
pub fn controlnet_ldm_key(key: &str, layers: usize, hint_blocks: usize) -> String {
    let n = layers + 1;
    let body = (|| -> Option<String> {
        for (from, to) in [
            ("time_embedding.linear_1.", "time_embed.0."),
            ("time_embedding.linear_2.", "time_embed.2."),
            ("conv_in.", "input_blocks.0.0."),
            ("controlnet_mid_block.", "middle_block_out.0."),
            ("controlnet_cond_embedding.conv_in.", "input_hint_block.0."),
        ] {
            if let Some(rest) = key.strip_prefix(from) {
                return Some(format!("{to}{rest}"));
            }
        }
        if let Some(rest) = key.strip_prefix("controlnet_cond_embedding.conv_out.") {
            return Some(format!("input_hint_block.{}.{rest}", 2 * (hint_blocks + 1)));
        }
        if let Some((k, rest)) = numbered(key, "controlnet_cond_embedding.blocks.") {
            return Some(format!("input_hint_block.{}.{rest}", 2 * (k + 1)));
        }
        if let Some((i, rest)) = numbered(key, "controlnet_down_blocks.") {
            return Some(format!("zero_convs.{i}.0.{rest}"));
        }
        if let Some((b, rest)) = numbered(key, "down_blocks.") {
            if let Some(r) = rest.strip_prefix("downsamplers.0.conv.") {
                return Some(format!("input_blocks.{}.0.op.{r}", 1 + b * n + layers));
            }
            if let Some((l, r)) = numbered(rest, "resnets.") {
                return Some(format!("input_blocks.{}.0.{}", 1 + b * n + l, resnet_part_ldm(r)));
            }
            if let Some((l, r)) = numbered(rest, "attentions.") {
                return Some(format!("input_blocks.{}.1.{r}", 1 + b * n + l));
            }
        }
        if let Some((i, rest)) = numbered(key, "mid_block.resnets.") {
            return Some(format!("middle_block.{}.{}", 2 * i, resnet_part_ldm(rest)));
        }
        if let Some(rest) = key.strip_prefix("mid_block.attentions.0.") {
            return Some(format!("middle_block.1.{rest}"));
        }
        None
    })();
    format!("{CONTROL_PREFIX}{}", body.unwrap_or_else(|| key.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key of a diffusers SD 1.5 ControlNet goes to the original layout and back.
    #[test]
    fn controlnet_keys_round_trip_through_the_original_layout() {
        let keys = [
            "time_embedding.linear_1.weight",
            "conv_in.bias",
            "down_blocks.0.resnets.1.conv_shortcut.weight",
            "down_blocks.0.resnets.0.time_emb_proj.bias",
            "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            "down_blocks.2.downsamplers.0.conv.weight",
            "mid_block.resnets.1.norm2.weight",
            "mid_block.attentions.0.proj_out.weight",
            "controlnet_down_blocks.11.bias",
            "controlnet_mid_block.weight",
            "controlnet_cond_embedding.conv_in.weight",
            "controlnet_cond_embedding.blocks.5.bias",
            "controlnet_cond_embedding.conv_out.weight",
        ];
        let expected = [
            "control_model.time_embed.0.weight",
            "control_model.input_blocks.0.0.bias",
            "control_model.input_blocks.2.0.skip_connection.weight",
            "control_model.input_blocks.1.0.emb_layers.1.bias",
            "control_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
            "control_model.input_blocks.9.0.op.weight",
            "control_model.middle_block.2.out_layers.0.weight",
            "control_model.middle_block.1.proj_out.weight",
            "control_model.zero_convs.11.0.bias",
            "control_model.middle_block_out.0.weight",
            "control_model.input_hint_block.0.weight",
            "control_model.input_hint_block.12.bias",
            "control_model.input_hint_block.14.weight",
        ];
        let view = controlnet_view(CONTROL_PREFIX, 2, 14);
        for (k, e) in keys.iter().zip(expected) {
            let ldm = controlnet_ldm_key(k, 2, 6);
            assert_eq!(ldm, e);
            assert_eq!(view(&ldm).as_deref(), Some(*k), "{ldm} back");
        }
        // The SD copy of a v1.0 file is hidden from the ControlNet.
        assert_eq!(view("model.diffusion_model.input_blocks.0.0.weight"), None);
    }

    /// The SD 1.x UNet and VAE keys of the original layout map to diffusers' names.
    #[test]
    fn unet_and_vae_keys_map_to_diffusers() {
        let cases = [
            ("input_blocks.1.0.in_layers.0.weight", "down_blocks.0.resnets.0.norm1.weight"),
            ("input_blocks.3.0.op.bias", "down_blocks.0.downsamplers.0.conv.bias"),
            ("input_blocks.4.1.proj_in.weight", "down_blocks.1.attentions.0.proj_in.weight"),
            ("middle_block.0.out_layers.3.weight", "mid_block.resnets.0.conv2.weight"),
            ("middle_block.2.emb_layers.1.weight", "mid_block.resnets.1.time_emb_proj.weight"),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
            ("output_blocks.5.1.norm.weight", "up_blocks.1.attentions.2.norm.weight"),
            ("output_blocks.11.0.skip_connection.weight", "up_blocks.3.resnets.2.conv_shortcut.weight"),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(ldm_unet_key(ldm, 2), diffusers, "{ldm}");
        }
        let vae = [
            ("encoder.down.1.block.0.nin_shortcut.weight", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
            ("encoder.down.0.downsample.conv.weight", "encoder.down_blocks.0.downsamplers.0.conv.weight"),
            ("decoder.up.3.block.2.norm1.bias", "decoder.up_blocks.0.resnets.2.norm1.bias"),
            ("decoder.up.1.upsample.conv.weight", "decoder.up_blocks.2.upsamplers.0.conv.weight"),
            ("decoder.mid.attn_1.proj_out.weight", "decoder.mid_block.attentions.0.to_out.0.weight"),
            ("encoder.mid.attn_1.norm.bias", "encoder.mid_block.attentions.0.group_norm.bias"),
            ("encoder.mid.block_2.conv1.weight", "encoder.mid_block.resnets.1.conv1.weight"),
            ("decoder.norm_out.weight", "decoder.conv_norm_out.weight"),
            ("quant_conv.weight", "quant_conv.weight"),
        ];
        for (ldm, diffusers) in vae {
            assert_eq!(ldm_vae_key(ldm, 4), diffusers, "{ldm}");
        }
    }
}

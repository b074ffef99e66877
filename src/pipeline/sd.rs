//! Stable Diffusion 1.5 + ControlNet: loading a diffusers folder or a single-file checkpoint
//! (`models::single_file`) through the real loaders, and text encoding for classifier-free
//! guidance. The denoising loop itself is `pipeline::sampler`.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::models::clip::{ClipError, ClipTextConfig, ClipTextModel, ClipTokenizer, SD1_VOCAB_SIZE, clip_remap, load_text_encoder};
use crate::models::lora_file::{Component, LoraError, LoraFile, LoraSpec};
use crate::models::single_file::{self, Detected, InferError, OpenError};
use crate::pipeline::run_folder::LoraUsed;
use crate::models::controlnet::{ControlNetConfig, ControlNetModel};
use crate::models::manifest::find_weights;
use crate::models::unet::{ConfigError, UNet2DConditionModel, UNetConfig, unet_public_key, unet_remap};
use crate::models::vae::{AutoencoderKL, VaeConfig, vae_remap};
use crate::models::weights::{Unused, WeightError, Weights, load_module};
use crate::pipeline::scheduler::{SchedulerConfig, SchedulerError};

#[derive(Debug, thiserror::Error)]
pub enum SdError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Weights(#[from] WeightError),
    #[error("{0}")]
    Clip(#[from] ClipError),
    #[error("{0}")]
    Scheduler(#[from] SchedulerError),
    #[error("{folder}: no weights file: expected one of {names}")]
    NoWeights { folder: PathBuf, names: String },
    /// Callers that know the weight files turn this into a diagnosed
    /// `models::weights::NonFiniteOutput` (corrupt weights or overflow).
    #[error("the {stage} contain NaN or Inf values")]
    NonFinite { stage: &'static str },
    #[error("ControlNet and UNet disagree: the ControlNet gives {found} residuals, the UNet needs {expected}")]
    Residuals { expected: usize, found: usize },
    #[error(
        "ControlNet and VAE disagree: the VAE's latents are {latent} px for a {image} px image, the ControlNet shrinks the control image {controlnet}x to {} px; they are not from the same SD 1.x family",
        image / controlnet
    )]
    Geometry { image: usize, latent: usize, controlnet: usize },
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error(
        "{}: {detected} is not supported: rfstudio runs Stable Diffusion 1.x (SD 1.4, 1.5 and models fine-tuned from them) with SD 1.5 ControlNets",
        path.display()
    )]
    Unsupported { path: PathBuf, detected: String },
    #[error("{}: this is {detected}, not {expected}", path.display())]
    WrongKind {
        path: PathBuf,
        detected: String,
        expected: &'static str,
    },
    #[error("{}: {source}", path.display())]
    Infer {
        path: PathBuf,
        #[source]
        source: InferError,
    },
    #[error(
        "{}: the text encoder has {found} tokens, the built-in SD 1.x CLIP tokenizer {SD1_VOCAB_SIZE}: put this checkpoint's own tokenizer folder next to it as `tokenizer/`",
        path.display()
    )]
    Tokenizer { path: PathBuf, found: usize },
    #[error("{}: the tokenizer's ids go up to {max_id}, but the text encoder has only {vocab} token embeddings: tokenizer and text encoder are from different models", path.display())]
    VocabMismatch { path: PathBuf, max_id: u32, vocab: usize },
}

/// A tokenizer that can produce ids past the text encoder's embedding table would index out of
/// it: refuse the pair at load.
fn check_vocab(path: &Path, tokenizer: &ClipTokenizer, vocab: usize) -> Result<(), SdError> {
    let max_id = tokenizer.max_id();
    if max_id as usize >= vocab {
        return Err(SdError::VocabMismatch {
            path: path.to_path_buf(),
            max_id,
            vocab,
        });
    }
    Ok(())
}

/// Refuse a single file that is not `expected` (SD 2.x / SDXL / inpainting files are named as
/// such; a ControlNet or LoRA given as the base model is named too).
fn check_kind(path: &Path, detected: &Detected, wanted: fn(&Detected) -> bool, expected: &'static str) -> Result<(), SdError> {
    if wanted(detected) {
        return Ok(());
    }
    let shown = detected.describe();
    Err(match detected {
        Detected::Sd2 | Detected::Sdxl | Detected::Sd1Inpainting => SdError::Unsupported {
            path: path.to_path_buf(),
            detected: shown,
        },
        _ => SdError::WrongKind {
            path: path.to_path_buf(),
            detected: shown,
            expected,
        },
    })
}

const DIFFUSERS_F32: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];
const DIFFUSERS_F16: &[&str] = &[
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors",
];

/// The weights file of a diffusers component folder, preferring the file whose precision
/// matches what will be computed.
pub fn diffusers_weights(dir: &Path, dtype: DType) -> Result<PathBuf, SdError> {
    let names = if dtype == DType::F32 {
        DIFFUSERS_F32
    } else {
        DIFFUSERS_F16
    };
    find_weights(dir, names).ok_or_else(|| SdError::NoWeights {
        folder: dir.to_path_buf(),
        names: names.join(" or "),
    })
}

/// Load `unet/` of a diffusers folder.
pub fn load_unet<B: Backend>(dir: &Path, dtype: DType, device: &B::Device) -> Result<UNet2DConditionModel<B>, SdError> {
    let config = UNetConfig::from_file(&dir.join("config.json"))?;
    let weights = Weights::open(&[diffusers_weights(dir, dtype)?])?;
    let (unet, _) = load_module(
        config.init::<B>(device),
        &weights,
        &unet_remap(config.use_linear_projection),
        dtype,
        Unused::Deny,
    )?;
    Ok(unet)
}

/// Load `vae/` of a diffusers folder (current or legacy attention names).
pub fn load_vae<B: Backend>(dir: &Path, dtype: DType, device: &B::Device) -> Result<AutoencoderKL<B>, SdError> {
    let config = VaeConfig::from_file(&dir.join("config.json"))?;
    let weights = Weights::open(&[diffusers_weights(dir, dtype)?])?;
    let (vae, _) = load_module(config.init::<B>(device), &weights, &vae_remap(), dtype, Unused::Deny)?;
    Ok(vae)
}

/// Load a ControlNet folder (`config.json` + `diffusion_pytorch_model[.fp16].safetensors`).
pub fn load_controlnet<B: Backend>(dir: &Path, dtype: DType, device: &B::Device) -> Result<ControlNetModel<B>, SdError> {
    if single_file::is_single_file(dir) {
        return load_controlnet_file(dir, dtype, device);
    }
    let (config, unet_config) = ControlNetConfig::from_file(&dir.join("config.json"))?;
    let weights = Weights::open(&[diffusers_weights(dir, dtype)?])?;
    let (cn, _) = load_module(
        config.init::<B>(&unet_config, device),
        &weights,
        &unet_remap(unet_config.use_linear_projection),
        dtype,
        Unused::Deny,
    )?;
    Ok(cn)
}

/// A ControlNet single file (`control_model.*` layout, `.safetensors` or `.pth`).
fn load_controlnet_file<B: Backend>(path: &Path, dtype: DType, device: &B::Device) -> Result<ControlNetModel<B>, SdError> {
    let file = single_file::open_checkpoint(path)?;
    let detected = single_file::detect(file.tensors());
    check_kind(path, &detected, |d| matches!(d, Detected::ControlNet { .. }), "a ControlNet")?;
    let (config, unet_config) = controlnet_file_config(path, &file)?;
    let prefix = single_file::controlnet_prefix(file.tensors());
    let view = single_file::controlnet_view(prefix, unet_config.layers_per_block, single_file::hint_last(file.tensors(), prefix));
    let weights = Weights::from_files(vec![file]);
    let (cn, _) = load_module(
        config.init::<B>(&unet_config, device),
        &weights,
        &unet_remap(unet_config.use_linear_projection).with_view(view),
        dtype,
        Unused::Deny,
    )?;
    Ok(cn)
}

fn controlnet_file_config(path: &Path, file: &crate::models::weights::SafetensorsFile) -> Result<(ControlNetConfig, UNetConfig), SdError> {
    let json = controlnet_json(path, file)?;
    let label = format!("{} (configuration inferred from its tensors)", path.display());
    Ok(ControlNetConfig::from_json(&json.to_string(), &label)?)
}

/// The configuration a single file carries in its header (`config`, written by `rfft export
/// --format single-file`), else the one inferred from its tensors.
fn controlnet_json(path: &Path, file: &crate::models::weights::SafetensorsFile) -> Result<serde_json::Value, SdError> {
    if let Some(text) = file.metadata().get("config") {
        return serde_json::from_str(text).map_err(|e| {
            SdError::Config(ConfigError::Read {
                path: format!("{} (header `config`)", path.display()),
                reason: format!("invalid config: {e}"),
            })
        });
    }
    let tensors = file.tensors();
    single_file::infer_controlnet_config(tensors, single_file::controlnet_prefix(tensors)).map_err(|source| SdError::Infer {
        path: path.to_path_buf(),
        source,
    })
}

/// A ControlNet's diffusers `config.json`: the folder's own, or the one inferred from a single
/// file (what an export writes next to the fine-tuned weights).
pub fn controlnet_config_json(path: &Path) -> Result<serde_json::Value, SdError> {
    if single_file::is_single_file(path) {
        let file = single_file::open_checkpoint(path)?;
        return controlnet_json(path, &file);
    }
    let config = path.join("config.json");
    let text = std::fs::read_to_string(&config).map_err(|e| ConfigError::Read {
        path: config.display().to_string(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| {
        SdError::Config(ConfigError::Read {
            path: config.display().to_string(),
            reason: format!("invalid config: {e}"),
        })
    })
}

/// The weight files of a base model (a diffusers folder's UNet, VAE and text encoder, or the
/// single file), for hashing and for diagnosing NaN/Inf outputs.
pub fn base_weight_files(base: &Path, dtype: DType) -> Vec<PathBuf> {
    if single_file::is_single_file(base) {
        return vec![base.to_path_buf()];
    }
    let mut files: Vec<PathBuf> = ["unet", "vae"].iter().filter_map(|c| diffusers_weights(&base.join(c), dtype).ok()).collect();
    files.extend(find_weights(&base.join("text_encoder"), &["model.safetensors", "model.fp16.safetensors"]));
    files
}

/// The weight file of a ControlNet (folder or single file).
pub fn controlnet_weight_file(controlnet: &Path, dtype: DType) -> Option<PathBuf> {
    if single_file::is_single_file(controlnet) {
        return Some(controlnet.to_path_buf());
    }
    diffusers_weights(controlnet, dtype).ok()
}

/// An SD 1.x checkpoint (a diffusers folder or a single file), loaded.
pub struct StableDiffusion<B: Backend> {
    /// The folder or single file it was loaded from.
    pub folder: PathBuf,
    pub unet_config: UNetConfig,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel<B>,
    pub unet: UNet2DConditionModel<B>,
    pub vae: AutoencoderKL<B>,
    pub vae_config: VaeConfig,
    pub scheduler: SchedulerConfig,
    pub dtype: DType,
}

impl<B: Backend> StableDiffusion<B> {
    /// Load `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/` from a diffusers
    /// folder, or everything from a single-file checkpoint.
    pub fn load(dir: &Path, dtype: DType, device: &B::Device) -> Result<Self, SdError> {
        if single_file::is_single_file(dir) {
            return Self::load_single_file(dir, dtype, device);
        }
        let tokenizer = ClipTokenizer::from_folder(&dir.join("tokenizer"))?;
        let clip_config = ClipTextConfig::from_file(&dir.join("text_encoder").join("config.json"))?;
        check_vocab(&dir.join("tokenizer"), &tokenizer, clip_config.vocab_size)?;
        let (text_encoder, _) = load_text_encoder::<B>(&dir.join("text_encoder"), dtype, device)?;
        let unet_config = UNetConfig::from_file(&dir.join("unet").join("config.json"))?;
        let unet = load_unet::<B>(&dir.join("unet"), dtype, device)?;
        let vae_config = VaeConfig::from_file(&dir.join("vae").join("config.json"))?;
        let vae = load_vae::<B>(&dir.join("vae"), dtype, device)?;
        let scheduler = SchedulerConfig::from_file(&dir.join("scheduler").join("scheduler_config.json"))?;
        Ok(Self {
            folder: dir.to_path_buf(),
            unet_config,
            tokenizer,
            text_encoder,
            unet,
            vae,
            vae_config,
            scheduler,
            dtype,
        })
    }

    /// An SD 1.x single file in the LDM layout: configurations inferred from the tensors, the
    /// built-in CLIP tokenizer (or a `tokenizer/` folder next to the file for another
    /// vocabulary), SD 1.5's scheduler.
    fn load_single_file(path: &Path, dtype: DType, device: &B::Device) -> Result<Self, SdError> {
        let file = single_file::open_checkpoint(path)?;
        let t = file.tensors();
        check_kind(path, &single_file::detect(t), |d| matches!(d, Detected::Sd1 { .. }), "a Stable Diffusion 1.x checkpoint")?;
        let infer = |source| SdError::Infer {
            path: path.to_path_buf(),
            source,
        };
        let label = format!("{} (configuration inferred from its tensors)", path.display());
        let unet_config = UNetConfig::from_value(single_file::infer_unet_config(t).map_err(infer)?, &label)?;
        let vae_config = VaeConfig::from_value(single_file::infer_vae_config(t).map_err(infer)?, &label)?;
        let clip_config = ClipTextConfig::from_value(single_file::infer_clip_config(t).map_err(infer)?, path)?;
        let tokenizer = if clip_config.vocab_size == SD1_VOCAB_SIZE {
            ClipTokenizer::sd1()?
        } else {
            let beside = path.parent().unwrap_or(Path::new(".")).join("tokenizer");
            if !beside.is_dir() {
                return Err(SdError::Tokenizer {
                    path: path.to_path_buf(),
                    found: clip_config.vocab_size,
                });
            }
            ClipTokenizer::from_folder(&beside)?
        };
        check_vocab(path, &tokenizer, clip_config.vocab_size)?;
        let vae_prefix = single_file::vae_prefix(t);
        let levels = vae_config.block_out_channels.len();
        let weights = Weights::from_files(vec![file]);
        let unet_remap = unet_remap(unet_config.use_linear_projection).with_view(single_file::unet_view(unet_config.layers_per_block));
        let (unet, _) = load_module(unet_config.init::<B>(device), &weights, &unet_remap, dtype, Unused::Deny)?;
        let vae_remap = vae_remap().with_view(single_file::vae_view(vae_prefix, levels));
        let (vae, _) = load_module(vae_config.init::<B>(device), &weights, &vae_remap, dtype, Unused::Deny)?;
        let clip_remap = clip_remap().with_view(single_file::clip_view());
        let (text_encoder, _) = load_module(clip_config.init::<B>(device), &weights, &clip_remap, dtype, Unused::Allow).map_err(ClipError::from)?;
        Ok(Self {
            folder: path.to_path_buf(),
            unet_config,
            tokenizer,
            text_encoder,
            unet,
            vae,
            vae_config,
            scheduler: SchedulerConfig::default(),
            dtype,
        })
    }

    /// Merge LoRA files into the UNet and the text encoder, in order, each at its strength.
    /// A file with no layers for a component leaves it as it is; one made for another
    /// architecture is refused (`LoraError::OtherArchitecture`).
    pub fn apply_loras(&mut self, loras: &[LoraSpec]) -> Result<Vec<LoraUsed>, SdError> {
        let mut used = Vec::new();
        for spec in loras {
            let file = LoraFile::open(&spec.path)?;
            let (unet, n_unet) = file.apply(self.unet.clone(), Component::Unet, spec.strength, &unet_public_key)?;
            let (text, n_text) = file.apply(self.text_encoder.clone(), Component::TextEncoder, spec.strength, &|p: &str| p.to_string())?;
            if n_unet + n_text == 0 {
                return Err(SdError::Lora(LoraError::NotLora { path: spec.path.clone() }));
            }
            self.unet = unet;
            self.text_encoder = text;
            tracing::info!("LoRA {}: {n_unet} UNet and {n_text} text-encoder layers at strength {}", spec.path.display(), spec.strength);
            used.push(LoraUsed {
                name: spec.name(),
                strength: spec.strength,
                hash: file.autov3_hash(),
            });
        }
        Ok(used)
    }

    /// Latent cells per image side for a given pixel size.
    pub fn latent_size(&self, pixels: usize) -> usize {
        pixels / self.vae_config.scale_factor()
    }

    /// Encode `[negative, positive]` prompts for classifier-free guidance: [2, 77, D].
    /// Prompts longer than 77 tokens are truncated with a warning, as the reference does.
    pub fn encode_prompt_pair(&self, prompt: &str, negative: &str, device: &B::Device) -> Result<Tensor<B, 3>, SdError> {
        let mut ids = Vec::with_capacity(2);
        for (which, text) in [("negative prompt", negative), ("prompt", prompt)] {
            let enc = self.tokenizer.encode(text)?;
            if enc.truncated_tokens > 0 {
                tracing::warn!(
                    "the {which} is {} tokens too long for CLIP's 77 and was truncated",
                    enc.truncated_tokens
                );
            }
            ids.push(enc.ids);
        }
        Ok(self.text_encoder.encode_ids(&ids, device))
    }
}

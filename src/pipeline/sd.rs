//! Stable Diffusion 1.5 + ControlNet: loading a diffusers folder through the real loaders, text
//! encoding for classifier-free guidance, and VAE decoding with NaN/Inf guards. The denoising
//! loop itself is `pipeline::sampler`.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::models::clip::{ClipError, ClipTextModel, ClipTokenizer, load_text_encoder};
use crate::models::controlnet::{ControlNetConfig, ControlNetModel};
use crate::models::manifest::find_weights;
use crate::models::unet::{ConfigError, UNet2DConditionModel, UNetConfig, unet_remap};
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
    #[error("cancelled")]
    Cancelled,
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

/// An SD 1.x diffusers folder, loaded.
pub struct StableDiffusion<B: Backend> {
    pub folder: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel<B>,
    pub unet: UNet2DConditionModel<B>,
    pub vae: AutoencoderKL<B>,
    pub vae_config: VaeConfig,
    pub scheduler: SchedulerConfig,
    pub dtype: DType,
}

impl<B: Backend> StableDiffusion<B> {
    /// Load `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/` from `dir`.
    pub fn load(dir: &Path, dtype: DType, device: &B::Device) -> Result<Self, SdError> {
        let tokenizer = ClipTokenizer::from_folder(&dir.join("tokenizer"))?;
        let (text_encoder, _) = load_text_encoder::<B>(&dir.join("text_encoder"), dtype, device)?;
        let unet = load_unet::<B>(&dir.join("unet"), dtype, device)?;
        let vae_config = VaeConfig::from_file(&dir.join("vae").join("config.json"))?;
        let vae = load_vae::<B>(&dir.join("vae"), dtype, device)?;
        let scheduler = SchedulerConfig::from_file(&dir.join("scheduler").join("scheduler_config.json"))?;
        Ok(Self {
            folder: dir.to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            vae_config,
            scheduler,
            dtype,
        })
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

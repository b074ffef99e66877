//! Stable Diffusion 1.5 + ControlNet: loading a diffusers folder through the real loaders, text
//! encoding with classifier-free guidance, the DDIM denoising loop with ControlNet residuals, and
//! VAE decoding with NaN/Inf guards.
//!
//! diffusers counterpart: `StableDiffusionControlNetPipeline.__call__` (prompt encoding,
//! `cat([latents] * 2)`, ControlNet on both CFG halves, `uncond + g * (text - uncond)`, DDIM step,
//! `vae.decode(latents / scaling_factor)`).

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::models::clip::{ClipError, ClipTextModel, ClipTokenizer, load_text_encoder};
use crate::models::controlnet::{ControlNetConfig, ControlNetModel};
use crate::models::manifest::find_weights;
use crate::models::unet::{ConfigError, UNet2DConditionModel, UNetConfig, unet_remap};
use crate::models::vae::{AutoencoderKL, VaeConfig, vae_remap};
use crate::models::weights::{Unused, WeightError, Weights, load_module};
use crate::pipeline::scheduler::{Scheduler, SchedulerConfig, SchedulerError};

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

    /// Decode latents (scaled, as the sampler produces them) to an image in [0, 1].
    pub fn decode(&self, latents: Tensor<B, 4>) -> Result<Tensor<B, 4>, SdError> {
        let image = self
            .vae
            .decode(latents.div_scalar(self.vae_config.scaling_factor));
        ensure_finite(&image, "decoded images")?;
        Ok(image.mul_scalar(0.5).add_scalar(0.5).clamp(0.0, 1.0))
    }
}

/// Fail with a clear message instead of silently producing a black image.
pub fn ensure_finite<B: Backend, const D: usize>(t: &Tensor<B, D>, stage: &'static str) -> Result<(), SdError> {
    use burn::tensor::ElementConversion;
    let nan: bool = t.clone().is_nan().any().into_scalar().elem();
    let inf: bool = t.clone().is_inf().any().into_scalar().elem();
    if nan || inf {
        Err(SdError::NonFinite { stage })
    } else {
        Ok(())
    }
}

/// Sampling settings.
#[derive(Clone, Debug)]
pub struct SampleParams {
    pub guidance: f32,
    pub controlnet_scale: f32,
}

/// One finished denoising step, handed to the caller's hook.
pub struct StepInfo<'a, B: Backend> {
    /// 0-based index of the step just taken.
    pub index: usize,
    pub total: usize,
    pub timestep: usize,
    /// The training timestep of the next step (None after the last).
    pub next_timestep: Option<usize>,
    /// The predicted clean latents x0_hat at this step.
    pub x0: &'a Tensor<B, 4>,
}

/// What the hook wants next.
pub enum Flow<B: Backend> {
    /// Go on with these latents (the hook may have blended them).
    Continue(Tensor<B, 4>),
    Cancel,
}

/// The DDIM loop with ControlNet and classifier-free guidance.
///
/// `latents`: [N, 4, h, w] initial noise (already times `init_noise_sigma`); `context`: [2, 77, D]
/// `[negative, positive]` shared by all N candidates; `control`: [1 or N, 3, 8h, 8w] in [0, 1].
/// After every step `hook` sees the new latents and may replace them (latent blending) or cancel.
#[allow(clippy::too_many_arguments)]
pub fn denoise<B: Backend, S: Scheduler>(
    unet: &UNet2DConditionModel<B>,
    controlnet: Option<&ControlNetModel<B>>,
    scheduler: &S,
    context: &Tensor<B, 3>,
    control: Option<&Tensor<B, 4>>,
    latents: Tensor<B, 4>,
    params: &SampleParams,
    mut hook: impl FnMut(StepInfo<'_, B>, Tensor<B, 4>) -> Flow<B>,
) -> Result<Tensor<B, 4>, SdError> {
    let [n, _, _, _] = latents.dims();
    let [_, seq, dim] = context.dims();
    // [neg x N, pos x N]
    let ctx = Tensor::cat(
        vec![
            context.clone().slice([0..1, 0..seq, 0..dim]).repeat_dim(0, n),
            context.clone().slice([1..2, 0..seq, 0..dim]).repeat_dim(0, n),
        ],
        0,
    );
    let control = control.map(|c| {
        let c = if c.dims()[0] == n { c.clone() } else { c.clone().repeat_dim(0, n) };
        Tensor::cat(vec![c.clone(), c], 0)
    });
    let timesteps = scheduler.timesteps().to_vec();
    let mut latents = latents;
    for (index, &t) in timesteps.iter().enumerate() {
        let input = Tensor::cat(vec![latents.clone(), latents.clone()], 0);
        let residuals = match (controlnet, &control) {
            (Some(cn), Some(c)) => {
                let r = cn.forward(input.clone(), t as f32, &ctx, c.clone(), params.controlnet_scale);
                if r.down.len() != unet.num_skips() {
                    return Err(SdError::Residuals {
                        expected: unet.num_skips(),
                        found: r.down.len(),
                    });
                }
                Some(r)
            }
            _ => None,
        };
        let eps = unet.forward(input, t as f32, &ctx, residuals.as_ref());
        let [b2, c, h, w] = eps.dims();
        let uncond = eps.clone().slice([0..b2 / 2, 0..c, 0..h, 0..w]);
        let text = eps.slice([b2 / 2..b2, 0..c, 0..h, 0..w]);
        let guided = uncond.clone() + (text - uncond).mul_scalar(params.guidance);
        let out = scheduler.step(guided, t, latents);
        let info = StepInfo {
            index,
            total: timesteps.len(),
            timestep: t,
            next_timestep: timesteps.get(index + 1).copied(),
            x0: &out.pred_original_sample,
        };
        latents = match hook(info, out.prev_sample) {
            Flow::Continue(l) => l,
            Flow::Cancel => return Err(SdError::Cancelled),
        };
    }
    ensure_finite(&latents, "latents")?;
    Ok(latents)
}

//! The one sampler: DDIM with classifier-free guidance and ControlNet residuals, the eq. (2)
//! latent blend of ad generation, VAE decoding and paste-back — used by `generate`, `bench`,
//! RFFT's no-gradient chain, its gradient step and its evaluation (PAPER.md "Generation", eq.
//! (1) and (2)). Generic over the backend, so the same functions run on the autodiff backend
//! where RFFT needs gradients.
//!
//! diffusers counterparts: `StableDiffusionControlNetPipeline.__call__` (`cat([latents] * 2)`,
//! ControlNet on both CFG halves, `uncond + g * (text - uncond)`, the scheduler step) and
//! `StableDiffusionControlNetInpaintPipeline` with a 4-channel UNet (after every step
//! `(1 - mask) * init_latents_proper + mask * latents`, the product latent noised to the next
//! step's level).

use std::ops::Range;

use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use super::scheduler::Scheduler;
use super::sd::{SdError, StableDiffusion};
use crate::models::controlnet::ControlNetModel;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;

/// Guidance settings of a run.
#[derive(Clone, Debug)]
pub struct SampleParams {
    /// Classifier-free guidance scale.
    pub guidance: f32,
    /// ControlNet conditioning scale.
    pub controlnet_scale: f32,
}

/// What a batch of N samples is conditioned on.
#[derive(Clone, Debug)]
pub struct Conditioning<B: Backend> {
    /// [2N, 77, D]: the N negative prompts, then the N prompts (CFG's two halves).
    pub context: Tensor<B, 3>,
    /// [2N, 3, H, W] control images in [0, 1], twice (one per CFG half); None without ControlNet.
    pub control: Option<Tensor<B, 4>>,
}

impl<B: Backend> Conditioning<B> {
    /// One `[negative, prompt]` pair ([2, 77, D]) and one control image ([1 or N, 3, H, W])
    /// for `n` samples.
    pub fn shared(pair: &Tensor<B, 3>, control: Option<&Tensor<B, 4>>, n: usize) -> Self {
        let [_, seq, dim] = pair.dims();
        let context = Tensor::cat(
            vec![
                pair.clone().slice([0..1, 0..seq, 0..dim]).repeat_dim(0, n),
                pair.clone().slice([1..2, 0..seq, 0..dim]).repeat_dim(0, n),
            ],
            0,
        );
        let control = control.map(|c| {
            let c = if c.dims()[0] == n { c.clone() } else { c.clone().repeat_dim(0, n) };
            Tensor::cat(vec![c.clone(), c], 0)
        });
        Self { context, control }
    }

    /// One `[negative, prompt]` pair per sample (each [2, 77, D]) and one control image per
    /// sample ([N, 3, H, W]).
    pub fn per_sample(pairs: &[Tensor<B, 3>], control: Option<Tensor<B, 4>>) -> Self {
        let half = |i: usize| -> Vec<Tensor<B, 3>> {
            pairs
                .iter()
                .map(|p| {
                    let [_, seq, dim] = p.dims();
                    p.clone().slice([i..i + 1, 0..seq, 0..dim])
                })
                .collect()
        };
        Self {
            context: Tensor::cat([half(0), half(1)].concat(), 0),
            control: control.map(|c| Tensor::cat(vec![c.clone(), c], 0)),
        }
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.context.dims()[0] / 2
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<B: AutodiffBackend> Conditioning<B> {
    /// Lift a conditioning built on the inner backend (no gradients flow into it).
    pub fn from_inner(c: Conditioning<B::InnerBackend>) -> Self {
        Self {
            context: Tensor::from_inner(c.context),
            control: c.control.map(Tensor::from_inner),
        }
    }
}

/// eq. (2): what is kept of the product while the background is generated.
#[derive(Clone, Debug)]
pub struct Inpaint<B: Backend> {
    /// [N, 4, h, w] scaled latents of the product over white.
    pub image_latents: Tensor<B, 4>,
    /// [N, 4, h, w]: 1 where the background is generated, 0 where the product is kept.
    pub latent_mask: Tensor<B, 4>,
    /// [N, 4, h, w] the seeded start noise, also the noise the kept product latent is given.
    pub noise: Tensor<B, 4>,
}

impl<B: Backend> Inpaint<B> {
    /// `image_latents` [1 or N, 4, h, w], `latent_mask` [1 or N, 1 or 4, h, w], `noise`
    /// [N, 4, h, w]; broadcast to the noise's shape.
    pub fn new(image_latents: Tensor<B, 4>, latent_mask: Tensor<B, 4>, noise: Tensor<B, 4>) -> Self {
        let dims = noise.dims();
        let image_latents = if image_latents.dims()[0] == dims[0] {
            image_latents
        } else {
            image_latents.repeat_dim(0, dims[0])
        };
        Self {
            image_latents,
            latent_mask: latent_mask.expand(dims),
            noise,
        }
    }

    /// The start latents of the chain: the noise times the scheduler's initial sigma.
    pub fn start<S: Scheduler>(&self, scheduler: &S) -> Tensor<B, 4> {
        self.noise.clone().mul_scalar(scheduler.init_noise_sigma())
    }

    /// The product latent at the noise level of timestep `t` (clean for None, after the last step).
    pub fn product_at<S: Scheduler>(&self, scheduler: &S, t: Option<usize>) -> Tensor<B, 4> {
        match t {
            Some(t) => scheduler.add_noise(self.image_latents.clone(), self.noise.clone(), t),
            None => self.image_latents.clone(),
        }
    }

    /// `(1 - mask) * product + mask * generated`.
    pub fn blend(&self, product: Tensor<B, 4>, generated: Tensor<B, 4>) -> Tensor<B, 4> {
        let keep = self.latent_mask.clone().neg().add_scalar(1.0);
        keep * product + self.latent_mask.clone() * generated
    }
}

impl<B: AutodiffBackend> Inpaint<B> {
    pub fn from_inner(i: Inpaint<B::InnerBackend>) -> Self {
        Self {
            image_latents: Tensor::from_inner(i.image_latents),
            latent_mask: Tensor::from_inner(i.latent_mask),
            noise: Tensor::from_inner(i.noise),
        }
    }
}

/// ControlNet + UNet on the CFG pair at timestep `t`: `(eps(x, c), eps(x, z, c))`, the
/// unconditional (negative prompt) and the prompt half.
pub fn cfg_pair<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    controlnet: Option<&ControlNetModel<B>>,
    cond: &Conditioning<B>,
    x: Tensor<B, 4>,
    t: usize,
    controlnet_scale: f32,
) -> Result<(Tensor<B, 4>, Tensor<B, 4>), SdError> {
    let input = Tensor::cat(vec![x.clone(), x], 0);
    let residuals = match (controlnet, &cond.control) {
        (Some(cn), Some(control)) => {
            let (image, latent) = (control.dims()[2], input.dims()[2]);
            if image != latent * cn.cond_downscale() {
                return Err(SdError::Geometry {
                    image,
                    latent,
                    controlnet: cn.cond_downscale(),
                });
            }
            let r = cn.forward(input.clone(), t as f32, &cond.context, control.clone(), controlnet_scale);
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
    let eps = unet.forward(input, t as f32, &cond.context, residuals.as_ref());
    let [b2, c, h, w] = eps.dims();
    let uncond = eps.clone().slice([0..b2 / 2, 0..c, 0..h, 0..w]);
    let text = eps.slice([b2 / 2..b2, 0..c, 0..h, 0..w]);
    Ok((uncond, text))
}

/// `uncond + guidance * (text - uncond)`.
pub fn guide<B: Backend>(uncond: Tensor<B, 4>, text: Tensor<B, 4>, guidance: f32) -> Tensor<B, 4> {
    uncond.clone() + (text - uncond).mul_scalar(guidance)
}

/// One finished denoising step, handed to the caller's hook.
pub struct StepInfo<'a, B: Backend> {
    /// 0-based index of the step just taken.
    pub index: usize,
    /// All steps of the scheduler.
    pub total: usize,
    pub timestep: usize,
    /// The predicted clean latents x0_hat of this step.
    pub x0: &'a Tensor<B, 4>,
}

/// The DDIM loop over the scheduler's steps `steps` (`0..total` for a whole image), from
/// `latents` (the start of the first step in the range; `Inpaint::start` for step 0), with CFG,
/// ControlNet residuals and, with `inpaint`, the eq. (2) blend after every step. `on_step` sees
/// every finished step and returns false to cancel (`SdError::Cancelled`). Returns the latents
/// after the range's last step (blended; at the start of the next step when the range ends
/// early, which is where RFFT's gradient step picks up).
#[allow(clippy::too_many_arguments)]
pub fn sample<B: Backend, S: Scheduler>(
    unet: &UNet2DConditionModel<B>,
    controlnet: Option<&ControlNetModel<B>>,
    scheduler: &S,
    cond: &Conditioning<B>,
    latents: Tensor<B, 4>,
    inpaint: Option<&Inpaint<B>>,
    params: &SampleParams,
    steps: Range<usize>,
    mut on_step: impl FnMut(StepInfo<'_, B>) -> bool,
) -> Result<Tensor<B, 4>, SdError> {
    let timesteps = scheduler.timesteps().to_vec();
    let mut latents = latents;
    for index in steps.start..steps.end.min(timesteps.len()) {
        let t = timesteps[index];
        let (uncond, text) = cfg_pair(unet, controlnet, cond, latents.clone(), t, params.controlnet_scale)?;
        let out = scheduler.step(guide(uncond, text, params.guidance), t, latents);
        latents = match inpaint {
            Some(p) => p.blend(p.product_at(scheduler, timesteps.get(index + 1).copied()), out.prev_sample),
            None => out.prev_sample,
        };
        let info = StepInfo {
            index,
            total: timesteps.len(),
            timestep: t,
            x0: &out.pred_original_sample,
        };
        if !on_step(info) {
            return Err(SdError::Cancelled);
        }
    }
    Ok(latents)
}

/// Decode scaled latents to images in [0, 1] ([N, 3, H, W]).
pub fn decode<B: Backend>(vae: &AutoencoderKL<B>, scaling_factor: f64, latents: Tensor<B, 4>) -> Tensor<B, 4> {
    vae.decode(latents.div_scalar(scaling_factor))
        .mul_scalar(0.5)
        .add_scalar(0.5)
        .clamp(0.0, 1.0)
}

/// [`decode`] with the pipeline's VAE, checked: non-finite pixels are an error.
pub fn decode_images<B: Backend>(sd: &StableDiffusion<B>, latents: Tensor<B, 4>) -> Result<Tensor<B, 4>, SdError> {
    let image = decode(&sd.vae, sd.vae_config.scaling_factor, latents);
    ensure_finite(&image, "decoded images")?;
    Ok(image)
}

/// Paste the product back with its undilated alpha: `alpha * product + (1 - alpha) * image`
/// (`alpha` [N, 1, H, W] in [0, 1], `product` [N, 3, H, W]). Inside the opaque product the ad
/// shows the product exactly; soft edges are blended.
pub fn paste_back<B: Backend>(image: Tensor<B, 4>, alpha: Tensor<B, 4>, product: Tensor<B, 4>) -> Tensor<B, 4> {
    alpha.clone() * product + alpha.neg().add_scalar(1.0) * image
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

//! Steps 2-5 of an RFFT iteration: at one timestep of the chain, the ControlNet + UNet CFG pair
//! with gradients, x0_hat, the eq. (2) blend, decode, paste-back, the judge's F_AC and the
//! regulariser — every step through `pipeline::sampler` and `pipeline::judge`, the parts
//! generation and scoring use.

use burn::module::AutodiffModule;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};

use super::config::Regulariser;
use super::error::RfftError;
use crate::models::controlnet::ControlNetModel;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::pipeline::judge::Judge;
use crate::pipeline::sampler::{self, Conditioning, Inpaint};
use crate::pipeline::scheduler::{Ddim, Scheduler};

/// The frozen parts of an iteration: UNet, VAE and the judge.
pub struct Frozen<B: Backend> {
    pub unet: UNet2DConditionModel<B>,
    pub vae: AutoencoderKL<B>,
    pub vae_scaling: f64,
    pub judge: Judge<B>,
}

impl<B: AutodiffBackend> Frozen<B> {
    pub fn inner(&self) -> Frozen<B::InnerBackend> {
        Frozen {
            unet: self.unet.valid(),
            vae: self.vae.valid(),
            vae_scaling: self.vae_scaling,
            judge: self.judge.inner(),
        }
    }
}

/// Sampling settings shared by the chain, the gradient step and evaluation.
#[derive(Clone, Copy, Debug)]
pub struct StepSettings {
    pub guidance: f32,
    pub controlnet_scale: f32,
    pub reg: Regulariser,
    pub beta: f64,
}

impl StepSettings {
    pub fn sample_params(&self) -> sampler::SampleParams {
        sampler::SampleParams {
            guidance: self.guidance,
            controlnet_scale: self.controlnet_scale,
        }
    }
}

/// The tensors of a batch of N samples (one product, prompt and noise each).
#[derive(Clone, Debug)]
pub struct Batch<B: Backend> {
    /// Prompts ([2N, 77, D]) and Canny images ([2N, 3, H, W]).
    pub cond: Conditioning<B>,
    /// Product latents, latent mask and the seeded noise (eq. (2)).
    pub inpaint: Inpaint<B>,
    /// [N, 1, H, W]: the product's undilated alpha in [0, 1] (paste-back).
    pub alpha: Tensor<B, 4>,
    /// [N, 3, H, W]: the placed product's RGB in [0, 1].
    pub product_rgb: Tensor<B, 4>,
    /// [N, 3, s, s]: RFNet's product input (`Judge::product_input`).
    pub rfnet_product: Tensor<B, 4>,
    pub caption_ids: Tensor<B, 2, Int>,
    pub caption_mask: Tensor<B, 2, Int>,
}

impl<B: Backend> Batch<B> {
    pub fn len(&self) -> usize {
        self.inpaint.noise.dims()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decode blended latents and paste the product back: [N, 3, H, W] in [0, 1].
    pub fn decode_and_paste(&self, frozen: &Frozen<B>, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let decoded = sampler::decode(&frozen.vae, frozen.vae_scaling, latents);
        sampler::paste_back(decoded, self.alpha.clone(), self.product_rgb.clone())
    }

    /// RFNet's logits [N, 5] for the ad images of this batch.
    pub fn judge(&self, frozen: &Frozen<B>, image: Tensor<B, 4>) -> Tensor<B, 2> {
        frozen
            .judge
            .logits(image, self.rfnet_product.clone(), (self.caption_ids.clone(), self.caption_mask.clone()))
    }

    /// The no-gradient chain through the steps `0..k` from the seeded noise (`k` = all steps for
    /// a whole image): the latents at the start of step `k`.
    pub fn chain(&self, unet: &UNet2DConditionModel<B>, cn: &ControlNetModel<B>, scheduler: &Ddim, steps: std::ops::Range<usize>, start: Tensor<B, 4>, settings: &StepSettings) -> Result<Tensor<B, 4>, RfftError> {
        Ok(sampler::sample(
            unet,
            Some(cn),
            scheduler,
            &self.cond,
            start,
            Some(&self.inpaint),
            &settings.sample_params(),
            steps,
            |_| true,
        )?)
    }
}

impl<B: AutodiffBackend> Batch<B> {
    /// Lift a batch built on the inner backend (no gradients needed for any input).
    pub fn from_inner(b: Batch<B::InnerBackend>) -> Self {
        Self {
            cond: Conditioning::from_inner(b.cond),
            inpaint: Inpaint::from_inner(b.inpaint),
            alpha: Tensor::from_inner(b.alpha),
            product_rgb: Tensor::from_inner(b.product_rgb),
            rfnet_product: Tensor::from_inner(b.rfnet_product),
            caption_ids: Tensor::from_inner(b.caption_ids),
            caption_mask: Tensor::from_inner(b.caption_mask),
        }
    }
}

/// The text-guidance direction g = -(eps(x, z, c) - eps(x, c)) / sqrt(1 - a_t).
pub fn guidance_direction<B: Backend>(uncond: Tensor<B, 4>, text: Tensor<B, 4>, alpha_t: f64) -> Tensor<B, 4> {
    (text - uncond).mul_scalar(-1.0 / (1.0 - alpha_t).sqrt())
}

/// Per-sample Euclidean norm of [N, ...] (with a tiny floor so the gradient at 0 is 0, not NaN).
pub fn norm_per_sample<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 1> {
    let n = x.dims()[0];
    x.powf_scalar(2.0).reshape([n as i32, -1]).sum_dim(1).add_scalar(1e-12).sqrt().reshape([n])
}

/// One iteration's losses (each a one-element tensor) and RFNet's probabilities.
pub struct Objective<B: Backend> {
    pub f_ac: Tensor<B, 1>,
    pub reg: Tensor<B, 1>,
    pub total: Tensor<B, 1>,
    pub probs: Tensor<B, 2>,
}

/// Steps 2-5 of the iteration at timestep `t` with latents `x` (= x_{t+1} in the paper's
/// notation): differentiable in the trainable ControlNet `cn`. `reference` (the frozen original
/// ControlNet) is needed for `cc` and `kl`.
#[allow(clippy::too_many_arguments)]
pub fn objective<B: Backend>(
    frozen: &Frozen<B>,
    cn: &ControlNetModel<B>,
    reference: Option<&ControlNetModel<B>>,
    scheduler: &Ddim,
    batch: &Batch<B>,
    x: Tensor<B, 4>,
    t: usize,
    settings: &StepSettings,
) -> Result<Objective<B>, RfftError> {
    let n = batch.len();
    let a = scheduler.alpha_cumprod(t);
    let x = x.detach();
    let pair = |model: &ControlNetModel<B>| {
        sampler::cfg_pair(&frozen.unet, Some(model), &batch.cond, x.clone(), t, settings.controlnet_scale)
    };
    // 1. eps with gradients (CFG pair), x0_hat, eq. (2) blend with the clean product latent
    let (uncond, text) = pair(cn)?;
    let guided = sampler::guide(uncond.clone(), text.clone(), settings.guidance);
    let x0_of = |eps: Tensor<B, 4>| (x.clone() - eps.mul_scalar((1.0 - a).sqrt())).div_scalar(a.sqrt());
    let x0 = batch.inpaint.blend(batch.inpaint.product_at(scheduler, None), x0_of(guided));
    // 2. decode, paste back, judge; F_AC = CE towards Available (class 0)
    let image = batch.decode_and_paste(frozen, x0.clone());
    let logits = batch.judge(frozen, image);
    let probs = softmax(logits.clone(), 1);
    let f_ac = log_softmax(logits, 1).slice([0..n, 0..1]).neg().mean();
    // 3. the regulariser against the frozen reference ControlNet
    let reg = match settings.reg {
        Regulariser::None => Tensor::<B, 1>::zeros([1], &x.device()),
        r => {
            let reference = reference.ok_or_else(|| RfftError::Train(format!("reg = {r} needs the reference ControlNet")))?;
            let (ref_uncond, ref_text) = pair(reference)?;
            let (ref_uncond, ref_text) = (ref_uncond.detach(), ref_text.detach());
            match r {
                Regulariser::Cc => {
                    let g = guidance_direction(uncond, text, a);
                    let g_ref = guidance_direction(ref_uncond, ref_text, a);
                    norm_per_sample(g - g_ref).mean()
                }
                _ => {
                    let ref_guided = sampler::guide(ref_uncond, ref_text, settings.guidance);
                    let x0_ref = batch.inpaint.blend(batch.inpaint.product_at(scheduler, None), x0_of(ref_guided));
                    let d = x0.clone() - x0_ref;
                    d.powf_scalar(2.0)
                        .reshape([n as i32, -1])
                        .sum_dim(1)
                        .mean()
                        .mul_scalar(a / (2.0 * (1.0 - a)))
                }
            }
        }
    };
    let total = f_ac.clone() + reg.clone().mul_scalar(settings.beta);
    Ok(Objective { f_ac, reg, total, probs })
}

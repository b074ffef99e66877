//! RFFT: fine-tuning the ControlNet with RFNet feedback (PAPER.md "RFFT").
//!
//! One iteration (for a batch of products with their prompts, a seeded noise each):
//! 1. the DDIM chain (`sample_steps`, 40) with CFG, ControlNet and the latent blend of eq. (2),
//!    without gradients (inner backend), up to a step k drawn among the last `last_steps` (10);
//! 2. at step k, with gradients: ControlNet + UNet on the CFG pair, the guided eps, x0_hat =
//!    (x - sqrt(1 - a_t) eps) / sqrt(a_t), blended with the product's clean latent where eq. (2)
//!    keeps it, VAE decode, the product pasted back with its undilated alpha (as generation does);
//! 3. depth (DPT) and saliency (U2-Net) of that image and the frozen RFNet on (product, image,
//!    depth, saliency, title) — all differentiable (`ops::resize_bilinear`, BatchNorm with running
//!    statistics); F_AC = cross-entropy towards Available;
//! 4. the regulariser: `cc` L_CC = || g_theta - g_ref ||_2 per sample (mean over the batch) with
//!    g = -(eps(x, z, c) - eps(x, c)) / sqrt(1 - a_t) and g_ref from a frozen copy of the original
//!    ControlNet; `kl` = || x0_theta - x0_ref ||^2 * a_t / (2 (1 - a_t)) per sample (the KL
//!    between two Gaussians centred on the two x0_hat with the variance (1 - a_t) / a_t that a
//!    unit-variance eps error gives x0_hat); `none`;
//! 5. total = F_AC + beta * reg, backward, AdamW (gradients accumulated over `grad_accum`).
//!
//! Trainable: the whole ControlNet (`lora_rank = 0`, as the paper) or LoRA adapters on its
//! Linear and 1x1-conv layers (`models::lora`). Everything else is loaded with `no_grad`.
//!
//! The run folder (the GUI reads exactly this):
//! - `run.toml`: the `RfftConfig` with absolute paths;
//! - `metrics.jsonl`: `RfftEvent::Step` / `RfftEvent::Eval` lines (steps contiguous across resume);
//! - `eval/step-NNNNNN.png`: sample grids (rows = eval products, columns = seeds);
//! - `checkpoint/` (`checkpoint.old` while being replaced): `trainable.bin` (the ControlNet or the
//!   LoRA adapters, a burn record), `optimizer.bin`, `state.json`, `lora.json` for LoRA runs;
//! - `state.json`: `{"step", "status": running|paused|stopped|finished|failed, "error"?}`.
//!
//! Every draw of an iteration comes from `(seed, step, micro-batch)`, so `--resume` continues
//! exactly where the checkpoint left off.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use super::rfft_config::{ProductSpec, Regulariser, ResolvedModels, RfftConfig, RfftModelPaths};
use crate::device::{BackendJob, DeviceRequest, Precision};
use crate::models::bert::BertTokenizer;
use crate::models::clip::{ClipTextModel, ClipTokenizer};
use crate::models::vae::VaeConfig;
use crate::models::controlnet::ControlNetModel;
use crate::models::dpt::{DepthEstimator, DptForDepthEstimation};
use crate::models::lora::{LoraAdapters, LoraTarget, lora_targets};
use crate::models::ops::resize_bilinear;
use crate::models::resnet::{IMAGENET_MEAN, IMAGENET_STD};
use crate::models::rfnet::{RfNet, RfNetConfig, RfNetInput, load_rfnet};
use crate::models::u2net::{U2Net, load_u2net};
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::pipeline::generate::seeded_noise;
use crate::pipeline::output::{append_jsonl, save_rgb, write_atomic};
use crate::pipeline::product::{Placement, PlacedProduct, place_file};
use crate::pipeline::scheduler::{Ddim, Scheduler};
use crate::pipeline::sd::{StableDiffusion, load_controlnet};

#[derive(Debug, thiserror::Error)]
pub enum RfftError {
    /// Bad configuration or input (exit code 2).
    #[error("{0}")]
    Config(String),
    /// A model folder is missing or cannot be loaded (exit code 3).
    #[error("{0}")]
    Models(String),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{0}")]
    Train(String),
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> RfftError {
    RfftError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The frozen judge: DPT depth + U2-Net saliency + RFNet, differentiable in the image
// ---------------------------------------------------------------------------------------------

/// DPT + U2-Net + RFNet as one differentiable function of the generated image.
pub struct Judge<B: Backend> {
    pub depth: DptForDepthEstimation<B>,
    /// DPT input side (height, width) and normalisation.
    pub depth_side: (usize, usize),
    pub depth_mean: [f32; 3],
    pub depth_std: [f32; 3],
    pub saliency: U2Net<B>,
    pub saliency_side: usize,
    pub rfnet: RfNet<B>,
    pub rfnet_config: RfNetConfig,
}

impl<B: Backend> Judge<B> {
    /// Load the three frozen models (parameters without gradients).
    pub fn load(models: &ResolvedModels, saliency_side: Option<usize>, depth_side: Option<usize>, dtype: DType, device: &B::Device) -> Result<Self, RfftError> {
        let m = |what: &str, p: &Path, e: &dyn std::fmt::Display| RfftError::Models(format!("{what} {}: {e}", p.display()));
        let depth = DepthEstimator::<B>::load(&models.depth, dtype, device).map_err(|e| m("depth model", &models.depth, &e))?;
        let (h, w) = depth.preprocess.side();
        let pick = |v: &[f32]| [0, 1, 2].map(|i| v.get(i).copied().unwrap_or(0.5));
        let depth_mean = pick(&depth.preprocess.image_mean);
        let depth_std = pick(&depth.preprocess.image_std);
        let (saliency, saliency_config, _) =
            load_u2net::<B>(&models.saliency, dtype, device).map_err(|e| m("saliency model", &models.saliency, &e))?;
        let (rfnet, rfnet_config) = load_rfnet::<B>(&models.rfnet, dtype, device).map_err(|e| m("RFNet", &models.rfnet, &e))?;
        Ok(Self {
            depth: depth.model.no_grad(),
            depth_side: depth_side.map(|s| (s, s)).unwrap_or((h as usize, w as usize)),
            depth_mean,
            depth_std,
            saliency: saliency.no_grad(),
            saliency_side: saliency_side.unwrap_or(saliency_config.input_size as usize),
            rfnet: rfnet.no_grad(),
            rfnet_config,
        })
    }

    /// RFNet logits [N, 5] of `image` ([N, 3, H, W] in [0, 1], the pasted-back ad image);
    /// `product` is RFNet's product input ([N, 3, s, s], ImageNet-normalised).
    pub fn logits(&self, image: Tensor<B, 4>, product: Tensor<B, 4>, caption_ids: Tensor<B, 2, Int>, caption_mask: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let s = self.rfnet_config.input_size;
        let [n, _, _, _] = image.dims();
        // 1. depth: resize, normalise, DPT, per-image min-max, to RFNet's size
        let (dh, dw) = self.depth_side;
        let x = normalise(resize_bilinear(image.clone(), dh, dw, false), self.depth_mean, self.depth_std);
        let d = self.depth.forward(x);
        let [_, h, w] = d.dims();
        let depth = resize_bilinear(min_max(d.reshape([n, 1, h, w])), s, s, false);
        // 2. saliency: resize, divide by the image's maximum, ImageNet normalisation, U2-Net d0,
        //    to RFNet's size, min-max
        let side = self.saliency_side;
        let x = resize_bilinear(image.clone(), side, side, false);
        let max = x.clone().reshape([n, 3 * side * side]).max_dim(1).reshape([n, 1, 1, 1]).clamp_min(1e-6);
        let x = normalise(x / max, IMAGENET_MEAN, IMAGENET_STD);
        let [d0, ..] = self.saliency.forward(x);
        let saliency = min_max(resize_bilinear(d0, s, s, false));
        // 3. RFNet (encoders frozen by their parameters, gradients flow to the inputs)
        let grey3 = |m: Tensor<B, 4>| normalise(m.repeat_dim(1, 3), IMAGENET_MEAN, IMAGENET_STD);
        let input = RfNetInput {
            product,
            generated: normalise(resize_bilinear(image, s, s, false), IMAGENET_MEAN, IMAGENET_STD),
            depth: grey3(depth),
            saliency: grey3(saliency),
            caption_ids,
            caption_mask,
        };
        self.rfnet.forward(input, false)
    }
}

impl<B: AutodiffBackend> Judge<B> {
    /// The same models on the inner backend (shared weights).
    pub fn inner(&self) -> Judge<B::InnerBackend> {
        Judge {
            depth: self.depth.valid(),
            depth_side: self.depth_side,
            depth_mean: self.depth_mean,
            depth_std: self.depth_std,
            saliency: self.saliency.valid(),
            saliency_side: self.saliency_side,
            rfnet: self.rfnet.valid(),
            rfnet_config: self.rfnet_config.clone(),
        }
    }
}

/// `(x - mean) / std` per channel.
fn normalise<B: Backend>(x: Tensor<B, 4>, mean: [f32; 3], std: [f32; 3]) -> Tensor<B, 4> {
    let device = x.device();
    let m = Tensor::<B, 4>::from_data(TensorData::new(mean.to_vec(), [1, 3, 1, 1]), &device);
    let s = Tensor::<B, 4>::from_data(TensorData::new(std.to_vec(), [1, 3, 1, 1]), &device);
    (x - m) / s
}

/// Per-image min-max normalisation to [0, 1] ([N, C, H, W]).
fn min_max<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let flat = x.clone().reshape([n, c * h * w]);
    let lo = flat.clone().min_dim(1).reshape([n, 1, 1, 1]);
    let hi = flat.max_dim(1).reshape([n, 1, 1, 1]);
    (x - lo.clone()) / (hi - lo).add_scalar(1e-6)
}

// ---------------------------------------------------------------------------------------------
// Frozen generator parts and batches
// ---------------------------------------------------------------------------------------------

/// The frozen parts of an iteration: UNet, VAE decoder and the judge.
pub struct Frozen<B: Backend> {
    pub unet: UNet2DConditionModel<B>,
    pub vae: AutoencoderKL<B>,
    pub vae_scaling: f32,
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

/// The tensors of a batch of N samples (one product, prompt and noise each).
#[derive(Clone, Debug)]
pub struct Batch<B: Backend> {
    /// [2N, 77, D]: the N negative prompts, then the N prompts.
    pub context: Tensor<B, 3>,
    /// [2N, 3, H, W] in [0, 1] (the Canny image, twice).
    pub control: Tensor<B, 4>,
    /// [N, 4, h, w] scaled latents of the product over white.
    pub image_latents: Tensor<B, 4>,
    /// [N, 4, h, w]: 1 where the background is generated (eq. (2)).
    pub latent_mask: Tensor<B, 4>,
    /// [N, 1, H, W]: the product's undilated alpha in [0, 1] (paste-back).
    pub alpha: Tensor<B, 4>,
    /// [N, 3, H, W]: the placed product's RGB in [0, 1].
    pub product_rgb: Tensor<B, 4>,
    /// [N, 3, s, s]: RFNet's product input (over white, ImageNet-normalised).
    pub rfnet_product: Tensor<B, 4>,
    pub caption_ids: Tensor<B, 2, Int>,
    pub caption_mask: Tensor<B, 2, Int>,
    /// [N, 4, h, w] the seeded start noise (also the blend noise).
    pub noise: Tensor<B, 4>,
}

impl<B: Backend> Batch<B> {
    pub fn len(&self) -> usize {
        self.noise.dims()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<B: AutodiffBackend> Batch<B> {
    /// Lift a batch built on the inner backend (no gradients needed for any input).
    pub fn from_inner(b: Batch<B::InnerBackend>) -> Self {
        Self {
            context: Tensor::from_inner(b.context),
            control: Tensor::from_inner(b.control),
            image_latents: Tensor::from_inner(b.image_latents),
            latent_mask: Tensor::from_inner(b.latent_mask),
            alpha: Tensor::from_inner(b.alpha),
            product_rgb: Tensor::from_inner(b.product_rgb),
            rfnet_product: Tensor::from_inner(b.rfnet_product),
            caption_ids: Tensor::from_inner(b.caption_ids),
            caption_mask: Tensor::from_inner(b.caption_mask),
            noise: Tensor::from_inner(b.noise),
        }
    }
}

/// ControlNet + UNet on the CFG pair: (eps(x, c) with the negative prompt, eps(x, z, c)).
pub fn cfg_pair<B: Backend>(unet: &UNet2DConditionModel<B>, cn: &ControlNetModel<B>, x: Tensor<B, 4>, t: usize, batch: &Batch<B>, scale: f32) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [n, c, h, w] = x.dims();
    let input = Tensor::cat(vec![x.clone(), x], 0);
    let residuals = cn.forward(input.clone(), t as f32, &batch.context, batch.control.clone(), scale);
    let eps = unet.forward(input, t as f32, &batch.context, Some(&residuals));
    let uncond = eps.clone().slice([0..n, 0..c, 0..h, 0..w]);
    let text = eps.slice([n..2 * n, 0..c, 0..h, 0..w]);
    (uncond, text)
}

/// eq. (2): keep the product's latent (`proper`) where the mask is 0.
fn blend<B: Backend>(batch: &Batch<B>, proper: Tensor<B, 4>, generated: Tensor<B, 4>) -> Tensor<B, 4> {
    let keep = batch.latent_mask.clone().neg().add_scalar(1.0);
    keep * proper + batch.latent_mask.clone() * generated
}

/// The DDIM chain with CFG, ControlNet and the eq. (2) blend, from the seeded noise through
/// the first `stop` steps: the latents at `timesteps[stop]` (or the final, blended latents when
/// `stop` is the number of steps). `on_step(index, latents_before_step)` sees every step.
pub fn chain<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    cn: &ControlNetModel<B>,
    scheduler: &Ddim,
    batch: &Batch<B>,
    stop: usize,
    settings: &StepSettings,
    mut on_step: impl FnMut(usize, &Tensor<B, 4>),
) -> Tensor<B, 4> {
    let timesteps = scheduler.timesteps().to_vec();
    let mut x = batch.noise.clone().mul_scalar(scheduler.init_noise_sigma());
    for (i, &t) in timesteps.iter().enumerate().take(stop) {
        on_step(i, &x);
        let (uncond, text) = cfg_pair(unet, cn, x.clone(), t, batch, settings.controlnet_scale);
        let guided = uncond.clone() + (text - uncond).mul_scalar(settings.guidance);
        let out = scheduler.step(guided, t, x);
        let proper = match timesteps.get(i + 1) {
            Some(&next) => scheduler.add_noise(batch.image_latents.clone(), batch.noise.clone(), next),
            None => batch.image_latents.clone(),
        };
        x = blend(batch, proper, out.prev_sample);
    }
    x
}

/// Decode blended latents and paste the product back: [N, 3, H, W] in [0, 1].
pub fn decode_and_paste<B: Backend>(frozen: &Frozen<B>, batch: &Batch<B>, latents: Tensor<B, 4>) -> Tensor<B, 4> {
    let decoded = frozen
        .vae
        .decode(latents.div_scalar(frozen.vae_scaling))
        .mul_scalar(0.5)
        .add_scalar(0.5)
        .clamp(0.0, 1.0);
    let alpha = batch.alpha.clone();
    alpha.clone() * batch.product_rgb.clone() + alpha.neg().add_scalar(1.0) * decoded
}

/// The text-guidance direction g = -(eps(x, z, c) - eps(x, c)) / sqrt(1 - a_t).
pub fn guidance_direction<B: Backend>(uncond: Tensor<B, 4>, text: Tensor<B, 4>, alpha_t: f64) -> Tensor<B, 4> {
    (text - uncond).mul_scalar(-1.0 / (1.0 - alpha_t).sqrt())
}

/// Per-sample Euclidean norm of [N, ...] (with a tiny floor so the gradient at 0 is 0, not NaN).
fn norm_per_sample<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 1> {
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
    // 1. eps with gradients (CFG pair), x0_hat, eq. (2) blend with the clean product latent
    let (uncond, text) = cfg_pair(&frozen.unet, cn, x.clone(), t, batch, settings.controlnet_scale);
    let guided = uncond.clone() + (text.clone() - uncond.clone()).mul_scalar(settings.guidance);
    let x0_of = |eps: Tensor<B, 4>| (x.clone() - eps.mul_scalar((1.0 - a).sqrt())).div_scalar(a.sqrt());
    let x0 = blend(batch, batch.image_latents.clone(), x0_of(guided));
    // 2. decode, paste back, judge; F_AC = CE towards Available (class 0)
    let image = decode_and_paste(frozen, batch, x0.clone());
    let logits = frozen
        .judge
        .logits(image, batch.rfnet_product.clone(), batch.caption_ids.clone(), batch.caption_mask.clone());
    let probs = softmax(logits.clone(), 1);
    let f_ac = log_softmax(logits, 1).slice([0..n, 0..1]).neg().mean();
    // 3. the regulariser against the frozen reference ControlNet
    let reg = match settings.reg {
        Regulariser::None => Tensor::<B, 1>::zeros([1], &x.device()),
        r => {
            let reference = reference.ok_or_else(|| RfftError::Train(format!("reg = {r} needs the reference ControlNet")))?;
            let (ref_uncond, ref_text) = cfg_pair(&frozen.unet, reference, x.clone(), t, batch, settings.controlnet_scale);
            let (ref_uncond, ref_text) = (ref_uncond.detach(), ref_text.detach());
            match r {
                Regulariser::Cc => {
                    let g = guidance_direction(uncond, text, a);
                    let g_ref = guidance_direction(ref_uncond, ref_text, a);
                    norm_per_sample(g - g_ref).mean()
                }
                _ => {
                    let ref_guided = ref_uncond.clone() + (ref_text - ref_uncond).mul_scalar(settings.guidance);
                    let x0_ref = blend(batch, batch.image_latents.clone(), x0_of(ref_guided));
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

// ---------------------------------------------------------------------------------------------
// Products: placement, control, masks, prompt embeddings, product latents (computed once)
// ---------------------------------------------------------------------------------------------

/// A product ready for batching (host data + its prompt embedding and latent on the device).
pub struct PreparedProduct<B: Backend> {
    pub name: String,
    pub title: String,
    pub placed: PlacedProduct,
    /// [2, 77, D] (negative, prompt).
    pub context: Tensor<B, 3>,
    /// [1, 4, h, w] scaled latents.
    pub image_latents: Tensor<B, 4>,
    control: Vec<f32>,
    latent_mask: Vec<f32>,
    alpha: Vec<f32>,
    rgb: Vec<f32>,
    rfnet_product: Vec<f32>,
}

fn rgb_planes(img: &RgbImage, scale: f32, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (x, y, p) in img.enumerate_pixels() {
        let i = (y * w + x) as usize;
        for c in 0..3 {
            out[c * plane + i] = (p[c] as f32 * scale - mean[c]) / std[c];
        }
    }
    out
}

/// Place every product, encode its prompts and its latent (inference, no gradients).
pub fn prepare_products<B: Backend>(
    specs: &[ProductSpec],
    text: (&ClipTokenizer, &ClipTextModel<B>),
    vae: (&AutoencoderKL<B>, &VaeConfig),
    rfnet_size: usize,
    config: &RfftConfig,
    device: &B::Device,
) -> Result<Vec<PreparedProduct<B>>, RfftError> {
    let (tokenizer, text_encoder) = text;
    let (vae, vae_config) = vae;
    let placement = Placement {
        canvas: config.image_size,
        scale: config.product_scale,
        ..Placement::default()
    };
    let lat = (config.image_size as usize / vae_config.scale_factor()) as u32;
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let placed = place_file(&spec.image, &placement)
            .map_err(|e| RfftError::Config(format!("product {:?}: {e}", spec.name())))?;
        let mut ids = Vec::with_capacity(2);
        for text in [&spec.negative, &spec.prompt] {
            let enc = tokenizer
                .encode(text)
                .map_err(|e| RfftError::Config(format!("product {:?}: {e}", spec.name())))?;
            ids.push(enc.ids);
        }
        let context = text_encoder.encode_ids(&ids, device);
        let init = placed.init_rgb();
        let c = config.image_size as usize;
        let init_t = Tensor::<B, 4>::from_data(
            TensorData::new(rgb_planes(&init, 2.0 / 255.0, [1.0; 3], [1.0; 3]), [1, 3, c, c]),
            device,
        );
        let image_latents = vae.encode(init_t).mean.mul_scalar(vae_config.scaling_factor);
        let s = rfnet_size as u32;
        let small = image::imageops::resize(&init, s, s, image::imageops::FilterType::Triangle);
        let alpha: Vec<f32> = placed.rgba.pixels().map(|p| p[3] as f32 / 255.0).collect();
        let rgb_img = RgbImage::from_fn(placed.canvas(), placed.canvas(), |x, y| {
            let p = placed.rgba.get_pixel(x, y);
            Rgb([p[0], p[1], p[2]])
        });
        out.push(PreparedProduct {
            name: spec.name(),
            title: spec.title.clone(),
            control: rgb_planes(&placed.control, 1.0 / 255.0, [0.0; 3], [1.0; 3]),
            latent_mask: placed.latent_mask(lat),
            alpha,
            rgb: rgb_planes(&rgb_img, 1.0 / 255.0, [0.0; 3], [1.0; 3]),
            rfnet_product: rgb_planes(&small, 1.0 / 255.0, IMAGENET_MEAN, IMAGENET_STD),
            placed,
            context,
            image_latents,
        });
    }
    Ok(out)
}

/// Stack products (with repetition) and their noise seeds into a batch.
pub fn make_batch<B: Backend>(
    products: &[&PreparedProduct<B>],
    seeds: &[u64],
    tokenizer: &BertTokenizer,
    max_tokens: usize,
    device: &B::Device,
) -> Result<Batch<B>, RfftError> {
    let n = products.len();
    let first = products.first().ok_or_else(|| RfftError::Train("empty batch".into()))?;
    let [_, c4, h, w] = first.image_latents.dims();
    let big = first.placed.canvas() as usize;
    let s = ((first.rfnet_product.len() / 3) as f64).sqrt().round() as usize;
    let cat4 = |f: &dyn Fn(&PreparedProduct<B>) -> Vec<f32>, shape: [usize; 3]| {
        let data: Vec<f32> = products.iter().flat_map(|p| f(p)).collect();
        Tensor::<B, 4>::from_data(TensorData::new(data, [n, shape[0], shape[1], shape[2]]), device)
    };
    let [_, seq, dim] = first.context.dims();
    let negatives: Vec<Tensor<B, 3>> = products.iter().map(|p| p.context.clone().slice([0..1, 0..seq, 0..dim])).collect();
    let positives: Vec<Tensor<B, 3>> = products.iter().map(|p| p.context.clone().slice([1..2, 0..seq, 0..dim])).collect();
    let context = Tensor::cat([negatives, positives].concat(), 0);
    let control = cat4(&|p| p.control.clone(), [3, big, big]);
    let mask = cat4(&|p| p.latent_mask.clone(), [1, h, w]).repeat_dim(1, c4);
    let noise: Vec<f32> = seeds.iter().flat_map(|&sd| seeded_noise(sd, c4 * h * w)).collect();
    let titles: Vec<&str> = products.iter().map(|p| p.title.as_str()).collect();
    let (caption_ids, caption_mask) = tokenizer
        .encode_batch::<B>(&titles, max_tokens, device)
        .map_err(|e| RfftError::Config(e.to_string()))?;
    Ok(Batch {
        context,
        control: Tensor::cat(vec![control.clone(), control], 0),
        image_latents: Tensor::cat(products.iter().map(|p| p.image_latents.clone()).collect(), 0),
        latent_mask: mask,
        alpha: cat4(&|p| p.alpha.clone(), [1, big, big]),
        product_rgb: cat4(&|p| p.rgb.clone(), [3, big, big]),
        rfnet_product: cat4(&|p| p.rfnet_product.clone(), [3, s, s]),
        caption_ids,
        caption_mask,
        noise: Tensor::from_data(TensorData::new(noise, [n, c4, h, w]), device),
    })
}

// ---------------------------------------------------------------------------------------------
// Events, metrics and the run folder
// ---------------------------------------------------------------------------------------------

/// One optimizer step (a `metrics.jsonl` line with `"kind":"step"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub f_ac: f64,
    pub reg: f64,
    pub total: f64,
    pub grad_norm: f64,
    pub step_time_s: f64,
    /// Peak resident memory of the process on the CPU backend; null where the backend does not
    /// report memory (GPUs).
    pub memory_bytes: Option<u64>,
    pub lr: f64,
}

/// One evaluation sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSample {
    pub product: String,
    pub seed: u64,
    pub probs: [f32; 5],
    pub available: bool,
}

/// An evaluation (a `metrics.jsonl` line with `"kind":"eval"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub step: usize,
    pub availability_rate: f64,
    /// Mean -ln P(Available) over the samples.
    pub mean_f_ac: f64,
    /// The grid image, relative to the run folder.
    pub grid: String,
    pub samples: Vec<EvalSample>,
    /// Mean relative distance || g_theta - g_ref || / || g_ref || of the text-guidance direction
    /// from the original ControlNet's, at the first step of the last-steps window.
    #[serde(default)]
    pub guidance_distance: f64,
    /// Mean pairwise RMS distance (0..1) between the backgrounds of one product across the eval
    /// seeds: the collapse measure (no regularisation drives it down).
    #[serde(default)]
    pub background_variety: f64,
}

/// Progress of a run. `Step` and `Eval` are also the lines of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RfftEvent {
    Step(StepMetrics),
    Eval(EvalMetrics),
    Checkpoint { step: usize, dir: PathBuf },
    Paused { step: usize },
    Resumed { step: usize },
    /// The run ended: `status` is "finished" (all steps) or "stopped" (asked to stop).
    Finished { step: usize, status: RunStatus },
    Failed { step: usize, error: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Paused,
    Stopped,
    Finished,
    Failed,
    /// Never written: what `RunState::current` reports for a "running" or "paused" run whose
    /// process has gone (killed, crashed, machine restarted).
    Interrupted,
}

/// `state.json` of a run folder (and of its checkpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub step: usize,
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The process writing the run while it is running or paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl RunState {
    pub fn new(step: usize, status: RunStatus) -> Self {
        let live = matches!(status, RunStatus::Running | RunStatus::Paused);
        Self {
            step,
            status,
            error: None,
            pid: live.then(std::process::id),
        }
    }

    /// The status as readers should show it: a run that says it is running or paused while its
    /// process no longer exists was interrupted (and `rfft --resume` continues it).
    pub fn current(&self) -> RunStatus {
        match (self.status, self.pid) {
            (RunStatus::Running | RunStatus::Paused, Some(pid)) if !process_alive(pid) => RunStatus::Interrupted,
            (s, _) => s,
        }
    }
}

/// Whether a process exists (Linux: /proc; elsewhere assumed alive).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// What the GUI's run list shows: the config, the state and every metrics line.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub dir: PathBuf,
    pub config: RfftConfig,
    pub state: Option<RunState>,
    pub steps: Vec<StepMetrics>,
    pub evals: Vec<EvalMetrics>,
}

/// Read a run folder (tolerates a half-written last metrics line).
pub fn read_run(dir: &Path) -> Result<RunSummary, RfftError> {
    // parsed, not validated: a run stays listable after its product files moved
    let path = dir.join("run.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| RfftError::Config(format!("{}: cannot read: {e}", path.display())))?;
    let config: RfftConfig = toml::from_str(&text).map_err(|e| RfftError::Config(format!("{}: {e}", path.display())))?;
    let state = std::fs::read_to_string(dir.join("state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<RunState>(&t).ok())
        .map(|s| RunState {
            status: s.current(),
            ..s
        });
    let (mut steps, mut evals) = (Vec::new(), Vec::new());
    if let Ok(text) = std::fs::read_to_string(dir.join("metrics.jsonl")) {
        for line in text.lines() {
            match serde_json::from_str::<RfftEvent>(line) {
                Ok(RfftEvent::Step(s)) => steps.push(s),
                Ok(RfftEvent::Eval(e)) => evals.push(e),
                _ => {}
            }
        }
    }
    Ok(RunSummary {
        dir: dir.to_path_buf(),
        config,
        state,
        steps,
        evals,
    })
}

fn write_state(run: &Path, state: &RunState) -> Result<(), RfftError> {
    let text = serde_json::to_string(state).map_err(|e| RfftError::Train(e.to_string()))?;
    write_atomic(&run.join("state.json"), text.as_bytes()).map_err(|e| io_err(run, e))
}

fn append_metric(path: &Path, ev: &RfftEvent) -> Result<(), RfftError> {
    let v = serde_json::to_value(ev).map_err(|e| RfftError::Train(e.to_string()))?;
    append_jsonl(path, &v).map_err(|e| io_err(path, e))
}

/// Keep the metric lines of steps <= `step` (resume: no gap, no duplicate).
fn truncate_metrics(path: &Path, step: usize) -> Result<(), RfftError> {
    crate::pipeline::output::truncate_jsonl_steps(path, step).map_err(|e| io_err(path, e))
}

/// The newest complete checkpoint of a run.
pub fn checkpoint_dir(run: &Path) -> Option<PathBuf> {
    [run.join("checkpoint"), run.join("checkpoint.old")]
        .into_iter()
        .find(|d| d.join("state.json").is_file() && d.join("trainable.bin").is_file())
}

/// Peak resident memory of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

// ---------------------------------------------------------------------------------------------
// Pause / stop
// ---------------------------------------------------------------------------------------------

/// Shared between a running job and its handle.
#[derive(Clone, Debug, Default)]
pub struct RunControl {
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl RunControl {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
    /// Finish the current iteration, write a checkpoint, end with status "stopped".
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// Loading everything
// ---------------------------------------------------------------------------------------------

/// Everything an RFFT run holds on the device.
pub struct Session<AB: AutodiffBackend> {
    pub config: RfftConfig,
    pub models: ResolvedModels,
    pub frozen: Frozen<AB>,
    pub frozen_inner: Frozen<AB::InnerBackend>,
    /// The original ControlNet (frozen): the reference of `cc`/`kl` and the LoRA base.
    pub reference: ControlNetModel<AB>,
    pub reference_inner: ControlNetModel<AB::InnerBackend>,
    pub scheduler: Ddim,
    pub tokenizer: BertTokenizer,
    pub products: Vec<PreparedProduct<AB::InnerBackend>>,
    pub eval_products: Vec<PreparedProduct<AB::InnerBackend>>,
    pub device: AB::Device,
}

impl<AB: AutodiffBackend> Session<AB> {
    pub fn load(config: &RfftConfig, models: &ResolvedModels, dtype: DType, device: &AB::Device) -> Result<Self, RfftError> {
        let m = |e: &dyn std::fmt::Display| RfftError::Models(e.to_string());
        let sd = StableDiffusion::<AB>::load(&models.base, dtype, device)
            .map_err(|e| RfftError::Models(format!("base model {}: {e}", models.base.display())))?;
        let reference = load_controlnet::<AB>(&models.controlnet, dtype, device)
            .map_err(|e| RfftError::Models(format!("ControlNet {}: {e}", models.controlnet.display())))?
            .no_grad();
        let judge = Judge::<AB>::load(models, config.saliency_size, config.depth_size, dtype, device)?;
        let tokenizer = BertTokenizer::from_folder(&models.rfnet)
            .or_else(|first| match &models.text {
                Some(t) => BertTokenizer::from_folder(t),
                None => Err(first),
            })
            .map_err(|e| m(&format!("RFNet tokenizer: {e}")))?;
        let scheduler = Ddim::new(&sd.scheduler, config.sample_steps).map_err(|e| RfftError::Config(e.to_string()))?;
        let frozen = Frozen {
            unet: sd.unet.clone().no_grad(),
            vae: sd.vae.clone().no_grad(),
            vae_scaling: sd.vae_config.scaling_factor as f32,
            judge,
        };
        // the products are prepared once, on the inner backend
        let text_inner = sd.text_encoder.valid();
        let vae_inner = frozen.vae.valid();
        let size = frozen.judge.rfnet_config.input_size;
        let text = (&sd.tokenizer, &text_inner);
        let vae = (&vae_inner, &sd.vae_config);
        let products = prepare_products(&config.products, text, vae, size, config, device)?;
        let eval_products = prepare_products(&config.eval_products, text, vae, size, config, device)?;
        let frozen_inner = frozen.inner();
        Ok(Self {
            config: config.clone(),
            models: models.clone(),
            reference_inner: reference.valid(),
            reference,
            frozen,
            frozen_inner,
            scheduler,
            tokenizer,
            products,
            eval_products,
            device: device.clone(),
        })
    }

    fn settings(&self) -> StepSettings {
        StepSettings {
            guidance: self.config.guidance,
            controlnet_scale: self.config.controlnet_scale,
            reg: self.config.reg,
            beta: self.config.beta,
        }
    }

    /// The draws of one forward pass: products, noise seeds and the chain step.
    pub fn draw(&self, step: usize, micro: usize) -> (Vec<usize>, Vec<u64>, usize) {
        let mix = self
            .config
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add((step as u64) << 16)
            .wrapping_add(micro as u64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix);
        let idx: Vec<usize> = (0..self.config.batch).map(|_| rng.random_range(0..self.products.len())).collect();
        let seeds: Vec<u64> = (0..self.config.batch).map(|_| rng.random::<u32>() as u64).collect();
        let n = self.config.sample_steps;
        let k = n - 1 - rng.random_range(0..self.config.last_steps);
        (idx, seeds, k)
    }

    /// One forward/backward pass (steps 1-5 of the module docs) for the given draws.
    pub fn forward_backward(
        &self,
        cn: &ControlNetModel<AB>,
        cn_inner: &ControlNetModel<AB::InnerBackend>,
        idx: &[usize],
        seeds: &[u64],
        k: usize,
    ) -> Result<(Objective<AB>, AB::Gradients), RfftError> {
        let settings = self.settings();
        let items: Vec<&PreparedProduct<AB::InnerBackend>> = idx.iter().map(|&i| &self.products[i]).collect();
        let max_tokens = self.frozen.judge.rfnet_config.max_caption_tokens;
        let batch = make_batch(&items, seeds, &self.tokenizer, max_tokens, &self.device)?;
        // 1. the chain without gradients, to step k
        let x = chain(&self.frozen_inner.unet, cn_inner, &self.scheduler, &batch, k, &settings, |_, _| {});
        let t = self.scheduler.timesteps()[k];
        // 2-5. with gradients
        let batch = Batch::<AB>::from_inner(batch);
        let obj = objective(
            &self.frozen,
            cn,
            Some(&self.reference),
            &self.scheduler,
            &batch,
            Tensor::from_inner(x),
            t,
            &settings,
        )?;
        let grads = obj.total.clone().div_scalar(self.config.grad_accum as f64).backward();
        Ok((obj, grads))
    }

    /// Generate every eval product x seed with `cn`, judge them, and write the grid.
    pub fn evaluate(&self, cn: &ControlNetModel<AB::InnerBackend>, step: usize, run: &Path) -> Result<EvalMetrics, RfftError> {
        let settings = self.settings();
        let max_tokens = self.frozen.judge.rfnet_config.max_caption_tokens;
        let seeds = &self.config.eval_seeds;
        let mut samples = Vec::new();
        let mut rows: Vec<Vec<RgbImage>> = Vec::new();
        let (mut dist_sum, mut dist_n) = (0.0, 0usize);
        let (mut variety_sum, mut variety_n) = (0.0, 0usize);
        let probe = self.config.sample_steps - self.config.last_steps;
        let frozen = &self.frozen_inner;
        for p in &self.eval_products {
            let items: Vec<&PreparedProduct<AB::InnerBackend>> = seeds.iter().map(|_| p).collect();
            let batch = make_batch(&items, seeds, &self.tokenizer, max_tokens, &self.device)?;
            let mut probe_x = None;
            let x = chain(&frozen.unet, cn, &self.scheduler, &batch, self.config.sample_steps, &settings, |i, x| {
                if i == probe {
                    probe_x = Some(x.clone());
                }
            });
            if let Some(px) = probe_x {
                let t = self.scheduler.timesteps()[probe];
                let a = self.scheduler.alpha_cumprod(t);
                let (u, tx) = cfg_pair(&frozen.unet, cn, px.clone(), t, &batch, settings.controlnet_scale);
                let (ru, rt) = cfg_pair(&frozen.unet, &self.reference_inner, px, t, &batch, settings.controlnet_scale);
                let g_ref = guidance_direction(ru, rt, a);
                let d = norm_per_sample(guidance_direction(u, tx, a) - g_ref.clone()) / norm_per_sample(g_ref);
                let v = to_vec(d.into_data())?;
                dist_sum += v.iter().map(|&x| x as f64).sum::<f64>();
                dist_n += v.len();
            }
            let image = decode_and_paste(frozen, &batch, x);
            let logits = frozen
                .judge
                .logits(image.clone(), batch.rfnet_product.clone(), batch.caption_ids.clone(), batch.caption_mask.clone());
            let probs = to_vec(softmax(logits, 1).into_data())?;
            let images = to_images(image)?;
            let background: Vec<bool> = p.alpha.iter().map(|&a| a < 0.5).collect();
            for i in 0..images.len() {
                for j in i + 1..images.len() {
                    variety_sum += crate::train::rfft_export::rms_distance(&images[i], &images[j], &background);
                    variety_n += 1;
                }
            }
            rows.push(images);
            for (i, &seed) in seeds.iter().enumerate() {
                let mut pr = [0f32; 5];
                pr.copy_from_slice(&probs[i * 5..i * 5 + 5]);
                samples.push(EvalSample {
                    product: p.name.clone(),
                    seed,
                    probs: pr,
                    available: pr[0] >= self.config.threshold,
                });
            }
        }
        let n = samples.len().max(1) as f64;
        let grid = format!("eval/step-{step:06}.png");
        if !rows.is_empty() {
            std::fs::create_dir_all(run.join("eval")).map_err(|e| io_err(&run.join("eval"), e))?;
            save_rgb(&run.join(&grid), &grid_image(&rows), &[]).map_err(|e| io_err(&run.join(&grid), e))?;
        }
        Ok(EvalMetrics {
            step,
            availability_rate: samples.iter().filter(|s| s.available).count() as f64 / n,
            mean_f_ac: samples.iter().map(|s| -(s.probs[0].max(1e-12) as f64).ln()).sum::<f64>() / n,
            grid,
            samples,
            guidance_distance: if dist_n > 0 { dist_sum / dist_n as f64 } else { 0.0 },
            background_variety: if variety_n > 0 { variety_sum / variety_n as f64 } else { 0.0 },
        })
    }
}

fn to_vec(data: TensorData) -> Result<Vec<f32>, RfftError> {
    data.convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| RfftError::Train(format!("{e:?}")))
}

/// [N, 3, H, W] in [0, 1] -> N images.
pub fn to_images<B: Backend>(images: Tensor<B, 4>) -> Result<Vec<RgbImage>, RfftError> {
    let [n, _, h, w] = images.dims();
    let v = to_vec(images.into_data())?;
    let plane = h * w;
    Ok((0..n)
        .map(|k| {
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let i = y as usize * w + x as usize;
                let px = |c: usize| (v[(k * 3 + c) * plane + i] * 255.0).round().clamp(0.0, 255.0) as u8;
                Rgb([px(0), px(1), px(2)])
            })
        })
        .collect())
}

fn grid_image(rows: &[Vec<RgbImage>]) -> RgbImage {
    let (w, h) = rows
        .first()
        .and_then(|r| r.first())
        .map(|i| i.dimensions())
        .unwrap_or((1, 1));
    let cols = rows.iter().map(Vec::len).max().unwrap_or(1) as u32;
    let mut out = RgbImage::from_pixel(cols * w, rows.len() as u32 * h, Rgb([0, 0, 0]));
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            image::imageops::replace(&mut out, img, (c as u32 * w) as i64, (r as u32 * h) as i64);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The training loop
// ---------------------------------------------------------------------------------------------

type Recorder_ = BinFileRecorder<FullPrecisionSettings>;

/// What the LoRA adapters of a run were built on (`checkpoint/lora.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoraInfo {
    pub rank: usize,
    pub scale: f32,
    pub targets: Vec<LoraTarget>,
}

/// Sum of squared gradients of a module's parameters, accumulated on the device in f32 (one
/// readback per step instead of one per parameter tensor: a host sync each, hundreds for a full
/// ControlNet).
struct GradNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> GradNorm<'_, B> {
    /// The total, read back once (0 when no parameter has a gradient).
    fn total(self) -> f64 {
        self.sum.map_or(0.0, scalar)
    }
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let s = g.cast(burn::tensor::FloatDType::F32).powf_scalar(2.0).sum();
            self.sum = Some(match self.sum.take() {
                Some(acc) => acc + s,
                None => s,
            });
        }
    }
}

trait ElemF32 {
    fn elem_f32(self) -> f32;
}
impl<E: burn::tensor::ElementConversion> ElemF32 for E {
    fn elem_f32(self) -> f32 {
        self.elem::<f32>()
    }
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem_f32() as f64
}

/// The part of the ControlNet being trained.
pub trait Trainable<AB: AutodiffBackend>: AutodiffModule<AB> + Clone {
    /// The ControlNet to run this step (with gradients flowing to `self`).
    fn controlnet(&self, reference: &ControlNetModel<AB>) -> ControlNetModel<AB>;
}

impl<AB: AutodiffBackend> Trainable<AB> for ControlNetModel<AB> {
    fn controlnet(&self, _reference: &ControlNetModel<AB>) -> ControlNetModel<AB> {
        self.clone()
    }
}

/// LoRA adapters with their targets (the targets are plain data, not parameters).
#[derive(Module, Debug)]
pub struct LoraControlNet<B: Backend> {
    pub adapters: LoraAdapters<B>,
    #[module(skip)]
    pub info: LoraInfo,
}

impl<AB: AutodiffBackend> Trainable<AB> for LoraControlNet<AB> {
    fn controlnet(&self, reference: &ControlNetModel<AB>) -> ControlNetModel<AB> {
        self.adapters.merged(reference, &self.info.targets, self.info.scale)
    }
}

/// Train (or resume) in `run`. Events go to `emit`; `control` pauses/stops.
pub fn train<B: Backend>(
    config: &RfftConfig,
    models: &ResolvedModels,
    run: &Path,
    resume: bool,
    dtype: DType,
    device: &B::Device,
    control: &RunControl,
    memory: fn() -> Option<u64>,
    emit: &mut dyn FnMut(&RfftEvent),
) -> Result<RunStatus, RfftError> {
    if config.checkpointing {
        type AB<B> = Autodiff<B, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>;
        train_ad::<AB<B>>(config, models, run, resume, dtype, device, control, memory, emit)
    } else {
        train_ad::<Autodiff<B>>(config, models, run, resume, dtype, device, control, memory, emit)
    }
}

#[allow(clippy::too_many_arguments)]
fn train_ad<AB: AutodiffBackend>(
    config: &RfftConfig,
    models: &ResolvedModels,
    run: &Path,
    resume: bool,
    dtype: DType,
    device: &AB::Device,
    control: &RunControl,
    memory: fn() -> Option<u64>,
    emit: &mut dyn FnMut(&RfftEvent),
) -> Result<RunStatus, RfftError> {
    std::fs::create_dir_all(run).map_err(|e| io_err(run, e))?;
    AB::seed(device, config.seed);
    let session = Session::<AB>::load(config, models, dtype, device)?;
    if config.lora_rank == 0 {
        let cn = session.reference.clone().map(&mut RequireGrad);
        run_loop(&session, cn, None, run, resume, control, memory, emit)
    } else {
        let targets = lora_targets::<AB, _>(&session.reference);
        let info = LoraInfo {
            rank: config.lora_rank,
            scale: config.lora_scale(),
            targets,
        };
        let adapters = LoraControlNet {
            adapters: LoraAdapters::init(&info.targets, info.rank, device),
            info: info.clone(),
        };
        run_loop(&session, adapters, Some(&info), run, resume, control, memory, emit)
    }
}

/// Marks every parameter as trainable (the ControlNet was loaded frozen as the reference).
struct RequireGrad;

impl<B: Backend> burn::module::ModuleMapper<B> for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, t, mapper) = param.consume();
        Param::from_mapped_value(id, t.detach().require_grad(), mapper)
    }
}

#[allow(clippy::too_many_arguments)]
fn run_loop<AB: AutodiffBackend, M: Trainable<AB>>(
    session: &Session<AB>,
    mut trainable: M,
    lora: Option<&LoraInfo>,
    run: &Path,
    resume: bool,
    control: &RunControl,
    memory: fn() -> Option<u64>,
    emit: &mut dyn FnMut(&RfftEvent),
) -> Result<RunStatus, RfftError> {
    let config = &session.config;
    let device = &session.device;
    let mut optim = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .init::<AB, M>();
    let metrics = run.join("metrics.jsonl");
    let mut step = 0usize;
    let checkpoint = if resume { resumable_checkpoint(run, config, lora.is_some())? } else { None };
    if let Some(ck) = checkpoint {
        let rec = Recorder_::new();
        trainable = trainable
            .load_file(ck.join("trainable"), &rec, device)
            .map_err(|e| corrupt_checkpoint(&ck.join("trainable.bin"), &e))?;
        let orec = rec
            .load(ck.join("optimizer"), device)
            .map_err(|e| corrupt_checkpoint(&ck.join("optimizer.bin"), &e))?;
        optim = optim.load_record(orec);
        let st: RunState = std::fs::read_to_string(ck.join("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .ok_or_else(|| RfftError::Train(format!("{}: unreadable state.json", ck.display())))?;
        step = st.step;
        truncate_metrics(&metrics, step)?;
    } else {
        let _ = std::fs::remove_file(&metrics);
        let _ = std::fs::remove_dir_all(run.join("checkpoint"));
        let _ = std::fs::remove_dir_all(run.join("checkpoint.old"));
        let _ = std::fs::remove_dir_all(run.join("eval"));
    }
    let toml = config.absolutized().to_toml()?;
    write_atomic(&run.join("run.toml"), toml.as_bytes()).map_err(|e| io_err(run, e))?;
    let mut state = RunState::new(step, RunStatus::Running);
    write_state(run, &state)?;
    let evaluate = |m: &M, step: usize, emit: &mut dyn FnMut(&RfftEvent)| -> Result<(), RfftError> {
        if session.eval_products.is_empty() {
            return Ok(());
        }
        let cn = m.controlnet(&session.reference).valid();
        let ev = RfftEvent::Eval(session.evaluate(&cn, step, run)?);
        append_metric(&metrics, &ev)?;
        emit(&ev);
        Ok(())
    };
    if step == 0 {
        evaluate(&trainable, 0, emit)?;
    }
    let mut last_checkpoint = step;
    let mut stopped = false;
    while step < config.steps {
        // pause between iterations
        if control.is_paused() && !control.is_stopped() {
            state.status = RunStatus::Paused;
            write_state(run, &state)?;
            emit(&RfftEvent::Paused { step });
            while control.is_paused() && !control.is_stopped() {
                std::thread::sleep(Duration::from_millis(50));
            }
            state.status = RunStatus::Running;
            write_state(run, &state)?;
            emit(&RfftEvent::Resumed { step });
        }
        if control.is_stopped() {
            stopped = true;
            break;
        }
        let start = Instant::now();
        let cn = trainable.controlnet(&session.reference);
        let cn_inner = cn.valid();
        let mut accum = GradientsAccumulator::<M>::new();
        let (mut f_ac, mut reg, mut total) = (0.0, 0.0, 0.0);
        for micro in 0..config.grad_accum {
            let (idx, seeds, k) = session.draw(step, micro);
            let (obj, grads) = session.forward_backward(&cn, &cn_inner, &idx, &seeds, k)?;
            f_ac += scalar(obj.f_ac);
            reg += scalar(obj.reg);
            total += scalar(obj.total);
            accum.accumulate(&trainable, GradientsParams::from_grads(grads, &trainable));
        }
        let grads = accum.grads();
        let grad_sq = {
            let mut norm = GradNorm::<AB> { grads: &grads, sum: None };
            trainable.visit(&mut norm);
            norm.total()
        };
        let k = config.grad_accum as f64;
        if !(total.is_finite() && grad_sq.is_finite()) {
            return Err(RfftError::Train(format!(
                "step {}: the loss or the gradients are not finite (total {total}); try a lower lr or --dtype f32",
                step + 1
            )));
        }
        trainable = optim.step(config.lr, trainable, grads);
        step += 1;
        let ev = RfftEvent::Step(StepMetrics {
            step,
            f_ac: f_ac / k,
            reg: reg / k,
            total: total / k,
            grad_norm: grad_sq.sqrt(),
            step_time_s: start.elapsed().as_secs_f64(),
            memory_bytes: memory(),
            lr: config.lr,
        });
        append_metric(&metrics, &ev)?;
        emit(&ev);
        state.step = step;
        write_state(run, &state)?;
        if step % config.eval_every == 0 || step == config.steps {
            evaluate(&trainable, step, emit)?;
        }
        if step % config.checkpoint_every == 0 || step == config.steps || control.is_stopped() {
            save_checkpoint(run, &trainable, &optim, lora, step)?;
            last_checkpoint = step;
            emit(&RfftEvent::Checkpoint {
                step,
                dir: run.join("checkpoint"),
            });
        }
    }
    if last_checkpoint != step {
        save_checkpoint(run, &trainable, &optim, lora, step)?;
        emit(&RfftEvent::Checkpoint {
            step,
            dir: run.join("checkpoint"),
        });
    }
    state = RunState::new(
        step,
        if stopped || (control.is_stopped() && step < config.steps) {
            RunStatus::Stopped
        } else {
            RunStatus::Finished
        },
    );
    write_state(run, &state)?;
    emit(&RfftEvent::Finished {
        step,
        status: state.status,
    });
    Ok(state.status)
}

/// The checkpoint `--resume` continues from, after checking that it can: `None` when the run
/// ended before its first checkpoint (it starts again from step 0, with a warning); an error
/// when the folder is not a run, or when the configuration differs from the run's own in more
/// than `RESUMABLE_CHANGES` (each difference named), or when the checkpoint holds the other kind
/// of trainable (full ControlNet vs LoRA adapters).
fn resumable_checkpoint(run: &Path, config: &RfftConfig, lora: bool) -> Result<Option<PathBuf>, RfftError> {
    let run_toml = run.join("run.toml");
    let Ok(text) = std::fs::read_to_string(&run_toml) else {
        return Err(RfftError::Config(format!(
            "{}: nothing to resume: not an RFFT run folder (no run.toml)",
            run.display()
        )));
    };
    let started: RfftConfig = toml::from_str(&text)
        .map_err(|e| RfftError::Config(format!("{}: the run's configuration is unreadable: {e}", run_toml.display())))?;
    let changes = started.changes_to(&config.absolutized());
    let refused: Vec<String> = changes
        .iter()
        .filter(|(key, ..)| !super::rfft_config::RESUMABLE_CHANGES.contains(&key.as_str()))
        .map(|(key, was, now)| format!("{key}: {was} -> {now}"))
        .collect();
    if !refused.is_empty() {
        return Err(RfftError::Config(format!(
            "{}: resuming with a different configuration would make it another experiment ({}); resume without --config to continue it as it was, or start a new run folder (only {} may change)",
            run.display(),
            refused.join("; "),
            super::rfft_config::RESUMABLE_CHANGES.join(", ")
        )));
    }
    for (key, was, now) in &changes {
        tracing::warn!("resuming {} with {key} = {now} (was {was})", run.display());
    }
    let Some(ck) = checkpoint_dir(run) else {
        tracing::warn!(
            "{}: the run ended before its first checkpoint; starting it again from step 0",
            run.display()
        );
        return Ok(None);
    };
    let has_lora = ck.join("lora.json").is_file();
    if has_lora != lora {
        let kind = |l: bool| if l { "LoRA adapters" } else { "the full ControlNet" };
        return Err(RfftError::Config(format!(
            "{}: the checkpoint holds {}, the configuration trains {}",
            ck.display(),
            kind(has_lora),
            kind(lora)
        )));
    }
    Ok(Some(ck))
}

/// A checkpoint file that cannot be read back: say which file and how to recover, without
/// burn's debug dump of the decoder state.
fn corrupt_checkpoint(file: &Path, e: &burn::record::RecorderError) -> RfftError {
    // burn's errors nest debug dumps of the decoder state; keep only what a user can act on.
    let text = format!("{e:?}");
    let what = if text.contains("UnexpectedEof") {
        "it ends early (truncated)"
    } else if text.contains("NotFound") {
        "it is missing"
    } else {
        "its contents do not decode"
    };
    RfftError::Config(format!(
        "{}: the checkpoint is corrupt or truncated: {what}; restore it, or delete the run's checkpoint folder to start again from step 0",
        file.display()
    ))
}

/// Write the checkpoint folder atomically: `checkpoint.tmp` -> `checkpoint` (the previous one is
/// `checkpoint.old` for the moment between the two renames).
fn save_checkpoint<AB: AutodiffBackend, M: Trainable<AB>, O: Optimizer<M, AB>>(
    run: &Path,
    trainable: &M,
    optim: &O,
    lora: Option<&LoraInfo>,
    step: usize,
) -> Result<(), RfftError> {
    let tmp = run.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    let rec = Recorder_::new();
    trainable
        .clone()
        .save_file(tmp.join("trainable"), &rec)
        .map_err(|e| io_err(&tmp, e))?;
    rec.record(optim.to_record(), tmp.join("optimizer"))
        .map_err(|e| io_err(&tmp, e))?;
    if let Some(info) = lora {
        let text = serde_json::to_string_pretty(info).map_err(|e| RfftError::Train(e.to_string()))?;
        write_atomic(&tmp.join("lora.json"), text.as_bytes()).map_err(|e| io_err(&tmp, e))?;
    }
    write_state(&tmp, &RunState::new(step, RunStatus::Running))?;
    let fin = run.join("checkpoint");
    let old = run.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if fin.exists() {
        std::fs::rename(&fin, &old).map_err(|e| io_err(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| io_err(&fin, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The fine-tuned ControlNet of a run's checkpoint (LoRA adapters merged), on backend `B`.
pub fn load_finetuned<B: Backend>(run: &Path, models: &ResolvedModels, dtype: DType, device: &B::Device) -> Result<ControlNetModel<B>, RfftError> {
    let ck = checkpoint_dir(run).ok_or_else(|| RfftError::Config(format!("{}: no checkpoint in this run folder", run.display())))?;
    let base = load_controlnet::<B>(&models.controlnet, dtype, device)
        .map_err(|e| RfftError::Models(format!("ControlNet {}: {e}", models.controlnet.display())))?;
    let rec = Recorder_::new();
    let corrupt = |e: &dyn std::fmt::Display| RfftError::Train(format!("{}: corrupt checkpoint: {e}", ck.display()));
    match std::fs::read_to_string(ck.join("lora.json")) {
        Ok(text) => {
            let info: LoraInfo = serde_json::from_str(&text).map_err(|e| corrupt(&e))?;
            let module = LoraControlNet {
                adapters: LoraAdapters::<B>::init(&info.targets, info.rank, device),
                info: info.clone(),
            };
            let module = module.load_file(ck.join("trainable"), &rec, device).map_err(|e| corrupt(&e))?;
            Ok(module.adapters.merged(&base, &info.targets, info.scale))
        }
        Err(_) => base.load_file(ck.join("trainable"), &rec, device).map_err(|e| corrupt(&e)),
    }
}

// ---------------------------------------------------------------------------------------------
// The job API (GUI) and the backend dispatch
// ---------------------------------------------------------------------------------------------

/// A running RFFT job on a worker thread.
pub struct RfftJob {
    pub events: Receiver<RfftEvent>,
    control: RunControl,
    finished: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RfftJob {
    pub fn pause(&self) {
        self.control.pause();
    }
    pub fn resume(&self) {
        self.control.resume();
    }
    /// Finish the current iteration, write a checkpoint, end with status "stopped".
    pub fn stop(&self) {
        self.control.stop();
    }
    /// The worker has ended (its last event was `Finished` or `Failed`).
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }
    /// Wait for the worker thread.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `train` on the selected backend.
pub struct TrainJob {
    pub config: RfftConfig,
    pub models: ResolvedModels,
    pub run: PathBuf,
    pub resume: bool,
    pub precision: Precision,
    pub control: RunControl,
    pub memory: fn() -> Option<u64>,
    pub emit: Box<dyn FnMut(&RfftEvent) + Send>,
}

impl BackendJob for TrainJob {
    type Output = Result<RunStatus, RfftError>;
    fn run<B: Backend>(mut self, device: B::Device) -> Self::Output {
        let result = train::<B>(
            &self.config,
            &self.models,
            &self.run,
            self.resume,
            self.precision.dtype(),
            &device,
            &self.control,
            self.memory,
            &mut *self.emit,
        );
        if let Err(e) = &result {
            let step = std::fs::read_to_string(self.run.join("state.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<RunState>(&t).ok())
                .map(|s| s.step)
                .unwrap_or(0);
            let _ = write_state(
                &self.run,
                &RunState {
                    error: Some(e.to_string()),
                    ..RunState::new(step, RunStatus::Failed)
                },
            );
        }
        result
    }
}

/// Model folders for a config: its `models` entries, else the default manifest's roles.
pub fn resolve_models(config: &RfftConfig, manifest_dir: &Path) -> Result<ResolvedModels, RfftError> {
    let manifest = crate::models::manifest::Manifest::load(manifest_dir).ok();
    let lookup = |role: &str| -> Option<PathBuf> {
        let m = manifest.as_ref()?;
        let role = crate::models::manifest::Role::ALL.iter().find(|r| r.name() == role)?;
        m.path(*role).map(Path::to_path_buf)
    };
    config.models.resolve(&lookup)
}

/// Start (or resume) an RFFT run on a worker thread. Model folders come from the config's
/// `models` table, else from `models/models.toml`.
pub fn spawn_rfft(config: RfftConfig, run_dir: PathBuf, resume: bool, device: DeviceRequest, precision: Precision) -> RfftJob {
    spawn_rfft_with(config, run_dir, resume, device, precision, PathBuf::from("models"))
}

/// `spawn_rfft` with another manifest folder.
pub fn spawn_rfft_with(config: RfftConfig, run_dir: PathBuf, resume: bool, device: DeviceRequest, precision: Precision, manifest_dir: PathBuf) -> RfftJob {
    let (tx, rx): (Sender<RfftEvent>, Receiver<RfftEvent>) = channel();
    let control = RunControl::new();
    let finished = Arc::new(AtomicBool::new(false));
    let (ctl, fin) = (control.clone(), finished.clone());
    let thread = std::thread::spawn(move || {
        // Whatever happens below (a panic included), the job reads as finished afterwards.
        struct Finished(Arc<AtomicBool>);
        impl Drop for Finished {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _finished = Finished(fin);
        let fail = |tx: &Sender<RfftEvent>, error: String| {
            let _ = write_state(
                &run_dir,
                &RunState {
                    error: Some(error.clone()),
                    ..RunState::new(0, RunStatus::Failed)
                },
            );
            let _ = tx.send(RfftEvent::Failed { step: 0, error });
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), String> {
            config.validate().map_err(|e| format!("run.toml: {e}"))?;
            let models = resolve_models(&config, &manifest_dir).map_err(|e| e.to_string())?;
            let selection = crate::device::select(device).map_err(|e| e.to_string())?;
            crate::pipeline::generate::check_memory(
                &format!("an RFFT iteration at image_size = {} with batch = {}", config.image_size, config.batch),
                config.memory_bytes(precision.element_bytes()),
                crate::device::memory_budget_bytes(&selection),
            )?;
            let memory: fn() -> Option<u64> = if selection.backend == crate::device::BackendKind::Cpu {
                peak_rss_bytes
            } else {
                || None
            };
            let events = tx.clone();
            let job = TrainJob {
                config: config.clone(),
                models,
                run: run_dir.clone(),
                resume,
                precision,
                control: ctl,
                memory,
                emit: Box::new(move |e: &RfftEvent| {
                    let _ = events.send(e.clone());
                }),
            };
            match crate::device::dispatch(&selection, precision, job) {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => {
                    let step = std::fs::read_to_string(run_dir.join("state.json"))
                        .ok()
                        .and_then(|t| serde_json::from_str::<RunState>(&t).ok())
                        .map(|s| s.step)
                        .unwrap_or(0);
                    let _ = tx.send(RfftEvent::Failed { step, error: e.to_string() });
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        }))
        .unwrap_or_else(|p| Err(format!("the RFFT worker stopped unexpectedly: {}", crate::device::panic_message(p.as_ref()))));
        if let Err(e) = outcome {
            fail(&tx, e);
        }
    });
    RfftJob {
        events: rx,
        control,
        finished,
        thread: Some(thread),
    }
}

// ---------------------------------------------------------------------------------------------
// Timing one iteration (`rfstudio bench rfft`)
// ---------------------------------------------------------------------------------------------

/// Timings of RFFT iterations (milliseconds unless named otherwise).
#[derive(Clone, Debug, Default, Serialize)]
pub struct IterationTimes {
    /// One no-gradient chain step (CFG pair through ControlNet + UNet, DDIM, blend).
    pub chain_step_ms: f64,
    /// The gradient step's forward (ControlNet + UNet pair, decode, DPT, U2-Net, RFNet, reg).
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// A whole iteration: the chain to the middle of the last-steps window, forward, backward,
    /// optimizer step (mean over the timed iterations).
    pub iteration_s: f64,
    pub trainable_params: usize,
    /// Peak resident memory of the process (CPU backend only).
    pub peak_memory_bytes: Option<u64>,
}

fn sync<B: Backend>(device: &B::Device) {
    let _ = B::sync(device);
}

/// Time `iters` RFFT iterations (after one warm-up) on a synthetic batch: the full ControlNet
/// when `lora_rank` is 0, else LoRA adapters. Models must be frozen (`no_grad`) except the
/// reference ControlNet, which is copied as the trainable one.
#[allow(clippy::too_many_arguments)]
pub fn time_iterations<AB: AutodiffBackend>(
    frozen: &Frozen<AB>,
    reference: &ControlNetModel<AB>,
    scheduler: &Ddim,
    batch: &Batch<AB::InnerBackend>,
    settings: &StepSettings,
    lora_rank: usize,
    iters: usize,
    memory: fn() -> Option<u64>,
    device: &AB::Device,
) -> Result<IterationTimes, RfftError> {
    let reference = reference.clone().no_grad();
    if lora_rank == 0 {
        let cn = reference.clone().map(&mut RequireGrad);
        time_loop(frozen, &reference, cn, scheduler, batch, settings, iters, memory, device)
    } else {
        let targets = lora_targets::<AB, _>(&reference);
        let m = LoraControlNet {
            adapters: LoraAdapters::init(&targets, lora_rank, device),
            info: LoraInfo {
                rank: lora_rank,
                scale: 1.0,
                targets,
            },
        };
        time_loop(frozen, &reference, m, scheduler, batch, settings, iters, memory, device)
    }
}

#[allow(clippy::too_many_arguments)]
fn time_loop<AB: AutodiffBackend, M: Trainable<AB>>(
    frozen: &Frozen<AB>,
    reference: &ControlNetModel<AB>,
    mut trainable: M,
    scheduler: &Ddim,
    batch: &Batch<AB::InnerBackend>,
    settings: &StepSettings,
    iters: usize,
    memory: fn() -> Option<u64>,
    device: &AB::Device,
) -> Result<IterationTimes, RfftError> {
    let frozen_inner = frozen.inner();
    let mut optim = AdamWConfig::new().with_weight_decay(1e-2).init::<AB, M>();
    let steps = scheduler.timesteps().len();
    let k = steps.saturating_sub(5).min(steps - 1);
    let t = scheduler.timesteps()[k];
    let mut times = IterationTimes {
        trainable_params: trainable.num_params(),
        ..Default::default()
    };
    let ms = |s: Instant| s.elapsed().as_secs_f64() * 1e3;
    for it in 0..=iters.max(1) {
        let timed = it > 0;
        let whole = Instant::now();
        let cn = trainable.controlnet(reference);
        let cn_inner = cn.valid();
        // the chain: time one step, then run the rest
        let s = Instant::now();
        let x1 = chain(&frozen_inner.unet, &cn_inner, scheduler, batch, 1, settings, |_, _| {});
        let _ = x1.into_data();
        let one = ms(s);
        let x = chain(&frozen_inner.unet, &cn_inner, scheduler, batch, k, settings, |_, _| {});
        sync::<AB::InnerBackend>(device);
        let b = Batch::<AB>::from_inner(batch.clone());
        let s = Instant::now();
        let obj = objective(frozen, &cn, Some(reference), scheduler, &b, Tensor::from_inner(x), t, settings)?;
        let total = obj.total.clone();
        let _ = total.clone().into_data();
        let fwd = ms(s);
        let s = Instant::now();
        let grads = total.backward();
        let grads = GradientsParams::from_grads(grads, &trainable);
        sync::<AB>(device);
        let bwd = ms(s);
        let s = Instant::now();
        trainable = optim.step(1e-5, trainable, grads);
        sync::<AB>(device);
        let opt = ms(s);
        if timed {
            let n = iters.max(1) as f64;
            times.chain_step_ms += one / n;
            times.forward_ms += fwd / n;
            times.backward_ms += bwd / n;
            times.optimizer_ms += opt / n;
            times.iteration_s += whole.elapsed().as_secs_f64() / n;
        }
    }
    times.peak_memory_bytes = memory();
    Ok(times)
}

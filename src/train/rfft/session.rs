//! Everything an RFFT run holds on the device, the draws of an iteration, one forward/backward
//! pass, and the evaluation (generation of the eval products with the current ControlNet, judged
//! by the pipeline's judge).

use std::path::Path;

use burn::module::{AutodiffModule, Module};
use burn::tensor::activation::softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorData};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};

use super::config::{ResolvedModels, RfftConfig};
use super::error::{RfftError, io_err};
use super::objective::{Batch, Frozen, Objective, StepSettings, guidance_direction, norm_per_sample, objective};
use super::products::{PreparedProduct, make_batch, prepare_products};
use crate::train::run_folder::{EvalMetrics, EvalSample, RunFiles};
use crate::models::controlnet::ControlNetModel;
use crate::pipeline::image_io::tensor_to_rgb;
use crate::pipeline::judge::{Judge, JudgePaths, JudgeSides};
use crate::pipeline::output::save_rgb;
use crate::pipeline::sampler;
use crate::pipeline::scheduler::{Ddim, Scheduler};
use crate::pipeline::sd::{StableDiffusion, load_controlnet};

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
    pub products: Vec<PreparedProduct<AB::InnerBackend>>,
    pub eval_products: Vec<PreparedProduct<AB::InnerBackend>>,
    pub device: AB::Device,
}

impl<AB: AutodiffBackend> Session<AB> {
    pub fn load(config: &RfftConfig, models: &ResolvedModels, dtype: DType, device: &AB::Device) -> Result<Self, RfftError> {
        let sd = StableDiffusion::<AB>::load(&models.base, dtype, device)
            .map_err(|e| RfftError::Models(format!("base model {}: {e}", models.base.display())))?;
        let reference = load_controlnet::<AB>(&models.controlnet, dtype, device)
            .map_err(|e| RfftError::Models(format!("ControlNet {}: {e}", models.controlnet.display())))?
            .no_grad();
        let judge = Judge::<AB>::load(
            &JudgePaths {
                depth: models.depth.clone(),
                saliency: models.saliency.clone(),
                rfnet: models.rfnet.clone(),
                text: models.text.clone(),
            },
            JudgeSides {
                depth: config.depth_size,
                saliency: config.saliency_size,
            },
            dtype,
            device,
        )
        .map_err(|e| RfftError::Models(e.to_string()))?;
        let scheduler = Ddim::new(&sd.scheduler, config.sample_steps).map_err(|e| RfftError::Config(e.to_string()))?;
        let frozen = Frozen {
            unet: sd.unet.clone().no_grad(),
            vae: sd.vae.clone().no_grad(),
            vae_scaling: sd.vae_config.scaling_factor,
            judge,
        };
        // the products are prepared once, on the inner backend
        let frozen_inner = frozen.inner();
        let text_inner = sd.text_encoder.valid();
        let text = (&sd.tokenizer, &text_inner);
        let vae = (&frozen_inner.vae, &sd.vae_config);
        let judge = &frozen_inner.judge;
        let products = prepare_products(&config.products, text, vae, judge, config, device)?;
        let eval_products = prepare_products(&config.eval_products, text, vae, judge, config, device)?;
        Ok(Self {
            config: config.clone(),
            models: models.clone(),
            reference_inner: reference.valid(),
            reference,
            frozen,
            frozen_inner,
            scheduler,
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
        let batch = make_batch(&items, seeds, &self.frozen_inner.judge, &self.device)?;
        // 1. the chain without gradients, to step k
        let start = batch.inpaint.start(&self.scheduler);
        let x = batch.chain(&self.frozen_inner.unet, cn_inner, &self.scheduler, 0..k, start, &settings)?;
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
        let seeds = &self.config.eval_seeds;
        let mut samples = Vec::new();
        let mut rows: Vec<Vec<RgbImage>> = Vec::new();
        let (mut dist_sum, mut dist_n) = (0.0, 0usize);
        let (mut variety_sum, mut variety_n) = (0.0, 0usize);
        let probe = self.config.sample_steps - self.config.last_steps;
        let frozen = &self.frozen_inner;
        for p in &self.eval_products {
            let items: Vec<&PreparedProduct<AB::InnerBackend>> = seeds.iter().map(|_| p).collect();
            let batch = make_batch(&items, seeds, &frozen.judge, &self.device)?;
            // the chain to the probe step (where the guidance distance is measured), then on
            let start = batch.inpaint.start(&self.scheduler);
            let px = batch.chain(&frozen.unet, cn, &self.scheduler, 0..probe, start, &settings)?;
            {
                let t = self.scheduler.timesteps()[probe];
                let a = self.scheduler.alpha_cumprod(t);
                let pair = |model| sampler::cfg_pair(&frozen.unet, Some(model), &batch.cond, px.clone(), t, settings.controlnet_scale);
                let (u, tx) = pair(cn)?;
                let (ru, rt) = pair(&self.reference_inner)?;
                let g_ref = guidance_direction(ru, rt, a);
                let d = norm_per_sample(guidance_direction(u, tx, a) - g_ref.clone()) / norm_per_sample(g_ref);
                let v = to_vec(d.into_data())?;
                dist_sum += v.iter().map(|&x| x as f64).sum::<f64>();
                dist_n += v.len();
            }
            let x = batch.chain(&frozen.unet, cn, &self.scheduler, probe..self.config.sample_steps, px, &settings)?;
            let image = batch.decode_and_paste(frozen, x);
            let probs = to_vec(softmax(batch.judge(frozen, image.clone()), 1).into_data())?;
            let images = tensor_to_rgb(image);
            let background: Vec<bool> = p.placed.rgba.pixels().map(|px| px[3] < 128).collect();
            for i in 0..images.len() {
                for j in i + 1..images.len() {
                    variety_sum += rms_distance(&images[i], &images[j], &background);
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
        let grid = RunFiles::eval_grid(step);
        if !rows.is_empty() {
            let eval_dir = RunFiles::eval_dir(run);
            std::fs::create_dir_all(&eval_dir).map_err(|e| io_err(&eval_dir, e))?;
            save_rgb(&run.join(&grid), &grid_image(&rows), &[]).map_err(|e| io_err(&run.join(&grid), e))?;
        }
        Ok(EvalMetrics {
            step,
            availability_rate: samples.iter().filter(|s| s.available).count() as f64 / n,
            mean_f_ac: samples.iter().map(|s| -(s.probs[0].max(1e-12) as f64).ln()).sum::<f64>() / n,
            grid,
            grid_columns: Some(seeds.len()),
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

/// RMS difference of two images over the masked pixels, in [0, 1] units.
pub fn rms_distance(a: &RgbImage, b: &RgbImage, mask: &[bool]) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for ((pa, pb), &m) in a.pixels().zip(b.pixels()).zip(mask) {
        if m {
            for c in 0..3 {
                let d = (pa[c] as f64 - pb[c] as f64) / 255.0;
                sum += d * d;
            }
            n += 3;
        }
    }
    if n == 0 { 0.0 } else { (sum / n as f64).sqrt() }
}

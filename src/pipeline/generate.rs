//! The ad-image generator and recurrent generation (PAPER.md "Generation" and "Recurrent
//! generation with RFNet"), used by both the CLI and the GUI:
//!
//! placed product -> CLIP prompt pair -> DDIM (40 steps, CFG 7.5, ControlNet 1.0) with the latent
//! blend of eq. (2) after every step -> VAE decode -> paste the product back -> score -> repeat
//! with new seeds until P(Available) >= threshold or the attempts run out.
//!
//! The job API: `run_generation` emits `GenEvent`s (per-step latent previews, finished attempts)
//! through a callback and stops within one step when its `CancelToken` is set; `spawn_generation`
//! runs it on a worker thread and delivers the events through a channel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::output::{OutputError, append_jsonl, ensure_writable_dir, save_gray, save_rgb, save_rgba, write_atomic};
use super::product::{Placement, PlacedProduct, ProductError, place_file};
use super::scheduler::Ddim;
use super::score::{ClassProbs, ScoreError, Scorer};
use super::image_io::tensor_to_rgb;
use super::sampler::{self, Conditioning, Inpaint, SampleParams};
use super::sd::{SdError, StableDiffusion, diffusers_weights, load_controlnet};
use crate::device::{BackendJob, DeviceError, Precision, Selection, dispatch};
use crate::models::controlnet::ControlNetModel;

#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error(transparent)]
    Product(#[from] ProductError),
    #[error("{0}")]
    Models(#[source] SdError),
    #[error("{0}")]
    Sampling(#[source] SdError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(transparent)]
    NonFinite(crate::models::weights::NonFiniteOutput),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("invalid setting: {0}")]
    Params(String),
    #[error("cancelled")]
    Cancelled,
    /// The worker panicked (a bug); the job ends with this instead of never ending.
    #[error("the generation worker stopped unexpectedly: {0}")]
    Panicked(String),
}

/// Everything a generation run is asked to do (the CLI flags and the GUI form).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative: String,
    /// Product title (the caption RFNet reads).
    pub title: String,
    /// Seed of the first attempt; attempt i uses seed + i. Random when None.
    pub seed: Option<u64>,
    pub steps: usize,
    pub guidance: f32,
    pub controlnet_scale: f32,
    pub scale: f32,
    pub position: (f32, f32),
    pub canvas: u32,
    pub white_bg: bool,
    /// The most candidates to generate.
    pub attempts: usize,
    /// Stop when P(Available) reaches this.
    pub threshold: f32,
    /// Candidates per forward pass.
    pub batch: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative: String::new(),
            title: String::new(),
            seed: None,
            steps: 40,
            guidance: 7.5,
            controlnet_scale: 1.0,
            scale: 0.7,
            position: (0.5, 0.5),
            canvas: 512,
            white_bg: false,
            attempts: 4,
            threshold: 0.5,
            batch: 1,
        }
    }
}

/// The largest canvas side generation and RFFT accept (SD 1.5 is trained at 512; 2048 already
/// needs ~270 GB for one attention matrix in the matmul form).
pub const MAX_CANVAS: u32 = 2048;
/// Classifier-free guidance scales accepted (A1111 offers 1-30; 0 turns the prompt off).
pub const GUIDANCE_RANGE: std::ops::RangeInclusive<f32> = 0.0..=30.0;
/// ControlNet conditioning scales accepted (A1111 and ComfyUI offer 0-2).
pub const CONTROLNET_SCALE_RANGE: std::ops::RangeInclusive<f32> = 0.0..=2.0;
/// The most candidates per forward pass and attempts per product.
pub const MAX_BATCH: usize = 64;
pub const MAX_ATTEMPTS: usize = 1000;

/// The sampling settings generation and RFFT share, checked in one place. `Err` says which
/// setting is out of range and what the range is.
pub fn check_sampling(guidance: f32, controlnet_scale: f32, canvas: u32) -> Result<(), String> {
    if !GUIDANCE_RANGE.contains(&guidance) {
        return Err(format!(
            "guidance {guidance} must be between {} and {}",
            GUIDANCE_RANGE.start(),
            GUIDANCE_RANGE.end()
        ));
    }
    if !CONTROLNET_SCALE_RANGE.contains(&controlnet_scale) {
        return Err(format!(
            "ControlNet scale {controlnet_scale} must be between {} and {}",
            CONTROLNET_SCALE_RANGE.start(),
            CONTROLNET_SCALE_RANGE.end()
        ));
    }
    if canvas < 64 || canvas % 64 != 0 || canvas > MAX_CANVAS {
        return Err(format!(
            "size {canvas} must be a multiple of 64 between 64 and {MAX_CANVAS}"
        ));
    }
    Ok(())
}

/// Device memory one generation pass needs at most, estimated before anything is allocated:
/// the largest attention-score tensor (the UNet's first self-attention in the matmul form: CFG
/// pair x 8 heads x tokens^2, tokens = (canvas / 8)^2) plus the full-resolution VAE activations
/// (128 channels, a few live at once) and 2.5 GB of SD 1.5 + ControlNet weights.
pub fn generation_memory_bytes(canvas: u32, batch: usize, element_bytes: usize) -> u64 {
    let tokens = (canvas as u64 / 8).pow(2);
    let attention = 2 * batch as u64 * 8 * tokens * tokens * element_bytes as u64;
    let vae = 4 * 128 * (canvas as u64).pow(2) * element_bytes as u64 * batch as u64;
    attention + vae + 2_500_000_000
}

/// Refuse a job whose estimated memory exceeds what the device can give (`budget`, e.g. the
/// host's available memory for the CPU backend; None when unknown), naming both numbers.
pub fn check_memory(what: &str, needed: u64, budget: Option<u64>) -> Result<(), String> {
    match budget {
        Some(avail) if needed > avail => Err(format!(
            "{what} needs about {} of memory, more than the {} this device has available; use a smaller size or batch",
            crate::models::manifest::human_bytes(needed),
            crate::models::manifest::human_bytes(avail)
        )),
        _ => Ok(()),
    }
}

impl GenerateParams {
    pub fn validate(&self) -> Result<(), GenError> {
        let bad = |m: String| Err(GenError::Params(m));
        if self.steps == 0 || self.steps > 1000 {
            return bad(format!("--steps {} must be between 1 and 1000", self.steps));
        }
        if self.attempts == 0 || self.attempts > MAX_ATTEMPTS {
            return bad(format!("--attempts {} must be between 1 and {MAX_ATTEMPTS}", self.attempts));
        }
        if self.batch == 0 || self.batch > MAX_BATCH {
            return bad(format!("--batch {} must be between 1 and {MAX_BATCH}", self.batch));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return bad(format!("--threshold {} must be between 0 and 1", self.threshold));
        }
        check_sampling(self.guidance, self.controlnet_scale, self.canvas).map_err(GenError::Params)?;
        if !(0.05..=1.0).contains(&self.scale) {
            return bad(format!("--scale {} must be between 0.05 and 1.0", self.scale));
        }
        let (px, py) = self.position;
        if !(0.0..=1.0).contains(&px) || !(0.0..=1.0).contains(&py) {
            return bad(format!("--position {px},{py} must be fractions of the canvas between 0 and 1"));
        }
        Ok(())
    }

    /// `validate` plus the memory check against `budget` (see `check_memory`).
    pub fn validate_for(&self, budget: Option<u64>, element_bytes: usize) -> Result<(), GenError> {
        self.validate()?;
        let needed = generation_memory_bytes(self.canvas, self.batch.min(self.attempts), element_bytes);
        check_memory(
            &format!("generating at {0}x{0} with --batch {1}", self.canvas, self.batch.min(self.attempts)),
            needed,
            budget,
        )
        .map_err(GenError::Params)
    }

    fn placement(&self) -> Placement {
        Placement {
            canvas: self.canvas,
            scale: self.scale,
            position: self.position,
            white_bg: self.white_bg,
        }
    }
}

/// Set from any thread to stop a job within one denoising step.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// One finished candidate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1-based.
    pub attempt: usize,
    pub seed: u64,
    pub file: String,
    /// None when no scorer (RFNet) was available.
    pub probs: Option<ClassProbs>,
    pub available: Option<bool>,
    pub seconds: f64,
    pub test_weights: bool,
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    pub out_dir: PathBuf,
    pub attempts: Vec<AttemptRecord>,
    /// Index into `attempts` of the chosen image (written as best.png).
    pub best: usize,
    /// Whether the best image reached the threshold; None when unscored.
    pub available: Option<bool>,
    pub scorer: Option<String>,
    pub test_weights: bool,
}

/// Progress reported while a job runs.
#[derive(Clone, Debug)]
pub enum GenEvent {
    Started {
        out_dir: PathBuf,
        attempts: usize,
        steps: usize,
        seed: u64,
        test_weights: bool,
    },
    /// After each denoising step of a batch whose first attempt is `attempt` (1-based).
    Step {
        attempt: usize,
        batch: usize,
        step: usize,
        total: usize,
        /// Cheap preview of the predicted clean image (latent resolution), see `latent_preview`.
        preview: RgbImage,
    },
    Attempt(AttemptRecord),
    Finished(RunSummary),
}

/// SD 1.5 latent -> approximate RGB, a documented linear projection (the widely used SD 1.x
/// latent-to-RGB factors; rows = latent channels, columns = R, G, B). Cheap enough for every
/// step; only a preview.
pub const LATENT_RGB_FACTORS: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// Project the first latent of a batch ([N, 4, h, w], scaled latents) to an RGB preview.
pub fn latent_preview<B: Backend>(latents: &Tensor<B, 4>) -> RgbImage {
    let [_, c, h, w] = latents.dims();
    let first = latents.clone().slice([0..1, 0..c, 0..h, 0..w]);
    let values = first
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default();
    let plane = h * w;
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        let mut rgb = [0f32; 3];
        for (ch, row) in LATENT_RGB_FACTORS.iter().enumerate().take(c.min(4)) {
            let v = values.get(ch * plane + i).copied().unwrap_or(0.0);
            for k in 0..3 {
                rgb[k] += v * row[k];
            }
        }
        let to8 = |v: f32| (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
        Rgb([to8(rgb[0]), to8(rgb[1]), to8(rgb[2])])
    })
}

/// Standard-normal noise from a seed, generated on the host so that a seed gives the same
/// noise on every device (ChaCha-based `StdRng`, Box-Muller).
pub fn seeded_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// Which checkpoints to load.
#[derive(Clone, Debug)]
pub struct ModelPaths {
    pub base: PathBuf,
    pub controlnet: PathBuf,
    /// DPT, U2-Net and RFNet for recurrent generation (None: unscored).
    pub scorer: Option<super::judge::JudgePaths>,
    /// From the manifest: random test weights (outputs are marked).
    pub test_weights: bool,
}

/// Names and short hashes for metadata.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub base: String,
    pub base_hash: String,
    pub controlnet: String,
    pub controlnet_hash: String,
    pub test_weights: bool,
}

fn folder_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// SD 1.5 + ControlNet, loaded and ready.
pub struct AdGenerator<B: Backend> {
    pub sd: StableDiffusion<B>,
    pub controlnet: ControlNetModel<B>,
    pub info: ModelInfo,
    pub device: B::Device,
    paths: ModelPaths,
    dtype: DType,
}

impl<B: Backend> AdGenerator<B> {
    pub fn load(paths: &ModelPaths, dtype: DType, device: &B::Device) -> Result<Self, GenError> {
        let sd = StableDiffusion::<B>::load(&paths.base, dtype, device).map_err(GenError::Models)?;
        let controlnet = load_controlnet::<B>(&paths.controlnet, dtype, device).map_err(GenError::Models)?;
        let hash = |dir: &Path| {
            diffusers_weights(dir, dtype)
                .map(|p| crate::models::weights::header_hash(&p))
                .unwrap_or_else(|_| "unknown".into())
        };
        let info = ModelInfo {
            base: folder_name(&paths.base),
            base_hash: hash(&paths.base.join("unet")),
            controlnet: folder_name(&paths.controlnet),
            controlnet_hash: hash(&paths.controlnet),
            test_weights: paths.test_weights,
        };
        Ok(Self {
            sd,
            controlnet,
            info,
            device: device.clone(),
            paths: paths.clone(),
            dtype,
        })
    }

    /// A sampling error, with NaN/Inf outputs diagnosed against the weight files (corrupt
    /// checkpoint vs numerical overflow in this dtype).
    fn sampling_error(&self, e: SdError) -> GenError {
        match e {
            SdError::Cancelled => GenError::Cancelled,
            SdError::NonFinite { stage } => {
                let mut files: Vec<PathBuf> = ["unet", "vae"]
                    .iter()
                    .filter_map(|c| diffusers_weights(&self.paths.base.join(c), self.dtype).ok())
                    .collect();
                files.extend(crate::models::manifest::find_weights(
                    &self.paths.base.join("text_encoder"),
                    &["model.safetensors", "model.fp16.safetensors"],
                ));
                files.extend(diffusers_weights(&self.paths.controlnet, self.dtype).ok());
                GenError::NonFinite(crate::models::weights::NonFiniteOutput::diagnose(
                    "Stable Diffusion + ControlNet",
                    stage,
                    self.dtype,
                    &files,
                ))
            }
            other => GenError::Sampling(other),
        }
    }

    /// Generate one batch of candidates for `product` (decoded, the product pasted back, rounded
    /// to 8 bits): `render_batch`, then the one quantisation step.
    #[allow(clippy::too_many_arguments)]
    pub fn generate_batch(
        &self,
        product: &PlacedProduct,
        context: &Tensor<B, 3>,
        image_latents: &Tensor<B, 4>,
        seeds: &[u64],
        params: &GenerateParams,
        cancel: &CancelToken,
        on_step: impl FnMut(usize, usize, RgbImage),
    ) -> Result<Vec<RgbImage>, GenError> {
        let images = self.render_batch(product, context, image_latents, seeds, params, cancel, on_step)?;
        Ok(tensor_to_rgb(images))
    }

    /// The candidates before rounding: [N, 3, H, W] in [0, 1], decoded with the product pasted
    /// back — the one sampler (`pipeline::sampler`) with the eq. (2) blend.
    #[allow(clippy::too_many_arguments)]
    pub fn render_batch(
        &self,
        product: &PlacedProduct,
        context: &Tensor<B, 3>,
        image_latents: &Tensor<B, 4>,
        seeds: &[u64],
        params: &GenerateParams,
        cancel: &CancelToken,
        mut on_step: impl FnMut(usize, usize, RgbImage),
    ) -> Result<Tensor<B, 4>, GenError> {
        let canvas = product.canvas() as usize;
        let lat = self.sd.latent_size(canvas);
        let n = seeds.len();
        let per = 4 * lat * lat;
        let noise: Vec<f32> = seeds.iter().flat_map(|&s| seeded_noise(s, per)).collect();
        let noise = Tensor::<B, 4>::from_data(TensorData::new(noise, [n, 4, lat, lat]), &self.device);
        let t = product.tensors::<B>(lat as u32, &self.device);
        let scheduler = Ddim::new(&self.sd.scheduler, params.steps).map_err(|e| GenError::Params(e.to_string()))?;
        let cond = Conditioning::shared(context, Some(&t.control), n);
        let inpaint = Inpaint::new(image_latents.clone(), t.latent_mask, noise);
        let sample_params = SampleParams {
            guidance: params.guidance,
            controlnet_scale: params.controlnet_scale,
        };
        let latents = sampler::sample(
            &self.sd.unet,
            Some(&self.controlnet),
            &scheduler,
            &cond,
            inpaint.start(&scheduler),
            Some(&inpaint),
            &sample_params,
            0..params.steps,
            |info| {
                if cancel.is_cancelled() {
                    return false;
                }
                on_step(info.index, info.total, latent_preview(info.x0));
                !cancel.is_cancelled()
            },
        )
        .map_err(|e| self.sampling_error(e))?;
        sampler::ensure_finite(&latents, "latents").map_err(|e| self.sampling_error(e))?;
        let images = self.sd.decode(latents).map_err(|e| self.sampling_error(e))?;
        Ok(sampler::paste_back(images, t.alpha.repeat_dim(0, n), t.rgb.repeat_dim(0, n)))
    }

    /// The scaled latent of the product over white (what eq. (2) keeps under the mask).
    pub fn product_latents(&self, product: &PlacedProduct) -> Result<Tensor<B, 4>, GenError> {
        let init = product.tensors::<B>(1, &self.device).init;
        let lat = self.sd.vae.encode(init).mean.mul_scalar(self.sd.vae_config.scaling_factor);
        sampler::ensure_finite(&lat, "product latents").map_err(|e| self.sampling_error(e))?;
        Ok(lat)
    }
}

/// A1111-style `parameters` text for an attempt.
pub fn parameters_text(params: &GenerateParams, info: &ModelInfo, seed: u64, probs: Option<&ClassProbs>) -> String {
    let mut s = String::new();
    s.push_str(&params.prompt);
    s.push_str(&format!("\nNegative prompt: {}", params.negative));
    s.push_str(&format!(
        "\nSteps: {}, Sampler: DDIM, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Model hash: {}, ControlNet: {}, ControlNet hash: {}, ControlNet scale: {}, Product scale: {}",
        params.steps,
        params.guidance,
        seed,
        params.canvas,
        params.canvas,
        info.base,
        info.base_hash,
        info.controlnet,
        info.controlnet_hash,
        params.controlnet_scale,
        params.scale,
    ));
    if !params.title.is_empty() {
        s.push_str(&format!(", Title: {}", params.title.replace(',', "，")));
    }
    match probs {
        Some(p) => s.push_str(&format!(", RFNet: {}", p.describe())),
        None => s.push_str(", RFNet: not scored"),
    }
    if info.test_weights {
        s.push_str(", Test weights: random (image is noise)");
    }
    s
}

/// The JSON stored beside `parameters` in each PNG (`rfstudio` chunk), for exact round trips.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageMetadata {
    pub prompt: String,
    pub negative: String,
    pub title: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f32,
    pub controlnet_scale: f32,
    pub scale: f32,
    pub canvas: u32,
    pub model: String,
    pub model_hash: String,
    pub controlnet: String,
    pub controlnet_hash: String,
    pub probs: Option<ClassProbs>,
    pub test_weights: bool,
}

/// Generate for one product with recurrent generation. Writes everything into `out_dir`.
pub fn run_generation<B: Backend>(
    generator: &AdGenerator<B>,
    mut scorer: Option<&mut dyn Scorer>,
    product_path: &Path,
    params: &GenerateParams,
    out_dir: &Path,
    cancel: &CancelToken,
    emit: &mut dyn FnMut(GenEvent),
) -> Result<RunSummary, GenError> {
    params.validate()?;
    ensure_writable_dir(out_dir)?;
    let product = place_file(product_path, &params.placement())?;
    let test_weights = generator.info.test_weights;
    if test_weights {
        tracing::warn!("generating with RANDOM TEST WEIGHTS: the images are noise");
    }
    let seed0 = params.seed.unwrap_or_else(|| rand::rng().random::<u32>() as u64);
    // Inputs, for inspection and for the GUI.
    save_rgba(&out_dir.join("product.png"), &product.rgba)?;
    save_rgb(&out_dir.join("control.png"), &product.control, &[])?;
    save_gray(&out_dir.join("mask.png"), &product.inpaint_mask)?;
    let run_json = serde_json::json!({
        "params": params, "seed": seed0, "models": generator.info, "product": product_path,
        "scorer": scorer.as_ref().map(|s| s.name()),
    });
    write_atomic(&out_dir.join("run.json"), run_json.to_string().as_bytes())?;
    let attempts_path = out_dir.join("attempts.jsonl");
    if attempts_path.exists() {
        std::fs::remove_file(&attempts_path).map_err(|source| OutputError::Io {
            path: attempts_path.clone(),
            source,
        })?;
    }
    // Without a scorer there is nothing to recur on: one batch.
    let total = if scorer.is_some() {
        params.attempts
    } else {
        params.batch.min(params.attempts)
    };
    if scorer.is_none() && params.attempts > total {
        tracing::warn!(
            "no RFNet scorer installed: recurrent generation needs one; generating {total} unscored candidate(s)"
        );
    }
    emit(GenEvent::Started {
        out_dir: out_dir.to_path_buf(),
        attempts: total,
        steps: params.steps,
        seed: seed0,
        test_weights,
    });
    let device = generator.device.clone();
    let context = generator
        .sd
        .encode_prompt_pair(&params.prompt, &params.negative, &device)
        .map_err(GenError::Sampling)?;
    let image_latents = generator.product_latents(&product)?;
    let mut records: Vec<AttemptRecord> = Vec::new();
    let mut done = 0;
    let mut reached = false;
    while done < total && !reached {
        let n = params.batch.min(total - done);
        let seeds: Vec<u64> = (0..n).map(|i| seed0.wrapping_add((done + i) as u64)).collect();
        let first = done + 1;
        let start = Instant::now();
        let images = generator.generate_batch(
            &product,
            &context,
            &image_latents,
            &seeds,
            params,
            cancel,
            |step, steps, preview| {
                emit(GenEvent::Step {
                    attempt: first,
                    batch: n,
                    step: step + 1,
                    total: steps,
                    preview,
                })
            },
        )?;
        let seconds = start.elapsed().as_secs_f64() / n as f64;
        for (i, image) in images.into_iter().enumerate() {
            let attempt = done + i + 1;
            let scored = match scorer.as_deref_mut() {
                Some(s) => Some(s.score(&product, &image, &params.title)?),
                None => None,
            };
            let probs = scored.as_ref().map(|s| s.probs);
            if let Some(sc) = &scored {
                if let Some(d) = &sc.depth {
                    save_gray(&out_dir.join(format!("attempt_{attempt:03}_depth.png")), d)?;
                }
                if let Some(m) = &sc.saliency {
                    save_gray(&out_dir.join(format!("attempt_{attempt:03}_saliency.png")), m)?;
                }
            }
            let available = probs.map(|p| p.available() >= params.threshold);
            reached |= available == Some(true);
            let file = format!("attempt_{attempt:03}.png");
            let meta = ImageMetadata {
                prompt: params.prompt.clone(),
                negative: params.negative.clone(),
                title: params.title.clone(),
                seed: seeds[i],
                steps: params.steps,
                guidance: params.guidance,
                controlnet_scale: params.controlnet_scale,
                scale: params.scale,
                canvas: params.canvas,
                model: generator.info.base.clone(),
                model_hash: generator.info.base_hash.clone(),
                controlnet: generator.info.controlnet.clone(),
                controlnet_hash: generator.info.controlnet_hash.clone(),
                probs,
                test_weights,
            };
            let parameters = parameters_text(params, &generator.info, seeds[i], probs.as_ref());
            let meta_json = serde_json::to_string(&meta).unwrap_or_default();
            save_rgb(
                &out_dir.join(&file),
                &image,
                &[("parameters", &parameters), ("rfstudio", &meta_json)],
            )?;
            let record = AttemptRecord {
                attempt,
                seed: seeds[i],
                file,
                probs,
                available,
                seconds,
                test_weights,
            };
            append_jsonl(&attempts_path, &serde_json::to_value(&record).unwrap_or_default())?;
            emit(GenEvent::Attempt(record.clone()));
            records.push(record);
        }
        done += n;
    }
    // The best: highest P(Available) when scored, else the first.
    let best = records
        .iter()
        .enumerate()
        .max_by(|(ia, a), (ib, b)| {
            let pa = a.probs.map(|p| p.available()).unwrap_or(0.0);
            let pb = b.probs.map(|p| p.available()).unwrap_or(0.0);
            pa.partial_cmp(&pb).unwrap_or(std::cmp::Ordering::Equal).then(ib.cmp(ia))
        })
        .map(|(i, _)| i)
        .unwrap_or(0);
    if let Some(r) = records.get(best) {
        let bytes = std::fs::read(out_dir.join(&r.file)).map_err(|source| OutputError::Io {
            path: out_dir.join(&r.file),
            source,
        })?;
        write_atomic(&out_dir.join("best.png"), &bytes)?;
    }
    let summary = RunSummary {
        out_dir: out_dir.to_path_buf(),
        available: records.get(best).and_then(|r| r.available),
        best,
        attempts: records,
        scorer: scorer.as_ref().map(|s| s.name()),
        test_weights,
    };
    write_atomic(
        &out_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary).unwrap_or_default().as_bytes(),
    )?;
    emit(GenEvent::Finished(summary.clone()));
    Ok(summary)
}

/// A running generation job on a worker thread.
pub struct JobHandle {
    pub events: Receiver<JobMessage>,
    pub cancel: CancelToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a worker sends.
#[derive(Debug)]
pub enum JobMessage {
    Event(GenEvent),
    /// The last message: the run's result (`GenError::Cancelled` when cancelled,
    /// `GenError::Panicked` when the worker failed).
    Done(Result<RunSummary, GenError>),
}

impl JobHandle {
    /// Run `work` on a worker thread. It gets an event sink and the job's cancel token; its
    /// result (or, if it panics, `GenError::Panicked`) is always the last message, so a watcher
    /// never waits forever. `wake` is called after every message (the GUI repaints).
    pub fn spawn(
        wake: impl Fn() + Send + Sync + 'static,
        work: impl FnOnce(&mut dyn FnMut(GenEvent), &CancelToken) -> Result<RunSummary, GenError> + Send + 'static,
    ) -> JobHandle {
        let (tx, rx) = channel();
        let cancel = CancelToken::new();
        let token = cancel.clone();
        let thread = std::thread::spawn(move || {
            let events = tx.clone();
            let mut emit = |e: GenEvent| {
                let _ = events.send(JobMessage::Event(e));
                wake();
            };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&mut emit, &token)))
                .unwrap_or_else(|p| Err(GenError::Panicked(crate::device::panic_message(p.as_ref()))));
            let _ = tx.send(JobMessage::Done(result));
            wake();
        });
        JobHandle {
            events: rx,
            cancel,
            thread: Some(thread),
        }
    }

    /// Wait for the worker thread to end.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct GenerateJob<'a> {
    paths: ModelPaths,
    precision: Precision,
    product: PathBuf,
    params: GenerateParams,
    out_dir: PathBuf,
    cancel: &'a CancelToken,
    emit: &'a mut dyn FnMut(GenEvent),
}

impl BackendJob for GenerateJob<'_> {
    type Output = Result<RunSummary, GenError>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let generator = AdGenerator::<B>::load(&self.paths, self.precision.dtype(), &device)?;
        let mut scorer = match &self.paths.scorer {
            Some(p) => Some(super::judge::Judge::<B>::load(p, super::judge::JudgeSides::default(), self.precision.dtype(), &device)?),
            None => None,
        };
        run_generation(
            &generator,
            scorer.as_mut().map(|s| s as &mut dyn Scorer),
            &self.product,
            &self.params,
            &self.out_dir,
            self.cancel,
            self.emit,
        )
    }
}

/// Start a generation on a worker thread; events arrive on the handle's channel and the last
/// message is `JobMessage::Done`. `wake` is called after every message (the GUI repaints).
pub fn spawn_generation(
    selection: Selection,
    precision: Precision,
    paths: ModelPaths,
    product: PathBuf,
    params: GenerateParams,
    out_dir: PathBuf,
    wake: impl Fn() + Send + Sync + 'static,
) -> JobHandle {
    JobHandle::spawn(wake, move |emit, cancel| {
        let job = GenerateJob {
            paths,
            precision,
            product,
            params,
            out_dir,
            cancel,
            emit,
        };
        dispatch(&selection, precision, job).unwrap_or_else(|e| Err(GenError::Device(e)))
    })
}

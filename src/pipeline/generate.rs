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
use rand::Rng;


use super::output::{OutputError, save_gray, save_rgb, save_rgba};
use super::params::{GenerateParams, InvalidSetting};
use super::product::{PlacedProduct, ProductError, place_file};
use super::run_folder::{
    AttemptRecord, ImageMetadata, MapKind, ModelInfo, RUN_FOLDER_VERSION, RunFolder, RunFolderError, RunManifest, RunSummary,
    parameters_text,
};
use crate::files::{FileError, ensure_writable_dir, write_atomic};
use super::scheduler::Ddim;
use super::score::{ScoreError, Scorer};
use super::image_io::tensor_to_rgb;
use super::sampler::{self, Conditioning, Inpaint, SampleParams};
use crate::models::lora_file::LoraSpec;
use super::sd::{SdError, StableDiffusion, base_weight_files, controlnet_weight_file, load_controlnet};
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
    File(#[from] FileError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(transparent)]
    NonFinite(crate::models::weights::NonFiniteOutput),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("invalid setting: {0}")]
    Params(#[from] InvalidSetting),
    #[error(transparent)]
    RunFolder(#[from] RunFolderError),
    #[error("cancelled")]
    Cancelled,
    /// The worker panicked (a bug); the job ends with this instead of never ending.
    #[error("the generation worker stopped unexpectedly: {0}")]
    Panicked(String),
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

pub use crate::models::ops::seeded_noise;

/// Which checkpoints to load.
#[derive(Clone, Debug)]
pub struct ModelPaths {
    pub base: PathBuf,
    pub controlnet: PathBuf,
    /// DPT, U2-Net and RFNet for recurrent generation (None: unscored).
    pub scorer: Option<super::judge::JudgePaths>,
    /// From the manifest: random test weights (outputs are marked).
    pub test_weights: bool,
    /// LoRA files merged into the base model at load (`--lora FILE[:STRENGTH]`), in order.
    pub loras: Vec<LoraSpec>,
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
        let mut sd = StableDiffusion::<B>::load(&paths.base, dtype, device).map_err(GenError::Models)?;
        let loras = sd.apply_loras(&paths.loras).map_err(GenError::Models)?;
        let controlnet = load_controlnet::<B>(&paths.controlnet, dtype, device).map_err(GenError::Models)?;
        let hash = |file: Option<PathBuf>| file.map(|p| crate::models::weights::header_hash(&p)).unwrap_or_else(|| "unknown".into());
        let info = ModelInfo {
            base: folder_name(&paths.base),
            base_hash: hash(base_weight_files(&paths.base, dtype).into_iter().next()),
            controlnet: folder_name(&paths.controlnet),
            controlnet_hash: hash(controlnet_weight_file(&paths.controlnet, dtype)),
            test_weights: paths.test_weights,
            loras,
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
                let mut files = base_weight_files(&self.paths.base, self.dtype);
                files.extend(controlnet_weight_file(&self.paths.controlnet, self.dtype));
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
        let scheduler = Ddim::new(&self.sd.scheduler, params.steps).map_err(|e| GenError::Params(InvalidSetting(e.to_string())))?;
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
        let images = sampler::decode_images(&self.sd, latents).map_err(|e| self.sampling_error(e))?;
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
    let folder = RunFolder::new(out_dir);
    // Inputs, for inspection and for the GUI.
    save_rgba(&folder.product_path(), &product.rgba)?;
    save_rgb(&folder.control_path(), &product.control, &[])?;
    save_gray(&folder.mask_path(), &product.inpaint_mask)?;
    folder.write_manifest(&RunManifest {
        version: RUN_FOLDER_VERSION,
        params: params.clone(),
        seed: seed0,
        models: generator.info.clone(),
        product: product_path.to_path_buf(),
        scorer: scorer.as_ref().map(|s| s.name()),
    })?;
    folder.clear_attempts()?;
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
                let file = RunFolder::attempt_file(attempt);
                if let Some(d) = &sc.depth {
                    save_gray(&folder.map_path(&file, MapKind::Depth), d)?;
                }
                if let Some(m) = &sc.saliency {
                    save_gray(&folder.map_path(&file, MapKind::Saliency), m)?;
                }
            }
            let available = probs.map(|p| p.available() >= params.threshold);
            reached |= available == Some(true);
            let file = RunFolder::attempt_file(attempt);
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
            folder.append_attempt(&record)?;
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
        let bytes = std::fs::read(out_dir.join(&r.file)).map_err(|source| FileError::Io {
            path: out_dir.join(&r.file),
            source,
        })?;
        write_atomic(&folder.best_path(), &bytes)?;
    }
    let summary = RunSummary {
        version: RUN_FOLDER_VERSION,
        out_dir: out_dir.to_path_buf(),
        available: records.get(best).and_then(|r| r.available),
        best,
        attempts: records,
        scorer: scorer.as_ref().map(|s| s.name()),
        test_weights,
    };
    folder.write_summary(&summary)?;
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

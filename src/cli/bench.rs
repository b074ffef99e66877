//! `rfstudio bench ...`: timing commands (never assertions in tests). `bench generate` times the
//! generation stages at batch 1 and 4 on the selected device and prints a table and JSON; it is
//! what runs on the GPU machine against the PyTorch baseline.

use std::path::Path;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::ProgressBar;
use serde::Serialize;

use super::bench_common::{BenchError, failed, sync, time_ms};
use super::{CliError, GlobalArgs, exit, require_roles};
use crate::device::{self, BackendJob};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::controlnet::{ControlNetConfig, ControlNetModel};
use crate::models::manifest::Role;
use crate::models::presets;
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::pipeline::generate::seeded_noise;
use crate::pipeline::sampler::{self, Conditioning, Inpaint, SampleParams};
use crate::pipeline::scheduler::{Ddim, Scheduler, SchedulerConfig};
use crate::pipeline::sd::{StableDiffusion, load_controlnet};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time text encoding, one UNet+ControlNet step, VAE decode and a whole image.
    Generate(BenchGenerateArgs),
    /// Time the kernels that dominate SD 1.5 (conv, GroupNorm+SiLU, attention, matmul).
    Ops(super::bench_kernels::BenchOpsArgs),
    /// Time RFNet scoring at the paper's size (and optionally the full U2-Net) on a batch.
    Score(super::bench_kernels::BenchScoreArgs),
    /// Build a synthetic annotation DB (rows only) and time open, next-sample and label write.
    Dataset(BenchDatasetArgs),
    /// Time RFFT iterations (no-grad chain step, gradient forward, backward, optimizer, whole
    /// iteration, peak memory where the backend reports it) on a synthetic batch.
    Rfft(super::bench_rfft::BenchRfftArgs),
}

#[derive(Args, Debug)]
pub struct BenchDatasetArgs {
    /// Samples in the synthetic dataset.
    #[arg(long, default_value_t = 1_000_000)]
    pub samples: i64,
    /// Keep the dataset in this folder (default: a temporary folder, deleted afterwards).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Also build and time the dataset in this empty PostgreSQL database (`postgres://...`),
    /// beside the SQLite figures.
    #[arg(long)]
    pub db: Option<String>,
    /// Also time this many annotators labelling at once (p50/p99 of next sample and label write).
    #[arg(long, default_value_t = 0)]
    pub annotators: usize,
    /// Repetitions per timing.
    #[arg(long, default_value_t = 200)]
    pub iters: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchSize {
    /// The real SD 1.5 sizes (needs `--random-weights` or real checkpoints in the manifest).
    Sd15,
    /// Whatever the manifest's checkpoints are (e.g. `--models models/tiny`).
    Manifest,
}

#[derive(Args, Debug)]
pub struct BenchGenerateArgs {
    /// Architecture: real SD 1.5 sizes, or the manifest's checkpoints.
    #[arg(long, value_enum, default_value = "manifest")]
    pub size: ArchSize,
    /// Build the models with random weights instead of loading checkpoints (speed does not
    /// depend on weight values). Implied by `--size sd15` when no real weights are installed.
    #[arg(long)]
    pub random_weights: bool,
    /// Image side in pixels.
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// DDIM steps of the whole-image measurement.
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// Batches to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub batches: Vec<usize>,
    /// Timed repetitions per measurement (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
}

#[derive(Serialize)]
struct StageTimes {
    batch: usize,
    unet_controlnet_step_ms: f64,
    vae_decode_ms: f64,
    whole_batch_s: f64,
    per_image_s: f64,
}

#[derive(Serialize)]
struct BenchReport {
    bench: &'static str,
    device: String,
    dtype: String,
    size: ArchSize,
    random_weights: bool,
    resolution: usize,
    steps: usize,
    text_encode_ms: f64,
    /// Seconds to build the models (random init or loading).
    build_s: f64,
    /// Seconds of the first UNet+ControlNet step (kernel compilation and autotuning included;
    /// cached on disk for later runs, see README "Performance").
    first_step_s: f64,
    batches: Vec<StageTimes>,
}

struct Models<B: Backend> {
    text: ClipTextModel<B>,
    unet: UNet2DConditionModel<B>,
    controlnet: ControlNetModel<B>,
    vae: AutoencoderKL<B>,
    scaling: f64,
    scheduler: SchedulerConfig,
}

struct BenchJob {
    args: BenchGenerateArgs,
    base: Option<std::path::PathBuf>,
    controlnet: Option<std::path::PathBuf>,
    dtype: DType,
}

impl BenchJob {
    fn models<B: Backend>(&self, device: &B::Device) -> Result<Models<B>, BenchError> {
        if self.args.random_weights || self.base.is_none() {
            let unet: UNetConfig = serde_json::from_str(presets::SD15_UNET).map_err(failed)?;
            let vae: VaeConfig = serde_json::from_str(presets::SD15_VAE).map_err(failed)?;
            let text: ClipTextConfig = serde_json::from_str(presets::SD15_TEXT).map_err(failed)?;
            let (cn, cn_unet) = ControlNetConfig::from_json(presets::SD15_CONTROLNET, "SD15_CONTROLNET").map_err(failed)?;
            return Ok(Models {
                text: text.init(device),
                unet: unet.init(device),
                controlnet: cn.init(&cn_unet, device),
                scaling: vae.scaling_factor,
                vae: vae.init(device),
                scheduler: SchedulerConfig::default(),
            });
        }
        let base = self.base.clone().unwrap_or_default();
        let cn = self.controlnet.clone().unwrap_or_default();
        let sd = StableDiffusion::<B>::load(&base, self.dtype, device).map_err(failed)?;
        Ok(Models {
            text: sd.text_encoder,
            unet: sd.unet,
            controlnet: load_controlnet::<B>(&cn, self.dtype, device).map_err(failed)?,
            vae: sd.vae,
            scaling: sd.vae_config.scaling_factor,
            scheduler: sd.scheduler,
        })
    }
}

/// Wraps a job whose report is serialisable so that [`run_json_job`] can print it.
struct JsonJob<J>(J);

impl<J, R> BackendJob for JsonJob<J>
where
    J: BackendJob<Output = Result<R, BenchError>>,
    R: Serialize,
{
    type Output = Result<serde_json::Value, BenchError>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let report = self.0.run::<B>(device)?;
        serde_json::to_value(&report).map_err(failed)
    }
}

impl BackendJob for BenchJob {
    type Output = Result<BenchReport, BenchError>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let started = Instant::now();
        let m = self.models::<B>(&device)?;
        sync::<B>(&device)?;
        let build_s = started.elapsed().as_secs_f64();
        eprintln!("[bench] models built in {build_s:.1} s");
        let a = &self.args;
        if a.resolution % 64 != 0 || a.resolution == 0 {
            return Err(BenchError::Resolution(a.resolution));
        }
        let lat = a.resolution / 8;
        // Text encoding of a [negative, positive] pair.
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new((0..154).map(|i| (i % 400) as i64).collect::<Vec<_>>(), [2, 77]),
            &device,
        );
        let mut ctx = None;
        let text_encode_ms = time_ms::<B, _>(&device, 1, a.iters, || ctx = Some(m.text.forward(ids.clone())))?;
        let ctx = ctx.ok_or(BenchError::NoOutput)?;
        eprintln!("[bench] text encoder: {text_encode_ms:.2} ms");
        let mut first_step_s = 0.0;
        let scheduler = Ddim::new(&m.scheduler, a.steps).map_err(failed)?;
        let params = SampleParams {
            guidance: 7.5,
            controlnet_scale: 1.0,
        };
        let mut batches = Vec::new();
        for &b in &a.batches {
            let noise = |seed| {
                Tensor::<B, 4>::from_data(TensorData::new(seeded_noise(seed, b * 4 * lat * lat), [b, 4, lat, lat]), &device)
            };
            let control = Tensor::<B, 4>::zeros([b, 3, a.resolution, a.resolution], &device);
            let ctx2 = Tensor::cat(
                vec![
                    ctx.clone().slice([0..1, 0..77, 0..ctx.dims()[2]]).repeat_dim(0, b),
                    ctx.clone().slice([1..2, 0..77, 0..ctx.dims()[2]]).repeat_dim(0, b),
                ],
                0,
            );
            let x = Tensor::cat(vec![noise(1), noise(1)], 0);
            let cond = Tensor::cat(vec![control.clone(), control.clone()], 0);
            let first = Instant::now();
            let r = m.controlnet.forward(x.clone(), 500.0, &ctx2, cond.clone(), 1.0);
            let _ = m.unet.forward(x.clone(), 500.0, &ctx2, Some(&r));
            sync::<B>(&device)?;
            if first_step_s == 0.0 {
                first_step_s = first.elapsed().as_secs_f64();
            }
            eprintln!("[bench] batch {b}: first step {:.1} s", first.elapsed().as_secs_f64());
            let step_ms = time_ms::<B, _>(&device, 1, a.iters, || {
                let r = m.controlnet.forward(x.clone(), 500.0, &ctx2, cond.clone(), 1.0);
                let _ = m.unet.forward(x.clone(), 500.0, &ctx2, Some(&r));
            })?;
            eprintln!("[bench] batch {b}: UNet+ControlNet step {step_ms:.2} ms");
            let z = noise(2);
            let decode_ms = time_ms::<B, _>(&device, 1, a.iters, || {
                let _ = m.vae.decode(z.clone().div_scalar(m.scaling));
            })?;
            // A whole batch: DDIM loop with ControlNet, CFG and latent blending, then decode;
            // first a 2-step run of the same loop, so that the kernels only the loop uses (the
            // scheduler's and the blend's) are compiled and tuned outside the timed run.
            let mask = Tensor::<B, 4>::ones([1, 1, lat, lat], &device);
            let whole_run = |scheduler: &Ddim| -> Result<(), BenchError> {
                let inpaint = Inpaint::new(Tensor::zeros([1, 4, lat, lat], &device), mask.clone(), noise(3));
                let cond = Conditioning::shared(&ctx, Some(&control), b);
                let latents = sampler::sample(
                    &m.unet,
                    Some(&m.controlnet),
                    scheduler,
                    &cond,
                    inpaint.start(scheduler),
                    Some(&inpaint),
                    &params,
                    0..scheduler.timesteps().len(),
                    |_| true,
                )
                .map_err(failed)?;
                let _ = m.vae.decode(latents.div_scalar(m.scaling)).into_data();
                sync::<B>(&device)
            };
            whole_run(&Ddim::new(&m.scheduler, a.steps.min(2)).map_err(failed)?)?;
            let start = Instant::now();
            whole_run(&scheduler)?;
            let whole = start.elapsed().as_secs_f64() + text_encode_ms / 1e3;
            eprintln!("[bench] batch {b}: VAE decode {decode_ms:.2} ms, whole batch {whole:.3} s");
            batches.push(StageTimes {
                batch: b,
                unet_controlnet_step_ms: step_ms,
                vae_decode_ms: decode_ms,
                whole_batch_s: whole,
                per_image_s: whole / b as f64,
            });
        }
        Ok(BenchReport {
            bench: "generate",
            device: format!("{device:?}"),
            dtype: format!("{:?}", self.dtype),
            size: a.size,
            random_weights: a.random_weights || self.base.is_none(),
            resolution: a.resolution,
            steps: a.steps,
            text_encode_ms,
            build_s,
            first_step_s,
            batches,
        })
    }
}

/// Select the device, run a benchmark job there and print its report as one JSON line.
fn run_json_job<J: BackendJob<Output = Result<serde_json::Value, BenchError>>>(global: &GlobalArgs, job: J) -> Result<(), CliError> {
    let selection = global.select_device()?;
    eprintln!("{}", selection.notice);
    let report = device::dispatch(&selection, global.dtype, job)
        .map_err(super::device_error)?
        .map_err(|e| CliError::new(exit::FAILURE, e))?;
    println!("{report}");
    Ok(())
}

/// Build the synthetic dataset at `location` and time it (alone, then with `--annotators`);
/// prints the table unless `--json`, returns the figures as JSON.
fn bench_dataset_at(global: &GlobalArgs, args: &BenchDatasetArgs, location: &Path) -> Result<serde_json::Value, CliError> {
    let failed = |e: crate::data::store::StoreError| CliError::new(exit::FAILURE, e);
    let shown = crate::data::store::describe_location(location);
    let bar = (!global.json).then(|| ProgressBar::new(args.samples as u64));
    let (labels, build_s) = crate::data::bench::build(location, args.samples, &mut |d, _| {
        if let Some(b) = &bar {
            b.set_position(d as u64);
        }
    })
    .map_err(failed)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let r = crate::data::bench::measure(location, args.samples, labels, build_s, args.iters).map_err(failed)?;
    let team = (args.annotators > 0)
        .then(|| crate::data::bench::measure_concurrent(location, args.annotators, args.iters))
        .transpose()
        .map_err(failed)?;
    if !global.json {
        println!("{shown}: {} samples, {} labels, built in {:.1} s", r.samples, r.labels, r.build_s);
        println!("open:            {:8.3} ms", r.open_ms);
        for (order, ms) in &r.next_ms {
            println!("next ({order:<10}) {ms:8.3} ms");
        }
        println!("label write:     {:8.3} ms", r.label_write_ms);
        if let Some(t) = &team {
            println!(
                "{} annotators at once: next sample p50 {:.3} ms, p99 {:.3} ms; label write p50 {:.3} ms, p99 {:.3} ms",
                t.annotators, t.next_p50_ms, t.next_p99_ms, t.label_write_p50_ms, t.label_write_p99_ms
            );
        }
    }
    let mut v = serde_json::to_value(&r).map_err(anyhow::Error::from)?;
    v["next_ms_by_order"] = v["next_ms"].take();
    v["next_ms"] = serde_json::json!(r.next_ms_max);
    if let Some(t) = team {
        v["concurrent"] = serde_json::to_value(&t).map_err(anyhow::Error::from)?;
    }
    Ok(v)
}

pub fn run(global: &GlobalArgs, command: BenchCommand) -> Result<(), CliError> {
    match command {
        BenchCommand::Ops(args) => run_json_job(global, JsonJob(super::bench_kernels::OpsJob(args))),
        BenchCommand::Score(args) => run_json_job(global, JsonJob(super::bench_kernels::ScoreJob(args))),
        BenchCommand::Dataset(args) => {
            let tmp = tempfile::tempdir().map_err(anyhow::Error::from)?;
            let dir = args.dir.clone().unwrap_or_else(|| tmp.path().join("bench-dataset"));
            if crate::data::store::is_dataset(&dir) {
                return Err(CliError::bad_input(anyhow::anyhow!(
                    "{} already holds a dataset; give an empty folder",
                    dir.display()
                )));
            }
            let mut results = vec![("sqlite", bench_dataset_at(global, &args, &dir)?)];
            if let Some(url) = &args.db {
                // The synthetic samples have no image files; the image folder stays empty.
                let store = crate::data::store::Store::init_postgres(url, &tmp.path().join("pg-images"))
                    .map_err(|e| CliError::bad_input(anyhow::anyhow!("{e}")))?;
                if store.sample_count().map_err(|e| CliError::new(exit::FAILURE, e))? > 0 {
                    return Err(CliError::bad_input(anyhow::anyhow!(
                        "{} already holds samples; give an empty database",
                        store.location()
                    )));
                }
                drop(store);
                results.push(("postgres", bench_dataset_at(global, &args, std::path::Path::new(url))?));
            }
            // The last line is JSON in both modes (scripts read it): one object per database,
            // the SQLite one's fields also at the top level as before.
            let mut v = results[0].1.clone();
            for (name, r) in &results {
                v[*name] = r.clone();
            }
            println!("{v}");
            Ok(())
        }
        BenchCommand::Rfft(args) => super::bench_rfft::run(global, args),
        BenchCommand::Generate(args) => {
            let (base, controlnet) = if args.random_weights {
                (None, None)
            } else {
                let manifest = global.manifest()?;
                match require_roles(&manifest, &[Role::Base, Role::Controlnet]) {
                    Ok(_) => (
                        manifest.path(Role::Base).map(Path::to_path_buf),
                        manifest.path(Role::Controlnet).map(Path::to_path_buf),
                    ),
                    Err(e) if args.size == ArchSize::Sd15 => {
                        eprintln!("no real SD 1.5 weights ({}); using random weights", e.error);
                        (None, None)
                    }
                    Err(e) => return Err(e),
                }
            };
            let selection = global.select_device()?;
            if !global.json {
                eprintln!("{}", selection.notice);
            }
            let job = BenchJob {
                args,
                base,
                controlnet,
                dtype: global.dtype.dtype(),
            };
            let report = device::dispatch(&selection, global.dtype, job)
                .map_err(super::device_error)?
                .map_err(|e| CliError::new(exit::FAILURE, e))?;
            if global.json {
                println!("{}", serde_json::to_string(&report).map_err(anyhow::Error::from)?);
            } else {
                println!(
                    "bench generate on {} ({}), {}px, {} steps{}",
                    report.device,
                    report.dtype,
                    report.resolution,
                    report.steps,
                    if report.random_weights { ", random weights" } else { "" }
                );
                println!(
                    "models built in {:.1} s; first step (kernel compile + autotune) {:.1} s",
                    report.build_s, report.first_step_s
                );
                println!("text encode (CFG pair): {:.2} ms", report.text_encode_ms);
                println!("{:>5} {:>22} {:>14} {:>14} {:>12}", "batch", "UNet+ControlNet step", "VAE decode", "whole batch", "per image");
                for b in &report.batches {
                    println!(
                        "{:>5} {:>19.2} ms {:>11.2} ms {:>12.3} s {:>10.3} s",
                        b.batch, b.unet_controlnet_step_ms, b.vae_decode_ms, b.whole_batch_s, b.per_image_s
                    );
                }
            }
            Ok(())
        }
    }
}

//! `rfstudio bench rfft`: time RFFT iterations at real SD 1.5 sizes with random weights (or with
//! the manifest's checkpoints, e.g. the tiny ones) on a synthetic batch.

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use serde::Serialize;

use clap::{Args, ValueEnum};
use super::bench_common::{BenchError, failed};
use super::{CliError, GlobalArgs, exit, require_roles};
use crate::device::{self, BackendJob};
use crate::models::controlnet::{ControlNetConfig, ControlNetModel};
use crate::models::dpt::DptConfig;
use crate::models::manifest::Role;
use crate::models::presets;
use crate::models::resnet::ResNetConfig;
use crate::models::rfnet::RfNetConfig;
use crate::models::u2net::{U2NetArch, U2NetConfig};
use crate::models::unet::UNetConfig;
use crate::models::vae::VaeConfig;
use crate::pipeline::scheduler::{Ddim, SchedulerConfig};
use crate::pipeline::sd::{StableDiffusion, load_controlnet};
use crate::pipeline::judge::{Judge, JudgePaths, JudgeSides, Perception, PerceptionSettings};
use crate::pipeline::sampler::{Conditioning, Inpaint};
use crate::train::rfft::{self, Batch, Frozen, IterationTimes, Regulariser, ResolvedModels, StepSettings};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RfftSize {
    /// SD 1.5 UNet/ControlNet/VAE, DPT-hybrid, U2-Net (full), RFNet at the paper's size
    /// (ResNet-50, bert-base-chinese), all with random weights.
    Sd15,
    /// The manifest's checkpoints (e.g. `--models models/tiny`).
    Tiny,
}

#[derive(Args, Debug)]
pub struct BenchRfftArgs {
    /// Architecture: the tiny test models' sizes, or real SD 1.5 / DPT-hybrid / U2-Net / RFNet
    /// sizes with random weights.
    #[arg(long, value_enum, default_value = "tiny")]
    pub size: RfftSize,
    /// Random weights (always the case for `--size sd15`).
    #[arg(long)]
    pub random_weights: bool,
    /// LoRA rank (0 = the full ControlNet is trained).
    #[arg(long, default_value_t = 0)]
    pub lora: usize,
    /// The regulariser of the timed objective (cc, kl or none).
    #[arg(long, value_enum, default_value = "cc")]
    pub reg: RegArg,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 2)]
    pub iters: usize,
    /// Products per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Image side (default 512 for sd15, 64 for tiny).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// DDIM steps of the chain (40).
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// burn's balanced gradient checkpointing.
    #[arg(long)]
    pub checkpointing: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegArg {
    Cc,
    Kl,
    None,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    device: String,
    dtype: String,
    size: RfftSize,
    random_weights: bool,
    resolution: usize,
    steps: usize,
    batch: usize,
    lora_rank: usize,
    reg: RegArg,
    checkpointing: bool,
    #[serde(flatten)]
    times: IterationTimes,
}

struct Job {
    args: BenchRfftArgs,
    models: Option<ResolvedModels>,
    dtype: DType,
    memory: fn() -> Option<u64>,
}

struct Built<B: Backend> {
    frozen: Frozen<B>,
    controlnet: ControlNetModel<B>,
    scheduler: SchedulerConfig,
    context_dim: usize,
}

fn build<B: Backend>(job: &Job, device: &B::Device) -> Result<Built<B>, BenchError> {
    match &job.models {
        None => {
            let unet: UNetConfig = serde_json::from_str(presets::SD15_UNET).map_err(failed)?;
            let vae: VaeConfig = serde_json::from_str(presets::SD15_VAE).map_err(failed)?;
            let (cn, cn_unet) = ControlNetConfig::from_json(presets::SD15_CONTROLNET, "SD15_CONTROLNET").map_err(failed)?;
            let dpt: DptConfig = serde_json::from_str(presets::DPT_HYBRID).map_err(failed)?;
            let bert: serde_json::Value = serde_json::from_str(presets::BERT_BASE_CHINESE).map_err(failed)?;
            let rfnet_config = RfNetConfig::paper(ResNetConfig::default(), bert);
            let perception = Perception {
                depth: dpt.init::<B>(device).no_grad(),
                saliency: U2NetConfig::new(U2NetArch::U2net).init::<B>(device).no_grad(),
                settings: PerceptionSettings {
                    depth_side: (384, 384),
                    depth_mean: [0.5; 3],
                    depth_std: [0.5; 3],
                    saliency_side: 320,
                    weights: Vec::new(),
                    dtype: job.dtype,
                },
            };
            let judge = Judge::from_parts(perception, rfnet_config.init::<B>(device).map_err(failed)?, rfnet_config);
            Ok(Built {
                frozen: Frozen {
                    unet: unet.init::<B>(device).no_grad(),
                    vae_scaling: vae.scaling_factor,
                    vae: vae.init::<B>(device).no_grad(),
                    judge,
                },
                controlnet: cn.init::<B>(&cn_unet, device),
                scheduler: SchedulerConfig::default(),
                context_dim: unet.cross_attention_dim,
            })
        }
        Some(m) => {
            let sd = StableDiffusion::<B>::load(&m.base, job.dtype, device).map_err(failed)?;
            let context_dim = sd.unet_config.cross_attention_dim;
            let paths = JudgePaths {
                depth: m.depth.clone(),
                saliency: m.saliency.clone(),
                rfnet: m.rfnet.clone(),
                text: m.text.clone(),
            };
            Ok(Built {
                frozen: Frozen {
                    unet: sd.unet.no_grad(),
                    vae: sd.vae.no_grad(),
                    vae_scaling: sd.vae_config.scaling_factor,
                    judge: Judge::load(&paths, JudgeSides::default(), job.dtype, device).map_err(failed)?,
                },
                controlnet: load_controlnet::<B>(&m.controlnet, job.dtype, device).map_err(failed)?,
                scheduler: sd.scheduler,
                context_dim,
            })
        }
    }
}

/// A synthetic batch: random prompt embeddings and product latents, a centred product square.
fn synthetic_batch<B: Backend>(n: usize, resolution: usize, context_dim: usize, rfnet: &RfNetConfig, device: &B::Device) -> Batch<B> {
    let lat = resolution / 8;
    let s = rfnet.input_size;
    let square = |side: usize| {
        let v: Vec<f32> = (0..side * side)
            .map(|i| {
                let (x, y) = (i % side, i / side);
                let inside = x >= side / 4 && x < 3 * side / 4 && y >= side / 4 && y < 3 * side / 4;
                if inside { 1.0 } else { 0.0 }
            })
            .collect();
        Tensor::<B, 4>::from_data(TensorData::new(v, [1, 1, side, side]), device)
    };
    let normal = Distribution::Normal(0.0, 1.0);
    let tokens = rfnet.max_caption_tokens;
    Batch {
        cond: Conditioning {
            context: Tensor::random([2 * n, 77, context_dim], normal, device),
            control: Some(Tensor::zeros([2 * n, 3, resolution, resolution], device)),
        },
        inpaint: Inpaint::new(
            Tensor::random([n, 4, lat, lat], normal, device),
            square(lat).neg().add_scalar(1.0),
            Tensor::random([n, 4, lat, lat], normal, device),
        ),
        alpha: square(resolution).repeat_dim(0, n),
        product_rgb: Tensor::random([n, 3, resolution, resolution], Distribution::Uniform(0.0, 1.0), device),
        rfnet_product: Tensor::random([n, 3, s, s], normal, device),
        caption_ids: Tensor::<B, 2, Int>::ones([n, tokens], device),
        caption_mask: Tensor::<B, 2, Int>::ones([n, tokens], device),
    }
}

fn run_ad<AB: AutodiffBackend>(job: &Job, device: &AB::Device) -> Result<IterationTimes, BenchError> {
    let a = &job.args;
    let resolution = a.resolution.unwrap_or(match a.size {
        RfftSize::Sd15 => 512,
        RfftSize::Tiny => 64,
    });
    if resolution == 0 || resolution % 64 != 0 {
        return Err(BenchError::Resolution(resolution));
    }
    let built = build::<AB>(job, device)?;
    let scheduler = Ddim::new(&built.scheduler, a.steps).map_err(failed)?;
    let batch = synthetic_batch::<AB::InnerBackend>(a.batch.max(1), resolution, built.context_dim, &built.frozen.judge.rfnet_config, device);
    let settings = StepSettings {
        guidance: 7.5,
        controlnet_scale: 1.0,
        reg: match a.reg {
            RegArg::Cc => Regulariser::Cc,
            RegArg::Kl => Regulariser::Kl,
            RegArg::None => Regulariser::None,
        },
        beta: 1.0,
    };
    rfft::time_iterations(&built.frozen, &built.controlnet, &scheduler, &batch, &settings, a.lora, a.iters, job.memory, device)
        .map_err(failed)
}

impl BackendJob for Job {
    type Output = Result<IterationTimes, BenchError>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        if self.args.checkpointing {
            type AB<B> = Autodiff<B, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>;
            run_ad::<AB<B>>(&self, &device)
        } else {
            run_ad::<Autodiff<B>>(&self, &device)
        }
    }
}

pub fn run(global: &GlobalArgs, args: BenchRfftArgs) -> Result<(), CliError> {
    let models = match args.size {
        RfftSize::Sd15 => None,
        RfftSize::Tiny => {
            let manifest = global.manifest()?;
            require_roles(&manifest, &[Role::Base, Role::Controlnet, Role::Depth, Role::Saliency, Role::Rfnet])?;
            let p = |r: Role| manifest.path(r).map(PathBuf::from).unwrap_or_default();
            Some(ResolvedModels {
                base: p(Role::Base),
                controlnet: p(Role::Controlnet),
                rfnet: p(Role::Rfnet),
                depth: p(Role::Depth),
                saliency: p(Role::Saliency),
                text: None,
            })
        }
    };
    let selection = global.select_device()?;
    if !global.json {
        eprintln!("{}", selection.notice);
    }
    let memory: fn() -> Option<u64> = if selection.backend == device::BackendKind::Cpu {
        crate::device::peak_rss_bytes
    } else {
        || None
    };
    let resolution = args.resolution.unwrap_or(if args.size == RfftSize::Sd15 { 512 } else { 64 });
    let head = (args.size, args.lora, args.reg, args.iters, args.batch, args.steps, args.checkpointing);
    let job = Job {
        args,
        models,
        dtype: global.dtype.dtype(),
        memory,
    };
    let times = device::dispatch(&selection, global.dtype, job)
        .map_err(super::device_error)?
        .map_err(|e| CliError::new(exit::FAILURE, e))?;
    let report = Report {
        bench: "rfft",
        device: selection.backend.to_string(),
        dtype: global.dtype.to_string(),
        size: head.0,
        random_weights: head.0 == RfftSize::Sd15,
        resolution,
        steps: head.5,
        batch: head.4,
        lora_rank: head.1,
        reg: head.2,
        checkpointing: head.6,
        times,
    };
    if global.json {
        println!("{}", serde_json::to_string(&report).map_err(anyhow::Error::from)?);
    } else {
        let t = &report.times;
        println!(
            "bench rfft on {} ({}), {:?}, {}px, batch {}, lora {}, reg {:?}, {} trainable parameters",
            report.device, report.dtype, report.size, report.resolution, report.batch, report.lora_rank, report.reg, t.trainable_params
        );
        println!("chain step (no grad):   {:10.2} ms", t.chain_step_ms);
        println!("gradient step forward:  {:10.2} ms", t.forward_ms);
        println!("backward:               {:10.2} ms", t.backward_ms);
        println!("optimizer step:         {:10.2} ms", t.optimizer_ms);
        println!("whole iteration:        {:10.3} s", t.iteration_s);
        match t.peak_memory_bytes {
            Some(b) => println!("peak process memory:    {:10.1} MiB", b as f64 / 1048576.0),
            None => println!("peak memory:            not reported by this backend"),
        }
    }
    Ok(())
}

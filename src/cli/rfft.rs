//! `rfstudio rfft --config run.toml [--resume] [--run DIR]`, `rfft eval`, `rfft export`: the
//! RFFT fine-tuning harness over `train::rfft`.

use crate::tr;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use clap::{Args, Subcommand};

use super::progress::Progress;
use super::{CliError, GlobalArgs, exit};
use crate::device::{self, BackendJob};
use crate::models::manifest::{Manifest, Role};
use crate::pipeline::judge::JudgePaths;
use crate::train::rfft::{ProductSpec, ResolvedModels, RfftConfig, RfftError, RfftEvent, RunControl, RunStatus, TrainJob};
use crate::train::rfft::export::{self as rfft_export, CompareSettings};
use crate::train::run_folder::RunFolderError;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RfftArgs {
    #[command(subcommand)]
    pub command: Option<RfftCommand>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// The run configuration (products + prompts, eval products, reg, beta, lr, steps, ...).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run folder (default: runs/<config file stem>).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Continue the run folder from its last checkpoint (the config is read from its run.toml
    /// unless --config is given).
    #[arg(long)]
    pub resume: bool,
    /// Train on several devices at once (data parallel; replaces --device): `cuda:0,cuda:1,...`
    /// sums gradients through NCCL; `cpu:0,cpu:1` runs CPU peers that share this machine's
    /// cores. grad_accum must be a multiple of the number of devices; the run equals the
    /// one-device run with the same run.toml.
    #[arg(long, value_name = "LIST", value_parser = parse_device_set)]
    pub devices: Option<device::DeviceSet>,
}

fn parse_device_set(s: &str) -> Result<device::DeviceSet, String> {
    s.parse::<device::DeviceSet>().map_err(|e| match e {
        device::DeviceError::DeviceSet { reason, .. } => reason,
        other => other.to_string(),
    })
}

#[derive(Subcommand, Debug)]
pub enum RfftCommand {
    /// Compare ControlNets side by side: availability by RFNet, mean attempts until Available,
    /// background variety across seeds.
    Eval(EvalArgs),
    /// Write a run's fine-tuned ControlNet (LoRA merged) as a diffusers folder.
    Export(ExportArgs),
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// ControlNet folders (diffusers layout), or RFFT run folders (their checkpoint is exported
    /// to `<run>/export` first). Repeat for each.
    #[arg(long = "controlnet", required = true)]
    pub controlnets: Vec<PathBuf>,
    /// Products: a JSON-lines catalogue (`image`, `prompt`, optional `id`, `negative_prompt`,
    /// `title`/`title_zh`/`title_en`; images relative to the file) or a run.toml (its
    /// eval_products).
    #[arg(long)]
    pub products: PathBuf,
    /// Only these product ids (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Seeds per product (0..K).
    #[arg(long, default_value_t = 4)]
    pub seeds: usize,
    /// DDIM steps per image (1-1000).
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// Canvas side in pixels (a multiple of 64, at most 2048).
    #[arg(long, default_value_t = 512)]
    pub size: u32,
    /// P(Available) an image needs to count as available (0-1).
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f32,
    /// Classifier-free guidance scale (0-30).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f32,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The RFFT run folder.
    #[arg(long)]
    pub run: PathBuf,
    /// Output: a folder (config.json + diffusion_pytorch_model.safetensors) for `--format
    /// diffusers`, a `.safetensors` file for `--format single-file`.
    #[arg(long)]
    pub out: PathBuf,
    /// `diffusers` (a folder diffusers loads), `single-file` (one .safetensors in the original
    /// control_model.* layout, for A1111's ControlNet extension and ComfyUI) or `kohya-lora` (a
    /// LoRA run's adapters alone, kohya-style, for the run's base ControlNet).
    #[arg(long, value_enum, default_value = "diffusers")]
    pub format: rfft_export::ExportFormat,
}

fn code_of(e: &RfftError) -> i32 {
    match e {
        RfftError::Config(_) | RfftError::Setting(_) => exit::BAD_INPUT,
        // A damaged run folder (corrupt checkpoint, unreadable state) is bad input; a file
        // that cannot be written (disk full) is a failure.
        RfftError::RunFolder(RunFolderError::Write(_) | RunFolderError::Record { .. }) => exit::FAILURE,
        RfftError::RunFolder(_) => exit::BAD_INPUT,
        RfftError::Device(d) if d.is_bad_input() => exit::BAD_INPUT,
        RfftError::Models(_) | RfftError::Sampling(crate::pipeline::sd::SdError::Residuals { .. } | crate::pipeline::sd::SdError::Geometry { .. }) => exit::MODELS_MISSING,
        RfftError::Judge(s) => super::score_code(s),
        RfftError::OnPeer { source, .. } => code_of(source),
        RfftError::Io { .. } | RfftError::Train(_) | RfftError::Sampling(_) | RfftError::Device(_) | RfftError::Panicked(_) | RfftError::PeerFailed(_) => exit::FAILURE,
    }
}

fn rfft_err(e: RfftError) -> CliError {
    CliError::new(code_of(&e), anyhow::anyhow!(e))
}

/// Model folders: the config's `models` table, then the manifest (with `--<role>-model`).
fn resolve(config: &RfftConfig, manifest: &Manifest) -> Result<ResolvedModels, CliError> {
    let lookup = |role: &str| -> Option<PathBuf> {
        let role = Role::ALL.iter().find(|r| r.name() == role)?;
        manifest.path(*role).map(Path::to_path_buf)
    };
    config.models.resolve(&lookup).map_err(rfft_err)
}

pub fn run(global: &GlobalArgs, args: RfftArgs) -> Result<(), CliError> {
    match args.command {
        Some(RfftCommand::Eval(a)) => eval(global, &a),
        Some(RfftCommand::Export(a)) => export(global, &a),
        None => train(global, &args.train),
    }
}

fn train(global: &GlobalArgs, args: &TrainArgs) -> Result<(), CliError> {
    let run_dir = match (&args.run, &args.config) {
        (Some(r), _) => r.clone(),
        (None, Some(c)) => PathBuf::from("runs").join(c.file_stem().unwrap_or_default()),
        (None, None) => {
            return Err(CliError::bad_input(anyhow::anyhow!(
                "give --config run.toml (or --resume --run DIR)"
            )));
        }
    };
    let (config_path, config) = match &args.config {
        Some(c) => {
            if args.resume && !run_dir.join("run.toml").is_file() {
                return Err(CliError::bad_input(anyhow::anyhow!(
                    "{}: nothing to resume: not an RFFT run folder (no run.toml)",
                    run_dir.display()
                )));
            }
            (c.clone(), RfftConfig::from_file(c).map_err(rfft_err)?)
        }
        None if args.resume => (
            run_dir.join("run.toml"),
            crate::train::rfft::resume_config(&run_dir).map_err(rfft_err)?,
        ),
        None => return Err(CliError::bad_input(anyhow::anyhow!("give --config run.toml"))),
    };
    let manifest = global.manifest()?;
    let models = resolve(&config, &manifest)?;
    let selection = match &args.devices {
        Some(set) => device::select_set(set, global.attention).map_err(CliError::bad_input)?,
        None => global.select_device()?,
    };
    crate::pipeline::params::check_memory(
        &format!("an RFFT iteration at image_size = {} with batch = {}", config.image_size, config.batch),
        config.memory_bytes(global.dtype.element_bytes()) * crate::train::rfft::job::cpu_peers(args.devices.as_ref()),
        device::memory_budget_bytes(&selection),
    )
    .map_err(|why| CliError::bad_input(anyhow::anyhow!("{}: {why}", config_path.display())))?;
    if !global.json {
        eprintln!("{}", selection.notice);
        eprintln!("{}", tr!("cli.run_folder", path = run_dir.display()));
    }
    let memory: fn() -> Option<u64> = if selection.backend == device::BackendKind::Cpu {
        device::peak_rss_bytes
    } else {
        || None
    };
    let json = global.json;
    let steps = config.steps as u64;
    let progress = Progress::new(
        json,
        "rfft step",
        steps,
        &tr!("cli.rfft_bar", bar = "{bar:30}", pos = "{pos}", len = "{len}", msg = "{msg}", elapsed = "{elapsed_precise}", eta = "{eta_precise}"),
    );
    let bar2 = progress.clone();
    let emit = move |e: &RfftEvent| {
        if json {
            if let Ok(s) = serde_json::to_string(e) {
                println!("{s}");
            }
            return;
        }
        let b = &bar2;
        match e {
            RfftEvent::Step(s) => {
                b.set(
                    s.step as u64,
                    steps,
                    &format!("F_AC {:.4} reg {:.4} |g| {:.3}", s.f_ac, s.reg, s.grad_norm),
                );
            }
            RfftEvent::Eval(v) => b.println(&format!(
                "eval @ step {}: availability {:.1}%, mean F_AC {:.4}, guidance distance {:.4} ({})",
                v.step,
                100.0 * v.availability_rate,
                v.mean_f_ac,
                v.guidance_distance,
                v.grid
            )),
            RfftEvent::Checkpoint { step, .. } => b.println(&format!("checkpoint @ step {step}")),
            _ => {}
        }
    };
    let job = TrainJob {
        config,
        models,
        run: run_dir.clone(),
        resume: args.resume,
        precision: global.dtype,
        control: RunControl::new(),
        memory,
        emit: Box::new(emit),
    };
    let status = match &args.devices {
        Some(set) => device::dispatch_peers(&selection, set, global.dtype, job),
        None => device::dispatch(&selection, global.dtype, job),
    }
    .map_err(super::device_error)?
    .map_err(rfft_err)?;
    progress.finish();
    if !json {
        let line = match status {
            RunStatus::Finished => tr!("cli.rfft_finished", path = run_dir.display()),
            _ => tr!("cli.rfft_stopped", path = run_dir.display()),
        };
        println!("{line}");
    }
    Ok(())
}

struct ExportJob {
    run: PathBuf,
    models: ResolvedModels,
    out: PathBuf,
    format: rfft_export::ExportFormat,
}

impl BackendJob for ExportJob {
    type Output = Result<usize, RfftError>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        rfft_export::export_run::<B>(&self.run, &self.models, &self.out, self.format, &device)
    }
}

fn run_models(global: &GlobalArgs, run: &Path) -> Result<ResolvedModels, CliError> {
    let config = RfftConfig::from_file(&run.join("run.toml")).map_err(rfft_err)?;
    resolve(&config, &global.manifest()?)
}

fn export(global: &GlobalArgs, args: &ExportArgs) -> Result<(), CliError> {
    let models = run_models(global, &args.run)?;
    if args.format != rfft_export::ExportFormat::Diffusers && args.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(CliError::bad_input(anyhow::anyhow!(
            "--out {}: a {} export is one .safetensors file (e.g. --out controlnet-rfft.safetensors)",
            args.out.display(),
            if args.format == rfft_export::ExportFormat::KohyaLora { "kohya-lora" } else { "single-file" }
        )));
    }
    let job = ExportJob {
        run: args.run.clone(),
        models,
        out: args.out.clone(),
        format: args.format,
    };
    // Export is a copy of weights: the CPU is always enough.
    let selection = device::select(device::DeviceRequest::Cpu).map_err(CliError::bad_input)?;
    let n = device::dispatch(&selection, device::Precision::F32, job)
        .map_err(super::device_error)?
        .map_err(rfft_err)?;
    if global.json {
        println!("{}", serde_json::json!({"out": args.out, "tensors": n}));
    } else {
        let layout = match args.format {
            rfft_export::ExportFormat::Diffusers => "diffusers ControlNet layout",
            rfft_export::ExportFormat::SingleFile => "single file, control_model.* layout",
            rfft_export::ExportFormat::KohyaLora => "kohya-style LoRA for the run's ControlNet",
        };
        println!("{}", tr!("cli.rfft_exported", n = n, out = args.out.display(), layout = layout));
    }
    Ok(())
}

/// Products from a JSON-lines catalogue or a run.toml's eval_products.
fn read_products(path: &Path, only: &[String]) -> Result<Vec<ProductSpec>, CliError> {
    let bad = |m: String| CliError::bad_input(anyhow::anyhow!(m));
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let mut products = if path.extension().is_some_and(|e| e == "toml") {
        let c = RfftConfig::from_toml(&text, &path.display().to_string()).map_err(rfft_err)?;
        if c.eval_products.is_empty() { c.products } else { c.eval_products }
    } else {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(format!("{}:{}: {e}", path.display(), i + 1)))?;
            let s = |k: &str| v[k].as_str().map(str::to_string);
            let image = s("image").ok_or_else(|| bad(format!("{}:{}: no `image`", path.display(), i + 1)))?;
            let image = dir.join(image);
            if !image.is_file() {
                return Err(bad(format!("{}:{}: product image {} not found", path.display(), i + 1, image.display())));
            }
            out.push(ProductSpec {
                id: s("id"),
                image,
                prompt: s("prompt").unwrap_or_default(),
                negative: s("negative_prompt").or_else(|| s("negative")).unwrap_or_default(),
                title: s("title").or_else(|| s("title_zh")).or_else(|| s("title_en")).unwrap_or_default(),
            });
        }
        out
    };
    if !only.is_empty() {
        for id in only {
            if !products.iter().any(|p| &p.name() == id) {
                return Err(bad(format!(
                    "unknown product {id:?}; {} has: {}",
                    path.display(),
                    products.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        products.retain(|p| only.contains(&p.name()));
    }
    if products.is_empty() {
        return Err(bad(format!("{}: no products", path.display())));
    }
    Ok(products)
}

struct CompareJob {
    base: PathBuf,
    controlnets: Vec<PathBuf>,
    scorer: JudgePaths,
    products: Vec<ProductSpec>,
    settings: CompareSettings,
    dtype: burn::tensor::DType,
    progress: Progress,
}

impl BackendJob for CompareJob {
    type Output = Result<Vec<rfft_export::ControlNetReport>, RfftError>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let progress = self.progress.clone();
        rfft_export::compare_controlnets::<B>(
            &self.base,
            &self.controlnets,
            &self.scorer,
            &self.products,
            &self.settings,
            self.dtype,
            &device,
            &mut |done, total| progress.set(done as u64, total as u64, ""),
        )
    }
}

fn eval(global: &GlobalArgs, args: &EvalArgs) -> Result<(), CliError> {
    if args.seeds == 0 || args.seeds > 1000 {
        return Err(CliError::bad_input(anyhow::anyhow!("--seeds {} must be between 1 and 1000", args.seeds)));
    }
    if args.steps == 0 || args.steps > 1000 {
        return Err(CliError::bad_input(anyhow::anyhow!("--steps {} must be between 1 and 1000", args.steps)));
    }
    if !(0.0..=1.0).contains(&args.threshold) {
        return Err(CliError::bad_input(anyhow::anyhow!("--threshold {} must be between 0 and 1", args.threshold)));
    }
    crate::pipeline::params::check_sampling(args.guidance, 1.0, args.size)
        .map_err(|why| CliError::bad_input(anyhow::anyhow!("{why}")))?;
    let products = read_products(&args.products, &args.only)?;
    let manifest = global.manifest()?;
    super::require_roles(&manifest, &[Role::Base, Role::Depth, Role::Saliency, Role::Rfnet])?;
    let path = |r: Role| manifest.path(r).map(Path::to_path_buf).unwrap_or_default();
    // run folders are exported first
    let mut controlnets = Vec::new();
    for c in &args.controlnets {
        if c.join("run.toml").is_file() {
            let out = c.join("export");
            export(
                global,
                &ExportArgs {
                    run: c.clone(),
                    out: out.clone(),
                    format: rfft_export::ExportFormat::Diffusers,
                },
            )?;
            controlnets.push(out);
        } else if c.join("config.json").is_file() || crate::models::single_file::is_single_file(c) {
            controlnets.push(c.clone());
        } else {
            return Err(CliError::bad_input(anyhow::anyhow!(
                "{}: neither a ControlNet (a folder with config.json, or a single file) nor an RFFT run folder (run.toml)",
                c.display()
            )));
        }
    }
    let selection = global.select_device()?;
    if !global.json {
        eprintln!("{}", selection.notice);
    }
    let needed = crate::pipeline::params::generation_memory_bytes(args.size, 1, global.dtype.element_bytes());
    crate::pipeline::params::check_memory(&format!("evaluating at {0}x{0}", args.size), needed, device::memory_budget_bytes(&selection))
        .map_err(|why| CliError::bad_input(anyhow::anyhow!("{why}")))?;
    let progress = Progress::new(global.json, tr!("cli.progress_eval"), (controlnets.len() * products.len()) as u64, "{prefix} [{bar:30}] {pos}/{len}");
    let job = CompareJob {
        base: path(Role::Base),
        controlnets,
        scorer: JudgePaths {
            depth: path(Role::Depth),
            saliency: path(Role::Saliency),
            rfnet: path(Role::Rfnet),
            text: None,
        },
        products,
        settings: CompareSettings {
            seeds: args.seeds,
            steps: args.steps,
            image_size: args.size,
            threshold: args.threshold,
            guidance: args.guidance,
            product_scale: 0.7,
        },
        dtype: global.dtype.dtype(),
        progress: progress.clone(),
    };
    let reports = device::dispatch(&selection, global.dtype, job)
        .map_err(super::device_error)?
        .map_err(rfft_err)?;
    progress.finish();
    if global.json {
        println!("{}", serde_json::to_string(&reports).map_err(anyhow::Error::from)?);
    } else {
        print!("{}", rfft_export::compare_table(&reports));
    }
    Ok(())
}

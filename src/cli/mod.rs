//! The command-line harness. Every subcommand is a thin layer over library calls: it parses
//! arguments, resolves the device and the model manifest, calls the library, and renders the
//! result as text or JSON lines. Exit codes (`exit`): 0 done, 1 failure (an internal error or
//! an I/O failure not caused by the input), 2 bad input, 3 models missing or invalid, 4 no
//! available image within the attempts, 5 numerical failure (NaN/Inf from finite weights).

mod analyze;
mod bench;
mod bench_common;
mod bench_kernels;
mod bench_rfft;
mod catalogue;
mod convert;
mod dataset;
mod generate;
pub mod progress;
pub mod info;
mod rfft;
mod rfnet;
mod score;
mod studio;
mod synth;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::device::{DeviceRequest, Precision};
use crate::tr;
use crate::models::manifest::{Manifest, Role};

/// Exit codes shared by every subcommand (README "Exit codes").
pub mod exit {
    pub const OK: i32 = 0;
    /// An internal error, or an I/O failure not caused by the input (disk full, ...).
    pub const FAILURE: i32 = 1;
    /// Bad input: arguments, files, settings out of range.
    pub const BAD_INPUT: i32 = 2;
    /// A needed model is missing or invalid (including weights holding NaN/Inf).
    pub const MODELS_MISSING: i32 = 3;
    /// Every attempt was scored and none reached the threshold.
    pub const NOT_AVAILABLE: i32 = 4;
    /// A model produced NaN/Inf from finite weights (overflow; try another `--dtype`).
    pub const NUMERICAL: i32 = 5;

    /// The more severe of two exit codes, for commands that process many items (a catalogue):
    /// 1 > 3 > 5 > 2 > 4 > 0. Any error outranks "no available image", so bad input never
    /// reads as an unlucky run.
    pub fn more_severe(a: i32, b: i32) -> i32 {
        fn rank(code: i32) -> u8 {
            match code {
                OK => 0,
                NOT_AVAILABLE => 1,
                BAD_INPUT => 2,
                NUMERICAL => 3,
                MODELS_MISSING => 4,
                _ => 5,
            }
        }
        if rank(b) > rank(a) { b } else { a }
    }
}

/// A device error: bad input (exit 2) unless the job itself panicked (exit 1).
pub fn device_error(e: crate::device::DeviceError) -> CliError {
    let code = if e.is_bad_input() { exit::BAD_INPUT } else { exit::FAILURE };
    CliError::new(code, e)
}

/// A non-finite model output: models invalid (3) when the weights hold NaN/Inf, else a numerical
/// failure (5).
pub fn non_finite(e: crate::models::weights::NonFiniteOutput) -> CliError {
    let code = if e.weights_corrupt() {
        exit::MODELS_MISSING
    } else {
        exit::NUMERICAL
    };
    CliError::new(code, e)
}

/// The exit code of a scoring error.
pub fn score_code(e: &crate::pipeline::score::ScoreError) -> i32 {
    use crate::pipeline::score::ScoreError;
    match e {
        ScoreError::Models { .. } => exit::MODELS_MISSING,
        ScoreError::NonFinite(n) if n.weights_corrupt() => exit::MODELS_MISSING,
        ScoreError::NonFinite(_) => exit::NUMERICAL,
        ScoreError::Failed(_) => exit::FAILURE,
    }
}

/// An error that reaches the user, with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub error: anyhow::Error,
}

impl CliError {
    pub fn new(code: i32, error: impl Into<anyhow::Error>) -> Self {
        Self {
            code,
            error: error.into(),
        }
    }
    pub fn bad_input(error: impl Into<anyhow::Error>) -> Self {
        Self::new(exit::BAD_INPUT, error)
    }
}

impl From<anyhow::Error> for CliError {
    fn from(error: anyhow::Error) -> Self {
        Self {
            code: exit::FAILURE,
            error,
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "rfstudio",
    version,
    about = "Reliable advertising-image generation: SD 1.5 + ControlNet, RFNet scoring, RFFT fine-tuning",
    long_about = None
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Options every command accepts.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Compute device: auto tries CUDA, then a hardware wgpu adapter, then the CPU.
    #[arg(long, global = true, help_heading = "Global options", env = "RFSTUDIO_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceRequest,
    /// Float precision of weights and activations.
    #[arg(long, global = true, help_heading = "Global options", env = "RFSTUDIO_DTYPE", value_enum, default_value = "f32")]
    pub dtype: Precision,
    /// Folder holding `models.toml` (the manifest mapping roles to checkpoint folders). Default:
    /// `./models` when it has a models.toml, else `models` in the user's data folder
    /// (~/.local/share/rfstudio/models, created on first use).
    #[arg(long, global = true, help_heading = "Global options", env = "RFSTUDIO_MODELS", default_value_os_t = crate::files::default_models_dir())]
    pub models: PathBuf,
    /// Override the Stable Diffusion 1.5 folder (diffusers layout).
    #[arg(long, global = true, help_heading = "Global options", value_name = "DIR")]
    pub base_model: Option<PathBuf>,
    /// Override the ControlNet folder (diffusers layout).
    #[arg(long, global = true, help_heading = "Global options", value_name = "DIR")]
    pub controlnet_model: Option<PathBuf>,
    /// Override the DPT depth model folder.
    #[arg(long, global = true, help_heading = "Global options", value_name = "DIR")]
    pub depth_model: Option<PathBuf>,
    /// Override the U2-Net saliency model folder.
    #[arg(long, global = true, help_heading = "Global options", value_name = "DIR")]
    pub saliency_model: Option<PathBuf>,
    /// Override the BERT caption-encoder folder.
    #[arg(long, global = true, help_heading = "Global options", value_name = "DIR")]
    pub text_model: Option<PathBuf>,
    /// Override the ResNet-50 image-encoder folder.
    #[arg(long, global = true, help_heading = "Global options", value_name = "DIR")]
    pub image_model: Option<PathBuf>,
    /// Override the RFNet checkpoint folder.
    #[arg(long, global = true, help_heading = "Global options", value_name = "DIR")]
    pub rfnet_model: Option<PathBuf>,
    /// Attention kernels: auto (per backend and sequence length), fused (burn's op, autotuned),
    /// matmul (softmax(QK^T)V), or flash[:KERNEL] (a cubek flash kernel by name on CUDA/wgpu:
    /// flash:unit, flash:tc:PLANES:Q:KV); see README's performance section.
    #[arg(long, global = true, help_heading = "Global options", env = "RFSTUDIO_ATTENTION", default_value = "auto")]
    pub attention: crate::models::policy::AttentionImpl,
    /// Print machine-readable JSON (lines) instead of tables and progress bars.
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    /// Language of messages and of the studio: en or zh-CN (default: the locale, from LC_ALL,
    /// LC_MESSAGES or LANG). `--json` output is the same in every language.
    #[arg(long, global = true, help_heading = "Global options", env = "RFSTUDIO_LANG", value_parser = parse_lang)]
    pub lang: Option<crate::i18n::Lang>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, help_heading = "Global options", action = clap::ArgAction::Count)]
    pub verbose: u8,
}

fn parse_lang(value: &str) -> Result<crate::i18n::Lang, String> {
    crate::i18n::Lang::parse(value).ok_or_else(|| tr!("cli.lang_unknown", value = value))
}

impl GlobalArgs {
    /// The manifest with every `--<role>-model` override applied.
    pub fn manifest(&self) -> Result<Manifest, CliError> {
        let mut m = Manifest::load(&self.models).map_err(|e| CliError::new(exit::MODELS_MISSING, e))?;
        let overrides = [
            (Role::Base, &self.base_model),
            (Role::Controlnet, &self.controlnet_model),
            (Role::Depth, &self.depth_model),
            (Role::Saliency, &self.saliency_model),
            (Role::Text, &self.text_model),
            (Role::Image, &self.image_model),
            (Role::Rfnet, &self.rfnet_model),
        ];
        for (role, path) in overrides {
            if let Some(p) = path {
                m.set(role, p.clone());
            }
        }
        Ok(m)
    }

    /// The device `--device` asks for, with `--attention` for its jobs' kernel policy.
    pub fn select_device(&self) -> Result<crate::device::Selection, CliError> {
        crate::device::select(self.device)
            .map(|s| s.with_attention(self.attention))
            .map_err(CliError::bad_input)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Version, compiled backends, adapters, the selected device, and the state of every model.
    Info,
    /// Generate ad images for a transparent product (recurrent generation with RFNet).
    Generate(generate::GenerateArgs),
    /// Depth (DPT) and saliency (U2-Net) maps of an image, with overlays.
    Analyze(analyze::AnalyzeArgs),
    /// RFNet's five class probabilities for a generated image (or every attempt of a run).
    Score(score::ScoreArgs),
    /// Train and evaluate RFNet.
    #[command(subcommand)]
    Rfnet(rfnet::RfnetCommand),
    /// Fine-tune the ControlNet with RFNet feedback (RFFT); `rfft eval` compares ControlNets,
    /// `rfft export` writes a run's ControlNet as a diffusers folder.
    Rfft(rfft::RfftArgs),
    /// Procedurally composed ad images with labelled defects (training/demo data for RFNet).
    Synth(synth::SynthArgs),
    /// The RF1M annotation store (a folder or a postgres:// URL): init, import, export, stats,
    /// split, label, team, gold, grant, migrate.
    #[command(subcommand)]
    Dataset(dataset::DatasetCommand),
    /// A catalogue for a fleet of workers: queue it in PostgreSQL, watch its progress.
    #[command(subcommand)]
    Catalogue(catalogue::CatalogueCommand),
    /// Generate queued catalogue products until the queue is empty (any number of workers, on
    /// any machines, each on its own device).
    Worker(catalogue::WorkerArgs),
    /// Benchmarks (timings, printed as a table and JSON).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// One-time conversion of published PyTorch checkpoints into model folders.
    #[command(subcommand)]
    Convert(convert::ConvertCommand),
    /// Open the studio GUI (what `rfstudio` with no arguments does on a desktop).
    Studio(studio::StudioArgs),
}

/// Exit with code 3 and install instructions when a needed model is missing or invalid.
/// Returns a short description of the models used.
pub fn require_roles(manifest: &Manifest, roles: &[Role]) -> Result<String, CliError> {
    use crate::models::manifest::Status;
    let mut problems = Vec::new();
    let mut used = Vec::new();
    // Without a models.toml every role is unconfigured for the same reason: say it once.
    let unconfigured: Vec<Role> = roles.iter().copied().filter(|r| manifest.path(*r).is_none()).collect();
    if manifest.source.is_none() && !unconfigured.is_empty() {
        let names: Vec<&str> = unconfigured.iter().map(|r| r.name()).collect();
        let flags: Vec<&str> = unconfigured.iter().map(|r| r.flag()).collect();
        let missing_dir = if manifest.dir.is_dir() { "" } else { tr!("cli.which_does_not_exist") };
        problems.push(if names.len() == 1 {
            tr!("cli.no_manifest_one", dir = manifest.dir.display(), missing = missing_dir, roles = names.join(", "), flags = flags.join(" / "))
        } else {
            tr!("cli.no_manifest_many", dir = manifest.dir.display(), missing = missing_dir, roles = names.join(", "), flags = flags.join(" / "))
        });
        for role in &unconfigured {
            problems.push(format!("  {}", tr!("cli.install_role", role = role, hint = role.install_hint())));
        }
    }
    for &role in roles {
        if manifest.source.is_none() && unconfigured.contains(&role) {
            continue;
        }
        let r = manifest.check(role);
        match r.status {
            Status::Found(_) => used.push(format!(
                "{role}: {}",
                r.path.map(|p| p.display().to_string()).unwrap_or_default()
            )),
            Status::Missing(why) | Status::Invalid(why) => {
                problems.push(format!("{role}: {why}\n  {}", tr!("models.install", hint = role.install_hint())))
            }
        }
    }
    if problems.is_empty() {
        Ok(used.join(", "))
    } else {
        Err(CliError::new(
            exit::MODELS_MISSING,
            anyhow::anyhow!("{}\n{}", tr!("cli.models_missing"), problems.join("\n")),
        ))
    }
}

/// Whether a run needs a stand-in `XDG_RUNTIME_DIR`: on a headless machine (no display of
/// either kind) with none set, libwayland — loaded by the Vulkan driver while the GPU backends
/// are probed — prints "XDG_RUNTIME_DIR is invalid or not set" two to four times per run. With
/// the variable pointing at an empty private folder it finds no compositor, silently.
pub fn needs_runtime_dir(xdg_runtime_dir: Option<&std::ffi::OsStr>, wayland_display: Option<&std::ffi::OsStr>, display: Option<&std::ffi::OsStr>) -> bool {
    let set = |v: Option<&std::ffi::OsStr>| v.is_some_and(|v| !v.is_empty());
    !set(xdg_runtime_dir) && !set(wayland_display) && !set(display)
}

/// The private stand-in folder for `needs_runtime_dir` (created 0700, this user's), or None when
/// it cannot be made safely.
#[cfg(unix)]
pub fn headless_runtime_dir() -> Option<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let uid = std::fs::metadata("/proc/self").ok()?.uid();
    let dir = std::env::temp_dir().join(format!("rfstudio-runtime-{uid}"));
    if !dir.is_dir() {
        std::fs::create_dir(&dir).ok()?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).ok()?;
    }
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    (meta.is_dir() && meta.uid() == uid && meta.mode() & 0o077 == 0).then_some(dir)
}

#[cfg(not(unix))]
pub fn headless_runtime_dir() -> Option<PathBuf> {
    None
}

/// An error and its causes on one line, each cause shown only when its text is not already
/// part of what is shown (typed errors often embed their source's message).
pub fn render_error(e: &anyhow::Error) -> String {
    crate::errors::join_unique(e.chain().map(|c| c.to_string()))
}

/// Run a parsed command line. Returns the process exit code.
pub fn run(cli: Cli) -> Result<(), CliError> {
    // An installed rfstudio's first start: the user's models folder is created with the
    // manifest and the instructions, so `info` and the studio name the folder to fill.
    if std::env::var_os("RFSTUDIO_MODELS").is_none()
        && crate::files::user_data_dir().is_some_and(|d| cli.global.models == d.join("models"))
        && let Err(e) = crate::files::init_user_models_dir(&cli.global.models)
    {
        tracing::warn!("{e}");
    }
    match cli.command {
        Some(Command::Info) => info::run(&cli.global),
        Some(Command::Generate(args)) => generate::run(&cli.global, &args),
        Some(Command::Bench(command)) => bench::run(&cli.global, command),
        Some(Command::Dataset(command)) => dataset::run(&cli.global, command),
        Some(Command::Catalogue(command)) => catalogue::run(&cli.global, command),
        Some(Command::Worker(args)) => catalogue::worker(&cli.global, args),
        Some(Command::Synth(args)) => synth::run(&cli.global, &args),
        Some(Command::Analyze(args)) => analyze::run(&cli.global, &args),
        Some(Command::Score(args)) => score::run(&cli.global, &args),
        Some(Command::Rfnet(command)) => rfnet::run(&cli.global, command),
        Some(Command::Rfft(args)) => rfft::run(&cli.global, args),
        Some(Command::Convert(command)) => convert::run(&cli.global, command),
        Some(Command::Studio(args)) => studio::run(&cli.global, &args),
        None => studio::no_arguments(&cli.global),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn runtime_dir_only_on_a_headless_machine_without_one() {
        let s = |v: &'static str| Some(OsStr::new(v));
        assert!(needs_runtime_dir(None, None, None));
        assert!(needs_runtime_dir(s(""), None, None));
        assert!(!needs_runtime_dir(s("/run/user/1000"), None, None));
        assert!(!needs_runtime_dir(None, s("wayland-0"), None));
        assert!(!needs_runtime_dir(None, None, s(":0")));
        let dir = headless_runtime_dir().expect("a private folder");
        assert!(dir.is_dir());
    }

    #[test]
    fn errors_print_each_cause_once() {
        let inner = std::io::Error::other("database or disk is full");
        let outer = anyhow::Error::new(inner).context("data/x.sqlite: database or disk is full");
        assert_eq!(render_error(&outer), "data/x.sqlite: database or disk is full");
        let other = anyhow::anyhow!("root cause").context("while importing");
        assert_eq!(render_error(&other), "while importing: root cause");
    }

    #[test]
    fn more_severe_orders_codes() {
        assert_eq!(exit::more_severe(exit::NOT_AVAILABLE, exit::BAD_INPUT), exit::BAD_INPUT);
        assert_eq!(exit::more_severe(exit::BAD_INPUT, exit::NOT_AVAILABLE), exit::BAD_INPUT);
        assert_eq!(exit::more_severe(exit::BAD_INPUT, exit::MODELS_MISSING), exit::MODELS_MISSING);
        assert_eq!(exit::more_severe(exit::FAILURE, exit::MODELS_MISSING), exit::FAILURE);
        assert_eq!(exit::more_severe(exit::OK, exit::NOT_AVAILABLE), exit::NOT_AVAILABLE);
    }
}

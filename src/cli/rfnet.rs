//! `rfstudio rfnet train|eval`: train RFNet on a labelled dataset and evaluate a checkpoint.

use crate::tr;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use clap::{Args, Subcommand};

use super::progress::Progress;
use super::{CliError, GlobalArgs, exit};
use crate::device::{self, BackendJob};
use crate::models::manifest::{Role, Status};
use crate::train::rfnet::{self, EvalReport, TrainSettings};
use crate::train::run_folder::{RfnetEpoch, RfnetStep, RunFolderError, TrainEvent};

#[derive(Subcommand, Debug)]
pub enum RfnetCommand {
    /// Train RFNet (AdamW, step decay, checkpoints every epoch, --resume).
    Train(TrainArgs),
    /// Per-class precision/recall/F1, macro averages, AP for Available, confusion matrix, and the
    /// P(Available) threshold reaching a target precision.
    Eval(EvalArgs),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A synthetic dataset (rfstudio synth) or an annotation dataset (rfstudio dataset).
    #[arg(long)]
    pub data: PathBuf,
    /// Run folder (metrics.jsonl, checkpoint/).
    #[arg(long)]
    pub out: PathBuf,
    /// Passes over the training products (1-10000; the paper trains 10).
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// AdamW learning rate (positive, at most 1; the paper's 1e-4).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Divide the learning rate by 10 every this many epochs.
    #[arg(long, default_value_t = 5)]
    pub lr_step: usize,
    /// Samples per optimizer step (1-4096).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// AdamW weight decay (>= 0).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// Share of products held out for validation.
    #[arg(long, default_value_t = 0.2)]
    pub val_ratio: f64,
    /// Seed of the initialisation, the product split and the sample order (same seed, same run).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Draw classes uniformly (inverse-frequency sampling).
    #[arg(long)]
    pub balanced: bool,
    /// Keep the ResNet-50 and BERT encoders frozen (only the fusion head learns).
    #[arg(long)]
    pub freeze_encoders: bool,
    /// The small configuration (width 32, input 64) for CPUs and tests; default is the paper's.
    #[arg(long)]
    pub tiny: bool,
    /// Start the image encoder from random weights instead of the manifest's ResNet-50.
    #[arg(long)]
    pub scratch_image_encoder: bool,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The labelled data: a synthetic dataset (rfstudio synth) or an annotation dataset.
    #[arg(long)]
    pub data: PathBuf,
    /// A training run folder or an RFNet checkpoint folder.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Evaluate every sample instead of the held-out products.
    #[arg(long)]
    pub all: bool,
    /// Report the P(Available) threshold reaching this precision for Available (0-1].
    #[arg(long, default_value_t = 0.95)]
    pub target_precision: f64,
}

fn found(global: &GlobalArgs, role: Role) -> Result<PathBuf, CliError> {
    let manifest = global.manifest()?;
    let r = manifest.check(role);
    match (r.status, r.path) {
        (Status::Found(_), Some(p)) => Ok(p),
        (Status::Missing(why) | Status::Invalid(why), _) => Err(CliError::new(
            exit::MODELS_MISSING,
            anyhow::anyhow!("{role}: {why}\n  install: {}", role.install_hint()),
        )),
        _ => Err(CliError::new(exit::MODELS_MISSING, anyhow::anyhow!("{role}: not configured"))),
    }
}

struct TrainJob {
    settings: TrainSettings,
    out: PathBuf,
    resume: bool,
    json: bool,
}

impl BackendJob for TrainJob {
    type Output = Result<EvalReport, rfnet::TrainError>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let epochs = self.settings.epochs as u64;
        let progress = Progress::new(self.json, tr!("cli.progress_epoch"), epochs, "{prefix} {pos}/{len} [{bar:30}] {msg}");
        let json = self.json;
        let mut emit = |e: &TrainEvent| {
            if json {
                if let Ok(s) = serde_json::to_string(e) {
                    println!("{s}");
                }
                return;
            }
            match e {
                TrainEvent::Step(RfnetStep { epoch, step, loss, .. }) => {
                    progress.set(*epoch as u64 - 1, epochs, &format!("step {step} loss {loss:.4}"))
                }
                TrainEvent::Epoch(RfnetEpoch { epoch, val_macro_f1, val_accuracy, seconds, .. }) => {
                    progress.set(*epoch as u64, epochs, "");
                    progress.println(&format!(
                        "epoch {epoch}: val accuracy {val_accuracy:.3}, macro-F1 {val_macro_f1:.3} ({seconds:.1} s)"
                    ));
                }
            }
        };
        let r = rfnet::train::<B>(&self.settings, &self.out, self.resume, &device, &mut emit);
        progress.finish();
        r
    }
}

struct EvalJob {
    args: EvalArgs,
}

impl BackendJob for EvalJob {
    type Output = Result<EvalReport, rfnet::TrainError>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        rfnet::eval_checkpoint::<B>(&self.args.data, &self.args.checkpoint, self.args.all, 0.2, 0, self.args.target_precision, &device)
    }
}

fn train_code(e: &rfnet::TrainError) -> i32 {
    match e {
        rfnet::TrainError::Data(_) | rfnet::TrainError::Io { .. } | rfnet::TrainError::Settings(_) => exit::BAD_INPUT,
        rfnet::TrainError::Diverged { .. } => exit::NUMERICAL,
        rfnet::TrainError::Checkpoint(_) => exit::MODELS_MISSING,
        rfnet::TrainError::Model(_) => exit::FAILURE,
        // A damaged run folder (corrupt checkpoint, unreadable state) is bad input; a file that
        // cannot be written (disk full) is a failure.
        rfnet::TrainError::RunFolder(RunFolderError::Write(_) | RunFolderError::Record { .. }) => exit::FAILURE,
        rfnet::TrainError::RunFolder(_) => exit::BAD_INPUT,
    }
}

pub fn run(global: &GlobalArgs, command: RfnetCommand) -> Result<(), CliError> {
    let selection = global.select_device()?;
    match command {
        RfnetCommand::Train(a) => {
            let text = found(global, Role::Text)?;
            let image = if a.scratch_image_encoder {
                None
            } else {
                Some(found(global, Role::Image)?)
            };
            if !global.json {
                eprintln!("{}", selection.notice);
            }
            let settings = TrainSettings {
                data: a.data.clone(),
                epochs: a.epochs,
                lr: a.lr,
                lr_step: a.lr_step,
                batch: a.batch,
                weight_decay: a.weight_decay,
                val_ratio: a.val_ratio,
                seed: a.seed,
                balanced: a.balanced,
                freeze_encoders: a.freeze_encoders,
                tiny: a.tiny,
                image_encoder: image,
                text_encoder: text,
            };
            let job = TrainJob {
                settings,
                out: a.out.clone(),
                resume: a.resume,
                json: global.json,
            };
            let report = device::dispatch(&selection, global.dtype, job)
                .map_err(super::device_error)?
                .map_err(|e| CliError::new(train_code(&e), anyhow::Error::from(e)))?;
            print_report(global.json, &report, Some(&a.out));
            Ok(())
        }
        RfnetCommand::Eval(a) => {
            let report = device::dispatch(&selection, global.dtype, EvalJob { args: a })
                .map_err(super::device_error)?
                .map_err(|e| CliError::new(train_code(&e), anyhow::Error::from(e)))?;
            print_report(global.json, &report, None);
            Ok(())
        }
    }
}

fn print_report(json: bool, r: &EvalReport, run: Option<&Path>) {
    if json {
        if let Ok(s) = serde_json::to_string(r) {
            println!("{s}");
        }
    } else {
        print!("{}", rfnet::report_table(r));
        if let Some(run) = run {
            println!("{}", tr!("cli.checkpoint", path = run.join("checkpoint").display()));
        }
    }
}

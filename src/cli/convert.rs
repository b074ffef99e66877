//! `rfstudio convert u2net IN.pth --out DIR [--arch u2net|u2netp]`: one-time conversion of a
//! published PyTorch checkpoint into a model folder (`model.safetensors` in f32 with the keys
//! unchanged, `config.json`), checked by loading the result before reporting success.

use crate::tr;
use std::path::PathBuf;

use burn::tensor::DType;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::{CliError, GlobalArgs};
use crate::models::u2net::{U2NetArch, U2NetError, load_u2net, read_pth_checkpoint};
use crate::files::{ensure_writable_dir, write_atomic};

#[derive(Subcommand, Debug)]
pub enum ConvertCommand {
    /// U2-Net saliency: `u2net.pth` (176 MB) or `u2netp.pth` (4.7 MB) -> a saliency model folder.
    U2net(U2netArgs),
}

#[derive(Args, Debug)]
pub struct U2netArgs {
    /// The PyTorch checkpoint (`torch.save` of the state dict).
    pub input: PathBuf,
    /// Output folder (created if missing; `model.safetensors` and `config.json` are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// The size the file must hold; detected from the tensor shapes when omitted.
    #[arg(long, value_enum)]
    pub arch: Option<U2NetArch>,
}

#[derive(Serialize)]
struct ConvertReport {
    input: PathBuf,
    out: PathBuf,
    architecture: String,
    tensors: usize,
    values: usize,
    dropped_num_batches_tracked: usize,
}

pub fn run(global: &GlobalArgs, command: ConvertCommand) -> Result<(), CliError> {
    match command {
        ConvertCommand::U2net(args) => u2net(global, &args),
    }
}

fn u2net(global: &GlobalArgs, args: &U2netArgs) -> Result<(), CliError> {
    // 1. read and check the checkpoint (nothing is written for a wrong file)
    let checkpoint = read_pth_checkpoint(&args.input, args.arch).map_err(CliError::bad_input)?;
    // 2. write both files atomically
    ensure_writable_dir(&args.out).map_err(CliError::bad_input)?;
    let weights_path = args.out.join("model.safetensors");
    let bytes = checkpoint
        .safetensors_bytes(&weights_path)
        .map_err(anyhow::Error::from)?;
    write_atomic(&weights_path, &bytes).map_err(anyhow::Error::from)?;
    let config_path = args.out.join("config.json");
    write_atomic(&config_path, checkpoint.config_json().as_bytes()).map_err(anyhow::Error::from)?;
    // 3. load the result the way the app will
    let device = burn::backend::flex::FlexDevice;
    load_u2net::<burn::backend::Flex>(&args.out, DType::F32, &device)
        .map_err(|e: U2NetError| anyhow::anyhow!("the converted folder does not load: {e}"))?;
    // 4. report
    let report = ConvertReport {
        input: args.input.clone(),
        out: args.out.clone(),
        architecture: checkpoint.config.architecture.to_string(),
        tensors: checkpoint.tensors.len(),
        values: checkpoint.num_values(),
        dropped_num_batches_tracked: checkpoint.dropped,
    };
    if global.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(anyhow::Error::from)?
        );
    } else {
        println!(
            "{}",
            tr!(
                "cli.converted",
                input = report.input.display(),
                out = report.out.display(),
                architecture = report.architecture,
                tensors = report.tensors,
                millions = format!("{:.1}", report.values as f64 / 1e6),
                dropped = report.dropped_num_batches_tracked
            )
        );
    }
    Ok(())
}

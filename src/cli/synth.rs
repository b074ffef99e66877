//! `rfstudio synth`: procedurally composed, labelled ad images (see `train::synth`).

use crate::tr;
use std::path::PathBuf;

use clap::Args;

use super::progress::Progress;
use super::{CliError, GlobalArgs};
use crate::train::synth;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Number of samples (classes are balanced).
    #[arg(long)]
    pub n: usize,
    /// Output dataset folder (images/ and samples.jsonl).
    #[arg(long)]
    pub out: PathBuf,
    /// Image side in pixels.
    #[arg(long, default_value_t = 96)]
    pub size: u32,
    /// Colour/aspect variants per sample product (each variant is its own product id).
    #[arg(long, default_value_t = 12)]
    pub variants: usize,
    /// Seed of every random choice (same seed, same dataset).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder with products.jsonl and transparent product PNGs.
    #[arg(long, default_value = "sample-data")]
    pub products: PathBuf,
}

/// The largest synthetic image side (RFNet reads 384 px; 2048 leaves room for experiments).
const MAX_SYNTH_SIZE: u32 = 2048;

pub fn run(global: &GlobalArgs, a: &SynthArgs) -> Result<(), CliError> {
    if a.n == 0 {
        return Err(CliError::bad_input(anyhow::anyhow!("--n must be at least 1")));
    }
    if !(32..=MAX_SYNTH_SIZE).contains(&a.size) {
        return Err(CliError::bad_input(anyhow::anyhow!(
            "--size {} must be between 32 and {MAX_SYNTH_SIZE} pixels",
            a.size
        )));
    }
    if a.variants == 0 {
        return Err(CliError::bad_input(anyhow::anyhow!("--variants must be at least 1")));
    }
    let progress = Progress::new(global.json, "synth", a.n as u64, "{prefix} [{bar:30}] {pos}/{len}");
    let records = synth::generate(&a.products, &a.out, a.n, a.size, a.variants, a.seed, &mut |d, _| {
        progress.set(d as u64, a.n as u64, "");
    })
    .map_err(CliError::bad_input)?;
    progress.finish();
    let products: std::collections::BTreeSet<&str> = records.iter().map(|r| r.product_id.as_str()).collect();
    if global.json {
        println!("{}", serde_json::json!({"out": a.out, "samples": records.len(), "products": products.len(), "depth_source": synth::DEPTH_STAND_IN, "saliency_source": synth::SALIENCY_STAND_IN}));
    } else {
        println!(
            "{}",
            tr!("cli.synth_wrote", samples = records.len(), products = products.len(), out = a.out.display())
        );
    }
    Ok(())
}

//! `rfstudio synth`: procedurally composed, labelled ad images (see `train::synth`).

use std::path::PathBuf;

use clap::Args;
use indicatif::ProgressBar;

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
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder with products.jsonl and transparent product PNGs.
    #[arg(long, default_value = "sample-data")]
    pub products: PathBuf,
}

pub fn run(global: &GlobalArgs, a: &SynthArgs) -> Result<(), CliError> {
    if a.n == 0 || a.size < 32 {
        return Err(CliError::bad_input(anyhow::anyhow!("--n must be positive and --size at least 32")));
    }
    let bar = (!global.json).then(|| ProgressBar::new(a.n as u64));
    let records = synth::generate(&a.products, &a.out, a.n, a.size, a.variants, a.seed, &mut |d, _| {
        if let Some(b) = &bar {
            b.set_position(d as u64);
        }
    })
    .map_err(CliError::bad_input)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let products: std::collections::BTreeSet<&str> = records.iter().map(|r| r.product_id.as_str()).collect();
    if global.json {
        println!("{}", serde_json::json!({"out": a.out, "samples": records.len(), "products": products.len(), "depth_source": synth::DEPTH_STAND_IN, "saliency_source": synth::SALIENCY_STAND_IN}));
    } else {
        println!(
            "wrote {} samples ({} products) to {}; depth and saliency are stand-ins (see samples.jsonl)",
            records.len(),
            products.len(),
            a.out.display()
        );
    }
    Ok(())
}

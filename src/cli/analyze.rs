//! `rfstudio analyze`: depth (DPT) and saliency (U2-Net) maps of an image, with overlays.

use crate::tr;
use std::path::PathBuf;

use burn::tensor::backend::Backend;
use clap::Args;

use super::{CliError, GlobalArgs, require_roles};
use crate::device::{self, BackendJob};
use crate::models::manifest::Role;
use crate::pipeline::judge::{JudgeSides, Perception};
use crate::files::ensure_writable_dir;
use crate::pipeline::output::{save_gray, save_rgb};
use crate::pipeline::overlay::{depth_overlay, saliency_overlay};

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// The image to analyse (PNG, JPEG or WebP).
    #[arg(long)]
    pub image: PathBuf,
    /// Output folder: depth.png, saliency.png, depth_overlay.png, saliency_overlay.png.
    #[arg(long)]
    pub out: PathBuf,
}

struct AnalyzeJob {
    image: image::RgbImage,
    out: PathBuf,
    depth: PathBuf,
    saliency: PathBuf,
    dtype: burn::tensor::DType,
}

impl BackendJob for AnalyzeJob {
    type Output = Result<Vec<PathBuf>, CliError>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let perception = Perception::<B>::load(&self.depth, &self.saliency, JudgeSides::default(), self.dtype, &device)
            .map_err(|e| CliError::new(super::score_code(&e), e))?;
        let (d, s) = perception.map_images(&self.image).map_err(super::non_finite)?;
        let out = |name: &str| self.out.join(name);
        let w = |e: crate::pipeline::output::OutputError| CliError::bad_input(e);
        save_gray(&out("depth.png"), &d).map_err(w)?;
        save_gray(&out("saliency.png"), &s).map_err(w)?;
        save_rgb(&out("depth_overlay.png"), &depth_overlay(&self.image, &d), &[]).map_err(w)?;
        save_rgb(&out("saliency_overlay.png"), &saliency_overlay(&self.image, &s), &[]).map_err(w)?;
        Ok(["depth.png", "saliency.png", "depth_overlay.png", "saliency_overlay.png"]
            .iter()
            .map(|n| out(n))
            .collect())
    }
}

pub fn run(global: &GlobalArgs, a: &AnalyzeArgs) -> Result<(), CliError> {
    let manifest = global.manifest()?;
    require_roles(&manifest, &[Role::Depth, Role::Saliency])?;
    let image = crate::pipeline::image_io::open_image(&a.image)
        .map_err(CliError::bad_input)?
        .into_rgb8();
    ensure_writable_dir(&a.out).map_err(CliError::bad_input)?;
    let selection = global.select_device()?;
    let job = AnalyzeJob {
        image,
        out: a.out.clone(),
        depth: manifest.path(Role::Depth).map(PathBuf::from).unwrap_or_default(),
        saliency: manifest.path(Role::Saliency).map(PathBuf::from).unwrap_or_default(),
        dtype: global.dtype.dtype(),
    };
    let files = device::dispatch(&selection, global.dtype, job).map_err(super::device_error)??;
    if global.json {
        println!("{}", serde_json::json!({"files": files, "test_weights": manifest.test_weights}));
    } else {
        for f in files {
            println!("{}", tr!("cli.wrote", path = f.display()));
        }
        if manifest.test_weights {
            println!("{}", tr!("cli.analyze_test_weights"));
        }
    }
    Ok(())
}

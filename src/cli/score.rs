//! `rfstudio score`: depth, saliency and RFNet on one image, or on every attempt of a
//! generation output folder. This is the scorer recurrent generation calls.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use clap::Args;
use image::RgbImage;

use super::{CliError, GlobalArgs, require_roles};
use crate::device::{self, BackendJob};
use crate::models::manifest::Role;
use crate::pipeline::product::{Placement, place_file};
use crate::pipeline::score::CLASS_NAMES;
use crate::pipeline::judge::{Judge, JudgePaths, JudgeSides};
use crate::files::ReadError;
use crate::pipeline::run_folder::{RunFolder, RunFolderError};

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// The generated ad image.
    #[arg(long, required_unless_present = "attempts")]
    pub image: Option<PathBuf>,
    /// The transparent product image (placed like generation's defaults), or an already placed
    /// product of the image's size.
    #[arg(long, required_unless_present = "attempts")]
    pub product: Option<PathBuf>,
    /// The product title (caption).
    #[arg(long, default_value = "")]
    pub title: String,
    /// Score every attempt_*.png of a `rfstudio generate` output folder (product.png and the
    /// title from run.json); writes scores.jsonl there.
    #[arg(long, conflicts_with_all = ["image", "product"])]
    pub attempts: Option<PathBuf>,
}

/// The product over white at the image's size.
fn product_on_white(path: &Path, size: (u32, u32)) -> Result<RgbImage, CliError> {
    let rgba = crate::pipeline::product::load_rgba(path, false).map_err(CliError::bad_input)?;
    let placed = if rgba.dimensions() == size {
        rgba
    } else {
        place_file(
            path,
            &Placement {
                canvas: size.0.max(64) / 64 * 64,
                ..Placement::default()
            },
        )
        .map_err(CliError::bad_input)?
        .rgba
    };
    let placed = if placed.dimensions() == size {
        placed
    } else {
        image::imageops::resize(&placed, size.0, size.1, image::imageops::FilterType::Triangle)
    };
    Ok(RgbImage::from_fn(size.0, size.1, |x, y| {
        let p = placed.get_pixel(x, y);
        let a = p[3] as f32 / 255.0;
        image::Rgb([0, 1, 2].map(|c| (a * p[c] as f32 + (1.0 - a) * 255.0).round() as u8))
    }))
}

struct Item {
    name: String,
    image: RgbImage,
    product: RgbImage,
    title: String,
}

struct ScoreJob {
    paths: JudgePaths,
    items: Vec<Item>,
    dtype: burn::tensor::DType,
}

impl BackendJob for ScoreJob {
    type Output = Result<Vec<(String, [f32; 5])>, CliError>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let scorer = Judge::<B>::load(&self.paths, JudgeSides::default(), self.dtype, &device)
            .map_err(|e| CliError::new(super::score_code(&e), e))?;
        self.items
            .iter()
            .map(|it| {
                scorer
                    .score_rgb(&it.product, &it.image, &it.title)
                    .map(|s| (it.name.clone(), s.probs.0))
                    .map_err(|e| CliError::new(super::score_code(&e), anyhow::anyhow!("{}: {e}", it.name)))
            })
            .collect()
    }
}

pub fn run(global: &GlobalArgs, a: &ScoreArgs) -> Result<(), CliError> {
    let manifest = global.manifest()?;
    require_roles(&manifest, &[Role::Depth, Role::Saliency, Role::Rfnet])?;
    let read = |p: &Path| -> Result<RgbImage, CliError> {
        Ok(crate::pipeline::image_io::open_image(p)
            .map_err(CliError::bad_input)?
            .into_rgb8())
    };
    let mut items = Vec::new();
    if let Some(dir) = &a.attempts {
        let folder = RunFolder::new(dir);
        // The run's own title when its run.json is readable; `--title` otherwise (a folder
        // assembled by hand).
        let title = match folder.read_manifest() {
            Ok(run) => run.params.title,
            Err(RunFolderError::Read(ReadError::Io { .. })) => a.title.clone(),
            Err(e) => return Err(CliError::bad_input(e)),
        };
        let files = folder.attempt_images().map_err(CliError::bad_input)?;
        if files.is_empty() {
            return Err(CliError::bad_input(anyhow::anyhow!("{}: no attempt_*.png files", dir.display())));
        }
        for f in files {
            let image = read(&f)?;
            let product = product_on_white(&folder.product_path(), image.dimensions())?;
            items.push(Item {
                name: f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                image,
                product,
                title: title.clone(),
            });
        }
    } else if let (Some(img), Some(prod)) = (&a.image, &a.product) {
        let image = read(img)?;
        let product = product_on_white(prod, image.dimensions())?;
        items.push(Item {
            name: img.display().to_string(),
            image,
            product,
            title: a.title.clone(),
        });
    }
    let paths = JudgePaths {
        depth: manifest.path(Role::Depth).map(PathBuf::from).unwrap_or_default(),
        saliency: manifest.path(Role::Saliency).map(PathBuf::from).unwrap_or_default(),
        rfnet: manifest.path(Role::Rfnet).map(PathBuf::from).unwrap_or_default(),
        text: None,
    };
    let selection = global.select_device()?;
    let results = device::dispatch(&selection, global.dtype, ScoreJob {
        paths,
        items,
        dtype: global.dtype.dtype(),
    })
    .map_err(super::device_error)??;
    let mut lines = String::new();
    for (name, p) in &results {
        let v = serde_json::json!({"image": name, "probs": p, "classes": CLASS_NAMES, "test_weights": manifest.test_weights});
        lines.push_str(&format!("{v}\n"));
        if global.json {
            println!("{v}");
        } else {
            let desc: Vec<String> = p.iter().enumerate().map(|(i, v)| format!("{} {v:.3}", crate::i18n::class_name(i))).collect();
            println!("{name}: {}", desc.join(", "));
        }
    }
    if let Some(dir) = &a.attempts {
        crate::files::write_atomic(&dir.join("scores.jsonl"), lines.as_bytes()).map_err(CliError::bad_input)?;
    }
    Ok(())
}

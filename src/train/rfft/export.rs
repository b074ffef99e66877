//! After RFFT: exporting the fine-tuned ControlNet as a diffusers folder, and comparing
//! ControlNets side by side (availability by RFNet, attempts until Available, variety).

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use serde::Serialize;

use super::config::{ProductSpec, ResolvedModels};
use super::error::RfftError;
use super::session::rms_distance;
use super::trainer::{load_finetuned, load_finetuned_lora};
use crate::models::lora_file::{CONTROLNET_PREFIX, KohyaLayer, write_kohya};
use burn::tensor::Tensor;
use crate::models::controlnet::{ControlNetConfig, ControlNetModel};
use crate::models::single_file::controlnet_ldm_key;
use crate::models::unet::unet_public_key;
use crate::models::weights::save_module_renamed;
use crate::pipeline::generate::{AdGenerator, CancelToken, ModelPaths};
use crate::pipeline::params::GenerateParams;
use crate::pipeline::product::{Placement, place_file};
use crate::pipeline::score::Scorer;
use crate::pipeline::judge::{Judge, JudgePaths, JudgeSides};

/// Write `cn` as a diffusers ControlNet folder: the base ControlNet's `config.json` (the
/// architecture is unchanged; for a single-file base, the configuration inferred from it) +
/// `diffusion_pytorch_model.safetensors` (f32, diffusers keys).
pub fn save_controlnet_folder<B: Backend>(cn: &ControlNetModel<B>, base: &Path, out: &Path, note: &str) -> Result<usize, RfftError> {
    std::fs::create_dir_all(out).map_err(|e| RfftError::Io {
        path: out.to_path_buf(),
        reason: e.to_string(),
    })?;
    let config = crate::pipeline::sd::controlnet_config_json(base).map_err(|e| RfftError::Models(e.to_string()))?;
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    crate::files::write_atomic(&out.join("config.json"), text.as_bytes()).map_err(|e| RfftError::Io {
        path: out.join("config.json"),
        reason: e.to_string(),
    })?;
    save_module_renamed(
        cn,
        &out.join("diffusion_pytorch_model.safetensors"),
        &[("format", "pt"), ("rfstudio", note)],
        &unet_public_key,
    )
    .map_err(|e| RfftError::Train(e.to_string()))
}

/// Write `cn` as one `.safetensors` in the original `control_model.*` layout that A1111's
/// ControlNet extension and ComfyUI load (f32; the architecture is the base ControlNet's).
pub fn save_controlnet_single_file<B: Backend>(cn: &ControlNetModel<B>, base: &Path, out: &Path, note: &str) -> Result<usize, RfftError> {
    let config = crate::pipeline::sd::controlnet_config_json(base).map_err(|e| RfftError::Models(e.to_string()))?;
    let label = base.display().to_string();
    let (cn_config, unet_config) =
        ControlNetConfig::from_json(&config.to_string(), &label).map_err(|e| RfftError::Models(e.to_string()))?;
    let layers = unet_config.layers_per_block;
    let hint_blocks = 2 * cn_config.conditioning_embedding_out_channels.len().saturating_sub(1);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| RfftError::Io {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    // The diffusers config rides along in the header: heads and group counts are not in the
    // tensors, and rfstudio reads them back from here (other tools use SD 1.5's values).
    let config_text = config.to_string();
    save_module_renamed(cn, out, &[("format", "pt"), ("rfstudio", note), ("config", &config_text)], &|k: &str| {
        controlnet_ldm_key(&unet_public_key(k), layers, hint_blocks)
    })
    .map_err(|e| RfftError::Train(e.to_string()))
}

/// How `rfft export` writes the fine-tuned ControlNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// A diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`).
    Diffusers,
    /// One `.safetensors` in the original `control_model.*` layout (A1111, ComfyUI).
    SingleFile,
    /// A LoRA run's adapters alone, kohya-style (`lora_controlnet_<layer>.lora_down/up/alpha`).
    KohyaLora,
}

/// Write a LoRA run's adapters as a kohya-style LoRA file; the ControlNet they adapt is the
/// run's base ControlNet. Factors are stored in PyTorch's layout with alpha = scale x rank.
pub fn save_kohya_lora<B: Backend>(run: &Path, out: &Path, device: &B::Device) -> Result<usize, RfftError> {
    let Some((adapters, info)) = load_finetuned_lora::<B>(run, device)? else {
        return Err(RfftError::Config(format!(
            "{}: this run fine-tuned the whole ControlNet (lora_rank = 0); export it as --format diffusers or single-file",
            run.display()
        )));
    };
    let read = |t: Tensor<B, 2>| -> Result<Vec<f32>, RfftError> {
        t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| RfftError::Train(format!("{e:?}")))
    };
    let mut layers = Vec::new();
    for (i, target) in info.targets.iter().enumerate() {
        let module = unet_public_key(&target.path);
        let module = module.strip_suffix(".weight").unwrap_or(&module).to_string();
        // ours: delta = down [in, r] @ up [r, out]; PyTorch's: up^T [out, r] @ down^T [r, in].
        let down = read(adapters.down[i].val().transpose())?;
        let up = read(adapters.up[i].val().transpose())?;
        let (r, fin, fout) = (info.rank, target.in_features, target.out_features);
        let (down_shape, up_shape) = if target.conv { (vec![r, fin, 1, 1], vec![fout, r, 1, 1]) } else { (vec![r, fin], vec![fout, r]) };
        layers.push(KohyaLayer {
            module,
            down: (down, down_shape),
            up: (up, up_shape),
            alpha: info.scale * r as f32,
        });
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| RfftError::Io {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    write_kohya(out, CONTROLNET_PREFIX, &layers, &[("rfstudio", "rfft export (kohya LoRA for the run's ControlNet)")])
        .map_err(|e| RfftError::Train(e.to_string()))
}

/// Export a run's fine-tuned ControlNet (LoRA merged) to `out`; returns the tensor count.
pub fn export_run<B: Backend>(run: &Path, models: &ResolvedModels, out: &Path, format: ExportFormat, device: &B::Device) -> Result<usize, RfftError> {
    match format {
        ExportFormat::Diffusers => {
            let cn = load_finetuned::<B>(run, models, DType::F32, device)?;
            save_controlnet_folder(&cn, &models.controlnet, out, "rfft export")
        }
        ExportFormat::SingleFile => {
            let cn = load_finetuned::<B>(run, models, DType::F32, device)?;
            save_controlnet_single_file(&cn, &models.controlnet, out, "rfft export")
        }
        ExportFormat::KohyaLora => save_kohya_lora::<B>(run, out, device),
    }
}

/// One ControlNet's results on the comparison set.
#[derive(Clone, Debug, Serialize)]
pub struct ControlNetReport {
    pub controlnet: PathBuf,
    pub samples: usize,
    /// Share of all samples with P(Available) >= threshold.
    pub availability_rate: f64,
    /// Mean over products of the 1-based index of the first Available seed, counting products
    /// with none as `seeds + 1` (censored, see `never_available`).
    pub mean_attempts: f64,
    /// Products with no Available image among the seeds.
    pub never_available: usize,
    /// Mean P(Available).
    pub mean_p_available: f64,
    /// Variety: mean pairwise RMS distance (0..1 pixel units) between the backgrounds generated
    /// for the same product across seeds (outside the product). Availability alone rewards
    /// collapse; this must stay close to the original's.
    pub background_variety: f64,
    pub per_product: Vec<ProductReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProductReport {
    pub product: String,
    pub p_available: Vec<f32>,
    pub first_available: Option<usize>,
}

/// Settings of a comparison.
#[derive(Clone, Debug)]
pub struct CompareSettings {
    pub seeds: usize,
    pub steps: usize,
    pub image_size: u32,
    pub threshold: f32,
    pub guidance: f32,
    pub product_scale: f32,
}

/// Generate `seeds` images per product with each ControlNet (same seeds), score them with RFNet
/// and report availability, attempts-to-available and background variety.
#[allow(clippy::too_many_arguments)]
pub fn compare_controlnets<B: Backend>(
    base: &Path,
    controlnets: &[PathBuf],
    scorer: &JudgePaths,
    products: &[ProductSpec],
    settings: &CompareSettings,
    dtype: DType,
    device: &B::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<ControlNetReport>, RfftError> {
    let mut scorer = Judge::<B>::load(scorer, JudgeSides::default(), dtype, device).map_err(|e| RfftError::Models(e.to_string()))?;
    let placement = Placement {
        canvas: settings.image_size,
        scale: settings.product_scale,
        ..Placement::default()
    };
    let placed = products
        .iter()
        .map(|p| place_file(&p.image, &placement).map_err(|e| RfftError::Config(format!("product {:?}: {e}", p.name()))))
        .collect::<Result<Vec<_>, _>>()?;
    let total = controlnets.len() * products.len();
    let mut done = 0;
    let mut reports = Vec::new();
    let mut generator: Option<AdGenerator<B>> = None;
    for cn_dir in controlnets {
        let paths = ModelPaths {
            base: base.to_path_buf(),
            controlnet: cn_dir.clone(),
            scorer: None,
            test_weights: false,
            loras: Vec::new(),
        };
        // load SD once; swap the ControlNet
        generator = Some(match generator.take() {
            None => AdGenerator::<B>::load(&paths, dtype, device).map_err(|e| RfftError::Models(e.to_string()))?,
            Some(mut g) => {
                g.controlnet = crate::pipeline::sd::load_controlnet::<B>(cn_dir, dtype, device)
                    .map_err(|e| RfftError::Models(format!("ControlNet {}: {e}", cn_dir.display())))?;
                g
            }
        });
        let Some(g) = generator.as_ref() else { continue };
        let mut per_product = Vec::new();
        let (mut variety_sum, mut variety_n) = (0.0, 0usize);
        for (spec, product) in products.iter().zip(&placed) {
            let params = GenerateParams {
                prompt: spec.prompt.clone(),
                negative: spec.negative.clone(),
                title: spec.title.clone(),
                steps: settings.steps,
                guidance: settings.guidance,
                canvas: settings.image_size,
                scale: settings.product_scale,
                ..GenerateParams::default()
            };
            let context = g
                .sd
                .encode_prompt_pair(&spec.prompt, &spec.negative, device)
                .map_err(|e| RfftError::Train(e.to_string()))?;
            let latents = g.product_latents(product).map_err(|e| RfftError::Train(e.to_string()))?;
            let seeds: Vec<u64> = (0..settings.seeds as u64).collect();
            let images = g
                .generate_batch(product, &context, &latents, &seeds, &params, &CancelToken::new(), |_, _, _| {})
                .map_err(|e| RfftError::Train(e.to_string()))?;
            let mut p_available = Vec::new();
            for img in &images {
                let scored = scorer
                    .score(product, img, &spec.title)
                    .map_err(|e| RfftError::Train(e.to_string()))?;
                p_available.push(scored.probs.available());
            }
            let first_available = p_available.iter().position(|&p| p >= settings.threshold).map(|i| i + 1);
            let background: Vec<bool> = product.rgba.pixels().map(|p| p[3] < 128).collect();
            for i in 0..images.len() {
                for j in i + 1..images.len() {
                    variety_sum += rms_distance(&images[i], &images[j], &background);
                    variety_n += 1;
                }
            }
            per_product.push(ProductReport {
                product: spec.name(),
                p_available,
                first_available,
            });
            done += 1;
            progress(done, total);
        }
        let samples: usize = per_product.iter().map(|p| p.p_available.len()).sum();
        let available: usize = per_product
            .iter()
            .map(|p| p.p_available.iter().filter(|&&x| x >= settings.threshold).count())
            .sum();
        let n_products = per_product.len().max(1) as f64;
        reports.push(ControlNetReport {
            controlnet: cn_dir.clone(),
            samples,
            availability_rate: available as f64 / samples.max(1) as f64,
            mean_attempts: per_product
                .iter()
                .map(|p| p.first_available.unwrap_or(settings.seeds + 1) as f64)
                .sum::<f64>()
                / n_products,
            never_available: per_product.iter().filter(|p| p.first_available.is_none()).count(),
            mean_p_available: per_product.iter().flat_map(|p| p.p_available.iter()).map(|&x| x as f64).sum::<f64>()
                / samples.max(1) as f64,
            background_variety: if variety_n > 0 { variety_sum / variety_n as f64 } else { 0.0 },
            per_product,
        });
    }
    Ok(reports)
}

/// Side-by-side table of comparison reports.
pub fn compare_table(reports: &[ControlNetReport]) -> String {
    let mut s = format!(
        "{:<40} {:>8} {:>13} {:>14} {:>16} {:>10}\n",
        "controlnet", "samples", "availability", "mean attempts", "never available", "variety"
    );
    for r in reports {
        let name = r.controlnet.display().to_string();
        let short = if name.len() > 40 { format!("...{}", &name[name.len() - 37..]) } else { name };
        s.push_str(&format!(
            "{:<40} {:>8} {:>12.1}% {:>14.2} {:>16} {:>10.4}\n",
            short,
            r.samples,
            100.0 * r.availability_rate,
            r.mean_attempts,
            r.never_available,
            r.background_variety
        ));
    }
    s
}

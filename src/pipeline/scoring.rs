//! The RFNet scorer used by recurrent generation and `rfstudio score`: depth (DPT) and saliency
//! (U2-Net) of the generated image, then RFNet on (product, image, depth, saliency, title).

use std::path::Path;

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use image::{GrayImage, RgbImage};

use super::product::PlacedProduct;
use super::score::{ClassProbs, ScoreError, Scored, Scorer};
use crate::models::bert::BertTokenizer;
use crate::models::dpt::DepthEstimator;
use crate::models::rfnet::{RfNet, RfNetConfig, load_rfnet};
use crate::models::u2net::Saliency;
use crate::train::rfnet::{Prepared, predict};

/// Folders of the three models a score needs.
#[derive(Clone, Debug)]
pub struct ScorerPaths {
    pub depth: std::path::PathBuf,
    pub saliency: std::path::PathBuf,
    pub rfnet: std::path::PathBuf,
}

impl ScorerPaths {
    /// DPT + U2-Net + RFNet from a manifest. `Ok(None)` only when no RFNet is installed (its
    /// role is not configured or its folder does not exist): generation then runs unscored and
    /// says so. An RFNet folder that exists but is unusable, or an installed RFNet whose depth
    /// or saliency model is missing or invalid, is an error (`ScoreError::Models`): a broken
    /// install must never silently turn scoring off.
    pub fn from_manifest(manifest: &crate::models::manifest::Manifest) -> Result<Option<Self>, ScoreError> {
        use crate::models::manifest::{Role, Status};
        let rfnet_absent = manifest.path(Role::Rfnet).is_none_or(|p| !p.exists());
        if rfnet_absent {
            return Ok(None);
        }
        let found = |role: Role, what: &'static str| -> Result<std::path::PathBuf, ScoreError> {
            let r = manifest.check(role);
            let path = r.path.clone().unwrap_or_default();
            match r.status {
                Status::Found(_) => Ok(path),
                Status::Missing(why) | Status::Invalid(why) => Err(ScoreError::Models {
                    what,
                    path,
                    reason: format!(
                        "{why} (RFNet is installed, so recurrent generation needs the {role} model too; install: {})",
                        role.install_hint()
                    ),
                }),
            }
        };
        Ok(Some(Self {
            rfnet: found(Role::Rfnet, "RFNet")?,
            depth: found(Role::Depth, "depth model")?,
            saliency: found(Role::Saliency, "saliency model")?,
        }))
    }
}

pub struct RfNetScorer<B: Backend> {
    pub depth: DepthEstimator<B>,
    pub saliency: Saliency<B>,
    pub rfnet: RfNet<B>,
    pub config: RfNetConfig,
    pub tokenizer: BertTokenizer,
    pub device: B::Device,
    name: String,
    rfnet_weights: std::path::PathBuf,
}

impl<B: Backend> RfNetScorer<B> {
    pub fn load(paths: &ScorerPaths, dtype: DType, device: &B::Device) -> Result<Self, ScoreError> {
        let e = |what: &'static str, p: &Path, err: &dyn std::fmt::Display| ScoreError::Models {
            what,
            path: p.to_path_buf(),
            reason: err.to_string(),
        };
        let depth = DepthEstimator::load(&paths.depth, dtype, device).map_err(|x| e("depth model", &paths.depth, &x))?;
        let saliency = Saliency::load(&paths.saliency, dtype, device).map_err(|x| e("saliency model", &paths.saliency, &x))?;
        let (rfnet, config) = load_rfnet::<B>(&paths.rfnet, dtype, device).map_err(|x| e("RFNet", &paths.rfnet, &x))?;
        let tokenizer = BertTokenizer::from_folder(&paths.rfnet).map_err(|x| e("RFNet tokenizer", &paths.rfnet, &x))?;
        let name = format!(
            "rfnet {} [{}]",
            paths.rfnet.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            crate::pipeline::generate::short_hash(&paths.rfnet.join("model.safetensors"))
        );
        Ok(Self {
            depth,
            saliency,
            rfnet,
            config,
            tokenizer,
            device: device.clone(),
            name,
            rfnet_weights: paths.rfnet.join("model.safetensors"),
        })
    }

    /// Score an image given the product image RFNet sees (the placed product on white).
    pub fn score_images(&self, product: &RgbImage, image: &RgbImage, title: &str) -> Result<Scored, ScoreError> {
        let depth = self.depth.depth_map(image)?;
        let saliency = self.saliency.saliency_map(image)?;
        let size = self.config.input_size as u32;
        let fit = |img: &RgbImage| image::imageops::resize(img, size, size, image::imageops::FilterType::Triangle);
        let grey = |g: &GrayImage| {
            let r = image::imageops::resize(g, size, size, image::imageops::FilterType::Triangle);
            RgbImage::from_fn(size, size, |x, y| {
                let v = r.get_pixel(x, y)[0];
                image::Rgb([v, v, v])
            })
        };
        let prepared = Prepared {
            product: fit(product),
            generated: fit(image),
            depth: grey(&depth),
            saliency: grey(&saliency),
            title: title.to_string(),
        };
        let probs = predict::<B>(&self.rfnet, &self.tokenizer, self.config.max_caption_tokens, &[prepared], 1, &self.device)
            .map_err(|e| ScoreError::Failed(e.to_string()))?;
        let p = probs.first().copied().ok_or_else(|| ScoreError::Failed("no prediction".into()))?;
        if p.iter().any(|x| !x.is_finite()) {
            return Err(ScoreError::NonFinite(crate::models::weights::NonFiniteOutput::diagnose(
                "RFNet",
                "class probabilities",
                self.depth.dtype,
                &[self.rfnet_weights.clone()],
            )));
        }
        Ok(Scored {
            probs: ClassProbs(p),
            depth: Some(depth),
            saliency: Some(saliency),
        })
    }
}

impl<B: Backend> Scorer for RfNetScorer<B> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn score(&mut self, product: &PlacedProduct, image: &RgbImage, title: &str) -> Result<Scored, ScoreError> {
        self.score_images(&product.init_rgb(), image, title)
    }
}

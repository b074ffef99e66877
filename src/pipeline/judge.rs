//! The one judge: depth (DPT), saliency (U2-Net) and RFNet on a generated ad image, as a single
//! tensor function used by recurrent generation, `score`, `rfft eval` and — differentiably, on the
//! autodiff backend — RFFT's F_AC (PAPER.md "Recurrent generation with RFNet").
//!
//! The preprocessing is defined once, on tensors in [0, 1]:
//! 1. depth: bilinear resize to DPT's input side, normalise with the processor's mean/std, DPT,
//!    min-max per image;
//! 2. saliency: bilinear resize to U2-Net's side, divide by the image's maximum, ImageNet
//!    normalisation, U2-Net's fused map d0, min-max per image;
//! 3. RFNet: the image, the depth and the saliency map bilinear-resized to RFNet's input side,
//!    the maps as three grey channels, all ImageNet-normalised; the product (over white) and the
//!    caption as RFNet was trained with them (`resnet::imagenet_input`, the BERT tokenizer).
//!
//! The only place the paths differ is what they are handed: generation and `score` judge the
//! 8-bit image that is saved (an image read back from its PNG is bit-identical), RFFT judges the
//! float image before that rounding. The 8-bit quantisation (at most half a level per channel) is
//! the documented source of any difference between training's F_AC and the reported availability.
//! Depth and saliency maps saved next to an attempt are the same maps, resized to the image and
//! rounded to 8 bits.

use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module};
use burn::tensor::activation::softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};
use image::{GrayImage, RgbImage};

use super::image_io::{rgb_to_tensor, tensor_to_gray};
use super::score::{ClassProbs, ScoreError, Scored, Scorer};
use crate::models::bert::BertTokenizer;
use crate::models::dpt::{DptForDepthEstimation, DptPreprocess, load_dpt};
use crate::models::ops::resize_bilinear;
use crate::models::resnet::{IMAGENET_MEAN, IMAGENET_STD, imagenet_input};
use crate::models::rfnet::{RfNet, RfNetConfig, RfNetInput, load_rfnet};
use crate::models::u2net::{U2Net, load_u2net};
use crate::models::weights::NonFiniteOutput;

/// Folders of the models the judge needs.
#[derive(Clone, Debug)]
pub struct JudgePaths {
    pub depth: PathBuf,
    pub saliency: PathBuf,
    pub rfnet: PathBuf,
    /// A BERT folder whose `vocab.txt` is used when the RFNet folder has none.
    pub text: Option<PathBuf>,
}

impl JudgePaths {
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
        let found = |role: Role, what: &'static str| -> Result<PathBuf, ScoreError> {
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
            text: None,
        }))
    }
}

/// Input sides that differ from the models' own (RFFT at small sizes); None keeps the model's.
#[derive(Clone, Copy, Debug, Default)]
pub struct JudgeSides {
    pub depth: Option<usize>,
    pub saliency: Option<usize>,
}

/// Depth and saliency of images: the first two parts of the judge (what `analyze` shows).
#[derive(Module, Debug)]
pub struct Perception<B: Backend> {
    pub depth: DptForDepthEstimation<B>,
    pub saliency: U2Net<B>,
    /// DPT input (height, width), normalisation mean and std; U2-Net's input side.
    #[module(skip)]
    pub settings: PerceptionSettings,
}

/// The non-learned part of `Perception`.
#[derive(Clone, Debug)]
pub struct PerceptionSettings {
    pub depth_side: (usize, usize),
    pub depth_mean: [f32; 3],
    pub depth_std: [f32; 3],
    pub saliency_side: usize,
    /// The weight files and the compute dtype, to diagnose a non-finite output.
    pub weights: Vec<PathBuf>,
    pub dtype: DType,
}

fn model_err<'a>(what: &'static str, path: &'a Path) -> impl Fn(&dyn std::fmt::Display) -> ScoreError + 'a {
    move |e| ScoreError::Models {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

impl<B: Backend> Perception<B> {
    /// Load DPT (with its `preprocessor_config.json`) and U2-Net, frozen (no gradients).
    pub fn load(depth_dir: &Path, saliency_dir: &Path, sides: JudgeSides, dtype: DType, device: &B::Device) -> Result<Self, ScoreError> {
        let depth = load_dpt::<B>(depth_dir, dtype, device).map_err(|e| model_err("depth model", depth_dir)(&e))?;
        let pre = DptPreprocess::from_folder(depth_dir);
        let (h, w) = pre.side();
        let pick = |v: &[f32]| [0, 1, 2].map(|i| v.get(i).copied().unwrap_or(0.5));
        let (saliency, saliency_config, _) =
            load_u2net::<B>(saliency_dir, dtype, device).map_err(|e| model_err("saliency model", saliency_dir)(&e))?;
        let mut weights: Vec<PathBuf> =
            crate::models::manifest::find_weights(depth_dir, &["model.safetensors", "model.fp16.safetensors"]).into_iter().collect();
        weights.push(saliency_dir.join("model.safetensors"));
        Ok(Self {
            depth: depth.no_grad(),
            saliency: saliency.no_grad(),
            settings: PerceptionSettings {
                depth_side: sides.depth.map(|s| (s, s)).unwrap_or((h as usize, w as usize)),
                depth_mean: pick(&pre.image_mean),
                depth_std: pick(&pre.image_std),
                saliency_side: sides.saliency.unwrap_or(saliency_config.input_size as usize),
                weights,
                dtype,
            },
        })
    }

    /// Depth and saliency of `image` ([N, 3, H, W] in [0, 1]): each [N, 1, h, w] in [0, 1] at
    /// the model's output resolution, min-max normalised per image.
    pub fn maps(&self, image: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let s = &self.settings;
        let [n, _, _, _] = image.dims();
        // 1. depth
        let (dh, dw) = s.depth_side;
        let x = normalise(resize_bilinear(image.clone(), dh, dw, false), s.depth_mean, s.depth_std);
        let d = self.depth.forward(x);
        let [_, h, w] = d.dims();
        let depth = min_max(d.reshape([n, 1, h, w]));
        // 2. saliency
        let side = s.saliency_side;
        let x = resize_bilinear(image, side, side, false);
        let max = x.clone().reshape([n, 3 * side * side]).max_dim(1).reshape([n, 1, 1, 1]).clamp_min(1e-6);
        let x = normalise(x / max, IMAGENET_MEAN, IMAGENET_STD);
        let [d0, ..] = self.saliency.forward(x);
        (depth, min_max(d0))
    }

    /// The 8-bit depth and saliency maps of one image at its size (for saving and overlays).
    pub fn map_images(&self, image: &RgbImage) -> Result<(GrayImage, GrayImage), NonFiniteOutput> {
        let (w, h) = image.dimensions();
        let device = self.device();
        let (depth, saliency) = self.maps(rgb_to_tensor::<B>(image, &device));
        let at_size = |m: Tensor<B, 4>| resize_bilinear(m, h as usize, w as usize, false);
        let (depth, saliency) = (at_size(depth), at_size(saliency));
        let check = |t: &Tensor<B, 4>, model: &str, stage: &str| -> Result<(), NonFiniteOutput> {
            let v = t.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
            if v.iter().any(|x| !x.is_finite()) {
                return Err(NonFiniteOutput::diagnose(model, stage, self.settings.dtype, &self.settings.weights));
            }
            Ok(())
        };
        check(&depth, "DPT depth model", "depth map")?;
        check(&saliency, "U2-Net saliency model", "saliency map")?;
        let first = |v: Vec<GrayImage>| v.into_iter().next().unwrap_or_else(|| GrayImage::new(w, h));
        Ok((first(tensor_to_gray(depth)), first(tensor_to_gray(saliency))))
    }

    fn device(&self) -> B::Device {
        self.depth.devices().into_iter().next().unwrap_or_default()
    }
}

/// Depth + saliency + RFNet: the judge of a generated ad image.
pub struct Judge<B: Backend> {
    pub perception: Perception<B>,
    pub rfnet: RfNet<B>,
    pub rfnet_config: RfNetConfig,
    /// None for a judge of random weights built in memory (`bench rfft`): captions then come
    /// ready-made.
    pub tokenizer: Option<BertTokenizer>,
    rfnet_weights: PathBuf,
    name: String,
}

impl<B: Backend> Judge<B> {
    /// Load the three models, frozen (no gradients), and RFNet's tokenizer.
    pub fn load(paths: &JudgePaths, sides: JudgeSides, dtype: DType, device: &B::Device) -> Result<Self, ScoreError> {
        let perception = Perception::load(&paths.depth, &paths.saliency, sides, dtype, device)?;
        let (rfnet, rfnet_config) = load_rfnet::<B>(&paths.rfnet, dtype, device).map_err(|e| model_err("RFNet", &paths.rfnet)(&e))?;
        let tokenizer = BertTokenizer::from_folder(&paths.rfnet)
            .or_else(|first| match &paths.text {
                Some(t) => BertTokenizer::from_folder(t),
                None => Err(first),
            })
            .map_err(|e| model_err("RFNet tokenizer", &paths.rfnet)(&e))?;
        let rfnet_weights = paths.rfnet.join("model.safetensors");
        let name = format!(
            "rfnet {} [{}]",
            paths.rfnet.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            crate::models::weights::header_hash(&rfnet_weights)
        );
        Ok(Self {
            perception,
            rfnet: rfnet.no_grad(),
            rfnet_config,
            tokenizer: Some(tokenizer),
            rfnet_weights,
            name,
        })
    }

    /// A judge of models built in memory (random weights, no files, no tokenizer).
    pub fn from_parts(perception: Perception<B>, rfnet: RfNet<B>, rfnet_config: RfNetConfig) -> Self {
        Self {
            perception,
            rfnet: rfnet.no_grad(),
            rfnet_config,
            tokenizer: None,
            rfnet_weights: PathBuf::new(),
            name: "rfnet (random weights)".into(),
        }
    }

    /// RFNet's product input ([1, 3, s, s]): the placed product over white, as RFNet reads it.
    pub fn product_input(&self, product_over_white: &RgbImage, device: &B::Device) -> Tensor<B, 4> {
        let s = self.rfnet_config.input_size as u32;
        imagenet_input::<B>(product_over_white, s, s, device)
    }

    /// Caption ids and mask ([N, L]) of product titles.
    pub fn captions(&self, titles: &[&str], device: &B::Device) -> Result<(Tensor<B, 2, Int>, Tensor<B, 2, Int>), ScoreError> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| ScoreError::Failed("this judge has no tokenizer (random weights)".into()))?
            .encode_batch::<B>(titles, self.rfnet_config.max_caption_tokens, device)
            .map_err(|e| ScoreError::Failed(format!("caption: {e}")))
    }

    /// RFNet logits [N, 5] of `image` ([N, 3, H, W] in [0, 1], the pasted-back ad image), with
    /// `product` from `product_input` and captions from `captions`. Differentiable in `image`.
    pub fn logits(&self, image: Tensor<B, 4>, product: Tensor<B, 4>, caption: (Tensor<B, 2, Int>, Tensor<B, 2, Int>)) -> Tensor<B, 2> {
        let s = self.rfnet_config.input_size;
        let (depth, saliency) = self.perception.maps(image.clone());
        let to_rfnet = |m: Tensor<B, 4>| normalise(resize_bilinear(m, s, s, false).repeat_dim(1, 3), IMAGENET_MEAN, IMAGENET_STD);
        let input = RfNetInput {
            product,
            generated: normalise(resize_bilinear(image, s, s, false), IMAGENET_MEAN, IMAGENET_STD),
            depth: to_rfnet(depth),
            saliency: to_rfnet(saliency),
            caption_ids: caption.0,
            caption_mask: caption.1,
        };
        self.rfnet.forward(input, false)
    }

    /// Judge one 8-bit ad image: class probabilities, and the depth and saliency maps at the
    /// image's size. `product` is the placed product over white, `title` the caption.
    pub fn score_rgb(&self, product: &RgbImage, image: &RgbImage, title: &str) -> Result<Scored, ScoreError> {
        let device = self.perception.device();
        let (depth, saliency) = self.perception.map_images(image)?;
        let logits = self.logits(
            rgb_to_tensor::<B>(image, &device),
            self.product_input(product, &device),
            self.captions(&[title], &device)?,
        );
        let p = softmax(logits, 1)
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| ScoreError::Failed(format!("{e:?}")))?;
        let probs: [f32; 5] = p
            .get(..5)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| ScoreError::Failed("RFNet gave no prediction".into()))?;
        if probs.iter().any(|x| !x.is_finite()) {
            return Err(ScoreError::NonFinite(NonFiniteOutput::diagnose(
                "RFNet",
                "class probabilities",
                self.perception.settings.dtype,
                std::slice::from_ref(&self.rfnet_weights),
            )));
        }
        Ok(Scored {
            probs: ClassProbs(probs),
            depth: Some(depth),
            saliency: Some(saliency),
        })
    }
}

impl<B: AutodiffBackend> Judge<B> {
    /// The same models on the inner backend (shared weights), for judging without gradients.
    pub fn inner(&self) -> Judge<B::InnerBackend> {
        Judge {
            perception: self.perception.valid(),
            rfnet: self.rfnet.valid(),
            rfnet_config: self.rfnet_config.clone(),
            tokenizer: self.tokenizer.clone(),
            rfnet_weights: self.rfnet_weights.clone(),
            name: self.name.clone(),
        }
    }
}

impl<B: Backend> Scorer for Judge<B> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn score(&mut self, product: &super::product::PlacedProduct, image: &RgbImage, title: &str) -> Result<Scored, ScoreError> {
        self.score_rgb(&product.init_rgb(), image, title)
    }
}

/// `(x - mean) / std` per channel.
fn normalise<B: Backend>(x: Tensor<B, 4>, mean: [f32; 3], std: [f32; 3]) -> Tensor<B, 4> {
    let device = x.device();
    let m = Tensor::<B, 4>::from_data(TensorData::new(mean.to_vec(), [1, 3, 1, 1]), &device);
    let s = Tensor::<B, 4>::from_data(TensorData::new(std.to_vec(), [1, 3, 1, 1]), &device);
    (x - m) / s
}

/// Per-image min-max normalisation to [0, 1] ([N, C, H, W]).
fn min_max<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let flat = x.clone().reshape([n, c * h * w]);
    let lo = flat.clone().min_dim(1).reshape([n, 1, 1, 1]);
    let hi = flat.max_dim(1).reshape([n, 1, 1, 1]);
    (x - lo.clone()) / (hi - lo).add_scalar(1e-6)
}

//! RFNet training and evaluation (PAPER.md: AdamW, lr 1e-4 divided by 10 at epoch 5, 10 epochs).
//!
//! Data: a synthetic dataset (`samples.jsonl` from `rfstudio synth`) or an annotation store
//! (`dataset.sqlite`: decided labels; Unsuitable samples and samples without depth/saliency maps
//! are excluded). Train/val split by product (no product in both). A run folder holds
//! `config.json` (RFNet), `train.json` (training settings), `metrics.jsonl` (one JSON line per
//! step and per epoch, for the GUI monitor), `checkpoint/` (burn records with parameter ids +
//! optimizer state for exact resume, and the public `model.safetensors` + `config.json` +
//! tokenizer files, i.e. a loadable RFNet folder) — replaced atomically every epoch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use image::{GrayImage, RgbImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::export::split_of;
use crate::models::bert::{BertTokenizer, load_bert};
use crate::models::resnet::{ResNetConfig, imagenet_input, load_resnet};
use crate::models::rfnet::{NUM_CLASSES, RfNet, RfNetConfig, RfNetInput, load_rfnet, save_rfnet};
use crate::pipeline::score::CLASS_NAMES;
use crate::train::run_folder::{
    RfnetEpoch, RfnetStep, RunFiles, RunFolderError, append_metric, latest_checkpoint, load_module, load_record, remove_checkpoints, save_module, save_record,
    TrainEvent, TrainState, truncate_metrics, write_checkpoint, write_json,
};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Model(String),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    /// A setting out of range (exit code 2).
    #[error("{0}")]
    Settings(String),
    /// An RFNet checkpoint that cannot be loaded (exit code 3).
    #[error("{0}")]
    Checkpoint(String),
    /// The run folder: a checkpoint that cannot be written or read back, a damaged state.
    #[error(transparent)]
    RunFolder(#[from] RunFolderError),
    /// The loss stopped being a finite number: nothing from that step on is kept.
    #[error(
        "training diverged at step {step} (loss {loss}): lower --lr (now {lr}); the run folder keeps the last good checkpoint"
    )]
    Diverged { step: usize, loss: f64, lr: f64 },
}

fn io_err(path: &Path) -> impl Fn(String) -> TrainError + '_ {
    move |reason| TrainError::Io {
        path: path.to_path_buf(),
        reason,
    }
}

/// One labelled training sample (paths to the four images and the caption).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabelledSample {
    pub product_id: String,
    pub product: PathBuf,
    pub generated: PathBuf,
    pub depth: PathBuf,
    pub saliency: PathBuf,
    pub title: String,
    pub label: u8,
}

/// Read a dataset folder: `samples.jsonl` (synthetic) or `dataset.sqlite` (annotation store).
/// Returns the samples and how many were excluded (and why).
pub fn read_dataset(dir: &Path) -> Result<(Vec<LabelledSample>, BTreeMap<String, usize>), TrainError> {
    let mut excluded = BTreeMap::new();
    if dir.join("samples.jsonl").is_file() {
        let records = crate::train::synth::read_records(dir).map_err(|e| TrainError::Data(e.to_string()))?;
        let samples = records
            .into_iter()
            .map(|r| LabelledSample {
                product_id: r.product_id,
                product: dir.join(r.product),
                generated: dir.join(r.image),
                depth: dir.join(r.depth),
                saliency: dir.join(r.saliency),
                title: r.title,
                label: r.label,
            })
            .collect();
        return Ok((samples, excluded));
    }
    if crate::data::store::is_dataset(dir) {
        let store = crate::data::store::Store::open(dir).map_err(|e| TrainError::Data(e.to_string()))?;
        let rows = crate::data::export::rows(&store, 0, (1.0, 0.0, 0.0)).map_err(|e| TrainError::Data(e.to_string()))?;
        let mut samples = Vec::new();
        for r in rows {
            let reason = match (&r.state[..], r.label, r.unsuitable, &r.product_image, &r.depth, &r.saliency) {
                ("decided", Some(label), false, Some(p), Some(d), Some(s)) => {
                    samples.push(LabelledSample {
                        product_id: r.product_id,
                        product: p.into(),
                        generated: r.image.into(),
                        depth: d.into(),
                        saliency: s.into(),
                        title: r.title,
                        label,
                    });
                    continue;
                }
                (_, _, true, ..) => "unsuitable",
                ("decided", ..) => "missing product/depth/saliency image",
                ("needs_review", ..) => "tied labels (needs review)",
                _ => "unlabelled",
            };
            *excluded.entry(reason.to_string()).or_default() += 1;
        }
        return Ok((samples, excluded));
    }
    Err(TrainError::Data(format!(
        "{}: neither samples.jsonl (rfstudio synth) nor dataset.sqlite (rfstudio dataset) found",
        dir.display()
    )))
}

/// Train/val split by product.
pub fn split(samples: &[LabelledSample], val_ratio: f64, seed: u64) -> (Vec<LabelledSample>, Vec<LabelledSample>) {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for s in samples {
        if split_of(&s.product_id, seed, (1.0 - val_ratio, val_ratio, 0.0)) == "train" {
            train.push(s.clone());
        } else {
            val.push(s.clone());
        }
    }
    (train, val)
}

fn read_rgb(path: &Path) -> Result<RgbImage, TrainError> {
    crate::pipeline::image_io::open_image(path)
        .map(|i| i.into_rgb8())
        .map_err(|e| TrainError::Data(e.to_string()))
}

fn grey_to_rgb(g: &GrayImage) -> RgbImage {
    RgbImage::from_fn(g.width(), g.height(), |x, y| {
        let v = g.get_pixel(x, y)[0];
        image::Rgb([v, v, v])
    })
}

/// Prepared inputs of one sample at the model's size.
#[derive(Clone)]
pub struct Prepared {
    pub product: RgbImage,
    pub generated: RgbImage,
    pub depth: RgbImage,
    pub saliency: RgbImage,
    pub title: String,
}

pub fn prepare(s: &LabelledSample, size: u32) -> Result<Prepared, TrainError> {
    let fit = |img: RgbImage| {
        if img.dimensions() == (size, size) {
            img
        } else {
            image::imageops::resize(&img, size, size, image::imageops::FilterType::Triangle)
        }
    };
    let grey = |p: &Path| -> Result<RgbImage, TrainError> {
        let g = crate::pipeline::image_io::open_image(p)
            .map(|i| i.into_luma8())
            .map_err(|e| TrainError::Data(e.to_string()))?;
        Ok(fit(grey_to_rgb(&g)))
    };
    Ok(Prepared {
        product: fit(read_rgb(&s.product)?),
        generated: fit(read_rgb(&s.generated)?),
        depth: grey(&s.depth)?,
        saliency: grey(&s.saliency)?,
        title: s.title.clone(),
    })
}

/// Stack prepared samples into an RFNet batch.
pub fn batch<B: Backend>(items: &[&Prepared], tokenizer: &BertTokenizer, max_tokens: usize, device: &B::Device) -> Result<RfNetInput<B>, TrainError> {
    let stack = |f: &dyn Fn(&Prepared) -> &RgbImage| {
        let ts: Vec<Tensor<B, 4>> = items
            .iter()
            .map(|p| {
                let img = f(p);
                imagenet_input::<B>(img, img.width(), img.height(), device)
            })
            .collect();
        Tensor::cat(ts, 0)
    };
    let titles: Vec<&str> = items.iter().map(|p| p.title.as_str()).collect();
    let (ids, mask) = tokenizer
        .encode_batch::<B>(&titles, max_tokens, device)
        .map_err(|e| TrainError::Data(e.to_string()))?;
    Ok(RfNetInput {
        product: stack(&|p| &p.product),
        generated: stack(&|p| &p.generated),
        depth: stack(&|p| &p.depth),
        saliency: stack(&|p| &p.saliency),
        caption_ids: ids,
        caption_mask: mask,
    })
}

/// Training settings (`train.json` in the run folder).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSettings {
    pub data: PathBuf,
    pub epochs: usize,
    pub lr: f64,
    /// Divide the learning rate by 10 every `lr_step` epochs.
    pub lr_step: usize,
    pub batch: usize,
    pub weight_decay: f32,
    pub val_ratio: f64,
    pub seed: u64,
    /// Sample classes uniformly (inverse-frequency sampling) instead of the data's frequencies.
    pub balanced: bool,
    pub freeze_encoders: bool,
    /// Use the paper's configuration (width 384, N2 3, input 384) or the tiny one.
    pub tiny: bool,
    /// Folders of the pretrained encoders (None: random initialisation).
    pub image_encoder: Option<PathBuf>,
    pub text_encoder: PathBuf,
}

impl TrainSettings {
    /// Every setting in range, or which one is not and what the range is.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Settings(m));
        if self.epochs == 0 || self.epochs > 10_000 {
            return bad(format!("--epochs {} must be between 1 and 10000", self.epochs));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 1.0) {
            return bad(format!("--lr {} must be a positive number up to 1", self.lr));
        }
        if self.lr_step == 0 {
            return bad("--lr-step must be at least 1".into());
        }
        if self.batch == 0 || self.batch > 4096 {
            return bad(format!("--batch {} must be between 1 and 4096", self.batch));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("--weight-decay {} must be a finite number >= 0", self.weight_decay));
        }
        if !(self.val_ratio.is_finite() && self.val_ratio > 0.0 && self.val_ratio < 1.0) {
            return bad(format!("--val-ratio {} must be between 0 and 1 (exclusive)", self.val_ratio));
        }
        Ok(())
    }
}

/// Evaluation results.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub samples: usize,
    pub accuracy: f64,
    pub precision: [f64; NUM_CLASSES],
    pub recall: [f64; NUM_CLASSES],
    pub f1: [f64; NUM_CLASSES],
    pub macro_precision: f64,
    pub macro_recall: f64,
    pub macro_f1: f64,
    /// Average precision of P(Available) for the Available class.
    pub ap_available: f64,
    /// confusion[true][predicted]
    pub confusion: [[usize; NUM_CLASSES]; NUM_CLASSES],
    pub mean_loss: f64,
    /// The smallest threshold on P(Available) whose precision reaches the target, if any.
    pub threshold: Option<f64>,
    pub target_precision: f64,
}

/// Metrics from predicted probabilities and true labels.
pub fn evaluate(probs: &[[f32; NUM_CLASSES]], labels: &[u8], target_precision: f64) -> EvalReport {
    let n = labels.len();
    let mut confusion = [[0usize; NUM_CLASSES]; NUM_CLASSES];
    let mut loss = 0.0;
    for (p, &y) in probs.iter().zip(labels) {
        let pred = p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.partial_cmp(b.1).unwrap_or(std::cmp::Ordering::Equal))
            .map(|(i, _)| i)
            .unwrap_or(0);
        confusion[y as usize][pred] += 1;
        loss -= (p[y as usize].max(1e-12) as f64).ln();
    }
    let mut precision = [0.0; NUM_CLASSES];
    let mut recall = [0.0; NUM_CLASSES];
    let mut f1 = [0.0; NUM_CLASSES];
    for c in 0..NUM_CLASSES {
        let tp = confusion[c][c] as f64;
        let predicted: f64 = (0..NUM_CLASSES).map(|r| confusion[r][c] as f64).sum();
        let actual: f64 = confusion[c].iter().sum::<usize>() as f64;
        precision[c] = if predicted > 0.0 { tp / predicted } else { 0.0 };
        recall[c] = if actual > 0.0 { tp / actual } else { 0.0 };
        f1[c] = if precision[c] + recall[c] > 0.0 {
            2.0 * precision[c] * recall[c] / (precision[c] + recall[c])
        } else {
            0.0
        };
    }
    let mean = |v: &[f64; NUM_CLASSES]| v.iter().sum::<f64>() / NUM_CLASSES as f64;
    let correct: usize = (0..NUM_CLASSES).map(|c| confusion[c][c]).sum();
    // Average precision and the threshold for a target precision, on P(Available).
    let mut scored: Vec<(f32, bool)> = probs.iter().zip(labels).map(|(p, &y)| (p[0], y == 0)).collect();
    scored.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    let positives = scored.iter().filter(|s| s.1).count() as f64;
    let (mut tp, mut ap) = (0.0, 0.0);
    let mut threshold = None;
    for (i, (score, pos)) in scored.iter().enumerate() {
        if *pos {
            tp += 1.0;
            ap += tp / (i + 1) as f64;
        }
        let prec = tp / (i + 1) as f64;
        let next_differs = scored.get(i + 1).map(|s| s.0 < *score).unwrap_or(true);
        if next_differs && prec >= target_precision && tp > 0.0 {
            threshold = Some(*score as f64);
        }
    }
    EvalReport {
        samples: n,
        accuracy: correct as f64 / n.max(1) as f64,
        macro_precision: mean(&precision),
        macro_recall: mean(&recall),
        macro_f1: mean(&f1),
        precision,
        recall,
        f1,
        ap_available: if positives > 0.0 { ap / positives } else { 0.0 },
        confusion,
        mean_loss: loss / n.max(1) as f64,
        threshold,
        target_precision,
    }
}

/// Class probabilities of prepared samples, in batches (inference, no autodiff).
pub fn predict<B: Backend>(
    model: &RfNet<B>,
    tokenizer: &BertTokenizer,
    max_tokens: usize,
    items: &[Prepared],
    batch_size: usize,
    device: &B::Device,
) -> Result<Vec<[f32; NUM_CLASSES]>, TrainError> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(batch_size.max(1)) {
        let refs: Vec<&Prepared> = chunk.iter().collect();
        let input = batch::<B>(&refs, tokenizer, max_tokens, device)?;
        let p = model.probabilities(input).into_data().convert::<f32>();
        let v = p.to_vec::<f32>().map_err(|e| TrainError::Model(format!("{e:?}")))?;
        for row in v.chunks(NUM_CLASSES) {
            let mut a = [0f32; NUM_CLASSES];
            a.copy_from_slice(row);
            out.push(a);
        }
    }
    Ok(out)
}

fn copy_tokenizer(from: &Path, to: &Path) -> Result<(), TrainError> {
    for f in ["vocab.txt", "tokenizer_config.json"] {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, to.join(f)).map_err(|e| io_err(&src)(e.to_string()))?;
        }
    }
    Ok(())
}

/// The file that marks a complete RFNet checkpoint (the loadable inference weights).
const MODEL_FILE: &str = "model.safetensors";

/// Write the run's checkpoint (resume state and a loadable RFNet folder), replacing the previous
/// one atomically.
fn save_checkpoint<B: AutodiffBackend, O: Optimizer<RfNet<B>, B>>(
    run: &Path,
    model: &RfNet<B>,
    optim: &O,
    config: &RfNetConfig,
    state: &TrainState,
    tokenizer_dir: &Path,
) -> Result<(), TrainError> {
    write_checkpoint(run, |dir| -> Result<(), TrainError> {
        save_module(dir, "model", model)?;
        save_record::<B, _>(dir, "optimizer", optim.to_record())?;
        let inference = model.valid();
        save_rfnet(&inference, &dir.join(MODEL_FILE))
            .map_err(|e| TrainError::Model(e.to_string()))?;
        write_json(&dir.join("config.json"), config)?;
        copy_tokenizer(tokenizer_dir, dir)?;
        write_json(&dir.join("state.json"), state)?;
        Ok(())
    })?;
    Ok(())
}

/// The newest complete checkpoint of an RFNet run.
pub fn checkpoint_dir(run: &Path) -> Option<PathBuf> {
    latest_checkpoint(run, MODEL_FILE)
}

/// Train (or resume) an RFNet in `run`. Returns the final validation report.
pub fn train<B: Backend>(
    settings: &TrainSettings,
    run: &Path,
    resume: bool,
    device: &B::Device,
    emit: &mut dyn FnMut(&TrainEvent),
) -> Result<EvalReport, TrainError> {
    type AB<B> = Autodiff<B>;
    settings.validate()?;
    std::fs::create_dir_all(run).map_err(|e| io_err(run)(e.to_string()))?;
    // 1. data
    let (samples, _) = read_dataset(&settings.data)?;
    let (train_set, val_set) = split(&samples, settings.val_ratio, settings.seed);
    if train_set.is_empty() || val_set.is_empty() {
        return Err(TrainError::Data(format!(
            "the product split left {} training and {} validation samples; add products or change --val-ratio",
            train_set.len(),
            val_set.len()
        )));
    }
    // 2. model: config, encoders, optimizer (fresh or resumed)
    let tokenizer = BertTokenizer::from_folder(&settings.text_encoder).map_err(|e| TrainError::Model(e.to_string()))?;
    let bert_json: serde_json::Value = std::fs::read_to_string(settings.text_encoder.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or_else(|| TrainError::Model(format!("{}: no readable config.json", settings.text_encoder.display())))?;
    let resnet_config = match &settings.image_encoder {
        Some(dir) => ResNetConfig::from_folder(dir).map_err(|e| TrainError::Model(e.to_string()))?,
        // From scratch: the full ResNet-50, or for the tiny configuration a 4-block one with
        // the ResNet-50 layout (widths / 8, one bottleneck per stage).
        None if settings.tiny => ResNetConfig {
            width_divisor: 8,
            layers: [1, 1, 1, 1],
            ..ResNetConfig::default()
        },
        None => ResNetConfig::default(),
    };
    let config = if settings.tiny {
        RfNetConfig::tiny(resnet_config, bert_json)
    } else {
        RfNetConfig::paper(resnet_config, bert_json)
    };
    let size = config.input_size as u32;
    let prepared_val: Vec<Prepared> = val_set.iter().map(|s| prepare(s, size)).collect::<Result<_, _>>()?;
    let prepared_train: Vec<Prepared> = train_set.iter().map(|s| prepare(s, size)).collect::<Result<_, _>>()?;
    // Seeded initialisation: the same settings give the same run.
    <AB<B> as Backend>::seed(device, settings.seed);
    let mut model: RfNet<AB<B>> = config.init(device).map_err(TrainError::Model)?;
    match &settings.image_encoder {
        Some(dir) => {
            model.image_encoder = load_resnet::<AB<B>>(dir, burn::tensor::DType::F32, device)
                .map_err(|e| TrainError::Model(e.to_string()))?
                .0;
        }
        // An encoder trained from scratch learns its BatchNorm statistics.
        None => model.image_encoder = model.image_encoder.batch_statistics(!settings.freeze_encoders),
    }
    model.text_encoder = load_bert::<AB<B>>(&settings.text_encoder, burn::tensor::DType::F32, device)
        .map_err(|e| TrainError::Model(e.to_string()))?
        .0;
    // RFNet reads the last hidden state only; an unused pooler would get no gradient.
    model.text_encoder.pooler = None;
    let mut optim = AdamWConfig::new()
        .with_weight_decay(settings.weight_decay)
        .init::<AB<B>, RfNet<AB<B>>>();
    let mut state = TrainState::default();
    let metrics = RunFiles::metrics(run);
    if resume {
        let Some(ck) = checkpoint_dir(run) else {
            return Err(TrainError::Data(format!("{}: nothing to resume (no checkpoint)", run.display())));
        };
        model = load_module(&ck, "model", model, device)?;
        optim = optim.load_record(load_record(&ck, "optimizer", device)?);
        state = TrainState::read(&ck)?;
        truncate_metrics(&metrics, state.step)?;
    } else {
        let _ = std::fs::remove_file(&metrics);
        remove_checkpoints(run);
    }
    write_json(&RunFiles::rfnet_settings(run), settings)?;
    write_json(&run.join("config.json"), &config)?;
    // 3. epochs
    let labels_train: Vec<u8> = train_set.iter().map(|s| s.label).collect();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut last = None;
    for epoch in state.epoch..settings.epochs {
        let start = Instant::now();
        let lr = settings.lr * 0.1f64.powi((epoch / settings.lr_step.max(1)) as i32);
        let order = epoch_order(&labels_train, settings.balanced, settings.seed.wrapping_add(epoch as u64));
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
        for chunk in order.chunks(settings.batch.max(1)) {
            let refs: Vec<&Prepared> = chunk.iter().map(|&i| &prepared_train[i]).collect();
            let input = batch::<AB<B>>(&refs, &tokenizer, config.max_caption_tokens, device)?;
            let targets: Vec<i64> = chunk.iter().map(|&i| labels_train[i] as i64).collect();
            let targets = Tensor::<AB<B>, 1, Int>::from_data(TensorData::new(targets, [chunk.len()]), device);
            let logits = model.forward(input, settings.freeze_encoders);
            let loss = loss_fn.forward(logits.clone(), targets.clone());
            let loss_v: f64 = loss.clone().into_scalar().to_f64_lossy();
            if !loss_v.is_finite() {
                return Err(TrainError::Diverged {
                    step: state.step + 1,
                    loss: loss_v,
                    lr,
                });
            }
            let pred = logits.argmax(1).reshape([chunk.len()]);
            let ok: i64 = pred.equal(targets).int().sum().into_scalar().to_i64_lossy();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            state.step += 1;
            loss_sum += loss_v * chunk.len() as f64;
            correct += ok as usize;
            seen += chunk.len();
            let ev = TrainEvent::Step(RfnetStep {
                epoch: epoch + 1,
                step: state.step,
                loss: loss_v,
                accuracy: ok as f64 / chunk.len() as f64,
                lr,
                time: Some(crate::train::run_folder::unix_seconds()),
            });
            append_metric(&metrics, &ev)?;
            emit(&ev);
        }
        // validation on the held-out products
        let inference = model.valid();
        let probs = predict::<B>(&inference, &tokenizer, config.max_caption_tokens, &prepared_val, settings.batch.max(1), device)?;
        // The last update of the epoch can turn the weights non-finite with a finite loss: the
        // validation pass sees it, and nothing non-finite is ever checkpointed.
        if probs.iter().flatten().any(|p| !p.is_finite()) {
            return Err(TrainError::Diverged {
                step: state.step,
                loss: f64::NAN,
                lr,
            });
        }
        let labels_val: Vec<u8> = val_set.iter().map(|s| s.label).collect();
        let report = evaluate(&probs, &labels_val, 0.95);
        state.epoch = epoch + 1;
        let ev = TrainEvent::Epoch(RfnetEpoch {
            epoch: epoch + 1,
            step: state.step,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            val_loss: report.mean_loss,
            val_accuracy: report.accuracy,
            val_macro_f1: report.macro_f1,
            seconds: start.elapsed().as_secs_f64(),
        });
        append_metric(&metrics, &ev)?;
        emit(&ev);
        save_checkpoint(run, &model, &optim, &config, &state, &settings.text_encoder)?;
        last = Some(report);
    }
    match last {
        Some(r) => Ok(r),
        None => {
            // Nothing left to train: evaluate the checkpoint.
            let ck = checkpoint_dir(run).ok_or_else(|| TrainError::Data("no checkpoint".into()))?;
            let (m, _) = load_rfnet::<B>(&ck, burn::tensor::DType::F32, device).map_err(|e| TrainError::Model(e.to_string()))?;
            let probs = predict::<B>(&m, &tokenizer, config.max_caption_tokens, &prepared_val, settings.batch.max(1), device)?;
            let labels_val: Vec<u8> = val_set.iter().map(|s| s.label).collect();
            Ok(evaluate(&probs, &labels_val, 0.95))
        }
    }
}

trait ToF64 {
    fn to_f64_lossy(self) -> f64;
    fn to_i64_lossy(self) -> i64;
}

impl<E: burn::tensor::ElementConversion> ToF64 for E {
    fn to_f64_lossy(self) -> f64 {
        self.elem::<f64>()
    }
    fn to_i64_lossy(self) -> i64 {
        self.elem::<i64>()
    }
}

/// The sample order of one epoch: shuffled, or class-balanced (each class drawn equally often,
/// with replacement within a class).
fn epoch_order(labels: &[u8], balanced: bool, seed: u64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    if !balanced {
        let mut idx: Vec<usize> = (0..labels.len()).collect();
        idx.shuffle(&mut rng);
        return idx;
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); NUM_CLASSES];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let present: Vec<&Vec<usize>> = by_class.iter().filter(|c| !c.is_empty()).collect();
    (0..labels.len())
        .map(|i| {
            let class = present[i % present.len()];
            class[rng.random_range(0..class.len())]
        })
        .collect()
}

/// Evaluate a checkpoint (a run folder or an RFNet folder) on a dataset's validation split
/// (`all` = every sample).
pub fn eval_checkpoint<B: Backend>(
    data: &Path,
    checkpoint: &Path,
    all: bool,
    val_ratio: f64,
    seed: u64,
    target_precision: f64,
    device: &B::Device,
) -> Result<EvalReport, TrainError> {
    if !(target_precision.is_finite() && target_precision > 0.0 && target_precision <= 1.0) {
        return Err(TrainError::Settings(format!(
            "--target-precision {target_precision} must be between 0 and 1"
        )));
    }
    if !checkpoint.exists() {
        return Err(TrainError::Settings(format!(
            "{}: no such RFNet checkpoint or training run folder",
            checkpoint.display()
        )));
    }
    let folder = checkpoint_dir(checkpoint).unwrap_or_else(|| checkpoint.to_path_buf());
    let (model, config) = load_rfnet::<B>(&folder, burn::tensor::DType::F32, device).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    let tokenizer = BertTokenizer::from_folder(&folder).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    let (samples, _) = read_dataset(data)?;
    let set = if all {
        samples
    } else {
        // the split recorded by training, if this is a run folder
        let (vr, sd) = std::fs::read_to_string(checkpoint.join("train.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<TrainSettings>(&t).ok())
            .map(|s| (s.val_ratio, s.seed))
            .unwrap_or((val_ratio, seed));
        split(&samples, vr, sd).1
    };
    let prepared: Vec<Prepared> = set.iter().map(|s| prepare(s, config.input_size as u32)).collect::<Result<_, _>>()?;
    let probs = predict::<B>(&model, &tokenizer, config.max_caption_tokens, &prepared, 16, device)?;
    let labels: Vec<u8> = set.iter().map(|s| s.label).collect();
    Ok(evaluate(&probs, &labels, target_precision))
}

/// A table of an evaluation report.
pub fn report_table(r: &EvalReport) -> String {
    let mut s = format!("{} samples, accuracy {:.3}\n", r.samples, r.accuracy);
    s.push_str(&format!("{:<20} {:>9} {:>7} {:>7}\n", "class", "precision", "recall", "F1"));
    for c in 0..NUM_CLASSES {
        s.push_str(&format!("{:<20} {:>9.3} {:>7.3} {:>7.3}\n", CLASS_NAMES[c], r.precision[c], r.recall[c], r.f1[c]));
    }
    s.push_str(&format!("{:<20} {:>9.3} {:>7.3} {:>7.3}\n", "macro", r.macro_precision, r.macro_recall, r.macro_f1));
    s.push_str(&format!("AP (Available): {:.3}\n", r.ap_available));
    match r.threshold {
        Some(t) => s.push_str(&format!(
            "P(Available) threshold for precision >= {:.2}: {t:.3}\n",
            r.target_precision
        )),
        None => s.push_str(&format!("no threshold reaches precision {:.2}\n", r.target_precision)),
    }
    s.push_str("confusion (rows = true, columns = predicted):\n");
    for row in &r.confusion {
        s.push_str(&format!("  {row:?}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_hand_checked() {
        // 4 samples: two Available predicted right, one Space Mismatch predicted Available, one right.
        let probs = [
            [0.9, 0.1, 0.0, 0.0, 0.0],
            [0.6, 0.4, 0.0, 0.0, 0.0],
            [0.7, 0.3, 0.0, 0.0, 0.0],
            [0.1, 0.9, 0.0, 0.0, 0.0],
        ];
        let r = evaluate(&probs, &[0, 0, 1, 1], 0.95);
        assert_eq!(r.confusion[0][0], 2);
        assert_eq!(r.confusion[1][0], 1);
        assert!((r.precision[0] - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.recall[1] - 0.5).abs() < 1e-12);
        // ranking by P(Available): 0.9 (pos), 0.7 (neg), 0.6 (pos), 0.1 (neg) -> AP = (1 + 2/3) / 2
        assert!((r.ap_available - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert_eq!(r.threshold, Some(0.9f32 as f64));
    }

    #[test]
    fn balanced_order_draws_every_class() {
        let labels = [0u8, 0, 0, 0, 0, 0, 0, 1, 2, 3];
        let order = epoch_order(&labels, true, 1);
        let classes: std::collections::BTreeSet<u8> = order.iter().map(|&i| labels[i]).collect();
        assert_eq!(classes.len(), 4);
    }
}

//! The RFFT run configuration (`run.toml`), its validation, and the model folders it resolves.

use crate::pipeline::params::InvalidSetting;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::RfftError;

/// Which regulariser is added to F_AC (PAPER.md "RFFT").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Regulariser {
    /// Consistent Condition: L_CC = || g_theta - g_ref ||_2 on the text-guidance direction.
    Cc,
    /// KL between the current and the reference model's x0_hat distributions.
    Kl,
    /// No regularisation (the paper's collapsing baseline).
    None,
}

impl std::fmt::Display for Regulariser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Regulariser::Cc => "cc",
            Regulariser::Kl => "kl",
            Regulariser::None => "none",
        })
    }
}

/// One product of the training or evaluation set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductSpec {
    /// A short name (default: the image's file stem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Transparent product PNG.
    pub image: PathBuf,
    /// Background prompt.
    pub prompt: String,
    #[serde(default)]
    pub negative: String,
    /// Product title (RFNet's caption).
    #[serde(default)]
    pub title: String,
}

impl ProductSpec {
    pub fn name(&self) -> String {
        self.id.clone().unwrap_or_else(|| {
            self.image
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.image.display().to_string())
        })
    }
}

/// Model folders (each defaults to the manifest's role of the same name).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RfftModelPaths {
    /// SD 1.5 diffusers folder (role `base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
    /// The ControlNet to fine-tune (role `controlnet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controlnet: Option<PathBuf>,
    /// RFNet checkpoint folder (role `rfnet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rfnet: Option<PathBuf>,
    /// DPT depth folder (role `depth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<PathBuf>,
    /// U2-Net saliency folder (role `saliency`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saliency: Option<PathBuf>,
    /// BERT folder (role `text`); only read when the RFNet folder has no `vocab.txt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<PathBuf>,
}

/// `run.toml`: everything an RFFT run needs. Relative paths are taken from the current folder;
/// the copy written into the run folder has them made absolute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RfftConfig {
    /// Training products with their prompts.
    pub products: Vec<ProductSpec>,
    /// Held-out products for the evaluation grids (fixed seeds).
    #[serde(default)]
    pub eval_products: Vec<ProductSpec>,
    /// `cc`, `kl` or `none`.
    #[serde(default = "default_reg")]
    pub reg: Regulariser,
    /// Weight of the regulariser: total = F_AC + beta * reg.
    #[serde(default = "one")]
    pub beta: f64,
    /// AdamW learning rate (paper: 1e-5).
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Products per forward pass.
    #[serde(default = "one_usize")]
    pub batch: usize,
    /// Forward passes accumulated per optimizer step.
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    /// Optimizer steps.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Evaluate every N steps (and at step 0 and at the end).
    #[serde(default = "ten")]
    pub eval_every: usize,
    /// Write a checkpoint every N steps (and at the end / on stop).
    #[serde(default = "ten")]
    pub checkpoint_every: usize,
    /// Seed of everything random (initialisation, products, noise, chain step).
    #[serde(default)]
    pub seed: u64,
    /// LoRA rank on the ControlNet's Linear and 1x1-conv layers; 0 = train the full ControlNet.
    #[serde(default)]
    pub lora_rank: usize,
    /// LoRA alpha (scale = alpha / rank); default = rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Canvas side in pixels (512 for SD 1.5).
    #[serde(default = "default_size")]
    pub image_size: u32,
    /// DDIM steps of the sampling chain (40).
    #[serde(default = "default_sample_steps")]
    pub sample_steps: usize,
    /// The gradient step is drawn among the last N steps of the chain (10).
    #[serde(default = "ten")]
    pub last_steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance: f32,
    #[serde(default = "one_f32")]
    pub controlnet_scale: f32,
    /// Product placement scale on the canvas (0.7).
    #[serde(default = "default_product_scale")]
    pub product_scale: f32,
    /// Seeds of the evaluation samples (each eval product x each seed).
    #[serde(default = "default_eval_seeds")]
    pub eval_seeds: Vec<u64>,
    /// P(Available) at which an evaluation sample counts as available.
    #[serde(default = "half")]
    pub threshold: f32,
    /// Side of U2-Net's input (default: the saliency model's `input_size`, 320 as the reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saliency_size: Option<usize>,
    /// Side of DPT's input (default: the depth model's preprocessor size, 384).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth_size: Option<usize>,
    /// Gradient checkpointing (burn's balanced strategy: recompute cheap ops in the backward pass).
    #[serde(default)]
    pub checkpointing: bool,
    #[serde(default)]
    pub models: RfftModelPaths,
}

/// The largest learning rate accepted (AdamW on a ControlNet diverges far below this).
pub const MAX_LR: f64 = 1.0;

/// The settings a resumed run may change: how long it runs and how often it reports. Anything
/// else (objective, data, model, seeds) would make the resumed run a different experiment.
pub const RESUMABLE_CHANGES: &[&str] = &["steps", "eval_every", "checkpoint_every"];

fn default_reg() -> Regulariser {
    Regulariser::Cc
}
fn one() -> f64 {
    1.0
}
fn one_f32() -> f32 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn ten() -> usize {
    10
}
fn half() -> f32 {
    0.5
}
fn default_lr() -> f64 {
    1e-5
}
fn default_weight_decay() -> f64 {
    1e-2
}
fn default_steps() -> usize {
    1000
}
fn default_size() -> u32 {
    512
}
fn default_sample_steps() -> usize {
    40
}
fn default_guidance() -> f32 {
    7.5
}
fn default_product_scale() -> f32 {
    0.7
}
fn default_eval_seeds() -> Vec<u64> {
    vec![0, 1]
}

impl RfftConfig {
    /// Parse `run.toml` text (`label` names it in errors) and validate it.
    pub fn from_toml(text: &str, label: &str) -> Result<Self, RfftError> {
        let c: Self = toml::from_str(text).map_err(|e| RfftError::Config(format!("{label}: {e}")))?;
        c.validate().map_err(|e| RfftError::Config(format!("{label}: {e}")))?;
        Ok(c)
    }

    pub fn from_file(path: &Path) -> Result<Self, RfftError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RfftError::Config(format!("{}: cannot read: {e}", path.display())))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    pub fn to_toml(&self) -> Result<String, RfftError> {
        toml::to_string_pretty(self).map_err(|e| RfftError::Config(e.to_string()))
    }

    /// Device memory one training iteration needs at most, estimated before anything is
    /// allocated: the sampling pass of `generation_memory_bytes` plus the activations the
    /// gradient pass keeps, scaled from the measured 11.4 GB of real SD 1.5 sizes at 512 px and
    /// batch 1 on the CPU backend.
    pub fn memory_bytes(&self, element_bytes: usize) -> u64 {
        let pixels = (self.image_size as u64).pow(2);
        let kept = 11_400_000_000u64 / (512 * 512) * pixels * self.batch as u64 * element_bytes as u64 / 4;
        crate::pipeline::params::generation_memory_bytes(self.image_size, self.batch, element_bytes) + kept
    }

    /// The differences between a run's configuration (`self`, from its run.toml) and the one a
    /// resume was asked with: (field, before, after), top-level fields compared as TOML values.
    pub fn changes_to(&self, other: &RfftConfig) -> Vec<(String, String, String)> {
        let as_table = |c: &RfftConfig| {
            toml::Value::try_from(c)
                .ok()
                .and_then(|v| v.as_table().cloned())
                .unwrap_or_default()
        };
        let (a, b) = (as_table(self), as_table(other));
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        let show = |v: Option<&toml::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "(unset)".into());
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| (k.clone(), show(a.get(k)), show(b.get(k))))
            .collect()
    }

    /// Check every value (product files included) and say exactly what is wrong.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.products.is_empty() {
            return Err(InvalidSetting("`products` is empty: list at least one [[products]] entry".into()));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(InvalidSetting(format!("beta = {} must be a finite number >= 0", self.beta)));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= MAX_LR) {
            return Err(InvalidSetting(format!("lr = {} must be a positive number up to {MAX_LR}", self.lr)));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(InvalidSetting(format!("weight_decay = {} must be >= 0", self.weight_decay)));
        }
        for (name, v) in [
            ("batch", self.batch),
            ("grad_accum", self.grad_accum),
            ("steps", self.steps),
            ("eval_every", self.eval_every),
            ("checkpoint_every", self.checkpoint_every),
            ("last_steps", self.last_steps),
        ] {
            if v == 0 {
                return Err(InvalidSetting(format!("{name} must be at least 1")));
            }
        }
        if self.sample_steps == 0 || self.sample_steps > 1000 {
            return Err(InvalidSetting(format!("sample_steps = {} must be between 1 and 1000", self.sample_steps)));
        }
        if self.last_steps > self.sample_steps {
            return Err(InvalidSetting(format!(
                "last_steps = {} cannot exceed sample_steps = {}",
                self.last_steps, self.sample_steps
            )));
        }
        crate::pipeline::params::check_sampling(self.guidance, self.controlnet_scale, self.image_size)
            .map_err(|why| InvalidSetting(format!("{why} (keys guidance, controlnet_scale, image_size)")))?;
        if self.batch > crate::pipeline::params::MAX_BATCH {
            return Err(InvalidSetting(format!("batch = {} must be at most {}", self.batch, crate::pipeline::params::MAX_BATCH)));
        }
        if !(self.product_scale > 0.0 && self.product_scale <= 1.0) {
            return Err(InvalidSetting(format!("product_scale = {} must be in (0, 1]", self.product_scale)));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(InvalidSetting(format!("threshold = {} must be between 0 and 1", self.threshold)));
        }
        if self.eval_seeds.is_empty() {
            return Err(InvalidSetting("eval_seeds is empty".into()));
        }
        if let Some(s) = self.saliency_size {
            if s < 32 {
                return Err(InvalidSetting(format!("saliency_size = {s} must be at least 32")));
            }
        }
        if let Some(d) = self.depth_size {
            if d < 32 || d % 16 != 0 {
                return Err(InvalidSetting(format!("depth_size = {d} must be a multiple of 16 (>= 32)")));
            }
        }
        if let Some(a) = self.lora_alpha {
            if !(a.is_finite() && a > 0.0) {
                return Err(InvalidSetting(format!("lora_alpha = {a} must be positive")));
            }
        }
        for (list, items) in [("products", &self.products), ("eval_products", &self.eval_products)] {
            for p in items.iter() {
                if !p.image.is_file() {
                    return Err(InvalidSetting(format!(
                        "{list}: product image {} not found (unknown product {:?})",
                        p.image.display(),
                        p.name()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The LoRA scale alpha / rank.
    pub fn lora_scale(&self) -> f32 {
        match self.lora_alpha {
            Some(a) if self.lora_rank > 0 => (a / self.lora_rank as f64) as f32,
            _ => 1.0,
        }
    }

    /// The same config with every path absolute (what the run folder keeps).
    pub fn absolutized(&self) -> Self {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut c = self.clone();
        for p in c.products.iter_mut().chain(c.eval_products.iter_mut()) {
            p.image = abs(&p.image);
        }
        let m = &mut c.models;
        for slot in [&mut m.base, &mut m.controlnet, &mut m.rfnet, &mut m.depth, &mut m.saliency, &mut m.text] {
            if let Some(p) = slot.as_mut() {
                *p = abs(p);
            }
        }
        c
    }
}

/// The model folders a run uses, all resolved.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResolvedModels {
    pub base: PathBuf,
    pub controlnet: PathBuf,
    pub rfnet: PathBuf,
    pub depth: PathBuf,
    pub saliency: PathBuf,
    pub text: Option<PathBuf>,
}

impl RfftModelPaths {
    /// Fill unset folders from `lookup(role name)`; a folder that is still missing is an error
    /// naming the role.
    pub fn resolve(&self, lookup: &dyn Fn(&str) -> Option<PathBuf>) -> Result<ResolvedModels, RfftError> {
        let get = |set: &Option<PathBuf>, role: &str| -> Result<PathBuf, RfftError> {
            let p = set.clone().or_else(|| lookup(role)).ok_or_else(|| {
                RfftError::Models(format!(
                    "no `{role}` model: set models.{role} in run.toml or install the `{role}` role (see `rfstudio info`)"
                ))
            })?;
            if !p.is_dir() {
                return Err(RfftError::Models(format!(
                    "the `{role}` model folder {} does not exist (see `rfstudio info` and models/README.md)",
                    p.display()
                )));
            }
            Ok(p)
        };
        Ok(ResolvedModels {
            base: get(&self.base, "base")?,
            controlnet: get(&self.controlnet, "controlnet")?,
            rfnet: get(&self.rfnet, "rfnet")?,
            depth: get(&self.depth, "depth")?,
            saliency: get(&self.saliency, "saliency")?,
            text: self.text.clone().or_else(|| lookup("text")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> String {
        let img = concat!(env!("CARGO_MANIFEST_DIR"), "/sample-data/kettle.png");
        format!("seed = 1\n[[products]]\nimage = \"{img}\"\nprompt = \"a kettle\"\n")
    }

    #[test]
    fn rfft_config_defaults_follow_the_paper() {
        let c = RfftConfig::from_toml(&base(), "run.toml").expect("valid");
        assert_eq!(c.reg, Regulariser::Cc);
        assert_eq!(c.lr, 1e-5);
        assert_eq!(c.sample_steps, 40);
        assert_eq!(c.last_steps, 10);
        assert_eq!(c.lora_rank, 0);
        let round = RfftConfig::from_toml(&c.to_toml().expect("toml"), "copy").expect("round trip");
        assert_eq!(round, c);
    }

    #[test]
    fn rfft_config_rejects_bad_values_clearly() {
        let e = RfftConfig::from_toml(&format!("reg = \"l2\"\n{}", base()), "run.toml").unwrap_err().to_string();
        assert!(e.contains("unknown variant") && e.contains("cc"), "{e}");
        let e = RfftConfig::from_toml(&format!("beta = -1.0\n{}", base()), "run.toml").unwrap_err().to_string();
        assert!(e.contains("beta"), "{e}");
        let e = RfftConfig::from_toml("seed = 1\n[[products]]\nimage = \"nope.png\"\nprompt = \"x\"\n", "run.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown product") && e.contains("nope"), "{e}");
        let e = RfftConfig::from_toml(&format!("lerning_rate = 1.0\n{}", base()), "run.toml").unwrap_err().to_string();
        assert!(e.contains("lerning_rate"), "{e}");
    }
}

//! Noise schedulers behind a small trait. `Ddim` matches diffusers' `DDIMScheduler` for the
//! SD 1.5 configuration (scaled_linear 0.00085 -> 0.012, 1000 train steps, steps_offset 1,
//! set_alpha_to_one false, leading spacing, eta 0, epsilon prediction).
//!
//! diffusers counterpart: `schedulers/scheduling_ddim.py`. The config is read from the
//! checkpoint's own `scheduler/scheduler_config.json`.

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("{path}: cannot read the scheduler config: {reason}")]
    Config { path: String, reason: String },
    #[error("unsupported scheduler setting {field} = {value} (supported: {supported})")]
    Unsupported {
        field: &'static str,
        value: String,
        supported: &'static str,
    },
    #[error("{0} inference steps requested; it must be between 1 and the {1} training steps")]
    Steps(usize, usize),
}

/// `scheduler/scheduler_config.json` (fields we use; others are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default)]
    pub thresholding: bool,
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn default_schedule() -> String {
    "scaled_linear".into()
}
fn default_spacing() -> String {
    "leading".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}

impl Default for SchedulerConfig {
    /// The SD 1.5 settings.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            set_alpha_to_one: false,
            steps_offset: 1,
            timestep_spacing: "leading".into(),
            prediction_type: "epsilon".into(),
            clip_sample: false,
            thresholding: false,
        }
    }
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self, SchedulerError> {
        let err = |reason: String| SchedulerError::Config {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| err(e.to_string()))
    }
}

/// What every sampler offers the pipeline.
pub trait Scheduler {
    /// The timesteps of the chain, in the order they are visited (descending).
    fn timesteps(&self) -> &[usize];
    /// Cumulative alpha product at a training timestep.
    fn alpha_cumprod(&self, t: usize) -> f64;
    /// One denoising step from `sample` at timestep `t` with model output `eps`.
    fn step<B: Backend>(&self, eps: Tensor<B, 4>, t: usize, sample: Tensor<B, 4>) -> StepOutput<B>;
    /// Noise a clean sample to timestep `t`: sqrt(a_t) x0 + sqrt(1 - a_t) noise.
    fn add_noise<B: Backend>(&self, x0: Tensor<B, 4>, noise: Tensor<B, 4>, t: usize) -> Tensor<B, 4> {
        let a = self.alpha_cumprod(t);
        x0.mul_scalar(a.sqrt()).add(noise.mul_scalar((1.0 - a).sqrt()))
    }
    /// The sigma the initial noise is scaled by (1 for DDIM).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
}

pub struct StepOutput<B: Backend> {
    pub prev_sample: Tensor<B, 4>,
    pub pred_original_sample: Tensor<B, 4>,
}

/// Deterministic DDIM (eta = 0).
#[derive(Clone, Debug)]
pub struct Ddim {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<usize>,
    step_ratio: usize,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, inference_steps: usize) -> Result<Self, SchedulerError> {
        let n = config.num_train_timesteps;
        if inference_steps == 0 || inference_steps > n {
            return Err(SchedulerError::Steps(inference_steps, n));
        }
        if config.prediction_type != "epsilon" {
            return Err(SchedulerError::Unsupported {
                field: "prediction_type",
                value: config.prediction_type.clone(),
                supported: "epsilon",
            });
        }
        if config.thresholding || config.clip_sample {
            return Err(SchedulerError::Unsupported {
                field: "clip_sample/thresholding",
                value: "true".into(),
                supported: "false",
            });
        }
        // torch computes the schedule in float32: round each quantity to f32 as it does.
        let betas: Vec<f32> = match config.beta_schedule.as_str() {
            "scaled_linear" => linspace(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            "linear" => linspace(config.beta_start, config.beta_end, n),
            other => {
                return Err(SchedulerError::Unsupported {
                    field: "beta_schedule",
                    value: other.into(),
                    supported: "scaled_linear, linear",
                });
            }
        };
        // torch.cumprod over float32 accumulates in double on the CPU and rounds each output.
        let mut acc = 1.0f64;
        let alphas_cumprod: Vec<f64> = betas
            .iter()
            .map(|b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32 as f64
            })
            .collect();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let (timesteps, step_ratio) = match config.timestep_spacing.as_str() {
            "leading" => {
                let ratio = n / inference_steps;
                let ts = (0..inference_steps)
                    .rev()
                    .map(|i| i * ratio + config.steps_offset)
                    .collect();
                (ts, ratio)
            }
            "trailing" => {
                let ratio = n as f64 / inference_steps as f64;
                let mut ts: Vec<usize> = (1..=inference_steps)
                    .map(|i| ((n as f64 - (i - 1) as f64 * ratio).round() as usize).saturating_sub(1))
                    .collect();
                ts.sort_unstable_by(|a, b| b.cmp(a));
                (ts, n / inference_steps)
            }
            other => {
                return Err(SchedulerError::Unsupported {
                    field: "timestep_spacing",
                    value: other.into(),
                    supported: "leading, trailing",
                });
            }
        };
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            step_ratio,
        })
    }

    /// The alpha-cumprod of the step after `t` in the chain (`final_alpha_cumprod` past the end).
    pub fn alpha_prev(&self, t: usize) -> f64 {
        match t.checked_sub(self.step_ratio) {
            Some(p) => self.alphas_cumprod[p.min(self.alphas_cumprod.len() - 1)],
            None => self.final_alpha_cumprod,
        }
    }
}

/// torch.linspace in float32 (symmetric formula: the second half is computed from the end).
fn linspace(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn alpha_cumprod(&self, t: usize) -> f64 {
        self.alphas_cumprod[t.min(self.alphas_cumprod.len() - 1)]
    }

    fn step<B: Backend>(&self, eps: Tensor<B, 4>, t: usize, sample: Tensor<B, 4>) -> StepOutput<B> {
        let a_t = self.alpha_cumprod(t);
        let a_prev = self.alpha_prev(t);
        // eq. (1): x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        let x0 = sample
            .sub(eps.clone().mul_scalar((1.0 - a_t).sqrt()))
            .div_scalar(a_t.sqrt());
        // x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps   (eta = 0)
        let prev = x0
            .clone()
            .mul_scalar(a_prev.sqrt())
            .add(eps.mul_scalar((1.0 - a_prev).sqrt()));
        StepOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_leading_timesteps() {
        let d = Ddim::new(&SchedulerConfig::default(), 10).expect("ddim");
        assert_eq!(d.timesteps(), &[901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
        assert_eq!(d.alpha_prev(1), d.alpha_cumprod(0));
    }

    #[test]
    fn bad_step_counts_are_errors() {
        assert!(Ddim::new(&SchedulerConfig::default(), 0).is_err());
        assert!(Ddim::new(&SchedulerConfig::default(), 1001).is_err());
    }
}

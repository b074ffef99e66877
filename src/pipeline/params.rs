//! The settings of a generation run (the CLI flags and the GUI form) and their bounds, checked in
//! one place for generation and RFFT.

use serde::{Deserialize, Serialize};

use super::product::Placement;

/// A setting out of its range: which one, its value and the range (or the memory it needs).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSetting(pub String);

/// Everything a generation run is asked to do (the CLI flags and the GUI form).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative: String,
    /// Product title (the caption RFNet reads).
    pub title: String,
    /// Seed of the first attempt; attempt i uses seed + i. Random when None.
    pub seed: Option<u64>,
    pub steps: usize,
    pub guidance: f32,
    pub controlnet_scale: f32,
    pub scale: f32,
    pub position: (f32, f32),
    pub canvas: u32,
    pub white_bg: bool,
    /// The most candidates to generate.
    pub attempts: usize,
    /// Stop when P(Available) reaches this.
    pub threshold: f32,
    /// Candidates per forward pass.
    pub batch: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative: String::new(),
            title: String::new(),
            seed: None,
            steps: 40,
            guidance: 7.5,
            controlnet_scale: 1.0,
            scale: 0.7,
            position: (0.5, 0.5),
            canvas: 512,
            white_bg: false,
            attempts: 4,
            threshold: 0.5,
            batch: 1,
        }
    }
}

/// The largest canvas side generation and RFFT accept (SD 1.5 is trained at 512; 2048 already
/// needs ~270 GB for one attention matrix in the matmul form).
pub const MAX_CANVAS: u32 = 2048;
/// Classifier-free guidance scales accepted (A1111 offers 1-30; 0 turns the prompt off).
pub const GUIDANCE_RANGE: std::ops::RangeInclusive<f32> = 0.0..=30.0;
/// ControlNet conditioning scales accepted (A1111 and ComfyUI offer 0-2).
pub const CONTROLNET_SCALE_RANGE: std::ops::RangeInclusive<f32> = 0.0..=2.0;
/// The most candidates per forward pass and attempts per product.
pub const MAX_BATCH: usize = 64;
pub const MAX_ATTEMPTS: usize = 1000;

/// The sampling settings generation and RFFT share, checked in one place. `Err` says which
/// setting is out of range and what the range is.
pub fn check_sampling(guidance: f32, controlnet_scale: f32, canvas: u32) -> Result<(), InvalidSetting> {
    if !GUIDANCE_RANGE.contains(&guidance) {
        return Err(InvalidSetting(format!(
            "guidance {guidance} must be between {} and {}",
            GUIDANCE_RANGE.start(),
            GUIDANCE_RANGE.end()
        )));
    }
    if !CONTROLNET_SCALE_RANGE.contains(&controlnet_scale) {
        return Err(InvalidSetting(format!(
            "ControlNet scale {controlnet_scale} must be between {} and {}",
            CONTROLNET_SCALE_RANGE.start(),
            CONTROLNET_SCALE_RANGE.end()
        )));
    }
    if canvas < 64 || canvas % 64 != 0 || canvas > MAX_CANVAS {
        return Err(InvalidSetting(format!(
            "size {canvas} must be a multiple of 64 between 64 and {MAX_CANVAS}"
        )));
    }
    Ok(())
}

/// Device memory one generation pass needs at most, estimated before anything is allocated:
/// the largest attention-score tensor (the UNet's first self-attention in the matmul form: CFG
/// pair x 8 heads x tokens^2, tokens = (canvas / 8)^2) plus the full-resolution VAE activations
/// (128 channels, a few live at once) and 2.5 GB of SD 1.5 + ControlNet weights.
pub fn generation_memory_bytes(canvas: u32, batch: usize, element_bytes: usize) -> u64 {
    let tokens = (canvas as u64 / 8).pow(2);
    let attention = 2 * batch as u64 * 8 * tokens * tokens * element_bytes as u64;
    let vae = 4 * 128 * (canvas as u64).pow(2) * element_bytes as u64 * batch as u64;
    attention + vae + 2_500_000_000
}

/// Refuse a job whose estimated memory exceeds what the device can give (`budget`, e.g. the
/// host's available memory for the CPU backend; None when unknown), naming both numbers.
pub fn check_memory(what: &str, needed: u64, budget: Option<u64>) -> Result<(), InvalidSetting> {
    match budget {
        Some(avail) if needed > avail => Err(InvalidSetting(format!(
            "{what} needs about {} of memory, more than the {} this device has available; use a smaller size or batch",
            crate::models::manifest::human_bytes(needed),
            crate::models::manifest::human_bytes(avail)
        ))),
        _ => Ok(()),
    }
}

impl GenerateParams {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let bad = |m: String| Err(InvalidSetting(m));
        if self.steps == 0 || self.steps > 1000 {
            return bad(format!("--steps {} must be between 1 and 1000", self.steps));
        }
        if self.attempts == 0 || self.attempts > MAX_ATTEMPTS {
            return bad(format!("--attempts {} must be between 1 and {MAX_ATTEMPTS}", self.attempts));
        }
        if self.batch == 0 || self.batch > MAX_BATCH {
            return bad(format!("--batch {} must be between 1 and {MAX_BATCH}", self.batch));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return bad(format!("--threshold {} must be between 0 and 1", self.threshold));
        }
        check_sampling(self.guidance, self.controlnet_scale, self.canvas)?;
        if !(0.05..=1.0).contains(&self.scale) {
            return bad(format!("--scale {} must be between 0.05 and 1.0", self.scale));
        }
        let (px, py) = self.position;
        if !(0.0..=1.0).contains(&px) || !(0.0..=1.0).contains(&py) {
            return bad(format!("--position {px},{py} must be fractions of the canvas between 0 and 1"));
        }
        Ok(())
    }

    /// `validate` plus the memory check against `budget` (see `check_memory`).
    pub fn validate_for(&self, budget: Option<u64>, element_bytes: usize) -> Result<(), InvalidSetting> {
        self.validate()?;
        let needed = generation_memory_bytes(self.canvas, self.batch.min(self.attempts), element_bytes);
        check_memory(
            &format!("generating at {0}x{0} with --batch {1}", self.canvas, self.batch.min(self.attempts)),
            needed,
            budget,
        )
    }

    pub(crate) fn placement(&self) -> Placement {
        Placement {
            canvas: self.canvas,
            scale: self.scale,
            position: self.position,
            white_bg: self.white_bg,
        }
    }
}


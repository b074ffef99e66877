//! The scoring interface recurrent generation calls. RFNet implements it (`pipeline::judge`);
//! until an RFNet checkpoint is installed, generation runs unscored and says so.

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use super::product::PlacedProduct;

/// The five RF1M classes, in label-id order (PAPER.md).
pub const CLASS_NAMES: [&str; 5] = [
    "Available",
    "Space Mismatch",
    "Size Mismatch",
    "Indistinctiveness",
    "Shape Hallucination",
];

/// Class probabilities of one image (sum to 1).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassProbs(pub [f32; 5]);

impl ClassProbs {
    pub fn available(&self) -> f32 {
        self.0[0]
    }

    /// "Available 0.81, Space Mismatch 0.05, ..."
    pub fn describe(&self) -> String {
        CLASS_NAMES
            .iter()
            .zip(self.0)
            .map(|(n, p)| format!("{n} {p:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// A scoring model is configured but cannot be used (exit code 3: models invalid).
    #[error("{what} {}: {reason}", path.display())]
    Models {
        what: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
    /// A model produced NaN or Inf values.
    #[error("{0}")]
    NonFinite(#[from] crate::models::weights::NonFiniteOutput),
    #[error("scoring failed: {0}")]
    Failed(String),
}

/// What a scorer found: the class probabilities and, when it computed them, the depth and
/// saliency maps of the image (saved next to the attempt).
#[derive(Clone, Debug)]
pub struct Scored {
    pub probs: ClassProbs,
    pub depth: Option<GrayImage>,
    pub saliency: Option<GrayImage>,
}

impl From<ClassProbs> for Scored {
    fn from(probs: ClassProbs) -> Self {
        Self {
            probs,
            depth: None,
            saliency: None,
        }
    }
}

/// Judges a generated ad image (the "human inspector").
pub trait Scorer {
    /// A short name for logs and metadata (e.g. "rfnet [hash]").
    fn name(&self) -> String;
    /// Class probabilities for `image` (the final, pasted-back ad) of `product` with `title`.
    fn score(&mut self, product: &PlacedProduct, image: &RgbImage, title: &str) -> Result<Scored, ScoreError>;
}

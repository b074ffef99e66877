//! Exporting a dataset: samples with their final label (majority vote, a review decision
//! overrides, ties marked `needs_review`) as JSONL or CSV, and a deterministic train/val/test
//! split by product (no product in two splits); or every individual label with its annotator
//! and time.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::agreement::{Final, final_label};
use super::store::{Label, Store, StoreError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Jsonl,
    Csv,
}

/// One exported row.
#[derive(Clone, Debug, Serialize)]
pub struct ExportRow {
    pub id: i64,
    pub product_id: String,
    /// Absolute path of the generated image.
    pub image: String,
    pub product_image: Option<String>,
    pub depth: Option<String>,
    pub saliency: Option<String>,
    pub title: String,
    pub prompt: String,
    /// `decided`, `needs_review` or `unlabelled`.
    pub state: String,
    /// Class id 0-4 of the final label (None when unlabelled, tied, or Unsuitable).
    pub label: Option<u8>,
    pub label_name: Option<String>,
    pub unsuitable: bool,
    pub n_labels: usize,
    /// How the final label was reached: `review` (a reviewer's decision), `majority` (the
    /// annotators' vote), None when there is none.
    pub decided_by: Option<String>,
    pub split: String,
}

/// One individual label, for exports of every decision (`dataset export --labels`).
#[derive(Clone, Debug, Serialize)]
pub struct LabelRow {
    pub label_id: i64,
    pub sample_id: i64,
    pub product_id: String,
    /// Absolute path of the generated image.
    pub image: String,
    pub annotator: String,
    /// Class id 0-4 (None for Unsuitable).
    pub label: Option<u8>,
    pub label_name: String,
    pub unsuitable: bool,
    /// A reviewer's decision (it overrides the annotators' vote).
    pub review: bool,
    /// When it was written (UTC, ISO 8601).
    pub created_at: String,
    /// Milliseconds from the sample appearing to the decision.
    pub lead_ms: i64,
}

/// Every label in the order written, with who gave it and when.
pub fn label_rows(store: &Store) -> Result<Vec<LabelRow>, StoreError> {
    let samples: BTreeMap<i64, (String, String)> = store
        .all_samples()?
        .into_iter()
        .map(|s| (s.id, (s.product_id, store.dir().join(&s.image_path).display().to_string())))
        .collect();
    Ok(store
        .all_labels()?
        .into_iter()
        .map(|l| {
            let (product_id, image) = samples.get(&l.sample_id).cloned().unwrap_or_default();
            LabelRow {
                label_id: l.id,
                sample_id: l.sample_id,
                product_id,
                image,
                annotator: l.annotator,
                label: l.decision.class(),
                label_name: l.decision.name().to_string(),
                unsuitable: l.decision.class().is_none(),
                review: l.review,
                created_at: l.created_at,
                lead_ms: l.lead_ms,
            }
        })
        .collect())
}

/// Which split a product falls in: a hash of (seed, product id) -> [0, 1) compared with the
/// cumulative ratios. Deterministic and stable as products are added.
pub fn split_of(product_id: &str, seed: u64, ratios: (f64, f64, f64)) -> &'static str {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("{seed}:{product_id}").as_bytes());
    let v = u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]) as f64 / u64::MAX as f64;
    let total = ratios.0 + ratios.1 + ratios.2;
    if v < ratios.0 / total {
        "train"
    } else if v < (ratios.0 + ratios.1) / total {
        "val"
    } else {
        "test"
    }
}

pub fn rows(store: &Store, seed: u64, ratios: (f64, f64, f64)) -> Result<Vec<ExportRow>, StoreError> {
    let labels = store.all_labels()?;
    let mut by_sample: BTreeMap<i64, Vec<&Label>> = BTreeMap::new();
    for l in &labels {
        by_sample.entry(l.sample_id).or_default().push(l);
    }
    let abs = |rel: &Option<String>| rel.as_ref().map(|r| store.dir().join(r).display().to_string());
    Ok(store
        .all_samples()?
        .into_iter()
        .map(|s| {
            let ls = by_sample.get(&s.id).map(Vec::as_slice).unwrap_or(&[]);
            let fin = final_label(ls);
            let (state, label, name, unsuitable) = match fin {
                Final::Decided(d) => ("decided", d.class(), Some(d.name().to_string()), d.class().is_none()),
                Final::NeedsReview => ("needs_review", None, None, false),
                Final::Unlabelled => ("unlabelled", None, None, false),
            };
            ExportRow {
                id: s.id,
                split: split_of(&s.product_id, seed, ratios).to_string(),
                product_id: s.product_id,
                image: store.dir().join(&s.image_path).display().to_string(),
                product_image: abs(&s.product_path),
                depth: abs(&s.depth_path),
                saliency: abs(&s.saliency_path),
                title: s.title,
                prompt: s.prompt,
                state: state.to_string(),
                label,
                label_name: name,
                unsuitable,
                n_labels: ls.iter().filter(|l| !l.review).count(),
                decided_by: match (state, ls.iter().any(|l| l.review)) {
                    ("decided", true) => Some("review".into()),
                    ("decided", false) => Some("majority".into()),
                    _ => None,
                },
            }
        })
        .collect())
}

/// Write rows (samples or individual labels) as JSONL or CSV, atomically.
pub fn write<R: Serialize>(rows: &[R], format: Format, out: &Path) -> Result<(), StoreError> {
    let err = |e: String| StoreError::Io {
        path: out.to_path_buf(),
        source: std::io::Error::other(e),
    };
    let bytes = match format {
        Format::Jsonl => {
            let mut s = String::new();
            for r in rows {
                s.push_str(&serde_json::to_string(r).map_err(|e| err(e.to_string()))?);
                s.push('\n');
            }
            s.into_bytes()
        }
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            for r in rows {
                w.serialize(r).map_err(|e| err(e.to_string()))?;
            }
            w.into_inner().map_err(|e| err(e.to_string()))?
        }
    };
    crate::files::write_atomic(out, &bytes).map_err(|e| err(e.to_string()))
}

//! The generation run folder, one per product: what `rfstudio generate` (and the studio's
//! Generate tab) writes, and what `score --attempts`, `dataset import --kind ours`, the studio's
//! history and the tests read back. Every file name and record type is defined here and nowhere
//! else; the JSON files carry a `version`.
//!
//! ```text
//! run.json                     RunManifest: settings, first seed, models, product, scorer
//! product.png control.png mask.png      the placed product, its canny control, the inpaint mask
//! attempts.jsonl               one AttemptRecord per finished candidate (appended, fsynced)
//! attempt_NNN.png              candidate NNN (1-based), with `parameters` and `rfstudio` PNG text
//! attempt_NNN_depth.png        its depth map (when scored)
//! attempt_NNN_saliency.png     its saliency map (when scored)
//! best.png                     a copy of the chosen candidate
//! summary.json                 RunSummary, written last: its presence means the run finished
//! favourites.json              the attempts a person starred in the studio (optional)
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::params::GenerateParams;
use super::score::ClassProbs;
use crate::files::{FileError, ReadError, append_jsonl, check_version, read_json, read_text, write_atomic, write_json};

/// The format version this build writes; it reads this one and every older one.
pub const RUN_FOLDER_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RunFolderError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Write(#[from] FileError),
}

/// Names and short hashes of the models a run used.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    pub base: String,
    pub base_hash: String,
    pub controlnet: String,
    pub controlnet_hash: String,
    pub test_weights: bool,
    /// LoRAs merged into the base model at load, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraUsed>,
}

/// A LoRA a run used: its name (the file stem, as A1111's `<lora:NAME:...>`), strength and
/// AutoV3 hash (A1111's `Lora hashes`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoraUsed {
    pub name: String,
    pub strength: f32,
    pub hash: String,
}

/// `run.json`: what the run was asked to do, written before the first step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunManifest {
    #[serde(default = "crate::files::version_one")]
    pub version: u32,
    pub params: GenerateParams,
    /// The first attempt's seed (attempt i uses seed + i - 1).
    pub seed: u64,
    pub models: ModelInfo,
    /// The product image as given.
    pub product: PathBuf,
    /// The scorer's name, or None when the run was not scored.
    pub scorer: Option<String>,
}

/// One finished candidate (a line of `attempts.jsonl`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AttemptRecord {
    /// 1-based.
    pub attempt: usize,
    pub seed: u64,
    /// The image's file name in the run folder.
    pub file: String,
    /// None when no scorer (RFNet) was available.
    pub probs: Option<ClassProbs>,
    pub available: Option<bool>,
    pub seconds: f64,
    pub test_weights: bool,
}

/// `summary.json`: the outcome of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    #[serde(default = "crate::files::version_one")]
    pub version: u32,
    pub out_dir: PathBuf,
    pub attempts: Vec<AttemptRecord>,
    /// Index into `attempts` of the chosen image (written as best.png).
    pub best: usize,
    /// Whether the best image reached the threshold; None when unscored.
    pub available: Option<bool>,
    pub scorer: Option<String>,
    pub test_weights: bool,
}

/// The JSON stored beside `parameters` in each candidate PNG (`rfstudio` text chunk), for exact
/// round trips.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageMetadata {
    pub prompt: String,
    pub negative: String,
    pub title: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f32,
    pub controlnet_scale: f32,
    pub scale: f32,
    pub canvas: u32,
    pub model: String,
    pub model_hash: String,
    pub controlnet: String,
    pub controlnet_hash: String,
    pub probs: Option<ClassProbs>,
    pub test_weights: bool,
}

/// The A1111-style `parameters` text of a candidate PNG (what A1111, ComfyUI and image sites
/// show as the image's generation settings).
pub fn parameters_text(params: &GenerateParams, info: &ModelInfo, seed: u64, probs: Option<&ClassProbs>) -> String {
    let mut s = String::new();
    s.push_str(&params.prompt);
    // A1111 writes the LoRAs into the prompt it records.
    for l in &info.loras {
        s.push_str(&format!(" <lora:{}:{}>", l.name, l.strength));
    }
    s.push_str(&format!("\nNegative prompt: {}", params.negative));
    s.push_str(&format!(
        "\nSteps: {}, Sampler: DDIM, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Model hash: {}, ControlNet: {}, ControlNet hash: {}, ControlNet scale: {}, Product scale: {}",
        params.steps,
        params.guidance,
        seed,
        params.canvas,
        params.canvas,
        info.base,
        info.base_hash,
        info.controlnet,
        info.controlnet_hash,
        params.controlnet_scale,
        params.scale,
    ));
    if !info.loras.is_empty() {
        let hashes: Vec<String> = info.loras.iter().map(|l| format!("{}: {}", l.name, l.hash)).collect();
        s.push_str(&format!(", Lora hashes: \"{}\"", hashes.join(", ")));
    }
    if !params.title.is_empty() {
        s.push_str(&format!(", Title: {}", params.title.replace(',', "，")));
    }
    match probs {
        Some(p) => s.push_str(&format!(", RFNet: {}", p.describe())),
        None => s.push_str(", RFNet: not scored"),
    }
    if info.test_weights {
        s.push_str(", Test weights: random (image is noise)");
    }
    s
}

/// A generation run folder (it need not exist yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunFolder {
    dir: PathBuf,
}

/// The maps saved beside a scored candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Depth,
    Saliency,
}

impl MapKind {
    fn suffix(self) -> &'static str {
        match self {
            MapKind::Depth => "depth",
            MapKind::Saliency => "saliency",
        }
    }
}

impl RunFolder {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join("run.json")
    }
    pub fn attempts_path(&self) -> PathBuf {
        self.dir.join("attempts.jsonl")
    }
    pub fn summary_path(&self) -> PathBuf {
        self.dir.join("summary.json")
    }
    pub fn product_path(&self) -> PathBuf {
        self.dir.join("product.png")
    }
    pub fn control_path(&self) -> PathBuf {
        self.dir.join("control.png")
    }
    pub fn mask_path(&self) -> PathBuf {
        self.dir.join("mask.png")
    }
    pub fn best_path(&self) -> PathBuf {
        self.dir.join("best.png")
    }

    /// The file name of candidate `attempt` (1-based).
    pub fn attempt_file(attempt: usize) -> String {
        format!("attempt_{attempt:03}.png")
    }
    pub fn attempt_path(&self, attempt: usize) -> PathBuf {
        self.dir.join(Self::attempt_file(attempt))
    }

    /// The file name of a candidate's map, from the candidate's own file name.
    pub fn map_file(image_file: &str, kind: MapKind) -> String {
        format!("{}_{}.png", image_file.strip_suffix(".png").unwrap_or(image_file), kind.suffix())
    }
    pub fn map_path(&self, image_file: &str, kind: MapKind) -> PathBuf {
        self.dir.join(Self::map_file(image_file, kind))
    }

    /// The candidate number of a file name `attempt_NNN.png` (not its maps, not other files).
    pub fn attempt_number(file_name: &str) -> Option<usize> {
        let digits = file_name.strip_prefix("attempt_")?.strip_suffix(".png")?;
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse().ok())
            .flatten()
    }

    /// The candidate images present in the folder, in attempt order.
    pub fn attempt_images(&self) -> Result<Vec<PathBuf>, RunFolderError> {
        let read = std::fs::read_dir(&self.dir).map_err(|source| ReadError::Io { path: self.dir.clone(), source })?;
        let mut found: Vec<(usize, PathBuf)> = read
            .filter_map(Result::ok)
            .filter_map(|e| {
                let n = Self::attempt_number(&e.file_name().to_string_lossy())?;
                Some((n, e.path()))
            })
            .collect();
        found.sort();
        Ok(found.into_iter().map(|(_, p)| p).collect())
    }

    /// Whether the run finished (its `summary.json` was written).
    pub fn is_finished(&self) -> bool {
        self.summary_path().is_file()
    }

    pub fn write_manifest(&self, manifest: &RunManifest) -> Result<(), RunFolderError> {
        Ok(write_json(&self.manifest_path(), manifest, false)?)
    }

    pub fn read_manifest(&self) -> Result<RunManifest, RunFolderError> {
        let path = self.manifest_path();
        let m: RunManifest = read_json(&path, "run manifest (run.json)")?;
        check_version(&path, m.version, RUN_FOLDER_VERSION)?;
        Ok(m)
    }

    /// Start `attempts.jsonl` afresh (a rerun into the same folder).
    pub fn clear_attempts(&self) -> Result<(), RunFolderError> {
        let path = self.attempts_path();
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(FileError::Io { path, source }.into()),
        }
    }

    pub fn append_attempt(&self, record: &AttemptRecord) -> Result<(), RunFolderError> {
        // Plain data: serialising cannot fail.
        let value = serde_json::to_value(record).unwrap_or_default();
        Ok(append_jsonl(&self.attempts_path(), &value)?)
    }

    /// The records of `attempts.jsonl`, each line on its own: a line that does not parse comes
    /// back as `Err` with its line number, the rest still read.
    pub fn read_attempts(&self) -> Result<Vec<(usize, Result<AttemptRecord, serde_json::Error>)>, RunFolderError> {
        let path = self.attempts_path();
        let text = read_text(&path)?;
        Ok(text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, serde_json::from_str(l)))
            .collect())
    }

    pub fn write_summary(&self, summary: &RunSummary) -> Result<(), RunFolderError> {
        Ok(write_json(&self.summary_path(), summary, true)?)
    }

    pub fn read_summary(&self) -> Result<RunSummary, RunFolderError> {
        let path = self.summary_path();
        let s: RunSummary = read_json(&path, "run summary (summary.json)")?;
        check_version(&path, s.version, RUN_FOLDER_VERSION)?;
        Ok(s)
    }

    pub fn favourites_path(&self) -> PathBuf {
        self.dir.join("favourites.json")
    }

    /// The candidates a person marked as favourites (attempt numbers); none when the file is
    /// absent.
    pub fn read_favourites(&self) -> Result<BTreeSet<usize>, RunFolderError> {
        let path = self.favourites_path();
        if !path.exists() {
            return Ok(BTreeSet::new());
        }
        let f: Favourites = read_json(&path, "favourites (favourites.json)")?;
        check_version(&path, f.version, RUN_FOLDER_VERSION)?;
        Ok(f.attempts)
    }

    /// Replace the favourites (atomically: a killed process leaves the old list or the new one).
    pub fn write_favourites(&self, attempts: &BTreeSet<usize>) -> Result<(), RunFolderError> {
        let f = Favourites {
            version: RUN_FOLDER_VERSION,
            attempts: attempts.clone(),
        };
        Ok(write_json(&self.favourites_path(), &f, true)?)
    }

    /// Copy candidate image `file` (its PNG `parameters` text included) to `dest`, atomically.
    pub fn export_image(&self, file: &str, dest: &Path) -> Result<(), RunFolderError> {
        let src = self.dir.join(file);
        let bytes = std::fs::read(&src).map_err(|source| ReadError::Io { path: src.clone(), source })?;
        Ok(write_atomic(dest, &bytes)?)
    }
}

/// `favourites.json`: the attempts marked as favourites in a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Favourites {
    #[serde(default = "crate::files::version_one")]
    version: u32,
    attempts: BTreeSet<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        assert_eq!(RunFolder::attempt_file(7), "attempt_007.png");
        assert_eq!(RunFolder::attempt_number("attempt_007.png"), Some(7));
        assert_eq!(RunFolder::attempt_number("attempt_1234.png"), Some(1234));
        for not in ["attempt_007_depth.png", "attempt_.png", "attempt_7.jpg", "best.png", "xattempt_001.png"] {
            assert_eq!(RunFolder::attempt_number(not), None, "{not}");
        }
        assert_eq!(RunFolder::map_file("attempt_007.png", MapKind::Depth), "attempt_007_depth.png");
        assert_eq!(RunFolder::map_file("attempt_007.png", MapKind::Saliency), "attempt_007_saliency.png");
    }

    #[test]
    fn manifest_round_trips_reads_unversioned_folders_and_refuses_newer_ones() {
        let dir = std::env::temp_dir().join(format!("rfstudio-run-folder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let folder = RunFolder::new(&dir);
        let manifest = RunManifest {
            version: RUN_FOLDER_VERSION,
            params: GenerateParams { title: "杯子".into(), ..GenerateParams::default() },
            seed: 42,
            models: ModelInfo::default(),
            product: "cup.png".into(),
            scorer: None,
        };
        folder.write_manifest(&manifest).unwrap();
        let back = folder.read_manifest().unwrap();
        assert_eq!((back.seed, back.params.title.as_str(), back.version), (42, "杯子", 1));
        // Written before run folders had a version.
        let mut old = serde_json::to_value(&manifest).unwrap();
        old.as_object_mut().unwrap().remove("version");
        std::fs::write(folder.manifest_path(), old.to_string()).unwrap();
        assert_eq!(folder.read_manifest().unwrap().version, 1);
        old["version"] = 99.into();
        std::fs::write(folder.manifest_path(), old.to_string()).unwrap();
        let err = folder.read_manifest().unwrap_err().to_string();
        assert!(err.contains("newer rfstudio") && err.contains("99"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

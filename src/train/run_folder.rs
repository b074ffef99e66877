//! Training run folders, RFFT and RFNet, in one place: their file names, the typed records in
//! them, the atomically replaced `checkpoint/` both kinds resume from, and the one reader that
//! the CLI, the studio's Fine-tune monitor and the tests use.
//!
//! ```text
//! RFFT run                              RFNet run
//! run.toml       the RfftConfig         train.json     TrainSettings
//! state.json     RunState               config.json    the RFNet config
//! metrics.jsonl  RfftEvent Step / Eval  metrics.jsonl  TrainEvent Step / Epoch
//! eval/step-NNNNNN.png  sample grids
//! checkpoint/    trainable.bin          checkpoint/    model.bin, optimizer.bin, state.json
//!                optimizer.bin                         (TrainState), model.safetensors,
//!                state.json (RunState)                 config.json, tokenizer files: a
//!                lora.json (LoRA runs)                 loadable RFNet folder
//! ```
//!
//! A checkpoint is written into `checkpoint.tmp`, the previous one renamed to `checkpoint.old`,
//! the new one renamed in and the old one removed: a process killed at any point leaves a
//! complete checkpoint (`checkpoint` or, between the renames, `checkpoint.old`). `state.json`
//! files carry a `version`; metrics lines are appended and fsynced, and a resumed run first cuts
//! them back to its checkpoint's step.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use burn::module::Module;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Record, Recorder};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::files::{self, FileError, ReadError, append_jsonl, check_version, read_text};

/// The `state.json` format version this build writes; it reads this one and older ones.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RunFolderError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Write(#[from] FileError),
    /// A checkpoint file that cannot be read back.
    #[error(
        "{path}: the checkpoint is corrupt or truncated: {what}; restore it, or delete the run's checkpoint folder to start again from step 0"
    )]
    Corrupt { path: PathBuf, what: &'static str },
    #[error("{path}: cannot write the checkpoint: {reason}")]
    Record { path: PathBuf, reason: String },
    #[error("{0}: not a run folder (no run.toml, train.json or metrics.jsonl)")]
    NotARun(PathBuf),
}

// ---------------------------------------------------------------------------------------------
// File names
// ---------------------------------------------------------------------------------------------

/// A training run folder's files.
pub struct RunFiles;

impl RunFiles {
    /// RFFT: the run's configuration.
    pub fn rfft_config(run: &Path) -> PathBuf {
        run.join("run.toml")
    }
    /// RFFT: the run's `RunState`.
    pub fn state(run: &Path) -> PathBuf {
        run.join("state.json")
    }
    /// Both: one JSON line per step, evaluation or epoch.
    pub fn metrics(run: &Path) -> PathBuf {
        run.join("metrics.jsonl")
    }
    /// RFFT: the sample grids.
    pub fn eval_dir(run: &Path) -> PathBuf {
        run.join("eval")
    }
    /// RFFT: the grid of the evaluation at `step`, relative to the run folder.
    pub fn eval_grid(step: usize) -> String {
        format!("eval/step-{step:06}.png")
    }
    /// RFNet: the training settings.
    pub fn rfnet_settings(run: &Path) -> PathBuf {
        run.join("train.json")
    }
    /// RFFT: the file that marks a complete checkpoint (the ControlNet or the LoRA adapters).
    pub const RFFT_TRAINABLE: &'static str = "trainable.bin";
    /// The current checkpoint folder (see [`latest_checkpoint`] for the one to read).
    pub fn checkpoint(run: &Path) -> PathBuf {
        run.join("checkpoint")
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

type Recorder_ = BinFileRecorder<FullPrecisionSettings>;

/// Write a new checkpoint of `run`: `fill` writes the files into the empty folder it is given,
/// which then replaces the previous checkpoint atomically. Returns the checkpoint folder.
pub fn write_checkpoint<E: From<RunFolderError>>(run: &Path, fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<PathBuf, E> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RunFolderError::Write(FileError::Io { path, source })
    };
    let tmp = run.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    fill(&tmp)?;
    let fin = RunFiles::checkpoint(run);
    let old = run.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if fin.exists() {
        std::fs::rename(&fin, &old).map_err(io(&fin))?;
    }
    std::fs::rename(&tmp, &fin).map_err(io(&fin))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(fin)
}

/// The newest complete checkpoint of `run`: `checkpoint`, else `checkpoint.old` (a crash between
/// the two renames), holding `state.json` and `marker`.
pub fn latest_checkpoint(run: &Path, marker: &str) -> Option<PathBuf> {
    [RunFiles::checkpoint(run), run.join("checkpoint.old")]
        .into_iter()
        .find(|d| d.join("state.json").is_file() && d.join(marker).is_file())
}

/// Remove every checkpoint of `run` (a run started afresh).
pub fn remove_checkpoints(run: &Path) {
    for name in ["checkpoint", "checkpoint.old", "checkpoint.tmp"] {
        let _ = std::fs::remove_dir_all(run.join(name));
    }
}

/// Save `module`'s parameters as `dir/NAME.bin` (a burn record with parameter ids).
pub fn save_module<B: Backend, M: Module<B>>(dir: &Path, name: &str, module: &M) -> Result<(), RunFolderError> {
    let path = dir.join(name);
    module.clone().save_file(&path, &Recorder_::new()).map_err(|e| RunFolderError::Record {
        path: path.with_extension("bin"),
        reason: e.to_string(),
    })
}

/// Load `dir/NAME.bin` into `module`.
pub fn load_module<B: Backend, M: Module<B>>(dir: &Path, name: &str, module: M, device: &B::Device) -> Result<M, RunFolderError> {
    let path = dir.join(name);
    module
        .load_file(&path, &Recorder_::new(), device)
        .map_err(|e| corrupt(&path.with_extension("bin"), &e))
}

/// Save a record (an optimizer's state) as `dir/NAME.bin`.
pub fn save_record<B: Backend, R: Record<B>>(dir: &Path, name: &str, record: R) -> Result<(), RunFolderError> {
    let path = dir.join(name);
    Recorder::<B>::record(&Recorder_::new(), record, path.clone())
        .map(|_| ())
        .map_err(|e| RunFolderError::Record {
            path: path.with_extension("bin"),
            reason: e.to_string(),
        })
}

/// Load the record `dir/NAME.bin`.
pub fn load_record<B: Backend, R: Record<B>>(dir: &Path, name: &str, device: &B::Device) -> Result<R, RunFolderError> {
    let path = dir.join(name);
    Recorder::<B>::load(&Recorder_::new(), path.clone(), device).map_err(|e| corrupt(&path.with_extension("bin"), &e))
}

/// Say which file cannot be read back and why, in words a user can act on (burn's errors nest
/// debug dumps of the decoder state).
fn corrupt(path: &Path, e: &burn::record::RecorderError) -> RunFolderError {
    let text = format!("{e:?}");
    let what = if text.contains("UnexpectedEof") {
        "it ends early (truncated)"
    } else if text.contains("NotFound") {
        "it is missing"
    } else {
        "its contents do not decode"
    };
    RunFolderError::Corrupt { path: path.to_path_buf(), what }
}

// ---------------------------------------------------------------------------------------------
// JSON files and metrics
// ---------------------------------------------------------------------------------------------

/// Write `value` as JSON to `path` atomically (pretty: people read these).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RunFolderError> {
    Ok(files::write_json(path, value, true)?)
}

/// Read the JSON file `path` (`what` names it in errors).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &'static str) -> Result<T, RunFolderError> {
    Ok(files::read_json(path, what)?)
}

/// Now in unix seconds, the `time` of metrics lines (0 on a clock set before 1970).
pub fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Append one metrics line (an `RfftEvent` or `TrainEvent`) to `path`, fsynced.
pub fn append_metric<T: Serialize>(path: &Path, event: &T) -> Result<(), RunFolderError> {
    Ok(append_jsonl(path, &serde_json::to_value(event).unwrap_or_default())?)
}

/// Keep the metrics lines of steps <= `step` (a resumed run: no gap, no duplicate).
pub fn truncate_metrics(path: &Path, step: usize) -> Result<(), RunFolderError> {
    Ok(crate::files::truncate_jsonl_steps(path, step)?)
}

// ---------------------------------------------------------------------------------------------
// RFFT records
// ---------------------------------------------------------------------------------------------

/// One optimizer step (a `metrics.jsonl` line with `"kind":"step"`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub f_ac: f64,
    pub reg: f64,
    pub total: f64,
    pub grad_norm: f64,
    pub step_time_s: f64,
    /// Peak resident memory of the process on the CPU backend; null where the backend does not
    /// report memory (GPUs).
    pub memory_bytes: Option<u64>,
    pub lr: f64,
    /// When the step ended, in unix seconds (the monitor's wall-clock axis); absent in runs
    /// written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<f64>,
    /// Resident memory of the process when the step ended (`train::memory`; Linux).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_bytes: Option<u64>,
    /// Bytes held by live tensors on the GPU when the step ended (CUDA and wgpu backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_bytes: Option<u64>,
}

/// One evaluation sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSample {
    pub product: String,
    pub seed: u64,
    pub probs: [f32; 5],
    pub available: bool,
}

/// An evaluation (a `metrics.jsonl` line with `"kind":"eval"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub step: usize,
    pub availability_rate: f64,
    /// Mean -ln P(Available) over the samples.
    pub mean_f_ac: f64,
    /// The grid image, relative to the run folder ([`RunFiles::eval_grid`]).
    pub grid: String,
    /// One entry per grid cell, row by row (a row per eval product, a column per eval seed).
    pub samples: Vec<EvalSample>,
    /// Cells per grid row (the eval seeds); absent in older runs, where the samples' seeds give
    /// it ([`EvalMetrics::columns`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid_columns: Option<usize>,
    /// Mean relative distance || g_theta - g_ref || / || g_ref || of the text-guidance direction
    /// from the original ControlNet's, at the first step of the last-steps window.
    #[serde(default)]
    pub guidance_distance: f64,
    /// Mean pairwise RMS distance (0..1) between the backgrounds of one product across the eval
    /// seeds: the collapse measure (no regularisation drives it down).
    #[serde(default)]
    pub background_variety: f64,
}

impl EvalMetrics {
    /// Cells per row of the grid image: the recorded count, else the number of distinct seeds
    /// (every product is evaluated with the same seeds), at least 1.
    pub fn columns(&self) -> usize {
        let n = self.grid_columns.unwrap_or_else(|| {
            let mut seeds: Vec<u64> = self.samples.iter().map(|s| s.seed).collect();
            seeds.sort_unstable();
            seeds.dedup();
            seeds.len()
        });
        n.max(1)
    }
}

/// Progress of an RFFT run. `Step` and `Eval` are also the lines of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RfftEvent {
    Step(StepMetrics),
    Eval(EvalMetrics),
    Checkpoint { step: usize, dir: PathBuf },
    Paused { step: usize },
    Resumed { step: usize },
    /// The run ended: `status` is "finished" (all steps) or "stopped" (asked to stop).
    Finished { step: usize, status: RunStatus },
    Failed { step: usize, error: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Paused,
    Stopped,
    Finished,
    Failed,
    /// Never written: what `RunState::current` reports for a "running" or "paused" run whose
    /// process has gone (killed, crashed, machine restarted).
    Interrupted,
}

impl RunStatus {
    /// The status in the interface language, for people (`name` is what `state.json` keeps).
    pub fn display_name(self) -> &'static str {
        match self {
            RunStatus::Running => crate::tr!("finetune.status_running"),
            RunStatus::Paused => crate::tr!("finetune.status_paused"),
            RunStatus::Stopped => crate::tr!("finetune.status_stopped"),
            RunStatus::Finished => crate::tr!("finetune.status_finished"),
            RunStatus::Failed => crate::tr!("finetune.status_failed"),
            RunStatus::Interrupted => crate::tr!("finetune.status_interrupted"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Paused => "paused",
            RunStatus::Stopped => "stopped",
            RunStatus::Finished => "finished",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

/// `state.json` of an RFFT run folder (and of its checkpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    #[serde(default = "crate::files::version_one")]
    pub version: u32,
    pub step: usize,
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The process writing the run while it is running or paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The devices of a data-parallel run (`cuda:0,cuda:1`); absent for one device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<String>,
}

impl RunState {
    pub fn new(step: usize, status: RunStatus) -> Self {
        let live = matches!(status, RunStatus::Running | RunStatus::Paused);
        Self {
            version: STATE_VERSION,
            step,
            status,
            error: None,
            pid: live.then(std::process::id),
            devices: None,
        }
    }

    /// The status as readers should show it: a run that says it is running or paused while its
    /// process no longer exists was interrupted (and `rfft --resume` continues it).
    pub fn current(&self) -> RunStatus {
        match (self.status, self.pid) {
            (RunStatus::Running | RunStatus::Paused, Some(pid)) if !process_alive(pid) => RunStatus::Interrupted,
            (s, _) => s,
        }
    }

    /// Write `state.json` into `dir` (a run folder or a checkpoint being written).
    pub fn write(&self, dir: &Path) -> Result<(), RunFolderError> {
        write_json(&RunFiles::state(dir), self)
    }

    /// Read `state.json` from `dir`.
    pub fn read(dir: &Path) -> Result<Self, RunFolderError> {
        let path = RunFiles::state(dir);
        let state: Self = read_json(&path, "run state (state.json)")?;
        check_version(&path, state.version, STATE_VERSION)?;
        Ok(state)
    }
}

/// Whether a process exists (Linux: /proc; elsewhere assumed alive).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// RFNet records
// ---------------------------------------------------------------------------------------------

/// One RFNet optimizer step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RfnetStep {
    pub epoch: usize,
    pub step: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub lr: f64,
    /// When the step ended, in unix seconds; absent in runs written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<f64>,
}

/// One RFNet epoch with its validation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RfnetEpoch {
    pub epoch: usize,
    pub step: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub val_macro_f1: f64,
    pub seconds: f64,
}

/// Progress of an RFNet training run, and the lines of its `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TrainEvent {
    Step(RfnetStep),
    Epoch(RfnetEpoch),
}

/// `checkpoint/state.json` of an RFNet run: where training resumes from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    #[serde(default = "crate::files::version_one")]
    pub version: u32,
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: usize,
}

impl TrainState {
    pub fn read(checkpoint: &Path) -> Result<Self, RunFolderError> {
        let path = checkpoint.join("state.json");
        let state: Self = read_json(&path, "training state (state.json)")?;
        check_version(&path, state.version, STATE_VERSION)?;
        Ok(state)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading a run
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    Rfft,
    Rfnet,
}

impl RunKind {
    pub fn name(self) -> &'static str {
        match self {
            RunKind::Rfft => "RFFT",
            RunKind::Rfnet => "RFNet training",
        }
    }

    /// Which kind of run `dir` holds, if any.
    pub fn of(dir: &Path) -> Option<RunKind> {
        if RunFiles::rfft_config(dir).is_file() {
            Some(RunKind::Rfft)
        } else if RunFiles::rfnet_settings(dir).is_file() || RunFiles::metrics(dir).is_file() {
            Some(RunKind::Rfnet)
        } else {
            None
        }
    }
}

/// A run in a list: its folder, kind and a one-line status.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEntry {
    pub dir: PathBuf,
    pub name: String,
    pub kind: RunKind,
    pub status: String,
}

impl RunEntry {
    fn of(dir: &Path, kind: RunKind) -> Self {
        Self {
            dir: dir.to_path_buf(),
            name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            kind,
            status: status_line(dir, kind),
        }
    }
}

/// Everything a run folder holds, read: settings (flattened `key = value` pairs), state and
/// every metrics line of its kind.
#[derive(Clone, Debug, PartialEq)]
pub struct RunData {
    pub entry: RunEntry,
    pub hyperparameters: Vec<(String, String)>,
    /// RFFT: `state.json`, with the status as [`RunState::current`] reports it.
    pub state: Option<RunState>,
    pub rfft_steps: Vec<StepMetrics>,
    pub rfft_evals: Vec<EvalMetrics>,
    pub rfnet_steps: Vec<RfnetStep>,
    pub rfnet_epochs: Vec<RfnetEpoch>,
    /// Metrics lines that do not parse (a half-written last line of a killed run, or damage).
    pub bad_lines: usize,
}

impl RunData {
    /// Whether an RFFT run can be continued where it ended (`rfft --resume`, the studio's Resume
    /// run): stopped, interrupted or failed, with a complete checkpoint to continue from.
    pub fn resumable(&self) -> bool {
        self.entry.kind == RunKind::Rfft
            && self
                .state
                .as_ref()
                .is_some_and(|s| matches!(s.status, RunStatus::Stopped | RunStatus::Interrupted | RunStatus::Failed))
            && latest_checkpoint(&self.entry.dir, RunFiles::RFFT_TRAINABLE).is_some()
    }

    /// How many steps the run has recorded.
    pub fn points(&self) -> usize {
        match self.entry.kind {
            RunKind::Rfft => self.rfft_steps.len(),
            RunKind::Rfnet => self.rfnet_steps.len(),
        }
    }
}

/// The run's status in a few words, in the language of the thread that reads the run (for lists;
/// the studio's watcher reads everything again when the language changes).
fn status_line(dir: &Path, kind: RunKind) -> String {
    match kind {
        RunKind::Rfft => match RunState::read(dir) {
            // `current`: a "running" run whose process is gone shows as interrupted.
            Ok(s) => crate::tr!("finetune.status_at_step", status = s.current().display_name(), step = s.step),
            Err(RunFolderError::Read(ReadError::Io { .. })) => crate::tr!("finetune.status_no_state").to_string(),
            Err(e) => crate::tr!("finetune.status_unreadable", error = e),
        },
        RunKind::Rfnet => {
            let epochs = read_json::<serde_json::Value>(&RunFiles::rfnet_settings(dir), "training settings")
                .ok()
                .and_then(|v| v["epochs"].as_u64());
            let done = latest_checkpoint(dir, "model.safetensors")
                .and_then(|ck| TrainState::read(&ck).ok())
                .map_or(0, |s| s.epoch as u64);
            match epochs {
                Some(e) if done >= e => crate::tr!("finetune.status_epochs_finished", done = done, epochs = e),
                Some(e) => crate::tr!("finetune.status_epochs_of", done = done, epochs = e),
                None => crate::tr!("finetune.status_epochs", done = done),
            }
        }
    }
}

/// The run folders directly under `root` (and `root` itself when it is one), newest first.
pub fn list_runs(root: &Path) -> Vec<RunEntry> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if RunKind::of(root).is_some() {
        dirs.push(root.to_path_buf());
    }
    if let Ok(rd) = std::fs::read_dir(root) {
        dirs.extend(rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let mut out: Vec<(SystemTime, RunEntry)> = dirs
        .into_iter()
        .filter_map(|dir| {
            let kind = RunKind::of(&dir)?;
            let modified = std::fs::metadata(&dir).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            Some((modified, RunEntry::of(&dir, kind)))
        })
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.name.cmp(&b.1.name)));
    out.into_iter().map(|(_, e)| e).collect()
}

/// The files whose change means a run must be read again (the monitor polls them).
pub fn watched_files(run: &Path) -> [PathBuf; 5] {
    [
        RunFiles::metrics(run),
        RunFiles::state(run),
        RunFiles::rfft_config(run),
        RunFiles::rfnet_settings(run),
        RunFiles::checkpoint(run).join("state.json"),
    ]
}

/// Read a run folder of either kind (tolerates a half-written last metrics line).
pub fn read_run(dir: &Path) -> Result<RunData, RunFolderError> {
    let kind = RunKind::of(dir).ok_or_else(|| RunFolderError::NotARun(dir.to_path_buf()))?;
    let mut hyperparameters = Vec::new();
    let mut state = None;
    match kind {
        RunKind::Rfft => {
            // Parsed as TOML, not validated as a config: a run stays readable after its
            // product files moved.
            let path = RunFiles::rfft_config(dir);
            let text = read_text(&path)?;
            let v: toml::Value = toml::from_str(&text).map_err(|e| ReadError::Parse {
                path: path.clone(),
                what: "RFFT configuration",
                reason: e.to_string(),
            })?;
            flatten_toml("", &v, &mut hyperparameters);
            state = match RunState::read(dir) {
                Ok(s) => Some(RunState { status: s.current(), ..s }),
                Err(RunFolderError::Read(ReadError::Io { .. })) => None,
                Err(e) => return Err(e),
            };
        }
        RunKind::Rfnet => {
            let path = RunFiles::rfnet_settings(dir);
            if path.is_file() {
                let v: serde_json::Value = read_json(&path, "training settings (train.json)")?;
                flatten_json("", &v, &mut hyperparameters);
            }
        }
    }
    let mut data = RunData {
        entry: RunEntry::of(dir, kind),
        hyperparameters,
        state,
        rfft_steps: Vec::new(),
        rfft_evals: Vec::new(),
        rfnet_steps: Vec::new(),
        rfnet_epochs: Vec::new(),
        bad_lines: 0,
    };
    let path = RunFiles::metrics(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(ReadError::Io { path, source }.into()),
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let ok = match kind {
            RunKind::Rfft => match serde_json::from_str::<RfftEvent>(line) {
                Ok(RfftEvent::Step(s)) => {
                    data.rfft_steps.push(s);
                    true
                }
                Ok(RfftEvent::Eval(e)) => {
                    data.rfft_evals.push(e);
                    true
                }
                _ => false,
            },
            RunKind::Rfnet => match serde_json::from_str::<TrainEvent>(line) {
                Ok(TrainEvent::Step(s)) => {
                    data.rfnet_steps.push(s);
                    true
                }
                Ok(TrainEvent::Epoch(e)) => {
                    data.rfnet_epochs.push(e);
                    true
                }
                Err(_) => false,
            },
        };
        if !ok {
            data.bad_lines += 1;
        }
    }
    Ok(data)
}

fn flatten_json(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten_json(&key, v, out);
            }
        }
        serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

fn flatten_toml(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten_toml(&key, v, out);
            }
        }
        toml::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_replace_atomically_and_the_latest_complete_one_is_found() {
        let run = std::env::temp_dir().join(format!("rfstudio-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).unwrap();
        assert_eq!(latest_checkpoint(&run, "model.bin"), None);
        let fill = |step: usize| {
            move |dir: &Path| -> Result<(), RunFolderError> {
                RunState::new(step, RunStatus::Running).write(dir)?;
                std::fs::write(dir.join("model.bin"), b"m").map_err(|source| FileError::Io { path: dir.into(), source })?;
                Ok(())
            }
        };
        write_checkpoint(&run, fill(1)).unwrap();
        write_checkpoint(&run, fill(2)).unwrap();
        let ck = latest_checkpoint(&run, "model.bin").unwrap();
        assert_eq!(RunState::read(&ck).unwrap().step, 2);
        // Killed between the two renames: only `checkpoint.old` is complete.
        std::fs::rename(&ck, run.join("checkpoint.old")).unwrap();
        assert_eq!(latest_checkpoint(&run, "model.bin"), Some(run.join("checkpoint.old")));
        // A checkpoint without its marker file is not complete.
        assert_eq!(latest_checkpoint(&run, "trainable.bin"), None);
        remove_checkpoints(&run);
        assert_eq!(latest_checkpoint(&run, "model.bin"), None);
        std::fs::remove_dir_all(&run).ok();
    }

    #[test]
    fn states_without_a_version_read_as_version_1_and_newer_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("rfstudio-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state.json"), r#"{"step":3,"status":"finished"}"#).unwrap();
        let s = RunState::read(&dir).unwrap();
        assert_eq!((s.version, s.step, s.status), (1, 3, RunStatus::Finished));
        std::fs::write(dir.join("state.json"), r#"{"version":7,"step":3,"status":"finished"}"#).unwrap();
        let err = RunState::read(&dir).unwrap_err().to_string();
        assert!(err.contains("newer rfstudio"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Step lines from before `time` and the memory fields were recorded still read; new ones
    /// round-trip them.
    #[test]
    fn rfft_step_lines_with_and_without_time_read() {
        let old = r#"{"kind":"step","step":3,"f_ac":0.5,"reg":0.1,"total":0.6,"grad_norm":1.0,"step_time_s":0.2,"memory_bytes":null,"lr":1e-5}"#;
        let RfftEvent::Step(s) = serde_json::from_str::<RfftEvent>(old).unwrap() else { panic!("not a step") };
        assert_eq!((s.step, s.time, s.resident_bytes, s.device_bytes), (3, None, None, None));
        let new = RfftEvent::Step(StepMetrics { step: 4, time: Some(1.7e9), resident_bytes: Some(1 << 20), ..s });
        let line = serde_json::to_string(&new).unwrap();
        assert!(line.contains("\"time\":1700000000"), "{line}");
        assert_eq!(serde_json::from_str::<RfftEvent>(&line).unwrap(), new);
    }

    #[test]
    fn eval_grid_columns_fall_back_to_the_distinct_seeds() {
        let sample = |product: &str, seed| EvalSample { product: product.into(), seed, probs: [0.2; 5], available: false };
        let mut e = EvalMetrics {
            step: 1,
            availability_rate: 0.0,
            mean_f_ac: 0.0,
            grid: String::new(),
            samples: vec![sample("a", 1), sample("a", 2), sample("b", 1), sample("b", 2)],
            grid_columns: None,
            guidance_distance: 0.0,
            background_variety: 0.0,
        };
        assert_eq!(e.columns(), 2);
        e.grid_columns = Some(4);
        assert_eq!(e.columns(), 4);
    }

    /// The metrics lines written before these types existed still read (the field names are
    /// the format).
    #[test]
    fn rfnet_metrics_lines_round_trip() {
        let line = r#"{"kind":"step","epoch":1,"step":4,"loss":0.5,"accuracy":0.25,"lr":0.0001}"#;
        let ev: TrainEvent = serde_json::from_str(line).unwrap();
        assert_eq!(ev, TrainEvent::Step(RfnetStep { epoch: 1, step: 4, loss: 0.5, accuracy: 0.25, lr: 1e-4, time: None }));
        let back: TrainEvent = serde_json::from_str(&serde_json::to_string(&ev).unwrap()).unwrap();
        assert_eq!(back, ev);
    }
}

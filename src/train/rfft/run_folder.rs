//! The RFFT run folder, typed (the GUI and every reader go through this):
//! - `run.toml`: the `RfftConfig` with absolute paths;
//! - `metrics.jsonl`: `RfftEvent::Step` / `RfftEvent::Eval` lines (steps contiguous across resume);
//! - `eval/step-NNNNNN.png`: sample grids (rows = eval products, columns = seeds);
//! - `checkpoint/` (`checkpoint.old` while being replaced): `trainable.bin` (the ControlNet or the
//!   LoRA adapters, a burn record), `optimizer.bin`, `state.json`, `lora.json` for LoRA runs;
//! - `state.json`: `RunState` (`{"step", "status", "error"?, "pid"?}`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::RfftConfig;
use super::error::{RfftError, io_err};
use crate::pipeline::output::{append_jsonl, write_atomic};

/// One optimizer step (a `metrics.jsonl` line with `"kind":"step"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// The grid image, relative to the run folder.
    pub grid: String,
    pub samples: Vec<EvalSample>,
    /// Mean relative distance || g_theta - g_ref || / || g_ref || of the text-guidance direction
    /// from the original ControlNet's, at the first step of the last-steps window.
    #[serde(default)]
    pub guidance_distance: f64,
    /// Mean pairwise RMS distance (0..1) between the backgrounds of one product across the eval
    /// seeds: the collapse measure (no regularisation drives it down).
    #[serde(default)]
    pub background_variety: f64,
}

/// Progress of a run. `Step` and `Eval` are also the lines of `metrics.jsonl`.
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

/// `state.json` of a run folder (and of its checkpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub step: usize,
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The process writing the run while it is running or paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl RunState {
    pub fn new(step: usize, status: RunStatus) -> Self {
        let live = matches!(status, RunStatus::Running | RunStatus::Paused);
        Self {
            step,
            status,
            error: None,
            pid: live.then(std::process::id),
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
}

/// Whether a process exists (Linux: /proc; elsewhere assumed alive).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// What the GUI's run list shows: the config, the state and every metrics line.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub dir: PathBuf,
    pub config: RfftConfig,
    pub state: Option<RunState>,
    pub steps: Vec<StepMetrics>,
    pub evals: Vec<EvalMetrics>,
}

/// Read a run folder (tolerates a half-written last metrics line).
pub fn read_run(dir: &Path) -> Result<RunSummary, RfftError> {
    // parsed, not validated: a run stays listable after its product files moved
    let path = dir.join("run.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| RfftError::Config(format!("{}: cannot read: {e}", path.display())))?;
    let config: RfftConfig = toml::from_str(&text).map_err(|e| RfftError::Config(format!("{}: {e}", path.display())))?;
    let state = std::fs::read_to_string(dir.join("state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<RunState>(&t).ok())
        .map(|s| RunState {
            status: s.current(),
            ..s
        });
    let (mut steps, mut evals) = (Vec::new(), Vec::new());
    if let Ok(text) = std::fs::read_to_string(dir.join("metrics.jsonl")) {
        for line in text.lines() {
            match serde_json::from_str::<RfftEvent>(line) {
                Ok(RfftEvent::Step(s)) => steps.push(s),
                Ok(RfftEvent::Eval(e)) => evals.push(e),
                _ => {}
            }
        }
    }
    Ok(RunSummary {
        dir: dir.to_path_buf(),
        config,
        state,
        steps,
        evals,
    })
}

pub(crate) fn write_state(run: &Path, state: &RunState) -> Result<(), RfftError> {
    let text = serde_json::to_string(state).map_err(|e| RfftError::Train(e.to_string()))?;
    write_atomic(&run.join("state.json"), text.as_bytes()).map_err(|e| io_err(run, e))
}

pub(crate) fn append_metric(path: &Path, ev: &RfftEvent) -> Result<(), RfftError> {
    let v = serde_json::to_value(ev).map_err(|e| RfftError::Train(e.to_string()))?;
    append_jsonl(path, &v).map_err(|e| io_err(path, e))
}

/// Keep the metric lines of steps <= `step` (resume: no gap, no duplicate).
pub(crate) fn truncate_metrics(path: &Path, step: usize) -> Result<(), RfftError> {
    crate::pipeline::output::truncate_jsonl_steps(path, step).map_err(|e| io_err(path, e))
}

/// The newest complete checkpoint of a run.
pub fn checkpoint_dir(run: &Path) -> Option<PathBuf> {
    [run.join("checkpoint"), run.join("checkpoint.old")]
        .into_iter()
        .find(|d| d.join("state.json").is_file() && d.join("trainable.bin").is_file())
}

/// Peak resident memory of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

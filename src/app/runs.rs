//! Reading training run folders for the Fine-tune tab (no training code here):
//!
//! - RFFT runs (`train::rfft`): `run.toml` (the run's configuration), `metrics.jsonl` with
//!   `{"kind":"step","step","f_ac","reg","total","grad_norm","step_time_s","memory_bytes","lr"}`
//!   and `{"kind":"eval","step","availability_rate","mean_f_ac","grid","samples":[...]}` lines,
//!   `eval/step-NNNNNN.png` grids, `state.json` `{"step","status"}`.
//! - RFNet training runs (`train::rfnet`): `train.json`, `config.json`, `metrics.jsonl` with
//!   `{"kind":"step","epoch","step","loss","accuracy","lr"}` and `{"kind":"epoch",...}` lines,
//!   `checkpoint/state.json` `{"epoch","step"}`.
//!
//! Unreadable lines are counted, not fatal (a line being written is read on the next poll).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

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
}

/// One run folder in the list.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEntry {
    pub dir: PathBuf,
    pub name: String,
    pub kind: RunKind,
    pub status: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct RfftStep {
    pub step: usize,
    pub f_ac: f64,
    pub reg: f64,
    pub total: f64,
    #[serde(default)]
    pub grad_norm: f64,
    #[serde(default)]
    pub step_time_s: f64,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub lr: f64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct EvalSample {
    #[serde(default)]
    pub product: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub probs: Vec<f32>,
    #[serde(default)]
    pub available: bool,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct RfftEval {
    pub step: usize,
    pub availability_rate: f64,
    #[serde(default)]
    pub mean_f_ac: f64,
    #[serde(default)]
    pub grid: Option<String>,
    #[serde(default)]
    pub samples: Vec<EvalSample>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct RfnetStep {
    #[serde(default)]
    pub epoch: usize,
    pub step: usize,
    pub loss: f64,
    #[serde(default)]
    pub accuracy: f64,
    #[serde(default)]
    pub lr: f64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct RfnetEpoch {
    pub epoch: usize,
    #[serde(default)]
    pub step: usize,
    #[serde(default)]
    pub train_loss: f64,
    #[serde(default)]
    pub train_accuracy: f64,
    #[serde(default)]
    pub val_loss: f64,
    #[serde(default)]
    pub val_accuracy: f64,
    #[serde(default)]
    pub val_macro_f1: f64,
    #[serde(default)]
    pub seconds: f64,
}

/// Everything read from one run folder.
#[derive(Clone, Debug, PartialEq)]
pub struct RunData {
    pub entry: RunEntry,
    /// The configuration as `key = value` rows (run.toml or train.json).
    pub hyperparameters: Vec<(String, String)>,
    pub rfft_steps: Vec<RfftStep>,
    pub rfft_evals: Vec<RfftEval>,
    pub rfnet_steps: Vec<RfnetStep>,
    pub rfnet_epochs: Vec<RfnetEpoch>,
    pub bad_lines: usize,
}

impl RunData {
    /// Points on the main curve (for tests and the header): steps seen.
    pub fn points(&self) -> usize {
        match self.entry.kind {
            RunKind::Rfft => self.rfft_steps.len(),
            RunKind::Rfnet => self.rfnet_steps.len(),
        }
    }
}

pub fn kind_of(dir: &Path) -> Option<RunKind> {
    if dir.join("run.toml").is_file() {
        Some(RunKind::Rfft)
    } else if dir.join("train.json").is_file() || dir.join("metrics.jsonl").is_file() {
        Some(RunKind::Rfnet)
    } else {
        None
    }
}

fn status_of(dir: &Path, kind: RunKind) -> String {
    match kind {
        RunKind::Rfft => {
            let state: Option<crate::train::rfft::RunState> = std::fs::read_to_string(dir.join("state.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            match state {
                // `current`: a "running" run whose process is gone shows as interrupted.
                Some(s) => format!(
                    "{} at step {}",
                    serde_json::to_value(s.current())
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_else(|| "unknown".into()),
                    s.step
                ),
                None => "no state.json yet".into(),
            }
        }
        RunKind::Rfnet => {
            let epochs = std::fs::read_to_string(dir.join("train.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["epochs"].as_u64());
            let state = std::fs::read_to_string(dir.join("checkpoint").join("state.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            let done = state.as_ref().and_then(|s| s["epoch"].as_u64()).unwrap_or(0);
            match epochs {
                Some(e) if done >= e => format!("finished ({done}/{e} epochs)"),
                Some(e) => format!("{done}/{e} epochs checkpointed"),
                None => format!("{done} epochs checkpointed"),
            }
        }
    }
}

/// The run folders directly under `root` (and `root` itself when it is one), newest first.
pub fn list_runs(root: &Path) -> Vec<RunEntry> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if kind_of(root).is_some() {
        dirs.push(root.to_path_buf());
    }
    if let Ok(rd) = std::fs::read_dir(root) {
        dirs.extend(rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let mut out: Vec<(SystemTime, RunEntry)> = dirs
        .into_iter()
        .filter_map(|dir| {
            let kind = kind_of(&dir)?;
            let modified = std::fs::metadata(&dir).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            Some((
                modified,
                RunEntry {
                    name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                    status: status_of(&dir, kind),
                    kind,
                    dir,
                },
            ))
        })
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.name.cmp(&b.1.name)));
    out.into_iter().map(|(_, e)| e).collect()
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

/// Read a run folder (its configuration, metrics and status).
pub fn read_run(dir: &Path) -> Result<RunData, String> {
    let kind = kind_of(dir).ok_or_else(|| format!("{}: not a run folder (no run.toml, train.json or metrics.jsonl)", dir.display()))?;
    let mut hyperparameters = Vec::new();
    match kind {
        RunKind::Rfft => {
            let path = dir.join("run.toml");
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let v: toml::Value = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            flatten_toml("", &v, &mut hyperparameters);
        }
        RunKind::Rfnet => {
            if let Ok(text) = std::fs::read_to_string(dir.join("train.json")) {
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", dir.join("train.json").display()))?;
                flatten_json("", &v, &mut hyperparameters);
            }
        }
    }
    let mut data = RunData {
        entry: RunEntry {
            dir: dir.to_path_buf(),
            name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            kind,
            status: status_of(dir, kind),
        },
        hyperparameters,
        rfft_steps: Vec::new(),
        rfft_evals: Vec::new(),
        rfnet_steps: Vec::new(),
        rfnet_epochs: Vec::new(),
        bad_lines: 0,
    };
    let text = match std::fs::read_to_string(dir.join("metrics.jsonl")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", dir.join("metrics.jsonl").display())),
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            data.bad_lines += 1;
            continue;
        };
        let ok = match (v["kind"].as_str(), kind) {
            (Some("step"), RunKind::Rfft) => serde_json::from_value(v).map(|s| data.rfft_steps.push(s)).is_ok(),
            (Some("eval"), RunKind::Rfft) => serde_json::from_value(v).map(|s| data.rfft_evals.push(s)).is_ok(),
            (Some("step"), RunKind::Rfnet) => serde_json::from_value(v).map(|s| data.rfnet_steps.push(s)).is_ok(),
            (Some("epoch"), RunKind::Rfnet) => serde_json::from_value(v).map(|s| data.rfnet_epochs.push(s)).is_ok(),
            _ => false,
        };
        if !ok {
            data.bad_lines += 1;
        }
    }
    Ok(data)
}

/// Messages from the run watcher.
pub enum WatchMsg {
    Runs(Vec<RunEntry>),
    Run(Box<RunData>),
    Error(String),
}

/// What the watcher is told.
pub enum WatchCmd {
    Root(PathBuf),
    Select(Option<PathBuf>),
}

/// A thread that lists the runs under a folder and re-reads the selected run whenever its files
/// change (polling every `every`), sending only what changed.
pub fn spawn_watcher(ctx: &egui::Context, every: Duration) -> (Sender<WatchCmd>, Receiver<WatchMsg>) {
    let (cmd_tx, cmd_rx) = channel::<WatchCmd>();
    let (tx, rx) = channel();
    let wake = ctx.clone();
    let _ = std::thread::Builder::new().name("rfstudio-run-watcher".into()).spawn(move || {
        let mut root: Option<PathBuf> = None;
        let mut selected: Option<PathBuf> = None;
        let mut last_runs: Option<Vec<RunEntry>> = None;
        let mut last_stamp: Option<Vec<(u64, Option<SystemTime>)>> = None;
        loop {
            match cmd_rx.recv_timeout(every) {
                Ok(WatchCmd::Root(r)) => {
                    root = Some(r);
                    last_runs = None;
                }
                Ok(WatchCmd::Select(s)) => {
                    selected = s;
                    last_stamp = None;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let mut sent = false;
            if let Some(r) = &root {
                let runs = list_runs(r);
                if last_runs.as_ref() != Some(&runs) {
                    sent |= tx.send(WatchMsg::Runs(runs.clone())).is_ok();
                    last_runs = Some(runs);
                }
            }
            if let Some(dir) = &selected {
                let stamp: Vec<(u64, Option<SystemTime>)> = ["metrics.jsonl", "state.json", "run.toml", "train.json", "checkpoint/state.json"]
                    .iter()
                    .map(|f| {
                        let m = std::fs::metadata(dir.join(f)).ok();
                        (m.as_ref().map(|m| m.len()).unwrap_or(0), m.and_then(|m| m.modified().ok()))
                    })
                    .collect();
                if last_stamp.as_ref() != Some(&stamp) {
                    let msg = match read_run(dir) {
                        Ok(d) => WatchMsg::Run(Box::new(d)),
                        Err(e) => WatchMsg::Error(e),
                    };
                    sent |= tx.send(msg).is_ok();
                    last_stamp = Some(stamp);
                }
            }
            if sent {
                wake.request_repaint();
            }
        }
    });
    (cmd_tx, rx)
}

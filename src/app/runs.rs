//! Watching training run folders for the Fine-tune tab: a thread that lists the runs under a
//! folder and re-reads the selected one, and the runs overlaid on its plots, when their files
//! change. Reading a run folder is
//! `train::run_folder`'s job (the same reader the CLI and the tests use); unreadable metrics
//! lines are counted there, not fatal (a line being written is read on the next poll).

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, SystemTime};

use crate::i18n::Lang;
use crate::tr;
use crate::train::run_folder::{RunData, RunEntry, RunKind, list_runs, read_run, watched_files};

/// Messages from the run watcher.
pub enum WatchMsg {
    Runs(Vec<RunEntry>),
    Run(Box<RunData>),
    Error(String),
    /// A run overlaid for comparison, read again.
    Compared(Box<RunData>),
    /// A run overlaid for comparison that cannot be read.
    CompareError(PathBuf, String),
}

/// What the watcher is told.
pub enum WatchCmd {
    Root(PathBuf),
    Select(Option<PathBuf>),
    /// The runs overlaid on the selected run's plots (the whole set; it replaces the last one).
    Compare(Vec<PathBuf>),
    /// The interface language: the status lines are written in it (everything is sent again).
    Lang(Lang),
}

/// A kind of run in the interface language.
pub fn kind_name(kind: RunKind) -> &'static str {
    match kind {
        RunKind::Rfft => tr!("finetune.kind_rfft"),
        RunKind::Rfnet => tr!("finetune.kind_rfnet"),
    }
}


type Stamp = Vec<(u64, Option<SystemTime>)>;

/// Sizes and modification times of the files whose change means `dir` must be read again.
fn stamp(dir: &std::path::Path) -> Stamp {
    watched_files(dir)
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok();
            (m.as_ref().map(|m| m.len()).unwrap_or(0), m.and_then(|m| m.modified().ok()))
        })
        .collect()
}

/// A thread that lists the runs under a folder and re-reads the selected run and the compared
/// runs whenever their files change (polling every `every`), sending only what changed. Its
/// status lines are in the language current here until a `WatchCmd::Lang` says otherwise.
pub fn spawn_watcher(ctx: &egui::Context, every: Duration) -> (Sender<WatchCmd>, Receiver<WatchMsg>) {
    let (cmd_tx, cmd_rx) = channel::<WatchCmd>();
    let (tx, rx) = channel();
    let wake = ctx.clone();
    let lang = crate::i18n::current();
    let _ = std::thread::Builder::new().name("rfstudio-run-watcher".into()).spawn(move || {
        crate::i18n::set_thread(Some(lang));
        let mut root: Option<PathBuf> = None;
        let mut selected: Option<PathBuf> = None;
        let mut last_runs: Option<Vec<RunEntry>> = None;
        let mut last_stamp: Option<Stamp> = None;
        let mut compared: Vec<(PathBuf, Option<Stamp>)> = Vec::new();
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
                Ok(WatchCmd::Compare(dirs)) => {
                    // Runs already watched keep their stamp (no re-read); new ones are read.
                    let mut old = std::mem::take(&mut compared);
                    compared = dirs
                        .into_iter()
                        .map(|d| match old.iter().position(|(o, _)| *o == d) {
                            Some(i) => old.swap_remove(i),
                            None => (d, None),
                        })
                        .collect();
                }
                Ok(WatchCmd::Lang(l)) => {
                    crate::i18n::set_thread(Some(l));
                    // Everything shown is sent again in the new language.
                    last_runs = None;
                    last_stamp = None;
                    for (_, stamp) in &mut compared {
                        *stamp = None;
                    }
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
            for (dir, last) in &mut compared {
                let now = stamp(dir);
                if last.as_ref() != Some(&now) {
                    let msg = match read_run(dir) {
                        Ok(d) => WatchMsg::Compared(Box::new(d)),
                        Err(e) => WatchMsg::CompareError(dir.clone(), e.to_string()),
                    };
                    sent |= tx.send(msg).is_ok();
                    *last = Some(now);
                }
            }
            if let Some(dir) = &selected {
                let stamp = stamp(dir);
                if last_stamp.as_ref() != Some(&stamp) {
                    let msg = match read_run(dir) {
                        Ok(d) => WatchMsg::Run(Box::new(d)),
                        Err(e) => WatchMsg::Error(e.to_string()),
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

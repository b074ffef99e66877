//! Progress of long commands on standard error, in the form the terminal can show: an indicatif
//! bar on a terminal; plain, timestamp-free lines (no ANSI codes) when standard error is a file
//! or a CI log, at most one every `PLAIN_INTERVAL` plus the first and last; nothing with
//! `--json` (JSON lines on standard output carry the progress then).

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// The least time between two plain progress lines.
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Progress {
    mode: Mode,
}

#[derive(Clone)]
enum Mode {
    Bar(ProgressBar),
    Plain(Arc<Mutex<Plain>>),
    Quiet,
}

struct Plain {
    label: String,
    last: Option<Instant>,
    last_line: String,
}

/// Whether standard error is an interactive terminal (bars and colours only then).
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

impl Progress {
    /// `template` is an indicatif template for the terminal bar (`{bar}`, `{pos}`, `{len}`,
    /// `{msg}`, ...); plain lines read `label pos/len msg`.
    pub fn new(json: bool, label: &str, total: u64, template: &str) -> Self {
        let mode = if json {
            Mode::Quiet
        } else if stderr_is_terminal() {
            let bar = ProgressBar::new(total);
            bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
            bar.set_prefix(label.to_string());
            Mode::Bar(bar)
        } else {
            Mode::Plain(Arc::new(Mutex::new(Plain {
                label: label.to_string(),
                last: None,
                last_line: String::new(),
            })))
        };
        Self { mode }
    }

    /// Report `pos` of `total` with a message.
    pub fn set(&self, pos: u64, total: u64, msg: &str) {
        match &self.mode {
            Mode::Bar(b) => {
                b.set_length(total);
                b.set_position(pos);
                b.set_message(msg.to_string());
            }
            Mode::Plain(p) => {
                let Ok(mut p) = p.lock() else { return };
                let due = p.last.is_none_or(|t| t.elapsed() >= PLAIN_INTERVAL) || pos >= total;
                let line = format!("{} {pos}/{total}{}{msg}", p.label, if msg.is_empty() { "" } else { " " });
                if due && line != p.last_line {
                    eprintln!("{line}");
                    p.last = Some(Instant::now());
                    p.last_line = line;
                }
            }
            Mode::Quiet => {}
        }
    }

    /// A line that must always be shown (a finished attempt, an epoch), above the bar.
    pub fn println(&self, line: &str) {
        match &self.mode {
            Mode::Bar(b) => b.println(line),
            Mode::Plain(_) => eprintln!("{line}"),
            Mode::Quiet => {}
        }
    }

    pub fn finish(&self) {
        if let Mode::Bar(b) = &self.mode {
            b.finish_and_clear();
        }
    }
}

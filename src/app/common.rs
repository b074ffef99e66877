//! Small helpers shared by the tabs: opening folders in the file
//! manager, native file dialogs on a helper thread, error lines in the error colour.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};

use super::error::UiError;
use crate::tr;

/// Open a folder in the desktop's file manager (errors are returned for display).
pub fn open_folder(path: &Path) -> Result<(), UiError> {
    let program = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(target_os = "windows") {
        "explorer"
    } else {
        "xdg-open"
    };
    std::process::Command::new(program)
        .arg(path)
        .spawn()
        .map(|_| ())
        .map_err(|source| UiError::OpenFolder {
            program,
            path: path.to_path_buf(),
            source,
        })
}

/// What a file dialog was opened for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PickTarget {
    Product,
    OutRoot,
    Dataset,
    RunsRoot,
    ModelsDir,
    FinetuneProducts,
    /// LoRA files for the Generate tab.
    Lora,
    /// Where to save a copy of candidate `file` of run folder `run` (a save dialog).
    Export { run: PathBuf, file: String },
}

impl PickTarget {
    /// The file name a save dialog proposes (`Export`: run folder name + candidate file).
    fn save_name(&self) -> Option<String> {
        match self {
            PickTarget::Export { run, file } => {
                let run = run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                Some(if run.is_empty() { file.clone() } else { format!("{run}-{file}") })
            }
            _ => None,
        }
    }
}

/// Native file dialogs run on a helper thread (rfd's dialogs block until closed).
pub struct Picker {
    tx: Sender<(PickTarget, Result<Vec<PathBuf>, UiError>)>,
    rx: Receiver<(PickTarget, Result<Vec<PathBuf>, UiError>)>,
    pub open: bool,
}

impl Default for Picker {
    fn default() -> Self {
        let (tx, rx) = channel();
        Self { tx, rx, open: false }
    }
}

impl Picker {
    /// Ask for a file (`folder` false) or a folder; the answer arrives through `poll`.
    pub fn pick(&mut self, ctx: &egui::Context, target: PickTarget, folder: bool, multiple: bool) {
        if self.open {
            return;
        }
        self.open = true;
        let tx = self.tx.clone();
        let ctx = ctx.clone();
        let lang = crate::i18n::current();
        let spawned = std::thread::Builder::new().name("rfstudio-file-dialog".into()).spawn(move || {
            crate::i18n::set_thread(Some(lang));
            let lora = target == PickTarget::Lora;
            let save = target.save_name();
            let asked = std::time::Instant::now();
            let mut picked = pick_blocking(folder, multiple, lora, save);
            // A dialog a person closed took them at least a moment; nothing back at once means
            // no dialog appeared (no desktop portal / dialog service), which must be said.
            if picked.as_ref().is_ok_and(Vec::is_empty) && asked.elapsed() < std::time::Duration::from_millis(250) {
                picked = Err(UiError::NoDialogService);
            }
            let _ = tx.send((target, picked));
            ctx.request_repaint();
        });
        if spawned.is_err() {
            self.open = false;
        }
    }

    pub fn poll(&mut self) -> Option<(PickTarget, Result<Vec<PathBuf>, UiError>)> {
        let r = self.rx.try_recv().ok();
        if r.is_some() {
            self.open = false;
        }
        r
    }
}

#[cfg(feature = "gui")]
fn pick_blocking(folder: bool, multiple: bool, lora: bool, save: Option<String>) -> Result<Vec<PathBuf>, UiError> {
    if let Some(name) = save {
        return Ok(rfd::FileDialog::new()
            .add_filter(tr!("common.filter_png"), &["png"])
            .set_file_name(name)
            .save_file()
            .into_iter()
            .collect());
    }
    let d = rfd::FileDialog::new();
    let d = if lora {
        d.add_filter(tr!("common.filter_lora"), &["safetensors"])
    } else {
        d.add_filter(tr!("common.filter_png"), &["png"])
    };
    Ok(match (folder, multiple) {
        (true, _) => rfd::FileDialog::new().pick_folder().into_iter().collect(),
        (false, true) => d.pick_files().unwrap_or_default(),
        (false, false) => d.pick_file().into_iter().collect(),
    })
}

/// Without the window (`studio` only) there are no native dialogs: the path fields remain.
#[cfg(not(feature = "gui"))]
fn pick_blocking(_folder: bool, _multiple: bool, _lora: bool, _save: Option<String>) -> Result<Vec<PathBuf>, UiError> {
    Err(UiError::NoFileDialogs)
}

/// One error line in the error colour (wrapped), with a label accessible to tests.
pub fn error_label(ui: &mut egui::Ui, text: &str) {
    ui.colored_label(ui.visuals().error_fg_color, text);
}

/// How many errors a list keeps (the newest).
const MAX_ERRORS: usize = 5;

/// Add an error to a list shown with `errors_ui`: a message already there is not added again,
/// and only the newest few are kept.
pub fn push_error(errors: &mut Vec<String>, message: impl Into<String>) {
    let message = message.into();
    if errors.contains(&message) {
        return;
    }
    errors.push(message);
    if errors.len() > MAX_ERRORS {
        let drop = errors.len() - MAX_ERRORS;
        errors.drain(..drop);
    }
}

/// Error lines, each once, each with a button that dismisses it, floating over the bottom
/// corner (`corner`) of the visible part of `ui`: an error appearing or going never moves the
/// controls under the pointer.
pub fn errors_ui(ui: &mut egui::Ui, errors: &mut Vec<String>, corner: egui::Align2) {
    if errors.is_empty() {
        return;
    }
    let clip = ui.clip_rect();
    let margin = 10.0;
    let anchor = match corner.x() {
        egui::Align::Min => clip.left_bottom() + egui::vec2(margin, -margin),
        _ => clip.right_bottom() + egui::vec2(-margin, -margin),
    };
    let mut dismissed = None;
    egui::Area::new(ui.id().with("error-toasts"))
        .order(egui::Order::Foreground)
        .pivot(corner)
        .fixed_pos(anchor)
        .show(ui.ctx(), |ui| {
            egui::Frame::popup(ui.style()).show(ui, |ui| {
                ui.set_max_width(480.0);
                for (i, e) in errors.iter().enumerate() {
                    ui.horizontal_wrapped(|ui| {
                        if ui.small_button("✕").on_hover_text(tr!("common.dismiss")).clicked() {
                            dismissed = Some(i);
                        }
                        error_label(ui, e);
                    });
                }
            });
        });
    if let Some(i) = dismissed {
        errors.remove(i);
    }
}

/// One line kept for an error whether or not there is one (the form does not jump when it
/// appears): "⚠" and the message cut to the line, the whole message as a tooltip.
pub fn error_line(ui: &mut egui::Ui, error: Option<&str>) {
    let colour = ui.visuals().error_fg_color;
    reserved_line(ui, error.map(|e| (format!("⚠ {e}"), e, colour)));
}

/// The same reserved line for a hint (what to do next), in the weak text colour.
pub fn hint_line(ui: &mut egui::Ui, hint: Option<&str>) {
    let colour = ui.visuals().weak_text_color();
    reserved_line(ui, hint.map(|h| (h.to_string(), h, colour)));
}

/// One line of space kept whether or not `text` is there: (shown, tooltip, colour).
fn reserved_line(ui: &mut egui::Ui, text: Option<(String, &str, egui::Color32)>) {
    let height = ui.text_style_height(&egui::TextStyle::Body);
    let (rect, _) = ui.allocate_exact_size(egui::vec2(ui.available_width(), height), egui::Sense::hover());
    if let Some((shown, full, colour)) = text {
        ui.put(rect, egui::Label::new(egui::RichText::new(shown).color(colour)).truncate()).on_hover_text(full);
    }
}

/// Library messages name command-line options; in the studio the same choice is a control.
pub fn for_studio(message: &str) -> String {
    message
        .replace("pass --white-bg", &tr!("common.tick_white_bg", option = tr!("generate.white_bg")))
        .replace("--white-bg", &format!("“{}”", tr!("generate.white_bg")))
}

/// A path field: a text edit over a `PathBuf`.
pub fn path_edit(ui: &mut egui::Ui, path: &mut PathBuf, width: f32) -> egui::Response {
    let mut s = path.display().to_string();
    let r = ui.add_sized([width, 20.0], egui::TextEdit::singleline(&mut s));
    if r.changed() {
        *path = PathBuf::from(s);
    }
    r
}

/// Seconds since the Unix epoch (names of new run folders).
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

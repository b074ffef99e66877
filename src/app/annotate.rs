//! The Annotate tab. A worker thread owns the dataset (`data::store::Store`) and the labelling
//! engine (`data::session::Session`); the UI sends it commands and draws the snapshots it sends
//! back. The next samples' images are requested from the image loader as soon as a snapshot
//! names them (prefetch), so the next image is already decoded when a label advances.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};

use egui::{Key, RichText, Vec2};

use super::common::{error_label, path_edit};
use super::generate::probability_bars;
use super::images::{ImageCache, show_key};
use super::settings::AnnotateForm;
use crate::data::session::{Counters, QueueOrder, Session};
use crate::data::store::{Decision, Label, Sample, Store, StoreError};
use crate::pipeline::score::CLASS_NAMES;

/// How many upcoming samples to prefetch.
pub const PREFETCH: usize = 3;

/// A command for the labelling worker.
#[derive(Clone, Debug, PartialEq)]
pub enum AnnotateAction {
    Label(Decision),
    Skip,
    Undo,
    Redo,
    Back,
    Forward,
    Goto(i64),
    /// Change the decision of a sample labelled earlier in this session, then come back.
    Relabel(i64, Decision),
    /// Change the queue order; the session (counters, recent decisions, undo) goes on.
    SetOrder(QueueOrder),
    /// Label as another annotator from now on (a new session under that name).
    SetAnnotator(String),
    /// Put the skipped samples that are still unlabelled back in the queue.
    RevisitSkipped,
}

/// What the worker reports after every command.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub dataset: PathBuf,
    pub current: Option<Sample>,
    pub current_label: Option<Label>,
    pub counters: Counters,
    /// The last 10 decisions of this session, newest first (sample, decision, title).
    pub recent: Vec<(i64, Decision, String)>,
    pub upcoming: Vec<Sample>,
    pub order: QueueOrder,
    pub total: i64,
    /// The name labels are saved under.
    pub annotator: String,
}

enum WorkerMsg {
    Snapshot(Box<Snapshot>),
    Error(String),
}

pub enum AnnotateCommand {
    Open,
    Pick,
    Act(AnnotateAction),
}

pub struct AnnotateState {
    tx: Option<Sender<AnnotateAction>>,
    rx: Option<Receiver<WorkerMsg>>,
    pub snapshot: Option<Snapshot>,
    pub errors: Vec<String>,
    pub show_depth: bool,
    pub show_saliency: bool,
    /// Hide RFNet's prediction while labelling (so it does not bias the label).
    pub hide_prediction: bool,
    /// Commands sent and not yet answered.
    pub pending: usize,
    /// The annotator name the worker labels under (the form's name once it has been applied).
    annotator: String,
}

impl Default for AnnotateState {
    fn default() -> Self {
        Self::new()
    }
}

impl AnnotateState {
    pub fn new() -> Self {
        Self {
            tx: None,
            rx: None,
            snapshot: None,
            errors: Vec::new(),
            show_depth: false,
            show_saliency: false,
            hide_prediction: false,
            pending: 0,
            annotator: String::new(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.tx.is_some()
    }

    /// Open a dataset on a new worker (the previous one ends when its channel closes).
    pub fn open(&mut self, ctx: &egui::Context, form: &AnnotateForm) {
        let (tx, cmd_rx) = channel();
        let (msg_tx, rx) = channel();
        let dir = form.dataset.clone();
        let annotator = form.annotator.trim().to_string();
        self.annotator = annotator.clone();
        let order = form.order;
        let wake = ctx.clone();
        self.errors.clear();
        self.snapshot = None;
        self.pending = 1;
        if annotator.is_empty() {
            super::common::push_error(&mut self.errors, "enter an annotator name first");
            self.pending = 0;
            return;
        }
        let spawned = std::thread::Builder::new().name("rfstudio-annotate".into()).spawn(move || {
            if let Err(e) = worker(&dir, &annotator, order, &cmd_rx, &msg_tx, &wake) {
                let _ = msg_tx.send(WorkerMsg::Error(e.to_string()));
                wake.request_repaint();
            }
        });
        match spawned {
            Ok(_) => {
                self.tx = Some(tx);
                self.rx = Some(rx);
            }
            Err(e) => {
                super::common::push_error(&mut self.errors, format!("could not start the labelling worker: {e}"));
                self.pending = 0;
            }
        }
    }

    /// Follow the form's annotator name: once it changes (and is not empty), labels are saved
    /// under the new name. Call once per frame.
    pub fn follow_annotator(&mut self, form: &AnnotateForm) {
        let name = form.annotator.trim();
        if self.is_open() && !name.is_empty() && name != self.annotator {
            self.annotator = name.to_string();
            self.act(AnnotateAction::SetAnnotator(name.to_string()));
        }
    }

    pub fn act(&mut self, action: AnnotateAction) {
        let Some(tx) = &self.tx else { return };
        if tx.send(action).is_ok() {
            self.pending += 1;
        } else {
            super::common::push_error(&mut self.errors, "the labelling worker stopped");
            self.tx = None;
        }
    }

    /// Take the worker's snapshots and prefetch the images they name. Call once per frame.
    pub fn poll(&mut self, images: &mut ImageCache) {
        let Some(rx) = &self.rx else { return };
        while let Ok(msg) = rx.try_recv() {
            self.pending = self.pending.saturating_sub(1);
            match msg {
                WorkerMsg::Snapshot(s) => {
                    for sample in s.current.iter().chain(s.upcoming.iter()) {
                        request_sample_images(images, &s.dataset, sample);
                    }
                    self.snapshot = Some(*s);
                }
                WorkerMsg::Error(e) => super::common::push_error(&mut self.errors, e),
            }
        }
    }
}

/// Image keys of a sample: (image, product, depth overlay, saliency overlay).
fn request_sample_images(images: &mut ImageCache, dir: &Path, s: &Sample) -> [Option<String>; 4] {
    let image = dir.join(&s.image_path);
    let image_key = Some(images.request_file(&image));
    let product_key = s.product_path.as_ref().map(|p| images.request_file(&dir.join(p)));
    let mut overlay = |map: &Option<String>, depth: bool| {
        map.as_ref().map(|m| images.request_overlay(image.clone(), dir.join(m), depth))
    };
    let d = overlay(&s.depth_path, true);
    let sal = overlay(&s.saliency_path, false);
    [image_key, product_key, d, sal]
}

fn worker(
    dir: &Path,
    annotator: &str,
    order: QueueOrder,
    rx: &Receiver<AnnotateAction>,
    tx: &Sender<WorkerMsg>,
    wake: &egui::Context,
) -> Result<(), StoreError> {
    let store = Store::open(dir)?;
    let mut session = Session::new(&store, annotator, order)?;
    let send = |session: &Session<'_>| -> Result<bool, StoreError> {
        let snap = snapshot(&store, session)?;
        let ok = tx.send(WorkerMsg::Snapshot(Box::new(snap))).is_ok();
        wake.request_repaint();
        Ok(ok)
    };
    send(&session)?;
    while let Ok(action) = rx.recv() {
        let r: Result<(), StoreError> = (|| {
            match action {
                AnnotateAction::Label(d) => {
                    session.label(d)?;
                }
                AnnotateAction::Skip => session.skip()?,
                AnnotateAction::Undo => {
                    session.undo()?;
                }
                AnnotateAction::Redo => {
                    session.redo()?;
                }
                AnnotateAction::Back => {
                    session.back();
                }
                AnnotateAction::Forward => session.forward()?,
                AnnotateAction::Goto(id) => {
                    session.goto(id);
                }
                AnnotateAction::Relabel(id, d) => {
                    let here = session.current_id();
                    if session.goto(id) {
                        session.label(d)?;
                        if let Some(h) = here {
                            session.goto(h);
                        }
                    }
                }
                AnnotateAction::SetOrder(o) => session.set_order(o)?,
                AnnotateAction::SetAnnotator(name) => {
                    session = Session::new(&store, &name, session.order)?;
                }
                AnnotateAction::RevisitSkipped => {
                    session.revisit_skipped()?;
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => {
                if !send(&session)? {
                    break;
                }
            }
            Err(e) => {
                // Report the error, then the state as it is now.
                let _ = tx.send(WorkerMsg::Error(e.to_string()));
                if !send(&session)? {
                    break;
                }
            }
        }
    }
    Ok(())
}

fn snapshot(store: &Store, session: &Session<'_>) -> Result<Snapshot, StoreError> {
    let mut upcoming = Vec::new();
    for id in session.upcoming(PREFETCH)? {
        upcoming.push(store.sample(id)?);
    }
    let mut recent = Vec::new();
    for (id, d) in session.recent(10) {
        let title = store.sample(id).map(|s| s.title).unwrap_or_default();
        recent.push((id, d, title));
    }
    Ok(Snapshot {
        dataset: store.dir().to_path_buf(),
        current: session.current()?,
        current_label: session.current_label()?,
        counters: session.counters()?,
        recent,
        upcoming,
        order: session.order,
        total: store.sample_count()?,
        annotator: session.annotator.clone(),
    })
}

/// The keyboard: 1-5 classes, U Unsuitable, Space skip, Backspace / Ctrl+Z undo, Ctrl+Shift+Z /
/// Ctrl+Y redo, arrows back/forward. Ignored while a text field has focus.
pub fn keyboard_actions(ctx: &egui::Context) -> Vec<AnnotateAction> {
    if ctx.egui_wants_keyboard_input() {
        return Vec::new();
    }
    let mut out = Vec::new();
    ctx.input(|i| {
        for ev in &i.events {
            let egui::Event::Key {
                key,
                pressed: true,
                modifiers,
                ..
            } = ev
            else {
                continue;
            };
            let a = match key {
                Key::Num1 => Some(AnnotateAction::Label(Decision::Class(0))),
                Key::Num2 => Some(AnnotateAction::Label(Decision::Class(1))),
                Key::Num3 => Some(AnnotateAction::Label(Decision::Class(2))),
                Key::Num4 => Some(AnnotateAction::Label(Decision::Class(3))),
                Key::Num5 => Some(AnnotateAction::Label(Decision::Class(4))),
                Key::U if !modifiers.command => Some(AnnotateAction::Label(Decision::Unsuitable)),
                Key::Space => Some(AnnotateAction::Skip),
                Key::Backspace => Some(AnnotateAction::Undo),
                Key::Z if modifiers.command && modifiers.shift => Some(AnnotateAction::Redo),
                Key::Z if modifiers.command => Some(AnnotateAction::Undo),
                Key::Y if modifiers.command => Some(AnnotateAction::Redo),
                Key::ArrowLeft => Some(AnnotateAction::Back),
                Key::ArrowRight => Some(AnnotateAction::Forward),
                _ => None,
            };
            out.extend(a);
        }
    });
    out
}

const ORDERS: [(QueueOrder, &str); 5] = [
    (QueueOrder::Unlabelled, "unlabelled first"),
    (QueueOrder::Random, "random"),
    (QueueOrder::Entropy, "active learning: entropy"),
    (QueueOrder::Margin, "active learning: margin"),
    (QueueOrder::Review, "review disagreements"),
];

/// The Annotate tab.
pub fn annotate_ui(
    ui: &mut egui::Ui,
    state: &mut AnnotateState,
    form: &mut AnnotateForm,
    images: &mut ImageCache,
) -> Vec<AnnotateCommand> {
    let mut cmds = Vec::new();
    egui::Panel::top("annotate-bar").show(ui, |ui| {
        ui.horizontal_wrapped(|ui| {
            ui.label("Dataset");
            path_edit(ui, &mut form.dataset, 220.0);
            if ui.button("…").clicked() {
                cmds.push(AnnotateCommand::Pick);
            }
            ui.label("Annotator");
            ui.add(egui::TextEdit::singleline(&mut form.annotator).desired_width(90.0));
            if ui.button("Open dataset").clicked() {
                cmds.push(AnnotateCommand::Open);
            }
            ui.separator();
            ui.label("Queue");
            let before = form.order;
            egui::ComboBox::from_id_salt("queue-order")
                .selected_text(ORDERS.iter().find(|(o, _)| *o == form.order).map(|(_, n)| *n).unwrap_or(""))
                .show_ui(ui, |ui| {
                    for (o, name) in ORDERS {
                        ui.selectable_value(&mut form.order, o, name);
                    }
                });
            if form.order != before && state.is_open() {
                cmds.push(AnnotateCommand::Act(AnnotateAction::SetOrder(form.order)));
            }
        });
        if let Some(s) = &state.snapshot {
            let c = &s.counters;
            ui.horizontal(|ui| {
                ui.label(format!(
                    "{}: {} labelled this session · {} skipped · {:.0} labels/hour · {} of {} samples unlabelled",
                    s.annotator, c.labelled, c.skipped, c.labels_per_hour, c.remaining_unlabelled, s.total
                ));
                if c.skipped > 0 && ui.small_button(format!("{} skipped — revisit", c.skipped)).clicked() {
                    cmds.push(AnnotateCommand::Act(AnnotateAction::RevisitSkipped));
                }
            });
        }
        for e in &state.errors {
            error_label(ui, e);
        }
    });
    egui::Panel::right("annotate-recent").default_size(260.0).show(ui, |ui| {
        ui.label(RichText::new("Last 10 decisions").strong());
        ui.label(RichText::new("click to revisit; change a decision with its menu").small().weak());
        if let Some(s) = &state.snapshot {
            for (id, d, title) in &s.recent {
                ui.horizontal(|ui| {
                    if ui.small_button(format!("#{id}")).on_hover_text(title).clicked() {
                        cmds.push(AnnotateCommand::Act(AnnotateAction::Goto(*id)));
                    }
                    egui::ComboBox::from_id_salt(("relabel", *id)).selected_text(d.name()).show_ui(ui, |ui| {
                        for (k, name) in CLASS_NAMES.iter().enumerate() {
                            let nd = Decision::Class(k as u8);
                            if ui.selectable_label(*d == nd, *name).clicked() && *d != nd {
                                cmds.push(AnnotateCommand::Act(AnnotateAction::Relabel(*id, nd)));
                            }
                        }
                        if ui.selectable_label(*d == Decision::Unsuitable, "Unsuitable").clicked() && *d != Decision::Unsuitable {
                            cmds.push(AnnotateCommand::Act(AnnotateAction::Relabel(*id, Decision::Unsuitable)));
                        }
                    });
                });
            }
        }
    });
    egui::CentralPanel::default_margins().show(ui, |ui| {
        let Some(snap) = &state.snapshot else {
            if state.pending > 0 {
                ui.spinner();
            } else {
                ui.label("Open a dataset (`rfstudio dataset init` + `dataset import`) to start labelling.");
            }
            return;
        };
        let Some(sample) = &snap.current else {
            if snap.counters.skipped > 0 {
                ui.heading(format!(
                    "Nothing new left in this order, but {} skipped sample(s) are still unlabelled.",
                    snap.counters.skipped
                ));
                if ui.button(format!("Revisit the {} skipped", snap.counters.skipped)).clicked() {
                    cmds.push(AnnotateCommand::Act(AnnotateAction::RevisitSkipped));
                }
            } else {
                ui.heading("Queue finished: nothing left in this order. Pick another order or go back.");
            }
            buttons_ui(ui, &mut cmds, false);
            return;
        };
        let keys = request_sample_images(images, &snap.dataset, sample);
        ui.horizontal(|ui| {
            ui.label(RichText::new(format!("sample #{}", sample.id)).strong());
            ui.label(RichText::new(&sample.title).size(18.0));
            if let Some(l) = &snap.current_label {
                ui.label(RichText::new(format!("your label: {}", l.decision.name())).italics());
            }
        });
        // D / S toggle the overlays (not while a text field has the keyboard).
        if !ui.ctx().egui_wants_keyboard_input() {
            let (d, s) = ui.ctx().input(|i| (i.key_pressed(Key::D), i.key_pressed(Key::S)));
            if d && sample.depth_path.is_some() {
                state.show_depth = !state.show_depth;
            }
            if s && sample.saliency_path.is_some() {
                state.show_saliency = !state.show_saliency;
            }
        }
        ui.horizontal(|ui| {
            ui.add_enabled_ui(sample.depth_path.is_some(), |ui| ui.checkbox(&mut state.show_depth, "depth (D)"));
            ui.add_enabled_ui(sample.saliency_path.is_some(), |ui| ui.checkbox(&mut state.show_saliency, "saliency (S)"));
            ui.checkbox(&mut state.hide_prediction, "hide RFNet's prediction");
        });
        let avail = ui.available_size();
        let side = (avail.y - 150.0).clamp(200.0, (avail.x - 260.0).max(200.0));
        ui.horizontal(|ui| {
            let main = match (&keys, state.show_depth, state.show_saliency) {
                ([_, _, Some(d), _], true, _) => d.clone(),
                ([_, _, _, Some(s)], _, true) => s.clone(),
                ([Some(k), ..], _, _) => k.clone(),
                _ => String::new(),
            };
            show_key(ui, images, &main, Vec2::splat(side));
            ui.vertical(|ui| {
                ui.label(RichText::new("product").small());
                match &keys[1] {
                    Some(k) => {
                        show_key(ui, images, k, Vec2::splat(200.0));
                    }
                    None => {
                        ui.label(RichText::new("no product image").weak());
                    }
                }
                if let (Some(p), false) = (&sample.probs, state.hide_prediction) {
                    ui.label(RichText::new("RFNet").small());
                    probability_bars(ui, p, 240.0, None);
                }
                if !sample.prompt.is_empty() {
                    ui.label(RichText::new(&sample.prompt).small().weak());
                }
            });
        });
        buttons_ui(ui, &mut cmds, true);
    });
    cmds
}

fn buttons_ui(ui: &mut egui::Ui, cmds: &mut Vec<AnnotateCommand>, has_sample: bool) {
    ui.horizontal_wrapped(|ui| {
        for (i, name) in CLASS_NAMES.iter().enumerate() {
            if ui
                .add_enabled(has_sample, egui::Button::new(format!("{} {name}", i + 1)))
                .clicked()
            {
                cmds.push(AnnotateCommand::Act(AnnotateAction::Label(Decision::Class(i as u8))));
            }
        }
        if ui.add_enabled(has_sample, egui::Button::new("U Unsuitable")).clicked() {
            cmds.push(AnnotateCommand::Act(AnnotateAction::Label(Decision::Unsuitable)));
        }
    });
    ui.horizontal(|ui| {
        let mut b = |ui: &mut egui::Ui, text: &str, a: AnnotateAction| {
            if ui.button(text).clicked() {
                cmds.push(AnnotateCommand::Act(a));
            }
        };
        b(ui, "← Back", AnnotateAction::Back);
        b(ui, "Skip (Space)", AnnotateAction::Skip);
        b(ui, "Undo (Backspace)", AnnotateAction::Undo);
        b(ui, "Redo", AnnotateAction::Redo);
        b(ui, "Forward →", AnnotateAction::Forward);
    });
    ui.label(RichText::new("keys: 1-5 classes · U Unsuitable · Space skip · Backspace/Ctrl+Z undo · Ctrl+Y redo · ←/→ navigate · D/S depth/saliency").small().weak());
}

//! The Annotate tab. A worker thread owns the dataset (`data::store::Store`) and the labelling
//! engine (`data::session::Session`); the UI sends it commands and draws the snapshots it sends
//! back. The next samples' images are requested from the image loader as soon as a snapshot
//! names them (prefetch), so the next image is already decoded when a label advances.
//!
//! Two views: one sample at a time, or a grid of thumbnails (a page of the same queue) with a
//! keyboard focus cell. Both label through the same `Session` calls, so counters, undo and the
//! recent decisions are the same whichever view a label came from.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};

use egui::{Color32, Key, Modifiers, RichText, Sense, Stroke, Vec2};

use super::common::path_edit;
use super::generate::{CLASS_COLOURS, probability_bars};
use super::images::{ImageCache, show_key};
use super::settings::AnnotateForm;
use crate::data::session::{Counters, QueueOrder, Session};
use crate::data::store::{Decision, Label, Sample, Store, StoreError, TeamSettings};
use crate::i18n::{class_name, unsuitable_name};
use crate::pipeline::score::CLASS_NAMES;
use crate::tr;

/// How many upcoming samples to prefetch.
pub const PREFETCH: usize = 3;

/// Thumbnails (grid cells, the recent decisions) are decoded to fit this many pixels a side.
pub const THUMB_SIDE: u32 = 192;

/// A grid cell's thumbnail on screen, and the cell's footprint around it.
const CELL_IMAGE: f32 = 150.0;
const CELL_W: f32 = CELL_IMAGE + 22.0;
const CELL_H: f32 = CELL_IMAGE + 86.0;

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
    /// The grid view with pages of this many samples, or (None) the single view. In the grid,
    /// `Label` and `Skip` act on the focused cell and move to the page's next open cell.
    SetGrid(Option<usize>),
    /// Grid: the next (true) or the previous page.
    TurnPage(bool),
    /// Compute the team view (agreement, throughput, gold accuracy) now.
    TeamStats,
}

/// The team view: who labelled how much, how they agree, how they do on gold.
#[derive(Clone, Debug)]
pub struct TeamView {
    pub settings: TeamSettings,
    pub stats: crate::data::agreement::Stats,
}

/// One grid cell: a sample and this annotator's decision on it.
#[derive(Clone, Debug)]
pub struct GridCell {
    pub sample: Sample,
    pub label: Option<Decision>,
    pub skipped: bool,
}

/// The grid page the worker reports.
#[derive(Clone, Debug)]
pub struct GridPage {
    /// Zero-based page number.
    pub number: usize,
    /// Samples per page.
    pub size: usize,
    pub cells: Vec<GridCell>,
    /// The focused cell (the session's current sample).
    pub focus: Option<usize>,
    /// The next page's samples (their thumbnails are prefetched).
    pub next: Vec<Sample>,
}

/// One of the recent decisions of this session.
#[derive(Clone, Debug)]
pub struct RecentDecision {
    pub id: i64,
    pub decision: Decision,
    pub title: String,
    /// The image, relative to the dataset folder (empty when the sample could not be read).
    pub image_path: String,
}

/// What the worker reports after every command.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub dataset: PathBuf,
    pub current: Option<Sample>,
    pub current_label: Option<Label>,
    pub counters: Counters,
    /// The last 10 decisions of this session, newest first.
    pub recent: Vec<RecentDecision>,
    pub upcoming: Vec<Sample>,
    pub order: QueueOrder,
    pub total: i64,
    /// The name labels are saved under.
    pub annotator: String,
    /// The grid page, in the grid view.
    pub grid: Option<GridPage>,
    /// The team labels blind: RFNet's prediction stays hidden.
    pub blind: bool,
}

enum WorkerMsg {
    Snapshot(Box<Snapshot>),
    Team(Box<TeamView>),
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
    /// The grid view instead of one sample at a time.
    pub grid: bool,
    /// The grid's page size last sent to the worker (None: the single view).
    grid_sent: Option<usize>,
    /// The cell focused by a key or a click whose answer has not come back yet, so the
    /// highlight follows the keyboard at once.
    grid_focus: Option<i64>,
    /// The order to go back to when the grid's grouping by prediction is switched off.
    order_before_grouping: Option<QueueOrder>,
    /// The team view is shown (computed when it is switched on and on Refresh: it reads every
    /// label, too much to redo after each one on a large dataset).
    pub show_team: bool,
    pub team: Option<TeamView>,
    /// The annotator pair whose confusion the team view shows (index into the pairs).
    pub team_pair: usize,
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
            grid: false,
            grid_sent: None,
            grid_focus: None,
            order_before_grouping: None,
            show_team: false,
            team: None,
            team_pair: 0,
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
        self.team = None;
        self.pending = 1;
        // The new worker starts in the single view; the grid is asked for again.
        self.grid_sent = None;
        self.grid_focus = None;
        if annotator.is_empty() {
            super::common::push_error(&mut self.errors, tr!("annotate.err_no_annotator"));
            self.pending = 0;
            return;
        }
        let lang = crate::i18n::current();
        let spawned = std::thread::Builder::new().name("rfstudio-annotate".into()).spawn(move || {
            crate::i18n::set_thread(Some(lang));
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
                super::common::push_error(&mut self.errors, tr!("annotate.err_spawn", error = e));
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
            super::common::push_error(&mut self.errors, tr!("annotate.err_worker_stopped"));
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
                    match &s.grid {
                        Some(g) => {
                            let page = g.cells.iter().map(|c| &c.sample).chain(g.next.iter());
                            for sample in page {
                                images.request_thumbnail(&s.dataset.join(&sample.image_path), THUMB_SIDE);
                            }
                        }
                        None => {
                            for sample in s.current.iter().chain(s.upcoming.iter()) {
                                request_sample_images(images, &s.dataset, sample);
                            }
                        }
                    }
                    for r in s.recent.iter().filter(|r| !r.image_path.is_empty()) {
                        images.request_thumbnail(&s.dataset.join(&r.image_path), THUMB_SIDE);
                    }
                    if self.pending == 0 {
                        self.grid_focus = None;
                    }
                    if s.blind {
                        self.hide_prediction = true;
                    }
                    self.snapshot = Some(*s);
                }
                WorkerMsg::Team(t) => self.team = Some(*t),
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
    // The grid's page size, in the grid view.
    let mut grid: Option<usize> = None;
    let send = |session: &mut Session<'_>, grid: Option<usize>| -> Result<bool, StoreError> {
        let snap = snapshot(&store, session, grid)?;
        let ok = tx.send(WorkerMsg::Snapshot(Box::new(snap))).is_ok();
        wake.request_repaint();
        Ok(ok)
    };
    send(&mut session, grid)?;
    while let Ok(action) = rx.recv() {
        let r: Result<(), StoreError> = (|| {
            match action {
                AnnotateAction::Label(d) => match (grid, session.current_id()) {
                    (Some(size), Some(id)) => {
                        session.label_in_page(id, d, size)?;
                    }
                    _ => {
                        session.label(d)?;
                    }
                },
                AnnotateAction::Skip => match (grid, session.current_id()) {
                    (Some(size), Some(id)) => {
                        session.skip_in_page(id, size)?;
                    }
                    _ => session.skip()?,
                },
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
                AnnotateAction::SetOrder(o) => match grid {
                    Some(size) => session.set_order_in_page(o, size)?,
                    None => session.set_order(o)?,
                },
                AnnotateAction::SetAnnotator(name) => {
                    session = Session::new(&store, &name, session.order)?;
                }
                AnnotateAction::RevisitSkipped => {
                    session.revisit_skipped()?;
                }
                AnnotateAction::SetGrid(size) => grid = size.map(|n| n.max(1)),
                AnnotateAction::TurnPage(forward) => {
                    if let Some(size) = grid {
                        session.turn_page(size, forward)?;
                    }
                }
                AnnotateAction::TeamStats => {
                    let view = team_view(&store)?;
                    let _ = tx.send(WorkerMsg::Team(Box::new(view)));
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => {
                if !send(&mut session, grid)? {
                    break;
                }
            }
            Err(e) => {
                // Report the error, then the state as it is now.
                let _ = tx.send(WorkerMsg::Error(e.to_string()));
                if !send(&mut session, grid)? {
                    break;
                }
            }
        }
    }
    Ok(())
}

fn snapshot(store: &Store, session: &mut Session<'_>, grid: Option<usize>) -> Result<Snapshot, StoreError> {
    let mut upcoming = Vec::new();
    let grid = match grid {
        // The page is on screen and the next page is prefetched; no single-view prefetch.
        Some(size) => Some(grid_page(store, session, size)?),
        None => {
            for id in session.upcoming(PREFETCH)? {
                upcoming.push(store.sample(id)?);
            }
            None
        }
    };
    let mut recent = Vec::new();
    for (id, decision) in session.recent(10) {
        let (title, image_path) = store.sample(id).map(|s| (s.title, s.image_path)).unwrap_or_default();
        recent.push(RecentDecision {
            id,
            decision,
            title,
            image_path,
        });
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
        grid,
        blind: store.team_settings()?.blind,
    })
}

/// The team view from every label the connection may read (on PostgreSQL an annotator's role
/// reads only their own labels and no gold answers: the view then shows what the server allows).
fn team_view(store: &Store) -> Result<TeamView, StoreError> {
    let labels = store.all_labels()?;
    let mut stats = crate::data::agreement::stats(store.sample_count()? as usize, &labels);
    let gold = match store.gold() {
        Ok(g) => g,
        // An annotator's role may not read the gold answers: no accuracy column then.
        Err(e) if e.is_permission_denied() => Vec::new(),
        Err(e) => return Err(e),
    };
    stats.gold = crate::data::agreement::gold_accuracy(&labels, &gold);
    Ok(TeamView {
        settings: store.team_settings()?,
        stats,
    })
}

fn grid_page(store: &Store, session: &mut Session<'_>, size: usize) -> Result<GridPage, StoreError> {
    let page = session.page(size)?;
    let mut cells = Vec::with_capacity(page.ids.len());
    for &id in &page.ids {
        cells.push(GridCell {
            sample: store.sample(id)?,
            label: session.label_of(id)?.map(|l| l.decision),
            skipped: session.is_skipped(id),
        });
    }
    let mut next = Vec::new();
    for id in session.next_page(size)? {
        next.push(store.sample(id)?);
    }
    Ok(GridPage {
        number: page.number,
        size: size.max(1),
        cells,
        focus: page.focus,
        next,
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

/// A queue order's name in the current language.
fn order_name(order: QueueOrder) -> &'static str {
    match order {
        QueueOrder::Unlabelled => tr!("annotate.order_unlabelled"),
        QueueOrder::Random => tr!("annotate.order_random"),
        QueueOrder::Entropy => tr!("annotate.order_entropy"),
        QueueOrder::Margin => tr!("annotate.order_margin"),
        QueueOrder::Predicted => tr!("annotate.order_predicted"),
        QueueOrder::Review => tr!("annotate.order_review"),
    }
}

/// A decision's name in the current language (labels are stored by id, never by this name).
fn decision_name(d: Decision) -> &'static str {
    match d {
        Decision::Class(k) => class_name(k as usize),
        Decision::Unsuitable => unsuitable_name(),
    }
}

/// The grid's columns and rows for the space it has (a page fills the window without scrolling).
pub fn grid_shape(avail: Vec2) -> (usize, usize) {
    let spacing = 8.0;
    let cols = ((avail.x + spacing) / (CELL_W + spacing)).floor().clamp(2.0, 8.0) as usize;
    let rows = ((avail.y + spacing) / (CELL_H + spacing)).floor().clamp(1.0, 6.0) as usize;
    (cols, rows)
}

/// The grid keys: arrows move the focus, S skips (Space too, through `keyboard_actions`),
/// PageDown / N and PageUp / P turn pages. They are consumed here, so the single view's meaning
/// of the arrows (back / forward) does not apply as well; 1-5, U and undo/redo keep their
/// meaning and act on the focused cell.
fn grid_keys(ctx: &egui::Context, state: &mut AnnotateState, page: &GridPage, cols: usize, cmds: &mut Vec<AnnotateCommand>) {
    if ctx.egui_wants_keyboard_input() {
        return;
    }
    let n = page.cells.len();
    let focus = state.grid_focus.and_then(|id| page.cells.iter().position(|c| c.sample.id == id)).or(page.focus);
    let mut moved: Option<usize> = None;
    ctx.input_mut(|i| {
        let mut take = |k: Key| i.consume_key(Modifiers::NONE, k);
        let at = moved.or(focus);
        let step = |d: isize| -> Option<usize> {
            let from = at.unwrap_or(0) as isize;
            let to = from + d;
            (n > 0 && (0..n as isize).contains(&to)).then_some(to as usize).or(at)
        };
        if take(Key::ArrowRight) {
            moved = step(1);
        }
        if take(Key::ArrowLeft) {
            moved = step(-1);
        }
        if take(Key::ArrowDown) {
            moved = step(cols as isize);
        }
        if take(Key::ArrowUp) {
            moved = step(-(cols as isize));
        }
        if take(Key::S) {
            cmds.push(AnnotateCommand::Act(AnnotateAction::Skip));
        }
        if take(Key::PageDown) || take(Key::N) {
            cmds.push(AnnotateCommand::Act(AnnotateAction::TurnPage(true)));
        }
        if take(Key::PageUp) || take(Key::P) {
            cmds.push(AnnotateCommand::Act(AnnotateAction::TurnPage(false)));
        }
    });
    if let Some(m) = moved.filter(|m| Some(*m) != focus)
        && let Some(cell) = page.cells.get(m)
    {
        state.grid_focus = Some(cell.sample.id);
        // The focus move goes first, so a label key in the same frame labels the new cell.
        cmds.insert(0, AnnotateCommand::Act(AnnotateAction::Goto(cell.sample.id)));
    }
}

/// RFNet's predicted class and its probability.
fn predicted(p: &[f32; 5]) -> (usize, f32) {
    p.iter()
        .copied()
        .enumerate()
        .fold((0, f32::MIN), |best, (k, v)| if v > best.1 { (k, v) } else { best })
}

fn decision_colour(d: Decision, ui: &egui::Ui) -> Color32 {
    match d {
        Decision::Class(k) => CLASS_COLOURS.get(k as usize).copied().unwrap_or(ui.visuals().text_color()),
        Decision::Unsuitable => ui.visuals().weak_text_color(),
    }
}

/// The grid view: a page of thumbnails, each with its title, this annotator's decision and
/// (unless hidden) RFNet's prediction; the focused cell is outlined.
fn grid_ui(
    ui: &mut egui::Ui,
    state: &mut AnnotateState,
    form: &mut AnnotateForm,
    dataset: &Path,
    page: &GridPage,
    cols: usize,
    images: &mut ImageCache,
    cmds: &mut Vec<AnnotateCommand>,
) {
    let focus = state.grid_focus.and_then(|id| page.cells.iter().position(|c| c.sample.id == id)).or(page.focus);
    ui.horizontal(|ui| {
        let done = page.cells.iter().filter(|c| c.label.is_some() || c.skipped).count();
        ui.label(RichText::new(tr!("annotate.page", n = page.number + 1)).strong());
        ui.label(tr!("annotate.page_decided", done = done, total = page.cells.len()));
        if ui.button(tr!("annotate.page_previous")).clicked() {
            cmds.push(AnnotateCommand::Act(AnnotateAction::TurnPage(false)));
        }
        if ui.button(tr!("annotate.page_next")).clicked() {
            cmds.push(AnnotateCommand::Act(AnnotateAction::TurnPage(true)));
        }
        ui.separator();
        prediction_toggle(ui, &mut state.hide_prediction, state.snapshot.as_ref().is_some_and(|s| s.blind));
        let mut grouped = form.order == QueueOrder::Predicted;
        if ui
            .checkbox(&mut grouped, tr!("annotate.group_by_prediction"))
            .on_hover_text(tr!("annotate.group_by_prediction_hint"))
            .changed()
        {
            let to = if grouped {
                state.order_before_grouping = Some(form.order);
                QueueOrder::Predicted
            } else {
                state
                    .order_before_grouping
                    .take()
                    .filter(|o| *o != QueueOrder::Predicted)
                    .unwrap_or(QueueOrder::Unlabelled)
            };
            form.order = to;
            cmds.push(AnnotateCommand::Act(AnnotateAction::SetOrder(to)));
        }
    });
    if page.cells.is_empty() {
        ui.heading(tr!("annotate.grid_finished"));
        return;
    }
    egui::Grid::new("annotate-grid").spacing(Vec2::splat(8.0)).show(ui, |ui| {
        for (i, cell) in page.cells.iter().enumerate() {
            let id = cell.sample.id;
            let stroke = if focus == Some(i) {
                Stroke::new(3.0, ui.visuals().selection.stroke.color)
            } else if let Some(d) = cell.label {
                Stroke::new(2.0, decision_colour(d, ui))
            } else {
                Stroke::new(1.0, ui.visuals().widgets.noninteractive.bg_stroke.color)
            };
            let frame = egui::Frame::group(ui.style()).stroke(stroke).inner_margin(6.0);
            let mut clicked = false;
            // A grid cell lays out left to right: the cell's parts go top to bottom.
            frame.show(ui, |ui| ui.vertical(|ui| {
                ui.set_width(CELL_IMAGE);
                ui.set_max_width(CELL_IMAGE);
                let key = images.request_thumbnail(&dataset.join(&cell.sample.image_path), THUMB_SIDE);
                let image = show_key(ui, images, &key, Vec2::splat(CELL_IMAGE));
                clicked |= ui.interact(image.rect, ui.id().with(("grid-cell", id)), Sense::click()).clicked();
                clicked |= ui
                    .add(egui::Label::new(RichText::new(&cell.sample.title)).truncate().sense(Sense::click()))
                    .on_hover_text(&cell.sample.title)
                    .clicked();
                match (cell.label, cell.skipped) {
                    (Some(d), _) => {
                        ui.label(RichText::new(format!("■ {}", decision_name(d))).color(decision_colour(d, ui)).strong());
                    }
                    (None, true) => {
                        ui.label(RichText::new(tr!("annotate.cell_skipped")).weak());
                    }
                    (None, false) => {
                        ui.label(RichText::new(tr!("annotate.cell_unlabelled")).weak());
                    }
                }
                if let (Some(p), false) = (&cell.sample.probs, state.hide_prediction) {
                    let (k, v) = predicted(p);
                    let text = tr!("annotate.cell_prediction", class = class_name(k), p = format!("{v:.2}"));
                    ui.label(RichText::new(text).small().color(CLASS_COLOURS[k % CLASS_COLOURS.len()]));
                }
            }));
            if clicked {
                state.grid_focus = Some(id);
                cmds.push(AnnotateCommand::Act(AnnotateAction::Goto(id)));
            }
            if (i + 1) % cols == 0 {
                ui.end_row();
            }
        }
    });
    ui.horizontal_wrapped(|ui| {
        for i in 0..CLASS_NAMES.len() {
            if ui.button(RichText::new(format!("{} {}", i + 1, class_name(i))).color(CLASS_COLOURS[i])).clicked() {
                cmds.push(AnnotateCommand::Act(AnnotateAction::Label(Decision::Class(i as u8))));
            }
        }
        if ui.button(format!("U {}", unsuitable_name())).clicked() {
            cmds.push(AnnotateCommand::Act(AnnotateAction::Label(Decision::Unsuitable)));
        }
        if ui.button(tr!("annotate.skip_grid")).clicked() {
            cmds.push(AnnotateCommand::Act(AnnotateAction::Skip));
        }
        if ui.button(tr!("annotate.undo")).clicked() {
            cmds.push(AnnotateCommand::Act(AnnotateAction::Undo));
        }
    });
    ui.label(
        RichText::new(tr!("annotate.grid_keys"))
            .small()
            .weak(),
    );
}

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
            ui.label(tr!("annotate.dataset"));
            path_edit(ui, &mut form.dataset, 220.0);
            if ui.button("…").clicked() {
                cmds.push(AnnotateCommand::Pick);
            }
            ui.label(tr!("annotate.annotator"));
            ui.add(egui::TextEdit::singleline(&mut form.annotator).desired_width(90.0));
            if ui.button(tr!("annotate.open_dataset")).clicked() {
                cmds.push(AnnotateCommand::Open);
            }
            ui.separator();
            ui.label(tr!("annotate.queue"));
            let before = form.order;
            egui::ComboBox::from_id_salt("queue-order")
                .selected_text(order_name(form.order))
                .show_ui(ui, |ui| {
                    for o in QueueOrder::ALL {
                        ui.selectable_value(&mut form.order, o, order_name(o));
                    }
                });
            if form.order != before && state.is_open() {
                cmds.push(AnnotateCommand::Act(AnnotateAction::SetOrder(form.order)));
            }
            ui.separator();
            ui.toggle_value(&mut state.grid, tr!("annotate.grid_view"))
                .on_hover_text(tr!("annotate.grid_view_hint"));
            if ui
                .toggle_value(&mut state.show_team, tr!("annotate.team_view"))
                .on_hover_text(tr!("annotate.team_view_hint"))
                .clicked()
                && state.show_team
            {
                cmds.push(AnnotateCommand::Act(AnnotateAction::TeamStats));
            }
        });
        if let Some(s) = &state.snapshot {
            let c = &s.counters;
            ui.horizontal(|ui| {
                ui.label(tr!(
                    "annotate.counters",
                    annotator = s.annotator,
                    labelled = c.labelled,
                    skipped = c.skipped,
                    rate = format!("{:.0}", c.labels_per_hour),
                    remaining = c.remaining_unlabelled,
                    total = s.total,
                ));
                if c.skipped > 0 && ui.small_button(tr!("annotate.revisit_small", n = c.skipped)).clicked() {
                    cmds.push(AnnotateCommand::Act(AnnotateAction::RevisitSkipped));
                }
            });
        }
    });
    if state.show_team {
        egui::Panel::bottom("annotate-team").resizable(true).default_size(220.0).show(ui, |ui| {
            team_ui(ui, state, form, &mut cmds);
        });
    }
    egui::Panel::right("annotate-recent").default_size(260.0).show(ui, |ui| {
        ui.label(RichText::new(tr!("annotate.recent_heading")).strong());
        ui.label(RichText::new(tr!("annotate.recent_hint")).small().weak());
        if let Some(s) = &state.snapshot {
            for r in &s.recent {
                let (id, d) = (&r.id, &r.decision);
                ui.horizontal(|ui| {
                    let key = (!r.image_path.is_empty()).then(|| images.request_thumbnail(&s.dataset.join(&r.image_path), THUMB_SIDE));
                    let thumb = match &key {
                        Some(k) => show_key(ui, images, k, Vec2::splat(44.0)),
                        None => ui.allocate_exact_size(Vec2::splat(44.0), Sense::hover()).1,
                    };
                    let thumb = ui.interact(thumb.rect, ui.id().with(("recent-thumb", *id)), Sense::click());
                    ui.vertical(|ui| {
                        let title = if r.title.is_empty() { format!("#{id}") } else { r.title.clone() };
                        let t = ui
                            .add(egui::Label::new(RichText::new(title).small()).truncate().sense(Sense::click()))
                            .on_hover_text(tr!("annotate.recent_sample_hover", id = id, title = r.title));
                        if t.clicked() || thumb.clicked() {
                            cmds.push(AnnotateCommand::Act(AnnotateAction::Goto(*id)));
                        }
                        egui::ComboBox::from_id_salt(("relabel", *id)).selected_text(RichText::new(decision_name(*d)).color(decision_colour(*d, ui))).show_ui(ui, |ui| {
                            for k in 0..CLASS_NAMES.len() {
                                let nd = Decision::Class(k as u8);
                                if ui.selectable_label(*d == nd, class_name(k)).clicked() && *d != nd {
                                    cmds.push(AnnotateCommand::Act(AnnotateAction::Relabel(*id, nd)));
                                }
                            }
                            if ui.selectable_label(*d == Decision::Unsuitable, unsuitable_name()).clicked() && *d != Decision::Unsuitable {
                                cmds.push(AnnotateCommand::Act(AnnotateAction::Relabel(*id, Decision::Unsuitable)));
                            }
                        });
                    });
                });
            }
        }
    });
    egui::CentralPanel::default_margins().show(ui, |ui| {
        // The grid's page size follows the space the panel has (less the page bar and the
        // buttons under the grid).
        let (cols, rows) = grid_shape(ui.available_size() - Vec2::new(0.0, 110.0));
        let want = state.grid.then_some(cols * rows);
        if state.is_open() && want != state.grid_sent {
            state.grid_sent = want;
            state.grid_focus = None;
            cmds.push(AnnotateCommand::Act(AnnotateAction::SetGrid(want)));
        }
        if let Some(snap) = &state.snapshot
            && let Some(page) = &snap.grid
            && state.grid
        {
            let (dataset, page) = (snap.dataset.clone(), page.clone());
            grid_keys(ui.ctx(), state, &page, cols, &mut cmds);
            grid_ui(ui, state, form, &dataset, &page, cols, images, &mut cmds);
            return;
        }
        let Some(snap) = &state.snapshot else {
            if state.pending > 0 {
                ui.spinner();
            } else {
                ui.label(tr!("annotate.empty"));
            }
            return;
        };
        let Some(sample) = &snap.current else {
            if snap.counters.skipped > 0 {
                ui.heading(tr!("annotate.skipped_left", n = snap.counters.skipped));
                if ui.button(tr!("annotate.revisit", n = snap.counters.skipped)).clicked() {
                    cmds.push(AnnotateCommand::Act(AnnotateAction::RevisitSkipped));
                }
            } else {
                ui.heading(tr!("annotate.finished"));
            }
            buttons_ui(ui, &mut cmds, false);
            return;
        };
        let keys = request_sample_images(images, &snap.dataset, sample);
        ui.horizontal(|ui| {
            ui.label(RichText::new(tr!("annotate.sample", id = sample.id)).strong());
            ui.label(RichText::new(&sample.title).size(18.0));
            if let Some(l) = &snap.current_label {
                ui.label(RichText::new(tr!("annotate.your_label", label = decision_name(l.decision))).italics());
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
            ui.add_enabled_ui(sample.depth_path.is_some(), |ui| ui.checkbox(&mut state.show_depth, tr!("annotate.depth")));
            ui.add_enabled_ui(sample.saliency_path.is_some(), |ui| ui.checkbox(&mut state.show_saliency, tr!("annotate.saliency")));
            prediction_toggle(ui, &mut state.hide_prediction, state.snapshot.as_ref().is_some_and(|s| s.blind));
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
                ui.label(RichText::new(tr!("annotate.product")).small());
                match &keys[1] {
                    Some(k) => {
                        show_key(ui, images, k, Vec2::splat(200.0));
                    }
                    None => {
                        ui.label(RichText::new(tr!("annotate.no_product_image")).weak());
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
    super::common::errors_ui(ui, &mut state.errors, egui::Align2::RIGHT_BOTTOM);
    cmds
}

fn buttons_ui(ui: &mut egui::Ui, cmds: &mut Vec<AnnotateCommand>, has_sample: bool) {
    ui.horizontal_wrapped(|ui| {
        for i in 0..CLASS_NAMES.len() {
            if ui
                .add_enabled(has_sample, egui::Button::new(format!("{} {}", i + 1, class_name(i))))
                .clicked()
            {
                cmds.push(AnnotateCommand::Act(AnnotateAction::Label(Decision::Class(i as u8))));
            }
        }
        if ui.add_enabled(has_sample, egui::Button::new(format!("U {}", unsuitable_name()))).clicked() {
            cmds.push(AnnotateCommand::Act(AnnotateAction::Label(Decision::Unsuitable)));
        }
    });
    ui.horizontal(|ui| {
        let mut b = |ui: &mut egui::Ui, text: &str, a: AnnotateAction| {
            if ui.button(text).clicked() {
                cmds.push(AnnotateCommand::Act(a));
            }
        };
        b(ui, tr!("annotate.back"), AnnotateAction::Back);
        b(ui, tr!("annotate.skip"), AnnotateAction::Skip);
        b(ui, tr!("annotate.undo"), AnnotateAction::Undo);
        b(ui, tr!("annotate.redo"), AnnotateAction::Redo);
        b(ui, tr!("annotate.forward"), AnnotateAction::Forward);
    });
    ui.label(RichText::new(tr!("annotate.keys")).small().weak());
}

/// The "hide RFNet's prediction" switch; locked on when the team labels blind.
fn prediction_toggle(ui: &mut egui::Ui, hide: &mut bool, blind: bool) {
    let r = ui.add_enabled(!blind, egui::Checkbox::new(hide, tr!("annotate.hide_prediction")));
    if blind {
        r.on_disabled_hover_text(tr!("annotate.blind_hint"));
    }
}

/// The team view: settings, per-annotator throughput and gold accuracy, the Cohen's kappa
/// matrix of every annotator pair, Fleiss' kappa, and the disagreements awaiting review.
fn team_ui(ui: &mut egui::Ui, state: &mut AnnotateState, form: &mut AnnotateForm, cmds: &mut Vec<AnnotateCommand>) {
    ui.horizontal(|ui| {
        ui.label(RichText::new(tr!("annotate.team_heading")).strong());
        if ui.button(tr!("annotate.team_refresh")).clicked() {
            cmds.push(AnnotateCommand::Act(AnnotateAction::TeamStats));
        }
    });
    let Some(team) = &state.team else {
        ui.label(RichText::new(tr!("annotate.team_none")).weak());
        return;
    };
    let (t, s) = (&team.settings, &team.stats);
    ui.label(tr!(
        "annotate.team_settings",
        overlap = t.overlap,
        lease = t.lease_seconds,
        gold = t.gold_every,
        blind = if t.blind { tr!("annotate.yes") } else { tr!("annotate.no") }
    ));
    ui.horizontal(|ui| {
        let fleiss = s.fleiss.map(|k| format!("{k:.3}")).unwrap_or_else(|| "–".into());
        ui.label(tr!("annotate.team_fleiss", kappa = fleiss));
        ui.separator();
        ui.label(tr!("annotate.team_disagreements", n = s.disagreements.len()));
        if !s.disagreements.is_empty() && ui.button(tr!("annotate.team_open_review")).clicked() {
            form.order = QueueOrder::Review;
            cmds.push(AnnotateCommand::Act(AnnotateAction::SetOrder(QueueOrder::Review)));
        }
    });
    egui::ScrollArea::both().id_salt("team-scroll").show(ui, |ui| {
        ui.horizontal_top(|ui| {
            egui::Grid::new("team-annotators").striped(true).show(ui, |ui| {
                ui.label(RichText::new(tr!("annotate.team_annotator")).strong());
                ui.label(RichText::new(tr!("annotate.team_labels")).strong());
                ui.label(RichText::new(tr!("annotate.team_per_hour")).strong());
                ui.label(RichText::new(tr!("annotate.team_gold")).strong());
                ui.end_row();
                for a in &s.annotators {
                    ui.label(&a.annotator);
                    ui.label(a.labels.to_string());
                    ui.label(format!("{:.0}", a.labels_per_hour));
                    match s.gold.iter().find(|g| g.annotator == a.annotator) {
                        Some(g) => ui.label(format!("{:.0}% ({}/{})", g.accuracy * 100.0, g.correct, g.gold_labels)),
                        None => ui.label("–"),
                    };
                    ui.end_row();
                }
            });
            ui.separator();
            // Cohen's kappa for every pair, as a symmetric matrix.
            let names: Vec<&str> = s.annotators.iter().map(|a| a.annotator.as_str()).collect();
            ui.vertical(|ui| {
                ui.label(RichText::new(tr!("annotate.team_kappa_matrix")).strong());
                egui::Grid::new("team-kappa").striped(true).show(ui, |ui| {
                    ui.label("");
                    for n in &names {
                        ui.label(RichText::new(*n).strong());
                    }
                    ui.end_row();
                    for a in &names {
                        ui.label(RichText::new(*a).strong());
                        for b in &names {
                            let cell = if a == b {
                                "1".to_string()
                            } else {
                                s.cohen
                                    .iter()
                                    .find(|p| (p.a == *a && p.b == *b) || (p.a == *b && p.b == *a))
                                    .and_then(|p| p.kappa)
                                    .map(|k| format!("{k:.3}"))
                                    .unwrap_or_else(|| "–".into())
                            };
                            ui.label(cell);
                        }
                        ui.end_row();
                    }
                });
            });
            ui.separator();
            confusion_ui(ui, s, &mut state.team_pair);
        });
    });
}

/// Where one pair of annotators disagrees: a class-by-class table of their shared samples.
fn confusion_ui(ui: &mut egui::Ui, s: &crate::data::agreement::Stats, pick: &mut usize) {
    if s.cohen.is_empty() {
        return;
    }
    *pick = (*pick).min(s.cohen.len() - 1);
    ui.vertical(|ui| {
        let name = |p: &crate::data::agreement::PairKappa| format!("{} / {}", p.a, p.b);
        ui.horizontal(|ui| {
            ui.label(RichText::new(tr!("annotate.team_confusion")).strong());
            egui::ComboBox::from_id_salt("team-pair")
                .selected_text(name(&s.cohen[*pick]))
                .show_ui(ui, |ui| {
                    for (i, p) in s.cohen.iter().enumerate() {
                        ui.selectable_value(pick, i, name(p));
                    }
                });
        });
        let pair = &s.cohen[*pick];
        let category = |c: usize| if c < 5 { crate::i18n::class_name(c) } else { crate::i18n::unsuitable_name() };
        ui.label(RichText::new(tr!("annotate.team_confusion_axes", a = pair.a, b = pair.b)).small().weak());
        egui::Grid::new("team-confusion").striped(true).show(ui, |ui| {
            ui.label("");
            for j in 0..pair.confusion.len() {
                ui.label(RichText::new(category(j)).small());
            }
            ui.end_row();
            for (i, row) in pair.confusion.iter().enumerate() {
                ui.label(RichText::new(category(i)).small());
                for (j, n) in row.iter().enumerate() {
                    let text = RichText::new(n.to_string());
                    ui.label(if i != j && *n > 0 { text.strong() } else { text });
                }
                ui.end_row();
            }
        });
    });
}

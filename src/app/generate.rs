//! The Generate tab: state (the running job, its progress, finished attempts, the history of
//! past runs) separate from drawing (`generate_ui`). Work runs on worker threads:
//! `pipeline::generate::spawn_generation` for the models, the image loader for placement
//! previews and overlays, a helper thread for scanning the history.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, channel};

use egui::{Color32, RichText, Vec2};

use super::error::{NotReady, UiError};
use super::common::{PickTarget, open_folder, path_edit, unix_secs};
use crate::files::bundled;
use super::images::{ImageCache, gray_to_color, rgb_to_color, rgba_to_color, show_key};
use super::settings::GenerateForm;
use crate::device::{Precision, Selection};
use crate::models::manifest::{Manifest, Role};
use crate::pipeline::generate::{GenError, GenEvent, JobHandle, JobMessage, ModelPaths, spawn_generation};
use crate::pipeline::params::GenerateParams;
use crate::pipeline::run_folder::{AttemptRecord, MapKind, RunFolder, RunSummary};
use crate::pipeline::product::{Placement, place_file};
use crate::pipeline::judge::JudgePaths;
use crate::tr;

/// A sample product from `sample-data/products.jsonl`.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct SampleProduct {
    pub id: String,
    pub image: String,
    #[serde(default)]
    pub title_zh: String,
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
}

pub fn sample_products() -> Vec<(PathBuf, SampleProduct)> {
    let dir = bundled("sample-data");
    let Ok(text) = std::fs::read_to_string(dir.join("products.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<SampleProduct>(l).ok())
        .map(|p| (dir.join(&p.image), p))
        .collect()
}

#[derive(Clone, Debug, PartialEq)]
pub enum RunStatus {
    Idle,
    Running,
    Cancelling,
    Finished,
    Cancelled,
    Failed(String),
}

#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub attempt: usize,
    pub batch: usize,
    pub step: usize,
    pub total_steps: usize,
    pub attempts: usize,
    /// Denoising steps seen so far over the whole run, and when the first and the latest came
    /// (seconds per step leave out the first, which carries model loading and kernel compiling).
    pub steps_seen: usize,
    pub first_step_at: Option<std::time::Instant>,
    pub last_step_at: Option<std::time::Instant>,
}

/// What a running generation is doing, for the progress line.
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// No step yet: models loading, and on a GPU the kernels compiling (minutes on a first run).
    Loading,
    Denoising,
    /// The last step of a batch is done: decoding, pasting back and scoring.
    Finishing,
}

impl Progress {
    pub fn phase(&self) -> Phase {
        match (self.steps_seen, self.step >= self.total_steps && self.total_steps > 0) {
            (0, _) => Phase::Loading,
            (_, true) => Phase::Finishing,
            _ => Phase::Denoising,
        }
    }

    /// Mean seconds per denoising step after the first one.
    pub fn seconds_per_step(&self) -> Option<f64> {
        let (first, last) = (self.first_step_at?, self.last_step_at?);
        (self.steps_seen > 1).then(|| last.duration_since(first).as_secs_f64() / (self.steps_seen - 1) as f64)
    }

    /// Steps of the whole run if every attempt is needed (batches of `batch` attempts).
    pub fn run_steps(&self) -> usize {
        let batch = self.batch.max(1);
        self.attempts.div_ceil(batch) * self.total_steps
    }

    /// Steps of the whole run done so far.
    pub fn run_steps_done(&self) -> usize {
        let batch = self.batch.max(1);
        (self.attempt.max(1) - 1) / batch * self.total_steps + self.step
    }

    /// Seconds left if every attempt is needed (recurrent generation may stop earlier).
    pub fn eta_seconds(&self) -> Option<f64> {
        Some(self.seconds_per_step()? * self.run_steps().saturating_sub(self.run_steps_done()) as f64)
    }
}

/// A past run found under the output folder.
#[derive(Clone, Debug)]
pub struct HistoryEntry {
    pub dir: PathBuf,
    pub product: Option<PathBuf>,
    pub params: Option<GenerateParams>,
    pub seed: Option<u64>,
    pub attempts: usize,
    pub available: Option<bool>,
    pub best: Option<PathBuf>,
    pub modified: std::time::SystemTime,
    /// The run wrote its summary (false: cancelled, killed or still running).
    pub finished: bool,
    /// How many of its candidates are starred.
    pub favourites: usize,
}

/// What the user asked for this frame (applied after drawing).
#[derive(Debug)]
pub enum GenerateCommand {
    Start,
    Cancel,
    Pick(PickTarget),
    OpenFolder(PathBuf),
    LoadHistory(usize),
    /// Show a past run's candidates (scores, overlays, favourites) as the cards.
    OpenRun(usize),
    RefreshHistory,
    UseSample(usize),
    /// Star or unstar a candidate of the shown run (saved in its folder).
    ToggleFavourite(usize),
    /// Put a candidate's seed in the form (and turn off the random seed).
    ReuseSeed(u64),
    /// Save a copy of a candidate of the shown run (asks where; see `export_to`).
    Export(usize),
}

/// What the zoom view paints over the candidates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OverlayChoice {
    #[default]
    None,
    Depth,
    Saliency,
}

/// The zoom view: one candidate large, or two side by side to compare.
#[derive(Clone, Debug, PartialEq)]
pub struct ZoomView {
    /// Attempt numbers (one or two).
    pub attempts: Vec<usize>,
    pub overlay: OverlayChoice,
    /// How strongly the overlay covers the image (0: the image alone, 1: the overlay alone).
    pub opacity: f32,
}

impl ZoomView {
    pub fn new(attempts: Vec<usize>) -> Self {
        Self {
            attempts,
            overlay: OverlayChoice::None,
            opacity: 0.6,
        }
    }
}

pub struct GenerateState {
    job: Option<JobHandle>,
    pub status: RunStatus,
    pub progress: Option<Progress>,
    pub preview: Option<String>,
    pub out_dir: Option<PathBuf>,
    pub seed: Option<u64>,
    pub attempts: Vec<AttemptRecord>,
    pub summary: Option<RunSummary>,
    pub test_weights: bool,
    pub show_depth: BTreeSet<usize>,
    pub show_saliency: BTreeSet<usize>,
    pub history: Vec<HistoryEntry>,
    history_rx: Option<Receiver<Vec<HistoryEntry>>>,
    pub samples: Vec<(PathBuf, SampleProduct)>,
    /// Errors from workers and from starting runs, newest last.
    pub errors: Vec<String>,
    /// The form the errors were raised for (`form_fingerprint`).
    errors_for: Option<String>,
    /// A note (e.g. "no RFNet scorer: unscored").
    pub notice: Option<String>,
    /// The shown run's starred attempts (kept in its `favourites.json`).
    pub favourites: BTreeSet<usize>,
    /// Attempts picked for side-by-side comparison (at most two, oldest first).
    pub compare: Vec<usize>,
    pub zoom: Option<ZoomView>,
    /// The shown run was opened from History (not started in this session).
    pub opened: bool,
    /// Only runs with a starred candidate in History.
    pub favourites_only: bool,
    /// The widest attempt card drawn so far (its content sets it): how many fit in a row.
    card_width: f32,
    /// A catalogue queue being watched (workers generating a catalogue elsewhere).
    pub catalogue: super::catalogue::CatalogueWatch,
}

impl GenerateState {
    pub fn new() -> Self {
        Self {
            job: None,
            status: RunStatus::Idle,
            progress: None,
            preview: None,
            out_dir: None,
            seed: None,
            attempts: Vec::new(),
            summary: None,
            test_weights: false,
            show_depth: BTreeSet::new(),
            show_saliency: BTreeSet::new(),
            history: Vec::new(),
            history_rx: None,
            samples: sample_products(),
            errors: Vec::new(),
            errors_for: None,
            notice: None,
            favourites: BTreeSet::new(),
            compare: Vec::new(),
            zoom: None,
            opened: false,
            favourites_only: false,
            catalogue: Default::default(),
            card_width: 240.0,
        }
    }

    pub fn is_running(&self) -> bool {
        self.job.is_some()
    }

    /// Start a run with the form's parameters on `selection`.
    pub fn start(
        &mut self,
        ctx: &egui::Context,
        form: &GenerateForm,
        manifest: &Manifest,
        selection: &Selection,
        precision: Precision,
    ) {
        if self.job.is_some() {
            return;
        }
        let Some(product) = form.product.clone() else {
            super::common::push_error(&mut self.errors, tr!("generate.err_no_product"));
            return;
        };
        let mut params = form.params.clone();
        params.seed = Some(if form.random_seed { rand::random::<u32>() as u64 } else { form.seed });
        if let Err(e) = params.validate_for(crate::device::memory_budget_bytes(selection), precision.element_bytes()) {
            super::common::push_error(&mut self.errors, e.to_string());
            return;
        }
        let (Some(base), Some(controlnet)) = (manifest.path(Role::Base), manifest.path(Role::Controlnet)) else {
            super::common::push_error(&mut self.errors, tr!("generate.err_no_models"));
            return;
        };
        let scorer = match JudgePaths::from_manifest(manifest) {
            Ok(s) => s,
            Err(e) => {
                super::common::push_error(&mut self.errors, tr!("generate.err_scorer", error = e));
                return;
            }
        };
        let software = selection.device_name.contains("software") || selection.device_name.to_lowercase().contains("llvmpipe");
        let unscored = scorer.is_none().then_some(tr!("generate.notice_unscored"));
        let slow = software.then_some(tr!("generate.notice_software"));
        let notices: Vec<&str> = [slow, unscored].into_iter().flatten().collect();
        self.notice = (!notices.is_empty()).then(|| notices.join(" · "));
        let paths = ModelPaths {
            base: base.to_path_buf(),
            controlnet: controlnet.to_path_buf(),
            scorer,
            test_weights: manifest.test_weights,
            loras: form.loras.clone(),
        };
        let stem = product
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "product".into());
        let mut out_dir = form.out_root.join(format!("{stem}-{}", unix_secs()));
        let mut n = 1;
        while out_dir.exists() {
            n += 1;
            out_dir = form.out_root.join(format!("{stem}-{}-{n}", unix_secs()));
        }
        self.seed = params.seed;
        let wake = ctx.clone();
        let job = spawn_generation(
            selection.clone(),
            precision,
            paths,
            product,
            params,
            out_dir.clone(),
            move || wake.request_repaint(),
        );
        self.watch(job, Some(out_dir));
    }

    /// Show a started job: the tab's run state is reset and the job's messages drive it from
    /// here (`poll`) until its result, a failure or a vanished worker ends it.
    pub fn watch(&mut self, job: JobHandle, out_dir: Option<PathBuf>) {
        self.clear_shown();
        self.errors.clear();
        self.out_dir = out_dir;
        self.status = RunStatus::Running;
        self.job = Some(job);
    }

    /// Forget the shown run's cards and everything hanging off them.
    fn clear_shown(&mut self) {
        self.attempts.clear();
        self.summary = None;
        self.progress = None;
        self.preview = None;
        self.show_depth.clear();
        self.show_saliency.clear();
        self.favourites.clear();
        self.compare.clear();
        self.zoom = None;
        self.opened = false;
    }

    /// Show a past run's candidates as the cards: its records (lines that do not parse are
    /// skipped and counted in the notice), summary when it finished, and favourites.
    pub fn open_run(&mut self, dir: &Path) -> Result<(), UiError> {
        if self.is_running() {
            return Ok(());
        }
        let folder = RunFolder::new(dir);
        let manifest = folder.read_manifest()?;
        let lines = match folder.read_attempts() {
            Ok(l) => l,
            // A run cancelled before its first candidate has no records yet.
            Err(crate::pipeline::run_folder::RunFolderError::Read(crate::files::ReadError::Io { source, .. }))
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
        let favourites = folder.read_favourites()?;
        self.clear_shown();
        let bad = lines.iter().filter(|(_, r)| r.is_err()).count();
        self.attempts = lines.into_iter().filter_map(|(_, r)| r.ok()).collect();
        self.summary = folder.read_summary().ok();
        self.favourites = favourites;
        self.seed = Some(manifest.seed);
        self.out_dir = Some(dir.to_path_buf());
        self.status = if self.summary.is_some() { RunStatus::Finished } else { RunStatus::Cancelled };
        self.opened = true;
        let mut notes = Vec::new();
        if self.summary.is_none() {
            notes.push(tr!("generate.notice_interrupted").to_string());
        }
        if bad > 0 {
            notes.push(tr!("generate.notice_bad_lines", count = bad));
        }
        self.notice = (!notes.is_empty()).then(|| notes.join(" · "));
        Ok(())
    }

    /// Star or unstar attempt `attempt` of the shown run; the list is saved in its folder.
    pub fn toggle_favourite(&mut self, attempt: usize) -> Result<(), UiError> {
        let dir = self.out_dir.clone().ok_or(UiError::NoRunShown)?;
        let mut next = self.favourites.clone();
        if !next.remove(&attempt) {
            next.insert(attempt);
        }
        RunFolder::new(&dir).write_favourites(&next)?;
        self.favourites = next;
        if let Some(h) = self.history.iter_mut().find(|h| h.dir == dir) {
            h.favourites = self.favourites.len();
        }
        Ok(())
    }

    /// Pick attempt `attempt` for comparison (a third pick replaces the oldest) or unpick it.
    pub fn toggle_compare(&mut self, attempt: usize) {
        if let Some(i) = self.compare.iter().position(|&a| a == attempt) {
            self.compare.remove(i);
        } else {
            self.compare.push(attempt);
            if self.compare.len() > 2 {
                self.compare.remove(0);
            }
        }
    }

    /// The record of attempt `attempt` of the shown run.
    pub fn record(&self, attempt: usize) -> Option<&AttemptRecord> {
        self.attempts.iter().find(|r| r.attempt == attempt)
    }

    /// What the save dialog for exporting attempt `attempt` is for (the run folder and the
    /// candidate's file: the answer may come after another run is shown).
    pub fn export_target(&self, attempt: usize) -> Option<PickTarget> {
        let run = self.out_dir.clone()?;
        let file = self.record(attempt)?.file.clone();
        Some(PickTarget::Export { run, file })
    }

    /// Cancel the run. It ends now for the user, Start included: the worker is told to stop and
    /// abandoned — it may be inside model loading or a first kernel compilation that cannot be
    /// interrupted for minutes — and whatever it sends afterwards is dropped with its channel.
    pub fn cancel(&mut self) {
        if let Some(job) = self.job.take() {
            job.cancel.cancel();
            self.status = RunStatus::Cancelled;
            self.notice = Some(tr!("generate.notice_cancelled").into());
        }
    }

    /// Take the worker's messages. Call once per frame.
    pub fn poll(&mut self, images: &mut ImageCache) {
        self.catalogue.poll();
        if let Some(rx) = &self.history_rx
            && let Ok(h) = rx.try_recv()
        {
            self.history = h;
            self.history_rx = None;
        }
        let Some(job) = &self.job else { return };
        let mut done = None;
        loop {
            let msg = match job.events.try_recv() {
                Ok(m) => m,
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                // The worker is gone without its last message: never keep spinning.
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    done = Some(Err(GenError::Panicked(tr!("generate.err_worker_vanished").into())));
                    break;
                }
            };
            match msg {
                JobMessage::Event(GenEvent::Started {
                    out_dir,
                    attempts,
                    steps,
                    seed,
                    test_weights,
                }) => {
                    self.out_dir = Some(out_dir);
                    self.seed = Some(seed);
                    self.test_weights = test_weights;
                    self.progress = Some(Progress {
                        attempts,
                        total_steps: steps,
                        ..Progress::default()
                    });
                }
                JobMessage::Event(GenEvent::Step {
                    attempt,
                    batch,
                    step,
                    total,
                    preview,
                }) => {
                    let p = self.progress.get_or_insert_with(Progress::default);
                    p.attempt = attempt;
                    // The batch size (the last batch may be smaller: keep the largest seen).
                    p.batch = p.batch.max(batch);
                    p.step = step;
                    p.total_steps = total;
                    let now = std::time::Instant::now();
                    p.steps_seen += 1;
                    p.first_step_at.get_or_insert(now);
                    p.last_step_at = Some(now);
                    images.put("gen:preview", rgb_to_color(&preview));
                    self.preview = Some("gen:preview".into());
                }
                JobMessage::Event(GenEvent::Attempt(record)) => {
                    if let Some(dir) = &self.out_dir {
                        images.request_file(&dir.join(&record.file));
                    }
                    self.attempts.push(record);
                }
                JobMessage::Event(GenEvent::Finished(summary)) => {
                    self.summary = Some(summary);
                }
                JobMessage::Done(result) => {
                    done = Some(result);
                    break;
                }
            }
        }
        if let Some(result) = done {
            self.status = match result {
                Ok(_) => RunStatus::Finished,
                Err(GenError::Cancelled) => RunStatus::Cancelled,
                Err(e) => {
                    let text = crate::errors::render_chain(&e);
                    super::common::push_error(&mut self.errors, tr!("generate.err_failed", error = text));
                    RunStatus::Failed(text)
                }
            };
            if let Some(job) = self.job.take() {
                job.join();
            }
        }
    }

    /// Rescan the output folder for past runs (on a helper thread).
    pub fn refresh_history(&mut self, ctx: &egui::Context, out_root: &Path) {
        let (tx, rx) = channel();
        let root = out_root.to_path_buf();
        let wake = ctx.clone();
        std::thread::spawn(move || {
            let _ = tx.send(scan_history(&root));
            wake.request_repaint();
        });
        self.history_rx = Some(rx);
    }

    /// The image-cache key prefix of the form's placement previews.
    pub fn placement_name(form: &GenerateForm) -> Option<String> {
        let product = form.product.as_ref()?;
        let p = &form.params;
        Some(format!(
            "place:{}:{}:{}:{}:{:?}",
            product.display(),
            p.canvas,
            p.scale,
            p.white_bg,
            p.position
        ))
    }

    /// Request the placement previews (product on canvas, mask, Canny) for the form.
    pub fn placement_key(images: &mut ImageCache, form: &GenerateForm) -> Option<String> {
        let product = form.product.clone()?;
        let p = &form.params;
        let key = Self::placement_name(form)?;
        let placement = Placement {
            canvas: p.canvas,
            scale: p.scale,
            position: p.position,
            white_bg: p.white_bg,
        };
        let k = key.clone();
        images.request(&format!("{key}/product"), move || match place_file(&product, &placement) {
            Ok(placed) => vec![
                (format!("{k}/product"), Ok(rgba_to_color(&placed.rgba))),
                (format!("{k}/mask"), Ok(gray_to_color(&placed.inpaint_mask))),
                (format!("{k}/control"), Ok(rgb_to_color(&placed.control))),
            ],
            Err(e) => vec![
                (format!("{k}/product"), Err(UiError::from(e))),
                (format!("{k}/mask"), Err(UiError::NoPreview)),
                (format!("{k}/control"), Err(UiError::NoPreview)),
            ],
        });
        Some(key)
    }
}

impl Default for GenerateState {
    fn default() -> Self {
        Self::new()
    }
}

fn scan_history(root: &Path) -> Vec<HistoryEntry> {
    let Ok(rd) = std::fs::read_dir(root) else { return Vec::new() };
    let mut out: Vec<HistoryEntry> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter_map(|dir| {
            // Folders without a readable run.json are not runs (or not ours): left out.
            let folder = RunFolder::new(&dir);
            let run = folder.read_manifest().ok()?;
            let summary = folder.read_summary().ok();
            let modified = std::fs::metadata(folder.manifest_path())
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            Some(HistoryEntry {
                product: Some(run.product),
                params: Some(run.params),
                seed: Some(run.seed),
                attempts: summary.as_ref().map(|s| s.attempts.len()).unwrap_or(0),
                available: summary.as_ref().and_then(|s| s.available),
                best: folder.best_path().is_file().then(|| folder.best_path()),
                modified,
                finished: summary.is_some(),
                favourites: folder.read_favourites().map(|f| f.len()).unwrap_or(0),
                dir,
            })
        })
        .collect();
    out.sort_by(|a, b| b.modified.cmp(&a.modified));
    out
}

/// Request a depth or saliency overlay for an attempt (computed on the loader thread).
fn overlay_key(images: &mut ImageCache, dir: &Path, record: &AttemptRecord, depth: bool) -> String {
    let kind = if depth { MapKind::Depth } else { MapKind::Saliency };
    let image = dir.join(&record.file);
    let map = RunFolder::new(dir).map_path(&record.file, kind);
    images.request_overlay(image, map, depth)
}

/// One colour per class, from the Okabe-Ito palette (told apart with the common colour-vision
/// deficiencies): Available green, Space Mismatch orange, Size Mismatch blue,
/// Indistinctiveness reddish purple, Shape Hallucination vermilion.
pub const CLASS_COLOURS: [Color32; 5] = [
    Color32::from_rgb(0, 158, 115),
    Color32::from_rgb(230, 159, 0),
    Color32::from_rgb(0, 114, 178),
    Color32::from_rgb(204, 121, 167),
    Color32::from_rgb(213, 94, 0),
];

/// Five horizontal probability bars.
/// The five class probabilities as bars; `threshold` marks where the Available bar passes.
pub fn probability_bars(ui: &mut egui::Ui, probs: &[f32; 5], width: f32, threshold: Option<f32>) {
    for (i, p) in probs.iter().enumerate() {
        let name = crate::i18n::class_name(i);
        ui.horizontal(|ui| {
            let (rect, _) = ui.allocate_exact_size(Vec2::new(width * 0.45, 12.0), egui::Sense::hover());
            ui.painter().rect_filled(rect, 2.0, ui.visuals().faint_bg_color);
            let mut fill = rect;
            fill.set_width(rect.width() * p.clamp(0.0, 1.0));
            ui.painter().rect_filled(fill, 2.0, CLASS_COLOURS[i]);
            if let (0, Some(t)) = (i, threshold) {
                let x = rect.left() + rect.width() * t.clamp(0.0, 1.0);
                ui.painter().vline(x, rect.y_range().expand(2.0), egui::Stroke::new(2.0, ui.visuals().strong_text_color()));
            }
            let label = match (i, threshold) {
                (0, Some(t)) => tr!("generate.bar_threshold", name = name, p = format!("{p:.2}"), t = format!("{t:.2}")),
                _ => format!("{name} {p:.2}"),
            };
            ui.label(RichText::new(label).small());
        });
    }
}

/// The Generate tab.
pub fn generate_ui(
    ui: &mut egui::Ui,
    state: &mut GenerateState,
    form: &mut GenerateForm,
    images: &mut ImageCache,
    ready: Result<(), NotReady>,
) -> Vec<GenerateCommand> {
    let mut cmds = Vec::new();
    // Dropped files become the product.
    let dropped: Vec<PathBuf> = ui.ctx().input(|i| i.raw.dropped_files.iter().filter_map(|f| f.path.clone()).collect());
    if let Some(p) = dropped.into_iter().next() {
        form.set_product(Some(p));
    }
    // Errors belong to the form they came from: a changed form clears them.
    let shape = form_fingerprint(form);
    if state.errors_for.as_deref() != Some(shape.as_str()) {
        if state.errors_for.is_some() && !state.is_running() {
            state.errors.clear();
        }
        state.errors_for = Some(shape);
    }
    // The product is checked as soon as it is chosen (its placement preview): a product that
    // cannot be placed keeps Start disabled, with the reason shown once.
    let product_error = GenerateState::placement_key(images, form)
        .and_then(|key| images.error(&format!("{key}/product")).map(super::common::for_studio));
    egui::Panel::left("generate-form").resizable(true).default_size(330.0).show(ui, |ui| {
        // Start and Cancel stay at the bottom of the form, outside its scrolling: reachable at
        // the smallest window size.
        egui::Panel::bottom("generate-start").show(ui, |ui| {
            start_ui(ui, state, form, &ready, product_error.as_deref(), &mut cmds)
        });
        egui::ScrollArea::vertical().show(ui, |ui| {
            form_ui(ui, state, form, product_error.as_deref(), &mut cmds);
            ui.separator();
            egui::CollapsingHeader::new(tr!("generate.catalogue_heading"))
                .id_salt("catalogue-queue")
                .show(ui, |ui| super::catalogue::watch_ui(ui, &mut state.catalogue, form));
        });
    });
    egui::CentralPanel::default_margins().show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| results_ui(ui, state, form, images, &mut cmds));
    });
    cmds
}

/// What the form asks for, to tell when it changed.
fn form_fingerprint(form: &GenerateForm) -> String {
    serde_json::to_string(&(&form.product, &form.params, &form.loras)).unwrap_or_default()
}

/// Start (also Ctrl+Enter) and Cancel (also Escape while running), and why Start is disabled.
fn start_ui(
    ui: &mut egui::Ui,
    state: &GenerateState,
    form: &GenerateForm,
    ready: &Result<(), NotReady>,
    product_error: Option<&str>,
    cmds: &mut Vec<GenerateCommand>,
) {
    ui.add_space(4.0);
    let can_start = !state.is_running() && ready.is_ok() && form.product.is_some() && product_error.is_none();
    let (start_key, cancel_key) = ui.ctx().input_mut(|i| {
        (
            i.consume_key(egui::Modifiers::COMMAND, egui::Key::Enter),
            state.is_running() && state.zoom.is_none() && i.consume_key(egui::Modifiers::NONE, egui::Key::Escape),
        )
    });
    ui.horizontal(|ui| {
        let start = ui.add_enabled(can_start, egui::Button::new(tr!("generate.start"))).on_hover_text("Ctrl+Enter");
        if start.clicked() || (start_key && can_start) {
            cmds.push(GenerateCommand::Start);
        }
        let cancel = ui.add_enabled(state.is_running(), egui::Button::new(tr!("generate.cancel"))).on_hover_text(tr!("generate.key_escape"));
        if cancel.clicked() || cancel_key {
            cmds.push(GenerateCommand::Cancel);
        }
    });
    let running = state.is_running();
    match ready {
        Err(why) => super::common::error_line(ui, Some(&why.to_string()).filter(|_| !running).map(String::as_str)),
        Ok(()) => super::common::hint_line(ui, (form.product.is_none() && !running).then_some(tr!("generate.hint_choose_product"))),
    }
}

fn form_ui(
    ui: &mut egui::Ui,
    state: &GenerateState,
    form: &mut GenerateForm,
    product_error: Option<&str>,
    cmds: &mut Vec<GenerateCommand>,
) {
    ui.heading(tr!("generate.product"));
    ui.horizontal(|ui| {
        let mut p = form.product.clone().unwrap_or_default();
        if path_edit(ui, &mut p, 200.0).changed() {
            form.set_product((!p.as_os_str().is_empty()).then_some(p));
        }
        if ui.button(tr!("generate.open")).clicked() {
            cmds.push(GenerateCommand::Pick(PickTarget::Product));
        }
    });
    ui.label(RichText::new(tr!("generate.drop_hint")).weak().small());
    ui.checkbox(&mut form.params.white_bg, tr!("generate.white_bg"))
        .on_hover_text(tr!("generate.white_bg_tip"));
    super::common::error_line(ui, product_error);
    if !state.samples.is_empty() {
        ui.label(tr!("generate.samples"));
        ui.horizontal_wrapped(|ui| {
            for (i, (_, s)) in state.samples.iter().enumerate() {
                if ui.small_button(&s.id).on_hover_text(&s.title_zh).clicked() {
                    cmds.push(GenerateCommand::UseSample(i));
                }
            }
        });
    }
    ui.separator();
    ui.heading(tr!("generate.prompt"));
    let p = &mut form.params;
    ui.label(tr!("generate.prompt"));
    ui.add(egui::TextEdit::multiline(&mut p.prompt).desired_rows(3).desired_width(f32::INFINITY));
    ui.label(tr!("generate.negative"));
    ui.add(egui::TextEdit::multiline(&mut p.negative).desired_rows(2).desired_width(f32::INFINITY));
    ui.label(tr!("generate.title"));
    ui.add(egui::TextEdit::singleline(&mut p.title).desired_width(f32::INFINITY));
    lora_list_ui(ui, &mut form.loras, cmds);
    let p = &mut form.params;
    ui.separator();
    egui::Grid::new("gen-params").num_columns(2).show(ui, |ui| {
        ui.label(tr!("generate.seed"));
        ui.horizontal(|ui| {
            ui.checkbox(&mut form.random_seed, tr!("generate.random"));
            ui.add_enabled(!form.random_seed, egui::DragValue::new(&mut form.seed));
        });
        ui.end_row();
        ui.label(tr!("generate.steps"));
        ui.add(egui::DragValue::new(&mut p.steps).range(1..=1000));
        ui.end_row();
        ui.label(tr!("generate.guidance"));
        ui.add(egui::DragValue::new(&mut p.guidance).range(0.0..=30.0).speed(0.1));
        ui.end_row();
        ui.label(tr!("generate.controlnet_scale"));
        ui.add(egui::DragValue::new(&mut p.controlnet_scale).range(0.0..=2.0).speed(0.05));
        ui.end_row();
        ui.label(tr!("generate.product_scale"));
        ui.add(egui::Slider::new(&mut p.scale, 0.1..=1.0));
        ui.end_row();
        ui.label(tr!("generate.canvas"));
        egui::ComboBox::from_id_salt("canvas")
            .selected_text(format!("{} px", p.canvas))
            .show_ui(ui, |ui| {
                for c in [128u32, 256, 384, 512, 768] {
                    ui.selectable_value(&mut p.canvas, c, format!("{c} px"));
                }
            });
        ui.end_row();
        ui.label(tr!("generate.attempts"));
        ui.add(egui::DragValue::new(&mut p.attempts).range(1..=64));
        ui.end_row();
        ui.label(tr!("generate.threshold"));
        ui.add(egui::Slider::new(&mut p.threshold, 0.0..=1.0));
        ui.end_row();
        ui.label(tr!("generate.batch"));
        ui.add(egui::DragValue::new(&mut p.batch).range(1..=16));
        ui.end_row();
        ui.label(tr!("generate.out_folder"));
        ui.horizontal(|ui| {
            path_edit(ui, &mut form.out_root, 150.0);
            if ui.small_button("…").clicked() {
                cmds.push(GenerateCommand::Pick(PickTarget::OutRoot));
            }
        });
        ui.end_row();
    });
}

/// The LoRA list: each file with its strength (A1111's `<lora:NAME:STRENGTH>`), removable;
/// "Add LoRA…" opens a file dialog.
fn lora_list_ui(ui: &mut egui::Ui, loras: &mut Vec<crate::models::lora_file::LoraSpec>, cmds: &mut Vec<GenerateCommand>) {
    ui.horizontal(|ui| {
        ui.label("LoRA");
        if ui.small_button(tr!("generate.add_lora")).clicked() {
            cmds.push(GenerateCommand::Pick(PickTarget::Lora));
        }
    });
    let mut remove = None;
    for (i, l) in loras.iter_mut().enumerate() {
        ui.horizontal(|ui| {
            path_edit(ui, &mut l.path, 150.0).on_hover_text(tr!("generate.lora_tip"));
            ui.add(egui::DragValue::new(&mut l.strength).range(-2.0..=2.0).speed(0.05).max_decimals(2))
                .on_hover_text(tr!("generate.lora_strength"));
            if ui.small_button("✕").on_hover_text(tr!("generate.lora_remove")).clicked() {
                remove = Some(i);
            }
        });
    }
    if let Some(i) = remove {
        loras.remove(i);
    }
}

fn results_ui(
    ui: &mut egui::Ui,
    state: &mut GenerateState,
    form: &GenerateForm,
    images: &mut ImageCache,
    cmds: &mut Vec<GenerateCommand>,
) {
    super::common::errors_ui(ui, &mut state.errors, egui::Align2::RIGHT_BOTTOM);
    if let Some(n) = &state.notice {
        ui.label(RichText::new(n).italics());
    }
    // 1. the product on the canvas, its mask and Canny control image
    if let Some(key) = GenerateState::placement_key(images, form) {
        ui.horizontal(|ui| {
            for (part, caption) in [
                ("product", tr!("generate.caption_product")),
                ("mask", tr!("generate.caption_mask")),
                ("control", tr!("generate.caption_control")),
            ] {
                ui.vertical(|ui| {
                    ui.label(RichText::new(caption).small());
                    show_key(ui, images, &format!("{key}/{part}"), Vec2::splat(170.0));
                });
            }
        });
    } else {
        ui.label(tr!("generate.no_product"));
    }
    ui.separator();
    // 2. progress and the live preview
    let status = match &state.status {
        RunStatus::Idle => "",
        RunStatus::Running => tr!("generate.status_running"),
        RunStatus::Cancelling => tr!("generate.status_cancelling"),
        RunStatus::Finished => tr!("generate.status_finished"),
        RunStatus::Cancelled => tr!("generate.status_cancelled"),
        RunStatus::Failed(_) => tr!("generate.status_failed"),
    };
    if state.status != RunStatus::Idle {
        ui.horizontal(|ui| {
            let line = if state.opened {
                tr!("generate.run_status_opened", status = status)
            } else {
                tr!("generate.run_status", status = status)
            };
            ui.label(RichText::new(line).strong());
            if let Some(seed) = state.seed {
                ui.label(tr!("generate.seed_value", seed = seed));
            }
            if let Some(dir) = &state.out_dir {
                if ui.small_button(tr!("generate.open_output")).clicked() {
                    cmds.push(GenerateCommand::OpenFolder(dir.clone()));
                }
                ui.label(RichText::new(dir.display().to_string()).small().weak());
            }
        });
    }
    // The outcome in plain words once the run is over, with the chosen image instead of the
    // last (noisy) latent preview.
    let outcome = match (&state.summary, &state.out_dir, state.is_running()) {
        (Some(sum), Some(dir), false) => sum.attempts.get(sum.best).map(|best| {
            let text = match (sum.available, best.probs.as_ref()) {
                (Some(true), _) => tr!("generate.outcome_passed", attempt = best.attempt),
                (Some(false), Some(pr)) => tr!(
                    "generate.outcome_failed",
                    attempt = best.attempt,
                    p = format!("{:.2}", pr.available())
                ),
                _ => tr!("generate.outcome_unscored").to_string(),
            };
            (images.request_file(&dir.join(&best.file)), text)
        }),
        _ => None,
    };
    if state.progress.is_some() || outcome.is_some() {
        ui.horizontal(|ui| {
            match (&outcome, &state.preview) {
                (Some((key, _)), _) => {
                    show_key(ui, images, key, Vec2::splat(128.0));
                }
                (None, Some(key)) => {
                    show_key(ui, images, key, Vec2::splat(128.0));
                }
                _ => {}
            }
            ui.vertical(|ui| {
                if let Some((_, text)) = &outcome {
                    ui.label(RichText::new(text).strong());
                }
                let Some(p) = &state.progress else { return };
                // Progress over the whole run (all attempts), the current step in the text.
                let total = p.run_steps();
                let frac = if total > 0 { p.run_steps_done() as f32 / total as f32 } else { 0.0 };
                ui.add(
                    egui::ProgressBar::new(frac)
                        .desired_width(320.0)
                        .text(tr!(
                            "generate.progress",
                            attempt = p.attempt.max(1),
                            attempts = p.attempts,
                            step = p.step,
                            steps = p.total_steps
                        )),
                );
                if state.is_running() {
                    ui.horizontal(|ui| {
                        ui.spinner();
                        let phase = match p.phase() {
                            Phase::Loading => tr!("generate.phase_loading"),
                            Phase::Denoising => tr!("generate.phase_denoising"),
                            Phase::Finishing => tr!("generate.phase_finishing"),
                        };
                        ui.label(phase);
                        if let Some(sps) = p.seconds_per_step() {
                            let seconds = format!("{sps:.2}");
                            ui.label(match p.eta_seconds() {
                                Some(e) => tr!("generate.speed_eta", seconds = seconds, left = format!("{e:.0}")),
                                None => tr!("generate.speed", seconds = seconds),
                            });
                        }
                    });
                }
            });
        });
    }
    // 3. attempt cards
    if !state.attempts.is_empty() {
        ui.horizontal(|ui| {
            ui.label(RichText::new(tr!("generate.attempts_heading")).strong());
            ui.label(RichText::new(tr!("generate.cards_hint")).small().weak());
            let two = state.compare.len() == 2;
            if ui
                .add_enabled(two, egui::Button::new(tr!("generate.compare_side_by_side")))
                .on_disabled_hover_text(tr!("generate.compare_disabled_tip"))
                .clicked()
            {
                state.zoom = Some(ZoomView::new(state.compare.clone()));
            }
        });
        let dir = state.out_dir.clone().unwrap_or_default();
        let best = state.summary.as_ref().map(|s| s.best);
        // Rows of as many cards as fit (a wrapped layout cannot measure a card before drawing it).
        let gap = ui.spacing().item_spacing.x;
        let per_row = ((ui.available_width() + gap) / (state.card_width + gap)).floor().max(1.0) as usize;
        let records = state.attempts.clone();
        for (r, row) in records.chunks(per_row).enumerate() {
            ui.horizontal_top(|ui| {
            for (j, record) in row.iter().enumerate() {
                let i = r * per_row + j;
                let passed = record.available == Some(true);
                let stroke = if passed {
                    egui::Stroke::new(3.0, Color32::from_rgb(60, 200, 90))
                } else {
                    ui.visuals().widgets.noninteractive.bg_stroke
                };
                let card = egui::Frame::group(ui.style()).stroke(stroke).show(ui, |ui| {
                    ui.set_width(220.0);
                    ui.vertical(|ui| {
                        ui.horizontal(|ui| {
                            ui.label(RichText::new(tr!("generate.attempt_n", attempt = record.attempt)).strong());
                            let starred = state.favourites.contains(&record.attempt);
                            let (star, tip) = if starred { ("★", tr!("generate.unstar")) } else { ("☆", tr!("generate.star_tip")) };
                            if ui.small_button(star).on_hover_text(tip).clicked() {
                                cmds.push(GenerateCommand::ToggleFavourite(record.attempt));
                            }
                        });
                        let depth = state.show_depth.contains(&record.attempt);
                        let sal = state.show_saliency.contains(&record.attempt);
                        let key = if depth && record.probs.is_some() {
                            overlay_key(images, &dir, record, true)
                        } else if sal && record.probs.is_some() {
                            overlay_key(images, &dir, record, false)
                        } else {
                            images.request_file(&dir.join(&record.file))
                        };
                        let shown = show_key(ui, images, &key, Vec2::splat(210.0)).interact(egui::Sense::click());
                        if shown.on_hover_text(tr!("generate.zoom_tip")).clicked() {
                            state.zoom = Some(ZoomView::new(vec![record.attempt]));
                        }
                        ui.label(RichText::new(tr!("generate.card_seed_time", seed = record.seed, seconds = format!("{:.1}", record.seconds))).small());
                        match record.probs {
                            Some(p) => {
                                probability_bars(ui, &p.0, 210.0, Some(form.params.threshold));
                                if passed {
                                    ui.colored_label(Color32::from_rgb(60, 200, 90), tr!("generate.passed"));
                                }
                                ui.horizontal(|ui| {
                                    let mut d = depth;
                                    if ui.checkbox(&mut d, tr!("generate.depth")).changed() {
                                        toggle(&mut state.show_depth, record.attempt, d);
                                        state.show_saliency.remove(&record.attempt);
                                    }
                                    let mut s = sal;
                                    if ui.checkbox(&mut s, tr!("generate.saliency")).changed() {
                                        toggle(&mut state.show_saliency, record.attempt, s);
                                        state.show_depth.remove(&record.attempt);
                                    }
                                });
                            }
                            None => {
                                ui.label(RichText::new(tr!("generate.unscored")).italics());
                            }
                        }
                        ui.horizontal(|ui| {
                            let mut c = state.compare.contains(&record.attempt);
                            if ui.checkbox(&mut c, tr!("generate.compare")).changed() {
                                state.toggle_compare(record.attempt);
                            }
                            if ui.small_button(tr!("generate.reuse_seed")).on_hover_text(tr!("generate.reuse_seed_tip")).clicked() {
                                cmds.push(GenerateCommand::ReuseSeed(record.seed));
                            }
                            if ui.small_button(tr!("generate.export")).on_hover_text(tr!("generate.export_tip")).clicked() {
                                cmds.push(GenerateCommand::Export(record.attempt));
                            }
                        });
                        if best == Some(i) {
                            ui.label(RichText::new(tr!("generate.best_of_run")).small());
                        }
                    });
                });
                state.card_width = state.card_width.max(card.response.rect.width());
            }
            });
        }
    }
    zoom_ui(ui.ctx(), state, form, images, cmds);
    ui.separator();
    // 4. history
    ui.horizontal(|ui| {
        ui.label(RichText::new(tr!("generate.history")).strong());
        if ui.small_button(tr!("generate.refresh")).clicked() {
            cmds.push(GenerateCommand::RefreshHistory);
        }
        ui.checkbox(&mut state.favourites_only, tr!("generate.favourites_only"));
    });
    if state.history.is_empty() {
        ui.label(RichText::new(tr!("generate.no_history", dir = form.out_root.display())).weak());
    }
    let running = state.is_running();
    let shown_dir = state.out_dir.clone();
    let listed = state
        .history
        .iter()
        .enumerate()
        .filter(|(_, h)| !state.favourites_only || h.favourites > 0)
        .take(50);
    for (i, h) in listed {
        ui.horizontal(|ui| {
            if let Some(best) = &h.best {
                let key = images.request_file(best);
                show_key(ui, images, &key, Vec2::splat(56.0));
            }
            ui.vertical(|ui| {
                let name = h.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let verdict = match (h.finished, h.available) {
                    (false, _) => tr!("generate.hist_interrupted"),
                    (_, Some(true)) => tr!("generate.hist_available"),
                    (_, Some(false)) => tr!("generate.hist_none_available"),
                    (_, None) => tr!("generate.hist_unscored"),
                };
                let stars = if h.favourites > 0 { format!(" · ★ {}", h.favourites) } else { String::new() };
                ui.label(tr!("generate.hist_line", name = name, attempts = h.attempts, verdict = verdict, stars = stars));
                if let Some(p) = &h.params {
                    ui.label(
                        RichText::new(tr!(
                            "generate.hist_params",
                            prompt = p.prompt,
                            seed = h.seed.map(|s| s.to_string()).unwrap_or_default(),
                            steps = p.steps,
                            cfg = p.guidance,
                            scale = p.scale
                        ))
                        .small(),
                    );
                }
                ui.horizontal(|ui| {
                    let here = shown_dir.as_ref() == Some(&h.dir);
                    if ui
                        .add_enabled(!running && !here, egui::Button::new(tr!("generate.hist_open")).small())
                        .on_hover_text(tr!("generate.hist_open_tip"))
                        .on_disabled_hover_text(if running { tr!("generate.hist_busy") } else { tr!("generate.hist_shown") })
                        .clicked()
                    {
                        cmds.push(GenerateCommand::OpenRun(i));
                    }
                    if ui.small_button(tr!("generate.load_parameters")).clicked() {
                        cmds.push(GenerateCommand::LoadHistory(i));
                    }
                    if ui.small_button(tr!("generate.open_folder")).clicked() {
                        cmds.push(GenerateCommand::OpenFolder(h.dir.clone()));
                    }
                });
            });
        });
    }
}

/// The zoom view: one candidate or two side by side, large, with a depth or saliency overlay
/// at an adjustable opacity, scores, and the same actions as the cards.
fn zoom_ui(ctx: &egui::Context, state: &mut GenerateState, form: &GenerateForm, images: &mut ImageCache, cmds: &mut Vec<GenerateCommand>) {
    let Some(mut zoom) = state.zoom.clone() else { return };
    let Some(dir) = state.out_dir.clone() else {
        state.zoom = None;
        return;
    };
    let records: Vec<AttemptRecord> = zoom.attempts.iter().filter_map(|&a| state.record(a).cloned()).collect();
    if records.is_empty() {
        state.zoom = None;
        return;
    }
    let title = match records.as_slice() {
        [one] => tr!("generate.zoom_title_one", attempt = one.attempt),
        [a, b] => tr!("generate.zoom_title_two", a = a.attempt, b = b.attempt),
        _ => tr!("generate.zoom_title_many").to_string(),
    };
    let mut open = true;
    let screen = ctx.content_rect();
    egui::Window::new(title)
        .id(egui::Id::new("generate-zoom"))
        .open(&mut open)
        .collapsible(false)
        .default_size(screen.size() * 0.8)
        .max_size(screen.size() * 0.95)
        .show(ctx, |ui| {
            let scored = records.iter().any(|r| r.probs.is_some());
            ui.horizontal(|ui| {
                ui.label(tr!("generate.overlay"));
                ui.selectable_value(&mut zoom.overlay, OverlayChoice::None, tr!("generate.overlay_none"));
                ui.add_enabled_ui(scored, |ui| {
                    ui.selectable_value(&mut zoom.overlay, OverlayChoice::Depth, tr!("generate.depth"));
                    ui.selectable_value(&mut zoom.overlay, OverlayChoice::Saliency, tr!("generate.saliency"));
                });
                ui.add_enabled(
                    zoom.overlay != OverlayChoice::None,
                    egui::Slider::new(&mut zoom.opacity, 0.0..=1.0).text(tr!("generate.opacity")),
                );
            });
            ui.separator();
            let n = records.len() as f32;
            let side = ((ui.available_width() - 16.0 * (n - 1.0)) / n).min(ui.available_height() - 150.0).max(96.0);
            ui.horizontal_top(|ui| {
                for record in &records {
                    ui.vertical(|ui| {
                        let base = images.request_file(&dir.join(&record.file));
                        let overlay = match (zoom.overlay, record.probs.is_some()) {
                            (OverlayChoice::Depth, true) => Some(overlay_key(images, &dir, record, true)),
                            (OverlayChoice::Saliency, true) => Some(overlay_key(images, &dir, record, false)),
                            _ => None,
                        };
                        blended(ui, images, &base, overlay.as_deref(), zoom.opacity, Vec2::splat(side));
                        ui.label(RichText::new(tr!("generate.zoom_caption", attempt = record.attempt, seed = record.seed)).strong());
                        if let Some(p) = record.probs {
                            probability_bars(ui, &p.0, side, Some(form.params.threshold));
                        }
                        ui.horizontal(|ui| {
                            let starred = state.favourites.contains(&record.attempt);
                            if ui.small_button(if starred { tr!("generate.starred") } else { tr!("generate.star") }).clicked() {
                                cmds.push(GenerateCommand::ToggleFavourite(record.attempt));
                            }
                            if ui.small_button(tr!("generate.reuse_seed")).clicked() {
                                cmds.push(GenerateCommand::ReuseSeed(record.seed));
                            }
                            if ui.small_button(tr!("generate.export")).clicked() {
                                cmds.push(GenerateCommand::Export(record.attempt));
                            }
                        });
                    });
                }
            });
        });
    // Escape closes the view (while a run goes on, Cancel's Escape waits until it is closed).
    if ctx.input_mut(|i| i.consume_key(egui::Modifiers::NONE, egui::Key::Escape)) {
        open = false;
    }
    state.zoom = open.then_some(zoom);
}

/// An image with an overlay painted over it at `opacity` (the overlay's own texture, faded).
fn blended(ui: &mut egui::Ui, images: &ImageCache, base: &str, overlay: Option<&str>, opacity: f32, max: Vec2) {
    let Some(tex) = images.texture(base) else {
        show_key(ui, images, base, max);
        return;
    };
    let size = tex.size_vec2();
    let s = (max.x / size.x).min(max.y / size.y);
    let (rect, _) = ui.allocate_exact_size(size * s, egui::Sense::hover());
    egui::Image::new(egui::load::SizedTexture::new(tex.id(), size * s)).paint_at(ui, rect);
    if let Some(o) = overlay.and_then(|k| images.texture(k)) {
        let alpha = (opacity.clamp(0.0, 1.0) * 255.0).round() as u8;
        egui::Image::new(egui::load::SizedTexture::new(o.id(), size * s))
            .tint(Color32::from_white_alpha(alpha))
            .paint_at(ui, rect);
    }
}

fn toggle(set: &mut BTreeSet<usize>, k: usize, on: bool) {
    if on {
        set.insert(k);
    } else {
        set.remove(&k);
    }
}

/// Apply one command (after drawing).
pub fn apply(state: &mut GenerateState, form: &mut GenerateForm, cmd: GenerateCommand) -> Result<(), UiError> {
    match cmd {
        GenerateCommand::OpenFolder(dir) => open_folder(&dir),
        GenerateCommand::LoadHistory(i) => {
            let Some(h) = state.history.get(i) else { return Ok(()) };
            if let Some(p) = &h.params {
                form.params = p.clone();
            }
            if let Some(seed) = h.seed {
                form.seed = seed;
                form.random_seed = false;
            }
            if let Some(p) = &h.product {
                form.product = Some(p.clone());
            }
            Ok(())
        }
        GenerateCommand::OpenRun(i) => {
            let Some(dir) = state.history.get(i).map(|h| h.dir.clone()) else { return Ok(()) };
            state.open_run(&dir)
        }
        GenerateCommand::ToggleFavourite(attempt) => state.toggle_favourite(attempt),
        GenerateCommand::ReuseSeed(seed) => {
            form.seed = seed;
            form.random_seed = false;
            Ok(())
        }
        GenerateCommand::UseSample(i) => {
            let Some((path, s)) = state.samples.get(i) else { return Ok(()) };
            form.product = Some(path.clone());
            form.params.prompt = s.prompt.clone();
            form.params.negative = s.negative_prompt.clone();
            form.params.title = s.title_zh.clone();
            Ok(())
        }
        // Start, Cancel, Pick, Export and RefreshHistory need more than the tab (see Studio::apply).
        _ => Ok(()),
    }
}

//! The studio's top level: the persisted `Settings`, the runtime state of each tab, the shared
//! image cache, and `Studio::ui`, which polls the workers, draws the tab bar, the demo banner and
//! the current tab, then applies the commands the tab returned.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use egui::{Color32, RichText};

use super::annotate::{AnnotateCommand, AnnotateState, annotate_ui, keyboard_actions};
use super::common::{PickTarget, Picker};
use crate::files::bundled;
use super::finetune::{FinetuneCommand, FinetuneState, finetune_ui};
use super::fonts;
use super::generate::{GenerateCommand, GenerateState, RunStatus, generate_ui};
use super::images::ImageCache;
use super::models::{ModelsCommand, demo_banner, ModelsState, models_ui};
use super::settings::{Settings, Tab};
use crate::i18n::{self, Lang};
use crate::tr;

/// UI frame times (the time `Studio::ui` takes), collected while a generation runs.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FrameStats {
    pub frames: usize,
    pub mean_ms: f64,
    pub max_ms: f64,
    total_ms: f64,
    #[serde(skip)]
    samples_ms: Vec<f64>,
}

impl FrameStats {
    pub fn add(&mut self, ms: f64) {
        self.frames += 1;
        self.total_ms += ms;
        self.max_ms = self.max_ms.max(ms);
        self.mean_ms = self.total_ms / self.frames as f64;
        self.samples_ms.push(ms);
    }

    /// The q-quantile (0..=1) of the frame times, in ms.
    pub fn percentile(&self, q: f64) -> f64 {
        let mut v = self.samples_ms.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        match v.len() {
            0 => 0.0,
            n => v[((n - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize],
        }
    }

    /// Frames, mean, p50, p95, p99 and max as JSON.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "frames": self.frames,
            "mean_ms": self.mean_ms,
            "p50_ms": self.percentile(0.5),
            "p95_ms": self.percentile(0.95),
            "p99_ms": self.percentile(0.99),
            "max_ms": self.max_ms,
        })
    }
}

/// What a screenshot shows on its tab (`--screenshot-scene`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scene {
    /// The tab as it opens (Generate: a finished run).
    Plain,
    /// Generate: a run in progress (phase, speed, time left).
    Progress,
    /// Generate: the newest run with two or more candidates reopened, its first two side by
    /// side with the depth overlay; Fine-tune: the two newest runs overlaid.
    Compare,
    /// Annotate: the grid view.
    Grid,
}

impl Scene {
    pub fn parse(s: &str) -> Option<Scene> {
        Some(match s {
            "plain" => Scene::Plain,
            "progress" => Scene::Progress,
            "compare" => Scene::Compare,
            "grid" => Scene::Grid,
            _ => return None,
        })
    }
}

/// Drive the real app to one tab, wait until it shows real content, save a screenshot, exit.
#[derive(Clone, Debug)]
pub struct ScreenshotPlan {
    pub tab: Tab,
    pub scene: Scene,
    pub out: PathBuf,
    pub started: Instant,
    pub ready_frames: u32,
    pub requested: bool,
    pub done: bool,
    pub kicked_off: bool,
}

impl ScreenshotPlan {
    pub fn new(tab: Tab, scene: Scene, out: PathBuf) -> Self {
        Self {
            tab,
            scene,
            out,
            started: Instant::now(),
            ready_frames: 0,
            requested: false,
            done: false,
            kicked_off: false,
        }
    }
}

/// Longest wait for a tab's content before a screenshot is taken anyway.
const SCREENSHOT_TIMEOUT: Duration = Duration::from_secs(240);

pub struct Studio {
    pub settings: Settings,
    pub images: ImageCache,
    pub models: ModelsState,
    pub generate: GenerateState,
    pub annotate: AnnotateState,
    pub finetune: FinetuneState,
    picker: Picker,
    /// Errors that belong to no tab (file dialogs, opening folders).
    pub errors: Vec<String>,
    /// UI frame times while generating.
    pub frame_stats: FrameStats,
    /// eframe's whole-frame time (UI, tessellation, painting; not vsync) while generating (real app only).
    pub render_stats: FrameStats,
    pub screenshot: Option<ScreenshotPlan>,
    /// Parsed Markdown for the Models tab's instructions.
    markdown: egui_commonmark::CommonMarkCache,
    /// The language of the user's locale (what "system language" means), read once.
    pub system_lang: Lang,
    ctx: egui::Context,
}

impl Studio {
    pub fn new(ctx: &egui::Context, settings: Settings) -> Self {
        fonts::install(ctx);
        // The workers started here (the model check, the run watcher) answer in the studio's
        // language, as the ones started later from `ui` do.
        let system_lang = Lang::from_env();
        i18n::set_thread(Some(settings.lang.unwrap_or(system_lang)));
        let mut s = Self {
            images: ImageCache::new(ctx),
            models: ModelsState::new(),
            generate: GenerateState::new(),
            annotate: AnnotateState::new(),
            finetune: FinetuneState::new(ctx, &settings.finetune),
            picker: Picker::default(),
            errors: Vec::new(),
            frame_stats: FrameStats::default(),
            render_stats: FrameStats::default(),
            screenshot: None,
            markdown: egui_commonmark::CommonMarkCache::default(),
            system_lang,
            ctx: ctx.clone(),
            settings,
        };
        s.models.refresh(ctx, &s.settings);
        s.generate.refresh_history(ctx, &s.settings.generate.out_root);
        s
    }

    pub fn ctx(&self) -> &egui::Context {
        &self.ctx
    }

    /// The interface language: the one chosen in the studio, else the system's.
    pub fn lang(&self) -> Lang {
        self.settings.lang.unwrap_or(self.system_lang)
    }

    fn poll(&mut self) {
        self.images.poll();
        self.models.poll();
        let was_running = self.generate.is_running();
        self.generate.poll(&mut self.images);
        if was_running && !self.generate.is_running() {
            self.generate.refresh_history(&self.ctx, &self.settings.generate.out_root);
        }
        self.annotate.poll(&mut self.images);
        self.annotate.follow_annotator(&self.settings.annotate);
        self.finetune.poll(&self.ctx);
        if let Some((target, picked)) = self.picker.poll() {
            let paths = picked.unwrap_or_else(|e| {
                super::common::push_error(&mut self.errors, e.shown());
                Vec::new()
            });
            let first = paths.first().cloned();
            match (target, first) {
                (_, None) => {}
                (PickTarget::Product, Some(p)) => self.settings.generate.set_product(Some(p)),
                (PickTarget::OutRoot, Some(p)) => {
                    self.settings.generate.out_root = p;
                    self.generate.refresh_history(&self.ctx, &self.settings.generate.out_root);
                }
                (PickTarget::Dataset, Some(p)) => self.settings.annotate.dataset = p,
                (PickTarget::RunsRoot, Some(p)) => {
                    self.settings.finetune.runs_root = p.clone();
                    self.finetune.set_root(p);
                }
                (PickTarget::ModelsDir, Some(p)) => {
                    self.settings.models_dir = p;
                    self.models.refresh(&self.ctx, &self.settings);
                }
                (PickTarget::Lora, Some(_)) => {
                    for p in paths {
                        if !self.settings.generate.loras.iter().any(|l| l.path == p) {
                            self.settings.generate.loras.push(crate::models::lora_file::LoraSpec { path: p, strength: 1.0 });
                        }
                    }
                }
                (PickTarget::Export { run, file }, Some(dest)) => {
                    match crate::pipeline::run_folder::RunFolder::new(&run).export_image(&file, &dest) {
                        Ok(()) => self.generate.notice = Some(tr!("generate.saved_copy", path = dest.display())),
                        Err(e) => super::common::push_error(&mut self.generate.errors, super::error::UiError::from(e).shown()),
                    }
                }
                (PickTarget::FinetuneProducts, Some(_)) => {
                    for p in paths {
                        if !self.settings.finetune.products.contains(&p) {
                            self.settings.finetune.products.push(p);
                        }
                    }
                }
            }
        }
    }

    /// Draw one frame (everything inside the window).
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        let start = Instant::now();
        // Everything this frame draws (and the workers it starts) speaks the studio's language.
        i18n::set_thread(Some(self.lang()));
        self.poll();
        let ctx = ui.ctx().clone();
        self.screenshot_drive();
        egui::Panel::top("tabs").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.label(RichText::new("rfstudio").strong());
                ui.separator();
                for t in Tab::ALL {
                    if ui.selectable_label(self.settings.tab == t, t.label()).clicked() {
                        self.settings.tab = t;
                    }
                }
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    self.language_menu(ui);
                    ui.separator();
                    match self.models.selection() {
                        Some(s) => ui.label(RichText::new(format!("{} · {}", s.device_name, self.settings.dtype)).small()),
                        None if self.models.checking() => ui.label(RichText::new(tr!("common.checking_device")).small()),
                        None => ui.label(RichText::new(tr!("common.no_device")).small().color(ui.visuals().error_fg_color)),
                    };
                    if self.generate.is_running() {
                        ui.spinner();
                    }
                });
            });
        });
        if self.models.demo() {
            egui::Panel::top("demo-banner").show(ui, |ui| {
                egui::Frame::new()
                    .fill(Color32::from_rgb(120, 80, 0))
                    .inner_margin(6.0)
                    .show(ui, |ui| {
                        ui.set_width(ui.available_width());
                        ui.label(RichText::new(demo_banner()).strong().color(Color32::WHITE));
                    });
            });
        }
        egui::Panel::bottom("status").show(ui, |ui| {
            ui.horizontal(|ui| {
                super::common::errors_ui(ui, &mut self.errors, egui::Align2::LEFT_BOTTOM);
                if self.frame_stats.frames > 0 {
                    ui.label(
                        RichText::new(tr!(
                            "common.frame_time",
                            mean = format!("{:.2}", self.frame_stats.mean_ms),
                            max = format!("{:.2}", self.frame_stats.max_ms),
                            frames = self.frame_stats.frames
                        ))
                        .small()
                        .weak(),
                    );
                }
            });
        });
        match self.settings.tab {
            Tab::Generate => {
                let ready = self.models.ready().map(|_| ());
                let cmds = generate_ui(ui, &mut self.generate, &mut self.settings.generate, &mut self.images, ready);
                for c in cmds {
                    self.apply_generate(c);
                }
            }
            Tab::Annotate => {
                let mut cmds = annotate_ui(ui, &mut self.annotate, &mut self.settings.annotate, &mut self.images);
                if self.annotate.is_open() {
                    cmds.extend(keyboard_actions(&ctx).into_iter().map(AnnotateCommand::Act));
                }
                for c in cmds {
                    match c {
                        AnnotateCommand::Open => self.annotate.open(&self.ctx, &self.settings.annotate),
                        AnnotateCommand::Pick => self.picker.pick(&self.ctx, PickTarget::Dataset, true, false),
                        AnnotateCommand::Act(a) => self.annotate.act(a),
                    }
                }
            }
            Tab::Finetune => {
                let cmds = finetune_ui(ui, &mut self.finetune, &mut self.settings.finetune, &mut self.images);
                for c in cmds {
                    match c {
                        FinetuneCommand::SetRoot => self.finetune.set_root(self.settings.finetune.runs_root.clone()),
                        FinetuneCommand::Select(dir) => {
                            self.settings.finetune.selected = Some(dir.clone());
                            self.finetune.select(Some(dir));
                        }
                        FinetuneCommand::Pick(t) => {
                            let folder = t == PickTarget::RunsRoot;
                            self.picker.pick(&self.ctx, t, folder, !folder);
                        }
                        FinetuneCommand::AddSample(p) => {
                            if !self.settings.finetune.products.contains(&p) {
                                self.settings.finetune.products.push(p);
                            }
                        }
                        FinetuneCommand::Start => {
                            let manifest_dir = self
                                .models
                                .resolved
                                .as_ref()
                                .and_then(|r| r.manifest.source.as_ref())
                                .and_then(|m| m.parent())
                                .map(std::path::Path::to_path_buf)
                                .unwrap_or_else(|| self.settings.models_dir.clone());
                            self.finetune
                                .start(&mut self.settings.finetune, manifest_dir, self.settings.device, self.settings.dtype);
                            self.models.precision_in_use.get_or_insert(self.settings.dtype);
                        }
                        FinetuneCommand::Pause => self.finetune.pause(),
                        FinetuneCommand::Resume => self.finetune.resume(),
                        FinetuneCommand::Stop => self.finetune.stop(),
                    }
                }
            }
            Tab::Models => {
                let cmds = models_ui(ui, &self.models, &mut self.settings, &mut self.markdown);
                for c in cmds {
                    match c {
                        ModelsCommand::Recheck => self.models.refresh(&self.ctx, &self.settings),
                        ModelsCommand::UseTiny => {
                            self.settings.models_dir = bundled("models/tiny");
                            self.settings.role_overrides.clear();
                            self.models.refresh(&self.ctx, &self.settings);
                        }
                        ModelsCommand::Pick => self.picker.pick(&self.ctx, PickTarget::ModelsDir, true, false),
                    }
                }
            }
        }
        self.screenshot_capture(&ctx);
        if self.generate.is_running() {
            self.frame_stats.add(start.elapsed().as_secs_f64() * 1e3);
        }
    }

    /// The language menu of the tab bar: the system's language, or one chosen here (kept in
    /// the settings; the whole interface switches at the next frame).
    fn language_menu(&mut self, ui: &mut egui::Ui) {
        let system = tr!("common.lang_system", lang = self.system_lang.native_name());
        let shown = match self.settings.lang {
            None => system.clone(),
            Some(l) => l.native_name().to_string(),
        };
        egui::ComboBox::from_id_salt("language")
            .selected_text(format!("🌐 {shown}"))
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut self.settings.lang, None, system);
                for l in Lang::ALL {
                    ui.selectable_value(&mut self.settings.lang, Some(l), l.native_name());
                }
            })
            .response
            .on_hover_text(tr!("common.lang_tooltip"));
    }

    fn apply_generate(&mut self, cmd: GenerateCommand) {
        match cmd {
            GenerateCommand::Start => self.start_generation(),
            GenerateCommand::Cancel => {
                self.generate.cancel();
                self.generate.refresh_history(&self.ctx, &self.settings.generate.out_root);
            }
            GenerateCommand::Pick(t) => {
                let folder = t == PickTarget::OutRoot;
                let multiple = t == PickTarget::Lora;
                self.picker.pick(&self.ctx, t, folder, multiple);
            }
            GenerateCommand::Export(attempt) => {
                if let Some(target) = self.generate.export_target(attempt) {
                    self.picker.pick(&self.ctx, target, false, false);
                }
            }
            GenerateCommand::RefreshHistory => {
                self.generate.refresh_history(&self.ctx, &self.settings.generate.out_root);
            }
            other => {
                if let Err(e) = super::generate::apply(&mut self.generate, &mut self.settings.generate, other) {
                    super::common::push_error(&mut self.errors, e.shown());
                }
            }
        }
    }

    /// Start a generation with the form as it is (the Start button).
    pub fn start_generation(&mut self) {
        match self.models.ready() {
            Ok((manifest, selection)) => {
                let (manifest, selection) = (manifest.clone(), selection.clone());
                self.frame_stats = FrameStats::default();
                self.generate
                    .start(&self.ctx, &self.settings.generate, &manifest, &selection, self.settings.dtype);
                self.models.precision_in_use.get_or_insert(self.settings.dtype);
            }
            Err(e) => super::common::push_error(&mut self.generate.errors, e.to_string()),
        }
    }

    /// Screenshot mode: switch to the tab and start what it shows (a generation, the dataset,
    /// the first run), then count frames once the content is there.
    fn screenshot_drive(&mut self) {
        let Some(plan) = &self.screenshot else { return };
        let (tab, scene) = (plan.tab, plan.scene);
        self.settings.tab = tab;
        let kicked = plan.kicked_off;
        let timed_out = plan.started.elapsed() > SCREENSHOT_TIMEOUT;
        let ready = match (tab, scene) {
            (Tab::Generate, Scene::Progress) => {
                if !kicked && self.models.ready().is_ok() {
                    self.start_generation();
                    self.set_kicked();
                }
                self.generate.is_running()
                    && self.generate.progress.as_ref().is_some_and(|p| p.steps_seen >= 3)
                    && self.images.texture("gen:preview").is_some()
            }
            (Tab::Generate, Scene::Compare) => {
                let newest = self.generate.history.iter().position(|h| h.attempts >= 2);
                if !kicked && let Some(i) = newest {
                    let _ = super::generate::apply(
                        &mut self.generate,
                        &mut self.settings.generate,
                        super::generate::GenerateCommand::OpenRun(i),
                    );
                    let scored = self.generate.attempts.first().is_some_and(|r| r.probs.is_some());
                    self.generate.compare = vec![1, 2];
                    let mut zoom = super::generate::ZoomView::new(vec![1, 2]);
                    if scored {
                        zoom.overlay = super::generate::OverlayChoice::Depth;
                    }
                    self.generate.zoom = Some(zoom);
                    self.set_kicked();
                }
                kicked
                    && self.generate.out_dir.as_ref().is_some_and(|dir| {
                        self.generate.attempts.iter().take(2).all(|r| {
                            let image = dir.join(&r.file);
                            self.images.texture(&super::images::file_key(&image)).is_some()
                                && (r.probs.is_none()
                                    || self.images.texture(&format!("overlay:depth:{}", image.display())).is_some())
                        })
                    })
            }
            (Tab::Annotate, Scene::Grid) => {
                if !kicked {
                    self.annotate.grid = true;
                    self.annotate.open(&self.ctx, &self.settings.annotate);
                    self.set_kicked();
                }
                self.annotate.snapshot.as_ref().is_some_and(|s| {
                    s.grid.as_ref().is_some_and(|g| {
                        !g.cells.is_empty()
                            && g.cells.iter().all(|c| {
                                self.images
                                    .texture(&super::images::thumbnail_key(
                                        &s.dataset.join(&c.sample.image_path),
                                        super::annotate::THUMB_SIDE,
                                    ))
                                    .is_some()
                            })
                    })
                })
            }
            (Tab::Generate, _) => {
                if !kicked && self.models.ready().is_ok() {
                    self.start_generation();
                    self.set_kicked();
                }
                kicked
                    && !self.generate.is_running()
                    && self.generate.status != RunStatus::Idle
                    && self.images.texture("gen:preview").is_some()
            }
            (Tab::Annotate, _) => {
                if !kicked {
                    self.annotate.open(&self.ctx, &self.settings.annotate);
                    self.set_kicked();
                }
                self.annotate.snapshot.as_ref().is_some_and(|s| {
                    s.current.as_ref().is_none_or(|c| {
                        self.images
                            .texture(&super::images::file_key(&s.dataset.join(&c.image_path)))
                            .is_some()
                    })
                })
            }
            (Tab::Finetune, Scene::Compare) => {
                let rfft: Vec<PathBuf> = self
                    .finetune
                    .runs
                    .iter()
                    .filter(|r| r.kind == crate::train::run_folder::RunKind::Rfft)
                    .map(|r| r.dir.clone())
                    .collect();
                if !kicked && let [first, second, ..] = rfft.as_slice() {
                    self.settings.finetune.selected = Some(first.clone());
                    self.finetune.select(Some(first.clone()));
                    self.finetune.set_compared(second, true);
                    self.set_kicked();
                }
                kicked && self.finetune.run.is_some() && !self.finetune.compared.is_empty()
            }
            (Tab::Finetune, _) => {
                if !kicked && let Some(first) = self.finetune.runs.first() {
                    let dir = first.dir.clone();
                    self.settings.finetune.selected = Some(dir.clone());
                    self.finetune.select(Some(dir));
                    self.set_kicked();
                }
                self.finetune.run.is_some()
            }
            (Tab::Models, _) => self.models.info.is_some() && !self.models.checking(),
        };
        if let Some(plan) = &mut self.screenshot {
            if ready || timed_out {
                plan.ready_frames += 1;
            }
            if plan.ready_frames > 0 && !plan.requested {
                self.ctx.request_repaint();
            }
            if !ready && !timed_out {
                self.ctx.request_repaint_after(Duration::from_millis(100));
            }
        }
    }

    fn set_kicked(&mut self) {
        if let Some(p) = &mut self.screenshot {
            p.kicked_off = true;
        }
    }

    fn screenshot_capture(&mut self, ctx: &egui::Context) {
        let Some(plan) = &mut self.screenshot else { return };
        if plan.ready_frames >= 8 && !plan.requested {
            plan.requested = true;
            ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(egui::UserData::default()));
        }
        let shot = ctx.input(|i| {
            i.events.iter().find_map(|e| match e {
                egui::Event::Screenshot { image, .. } => Some(image.clone()),
                _ => None,
            })
        });
        if let Some(img) = shot {
            let [w, h] = img.size;
            let bytes: Vec<u8> = img.pixels.iter().flat_map(|c| c.to_srgba_unmultiplied()).collect();
            let result = image::RgbaImage::from_raw(w as u32, h as u32, bytes)
                .ok_or_else(|| "screenshot has the wrong size".to_string())
                .and_then(|im| im.save(&plan.out).map_err(|e| format!("{}: {e}", plan.out.display())));
            match result {
                Ok(()) => eprintln!("screenshot of the {} tab written to {}", plan.tab.title(), plan.out.display()),
                Err(e) => eprintln!("error: {e}"),
            }
            if plan.tab == Tab::Generate && plan.scene == Scene::Plain {
                let stats = serde_json::json!({
                    "ui_frame_ms": self.frame_stats.summary(),
                    "whole_frame_ms": self.render_stats.summary(),
                });
                let path = plan.out.with_extension("frame-times.json");
                if let Err(e) = std::fs::write(&path, stats.to_string()) {
                    eprintln!("error: {}: {e}", path.display());
                } else {
                    eprintln!("frame times while generating: {stats}");
                }
            }
            plan.done = true;
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
    }
}

//! The Fine-tune tab: the RFFT run form, the list of run folders (RFFT and RFNet training) with
//! their hyperparameters, live curves (`monitor`: linked plots, smoothing, log scale, runs
//! overlaid for comparison, wall time, memory), the labelled eval grid per eval step, and
//! continuing a stopped run. A watcher thread (`runs::spawn_watcher`) reads the run folders;
//! this file only keeps state and draws.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use egui::{RichText, Vec2};

use super::common::{PickTarget, error_label, path_edit};
use super::generate::probability_bars;
use super::images::{ImageCache, show_key};
use super::monitor::{
    Curve, MonitorView, PlotStyle, PlottedSeries, XAxis, metric_plot, on_x_axis, run_colour, view_controls, wall_time_unavailable,
    wall_times,
};
use super::runs::{WatchCmd, WatchMsg, kind_name, spawn_watcher};
use crate::i18n::{Lang, class_name};
use crate::tr;
use crate::train::run_folder::{EvalMetrics, RunData, RunEntry, RunKind, StepMetrics};
use super::common::unix_secs;
use super::generate::sample_products;
use super::settings::{FinetuneForm, Regularisation};
use crate::device::{DeviceRequest, Precision};
use super::error::FormError;
use crate::train::rfft::{RfftConfig, RfftEvent, RfftJob, resume_config, spawn_rfft_with};

pub enum FinetuneCommand {
    SetRoot,
    Select(PathBuf),
    Pick(PickTarget),
    AddSample(PathBuf),
    /// Start a run on the worker: the form's new run, or the stopped run whose Resume run button
    /// was pressed (`FinetuneState::start` knows which).
    Start,
    Pause,
    Resume,
    Stop,
}

/// Where a run trains: the studio's device, or the form's data-parallel devices.
struct Target {
    device: DeviceRequest,
    devices: Option<crate::device::DeviceSet>,
}

/// A run started from the form (`train::rfft::spawn_rfft_with` on its worker thread).
pub struct RunningRfft {
    job: RfftJob,
    pub dir: PathBuf,
    pub paused: bool,
    pub stopping: bool,
}

/// Build an RFFT configuration from the form: product i is paired with prompt i (cycling), titles
/// come from `sample-data/products.jsonl` for the bundled samples.
pub fn config_from_form(form: &FinetuneForm) -> Result<RfftConfig, FormError> {
    let prompts: Vec<&str> = form.prompts.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if form.products.is_empty() {
        return Err(FormError::NoProducts);
    }
    if prompts.is_empty() {
        return Err(FormError::NoPrompts);
    }
    let samples = sample_products();
    let spec = |i: usize, p: &PathBuf| {
        let mut t = toml::Table::new();
        t.insert("image".into(), toml::Value::String(p.display().to_string()));
        t.insert("prompt".into(), toml::Value::String(prompts[i % prompts.len()].to_string()));
        if let Some((_, s)) = samples.iter().find(|(sp, _)| sp.file_name() == p.file_name()) {
            t.insert("title".into(), toml::Value::String(s.title_zh.clone()));
            t.insert("negative".into(), toml::Value::String(s.negative_prompt.clone()));
        }
        toml::Value::Table(t)
    };
    let eval = if form.eval_products.is_empty() { &form.products } else { &form.eval_products };
    let mut t = toml::Table::new();
    t.insert("products".into(), toml::Value::Array(form.products.iter().enumerate().map(|(i, p)| spec(i, p)).collect()));
    t.insert("eval_products".into(), toml::Value::Array(eval.iter().enumerate().map(|(i, p)| spec(i, p)).collect()));
    t.insert("reg".into(), toml::Value::String(form.reg.key().into()));
    t.insert("beta".into(), toml::Value::Float(form.beta as f64));
    t.insert("lr".into(), toml::Value::Float(form.lr));
    t.insert("steps".into(), toml::Value::Integer(form.steps as i64));
    t.insert("eval_every".into(), toml::Value::Integer(form.eval_every as i64));
    t.insert("seed".into(), toml::Value::Integer(form.seed as i64));
    t.insert("lora_rank".into(), toml::Value::Integer(form.lora_rank as i64));
    t.insert("image_size".into(), toml::Value::Integer(form.image_size as i64));
    t.insert("sample_steps".into(), toml::Value::Integer(form.sample_steps as i64));
    t.insert("last_steps".into(), toml::Value::Integer(form.last_steps as i64));
    t.insert("batch".into(), toml::Value::Integer(form.batch as i64));
    t.insert("grad_accum".into(), toml::Value::Integer(form.grad_accum as i64));
    Ok(RfftConfig::from_toml(&t.to_string(), tr!("finetune.form_source"))?)
}

pub struct FinetuneState {
    watch: Sender<WatchCmd>,
    rx: Receiver<WatchMsg>,
    pub runs: Vec<RunEntry>,
    pub run: Option<RunData>,
    /// Index into the selected run's evals shown in the grid.
    pub eval_index: usize,
    /// Follow the newest eval step as it arrives.
    pub follow_latest: bool,
    pub errors: Vec<String>,
    pub job: Option<RunningRfft>,
    /// Errors from starting runs and from the running job (kept until the next start).
    pub job_errors: Vec<String>,
    /// The form the job errors were raised for (its JSON).
    job_errors_for: Option<String>,
    /// The bundled sample products (for the form's quick-add buttons).
    pub samples: Vec<(PathBuf, super::generate::SampleProduct)>,
    /// How the last started run ended ("finished", "stopped", or the error).
    pub job_outcome: Option<String>,
    /// How the curves are drawn.
    pub view: MonitorView,
    /// Runs overlaid on the selected run's plots, in the order they were ticked (colour i + 1).
    pub compare: Vec<PathBuf>,
    /// The compared runs as last read by the watcher.
    pub compared: Vec<RunData>,
    /// Errors reading compared runs, by folder.
    pub compare_errors: Vec<(PathBuf, String)>,
    /// The series drawn in the last frame.
    pub plotted: Vec<PlottedSeries>,
    /// The run the Resume run button asked to continue (taken by the next `start`).
    resume_request: Option<PathBuf>,
    /// The interface language the watcher was last told (it writes the status lines).
    watcher_lang: Option<Lang>,
}

impl FinetuneState {
    pub fn new(ctx: &egui::Context, form: &FinetuneForm) -> Self {
        let (watch, rx) = spawn_watcher(ctx, Duration::from_millis(500));
        let _ = watch.send(WatchCmd::Root(form.runs_root.clone()));
        let _ = watch.send(WatchCmd::Select(form.selected.clone()));
        Self {
            watch,
            rx,
            runs: Vec::new(),
            run: None,
            eval_index: 0,
            follow_latest: true,
            errors: Vec::new(),
            job: None,
            job_errors: Vec::new(),
            job_errors_for: None,
            samples: sample_products(),
            job_outcome: None,
            view: MonitorView::default(),
            compare: Vec::new(),
            compared: Vec::new(),
            compare_errors: Vec::new(),
            plotted: Vec::new(),
            resume_request: None,
            watcher_lang: None,
        }
    }

    /// Overlay `dir` on the plots (or stop overlaying it); the watcher reads it from now on.
    pub fn set_compared(&mut self, dir: &std::path::Path, on: bool) {
        let has = self.compare.iter().any(|d| d == dir);
        if on && !has {
            self.compare.push(dir.to_path_buf());
        } else if !on && has {
            self.compare.retain(|d| d != dir);
            self.compared.retain(|r| r.entry.dir != dir);
            self.compare_errors.retain(|(d, _)| d != dir);
        }
        let _ = self.watch.send(WatchCmd::Compare(self.compare.clone()));
    }

    /// Ask the next `start` to continue the stopped run `dir` instead of starting the form's.
    pub fn request_resume(&mut self, dir: PathBuf) {
        self.resume_request = Some(dir);
    }

    /// Start an RFFT run from the form in a new folder under the runs folder, and show it.
    pub fn start(
        &mut self,
        form: &mut FinetuneForm,
        manifest_dir: PathBuf,
        device: DeviceRequest,
        precision: Precision,
    ) {
        // Taken first: a request refused because a run is going must not turn a later Start
        // into a resume.
        let resume = self.resume_request.take();
        if self.job.is_some() {
            return;
        }
        self.job_errors.clear();
        let devices = match form.devices.trim() {
            "" => None,
            spec => match spec.parse::<crate::device::DeviceSet>() {
                Ok(set) => Some(set),
                Err(e) => {
                    super::common::push_error(&mut self.job_errors, crate::errors::render_chain(&e));
                    return;
                }
            },
        };
        let device = Target { device, devices };
        if let Some(dir) = resume {
            self.resume_run(dir, form, manifest_dir, device, precision);
            return;
        }
        let config = match config_from_form(form) {
            Ok(c) => c,
            Err(e) => {
                super::common::push_error(&mut self.job_errors, crate::errors::render_chain(&e));
                return;
            }
        };
        let name = if form.name.trim().is_empty() { "rfft" } else { form.name.trim() };
        let mut dir = form.runs_root.join(format!("{name}-{}", unix_secs()));
        let mut n = 1;
        while dir.exists() {
            n += 1;
            dir = form.runs_root.join(format!("{name}-{}-{n}", unix_secs()));
        }
        let _ = self.watch.send(WatchCmd::Root(form.runs_root.clone()));
        self.launch(config, dir, false, form, manifest_dir, device, precision);
    }

    /// Start the RFFT worker on run folder `dir` (`resume`: from its checkpoint) and show it.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &mut self,
        config: RfftConfig,
        dir: PathBuf,
        resume: bool,
        form: &mut FinetuneForm,
        manifest_dir: PathBuf,
        device: Target,
        precision: Precision,
    ) {
        self.job_outcome = None;
        let job = spawn_rfft_with(config, dir.clone(), resume, device.device, device.devices, precision, manifest_dir);
        self.job = Some(RunningRfft {
            job,
            dir: dir.clone(),
            paused: false,
            stopping: false,
        });
        form.selected = Some(dir.clone());
        self.select(Some(dir));
    }

    /// Continue the stopped run `dir` from its checkpoint with its own configuration: the same
    /// `resume_config` and `train` with `resume` that `rfstudio rfft --resume --run DIR` uses.
    fn resume_run(&mut self, dir: PathBuf, form: &mut FinetuneForm, manifest_dir: PathBuf, device: Target, precision: Precision) {
        let config = match resume_config(&dir) {
            Ok(c) => c,
            Err(e) => {
                super::common::push_error(&mut self.job_errors, crate::errors::render_chain(&e));
                return;
            }
        };
        self.launch(config, dir, true, form, manifest_dir, device, precision);
    }

    pub fn pause(&mut self) {
        if let Some(r) = &mut self.job {
            r.job.pause();
            r.paused = true;
        }
    }

    pub fn resume(&mut self) {
        if let Some(r) = &mut self.job {
            r.job.resume();
            r.paused = false;
        }
    }

    pub fn stop(&mut self) {
        if let Some(r) = &mut self.job {
            r.job.stop();
            r.stopping = true;
        }
    }

    /// Take the running job's events (the curves come from the run folder via the watcher).
    fn poll_job(&mut self, ctx: &egui::Context) {
        let Some(r) = &mut self.job else { return };
        // Read first: every event the worker sent before it finished is drained below.
        let finished = r.job.is_finished();
        let mut ended = false;
        while let Ok(ev) = r.job.events.try_recv() {
            match ev {
                RfftEvent::Paused { .. } => r.paused = true,
                RfftEvent::Resumed { .. } => r.paused = false,
                RfftEvent::Finished { step, status } => {
                    self.job_outcome = Some(tr!("finetune.outcome_at_step", status = status.display_name(), step = step));
                    ended = true;
                }
                RfftEvent::Failed { step, error } => {
                    super::common::push_error(&mut self.job_errors, tr!("finetune.err_run_failed", step = step, error = error));
                    self.job_outcome = Some(tr!("finetune.outcome_failed_at_step", step = step));
                    ended = true;
                }
                _ => {}
            }
        }
        if finished && !ended {
            super::common::push_error(&mut self.job_errors, tr!("finetune.err_no_result"));
            self.job_outcome = Some(tr!("finetune.outcome_failed").to_string());
            ended = true;
        }
        if ended {
            if let Some(r) = self.job.take() {
                r.job.join();
            }
        } else {
            // The worker has no wake-up hook: look again soon while it runs.
            ctx.request_repaint_after(Duration::from_millis(250));
        }
    }

    pub fn set_root(&mut self, root: PathBuf) {
        let _ = self.watch.send(WatchCmd::Root(root));
    }

    pub fn select(&mut self, dir: Option<PathBuf>) {
        self.run = None;
        self.eval_index = 0;
        self.follow_latest = true;
        self.errors.clear();
        let _ = self.watch.send(WatchCmd::Select(dir));
    }

    pub fn poll(&mut self, ctx: &egui::Context) {
        // The watcher writes the run status lines in the interface language.
        let lang = crate::i18n::current();
        if self.watcher_lang != Some(lang) {
            let _ = self.watch.send(WatchCmd::Lang(lang));
            self.watcher_lang = Some(lang);
        }
        self.poll_job(ctx);
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                WatchMsg::Runs(r) => self.runs = r,
                WatchMsg::Run(d) => {
                    if self.follow_latest {
                        self.eval_index = d.rfft_evals.len().saturating_sub(1);
                    }
                    self.errors.clear();
                    self.run = Some(*d);
                }
                WatchMsg::Error(e) => {
                    if !self.errors.contains(&e) {
                        super::common::push_error(&mut self.errors, e);
                    }
                }
                WatchMsg::Compared(d) => {
                    // A run unticked since the watcher read it is not shown again.
                    if self.compare.contains(&d.entry.dir) {
                        self.compare_errors.retain(|(dir, _)| *dir != d.entry.dir);
                        match self.compared.iter_mut().find(|r| r.entry.dir == d.entry.dir) {
                            Some(r) => *r = *d,
                            None => self.compared.push(*d),
                        }
                    }
                }
                WatchMsg::CompareError(dir, e) => {
                    if self.compare.contains(&dir) {
                        self.compared.retain(|r| r.entry.dir != dir);
                        self.compare_errors.retain(|(d, _)| *d != dir);
                        self.compare_errors.push((dir, e));
                    }
                }
            }
        }
    }
}

/// The Fine-tune tab.
pub fn finetune_ui(
    ui: &mut egui::Ui,
    state: &mut FinetuneState,
    form: &mut FinetuneForm,
    images: &mut ImageCache,
) -> Vec<FinetuneCommand> {
    let mut cmds = Vec::new();
    egui::Panel::left("finetune-side").resizable(true).default_size(320.0).show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| {
            ui.heading(tr!("finetune.new_run"));
            form_ui(ui, state, form, &mut cmds);
            ui.separator();
            ui.heading(tr!("finetune.runs"));
            ui.horizontal(|ui| {
                if path_edit(ui, &mut form.runs_root, 190.0).lost_focus() {
                    cmds.push(FinetuneCommand::SetRoot);
                }
                if ui.small_button("…").clicked() {
                    cmds.push(FinetuneCommand::Pick(PickTarget::RunsRoot));
                }
            });
            if state.runs.is_empty() {
                ui.label(RichText::new(tr!("finetune.no_runs", path = form.runs_root.display())).weak());
            }
            let mut toggles = Vec::new();
            for r in &state.runs {
                let selected = form.selected.as_ref() == Some(&r.dir);
                let text = format!("{} — {} · {}", r.name, kind_name(r.kind), r.status);
                ui.horizontal(|ui| {
                    // The tick overlays the run on the selected run's plots; the selected run is
                    // always plotted (colour 0).
                    let at = state.compare.iter().position(|d| *d == r.dir);
                    let mut on = selected || at.is_some();
                    let tick = ui
                        .add_enabled(!selected, egui::Checkbox::without_text(&mut on))
                        .on_hover_text(tr!("finetune.overlay_hint", name = r.name))
                        .on_disabled_hover_text(tr!("finetune.overlay_selected"));
                    if tick.changed() {
                        toggles.push((r.dir.clone(), on));
                    }
                    let colour = if selected { Some(0) } else { at.map(|i| i + 1) };
                    if let Some(i) = colour {
                        ui.label(RichText::new("■").color(run_colour(i)));
                    }
                    if ui.selectable_label(selected, text).clicked() && !selected {
                        cmds.push(FinetuneCommand::Select(r.dir.clone()));
                    }
                });
            }
            for (dir, on) in toggles {
                state.set_compared(&dir, on);
            }
        });
    });
    egui::CentralPanel::default_margins().show(ui, |ui| {
        super::common::errors_ui(ui, &mut state.errors, egui::Align2::RIGHT_BOTTOM);
        let Some(kind) = state.run.as_ref().map(|r| r.entry.kind) else {
            ui.label(tr!("finetune.select_run"));
            return;
        };
        state.plotted.clear();
        egui::ScrollArea::vertical().show(ui, |ui| {
            if let Some(run) = &state.run {
                let running = state.job.is_some();
                if header_ui(ui, run, running) {
                    state.request_resume(run.entry.dir.clone());
                    cmds.push(FinetuneCommand::Start);
                }
            }
            match kind {
                RunKind::Rfft => rfft_ui(ui, state, images),
                RunKind::Rfnet => rfnet_ui(ui, state),
            }
        });
    });
    cmds
}

/// The run's name, status and hyperparameters, with the Resume run button for a stopped RFFT
/// run; true when that button was pressed.
fn header_ui(ui: &mut egui::Ui, run: &RunData, job_running: bool) -> bool {
    let mut resume = false;
    ui.horizontal(|ui| {
        ui.heading(&run.entry.name);
        ui.label(tr!("finetune.run_line", kind = kind_name(run.entry.kind), status = run.entry.status, points = run.points()));
        if run.entry.kind == RunKind::Rfft {
            let resumable = run.resumable();
            let why = if job_running {
                tr!("finetune.resume_busy")
            } else if !resumable {
                tr!("finetune.resume_not_resumable")
            } else {
                ""
            };
            let r = ui
                .add_enabled(resumable && !job_running, egui::Button::new(tr!("finetune.resume_run")))
                .on_hover_text(tr!("finetune.resume_run_hint"))
                .on_disabled_hover_text(why);
            resume = r.clicked();
        }
    });
    if let Some(devices) = run.state.as_ref().and_then(|s| s.devices.as_deref()) {
        ui.label(tr!("finetune.devices_line", devices = devices));
    }
    if run.bad_lines > 0 {
        error_label(ui, &tr!("finetune.bad_lines", n = run.bad_lines));
    }
    egui::CollapsingHeader::new(tr!("finetune.hyperparameters")).default_open(false).show(ui, |ui| {
        egui::Grid::new("hyper").striped(true).show(ui, |ui| {
            for (k, v) in &run.hyperparameters {
                ui.label(k);
                ui.label(v);
                ui.end_row();
            }
        });
    });
    resume
}

fn form_ui(ui: &mut egui::Ui, state: &mut FinetuneState, form: &mut FinetuneForm, cmds: &mut Vec<FinetuneCommand>) {
    let running = state.job.as_ref();
    ui.horizontal(|ui| {
        if ui.add_enabled(running.is_none(), egui::Button::new(tr!("finetune.start"))).clicked() {
            cmds.push(FinetuneCommand::Start);
        }
        let paused = running.is_some_and(|r| r.paused);
        if ui.add_enabled(running.is_some() && !paused, egui::Button::new(tr!("finetune.pause"))).clicked() {
            cmds.push(FinetuneCommand::Pause);
        }
        if ui.add_enabled(paused, egui::Button::new(tr!("finetune.resume"))).clicked() {
            cmds.push(FinetuneCommand::Resume);
        }
        if ui.add_enabled(running.is_some_and(|r| !r.stopping), egui::Button::new(tr!("finetune.stop"))).clicked() {
            cmds.push(FinetuneCommand::Stop);
        }
    });
    match (running, &state.job_outcome) {
        (Some(r), _) => {
            let what = if r.stopping {
                tr!("finetune.job_stopping")
            } else if r.paused {
                tr!("finetune.job_paused")
            } else {
                tr!("finetune.job_running")
            };
            ui.label(tr!("finetune.job_line", what = what, dir = r.dir.display()));
        }
        (None, Some(o)) => {
            ui.label(tr!("finetune.last_run", outcome = o));
        }
        _ => {}
    }
    // Errors belong to the form they came from: a changed form clears them.
    let shape = serde_json::to_string(&*form).unwrap_or_default();
    if state.job_errors_for.as_deref() != Some(shape.as_str()) {
        if state.job_errors_for.is_some() && state.job.is_none() {
            state.job_errors.clear();
        }
        state.job_errors_for = Some(shape);
    }
    super::common::errors_ui(ui, &mut state.job_errors, egui::Align2::RIGHT_BOTTOM);
    ui.separator();
    ui.horizontal_wrapped(|ui| {
        ui.label(tr!("finetune.add_sample"));
        for (path, s) in &state.samples {
            if ui.small_button(&s.id).clicked() {
                cmds.push(FinetuneCommand::AddSample(path.clone()));
            }
        }
    });
    ui.horizontal(|ui| {
        ui.label(tr!("finetune.products", n = form.products.len()));
        if ui.small_button(tr!("finetune.add_products")).clicked() {
            cmds.push(FinetuneCommand::Pick(PickTarget::FinetuneProducts));
        }
        if ui.small_button(tr!("finetune.clear_products")).clicked() {
            form.products.clear();
        }
    });
    for p in &form.products {
        ui.label(RichText::new(p.display().to_string()).small());
    }
    ui.label(tr!("finetune.prompts"));
    ui.add(egui::TextEdit::multiline(&mut form.prompts).desired_rows(3).desired_width(f32::INFINITY));
    egui::Grid::new("rfft-form").num_columns(2).show(ui, |ui| {
        ui.label(tr!("finetune.name"));
        ui.text_edit_singleline(&mut form.name);
        ui.end_row();
        ui.label(tr!("finetune.regularisation"));
        egui::ComboBox::from_id_salt("reg").selected_text(form.reg.label()).show_ui(ui, |ui| {
            for r in Regularisation::ALL {
                ui.selectable_value(&mut form.reg, r, r.label());
            }
        });
        ui.end_row();
        ui.label("β");
        ui.add(egui::DragValue::new(&mut form.beta).speed(0.05).range(0.0..=100.0));
        ui.end_row();
        ui.label(tr!("finetune.learning_rate"));
        // Learning rates span 1e-7..1e-2: shown in scientific notation (a fixed 6 decimals
        // shows 1e-7 as 0.000000).
        ui.add(
            egui::DragValue::new(&mut form.lr)
                .speed(1e-6)
                .range(0.0..=1.0)
                .custom_formatter(|v, _| format!("{v:e}"))
                .custom_parser(|t| t.trim().parse::<f64>().ok()),
        );
        ui.end_row();
        ui.label(tr!("finetune.steps"));
        ui.add(egui::DragValue::new(&mut form.steps).range(1..=1_000_000));
        ui.end_row();
        ui.label(tr!("finetune.eval_every"));
        ui.add(egui::DragValue::new(&mut form.eval_every).range(1..=100_000));
        ui.end_row();
        ui.label(tr!("finetune.lora_rank"));
        ui.add(egui::DragValue::new(&mut form.lora_rank).range(0..=256))
            .on_hover_text(tr!("finetune.lora_rank_hint"));
        ui.end_row();
        ui.label(tr!("finetune.seed"));
        ui.add(egui::DragValue::new(&mut form.seed));
        ui.end_row();
        ui.label(tr!("finetune.image_size"));
        ui.add(egui::DragValue::new(&mut form.image_size).range(64..=1024).speed(64));
        ui.end_row();
        ui.label(tr!("finetune.sampling_steps"));
        ui.add(egui::DragValue::new(&mut form.sample_steps).range(1..=1000));
        ui.end_row();
        ui.label(tr!("finetune.last_steps"));
        ui.add(egui::DragValue::new(&mut form.last_steps).range(1..=1000));
        ui.end_row();
        ui.label(tr!("finetune.batch"));
        ui.horizontal(|ui| {
            ui.add(egui::DragValue::new(&mut form.batch).range(1..=64));
            ui.label(tr!("finetune.grad_accum"));
            ui.add(egui::DragValue::new(&mut form.grad_accum).range(1..=64))
                .on_hover_text(tr!("finetune.grad_accum_hint"));
        });
        ui.end_row();
        ui.label(tr!("finetune.devices"));
        ui.add(egui::TextEdit::singleline(&mut form.devices).hint_text(tr!("finetune.devices_placeholder")))
            .on_hover_text(tr!("finetune.devices_hint"));
        ui.end_row();
    });
}

/// The selected run (colour 0) and the compared runs of the same kind (colour = tick order + 1)
/// that have been read.
fn plotted_runs<'a>(state: &'a FinetuneState, primary: &'a RunData) -> Vec<(&'a RunData, egui::Color32)> {
    let mut out = vec![(primary, run_colour(0))];
    for (i, dir) in state.compare.iter().enumerate() {
        if *dir == primary.entry.dir {
            continue;
        }
        if let Some(r) = state.compared.iter().find(|r| r.entry.dir == *dir && r.entry.kind == primary.entry.kind) {
            out.push((r, run_colour(i + 1)));
        }
    }
    out
}

/// One curve per run of `f`'s `[step, value]` points on the view's x axis; runs that cannot be
/// placed on it (no step times) are named in `skipped`.
fn curves(
    runs: &[(&RunData, egui::Color32)],
    view: &MonitorView,
    suffix: &str,
    skipped: &mut Vec<String>,
    f: impl Fn(&RunData) -> Vec<[f64; 2]>,
) -> Vec<Curve> {
    runs.iter()
        .filter_map(|(run, colour)| {
            let times = wall_times(run);
            match on_x_axis(f(run), times.as_deref(), view.x_axis) {
                Some(points) => Some(Curve {
                    name: format!("{}{suffix}", run.entry.name),
                    colour: *colour,
                    points,
                }),
                None => {
                    if !skipped.contains(&run.entry.name) {
                        skipped.push(run.entry.name.clone());
                    }
                    None
                }
            }
        })
        .collect()
}

/// Runs that could not be drawn: compared runs of the other kind or unreadable, and runs
/// without step times on the wall-clock axis.
fn comparison_notes(ui: &mut egui::Ui, state: &FinetuneState, primary: &RunData, skipped: &[String]) {
    let other_kind: Vec<&str> = state
        .compared
        .iter()
        .filter(|r| r.entry.kind != primary.entry.kind && state.compare.contains(&r.entry.dir))
        .map(|r| r.entry.name.as_str())
        .collect();
    if !other_kind.is_empty() {
        ui.label(
            RichText::new(tr!("finetune.not_overlaid", name = primary.entry.name, runs = other_kind.join(", ")))
                .small()
                .weak(),
        );
    }
    for (dir, e) in &state.compare_errors {
        error_label(ui, &format!("{}: {e}", dir.display()));
    }
    if !skipped.is_empty() {
        ui.label(
            RichText::new(tr!("finetune.no_step_times", runs = skipped.join(", ")))
                .small()
                .weak(),
        );
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn rfft_ui(ui: &mut egui::Ui, state: &mut FinetuneState, images: &mut ImageCache) {
    let Some(run) = &state.run else { return };
    let wall_why = wall_time_unavailable(run);
    let mut view = state.view;
    view_controls(ui, &mut view, wall_why);
    let runs = plotted_runs(state, run);
    let reg_name = run
        .hyperparameters
        .iter()
        .find(|(k, _)| k == "reg")
        .map(|(_, v)| match v.as_str() {
            "cc" => "L_CC",
            "kl" => "KL",
            _ => tr!("finetune.plot_reg"),
        })
        .unwrap_or("L_CC");
    let steps = |f: fn(&StepMetrics) -> f64| move |r: &RunData| r.rfft_steps.iter().map(|s| [s.step as f64, f(s)]).collect::<Vec<_>>();
    let loss = PlotStyle { smooth: true, log: true, link: true, height: 150.0 };
    let mut skipped = Vec::new();
    let mut drawn = Vec::new();
    let plots: [(&str, &str, fn(&StepMetrics) -> f64); 4] = [
        ("rfft-f-ac", "F_AC", |s| s.f_ac),
        ("rfft-reg", reg_name, |s| s.reg),
        ("rfft-total", tr!("finetune.plot_total_loss"), |s| s.total),
        ("rfft-grad-norm", tr!("finetune.plot_grad_norm"), |s| s.grad_norm),
    ];
    for (id, title, f) in plots {
        let c = curves(&runs, &view, "", &mut skipped, steps(f));
        metric_plot(ui, id, title, c, loss, &view, &mut drawn);
    }
    let avail = curves(&runs, &view, "", &mut skipped, |r| {
        r.rfft_evals.iter().map(|e| [e.step as f64, e.availability_rate]).collect()
    });
    metric_plot(
        ui,
        "rfft-availability",
        tr!("finetune.plot_availability"),
        avail,
        PlotStyle { smooth: false, log: false, link: true, height: 140.0 },
        &view,
        &mut drawn,
    );
    // Memory in MiB: the process's resident set (older runs: the CPU backend's peak) and, on
    // GPU backends, the bytes of live tensors.
    let resident = format!(" · {}", tr!("finetune.resident"));
    let mut memory = curves(&runs, &view, &resident, &mut skipped, |r| {
        r.rfft_steps
            .iter()
            .filter_map(|s| s.resident_bytes.or(s.memory_bytes).map(|b| [s.step as f64, b as f64 / MIB]))
            .collect()
    });
    let gpu = curves(&runs, &view, " · GPU", &mut skipped, |r| {
        r.rfft_steps.iter().filter_map(|s| s.device_bytes.map(|b| [s.step as f64, b as f64 / MIB])).collect()
    });
    memory.extend(gpu.into_iter().map(|c| Curve { colour: c.colour.gamma_multiply(0.6), ..c }));
    memory.retain(|c| !c.points.is_empty());
    let memory_title = tr!("finetune.plot_memory", unit = "MiB");
    if memory.is_empty() {
        ui.label(RichText::new(&memory_title).strong());
        ui.label(RichText::new(tr!("finetune.no_memory")).small().weak());
    } else {
        metric_plot(
            ui,
            "rfft-memory",
            &memory_title,
            memory,
            PlotStyle { smooth: false, log: false, link: true, height: 140.0 },
            &view,
            &mut drawn,
        );
    }
    comparison_notes(ui, state, run, &skipped);
    if let Some(last) = run.rfft_steps.last() {
        let mib = |b: Option<u64>, what: &str| b.map(|b| format!(" · {what} {}", crate::models::manifest::human_bytes(b))).unwrap_or_default();
        ui.label(
            RichText::new(tr!(
                "finetune.last_step",
                step = last.step,
                grad = format!("{:.3e}", last.grad_norm),
                secs = format!("{:.2}", last.step_time_s),
                lr = format!("{:.2e}", last.lr),
                resident = mib(last.resident_bytes.or(last.memory_bytes), tr!("finetune.resident")),
                gpu = mib(last.device_bytes, "GPU"),
            ))
            .small(),
        );
    }
    state.view = view;
    state.plotted = drawn;
    let Some(run) = &state.run else { return };
    if run.rfft_evals.is_empty() {
        return;
    }
    ui.separator();
    let n = run.rfft_evals.len();
    ui.horizontal(|ui| {
        ui.label(tr!("finetune.eval_step"));
        let mut i = state.eval_index.min(n - 1);
        let steps: Vec<usize> = run.rfft_evals.iter().map(|e| e.step).collect();
        if ui
            .add(egui::Slider::new(&mut i, 0..=n - 1).custom_formatter(|v, _| {
                steps.get(v as usize).map(|s| s.to_string()).unwrap_or_default()
            }))
            .changed()
        {
            state.follow_latest = i == n - 1;
        }
        state.eval_index = i;
    });
    let Some(eval) = run.rfft_evals.get(state.eval_index) else { return };
    ui.label(tr!(
        "finetune.eval_line",
        step = eval.step,
        rate = format!("{:.0}", eval.availability_rate * 100.0),
        f_ac = format!("{:.4}", eval.mean_f_ac),
    ));
    if !eval.grid.is_empty() {
        eval_grid_ui(ui, images, &run.entry.dir, eval);
    }
    egui::Grid::new("eval-samples").striped(true).show(ui, |ui| {
        for s in &eval.samples {
            ui.label(&s.product);
            ui.label(tr!("finetune.seed_n", seed = s.seed));
            ui.label(if s.available { tr!("finetune.available") } else { tr!("finetune.not_available") });
            ui.vertical(|ui| {
                probability_bars(ui, &s.probs, 220.0, None);
            });
            ui.end_row();
        }
    });
}

/// The eval grid image cut into its cells (a row per eval product, a column per seed), each
/// labelled with its product, seed and P(Available).
fn eval_grid_ui(ui: &mut egui::Ui, images: &mut ImageCache, run_dir: &std::path::Path, eval: &EvalMetrics) {
    let key = images.request_file(&run_dir.join(&eval.grid));
    let cols = eval.columns();
    let rows = eval.samples.len().div_ceil(cols);
    let Some(tex) = images.texture(&key).filter(|_| rows > 0) else {
        show_key(ui, images, &key, Vec2::new(ui.available_width().min(720.0), 240.0));
        return;
    };
    let size = tex.size_vec2();
    let cell = Vec2::new(size.x / cols as f32, size.y / rows as f32);
    let width = ((ui.available_width() - 40.0) / cols as f32).clamp(64.0, 192.0);
    let shown = cell * (width / cell.x.max(1.0));
    egui::Grid::new("eval-grid").spacing(Vec2::new(6.0, 6.0)).show(ui, |ui| {
        for r in 0..rows {
            for c in 0..cols {
                let Some(s) = eval.samples.get(r * cols + c) else { continue };
                ui.vertical(|ui| {
                    let uv = egui::Rect::from_min_max(
                        egui::pos2(c as f32 / cols as f32, r as f32 / rows as f32),
                        egui::pos2((c + 1) as f32 / cols as f32, (r + 1) as f32 / rows as f32),
                    );
                    ui.add(egui::Image::new(egui::load::SizedTexture::new(tex.id(), shown)).uv(uv));
                    ui.label(RichText::new(format!("{} · {}", s.product, tr!("finetune.seed_n", seed = s.seed))).small());
                    let mark = if s.available { "✔" } else { "✘" };
                    ui.label(RichText::new(format!("P({}) {:.2} {mark}", class_name(0), s.probs[0])).small().weak());
                });
            }
            ui.end_row();
        }
    });
}

fn rfnet_ui(ui: &mut egui::Ui, state: &mut FinetuneState) {
    let Some(run) = &state.run else { return };
    let mut view = state.view;
    view_controls(ui, &mut view, wall_time_unavailable(run));
    let runs = plotted_runs(state, run);
    let mut skipped = Vec::new();
    let mut drawn = Vec::new();
    let style = PlotStyle { smooth: true, log: true, link: true, height: 180.0 };
    let loss = curves(&runs, &view, "", &mut skipped, |r| r.rfnet_steps.iter().map(|s| [s.step as f64, s.loss]).collect());
    metric_plot(ui, "rfnet-loss", tr!("finetune.plot_rfnet_loss"), loss, style, &view, &mut drawn);
    let acc = curves(&runs, &view, "", &mut skipped, |r| r.rfnet_steps.iter().map(|s| [s.step as f64, s.accuracy]).collect());
    metric_plot(ui, "rfnet-accuracy", tr!("finetune.plot_rfnet_accuracy"), acc, PlotStyle { log: false, ..style }, &view, &mut drawn);
    // Per epoch: the selected run's curves (runs compared per step above).
    let e = &run.rfnet_epochs;
    let epoch = |name: &str, i: usize, f: fn(&crate::train::run_folder::RfnetEpoch) -> f64| Curve {
        name: name.to_string(),
        colour: run_colour(i),
        points: e.iter().map(|x| [x.epoch as f64, f(x)]).collect(),
    };
    let epochs = vec![
        epoch(tr!("finetune.series_train_loss"), 0, |x| x.train_loss),
        epoch(tr!("finetune.series_val_loss"), 1, |x| x.val_loss),
        epoch(tr!("finetune.series_val_accuracy"), 2, |x| x.val_accuracy),
        epoch(tr!("finetune.series_val_f1"), 3, |x| x.val_macro_f1),
    ];
    let per_epoch = PlotStyle { smooth: false, log: false, link: false, height: 180.0 };
    metric_plot(ui, "rfnet-epochs", tr!("finetune.plot_per_epoch"), epochs, per_epoch, &MonitorView { x_axis: XAxis::Step, ..view }, &mut drawn);
    comparison_notes(ui, state, run, &skipped);
    if let Some(last) = run.rfnet_epochs.last() {
        ui.label(tr!(
            "finetune.epoch_line",
            epoch = last.epoch,
            acc = format!("{:.3}", last.val_accuracy),
            f1 = format!("{:.3}", last.val_macro_f1),
            secs = format!("{:.1}", last.seconds),
        ));
    }
    state.view = view;
    state.plotted = drawn;
}

//! The Fine-tune tab: the RFFT run form, the list of run folders (RFFT and RFNet training) with
//! their hyperparameters, live curves (egui_plot) and the eval-sample grid per eval step. A
//! watcher thread (`runs::spawn_watcher`) reads the run folders; this file only keeps state and
//! draws.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use egui::{RichText, Vec2};
use egui_plot::{Legend, Line, Plot, PlotPoints};

use super::common::{PickTarget, error_label, path_edit};
use super::generate::probability_bars;
use super::images::{ImageCache, show_key};
use super::runs::{WatchCmd, WatchMsg, spawn_watcher};
use crate::train::run_folder::{RunData, RunEntry, RunKind, StepMetrics};
use super::common::unix_secs;
use super::generate::sample_products;
use super::settings::{FinetuneForm, Regularisation};
use crate::device::{DeviceRequest, Precision};
use super::error::FormError;
use crate::train::rfft::{RfftConfig, RfftEvent, RfftJob, spawn_rfft_with};

pub enum FinetuneCommand {
    SetRoot,
    Select(PathBuf),
    Pick(PickTarget),
    AddSample(PathBuf),
    Start,
    Pause,
    Resume,
    Stop,
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
    Ok(RfftConfig::from_toml(&t.to_string(), "the Fine-tune form")?)
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
        }
    }

    /// Start an RFFT run from the form in a new folder under the runs folder, and show it.
    pub fn start(
        &mut self,
        form: &mut FinetuneForm,
        manifest_dir: PathBuf,
        device: DeviceRequest,
        precision: Precision,
    ) {
        if self.job.is_some() {
            return;
        }
        self.job_errors.clear();
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
        self.job_outcome = None;
        let job = spawn_rfft_with(config, dir.clone(), false, device, precision, manifest_dir);
        self.job = Some(RunningRfft {
            job,
            dir: dir.clone(),
            paused: false,
            stopping: false,
        });
        form.selected = Some(dir.clone());
        let _ = self.watch.send(WatchCmd::Root(form.runs_root.clone()));
        self.select(Some(dir));
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
                    self.job_outcome = Some(format!("{status:?} at step {step}").to_lowercase());
                    ended = true;
                }
                RfftEvent::Failed { step, error } => {
                    super::common::push_error(&mut self.job_errors, format!("RFFT run failed at step {step}: {error}"));
                    self.job_outcome = Some(format!("failed at step {step}"));
                    ended = true;
                }
                _ => {}
            }
        }
        if finished && !ended {
            super::common::push_error(&mut self.job_errors, "the RFFT worker ended without a result");
            self.job_outcome = Some("failed".into());
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
            }
        }
    }
}

fn line(name: &str, pts: Vec<[f64; 2]>) -> Line<'static> {
    Line::new(name.to_string(), PlotPoints::new(pts))
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
            ui.heading("New RFFT run");
            form_ui(ui, state, form, &mut cmds);
            ui.separator();
            ui.heading("Runs");
            ui.horizontal(|ui| {
                if path_edit(ui, &mut form.runs_root, 190.0).lost_focus() {
                    cmds.push(FinetuneCommand::SetRoot);
                }
                if ui.small_button("…").clicked() {
                    cmds.push(FinetuneCommand::Pick(PickTarget::RunsRoot));
                }
            });
            if state.runs.is_empty() {
                ui.label(RichText::new(format!("no run folders in {}", form.runs_root.display())).weak());
            }
            for r in &state.runs {
                let selected = form.selected.as_ref() == Some(&r.dir);
                let text = format!("{} — {} · {}", r.name, r.kind.name(), r.status);
                if ui.selectable_label(selected, text).clicked() && !selected {
                    cmds.push(FinetuneCommand::Select(r.dir.clone()));
                }
            }
        });
    });
    egui::CentralPanel::default_margins().show(ui, |ui| {
        for e in &state.errors {
            error_label(ui, e);
        }
        let Some(kind) = state.run.as_ref().map(|r| r.entry.kind) else {
            ui.label("Select a run folder on the left to see its curves.");
            return;
        };
        egui::ScrollArea::vertical().show(ui, |ui| {
            if let Some(run) = &state.run {
                header_ui(ui, run);
            }
            match kind {
                RunKind::Rfft => rfft_ui(ui, state, images),
                RunKind::Rfnet => {
                    if let Some(run) = &state.run {
                        rfnet_ui(ui, run);
                    }
                }
            }
        });
    });
    cmds
}

fn header_ui(ui: &mut egui::Ui, run: &RunData) {
    ui.horizontal(|ui| {
        ui.heading(&run.entry.name);
        ui.label(format!("{} · {} · {} points", run.entry.kind.name(), run.entry.status, run.points()));
    });
    if run.bad_lines > 0 {
        error_label(ui, &format!("{} unreadable metrics line(s) skipped", run.bad_lines));
    }
    egui::CollapsingHeader::new("Hyperparameters").default_open(false).show(ui, |ui| {
        egui::Grid::new("hyper").striped(true).show(ui, |ui| {
            for (k, v) in &run.hyperparameters {
                ui.label(k);
                ui.label(v);
                ui.end_row();
            }
        });
    });
}

fn form_ui(ui: &mut egui::Ui, state: &mut FinetuneState, form: &mut FinetuneForm, cmds: &mut Vec<FinetuneCommand>) {
    let running = state.job.as_ref();
    ui.horizontal(|ui| {
        if ui.add_enabled(running.is_none(), egui::Button::new("Start")).clicked() {
            cmds.push(FinetuneCommand::Start);
        }
        let paused = running.is_some_and(|r| r.paused);
        if ui.add_enabled(running.is_some() && !paused, egui::Button::new("Pause")).clicked() {
            cmds.push(FinetuneCommand::Pause);
        }
        if ui.add_enabled(paused, egui::Button::new("Resume")).clicked() {
            cmds.push(FinetuneCommand::Resume);
        }
        if ui.add_enabled(running.is_some_and(|r| !r.stopping), egui::Button::new("Stop")).clicked() {
            cmds.push(FinetuneCommand::Stop);
        }
    });
    match (running, &state.job_outcome) {
        (Some(r), _) => {
            let what = if r.stopping {
                "stopping (finishing the step, writing a checkpoint)…"
            } else if r.paused {
                "paused"
            } else {
                "running"
            };
            ui.label(format!("{what}: {}", r.dir.display()));
        }
        (None, Some(o)) => {
            ui.label(format!("last run: {o}"));
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
        ui.label("Add a sample:");
        for (path, s) in &state.samples {
            if ui.small_button(&s.id).clicked() {
                cmds.push(FinetuneCommand::AddSample(path.clone()));
            }
        }
    });
    ui.horizontal(|ui| {
        ui.label(format!("Products ({})", form.products.len()));
        if ui.small_button("Add…").clicked() {
            cmds.push(FinetuneCommand::Pick(PickTarget::FinetuneProducts));
        }
        if ui.small_button("Clear").clicked() {
            form.products.clear();
        }
    });
    for p in &form.products {
        ui.label(RichText::new(p.display().to_string()).small());
    }
    ui.label("Prompts (one per line)");
    ui.add(egui::TextEdit::multiline(&mut form.prompts).desired_rows(3).desired_width(f32::INFINITY));
    egui::Grid::new("rfft-form").num_columns(2).show(ui, |ui| {
        ui.label("Name");
        ui.text_edit_singleline(&mut form.name);
        ui.end_row();
        ui.label("Regularisation");
        egui::ComboBox::from_id_salt("reg").selected_text(form.reg.label()).show_ui(ui, |ui| {
            for r in Regularisation::ALL {
                ui.selectable_value(&mut form.reg, r, r.label());
            }
        });
        ui.end_row();
        ui.label("β");
        ui.add(egui::DragValue::new(&mut form.beta).speed(0.05).range(0.0..=100.0));
        ui.end_row();
        ui.label("Learning rate");
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
        ui.label("Steps");
        ui.add(egui::DragValue::new(&mut form.steps).range(1..=1_000_000));
        ui.end_row();
        ui.label("Eval every");
        ui.add(egui::DragValue::new(&mut form.eval_every).range(1..=100_000));
        ui.end_row();
        ui.label("LoRA rank");
        ui.add(egui::DragValue::new(&mut form.lora_rank).range(0..=256))
            .on_hover_text("0 fine-tunes the whole ControlNet (the paper's setting); 1-256 trains LoRA adapters of that rank");
        ui.end_row();
        ui.label("Seed");
        ui.add(egui::DragValue::new(&mut form.seed));
        ui.end_row();
        ui.label("Image size");
        ui.add(egui::DragValue::new(&mut form.image_size).range(64..=1024).speed(64));
        ui.end_row();
        ui.label("Sampling steps");
        ui.add(egui::DragValue::new(&mut form.sample_steps).range(1..=1000));
        ui.end_row();
        ui.label("Last steps (gradient)");
        ui.add(egui::DragValue::new(&mut form.last_steps).range(1..=1000));
        ui.end_row();
        ui.label("Batch");
        ui.add(egui::DragValue::new(&mut form.batch).range(1..=64));
        ui.end_row();
    });
}

fn rfft_ui(ui: &mut egui::Ui, state: &mut FinetuneState, images: &mut ImageCache) {
    let Some(run) = &state.run else { return };
    let s = &run.rfft_steps;
    let pts = |f: fn(&StepMetrics) -> f64| s.iter().map(|r| [r.step as f64, f(r)]).collect::<Vec<_>>();
    let reg_name = run
        .hyperparameters
        .iter()
        .find(|(k, _)| k == "reg")
        .map(|(_, v)| match v.as_str() {
            "cc" => "L_CC",
            "kl" => "KL",
            _ => "reg",
        })
        .unwrap_or("L_CC");
    ui.label(RichText::new("Losses").strong());
    Plot::new("rfft-losses")
        .height(220.0)
        .legend(Legend::default())
        .x_axis_label("step")
        .show(ui, |p| {
            p.line(line("F_AC", pts(|r| r.f_ac)));
            p.line(line(reg_name, pts(|r| r.reg)));
            p.line(line("total", pts(|r| r.total)));
        });
    ui.label(RichText::new("Availability rate on the eval products").strong());
    let avail: Vec<[f64; 2]> = run.rfft_evals.iter().map(|e| [e.step as f64, e.availability_rate]).collect();
    Plot::new("rfft-availability")
        .height(160.0)
        .legend(Legend::default())
        .x_axis_label("step")
        .include_y(0.0)
        .include_y(1.0)
        .show(ui, |p| {
            p.line(line("availability rate", avail));
        });
    if let Some(last) = s.last() {
        ui.label(
            RichText::new(format!(
                "last step {}: grad norm {:.3e} · {:.2} s/step · lr {:.2e}{}",
                last.step,
                last.grad_norm,
                last.step_time_s,
                last.lr,
                last.memory_bytes
                    .map(|m| format!(" · {}", crate::models::manifest::human_bytes(m)))
                    .unwrap_or_default()
            ))
            .small(),
        );
    }
    if run.rfft_evals.is_empty() {
        return;
    }
    ui.separator();
    let n = run.rfft_evals.len();
    ui.horizontal(|ui| {
        ui.label("Eval step");
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
    let Some(run) = &state.run else { return };
    let Some(eval) = run.rfft_evals.get(state.eval_index) else { return };
    ui.label(format!(
        "step {}: availability {:.0}% · mean F_AC {:.4}",
        eval.step,
        eval.availability_rate * 100.0,
        eval.mean_f_ac
    ));
    if !eval.grid.is_empty() {
        let key = images.request_file(&run.entry.dir.join(&eval.grid));
        show_key(ui, images, &key, Vec2::new(ui.available_width().min(720.0), 360.0));
    }
    egui::Grid::new("eval-samples").striped(true).show(ui, |ui| {
        for s in &eval.samples {
            ui.label(&s.product);
            ui.label(format!("seed {}", s.seed));
            ui.label(if s.available { "available" } else { "not available" });
            ui.vertical(|ui| {
                probability_bars(ui, &s.probs, 220.0, None);
            });
            ui.end_row();
        }
    });
}

fn rfnet_ui(ui: &mut egui::Ui, run: &RunData) {
    ui.label(RichText::new("Training loss and accuracy per step").strong());
    Plot::new("rfnet-steps")
        .height(220.0)
        .legend(Legend::default())
        .x_axis_label("step")
        .show(ui, |p| {
            p.line(line("loss", run.rfnet_steps.iter().map(|s| [s.step as f64, s.loss]).collect()));
            p.line(line("accuracy", run.rfnet_steps.iter().map(|s| [s.step as f64, s.accuracy]).collect()));
        });
    ui.label(RichText::new("Per epoch").strong());
    Plot::new("rfnet-epochs")
        .height(180.0)
        .legend(Legend::default())
        .x_axis_label("epoch")
        .show(ui, |p| {
            let e = &run.rfnet_epochs;
            p.line(line("train loss", e.iter().map(|x| [x.epoch as f64, x.train_loss]).collect()));
            p.line(line("val loss", e.iter().map(|x| [x.epoch as f64, x.val_loss]).collect()));
            p.line(line("val accuracy", e.iter().map(|x| [x.epoch as f64, x.val_accuracy]).collect()));
            p.line(line("val macro-F1", e.iter().map(|x| [x.epoch as f64, x.val_macro_f1]).collect()));
        });
    if let Some(last) = run.rfnet_epochs.last() {
        ui.label(format!(
            "epoch {}: val accuracy {:.3} · val macro-F1 {:.3} · {:.1} s",
            last.epoch, last.val_accuracy, last.val_macro_f1, last.seconds
        ));
    }
}

//! The Models tab and the model resolution every tab relies on: which manifest is in use (the
//! configured one, or the tiny random-weight models in demo mode), what `rfstudio info` reports
//! about the device and every role. Checking runs on a helper thread (it probes GPUs and reads
//! safetensors headers).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, channel};

use egui::{Color32, RichText};

use super::common::{error_label, path_edit};
use crate::files::bundled;
use super::error::{NotReady, UiError};
use super::settings::Settings;
use crate::pipeline::info::{InfoReport, gather};
use crate::device::{DeviceRequest, Precision, Selection};
use crate::models::manifest::{Manifest, Role, RoleReport, Status};

/// The banner shown while the studio runs on random test weights.
pub const DEMO_BANNER: &str = "random test weights — images are noise; see Models to install real ones";

/// The manifest in use and why.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub manifest: Manifest,
    /// The configured manifest's report (what is missing there), even in demo mode.
    pub configured: Vec<RoleReport>,
    /// The report of the manifest in use.
    pub in_use: Vec<RoleReport>,
    /// Running on the tiny random-weight models (or a manifest marked `test_weights`).
    pub demo: bool,
    /// Why demo mode was chosen.
    pub demo_reason: Option<String>,
    pub models_readme: Option<String>,
}

/// Resolve the models for the studio: the configured manifest with the per-role overrides; when
/// its base or ControlNet model is not usable, the tiny models (demo mode).
pub fn resolve(models_dir: &Path, overrides: &std::collections::BTreeMap<Role, PathBuf>) -> Result<Resolved, UiError> {
    let mut configured = Manifest::load(models_dir)?;
    for (role, p) in overrides {
        configured.set(*role, p.clone());
    }
    let reports = configured.check_all();
    let readme = std::fs::read_to_string(models_dir.join("README.md"))
        .or_else(|_| std::fs::read_to_string(bundled("models").join("README.md")))
        .ok();
    // The same decision `rfstudio info` reports: the tiny models when base or ControlNet is
    // not usable (and tiny models ship with this build).
    let Some(tiny_dir) = crate::pipeline::info::demo_fallback(&reports) else {
        return Ok(Resolved {
            in_use: reports.clone(),
            demo: configured.test_weights,
            demo_reason: configured
                .test_weights
                .then(|| format!("{} is marked test_weights", models_dir.join("models.toml").display())),
            manifest: configured,
            configured: reports,
            models_readme: readme,
        });
    };
    let tiny = Manifest::load(&tiny_dir)?;
    Ok(Resolved {
        in_use: tiny.check_all(),
        demo: true,
        demo_reason: Some(format!(
            "no usable Stable Diffusion + ControlNet in {}: running on the tiny models in {}",
            models_dir.display(),
            tiny_dir.display()
        )),
        manifest: Manifest { test_weights: true, ..tiny },
        configured: reports,
        models_readme: readme,
    })
}

enum Msg {
    Resolved(Box<Result<Resolved, UiError>>),
    Info(Box<InfoReport>),
}

pub enum ModelsCommand {
    Recheck,
    UseTiny,
    Pick,
}

pub struct ModelsState {
    pub resolved: Option<Resolved>,
    pub info: Option<InfoReport>,
    pub errors: Vec<String>,
    rx: Option<Receiver<Msg>>,
    /// The precision the first run in this process used (burn fixes it per device and process).
    pub precision_in_use: Option<Precision>,
}

impl ModelsState {
    pub fn new() -> Self {
        Self {
            resolved: None,
            info: None,
            errors: Vec::new(),
            rx: None,
            precision_in_use: None,
        }
    }

    pub fn checking(&self) -> bool {
        self.rx.is_some()
    }

    /// Resolve the manifest and gather the `info` report on a helper thread.
    pub fn refresh(&mut self, ctx: &egui::Context, settings: &Settings) {
        let (tx, rx) = channel();
        let dir = settings.models_dir.clone();
        let overrides = settings.role_overrides.clone();
        let device = settings.device;
        let dtype = settings.dtype;
        let wake = ctx.clone();
        self.errors.clear();
        let spawned = std::thread::Builder::new().name("rfstudio-models".into()).spawn(move || {
            let resolved = resolve(&dir, &overrides);
            let manifest = resolved.as_ref().ok().map(|r| r.manifest.clone());
            let _ = tx.send(Msg::Resolved(Box::new(resolved)));
            wake.request_repaint();
            let manifest = manifest.unwrap_or(Manifest {
                source: None,
                dir: dir.clone(),
                test_weights: false,
                roles: Default::default(),
            });
            let _ = tx.send(Msg::Info(Box::new(gather(&manifest, device, dtype))));
            wake.request_repaint();
        });
        match spawned {
            Ok(_) => self.rx = Some(rx),
            Err(e) => super::common::push_error(&mut self.errors, format!("could not start the model check: {e}")),
        }
    }

    pub fn poll(&mut self) {
        let Some(rx) = &self.rx else { return };
        let mut finished = false;
        loop {
            match rx.try_recv() {
                Ok(Msg::Resolved(r)) => match *r {
                    Ok(r) => self.resolved = Some(r),
                    Err(e) => {
                        super::common::push_error(&mut self.errors, e.shown());
                        self.resolved = None;
                    }
                },
                Ok(Msg::Info(i)) => {
                    if let Some(e) = &i.selection_error {
                        super::common::push_error(&mut self.errors, e.clone());
                    }
                    self.info = Some(*i);
                    finished = true;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    finished = true;
                    break;
                }
            }
        }
        if finished {
            self.rx = None;
        }
    }

    pub fn demo(&self) -> bool {
        self.resolved.as_ref().is_some_and(|r| r.demo)
    }

    pub fn selection(&self) -> Option<&Selection> {
        self.info.as_ref().and_then(|i| i.selected.as_ref())
    }

    /// Whether a generation can start now, or why not.
    pub fn ready(&self) -> Result<(&Manifest, &Selection), NotReady> {
        if self.checking() && (self.resolved.is_none() || self.info.is_none()) {
            return Err(NotReady::Checking);
        }
        let Some(r) = &self.resolved else {
            return Err(self.errors.first().cloned().map_or(NotReady::ModelsUnknown, NotReady::ModelsUnresolved));
        };
        let Some(info) = &self.info else {
            return Err(NotReady::DeviceUnchecked);
        };
        let Some(sel) = &info.selected else {
            return Err(NotReady::NoDevice(
                info.selection_error.clone().unwrap_or_else(|| "no usable device: see Models".into()),
            ));
        };
        for report in r.in_use.iter().filter(|x| matches!(x.role, Role::Base | Role::Controlnet)) {
            if let Status::Missing(why) | Status::Invalid(why) = &report.status {
                return Err(NotReady::Role {
                    role: report.role,
                    why: why.clone(),
                });
            }
        }
        Ok((&r.manifest, sel))
    }
}

impl Default for ModelsState {
    fn default() -> Self {
        Self::new()
    }
}

const DEVICES: [(DeviceRequest, &str); 5] = [
    (DeviceRequest::Auto, "auto (CUDA → GPU adapter → CPU)"),
    (DeviceRequest::Cuda, "cuda"),
    (DeviceRequest::Wgpu, "wgpu"),
    (DeviceRequest::Vulkan, "vulkan"),
    (DeviceRequest::Cpu, "cpu"),
];

fn status_text(ui: &egui::Ui, s: &Status) -> (String, Color32, String) {
    match s {
        Status::Found(d) => ("found".into(), Color32::from_rgb(60, 170, 90), d.clone()),
        Status::Missing(d) => ("missing".into(), ui.visuals().error_fg_color, d.clone()),
        Status::Invalid(d) => ("INVALID".into(), ui.visuals().error_fg_color, d.clone()),
    }
}

/// The Models tab.
pub fn models_ui(
    ui: &mut egui::Ui,
    state: &ModelsState,
    settings: &mut Settings,
    markdown: &mut egui_commonmark::CommonMarkCache,
) -> Vec<ModelsCommand> {
    let mut cmds = Vec::new();
    egui::CentralPanel::default_margins().show(ui, |ui| {
        egui::ScrollArea::vertical().show(ui, |ui| {
            ui.heading("Models");
            ui.horizontal(|ui| {
                ui.label("Models folder (models.toml)");
                path_edit(ui, &mut settings.models_dir, 260.0);
                if ui.small_button("…").clicked() {
                    cmds.push(ModelsCommand::Pick);
                }
                if ui.button("Use the tiny demo models").clicked() {
                    cmds.push(ModelsCommand::UseTiny);
                }
            });
            ui.horizontal(|ui| {
                ui.label("Device");
                egui::ComboBox::from_id_salt("device")
                    .selected_text(DEVICES.iter().find(|(d, _)| *d == settings.device).map(|(_, n)| *n).unwrap_or(""))
                    .show_ui(ui, |ui| {
                        for (d, name) in DEVICES {
                            ui.selectable_value(&mut settings.device, d, name);
                        }
                    });
                ui.label("Precision");
                egui::ComboBox::from_id_salt("dtype")
                    .selected_text(settings.dtype.to_string())
                    .show_ui(ui, |ui| {
                        for p in [Precision::F32, Precision::F16, Precision::Bf16] {
                            ui.selectable_value(&mut settings.dtype, p, p.to_string());
                        }
                    });
                if ui.add_enabled(!state.checking(), egui::Button::new("Apply and re-check")).clicked() {
                    cmds.push(ModelsCommand::Recheck);
                }
                if state.checking() {
                    ui.spinner();
                }
            });
            if let Some(used) = state.precision_in_use
                && used != settings.dtype
            {
                ui.label(
                    RichText::new(format!(
                        "this process already ran models in {used}: a device's precision is fixed per process (burn 0.21), restart the studio to use {}",
                        settings.dtype
                    ))
                    .color(ui.visuals().warn_fg_color),
                );
            }
            for e in &state.errors {
                error_label(ui, e);
            }
            if let Some(info) = &state.info {
                ui.separator();
                ui.label(RichText::new(format!("rfstudio {} · backends compiled in: {}", info.version, info.compiled_backends.join(", "))).strong());
                egui::Grid::new("backends").striped(true).show(ui, |ui| {
                    for b in &info.backends {
                        ui.label(b.backend);
                        let (t, c) = match (b.compiled, b.available) {
                            (false, _) => ("not built", ui.visuals().weak_text_color()),
                            (true, true) => ("available", Color32::from_rgb(60, 170, 90)),
                            (true, false) => ("unavailable", ui.visuals().warn_fg_color),
                        };
                        ui.colored_label(c, t);
                        ui.label(&b.detail);
                        ui.end_row();
                    }
                });
                match (&info.selected, &info.selection_error) {
                    (Some(s), _) => {
                        ui.label(format!("selected: {} [dtype {}]", s.notice, info.dtype));
                    }
                    (None, Some(e)) => error_label(ui, &format!("selected: none — {e}")),
                    _ => {}
                }
                if let Some(s) = &info.smoke_test {
                    if s.starts_with("FAILED") {
                        error_label(ui, &format!("smoke test on the selected device: {s}"));
                    } else {
                        ui.label(format!("smoke test on the selected device: {s}"));
                    }
                }
            }
            let Some(r) = &state.resolved else { return };
            ui.separator();
            if let Some(why) = &r.demo_reason {
                ui.label(RichText::new(format!("Demo mode: {why}")).color(ui.visuals().warn_fg_color));
            }
            ui.label(RichText::new("Configured models").strong());
            ui.label(RichText::new("Edit a folder and press “Apply and re-check”; the folders override models.toml.").small().weak());
            egui::Grid::new("roles").striped(true).num_columns(4).show(ui, |ui| {
                for report in &r.configured {
                    let (t, c, detail) = status_text(ui, &report.status);
                    ui.label(RichText::new(report.role.name()).strong());
                    ui.colored_label(c, t);
                    let mut p = settings
                        .role_overrides
                        .get(&report.role)
                        .cloned()
                        .or_else(|| report.path.clone())
                        .unwrap_or_default();
                    if path_edit(ui, &mut p, 260.0).changed() {
                        settings.role_overrides.insert(report.role, p);
                    }
                    ui.vertical(|ui| {
                        if matches!(report.status, Status::Found(_)) {
                            ui.label(RichText::new(detail).small());
                        } else {
                            error_label(ui, &detail);
                            error_label(ui, &format!("install: {}", report.role.install_hint()));
                        }
                    });
                    ui.end_row();
                }
            });
            if r.demo {
                ui.label(RichText::new("In use now (tiny random-weight models)").strong());
                egui::Grid::new("roles-in-use").striped(true).show(ui, |ui| {
                    for report in &r.in_use {
                        let (t, c, _) = status_text(ui, &report.status);
                        ui.label(report.role.name());
                        ui.colored_label(c, t);
                        ui.label(report.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
                        ui.end_row();
                    }
                });
            }
            if let Some(readme) = &r.models_readme {
                egui::CollapsingHeader::new("Download instructions (models/README.md)")
                    .default_open(r.configured.iter().any(|x| !matches!(x.status, Status::Found(_))))
                    .show(ui, |ui| {
                        egui_commonmark::CommonMarkViewer::new().show(ui, markdown, readme);
                    });
            }
        });
    });
    cmds
}

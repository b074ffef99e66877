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
use crate::tr;

/// The banner shown while the studio runs on random test weights (in the interface language).
pub fn demo_banner() -> &'static str {
    tr!("models.demo_banner")
}

/// A role as the Models tab shows it: its name in the interface language with the manifest key.
pub fn role_label(role: Role) -> String {
    let name = match role {
        Role::Base => tr!("models.role_base"),
        Role::Controlnet => tr!("models.role_controlnet"),
        Role::Depth => tr!("models.role_depth"),
        Role::Saliency => tr!("models.role_saliency"),
        Role::Text => tr!("models.role_text"),
        Role::Image => tr!("models.role_image"),
        Role::Rfnet => tr!("models.role_rfnet"),
    };
    if name == role.name() { name.to_string() } else { format!("{name} ({})", role.name()) }
}


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
                .then(|| tr!("models.demo_reason_marked", path = models_dir.join("models.toml").display())),
            manifest: configured,
            configured: reports,
            models_readme: readme,
        });
    };
    let tiny = Manifest::load(&tiny_dir)?;
    Ok(Resolved {
        in_use: tiny.check_all(),
        demo: true,
        demo_reason: Some(tr!(
            "models.demo_reason_missing",
            dir = models_dir.display(),
            tiny = tiny_dir.display()
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
        let lang = crate::i18n::current();
        let spawned = std::thread::Builder::new().name("rfstudio-models".into()).spawn(move || {
            crate::i18n::set_thread(Some(lang));
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
            Err(e) => super::common::push_error(&mut self.errors, tr!("models.err_spawn", error = e)),
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
                info.selection_error.clone().unwrap_or_else(|| tr!("models.no_usable_device").into()),
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

const DEVICES: [DeviceRequest; 5] = [
    DeviceRequest::Auto,
    DeviceRequest::Cuda,
    DeviceRequest::Wgpu,
    DeviceRequest::Vulkan,
    DeviceRequest::Cpu,
];

fn device_name(d: DeviceRequest) -> &'static str {
    match d {
        DeviceRequest::Auto => tr!("models.device_auto"),
        DeviceRequest::Cuda => "cuda",
        DeviceRequest::Wgpu => "wgpu",
        DeviceRequest::Vulkan => "vulkan",
        DeviceRequest::Cpu => "cpu",
    }
}

fn status_text(ui: &egui::Ui, s: &Status) -> (String, Color32, String) {
    match s {
        Status::Found(d) => (tr!("models.found").into(), Color32::from_rgb(60, 170, 90), d.clone()),
        Status::Missing(d) => (tr!("models.missing").into(), ui.visuals().error_fg_color, d.clone()),
        Status::Invalid(d) => (tr!("models.invalid").into(), ui.visuals().error_fg_color, d.clone()),
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
            ui.heading(tr!("common.tab_models"));
            ui.horizontal(|ui| {
                ui.label(tr!("models.folder"));
                path_edit(ui, &mut settings.models_dir, 260.0);
                if ui.small_button("…").clicked() {
                    cmds.push(ModelsCommand::Pick);
                }
                if ui.button(tr!("models.use_tiny")).clicked() {
                    cmds.push(ModelsCommand::UseTiny);
                }
            });
            ui.horizontal(|ui| {
                ui.label(tr!("models.device"));
                egui::ComboBox::from_id_salt("device")
                    .selected_text(device_name(settings.device))
                    .show_ui(ui, |ui| {
                        for d in DEVICES {
                            ui.selectable_value(&mut settings.device, d, device_name(d));
                        }
                    });
                ui.label(tr!("models.precision"));
                egui::ComboBox::from_id_salt("dtype")
                    .selected_text(settings.dtype.to_string())
                    .show_ui(ui, |ui| {
                        for p in [Precision::F32, Precision::F16, Precision::Bf16] {
                            ui.selectable_value(&mut settings.dtype, p, p.to_string());
                        }
                    });
                if ui.add_enabled(!state.checking(), egui::Button::new(tr!("models.recheck"))).clicked() {
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
                    RichText::new(tr!("models.precision_fixed", used = used, wanted = settings.dtype))
                    .color(ui.visuals().warn_fg_color),
                );
            }
            for e in &state.errors {
                error_label(ui, e);
            }
            if let Some(info) = &state.info {
                ui.separator();
                ui.label(
                    RichText::new(tr!(
                        "models.version_backends",
                        version = info.version,
                        backends = info.compiled_backends.join(", ")
                    ))
                    .strong(),
                );
                egui::Grid::new("backends").striped(true).show(ui, |ui| {
                    for b in &info.backends {
                        ui.label(b.backend);
                        let (t, c) = match (b.compiled, b.available) {
                            (false, _) => (tr!("models.backend_not_built"), ui.visuals().weak_text_color()),
                            (true, true) => (tr!("models.backend_available"), Color32::from_rgb(60, 170, 90)),
                            (true, false) => (tr!("models.backend_unavailable"), ui.visuals().warn_fg_color),
                        };
                        ui.colored_label(c, t);
                        ui.label(&b.detail);
                        ui.end_row();
                    }
                });
                match (&info.selected, &info.selection_error) {
                    (Some(s), _) => {
                        ui.label(tr!("models.selected", device = s.notice, dtype = info.dtype));
                    }
                    (None, Some(e)) => error_label(ui, &tr!("models.selected_none", error = e)),
                    _ => {}
                }
                if let Some(s) = &info.smoke_test {
                    if s.starts_with("FAILED") {
                        error_label(ui, &tr!("models.smoke_test", result = s));
                    } else {
                        ui.label(tr!("models.smoke_test", result = s));
                    }
                }
            }
            let Some(r) = &state.resolved else { return };
            ui.separator();
            if let Some(why) = &r.demo_reason {
                ui.label(RichText::new(tr!("models.demo_mode", why = why)).color(ui.visuals().warn_fg_color));
            }
            ui.label(RichText::new(tr!("models.configured")).strong());
            ui.label(RichText::new(tr!("models.configured_help", recheck = tr!("models.recheck"))).small().weak());
            egui::Grid::new("roles").striped(true).num_columns(4).show(ui, |ui| {
                for report in &r.configured {
                    let (t, c, detail) = status_text(ui, &report.status);
                    ui.label(RichText::new(role_label(report.role)).strong());
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
                            error_label(ui, &tr!("models.install", hint = report.role.install_hint()));
                        }
                    });
                    ui.end_row();
                }
            });
            if r.demo {
                ui.label(RichText::new(tr!("models.in_use_tiny")).strong());
                egui::Grid::new("roles-in-use").striped(true).show(ui, |ui| {
                    for report in &r.in_use {
                        let (t, c, _) = status_text(ui, &report.status);
                        ui.label(role_label(report.role));
                        ui.colored_label(c, t);
                        ui.label(report.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
                        ui.end_row();
                    }
                });
            }
            // In Chinese the shipped translation; in English the models folder's own README.md.
            let readme = match crate::i18n::current() {
                crate::i18n::Lang::ZhCn => Some(crate::i18n::MODELS_README_ZH_CN),
                crate::i18n::Lang::En => r.models_readme.as_deref(),
            };
            if let Some(readme) = readme {
                egui::CollapsingHeader::new(tr!("models.instructions"))
                    .id_salt("models-readme")
                    .default_open(r.configured.iter().any(|x| !matches!(x.status, Status::Found(_))))
                    .show(ui, |ui| {
                        egui_commonmark::CommonMarkViewer::new().show(ui, markdown, readme);
                    });
            }
        });
    });
    cmds
}

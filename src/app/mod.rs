//! The studio GUI (eframe/egui). This module only draws and dispatches: model work runs in the
//! library (`pipeline`, `data`, `train`) on worker threads, results come back through channels.
//! Feature `studio` builds the state and drawing (enough for the headless `gui_` tests);
//! feature `gui` adds the window (`run_native`, eframe) and native file dialogs (rfd).
//!
//! - `studio.rs`: the top level (`Studio`: settings + runtime state of each tab, `Studio::ui`)
//! - `settings.rs`: what is persisted between runs (one serde struct, eframe storage)
//! - `generate.rs`, `annotate.rs`, `finetune.rs`, `models.rs`: one tab each, state then drawing
//! - `runs.rs`: reading RFFT / RFNet training run folders (a watcher thread); `monitor.rs`: the
//!   Fine-tune tab's plots (linked axes, smoothing, log scale, overlaid runs, wall time, memory)
//! - `images.rs`: the image-decoding thread and texture cache; `fonts.rs`: the CJK font
//! - `common.rs`: bundled folders, file dialogs, opening folders; `error.rs`: the plumbing's typed errors

pub mod annotate;
pub mod catalogue;
pub mod common;
pub mod error;
pub mod finetune;
pub mod fonts;
pub mod generate;
pub mod images;
pub mod models;
pub mod monitor;
pub mod runs;
pub mod settings;
pub mod studio;

use std::path::PathBuf;

pub use settings::{Settings, Tab};
pub use studio::{Scene, ScreenshotPlan, Studio};

/// How the studio was asked to start (the `studio` subcommand's options).
#[derive(Clone, Debug, Default)]
pub struct LaunchOptions {
    /// Settings that replace the stored ones (command-line options).
    pub overrides: Overrides,
    /// Drive to a tab, save a PNG of the window and exit (scripts/screenshots.sh).
    pub screenshot: Option<(Tab, Scene, PathBuf)>,
}

/// Command-line settings; `None` keeps the stored value.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub models_dir: Option<PathBuf>,
    pub device: Option<crate::device::DeviceRequest>,
    pub dtype: Option<crate::device::Precision>,
    pub dataset: Option<PathBuf>,
    pub runs_root: Option<PathBuf>,
    pub out_root: Option<PathBuf>,
    pub product: Option<PathBuf>,
    pub title: Option<String>,
    pub steps: Option<usize>,
    pub canvas: Option<u32>,
    /// `--lang`: the interface language for this start (and from then on).
    pub lang: Option<crate::i18n::Lang>,
}

impl Overrides {
    pub fn apply(&self, s: &mut Settings) {
        if let Some(v) = &self.models_dir {
            s.models_dir = v.clone();
        }
        if let Some(v) = self.device {
            s.device = v;
        }
        if let Some(v) = self.dtype {
            s.dtype = v;
        }
        if let Some(v) = &self.dataset {
            s.annotate.dataset = v.clone();
        }
        if let Some(v) = &self.runs_root {
            s.finetune.runs_root = v.clone();
        }
        if let Some(v) = &self.out_root {
            s.generate.out_root = v.clone();
        }
        if let Some(v) = &self.product {
            s.generate.product = Some(v.clone());
            // A bundled sample product brings its prompt and title along when the form is empty.
            let sample = generate::sample_products()
                .into_iter()
                .find(|(p, _)| p.file_name() == v.file_name());
            if let Some((_, sp)) = sample
                && s.generate.params.prompt.is_empty()
            {
                s.generate.params.prompt = sp.prompt;
                s.generate.params.negative = sp.negative_prompt;
                s.generate.params.title = sp.title_zh;
            }
        }
        if let Some(v) = &self.title {
            s.generate.params.title = v.clone();
        }
        if let Some(v) = self.steps {
            s.generate.params.steps = v;
        }
        if let Some(v) = self.canvas {
            s.generate.params.canvas = v;
        }
        if let Some(v) = self.lang {
            s.lang = Some(v);
        }
    }
}

/// Whether a window can be opened here (a display server is reachable).
pub fn display_available() -> bool {
    if cfg!(any(target_os = "macos", target_os = "windows")) {
        return true;
    }
    ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

#[cfg(feature = "gui")]
struct StudioApp {
    studio: Studio,
}

#[cfg(feature = "gui")]
impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        if self.studio.generate.is_running()
            && let Some(cpu) = frame.info().cpu_usage
        {
            self.studio.render_stats.add(cpu as f64 * 1e3);
            if cpu > 0.03 {
                tracing::debug!(
                    "slow frame while generating: {:.1} ms (frame {}, step {:?})",
                    cpu * 1e3,
                    self.studio.render_stats.frames,
                    self.studio.generate.progress.as_ref().map(|p| p.step)
                );
            }
        }
        self.studio.ui(ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        if self.studio.screenshot.is_none() {
            eframe::set_value(storage, settings::SETTINGS_KEY, &self.studio.settings);
        }
    }

    // Screenshot runs leave a user's stored state alone (egui's memory included).
    fn persist_egui_memory(&self) -> bool {
        self.studio.screenshot.is_none()
    }

    fn on_exit(&mut self) {
        self.studio.generate.cancel();
        self.studio.finetune.stop();
    }
}

/// The window icon (the one the `.desktop` entry installs).
#[cfg(feature = "gui")]
fn icon() -> egui::IconData {
    let bytes = include_bytes!("../../ui-assets/rfstudio-256.png");
    match image::load_from_memory(bytes) {
        Ok(img) => {
            let rgba = img.to_rgba8();
            egui::IconData {
                width: rgba.width(),
                height: rgba.height(),
                rgba: rgba.into_raw(),
            }
        }
        Err(_) => egui::IconData::default(),
    }
}

/// Open the studio window; returns when it is closed.
#[cfg(feature = "gui")]
pub fn run_native(options: LaunchOptions) -> anyhow::Result<()> {
    let screenshot = options.screenshot.clone();
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("rfstudio")
            // The Wayland/X11 app id matches the installed `rfstudio.desktop` entry.
            .with_app_id("rfstudio")
            .with_icon(std::sync::Arc::new(icon()))
            .with_inner_size([1400.0, 900.0])
            .with_min_inner_size([900.0, 600.0]),
        // Screenshot runs must not read or overwrite a user's stored settings.
        persist_window: screenshot.is_none(),
        // Settings in the user's config folder (eframe's default is the data folder, which
        // holds the studio's outputs).
        persistence_path: crate::files::user_config_dir().map(|d| d.join("studio.ron")),
        ..Default::default()
    };
    eframe::run_native(
        "rfstudio",
        native,
        Box::new(move |cc| {
            let stored: Option<Settings> = match (&screenshot, cc.storage) {
                (None, Some(st)) => eframe::get_value(st, settings::SETTINGS_KEY),
                _ => None,
            };
            let mut s = stored.unwrap_or_default();
            options.overrides.apply(&mut s);
            let mut studio = Studio::new(&cc.egui_ctx, s);
            studio.screenshot = screenshot.map(|(tab, scene, out)| ScreenshotPlan::new(tab, scene, out));
            Ok(Box::new(StudioApp { studio }))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the studio window could not be opened: {e}"))
}

//! `rfstudio studio` (and `rfstudio` with no arguments): open the GUI.

use crate::tr;
use std::path::PathBuf;

use clap::Args;

use super::{CliError, GlobalArgs, exit};

#[derive(Args, Debug, Default)]
pub struct StudioArgs {
    /// Dataset folder for the Annotate tab.
    #[arg(long, value_name = "DIR")]
    pub dataset: Option<PathBuf>,
    /// Folder of training runs for the Fine-tune tab.
    #[arg(long, value_name = "DIR")]
    pub runs: Option<PathBuf>,
    /// Output folder of the Generate tab (one sub-folder per run).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Product image preselected in the Generate tab.
    #[arg(long, value_name = "PNG")]
    pub product: Option<PathBuf>,
    /// Denoising steps preselected in the Generate tab.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Canvas size preselected in the Generate tab.
    #[arg(long)]
    pub size: Option<u32>,
    /// Drive the window to this tab (generate, annotate, finetune, models), save a screenshot
    /// to --screenshot-out and exit (used by scripts/screenshots.sh).
    #[arg(long, hide = true, value_name = "TAB", requires = "screenshot_out")]
    pub screenshot_tab: Option<String>,
    /// Where --screenshot-tab saves its PNG.
    #[arg(long, hide = true, value_name = "PNG", requires = "screenshot_tab")]
    pub screenshot_out: Option<PathBuf>,
    /// What the screenshot shows on its tab: plain (default), progress (Generate: a run in
    /// progress), compare (Generate: the newest run's first two candidates side by side;
    /// Fine-tune: the two newest runs overlaid), grid (Annotate: the grid view).
    #[arg(long, hide = true, value_name = "SCENE", requires = "screenshot_tab", default_value = "plain")]
    pub screenshot_scene: String,
    /// Title (RFNet caption) preselected in the Generate tab.
    #[arg(long)]
    pub title: Option<String>,
}

#[cfg(feature = "gui")]
pub fn run(global: &GlobalArgs, args: &StudioArgs) -> Result<(), CliError> {
    use crate::app::{LaunchOptions, Overrides, Tab};
    use crate::device::{DeviceRequest, Precision};
    if !crate::app::display_available() {
        return Err(CliError::new(
            exit::FAILURE,
            anyhow::anyhow!("no display found (DISPLAY / WAYLAND_DISPLAY unset): the studio needs a desktop session; the headless commands work without one (see `rfstudio --help`)"),
        ));
    }
    let screenshot = match (&args.screenshot_tab, &args.screenshot_out) {
        (Some(t), Some(out)) => {
            let tab = Tab::parse(t).ok_or_else(|| {
                CliError::bad_input(anyhow::anyhow!("--screenshot-tab {t}: expected generate, annotate, finetune or models"))
            })?;
            let scene = crate::app::Scene::parse(&args.screenshot_scene).ok_or_else(|| {
                CliError::bad_input(anyhow::anyhow!(
                    "--screenshot-scene {}: expected plain, progress, compare or grid",
                    args.screenshot_scene
                ))
            })?;
            Some((tab, scene, out.clone()))
        }
        _ => None,
    };
    let options = LaunchOptions {
        overrides: Overrides {
            models_dir: (global.models != crate::files::default_models_dir()).then(|| global.models.clone()),
            device: (global.device != DeviceRequest::Auto).then_some(global.device),
            dtype: (global.dtype != Precision::F32).then_some(global.dtype),
            dataset: args.dataset.clone(),
            runs_root: args.runs.clone(),
            out_root: args.out.clone(),
            product: args.product.clone(),
            title: args.title.clone(),
            steps: args.steps,
            canvas: args.size,
            lang: global.lang,
        },
        screenshot,
    };
    crate::app::run_native(options).map_err(|e| CliError::new(exit::FAILURE, e))
}

#[cfg(not(feature = "gui"))]
pub fn run(_global: &GlobalArgs, _args: &StudioArgs) -> Result<(), CliError> {
    Err(CliError::new(
        exit::FAILURE,
        anyhow::anyhow!("this build has no GUI: rebuild with `--features gui` (on by default)"),
    ))
}

/// What `rfstudio` with no arguments does: the studio when it can open a window, else an
/// overview of the headless commands and why no window opened.
pub fn no_arguments(global: &GlobalArgs) -> Result<(), CliError> {
    let why = if !cfg!(feature = "gui") {
        tr!("cli.no_gui_build")
    } else if !crate::app_display_available() {
        tr!("cli.no_display")
    } else {
        return run(global, &StudioArgs::default());
    };
    println!("{}", tr!("cli.no_arguments", version = env!("CARGO_PKG_VERSION"), why = why));
    Ok(())
}

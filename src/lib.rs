//! rfstudio: reliable advertising-image generation (SD 1.5 + ControlNet), RFNet scoring and
//! RFFT fine-tuning. See ARCHITECTURE.md for which module owns what.

#[cfg(feature = "studio")]
pub mod app;
pub mod cli;
pub mod data;
pub mod device;
pub mod errors;
pub mod files;
pub mod i18n;
pub mod models;
pub mod pipeline;
pub mod switches;
pub mod train;

/// Whether the studio could open a window here (always false without the `gui` feature).
pub fn app_display_available() -> bool {
    #[cfg(feature = "gui")]
    {
        app::display_available()
    }
    #[cfg(not(feature = "gui"))]
    {
        false
    }
}

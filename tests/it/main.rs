//! The one integration-test binary (one link of the large dependency graph; see NOTES).
//! Test names carry their kind: `parity_<component>_...`, `cli_...`, `weights_...`,
//! `gui_<tab>_...` (the studio driven headless, built with `--features studio` or `gui`).

mod catalogue;
mod checkpoints;
mod cli;
mod common;
mod dataset;
mod depth;
mod encoders;
mod generate;
mod hostile;
mod i18n;
mod judge;
#[cfg(feature = "studio")]
mod gui;
#[cfg(feature = "studio")]
mod gui_grid;
#[cfg(feature = "studio")]
mod gui_monitor;
#[cfg(feature = "studio")]
mod gui_team;
#[cfg(feature = "studio")]
mod gui_zh_all;
#[cfg(feature = "studio")]
mod gui_zh_annotate;
#[cfg(feature = "studio")]
mod gui_zh_finetune;
#[cfg(feature = "studio")]
mod gui_zh_generate;
#[cfg(feature = "studio")]
mod gui_zh_models;
mod parity_blocks;
mod pg;
mod parity_sd;
mod rfnet;
mod rfnet_train;
mod rfft;
mod team;
mod u2net;
mod weights;

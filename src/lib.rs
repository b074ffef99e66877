//! rfstudio: reliable advertising-image generation (SD 1.5 + ControlNet), RFNet scoring and
//! RFFT fine-tuning. See ARCHITECTURE.md for which module owns what.

pub mod cli;
pub mod data;
pub mod device;
pub mod models;
pub mod pipeline;
pub mod train;

//! Networks, one model family per file, with module trees named after the public checkpoints'
//! keys so that real weights load with few remaps (kept next to each model).

pub mod autodiff_ops;
pub mod bert;
pub mod clip;
pub mod controlnet;
pub mod diffusers_blocks;
pub(crate) mod dispatch;
pub mod fused;
pub mod kernels;
pub mod lora;
pub mod lora_file;
pub mod dpt;
pub mod manifest;
pub mod ops;
pub mod policy;
pub mod presets;
pub mod pth;
pub mod resnet;
pub mod rfnet;
pub mod single_file;
pub mod u2net;
pub mod unet;
pub mod vae;
pub mod weights;

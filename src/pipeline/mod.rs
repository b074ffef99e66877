//! Generation: product placement, scheduling, the SD 1.5 + ControlNet sampler, the ad pipeline
//! with recurrent generation, scoring interface, and output writing.

pub mod generate;
pub mod image_io;
pub mod info;
pub mod judge;
pub mod output;
pub mod overlay;
pub mod params;
pub mod product;
pub mod run_folder;
pub mod sampler;
pub mod scheduler;
pub mod score;
pub mod sd;

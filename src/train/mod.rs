//! Training: synthetic labelled data, RFNet training and evaluation, RFFT (fine-tuning the
//! ControlNet with RFNet feedback) with its export and comparison.

pub mod memory;
pub mod rfft;
pub mod rfnet;
pub mod run_folder;
pub mod synth;

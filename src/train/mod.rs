//! Training: synthetic labelled data, RFNet training and evaluation, (later) RFFT.

pub mod rfnet;
pub mod synth;

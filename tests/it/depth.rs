//! DPT depth parity against transformers' DPTForDepthEstimation (both public variants, tiny).

use burn::tensor::DType;
use rfstudio::models::dpt::load_dpt;

use crate::common::*;

#[test]
fn parity_dpt_hybrid_midas_layout() {
    let io_set = open(&[&fixture("dpt_hybrid.io.safetensors")]);
    let model = load_dpt::<B>(&root().join("models/tiny/dpt-hybrid"), DType::F32, &device()).expect("load");
    let depth = model.forward(io(&io_set, "pixel_values"));
    assert_close("dpt-hybrid depth", depth, io(&io_set, "predicted_depth"), 1e-4);
}

#[test]
fn parity_dpt_large_layout() {
    let io_set = open(&[&fixture("dpt_large.io.safetensors")]);
    let model = load_dpt::<B>(&fixture("dpt_large_tiny"), DType::F32, &device()).expect("load");
    let depth = model.forward(io(&io_set, "pixel_values"));
    assert_close("dpt-large depth", depth, io(&io_set, "predicted_depth"), 1e-4);
}

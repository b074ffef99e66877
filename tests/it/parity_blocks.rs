//! Parity of the shared diffusers blocks against diffusers 0.42.1 (fixtures from make_fixtures.py).

use burn::tensor::DType;
use rfstudio::models::diffusers_blocks::{ResnetBlock2DConfig, UNetMidBlock2DConfig};
use rfstudio::models::weights::{KeyRemap, Unused, load_module};

use crate::common::*;

#[test]
fn parity_blocks_midblock2d_groupnorm_conv_attention() {
    let dev = device();
    let weights = open(&[&fixture("midblock2d.weights.safetensors")]);
    let io_set = open(&[&fixture("midblock2d.io.safetensors")]);
    let block = UNetMidBlock2DConfig {
        channels: 32,
        groups: 8,
        eps: 1e-6,
        head_dim: 16,
        temb_channels: None,
    }
    .init::<B>(&dev);
    let (block, report) =
        load_module(block, &weights, &KeyRemap::new(), DType::F32, Unused::Deny).expect("load");
    assert!(report.loaded > 20, "loaded {}", report.loaded);
    let y = block.forward(io(&io_set, "x"), None);
    assert_close("midblock2d", y, io(&io_set, "y"), 1e-4);
}

#[test]
fn parity_blocks_resnet2d_with_time_embedding_and_shortcut() {
    let dev = device();
    let weights = open(&[&fixture("resnet2d.weights.safetensors")]);
    let io_set = open(&[&fixture("resnet2d.io.safetensors")]);
    let block = ResnetBlock2DConfig {
        in_channels: 16,
        out_channels: 32,
        temb_channels: Some(24),
        groups: 8,
        eps: 1e-5,
    }
    .init::<B>(&dev);
    let (block, _) =
        load_module(block, &weights, &KeyRemap::new(), DType::F32, Unused::Deny).expect("load");
    let temb = io::<2>(&io_set, "temb");
    let y = block.forward(io(&io_set, "x"), Some(&temb));
    assert_close("resnet2d", y, io(&io_set, "y"), 1e-4);
}

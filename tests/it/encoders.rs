//! RFNet's encoders against torchvision 0.29 at tiny configs: ResNet-50 (image). Fixtures from
//! make_fixtures.py.

use std::path::PathBuf;

use burn::tensor::DType;
use rfstudio::models::resnet::{ResNet, load_resnet};

use crate::common::*;

fn tiny(p: &str) -> PathBuf {
    root().join("models").join("tiny").join(p)
}

#[test]
fn parity_resnet_features_and_logits() {
    let dev = device();
    let io_set = open(&[&fixture("resnet50.io.safetensors")]);
    let (model, report) = load_resnet::<B>(&tiny("resnet50"), DType::F32, &dev).expect("load");
    assert!(
        report.unused.iter().all(|k| k.ends_with("num_batches_tracked")) && !report.unused.is_empty(),
        "{:?}",
        report.unused
    );
    let image = io::<4>(&io_set, "image");
    // 1. stem and the stages one by one
    let mut h = model.stem(image.clone());
    assert_close("resnet stem", h.clone(), io(&io_set, "dbg.stem"), 1e-4);
    for (i, stage) in model.stages().into_iter().enumerate() {
        h = ResNet::forward_stage(stage, h);
        let key = if i < 3 {
            format!("dbg.layer{}", i + 1)
        } else {
            "features".to_string()
        };
        assert_close(&format!("resnet {key}"), h.clone(), io(&io_set, &key), 1e-4);
    }
    // 2. the public entry points
    let features = model.forward_features(image.clone());
    assert_eq!(features.dims(), [2, 256, 2, 2]);
    assert_close("resnet features", features.clone(), io(&io_set, "features"), 1e-4);
    assert_close(
        "resnet pooled",
        ResNet::pool(features),
        io(&io_set, "pooled"),
        1e-4,
    );
    assert_close("resnet logits", model.forward(image), io(&io_set, "logits"), 1e-4);
}

#[test]
fn weights_resnet_unexpected_tensor_is_refused() {
    // `num_batches_tracked` is the only tensor a ResNet checkpoint may carry unused.
    let src = tiny("resnet50");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).expect("copy");
    let bytes = std::fs::read(src.join("model.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let extra = vec![0u8; 8];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    views.push((
        "head.extra".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &extra).expect("view"),
    ));
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors::serialize(views, None).expect("ser"),
    )
    .expect("write");
    let err = load_resnet::<B>(dir.path(), DType::F32, &device())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("head.extra") && err.contains("model.safetensors"),
        "{err}"
    );
}

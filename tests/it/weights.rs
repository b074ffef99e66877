//! The weight layer's error paths: each message must name the file and the key/shape.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use rfstudio::models::diffusers_blocks::ResnetBlock2DConfig;
use rfstudio::models::weights::{KeyRemap, SafetensorsFile, Unused, WeightError, Weights, load_module};
use safetensors::tensor::TensorView;

use crate::common::*;

fn block() -> rfstudio::models::diffusers_blocks::ResnetBlock2D<B> {
    ResnetBlock2DConfig {
        in_channels: 16,
        out_channels: 32,
        temb_channels: Some(24),
        groups: 8,
        eps: 1e-5,
    }
    .init::<B>(&device())
}

/// The resnet2d fixture's tensors as (key -> (dtype, shape, bytes)), to rewrite in tests.
fn fixture_tensors() -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let f = SafetensorsFile::open(fixture("resnet2d.weights.safetensors")).expect("fixture");
    f.tensors()
        .keys()
        .map(|k| {
            let (v, shape) = f.read_f32(k).expect("read");
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (k.clone(), safetensors::Dtype::F32, shape, bytes)
        })
        .collect()
}

fn write(path: &Path, tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(&views, None, path).expect("write");
}

fn load(path: &Path) -> Result<(), WeightError> {
    let w = Weights::open(&[path.to_path_buf()])?;
    load_module(block(), &w, &KeyRemap::new(), DType::F32, Unused::Deny).map(|_| ())
}

fn tmp(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join(name);
    (dir, p)
}

#[test]
fn weights_missing_key_names_file_key_and_shape() {
    let (_d, path) = tmp("missing.safetensors");
    let t: Vec<_> = fixture_tensors()
        .into_iter()
        .filter(|(k, ..)| k != "conv2.weight")
        .collect();
    write(&path, &t);
    let msg = load(&path).unwrap_err().to_string();
    assert!(msg.contains("missing.safetensors"), "{msg}");
    assert!(msg.contains("conv2.weight"), "{msg}");
    assert!(msg.contains("[32, 32, 3, 3]"), "{msg}");
}

#[test]
fn weights_renamed_key_reports_missing_and_unused() {
    let (_d, path) = tmp("renamed.safetensors");
    let t: Vec<_> = fixture_tensors()
        .into_iter()
        .map(|(k, d, s, b)| {
            let k = if k == "norm1.weight" { "norm_1.weight".to_string() } else { k };
            (k, d, s, b)
        })
        .collect();
    write(&path, &t);
    let msg = load(&path).unwrap_err().to_string();
    assert!(msg.contains("norm1.weight"), "{msg}");
    assert!(msg.contains("norm_1.weight"), "{msg}");
}

#[test]
fn weights_wrong_shape_names_expected_and_found() {
    let (_d, path) = tmp("shape.safetensors");
    let t: Vec<_> = fixture_tensors()
        .into_iter()
        .map(|(k, d, s, b)| {
            if k == "time_emb_proj.weight" {
                // [32, 24] stored as [24, 32]
                (k, d, vec![24, 32], b)
            } else {
                (k, d, s, b)
            }
        })
        .collect();
    write(&path, &t);
    let err = load(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::Shape { .. }), "{msg}");
    assert!(msg.contains("shape.safetensors"), "{msg}");
    assert!(msg.contains("time_emb_proj.weight"), "{msg}");
    assert!(msg.contains("[24, 32]") && msg.contains("[32, 24]"), "{msg}");
}

#[test]
fn weights_wrong_dtype_names_key_and_dtype() {
    let (_d, path) = tmp("dtype.safetensors");
    let t: Vec<_> = fixture_tensors()
        .into_iter()
        .map(|(k, d, s, b)| {
            if k == "conv1.bias" {
                (k, safetensors::Dtype::I32, s, b)
            } else {
                (k, d, s, b)
            }
        })
        .collect();
    write(&path, &t);
    let err = load(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::Dtype { .. }), "{msg}");
    assert!(msg.contains("dtype.safetensors") && msg.contains("conv1.bias") && msg.contains("I32"), "{msg}");
}

#[test]
fn weights_truncated_file_is_an_error_naming_the_file() {
    let (_d, path) = tmp("truncated.safetensors");
    let bytes = std::fs::read(fixture("resnet2d.weights.safetensors")).expect("fixture");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("write");
    let err = SafetensorsFile::open(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::Format { .. }), "{msg}");
    assert!(msg.contains("truncated.safetensors") && msg.contains("truncated"), "{msg}");
    // Cut inside the header too.
    std::fs::write(&path, &bytes[..20]).expect("write");
    let msg = SafetensorsFile::open(&path).unwrap_err().to_string();
    assert!(msg.contains("truncated.safetensors"), "{msg}");
}

#[test]
fn weights_not_safetensors_is_an_error_naming_the_file() {
    let (_d, path) = tmp("model.bin");
    std::fs::write(&path, b"PK\x03\x04 this is a zip/pickle, not safetensors at all").expect("write");
    let msg = SafetensorsFile::open(&path).unwrap_err().to_string();
    assert!(msg.contains("model.bin") && msg.contains("not a valid safetensors"), "{msg}");
    let (_d2, empty) = tmp("empty.safetensors");
    std::fs::write(&empty, b"").expect("write");
    let msg = SafetensorsFile::open(&empty).unwrap_err().to_string();
    assert!(msg.contains("empty.safetensors"), "{msg}");
    let msg = SafetensorsFile::open(Path::new("/nonexistent/x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("/nonexistent/x.safetensors"), "{msg}");
}

#[test]
fn weights_unused_tensor_is_reported_when_denied() {
    let (_d, path) = tmp("extra.safetensors");
    let mut t = fixture_tensors();
    t.push(("position_ids".into(), safetensors::Dtype::F32, vec![2], vec![0u8; 8]));
    write(&path, &t);
    let msg = load(&path).unwrap_err().to_string();
    assert!(msg.contains("position_ids") && msg.contains("not used"), "{msg}");
    // Allowed: it loads and reports the extra key.
    let w = Weights::open(&[path.clone()]).expect("open");
    let (_, report) = load_module(block(), &w, &KeyRemap::new(), DType::F32, Unused::Allow).expect("load");
    assert_eq!(report.unused, vec!["position_ids".to_string()]);
}

#[test]
fn weights_f16_and_bf16_files_load_and_match_f32() {
    let io_set = open(&[&fixture("resnet2d.io.safetensors")]);
    let x = io::<4>(&io_set, "x");
    let temb = io::<2>(&io_set, "temb");
    let reference = io::<4>(&io_set, "y");
    for (dtype, name) in [(safetensors::Dtype::F16, "h.safetensors"), (safetensors::Dtype::BF16, "b.safetensors")] {
        let (_d, path) = tmp(name);
        let t: Vec<_> = fixture_tensors()
            .into_iter()
            .map(|(k, _, s, b)| {
                let vals = b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                let bytes: Vec<u8> = if dtype == safetensors::Dtype::F16 {
                    vals.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect()
                } else {
                    vals.flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect()
                };
                (k, dtype, s, bytes)
            })
            .collect();
        write(&path, &t);
        let w = Weights::open(&[path.clone()]).expect("open");
        let (m, _) = load_module(block(), &w, &KeyRemap::new(), DType::F32, Unused::Deny).expect("load");
        let y = m.forward(x.clone(), Some(&temb));
        // Rounded weights: the output moves by about the rounding error only.
        let err = max_abs_diff(y, reference.clone());
        assert!(err < 0.1, "{name}: {err}");
    }
}

#[test]
fn weights_key_remap_rewrites_checkpoint_names() {
    let (_d, path) = tmp("prefixed.safetensors");
    let t: Vec<_> = fixture_tensors()
        .into_iter()
        .map(|(k, d, s, b)| (format!("block.{k}"), d, s, b))
        .collect();
    write(&path, &t);
    let w = Weights::open(&[path.clone()]).expect("open");
    let remap = KeyRemap::new().rule(r"^block\.", "").expect("rule");
    load_module(block(), &w, &remap, DType::F32, Unused::Deny).expect("remapped load");
    let bad = KeyRemap::new().rule("(unclosed", "");
    assert!(bad.unwrap_err().to_string().contains("(unclosed"));
}

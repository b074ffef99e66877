//! U2-Net: parity of the tiny U2-Net-P against u2net-fast 1.0 (the authors' `model/u2net.py`),
//! the full-size layouts against the published key lists, the `.pth` converter, and saliency maps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{DType, Tensor};
use rfstudio::models::u2net::{U2NetArch, U2NetConfig, detect_arch, load_u2net};
use rfstudio::models::weights::{SafetensorsFile, param_slots};

use crate::common::*;

fn tiny() -> PathBuf {
    root().join("models").join("tiny").join("u2netp")
}

fn rfstudio() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rfstudio"));
    // English messages whatever the machine's locale (the tests read them).
    c.env("RFSTUDIO_LANG", "en");
    c.current_dir(root());
    c.env_remove("RFSTUDIO_DEVICE")
        .env_remove("RFSTUDIO_MODELS")
        .env_remove("RFSTUDIO_DTYPE");
    c
}

#[test]
fn parity_u2net_u2netp_all_side_outputs() {
    let dev = device();
    let io_set = open(&[&fixture("u2netp.io.safetensors")]);
    let (model, config, report) = load_u2net::<B>(&tiny(), DType::F32, &dev).expect("load");
    assert_eq!(config.architecture, U2NetArch::U2netp);
    // every tensor of the tiny checkpoint is used, except the 112 BatchNorm counters
    assert_eq!(
        report.unused.len(),
        112,
        "{:?}",
        &report.unused[..3.min(report.unused.len())]
    );
    let image: Tensor<B, 4> = io(&io_set, "image");
    let logits = model.forward_logits(image.clone());
    // the fused logits against the (f16) debug copy of `outconv`'s output
    assert_close(
        "u2net.outconv (f16 fixture)",
        logits[0].clone(),
        io(&io_set, "dbg.outconv"),
        1e-2,
    );
    let maps = model.forward(image);
    for (i, map) in maps.into_iter().enumerate() {
        assert_close(
            &format!("u2net.d{i}"),
            map,
            io(&io_set, &format!("d{i}")),
            1e-4,
        );
    }
}

#[test]
fn parity_u2net_odd_size() {
    // 50 -> 25 -> 13 -> 7 -> 4 -> 2 under ceil-mode pooling; upsampling by non-integer factors
    let dev = device();
    let io_set = open(&[&fixture("u2netp.io.safetensors")]);
    let (model, _, _) = load_u2net::<B>(&tiny(), DType::F32, &dev).expect("load");
    let [d0, ..] = model.forward(io(&io_set, "odd.image"));
    assert_eq!(d0.dims(), [1, 1, 50, 50]);
    assert_close("u2net.odd.d0", d0, io(&io_set, "odd.d0"), 1e-4);
}

/// `{key: shape}` of a published state dict, without the BatchNorm counters.
fn published_keys(name: &str) -> BTreeMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(fixture(name)).expect("key list");
    let keys: BTreeMap<String, Vec<usize>> = serde_json::from_str(&text).expect("json");
    keys.into_iter()
        .filter(|(k, _)| !k.ends_with(".num_batches_tracked"))
        .collect()
}

#[test]
fn parity_u2net_full_layout_matches_published_keys() {
    for (arch, file, values) in [
        (U2NetArch::U2net, "u2net_full_keys.json", 44_000_000),
        (U2NetArch::U2netp, "u2netp_keys.json", 1_100_000),
    ] {
        // lazy parameters: the full model is never initialised
        let model = U2NetConfig::new(arch).init::<B>(&device());
        let ours: BTreeMap<String, Vec<usize>> = param_slots::<B, _>(&model)
            .into_iter()
            .map(|s| (s.key, s.shape))
            .collect();
        let published = published_keys(file);
        let missing: Vec<_> = published
            .keys()
            .filter(|k| !ours.contains_key(*k))
            .collect();
        let extra: Vec<_> = ours
            .keys()
            .filter(|k| !published.contains_key(*k))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{arch}: missing {missing:?}, extra {extra:?}"
        );
        assert_eq!(ours, published, "{arch}: shapes differ");
        // parameters only (running statistics excluded), as the paper counts them
        let params: usize = ours
            .iter()
            .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let rel = (params as f64 - values as f64).abs() / values as f64;
        eprintln!("{arch}: {} tensors, {params} parameters", ours.len());
        assert!(rel < 0.05, "{arch}: {params} parameters");
    }
}

#[derive(serde::Deserialize)]
struct PthCheck {
    num_tensors: usize,
    sum_of_all_values: f64,
    first_key: String,
    first_key_shape: Vec<usize>,
}

#[test]
fn u2net_convert_pth_roundtrip() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out_dir = tmp.path().join("u2netp");
    let out = rfstudio()
        .args(["convert", "u2net"])
        .arg(fixture("u2netp_f16.pth"))
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    // the folder's config names the detected size
    let config = U2NetConfig::from_file(&out_dir.join("config.json")).expect("config");
    assert_eq!(config.architecture, U2NetArch::U2netp);
    // every tensor but the BatchNorm counters, in f32, summing to what torch summed
    let check: PthCheck = serde_json::from_str(
        &std::fs::read_to_string(fixture("u2netp_pth_check.json")).expect("check"),
    )
    .expect("json");
    let file = SafetensorsFile::open(out_dir.join("model.safetensors")).expect("safetensors");
    assert_eq!(file.tensors().len(), check.num_tensors - 112);
    assert!(
        file.tensors()
            .values()
            .all(|t| t.dtype == safetensors::Dtype::F32)
    );
    assert_eq!(
        file.tensors()[&check.first_key].shape,
        check.first_key_shape
    );
    let mut sum = 0.0f64;
    for key in file.tensors().keys() {
        let (values, _) = file.read_f32(key).expect("read");
        sum += values.iter().map(|&v| v as f64).sum::<f64>();
    }
    let rel = (sum - check.sum_of_all_values).abs() / check.sum_of_all_values.abs();
    eprintln!(
        "u2net convert: sum {sum} vs torch {} (rel {rel:.1e})",
        check.sum_of_all_values
    );
    assert!(rel <= 1e-2, "sum {sum} vs {}", check.sum_of_all_values);
    // the converted model reproduces the tiny checkpoint's fused map
    let io_set = open(&[&fixture("u2netp.io.safetensors")]);
    let (model, _, report) = load_u2net::<B>(&out_dir, DType::F32, &device()).expect("load");
    assert!(report.unused.is_empty(), "{:?}", report.unused);
    let [d0, ..] = model.forward(io(&io_set, "image"));
    assert_close("u2net.convert.d0", d0, io(&io_set, "d0"), 1e-3);
}

fn convert_fails(input: &Path, extra: &[&str], out_dir: &Path) -> String {
    let out = rfstudio()
        .args(["convert", "u2net"])
        .arg(input)
        .arg("--out")
        .arg(out_dir)
        .args(extra)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}: stderr: {stderr}",
        input.display()
    );
    assert!(
        stderr.contains(&input.display().to_string()),
        "the error does not name {}: {stderr}",
        input.display()
    );
    assert!(
        !out_dir.join("model.safetensors").exists(),
        "a wrong file left weights behind"
    );
    stderr
}

#[test]
fn u2net_convert_rejects_wrong_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out_dir = tmp.path().join("out");
    // a text file
    let text = tmp.path().join("notes.pth");
    std::fs::write(&text, "these are not weights\n").expect("write");
    let err = convert_fails(&text, &[], &out_dir);
    assert!(err.contains("not a readable PyTorch checkpoint"), "{err}");
    // a truncated copy of a real checkpoint
    let bytes = std::fs::read(fixture("u2netp_f16.pth")).expect("pth");
    let truncated = tmp.path().join("truncated.pth");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let err = convert_fails(&truncated, &[], &out_dir);
    assert!(err.contains("truncated"), "{err}");
    // a safetensors file under a .pth name
    let st = tmp.path().join("model.pth");
    std::fs::copy(tiny().join("model.safetensors"), &st).expect("copy");
    let err = convert_fails(&st, &[], &out_dir);
    assert!(err.contains("safetensors"), "{err}");
    // the right file with the wrong --arch
    let err = convert_fails(&fixture("u2netp_f16.pth"), &["--arch", "u2net"], &out_dir);
    assert!(err.contains("u2netp state dict"), "{err}");
    // a state dict of another network
    let other = BTreeMap::from([
        ("conv1.weight".to_string(), vec![64, 3, 7, 7]),
        ("fc.weight".to_string(), vec![1000, 2048]),
    ]);
    let err = detect_arch(Path::new("resnet50.pth"), &other).expect_err("not a U2-Net");
    assert!(
        err.to_string()
            .starts_with("resnet50.pth: not a U2-Net state dict"),
        "{err}"
    );
}

#[test]
fn u2net_saliency_map_on_white_canvas() {
    let dev = device();
    let perception = rfstudio::pipeline::judge::Perception::<B>::load(
        &root().join("models/tiny/dpt-hybrid"),
        &tiny(),
        Default::default(),
        DType::F32,
        &dev,
    )
    .expect("load");
    // the kettle, fitted into a white 128x128 canvas
    let kettle = image::open(root().join("sample-data").join("kettle.png"))
        .expect("kettle")
        .resize(96, 96, image::imageops::FilterType::Triangle)
        .to_rgba8();
    let mut canvas = image::RgbaImage::from_pixel(128, 128, image::Rgba([255, 255, 255, 255]));
    let (x, y) = ((128 - kettle.width()) / 2, (128 - kettle.height()) / 2);
    image::imageops::overlay(&mut canvas, &kettle, x.into(), y.into());
    let canvas = image::DynamicImage::ImageRgba8(canvas).to_rgb8();
    let map = perception.map_images(&canvas).expect("finite maps").1;
    assert_eq!(map.dimensions(), (128, 128));
    let min = map.pixels().map(|p| p.0[0]).min();
    let max = map.pixels().map(|p| p.0[0]).max();
    // min-max normalised at the model's resolution (as u2net_test.py's normPRED), then resized
    // bilinearly to the image: the extremes fall between output pixels
    assert!(min.is_some_and(|m| m < 32) && max.is_some_and(|m| m > 223), "{min:?} {max:?}");
    // a non-square size comes back at its own size
    let wide = image::imageops::resize(&canvas, 100, 60, image::imageops::FilterType::Triangle);
    assert_eq!(perception.map_images(&wide).expect("finite maps").1.dimensions(), (100, 60));
}

//! `rfstudio generate` (one product): absurd sizes and settings, broken scoring models, NaN
//! weights, the products people really upload (phone photos with EXIF orientation, glass,
//! 65 MP files), and progress when standard error is not a terminal.

use std::path::Path;

use rfstudio::pipeline::product::{MAX_PIXELS, Placement, load_rgba, place_file};

use super::{poison_safetensors, product_png, run, tiny_copy};
use crate::common::root;

/// `generate` on the tiny models with fast defaults (1 step, 64 px, threshold 0) that `extra`
/// may override.
fn gen_args<'a>(models: &'a str, product: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["generate", "--models", models, "--device", "cpu", "--prompt", "x", "--product", product, "--out", out];
    for (flag, value) in [("--steps", "1"), ("--size", "64"), ("--threshold", "0")] {
        if !extra.iter().any(|e| e.split('=').next() == Some(flag)) {
            v.extend([flag, value]);
        }
    }
    v.extend_from_slice(extra);
    v
}

#[test]
fn hostile_generate_absurd_numbers_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out");
    let out = out.to_str().expect("utf8");
    let bag = "sample-data/bag.png";
    let cases: &[(&[&str], &str)] = &[
        (&["--size", "8192"], "between 64 and 2048"),
        (&["--size", "65536"], "between 64 and 2048"),
        (&["--size", "100"], "multiple of 64"),
        (&["--guidance=-5"], "guidance -5"),
        (&["--guidance", "1e30"], "between 0 and 30"),
        (&["--guidance", "NaN"], "guidance NaN"),
        (&["--guidance", "inf"], "guidance inf"),
        (&["--controlnet-scale=-100"], "ControlNet scale -100"),
        (&["--controlnet-scale", "1e9"], "between 0 and 2"),
        (&["--steps", "0"], "--steps 0"),
        (&["--steps", "100000"], "--steps 100000"),
        (&["--attempts", "0"], "--attempts 0"),
        (&["--batch", "100000"], "--batch 100000"),
        (&["--threshold", "NaN"], "--threshold NaN"),
        (&["--scale", "0"], "--scale 0"),
        (&["--position", "NaN,0.5"], "--position NaN"),
    ];
    for (extra, needle) in cases {
        run(gen_args("models/tiny", bag, out, extra)).fails(2, &[needle]);
    }
    // 2048 px is within the cap but not within this machine's memory on the CPU backend: refused
    // from the estimate, naming both numbers, before a model is loaded.
    run(gen_args("models/tiny", bag, out, &["--size", "2048"])).fails(2, &["needs about", "available"]);
    assert!(!Path::new(out).join("attempt_001.png").exists(), "nothing generated");
    // a folder or a missing file as the product
    run(gen_args("models/tiny", "sample-data", out, &[])).fails(2, &["sample-data"]);
    run(gen_args("models/tiny", "/nonexistent/p.png", out, &[])).fails(2, &["/nonexistent/p.png"]);
}

#[test]
fn hostile_generate_broken_scoring_models_are_exit_3_and_absent_ones_run_unscored() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out");
    let out = out.to_str().expect("utf8");
    let bag = "sample-data/bag.png";
    // A corrupt RFNet header: installed but broken is exit 3, never "unscored".
    let models = tiny_copy(&tmp.path().join("a"));
    let weights = models.join("rfnet/model.safetensors");
    let bytes = std::fs::read(&weights).expect("read");
    std::fs::write(&weights, &bytes[..100]).expect("truncate");
    run(gen_args(models.to_str().expect("utf8"), bag, out, &[])).fails(3, &["not a valid safetensors file"]);
    // A wrong dimension in RFNet's and in U2-Net's config.json.
    for (role, key, value) in [("rfnet", "width", serde_json::json!(40)), ("u2netp", "architecture", serde_json::json!("u2net"))] {
        let models = tiny_copy(&tmp.path().join(format!("cfg-{role}")));
        let cfg = models.join(role).join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).expect("cfg")).expect("json");
        v[key] = value;
        std::fs::write(&cfg, v.to_string()).expect("write");
        let r = run(gen_args(models.to_str().expect("utf8"), bag, out, &[]));
        r.fails(3, &[]);
        assert!(r.stderr.contains(role), "{role}: {}", r.stderr);
    }
    // RFNet installed, depth model missing: exit 3 naming depth.
    let models = tiny_copy(&tmp.path().join("nodepth"));
    std::fs::remove_dir_all(models.join("dpt-hybrid")).expect("rm");
    run(gen_args(models.to_str().expect("utf8"), bag, out, &[])).fails(3, &["needs the depth model"]);
    // No RFNet at all: unscored, exit 0, and said.
    let models = tiny_copy(&tmp.path().join("norfnet"));
    std::fs::remove_dir_all(models.join("rfnet")).expect("rm");
    let r = run(gen_args(models.to_str().expect("utf8"), bag, out, &[]));
    r.ok();
    assert!(r.stdout.contains("unscored"), "{}", r.stdout);
}

#[test]
fn hostile_generate_nan_weights_are_named_and_overflow_is_exit_5() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out");
    let out = out.to_str().expect("utf8");
    let bag = "sample-data/bag.png";
    // NaN in the UNet: models invalid, the file and tensor named, no dtype advice.
    let models = tiny_copy(&tmp.path().join("unet"));
    let key = poison_safetensors(&models.join("sd15/unet/diffusion_pytorch_model.safetensors"), "conv_in.weight", f32::NAN);
    let r = run(gen_args(models.to_str().expect("utf8"), bag, out, &[]));
    r.fails(3, &[&key, "corrupt"]);
    assert!(!r.stderr.contains("--dtype f32"), "{}", r.stderr);
    // NaN in RFNet: exit 3 even with --threshold 0 (never "no available image").
    let models = tiny_copy(&tmp.path().join("rfnet"));
    let key = poison_safetensors(&models.join("rfnet/model.safetensors"), "classifier", f32::NAN);
    run(gen_args(models.to_str().expect("utf8"), bag, out, &[])).fails(3, &[&key, "RFNet"]);
    // Finite weights so large the f32 activations overflow: a numerical failure (5).
    let models = tiny_copy(&tmp.path().join("huge"));
    poison_safetensors(&models.join("sd15/unet/diffusion_pytorch_model.safetensors"), "conv_in.weight", 3e38);
    run(gen_args(models.to_str().expect("utf8"), bag, out, &[])).fails(5, &["NaN or Inf"]);
}

/// CRC-32 (IEEE) for the PNG chunk written below.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Insert an eXIf chunk with the given orientation right after IHDR (where phones put it).
fn with_exif_orientation(png: &Path, orientation: u16) {
    let bytes = std::fs::read(png).expect("read");
    let mut exif = b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
    exif.extend_from_slice(&orientation.to_be_bytes());
    exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut chunk = (exif.len() as u32).to_be_bytes().to_vec();
    let mut body = b"eXIf".to_vec();
    body.extend_from_slice(&exif);
    chunk.extend_from_slice(&body);
    chunk.extend_from_slice(&crc32(&body).to_be_bytes());
    let ihdr_end = 8 + 25;
    let mut out = bytes[..ihdr_end].to_vec();
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&bytes[ihdr_end..]);
    std::fs::write(png, out).expect("write");
}

#[test]
fn hostile_generate_real_uploads_exif_glass_and_huge_products() {
    let tmp = tempfile::tempdir().expect("tmp");
    // 1. A phone photo stored landscape with orientation 6 (rotate 90 degrees clockwise): the
    // product is upright once loaded. The left half is red in the stored pixels; after the
    // rotation the top half is red.
    let phone = tmp.path().join("phone.png");
    image::RgbaImage::from_fn(60, 30, |x, _| {
        if x < 30 { image::Rgba([255, 0, 0, 255]) } else { image::Rgba([0, 0, 255, 128]) }
    })
    .save(&phone)
    .expect("save");
    with_exif_orientation(&phone, 6);
    let rgba = load_rgba(&phone, false).expect("load");
    assert_eq!(rgba.dimensions(), (30, 60), "orientation 6 turns 60x30 into 30x60");
    assert_eq!(rgba.get_pixel(15, 5).0, [255, 0, 0, 255], "red on top");
    assert_eq!(rgba.get_pixel(15, 55).0[2], 255, "blue at the bottom");
    // 2. Glass: alpha 89 everywhere it is visible. Placed and generated, not refused.
    let glass = tmp.path().join("glass.png");
    product_png(&glass, 120, 89);
    let placed = place_file(&glass, &Placement { canvas: 64, ..Placement::default() }).expect("glass places");
    let (_, _, w, h) = placed.bbox;
    assert!(w >= 40 && h >= 40, "the faint product keeps its outline: {:?}", placed.bbox);
    assert!(placed.inpaint_mask.pixels().any(|p| p[0] < 255), "the mask follows the soft alpha");
    let out = tmp.path().join("glass-out");
    run(gen_args("models/tiny", glass.to_str().expect("utf8"), out.to_str().expect("utf8"), &[])).ok();
    // Fully transparent is still refused, truthfully.
    let clear = tmp.path().join("clear.png");
    product_png(&clear, 64, 0);
    run(gen_args("models/tiny", clear.to_str().expect("utf8"), out.to_str().expect("utf8"), &[])).fails(2, &["fully transparent"]);
    // 3. A 65.6 MP product is downscaled on load (aspect kept), not refused.
    let big = tmp.path().join("big.png");
    image::RgbaImage::from_fn(8200, 8000, |x, y| {
        if (2000..6000).contains(&x) && (2000..6000).contains(&y) { image::Rgba([10, 200, 10, 255]) } else { image::Rgba([0, 0, 0, 0]) }
    })
    .save(&big)
    .expect("save big");
    let rgba = load_rgba(&big, false).expect("big loads");
    let (w, h) = rgba.dimensions();
    assert!((w as u64 * h as u64) <= MAX_PIXELS, "{w}x{h}");
    assert!(((w as f64 / h as f64) - 8200.0 / 8000.0).abs() < 0.01, "{w}x{h}");
}

#[test]
fn hostile_generate_progress_is_plain_text_when_stderr_is_not_a_terminal() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out");
    let r = run(gen_args("models/tiny", "sample-data/bag.png", out.to_str().expect("utf8"), &["--steps", "3", "--attempts", "2", "--threshold", "1"]));
    // tiny random weights never reach P(Available) = 1: two attempts, exit 4
    r.fails(4, &["no available image"]);
    assert!(!r.stderr.contains('\u{1b}'), "no ANSI codes: {:?}", r.stderr);
    assert!(r.stderr.contains("/6 (attempt 1, step 1/3)"), "a whole-run counter over both attempts: {}", r.stderr);
    assert!(r.stderr.contains("6/6 (attempt 2, step 3/3)"), "the last step is always shown: {}", r.stderr);
    assert!(r.stderr.contains("attempt 1 (seed"), "{}", r.stderr);
    let _ = root();
}

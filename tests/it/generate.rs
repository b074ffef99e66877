//! The ad pipeline end to end on the tiny models: parity of the latent-blend sampler with
//! diffusers' ControlNet-inpaint pipeline, the CLI on every sample product, determinism,
//! cancellation, recurrent generation with a scorer, and bad inputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{DType, Tensor, TensorData};
use image::{RgbImage, Rgba, RgbaImage};
use rfstudio::pipeline::generate::{AdGenerator, CancelToken, GenError, GenEvent, JobMessage, ModelPaths, run_generation, spawn_generation};
use rfstudio::pipeline::params::GenerateParams;
use rfstudio::pipeline::output::read_png_text;
use rfstudio::pipeline::product::PlacedProduct;
use rfstudio::pipeline::scheduler::{Ddim, Scheduler};
use rfstudio::pipeline::score::{ClassProbs, ScoreError, Scored, Scorer};
use rfstudio::pipeline::sampler::{self, Conditioning, Inpaint, SampleParams, ensure_finite};
use rfstudio::pipeline::sd::{StableDiffusion, load_controlnet};

use crate::common::*;

fn tiny(p: &str) -> PathBuf {
    root().join("models").join("tiny").join(p)
}

fn paths() -> ModelPaths {
    ModelPaths {
        base: tiny("sd15"),
        controlnet: tiny("controlnet-canny"),
        scorer: None,
        test_weights: true,
        loras: Vec::new(),
    }
}

fn small_params(seed: u64) -> GenerateParams {
    GenerateParams {
        prompt: "a kettle on a kitchen counter".into(),
        negative: "blurry".into(),
        title: "不锈钢电热水壶".into(),
        seed: Some(seed),
        steps: 3,
        canvas: 128,
        attempts: 1,
        ..GenerateParams::default()
    }
}

#[test]
fn parity_pipeline_inpaint_latent_blend_matches_diffusers() {
    let dev = device();
    let io_set = open(&[&fixture("inpaint_pipeline.io.safetensors")]);
    let meta = io_set.files()[0].metadata().clone();
    let sd = StableDiffusion::<B>::load(&tiny("sd15"), DType::F32, &dev).expect("sd");
    let cn = load_controlnet::<B>(&tiny("controlnet-canny"), DType::F32, &dev).expect("cn");
    let ctx = sd
        .encode_prompt_pair(&meta["prompt"], &meta["negative_prompt"], &dev)
        .expect("encode");
    assert_close("inpaint prompt embeds", ctx.clone(), io(&io_set, "prompt_embeds"), 1e-4);
    // The product latent from our VAE (distribution mean) equals the pipeline's.
    let init = io::<4>(&io_set, "init_image").mul_scalar(2.0).sub_scalar(1.0);
    let image_latents = sd.vae.encode(init).mean.mul_scalar(sd.vae_config.scaling_factor);
    assert_close("inpaint image latents", image_latents.clone(), io(&io_set, "image_latents"), 1e-4);
    let scheduler = Ddim::new(&sd.scheduler, meta["steps"].parse().expect("steps")).expect("ddim");
    let params = SampleParams {
        guidance: meta["guidance"].parse().expect("g"),
        controlnet_scale: meta["controlnet_scale"].parse().expect("s"),
    };
    let noise: burn::tensor::Tensor<B, 4> = io(&io_set, "latents");
    let inpaint = Inpaint::new(image_latents, io(&io_set, "latent_mask"), noise.clone());
    let cond = Conditioning::shared(&ctx, Some(&io(&io_set, "control")), noise.dims()[0]);
    let steps = scheduler.timesteps().len();
    let latents = sampler::sample(&sd.unet, Some(&cn), &scheduler, &cond, inpaint.start(&scheduler), Some(&inpaint), &params, 0..steps, |_| true)
        .expect("sample");
    assert_close("inpaint final latents", latents, io(&io_set, "final_latents"), 1e-3);
}

#[test]
fn generate_latent_mask_matches_diffusers_mask_processing() {
    // diffusers: binarise at 0.5, then nearest-resize = the top-left pixel of each 8x8 block.
    let io_set = open(&[&fixture("inpaint_pipeline.io.safetensors")]);
    let mask = io::<4>(&io_set, "mask").into_data().convert::<f32>().to_vec::<f32>().expect("mask");
    let reference = io::<4>(&io_set, "latent_mask").into_data().convert::<f32>().to_vec::<f32>().expect("lm");
    let gray = image::GrayImage::from_fn(64, 64, |x, y| image::Luma([(mask[(y * 64 + x) as usize] * 255.0) as u8]));
    let placed = PlacedProduct {
        source: PathBuf::new(),
        rgba: RgbaImage::new(64, 64),
        inpaint_mask: gray,
        control: RgbImage::new(64, 64),
        bbox: (0, 0, 1, 1),
    };
    assert_eq!(placed.latent_mask(8), reference);
}

fn rfstudio() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rfstudio"));
    // English messages whatever the machine's locale (the tests read them).
    c.env("RFSTUDIO_LANG", "en");
    c.current_dir(root());
    c.env_remove("RFSTUDIO_DEVICE").env_remove("RFSTUDIO_MODELS").env_remove("RFSTUDIO_DTYPE");
    c
}

fn rgba_of(path: &Path) -> RgbaImage {
    image::open(path).expect("open").into_rgba8()
}

#[test]
fn cli_generate_every_sample_product_and_resume() {
    let out = tempfile::tempdir().expect("tmp");
    let run = || {
        rfstudio()
            .args(["generate", "--models", "models/tiny", "--device", "cpu", "--batch-file", "sample-data/products.jsonl"])
            // the tiny manifest has an RFNet: threshold 0 accepts the first (scored) attempt
            .args(["--steps", "2", "--size", "128", "--seed", "11", "--threshold", "0", "--json", "--out"])
            .arg(out.path())
            .output()
            .expect("run")
    };
    let first = run();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&first.stderr));
    let products: Vec<serde_json::Value> = std::fs::read_to_string(root().join("sample-data/products.jsonl"))
        .expect("jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("line"))
        .collect();
    assert!(products.len() >= 8);
    for p in &products {
        let id = p["id"].as_str().expect("id");
        let dir = out.path().join(id);
        for f in ["product.png", "control.png", "mask.png", "attempt_001.png", "best.png", "attempts.jsonl", "run.json", "summary.json"] {
            assert!(dir.join(f).is_file(), "{id}: {f} missing");
        }
        // Product pixels inside the (undilated) opaque alpha are exactly the placed product.
        let placed = rgba_of(&dir.join("product.png"));
        let best = image::open(dir.join("best.png")).expect("best").into_rgb8();
        let mut inside = 0;
        for (x, y, px) in placed.enumerate_pixels() {
            if px[3] == 255 {
                inside += 1;
                assert_eq!(best.get_pixel(x, y).0, [px[0], px[1], px[2]], "{id} at {x},{y}");
            }
        }
        assert!(inside > 100, "{id}: product too small ({inside} px)");
        // Metadata round-trips.
        let text = read_png_text(&dir.join("attempt_001.png")).expect("text");
        let get = |k: &str| text.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone()).expect(k);
        let meta: serde_json::Value = serde_json::from_str(&get("rfstudio")).expect("meta json");
        assert_eq!(meta["seed"], 11);
        assert_eq!(meta["prompt"], p["prompt"]);
        assert_eq!(meta["title"], p["title_zh"]);
        assert_eq!(meta["test_weights"], true);
        let params = get("parameters");
        assert!(params.starts_with(p["prompt"].as_str().expect("prompt")), "{params}");
        assert!(params.contains("Seed: 11") && params.contains("Sampler: DDIM") && params.contains("Test weights"), "{params}");
        let line = std::fs::read_to_string(dir.join("attempts.jsonl")).expect("attempts");
        let rec: serde_json::Value = serde_json::from_str(line.lines().next().expect("line")).expect("json");
        assert_eq!(rec["seed"], 11);
    }
    assert!(stdout.lines().any(|l| l.contains("\"event\":\"step\"")), "{stdout}");
    // Rerun: every product is already finished and skipped (resumable catalogue).
    let t0 = std::fs::metadata(out.path().join("chair/best.png")).expect("meta").modified().expect("mtime");
    let second = run();
    assert!(second.status.success());
    assert!(!String::from_utf8_lossy(&second.stdout).contains("\"event\":\"step\""));
    let t1 = std::fs::metadata(out.path().join("chair/best.png")).expect("meta").modified().expect("mtime");
    assert_eq!(t0, t1, "finished products must not be regenerated");
}

#[test]
fn generate_same_seed_same_image_different_seed_differs() {
    let generator = AdGenerator::<B>::load(&paths(), DType::F32, &device()).expect("load");
    let product = root().join("sample-data/kettle.png");
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
    for (dir, seed) in dirs.iter().zip([5u64, 5, 6]) {
        run_generation(&generator, None, &product, &small_params(seed), dir.path(), &CancelToken::new(), &mut |_| {})
            .expect("generate");
    }
    let img = |d: &tempfile::TempDir| image::open(d.path().join("best.png")).expect("png").into_rgb8();
    assert_eq!(img(&dirs[0]).as_raw(), img(&dirs[1]).as_raw(), "same seed must give the same image");
    assert_ne!(img(&dirs[0]).as_raw(), img(&dirs[2]).as_raw(), "different seeds must differ");
}

#[test]
fn generate_cancel_stops_within_one_step() {
    let generator = AdGenerator::<B>::load(&paths(), DType::F32, &device()).expect("load");
    let dir = tempfile::tempdir().expect("tmp");
    let cancel = CancelToken::new();
    let mut steps_seen = 0;
    let k = 2;
    let params = GenerateParams { steps: 6, ..small_params(1) };
    let result = run_generation(
        &generator,
        None,
        &root().join("sample-data/jar.png"),
        &params,
        dir.path(),
        &cancel,
        &mut |e| {
            if let GenEvent::Step { step, .. } = e {
                steps_seen = step;
                if step == k {
                    cancel.cancel();
                }
            }
        },
    );
    assert!(matches!(result, Err(GenError::Cancelled)), "{:?}", result.err());
    assert!(steps_seen <= k + 1, "ran {steps_seen} steps after cancelling at {k}");
    assert!(!dir.path().join("best.png").exists());
}

#[test]
fn generate_job_on_worker_thread_reports_progress_and_cancels() {
    let selection = rfstudio::device::select(rfstudio::device::DeviceRequest::Cpu).expect("cpu");
    let dir = tempfile::tempdir().expect("tmp");
    let params = GenerateParams { steps: 30, ..small_params(2) };
    let handle = spawn_generation(
        selection,
        rfstudio::device::Precision::F32,
        paths(),
        root().join("sample-data/lamp.png"),
        params,
        dir.path().to_path_buf(),
        || {},
    );
    let mut steps = 0;
    let mut done = None;
    while let Ok(msg) = handle.events.recv() {
        match msg {
            JobMessage::Event(GenEvent::Step { step, preview, .. }) => {
                assert_eq!(preview.dimensions(), (16, 16));
                steps = step;
                if step == 1 {
                    handle.cancel.cancel();
                }
            }
            JobMessage::Event(_) => {}
            JobMessage::Done(r) => {
                done = Some(r);
                break;
            }
        }
    }
    assert!(
        matches!(done.expect("done"), Err(rfstudio::pipeline::generate::GenError::Cancelled)),
        "cancel is a variant of the result, not a string"
    );
    assert!(steps <= 2, "{steps}");
    handle.join();
}

/// A scorer with a fixed sequence of P(Available): tests the recurrent loop's logic.
struct Sequence(Vec<f32>, usize);

impl Scorer for Sequence {
    fn name(&self) -> String {
        "sequence".into()
    }
    fn score(&mut self, _: &PlacedProduct, _: &RgbImage, _: &str) -> Result<Scored, ScoreError> {
        let p = self.0[self.1.min(self.0.len() - 1)];
        self.1 += 1;
        let rest = (1.0 - p) / 4.0;
        Ok(ClassProbs([p, rest, rest, rest, rest]).into())
    }
}

#[test]
fn generate_recurrent_stops_at_first_available_and_picks_best() {
    let generator = AdGenerator::<B>::load(&paths(), DType::F32, &device()).expect("load");
    let product = root().join("sample-data/shoe.png");
    // Reaches the threshold at attempt 3 of 5.
    let dir = tempfile::tempdir().expect("tmp");
    let mut scorer = Sequence(vec![0.2, 0.4, 0.7, 0.9], 0);
    let params = GenerateParams { attempts: 5, threshold: 0.6, steps: 2, ..small_params(100) };
    let s = run_generation(&generator, Some(&mut scorer), &product, &params, dir.path(), &CancelToken::new(), &mut |_| {})
        .expect("run");
    assert_eq!(s.attempts.len(), 3);
    assert_eq!(s.best, 2);
    assert_eq!(s.available, Some(true));
    assert_eq!(s.attempts.iter().map(|a| a.seed).collect::<Vec<_>>(), vec![100, 101, 102]);
    // Never reaches it: all attempts used, best = highest P(Available), not available.
    let dir = tempfile::tempdir().expect("tmp");
    let mut scorer = Sequence(vec![0.1, 0.45, 0.3], 0);
    let params = GenerateParams { attempts: 3, threshold: 0.6, steps: 2, batch: 2, ..small_params(7) };
    let s = run_generation(&generator, Some(&mut scorer), &product, &params, dir.path(), &CancelToken::new(), &mut |_| {})
        .expect("run");
    assert_eq!(s.attempts.len(), 3);
    assert_eq!(s.best, 1);
    assert_eq!(s.available, Some(false));
    let best = std::fs::read(dir.path().join("best.png")).expect("best");
    let second = std::fs::read(dir.path().join("attempt_002.png")).expect("a2");
    assert_eq!(best, second);
    let lines = std::fs::read_to_string(dir.path().join("attempts.jsonl")).expect("jsonl");
    assert_eq!(lines.lines().count(), 3);
}

#[test]
fn generate_nan_guard_gives_a_clear_message() {
    let dev = device();
    let t = Tensor::<B, 4>::from_data(TensorData::new(vec![0.0f32, f32::NAN, 1.0, 2.0], [1, 1, 2, 2]), &dev);
    let msg = ensure_finite(&t, "latents").unwrap_err().to_string();
    assert!(msg.contains("NaN") && msg.contains("latents"), "{msg}");
    // The advice depends on the dtype and on whether the weights themselves are finite.
    let f16 = rfstudio::models::weights::NonFiniteOutput::diagnose("m", "latents", DType::F16, &[]).to_string();
    assert!(f16.contains("--dtype f32"), "{f16}");
    let f32_msg = rfstudio::models::weights::NonFiniteOutput::diagnose("m", "latents", DType::F32, &[]).to_string();
    assert!(!f32_msg.contains("--dtype f32") && f32_msg.contains("finite"), "{f32_msg}");
    let sd = StableDiffusion::<B>::load(&tiny("sd15"), DType::F32, &dev).expect("sd");
    let nan = Tensor::<B, 4>::full([1, 4, 2, 2], f32::NAN, &dev);
    let msg = rfstudio::pipeline::sampler::decode_images(&sd, nan).err().expect("must fail").to_string();
    assert!(msg.contains("decoded images"), "{msg}");
}

fn generate_cli(product: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    rfstudio()
        .args(["generate", "--models", "models/tiny", "--device", "cpu", "--steps", "1", "--size", "64", "--threshold", "0", "--prompt", "x", "--product"])
        .arg(product)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("run")
}

fn assert_fails(out: std::process::Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in: {err}");
    }
}

#[test]
fn generate_bad_inputs_are_clear_errors_with_exit_codes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out");
    // No alpha channel.
    let rgb = tmp.path().join("rgb.png");
    RgbImage::from_pixel(64, 64, image::Rgb([10, 200, 30])).save(&rgb).expect("save");
    assert_fails(generate_cli(&rgb, &out, &[]), 2, &["rgb.png", "no alpha", "--white-bg"]);
    // ... accepted with --white-bg when there is a white background.
    let white = tmp.path().join("white.png");
    RgbImage::from_fn(64, 64, |x, _| if (20..40).contains(&x) { image::Rgb([200, 0, 0]) } else { image::Rgb([255, 255, 255]) })
        .save(&white)
        .expect("save");
    let ok = generate_cli(&white, &out, &["--white-bg"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // Empty alpha.
    let empty = tmp.path().join("empty.png");
    RgbaImage::from_pixel(64, 64, Rgba([0, 0, 0, 0])).save(&empty).expect("save");
    assert_fails(generate_cli(&empty, &out, &[]), 2, &["empty.png", "empty"]);
    // Corrupt file.
    let corrupt = tmp.path().join("corrupt.png");
    let mut bytes = std::fs::read(root().join("sample-data/bag.png")).expect("bag");
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&corrupt, bytes).expect("write");
    assert_fails(generate_cli(&corrupt, &out, &[]), 2, &["corrupt.png"]);
    // Not an image at all.
    let text = tmp.path().join("notes.png");
    std::fs::write(&text, "hello").expect("write");
    assert_fails(generate_cli(&text, &out, &[]), 2, &["notes.png"]);
    // 17000 x 17000 (289 MP): over the decode bound, refused from the header before decoding.
    let huge = tmp.path().join("huge.png");
    write_huge_png(&huge, 17000, 17000);
    assert_fails(generate_cli(&huge, &out, &[]), 2, &["huge.png", "17000x17000", "MP"]);
    // Unwritable output folder (its parent is a file).
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").expect("write");
    assert_fails(
        generate_cli(&root().join("sample-data/bag.png"), &blocker.join("out"), &[]),
        2,
        &["cannot write"],
    );
    // Missing models: exit 3 with install instructions.
    let out3 = rfstudio()
        .args(["generate", "--models", "/nonexistent-models", "--device", "cpu", "--prompt", "x", "--product", "sample-data/bag.png", "--out"])
        .arg(&out)
        .output()
        .expect("run");
    assert_fails(out3, 3, &["base", "install"]);
    // Bad settings.
    assert_fails(generate_cli(&root().join("sample-data/bag.png"), &out, &["--threshold", "2"]), 2, &["--threshold"]);
}

/// A valid, fully transparent PNG of the given size, written row by row (never in memory whole).
pub fn write_huge_png(path: &Path, w: u32, h: u32) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut enc = png::Encoder::new(file, w, h);
    enc.set_color(png::ColorType::GrayscaleAlpha);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    let mut writer = enc.write_header().expect("header");
    let mut stream = writer.stream_writer().expect("stream");
    let row = vec![0u8; (w * 2) as usize];
    use std::io::Write;
    for _ in 0..h {
        stream.write_all(&row).expect("row");
    }
    stream.finish().expect("finish");
}

/// A worker that panics still sends its last message, so nobody waits forever.
#[test]
fn generate_job_handle_turns_a_worker_panic_into_its_result() {
    use rfstudio::pipeline::generate::{GenError, JobHandle, JobMessage};
    let job = JobHandle::spawn(|| {}, |_, _| panic!("boom"));
    let last = job.events.recv_timeout(std::time::Duration::from_secs(10)).expect("a last message");
    match last {
        JobMessage::Done(Err(GenError::Panicked(m))) => assert!(m.contains("boom"), "{m}"),
        other => panic!("expected the panic as the result, got {other:?}"),
    }
    job.join();
}

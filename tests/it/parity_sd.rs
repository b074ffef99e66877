//! Parity of the SD 1.5 stack against diffusers 0.42.1 / transformers 5.24 at tiny configs
//! (fixtures written by tests/fixtures/make_fixtures.py from models/tiny).

use std::path::PathBuf;

use burn::tensor::{DType, Int, Tensor, TensorData};
use rfstudio::models::clip::{ClipTokenizer, load_text_encoder};
use rfstudio::models::weights::{Weights, read_ints};
use rfstudio::pipeline::scheduler::{Ddim, Scheduler, SchedulerConfig};
use rfstudio::pipeline::sampler::{self, Conditioning, SampleParams};
use rfstudio::pipeline::sd::{
    StableDiffusion, load_controlnet, load_unet, load_vae,
};
use rfstudio::models::unet::ControlResiduals;

use crate::common::*;

fn tiny(p: &str) -> PathBuf {
    root().join("models").join("tiny").join(p)
}

fn scalar(w: &Weights, key: &str) -> f32 {
    io::<1>(w, key).into_data().convert::<f32>().to_vec::<f32>().expect("f32")[0]
}

#[derive(serde::Deserialize)]
struct TokCase {
    text: String,
    ids: Vec<u32>,
    ids_untruncated: Vec<u32>,
}

#[test]
fn parity_tokenizer_clip_full_vocab_matches_transformers() {
    let tok = ClipTokenizer::from_folder(&fixture("clip_tokenizer")).expect("tokenizer");
    assert_eq!((tok.bos_id, tok.eos_id, tok.pad_id), (49406, 49407, 49407));
    let cases: Vec<TokCase> =
        serde_json::from_str(&std::fs::read_to_string(fixture("clip_tokenizer_cases.json")).expect("cases"))
            .expect("json");
    assert!(cases.len() >= 20);
    let mut truncated = 0;
    for case in &cases {
        let enc = tok.encode(&case.text).expect("encode");
        assert_eq!(enc.ids, case.ids, "padded ids differ for {:?}", case.text);
        let raw = tok.encode_unpadded(&case.text).expect("encode");
        assert_eq!(raw, case.ids_untruncated, "ids differ for {:?}", case.text);
        assert_eq!(enc.truncated_tokens, raw.len().saturating_sub(77));
        if enc.truncated_tokens > 0 {
            truncated += 1;
        }
    }
    assert!(truncated >= 1, "no >77-token case in the fixture");
}

#[test]
fn parity_clip_text_encoder() {
    let dev = device();
    let io_set = open(&[&fixture("clip_text.io.safetensors")]);
    let (model, report) = load_text_encoder::<B>(&tiny("sd15/text_encoder"), DType::F32, &dev).expect("load");
    assert!(report.unused.is_empty(), "{:?}", report.unused);
    let (ids, shape) = read_ints(&io_set, "input_ids").expect("ids");
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), &dev);
    let out = model.forward(ids);
    assert_close("clip_text", out, io(&io_set, "last_hidden_state"), 1e-4);
    // The tiny tokenizer gives the same ids as transformers did for these prompts.
    let tok = ClipTokenizer::from_folder(&tiny("sd15/tokenizer")).expect("tok");
    let (ref_ids, _) = read_ints(&io_set, "input_ids").expect("ids");
    let ours: Vec<i64> = ["a red chair in a sunny room", ""]
        .iter()
        .flat_map(|p| tok.encode(p).expect("enc").ids.into_iter().map(i64::from))
        .collect();
    assert_eq!(ours, ref_ids);
}

fn residuals(io_set: &Weights, prefix: &str, mid: &str, n: usize) -> ControlResiduals<B> {
    ControlResiduals {
        down: (0..n).map(|i| io::<4>(io_set, &format!("{prefix}{i}"))).collect(),
        mid: io(io_set, mid),
    }
}

#[test]
fn parity_unet_with_and_without_controlnet_residuals() {
    let dev = device();
    let io_set = open(&[&fixture("unet.io.safetensors")]);
    let unet = load_unet::<B>(&tiny("sd15/unet"), DType::F32, &dev).expect("load unet");
    let sample = io::<4>(&io_set, "sample");
    let ctx = io::<3>(&io_set, "encoder_hidden_states");
    let t = scalar(&io_set, "timestep");
    let out = unet.forward(sample.clone(), t, &ctx, None);
    assert_close("unet", out, io(&io_set, "out"), 1e-4);
    assert_eq!(unet.num_skips(), 6);
    let res = residuals(&io_set, "down_res.", "mid_res", 6);
    let out = unet.forward(sample, t, &ctx, Some(&res));
    assert_close("unet+residuals", out, io(&io_set, "out_with_res"), 1e-4);
}

#[test]
fn parity_controlnet_residuals() {
    let dev = device();
    let io_set = open(&[&fixture("controlnet.io.safetensors")]);
    let cn = load_controlnet::<B>(&tiny("controlnet-canny"), DType::F32, &dev).expect("load controlnet");
    let r = cn.forward(
        io(&io_set, "sample"),
        scalar(&io_set, "timestep"),
        &io(&io_set, "encoder_hidden_states"),
        io(&io_set, "controlnet_cond"),
        scalar(&io_set, "conditioning_scale"),
    );
    assert_eq!(r.down.len(), 6);
    for (i, d) in r.down.into_iter().enumerate() {
        assert_close(&format!("controlnet down.{i}"), d, io(&io_set, &format!("down.{i}")), 1e-4);
    }
    assert_close("controlnet mid", r.mid, io(&io_set, "mid"), 1e-4);
}

#[test]
fn parity_vae_encode_decode_and_legacy_names() {
    let dev = device();
    let io_set = open(&[&fixture("vae.io.safetensors")]);
    let vae = load_vae::<B>(&tiny("sd15/vae"), DType::F32, &dev).expect("load vae");
    let dist = vae.encode(io(&io_set, "image"));
    assert_close("vae mean", dist.mean, io(&io_set, "mean"), 1e-4);
    assert_close("vae logvar", dist.logvar, io(&io_set, "logvar"), 1e-4);
    let decoded = vae.decode(io(&io_set, "latent"));
    assert_close("vae decode", decoded, io(&io_set, "decoded"), 1e-4);

    // The same weights under the legacy attention names load and decode identically.
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::copy(tiny("sd15/vae/config.json"), dir.path().join("config.json")).expect("copy");
    std::fs::copy(
        fixture("vae_legacy.weights.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .expect("copy");
    let legacy = load_vae::<B>(dir.path(), DType::F32, &dev).expect("legacy vae");
    let decoded = legacy.decode(io(&io_set, "latent"));
    assert_close("vae decode (legacy names)", decoded, io(&io_set, "decoded"), 1e-4);
}

#[derive(serde::Deserialize)]
struct DdimRef {
    alphas_cumprod: Vec<f64>,
    timesteps: std::collections::BTreeMap<String, Vec<usize>>,
}

#[test]
fn parity_ddim_timesteps_and_step() {
    let r: DdimRef =
        serde_json::from_str(&std::fs::read_to_string(fixture("ddim.json")).expect("json")).expect("parse");
    let config = SchedulerConfig::from_file(&tiny("sd15/scheduler/scheduler_config.json")).expect("config");
    for (n, expected) in &r.timesteps {
        let d = Ddim::new(&config, n.parse().expect("n")).expect("ddim");
        assert_eq!(d.timesteps(), expected.as_slice(), "{n} steps");
    }
    let d = Ddim::new(&config, 40).expect("ddim");
    for (t, a) in r.alphas_cumprod.iter().enumerate() {
        assert!((d.alpha_cumprod(t) - a).abs() < 1e-7, "alpha_cumprod[{t}]");
    }
    let io_set = open(&[&fixture("ddim.io.safetensors")]);
    let sample = io::<4>(&io_set, "sample");
    let eps = io::<4>(&io_set, "eps");
    for which in ["first", "last"] {
        let t = scalar(&io_set, &format!("t_{which}")) as usize;
        let out = d.step(eps.clone(), t, sample.clone());
        assert_close(&format!("ddim prev ({which})"), out.prev_sample, io(&io_set, &format!("prev_{which}")), 1e-6);
        assert_close(&format!("ddim x0 ({which})"), out.pred_original_sample, io(&io_set, &format!("x0_{which}")), 1e-5);
    }
    let noised = d.add_noise(sample, io(&io_set, "noise"), scalar(&io_set, "add_noise_t") as usize);
    assert_close("ddim add_noise", noised, io(&io_set, "noised"), 1e-6);
}

#[test]
fn parity_pipeline_tiny_controlnet_cfg_4_steps() {
    let dev = device();
    let io_set = open(&[&fixture("pipeline.io.safetensors")]);
    let meta = io_set.files()[0].metadata().clone();
    let sd = StableDiffusion::<B>::load(&tiny("sd15"), DType::F32, &dev).expect("load sd");
    let cn = load_controlnet::<B>(&tiny("controlnet-canny"), DType::F32, &dev).expect("load cn");
    let ctx = sd
        .encode_prompt_pair(&meta["prompt"], &meta["negative_prompt"], &dev)
        .expect("encode");
    assert_close("pipeline prompt embeds", ctx.clone(), io(&io_set, "prompt_embeds"), 1e-4);
    let steps: usize = meta["steps"].parse().expect("steps");
    let scheduler = Ddim::new(&sd.scheduler, steps).expect("ddim");
    let params = SampleParams {
        guidance: meta["guidance"].parse().expect("g"),
        controlnet_scale: meta["controlnet_scale"].parse().expect("s"),
    };
    let control = io::<4>(&io_set, "control");
    let start: burn::tensor::Tensor<B, 4> = io(&io_set, "latents");
    let cond = Conditioning::shared(&ctx, Some(&control), start.dims()[0]);
    let mut seen = 0;
    let latents = sampler::sample(&sd.unet, Some(&cn), &scheduler, &cond, start, None, &params, 0..steps, |info| {
        seen += 1;
        assert_eq!(info.total, steps);
        true
    })
    .expect("sample");
    assert_eq!(seen, steps);
    assert_close("pipeline final latents", latents.clone(), io(&io_set, "final_latents"), 1e-3);
    let image = rfstudio::pipeline::sampler::decode_images(&sd, latents).expect("decode");
    assert_close("pipeline image", image, io(&io_set, "image"), 1e-3);
}

#[test]
fn sd_folder_renamed_tensor_error_names_it() {
    // Copy the tiny SD folder, rename one UNet tensor, and load through the real path.
    let dir = tempfile::tempdir().expect("tmp");
    let src = tiny("sd15");
    copy_dir(&src, dir.path());
    let unet_file = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    rename_tensor(
        &unet_file,
        "down_blocks.0.attentions.0.proj_in.weight",
        "down_blocks.0.attentions.0.proj_inn.weight",
    );
    let err = StableDiffusion::<B>::load(dir.path(), DType::F32, &device())
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(err.contains("down_blocks.0.attentions.0.proj_in.weight"), "{err}");
    assert!(err.contains("proj_inn.weight"), "{err}");
}

#[test]
fn sd_folder_fp16_weights_load_by_their_name() {
    let dir = tempfile::tempdir().expect("tmp");
    copy_dir(&tiny("sd15"), dir.path());
    // Only an fp16-named file: it must be found (values are f32 here, the name is what counts).
    let unet = dir.path().join("unet");
    std::fs::rename(
        unet.join("diffusion_pytorch_model.safetensors"),
        unet.join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .expect("rename");
    StableDiffusion::<B>::load(dir.path(), DType::F32, &device()).expect("loads the .fp16 file");
    std::fs::remove_file(unet.join("diffusion_pytorch_model.fp16.safetensors")).expect("rm");
    let err = StableDiffusion::<B>::load(dir.path(), DType::F32, &device())
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("unet") && err.contains("diffusion_pytorch_model"), "{err}");
}

fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    for entry in std::fs::read_dir(src).expect("read_dir") {
        let entry = entry.expect("entry");
        let to = dst.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            std::fs::create_dir_all(&to).expect("mkdir");
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).expect("copy");
        }
    }
}

fn rename_tensor(file: &std::path::Path, from: &str, to: &str) {
    let bytes = std::fs::read(file).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (if k == from { to.to_string() } else { k }, v))
        .collect();
    let out = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(file, out).expect("write");
}

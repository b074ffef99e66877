//! The checkpoint formats designers hold: single-file SD 1.x and ControlNet checkpoints in the
//! original layouts, LoRA files (kohya / A1111 and diffusers / PEFT), tokenizer.json-only CLIP
//! tokenizers, and the CLI and PNG metadata around them. The fixtures in
//! `tests/fixtures/single_file/` were proven with diffusers' own `from_single_file` and
//! `load_lora_weights` (`make_single_file_fixtures.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use rfstudio::models::lora_file::LoraSpec;
use rfstudio::models::unet::unet_public_key;
use rfstudio::models::weights::{SafetensorsFile, save_module_renamed};
use rfstudio::pipeline::sd::StableDiffusion;

use crate::common::*;

fn single(name: &str) -> PathBuf {
    fixture("single_file").join(name)
}

fn sha256_f32(values: &[f32]) -> String {
    use sha2::Digest;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Every tensor of `ours` (public names) has the shape and SHA-256 diffusers' conversion gave.
fn assert_same_tensors(label: &str, ours: &BTreeMap<String, (Vec<f32>, Vec<usize>)>, expected: &serde_json::Value) {
    let expected = expected.as_object().expect("expected digests");
    let theirs: Vec<&String> = expected.keys().collect();
    let mine: Vec<&String> = ours.keys().collect();
    assert_eq!(mine, theirs, "{label}: the tensor names differ from diffusers'");
    for (key, want) in expected {
        let (values, shape) = &ours[key];
        assert_eq!(serde_json::json!(shape), want["shape"], "{label}: {key} shape");
        assert_eq!(sha256_f32(values), want["sha256"].as_str().expect("sha"), "{label}: {key} differs from diffusers'");
    }
}

fn tiny(p: &str) -> PathBuf {
    root().join("models").join("tiny").join(p)
}

/// Deterministic pseudo-random values in [-0.5, 0.5).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// A kohya-format LoRA for `models/tiny/sd15`: rank 2, alpha 1 (scale 0.5), on a UNet attention
/// projection (Linear), a 1x1-conv `proj_in`, a 3x3 resnet conv and a text-encoder projection.
pub fn write_tiny_kohya_lora(path: &Path) {
    let layers: [(&str, Vec<usize>, Vec<usize>); 4] = [
        // (kohya module, down shape, up shape)
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", vec![2, 32], vec![32, 2]),
        ("lora_unet_down_blocks_0_attentions_0_proj_in", vec![2, 32, 1, 1], vec![32, 2, 1, 1]),
        ("lora_unet_down_blocks_0_resnets_0_conv1", vec![2, 32, 3, 3], vec![32, 2, 1, 1]),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", vec![2, 32], vec![32, 2]),
    ];
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, (name, down, up)) in layers.iter().enumerate() {
        let bytes = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        tensors.push((format!("{name}.lora_down.weight"), down.clone(), bytes(values(down.iter().product(), 2 * i as u64))));
        tensors.push((format!("{name}.lora_up.weight"), up.clone(), bytes(values(up.iter().product(), 2 * i as u64 + 1))));
        tensors.push((format!("{name}.alpha"), vec![], bytes(vec![1.0])));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, s, b)| (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("view")))
        .collect();
    let bytes = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(path, bytes).expect("write LoRA");
}

/// Every tensor of a module under its public (diffusers / transformers) name.
fn public_tensors<M: burn::module::Module<B>>(module: &M, rename: &dyn Fn(&str) -> String) -> BTreeMap<String, (Vec<f32>, Vec<usize>)> {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("m.safetensors");
    save_module_renamed(module, &path, &[], rename).expect("save");
    let file = SafetensorsFile::open(&path).expect("open");
    file.tensors().keys().map(|k| (k.clone(), file.read_f32(k).expect("read"))).collect()
}

/// W' = W + strength * alpha/rank * up @ down, for every layer of the file and no other weight.
#[test]
fn lora_kohya_file_merges_exactly_into_unet_and_text_encoder() {
    let dev = device();
    let dir = tempfile::tempdir().expect("tmp");
    let lora = dir.path().join("tiny_style.safetensors");
    write_tiny_kohya_lora(&lora);
    let base = StableDiffusion::<B>::load(&tiny("sd15"), DType::F32, &dev).expect("sd");
    let mut with = StableDiffusion::<B>::load(&tiny("sd15"), DType::F32, &dev).expect("sd");
    let used = with.apply_loras(&[LoraSpec { path: lora.clone(), strength: 0.7 }]).expect("apply");
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].name, "tiny_style");
    assert_eq!(used[0].hash.len(), 12);
    let before = public_tensors(&base.unet, &unet_public_key);
    let after = public_tensors(&with.unet, &unet_public_key);
    let file = SafetensorsFile::open(&lora).expect("lora");
    let expect = |module: &str, key: &str, inner: usize| {
        let (down, ds) = file.read_f32(&format!("{module}.lora_down.weight")).expect("down");
        let (up, us) = file.read_f32(&format!("{module}.lora_up.weight")).expect("up");
        let (rank, out) = (ds[0], us[0]);
        let (w, _) = &before[key];
        let mut want = w.clone();
        for o in 0..out {
            for i in 0..inner {
                let d: f32 = (0..rank).map(|r| up[o * rank + r] * down[r * inner + i]).sum();
                want[o * inner + i] += 0.7 * 0.5 * d;
            }
        }
        want
    };
    let mut changed = Vec::new();
    for (k, (w, _)) in &after {
        let diff = w.iter().zip(&before[k].0).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if diff > 0.0 {
            changed.push(k.clone());
        }
    }
    changed.sort();
    assert_eq!(
        changed,
        [
            "down_blocks.0.attentions.0.proj_in.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.0.resnets.0.conv1.weight",
        ]
    );
    for (module, key, inner) in [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", 32),
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "down_blocks.0.attentions.0.proj_in.weight", 32),
        ("lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks.0.resnets.0.conv1.weight", 32 * 9),
    ] {
        let want = expect(module, key, inner);
        let got = &after[key].0;
        let err = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-6, "{key}: max error {err}");
    }
    // The text encoder's q_proj moved; its k_proj did not.
    let te_before = public_tensors(&base.text_encoder, &|k: &str| k.to_string());
    let te_after = public_tensors(&with.text_encoder, &|k: &str| k.to_string());
    assert_ne!(te_before["encoder.layers.0.self_attn.q_proj.weight"], te_after["encoder.layers.0.self_attn.q_proj.weight"]);
    assert_eq!(te_before["encoder.layers.0.self_attn.k_proj.weight"], te_after["encoder.layers.0.self_attn.k_proj.weight"]);
}

#[test]
fn lora_spec_parses_file_and_strength() {
    let s = LoraSpec::parse("styles/ink.safetensors:0.8").expect("spec");
    assert_eq!((s.path, s.strength), (PathBuf::from("styles/ink.safetensors"), 0.8));
    let s = LoraSpec::parse("ink.safetensors").expect("spec");
    assert_eq!(s.strength, 1.0);
    assert!(LoraSpec::parse("ink.safetensors:strong").is_err());
    assert!(LoraSpec::parse("ink.safetensors:NaN").is_err());
    // A Windows drive letter is a path, not a strength.
    let s = LoraSpec::parse(r"C:\loras\ink.safetensors").expect("spec");
    assert_eq!(s.strength, 1.0);
}

/// `generate --lora FILE:STRENGTH`: the run records the LoRA (run.json) and each PNG's
/// `parameters` carries it the way A1111 writes it; the images differ from the run without it.
#[test]
fn cli_generate_with_lora_records_it_like_a1111() {
    let dir = tempfile::tempdir().expect("tmp");
    let lora = dir.path().join("tiny_style.safetensors");
    write_tiny_kohya_lora(&lora);
    let run = |out: &Path, extra: &[&str]| {
        let mut args: Vec<String> = [
            "--models", "models/tiny", "--device", "cpu", "generate", "--product", "sample-data/bag.png", "--prompt",
            "a bag on a marble table", "--steps", "2", "--size", "64", "--seed", "5", "--threshold", "0", "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(out.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = crate::hostile::rfstudio().args(&args).output().expect("run");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let with = dir.path().join("with");
    let without = dir.path().join("without");
    let spec = format!("{}:0.7", lora.display());
    run(&with, &["--lora", &spec]);
    run(&without, &[]);
    let text = rfstudio::pipeline::output::read_png_text(&with.join("attempt_001.png")).expect("text");
    let params = text.iter().find(|(k, _)| k == "parameters").map(|(_, v)| v.clone()).expect("parameters");
    assert!(params.starts_with("a bag on a marble table <lora:tiny_style:0.7>\n"), "{params}");
    let hash = rfstudio::models::lora_file::LoraFile::open(&lora).expect("lora").autov3_hash();
    assert!(params.contains(&format!("Lora hashes: \"tiny_style: {hash}\"")), "{params}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(with.join("run.json")).expect("run.json")).expect("json");
    assert_eq!(manifest["models"]["loras"][0]["name"], "tiny_style");
    let a = image::open(with.join("attempt_001.png")).expect("png").into_rgb8();
    let b = image::open(without.join("attempt_001.png")).expect("png").into_rgb8();
    assert_ne!(a.as_raw(), b.as_raw(), "the LoRA changed nothing");
}

/// Files that are not an SD 1.x LoRA: exit 3 naming what they are, the message once.
#[test]
fn hostile_lora_for_another_architecture_or_not_a_lora() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("out");
    let o = out.to_str().expect("utf8");
    let generate = |lora: &str| {
        crate::hostile::run([
            "--models", "models/tiny", "--device", "cpu", "generate", "--product", "sample-data/bag.png", "--prompt", "x", "--steps",
            "1", "--size", "64", "--out", o, "--lora", lora,
        ])
    };
    // An SDXL LoRA (second text encoder, SDXL's wider layers).
    let sdxl = dir.path().join("xl_style.safetensors");
    let f32s = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let tensors = [
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight", vec![4usize, 640], f32s(values(2560, 1))),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight", vec![640, 4], f32s(values(2560, 2))),
        ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", vec![4, 1280], f32s(values(5120, 3))),
        ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", vec![1280, 4], f32s(values(5120, 4))),
    ];
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, s, b)| (k.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("view")))
        .collect();
    std::fs::write(&sdxl, safetensors::serialize(views, None).expect("serialize")).expect("write");
    generate(sdxl.to_str().expect("utf8")).fails(3, &["Stable Diffusion XL"]);
    // A DoRA file (a magnitude vector per layer): refused by name, not merged half-way.
    let dora = dir.path().join("dora.safetensors");
    let tensors = [
        ("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", vec![2usize, 32, 1, 1], f32s(values(64, 5))),
        ("unet.down_blocks.0.attentions.0.proj_in.lora_B.weight", vec![32, 2, 1, 1], f32s(values(64, 6))),
        ("unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", vec![32], f32s(values(32, 7))),
    ];
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, s, b)| (k.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("view")))
        .collect();
    std::fs::write(&dora, safetensors::serialize(views, None).expect("serialize")).expect("write");
    generate(dora.to_str().expect("utf8")).fails(3, &["a DoRA LoRA"]);
    // A checkpoint that is not a LoRA at all.
    let unet = tiny("sd15").join("unet/diffusion_pytorch_model.safetensors");
    generate(unet.to_str().expect("utf8")).fails(3, &["not a LoRA"]);
    // A truncated LoRA.
    let cut = dir.path().join("cut.safetensors");
    write_tiny_kohya_lora(&cut);
    let bytes = std::fs::read(&cut).expect("read");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).expect("truncate");
    generate(cut.to_str().expect("utf8")).fails(3, &["cut.safetensors"]);
    // A strength that is not a number is a usage error.
    let bad = format!("{}:strong", cut.display());
    let r = generate(&bad);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(!out.join("run.json").exists(), "nothing written");
}


/// SD 1.x single files (f32, and f16 with EMA copies) load to exactly the tensors diffusers'
/// `from_single_file` converts them to, and compute what diffusers computes.
#[test]
fn parity_single_file_sd_matches_diffusers_from_single_file() {
    use rfstudio::models::vae::AutoencoderKL;
    let dev = device();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(single("sd15_tiny.expected.json")).expect("expected")).expect("json");
    for (file, which) in [("sd15_tiny.safetensors", "f32"), ("sd15_tiny_f16_ema.safetensors", "f16")] {
        let sd = StableDiffusion::<B>::load(&single(file), DType::F32, &dev).expect(file);
        assert_same_tensors(&format!("{file} UNet"), &public_tensors(&sd.unet, &unet_public_key), &expected[which]["unet"]);
        assert_same_tensors(&format!("{file} VAE"), &public_tensors(&sd.vae, &|k: &str| k.to_string()), &expected[which]["vae"]);
        assert_same_tensors(
            &format!("{file} text encoder"),
            &public_tensors(&sd.text_encoder, &|k: &str| k.to_string()),
            &expected[which]["text_encoder"],
        );
    }
    let sd = StableDiffusion::<B>::load(&single("sd15_tiny.safetensors"), DType::F32, &dev).expect("sd");
    let io_set = open(&[&single("sd15_tiny.io.safetensors")]);
    let (ids, _) = rfstudio::models::weights::read_ints(&io_set, "text.ids").expect("ids");
    let ids: Vec<u32> = ids.into_iter().map(|i| i as u32).collect();
    // The tokenizer next to the file (its vocabulary is not SD 1.x's) gives diffusers' ids.
    assert_eq!(sd.tokenizer.encode("a red bag").expect("encode").ids, ids);
    assert_close("single-file text encoder", sd.text_encoder.encode_ids(&[ids], &dev), io(&io_set, "text.out"), 1e-4);
    let out = sd.unet.forward(io(&io_set, "unet.sample"), 500.0, &io(&io_set, "unet.ctx"), None);
    assert_close("single-file UNet", out, io(&io_set, "unet.out"), 1e-4);
    let vae: &AutoencoderKL<B> = &sd.vae;
    assert_close("single-file VAE decode", vae.decode(io(&io_set, "vae.z")), io(&io_set, "vae.out"), 1e-4);
}

/// ControlNet single files (v1.1 f16 safetensors, f32 .pth, the v1.0 file carrying an SD model)
/// load to exactly diffusers' tensors and give diffusers' residuals.
#[test]
fn parity_single_file_controlnet_matches_diffusers_from_single_file() {
    use rfstudio::pipeline::sd::load_controlnet;
    let dev = device();
    // The .pth is converted once into the user cache (~/.cache/rfstudio/converted).
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(single("control_tiny.expected.json")).expect("expected")).expect("json");
    for (file, which) in [("control_tiny.safetensors", "f16"), ("control_tiny.pth", "pth"), ("control_v10_tiny.safetensors", "v10")] {
        let cn = load_controlnet::<B>(&single(file), DType::F32, &dev).expect(file);
        assert_same_tensors(file, &public_tensors(&cn, &unet_public_key), &expected[which]);
    }
    let cn = load_controlnet::<B>(&single("control_tiny.pth"), DType::F32, &dev).expect("pth");
    let io_set = open(&[&single("control_tiny.io.safetensors")]);
    let r = cn.forward(io(&io_set, "sample"), 500.0, &io(&io_set, "ctx"), io(&io_set, "cond"), 1.0);
    for (i, d) in r.down.into_iter().enumerate() {
        assert_close(&format!("ControlNet down {i}"), d, io(&io_set, &format!("down.{i}")), 1e-4);
    }
    assert_close("ControlNet mid", r.mid, io(&io_set, "mid"), 1e-4);
}

/// LoRA files in both formats, at strength 0.7, change the UNet and text encoder as diffusers'
/// `load_lora_weights` + `set_adapters(0.7)` does.
#[test]
fn parity_lora_kohya_and_peft_match_diffusers_at_strength_0_7() {
    let dev = device();
    let io_set = open(&[&single("sd15_tiny.io.safetensors")]);
    let (ids, _) = rfstudio::models::weights::read_ints(&io_set, "text.ids").expect("ids");
    let ids: Vec<u32> = ids.into_iter().map(|i| i as u32).collect();
    for name in ["lora_kohya", "lora_peft"] {
        let mut sd = StableDiffusion::<B>::load(&single("sd15_tiny.safetensors"), DType::F32, &dev).expect("sd");
        sd.apply_loras(&[LoraSpec { path: single(&format!("{name}.safetensors")), strength: 0.7 }]).expect(name);
        let expect = open(&[&single(&format!("{name}.io.safetensors"))]);
        assert_close(&format!("{name} text encoder"), sd.text_encoder.encode_ids(&[ids.clone()], &dev), io(&expect, "text.out"), 1e-4);
        let out = sd.unet.forward(io(&io_set, "unet.sample"), 500.0, &io(&io_set, "unet.ctx"), None);
        assert_close(&format!("{name} UNet"), out, io(&expect, "unet.out"), 1e-4);
    }
}

/// A tokenizer folder saved by transformers 5 (tokenizer.json only) and the built-in SD 1.x
/// tokenizer give transformers' ids on every stored prompt.
#[test]
fn parity_tokenizer_json_only_and_builtin_clip_match_transformers() {
    use rfstudio::models::clip::ClipTokenizer;
    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        ids: Vec<u32>,
    }
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixture("clip_tokenizer_cases.json")).expect("cases")).expect("json");
    let folder = single("clip_tokenizer_tf5");
    assert!(!folder.join("vocab.json").exists() && folder.join("tokenizer.json").is_file());
    for tok in [ClipTokenizer::from_folder(&folder).expect("tokenizer.json"), ClipTokenizer::sd1().expect("built-in")] {
        assert_eq!((tok.bos_id, tok.eos_id, tok.pad_id), (49406, 49407, 49407));
        for c in &cases {
            assert_eq!(tok.encode(&c.text).expect("encode").ids, c.ids, "{:?}", c.text);
        }
    }
}

/// Checkpoints rfstudio cannot run exit 3 naming what was detected, the message once.
#[test]
fn hostile_single_files_that_are_not_sd1_are_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("out");
    let o = out.to_str().expect("utf8");
    let generate = |base: &Path| {
        crate::hostile::run([
            "--models", "models/tiny", "--device", "cpu", "--base-model", base.to_str().expect("utf8"), "generate", "--product",
            "sample-data/bag.png", "--prompt", "x", "--steps", "1", "--size", "64", "--out", o,
        ])
    };
    generate(&single("bad_sdxl.safetensors")).fails(3, &["Stable Diffusion XL"]);
    generate(&single("bad_sd2.safetensors")).fails(3, &["Stable Diffusion 2.x"]);
    generate(&single("bad_inpaint.safetensors")).fails(3, &["inpainting UNet (9 input channels)"]);
    let cut = dir.path().join("cut.safetensors");
    let bytes = std::fs::read(single("sd15_tiny.safetensors")).expect("read");
    std::fs::write(&cut, &bytes[..bytes.len() * 3 / 5]).expect("truncate");
    generate(&cut).fails(3, &["cut.safetensors"]);
    // A ControlNet given as the base model, and `info` naming the layout it found.
    generate(&single("control_tiny.safetensors")).fails(3, &["ControlNet single file (control_model.* layout), not an SD 1.x checkpoint"]);
    let info = crate::hostile::run([
        "--models", "models/tiny", "--device", "cpu", "--base-model", single("sd15_tiny_f16_ema.safetensors").to_str().expect("utf8"),
        "--controlnet-model", single("control_tiny.pth").to_str().expect("utf8"), "info",
    ]);
    assert!(info.stdout.contains("Stable Diffusion 1.x single file (original LDM layout, EMA copies ignored)"), "{}", info.stdout);
    assert!(info.stdout.contains("ControlNet single file"), "{}", info.stdout);
    assert!(!out.join("run.json").exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).expect("copy");
        }
    }
}

/// A pipeline folder as transformers 5 saves it (tokenizer/ holds tokenizer.json only) loads and
/// encodes prompts exactly as the vocab.json + merges.txt folder; a tokenizer from another model
/// (ids past the text encoder's table) is refused at load instead of indexing out of it.
#[test]
fn parity_transformers5_pipeline_folder_loads() {
    let dev = device();
    let dir = tempfile::tempdir().expect("tmp");
    let tf5 = dir.path().join("sd15-tf5");
    copy_dir(&tiny("sd15"), &tf5);
    std::fs::remove_dir_all(tf5.join("tokenizer")).expect("rm");
    copy_dir(&single("tiny_tokenizer_tf5"), &tf5.join("tokenizer"));
    let a = StableDiffusion::<B>::load(&tiny("sd15"), DType::F32, &dev).expect("vocab.json folder");
    let b = StableDiffusion::<B>::load(&tf5, DType::F32, &dev).expect("tokenizer.json folder");
    for prompt in ["a kettle on a marble counter", "a red bag, studio light, 4k", ""] {
        assert_eq!(a.tokenizer.encode(prompt).expect("a").ids, b.tokenizer.encode(prompt).expect("b").ids, "{prompt:?}");
    }
    let pa = a.encode_prompt_pair("a red bag", "blurry", &dev).expect("a");
    let pb = b.encode_prompt_pair("a red bag", "blurry", &dev).expect("b");
    assert_eq!(max_abs_diff(pa, pb), 0.0);
    // The full CLIP tokenizer with the tiny text encoder: refused, naming both sides.
    std::fs::remove_dir_all(tf5.join("tokenizer")).expect("rm");
    copy_dir(&single("clip_tokenizer_tf5"), &tf5.join("tokenizer"));
    let err = StableDiffusion::<B>::load(&tf5, DType::F32, &dev).err().expect("must fail").to_string();
    assert!(err.contains("49407") && err.contains("1114") && err.contains("different models"), "{err}");
}

/// `models.toml` naming single files: `info` reports their layouts and `generate` runs end to end
/// on them (a single-file SD 1.x base and a single-file ControlNet).
#[test]
fn cli_models_toml_with_single_files_generates() {
    let dir = tempfile::tempdir().expect("tmp");
    let tiny_abs = |r: &str| tiny(r).display().to_string();
    let toml = format!(
        "[roles]\nbase = \"{}\"\ncontrolnet = \"{}\"\ndepth = \"{}\"\nsaliency = \"{}\"\nrfnet = \"{}\"\n",
        single("sd15_tiny.safetensors").display(),
        single("control_tiny.safetensors").display(),
        tiny_abs("dpt-hybrid"),
        tiny_abs("u2netp"),
        tiny_abs("rfnet"),
    );
    std::fs::write(dir.path().join("models.toml"), toml).expect("toml");
    let models = dir.path().to_str().expect("utf8");
    let info = crate::hostile::run(["--models", models, "--device", "cpu", "info"]);
    assert_eq!(info.code, Some(0), "{}", info.stderr);
    assert!(info.stdout.contains("Stable Diffusion 1.x single file (original LDM layout)"), "{}", info.stdout);
    let out = dir.path().join("out");
    let r = crate::hostile::run([
        "--models", models, "--device", "cpu", "generate", "--product", "sample-data/bag.png", "--prompt", "a red bag", "--steps", "2",
        "--size", "64", "--threshold", "0", "--out", out.to_str().expect("utf8"),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let text = rfstudio::pipeline::output::read_png_text(&out.join("attempt_001.png")).expect("text");
    let params = text.iter().find(|(k, _)| k == "parameters").map(|(_, v)| v.clone()).expect("parameters");
    assert!(params.contains("Model: sd15_tiny.safetensors") && params.contains("ControlNet: control_tiny.safetensors"), "{params}");
}

/// PEFT files written against transformers 5's CLIPTextModel name text-encoder layers without
/// `text_model.`; both spellings apply to the same layers.
#[test]
fn lora_peft_text_encoder_keys_with_and_without_text_model() {
    let dev = device();
    let src = SafetensorsFile::open(single("lora_peft.safetensors")).expect("peft");
    let dir = tempfile::tempdir().expect("tmp");
    let flat = dir.path().join("flat.safetensors");
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = src
        .tensors()
        .keys()
        .map(|k| {
            let (v, shape) = src.read_f32(k).expect("read");
            (k.replace("text_encoder.text_model.", "text_encoder."), shape, v)
        })
        .collect();
    assert!(tensors.iter().any(|(k, _, _)| k.starts_with("text_encoder.encoder.layers.")));
    std::fs::write(&flat, rfstudio::models::weights::serialize_f32(&tensors, Default::default()).expect("ser")).expect("write");
    let apply = |file: &Path| {
        let mut sd = StableDiffusion::<B>::load(&single("sd15_tiny.safetensors"), DType::F32, &dev).expect("sd");
        sd.apply_loras(&[LoraSpec { path: file.to_path_buf(), strength: 0.7 }]).expect("apply");
        public_tensors(&sd.text_encoder, &|k: &str| k.to_string())
    };
    assert_eq!(apply(&single("lora_peft.safetensors")), apply(&flat));
}

//! The checkpoint formats designers hold: LoRA files merged at load (kohya / A1111 and
//! diffusers / PEFT), and the CLI and PNG metadata around them. Single-file parity against
//! diffusers' `from_single_file` and LoRA parity against `load_lora_weights` use the fixtures in
//! `tests/fixtures/checkpoints/` (see its README).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use rfstudio::models::lora_file::LoraSpec;
use rfstudio::models::unet::unet_public_key;
use rfstudio::models::weights::{SafetensorsFile, save_module_renamed};
use rfstudio::pipeline::sd::StableDiffusion;

use crate::common::*;

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

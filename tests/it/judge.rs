//! The one judge: the same P(Available) for the same generated image whether it is judged by
//! `generate`'s recurrent loop, by `score` on the saved PNG, or by RFFT's differentiable path.

use std::process::Command;

use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Tensor};
use rfstudio::pipeline::generate::{AdGenerator, CancelToken, ModelPaths, run_generation};
use rfstudio::pipeline::params::GenerateParams;
use rfstudio::pipeline::judge::{Judge, JudgePaths, JudgeSides};
use rfstudio::pipeline::product::{Placement, place_file};
use rfstudio::pipeline::score::Scorer;

use crate::common::{B, device, root};

fn tiny(role: &str) -> std::path::PathBuf {
    root().join("models/tiny").join(role)
}

#[test]
fn judge_same_p_available_from_generate_score_and_rfft_paths() {
    let dev = device();
    let paths = JudgePaths {
        depth: tiny("dpt-hybrid"),
        saliency: tiny("u2netp"),
        rfnet: tiny("rfnet"),
        text: None,
    };
    let generator = AdGenerator::<B>::load(
        &ModelPaths {
            base: tiny("sd15"),
            controlnet: tiny("controlnet-canny"),
            scorer: None,
            test_weights: true,
            loras: Vec::new(),
        },
        DType::F32,
        &dev,
    )
    .expect("generator");
    let mut judge = Judge::<B>::load(&paths, JudgeSides::default(), DType::F32, &dev).expect("judge");
    let product = root().join("sample-data/bottle.png");
    let title = "绿色玻璃橄榄油瓶 500ml";
    let params = GenerateParams {
        prompt: "a bottle on a kitchen counter".into(),
        title: title.into(),
        seed: Some(5),
        steps: 3,
        canvas: 128,
        attempts: 1,
        threshold: 0.0,
        ..GenerateParams::default()
    };
    // 1. generate's loop: the attempt's probabilities as recorded
    let out = tempfile::tempdir().expect("tmp");
    let summary = run_generation(&generator, Some(&mut judge as &mut dyn Scorer), &product, &params, out.path(), &CancelToken::new(), &mut |_| {})
        .expect("generate");
    let p_generate = summary.attempts[0].probs.expect("scored").available();
    // 2. `score` on the saved PNG (the command, reading attempt_001.png and product.png back)
    let cli = Command::new(env!("CARGO_BIN_EXE_rfstudio"))
        .current_dir(root())
        .args(["--models", "models/tiny", "--device", "cpu", "--json", "score", "--attempts"])
        .arg(out.path())
        .output()
        .expect("score");
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let line: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&cli.stdout).lines().next().expect("a line")).expect("json");
    let p_score = line["probs"][0].as_f64().expect("P(Available)") as f32;
    // 3. RFFT's differentiable path: the same image before its 8-bit rounding, judged on the
    // autodiff backend with gradients flowing to the image
    type A = Autodiff<B>;
    let placed = place_file(&product, &Placement { canvas: 128, ..Placement::default() }).expect("place");
    let context = generator.sd.encode_prompt_pair(&params.prompt, &params.negative, &dev).expect("prompt");
    let latents = generator.product_latents(&placed).expect("latents");
    let image = generator
        .render_batch(&placed, &context, &latents, &[5], &params, &CancelToken::new(), |_, _, _| {})
        .expect("render");
    let judge_ad = Judge::<A>::load(&paths, JudgeSides::default(), DType::F32, &dev).expect("judge");
    let image = Tensor::<A, 4>::from_inner(image).require_grad();
    let logits = judge_ad.logits(
        image.clone(),
        judge_ad.product_input(&placed.init_rgb(), &dev),
        judge_ad.captions(&[title], &dev).expect("caption"),
    );
    let p = softmax(logits, 1);
    let grads = p.clone().slice([0..1, 0..1]).sum().backward();
    assert!(image.grad(&grads).is_some(), "the judge is differentiable in the image");
    let p_rfft = p.into_data().convert::<f32>().to_vec::<f32>().expect("probs")[0];
    eprintln!("P(Available): generate {p_generate:.6}, score {p_score:.6}, rfft {p_rfft:.6}");
    // generate and score judge the same 8-bit image: identical (JSON keeps f32 exactly)
    assert!((p_generate - p_score).abs() <= 1e-6, "generate {p_generate} vs score {p_score}");
    // RFFT judges the unrounded image: the 8-bit quantisation is the only difference
    assert!((p_generate - p_rfft).abs() <= 1e-3, "generate {p_generate} vs RFFT {p_rfft}");
}

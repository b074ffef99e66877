//! RFNet training end to end on synthetic data (tiny configuration, CPU): train, checkpoint,
//! resume with continuous metrics, evaluate, score an image, and recurrent generation with the
//! trained scorer.

use std::path::Path;
use std::process::Command;

use crate::common::root;

fn rfstudio() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rfstudio"));
    // English messages whatever the machine's locale (the tests read them).
    c.env("RFSTUDIO_LANG", "en");
    c.current_dir(root());
    c.env_remove("RFSTUDIO_DEVICE").env_remove("RFSTUDIO_MODELS").env_remove("RFSTUDIO_DTYPE");
    c
}

fn ok(out: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn metric_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .filter_map(|v| v["step"].as_u64())
        .collect()
}

#[test]
fn rfnet_train_resume_eval_score_and_recurrent_generation() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("synth");
    let run = tmp.path().join("run");
    ok(rfstudio()
        .args(["synth", "--n", "60", "--size", "64", "--seed", "5", "--out"])
        .arg(&data)
        .output()
        .expect("synth"));
    let records = std::fs::read_to_string(data.join("samples.jsonl")).expect("records");
    assert_eq!(records.lines().count(), 60);
    assert!(records.contains("stand-in"), "stand-in maps must be marked");
    let train = |epochs: &str, resume: bool| {
        let mut c = rfstudio();
        c.args(["rfnet", "train", "--models", "models/tiny", "--device", "cpu", "--tiny", "--scratch-image-encoder"])
            .args(["--epochs", epochs, "--batch", "16", "--lr", "1e-3", "--json", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&run);
        if resume {
            c.arg("--resume");
        }
        ok(c.output().expect("train"))
    };
    train("1", false);
    let first = metric_steps(&run);
    assert!(!first.is_empty());
    for f in ["config.json", "model.safetensors", "vocab.txt", "state.json", "model.bin", "optimizer.bin"] {
        assert!(run.join("checkpoint").join(f).is_file(), "checkpoint/{f} missing");
    }
    // Resume to epoch 2: the step numbers continue with no gap and no duplicate.
    train("2", true);
    let steps = metric_steps(&run);
    assert!(steps.len() > first.len());
    assert_eq!(steps, (1..=steps.len() as u64).collect::<Vec<_>>(), "steps must be contiguous");
    // Evaluate: JSON with a top-level macro_f1 on the held-out products.
    let out = ok(rfstudio()
        .args(["rfnet", "eval", "--device", "cpu", "--json", "--data"])
        .arg(&data)
        .arg("--checkpoint")
        .arg(&run)
        .output()
        .expect("eval"));
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("")).expect("json");
    assert!(v["macro_f1"].as_f64().is_some(), "{out}");
    assert_eq!(v["confusion"].as_array().map(|a| a.len()), Some(5));
    // Install the trained checkpoint as the tiny manifest's RFNet (a copy of models/tiny).
    let models = tmp.path().join("models");
    let manifest = std::fs::read_to_string(root().join("models/tiny/models.toml"))
        .expect("manifest")
        .replace("\"sd15\"", &format!("{:?}", root().join("models/tiny/sd15")))
        .replace("\"controlnet-canny\"", &format!("{:?}", root().join("models/tiny/controlnet-canny")))
        .replace("\"dpt-hybrid\"", &format!("{:?}", root().join("models/tiny/dpt-hybrid")))
        .replace("\"u2netp\"", &format!("{:?}", root().join("models/tiny/u2netp")))
        .replace("\"bert-chinese\"", &format!("{:?}", root().join("models/tiny/bert-chinese")))
        .replace("\"resnet50\"", &format!("{:?}", root().join("models/tiny/resnet50")))
        .replace("\"rfnet\"", &format!("{:?}", run.join("checkpoint")));
    std::fs::create_dir_all(&models).expect("mkdir");
    std::fs::write(models.join("models.toml"), manifest).expect("write");
    // score: five probabilities summing to 1.
    let first_rec: serde_json::Value = serde_json::from_str(records.lines().next().unwrap_or("")).expect("record");
    let out = ok(rfstudio()
        .args(["score", "--device", "cpu", "--json", "--models"])
        .arg(&models)
        .arg("--image")
        .arg(data.join(first_rec["image"].as_str().expect("image")))
        .arg("--product")
        .arg(root().join("sample-data/bag.png"))
        .args(["--title", "复古真皮手提包"])
        .output()
        .expect("score"));
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("")).expect("json");
    let probs: Vec<f64> = v["probs"].as_array().expect("probs").iter().filter_map(|p| p.as_f64()).collect();
    assert_eq!(probs.len(), 5);
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4);
    // generate with the scorer: recurrent generation writes scored attempts with depth/saliency.
    let gen_out = tmp.path().join("gen");
    let out = rfstudio()
        .args(["generate", "--device", "cpu", "--models"])
        .arg(&models)
        .args(["--product", "sample-data/kettle.png", "--prompt", "a kettle", "--steps", "1", "--size", "64"])
        .args(["--attempts", "2", "--threshold", "0.99", "--seed", "3", "--out"])
        .arg(&gen_out)
        .output()
        .expect("generate");
    // A random tiny RFNet practically never reaches 0.99: exit 4, both attempts kept and scored.
    let code = out.status.code();
    let text = std::fs::read_to_string(gen_out.join("attempts.jsonl")).expect("attempts");
    let recs: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(!recs.is_empty());
    assert!(recs.iter().all(|r| r["probs"].as_array().map(|a| a.len()) == Some(5)), "{text}");
    if code == Some(4) {
        assert_eq!(recs.len(), 2);
    } else {
        assert_eq!(code, Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(gen_out.join("attempt_001_depth.png").is_file());
    assert!(gen_out.join("attempt_001_saliency.png").is_file());
    assert!(gen_out.join("best.png").is_file());
}

#[test]
fn cli_analyze_writes_maps_and_overlays() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = ok(rfstudio()
        .args(["analyze", "--models", "models/tiny", "--device", "cpu", "--image", "sample-data/chair.png", "--out"])
        .arg(tmp.path())
        .output()
        .expect("analyze"));
    assert!(out.contains("random test weights"), "{out}");
    let img = image::open(root().join("sample-data/chair.png")).expect("chair");
    for f in ["depth.png", "saliency.png", "depth_overlay.png", "saliency_overlay.png"] {
        let m = image::open(tmp.path().join(f)).expect(f);
        assert_eq!((m.width(), m.height()), (img.width(), img.height()), "{f}");
    }
    // Missing models: exit 3.
    let r = rfstudio()
        .args(["analyze", "--models", "/nonexistent", "--image", "sample-data/chair.png", "--out"])
        .arg(tmp.path())
        .output()
        .expect("analyze");
    assert_eq!(r.status.code(), Some(3));
}

/// The learning test: 2,000 synthetic samples, tiny configuration, CPU, held-out
/// macro-F1 >= 0.8. Takes about 5 minutes on a 2-core machine, so it is not part of the default
/// suite: `cargo test --no-default-features --locked -- --ignored rfnet_learns`.
#[test]
#[ignore]
fn rfnet_learns_synthetic_classes_to_macro_f1_0_8() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("synth");
    let start = std::time::Instant::now();
    ok(rfstudio()
        .args(["synth", "--n", "2000", "--size", "64", "--seed", "3", "--out"])
        .arg(&data)
        .output()
        .expect("synth"));
    let out = ok(rfstudio()
        .args(["rfnet", "train", "--models", "models/tiny", "--device", "cpu", "--tiny", "--scratch-image-encoder"])
        .args(["--epochs", "5", "--lr", "2e-3", "--lr-step", "4", "--batch", "32", "--json", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(tmp.path().join("run"))
        .output()
        .expect("train"));
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("")).expect("json");
    let f1 = v["macro_f1"].as_f64().expect("macro_f1");
    eprintln!("held-out macro-F1 {f1:.3} in {:.0} s", start.elapsed().as_secs_f64());
    assert!(f1 >= 0.8, "macro-F1 {f1}");
}

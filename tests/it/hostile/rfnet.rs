//! `rfstudio rfnet train|eval`: learning rates and batch sizes that cannot train, evaluation
//! of things that are not checkpoints.

use super::run;

#[test]
fn hostile_rfnet_train_refuses_settings_that_cannot_train() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("run");
    let out = out.to_str().expect("utf8");
    let cases: &[(&[&str], &str)] = &[
        (&["--lr", "NaN"], "--lr NaN"),
        (&["--lr", "1e30"], "--lr 1000000000000000000000000000000"),
        (&["--lr=-1"], "--lr -1"),
        (&["--lr", "0"], "--lr 0"),
        (&["--batch", "0"], "--batch 0"),
        (&["--epochs", "0"], "--epochs 0"),
        (&["--lr-step", "0"], "--lr-step"),
        (&["--val-ratio", "1.5"], "--val-ratio 1.5"),
        (&["--weight-decay", "inf"], "--weight-decay inf"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["--models", "models/tiny", "--device", "cpu", "rfnet", "train", "--tiny", "--data", "sample-data", "--out", out];
        args.extend_from_slice(extra);
        run(&args).fails(2, &[needle]);
        assert!(!std::path::Path::new(out).join("checkpoint").exists(), "no checkpoint written for {extra:?}");
    }
}

#[test]
fn hostile_rfnet_eval_of_things_that_are_not_checkpoints() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    let d = data.to_str().expect("utf8");
    run(["--device", "cpu", "rfnet", "eval", "--data", d, "--checkpoint", "/nonexistent/ck"]).fails(2, &["/nonexistent/ck"]);
    run(["--device", "cpu", "rfnet", "eval", "--data", d, "--checkpoint", "models/tiny/rfnet", "--target-precision", "2"])
        .fails(2, &["--target-precision 2"]);
    run(["--device", "cpu", "rfnet", "eval", "--data", d, "--checkpoint", "models/tiny/rfnet", "--target-precision", "NaN"])
        .fails(2, &["--target-precision NaN"]);
}

/// kill -9 during training, then `--resume`: the checkpoint written before the kill is intact
/// and the run completes with contiguous steps; a synthetic set of absurd size is refused.
#[test]
fn hostile_rfnet_sigkill_mid_training_then_resume() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("synth");
    let d = data.to_str().expect("utf8");
    run(["synth", "--n", "100000", "--size", "100000", "--out", d]).fails(2, &["--size 100000"]);
    assert!(!data.exists(), "nothing written");
    run(["synth", "--n", "40", "--size", "64", "--seed", "3", "--out", d]).ok();
    let out = tmp.path().join("run");
    let o = out.to_str().expect("utf8");
    let args = |resume: bool| {
        let mut a = vec![
            "--models", "models/tiny", "--device", "cpu", "--json", "rfnet", "train", "--tiny", "--scratch-image-encoder", "--epochs",
            "3", "--batch", "8", "--lr", "1e-3", "--data", d, "--out", o,
        ];
        if resume {
            a.push("--resume");
        }
        a
    };
    let mut child = super::rfstudio().args(args(false)).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut after_epoch = false;
    for l in BufReader::new(stdout).lines() {
        let l = l.expect("line");
        if l.contains("\"epoch\"") && l.contains("val_accuracy") {
            after_epoch = true;
        } else if after_epoch {
            break; // a step of epoch 2 is running
        }
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    run(args(true)).ok();
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("val_accuracy").is_none())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(steps, (1..=steps.len() as u64).collect::<Vec<_>>(), "contiguous steps after the kill");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).expect("state")).expect("json");
    assert_eq!(state["epoch"], 3, "{state}");
}

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

//! `rfstudio score`: things that are not images, empty attempt folders, NaN in RFNet.

use super::{poison_safetensors, run, tiny_copy};

#[test]
fn hostile_score_bad_inputs_and_nan_rfnet() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fake = tmp.path().join("fake.png");
    std::fs::write(&fake, "GIF89a but not really").expect("write");
    let f = fake.to_str().expect("utf8");
    run(["--models", "models/tiny", "--device", "cpu", "score", "--image", f, "--product", "sample-data/bag.png"]).fails(2, &["fake.png"]);
    run(["--models", "models/tiny", "--device", "cpu", "score", "--image", "sample-data/bag.png", "--product", f]).fails(2, &["fake.png"]);
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    run(["--models", "models/tiny", "--device", "cpu", "score", "--attempts", empty.to_str().expect("utf8")]).fails(2, &["no attempt_*.png"]);
    run(["--models", "models/tiny", "--device", "cpu", "score", "--attempts", "/nonexistent/run"]).fails(2, &["/nonexistent/run"]);
    // NaN RFNet weights: models invalid, not a score.
    let models = tiny_copy(tmp.path());
    let key = poison_safetensors(&models.join("rfnet/model.safetensors"), "classifier", f32::NAN);
    let m = models.to_str().expect("utf8");
    let r = run(["--models", m, "--device", "cpu", "score", "--image", "sample-data/bag.png", "--product", "sample-data/bag.png"]);
    r.fails(3, &[&key]);
    assert!(!r.stdout.contains("null"), "{}", r.stdout);
}

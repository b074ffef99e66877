//! `rfstudio analyze`: images that are not images or are too large to decode, NaN weights in
//! the depth and saliency models, outputs that cannot be written.

use super::{poison_safetensors, run, tiny_copy};

#[test]
fn hostile_analyze_bad_images_and_nan_models() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out");
    let o = out.to_str().expect("utf8");
    let fake = tmp.path().join("fake.png");
    std::fs::write(&fake, "root:x:0:0\n").expect("write");
    run(["--models", "models/tiny", "--device", "cpu", "analyze", "--image", fake.to_str().expect("utf8"), "--out", o])
        .fails(2, &["fake.png", "cannot read the image"]);
    let huge = tmp.path().join("huge.png");
    crate::generate::write_huge_png(&huge, 17000, 17000);
    run(["--models", "models/tiny", "--device", "cpu", "analyze", "--image", huge.to_str().expect("utf8"), "--out", o])
        .fails(2, &["17000x17000"]);
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").expect("write");
    let sub = blocker.join("sub");
    run(["--models", "models/tiny", "--device", "cpu", "analyze", "--image", "sample-data/bag.png", "--out", sub.to_str().expect("utf8")])
        .fails(2, &["cannot write"]);
    // NaN in the depth model, then in the saliency model: exit 3 naming the tensor.
    for (folder, tensor) in [("dpt-hybrid", "head.head.0.weight"), ("u2netp", "outconv.weight")] {
        let models = tiny_copy(&tmp.path().join(folder));
        let key = poison_safetensors(&models.join(folder).join("model.safetensors"), tensor, f32::NAN);
        let m = models.to_str().expect("utf8");
        run(["--models", m, "--device", "cpu", "analyze", "--image", "sample-data/bag.png", "--out", o]).fails(3, &[&key, "corrupt"]);
    }
}

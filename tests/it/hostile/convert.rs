//! `rfstudio convert u2net`: files that are not PyTorch checkpoints, outputs that cannot be
//! written; nothing is written for a wrong input.

use super::{files_under, run};

#[test]
fn hostile_convert_refuses_what_is_not_a_u2net_checkpoint() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out");
    let o = out.to_str().expect("utf8");
    let text = tmp.path().join("notes.pth");
    std::fs::write(&text, "definitely not a zip archive").expect("write");
    let empty = tmp.path().join("empty.pth");
    std::fs::write(&empty, "").expect("write");
    // a safetensors file is not a .pth
    for input in [text.to_str().expect("utf8"), empty.to_str().expect("utf8"), "models/tiny/u2netp/model.safetensors", "/nonexistent.pth", "sample-data"] {
        let r = run(["convert", "u2net", input, "--out", o]);
        r.fails(2, &[]);
        assert!(r.stderr.contains(input), "{input}: {}", r.stderr);
        assert!(files_under(tmp.path()).iter().all(|f| !f.starts_with("out")), "nothing written for {input}");
    }
    // An output path under a file cannot be created: a clear error, not a panic.
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").expect("write");
    let r = run(["convert", "u2net", text.to_str().expect("utf8"), "--out", blocker.join("sub").to_str().expect("utf8")]);
    r.fails(2, &[]);
}

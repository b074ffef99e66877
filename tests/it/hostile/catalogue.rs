//! `rfstudio generate --batch-file` (a catalogue): ids that collide or escape `--out`, products
//! that are missing, exit-code precedence, malformed and empty catalogues.

use super::{files_under, run};
use crate::common::root;

fn catalogue(dir: &std::path::Path, lines: &[String]) -> std::path::PathBuf {
    let file = dir.join("products.jsonl");
    std::fs::write(&file, lines.join("\n")).expect("write catalogue");
    file
}

fn generate_catalogue(file: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> super::Ran {
    let mut args = vec![
        "generate", "--models", "models/tiny", "--device", "cpu", "--steps", "1", "--size", "64",
        "--batch-file", file.to_str().expect("utf8"), "--out", out.to_str().expect("utf8"),
    ];
    if !extra.contains(&"--threshold") {
        args.extend(["--threshold", "0"]);
    }
    args.extend_from_slice(extra);
    run(args)
}

fn line(image: &str, id: Option<&str>) -> String {
    let mut v = serde_json::json!({"image": image, "prompt": "a product on a table"});
    if let Some(id) = id {
        v["id"] = serde_json::json!(id);
    }
    v.to_string()
}

#[test]
fn hostile_catalogue_ids_never_collide_or_escape_out() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = root().join("sample-data");
    let bag = data.join("bag.png");
    let bag = bag.to_str().expect("utf8");
    let out = tmp.path().join("work/out");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![line(bag, Some("a")), line(bag, Some("a"))], "the same `id` \"a\" as line 1"),
        (vec![line(bag, Some("A")), line(bag, Some("a"))], "as line 1"),
        (vec![line(bag, Some("../../escaped")), line(bag, Some("b"))], "contains a path separator"),
        (vec![line(bag, Some("/tmp/abs"))], "contains a path separator"),
        (vec![line(bag, Some(".."))], "is not a folder name"),
        (vec![line(bag, Some(""))], "is empty"),
        (vec![line(bag, Some("tab\there"))], "control characters"),
    ];
    for (lines, needle) in cases {
        let file = catalogue(tmp.path(), &lines);
        generate_catalogue(&file, &out, &[]).fails(2, &[needle]);
        assert!(files_under(&tmp.path().join("work")).is_empty(), "nothing written for {lines:?}");
    }
    // Two images with the same file name in different folders: the derived folder names collide.
    let (a, b) = (tmp.path().join("x"), tmp.path().join("y"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d).expect("mkdir");
        std::fs::copy(data.join("bag.png"), d.join("item.png")).expect("copy");
    }
    let lines = vec![line(a.join("item.png").to_str().expect("utf8"), None), line(b.join("item.png").to_str().expect("utf8"), None)];
    let file = catalogue(tmp.path(), &lines);
    generate_catalogue(&file, &out, &[]).fails(2, &["give every line a distinct `id`"]);
    // With distinct ids both are generated, each in its own folder.
    let lines = vec![
        line(a.join("item.png").to_str().expect("utf8"), Some("x-item")),
        line(b.join("item.png").to_str().expect("utf8"), Some("y-item")),
    ];
    let file = catalogue(tmp.path(), &lines);
    generate_catalogue(&file, &out, &[]).ok();
    assert!(out.join("x-item/best.png").is_file() && out.join("y-item/best.png").is_file());
}

#[test]
fn hostile_catalogue_bad_input_outranks_no_available_image() {
    let tmp = tempfile::tempdir().expect("tmp");
    let bag = root().join("sample-data/bag.png");
    let lines = vec![line(bag.to_str().expect("utf8"), Some("good")), line("/nonexistent/missing.png", Some("missing"))];
    let file = catalogue(tmp.path(), &lines);
    let out = tmp.path().join("out");
    // The good product is scored and never Available (threshold 1): 4 alone, but the missing
    // image is bad input and must show as 2.
    let r = generate_catalogue(&file, &out, &["--threshold", "1"]);
    r.fails(2, &["/nonexistent/missing.png", "1 of 2 product(s) failed"]);
    assert!(r.stderr.contains("1 without an available image"), "{}", r.stderr);
    // A malformed line names its line; an empty catalogue says there is nothing to do.
    let file = catalogue(tmp.path(), &[line(bag.to_str().expect("utf8"), None), "{not json".into()]);
    generate_catalogue(&file, &out, &[]).fails(2, &["line 2"]);
    let file = catalogue(tmp.path(), &[]);
    generate_catalogue(&file, &tmp.path().join("out2"), &[]).fails(2, &["lists no products"]);
}

/// kill -9 in the middle of a catalogue, then the same command again: finished products are
/// skipped, the interrupted one is redone, every product ends with exactly one complete folder.
#[test]
fn hostile_catalogue_sigkill_mid_run_then_rerun_completes_each_product_once() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let tmp = tempfile::tempdir().expect("tmp");
    let data = root().join("sample-data");
    let ids = ["bag", "kettle", "shoe", "chair"];
    let lines: Vec<String> = ids.iter().map(|id| line(data.join(format!("{id}.png")).to_str().expect("utf8"), Some(id))).collect();
    let file = catalogue(tmp.path(), &lines);
    let out = tmp.path().join("out");
    let args = [
        "generate", "--models", "models/tiny", "--device", "cpu", "--steps", "2", "--size", "64", "--threshold", "0", "--json",
        "--batch-file", file.to_str().expect("utf8"), "--out", out.to_str().expect("utf8"),
    ];
    let mut child = super::rfstudio().args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut finished = 0;
    for l in BufReader::new(stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(&l.expect("line")).expect("json");
        if v["event"] == "finished" {
            finished += 1;
        }
        // kill inside the third product's denoising
        if finished == 2 && v["event"] == "step" {
            break;
        }
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert!(!out.join("shoe/summary.json").exists(), "the third product was interrupted");
    let r = run(args);
    r.ok();
    assert!(r.stdout.contains(r#""event":"skipped""#) && r.stdout.contains(r#""products":2"#), "{}", r.stdout);
    for id in ids {
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(id).join("summary.json")).expect("summary")).expect("json");
        let attempts = std::fs::read_to_string(out.join(id).join("attempts.jsonl")).expect("attempts");
        assert_eq!(attempts.lines().count(), 1, "{id}: one attempt recorded, no duplicate");
        assert_eq!(summary["attempts"].as_array().map(Vec::len), Some(1), "{id}");
    }
    assert_eq!(files_under(&out).iter().filter(|f| f.ends_with("summary.json")).count(), 4);
}

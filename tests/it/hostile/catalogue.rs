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

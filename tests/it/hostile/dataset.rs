//! `rfstudio dataset`: concurrent importers, labels that are not labels, import files pointing
//! outside their root, bad annotator names, absurd split ratios, kill -9 mid-import.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;

use image::{Rgb, RgbImage};
use rfstudio::data::import::{ImportKind, import};
use rfstudio::data::store::{Decision, NewSample, Source, Store};

use super::{rfstudio, run};
use crate::pg::{Backend, both_backends, new_dataset};

/// A distinct 8x8 PNG per `i` (colour from the index).
fn tiny_png(path: &Path, i: u32) {
    RgbImage::from_pixel(8, 8, Rgb([(i % 256) as u8, (i / 256 % 256) as u8, 7])).save(path).expect("png");
}

/// A dataset with `old` unlabelled samples, and an RF1M folder with `new` other images and a
/// label file (`p<k>/<i>.png <i % 5>`). Returns (dataset, label file, expected label per image
/// hash).
fn race_setup(b: Backend, dir: &Path, old: u32, new: u32) -> (std::path::PathBuf, std::path::PathBuf) {
    let ds = new_dataset(b, dir);
    let store = Store::open(&ds).expect("open");
    let olds = dir.join("old");
    std::fs::create_dir_all(&olds).expect("mkdir");
    for i in 0..old {
        let p = olds.join(format!("{i}.png"));
        tiny_png(&p, 10_000 + i);
        store
            .add_sample(&NewSample { product_id: format!("old{i}"), image: p, ..NewSample::default() }, Source::Imported)
            .expect("add old");
    }
    let rf = dir.join("rf1m");
    let mut lines = String::new();
    for i in 0..new {
        let sub = rf.join(format!("p{}", i / 10));
        std::fs::create_dir_all(&sub).expect("mkdir");
        tiny_png(&sub.join(format!("{i}.png")), i);
        lines.push_str(&format!("p{}/{i}.png\t{}\n", i / 10, i % 5));
    }
    let labels = rf.join("labels.txt");
    std::fs::write(&labels, lines).expect("labels");
    (ds, labels)
}

both_backends!(
    hostile_dataset_concurrent_rf1m_imports_attach_every_label_to_its_own_image,
    hostile_dataset_sigkill_mid_import_then_reimport_completes,
);

fn hostile_dataset_concurrent_rf1m_imports_attach_every_label_to_its_own_image(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (old, new) = (300u32, 400u32);
    let (ds, labels) = race_setup(b, tmp.path(), old, new);
    let spawn = || {
        rfstudio()
            .args(["dataset", "import"])
            .arg(&ds)
            .arg("--from")
            .arg(&labels)
            .args(["--kind", "rf1m"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn importer")
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "importer failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Every label sits on the sample holding its own image, with its own class; old samples
    // stay unlabelled; no image is stored twice.
    let store = Store::open(&ds).expect("open");
    assert_eq!(store.sample_count().expect("count"), (old + new) as i64);
    let expected: HashMap<String, u8> = (0..new)
        .map(|i| {
            let p = labels.parent().expect("dir").join(format!("p{}/{i}.png", i / 10));
            (sha256(&std::fs::read(p).expect("read")), (i % 5) as u8)
        })
        .collect();
    let samples: HashMap<i64, String> = store.all_samples().expect("all").into_iter().map(|s| (s.id, s.image_hash)).collect();
    let all = store.all_labels().expect("labels");
    let mut wrong = 0;
    for l in &all {
        let hash = &samples[&l.sample_id];
        match expected.get(hash) {
            Some(&class) if l.decision == Decision::Class(class) => {}
            _ => wrong += 1,
        }
    }
    assert_eq!(wrong, 0, "{wrong} of {} labels attached to the wrong sample", all.len());
    assert_eq!(all.len(), new as usize, "one label per new image");
    assert!(store.integrity_ok().expect("integrity"));
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn hostile_dataset_negative_and_out_of_range_labels_are_refused() {
    for (text, ok) in [("-1", false), ("+1", false), ("5", false), ("-0", false), ("--2", false), ("Space Mismatch", true), ("-available", false)] {
        assert_eq!(Decision::parse(text, false).is_ok(), ok, "{text:?}");
    }
    // keys 1-5 in key mode, ids 0-4 otherwise, and the hint says which
    assert_eq!(Decision::parse("5", true).ok(), Some(Decision::Class(4)));
    assert!(Decision::parse("0", true).unwrap_err().to_string().contains("1-5"));
    assert!(Decision::parse("-1", false).unwrap_err().to_string().contains("0-4"));

    let tmp = tempfile::tempdir().expect("tmp");
    let ds = tmp.path().join("ds");
    let store = Store::init(&ds).expect("init");
    let img = tmp.path().join("a.png");
    tiny_png(&img, 1);
    let id = store.add_sample(&NewSample { image: img, ..NewSample::default() }, Source::Imported).expect("add").id;
    let out = rfstudio()
        .args(["dataset", "label"])
        .arg(&ds)
        .args(["--annotator", "ann"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(format!("{id} -2\n{id} -1\n").as_bytes())?;
            c.wait_with_output()
        })
        .expect("label");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(store.all_labels().expect("labels").is_empty(), "a negative label must not be recorded");
    // an RF1M line with a negative label is a reported problem, not class 1
    let rf = tmp.path().join("rf");
    std::fs::create_dir_all(&rf).expect("mkdir");
    tiny_png(&rf.join("x.png"), 2);
    std::fs::write(rf.join("labels.txt"), "x.png -1\n").expect("write");
    let r = import(&store, &rf.join("labels.txt"), ImportKind::Rf1m, None, &mut |_, _| {}).expect("import");
    assert_eq!((r.added, r.labels, r.problems.len()), (0, 0, 1), "{:?}", r.problems);
}

#[test]
fn hostile_dataset_import_paths_stay_inside_the_root_and_must_be_images() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ds = tmp.path().join("ds");
    let store = Store::init(&ds).expect("init");
    let rf = tmp.path().join("rf");
    std::fs::create_dir_all(rf.join("p")).expect("mkdir");
    tiny_png(&rf.join("p/ok.png"), 1);
    tiny_png(&tmp.path().join("outside.png"), 2);
    std::fs::write(rf.join("p/fake.png"), "root:x:0:0:root:/root:/bin/bash\n").expect("fake");
    #[cfg(unix)]
    std::os::unix::fs::symlink(tmp.path().join("outside.png"), rf.join("p/link.png")).expect("symlink");
    let passwd = if Path::new("/etc/passwd").is_file() { "/etc/passwd" } else { "/nonexistent/passwd" };
    let lines = format!(
        "p/ok.png 0\n../outside.png 1\n{passwd} 2\n../../../../../../etc/hostname 3\np/fake.png 4\np/link.png 0\np/ok.png 3\n"
    );
    std::fs::write(rf.join("labels.txt"), lines).expect("labels");
    let r = import(&store, &rf.join("labels.txt"), ImportKind::Rf1m, None, &mut |_, _| {}).expect("import");
    assert_eq!(r.added, 1, "only p/ok.png: {:?}", r.problems);
    let why: Vec<&str> = r.problems.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(why.len(), 6, "{why:?}");
    assert!(why[0].contains("outside the import root"), "{why:?}");
    assert!(why[1].contains("outside the import root") || why[1].contains("not found"), "{why:?}");
    assert!(why[3].contains("fake.png: cannot read the image"), "{why:?}");
    #[cfg(unix)]
    assert!(why[4].contains("outside the import root"), "symlink escaping the root: {why:?}");
    assert!(why[5].contains("conflicting label") && why[5].contains("kept Available"), "{why:?}");
    let labels = store.all_labels().expect("labels");
    assert_eq!(labels.len(), 1);
    assert_eq!(labels[0].decision, Decision::Class(0), "the first label is kept");
    // Naming another root explicitly (--images) imports from there.
    std::fs::write(rf.join("other.txt"), "outside.png 1\n").expect("labels");
    let r = import(&store, &rf.join("other.txt"), ImportKind::Rf1m, Some(tmp.path()), &mut |_, _| {}).expect("import");
    assert_eq!((r.added, r.problems.len()), (1, 0), "{:?}", r.problems);
    // A folder import's metadata cannot reach outside its folder either.
    let folder = tmp.path().join("folder");
    std::fs::create_dir_all(&folder).expect("mkdir");
    std::fs::write(folder.join("metadata.jsonl"), "{\"image\": \"../outside.png\", \"label\": \"0\"}\n").expect("meta");
    let r = import(&store, &folder, ImportKind::Folder, None, &mut |_, _| {}).expect("import");
    assert_eq!((r.added, r.problems.len()), (0, 1), "{:?}", r.problems);
}

#[test]
fn hostile_dataset_annotator_names_ratios_and_missing_datasets() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ds = tmp.path().join("ds");
    run(["dataset", "init", ds.to_str().expect("utf8")]).ok();
    for bad in ["", "   ", "bell\u{7}", "tab\there", " padded"] {
        run(["dataset", "label", ds.to_str().expect("utf8"), "--annotator", bad]).fails(2, &["invalid annotator name"]);
    }
    let long = "x".repeat(65);
    run(["dataset", "label", ds.to_str().expect("utf8"), "--annotator", &long]).fails(2, &["longer than 64"]);
    for ratios in ["inf,0,0", "NaN,0.1,0.1", "-1,1,1", "0,0,0", "0.8,0.2", "1e309,0,0"] {
        let flag = format!("--ratios={ratios}");
        run(["dataset", "split", ds.to_str().expect("utf8"), &flag]).fails(2, &["--ratios needs"]);
        let out = tmp.path().join("e.jsonl");
        run(["dataset", "export", ds.to_str().expect("utf8"), "--out", out.to_str().expect("utf8"), &flag]).fails(2, &["--ratios needs"]);
        assert!(!out.exists());
    }
    let missing = tmp.path().join("nope");
    run(["dataset", "stats", missing.to_str().expect("utf8")]).fails(2, &["not an rfstudio dataset"]);
    // An empty label file imports nothing and succeeds.
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").expect("write");
    run(["dataset", "import", ds.to_str().expect("utf8"), "--from", empty.to_str().expect("utf8"), "--kind", "rf1m"]).ok();
}

/// kill -9 while importing: what was committed is intact, and importing again completes the
/// set with nothing twice.
fn hostile_dataset_sigkill_mid_import_then_reimport_completes(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (ds, labels) = race_setup(b, tmp.path(), 0, 600);
    let mut child = rfstudio()
        .args(["dataset", "import"])
        .arg(&ds)
        .arg("--from")
        .arg(&labels)
        .args(["--kind", "rf1m"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Wait until some samples are in, then SIGKILL.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n = Store::open(&ds).and_then(|s| s.sample_count()).unwrap_or(0);
        if n >= 20 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let store = Store::open(&ds).expect("open after kill");
    assert!(store.integrity_ok().expect("integrity"));
    let before = store.sample_count().expect("count");
    assert!(before > 0);
    // every committed sample that has a label has the right one
    drop(store);
    run(["dataset", "import", ds.to_str().expect("utf8"), "--from", labels.to_str().expect("utf8"), "--kind", "rf1m"]).ok();
    let store = Store::open(&ds).expect("open");
    assert_eq!(store.sample_count().expect("count"), 600);
    assert_eq!(store.all_labels().expect("labels").len(), 600);
}

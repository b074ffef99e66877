//! The annotation store: import idempotence, the tolerant RF1M parser, the labelling engine
//! (queues, undo/redo), agreement, export/split by product, a SIGKILL crash test and two
//! concurrent labelling processes.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use image::{Rgb, RgbImage};
use rfstudio::data::agreement;
use rfstudio::data::export;
use rfstudio::data::import::{ImportKind, import};
use rfstudio::data::session::{QueueOrder, Session};
use rfstudio::data::store::{Decision, NewSample, SCHEMA_VERSION, Source, Store};
use rfstudio::pipeline::generate::{AdGenerator, CancelToken, ModelPaths, run_generation};
use rfstudio::pipeline::params::GenerateParams;

use crate::common::*;
use crate::pg::{Backend, both_backends, new_dataset};

fn rfstudio() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rfstudio"));
    // English messages whatever the machine's locale (the tests read them).
    c.env("RFSTUDIO_LANG", "en");
    c.current_dir(root());
    c
}

both_backends!(
    dataset_rf1m_parser_reports_malformed_lines_and_reimports_nothing,
    dataset_folder_import_with_csv_labels,
    dataset_session_queues_undo_redo_back_forward,
    dataset_session_predicted_order_groups_by_class_unpredicted_last,
    dataset_session_revisit_skipped_mid_queue_keeps_the_sample_on_screen,
    dataset_session_grid_pages_label_skip_and_turn,
    dataset_stats_kappa_matches_hand_computation,
    dataset_export_and_split_keep_products_together,
    dataset_sigkill_mid_labelling_loses_no_committed_label,
    dataset_two_processes_labelling_concurrently_lose_nothing,
    dataset_agreement_matches_sklearn_and_statsmodels,
);

fn png(path: &Path, v: u8) {
    RgbImage::from_pixel(8, 8, Rgb([v, 255 - v, v / 2])).save(path).expect("png");
}

/// A dataset with `n` distinct tiny images over `n / 2` products, and where it is.
fn small_dataset(b: Backend, dir: &Path, n: u8) -> (Store, PathBuf) {
    let ds = new_dataset(b, dir);
    let store = Store::open(&ds).expect("open");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).expect("mkdir");
    for i in 0..n {
        let p = imgs.join(format!("{i}.png"));
        png(&p, i);
        let s = NewSample {
            product_id: format!("prod{}", i / 2),
            image: p,
            title: format!("title {i}"),
            probs: Some([0.2 + i as f32 * 0.01, 0.2, 0.2, 0.2, 0.2 - i as f32 * 0.01]),
            ..NewSample::default()
        };
        store.add_sample(&s, Source::Imported).expect("add");
    }
    (store, ds)
}

#[test]
fn dataset_import_ours_is_idempotent() {
    let tmp = tempfile::tempdir().expect("tmp");
    let generator = AdGenerator::<B>::load(
        &ModelPaths {
            base: root().join("models/tiny/sd15"),
            controlnet: root().join("models/tiny/controlnet-canny"),
            scorer: None,
            test_weights: true,
            loras: Vec::new(),
        },
        burn::tensor::DType::F32,
        &device(),
    )
    .expect("load");
    for (i, product) in ["bag", "phone"].iter().enumerate() {
        let params = GenerateParams {
            prompt: format!("a {product}"),
            title: format!("{product} title"),
            seed: Some(i as u64),
            steps: 1,
            canvas: 64,
            batch: 2,
            attempts: 2,
            ..GenerateParams::default()
        };
        run_generation(
            &generator,
            None,
            &root().join(format!("sample-data/{product}.png")),
            &params,
            &tmp.path().join("runs").join(product),
            &CancelToken::new(),
            &mut |_| {},
        )
        .expect("generate");
    }
    let store = Store::init(&tmp.path().join("ds")).expect("init");
    let first = import(&store, &tmp.path().join("runs"), ImportKind::Ours, None, &mut |_, _| {}).expect("import");
    assert_eq!((first.added, first.duplicates), (4, 0), "{:?}", first.problems);
    let second = import(&store, &tmp.path().join("runs"), ImportKind::Ours, None, &mut |_, _| {}).expect("import");
    assert_eq!((second.added, second.duplicates), (0, 4));
    assert_eq!(store.sample_count().expect("count"), 4);
    let s = store.sample(1).expect("sample");
    assert_eq!(s.prompt, "a bag");
    assert_eq!(s.title, "bag title");
    assert_eq!(s.seed, Some(0));
    assert!(store.dir().join(&s.image_path).is_file(), "blob copied");
    assert!(s.product_path.is_some());
    // The two attempts of one product share a product id; the two products differ.
    let all = store.all_samples().expect("all");
    assert_eq!(all[0].product_id, all[1].product_id);
    assert_ne!(all[0].product_id, all[2].product_id);
}

fn dataset_rf1m_parser_reports_malformed_lines_and_reimports_nothing(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let root_dir = tmp.path().join("rf1m");
    std::fs::create_dir_all(root_dir.join("p1")).expect("mkdir");
    std::fs::create_dir_all(root_dir.join("p2")).expect("mkdir");
    png(&root_dir.join("p1/a.png"), 1);
    png(&root_dir.join("p1/b.png"), 2);
    png(&root_dir.join("p2/c.png"), 3);
    png(&root_dir.join("p2/d.png"), 4);
    let labels = root_dir.join("labels.txt");
    std::fs::write(
        &labels,
        "image label\n\
         p1/a.png\t0\n\
         p1/b.png   Space Mismatch\n\
         # a comment\n\
         \n\
         p2/c.png unsuitable\n\
         p2/d.png 4\n\
         p2/missing.png 1\n\
         onlyonefield\n\
         p2/c.png 9\n\
         p1/a.png banana\n",
    )
    .expect("write");
    let ds = new_dataset(b, tmp.path());
    let store = Store::open(&ds).expect("open");
    let r = import(&store, &labels, ImportKind::Rf1m, None, &mut |_, _| {}).expect("import");
    assert_eq!(r.added, 4);
    assert_eq!(r.labels, 4);
    let lines: Vec<&str> = r.problems.iter().map(|(at, _)| at.rsplit(':').next().unwrap_or("")).collect();
    assert_eq!(lines, vec!["8", "9", "10", "11"], "{:?}", r.problems);
    assert!(r.problems[0].1.contains("not found"));
    assert!(r.problems[2].1.contains("unknown label"));
    let again = import(&store, &labels, ImportKind::Rf1m, None, &mut |_, _| {}).expect("import");
    assert_eq!(again.added, 0);
    assert_eq!(store.all_labels().expect("labels").len(), 4, "labels not duplicated");
    let s = store.all_samples().expect("all");
    assert_eq!(s[0].product_id, "p1");
    assert_eq!(s[3].product_id, "p2");
    // Via the CLI: the problems are listed with their line numbers.
    let out = rfstudio()
        .args(["dataset", "import"])
        .arg(&ds)
        .arg("--from")
        .arg(&labels)
        .args(["--kind", "rf1m"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("added 0 sample(s), 4 already present") && stdout.contains("labels.txt:9"), "{stdout}");
}

fn dataset_folder_import_with_csv_labels(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let f = tmp.path().join("folder");
    std::fs::create_dir_all(&f).expect("mkdir");
    png(&f.join("x.png"), 10);
    png(&f.join("y.png"), 20);
    std::fs::write(
        f.join("metadata.csv"),
        "image,product,title,prompt,label\nx.png,p,标题,a prompt,Available\ny.png,p,t2,,\nz.png,q,t3,,0\n",
    )
    .expect("csv");
    let store = Store::open(&new_dataset(b, tmp.path())).expect("open");
    let r = import(&store, &f, ImportKind::Folder, None, &mut |_, _| {}).expect("import");
    assert_eq!((r.added, r.labels, r.problems.len()), (2, 1, 1), "{:?}", r.problems);
    assert_eq!(store.sample(1).expect("s").title, "标题");
}

fn dataset_session_queues_undo_redo_back_forward(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (store, _) = small_dataset(b, tmp.path(), 6);
    let mut s = Session::new(&store, "alice", QueueOrder::Unlabelled).expect("session");
    assert_eq!(s.current_id(), Some(1));
    assert_eq!(s.upcoming(2).expect("upcoming"), vec![2, 3]);
    s.label(Decision::Class(0)).expect("label");
    s.label(Decision::Class(3)).expect("label");
    s.skip().expect("skip");
    assert_eq!(s.current_id(), Some(4));
    s.label(Decision::Unsuitable).expect("label");
    assert_eq!(s.labelled(), 3);
    // Undo twice: labels on 4 and 2 removed, sample 2 is current again.
    assert!(s.undo().expect("undo"));
    assert!(s.undo().expect("undo"));
    assert_eq!(s.current_id(), Some(2));
    assert_eq!(store.all_labels().expect("labels").len(), 1);
    // Redo once: sample 2 labelled 3 again.
    assert!(s.redo().expect("redo"));
    let labels = store.all_labels().expect("labels");
    assert_eq!(labels.len(), 2);
    assert_eq!(labels[1].sample_id, 2);
    assert_eq!(labels[1].decision, Decision::Class(3));
    // Back to sample 1 and relabel: replaces alice's label, no duplicate; undo restores it.
    s.goto(1);
    s.label(Decision::Class(2)).expect("relabel");
    assert_eq!(store.labels_of(1).expect("l")[0].decision, Decision::Class(2));
    assert_eq!(store.labels_of(1).expect("l").len(), 1);
    s.undo().expect("undo");
    assert_eq!(store.labels_of(1).expect("l")[0].decision, Decision::Class(0));
    assert!(s.back() || s.current_id() == Some(1));
    s.forward().expect("forward");
    assert_eq!(s.recent(10).len(), 2);
    // Uncertainty queue: highest entropy first among unlabelled.
    let bob = Session::new(&store, "bob", QueueOrder::Entropy).expect("session");
    let first = store.sample(bob.current_id().expect("id")).expect("sample");
    for other in store.all_samples().expect("all").iter().filter(|x| x.label_count == 0) {
        let e = |p: [f32; 5]| rfstudio::data::store::uncertainty(&p).0;
        assert!(e(first.probs.expect("p")) >= e(other.probs.expect("p")) - 1e-9);
    }
    // Review queue: a disagreement on sample 1 (alice 0 vs bob 4).
    store.put_label(1, "bob", Decision::Class(4), 500, false).expect("label");
    let mut lead = Session::new(&store, "lead", QueueOrder::Review).expect("session");
    assert_eq!(lead.current_id(), Some(1));
    lead.label(Decision::Class(0)).expect("review");
    assert_eq!(lead.current_id(), None, "no more disagreements");
    let rows = export::rows(&store, 0, (0.8, 0.1, 0.1)).expect("rows");
    assert_eq!(rows[0].label, Some(0));
    assert_eq!(rows[0].state, "decided");
}

/// A dataset whose samples carry the given RFNet predictions (None = no prediction).
fn predicted_dataset(b: Backend, dir: &Path, probs: &[Option<[f32; 5]>]) -> Store {
    let store = Store::open(&new_dataset(b, dir)).expect("open");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).expect("mkdir");
    for (i, p) in probs.iter().enumerate() {
        let path = imgs.join(format!("{i}.png"));
        png(&path, i as u8);
        let s = NewSample {
            product_id: format!("prod{i}"),
            image: path,
            title: format!("title {i}"),
            probs: *p,
            ..NewSample::default()
        };
        store.add_sample(&s, Source::Imported).expect("add");
    }
    store
}

/// The queue grouped by RFNet's prediction: by predicted class, most confident first within a
/// class, unpredicted samples last; the query walks an index (no sort of the whole table).
fn dataset_session_predicted_order_groups_by_class_unpredicted_last(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let one = |k: usize, conf: f32| {
        let mut p = [(1.0 - conf) / 4.0; 5];
        p[k] = conf;
        Some(p)
    };
    // ids 1..=8
    let store = predicted_dataset(
        b,
        tmp.path(),
        &[None, one(2, 0.6), one(0, 0.5), one(2, 0.9), None, one(0, 0.8), one(4, 0.7), one(1, 0.4)],
    );
    let s = Session::new(&store, "sorter", QueueOrder::Predicted).expect("session");
    let mut order = vec![s.current_id().expect("first")];
    order.extend(s.upcoming(7).expect("upcoming"));
    assert_eq!(order, vec![6, 3, 8, 4, 2, 7, 1, 5]);
    // A label takes its sample out; the rest keep their order.
    let mut s = s;
    s.label(Decision::Class(0)).expect("label");
    assert_eq!(s.current_id(), Some(3));
    // The query plan uses the expression index.
    let plan = store.explain_queue(QueueOrder::Predicted).expect("plan");
    assert!(plan.iter().any(|d| d.contains("samples_predicted")), "{plan:?}");
    // No sort of the table (SQLite: a temporary B-tree; PostgreSQL: a Sort node).
    assert!(!plan.iter().any(|d| d.contains("TEMP B-TREE") || d.trim_start().trim_start_matches("->").trim_start().starts_with("Sort")), "{plan:?}");
}

/// Revisiting skipped samples mid-queue shows them first, then the sample that was on screen,
/// then the rest of the queue: nothing is left behind.
fn dataset_session_revisit_skipped_mid_queue_keeps_the_sample_on_screen(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (store, _) = small_dataset(b, tmp.path(), 5);
    let mut s = Session::new(&store, "revisitor", QueueOrder::Unlabelled).expect("session");
    assert_eq!(s.current_id(), Some(1));
    s.skip().expect("skip");
    s.skip().expect("skip");
    assert_eq!(s.current_id(), Some(3));
    assert_eq!(s.revisit_skipped().expect("revisit"), 2);
    let mut seen = Vec::new();
    while let Some(id) = s.current_id() {
        seen.push(id);
        s.label(Decision::Class(0)).expect("label");
    }
    assert_eq!(seen, vec![1, 2, 3, 4, 5], "every sample once, the revisited ones first");
    assert_eq!(store.all_labels().expect("labels").len(), 5);
}

/// Grid pages: labelling a cell moves to the next open cell, a relabel does not count twice, a
/// finished page gives way to the next, pages turn both ways.
fn dataset_session_grid_pages_label_skip_and_turn(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (store, _) = small_dataset(b, tmp.path(), 10);
    let mut s = Session::new(&store, "gridder", QueueOrder::Unlabelled).expect("session");
    let page = s.page(4).expect("page");
    assert_eq!((page.number, page.ids.clone(), page.focus), (0, vec![1, 2, 3, 4], Some(0)));
    assert_eq!(s.next_page(4).expect("next"), vec![5, 6, 7, 8]);
    // Label the third cell: focus goes to the fourth, then wraps to the first open one.
    s.label_in_page(3, Decision::Class(1), 4).expect("label");
    assert_eq!(s.current_id(), Some(4));
    s.label_in_page(4, Decision::Class(1), 4).expect("label");
    assert_eq!(s.current_id(), Some(1));
    // Relabel: one decision per sample.
    s.label_in_page(3, Decision::Class(2), 4).expect("relabel");
    assert_eq!(s.labelled(), 2);
    assert_eq!(store.labels_of(3).expect("l").len(), 1);
    assert_eq!(s.current_id(), Some(1));
    assert!(s.skip_in_page(1, 4).expect("skip"));
    assert_eq!(s.current_id(), Some(2));
    // The last open cell: the page is done, the next one comes.
    s.label_in_page(2, Decision::Class(0), 4).expect("label");
    let page = s.page(4).expect("page");
    assert_eq!((page.number, page.ids.clone(), page.focus), (1, vec![5, 6, 7, 8], Some(0)));
    assert_eq!(s.counters().expect("counters").labelled, 3);
    assert_eq!(s.counters().expect("counters").skipped, 1);
    // Turning pages: back to page 0 (every cell decided, so its first cell is focused), then
    // forward twice to page 2.
    assert!(s.turn_page(4, false).expect("back"));
    assert_eq!(s.page(4).expect("page").focus, Some(0));
    assert_eq!(s.page(4).expect("page").number, 0);
    assert!(!s.turn_page(4, false).expect("no page before the first"));
    assert!(s.turn_page(4, true).expect("forward"));
    assert!(s.turn_page(4, true).expect("forward"));
    let page = s.page(4).expect("page");
    assert_eq!((page.number, page.ids.clone()), (2, vec![9, 10]));
    assert!(!s.turn_page(4, true).expect("nothing after"));
    // Undo brings the undone sample's page back with it focused.
    assert!(s.undo().expect("undo"));
    let page = s.page(4).expect("page");
    assert_eq!((page.number, page.focus), (0, Some(1)));
}

fn dataset_stats_kappa_matches_hand_computation(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (store, ds) = small_dataset(b, tmp.path(), 10);
    // The 2x2 table of agreement.rs' unit test: po = 0.7, pe = 0.5, kappa = 0.4.
    let a = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1];
    let b = [0, 0, 0, 0, 1, 0, 0, 1, 1, 1];
    for i in 0..10 {
        store.put_label(i as i64 + 1, "a", Decision::Class(a[i]), 1000, false).expect("a");
        store.put_label(i as i64 + 1, "b", Decision::Class(b[i]), 2000, false).expect("b");
    }
    let s = agreement::stats(10, &store.all_labels().expect("labels"));
    assert_eq!(s.cohen.len(), 1);
    assert!((s.cohen[0].kappa.expect("k") - 0.4).abs() < 1e-12);
    assert_eq!(s.disagreements.len(), 3);
    assert_eq!(s.needs_review, 3);
    // Two raters: Fleiss' kappa = (0.7 - Pe) / (1 - Pe) with pooled p0 = 0.55 -> Pe = 0.505.
    let pe = 0.55f64.powi(2) + 0.45f64.powi(2);
    assert!((s.fleiss.expect("f") - (0.7 - pe) / (1.0 - pe)).abs() < 1e-12);
    assert!((s.annotators[0].labels_per_hour - 3600.0).abs() < 1e-6);
    // CLI JSON
    let out = rfstudio().args(["dataset", "stats", "--json"]).arg(&ds).output().expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["samples"], 10);
}

fn dataset_export_and_split_keep_products_together(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (store, ds) = small_dataset(b, tmp.path(), 40);
    for id in 1..=40 {
        store.put_label(id, "a", Decision::Class((id % 5) as u8), 100, false).expect("label");
    }
    drop(store);
    let out = tmp.path().join("splits");
    let r = rfstudio()
        .args(["dataset", "split"])
        .arg(&ds)
        .args(["--ratios", "0.6,0.2,0.2", "--out"])
        .arg(&out)
        .output()
        .expect("run");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let mut seen = std::collections::BTreeMap::new();
    let mut total = 0;
    for split in ["train", "val", "test"] {
        for line in std::fs::read_to_string(out.join(format!("{split}.jsonl"))).expect("split").lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            let product = v["product_id"].as_str().expect("p").to_string();
            let prev = seen.insert(product.clone(), split);
            assert!(prev.is_none() || prev == Some(split), "{product} in two splits");
            total += 1;
        }
    }
    assert_eq!(total, 40);
    for (fmt, name) in [("jsonl", "e.jsonl"), ("csv", "e.csv")] {
        let f = tmp.path().join(name);
        let r = rfstudio()
            .args(["dataset", "export"])
            .arg(&ds)
            .args(["--format", fmt, "--out"])
            .arg(&f)
            .output()
            .expect("run");
        assert!(r.status.success());
        let text = std::fs::read_to_string(&f).expect("export");
        assert!(text.contains("Space Mismatch"), "{fmt}");
    }
    // Every individual label, with annotator and time; final labels say how they were reached.
    let f = tmp.path().join("labels.jsonl");
    let r = rfstudio().args(["dataset", "export"]).arg(&ds).arg("--labels").arg("--out").arg(&f).output().expect("run");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&f)
        .expect("labels")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(rows.len(), 40);
    assert_eq!(rows[0]["annotator"], "a");
    assert!(rows[0]["created_at"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 24), "{}", rows[0]);
    let final_rows = export::rows(&Store::open(&ds).expect("open"), 0, (0.8, 0.1, 0.1)).expect("rows");
    assert!(final_rows.iter().all(|r| r.decided_by.as_deref() == Some("majority")));
    // Unknown dataset: a clear error, exit 2.
    let r = rfstudio().args(["dataset", "stats", "/nonexistent-ds"]).output().expect("run");
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("dataset init"));
}

fn spawn_labeller(ds: &Path, annotator: &str) -> std::process::Child {
    rfstudio()
        .args(["dataset", "label"])
        .arg(ds)
        .args(["--annotator", annotator])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

fn dataset_sigkill_mid_labelling_loses_no_committed_label(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let ds = new_dataset(b, tmp.path());
    rfstudio::data::bench::build(&ds, 5000, &mut |_, _| {}).expect("build");
    let mut child = spawn_labeller(&ds, "crash");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    // Feed labels from a thread, as fast as the child takes them.
    let writer = std::thread::spawn(move || {
        for id in 1..=5000 {
            if writeln!(stdin, "{id} {}", id % 5).is_err() {
                break;
            }
        }
    });
    let mut acked = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let mut parts = line.split_whitespace();
        if parts.next() == Some("ok") {
            let _label: i64 = parts.next().and_then(|x| x.parse().ok()).expect("label id");
            acked.push(parts.next().and_then(|x| x.parse::<i64>().ok()).expect("sample id"));
        }
        if acked.len() == 300 {
            // SIGKILL in the middle of the loop.
            child.kill().expect("kill");
            break;
        }
    }
    let _ = child.wait();
    let _ = writer.join();
    assert_eq!(acked.len(), 300);
    let store = Store::open(&ds).expect("reopen after SIGKILL");
    assert!(store.integrity_ok().expect("integrity"));
    let labels = store.all_labels().expect("labels");
    let mine: std::collections::BTreeSet<i64> =
        labels.iter().filter(|l| l.annotator == "crash").map(|l| l.sample_id).collect();
    for id in &acked {
        assert!(mine.contains(id), "acknowledged label on sample {id} lost");
    }
}

fn dataset_two_processes_labelling_concurrently_lose_nothing(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let ds = new_dataset(b, tmp.path());
    rfstudio::data::bench::build(&ds, 400, &mut |_, _| {}).expect("build");
    let before = Store::open(&ds).expect("open").all_labels().expect("labels").len();
    let mut children: Vec<_> = ["p1", "p2"].iter().map(|a| spawn_labeller(&ds, a)).collect();
    for child in children.iter_mut() {
        let mut stdin = child.stdin.take().expect("stdin");
        std::thread::spawn(move || {
            for id in 1..=200 {
                let _ = writeln!(stdin, "{id} {}", id % 5);
            }
        });
    }
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 200);
    }
    let store = Store::open(&ds).expect("open");
    let labels = store.all_labels().expect("labels");
    assert_eq!(labels.len(), before + 400);
    // The per-sample counters kept up with both writers.
    let s = store.sample(10).expect("sample");
    assert_eq!(s.label_count as usize, store.labels_of(10).expect("l").len());
}

/// `n` threads opening a store at the same moment: each one's schema version, or its error.
fn all_at_once(n: usize, open: impl Fn() -> Result<Store, rfstudio::data::store::StoreError> + Sync) -> Vec<Result<i64, String>> {
    let barrier = std::sync::Barrier::new(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    open().and_then(|st| st.schema_version()).map_err(|e| e.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    })
}

/// Several processes opening a dataset of an older schema at once (annotators starting after an
/// upgrade): every open succeeds and each migration is applied once.
#[test]
fn dataset_concurrent_opens_migrate_an_old_dataset_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    drop(small_dataset(Backend::Sqlite, tmp.path(), 3));
    let ds = tmp.path().join("ds");
    // Back to schema version 1: the predicted-order index is version 2, the settings table 3.
    let db = ds.join(rfstudio::data::store::DB_FILE);
    let conn = rusqlite::Connection::open(&db).expect("open db");
    conn.execute_batch(
        "DROP INDEX samples_predicted; DROP TABLE settings; DROP TABLE leases; DROP TABLE gold; DELETE FROM schema_version WHERE version > 1;",
    )
    .expect("downgrade");
    drop(conn);
    let results = all_at_once(8, || Store::open(&ds));
    for r in &results {
        assert_eq!(r.as_ref().ok(), Some(&SCHEMA_VERSION), "{results:?}");
    }
    let conn = rusqlite::Connection::open(&db).expect("open db");
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM schema_version WHERE version > 1", [], |r| r.get(0)).expect("count");
    assert_eq!(rows, SCHEMA_VERSION - 1, "each version applied once");
}

/// Agreement on a team's labels matches references computed independently: scikit-learn's Cohen's
/// kappa and confusion matrix for every annotator pair, statsmodels' Fleiss' kappa over all
/// (`tests/fixtures/make_agreement_fixture.py`: five annotators, overlap three, 120 samples).
fn dataset_agreement_matches_sklearn_and_statsmodels(b: Backend) {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/agreement.json")).expect("fixture"))
            .expect("json");
    let n = fixture["samples"].as_u64().expect("samples") as u8;
    let tmp = tempfile::tempdir().expect("tmp");
    let (store, ds) = small_dataset(b, tmp.path(), n);
    for l in fixture["labels"].as_array().expect("labels") {
        let (sample, who, cat) = (l[0].as_i64().expect("id"), l[1].as_str().expect("who"), l[2].as_u64().expect("cat"));
        let d = if cat == 5 { Decision::Unsuitable } else { Decision::Class(cat as u8) };
        store.put_label(sample, who, d, 1000, false).expect("label");
    }
    let s = agreement::stats(n as usize, &store.all_labels().expect("labels"));
    let pairs = fixture["pairs"].as_array().expect("pairs");
    assert_eq!(s.cohen.len(), pairs.len());
    for (got, want) in s.cohen.iter().zip(pairs) {
        assert_eq!((got.a.as_str(), got.b.as_str()), (want["a"].as_str().expect("a"), want["b"].as_str().expect("b")));
        assert_eq!(got.shared as u64, want["shared"].as_u64().expect("shared"));
        let k = want["kappa"].as_f64().expect("kappa");
        assert!((got.kappa.expect("kappa") - k).abs() < 1e-12, "{}-{}: {:?} vs sklearn {k}", got.a, got.b, got.kappa);
        let confusion: Vec<Vec<usize>> = serde_json::from_value(want["confusion"].clone()).expect("confusion");
        assert_eq!(got.confusion.map(|r| r.to_vec()).to_vec(), confusion, "{}-{}", got.a, got.b);
    }
    let f = fixture["fleiss"].as_f64().expect("fleiss");
    assert!((s.fleiss.expect("fleiss") - f).abs() < 1e-12, "{:?} vs statsmodels {f}", s.fleiss);
    // The same numbers in `dataset stats --json`.
    let out = rfstudio().args(["dataset", "stats", "--json"]).arg(&ds).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["cohen"][0]["confusion"], pairs[0]["confusion"]);
    assert!((v["fleiss"].as_f64().expect("fleiss") - f).abs() < 1e-12);
}

/// Eight clients opening a new PostgreSQL database at once (a team's first morning): each
/// migration runs once, under the server's lock, and every client gets the dataset.
#[test]
fn pg_first_opens_of_a_new_database_create_the_schema_once() {
    let Some(url) = crate::pg::fresh_db() else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    let images = tmp.path().join("images");
    let results = all_at_once(8, || Store::init_postgres(&url, &images));
    for r in &results {
        assert_eq!(r.as_ref().ok(), Some(&SCHEMA_VERSION), "{results:?}");
    }
    let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let rows: i64 = c.query_one("SELECT COUNT(*) FROM schema_version", &[]).expect("count").get(0);
    assert_eq!(rows, SCHEMA_VERSION, "each version applied once");
    // Another image folder for the same dataset is refused: clients must share one.
    let e = Store::init_postgres(&url, &tmp.path().join("elsewhere")).err().expect("refused").to_string();
    assert!(e.contains(&images.display().to_string()), "{e}");
}

/// `dataset migrate`: SQLite -> PostgreSQL -> SQLite keeps every sample, label (ids, times,
/// annotators) and image; both copies print the same counts and checksums; a non-empty target
/// is refused; the password given in a URL never appears in the output.
#[test]
fn pg_dataset_migrate_round_trip_loses_nothing() {
    let Some(url) = crate::pg::fresh_db() else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    let (store, ds) = small_dataset(Backend::Sqlite, tmp.path(), 12);
    for id in 1..=12 {
        store.put_label(id, "alice", Decision::Class((id % 5) as u8), 700, false).expect("label");
        if id % 3 == 0 {
            store.put_label(id, "bob", Decision::Unsuitable, 900, false).expect("label");
        }
    }
    store.put_label(3, "lead", Decision::Class(2), 100, true).expect("review");
    let (samples, labels) = (store.all_samples().expect("samples"), store.all_labels().expect("labels"));
    drop(store);
    // The URL carries a password (the trust-auth test server ignores it): it must not leak.
    let with_password = url.replacen("user=postgres", "user=postgres&password=hunter2", 1);
    let images = tmp.path().join("shared-images");
    let to_pg = rfstudio()
        .args(["--json", "dataset", "migrate"])
        .arg(&ds)
        .arg(&with_password)
        .arg("--images")
        .arg(&images)
        .output()
        .expect("run");
    let out = String::from_utf8_lossy(&to_pg.stdout).to_string() + &String::from_utf8_lossy(&to_pg.stderr);
    assert!(to_pg.status.success(), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&to_pg.stdout).lines().last().expect("report")).expect("json");
    assert_eq!(report["target"]["samples"], 12);
    assert_eq!(report["target"]["labels"], labels.len());
    assert_eq!(report["source"], report["target"]);
    assert_eq!(report["images_copied"], 12);
    let pg = Store::open(Path::new(&url)).expect("open the copy");
    assert_eq!(pg.all_samples().expect("samples"), samples);
    assert_eq!(pg.all_labels().expect("labels"), labels);
    for s in &samples {
        assert!(pg.dir().join(&s.image_path).is_file(), "{} copied", s.image_path);
    }
    // New labels on the copy get new ids after the copied ones.
    let (l, _) = pg.put_label(1, "carol", Decision::Class(1), 10, false).expect("label on the copy");
    assert!(l.id > labels.iter().map(|l| l.id).max().unwrap_or(0));
    pg.remove_label(l.id, None).expect("undo");
    // Again into the same database: refused, nothing changed.
    let again = rfstudio().args(["dataset", "migrate"]).arg(&ds).arg(&url).output().expect("run");
    assert_eq!(again.status.code(), Some(2), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("empty"));
    // And back to a new folder.
    let back = tmp.path().join("back");
    let r = rfstudio().args(["--json", "dataset", "migrate"]).arg(&url).arg(&back).output().expect("run");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let report2: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&r.stdout).lines().last().expect("report")).expect("json");
    assert_eq!(report2["target"], report["source"], "the round trip ends where it started");
    let back = Store::open(&back).expect("open");
    assert_eq!(back.all_labels().expect("labels"), labels);
    assert!(back.integrity_ok().expect("integrity"));
}

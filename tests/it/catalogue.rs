//! Catalogue generation by several worker processes through the PostgreSQL job queue: every
//! product generated exactly once, a killed worker's product finished by another, a corrupt
//! product failed with its message.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rfstudio::data::catalogue::JobQueue;

use crate::common::*;

fn rfstudio() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rfstudio"));
    c.env("RFSTUDIO_LANG", "en");
    c.current_dir(root());
    c.args(["--models", "models/tiny", "--device", "cpu"]);
    c
}

/// `n` products over the sample images (distinct ids), and one whose "image" is not an image.
fn catalogue(dir: &Path, n: usize) -> std::path::PathBuf {
    let images = ["bag", "bottle", "chair", "jar", "kettle", "lamp", "phone", "shoe"];
    let mut lines = String::new();
    for i in 0..n {
        let img = root().join(format!("sample-data/{}.png", images[i % images.len()]));
        lines.push_str(&serde_json::json!({"id": format!("p{i:03}"), "image": img, "prompt": "on a table", "title": format!("product {i}")}).to_string());
        lines.push('\n');
    }
    std::fs::write(dir.join("broken.png"), "not an image at all").expect("write");
    lines.push_str(&serde_json::json!({"id": "broken", "image": dir.join("broken.png"), "prompt": "x"}).to_string());
    lines.push('\n');
    let file = dir.join("products.jsonl");
    std::fs::write(&file, lines).expect("catalogue");
    file
}

fn queue_rows(url: &str) -> Vec<(String, String, i64, Option<String>, Option<String>)> {
    let mut c = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    c.query("SELECT product_id, state, attempts, worker, error FROM catalogue_jobs ORDER BY id", &[])
        .expect("jobs")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// Four workers, 200 products: each generated exactly once (one output folder each, no
/// leftovers), one worker killed with SIGKILL mid-job and its product finished elsewhere, the
/// corrupt product failed with its message, not retried.
#[test]
fn pg_catalogue_four_workers_one_killed_every_product_exactly_once() {
    let Some(url) = crate::pg::fresh_db() else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    let n = 200;
    let file = catalogue(tmp.path(), n);
    let out = tmp.path().join("out");
    let submit = || {
        let r = rfstudio()
            .args(["--json", "catalogue", "submit", "--db", &url, "--batch-file"])
            .arg(&file)
            .args(["--steps", "1", "--attempts", "1", "--size", "64", "--out"])
            .arg(&out)
            .output()
            .expect("submit");
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        serde_json::from_slice::<serde_json::Value>(&r.stdout).expect("json")
    };
    assert_eq!(submit()["queued"], n + 1);
    // Submitting again queues nothing twice.
    let v = submit();
    assert_eq!((v["queued"].as_u64(), v["already_queued"].as_u64()), (Some(0), Some(n as u64 + 1)));

    let spawn = |name: &str| {
        rfstudio()
            .args(["--json", "worker", "--db", &url, "--name", name, "--lease-seconds", "4", "--max-attempts", "5"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("worker")
    };
    let mut victim = spawn("w0");
    let others: Vec<_> = ["w1", "w2", "w3"].iter().map(|w| spawn(w)).collect();
    // Kill w0 while it holds a product, after it has finished a few.
    let start = Instant::now();
    let killed_on = loop {
        let rows = queue_rows(&url);
        let done_by_w0 = rows.iter().filter(|r| r.1 == "done" && r.3.as_deref() == Some("w0")).count();
        let holding = rows.iter().find(|r| r.1 == "running" && r.3.as_deref() == Some("w0")).map(|r| r.0.clone());
        if let (true, Some(p)) = (done_by_w0 >= 3, holding) {
            victim.kill().expect("SIGKILL");
            let _ = victim.wait();
            break p;
        }
        assert!(start.elapsed() < Duration::from_secs(600), "w0 never held a product after 3 done: {rows:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    for w in others {
        let o = w.wait_with_output().expect("worker");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let rows = queue_rows(&url);
    let done: Vec<_> = rows.iter().filter(|r| r.1 == "done").collect();
    assert_eq!(done.len(), n, "{:?}", rows.iter().filter(|r| r.1 != "done").collect::<Vec<_>>());
    let broken = rows.iter().find(|r| r.0 == "broken").expect("broken job");
    assert_eq!((broken.1.as_str(), broken.2), ("failed", 1), "failed once, not retried: {broken:?}");
    assert!(broken.4.as_deref().is_some_and(|e| e.contains("broken.png")), "{broken:?}");
    // The product w0 held was finished by another worker, on a later attempt.
    let taken_over = rows.iter().find(|r| r.0 == killed_on).expect("job");
    assert_eq!(taken_over.1, "done");
    assert_ne!(taken_over.3.as_deref(), Some("w0"));
    assert!(taken_over.2 >= 2, "{taken_over:?}");
    // Exactly one finished output folder per product, nothing else left in the output root.
    let mut folders: Vec<String> = std::fs::read_dir(&out)
        .expect("out")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    let expected: Vec<String> = (0..n).map(|i| format!("p{i:03}")).collect();
    assert_eq!(folders, expected);
    for p in &expected {
        let summary = rfstudio::pipeline::run_folder::RunFolder::new(out.join(p)).read_summary().expect("summary");
        assert_eq!(summary.out_dir, out.join(p), "the summary names the product's folder");
    }
    // The status view: per-worker throughput, the failure with its message.
    let queue = JobQueue::connect(&url).expect("queue");
    let s = queue.status(None).expect("status");
    assert_eq!((s.done, s.failed, s.queued, s.running), (n as i64, 1, 0, 0));
    assert_eq!(s.workers.iter().map(|w| w.done).sum::<i64>(), n as i64);
    assert!(s.workers.iter().any(|w| w.worker == "w0"));
    let status = rfstudio().args(["catalogue", "status", "--db", &url]).output().expect("status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("done 200, failed 1") && text.contains("broken"), "{text}");
    // The results go straight into a team's annotation store on PostgreSQL for labelling.
    let ds = crate::pg::new_dataset(crate::pg::Backend::Postgres, tmp.path());
    let import = rfstudio().args(["--json", "dataset", "import"]).arg(&ds).arg("--from").arg(&out).args(["--kind", "ours"]).output().expect("import");
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    let report: serde_json::Value = serde_json::from_slice(&import.stdout).expect("import report");
    let images = report["added"].as_u64().unwrap_or(0) + report["duplicates"].as_u64().unwrap_or(0);
    assert!(images >= n as u64, "every product's images imported: {report}");
    assert_eq!(report["problems"].as_array().map(Vec::len), Some(0), "{report}");
    let store = rfstudio::data::store::Store::open(&ds).expect("open the team store");
    assert_eq!(store.sample_count().expect("count") as u64, report["added"].as_u64().expect("added"));
}

//! Team annotation: the hand-out with overlap k and leases, gold accuracy, and (PostgreSQL) the
//! roles the server enforces; eight annotator processes with one killed by SIGKILL.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rfstudio::data::store::{Claim, Decision, Role, Store, StoreError, SyntheticSample, TeamSettings};

use crate::common::*;
use crate::pg::{Backend, both_backends, new_dataset};

fn rfstudio() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rfstudio"));
    c.env("RFSTUDIO_LANG", "en");
    c.current_dir(root());
    c
}

/// A dataset of `n` synthetic samples (rows without image files): SQLite in `dir/ds`, or a
/// fresh PostgreSQL database. None when PostgreSQL tests are skipped on this machine.
fn synthetic(b: Backend, dir: &Path, n: i64) -> Option<(Store, PathBuf)> {
    if matches!(b, Backend::Postgres) {
        crate::pg::server()?;
    }
    let location = new_dataset(b, dir);
    let store = Store::open(&location).expect("open");
    let rows = (1..=n).map(|i| SyntheticSample {
        product_id: format!("p{i}"),
        image_path: format!("blobs/00/{i:016x}.png"),
        image_hash: format!("{i:064x}"),
        title: format!("sample {i}"),
        prompt: String::new(),
        probs: [0.2; 5],
        entropy: 5f64.ln(),
        margin: 0.0,
    });
    store.bulk_insert_samples(rows, &mut |_| {}).expect("samples");
    Some((store, location))
}

fn team(store: &Store, overlap: i64, lease_seconds: i64, gold_every: i64) {
    store
        .set_team_settings(&TeamSettings {
            overlap,
            lease_seconds,
            gold_every,
            blind: true,
        })
        .expect("team settings");
}

both_backends!(
    team_hand_out_gives_each_sample_to_k_annotators_and_leases_lapse,
    team_gold_samples_are_mixed_in_and_give_each_annotators_accuracy,
);

fn team_hand_out_gives_each_sample_to_k_annotators_and_leases_lapse(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (store, _) = synthetic(b, tmp.path(), 3).expect("dataset");
    team(&store, 2, 1, 0);
    assert_eq!(store.team_settings().expect("settings").overlap, 2);
    // Two annotators share sample 1, the third gets sample 2.
    assert_eq!(store.claim_next("alice").expect("claim"), Claim::Sample(1));
    assert_eq!(store.claim_next("bob").expect("claim"), Claim::Sample(1));
    assert_eq!(store.claim_next("carol").expect("claim"), Claim::Sample(2));
    // Asking again before labelling gives the same sample back (a restarted client).
    assert_eq!(store.claim_next("alice").expect("claim"), Claim::Sample(1));
    store.put_label(1, "alice", Decision::Class(0), 10, false).expect("alice labels 1");
    store.put_label(1, "bob", Decision::Class(1), 10, false).expect("bob labels 1");
    // Sample 1 has its two labels: a third is refused, a relabel is not.
    let e = store.put_label(1, "carol", Decision::Class(0), 10, false).expect_err("full");
    assert!(matches!(e, StoreError::NotAssigned { sample: 1, .. }), "{e}");
    store.put_label(1, "bob", Decision::Class(0), 10, false).expect("relabel");
    // Alice already labelled 1: she gets 2 (carol holds one of its two places), then 3.
    assert_eq!(store.claim_next("alice").expect("claim"), Claim::Sample(2));
    assert_eq!(store.claim_next("dave").expect("claim"), Claim::Sample(3));
    assert_eq!(store.claim_next("erin").expect("claim"), Claim::Sample(3));
    // Everything is leased to others: wait; once the leases lapse, carol's place on 2 is free.
    assert_eq!(store.claim_next("frank").expect("claim"), Claim::Wait);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert_eq!(store.claim_next("frank").expect("claim"), Claim::Sample(2));
    // Carol's lease lapsed and frank and alice hold sample 2 now: carol's late label is refused.
    assert_eq!(store.claim_next("alice").expect("claim"), Claim::Sample(2));
    assert!(store.put_label(2, "carol", Decision::Class(3), 10, false).is_err());
    store.put_label(2, "frank", Decision::Class(3), 10, false).expect("frank");
    store.put_label(2, "alice", Decision::Class(3), 10, false).expect("alice");
    // Review labels are never held back by the hand-out.
    store.put_label(1, "lead", Decision::Class(0), 10, true).expect("review");
    assert_eq!(store.claim_next("alice").expect("claim"), Claim::Sample(3));
    store.put_label(3, "alice", Decision::Class(4), 10, false).expect("alice");
    assert_eq!(store.claim_next("alice").expect("claim"), Claim::Done);
    assert_eq!(store.claim_next("bob").expect("claim"), Claim::Sample(3));
    store.put_label(3, "bob", Decision::Class(4), 10, false).expect("bob");
    assert_eq!(store.claim_next("zoe").expect("claim"), Claim::Done);
    for id in 1..=3 {
        assert_eq!(store.sample(id).expect("sample").label_count, 2, "sample {id}");
    }
    assert!(store.integrity_ok().expect("integrity"));
    // Settings are checked.
    let bad = TeamSettings {
        lease_seconds: 0,
        ..TeamSettings::default()
    };
    assert!(store.set_team_settings(&bad).unwrap_err().to_string().contains("lease_seconds"));
}

fn team_gold_samples_are_mixed_in_and_give_each_annotators_accuracy(b: Backend) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (store, location) = synthetic(b, tmp.path(), 10).expect("dataset");
    team(&store, 1, 60, 3);
    // Gold answers from the CLI, as an admin would give them.
    let mut gold = rfstudio()
        .args(["dataset", "gold"])
        .arg(&location)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    gold.stdin.take().expect("stdin").write_all(b"9 2\n10 unsuitable\n").expect("write");
    let out = gold.wait_with_output().expect("gold");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(store.gold().expect("gold"), vec![(9, Decision::Class(2)), (10, Decision::Unsuitable)]);
    // Every third hand-out is gold: alice gets 1, 2, then gold 9, then 3, 4, then gold 10.
    let mut got = Vec::new();
    for _ in 0..6 {
        let Claim::Sample(id) = store.claim_next("alice").expect("claim") else { panic!("no sample") };
        got.push(id);
        let answer = match id {
            9 => Decision::Class(2),    // right
            10 => Decision::Class(0),   // wrong
            _ => Decision::Class(1),
        };
        store.put_label(id, "alice", answer, 10, false).expect("label");
    }
    assert_eq!(got, vec![1, 2, 9, 3, 4, 10]);
    // Gold samples do not count against the overlap: bob labels them too.
    store.put_label(9, "bob", Decision::Class(2), 10, false).expect("bob on gold");
    let out = rfstudio().args(["--json", "dataset", "stats"]).arg(&location).output().expect("stats");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["gold"][0]["annotator"], "alice");
    assert_eq!((v["gold"][0]["correct"].as_u64(), v["gold"][0]["gold_labels"].as_u64()), (Some(1), Some(2)));
    assert_eq!(v["gold"][0]["accuracy"], 0.5);
    assert_eq!(v["gold"][1]["annotator"], "bob");
    assert_eq!(v["gold"][1]["accuracy"], 1.0);
}

/// One annotator process of the team test: asks for samples, labels each, until `done`; `kill`
/// stops it with SIGKILL after `after` labels, right after it was handed another sample.
/// Returns the samples it acknowledged labelling and the one it held when killed.
fn annotator(location: &Path, name: &str, kill_after: Option<usize>) -> (Vec<i64>, Option<i64>) {
    let mut child = rfstudio()
        .args(["dataset", "label"])
        .arg(location)
        .args(["--annotator", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut acked = Vec::new();
    let mut ask = |stdin: &mut std::process::ChildStdin, line: String| {
        writeln!(stdin, "{line}").expect("write");
        stdin.flush().expect("flush");
        lines.next().expect("a reply").expect("read")
    };
    loop {
        let reply = ask(&mut stdin, "next".into());
        match reply.split_whitespace().collect::<Vec<_>>()[..] {
            ["sample", id] => {
                let id: i64 = id.parse().expect("id");
                if kill_after.is_some_and(|k| acked.len() >= k) {
                    child.kill().expect("SIGKILL");
                    let _ = child.wait();
                    return (acked, Some(id));
                }
                let ok = ask(&mut stdin, format!("{id} {}", id % 5));
                assert!(ok.starts_with("ok "), "{name}: {ok}");
                acked.push(id);
            }
            ["wait"] => std::thread::sleep(std::time::Duration::from_millis(200)),
            ["done"] => break,
            _ => panic!("{name}: unexpected reply {reply:?}"),
        }
    }
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    (acked, None)
}

/// Eight annotator processes with overlap 2 label 2,000 samples on one PostgreSQL server; one is
/// killed with SIGKILL mid-way holding a leased sample. Every sample ends with exactly two
/// labels from two different annotators, the killed one keeps every label it was told was
/// stored, and its leased sample is labelled by others once the lease lapses.
#[test]
fn pg_team_eight_processes_overlap_two_one_killed_every_sample_labelled_twice() {
    let tmp = tempfile::tempdir().expect("tmp");
    let Some((store, location)) = synthetic(Backend::Postgres, tmp.path(), 2000) else { return };
    team(&store, 2, 2, 0);
    let results: Vec<(String, (Vec<i64>, Option<i64>))> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let location = &location;
                s.spawn(move || {
                    let name = format!("annotator{i}");
                    let r = annotator(location, &name, (i == 0).then_some(60));
                    (name, r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("annotator thread")).collect()
    });
    let labels = store.all_labels().expect("labels");
    let mut by_sample: std::collections::BTreeMap<i64, Vec<&str>> = std::collections::BTreeMap::new();
    for l in &labels {
        by_sample.entry(l.sample_id).or_default().push(&l.annotator);
    }
    assert_eq!(by_sample.len(), 2000, "every sample labelled");
    for (id, who) in &by_sample {
        assert_eq!(who.len(), 2, "sample {id}: {who:?}");
        assert_ne!(who[0], who[1], "sample {id}: one annotator twice");
    }
    let (killed, (acked, held)) = &results[0];
    let mine: std::collections::BTreeSet<i64> =
        labels.iter().filter(|l| &l.annotator == killed).map(|l| l.sample_id).collect();
    assert_eq!(acked.len(), 60);
    assert!(acked.iter().all(|id| mine.contains(id)), "a stored label of the killed annotator was lost");
    let held = held.expect("killed while holding a sample");
    assert!(!by_sample[&held].contains(&killed.as_str()), "sample {held} went to others");
    for (name, (acked, _)) in &results[1..] {
        assert!(!acked.is_empty(), "{name} labelled nothing");
    }
    assert!(store.integrity_ok().expect("integrity"));
}

/// Roles on PostgreSQL are the server's: an annotator's connection reads only its own labels,
/// cannot read gold answers or write others' labels or change samples; a reviewer reads all.
#[test]
fn pg_annotator_role_cannot_read_other_annotators_labels() {
    let tmp = tempfile::tempdir().expect("tmp");
    let Some((store, location)) = synthetic(Backend::Postgres, tmp.path(), 3) else { return };
    store.put_label(1, "alice", Decision::Class(0), 10, false).expect("alice");
    store.put_label(1, "bob", Decision::Class(1), 10, false).expect("bob");
    store.set_gold(3, Some(Decision::Class(4))).expect("gold");
    let out = rfstudio()
        .args(["dataset", "grant"])
        .arg(&location)
        .args(["alice", "--role", "annotator"])
        .output()
        .expect("grant");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    store.grant("carol", Role::Reviewer).expect("grant reviewer");
    let url = location.to_str().expect("url");
    let as_user = |user: &str| url.replacen("user=postgres", &format!("user={user}"), 1);
    // Through the store: alice's labels only; her own labelling works (the summary trigger
    // still counts everyone's labels).
    let alice = Store::open(Path::new(&as_user("alice"))).expect("alice opens the dataset");
    let seen = alice.all_labels().expect("labels");
    assert!(seen.iter().all(|l| l.annotator == "alice") && seen.len() == 1, "{seen:?}");
    alice.put_label(2, "alice", Decision::Class(3), 10, false).expect("alice labels");
    assert_eq!(alice.sample(1).expect("sample").label_count, 2);
    assert!(alice.put_label(2, "bob", Decision::Class(3), 10, false).is_err(), "labels under another name");
    // Through SQL directly: refused or filtered by the server.
    let mut c = postgres::Client::connect(&as_user("alice"), postgres::NoTls).expect("connect as alice");
    let others: i64 = c.query_one("SELECT COUNT(*) FROM labels WHERE annotator <> 'alice'", &[]).expect("count").get(0);
    assert_eq!(others, 0, "alice read another annotator's labels");
    let e = c.query("SELECT class FROM gold", &[]).expect_err("gold answers");
    assert_eq!(e.code(), Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{e:?}");
    assert!(c.execute("UPDATE samples SET label_count = 9", &[]).is_err(), "alice changed samples");
    assert!(c.execute("DELETE FROM labels WHERE annotator = 'bob'", &[]).map(|n| n == 0).unwrap_or(true));
    // The reviewer reads everyone's labels; the owner's connection still sees bob's label.
    let carol = Store::open(Path::new(&as_user("carol"))).expect("carol opens");
    assert_eq!(carol.all_labels().expect("labels").len(), 3);
    assert!(store.all_labels().expect("labels").iter().any(|l| l.annotator == "bob"));
    // Folder datasets have no server to enforce roles: said so, not pretended.
    let (folder, _) = synthetic(Backend::Sqlite, tmp.path(), 1).expect("folder");
    assert!(matches!(folder.grant("alice", Role::Annotator), Err(StoreError::RolesNeedPostgres(_))));
}

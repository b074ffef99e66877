//! The Annotate tab on a team dataset on PostgreSQL (a throwaway server, see `pg.rs`): the
//! dataset field takes the URL; an annotator labels blind; a reviewer resolves a disagreement;
//! the team view shows throughput, gold accuracy and the Cohen's kappa matrix.

use std::path::Path;
use std::time::Duration;

use egui::Key;
use egui_kittest::kittest::Queryable;
use image::{Rgb, RgbImage};
use rfstudio::app::annotate::AnnotateAction;
use rfstudio::data::session::QueueOrder;
use rfstudio::data::store::{Decision, NewSample, Source, Store, TeamSettings};

use crate::gui::{H, open_dataset_as, run_until, studio};

fn act(h: &mut H, a: AnnotateAction) {
    h.state_mut().as_mut().expect("studio").annotate.act(a);
    run_until(h, "the worker's answer", Duration::from_secs(20), |s| s.annotate.pending == 0);
}

fn labelled(h: &H) -> usize {
    studio(h).annotate.snapshot.as_ref().map_or(0, |s| s.counters.labelled)
}

#[test]
fn gui_annotate_postgres_label_blind_resolve_as_reviewer_and_see_the_kappa_matrix() {
    let Some(url) = crate::pg::fresh_db() else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    let store = Store::init_postgres(&url, &tmp.path().join("team-images")).expect("init");
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).expect("mkdir");
    for i in 0..4u8 {
        let p = imgs.join(format!("{i}.png"));
        RgbImage::from_pixel(16, 16, Rgb([i * 50, 90, 200 - i * 40])).save(&p).expect("png");
        let s = NewSample {
            product_id: format!("prod{i}"),
            image: p,
            title: format!("team sample {i}"),
            probs: Some([0.6, 0.1, 0.1, 0.1, 0.1]),
            ..NewSample::default()
        };
        store.add_sample(&s, Source::Imported).expect("add");
    }
    // Sample 4 is gold (Available).
    store.set_gold(4, Some(Decision::Class(0))).expect("gold");
    store
        .set_team_settings(&TeamSettings {
            blind: true,
            ..TeamSettings::default()
        })
        .expect("team settings");
    drop(store);

    // Alice opens the dataset by its URL and labels blind: RFNet's prediction is hidden.
    let mut h = open_dataset_as(tmp.path(), Path::new(&url), "alice");
    let s = studio(&h);
    let snap = s.annotate.snapshot.as_ref().expect("snapshot");
    assert!(snap.blind && s.annotate.hide_prediction, "blind labelling hides the prediction");
    assert_eq!(snap.dataset, tmp.path().join("team-images"), "images come from the recorded folder");
    assert_eq!(snap.current.as_ref().map(|c| c.id), Some(1));
    for (n, key) in [(1, Key::Num1), (2, Key::Num1), (3, Key::Num2), (4, Key::Num1)] {
        h.key_press(key);
        run_until(&mut h, "the label to be written", Duration::from_secs(20), |s| {
            s.annotate.pending == 0 && labelled_of(s) == n
        });
    }
    assert_eq!(labelled(&h), 4);
    // Bob, at another machine, labels the first two: one agrees with alice, one does not.
    let bob = Store::open(Path::new(&url)).expect("bob opens");
    bob.put_label(1, "bob", Decision::Class(2), 900, false).expect("bob");
    bob.put_label(2, "bob", Decision::Class(0), 900, false).expect("bob");

    // The lead reviews: the review queue holds sample 1 (alice Available, bob Size Mismatch).
    h.state_mut().as_mut().expect("studio").settings.annotate.annotator = "lead".into();
    h.step();
    run_until(&mut h, "the new annotator", Duration::from_secs(20), |s| {
        s.annotate.pending == 0 && s.annotate.snapshot.as_ref().is_some_and(|x| x.annotator == "lead")
    });
    act(&mut h, AnnotateAction::SetOrder(QueueOrder::Review));
    assert_eq!(studio(&h).annotate.snapshot.as_ref().and_then(|s| s.current.as_ref().map(|c| c.id)), Some(1));
    h.key_press(Key::Num3);
    run_until(&mut h, "the review decision", Duration::from_secs(20), |s| {
        s.annotate.pending == 0 && s.annotate.snapshot.as_ref().is_some_and(|x| x.current.is_none())
    });
    let check = Store::open(Path::new(&url)).expect("open");
    let review: Vec<_> = check.labels_of(1).expect("labels").into_iter().filter(|l| l.review).collect();
    assert_eq!((review.len(), review[0].annotator.as_str(), review[0].decision), (1, "lead", Decision::Class(2)));

    // The team view: throughput, gold accuracy, the kappa matrix.
    h.get_by_label("Team").click();
    run_until(&mut h, "the team view", Duration::from_secs(20), |s| s.annotate.team.is_some());
    h.step();
    let team = studio(&h).annotate.team.clone().expect("team");
    let pair = team.stats.cohen.iter().find(|p| p.a == "alice" && p.b == "bob").expect("alice-bob pair");
    assert_eq!(pair.shared, 2);
    // alice [0, 0] vs bob [2, 0]: observed 0.5, expected 0.5, kappa 0.
    assert_eq!(pair.kappa.map(|k| format!("{k:.3}")).as_deref(), Some("0.000"));
    h.get_by_label("Cohen's κ per pair");
    assert!(!h.get_all_by_label("0.000").collect::<Vec<_>>().is_empty(), "the matrix shows the pair's kappa");
    let gold = team.stats.gold.iter().find(|g| g.annotator == "alice").expect("alice's gold accuracy");
    assert_eq!((gold.correct, gold.gold_labels), (1, 1));
    h.get_by_label("100% (1/1)");
    assert_eq!(team.stats.disagreements, vec![1]);
    // The pair's confusion: alice said Available where bob said Size Mismatch once.
    assert_eq!(pair.confusion[0][2], 1);
    h.get_by_label("rows: alice's label, columns: bob's");
}

fn labelled_of(s: &rfstudio::app::Studio) -> usize {
    s.annotate.snapshot.as_ref().map_or(0, |x| x.counters.labelled)
}

/// The Generate tab watches a catalogue queue: counts, each worker's throughput, failures with
/// their messages, updated as workers progress.
#[test]
fn gui_generate_watches_a_catalogue_queue_on_postgres() {
    use rfstudio::data::catalogue::{JobQueue, NewJob};
    let Some(url) = crate::pg::fresh_db() else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    let queue = JobQueue::connect(&url).expect("queue");
    let jobs: Vec<NewJob> = (0..3)
        .map(|i| NewJob {
            product_id: format!("p{i}"),
            product: tmp.path().join(format!("p{i}.png")),
            params: Default::default(),
            out_dir: tmp.path().join("out").join(format!("p{i}")),
        })
        .collect();
    queue.submit("shoes", &jobs).expect("submit");
    let mut h = crate::gui::harness(crate::gui::tiny_settings(tmp.path()));
    h.state_mut().as_mut().expect("studio").settings.generate.catalogue_db = url.clone();
    h.get_by_label("Catalogue queue").click();
    h.step();
    h.get_by_label("Watch").click();
    run_until(&mut h, "the queue's status", Duration::from_secs(20), |s| {
        s.generate.catalogue.status.as_ref().is_some_and(|q| q.queued == 3)
    });
    h.step();
    h.get_by_label("queued 3 · running 0 · done 0 · failed 0");
    // A worker fails one product: the tab shows it with its message within a poll or two.
    let job = queue.claim("w-test", 60, 3).expect("claim").expect("a job");
    queue.fail(&job, "w-test", "p0.png: not an image").expect("fail");
    run_until(&mut h, "the failure", Duration::from_secs(20), |s| {
        s.generate.catalogue.status.as_ref().is_some_and(|q| q.failed == 1)
    });
    h.step();
    h.get_by_label("p0: p0.png: not an image");
    h.get_by_label("Stop watching").click();
    h.step();
    assert!(!studio(&h).generate.catalogue.is_watching());
}

//! The Annotate tab's grid view driven as a user would: `gui_annotate_grid_...` tests (and the
//! recent decisions' thumbnails and titles).

use std::path::{Path, PathBuf};
use std::time::Duration;

use egui::Key;
use egui_kittest::kittest::Queryable;
use rfstudio::app::annotate::GridPage;
use rfstudio::app::images::thumbnail_key;
use rfstudio::app::annotate::THUMB_SIDE;
use rfstudio::data::session::QueueOrder;
use rfstudio::data::store::{Decision, NewSample, Source, Store};

use super::gui::{H, open_dataset_as, png, run_until, studio};

/// A dataset of samples titled `grid <i>` with the given RFNet predictions (None: none), and
/// the studio opened on it as `annotator`.
fn open_dataset(tmp: &Path, probs: &[Option<[f32; 5]>], annotator: &str) -> (H, PathBuf) {
    let ds = tmp.join("ds");
    let store = Store::init(&ds).expect("init");
    let imgs = tmp.join("imgs");
    std::fs::create_dir_all(&imgs).expect("mkdir");
    for (i, p) in probs.iter().enumerate() {
        let path = imgs.join(format!("{i}.png"));
        png(&path, (i * 4) as u8);
        let s = NewSample {
            product_id: format!("prod{i}"),
            image: path,
            title: format!("grid {i}"),
            probs: *p,
            ..NewSample::default()
        };
        store.add_sample(&s, Source::Imported).expect("add");
    }
    drop(store);
    (open_dataset_as(tmp, &ds, annotator), ds)
}

fn page(h: &H) -> GridPage {
    studio(h).annotate.snapshot.as_ref().and_then(|s| s.grid.clone()).expect("a grid page")
}

fn labelled(h: &H) -> usize {
    studio(h).annotate.snapshot.as_ref().map_or(0, |s| s.counters.labelled)
}

/// Switch to the grid view and wait for a page whose thumbnails (and the next page's) are
/// decoded.
fn open_grid(h: &mut H) {
    h.get_by_label("▦ Grid view").click();
    run_until(h, "the grid page and its thumbnails", Duration::from_secs(60), |s| {
        s.annotate.pending == 0
            && s.annotate.snapshot.as_ref().is_some_and(|snap| {
                snap.grid.as_ref().is_some_and(|g| {
                    g.cells
                        .iter()
                        .map(|c| &c.sample)
                        .chain(g.next.iter())
                        .all(|x| s.images.texture(&thumbnail_key(&snap.dataset.join(&x.image_path), THUMB_SIDE)).is_some())
                })
            })
    });
    h.step();
}

/// Press a key and wait until the worker has answered what it caused.
fn press(h: &mut H, key: Key) {
    h.key_press(key);
    h.step();
    run_until(h, "the worker's answer", Duration::from_secs(10), |s| s.annotate.pending == 0);
    h.step();
}

/// `annotator`'s stored labels as (sample id, decision), by sample id.
pub(crate) fn mine(ds: &Path, annotator: &str) -> Vec<(i64, Decision)> {
    let store = Store::open(ds).expect("open");
    let mut v: Vec<(i64, Decision)> = store
        .all_labels()
        .expect("labels")
        .into_iter()
        .filter(|l| l.annotator == annotator)
        .map(|l| (l.sample_id, l.decision))
        .collect();
    v.sort_by_key(|x| x.0);
    v
}

/// The grid shows a full page of cells, each with its title and its thumbnail decoded off the
/// UI thread; the next page's thumbnails are prefetched.
#[test]
fn gui_annotate_grid_shows_a_page_of_titled_cells_and_prefetches_the_next() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut h, _) = open_dataset(tmp.path(), &[None; 60], "viewer");
    open_grid(&mut h);
    let g = page(&h);
    assert!(g.size >= 4, "a page of {} cells", g.size);
    assert_eq!(g.cells.len(), g.size.min(60));
    assert_eq!(g.number, 0);
    assert_eq!(g.focus, Some(0));
    assert_eq!(g.next.len(), g.size.min(60 - g.cells.len()));
    for c in &g.cells {
        h.get_by_label(&c.sample.title);
    }
    assert_eq!(h.query_all_by_label("unlabelled").count(), g.cells.len());
    // A cell's parts go top to bottom: its state under its title, and every cell on screen.
    {
        use egui_kittest::kittest::NodeT;
        let title = h.get_by_label(&g.cells[0].sample.title).accesskit_node().bounding_box().expect("placed");
        let state = h.query_all_by_label("unlabelled").next().expect("a cell").accesskit_node().bounding_box().expect("placed");
        assert!(state.y0 >= title.y1 - 1.0, "the cell's state is beside its title, not under it: {title:?} {state:?}");
        for c in &g.cells {
            let b = h.get_by_label(&c.sample.title).accesskit_node().bounding_box().expect("placed");
            assert!(b.x1 <= 1400.0 && b.y1 <= 900.0, "cell {} off screen: {b:?}", c.sample.title);
        }
    }
    // Back to the single view: one sample again.
    h.get_by_label("▦ Grid view").click();
    run_until(&mut h, "the single view", Duration::from_secs(10), |s| {
        s.annotate.pending == 0 && s.annotate.snapshot.as_ref().is_some_and(|x| x.grid.is_none())
    });
}

/// Arrows move the focus, a digit labels the focused sample under the current annotator and
/// moves to the next unlabelled cell; relabelling a cell does not count twice; N/P and
/// PageDown/PageUp turn pages; a page whose cells are all decided gives way to the next; undo
/// works as in the single view.
#[test]
fn gui_annotate_grid_keyboard_focus_labels_counts_once_and_turns_pages() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut h, ds) = open_dataset(tmp.path(), &[None; 50], "gridder");
    open_grid(&mut h);
    let g = page(&h);
    let size = g.size;
    assert!(size >= 4 && 50 >= 2 * size + 1, "page size {size}");
    let id = |g: &GridPage, i: usize| g.cells[i].sample.id;
    press(&mut h, Key::ArrowRight);
    assert_eq!(page(&h).focus, Some(1));
    press(&mut h, Key::Num3);
    assert_eq!(labelled(&h), 1);
    assert_eq!(mine(&ds, "gridder"), vec![(id(&g, 1), Decision::Class(2))]);
    let now = page(&h);
    assert_eq!(now.focus, Some(2), "on to the next unlabelled cell");
    assert_eq!(now.cells[1].label, Some(Decision::Class(2)));
    // A label key on the previous cell after moving back: a relabel, not a second label.
    press(&mut h, Key::ArrowLeft);
    assert_eq!(page(&h).focus, Some(1));
    press(&mut h, Key::Num5);
    assert_eq!(labelled(&h), 1, "a relabel is not a new label");
    assert_eq!(mine(&ds, "gridder"), vec![(id(&g, 1), Decision::Class(4))]);
    // The next unlabelled cell after 1 is 2; label it, then click cell 0 and label it.
    assert_eq!(page(&h).focus, Some(2));
    press(&mut h, Key::Num1);
    h.get_by_label(&g.cells[0].sample.title).click();
    h.step();
    run_until(&mut h, "the click's focus", Duration::from_secs(10), |s| {
        s.annotate.pending == 0 && s.annotate.snapshot.as_ref().and_then(|x| x.grid.as_ref()).is_some_and(|g| g.focus == Some(0))
    });
    press(&mut h, Key::Num2);
    assert_eq!(labelled(&h), 3);
    assert_eq!(page(&h).focus, Some(3), "after cell 0 the next open cell is 3");
    let counters = studio(&h).annotate.snapshot.as_ref().map(|s| s.counters.clone()).expect("counters");
    assert_eq!(counters.remaining_unlabelled, 47);
    // Page turns.
    press(&mut h, Key::PageDown);
    assert_eq!(page(&h).number, 1);
    press(&mut h, Key::P);
    assert_eq!(page(&h).number, 0);
    press(&mut h, Key::N);
    let p1 = page(&h);
    assert_eq!((p1.number, p1.focus), (1, Some(0)));
    // Label every cell of page 1 with the keyboard alone: the page advances by itself.
    for _ in 0..size {
        press(&mut h, Key::Num1);
    }
    let p2 = page(&h);
    assert_eq!(p2.number, 2, "a finished page gives way to the next");
    assert_eq!(labelled(&h), 3 + size);
    let labels = mine(&ds, "gridder");
    assert_eq!(labels.len(), 3 + size);
    for c in &p1.cells {
        assert!(labels.contains(&(c.sample.id, Decision::Class(0))), "sample {} unlabelled", c.sample.id);
    }
    // S skips the focused cell; undo takes back the last label and shows its page.
    press(&mut h, Key::S);
    assert_eq!(page(&h).focus, Some(1));
    assert_eq!(studio(&h).annotate.snapshot.as_ref().map(|s| s.counters.skipped), Some(1));
    press(&mut h, Key::Backspace);
    assert_eq!(labelled(&h), 2 + size);
    let back = page(&h);
    assert_eq!((back.number, back.focus), (1, Some(size - 1)));
    assert!(studio(&h).annotate.errors.is_empty(), "{:?}", studio(&h).annotate.errors);
}

/// The grid's grouping by RFNet's prediction: cells ordered by predicted class, most confident
/// first, unpredicted last; the prediction is shown on each cell unless hidden.
#[test]
fn gui_annotate_grid_presort_groups_by_prediction_unpredicted_last() {
    let one = |k: usize, conf: f32| {
        let mut p = [(1.0 - conf) / 4.0; 5];
        p[k] = conf;
        Some(p)
    };
    let probs = [None, one(3, 0.7), one(0, 0.6), None, one(3, 0.9), one(1, 0.5), one(0, 0.95), one(4, 0.8)];
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut h, _) = open_dataset(tmp.path(), &probs, "sorter");
    open_grid(&mut h);
    assert_eq!(page(&h).cells.len(), 8);
    h.get_by_label("group by RFNet's prediction").click();
    h.step();
    run_until(&mut h, "the grouped page", Duration::from_secs(10), |s| {
        s.annotate.pending == 0 && s.annotate.snapshot.as_ref().is_some_and(|x| x.order == QueueOrder::Predicted)
    });
    h.step();
    assert_eq!(studio(&h).settings.annotate.order, QueueOrder::Predicted);
    let titles: Vec<String> = page(&h).cells.iter().map(|c| c.sample.title.clone()).collect();
    assert_eq!(titles, ["grid 6", "grid 2", "grid 5", "grid 4", "grid 1", "grid 7", "grid 0", "grid 3"]);
    assert_eq!(h.query_all_by_label_contains("RFNet: ").count(), 6);
    h.get_by_label("RFNet: Available 0.95");
    h.get_by_label("hide RFNet's prediction").click();
    h.step();
    h.step();
    assert_eq!(h.query_all_by_label_contains("RFNet: ").count(), 0, "the prediction is hidden");
    // Switching the grouping off goes back to the previous order.
    h.get_by_label("group by RFNet's prediction").click();
    h.step();
    run_until(&mut h, "the previous order", Duration::from_secs(10), |s| {
        s.annotate.pending == 0 && s.annotate.snapshot.as_ref().is_some_and(|x| x.order == QueueOrder::Unlabelled)
    });
}

/// The recent decisions show each sample's title and thumbnail (single view).
#[test]
fn gui_annotate_recent_decisions_show_titles_and_thumbnails() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut h, ds) = open_dataset(tmp.path(), &[None; 6], "recorder");
    for key in [Key::Num1, Key::Num2, Key::U] {
        press(&mut h, key);
    }
    assert_eq!(labelled(&h), 3);
    run_until(&mut h, "the recent thumbnails", Duration::from_secs(30), |s| {
        s.annotate.snapshot.as_ref().is_some_and(|snap| {
            snap.recent.len() == 3
                && snap.recent.iter().all(|r| s.images.texture(&thumbnail_key(&ds.join(&r.image_path), THUMB_SIDE)).is_some())
        })
    });
    h.step();
    // The three labelled samples are no longer on screen: their titles are the recent list's.
    for t in ["grid 0", "grid 1", "grid 2"] {
        h.get_by_label(t);
    }
    let recent: Vec<String> = studio(&h).annotate.snapshot.as_ref().expect("snap").recent.iter().map(|r| r.title.clone()).collect();
    assert_eq!(recent, ["grid 2", "grid 1", "grid 0"]);
}

//! The studio driven as a user would (egui_kittest, no window, CPU): `gui_<tab>_...` tests.
//! Each test runs the real `Studio` with its real worker threads on the tiny models.

use std::path::Path;
use std::time::{Duration, Instant};

use egui::Key;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use image::{Rgb, RgbImage};
use rfstudio::app::generate::{GenerateState, RunStatus};
use rfstudio::app::images::file_key;
use rfstudio::app::models::demo_banner;
use rfstudio::app::{Settings, Studio};
use rfstudio::data::store::{Decision, NewSample, Source, Store};
use rfstudio::device::DeviceRequest;
use rfstudio::models::manifest::Role;
use rfstudio::pipeline::score::CLASS_NAMES;

use crate::common::root;

pub(crate) type H = Harness<'static, Option<Studio>>;

/// The studio in a test harness, returned once its first model check has answered: the check's
/// result adds the demo banner above every tab, and a click aimed at a control before it arrives
/// lands where the control no longer is (kittest clicks at the last frame's position).
pub(crate) fn harness(settings: Settings) -> H {
    let mut h = Harness::builder()
        .with_size(egui::Vec2::new(1400.0, 900.0))
        .build_ui_state(
            move |ui, state: &mut Option<Studio>| {
                let studio = state.get_or_insert_with(|| Studio::new(ui.ctx(), settings.clone()));
                studio.ui(ui);
            },
            None,
        );
    run_until(&mut h, "the first model check", Duration::from_secs(120), |s| !s.models.checking());
    h.step();
    h
}

pub(crate) fn studio(h: &H) -> &Studio {
    h.state().as_ref().expect("studio created on the first frame")
}

/// Step frames until `cond` holds (workers answer asynchronously).
pub(crate) fn run_until(h: &mut H, what: &str, timeout: Duration, cond: impl Fn(&Studio) -> bool) {
    let start = Instant::now();
    loop {
        h.step();
        if h.state().as_ref().is_some_and(&cond) {
            return;
        }
        if start.elapsed() > timeout {
            let s = studio(h);
            panic!(
                "timed out after {timeout:?} waiting for {what}; errors: generate {:?}, annotate {:?}, finetune {:?} {:?} (job running: {}, outcome {:?}, run shown {:?}), models {:?}, studio {:?}",
                s.generate.errors,
                s.annotate.errors,
                s.finetune.errors,
                s.finetune.job_errors,
                s.finetune.job.is_some(),
                s.finetune.job_outcome,
                s.settings.finetune.selected,
                s.models.errors,
                s.errors
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(crate) fn tiny_settings(tmp: &Path) -> Settings {
    let mut s = Settings::default();
    // The tests find controls by their English labels, whatever this machine's locale.
    s.lang = Some(rfstudio::i18n::Lang::En);
    s.models_dir = root().join("models/tiny");
    s.device = DeviceRequest::Cpu;
    s.generate.out_root = tmp.join("out");
    s.generate.params.canvas = 128;
    s.generate.params.steps = 2;
    s.generate.params.attempts = 1;
    s.generate.random_seed = false;
    s.generate.seed = 7;
    s.finetune.runs_root = tmp.join("runs");
    s
}

#[test]
fn gui_generate_sample_product_two_step_tiny_run_shows_attempt_cards() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(tiny_settings(tmp.path()));
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    // Demo mode on the tiny models: the banner says so.
    h.get_by_label(demo_banner());
    // Load a sample product: its placement, mask and Canny previews appear.
    h.get_by_label("kettle").click();
    run_until(&mut h, "placement previews", Duration::from_secs(30), |s| {
        s.settings.generate.product.as_ref().is_some_and(|p| p.ends_with("kettle.png"))
            && GenerateState::placement_name(&s.settings.generate).is_some_and(|k| {
                ["product", "mask", "control"]
                    .iter()
                    .all(|part| s.images.texture(&format!("{k}/{part}")).is_some())
            })
    });
    // The sample's Chinese title is in the form (and drawn with the CJK font).
    let title = studio(&h).settings.generate.params.title.clone();
    assert!(title.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)), "{title}");
    h.get_by_label("Start").click();
    run_until(&mut h, "the generation to finish", Duration::from_secs(180), |s| {
        !s.generate.is_running() && s.generate.status != RunStatus::Idle
    });
    let s = studio(&h);
    assert_eq!(s.generate.status, RunStatus::Finished, "errors: {:?}", s.generate.errors);
    assert_eq!(s.generate.attempts.len(), 1);
    let progress = s.generate.progress.clone().expect("progress");
    assert_eq!((progress.step, progress.total_steps), (2, 2));
    let out = s.generate.out_dir.clone().expect("out dir");
    assert!(out.join("attempt_001.png").is_file());
    let stats = s.frame_stats.clone();
    let scored = s.generate.attempts[0].probs.is_some();
    run_until(&mut h, "the attempt image", Duration::from_secs(30), |s| {
        s.images.texture(&file_key(&out.join("attempt_001.png"))).is_some()
    });
    h.step();
    h.get_by_label("attempt 1");
    if root().join("models/tiny/rfnet/model.safetensors").is_file() {
        // With the tiny RFNet, the card shows the five class probabilities.
        assert!(scored, "the tiny stack has an RFNet: the attempt must be scored");
        for name in CLASS_NAMES {
            assert!(h.query_all_by_label_contains(name).count() >= 1, "{name} missing");
        }
        // The outcome in plain words (random weights never pass the threshold).
        h.get_by_label_contains("no attempt reached the threshold: the best, attempt 1, has P(Available)");
    } else {
        h.get_by_label("unscored (no RFNet installed)");
    }
    // The history lists the run, with its parameters loadable.
    run_until(&mut h, "history", Duration::from_secs(10), |s| !s.generate.history.is_empty());
    eprintln!(
        "UI frame time while generating (kittest, no renderer): mean {:.2} ms, max {:.2} ms over {} frames",
        stats.mean_ms, stats.max_ms, stats.frames
    );
    assert!(stats.frames > 0);
    assert!(stats.max_ms < 500.0, "the UI thread blocked: {stats:?}");
}

#[test]
fn gui_generate_cancel_stops_a_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    settings.generate.params.steps = 400;
    settings.generate.product = Some(root().join("sample-data/shoe.png"));
    let mut h = harness(settings);
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    h.get_by_label("Start").click();
    run_until(&mut h, "the first step", Duration::from_secs(120), |s| {
        s.generate.progress.as_ref().is_some_and(|p| p.step >= 1)
    });
    h.get_by_label("Cancel").click();
    // At once: the next frame shows the run cancelled and Start back.
    h.step();
    assert!(!studio(&h).generate.is_running(), "Cancel did not end the run at once");
    let s = studio(&h);
    assert_eq!(s.generate.status, RunStatus::Cancelled, "errors: {:?}", s.generate.errors);
    assert!(s.generate.progress.as_ref().is_some_and(|p| p.step < 400));
    assert!(s.generate.attempts.is_empty());
    h.step();
    h.get_by_label("Run: cancelled");
    // The history labels the run as cancelled, not as a finished run with no image.
    run_until(&mut h, "the history", Duration::from_secs(30), |s| !s.generate.history.is_empty());
    h.step();
    h.get_by_label_contains("cancelled or interrupted");
}

pub(crate) fn png(path: &Path, v: u8) {
    RgbImage::from_fn(48, 48, |x, y| Rgb([v, (x * 5) as u8, (y * 5) as u8])).save(path).expect("png");
}

#[test]
fn gui_annotate_label_three_by_keyboard_and_undo_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ds = tmp.path().join("ds");
    let store = Store::init(&ds).expect("init");
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).expect("mkdir");
    for i in 0..6u8 {
        let p = imgs.join(format!("{i}.png"));
        png(&p, i * 40);
        let s = NewSample {
            product_id: format!("prod{}", i / 2),
            product_image: Some(root().join("sample-data/kettle.png")),
            image: p,
            title: format!("不锈钢电水壶 {i}"),
            ..NewSample::default()
        };
        store.add_sample(&s, Source::Imported).expect("add");
    }
    drop(store);
    let mut settings = tiny_settings(tmp.path());
    settings.annotate.dataset = ds.clone();
    settings.annotate.annotator = "gui-tester".into();
    let mut h = harness(settings);
    h.step();
    h.get_by_label("Annotate").click();
    h.step();
    h.get_by_label("Open dataset").click();
    // Generous: on a loaded 2-core machine the first frames (font atlas, loader threads) of
    // several studios starting at once can take long.
    run_until(&mut h, "the first sample and its prefetched successors", Duration::from_secs(120), |s| {
        s.annotate.snapshot.as_ref().is_some_and(|snap| {
            snap.current.is_some()
                && snap.upcoming.len() == 3
                && snap
                    .upcoming
                    .iter()
                    .all(|u| s.images.texture(&file_key(&snap.dataset.join(&u.image_path))).is_some())
        })
    });
    let first = studio(&h).annotate.snapshot.as_ref().and_then(|s| s.current.clone()).expect("current");
    h.get_by_label_contains("不锈钢电水壶");
    for (n, key) in [(1, Key::Num1), (2, Key::Num3), (3, Key::U)] {
        h.key_press(key);
        run_until(&mut h, "the label to be written", Duration::from_secs(10), |s| {
            s.annotate.pending == 0 && s.annotate.snapshot.as_ref().is_some_and(|x| x.counters.labelled == n)
        });
        // Prefetch: the sample now shown was decoded before it was shown.
        let s = studio(&h);
        let snap = s.annotate.snapshot.as_ref().expect("snapshot");
        let cur = snap.current.as_ref().expect("current");
        assert!(
            s.images.texture(&file_key(&snap.dataset.join(&cur.image_path))).is_some(),
            "the next image was not prefetched"
        );
    }
    h.key_press(Key::Backspace);
    run_until(&mut h, "the undo", Duration::from_secs(10), |s| {
        s.annotate.pending == 0 && s.annotate.snapshot.as_ref().is_some_and(|x| x.counters.labelled == 2)
    });
    let s = studio(&h);
    let snap = s.annotate.snapshot.as_ref().expect("snapshot");
    assert_eq!(snap.recent.len(), 2);
    assert!(s.annotate.errors.is_empty(), "{:?}", s.annotate.errors);
    // The database holds exactly the two remaining labels.
    let store = Store::open(&ds).expect("open");
    let mut mine: Vec<(i64, Decision)> = store
        .all_labels()
        .expect("labels")
        .into_iter()
        .filter(|l| l.annotator == "gui-tester")
        .map(|l| (l.sample_id, l.decision))
        .collect();
    mine.sort_by_key(|(id, _)| *id);
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert_eq!(mine[0], (first.id, Decision::Class(0)));
    assert_eq!(mine[1].1, Decision::Class(2));
    // The undone sample (the Unsuitable one) is on screen again.
    assert!(snap.current.as_ref().is_some_and(|c| !mine.iter().any(|(id, _)| *id == c.id)));
}

pub(crate) fn write_rfft_run(dir: &Path, steps: std::ops::Range<usize>, evals: &[usize]) {
    std::fs::create_dir_all(dir.join("eval")).expect("mkdir");
    std::fs::write(
        dir.join("run.toml"),
        "products = [\"sample-data/kettle.png\"]\nprompts = [\"a kettle on a counter\"]\neval_products = [\"sample-data/shoe.png\"]\nreg = \"cc\"\nbeta = 1.0\nlr = 1e-5\nsteps = 20\neval_every = 10\nseed = 0\nlora_rank = 4\n",
    )
    .expect("run.toml");
    let mut lines = String::new();
    for s in steps.clone() {
        lines += &format!(
            "{{\"kind\":\"step\",\"step\":{s},\"f_ac\":{},\"reg\":{},\"total\":{},\"grad_norm\":0.5,\"step_time_s\":0.2,\"memory_bytes\":null,\"lr\":1e-5}}\n",
            1.0 / s as f64,
            0.1,
            1.0 / s as f64 + 0.1
        );
    }
    for &e in evals {
        let grid = format!("eval/step-{e:06}.png");
        png(&dir.join(&grid), 200);
        lines += &format!(
            "{{\"kind\":\"eval\",\"step\":{e},\"availability_rate\":0.5,\"mean_f_ac\":0.3,\"grid\":\"{grid}\",\"samples\":[{{\"product\":\"shoe\",\"seed\":1,\"probs\":[0.6,0.1,0.1,0.1,0.1],\"available\":true}}]}}\n"
        );
    }
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("metrics.jsonl"))
        .expect("metrics");
    f.write_all(lines.as_bytes()).expect("write");
    std::fs::write(
        dir.join("state.json"),
        format!("{{\"step\":{},\"status\":\"running\"}}", steps.end.saturating_sub(1)),
    )
    .expect("state");
}

#[test]
fn gui_finetune_monitors_runs_and_curves_gain_points() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = tmp.path().join("runs").join("rfft-demo");
    write_rfft_run(&run, 1..3, &[]);
    let rfnet = tmp.path().join("runs").join("rfnet-demo");
    std::fs::create_dir_all(&rfnet).expect("mkdir");
    std::fs::write(rfnet.join("train.json"), "{\"epochs\": 2, \"lr\": 0.001, \"batch\": 8}").expect("train.json");
    std::fs::write(
        rfnet.join("metrics.jsonl"),
        "{\"kind\":\"step\",\"epoch\":1,\"step\":1,\"loss\":1.6,\"accuracy\":0.2,\"lr\":0.001}\n{\"kind\":\"step\",\"epoch\":1,\"step\":2,\"loss\":1.4,\"accuracy\":0.3,\"lr\":0.001}\n{\"kind\":\"epoch\",\"epoch\":1,\"step\":2,\"train_loss\":1.5,\"train_accuracy\":0.25,\"val_loss\":1.45,\"val_accuracy\":0.3,\"val_macro_f1\":0.2,\"seconds\":1.0}\n",
    )
    .expect("metrics");
    let mut h = harness(tiny_settings(tmp.path()));
    h.step();
    h.get_by_label("Fine-tune").click();
    run_until(&mut h, "the run list", Duration::from_secs(10), |s| s.finetune.runs.len() == 2);
    h.get_by_label_contains("rfft-demo").click();
    run_until(&mut h, "the RFFT run's curve", Duration::from_secs(10), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.points() == 2)
    });
    h.get_by_label("Hyperparameters").click();
    h.step();
    h.get_by_label("lora_rank");
    // The run goes on: new metrics lines and an eval step appear on the curves.
    write_rfft_run(&run, 3..6, &[5]);
    run_until(&mut h, "new points", Duration::from_secs(10), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.points() == 5 && r.rfft_evals.len() == 1)
    });
    run_until(&mut h, "the eval grid", Duration::from_secs(10), |s| {
        s.images.texture(&file_key(&run.join("eval/step-000005.png"))).is_some()
    });
    h.step();
    h.get_by_label_contains("availability 50%");
    // RFNet training runs are monitored the same way.
    h.get_by_label_contains("rfnet-demo").click();
    run_until(&mut h, "the RFNet run", Duration::from_secs(10), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.points() == 2 && r.rfnet_epochs.len() == 1)
    });
    h.step();
    h.get_by_label_contains("val macro-F1 0.200");
}

#[test]
fn gui_models_reports_missing_models_and_switches_to_tiny() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    settings.models_dir = tmp.path().join("no-models");
    let mut h = harness(settings);
    run_until(&mut h, "the model check", Duration::from_secs(60), |s| {
        s.models.info.is_some() && !s.models.checking()
    });
    // Nothing installed: demo mode on the tiny models, said in the banner.
    assert!(studio(&h).models.demo());
    h.get_by_label(demo_banner());
    h.get_by_label("Models").click();
    h.step();
    h.step();
    h.get_by_label(&format!("install: {}", Role::Base.install_hint()));
    h.get_by_label(&format!("install: {}", Role::Controlnet.install_hint()));
    assert!(h.query_all_by_label("missing").count() >= 7);
    h.get_by_label_contains("smoke test on the selected device: ok");
    // The instructions are rendered Markdown: table cells and headings, not raw pipes.
    assert!(h.query_all_by_label("public checkpoint").count() >= 1, "the table header is a cell");
    assert!(h.query_all_by_label_contains("Fetch commands").count() >= 1);
    assert_eq!(h.query_all_by_label_contains("|---|").count(), 0, "raw Markdown table shown");
    assert_eq!(h.query_all_by_label_contains("| `base` |").count(), 0, "raw Markdown table shown");
    // Switch to the tiny models: every SD role is found.
    h.get_by_label("Use the tiny demo models").click();
    run_until(&mut h, "the re-check", Duration::from_secs(60), |s| {
        !s.models.checking() && s.models.resolved.as_ref().is_some_and(|r| r.configured.first().is_some_and(|c| c.role == Role::Base && matches!(c.status, rfstudio::models::manifest::Status::Found(_))))
    });
    h.step();
    assert!(h.query_all_by_label("found").count() >= 6);
    let s = studio(&h);
    assert!(s.models.ready().is_ok());
}

#[test]
fn gui_generate_cjk_font_is_installed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(tiny_settings(tmp.path()));
    h.step();
    h.step();
    // Simplified and Traditional Chinese product titles, uncommon given-name characters,
    // CJK compatibility units and Korean all have glyphs (no boxes).
    for text in ["不锈钢电热水壶 1.7L 男款蓝色透气跑步鞋", "蘋果手機 專業版 6.7吋", "運動 語", "㎏", "喆 玥 垚 镕", "한국어 상품"] {
        assert!(
            h.ctx.fonts_mut(|f| f.has_glyphs(&egui::FontId::proportional(14.0), text)),
            "no glyphs for {text:?}: the CJK font from ui-assets/ is missing or too small"
        );
    }
    // Readable at the default scale: body text at least 13 px, small text at least 11 px.
    let style = h.ctx.global_style();
    assert!(style.text_styles[&egui::TextStyle::Body].size >= 13.0);
    assert!(style.text_styles[&egui::TextStyle::Small].size >= 11.0);
}

#[test]
fn gui_generate_worker_error_is_shown() {
    use egui_kittest::kittest::NodeT;
    let tmp = tempfile::tempdir().expect("tmp");
    // A product that places fine (Start is enabled) and is gone by the time the worker reads it.
    let bad = tmp.path().join("not-an-image.png");
    std::fs::copy(root().join("sample-data/bag.png"), &bad).expect("copy");
    let mut settings = tiny_settings(tmp.path());
    settings.generate.product = Some(bad.clone());
    let mut h = harness(settings);
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    let start = Instant::now();
    while h.get_by_label("Start").accesskit_node().is_disabled() && start.elapsed() < Duration::from_secs(30) {
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::write(&bad, b"this is not a PNG").expect("clobber");
    h.get_by_label("Start").click();
    run_until(&mut h, "the worker to fail", Duration::from_secs(60), |s| {
        !s.generate.is_running() && s.generate.status != RunStatus::Idle
    });
    let s = studio(&h);
    assert!(matches!(s.generate.status, RunStatus::Failed(_)), "{:?}", s.generate.status);
    let shown = s.generate.errors.first().cloned().expect("an error");
    assert!(shown.contains("not-an-image.png"), "{shown}");
    h.step();
    h.get_by_label(&shown);
}

/// Stop the running RFFT job and check it ended as stopped, with no error; its folder.
fn stop_the_run(h: &mut H) -> std::path::PathBuf {
    h.get_by_label("Stop").click();
    run_until(h, "the run to stop", Duration::from_secs(180), |s| s.finetune.job.is_none());
    let s = studio(h);
    assert!(s.finetune.job_errors.is_empty(), "{:?}", s.finetune.job_errors);
    let outcome = s.finetune.job_outcome.clone().unwrap_or_default();
    assert!(outcome.starts_with("stopped"), "{outcome}");
    s.settings.finetune.selected.clone().expect("the new run is shown")
}

/// A Fine-tune form for a quick tiny run (500 steps: the tests stop it).
fn tiny_rfft_form(f: &mut rfstudio::app::settings::FinetuneForm, name: &str) {
    f.prompts = "a kettle on a marble counter".into();
    f.image_size = 64;
    f.sample_steps = 4;
    f.last_steps = 2;
    f.steps = 500;
    f.eval_every = 1000;
    f.lora_rank = 4;
    f.lr = 1e-3;
    f.name = name.into();
}

#[test]
fn gui_finetune_start_and_stop_a_tiny_rfft_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    tiny_rfft_form(&mut settings.finetune, "gui-rfft");
    let mut h = harness(settings);
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    h.get_by_label("Fine-tune").click();
    h.step();
    // The side panel's scroll bar appears in the frame after the form's first layout, and the
    // sample buttons wrap again: let the layout settle as a user's eyes would.
    h.step();
    // Pick a product as a user would, then start.
    h.get_by_label("kettle").click();
    h.step();
    assert_eq!(studio(&h).settings.finetune.products.len(), 1);
    h.get_by_label("Start").click();
    run_until(&mut h, "the run's first points", Duration::from_secs(120), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.points() >= 1)
    });
    let first = studio(&h).finetune.run.as_ref().map(|r| r.points()).unwrap_or(0);
    run_until(&mut h, "the curve to gain points", Duration::from_secs(180), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.points() > first)
    });
    let dir = stop_the_run(&mut h);
    let s = studio(&h);
    let state = std::fs::read_to_string(dir.join("state.json")).expect("state.json");
    assert!(state.contains("stopped"), "{state}");
    let steps = s.finetune.run.as_ref().map(|r| r.points()).unwrap_or(0);
    assert!((2..500).contains(&steps), "{steps} steps");
}

/// The form's Devices field: a list of mixed backends is refused at Start with the reason; two
/// CPU peers train, show their curve and stop like a one-device run.
#[test]
fn gui_finetune_devices_field_runs_data_parallel() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    let f = &mut settings.finetune;
    tiny_rfft_form(f, "gui-dp");
    f.products = vec![root().join("sample-data/kettle.png")];
    f.grad_accum = 2;
    f.devices = "cuda:0,cpu:1".into();
    let mut h = harness(settings);
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    h.get_by_label("Fine-tune").click();
    h.step();
    h.get_by_label("Start").click();
    h.step();
    {
        let s = studio(&h);
        assert!(s.finetune.job.is_none(), "nothing starts");
        assert!(s.finetune.job_errors.iter().any(|e| e.contains("one backend")), "{:?}", s.finetune.job_errors);
    }
    h.state_mut().as_mut().expect("studio").settings.finetune.devices = "cpu:0,cpu:1".into();
    h.get_by_label("Start").click();
    run_until(&mut h, "the run's first points", Duration::from_secs(120), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.points() >= 1) || !s.finetune.job_errors.is_empty()
    });
    assert!(studio(&h).finetune.job_errors.is_empty(), "{:?}", studio(&h).finetune.job_errors);
    run_until(&mut h, "the run's devices in its header", Duration::from_secs(30), |s| {
        s.finetune.run.as_ref().and_then(|r| r.state.as_ref()).is_some_and(|st| st.devices.is_some())
    });
    h.step();
    h.get_by_label("data parallel on cpu:0,cpu:1");
    let dir = stop_the_run(&mut h);
    let config = std::fs::read_to_string(dir.join("run.toml")).expect("run.toml");
    assert!(config.contains("grad_accum = 2"), "{config}");
}

/// A generation worker that panics ends the run with its error in the tab, and Start comes back.
#[test]
fn gui_generate_worker_panic_shows_the_error_and_gives_start_back() {
    use egui_kittest::kittest::NodeT;
    use rfstudio::pipeline::generate::JobHandle;
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    settings.generate.product = Some(root().join("sample-data/shoe.png"));
    let mut h = harness(settings);
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    // The worker panics only when told to, so the test sees it running first.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let job = JobHandle::spawn(|| {}, move |emit, _cancel| {
        emit(rfstudio::pipeline::generate::GenEvent::Started {
            out_dir: std::path::PathBuf::from("nowhere"),
            attempts: 1,
            steps: 2,
            seed: 1,
            test_weights: true,
        });
        let _ = wait.recv();
        panic!("simulated fault in the worker")
    });
    h.state_mut().as_mut().expect("studio").generate.watch(job, None);
    h.step();
    assert!(h.get_by_label("Start").accesskit_node().is_disabled(), "Start is disabled while a job runs");
    go.send(()).expect("worker waiting");
    run_until(&mut h, "the failed run to end", Duration::from_secs(30), |s| !s.generate.is_running());
    let s = studio(&h);
    assert!(matches!(s.generate.status, RunStatus::Failed(_)), "{:?}", s.generate.status);
    assert!(s.generate.errors.iter().any(|e| e.contains("simulated fault in the worker")), "{:?}", s.generate.errors);
    h.step();
    h.get_by_label_contains("simulated fault in the worker");
    assert!(!h.get_by_label("Start").accesskit_node().is_disabled(), "Start is enabled again");
}

/// A dataset of `n` small samples and the studio opened on it as `annotator` (Annotate tab).
fn open_annotate(tmp: &Path, n: u8, annotator: &str) -> (H, std::path::PathBuf) {
    let ds = tmp.join("ds");
    let store = Store::init(&ds).expect("init");
    let imgs = tmp.join("imgs");
    std::fs::create_dir_all(&imgs).expect("mkdir");
    for i in 0..n {
        let p = imgs.join(format!("{i}.png"));
        png(&p, i * 20);
        let s = NewSample {
            product_id: format!("prod{i}"),
            image: p,
            title: format!("sample {i}"),
            ..NewSample::default()
        };
        store.add_sample(&s, Source::Imported).expect("add");
    }
    drop(store);
    (open_dataset_as(tmp, &ds, annotator), ds)
}

/// The studio opened on dataset `ds` in the Annotate tab as `annotator`, once the first sample is
/// there.
pub(crate) fn open_dataset_as(tmp: &Path, ds: &Path, annotator: &str) -> H {
    let mut settings = tiny_settings(tmp);
    settings.annotate.dataset = ds.to_path_buf();
    settings.annotate.annotator = annotator.into();
    let mut h = harness(settings);
    h.step();
    h.get_by_label("Annotate").click();
    h.step();
    h.get_by_label("Open dataset").click();
    run_until(&mut h, "the first sample", Duration::from_secs(120), |s| {
        s.annotate.snapshot.as_ref().is_some_and(|snap| snap.current.is_some())
    });
    h
}

/// Send one action and wait until the worker has answered it.
fn annotate_act(h: &mut H, a: rfstudio::app::annotate::AnnotateAction) {
    h.state_mut().as_mut().expect("studio").annotate.act(a);
    run_until(h, "the worker's answer", Duration::from_secs(10), |s| s.annotate.pending == 0);
}

fn labelled(h: &H) -> usize {
    studio(h).annotate.snapshot.as_ref().map_or(0, |s| s.counters.labelled)
}

/// Relabelling a sample (back + key, or the recent list's menu) changes its label: the session
/// count does not grow and the recent list shows the sample once, with the new label.
#[test]
fn gui_annotate_relabel_keeps_counters_and_recent_list_honest() {
    use rfstudio::app::annotate::AnnotateAction as A;
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut h, _) = open_annotate(tmp.path(), 6, "relabeller");
    for _ in 0..3 {
        annotate_act(&mut h, A::Label(Decision::Class(0)));
    }
    assert_eq!(labelled(&h), 3);
    annotate_act(&mut h, A::Back);
    annotate_act(&mut h, A::Back);
    let again = studio(&h).annotate.snapshot.as_ref().and_then(|s| s.current.as_ref().map(|c| c.id)).expect("current");
    annotate_act(&mut h, A::Label(Decision::Class(2)));
    assert_eq!(labelled(&h), 3, "a relabel is not a new label");
    let first = studio(&h).annotate.snapshot.as_ref().and_then(|s| s.recent.last().map(|r| r.id)).expect("oldest");
    annotate_act(&mut h, A::Relabel(first, Decision::Unsuitable));
    let snap = studio(&h).annotate.snapshot.clone().expect("snapshot");
    assert_eq!(snap.counters.labelled, 3);
    let ids: Vec<i64> = snap.recent.iter().map(|r| r.id).collect();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(ids.len(), unique.len(), "a sample listed twice: {ids:?}");
    assert_eq!(snap.recent.iter().find(|r| r.id == again).map(|r| r.decision), Some(Decision::Class(2)));
    assert_eq!(snap.recent.iter().find(|r| r.id == first).map(|r| r.decision), Some(Decision::Unsuitable));
    // Undoing the relabel brings the previous decision back, still once.
    annotate_act(&mut h, A::Undo);
    let snap = studio(&h).annotate.snapshot.clone().expect("snapshot");
    assert_eq!(snap.counters.labelled, 3);
    assert_eq!(snap.recent.iter().find(|r| r.id == first).map(|r| r.decision), Some(Decision::Class(0)));
}

/// Changing the annotator name with the dataset open saves the next labels under the new name.
#[test]
fn gui_annotate_annotator_change_applies_to_the_next_labels() {
    use rfstudio::app::annotate::AnnotateAction as A;
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut h, ds) = open_annotate(tmp.path(), 4, "alice");
    annotate_act(&mut h, A::Label(Decision::Class(1)));
    h.state_mut().as_mut().expect("studio").settings.annotate.annotator = "bob".into();
    run_until(&mut h, "the new name to be applied", Duration::from_secs(10), |s| {
        s.annotate.pending == 0 && s.annotate.snapshot.as_ref().is_some_and(|x| x.annotator == "bob")
    });
    h.get_by_label_contains("bob:");
    annotate_act(&mut h, A::Label(Decision::Class(3)));
    let store = Store::open(&ds).expect("open");
    let mut who: Vec<String> = store.all_labels().expect("labels").into_iter().map(|l| l.annotator).collect();
    who.sort();
    assert_eq!(who, ["alice", "bob"]);
}

/// Changing the queue order keeps the session (counters, recent decisions); skipped samples
/// that are still unlabelled can be revisited when the queue runs out.
#[test]
fn gui_annotate_order_change_keeps_session_and_skipped_are_revisited() {
    use rfstudio::app::annotate::AnnotateAction as A;
    use rfstudio::data::session::QueueOrder;
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut h, _) = open_annotate(tmp.path(), 4, "orderly");
    annotate_act(&mut h, A::Label(Decision::Class(0)));
    annotate_act(&mut h, A::Label(Decision::Class(0)));
    annotate_act(&mut h, A::SetOrder(QueueOrder::Random));
    let snap = studio(&h).annotate.snapshot.clone().expect("snapshot");
    assert_eq!(snap.counters.labelled, 2, "the order change wiped the session");
    assert_eq!(snap.recent.len(), 2);
    annotate_act(&mut h, A::Skip);
    annotate_act(&mut h, A::Skip);
    let snap = studio(&h).annotate.snapshot.clone().expect("snapshot");
    assert!(snap.current.is_none());
    assert_eq!(snap.counters.skipped, 2);
    h.step();
    h.get_by_label("Revisit the 2 skipped").click();
    run_until(&mut h, "a skipped sample on screen", Duration::from_secs(10), |s| {
        s.annotate.pending == 0 && s.annotate.snapshot.as_ref().is_some_and(|x| x.current.is_some())
    });
    annotate_act(&mut h, A::Label(Decision::Class(4)));
    annotate_act(&mut h, A::Label(Decision::Class(4)));
    let snap = studio(&h).annotate.snapshot.clone().expect("snapshot");
    assert_eq!((snap.counters.labelled, snap.counters.skipped), (4, 0));
    assert!(snap.current.is_none());
}

/// A new product (dropped on the window) does not keep the previous sample's title as its
/// RFNet caption.
#[test]
fn gui_generate_new_product_clears_the_previous_title() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(tiny_settings(tmp.path()));
    h.step();
    h.get_by_label("bag").click();
    h.step();
    h.step();
    let title = studio(&h).settings.generate.params.title.clone();
    assert!(!title.is_empty(), "the sample sets its title");
    let own = tmp.path().join("my_product.png");
    std::fs::copy(root().join("sample-data/shoe.png"), &own).expect("copy");
    h.input_mut().dropped_files.push(egui::DroppedFile {
        path: Some(own.clone()),
        ..Default::default()
    });
    h.step();
    h.step();
    let form = &studio(&h).settings.generate;
    assert_eq!(form.product.as_deref(), Some(own.as_path()));
    assert_eq!(form.params.title, "", "the bag's title stayed on another product");
}

/// The Fine-tune form: LoRA rank 0 (full fine-tune) can be entered, and a learning rate of
/// 1e-7 is shown as such, not as 0.000000.
#[test]
fn gui_finetune_form_allows_rank_zero_and_shows_small_learning_rates() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    settings.finetune.lr = 1e-7;
    settings.finetune.lora_rank = 0;
    let mut h = harness(settings);
    h.step();
    h.get_by_label("Fine-tune").click();
    h.step();
    h.step();
    h.get_by_value("1e-7");
    assert!(h.query_by_value("0.000000").is_none());
    assert_eq!(studio(&h).settings.finetune.lora_rank, 0, "the rank field clamped 0 away");
    let config = rfstudio::app::finetune::config_from_form(&{
        let mut f = studio(&h).settings.finetune.clone();
        f.products = vec![root().join("sample-data/bag.png")];
        f.prompts = "a bag on a table".into();
        f
    })
    .expect("config");
    assert_eq!(config.lora_rank, 0);
}

/// An opaque JPG as product: the reason is shown once (a readable line, not text painted over the
/// previews), it names the studio's control instead of a command-line flag, Start stays
/// disabled, and ticking "white background" clears it.
#[test]
fn gui_generate_unplaceable_product_is_explained_once_and_blocks_start() {
    use egui_kittest::kittest::NodeT;
    let tmp = tempfile::tempdir().expect("tmp");
    let jpg = tmp.path().join("opaque.jpg");
    RgbImage::from_fn(96, 96, |x, y| if (20..76).contains(&x) && (20..76).contains(&y) { Rgb([200, 30, 30]) } else { Rgb([255, 255, 255]) })
        .save(&jpg)
        .expect("jpg");
    let mut settings = tiny_settings(tmp.path());
    settings.generate.product = Some(jpg.clone());
    let mut h = harness(settings);
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    let no_alpha = |h: &H| h.query_all_by_label_contains("no alpha channel").count();
    let start = Instant::now();
    while no_alpha(&h) == 0 && start.elapsed() < Duration::from_secs(30) {
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(no_alpha(&h), 1, "the product's error is shown exactly once");
    assert_eq!(h.query_all_by_label_contains("--white-bg").count(), 0, "the studio has no --white-bg flag");
    h.get_by_label_contains("tick “white background”");
    assert!(h.get_by_label("Start").accesskit_node().is_disabled(), "Start with a product that cannot be placed");
    h.get_by_label("white background").click();
    let start = Instant::now();
    while (no_alpha(&h) > 0 || h.get_by_label("Start").accesskit_node().is_disabled()) && start.elapsed() < Duration::from_secs(30) {
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(no_alpha(&h), 0);
    assert!(!h.get_by_label("Start").accesskit_node().is_disabled(), "Start once the product can be placed");
}

/// Status-bar errors: the same message once, each dismissable.
#[test]
fn gui_studio_errors_are_shown_once_and_dismissable() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(tiny_settings(tmp.path()));
    h.step();
    for _ in 0..3 {
        let s = h.state_mut().as_mut().expect("studio");
        rfstudio::app::common::push_error(&mut s.errors, "could not run xdg-open /tmp/out: not found");
    }
    // (an error floats over the window: its first frame only measures it)
    h.step();
    h.step();
    assert_eq!(h.query_all_by_label_contains("could not run xdg-open").count(), 1);
    h.get_by_label("✕").click();
    h.step();
    h.step();
    assert_eq!(h.query_all_by_label_contains("could not run xdg-open").count(), 0);
    assert!(studio(&h).errors.is_empty());
}

/// Errors appearing do not move the controls: Start and the history stay where they were, and
/// Start stays on screen (and works from the keyboard) in the smallest window.
#[test]
fn gui_generate_errors_do_not_shift_the_layout_and_start_is_always_reachable() {
    use egui_kittest::kittest::NodeT;
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    settings.generate.product = Some(root().join("sample-data/kettle.png"));
    let mut h = harness(settings.clone());
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    h.step();
    let where_ = |h: &H, label: &str| h.get_by_label(label).accesskit_node().bounding_box().expect("placed");
    let (start, history) = (where_(&h, "Start"), where_(&h, "History"));
    {
        let s = h.state_mut().as_mut().expect("studio");
        rfstudio::app::common::push_error(&mut s.generate.errors, "generation failed: something went wrong");
        rfstudio::app::common::push_error(&mut s.errors, "could not run xdg-open /tmp/out: not found");
    }
    h.step();
    h.step();
    h.get_by_label_contains("something went wrong");
    assert_eq!(where_(&h, "Start"), start, "Start moved when an error appeared");
    assert_eq!(where_(&h, "History"), history, "the results moved when an error appeared");

    // the minimum window size (900x600): Start is still inside it, and Ctrl+Enter starts the run
    let mut small = Harness::builder().with_size(egui::Vec2::new(900.0, 600.0)).build_ui_state(
        move |ui, state: &mut Option<Studio>| {
            let studio = state.get_or_insert_with(|| Studio::new(ui.ctx(), settings.clone()));
            studio.ui(ui);
        },
        None,
    );
    run_until(&mut small, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    run_until(&mut small, "the product preview", Duration::from_secs(30), |s| {
        GenerateState::placement_name(&s.settings.generate).is_some_and(|k| s.images.texture(&format!("{k}/product")).is_some())
    });
    small.step();
    let b = where_(&small, "Start");
    assert!(b.y1 <= 600.0 && b.y0 >= 0.0, "Start is off screen at the minimum window size (900x600): {b:?}");
    small.key_press_modifiers(egui::Modifiers::COMMAND, Key::Enter);
    small.step();
    assert!(studio(&small).generate.is_running(), "Ctrl+Enter starts");
    small.key_press(Key::Escape);
    small.step();
    assert_eq!(studio(&small).generate.status, RunStatus::Cancelled, "Escape cancels");
}

/// A Fine-tune form error goes away once the form is fixed.
#[test]
fn gui_finetune_form_error_clears_when_the_form_changes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    settings.finetune.products.clear();
    let mut h = harness(settings);
    h.step();
    h.get_by_label("Fine-tune").click();
    h.step();
    h.get_by_label("Start").click();
    h.step();
    h.step();
    h.get_by_label_contains("add at least one product");
    h.state_mut().as_mut().expect("studio").settings.finetune.products.push(root().join("sample-data/bag.png"));
    h.step();
    h.step();
    assert_eq!(h.query_all_by_label_contains("add at least one product").count(), 0);
}

/// The Generate tab's LoRA list: a LoRA with its strength is merged into the run and recorded
/// in run.json and in the PNG's A1111 parameters.
#[test]
fn gui_generate_lora_list_applies_and_records_the_lora() {
    let tmp = tempfile::tempdir().expect("tmp");
    let lora = tmp.path().join("ink_style.safetensors");
    crate::checkpoints::write_tiny_kohya_lora(&lora);
    let mut settings = tiny_settings(tmp.path());
    settings.generate.loras = vec![rfstudio::models::lora_file::LoraSpec { path: lora.clone(), strength: 0.6 }];
    let mut h = harness(settings);
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    h.get_by_label("bag").click();
    h.step();
    assert!(h.query_all_by_value(&lora.display().to_string()).count() >= 1, "the LoRA is listed");
    h.get_by_label("Add LoRA…");
    run_until(&mut h, "Start to be enabled", Duration::from_secs(30), |s| {
        GenerateState::placement_name(&s.settings.generate)
            .is_some_and(|k| s.images.texture(&format!("{k}/product")).is_some())
    });
    h.get_by_label("Start").click();
    run_until(&mut h, "the generation to finish", Duration::from_secs(180), |s| {
        !s.generate.is_running() && s.generate.status != RunStatus::Idle
    });
    let s = studio(&h);
    assert_eq!(s.generate.status, RunStatus::Finished, "errors: {:?}", s.generate.errors);
    let out = s.generate.out_dir.clone().expect("out dir");
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).expect("run.json")).expect("json");
    assert_eq!(run["models"]["loras"][0]["name"], "ink_style");
    assert_eq!(run["models"]["loras"][0]["strength"], 0.6);
    let text = rfstudio::pipeline::output::read_png_text(&out.join("attempt_001.png")).expect("png text");
    let params = text.iter().find(|(k, _)| k == "parameters").map(|(_, v)| v.clone()).expect("parameters");
    assert!(params.contains("<lora:ink_style:0.6>") && params.contains("Lora hashes"), "{params}");
}

/// Cancel while the worker is still loading models (before any step): the run ends at once in
/// the UI and Start comes back; a new run can start right away.
#[test]
fn gui_generate_cancel_during_model_loading_ends_the_run_at_once() {
    use egui_kittest::kittest::NodeT;
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    settings.generate.product = Some(root().join("sample-data/shoe.png"));
    let mut h = harness(settings);
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    let start = Instant::now();
    while h.get_by_label("Start").accesskit_node().is_disabled() && start.elapsed() < Duration::from_secs(30) {
        h.step();
    }
    h.get_by_label("Start").click();
    h.step();
    assert!(studio(&h).generate.is_running());
    h.get_by_label("Cancel").click();
    h.step();
    let s = studio(&h);
    assert!(!s.generate.is_running());
    assert_eq!(s.generate.status, RunStatus::Cancelled);
    h.step();
    assert!(!h.get_by_label("Start").accesskit_node().is_disabled(), "Start is back");
    h.get_by_label("Run: cancelled");
}

/// "Open…" without a file-dialog service says so (once) instead of doing nothing visible.
#[test]
fn gui_generate_open_without_a_dialog_says_so() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(tiny_settings(tmp.path()));
    h.step();
    for _ in 0..2 {
        h.get_by_label("Open…").click();
        run_until(&mut h, "the dialog's answer", Duration::from_secs(10), |s| !s.errors.is_empty());
        h.step();
    }
    assert_eq!(h.query_all_by_label_contains("type the path").count(), 1, "{:?}", studio(&h).errors);
}

/// Annotate: RFNet's prediction can be hidden while labelling, and D toggles the depth overlay.
#[test]
fn gui_annotate_hide_prediction_and_overlay_keys() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ds = tmp.path().join("ds");
    let store = Store::init(&ds).expect("init");
    let img = tmp.path().join("a.png");
    png(&img, 90);
    let depth = tmp.path().join("a_depth.png");
    png(&depth, 10);
    store
        .add_sample(
            &NewSample {
                product_id: "p".into(),
                image: img,
                depth: Some(depth),
                title: "title".into(),
                probs: Some([0.7, 0.1, 0.1, 0.05, 0.05]),
                ..NewSample::default()
            },
            Source::Imported,
        )
        .expect("add");
    drop(store);
    let mut settings = tiny_settings(tmp.path());
    settings.annotate.dataset = ds;
    settings.annotate.annotator = "blind".into();
    let mut h = harness(settings);
    h.step();
    h.get_by_label("Annotate").click();
    h.step();
    h.get_by_label("Open dataset").click();
    run_until(&mut h, "the sample", Duration::from_secs(60), |s| s.annotate.snapshot.as_ref().is_some_and(|x| x.current.is_some()));
    h.step();
    assert_eq!(h.query_all_by_label_contains("Available 0.70").count(), 1, "the prediction is shown by default");
    h.get_by_label("hide RFNet's prediction").click();
    h.step();
    h.step();
    assert_eq!(h.query_all_by_label_contains("Available 0.70").count(), 0, "the prediction is hidden");
    assert!(!studio(&h).annotate.show_depth);
    h.key_press(Key::D);
    h.step();
    assert!(studio(&h).annotate.show_depth, "D toggles the depth overlay");
}

/// The studio on `settings` with its product's preview shown and Start pressed.
fn started(settings: Settings) -> H {
    let mut h = harness(settings);
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    run_until(&mut h, "the product preview", Duration::from_secs(30), |s| {
        GenerateState::placement_name(&s.settings.generate).is_some_and(|k| s.images.texture(&format!("{k}/product")).is_some())
    });
    h.get_by_label("Start").click();
    h
}

/// Long work is honest: the phase, seconds per step and the time left over the whole run.
#[test]
fn gui_generate_progress_shows_phase_speed_and_time_left() {
    use rfstudio::app::generate::{Phase, Progress};
    let fresh = Progress::default();
    assert_eq!(fresh.phase(), Phase::Loading);
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    settings.generate.params.steps = 40;
    settings.generate.params.attempts = 2;
    settings.generate.product = Some(root().join("sample-data/shoe.png"));
    let mut h = started(settings);
    run_until(&mut h, "a few steps", Duration::from_secs(120), |s| {
        s.generate.progress.as_ref().is_some_and(|p| p.steps_seen >= 3 && p.step < p.total_steps)
    });
    h.step();
    let p = studio(&h).generate.progress.clone().expect("progress");
    assert_eq!(p.phase(), Phase::Denoising);
    assert_eq!(p.run_steps(), 80, "two attempts of 40 steps");
    assert!(p.seconds_per_step().is_some_and(|s| s > 0.0));
    assert!(h.query_all_by_label_contains("s/step").count() >= 1);
    assert!(h.query_all_by_label_contains("s left").count() >= 1);
    h.get_by_label("Cancel").click();
    h.step();
}

/// History reopens a past run: its cards with scores, a zoom view with an overlay at an
/// adjustable opacity, two candidates compared side by side, a seed reused, favourites kept
/// in the run folder, and a candidate exported with its parameters.
#[test]
fn gui_generate_history_reopens_a_run_to_zoom_compare_star_and_export() {
    use egui_kittest::kittest::NodeT;
    use rfstudio::app::common::PickTarget;
    use rfstudio::app::generate::{GenerateCommand, OverlayChoice};
    use rfstudio::pipeline::run_folder::RunFolder;
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    settings.generate.params.attempts = 2;
    settings.generate.params.threshold = 1.0;
    settings.generate.product = Some(root().join("sample-data/lamp.png"));
    // 1. a finished run with two candidates
    let mut h = started(settings.clone());
    run_until(&mut h, "the generation to finish", Duration::from_secs(180), |s| {
        !s.generate.is_running() && s.generate.status != RunStatus::Idle
    });
    let run = studio(&h).generate.out_dir.clone().expect("out dir");
    let seeds: Vec<u64> = studio(&h).generate.attempts.iter().map(|r| r.seed).collect();
    assert_eq!(seeds.len(), 2);
    drop(h);

    // 2. a fresh studio (as after a restart): nothing shown until the run is opened
    let mut h = harness(settings);
    run_until(&mut h, "history", Duration::from_secs(10), |s| s.generate.history.len() == 1);
    h.step();
    assert!(studio(&h).generate.attempts.is_empty());
    h.get_by_label("Open").click();
    run_until(&mut h, "the run's cards", Duration::from_secs(10), |s| s.generate.attempts.len() == 2);
    h.step();
    h.get_by_label_contains("(opened from History)");
    h.get_by_label("attempt 1");
    h.get_by_label("attempt 2");
    let s = studio(&h);
    assert_eq!(s.generate.out_dir.as_deref(), Some(run.as_path()));
    assert_eq!(s.generate.status, RunStatus::Finished);

    // star attempt 2: saved in the folder, counted in History
    let stars: Vec<_> = h.query_all_by_label("☆").collect();
    assert_eq!(stars.len(), 2);
    stars[1].click();
    h.step();
    h.step();
    let favs = RunFolder::new(&run).read_favourites().expect("favourites");
    assert_eq!(favs.into_iter().collect::<Vec<_>>(), vec![2]);
    h.get_by_label("★");
    assert_eq!(studio(&h).generate.history[0].favourites, 1);
    h.get_by_label("★ only").click();
    h.step();
    h.get_by_label_contains("★ 1");

    // compare the two side by side, with the depth overlay at half opacity when scored
    assert!(h.get_by_label("Compare side by side").accesskit_node().is_disabled());
    for c in h.query_all_by_label("compare").collect::<Vec<_>>() {
        c.click();
    }
    h.step();
    h.get_by_label("Compare side by side").click();
    h.step();
    h.step();
    h.get_by_label("Attempt 1 and attempt 2");
    let zoom = studio(&h).generate.zoom.clone().expect("zoom view");
    assert_eq!(zoom.attempts, vec![1, 2]);
    let scored = studio(&h).generate.attempts[0].probs.is_some();
    if scored {
        // the cards have "depth" checkboxes too; the zoom window is drawn last
        h.query_all_by_label("depth").last().expect("depth").click();
        h.step();
        assert_eq!(studio(&h).generate.zoom.as_ref().map(|z| z.overlay), Some(OverlayChoice::Depth));
        run_until(&mut h, "the depth overlays", Duration::from_secs(30), |s| {
            ["attempt_001.png", "attempt_002.png"]
                .iter()
                .all(|f| s.images.texture(&format!("overlay:depth:{}", run.join(f).display())).is_some())
        });
    }
    // reuse attempt 2's seed: the form takes it, random seed off
    let reuse: Vec<_> = h.query_all_by_label("Reuse seed").collect();
    assert!(reuse.len() >= 2);
    reuse[1].click();
    h.step();
    let form = &studio(&h).settings.generate;
    assert_eq!((form.seed, form.random_seed), (seeds[1], false));

    // export: the save dialog is asked for this run's candidate; the copy keeps its parameters
    let target = studio(&h).generate.export_target(2).expect("export target");
    let PickTarget::Export { run: r, file } = target else { panic!("not an export: {target:?}") };
    assert_eq!((r.as_path(), file.as_str()), (run.as_path(), "attempt_002.png"));
    let dest = tmp.path().join("chosen.png");
    RunFolder::new(&r).export_image(&file, &dest).expect("export");
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(run.join("attempt_002.png")).unwrap());
    let text = String::from_utf8_lossy(&std::fs::read(&dest).unwrap()).into_owned();
    assert!(text.contains("parameters"), "the exported PNG keeps its generation parameters");

    // Escape closes the zoom view
    h.key_press(Key::Escape);
    h.step();
    assert!(studio(&h).generate.zoom.is_none());
    h.step();
    assert!(h.query_by_label("Attempt 1 and attempt 2").is_none());
    // a command on a missing attempt is harmless
    let s = h.state_mut().as_mut().expect("studio");
    rfstudio::app::generate::apply(&mut s.generate, &mut s.settings.generate, GenerateCommand::OpenRun(99)).expect("no such entry");
}

/// Attempt cards fill rows of what fits: with four attempts in the default window none is drawn
/// past its right edge.
#[test]
fn gui_generate_attempt_cards_wrap_within_the_window() {
    use egui_kittest::kittest::NodeT;
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    settings.generate.params.attempts = 4;
    settings.generate.params.threshold = 1.0;
    settings.generate.product = Some(root().join("sample-data/jar.png"));
    let mut h = started(settings);
    run_until(&mut h, "the generation to finish", Duration::from_secs(240), |s| {
        !s.generate.is_running() && s.generate.status != RunStatus::Idle
    });
    assert_eq!(studio(&h).generate.attempts.len(), 4);
    h.step();
    h.step();
    for n in 1..=4 {
        let b = h.get_by_label(&format!("attempt {n}")).accesskit_node().bounding_box().expect("placed");
        assert!(b.x1 <= 1400.0, "attempt {n}'s card runs past the window: {b:?}");
    }
}

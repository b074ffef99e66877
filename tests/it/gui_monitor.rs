//! The Fine-tune tab's monitor driven headless: runs overlaid in their own series, smoothing,
//! log scale, the wall-clock axis, memory, labelled eval grids and continuing a stopped run.

use std::path::Path;
use std::time::Duration;

use egui_kittest::kittest::Queryable;
use image::{Rgb, RgbImage};
use rfstudio::app::images::file_key;
use rfstudio::app::monitor::{XAxis, ema};
use rfstudio::device::{DeviceRequest, Precision};
use rfstudio::train::rfft::{self, RfftConfig, RfftEvent, RunStatus};
use rfstudio::train::run_folder::read_run;

use crate::common::root;
use crate::gui::{H, harness, run_until, studio, tiny_settings};

/// An RFFT run folder written as this version writes them (steps with `time` and memory) or as
/// older versions did (`timed = false`), with `f_ac` values from `f_ac` and one eval of two
/// products x two seeds at the last step (one of the four samples not available).
pub(crate) fn write_run(dir: &Path, f_ac: &[f64], timed: bool) {
    std::fs::create_dir_all(dir.join("eval")).expect("mkdir");
    std::fs::write(
        dir.join("run.toml"),
        "products = [\"sample-data/kettle.png\"]\nprompts = [\"a kettle\"]\nreg = \"cc\"\nsteps = 20\nlora_rank = 4\n",
    )
    .expect("run.toml");
    let mut lines = String::new();
    for (i, v) in f_ac.iter().enumerate() {
        let step = i + 1;
        let extra = if timed {
            format!(",\"time\":{},\"resident_bytes\":{}", 1_700_000_000.0 + 2.0 * step as f64, (100 + step) << 20)
        } else {
            String::new()
        };
        lines += &format!(
            "{{\"kind\":\"step\",\"step\":{step},\"f_ac\":{v},\"reg\":0.1,\"total\":{},\"grad_norm\":0.5,\"step_time_s\":2.0,\"memory_bytes\":null,\"lr\":1e-5{extra}}}\n",
            v + 0.1
        );
    }
    let last = f_ac.len();
    let grid = format!("eval/step-{last:06}.png");
    RgbImage::from_fn(64, 64, |x, y| Rgb([(x * 4) as u8, (y * 4) as u8, 90])).save(dir.join(&grid)).expect("grid");
    let sample = |p: &str, seed: u64, available: bool| {
        format!("{{\"product\":\"{p}\",\"seed\":{seed},\"probs\":[0.6,0.1,0.1,0.1,0.1],\"available\":{available}}}")
    };
    lines += &format!(
        "{{\"kind\":\"eval\",\"step\":{last},\"availability_rate\":0.75,\"mean_f_ac\":0.5,\"grid\":\"{grid}\",\"samples\":[{},{},{},{}]}}\n",
        sample("shoe", 1, true),
        sample("shoe", 2, true),
        sample("lamp", 1, true),
        sample("lamp", 2, false)
    );
    std::fs::write(dir.join("metrics.jsonl"), lines).expect("metrics");
    std::fs::write(dir.join("state.json"), format!("{{\"step\":{last},\"status\":\"finished\"}}")).expect("state");
}

pub(crate) fn series<'a>(h: &'a H, plot: &str) -> Vec<(&'a str, usize)> {
    studio(h)
        .finetune
        .plotted
        .iter()
        .filter(|s| s.plot == plot)
        .map(|s| (s.name.as_str(), s.points))
        .collect()
}

#[test]
fn gui_finetune_ema_smoothing_matches_a_hand_computed_value() {
    // weight 0.6 over [1, 2]: last = 0.4, then 0.24 + 0.8 = 1.04; debiased by 1 - 0.36 = 0.64.
    let s = ema(&[1.0, 2.0], 0.6);
    assert!((s[0] - 1.0).abs() < 1e-12 && (s[1] - 1.625).abs() < 1e-12, "{s:?}");
}

#[test]
fn gui_finetune_overlays_runs_with_log_scale_wall_time_memory_and_labelled_grid() {
    let tmp = tempfile::tempdir().expect("tmp");
    let runs = tmp.path().join("runs");
    let a = runs.join("run-a");
    let b = runs.join("run-b");
    let old = runs.join("run-old");
    write_run(&a, &[0.9, 0.7, 0.5, 0.4, 0.3], true);
    // run-b has a 0 and a negative F_AC, which a log axis cannot show.
    write_run(&b, &[0.8, 0.0, -0.1], true);
    write_run(&old, &[1.0, 0.9], false);
    let mut h = harness(tiny_settings(tmp.path()));
    h.step();
    h.get_by_label("Fine-tune").click();
    run_until(&mut h, "the run list", Duration::from_secs(10), |s| s.finetune.runs.len() == 3);
    h.get_by_label_contains("run-a").click();
    run_until(&mut h, "run-a", Duration::from_secs(10), |s| s.finetune.run.as_ref().is_some_and(|r| r.points() == 5));
    h.step();
    assert_eq!(series(&h, "F_AC"), vec![("run-a", 5)]);
    // Overlay run-b: the watcher reads it and the plots get a second series, named after it.
    h.state_mut().as_mut().expect("studio").finetune.set_compared(&b, true);
    run_until(&mut h, "run-b read for comparison", Duration::from_secs(10), |s| s.finetune.compared.len() == 1);
    h.step();
    assert_eq!(series(&h, "F_AC"), vec![("run-a", 5), ("run-b", 3)]);
    assert_eq!(series(&h, "Availability rate on the eval products").len(), 2);
    // Memory: each run's resident memory, sampled with every step.
    assert_eq!(series(&h, "Memory (MiB)"), vec![("run-a · resident", 5), ("run-b · resident", 3)]);
    // Log scale: run-b's 0 and -0.1 are dropped, and the plot says so.
    h.get_by_label("Log scale").click();
    h.step();
    assert!(studio(&h).finetune.view.log_y);
    assert_eq!(series(&h, "F_AC"), vec![("run-a", 5), ("run-b", 1)]);
    h.get_by_label("log scale: 2 value(s) <= 0 not shown");
    // Wall time: both runs have step times.
    h.get_by_label("Wall time").click();
    h.step();
    assert_eq!(studio(&h).finetune.view.x_axis, XAxis::WallTime);
    assert_eq!(series(&h, "F_AC").len(), 2);
    // The eval grid, cut into cells labelled with product and seed.
    run_until(&mut h, "the eval grid", Duration::from_secs(10), |s| {
        s.images.texture(&file_key(&a.join("eval/step-000005.png"))).is_some()
    });
    h.step();
    for label in ["shoe · seed 1", "shoe · seed 2", "lamp · seed 1", "lamp · seed 2"] {
        h.get_by_label(label);
    }
    // Unticking run-b removes its series.
    h.state_mut().as_mut().expect("studio").finetune.set_compared(&b, false);
    h.step();
    assert_eq!(series(&h, "F_AC"), vec![("run-a", 5)]);
    // A run written before step times were recorded still reads; the wall-clock axis is off
    // for it and the plots fall back to steps.
    h.get_by_label_contains("run-old").click();
    run_until(&mut h, "run-old", Duration::from_secs(10), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.entry.name == "run-old" && r.points() == 2)
    });
    h.step();
    assert_eq!(studio(&h).finetune.view.x_axis, XAxis::Step);
    assert_eq!(series(&h, "F_AC"), vec![("run-old", 2)]);
    assert!(series(&h, "Memory (MiB)").is_empty());
    h.get_by_label("no memory samples in this run's metrics");
}

#[test]
fn gui_finetune_resume_button_continues_a_stopped_tiny_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (run, step) = stopped_tiny_run(tmp.path(), 4);
    assert!(step < 4, "{step}");

    let mut h = harness(tiny_settings(tmp.path()));
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    h.get_by_label("Fine-tune").click();
    run_until(&mut h, "the run list", Duration::from_secs(10), |s| s.finetune.runs.len() == 1);
    h.get_by_label_contains("stopped-run").click();
    run_until(&mut h, "the stopped run", Duration::from_secs(10), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.resumable())
    });
    h.step();
    h.get_by_label("Resume run").click();
    run_until(&mut h, "the resumed run to start", Duration::from_secs(10), |s| s.finetune.job.is_some());
    run_until(&mut h, "the resumed run to finish", Duration::from_secs(240), |s| s.finetune.job.is_none());
    let s = studio(&h);
    assert!(s.finetune.job_errors.is_empty(), "{:?}", s.finetune.job_errors);
    let outcome = s.finetune.job_outcome.clone().unwrap_or_default();
    assert!(outcome.starts_with("finished at step 4"), "{outcome}");
    let data = read_run(&run).expect("read_run");
    assert_eq!(data.state.as_ref().map(|s| s.status), Some(RunStatus::Finished));
    // One line per step, none repeated: the run continued from its checkpoint.
    assert_eq!(data.rfft_steps.iter().map(|s| s.step).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    // Every step carries its time and the process's resident memory (Linux).
    for st in &data.rfft_steps {
        assert!(st.time.is_some_and(|t| t > 1.6e9), "{st:?}");
        if cfg!(target_os = "linux") {
            assert!(st.resident_bytes.is_some_and(|b| b > 0), "{st:?}");
        }
    }
    assert!(!data.resumable(), "a finished run is not resumable");
}

/// A tiny RFFT run of `steps` steps under `tmp/runs/stopped-run`, stopped after its first step as
/// the Stop button or Ctrl-C would; returns its folder and the step it stopped at.
pub(crate) fn stopped_tiny_run(tmp: &Path, steps: usize) -> (std::path::PathBuf, usize) {
    let data = root().join("sample-data");
    let config = RfftConfig::from_toml(
        &format!(
            "lr = 1e-3\nsteps = {steps}\neval_every = 100\ncheckpoint_every = 1\nseed = 3\nimage_size = 64\nsample_steps = 4\nlast_steps = 2\nlora_rank = 2\neval_seeds = [0]\n\n[[products]]\nimage = \"{0}/kettle.png\"\nprompt = \"a kettle\"\ntitle = \"kettle\"\n\n[[eval_products]]\nimage = \"{0}/bottle.png\"\nprompt = \"a bottle\"\ntitle = \"bottle\"\n",
            data.display()
        ),
        "test",
    )
    .expect("config");
    let run = tmp.join("runs").join("stopped-run");
    let job = rfft::spawn_rfft_with(config, run.clone(), false, DeviceRequest::Cpu, None, Precision::F32, root().join("models/tiny"));
    let mut stopped_at = None;
    while stopped_at.is_none() {
        match job.events.recv_timeout(Duration::from_secs(120)).expect("an event") {
            RfftEvent::Step(s) if s.step == 1 => job.stop(),
            RfftEvent::Finished { step, status } => stopped_at = Some((step, status)),
            RfftEvent::Failed { error, .. } => panic!("{error}"),
            _ => {}
        }
    }
    job.join();
    let (step, status) = stopped_at.expect("finished");
    assert_eq!(status, RunStatus::Stopped);
    (run, step)
}

//! `rfstudio rfft`: absurd sizes and numbers in run.toml, runs killed before their first
//! checkpoint, truncated checkpoints, and resumes that would silently change the experiment.

use std::path::{Path, PathBuf};

use rfstudio::train::rfft::{self, RunStatus};

use super::run;
use crate::common::root;

fn config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let data = root().join("sample-data");
    let text = format!(
        r#"{extra}
lr = 1e-3
eval_every = 100
checkpoint_every = 2
seed = 3
sample_steps = 3
last_steps = 2
eval_seeds = [0]

[[products]]
image = "{}/kettle.png"
prompt = "a kettle on a marble counter"
title = "电热水壶"
"#,
        data.display()
    );
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

fn rfft_run(config: Option<&Path>, run_dir: &Path, resume: bool) -> super::Ran {
    let mut args: Vec<String> = ["--models", "models/tiny", "--device", "cpu", "rfft"].map(String::from).to_vec();
    if let Some(c) = config {
        args.extend(["--config".into(), c.display().to_string()]);
    }
    args.extend(["--run".into(), run_dir.display().to_string()]);
    if resume {
        args.push("--resume".into());
    }
    run(args)
}

#[test]
fn hostile_rfft_absurd_numbers_in_run_toml_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cases = [
        ("image_size = 65536\nsteps = 1", "between 64 and 2048"),
        ("image_size = 2048\nsteps = 1", "needs about"),
        ("image_size = 64\nsteps = 1\nlr = nan", "lr = NaN"),
        ("image_size = 64\nsteps = 1\nguidance = 1e30", "between 0 and 30"),
        ("image_size = 64\nsteps = 1\ncontrolnet_scale = -100", "ControlNet scale -100"),
        ("image_size = 64\nsteps = 1\nbatch = 100000", "batch = 100000"),
    ];
    for (i, (extra, needle)) in cases.iter().enumerate() {
        // `lr` appears twice when a case sets it: TOML refuses the duplicate, so drop the default.
        let c = config(tmp.path(), &format!("c{i}.toml"), extra);
        if extra.contains("lr =") {
            let text = std::fs::read_to_string(&c).expect("read").replacen("lr = 1e-3\n", "", 1);
            std::fs::write(&c, text).expect("write");
        }
        let run_dir = tmp.path().join(format!("run{i}"));
        rfft_run(Some(&c), &run_dir, false).fails(2, &[needle]);
        assert!(!run_dir.join("checkpoint").exists());
    }
}

#[test]
fn hostile_rfft_resume_before_the_first_checkpoint_and_after_a_kill() {
    let tmp = tempfile::tempdir().expect("tmp");
    let c = config(tmp.path(), "run.toml", "image_size = 64\nsteps = 2");
    let run_dir = tmp.path().join("run");
    // What a kill -9 before the first checkpoint leaves: run.toml, a "running" state of a dead
    // process, no checkpoint.
    std::fs::create_dir_all(&run_dir).expect("mkdir");
    let parsed = rfft::RfftConfig::from_file(&c).expect("config");
    std::fs::write(run_dir.join("run.toml"), parsed.absolutized().to_toml().expect("toml")).expect("write");
    let mut dead = std::process::Command::new("true").spawn().expect("spawn");
    let pid = dead.id();
    dead.wait().expect("wait");
    std::fs::write(run_dir.join("state.json"), format!("{{\"step\":0,\"status\":\"running\",\"pid\":{pid}}}")).expect("state");
    let summary = rfstudio::train::run_folder::read_run(&run_dir).expect("read_run");
    assert_eq!(summary.state.map(|s| s.status), Some(RunStatus::Interrupted), "not 'running' forever");
    // --resume starts it again from step 0 (with a warning) instead of "nothing to resume".
    let r = rfft_run(None, &run_dir, true);
    r.ok();
    assert!(r.stderr.contains("before its first checkpoint"), "{}", r.stderr);
    let summary = rfstudio::train::run_folder::read_run(&run_dir).expect("read_run");
    assert_eq!(summary.state.map(|s| (s.step, s.status)), Some((2, RunStatus::Finished)));
    // A folder that is not a run at all.
    rfft_run(None, &tmp.path().join("nothing"), true).fails(2, &["not an RFFT run folder"]);
}

#[test]
fn hostile_rfft_resume_refuses_a_different_experiment_and_names_corrupt_checkpoints() {
    let tmp = tempfile::tempdir().expect("tmp");
    let c = config(tmp.path(), "run.toml", "image_size = 64\nsteps = 2\nreg = \"cc\"");
    let run_dir = tmp.path().join("run");
    rfft_run(Some(&c), &run_dir, false).ok();
    // Another regulariser, or LoRA on a full-ControlNet run: refused, each change named.
    let kl = config(tmp.path(), "kl.toml", "image_size = 64\nsteps = 2\nreg = \"kl\"");
    rfft_run(Some(&kl), &run_dir, true).fails(2, &["reg: \"cc\" -> \"kl\""]);
    let lora = config(tmp.path(), "lora.toml", "image_size = 64\nsteps = 2\nreg = \"cc\"\nlora_rank = 4");
    rfft_run(Some(&lora), &run_dir, true).fails(2, &["lora_rank: 0 -> 4"]);
    // More steps is a continuation: allowed, and said.
    let longer = config(tmp.path(), "longer.toml", "image_size = 64\nsteps = 3\nreg = \"cc\"");
    let r = rfft_run(Some(&longer), &run_dir, true);
    r.ok();
    assert!(r.stderr.contains("steps = 3 (was 2)"), "{}", r.stderr);
    // A truncated checkpoint: the file and a way out, no decoder dump.
    let trainable = run_dir.join("checkpoint/trainable.bin");
    let bytes = std::fs::read(&trainable).expect("read");
    std::fs::write(&trainable, &bytes[..bytes.len() / 2]).expect("truncate");
    let longer4 = config(tmp.path(), "longer4.toml", "image_size = 64\nsteps = 4\nreg = \"cc\"");
    let r = rfft_run(Some(&longer4), &run_dir, true);
    r.fails(2, &["trainable.bin", "corrupt or truncated"]);
    let line = r.stderr.lines().find(|l| l.starts_with("error:")).expect("error line");
    assert!(line.len() < 400 && !line.contains("Error {") && !line.contains("Error("), "{line}");
}

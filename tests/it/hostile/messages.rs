//! Every exit code's message appears exactly once; `--models` pointing nowhere and broken
//! manifests; `info` with no models; `--help` documents every option; README's quick start.

use clap::CommandFactory;

use super::{rfstudio, run};
use crate::common::root;

#[test]
fn hostile_messages_each_exit_code_prints_its_message_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out");
    let o = out.to_str().expect("utf8");
    // 2: bad input
    run(["--models", "models/tiny", "--device", "cpu", "generate", "--product", "/nonexistent.png", "--prompt", "x", "--out", o])
        .fails(2, &["/nonexistent.png"]);
    // 3: models missing — a folder that does not exist, and a broken manifest
    run(["--models", "/nonexistent", "--device", "cpu", "generate", "--product", "sample-data/bag.png", "--prompt", "x", "--out", o])
        .fails(3, &["no models.toml in /nonexistent, which does not exist"]);
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).expect("mkdir");
    std::fs::write(broken.join("models.toml"), "[roles\nbase = 3").expect("write");
    run(["--models", broken.to_str().expect("utf8"), "info"]).fails(3, &["invalid model manifest"]);
    // 4: nothing available (tiny weights never reach P = 1)
    run([
        "--models", "models/tiny", "--device", "cpu", "generate", "--product", "sample-data/bag.png", "--prompt", "x", "--steps", "1",
        "--size", "64", "--threshold", "1", "--out", o,
    ])
    .fails(4, &["no available image"]);
    // A SQLite error keeps its text once (it used to repeat the path and message).
    let ds = tmp.path().join("ds");
    run(["dataset", "init", ds.to_str().expect("utf8")]).ok();
    std::fs::write(ds.join("dataset.sqlite"), "this is not a database, but it is long enough to look like one..........").expect("clobber");
    run(["dataset", "stats", ds.to_str().expect("utf8")]).fails(1, &["file is not a database"]);
}

#[test]
fn hostile_messages_info_without_models_says_how_to_try_the_tiny_ones() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = run(["--device", "cpu", "--models", tmp.path().to_str().expect("utf8"), "info"]);
    r.ok();
    assert!(r.stdout.contains("--models models/tiny"), "{}", r.stdout);
}

/// Every option and positional argument of every subcommand has help text, global options sit
/// under their own heading, and required options show in the usage line.
#[test]
fn hostile_messages_help_documents_every_option() {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
            if arg.is_global_set() && arg.get_help_heading() != Some("Global options") {
                missing.push(format!("{path} {id}: global option outside the \"Global options\" heading"));
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let cmd = rfstudio::cli::Cli::command();
    let mut missing = Vec::new();
    walk(&cmd, "rfstudio", &mut missing);
    assert!(missing.is_empty(), "undocumented:\n{}", missing.join("\n"));
    let help = rfstudio().args(["generate", "--help"]).output().expect("help");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("Global options:"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("Usage:") && l.contains("--out <DIR>")), "required options in the usage line: {text}");
}

/// README's quick start, run as written (with the binary under test for `cargo run --release --`).
#[test]
fn hostile_messages_readme_quick_start_runs_verbatim() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let block = readme.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("the set-up block");
    let joined = block.replace("\\\n", " ");
    let commands: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("cargo run --release -- "))
        .collect();
    assert!(commands.iter().any(|c| c.contains(" generate ")), "{block}");
    for c in commands {
        let args = shell_words(c.trim_start_matches("cargo run --release -- "));
        let out = rfstudio().args(&args).output().expect("run");
        assert!(
            out.status.success(),
            "`{c}` exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(root().join("out/kettle"));
}

/// Split a command line on spaces, keeping double-quoted words together.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

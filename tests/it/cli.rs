//! End-to-end tests of the binary's `info` command.

use std::process::Command;

use crate::common::root;

fn rfstudio() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rfstudio"));
    // English messages whatever the machine's locale (the tests read them).
    c.env("RFSTUDIO_LANG", "en");
    c.current_dir(root());
    c.env_remove("RFSTUDIO_DEVICE").env_remove("RFSTUDIO_MODELS").env_remove("RFSTUDIO_DTYPE");
    c
}

#[test]
fn cli_info_reports_backends_and_tiny_models() {
    let out = rfstudio()
        .args(["info", "--models", "models/tiny", "--device", "auto"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("rfstudio "), "{stdout}");
    assert!(stdout.contains("cpu"), "{stdout}");
    assert!(stdout.contains("selected: device: "), "{stdout}");
    assert!(stdout.contains("smoke test on the selected device: ok"), "{stdout}");
    assert!(stdout.contains("RANDOM TEST WEIGHTS"), "{stdout}");
    for role in ["base", "controlnet", "depth", "saliency", "text", "image", "rfnet"] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(role))
            .unwrap_or_else(|| panic!("no line for {role}: {stdout}"));
        assert!(line.contains("found"), "{role}: {line}");
    }
}

#[test]
fn cli_info_json_and_invalid_model() {
    let dir = tempfile::tempdir().expect("tmp");
    // A controlnet folder with a corrupt weights file, and no manifest entry for the rest.
    let cn = dir.path().join("cn");
    std::fs::create_dir(&cn).expect("mkdir");
    std::fs::write(cn.join("config.json"), "{}").expect("write");
    std::fs::write(cn.join("diffusion_pytorch_model.safetensors"), b"garbage").expect("write");
    let out = rfstudio()
        .args(["info", "--json", "--device", "cpu", "--models"])
        .arg(dir.path())
        .arg("--controlnet-model")
        .arg(&cn)
        .output()
        .expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["selected"]["backend"], "cpu");
    let models = v["models"].as_array().expect("models");
    let cnr = models.iter().find(|m| m["role"] == "controlnet").expect("controlnet");
    assert_eq!(cnr["status"]["state"], "invalid");
    assert!(cnr["status"]["detail"].as_str().unwrap_or("").contains("diffusion_pytorch_model.safetensors"));
    let base = models.iter().find(|m| m["role"] == "base").expect("base");
    assert_eq!(base["status"]["state"], "missing");
}

#[test]
fn cli_unsupported_device_is_a_clear_error() {
    let out = rfstudio().args(["info", "--device", "gpu"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("possible values"), "{err}");
}

#[test]
fn cli_bench_generate_json_on_tiny_models() {
    let out = rfstudio()
        .args(["bench", "generate", "--models", "models/tiny", "--device", "cpu", "--resolution", "64", "--steps", "2", "--iters", "1", "--batches", "1,2", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["bench"], "generate");
    let batches = v["batches"].as_array().expect("batches");
    assert_eq!(batches.len(), 2);
    for b in batches {
        assert!(b["unet_controlnet_step_ms"].as_f64().expect("ms") > 0.0);
        assert!(b["per_image_s"].as_f64().expect("s") > 0.0);
    }
}

/// `bench ops` at toy sizes: every line timed, and the fused attention lines carry their
/// agreement with the matmul form (what the GPU run checks for the kernel autotune picks).
#[test]
fn cli_bench_ops_json_with_attention_check() {
    let out = rfstudio()
        .args(["--device", "cpu", "--json", "bench", "ops", "--iters", "1", "--tokens", "128", "--matmul", "64"])
        .args(["--latent", "8", "--conv-batches", "1"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["bench"], "ops");
    assert_eq!(v["dtype"], "F32");
    let ops = v["ops"].as_array().expect("ops");
    assert!(ops.len() >= 11, "{ops:?}");
    assert!(ops.iter().all(|o| o["ms"].as_f64().is_some_and(|ms| ms >= 0.0)));
    let checked: Vec<f64> = ops.iter().filter_map(|o| o["max_abs_diff"].as_f64()).collect();
    // three fused self-attention lines, one cross-attention, one GroupNorm+SiLU kernel
    assert_eq!(checked.len(), 5, "{ops:?}");
    assert!(ops.iter().any(|o| o["name"] == "groupnorm32+silu (rfstudio kernel)"), "{ops:?}");
    assert!(checked.iter().all(|d| *d < 1e-4), "{checked:?}");
    assert!(ops.iter().any(|o| o["shape"] == "2x8x32x80"), "{ops:?}");
}

#[test]
fn cli_no_arguments_without_a_display_prints_the_overview() {
    let out = rfstudio()
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .expect("run rfstudio");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Headless commands"), "{text}");
    if cfg!(feature = "gui") {
        assert!(text.contains("no display found"), "{text}");
    }
}

#[test]
fn cli_studio_without_a_display_fails_clearly() {
    let out = rfstudio()
        .arg("studio")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .expect("run rfstudio");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("display") || err.contains("no GUI"), "{err}");
}

/// An installed rfstudio's first start, as a user with a fresh home folder and no checkout:
/// `info` creates the user's models folder (manifest + instructions), says the studio runs in
/// demo mode, and writes nothing in the working folder.
#[test]
fn cli_info_in_a_fresh_home_creates_the_user_models_folder_and_says_demo_mode() {
    let home = tempfile::tempdir().expect("home");
    let cwd = tempfile::tempdir().expect("cwd");
    let out = Command::new(env!("CARGO_BIN_EXE_rfstudio"))
        .current_dir(cwd.path())
        .env_remove("RFSTUDIO_DEVICE")
        .env_remove("RFSTUDIO_MODELS")
        .env_remove("XDG_DATA_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_CACHE_HOME")
        .env("HOME", home.path())
        .args(["--device", "cpu", "info"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let models = home.path().join(".local/share/rfstudio/models");
    assert!(models.join("models.toml").is_file(), "no user models folder: {stdout}");
    assert!(models.join("README.md").is_file());
    assert!(stdout.contains(&format!("models: {}", models.join("models.toml").display())), "{stdout}");
    assert!(stdout.contains("the studio runs in demo mode on the tiny random-weight models"), "{stdout}");
    assert_eq!(std::fs::read_dir(cwd.path()).expect("cwd").count(), 0, "wrote into the working folder");
    // a second start leaves the folder (and anything the user put there) alone
    std::fs::write(models.join("models.toml"), "[roles]\nbase = \"mine\"\n").expect("edit");
    let again = Command::new(env!("CARGO_BIN_EXE_rfstudio"))
        .current_dir(cwd.path())
        .env_remove("RFSTUDIO_MODELS")
        .env_remove("XDG_DATA_HOME")
        .env("HOME", home.path())
        .args(["--device", "cpu", "info"])
        .output()
        .expect("run");
    assert!(again.status.success());
    assert_eq!(std::fs::read_to_string(models.join("models.toml")).unwrap(), "[roles]\nbase = \"mine\"\n");
}

#[test]
fn cli_lang_zh_cn_speaks_chinese_and_json_stays_the_same() {
    // `--lang zh-CN`: the text report in Chinese, class and role names included.
    let zh = rfstudio()
        .args(["--lang", "zh-CN", "info", "--models", "models/tiny", "--device", "cpu"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&zh.stdout);
    assert!(zh.status.success(), "{stdout}");
    for expected in ["已编译的后端", "在所选设备上的冒烟测试", "随机测试权重", "已找到"] {
        assert!(stdout.contains(expected), "missing {expected:?} in\n{stdout}");
    }
    // The locale decides when no --lang is given; RFSTUDIO_LANG (the tests' English) is unset.
    let tmp = tempfile::tempdir().expect("tmp");
    let by_locale = rfstudio()
        .env_remove("RFSTUDIO_LANG")
        .env_remove("LC_ALL")
        .env_remove("LC_MESSAGES")
        .env("LANG", "zh_CN.UTF-8")
        .args(["dataset", "init"])
        .arg(tmp.path().join("ds"))
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&by_locale.stdout);
    assert!(stdout.contains("已就绪"), "{stdout}");
    // Errors too, with the exit code unchanged.
    let err = rfstudio()
        .args(["--lang", "zh-CN", "dataset", "stats"])
        .arg(tmp.path().join("missing"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert_eq!(err.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("错误："), "{stderr}");
    // An unknown language is refused with the choices.
    let bad = rfstudio().args(["--lang", "fr", "info"]).output().expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("zh-CN"));
    // JSON is machine output: identical in both languages.
    let json = |lang: &str| {
        let out = rfstudio()
            .args(["--lang", lang, "--json", "dataset", "stats"])
            .arg(tmp.path().join("ds"))
            .output()
            .expect("run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    assert_eq!(json("en"), json("zh-CN"));
    // Including the fields that carry a sentence (device notice, smoke test, model statuses).
    let info = rfstudio()
        .args(["--lang", "zh-CN", "--json", "info", "--models", "models/tiny", "--device", "cpu"])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success(), "{stdout}");
    assert!(stdout.contains("\"device: cpu (requested)\""), "{stdout}");
    assert!(!stdout.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)), "Chinese in --json: {stdout}");
}

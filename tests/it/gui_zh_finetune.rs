//! The Fine-tune tab in Chinese: driven by its Chinese labels (the form, a tiny RFFT run started
//! and stopped, the run list and the monitor's plots, overlays, log scale, wall time, continuing a
//! stopped run). Stored data (state.json, metrics) stays as it is in any language.

use std::path::Path;
use std::time::Duration;

use egui_kittest::kittest::Queryable;
use rfstudio::app::images::file_key;
use rfstudio::app::monitor::XAxis;
use rfstudio::i18n::Lang;
use rfstudio::train::rfft::RunStatus;
use rfstudio::train::run_folder::read_run;

use crate::gui::{harness, run_until, studio, tiny_settings};
use crate::gui_monitor::{series, stopped_tiny_run, write_run};

fn zh_settings(tmp: &Path) -> rfstudio::app::Settings {
    let mut s = tiny_settings(tmp);
    s.lang = Some(Lang::ZhCn);
    s
}

/// The run list, the monitor (overlay, log scale, wall time, memory, eval grid), an RFNet run
/// and an older run, all in Chinese; switching to English rewrites the watcher's status lines.
#[test]
fn gui_finetune_in_chinese_monitors_and_overlays_runs_with_log_scale_wall_time_and_eval_grid() {
    let tmp = tempfile::tempdir().expect("tmp");
    let runs = tmp.path().join("runs");
    let a = runs.join("run-a");
    let b = runs.join("run-b");
    let old = runs.join("run-old");
    write_run(&a, &[0.9, 0.7, 0.5, 0.4, 0.3], true);
    write_run(&b, &[0.8, 0.0, -0.1], true);
    write_run(&old, &[1.0, 0.9], false);
    let rfnet = runs.join("rfnet-demo");
    std::fs::create_dir_all(&rfnet).expect("mkdir");
    std::fs::write(rfnet.join("train.json"), "{\"epochs\": 2, \"lr\": 0.001, \"batch\": 8}").expect("train.json");
    std::fs::write(
        rfnet.join("metrics.jsonl"),
        "{\"kind\":\"step\",\"epoch\":1,\"step\":1,\"loss\":1.6,\"accuracy\":0.2,\"lr\":0.001}\n{\"kind\":\"step\",\"epoch\":1,\"step\":2,\"loss\":1.4,\"accuracy\":0.3,\"lr\":0.001}\n{\"kind\":\"epoch\",\"epoch\":1,\"step\":2,\"train_loss\":1.5,\"train_accuracy\":0.25,\"val_loss\":1.45,\"val_accuracy\":0.3,\"val_macro_f1\":0.2,\"seconds\":1.0}\n",
    )
    .expect("metrics");
    let mut h = harness(zh_settings(tmp.path()));
    h.step();
    h.get_by_label("微调").click();
    run_until(&mut h, "the run list in Chinese", Duration::from_secs(10), |s| {
        s.finetune.runs.len() == 4 && s.finetune.runs.iter().all(|r| r.status.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)))
    });
    h.step();
    // The list: kind and status in Chinese (state.json keeps "finished").
    h.get_by_label("run-a — RFFT · 已完成（第 5 步）");
    h.get_by_label("rfnet-demo — RFNet 训练 · 已保存 0/2 轮的检查点");
    h.get_by_label("新建 RFFT 运行");
    h.get_by_label("运行");
    h.get_by_label("在左侧选择一个运行文件夹以查看其曲线。");
    for label in ["学习率", "步数", "评估间隔（步）", "LoRA 秩", "种子", "图像尺寸", "采样步数", "最后几步（计算梯度）", "批大小", "正则化"] {
        h.get_by_label(label);
    }
    h.get_by_label("run-a — RFFT · 已完成（第 5 步）").click();
    run_until(&mut h, "run-a", Duration::from_secs(10), |s| s.finetune.run.as_ref().is_some_and(|r| r.points() == 5));
    h.step();
    h.get_by_label("RFFT · 已完成（第 5 步） · 5 个点");
    h.get_by_label("超参数").click();
    h.step();
    h.get_by_label("lora_rank");
    // The plots by their Chinese titles; metric symbols stay as they are.
    assert_eq!(series(&h, "F_AC"), vec![("run-a", 5)]);
    assert_eq!(series(&h, "总损失"), vec![("run-a", 5)]);
    assert_eq!(series(&h, "梯度范数"), vec![("run-a", 5)]);
    assert_eq!(series(&h, "评估商品的可用率"), vec![("run-a", 1)]);
    assert_eq!(series(&h, "内存（MiB）"), vec![("run-a · 常驻", 5)]);
    h.get_by_label_contains("最后一步 5：梯度范数 5.000e-1 · 2.00 秒/步 · 学习率 1.00e-5 · 常驻 ");
    h.get_by_label("平滑");
    h.get_by_label("横轴：");
    assert!(h.query_all_by_label("步").count() >= 1, "the step axis button");
    // Overlay run-b: a second series named after it.
    h.state_mut().as_mut().expect("studio").finetune.set_compared(&b, true);
    run_until(&mut h, "run-b read for comparison", Duration::from_secs(10), |s| s.finetune.compared.len() == 1);
    h.step();
    assert_eq!(series(&h, "F_AC"), vec![("run-a", 5), ("run-b", 3)]);
    assert_eq!(series(&h, "内存（MiB）"), vec![("run-a · 常驻", 5), ("run-b · 常驻", 3)]);
    // Log scale by its Chinese label: run-b's 0 and -0.1 are dropped, said in Chinese.
    h.get_by_label("对数坐标").click();
    h.step();
    assert!(studio(&h).finetune.view.log_y);
    assert_eq!(series(&h, "F_AC"), vec![("run-a", 5), ("run-b", 1)]);
    h.get_by_label("对数坐标：2 个 ≤ 0 的值未显示");
    // Wall time by its Chinese label.
    h.get_by_label("实际时间").click();
    h.step();
    assert_eq!(studio(&h).finetune.view.x_axis, XAxis::WallTime);
    assert_eq!(series(&h, "F_AC").len(), 2);
    // The eval step: its line, the samples and the grid cells in Chinese.
    run_until(&mut h, "the eval grid", Duration::from_secs(10), |s| {
        s.images.texture(&file_key(&a.join("eval/step-000005.png"))).is_some()
    });
    h.step();
    h.get_by_label("评估步");
    h.get_by_label("第 5 步：可用率 75% · 平均 F_AC 0.5000");
    for label in ["shoe · 种子 1", "shoe · 种子 2", "lamp · 种子 1", "lamp · 种子 2"] {
        h.get_by_label(label);
    }
    assert_eq!(h.query_all_by_label("P(可用) 0.60 ✔").count(), 3);
    h.get_by_label("P(可用) 0.60 ✘");
    assert_eq!(h.query_all_by_label("可用").count(), 3);
    h.get_by_label("不可用");
    h.state_mut().as_mut().expect("studio").finetune.set_compared(&b, false);
    h.step();
    assert_eq!(series(&h, "F_AC"), vec![("run-a", 5)]);
    // An older run without step times: steps only, no memory, said in Chinese.
    h.get_by_label_contains("run-old —").click();
    run_until(&mut h, "run-old", Duration::from_secs(10), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.entry.name == "run-old" && r.points() == 2)
    });
    h.step();
    assert_eq!(studio(&h).finetune.view.x_axis, XAxis::Step);
    assert!(series(&h, "内存（MiB）").is_empty());
    h.get_by_label("内存（MiB）");
    h.get_by_label("该运行的指标中没有内存采样");
    // An RFNet run: per-step and per-epoch plots with Chinese titles and legends.
    h.get_by_label_contains("rfnet-demo —").click();
    run_until(&mut h, "the RFNet run", Duration::from_secs(10), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.points() == 2 && r.rfnet_epochs.len() == 1)
    });
    h.step();
    assert_eq!(series(&h, "每步训练损失"), vec![("rfnet-demo", 2)]);
    assert_eq!(series(&h, "每步训练准确率"), vec![("rfnet-demo", 2)]);
    let epochs: Vec<&str> = series(&h, "每轮").into_iter().map(|(n, _)| n).collect();
    assert_eq!(epochs, vec!["训练损失", "验证损失", "验证准确率", "验证宏平均 F1"]);
    h.get_by_label("第 1 轮：验证准确率 0.300 · 验证宏平均 F1 0.200 · 1.0 秒");
    // Stored data is unchanged; the watcher follows a language switch.
    assert!(std::fs::read_to_string(a.join("state.json")).expect("state").contains("finished"));
    h.state_mut().as_mut().expect("studio").settings.lang = Some(Lang::En);
    run_until(&mut h, "the run list in English", Duration::from_secs(10), |s| {
        s.finetune.runs.iter().any(|r| r.status == "finished at step 5")
    });
    h.step();
    h.get_by_label("run-a — RFFT · finished at step 5");
    h.get_by_label("rfnet-demo — RFNet training · 0/2 epochs checkpointed");
}

/// The form in Chinese: its error, a tiny RFFT run started and stopped by the Chinese buttons,
/// the Chinese status lines while it runs and after.
#[test]
fn gui_finetune_in_chinese_start_and_stop_a_tiny_rfft_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = zh_settings(tmp.path());
    let f = &mut settings.finetune;
    f.products.clear();
    f.prompts = "a kettle on a marble counter".into();
    f.image_size = 64;
    f.sample_steps = 4;
    f.last_steps = 2;
    f.steps = 500;
    f.eval_every = 1000;
    f.lora_rank = 4;
    f.lr = 1e-3;
    f.name = "gui-rfft-zh".into();
    let mut h = harness(settings);
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    h.get_by_label("微调").click();
    h.step();
    h.get_by_label("运行");
    h.get_by_label_contains(" 中没有运行文件夹");
    // No product yet: the form's error in Chinese, cleared once a product is added.
    h.get_by_label("开始").click();
    h.step();
    h.step();
    h.get_by_label_contains("请至少添加一个商品");
    h.get_by_label("添加示例商品：");
    h.get_by_label("kettle").click();
    h.step();
    h.step();
    assert_eq!(studio(&h).settings.finetune.products.len(), 1);
    assert_eq!(h.query_all_by_label_contains("请至少添加一个商品").count(), 0);
    h.get_by_label("商品（1）");
    h.get_by_label("提示词（每行一条）");
    h.get_by_label("开始").click();
    run_until(&mut h, "the run's first points", Duration::from_secs(120), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.points() >= 1)
    });
    h.step();
    let dir = studio(&h).settings.finetune.selected.clone().expect("the new run is shown");
    h.get_by_label(&format!("运行中：{}", dir.display()));
    assert!(series(&h, "总损失").len() == 1, "{:?}", studio(&h).finetune.plotted);
    assert!(h.query_all_by_label_contains("RFFT · 运行中（第 ").count() >= 1, "the list and the header say running");
    // Pause and continue by the Chinese buttons.
    h.get_by_label("暂停").click();
    run_until(&mut h, "the run to pause", Duration::from_secs(120), |s| s.finetune.job.as_ref().is_some_and(|j| j.paused));
    h.step();
    h.get_by_label(&format!("已暂停：{}", dir.display()));
    h.get_by_label("继续").click();
    run_until(&mut h, "the run to go on", Duration::from_secs(120), |s| s.finetune.job.as_ref().is_some_and(|j| !j.paused));
    let first = studio(&h).finetune.run.as_ref().map(|r| r.points()).unwrap_or(0);
    run_until(&mut h, "the curve to gain points", Duration::from_secs(180), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.points() > first)
    });
    h.get_by_label("停止").click();
    run_until(&mut h, "the run to stop", Duration::from_secs(180), |s| s.finetune.job.is_none());
    let s = studio(&h);
    assert!(s.finetune.job_errors.is_empty(), "{:?}", s.finetune.job_errors);
    let outcome = s.finetune.job_outcome.clone().unwrap_or_default();
    assert!(outcome.starts_with("已停止（第 "), "{outcome}");
    // The run folder keeps the English status.
    let state = std::fs::read_to_string(dir.join("state.json")).expect("state.json");
    assert!(state.contains("stopped"), "{state}");
    h.step();
    h.get_by_label(&format!("上次运行：{outcome}"));
    run_until(&mut h, "the list to show the stopped run", Duration::from_secs(10), |s| {
        s.finetune.runs.iter().any(|r| r.status.starts_with("已停止（第 "))
    });
    h.step();
    assert!(h.query_all_by_label_contains("gui-rfft-zh").count() >= 1);
}

/// A stopped tiny run continued by the Chinese “继续运行” button to its last step.
#[test]
fn gui_finetune_in_chinese_resume_run_continues_a_stopped_tiny_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (run, step) = stopped_tiny_run(tmp.path(), 3);

    let mut h = harness(zh_settings(tmp.path()));
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    h.get_by_label("微调").click();
    run_until(&mut h, "the run list", Duration::from_secs(10), |s| {
        s.finetune.runs.len() == 1 && s.finetune.runs[0].status.starts_with("已停止")
    });
    h.step();
    h.get_by_label(&format!("stopped-run — RFFT · 已停止（第 {step} 步）")).click();
    run_until(&mut h, "the stopped run", Duration::from_secs(10), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.resumable())
    });
    h.step();
    h.get_by_label(&format!("RFFT · 已停止（第 {step} 步） · {step} 个点"));
    h.get_by_label("继续运行").click();
    run_until(&mut h, "the resumed run to start", Duration::from_secs(10), |s| s.finetune.job.is_some());
    run_until(&mut h, "the resumed run to finish", Duration::from_secs(240), |s| s.finetune.job.is_none());
    let s = studio(&h);
    assert!(s.finetune.job_errors.is_empty(), "{:?}", s.finetune.job_errors);
    let outcome = s.finetune.job_outcome.clone().unwrap_or_default();
    assert_eq!(outcome, "已完成（第 3 步）");
    h.step();
    h.get_by_label("上次运行：已完成（第 3 步）");
    let data = read_run(&run).expect("read_run");
    assert_eq!(data.state.as_ref().map(|s| s.status), Some(RunStatus::Finished));
    assert_eq!(data.rfft_steps.iter().map(|s| s.step).collect::<Vec<_>>(), vec![1, 2, 3]);
    run_until(&mut h, "the header to say finished", Duration::from_secs(10), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.entry.status == "已完成（第 3 步）")
    });
    h.step();
    h.get_by_label("RFFT · 已完成（第 3 步） · 3 个点");
}

//! The Models tab and the language menu in Chinese: found by their Chinese labels.

use std::time::Duration;

use egui_kittest::kittest::Queryable;
use rfstudio::i18n::Lang;
use rfstudio::models::manifest::Role;

use crate::gui::{harness, run_until, studio, tiny_settings};

#[test]
fn gui_models_in_chinese_reports_missing_models_shows_the_chinese_help_and_switches_language() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = tiny_settings(tmp.path());
    settings.lang = Some(Lang::ZhCn);
    settings.models_dir = tmp.path().join("no-models");
    let mut h = harness(settings);
    run_until(&mut h, "the model check", Duration::from_secs(60), |s| {
        s.models.info.is_some() && !s.models.checking()
    });
    // The banner and the tab bar in Chinese.
    h.get_by_label("随机测试权重——生成的图片只是噪声；请在“模型”页安装真实权重");
    for tab in ["生成", "标注", "微调"] {
        h.get_by_label(tab);
    }
    h.get_by_label("模型").click();
    h.step();
    h.step();
    // Roles by their Chinese names, what is missing, and what to install, in Chinese.
    assert!(h.query_all_by_label("基础模型 (base)").count() >= 1);
    assert!(h.query_all_by_label("缺失").count() >= 7);
    h.get_by_label(&format!("安装：{}", rfstudio::i18n::tr_in(Lang::ZhCn, "models.hint_base")));
    h.get_by_label_contains("在所选设备上的冒烟测试：正常");
    // The Chinese Models help, rendered as Markdown (a table header cell).
    h.get_by_label("下载说明（models/README.md）");
    assert!(h.query_all_by_label_contains("公开检查点").count() >= 1, "the Chinese help's table");
    // The tiny demo models by the Chinese button: every SD role found.
    h.get_by_label("使用微型演示模型").click();
    run_until(&mut h, "the re-check", Duration::from_secs(60), |s| {
        !s.models.checking()
            && s.models.resolved.as_ref().is_some_and(|r| {
                r.configured
                    .iter()
                    .any(|c| c.role == Role::Base && matches!(c.status, rfstudio::models::manifest::Status::Found(_)))
            })
    });
    h.step();
    assert!(h.query_all_by_label("已找到").count() >= 6);
    // The language menu: English from now on, kept in the settings; stored data unchanged.
    h.get_by_value("🌐 简体中文").click();
    h.step();
    h.get_by_label("English").click();
    h.step();
    h.step();
    assert_eq!(studio(&h).settings.lang, Some(Lang::En));
    h.get_by_label("Apply and re-check");
    assert!(h.query_all_by_label("Models").count() >= 1, "the tab bar in English");
}

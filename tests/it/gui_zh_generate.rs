//! The Generate tab in Chinese: found by its Chinese labels, class names in Chinese, stored
//! data (run folders, favourites) as in English.

use std::path::Path;
use std::time::{Duration, Instant};

use egui::Key;
use egui_kittest::kittest::{NodeT, Queryable};
use image::{Rgb, RgbImage};
use rfstudio::app::Settings;
use rfstudio::app::generate::{GenerateState, RunStatus};
use rfstudio::app::images::file_key;
use rfstudio::i18n::{Lang, tr_in};
use rfstudio::pipeline::score::CLASS_NAMES;

use crate::common::root;
use crate::gui::{H, harness, run_until, studio, tiny_settings};

/// The five class names as the Chinese interface shows them.
const CLASS_KEYS: [&str; 5] = [
    "classes.available",
    "classes.space_mismatch",
    "classes.size_mismatch",
    "classes.indistinctiveness",
    "classes.shape_hallucination",
];

fn zh_settings(tmp: &Path) -> Settings {
    let mut s = tiny_settings(tmp);
    s.lang = Some(Lang::ZhCn);
    s
}

fn count(h: &H, text: &str) -> usize {
    h.query_all_by_label_contains(text).count()
}

/// Wait until the form's product preview is there (Start can be enabled).
fn wait_for_preview(h: &mut H) {
    run_until(h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    run_until(h, "the product preview", Duration::from_secs(30), |s| {
        GenerateState::placement_name(&s.settings.generate).is_some_and(|k| s.images.texture(&format!("{k}/product")).is_some())
    });
    h.step();
}

fn wait_for_the_end(h: &mut H) {
    run_until(h, "the generation to finish", Duration::from_secs(240), |s| {
        !s.generate.is_running() && s.generate.status != RunStatus::Idle
    });
}

/// A sample product and a tiny two-step run started with the Chinese Start button: the form,
/// the status line, the attempt card with its Chinese class names and verdict, and History.
#[test]
fn gui_generate_in_chinese_sample_run_shows_chinese_cards_and_verdicts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut h = harness(zh_settings(tmp.path()));
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    h.step();
    // The form by its Chinese labels, and what to do with no product yet.
    for label in ["商品", "反向提示词", "商品标题（RFNet 用的标题）", "种子", "随机", "步数", "引导强度（CFG）", "画布", "尝试次数", "阈值", "输出文件夹", "历史", "示例：", "白色背景"] {
        h.get_by_label(label);
    }
    assert_eq!(h.query_all_by_label("提示词").count(), 2, "the heading and the field's label");
    h.get_by_label("打开…");
    h.get_by_label("添加 LoRA…");
    assert!(count(&h, "请先选择商品") >= 1, "the hint under Start");
    h.get_by_label("还没有商品：打开一张透明背景的 PNG、拖一张到这里，或选一个示例。");
    assert!(h.get_by_label("开始").accesskit_node().is_disabled(), "no product: Start is disabled");
    for english in ["Start", "Product", "Negative prompt", "History", "Steps"] {
        assert!(h.query_by_label(english).is_none(), "English left: {english}");
    }

    // A sample (its id is data, not a label) and its previews with Chinese captions.
    h.get_by_label("kettle").click();
    wait_for_preview(&mut h);
    for caption in ["放置后的商品", "重绘蒙版", "Canny 控制图"] {
        h.get_by_label(caption);
    }
    h.get_by_label("开始").click();
    wait_for_the_end(&mut h);
    let s = studio(&h);
    assert_eq!(s.generate.status, RunStatus::Finished, "errors: {:?}", s.generate.errors);
    assert_eq!(s.generate.attempts.len(), 1);
    let out = s.generate.out_dir.clone().expect("out dir");
    // Stored data does not depend on the language.
    assert!(out.file_name().unwrap().to_string_lossy().starts_with("kettle-"), "{}", out.display());
    assert!(out.join("attempt_001.png").is_file());
    let scored = s.generate.attempts[0].probs.is_some();
    run_until(&mut h, "the attempt image", Duration::from_secs(30), |s| {
        s.images.texture(&file_key(&out.join("attempt_001.png"))).is_some()
    });
    h.step();
    h.get_by_label("运行：已完成");
    h.get_by_label("种子 7");
    h.get_by_label("打开输出文件夹");
    h.get_by_label("候选");
    h.get_by_label("点击图片放大 · 勾选两个进行对比");
    h.get_by_label("第 1 次尝试");
    assert!(count(&h, "种子 7 · ") >= 1, "the card's seed and time");
    h.get_by_label("对比");
    h.get_by_label("复用种子");
    h.get_by_label("导出…");
    h.get_by_label("本次运行的最佳结果");
    assert!(h.get_by_label("并排对比").accesskit_node().is_disabled());
    if root().join("models/tiny/rfnet/model.safetensors").is_file() {
        assert!(scored, "the tiny stack has an RFNet: the attempt must be scored");
        // The five class probabilities by their Chinese names, none in English.
        for key in CLASS_KEYS {
            let name = tr_in(Lang::ZhCn, key);
            assert!(count(&h, &format!("{name} 0.")) + count(&h, &format!("{name} 1.")) >= 1, "{name} missing");
        }
        for name in CLASS_NAMES {
            assert_eq!(count(&h, name), 0, "English class name shown: {name}");
        }
        assert_eq!(count(&h, "（阈值 "), 1, "the threshold on the Available bar");
        h.get_by_label("深度");
        h.get_by_label("显著性");
        // The outcome in plain Chinese (random weights never pass the threshold).
        h.get_by_label_contains("没有候选达到阈值：最好的是第 1 次尝试，P（可用）为 ");
    } else {
        h.get_by_label("未评分（未安装 RFNet）");
    }

    // History: the run with its Chinese summary and actions.
    run_until(&mut h, "history", Duration::from_secs(10), |s| !s.generate.history.is_empty());
    h.step();
    h.get_by_label("刷新");
    h.get_by_label("仅看 ★");
    let verdict = if scored { "无可用结果" } else { "未评分" };
    h.get_by_label_contains(&format!(" · 1 次尝试 · {verdict}"));
    h.get_by_label_contains(" · 种子 7 · 2 步 · CFG ");
    h.get_by_label("载入参数");
    h.get_by_label("打开文件夹");
    assert!(h.get_by_label("打开").accesskit_node().is_disabled(), "the shown run cannot be opened again");
}

/// A product that cannot be placed is explained in Chinese (the studio's control named, no
/// flag) and blocks Start until "white background" is ticked; a started run is cancelled with
/// the Chinese Cancel button, with Chinese progress and status texts and History marking it.
#[test]
fn gui_generate_in_chinese_unplaceable_product_then_progress_and_cancel() {
    let tmp = tempfile::tempdir().expect("tmp");
    let jpg = tmp.path().join("opaque.jpg");
    RgbImage::from_fn(96, 96, |x, y| if (20..76).contains(&x) && (20..76).contains(&y) { Rgb([200, 30, 30]) } else { Rgb([255, 255, 255]) })
        .save(&jpg)
        .expect("jpg");
    let mut settings = zh_settings(tmp.path());
    settings.generate.product = Some(jpg);
    settings.generate.params.steps = 400;
    let mut h = harness(settings);
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    let tick = "勾选“白色背景”";
    let start = Instant::now();
    while count(&h, tick) == 0 && start.elapsed() < Duration::from_secs(30) {
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(count(&h, tick), 1, "the product's error is shown once, naming the Chinese checkbox");
    assert_eq!(count(&h, "--white-bg"), 0, "the studio has no --white-bg flag");
    assert!(h.get_by_label("开始").accesskit_node().is_disabled(), "Start with a product that cannot be placed");
    h.get_by_label("白色背景").click();
    let start = Instant::now();
    while (count(&h, tick) > 0 || h.get_by_label("开始").accesskit_node().is_disabled()) && start.elapsed() < Duration::from_secs(30) {
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(count(&h, tick), 0);
    assert!(studio(&h).settings.generate.params.white_bg);

    // Start: the Chinese progress line (phase, speed, time left), then Cancel.
    h.get_by_label("开始").click();
    run_until(&mut h, "a few steps", Duration::from_secs(120), |s| {
        s.generate.progress.as_ref().is_some_and(|p| p.steps_seen >= 3 && p.step < p.total_steps)
    });
    h.step();
    h.get_by_label("运行：运行中");
    h.get_by_label("去噪中");
    assert!(count(&h, "每步 ") >= 1, "seconds per step");
    assert!(count(&h, " 秒 · 最多还剩 ") >= 1, "time left");
    assert_eq!(count(&h, "s/step"), 0);
    h.get_by_label("取消").click();
    h.step();
    let s = studio(&h);
    assert!(!s.generate.is_running(), "Cancel did not end the run at once");
    assert_eq!(s.generate.status, RunStatus::Cancelled, "errors: {:?}", s.generate.errors);
    h.step();
    h.get_by_label("运行：已取消");
    h.get_by_label_contains("已取消（正在进行的一步会在后台完成");
    assert!(!h.get_by_label("开始").accesskit_node().is_disabled(), "Start is back");
    run_until(&mut h, "the history", Duration::from_secs(30), |s| !s.generate.history.is_empty());
    h.step();
    h.get_by_label_contains("已取消或中断");
}

/// History reopens a past run in Chinese: its cards, a favourite kept in the run folder, two
/// candidates compared side by side in the zoom view (Chinese title, overlay choices, actions),
/// and a seed reused.
#[test]
fn gui_generate_in_chinese_history_reopens_a_run_to_star_compare_and_reuse_a_seed() {
    use rfstudio::app::generate::OverlayChoice;
    use rfstudio::pipeline::run_folder::RunFolder;
    let tmp = tempfile::tempdir().expect("tmp");
    let mut settings = zh_settings(tmp.path());
    settings.generate.params.attempts = 2;
    settings.generate.params.threshold = 1.0;
    settings.generate.product = Some(root().join("sample-data/lamp.png"));
    let mut h = harness(settings.clone());
    wait_for_preview(&mut h);
    h.get_by_label("开始").click();
    wait_for_the_end(&mut h);
    let run = studio(&h).generate.out_dir.clone().expect("out dir");
    let seeds: Vec<u64> = studio(&h).generate.attempts.iter().map(|r| r.seed).collect();
    assert_eq!(seeds.len(), 2, "errors: {:?}", studio(&h).generate.errors);
    drop(h);

    // A fresh studio: the run opened from History by the Chinese Open button.
    let mut h = harness(settings);
    run_until(&mut h, "history", Duration::from_secs(10), |s| s.generate.history.len() == 1);
    h.step();
    h.get_by_label("打开").click();
    run_until(&mut h, "the run's cards", Duration::from_secs(10), |s| s.generate.attempts.len() == 2);
    h.step();
    h.get_by_label("运行：已完成（从“历史”打开）");
    h.get_by_label("第 1 次尝试");
    h.get_by_label("第 2 次尝试");

    // Star attempt 2: saved in the folder as before, counted in History.
    let stars: Vec<_> = h.query_all_by_label("☆").collect();
    assert_eq!(stars.len(), 2);
    stars[1].click();
    h.step();
    h.step();
    let favs = RunFolder::new(&run).read_favourites().expect("favourites");
    assert_eq!(favs.into_iter().collect::<Vec<_>>(), vec![2]);
    h.get_by_label("★");
    h.get_by_label("仅看 ★").click();
    h.step();
    h.get_by_label_contains("★ 1");

    // Compare the two side by side.
    assert!(h.get_by_label("并排对比").accesskit_node().is_disabled());
    for c in h.query_all_by_label("对比").collect::<Vec<_>>() {
        c.click();
    }
    h.step();
    h.get_by_label("并排对比").click();
    h.step();
    h.step();
    h.get_by_label("第 1 次与第 2 次尝试");
    assert_eq!(studio(&h).generate.zoom.as_ref().map(|z| z.attempts.clone()), Some(vec![1, 2]));
    h.get_by_label("叠加");
    h.get_by_label("无");
    assert!(h.query_all_by_label("不透明度").count() >= 1, "the opacity slider");
    h.get_by_label(&format!("第 1 次尝试 · 种子 {}", seeds[0]));
    h.get_by_label(&format!("第 2 次尝试 · 种子 {}", seeds[1]));
    h.get_by_label("☆ 收藏");
    h.get_by_label("★ 已收藏");
    assert_eq!(h.query_all_by_label("导出…").count(), 4, "on the cards and in the zoom view");
    if studio(&h).generate.attempts[0].probs.is_some() {
        // The cards have "深度" checkboxes too; the zoom window is drawn last.
        h.query_all_by_label("深度").last().expect("depth").click();
        h.step();
        assert_eq!(studio(&h).generate.zoom.as_ref().map(|z| z.overlay), Some(OverlayChoice::Depth));
        for key in CLASS_KEYS {
            assert!(count(&h, tr_in(Lang::ZhCn, key)) >= 4, "class names on the cards and in the zoom view");
        }
    }
    for english in ["compare", "Reuse seed", "Export…", "Overlay", "opacity"] {
        assert!(h.query_by_label(english).is_none(), "English left: {english}");
    }
    // Reuse attempt 2's seed.
    let reuse: Vec<_> = h.query_all_by_label("复用种子").collect();
    assert!(reuse.len() >= 2);
    reuse[1].click();
    h.step();
    let form = &studio(&h).settings.generate;
    assert_eq!((form.seed, form.random_seed), (seeds[1], false));
    // Escape closes the zoom view.
    h.key_press(Key::Escape);
    h.step();
    h.step();
    assert!(h.query_by_label("第 1 次与第 2 次尝试").is_none());
}

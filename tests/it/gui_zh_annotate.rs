//! The annotate tab in Chinese: found by its Chinese labels. Labels are still stored by class id
//! and under the annotator's name, whatever the interface language.

use std::path::{Path, PathBuf};
use std::time::Duration;

use egui_kittest::kittest::Queryable;
use rfstudio::data::session::QueueOrder;
use rfstudio::data::store::{Decision, NewSample, Source, Store};
use rfstudio::i18n::Lang;

use crate::gui::{H, harness, png, run_until, studio, tiny_settings};
use crate::gui_grid::mine;

/// A dataset of `probs.len()` samples titled `zh <i>` (the first with a depth map), with the
/// given RFNet predictions.
fn dataset(tmp: &Path, probs: &[Option<[f32; 5]>]) -> PathBuf {
    let ds = tmp.join("ds");
    let store = Store::init(&ds).expect("init");
    let imgs = tmp.join("imgs");
    std::fs::create_dir_all(&imgs).expect("mkdir");
    for (i, p) in probs.iter().enumerate() {
        let path = imgs.join(format!("{i}.png"));
        png(&path, (i * 8) as u8);
        let depth = (i == 0).then(|| {
            let d = imgs.join(format!("{i}_depth.png"));
            png(&d, 10);
            d
        });
        let s = NewSample {
            product_id: format!("prod{i}"),
            image: path,
            depth,
            title: format!("zh {i}"),
            probs: *p,
            ..NewSample::default()
        };
        store.add_sample(&s, Source::Imported).expect("add");
    }
    ds
}

/// The studio in Chinese on the Annotate tab, dataset `ds` filled in, `annotator` as the name.
fn chinese_studio(tmp: &Path, ds: &Path, annotator: &str) -> H {
    let mut settings = tiny_settings(tmp);
    settings.lang = Some(Lang::ZhCn);
    settings.annotate.dataset = ds.to_path_buf();
    settings.annotate.annotator = annotator.into();
    let mut h = harness(settings);
    h.step();
    h.get_by_label("标注").click();
    h.step();
    h
}

/// Click a control found by its exact label and wait until the worker has answered.
fn click(h: &mut H, label: &str) {
    h.get_by_label(label).click();
    h.step();
    run_until(h, label, Duration::from_secs(10), |s| s.annotate.pending == 0);
    h.step();
}

fn counters(h: &H) -> (usize, usize) {
    studio(h).annotate.snapshot.as_ref().map_or((0, 0), |s| (s.counters.labelled, s.counters.skipped))
}

/// The single view in Chinese: the missing-name error, the bar, the counters, the class
/// buttons by their Chinese names, back / forward / skip / revisit / undo / redo, the overlay
/// and prediction checkboxes, the recent list's relabel menu and the queue order menu.
#[test]
fn gui_annotate_in_chinese_single_view_labels_by_chinese_buttons() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ds = dataset(tmp.path(), &[Some([0.7, 0.1, 0.1, 0.05, 0.05]), None, None, None]);
    let mut h = chinese_studio(tmp.path(), &ds, "");
    // The bar and the empty state.
    for l in ["数据集", "标注员", "队列", "▦ 网格视图"] {
        h.get_by_label(l);
    }
    h.get_by_value("未标注优先");
    h.get_by_label_contains("即可开始标注");
    // No annotator name: a Chinese error.
    h.get_by_label("打开数据集").click();
    h.step();
    h.step();
    assert_eq!(studio(&h).annotate.errors, ["请先输入标注员名称"]);
    h.get_by_label_contains("请先输入标注员名称");
    h.state_mut().as_mut().expect("studio").settings.annotate.annotator = "测试员".into();
    h.get_by_label("打开数据集").click();
    run_until(&mut h, "the first sample", Duration::from_secs(120), |s| {
        s.annotate.snapshot.as_ref().is_some_and(|snap| snap.current.is_some())
    });
    h.step();
    let first = studio(&h).annotate.snapshot.as_ref().and_then(|s| s.current.clone()).expect("current");
    h.get_by_label(&format!("样本 #{}", first.id));
    h.get_by_label_contains("测试员：本次已标注 0 个 · 已跳过 0 个");
    h.get_by_label_contains("共 4 个样本，4 个未标注");
    for l in ["最近 10 条标注", "商品", "没有商品图片", "深度（D）", "显著性（S）", "← 后退", "跳过（空格键）", "撤销（退格键）", "重做", "前进 →"] {
        h.get_by_label(l);
    }
    h.get_by_label_contains("按键：1-5 类别");
    // The overlay and the prediction checkboxes.
    h.get_by_label("深度（D）").click();
    h.step();
    assert!(studio(&h).annotate.show_depth, "the depth overlay by its Chinese checkbox");
    h.get_by_label("隐藏 RFNet 的预测").click();
    h.step();
    assert!(studio(&h).annotate.hide_prediction);
    // Label by the Chinese class buttons: stored by id under the annotator's name.
    click(&mut h, "1 可用");
    click(&mut h, "U 原图不合格");
    assert_eq!(counters(&h), (2, 0));
    let labels = mine(&ds, "测试员");
    assert_eq!(labels.len(), 2);
    assert_eq!(labels[0], (first.id, Decision::Class(0)));
    assert_eq!(labels[1].1, Decision::Unsuitable);
    // The recent list shows the decisions by their Chinese names.
    assert_eq!(h.query_all_by_value("可用").count(), 1);
    assert_eq!(h.query_all_by_value("原图不合格").count(), 1);
    // Back to the last one: its label in Chinese; forward again.
    click(&mut h, "← 后退");
    h.get_by_label("你的标签：原图不合格");
    click(&mut h, "前进 →");
    assert!(h.query_by_label("你的标签：原图不合格").is_none());
    // Skip the other two: the Chinese "nothing new left" heading and the revisit buttons.
    click(&mut h, "跳过（空格键）");
    click(&mut h, "跳过（空格键）");
    assert_eq!(counters(&h), (2, 2));
    h.get_by_label("此顺序下已没有新样本，但还有 2 个跳过的样本未标注。");
    h.get_by_label("已跳过 2 个——重新查看");
    click(&mut h, "重新查看跳过的 2 个样本");
    assert!(studio(&h).annotate.snapshot.as_ref().is_some_and(|s| s.current.is_some()));
    // Undo and redo by their Chinese buttons.
    click(&mut h, "2 空间不匹配");
    assert_eq!(counters(&h).0, 3);
    click(&mut h, "撤销（退格键）");
    assert_eq!(counters(&h).0, 2);
    click(&mut h, "重做");
    assert_eq!(counters(&h).0, 3);
    // Relabel the Unsuitable one through the recent list's menu (Chinese items).
    h.get_by_value("原图不合格").click();
    h.step();
    click(&mut h, "尺寸不匹配");
    let labels = mine(&ds, "测试员");
    assert_eq!(labels.len(), 3);
    assert!(!labels.iter().any(|(_, d)| *d == Decision::Unsuitable), "{labels:?}");
    assert_eq!(labels.iter().filter(|(_, d)| *d == Decision::Class(2)).count(), 1, "{labels:?}");
    assert_eq!(counters(&h).0, 3, "a relabel is not a new label");
    // The queue order by its Chinese name.
    h.get_by_value("未标注优先").click();
    h.step();
    click(&mut h, "随机");
    assert_eq!(studio(&h).settings.annotate.order, QueueOrder::Random);
    assert_eq!(studio(&h).annotate.snapshot.as_ref().map(|s| s.order), Some(QueueOrder::Random));
    h.get_by_value("随机");
    assert!(studio(&h).annotate.errors.is_empty(), "{:?}", studio(&h).annotate.errors);
}

/// The grid view in Chinese: page and decided counts, the cells' states, RFNet's prediction with
/// a Chinese class name, the grid's class and skip buttons, grouping by prediction and the page
/// buttons.
#[test]
fn gui_annotate_in_chinese_grid_view_labels_skips_groups_and_turns_pages() {
    let one = |k: usize, conf: f32| {
        let mut p = [(1.0 - conf) / 4.0; 5];
        p[k] = conf;
        Some(p)
    };
    let mut probs = vec![None; 40];
    probs[3] = one(0, 0.95);
    probs[5] = one(3, 0.8);
    let tmp = tempfile::tempdir().expect("tmp");
    let ds = dataset(tmp.path(), &probs);
    let mut h = chinese_studio(tmp.path(), &ds, "网格员");
    h.get_by_label("打开数据集").click();
    run_until(&mut h, "the first sample", Duration::from_secs(120), |s| {
        s.annotate.snapshot.as_ref().is_some_and(|snap| snap.current.is_some())
    });
    h.get_by_label("▦ 网格视图").click();
    run_until(&mut h, "the grid page", Duration::from_secs(60), |s| {
        s.annotate.pending == 0 && s.annotate.snapshot.as_ref().is_some_and(|x| x.grid.is_some())
    });
    h.step();
    let page = |h: &H| studio(h).annotate.snapshot.as_ref().and_then(|s| s.grid.clone()).expect("a grid page");
    let g = page(&h);
    let size = g.cells.len();
    assert!(size >= 4 && 40 > size, "a page of {size} cells");
    h.get_by_label("第 1 页");
    h.get_by_label(&format!("已处理 0 / {size}"));
    assert_eq!(h.query_all_by_label("未标注").count(), size);
    for l in ["◀ 上一页（P）", "下一页 ▶（N）", "隐藏 RFNet 的预测", "按 RFNet 的预测分组", "跳过（S）", "撤销（退格键）", "U 原图不合格"] {
        h.get_by_label(l);
    }
    h.get_by_label_contains("按键：方向键移动焦点");
    h.get_by_label("RFNet：可用 0.95");
    h.get_by_label("RFNet：模糊不清 0.80");
    // The grid's class button labels the focused cell (the first); skip the next.
    click(&mut h, "2 空间不匹配");
    assert_eq!(mine(&ds, "网格员"), vec![(g.cells[0].sample.id, Decision::Class(1))]);
    h.get_by_label("■ 空间不匹配");
    click(&mut h, "跳过（S）");
    h.get_by_label("已跳过");
    h.get_by_label(&format!("已处理 2 / {size}"));
    assert_eq!(h.query_all_by_label("未标注").count(), size - 2);
    assert_eq!(counters(&h), (1, 1));
    // Grouping by prediction: the order menu names it in Chinese; the most confident first.
    click(&mut h, "按 RFNet 的预测分组");
    run_until(&mut h, "the grouped page", Duration::from_secs(10), |s| {
        s.annotate.pending == 0 && s.annotate.snapshot.as_ref().is_some_and(|x| x.order == QueueOrder::Predicted)
    });
    h.step();
    h.get_by_value("按 RFNet 预测的类别分组");
    let titles: Vec<String> = page(&h).cells.iter().take(2).map(|c| c.sample.title.clone()).collect();
    assert_eq!(titles, ["zh 3", "zh 5"]);
    // Hiding the prediction hides it on every cell.
    h.get_by_label("隐藏 RFNet 的预测").click();
    h.step();
    h.step();
    assert_eq!(h.query_all_by_label_contains("RFNet：").count(), 0, "the prediction is hidden");
    // The page buttons.
    click(&mut h, "下一页 ▶（N）");
    assert_eq!(page(&h).number, 1);
    h.get_by_label("第 2 页");
    click(&mut h, "◀ 上一页（P）");
    assert_eq!(page(&h).number, 0);
    h.get_by_label("第 1 页");
    // Back to the single view.
    h.get_by_label("▦ 网格视图").click();
    run_until(&mut h, "the single view", Duration::from_secs(10), |s| {
        s.annotate.pending == 0 && s.annotate.snapshot.as_ref().is_some_and(|x| x.grid.is_none())
    });
    assert!(studio(&h).annotate.errors.is_empty(), "{:?}", studio(&h).annotate.errors);
}

//! The whole studio in Chinese, as drawn: every text on every tab (labels, buttons, values of
//! what the studio writes itself) is checked for English words. The catalog test proves every
//! key is translated; this one proves no text bypasses the catalogs.

use std::collections::BTreeSet;
use std::time::Duration;

use egui_kittest::kittest::{NodeT, Queryable};
use rfstudio::data::store::{NewSample, Source, Store};
use rfstudio::i18n::{Lang, tr_in};

use crate::common::root;
use crate::gui::{H, harness, png, run_until, tiny_settings, write_rfft_run};
use crate::i18n::english_words;

/// Every text on screen that holds English words, with those words. Text fields' contents are
/// the user's (prompts are English for SD's text encoder) and are left out; so are `data` words
/// (names of the user's files).
fn english_on_screen(h: &H, data: &BTreeSet<String>) -> BTreeSet<(String, Vec<String>)> {
    use egui::accesskit::Role;
    let mut out = BTreeSet::new();
    for node in h.query_all_by(|_| true) {
        let n = node.accesskit_node();
        let is_input = |r: Role| matches!(r, Role::TextInput | Role::MultilineTextInput | Role::SearchInput);
        // The text runs of a text field are its children: what the user typed, not interface.
        let mut typed = is_input(n.role());
        let mut up = n.parent();
        while let Some(p) = up {
            typed |= is_input(p.role());
            up = p.parent();
        }
        let texts = [n.label(), if typed { None } else { n.value() }];
        for text in texts.into_iter().flatten() {
            let text = without_role_keys(&text);
            let words: Vec<String> = english_words(&text).into_iter().filter(|w| !data.contains(w)).collect();
            if !words.is_empty() {
                out.insert((text, words));
            }
        }
    }
    out
}

/// `text` without the manifest's role keys in parentheses ("基础模型 (base)"): the keys are what
/// a user writes in `models.toml`, the same in every language.
fn without_role_keys(text: &str) -> String {
    let mut out = text.to_string();
    for role in rfstudio::models::manifest::Role::ALL {
        out = out.replace(&format!("({})", role.name()), "");
    }
    out
}

fn settle(h: &mut H) {
    for _ in 0..4 {
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn gui_studio_in_chinese_no_tab_shows_english_words() {
    let tmp = tempfile::tempdir().expect("tmp");
    // A dataset with a few samples (Chinese titles, as a user's catalogue has).
    let ds = tmp.path().join("ds");
    let store = Store::init(&ds).expect("init");
    std::fs::create_dir_all(tmp.path().join("imgs")).expect("mkdir");
    for i in 0..4u8 {
        let p = tmp.path().join("imgs").join(format!("{i}.png"));
        png(&p, i * 40);
        let s = NewSample {
            product_id: format!("prod{i}"),
            image: p,
            title: format!("不锈钢水壶 {i}"),
            ..NewSample::default()
        };
        store.add_sample(&s, Source::Imported).expect("add");
    }
    drop(store);
    // An RFFT run with curves and an eval grid.
    write_rfft_run(&tmp.path().join("runs").join("rfft-demo"), 1..8, &[5]);

    let mut settings = tiny_settings(tmp.path());
    settings.lang = Some(Lang::ZhCn);
    settings.annotate.dataset = ds.clone();
    settings.annotate.annotator = "标注员".into();
    // Names of the user's files are data, not interface: the sample products' names.
    let data: BTreeSet<String> = std::fs::read_dir(root().join("sample-data"))
        .expect("sample-data")
        .filter_map(|e| e.ok()?.path().file_stem().map(|s| s.to_string_lossy().into_owned()))
        .chain(["unet", "vae"].map(String::from)) // a diffusers folder's component folders
        .collect();
    let mut h = harness(settings);
    run_until(&mut h, "models and device", Duration::from_secs(60), |s| s.models.ready().is_ok());
    let mut found = Vec::new();

    // Generate, with a product placed.
    settle(&mut h);
    h.get_by_label("kettle").click();
    run_until(&mut h, "the placed product", Duration::from_secs(30), |s| {
        s.settings.generate.product.as_ref().is_some_and(|p| p.ends_with("kettle.png"))
    });
    settle(&mut h);
    found.extend(english_on_screen(&h, &data).into_iter().map(|t| ("generate", t)));

    // Annotate, with the dataset open.
    h.get_by_label(tr_in(Lang::ZhCn, "common.tab_annotate")).click();
    settle(&mut h);
    h.get_by_label(tr_in(Lang::ZhCn, "annotate.open_dataset")).click();
    run_until(&mut h, "the first sample", Duration::from_secs(120), |s| {
        s.annotate.snapshot.as_ref().is_some_and(|snap| snap.current.is_some())
    });
    settle(&mut h);
    found.extend(english_on_screen(&h, &data).into_iter().map(|t| ("annotate", t)));

    // Fine-tune, with the run's curves shown.
    h.get_by_label(tr_in(Lang::ZhCn, "common.tab_finetune")).click();
    run_until(&mut h, "the run list", Duration::from_secs(10), |s| !s.finetune.runs.is_empty());
    h.get_by_label_contains("rfft-demo").click();
    run_until(&mut h, "the run's curves", Duration::from_secs(10), |s| {
        s.finetune.run.as_ref().is_some_and(|r| r.points() == 7)
    });
    settle(&mut h);
    found.extend(english_on_screen(&h, &data).into_iter().map(|t| ("finetune", t)));

    // Models.
    h.get_by_label(tr_in(Lang::ZhCn, "common.tab_models")).click();
    run_until(&mut h, "the model check", Duration::from_secs(60), |s| {
        s.models.info.is_some() && !s.models.checking()
    });
    settle(&mut h);
    found.extend(english_on_screen(&h, &data).into_iter().map(|t| ("models", t)));

    assert!(
        found.is_empty(),
        "English on screen in the Chinese studio:\n{}",
        found.iter().map(|(tab, (text, words))| format!("  [{tab}] {words:?} in {text:?}")).collect::<Vec<_>>().join("\n")
    );
}

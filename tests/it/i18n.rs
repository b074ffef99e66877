//! The interface language: every key the code uses exists in English and Chinese, both files
//! hold the same keys with the same placeholders, and no English is left in the Chinese texts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rfstudio::i18n::{Lang, parse_catalog, placeholders};

use crate::common::root;

/// Words allowed in Chinese texts: names of products, formats, devices and keys a user types.
const ALLOWED: &[&str] = &[
    "rfstudio", "RFNet", "RFFT", "RF1M", "ControlNet", "LoRA", "Stable", "Diffusion", "SD", "PNG", "GPU", "CPU",
    "CUDA", "NCCL", "cuda", "wgpu", "vulkan", "cpu", "UI", "EMA", "KL", "CC", "Canny", "canny", "DPT", "BERT", "ResNet",
    "ImageNet", "Net", "torchvision", "safetensors", "diffusers", "burn", "JSON", "JSONL", "CSV", "Markdown", "Ctrl", "Enter", "Esc",
    "ID", "CFG", "DDIM", "PNDM", "LDM", "Xvfb", "SQLite", "PostgreSQL", "xdg", "open", "gui", "lr", "px", "ms",
    "Hugging", "Face", "info", "Fleiss", "Cohen", "kappa", "Top", "AUC", "fp", "bf", "KiB", "MiB", "GiB",
];

/// Every `tr!("section.key"...)` literal in the sources under `dir`.
fn used_keys(dir: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            used_keys(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).expect("read source");
        // Comments show the syntax with made-up keys.
        let text: String = source
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .flat_map(|l| [l, "\n"])
            .collect();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("tr!(") {
            // `tr!(`, not `include_str!(`.
            let whole_word = rest[..i].chars().next_back().is_none_or(|c| !c.is_alphanumeric() && c != '_');
            rest = &rest[i + 4..];
            if !whole_word {
                continue;
            }
            let trimmed = rest.trim_start();
            if let Some(lit) = trimmed.strip_prefix('"')
                && let Some(end) = lit.find('"')
            {
                let key = &lit[..end];
                out.entry(key.to_string()).or_insert_with(|| path.display().to_string());
            }
        }
    }
}

/// The English words left in a Chinese text (outside `{placeholders}`, `code spans`, paths,
/// file names and flags).
pub(crate) fn english_words(text: &str) -> Vec<String> {
    let mut cleaned = String::new();
    let mut in_code = false;
    let mut in_placeholder = false;
    for c in text.chars() {
        match c {
            '`' => in_code = !in_code,
            '{' => in_placeholder = true,
            '}' => in_placeholder = false,
            _ if in_code || in_placeholder => {}
            _ => cleaned.push(c),
        }
    }
    cleaned
        .split(|c: char| c.is_whitespace() || (!c.is_ascii() && !c.is_alphanumeric()) || "()[]·,;:!?\"'“”，。：；（）、".contains(c))
        .filter(|tok| !tok.is_empty())
        // Paths, file names, flags, identifiers: text a user types, not prose.
        .filter(|tok| !tok.contains(['/', '.', '_', '-', '=', '<', '>']))
        .flat_map(|tok| {
            tok.split(|c: char| !c.is_ascii_alphabetic())
                .filter(|w| w.len() >= 2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|w| !ALLOWED.contains(&w.as_str()))
        .collect()
}

#[test]
fn i18n_every_key_used_by_the_code_is_translated_and_no_english_is_left() {
    let en = parse_catalog(Lang::En).expect("English catalog parses");
    let zh = parse_catalog(Lang::ZhCn).expect("Chinese catalog parses");
    let mut used = BTreeMap::new();
    used_keys(&root().join("src"), &mut used);
    assert!(used.len() > 50, "only {} keys found: is the scan broken?", used.len());
    let mut problems = Vec::new();
    for (key, file) in &used {
        for (lang, cat) in [(Lang::En, &en), (Lang::ZhCn, &zh)] {
            if !cat.contains_key(key) {
                problems.push(format!("{file}: `{key}` missing in {lang}"));
            }
        }
    }
    let en_keys: BTreeSet<_> = en.keys().collect();
    let zh_keys: BTreeSet<_> = zh.keys().collect();
    for k in en_keys.symmetric_difference(&zh_keys) {
        problems.push(format!("`{k}` is in only one language"));
    }
    for k in en_keys.iter().filter(|k| !used.contains_key(k.as_str())) {
        problems.push(format!("`{k}` is translated but no code uses it"));
    }
    for (k, e) in &en {
        if let Some(z) = zh.get(k) {
            if placeholders(e) != placeholders(z) {
                problems.push(format!("`{k}`: placeholders differ: {:?} vs {:?}", placeholders(e), placeholders(z)));
            }
            let left = english_words(z);
            if !left.is_empty() {
                problems.push(format!("`{k}`: English left in Chinese text {z:?}: {left:?}"));
            }
            if !z.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)) && english_words(e).len() > 0 && z == e {
                problems.push(format!("`{k}`: Chinese text is the English one: {z:?}"));
            }
        }
    }
    assert!(problems.is_empty(), "{} translation problems:\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn i18n_the_models_help_is_translated_with_the_same_structure() {
    let en = std::fs::read_to_string(root().join("models/README.md")).expect("models/README.md");
    let zh = rfstudio::i18n::MODELS_README_ZH_CN;
    let shape = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with('#') || l.starts_with('|') || l.starts_with("```"))
            .map(|l| if l.starts_with('|') { format!("| x{}", l.matches('|').count()) } else { l.chars().take_while(|c| *c == '#' || *c == '`').collect() })
            .collect()
    };
    assert_eq!(shape(&en), shape(zh), "headings, tables and code blocks must match models/README.md");
    // Code blocks (paths, TOML, commands) are the same text in both.
    let code = |t: &str| t.split("```").skip(1).step_by(2).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(code(&en), code(zh));
}

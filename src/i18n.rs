//! Interface language: English and Simplified Chinese for the studio and the CLI's messages.
//!
//! Translations are plain TOML files under `ui-assets/i18n/<lang>/<section>.toml` (flat
//! `key = "text"` pairs), compiled into the binary so an installed studio never runs without
//! them. A key is `section.key` (`generate.start`). `{name}` in a text is filled by `tr!`'s
//! named arguments. Stored data (labels, run folders, JSON output) never depends on the language:
//! only what a person reads does.
//!
//! The language in effect is per thread first (the studio sets it at the start of every frame
//! from its settings, so two studios in one process — the tests — can differ), then the process
//! default (`set_default`, the CLI's `--lang` / `LANG`).

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

/// A language of the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Lang {
    #[default]
    #[serde(rename = "en")]
    En,
    #[serde(rename = "zh-CN")]
    ZhCn,
}

impl Lang {
    pub const ALL: [Lang; 2] = [Lang::En, Lang::ZhCn];

    /// The code used in file names and on the command line (`en`, `zh-CN`).
    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::ZhCn => "zh-CN",
        }
    }

    /// The language's name in itself (what a language menu shows).
    pub fn native_name(self) -> &'static str {
        match self {
            Lang::En => "English",
            Lang::ZhCn => "简体中文",
        }
    }

    /// Parse a language code or a POSIX locale (`zh`, `zh-CN`, `zh_CN.UTF-8`, `en_US`, `C`).
    /// Chinese of any region reads the Simplified Chinese texts (the only Chinese we ship).
    pub fn parse(s: &str) -> Option<Lang> {
        let s = s.trim();
        let base: String = s
            .split(['.', '@'])
            .next()
            .unwrap_or("")
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .flat_map(char::to_lowercase)
            .collect();
        match base.as_str() {
            "zh" => Some(Lang::ZhCn),
            "en" | "c" | "posix" => Some(Lang::En),
            _ => None,
        }
    }

    /// The language of the user's locale (`LC_ALL`, `LC_MESSAGES`, `LANG`, in POSIX order; the
    /// first one set decides), English when none names a language we ship.
    pub fn from_env() -> Lang {
        Self::from_locale_vars(|name| std::env::var(name).ok())
    }

    /// `from_env` over any variable source (tests).
    pub fn from_locale_vars(get: impl Fn(&str) -> Option<String>) -> Lang {
        ["LC_ALL", "LC_MESSAGES", "LANG"]
            .iter()
            .find_map(|v| get(v).filter(|s| !s.trim().is_empty()))
            .and_then(|s| Lang::parse(&s))
            .unwrap_or(Lang::En)
    }

    fn index(self) -> u8 {
        match self {
            Lang::En => 0,
            Lang::ZhCn => 1,
        }
    }

    fn from_index(i: u8) -> Lang {
        if i == 1 { Lang::ZhCn } else { Lang::En }
    }
}

impl std::fmt::Display for Lang {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// One translation file: its section (the key prefix) and its text in each language.
pub struct Section {
    pub name: &'static str,
    pub en: &'static str,
    pub zh_cn: &'static str,
}

macro_rules! section {
    ($name:literal) => {
        Section {
            name: $name,
            en: include_str!(concat!("../ui-assets/i18n/en/", $name, ".toml")),
            zh_cn: include_str!(concat!("../ui-assets/i18n/zh-CN/", $name, ".toml")),
        }
    };
}

/// Every translation file, compiled in.
pub const SECTIONS: &[Section] = &[
    section!("common"),
    section!("classes"),
    section!("generate"),
    section!("annotate"),
    section!("finetune"),
    section!("models"),
    section!("cli"),
    section!("device"),
];

/// The Models tab's instructions in Chinese (the English ones are the models folder's own
/// README.md, which a user may edit; this is its translation).
pub const MODELS_README_ZH_CN: &str = include_str!("../ui-assets/i18n/zh-CN/models-README.md");

/// A translation file that does not parse (found by the tests; at run time the key is shown).
#[derive(Debug, thiserror::Error)]
#[error("ui-assets/i18n/{lang}/{section}.toml: {message}")]
pub struct CatalogError {
    pub lang: Lang,
    pub section: &'static str,
    pub message: String,
}

/// All texts of one language, keyed `section.key`.
pub type Catalog = HashMap<String, String>;

/// Parse the compiled-in files of one language.
pub fn parse_catalog(lang: Lang) -> Result<Catalog, CatalogError> {
    let mut out = Catalog::new();
    for s in SECTIONS {
        let text = match lang {
            Lang::En => s.en,
            Lang::ZhCn => s.zh_cn,
        };
        let err = |message: String| CatalogError { lang, section: s.name, message };
        let table: toml::Table = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        for (k, v) in table {
            match v {
                toml::Value::String(t) => {
                    out.insert(format!("{}.{k}", s.name), t);
                }
                other => return Err(err(format!("`{k}` must be a string, found {}", other.type_str()))),
            }
        }
    }
    Ok(out)
}

static CATALOGS: LazyLock<[Catalog; 2]> = LazyLock::new(|| {
    Lang::ALL.map(|l| {
        parse_catalog(l).unwrap_or_else(|e| {
            tracing::error!("{e}");
            Catalog::new()
        })
    })
});

static DEFAULT: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static THREAD: Cell<Option<Lang>> = const { Cell::new(None) };
}

/// The process default (the CLI's `--lang`, or the locale).
pub fn set_default(lang: Lang) {
    DEFAULT.store(lang.index(), Ordering::Relaxed);
}

/// The language of this thread only (the studio, each frame).
pub fn set_thread(lang: Option<Lang>) {
    THREAD.with(|t| t.set(lang));
}

/// The language in effect on this thread.
pub fn current() -> Lang {
    THREAD
        .with(Cell::get)
        .unwrap_or_else(|| Lang::from_index(DEFAULT.load(Ordering::Relaxed)))
}

/// The text of `key` in `lang`: English where the language lacks it, the key itself where
/// English lacks it too (a test keeps both complete).
pub fn tr_in(lang: Lang, key: &'static str) -> &'static str {
    let cats = &*CATALOGS;
    cats[lang.index() as usize]
        .get(key)
        .or_else(|| cats[0].get(key))
        .map_or(key, String::as_str)
}

/// The text of `key` in the current language.
pub fn tr(key: &'static str) -> &'static str {
    tr_in(current(), key)
}

/// Fill `{name}` placeholders of `template` with `args` (`{{` and `}}` stay literal braces).
pub fn fill(template: &str, args: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if let Some(end) = tail.find('}').filter(|_| tail.starts_with('{')) {
            let name = &tail[1..end];
            match args.iter().find(|(n, _)| *n == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&tail[..=end]),
            }
            rest = &tail[end + 1..];
        } else {
            out.push_str(&tail[..1]);
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The names of a template's `{name}` placeholders (the tests check both languages agree).
pub fn placeholders(template: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = template.replace("{{", "").replace("}}", "");
    while let Some(i) = rest.find('{') {
        let tail = rest[i + 1..].to_string();
        match tail.find('}') {
            Some(end) => {
                names.push(tail[..end].to_string());
                rest = tail[end + 1..].to_string();
            }
            None => break,
        }
    }
    names.sort();
    names.dedup();
    names
}

/// `tr!("section.key")` is the text in the current language (`&'static str`);
/// `tr!("section.key", name = value, ...)` fills its `{name}` placeholders (`String`).
#[macro_export]
macro_rules! tr {
    ($key:literal) => {
        $crate::i18n::tr($key)
    };
    ($key:literal, $($name:ident = $value:expr),+ $(,)?) => {
        $crate::i18n::fill($crate::i18n::tr($key), &[$((stringify!($name), ($value).to_string())),+])
    };
}

/// A class's name in the current language (labels stay stored by id; this is only what is shown).
pub fn class_name(class: usize) -> &'static str {
    match class {
        0 => tr!("classes.available"),
        1 => tr!("classes.space_mismatch"),
        2 => tr!("classes.size_mismatch"),
        3 => tr!("classes.indistinctiveness"),
        4 => tr!("classes.shape_hallucination"),
        _ => "?",
    }
}

/// The name of the "Unsuitable" flag (a bad source image; not a class of the classifier).
pub fn unsuitable_name() -> &'static str {
    tr!("classes.unsuitable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locale_names_map_to_languages() {
        assert_eq!(Lang::parse("zh_CN.UTF-8"), Some(Lang::ZhCn));
        assert_eq!(Lang::parse("zh-CN"), Some(Lang::ZhCn));
        assert_eq!(Lang::parse("zh_TW"), Some(Lang::ZhCn));
        assert_eq!(Lang::parse("en_GB.UTF-8"), Some(Lang::En));
        assert_eq!(Lang::parse("C.UTF-8"), Some(Lang::En));
        assert_eq!(Lang::parse("de_DE"), None);
        let vars = |m: &'static [(&'static str, &'static str)]| move |k: &str| m.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        assert_eq!(Lang::from_locale_vars(vars(&[("LANG", "zh_CN.UTF-8")])), Lang::ZhCn);
        // LC_ALL outranks LANG; an empty variable does not count.
        assert_eq!(Lang::from_locale_vars(vars(&[("LC_ALL", "en_US"), ("LANG", "zh_CN")])), Lang::En);
        assert_eq!(Lang::from_locale_vars(vars(&[("LC_ALL", ""), ("LANG", "zh_CN")])), Lang::ZhCn);
        assert_eq!(Lang::from_locale_vars(vars(&[("LANG", "fr_FR")])), Lang::En);
    }

    #[test]
    fn fill_replaces_named_placeholders_only() {
        let args = [("n", "3".to_string()), ("of", "5".to_string())];
        assert_eq!(fill("attempt {n} of {of}", &args), "attempt 3 of 5");
        assert_eq!(fill("{{n}} {missing} {n}", &args), "{n} {missing} 3");
        assert_eq!(fill("第 {n} 次", &args), "第 3 次");
        assert_eq!(placeholders("{b} and {a} {b} {{x}}"), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn thread_language_outranks_the_default() {
        let other = std::thread::spawn(|| {
            set_thread(Some(Lang::ZhCn));
            tr!("classes.available")
        })
        .join()
        .expect("thread");
        assert_eq!(other, "可用");
        assert_eq!(tr_in(Lang::En, "classes.available"), "Available");
    }
}

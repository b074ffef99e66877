//! Fonts: the CJK font shipped in `ui-assets/` (WenQuanYi Micro Hei, Apache-2.0: every CJK
//! Unified Ideograph, simplified and traditional, Hangul, kana, CJK symbols and compatibility
//! forms) installed as a fallback after egui's default fonts, so Chinese and Korean titles and
//! prompts display and can be typed; then, when the system has one, a system CJK font for the
//! rarer characters (CJK Extension A and beyond, which GB18030 includes).

use std::sync::Arc;

use egui::{FontData, FontDefinitions, FontFamily};

pub const CJK_FONT_NAME: &str = "wqy-microhei";
const CJK_FONT: &[u8] = include_bytes!("../../ui-assets/wqy-microhei.ttf");
const SYSTEM_FONT_NAME: &str = "system-cjk";

/// System CJK fonts with Extension A coverage, the first one present is used.
const SYSTEM_CJK_FONTS: &[&str] = &[
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/source-han-sans/SourceHanSans-Regular.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Light.ttc",
    "C:\\Windows\\Fonts\\msyh.ttc",
    "C:\\Windows\\Fonts\\simsun.ttc",
];

/// egui's default fonts plus the CJK fallbacks in both families.
pub fn definitions() -> FontDefinitions {
    let mut fonts = FontDefinitions::default();
    fonts
        .font_data
        .insert(CJK_FONT_NAME.to_owned(), Arc::new(FontData::from_static(CJK_FONT)));
    let system = SYSTEM_CJK_FONTS.iter().find_map(|p| std::fs::read(p).ok());
    if let Some(bytes) = system {
        fonts.font_data.insert(SYSTEM_FONT_NAME.to_owned(), Arc::new(FontData::from_owned(bytes)));
    }
    for family in [FontFamily::Proportional, FontFamily::Monospace] {
        let list = fonts.families.entry(family).or_default();
        list.push(CJK_FONT_NAME.to_owned());
        if fonts.font_data.contains_key(SYSTEM_FONT_NAME) {
            list.push(SYSTEM_FONT_NAME.to_owned());
        }
    }
    fonts
}

/// Install the fonts and readable text sizes: body and button text 14 px, small text 12 px
/// (egui's defaults, 12.5 / 9 px, are hard to read for CJK titles).
pub fn install(ctx: &egui::Context) {
    ctx.set_fonts(definitions());
    ctx.all_styles_mut(|style| {
        use egui::{FontFamily::Proportional, FontId, TextStyle};
        style.text_styles.insert(TextStyle::Body, FontId::new(14.0, Proportional));
        style.text_styles.insert(TextStyle::Button, FontId::new(14.0, Proportional));
        style.text_styles.insert(TextStyle::Small, FontId::new(12.0, Proportional));
        style.text_styles.insert(TextStyle::Heading, FontId::new(20.0, Proportional));
    });
}

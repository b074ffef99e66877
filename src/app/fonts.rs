//! The CJK font shipped in `ui-assets/` (WenQuanYi Micro Hei subset, Apache-2.0): installed as a
//! fallback after egui's default fonts so Chinese titles and prompts display and can be typed.

use std::sync::Arc;

use egui::{FontData, FontDefinitions, FontFamily};

pub const CJK_FONT_NAME: &str = "wqy-microhei";
const CJK_FONT: &[u8] = include_bytes!("../../ui-assets/wqy-microhei-gb2312.ttf");

/// egui's default fonts plus the CJK fallback in both families.
pub fn definitions() -> FontDefinitions {
    let mut fonts = FontDefinitions::default();
    fonts
        .font_data
        .insert(CJK_FONT_NAME.to_owned(), Arc::new(FontData::from_static(CJK_FONT)));
    for family in [FontFamily::Proportional, FontFamily::Monospace] {
        fonts.families.entry(family).or_default().push(CJK_FONT_NAME.to_owned());
    }
    fonts
}

pub fn install(ctx: &egui::Context) {
    ctx.set_fonts(definitions());
}

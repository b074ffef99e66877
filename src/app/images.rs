//! Image decoding off the UI thread: a loader thread runs decode jobs and sends back
//! `ColorImage`s; the UI turns them into textures (a cheap upload) and caches them by key.
//! Prefetching is just asking early: the Annotate tab requests the next samples' images before
//! they are shown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};

use egui::{ColorImage, TextureHandle, TextureOptions};
use image::{GrayImage, RgbImage, RgbaImage};

use super::error::UiError;

/// A decode job: returns one or more keyed images.
pub type LoadJob = Box<dyn FnOnce() -> Vec<(String, Result<ColorImage, UiError>)> + Send>;

enum Entry {
    Pending,
    Ready(TextureHandle),
    Failed(String),
}

/// Textures by key, filled by the loader thread.
pub struct ImageCache {
    jobs: Sender<LoadJob>,
    done: Receiver<Vec<(String, Result<ColorImage, UiError>)>>,
    entries: HashMap<String, Entry>,
    /// Insertion order, for evicting the oldest entries.
    order: Vec<String>,
    ctx: egui::Context,
}

/// How many textures to keep (about 1 MB each at 512x512).
const CAPACITY: usize = 256;

impl ImageCache {
    pub fn new(ctx: &egui::Context) -> Self {
        let (jobs, job_rx) = channel::<LoadJob>();
        let (done_tx, done) = channel();
        let wake = ctx.clone();
        std::thread::Builder::new()
            .name("rfstudio-image-loader".into())
            .spawn(move || {
                while let Ok(job) = job_rx.recv() {
                    if done_tx.send(job()).is_err() {
                        break;
                    }
                    wake.request_repaint();
                }
            })
            .ok();
        Self {
            jobs,
            done,
            entries: HashMap::new(),
            order: Vec::new(),
            ctx: ctx.clone(),
        }
    }

    /// Move finished decodes into textures. Call once per frame.
    pub fn poll(&mut self) {
        while let Ok(batch) = self.done.try_recv() {
            for (key, result) in batch {
                let entry = match result {
                    Ok(img) => Entry::Ready(self.ctx.load_texture(&key, img, TextureOptions::LINEAR)),
                    Err(e) => Entry::Failed(e.shown()),
                };
                if !self.entries.contains_key(&key) {
                    self.order.push(key.clone());
                }
                self.entries.insert(key, entry);
            }
        }
        if self.order.len() > CAPACITY {
            let drop: Vec<String> = self.order.drain(..self.order.len() - CAPACITY).collect();
            for k in drop {
                self.entries.remove(&k);
            }
        }
    }

    /// Queue a job unless its key is known (pending, ready or failed).
    pub fn request(&mut self, key: &str, job: impl FnOnce() -> Vec<(String, Result<ColorImage, UiError>)> + Send + 'static) {
        if self.entries.contains_key(key) {
            return;
        }
        self.entries.insert(key.to_string(), Entry::Pending);
        self.order.push(key.to_string());
        if self.jobs.send(Box::new(job)).is_err() {
            self.entries.insert(key.to_string(), Entry::Failed(UiError::LoaderStopped.to_string()));
        }
    }

    /// Request a depth (`depth`) or saliency overlay of `image` with its map at `map`, computed on
    /// the loader thread; returns the key to show.
    pub fn request_overlay(&mut self, image: PathBuf, map: PathBuf, depth: bool) -> String {
        let kind = if depth { "depth" } else { "saliency" };
        let key = format!("overlay:{kind}:{}", image.display());
        let k = key.clone();
        self.request(&key, move || {
            let r = (|| -> Result<ColorImage, UiError> {
                let open = crate::pipeline::image_io::open_image;
                let img = open(&image)?.to_rgb8();
                let m = open(&map)?.to_luma8();
                let m = image::imageops::resize(&m, img.width(), img.height(), image::imageops::FilterType::Triangle);
                let overlay = if depth {
                    crate::pipeline::overlay::depth_overlay(&img, &m)
                } else {
                    crate::pipeline::overlay::saliency_overlay(&img, &m)
                };
                Ok(rgb_to_color(&overlay))
            })();
            vec![(k, r)]
        });
        key
    }

    /// Queue decoding a file (keyed by its path).
    pub fn request_file(&mut self, path: &Path) -> String {
        let key = file_key(path);
        let p = path.to_path_buf();
        let k = key.clone();
        self.request(&key, move || vec![(k, load_file(&p))]);
        key
    }

    /// Queue decoding a file shrunk to fit `side` x `side` on the loader thread (grid cells and
    /// lists hold many images; full-size textures would crowd the cache and the GPU).
    pub fn request_thumbnail(&mut self, path: &Path, side: u32) -> String {
        let key = thumbnail_key(path, side);
        let p = path.to_path_buf();
        let k = key.clone();
        self.request(&key, move || {
            let r = (|| -> Result<ColorImage, UiError> {
                let img = crate::pipeline::image_io::open_image(&p)?.to_rgba8();
                let (w, h) = (img.width(), img.height());
                let s = (side.max(1) as f32 / w.max(h).max(1) as f32).min(1.0);
                let (tw, th) = (((w as f32 * s).round() as u32).max(1), ((h as f32 * s).round() as u32).max(1));
                let small = if (tw, th) == (w, h) { img } else { image::imageops::thumbnail(&img, tw, th) };
                Ok(rgba_to_color(&small))
            })();
            vec![(k, r)]
        });
        key
    }

    pub fn texture(&self, key: &str) -> Option<&TextureHandle> {
        match self.entries.get(key) {
            Some(Entry::Ready(t)) => Some(t),
            _ => None,
        }
    }

    pub fn error(&self, key: &str) -> Option<&str> {
        match self.entries.get(key) {
            Some(Entry::Failed(e)) => Some(e),
            _ => None,
        }
    }

    pub fn is_pending(&self, key: &str) -> bool {
        matches!(self.entries.get(key), Some(Entry::Pending))
    }

    /// Forget a key (its file changed).
    pub fn forget(&mut self, key: &str) {
        self.entries.remove(key);
        self.order.retain(|k| k != key);
    }

    /// Put an image decoded elsewhere (e.g. a latent preview from a worker message).
    pub fn put(&mut self, key: &str, img: ColorImage) {
        let tex = self.ctx.load_texture(key, img, TextureOptions::NEAREST);
        if !self.entries.contains_key(key) {
            self.order.push(key.to_string());
        }
        self.entries.insert(key.to_string(), Entry::Ready(tex));
    }
}

pub fn file_key(path: &Path) -> String {
    format!("file:{}", path.display())
}

/// The cache key of a file's thumbnail of at most `side` pixels a side.
pub fn thumbnail_key(path: &Path, side: u32) -> String {
    format!("thumb:{side}:{}", path.display())
}

pub fn load_file(path: &Path) -> Result<ColorImage, UiError> {
    let img = crate::pipeline::image_io::open_image(path)?;
    Ok(rgba_to_color(&img.to_rgba8()))
}

pub fn rgba_to_color(img: &RgbaImage) -> ColorImage {
    ColorImage::from_rgba_unmultiplied([img.width() as usize, img.height() as usize], img.as_raw())
}

pub fn rgb_to_color(img: &RgbImage) -> ColorImage {
    ColorImage::from_rgb([img.width() as usize, img.height() as usize], img.as_raw())
}

pub fn gray_to_color(img: &GrayImage) -> ColorImage {
    let rgb: Vec<u8> = img.as_raw().iter().flat_map(|&v| [v, v, v]).collect();
    ColorImage::from_rgb([img.width() as usize, img.height() as usize], &rgb)
}

/// Draw a texture scaled to fit `max` (keeping its aspect ratio).
pub fn show_texture(ui: &mut egui::Ui, tex: &TextureHandle, max: egui::Vec2) -> egui::Response {
    let size = tex.size_vec2();
    let s = (max.x / size.x).min(max.y / size.y);
    ui.add(egui::Image::new(egui::load::SizedTexture::new(tex.id(), size * s)))
}

/// Draw an image by key, or a placeholder of the same footprint while it loads / when it failed.
pub fn show_key(ui: &mut egui::Ui, cache: &ImageCache, key: &str, max: egui::Vec2) -> egui::Response {
    if let Some(t) = cache.texture(key) {
        return show_texture(ui, t, max);
    }
    let (rect, resp) = ui.allocate_exact_size(max, egui::Sense::hover());
    ui.painter().rect_filled(rect, 4.0, ui.visuals().faint_bg_color);
    if let Some(e) = cache.error(key) {
        // An icon; the text is the tooltip (long messages painted over a small placeholder
        // overlap and cannot be read).
        ui.painter().text(
            rect.center(),
            egui::Align2::CENTER_CENTER,
            "⚠",
            egui::FontId::proportional(28.0),
            ui.visuals().error_fg_color,
        );
        let e = super::common::for_studio(e);
        return resp.on_hover_text(e);
    } else if cache.is_pending(key) {
        ui.painter().text(
            rect.center(),
            egui::Align2::CENTER_CENTER,
            crate::tr!("generate.loading"),
            egui::FontId::proportional(12.0),
            ui.visuals().weak_text_color(),
        );
    }
    resp
}

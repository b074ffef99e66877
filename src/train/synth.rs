//! `rfstudio synth`: procedurally composed ad images with controlled, labelled defects, to prove
//! that RFNet training works and for demos — never to report real-world accuracy.
//!
//! Each sample places a sample-data product (with a per-variant hue shift and aspect stretch, so
//! there are many "products" to split by) in a simple room (wall, floor, a reference cabinet):
//!
//! | class | how it is made |
//! |---|---|
//! | 0 Available | plausible scale, standing on the floor with a contact shadow, contrasting background |
//! | 1 Space Mismatch | the product floats well above the floor; its shadow stays on the floor, detached |
//! | 2 Size Mismatch | the product is implausibly small or large against the cabinet |
//! | 3 Indistinctiveness | wall and floor take the product's own colour and texture |
//! | 4 Shape Hallucination | the background continues the product's outline (a shifted copy of its silhouette in a similar colour) |
//!
//! Depth and saliency come from documented stand-ins, marked in every record
//! (`depth_source`, `saliency_source`): depth from the scene geometry (far wall, floor getting
//! nearer towards the bottom, product at its contact depth) and saliency from colour contrast
//! against the background. (Running the installed DPT and U2-Net instead is not wired in yet.)

use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::files::write_atomic;
use crate::pipeline::output::{save_gray, save_rgb};
use crate::pipeline::product::{load_rgba, resize_area};
use crate::pipeline::score::CLASS_NAMES;

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{0}")]
    Io(String),
    #[error("no products found in {0} (expected products.jsonl with transparent PNGs)")]
    NoProducts(String),
}

/// One record of `samples.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SynthRecord {
    pub id: String,
    pub product_id: String,
    /// Files relative to the dataset folder.
    pub image: String,
    pub product: String,
    pub depth: String,
    pub saliency: String,
    pub title: String,
    pub label: u8,
    pub label_name: String,
    pub depth_source: String,
    pub saliency_source: String,
}

pub const DEPTH_STAND_IN: &str = "stand-in: synthetic scene geometry (not DPT)";
pub const SALIENCY_STAND_IN: &str = "stand-in: colour contrast to the local background (not U2-Net)";

struct Product {
    name: String,
    title: String,
    rgba: RgbaImage,
}

fn load_products(dir: &Path) -> Result<Vec<Product>, SynthError> {
    let list = dir.join("products.jsonl");
    let text = std::fs::read_to_string(&list).map_err(|_| SynthError::NoProducts(dir.display().to_string()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| SynthError::Io(format!("{}: {e}", list.display())))?;
        let Some(file) = v["image"].as_str() else { continue };
        let rgba = load_rgba(&dir.join(file), false).map_err(|e| SynthError::Io(e.to_string()))?;
        out.push(Product {
            name: v["id"].as_str().unwrap_or(file).to_string(),
            title: v["title_zh"].as_str().or(v["title_en"].as_str()).unwrap_or_default().to_string(),
            rgba,
        });
    }
    if out.is_empty() {
        return Err(SynthError::NoProducts(dir.display().to_string()));
    }
    Ok(out)
}

/// Rotate the hue of a colour by `turns` (0..1) in a cheap YIQ rotation.
fn hue_shift(p: [u8; 3], turns: f32) -> [u8; 3] {
    let (r, g, b) = (p[0] as f32, p[1] as f32, p[2] as f32);
    let y = 0.299 * r + 0.587 * g + 0.114 * b;
    let i = 0.596 * r - 0.274 * g - 0.322 * b;
    let q = 0.211 * r - 0.523 * g + 0.312 * b;
    let a = turns * std::f32::consts::TAU;
    let (i2, q2) = (i * a.cos() - q * a.sin(), i * a.sin() + q * a.cos());
    let c = |v: f32| v.round().clamp(0.0, 255.0) as u8;
    [c(y + 0.956 * i2 + 0.621 * q2), c(y - 0.272 * i2 - 0.647 * q2), c(y - 1.106 * i2 + 1.703 * q2)]
}

/// The product variant: hue shift and aspect stretch, cropped to its alpha box.
fn variant(p: &Product, k: usize) -> RgbaImage {
    let turns = k as f32 * 0.137 % 1.0;
    let stretch = 0.8 + 0.4 * ((k * 7 % 10) as f32 / 10.0);
    let mut img = p.rgba.clone();
    for px in img.pixels_mut() {
        let [r, g, b] = hue_shift([px[0], px[1], px[2]], turns);
        *px = Rgba([r, g, b, px[3]]);
    }
    let (w, h) = img.dimensions();
    let nw = ((w as f32 * stretch).round() as u32).max(1);
    resize_area(&img, nw, h)
}

fn lerp(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [0, 1, 2].map(|c| a[c] + (b[c] - a[c]) * t)
}

fn mean_colour(img: &RgbaImage) -> [f32; 3] {
    let mut s = [0f64; 3];
    let mut n = 0f64;
    for p in img.pixels().filter(|p| p[3] > 128) {
        for c in 0..3 {
            s[c] += p[c] as f64;
        }
        n += 1.0;
    }
    s.map(|v| (v / n.max(1.0)) as f32)
}

/// Generate `n` samples into `out` (images/, samples.jsonl). Returns the records.
pub fn generate(
    products_dir: &Path,
    out: &Path,
    n: usize,
    size: u32,
    variants: usize,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<SynthRecord>, SynthError> {
    let products = load_products(products_dir)?;
    let images = out.join("images");
    std::fs::create_dir_all(&images).map_err(|e| SynthError::Io(format!("{}: {e}", images.display())))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut records = Vec::with_capacity(n);
    // Each (product, variant) is recoloured and pre-shrunk once (to twice the canvas at most).
    let mut variants_cache: std::collections::HashMap<(usize, usize), RgbaImage> = std::collections::HashMap::new();
    let io = |e: crate::pipeline::output::OutputError| SynthError::Io(e.to_string());
    for i in 0..n {
        let label = (i % 5) as u8;
        let pi = rng.random_range(0..products.len());
        let k = rng.random_range(0..variants.max(1));
        let product = &products[pi];
        let prod = variants_cache.entry((pi, k)).or_insert_with(|| {
            let v = variant(product, k);
            let (w, h) = v.dimensions();
            let f = (2.0 * size as f32 / w.max(h) as f32).min(1.0);
            resize_area(&v, ((w as f32 * f).round() as u32).max(1), ((h as f32 * f).round() as u32).max(1))
        });
        let sample = compose(prod, label, size, &mut rng);
        let id = format!("{i:06}");
        let rel = |suffix: &str| format!("images/{id}_{suffix}.png");
        save_rgb(&out.join(rel("gen")), &sample.image, &[("rfstudio-synth", CLASS_NAMES[label as usize])]).map_err(io)?;
        save_rgb(&out.join(rel("product")), &sample.product, &[]).map_err(io)?;
        save_gray(&out.join(rel("depth")), &sample.depth).map_err(io)?;
        save_gray(&out.join(rel("saliency")), &sample.saliency).map_err(io)?;
        records.push(SynthRecord {
            id: id.clone(),
            product_id: format!("{}-v{k}", product.name),
            image: rel("gen"),
            product: rel("product"),
            depth: rel("depth"),
            saliency: rel("saliency"),
            title: product.title.clone(),
            label,
            label_name: CLASS_NAMES[label as usize].to_string(),
            depth_source: DEPTH_STAND_IN.into(),
            saliency_source: SALIENCY_STAND_IN.into(),
        });
        if i % 50 == 0 || i + 1 == n {
            progress(i + 1, n);
        }
    }
    let mut text = String::new();
    for r in &records {
        text.push_str(&serde_json::to_string(r).map_err(|e| SynthError::Io(e.to_string()))?);
        text.push('\n');
    }
    write_atomic(&out.join("samples.jsonl"), text.as_bytes()).map_err(|e| SynthError::Io(e.to_string()))?;
    Ok(records)
}

struct Composed {
    image: RgbImage,
    product: RgbImage,
    depth: GrayImage,
    saliency: GrayImage,
}

fn compose(prod: &RgbaImage, label: u8, size: u32, rng: &mut impl Rng) -> Composed {
    let s = size as f32;
    let horizon = (s * rng.random_range(0.55..0.7)) as u32;
    let pc = mean_colour(prod);
    // 1. room colours: contrasting with the product, or (Indistinctiveness) the product's own
    let contrast = |c: f32| if c > 128.0 { c - 110.0 } else { c + 110.0 };
    let (wall, floor, texture) = if label == 3 {
        (pc, lerp(pc, [0.0; 3], 0.12), 18.0)
    } else {
        let base = [contrast(pc[0]), contrast(pc[1]), contrast(pc[2])];
        let jitter = |c: f32, r: &mut dyn FnMut() -> f32| (c + r()).clamp(0.0, 255.0);
        let mut j = || rng.random_range(-25.0..25.0);
        let wall = [jitter(base[0], &mut j), jitter(base[1], &mut j), jitter(base[2], &mut j)];
        (wall, lerp(wall, [40.0, 30.0, 20.0], 0.45), 4.0)
    };
    let mut image = RgbImage::from_fn(size, size, |_, y| {
        let c = if y < horizon { lerp(wall, [255.0; 3], 0.1 * y as f32 / s) } else { floor };
        Rgb(c.map(|v| v.round().clamp(0.0, 255.0) as u8))
    });
    for p in image.pixels_mut() {
        let n: f32 = rng.random_range(-texture..texture);
        *p = Rgb(p.0.map(|v| (v as f32 + n).round().clamp(0.0, 255.0) as u8));
    }
    // 2. a reference cabinet standing on the floor (fixes the plausible scale)
    let cab_h = (s * 0.45) as u32;
    let cab_w = (s * 0.2) as u32;
    let left_side = rng.random_bool(0.5);
    let cab_x = if left_side { (s * 0.04) as u32 } else { size - cab_w - (s * 0.04) as u32 };
    let cab_c = lerp(floor, [90.0, 60.0, 40.0], 0.6);
    for y in horizon.saturating_sub(cab_h)..(horizon + 2).min(size) {
        for x in cab_x..(cab_x + cab_w).min(size) {
            image.put_pixel(x, y, Rgb(cab_c.map(|v| v as u8)));
        }
    }
    // 3. product scale and position
    let normal = rng.random_range(0.42..0.6);
    let scale = match label {
        2 => {
            if rng.random_bool(0.5) {
                rng.random_range(0.1..0.16)
            } else {
                rng.random_range(0.88..0.98)
            }
        }
        _ => normal,
    };
    let (pw, ph) = prod.dimensions();
    let f = (scale * s) / pw.max(ph) as f32;
    let nw = ((pw as f32 * f).round() as u32).clamp(2, size);
    let nh = ((ph as f32 * f).round() as u32).clamp(2, size);
    let placed = resize_area(prod, nw, nh);
    let cx = if left_side { s * 0.62 } else { s * 0.38 };
    let x0 = (cx - nw as f32 / 2.0).round().clamp(0.0, (size - nw) as f32) as u32;
    let floor_y = (horizon as f32 + (s - horizon as f32) * rng.random_range(0.35..0.6)).min(s - 1.0);
    let lift = if label == 1 { s * rng.random_range(0.22..0.32) } else { 0.0 };
    let bottom = (floor_y - lift).max(nh as f32);
    let y0 = (bottom - nh as f32).round().clamp(0.0, (size - nh) as f32) as u32;
    // 4. contact shadow on the floor (detached from a floating product)
    let shadow_w = nw as f32 * 0.55;
    let shadow_h = (nh as f32 * 0.08).max(2.0);
    let scx = x0 as f32 + nw as f32 / 2.0;
    for y in 0..size {
        for x in 0..size {
            let dx = (x as f32 - scx) / shadow_w;
            let dy = (y as f32 - floor_y) / shadow_h;
            let d = dx * dx + dy * dy;
            if d < 1.0 {
                let p = image.get_pixel_mut(x, y);
                let k = 0.55 + 0.45 * d;
                *p = Rgb(p.0.map(|v| (v as f32 * k) as u8));
            }
        }
    }
    // 5. Shape Hallucination: the product's silhouette continues into the background
    if label == 4 {
        let c = lerp(pc, [0.0; 3], 0.15);
        let below = rng.random_bool(0.5);
        for (x, y, p) in placed.enumerate_pixels() {
            if p[3] < 128 {
                continue;
            }
            let (tx, ty) = if below {
                (x0 + x, y0 as i64 + y as i64 + (nh as f32 * 0.45) as i64)
            } else {
                (x0 + x + (nw as f32 * 0.55) as u32, y0 as i64 + y as i64)
            };
            if ty >= 0 && (ty as u32) < size && tx < size {
                image.put_pixel(tx, ty as u32, Rgb(c.map(|v| v as u8)));
            }
        }
    }
    // 6. paste the product
    let mut alpha = GrayImage::new(size, size);
    for (x, y, p) in placed.enumerate_pixels() {
        let (tx, ty) = (x0 + x, y0 + y);
        if tx >= size || ty >= size {
            continue;
        }
        let a = p[3] as f32 / 255.0;
        let bg = image.get_pixel(tx, ty).0;
        image.put_pixel(tx, ty, Rgb([0, 1, 2].map(|c| (a * p[c] as f32 + (1.0 - a) * bg[c] as f32).round() as u8)));
        alpha.put_pixel(tx, ty, Luma([p[3]]));
    }
    // 7. the product image RFNet sees (I_o): the placed product on white
    let product = RgbImage::from_fn(size, size, |x, y| {
        let a = alpha.get_pixel(x, y)[0] as f32 / 255.0;
        let src = if x >= x0 && y >= y0 && x - x0 < nw && y - y0 < nh { placed.get_pixel(x - x0, y - y0).0 } else { [255; 4] };
        Rgb([0, 1, 2].map(|c| (a * src[c] as f32 + (1.0 - a) * 255.0).round() as u8))
    });
    // 8. stand-in depth (geometry) and saliency (contrast)
    let contact = floor_y / s;
    let depth = GrayImage::from_fn(size, size, |x, y| {
        let a = alpha.get_pixel(x, y)[0];
        let v = if a > 128 {
            0.35 + 0.6 * contact
        } else if y < horizon {
            0.15 + 0.05 * (y as f32 / s)
        } else {
            0.3 + 0.65 * (y as f32 / s)
        };
        Luma([(v.clamp(0.0, 1.0) * 255.0) as u8])
    });
    let mut sal = vec![0f32; (size * size) as usize];
    let bg_mean = {
        let mut acc = [0f64; 3];
        let mut n = 0.0;
        for (x, y, p) in image.enumerate_pixels() {
            if alpha.get_pixel(x, y)[0] < 16 {
                for c in 0..3 {
                    acc[c] += p[c] as f64;
                }
                n += 1.0;
            }
        }
        acc.map(|v| (v / f64::max(n, 1.0)) as f32)
    };
    for (x, y, p) in image.enumerate_pixels() {
        let d: f32 = (0..3).map(|c| (p[c] as f32 - bg_mean[c]).abs()).sum::<f32>() / (3.0 * 255.0);
        sal[(y * size + x) as usize] = d;
    }
    let max = sal.iter().copied().fold(1e-6, f32::max);
    let saliency = GrayImage::from_fn(size, size, |x, y| Luma([(sal[(y * size + x) as usize] / max * 255.0) as u8]));
    let saliency = image::imageops::blur(&saliency, size as f32 / 64.0);
    Composed {
        image,
        product,
        depth,
        saliency,
    }
}

/// Read a synthetic dataset's records.
pub fn read_records(dir: &Path) -> Result<Vec<SynthRecord>, SynthError> {
    let path: PathBuf = dir.join("samples.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| SynthError::Io(format!("{}: {e}", path.display())))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| SynthError::Io(format!("{}:{}: {e}", path.display(), i + 1))))
        .collect()
}

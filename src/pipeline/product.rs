//! Product ingest and placement (PAPER.md "Generation", the reference code's defaults):
//! load a PNG/WebP with alpha, crop to the alpha bounding box, resize (area filter) to fit
//! `scale` x the canvas keeping the aspect ratio, centre it (or put its centre at `position`),
//! build the inpainting mask (255 - alpha, dilated by a 20x20 kernel), its latent-resolution
//! version, and the Canny control image (thresholds 100/200, background black, 3 channels).

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};

use super::image_io::rgb_to_tensor;

/// Products with more pixels than this are downscaled on load (area filter, aspect kept); the
/// placed product is at most the canvas (2048 px) anyway.
pub const MAX_PIXELS: u64 = 64_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ProductError {
    #[error(transparent)]
    Read(#[from] super::image_io::ImageReadError),
    #[error(
        "{path}: the image has no alpha channel, so the product cannot be cut out; export it as a PNG/WebP with transparency, or pass --white-bg to treat pure white as background"
    )]
    NoAlpha { path: PathBuf },
    #[error("{path}: every pixel is fully transparent (alpha 0): there is no product to place")]
    EmptyAlpha { path: PathBuf },
    #[error(
        "{path}: the alpha channel is fully opaque, so it does not separate product from background; cut the product out, or pass --white-bg to treat near-white as background"
    )]
    OpaqueAlpha { path: PathBuf },
    #[error("invalid placement: {0}")]
    Placement(String),
}

/// How to place the product on the canvas.
#[derive(Clone, Debug)]
pub struct Placement {
    /// Canvas side in pixels (512 for SD 1.5).
    pub canvas: u32,
    /// The product fits inside `scale * canvas` on both sides (0.7 by default).
    pub scale: f32,
    /// The product's centre as fractions of the canvas (0.5, 0.5 = centred).
    pub position: (f32, f32),
    /// Treat near-white pixels (all channels >= 250) as background when there is no usable alpha.
    pub white_bg: bool,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            canvas: 512,
            scale: 0.7,
            position: (0.5, 0.5),
            white_bg: false,
        }
    }
}

/// The inpainting mask's dilation kernel (the reference code's 20x20).
pub const DILATE_KERNEL: u32 = 20;

/// A product placed on the canvas, with everything generation needs.
#[derive(Clone, Debug)]
pub struct PlacedProduct {
    pub source: PathBuf,
    /// The product on a transparent canvas (canvas x canvas).
    pub rgba: RgbaImage,
    /// 255 where the background is generated, dilated 20x20 into the product (M_inpaint).
    pub inpaint_mask: GrayImage,
    /// Canny edges of the placed product, background black, as RGB.
    pub control: RgbImage,
    /// The product's box on the canvas: x, y, width, height.
    pub bbox: (u32, u32, u32, u32),
}

/// Read a product image with alpha (EXIF orientation applied, bounded decoding; see
/// `image_io`), downscaling products over `MAX_PIXELS`. Without usable alpha, `white_bg` turns
/// near-white pixels into background. Semi-transparent products (glass) are fine: only an image
/// with no visible pixel at all is refused.
pub fn load_rgba(path: &Path, white_bg: bool) -> Result<RgbaImage, ProductError> {
    let img = super::image_io::open_image(path)?;
    let has_alpha = img.color().has_alpha();
    let mut rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let pixels = w as u64 * h as u64;
    if pixels > MAX_PIXELS {
        let f = (MAX_PIXELS as f64 / pixels as f64).sqrt();
        let (nw, nh) = (((w as f64 * f) as u32).max(1), ((h as f64 * f) as u32).max(1));
        tracing::info!("{}: {w}x{h} product downscaled to {nw}x{nh} on load", path.display());
        rgba = resize_area(&rgba, nw, nh);
    }
    let opaque = rgba.pixels().all(|p| p[3] == 255);
    if !has_alpha || opaque {
        if !white_bg {
            return Err(if has_alpha {
                ProductError::OpaqueAlpha {
                    path: path.to_path_buf(),
                }
            } else {
                ProductError::NoAlpha {
                    path: path.to_path_buf(),
                }
            });
        }
        for p in rgba.pixels_mut() {
            if p[0] >= 250 && p[1] >= 250 && p[2] >= 250 {
                p[3] = 0;
            }
        }
    }
    let max_alpha = rgba.pixels().map(|p| p[3]).max().unwrap_or(0);
    if max_alpha == 0 {
        return Err(ProductError::EmptyAlpha {
            path: path.to_path_buf(),
        });
    }
    if max_alpha < 128 {
        tracing::warn!(
            "{}: the product is semi-transparent everywhere (alpha at most {max_alpha}/255); its outline is taken at alpha >= {}",
            path.display(),
            outline_threshold(max_alpha)
        );
    }
    Ok(rgba)
}

/// The alpha at which a pixel counts as product for the bounding box and the Canny image: the
/// reference code's 0.5 (128), or half the image's highest alpha for a product that is
/// semi-transparent everywhere (glass), so that such a product still has an outline.
pub fn outline_threshold(max_alpha: u8) -> u8 {
    128u8.min(max_alpha.div_ceil(2)).max(1)
}

/// Bounding box of pixels with alpha >= `threshold` (the reference's `alpha >= 0.5`, see
/// `outline_threshold`).
fn alpha_bbox(img: &RgbaImage, threshold: u8) -> Option<(u32, u32, u32, u32)> {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if p[3] >= threshold {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
    }
    (x0 != u32::MAX).then(|| (x0, y0, x1 - x0 + 1, y1 - y0 + 1))
}

/// Resize premultiplied RGBA: exact area averaging when shrinking (OpenCV's INTER_AREA), bilinear
/// when enlarging.
pub fn resize_area(img: &RgbaImage, w: u32, h: u32) -> RgbaImage {
    let (sw, sh) = img.dimensions();
    if w >= sw && h >= sh {
        let pre = premultiply(img);
        let up = image::imageops::resize(&pre, w, h, image::imageops::FilterType::Triangle);
        return unpremultiply(&up);
    }
    let pre: Vec<[f32; 4]> = img
        .pixels()
        .map(|p| {
            let a = p[3] as f32 / 255.0;
            [p[0] as f32 * a, p[1] as f32 * a, p[2] as f32 * a, p[3] as f32]
        })
        .collect();
    let fx = sw as f64 / w as f64;
    let fy = sh as f64 / h as f64;
    let mut out = RgbaImage::new(w, h);
    for oy in 0..h {
        let y_start = oy as f64 * fy;
        let y_end = (oy as f64 + 1.0) * fy;
        for ox in 0..w {
            let x_start = ox as f64 * fx;
            let x_end = (ox as f64 + 1.0) * fx;
            let mut acc = [0f64; 4];
            let mut area = 0f64;
            let mut sy = y_start.floor() as u32;
            while (sy as f64) < y_end && sy < sh {
                let wy = (y_end.min(sy as f64 + 1.0) - y_start.max(sy as f64)).max(0.0);
                let mut sx = x_start.floor() as u32;
                while (sx as f64) < x_end && sx < sw {
                    let wx = (x_end.min(sx as f64 + 1.0) - x_start.max(sx as f64)).max(0.0);
                    let wgt = wx * wy;
                    let p = pre[(sy * sw + sx) as usize];
                    for c in 0..4 {
                        acc[c] += p[c] as f64 * wgt;
                    }
                    area += wgt;
                    sx += 1;
                }
                sy += 1;
            }
            let a = acc[3] / area.max(1e-12);
            let px = if a <= 0.0 {
                [0, 0, 0, 0]
            } else {
                let un = |v: f64| ((v / area) / (a / 255.0)).round().clamp(0.0, 255.0) as u8;
                [un(acc[0]), un(acc[1]), un(acc[2]), a.round().clamp(0.0, 255.0) as u8]
            };
            out.put_pixel(ox, oy, Rgba(px));
        }
    }
    out
}

fn premultiply(img: &RgbaImage) -> RgbaImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let a = p[3] as u16;
        for c in 0..3 {
            p[c] = ((p[c] as u16 * a + 127) / 255) as u8;
        }
    }
    out
}

fn unpremultiply(img: &RgbaImage) -> RgbaImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let a = p[3] as f32;
        if a > 0.0 {
            for c in 0..3 {
                p[c] = (p[c] as f32 * 255.0 / a).round().clamp(0.0, 255.0) as u8;
            }
        } else {
            *p = Rgba([0, 0, 0, 0]);
        }
    }
    out
}

/// Grayscale dilation with a `k` x `k` box, anchored like OpenCV (offsets -k/2 ..= k - 1 - k/2).
pub fn dilate(mask: &GrayImage, k: u32) -> GrayImage {
    let (w, h) = mask.dimensions();
    let lo = (k / 2) as i64;
    let hi = (k - 1 - k / 2) as i64;
    let pass = |src: &GrayImage, horizontal: bool| {
        let mut out = GrayImage::new(w, h);
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let mut m = 0u8;
                for d in -lo..=hi {
                    let (sx, sy) = if horizontal { (x + d, y) } else { (x, y + d) };
                    if sx >= 0 && sy >= 0 && sx < w as i64 && sy < h as i64 {
                        m = m.max(src.get_pixel(sx as u32, sy as u32)[0]);
                    }
                }
                out.put_pixel(x as u32, y as u32, Luma([m]));
            }
        }
        out
    };
    pass(&pass(mask, true), false)
}

/// Load a product file and place it.
pub fn place_file(path: &Path, placement: &Placement) -> Result<PlacedProduct, ProductError> {
    let rgba = load_rgba(path, placement.white_bg)?;
    place(path, &rgba, placement)
}

/// Place an RGBA product image on the canvas.
pub fn place(source: &Path, img: &RgbaImage, placement: &Placement) -> Result<PlacedProduct, ProductError> {
    let c = placement.canvas;
    if c < 64 || c % 64 != 0 {
        return Err(ProductError::Placement(format!(
            "canvas size {c} must be a multiple of 64, at least 64"
        )));
    }
    if !(0.05..=1.0).contains(&placement.scale) {
        return Err(ProductError::Placement(format!(
            "scale {} must be between 0.05 and 1.0",
            placement.scale
        )));
    }
    let (px, py) = placement.position;
    if !(0.0..=1.0).contains(&px) || !(0.0..=1.0).contains(&py) {
        return Err(ProductError::Placement(format!(
            "position {px},{py} must be fractions of the canvas between 0 and 1"
        )));
    }
    let threshold = outline_threshold(img.pixels().map(|p| p[3]).max().unwrap_or(0));
    let Some((bx, by, bw, bh)) = alpha_bbox(img, threshold) else {
        return Err(ProductError::EmptyAlpha {
            path: source.to_path_buf(),
        });
    };
    let crop = image::imageops::crop_imm(img, bx, by, bw, bh).to_image();
    // 1. fit inside scale x canvas, keeping the aspect ratio
    let limit = placement.scale as f64 * c as f64;
    let f = (limit / bw as f64).min(limit / bh as f64);
    let nw = ((bw as f64 * f).round() as u32).clamp(1, c);
    let nh = ((bh as f64 * f).round() as u32).clamp(1, c);
    let resized = resize_area(&crop, nw, nh);
    // 2. position the centre, keeping the product inside the canvas
    let cx = (px as f64 * c as f64 - nw as f64 / 2.0).round().clamp(0.0, (c - nw) as f64) as u32;
    let cy = (py as f64 * c as f64 - nh as f64 / 2.0).round().clamp(0.0, (c - nh) as f64) as u32;
    let mut rgba = RgbaImage::new(c, c);
    image::imageops::replace(&mut rgba, &resized, cx as i64, cy as i64);
    // 3. inpainting mask: 255 - alpha, dilated
    let inverse = GrayImage::from_fn(c, c, |x, y| Luma([255 - rgba.get_pixel(x, y)[3]]));
    let inpaint_mask = dilate(&inverse, DILATE_KERNEL);
    // 4. Canny of the product's RGB with the background (alpha under the outline threshold) black
    let gray = GrayImage::from_fn(c, c, |x, y| {
        let p = rgba.get_pixel(x, y);
        if p[3] < threshold {
            Luma([0])
        } else {
            let l = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
            Luma([l.round() as u8])
        }
    });
    let edges = imageproc::edges::canny(&gray, 100.0, 200.0);
    let control = RgbImage::from_fn(c, c, |x, y| {
        let v = edges.get_pixel(x, y)[0];
        Rgb([v, v, v])
    });
    Ok(PlacedProduct {
        source: source.to_path_buf(),
        rgba,
        inpaint_mask,
        control,
        bbox: (cx, cy, nw, nh),
    })
}

impl PlacedProduct {
    pub fn canvas(&self) -> u32 {
        self.rgba.width()
    }

    /// The product over white (the init image whose latent is kept under the mask).
    pub fn init_rgb(&self) -> RgbImage {
        RgbImage::from_fn(self.canvas(), self.canvas(), |x, y| {
            let p = self.rgba.get_pixel(x, y);
            let a = p[3] as f32 / 255.0;
            let mix = |v: u8| (v as f32 * a + 255.0 * (1.0 - a)).round() as u8;
            Rgb([mix(p[0]), mix(p[1]), mix(p[2])])
        })
    }

    /// The inpainting mask at latent resolution: binarised (>= 0.5) at full size, then nearest
    /// resized, as diffusers' mask processor and `prepare_mask_latents` do. 1 = generate.
    pub fn latent_mask(&self, latent: u32) -> Vec<f32> {
        let c = self.canvas();
        let mut out = Vec::with_capacity((latent * latent) as usize);
        for y in 0..latent {
            for x in 0..latent {
                // torch nearest: src = floor(dst * in / out)
                let sx = (x as u64 * c as u64 / latent as u64) as u32;
                let sy = (y as u64 * c as u64 / latent as u64) as u32;
                let v = self.inpaint_mask.get_pixel(sx, sy)[0];
                out.push(if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 });
            }
        }
        out
    }

    /// The placed product as tensors for sampling and paste-back (see `ProductTensors`).
    pub fn tensors<B: Backend>(&self, latent: u32, device: &B::Device) -> ProductTensors<B> {
        let c = self.canvas() as usize;
        let rgb = RgbImage::from_fn(self.canvas(), self.canvas(), |x, y| {
            let p = self.rgba.get_pixel(x, y);
            Rgb([p[0], p[1], p[2]])
        });
        let alpha: Vec<f32> = self.rgba.pixels().map(|p| p[3] as f32 / 255.0).collect();
        let l = latent as usize;
        ProductTensors {
            control: rgb_to_tensor(&self.control, device),
            alpha: Tensor::from_data(TensorData::new(alpha, [1, 1, c, c]), device),
            rgb: rgb_to_tensor(&rgb, device),
            init: rgb_to_tensor::<B>(&self.init_rgb(), device).mul_scalar(2.0).sub_scalar(1.0),
            latent_mask: Tensor::from_data(TensorData::new(self.latent_mask(latent), [1, 1, l, l]), device),
        }
    }
}

/// A placed product on the device.
#[derive(Clone, Debug)]
pub struct ProductTensors<B: Backend> {
    /// [1, 3, H, W] the Canny control image in [0, 1].
    pub control: Tensor<B, 4>,
    /// [1, 1, H, W] the undilated alpha in [0, 1] (paste-back).
    pub alpha: Tensor<B, 4>,
    /// [1, 3, H, W] the placed product's RGB in [0, 1].
    pub rgb: Tensor<B, 4>,
    /// [1, 3, H, W] the product over white in [-1, 1] (the VAE's input for its latent).
    pub init: Tensor<B, 4>,
    /// [1, 1, h, w] 1 where the background is generated (`latent_mask`).
    pub latent_mask: Tensor<B, 4>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disc(size: u32, r: f32) -> RgbaImage {
        RgbaImage::from_fn(size, size, |x, y| {
            let d = ((x as f32 - size as f32 / 2.0).powi(2) + (y as f32 - size as f32 / 2.0).powi(2)).sqrt();
            if d < r { Rgba([200, 30, 30, 255]) } else { Rgba([0, 0, 0, 0]) }
        })
    }

    #[test]
    fn placement_fits_scale_and_centres() {
        let img = disc(300, 100.0);
        let p = place(Path::new("disc.png"), &img, &Placement::default()).expect("place");
        let (x, y, w, h) = p.bbox;
        assert!(w.max(h) as f32 <= 0.7 * 512.0 + 1.0 && w.max(h) as f32 >= 0.7 * 512.0 - 1.0);
        assert!((x as i64 + w as i64 / 2 - 256).abs() <= 1 && (y as i64 + h as i64 / 2 - 256).abs() <= 1);
        // the centre is opaque product, the corner is background
        assert_eq!(p.rgba.get_pixel(256, 256)[3], 255);
        assert_eq!(p.inpaint_mask.get_pixel(0, 0)[0], 255);
        assert_eq!(p.inpaint_mask.get_pixel(256, 256)[0], 0);
    }

    #[test]
    fn dilation_reaches_about_ten_pixels_into_the_product() {
        let img = disc(300, 100.0);
        let p = place(Path::new("disc.png"), &img, &Placement::default()).expect("place");
        let (x, _, w, _) = p.bbox;
        let row = 256;
        // first opaque column from the left edge of the product on the middle row
        let edge = (x..x + w).find(|&c| p.rgba.get_pixel(c, row)[3] == 255).expect("edge");
        assert_eq!(p.inpaint_mask.get_pixel(edge + 8, row)[0], 255, "dilated into the product");
        assert_eq!(p.inpaint_mask.get_pixel(edge + 12, row)[0], 0, "not further than 10 px");
    }

    #[test]
    fn area_resize_preserves_mean_colour() {
        let img = RgbaImage::from_fn(40, 40, |x, _| if x < 20 { Rgba([255, 0, 0, 255]) } else { Rgba([0, 0, 255, 255]) });
        let small = resize_area(&img, 10, 10);
        assert_eq!(small.get_pixel(0, 0).0, [255, 0, 0, 255]);
        assert_eq!(small.get_pixel(9, 9).0, [0, 0, 255, 255]);
        let odd = resize_area(&img, 3, 3);
        // half red, half blue (127.5 each, within rounding)
        let px = odd.get_pixel(1, 1).0;
        assert!(px[0].abs_diff(128) <= 1 && px[2].abs_diff(128) <= 1 && px[1] == 0 && px[3] == 255, "{px:?}");
    }

    #[test]
    fn paste_back_restores_opaque_product_exactly() {
        type B = burn::backend::Flex;
        let device = Default::default();
        let img = disc(300, 100.0);
        let p = place(Path::new("disc.png"), &img, &Placement::default()).expect("place");
        let t = p.tensors::<B>(64, &device);
        let generated = Tensor::<B, 4>::full([1, 3, 512, 512], 3.0 / 255.0, &device);
        let out = super::super::sampler::paste_back(generated, t.alpha, t.rgb);
        let out = super::super::image_io::tensor_to_rgb(out).remove(0);
        for (x, y, px) in p.rgba.enumerate_pixels() {
            if px[3] == 255 {
                assert_eq!(out.get_pixel(x, y).0, [px[0], px[1], px[2]]);
            } else if px[3] == 0 {
                assert_eq!(out.get_pixel(x, y).0, [3, 3, 3]);
            }
        }
    }

    #[test]
    fn bad_placements_are_errors() {
        let img = disc(100, 30.0);
        for placement in [
            Placement { canvas: 500, ..Placement::default() },
            Placement { scale: 1.5, ..Placement::default() },
            Placement { position: (1.5, 0.5), ..Placement::default() },
        ] {
            assert!(place(Path::new("x.png"), &img, &placement).is_err());
        }
    }
}

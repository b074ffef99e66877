//! Reading the images people hand the tool (products, generated images to score, images to
//! analyse): the format is sniffed from the bytes, decoding is bounded in memory (a huge or
//! hostile file is refused with the limit named, never an allocation abort), and the EXIF
//! orientation a phone or camera recorded is applied, as every image viewer does. Also the
//! conversions between 8-bit images and [0, 1] tensors (`rgb_to_tensor`, `tensor_to_rgb`,
//! `tensor_to_gray`), whose rounding is the one quantisation step of the pipeline.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, Luma, Rgb, RgbImage};

/// The most pixels any image may have to be decoded at all (16384 x 16384). Larger files are
/// refused before their pixels are allocated.
pub const MAX_DECODE_PIXELS: u64 = 16_384 * 16_384;
/// The decoder's allocation bound: the largest image above as 16-bit RGBA.
const MAX_DECODE_BYTES: u64 = MAX_DECODE_PIXELS * 8;

#[derive(Debug, thiserror::Error)]
pub enum ImageReadError {
    #[error("{}: cannot read the image: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error(
        "{}: the image is {width}x{height} ({} MP); images up to {} MP can be read — downscale it first",
        path.display(),
        (*width as u64 * *height as u64) / 1_000_000,
        MAX_DECODE_PIXELS / 1_000_000
    )]
    TooLarge { path: PathBuf, width: u32, height: u32 },
}

/// Decode `path` with the memory bound and apply its EXIF orientation.
pub fn open_image(path: &Path) -> Result<DynamicImage, ImageReadError> {
    let read_err = |reason: String| ImageReadError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let mut reader = ImageReader::open(path)
        .map_err(|e| read_err(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| read_err(e.to_string()))?;
    if reader.format().is_none() {
        return Err(read_err("not a recognised image format (expected PNG, WebP or JPEG)".into()));
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| read_err(format!("corrupt or unsupported image: {e}")))?;
    let (width, height) = decoder.dimensions();
    if width as u64 * height as u64 > MAX_DECODE_PIXELS {
        return Err(ImageReadError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
        });
    }
    if width == 0 || height == 0 {
        return Err(read_err("the image has no pixels".into()));
    }
    // A broken EXIF block is not worth refusing the image over: keep the stored orientation.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| read_err(format!("corrupt or unsupported image: {e}")))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// An 8-bit RGB image as a [1, 3, H, W] tensor in [0, 1].
pub fn rgb_to_tensor<B: Backend>(img: &RgbImage, device: &B::Device) -> Tensor<B, 4> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut data = vec![0f32; 3 * plane];
    for (x, y, p) in img.enumerate_pixels() {
        let i = (y * w + x) as usize;
        for c in 0..3 {
            data[c * plane + i] = p[c] as f32 / 255.0;
        }
    }
    Tensor::from_data(TensorData::new(data, [1, 3, h as usize, w as usize]), device)
}

/// Quantise [0, 1] values to 8 bits: the one rounding step between a computed image and its PNG.
fn to_u8(v: f32) -> u8 {
    (v * 255.0).round().clamp(0.0, 255.0) as u8
}

fn host_values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()
}

/// [N, 3, H, W] in [0, 1] -> N 8-bit RGB images.
pub fn tensor_to_rgb<B: Backend>(images: Tensor<B, 4>) -> Vec<RgbImage> {
    let [n, _, h, w] = images.dims();
    let v = host_values(images);
    let plane = h * w;
    (0..n)
        .map(|k| {
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let i = y as usize * w + x as usize;
                let px = |c: usize| to_u8(v.get((k * 3 + c) * plane + i).copied().unwrap_or(0.0));
                Rgb([px(0), px(1), px(2)])
            })
        })
        .collect()
}

/// [N, 1, H, W] in [0, 1] -> N 8-bit grey images.
pub fn tensor_to_gray<B: Backend>(maps: Tensor<B, 4>) -> Vec<GrayImage> {
    let [n, _, h, w] = maps.dims();
    let v = host_values(maps);
    let plane = h * w;
    (0..n)
        .map(|k| GrayImage::from_fn(w as u32, h as u32, |x, y| Luma([to_u8(v.get(k * plane + y as usize * w + x as usize).copied().unwrap_or(0.0))])))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_images_and_reads_pngs() {
        let dir = tempfile::tempdir().expect("tmp");
        let text = dir.path().join("fake.png");
        std::fs::write(&text, b"root:x:0:0:root:/root:/bin/bash\n").expect("write");
        assert!(matches!(open_image(&text), Err(ImageReadError::Read { .. })));
        let png = dir.path().join("ok.png");
        image::RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3])).save(&png).expect("save");
        let img = open_image(&png).expect("png");
        assert_eq!((img.width(), img.height()), (3, 2));
    }
}

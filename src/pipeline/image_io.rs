//! Reading the images people hand the tool (products, generated images to score, images to
//! analyse): the format is sniffed from the bytes, decoding is bounded in memory (a huge or
//! hostile file is refused with the limit named, never an allocation abort), and the EXIF
//! orientation a phone or camera recorded is applied, as every image viewer does.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader};

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

//! Writing results: PNGs with an AUTOMATIC1111-style `parameters` text chunk, written
//! atomically ([`crate::files::write_atomic`]).

use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage, RgbaImage};

use crate::files::{FileError, io_err, write_atomic};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: cannot encode PNG: {reason}")]
    Encode { path: PathBuf, reason: String },
}


enum Pixels<'a> {
    Rgb(&'a RgbImage),
    Rgba(&'a RgbaImage),
    Gray(&'a GrayImage),
}

fn encode_png(path: &Path, pixels: Pixels<'_>, text: &[(&str, &str)]) -> Result<Vec<u8>, OutputError> {
    let enc_err = |e: png::EncodingError| OutputError::Encode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let (w, h, color, data): (u32, u32, png::ColorType, &[u8]) = match pixels {
        Pixels::Rgb(i) => (i.width(), i.height(), png::ColorType::Rgb, i.as_raw()),
        Pixels::Rgba(i) => (i.width(), i.height(), png::ColorType::Rgba, i.as_raw()),
        Pixels::Gray(i) => (i.width(), i.height(), png::ColorType::Grayscale, i.as_raw()),
    };
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            // tEXt is Latin-1 only; prompts and titles are often CJK, so use iTXt (UTF-8) then.
            if v.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(k.to_string(), v.to_string()).map_err(enc_err)?;
            } else {
                enc.add_itxt_chunk(k.to_string(), v.to_string()).map_err(enc_err)?;
            }
        }
        let mut writer = enc.write_header().map_err(enc_err)?;
        writer.write_image_data(data).map_err(enc_err)?;
        writer.finish().map_err(enc_err)?;
    }
    Ok(out)
}

pub fn save_rgb(path: &Path, img: &RgbImage, text: &[(&str, &str)]) -> Result<(), OutputError> {
    Ok(write_atomic(path, &encode_png(path, Pixels::Rgb(img), text)?)?)
}

pub fn save_rgba(path: &Path, img: &RgbaImage) -> Result<(), OutputError> {
    Ok(write_atomic(path, &encode_png(path, Pixels::Rgba(img), &[])?)?)
}

pub fn save_gray(path: &Path, img: &GrayImage) -> Result<(), OutputError> {
    Ok(write_atomic(path, &encode_png(path, Pixels::Gray(img), &[])?)?)
}

/// Read every text chunk (tEXt, zTXt, iTXt) of a PNG: keyword -> text.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>, OutputError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = decoder.read_info().map_err(|e| OutputError::Encode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    // Text chunks after the image data are only seen once the frame has been read.
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let _ = reader.next_frame(&mut buf);
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.compressed_latin1_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    Ok(out)
}


//! Writing results: PNGs with an AUTOMATIC1111-style `parameters` text chunk, atomic file writes
//! (temp file + rename, so a killed process never leaves a half-written file under the final
//! name), and JSON lines.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage, RgbaImage};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path}: cannot write: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot encode PNG: {reason}")]
    Encode { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `bytes` to `path` atomically (temp file in the same folder, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    // Unique per process and per call: two threads (or processes) writing the same file never
    // share a temp file; the last rename wins with a complete file either way.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// Make sure `dir` exists and is writable (a clear error up front instead of after generating).
pub fn ensure_writable_dir(dir: &Path) -> Result<(), OutputError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let probe = dir.join(format!(".rfstudio-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(io_err(dir))?;
    std::fs::remove_file(&probe).map_err(io_err(dir))?;
    Ok(())
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
    write_atomic(path, &encode_png(path, Pixels::Rgb(img), text)?)
}

pub fn save_rgba(path: &Path, img: &RgbaImage) -> Result<(), OutputError> {
    write_atomic(path, &encode_png(path, Pixels::Rgba(img), &[])?)
}

pub fn save_gray(path: &Path, img: &GrayImage) -> Result<(), OutputError> {
    write_atomic(path, &encode_png(path, Pixels::Gray(img), &[])?)
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

/// Append one JSON line to `path` and fsync it (each line is a complete record).
pub fn append_jsonl(path: &Path, value: &serde_json::Value) -> Result<(), OutputError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    let mut line = value.to_string();
    line.push('\n');
    f.write_all(line.as_bytes()).map_err(io_err(path))?;
    f.sync_data().map_err(io_err(path))
}

/// Keep only the JSON lines of `path` whose `"step"` is <= `step` (a training run resuming from
/// the checkpoint of that step: no gap, no duplicate). A missing file is fine.
pub fn truncate_jsonl_steps(path: &Path, step: usize) -> Result<(), OutputError> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

//! Hostile input, one module per command (`hostile_<command>_...`): path traversal, absurd
//! numbers, NaN/inf, empty and huge inputs, corrupt models, concurrent writers and kill -9 where
//! the command writes. Every case must end with a clear error (the documented exit code, the
//! message printed once) and nothing lost or written where it must not be.

mod analyze;
mod catalogue;
mod convert;
mod dataset;
mod generate;
mod messages;
mod rfft;
mod rfnet;
mod score;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::root;

/// The binary under test; `RFSTUDIO_TEST_BIN` runs these cases against another build (e.g. an
/// older release, to see which cases it fails).
pub fn rfstudio() -> Command {
    let bin = std::env::var_os("RFSTUDIO_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_rfstudio").into());
    let mut c = Command::new(bin);
    c.current_dir(root());
    for v in ["RFSTUDIO_DEVICE", "RFSTUDIO_MODELS", "RFSTUDIO_DTYPE", "RFSTUDIO_ATTENTION", "RUST_LOG"] {
        c.env_remove(v);
    }
    c
}

/// What a finished command printed.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Assert the exit code, then that every needle is in stderr exactly once.
    #[track_caller]
    pub fn fails(&self, code: i32, needles: &[&str]) -> &Self {
        assert_eq!(self.code, Some(code), "exit code\nstderr: {}\nstdout: {}", self.stderr, self.stdout);
        for n in needles {
            assert_eq!(
                self.stderr.matches(n).count(),
                1,
                "{n:?} must appear exactly once in stderr:\n{}",
                self.stderr
            );
        }
        self
    }

    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "stderr: {}\nstdout: {}", self.stderr, self.stdout);
        self
    }
}

pub fn run<I, S>(args: I) -> Ran
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = rfstudio().args(args).output().expect("run rfstudio");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A transparent product: a red disc of radius `size / 3` with the given alpha.
pub fn product_png(path: &Path, size: u32, alpha: u8) {
    let c = size as f32 / 2.0;
    image::RgbaImage::from_fn(size, size, |x, y| {
        let d = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2)).sqrt();
        if d < size as f32 / 3.0 {
            image::Rgba([200, 40, 30, alpha])
        } else {
            image::Rgba([0, 0, 0, 0])
        }
    })
    .save(path)
    .expect("save product");
}

/// A copy of `models/tiny` under `dir` (16 MB), to break one model without touching the repo.
pub fn tiny_copy(dir: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read_dir").flatten() {
            let p = e.path();
            let t = to.join(e.file_name());
            if p.is_dir() {
                copy(&p, &t);
            } else {
                std::fs::copy(&p, &t).expect("copy");
            }
        }
    }
    let to = dir.join("tiny");
    copy(&root().join("models/tiny"), &to);
    to
}

/// Overwrite every element of the first float tensor of a safetensors file (in header order)
/// whose name contains `key_part` with `value` (rounded to the tensor's dtype). Returns the
/// tensor's name.
pub fn poison_safetensors(file: &Path, key_part: &str, value: f32) -> String {
    let mut bytes = std::fs::read(file).expect("read weights");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("len")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let (name, info) = header
        .as_object()
        .expect("object")
        .iter()
        .find(|(k, v)| k.contains(key_part) && ["F32", "F16", "BF16"].contains(&v["dtype"].as_str().unwrap_or("")))
        .expect("a float tensor to poison");
    let offsets = &info["data_offsets"];
    let (a, b) = (offsets[0].as_u64().expect("a") as usize, offsets[1].as_u64().expect("b") as usize);
    let element: Vec<u8> = match info["dtype"].as_str() {
        Some("F16") => half::f16::from_f32(value).to_le_bytes().to_vec(),
        Some("BF16") => half::bf16::from_f32(value).to_le_bytes().to_vec(),
        _ => value.to_le_bytes().to_vec(),
    };
    for chunk in bytes[8 + n + a..8 + n + b].chunks_exact_mut(element.len()) {
        chunk.copy_from_slice(&element);
    }
    std::fs::write(file, bytes).expect("write weights");
    name.clone()
}

/// Files anywhere under `dir`, relative, sorted (to prove nothing was written somewhere).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.to_path_buf());
            }
        }
    }
    out.sort();
    out
}

//! Crash-safe file writing shared by every layer: atomic replacement (temp file in the same
//! folder, fsync, rename: a killed process never leaves a half-written file under the final
//! name), a writability check up front, and fsynced JSON lines.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: cannot write: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The user's cache folder for rfstudio: `$XDG_CACHE_HOME/rfstudio`, else `~/.cache/rfstudio`.
pub fn user_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("rfstudio"))
}

/// Write `bytes` to `path` atomically (temp file in the same folder, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
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
pub fn ensure_writable_dir(dir: &Path) -> Result<(), FileError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let probe = dir.join(format!(".rfstudio-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(io_err(dir))?;
    std::fs::remove_file(&probe).map_err(io_err(dir))?;
    Ok(())
}

/// Append one JSON line to `path` and fsync it (each line is a complete record).
pub fn append_jsonl(path: &Path, value: &serde_json::Value) -> Result<(), FileError> {
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
pub fn truncate_jsonl_steps(path: &Path, step: usize) -> Result<(), FileError> {
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

/// A file that cannot be read back: missing or unreadable, not what it should be, or written by
/// a newer rfstudio.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid {what}: {reason}")]
    Parse { path: PathBuf, what: &'static str, reason: String },
    #[error("{path}: written by a newer rfstudio (format version {found}; this build reads up to {known}); update rfstudio")]
    Newer { path: PathBuf, found: u32, known: u32 },
}

/// `path` as text.
pub fn read_text(path: &Path) -> Result<String, ReadError> {
    std::fs::read_to_string(path).map_err(|source| ReadError::Io { path: path.to_path_buf(), source })
}

/// The JSON file `path` (`what` names it in errors).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &'static str) -> Result<T, ReadError> {
    serde_json::from_str(&read_text(path)?).map_err(|e| ReadError::Parse {
        path: path.to_path_buf(),
        what,
        reason: e.to_string(),
    })
}

/// The `version` of a file written before its format had one: those are version 1 (the same
/// fields). For `#[serde(default = "crate::files::version_one")]`.
pub fn version_one() -> u32 {
    1
}

/// Refuse a file whose format `version` is newer than the `known` one this build writes.
pub fn check_version(path: &Path, found: u32, known: u32) -> Result<(), ReadError> {
    if found > known {
        return Err(ReadError::Newer { path: path.to_path_buf(), found, known });
    }
    Ok(())
}

/// Write `value` as JSON to `path` atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T, pretty: bool) -> Result<(), FileError> {
    // Plain data (numbers, strings, paths): serialising cannot fail.
    let text = if pretty { serde_json::to_string_pretty(value) } else { serde_json::to_string(value) };
    write_atomic(path, text.unwrap_or_default().as_bytes())
}

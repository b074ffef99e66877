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

/// `$VAR/rfstudio`, else `~/<fallback>/rfstudio` (the XDG base directories).
fn xdg_dir(var: &str, fallback: &str) -> Option<PathBuf> {
    let base = std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(fallback)))?;
    Some(base.join("rfstudio"))
}

/// The user's cache folder for rfstudio (converted checkpoints, kernel caches):
/// `$XDG_CACHE_HOME/rfstudio`, else `~/.cache/rfstudio`.
pub fn user_cache_dir() -> Option<PathBuf> {
    xdg_dir("XDG_CACHE_HOME", ".cache")
}

/// The user's data folder (models, the studio's outputs, datasets and runs):
/// `$XDG_DATA_HOME/rfstudio`, else `~/.local/share/rfstudio`.
pub fn user_data_dir() -> Option<PathBuf> {
    xdg_dir("XDG_DATA_HOME", ".local/share")
}

/// The user's settings folder (the studio's stored settings): `$XDG_CONFIG_HOME/rfstudio`,
/// else `~/.config/rfstudio`.
pub fn user_config_dir() -> Option<PathBuf> {
    xdg_dir("XDG_CONFIG_HOME", ".config")
}

/// Where a file that ships with rfstudio (`sample-data`, `models/tiny`, `models/README.md`) is:
/// relative to the working directory when it is there (a checkout), else in the installed
/// share folder beside the binary (`<prefix>/bin/rfstudio` → `<prefix>/share/rfstudio/`, as the
/// `.deb` and the portable archive lay it out), else — for a binary that lives where it was
/// built (`target/...` in the tree, or the `CARGO_TARGET_DIR` it was built with) — in the
/// source tree. A copied or installed binary never
/// reaches into a source tree that happens to exist on the machine.
pub fn bundled(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    if let Some(installed) = installed_share_dir().map(|d| d.join(rel))
        && installed.exists()
    {
        return installed;
    }
    let tree = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Built from the tree: the binary is under it (`target/`), or under the target folder the
    // build was told to use (`CARGO_TARGET_DIR`, seen at compile time).
    let built_here = std::env::current_exe().is_ok_and(|exe| {
        exe.starts_with(tree) || option_env!("CARGO_TARGET_DIR").is_some_and(|t| !t.is_empty() && exe.starts_with(t))
    });
    let src = tree.join(rel);
    if built_here && src.exists() { src } else { here }
}

/// `<prefix>/share/rfstudio` for a binary installed as `<prefix>/bin/rfstudio`.
pub fn installed_share_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let exe = exe.canonicalize().unwrap_or(exe);
    let prefix = exe.parent()?.parent()?;
    let share = prefix.join("share").join("rfstudio");
    share.is_dir().then_some(share)
}

/// The models folder used when none is given: `./models` when it holds a `models.toml` (a
/// checkout or a working folder), else `models` in the user's data folder (where an installed
/// rfstudio looks; `init_user_models_dir` creates it).
pub fn default_models_dir() -> PathBuf {
    let here = PathBuf::from("models");
    if here.join("models.toml").is_file() {
        return here;
    }
    user_data_dir().map(|d| d.join("models")).unwrap_or(here)
}

/// Create the user's models folder on first use, with the shipped `models.toml` (each role
/// pointing at the folder name the instructions use) and `README.md` (where to put real
/// weights), so the studio and `info` name the folder to fill. An existing folder is left as it
/// is.
pub fn init_user_models_dir(dir: &Path) -> Result<(), FileError> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    for name in ["models.toml", "README.md"] {
        let src = bundled("models").join(name);
        if let Ok(bytes) = std::fs::read(&src) {
            write_atomic(&dir.join(name), &bytes)?;
        }
    }
    Ok(())
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

//! Importing samples (and labels) into a dataset:
//! - `ours`: rfstudio generation output folders (found recursively by their `attempts.jsonl`);
//! - `folder`: a folder of images with an optional `metadata.jsonl` or `metadata.csv`
//!   (columns `image`, `product`, `title`, `prompt`, `negative_prompt`, `label`);
//! - `rf1m`: the released RF1M label text file. Its exact column format is not documented
//!   publicly, so the parser is tolerant: each line is `path<TAB or spaces>label`, the label a
//!   class id (0-4), a class name, or `Unsuitable`; blank lines and `#` comments are skipped, an
//!   optional header line is recognised, and every line that cannot be read is reported with its
//!   number and reason. Image paths are relative to the label file's folder (or `images_root`).
//!   The product of an RF1M sample is the image's parent folder name (or its file stem).
//!
//! Every image path read from an import file must resolve (symbolic links and `..` followed)
//! inside the import root — the run folder, the image folder, or the RF1M label file's folder
//! (`--images` names another root explicitly) — and must decode as an image; anything else is
//! reported as a problem and not copied. Two lines of one file giving the same image different
//! labels are reported as a conflict and the first label is kept.
//!
//! Re-importing the same data adds nothing twice: samples are keyed by the content hash of the
//! generated image, and an annotator's label on a sample is replaced, not duplicated.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use std::collections::HashMap;

use super::store::{Decision, NewSample, Source, Store, StoreError};
use crate::pipeline::params::GenerateParams;
use crate::files::ReadError;
use crate::pipeline::run_folder::{MapKind, RunFolder, RunFolderError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ImportKind {
    Ours,
    Folder,
    Rf1m,
}

/// What an import did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportReport {
    pub added: usize,
    pub duplicates: usize,
    pub labels: usize,
    /// Labels that replaced a different label of the same importer on a sample (a corrected
    /// label file imported again).
    pub relabelled: usize,
    /// (where, why) for every line or file that could not be imported.
    pub problems: Vec<(String, String)>,
}

/// The annotator name under which labels from imported files are recorded.
pub const IMPORT_ANNOTATOR: &str = "import";
pub const RF1M_ANNOTATOR: &str = "rf1m";

pub fn import(
    store: &Store,
    from: &Path,
    kind: ImportKind,
    images_root: Option<&Path>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ImportReport, StoreError> {
    match kind {
        ImportKind::Ours => import_ours(store, from, progress),
        ImportKind::Folder => import_folder(store, from, progress),
        ImportKind::Rf1m => import_rf1m(store, from, images_root, progress),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn find_files(dir: &Path, name: &str, out: &mut Vec<PathBuf>) -> Result<(), StoreError> {
    if dir.join(name).is_file() {
        out.push(dir.join(name));
    }
    let entries = std::fs::read_dir(dir).map_err(io(dir))?;
    let mut subdirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    for d in subdirs {
        find_files(&d, name, out)?;
    }
    Ok(())
}

fn short_file_hash(path: &Path) -> Option<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).ok()?;
    Some(
        sha2::Sha256::digest(&bytes)
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// Why one line or file of an import was not imported (the import goes on with the rest).
#[derive(Debug, thiserror::Error)]
pub enum ImportProblem {
    #[error("path {0:?} contains control characters")]
    ControlCharacters(String),
    #[error("import root {}: {source}", root.display())]
    Root {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {} not found", path.display())]
    NotFound { path: PathBuf },
    #[error("image {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "image {rel:?} resolves to {}, outside the import root {}; only files under the root are imported (name another root with --images)",
        file.display(),
        root.display()
    )]
    OutsideRoot { rel: String, file: PathBuf, root: PathBuf },
    #[error("image {} is not a file", path.display())]
    NotAFile { path: PathBuf },
    #[error(transparent)]
    Image(#[from] crate::pipeline::image_io::ImageReadError),
    #[error("product image: {0}")]
    ProductImage(Box<ImportProblem>),
    #[error("expected `path<TAB or space>label`, found one field")]
    OneField,
    #[error("empty path or label")]
    EmptyField,
    #[error(transparent)]
    Label(#[from] StoreError),
    #[error("{0}")]
    Record(#[from] serde_json::Error),
}

/// Resolve `rel` (a path read from an import file) against `root` and make sure the result is a
/// file inside `root` once symbolic links and `..` are followed.
pub fn resolve_inside(root: &Path, rel: &str) -> Result<PathBuf, ImportProblem> {
    if rel.chars().any(char::is_control) {
        return Err(ImportProblem::ControlCharacters(rel.to_string()));
    }
    let joined = root.join(rel);
    let canonical_root = root.canonicalize().map_err(|source| ImportProblem::Root {
        root: root.to_path_buf(),
        source,
    })?;
    let file = match joined.canonicalize() {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImportProblem::NotFound { path: joined });
        }
        Err(source) => return Err(ImportProblem::Unreadable { path: joined, source }),
    };
    if !file.starts_with(&canonical_root) {
        return Err(ImportProblem::OutsideRoot {
            rel: rel.to_string(),
            file,
            root: canonical_root,
        });
    }
    if !file.is_file() {
        return Err(ImportProblem::NotAFile { path: joined });
    }
    Ok(file)
}

/// Decode `path` completely (with the memory bound of `image_io`) to make sure it is a real image.
pub fn check_image(path: &Path) -> Result<(), ImportProblem> {
    crate::pipeline::image_io::open_image(path)?;
    Ok(())
}

/// `resolve_inside` + `check_image`.
fn image_inside(root: &Path, rel: &str) -> Result<PathBuf, ImportProblem> {
    let file = resolve_inside(root, rel)?;
    check_image(&file)?;
    Ok(file)
}

/// The sample ids an import has labelled, with where and how, to find conflicting lines.
#[derive(Default)]
struct Labelled(HashMap<i64, (String, Decision)>);

impl Labelled {
    /// Record an imported label unless an earlier line of the same import gave the sample a
    /// different one (reported; the first label is kept). Returns whether the label was written.
    fn put(
        &mut self,
        store: &Store,
        id: i64,
        annotator: &str,
        decision: Decision,
        at: &str,
        report: &mut ImportReport,
    ) -> Result<bool, StoreError> {
        if let Some((first_at, first)) = self.0.get(&id) {
            if *first != decision {
                report.problems.push((
                    at.to_string(),
                    format!(
                        "conflicting label: {} here, {} at {first_at} for the same image; kept {}",
                        decision.name(),
                        first.name(),
                        first.name()
                    ),
                ));
            }
            return Ok(false);
        }
        self.0.insert(id, (at.to_string(), decision));
        let (_, previous) = store.put_label(id, annotator, decision, 0, false)?;
        if previous.is_some_and(|p| p.decision != decision) {
            report.relabelled += 1;
        }
        report.labels += 1;
        Ok(true)
    }
}

fn add(store: &Store, s: &NewSample, source: Source, report: &mut ImportReport) -> Result<i64, StoreError> {
    let added = store.add_sample(s, source)?;
    if added.new {
        report.added += 1;
    } else {
        report.duplicates += 1;
    }
    Ok(added.id)
}

fn import_ours(store: &Store, from: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<ImportReport, StoreError> {
    let mut report = ImportReport::default();
    let mut runs = Vec::new();
    find_files(from, "attempts.jsonl", &mut runs)?;
    let total = runs.len();
    for (i, attempts) in runs.iter().enumerate() {
        let dir = attempts.parent().unwrap_or(from);
        let folder = RunFolder::new(dir);
        // The settings and models from run.json; a folder without one still gives its images
        // (with empty prompt and title), one whose run.json is damaged is reported.
        let run = match folder.read_manifest() {
            Ok(run) => Some(run),
            Err(RunFolderError::Read(ReadError::Io { .. })) => None,
            Err(e) => {
                report.problems.push((folder.manifest_path().display().to_string(), e.to_string()));
                None
            }
        };
        let product_png = folder.product_path();
        let product_id = short_file_hash(&product_png).unwrap_or_else(|| dir.display().to_string());
        let records = folder.read_attempts()?;
        for (line, record) in records {
            let at = || format!("{}:{line}", attempts.display());
            let rec = match record {
                Ok(rec) => rec,
                Err(why) => {
                    report.problems.push((at(), why.to_string()));
                    continue;
                }
            };
            let image = match image_inside(dir, &rec.file) {
                Ok(p) => p,
                Err(why) => {
                    report.problems.push((at(), why.to_string()));
                    continue;
                }
            };
            let side = |kind: MapKind| image_inside(dir, &RunFolder::map_file(&rec.file, kind)).ok();
            let text = |f: fn(&GenerateParams) -> &String| run.as_ref().map(|r| f(&r.params).clone()).unwrap_or_default();
            let s = NewSample {
                product_id: product_id.clone(),
                product_image: product_png.is_file().then(|| product_png.clone()),
                image,
                depth: side(MapKind::Depth),
                saliency: side(MapKind::Saliency),
                title: text(|p| &p.title),
                prompt: text(|p| &p.prompt),
                negative_prompt: text(|p| &p.negative),
                seed: i64::try_from(rec.seed).ok(),
                model: run.as_ref().map(|r| r.models.base.clone()),
                controlnet: run.as_ref().map(|r| r.models.controlnet.clone()),
                probs: rec.probs.map(|p| p.0),
            };
            add(store, &s, Source::Generated, &mut report)?;
        }
        progress(i + 1, total);
    }
    Ok(report)
}

#[derive(Deserialize, Default)]
struct FolderRow {
    image: String,
    #[serde(default)]
    product: Option<String>,
    #[serde(default)]
    product_image: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    label: Option<String>,
}

fn import_folder(store: &Store, from: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<ImportReport, StoreError> {
    let mut report = ImportReport::default();
    let mut rows: Vec<(String, FolderRow)> = Vec::new();
    let jsonl = from.join("metadata.jsonl");
    let csv_path = from.join("metadata.csv");
    if jsonl.is_file() {
        let text = std::fs::read_to_string(&jsonl).map_err(io(&jsonl))?;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<FolderRow>(line) {
                Ok(r) => rows.push((format!("{}:{}", jsonl.display(), n + 1), r)),
                Err(e) => report.problems.push((format!("{}:{}", jsonl.display(), n + 1), e.to_string())),
            }
        }
    } else if csv_path.is_file() {
        let mut reader = csv::Reader::from_path(&csv_path).map_err(|e| StoreError::Io {
            path: csv_path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        for (n, row) in reader.deserialize::<FolderRow>().enumerate() {
            match row {
                Ok(r) => rows.push((format!("{}:{}", csv_path.display(), n + 2), r)),
                Err(e) => report.problems.push((format!("{}:{}", csv_path.display(), n + 2), e.to_string())),
            }
        }
    } else {
        let mut files: Vec<PathBuf> = std::fs::read_dir(from)
            .map_err(io(from))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()).map(str::to_lowercase).as_deref(),
                    Some("png" | "jpg" | "jpeg" | "webp")
                )
            })
            .collect();
        files.sort();
        for f in files {
            rows.push((
                f.display().to_string(),
                FolderRow {
                    image: f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                    ..FolderRow::default()
                },
            ));
        }
    }
    let total = rows.len();
    let mut labelled = Labelled::default();
    for (i, (at, row)) in rows.into_iter().enumerate() {
        let image = match image_inside(from, &row.image) {
            Ok(p) => p,
            Err(why) => {
                report.problems.push((at, why.to_string()));
                continue;
            }
        };
        let product_image = match row.product_image.as_deref() {
            Some(p) => match image_inside(from, p) {
                Ok(p) => Some(p),
                Err(why) => {
                    report.problems.push((at, ImportProblem::ProductImage(Box::new(why)).to_string()));
                    continue;
                }
            },
            None => None,
        };
        let decision = match row.label.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
            Some(l) => match Decision::parse(l, false) {
                Ok(d) => Some(d),
                Err(e) => {
                    report.problems.push((at, e.to_string()));
                    continue;
                }
            },
            None => None,
        };
        let s = NewSample {
            product_id: row.product.clone().unwrap_or_else(|| {
                Path::new(&row.image)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
            product_image,
            image,
            title: row.title.unwrap_or_default(),
            prompt: row.prompt.unwrap_or_default(),
            negative_prompt: row.negative_prompt.unwrap_or_default(),
            ..NewSample::default()
        };
        let id = add(store, &s, Source::Imported, &mut report)?;
        if let Some(d) = decision {
            labelled.put(store, id, IMPORT_ANNOTATOR, d, &at, &mut report)?;
        }
        progress(i + 1, total);
    }
    Ok(report)
}

/// Parse one RF1M label line: `path<TAB or spaces>label`. Returns None for blank/comment lines.
pub fn parse_rf1m_line(line: &str) -> Option<Result<(String, Decision), ImportProblem>> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    let (path, label) = match t.split_once('\t') {
        Some((p, l)) => (p.trim(), l.trim()),
        None => match t.split_once(char::is_whitespace) {
            Some((p, l)) => (p.trim(), l.trim()),
            None => return Some(Err(ImportProblem::OneField)),
        },
    };
    if path.is_empty() || label.is_empty() {
        return Some(Err(ImportProblem::EmptyField));
    }
    // A comma-separated line (`path,label`) is a common variant.
    let label = label.trim_start_matches(',').trim();
    Some(Decision::parse(label, false).map(|d| (path.to_string(), d)).map_err(ImportProblem::from))
}

fn import_rf1m(
    store: &Store,
    label_file: &Path,
    images_root: Option<&Path>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ImportReport, StoreError> {
    let mut report = ImportReport::default();
    let bytes = std::fs::read(label_file).map_err(io(label_file))?;
    let text = String::from_utf8_lossy(&bytes);
    let root = images_root
        .map(Path::to_path_buf)
        .unwrap_or_else(|| label_file.parent().unwrap_or(Path::new(".")).to_path_buf());
    let lines: Vec<&str> = text.lines().collect();
    let total = lines.len();
    let mut labelled = Labelled::default();
    for (n, line) in lines.iter().enumerate() {
        let at = format!("{}:{}", label_file.display(), n + 1);
        let parsed = match parse_rf1m_line(line) {
            None => continue,
            Some(p) => p,
        };
        let (path, decision) = match parsed {
            Ok(x) => x,
            Err(why) => {
                // A header line such as `image label` is not an error.
                if n == 0 && line.to_lowercase().contains("label") {
                    continue;
                }
                report.problems.push((at, why.to_string()));
                continue;
            }
        };
        let image = match image_inside(&root, &path) {
            Ok(p) => p,
            Err(why) => {
                report.problems.push((at, why.to_string()));
                continue;
            }
        };
        let p = Path::new(&path);
        let product_id = p
            .parent()
            .and_then(|d| d.file_name())
            .map(|d| d.to_string_lossy().into_owned())
            .or_else(|| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let s = NewSample {
            product_id,
            image,
            ..NewSample::default()
        };
        let id = add(store, &s, Source::Rf1m, &mut report)?;
        labelled.put(store, id, RF1M_ANNOTATOR, decision, &at, &mut report)?;
        if n % 256 == 0 || n + 1 == total {
            progress(n + 1, total);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rf1m_lines_are_parsed_tolerantly() {
        assert_eq!(parse_rf1m_line("a/b.jpg\t0").map(|r| r.ok()), Some(Some(("a/b.jpg".into(), Decision::Class(0)))));
        assert_eq!(parse_rf1m_line("a/b.jpg   Space Mismatch").map(|r| r.ok()), Some(Some(("a/b.jpg".into(), Decision::Class(1)))));
        assert_eq!(parse_rf1m_line("x.png Unsuitable").map(|r| r.ok()), Some(Some(("x.png".into(), Decision::Unsuitable))));
        assert!(parse_rf1m_line("  # comment").is_none());
        assert!(parse_rf1m_line("").is_none());
        assert!(matches!(parse_rf1m_line("onlyonefield"), Some(Err(_))));
        assert!(matches!(parse_rf1m_line("x.png 9"), Some(Err(_))));
        assert!(matches!(parse_rf1m_line("x.png banana"), Some(Err(_))));
    }
}

//! `rfstudio dataset migrate FROM TO`: copy a dataset between SQLite and PostgreSQL (either
//! way, or between two servers) with nothing lost: every image file (checked against the hash
//! in its name), every sample and label with its id, time and summaries, then counts and
//! content checksums of both sides compared.

use std::path::Path;

use serde::Serialize;

use super::store::{ContentChecksum, Store, StoreError};

#[derive(Clone, Debug, Serialize)]
pub struct MigrateReport {
    pub from: String,
    pub to: String,
    /// Image files copied (files already present in the target's image folder are checked,
    /// not copied again).
    pub images_copied: u64,
    pub images_present: u64,
    pub source: ContentChecksum,
    pub target: ContentChecksum,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: the image file does not match its content hash (expected {expected}, found {found}); the source dataset is damaged")]
    DamagedImage { path: String, expected: String, found: String },
    #[error("the copy differs from the original (original {original:?}, copy {copy:?}); remove the copy before trying again")]
    Mismatch { original: ContentChecksum, copy: ContentChecksum },
}

/// Copy `from` into `to` (which must hold no samples). `progress` gets (stage, done, total).
pub fn migrate(from: &Store, to: &Store, progress: &mut dyn FnMut(&str, u64, u64)) -> Result<MigrateReport, MigrateError> {
    let blobs = from.blob_paths()?;
    let total = blobs.len() as u64;
    let (mut copied, mut present) = (0, 0);
    for (i, rel) in blobs.iter().enumerate() {
        let src = from.dir().join(rel);
        let already = to.dir().join(rel).is_file();
        let (stored, hash) = to.put_blob(&src)?;
        let expected = Path::new(rel)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if hash != expected || stored != *rel {
            return Err(MigrateError::DamagedImage {
                path: src.display().to_string(),
                expected,
                found: hash,
            });
        }
        if already { present += 1 } else { copied += 1 }
        progress("images", i as u64 + 1, total);
    }
    let source = from.content_checksum()?;
    let rows = source.samples + source.labels;
    let mut done = |n: u64| progress("rows", n, rows);
    from.copy_rows_into(to, &mut done)?;
    let target = to.content_checksum()?;
    if source != target {
        return Err(MigrateError::Mismatch {
            original: source,
            copy: target,
        });
    }
    Ok(MigrateReport {
        from: from.location().to_string(),
        to: to.location().to_string(),
        images_copied: copied,
        images_present: present,
        source,
        target,
    })
}

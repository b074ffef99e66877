//! The RF1M annotation store: one SQLite database per dataset folder (`DIR/dataset.sqlite`, WAL
//! mode), images content-addressed on disk next to it (`DIR/blobs/ab/<sha256>.<ext>`; the DB
//! never holds blobs), schema migrations recorded in `schema_version`.
//!
//! Samples and labels are separate tables. Every label write is one `BEGIN IMMEDIATE`
//! transaction, so a killed process loses at most the label being written and two processes
//! labelling the same dataset both keep every label. Triggers keep per-sample summary columns
//! (`label_count`, `disagree`, `reviewed`) current so that every queue's next-sample query is a
//! single indexed lookup even at a million samples.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pipeline::score::CLASS_NAMES;

pub const DB_FILE: &str = "dataset.sqlite";
pub const BLOB_DIR: &str = "blobs";

/// Whether `dir` holds a dataset (its database file), as opposed to an empty or unrelated folder.
pub fn is_dataset(dir: &Path) -> bool {
    dir.join(DB_FILE).is_file()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not an rfstudio dataset (no dataset.sqlite); create one with `rfstudio dataset init {0}`")]
    NotADataset(String),
    #[error("{path}: the dataset was written by a newer rfstudio (schema {found}, this build knows up to {known})")]
    NewerSchema { path: PathBuf, found: i64, known: i64 },
    #[error(
        "unknown label {given:?}: use {} or a class name ({names}) or `unsuitable`",
        if *key_base_one { "a key 1-5" } else { "a class id 0-4" },
        names = CLASS_NAMES.join(", ")
    )]
    UnknownLabel { given: String, key_base_one: bool },
    #[error("invalid annotator name {0:?}: {1}")]
    BadAnnotator(String, &'static str),
    #[error("no sample with id {0}")]
    NoSample(i64),
    #[error(transparent)]
    RunFolder(#[from] crate::pipeline::run_folder::RunFolderError),
}

/// Where a sample came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Generated,
    Imported,
    Synthetic,
    Rf1m,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Generated => "generated",
            Source::Imported => "imported",
            Source::Synthetic => "synthetic",
            Source::Rf1m => "rf1m",
        }
    }
    fn parse(s: &str) -> Source {
        match s {
            "generated" => Source::Generated,
            "synthetic" => Source::Synthetic,
            "rf1m" => Source::Rf1m,
            _ => Source::Imported,
        }
    }
}

/// A label decision: one of the five classes, or the Unsuitable flag (bad source product).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Class(u8),
    Unsuitable,
}

impl Decision {
    /// Parse `0`-`4` ids, `1`-`5` keys (with `key_base_one`), class names (case-insensitive,
    /// inner spaces/underscores/hyphens ignored) or `unsuitable`. Anything numeric outside the
    /// range (negative numbers included) is an error, never another class.
    pub fn parse(s: &str, key_base_one: bool) -> Result<Self, StoreError> {
        let unknown = || StoreError::UnknownLabel {
            given: s.to_string(),
            key_base_one,
        };
        let t = s.trim();
        if t.is_empty() || t.starts_with(['-', '+', '_']) || t.ends_with(['-', '_']) {
            return Err(unknown());
        }
        if t.chars().all(|c| c.is_ascii_digit()) {
            let n: i64 = t.parse().map_err(|_| unknown())?;
            let id = if key_base_one { n - 1 } else { n };
            if (0..5).contains(&id) {
                return Ok(Decision::Class(id as u8));
            }
            return Err(unknown());
        }
        let norm: String = t
            .chars()
            .filter(|c| !matches!(c, ' ' | '_' | '-'))
            .flat_map(char::to_lowercase)
            .collect();
        if norm == "unsuitable" || norm == "u" {
            return Ok(Decision::Unsuitable);
        }
        for (i, name) in CLASS_NAMES.iter().enumerate() {
            let n: String = name
                .chars()
                .filter(|c| *c != ' ')
                .flat_map(char::to_lowercase)
                .collect();
            if n == norm {
                return Ok(Decision::Class(i as u8));
            }
        }
        Err(unknown())
    }

    pub fn class(self) -> Option<u8> {
        match self {
            Decision::Class(c) => Some(c),
            Decision::Unsuitable => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Decision::Class(c) => CLASS_NAMES.get(c as usize).copied().unwrap_or("?"),
            Decision::Unsuitable => "Unsuitable",
        }
    }
}

/// A new sample to add.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NewSample {
    /// Groups the images of one product (train/val/test split by product).
    pub product_id: String,
    /// Files to copy into the blob store (None = not available).
    pub product_image: Option<PathBuf>,
    pub image: PathBuf,
    pub depth: Option<PathBuf>,
    pub saliency: Option<PathBuf>,
    pub title: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: Option<i64>,
    pub model: Option<String>,
    pub controlnet: Option<String>,
    pub probs: Option<[f32; 5]>,
}

/// What `Store::add_sample` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddedSample {
    /// The sample holding the image (new, or the one that already had it).
    pub id: i64,
    /// False when the image was already in the dataset.
    pub new: bool,
}

/// The most characters an annotator name may have.
pub const MAX_ANNOTATOR_CHARS: usize = 64;

/// Annotator names are shown in tables and used as keys: non-empty, no surrounding white space,
/// no control characters, at most `MAX_ANNOTATOR_CHARS` characters.
pub fn validate_annotator(name: &str) -> Result<(), StoreError> {
    let bad = |why| Err(StoreError::BadAnnotator(name.to_string(), why));
    if name.trim().is_empty() {
        return bad("it is empty");
    }
    if name.chars().any(char::is_control) {
        return bad("it contains control characters");
    }
    if name.trim() != name {
        return bad("it starts or ends with white space");
    }
    if name.chars().count() > MAX_ANNOTATOR_CHARS {
        return bad("it is longer than 64 characters");
    }
    Ok(())
}

/// A stored sample.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    pub id: i64,
    pub product_id: String,
    pub product_path: Option<String>,
    pub image_path: String,
    pub image_hash: String,
    pub depth_path: Option<String>,
    pub saliency_path: Option<String>,
    pub title: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: Option<i64>,
    pub model: Option<String>,
    pub controlnet: Option<String>,
    pub probs: Option<[f32; 5]>,
    pub source: Source,
    pub label_count: i64,
}

/// A stored label.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Label {
    pub id: i64,
    pub sample_id: i64,
    pub annotator: String,
    pub decision: Decision,
    pub created_at: String,
    pub lead_ms: i64,
    pub review: bool,
}

const SCHEMA_VERSION: i64 = 2;

/// RFNet's predicted class as SQL: the arg-max of `p0..p4` (a tie goes to the lower class), 5
/// when the sample has no prediction. A macro so that the `samples_predicted` index and the
/// queries that must walk it hold the same expression (SQLite only uses an expression index for
/// an identical expression).
macro_rules! predicted_class_sql {
    () => {
        "(CASE WHEN max(p0, p1, p2, p3, p4) IS NULL THEN 5 WHEN p0 = max(p0, p1, p2, p3, p4) THEN 0 WHEN p1 = max(p0, p1, p2, p3, p4) THEN 1 WHEN p2 = max(p0, p1, p2, p3, p4) THEN 2 WHEN p3 = max(p0, p1, p2, p3, p4) THEN 3 ELSE 4 END)"
    };
}

/// RFNet's confidence in its predicted class (NULL without a prediction).
macro_rules! confidence_sql {
    () => {
        "max(p0, p1, p2, p3, p4)"
    };
}

/// Leaves out the samples the annotator (`?1`) already labelled in the queue's mode (`?2`: 1 for
/// review labels, 0 for ordinary ones).
macro_rules! not_mine_sql {
    () => {
        "NOT EXISTS (SELECT 1 FROM labels l WHERE l.sample_id = samples.id AND l.annotator = ?1 AND l.review = ?2)"
    };
}

/// The queues' page queries, 64 ids each. Each `ORDER BY` spells out the columns of the index
/// the queue walks, so that SQLite reads the index in order instead of sorting the table. The
/// orders that are not by id page with `OFFSET ?4`; their `?3 >= 0` is always true (they bind 0)
/// and only gives every queue query the same leading parameters.
const QUEUE_UNLABELLED_SQL: &str = concat!(
    "SELECT id FROM samples WHERE label_count = 0 AND id > ?3 AND ",
    not_mine_sql!(),
    " ORDER BY label_count, id LIMIT 64"
);
const QUEUE_REVIEW_SQL: &str = concat!(
    "SELECT id FROM samples WHERE disagree = 1 AND reviewed = 0 AND id > ?3 AND ",
    not_mine_sql!(),
    " ORDER BY disagree, reviewed, id LIMIT 64"
);
const QUEUE_ENTROPY_SQL: &str = concat!(
    "SELECT id FROM samples WHERE label_count = 0 AND entropy IS NOT NULL AND ?3 >= 0 AND ",
    not_mine_sql!(),
    " ORDER BY label_count, entropy DESC, id LIMIT 64 OFFSET ?4"
);
const QUEUE_MARGIN_SQL: &str = concat!(
    "SELECT id FROM samples WHERE label_count = 0 AND margin IS NOT NULL AND ?3 >= 0 AND ",
    not_mine_sql!(),
    " ORDER BY label_count, margin ASC, id LIMIT 64 OFFSET ?4"
);
const QUEUE_PREDICTED_SQL: &str = concat!(
    "SELECT id FROM samples WHERE label_count = 0 AND ?3 >= 0 AND ",
    not_mine_sql!(),
    " ORDER BY label_count, ",
    predicted_class_sql!(),
    ", ",
    confidence_sql!(),
    " DESC, id LIMIT 64 OFFSET ?4"
);

/// Unlabelled samples not labelled by the annotator (`?2`, in any mode) from id `?1` on: the
/// random queue jumps to a random id and takes the first of these it has not shown yet.
const UNLABELLED_FROM_SQL: &str = "SELECT id FROM samples WHERE label_count = 0 AND id >= ?1 AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.sample_id = samples.id AND l.annotator = ?2) ORDER BY label_count, id LIMIT 16";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QueueOrder {
    /// Samples nobody has labelled, oldest first.
    Unlabelled,
    /// Unlabelled samples in random order.
    Random,
    /// Unlabelled samples, most uncertain RFNet prediction (highest entropy) first.
    Entropy,
    /// Unlabelled samples, smallest top-1/top-2 margin first.
    Margin,
    /// Unlabelled samples grouped by RFNet's predicted class (class 0 first), most confident
    /// first within a class; samples without a prediction last. Similar images sit together, so
    /// a grid page can be labelled a row at a time.
    Predicted,
    /// Samples whose labels disagree and that have no review decision yet.
    Review,
}

impl QueueOrder {
    /// Every order, in the order menus and benchmarks list them.
    pub const ALL: [QueueOrder; 6] = [
        QueueOrder::Unlabelled,
        QueueOrder::Random,
        QueueOrder::Entropy,
        QueueOrder::Margin,
        QueueOrder::Predicted,
        QueueOrder::Review,
    ];
}

/// A queue's page query, and whether it pages by id (`?3`, the last id of the previous page)
/// rather than by offset (`?4`). The random queue has no order of its own: its pages are the
/// unlabelled queue's (sessions draw from it with `Store::unlabelled_from`).
fn queue_sql(order: QueueOrder) -> (&'static str, bool) {
    match order {
        QueueOrder::Unlabelled | QueueOrder::Random => (QUEUE_UNLABELLED_SQL, true),
        QueueOrder::Review => (QUEUE_REVIEW_SQL, true),
        QueueOrder::Entropy => (QUEUE_ENTROPY_SQL, false),
        QueueOrder::Margin => (QUEUE_MARGIN_SQL, false),
        QueueOrder::Predicted => (QUEUE_PREDICTED_SQL, false),
    }
}

const MIGRATIONS: &[&str] = &[
    // v1
    r#"
    CREATE TABLE samples (
        id INTEGER PRIMARY KEY,
        product_id TEXT NOT NULL,
        product_path TEXT, product_hash TEXT,
        image_path TEXT NOT NULL,
        image_hash TEXT NOT NULL UNIQUE,
        depth_path TEXT, depth_hash TEXT,
        saliency_path TEXT, saliency_hash TEXT,
        title TEXT NOT NULL DEFAULT '',
        prompt TEXT NOT NULL DEFAULT '',
        negative_prompt TEXT NOT NULL DEFAULT '',
        seed INTEGER, model TEXT, controlnet TEXT,
        p0 REAL, p1 REAL, p2 REAL, p3 REAL, p4 REAL,
        entropy REAL, margin REAL,
        source TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
        label_count INTEGER NOT NULL DEFAULT 0,
        disagree INTEGER NOT NULL DEFAULT 0,
        reviewed INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX samples_product ON samples(product_id);
    CREATE INDEX samples_unlabelled ON samples(label_count, id);
    CREATE INDEX samples_entropy ON samples(label_count, entropy DESC, id);
    CREATE INDEX samples_margin ON samples(label_count, margin ASC, id);
    CREATE INDEX samples_review ON samples(disagree, reviewed, id);
    CREATE TABLE labels (
        id INTEGER PRIMARY KEY,
        sample_id INTEGER NOT NULL REFERENCES samples(id) ON DELETE CASCADE,
        annotator TEXT NOT NULL,
        class INTEGER CHECK (class IS NULL OR class BETWEEN 0 AND 4),
        unsuitable INTEGER NOT NULL DEFAULT 0 CHECK (unsuitable IN (0, 1)),
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
        lead_ms INTEGER NOT NULL DEFAULT 0,
        review INTEGER NOT NULL DEFAULT 0 CHECK (review IN (0, 1)),
        CHECK ((unsuitable = 1) = (class IS NULL))
    );
    CREATE INDEX labels_sample ON labels(sample_id, annotator);
    CREATE INDEX labels_annotator ON labels(annotator, id);
    CREATE TRIGGER labels_ai AFTER INSERT ON labels BEGIN
        UPDATE samples SET
            label_count = (SELECT COUNT(*) FROM labels WHERE sample_id = NEW.sample_id AND review = 0),
            disagree = (SELECT COUNT(DISTINCT COALESCE(class, -1)) FROM labels WHERE sample_id = NEW.sample_id AND review = 0) > 1,
            reviewed = EXISTS (SELECT 1 FROM labels WHERE sample_id = NEW.sample_id AND review = 1)
        WHERE id = NEW.sample_id;
    END;
    CREATE TRIGGER labels_ad AFTER DELETE ON labels BEGIN
        UPDATE samples SET
            label_count = (SELECT COUNT(*) FROM labels WHERE sample_id = OLD.sample_id AND review = 0),
            disagree = (SELECT COUNT(DISTINCT COALESCE(class, -1)) FROM labels WHERE sample_id = OLD.sample_id AND review = 0) > 1,
            reviewed = EXISTS (SELECT 1 FROM labels WHERE sample_id = OLD.sample_id AND review = 1)
        WHERE id = OLD.sample_id;
    END;
    "#,
    // v2: the queue grouped by RFNet's prediction walks an index, as the other queues do.
    concat!(
        "CREATE INDEX samples_predicted ON samples(label_count, ",
        predicted_class_sql!(),
        ", ",
        confidence_sql!(),
        " DESC, id);"
    ),
];

/// An open dataset.
pub struct Store {
    dir: PathBuf,
    db_path: PathBuf,
    conn: Connection,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Entropy and top-1/top-2 margin of a probability vector (active learning).
pub fn uncertainty(p: &[f32; 5]) -> (f64, f64) {
    let entropy = -p
        .iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| x as f64 * (x as f64).ln())
        .sum::<f64>();
    let mut s = p.map(|x| x as f64);
    s.sort_by(|a, b| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal));
    (entropy, s[0] - s[1])
}

impl Store {
    fn sql_err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sqlite {
            path: self.db_path.clone(),
            source,
        }
    }

    /// Create a dataset folder (idempotent: opening an existing one is fine).
    pub fn init(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir.join(BLOB_DIR)).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Self::open_inner(dir, true)
    }

    /// Open an existing dataset.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        if !is_dataset(dir) {
            return Err(StoreError::NotADataset(dir.display().to_string()));
        }
        Self::open_inner(dir, false)
    }

    fn open_inner(dir: &Path, create: bool) -> Result<Self, StoreError> {
        let db_path = dir.join(DB_FILE);
        let err = |source| StoreError::Sqlite {
            path: db_path.clone(),
            source,
        };
        let flags = if create {
            rusqlite::OpenFlags::default()
        } else {
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn = Connection::open_with_flags(&db_path, flags).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        // NORMAL in WAL mode: a killed process never corrupts or loses committed transactions.
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(err)?;
        let store = Self {
            dir: dir.to_path_buf(),
            db_path: db_path.clone(),
            conn,
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let e = self.sql_err();
        self.conn
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')));",
            )
            .map_err(&e)?;
        let current: i64 = self
            .conn
            .query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0))
            .map_err(&e)?;
        if current > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: self.db_path.clone(),
                found: current,
                known: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let version = i as i64 + 1;
            if version <= current {
                continue;
            }
            // One transaction per migration: a crash leaves the previous version intact. The
            // version is read again under the write lock: another process opening the same
            // dataset may have applied this migration since `current` was read, and running it
            // twice would fail on the objects it creates.
            let applied = || -> rusqlite::Result<()> {
                self.conn.execute_batch("BEGIN IMMEDIATE")?;
                let now: i64 =
                    self.conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0))?;
                if now < version {
                    self.conn.execute_batch(&format!("{sql}; INSERT INTO schema_version(version) VALUES ({version});"))?;
                }
                self.conn.execute_batch("COMMIT")
            };
            applied().map_err(|source| {
                let _ = self.conn.execute_batch("ROLLBACK;");
                StoreError::Sqlite {
                    path: self.db_path.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
            .map_err(self.sql_err())
    }

    /// Copy a file into the blob store; returns (relative path, sha256).
    pub fn put_blob(&self, file: &Path) -> Result<(String, String), StoreError> {
        let io = |source| StoreError::Io {
            path: file.to_path_buf(),
            source,
        };
        let bytes = std::fs::read(file).map_err(io)?;
        let hash = sha256_hex(&bytes);
        let ext = file
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_else(|| "bin".into());
        let rel = format!("{BLOB_DIR}/{}/{hash}.{ext}", &hash[..2]);
        let dest = self.dir.join(&rel);
        if !dest.exists() {
            let parent = dest.parent().unwrap_or(&self.dir).to_path_buf();
            std::fs::create_dir_all(&parent).map_err(|source| StoreError::Io {
                path: parent.clone(),
                source,
            })?;
            crate::files::write_atomic(&dest, &bytes).map_err(|e| StoreError::Io {
                path: dest.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        Ok((rel, hash))
    }

    /// Add a sample (copying its images into the blob store). Samples are keyed by the content
    /// hash of the generated image: adding an image that is already stored returns the existing
    /// sample's id with `new: false` (re-imports add nothing twice). Safe against concurrent
    /// writers: the check and the insert run in one `BEGIN IMMEDIATE` transaction and the id comes
    /// from the row itself (`RETURNING`), never from the connection's last insert.
    pub fn add_sample(&self, s: &NewSample, source: Source) -> Result<AddedSample, StoreError> {
        let (image_path, image_hash) = self.put_blob(&s.image)?;
        // Samples are never deleted, so an id found here stays valid without a transaction.
        if let Some(id) = self.find_by_hash(&image_hash)? {
            return Ok(AddedSample { id, new: false });
        }
        let blob = |p: &Option<PathBuf>| -> Result<(Option<String>, Option<String>), StoreError> {
            match p {
                Some(p) => {
                    let (a, b) = self.put_blob(p)?;
                    Ok((Some(a), Some(b)))
                }
                None => Ok((None, None)),
            }
        };
        let (product_path, product_hash) = blob(&s.product_image)?;
        let (depth_path, depth_hash) = blob(&s.depth)?;
        let (saliency_path, saliency_hash) = blob(&s.saliency)?;
        let (entropy, margin) = match &s.probs {
            Some(p) => {
                let (e, m) = uncertainty(p);
                (Some(e), Some(m))
            }
            None => (None, None),
        };
        let p = |i: usize| s.probs.map(|p| p[i] as f64);
        let e = self.sql_err();
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)
            .map_err(&e)?;
        let inserted: Option<i64> = tx
            .query_row(
                "INSERT INTO samples (product_id, product_path, product_hash, image_path, image_hash,
                    depth_path, depth_hash, saliency_path, saliency_hash, title, prompt, negative_prompt,
                    seed, model, controlnet, p0, p1, p2, p3, p4, entropy, margin, source)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)
                 ON CONFLICT(image_hash) DO NOTHING RETURNING id",
                params![
                    s.product_id,
                    product_path,
                    product_hash,
                    image_path,
                    image_hash,
                    depth_path,
                    depth_hash,
                    saliency_path,
                    saliency_hash,
                    s.title,
                    s.prompt,
                    s.negative_prompt,
                    s.seed,
                    s.model,
                    s.controlnet,
                    p(0),
                    p(1),
                    p(2),
                    p(3),
                    p(4),
                    entropy,
                    margin,
                    source.as_str()
                ],
                |r| r.get(0),
            )
            .optional()
            .map_err(&e)?;
        let added = match inserted {
            Some(id) => AddedSample { id, new: true },
            // Another writer stored the same image between the check above and this transaction.
            None => AddedSample {
                id: tx
                    .query_row("SELECT id FROM samples WHERE image_hash = ?1", [&image_hash], |r| r.get(0))
                    .map_err(&e)?,
                new: false,
            },
        };
        tx.commit().map_err(&e)?;
        Ok(added)
    }

    /// Set RFNet probabilities of a sample (updates the active-learning order).
    pub fn set_probs(&self, id: i64, probs: &[f32; 5]) -> Result<(), StoreError> {
        let (e, m) = uncertainty(probs);
        let n = self
            .conn
            .execute(
                "UPDATE samples SET p0=?2, p1=?3, p2=?4, p3=?5, p4=?6, entropy=?7, margin=?8 WHERE id=?1",
                params![id, probs[0], probs[1], probs[2], probs[3], probs[4], e, m],
            )
            .map_err(self.sql_err())?;
        if n == 0 {
            return Err(StoreError::NoSample(id));
        }
        Ok(())
    }

    pub fn sample(&self, id: i64) -> Result<Sample, StoreError> {
        self.conn
            .query_row(&format!("{SAMPLE_SELECT} WHERE id = ?1"), [id], row_to_sample)
            .optional()
            .map_err(self.sql_err())?
            .ok_or(StoreError::NoSample(id))
    }

    pub fn sample_count(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM samples", [], |r| r.get(0))
            .map_err(self.sql_err())
    }

    /// Find a sample by its stored image path, original file name hash, or id string.
    pub fn find_by_hash(&self, hash: &str) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row("SELECT id FROM samples WHERE image_hash = ?1", [hash], |r| r.get(0))
            .optional()
            .map_err(self.sql_err())
    }

    /// Record a label in its own transaction. An annotator's earlier (non-review or review,
    /// matching `review`) label on the same sample is replaced; the replaced label is returned
    /// so that undo can restore it.
    pub fn put_label(
        &self,
        sample_id: i64,
        annotator: &str,
        decision: Decision,
        lead_ms: i64,
        review: bool,
    ) -> Result<(Label, Option<Label>), StoreError> {
        validate_annotator(annotator)?;
        let e = self.sql_err();
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)
            .map_err(&e)?;
        let exists: bool = tx
            .query_row("SELECT EXISTS(SELECT 1 FROM samples WHERE id = ?1)", [sample_id], |r| r.get(0))
            .map_err(&e)?;
        if !exists {
            return Err(StoreError::NoSample(sample_id));
        }
        let previous = tx
            .query_row(
                &format!("{LABEL_SELECT} WHERE sample_id = ?1 AND annotator = ?2 AND review = ?3"),
                params![sample_id, annotator, review as i64],
                row_to_label,
            )
            .optional()
            .map_err(&e)?;
        if let Some(p) = &previous {
            tx.execute("DELETE FROM labels WHERE id = ?1", [p.id]).map_err(&e)?;
        }
        tx.execute(
            "INSERT INTO labels (sample_id, annotator, class, unsuitable, lead_ms, review) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                sample_id,
                annotator,
                decision.class().map(i64::from),
                (decision == Decision::Unsuitable) as i64,
                lead_ms,
                review as i64
            ],
        )
        .map_err(&e)?;
        let id = tx.last_insert_rowid();
        let label = tx
            .query_row(&format!("{LABEL_SELECT} WHERE id = ?1"), [id], row_to_label)
            .map_err(&e)?;
        tx.commit().map_err(&e)?;
        Ok((label, previous))
    }

    /// Delete a label (undo), optionally restoring the one it had replaced, in one transaction.
    pub fn remove_label(&self, label_id: i64, restore: Option<&Label>) -> Result<(), StoreError> {
        let e = self.sql_err();
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)
            .map_err(&e)?;
        tx.execute("DELETE FROM labels WHERE id = ?1", [label_id]).map_err(&e)?;
        if let Some(l) = restore {
            tx.execute(
                "INSERT INTO labels (id, sample_id, annotator, class, unsuitable, created_at, lead_ms, review)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    l.id,
                    l.sample_id,
                    l.annotator,
                    l.decision.class().map(i64::from),
                    (l.decision == Decision::Unsuitable) as i64,
                    l.created_at,
                    l.lead_ms,
                    l.review as i64
                ],
            )
            .map_err(&e)?;
        }
        tx.commit().map_err(&e)
    }

    /// Run a query and collect every row.
    fn query_all<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.conn.prepare(sql).map_err(self.sql_err())?;
        let rows = stmt
            .query_map(params, row)
            .map_err(self.sql_err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql_err())?;
        Ok(rows)
    }

    pub fn labels_of(&self, sample_id: i64) -> Result<Vec<Label>, StoreError> {
        self.query_all(&format!("{LABEL_SELECT} WHERE sample_id = ?1 ORDER BY id"), [sample_id], row_to_label)
    }

    pub fn all_labels(&self) -> Result<Vec<Label>, StoreError> {
        self.query_all(&format!("{LABEL_SELECT} ORDER BY id"), [], row_to_label)
    }

    /// Every sample (for export and splits).
    pub fn all_samples(&self) -> Result<Vec<Sample>, StoreError> {
        self.query_all(&format!("{SAMPLE_SELECT} ORDER BY id"), [], row_to_sample)
    }

    /// `PRAGMA integrity_check` (used after crash tests).
    pub fn integrity_ok(&self) -> Result<bool, StoreError> {
        let r: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(self.sql_err())?;
        Ok(r == "ok")
    }

    /// One page (up to 64 ids) of a queue in queue order, leaving out the samples `annotator`
    /// already labelled (with review labels in the review queue, ordinary ones otherwise). The
    /// unlabelled and review queues continue after `after_id` (the last id of the previous
    /// page), the others skip `offset` rows: callers keep both and the queue uses its own. The
    /// statements are cached on the connection: the GUI asks for pages many times a second.
    pub fn queue_page(
        &self,
        order: QueueOrder,
        annotator: &str,
        after_id: i64,
        offset: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let review = (order == QueueOrder::Review) as i64;
        let (sql, paged_by_id) = queue_sql(order);
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.sql_err())?;
        let ids = if paged_by_id {
            stmt.query_map(params![annotator, review, after_id], |r| r.get(0))
                .and_then(|rows| rows.collect())
        } else {
            stmt.query_map(params![annotator, review, 0, offset], |r| r.get(0))
                .and_then(|rows| rows.collect())
        };
        ids.map_err(self.sql_err())
    }

    /// The largest sample id (None when the dataset is empty): the range the random queue draws
    /// its starting points from.
    pub fn max_sample_id(&self) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row("SELECT MAX(id) FROM samples", [], |r| r.get(0))
            .map_err(self.sql_err())
    }

    /// Up to 16 unlabelled samples from id `start` on, in id order, that `annotator` has not
    /// labelled: one draw of the random queue (cached statement, like the queue pages).
    pub fn unlabelled_from(&self, start: i64, annotator: &str) -> Result<Vec<i64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(UNLABELLED_FROM_SQL).map_err(self.sql_err())?;
        stmt.query_map(params![start, annotator], |r| r.get(0))
            .and_then(|r| r.collect())
            .map_err(self.sql_err())
    }

    /// How many samples nobody has labelled yet (review labels do not count).
    pub fn unlabelled_count(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM samples WHERE label_count = 0", [], |r| r.get(0))
            .map_err(self.sql_err())
    }

    /// Whether `annotator` has a label (ordinary or review) on the sample.
    pub fn has_label_by(&self, sample_id: i64, annotator: &str) -> Result<bool, StoreError> {
        let found: Option<i64> = self
            .conn
            .query_row(
                "SELECT 1 FROM labels WHERE sample_id = ?1 AND annotator = ?2",
                params![sample_id, annotator],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql_err())?;
        Ok(found.is_some())
    }

    /// Insert sample rows without image files (source `synthetic`) in one transaction, for
    /// benchmarks at a scale where `add_sample`'s blob copies and per-sample transactions would
    /// dominate. `progress` gets the number inserted after every 100 000 rows. Returns how many
    /// rows were inserted.
    pub fn bulk_insert_samples(
        &self,
        samples: impl IntoIterator<Item = SyntheticSample>,
        progress: &mut dyn FnMut(i64),
    ) -> Result<i64, StoreError> {
        let e = self.sql_err();
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Deferred)
            .map_err(&e)?;
        let mut inserted = 0;
        {
            let mut ins = tx
                .prepare(
                    "INSERT INTO samples (product_id, image_path, image_hash, title, prompt, p0, p1, p2, p3, p4, entropy, margin, source)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'synthetic')",
                )
                .map_err(&e)?;
            for s in samples {
                let p = s.probs;
                ins.execute(params![
                    s.product_id,
                    s.image_path,
                    s.image_hash,
                    s.title,
                    s.prompt,
                    p[0], p[1], p[2], p[3], p[4], s.entropy, s.margin
                ])
                .map_err(&e)?;
                inserted += 1;
                if inserted % 100_000 == 0 {
                    progress(inserted);
                }
            }
        }
        tx.commit().map_err(&e)?;
        Ok(inserted)
    }

    /// Insert `(sample_id, annotator, class)` labels in one transaction (the summary triggers
    /// still run per row), for benchmarks. Returns how many were inserted.
    pub fn bulk_insert_labels(&self, labels: impl IntoIterator<Item = (i64, String, i64)>) -> Result<i64, StoreError> {
        let e = self.sql_err();
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Deferred)
            .map_err(&e)?;
        let mut inserted = 0;
        {
            let mut lab = tx
                .prepare("INSERT INTO labels (sample_id, annotator, class, unsuitable) VALUES (?1, ?2, ?3, 0)")
                .map_err(&e)?;
            for (sample_id, annotator, class) in labels {
                lab.execute(params![sample_id, annotator, class]).map_err(&e)?;
                inserted += 1;
            }
        }
        tx.commit().map_err(&e)?;
        Ok(inserted)
    }

    /// After a bulk load: fold the write-ahead log into the database file and refresh the query
    /// planner's statistics, so that the next queries are timed as on a settled dataset.
    pub fn optimize(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE); ANALYZE;")
            .map_err(self.sql_err())
    }

    /// The query plan of `queue_page`'s statement for `order`, one line per step (tests check
    /// that each queue walks an index instead of sorting the table).
    #[doc(hidden)]
    pub fn explain_queue(&self, order: QueueOrder) -> Result<Vec<String>, StoreError> {
        let (sql, paged_by_id) = queue_sql(order);
        let mut stmt = self
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .map_err(self.sql_err())?;
        let detail = |r: &rusqlite::Row<'_>| r.get::<_, String>(3);
        let plan = if paged_by_id {
            stmt.query_map(params!["", 0, 0], detail).and_then(|rows| rows.collect())
        } else {
            stmt.query_map(params!["", 0, 0, 0], detail).and_then(|rows| rows.collect())
        };
        plan.map_err(self.sql_err())
    }
}

/// A sample row for `Store::bulk_insert_samples`: paths and hashes are stored as given (no
/// files behind them), with RFNet probabilities and their uncertainty.
#[derive(Clone, Debug)]
pub struct SyntheticSample {
    pub product_id: String,
    pub image_path: String,
    pub image_hash: String,
    pub title: String,
    pub prompt: String,
    pub probs: [f32; 5],
    pub entropy: f64,
    pub margin: f64,
}

const SAMPLE_SELECT: &str = "SELECT id, product_id, product_path, image_path, image_hash, depth_path, saliency_path,
    title, prompt, negative_prompt, seed, model, controlnet, p0, p1, p2, p3, p4, source, label_count FROM samples";

const LABEL_SELECT: &str =
    "SELECT id, sample_id, annotator, class, unsuitable, created_at, lead_ms, review FROM labels";

fn row_to_sample(r: &rusqlite::Row<'_>) -> rusqlite::Result<Sample> {
    let p: [Option<f64>; 5] = [r.get(13)?, r.get(14)?, r.get(15)?, r.get(16)?, r.get(17)?];
    let probs = if p.iter().all(Option::is_some) {
        Some(p.map(|x| x.unwrap_or(0.0) as f32))
    } else {
        None
    };
    let source: String = r.get(18)?;
    Ok(Sample {
        id: r.get(0)?,
        product_id: r.get(1)?,
        product_path: r.get(2)?,
        image_path: r.get(3)?,
        image_hash: r.get(4)?,
        depth_path: r.get(5)?,
        saliency_path: r.get(6)?,
        title: r.get(7)?,
        prompt: r.get(8)?,
        negative_prompt: r.get(9)?,
        seed: r.get(10)?,
        model: r.get(11)?,
        controlnet: r.get(12)?,
        probs,
        source: Source::parse(&source),
        label_count: r.get(19)?,
    })
}

fn row_to_label(r: &rusqlite::Row<'_>) -> rusqlite::Result<Label> {
    let class: Option<i64> = r.get(3)?;
    let unsuitable: i64 = r.get(4)?;
    Ok(Label {
        id: r.get(0)?,
        sample_id: r.get(1)?,
        annotator: r.get(2)?,
        decision: match (unsuitable, class) {
            (0, Some(c)) => Decision::Class(c as u8),
            _ => Decision::Unsuitable,
        },
        created_at: r.get(5)?,
        lead_ms: r.get(6)?,
        review: r.get::<_, i64>(7)? != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_parse_ids_keys_names() {
        assert_eq!(Decision::parse("0", false).ok(), Some(Decision::Class(0)));
        assert_eq!(Decision::parse("5", true).ok(), Some(Decision::Class(4)));
        assert_eq!(Decision::parse("space mismatch", false).ok(), Some(Decision::Class(1)));
        assert_eq!(Decision::parse("Shape_Hallucination", false).ok(), Some(Decision::Class(4)));
        assert_eq!(Decision::parse("unsuitable", false).ok(), Some(Decision::Unsuitable));
        assert!(Decision::parse("7", false).is_err());
        assert!(Decision::parse("nice", false).unwrap_err().to_string().contains("nice"));
    }

    #[test]
    fn uncertainty_is_max_for_uniform() {
        let (e, m) = uncertainty(&[0.2; 5]);
        assert!((e - 5f64.ln()).abs() < 1e-6 && m.abs() < 1e-6);
        let (e, m) = uncertainty(&[1.0, 0.0, 0.0, 0.0, 0.0]);
        assert!(e.abs() < 1e-9 && (m - 1.0).abs() < 1e-9);
    }
}

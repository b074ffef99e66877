//! The RF1M annotation store. A dataset is a folder holding one SQLite database
//! (`DIR/dataset.sqlite`, WAL mode, the default), or a PostgreSQL database named by a
//! `postgres://` URL for teams. Either way images are content-addressed files
//! (`blobs/ab/<sha256>.<ext>`): next to the SQLite file, or under a shared image folder whose
//! path the PostgreSQL database records (`settings.image_root`), so every client reads the same
//! files and the database never holds image bytes. Schema migrations are recorded in
//! `schema_version`; both servers get the same schema version by version (`store/schema.rs`).
//!
//! Samples and labels are separate tables. Every label write is one transaction, so a killed
//! process loses at most the label being written and two processes labelling the same dataset
//! both keep every label. Triggers keep per-sample summary columns (`label_count`, `disagree`,
//! `reviewed`) current so that every queue's next-sample query is a single indexed lookup even at
//! a million samples.

pub(crate) mod db;
pub mod pgconf;
mod schema;
mod team;

pub use self::team::{Claim, Role, TeamSettings};

/// The newest dataset schema this build knows (older datasets are migrated when opened).
pub const SCHEMA_VERSION: i64 = schema::VERSION;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use self::db::{Db, Dialect, Row, Val, params};
use self::schema::{confidence_sql, predicted_class_sql};
use crate::pipeline::score::CLASS_NAMES;

pub const DB_FILE: &str = "dataset.sqlite";
pub const BLOB_DIR: &str = "blobs";

/// Whether `location` holds a dataset: a folder with its database file, or a PostgreSQL URL
/// (whether that database is a dataset shows when it is opened).
pub fn is_dataset(location: &Path) -> bool {
    pgconf::is_url(location) || location.join(DB_FILE).is_file()
}

/// How a dataset location reads in messages: the folder, or the URL without its password.
pub fn describe_location(location: &Path) -> String {
    let s = location.display().to_string();
    if pgconf::is_url(location) { pgconf::redact_url(&s) } else { s }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// `error` is not the error's source on purpose: the message already holds the server's
    /// words, and the client's own text would repeat them.
    #[error("{target}: {}", pg_message(error))]
    Postgres { target: String, error: postgres::Error },
    #[error("{url}: {reason}")]
    BadDatabaseUrl { url: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not an rfstudio dataset (no dataset.sqlite); create one with `rfstudio dataset init {0}`")]
    NotADataset(String),
    #[error(
        "{0}: not an rfstudio dataset yet (no image folder recorded); create it with `rfstudio dataset init {0} --images SHARED_DIR`"
    )]
    NoImageRoot(String),
    #[error("{}: the dataset at {location} keeps its images in {recorded}; open it without --images or pass that folder", given.display())]
    OtherImageRoot { given: PathBuf, location: String, recorded: String },
    #[error("{path}: the dataset was written by a newer rfstudio (schema {found}, this build knows up to {known})")]
    NewerSchema { path: PathBuf, found: i64, known: i64 },
    #[error("{location} already holds {samples} sample(s): copy a dataset only into an empty one")]
    NotEmpty { location: String, samples: i64 },
    #[error("the database returned {found} in column {column} where {expected} was expected: is this an rfstudio dataset?")]
    UnexpectedValue {
        column: usize,
        expected: &'static str,
        found: String,
    },
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
    #[error("sample {sample} is not assigned to {annotator}: it already has its {overlap} label(s) or is leased to others (ask for the next sample)")]
    NotAssigned { sample: i64, annotator: String, overlap: i64 },
    #[error("team setting {key}: {why}")]
    BadSetting { key: String, why: String },
    #[error("{0}: roles are enforced by a PostgreSQL server; a folder dataset belongs to whoever can write its files")]
    RolesNeedPostgres(String),
    #[error(transparent)]
    RunFolder(#[from] crate::pipeline::run_folder::RunFolderError),
}

impl StoreError {
    /// The server refused the connection's role the read or write (team roles on PostgreSQL).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, StoreError::Postgres { error, .. } if error.code() == Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE))
    }
}

/// The server's own message (with its detail and hint) rather than the client's "db error".
fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = db.message().to_string();
            if let Some(d) = db.detail() {
                m.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                m.push_str(&format!("; {h}"));
            }
            m
        }
        None => {
            let (outer, inner) = (e.to_string(), std::error::Error::source(e).map(|s| s.to_string()));
            match inner {
                // One of the two usually repeats the other (a refused login, a missing database).
                Some(i) if i.contains(&outer) => i,
                Some(i) if outer.contains(&i) => outer,
                Some(i) => format!("{outer}: {i}"),
                None => outer,
            }
        }
    }
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

/// Leaves out the samples the annotator (`?1`) already labelled in the queue's mode (`?2`: 1 for
/// review labels, 0 for ordinary ones). `LIMIT 1 OFFSET 0` keeps the check a per-sample probe of
/// the `labels_sample` index: without it PostgreSQL turns it into an anti-join that reads all of
/// the annotator's labels for every page (4-14 ms at a million samples instead of 0.3 ms).
/// Every "not labelled by" check in the store has this form.
macro_rules! not_mine_sql {
    () => {
        "NOT EXISTS (SELECT 1 FROM labels l WHERE l.sample_id = samples.id AND l.annotator = ?1 AND l.review = ?2 LIMIT 1 OFFSET 0)"
    };
}

/// The queues' page queries, 64 ids each. Each `ORDER BY` spells out the columns of the index
/// the queue walks, so that the database reads the index in order instead of sorting the table.
/// The unlabelled and review queues continue after the id `?3`, the others skip `?3` rows.
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
    "SELECT id FROM samples WHERE label_count = 0 AND entropy IS NOT NULL AND ",
    not_mine_sql!(),
    " ORDER BY label_count, entropy DESC, id LIMIT 64 OFFSET ?3"
);
const QUEUE_MARGIN_SQL: &str = concat!(
    "SELECT id FROM samples WHERE label_count = 0 AND margin IS NOT NULL AND ",
    not_mine_sql!(),
    " ORDER BY label_count, margin ASC, id LIMIT 64 OFFSET ?3"
);
macro_rules! queue_predicted_sql {
    ($max:literal) => {
        concat!(
            "SELECT id FROM samples WHERE label_count = 0 AND ",
            not_mine_sql!(),
            " ORDER BY label_count, ",
            predicted_class_sql!($max),
            ", ",
            confidence_sql!($max),
            " DESC, id LIMIT 64 OFFSET ?3"
        )
    };
}
const QUEUE_PREDICTED_SQLITE: &str = queue_predicted_sql!("max");
const QUEUE_PREDICTED_POSTGRES: &str = queue_predicted_sql!("GREATEST");

/// Unlabelled samples not labelled by the annotator (`?2`, in any mode) from id `?1` on: the
/// random queue jumps to a random id and takes the first of these it has not shown yet.
const UNLABELLED_FROM_SQL: &str = "SELECT id FROM samples WHERE label_count = 0 AND id >= ?1 AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.sample_id = samples.id AND l.annotator = ?2 LIMIT 1 OFFSET 0) ORDER BY label_count, id LIMIT 16";

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
/// rather than by offset. The random queue has no order of its own: its pages are the
/// unlabelled queue's (sessions draw from it with `Store::unlabelled_from`).
fn queue_sql(order: QueueOrder, dialect: Dialect) -> (&'static str, bool) {
    match order {
        QueueOrder::Unlabelled | QueueOrder::Random => (QUEUE_UNLABELLED_SQL, true),
        QueueOrder::Review => (QUEUE_REVIEW_SQL, true),
        QueueOrder::Entropy => (QUEUE_ENTROPY_SQL, false),
        QueueOrder::Margin => (QUEUE_MARGIN_SQL, false),
        QueueOrder::Predicted => match dialect {
            Dialect::Sqlite => (QUEUE_PREDICTED_SQLITE, false),
            Dialect::Postgres => (QUEUE_PREDICTED_POSTGRES, false),
        },
    }
}

/// Key of the advisory lock PostgreSQL openers hold while they migrate the schema ("rfstudio"
/// in ASCII), so that two clients opening a new database never both create its tables.
const MIGRATION_LOCK: i64 = 0x7266_7374_7564_696f;

/// An open dataset.
pub struct Store {
    /// The folder the stored image paths are relative to (the dataset folder, or the shared
    /// image folder of a PostgreSQL dataset).
    dir: PathBuf,
    /// What messages call the dataset (the folder, or the URL without its password).
    location: String,
    db: Db,
    /// The team settings as last read, and when: every label write consults them, and they
    /// change rarely (another client's change is seen within `TEAM_SETTINGS_FRESH`).
    team: std::cell::RefCell<Option<(std::time::Instant, TeamSettings)>>,
}

/// How long `Store` trusts the team settings it read.
const TEAM_SETTINGS_FRESH: Duration = Duration::from_secs(2);

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
    /// Create a dataset folder (idempotent: opening an existing one is fine). A PostgreSQL URL
    /// opens an existing dataset there; a new one needs its image folder: `init_postgres`.
    pub fn init(location: &Path) -> Result<Self, StoreError> {
        if pgconf::is_url(location) {
            return Self::open(location);
        }
        std::fs::create_dir_all(location.join(BLOB_DIR)).map_err(|source| StoreError::Io {
            path: location.to_path_buf(),
            source,
        })?;
        Self::open_sqlite(location, true)
    }

    /// Create (or open) a dataset in the PostgreSQL database at `url`, its images under
    /// `image_root`: a folder every client of the dataset can read and write at that same path
    /// (a shared mount). Opening an existing dataset with another image folder is refused.
    pub fn init_postgres(url: &str, image_root: &Path) -> Result<Self, StoreError> {
        let image_root = std::path::absolute(image_root).map_err(|source| StoreError::Io {
            path: image_root.to_path_buf(),
            source,
        })?;
        std::fs::create_dir_all(image_root.join(BLOB_DIR)).map_err(|source| StoreError::Io {
            path: image_root.clone(),
            source,
        })?;
        let mut store = Self::connect_postgres(url)?;
        let root = image_root.display().to_string();
        store.db.execute(
            "INSERT INTO settings (key, value) VALUES ('image_root', ?1) ON CONFLICT (key) DO NOTHING",
            params![root.as_str()],
        )?;
        let recorded = store.setting("image_root")?.unwrap_or_default();
        if recorded != root {
            return Err(StoreError::OtherImageRoot {
                given: image_root,
                location: store.location.clone(),
                recorded,
            });
        }
        store.dir = image_root;
        Ok(store)
    }

    /// Open an existing dataset: a folder (SQLite) or a `postgres://` URL.
    pub fn open(location: &Path) -> Result<Self, StoreError> {
        if pgconf::is_url(location) {
            let url = location.to_str().unwrap_or_default();
            let mut store = Self::connect_postgres(url)?;
            match store.setting("image_root")? {
                Some(root) => store.dir = PathBuf::from(root),
                None => return Err(StoreError::NoImageRoot(store.location.clone())),
            }
            return Ok(store);
        }
        if !is_dataset(location) {
            return Err(StoreError::NotADataset(location.display().to_string()));
        }
        Self::open_sqlite(location, false)
    }

    fn connect_postgres(url: &str) -> Result<Self, StoreError> {
        let (client, target) = pgconf::connect(url)?;
        let store = Self {
            dir: PathBuf::new(),
            // The user's URL without its password: what messages may suggest running again
            // (the password comes back from the environment or ~/.pgpass).
            location: pgconf::without_password(url),
            db: Db::postgres(target, client),
            team: Default::default(),
        };
        // A label write that waits this long for a lock is stuck behind a dead client. Commits
        // do not wait for the server's disk flush: the guarantee of a folder dataset (SQLite's
        // synchronous=NORMAL), where a killed client or server loses nothing it committed and
        // only a power cut or OS crash of the server can lose the last moment of labels.
        store.db.batch("SET lock_timeout = '30s'; SET synchronous_commit = off")?;
        store.migrate()?;
        Ok(store)
    }

    fn open_sqlite(dir: &Path, create: bool) -> Result<Self, StoreError> {
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
        let conn = rusqlite::Connection::open_with_flags(&db_path, flags).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        // NORMAL in WAL mode: a killed process never corrupts or loses committed transactions.
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(err)?;
        conn.set_prepared_statement_cache_capacity(64);
        let store = Self {
            dir: dir.to_path_buf(),
            location: dir.display().to_string(),
            db: Db::Sqlite { path: db_path, conn },
            team: Default::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// What messages call this dataset: its folder, or its server and database (no password).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Whether the dataset lives on a PostgreSQL server.
    pub fn is_postgres(&self) -> bool {
        self.db.dialect() == Dialect::Postgres
    }

    fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self.db.query_opt("SELECT value FROM settings WHERE key = ?1", params![key])? {
            Some(r) => r.opt_text(0),
            None => Ok(None),
        }
    }

    fn current_version(&self) -> Result<i64, StoreError> {
        self.db
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])?
            .i64(0)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let dialect = self.db.dialect();
        let (table, list) = match dialect {
            Dialect::Sqlite => (schema::SQLITE_VERSION_TABLE, schema::SQLITE),
            Dialect::Postgres => (schema::POSTGRES_VERSION_TABLE, schema::POSTGRES),
        };
        let newer = |found| StoreError::NewerSchema {
            path: PathBuf::from(&self.location),
            found,
            known: schema::VERSION,
        };
        // Up to date: the common case, with no lock taken (several annotators open at once).
        if let Ok(v) = self.current_version() {
            if v > schema::VERSION {
                return Err(newer(v));
            }
            if v == schema::VERSION {
                return Ok(());
            }
        }
        // All pending migrations in one transaction under the writers' lock, the version read
        // again under it: another client opening the same dataset may have migrated since, and
        // running a migration twice would fail on the objects it creates. A crash leaves the
        // previous version intact.
        self.db.transaction(|| {
            if dialect == Dialect::Postgres {
                self.db.execute("SELECT pg_advisory_xact_lock(?1)", params![MIGRATION_LOCK])?;
            }
            self.db.batch(table)?;
            let current = self.current_version()?;
            if current > schema::VERSION {
                return Err(newer(current));
            }
            for (i, sql) in list.iter().enumerate() {
                let version = i as i64 + 1;
                if version > current {
                    self.db.batch(sql)?;
                    self.db
                        .execute("INSERT INTO schema_version(version) VALUES (?1)", params![version])?;
                }
            }
            Ok(())
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.current_version()
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
    /// writers: the insert gives way on the image's unique hash (`ON CONFLICT DO NOTHING`) and
    /// the id comes from the row itself (`RETURNING`), never from the connection's last insert.
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
        self.db.transaction(|| {
            let inserted = self.db.query_opt(
                "INSERT INTO samples (product_id, product_path, product_hash, image_path, image_hash,
                    depth_path, depth_hash, saliency_path, saliency_hash, title, prompt, negative_prompt,
                    seed, model, controlnet, p0, p1, p2, p3, p4, entropy, margin, source)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)
                 ON CONFLICT(image_hash) DO NOTHING RETURNING id",
                params![
                    s.product_id.as_str(),
                    product_path,
                    product_hash,
                    image_path.as_str(),
                    image_hash.as_str(),
                    depth_path,
                    depth_hash,
                    saliency_path,
                    saliency_hash,
                    s.title.as_str(),
                    s.prompt.as_str(),
                    s.negative_prompt.as_str(),
                    s.seed,
                    s.model.as_deref(),
                    s.controlnet.as_deref(),
                    p(0),
                    p(1),
                    p(2),
                    p(3),
                    p(4),
                    entropy,
                    margin,
                    source.as_str()
                ],
            )?;
            Ok(match inserted {
                Some(r) => AddedSample { id: r.i64(0)?, new: true },
                // Another writer stored the same image between the check above and this insert.
                None => AddedSample {
                    id: self
                        .db
                        .query_one("SELECT id FROM samples WHERE image_hash = ?1", params![image_hash.as_str()])?
                        .i64(0)?,
                    new: false,
                },
            })
        })
    }

    /// Set RFNet probabilities of a sample (updates the active-learning order).
    pub fn set_probs(&self, id: i64, probs: &[f32; 5]) -> Result<(), StoreError> {
        let (e, m) = uncertainty(probs);
        let n = self.db.execute(
            "UPDATE samples SET p0=?2, p1=?3, p2=?4, p3=?5, p4=?6, entropy=?7, margin=?8 WHERE id=?1",
            params![id, probs[0], probs[1], probs[2], probs[3], probs[4], e, m],
        )?;
        if n == 0 {
            return Err(StoreError::NoSample(id));
        }
        Ok(())
    }

    pub fn sample(&self, id: i64) -> Result<Sample, StoreError> {
        match self.db.query_opt(&format!("{SAMPLE_SELECT} WHERE id = ?1"), params![id])? {
            Some(r) => row_to_sample(&r),
            None => Err(StoreError::NoSample(id)),
        }
    }

    pub fn sample_count(&self) -> Result<i64, StoreError> {
        self.db.query_one("SELECT COUNT(*) FROM samples", &[])?.i64(0)
    }

    /// Find a sample by the sha256 of its image.
    pub fn find_by_hash(&self, hash: &str) -> Result<Option<i64>, StoreError> {
        match self.db.query_opt("SELECT id FROM samples WHERE image_hash = ?1", params![hash])? {
            Some(r) => Ok(Some(r.i64(0)?)),
            None => Ok(None),
        }
    }

    /// Inside a transaction: serialize label writes on one sample and say whether it exists.
    /// PostgreSQL runs label writes at READ COMMITTED: without the lock two annotators labelling
    /// one sample at once could each count the labels before the other's commit and leave
    /// `label_count` one short. An advisory lock keyed by the sample id, not a row lock, so that
    /// annotator roles need no UPDATE right on samples. SQLite's `BEGIN IMMEDIATE` already
    /// serializes writers.
    fn lock_sample(&self, sample_id: i64) -> Result<bool, StoreError> {
        let found = match self.db.dialect() {
            Dialect::Sqlite => self.db.query_opt("SELECT id FROM samples WHERE id = ?1", params![sample_id])?,
            // One round trip for the lock and the check.
            Dialect::Postgres => self.db.query_opt(
                "SELECT (SELECT id FROM samples WHERE id = ?1) FROM (SELECT pg_advisory_xact_lock(?1)) AS locked",
                params![sample_id],
            )?,
        };
        Ok(match found {
            Some(r) => r.opt_i64(0)?.is_some(),
            None => false,
        })
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
        self.db.transaction(|| {
            if !self.lock_sample(sample_id)? {
                return Err(StoreError::NoSample(sample_id));
            }
            if !review {
                self.check_assignment(sample_id, annotator)?;
            }
            let previous = match self.db.query_opt(
                &format!("{LABEL_SELECT} WHERE sample_id = ?1 AND annotator = ?2 AND review = ?3"),
                params![sample_id, annotator, review],
            )? {
                Some(r) => Some(row_to_label(&r)?),
                None => None,
            };
            if let Some(p) = &previous {
                self.db.execute("DELETE FROM labels WHERE id = ?1", params![p.id])?;
            }
            let row = self.db.query_one(
                &format!(
                    "INSERT INTO labels (sample_id, annotator, class, unsuitable, lead_ms, review) VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING {LABEL_COLUMNS}"
                ),
                params![
                    sample_id,
                    annotator,
                    decision.class().map(i64::from),
                    decision == Decision::Unsuitable,
                    lead_ms,
                    review
                ],
            )?;
            self.release_lease(sample_id, annotator)?;
            Ok((row_to_label(&row)?, previous))
        })
    }

    /// Delete a label (undo), optionally restoring the one it had replaced, in one transaction.
    pub fn remove_label(&self, label_id: i64, restore: Option<&Label>) -> Result<(), StoreError> {
        self.db.transaction(|| {
            let sample = self.db.query_opt("SELECT sample_id FROM labels WHERE id = ?1", params![label_id])?;
            if let Some(r) = &sample {
                self.lock_sample(r.i64(0)?)?;
            }
            self.db.execute("DELETE FROM labels WHERE id = ?1", params![label_id])?;
            if let Some(l) = restore {
                self.insert_label_row(l)?;
            }
            Ok(())
        })
    }

    /// Insert a label exactly as stored (its id and time included): undo's restore, and copies.
    fn insert_label_row(&self, l: &Label) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO labels (id, sample_id, annotator, class, unsuitable, created_at, lead_ms, review)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                l.id,
                l.sample_id,
                l.annotator.as_str(),
                l.decision.class().map(i64::from),
                l.decision == Decision::Unsuitable,
                l.created_at.as_str(),
                l.lead_ms,
                l.review
            ],
        )?;
        Ok(())
    }

    fn labels_where(&self, tail: &str, params: &[Val]) -> Result<Vec<Label>, StoreError> {
        self.db
            .query(&format!("{LABEL_SELECT} {tail}"), params)?
            .iter()
            .map(row_to_label)
            .collect()
    }

    pub fn labels_of(&self, sample_id: i64) -> Result<Vec<Label>, StoreError> {
        self.labels_where("WHERE sample_id = ?1 ORDER BY id", params![sample_id])
    }

    pub fn all_labels(&self) -> Result<Vec<Label>, StoreError> {
        self.labels_where("ORDER BY id", &[])
    }

    /// Every sample (for export and splits).
    pub fn all_samples(&self) -> Result<Vec<Sample>, StoreError> {
        self.db
            .query(&format!("{SAMPLE_SELECT} ORDER BY id"), &[])?
            .iter()
            .map(row_to_sample)
            .collect()
    }

    /// The database's own consistency check (SQLite's `PRAGMA integrity_check`; PostgreSQL
    /// checks its pages itself) and the store's: every sample's `label_count` equals its
    /// ordinary labels (used after crash and concurrency tests).
    pub fn integrity_ok(&self) -> Result<bool, StoreError> {
        if self.db.dialect() == Dialect::Sqlite
            && self.db.query_one("PRAGMA integrity_check", &[])?.text(0)? != "ok"
        {
            return Ok(false);
        }
        let stale = self
            .db
            .query_one(
                "SELECT COUNT(*) FROM samples s WHERE label_count <> (SELECT COUNT(*) FROM labels l WHERE l.sample_id = s.id AND l.review = 0)",
                &[],
            )?
            .i64(0)?;
        Ok(stale == 0)
    }

    /// One page (up to 64 ids) of a queue in queue order, leaving out the samples `annotator`
    /// already labelled (with review labels in the review queue, ordinary ones otherwise). The
    /// unlabelled and review queues continue after `after_id` (the last id of the previous
    /// page), the others skip `offset` rows: callers keep both and the queue uses its own. The
    /// statements are prepared once per connection: the GUI asks for pages many times a second.
    pub fn queue_page(
        &self,
        order: QueueOrder,
        annotator: &str,
        after_id: i64,
        offset: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let review = order == QueueOrder::Review;
        let (sql, paged_by_id) = queue_sql(order, self.db.dialect());
        let third = if paged_by_id { after_id } else { offset };
        self.ids(sql, params![annotator, review, third])
    }

    fn ids(&self, sql: &str, params: &[Val]) -> Result<Vec<i64>, StoreError> {
        self.db.query(sql, params)?.iter().map(|r| r.i64(0)).collect()
    }

    /// The largest sample id (None when the dataset is empty): the range the random queue draws
    /// its starting points from.
    pub fn max_sample_id(&self) -> Result<Option<i64>, StoreError> {
        self.db.query_one("SELECT MAX(id) FROM samples", &[])?.opt_i64(0)
    }

    /// Up to 16 unlabelled samples from id `start` on, in id order, that `annotator` has not
    /// labelled: one draw of the random queue.
    pub fn unlabelled_from(&self, start: i64, annotator: &str) -> Result<Vec<i64>, StoreError> {
        self.ids(UNLABELLED_FROM_SQL, params![start, annotator])
    }

    /// How many samples nobody has labelled yet (review labels do not count).
    pub fn unlabelled_count(&self) -> Result<i64, StoreError> {
        self.db
            .query_one("SELECT COUNT(*) FROM samples WHERE label_count = 0", &[])?
            .i64(0)
    }

    /// Whether `annotator` has a label (ordinary or review) on the sample.
    pub fn has_label_by(&self, sample_id: i64, annotator: &str) -> Result<bool, StoreError> {
        Ok(self
            .db
            .query_opt(
                "SELECT id FROM labels WHERE sample_id = ?1 AND annotator = ?2 LIMIT 1",
                params![sample_id, annotator],
            )?
            .is_some())
    }

    /// Insert sample rows without image files (source `synthetic`) in one transaction, for
    /// benchmarks at a scale where `add_sample`'s blob copies and per-sample transactions would
    /// dominate (PostgreSQL: one `COPY`). `progress` gets the number inserted after every
    /// 100 000 rows. Returns how many rows were inserted.
    pub fn bulk_insert_samples(
        &self,
        samples: impl IntoIterator<Item = SyntheticSample>,
        progress: &mut dyn FnMut(i64),
    ) -> Result<i64, StoreError> {
        let mut rows = samples.into_iter().map(|s| {
            let p = s.probs;
            vec![
                Val::from(s.product_id),
                Val::from(s.image_path),
                Val::from(s.image_hash),
                Val::from(s.title),
                Val::from(s.prompt),
                Val::from(p[0]),
                Val::from(p[1]),
                Val::from(p[2]),
                Val::from(p[3]),
                Val::from(p[4]),
                Val::from(s.entropy),
                Val::from(s.margin),
                Val::from("synthetic"),
            ]
        });
        self.db.transaction(|| {
            let n = self.db.insert_rows(
                "samples",
                "product_id, image_path, image_hash, title, prompt, p0, p1, p2, p3, p4, entropy, margin, source",
                &mut rows,
                &mut |n| progress(n as i64),
            )?;
            Ok(n as i64)
        })
    }

    /// Insert `(sample_id, annotator, class)` labels in one transaction (the summary triggers
    /// still run per row), for benchmarks. Returns how many were inserted.
    pub fn bulk_insert_labels(&self, labels: impl IntoIterator<Item = (i64, String, i64)>) -> Result<i64, StoreError> {
        self.db.transaction(|| {
            let mut inserted = 0;
            for (sample_id, annotator, class) in labels {
                self.db.execute(
                    "INSERT INTO labels (sample_id, annotator, class, unsuitable) VALUES (?1, ?2, ?3, 0)",
                    params![sample_id, annotator, class],
                )?;
                inserted += 1;
            }
            Ok(inserted)
        })
    }

    /// After a bulk load: fold SQLite's write-ahead log into the database file and refresh the
    /// query planner's statistics, so that the next queries are timed as on a settled dataset.
    pub fn optimize(&self) -> Result<(), StoreError> {
        self.db.batch(match self.db.dialect() {
            Dialect::Sqlite => "PRAGMA wal_checkpoint(TRUNCATE); ANALYZE;",
            Dialect::Postgres => "VACUUM ANALYZE samples, labels",
        })
    }

    /// Copy every sample and label of this dataset into `dst`, which must be empty, keeping ids,
    /// hashes, times and summaries exactly (the images are the caller's: `data::migrate`). One
    /// transaction on `dst`: a failure leaves it empty. Returns (samples, labels) copied.
    pub fn copy_rows_into(&self, dst: &Store, progress: &mut dyn FnMut(u64)) -> Result<(u64, u64), StoreError> {
        let existing = dst.sample_count()?;
        if existing > 0 {
            return Err(StoreError::NotEmpty {
                location: dst.location.clone(),
                samples: existing,
            });
        }
        let samples = self.db.query(&format!("SELECT {SAMPLE_COLUMNS_ALL} FROM samples ORDER BY id"), &[])?;
        let labels = self.db.query(&format!("SELECT {LABEL_COLUMNS_ALL} FROM labels ORDER BY id"), &[])?;
        dst.db.transaction(|| {
            let mut copied = [0u64; 2];
            for (k, (table, columns, rows)) in
                [("samples", SAMPLE_COLUMNS_ALL, &samples), ("labels", LABEL_COLUMNS_ALL, &labels)].into_iter().enumerate()
            {
                copied[k] = dst.db.insert_rows(table, columns, &mut rows.iter().map(|r| r.0.clone()), progress)?;
                if dst.db.dialect() == Dialect::Postgres {
                    // Rows came with their ids: new rows must be numbered after them.
                    dst.db.query(
                        &format!("SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"),
                        &[],
                    )?;
                }
            }
            Ok((copied[0], copied[1]))
        })
    }

    /// Counts and a SHA-256 over every stored column of every sample and label in id order:
    /// equal on two datasets exactly when their contents are (whatever the database).
    pub fn content_checksum(&self) -> Result<ContentChecksum, StoreError> {
        let mut out = ContentChecksum::default();
        for (table, columns) in [("samples", SAMPLE_COLUMNS_ALL), ("labels", LABEL_COLUMNS_ALL)] {
            let rows = self.db.query(&format!("SELECT {columns} FROM {table} ORDER BY id"), &[])?;
            let mut h = Sha256::new();
            for r in &rows {
                for v in &r.0 {
                    let cell = match v {
                        Val::Null => "\u{0}N".to_string(),
                        Val::I64(x) => format!("i{x}"),
                        Val::F64(x) => format!("f{x:?}"),
                        Val::Text(t) => format!("t{}:{t}", t.len()),
                    };
                    h.update(cell.as_bytes());
                    h.update([0x1f]);
                }
                h.update([0x1e]);
            }
            let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            if table == "samples" {
                (out.samples, out.samples_sha256) = (rows.len() as u64, hex);
            } else {
                (out.labels, out.labels_sha256) = (rows.len() as u64, hex);
            }
        }
        Ok(out)
    }

    /// Every image file the samples refer to (relative to `dir()`), without repeats.
    pub fn blob_paths(&self) -> Result<Vec<String>, StoreError> {
        let mut paths = std::collections::BTreeSet::new();
        for r in self
            .db
            .query("SELECT product_path, image_path, depth_path, saliency_path FROM samples", &[])?
        {
            for i in 0..4 {
                if let Some(p) = r.opt_text(i)? {
                    paths.insert(p);
                }
            }
        }
        Ok(paths.into_iter().collect())
    }

    /// The query plan of `queue_page`'s statement for `order`, one line per step (tests check
    /// that each queue walks an index instead of sorting the table). PostgreSQL is told to
    /// avoid table scans and sorts, as its planner rightly prefers them for small tables.
    #[doc(hidden)]
    pub fn explain_queue(&self, order: QueueOrder) -> Result<Vec<String>, StoreError> {
        let (sql, _) = queue_sql(order, self.db.dialect());
        match self.db.dialect() {
            Dialect::Sqlite => self
                .db
                .query(&format!("EXPLAIN QUERY PLAN {sql}"), params!["", 0i64, 0i64])?
                .iter()
                .map(|r| r.text(3))
                .collect(),
            Dialect::Postgres => self.db.transaction(|| {
                self.db.batch("SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off;")?;
                self.db
                    .query(&format!("EXPLAIN {sql}"), params!["", 0i64, 0i64])?
                    .iter()
                    .map(|r| r.text(0))
                    .collect()
            }),
        }
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

/// Every stored column, for copies between datasets and their checksums.
const SAMPLE_COLUMNS_ALL: &str = "id, product_id, product_path, product_hash, image_path, image_hash, depth_path, depth_hash, saliency_path, saliency_hash, title, prompt, negative_prompt, seed, model, controlnet, p0, p1, p2, p3, p4, entropy, margin, source, created_at, label_count, disagree, reviewed";
const LABEL_COLUMNS_ALL: &str = "id, sample_id, annotator, class, unsuitable, created_at, lead_ms, review";

/// What `Store::content_checksum` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ContentChecksum {
    pub samples: u64,
    pub samples_sha256: String,
    pub labels: u64,
    pub labels_sha256: String,
}

const LABEL_COLUMNS: &str = "id, sample_id, annotator, class, unsuitable, created_at, lead_ms, review";
const LABEL_SELECT: &str = "SELECT id, sample_id, annotator, class, unsuitable, created_at, lead_ms, review FROM labels";

fn row_to_sample(r: &Row) -> Result<Sample, StoreError> {
    let p = [r.opt_f64(13)?, r.opt_f64(14)?, r.opt_f64(15)?, r.opt_f64(16)?, r.opt_f64(17)?];
    let probs = if p.iter().all(Option::is_some) {
        Some(p.map(|x| x.unwrap_or(0.0) as f32))
    } else {
        None
    };
    Ok(Sample {
        id: r.i64(0)?,
        product_id: r.text(1)?,
        product_path: r.opt_text(2)?,
        image_path: r.text(3)?,
        image_hash: r.text(4)?,
        depth_path: r.opt_text(5)?,
        saliency_path: r.opt_text(6)?,
        title: r.text(7)?,
        prompt: r.text(8)?,
        negative_prompt: r.text(9)?,
        seed: r.opt_i64(10)?,
        model: r.opt_text(11)?,
        controlnet: r.opt_text(12)?,
        probs,
        source: Source::parse(&r.text(18)?),
        label_count: r.i64(19)?,
    })
}

fn row_to_label(r: &Row) -> Result<Label, StoreError> {
    Ok(Label {
        id: r.i64(0)?,
        sample_id: r.i64(1)?,
        annotator: r.text(2)?,
        decision: match (r.i64(4)?, r.opt_i64(3)?) {
            (0, Some(c)) => Decision::Class(c as u8),
            _ => Decision::Unsuitable,
        },
        created_at: r.text(5)?,
        lead_ms: r.i64(6)?,
        review: r.i64(7)? != 0,
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

//! The dataset schema, one migration list per dialect. Both lists have the same length and the
//! same tables, columns, indexes and triggers; version N means the same schema on either server.
//! Every future migration lands in both lists in one change (a unit test checks the lengths).

/// RFNet's predicted class as SQL: the arg-max of `p0..p4` (a tie goes to the lower class), 5
/// when the sample has no prediction. `$max` is the dialect's many-argument maximum (`max` in
/// SQLite, `GREATEST` in PostgreSQL). A macro so that the `samples_predicted` index and the
/// queries that must walk it hold the same expression (both planners only use an expression
/// index for the identical expression).
macro_rules! predicted_class_sql {
    ($max:literal) => {
        concat!(
            "(CASE WHEN ", $max, "(p0, p1, p2, p3, p4) IS NULL THEN 5 WHEN p0 = ", $max,
            "(p0, p1, p2, p3, p4) THEN 0 WHEN p1 = ", $max, "(p0, p1, p2, p3, p4) THEN 1 WHEN p2 = ", $max,
            "(p0, p1, p2, p3, p4) THEN 2 WHEN p3 = ", $max, "(p0, p1, p2, p3, p4) THEN 3 ELSE 4 END)"
        )
    };
}
pub(crate) use predicted_class_sql;

/// RFNet's confidence in its predicted class (NULL without a prediction).
macro_rules! confidence_sql {
    ($max:literal) => {
        concat!($max, "(p0, p1, p2, p3, p4)")
    };
}
pub(crate) use confidence_sql;

/// The newest schema version this build knows.
pub const VERSION: i64 = 4;

/// The version table, created before any migration.
pub const SQLITE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')));";
pub const POSTGRES_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL, applied_at TEXT NOT NULL DEFAULT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'));";

/// SQLite. The text of versions already released must never change: datasets were built from it.
pub const SQLITE: &[&str] = &[
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
        predicted_class_sql!("max"),
        ", ",
        confidence_sql!("max"),
        " DESC, id);"
    ),
    // v3: dataset-wide settings (on PostgreSQL: the shared image folder).
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    TEAM_V4,
];

/// PostgreSQL: the same schema. Integers are BIGINT and reals DOUBLE PRECISION (what the store
/// reads and binds), timestamps the same ISO text as SQLite's, ids identity columns "BY DEFAULT"
/// (undo puts a label back with its old id), and one PL/pgSQL trigger keeps the summary columns.
pub const POSTGRES: &[&str] = &[
    // v1
    r#"
    CREATE TABLE samples (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        product_id TEXT NOT NULL,
        product_path TEXT, product_hash TEXT,
        image_path TEXT NOT NULL,
        image_hash TEXT NOT NULL UNIQUE,
        depth_path TEXT, depth_hash TEXT,
        saliency_path TEXT, saliency_hash TEXT,
        title TEXT NOT NULL DEFAULT '',
        prompt TEXT NOT NULL DEFAULT '',
        negative_prompt TEXT NOT NULL DEFAULT '',
        seed BIGINT, model TEXT, controlnet TEXT,
        p0 DOUBLE PRECISION, p1 DOUBLE PRECISION, p2 DOUBLE PRECISION, p3 DOUBLE PRECISION, p4 DOUBLE PRECISION,
        entropy DOUBLE PRECISION, margin DOUBLE PRECISION,
        source TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        label_count BIGINT NOT NULL DEFAULT 0,
        disagree BIGINT NOT NULL DEFAULT 0,
        reviewed BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX samples_product ON samples(product_id);
    CREATE INDEX samples_unlabelled ON samples(label_count, id);
    CREATE INDEX samples_entropy ON samples(label_count, entropy DESC, id);
    CREATE INDEX samples_margin ON samples(label_count, margin ASC, id);
    CREATE INDEX samples_review ON samples(disagree, reviewed, id);
    CREATE TABLE labels (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        sample_id BIGINT NOT NULL REFERENCES samples(id) ON DELETE CASCADE,
        annotator TEXT NOT NULL,
        class BIGINT CHECK (class IS NULL OR class BETWEEN 0 AND 4),
        unsuitable BIGINT NOT NULL DEFAULT 0 CHECK (unsuitable IN (0, 1)),
        created_at TEXT NOT NULL DEFAULT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        lead_ms BIGINT NOT NULL DEFAULT 0,
        review BIGINT NOT NULL DEFAULT 0 CHECK (review IN (0, 1)),
        CHECK ((unsuitable = 1) = (class IS NULL))
    );
    CREATE INDEX labels_sample ON labels(sample_id, annotator);
    CREATE INDEX labels_annotator ON labels(annotator, id);
    CREATE FUNCTION labels_summary() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE sid BIGINT;
    BEGIN
        IF TG_OP = 'DELETE' THEN sid := OLD.sample_id; ELSE sid := NEW.sample_id; END IF;
        UPDATE samples SET
            label_count = (SELECT COUNT(*) FROM labels WHERE sample_id = sid AND review = 0),
            disagree = ((SELECT COUNT(DISTINCT COALESCE(class, -1)) FROM labels WHERE sample_id = sid AND review = 0) > 1)::int,
            reviewed = (EXISTS (SELECT 1 FROM labels WHERE sample_id = sid AND review = 1))::int
        WHERE id = sid;
        RETURN NULL;
    END $$;
    CREATE TRIGGER labels_summary AFTER INSERT OR DELETE ON labels
        FOR EACH ROW EXECUTE FUNCTION labels_summary();
    "#,
    // v2
    concat!(
        "CREATE INDEX samples_predicted ON samples(label_count, ",
        predicted_class_sql!("GREATEST"),
        ", (",
        confidence_sql!("GREATEST"),
        ") DESC, id);"
    ),
    // v3
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    TEAM_V4,
];

/// v4, the same text for both (BIGINT is an integer column in SQLite too): team annotation.
/// `leases`: which annotator holds which sample until when (milliseconds since 1970, the
/// database's clock), so that a sample handed to a client that died goes back to the pool.
/// `gold`: samples with a known answer, mixed into annotators' queues to measure accuracy.
const TEAM_V4: &str = r#"
    CREATE TABLE leases (
        sample_id BIGINT NOT NULL REFERENCES samples(id) ON DELETE CASCADE,
        annotator TEXT NOT NULL,
        expires_ms BIGINT NOT NULL,
        PRIMARY KEY (sample_id, annotator)
    );
    CREATE INDEX leases_annotator ON leases(annotator, expires_ms);
    CREATE TABLE gold (
        sample_id BIGINT PRIMARY KEY REFERENCES samples(id) ON DELETE CASCADE,
        class BIGINT CHECK (class IS NULL OR class BETWEEN 0 AND 4),
        unsuitable BIGINT NOT NULL DEFAULT 0 CHECK (unsuitable IN (0, 1)),
        CHECK ((unsuitable = 1) = (class IS NULL))
    );
"#;

#[cfg(test)]
mod tests {
    #[test]
    fn both_dialects_have_every_version() {
        assert_eq!(super::SQLITE.len() as i64, super::VERSION);
        assert_eq!(super::POSTGRES.len() as i64, super::VERSION);
    }
}

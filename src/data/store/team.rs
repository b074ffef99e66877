//! Team annotation on one dataset: samples handed out with overlap k (each sample labelled by k
//! different annotators, nobody labelling one twice) under leases that lapse when a client
//! dies; gold samples with known answers mixed into the hand-out; and, on PostgreSQL, roles the
//! server enforces (annotators read only their own labels).

use serde::{Deserialize, Serialize};

use super::db::{Dialect, Row, params};
use std::time::Instant;

use super::{Decision, MIGRATION_LOCK, Store, StoreError, TEAM_SETTINGS_FRESH, validate_annotator};

/// How a team shares the dataset (stored in the dataset, so every client follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamSettings {
    /// How many different annotators label each sample through `claim_next`; 0 means no
    /// assignment (anyone labels anything, as in a one-person dataset).
    pub overlap: i64,
    /// How long a handed-out sample stays with its annotator before it goes back to the pool.
    pub lease_seconds: i64,
    /// Every n-th sample handed to an annotator is a gold sample they have not labelled yet
    /// (0: no gold samples in the hand-out).
    pub gold_every: i64,
    /// Annotators see neither other annotators' labels nor RFNet's prediction: the studio hides
    /// them; on PostgreSQL with roles the server never gives an annotator others' labels.
    pub blind: bool,
}

impl Default for TeamSettings {
    fn default() -> Self {
        Self {
            overlap: 0,
            lease_seconds: 600,
            gold_every: 0,
            blind: false,
        }
    }
}

/// What `Store::claim_next` hands an annotator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "claim", content = "sample")]
pub enum Claim {
    /// Label this sample (leased to the annotator until the lease lapses).
    Sample(i64),
    /// Nothing free now, but samples held by others' leases may come back: ask again later.
    Wait,
    /// Every sample has its labels, or this annotator's.
    Done,
}

/// Team roles. On PostgreSQL they are database roles: `rfstudio_annotator` (reads samples,
/// writes and reads only its own labels, sees which samples are gold but not their answers),
/// `rfstudio_reviewer` (also reads everyone's labels and the gold answers), `rfstudio_admin`
/// (everything: import, export, assign, gold, settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Annotator,
    Reviewer,
    Admin,
}

impl Role {
    fn group(self) -> &'static str {
        match self {
            Role::Annotator => "rfstudio_annotator",
            Role::Reviewer => "rfstudio_reviewer",
            Role::Admin => "rfstudio_admin",
        }
    }
}

/// Claims run one at a time per dataset (a short transaction each): the count of labels plus
/// live leases a claim reads must not change under it.
const CLAIM_LOCK: i64 = MIGRATION_LOCK + 1;

/// The group roles, their rights and the label policy: idempotent, run by `Store::grant`.
const ROLES_SQL: &str = r#"
DO $$ BEGIN
    BEGIN CREATE ROLE rfstudio_annotator NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END;
    BEGIN CREATE ROLE rfstudio_reviewer NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END;
    BEGIN CREATE ROLE rfstudio_admin NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END;
END $$;
GRANT rfstudio_annotator TO rfstudio_reviewer;
GRANT rfstudio_reviewer TO rfstudio_admin;
GRANT SELECT ON samples, schema_version, settings TO rfstudio_annotator;
GRANT SELECT, INSERT, DELETE ON labels TO rfstudio_annotator;
GRANT SELECT, INSERT, UPDATE, DELETE ON leases TO rfstudio_annotator;
GRANT SELECT (sample_id) ON gold TO rfstudio_annotator;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO rfstudio_annotator;
GRANT SELECT ON gold TO rfstudio_reviewer;
GRANT ALL ON ALL TABLES IN SCHEMA public TO rfstudio_admin;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO rfstudio_admin;
ALTER FUNCTION labels_summary() SECURITY DEFINER;
ALTER FUNCTION labels_summary() SET search_path = public;
ALTER TABLE labels ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS labels_by_role ON labels;
CREATE POLICY labels_by_role ON labels
    USING (annotator = current_user OR pg_has_role(current_user, 'rfstudio_reviewer', 'MEMBER'))
    WITH CHECK (annotator = current_user OR pg_has_role(current_user, 'rfstudio_admin', 'MEMBER'));
"#;

/// Samples that are gold (`s` is the samples row).
const IS_GOLD: &str = "EXISTS (SELECT 1 FROM gold g WHERE g.sample_id = s.id)";

impl Store {
    /// The dataset's team settings (defaults where none were set), read again when the copy
    /// this connection holds is older than a couple of seconds.
    pub fn team_settings(&self) -> Result<TeamSettings, StoreError> {
        if let Some((at, t)) = *self.team.borrow()
            && at.elapsed() < TEAM_SETTINGS_FRESH
        {
            return Ok(t);
        }
        let t = self.read_team_settings()?;
        *self.team.borrow_mut() = Some((Instant::now(), t));
        Ok(t)
    }

    fn read_team_settings(&self) -> Result<TeamSettings, StoreError> {
        let mut t = TeamSettings::default();
        for row in self.db.query(
            "SELECT key, value FROM settings WHERE key IN ('overlap', 'lease_seconds', 'gold_every', 'blind')",
            &[],
        )? {
            let (key, value) = (row.text(0)?, row.text(1)?);
            let n = value.parse::<i64>().map_err(|_| StoreError::BadSetting {
                key: key.clone(),
                why: format!("{value:?} is not a whole number"),
            })?;
            match key.as_str() {
                "overlap" => t.overlap = n,
                "lease_seconds" => t.lease_seconds = n,
                "gold_every" => t.gold_every = n,
                _ => t.blind = n != 0,
            }
        }
        Ok(t)
    }

    /// Store the team settings (admins; on PostgreSQL with roles the server refuses others).
    pub fn set_team_settings(&self, t: &TeamSettings) -> Result<(), StoreError> {
        let bad = |key: &str, why: &str| {
            Err(StoreError::BadSetting {
                key: key.into(),
                why: why.into(),
            })
        };
        if !(0..=100).contains(&t.overlap) {
            return bad("overlap", "must be 0 (no assignment) to 100");
        }
        if !(1..=7 * 24 * 3600).contains(&t.lease_seconds) {
            return bad("lease_seconds", "must be 1 second to 7 days");
        }
        if !(0..=1_000_000).contains(&t.gold_every) {
            return bad("gold_every", "must be 0 (no gold) or a positive count");
        }
        *self.team.borrow_mut() = None;
        self.db.transaction(|| {
            for (key, value) in [
                ("overlap", t.overlap),
                ("lease_seconds", t.lease_seconds),
                ("gold_every", t.gold_every),
                ("blind", t.blind as i64),
            ] {
                self.db.execute(
                    "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![key, value.to_string()],
                )?;
            }
            Ok(())
        })
    }

    /// The database's clock (`Dialect::now_ms_sql`), read once for a claim's several queries.
    fn now_ms(&self) -> Result<i64, StoreError> {
        self.db.query_one(&format!("SELECT {}", self.db.dialect().now_ms_sql()), &[])?.i64(0)
    }

    /// Hand `annotator` the next sample to label and lease it to them: their own unexpired
    /// lease first (a restarted client gets its sample back), then, every `gold_every`-th time,
    /// a gold sample they have not labelled, else the sample closest to complete (fewest labels
    /// missing, oldest first) that they have not labelled and whose labels plus others' live
    /// leases are fewer than the overlap.
    pub fn claim_next(&self, annotator: &str) -> Result<Claim, StoreError> {
        validate_annotator(annotator)?;
        let team = self.team_settings()?;
        let k = team.overlap.max(1);
        self.db.transaction(|| {
            if self.db.dialect() == Dialect::Postgres {
                self.db.execute("SELECT pg_advisory_xact_lock(?1)", params![CLAIM_LOCK])?;
            }
            let now = self.now_ms()?;
            self.db.execute("DELETE FROM leases WHERE expires_ms <= ?1", params![now])?;
            let first = |r: Option<Row>| -> Result<Option<i64>, StoreError> { r.map(|r| r.i64(0)).transpose() };
            let mut pick = first(self.db.query_opt(
                "SELECT x.sample_id FROM leases x WHERE x.annotator = ?1 AND x.expires_ms > ?2
                 AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.sample_id = x.sample_id AND l.annotator = ?1 AND l.review = 0 LIMIT 1 OFFSET 0)
                 ORDER BY x.sample_id LIMIT 1",
                params![annotator, now],
            )?)?;
            if pick.is_none() && team.gold_every > 0 {
                let mine = self
                    .db
                    .query_one(
                        "SELECT COUNT(*) FROM labels WHERE annotator = ?1 AND review = 0",
                        params![annotator],
                    )?
                    .i64(0)?;
                if (mine + 1) % team.gold_every == 0 {
                    pick = first(self.db.query_opt(
                        "SELECT g.sample_id FROM gold g WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.sample_id = g.sample_id AND l.annotator = ?1 AND l.review = 0 LIMIT 1 OFFSET 0)
                         ORDER BY g.sample_id LIMIT 1",
                        params![annotator],
                    )?)?;
                }
            }
            // One label count at a time, most labels first: each query walks the
            // (label_count, id) index in order.
            for count in (0..k).rev() {
                if pick.is_some() {
                    break;
                }
                pick = first(self.db.query_opt(
                    &format!(
                        "SELECT s.id FROM samples s WHERE s.label_count = ?3 AND NOT {IS_GOLD}
                         AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.sample_id = s.id AND l.annotator = ?1 AND l.review = 0 LIMIT 1 OFFSET 0)
                         AND s.label_count + (SELECT COUNT(*) FROM leases x WHERE x.sample_id = s.id AND x.expires_ms > ?2 AND x.annotator <> ?1) < ?4
                         ORDER BY s.label_count, s.id LIMIT 1"
                    ),
                    params![annotator, now, count, k],
                )?)?;
            }
            let Some(id) = pick else {
                let open = self.db.query_opt(
                    &format!(
                        "SELECT s.id FROM samples s WHERE s.label_count < ?2 AND NOT {IS_GOLD}
                         AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.sample_id = s.id AND l.annotator = ?1 AND l.review = 0 LIMIT 1 OFFSET 0) LIMIT 1"
                    ),
                    params![annotator, k],
                )?;
                return Ok(if open.is_some() { Claim::Wait } else { Claim::Done });
            };
            self.db.execute(
                "INSERT INTO leases (sample_id, annotator, expires_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (sample_id, annotator) DO UPDATE SET expires_ms = excluded.expires_ms",
                params![id, annotator, now + team.lease_seconds * 1000],
            )?;
            Ok(Claim::Sample(id))
        })
    }

    /// Inside `put_label`'s transaction: with an overlap set, an ordinary label is taken only
    /// from an annotator who holds the sample's live lease, relabels their own label, labels a
    /// gold sample, or finds the sample still short of labels counting others' live leases. So a
    /// client whose lease lapsed while someone else took the sample over cannot push it past k.
    pub(super) fn check_assignment(&self, sample_id: i64, annotator: &str) -> Result<(), StoreError> {
        let team = self.team_settings()?;
        if team.overlap == 0 {
            return Ok(());
        }
        // The clock inside the query: one round trip on the label-write path.
        let now = self.db.dialect().now_ms_sql();
        let r = self.db.query_one(
            &format!(
                "SELECT s.label_count,
                    (SELECT COUNT(*) FROM leases x WHERE x.sample_id = s.id AND x.expires_ms > {now} AND x.annotator <> ?2),
                    EXISTS (SELECT 1 FROM leases x WHERE x.sample_id = s.id AND x.expires_ms > {now} AND x.annotator = ?2),
                    EXISTS (SELECT 1 FROM labels l WHERE l.sample_id = s.id AND l.annotator = ?2 AND l.review = 0),
                    {IS_GOLD}
                 FROM samples s WHERE s.id = ?1"
            ),
            params![sample_id, annotator],
        )?;
        let (labels, others, own_lease, own_label, gold) = (r.i64(0)?, r.i64(1)?, r.i64(2)?, r.i64(3)?, r.i64(4)?);
        if own_lease != 0 || own_label != 0 || gold != 0 || labels + others < team.overlap {
            Ok(())
        } else {
            Err(StoreError::NotAssigned {
                sample: sample_id,
                annotator: annotator.to_string(),
                overlap: team.overlap,
            })
        }
    }

    /// A label ends its annotator's lease on the sample.
    pub(super) fn release_lease(&self, sample_id: i64, annotator: &str) -> Result<(), StoreError> {
        if self.team_settings()?.overlap == 0 {
            return Ok(());
        }
        self.db.execute(
            "DELETE FROM leases WHERE sample_id = ?1 AND annotator = ?2",
            params![sample_id, annotator],
        )?;
        Ok(())
    }

    /// Make a sample gold with its known answer, or (None) an ordinary sample again.
    pub fn set_gold(&self, sample_id: i64, answer: Option<Decision>) -> Result<(), StoreError> {
        self.db.transaction(|| {
            if self.db.query_opt("SELECT id FROM samples WHERE id = ?1", params![sample_id])?.is_none() {
                return Err(StoreError::NoSample(sample_id));
            }
            self.db.execute("DELETE FROM gold WHERE sample_id = ?1", params![sample_id])?;
            if let Some(d) = answer {
                self.db.execute(
                    "INSERT INTO gold (sample_id, class, unsuitable) VALUES (?1, ?2, ?3)",
                    params![sample_id, d.class().map(i64::from), d == Decision::Unsuitable],
                )?;
            }
            Ok(())
        })
    }

    /// The gold samples and their answers (reviewers and admins).
    pub fn gold(&self) -> Result<Vec<(i64, Decision)>, StoreError> {
        self.db
            .query("SELECT sample_id, class, unsuitable FROM gold ORDER BY sample_id", &[])?
            .iter()
            .map(|r| {
                let d = match (r.i64(2)?, r.opt_i64(1)?) {
                    (0, Some(c)) => Decision::Class(c as u8),
                    _ => Decision::Unsuitable,
                };
                Ok((r.i64(0)?, d))
            })
            .collect()
    }

    /// Give the database login `login` a team role on this PostgreSQL dataset (creating the
    /// login, without a password, if it does not exist: set one with `ALTER ROLE` or use the
    /// server's own authentication). Sets up the group roles, their rights and the label policy
    /// the first time. Needs a connection allowed to create roles (the dataset's owner with
    /// CREATEROLE, or a superuser).
    pub fn grant(&self, login: &str, role: Role) -> Result<(), StoreError> {
        if self.db.dialect() != Dialect::Postgres {
            return Err(StoreError::RolesNeedPostgres(self.location.clone()));
        }
        let ok = !login.is_empty()
            && login.len() <= 63
            && login.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'));
        if !ok {
            return Err(StoreError::BadAnnotator(
                login.to_string(),
                "a database login here is 1-63 ASCII letters, digits or _ - . @",
            ));
        }
        let quoted = format!("\"{login}\"");
        self.db.transaction(|| {
            self.db.batch(ROLES_SQL)?;
            self.db.batch(&format!(
                "DO $$ BEGIN CREATE ROLE {quoted} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
                 GRANT {} TO {quoted};",
                role.group()
            ))
        })
    }
}

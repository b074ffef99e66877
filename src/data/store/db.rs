//! The store's two database connections behind one small interface: SQL text with `?N`
//! placeholders, parameters and result cells as `Val`, rows as `Row`. `Store` writes each of its
//! methods once against this; only the schema and a few statements differ per dialect.

use std::cell::RefCell;
use std::collections::HashMap;
use std::error::Error as StdError;
use std::path::PathBuf;

use bytes::BytesMut;
use postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use super::StoreError;

/// Which SQL the connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The database's clock in milliseconds since 1970, as an SQL expression: leases compare
    /// against one clock even when the clients' clocks disagree.
    pub const fn now_ms_sql(self) -> &'static str {
        match self {
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Dialect::Postgres => "(extract(epoch FROM clock_timestamp()) * 1000)::bigint",
        }
    }
}

/// One parameter or result cell. The store's columns are integers, reals and text only; the
/// PostgreSQL schema uses BIGINT and DOUBLE PRECISION so that these map one to one.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Val {
    Null,
    I64(i64),
    F64(f64),
    Text(String),
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::I64(v)
    }
}
impl From<bool> for Val {
    fn from(v: bool) -> Self {
        Val::I64(v as i64)
    }
}
impl From<f64> for Val {
    fn from(v: f64) -> Self {
        Val::F64(v)
    }
}
impl From<f32> for Val {
    fn from(v: f32) -> Self {
        Val::F64(v as f64)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::Text(v.to_string())
    }
}
impl From<String> for Val {
    fn from(v: String) -> Self {
        Val::Text(v)
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Self {
        Val::Text(v.clone())
    }
}
impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Self {
        v.map_or(Val::Null, Into::into)
    }
}

/// Parameters: `params![a, b, ...]` turns each into a `Val`.
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::data::store::db::Val::from($v)),*][..] };
}
pub(crate) use params;

/// A result row.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Row(pub Vec<Val>);

impl Row {
    fn cell(&self, i: usize) -> &Val {
        self.0.get(i).unwrap_or(&Val::Null)
    }
    fn mismatch(&self, i: usize, expected: &'static str) -> StoreError {
        StoreError::UnexpectedValue {
            column: i,
            expected,
            found: format!("{:?}", self.cell(i)),
        }
    }
    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.cell(i) {
            Val::Null => Ok(None),
            Val::I64(v) => Ok(Some(*v)),
            _ => Err(self.mismatch(i, "an integer")),
        }
    }
    pub fn i64(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_i64(i)?.ok_or_else(|| self.mismatch(i, "an integer"))
    }
    pub fn opt_f64(&self, i: usize) -> Result<Option<f64>, StoreError> {
        match self.cell(i) {
            Val::Null => Ok(None),
            Val::F64(v) => Ok(Some(*v)),
            // SQLite stores a REAL that holds a whole number as written; read it as a real.
            Val::I64(v) => Ok(Some(*v as f64)),
            _ => Err(self.mismatch(i, "a number")),
        }
    }
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.cell(i) {
            Val::Null => Ok(None),
            Val::Text(v) => Ok(Some(v.clone())),
            _ => Err(self.mismatch(i, "text")),
        }
    }
    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?.ok_or_else(|| self.mismatch(i, "text"))
    }
}

impl ToSql for Val {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::I64(v) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::FLOAT8 => (*v as f64).to_sql(ty, out),
                Type::BOOL => (*v != 0).to_sql(ty, out),
                _ => Err(format!("cannot pass an integer as {ty}").into()),
            },
            Val::F64(v) => match *ty {
                Type::FLOAT8 => v.to_sql(ty, out),
                Type::FLOAT4 => (*v as f32).to_sql(ty, out),
                _ => Err(format!("cannot pass a real number as {ty}").into()),
            },
            Val::Text(s) => s.as_str().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Val {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(match *ty {
            Type::INT8 => Val::I64(i64::from_sql(ty, raw)?),
            Type::INT4 => Val::I64(i32::from_sql(ty, raw)? as i64),
            Type::INT2 => Val::I64(i16::from_sql(ty, raw)? as i64),
            Type::BOOL => Val::I64(bool::from_sql(ty, raw)? as i64),
            Type::FLOAT8 => Val::F64(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Val::F64(f32::from_sql(ty, raw)? as f64),
            Type::VOID => Val::Null,
            _ => Val::Text(<&str>::from_sql(ty, raw)?.to_string()),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(Val::Null)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT8 | Type::INT4 | Type::INT2 | Type::BOOL | Type::FLOAT8 | Type::FLOAT4 | Type::VOID
        ) || <&str as FromSql>::accepts(ty)
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Val::Null => ValueRef::Null,
            Val::I64(v) => ValueRef::Integer(*v),
            Val::F64(v) => ValueRef::Real(*v),
            Val::Text(s) => ValueRef::Text(s.as_bytes()),
        }))
    }
}

fn sqlite_row(r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Row> {
    use rusqlite::types::ValueRef;
    let mut cells = Vec::with_capacity(n);
    for i in 0..n {
        cells.push(match r.get_ref(i)? {
            ValueRef::Null => Val::Null,
            ValueRef::Integer(v) => Val::I64(v),
            ValueRef::Real(v) => Val::F64(v),
            ValueRef::Text(t) | ValueRef::Blob(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
        });
    }
    Ok(Row(cells))
}

/// `?N` placeholders (SQLite) as `$N` (PostgreSQL). The store's SQL has no `?` anywhere else.
pub(crate) fn dollar_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) struct PgConn {
    client: postgres::Client,
    /// Prepared statements by SQL text: the queue pages and label writes run many times a
    /// second and would otherwise be parsed and planned each time.
    stmts: HashMap<String, postgres::Statement>,
}

/// An open connection.
pub(crate) enum Db {
    Sqlite { path: PathBuf, conn: rusqlite::Connection },
    /// `target` names the server and database without the password, for messages.
    Postgres { target: String, conn: RefCell<PgConn> },
}

impl Db {
    pub fn postgres(target: String, client: postgres::Client) -> Db {
        Db::Postgres {
            target,
            conn: RefCell::new(PgConn {
                client,
                stmts: HashMap::new(),
            }),
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            Db::Sqlite { .. } => Dialect::Sqlite,
            Db::Postgres { .. } => Dialect::Postgres,
        }
    }

    pub fn sqlite_err(&self, source: rusqlite::Error) -> StoreError {
        let path = match self {
            Db::Sqlite { path, .. } => path.clone(),
            Db::Postgres { target, .. } => PathBuf::from(target),
        };
        StoreError::Sqlite { path, source }
    }

    fn pg_err(target: &str, error: postgres::Error) -> StoreError {
        StoreError::Postgres {
            target: target.to_string(),
            error,
        }
    }

    /// Run a statement and collect its rows.
    pub fn query(&self, sql: &str, params: &[Val]) -> Result<Vec<Row>, StoreError> {
        match self {
            Db::Sqlite { conn, .. } => {
                let run = || -> rusqlite::Result<Vec<Row>> {
                    let mut stmt = conn.prepare_cached(sql)?;
                    let n = stmt.column_count();
                    let rows = stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| sqlite_row(r, n))?;
                    rows.collect()
                };
                run().map_err(|e| self.sqlite_err(e))
            }
            Db::Postgres { target, conn } => {
                let mut c = conn.borrow_mut();
                let stmt = c.prepare(sql).map_err(|e| Self::pg_err(target, e))?;
                let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                let rows = c.client.query(&stmt, &refs).map_err(|e| Self::pg_err(target, e))?;
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.try_get::<_, Val>(i))
                            .collect::<Result<Vec<_>, _>>()
                            .map(Row)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Self::pg_err(target, e))
            }
        }
    }

    /// The first row, if any.
    pub fn query_opt(&self, sql: &str, params: &[Val]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first row; `None` from the database is an error of the caller's choosing.
    pub fn query_one(&self, sql: &str, params: &[Val]) -> Result<Row, StoreError> {
        self.query_opt(sql, params)?.ok_or(StoreError::UnexpectedValue {
            column: 0,
            expected: "a row",
            found: "no row".into(),
        })
    }

    /// Run a statement; returns the number of rows it changed.
    pub fn execute(&self, sql: &str, params: &[Val]) -> Result<u64, StoreError> {
        match self {
            Db::Sqlite { conn, .. } => {
                let run = || -> rusqlite::Result<usize> {
                    conn.prepare_cached(sql)?.execute(rusqlite::params_from_iter(params.iter()))
                };
                run().map(|n| n as u64).map_err(|e| self.sqlite_err(e))
            }
            Db::Postgres { target, conn } => {
                let mut c = conn.borrow_mut();
                let stmt = c.prepare(sql).map_err(|e| Self::pg_err(target, e))?;
                let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                c.client.execute(&stmt, &refs).map_err(|e| Self::pg_err(target, e))
            }
        }
    }

    /// Run several statements without parameters (schema, transaction control).
    pub fn batch(&self, sql: &str) -> Result<(), StoreError> {
        match self {
            Db::Sqlite { conn, .. } => conn.execute_batch(sql).map_err(|e| self.sqlite_err(e)),
            Db::Postgres { target, conn } => conn
                .borrow_mut()
                .client
                .batch_execute(sql)
                .map_err(|e| Self::pg_err(target, e)),
        }
    }

    /// Run `f` in one transaction: committed when it returns Ok, rolled back otherwise. SQLite
    /// takes the write lock up front (`BEGIN IMMEDIATE`), so a transaction that reads then writes
    /// never fails half-way on a lock; PostgreSQL writers lock the rows they change (see the
    /// callers' `FOR UPDATE`).
    pub fn transaction<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.batch(match self.dialect() {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        })?;
        match f() {
            Ok(v) => {
                if let Err(e) = self.batch("COMMIT") {
                    let _ = self.batch("ROLLBACK");
                    return Err(e);
                }
                Ok(v)
            }
            Err(e) => {
                let _ = self.batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Insert many rows into `table`'s `columns` (comma-separated), inside the caller's
    /// transaction: PostgreSQL with one `COPY ... FROM STDIN` (text format), SQLite with one
    /// prepared INSERT per row (fast there inside a transaction). The bulk path for benchmarks
    /// and `dataset migrate`. `progress` gets the count after every 100 000 rows.
    pub fn insert_rows(
        &self,
        table: &str,
        columns: &str,
        rows: &mut dyn Iterator<Item = Vec<Val>>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, StoreError> {
        use std::io::Write;
        let mut n = 0u64;
        let mut counted = || {
            n += 1;
            if n % 100_000 == 0 {
                progress(n);
            }
            n
        };
        let (target, conn) = match self {
            Db::Sqlite { .. } => {
                let marks: Vec<String> = (1..=columns.split(',').count()).map(|i| format!("?{i}")).collect();
                let sql = format!("INSERT INTO {table} ({columns}) VALUES ({})", marks.join(", "));
                let mut last = 0;
                for row in rows {
                    self.execute(&sql, &row)?;
                    last = counted();
                }
                return Ok(last);
            }
            Db::Postgres { target, conn } => (target, conn),
        };
        let mut c = conn.borrow_mut();
        let mut writer = c
            .client
            .copy_in(&format!("COPY {table} ({columns}) FROM STDIN"))
            .map_err(|e| Self::pg_err(target, e))?;
        let io = |source: std::io::Error| StoreError::Io {
            path: PathBuf::from(target),
            source,
        };
        let mut last = 0;
        let mut line = String::new();
        for row in rows {
            line.clear();
            for (i, v) in row.iter().enumerate() {
                if i > 0 {
                    line.push('\t');
                }
                copy_text(&mut line, v);
            }
            line.push('\n');
            writer.write_all(line.as_bytes()).map_err(io)?;
            last = counted();
        }
        writer.finish().map_err(|e| Self::pg_err(target, e))?;
        Ok(last)
    }
}

/// One value in COPY's text format (`\N` for NULL; backslash, tab and line breaks escaped).
fn copy_text(out: &mut String, v: &Val) {
    match v {
        Val::Null => out.push_str("\\N"),
        Val::I64(x) => out.push_str(&x.to_string()),
        Val::F64(x) => out.push_str(&format!("{x:?}")),
        Val::Text(s) => {
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\t' => out.push_str("\\t"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    c => out.push(c),
                }
            }
        }
    }
}

impl PgConn {
    fn prepare(&mut self, sql: &str) -> Result<postgres::Statement, postgres::Error> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let stmt = self.client.prepare(&dollar_params(sql))?;
        self.stmts.insert(sql.to_string(), stmt.clone());
        Ok(stmt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollar_params() {
        assert_eq!(
            dollar_params("SELECT a FROM t WHERE b = ?1 AND c > ?12 LIMIT 3"),
            "SELECT a FROM t WHERE b = $1 AND c > $12 LIMIT 3"
        );
    }

    #[test]
    fn copy_text_escapes_what_copy_would_misread() {
        let mut s = String::new();
        for v in [Val::Null, Val::I64(-3), Val::F64(0.1), Val::Text("a\tb\\c\nd".into())] {
            copy_text(&mut s, &v);
            s.push('|');
        }
        assert_eq!(s, "\\N|-3|0.1|a\\tb\\\\c\\nd|");
    }
}

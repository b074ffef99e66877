//! A throwaway PostgreSQL server for the tests: `initdb` into a temporary folder, listening only
//! on a Unix socket in that folder (no port to clash with), fsync off; one server per test
//! process, a fresh database per test. A watchdog process stops the server and removes the
//! folder when the test process exits, however it exits.
//!
//! The server binaries are looked up in `RFSTUDIO_PG_BIN`, then `/usr/lib/postgresql/<newest>/bin`,
//! then `PATH`. Without them the PostgreSQL tests fail, unless `RFSTUDIO_TEST_NO_PG=1` says to
//! skip them (a developer machine without PostgreSQL; CI always has it).
//! `RFSTUDIO_TEST_PG=postgres://...` uses an existing server instead (its user must be allowed
//! to create databases).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct PgServer {
    /// URL of the maintenance database, for creating the tests' databases.
    admin_url: String,
    /// Builds the URL of database `db` on this server.
    url_of: Box<dyn Fn(&str) -> String + Send + Sync>,
}

fn bin_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("RFSTUDIO_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A server command, as the `postgres` user when the tests run as root (the server refuses root).
fn server_cmd(bin: &Path, tool: &str, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn run(mut c: Command, what: &str) {
    let out = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("{what}: {e}"),
    }
}

fn start() -> Option<PgServer> {
    if let Ok(url) = std::env::var("RFSTUDIO_TEST_PG") {
        let base = url.clone();
        return Some(PgServer {
            admin_url: url,
            url_of: Box::new(move |db| {
                let (head, tail) = base.split_once('?').map_or((base.as_str(), ""), |(h, t)| (h, t));
                let head = head.rsplit_once('/').map_or(head, |(h, _)| h);
                if tail.is_empty() { format!("{head}/{db}") } else { format!("{head}/{db}?{tail}") }
            }),
        });
    }
    let Some(bin) = bin_dir() else {
        if std::env::var("RFSTUDIO_TEST_NO_PG").is_ok_and(|v| v == "1") {
            eprintln!("PostgreSQL tests skipped (RFSTUDIO_TEST_NO_PG=1)");
            return None;
        }
        panic!(
            "no PostgreSQL server binaries (initdb, pg_ctl): install Debian's `postgresql` package, \
             set RFSTUDIO_PG_BIN, or RFSTUDIO_TEST_NO_PG=1 to skip the PostgreSQL tests"
        );
    };
    let root = is_root();
    let dir = tempfile::Builder::new().prefix("rfpg").tempdir_in("/tmp").expect("tempdir").keep();
    if root {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("postgres:postgres").arg(&dir);
                c
            },
            "chown the server folder to postgres",
        );
    }
    let data = dir.join("data");
    let mut initdb = server_cmd(&bin, "initdb", root);
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]);
    run(initdb, "initdb");
    let mut pg_ctl = server_cmd(&bin, "pg_ctl", root);
    pg_ctl
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("log"))
        .arg("-o")
        .arg(format!(
            "-k {} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            dir.display()
        ))
        .args(["-w", "-t", "60", "start"]);
    run(pg_ctl, "pg_ctl start");
    // The watchdog: once this process is gone, stop the server and remove its folder.
    let stop = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {runuser}{pg_ctl} -D {data} -m immediate stop; rm -rf {dir}",
        pid = std::process::id(),
        runuser = if root { "runuser -u postgres -- " } else { "" },
        pg_ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display(),
    );
    Command::new("sh")
        .args(["-c", &stop])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("watchdog");
    let host = dir.display().to_string();
    Some(PgServer {
        admin_url: format!("postgresql:///postgres?host={host}&user=postgres"),
        url_of: Box::new(move |db| format!("postgresql:///{db}?host={host}&user=postgres")),
    })
}

/// The test process's server (None: skipped on this machine, see the module docs).
pub fn server() -> Option<&'static PgServer> {
    static SERVER: OnceLock<Option<PgServer>> = OnceLock::new();
    SERVER.get_or_init(start).as_ref()
}

/// A new, empty database on the server: its URL.
pub fn fresh_db() -> Option<String> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let server = server()?;
    let name = format!("t_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
    let mut admin = postgres::Client::connect(&server.admin_url, postgres::NoTls).expect("connect to the test server");
    admin.batch_execute(&format!("CREATE DATABASE {name}")).expect("create database");
    Some((server.url_of)(&name))
}

/// Which database a store test runs on: the store's tests run on both (`both_backends!`).
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Turns each named `fn test(b: Backend)` of the calling module into the tests `test::sqlite`
/// and `test::pg` (the latter on this process's throwaway server).
macro_rules! both_backends {
    ($($t:ident),* $(,)?) => {
        $(
            mod $t {
                #[test]
                fn sqlite() {
                    super::$t($crate::pg::Backend::Sqlite)
                }
                #[test]
                fn pg() {
                    if $crate::pg::server().is_some() {
                        super::$t($crate::pg::Backend::Postgres)
                    }
                }
            }
        )*
    };
}
pub(crate) use both_backends;

/// A new, empty dataset under `dir`: the folder `dir/ds`, or a fresh PostgreSQL database that
/// keeps its images in `dir/ds`. Returns what `Store::open` and the CLI take.
pub fn new_dataset(b: Backend, dir: &Path) -> PathBuf {
    let folder = dir.join("ds");
    match b {
        Backend::Sqlite => {
            rfstudio::data::store::Store::init(&folder).expect("init");
            folder
        }
        Backend::Postgres => {
            let url = fresh_db().expect("a PostgreSQL server");
            rfstudio::data::store::Store::init_postgres(&url, &folder).expect("init on PostgreSQL");
            PathBuf::from(url)
        }
    }
}

#[test]
fn pg_server_starts_and_serves_a_fresh_database() {
    let Some(url) = fresh_db() else { return };
    let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let v: String = c.query_one("SHOW server_version", &[]).expect("query").get(0);
    assert!(v.split('.').next().and_then(|m| m.parse::<u32>().ok()).is_some_and(|m| m >= 13), "{v}");
}

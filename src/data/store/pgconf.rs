//! Where a PostgreSQL dataset lives and how to log in, the way `psql` finds out: the
//! `postgres://` URL first, then the `PG*` environment variables for what it leaves out, then the
//! password file (`PGPASSFILE`, else `~/.pgpass`). The Rust client reads none of the environment
//! or the password file by itself. Passwords are only ever handed to the client: `redacted`
//! is what messages, logs and settings see.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use postgres::config::Host;

use super::StoreError;

/// Whether a dataset location is a PostgreSQL URL rather than a folder.
pub fn is_url(location: &Path) -> bool {
    location
        .to_str()
        .is_some_and(|s| s.starts_with("postgres://") || s.starts_with("postgresql://"))
}

/// The environment as the connection settings read it (a function, so tests can pass their own).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The client configuration for `url`, completed from the environment and the password file.
pub fn config(url: &str, env: Env<'_>) -> Result<postgres::Config, StoreError> {
    let bad = |reason: String| StoreError::BadDatabaseUrl {
        url: redact_url(url),
        reason,
    };
    let mut cfg = postgres::Config::from_str(url).map_err(|e| bad(e.to_string()))?;
    if cfg.get_hosts().is_empty() {
        match env("PGHOST") {
            Some(h) if !h.is_empty() => {
                for h in h.split(',') {
                    cfg.host(h);
                }
            }
            // libpq on Debian connects to the server's Unix socket when no host is given.
            _ if Path::new("/var/run/postgresql").is_dir() => {
                cfg.host("/var/run/postgresql");
            }
            _ => {
                cfg.host("localhost");
            }
        }
    }
    if cfg.get_ports().is_empty()
        && let Some(p) = env("PGPORT")
    {
        let port = p.parse().map_err(|_| bad(format!("PGPORT={p:?} is not a port number")))?;
        cfg.port(port);
    }
    if cfg.get_user().is_none() {
        let user = env("PGUSER").or_else(|| env("USER")).unwrap_or_else(|| "postgres".into());
        cfg.user(&user);
    }
    if cfg.get_dbname().is_none() {
        let db = env("PGDATABASE").unwrap_or_else(|| cfg.get_user().unwrap_or_default().to_string());
        cfg.dbname(&db);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("rfstudio");
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(std::time::Duration::from_secs(10));
    }
    if cfg.get_password().is_none() {
        if let Some(p) = env("PGPASSWORD") {
            cfg.password(p);
        } else if let Some(file) = env("PGPASSFILE").map(PathBuf::from).or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")))
            && let Some(contents) = read_private(&file)
        {
            let host = host_name(&cfg);
            let port = cfg.get_ports().first().copied().unwrap_or(5432).to_string();
            if let Some(p) = pgpass_lookup(
                &contents,
                &host,
                &port,
                cfg.get_dbname().unwrap_or_default(),
                cfg.get_user().unwrap_or_default(),
            ) {
                cfg.password(p);
            }
        }
    }
    Ok(cfg)
}

/// Connect to `url` (completed from the process environment).
pub fn connect(url: &str) -> Result<(postgres::Client, String), StoreError> {
    let env = |k: &str| std::env::var(k).ok();
    let cfg = config(url, &env)?;
    let target = describe(&cfg);
    let client = cfg.connect(postgres::NoTls).map_err(|error| StoreError::Postgres {
        target: target.clone(),
        error,
    })?;
    Ok((client, target))
}

/// `user@host:port/dbname`, never the password.
pub fn describe(cfg: &postgres::Config) -> String {
    let port = cfg.get_ports().first().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "postgres://{}@{}{port}/{}",
        cfg.get_user().unwrap_or_default(),
        host_name(cfg),
        cfg.get_dbname().unwrap_or_default()
    )
}

/// The URL with any password replaced by `***` (for messages about a URL that did not parse).
pub fn redact_url(url: &str) -> String {
    replace_password(url, Some("***"))
}

/// The URL with any password left out (what may be saved: the password then comes from the
/// environment or the password file).
pub fn without_password(url: &str) -> String {
    replace_password(url, None)
}

/// The URL with its password (in the user part or a `password=` parameter) replaced by `mask`,
/// or left out without one.
fn replace_password(url: &str, mask: Option<&str>) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((cred, host)) => match (cred.split_once(':'), mask) {
            (Some((user, _)), Some(m)) => format!("{user}:{m}@{host}"),
            (Some((user, _)), None) => format!("{user}@{host}"),
            (None, _) => format!("{cred}@{host}"),
        },
        None => authority.to_string(),
    };
    let (path, query) = tail.split_once('?').map_or((tail, None), |(p, q)| (p, Some(q)));
    let params: Vec<String> = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| match (kv.split_once('=').map_or(kv, |(k, _)| k) == "password", mask) {
            (false, _) => Some(kv.to_string()),
            (true, Some(m)) => Some(format!("password={m}")),
            (true, None) => None,
        })
        .collect();
    if params.is_empty() {
        format!("{scheme}://{authority}{path}")
    } else {
        format!("{scheme}://{authority}{path}?{}", params.join("&"))
    }
}

fn host_name(cfg: &postgres::Config) -> String {
    match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    }
}

/// The password file's contents, unless others may read it (libpq ignores such a file too).
fn read_private(file: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).ok()?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "{}: ignored, others may read it (chmod 0600 {} to use it)",
            file.display(),
            file.display()
        );
        return None;
    }
    std::fs::read_to_string(file).ok()
}

/// The password for a connection from `.pgpass` contents: lines
/// `hostname:port:database:username:password`, `*` matching anything, `\:` and `\\` escaping,
/// `#` comments, the first matching line winning. A Unix-socket connection also matches the
/// host `localhost`, as with libpq.
pub fn pgpass_lookup(contents: &str, host: &str, port: &str, db: &str, user: &str) -> Option<String> {
    for line in contents.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass(line);
        let [h, p, d, u, pw] = fields.as_slice() else { continue };
        let host_ok = h == "*" || h == host || (host.starts_with('/') && h == "localhost");
        let ok = |field: &str, want: &str| field == "*" || field == want;
        if host_ok && ok(p, port) && ok(d, db) && ok(u, user) {
            return Some(pw.clone());
        }
    }
    None
}

fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().map(|f| f.push(n));
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c)
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn pgpass_first_match_wildcards_escapes_and_socket_as_localhost() {
        let file = "# team server\n\
                    db.lab:5432:rf1m:alice:first\n\
                    db.lab:*:*:alice:second\n\
                    localhost:5432:*:bob:pa\\:ss\\\\word\n\
                    *:*:*:*:fallback\n";
        assert_eq!(pgpass_lookup(file, "db.lab", "5432", "rf1m", "alice").as_deref(), Some("first"));
        assert_eq!(pgpass_lookup(file, "db.lab", "6000", "other", "alice").as_deref(), Some("second"));
        assert_eq!(
            pgpass_lookup(file, "/var/run/postgresql", "5432", "x", "bob").as_deref(),
            Some("pa:ss\\word")
        );
        assert_eq!(pgpass_lookup(file, "elsewhere", "1", "d", "carol").as_deref(), Some("fallback"));
        assert_eq!(pgpass_lookup("db.lab:5432:rf1m:alice:x\n", "db.lab", "5432", "rf1m", "bob"), None);
    }

    #[test]
    fn url_fields_win_and_the_environment_fills_the_rest() {
        let env = env_of(&[
            ("PGHOST", "db.lab"),
            ("PGPORT", "6543"),
            ("PGUSER", "alice"),
            ("PGDATABASE", "rf1m"),
            ("PGPASSWORD", "s3cret"),
        ]);
        let cfg = config("postgres://", &env).unwrap();
        assert_eq!(describe(&cfg), "postgres://alice@db.lab:6543/rf1m");
        assert_eq!(cfg.get_password(), Some(&b"s3cret"[..]));
        let cfg = config("postgresql://bob:pw@other:5000/team", &env).unwrap();
        assert_eq!(describe(&cfg), "postgres://bob@other:5000/team");
        assert_eq!(cfg.get_password(), Some(&b"pw"[..]));
        let cfg = config("postgresql:///team?host=/tmp/sock&user=carol", &env).unwrap();
        assert_eq!(describe(&cfg), "postgres://carol@/tmp/sock:6543/team");
    }

    #[test]
    fn the_password_file_is_read_only_when_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(&file, "*:*:*:alice:from-file\n").unwrap();
        let path = file.display().to_string();
        let env = move |k: &str| match k {
            "PGPASSFILE" => Some(path.clone()),
            "PGHOST" => Some("db.lab".into()),
            _ => None,
        };
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(config("postgres://alice@/rf1m", &env).unwrap().get_password(), None);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            config("postgres://alice@/rf1m", &env).unwrap().get_password(),
            Some(&b"from-file"[..])
        );
    }

    #[test]
    fn redacted_urls_keep_everything_but_the_password() {
        assert_eq!(redact_url("postgres://bob:hunter2@db:5432/rf1m"), "postgres://bob:***@db:5432/rf1m");
        assert_eq!(
            redact_url("postgresql:///rf1m?user=bob&password=hunter2"),
            "postgresql:///rf1m?user=bob&password=***"
        );
        assert_eq!(redact_url("postgres://db/rf1m"), "postgres://db/rf1m");
        let e = config("postgres://bob:hunter2@db:notaport/x", &|_| None).unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert_eq!(without_password("postgres://bob:hunter2@db:5432/rf1m"), "postgres://bob@db:5432/rf1m");
        assert_eq!(
            without_password("postgresql:///rf1m?password=hunter2&user=bob"),
            "postgresql:///rf1m?user=bob"
        );
    }
}

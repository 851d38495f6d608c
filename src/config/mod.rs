//! Config file: YAML -> raw structs (`raw.rs`) -> `validate()` (`validate.rs`, `route.rs`)
//! -> a checked [`Config`].
//!
//! Every problem carries file:line:column (`problem.rs`), and validation reports all of them at
//! once: unknown keys (found by walking the document, not by serde: `fields.rs`) and missing
//! fields sit beside value problems. Only a YAML syntax error stops early, since past it nothing
//! about the file is known; a value of the wrong type ends the typed parse but keeps the unknown
//! keys found beside it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde_saphyr::Spanned;

use crate::config::routes::RouteTable;

mod check;
pub(crate) mod fields;
mod problem;
mod raw;
mod route;
pub mod routes;
mod sources;
mod validate;

pub(crate) use problem::Warning;
pub use problem::{Problem, Problems};
pub use sources::{KeySource, KeySources, Scheme};

/// Names of the headers that tell the upstream who called.
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    /// Carries the key id.
    pub key_id: HeaderName,
    /// Carries the key's service account.
    pub service_account: HeaderName,
}

/// A checked configuration, ready to serve.
#[derive(Debug)]
pub struct Config {
    /// Unique per parsed config, so per-thread caches know when to rebuild.
    pub generation: u64,
    /// The config file this came from.
    pub path: PathBuf,
    /// Address the gateway listens on.
    pub listen: SocketAddr,
    /// The key file, resolved against the config's folder.
    pub keys_file: PathBuf,
    /// Where `keys_file` is written in the config, for problems reading the key file.
    pub(crate) keys_file_at: serde_saphyr::Location,
    /// Where last-used times are persisted.
    pub state_file: PathBuf,
    /// Prebuilt `WWW-Authenticate` value for every 401.
    pub www_authenticate: HeaderValue,
    /// Identity header names.
    pub identity: IdentityHeaders,
    /// Scopes that `keys create` accepts, when the operator lists them.
    pub known_scopes: Option<Vec<String>>,
    /// The compiled route table.
    pub routes: RouteTable,
    /// TLS on `listen`, when set.
    pub tls: Option<TlsFiles>,
    /// Address of the health and metrics listener, when set.
    pub admin_listen: Option<SocketAddr>,
    /// Access log format.
    pub log_format: LogFormat,
    /// Limits.
    pub limits: Limits,
    /// Time in-flight requests get after SIGTERM.
    pub shutdown_grace: Duration,
    /// Time the listener keeps accepting after SIGTERM while `/readyz` says 503.
    pub shutdown_delay: Duration,
    /// Whether metrics carry key ids.
    pub metrics_per_key: bool,
    /// Where `keys` commands append one JSON line per key change, when set.
    pub audit_log: Option<PathBuf>,
    /// Peers whose `X-Forwarded-*` headers are believed; empty believes none.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Settings that are allowed but probably not meant (`scopes: []`), in file order.
    pub warnings: Vec<Problem>,
}

/// Where the gateway's TLS certificate and key live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, RSA or SEC1).
    pub key: PathBuf,
}

/// Access log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Space-separated fields.
    Text,
}

/// Connection and request limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (431 beyond).
    pub max_header_bytes: u64,
    /// Time a client gets to send a whole request head.
    pub header_read_timeout: Duration,
    /// Idle keep-alive connections are closed after this.
    pub idle_timeout: Duration,
    /// Time to establish an upstream connection.
    pub upstream_connect_timeout: Duration,
    /// Silence on an HTTP/2 upstream connection with requests waiting before it is pinged.
    pub upstream_ping_interval: Duration,
    /// Concurrent downstream connections; more wait in the accept queue.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            upstream_connect_timeout: Duration::from_secs(5),
            // Above gRPC-Go's 5-minute minimum between pings, which it enforces with a
            // GOAWAY (`too_many_pings`) for the whole connection.
            upstream_ping_interval: Duration::from_secs(360),
            max_connections: 10_000,
        }
    }
}

/// Default listen address when the config names none.
pub(crate) const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

/// Where last-used state lives when the config sets no `state_file`: beside the key file.
pub(crate) fn default_state_file(keys_file: &Path) -> PathBuf {
    folder_of(keys_file).join("keys-state.json")
}

/// Parses a duration written as `500ms`, `30s`, `2m`, `1h`, `90d`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() || !t.as_bytes()[0].is_ascii_digit() {
        return Err(format!(
            "invalid duration {text:?}: expected e.g. 500ms, 30s, 2m, 90d"
        ));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("invalid duration {text:?}: {e} (expected e.g. 500ms, 30s, 2m, 90d)"))
}

/// Parses a size: a byte count, or a number with `KiB`, `MiB` or `GiB` (`B` and `KB`/`MB`/`GB`
/// are read as the binary units too).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size {text:?}: expected e.g. 65536, 64KiB, 10MiB, 1GiB"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {text:?}: expected e.g. 65536, 64KiB, 10MiB, 1GiB"))
}

impl Config {
    /// A key file that cannot be read at all is reported at the config's `keys_file` line.
    pub(crate) fn locate_key_file_problems(&self, mut problems: Problems) -> Problems {
        for p in problems
            .0
            .iter_mut()
            .filter(|p| p.line == 0 && p.file == self.keys_file)
        {
            *p = Problem::at(
                &self.path,
                self.keys_file_at,
                format!("keys_file {}: {}", self.keys_file.display(), p.message),
            );
        }
        problems
    }

    /// The `WWW-Authenticate` value for a 401 on route `route` (by index): the schemes that
    /// route reads keys under, or the realm's `Api-Key` challenge.
    pub(crate) fn challenge(&self, route: Option<usize>) -> &HeaderValue {
        route
            .and_then(|i| self.routes.get(i))
            .map_or(&self.www_authenticate, |r| &r.key_sources.challenge)
    }

    /// Logs each of [`Config::warnings`] once; serve and every reload call it.
    pub(crate) fn log_warnings(&self) {
        for w in &self.warnings {
            tracing::warn!("{}", Warning(w));
        }
    }

    /// Reads and checks the config file (not the key file).
    pub(crate) fn load(path: &Path) -> Result<Config, Problems> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Problems(vec![Problem::whole(path, format!("cannot read: {e}"))]))?;
        Config::parse(path, &text)
    }

    /// Parses and checks config text that came from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, Problems> {
        let (problems, raw) = fields::read_checked::<Spanned<raw::RawConfig>>(
            path,
            text,
            &raw::CONFIG_SHAPE,
            serde_saphyr::Options::default(),
        )?;
        match raw {
            Some(raw) => validate::validate(path, raw, problems),
            None => Err(Problems::sorted(problems)),
        }
    }
}

/// The folder `path` sits in, or `.` for a bare file name: relative paths in a file are read
/// against it, and temp files go there so a rename never crosses file systems.
pub(crate) fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// `rel` read against `base` unless it is absolute.
fn resolve(base: &Path, rel: &str) -> PathBuf {
    let p = Path::new(rel);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

//! Config file: YAML -> raw structs -> `validate()` -> a checked [`Config`].
//!
//! Every problem carries file:line:column, and validation reports all of them at once:
//! unknown keys (found by walking the document, not by serde) and missing fields sit beside value problems.
//! Only a YAML syntax error stops early, since past it nothing about the file is known; a value
//! of the wrong type ends the typed parse but keeps the unknown keys found beside it.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::routes::{HostMatch, Route, RouteTable, Upstream};

mod fields;

pub(crate) use fields::{read_checked, read_fields, unknown_field, KeyText, Shape};

/// One problem found in a config or key file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, 0 when the problem has no position (unreadable file).
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// What is wrong, for a human.
    pub message: String,
}

impl Problem {
    /// A problem at a YAML location.
    pub fn at(file: &Path, loc: serde_saphyr::Location, message: impl Into<String>) -> Self {
        Problem {
            file: file.to_path_buf(),
            line: loc.line(),
            column: loc.column(),
            message: message.into(),
        }
    }

    /// A problem with the file as a whole.
    pub fn whole(file: &Path, message: impl Into<String>) -> Self {
        Problem {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }

    /// A YAML syntax or shape error, with the location the parser gave.
    pub fn from_yaml(file: &Path, err: &serde_saphyr::Error) -> Self {
        let err = err.without_snippet();
        let text = err.to_string();
        // The parser appends " at line L, column C"; the location is printed in front instead.
        let message = match text.rfind(" at line ") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        match err.location() {
            Some(loc) => Problem::at(file, loc, message),
            None => Problem::whole(file, message),
        }
    }
}

/// A [`Problem`] shown as a warning: `file:line:column: warning: message`.
pub struct Warning<'a>(pub &'a Problem);

impl fmt::Display for Warning<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.0;
        if p.line > 0 {
            write!(f, "{}:{}:{}: ", p.file.display(), p.line, p.column)?;
        } else {
            write!(f, "{}: ", p.file.display())?;
        }
        write!(f, "warning: {}", p.message)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        } else {
            write!(f, "{}: {}", self.file.display(), self.message)
        }
    }
}

/// All problems found in one load; never empty.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Problems in file order; the ones without a position go last.
    pub fn sorted(mut problems: Vec<Problem>) -> Problems {
        problems.sort_by_key(|p| (p.line == 0, p.line, p.column));
        Problems(problems)
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

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
    pub keys_file_at: serde_saphyr::Location,
    /// Where last-used times are persisted.
    pub state_file: PathBuf,
    /// Realm named in `WWW-Authenticate`.
    pub realm: String,
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
    /// Settings that are allowed but probably not meant (`scopes: []`), in file order.
    pub warnings: Vec<Problem>,
}

#[derive(Deserialize)]
// Required fields are `Option` too: a missing one becomes a problem beside the others
// instead of a serde error that ends the parse.
struct RawConfig {
    listen: Option<Spanned<String>>,
    keys_file: Option<Spanned<String>>,
    state_file: Option<Spanned<String>>,
    realm: Option<Spanned<String>>,
    identity_headers: Option<RawIdentity>,
    known_scopes: Option<Vec<Spanned<String>>>,
    routes: Option<Spanned<Vec<Spanned<RawRoute>>>>,
    tls: Option<Spanned<RawTls>>,
    admin_listen: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
    limits: Option<RawLimits>,
    shutdown_grace: Option<Spanned<String>>,
    shutdown_delay: Option<Spanned<String>>,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize)]
struct RawLimits {
    max_header_bytes: Option<Spanned<SizeText>>,
    header_read_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    upstream_connect_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
struct RawMetrics {
    #[serde(default)]
    per_key: bool,
}

/// A size written as a byte count or as text like `10MiB`.
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeText {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
struct RawIdentity {
    key_id: Option<Spanned<String>>,
    service_account: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawRoute {
    name: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    methods: Option<Vec<Spanned<String>>>,
    upstream: Option<Spanned<String>>,
    #[serde(default)]
    strip_prefix: bool,
    // Absent and `[]` differ: only `[]` admits any valid key.
    scopes: Option<Spanned<Vec<Spanned<String>>>>,
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    public: Option<Spanned<bool>>,
    max_body: Option<Spanned<SizeText>>,
    ca_file: Option<Spanned<String>>,
    tls_server_name: Option<Spanned<String>>,
    websocket: Option<Spanned<bool>>,
}

// Unknown keys are found by walking these, not by serde, so that each one is reported with
// the file's other problems; `shapes_match_the_raw_structs` keeps them in step.
const TLS_SHAPE: Shape = Shape::Map("tls", &[("cert", Shape::Leaf), ("key", Shape::Leaf)]);
const LIMITS_SHAPE: Shape = Shape::Map(
    "limits",
    &[
        ("max_header_bytes", Shape::Leaf),
        ("header_read_timeout", Shape::Leaf),
        ("idle_timeout", Shape::Leaf),
        ("upstream_connect_timeout", Shape::Leaf),
        ("max_connections", Shape::Leaf),
    ],
);
const METRICS_SHAPE: Shape = Shape::Map("metrics", &[("per_key", Shape::Leaf)]);
const IDENTITY_SHAPE: Shape = Shape::Map(
    "identity_headers",
    &[("key_id", Shape::Leaf), ("service_account", Shape::Leaf)],
);
const ROUTE_SHAPE: Shape = Shape::Map(
    "route",
    &[
        ("name", Shape::Leaf),
        ("path_prefix", Shape::Leaf),
        ("host", Shape::Leaf),
        ("methods", Shape::Leaf),
        ("upstream", Shape::Leaf),
        ("strip_prefix", Shape::Leaf),
        ("scopes", Shape::Leaf),
        ("timeout", Shape::Leaf),
        ("public", Shape::Leaf),
        ("max_body", Shape::Leaf),
        ("ca_file", Shape::Leaf),
        ("tls_server_name", Shape::Leaf),
        ("websocket", Shape::Leaf),
    ],
);
const CONFIG_SHAPE: Shape = Shape::Map(
    "the config",
    &[
        ("listen", Shape::Leaf),
        ("keys_file", Shape::Leaf),
        ("state_file", Shape::Leaf),
        ("realm", Shape::Leaf),
        ("identity_headers", IDENTITY_SHAPE),
        ("known_scopes", Shape::Leaf),
        ("routes", Shape::List(&ROUTE_SHAPE)),
        ("tls", TLS_SHAPE),
        ("admin_listen", Shape::Leaf),
        ("log_format", Shape::Leaf),
        ("limits", LIMITS_SHAPE),
        ("shutdown_grace", Shape::Leaf),
        ("shutdown_delay", Shape::Leaf),
        ("metrics", METRICS_SHAPE),
    ],
);

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
            max_connections: 10_000,
        }
    }
}

/// Default listen address when the config names none.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

/// Where last-used state lives when the config sets no `state_file`: beside the key file.
pub fn default_state_file(keys_file: &Path) -> PathBuf {
    let dir = match keys_file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    dir.join("keys-state.json")
}

/// Parses a duration written as `500ms`, `30s`, `2m`, `1h`, `90d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
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
pub fn parse_size(text: &str) -> Result<u64, String> {
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

fn size_value(s: &Spanned<SizeText>, file: &Path, problems: &mut Vec<Problem>) -> Option<u64> {
    let r = match &s.value {
        SizeText::Bytes(n) => Ok(*n),
        SizeText::Text(t) => parse_size(t),
    };
    match r {
        Ok(0) => {
            problems.push(Problem::at(
                file,
                s.referenced,
                "size must be greater than zero",
            ));
            None
        }
        Ok(n) => Some(n),
        Err(e) => {
            problems.push(Problem::at(file, s.referenced, e));
            None
        }
    }
}

fn duration_value(
    s: &Spanned<String>,
    file: &Path,
    problems: &mut Vec<Problem>,
) -> Option<Duration> {
    match parse_duration(&s.value) {
        Ok(d) if d.is_zero() => {
            problems.push(Problem::at(
                file,
                s.referenced,
                "duration must be greater than zero",
            ));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            problems.push(Problem::at(file, s.referenced, e));
            None
        }
    }
}

/// Scope names: dot-separated words, optionally ending in `.*`, or `*` alone.
pub fn check_scope(scope: &str) -> Result<(), String> {
    let body = scope.strip_suffix(".*").unwrap_or(scope);
    let ok = scope == "*"
        || (!body.is_empty()
            && body.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            }));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid scope {scope:?}: expected dot-separated words like yc.postbox.send"
        ))
    }
}

impl Config {
    /// A key file that cannot be read at all is reported at the config's `keys_file` line.
    pub fn locate_key_file_problems(&self, mut problems: Problems) -> Problems {
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

    /// Logs each of [`Config::warnings`] once; serve and every reload call it.
    pub fn log_warnings(&self) {
        for w in &self.warnings {
            tracing::warn!("{}", Warning(w));
        }
    }

    /// Reads and checks the config file (not the key file).
    pub fn load(path: &Path) -> Result<Config, Problems> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Problems(vec![Problem::whole(path, format!("cannot read: {e}"))]))?;
        Config::parse(path, &text)
    }

    /// Parses and checks config text that came from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, Problems> {
        let (problems, raw) = read_checked::<Spanned<RawConfig>>(
            path,
            text,
            &CONFIG_SHAPE,
            serde_saphyr::Options::default(),
        )?;
        match raw {
            Some(raw) => validate(path, raw, problems),
            None => Err(Problems::sorted(problems)),
        }
    }
}

fn resolve(base: &Path, rel: &str) -> PathBuf {
    let p = Path::new(rel);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Checks `raw`; `problems` already holds what the parse found (unknown keys).
fn validate(
    path: &Path,
    raw: Spanned<RawConfig>,
    mut problems: Vec<Problem>,
) -> Result<Config, Problems> {
    let top = raw.referenced;
    let raw = raw.value;
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };

    let listen = match &raw.listen {
        Some(l) => l.value.parse::<SocketAddr>().unwrap_or_else(|_| {
            problems.push(Problem::at(
                path,
                l.referenced,
                format!("invalid listen address {:?}: expected IP:PORT", l.value),
            ));
            DEFAULT_LISTEN
        }),
        None => DEFAULT_LISTEN,
    };

    let keys_file_at = raw.keys_file.as_ref().map_or(top, |k| k.referenced);
    match &raw.keys_file {
        None => problems.push(Problem::at(path, top, "missing field `keys_file`")),
        Some(k) if k.value.trim().is_empty() => {
            problems.push(Problem::at(path, k.referenced, "keys_file is empty"));
        }
        Some(_) => {}
    }
    let keys_file = resolve(&base, raw.keys_file.as_ref().map_or("", |k| &k.value));
    let state_file = match &raw.state_file {
        Some(s) => resolve(&base, &s.value),
        None => default_state_file(&keys_file),
    };

    let realm = raw
        .realm
        .as_ref()
        .map(|r| r.value.clone())
        .unwrap_or_else(|| "keygate".to_string());
    let www = format!("Api-Key realm=\"{}\"", realm.replace(['"', '\\'], ""));
    let www_authenticate = HeaderValue::from_str(&www).unwrap_or_else(|_| {
        if let Some(r) = &raw.realm {
            problems.push(Problem::at(
                path,
                r.referenced,
                "realm must be printable ASCII",
            ));
        }
        HeaderValue::from_static("Api-Key realm=\"keygate\"")
    });

    let mut header = |v: Option<&Spanned<String>>, default: &'static str| match v {
        None => HeaderName::from_static(default),
        Some(s) => HeaderName::from_bytes(s.value.as_bytes()).unwrap_or_else(|_| {
            problems.push(Problem::at(
                path,
                s.referenced,
                format!("invalid header name {:?}", s.value),
            ));
            HeaderName::from_static(default)
        }),
    };
    let ident = raw.identity_headers.as_ref();
    let identity = IdentityHeaders {
        key_id: header(ident.and_then(|i| i.key_id.as_ref()), "x-api-key-id"),
        service_account: header(
            ident.and_then(|i| i.service_account.as_ref()),
            "x-service-account",
        ),
    };
    for (name, spanned) in [
        (&identity.key_id, ident.and_then(|i| i.key_id.as_ref())),
        (
            &identity.service_account,
            ident.and_then(|i| i.service_account.as_ref()),
        ),
    ] {
        if crate::headers::is_reserved(name) {
            if let Some(s) = spanned {
                problems.push(Problem::at(
                    path,
                    s.referenced,
                    format!("identity header {name} would clash with a header the gateway manages"),
                ));
            }
        }
    }
    if identity.key_id == identity.service_account {
        problems.push(Problem::whole(
            path,
            "identity_headers.key_id and identity_headers.service_account must differ",
        ));
    }

    let known_scopes = raw.known_scopes.as_ref().map(|list| {
        list.iter()
            .filter_map(|s| match check_scope(&s.value) {
                Ok(()) => Some(s.value.clone()),
                Err(e) => {
                    problems.push(Problem::at(path, s.referenced, e));
                    None
                }
            })
            .collect::<Vec<_>>()
    });

    let tls = raw.tls.as_ref().map(|t| TlsFiles {
        cert: resolve(&base, &t.value.cert.value),
        key: resolve(&base, &t.value.key.value),
    });
    let admin_listen =
        raw.admin_listen
            .as_ref()
            .and_then(|a| match a.value.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    problems.push(Problem::at(
                        path,
                        a.referenced,
                        format!(
                            "invalid admin_listen address {:?}: expected IP:PORT",
                            a.value
                        ),
                    ));
                    None
                }
            });
    let log_format = match raw.log_format.as_ref().map(|f| (f, f.value.as_str())) {
        None | Some((_, "json")) => LogFormat::Json,
        Some((_, "text")) => LogFormat::Text,
        Some((f, other)) => {
            problems.push(Problem::at(
                path,
                f.referenced,
                format!("invalid log_format {other:?}: expected json or text"),
            ));
            LogFormat::Json
        }
    };
    let mut limits = Limits::default();
    if let Some(l) = &raw.limits {
        if let Some(v) = l
            .max_header_bytes
            .as_ref()
            .and_then(|v| size_value(v, path, &mut problems))
        {
            limits.max_header_bytes = v;
        }
        for (field, slot) in [
            (&l.header_read_timeout, &mut limits.header_read_timeout),
            (&l.idle_timeout, &mut limits.idle_timeout),
            (
                &l.upstream_connect_timeout,
                &mut limits.upstream_connect_timeout,
            ),
        ] {
            if let Some(d) = field
                .as_ref()
                .and_then(|v| duration_value(v, path, &mut problems))
            {
                *slot = d;
            }
        }
        if let Some(m) = &l.max_connections {
            match usize::try_from(m.value) {
                Ok(n) if n > 0 => limits.max_connections = n,
                _ => problems.push(Problem::at(
                    path,
                    m.referenced,
                    "max_connections must be at least 1",
                )),
            }
        }
    }
    let shutdown_grace = match &raw.shutdown_grace {
        None => Duration::from_secs(30),
        Some(g) => match parse_duration(&g.value) {
            Ok(d) => d,
            Err(e) => {
                problems.push(Problem::at(path, g.referenced, e));
                Duration::from_secs(30)
            }
        },
    };

    let shutdown_delay = match &raw.shutdown_delay {
        None => Duration::ZERO,
        Some(g) => match parse_duration(&g.value) {
            Ok(d) => d,
            Err(e) => {
                problems.push(Problem::at(path, g.referenced, e));
                Duration::ZERO
            }
        },
    };

    let raw_routes = raw.routes.as_ref().map_or(&[][..], |r| r.value.as_slice());
    if raw_routes.is_empty() {
        // With no route every request is a 404: a config that serves nothing is a mistake.
        let at = raw.routes.as_ref().map_or(top, |r| r.referenced);
        problems.push(Problem::at(
            path,
            at,
            "no routes: every request would be refused with 404; add at least one route",
        ));
    }
    let mut warnings = Vec::new();
    let mut routes = Vec::with_capacity(raw_routes.len());
    let mut names: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for r in raw_routes {
        let loc = r.referenced;
        let r = &r.value;
        if let Some(name) = &r.name {
            if let Some(first) = names.insert(name.value.clone(), name.referenced.line()) {
                problems.push(Problem::at(
                    path,
                    name.referenced,
                    format!(
                        "duplicate route name {:?} (first declared on line {first})",
                        name.value
                    ),
                ));
            }
        }
        let found = Found {
            problems: &mut problems,
            warnings: &mut warnings,
        };
        if let Some(route) = check_route(path, &base, loc, r, known_scopes.as_deref(), found) {
            routes.push(route);
        }
    }

    if !problems.is_empty() {
        return Err(Problems::sorted(problems));
    }
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    Ok(Config {
        generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        path: path.to_path_buf(),
        listen,
        keys_file,
        keys_file_at,
        state_file,
        realm,
        www_authenticate,
        identity,
        known_scopes,
        routes: RouteTable::new(routes),
        tls,
        admin_listen,
        log_format,
        limits,
        shutdown_grace,
        shutdown_delay,
        metrics_per_key: raw.metrics.is_some_and(|m| m.per_key),
        warnings: Problems::sorted(warnings).0,
    })
}

/// Where a route's check puts what it finds.
struct Found<'a> {
    problems: &'a mut Vec<Problem>,
    warnings: &'a mut Vec<Problem>,
}

/// The request methods a route may list; anything else is a typo or a method no client sends.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Reads one `methods` entry; lowercase is accepted, since a method is never case-folded later.
fn check_method(text: &str) -> Result<Method, String> {
    let upper = text.trim().to_ascii_uppercase();
    if let Some(m) = METHODS.iter().find(|m| **m == upper) {
        return Method::from_bytes(m.as_bytes())
            .map_err(|_| format!("invalid HTTP method {text:?}"));
    }
    Err(match fields::nearest_word(&upper, &METHODS) {
        Some(near) => format!("unknown HTTP method {text:?}; did you mean `{near}`?"),
        None => format!(
            "unknown HTTP method {text:?}: expected one of {}",
            METHODS.join(", ")
        ),
    })
}

fn check_route(
    path: &Path,
    base: &Path,
    loc: serde_saphyr::Location,
    r: &RawRoute,
    known_scopes: Option<&[String]>,
    found: Found<'_>,
) -> Option<Route> {
    let Found { problems, warnings } = found;
    let before = problems.len();
    for (field, value) in [
        ("name", &r.name),
        ("path_prefix", &r.path_prefix),
        ("upstream", &r.upstream),
    ] {
        if value.is_none() {
            problems.push(Problem::at(
                path,
                loc,
                format!("missing field `{field}` in route"),
            ));
        }
    }
    let route_name = r.name.as_ref().map_or("", |n| n.value.as_str());
    let mut bad =
        |s: &Spanned<String>, msg: String| problems.push(Problem::at(path, s.referenced, msg));

    if let Some(name) = r.name.as_ref().filter(|n| n.value.trim().is_empty()) {
        bad(name, "route name is empty".into());
    }
    let prefix = r.path_prefix.as_ref().map_or("", |p| p.value.as_str());
    if let Some(p) = &r.path_prefix {
        let prefix_ok = prefix.starts_with('/')
            && matches!(
                crate::path::normalize(prefix),
                Ok(std::borrow::Cow::Borrowed(_))
            );
        if !prefix_ok {
            bad(
                p,
                format!("path_prefix {prefix:?} must be a normalized absolute path like /api/"),
            );
        }
    }

    let host = r
        .host
        .as_ref()
        .and_then(|h| match HostMatch::parse(&h.value) {
            Ok(m) => Some(m),
            Err(e) => {
                bad(h, e);
                None
            }
        });

    let methods = r.methods.as_ref().map(|ms| {
        ms.iter()
            .filter_map(|m| check_method(&m.value).map_err(|e| bad(m, e)).ok())
            .collect::<Vec<_>>()
    });
    if let Some(ms) = &r.methods {
        if ms.is_empty() {
            problems.push(Problem::at(
                path,
                loc,
                format!("route {route_name:?}: methods is empty; omit it to allow every method"),
            ));
        }
    }

    let upstream = r
        .upstream
        .as_ref()
        .and_then(|u| match Upstream::parse(&u.value) {
            Ok(u) => Some(u),
            Err(e) => {
                problems.push(Problem::at(path, u.referenced, e));
                None
            }
        });

    let listed = r.scopes.as_ref().map_or(&[][..], |s| s.value.as_slice());
    let mut scopes = Vec::with_capacity(listed.len());
    for s in listed {
        if let Err(e) = check_scope(&s.value) {
            problems.push(Problem::at(path, s.referenced, e));
        } else if s.value.ends_with('*') {
            problems.push(Problem::at(
                path,
                s.referenced,
                format!(
                    "route scope {:?} must be a concrete scope, not a wildcard",
                    s.value
                ),
            ));
        } else if let Some(known) = known_scopes {
            if !known.iter().any(|k| k == &s.value) {
                problems.push(Problem::at(
                    path,
                    s.referenced,
                    format!("scope {:?} is not in known_scopes", s.value),
                ));
            }
        }
        scopes.push(s.value.clone());
    }

    let public = r.public.as_ref().is_some_and(|p| p.value);
    match &r.scopes {
        // Forgetting `scopes` must not quietly admit every key: the open door is written out.
        None if !public => problems.push(Problem::at(
            path,
            loc,
            format!(
                "route {route_name:?} is neither public nor lists scopes; write `scopes: []` to admit any valid key"
            ),
        )),
        Some(s) if !public && s.value.is_empty() => warnings.push(Problem::at(
            path,
            s.referenced,
            format!("route {route_name:?} has `scopes: []`: any valid key is let through"),
        )),
        _ => {}
    }
    if public && !listed.is_empty() {
        if let Some(p) = &r.public {
            problems.push(Problem::at(
                path,
                p.referenced,
                format!(
                    "route {route_name:?} is public but lists scopes; a public route checks no key"
                ),
            ));
        }
    }

    let timeout = r
        .timeout
        .as_ref()
        .and_then(|t| match parse_duration(&t.value) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                problems.push(Problem::at(
                    path,
                    t.referenced,
                    "timeout must be greater than zero",
                ));
                None
            }
            Err(e) => {
                problems.push(Problem::at(path, t.referenced, e));
                None
            }
        });

    let max_body = r
        .max_body
        .as_ref()
        .and_then(|m| size_value(m, path, problems));
    let is_https = upstream
        .as_ref()
        .is_some_and(|u| u.scheme == crate::routes::UpstreamScheme::Https);
    for field in [&r.ca_file, &r.tls_server_name].into_iter().flatten() {
        if !is_https && upstream.is_some() {
            problems.push(Problem::at(
                path,
                field.referenced,
                "ca_file and tls_server_name apply only to https:// upstreams",
            ));
        }
    }
    let ca_file = r.ca_file.as_ref().map(|c| resolve(base, &c.value));
    if let (Some(file), Some(spanned)) = (&ca_file, &r.ca_file) {
        if let Err(e) = crate::tls::load_roots(file) {
            problems.push(Problem::at(path, spanned.referenced, e));
        }
    }
    if let Some(n) = &r.tls_server_name {
        if rustls_pki_types::ServerName::try_from(n.value.as_str()).is_err() {
            problems.push(Problem::at(
                path,
                n.referenced,
                format!("invalid tls_server_name {:?}", n.value),
            ));
        }
    }

    if problems.len() != before {
        return None;
    }
    let upstream = upstream?;
    Some(Route {
        index: 0,
        max_body,
        upstream_tls: crate::routes::UpstreamTls {
            ca_file,
            server_name: r.tls_server_name.as_ref().map(|n| n.value.clone()),
        },
        name: route_name.into(),
        path_prefix: prefix.to_string(),
        host,
        methods,
        upstream,
        strip_prefix: r.strip_prefix,
        scopes,
        timeout,
        public,
        websocket: r.websocket.as_ref().is_none_or(|w| w.value),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Problems> {
        Config::parse(Path::new("cfg/keygate.yaml"), text)
    }

    #[test]
    fn full_example_parses() {
        let cfg = parse(
            "listen: 127.0.0.1:8080\nkeys_file: keys.yaml\nrealm: keygate\nroutes:\n  - name: postbox\n    path_prefix: /postbox/\n    host: api.example.com\n    methods: [POST]\n    upstream: http://127.0.0.1:9001\n    scopes: [yc.postbox.send]\n    timeout: 30s\n  - name: health\n    path_prefix: /health\n    upstream: http://127.0.0.1:9002\n    public: true\n",
        )
        .unwrap();
        assert_eq!(cfg.keys_file, PathBuf::from("cfg/keys.yaml"));
        assert_eq!(cfg.state_file, PathBuf::from("cfg/keys-state.json"));
        assert_eq!(cfg.routes.len(), 2);
    }

    #[test]
    fn all_problems_reported_with_positions() {
        let err = parse(
            "keys_file: k.yaml\nroutes:\n  - name: a\n    path_prefix: /a\n    upstream: ftp://x\n    timeout: soon\n    scopes: []\n  - name: a\n    path_prefix: b\n    upstream: http://127.0.0.1:1\n    scopes: [x.y]\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("cfg/keygate.yaml:5:15:"), "{text}");
        assert!(text.contains("cfg/keygate.yaml:6:14:"), "{text}");
        assert!(
            text.contains("cfg/keygate.yaml:8:11: duplicate route name"),
            "{text}"
        );
        assert!(text.contains("cfg/keygate.yaml:9:18:"), "{text}");
        assert_eq!(err.0.len(), 4, "{text}");
    }

    fn route(extra: &str) -> String {
        format!("keys_file: k\nroutes:\n  - name: a\n    path_prefix: /a\n    upstream: http://x:1\n{extra}")
    }

    #[test]
    fn methods_are_the_standard_set_with_a_hint() {
        let cfg = parse(&route(
            "    scopes: [x.y]\n    methods: [get, PATCH, OPTIONS]\n",
        ))
        .unwrap();
        assert_eq!(
            cfg.routes
                .iter()
                .next()
                .unwrap()
                .methods
                .as_ref()
                .unwrap()
                .len(),
            3
        );
        let err = parse(&route("    scopes: [x.y]\n    methods: [GET, GTE, BREW]\n")).unwrap_err();
        let at: Vec<(u64, u64)> = err.0.iter().map(|p| (p.line, p.column)).collect();
        assert_eq!(at, vec![(7, 20), (7, 25)], "{err}");
        assert!(err.0[0].message.contains("did you mean `GET`?"), "{err}");
        assert!(!err.0[1].message.contains("did you mean"), "{err}");
    }

    #[test]
    fn out_of_range_ports_are_reported_at_the_upstream_value() {
        for port in ["0", "99999", "1a"] {
            let text = route("    scopes: [x.y]\n").replace("x:1", &format!("x:{port}"));
            let err = parse(&text).unwrap_err();
            let at: Vec<(u64, u64)> = err.0.iter().map(|p| (p.line, p.column)).collect();
            assert_eq!(at, vec![(5, 15)], "{port}: {err}");
        }
    }

    #[test]
    fn an_empty_route_table_is_an_error() {
        let err = parse("keys_file: k\nroutes: []\n").unwrap_err();
        assert_eq!((err.0[0].line, err.0[0].column), (2, 9), "{err}");
        let err = parse("keys_file: k\n").unwrap_err();
        assert_eq!((err.0[0].line, err.0[0].column), (1, 1), "{err}");
    }

    #[test]
    fn a_protected_route_must_list_scopes_and_an_empty_list_warns() {
        let err = parse(&route("")).unwrap_err();
        assert_eq!((err.0[0].line, err.0[0].column), (3, 5), "{err}");
        assert!(err.0[0].message.contains("`scopes: []`"), "{err}");
        let err = parse(&route("    public: false\n")).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        let cfg = parse(&route("    scopes: []\n")).unwrap();
        let at: Vec<(u64, u64)> = cfg.warnings.iter().map(|p| (p.line, p.column)).collect();
        assert_eq!(at, vec![(6, 13)], "{:?}", cfg.warnings);
        assert!(parse(&route("    public: true\n"))
            .unwrap()
            .warnings
            .is_empty());
        assert!(parse(&route("    scopes: [x.y]\n"))
            .unwrap()
            .warnings
            .is_empty());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = parse("keys_file: k.yaml\nlisten_addr: 1\nroutes: [{name: a, path_prefix: /, upstream: 'http://a:1', public: true}]\n").unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].line, 2);
        let err = parse("keys_file: k.yaml\nroutes:\n  - name: a\n    path_prefix: /a\n    upstream: http://a:1\n    scope: [x]\n").unwrap_err();
        // The typo is named, and the route it leaves without scopes is refused too.
        let at: Vec<u64> = err.0.iter().map(|p| p.line).collect();
        assert_eq!(at, vec![3, 6], "{err}");
    }

    #[test]
    fn unknown_keys_are_listed_beside_every_other_problem() {
        let err = parse(
            "keys_file: k.yaml\nlisten_addr: 1\nroutes:\n  - name: a\n    path_prefix: /a\n    upstream: ftp://x\n    scope: [x]\n    timeout: soon\n  - name: a\n    path_prefix: /b\n    upstream: http://127.0.0.1:1\n",
        )
        .unwrap_err();
        let at: Vec<(u64, u64)> = err.0.iter().map(|p| (p.line, p.column)).collect();
        // Both routes lack scopes (one by a typo): each is refused at the route.
        assert_eq!(
            at,
            vec![(2, 1), (4, 5), (6, 15), (7, 5), (8, 14), (9, 5), (9, 11)],
            "{err}"
        );
        assert!(err.0[0].message.contains("`listen`"), "{err}");
        assert!(err.0[3].message.contains("`scopes`"), "{err}");
    }

    #[test]
    fn missing_required_fields_do_not_hide_other_problems() {
        let err = parse("routes:\n  - name: a\n    timeout: soon\n    bogus: 1\n").unwrap_err();
        let at: Vec<(u64, u64)> = err.0.iter().map(|p| (p.line, p.column)).collect();
        // keys_file at the document, path_prefix, upstream and scopes at the route, then
        // timeout, bogus.
        assert_eq!(
            at,
            vec![(1, 1), (2, 5), (2, 5), (2, 5), (3, 14), (4, 5)],
            "{err}"
        );
    }

    /// The field list serde derived for `T`, read by a deserializer that only records it.
    fn serde_fields<T: Deserialize<'static>>() -> Vec<&'static str> {
        struct Capture(Vec<&'static str>);
        impl<'de> serde::Deserializer<'de> for &mut Capture {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: serde::de::Visitor<'de>>(
                self,
                _: V,
            ) -> Result<V::Value, Self::Error> {
                Err(serde::de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                self.0 = fields.to_vec();
                Err(serde::de::Error::custom("captured"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
                enum identifier ignored_any
            }
        }
        let mut c = Capture(Vec::new());
        let _ = T::deserialize(&mut c);
        let mut f = c.0;
        f.sort_unstable();
        f
    }

    fn shape_fields(shape: &Shape) -> Vec<&'static str> {
        let Shape::Map(_, fields) = shape else {
            panic!("not a map shape")
        };
        let mut f: Vec<&'static str> = fields.iter().map(|(n, _)| *n).collect();
        f.sort_unstable();
        f
    }

    #[test]
    fn shapes_match_the_raw_structs() {
        assert_eq!(shape_fields(&CONFIG_SHAPE), serde_fields::<RawConfig>());
        assert_eq!(shape_fields(&ROUTE_SHAPE), serde_fields::<RawRoute>());
        assert_eq!(shape_fields(&TLS_SHAPE), serde_fields::<RawTls>());
        assert_eq!(shape_fields(&LIMITS_SHAPE), serde_fields::<RawLimits>());
        assert_eq!(shape_fields(&METRICS_SHAPE), serde_fields::<RawMetrics>());
        assert_eq!(shape_fields(&IDENTITY_SHAPE), serde_fields::<RawIdentity>());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86400)
        );
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("ten").is_err());
        let cfg = parse("keys_file: k\nlimits:\n  max_header_bytes: 8KiB\n  idle_timeout: 2s\nroutes:\n  - name: a\n    path_prefix: /a\n    upstream: http://x:1\n    max_body: 1024\n    scopes: []\n").unwrap();
        assert_eq!(cfg.limits.max_header_bytes, 8192);
        assert_eq!(cfg.routes.iter().next().unwrap().max_body, Some(1024));
    }
}

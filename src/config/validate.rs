//! Raw config -> [`Config`]: one function per section, each adding what it finds to one
//! [`Check`], so a file's problems are all reported together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde_saphyr::{Location, Spanned};

use super::check::Check;
use super::raw::{RawConfig, RawIdentity, RawLimits, RawRoute};
use super::route::RouteShared;
use super::{
    default_state_file, folder_of, parse_duration, resolve, Config, IdentityHeaders, KeySources,
    Limits, LogFormat, Problem, Problems, TlsFiles, DEFAULT_LISTEN,
};
use crate::config::routes::RouteTable;
use crate::keys::check_scope;

/// Checks `raw`; `problems` already holds what the parse found (unknown keys).
pub(super) fn validate(
    path: &Path,
    raw: Spanned<RawConfig>,
    problems: Vec<Problem>,
) -> Result<Config, Problems> {
    let top = raw.referenced;
    let raw = raw.value;
    let base = folder_of(path).to_path_buf();
    let mut c = Check {
        path,
        base: &base,
        problems,
        warnings: Vec::new(),
    };
    let listen = listen(&mut c, &raw);
    let (keys_file, keys_file_at, state_file) = keys(&mut c, &raw, top);
    let www_authenticate = realm(&mut c, raw.realm.as_ref());
    let identity = identity(&mut c, raw.identity_headers.as_ref());
    let known_scopes = known_scopes(&mut c, raw.known_scopes.as_deref());
    let tls = tls(&c, &raw);
    let admin_listen = admin(&mut c, raw.admin_listen.as_ref());
    let log_format = log_format(&mut c, raw.log_format.as_ref());
    let limits = limits(&mut c, raw.limits.as_ref());
    let (shutdown_grace, shutdown_delay) = shutdown(&mut c, &raw);
    let defaults = KeySources::default_for(&www_authenticate);
    let reserved = [&identity.key_id, &identity.service_account];
    let inherited = super::sources::key_sources(
        &mut c,
        raw.key_sources.as_ref(),
        &Arc::new(defaults),
        &www_authenticate,
        &reserved,
    );
    let shared = RouteShared {
        known_scopes: known_scopes.as_deref(),
        key_sources: &inherited,
        realm: &www_authenticate,
        reserved: &reserved,
    };
    let routes = routes(&mut c, raw.routes.as_ref(), top, &shared);
    let audit_log = raw.audit_log.as_ref().map(|a| {
        if a.value.trim().is_empty() {
            c.at(a.referenced, "audit_log is empty");
        }
        resolve(c.base, &a.value)
    });
    let trusted_proxies = trusted_proxies(&mut c, raw.trusted_proxies.as_deref());

    if !c.problems.is_empty() {
        return Err(Problems::sorted(c.problems));
    }
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    Ok(Config {
        generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        path: path.to_path_buf(),
        listen,
        keys_file,
        keys_file_at,
        state_file,
        www_authenticate,
        identity,
        known_scopes,
        routes,
        tls,
        admin_listen,
        log_format,
        limits,
        shutdown_grace,
        shutdown_delay,
        metrics_per_key: raw.metrics.is_some_and(|m| m.per_key),
        audit_log,
        trusted_proxies,
        warnings: Problems::sorted(c.warnings).0,
    })
}

/// `trusted_proxies`: networks whose forwarded headers keygate believes.
fn trusted_proxies(c: &mut Check<'_>, listed: Option<&[Spanned<String>]>) -> Vec<ipnet::IpNet> {
    listed
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            crate::keys::limit::parse_cidr(&p.value)
                .map_err(|e| c.at(p.referenced, format!("trusted_proxies: {e}")))
                .ok()
        })
        .collect()
}

fn listen(c: &mut Check<'_>, raw: &RawConfig) -> SocketAddr {
    let Some(l) = &raw.listen else {
        return DEFAULT_LISTEN;
    };
    l.value.parse::<SocketAddr>().unwrap_or_else(|_| {
        c.at(
            l.referenced,
            format!("invalid listen address {:?}: expected IP:PORT", l.value),
        );
        DEFAULT_LISTEN
    })
}

/// The key file, where the config names it, and the state file beside it by default.
fn keys(c: &mut Check<'_>, raw: &RawConfig, top: Location) -> (PathBuf, Location, PathBuf) {
    let keys_file_at = raw.keys_file.as_ref().map_or(top, |k| k.referenced);
    match &raw.keys_file {
        None => c.at(top, "missing field `keys_file`"),
        Some(k) if k.value.trim().is_empty() => c.at(k.referenced, "keys_file is empty"),
        Some(_) => {}
    }
    let keys_file = resolve(c.base, raw.keys_file.as_ref().map_or("", |k| &k.value));
    let state_file = match &raw.state_file {
        Some(s) => resolve(c.base, &s.value),
        None => default_state_file(&keys_file),
    };
    (keys_file, keys_file_at, state_file)
}

/// The `WWW-Authenticate` value every 401 carries, built once from `realm`.
fn realm(c: &mut Check<'_>, realm: Option<&Spanned<String>>) -> HeaderValue {
    let name = realm.map_or("keygate", |r| r.value.as_str());
    let www = format!("Api-Key realm=\"{}\"", name.replace(['"', '\\'], ""));
    HeaderValue::from_str(&www).unwrap_or_else(|_| {
        if let Some(r) = realm {
            c.at(r.referenced, "realm must be printable ASCII");
        }
        HeaderValue::from_static("Api-Key realm=\"keygate\"")
    })
}

fn identity(c: &mut Check<'_>, ident: Option<&RawIdentity>) -> IdentityHeaders {
    let key_id_at = ident.and_then(|i| i.key_id.as_ref());
    let account_at = ident.and_then(|i| i.service_account.as_ref());
    let identity = IdentityHeaders {
        key_id: header_name(c, key_id_at, "x-api-key-id"),
        service_account: header_name(c, account_at, "x-service-account"),
    };
    for (name, spanned) in [
        (&identity.key_id, key_id_at),
        (&identity.service_account, account_at),
    ] {
        if let Some(s) = spanned.filter(|_| crate::wire::headers::is_reserved(name)) {
            c.at(
                s.referenced,
                format!("identity header {name} would clash with a header the gateway manages"),
            );
        }
    }
    if identity.key_id == identity.service_account {
        c.problems.push(Problem::whole(
            c.path,
            "identity_headers.key_id and identity_headers.service_account must differ",
        ));
    }
    identity
}

fn header_name(
    c: &mut Check<'_>,
    v: Option<&Spanned<String>>,
    default: &'static str,
) -> HeaderName {
    let Some(s) = v else {
        return HeaderName::from_static(default);
    };
    HeaderName::from_bytes(s.value.as_bytes()).unwrap_or_else(|_| {
        c.at(s.referenced, format!("invalid header name {:?}", s.value));
        HeaderName::from_static(default)
    })
}

fn known_scopes(c: &mut Check<'_>, list: Option<&[Spanned<String>]>) -> Option<Vec<String>> {
    let list = list?;
    let mut known = Vec::with_capacity(list.len());
    for s in list {
        match check_scope(&s.value) {
            Ok(()) => known.push(s.value.clone()),
            Err(e) => c.at(s.referenced, e),
        }
    }
    Some(known)
}

// The files are read when the listener starts, where a bad PEM is reported.
fn tls(c: &Check<'_>, raw: &RawConfig) -> Option<TlsFiles> {
    raw.tls.as_ref().map(|t| TlsFiles {
        cert: resolve(c.base, &t.value.cert.value),
        key: resolve(c.base, &t.value.key.value),
    })
}

fn admin(c: &mut Check<'_>, admin: Option<&Spanned<String>>) -> Option<SocketAddr> {
    let a = admin?;
    match a.value.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            c.at(
                a.referenced,
                format!(
                    "invalid admin_listen address {:?}: expected IP:PORT",
                    a.value
                ),
            );
            None
        }
    }
}

fn log_format(c: &mut Check<'_>, format: Option<&Spanned<String>>) -> LogFormat {
    match format.map(|f| (f, f.value.as_str())) {
        None | Some((_, "json")) => LogFormat::Json,
        Some((_, "text")) => LogFormat::Text,
        Some((f, other)) => {
            c.at(
                f.referenced,
                format!("invalid log_format {other:?}: expected json or text"),
            );
            LogFormat::Json
        }
    }
}

fn limits(c: &mut Check<'_>, raw: Option<&RawLimits>) -> Limits {
    let mut limits = Limits::default();
    let Some(l) = raw else {
        return limits;
    };
    if let Some(v) = l.max_header_bytes.as_ref().and_then(|v| c.size_value(v)) {
        limits.max_header_bytes = v;
    }
    for (field, slot) in [
        (&l.header_read_timeout, &mut limits.header_read_timeout),
        (&l.idle_timeout, &mut limits.idle_timeout),
        (
            &l.upstream_connect_timeout,
            &mut limits.upstream_connect_timeout,
        ),
        (
            &l.upstream_ping_interval,
            &mut limits.upstream_ping_interval,
        ),
    ] {
        if let Some(d) = field.as_ref().and_then(|v| c.duration_value(v, "duration")) {
            *slot = d;
        }
    }
    if let Some(m) = &l.max_connections {
        match usize::try_from(m.value) {
            Ok(n) if n > 0 => limits.max_connections = n,
            _ => c.at(m.referenced, "max_connections must be at least 1"),
        }
    }
    limits
}

/// `shutdown_grace` and `shutdown_delay`; zero is allowed for both (stop at once).
fn shutdown(c: &mut Check<'_>, raw: &RawConfig) -> (Duration, Duration) {
    let mut read = |field: &Option<Spanned<String>>, default: Duration| match field {
        None => default,
        Some(g) => parse_duration(&g.value).unwrap_or_else(|e| {
            c.at(g.referenced, e);
            default
        }),
    };
    let grace = read(&raw.shutdown_grace, Duration::from_secs(30));
    let delay = read(&raw.shutdown_delay, Duration::ZERO);
    (grace, delay)
}

fn routes(
    c: &mut Check<'_>,
    raw: Option<&Spanned<Vec<Spanned<RawRoute>>>>,
    top: Location,
    shared: &RouteShared<'_>,
) -> RouteTable {
    let raw_routes = raw.map_or(&[][..], |r| r.value.as_slice());
    if raw_routes.is_empty() {
        // With no route every request is a 404: a config that serves nothing is a mistake.
        c.at(
            raw.map_or(top, |r| r.referenced),
            "no routes: every request would be refused with 404; add at least one route",
        );
    }
    let mut routes = Vec::with_capacity(raw_routes.len());
    let mut names: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for r in raw_routes {
        if let Some(name) = &r.value.name {
            if let Some(first) = names.insert(&name.value, name.referenced.line()) {
                c.at(
                    name.referenced,
                    format!(
                        "duplicate route name {:?} (first declared on line {first})",
                        name.value
                    ),
                );
            }
        }
        if let Some(route) = super::route::check_route(c, r.referenced, &r.value, shared) {
            routes.push(route);
        }
    }
    RouteTable::new(routes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_size;

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

    #[test]
    fn an_empty_route_table_is_an_error() {
        let err = parse("keys_file: k\nroutes: []\n").unwrap_err();
        assert_eq!((err.0[0].line, err.0[0].column), (2, 9), "{err}");
        let err = parse("keys_file: k\n").unwrap_err();
        assert_eq!((err.0[0].line, err.0[0].column), (1, 1), "{err}");
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

    /// The ping interval defaults above gRPC-Go's 5-minute minimum and takes no zero.
    #[test]
    fn upstream_ping_interval() {
        let routes =
            "routes:\n  - name: a\n    path_prefix: /a\n    upstream: h2c://x:1\n    scopes: []\n";
        let cfg = parse(&format!("keys_file: k\n{routes}")).unwrap();
        assert_eq!(cfg.limits.upstream_ping_interval, Duration::from_secs(360));
        let cfg = parse(&format!(
            "keys_file: k\nlimits:\n  upstream_ping_interval: 30s\n{routes}"
        ))
        .unwrap();
        assert_eq!(cfg.limits.upstream_ping_interval, Duration::from_secs(30));
        let err = parse(&format!(
            "keys_file: k\nlimits:\n  upstream_ping_interval: 0s\n{routes}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(":3:") && err.contains("greater than zero"),
            "{err}"
        );
    }
}

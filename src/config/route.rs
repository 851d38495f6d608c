//! One `routes:` entry -> a [`Route`]: what it matches, where it goes, which scopes it needs.

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};
use serde_saphyr::{Location, Spanned};

use super::check::Check;
use super::fields::nearest_word;
use super::raw::RawRoute;
use super::resolve;
use crate::config::routes::{HostMatch, Preflight, Route, Upstream, UpstreamScheme, UpstreamTls};
use crate::config::sources::KeySources;
use crate::keys::check_scope;

/// The request methods a route may list; anything else is a typo or a method no client sends.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// What every route is checked against: settings from the config's top level.
pub(super) struct RouteShared<'a> {
    pub(super) known_scopes: Option<&'a [String]>,
    /// The top-level `key_sources` (or the default), which a route may override.
    pub(super) key_sources: &'a Arc<KeySources>,
    /// The realm's challenge, which a route's own sources reuse.
    pub(super) realm: &'a HeaderValue,
    /// Identity header names, which no key source may read.
    pub(super) reserved: &'a [&'a HeaderName],
}

/// Checks one route at `loc`; `None` when it has a problem (recorded in `c`).
pub(super) fn check_route(
    c: &mut Check<'_>,
    loc: Location,
    r: &RawRoute,
    shared: &RouteShared<'_>,
) -> Option<Route> {
    let before = c.problems.len();
    for (field, value) in [
        ("name", &r.name),
        ("path_prefix", &r.path_prefix),
        ("upstream", &r.upstream),
    ] {
        if value.is_none() {
            c.at(loc, format!("missing field `{field}` in route"));
        }
    }
    let route_name = r.name.as_ref().map_or("", |n| n.value.as_str());
    if let Some(name) = r.name.as_ref().filter(|n| n.value.trim().is_empty()) {
        c.at(name.referenced, "route name is empty");
    }
    let prefix = path_prefix(c, r.path_prefix.as_ref());
    let host = r.host.as_ref().and_then(|h| {
        HostMatch::parse(&h.value)
            .map_err(|e| c.at(h.referenced, e))
            .ok()
    });
    let methods = methods(c, loc, r.methods.as_deref(), route_name);
    let upstream = r.upstream.as_ref().and_then(|u| {
        Upstream::parse(&u.value)
            .map_err(|e| c.at(u.referenced, e))
            .ok()
    });
    let (scopes, public) = scopes(c, loc, r, route_name, shared.known_scopes);
    let key_sources = super::sources::key_sources(
        c,
        r.key_sources.as_ref(),
        shared.key_sources,
        shared.realm,
        shared.reserved,
    );
    let preflight = preflight(c, r.preflight.as_ref());
    let timeout = r
        .timeout
        .as_ref()
        .and_then(|t| c.duration_value(t, "timeout"));
    let max_body = r.max_body.as_ref().and_then(|m| c.size_value(m));
    let upstream_tls = upstream_tls(c, r, upstream.as_ref());
    let rate_limit = rate_limit(c, r, public, route_name);

    if c.problems.len() != before {
        return None;
    }
    Some(Route {
        index: 0,
        max_body,
        upstream_tls,
        name: route_name.into(),
        path_prefix: prefix.to_string(),
        host,
        methods,
        upstream: upstream?,
        strip_prefix: r.strip_prefix,
        scopes,
        timeout,
        public,
        websocket: r.websocket.as_ref().is_none_or(|w| w.value),
        key_sources,
        preflight,
        rate_limit,
    })
}

/// A route's `rate_limit`, counted per key: a public route has no key to count by.
fn rate_limit(
    c: &mut Check<'_>,
    r: &RawRoute,
    public: bool,
    route_name: &str,
) -> Option<crate::keys::limit::Rate> {
    let text = r.rate_limit.as_ref()?;
    if public {
        c.at(
            text.referenced,
            format!("route {route_name:?} is public: rate_limit counts per key, and a public route checks none"),
        );
        return None;
    }
    crate::keys::limit::Rate::parse(&text.value, None)
        .map_err(|e| c.at(text.referenced, e))
        .ok()
}

/// `preflight: pass | auth`.
fn preflight(c: &mut Check<'_>, p: Option<&Spanned<String>>) -> Preflight {
    match p.map(|p| (p, p.value.as_str())) {
        None | Some((_, "auth")) => Preflight::Auth,
        Some((_, "pass")) => Preflight::Pass,
        Some((p, other)) => {
            c.at(
                p.referenced,
                format!("invalid preflight {other:?}: expected pass or auth"),
            );
            Preflight::Auth
        }
    }
}

/// The prefix as written; it must already be normalized, or it could never match a request.
fn path_prefix<'r>(c: &mut Check<'_>, p: Option<&'r Spanned<String>>) -> &'r str {
    let Some(p) = p else { return "" };
    let prefix = p.value.as_str();
    let prefix_ok = prefix.starts_with('/')
        && matches!(
            crate::wire::path::normalize(prefix),
            Ok(std::borrow::Cow::Borrowed(_))
        );
    if !prefix_ok {
        c.at(
            p.referenced,
            format!("path_prefix {prefix:?} must be a normalized absolute path like /api/"),
        );
    }
    prefix
}

fn methods(
    c: &mut Check<'_>,
    loc: Location,
    listed: Option<&[Spanned<String>]>,
    route_name: &str,
) -> Option<Vec<Method>> {
    let listed = listed?;
    let methods = listed
        .iter()
        .filter_map(|m| {
            check_method(&m.value)
                .map_err(|e| c.at(m.referenced, e))
                .ok()
        })
        .collect();
    if listed.is_empty() {
        c.at(
            loc,
            format!("route {route_name:?}: methods is empty; omit it to allow every method"),
        );
    }
    Some(methods)
}

/// Reads one `methods` entry; lowercase is accepted, since a method is never case-folded later.
fn check_method(text: &str) -> Result<Method, String> {
    let upper = text.trim().to_ascii_uppercase();
    if let Some(m) = METHODS.iter().find(|m| **m == upper) {
        return Method::from_bytes(m.as_bytes())
            .map_err(|_| format!("invalid HTTP method {text:?}"));
    }
    Err(match nearest_word(&upper, &METHODS) {
        Some(near) => format!("unknown HTTP method {text:?}; did you mean `{near}`?"),
        None => format!(
            "unknown HTTP method {text:?}: expected one of {}",
            METHODS.join(", ")
        ),
    })
}

/// The scopes a route requires and whether it is public. A typo in `scopes` must never
/// silently open a route, so a protected route without the field is refused.
fn scopes(
    c: &mut Check<'_>,
    loc: Location,
    r: &RawRoute,
    route_name: &str,
    known_scopes: Option<&[String]>,
) -> (Vec<String>, bool) {
    let listed = r.scopes.as_ref().map_or(&[][..], |s| s.value.as_slice());
    let mut scopes = Vec::with_capacity(listed.len());
    for s in listed {
        if let Err(e) = check_scope(&s.value) {
            c.at(s.referenced, e);
        } else if s.value.ends_with('*') {
            c.at(
                s.referenced,
                format!(
                    "route scope {:?} must be a concrete scope, not a wildcard",
                    s.value
                ),
            );
        } else if known_scopes.is_some_and(|known| !known.iter().any(|k| k == &s.value)) {
            c.at(
                s.referenced,
                format!("scope {:?} is not in known_scopes", s.value),
            );
        }
        scopes.push(s.value.clone());
    }

    let public = r.public.as_ref().is_some_and(|p| p.value);
    match &r.scopes {
        // Forgetting `scopes` must not quietly admit every key: the open door is written out.
        None if !public => c.at(
            loc,
            format!(
                "route {route_name:?} is neither public nor lists scopes; write `scopes: []` to admit any valid key"
            ),
        ),
        Some(s) if !public && s.value.is_empty() => c.warnings.push(super::Problem::at(
            c.path,
            s.referenced,
            format!("route {route_name:?} has `scopes: []`: any valid key is let through"),
        )),
        _ => {}
    }
    if let Some(p) = r.public.as_ref().filter(|_| public && !listed.is_empty()) {
        c.at(
            p.referenced,
            format!(
                "route {route_name:?} is public but lists scopes; a public route checks no key"
            ),
        );
    }
    (scopes, public)
}

/// `ca_file` and `tls_server_name`, which only an https:// upstream uses.
fn upstream_tls(c: &mut Check<'_>, r: &RawRoute, upstream: Option<&Upstream>) -> UpstreamTls {
    let is_https = upstream.is_some_and(|u| u.scheme == UpstreamScheme::Https);
    for field in [&r.ca_file, &r.tls_server_name].into_iter().flatten() {
        if !is_https && upstream.is_some() {
            c.at(
                field.referenced,
                "ca_file and tls_server_name apply only to https:// upstreams",
            );
        }
    }
    let ca_file = r.ca_file.as_ref().map(|f| resolve(c.base, &f.value));
    if let (Some(file), Some(spanned)) = (&ca_file, &r.ca_file) {
        if let Err(e) = crate::wire::tls::load_roots(file) {
            c.at(spanned.referenced, e);
        }
    }
    if let Some(n) = &r.tls_server_name {
        if rustls_pki_types::ServerName::try_from(n.value.as_str()).is_err() {
            c.at(
                n.referenced,
                format!("invalid tls_server_name {:?}", n.value),
            );
        }
    }
    UpstreamTls {
        ca_file,
        server_name: r.tls_server_name.as_ref().map(|n| n.value.clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, Problems};

    fn parse(text: &str) -> Result<Config, Problems> {
        Config::parse(Path::new("cfg/keygate.yaml"), text)
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

    // Key sources: the top level's list, a route's own, and every problem at its place.
    use crate::config::sources::{KeySource, Scheme};
    use http::HeaderName;

    fn parse_with(top: &str, route_extra: &str) -> Result<Config, Problems> {
        Config::parse(
            Path::new("cfg/keygate.yaml"),
            &format!("keys_file: k\n{top}routes:\n  - name: a\n    path_prefix: /a\n    upstream: http://x:1\n    scopes: []\n{route_extra}"),
        )
    }

    fn sources(cfg: &Config) -> Vec<KeySource> {
        cfg.routes.iter().next().unwrap().key_sources.list.clone()
    }

    #[test]
    fn default_is_api_key_and_routes_override_the_top_level() {
        let cfg = parse_with("", "").unwrap();
        assert_eq!(
            sources(&cfg),
            vec![KeySource::Authorization(Scheme::ApiKey)]
        );
        let cfg = parse_with(
            "key_sources:\n  - authorization: bearer\n  - header: X-Api-Key\n",
            "",
        )
        .unwrap();
        assert_eq!(
            sources(&cfg),
            vec![
                KeySource::Authorization(Scheme::Bearer),
                KeySource::Header(HeaderName::from_static("x-api-key"))
            ]
        );
        let route = cfg.routes.iter().next().unwrap();
        assert_eq!(route.key_sources.challenge, "Bearer realm=\"keygate\"");
        assert_eq!(
            &*route.key_sources.accepts,
            "`Authorization: Bearer <key>` or `x-api-key: <key>`"
        );
        let cfg = parse_with(
            "key_sources: [{header: X-Api-Key}]\n",
            "    key_sources: [{query: api_key}]\n",
        )
        .unwrap();
        assert_eq!(sources(&cfg), vec![KeySource::Query("api_key".into())]);
    }

    #[test]
    fn bad_sources_are_problems_at_their_place() {
        let err = parse_with(
            "key_sources:\n  - cookie: x\n  - authorization: basic\n  - header: \"bad name\"\n  - header: Host\n  - query: \"a&b\"\n  - {header: a, query: b}\n",
            "    key_sources: []\n",
        )
        .unwrap_err();
        let at: Vec<(u64, u64)> = err.0.iter().map(|p| (p.line, p.column)).collect();
        assert_eq!(
            at,
            vec![
                (3, 5),
                (3, 5),
                (4, 20),
                (5, 13),
                (6, 13),
                (7, 12),
                (8, 5),
                (14, 18)
            ],
            "{err}"
        );
        assert!(err.0[0].message.contains("unknown field `cookie`"), "{err}");
    }
}

//! The compiled route table: (host, method, normalized path) -> the route that serves it.

use std::time::Duration;

use http::uri::Authority;
use http::Method;

/// How a route restricts the request host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Exact host name, stored lowercase.
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (stored as the suffix with its dot).
    Suffix(String),
}

impl HostMatch {
    /// Parses `api.example.com` or `*.example.com`.
    pub fn parse(text: &str) -> Result<HostMatch, String> {
        let lower = text.trim().to_ascii_lowercase();
        let valid_name = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
        };
        if let Some(rest) = lower.strip_prefix("*.") {
            if valid_name(rest) {
                return Ok(HostMatch::Suffix(format!(".{rest}")));
            }
        } else if valid_name(&lower) {
            return Ok(HostMatch::Exact(lower));
        }
        Err(format!(
            "invalid host {text:?}: expected a name like api.example.com or *.example.com"
        ))
    }

    /// True when `host` (port already removed) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h),
            HostMatch::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host.as_bytes()[host.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
        }
    }
}

/// Protocol spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamScheme {
    /// HTTP/1.1 over TCP.
    Http,
    /// HTTP/2 with prior knowledge over TCP (gRPC servers).
    H2c,
    /// HTTP/1.1 or HTTP/2 (by ALPN) over TLS.
    Https,
}

/// Where a route sends its requests.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Protocol.
    pub scheme: UpstreamScheme,
    /// host:port.
    pub authority: Authority,
    /// Path prepended to every forwarded path, without a trailing slash ("" for none).
    pub base_path: String,
}

impl Upstream {
    /// Parses `http://`, `https://` or `h2c://` `host[:port][/base]`.
    pub fn parse(text: &str) -> Result<Upstream, String> {
        let bad = |why: &str| format!("invalid upstream URL {text:?}: {why}");
        let uri: http::Uri = text.parse().map_err(|_| bad("not a URL"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => UpstreamScheme::Http,
            Some("h2c") => UpstreamScheme::H2c,
            Some("https") => UpstreamScheme::Https,
            Some(other) => {
                return Err(bad(&format!(
                    "scheme {other:?} is not supported (use http://, https:// or h2c://)"
                )))
            }
            None => return Err(bad("missing scheme (use http://, https:// or h2c://)")),
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| bad("missing host"))?;
        if authority.host().is_empty() {
            return Err(bad("missing host"));
        }
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        // `http::Uri` takes any digits (and more) after the colon and only `port_u16` fails,
        // so an out-of-range port would surface as a connect error at the first request.
        if let Some(port) = authority.as_str().strip_prefix(authority.host()) {
            match port.strip_prefix(':').map(str::parse::<u16>) {
                None => {}
                Some(Ok(0)) => return Err(bad("port 0 cannot be connected to")),
                Some(Ok(_)) => {}
                Some(Err(_)) => return Err(bad("the port must be a number from 1 to 65535")),
            }
        }
        if uri.query().is_some() {
            return Err(bad("a query string is not allowed"));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(Upstream {
            scheme,
            authority,
            base_path,
        })
    }
}

/// One checked route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Position in declaration order; indexes per-route state such as metrics.
    pub index: usize,
    /// Unique name (logs, metrics).
    pub name: std::sync::Arc<str>,
    /// Normalized prefix matched on whole segments.
    pub path_prefix: String,
    /// Optional host restriction.
    pub host: Option<HostMatch>,
    /// Optional method restriction.
    pub methods: Option<Vec<Method>>,
    /// Where requests go.
    pub upstream: Upstream,
    /// Remove `path_prefix` before forwarding.
    pub strip_prefix: bool,
    /// Scopes a key must hold, every one of them.
    pub scopes: Vec<String>,
    /// Deadline for the upstream's response.
    pub timeout: Option<Duration>,
    /// No key needed.
    pub public: bool,
    /// Largest request body accepted, in bytes.
    pub max_body: Option<u64>,
    /// TLS settings for `https://` upstreams.
    pub upstream_tls: UpstreamTls,
    /// Forward WebSocket upgrades (no other upgrade token is ever forwarded).
    pub websocket: bool,
    /// Per key on this route, beside the key's own limit; the stricter wins.
    pub rate_limit: Option<crate::keys::limit::Rate>,
    /// Where this route reads keys from (the config's `key_sources` unless it sets its own).
    pub key_sources: std::sync::Arc<super::sources::KeySources>,
    /// Whether CORS preflights need a key.
    pub preflight: Preflight,
}

/// `preflight:` on a route: whether a CORS preflight (`OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`) needs a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preflight {
    /// Like every other request (the default).
    #[default]
    Auth,
    /// Forwarded without a key; any key material is still stripped.
    Pass,
}

/// How an `https://` upstream is verified.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM bundle of CAs to trust instead of the built-in web roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Name to verify the certificate against (and send as SNI) instead of the URL host.
    pub server_name: Option<String>,
}

impl Route {
    /// True when `path` lies under this route's prefix, on a segment boundary.
    pub fn matches_path(&self, path: &str) -> bool {
        prefix_matches(&self.path_prefix, path)
    }

    /// The path the upstream gets, before its base path is added.
    pub fn upstream_path<'p>(&self, path: &'p str) -> &'p str {
        if !self.strip_prefix {
            return path;
        }
        // By segments, not bytes: the path may carry `;parameters` the prefix matched without.
        let segments = self
            .path_prefix
            .split('/')
            .filter(|s| !s.is_empty())
            .count();
        let mut rest = path;
        for _ in 0..segments {
            let body = rest.strip_prefix('/').unwrap_or(rest);
            rest = body.find('/').map_or("", |i| &body[i..]);
        }
        if rest.is_empty() {
            "/"
        } else {
            rest
        }
    }
}

/// Whole-segment prefix match: `/health` matches `/health` and `/health/x`, not `/healthz`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if !path.starts_with(prefix) {
        return false;
    }
    prefix.ends_with('/') || path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'
}

/// Routes in match order: longest prefix first, declaration order on ties.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    order: Vec<usize>,
}

impl RouteTable {
    /// Compiles the table from routes in declaration order.
    pub fn new(mut routes: Vec<Route>) -> RouteTable {
        for (i, r) in routes.iter_mut().enumerate() {
            r.index = i;
        }
        let mut order: Vec<usize> = (0..routes.len()).collect();
        // Stable sort keeps declaration order among equal prefix lengths.
        order.sort_by_key(|&i| std::cmp::Reverse(routes[i].path_prefix.len()));
        RouteTable { routes, order }
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The route with this index.
    pub fn get(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }

    /// Routes in declaration order.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// The route for a request; `host` has its port removed already.
    pub fn find(&self, host: Option<&str>, method: &Method, path: &str) -> Option<&Route> {
        self.order.iter().map(|&i| &self.routes[i]).find(|r| {
            r.matches_path(path)
                && r.host
                    .as_ref()
                    .is_none_or(|h| host.is_some_and(|host| h.matches(host)))
                && r.methods.as_ref().is_none_or(|ms| ms.contains(method))
        })
    }
}

/// Removes the port from a Host value: `a.b:80` -> `a.b`, `[::1]:80` -> `[::1]`.
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) => &host[..i],
        None => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn route(
        name: &str,
        prefix: &str,
        host: Option<&str>,
        methods: Option<Vec<Method>>,
    ) -> Route {
        Route {
            index: 0,
            name: name.into(),
            path_prefix: prefix.into(),
            host: host.map(|h| HostMatch::parse(h).unwrap()),
            methods,
            upstream: Upstream::parse("http://127.0.0.1:1").unwrap(),
            strip_prefix: false,
            scopes: vec![],
            timeout: None,
            public: false,
            max_body: None,
            upstream_tls: UpstreamTls::default(),
            websocket: true,
            key_sources: std::sync::Arc::new(crate::config::sources::KeySources::default_for(
                &http::HeaderValue::from_static("Api-Key realm=\"keygate\""),
            )),
            preflight: Preflight::Auth,
            rate_limit: None,
        }
    }

    fn find<'a>(t: &'a RouteTable, host: Option<&str>, m: Method, p: &str) -> Option<&'a str> {
        t.find(host, &m, p).map(|r| &*r.name)
    }

    #[test]
    fn whole_segments() {
        assert!(prefix_matches("/health", "/health"));
        assert!(prefix_matches("/health", "/health/x"));
        assert!(!prefix_matches("/health", "/healthz"));
        assert!(prefix_matches("/postbox/", "/postbox/a/b"));
        assert!(!prefix_matches("/postbox/", "/postbox"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn longest_prefix_wins_ties_go_first() {
        let t = RouteTable::new(vec![
            route("root", "/", None, None),
            route("api", "/api/", None, None),
            route("api-v1", "/api/v1", None, None),
            route("api-dup", "/api/", None, None),
        ]);
        assert_eq!(find(&t, None, Method::GET, "/api/v1/x"), Some("api-v1"));
        assert_eq!(find(&t, None, Method::GET, "/api/v2"), Some("api"));
        assert_eq!(find(&t, None, Method::GET, "/other"), Some("root"));
    }

    #[test]
    fn host_and_method_filter_before_length() {
        let t = RouteTable::new(vec![
            route("short", "/a", None, None),
            route("long-host", "/a/b", Some("*.example.com"), None),
            route("long-post", "/a/b/c", None, Some(vec![Method::POST])),
        ]);
        assert_eq!(
            find(&t, Some("x.example.com"), Method::GET, "/a/b/c"),
            Some("long-host")
        );
        assert_eq!(
            find(&t, Some("X.Example.COM"), Method::GET, "/a/b"),
            Some("long-host")
        );
        assert_eq!(
            find(&t, Some("example.com"), Method::GET, "/a/b"),
            Some("short")
        );
        assert_eq!(find(&t, None, Method::POST, "/a/b/c"), Some("long-post"));
        assert_eq!(find(&t, None, Method::GET, "/a/b/c"), Some("short"));
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash() {
        let mut r = route("r", "/postbox/", None, None);
        r.strip_prefix = true;
        assert_eq!(r.upstream_path("/postbox/send"), "/send");
        let mut r = route("r", "/health", None, None);
        r.strip_prefix = true;
        assert_eq!(r.upstream_path("/health"), "/");
        assert_eq!(r.upstream_path("/health/x"), "/x");
        // Parameters on the prefix's segments go with the prefix.
        assert_eq!(r.upstream_path("/health;v=1/x"), "/x");
        let mut r = route("r", "/api/", None, None);
        r.strip_prefix = true;
        assert_eq!(r.upstream_path("/api;v=1/users/"), "/users/");
        assert_eq!(r.upstream_path("/api/"), "/");
    }

    #[test]
    fn upstream_urls() {
        let u = Upstream::parse("http://127.0.0.1:9001/base/").unwrap();
        assert_eq!(u.base_path, "/base");
        assert!(Upstream::parse("ftp://x").is_err());
        assert!(Upstream::parse("127.0.0.1:80").is_err());
        assert!(Upstream::parse("http://u:p@x").is_err());
        assert_eq!(
            Upstream::parse("http://[::1]:65535")
                .unwrap()
                .authority
                .port_u16(),
            Some(65535)
        );
        for bad in [
            "http://localhost:99999",
            "http://localhost:0",
            "http://localhost:",
            "http://localhost:1a",
            "h2c://[::1]:70000",
            "https://x:-1",
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_are_removed() {
        assert_eq!(host_without_port("a.b:80"), "a.b");
        assert_eq!(host_without_port("a.b"), "a.b");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const PREFIXES: &[&str] = &["/", "/a", "/a/", "/a/b", "/a/b/", "/b", "/ab", "/a/bc"];
    const PATHS: &[&str] = &[
        "/", "/a", "/a/", "/a/b", "/a/b/c", "/ab", "/abc", "/b/x", "/a/bc", "/a/bcd",
    ];

    fn table(prefixes: &[&str]) -> RouteTable {
        let routes = prefixes
            .iter()
            .enumerate()
            .map(|(i, p)| crate::config::routes::tests::route(&format!("r{i}"), p, None, None));
        RouteTable::new(routes.collect())
    }

    proptest! {
        #[test]
        fn longest_prefix_first_declared(
            prefixes in prop::collection::vec(prop::sample::select(PREFIXES), 1..8),
            path in prop::sample::select(PATHS),
        ) {
            let t = table(&prefixes);
            // Brute force: the longest matching prefix, earliest declaration among equals.
            let mut best: Option<(usize, usize)> = None;
            for (i, p) in prefixes.iter().enumerate() {
                if prefix_matches(p, path) && best.is_none_or(|(_, len)| p.len() > len) {
                    best = Some((i, p.len()));
                }
            }
            let got = t.find(None, &Method::GET, path).map(|r| r.index);
            prop_assert_eq!(got, best.map(|(i, _)| i));
        }
    }
}

//! Header rules as pure functions over `HeaderMap`: hop-by-hop removal (RFC 9110 7.6.1),
//! identity headers, and `X-Forwarded-*` / `X-Request-Id`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// `HTTP2-Settings`: only meaningful with an `Upgrade: h2c`, which never crosses the gateway.
pub static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Hop-by-hop headers that never cross the gateway (RFC 9110 7.6.1, plus legacy ones).
///
/// `Trailer` is not among them: it declares end-to-end trailer fields (RFC 9110 6.6.2), and
/// hyper sends HTTP/1.1 trailers only for the names it lists.
static HOP_BY_HOP: [&HeaderName; 8] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &HTTP2_SETTINGS,
];

/// A CORS preflight: `OPTIONS` carrying both `Origin` and `Access-Control-Request-Method`
/// (a plain `OPTIONS` is not one).
pub fn is_preflight(method: &http::Method, h: &HeaderMap) -> bool {
    method == http::Method::OPTIONS
        && h.contains_key(header::ORIGIN)
        && h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// True for names the gateway owns and an identity header must not reuse.
pub fn is_reserved(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name)
        || [
            &header::AUTHORIZATION,
            &header::HOST,
            &header::TE,
            &header::TRAILER,
            &header::CONTENT_LENGTH,
            &X_FORWARDED_FOR,
            &X_FORWARDED_PROTO,
            &X_FORWARDED_HOST,
            &X_REQUEST_ID,
        ]
        .contains(&name)
}

/// [`hop_bit`]'s answer for `TE`, which follows [`HOP_BY_HOP`]'s indices.
const TE_BIT: usize = HOP_BY_HOP.len();

/// `name`'s index in [`HOP_BY_HOP`], or [`TE_BIT`] for `TE`: one string match per name, where
/// comparing against each entry cost about nine `HeaderName` comparisons for every field of
/// every request and response.
fn hop_bit(name: &HeaderName) -> Option<usize> {
    let i = match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "transfer-encoding" => 5,
        "upgrade" => 6,
        "http2-settings" => 7,
        "te" => TE_BIT,
        _ => return None,
    };
    debug_assert!(i == TE_BIT || HOP_BY_HOP[i] == name);
    Some(i)
}

/// Removes hop-by-hop headers and every header named in `Connection`.
///
/// `TE: trailers` survives on requests because gRPC servers refuse calls without it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, is_request: bool) {
    // One pass over the names finds what is there: most messages carry no hop-by-hop field
    // or only `Connection`, and every blind remove would hash a name.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_bit(name) {
            present |= 1 << i;
        }
    }
    let te = present & (1 << TE_BIT) != 0;
    if present & 1 != 0 {
        // The names `Connection` lists, matched against the fields present (names are
        // lowercase, tokens any case); what the gateway itself sets is not removable.
        let mut listed: Vec<HeaderName> = Vec::new();
        for token in headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
        {
            for name in headers.keys() {
                if name.as_str().as_bytes().eq_ignore_ascii_case(token)
                    && (!is_reserved(name) || HOP_BY_HOP.contains(&name))
                    && !listed.contains(name)
                {
                    listed.push(name.clone());
                }
            }
        }
        for name in listed {
            headers.remove(&name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
    if !te {
        return;
    }
    if let Some(te) = headers.get(header::TE) {
        let wants_trailers = is_request
            && te
                .to_str()
                .map(|v| {
                    v.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
                })
                .unwrap_or(false);
        if wants_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
}

/// True when any value of `name` lists `token` (comma-separated, case-insensitive).
fn lists_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// True for an HTTP/1.1 WebSocket upgrade (`Connection: upgrade` + `Upgrade: websocket`).
///
/// No other upgrade is ever forwarded: an upstream that accepts `h2c` would hand the client a
/// raw HTTP/2 connection past every route and scope check ("h2c smuggling").
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    lists_token(headers, &header::CONNECTION, "upgrade")
        && lists_token(headers, &header::UPGRADE, "websocket")
}

/// RFC 9112 6.1: the only transfer coding a request may carry here is one final `chunked`.
///
/// `chunked, chunked`, two `chunked` fields, or `gzip, chunked` are refused: intermediaries
/// disagree on them, which is how request smuggling starts.
pub fn transfer_coding_ok(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii);
    match (codings.next(), codings.next()) {
        (None, _) => true,
        (Some(only), None) => only.eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => false,
    }
}

/// Removes what must not travel in request trailers: the key and the identity headers.
pub fn strip_trailers(trailers: &mut HeaderMap, identity: &[&HeaderName]) {
    trailers.remove(header::AUTHORIZATION);
    for name in identity {
        trailers.remove(*name);
    }
    for name in HOP_BY_HOP {
        trailers.remove(name);
    }
}

/// Sets `X-Forwarded-For`, `-Proto` and `-Host`. The peer is always appended to
/// `X-Forwarded-For` (as nginx, HAProxy and Envoy do: the chain is a record, and only
/// `trusted_proxies` make keygate believe it). `-Proto` and `-Host` are kept only from a
/// trusted proxy (`keep_incoming`); from anyone else they are replaced, so a client cannot
/// claim https or another host.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    https: bool,
    host: Option<&HeaderValue>,
    keep_incoming: bool,
) {
    let mut ip = IpText {
        buf: [0u8; 64],
        len: 0,
    };
    ip.len = format_ip(peer, &mut ip.buf).len();
    // One lookup: this runs for every forwarded request. Values are owned by their `Bytes`
    // from the start, so the resend copy of the head clones them without reallocating.
    // One value per client: never indexed.
    let owned = |b: bytes::Bytes| HeaderValue::from_maybe_shared(b).map(never_indexed);
    match headers.entry(&X_FORWARDED_FOR) {
        header::Entry::Occupied(mut e) => {
            // Several lines are one list (RFC 9110 5.3): joined, in order, so no hop of the
            // chain is lost.
            let prev = || {
                e.iter()
                    .map(HeaderValue::as_bytes)
                    .filter(|v| !v.is_empty())
            };
            let len: usize = prev().map(|p| p.len() + 2).sum();
            let xff = if len == 0 {
                owned(bytes::Bytes::from_owner(ip))
            } else {
                let mut v = Vec::with_capacity(len + ip.len);
                for p in prev() {
                    v.extend_from_slice(p);
                    v.extend_from_slice(b", ");
                }
                v.extend_from_slice(ip.as_ref());
                owned(bytes::Bytes::from_owner(v))
            };
            if let Ok(v) = xff {
                e.insert(v);
            }
        }
        header::Entry::Vacant(e) => {
            if let Ok(v) = owned(bytes::Bytes::from_owner(ip)) {
                e.insert(v);
            }
        }
    }
    let single = |h: &HeaderMap, name: &HeaderName| h.get_all(name).iter().count() == 1;
    if !(keep_incoming && single(headers, &X_FORWARDED_PROTO)) {
        headers.insert(
            &X_FORWARDED_PROTO,
            HeaderValue::from_static(if https { "https" } else { "http" }),
        );
    }
    if keep_incoming && single(headers, &X_FORWARDED_HOST) {
        return;
    }
    match host {
        Some(h) => {
            headers.insert(&X_FORWARDED_HOST, h.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

/// Marks a value "never indexed" for HTTP/2 (HTTP/1.1 ignores the mark), for fields that
/// take many values: h2's HPACK encoder compares each value it sends with every one its table
/// holds under that name, oldest first, and such values fill the table and evict the fields
/// that repeat.
pub fn never_indexed(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

/// An address as text, in a buffer a `Bytes` can own.
struct IpText {
    buf: [u8; 64],
    len: usize,
}

impl AsRef<[u8]> for IpText {
    fn as_ref(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

fn format_ip(ip: IpAddr, buf: &mut [u8; 64]) -> &[u8] {
    use std::io::Write;
    if let IpAddr::V4(v4) = ip {
        // Per request: core::fmt costs several times this.
        let mut n = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                buf[n] = b'.';
                n += 1;
            }
            if octet >= 100 {
                buf[n] = b'0' + octet / 100;
                n += 1;
            }
            if octet >= 10 {
                buf[n] = b'0' + octet / 10 % 10;
                n += 1;
            }
            buf[n] = b'0' + octet % 10;
            n += 1;
        }
        return &buf[..n];
    }
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{ip}");
    let n = usize::try_from(cursor.position()).unwrap_or(0);
    &buf[..n]
}

/// Keeps a client's `X-Request-Id` when it is sane, else generates one; returns the value.
///
/// The value is [`never_indexed`]: an id is unique per request (about 5,000 instructions an
/// h2 response here while ids were indexed).
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    // One lookup whether the id is kept, replaced or added.
    match headers.entry(&X_REQUEST_ID) {
        header::Entry::Occupied(mut e) => {
            let mut ids = e.iter();
            let keep = match (ids.next(), ids.next()) {
                (Some(v), None) => {
                    !v.is_empty()
                        && v.len() <= 200
                        && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
                }
                _ => false,
            };
            if keep {
                let v = e.get_mut();
                // As `never_indexed`, in place.
                v.set_sensitive(true);
                return v.clone();
            }
            let id = new_request_id();
            e.insert(id.clone());
            id
        }
        header::Entry::Vacant(e) => {
            let id = new_request_id();
            e.insert(id.clone());
            id
        }
    }
}

/// A unique request id: a random per-process prefix and a counter, as 32 hex digits.
pub fn new_request_id() -> HeaderValue {
    static PREFIX: OnceLock<[u8; 16]> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut b = [0u8; 8];
        // Uniqueness, not secrecy, is needed; fall back to the clock if the OS RNG fails.
        if getrandom::fill(&mut b).is_err() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            b = now.to_le_bytes();
        }
        let mut hex = [0u8; 16];
        let _ = hex::encode_to_slice(u64::from_le_bytes(b).to_be_bytes(), &mut hex);
        hex
    });
    let mut buf = [0u8; 32];
    buf[..16].copy_from_slice(prefix);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    let _ = hex::encode_to_slice(counter, &mut buf[16..]);
    // Owned by its `Bytes` from the start: the id is cloned into the request, the response
    // and the log, and a copied slice would be reallocated as shared on the first clone.
    never_indexed(
        HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
            .unwrap_or(HeaderValue::from_static("0")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn ip_spelling_matches_display() {
        for ip in ["0.0.0.0", "9.99.100.255", "127.0.0.1", "::1", "fe80::1:2"] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut buf = [0u8; 64];
            assert_eq!(format_ip(ip, &mut buf), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn connection_tokens_match_any_case_and_spare_gateway_headers() {
        let mut m = map(&[
            ("connection", "X-Secret , ,HOST,x-forwarded-for"),
            ("x-secret", "1"),
            ("host", "h"),
            ("x-forwarded-for", "1.2.3.4"),
            ("te", "trailers, deflate"),
        ]);
        strip_hop_by_hop(&mut m, true);
        assert!(!m.contains_key("x-secret") && !m.contains_key("connection"));
        assert!(m.contains_key("host") && m.contains_key("x-forwarded-for"));
        assert_eq!(m["te"], "trailers");
        let mut resp = map(&[("te", "trailers"), ("server", "s")]);
        strip_hop_by_hop(&mut resp, false);
        assert!(!resp.contains_key("te") && resp.contains_key("server"));
    }

    #[test]
    fn hop_bit_names_each_hop_by_hop_field_and_te_only() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_bit(name), Some(i), "{name}");
        }
        assert_eq!(hop_bit(&header::TE), Some(TE_BIT));
        for other in [
            "user-agent",
            "content-length",
            "trailer",
            "host",
            "x-connection",
        ] {
            assert_eq!(hop_bit(&HeaderName::from_static(other)), None, "{other}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_listed_are_removed() {
        let mut m = map(&[
            ("connection", "close, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("x-keep", "1"),
        ]);
        strip_hop_by_hop(&mut m, true);
        assert_eq!(m.len(), 1);
        assert!(m.contains_key("x-keep"));
    }

    #[test]
    fn trailer_declaration_is_end_to_end() {
        let mut m = map(&[("trailer", "x-checksum"), ("http2-settings", "AAA")]);
        strip_hop_by_hop(&mut m, true);
        assert!(m.contains_key("trailer"));
        assert!(!m.contains_key("http2-settings"));
    }

    #[test]
    fn only_websocket_upgrades_count() {
        let ws = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ]);
        assert!(is_websocket_upgrade(&ws));
        for pairs in [
            &[("connection", "upgrade"), ("upgrade", "h2c")][..],
            &[("connection", "close"), ("upgrade", "websocket")][..],
            &[("upgrade", "websocket")][..],
        ] {
            assert!(!is_websocket_upgrade(&map(pairs)), "{pairs:?}");
        }
    }

    #[test]
    fn one_final_chunked_only() {
        assert!(transfer_coding_ok(&map(&[])));
        assert!(transfer_coding_ok(&map(&[(
            "transfer-encoding",
            "Chunked"
        )])));
        for v in [
            &[("transfer-encoding", "chunked, chunked")][..],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ][..],
            &[("transfer-encoding", "gzip, chunked")][..],
            &[("transfer-encoding", "identity")][..],
            &[("transfer-encoding", "chunked,")][..],
        ] {
            assert!(!transfer_coding_ok(&map(v)), "{v:?}");
        }
    }

    #[test]
    fn connection_cannot_strip_gateway_headers() {
        let mut m = map(&[
            ("connection", "x-forwarded-for"),
            ("x-forwarded-for", "1.2.3.4"),
        ]);
        strip_hop_by_hop(&mut m, true);
        assert!(m.contains_key("x-forwarded-for"));
    }

    #[test]
    fn te_trailers_survives_on_requests_only() {
        let mut m = map(&[("te", "trailers, deflate")]);
        strip_hop_by_hop(&mut m, true);
        assert_eq!(m.get("te").unwrap(), "trailers");
        let mut m = map(&[("te", "gzip")]);
        strip_hop_by_hop(&mut m, true);
        assert!(!m.contains_key("te"));
        let mut m = map(&[("te", "trailers")]);
        strip_hop_by_hop(&mut m, false);
        assert!(!m.contains_key("te"));
    }

    #[test]
    fn forwarded_headers_are_kept_only_from_trusted_proxies() {
        let incoming = [
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "public.example"),
        ];
        let host = HeaderValue::from_static("h");
        let mut m = map(&incoming);
        set_forwarded(
            &mut m,
            "127.0.0.1".parse().unwrap(),
            false,
            Some(&host),
            true,
        );
        assert_eq!(m.get(&X_FORWARDED_FOR).unwrap(), "10.0.0.1, 127.0.0.1");
        assert!(
            m.get(&X_FORWARDED_FOR).unwrap().is_sensitive(),
            "never indexed"
        );
        assert_eq!(m.get(&X_FORWARDED_PROTO).unwrap(), "https");
        assert_eq!(m.get(&X_FORWARDED_HOST).unwrap(), "public.example");
        let mut m = map(&incoming);
        set_forwarded(
            &mut m,
            "127.0.0.1".parse().unwrap(),
            false,
            Some(&host),
            false,
        );
        assert_eq!(m.get(&X_FORWARDED_FOR).unwrap(), "10.0.0.1, 127.0.0.1");
        assert_eq!(m.get(&X_FORWARDED_PROTO).unwrap(), "http");
        assert_eq!(m.get(&X_FORWARDED_HOST).unwrap(), "h");
        let mut m = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", ""),
            ("x-forwarded-for", "10.0.0.2, 10.0.0.3"),
        ]);
        set_forwarded(&mut m, "127.0.0.1".parse().unwrap(), false, None, false);
        assert_eq!(
            m.get_all(&X_FORWARDED_FOR).iter().collect::<Vec<_>>(),
            ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"],
            "several lines are joined into one"
        );
        let mut m = HeaderMap::new();
        set_forwarded(&mut m, "127.0.0.1".parse().unwrap(), true, None, true);
        assert_eq!(m.get(&X_FORWARDED_PROTO).unwrap(), "https");
        assert!(!m.contains_key(&X_FORWARDED_HOST));
    }

    #[test]
    fn request_id_kept_or_generated() {
        let mut m = map(&[("x-request-id", "abc-1")]);
        assert_eq!(ensure_request_id(&mut m), "abc-1");
        assert!(m.get("x-request-id").is_some_and(HeaderValue::is_sensitive));
        let mut m = HeaderMap::new();
        let a = ensure_request_id(&mut m);
        assert_eq!(a.len(), 32);
        assert!(a.is_sensitive(), "never indexed in HPACK");
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_eq!(m.get("x-request-id"), Some(&a));
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(
            a.as_bytes()[..16],
            b.as_bytes()[..16],
            "one prefix per process"
        );
        // Two ids, or one that is not visible ASCII, give way to one fresh id.
        for bad in [
            &[("x-request-id", "a"), ("x-request-id", "b")][..],
            &[("x-request-id", "a b")],
        ] {
            let mut m = map(bad);
            let id = ensure_request_id(&mut m);
            assert_eq!(id.len(), 32);
            let all: Vec<_> = m.get_all("x-request-id").iter().collect();
            assert_eq!(all, [&id]);
        }
    }

    #[test]
    fn a_preflight_needs_options_origin_and_the_requested_method() {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_static("https://a"));
        assert!(!is_preflight(&http::Method::OPTIONS, &h));
        h.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("POST"),
        );
        assert!(is_preflight(&http::Method::OPTIONS, &h));
        assert!(!is_preflight(&http::Method::GET, &h));
        h.remove(header::ORIGIN);
        assert!(!is_preflight(&http::Method::OPTIONS, &h));
    }
}

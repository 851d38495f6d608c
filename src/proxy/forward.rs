//! Forwarding: builds the upstream request from a [`Permit`] and sends it on a pooled client;
//! enforces the route's body limit and timeout; splices upgraded (WebSocket) connections.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, HOST, UPGRADE};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::config::IdentityHeaders;
use crate::proxy::authorize::Permit;
use crate::proxy::tunnel;
use crate::proxy::upstream::Forwarder;
use crate::routes::UpstreamScheme;
use crate::wire::headers;

/// Deadline for an upstream's response head when the route sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong with an unavailable upstream, for the access log's `error` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection was refused.
    Refused,
    /// The connection could not be made in `upstream_connect_timeout`.
    ConnectTimeout,
    /// Name resolution or another connect failure.
    Connect,
    /// The TLS handshake failed (certificate, name, protocol).
    Tls,
    /// The connection was reset or closed before a complete response.
    Reset,
    /// The upstream answered something that is not HTTP, or switched protocols unasked.
    BadResponse,
}

impl Failure {
    /// The log spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::ConnectTimeout => "connect_timeout",
            Failure::Connect => "connect",
            Failure::Tls => "tls",
            Failure::Reset => "reset",
            Failure::BadResponse => "bad_response",
        }
    }

    /// Classifies a client error by walking its source chain.
    fn of(err: &(dyn std::error::Error + 'static)) -> Failure {
        let mut connect = false;
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(c) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
                connect |= c.is_connect();
            }
            if e.downcast_ref::<rustls::Error>().is_some() {
                return Failure::Tls;
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => return Failure::Refused,
                    std::io::ErrorKind::TimedOut if connect => return Failure::ConnectTimeout,
                    std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof => return Failure::Reset,
                    _ if io.get_ref().is_some_and(|i| i.is::<rustls::Error>()) => {
                        return Failure::Tls
                    }
                    _ => {}
                }
            }
            if let Some(h) = e.downcast_ref::<hyper::Error>() {
                if h.is_parse() || h.is_parse_status() {
                    return Failure::BadResponse;
                }
                if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                    return Failure::Reset;
                }
            }
            cur = e.source();
        }
        if connect {
            Failure::Connect
        } else {
            Failure::Reset
        }
    }
}

/// Why an upstream exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// Refused, reset, unreachable, or answered with garbage.
    #[error("the upstream service is unavailable")]
    Unavailable(Failure),
    /// No response within the route's timeout.
    #[error("the upstream service did not answer in time")]
    Timeout,
    /// The request body is larger than the route's `max_body`.
    #[error("the request body is larger than this route accepts")]
    BodyTooLarge,
    /// The client's request body was malformed or cut short.
    #[error("the request body is malformed or incomplete")]
    BadBody,
}

/// A request body on its way upstream, cut off once it passes the route's `max_body`.
pub struct RequestBody {
    inner: Incoming,
    remaining: u64,
    fault: Option<Arc<BodyFault>>,
    /// Identity header names to remove from request trailers (bodies with content only).
    identity: Option<[http::HeaderName; 2]>,
}

/// Why a request body stopped early, so the failed exchange is blamed on the right side.
#[derive(Default)]
struct BodyFault {
    too_large: AtomicBool,
    client_error: AtomicBool,
}

/// The error a cut-off body reports to the upstream client.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Over `max_body`.
    #[error("request body over the route's limit")]
    TooLarge,
    /// The client's stream failed.
    #[error(transparent)]
    Client(#[from] hyper::Error),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(t) = frame.trailers_mut() {
                    // Trailers reach the upstream too: no key or forged identity in them.
                    let names = this.identity.as_ref().map_or(&[][..], |n| &n[..]);
                    let refs: [&http::HeaderName; 2] = match names {
                        [a, b] => [a, b],
                        _ => [&AUTHORIZATION, &AUTHORIZATION],
                    };
                    headers::strip_trailers(t, &refs);
                }
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        if let Some(f) = &this.fault {
                            f.too_large.store(true, Ordering::Relaxed);
                        }
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(f) = &this.fault {
                    f.client_error.store(true, Ordering::Relaxed);
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
/// Facts about the downstream request that forwarding needs.
pub struct Downstream<'a> {
    /// Normalized path.
    pub path: &'a str,
    /// Query string, untouched.
    pub query: Option<&'a str>,
    /// Host the client addressed (forwarded as `Host` and `X-Forwarded-Host`).
    pub host: Option<HeaderValue>,
    /// Client address.
    pub client: IpAddr,
    /// Whether the client connection was TLS.
    pub https: bool,
    /// The client's protocol version, which the response keeps whatever the upstream spoke.
    pub version: Version,
    /// The live snapshots, so an upgraded connection can end with its key.
    pub snapshots: &'a Arc<arc_swap::ArcSwap<crate::control::snapshot::Snapshot>>,
}

/// Sends the request upstream as the permit allows and returns the upstream's response.
pub async fn forward(
    clients: &Forwarder,
    permit: Permit<'_>,
    req: Request<Incoming>,
    down: Downstream<'_>,
    identity: &IdentityHeaders,
) -> Result<Response<Incoming>, ForwardError> {
    let route = permit.route;
    let (mut parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(max), Some(len)) = (route.max_body, declared) {
        if len > max {
            return Err(ForwardError::BodyTooLarge);
        }
    }
    // Bodyless requests (most GETs) need no fault tracking and allocate nothing for it.
    let fault = (!body.is_end_stream()).then(|| Arc::new(BodyFault::default()));
    let websocket = route.websocket && headers::is_websocket_upgrade(&parts.headers);
    let pinned = clients.pinned(route);
    let uri_host = upstream_headers(&mut parts.headers, permit, &down, identity, pinned);
    let downstream_upgrade = if websocket {
        let h = &mut parts.headers;
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    parts.uri = upstream_uri(permit, uri_host.as_ref(), down.path, down.query)?;
    parts.version = match route.upstream.scheme {
        UpstreamScheme::H2c => Version::HTTP_2,
        UpstreamScheme::Http | UpstreamScheme::Https => Version::HTTP_11,
    };
    let body = RequestBody {
        inner: body,
        remaining: route.max_body.unwrap_or(u64::MAX),
        fault: fault.clone(),
        identity: fault
            .is_some()
            .then(|| [identity.key_id.clone(), identity.service_account.clone()]),
    };
    let send = clients.send(route, Request::from_parts(parts, body));
    let deadline = route.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let mut resp = match tokio::time::timeout(deadline, send).await {
        Err(_) => return Err(ForwardError::Timeout),
        Ok(Err(e)) => return Err(blame(&e, fault.as_deref(), route)),
        Ok(Ok(resp)) => resp,
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return switch(resp, downstream_upgrade, permit, &down);
    }
    headers::strip_hop_by_hop(resp.headers_mut(), false);
    // An HTTP/1.0 upstream must not make an HTTP/1.1 client see an HTTP/1.0 status line.
    *resp.version_mut() = down.version;
    Ok(resp)
}

/// Rewrites the client's headers for the upstream; returns the `:authority` a pinned
/// (HTTP/2-capable) client must use, which is the client's host.
fn upstream_headers(
    h: &mut http::HeaderMap,
    permit: Permit<'_>,
    down: &Downstream<'_>,
    identity: &IdentityHeaders,
    pinned: bool,
) -> Option<http::uri::Authority> {
    headers::strip_hop_by_hop(h, true);
    // A key never reaches an upstream: strip exactly what carried it.
    if let Some(carrier) = permit.strip {
        carrier.strip(h);
    }
    if let Some(v) = h.get_mut(AUTHORIZATION) {
        // Another scheme's credential passes through on public routes; keep it out of
        // HPACK tables.
        v.set_sensitive(true);
    }
    h.remove(&identity.key_id);
    h.remove(&identity.service_account);
    if let Some(key) = permit.key {
        h.insert(&identity.key_id, key.id_header.clone());
        h.insert(
            &identity.service_account,
            key.service_account_header.clone(),
        );
    }
    headers::set_forwarded(h, down.client, down.https, down.host.as_ref());
    match (pinned, &down.host) {
        // HTTP/2 upstreams get the client's host as `:authority`, and no Host header.
        (true, Some(host)) => {
            h.remove(HOST);
            http::uri::Authority::try_from(host.as_bytes()).ok()
        }
        (true, None) => None,
        (false, host) => {
            if let Some(host) = host {
                h.insert(HOST, host.clone());
            }
            None
        }
    }
}

/// Which side a failed exchange is blamed on: the client's body, or the upstream.
fn blame(
    e: &hyper_util::client::legacy::Error,
    fault: Option<&BodyFault>,
    route: &crate::routes::Route,
) -> ForwardError {
    if let Some(f) = fault {
        if f.too_large.load(Ordering::Relaxed) {
            return ForwardError::BodyTooLarge;
        }
        if f.client_error.load(Ordering::Relaxed) {
            return ForwardError::BadBody;
        }
    }
    tracing::debug!(route = %route.name, error = %e, "upstream request failed");
    ForwardError::Unavailable(Failure::of(e))
}

/// A 101 from the upstream: spliced when the client asked for a WebSocket and the upstream
/// agreed; anything else would be a tunnel past every check, and is a 502.
fn switch(
    mut resp: Response<Incoming>,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    permit: Permit<'_>,
    down: &Downstream<'_>,
) -> Result<Response<Incoming>, ForwardError> {
    let agreed = resp
        .headers()
        .get(UPGRADE)
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let Some(down_up) = downstream_upgrade.filter(|_| agreed) else {
        tracing::debug!(route = %permit.route.name, "upstream switched protocols unasked");
        return Err(ForwardError::Unavailable(Failure::BadResponse));
    };
    headers::strip_hop_by_hop(resp.headers_mut(), false);
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static("websocket"));
    let up_up = hyper::upgrade::on(&mut resp);
    let watch = permit.digest.map(|digest| tunnel::KeyWatch {
        snapshots: down.snapshots.clone(),
        digest,
    });
    tokio::spawn(tunnel::splice(down_up, up_up, watch));
    Ok(resp)
}

/// The upstream request's URI; `host` replaces the upstream's authority for per-route clients.
fn upstream_uri(
    permit: Permit<'_>,
    host: Option<&http::uri::Authority>,
    path: &str,
    query: Option<&str>,
) -> Result<Uri, ForwardError> {
    let route = permit.route;
    let up = &route.upstream;
    let path = route.upstream_path(path);
    let scheme = match up.scheme {
        UpstreamScheme::Https => "https://",
        UpstreamScheme::Http | UpstreamScheme::H2c => "http://",
    };
    let authority = host.unwrap_or(&up.authority).as_str();
    let mut s = String::with_capacity(
        scheme.len()
            + authority.len()
            + up.base_path.len()
            + path.len()
            + query.map_or(0, |q| q.len() + 1),
    );
    s.push_str(scheme);
    s.push_str(authority);
    s.push_str(&up.base_path);
    s.push_str(path);
    if let Some(q) = query {
        s.push('?');
        s.push_str(q);
    }
    Uri::try_from(s).map_err(|_| ForwardError::Unavailable(Failure::Connect))
}

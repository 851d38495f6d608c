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
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::auth::{self, Credential, Permit};
use crate::config::{Config, IdentityHeaders};
use crate::headers;
use crate::keys;
use crate::routes::UpstreamScheme;

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

/// Connects to one fixed upstream whatever the request URI names.
///
/// HTTP/2 takes `:authority` from the URI, which must carry the client's host (RFC 9113
/// 8.3.1); so per-route clients put that host in the URI and this connector ignores it.
#[derive(Clone)]
struct FixedDest {
    inner: HttpConnector,
    dest: Uri,
}

type ConnectFuture = Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    TokioIo<tokio::net::TcpStream>,
                    Box<dyn std::error::Error + Send + Sync>,
                >,
            > + Send,
    >,
>;

impl tower_service::Service<Uri> for FixedDest {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.inner, cx).map_err(Into::into)
    }

    fn call(&mut self, _requested: Uri) -> Self::Future {
        let connecting = tower_service::Service::call(&mut self.inner, self.dest.clone());
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

type HttpsClient = Client<HttpsConnector<FixedDest>, RequestBody>;

/// A route's own client when its upstream may speak HTTP/2 (h2c, or https with ALPN h2).
enum RouteClient {
    H2c(Client<FixedDest, RequestBody>),
    Https(HttpsClient),
}

/// Pooled upstream clients: one shared for `http://` routes, one per h2c or https route.
pub struct Forwarder {
    http1: Client<HttpConnector, RequestBody>,
    by_route: Vec<Option<RouteClient>>,
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
    pub snapshots: &'a Arc<arc_swap::ArcSwap<crate::reload::Snapshot>>,
}

fn connector(connect_timeout: Duration) -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(connect_timeout));
    c.set_keepalive(Some(Duration::from_secs(60)));
    c.enforce_http(false);
    c
}

fn fixed(connect_timeout: Duration, up: &crate::routes::Upstream) -> Result<FixedDest, String> {
    let scheme = match up.scheme {
        UpstreamScheme::Https => "https",
        UpstreamScheme::Http | UpstreamScheme::H2c => "http",
    };
    let dest = Uri::try_from(format!("{scheme}://{}/", up.authority))
        .map_err(|e| format!("upstream {}: {e}", up.authority))?;
    Ok(FixedDest {
        inner: connector(connect_timeout),
        dest,
    })
}

fn https_client(
    connect_timeout: Duration,
    route: &crate::routes::Route,
) -> Result<HttpsClient, String> {
    let t = &route.upstream_tls;
    let tls = crate::tls::client_config(t.ca_file.as_deref())?;
    // The URI carries the client's host, so the name to verify must be fixed here.
    let host = route.upstream.authority.host();
    let name = t
        .server_name
        .as_deref()
        .unwrap_or_else(|| host.trim_start_matches('[').trim_end_matches(']'));
    let name = rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|_| format!("invalid TLS server name {name:?}"))?;
    let conn = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        .enable_http1()
        .enable_http2()
        .wrap_connector(fixed(connect_timeout, &route.upstream)?);
    // set_host: on HTTP/1.1 the Host comes from the URI (the client's host); on HTTP/2 the
    // same value is `:authority` and no Host is sent.
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .set_host(true)
        .build(conn))
}

impl Forwarder {
    /// Builds the pooled clients a config needs.
    pub fn new(config: &Config) -> Result<Forwarder, String> {
        let ct = config.limits.upstream_connect_timeout;
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .set_host(false)
            .build(connector(ct));
        let by_route = config
            .routes
            .iter()
            .map(|r| match r.upstream.scheme {
                UpstreamScheme::Http => Ok(None),
                UpstreamScheme::H2c => Ok(Some(RouteClient::H2c(
                    Client::builder(TokioExecutor::new())
                        .pool_idle_timeout(Duration::from_secs(90))
                        .http2_only(true)
                        .set_host(false)
                        .build(fixed(ct, &r.upstream)?),
                ))),
                UpstreamScheme::Https => https_client(ct, r).map(|c| Some(RouteClient::Https(c))),
            })
            .collect::<Result<_, String>>()?;
        Ok(Forwarder { http1, by_route })
    }

    /// Sends the request upstream as the permit allows and returns the upstream's response.
    pub async fn forward(
        &self,
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
        // Bodyless requests (most GETs) need no fault tracking and allocate nothing for it.
        let fault = (!body.is_end_stream()).then(|| Arc::new(BodyFault::default()));
        if let (Some(max), Some(len)) = (route.max_body, declared) {
            if len > max {
                return Err(ForwardError::BodyTooLarge);
            }
        }
        let websocket = route.websocket && headers::is_websocket_upgrade(&parts.headers);
        let h = &mut parts.headers;
        // A key never reaches an upstream; other schemes pass through on public routes.
        let key_digest = match auth::credential(h) {
            Credential::ApiKey(token) => Some(keys::digest(token)),
            _ => None,
        };
        let carries_key =
            key_digest.is_some() || matches!(auth::credential(h), Credential::MalformedApiKey);
        headers::strip_hop_by_hop(h, true);
        if !route.public || carries_key {
            h.remove(AUTHORIZATION);
        } else if let Some(v) = h.get_mut(AUTHORIZATION) {
            // Another scheme's credential passes through; keep it out of HPACK tables.
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
        let client = self.by_route.get(route.index).and_then(Option::as_ref);
        let uri_host = match (client, &down.host) {
            // HTTP/2 upstreams get the client's host as `:authority`, and no Host header.
            (Some(_), Some(host)) => {
                let authority = http::uri::Authority::try_from(host.as_bytes()).ok();
                h.remove(HOST);
                authority
            }
            (Some(_), None) => None,
            (None, host) => {
                if let Some(host) = host {
                    h.insert(HOST, host.clone());
                }
                None
            }
        };
        let downstream_upgrade = if websocket {
            h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        parts.uri = upstream_uri(permit, uri_host.as_ref(), down.path, down.query)?;
        let body = RequestBody {
            inner: body,
            remaining: route.max_body.unwrap_or(u64::MAX),
            fault: fault.clone(),
            identity: fault
                .is_some()
                .then(|| [identity.key_id.clone(), identity.service_account.clone()]),
        };
        parts.version = match route.upstream.scheme {
            UpstreamScheme::H2c => Version::HTTP_2,
            UpstreamScheme::Http | UpstreamScheme::Https => Version::HTTP_11,
        };
        let req = Request::from_parts(parts, body);
        let send = match client {
            None => self.http1.request(req),
            Some(RouteClient::H2c(c)) => c.request(req),
            Some(RouteClient::Https(c)) => c.request(req),
        };
        let deadline = route.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let mut resp = match tokio::time::timeout(deadline, send).await {
            Err(_) => return Err(ForwardError::Timeout),
            Ok(Err(e)) => {
                if let Some(f) = &fault {
                    if f.too_large.load(Ordering::Relaxed) {
                        return Err(ForwardError::BodyTooLarge);
                    }
                    if f.client_error.load(Ordering::Relaxed) {
                        return Err(ForwardError::BadBody);
                    }
                }
                tracing::debug!(route = %route.name, error = %e, "upstream request failed");
                return Err(ForwardError::Unavailable(Failure::of(&e)));
            }
            Ok(Ok(resp)) => resp,
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let proto = resp.headers().get(UPGRADE).cloned();
            let agreed = proto
                .as_ref()
                .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
            let Some(down_up) = downstream_upgrade.filter(|_| agreed) else {
                // A switch nobody asked for (or to another protocol) would be a tunnel past
                // every check; the client gets a 502 instead.
                tracing::debug!(route = %route.name, "upstream switched protocols unasked");
                return Err(ForwardError::Unavailable(Failure::BadResponse));
            };
            headers::strip_hop_by_hop(resp.headers_mut(), false);
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            resp.headers_mut()
                .insert(UPGRADE, HeaderValue::from_static("websocket"));
            let up_up = hyper::upgrade::on(&mut resp);
            let watch = key_digest
                .filter(|_| permit.key.is_some())
                .map(|digest| KeyWatch {
                    snapshots: down.snapshots.clone(),
                    digest,
                });
            tokio::spawn(splice(down_up, up_up, watch));
            return Ok(resp);
        }
        headers::strip_hop_by_hop(resp.headers_mut(), false);
        // An HTTP/1.0 upstream must not make an HTTP/1.1 client see an HTTP/1.0 status line.
        *resp.version_mut() = down.version;
        Ok(resp)
    }
}

/// Ends a tunnel once the key that opened it is revoked, expired or gone.
struct KeyWatch {
    snapshots: Arc<arc_swap::ArcSwap<crate::reload::Snapshot>>,
    digest: keys::Digest32,
}

impl KeyWatch {
    fn still_valid(&self) -> bool {
        let now = auth::now_secs();
        let snap = self.snapshots.load();
        snap.keys
            .lookup(&self.digest)
            .is_some_and(|k| !k.revoked && k.expires_at.is_none_or(|t| now < t))
    }
}

/// How often a tunnel re-checks its key: well inside the 2 s a revocation may take.
const KEY_RECHECK: Duration = Duration::from_millis(500);

thread_local! {
    /// This thread's clients, with the generation of the config they were built from.
    static LOCAL: std::cell::RefCell<Option<(u64, Arc<Forwarder>)>> = const { std::cell::RefCell::new(None) };
}

/// The calling thread's own pooled clients for the snapshot's config.
///
/// Each worker thread runs its own runtime; a shared pool would hand a connection driven on one
/// thread to a request on another, and every exchange would then wake a second thread.
pub fn local(snapshot: &crate::reload::Snapshot) -> Arc<Forwarder> {
    let tag = snapshot.config.generation;
    LOCAL.with(|cell| {
        let mut slot = cell.borrow_mut();
        if let Some((t, f)) = slot.as_ref() {
            if *t == tag {
                return f.clone();
            }
        }
        // Built once per thread per config; the snapshot's own copy proved the config builds.
        let f = Forwarder::new(&snapshot.config)
            .map(Arc::new)
            .unwrap_or_else(|_| snapshot.forwarder.clone());
        *slot = Some((tag, f.clone()));
        f
    })
}

/// Copies bytes both ways between an upgraded client and upstream connection.
///
/// The client's upgraded stream still holds its connection slot, so a tunnel counts toward
/// `max_connections` and the connection gauge, and ends with the worker at shutdown.
async fn splice(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    watch: Option<KeyWatch>,
) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    let mut tick = tokio::time::interval(KEY_RECHECK);
    loop {
        tokio::select! {
            res = &mut copy => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
                return;
            }
            _ = tick.tick(), if watch.is_some() => {
                if watch.as_ref().is_some_and(|w| !w.still_valid()) {
                    tracing::info!("closing an upgraded connection: its key is no longer valid");
                    return;
                }
            }
        }
    }
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

//! Upstream exchanges: the request body on its way (cut at `max_body`), why an exchange
//! failed, and the clients: hyper-util's for WebSocket upgrades and for each https route
//! pinned to its upstream, built per worker thread and per config. Other `http://` requests
//! go on the worker's own HTTP/1.1 connections (`proxy::pool`), other `h2c://` requests on its
//! shared HTTP/2 ones (`proxy::multiplex`).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Request, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::config::routes::{Route, UpstreamScheme};
use crate::config::Config;
use crate::control::snapshot::Snapshot;
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

    /// Classifies a failed exchange.
    pub(crate) fn of_send(err: &SendError) -> Failure {
        match err {
            SendError::Legacy(e) => Failure::of(e, false),
            SendError::Connect(e) => Failure::of(e.as_ref(), true),
            SendError::Http(e) => Failure::of(e, false),
            SendError::Opening(f) => *f,
        }
    }

    /// Classifies a client error by walking its source chain; `connect` when it happened
    /// while connecting.
    fn of(err: &(dyn std::error::Error + 'static), connect: bool) -> Failure {
        let mut connect = connect;
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

/// How sending to an upstream failed, before it is classified as a [`Failure`].
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// From a pooled hyper-util client (https, WebSocket upgrades).
    #[error("{0}")]
    Legacy(#[source] hyper_util::client::legacy::Error),
    /// Connecting a new HTTP/1.1 or h2c connection failed.
    #[error("connect: {0}")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The HTTP/1.1 or h2c exchange failed.
    #[error("{0}")]
    Http(#[source] hyper::Error),
    /// The shared h2c connection this request waited for could not be opened.
    #[error("the shared upstream connection could not be opened ({})", .0.as_str())]
    Opening(Failure),
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
    /// `None` for the empty body of a request sent again ([`RequestBody::empty`]).
    pub(crate) inner: Option<Incoming>,
    pub(crate) remaining: u64,
    pub(crate) fault: Option<Arc<BodyFault>>,
    /// Identity header names to remove from request trailers (bodies with content only).
    pub(crate) identity: Option<[http::HeaderName; 2]>,
    /// What it has given out, while the request may be sent again (`proxy::resend`).
    pub(crate) kept: Option<Box<Kept>>,
}

/// Up to this much of a request body is kept for sending it again: HAProxy's default buffer,
/// which its `retry-on` needs the body to fit in. Most gRPC messages do.
const KEEP_LIMIT: usize = 16 * 1024;

/// At most this many frames are kept (a `Frame<Bytes>` is 96 bytes besides its data): a body
/// sent a byte per frame would otherwise keep 16,384 of them, 1.5 MiB.
const KEEP_FRAMES: usize = 64;

/// The frames a request body gave out, kept (reference counts, not copies) so an HTTP/2
/// upstream that did not process the request can be sent it again; given up past
/// [`KEEP_LIMIT`] or once the response has come.
pub(crate) struct Kept {
    given: Vec<Frame<Bytes>>,
    bytes: usize,
    /// Frames to give out again before the rest of the body.
    pending: std::collections::VecDeque<Frame<Bytes>>,
    /// Where the body goes when hyper drops it: `None`, or closed, once no resend can follow.
    back: Option<tokio::sync::oneshot::Sender<RequestBody>>,
}

impl Kept {
    /// True while a resend may still follow, so what the body gives out is worth keeping.
    fn wanted(&self) -> bool {
        self.back.as_ref().is_some_and(|b| !b.is_closed())
    }
}

/// A frame's copy: data and trailers are reference counted, so this copies no bytes.
fn copy_frame(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    match (frame.data_ref(), frame.trailers_ref()) {
        (Some(d), _) => Some(Frame::data(d.clone())),
        (None, Some(t)) => Some(Frame::trailers(t.clone())),
        (None, None) => None,
    }
}

/// Why a request body stopped early, so the failed exchange is blamed on the right side.
#[derive(Default)]
pub(crate) struct BodyFault {
    pub(crate) too_large: AtomicBool,
    pub(crate) client_error: AtomicBool,
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
        if let Some(k) = this.kept.as_mut() {
            if let Some(frame) = k.pending.pop_front() {
                if let Some(copy) = copy_frame(&frame).filter(|_| k.wanted()) {
                    k.given.push(copy);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = match Pin::new(inner).poll_frame(cx) {
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
        };
        if let (Some(k), Poll::Ready(Some(Ok(frame)))) = (this.kept.as_mut(), &polled) {
            let len = frame.data_ref().map_or(0, Bytes::len);
            if !k.wanted() || k.bytes + len > KEEP_LIMIT || k.given.len() >= KEEP_FRAMES {
                // The response came, or the body is too large (or too finely cut) to keep:
                // it goes once.
                this.kept = None;
            } else if let Some(copy) = copy_frame(frame) {
                k.bytes += len;
                k.given.push(copy);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.kept.as_ref().is_none_or(|k| k.pending.is_empty())
            && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self
            .inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let Some(k) = self.kept.as_ref().filter(|k| !k.pending.is_empty()) else {
            return rest;
        };
        let again: u64 = k
            .pending
            .iter()
            .map(|f| f.data_ref().map_or(0, |d| d.len() as u64))
            .sum();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + again);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + again);
        }
        hint
    }
}

impl Drop for RequestBody {
    /// Hands the body, with the frames it gave out, back to a request that may be sent
    /// again; hyper drops it once the exchange no longer needs it.
    fn drop(&mut self) {
        let Some(kept) = self.kept.take().filter(|k| k.wanted()) else {
            return;
        };
        let Kept {
            mut given,
            bytes,
            pending,
            back,
        } = *kept;
        given.extend(pending);
        let again = RequestBody {
            inner: self.inner.take(),
            remaining: self.remaining,
            fault: self.fault.take(),
            identity: self.identity.take(),
            kept: Some(Box::new(Kept {
                given: Vec::new(),
                bytes,
                pending: given.into(),
                back: None,
            })),
        };
        if let Some(back) = back {
            let _ = back.send(again);
        }
    }
}

impl RequestBody {
    /// An empty body, for sending a bodyless request again.
    pub(crate) fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            remaining: 0,
            fault: None,
            identity: None,
            kept: None,
        }
    }

    /// Keeps what the body gives out, and hands it back through `back` when dropped, so the
    /// request can be sent again.
    pub(crate) fn keep(&mut self, back: tokio::sync::oneshot::Sender<RequestBody>) {
        match self.kept.as_mut() {
            Some(k) => k.back = Some(back),
            None => {
                self.kept = Some(Box::new(Kept {
                    given: Vec::new(),
                    bytes: 0,
                    pending: Default::default(),
                    back: Some(back),
                }))
            }
        }
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

/// A route's own client when its upstream may speak HTTP/2 (h2c, or https with ALPN h2). An
/// h2c route's takes only WebSocket handshakes; its other requests go on `proxy::multiplex`.
enum RouteClient {
    H2c(Client<FixedDest, RequestBody>),
    Https(HttpsClient),
}

/// Upstream clients: WebSocket upgrades on a pooled client, one client per h2c or https
/// route, and the connector for the worker's own HTTP/1.1 connections.
pub struct Forwarder {
    connector: HttpConnector,
    ping: Duration,
    http1: Client<HttpConnector, RequestBody>,
    by_route: Vec<Option<RouteClient>>,
}

/// How long a ping to an HTTP/2 upstream sent after `interval` of silence may go unanswered
/// before its connection is closed: as long again, at most hyper's default of 20 s. The
/// upstream's HTTP/2 layer answers it, however busy its handlers are.
pub(crate) fn ping_timeout(interval: Duration) -> Duration {
    interval.min(Duration::from_secs(20))
}

/// The pool settings every upstream client shares; `ping` as in [`Forwarder::ping`].
fn pool(ping: Duration) -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(Duration::from_secs(90))
        .timer(hyper_util::rt::TokioTimer::new())
        .http2_keep_alive_interval(ping)
        .http2_keep_alive_timeout(ping_timeout(ping));
    b
}

fn connector(connect_timeout: Duration) -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(connect_timeout));
    c.set_keepalive(Some(Duration::from_secs(60)));
    c.enforce_http(false);
    c
}

fn fixed(
    connect_timeout: Duration,
    up: &crate::config::routes::Upstream,
) -> Result<FixedDest, String> {
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
    ping: Duration,
    route: &Route,
) -> Result<HttpsClient, String> {
    let t = &route.upstream_tls;
    let tls = crate::wire::tls::client_config(t.ca_file.as_deref())?;
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
    Ok(pool(ping).set_host(true).build(conn))
}

impl Forwarder {
    /// Builds the pooled clients a config needs.
    pub fn new(config: &Config) -> Result<Forwarder, String> {
        let ct = config.limits.upstream_connect_timeout;
        let ping = config.limits.upstream_ping_interval;
        let http1 = pool(ping).set_host(false).build(connector(ct));
        let by_route = config
            .routes
            .iter()
            .map(|r| match r.upstream.scheme {
                UpstreamScheme::Http => Ok(None),
                UpstreamScheme::H2c => Ok(Some(RouteClient::H2c(
                    pool(ping)
                        .http2_only(true)
                        .set_host(false)
                        .build(fixed(ct, &r.upstream)?),
                ))),
                UpstreamScheme::Https => {
                    https_client(ct, ping, r).map(|c| Some(RouteClient::Https(c)))
                }
            })
            .collect::<Result<_, String>>()?;
        Ok(Forwarder {
            connector: connector(ct),
            ping,
            http1,
            by_route,
        })
    }

    /// True when the route has its own client, which takes the client's host as `:authority`.
    pub(crate) fn pinned(&self, route: &Route) -> bool {
        matches!(self.by_route.get(route.index), Some(Some(_)))
    }

    /// True when `req` goes on the worker's own HTTP/1.1 connections: the route has no
    /// client of its own and it is not a WebSocket handshake (`upgrade`).
    pub(crate) fn own_connection(&self, route: &Route, upgrade: bool) -> bool {
        !upgrade && !self.pinned(route)
    }

    /// True when `req` goes on the worker's shared h2c connection (`proxy::multiplex`): an
    /// h2c route, and not a WebSocket handshake (`upgrade`), which stays on the route's client.
    pub(crate) fn shared_connection(&self, route: &Route, upgrade: bool) -> bool {
        !upgrade && route.upstream.scheme == UpstreamScheme::H2c
    }

    /// Starts `req` on hyper-util's client: the route's own, else the shared HTTP/1.1 one.
    pub(crate) fn start(&self, route: &Route, req: Request<RequestBody>) -> ResponseFuture {
        match self.by_route.get(route.index).and_then(Option::as_ref) {
            None => self.http1.request(req),
            Some(RouteClient::H2c(c)) => c.request(req),
            Some(RouteClient::Https(c)) => c.request(req),
        }
    }

    /// What new HTTP/1.1 and h2c upstream connections are made with.
    pub(crate) fn connector(&self) -> &HttpConnector {
        &self.connector
    }

    /// How long an HTTP/2 upstream connection with requests waiting may stay silent before it
    /// is pinged (`upstream_ping_interval`); unanswered for [`ping_timeout`], the connection
    /// is closed. Without it a blackholed connection (a vanished node, a dropped NAT entry)
    /// held every request sent on it until TCP gave up, about 15 minutes; a busy connection
    /// is never pinged (hyper pings after a silence only).
    pub(crate) fn ping(&self) -> Duration {
        self.ping
    }
}

thread_local! {
    /// This thread's clients, with the generation of the config they were built from.
    static LOCAL: std::cell::RefCell<Option<(u64, Arc<Forwarder>)>> = const { std::cell::RefCell::new(None) };
}

/// The calling thread's own pooled clients for the snapshot's config.
///
/// Each worker thread runs its own runtime; a shared pool would hand a connection driven on one
/// thread to a request on another, and every exchange would then wake a second thread.
pub fn local(snapshot: &Snapshot) -> Result<Arc<Forwarder>, ForwardError> {
    let tag = snapshot.config.generation;
    LOCAL.with(|cell| {
        let mut slot = cell.borrow_mut();
        if let Some((t, f)) = slot.as_ref() {
            if *t == tag {
                return Ok(f.clone());
            }
        }
        // Built once per thread per config. Validation checked every CA file and TLS name, so
        // this fails only if the TLS stack itself cannot be set up.
        let f = Forwarder::new(&snapshot.config)
            .map(Arc::new)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot build upstream clients");
                ForwardError::Unavailable(Failure::Tls)
            })?;
        *slot = Some((tag, f.clone()));
        Ok(f)
    })
}

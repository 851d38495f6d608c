//! The listener and the per-request pipeline: accept -> (tls) -> route -> authorize -> forward.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::accesslog::{AccessLog, Entry};
use crate::auth::{self, AuthError};
use crate::config::Limits;
use crate::error::{self, GatewayError};
use crate::forward::{Downstream, ForwardError};
use crate::headers;
use crate::metrics::{AuthOutcome, Metrics};
use crate::observe::{ConnState, Finish, ObservedBody};
use crate::path;
use crate::reload::{ReloadStats, Snapshot};
use crate::routes::host_without_port;

/// Shared state of a running gateway.
pub struct Gateway {
    /// Current routes and keys; one lock-free load per request.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Reload outcomes.
    pub reload_stats: Arc<ReloadStats>,
    /// Metric registry.
    pub metrics: Arc<Metrics>,
    /// Access log writer.
    pub access_log: AccessLog,
    /// True while the listener accepts and the snapshot is loaded.
    pub ready: AtomicBool,
}

/// Facts about the connection a request came on.
#[derive(Clone)]
struct Conn {
    peer: SocketAddr,
    https: bool,
    state: Arc<ConnState>,
}

/// A connection's slot under `max_connections` and its place in the connection gauge.
///
/// Owned by the connection's I/O, so an upgraded (WebSocket) stream keeps holding it.
struct ConnHold {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: metrics::Gauge,
}

impl ConnHold {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, gauge: &metrics::Gauge) -> ConnHold {
        gauge.increment(1.0);
        ConnHold {
            _permit: permit,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for ConnHold {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// An I/O stream that records activity for the idle watchdog and header read timeout.
struct TrackedIo<I> {
    inner: I,
    state: Arc<ConnState>,
    /// First bytes read, until three tell HTTP/2's preface (`PRI`) from an HTTP/1 method.
    sniff: [u8; 3],
    sniffed: u8,
    h2: bool,
    _hold: ConnHold,
}

impl<I> TrackedIo<I> {
    fn new(inner: I, state: Arc<ConnState>, hold: ConnHold) -> TrackedIo<I> {
        TrackedIo {
            inner,
            state,
            sniff: [0; 3],
            sniffed: 0,
            h2: false,
            _hold: hold,
        }
    }

    fn saw(&mut self, bytes: &[u8]) {
        if usize::from(self.sniffed) < self.sniff.len() {
            for &b in bytes
                .iter()
                .take(self.sniff.len() - usize::from(self.sniffed))
            {
                self.sniff[usize::from(self.sniffed)] = b;
                self.sniffed += 1;
            }
            if usize::from(self.sniffed) == self.sniff.len() && &self.sniff == b"PRI" {
                self.h2 = true;
                self.state.h2.store(true, Ordering::Relaxed);
                self.state.head_pending.store(false, Ordering::Relaxed);
            }
        }
        // HTTP/2 pings and settings are not activity: only streams keep it open.
        if self.h2 {
            return;
        }
        self.state.touch();
        if self.state.in_flight.load(Ordering::Relaxed) == 0
            && !self.state.head_pending.load(Ordering::Relaxed)
        {
            self.state.head_pending.store(true, Ordering::Relaxed);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for TrackedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let this = &mut *self;
            this.saw(&buf.filled()[before..]);
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TrackedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if !self.h2 && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if !self.h2 && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper's own cap is a backstop; the exact limit is checked per request with a JSON 431.
    let buf = usize::try_from(limits.max_header_bytes)
        .unwrap_or(usize::MAX)
        .saturating_mul(2)
        .max(16 * 1024);
    // hyper starts its header timer as soon as a keep-alive connection goes idle, which cut
    // idle connections at header_read_timeout; serve_conn runs that timer from the first byte.
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(buf)
        .max_headers(1000);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(buf).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Worker threads: `KEYGATE_WORKERS`, else one per available core.
pub fn worker_count() -> usize {
    std::env::var("KEYGATE_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

thread_local! {
    /// This thread's connection builder, with the generation of the config it came from.
    static BUILDER: std::cell::RefCell<Option<(u64, Arc<auto::Builder<TokioExecutor>>)>> =
        const { std::cell::RefCell::new(None) };
}

/// The connection builder for the current config, so changed limits apply to new connections.
fn local_builder(config: &crate::config::Config) -> Arc<auto::Builder<TokioExecutor>> {
    BUILDER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if let Some((generation, b)) = slot.as_ref() {
            if *generation == config.generation {
                return b.clone();
            }
        }
        let b = Arc::new(builder(&config.limits));
        *slot = Some((config.generation, b.clone()));
        b
    })
}

/// What every worker shares.
#[derive(Clone)]
struct Shared {
    gateway: Arc<Gateway>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    slots: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    max_connections: usize,
}

/// Serves connections from `listener` until `shutdown` resolves, then drains.
///
/// Thread per core: each worker runs its own single-threaded runtime and accepts from the
/// shared socket, so a request and its upstream exchange stay on one thread (no cross-thread
/// wake-ups, no shared pool lock); see `forward::local`.
pub async fn accept_loop(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let max = gateway.snapshot.load().config.limits.max_connections;
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Shared {
        gateway: gateway.clone(),
        tls,
        slots: Arc::new(Semaphore::new(max)),
        stop: stop_rx,
        max_connections: max,
    };
    let listener = listener.into_std()?;
    let mut workers = Vec::new();
    for i in 0..worker_count() {
        let (l, sh) = (listener.try_clone()?, shared.clone());
        workers.push(
            std::thread::Builder::new()
                .name(format!("keygate-worker-{i}"))
                .spawn(move || worker(l, sh))?,
        );
    }
    drop(listener);
    gateway.ready.store(true, Ordering::Relaxed);
    shutdown.await;
    // Load balancers keep sending for a while after they are told: say "not ready" at once,
    // keep serving for shutdown_delay, then stop accepting and drain.
    gateway.ready.store(false, Ordering::Relaxed);
    let delay = gateway.snapshot.load().config.shutdown_delay;
    if !delay.is_zero() {
        tracing::info!(delay = ?delay, "not ready; still accepting for shutdown_delay");
        tokio::time::sleep(delay).await;
    }
    let _ = stop_tx.send(true);
    let _ = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    })
    .await;
    Ok(())
}

fn worker(listener: std::net::TcpListener, shared: Shared) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a worker runtime");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "worker cannot use the listener");
                return;
            }
        };
        let mut stop = shared.stop.clone();
        let mut last_accept_warning = None;
        loop {
            // At the connection cap, stop accepting: extra clients wait in the kernel's queue.
            let permit = tokio::select! {
                p = shared.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = stop.changed() => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning,
                        // and say so at most once a second (clients can cause some of these).
                        if last_accept_warning.is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(1)) {
                            tracing::warn!(error = %e, "accept failed");
                            last_accept_warning = Some(std::time::Instant::now());
                        } else {
                            tracing::debug!(error = %e, "accept failed");
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                _ = stop.changed() => break,
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(connection(shared.clone(), stream, peer, permit));
        }
        drop(listener);
        // Drain: in-flight requests (and upgraded connections, which hold a slot) on this
        // worker get up to the grace period; whatever is left ends with the runtime.
        let max = shared.max_connections;
        let grace = shared.gateway.snapshot.load().config.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        while shared.slots.available_permits() < max {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("shutdown grace elapsed with requests still in flight");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

async fn connection(
    shared: Shared,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let hold = ConnHold::new(permit, &shared.gateway.metrics.active_connections);
    let state = Arc::new(ConnState::default());
    state.touch();
    // Limits come from the config of the moment, so a reload applies to new connections.
    let config = shared.gateway.snapshot.load().config.clone();
    match &shared.tls {
        None => serve_tracked(&shared, &config, stream, peer, false, state, hold).await,
        Some(acceptor) => {
            let handshake = acceptor.accept(stream);
            match tokio::time::timeout(config.limits.header_read_timeout, handshake).await {
                Ok(Ok(tls)) => serve_tracked(&shared, &config, tls, peer, true, state, hold).await,
                Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

/// Serves one (plain or TLS) stream with activity tracking for the idle watchdog.
async fn serve_tracked<I>(
    shared: &Shared,
    config: &crate::config::Config,
    io: I,
    peer: SocketAddr,
    https: bool,
    state: Arc<ConnState>,
    hold: ConnHold,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TrackedIo::new(io, state.clone(), hold);
    let conn = Conn { peer, https, state };
    let (gw, stop) = (shared.gateway.clone(), shared.stop.clone());
    let builder = local_builder(config);
    serve_conn(gw, io, conn, &builder, stop, &config.limits).await;
}

async fn serve_conn<I>(
    gw: Arc<Gateway>,
    io: I,
    conn: Conn,
    builder: &auto::Builder<TokioExecutor>,
    mut stop: watch::Receiver<bool>,
    limits: &Limits,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = conn.state.clone();
    let (gateway, peer) = (gw.clone(), conn.peer);
    let svc = service_fn(move |req| handle(gw.clone(), conn.clone(), req));
    let c = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(c);
    let mut watch = Watchdog::new(limits);
    let mut closing = false;
    loop {
        tokio::select! {
            res = c.as_mut() => {
                if let Err(e) = res {
                    log_rejected_head(&gateway, peer, e.as_ref());
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !closing => {
                c.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep(watch.check) => match watch.verdict(&state) {
                Verdict::Open => {}
                // A client that started a head and stalls gets no answer, as with hyper's own
                // header timeout.
                Verdict::HeadTimedOut => return,
                Verdict::Idle if !closing => {
                    // HTTP/1: closes at once (nothing is in flight); HTTP/2: GOAWAY.
                    c.as_mut().graceful_shutdown();
                    closing = true;
                }
                Verdict::Idle => {
                    if watch.overdue() {
                        return;
                    }
                }
            },
        }
    }
}

/// Logs a request hyper refused before our service saw it (bad header bytes, an oversized
/// head): hyper has already answered 400 or 431 and closed. Method and path are unknown.
fn log_rejected_head(gw: &Gateway, peer: SocketAddr, err: &(dyn std::error::Error + 'static)) {
    let Some(e) = err.downcast_ref::<hyper::Error>() else {
        return;
    };
    if !e.is_parse() {
        return;
    }
    let status = if e.is_parse_too_large() { 431 } else { 400 };
    let snapshot = gw.snapshot.load();
    gw.metrics
        .count_request(&gw.metrics.unrouted, status, AuthOutcome::NotChecked);
    let entry = Entry {
        time: SystemTime::now(),
        request_id: headers::new_request_id(),
        client: peer,
        method: Method::from_bytes(b"-").unwrap_or_default(),
        uri: Uri::default(),
        route: None,
        status,
        duration: 0.0,
        bytes: 0,
        key_id: None,
        service_account: None,
        auth: AuthOutcome::NotChecked,
        upstream_status: None,
        normalized: Some("-".into()),
        host: None,
        user_agent: None,
        upstream: None,
        upstream_ms: None,
        error: Some("bad_request_head"),
        grpc_status: None,
    };
    if !gw.access_log.send(entry, snapshot.config.log_format) {
        gw.metrics.access_log_dropped.increment(1);
    }
}

/// What the watchdog decided on one check.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Open,
    Idle,
    HeadTimedOut,
}

/// The idle and header-read timers of one connection, advanced in coarse checks so the I/O
/// path never reads the clock.
struct Watchdog {
    check: Duration,
    idle: Duration,
    head: Duration,
    quiet: Duration,
    head_wait: Duration,
    idle_checks_after_close: u32,
}

impl Watchdog {
    fn new(limits: &Limits) -> Watchdog {
        let check = (limits.idle_timeout.min(limits.header_read_timeout) / 4)
            .max(Duration::from_millis(50));
        Watchdog {
            check,
            idle: limits.idle_timeout,
            head: limits.header_read_timeout,
            quiet: Duration::ZERO,
            head_wait: Duration::ZERO,
            idle_checks_after_close: 0,
        }
    }

    fn verdict(&mut self, state: &ConnState) -> Verdict {
        let active = state.active.swap(false, Ordering::Relaxed);
        let busy = state.in_flight.load(Ordering::Relaxed) > 0;
        if !busy && state.head_pending.load(Ordering::Relaxed) {
            // Checks start anywhere within a period: one extra makes the timer never short.
            self.head_wait += self.check;
            if self.head_wait > self.head {
                return Verdict::HeadTimedOut;
            }
        } else {
            self.head_wait = Duration::ZERO;
        }
        if active || busy {
            self.quiet = Duration::ZERO;
            return Verdict::Open;
        }
        self.quiet += self.check;
        if self.quiet > self.idle {
            Verdict::Idle
        } else {
            Verdict::Open
        }
    }

    /// After a graceful close was asked for, a few more idle checks end the connection hard.
    fn overdue(&mut self) -> bool {
        self.idle_checks_after_close += 1;
        self.idle_checks_after_close > 4
    }
}

/// What the pipeline learned, for metrics and the access log.
#[derive(Default)]
struct Trace {
    route: Option<usize>,
    key_id: Option<HeaderValue>,
    service_account: Option<HeaderValue>,
    outcome: Option<AuthOutcome>,
    /// The normalized path, when it differs from the raw one.
    normalized: Option<Box<str>>,
    upstream: Option<http::uri::Authority>,
    upstream_ms: Option<f64>,
    grpc_status: Option<u16>,
}

fn outcome_of(err: &GatewayError) -> AuthOutcome {
    match err {
        GatewayError::Auth(a) => match a {
            AuthError::Missing(_) => AuthOutcome::Missing,
            AuthError::Invalid => AuthOutcome::Invalid,
            AuthError::Expired => AuthOutcome::Expired,
            AuthError::Revoked => AuthOutcome::Revoked,
            AuthError::InsufficientScope(_) => AuthOutcome::Forbidden,
        },
        GatewayError::BadRequest(_)
        | GatewayError::Path(_)
        | GatewayError::NoRoute
        | GatewayError::HeadersTooLarge
        | GatewayError::Forward(_) => AuthOutcome::NotChecked,
    }
}

/// A request between its head and its response: if the client goes away first, dropping this
/// still logs and counts the request, as 499 (nginx's "client closed request").
struct Pending {
    gateway: Arc<Gateway>,
    snapshot: Arc<Snapshot>,
    conn: Arc<ConnState>,
    peer: SocketAddr,
    start: Instant,
    arrived: SystemTime,
    request_id: HeaderValue,
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    grpc: bool,
    trace: Trace,
    answered: bool,
}

/// Status logged for a request whose client closed the connection before the response.
const CLIENT_CLOSED: u16 = 499;

impl Pending {
    fn stats(&self) -> &crate::metrics::RouteStats {
        self.trace
            .route
            .and_then(|i| self.snapshot.route_stats.get(i))
            .unwrap_or(&self.gateway.metrics.unrouted)
    }

    /// Counts the request and builds its log line; the caller completes duration and bytes.
    fn record(
        &mut self,
        status: u16,
        upstream_status: Option<u16>,
        error: Option<&'static str>,
    ) -> Entry {
        let outcome = self.trace.outcome.unwrap_or(AuthOutcome::NotChecked);
        self.gateway
            .metrics
            .count_request(self.stats(), status, outcome);
        let route = self
            .trace
            .route
            .and_then(|i| self.snapshot.config.routes.get(i))
            .map(|r| r.name.clone());
        Entry {
            time: self.arrived,
            request_id: self.request_id.clone(),
            client: self.peer,
            method: std::mem::replace(&mut self.method, Method::GET),
            uri: std::mem::take(&mut self.uri),
            route,
            status,
            duration: 0.0,
            bytes: 0,
            key_id: self.trace.key_id.take(),
            service_account: self.trace.service_account.take(),
            auth: outcome,
            upstream_status,
            normalized: self.trace.normalized.take(),
            host: self.host.take(),
            user_agent: self.user_agent.take(),
            upstream: self.trace.upstream.take(),
            upstream_ms: self.trace.upstream_ms,
            error,
            grpc_status: self.trace.grpc_status,
        }
    }

    /// Where a gRPC request's final status is counted, for gRPC requests only.
    fn grpc_tally(&self) -> Option<crate::observe::GrpcTally> {
        self.grpc.then(|| crate::observe::GrpcTally {
            metrics: self.gateway.metrics.clone(),
            stats: self.snapshot.route_stats.clone(),
            route: self.trace.route,
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        if self.grpc {
            // CANCELLED: the client went away.
            self.trace.grpc_status = Some(1);
            if let Some(t) = self.grpc_tally() {
                t.count(1);
            }
        }
        let mut entry = self.record(CLIENT_CLOSED, None, Some("client_closed"));
        let secs = self.start.elapsed().as_secs_f64();
        self.stats().duration.record(secs);
        entry.duration = secs;
        self.conn.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.conn.touch();
        if !self
            .gateway
            .access_log
            .send(entry, self.snapshot.config.log_format)
        {
            self.gateway.metrics.access_log_dropped.increment(1);
        }
    }
}

/// Handles one request; never fails, every error becomes a response.
async fn handle(
    gateway: Arc<Gateway>,
    conn: Conn,
    mut req: Request<Incoming>,
) -> Result<Response<ObservedBody>, Infallible> {
    let start = Instant::now();
    let arrived = SystemTime::now();
    conn.state.in_flight.fetch_add(1, Ordering::Relaxed);
    conn.state.head_pending.store(false, Ordering::Relaxed);
    conn.state.touch();
    let snapshot = gateway.snapshot.load_full();
    let grpc = error::is_grpc(req.headers());
    let request_id = headers::ensure_request_id(req.headers_mut());
    let mut pending = Pending {
        gateway,
        snapshot,
        conn: conn.state.clone(),
        peer: conn.peer,
        start,
        arrived,
        request_id,
        method: req.method().clone(),
        uri: req.uri().clone(),
        host: req.headers().get(HOST).cloned(),
        user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
        grpc,
        trace: Trace::default(),
        answered: false,
    };
    let p = &mut pending;
    let result = pipeline(&p.snapshot, &p.gateway, &conn, req, &mut p.trace).await;
    let (mut resp, upstream_status, error) = match result {
        Ok(r) => {
            let status = r.status().as_u16();
            if grpc {
                // A trailers-only answer carries its status in the head.
                pending.trace.grpc_status = crate::observe::grpc_status(r.headers());
            }
            (r.map(Either::Left), Some(status), None)
        }
        Err(e) => {
            if pending.trace.outcome.is_none() {
                pending.trace.outcome = Some(outcome_of(&e));
            }
            if grpc {
                pending.trace.grpc_status = Some(u16::from(e.grpc_code()));
            }
            let stats = pending.stats();
            let error = match &e {
                GatewayError::Forward(ForwardError::Unavailable(why)) => {
                    stats.upstream_unavailable.increment(1);
                    Some(why.as_str())
                }
                GatewayError::Forward(ForwardError::Timeout) => {
                    stats.upstream_timeout.increment(1);
                    Some("timeout")
                }
                _ => None,
            };
            let config = &pending.snapshot.config;
            (
                error::response(&e, &config.www_authenticate, grpc).map(Either::Right),
                None,
                error,
            )
        }
    };
    resp.headers_mut()
        .insert(&headers::X_REQUEST_ID, pending.request_id.clone());
    let entry = pending.record(resp.status().as_u16(), upstream_status, error);
    pending.answered = true;
    let finish = Box::new(Finish {
        entry,
        start,
        duration: pending.stats().duration.clone(),
        log: pending.gateway.access_log.clone(),
        format: pending.snapshot.config.log_format,
        dropped: pending.gateway.metrics.access_log_dropped.clone(),
        conn: conn.state.clone(),
        grpc: pending.grpc_tally(),
    });
    Ok(resp.map(|b| ObservedBody::new(b, finish)))
}

fn header_bytes(req: &Request<Incoming>) -> u64 {
    let uri = req.uri();
    let head =
        req.method().as_str().len() + uri.path().len() + uri.query().map_or(0, str::len) + 12;
    let fields: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    (head + fields) as u64
}

async fn pipeline(
    snapshot: &Snapshot,
    gateway: &Gateway,
    conn: &Conn,
    req: Request<Incoming>,
    trace: &mut Trace,
) -> Result<Response<Incoming>, GatewayError> {
    let config = &snapshot.config;
    let metrics = &gateway.metrics;
    if header_bytes(&req) > config.limits.max_header_bytes {
        return Err(GatewayError::HeadersTooLarge);
    }
    if req.method() == Method::CONNECT {
        return Err(GatewayError::BadRequest("CONNECT is not supported"));
    }
    let h = req.headers();
    if !headers::transfer_coding_ok(h) {
        return Err(GatewayError::BadRequest(
            "Transfer-Encoding must be a single, final chunked",
        ));
    }
    let mut hosts = h.get_all(HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(GatewayError::BadRequest("more than one Host header"));
    }
    let mut auths = h.get_all(AUTHORIZATION).iter();
    if auths.next().is_some() && auths.next().is_some() {
        return Err(GatewayError::BadRequest(
            "more than one Authorization header",
        ));
    }
    // RFC 9112 3.2.2: an absolute-form target's authority wins over Host.
    let host: Option<HeaderValue> = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => host_header.cloned(),
    };
    if host.is_none() && req.version() == Version::HTTP_11 {
        return Err(GatewayError::BadRequest("missing Host header"));
    }
    let host_name = match &host {
        Some(v) => Some(
            v.to_str()
                .map(host_without_port)
                .map_err(|_| GatewayError::BadRequest("Host header is not valid"))?,
        ),
        None => None,
    };

    // Uri clones share their bytes; this frees `req` to move into `forward`.
    let uri = req.uri().clone();
    let normalized = path::normalize(uri.path())?;
    if let std::borrow::Cow::Owned(n) = &normalized {
        trace.normalized = Some(n.as_str().into());
    }
    let route = config
        .routes
        .find(host_name, req.method(), &path::route_key(&normalized))
        .ok_or(GatewayError::NoRoute)?;
    trace.route = Some(route.index);
    let credential = auth::credential(req.headers());
    let permit = match auth::authorize(route, &snapshot.keys, credential, auth::now_secs()) {
        Ok(p) => p,
        Err(e) => {
            // A known key that was refused (scope, expiry, revocation) is named in the log.
            if let (auth::Credential::ApiKey(token), true) = (credential, is_known_key(&e)) {
                if let Some(key) = snapshot.keys.lookup(&crate::keys::digest(token)) {
                    trace.key_id = Some(key.id_header.clone());
                    trace.service_account = Some(key.service_account_header.clone());
                }
            }
            return Err(e.into());
        }
    };
    match permit.key {
        Some(key) => {
            trace.outcome = Some(AuthOutcome::Allowed);
            trace.key_id = Some(key.id_header.clone());
            trace.service_account = Some(key.service_account_header.clone());
            if config.metrics_per_key {
                key.uses
                    .get_or_init(|| metrics.key_counter(&key.id))
                    .increment(1);
            }
        }
        None => trace.outcome = Some(AuthOutcome::Public),
    }

    let down = Downstream {
        path: &normalized,
        query: uri.query(),
        host,
        client: conn.peer.ip(),
        https: conn.https,
        version: req.version(),
        snapshots: &gateway.snapshot,
    };
    let forwarder = crate::forward::local(snapshot);
    trace.upstream = Some(route.upstream.authority.clone());
    let sent = Instant::now();
    let result = forwarder.forward(permit, req, down, &config.identity).await;
    trace.upstream_ms = Some(sent.elapsed().as_secs_f64() * 1000.0);
    Ok(result?)
}

/// True for refusals of a key that was found: scope, expiry, revocation.
fn is_known_key(e: &AuthError) -> bool {
    matches!(
        e,
        AuthError::InsufficientScope(_) | AuthError::Expired | AuthError::Revoked
    )
}

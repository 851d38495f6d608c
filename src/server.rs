//! The listener and the per-request pipeline: accept -> (tls) -> route -> authorize -> forward.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderValue, Method, Request, Response, Version};
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

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// An I/O stream that records when bytes last moved, for the idle watchdog.
struct TrackedIo<I> {
    inner: I,
    state: Arc<ConnState>,
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
            self.state.touch();
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
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
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
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
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
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
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

/// What every worker shares.
#[derive(Clone)]
struct Shared {
    gateway: Arc<Gateway>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    slots: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    limits: Limits,
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
    let config = gateway.snapshot.load().config.clone();
    let limits = config.limits.clone();
    let max = limits.max_connections;
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Shared {
        gateway: gateway.clone(),
        builder: Arc::new(builder(&limits)),
        tls,
        slots: Arc::new(Semaphore::new(max)),
        stop: stop_rx,
        limits,
    };
    let listener = listener.into_std()?;
    let mut workers = Vec::new();
    for i in 0..worker_count() {
        let (l, sh) = (listener.try_clone()?, shared.clone());
        let grace = config.shutdown_grace;
        workers.push(
            std::thread::Builder::new()
                .name(format!("keygate-worker-{i}"))
                .spawn(move || worker(l, sh, grace))?,
        );
    }
    drop(listener);
    gateway.ready.store(true, Ordering::Relaxed);
    shutdown.await;
    gateway.ready.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let _ = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    })
    .await;
    Ok(())
}

fn worker(listener: std::net::TcpListener, shared: Shared, grace: Duration) {
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
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
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
        // Drain: in-flight requests on this worker get up to the grace period.
        let max = shared.limits.max_connections;
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
    let gw = &shared.gateway;
    gw.metrics.active_connections.increment(1.0);
    let state = Arc::new(ConnState::default());
    state.touch();
    match &shared.tls {
        None => serve_tracked(&shared, stream, peer, false, state).await,
        Some(acceptor) => {
            let handshake = acceptor.accept(stream);
            match tokio::time::timeout(shared.limits.header_read_timeout, handshake).await {
                Ok(Ok(tls_stream)) => serve_tracked(&shared, tls_stream, peer, true, state).await,
                Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
    gw.metrics.active_connections.decrement(1.0);
    drop(permit);
}

/// Serves one (plain or TLS) stream with activity tracking for the idle watchdog.
async fn serve_tracked<I>(
    shared: &Shared,
    io: I,
    peer: SocketAddr,
    https: bool,
    state: Arc<ConnState>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TrackedIo {
        inner: io,
        state: state.clone(),
    };
    let conn = Conn { peer, https, state };
    let (gw, stop) = (shared.gateway.clone(), shared.stop.clone());
    serve_conn(gw, io, conn, &shared.builder, stop, &shared.limits).await;
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
    let svc = service_fn(move |req| handle(gw.clone(), conn.clone(), req));
    let c = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(c);
    // The connection is idle once no byte moved and no request was open for a whole
    // idle period, checked in quarters.
    let check = (limits.idle_timeout / 4).max(Duration::from_millis(50));
    let quarters_needed = u32::try_from(limits.idle_timeout.as_millis() / check.as_millis().max(1))
        .unwrap_or(4)
        .max(1);
    let mut quiet_checks = 0u32;
    let mut closing = false;
    loop {
        tokio::select! {
            res = c.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !closing => {
                c.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep(check), if !closing => {
                let active = state.active.swap(false, Ordering::Relaxed);
                if active || state.in_flight.load(Ordering::Relaxed) > 0 {
                    quiet_checks = 0;
                } else {
                    quiet_checks += 1;
                    if quiet_checks >= quarters_needed {
                        c.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
    }
}

/// What the pipeline learned, for metrics and the access log.
#[derive(Default)]
struct Trace {
    route: Option<usize>,
    key_id: Option<HeaderValue>,
    service_account: Option<HeaderValue>,
    outcome: Option<AuthOutcome>,
}

fn outcome_of(err: &GatewayError) -> AuthOutcome {
    match err {
        GatewayError::Auth(a) => match a {
            AuthError::Missing => AuthOutcome::Missing,
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

/// Handles one request; never fails, every error becomes a response.
async fn handle(
    gateway: Arc<Gateway>,
    conn: Conn,
    mut req: Request<Incoming>,
) -> Result<Response<ObservedBody>, Infallible> {
    let start = Instant::now();
    let arrived = SystemTime::now();
    conn.state.in_flight.fetch_add(1, Ordering::Relaxed);
    let snapshot = gateway.snapshot.load_full();
    let grpc = error::is_grpc(req.headers());
    let request_id = headers::ensure_request_id(req.headers_mut());
    let method = req.method().clone();
    let uri = req.uri().clone();
    let mut trace = Trace::default();
    let result = pipeline(&snapshot, &gateway.metrics, &conn, req, &mut trace).await;
    let stats = trace
        .route
        .and_then(|i| snapshot.route_stats.get(i))
        .unwrap_or(&gateway.metrics.unrouted);
    let (mut resp, upstream_status) = match result {
        Ok(r) => {
            let status = r.status().as_u16();
            (r.map(Either::Left), Some(status))
        }
        Err(e) => {
            if trace.outcome.is_none() {
                trace.outcome = Some(outcome_of(&e));
            }
            match &e {
                GatewayError::Forward(ForwardError::Unavailable) => {
                    stats.upstream_unavailable.increment(1)
                }
                GatewayError::Forward(ForwardError::Timeout) => stats.upstream_timeout.increment(1),
                _ => {}
            }
            (
                error::response(&e, &snapshot.config.www_authenticate, grpc).map(Either::Right),
                None,
            )
        }
    };
    resp.headers_mut()
        .insert(&headers::X_REQUEST_ID, request_id.clone());
    let outcome = trace.outcome.unwrap_or(AuthOutcome::NotChecked);
    let status = resp.status().as_u16();
    gateway.metrics.count_request(stats, status, outcome);
    let route = trace
        .route
        .and_then(|i| snapshot.config.routes.get(i))
        .map(|r| r.name.clone());
    let finish = Box::new(Finish {
        entry: Entry {
            time: arrived,
            request_id,
            client: conn.peer,
            method,
            uri,
            route,
            status,
            duration: 0.0,
            bytes: 0,
            key_id: trace.key_id,
            service_account: trace.service_account,
            auth: outcome,
            upstream_status,
        },
        start,
        duration: stats.duration.clone(),
        log: gateway.access_log.clone(),
        format: snapshot.config.log_format,
        dropped: gateway.metrics.access_log_dropped.clone(),
        conn: conn.state.clone(),
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
    metrics: &Metrics,
    conn: &Conn,
    req: Request<Incoming>,
    trace: &mut Trace,
) -> Result<Response<Incoming>, GatewayError> {
    let config = &snapshot.config;
    if header_bytes(&req) > config.limits.max_header_bytes {
        return Err(GatewayError::HeadersTooLarge);
    }
    if req.method() == Method::CONNECT {
        return Err(GatewayError::BadRequest("CONNECT is not supported"));
    }
    let h = req.headers();
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
    let route = config
        .routes
        .find(host_name, req.method(), &normalized)
        .ok_or(GatewayError::NoRoute)?;
    trace.route = Some(route.index);
    let permit = auth::authorize(
        route,
        &snapshot.keys,
        auth::credential(req.headers()),
        now_secs(),
    )?;
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
    };
    let forwarder = crate::forward::local(snapshot);
    Ok(forwarder
        .forward(permit, req, down, &config.identity)
        .await?)
}

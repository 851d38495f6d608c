//! The listener and the per-request pipeline: accept -> route -> authorize -> forward.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderValue, Method, Request, Response, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::auth;
use crate::error::{self, GatewayError};
use crate::forward::{Downstream, Forwarder};
use crate::headers;
use crate::path;
use crate::reload::{ReloadStats, Snapshot};
use crate::routes::host_without_port;

/// Response body: an upstream's stream or a gateway-made answer.
pub type Body = Either<Incoming, Full<Bytes>>;

/// Shared state of a running gateway.
pub struct Gateway {
    /// Current routes and keys; one lock-free load per request.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Pooled upstream clients.
    pub forwarder: Forwarder,
    /// Reload outcomes.
    pub reload_stats: Arc<ReloadStats>,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Serves connections from `listener` until `shutdown` resolves, then drains for `grace`.
pub async fn accept_loop(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(hyper_util::rt::TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let gw = gateway.clone();
                let svc = service_fn(move |req| handle(gw.clone(), peer, req));
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace elapsed with requests still in flight");
        }
    }
}

/// Handles one request; never fails, every error becomes a response.
pub async fn handle(
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let snapshot = gateway.snapshot.load_full();
    let grpc = error::is_grpc(req.headers());
    let request_id = headers::ensure_request_id(req.headers_mut());
    let mut resp = match pipeline(&gateway, &snapshot, peer, req).await {
        Ok(r) => r.map(Either::Left),
        Err(e) => {
            tracing::debug!(code = e.code(), "request refused");
            error::response(&e, &snapshot.config.www_authenticate, grpc).map(Either::Right)
        }
    };
    resp.headers_mut()
        .insert(&headers::X_REQUEST_ID, request_id);
    Ok(resp)
}

async fn pipeline(
    gateway: &Gateway,
    snapshot: &Snapshot,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, GatewayError> {
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
    let config = &snapshot.config;
    let route = config
        .routes
        .find(host_name, req.method(), &normalized)
        .ok_or(GatewayError::NoRoute)?;
    let permit = auth::authorize(
        route,
        &snapshot.keys,
        auth::credential(req.headers()),
        now_secs(),
    )?;

    let down = Downstream {
        path: &normalized,
        query: uri.query(),
        host,
        client: peer.ip(),
        https: false,
    };
    Ok(gateway
        .forwarder
        .forward(permit, req, down, &config.identity)
        .await?)
}

//! The admin listener: `/healthz` (alive), `/readyz` (loaded and accepting), `/metrics`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// What the admin endpoints read: readiness, and a renderer for `/metrics`.
pub struct Admin {
    /// True while the gateway accepts and serves.
    pub ready: Arc<AtomicBool>,
    /// Renders the Prometheus text from the live state.
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn answer(
    gw: Arc<Admin>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if gw.ready.load(Ordering::Relaxed) => {
            text(StatusCode::OK, "text/plain", "ready\n")
        }
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        "/metrics" => text(StatusCode::OK, "text/plain; version=0.0.4", (gw.metrics)()),
        _ => text(
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"error":"no_route","message":"admin endpoints: /healthz /readyz /metrics"}"#,
        ),
    })
}

/// Serves the admin endpoints until the task is dropped.
pub async fn run(admin: Arc<Admin>, listener: TcpListener) {
    serve_plain(listener, move || {
        let admin = admin.clone();
        service_fn(move |req| answer(admin.clone(), req))
    })
    .await;
}

/// A plain HTTP/1.1 + h2c accept loop for small side services (admin, the demo's echo):
/// one connection task each, no limits beyond hyper's own.
pub async fn serve_plain<S, B>(listener: TcpListener, make: impl Fn() -> S)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let svc = make();
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

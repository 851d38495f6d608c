//! The admin listener: `/healthz` (alive), `/readyz` (loaded and accepting), `/metrics`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::server::Gateway;

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
    gw: Arc<Gateway>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if gw.ready.load(Ordering::Relaxed) => {
            text(StatusCode::OK, "text/plain", "ready\n")
        }
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        "/metrics" => {
            let snap = gw.snapshot.load_full();
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                gw.metrics.render(&snap, &gw.reload_stats),
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"error":"no_route","message":"admin endpoints: /healthz /readyz /metrics"}"#,
        ),
    })
}

/// Serves the admin endpoints until the task is dropped.
pub async fn run(gw: Arc<Gateway>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(gw.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

//! Upstream clients: one pooled HTTP/1.1 client for `http://` routes, one per h2c or https
//! route pinned to its upstream, built per worker thread and per config.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::config::Config;
use crate::control::snapshot::Snapshot;
use crate::proxy::forward::{Failure, ForwardError, RequestBody};
use crate::routes::{Route, UpstreamScheme};

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

fn https_client(connect_timeout: Duration, route: &Route) -> Result<HttpsClient, String> {
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

    /// True when the route has its own client, which takes the client's host as `:authority`.
    pub(crate) fn pinned(&self, route: &Route) -> bool {
        matches!(self.by_route.get(route.index), Some(Some(_)))
    }

    /// Starts sending `req` on the route's client.
    pub(crate) fn send(&self, route: &Route, req: Request<RequestBody>) -> ResponseFuture {
        match self.by_route.get(route.index).and_then(Option::as_ref) {
            None => self.http1.request(req),
            Some(RouteClient::H2c(c)) => c.request(req),
            Some(RouteClient::Https(c)) => c.request(req),
        }
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

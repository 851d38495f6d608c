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
use crate::routes::UpstreamScheme;

/// Deadline for an upstream's response head when the route sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an upstream exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// Refused, reset, unreachable, or answered with garbage.
    #[error("the upstream service is unavailable")]
    Unavailable,
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
            Poll::Ready(Some(Ok(frame))) => {
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

type HttpsClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// Pooled upstream clients, one per protocol (and per route with its own TLS settings).
pub struct Forwarder {
    http1: Client<HttpConnector, RequestBody>,
    h2c: Client<HttpConnector, RequestBody>,
    https: HttpsClient,
    https_by_route: Vec<Option<HttpsClient>>,
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
}

fn connector(connect_timeout: Duration) -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(connect_timeout));
    c.set_keepalive(Some(Duration::from_secs(60)));
    c.enforce_http(false);
    c
}

fn https_client(
    connect_timeout: Duration,
    ca_file: Option<&std::path::Path>,
    server_name: Option<&str>,
) -> Result<HttpsClient, String> {
    let tls = crate::tls::client_config(ca_file)?;
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let builder = match server_name {
        Some(n) => {
            let name = rustls::pki_types::ServerName::try_from(n.to_string())
                .map_err(|_| format!("invalid tls_server_name {n:?}"))?;
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    let conn = builder
        .enable_http1()
        .enable_http2()
        .wrap_connector(connector(connect_timeout));
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .set_host(false)
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
        let h2c = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_only(true)
            .set_host(false)
            .build(connector(ct));
        let https = https_client(ct, None, None)?;
        let https_by_route = config
            .routes
            .iter()
            .map(|r| {
                let t = &r.upstream_tls;
                if t.ca_file.is_none() && t.server_name.is_none() {
                    return Ok(None);
                }
                https_client(ct, t.ca_file.as_deref(), t.server_name.as_deref()).map(Some)
            })
            .collect::<Result<_, String>>()?;
        Ok(Forwarder {
            http1,
            h2c,
            https,
            https_by_route,
        })
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
        let upgrade = headers::upgrade_request(&parts.headers).cloned();
        let h = &mut parts.headers;
        headers::strip_hop_by_hop(h, true);
        // A key never reaches an upstream; other schemes pass through on public routes.
        let carries_key = matches!(
            auth::credential(h),
            Credential::ApiKey(_) | Credential::MalformedApiKey
        );
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
        if let Some(host) = down.host {
            h.insert(HOST, host);
        }
        let downstream_upgrade = match &upgrade {
            Some(proto) => {
                h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                h.insert(UPGRADE, proto.clone());
                parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
            }
            None => None,
        };
        parts.uri = upstream_uri(permit, down.path, down.query)?;
        let body = RequestBody {
            inner: body,
            remaining: route.max_body.unwrap_or(u64::MAX),
            fault: fault.clone(),
        };
        parts.version = match route.upstream.scheme {
            UpstreamScheme::H2c => Version::HTTP_2,
            UpstreamScheme::Http | UpstreamScheme::Https => Version::HTTP_11,
        };
        let req = Request::from_parts(parts, body);
        let send = match route.upstream.scheme {
            UpstreamScheme::Http => self.http1.request(req),
            UpstreamScheme::H2c => self.h2c.request(req),
            UpstreamScheme::Https => match self
                .https_by_route
                .get(route.index)
                .and_then(Option::as_ref)
            {
                Some(c) => c.request(req),
                None => self.https.request(req),
            },
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
                return Err(ForwardError::Unavailable);
            }
            Ok(Ok(resp)) => resp,
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let proto = resp.headers().get(UPGRADE).cloned();
            headers::strip_hop_by_hop(resp.headers_mut(), false);
            if let (Some(down_up), Some(proto)) = (downstream_upgrade, proto) {
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("upgrade"));
                resp.headers_mut().insert(UPGRADE, proto);
                let up_up = hyper::upgrade::on(&mut resp);
                tokio::spawn(splice(down_up, up_up));
            }
            return Ok(resp);
        }
        headers::strip_hop_by_hop(resp.headers_mut(), false);
        Ok(resp)
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
async fn splice(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}

fn upstream_uri(permit: Permit<'_>, path: &str, query: Option<&str>) -> Result<Uri, ForwardError> {
    let route = permit.route;
    let up = &route.upstream;
    let path = route.upstream_path(path);
    let scheme = match up.scheme {
        UpstreamScheme::Https => "https://",
        UpstreamScheme::Http | UpstreamScheme::H2c => "http://",
    };
    let mut s = String::with_capacity(
        scheme.len()
            + up.authority.as_str().len()
            + up.base_path.len()
            + path.len()
            + query.map_or(0, |q| q.len() + 1),
    );
    s.push_str(scheme);
    s.push_str(up.authority.as_str());
    s.push_str(&up.base_path);
    s.push_str(path);
    if let Some(q) = query {
        s.push('?');
        s.push_str(q);
    }
    Uri::try_from(s).map_err(|_| ForwardError::Unavailable)
}

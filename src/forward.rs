//! Forwarding: builds the upstream request from a [`Permit`] and sends it on a pooled client.

use std::net::IpAddr;
use std::time::Duration;

use http::header::{HeaderValue, AUTHORIZATION, HOST};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::auth::{self, Credential, Permit};
use crate::config::IdentityHeaders;
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
}

/// Pooled upstream clients, one per protocol.
pub struct Forwarder {
    http1: Client<HttpConnector, Incoming>,
    h2c: Client<HttpConnector, Incoming>,
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

impl Forwarder {
    /// Builds the pooled clients.
    pub fn new(connect_timeout: Duration) -> Forwarder {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .set_host(false)
            .build(connector.clone());
        let h2c = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_only(true)
            .set_host(false)
            .build(connector);
        Forwarder { http1, h2c }
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
        let h = &mut parts.headers;
        headers::strip_hop_by_hop(h, true);
        // A key never reaches an upstream; other schemes pass through on public routes.
        let carries_key = matches!(
            auth::credential(h),
            Credential::ApiKey(_) | Credential::MalformedApiKey
        );
        if !route.public || carries_key {
            h.remove(AUTHORIZATION);
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
        parts.uri = upstream_uri(permit, down.path, down.query)?;
        let client = match route.upstream.scheme {
            UpstreamScheme::Http => {
                parts.version = Version::HTTP_11;
                &self.http1
            }
            UpstreamScheme::H2c => {
                parts.version = Version::HTTP_2;
                &self.h2c
            }
        };
        let send = client.request(Request::from_parts(parts, body));
        let deadline = route.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let mut resp = match tokio::time::timeout(deadline, send).await {
            Err(_) => return Err(ForwardError::Timeout),
            Ok(Err(e)) => {
                tracing::debug!(route = %route.name, error = %e, "upstream request failed");
                return Err(ForwardError::Unavailable);
            }
            Ok(Ok(resp)) => resp,
        };
        headers::strip_hop_by_hop(resp.headers_mut(), false);
        Ok(resp)
    }
}

fn upstream_uri(permit: Permit<'_>, path: &str, query: Option<&str>) -> Result<Uri, ForwardError> {
    let route = permit.route;
    let up = &route.upstream;
    let path = route.upstream_path(path);
    let mut s = String::with_capacity(
        8 + up.authority.as_str().len()
            + up.base_path.len()
            + path.len()
            + query.map_or(0, |q| q.len() + 1),
    );
    s.push_str("http://");
    s.push_str(up.authority.as_str());
    s.push_str(&up.base_path);
    s.push_str(path);
    if let Some(q) = query {
        s.push('?');
        s.push_str(q);
    }
    Uri::try_from(s).map_err(|_| ForwardError::Unavailable)
}

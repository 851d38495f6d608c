//! Forwarding: builds the upstream request from a [`Permit`] and sends it on a pooled client;
//! enforces the route's body limit and timeout; splices upgraded (WebSocket) connections.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, HOST, UPGRADE};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;

use crate::config::routes::UpstreamScheme;
use crate::config::IdentityHeaders;
use crate::proxy::authorize::Permit;
use crate::proxy::pool::{self, UpstreamBody};
use crate::proxy::tunnel;
use crate::proxy::upstream::{
    BodyFault, Failure, ForwardError, Forwarder, RequestBody, SendError, DEFAULT_TIMEOUT,
};
use crate::proxy::{multiplex, resend};
use crate::wire::headers;

/// Facts about the downstream request that forwarding needs.
pub struct Downstream<'a> {
    /// Normalized path.
    pub path: &'a str,
    /// Query string, untouched.
    pub query: Option<&'a str>,
    /// The request target as received, reused when the upstream gets it unchanged.
    pub target: Option<&'a http::uri::PathAndQuery>,
    /// Host the client addressed (forwarded as `Host` and `X-Forwarded-Host`).
    pub host: Option<HeaderValue>,
    /// The peer's address, appended to `X-Forwarded-For`.
    pub client: IpAddr,
    /// The peer is a trusted proxy: its `X-Forwarded-*` headers are kept.
    pub via_trusted_proxy: bool,
    /// Whether the client connection was TLS.
    pub https: bool,
    /// The client's protocol version, which the response keeps whatever the upstream spoke.
    pub version: Version,
    /// The live snapshots, so an upgraded connection can end with its key.
    pub snapshots: &'a Arc<arc_swap::ArcSwap<crate::control::snapshot::Snapshot>>,
}

/// Sends the request upstream as the permit allows and returns the upstream's response.
pub async fn forward(
    clients: &Forwarder,
    permit: Permit<'_>,
    req: Request<Incoming>,
    down: Downstream<'_>,
    identity: &IdentityHeaders,
) -> Result<Response<UpstreamBody>, ForwardError> {
    let route = permit.route;
    let (mut parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(max), Some(len)) = (route.max_body, declared) {
        if len > max {
            return Err(ForwardError::BodyTooLarge);
        }
    }
    // Bodyless requests (most GETs) need no fault tracking and allocate nothing for it.
    let fault = (!body.is_end_stream()).then(|| Arc::new(BodyFault::default()));
    let websocket = route.websocket && headers::is_websocket_upgrade(&parts.headers);
    let pinned = clients.pinned(route);
    let uri_host = upstream_headers(&mut parts.headers, permit, &down, identity, pinned);
    let downstream_upgrade = if websocket {
        let h = &mut parts.headers;
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    // A key sent as a query parameter is cut out; the rest of the query is kept as sent.
    let query = match permit.strip {
        Some(carrier) => carrier.strip_query(down.query),
        None => down.query.map(std::borrow::Cow::Borrowed),
    };
    let own = clients.own_connection(route, websocket);
    parts.uri = upstream_uri(permit, uri_host.as_ref(), &down, query.as_deref(), own)?;
    parts.version = match route.upstream.scheme {
        UpstreamScheme::H2c => Version::HTTP_2,
        UpstreamScheme::Http | UpstreamScheme::Https => Version::HTTP_11,
    };
    let body = RequestBody {
        inner: Some(body),
        remaining: route.max_body.unwrap_or(u64::MAX),
        fault: fault.clone(),
        identity: fault
            .is_some()
            .then(|| [identity.key_id.clone(), identity.service_account.clone()]),
        kept: None,
    };
    let req = Request::from_parts(parts, body);
    let deadline = route.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let multiplexed = clients.shared_connection(route, websocket);
    // Pinned where it is built: `timeout` then holds a pointer, not a copy of the whole
    // exchange's state, which it would otherwise copy in and out on every request.
    let send = std::pin::pin!(async move {
        if own {
            pool::send(clients.connector(), &route.upstream.authority, req).await
        } else if multiplexed {
            resend::resending(req, |req| {
                multiplex::send(clients, &route.upstream.authority, req)
            })
            .await
        } else if websocket {
            // An upgrade is HTTP/1.1 (RFC 9113 8.6): no stream to be refused.
            legacy(clients.start(route, req)).await
        } else {
            // https upstreams may speak HTTP/2 too (ALPN).
            resend::resending(req, |req| legacy(clients.start(route, req))).await
        }
    });
    let mut resp = match tokio::time::timeout(deadline, send).await {
        Err(_) => return Err(ForwardError::Timeout),
        Ok(Err(e)) => return Err(blame(&e, fault.as_deref(), route)),
        Ok(Ok(resp)) => resp,
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        resp.body_mut().forget_connection();
        return switch(resp, downstream_upgrade, permit, &down);
    }
    headers::strip_hop_by_hop(resp.headers_mut(), false);
    if down.version == Version::HTTP_2 {
        // Never indexed in HPACK: a new Date each second fills h2's table with dates, and its
        // encoder compares each response's Date with every one held (oldest first), which
        // grows to about 60 comparisons a response once the table is full.
        if let Some(date) = resp.headers_mut().get_mut(http::header::DATE) {
            date.set_sensitive(true);
        }
    }
    // An HTTP/1.0 upstream must not make an HTTP/1.1 client see an HTTP/1.0 status line.
    *resp.version_mut() = down.version;
    Ok(resp)
}

/// An exchange on hyper-util's client, for routes not on this worker's own connections.
async fn legacy(
    pending: hyper_util::client::legacy::ResponseFuture,
) -> Result<Response<UpstreamBody>, SendError> {
    let resp = pending.await.map_err(SendError::Legacy)?;
    Ok(resp.map(UpstreamBody::plain))
}

/// Rewrites the client's headers for the upstream; returns the `:authority` a pinned
/// (HTTP/2-capable) client must use, which is the client's host.
fn upstream_headers(
    h: &mut http::HeaderMap,
    permit: Permit<'_>,
    down: &Downstream<'_>,
    identity: &IdentityHeaders,
    pinned: bool,
) -> Option<http::uri::Authority> {
    headers::strip_hop_by_hop(h, true);
    // A key never reaches an upstream: strip exactly what carried it.
    if let Some(carrier) = permit.strip {
        carrier.strip(h);
    }
    if let Some(v) = h.get_mut(AUTHORIZATION) {
        // Another scheme's credential passes through on public routes; keep it out of
        // HPACK tables.
        v.set_sensitive(true);
    }
    // The gateway's identity headers replace any the client sent (insert drops every
    // earlier value); a public route forwards none.
    match permit.key {
        Some(key) => {
            // Room for the two identity and three X-Forwarded-* fields added below, so the
            // map grows at most once instead of per insert.
            h.reserve(5);
            h.insert(&identity.key_id, key.id_header.clone());
            h.insert(
                &identity.service_account,
                key.service_account_header.clone(),
            );
        }
        None => {
            h.remove(&identity.key_id);
            h.remove(&identity.service_account);
        }
    }
    headers::set_forwarded(
        h,
        down.client,
        down.https,
        down.host.as_ref(),
        down.via_trusted_proxy,
    );
    match (pinned, &down.host) {
        // HTTP/2 upstreams get the client's host as `:authority`, and no Host header.
        (true, Some(host)) => {
            h.remove(HOST);
            http::uri::Authority::try_from(host.as_bytes()).ok()
        }
        (true, None) => None,
        (false, host) => {
            // Usually the client's own Host, already in place.
            if let Some(host) = host.as_ref().filter(|v| h.get(HOST) != Some(*v)) {
                h.insert(HOST, host.clone());
            }
            None
        }
    }
}

/// Which side a failed exchange is blamed on: the client's body, or the upstream.
fn blame(
    e: &SendError,
    fault: Option<&BodyFault>,
    route: &crate::config::routes::Route,
) -> ForwardError {
    if let Some(f) = fault {
        if f.too_large.load(Ordering::Relaxed) {
            return ForwardError::BodyTooLarge;
        }
        if f.client_error.load(Ordering::Relaxed) {
            return ForwardError::BadBody;
        }
    }
    tracing::debug!(route = %route.name, error = %e, "upstream request failed");
    ForwardError::Unavailable(Failure::of_send(e))
}

/// A 101 from the upstream: spliced when the client asked for a WebSocket and the upstream
/// agreed; anything else would be a tunnel past every check, and is a 502.
fn switch(
    mut resp: Response<UpstreamBody>,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    permit: Permit<'_>,
    down: &Downstream<'_>,
) -> Result<Response<UpstreamBody>, ForwardError> {
    let agreed = resp
        .headers()
        .get(UPGRADE)
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let Some(down_up) = downstream_upgrade.filter(|_| agreed) else {
        tracing::debug!(route = %permit.route.name, "upstream switched protocols unasked");
        return Err(ForwardError::Unavailable(Failure::BadResponse));
    };
    headers::strip_hop_by_hop(resp.headers_mut(), false);
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static("websocket"));
    let up_up = hyper::upgrade::on(&mut resp);
    let watch = permit.digest.map(|digest| tunnel::KeyWatch {
        snapshots: down.snapshots.clone(),
        digest,
        route: permit.route.name.clone(),
    });
    tokio::spawn(tunnel::splice(down_up, up_up, watch));
    Ok(resp)
}

/// The upstream request's URI; `host` replaces the upstream's authority for per-route clients.
/// On the worker's own connections (`origin_form`) it is what goes on the wire, path and query
/// alone; hyper-util's clients take the absolute form and pick their connection by it.
fn upstream_uri(
    permit: Permit<'_>,
    host: Option<&http::uri::Authority>,
    down: &Downstream<'_>,
    query: Option<&str>,
    origin_form: bool,
) -> Result<Uri, ForwardError> {
    let route = permit.route;
    let up = &route.upstream;
    let path = route.upstream_path(down.path);
    // Most requests go upstream as they came: their parsed target shares the request's bytes,
    // so reusing it saves building and re-parsing a string per request.
    let target = match down.target {
        Some(t)
            if up.base_path.is_empty()
                && t.as_str().starts_with('/')
                && t.path() == path
                && t.query() == query =>
        {
            t.clone()
        }
        _ => {
            let mut s = String::with_capacity(
                up.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
            );
            s.push_str(&up.base_path);
            s.push_str(path);
            if let Some(q) = query {
                s.push('?');
                s.push_str(q);
            }
            http::uri::PathAndQuery::try_from(s)
                .map_err(|_| ForwardError::Unavailable(Failure::Connect))?
        }
    };
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(target);
    if origin_form {
        return Uri::from_parts(parts).map_err(|_| ForwardError::Unavailable(Failure::Connect));
    }
    parts.scheme = Some(match up.scheme {
        UpstreamScheme::Https => http::uri::Scheme::HTTPS,
        UpstreamScheme::Http | UpstreamScheme::H2c => http::uri::Scheme::HTTP,
    });
    parts.authority = Some(host.unwrap_or(&up.authority).clone());
    Uri::from_parts(parts).map_err(|_| ForwardError::Unavailable(Failure::Connect))
}

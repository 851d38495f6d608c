//! The request's journey, top to bottom: ingress checks -> route -> credential -> authorize ->
//! forward -> respond. Every error becomes a response in `error`; every request, answered or
//! abandoned, is counted and logged once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use http::header::HOST;
use http::{HeaderValue, Method, Request, Response, Version};
use http_body_util::Either;
use hyper::body::Incoming;

use crate::config::routes::{host_without_port, Preflight, Route};
use crate::config::Config;
use crate::control::snapshot::Snapshot;
use crate::ops::accesslog::{AccessLog, Entry, HeadText};
use crate::ops::metrics::{AuthOutcome, Metrics};
use crate::proxy::authorize::{self, AuthError, Permit};
use crate::proxy::credential::{self, Credential};
use crate::proxy::error::{self, GatewayError};
use crate::proxy::forward::{self, Downstream};
use crate::proxy::observe::{ConnState, Finish, ObservedBody};
use crate::proxy::policy::{self, PolicyError};
use crate::proxy::pool::UpstreamBody;
use crate::proxy::upstream::{self, ForwardError};
use crate::wire::{headers, path};

/// Shared state of a running gateway.
pub struct Gateway {
    /// Current routes and keys; one lock-free load per request.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Metric registry.
    pub metrics: Arc<Metrics>,
    /// Access log writer.
    pub access_log: AccessLog,
    /// True while the listener accepts and the snapshot is loaded; `/readyz` reads it.
    pub ready: Arc<AtomicBool>,
}

/// Facts about the connection a request came on.
#[derive(Clone)]
pub(crate) struct Conn {
    pub(crate) peer: SocketAddr,
    pub(crate) https: bool,
    pub(crate) state: Arc<ConnState>,
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
    upstream_time: Option<std::time::Duration>,
    grpc_status: Option<u16>,
    /// The client as `trusted_proxies` resolves it, when it was resolved.
    client: Option<std::net::IpAddr>,
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
        GatewayError::Policy(p) => match p {
            PolicyError::ClientNotAllowed => AuthOutcome::ClientNotAllowed,
            PolicyError::RateLimited { .. } => AuthOutcome::RateLimited,
            PolicyError::QuotaExceeded { .. } => AuthOutcome::QuotaExceeded,
        },
        GatewayError::BadRequest(_)
        | GatewayError::Credential(_)
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
    /// Copied at arrival, so a queued log entry pins none of the connection's buffers.
    head: HeadText,
    grpc: bool,
    trace: Trace,
    answered: bool,
}

/// Status logged for a request whose client closed the connection before the response.
const CLIENT_CLOSED: u16 = 499;

impl Pending {
    fn stats(&self) -> &crate::ops::metrics::RouteStats {
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
    ) -> Box<Entry> {
        let outcome = self.trace.outcome.unwrap_or(AuthOutcome::NotChecked);
        self.gateway
            .metrics
            .count_request(self.stats(), status, outcome);
        let route = self
            .trace
            .route
            .and_then(|i| self.snapshot.config.routes.get(i))
            .map(|r| r.name.clone());
        Box::new(Entry {
            time: self.arrived,
            head: std::mem::take(&mut self.head),
            client: self.peer,
            forwarded_client: self
                .trace
                .client
                .filter(|ip| *ip != crate::wire::client::canonical(self.peer.ip())),
            method: std::mem::replace(&mut self.method, Method::GET),
            route,
            status,
            duration: std::time::Duration::ZERO,
            bytes: 0,
            key_id: self.trace.key_id.take(),
            service_account: self.trace.service_account.take(),
            auth: outcome,
            upstream_status,
            normalized: self.trace.normalized.take(),
            upstream: self.trace.upstream.take(),
            upstream_time: self.trace.upstream_time,
            error,
            grpc_status: self.trace.grpc_status,
        })
    }

    /// Records a refusal and builds its response; returns the upstream failure reason, if any.
    fn refuse(
        &mut self,
        e: &GatewayError,
    ) -> (
        Response<http_body_util::Full<bytes::Bytes>>,
        Option<&'static str>,
    ) {
        // A policy refusal comes after the key was allowed: it overrides that outcome.
        if self.trace.outcome.is_none() || matches!(e, GatewayError::Policy(_)) {
            self.trace.outcome = Some(outcome_of(e));
        }
        if self.grpc {
            self.trace.grpc_status = Some(u16::from(e.grpc_code()));
        }
        let stats = self.stats();
        let reason = match e {
            GatewayError::Forward(ForwardError::Unavailable(why)) => {
                stats.upstream_unavailable.increment(1);
                Some(why.as_str())
            }
            GatewayError::Forward(ForwardError::Timeout) => {
                stats.upstream_timeout.increment(1);
                Some("timeout")
            }
            GatewayError::Policy(_) => Some(e.code()),
            _ => None,
        };
        let config = &self.snapshot.config;
        let challenge = config.challenge(self.trace.route);
        (error::response(e, challenge, self.grpc), reason)
    }

    /// Where a gRPC request's final status is counted, for gRPC requests only.
    fn grpc_tally(&self) -> Option<crate::proxy::observe::GrpcTally> {
        self.grpc.then(|| crate::proxy::observe::GrpcTally {
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
        let took = self.start.elapsed();
        self.stats().duration.record(took.as_secs_f64());
        entry.duration = took;
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
pub(crate) async fn handle(
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
    // The host the request addressed, as routing reads it: HTTP/2's `:authority` (and an
    // absolute-form target's) before the Host header. Userinfo, which `ingress` refuses, is
    // never logged.
    let host = match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req.headers().get(HOST).and_then(|v| v.to_str().ok()),
    }
    .and_then(|h| h.rsplit('@').next());
    let head = HeadText::new(
        &request_id,
        req.uri().path(),
        host,
        req.headers().get(http::header::USER_AGENT),
    );
    let mut pending = Pending {
        gateway,
        snapshot,
        conn: conn.state.clone(),
        peer: conn.peer,
        start,
        arrived,
        request_id,
        method: req.method().clone(),
        head,
        grpc,
        trace: Trace::default(),
        answered: false,
    };
    let p = &mut pending;
    // Keys' expiry and last use go by the arrival second: one clock read fewer per request.
    let now = crate::keys::unix_secs(arrived);
    let result = pipeline(&p.snapshot, &p.gateway, &conn, req, now, &mut p.trace).await;
    let (mut resp, upstream_status, error) = match result {
        Ok(r) => {
            let status = r.status().as_u16();
            if grpc {
                // A trailers-only answer carries its status in the head.
                pending.trace.grpc_status = crate::proxy::observe::grpc_status(r.headers());
            }
            (r.map(Either::Left), Some(status), None)
        }
        Err(e) => {
            let (resp, error) = pending.refuse(&e);
            (resp.map(Either::Right), None, error)
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
        conn: conn.state,
        grpc: pending.grpc_tally(),
    });
    Ok(resp.map(|b| ObservedBody::new(b, finish)))
}

fn header_bytes<B>(req: &Request<B>) -> u64 {
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

/// The request's journey, one stage a line; each stage may end it with a refusal.
async fn pipeline(
    snapshot: &Snapshot,
    gateway: &Gateway,
    conn: &Conn,
    req: Request<Incoming>,
    now: i64,
    trace: &mut Trace,
) -> Result<Response<UpstreamBody>, GatewayError> {
    let config = &snapshot.config;
    let host = ingress(&req, config.limits.max_header_bytes)?;
    let client =
        crate::wire::client::resolve(conn.peer.ip(), req.headers(), &config.trusted_proxies);
    if client.via_trusted_proxy {
        trace.client = Some(client.ip);
    }
    credential::single_authorization(req.headers())?;
    // Uri clones share their bytes; this frees `req` to move into `forward`.
    let uri = req.uri().clone();
    let normalized = path::normalize(uri.path())?;
    if let std::borrow::Cow::Owned(n) = &normalized {
        trace.normalized = Some(n.as_str().into());
    }
    let route = choose_route(config, host.as_ref(), req.method(), &normalized)?;
    trace.route = Some(route.index);
    let found = credential::extract(req.headers(), uri.query(), &route.key_sources)?;
    let preflight =
        route.preflight == Preflight::Pass && headers::is_preflight(req.method(), req.headers());
    let permit = admit(snapshot, route, &found, preflight, now, trace)?;
    policy::check(&permit, &snapshot.meters, client.ip)?;
    let uses = permit
        .key
        .and_then(|k| Some((k, snapshot.key_uses.get(k.slot as usize)?)));
    if let Some((key, uses)) = uses {
        uses.get_or_init(|| gateway.metrics.key_counter(key.id()))
            .increment(1);
    }
    let down = Downstream {
        path: &normalized,
        query: uri.query(),
        target: uri.path_and_query(),
        host,
        client: conn.peer.ip(),
        via_trusted_proxy: client.via_trusted_proxy,
        https: conn.https,
        version: req.version(),
        snapshots: &gateway.snapshot,
    };
    let clients = upstream::local(snapshot)?;
    trace.upstream = Some(route.upstream.authority.clone());
    let sent = Instant::now();
    let result = forward::forward(&clients, permit, req, down, &config.identity).await;
    trace.upstream_time = Some(sent.elapsed());
    Ok(result?)
}

/// Ingress checks on the head alone; returns the host the client addressed.
pub(crate) fn ingress<B>(
    req: &Request<B>,
    max_header_bytes: u64,
) -> Result<Option<HeaderValue>, GatewayError> {
    if header_bytes(req) > max_header_bytes {
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
    // RFC 9112 3.2.2: an absolute-form target's authority wins over Host.
    let host = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => host_header.cloned(),
    };
    if host.is_none() && req.version() == Version::HTTP_11 {
        return Err(GatewayError::BadRequest("missing Host header"));
    }
    if host.as_ref().is_some_and(|v| v.to_str().is_err()) {
        return Err(GatewayError::BadRequest("Host header is not valid"));
    }
    // RFC 9110 4.2.4: userinfo in a host is an error; it would reach the upstream and logs.
    if host.as_ref().is_some_and(|v| v.as_bytes().contains(&b'@')) {
        return Err(GatewayError::BadRequest("the host must not carry userinfo"));
    }
    Ok(host)
}

/// Routing: host, method and the normalized path without `;parameters`.
pub(crate) fn choose_route<'c>(
    config: &'c Config,
    host: Option<&HeaderValue>,
    method: &Method,
    normalized: &str,
) -> Result<&'c Route, GatewayError> {
    let host_name = host.and_then(|v| v.to_str().ok()).map(host_without_port);
    config
        .routes
        .find(host_name, method, &path::route_key(normalized))
        .ok_or(GatewayError::NoRoute)
}

/// Authorization, with what the log needs to know about the key either way.
fn admit<'s>(
    snapshot: &'s Snapshot,
    route: &'s Route,
    found: &credential::Found<'_, 's>,
    preflight: bool,
    now: i64,
    trace: &mut Trace,
) -> Result<Permit<'s>, GatewayError> {
    match authorize::authorize(route, &snapshot.keys, found, preflight, now) {
        Ok(permit) => {
            trace.outcome = Some(match permit.key {
                Some(key) => {
                    trace.key_id = Some(key.id_header.clone());
                    trace.service_account = Some(key.service_account_header.clone());
                    AuthOutcome::Allowed
                }
                None => AuthOutcome::Public,
            });
            Ok(permit)
        }
        Err(e) => {
            // A known key that was refused (scope, expiry, revocation) is named in the log.
            if let (Credential::ApiKey(token), true) = (&found.credential, is_known_key(&e)) {
                if let Some(key) = snapshot.keys.lookup(&crate::keys::digest(token)) {
                    trace.key_id = Some(key.id_header.clone());
                    trace.service_account = Some(key.service_account_header.clone());
                }
            }
            Err(e.into())
        }
    }
}

/// True for refusals of a key that was found: scope, expiry, revocation.
fn is_known_key(e: &AuthError) -> bool {
    matches!(
        e,
        AuthError::InsufficientScope(_) | AuthError::Expired | AuthError::Revoked
    )
}

#[cfg(test)]
mod tests {
    //! The stages without sockets: requests are built in memory, with any body type.
    use super::*;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            Path::new("t/keygate.yaml"),
            "keys_file: k.yaml\nroutes:\n  - name: p\n    path_prefix: /p/\n    upstream: http://127.0.0.1:1\n    scopes: [p.read]\n  - name: all\n    path_prefix: /\n    upstream: http://127.0.0.1:1\n    public: true\n",
        )
        .unwrap()
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn ingress_refuses_what_no_route_should_see() {
        let host = [("host", "a")];
        assert!(ingress(&req("GET", "/x", &host), 65536).is_ok());
        for (r, why) in [
            (
                req("GET", "/x", &[("host", "a"), ("host", "b")]),
                "two Host",
            ),
            (req("GET", "/x", &[]), "no Host"),
            (
                req(
                    "POST",
                    "/x",
                    &[("host", "a"), ("transfer-encoding", "chunked, chunked")],
                ),
                "chunked twice",
            ),
        ] {
            assert!(
                matches!(ingress(&r, 65536), Err(GatewayError::BadRequest(_))),
                "{why}"
            );
        }
        let big = "a".repeat(100);
        assert!(matches!(
            ingress(&req("GET", "/x", &[("host", "a"), ("x-big", &big)]), 64),
            Err(GatewayError::HeadersTooLarge)
        ));
    }

    #[test]
    fn routing_ignores_parameters_and_uses_the_normalized_path() {
        let cfg = config();
        let host = HeaderValue::from_static("a");
        let pick = |p: &str| {
            let n = path::normalize(p).unwrap();
            choose_route(&cfg, Some(&host), &Method::GET, &n).map(|r| r.name.to_string())
        };
        assert_eq!(pick("/p;x/secret").unwrap(), "p");
        assert_eq!(pick("/pub/../p/secret").unwrap(), "p");
        assert_eq!(pick("/other").unwrap(), "all");
    }
}

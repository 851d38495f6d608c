//! HTTP/1.1 upstream connections for `http://` routes, kept idle per worker thread.
//!
//! hyper's own advice for proxies: drive `hyper::client::conn::http1` connections directly.
//! hyper-util's pooled client spent a boxed future, a pool-key hash, two lock round trips and
//! a spawned readiness task per request; here a request takes the newest idle connection to
//! its upstream from a thread-local list, and its response body puts it back once read to the
//! end. The worker runs one single-threaded runtime, so the list needs no lock.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;

use crate::proxy::upstream::{RequestBody, SendError};

/// Idle connections are closed after this long unused (hyper-util's pool default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections a worker keeps, over all upstreams.
const MAX_IDLE: usize = 256;

struct Idle {
    upstream: Authority,
    since: Instant,
    tx: SendRequest<RequestBody>,
}

thread_local! {
    /// This worker's idle connections, oldest first.
    static IDLE: RefCell<VecDeque<Idle>> = const { RefCell::new(VecDeque::new()) };
}

/// The newest usable idle connection to `upstream`; stale or closed ones on the way are closed.
fn checkout(upstream: &Authority) -> Option<SendRequest<RequestBody>> {
    let mut stale = Vec::new();
    let found = IDLE
        .try_with(|cell| {
            let mut idle = cell.borrow_mut();
            let now = Instant::now();
            while let Some(pos) = idle
                .iter()
                .rposition(|i| same_upstream(&i.upstream, upstream))
            {
                let i = idle.remove(pos)?;
                if i.tx.is_ready() && now.duration_since(i.since) < IDLE_TIMEOUT {
                    return Some(i.tx);
                }
                stale.push(i);
            }
            None
        })
        .ok()
        .flatten();
    // Dropped outside the borrow: closing a connection must not find the list borrowed.
    drop(stale);
    found
}

/// `a == b`, answered first by identity: every connection's authority is a clone of its
/// route's, sharing its bytes, and `Authority`'s own comparison ignores ASCII case byte by
/// byte.
fn same_upstream(a: &Authority, b: &Authority) -> bool {
    std::ptr::eq(a.as_str(), b.as_str()) || a == b
}

/// Puts a connection whose exchange is complete back on this worker's idle list.
fn checkin(upstream: Authority, tx: SendRequest<RequestBody>) {
    if tx.is_closed() {
        return;
    }
    let mut evicted = Vec::new();
    let _ = IDLE.try_with(|cell| {
        let mut idle = cell.borrow_mut();
        let now = Instant::now();
        while idle
            .front()
            .is_some_and(|i| idle.len() >= MAX_IDLE || now.duration_since(i.since) >= IDLE_TIMEOUT)
        {
            evicted.extend(idle.pop_front());
        }
        idle.push_back(Idle {
            upstream,
            since: now,
            tx,
        });
    });
    drop(evicted);
}

/// How often a worker closes idle connections past [`IDLE_TIMEOUT`] when no request does.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// Closes this worker's idle connections that are past their timeout or already closed;
/// checkout and checkin do the same on the way, this covers a worker that gets no traffic.
pub(crate) fn sweep() {
    let mut gone = Vec::new();
    let _ = IDLE.try_with(|cell| {
        let now = Instant::now();
        let mut idle = cell.borrow_mut();
        let (keep, old): (VecDeque<Idle>, VecDeque<Idle>) = std::mem::take(&mut *idle)
            .into_iter()
            .partition(|i| !i.tx.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT);
        *idle = keep;
        gone.extend(old);
    });
    drop(gone);
}

/// Sends `req` over an idle or new connection to `upstream`. Its URI is written as given, so
/// it is origin form: path and query.
pub(crate) async fn send(
    connector: &HttpConnector,
    upstream: &Authority,
    mut req: Request<RequestBody>,
) -> Result<Response<UpstreamBody>, SendError> {
    // A kept-alive connection the upstream closes just as a request goes out fails it with
    // nothing answered. A bodyless idempotent request is then sent once more on a new
    // connection (RFC 9110 9.2.2; HAProxy's `retry-on conn-failure`), so its head is kept.
    let mut again = resendable(&req).then(|| head_of(&req));
    while let Some(mut tx) = checkout(upstream) {
        match tx.try_send_request(req).await {
            Ok(resp) => return Ok(UpstreamBody::pooled(resp, upstream, tx)),
            Err(mut e) => match e.take_message() {
                // Closed before the request was written: nothing reached the upstream.
                Some(back) => req = back,
                None => {
                    let err = e.into_error();
                    match again.take() {
                        Some(head) if closed_unanswered(&err) => {
                            tracing::debug!(error = %err, "kept-alive upstream connection closed; sending again");
                            req = head;
                            break;
                        }
                        _ => return Err(SendError::Http(err)),
                    }
                }
            },
        }
    }
    // Boxed: a new connection is the rare path, and its handshake's state would otherwise
    // sit in every request's future.
    Box::pin(connect_and_send(connector, upstream, req)).await
}

/// Opens a new connection to `upstream` and sends `req` on it.
async fn connect_and_send(
    connector: &HttpConnector,
    upstream: &Authority,
    req: Request<RequestBody>,
) -> Result<Response<UpstreamBody>, SendError> {
    let mut dest = http::uri::Parts::default();
    dest.scheme = Some(http::uri::Scheme::HTTP);
    dest.authority = Some(upstream.clone());
    dest.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    let dest = Uri::from_parts(dest).map_err(|e| SendError::Connect(e.into()))?;
    let io = tower_service::Service::call(&mut connector.clone(), dest)
        .await
        .map_err(|e| SendError::Connect(e.into()))?;
    let (mut tx, conn) = http1::handshake::<_, RequestBody>(io)
        .await
        .map_err(SendError::Http)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    let resp = tx.send_request(req).await.map_err(SendError::Http)?;
    Ok(UpstreamBody::pooled(resp, upstream, tx))
}

/// True for a request that may be sent twice: no body, and a method that is idempotent.
fn resendable(req: &Request<RequestBody>) -> bool {
    use http::Method;
    req.body().is_end_stream()
        && matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        )
}

/// A copy of a bodyless request, for sending it again.
fn head_of(req: &Request<RequestBody>) -> Request<RequestBody> {
    let mut copy = Request::new(RequestBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// The connection ended before any response: the upstream closed it, not refused the request.
fn closed_unanswered(err: &hyper::Error) -> bool {
    err.is_incomplete_message() || err.is_canceled() || err.is_closed()
}

/// An upstream response body. A pooled connection goes back to its worker's idle list when
/// the body has been read to its end; dropped earlier, the connection closes with it.
pub struct UpstreamBody {
    inner: Incoming,
    reuse: Option<(Authority, SendRequest<RequestBody>)>,
}

impl UpstreamBody {
    /// A body from a connection that is not this module's to pool.
    pub(crate) fn plain(inner: Incoming) -> UpstreamBody {
        UpstreamBody { inner, reuse: None }
    }

    fn pooled(
        resp: Response<Incoming>,
        upstream: &Authority,
        tx: SendRequest<RequestBody>,
    ) -> Response<UpstreamBody> {
        resp.map(|inner| UpstreamBody {
            inner,
            reuse: Some((upstream.clone(), tx)),
        })
    }

    /// Never pooled again: an upgraded or abandoned exchange leaves the connection unusable.
    pub(crate) fn forget_connection(&mut self) {
        self.reuse = None;
    }

    fn give_back(&mut self) {
        if let Some((upstream, tx)) = self.reuse.take() {
            checkin(upstream, tx);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Err(_))) => this.forget_connection(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A server stops polling once `is_end_stream` says the body is complete.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

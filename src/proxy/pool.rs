//! HTTP/1.1 upstream connections for `http://` routes, kept idle per worker thread and driven
//! by the request using them.
//!
//! hyper's own advice for proxies: drive `hyper::client::conn::http1` connections directly.
//! hyper-util's pooled client spent a boxed future, a pool-key hash, two lock round trips and
//! a spawned readiness task per request; here a request takes the newest idle connection to
//! its upstream from a thread-local list, and its response body puts it back once read to the
//! end. The worker runs one single-threaded runtime, so the list needs no lock. A connection
//! has no task of its own: the request holding it polls it, so the upstream's answer wakes
//! the downstream task directly instead of passing through a second task and two channels.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::TrySendError;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::upstream::{RequestBody, SendError};

/// Idle connections are closed after this long unused (hyper-util's pool default).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections a worker keeps, over all upstreams.
const MAX_IDLE: usize = 256;

/// hyper's state machine for one upstream connection.
type Link = http1::Connection<TokioIo<TcpStream>, RequestBody>;

/// One upstream connection: the handle requests go in by, and the connection itself, polled
/// by whoever holds the line.
struct Line {
    upstream: Authority,
    tx: SendRequest<RequestBody>,
    /// Boxed so that checking the line in and out moves a pointer; `None` once it has ended.
    conn: Option<Pin<Box<Link>>>,
    relay: Arc<Relay>,
    /// `relay` as the waker the connection (and the response body) is polled with.
    waker: Waker,
}

/// Where a connection's wakeups go: to the task holding its line, except those set off by
/// that task's own polls, which it looks at before it returns. Driven inside the request's
/// task, the connection would otherwise wake that task again for the response head it has
/// just handed over and for the body chunk just taken, one more poll of the whole downstream
/// connection each. An idle line wakes nobody, so no finished task stays referenced by it.
#[derive(Default)]
struct Relay {
    target: Mutex<Option<Waker>>,
    /// Set while the holder polls: wakeups are noted in `missed` instead of passed on.
    quiet: AtomicBool,
    missed: AtomicBool,
}

impl Relay {
    /// Sends later wakeups to `to`, or to no one.
    fn aim(&self, to: Option<&Waker>) {
        if let Ok(mut target) = self.target.lock() {
            match to {
                Some(w) if target.as_ref().is_some_and(|t| t.will_wake(w)) => {}
                _ => *target = to.cloned(),
            }
        }
    }
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.quiet.load(Ordering::Relaxed) {
            self.missed.store(true, Ordering::Relaxed);
            return;
        }
        if let Ok(target) = self.target.lock() {
            if let Some(w) = target.as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

/// Runs `f` (polls of the connection and what it feeds) with the relay's waker, for the task
/// behind `cx`. A wakeup `f` caused itself is passed on only if `f` is still pending, since
/// the connection may have asked to be polled again (hyper yields after 16 rounds).
fn relayed<T>(
    relay: &Relay,
    waker: &Waker,
    cx: &mut Context<'_>,
    f: impl FnOnce(&mut Context<'_>) -> Poll<T>,
) -> Poll<T> {
    relay.aim(Some(cx.waker()));
    relay.quiet.store(true, Ordering::Relaxed);
    let polled = f(&mut Context::from_waker(waker));
    relay.quiet.store(false, Ordering::Relaxed);
    if relay.missed.swap(false, Ordering::Relaxed) && polled.is_pending() {
        cx.waker().wake_by_ref();
    }
    polled
}

/// Lets the connection read and write whatever is due; `cx` is woken when it can go on.
fn drive(conn: &mut Option<Pin<Box<Link>>>, cx: &mut Context<'_>) {
    let Some(c) = conn.as_mut() else {
        return;
    };
    if let Poll::Ready(ended) = c.as_mut().poll(cx) {
        if let Err(e) = ended {
            tracing::debug!(error = %e, "upstream connection ended");
        }
        // Dropping the connection also fails whatever request is still queued on it.
        *conn = None;
    }
}

impl Line {
    fn new(upstream: Authority, tx: SendRequest<RequestBody>, conn: Link) -> Line {
        let relay = Arc::new(Relay::default());
        Line {
            upstream,
            tx,
            conn: Some(Box::pin(conn)),
            waker: Waker::from(relay.clone()),
            relay,
        }
    }

    /// Drives the connection with no one to wake, on its way to or while on the idle list.
    fn settle(&mut self) {
        drive(&mut self.conn, &mut Context::from_waker(Waker::noop()));
    }

    /// Still open, with the upstream able to take another request.
    fn open(&self) -> bool {
        self.conn.is_some() && !self.tx.is_closed()
    }

    /// Sends `req` and waits for the response head, driving the connection meanwhile.
    async fn exchange(
        &mut self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<RequestBody>>> {
        let mut sent = std::pin::pin!(self.tx.try_send_request(req));
        let (relay, waker, conn) = (&self.relay, &self.waker, &mut self.conn);
        std::future::poll_fn(|cx| {
            relayed(relay, waker, cx, |rcx| {
                drive(conn, rcx);
                sent.as_mut().poll(rcx)
            })
        })
        .await
    }
}

struct Idle {
    since: Instant,
    line: Line,
}

thread_local! {
    /// This worker's idle connections, oldest first.
    static IDLE: RefCell<VecDeque<Idle>> = const { RefCell::new(VecDeque::new()) };
}

/// The newest usable idle connection to `upstream`; stale or closed ones on the way are closed.
fn checkout(upstream: &Authority) -> Option<Line> {
    let mut stale = Vec::new();
    let found = IDLE
        .try_with(|cell| {
            let mut idle = cell.borrow_mut();
            let now = Instant::now();
            while let Some(pos) = idle
                .iter()
                .rposition(|i| same_upstream(&i.line.upstream, upstream))
            {
                let i = idle.remove(pos)?;
                if i.line.open()
                    && i.line.tx.is_ready()
                    && now.duration_since(i.since) < IDLE_TIMEOUT
                {
                    return Some(i.line);
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
pub(crate) fn same_upstream(a: &Authority, b: &Authority) -> bool {
    std::ptr::eq(a.as_str(), b.as_str()) || a == b
}

/// Puts a connection whose exchange is complete back on this worker's idle list.
fn checkin(mut line: Line) {
    line.relay.aim(None);
    // Usually the connection finished the exchange as it read the body's end; if not, it
    // does now (and reads a close the upstream already sent).
    if !line.tx.is_ready() {
        line.settle();
    }
    if !line.open() {
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
        idle.push_back(Idle { since: now, line });
    });
    drop(evicted);
}

/// How often a worker closes idle connections past [`IDLE_TIMEOUT`] when no request does.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// Closes this worker's idle connections that are past their timeout or closed by the
/// upstream; checkout and checkin do the same on the way, this covers a worker that gets no
/// traffic. An idle connection has nobody polling it, so this is where an upstream's close
/// is read and the socket let go.
pub(crate) fn sweep() {
    let mut gone = Vec::new();
    let _ = IDLE.try_with(|cell| {
        let now = Instant::now();
        let mut idle = cell.borrow_mut();
        let (keep, old): (VecDeque<Idle>, VecDeque<Idle>) = std::mem::take(&mut *idle)
            .into_iter()
            .map(|mut i| {
                i.line.settle();
                i
            })
            .partition(|i| i.line.open() && now.duration_since(i.since) < IDLE_TIMEOUT);
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
    while let Some(mut line) = checkout(upstream) {
        match line.exchange(req).await {
            Ok(resp) => return Ok(UpstreamBody::pooled(resp, line)),
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
    let io = connect(connector, upstream).await?;
    let (tx, conn) = http1::handshake::<_, RequestBody>(io)
        .await
        .map_err(SendError::Http)?;
    let mut line = Line::new(upstream.clone(), tx, conn);
    let resp = line
        .exchange(req)
        .await
        .map_err(|e| SendError::Http(e.into_error()))?;
    Ok(UpstreamBody::pooled(resp, line))
}

/// A new TCP connection to `upstream`, made with the connector's timeouts and options.
pub(crate) async fn connect(
    connector: &HttpConnector,
    upstream: &Authority,
) -> Result<TokioIo<TcpStream>, SendError> {
    let mut dest = http::uri::Parts::default();
    dest.scheme = Some(http::uri::Scheme::HTTP);
    dest.authority = Some(upstream.clone());
    dest.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    let dest = Uri::from_parts(dest).map_err(|e| SendError::Connect(e.into()))?;
    tower_service::Service::call(&mut connector.clone(), dest)
        .await
        .map_err(|e| SendError::Connect(e.into()))
}

/// True for a request that may be sent twice: no body, and a method that is idempotent.
fn resendable(req: &Request<RequestBody>) -> bool {
    req.body().is_end_stream() && idempotent(req.method())
}

/// True for the idempotent methods (RFC 9110 9.2.2) that a request the upstream may have
/// seen is sent again with.
pub(crate) fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// A copy of a bodyless request, for sending it again.
pub(crate) fn head_of(req: &Request<RequestBody>) -> Request<RequestBody> {
    let mut copy = Request::new(RequestBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// The connection ended before any response: the upstream closed or reset it, not refused
/// the request. A reset is what an upstream that closed with unread bytes, or a restarted
/// one, sends a reused connection.
fn closed_unanswered(err: &hyper::Error) -> bool {
    use std::io::ErrorKind;
    let reset = std::error::Error::source(err)
        .and_then(|e| e.downcast_ref::<std::io::Error>())
        .is_some_and(|e| {
            matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            )
        });
    err.is_incomplete_message() || err.is_canceled() || err.is_closed() || reset
}

/// An upstream response body. On a pooled connection, reading the body drives the
/// connection, which goes back to its worker's idle list when the body has been read to its
/// end; dropped earlier, the connection closes with it.
pub struct UpstreamBody {
    inner: Incoming,
    line: Option<Line>,
}

impl UpstreamBody {
    /// A body from a connection that is not this module's to pool.
    pub(crate) fn plain(inner: Incoming) -> UpstreamBody {
        UpstreamBody { inner, line: None }
    }

    fn pooled(resp: Response<Incoming>, line: Line) -> Response<UpstreamBody> {
        resp.map(|inner| UpstreamBody {
            inner,
            line: Some(line),
        })
    }

    /// Never pooled again: an upgraded or abandoned exchange leaves the connection unusable.
    pub(crate) fn forget_connection(&mut self) {
        self.line = None;
    }

    fn give_back(&mut self) {
        if let Some(line) = self.line.take() {
            checkin(line);
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
        let inner = &mut this.inner;
        let polled = match this.line.as_mut() {
            None => Pin::new(inner).poll_frame(cx),
            Some(line) => relayed(&line.relay, &line.waker, cx, |rcx| {
                // The connection usually read the whole body with the head; only when it did
                // not does it need to run for more.
                match Pin::new(&mut *inner).poll_frame(rcx) {
                    Poll::Pending => {
                        drive(&mut line.conn, rcx);
                        Pin::new(&mut *inner).poll_frame(rcx)
                    }
                    polled => polled,
                }
            }),
        };
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

//! h2c upstream connections: one per upstream per worker thread, shared by every request of
//! that worker to it, since HTTP/2 multiplexes.
//!
//! hyper's own client connection, as for HTTP/1.1 (`proxy::pool`): hyper-util's pooled client
//! spent a boxed checkout, a pool-key hash and lock round trips on each request, about 5,000
//! instructions of the h2c-upstream path. The worker runs one single-threaded runtime, so the
//! thread-local list needs no lock. The connection keeps its own task (hyper spawns one per
//! HTTP/2 connection), as the legacy client's did.

use std::cell::{Cell, RefCell};
use std::time::Instant;

use http::uri::Authority;
use http::{Request, Response};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;

use crate::proxy::pool::{self, same_upstream, UpstreamBody, IDLE_TIMEOUT};
use crate::proxy::resend::h2_error;
use crate::proxy::upstream::{Failure, Forwarder, RequestBody, SendError};

/// One upstream's shared connection, or the request opening it for the others to wait on.
struct Shared {
    /// Tells this connection from the one that replaces it.
    id: u64,
    upstream: Authority,
    state: State,
    used: Instant,
}

/// A shared connection, or the promise of one.
enum State {
    Open(SendRequest<RequestBody>),
    /// The opening request holds the sender: it drops it once it has put the connection in
    /// place, or when it fails (sending why first) or is cancelled, which wakes the waiting
    /// requests either way.
    Opening(watch::Receiver<Option<Failure>>),
}

impl Shared {
    /// False once the connection has closed, or its opening ended without one.
    fn live(&self) -> bool {
        match &self.state {
            State::Open(tx) => !tx.is_closed(),
            State::Opening(rx) => rx.has_changed().is_ok(),
        }
    }
}

thread_local! {
    /// This worker's h2c connections, one per upstream.
    static SHARED: RefCell<Vec<Shared>> = const { RefCell::new(Vec::new()) };
    /// The next [`Shared::id`].
    static NEXT_ID: Cell<u64> = const { Cell::new(0) };
}

/// What a request finds for its upstream.
enum Found {
    /// A clone of the sender (two reference counts), so no borrow of the list is held across
    /// the exchange, and the connection's id.
    Open(SendRequest<RequestBody>, u64),
    /// Another request is opening the connection.
    Opening(watch::Receiver<Option<Failure>>),
    /// Nothing: this request opens the connection (with this id), and holds what wakes the
    /// others.
    Vacant(watch::Sender<Option<Failure>>, u64),
}

/// This worker's connection to `upstream`, or a place to open one.
fn find(upstream: &Authority) -> Option<Found> {
    SHARED
        .try_with(|cell| {
            let mut conns = cell.borrow_mut();
            conns.retain(Shared::live);
            let now = Instant::now();
            match conns
                .iter_mut()
                .find(|c| same_upstream(&c.upstream, upstream))
            {
                Some(c) => match &c.state {
                    State::Open(tx) => {
                        c.used = now;
                        Found::Open(tx.clone(), c.id)
                    }
                    State::Opening(rx) => Found::Opening(rx.clone()),
                },
                None => {
                    let (tx, rx) = watch::channel(None);
                    let id = NEXT_ID.with(|n| n.replace(n.get() + 1));
                    conns.push(Shared {
                        id,
                        upstream: upstream.clone(),
                        state: State::Opening(rx),
                        used: now,
                    });
                    Found::Vacant(tx, id)
                }
            }
        })
        .ok()
}

/// Sends `req` (absolute form: `:authority` is the client's host) on this worker's connection
/// to `upstream`, opening one when there is none or it has closed. Requests that arrive while
/// it opens wait for it, as they did in hyper-util's pool, instead of each opening another.
pub(crate) async fn send(
    clients: &Forwarder,
    upstream: &Authority,
    mut req: Request<RequestBody>,
) -> Result<Response<UpstreamBody>, SendError> {
    // Bounded: after three openings waited for or closing connections met, a request opens a
    // connection of its own, unshared.
    for _ in 0..3 {
        match find(upstream) {
            None => break,
            Some(Found::Open(mut tx, id)) => match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(UpstreamBody::plain)),
                // Handed back unsent: the connection was closing (GOAWAY); a new one takes it.
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(failed(e.into_error(), id)),
                },
            },
            Some(Found::Opening(mut rx)) => {
                // Ends when the opener is done, whatever the outcome.
                let _ = rx.changed().await;
                // The connection could not be opened: the requests that waited for it fail
                // as the opener did, rather than each trying again for a connect timeout.
                if let Some(failure) = *rx.borrow() {
                    return Err(SendError::Opening(failure));
                }
            }
            Some(Found::Vacant(opening, id)) => {
                // Boxed: a new connection is the rare path, and its handshake's state would
                // otherwise sit in every request's future.
                return Box::pin(connect_and_send(
                    clients,
                    upstream,
                    req,
                    Some((opening, id)),
                ))
                .await;
            }
        }
    }
    Box::pin(connect_and_send(clients, upstream, req, None)).await
}

/// Opens a connection to `upstream` and sends `req` on it; with `opening`, puts it in the
/// place reserved for it so later requests share it.
async fn connect_and_send(
    clients: &Forwarder,
    upstream: &Authority,
    req: Request<RequestBody>,
    opening: Option<(watch::Sender<Option<Failure>>, u64)>,
) -> Result<Response<UpstreamBody>, SendError> {
    let opened = async {
        let io = pool::connect(clients.connector(), upstream).await?;
        http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(clients.ping())
            .keep_alive_timeout(crate::proxy::upstream::ping_timeout(clients.ping()))
            .handshake::<_, RequestBody>(io)
            .await
            .map_err(SendError::Http)
    };
    let (mut tx, conn) = match opened.await {
        Ok(opened) => opened,
        Err(e) => {
            if let Some((opening, _)) = &opening {
                opening.send_replace(Some(Failure::of_send(&e)));
            }
            return Err(e);
        }
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "h2c upstream connection ended");
        }
    });
    let shared = opening.as_ref().map(|(_, id)| *id);
    if let Some((opening, id)) = opening {
        let _ = SHARED.try_with(|cell| {
            let mut conns = cell.borrow_mut();
            if let Some(c) = conns.iter_mut().find(|c| c.id == id) {
                c.state = State::Open(tx.clone());
                c.used = Instant::now();
            }
        });
        // Dropped here, not at the end: the waiting requests go on now.
        drop(opening);
    }
    match tx.try_send_request(req).await {
        Ok(resp) => Ok(resp.map(UpstreamBody::plain)),
        Err(mut e) => match e.take_message() {
            // Closed at once (an upstream at its connection limit may do that) with the request
            // unsent: one more try, on a connection of its own.
            Some(back) if shared.is_some() => {
                Box::pin(connect_and_send(clients, upstream, back, None)).await
            }
            _ => Err(match shared {
                Some(id) => failed(e.into_error(), id),
                None => SendError::Http(e.into_error()),
            }),
        },
    }
}

/// The error of a request sent on shared connection `id`. A GOAWAY also retires the
/// connection at once, so a request sent again does not meet it before hyper has seen it
/// close.
fn failed(err: hyper::Error, id: u64) -> SendError {
    let err = SendError::Http(err);
    if h2_error(&err).is_some_and(|e| e.is_go_away() && e.is_remote()) {
        let gone = SHARED.try_with(|cell| {
            let mut conns = cell.borrow_mut();
            conns
                .iter()
                .position(|c| c.id == id)
                .map(|i| conns.swap_remove(i))
        });
        // Dropped outside the borrow.
        drop(gone);
    }
    err
}

/// Lets go of connections unused for [`IDLE_TIMEOUT`] or closed by the upstream; dropping
/// the last sender closes a connection once its streams are done.
pub(crate) fn sweep() {
    let gone = SHARED
        .try_with(|cell| {
            let now = Instant::now();
            let mut conns = cell.borrow_mut();
            let (keep, gone): (Vec<Shared>, Vec<Shared>) = std::mem::take(&mut *conns)
                .into_iter()
                .partition(|c| c.live() && now.duration_since(c.used) < IDLE_TIMEOUT);
            *conns = keep;
            gone
        })
        .unwrap_or_default();
    // Dropped outside the borrow.
    drop(gone);
}

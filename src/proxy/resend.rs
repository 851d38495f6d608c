//! Sending again what an HTTP/2 upstream did not process.
//!
//! nginx ends an HTTP/2 connection after `keepalive_requests` (1,000 by default) with a GOAWAY
//! that drops every stream above the last one it took; under load that was a 502 for about
//! one request in twenty. RFC 9113 8.7 makes such a request safe to send again, whatever its
//! method: the upstream never saw it. A body goes again from the frames it gave out, kept as
//! reference counts (`upstream::Kept`), up to 16 KiB. A request hyper dropped while it waited
//! for a stream slot goes again only if its method is idempotent: hyper cannot say whether
//! it was written first.

use std::future::Future;

use http::{Request, Response};
use http_body::Body as _;
use tokio::sync::oneshot;

use crate::proxy::pool::{self, UpstreamBody};
use crate::proxy::upstream::{RequestBody, SendError};

/// The HTTP/2 error in `err`'s source chain, if any.
pub(crate) fn h2_error(err: &SendError) -> Option<&h2::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        cur = e.source();
    }
    None
}

/// True when an HTTP/2 upstream did not process the request: it refused the stream
/// (`REFUSED_STREAM`), or the stream was above the last one its GOAWAY kept, or it was sent
/// after that GOAWAY. RFC 9113 8.7 makes such a request safe to send again, whatever its
/// method; h2 gives a remote GOAWAY's error to those streams only.
fn unprocessed(err: &SendError, idempotent: bool) -> bool {
    h2_error(err).is_some_and(|e| {
        e.is_remote() && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM))
    }) || (idempotent && dropped_unsent(err))
}

/// True for a request hyper's HTTP/2 client dropped when its connection ended: hyper says
/// "dispatch task is gone", a user error it has no predicate for. Most are requests held
/// back for a stream slot at the upstream's `max_concurrent_streams`, never sent; but h2 may
/// write one that got a slot after a first, graceful GOAWAY (last stream 2^31-1, as Envoy and
/// nghttp2 send) before the final one ends the connection, so only idempotent requests go
/// again (RFC 9110 9.2.2). Not when hyper says a panic dropped it. Only on this module's
/// connections, which are all HTTP/2: hyper's HTTP/1.1 client says the same when its task is
/// dropped mid-exchange.
fn dropped_unsent(err: &SendError) -> bool {
    matches!(err, SendError::Http(e)
        if e.is_user()
            && e.to_string().starts_with("dispatch task is gone")
            && !std::error::Error::source(e).is_some_and(|c| c.to_string().contains("panicked")))
}

/// How many times a request an HTTP/2 upstream did not process is sent again.
const RESENDS: usize = 4;

/// Sends `req` with `send`; a request an HTTP/2 upstream did not process (see
/// [`unprocessed`]) is sent again, up to [`RESENDS`] times, with its body if that was kept.
pub(crate) async fn resending<F, Fut>(
    mut req: Request<RequestBody>,
    mut send: F,
) -> Result<Response<UpstreamBody>, SendError>
where
    F: FnMut(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Result<Response<UpstreamBody>, SendError>>,
{
    let bodyless = req.body().is_end_stream();
    let idempotent = pool::idempotent(req.method());
    let mut left = RESENDS;
    let mut head = pool::head_of(&req);
    let mut back = (!bodyless).then(|| keep(&mut req));
    loop {
        let e = match send(req).await {
            Err(e) if unprocessed(&e, idempotent) => e,
            // Dropping `back` tells a body still streaming that it need keep nothing more.
            done => return done,
        };
        if let Some(back) = back.take() {
            // The body comes back when hyper drops it, after the failed exchange; not when
            // it was too large to keep.
            match back.await {
                Ok(body) => *head.body_mut() = body,
                Err(_) => return Err(e),
            }
        }
        tracing::debug!(error = %e, "the HTTP/2 upstream did not process the request; sending again");
        req = head;
        left -= 1;
        if left == 0 {
            return send(req).await;
        }
        head = pool::head_of(&req);
        back = (!bodyless).then(|| keep(&mut req));
    }
}

/// Has `req`'s body keep what it gives out; the receiver gets it back.
fn keep(req: &mut Request<RequestBody>) -> oneshot::Receiver<RequestBody> {
    let (tx, rx) = oneshot::channel();
    req.body_mut().keep(tx);
    rx
}

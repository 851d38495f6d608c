//! Per-request observation: the response body is wrapped so that when it ends (or the client
//! goes away) the duration is recorded and the access log line is emitted.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};

use crate::config::LogFormat;
use crate::ops::accesslog::{AccessLog, Entry};
use crate::proxy::pool::UpstreamBody;

/// What a connection tells its idle watchdog.
#[derive(Debug, Default)]
pub struct ConnState {
    /// Set on every byte read or written; the watchdog clears it on each of its checks, so
    /// the I/O path never reads the clock.
    pub active: AtomicBool,
    /// Requests whose response has not finished.
    pub in_flight: AtomicUsize,
    /// HTTP/1: bytes of a request head arrived and the head is not complete yet, so the
    /// header read timeout runs (it must not run on an idle keep-alive connection).
    pub head_pending: AtomicBool,
    /// The connection speaks HTTP/2: only streams count as activity, not pings.
    pub h2: AtomicBool,
}

impl ConnState {
    /// Records activity.
    pub fn touch(&self) {
        if !self.active.load(Ordering::Relaxed) {
            self.active.store(true, Ordering::Relaxed);
        }
    }
}

/// Work to do when a response ends.
pub struct Finish {
    /// The access log line, completed with duration and bytes at the end; boxed as the
    /// log's queue carries it.
    pub entry: Box<Entry>,
    /// When the request arrived.
    pub start: Instant,
    /// The route's duration histogram.
    pub duration: metrics::Histogram,
    /// Where the line goes.
    pub log: AccessLog,
    /// Line format.
    pub format: LogFormat,
    /// Counts lines dropped under back-pressure.
    pub dropped: metrics::Counter,
    /// The connection, whose in-flight count this request holds.
    pub conn: Arc<ConnState>,
    /// For gRPC requests: where the final `grpc-status` is counted.
    pub grpc: Option<GrpcTally>,
}

/// What a gRPC request's end needs to count its status.
pub struct GrpcTally {
    /// The registry.
    pub metrics: Arc<crate::ops::metrics::Metrics>,
    /// The snapshot's per-route handles and this request's index among them.
    pub stats: Arc<Vec<crate::ops::metrics::RouteStats>>,
    /// Route index; `None` for requests no route took.
    pub route: Option<usize>,
}

impl GrpcTally {
    /// Counts `status` under the request's route.
    pub fn count(&self, status: u16) {
        let stats = self
            .route
            .and_then(|i| self.stats.get(i))
            .unwrap_or(&self.metrics.unrouted);
        self.metrics.count_grpc(stats, status);
    }
}

/// The `grpc-status` a header or trailer block carries.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A response body that reports its end.
pub struct ObservedBody {
    inner: Either<UpstreamBody, Full<Bytes>>,
    bytes: u64,
    finish: Option<Box<Finish>>,
}

impl ObservedBody {
    /// Wraps a body; `finish` runs once, at end of stream or on drop.
    pub fn new(inner: Either<UpstreamBody, Full<Bytes>>, finish: Box<Finish>) -> ObservedBody {
        ObservedBody {
            inner,
            bytes: 0,
            finish: Some(finish),
        }
    }

    fn complete(&mut self) {
        let Some(mut f) = self.finish.take() else {
            return;
        };
        let took = f.start.elapsed();
        f.duration.record(took.as_secs_f64());
        f.entry.duration = took;
        f.entry.bytes = self.bytes;
        f.conn.in_flight.fetch_sub(1, Ordering::Relaxed);
        f.conn.touch();
        if let Some(tally) = &f.grpc {
            // No status by the end (a stream cut short) reads as UNKNOWN (2), per gRPC.
            let status = *f.entry.grpc_status.get_or_insert(2);
            tally.count(status);
        }
        let Finish {
            entry,
            log,
            format,
            dropped,
            ..
        } = *f;
        if !log.send(entry, format) {
            dropped.increment(1);
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Either::Left(b) => Pin::new(b).poll_frame(cx),
            Either::Right(b) => match Pin::new(b).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                } else if let (Some(t), Some(f)) = (frame.trailers_ref(), this.finish.as_mut()) {
                    if f.grpc.is_some() {
                        if let Some(status) = grpc_status(t) {
                            f.entry.grpc_status = Some(status);
                        }
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.complete(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Either::Left(b) => b.is_end_stream(),
            Either::Right(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Either::Left(b) => b.size_hint(),
            Either::Right(b) => b.size_hint(),
        }
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.complete();
    }
}

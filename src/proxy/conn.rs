//! One downstream connection's lifecycle pieces: its slot under `max_connections`, the I/O
//! wrapper that tells activity apart from HTTP/2 pings, and the idle and header-read timers.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::Limits;
use crate::proxy::observe::ConnState;

/// Open connections per worker, which the accept loops read to spread new ones.
///
/// Every worker is woken for each connection on the shared listening socket, and the one
/// already awake accepts a burst whole: one worker could end up serving all of a client
/// pool's connections while the other cores idle.
pub(crate) struct Loads {
    open: Box<[AtomicUsize]>,
    gauges: Box<[metrics::Gauge]>,
}

impl Loads {
    /// Counters for `workers` workers, each shown as `keygate_worker_connections`.
    pub(crate) fn new(metrics: &crate::ops::metrics::Metrics, workers: usize) -> Loads {
        Loads {
            open: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            gauges: (0..workers)
                .map(|w| metrics.worker_connections(w))
                .collect(),
        }
    }

    /// The worker that should serve the next connection: `me`, unless another has at least
    /// two fewer open (then the one with fewest), so a balanced gateway never hands one over.
    pub(crate) fn pick(&self, me: usize) -> usize {
        let mine = self.count(me);
        let (mut best, mut least) = (me, mine);
        for (w, n) in self.open.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n < least && n + 1 < mine {
                (best, least) = (w, n);
            }
        }
        best
    }

    fn count(&self, worker: usize) -> usize {
        self.open
            .get(worker)
            .map_or(usize::MAX, |n| n.load(Ordering::Relaxed))
    }

    fn opened(&self, worker: usize) {
        if let (Some(n), Some(g)) = (self.open.get(worker), self.gauges.get(worker)) {
            n.fetch_add(1, Ordering::Relaxed);
            g.increment(1.0);
        }
    }

    fn closed(&self, worker: usize) {
        if let (Some(n), Some(g)) = (self.open.get(worker), self.gauges.get(worker)) {
            n.fetch_sub(1, Ordering::Relaxed);
            g.decrement(1.0);
        }
    }
}

/// A connection's slot under `max_connections` and its place in the connection gauges.
///
/// Owned by the connection's I/O, so an upgraded (WebSocket) stream keeps holding it.
pub(crate) struct ConnHold {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: metrics::Gauge,
    loads: Arc<Loads>,
    worker: usize,
}

impl ConnHold {
    /// Counts a new connection, served by `worker`.
    pub(crate) fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        gauge: &metrics::Gauge,
        loads: &Arc<Loads>,
        worker: usize,
    ) -> ConnHold {
        gauge.increment(1.0);
        loads.opened(worker);
        ConnHold {
            _permit: permit,
            gauge: gauge.clone(),
            loads: loads.clone(),
            worker,
        }
    }

    /// Counts the connection as `worker`'s instead, when it could not be handed over.
    pub(crate) fn reseat(&mut self, worker: usize) {
        self.loads.closed(self.worker);
        self.loads.opened(worker);
        self.worker = worker;
    }
}

impl Drop for ConnHold {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
        self.loads.closed(self.worker);
        crate::ops::trim::note_activity();
    }
}

/// An I/O stream that records activity for the idle watchdog and header read timeout.
/// The start of HTTP/2's connection preface; an HTTP/1 method like `PRIX` must not match.
const H2_PREFACE: &[u8; 16] = b"PRI * HTTP/2.0\r\n";

pub(crate) struct TrackedIo<I> {
    inner: I,
    state: Arc<ConnState>,
    /// First bytes read, until the whole HTTP/2 preface line tells it from an HTTP/1 request.
    sniff: [u8; 16],
    sniffed: u8,
    h2: bool,
    _hold: ConnHold,
}

impl<I> TrackedIo<I> {
    pub(crate) fn new(inner: I, state: Arc<ConnState>, hold: ConnHold) -> TrackedIo<I> {
        TrackedIo {
            inner,
            state,
            sniff: [0; 16],
            sniffed: 0,
            h2: false,
            _hold: hold,
        }
    }

    fn saw(&mut self, bytes: &[u8]) {
        if usize::from(self.sniffed) < self.sniff.len() {
            for &b in bytes
                .iter()
                .take(self.sniff.len() - usize::from(self.sniffed))
            {
                self.sniff[usize::from(self.sniffed)] = b;
                self.sniffed += 1;
            }
            if usize::from(self.sniffed) == self.sniff.len() && &self.sniff == H2_PREFACE {
                self.h2 = true;
                self.state.h2.store(true, Ordering::Relaxed);
                self.state.head_pending.store(false, Ordering::Relaxed);
            }
        }
        // HTTP/2 pings and settings are not activity: only streams keep it open.
        if self.h2 {
            return;
        }
        self.state.touch();
        if self.state.in_flight.load(Ordering::Relaxed) == 0
            && !self.state.head_pending.load(Ordering::Relaxed)
        {
            self.state.head_pending.store(true, Ordering::Relaxed);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for TrackedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let this = &mut *self;
            this.saw(&buf.filled()[before..]);
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TrackedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if !self.h2 && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if !self.h2 && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the watchdog decided on one check.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Open,
    Idle,
    HeadTimedOut,
}

/// The idle and header-read timers of one connection, advanced in coarse checks so the I/O
/// path never reads the clock.
pub(crate) struct Watchdog {
    pub(crate) check: Duration,
    idle: Duration,
    head: Duration,
    quiet: Duration,
    head_wait: Duration,
    idle_checks_after_close: u32,
}

impl Watchdog {
    pub(crate) fn new(limits: &Limits) -> Watchdog {
        let check = (limits.idle_timeout.min(limits.header_read_timeout) / 4)
            .max(Duration::from_millis(50));
        Watchdog {
            check,
            idle: limits.idle_timeout,
            head: limits.header_read_timeout,
            quiet: Duration::ZERO,
            head_wait: Duration::ZERO,
            idle_checks_after_close: 0,
        }
    }

    pub(crate) fn verdict(&mut self, state: &ConnState) -> Verdict {
        let active = state.active.swap(false, Ordering::Relaxed);
        let busy = state.in_flight.load(Ordering::Relaxed) > 0;
        if !busy && state.head_pending.load(Ordering::Relaxed) {
            // Checks start anywhere within a period: one extra makes the timer never short.
            self.head_wait += self.check;
            if self.head_wait > self.head {
                return Verdict::HeadTimedOut;
            }
        } else {
            self.head_wait = Duration::ZERO;
        }
        if active || busy {
            self.quiet = Duration::ZERO;
            return Verdict::Open;
        }
        self.quiet += self.check;
        if self.quiet > self.idle {
            Verdict::Idle
        } else {
            Verdict::Open
        }
    }

    /// After a graceful close was asked for, a few more idle checks end the connection hard.
    pub(crate) fn overdue(&mut self) -> bool {
        self.idle_checks_after_close += 1;
        self.idle_checks_after_close > 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> tokio::sync::OwnedSemaphorePermit {
        Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap()
    }

    /// A burst one worker accepts alone ends split evenly, and counts fall as holds drop.
    #[test]
    fn a_burst_accepted_by_one_worker_is_split() {
        let metrics = crate::ops::metrics::Metrics::new();
        let loads = Arc::new(Loads::new(&metrics, 3));
        let gauge = metrics.active_connections.clone();
        let mut holds = Vec::new();
        for _ in 0..30 {
            let to = loads.pick(0);
            holds.push(ConnHold::new(slot(), &gauge, &loads, to));
        }
        let counts: Vec<usize> = (0..3).map(|w| loads.count(w)).collect();
        assert!(counts.iter().all(|&n| (9..=11).contains(&n)), "{counts:?}");
        assert_eq!(counts.iter().sum::<usize>(), 30);
        holds.clear();
        assert!((0..3).all(|w| loads.count(w) == 0));
    }

    /// One connection more than another is no reason to move one; two is.
    #[test]
    fn a_worker_keeps_a_connection_unless_another_has_two_fewer() {
        let metrics = crate::ops::metrics::Metrics::new();
        let loads = Arc::new(Loads::new(&metrics, 2));
        let gauge = metrics.active_connections.clone();
        let a = ConnHold::new(slot(), &gauge, &loads, 0);
        assert_eq!(loads.pick(0), 0);
        assert_eq!(loads.pick(1), 1);
        let mut b = ConnHold::new(slot(), &gauge, &loads, 0);
        assert_eq!(loads.pick(0), 1);
        b.reseat(1);
        assert_eq!((loads.count(0), loads.count(1)), (1, 1));
        drop((a, b));
        assert_eq!((loads.count(0), loads.count(1)), (0, 0));
    }
}

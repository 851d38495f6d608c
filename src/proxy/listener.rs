//! The listener: thread-per-core workers, accept with the connection cap, TLS, and each
//! connection served under its watchdog until it closes or the gateway drains.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use http::Method;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::config::Limits;
use crate::ops::accesslog::{Entry, HeadText};
use crate::ops::metrics::AuthOutcome;
use crate::proxy::conn::{ConnHold, Loads, TrackedIo, Verdict, Watchdog};
use crate::proxy::observe::ConnState;
use crate::proxy::pipeline::{handle, Conn, Gateway};
use crate::wire::headers;

/// Spawns hyper's HTTP/2 stream tasks with the request future boxed.
///
/// A stream's task holds `handle`'s whole future (about 5 KB), and tokio moves a task's
/// future several times while spawning and completing it: boxed, those moves copy a pointer.
/// One allocation replaces about 3,000 instructions of copying per h2 request; HTTP/1.1
/// requests run inside the connection's task and never come here.
#[derive(Clone, Copy)]
struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Box::pin(fut));
    }
}

fn builder(limits: &Limits) -> auto::Builder<StreamExecutor> {
    let mut b = auto::Builder::new(StreamExecutor);
    // hyper's own cap is a backstop; the exact limit is checked per request with a JSON 431.
    let buf = usize::try_from(limits.max_header_bytes)
        .unwrap_or(usize::MAX)
        .saturating_mul(2)
        .max(16 * 1024);
    // hyper starts its header timer as soon as a keep-alive connection goes idle, which cut
    // idle connections at header_read_timeout; serve_conn runs that timer from the first byte.
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(buf)
        .max_headers(1000);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(buf).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Keepalive for downstream sockets: first probe after a minute idle, then every 10 s,
/// given up after 6 unanswered.
static DOWNSTREAM_KEEPALIVE: std::sync::LazyLock<socket2::TcpKeepalive> =
    std::sync::LazyLock::new(|| {
        socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10))
            .with_retries(6)
    });

/// Worker threads: `KEYGATE_WORKERS`, else one per available core.
pub fn worker_count() -> usize {
    std::env::var("KEYGATE_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

thread_local! {
    /// This thread's connection builder, with the generation of the config it came from.
    static BUILDER: std::cell::RefCell<Option<(u64, Arc<auto::Builder<StreamExecutor>>)>> =
        const { std::cell::RefCell::new(None) };
}

/// The connection builder for the current config, so changed limits apply to new connections.
fn local_builder(config: &crate::config::Config) -> Arc<auto::Builder<StreamExecutor>> {
    BUILDER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if let Some((generation, b)) = slot.as_ref() {
            if *generation == config.generation {
                return b.clone();
            }
        }
        let b = Arc::new(builder(&config.limits));
        *slot = Some((config.generation, b.clone()));
        b
    })
}

/// What every worker shares.
#[derive(Clone)]
struct Shared {
    gateway: Arc<Gateway>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    slots: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    max_connections: usize,
    loads: Arc<Loads>,
    /// Each worker's queue of connections another worker accepted for it.
    inboxes: Arc<[mpsc::UnboundedSender<Handoff>]>,
}

/// A connection accepted by one worker for another, which serves it.
struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    hold: ConnHold,
}

/// Serves connections from `listener` until `shutdown` resolves, then drains.
///
/// Thread per core: each worker runs its own single-threaded runtime and accepts from the
/// shared socket, so a request and its upstream exchange stay on one thread (no cross-thread
/// wake-ups, no shared pool lock); see `forward::local`.
pub async fn accept_loop(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let max = gateway.snapshot.load().config.limits.max_connections;
    let (stop_tx, stop_rx) = watch::channel(false);
    let count = worker_count();
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..count).map(|_| mpsc::unbounded_channel()).unzip();
    let shared = Shared {
        gateway: gateway.clone(),
        tls,
        slots: Arc::new(Semaphore::new(max)),
        stop: stop_rx,
        max_connections: max,
        loads: Arc::new(Loads::new(&gateway.metrics, count)),
        inboxes: senders.into(),
    };
    let listener = listener.into_std()?;
    let mut workers = Vec::new();
    for (i, inbox) in receivers.into_iter().enumerate() {
        let (l, sh) = (listener.try_clone()?, shared.clone());
        workers.push(
            std::thread::Builder::new()
                .name(format!("keygate-worker-{i}"))
                .spawn(move || worker(i, l, inbox, sh))?,
        );
    }
    drop(listener);
    gateway.ready.store(true, Ordering::Relaxed);
    shutdown.await;
    // Load balancers keep sending for a while after they are told: say "not ready" at once,
    // keep serving for shutdown_delay, then stop accepting and drain.
    gateway.ready.store(false, Ordering::Relaxed);
    let delay = gateway.snapshot.load().config.shutdown_delay;
    if !delay.is_zero() {
        tracing::info!(delay = ?delay, "not ready; still accepting for shutdown_delay");
        tokio::time::sleep(delay).await;
    }
    let _ = stop_tx.send(true);
    let _ = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    })
    .await;
    Ok(())
}

fn worker(
    me: usize,
    listener: std::net::TcpListener,
    mut inbox: mpsc::UnboundedReceiver<Handoff>,
    shared: Shared,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a worker runtime");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "worker cannot use the listener");
                return;
            }
        };
        // Idle upstream connections are closed on time even when no request comes by.
        let sweeper = tokio::spawn(async {
            let mut tick = tokio::time::interval(crate::proxy::pool::SWEEP_EVERY);
            loop {
                tick.tick().await;
                crate::proxy::pool::sweep();
                crate::proxy::multiplex::sweep();
            }
        });
        let trimmer = tokio::spawn(crate::ops::trim::on_quiet());
        let mut stop = shared.stop.clone();
        let mut last_accept_warning = None;
        let mut permit = None;
        loop {
            // At the connection cap, stop accepting: extra clients wait in the kernel's queue.
            // Connections handed over by another worker bring their own slot.
            let slot = match permit.take() {
                Some(p) => p,
                None => tokio::select! {
                    biased;
                    _ = stop.changed() => break,
                    // Handed-over connections are already accepted: they go first.
                    Some(h) = inbox.recv() => {
                        take_over(&shared, h);
                        continue;
                    }
                    p = shared.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                },
            };
            let (stream, peer) = tokio::select! {
                biased;
                _ = stop.changed() => break,
                Some(h) = inbox.recv() => {
                    take_over(&shared, h);
                    permit = Some(slot);
                    continue;
                }
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning,
                        // and say so at most once a second (clients can cause some of these).
                        if last_accept_warning.is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(1)) {
                            tracing::warn!(error = %e, "accept failed");
                            last_accept_warning = Some(std::time::Instant::now());
                        } else {
                            tracing::debug!(error = %e, "accept failed");
                        }
                        permit = Some(slot);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            // A peer that vanishes without a FIN (a pulled cable, a NAT that forgot it) is
            // found by keepalive probes; an upgraded tunnel has no other idle limit.
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&DOWNSTREAM_KEEPALIVE);
            let to = shared.loads.pick(me);
            let hold = ConnHold::new(
                slot,
                &shared.gateway.metrics.active_connections,
                &shared.loads,
                to,
            );
            if to == me {
                tokio::spawn(connection(shared.clone(), stream, peer, hold));
            } else if let Some(mut back) = hand_over(&shared, to, stream, peer, hold) {
                // That worker has stopped: serve it here.
                back.hold.reseat(me);
                take_over(&shared, back);
            }
        }
        drop(listener);
        // Nothing more can be handed here; what already was is served like any connection
        // accepted before the stop, not left holding a slot until the grace period ends.
        inbox.close();
        while let Ok(h) = inbox.try_recv() {
            take_over(&shared, h);
        }
        sweeper.abort();
        trimmer.abort();
        // Drain: in-flight requests (and upgraded connections, which hold a slot) on this
        // worker get up to the grace period; whatever is left ends with the runtime.
        let max = shared.max_connections;
        let grace = shared.gateway.snapshot.load().config.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        while shared.slots.available_permits() < max {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("shutdown grace elapsed with requests still in flight");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// Sends a connection to worker `to`'s queue; gives it back if that worker has stopped.
fn hand_over(
    shared: &Shared,
    to: usize,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    hold: ConnHold,
) -> Option<Handoff> {
    // Leaves this worker's reactor; the other registers it with its own.
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, %peer, "cannot hand a connection over");
            return None;
        }
    };
    let handoff = Handoff { stream, peer, hold };
    match shared.inboxes.get(to) {
        Some(inbox) => inbox.send(handoff).err().map(|e| e.0),
        None => Some(handoff),
    }
}

/// Serves a connection another worker accepted for this one (or one this worker could not
/// hand over).
fn take_over(shared: &Shared, h: Handoff) {
    match tokio::net::TcpStream::from_std(h.stream) {
        Ok(stream) => {
            tokio::spawn(connection(shared.clone(), stream, h.peer, h.hold));
        }
        Err(e) => tracing::debug!(error = %e, peer = %h.peer, "cannot take over a connection"),
    }
}

async fn connection(
    shared: Shared,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    hold: ConnHold,
) {
    let state = Arc::new(ConnState::default());
    state.touch();
    // Limits come from the config of the moment, so a reload applies to new connections.
    let config = shared.gateway.snapshot.load().config.clone();
    match &shared.tls {
        None => serve_tracked(&shared, &config, stream, peer, false, state, hold).await,
        Some(acceptor) => {
            let handshake = acceptor.accept(stream);
            match tokio::time::timeout(config.limits.header_read_timeout, handshake).await {
                Ok(Ok(tls)) => serve_tracked(&shared, &config, tls, peer, true, state, hold).await,
                Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

/// Serves one (plain or TLS) stream with activity tracking for the idle watchdog.
async fn serve_tracked<I>(
    shared: &Shared,
    config: &crate::config::Config,
    io: I,
    peer: SocketAddr,
    https: bool,
    state: Arc<ConnState>,
    hold: ConnHold,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TrackedIo::new(io, state.clone(), hold);
    let conn = Conn { peer, https, state };
    let (gw, stop) = (shared.gateway.clone(), shared.stop.clone());
    let builder = local_builder(config);
    serve_conn(gw, io, conn, &builder, stop, &config.limits).await;
}

async fn serve_conn<I>(
    gw: Arc<Gateway>,
    io: I,
    conn: Conn,
    builder: &auto::Builder<StreamExecutor>,
    stop: watch::Receiver<bool>,
    limits: &Limits,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = conn.state.clone();
    let (gateway, peer) = (gw.clone(), conn.peer);
    let svc = service_fn(move |req| {
        crate::ops::trim::note_activity();
        handle(gw.clone(), conn.clone(), req)
    });
    let c = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(c);
    let mut watch = Watchdog::new(limits);
    let mut closing = false;
    // hyper wakes this task for every read and write. Each wake polls the connection; the
    // stop signal and the watchdog timer are polled once to register this task's waker,
    // which stays the same, and are otherwise read by their state. Polling all three
    // through `select!` cost about 800 instructions a request.
    let mut stop_wait = stop.clone();
    let stopped = stop_wait.changed();
    tokio::pin!(stopped);
    let timer = tokio::time::sleep(watch.check);
    tokio::pin!(timer);
    let (mut stop_armed, mut timer_armed) = (false, false);
    loop {
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(res) = c.as_mut().poll(cx) {
                return Poll::Ready(Wake::Ended(res));
            }
            if !closing {
                let stop_now = if stop_armed {
                    stop.has_changed().unwrap_or(true)
                } else {
                    stop_armed = true;
                    arm(stopped.as_mut(), cx)
                };
                if stop_now {
                    return Poll::Ready(Wake::Stop);
                }
            }
            if !timer_armed || timer.is_elapsed() {
                timer_armed = true;
                if arm(timer.as_mut(), cx) {
                    return Poll::Ready(Wake::Check);
                }
            }
            Poll::Pending
        })
        .await;
        match event {
            Wake::Ended(res) => {
                if let Err(e) = res {
                    log_rejected_head(&gateway, peer, e.as_ref());
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            Wake::Stop => {
                c.as_mut().graceful_shutdown();
                closing = true;
            }
            Wake::Check => {
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + watch.check);
                timer_armed = false;
                match watch.verdict(&state) {
                    Verdict::Open => {}
                    // A client that started a head and stalls gets no answer, as with hyper's
                    // own header timeout.
                    Verdict::HeadTimedOut => return,
                    Verdict::Idle if !closing => {
                        // HTTP/1: closes at once (nothing is in flight); HTTP/2: GOAWAY.
                        c.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    Verdict::Idle => {
                        if watch.overdue() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Polls `f` outside tokio's per-task budget; true when it is ready.
///
/// [`serve_conn`] polls its stop signal and watchdog timer once to register its waker and
/// then only reads their state. A budgeted poll made after the connection spent the task's
/// budget would return Pending without registering anything, and that signal would never
/// wake the connection again.
fn arm<F: Future>(f: std::pin::Pin<&mut F>, cx: &mut std::task::Context<'_>) -> bool {
    let mut unbudgeted = tokio::task::unconstrained(f);
    std::pin::Pin::new(&mut unbudgeted).poll(cx).is_ready()
}

/// What woke a connection's task, in [`serve_conn`].
enum Wake<E> {
    /// The connection finished, or failed.
    Ended(Result<(), E>),
    /// The gateway is draining.
    Stop,
    /// The watchdog's period passed.
    Check,
}

/// Logs a request hyper refused before our service saw it (bad header bytes, an oversized
/// head): hyper has already answered 400 or 431 and closed. Method and path are unknown.
fn log_rejected_head(gw: &Gateway, peer: SocketAddr, err: &(dyn std::error::Error + 'static)) {
    let Some(e) = err.downcast_ref::<hyper::Error>() else {
        return;
    };
    if !e.is_parse() {
        return;
    }
    let status = if e.is_parse_too_large() { 431 } else { 400 };
    let snapshot = gw.snapshot.load();
    gw.metrics
        .count_request(&gw.metrics.unrouted, status, AuthOutcome::NotChecked);
    let entry = Box::new(Entry {
        time: SystemTime::now(),
        head: HeadText::new(&headers::new_request_id(), "/", None, None),
        client: peer,
        forwarded_client: None,
        method: Method::from_bytes(b"-").unwrap_or_default(),
        route: None,
        status,
        duration: std::time::Duration::ZERO,
        bytes: 0,
        key_id: None,
        service_account: None,
        auth: AuthOutcome::NotChecked,
        upstream_status: None,
        normalized: Some("-".into()),
        upstream: None,
        upstream_time: None,
        error: Some("bad_request_head"),
        grpc_status: None,
    });
    if !gw.access_log.send(entry, snapshot.config.log_format) {
        gw.metrics.access_log_dropped.increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;

    /// A connection that used up its task's budget still arms its watchdog: the timer wakes
    /// the task when it fires, though the task never polls the timer again before that.
    #[tokio::test]
    async fn arming_registers_after_the_budget_is_spent() {
        let mut timer = pin!(tokio::time::sleep(Duration::from_millis(20)));
        let mut armed = false;
        let fired = std::future::poll_fn(|cx| {
            if armed {
                return if timer.is_elapsed() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                };
            }
            // Spend the budget the way a busy connection's own poll can.
            loop {
                let mut spend = pin!(tokio::task::consume_budget());
                if spend.as_mut().poll(cx).is_pending() {
                    break;
                }
            }
            armed = true;
            assert!(!arm(timer.as_mut(), cx), "20 ms have not passed");
            Poll::Pending
        });
        tokio::time::timeout(Duration::from_secs(10), fired)
            .await
            .expect("the timer woke the task");
    }
}

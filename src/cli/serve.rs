//! `serve`: loads the files, starts the listener, reload, the admin listener and the state
//! flusher, and on shutdown drains and flushes last-used times.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::config::Problems;
use crate::control::{reload, snapshot::Snapshot};
use crate::keys::last_used as state;
use crate::ops::metrics::ReloadStats;
use crate::ops::{accesslog, admin, metrics};
use crate::proxy::{listener, pipeline::Gateway};
use crate::{config, wire::tls};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The config or key file is invalid.
    #[error("{0}")]
    Invalid(#[from] Problems),
    /// Binding or another I/O failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Serves the gateway described by `config_path` on `listener` until `shutdown` resolves.
///
/// On shutdown, readiness turns false, the listener closes, in-flight requests get
/// `shutdown_grace` to finish, and last-used state is flushed.
pub async fn serve(
    config_path: &Path,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let metrics = Arc::new(metrics::Metrics::new());
    // Stores are built and freed on one thread, so their pages return to the OS (see there).
    let reload_thread = reload::ReloadThread::start()?;
    let (path, m) = (config_path.to_path_buf(), metrics.clone());
    let (snapshot, fingerprints) = reload_thread
        .run(move || reload::load(&path, &m))
        .await
        .ok_or_else(|| std::io::Error::other("loading the config failed unexpectedly"))??;
    let config = snapshot.config.clone();
    let tls = listener_tls(&config, config_path)?;
    let admin_listener = match config.admin_listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    tracing::info!(
        config = %config_path.display(),
        routes = config.routes.len(),
        keys = snapshot.keys.len(),
        listen = %listener.local_addr()?,
        tls = config.tls.is_some(),
        admin = ?config.admin_listen,
        "keygate serving"
    );
    state::apply(&state::load(&config.state_file), &snapshot.keys);
    let current = Arc::new(ArcSwap::from_pointee(snapshot));
    let stats = Arc::new(ReloadStats::default());
    let (access_log, log_writer) = accesslog::AccessLog::start();
    let ready = Arc::new(AtomicBool::new(false));
    let gateway = Arc::new(Gateway {
        snapshot: current.clone(),
        metrics: metrics.clone(),
        access_log,
        ready: ready.clone(),
    });
    let admin = admin_listener.map(|l| {
        let (metrics, current, stats) = (metrics.clone(), current.clone(), stats.clone());
        let view = admin::Admin {
            ready,
            metrics: Box::new(move || metrics.render(&current.load().keys, &stats)),
        };
        (Arc::new(view), l)
    });
    let reloader = Arc::new(reload::Reloader {
        current: current.clone(),
        config_path: config_path.to_path_buf(),
        stats,
        metrics: metrics.clone(),
        tls: tls.as_ref().map(|(r, _)| r.clone()),
    });
    let mut background = vec![
        tokio::spawn(flush_state_loop(current.clone(), reload_thread.clone())),
        tokio::spawn(reload::run(reloader, fingerprints, reload_thread)),
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                metrics.upkeep();
            }
        }),
    ];
    if let Some((view, l)) = admin {
        background.push(tokio::spawn(admin::run(view, l)));
    }
    listener::accept_loop(gateway.clone(), listener, tls.map(|(_, a)| a), shutdown).await?;
    for task in background {
        task.abort();
    }
    let last = current.load_full();
    let _ = tokio::task::spawn_blocking(move || flush_state(&last, &mut None)).await;
    // The writer thread ends once the last sender is gone; connections still draining past
    // the grace period may hold one, so do not wait for it forever.
    drop(gateway);
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::task::spawn_blocking(move || log_writer.join()),
    )
    .await;
    Ok(())
}

/// The listener's certificate resolver (for hot swaps) and acceptor, when TLS is on.
fn listener_tls(
    config: &config::Config,
    config_path: &Path,
) -> Result<Option<(Arc<tls::CertResolver>, tokio_rustls::TlsAcceptor)>, Problems> {
    let Some(files) = &config.tls else {
        return Ok(None);
    };
    let whole = |e| Problems(vec![config::Problem::whole(config_path, e)]);
    let pair = tls::load_pair(&files.cert, &files.key).map_err(whole)?;
    let resolver = Arc::new(tls::CertResolver::new(pair));
    let server_config = tls::server_config(resolver.clone()).map_err(whole)?;
    Ok(Some((
        resolver,
        tokio_rustls::TlsAcceptor::from(Arc::new(server_config)),
    )))
}

/// Writes last-used times when they changed since the previous write (`previous` is that
/// write's [`state::fingerprint`]).
fn flush_state(snapshot: &Snapshot, previous: &mut Option<u64>) {
    let mark = state::fingerprint(&snapshot.keys);
    if *previous == Some(mark) {
        return;
    }
    let path = &snapshot.config.state_file;
    match state::save(path, &state::capture(&snapshot.keys)) {
        Ok(()) => *previous = Some(mark),
        Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot write state file"),
    }
    // The captured map and its JSON were megabytes with many keys; return them.
    crate::ops::trim::collect_now();
}

/// Flushes on the reload thread, whose heap the captured state is then freed back from.
async fn flush_state_loop(current: Arc<ArcSwap<Snapshot>>, thread: reload::ReloadThread) {
    let mut tick = tokio::time::interval(state::FLUSH_EVERY);
    tick.tick().await;
    let mut previous = None;
    loop {
        tick.tick().await;
        let snap = current.load_full();
        let prev = previous.take();
        previous = thread
            .run(move || {
                let mut prev = prev;
                flush_state(&snap, &mut prev);
                prev
            })
            .await
            .flatten();
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown signal received; draining");
}

//! keygate: an API gateway that lets through only requests carrying a valid, unexpired,
//! unrevoked API key with the right scope.
//!
//! ```text
//!   client ──► listener (server.rs) ──► router (path.rs, routes.rs) ──► auth (auth.rs)
//!                                                                          │ Permit
//!   client ◄── response (error.rs on refusal) ◄── upstream ◄── forward (forward.rs, headers.rs)
//!
//!   reload.rs: config + key file ──parse/validate──► Snapshot ──ArcSwap──► request path
//! ```
//!
//! The request path loads one snapshot (routes + keys) per request without a lock; reload
//! builds a new snapshot off the path and swaps it in.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod forward;
pub mod headers;
pub mod keyadmin;
pub mod keyfile;
pub mod keys;
pub mod path;
pub mod reload;
pub mod routes;
pub mod server;
pub mod state;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::config::Problems;
use crate::forward::Forwarder;
use crate::reload::ReloadStats;
use crate::server::Gateway;

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

/// Default time in-flight requests get to finish after shutdown starts.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default upstream connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the gateway described by `config_path` on `listener` until `shutdown` resolves.
pub async fn serve(
    config_path: &Path,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (snapshot, fingerprints) = reload::load(config_path)?;
    tracing::info!(
        config = %config_path.display(),
        routes = snapshot.config.routes.len(),
        keys = snapshot.keys.len(),
        listen = %listener.local_addr()?,
        "keygate serving"
    );
    state::apply(&state::load(&snapshot.config.state_file), &snapshot.keys);
    let current = Arc::new(ArcSwap::from_pointee(snapshot));
    let stats = Arc::new(ReloadStats::default());
    let gateway = Arc::new(Gateway {
        snapshot: current.clone(),
        forwarder: Forwarder::new(DEFAULT_CONNECT_TIMEOUT),
        reload_stats: stats.clone(),
    });
    let reloader = tokio::spawn(reload::run(
        current.clone(),
        config_path.to_path_buf(),
        fingerprints,
        stats,
    ));
    let flusher = tokio::spawn(flush_state_loop(current.clone()));
    server::accept_loop(gateway, listener, shutdown, DEFAULT_SHUTDOWN_GRACE).await;
    reloader.abort();
    flusher.abort();
    let last = current.load_full();
    let _ = tokio::task::spawn_blocking(move || flush_state(&last, &mut None)).await;
    Ok(())
}

/// Writes last-used times when they changed since the previous write.
fn flush_state(snapshot: &reload::Snapshot, previous: &mut Option<state::State>) {
    let now = state::capture(&snapshot.keys);
    if previous.as_ref() == Some(&now) {
        return;
    }
    let path = &snapshot.config.state_file;
    match state::save(path, &now) {
        Ok(()) => *previous = Some(now),
        Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot write state file"),
    }
}

async fn flush_state_loop(current: Arc<ArcSwap<reload::Snapshot>>) {
    let mut tick = tokio::time::interval(state::FLUSH_EVERY);
    tick.tick().await;
    let mut previous = None;
    loop {
        tick.tick().await;
        let snap = current.load_full();
        let prev = previous.take();
        previous = tokio::task::spawn_blocking(move || {
            let mut prev = prev;
            flush_state(&snap, &mut prev);
            prev
        })
        .await
        .unwrap_or(None);
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

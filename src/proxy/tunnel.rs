//! Upgraded (WebSocket) connections: bytes both ways, ended when the key that opened the
//! tunnel is revoked, expires or leaves the key file.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;

use crate::control::snapshot::Snapshot;
use crate::keys;
use crate::proxy::authorize;

/// Ends a tunnel once the key that opened it is revoked, expired or gone.
pub(crate) struct KeyWatch {
    pub(crate) snapshots: Arc<ArcSwap<Snapshot>>,
    pub(crate) digest: keys::Digest32,
    /// The route the tunnel was opened on, by name: its scopes may change on reload.
    pub(crate) route: Arc<str>,
}

impl KeyWatch {
    fn still_valid(&self) -> bool {
        let now = authorize::now_secs();
        let snap = self.snapshots.load();
        let Some(route) = snap.config.routes.iter().find(|r| r.name == self.route) else {
            return false;
        };
        snap.keys.lookup(&self.digest).is_some_and(|k| {
            !k.revoked
                && k.expires_at().is_none_or(|t| now < t)
                && (route.public || k.missing_scope(&route.scopes).is_none())
        })
    }
}

/// How often a tunnel re-checks its key: well inside the 2 s a revocation may take.
const KEY_RECHECK: Duration = Duration::from_millis(500);

/// Copies bytes both ways between an upgraded client and upstream connection.
///
/// The client's upgraded stream still holds its connection slot, so a tunnel counts toward
/// `max_connections` and the connection gauge, and ends with the worker at shutdown.
pub(crate) async fn splice(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    watch: Option<KeyWatch>,
) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    let mut tick = tokio::time::interval(KEY_RECHECK);
    loop {
        tokio::select! {
            res = &mut copy => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
                return;
            }
            _ = tick.tick(), if watch.is_some() => {
                if watch.as_ref().is_some_and(|w| !w.still_valid()) {
                    tracing::info!("closing an upgraded connection: its key is no longer valid");
                    return;
                }
            }
        }
    }
}

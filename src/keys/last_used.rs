//! Last-used state: per-key timestamps recorded lock-free on the request path, persisted to
//! `state_file` every 10 s and at shutdown, atomically.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{format_time, parse_time, KeyStore};

/// How often last-used times are written.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(10);

/// The state file's content: key id -> last use, RFC 3339.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct State {
    /// Last successful use per key id.
    #[serde(default)]
    pub(crate) last_used: BTreeMap<String, String>,
}

/// Reads the state file; a missing file is empty state, a corrupt one is logged and empty.
pub(crate) fn load(path: &Path) -> State {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "state file is corrupt; starting with no last-used times");
                State::default()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read state file; starting with no last-used times");
            State::default()
        }
    }
}

/// Last use of a key id in unix seconds, if recorded.
pub(crate) fn last_used_secs(state: &State, id: &str) -> Option<i64> {
    state
        .last_used
        .get(id)
        .and_then(|t| parse_time(t).ok())
        .map(time::OffsetDateTime::unix_timestamp)
}

/// Seeds a fresh key store's last-used times from saved state.
pub(crate) fn apply(state: &State, keys: &KeyStore) {
    for entry in keys.entries() {
        if let Some(t) = last_used_secs(state, &entry.id) {
            entry.last_used.fetch_max(t, Ordering::Relaxed);
        }
    }
}

/// The state of every key currently loaded; keys that no longer exist drop out.
pub(crate) fn capture(keys: &KeyStore) -> State {
    let last_used = keys
        .entries()
        .filter_map(|e| {
            let t = e.last_used.load(Ordering::Relaxed);
            let t = time::OffsetDateTime::from_unix_timestamp(t)
                .ok()
                .filter(|_| t > 0)?;
            Some((e.id.clone(), format_time(t)))
        })
        .collect();
    State { last_used }
}

/// Writes state atomically.
pub(crate) fn save(path: &Path, state: &State) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    super::file::write_atomic(path, &bytes)
}

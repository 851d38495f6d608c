//! Key state: per-key last-used times and quota usage, recorded lock-free on the request path,
//! persisted to `state_file` every 10 s and at shutdown, atomically, so a restart keeps both.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::limit::Quota;
use super::{format_time, now_secs, parse_time, KeyEntry, KeyStore};

/// How often last-used times are written.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(10);

/// The state file's content: key id -> last use (RFC 3339) and quota usage.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct State {
    /// Last successful use per key id.
    #[serde(default)]
    pub(crate) last_used: BTreeMap<String, String>,
    /// Requests counted against each quota-carrying key in its current period.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) usage: BTreeMap<String, QuotaUse>,
}

/// One key's quota use: the period it counts (by its start) and how many requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct QuotaUse {
    /// Start of the period, RFC 3339.
    pub(crate) period_start: String,
    /// Requests counted in it.
    pub(crate) used: u64,
}

/// Requests counted against `quota` for key `id` in the period holding `now`.
pub(crate) fn quota_used(state: &State, id: &str, quota: &Quota, now: i64) -> u64 {
    let Some(u) = state.usage.get(id) else {
        return 0;
    };
    let start = parse_time(&u.period_start).map(time::OffsetDateTime::unix_timestamp);
    if start.is_ok_and(|s| s == quota.period(now).0) {
        u.used
    } else {
        0
    }
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

/// Seeds a fresh key store's last-used times and quota usage from saved state.
pub(crate) fn apply(state: &State, keys: &KeyStore) {
    let now = now_secs();
    for entry in keys.entries() {
        if let Some(t) = last_used_secs(state, entry.id()) {
            entry.last_used.fetch_max(t, Ordering::Relaxed);
        }
        let quota = entry.limits.as_ref().and_then(|l| l.quota.as_ref());
        if let (Some(q), Some(usage)) = (quota, &entry.usage) {
            let used = quota_used(state, entry.id(), q, now);
            if used > 0 {
                q.restore(&usage.quota, q.period(now).0, used);
            }
        }
    }
}

/// What the state file records of one key: its last use (0 for never) and, when it spent
/// any, its quota use in the current period with that period's start. [`capture`] and
/// [`fingerprint`] both read it, so they cannot disagree on what counts.
fn recorded(e: &KeyEntry, now: i64) -> (i64, Option<(u64, i64)>) {
    let quota = e
        .limits
        .as_ref()
        .and_then(|l| l.quota.as_ref())
        .zip(e.usage.as_ref())
        .map(|(q, u)| (q.used(&u.quota, now), q.period(now).0))
        .filter(|&(used, _)| used > 0);
    (e.last_used.load(Ordering::Relaxed), quota)
}

/// The state of every key currently loaded; keys that no longer exist drop out.
pub(crate) fn capture(keys: &KeyStore) -> State {
    let now = now_secs();
    let mut state = State::default();
    let time_of = |t: i64| time::OffsetDateTime::from_unix_timestamp(t).ok();
    for e in keys.entries() {
        let (t, quota) = recorded(e, now);
        if let Some(t) = time_of(t).filter(|_| t > 0) {
            state.last_used.insert(e.id().to_string(), format_time(t));
        }
        if let Some((used, start)) = quota.and_then(|(used, s)| Some((used, time_of(s)?))) {
            let period_start = format_time(start);
            let quota_use = QuotaUse { period_start, used };
            state.usage.insert(e.id().to_string(), quota_use);
        }
    }
    state
}

/// A digest of what [`capture`] would record, without building it: when it has not changed
/// the file already says this, and 100,000 keys cost a scan instead of a map of strings
/// rebuilt every flush.
pub(crate) fn fingerprint(keys: &KeyStore) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let now = now_secs();
    for e in keys.entries() {
        let (t, quota) = recorded(e, now);
        if t > 0 || quota.is_some() {
            (e.id(), t, quota).hash(&mut h);
        }
    }
    h.finish()
}

/// Writes state atomically.
pub(crate) fn save(path: &Path, state: &State) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    super::file::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_moves_with_what_capture_would_write_and_only_then() {
        let path = Path::new("keys.yaml");
        let text = "keys:\n  - id: a\n    hash: sha256:0000000000000000000000000000000000000000000000000000000000000001\n    service_account: sa\n    scopes: [x]\n  - id: b\n    hash: sha256:0000000000000000000000000000000000000000000000000000000000000002\n    service_account: sa\n    scopes: [x]\n";
        let keys = KeyStore::parse(path, text, None).unwrap();
        let unused = fingerprint(&keys);
        assert_eq!(
            fingerprint(&keys),
            unused,
            "nothing changed, nothing to write"
        );
        let a = keys.entries().find(|e| e.id() == "a").unwrap();
        a.touch(1_700_000_000);
        let used = fingerprint(&keys);
        assert_ne!(used, unused);
        assert_eq!(capture(&keys).last_used.len(), 1);
        a.touch(1_700_000_000);
        assert_eq!(
            fingerprint(&keys),
            used,
            "the same second again writes nothing"
        );
        a.touch(1_700_000_001);
        assert_ne!(fingerprint(&keys), used);
    }
}

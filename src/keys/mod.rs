//! API keys: the [`KeyRecord`] a key file holds and the rules for its fields.
//!
//! The parts live beside it: `format` (the `kg_` key, checksum, digest), `store` (the
//! [`KeyStore`] snapshot the request path probes), `scope` (grants and scope names), [`file`]
//! (parse, render, lock, atomic write), [`last_used`] (per-key times persisted to disk) and
//! [`audit`] (one JSON line per key change).

use std::fmt;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub(crate) mod audit;
pub mod file;
mod format;
pub mod last_used;
pub mod limit;
mod scope;
mod store;

pub use file::{
    load_key_file, parse_key_file, parse_key_file_each, parse_key_file_from, RecordSink,
};
pub use format::{checksum, digest, generate, hash_line, well_formed, Digest32, KEY_LEN};
pub(crate) use format::{parse_hash, KEY_PREFIX};
pub(crate) use scope::{check_scope, Grant};
pub use store::{KeyEntry, KeyStore, StoreBuilder};

/// One key as the key file describes it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public identifier.
    pub id: String,
    /// SHA-256 of the secret.
    pub hash: Digest32,
    /// Who the key acts as.
    pub service_account: String,
    /// Scopes as written.
    pub scopes: Vec<String>,
    /// Free text.
    pub description: Option<String>,
    /// Creation time.
    pub created_at: Option<OffsetDateTime>,
    /// Expiry time, if any.
    pub expires_at: Option<OffsetDateTime>,
    /// Revocation time; present means revoked.
    pub revoked_at: Option<OffsetDateTime>,
    /// Rate limit, quota and client networks; empty when the entry sets none.
    pub limits: limit::Limits,
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("service_account", &self.service_account)
            .finish_non_exhaustive()
    }
}

/// Key ids: letters, digits, `-`, `_`, `.`.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Service accounts: visible ASCII, no spaces (they travel in a header).
pub(crate) fn valid_service_account(sa: &str) -> bool {
    !sa.is_empty() && sa.len() <= 256 && sa.bytes().all(|b| b.is_ascii_graphic())
}

/// Unix seconds now, the clock expiry and quota periods are judged by.
pub fn now_secs() -> i64 {
    unix_secs(std::time::SystemTime::now())
}

/// `t` in whole seconds since the Unix epoch (0 before it).
pub fn unix_secs(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Parses an RFC 3339 timestamp.
pub fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text.trim(), &Rfc3339).map_err(|_| {
        format!("invalid timestamp {text:?}: expected RFC 3339 like 2026-11-29T12:00:00Z")
    })
}

/// Formats a time as RFC 3339 in UTC, whole seconds.
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t
        .to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t);
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

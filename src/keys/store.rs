//! The [`KeyStore`] snapshot the request path reads: SHA-256 of the presented key -> entry,
//! one hash-map probe per request, with last-used times carried across reloads.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use http::HeaderValue;
use time::OffsetDateTime;

use super::limit::{mono_ns, Limits, Usage};
use super::{Digest32, Grant, KeyRecord};

/// A key as the request path sees it.
pub struct KeyEntry {
    /// Public identifier.
    pub id: String,
    /// Service account.
    pub service_account: String,
    /// Prebuilt identity header values.
    pub id_header: HeaderValue,
    /// Prebuilt identity header values.
    pub service_account_header: HeaderValue,
    grants: Vec<Grant>,
    /// Unix seconds; checked against the clock on every request.
    pub expires_at: Option<i64>,
    /// Present in the key file as revoked.
    pub revoked: bool,
    /// Last successful use in unix seconds, 0 for never; survives reloads.
    pub last_used: Arc<AtomicI64>,
    /// Per-key request counter, registered on first use when `metrics.per_key` is on.
    pub uses: std::sync::OnceLock<metrics::Counter>,
    /// Rate limit, quota and client networks; `None` for a key without any.
    pub limits: Option<Box<Limits>>,
    /// Spent rate and quota budget, shared with the previous snapshot's entry for this hash.
    pub usage: Option<Arc<Usage>>,
    /// This entry's index in its store, for per-route tables beside it.
    pub slot: u32,
}

impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyEntry({})", self.id)
    }
}

impl KeyEntry {
    /// The first required scope this key does not hold.
    pub fn missing_scope<'r>(&self, required: &'r [String]) -> Option<&'r str> {
        required
            .iter()
            .find(|r| !self.grants.iter().any(|g| g.covers(r)))
            .map(String::as_str)
    }

    /// Records a successful use; skips the write when the second has not changed.
    pub fn touch(&self, now: i64) {
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }
}

/// Hashes a SHA-256 digest by taking its first bytes: already uniform, so no rehash is needed.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        if let Some(head) = bytes.first_chunk::<8>() {
            self.0 ^= u64::from_le_bytes(*head);
        } else {
            for &b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(b);
            }
        }
    }
}

/// Immutable key snapshot: digest -> entry.
#[derive(Debug, Default)]
pub struct KeyStore {
    by_hash: HashMap<Digest32, KeyEntry, BuildHasherDefault<DigestHasher>>,
}

impl KeyStore {
    /// Builds a snapshot; last-used times carry over from `previous` for unchanged keys.
    pub fn build(records: &[KeyRecord], previous: Option<&KeyStore>) -> KeyStore {
        let mut by_hash = HashMap::with_capacity_and_hasher(records.len(), Default::default());
        for (slot, r) in records.iter().enumerate() {
            let before = previous.and_then(|p| p.by_hash.get(&r.hash));
            let last_used = before.map(|e| e.last_used.clone()).unwrap_or_default();
            // A changed limit keeps what was spent under the old one.
            let metered = r.limits.rate.is_some() || r.limits.quota.is_some();
            let usage = metered.then(|| {
                let usage: Arc<Usage> = before.and_then(|e| e.usage.clone()).unwrap_or_default();
                let old_rate = before.and_then(|e| e.limits.as_ref()?.rate);
                if let (Some(new), Some(old)) = (&r.limits.rate, old_rate) {
                    new.rescale(&usage.rate, &old, mono_ns(std::time::Instant::now()));
                }
                usage
            });
            let entry = KeyEntry {
                id_header: HeaderValue::from_str(&r.id).unwrap_or(HeaderValue::from_static("")),
                service_account_header: HeaderValue::from_str(&r.service_account)
                    .unwrap_or(HeaderValue::from_static("")),
                id: r.id.clone(),
                service_account: r.service_account.clone(),
                grants: r.scopes.iter().map(|s| Grant::parse(s)).collect(),
                expires_at: r.expires_at.map(OffsetDateTime::unix_timestamp),
                revoked: r.revoked_at.is_some(),
                last_used,
                uses: std::sync::OnceLock::new(),
                limits: (!r.limits.is_empty()).then(|| Box::new(r.limits.clone())),
                usage,
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
            };
            by_hash.insert(r.hash, entry);
        }
        KeyStore { by_hash }
    }

    /// Finds a key by the digest of what was presented.
    pub fn lookup(&self, digest: &Digest32) -> Option<&KeyEntry> {
        self.by_hash.get(digest)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// True when no keys are loaded.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Every entry with its digest, in no particular order.
    pub fn by_digest(&self) -> impl Iterator<Item = (&Digest32, &KeyEntry)> {
        self.by_hash.iter()
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &KeyEntry> {
        self.by_hash.values()
    }
}

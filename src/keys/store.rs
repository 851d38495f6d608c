//! The [`KeyStore`] snapshot the request path reads: SHA-256 of the presented key -> entry,
//! one hash-table probe per request, with last-used times carried across reloads, and the
//! [`StoreBuilder`] that fills one a record at a time.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use hashbrown::HashTable;
use http::HeaderValue;
use time::OffsetDateTime;

use super::limit::{mono_ns, Limits, Usage};
use super::{Digest32, Grant, KeyRecord};
use crate::wire::headers::never_indexed;

/// A key as the request path sees it.
///
/// Kept small because there may be 100,000 of them: the account and its header value are
/// shared by every key of that account, and so is the grant list of each distinct scope set.
pub struct KeyEntry {
    /// SHA-256 of the secret: the store's lookup key.
    pub hash: Digest32,
    /// The public identifier as its identity header value; [`KeyEntry::id`] reads it.
    pub id_header: HeaderValue,
    /// The service account as its header value, one buffer shared by the account's keys.
    pub service_account_header: HeaderValue,
    grants: Arc<[Grant]>,
    /// Expiry in unix seconds, `i64::MAX` for none: an `Option` would cost 8 more bytes a key.
    expires: i64,
    /// Present in the key file as revoked.
    pub revoked: bool,
    /// Last successful use in unix seconds, 0 for never; survives reloads.
    pub last_used: Arc<AtomicI64>,
    /// Rate limit, quota and client networks; `None` for a key without any.
    pub limits: Option<Box<Limits>>,
    /// Spent rate and quota budget, shared with the previous snapshot's entry for this hash.
    pub usage: Option<Arc<Usage>>,
    /// This entry's index in its store, for per-route tables beside it.
    pub slot: u32,
}

impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyEntry({})", self.id())
    }
}

impl KeyEntry {
    /// Public identifier; kept only as its header value, which the file's id rules make
    /// always valid text.
    pub fn id(&self) -> &str {
        self.id_header.to_str().unwrap_or_default()
    }

    /// Service account.
    pub fn service_account(&self) -> &str {
        self.service_account_header.to_str().unwrap_or_default()
    }

    /// Expiry in unix seconds; checked against the clock on every request.
    pub fn expires_at(&self) -> Option<i64> {
        (self.expires != i64::MAX).then_some(self.expires)
    }

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

/// A SHA-256 digest is already uniform: its first bytes are the hash.
fn hash_of(digest: &Digest32) -> u64 {
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(head)
}

/// Immutable key snapshot: digest -> entry.
///
/// Entries sit in one `Vec` (their `slot` is their index) and the hash table holds only
/// indexes into it, 4 bytes per bucket, so the table's slack costs little.
#[derive(Default)]
pub struct KeyStore {
    entries: Vec<KeyEntry>,
    by_hash: HashTable<u32>,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyStore({} keys)", self.entries.len())
    }
}

impl KeyStore {
    /// Builds a snapshot; last-used times carry over from `previous` for unchanged keys.
    pub fn build(records: &[KeyRecord], previous: Option<&KeyStore>) -> KeyStore {
        let mut b = StoreBuilder::new(records.len(), previous);
        for r in records {
            b.push(r);
        }
        b.finish()
    }

    /// Parses and checks key file text straight into a store, one entry at a time, so the
    /// file's records never sit in a list beside the store; state carries over from
    /// `previous`.
    pub fn parse(
        path: &std::path::Path,
        text: &str,
        previous: Option<&KeyStore>,
    ) -> Result<KeyStore, crate::config::Problems> {
        // A guess at the key count (every entry has one `hash:`) saves regrowing the entries.
        let guess = text.matches("hash:").count();
        let mut b = StoreBuilder::new(guess, previous);
        super::parse_key_file_each(path, text, &mut b)?;
        Ok(b.finish())
    }

    /// [`KeyStore::parse`] from the open key file, read line by line so its text is never
    /// held whole; also returns the SHA-256 of what was read.
    pub fn parse_file(
        path: &std::path::Path,
        file: std::fs::File,
        previous: Option<&KeyStore>,
    ) -> Result<(KeyStore, [u8; 32]), crate::config::Problems> {
        // Entries are moved when their Vec regrows (twice the memory for a moment), so the
        // guess errs high: the previous count, or the file's size at ~200 bytes an entry,
        // with an eighth to spare for keys added since.
        let by_size = file.metadata().map_or(0, |m| m.len() / 200);
        let guess = usize::try_from(by_size)
            .unwrap_or(0)
            .max(previous.map_or(0, KeyStore::len));
        let mut b = StoreBuilder::new(guess + guess / 8 + 16, previous);
        let hash = super::parse_key_file_from(path, file, &mut b)?;
        Ok((b.finish(), hash))
    }

    /// Finds a key by the digest of what was presented.
    pub fn lookup(&self, digest: &Digest32) -> Option<&KeyEntry> {
        let entries = &self.entries;
        self.by_hash
            .find(hash_of(digest), |&i| entries[i as usize].hash == *digest)
            .map(|&i| &entries[i as usize])
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no keys are loaded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry with its digest, in no particular order.
    pub fn by_digest(&self) -> impl Iterator<Item = (&Digest32, &KeyEntry)> {
        self.entries.iter().map(|e| (&e.hash, e))
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &KeyEntry> {
        self.entries.iter()
    }
}

impl super::RecordSink for StoreBuilder<'_> {
    fn record(&mut self, record: KeyRecord) {
        self.push(&record);
    }
    fn restart(&mut self) {
        self.store.entries.clear();
        self.store.by_hash.clear();
    }
}

/// Builds a [`KeyStore`] one record at a time, so a key file can be checked and stored in one
/// pass without a list of every record beside the store.
pub struct StoreBuilder<'p> {
    store: KeyStore,
    previous: Option<&'p KeyStore>,
    accounts: HashMap<Box<str>, HeaderValue>,
    scope_sets: HashMap<Vec<String>, Arc<[Grant]>>,
}

impl<'p> StoreBuilder<'p> {
    /// A builder expecting about `capacity` keys; state carries over from `previous`.
    pub fn new(capacity: usize, previous: Option<&'p KeyStore>) -> StoreBuilder<'p> {
        StoreBuilder {
            store: KeyStore {
                entries: Vec::with_capacity(capacity),
                by_hash: HashTable::with_capacity(capacity),
            },
            previous,
            accounts: HashMap::new(),
            scope_sets: HashMap::new(),
        }
    }

    /// Adds a key; a second record with the same hash replaces the first.
    pub fn push(&mut self, r: &KeyRecord) {
        let before = self.previous.and_then(|p| p.lookup(&r.hash));
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
        let service_account_header = self.account(&r.service_account);
        let grants = self.grants(&r.scopes);
        let entries = &mut self.store.entries;
        let hash = hash_of(&r.hash);
        let existing = self
            .store
            .by_hash
            .find(hash, |&i| entries[i as usize].hash == r.hash)
            .copied();
        let slot = existing.unwrap_or(u32::try_from(entries.len()).unwrap_or(u32::MAX));
        let entry = KeyEntry {
            hash: r.hash,
            // Key ids and service accounts take many values: with 1,000 keys on an h2c upstream
            // h2's encoder made about 80 comparisons a request before these were marked.
            id_header: never_indexed(
                HeaderValue::from_str(&r.id).unwrap_or(HeaderValue::from_static("")),
            ),
            service_account_header,
            grants,
            expires: r
                .expires_at
                .map_or(i64::MAX, OffsetDateTime::unix_timestamp),
            revoked: r.revoked_at.is_some(),
            last_used,
            limits: (!r.limits.is_empty()).then(|| Box::new(r.limits.clone())),
            usage,
            slot,
        };
        match existing {
            Some(i) => entries[i as usize] = entry,
            None => {
                entries.push(entry);
                self.store
                    .by_hash
                    .insert_unique(hash, slot, |&i| hash_of(&entries[i as usize].hash));
            }
        }
    }

    /// The shared header value of a service account.
    fn account(&mut self, name: &str) -> HeaderValue {
        if let Some(v) = self.accounts.get(name) {
            return v.clone();
        }
        let header = never_indexed(
            HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(name.as_bytes()))
                .unwrap_or(HeaderValue::from_static("")),
        );
        self.accounts.insert(name.into(), header.clone());
        header
    }

    /// The shared grants of a scope list.
    fn grants(&mut self, scopes: &[String]) -> Arc<[Grant]> {
        if let Some(g) = self.scope_sets.get(scopes) {
            return g.clone();
        }
        let g: Arc<[Grant]> = scopes.iter().map(|s| Grant::parse(s)).collect();
        self.scope_sets.insert(scopes.to_vec(), g.clone());
        g
    }

    /// The finished store; spare capacity from a large overestimate is given back.
    pub fn finish(mut self) -> KeyStore {
        let (len, capacity) = (self.store.entries.len(), self.store.entries.capacity());
        if capacity > len + len / 4 + 16 {
            self.store.entries.shrink_to_fit();
        }
        self.store
    }
}
#[cfg(all(test, target_pointer_width = "64"))]
mod tests {
    #[test]
    fn identity_values_are_never_indexed() {
        let text = "keys:\n  - id: a\n    hash: sha256:0000000000000000000000000000000000000000000000000000000000000001\n    service_account: sa\n    scopes: [x]\n";
        let keys = super::KeyStore::parse(std::path::Path::new("keys.yaml"), text, None).unwrap();
        let a = keys.entries().next().unwrap();
        assert_eq!(a.id_header, "a");
        assert!(a.id_header.is_sensitive() && a.service_account_header.is_sensitive());
    }

    /// 100,000 entries are held twice while a reload swaps: each 8 bytes here is 1.6 MB at
    /// the peak.
    #[test]
    fn an_entry_stays_small() {
        let size = std::mem::size_of::<super::KeyEntry>();
        assert!(size <= 168, "KeyEntry grew to {size} bytes");
    }
}

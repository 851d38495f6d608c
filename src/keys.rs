//! API keys: the `kg_` key format, the key file model, and the [`KeyStore`] snapshot
//! (SHA-256 of the presented key -> entry, one hash-map probe per request).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use http::HeaderValue;
use serde::de::{Deserialize, MapAccess, Visitor};
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::{check_scope, read_fields, unknown_field, KeyText, Problem, Problems};

/// Prefix of every key keygate issues.
pub const KEY_PREFIX: &str = "kg_";
const BODY_LEN: usize = 32;
const CHECK_LEN: usize = 6;
/// Total length of a `kg_` key.
pub const KEY_LEN: usize = KEY_PREFIX.len() + BODY_LEN + CHECK_LEN;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// SHA-256 digest of a presented key.
pub type Digest32 = [u8; 32];

/// The 6-character base62 CRC32 (IEEE) checksum of `kg_` + body.
pub fn checksum(prefixed_body: &[u8]) -> [u8; CHECK_LEN] {
    let mut n = u64::from(crc32fast::hash(prefixed_body));
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Generates a fresh `kg_` key from the OS CSPRNG.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut key = Vec::with_capacity(KEY_LEN);
    key.extend_from_slice(KEY_PREFIX.as_bytes());
    let mut buf = [0u8; 64];
    while key.len() < KEY_PREFIX.len() + BODY_LEN {
        getrandom::fill(&mut buf)?;
        // 248 = 4 * 62: rejecting larger bytes keeps every character equally likely.
        for &b in buf.iter().filter(|&&b| b < 248) {
            if key.len() == KEY_PREFIX.len() + BODY_LEN {
                break;
            }
            key.push(BASE62[usize::from(b % 62)]);
        }
    }
    let check = checksum(&key);
    key.extend_from_slice(&check);
    Ok(String::from_utf8_lossy(&key).into_owned())
}

/// True when a `kg_` key has the right length, alphabet and checksum.
pub fn well_formed(key: &[u8]) -> bool {
    key.len() == KEY_LEN
        && key.starts_with(KEY_PREFIX.as_bytes())
        && key[KEY_PREFIX.len()..]
            .iter()
            .all(u8::is_ascii_alphanumeric)
        && checksum(&key[..KEY_LEN - CHECK_LEN]) == key[KEY_LEN - CHECK_LEN..]
}

/// SHA-256 of a presented key.
pub fn digest(key: &[u8]) -> Digest32 {
    Sha256::digest(key).into()
}

/// The `sha256:<hex>` form stored in key files.
pub fn hash_line(key: &[u8]) -> String {
    format!("sha256:{}", hex::encode(digest(key)))
}

/// A scope a key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// `*`: every scope.
    All,
    /// `yc.ydb.*`: stored as `yc.ydb.`.
    Prefix(String),
    /// One exact scope.
    Exact(String),
}

impl Grant {
    /// Reads a scope as written in the key file.
    pub fn parse(scope: &str) -> Grant {
        if scope == "*" {
            Grant::All
        } else if let Some(p) = scope.strip_suffix('*') {
            Grant::Prefix(p.to_string())
        } else {
            Grant::Exact(scope.to_string())
        }
    }

    /// True when this grant satisfies `required`.
    pub fn covers(&self, required: &str) -> bool {
        match self {
            Grant::All => true,
            Grant::Prefix(p) => required.starts_with(p.as_str()),
            Grant::Exact(s) => s == required,
        }
    }
}

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
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("service_account", &self.service_account)
            .finish_non_exhaustive()
    }
}

// The key file grows with its key count, so unknown keys are caught while it is parsed,
// in one pass, instead of by a second walk like the config's: a `revoke_at` typo is then
// listed beside the entry's other problems instead of hiding them (or the key staying live).
#[derive(Default)]
struct RawKeyFile {
    keys: Option<Vec<Spanned<RawKey>>>,
    unknown: Vec<Spanned<KeyText>>,
}

const KEY_FILE_FIELDS: &[&str] = &["keys"];

// Required fields are `Option` too: a missing one becomes a problem beside the others
// instead of a serde error that ends the parse.
#[derive(Default)]
struct RawKey {
    id: Option<Spanned<String>>,
    hash: Option<Spanned<String>>,
    service_account: Option<Spanned<String>>,
    scopes: Option<Vec<Spanned<String>>>,
    description: Option<String>,
    created_at: Option<Spanned<String>>,
    expires_at: Option<Spanned<String>>,
    revoked_at: Option<Spanned<String>>,
    unknown: Vec<Spanned<KeyText>>,
}

/// Every field a key entry may have, for typo hints; `RawKey`'s reader matches the same names.
const KEY_FIELDS: &[&str] = &[
    "id",
    "hash",
    "service_account",
    "scopes",
    "description",
    "created_at",
    "expires_at",
    "revoked_at",
];

impl<'de> Deserialize<'de> for RawKeyFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawKeyFile;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping with a `keys:` list")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawKeyFile, A::Error> {
                let mut keys = None;
                let unknown = read_fields(&mut map, |name, map| {
                    match name {
                        "keys" => keys = map.next_value()?,
                        _ => return Ok(false),
                    }
                    Ok(true)
                })?;
                Ok(RawKeyFile { keys, unknown })
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for RawKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key entry mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawKey, A::Error> {
                let mut k = RawKey::default();
                let unknown = read_fields(&mut map, |name, map| {
                    match name {
                        "id" => k.id = map.next_value()?,
                        "hash" => k.hash = map.next_value()?,
                        "service_account" => k.service_account = map.next_value()?,
                        "scopes" => k.scopes = map.next_value()?,
                        "description" => k.description = map.next_value()?,
                        "created_at" => k.created_at = map.next_value()?,
                        "expires_at" => k.expires_at = map.next_value()?,
                        "revoked_at" => k.revoked_at = map.next_value()?,
                        _ => return Ok(false),
                    }
                    Ok(true)
                })?;
                k.unknown = unknown;
                Ok(k)
            }
        }
        d.deserialize_map(V)
    }
}

/// Key ids: letters, digits, `-`, `_`, `.`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Service accounts: visible ASCII, no spaces (they travel in a header).
pub fn valid_service_account(sa: &str) -> bool {
    !sa.is_empty() && sa.len() <= 256 && sa.bytes().all(|b| b.is_ascii_graphic())
}

/// Parses `sha256:<64 lowercase hex>`.
pub fn parse_hash(text: &str) -> Option<Digest32> {
    let hex_part = text.strip_prefix("sha256:")?;
    if hex_part.len() != 64 || hex_part.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
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

/// Parses and checks a key file's text; every problem is reported with its position.
pub fn parse_key_file(path: &Path, text: &str) -> Result<Vec<KeyRecord>, Problems> {
    if text.trim().is_empty() {
        // A half-written file must not silently revoke every key.
        return Err(Problems(vec![Problem::whole(
            path,
            "key file is empty (an empty key list is written `keys: []`)",
        )]));
    }
    // The parser's default budget suits configs; a key file grows with its key count.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = budget.max_nodes.max(text.len() / 2);
    budget.max_events = budget.max_events.max(text.len());
    budget.max_total_scalar_bytes = budget.max_total_scalar_bytes.max(text.len());
    let options = serde_saphyr::options! { budget: Some(budget) };
    let raw: RawKeyFile = serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| Problems(vec![Problem::from_yaml(path, &e)]))?;
    let mut problems: Vec<Problem> = raw
        .unknown
        .iter()
        .map(|k| unknown_field(path, k, "the key file", KEY_FILE_FIELDS))
        .collect();
    let Some(raw_keys) = raw.keys else {
        problems.push(Problem::whole(
            path,
            "missing `keys:` list (an empty key list is written `keys: []`)",
        ));
        return Err(Problems::sorted(problems));
    };
    let mut records = Vec::with_capacity(raw_keys.len());
    let mut ids: HashSet<&str> = HashSet::with_capacity(raw_keys.len());
    let mut hashes: HashSet<Digest32> = HashSet::with_capacity(raw_keys.len());
    for k in &raw_keys {
        let loc = k.referenced;
        let k = &k.value;
        let before = problems.len();
        problems.extend(
            k.unknown
                .iter()
                .map(|u| unknown_field(path, u, "key entry", KEY_FIELDS)),
        );
        for (field, present) in [
            ("id", k.id.is_some()),
            ("hash", k.hash.is_some()),
            ("service_account", k.service_account.is_some()),
            ("scopes", k.scopes.is_some()),
        ] {
            if !present {
                problems.push(Problem::at(
                    path,
                    loc,
                    format!("missing field `{field}` in key entry"),
                ));
            }
        }
        let id = k.id.as_ref().map_or("", |i| i.value.as_str());
        let mut bad =
            |s: &Spanned<String>, msg: String| problems.push(Problem::at(path, s.referenced, msg));
        if let Some(i) = &k.id {
            if !valid_id(&i.value) {
                bad(
                    i,
                    format!(
                        "invalid key id {:?}: use letters, digits, '-', '_', '.'",
                        i.value
                    ),
                );
            } else if !ids.insert(&i.value) {
                bad(i, format!("duplicate key id {:?}", i.value));
            }
        }
        let hash = k.hash.as_ref().and_then(|h| {
            let parsed = parse_hash(&h.value);
            match parsed {
                // The hash itself is never echoed: it is secret-derived.
                None => bad(
                    h,
                    "invalid hash: expected sha256: followed by 64 lowercase hex digits".into(),
                ),
                Some(d) if !hashes.insert(d) => {
                    bad(h, format!("key {id:?} has the same hash as an earlier key"))
                }
                Some(_) => {}
            }
            parsed
        });
        if let Some(sa) = k
            .service_account
            .as_ref()
            .filter(|sa| !valid_service_account(&sa.value))
        {
            bad(
                sa,
                "invalid service_account: expected visible ASCII without spaces".into(),
            );
        }
        for s in k.scopes.iter().flatten() {
            if let Err(e) = check_scope(&s.value) {
                bad(s, e);
            }
        }
        let mut time_field = |f: &Option<Spanned<String>>| {
            f.as_ref().and_then(|s| match parse_time(&s.value) {
                Ok(t) => Some(t),
                Err(e) => {
                    problems.push(Problem::at(path, s.referenced, e));
                    None
                }
            })
        };
        let created_at = time_field(&k.created_at);
        let expires_at = time_field(&k.expires_at);
        let revoked_at = time_field(&k.revoked_at);
        if problems.len() != before {
            continue;
        }
        let Some(hash) = hash else { continue };
        records.push(KeyRecord {
            id: id.to_string(),
            hash,
            service_account: k
                .service_account
                .as_ref()
                .map_or_else(String::new, |sa| sa.value.clone()),
            scopes: k.scopes.iter().flatten().map(|s| s.value.clone()).collect(),
            description: k.description.clone(),
            created_at,
            expires_at,
            revoked_at,
        });
    }
    if problems.is_empty() {
        Ok(records)
    } else {
        Err(Problems::sorted(problems))
    }
}

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
pub struct DigestHasher(u64);

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
        for r in records {
            let last_used = previous
                .and_then(|p| p.by_hash.get(&r.hash))
                .map(|e| e.last_used.clone())
                .unwrap_or_default();
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

    /// Every entry, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &KeyEntry> {
        self.by_hash.values()
    }
}

/// Reads and parses a key file.
pub fn load_key_file(path: &Path) -> Result<Vec<KeyRecord>, Problems> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Problems(vec![Problem::whole(
            path,
            format!("cannot read key file: {e}"),
        )])
    })?;
    parse_key_file(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.len(), KEY_LEN);
        assert!(a.starts_with("kg_"));
        assert!(well_formed(a.as_bytes()));
        assert_ne!(a, b);
    }

    #[test]
    fn checksum_is_base62_crc32() {
        // crc32("kg_" + 32 zeros) computed independently, then written in base62.
        let body = format!("kg_{}", "0".repeat(32));
        let crc = crc32fast::hash(body.as_bytes()) as u64;
        let mut n = crc;
        let mut s = Vec::new();
        for _ in 0..6 {
            s.push(BASE62[(n % 62) as usize]);
            n /= 62;
        }
        s.reverse();
        assert_eq!(checksum(body.as_bytes()).to_vec(), s);
        assert_eq!(checksum(b"kg_"), checksum(b"kg_"));
    }

    #[test]
    fn tampered_keys_are_malformed() {
        let k = generate().unwrap();
        let mut bad = k.clone().into_bytes();
        bad[5] = if bad[5] == b'a' { b'b' } else { b'a' };
        assert!(!well_formed(&bad));
        assert!(!well_formed(&k.as_bytes()[..KEY_LEN - 1]));
        assert!(!well_formed(format!("{k}x").as_bytes()));
    }

    #[test]
    fn grants() {
        assert!(Grant::parse("*").covers("yc.x"));
        assert!(Grant::parse("yc.ydb.*").covers("yc.ydb.tables.manage"));
        assert!(!Grant::parse("yc.ydb.*").covers("yc.ydbx.a"));
        assert!(!Grant::parse("yc.ydb.*").covers("yc.ydb"));
        assert!(Grant::parse("yc.a").covers("yc.a"));
        assert!(!Grant::parse("yc.a").covers("yc.ab"));
    }

    #[test]
    fn key_file_problems_have_positions() {
        let text = "keys:\n  - id: a\n    hash: sha256:zz\n    service_account: sa\n    scopes: [x]\n  - id: a\n    hash: sha256:0000000000000000000000000000000000000000000000000000000000000000\n    service_account: sa\n    scopes: [x]\n    expires_at: tomorrow\n";
        let err = parse_key_file(Path::new("k.yaml"), text).unwrap_err();
        let s = err.to_string();
        assert!(s.contains("k.yaml:3:11:"), "{s}");
        assert!(s.contains("k.yaml:6:9: duplicate key id"), "{s}");
        assert!(s.contains("k.yaml:10:17:"), "{s}");
        assert!(!s.contains("zz"), "hash text must not be echoed: {s}");
    }

    #[test]
    fn unknown_fields_are_refused_beside_the_entry_s_other_problems() {
        let text = "keys:\n  - id: a\n    hash: sha256:zz\n    service_account: sa\n    scopes: [x]\n    revoke_at: 2026-01-01T00:00:00Z\n  - id: b\n    service_account: sa\n    scopes: [x]\n    expires_at: tomorrow\nextra: 1\n";
        let err = parse_key_file(Path::new("k.yaml"), text).unwrap_err();
        let at: Vec<(u64, u64)> = err.0.iter().map(|p| (p.line, p.column)).collect();
        assert_eq!(
            at,
            vec![(3, 11), (6, 5), (7, 5), (10, 17), (11, 1)],
            "{err}"
        );
        assert!(err.0[1].message.contains("`revoked_at`"), "{err}");
        assert!(err.0[2].message.contains("`hash`"), "{err}");
    }

    #[test]
    fn every_listed_field_is_read() {
        // KEY_FIELDS feeds the typo hints; the reader must accept exactly those names.
        let text = "keys:\n  - id: a\n    hash: sha256:0000000000000000000000000000000000000000000000000000000000000000\n    service_account: sa\n    scopes: [x]\n    description: d\n    created_at: 2026-01-01T00:00:00Z\n    expires_at: 2027-01-01T00:00:00Z\n    revoked_at: 2026-06-01T00:00:00Z\n";
        assert_eq!(text.matches("\n    ").count() + 1, KEY_FIELDS.len());
        let keys = parse_key_file(Path::new("k.yaml"), text).unwrap();
        let k = &keys[0];
        assert_eq!(k.description.as_deref(), Some("d"));
        assert!(k.created_at.is_some() && k.expires_at.is_some() && k.revoked_at.is_some());
    }

    #[test]
    fn empty_file_is_an_error() {
        assert!(parse_key_file(Path::new("k"), "").is_err());
        assert!(parse_key_file(Path::new("k"), "keys: []\n")
            .unwrap()
            .is_empty());
    }
}

//! The key file: parse and check it (every problem with its position), render records back,
//! and change it safely (an advisory lock serializes writers; `atomic.rs` replaces the file).

use std::collections::HashSet;
use std::fmt;

use std::path::{Path, PathBuf};

use serde::de::{Deserialize, MapAccess, Visitor};
use serde_saphyr::Spanned;

use super::limit::{parse_cidr, Limits, Quota, Rate};
use super::{
    check_scope, format_time, parse_hash, parse_time, valid_id, valid_service_account, Digest32,
    KeyRecord,
};
use crate::config::fields::{read_fields, unknown_field, KeyText};
use crate::config::{Problem, Problems};

mod atomic;
mod update;

pub(crate) use atomic::write_atomic;
pub(crate) use update::update_audited;

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
    rate_limit: Option<Spanned<String>>,
    burst: Option<Spanned<u64>>,
    quota: Option<Spanned<String>>,
    allowed_cidrs: Option<Vec<Spanned<String>>>,
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
    "rate_limit",
    "burst",
    "quota",
    "allowed_cidrs",
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
                        "rate_limit" => k.rate_limit = map.next_value()?,
                        "burst" => k.burst = map.next_value()?,
                        "quota" => k.quota = map.next_value()?,
                        "allowed_cidrs" => k.allowed_cidrs = map.next_value()?,
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
    let mut seen = Seen {
        ids: HashSet::with_capacity(raw_keys.len()),
        hashes: HashSet::with_capacity(raw_keys.len()),
    };
    for k in &raw_keys {
        let before = problems.len();
        let record = check_entry(path, k, &mut seen, &mut problems);
        if problems.len() == before {
            records.extend(record);
        }
    }
    if problems.is_empty() {
        Ok(records)
    } else {
        Err(Problems::sorted(problems))
    }
}

/// Ids and hashes of the entries checked so far: each may appear once.
struct Seen<'a> {
    ids: HashSet<&'a str>,
    hashes: HashSet<Digest32>,
}

/// Checks one entry; the record is `None` when its hash is missing or bad, and the caller
/// drops it anyway when any problem was added.
fn check_entry<'a>(
    path: &Path,
    entry: &'a Spanned<RawKey>,
    seen: &mut Seen<'a>,
    problems: &mut Vec<Problem>,
) -> Option<KeyRecord> {
    let k = &entry.value;
    unknown_and_missing(path, entry, problems);
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
        } else if !seen.ids.insert(&i.value) {
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
            Some(d) if !seen.hashes.insert(d) => {
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
        f.as_ref().and_then(|s| {
            parse_time(&s.value)
                .map_err(|e| problems.push(Problem::at(path, s.referenced, e)))
                .ok()
        })
    };
    let (created_at, expires_at, revoked_at) = (
        time_field(&k.created_at),
        time_field(&k.expires_at),
        time_field(&k.revoked_at),
    );
    let limits = limits(path, k, problems);
    Some(KeyRecord {
        limits,
        id: id.to_string(),
        created_at,
        expires_at,
        revoked_at,
        hash: hash?,
        service_account: k
            .service_account
            .as_ref()
            .map_or_else(String::new, |sa| sa.value.clone()),
        scopes: k.scopes.iter().flatten().map(|s| s.value.clone()).collect(),
        description: k.description.clone(),
    })
}

/// The entry's `rate_limit`, `burst`, `quota` and `allowed_cidrs`, each problem at its place.
fn limits(path: &Path, k: &RawKey, problems: &mut Vec<Problem>) -> Limits {
    let mut bad =
        |at: serde_saphyr::Location, msg: String| problems.push(Problem::at(path, at, msg));
    let burst = k.burst.as_ref().map(|b| b.value);
    if let (Some(b), None) = (&k.burst, &k.rate_limit) {
        bad(b.referenced, "burst needs a rate_limit beside it".into());
    }
    let rate = k.rate_limit.as_ref().and_then(|r| {
        Rate::parse(&r.value, burst)
            .map_err(|e| bad(r.referenced, e))
            .ok()
    });
    let quota = k.quota.as_ref().and_then(|q| {
        Quota::parse(&q.value)
            .map_err(|e| bad(q.referenced, e))
            .ok()
    });
    let allowed_cidrs = k
        .allowed_cidrs
        .iter()
        .flatten()
        .filter_map(|c| parse_cidr(&c.value).map_err(|e| bad(c.referenced, e)).ok())
        .collect();
    Limits {
        rate,
        quota,
        allowed_cidrs,
    }
}

/// Fields the entry should not have, and required ones it lacks (reported at the entry).
fn unknown_and_missing(path: &Path, entry: &Spanned<RawKey>, problems: &mut Vec<Problem>) {
    let k = &entry.value;
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
                entry.referenced,
                format!("missing field `{field}` in key entry"),
            ));
        }
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

/// Why a key file could not be changed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyFileError {
    /// The current file is invalid; nothing was written.
    #[error("{0}")]
    Invalid(Problems),
    /// The audit line could not be written; the key file was left as it was.
    #[error("audit log {path}: {source}; the key file was not changed")]
    Audit {
        /// The audit log.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Reading, locking or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Plain YAML scalars are written bare; anything a YAML reader might reinterpret is quoted.
fn scalar(s: &str) -> String {
    let plain = s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        );
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
    }
}

/// Renders records in the key file format.
pub(crate) fn render(records: &[KeyRecord]) -> String {
    let mut out = String::with_capacity(64 + records.len() * 256);
    out.push_str("# keygate key file: hashes only, written by `keygate keys`.\n");
    if records.is_empty() {
        out.push_str("keys: []\n");
        return out;
    }
    out.push_str("keys:\n");
    for r in records {
        out.push_str(&format!("  - id: {}\n", scalar(&r.id)));
        out.push_str(&format!("    hash: sha256:{}\n", hex::encode(r.hash)));
        out.push_str(&format!(
            "    service_account: {}\n",
            scalar(&r.service_account)
        ));
        let scopes: Vec<String> = r.scopes.iter().map(|s| scalar(s)).collect();
        out.push_str(&format!("    scopes: [{}]\n", scopes.join(", ")));
        if let Some(d) = &r.description {
            out.push_str(&format!(
                "    description: {}\n",
                serde_json::to_string(d).unwrap_or_default()
            ));
        }
        render_limits(&mut out, &r.limits);
        for (name, t) in [
            ("created_at", r.created_at),
            ("expires_at", r.expires_at),
            ("revoked_at", r.revoked_at),
        ] {
            if let Some(t) = t {
                out.push_str(&format!("    {name}: {}\n", format_time(t)));
            }
        }
    }
    out
}

fn render_limits(out: &mut String, l: &Limits) {
    if let Some(rate) = &l.rate {
        out.push_str(&format!("    rate_limit: {rate}\n"));
        if rate.burst != rate.count {
            out.push_str(&format!("    burst: {}\n", rate.burst));
        }
    }
    if let Some(q) = &l.quota {
        out.push_str(&format!("    quota: {q}\n"));
    }
    if !l.allowed_cidrs.is_empty() {
        let cidrs: Vec<String> = l.allowed_cidrs.iter().map(ToString::to_string).collect();
        out.push_str(&format!("    allowed_cidrs: [{}]\n", cidrs.join(", ")));
    }
}

/// Reads the key file; a missing file is an empty key list.
pub(crate) fn read(path: &Path) -> Result<Vec<KeyRecord>, KeyFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_key_file(path, &text).map_err(KeyFileError::Invalid),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest;

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
        let text = "keys:\n  - id: a\n    hash: sha256:0000000000000000000000000000000000000000000000000000000000000000\n    service_account: sa\n    scopes: [x]\n    description: d\n    created_at: 2026-01-01T00:00:00Z\n    expires_at: 2027-01-01T00:00:00Z\n    revoked_at: 2026-06-01T00:00:00Z\n    rate_limit: 5/s\n    burst: 2\n    quota: 10/day\n    allowed_cidrs: [10.0.0.0/8]\n";
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

    #[test]
    fn render_round_trips() {
        let rec = KeyRecord {
            id: "k1".into(),
            hash: digest(b"secret"),
            service_account: "sa:odd#name".into(),
            scopes: vec!["*".into(), "yc.ydb.*".into(), "true".into()],
            description: Some("nightly \"mailer\"\nline two".into()),
            created_at: Some(parse_time("2026-11-29T12:00:00Z").unwrap()),
            expires_at: Some(parse_time("2027-11-29T00:00:00+03:00").unwrap()),
            revoked_at: None,
            limits: Limits {
                rate: Some(Rate::parse("6000/min", Some(20)).unwrap()),
                quota: Some(Quota::parse("10000/month").unwrap()),
                allowed_cidrs: vec![
                    parse_cidr("10.0.0.0/8").unwrap(),
                    parse_cidr("2001:db8::/32").unwrap(),
                ],
            },
        };
        let text = render(std::slice::from_ref(&rec));
        let back = parse_key_file(Path::new("k"), &text).unwrap();
        assert_eq!(back, vec![rec]);
        assert_eq!(
            parse_key_file(Path::new("k"), &render(&[])).unwrap(),
            vec![]
        );
    }
}

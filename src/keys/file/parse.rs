//! Parsing the key file in one streaming pass: each entry is checked (every problem with its
//! position) and handed on as soon as it is read, so a 100,000-key file never exists as a
//! list of raw entries with a span on every value.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::de::{Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};

use crate::config::fields::{read_fields, unknown_field, KeyText};
use crate::config::{Problem, Problems};
use crate::keys::limit::{parse_cidr, Limits, Quota, Rate};
use crate::keys::{
    check_scope, parse_hash, parse_time, valid_id, valid_service_account, Digest32, KeyRecord,
};

const KEY_FILE_FIELDS: &[&str] = &["keys"];

// Required fields are `Option` too: a missing one becomes a problem beside the others
// instead of a serde error that ends the parse.
#[derive(Default)]
pub(super) struct RawKey {
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

mod fast;

/// Where checked records go, one at a time.
pub trait RecordSink {
    /// Takes one checked record.
    fn record(&mut self, record: KeyRecord);
    /// Forgets every record taken so far: the file is being read again from the start.
    fn restart(&mut self);
}

impl RecordSink for Vec<KeyRecord> {
    fn record(&mut self, record: KeyRecord) {
        self.push(record);
    }
    fn restart(&mut self) {
        self.clear();
    }
}

/// Parses and checks a key file's text; every problem is reported with its position.
pub fn parse_key_file(path: &Path, text: &str) -> Result<Vec<KeyRecord>, Problems> {
    let mut records = Vec::new();
    parse_key_file_each(path, text, &mut records)?;
    Ok(records)
}

/// Parses and checks a key file's text, handing each good record to `sink` as it is read.
///
/// The layout `keygate keys` writes is read by a fast line reader; any other YAML, or any
/// problem, sends the text through the YAML parser from the start, which places every
/// problem. The file is all or nothing: on `Err` the caller discards what `sink` took.
pub fn parse_key_file_each(
    path: &Path,
    text: &str,
    sink: &mut impl RecordSink,
) -> Result<(), Problems> {
    let mut seen = Seen::default();
    let mut problems = Vec::new();
    let fast = fast::read(text, |raw| {
        let entry = Spanned::new(raw, Location::UNKNOWN, Location::UNKNOWN);
        match check_entry(path, entry, &mut seen, &mut problems) {
            Some(r) if problems.is_empty() => {
                sink.record(r);
                true
            }
            _ => false,
        }
    });
    if fast.is_some() {
        return Ok(());
    }
    drop(seen);
    sink.restart();
    parse_yaml(path, text, sink)
}

/// The full YAML parse, one entry at a time.
fn parse_yaml<S: RecordSink>(path: &Path, text: &str, sink: &mut S) -> Result<(), Problems> {
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
    let mut pass = Pass {
        path,
        seen: Seen::default(),
        problems: Vec::new(),
        sink,
        keys: false,
    };
    let unknown = serde_saphyr::with_deserializer_from_str_with_options(text, options, |d| {
        FileSeed(&mut pass).deserialize(d)
    })
    .map_err(|e| Problems(vec![Problem::from_yaml(path, &e)]))?;
    let mut problems = pass.problems;
    problems.extend(
        unknown
            .iter()
            .map(|k| unknown_field(path, k, "the key file", KEY_FILE_FIELDS)),
    );
    if !pass.keys {
        problems.push(Problem::whole(
            path,
            "missing `keys:` list (an empty key list is written `keys: []`)",
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Problems::sorted(problems))
    }
}

/// One pass over the file: what has been checked so far and where good records go.
struct Pass<'p, F> {
    path: &'p Path,
    seen: Seen,
    problems: Vec<Problem>,
    sink: &'p mut F,
    /// Whether a `keys:` list was present.
    keys: bool,
}

impl<F: RecordSink> Pass<'_, F> {
    /// Checks one entry and hands it on when it has no problem.
    fn entry(&mut self, entry: Spanned<RawKey>) {
        let before = self.problems.len();
        let record = check_entry(self.path, entry, &mut self.seen, &mut self.problems);
        if self.problems.len() == before {
            if let Some(r) = record {
                self.sink.record(r);
            }
        }
    }
}

/// The top-level mapping; its value is the unknown fields found beside `keys`.
struct FileSeed<'a, 'p, F>(&'a mut Pass<'p, F>);

impl<'de, F: RecordSink> DeserializeSeed<'de> for FileSeed<'_, '_, F> {
    type Value = Vec<Spanned<KeyText>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: RecordSink> Visitor<'de> for FileSeed<'_, '_, F> {
    type Value = Vec<Spanned<KeyText>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping with a `keys:` list")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let pass = self.0;
        read_fields(&mut map, |name, map| {
            match name {
                "keys" => map.next_value_seed(KeysSeed(&mut *pass))?,
                _ => return Ok(false),
            }
            Ok(true)
        })
    }
}

/// The `keys:` value: a list read entry by entry, or null (reported as missing).
struct KeysSeed<'a, 'p, F>(&'a mut Pass<'p, F>);

impl<'de, F: RecordSink> DeserializeSeed<'de> for KeysSeed<'_, '_, F> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, F: RecordSink> Visitor<'de> for KeysSeed<'_, '_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of key entries")
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.keys = true;
        while let Some(entry) = seq.next_element::<Spanned<RawKey>>()? {
            self.0.entry(entry);
        }
        Ok(())
    }
}

/// Ids and hashes of the entries checked so far: each may appear once.
#[derive(Default)]
struct Seen {
    ids: HashSet<Box<str>>,
    hashes: HashSet<Digest32>,
}

/// Checks one entry; the record is `None` when its hash is missing or bad, and the caller
/// drops it anyway when any problem was added.
fn check_entry(
    path: &Path,
    entry: Spanned<RawKey>,
    seen: &mut Seen,
    problems: &mut Vec<Problem>,
) -> Option<KeyRecord> {
    unknown_and_missing(path, &entry, problems);
    let k = entry.value;
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
        } else if !seen.ids.insert(i.value.as_str().into()) {
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
    let limits = limits(path, &k, problems);
    Some(KeyRecord {
        limits,
        hash: hash?,
        id: k.id.map_or_else(String::new, |i| i.value),
        created_at,
        expires_at,
        revoked_at,
        service_account: k.service_account.map_or_else(String::new, |sa| sa.value),
        scopes: k.scopes.into_iter().flatten().map(|s| s.value).collect(),
        description: k.description,
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_fast_reader_and_the_yaml_parser_agree_on_what_render_writes() {
        let text = "# keygate key file\nkeys:\n  - id: k1\n    hash: sha256:0000000000000000000000000000000000000000000000000000000000000000\n    service_account: \"sa:odd#name\"\n    scopes: [\"*\", \"yc.ydb.*\", \"true\", yc.b.*]\n    description: \"nightly \\\"mailer\\\"\\nline two\"\n    rate_limit: 6000/min\n    burst: 20\n    quota: 10000/month\n    allowed_cidrs: [10.0.0.0/8, 2001:db8::/32]\n    created_at: 2026-11-29T12:00:00Z\n    expires_at: 2027-11-28T21:00:00Z\n  - id: k2\n    hash: sha256:0000000000000000000000000000000000000000000000000000000000000001\n    service_account: sa\n    scopes: []\n    revoked_at: 2026-12-01T00:00:00Z\n";
        let path = Path::new("k.yaml");
        let mut fast = Vec::new();
        let mut entries = 0;
        fast::read(text, |_| {
            entries += 1;
            true
        })
        .expect("the fast reader takes this layout");
        assert_eq!(entries, 2);
        parse_key_file_each(path, text, &mut fast).unwrap();
        let mut yaml = Vec::new();
        parse_yaml(path, text, &mut yaml).unwrap();
        assert_eq!(fast, yaml);
        assert_eq!(fast.len(), 2);
    }

    #[test]
    fn a_problem_the_fast_reader_meets_is_placed_by_the_yaml_parser() {
        // Laid out as render writes it, but the second entry repeats the first's id.
        let text = "keys:\n  - id: a\n    hash: sha256:0000000000000000000000000000000000000000000000000000000000000000\n    service_account: sa\n    scopes: [x]\n  - id: a\n    hash: sha256:0000000000000000000000000000000000000000000000000000000000000001\n    service_account: sa\n    scopes: [x]\n";
        let mut sink = Vec::new();
        let err = parse_key_file_each(Path::new("k.yaml"), text, &mut sink).unwrap_err();
        assert!(
            err.to_string().contains("k.yaml:6:9: duplicate key id"),
            "{err}"
        );
    }
}

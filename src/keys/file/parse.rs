//! Parsing the key file in one streaming pass: each entry is checked (every problem with its
//! position) and handed on as soon as it is read, so a 100,000-key file never exists as a
//! list of raw entries with a span on every value. `fast.rs` reads keygate's own layout,
//! `yaml.rs` any other YAML (and places problems); both feed [`check_entry`].

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::de::{Deserialize, MapAccess, Visitor};
use serde_saphyr::{Location, Spanned};

use crate::config::fields::{read_fields, unknown_field, KeyText};
use crate::config::{Problem, Problems};
use crate::keys::limit::{parse_cidr, Limits, Quota, Rate};
use crate::keys::{
    check_scope, parse_hash, parse_time, valid_id, valid_service_account, Digest32, KeyRecord,
};

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
mod yaml;

use yaml::parse_yaml;

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
    if fast_pass(path, text.split('\n'), sink).is_some() {
        return Ok(());
    }
    sink.restart();
    parse_yaml(path, text, sink)
}

/// The fast reader with every entry checked; `None` when it gave up or met a problem.
fn fast_pass<L: AsRef<str>>(
    path: &Path,
    lines: impl IntoIterator<Item = L>,
    sink: &mut impl RecordSink,
) -> Option<()> {
    let mut seen = Seen::default();
    let mut problems = Vec::new();
    fast::read_lines(lines, |raw| {
        let entry = Spanned::new(raw, Location::UNKNOWN, Location::UNKNOWN);
        match check_entry(path, entry, &mut seen, &mut problems) {
            Some(r) if problems.is_empty() => {
                sink.record(r);
                true
            }
            _ => false,
        }
    })
}

/// Parses and checks the key file open as `file`, line by line, so its text is never held
/// whole (20 MB at 100,000 keys) beside the stores; returns the SHA-256 of what was read.
/// Only when the fast reader gives up is the file read whole for the YAML parser.
pub fn parse_key_file_from(
    path: &Path,
    file: std::fs::File,
    sink: &mut impl RecordSink,
) -> Result<[u8; 32], Problems> {
    use sha2::Digest as _;
    use std::io::{BufRead, Read, Seek};
    let cannot = |e: std::io::Error| {
        Problems(vec![Problem::whole(
            path,
            format!("cannot read key file: {e}"),
        )])
    };
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
    let mut hasher = sha2::Sha256::new();
    let mut intact = true;
    let mut buf = Vec::new();
    let lines = std::iter::from_fn(|| {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) => {
                hasher.update(&buf);
                let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
                // A read error or a line that is not UTF-8 ends the fast pass unaccepted.
                let text = std::str::from_utf8(line).map(str::to_owned).ok();
                intact &= text.is_some();
                text
            }
            Err(_) => {
                intact = false;
                None
            }
        }
    });
    if fast_pass(path, lines, sink).is_some() && intact {
        // The fast reader stops at the end on success; hash whatever a `keys: []` left.
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).map_err(cannot)?;
        hasher.update(&rest);
        return Ok(hasher.finalize().into());
    }
    sink.restart();
    let mut file = reader.into_inner();
    file.rewind().map_err(cannot)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(cannot)?;
    let hash = sha2::Sha256::digest(&bytes).into();
    let text = String::from_utf8(bytes)
        .map_err(|_| Problems(vec![Problem::whole(path, "key file is not UTF-8")]))?;
    parse_yaml(path, &text, sink)?;
    Ok(hash)
}

/// Ids and hashes of the entries checked so far: each may appear once.
#[derive(Default)]
pub(super) struct Seen {
    ids: HashSet<Box<str>>,
    hashes: HashSet<Digest32>,
}

/// Checks one entry; the record is `None` when its hash is missing or bad, and the caller
/// drops it anyway when any problem was added.
pub(super) fn check_entry(
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

    #[test]
    fn a_file_read_line_by_line_gives_the_records_and_the_hash_of_its_bytes() {
        use sha2::Digest as _;
        let dir = tempfile::tempdir().unwrap();
        let fast = "keys:\n  - id: a\n    hash: sha256:0000000000000000000000000000000000000000000000000000000000000000\n    service_account: sa\n    scopes: [x]\n";
        // The same key in a layout only the YAML parser takes.
        let yaml = "keys:\n- {id: a, hash: \"sha256:0000000000000000000000000000000000000000000000000000000000000000\", service_account: sa, scopes: [x]}\n";
        for text in [fast, yaml, "keys: []\n"] {
            let p = dir.path().join("k.yaml");
            std::fs::write(&p, text).unwrap();
            let mut got = Vec::new();
            let file = std::fs::File::open(&p).unwrap();
            let hash = parse_key_file_from(&p, file, &mut got).unwrap();
            assert_eq!(hash, <[u8; 32]>::from(sha2::Sha256::digest(text)), "{text}");
            assert_eq!(got, parse_key_file(&p, text).unwrap(), "{text}");
        }
        let p = dir.path().join("bad.yaml");
        std::fs::write(&p, b"keys:\n  - id: \xff\n").unwrap();
        let err = parse_key_file_from(&p, std::fs::File::open(&p).unwrap(), &mut Vec::new());
        assert!(err.unwrap_err().to_string().contains("not UTF-8"));
    }
}

//! A fast reader for the exact layout `keygate keys` writes (`render`): one field per line,
//! plain or JSON-quoted scalars, flow lists on one line. The YAML parser reads 100,000 keys
//! in seconds; this reads them in a fraction of that. Anything outside the layout (another
//! indentation, a comment after a value, an anchor, a field it does not know) makes it give
//! up, and the caller parses the text again with the YAML parser, which also places every
//! problem; the reader never decides that a file is bad.

use serde_saphyr::{Location, Spanned};

use super::RawKey;

/// Reads every entry of `text`, handing each to `entry`, which returns false to stop.
/// `None` when the text strays from the layout or `entry` stopped.
pub(super) fn read(text: &str, mut entry: impl FnMut(RawKey) -> bool) -> Option<()> {
    let mut lines = text.split('\n');
    // The header: comments and blank lines, then `keys:` (or `keys: []` and nothing more).
    loop {
        let line = lines.next()?;
        if skippable(line) {
            continue;
        }
        if line == "keys: []" {
            return lines.all(skippable).then_some(());
        }
        if line == "keys:" {
            break;
        }
        return None;
    }
    let mut current: Option<RawKey> = None;
    let mut any = false;
    for line in lines {
        if skippable(line) {
            continue;
        }
        let field = if let Some(rest) = line.strip_prefix("  - ") {
            if let Some(done) = current.replace(RawKey::default()) {
                if !entry(done) {
                    return None;
                }
            }
            any = true;
            rest
        } else {
            line.strip_prefix("    ")?
        };
        field_into(current.as_mut()?, field)?;
    }
    // `keys:` with nothing under it is null in YAML; the parser reports that.
    if !any {
        return None;
    }
    entry(current?).then_some(())
}

/// Blank lines and whole-line comments.
fn skippable(line: &str) -> bool {
    let t = line.trim_start_matches(' ');
    t.is_empty() || t.starts_with('#')
}

fn at<T>(value: T) -> Spanned<T> {
    Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
}

/// Reads `name: value` into the entry; `None` for an unknown or repeated field, or a value
/// written in a way this reader does not take.
fn field_into(k: &mut RawKey, field: &str) -> Option<()> {
    let (name, value) = field.split_once(": ")?;
    fn set<T>(slot: &mut Option<T>, v: T) -> Option<()> {
        if slot.is_some() {
            return None;
        }
        *slot = Some(v);
        Some(())
    }
    match name {
        "id" => set(&mut k.id, at(scalar(value)?)),
        "hash" => set(&mut k.hash, at(bare(value, hash_byte)?)),
        "service_account" => set(&mut k.service_account, at(scalar(value)?)),
        "scopes" => set(&mut k.scopes, list(value, scope)?),
        "description" => set(&mut k.description, scalar(value)?),
        "created_at" => set(&mut k.created_at, at(bare(value, time_byte)?)),
        "expires_at" => set(&mut k.expires_at, at(bare(value, time_byte)?)),
        "revoked_at" => set(&mut k.revoked_at, at(bare(value, time_byte)?)),
        "rate_limit" => set(&mut k.rate_limit, at(bare(value, rate_byte)?)),
        "burst" => set(
            &mut k.burst,
            at(bare(value, |b| b.is_ascii_digit())?.parse().ok()?),
        ),
        "quota" => set(&mut k.quota, at(bare(value, rate_byte)?)),
        "allowed_cidrs" => set(&mut k.allowed_cidrs, list(value, |v| bare(v, cidr_byte))?),
        _ => None,
    }
}

fn hash_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b':'
}

fn time_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b':' | b'+' | b'-' | b'.')
}

fn rate_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'/'
}

fn cidr_byte(b: u8) -> bool {
    b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'/')
}

/// A plain value that YAML reads as the same string: it starts with a digit or letter
/// (so no YAML indicator) and every byte passes `ok` (so no space, comment or flow
/// character). Words YAML could read as booleans or null are left to the parser.
fn bare(v: &str, ok: impl Fn(u8) -> bool) -> Option<String> {
    let first = v.bytes().next()?;
    // A trailing `:` would be YAML's mapping indicator.
    let plain =
        first.is_ascii_alphanumeric() && v.bytes().all(ok) && !v.ends_with(':') && !special_word(v);
    plain.then(|| v.to_string())
}

fn special_word(v: &str) -> bool {
    matches!(
        v.to_ascii_lowercase().as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
    )
}

/// A scalar as `render` writes it: a plain word starting with a letter, or a JSON string of
/// printable ASCII without `\u` escapes (where JSON and YAML could disagree).
fn scalar(v: &str) -> Option<String> {
    if v.starts_with('"') {
        let printable = v.bytes().all(|b| (0x20..0x7f).contains(&b));
        if v.len() < 2 || !v.ends_with('"') || !printable || v.contains("\\u") {
            return None;
        }
        return serde_json::from_str(v).ok();
    }
    if !v.bytes().next()?.is_ascii_alphabetic() {
        return None;
    }
    bare(v, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
    })
}

/// A scope: a scalar, or written by hand as a plain `yc.ydb.*` (a `*` after the first
/// letter is no alias in YAML).
fn scope(v: &str) -> Option<String> {
    scalar(v).or_else(|| {
        let plain = v.bytes().next()?.is_ascii_alphabetic()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'*'));
        plain.then(|| v.to_string())
    })
}

/// A one-line flow list, `[a, b]`; items may not hold `,` or brackets.
fn list(v: &str, item: impl Fn(&str) -> Option<String>) -> Option<Vec<Spanned<String>>> {
    let inner = v.strip_prefix('[')?.strip_suffix(']')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner
        .split(", ")
        .map(|i| {
            let ok = !i.contains([',', '[', ']']);
            ok.then(|| item(i)).flatten().map(at)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(text: &str) -> Option<Vec<RawKey>> {
        let mut out = Vec::new();
        read(text, |k| {
            out.push(k);
            true
        })?;
        Some(out)
    }

    #[test]
    fn reads_what_render_writes() {
        let text = "# keygate key file\nkeys:\n  - id: k1\n    hash: sha256:00ff\n    service_account: \"sa:odd#name\"\n    scopes: [\"*\", \"yc.ydb.*\", \"true\", yc.a, yc.b.*]\n    description: \"a \\\"b\\\"\\nc\"\n    rate_limit: 6000/min\n    burst: 20\n    allowed_cidrs: [10.0.0.0/8, 2001:db8::/32]\n    created_at: 2026-11-29T12:00:00Z\n\n  - id: k2\n    hash: sha256:01\n    service_account: sa\n    scopes: []\n";
        let got = entries(text).unwrap();
        assert_eq!(got.len(), 2);
        let k = &got[0];
        assert_eq!(k.service_account.as_ref().unwrap().value, "sa:odd#name");
        let scopes: Vec<&str> = k.scopes.iter().flatten().map(|s| &*s.value).collect();
        assert_eq!(scopes, ["*", "yc.ydb.*", "true", "yc.a", "yc.b.*"]);
        assert_eq!(k.description.as_deref(), Some("a \"b\"\nc"));
        assert_eq!(k.burst.as_ref().unwrap().value, 20);
        assert_eq!(k.allowed_cidrs.as_ref().unwrap().len(), 2);
        assert!(got[1].scopes.as_ref().unwrap().is_empty());
        assert_eq!(entries("keys: []\n# end\n").unwrap().len(), 0);
    }

    #[test]
    fn anything_else_is_left_to_the_yaml_parser() {
        let entry =
            "keys:\n  - id: k1\n    hash: sha256:00\n    service_account: sa\n    scopes: [a]\n";
        assert!(entries(entry).is_some());
        for odd in [
            "keys:\n",
            "keys:\n- id: k1\n",
            "keys:\n  - id: k1 # note\n",
            "keys:\n  - id: true\n",
            "keys:\n  - id: k1\n    id: k2\n",
            "keys:\n  - id: k1\n    revoke_at: 2026-01-01T00:00:00Z\n",
            "keys:\n  - id: &a k1\n",
            "keys:\n  - id: k1\n    scopes: [a,b]\n",
            "keys:\n  - id: k1\n    scopes: [*]\n",
            "keys:\n  - id: k1\n    description: \"\\u00e9\"\n",
            "keys:\n  - id: k1\r\n",
            "---\nkeys: []\n",
            "keys:\n  - id: k1\n    created_at: null\n",
            "keys:\n  - id: k1\n      hash: sha256:00\n",
            "keys:\n  - id: k1\n    allowed_cidrs: [fe80::, 10.0.0.0/8]\n",
        ] {
            assert!(entries(odd).is_none(), "{odd:?}");
        }
        assert!(read(entry, |_| false).is_none());
    }
}

//! Request path normalization: the one canonical form that routing and upstreams both see.
//!
//! Pure functions, no allocation when the path is already canonical (the common case).

use std::borrow::Cow;

/// Why a request path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The target is not an absolute path (`*`, authority-form, empty).
    #[error("request target is not an absolute path")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("malformed percent-encoding in path")]
    BadPercent,
    /// `%2F`, `%5C` or a literal `\`: would let a segment hide a separator.
    #[error("encoded slash or backslash in path")]
    EncodedSeparator,
    /// `%00` or another control byte.
    #[error("control character in path")]
    ControlChar,
    /// Percent-decoded bytes that are not UTF-8 (overlong encodings among them).
    #[error("path is not valid UTF-8 once decoded")]
    InvalidUtf8,
    /// `..;`, `.;x`: a dot-segment dressed up with parameters.
    #[error("dot-segment with parameters in path")]
    DotSegmentParams,
    /// A `..` that would climb above `/`.
    #[error("path climbs above the root")]
    AboveRoot,
}

/// Normalizes an origin-form path (no query): decodes percent-encoded unreserved characters,
/// upper-cases the remaining escapes, merges `//`, resolves `.` and `..`.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_canonical(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    normalize_slow(path).map(Cow::Owned)
}

/// True when no rule of `normalize` would change or refuse the path.
fn is_canonical(bytes: &[u8]) -> bool {
    let mut prev = b'/';
    let mut seg_start = 0usize;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' | b'\\' | b';' => return false,
            0..=0x1f | 0x7f => return false,
            b'/' if i > 0 => {
                if prev == b'/' || is_dot_segment(&bytes[seg_start..i]) {
                    return false;
                }
                seg_start = i + 1;
            }
            b'/' => seg_start = 1,
            _ if b >= 0x80 => return false,
            _ => {}
        }
        prev = b;
    }
    !is_dot_segment(&bytes[seg_start..])
}

/// The path routing matches on: each segment without its `;parameters` (literal `;` or `%3B`).
///
/// `/p;x/secret` is `/p/secret` to servlet containers, so it must meet `/p/`'s key check;
/// the upstream still gets the normalized path with its parameters.
pub fn route_key(normalized: &str) -> Cow<'_, str> {
    let b = normalized.as_bytes();
    let has_params = b.contains(&b';') || b.windows(3).any(|w| w == b"%3B");
    if !has_params {
        return Cow::Borrowed(normalized);
    }
    let mut out = String::with_capacity(normalized.len());
    let mut trailing = normalized.ends_with('/');
    // The first split item is the empty text before the leading '/'.
    for seg in normalized.split('/').skip(1) {
        let cut = [seg.find(';'), seg.find("%3B")]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(seg.len());
        // A segment that is parameters alone (`/;x/p`) vanishes, as servlet containers
        // drop it and merge the slashes: it must not hide the next segment from routing.
        if cut == 0 {
            trailing |= !seg.is_empty();
            continue;
        }
        out.push('/');
        out.push_str(&seg[..cut]);
        trailing = false;
    }
    if trailing || out.is_empty() || normalized.ends_with('/') {
        out.push('/');
    }
    Cow::Owned(out)
}

fn is_dot_segment(seg: &[u8]) -> bool {
    seg == b"." || seg == b".."
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// One segment after decoding: its canonical text, and whether its decoded bytes are UTF-8.
fn canonical_segment(seg: &str, out: &mut String, decoded: &mut Vec<u8>) -> Result<(), PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = seg.as_bytes();
    decoded.clear();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_val);
            let lo = bytes.get(i + 2).copied().and_then(hex_val);
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(PathError::BadPercent);
            };
            let v = hi << 4 | lo;
            match v {
                b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                0..=0x1f | 0x7f => return Err(PathError::ControlChar),
                _ => {}
            }
            decoded.push(v);
            if is_unreserved(v) {
                out.push(char::from(v));
            } else {
                out.push('%');
                out.push(char::from(HEX[usize::from(v >> 4)]));
                out.push(char::from(HEX[usize::from(v & 0xf)]));
            }
            i += 3;
        } else {
            match b {
                b'\\' => return Err(PathError::EncodedSeparator),
                0..=0x1f | 0x7f => return Err(PathError::ControlChar),
                _ => {}
            }
            decoded.push(b);
            // Multi-byte UTF-8 is copied whole below, so `seg` stays a valid str slice.
            let len = utf8_len(b);
            match seg.get(i..i + len) {
                Some(s) => out.push_str(s),
                None => return Err(PathError::InvalidUtf8),
            }
            decoded.extend_from_slice(&bytes[i + 1..i + len]);
            i += len;
        }
    }
    if std::str::from_utf8(decoded).is_err() {
        return Err(PathError::InvalidUtf8);
    }
    Ok(())
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

fn normalize_slow(path: &str) -> Result<String, PathError> {
    let mut stack: Vec<String> = Vec::new();
    let mut decoded = Vec::new();
    let mut trailing_slash = false;
    // The first byte is '/', so the first split item is empty and skipped.
    for raw in path.split('/').skip(1) {
        trailing_slash = false;
        if raw.is_empty() {
            trailing_slash = true;
            continue;
        }
        let mut seg = String::with_capacity(raw.len());
        canonical_segment(raw, &mut seg, &mut decoded)?;
        // Servlet-style upstreams decode `%3B` to `;` and then drop parameters, so `..%3B` is
        // a `..` to them: judge dot-segments by the decoded bytes.
        let bare = decoded.split(|&b| b == b';').next().unwrap_or(&[]);
        if bare == b"." || bare == b".." {
            if bare.len() != decoded.len() {
                return Err(PathError::DotSegmentParams);
            }
            if bare == b".." && stack.pop().is_none() {
                return Err(PathError::AboveRoot);
            }
            trailing_slash = true;
            continue;
        }
        stack.push(seg);
    }
    let mut out = String::with_capacity(path.len());
    for seg in &stack {
        out.push('/');
        out.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p).map(|c| c.into_owned())
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for p in ["/", "/a", "/a/b/", "/health", "/a.b/c..d/.e"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn dot_segments_resolve() {
        assert_eq!(n("/a/./b").unwrap(), "/a/b");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/health/../postbox/x").unwrap(), "/postbox/x");
        assert_eq!(n("/health/%2e%2e/postbox/x").unwrap(), "/postbox/x");
        assert_eq!(n("/health/%2E./postbox").unwrap(), "/postbox");
        assert_eq!(n("/a/.").unwrap(), "/a/");
    }

    #[test]
    fn slashes_merge() {
        assert_eq!(n("//a///b//").unwrap(), "/a/b/");
        assert_eq!(n("//").unwrap(), "/");
    }

    #[test]
    fn unreserved_decoded_others_uppercased() {
        assert_eq!(n("/%61%7e%2d").unwrap(), "/a~-");
        assert_eq!(n("/a%3ab").unwrap(), "/a%3Ab");
        assert_eq!(n("/%252e%252e/x").unwrap(), "/%252e%252e/x");
        assert_eq!(n("/caf%C3%A9").unwrap(), "/caf%C3%A9");
    }

    #[test]
    fn refusals() {
        assert_eq!(n("/a%2Fb"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a%2fb"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a%5Cb"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a\\b"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a%00"), Err(PathError::ControlChar));
        assert_eq!(n("/a/..;/b"), Err(PathError::DotSegmentParams));
        assert_eq!(n("/a/.;x/b"), Err(PathError::DotSegmentParams));
        assert_eq!(n("/.."), Err(PathError::AboveRoot));
        assert_eq!(n("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(n("/%2e%2e/b"), Err(PathError::AboveRoot));
        assert_eq!(n("/%zz"), Err(PathError::BadPercent));
        assert_eq!(n("/%4"), Err(PathError::BadPercent));
        assert_eq!(n("/%c0%ae%c0%ae/x"), Err(PathError::InvalidUtf8));
        assert_eq!(n("*"), Err(PathError::NotAbsolute));
        assert_eq!(n(""), Err(PathError::NotAbsolute));
    }

    #[test]
    fn params_on_normal_segments_are_kept() {
        assert_eq!(n("/a;v=1/b").unwrap(), "/a;v=1/b");
    }

    #[test]
    fn encoded_params_on_dot_segments_are_refused() {
        for p in [
            "/pub/..%3B/p/secret",
            "/a/.%3Bx/b",
            "/a/%2e%2e;/b",
            "/a/%2E%2e%3b/b",
        ] {
            assert_eq!(n(p), Err(PathError::DotSegmentParams), "{p}");
        }
        assert_eq!(n("/a/x%3B../b").unwrap(), "/a/x%3B../b");
    }

    #[test]
    fn routing_ignores_params() {
        assert_eq!(route_key("/p;x/secret"), "/p/secret");
        assert_eq!(route_key("/p%3Bx/secret;v=1"), "/p/secret");
        assert_eq!(route_key("/p;/"), "/p/");
        assert_eq!(route_key("/;x/p/secret"), "/p/secret");
        assert_eq!(route_key("/%3Bx/p;y/secret"), "/p/secret");
        assert_eq!(route_key("/p/;x"), "/p/");
        assert_eq!(route_key("/;x"), "/");
        assert!(matches!(route_key("/p/secret"), Cow::Borrowed(_)));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const SEGMENTS: &[&str] = &[
        "a", "b", "api", "..", ".", "", "%2e", "%2E%2e", "x;y", "%41", "%7e", "~", "%3a", "a.b",
        "%252e", "..a",
    ];

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(SEGMENTS), 0..12)
            .prop_map(|segs| format!("/{}", segs.join("/")))
    }

    proptest! {
        #[test]
        fn idempotent_and_canonical(p in path()) {
            if let Ok(n) = normalize(&p) {
                let again = normalize(&n).expect("normal form must be accepted");
                prop_assert_eq!(&again, &n);
                prop_assert!(n.starts_with('/'));
                prop_assert!(!n.contains("//"));
                prop_assert!(n.split('/').all(|s| s != "." && s != ".."));
            }
        }

        #[test]
        fn never_climbs_above_root(p in path()) {
            // Model: decode only what can become a dot-segment, then walk the segments.
            let mut depth = 0i32;
            let mut climbs = false;
            for seg in p.split('/').skip(1) {
                let decoded = seg.replace("%2e", ".").replace("%2E", ".");
                match decoded.as_str() {
                    "" | "." => {}
                    ".." => {
                        depth -= 1;
                        if depth < 0 {
                            climbs = true;
                            break;
                        }
                    }
                    _ => depth += 1,
                }
            }
            if climbs {
                prop_assert_eq!(normalize(&p), Err(PathError::AboveRoot));
            } else {
                prop_assert!(normalize(&p).is_ok(), "{} refused: {:?}", p, normalize(&p));
            }
        }

        #[test]
        fn arbitrary_input_never_panics(s in "\\PC*") {
            let _ = normalize(&format!("/{s}"));
        }
    }
}

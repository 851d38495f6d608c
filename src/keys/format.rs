//! The `kg_` key format: generating keys, checking their shape and checksum before any
//! lookup, and the SHA-256 digest (and its `sha256:<hex>` text) that key files store.

use sha2::{Digest, Sha256};

/// Prefix of every key keygate issues.
pub(crate) const KEY_PREFIX: &str = "kg_";
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
        // Folded without an early exit so the compiler checks many bytes at once: every
        // request's key passes here.
        && key[KEY_PREFIX.len()..]
            .iter()
            .fold(true, |ok, b| ok & b.is_ascii_alphanumeric())
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

/// Parses `sha256:<64 lowercase hex>`.
pub(crate) fn parse_hash(text: &str) -> Option<Digest32> {
    let hex_part = text.strip_prefix("sha256:")?;
    if hex_part.len() != 64 || hex_part.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
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
}

//! How numbers, addresses and strings are spelled in a line, written straight into the line's
//! buffer: the writer thread formats a line per request, and `core::fmt` cost it several times
//! what these do (a fifth of keygate's instructions per request went to the access log).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `n` in decimal.
pub(super) fn push_u64(out: &mut Vec<u8>, n: u64) {
    push_padded(out, n, 1);
}

/// Two decimal digits for every value below 100, so a number takes one division per pair.
const PAIRS: [u8; 200] = {
    let mut t = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        t[2 * i] = b'0' + (i / 10) as u8;
        t[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    t
};

/// Digits in the largest u64.
const DIGITS: usize = 20;

/// Appends `n` in decimal with at least `width` digits (leading zeros), as `{n:0width$}`.
pub(super) fn push_padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    // Octets, statuses' digits and small counts: most numbers in a line are one digit.
    if n < 10 && width <= 1 {
        out.push(b'0' + n as u8);
        return;
    }
    // Digits end at DIGITS; the copy below always takes DIGITS bytes from where they start
    // and then cuts the line back: a copy of fixed length is a few moves, one of the
    // number's own length was a call to memcpy for every number in a line.
    let mut buf = [b'0'; 2 * DIGITS];
    let mut i = DIGITS;
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        i -= 1;
        buf[i] = b'0' + n as u8;
    }
    let start = i.min(DIGITS.saturating_sub(width));
    if let Some(chunk) = buf.get(start..start + DIGITS) {
        let end = out.len() + (DIGITS - start);
        out.extend_from_slice(chunk);
        out.truncate(end);
    }
}

/// Appends `d` in milliseconds with three decimals (microseconds, rounded to nearest).
pub(super) fn push_ms(out: &mut Vec<u8>, d: std::time::Duration) {
    // In u64: `as_micros` is a u128 and its division a libcall; u64 microseconds last
    // 584,000 years.
    let micros = d
        .as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from((d.subsec_nanos() + 500) / 1000));
    push_u64(out, micros / 1000);
    out.push(b'.');
    push_padded(out, micros % 1000, 3);
}

fn push_ipv4(out: &mut Vec<u8>, ip: Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        push_u64(out, u64::from(octet));
    }
}

/// Appends an address as its `Display` does.
pub(super) fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => push_ipv4(out, v4),
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// Appends a socket address as its `Display` does.
pub(super) fn push_socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            push_ipv4(out, *a.ip());
            out.push(b':');
            push_u64(out, u64::from(a.port()));
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// Appends `s` as a JSON string literal: quotes, backslashes and control characters escaped,
/// everything else copied in runs.
pub(super) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Nearly every value needs no escape: test it whole, without an early exit, and copy
    // it once.
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    let dirty_words = words.fold(0u64, |acc, w| {
        acc | <[u8; 8]>::try_from(w).map_or(HIGH, |w| escape_bits(u64::from_le_bytes(w)))
    });
    let dirty_tail = tail.iter().any(|&b| ESCAPE[usize::from(b)]);
    if dirty_words == 0 && !dirty_tail {
        out.extend_from_slice(bytes);
    } else {
        push_escaped(out, bytes);
    }
    out.push(b'"');
}

/// The escaping path of [`push_json_str`], byte by byte.
fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !ESCAPE[usize::from(b)] {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Bytes a JSON string cannot hold as they are: quote, backslash, control characters, DEL.
const ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = b < 0x20 || b == b'"' as usize || b == b'\\' as usize || b == 0x7f;
        b += 1;
    }
    t
};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Nonzero when one of the eight bytes in `w` is a quote, a backslash, a control character
/// or DEL. Exact, not a filter: each test is the classic "has a zero byte" bit trick, which
/// never reports a byte that is not there (bytes of 0x80 and up never match).
fn escape_bits(w: u64) -> u64 {
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    below_space
        | zero_in(w ^ (ONES * u64::from(b'"')))
        | zero_in(w ^ (ONES * u64::from(b'\\')))
        | zero_in(w ^ (ONES * 0x7f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spelled(f: impl Fn(&mut Vec<u8>)) -> String {
        let mut s = Vec::new();
        f(&mut s);
        String::from_utf8(s).unwrap()
    }

    #[test]
    fn numbers_match_core_fmt() {
        for n in [0u64, 7, 10, 999, 1000, 65535, u64::MAX] {
            assert_eq!(spelled(|o| push_u64(o, n)), n.to_string());
            assert_eq!(spelled(|o| push_padded(o, n, 6)), format!("{n:06}"));
        }
        // Every width the line uses, after text already in the buffer.
        let mut n = 0u64;
        while n < u64::MAX / 3 {
            for width in 1..=8 {
                let mut out = b"x=".to_vec();
                push_padded(&mut out, n, width);
                assert_eq!(out, format!("x={n:0width$}").into_bytes(), "{n} {width}");
            }
            n = n * 3 + 1;
        }
    }

    #[test]
    fn milliseconds_round_to_the_nearest_microsecond() {
        use std::time::Duration;
        for (d, want) in [
            (Duration::ZERO, "0.000"),
            (Duration::from_nanos(499), "0.000"),
            (Duration::from_nanos(500), "0.001"),
            (Duration::from_micros(1500), "1.500"),
            (Duration::from_nanos(1_234_567), "1.235"),
            (Duration::from_nanos(999_999_999), "1000.000"),
            (Duration::from_secs(90), "90000.000"),
        ] {
            assert_eq!(spelled(|o| push_ms(o, d)), want, "{d:?}");
        }
        // The same digits `{:.3}` gives for the float, away from float rounding ties.
        let mut n = 1u64;
        while n < 10_000_000_000 {
            let d = Duration::from_nanos(n);
            let float = format!("{:.3}", n as f64 / 1e6);
            assert_eq!(spelled(|o| push_ms(o, d)), float, "{n} ns");
            n = n * 7 + 3;
        }
    }

    #[test]
    fn addresses_match_display() {
        for a in [
            "127.0.0.1:5000",
            "10.200.3.4:65535",
            "0.0.0.0:0",
            "[::1]:80",
            "[fe80::1%2]:9",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(spelled(|o| push_socket_addr(o, a)), a.to_string());
            assert_eq!(spelled(|o| push_ip(o, a.ip())), a.ip().to_string());
        }
    }

    #[test]
    fn json_strings_round_trip() {
        for s in [
            "",
            "plain",
            "q\"b\\s",
            "ctl\u{1}\u{1f}\u{7f}end",
            "ünï\"cødé\n",
            "\"\"",
            "a longer value with no escapes at all, past several words",
            "01234567\"89abcdef\\ghijklmn\u{0}opqrstu\u{7f}",
            "ünïcødé ünïcødé ünïcødé ünïcødé\ttab",
        ] {
            let lit = spelled(|o| push_json_str(o, s));
            assert_eq!(serde_json::from_str::<String>(&lit).unwrap(), s, "{lit}");
        }
    }

    #[test]
    fn word_test_matches_the_byte_test() {
        let escapes = |b: u8| b == b'"' || b == b'\\' || b < 0x20 || b == 0x7f;
        for b in 0..=255u8 {
            assert_eq!(ESCAPE[usize::from(b)], escapes(b), "{b:#04x}");
        }
        // Every byte value at every position, against neighbours clean and not.
        for fill in [b'a', 0x80, 0xff, b'!', b'[', 0x7e] {
            for pos in 0..8 {
                for b in 0..=255u8 {
                    let mut w = [fill; 8];
                    w[pos] = b;
                    let want = w.iter().any(|&x| escapes(x));
                    assert_eq!(escape_bits(u64::from_le_bytes(w)) != 0, want, "{w:?}");
                }
            }
        }
        // Pairs of low bytes side by side, where a borrow could spill into the next byte.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = (x & 0x3f3f_3f3f_3f3f_3f3f).to_le_bytes();
            let want = w.iter().any(|&b| escapes(b));
            assert_eq!(escape_bits(u64::from_le_bytes(w)) != 0, want, "{w:?}");
        }
    }
}

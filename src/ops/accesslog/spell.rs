//! How numbers, addresses and strings are spelled in a line, written straight into the line's
//! buffer: the writer thread formats a line per request, and `core::fmt` cost it several times
//! what these do (a fifth of keygate's instructions per request went to the access log).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `n` in decimal.
pub(super) fn push_u64(out: &mut String, n: u64) {
    push_padded(out, n, 1);
}

/// Appends `n` in decimal with at least `width` digits (leading zeros), as `{n:0width$}`.
pub(super) fn push_padded(out: &mut String, mut n: u64, width: usize) {
    // Octets, statuses' digits and small counts: most numbers in a line are one digit.
    if n < 10 && width <= 1 {
        out.push(char::from(b'0' + n as u8));
        return;
    }
    let mut buf = [b'0'; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let start = i.min(buf.len().saturating_sub(width));
    // Digits are ASCII: pushing them as chars skips a UTF-8 check per number.
    out.extend(buf[start..].iter().map(|&d| char::from(d)));
}

/// Appends `v` with three decimals, exactly as `{v:.3}` does.
///
/// The fast path rounds `v * 1000`; that agrees with `{:.3}`'s exact decimal rounding unless
/// the product sits within a rounding error of a tie, which goes through `core::fmt`.
pub(super) fn push_fixed3(out: &mut String, v: f64) {
    let scaled = v * 1000.0;
    let near_tie = (scaled - scaled.floor() - 0.5).abs() < 1e-6;
    if !(v.is_finite() && v >= 0.0 && scaled < 1e15) || near_tie {
        let _ = write!(out, "{v:.3}");
        return;
    }
    let thousandths = scaled.round() as u64;
    push_u64(out, thousandths / 1000);
    out.push('.');
    push_padded(out, thousandths % 1000, 3);
}

fn push_ipv4(out: &mut String, ip: Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_u64(out, u64::from(octet));
    }
}

/// Appends an address as its `Display` does.
pub(super) fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => push_ipv4(out, v4),
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// Appends a socket address as its `Display` does.
pub(super) fn push_socket_addr(out: &mut String, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            push_ipv4(out, *a.ip());
            out.push(':');
            push_u64(out, u64::from(a.port()));
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// Appends `s` as a JSON string literal: quotes, backslashes and control characters escaped,
/// everything else copied in runs.
pub(super) fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Most values need no escape: skip eight clean bytes at a time.
        if let Some(word) = bytes
            .get(i..i + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
        {
            if !needs_escape(u64::from_le_bytes(word)) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        if b != b'"' && b != b'\\' && b >= 0x20 && b != 0x7f {
            i += 1;
            continue;
        }
        // `b` is ASCII, so both cuts fall on character boundaries.
        out.push_str(s.get(start..i).unwrap_or_default());
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            _ => {
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
        i += 1;
        start = i;
    }
    out.push_str(s.get(start..).unwrap_or_default());
    out.push('"');
}

/// True when one of the eight bytes in `w` is a quote, a backslash, a control character or
/// DEL. Exact, not a filter: each test is the classic "has a zero byte" bit trick, which
/// never reports a byte that is not there (bytes of 0x80 and up never match).
fn needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (below_space
        | zero_in(w ^ (ONES * u64::from(b'"')))
        | zero_in(w ^ (ONES * u64::from(b'\\')))
        | zero_in(w ^ (ONES * 0x7f)))
        != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spelled(f: impl Fn(&mut String)) -> String {
        let mut s = String::new();
        f(&mut s);
        s
    }

    #[test]
    fn numbers_match_core_fmt() {
        for n in [0u64, 7, 10, 999, 1000, 65535, u64::MAX] {
            assert_eq!(spelled(|o| push_u64(o, n)), n.to_string());
            assert_eq!(spelled(|o| push_padded(o, n, 6)), format!("{n:06}"));
        }
        let mut v = 0.0f64;
        while v < 5000.0 {
            assert_eq!(spelled(|o| push_fixed3(o, v)), format!("{v:.3}"), "{v}");
            v = v * 1.37 + 0.000_123_7;
        }
        for v in [
            0.0005,
            0.0015,
            1.2345,
            2.5,
            1e20,
            f64::NAN,
            f64::INFINITY,
            -1.0,
        ] {
            assert_eq!(spelled(|o| push_fixed3(o, v)), format!("{v:.3}"), "{v}");
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
        // Every byte value at every position, against neighbours clean and not.
        for fill in [b'a', 0x80, 0xff, b'!', b'[', 0x7e] {
            for pos in 0..8 {
                for b in 0..=255u8 {
                    let mut w = [fill; 8];
                    w[pos] = b;
                    let want = w.iter().any(|&x| escapes(x));
                    assert_eq!(needs_escape(u64::from_le_bytes(w)), want, "{w:?}");
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
            assert_eq!(needs_escape(u64::from_le_bytes(w)), want, "{w:?}");
        }
    }
}

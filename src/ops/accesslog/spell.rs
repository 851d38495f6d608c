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
    // Only ASCII digits were written, so this never falls back.
    out.push_str(std::str::from_utf8(&buf[start..]).unwrap_or_default());
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
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        if b != b'"' && b != b'\\' && b >= 0x20 && b != 0x7f {
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
        start = i + 1;
    }
    out.push_str(s.get(start..).unwrap_or_default());
    out.push('"');
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
        ] {
            let lit = spelled(|o| push_json_str(o, s));
            assert_eq!(serde_json::from_str::<String>(&lit).unwrap(), s, "{lit}");
        }
    }
}

//! Who the client is: the peer, or, when the peer is a trusted proxy, the right-most address in
//! `X-Forwarded-For` that no trusted proxy added.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

use super::headers::X_FORWARDED_FOR;

/// An IPv4 client reached over an IPv6 socket (`::ffff:10.0.0.1`) is that IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The resolved client address, and whether the peer is a trusted proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The address limits and logs go by.
    pub ip: IpAddr,
    /// The peer is in `trusted_proxies`: its forwarded headers are kept.
    pub via_trusted_proxy: bool,
}

fn trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|n| n.contains(&ip))
}

/// One `X-Forwarded-For` hop: a bare address, or one with a port (`1.2.3.4:80`, `[::1]:80`).
fn hop(text: &str) -> Option<IpAddr> {
    let t = text.trim();
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = t.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok().map(canonical);
    }
    let (host, port) = t.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Resolves the client of a request that came from `peer`.
///
/// Hops are read right to left: each trusted one may name the next; the first untrusted
/// address is the client. An unreadable hop ends the walk at the last address believed;
/// empty ones are skipped.
pub fn resolve(peer: IpAddr, headers: &HeaderMap, trusted_proxies: &[IpNet]) -> Client {
    let peer = canonical(peer);
    if trusted_proxies.is_empty() || !trusted(trusted_proxies, peer) {
        return Client {
            ip: peer,
            via_trusted_proxy: false,
        };
    }
    let mut ip = peer;
    'walk: for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(value) = value.to_str() else { break };
        for text in value.rsplit(',') {
            // An empty element or line names no hop: skipped, as forwarding joins the lines
            // without them (`headers::set_forwarded`).
            if text.trim().is_empty() {
                continue;
            }
            let Some(next) = hop(text) else { break 'walk };
            ip = next;
            if !trusted(trusted_proxies, next) {
                break 'walk;
            }
        }
    }
    Client {
        ip,
        via_trusted_proxy: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&X_FORWARDED_FOR, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_peers() {
        let lb = "10.0.0.5".parse().unwrap();
        let outsider: IpAddr = "203.0.113.9".parse().unwrap();
        let h = xff(&["198.51.100.1"]);
        assert_eq!(resolve(lb, &h, &[]).ip, lb, "nothing trusted");
        let t = nets(&["10.0.0.0/8"]);
        assert_eq!(resolve(outsider, &h, &t).ip, outsider);
        assert!(!resolve(outsider, &h, &t).via_trusted_proxy);
        let c = resolve(lb, &h, &t);
        assert_eq!(c.ip, "198.51.100.1".parse::<IpAddr>().unwrap());
        assert!(c.via_trusted_proxy);
    }

    #[test]
    fn the_right_most_untrusted_hop_wins() {
        let lb: IpAddr = "10.0.0.5".parse().unwrap();
        let t = nets(&["10.0.0.0/8"]);
        // The client wrote the first entry itself: it is never believed.
        let h = xff(&["1.1.1.1, 198.51.100.7", "10.1.1.1"]);
        assert_eq!(resolve(lb, &h, &t).ip.to_string(), "198.51.100.7");
        let all_trusted = xff(&["10.2.2.2, 10.3.3.3"]);
        assert_eq!(resolve(lb, &all_trusted, &t).ip.to_string(), "10.2.2.2");
        let garbage = xff(&["198.51.100.7, nonsense"]);
        assert_eq!(resolve(lb, &garbage, &t).ip, lb);
        let ports = xff(&["[2001:db8::1]:443, 198.51.100.8:1234"]);
        assert_eq!(resolve(lb, &ports, &t).ip.to_string(), "198.51.100.8");
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().unwrap();
        assert_eq!(resolve(mapped, &h, &t).ip.to_string(), "198.51.100.7");
        // Empty lines and elements name no hop, as forwarding drops them when it joins.
        let gaps = xff(&["198.51.100.9, ", "", "10.1.1.1"]);
        assert_eq!(resolve(lb, &gaps, &t).ip.to_string(), "198.51.100.9");
    }
}

//! Who is asking: the client address that rate limits count and the audit log records.
//!
//! Guarantees: `X-Forwarded-For` is believed only when the peer is a configured trusted proxy
//! (`CDP_TRUSTED_PROXIES`), and then only up to the first hop that is not itself trusted, so a
//! client cannot choose its own address by sending the header.

use std::net::{IpAddr, SocketAddr};

use poem::Request;

/// The client address of a request: the peer, or behind trusted proxies the last address in
/// `X-Forwarded-For` that a trusted proxy vouches for.
pub fn client_ip(request: &Request, trusted_proxies: &[ipnet::IpNet]) -> Option<IpAddr> {
    let peer = request
        .remote_addr()
        .as_socket_addr()
        .map(|address| canonical(address.ip()))?;
    let forwarded: Vec<&str> = request
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    Some(resolve(peer, &forwarded, trusted_proxies))
}

/// Walks the chain from the peer backwards: each trusted hop vouches for the one before it.
fn resolve(peer: IpAddr, forwarded: &[&str], trusted_proxies: &[ipnet::IpNet]) -> IpAddr {
    let trusted = |address: &IpAddr| trusted_proxies.iter().any(|net| net.contains(address));
    let mut client = peer;
    if !trusted(&client) {
        return client;
    }
    let hops = forwarded
        .iter()
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|hop| !hop.is_empty())
        .collect::<Vec<_>>();
    for hop in hops.into_iter().rev() {
        // A hop the proxies wrote but that is no address ends the chain: the request counts
        // against the last address known.
        let Some(address) = parse_hop(hop) else {
            return client;
        };
        client = address;
        if !trusted(&client) {
            return client;
        }
    }
    client
}

/// `192.0.2.1`, `2001:db8::1`, `192.0.2.1:4711` or `[2001:db8::1]:4711`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|address| address.ip()))
        .map(canonical)
}

/// An IPv4 address mapped into IPv6 counts as the IPv4 address (dual-stack listeners).
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|net| net.parse().unwrap()).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        assert_eq!(
            resolve(ip("198.51.100.7"), &["203.0.113.9"], &[]),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn an_untrusted_peer_cannot_choose_its_address() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            resolve(ip("198.51.100.7"), &["203.0.113.9"], &trusted),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn trusted_hops_are_walked_back_to_the_first_untrusted_one() {
        let trusted = nets(&["10.0.0.0/8", "192.168.1.1/32"]);
        // The client forged the first entry; the proxies appended the rest.
        let chain = ["1.1.1.1, 203.0.113.9", "192.168.1.1 , 10.1.2.3"];
        assert_eq!(resolve(ip("10.0.0.1"), &chain, &trusted), ip("203.0.113.9"));
        assert_eq!(
            resolve(ip("10.0.0.1"), &["[2001:db8::1]:4711"], &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            resolve(ip("10.0.0.1"), &["unknown, 10.0.0.2"], &trusted),
            ip("10.0.0.2"),
            "garbage ends the chain at the last known address"
        );
        assert_eq!(
            resolve(ip("10.0.0.1"), &[], &trusted),
            ip("10.0.0.1"),
            "no header: the proxy itself"
        );
    }

    #[test]
    fn mapped_ipv4_addresses_are_ipv4() {
        assert_eq!(canonical(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }
}

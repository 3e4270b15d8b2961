//! CIDRs are [`IpNet`]s with host bits cleared; what ipnet lacks lives here: parsing as the
//! API server reads NetworkPolicy `ipBlock`s (Go's rules, not Rust's), strict containment,
//! and the datapath's address-bytes layout.
use std::net::IpAddr;

use ipnet::IpNet;

/// The prefix of length `len` holding `addr` (host bits cleared). Panics if `len` exceeds the
/// address width.
pub fn prefix(addr: IpAddr, len: u8) -> IpNet {
    IpNet::new(addr, len).unwrap_or_else(|e| panic!("prefix length {len} of {addr}: {e}")).trunc()
}

/// Parses a CIDR as the API server reads it (see [`parse_api`]).
pub fn parse(s: &str) -> Result<IpNet, String> {
    parse_api(s).map(|(c, _)| c)
}

/// Parses a CIDR the way the API server validates and its clients read NetworkPolicy
/// `ipBlock` fields (`IsValidCIDRForLegacyField`, k8s.io/utils/net `ParseCIDRSloppy`):
/// - Go's `net.ParseCIDR` first: `a.b.c.d/n` or an IPv6 address (also with an embedded
///   IPv4 part, `::ffff:a.b.c.d`) and `/n`, `n` decimal digits only (leading zeros allowed).
/// - Failing that, the same after stripping leading zeros from the octets of a trailing
///   dotted quad and from the length: `010.244.1.30/32` is `10.244.1.30/32` (decimal, not
///   octal). Objects stored before Go 1.17 hold such values, and the API server still
///   accepts them where strict validation is off.
/// - Host bits may be set (`10.1.2.3/8`, the "interface address" form); they are cleared.
/// - An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) is the IPv4 network
///   (`10.0.0.0/8`), as Go's `IPNet.Contains` matches IPv4 addresses against it.
///
/// Returns the prefix and the prefix length as written (what the API server compares
/// when it checks that an `except` is a strict subset of its `cidr`).
pub fn parse_api(s: &str) -> Result<(IpNet, u8), String> {
    let bad = || format!("invalid CIDR {s:?}: want an address and a prefix length, as 10.0.0.0/8 or fd00::/64");
    match go_parse_cidr(s) {
        Some(c) => Ok(c),
        None => go_parse_cidr(&strip_zeros(s).ok_or_else(bad)?).ok_or_else(bad),
    }
}

/// `inner` lies inside `outer` and is smaller.
pub fn strictly_contains(outer: &IpNet, inner: &IpNet) -> bool {
    inner.prefix_len() > outer.prefix_len() && outer.contains(inner)
}

/// The prefix is a single address (/32, /128).
pub fn is_host(c: &IpNet) -> bool {
    c.prefix_len() == c.max_prefix_len()
}

/// Go's `net.ParseCIDR`, normalised: (prefix, length as written). The address part is Go's
/// `netip.ParseAddr` (no zone; IPv4 octets without leading zeros, which Rust's parser also
/// rejects), the length Go's `dtoi` (decimal digits only, no sign).
fn go_parse_cidr(s: &str) -> Option<(IpNet, u8)> {
    let (a, l) = s.split_once('/')?;
    let addr: IpAddr = a.parse().ok()?;
    if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u32 = l.trim_start_matches('0').parse().unwrap_or(if l.trim_start_matches('0').is_empty() { 0 } else { u32::MAX });
    if len > max {
        return None;
    }
    let len = len as u8;
    let c = prefix(addr, len);
    // A masked address in ::ffff:0:0/96 is an IPv4 network to Go (IP.To4 succeeds).
    if let IpNet::V6(v6) = c {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if len >= 96 {
                return Some((prefix(IpAddr::V4(v4), len - 96), len));
            }
        }
    }
    Some((c, len))
}

/// The rewrite of k8s.io/utils/net's `matchZeros`: a dotted quad ending the text, at its
/// start or after a `:`, optionally followed by `/length`; leading zeros dropped from each
/// number (an all-zero number becomes `0`). `None` when the text has no such tail.
fn strip_zeros(s: &str) -> Option<String> {
    let start = s.rfind(':').map_or(0, |i| i + 1);
    let (head, tail) = s.split_at(start);
    let (quad, len) = match tail.split_once('/') {
        Some((q, l)) => (q, Some(l)),
        None => (tail, None),
    };
    let num = |n: &str| -> Option<String> {
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let t = n.trim_start_matches('0');
        Some(if t.is_empty() { "0".to_string() } else { t.to_string() })
    };
    let parts: Vec<&str> = quad.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    let octets: Vec<String> = parts.into_iter().map(num).collect::<Option<_>>()?;
    let mut out = format!("{head}{}", octets.join("."));
    if let Some(l) = len {
        out.push('/');
        out.push_str(&num(l)?);
    }
    Some(out)
}

/// Address bytes as the datapath keys them: network order, IPv4 in the first four bytes.
pub fn addr_bytes(a: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(v) => out[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => out = v.octets(),
    }
    out
}

/// The datapath's address family of `a` ([`netpol_common::FAMILY_V4`] or `FAMILY_V6`).
pub fn addr_family(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        netpol_common::FAMILY_V4
    } else {
        netpol_common::FAMILY_V6
    }
}

/// The address of datapath bytes ([`addr_bytes`]) of `family`.
pub fn addr_from_bytes(family: u8, b: [u8; 16]) -> IpAddr {
    if family == netpol_common::FAMILY_V4 {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        IpAddr::from(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_masks_host_bits_and_rejects_garbage() {
        assert_eq!(parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(parse("fd00::1/64").unwrap().to_string(), "fd00::/64");
        assert_eq!(parse("::/0").unwrap().to_string(), "::/0");
        assert_eq!(parse("1.2.3.4/32").unwrap().to_string(), "1.2.3.4/32");
        assert!(parse("10.0.0.0/33").is_err());
        assert!(parse("10.0.0.0").is_err());
        assert!(parse("10.0.0/8").is_err());
        assert!(parse("fd00::/129").is_err());
    }

    /// What the API server accepts in an ipBlock (k8s.io/utils/net ParseCIDRSloppy after Go's
    /// net.ParseCIDR), with the meaning its clients give it.
    #[test]
    fn parse_accepts_what_the_api_server_accepts_with_its_meaning() {
        let p = |s: &str| parse(s).map(|c| c.to_string());
        // Leading zeros in IPv4 octets and the length: decimal, not octal.
        assert_eq!(p("010.244.1.30/32").unwrap(), "10.244.1.30/32");
        assert_eq!(p("010.244.001.030/32").unwrap(), "10.244.1.30/32");
        assert_eq!(p("192.168.000.000/016").unwrap(), "192.168.0.0/16");
        assert_eq!(p("0000.0.0.0/0").unwrap(), "0.0.0.0/0");
        assert_eq!(p("10.0.0.0/008").unwrap(), "10.0.0.0/8");
        // Host bits set: the interface-address form, masked.
        assert_eq!(p("10.244.1.30/16").unwrap(), "10.244.0.0/16");
        // IPv4-mapped IPv6: the IPv4 network (Go's IPNet.Contains matches IPv4 against it).
        assert_eq!(p("::ffff:10.244.1.30/128").unwrap(), "10.244.1.30/32");
        assert_eq!(p("::ffff:10.0.0.0/104").unwrap(), "10.0.0.0/8");
        assert_eq!(p("::ffff:010.0.0.1/128").unwrap(), "10.0.0.1/32");
        assert_eq!(p("::ffff:0:0/96").unwrap(), "0.0.0.0/0");
        assert_eq!(p("::ffff:10.0.0.0/64").unwrap(), "::/64");
        assert_eq!(p("::ffff:0a00:1/120").unwrap(), "10.0.0.0/24");
        assert_eq!(parse_api("::ffff:10.0.0.0/104").unwrap().1, 104);
        // What it rejects.
        for bad in [
            "10.0.0.256/32",
            "0300.0.0.1/32",
            "10.0.0.1",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/33",
            "10.0.0.0/-1",
            "10.0.0/8",
            "fe80::1%eth0/64",
            " 10.0.0.0/8",
            "10.0.0.0/8 ",
            "0x0a.0.0.0/8",
            "10.0.0.0/ 8",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn containment_is_per_family() {
        let all4 = parse("0.0.0.0/0").unwrap();
        let all6 = parse("::/0").unwrap();
        assert!(all4.contains(&"1.2.3.4".parse::<IpAddr>().unwrap()));
        assert!(!all6.contains(&"1.2.3.4".parse::<IpAddr>().unwrap()));
        assert!(!all4.contains(&"::1".parse::<IpAddr>().unwrap()));
        let a = parse("10.0.0.0/8").unwrap();
        let b = parse("10.1.0.0/16").unwrap();
        assert!(strictly_contains(&a, &b));
        assert!(!b.contains(&a));
        assert!(a.contains(&a) && !strictly_contains(&a, &a));
    }

    #[test]
    fn address_bytes_round_trip_per_family() {
        for a in ["10.1.2.3", "::ffff:10.1.2.3", "fd00::1", "0.0.0.0", "::"] {
            let a: IpAddr = a.parse().unwrap();
            assert_eq!(addr_from_bytes(addr_family(a), addr_bytes(a)), a);
        }
    }
}

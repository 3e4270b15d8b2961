//! IPv4/IPv6 prefixes with host bits cleared.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

fn to_u128(a: IpAddr) -> (u128, u8) {
    match a {
        IpAddr::V4(v) => (u32::from(v) as u128, 32),
        IpAddr::V6(v) => (u128::from(v), 128),
    }
}

fn mask(bits: u8, len: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let all: u128 = if bits == 128 { u128::MAX } else { (1u128 << bits) - 1 };
    let shift = bits - len;
    (all >> shift) << shift
}

fn from_u128(v: u128, bits: u8) -> IpAddr {
    if bits == 32 {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

impl Cidr {
    /// A prefix; host bits are cleared. Panics if `len` exceeds the address width.
    pub fn new(addr: IpAddr, len: u8) -> Cidr {
        let (v, bits) = to_u128(addr);
        assert!(len <= bits, "prefix length {len} too long");
        Cidr { addr: from_u128(v & mask(bits, len), bits), len }
    }

    /// The single-address prefix of `addr`.
    pub fn host(addr: IpAddr) -> Cidr {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, len }
    }

    /// Parses `a.b.c.d/n` or `x::y/n`. Host bits are cleared (as the API server's parser does).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, l) = s.split_once('/').ok_or_else(|| format!("invalid CIDR {s:?}: missing '/prefix-length'"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("invalid CIDR {s:?}: bad address {a:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = l
            .parse()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| format!("invalid CIDR {s:?}: prefix length must be 0-{max}"))?;
        Ok(Cidr::new(addr, len))
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    pub fn max_len(&self) -> u8 {
        if self.is_ipv4() {
            32
        } else {
            128
        }
    }

    pub fn is_host(&self) -> bool {
        self.len == self.max_len()
    }

    pub fn contains_addr(&self, a: IpAddr) -> bool {
        if a.is_ipv4() != self.is_ipv4() {
            return false;
        }
        let (v, bits) = to_u128(a);
        let (mine, _) = to_u128(self.addr);
        v & mask(bits, self.len) == mine
    }

    /// `other` lies inside `self` (or is equal to it).
    pub fn contains(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains_addr(other.addr)
    }

    pub fn strictly_contains(&self, other: &Cidr) -> bool {
        other.len > self.len && self.contains_addr(other.addr)
    }

    /// Address bytes in network order, IPv4 in the first four bytes.
    pub fn addr_bytes(&self) -> [u8; 16] {
        addr_bytes(self.addr)
    }
}

pub fn addr_bytes(a: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(v) => out[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => out = v.octets(),
    }
    out
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_masks_host_bits_and_rejects_garbage() {
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(Cidr::parse("fd00::1/64").unwrap().to_string(), "fd00::/64");
        assert_eq!(Cidr::parse("::/0").unwrap().to_string(), "::/0");
        assert_eq!(Cidr::parse("1.2.3.4/32").unwrap().to_string(), "1.2.3.4/32");
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0.0").is_err());
        assert!(Cidr::parse("10.0.0/8").is_err());
        assert!(Cidr::parse("fd00::/129").is_err());
    }

    #[test]
    fn containment_is_per_family() {
        let all4 = Cidr::parse("0.0.0.0/0").unwrap();
        let all6 = Cidr::parse("::/0").unwrap();
        assert!(all4.contains_addr("1.2.3.4".parse().unwrap()));
        assert!(!all6.contains_addr("1.2.3.4".parse().unwrap()));
        assert!(!all4.contains_addr("::1".parse().unwrap()));
        let a = Cidr::parse("10.0.0.0/8").unwrap();
        let b = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(a.strictly_contains(&b));
        assert!(!b.contains(&a));
        assert!(a.contains(&a) && !a.strictly_contains(&a));
    }
}

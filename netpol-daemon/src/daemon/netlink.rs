//! Asking the kernel where a pod lives: an RTM_GETROUTE with RTM_F_FIB_MATCH returns the FIB
//! entry that routes the pod's address; a host route (/32, /128) through a device is how
//! kindnet/ptp, Calico and Cilium wire pods. Also interface names and the node's own addresses.
use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::datapath::rtnl;

const NUD_INCOMPLETE: u16 = 0x01;
const NUD_FAILED: u16 = 0x20;

/// The route the kernel uses for an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    pub ifindex: u32,
    /// Prefix length of the matching FIB entry.
    pub dst_len: u8,
}

/// Looks up the FIB entry for `addr` in the calling thread's network namespace.
pub fn route_get(addr: IpAddr) -> io::Result<RouteInfo> {
    let mut req = RouteMessage::default();
    req.header.address_family = family_of(addr);
    req.header.destination_prefix_length = if addr.is_ipv4() { 32 } else { 128 };
    req.header.flags = RouteFlags::FibMatch;
    req.attributes.push(RouteAttribute::Destination(RouteAddress::from(addr)));
    let reply = rtnl::ack(RouteNetlinkMessage::GetRoute(req), 0)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink route reply");
    let route = reply
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => Some(r),
            _ => None,
        })
        .ok_or_else(bad)?;
    let ifindex = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    Ok(RouteInfo { ifindex: ifindex.ok_or_else(bad)?, dst_len: route.header.destination_prefix_length })
}

fn family_of(addr: IpAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

pub fn ifname(ifindex: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// The host-side interface of a pod address (one look-up; see [`Resolver`] for many).
pub fn pod_interface(addr: IpAddr) -> io::Result<(u32, String)> {
    let mut r = Resolver::default();
    match r.pod_interface(addr) {
        Err(_) if r.wake_silent() => {
            r.settle(|r| r.pod_interface(addr).is_ok());
            r.pod_interface(addr)
        }
        other => other,
    }
}

/// Pod interface look-ups of one resolve pass: the device of a host route to the pod (ptp,
/// Calico, Cilium), or, when the address is routed to a Linux bridge (the bridge plugin,
/// flannel), the bridge port the pod sits behind: neighbour table (address -> MAC), then the
/// bridge's forwarding database (MAC -> port). The link, neighbour and forwarding tables are
/// dumped at most once per pass (and again per [`Resolver::settle`] round), not per pod.
#[derive(Default)]
pub struct Resolver {
    kinds: Option<Vec<(u32, Option<String>)>>,
    neigh: Option<Vec<Neighbour>>,
    fdb: Option<Vec<Neighbour>>,
    /// Bridged addresses absent from those tables: a pod that has not talked yet.
    silent: Vec<IpAddr>,
}

impl Resolver {
    pub fn pod_interface(&mut self, addr: IpAddr) -> io::Result<(u32, String)> {
        let r = route_get(addr)?;
        let full = if addr.is_ipv4() { 32 } else { 128 };
        if r.dst_len != full {
            if self.is_bridge(r.ifindex)? {
                let port = match self.bridge_port(addr, r.ifindex)? {
                    Some(p) => p,
                    None => {
                        self.silent.push(addr);
                        return Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("{addr} is behind bridge {} but not in its neighbour/forwarding tables yet", r.ifindex),
                        ));
                    }
                };
                return Ok((port, ifname(port)?));
            }
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no host route for {addr} (best match is a /{} route)", r.dst_len),
            ));
        }
        let name = ifname(r.ifindex)?;
        if name == "lo" {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{addr} is a local address")));
        }
        Ok((r.ifindex, name))
    }

    fn is_bridge(&mut self, ifindex: u32) -> io::Result<bool> {
        if self.kinds.is_none() {
            self.kinds = Some(link_kinds()?);
        }
        let kinds = self.kinds.as_ref().expect("loaded");
        Ok(kinds.iter().any(|(i, k)| *i == ifindex && k.as_deref() == Some("bridge")))
    }

    /// The port of `bridge` a pod address sits behind, if the tables know it.
    fn bridge_port(&mut self, addr: IpAddr, bridge: u32) -> io::Result<Option<u32>> {
        if self.neigh.is_none() {
            let mut all = neighbours(AddressFamily::Inet)?;
            all.extend(neighbours(AddressFamily::Inet6)?);
            self.neigh = Some(all);
        }
        let Some(mac) = neighbour_mac(self.neigh.as_deref().expect("loaded"), addr, bridge) else { return Ok(None) };
        if self.fdb.is_none() {
            self.fdb = Some(neighbours(AddressFamily::Bridge)?);
        }
        Ok(fdb_port(self.fdb.as_deref().expect("loaded"), bridge, &mac))
    }

    /// Makes the node resolve the silent bridged pods of this pass (an empty datagram to the
    /// discard port: the answer teaches the bridge where each pod is). Returns whether there
    /// were any.
    pub fn wake_silent(&mut self) -> bool {
        for addr in &self.silent {
            let any: IpAddr = if addr.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
            if let Ok(s) = std::net::UdpSocket::bind((any, 0)) {
                let _ = s.send_to(&[], (*addr, 9));
            }
        }
        !self.silent.is_empty()
    }

    /// Waits (at most about 100 ms in all) until `done` holds, reading the neighbour and
    /// forwarding tables afresh each round.
    pub fn settle(&mut self, mut done: impl FnMut(&mut Resolver) -> bool) {
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            self.neigh = None;
            self.fdb = None;
            self.silent.clear();
            if done(self) {
                return;
            }
        }
    }
}

/// Every interface of the calling thread's network namespace with its link kind (`veth`,
/// `bridge`, ...; `None` for devices without one, such as lo).
fn link_kinds() -> io::Result<Vec<(u32, Option<String>)>> {
    let mut out = Vec::new();
    for m in rtnl::dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
        let RouteNetlinkMessage::NewLink(link) = m else { continue };
        let kind = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(k) => Some(k.to_string()),
                _ => None,
            }),
            _ => None,
        });
        out.push((link.header.index, kind));
    }
    Ok(out)
}

/// A neighbour entry: (ifindex, state, attributes).
type Neighbour = (u32, u16, Vec<NeighbourAttribute>);

/// The neighbour entries of `family` (AF_INET, AF_INET6, or AF_BRIDGE for bridge forwarding
/// databases).
fn neighbours(family: AddressFamily) -> io::Result<Vec<Neighbour>> {
    let mut req = NeighbourMessage::default();
    req.header.family = family;
    let mut out = Vec::new();
    for m in rtnl::dump(RouteNetlinkMessage::GetNeighbour(req))? {
        let RouteNetlinkMessage::NewNeighbour(n) = m else { continue };
        out.push((n.header.ifindex, u16::from(n.header.state), n.attributes));
    }
    Ok(out)
}

/// The MAC address the node resolved `addr` to on interface `ifindex`.
fn neighbour_mac(table: &[Neighbour], addr: IpAddr, ifindex: u32) -> Option<Vec<u8>> {
    table.iter().find_map(|(i, state, a)| {
        if *i != ifindex || state & (NUD_INCOMPLETE | NUD_FAILED) != 0 {
            return None;
        }
        let dst = a.iter().find_map(|n| match n {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => Some(IpAddr::V4(*d)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)) => Some(IpAddr::V6(*d)),
            _ => None,
        })?;
        (dst == addr).then(|| lladdr(a).map(<[u8]>::to_vec)).flatten()
    })
}

fn lladdr(a: &[NeighbourAttribute]) -> Option<&[u8]> {
    a.iter().find_map(|n| match n {
        NeighbourAttribute::LinkLayerAddress(m) => Some(m.as_slice()),
        _ => None,
    })
}

/// The port of `bridge` behind which the forwarding database has seen `mac`.
fn fdb_port(fdb: &[Neighbour], bridge: u32, mac: &[u8]) -> Option<u32> {
    fdb.iter().find_map(|(port, _, a)| {
        let master = a.iter().find_map(|n| match n {
            NeighbourAttribute::Controller(m) => Some(*m),
            _ => None,
        });
        (*port != bridge && master == Some(bridge) && lladdr(a) == Some(mac)).then_some(*port)
    })
}

/// Interfaces of the calling thread's network namespace whose link kind is `veth`.
pub fn veth_interfaces() -> io::Result<Vec<u32>> {
    Ok(link_kinds()?.into_iter().filter(|(_, k)| k.as_deref() == Some("veth")).map(|(i, _)| i).collect())
}

/// Host routes (/32, /128) of the main table through veth interfaces: (address, ifindex).
/// What a CNI installs for each pod as it wires it, before the pod's IP is reported.
pub fn veth_host_routes() -> io::Result<Vec<(IpAddr, u32)>> {
    let veths = veth_interfaces()?;
    let mut out = Vec::new();
    for (family, full) in [(AddressFamily::Inet, 32), (AddressFamily::Inet6, 128)] {
        let mut req = RouteMessage::default();
        req.header.address_family = family;
        for m in rtnl::dump(RouteNetlinkMessage::GetRoute(req))? {
            let RouteNetlinkMessage::NewRoute(r) = m else { continue };
            if r.header.destination_prefix_length != full || r.header.table != RouteHeader::RT_TABLE_MAIN {
                continue;
            }
            let (mut dst, mut oif) = (None, None);
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(IpAddr::V4(*d)),
                    RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = Some(IpAddr::V6(*d)),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if let (Some(d), Some(i)) = (dst, oif) {
                if veths.contains(&i) {
                    out.push((d, i));
                }
            }
        }
    }
    Ok(out)
}

/// Every address configured in the calling thread's network namespace (an IPv4 address's
/// local end on point-to-point links, as getifaddrs reports it).
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for m in rtnl::dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))? {
        let RouteNetlinkMessage::NewAddress(a) = m else { continue };
        let local = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(l) => Some(*l),
            _ => None,
        });
        let address = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(l) => Some(*l),
            _ => None,
        });
        out.extend(local.or(address));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_route_is_found() {
        // Every network namespace routes 127.0.0.1 through lo (local table, /32 host route).
        let r = route_get("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(ifname(r.ifindex).unwrap(), "lo");
        assert!(pod_interface("127.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn dumps_parse() {
        // The test's own namespace may have no veth at all; the dumps must still parse.
        veth_interfaces().unwrap();
        veth_host_routes().unwrap();
        neighbours(AddressFamily::Inet).unwrap();
        neighbours(AddressFamily::Bridge).unwrap();
        assert!(link_kinds().unwrap().iter().any(|(i, k)| *i == 1 && k.is_none()), "lo has no link kind");
    }

    #[test]
    fn local_addresses_include_loopback() {
        assert!(local_addresses().unwrap().contains(&"127.0.0.1".parse().unwrap()));
    }
}

//! Asking the kernel where a pod lives: an RTM_GETROUTE with RTM_F_FIB_MATCH returns the FIB
//! entry that routes the pod's address; a host route (/32, /128) through a device is how
//! kindnet/ptp, Calico and Cilium wire pods. Also interface names and the node's own addresses.
use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const RTM_F_FIB_MATCH: u32 = 0x2000;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RtMsg {
    family: u8,
    dst_len: u8,
    src_len: u8,
    tos: u8,
    table: u8,
    protocol: u8,
    scope: u8,
    ty: u8,
    flags: u32,
}

/// The route the kernel uses for an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    pub ifindex: u32,
    /// Prefix length of the matching FIB entry.
    pub dst_len: u8,
}

/// A netlink route socket, closed on drop.
struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}

/// Opens a NETLINK_ROUTE socket (2 s receive timeout) and sends `msg` to the kernel.
fn send(msg: &[u8]) -> io::Result<Fd> {
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = Fd(fd);
    let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
    unsafe {
        libc::setsockopt(
            fd.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            size_of::<libc::timeval>() as u32,
        );
    }
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    let n = unsafe {
        libc::sendto(
            fd.0,
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            0,
            &sa as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }
}

/// Looks up the FIB entry for `addr` in the calling thread's network namespace.
pub fn route_get(addr: IpAddr) -> io::Result<RouteInfo> {
    let (family, bytes): (u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let rta_len = 4 + bytes.len();
    let total = size_of::<NlMsgHdr>() + size_of::<RtMsg>() + rta_len;
    let hdr = NlMsgHdr { len: total as u32, ty: RTM_GETROUTE, flags: NLM_F_REQUEST, seq: 1, pid: 0 };
    let rtm = RtMsg { family, dst_len: (bytes.len() * 8) as u8, flags: RTM_F_FIB_MATCH, ..Default::default() };
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(as_bytes(&hdr));
    msg.extend_from_slice(as_bytes(&rtm));
    msg.extend_from_slice(&(rta_len as u16).to_ne_bytes());
    msg.extend_from_slice(&RTA_DST.to_ne_bytes());
    msg.extend_from_slice(&bytes);

    let fd = send(&msg)?;
    let mut buf = vec![0u8; 8192];
    let n = unsafe { libc::recv(fd.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_route_reply(&buf[..n as usize])
}

fn parse_route_reply(buf: &[u8]) -> io::Result<RouteInfo> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink route reply");
    if buf.len() < size_of::<NlMsgHdr>() {
        return Err(bad());
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    let len = (u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize).min(buf.len());
    let body = &buf[size_of::<NlMsgHdr>()..len];
    if ty == NLMSG_ERROR {
        let errno = i32::from_ne_bytes(body.get(..4).ok_or_else(bad)?.try_into().unwrap());
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if ty != RTM_NEWROUTE || body.len() < size_of::<RtMsg>() {
        return Err(bad());
    }
    let dst_len = body[1];
    let mut attrs = &body[size_of::<RtMsg>()..];
    let mut ifindex = None;
    while attrs.len() >= 4 {
        let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let aty = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if alen < 4 || alen > attrs.len() {
            break;
        }
        if aty == RTA_OIF && alen >= 8 {
            ifindex = Some(u32::from_ne_bytes(attrs[4..8].try_into().unwrap()));
        }
        let step = (alen + 3) & !3;
        attrs = &attrs[step.min(attrs.len())..];
    }
    Ok(RouteInfo { ifindex: ifindex.ok_or_else(bad)?, dst_len })
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
            let mut all = neighbours(libc::AF_INET as u8)?;
            all.extend(neighbours(libc::AF_INET6 as u8)?);
            self.neigh = Some(all);
        }
        let Some(mac) = neighbour_mac(self.neigh.as_deref().expect("loaded"), addr, bridge) else { return Ok(None) };
        if self.fdb.is_none() {
            self.fdb = Some(neighbours(libc::AF_BRIDGE as u8)?);
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

const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const RT_TABLE_MAIN: u8 = 254;

/// Sends a dump request (`ty` with an `rtgenmsg`-sized family header padded to `hdr_len`) and
/// returns the bodies of the `want` messages of the reply.
fn dump(ty: u16, family: u8, hdr_len: usize, want: u16) -> io::Result<Vec<Vec<u8>>> {
    let total = size_of::<NlMsgHdr>() + hdr_len;
    let hdr = NlMsgHdr { len: total as u32, ty, flags: NLM_F_REQUEST | NLM_F_DUMP, seq: 2, pid: 0 };
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(as_bytes(&hdr));
    msg.push(family);
    msg.resize(total, 0);
    let fd = send(&msg)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = unsafe { libc::recv(fd.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= size_of::<NlMsgHdr>() {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < size_of::<NlMsgHdr>() || len > rest.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed netlink dump"));
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(rest[16..20].try_into().unwrap());
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                t if t == want => out.push(rest[size_of::<NlMsgHdr>()..len].to_vec()),
                _ => {}
            }
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
    }
}

/// Walks netlink attributes: (type without flags, payload).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let alen = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let aty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if alen < 4 || alen > b.len() {
            break;
        }
        out.push((aty, &b[4..alen]));
        b = &b[((alen + 3) & !3).min(b.len())..];
    }
    out
}

const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NDA_MASTER: u16 = 9;
const NUD_INCOMPLETE: u16 = 0x01;
const NUD_FAILED: u16 = 0x20;
/// struct ndmsg: family, pad (3), ifindex (i32), state (u16), flags, type: 12 bytes.
const NDMSG_LEN: usize = 12;

/// Every interface of the calling thread's network namespace with its link kind (`veth`,
/// `bridge`, ...; `None` for devices without one, such as lo).
fn link_kinds() -> io::Result<Vec<(u32, Option<String>)>> {
    // struct ifinfomsg: family, pad, type (u16), index (i32), flags, change: 16 bytes.
    let mut out = Vec::new();
    for body in dump(RTM_GETLINK, libc::AF_UNSPEC as u8, 16, RTM_NEWLINK)? {
        if body.len() < 16 {
            continue;
        }
        let index = i32::from_ne_bytes(body[4..8].try_into().unwrap()) as u32;
        let kind = attrs(&body[16..])
            .into_iter()
            .filter(|(t, _)| *t == IFLA_LINKINFO)
            .flat_map(|(_, v)| attrs(v))
            .find(|(t, _)| *t == IFLA_INFO_KIND)
            .map(|(_, k)| String::from_utf8_lossy(k.split(|b| *b == 0).next().unwrap_or_default()).into_owned());
        out.push((index, kind));
    }
    Ok(out)
}

/// A neighbour entry: (ifindex, state, attributes).
type Neighbour = (u32, u16, Vec<(u16, Vec<u8>)>);

/// The neighbour entries of `family` (AF_INET, AF_INET6, or AF_BRIDGE for bridge forwarding
/// databases).
fn neighbours(family: u8) -> io::Result<Vec<Neighbour>> {
    let mut out = Vec::new();
    for body in dump(RTM_GETNEIGH, family, NDMSG_LEN, RTM_NEWNEIGH)? {
        if body.len() < NDMSG_LEN {
            continue;
        }
        let ifindex = i32::from_ne_bytes(body[4..8].try_into().unwrap()) as u32;
        let state = u16::from_ne_bytes([body[8], body[9]]);
        out.push((ifindex, state, attrs(&body[NDMSG_LEN..]).into_iter().map(|(t, v)| (t, v.to_vec())).collect()));
    }
    Ok(out)
}

/// The MAC address the node resolved `addr` to on interface `ifindex`.
fn neighbour_mac(table: &[Neighbour], addr: IpAddr, ifindex: u32) -> Option<Vec<u8>> {
    let want = match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    table.iter().find_map(|(i, state, a)| {
        if *i != ifindex || state & (NUD_INCOMPLETE | NUD_FAILED) != 0 {
            return None;
        }
        let dst = a.iter().find(|(t, _)| *t == NDA_DST).map(|(_, v)| v)?;
        let mac = a.iter().find(|(t, _)| *t == NDA_LLADDR).map(|(_, v)| v)?;
        (*dst == want).then(|| mac.clone())
    })
}

/// The port of `bridge` behind which the forwarding database has seen `mac`.
fn fdb_port(fdb: &[Neighbour], bridge: u32, mac: &[u8]) -> Option<u32> {
    fdb.iter().find_map(|(port, _, a)| {
        let master =
            a.iter().find(|(t, _)| *t == NDA_MASTER).and_then(|(_, v)| v.get(..4)).map(|v| u32::from_ne_bytes(v.try_into().unwrap()));
        let lladdr = a.iter().find(|(t, _)| *t == NDA_LLADDR).map(|(_, v)| v.as_slice());
        (*port != bridge && master == Some(bridge) && lladdr == Some(mac)).then_some(*port)
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
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for body in dump(RTM_GETROUTE, family, size_of::<RtMsg>(), RTM_NEWROUTE)? {
            if body.len() < size_of::<RtMsg>() {
                continue;
            }
            let (dst_len, table) = (body[1], body[4]);
            let full = if family == libc::AF_INET as u8 { 32 } else { 128 };
            if dst_len != full || table != RT_TABLE_MAIN {
                continue;
            }
            let (mut dst, mut oif) = (None, None);
            for (t, v) in attrs(&body[size_of::<RtMsg>()..]) {
                match t {
                    RTA_DST if v.len() == 4 => dst = Some(IpAddr::from(<[u8; 4]>::try_from(v).unwrap())),
                    RTA_DST if v.len() == 16 => dst = Some(IpAddr::from(<[u8; 16]>::try_from(v).unwrap())),
                    RTA_OIF if v.len() >= 4 => oif = Some(u32::from_ne_bytes(v[..4].try_into().unwrap())),
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

/// Every address configured in the calling thread's network namespace.
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = ifap;
    while !cur.is_null() {
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            let fam = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if fam == libc::AF_INET {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            } else if fam == libc::AF_INET6 {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    unsafe { libc::freeifaddrs(ifap) };
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
        neighbours(libc::AF_INET as u8).unwrap();
        neighbours(libc::AF_BRIDGE as u8).unwrap();
        assert!(link_kinds().unwrap().iter().any(|(i, k)| *i == 1 && k.is_none()), "lo has no link kind");
    }

    #[test]
    fn local_addresses_include_loopback() {
        assert!(local_addresses().unwrap().contains(&"127.0.0.1".parse().unwrap()));
    }
}

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
    let rtm = RtMsg {
        family,
        dst_len: (bytes.len() * 8) as u8,
        flags: RTM_F_FIB_MATCH,
        ..Default::default()
    };
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(as_bytes(&hdr));
    msg.extend_from_slice(as_bytes(&rtm));
    msg.extend_from_slice(&(rta_len as u16).to_ne_bytes());
    msg.extend_from_slice(&RTA_DST.to_ne_bytes());
    msg.extend_from_slice(&bytes);

    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    struct Fd(i32);
    impl Drop for Fd {
        fn drop(&mut self) {
            unsafe { libc::close(self.0) };
        }
    }
    let fd = Fd(fd);
    let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
    unsafe {
        libc::setsockopt(fd.0, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, size_of::<libc::timeval>() as u32);
    }
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    let n = unsafe {
        libc::sendto(fd.0, msg.as_ptr() as *const libc::c_void, msg.len(), 0, &sa as *const _ as *const libc::sockaddr, size_of::<libc::sockaddr_nl>() as u32)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
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

/// The host-side interface of a pod address: the device of a host route to it.
pub fn pod_interface(addr: IpAddr) -> io::Result<(u32, String)> {
    let r = route_get(addr)?;
    let full = if addr.is_ipv4() { 32 } else { 128 };
    if r.dst_len != full {
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
    fn local_addresses_include_loopback() {
        assert!(local_addresses().unwrap().contains(&"127.0.0.1".parse().unwrap()));
    }
}

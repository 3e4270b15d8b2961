//! One NETLINK_ROUTE request and its replies: netlink-packet-route messages over a blocking
//! netlink-sys socket (no async runtime in the daemon loop). A socket per request, with a 2 s
//! receive timeout so that a kernel that never answers cannot stall the loop. Shared by the tc
//! attachment here and by the daemon's interface look-ups.
use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_core::{NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// A dump (`NLM_F_DUMP`): every message of the reply until NLMSG_DONE.
pub fn dump(msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
    request(msg, NLM_F_DUMP)
}

/// A request acknowledged by the kernel (`NLM_F_ACK` plus `flags`): the messages it answered
/// with before the acknowledgement (an RTM_GETROUTE's route, none for most changes).
pub fn ack(msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
    request(msg, NLM_F_ACK | flags)
}

fn request(msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
    let sock = open()?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = 1;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0)?;

    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = sock.recv(&mut &mut buf[..], 0)?;
        let mut rest = &buf[..n.min(buf.len())];
        while !rest.is_empty() {
            let len = NetlinkBuffer::new_checked(rest).map(|b| b.length() as usize).map_err(|e| bad(format!("{e}")))?;
            let one = &rest[..len];
            rest = &rest[((len + 3) & !3).min(rest.len())..];
            let parsed = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(one) {
                Ok(m) => m,
                Err(e) => {
                    // A message this crate cannot read (an attribute of a newer kernel) is one
                    // object less in a dump, not a failed look-up of every other one.
                    tracing::warn!("skipping a netlink message of type {}: {e}", NetlinkBuffer::new(one).message_type());
                    continue;
                }
            };
            match parsed.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => return if e.code.is_some() { Err(e.to_io()) } else { Ok(out) },
                NetlinkPayload::InnerMessage(m) => out.push(m),
                _ => {}
            }
        }
    }
}

fn open() -> io::Result<Socket> {
    let sock = Socket::new(NETLINK_ROUTE)?;
    let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
    // SAFETY: a valid socket and a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    sock.connect(&SocketAddr::new(0, 0))?;
    Ok(sock)
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed netlink reply: {what}"))
}

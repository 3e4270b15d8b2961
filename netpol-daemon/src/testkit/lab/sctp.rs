//! SCTP without the kernel's SCTP module (this machine has none): the first two packets of an
//! association, crafted on raw IP sockets. A client sends an INIT (RFC 9260 3.3.2) from its
//! pod's namespace; a responder in the server's namespace answers an INIT to one of its ports
//! with an INIT-ACK carrying a state cookie. The probe succeeds when the INIT-ACK comes back:
//! the INIT passed the client's egress and the server's ingress, and the answer the way back.
//! A raw socket of protocol 132 also keeps the kernel from answering "protocol unreachable".
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::probe::Reach;
use super::{in_netns, Lab};

const PROTO_SCTP: i32 = 132;
const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;
const CHUNK_ABORT: u8 = 6;

/// Source ports of the probes: a new one each (a new flow for the conntrack, as a new
/// association of a real client would be).
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);
static NEXT_TAG: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Answers SCTP INITs to `ports` in a pod's (or outside host's) namespace until the lab
    /// goes.
    pub fn serve_sctp(&mut self, pod: &str, ports: &[u16]) -> Result<()> {
        let netns = self.pod(pod).netns.clone();
        let sock = in_netns(&netns, raw_socket)??;
        set_timeout(&sock, Duration::from_millis(100))?;
        let (stop, ports) = (self.stop.clone(), ports.to_vec());
        self.servers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let Some((from, n)) = recv(&sock, &mut buf) else { continue };
                let Some(pkt) = Sctp::parse(&buf[..n]) else { continue };
                if pkt.chunk == CHUNK_INIT && ports.contains(&pkt.dport) {
                    let answer = init_ack(pkt.dport, pkt.sport, pkt.initiate_tag);
                    let _ = send(&sock, from, &answer);
                }
            }
        }));
        Ok(())
    }

    /// Sends an SCTP INIT from `from` to `dst:port` and waits up to `timeout` for the answer:
    /// an INIT-ACK ([`Reach::Connected`]), an ABORT ([`Reach::Refused`]) or nothing.
    pub fn sctp_reach(&self, from: &str, dst: Ipv4Addr, port: u16, timeout: Duration) -> Reach {
        let netns = self.pod(from).netns.clone();
        let sport = 20000 + NEXT_PORT.fetch_add(1, Ordering::Relaxed) % 40000;
        let tag = 0x4e50_0000 | NEXT_TAG.fetch_add(1, Ordering::Relaxed) & 0xffff;
        let run = move || -> Result<Reach> {
            let sock = raw_socket()?;
            set_timeout(&sock, Duration::from_millis(50))?;
            send(&sock, dst, &init(sport, port, tag))?;
            Ok(wait_answer(&sock, dst, port, sport, tag, timeout))
        };
        match in_netns(&netns, run) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) | Err(e) => Reach::Failed(format!("{e:#}")),
        }
    }
}

/// The first answer of `dst:port` to our INIT (its verification tag is our initiate tag).
fn wait_answer(sock: &OwnedFd, dst: Ipv4Addr, port: u16, sport: u16, tag: u32, timeout: Duration) -> Reach {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let Some((src, n)) = recv(sock, &mut buf) else { continue };
        match Sctp::parse(&buf[..n]) {
            Some(p) if src == dst && p.sport == port && p.dport == sport && p.vtag == tag => match p.chunk {
                CHUNK_INIT_ACK => return Reach::Connected,
                CHUNK_ABORT => return Reach::Refused,
                _ => {}
            },
            _ => {}
        }
    }
    Reach::Timeout
}

fn raw_socket() -> Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, PROTO_SCTP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("raw SCTP socket (needs CAP_NET_RAW)");
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_timeout(sock: &OwnedFd, t: Duration) -> Result<()> {
    let tv = libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: t.subsec_micros() as libc::suseconds_t };
    // SAFETY: a timeval of the size passed, for the socket we own.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO");
    }
    Ok(())
}

/// Sends an SCTP packet (the kernel writes the IPv4 header).
fn send(sock: &OwnedFd, dst: Ipv4Addr, pkt: &[u8]) -> Result<()> {
    let sa = sockaddr(SocketAddrV4::new(dst, 0));
    // SAFETY: pkt and sa outlive the call; the lengths are theirs.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            pkt.as_ptr() as *const libc::c_void,
            pkt.len(),
            0,
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("sending SCTP to {dst}"));
    }
    Ok(())
}

/// One packet (IPv4 header included, as raw IPv4 sockets read them): its source and its SCTP
/// bytes' length in `buf`, moved to its start. None on timeout.
fn recv(sock: &OwnedFd, buf: &mut [u8]) -> Option<(Ipv4Addr, usize)> {
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 20 {
        return None;
    }
    let n = n as usize;
    let ihl = (buf[0] & 0x0f) as usize * 4;
    let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
    if n <= ihl {
        return None;
    }
    buf.copy_within(ihl..n, 0);
    Some((src, n - ihl))
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// What a probe reads of an SCTP packet: the common header and the first chunk.
struct Sctp {
    sport: u16,
    dport: u16,
    vtag: u32,
    chunk: u8,
    /// The INIT's initiate tag (the verification tag of the answer).
    initiate_tag: u32,
}

impl Sctp {
    fn parse(b: &[u8]) -> Option<Sctp> {
        if b.len() < 16 {
            return None;
        }
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let initiate_tag = if b.len() >= 20 { u32_at(16) } else { 0 };
        Some(Sctp { sport: u16_at(0), dport: u16_at(2), vtag: u32_at(4), chunk: b[12], initiate_tag })
    }
}

/// An INIT: verification tag 0, our initiate tag, one stream each way.
fn init(sport: u16, dport: u16, tag: u32) -> Vec<u8> {
    packet(sport, dport, 0, CHUNK_INIT, tag, &[])
}

/// An INIT-ACK to the INIT of `tag`, with a state cookie (mandatory).
fn init_ack(sport: u16, dport: u16, tag: u32) -> Vec<u8> {
    let cookie = [0x00, 0x07, 0x00, 0x0c, b'n', b'e', b't', b'p', b'o', b'l', b'l', b'b'];
    packet(sport, dport, tag, CHUNK_INIT_ACK, 0x4c41_4221, &cookie)
}

/// Common header, then an INIT or INIT-ACK chunk (initiate tag, a_rwnd, outbound and inbound
/// streams, initial TSN) with `params`, then the CRC32c checksum.
fn packet(sport: u16, dport: u16, vtag: u32, chunk: u8, initiate_tag: u32, params: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(32 + params.len());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&[chunk, 0]);
    p.extend_from_slice(&((20 + params.len()) as u16).to_be_bytes());
    p.extend_from_slice(&initiate_tag.to_be_bytes());
    p.extend_from_slice(&65535u32.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0, 1]);
    p.extend_from_slice(&1u32.to_be_bytes());
    p.extend_from_slice(params);
    let sum = crc32c(&p);
    // The checksum goes in as the kernel puts it: the CRC's bytes least significant first.
    p[8..12].copy_from_slice(&sum.to_le_bytes());
    p
}

/// CRC32c (Castagnoli), as SCTP checksums packets (RFC 9260 appendix A).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnolis() {
        // RFC 3720 B.4: 32 bytes of zeros, and the ASCII digits.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn an_init_ack_answers_the_init_it_parses() {
        let i = init(40001, 9003, 0x1234_5678);
        let p = Sctp::parse(&i).unwrap();
        assert_eq!((p.sport, p.dport, p.vtag, p.chunk, p.initiate_tag), (40001, 9003, 0, CHUNK_INIT, 0x1234_5678));
        let a = Sctp::parse(&init_ack(9003, 40001, p.initiate_tag)).unwrap();
        assert_eq!((a.sport, a.dport, a.vtag, a.chunk), (9003, 40001, 0x1234_5678, CHUNK_INIT_ACK));
        // The checksum covers the packet with its checksum field zero.
        let mut z = i.clone();
        z[8..12].fill(0);
        assert_eq!(i[8..12], crc32c(&z).to_le_bytes());
    }
}

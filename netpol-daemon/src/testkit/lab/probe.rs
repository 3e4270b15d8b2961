//! Connectivity probes from inside the lab's namespaces: a TCP line exchange, a UDP
//! request/answer (as a yes or no, or as [`Reach`]: how it failed), and DNS lookups (A
//! records, over UDP or TCP).
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use super::{in_netns, Lab, NODE_IP};

impl Lab {
    /// Opens a TCP connection from `from` to `to:port` and exchanges a line.
    pub fn tcp(&self, from: &str, to: &str, port: u16) -> bool {
        let src = self.source_netns(from);
        let dst = SocketAddr::new(IpAddr::V4(self.address(to)), port);
        in_netns(&src, move || probe_tcp(dst, Duration::from_millis(800))).unwrap_or(false)
    }

    /// Sends a UDP datagram from `from` to `to:port` and waits for the answer.
    pub fn udp(&self, from: &str, to: &str, port: u16) -> bool {
        let src = self.source_netns(from);
        let dst = SocketAddr::new(IpAddr::V4(self.address(to)), port);
        in_netns(&src, move || probe_udp(dst, Duration::from_millis(800))).unwrap_or(false)
    }

    /// [`Lab::tcp`] over IPv6 (both pods dual-stack).
    pub fn tcp6(&self, from: &str, to: &str, port: u16) -> bool {
        let src = self.source_netns(from);
        let dst = SocketAddr::new(IpAddr::V6(self.pod(to).ip6.expect("a dual-stack pod")), port);
        in_netns(&src, move || probe_tcp(dst, Duration::from_millis(800))).unwrap_or(false)
    }

    /// [`Lab::udp`] over IPv6.
    pub fn udp6(&self, from: &str, to: &str, port: u16) -> bool {
        let src = self.source_netns(from);
        let dst = SocketAddr::new(IpAddr::V6(self.pod(to).ip6.expect("a dual-stack pod")), port);
        in_netns(&src, move || probe_udp(dst, Duration::from_millis(800))).unwrap_or(false)
    }

    /// "node" means the node namespace itself.
    fn source_netns(&self, from: &str) -> String {
        if from == "node" {
            self.node_netns.clone()
        } else {
            self.pod(from).netns.clone()
        }
    }

    pub fn address(&self, who: &str) -> Ipv4Addr {
        if who == "node" {
            NODE_IP
        } else {
            self.pod(who).ip
        }
    }
}

/// How a connection attempt ended: answered, refused (a TCP reset, an ICMP port unreachable,
/// an SCTP ABORT), or nothing came back in time (what a policy's drop looks like; the
/// conformance suite requires a timeout for a denied connection), or another error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    Connected,
    Refused,
    Timeout,
    Failed(String),
}

impl fmt::Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Reach::Connected => f.write_str("connected"),
            Reach::Refused => f.write_str("refused"),
            Reach::Timeout => f.write_str("timeout"),
            Reach::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

impl Lab {
    /// A TCP or UDP exchange from `from` (a pod, an outside host or "node") to `dst:port`.
    pub fn reach(&self, from: &str, udp: bool, dst: Ipv4Addr, port: u16, timeout: Duration) -> Reach {
        let src = self.source_netns(from);
        let dst = SocketAddr::new(IpAddr::V4(dst), port);
        let run = move || if udp { reach_udp(dst, timeout) } else { reach_tcp(dst, timeout) };
        in_netns(&src, run).unwrap_or_else(|e| Reach::Failed(format!("{e:#}")))
    }
}

/// Connects and exchanges a line (the answer must come within `timeout` too).
pub fn reach_tcp(dst: SocketAddr, timeout: Duration) -> Reach {
    let mut s = match TcpStream::connect_timeout(&dst, timeout) {
        Ok(s) => s,
        Err(e) => return io_reach(e),
    };
    let _ = s.set_read_timeout(Some(timeout));
    if let Err(e) = s.write_all(b"ping\n") {
        return io_reach(e);
    }
    let mut buf = [0u8; 128];
    match s.read(&mut buf) {
        Ok(n) if n > 0 => Reach::Connected,
        Ok(_) => Reach::Failed("closed without an answer".into()),
        Err(e) => io_reach(e),
    }
}

/// Sends a datagram on a connected socket (so that an ICMP error reads as refused) and waits
/// for the answer.
pub fn reach_udp(dst: SocketAddr, timeout: Duration) -> Reach {
    let any = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let s = match UdpSocket::bind(any).and_then(|s| s.connect(dst).map(|_| s)) {
        Ok(s) => s,
        Err(e) => return Reach::Failed(e.to_string()),
    };
    let _ = s.set_read_timeout(Some(timeout));
    if let Err(e) = s.send(b"ping\n") {
        return io_reach(e);
    }
    let mut buf = [0u8; 128];
    match s.recv(&mut buf) {
        Ok(n) if n > 0 => Reach::Connected,
        Ok(_) => Reach::Failed("empty answer".into()),
        Err(e) => io_reach(e),
    }
}

fn io_reach(e: std::io::Error) -> Reach {
    match e.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => Reach::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Reach::Timeout,
        _ => Reach::Failed(e.to_string()),
    }
}

pub fn probe_tcp(dst: SocketAddr, timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&dst, timeout) else { return false };
    let _ = s.set_read_timeout(Some(timeout));
    if s.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 128];
    matches!(s.read(&mut buf), Ok(n) if n > 0)
}

pub fn probe_udp(dst: SocketAddr, timeout: Duration) -> bool {
    let any = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let Ok(s) = UdpSocket::bind(any) else { return false };
    let _ = s.set_read_timeout(Some(timeout));
    if s.send_to(b"ping\n", dst).is_err() {
        return false;
    }
    let mut buf = [0u8; 128];
    matches!(s.recv_from(&mut buf), Ok((n, _)) if n > 0)
}

/// A DNS query for an A record; the answer's first IPv4 address.
fn dns_query(name: &str, id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn dns_answer(resp: &[u8], id: u16) -> Option<Ipv4Addr> {
    if resp.len() < 12 || resp[0..2] != id.to_be_bytes() || resp[3] & 0x0f != 0 || u16::from_be_bytes([resp[6], resp[7]]) == 0 {
        return None;
    }
    // The A record's data is the last 4 bytes of a one-answer response.
    let n = resp.len();
    Some(Ipv4Addr::new(resp[n - 4], resp[n - 3], resp[n - 2], resp[n - 1]))
}

/// Resolves `name` with the DNS server at `server` over UDP (or TCP).
pub fn resolve(server: SocketAddr, name: &str, tcp: bool, timeout: Duration) -> Option<Ipv4Addr> {
    let id = 0x4e50;
    let q = dns_query(name, id);
    if tcp {
        let mut s = TcpStream::connect_timeout(&server, timeout).ok()?;
        s.set_read_timeout(Some(timeout)).ok()?;
        let mut msg = (q.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(&q);
        s.write_all(&msg).ok()?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).ok()?;
        let mut resp = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut resp).ok()?;
        dns_answer(&resp, id)
    } else {
        let s = UdpSocket::bind("0.0.0.0:0").ok()?;
        s.set_read_timeout(Some(timeout)).ok()?;
        s.send_to(&q, server).ok()?;
        let mut buf = [0u8; 512];
        let (n, _) = s.recv_from(&mut buf).ok()?;
        dns_answer(&buf[..n], id)
    }
}

impl Lab {
    /// Resolves `name` from inside pod `from` through `server`.
    pub fn dns(&self, from: &str, server: SocketAddr, name: &str, tcp: bool) -> Option<Ipv4Addr> {
        let ns = self.source_netns(from);
        let name = name.to_string();
        in_netns(&ns, move || resolve(server, &name, tcp, Duration::from_millis(800))).ok().flatten()
    }
}

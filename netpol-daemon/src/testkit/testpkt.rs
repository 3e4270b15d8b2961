//! Crafted frames (Ethernet + IPv4/IPv6 + TCP/UDP/SCTP/ICMP) for BPF_PROG_TEST_RUN tests and
//! per-packet benchmarks. Checksums are left zero: the programs do not read them.
use std::net::{Ipv4Addr, Ipv6Addr};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// L4 header bytes for a protocol: TCP (20 bytes, flags), UDP (8), SCTP common header (12),
/// ICMP/ICMPv6 echo (8, `sport` is the identifier, `flags` the type).
pub fn l4(proto: u8, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::new();
    match proto {
        6 => {
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        }
        17 => {
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&[0, 8 + 4, 0, 0]);
            h.extend_from_slice(b"ping");
        }
        132 => {
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
            // INIT chunk header
            h.extend_from_slice(&[1, 0, 0, 4]);
        }
        1 | 58 => {
            h.extend_from_slice(&[flags, 0, 0, 0]);
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&[0, 1]);
        }
        _ => h.extend_from_slice(&[0; 8]),
    }
    h
}

/// An IPv4 frame. `frag_offset` is in 8-byte units (non-zero: a non-first fragment, whose
/// payload is not an L4 header).
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, sport: u16, dport: u16, flags: u8, frag_offset: u16) -> Vec<u8> {
    let payload = if frag_offset == 0 { l4(proto, sport, dport, flags) } else { vec![0xAB; 24] };
    let mut f = eth(0x0800);
    let total = (20 + payload.len()) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34]);
    f.extend_from_slice(&(frag_offset & 0x1fff).to_be_bytes());
    f.extend_from_slice(&[64, proto, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&payload);
    f
}

pub fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    ipv4(src, dst, 6, sport, dport, flags, 0)
}

pub fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    ipv4(src, dst, 17, sport, dport, 0, 0)
}

/// An IPv6 frame; `ext` lists extension headers to put first (0 hop-by-hop, 60 destination
/// options, 43 routing, 44 fragment with offset 0).
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, sport: u16, dport: u16, flags: u8, ext: &[u8]) -> Vec<u8> {
    let payload = l4(proto, sport, dport, flags);
    let mut exts = Vec::new();
    for (i, e) in ext.iter().enumerate() {
        let next = ext.get(i + 1).copied().unwrap_or(proto);
        match e {
            44 => exts.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 1]),
            _ => exts.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
        }
    }
    let mut f = eth(0x86DD);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((exts.len() + payload.len()) as u16).to_be_bytes());
    f.push(ext.first().copied().unwrap_or(proto));
    f.push(64);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&exts);
    f.extend_from_slice(&payload);
    f
}

/// An ARP request (not IP: never subject to policy).
pub fn arp() -> Vec<u8> {
    let mut f = eth(0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0; 20]);
    f
}

/// An IPv4 fragment: `offset` in 8-byte units, `more` the MF flag, `id` the identification.
/// The first fragment (offset 0) carries the L4 header.
#[allow(clippy::too_many_arguments)]
pub fn ipv4_frag(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, sport: u16, dport: u16, id: u16, offset: u16, more: bool) -> Vec<u8> {
    let mut f = ipv4(src, dst, proto, sport, dport, 0, offset);
    f[18..20].copy_from_slice(&id.to_be_bytes());
    let frag = (offset & 0x1fff) | if more { 0x2000 } else { 0 };
    f[20..22].copy_from_slice(&frag.to_be_bytes());
    f
}

/// An ICMPv4 error (`icmp_type` 3 unreachable, 11 time exceeded) from `src` to `dst` quoting
/// the IP header and first 8 L4 bytes of `original` (a frame from [`ipv4`]).
pub fn icmp4_error(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8, code: u8, original: &[u8]) -> Vec<u8> {
    let quoted = &original[14..(14 + 20 + 8).min(original.len())];
    let mut f = eth(0x0800);
    let total = (20 + 8 + quoted.len()) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0, 0, 64, 1, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&[icmp_type, code, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(quoted);
    f
}

/// `frame` (a TCP frame from [`ipv4`] or [`ipv6`] without extension headers) with its
/// sequence and acknowledgement numbers set.
pub fn with_seq(mut frame: Vec<u8>, seq: u32, ack: u32) -> Vec<u8> {
    let l4 = if frame[12..14] == [0x08, 0x00] { 14 + ((frame[14] & 0x0f) as usize) * 4 } else { 14 + 40 };
    frame[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
    frame[l4 + 8..l4 + 12].copy_from_slice(&ack.to_be_bytes());
    frame
}

/// An ICMPv6 error (`icmp_type` 1 unreachable, 2 packet too big, 3 time exceeded) from `src`
/// to `dst` quoting the IPv6 header and first 8 L4 bytes of `original` (a frame from [`ipv6`]
/// without extension headers).
pub fn icmp6_error(src: Ipv6Addr, dst: Ipv6Addr, icmp_type: u8, code: u8, original: &[u8]) -> Vec<u8> {
    let quoted = &original[14..(14 + 40 + 8).min(original.len())];
    let mut f = eth(0x86DD);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((8 + quoted.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[58, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&[icmp_type, code, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(quoted);
    f
}

/// `frame` with 802.1Q/802.1ad tags inserted after the MAC addresses, outermost first: each
/// `(tpid, vid)`, e.g. `(0x88a8, 0), (0x8100, 0)` for a double tag with VLAN id 0.
pub fn vlan_tagged(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&frame[12..]);
    f
}

/// A frame of another ethertype (LLDP is 0x88cc) with `len` payload bytes.
pub fn ethertype_frame(ethertype: u16, len: usize) -> Vec<u8> {
    let mut f = eth(ethertype);
    f.extend(std::iter::repeat_n(0x5a, len));
    f
}

/// An ICMPv6 neighbour discovery message (133 RS, 134 RA, 135 NS, 136 NA, 137 redirect) with
/// its fixed part zeroed, `options` after it and `trailer` bytes after the IPv6 payload (not
/// counted in its payload length), with hop limit `hop_limit` and code `code`.
pub fn nd6(src: Ipv6Addr, dst: Ipv6Addr, icmp_type: u8, code: u8, hop_limit: u8, options: &[u8], trailer: &[u8]) -> Vec<u8> {
    let fixed = match icmp_type {
        133 => 8,
        134 => 16,
        135 | 136 => 24,
        _ => 40,
    };
    let mut msg = vec![0u8; fixed];
    msg[0] = icmp_type;
    msg[1] = code;
    msg.extend_from_slice(options);
    let mut f = eth(0x86DD);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    f.push(58);
    f.push(hop_limit);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&msg);
    f.extend_from_slice(trailer);
    f
}

/// A source (1) or target (2) link-layer address option for an Ethernet MAC.
pub fn nd_lladdr_option(kind: u8) -> Vec<u8> {
    vec![kind, 1, 0x02, 0, 0, 0, 0, 0x01]
}

/// An IPv6 fragment: a fragment header (identification `id`, `offset` in 8-byte units, `more`)
/// whose next header is `next`; the first fragment (offset 0) carries the L4 header of
/// `proto` (`next` should then be `proto`), a later one 24 payload bytes.
#[allow(clippy::too_many_arguments)]
pub fn ipv6_frag(src: Ipv6Addr, dst: Ipv6Addr, next: u8, proto: u8, sport: u16, dport: u16, id: u32, offset: u16, more: bool) -> Vec<u8> {
    let payload = if offset == 0 { l4(proto, sport, dport, 0) } else { vec![0x3c; 24] };
    let mut f = eth(0x86DD);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.push(44);
    f.push(64);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.push(next);
    f.push(0);
    f.extend_from_slice(&((offset << 3) | more as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&payload);
    f
}

//! Packet parsing: Ethernet, IPv4, IPv6 (extension headers walked with a fixed bound), and the
//! first bytes of TCP/UDP/SCTP/ICMP. All reads go through `bpf_skb_load_bytes`, so no direct
//! packet pointer arithmetic has to be proven safe to the verifier.
use aya_ebpf::programs::TcContext;
use netpol_common::{FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
/// Extension headers walked; a packet with more is unparseable (denied where the direction is
/// isolated, never judged as a portless packet). The walk reads one more header than this to
/// see the upper-layer header behind the last extension header.
pub const MAX_V6_EXT_HEADERS: usize = 8;
/// Options walked in a neighbour discovery message (more: not treated as ND).
const MAX_ND_OPTIONS: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub struct Packet {
    pub family: u8,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// The L4 ports are known (TCP/UDP/SCTP first fragment, or ICMP echo identifier).
    pub has_ports: bool,
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgement numbers (host order; 0 otherwise): conntrack honours
    /// an RST only within the receiver's window.
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    /// ICMP/ICMPv6 type (0 otherwise).
    pub icmp_type: u8,
    /// Part of a fragmented datagram (then `frag_id` is the IPv4 identification or the IPv6
    /// fragment header id). Plain fields, not `Option`s: the verifier rejects copies of the
    /// uninitialized payload of a `None`.
    pub fragment: bool,
    pub frag_id: u32,
    /// A non-first fragment (no L4 header: ports unknown).
    pub later_fragment: bool,
    /// A first fragment with more to come.
    pub more_fragments: bool,
    /// For ICMP errors: the packet the error is about (its tuple as originally sent).
    pub has_related: bool,
    pub related: Inner,
}

impl Packet {
    /// Every field set (the verifier rejects reads of uninitialized stack).
    #[inline(always)]
    fn new(family: u8, proto: u8) -> Packet {
        Packet {
            family,
            proto,
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
            has_ports: false,
            tcp_flags: 0,
            tcp_seq: 0,
            tcp_ack: 0,
            icmp_type: 0,
            fragment: false,
            frag_id: 0,
            later_fragment: false,
            more_fragments: false,
            has_related: false,
            related: Inner { proto: 0, src: [0; 16], dst: [0; 16], sport: 0, dport: 0 },
        }
    }
}

/// The header embedded in an ICMP error.
/// (C layout, 4-aligned, ports first: the addresses sit at 4-aligned offsets, so conntrack
/// compares them as words.)
#[derive(Clone, Copy)]
#[repr(C, align(4))]
pub struct Inner {
    pub sport: u16,
    pub dport: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub proto: u8,
}

pub enum Parsed {
    /// ARP: the link needs it whatever the policy (never denied).
    Arp,
    /// Any other frame that is not plain IPv4/IPv6/ARP: another ethertype (LLDP, 802.3 length
    /// frames, ...) or a VLAN-tagged frame (802.1Q/802.1ad in the frame, or a tag the kernel
    /// already moved into `skb->vlan_tci`). The policy cannot judge what the kernel may later
    /// make of it (a double-tagged VID 0 frame is untagged and its inner IP packet routed), so
    /// it is denied where the direction is isolated and passes elsewhere.
    Other,
    Ip(Packet),
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    ctx.load::<T>(off).map_err(|_| ())
}

/// Reads a `T` at `off` by direct packet access when the bytes are in the linear part.
#[inline(always)]
fn direct<T: Copy>(data: usize, data_end: usize, off: usize) -> Option<T> {
    let start = data + off;
    if start + core::mem::size_of::<T>() > data_end {
        return None;
    }
    Some(unsafe { core::ptr::read_unaligned(start as *const T) })
}

/// IPv4 without options-in-the-way surprises, headers in the linear part: the common case,
/// read with direct packet access (no helper calls). `None`: use the general parser.
#[inline(always)]
fn parse_v4_fast(ctx: &TcContext) -> Option<Packet> {
    let data = ctx.data();
    let data_end = ctx.data_end();
    let eth: [u8; 34] = direct(data, data_end, 0)?;
    if eth[12] != 0x08 || eth[13] != 0x00 {
        return None;
    }
    let ihl = ((eth[ETH_HLEN] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let mut p = Packet::new(FAMILY_V4, eth[ETH_HLEN + 9]);
    p.src[..4].copy_from_slice(&eth[ETH_HLEN + 12..ETH_HLEN + 16]);
    p.dst[..4].copy_from_slice(&eth[ETH_HLEN + 16..ETH_HLEN + 20]);
    let frag = u16::from_be_bytes([eth[ETH_HLEN + 6], eth[ETH_HLEN + 7]]);
    if frag & 0x3fff != 0 {
        // Fragments (rare): the general parser records what fragment tracking needs.
        return None;
    }
    let l4 = ETH_HLEN + (ihl & 0x3c);
    match p.proto {
        PROTO_TCP => {
            let h: [u8; 14] = direct(data, data_end, l4)?;
            p.sport = u16::from_be_bytes([h[0], h[1]]);
            p.dport = u16::from_be_bytes([h[2], h[3]]);
            p.tcp_flags = h[13];
            p.tcp_seq = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            p.tcp_ack = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            p.has_ports = true;
        }
        PROTO_UDP | PROTO_SCTP => {
            let h: [u8; 4] = direct(data, data_end, l4)?;
            p.sport = u16::from_be_bytes([h[0], h[1]]);
            p.dport = u16::from_be_bytes([h[2], h[3]]);
            p.has_ports = true;
        }
        // ICMP and the rest: the general parser.
        _ => return None,
    }
    Some(p)
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Parsed, ()> {
    // A tag the kernel took out of the frame before TC (`__netif_receive_skb_core` untags the
    // outer 802.1Q/802.1ad header into the skb at ingress): the bytes below are the inner frame.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Ok(Parsed::Other);
    }
    if let Some(p) = parse_v4_fast(ctx) {
        return Ok(Parsed::Ip(p));
    }
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    let mut p = Packet::new(0, 0);
    let l4_off;
    let first_fragment;
    match ethertype {
        ETH_P_IP => {
            let vihl = load::<u8>(ctx, ETH_HLEN)?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Err(());
            }
            let frag = u16::from_be(load::<u16>(ctx, ETH_HLEN + 6)?);
            first_fragment = frag & 0x1fff == 0;
            if frag & 0x3fff != 0 {
                p.fragment = true;
                p.frag_id = u16::from_be(load::<u16>(ctx, ETH_HLEN + 4)?) as u32;
                p.later_fragment = !first_fragment;
                p.more_fragments = frag & 0x2000 != 0;
            }
            p.family = FAMILY_V4;
            p.proto = load::<u8>(ctx, ETH_HLEN + 9)?;
            let s = load::<[u8; 4]>(ctx, ETH_HLEN + 12)?;
            let d = load::<[u8; 4]>(ctx, ETH_HLEN + 16)?;
            p.src[..4].copy_from_slice(&s);
            p.dst[..4].copy_from_slice(&d);
            l4_off = ETH_HLEN + ihl;
        }
        ETH_P_IPV6 => {
            p.family = FAMILY_V6;
            p.src = load::<[u8; 16]>(ctx, ETH_HLEN + 8)?;
            p.dst = load::<[u8; 16]>(ctx, ETH_HLEN + 24)?;
            let mut next = load::<u8>(ctx, ETH_HLEN + 6)?;
            let mut off = ETH_HLEN + 40;
            let mut first = true;
            let mut done = false;
            // MAX_V6_EXT_HEADERS extension headers and then the upper-layer header.
            for _ in 0..MAX_V6_EXT_HEADERS + 1 {
                match next {
                    // hop-by-hop, routing, destination options
                    0 | 43 | 60 => {
                        let hdr = load::<[u8; 2]>(ctx, off)?;
                        next = hdr[0];
                        off += (hdr[1] as usize + 1) * 8;
                    }
                    // fragment header
                    44 => {
                        let hdr = load::<[u8; 8]>(ctx, off)?;
                        next = hdr[0];
                        let fo = u16::from_be_bytes([hdr[2], hdr[3]]);
                        if fo >> 3 != 0 {
                            first = false;
                        }
                        p.fragment = true;
                        p.frag_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                        p.later_fragment = fo >> 3 != 0;
                        p.more_fragments = fo & 1 != 0;
                        off += 8;
                        if p.later_fragment {
                            // What follows is payload of the middle of the datagram, not
                            // headers: `next` is the first header of the fragmentable part.
                            done = true;
                            break;
                        }
                    }
                    // authentication header
                    51 => {
                        let hdr = load::<[u8; 2]>(ctx, off)?;
                        next = hdr[0];
                        off += (hdr[1] as usize + 2) * 4;
                    }
                    _ => {
                        done = true;
                        break;
                    }
                }
            }
            if !done {
                // More extension headers than the walk reads: no trustworthy L4 header.
                return Err(());
            }
            p.proto = next;
            first_fragment = first;
            l4_off = off;
        }
        ETH_P_ARP => return Ok(Parsed::Arp),
        _ => return Ok(Parsed::Other),
    }
    if first_fragment {
        match p.proto {
            PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
                p.sport = u16::from_be(load::<u16>(ctx, l4_off)?);
                p.dport = u16::from_be(load::<u16>(ctx, l4_off + 2)?);
                if p.proto == PROTO_TCP {
                    p.tcp_flags = load::<u8>(ctx, l4_off + 13)?;
                    p.tcp_seq = u32::from_be(load::<u32>(ctx, l4_off + 4)?);
                    p.tcp_ack = u32::from_be(load::<u32>(ctx, l4_off + 8)?);
                }
                p.has_ports = true;
            }
            PROTO_ICMP | PROTO_ICMPV6 => {
                p.icmp_type = load::<u8>(ctx, l4_off)?;
                let echo = matches!((p.proto, p.icmp_type), (PROTO_ICMP, 0) | (PROTO_ICMP, 8) | (PROTO_ICMPV6, 128) | (PROTO_ICMPV6, 129));
                if echo {
                    // Echo request and reply share the identifier: use it as both "ports" so
                    // that a reply is the reverse tuple of its request.
                    let id = u16::from_be(load::<u16>(ctx, l4_off + 4)?);
                    p.sport = id;
                    p.dport = id;
                    p.has_ports = true;
                }
                let error = matches!((p.proto, p.icmp_type), (PROTO_ICMP, 3) | (PROTO_ICMP, 11) | (PROTO_ICMP, 12) | (PROTO_ICMPV6, 1..=4));
                if error {
                    if let Ok(i) = inner(ctx, p.proto, l4_off + 8) {
                        p.related = i;
                        p.has_related = true;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Parsed::Ip(p))
}

/// The IP header (and first 4 bytes of L4) an ICMP error carries.
#[inline(always)]
fn inner(ctx: &TcContext, icmp: u8, off: usize) -> Result<Inner, ()> {
    let mut i = Inner { proto: 0, src: [0; 16], dst: [0; 16], sport: 0, dport: 0 };
    let l4 = if icmp == PROTO_ICMP {
        let vihl = load::<u8>(ctx, off)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Err(());
        }
        i.proto = load::<u8>(ctx, off + 9)?;
        i.src[..4].copy_from_slice(&load::<[u8; 4]>(ctx, off + 12)?);
        i.dst[..4].copy_from_slice(&load::<[u8; 4]>(ctx, off + 16)?);
        off + ihl
    } else {
        i.proto = load::<u8>(ctx, off + 6)?;
        i.src = load::<[u8; 16]>(ctx, off + 8)?;
        i.dst = load::<[u8; 16]>(ctx, off + 24)?;
        off + 40
    };
    match i.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            i.sport = u16::from_be(load::<u16>(ctx, l4)?);
            i.dport = u16::from_be(load::<u16>(ctx, l4 + 2)?);
            Ok(i)
        }
        _ => Err(()),
    }
}

/// RFC 4861 neighbour discovery as the link uses it, which passes unchecked: RS (133), RA
/// (134), NS (135), NA (136), redirect (137), and only when all of this holds:
/// - the ICMPv6 header follows the IPv6 header directly (no extension headers, no fragment),
///   with code 0 and hop limit 255: a packet that crossed a router arrives with less, and
///   receivers discard ND messages without 255 (RFC 4861 6.1/7.1/8.1);
/// - the IPv6 payload length is exactly what the frame carries (nothing trails the message)
///   and within the message's fixed part plus a few options: RS <= 24 bytes, RA <= 80,
///   NS/NA <= 40, redirect <= 48 (a target link-layer option, no redirected header: a
///   redirect quoting a packet goes through policy); the options, walked, are well-formed
///   (no zero length) and end exactly where the message ends;
/// - the source is not multicast, and the unspecified address only in NS (duplicate address
///   detection) and RS;
/// - leaving the pod (`egress`), the destination is on the link: link-local (fe80::/10),
///   link-scope multicast (ff02::/16) or one of the node's own addresses, so the message ends
///   at the node and is never routed on. The source may be global: Linux solicits with the
///   source of the packet that triggered resolution, and answers to it (a pod resolving a
///   global gateway address, as ptp installs, does so from its own global address).
///   Entering the pod, hop limit 255 already shows the sender is on the link (the node, or a
///   neighbour on a bridge): any destination.
/// Anything else of these types is judged by policy like any other ICMPv6.
#[inline(always)]
pub fn neighbour_discovery(ctx: &TcContext, p: &Packet, egress: bool) -> bool {
    nd_checks(ctx, p, egress).unwrap_or(false)
}

#[inline(always)]
fn nd_checks(ctx: &TcContext, p: &Packet, egress: bool) -> Result<bool, ()> {
    if p.family != FAMILY_V6 || p.proto != PROTO_ICMPV6 || p.fragment {
        return Ok(false);
    }
    let (fixed, max) = match p.icmp_type {
        133 => (8usize, 24usize),
        134 => (16, 80),
        135 | 136 => (24, 40),
        137 => (40, 48),
        _ => return Ok(false),
    };
    let ip6: [u8; 8] = load(ctx, ETH_HLEN)?;
    let payload = u16::from_be_bytes([ip6[4], ip6[5]]) as usize;
    if ip6[6] != PROTO_ICMPV6 || ip6[7] != 255 {
        return Ok(false);
    }
    let end = ETH_HLEN + 40 + payload;
    if payload < fixed || payload > max || end != ctx.len() as usize {
        return Ok(false);
    }
    if load::<u8>(ctx, ETH_HLEN + 41)? != 0 {
        return Ok(false);
    }
    if p.src[0] == 0xff {
        return Ok(false);
    }
    if p.src == [0u8; 16] && p.icmp_type != 133 && p.icmp_type != 135 {
        return Ok(false);
    }
    let link_local = p.dst[0] == 0xfe && p.dst[1] & 0xc0 == 0x80;
    let link_multicast = p.dst[0] == 0xff && p.dst[1] == 0x02;
    if egress && !link_local && !link_multicast && !crate::policy::is_node_addr(FAMILY_V6, &p.dst) {
        return Ok(false);
    }
    // Options: type, length in units of 8 bytes (0 is invalid), ending at the message's end.
    let mut off = ETH_HLEN + 40 + fixed;
    for _ in 0..MAX_ND_OPTIONS {
        if off >= end {
            break;
        }
        let len = load::<u8>(ctx, off + 1)? as usize;
        if len == 0 {
            return Ok(false);
        }
        off += len * 8;
    }
    Ok(off == end)
}

//! Connection tracking: an LRU hash of allowed flows per endpoint and direction. A packet whose
//! own tuple is known continues its flow; a packet whose reverse tuple is known (recorded in the
//! other direction) is a reply. Entries are only created for allowed traffic. Time is the
//! coarse monotonic clock (kernel 5.11+): timeouts are seconds, the precise clock is not needed.
use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns as now_ns,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use netpol_common::*;

use crate::parse::{Inner, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// An ICMP error about a tracked flow of this endpoint. The quoted packet is one the error's
/// receiver sent; it belongs to a tracked flow either as that flow's original packet (entry in
/// the other direction: the pod's reply-side error about a packet that came in, or a router's
/// error about a packet the pod sent out) or as one of its replies (entry in this direction,
/// quoted reversed: e.g. fragmentation needed for a server pod's response).
///
/// The quoted tuple alone proves nothing about where the error goes: a pod could quote a
/// tracked flow and address the error to anyone. So the error must travel toward the quoted
/// packet's sender: on the way in, the outer destination is the quoted source (the pod; the
/// outer source may be any router on the path, as with Linux conntrack); on the way out the pod
/// only reports on packets it received, so the outer destination is the quoted source (the
/// peer) and the outer source the quoted destination (the pod itself).
#[inline(always)]
pub fn related_to_flow(k: &mut CtKey, i: &Inner) -> bool {
    // `k` is the error's own key on entry; it is turned into the keys looked up in place (the
    // programs' stack has no room for another key), and the caller builds it again.
    let to_sender = same_addr(&i.src, &k.dst);
    let from_receiver = k.dir == DIR_INGRESS || same_addr(&i.dst, &k.src);
    if !(to_sender & from_receiver) {
        return false;
    }
    k.dir ^= 1;
    k.proto = i.proto;
    k.src = i.src;
    k.dst = i.dst;
    k.sport = i.sport;
    k.dport = i.dport;
    // (Not about a flow a hairpin frame of the pod's own made up: see CT_HAIRPIN.)
    if CONNTRACK.get_ptr(&*k).is_some_and(|v| unsafe { (*v).flags } & CT_HAIRPIN == 0) {
        return true;
    }
    // A reply of the flow: the entry is the reverse tuple, recorded in this direction.
    k.dir ^= 1;
    k.src = i.dst;
    k.dst = i.src;
    k.sport = i.dport;
    k.dport = i.sport;
    CONNTRACK.get_ptr(&*k).is_some_and(|v| unsafe { (*v).flags } & CT_HAIRPIN == 0)
}

/// Two addresses of a `CtKey` or an `Inner` (4-aligned in both): read as words.
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let a = unsafe { &*(a as *const [u8; 16] as *const [u32; 4]) };
    let b = unsafe { &*(b as *const [u8; 16] as *const [u32; 4]) };
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
}

#[map(name = "CONNTRACK2")]
static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(CONNTRACK_MAX, 0);

#[inline(always)]
fn or(v: u64, default: u64) -> u64 {
    if v == 0 {
        default
    } else {
        v
    }
}

#[inline(always)]
fn timeout(proto: u8, flags: u32) -> u64 {
    let c = crate::config::config();
    match proto {
        PROTO_TCP if flags & CT_TCP_FIN_SEEN != 0 => or(c.ct_tcp_closing_ns, CT_TIMEOUT_TCP_CLOSING_NS),
        PROTO_TCP | PROTO_SCTP => or(c.ct_tcp_ns, CT_TIMEOUT_TCP_NS),
        PROTO_UDP => or(c.ct_udp_ns, CT_TIMEOUT_UDP_NS),
        _ => or(c.ct_other_ns, CT_TIMEOUT_OTHER_NS),
    }
}

#[inline(always)]
pub fn key(endpoint: u32, dir: u8, p: &Packet) -> CtKey {
    CtKey { endpoint, dir, proto: p.proto, family: p.family, _pad: 0, src: p.src, dst: p.dst, sport: p.sport, dport: p.dport }
}

#[inline(always)]
fn reverse(k: &CtKey) -> CtKey {
    CtKey {
        endpoint: k.endpoint,
        dir: k.dir ^ 1,
        proto: k.proto,
        family: k.family,
        _pad: 0,
        src: k.dst,
        dst: k.src,
        sport: k.dport,
        dport: k.sport,
    }
}

/// A packet of a tracked flow: the direction in which the flow was allowed and the slot of
/// the policy that allowed it (`SLOT_NONE`: none). `pass` false: the packet is of the flow but
/// must be dropped (an RST outside the receiver's window, see `rst_in_window`).
pub struct Flow {
    pub dir: u8,
    pub slot: u32,
    pub pass: bool,
}

/// The coarse clock conntrack keeps time by (read once per packet).
#[inline(always)]
pub fn now() -> u64 {
    unsafe { now_ns() }
}

/// Looks the packet up in the table (forward, then reply; a SYN-ACK, or with `reply_hint`,
/// reply first). Returns the flow when the packet belongs to a live tracked one; refreshes the
/// entry and follows TCP teardown.
///
/// The order only spares look-ups: where both entries exist (a flow and the reverse one,
/// each allowed on its own), either vouches for the packet; an RST, whose verdict depends on
/// the entry's sequence state, is always looked up forward first, as before.
#[inline(always)]
pub fn track_existing(k: &CtKey, p: &Packet, now: u64, reply_hint: bool) -> Option<Flow> {
    let tcp = p.proto == PROTO_TCP;
    let reply_first = !(tcp && p.tcp_flags & TCP_RST != 0) && !bare_syn(p) && (reply_hint || syn_ack(p));
    let r = reverse(k);
    let (first, second, side) = if reply_first { (&r, k, 1) } else { (k, &r, 0) };
    if let Some((slot, pass)) = hit(first, p, now, side) {
        return Some(Flow { dir: first.dir, slot, pass });
    }
    // A bare SYN is never a reply (`hit` refuses it as one): the reverse look-up, a random
    // bucket of a large table and so the dearest step of a new connection, is not made.
    if bare_syn(p) {
        return None;
    }
    hit(second, p, now, side ^ 1).map(|(slot, pass)| Flow { dir: second.dir, slot, pass })
}

/// A TCP SYN without ACK: it opens a connection, it never answers one.
#[inline(always)]
pub fn bare_syn(p: &Packet) -> bool {
    p.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// A TCP SYN-ACK: the answer to a SYN.
#[inline(always)]
pub fn syn_ack(p: &Packet) -> bool {
    p.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK)
}

/// `side` 0: the packet has the entry's own tuple (it comes from the side whose packet created
/// the entry); 1: the reverse one (a reply).
#[inline(always)]
fn hit(k: &CtKey, p: &Packet, now: u64, side: u8) -> Option<(u32, bool)> {
    let v = CONNTRACK.get_ptr_mut(k)?;
    let v = unsafe { &mut *v };
    if now.wrapping_sub(v.last_seen_ns) > timeout(k.proto, v.flags) {
        let _ = CONNTRACK.remove(k);
        return None;
    }
    if side == 1 {
        // What the entry vouches for as replies:
        // - not the pod's own forged "reply" (an ingress entry created by a hairpin frame,
        //   whose source the pod chose: see CT_HAIRPIN), unless it is the pod talking to
        //   itself (the reply goes back to the same address);
        // - never a TCP SYN without ACK: a reply to a connection is a SYN-ACK at most, a bare
        //   SYN the other way opens a new connection (checked against policy). So an entry that
        //   a spoofed SYN `X:80 -> pod:P` created where ingress is open never lets the pod open
        //   `P -> X:80` through its isolated egress.
        if v.flags & CT_HAIRPIN != 0 && !same_addr(&k.src, &k.dst) {
            return None;
        }
        if bare_syn(p) {
            return None;
        }
    }
    let slot = v.policy;
    if p.proto == PROTO_TCP {
        if p.tcp_flags & TCP_RST != 0 {
            if !rst_in_window(v, side, p) {
                // Blind or stale: dropped, the flow stays (the flow cache keeps vouching).
                return Some((slot, false));
            }
            // The RST itself passes; the flow is gone (also from every CPU's flow cache).
            let _ = CONNTRACK.remove(k);
            crate::flowcache::bump(k.endpoint);
            return Some((slot, true));
        }
        if p.tcp_flags & TCP_FIN != 0 {
            v.flags |= CT_TCP_FIN_SEEN;
        } else if p.tcp_flags & TCP_SYN != 0 && v.flags & CT_TCP_FIN_SEEN != 0 {
            // Port reuse after a close: a fresh connection is checked against policy again.
            let _ = CONNTRACK.remove(k);
            crate::flowcache::bump(k.endpoint);
            return None;
        }
        // The sequence state RSTs are checked against. Only here, on the conntrack path: the
        // flow cache (which never caches SYN, FIN or RST) sends each flow's packets here again
        // at least once per `flow_cache_ticks` (<= 1 s), so the established fast path writes
        // nothing.
        // (Indexed by the side, not branched on it: `track_existing` picks the side at run
        // time, and each branch would be in both of its copies of this function.)
        let s = side as usize & 1;
        v.seq[s] = p.tcp_seq;
        v.flags |= CT_SEQ0 << s;
        if p.tcp_flags & TCP_ACK != 0 {
            v.ack[s] = p.tcp_ack;
            v.flags |= CT_ACK0 << s;
        }
    }
    v.last_seen_ns = now;
    Some((slot, true))
}

/// An RST from `side` ends the flow only when its sequence number is where the receiver
/// expects data: near the receiver's last acknowledgement (its RCV.NXT), else (the receiver
/// acknowledged nothing yet) near the sender's own last sequence number, else, for an RST|ACK
/// answering a SYN, when it acknowledges exactly that SYN. Like Linux conntrack's
/// `tcp_in_window`, but with a fixed window: [`CT_RST_WINDOW_AHEAD`] (1 MiB) after the reference and
/// [`CT_RST_WINDOW_BEHIND`] (64 KiB) before it, so a blind attacker hits with odds of about
/// 2^20 / 2^32 per guess instead of every time. The reference is the last value the conntrack
/// path saw (up to `flow_cache_ticks` old, see `hit`): a genuine RST after a burst of more than
/// 1 MiB within that time may be dropped once; the peer's next segment (a retransmission goes
/// the conntrack path once the cache slot ages out) refreshes the reference and the stack's
/// RST in answer to it is honoured (as after an RST lost on the way). An RST outside the window
/// is dropped (an endpoint would ignore it under RFC 5961 anyway) and bumps no epoch, so blind
/// RSTs cannot flush the flow cache either.
#[inline(always)]
fn rst_in_window(v: &CtValue, side: u8, p: &Packet) -> bool {
    // Side s's values and their "known" bits: seq[s] CT_SEQ0 << s, ack[s] CT_ACK0 << s.
    let o = (side ^ 1) as usize & 1;
    let s = side as usize & 1;
    let known = |bit: u32, of: usize| v.flags & (bit << of) != 0;
    let other_ack = if known(CT_ACK0, o) { Some(v.ack[o]) } else { None };
    let own_seq = if known(CT_SEQ0, s) { Some(v.seq[s]) } else { None };
    let other_seq = if known(CT_SEQ0, o) { Some(v.seq[o]) } else { None };
    if let Some(r) = other_ack {
        return in_window(p.tcp_seq, r);
    }
    if let Some(r) = own_seq {
        return in_window(p.tcp_seq, r);
    }
    if p.tcp_flags & TCP_ACK != 0 {
        if let Some(r) = other_seq {
            // Exactly the SYN's sequence number + 1 (RFC 9293, SYN-SENT).
            return p.tcp_ack == r.wrapping_add(1);
        }
    }
    // Nothing known about this flow's sequence space (an entry migrated from the old layout):
    // as before.
    v.flags & (CT_SEQ0 | CT_SEQ1) == 0
}

#[inline(always)]
fn in_window(x: u32, reference: u32) -> bool {
    let d = x.wrapping_sub(reference);
    d <= CT_RST_WINDOW_AHEAD || d.wrapping_neg() <= CT_RST_WINDOW_BEHIND
}

/// Records a newly allowed flow, allowed by the policy in `slot` (or `SLOT_NONE`); whether
/// it did (only packets with ports are tracked, never an RST).
///
/// `looped`: an ingress packet that entered the node through this same interface (the kernel's
/// `ingress_ifindex`): the pod sent it and the node routed it back, possibly rewritten by NAT.
/// `sole_v4`: the endpoint's one IPv4 address, where it owns no other (`EP_SOLE_V4`).
/// `now`: the packet's [`now`].
#[inline(always)]
pub fn create(k: &mut CtKey, p: &Packet, slot: u32, looped: bool, sole_v4: Option<u32>, now: u64) -> bool {
    if !p.has_ports {
        return false;
    }
    if p.proto == PROTO_TCP && p.tcp_flags & TCP_RST != 0 {
        return false;
    }
    let mut flags = 0;
    if k.dir == DIR_INGRESS {
        // A frame the endpoint sent to itself (a hairpin) was judged by its egress first, which
        // tracked it under the same tuple. Seen here, its source is whatever the pod wrote: the
        // entry may carry the frame's own flow on, but vouches for no replies (see CT_HAIRPIN).
        // (A genuine packet from X never has an egress entry of the same tuple: that would be
        // the pod itself sending with X's source address.)
        // (The key itself, its direction turned for the look-up: no second key on the stack.)
        // The egress entry passed anti-spoofing, so its source is one of the pod's own
        // addresses: an IPv4 source other than the pod's only IPv4 address cannot have one,
        // and the look-up (a random bucket of a large table) is not made.
        let src4 = u32::from_ne_bytes([k.src[0], k.src[1], k.src[2], k.src[3]]);
        let not_own = k.family == FAMILY_V4 && sole_v4.is_some_and(|own| own != src4);
        if !not_own {
            k.dir = DIR_EGRESS;
            if CONNTRACK.get_ptr(&*k).is_some() {
                flags |= CT_HAIRPIN;
            }
            k.dir = DIR_INGRESS;
        }
        // The same through a DNAT (a forged `X:80 -> service IP` that the node turns into
        // `X:80 -> pod:P`): egress saw another tuple, but the frame came back in through the
        // pod's own interface. Not where the source is the pod itself (it talks to itself,
        // through its service too) or the node (kube-proxy's masquerade of such hairpins).
        // (Interfaces on a bridge see the bridge as `ingress_ifindex`: the tuple check above
        // still holds there.)
        if looped && !same_addr(&k.src, &k.dst) && !crate::policy::is_node_addr(k.family, &k.src) {
            flags |= CT_HAIRPIN;
        }
    }
    // The new value is written in a per-CPU scratch slot, not on the stack (which is full).
    let Some(v) = CT_SCRATCH.get_ptr_mut(0) else { return false };
    let v = unsafe { &mut *v };
    v.last_seen_ns = now;
    v.flags = flags;
    v.policy = slot;
    v.seq = [p.tcp_seq, 0];
    v.ack = [p.tcp_ack, 0];
    if p.proto == PROTO_TCP {
        v.flags |= CT_SEQ0;
        if p.tcp_flags & TCP_ACK != 0 {
            v.flags |= CT_ACK0;
        }
    }
    CONNTRACK.insert(&*k, v, 0).is_ok()
}

/// One value per CPU where `create` builds an entry (not pinned: holds nothing between runs).
#[map(name = "CT_SCRATCH")]
static CT_SCRATCH: PerCpuArray<CtValue> = PerCpuArray::with_max_entries(1, 0);

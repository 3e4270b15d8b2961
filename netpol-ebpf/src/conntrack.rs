//! Connection tracking: an LRU hash of allowed flows per endpoint and direction. A packet whose
//! own tuple is known continues its flow; a packet whose reverse tuple is known (recorded in the
//! other direction) is a reply. Entries are only created for allowed traffic. Time is the
//! coarse monotonic clock (kernel 5.11+): timeouts are seconds, the precise clock is not needed.
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns as now_ns, macros::map, maps::LruHashMap};
use netpol_common::*;

use crate::parse::{Inner, Packet, TCP_FIN, TCP_RST, TCP_SYN};

/// An ICMP error about a tracked flow of this endpoint: the embedded packet is that flow's
/// own packet as the other side saw it, recorded in the opposite direction.
#[inline(always)]
pub fn related_to_flow(endpoint: u32, dir: u8, p: &Packet, i: &Inner) -> bool {
    let k = CtKey {
        endpoint,
        dir: dir ^ 1,
        proto: i.proto,
        family: p.family,
        _pad: 0,
        src: i.src,
        dst: i.dst,
        sport: i.sport,
        dport: i.dport,
    };
    CONNTRACK.get_ptr(&k).is_some()
}

#[map(name = "CONNTRACK")]
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
    let c = crate::counters::config();
    match proto {
        PROTO_TCP if flags & CT_TCP_FIN_SEEN != 0 => or(c.ct_tcp_closing_ns, CT_TIMEOUT_TCP_CLOSING_NS),
        PROTO_TCP | PROTO_SCTP => or(c.ct_tcp_ns, CT_TIMEOUT_TCP_NS),
        PROTO_UDP => or(c.ct_udp_ns, CT_TIMEOUT_UDP_NS),
        _ => or(c.ct_other_ns, CT_TIMEOUT_OTHER_NS),
    }
}

#[inline(always)]
pub fn key(endpoint: u32, dir: u8, p: &Packet) -> CtKey {
    CtKey {
        endpoint,
        dir,
        proto: p.proto,
        family: p.family,
        _pad: 0,
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
    }
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
/// the policy that allowed it (`SLOT_NONE`: none).
pub struct Flow {
    pub dir: u8,
    pub slot: u32,
}

/// Looks the packet up in the table (forward, then reply). Returns the flow when the packet
/// belongs to a live tracked one; refreshes the entry and follows TCP teardown.
#[inline(always)]
pub fn track_existing(k: &CtKey, p: &Packet) -> Option<Flow> {
    let now = unsafe { now_ns() };
    if let Some(slot) = hit(k, p, now) {
        return Some(Flow { dir: k.dir, slot });
    }
    let r = reverse(k);
    hit(&r, p, now).map(|slot| Flow { dir: r.dir, slot })
}

#[inline(always)]
fn hit(k: &CtKey, p: &Packet, now: u64) -> Option<u32> {
    let v = CONNTRACK.get_ptr_mut(k)?;
    let v = unsafe { &mut *v };
    if now.wrapping_sub(v.last_seen_ns) > timeout(k.proto, v.flags) {
        let _ = CONNTRACK.remove(k);
        return None;
    }
    let slot = v.policy;
    if p.proto == PROTO_TCP {
        if p.tcp_flags & TCP_RST != 0 {
            // The RST itself passes; the flow is gone (also from every CPU's flow cache).
            let _ = CONNTRACK.remove(k);
            crate::flowcache::bump(k.endpoint);
            return Some(slot);
        }
        if p.tcp_flags & TCP_FIN != 0 {
            v.flags |= CT_TCP_FIN_SEEN;
        } else if p.tcp_flags & TCP_SYN != 0 && v.flags & CT_TCP_FIN_SEEN != 0 {
            // Port reuse after a close: a fresh connection is checked against policy again.
            let _ = CONNTRACK.remove(k);
            crate::flowcache::bump(k.endpoint);
            return None;
        }
    }
    v.last_seen_ns = now;
    Some(slot)
}

/// Records a newly allowed flow, allowed by the policy in `slot` (or `SLOT_NONE`).
#[inline(always)]
pub fn create(k: &CtKey, p: &Packet, slot: u32) {
    if !p.has_ports {
        return;
    }
    if p.proto == PROTO_TCP && p.tcp_flags & TCP_RST != 0 {
        return;
    }
    let v = CtValue { last_seen_ns: unsafe { now_ns() }, flags: 0, policy: slot };
    let _ = CONNTRACK.insert(k, &v, 0);
}

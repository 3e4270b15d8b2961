//! netpol TC classifiers. `netpol_from_pod` runs at TC ingress of a pod's host-side interface
//! (packets the pod sends: its egress policy); `netpol_to_pod` runs at TC egress of that
//! interface (packets delivered to the pod: its ingress policy).
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod config;
mod conntrack;
mod counters;
mod events;
mod flowcache;
mod fragments;
mod parse;
mod policy;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use netpol_common::*;
use parse::Parsed;

#[classifier]
pub fn netpol_from_pod(ctx: TcContext) -> i32 {
    enforce(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn netpol_to_pod(ctx: TcContext) -> i32 {
    enforce(&ctx, DIR_INGRESS)
}

/// Does nothing: never attached; the benchmarks run it to measure the test harness's own cost
/// per packet, which is subtracted from nothing but reported beside the real programs.
#[classifier]
pub fn netpol_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[inline(always)]
fn enforce(ctx: &TcContext, dir: u8) -> i32 {
    let (ifindex, len) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).len) };
    let Some(ep) = policy::endpoint(ifindex) else {
        // Not an interface we manage (or being torn down).
        return TC_ACT_OK;
    };
    // From the pod, the fast path takes only packets sent from the pod's own IPv4 address
    // (anti-spoofing below; no flow of another source can be cached, this makes sure).
    let own_v4 = if dir == DIR_EGRESS { Some(u32::from_ne_bytes(ep.v4)) } else { None };
    let fast = flowcache::established_v4(ctx.data(), ctx.data_end(), ep.id, dir, own_v4);
    if let flowcache::Fast::Hit(flow_dir, slot) = fast {
        counters::count_policy(ep.id, flow_dir, slot);
        return pass(ep.id, dir, len);
    }
    let isolate_flag = if dir == DIR_INGRESS { EP_ISOLATE_INGRESS } else { EP_ISOLATE_EGRESS };
    let isolated = ep.flags & isolate_flag != 0;
    let p = match parse::parse(ctx) {
        Ok(Parsed::Ip(p)) => p,
        Ok(Parsed::Arp) => return pass(ep.id, dir, len),
        // Other ethertypes and VLAN-tagged frames: what the kernel makes of them later is not
        // judged here, so an isolated direction does not let them through.
        Ok(Parsed::Other) => return judged(ep.id, dir, !isolated, DROP_UNSUPPORTED, len),
        Err(()) => {
            // Truncated or malformed IP packet: never let it through an isolated direction,
            // nor out of a pod at all (its source could not be checked).
            // (Out of a pod this outcome counts as spoofed: see `verdict_of`.)
            let deny = dir == DIR_EGRESS || isolated;
            return judged(ep.id, dir, !deny, DROP_MALFORMED, len);
        }
    };
    // Anti-spoofing: whatever the policies, a pod sends only from its own addresses (else a
    // pod could pose as another pod, or as the node, which every ingress policy lets in).
    if dir == DIR_EGRESS && !policy::source_owned(&ep, &p) {
        return judged(ep.id, dir, false, VERDICT_SPOOFED, len);
    }
    // IPv6 neighbour discovery and router messages keep the link working, when they are
    // what the link uses and nothing more (see parse::neighbour_discovery).
    if p.proto == PROTO_ICMPV6 && (133..=137).contains(&p.icmp_type) && parse::neighbour_discovery(ctx, &p, dir == DIR_EGRESS) {
        return pass(ep.id, dir, len);
    }
    let mut ct = conntrack::key(ep.id, dir, &p);
    // ICMP errors about a flow this endpoint has (port unreachable, fragmentation needed...).
    if p.has_related {
        if conntrack::related_to_flow(&mut ct, &p.related) {
            return pass(ep.id, dir, len);
        }
        ct = conntrack::key(ep.id, dir, &p);
    }
    // The rest of a fragmented datagram follows its first fragment's verdict; without one
    // (reordered), it is judged as a portless packet below.
    let mut early = false;
    if p.later_fragment {
        match fragments::later(ep.id, dir, &p) {
            fragments::Later::Allowed => return pass(ep.id, dir, len),
            fragments::Later::Denied => return judged(ep.id, dir, !isolated, policy_drop(&ep), len),
            fragments::Later::Unknown => early = true,
        }
    }
    // Packets of an established flow that the flow cache vouches for (TCP packets that open or
    // close connections always take the conntrack path, which follows their state).
    let cacheable =
        p.has_ports && !p.fragment && !(p.proto == PROTO_TCP && p.tcp_flags & (parse::TCP_SYN | parse::TCP_FIN | parse::TCP_RST) != 0);
    let ticks = if cacheable { config::config().flow_cache_ticks } else { 0 };
    let now = if ticks != 0 { flowcache::now() } else { 0 };
    // (Unless the fast path already looked at this packet's slot.)
    if ticks != 0 && !matches!(fast, flowcache::Fast::Missed) {
        if let Some((flow_dir, slot)) = flowcache::lookup(&ct, ticks, now) {
            counters::count_policy(ep.id, flow_dir, slot);
            return pass(ep.id, dir, len);
        }
    }
    if p.has_ports {
        // Read before the conntrack lookup: a flow ended after it voids what is cached here.
        let epoch = if ticks != 0 { flowcache::epoch(ep.id) } else { 0 };
        if let Some(flow) = conntrack::track_existing(&ct, &p) {
            if !flow.pass {
                // An RST of a tracked flow outside the receiver's window: dropped, the flow stays.
                return judged(ep.id, dir, false, DROP_TCP_RST, len);
            }
            if ticks != 0 {
                flowcache::store(&ct, epoch, now, flow.dir, flow.slot);
            }
            fragments::remember(ep.id, dir, &p, true);
            counters::count_policy(ep.id, flow.dir, flow.slot);
            return pass(ep.id, dir, len);
        }
    }
    // Some(slot of the allowing policy, or SLOT_NONE when no policy had to allow it).
    let allowed_by = if !isolated || (dir == DIR_INGRESS && policy::is_node_addr(p.family, &p.src)) {
        Some(SLOT_NONE)
    } else {
        policy::allowed(ep.id, dir, &p)
    };
    let v = match allowed_by {
        Some(_) => VERDICT_ALLOW,
        None => audit_verdict(&ep, dir),
    };
    if v != VERDICT_DENY {
        // A frame the pod sent that the node routed back to it (see `conntrack::create`).
        let looped = dir == DIR_INGRESS && unsafe { (*ctx.skb.skb).ingress_ifindex } == ifindex;
        conntrack::create(&mut ct, &p, allowed_by.unwrap_or(SLOT_NONE), looped);
    }
    fragments::remember(ep.id, dir, &p, v != VERDICT_DENY);
    if early && v == VERDICT_DENY {
        fragments::count_early(ep.id, dir);
    }
    if let Some(slot) = allowed_by {
        counters::count_policy(ep.id, dir, slot);
    }
    if v != VERDICT_ALLOW {
        events::deny_event(ep.id, dir, &p, v);
    }
    counters::count(ep.id, dir, if v == VERDICT_DENY { policy_drop(&ep) } else { v }, len);
    if v == VERDICT_DENY {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// A packet the policy tables deny: dropped, unless only audit-mode policies isolate the
/// endpoint in this direction (then it passes as audit).
#[inline(always)]
fn audit_verdict(ep: &EndpointInfo, dir: u8) -> u32 {
    let audit = if dir == DIR_INGRESS { EP_AUDIT_INGRESS } else { EP_AUDIT_EGRESS };
    if ep.flags & audit != 0 {
        VERDICT_AUDIT
    } else {
        VERDICT_DENY
    }
}

/// Why the policy tables' deny drops the packet: the policies, or the pod failing closed.
#[inline(always)]
fn policy_drop(ep: &EndpointInfo) -> u32 {
    if ep.flags & EP_FAIL_CLOSED != 0 {
        DROP_FAIL_CLOSED
    } else {
        VERDICT_DENY
    }
}

/// Lets the packet (`len` bytes) through, counted as allowed.
#[inline(always)]
fn pass(endpoint: u32, dir: u8, len: u32) -> i32 {
    counters::count(endpoint, dir, VERDICT_ALLOW, len);
    TC_ACT_OK
}

/// Lets the packet through (`allow`) or drops it, counted with the outcome `drop` (a
/// `DROP_*`, `VERDICT_DENY` or `VERDICT_SPOOFED`: why it was dropped).
#[inline(always)]
fn judged(endpoint: u32, dir: u8, allow: bool, drop: u32, len: u32) -> i32 {
    if allow {
        return pass(endpoint, dir, len);
    }
    counters::count(endpoint, dir, drop, len);
    TC_ACT_SHOT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

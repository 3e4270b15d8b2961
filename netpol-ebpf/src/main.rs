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
#[cfg(feature = "debug-log")]
mod debug;
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
use parse::{Packet, Parsed};

#[classifier]
pub fn netpol_from_pod(ctx: TcContext) -> i32 {
    judge::<DIR_EGRESS>(&ctx)
}

#[classifier]
pub fn netpol_to_pod(ctx: TcContext) -> i32 {
    judge::<DIR_INGRESS>(&ctx)
}

/// The programs' decision on the packet of `ctx` in `DIR`.
#[cfg(not(feature = "debug-log"))]
#[inline(always)]
fn judge<const DIR: u8>(ctx: &TcContext) -> i32 {
    enforce(ctx, DIR)
}

/// The programs' decision on the packet of `ctx` in `DIR`, then the log of what they decided
/// (the `debug-log` object, which `--bpf-debug` loads): each in a BPF function of its own,
/// called from here, where nothing is kept on the stack, so that neither frame holds the
/// other's (see `debug`).
#[cfg(feature = "debug-log")]
#[inline(always)]
fn judge<const DIR: u8>(ctx: &TcContext) -> i32 {
    let verdict = enforce_logged::<DIR>(ctx.skb.skb);
    debug::flush();
    verdict
}

/// (The context as the raw pointer: passed in a register, not through the caller's stack.)
#[cfg(feature = "debug-log")]
#[inline(never)]
fn enforce_logged<const DIR: u8>(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    enforce(&TcContext::new(skb), DIR)
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
        not_ip => {
            let (allow, drop) = match not_ip {
                // Other ethertypes and VLAN-tagged frames: what the kernel makes of them later
                // is not judged here, so an isolated direction does not let them through.
                Ok(_) => (!isolated, DROP_UNSUPPORTED),
                // Truncated or malformed IP packet: never let it through an isolated
                // direction, nor out of a pod at all (its source could not be checked).
                // (Out of a pod this outcome counts as spoofed: see `verdict_of`.)
                Err(()) => (!(dir == DIR_EGRESS || isolated), DROP_MALFORMED),
            };
            #[cfg(feature = "debug-log")]
            debug::frame(ep.id, dir, drop, allow, len);
            return judged_frame(ep.id, dir, allow, drop, len, isolated);
        }
    };
    #[cfg(not(feature = "debug-log"))]
    let ct = &mut conntrack::key(ep.id, dir, &p);
    // (Logging, the key is kept where the log reads it, off this frame: see `debug`. The
    // one slot of a per-CPU array is always there: the `else` never runs.)
    #[cfg(feature = "debug-log")]
    let Some(ct) = debug::key(conntrack::key(ep.id, dir, &p)) else {
        return TC_ACT_SHOT;
    };
    match decide(ctx, &ep, dir, isolated, &p, ct, fast) {
        Decision::Pass => pass(ep.id, dir, len),
        Decision::Judged { outcome, slot, report } => {
            // (One place reports and counts every judged packet: one copy of the code.)
            if report {
                events::flow_event(ct, &p, outcome, slot, isolated_flag_of(isolated), len);
            }
            counters::count(ep.id, dir, outcome, len);
            #[cfg(feature = "debug-log")]
            if report {
                debug::judged(outcome, slot);
            }
            if matches!(outcome, VERDICT_ALLOW | VERDICT_AUDIT) {
                TC_ACT_OK
            } else {
                TC_ACT_SHOT
            }
        }
    }
}

/// What became of an IP packet.
enum Decision {
    /// It passes, counted as allowed (a tracked flow, a related error, neighbour discovery).
    Pass,
    /// Judged with `outcome` (a `VERDICT_*` or `DROP_*`; it passes as `VERDICT_ALLOW` or
    /// `VERDICT_AUDIT`), the slot of the policy that allowed it; reported (see `events`) when
    /// `report`: drops, audits and the first packet of a newly tracked flow.
    Judged { outcome: u32, slot: u32, report: bool },
}

/// Decides the IP packet `p` (conntrack key `ct`) of endpoint `ep` in `dir`, past the fast
/// path (`fast`: what it found).
#[inline(always)]
fn decide(ctx: &TcContext, ep: &EndpointInfo, dir: u8, isolated: bool, p: &Packet, ct: &mut CtKey, fast: flowcache::Fast) -> Decision {
    let drop = |outcome| Decision::Judged { outcome, slot: SLOT_NONE, report: true };
    // Anti-spoofing: whatever the policies, a pod sends only from its own addresses (else a
    // pod could pose as another pod, or as the node, which every ingress policy lets in).
    if dir == DIR_EGRESS && !policy::source_owned(&ep, &p) {
        return drop(VERDICT_SPOOFED);
    }
    // IPv6 neighbour discovery and router messages keep the link working, when they are
    // what the link uses and nothing more (see parse::neighbour_discovery).
    if p.proto == PROTO_ICMPV6 && (133..=137).contains(&p.icmp_type) && parse::neighbour_discovery(ctx, p, dir == DIR_EGRESS) {
        return Decision::Pass;
    }
    // ICMP errors about a flow this endpoint has (port unreachable, fragmentation needed...).
    if p.has_related {
        if conntrack::related_to_flow(ct, &p.related) {
            return Decision::Pass;
        }
        *ct = conntrack::key(ep.id, dir, p);
    }
    // The rest of a fragmented datagram follows its first fragment's verdict; without one
    // (reordered), it is judged as a portless packet below.
    let mut early = false;
    if p.later_fragment {
        match fragments::later(ep.id, dir, p) {
            fragments::Later::Allowed => return Decision::Pass,
            fragments::Later::Denied if !isolated => return Decision::Pass,
            fragments::Later::Denied => return drop(policy_drop(ep)),
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
        if let Some((flow_dir, slot)) = flowcache::lookup(ct, ticks, now) {
            counters::count_policy(ep.id, flow_dir, slot);
            return Decision::Pass;
        }
    }
    if p.has_ports {
        // Read before the conntrack lookup: a flow ended after it voids what is cached here.
        let epoch = if ticks != 0 { flowcache::epoch(ep.id) } else { 0 };
        if let Some(flow) = conntrack::track_existing(ct, p) {
            if !flow.pass {
                // An RST of a tracked flow outside the receiver's window: dropped, the flow stays.
                return drop(DROP_TCP_RST);
            }
            if ticks != 0 {
                flowcache::store(ct, epoch, now, flow.dir, flow.slot);
            }
            fragments::remember(ep.id, dir, p, true);
            counters::count_policy(ep.id, flow.dir, flow.slot);
            return Decision::Pass;
        }
    }
    // Some(slot of the allowing policy, or SLOT_NONE when no policy had to allow it).
    // The slot of the cluster policy that denied it, if one did.
    let mut denied_by = SLOT_NONE;
    let allowed_by = if !isolated || (dir == DIR_INGRESS && policy::is_node_addr(p.family, &p.src)) {
        Some(SLOT_NONE)
    } else {
        policy::allowed(ep.id, dir, p).map_err(|s| denied_by = s).ok()
    };
    let v = match allowed_by {
        Some(_) => VERDICT_ALLOW,
        None => audit_verdict(ep, dir),
    };
    let slot = allowed_by.unwrap_or(SLOT_NONE);
    // Whether this packet begins a tracked flow (its allow event is the flow's only one).
    let mut created = false;
    if v != VERDICT_DENY {
        // A frame the pod sent that the node routed back to it (see `conntrack::create`).
        let skb = unsafe { &*ctx.skb.skb };
        let looped = dir == DIR_INGRESS && skb.ingress_ifindex == skb.ifindex;
        let sole_v4 = (ep.flags & EP_SOLE_V4 != 0).then(|| u32::from_ne_bytes(ep.v4));
        created = conntrack::create(ct, p, slot, looped, sole_v4);
    }
    fragments::remember(ep.id, dir, p, v != VERDICT_DENY);
    if early && v == VERDICT_DENY {
        fragments::count_early(ep.id, dir);
    }
    if let Some(slot) = allowed_by {
        counters::count_policy(ep.id, dir, slot);
    }
    let outcome = if v == VERDICT_DENY { policy_drop(ep) } else { v };
    if v == VERDICT_DENY {
        counters::count_policy_denied(ep.id, dir, denied_by);
        return Decision::Judged { outcome, slot: denied_by, report: true };
    }
    Decision::Judged { outcome, slot, report: v != VERDICT_ALLOW || created }
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

/// Lets a frame not read as IP through (`allow`) or drops it, counted (and reported, see
/// `events`) with the outcome `drop` (why it was dropped).
#[inline(always)]
fn judged_frame(endpoint: u32, dir: u8, allow: bool, drop: u32, len: u32, isolated: bool) -> i32 {
    if allow {
        return pass(endpoint, dir, len);
    }
    events::frame_event(endpoint, dir, drop, isolated_flag_of(isolated), len);
    counters::count(endpoint, dir, drop, len);
    TC_ACT_SHOT
}

#[inline(always)]
fn isolated_flag_of(isolated: bool) -> u8 {
    if isolated {
        FLOW_ISOLATED
    } else {
        0
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

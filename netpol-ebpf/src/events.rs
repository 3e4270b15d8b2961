//! Flow events to userspace: one `FlowEvent` per dropped (or audited) packet, and per first
//! packet of a newly allowed flow, through the EVENTS ring buffer, written in place (no copy on
//! the stack). Which of those are sent, and how many, is the daemon's `EVENT_CONFIG`, changed
//! at run time (`--log-denied`, `observe` clients); every kind shares one token bucket per CPU
//! (as Cilium's bpf/lib events.h). Nothing is sent, and nothing else is read, while a packet's
//! kind is off: the only cost then is the one array lookup of the settings.
use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns,
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use netpol_common::*;

use crate::parse::Packet;

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

#[map(name = "EVENT_CONFIG")]
static EVENT_CONFIG: Array<EventConfig> = Array::pinned(1, 0);

/// The rate limiter's window (start, events sent in it), one per CPU.
#[map(name = "EVENT_RATE")]
static EVENT_RATE: PerCpuArray<RateState> = PerCpuArray::pinned(1, 0);

/// Per CPU: flow events not sent (`EVENT_DROP_RATE`: over the rate limit; `EVENT_DROP_FULL`:
/// no room in the ring buffer), for the daemon's metrics.
#[map(name = "EVENT_DROPS")]
static EVENT_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(2, 0);

#[inline(always)]
fn dropped(index: u32) {
    if let Some(c) = EVENT_DROPS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}

/// Is an event of `outcome` wanted now? (The settings' one lookup.)
#[inline(always)]
fn wanted(outcome: u32) -> Option<u32> {
    let c = EVENT_CONFIG.get(0)?;
    (c.verdicts & event_kind(outcome) != 0 && c.per_sec != 0).then_some(c.per_sec)
}

/// Takes a token of this CPU's bucket (`limit` a second); counts the event as not sent when
/// there is none.
#[inline(always)]
fn token(limit: u32) -> Option<u64> {
    let st = EVENT_RATE.get_ptr_mut(0)?;
    let st = unsafe { &mut *st };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(st.window_start_ns) >= 1_000_000_000 {
        st.window_start_ns = now;
        st.sent = 0;
    }
    if st.sent >= limit {
        dropped(EVENT_DROP_RATE);
        return None;
    }
    st.sent += 1;
    Some(now)
}

/// An event's scalars in one register: the policy slot (bits 0-31), the outcome (32-39), the
/// `FLOW_*` flags (40-47), the TCP flags (48-55) and the ICMP type (56-63). (A BPF function
/// takes at most five arguments.)
#[inline(always)]
fn pack(outcome: u32, slot: u32, flags: u8, tcp_flags: u8, icmp_type: u8) -> u64 {
    slot as u64 | (((outcome & 0xff) as u64) << 32) | ((flags as u64) << 40) | ((tcp_flags as u64) << 48) | ((icmp_type as u64) << 56)
}

/// Reports a decided packet `p` with conntrack key `k` (its endpoint, direction and tuple;
/// `outcome`: a `VERDICT_*` or `DROP_*`; `slot`: the allowing policy's, or `SLOT_NONE`;
/// `flags`: `FLOW_*`), when its kind is on and this CPU has a token left. Only the check is
/// inlined where a packet is decided: the rest is one BPF function (reading the key where it
/// already is on the stack), called only while events of the kind are on.
#[inline(always)]
pub fn flow_event(k: &CtKey, p: &Packet, outcome: u32, slot: u32, flags: u8, len: u32) {
    if let Some(limit) = wanted(outcome) {
        send(k, pack(outcome, slot, flags, p.tcp_flags, p.icmp_type), len, limit);
    }
}

/// Reports a dropped frame of `endpoint` in `dir` that was not read as IP (`outcome`
/// `DROP_UNSUPPORTED` or `DROP_MALFORMED`): no addresses.
#[inline(always)]
pub fn frame_event(endpoint: u32, dir: u8, outcome: u32, flags: u8, len: u32) {
    if let Some(limit) = wanted(outcome) {
        let k = CtKey { endpoint, dir, proto: 0, family: 0, _pad: 0, src: [0; 16], dst: [0; 16], sport: 0, dport: 0 };
        send(&k, pack(outcome, SLOT_NONE, flags | FLOW_NOT_IP, 0, 0), len, limit);
    }
}

/// Writes the event of key `k` and `meta` ([`pack`]) into the ring buffer, if this CPU's
/// bucket (`limit` a second) has a token.
#[inline(never)]
fn send(k: &CtKey, meta: u64, len: u32, limit: u32) {
    let Some(now) = token(limit) else { return };
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        dropped(EVENT_DROP_FULL);
        return;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        write_meta(ev, now, meta, len);
        (*ev).endpoint = k.endpoint;
        (*ev).dir = k.dir;
        (*ev).proto = k.proto;
        (*ev).family = k.family;
        (*ev).src = k.src;
        (*ev).dst = k.dst;
        (*ev).sport = k.sport;
        (*ev).dport = k.dport;
    }
    entry.submit(0);
}

/// The fields of `meta` ([`pack`]), the time and the length.
#[inline(always)]
unsafe fn write_meta(ev: *mut FlowEvent, now: u64, meta: u64, len: u32) {
    (*ev).ktime_ns = now;
    (*ev).slot = meta as u32;
    (*ev).outcome = (meta >> 32) as u8;
    (*ev).flags = (meta >> 40) as u8;
    (*ev).tcp_flags = (meta >> 48) as u8;
    (*ev).icmp_type = (meta >> 56) as u8;
    (*ev)._pad = 0;
    (*ev).len = len;
}

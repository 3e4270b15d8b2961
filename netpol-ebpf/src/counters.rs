//! Per-CPU packet counters per endpoint, direction and verdict; the runtime CONFIG; deny
//! events to userspace through a ring buffer, rate-limited per CPU.
use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns,
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use netpol_common::*;

use crate::parse::Packet;

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

#[map(name = "EVENT_RATE")]
static EVENT_RATE: PerCpuArray<RateState> = PerCpuArray::pinned(1, 0);

const ZERO: Config = Config { ct_tcp_ns: 0, ct_tcp_closing_ns: 0, ct_udp_ns: 0, ct_other_ns: 0, deny_events_per_sec: 0, flow_cache_ticks: 0 };

#[inline(always)]
pub fn config() -> &'static Config {
    CONFIG.get(0).unwrap_or(&ZERO)
}

/// Reports a denied packet, at most `deny_events_per_sec` per second on this CPU.
#[inline(always)]
pub fn deny_event(endpoint: u32, dir: u8, p: &Packet, verdict: u32) {
    let limit = config().deny_events_per_sec;
    if limit == 0 {
        return;
    }
    let Some(st) = EVENT_RATE.get_ptr_mut(0) else { return };
    let st = unsafe { &mut *st };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(st.window_start_ns) >= 1_000_000_000 {
        st.window_start_ns = now;
        st.sent = 0;
    }
    if st.sent >= limit {
        return;
    }
    st.sent += 1;
    let ev = DenyEvent {
        endpoint,
        dir,
        proto: p.proto,
        family: p.family,
        verdict: verdict as u8,
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
    };
    let _ = EVENTS.output::<DenyEvent>(&ev, 0);
}

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_ENDPOINTS * COUNTER_SLOTS, 0);

#[map(name = "POLICY_COUNTERS")]
static POLICY_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_ENDPOINTS * 2 * POLICY_SLOTS, 0);

/// Counts a packet of a flow that the policy in `slot` of `endpoint` allowed in `dir`.
#[inline(always)]
pub fn count_policy(endpoint: u32, dir: u8, slot: u32) {
    if endpoint >= MAX_ENDPOINTS || slot >= POLICY_SLOTS {
        return;
    }
    if let Some(c) = POLICY_COUNTERS.get_ptr_mut(policy_counter_index(endpoint, dir & 1, slot)) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count(endpoint: u32, dir: u8, verdict: u32) {
    if endpoint >= MAX_ENDPOINTS {
        return;
    }
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(endpoint, dir, verdict)) {
        unsafe { *c += 1 };
    }
}

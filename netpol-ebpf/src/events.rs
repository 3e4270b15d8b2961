//! Deny events to userspace: one `DenyEvent` per denied (or audited) packet through the EVENTS
//! ring buffer, rate-limited per CPU to the configured `deny_events_per_sec` (as Cilium's
//! bpf/lib events.h). The daemon reads them for its deny log; none are sent when the rate is 0.
use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns,
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use netpol_common::*;

use crate::config::config;
use crate::parse::Packet;

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

/// The rate limiter's window (start, events sent in it), one per CPU.
#[map(name = "EVENT_RATE")]
static EVENT_RATE: PerCpuArray<RateState> = PerCpuArray::pinned(1, 0);

/// Per CPU: deny events not sent (`EVENT_DROP_RATE`: over the rate limit; `EVENT_DROP_FULL`:
/// no room in the ring buffer), for the daemon's metrics.
#[map(name = "EVENT_DROPS")]
static EVENT_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(2, 0);

#[inline(always)]
fn dropped(index: u32) {
    if let Some(c) = EVENT_DROPS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
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
        dropped(EVENT_DROP_RATE);
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
    if EVENTS.output::<DenyEvent>(&ev, 0).is_err() {
        dropped(EVENT_DROP_FULL);
    }
}

//! Per-CPU packet counters per endpoint, direction and verdict.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use netpol_common::*;

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_ENDPOINTS * COUNTER_SLOTS, 0);

#[inline(always)]
pub fn count(endpoint: u32, dir: u8, verdict: u32) {
    if endpoint >= MAX_ENDPOINTS {
        return;
    }
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(endpoint, dir, verdict)) {
        unsafe { *c += 1 };
    }
}

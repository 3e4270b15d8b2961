//! Per-CPU packet and byte counters: one per endpoint, direction and outcome (the verdict
//! and, for a drop, its reason: COUNTERS), and per-CPU packet counters, one per
//! endpoint, direction and policy slot for the packets each policy allowed (POLICY_COUNTERS).
//! The daemon sums them over CPUs for its metrics.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use netpol_common::*;

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Count> = PerCpuArray::pinned(MAX_ENDPOINTS * COUNTER_SLOTS, 0);

#[map(name = "POLICY_COUNTERS")]
static POLICY_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_ENDPOINTS * 2 * POLICY_SLOTS, 0);

#[map(name = "POLICY_DENY_COUNTERS")]
static POLICY_DENY_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_ENDPOINTS * 2 * POLICY_SLOTS, 0);

/// Counts a packet that the cluster policy in `slot` of `endpoint` denied in `dir` (nothing
/// for `SLOT_NONE`: a NetworkPolicy's default deny, counted per pod only).
#[inline(always)]
pub fn count_policy_denied(endpoint: u32, dir: u8, slot: u32) {
    if endpoint >= MAX_ENDPOINTS || slot >= POLICY_SLOTS {
        return;
    }
    if let Some(c) = POLICY_DENY_COUNTERS.get_ptr_mut(policy_counter_index(endpoint, dir & 1, slot)) {
        unsafe { *c += 1 };
    }
}

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

/// Counts a packet of `bytes` (its `skb->len`) of `endpoint` in `dir` with `outcome` (a
/// `VERDICT_*` or `DROP_*`): one lookup, both fields on one cache line.
#[inline(always)]
pub fn count(endpoint: u32, dir: u8, outcome: u32, bytes: u32) {
    if endpoint >= MAX_ENDPOINTS {
        return;
    }
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(endpoint, dir & 1, outcome)) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

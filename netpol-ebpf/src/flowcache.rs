//! The flow cache: a per-CPU, direct-mapped copy of recent conntrack hits, so that the packets
//! of an established flow pass with array lookups only (the verifier inlines them) instead of
//! a hash-table lookup and a clock read (kernel function calls, each paying the CPU's return
//! mitigations). The conntrack table stays the truth: a slot vouches for its flow for at most
//! `Config::flow_cache_ticks` ticks after the table confirmed it (then the packet takes the
//! conntrack path again, which refreshes the entry), and only under the endpoint's epoch of
//! that moment; whatever ends flows of an endpoint bumps that epoch.
//!
//! What the table decides about a packet depends on its key (its own tuple, endpoint and
//! direction) and its TCP flags only: a hairpin-created entry vouches for no replies whatever
//! the packet, a bare SYN is never a reply, RSTs are checked against the sequence state. No
//! SYN, FIN or RST is ever passed from the cache (here or in `lookup` via the general path),
//! so a slot only repeats, for the same key, a verdict the table gave; an out-of-window RST
//! (dropped, flow kept) bumps nothing and stores nothing. A slot is written by every packet the
//! table vouches for but an RST (which ends the flow), a SYN-ACK or FIN too, and by the packet
//! that creates an entry: what the table said of that key then, it says of the key's later
//! packets that the cache may pass (neither a SYN nor an RST).
use aya_ebpf::{
    helpers::bpf_jiffies64,
    macros::map,
    maps::{Array, PerCpuArray},
};
use core::intrinsics::AtomicOrdering;
use netpol_common::*;

/// Not pinned: a restarted daemon's programs start with a cold cache and epochs of their own.
#[map(name = "FLOW_CACHE")]
static FLOW_CACHE: PerCpuArray<FlowCacheEntry> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// Per endpoint id; only ever incremented, atomically: here on a TCP RST, by the daemon
/// through a shared mapping of the array (BPF_F_MMAPABLE) when it cuts flows.
#[map(name = "FLOW_EPOCH")]
static FLOW_EPOCH: Array<u64> = Array::with_max_entries(MAX_ENDPOINTS, BPF_F_MMAPABLE);

const WORDS: usize = core::mem::size_of::<CtKey>() / 4;

#[inline(always)]
fn words(k: &CtKey) -> &[u32; WORDS] {
    // CtKey is 4-aligned, 44 bytes, without implicit padding.
    unsafe { &*(k as *const CtKey as *const [u32; WORDS]) }
}

#[inline(always)]
fn index(w: &[u32; WORDS]) -> u32 {
    index_of(w[0], w[1], w[2] ^ w[3] ^ w[4] ^ w[5], w[6] ^ w[7] ^ w[8] ^ w[9], w[10])
}

/// The slot of a key from its words: endpoint, dir/proto/family, the source and destination
/// address words folded, the ports word.
#[inline(always)]
fn index_of(endpoint: u32, kind: u32, s: u32, d: u32, ports: u32) -> u32 {
    let x = (((s as u64) << 32) | d as u64) ^ ((ports as u64) << 13) ^ ((endpoint as u64) << 40) ^ ((kind as u64) << 3);
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52) as u32 & (FLOW_CACHE_SLOTS - 1)
}

/// What the fast path found.
pub enum Fast {
    /// The cache vouches for the packet's flow: (flow direction, policy slot).
    Hit(u8, u32),
    /// The packet's slot was looked at and does not vouch for it: the general path need not
    /// look again.
    Missed,
    /// Not a packet the fast path reads (or the cache is off): the general path decides, and
    /// may still use the cache.
    Other,
}

/// The slot vouches for a flow of `endpoint`: written, younger than `ticks`, current epoch.
#[inline(always)]
fn fresh(e: &FlowCacheEntry, endpoint: u32, ticks: u32, now: u64) -> bool {
    e.live != 0 && now.wrapping_sub(e.at) < ticks as u64 && e.epoch == epoch(endpoint)
}

/// The common case straight from the packet, before any general parsing: an IPv4 TCP (no
/// SYN, FIN or RST), UDP or SCTP packet without IP options or fragmentation, headers in the
/// linear data, whose flow the cache vouches for.
///
/// Reads whole words at the packet's offsets: the kernels netpol runs on (x86-64, arm64) do
/// not require alignment for packet access, and the IP header is word-aligned in practice.
#[inline(always)]
///
/// `own_v4` (packets from the pod): the pod's address as read from the packet; a packet from
/// any other source is left to the general path, which drops it as spoofed.
pub fn established_v4(data: usize, data_end: usize, endpoint: u32, dir: u8, own_v4: Option<u32>) -> Fast {
    const L4: usize = 14 + 20;
    if data + L4 + 4 > data_end {
        return Fast::Other;
    }
    let rd16 = |off: usize| unsafe { ((data + off) as *const u16).read_volatile() };
    let rd32 = |off: usize| unsafe { ((data + off) as *const u32).read_volatile() };
    // Ethertype 0x0800 and version 4, IHL 5 (the bytes in memory order, read little-endian).
    if rd16(12) != 0x0008 || unsafe { *((data + 14) as *const u8) } != 0x45 {
        return Fast::Other;
    }
    // No fragment offset, no more-fragments bit.
    if rd16(20) & 0xff3f != 0 {
        return Fast::Other;
    }
    let proto = unsafe { *((data + 23) as *const u8) };
    match proto {
        PROTO_TCP => {
            if data + L4 + 14 > data_end {
                return Fast::Other;
            }
            let flags = unsafe { *((data + L4 + 13) as *const u8) };
            if flags & 0x07 != 0 {
                return Fast::Other;
            }
        }
        PROTO_UDP | PROTO_SCTP => {}
        _ => return Fast::Other,
    }
    let src = rd32(26);
    if own_v4.is_some_and(|own| own != src) {
        return Fast::Other;
    }
    let dst = rd32(30);
    // The ports as `CtKey` holds them: each a host-order u16.
    let raw = rd32(L4);
    let ports = ((raw & 0x00ff_00ff) << 8) | ((raw >> 8) & 0x00ff_00ff);
    let kind = dir as u32 | (proto as u32) << 8 | (FAMILY_V4 as u32) << 16;
    let ticks = crate::config::config().flow_cache_ticks;
    if ticks == 0 {
        return Fast::Other;
    }
    let Some(e) = FLOW_CACHE.get_ptr(index_of(endpoint, kind, src, dst, ports)) else { return Fast::Other };
    let e = unsafe { &*e };
    if !fresh(e, endpoint, ticks, now()) {
        return Fast::Missed;
    }
    // The key in 8-byte words (the entry is 8-aligned, the key at its start): endpoint and
    // kind, source (IPv4: the first 4 bytes), dst, ports.
    let k = unsafe { &*(&e.key as *const CtKey as *const [u64; 5]) };
    let diff = (k[0] ^ (endpoint as u64 | (kind as u64) << 32))
        | (k[1] ^ src as u64)
        | k[2]
        | (k[3] ^ dst as u64)
        | k[4]
        | (e.key.sport as u32 | (e.key.dport as u32) << 16) as u64 ^ ports as u64;
    if diff != 0 {
        return Fast::Missed;
    }
    Fast::Hit(e.dir, e.slot)
}

/// The endpoint's current epoch (read before the conntrack lookup whose result is cached).
#[inline(always)]
pub fn epoch(endpoint: u32) -> u32 {
    // Slots live for at most `flow_cache_ticks`: the low bits are enough.
    FLOW_EPOCH.get(endpoint).copied().unwrap_or(0) as u32
}

#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_jiffies64() }
}

/// The tracked flow (direction, policy slot) this packet continues, if the cache vouches for it.
#[inline(always)]
pub fn lookup(k: &CtKey, ticks: u32, now: u64) -> Option<(u8, u32)> {
    let w = words(k);
    let e = unsafe { &*FLOW_CACHE.get_ptr(index(w))? };
    if !fresh(e, k.endpoint, ticks, now) {
        return None;
    }
    let ew = words(&e.key);
    let mut diff = 0;
    for i in 0..WORDS {
        diff |= ew[i] ^ w[i];
    }
    if diff != 0 {
        return None;
    }
    Some((e.dir, e.slot))
}

/// Whether this CPU's slot of `k` holds `k` as a reply (a flow tracked the other way),
/// whatever its age: a hint for the order of the conntrack look-ups, never a verdict.
#[inline(always)]
pub fn holds_reply(k: &CtKey) -> bool {
    let w = words(k);
    let Some(e) = FLOW_CACHE.get_ptr(index(w)) else { return false };
    let e = unsafe { &*e };
    let ew = words(&e.key);
    let mut diff = 0;
    for i in 0..WORDS {
        diff |= ew[i] ^ w[i];
    }
    e.live != 0 && diff == 0 && e.dir != k.dir
}

/// Caches a conntrack hit (or a new entry) made under `epoch` at `now`.
#[inline(always)]
pub fn store(k: &CtKey, epoch: u32, now: u64, dir: u8, slot: u32) {
    if let Some(e) = FLOW_CACHE.get_ptr_mut(index(words(k))) {
        // Field by field, straight from the key (no second copy on the 512-byte stack).
        let e = unsafe { &mut *e };
        e.key = *k;
        e.epoch = epoch;
        e.at = now;
        e.slot = slot;
        e.dir = dir;
        e.live = 1;
    }
}

/// Voids every cached flow of `endpoint`, on every CPU.
#[inline(always)]
pub fn bump(endpoint: u32) {
    if let Some(p) = FLOW_EPOCH.get_ptr_mut(endpoint) {
        // An atomic add (BPF_ATOMIC | BPF_ADD): the target has no `AtomicU64::fetch_add`.
        unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, 1) };
    }
}

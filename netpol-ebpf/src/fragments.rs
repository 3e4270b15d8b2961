//! IP fragments (as Cilium's bpf/lib/ipfrag.h): only a datagram's first fragment carries the
//! L4 header, so the first fragment is judged and its verdict recorded; the later fragments
//! (no ports) follow that verdict.
//!
//! Keyed by the endpoint, direction, addresses, protocol and IP identification: a pod can only
//! reach records of its own endpoint and direction. A denied first fragment is recorded as
//! denied, so its later fragments are dropped even where a record of an earlier allowed
//! datagram with the same identification was left behind. A record that says "allowed" for a
//! later fragment of some other datagram (identifications are re-used) lets through only
//! what cannot be reassembled without that datagram's own first fragment, which is judged.
//!
//! A later fragment that arrives before its first fragment (no record: reordered on the way)
//! cannot be judged: TC cannot hold it back until the first arrives. It is judged like any
//! portless packet (passes where the direction is not isolated or an all-traffic rule allows
//! the peer) and otherwise dropped (fail closed) and counted, beside the deny counter, in
//! `FRAG_EARLY` (per endpoint and direction), so that such losses can be told apart.
use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use netpol_common::*;

use crate::parse::Packet;

#[map(name = "FRAGS")]
static FRAGS: LruHashMap<FragKey, u32> = LruHashMap::pinned(FRAGS_MAX, 0);

#[map(name = "FRAG_EARLY")]
static FRAG_EARLY: PerCpuArray<u64> = PerCpuArray::pinned(MAX_ENDPOINTS * 2, 0);

/// What is known about a later fragment's datagram.
pub enum Later {
    /// Its first fragment was allowed (or passed as audit).
    Allowed,
    /// Its first fragment was denied.
    Denied,
    /// Its first fragment was not seen (yet).
    Unknown,
}

/// IPv6 fragments are keyed without the protocol: only the first fragment's headers reach the
/// upper-layer header, and the fragment headers' next header values may differ between the
/// fragments of one packet (RFC 8200 4.5); the 32-bit identification is per source and
/// destination.
#[inline(always)]
fn key(endpoint: u32, dir: u8, p: &Packet) -> FragKey {
    let proto = if p.family == FAMILY_V6 { 0 } else { p.proto };
    FragKey { endpoint, id: p.frag_id, dir, proto, family: p.family, _pad: 0, src: p.src, dst: p.dst }
}

/// The recorded verdict of a later fragment's datagram.
#[inline(always)]
pub fn later(endpoint: u32, dir: u8, p: &Packet) -> Later {
    match unsafe { FRAGS.get(&key(endpoint, dir, p)) } {
        Some(&FRAG_ALLOWED) => Later::Allowed,
        Some(_) => Later::Denied,
        None => Later::Unknown,
    }
}

/// Records the verdict of a first fragment with more to come.
#[inline(always)]
pub fn remember(endpoint: u32, dir: u8, p: &Packet, allowed: bool) {
    if p.fragment && p.more_fragments && !p.later_fragment {
        let v = if allowed { FRAG_ALLOWED } else { FRAG_DENIED };
        let _ = FRAGS.insert(&key(endpoint, dir, p), &v, 0);
    }
}

/// Counts a later fragment dropped because its first fragment had not been seen.
#[inline(always)]
pub fn count_early(endpoint: u32, dir: u8) {
    if endpoint >= MAX_ENDPOINTS {
        return;
    }
    if let Some(c) = FRAG_EARLY.get_ptr_mut(endpoint * 2 + (dir & 1) as u32) {
        unsafe { *c += 1 };
    }
}

//! Policy lookup: endpoint table, peer identity (LPM), per-endpoint policy (hash), port set
//! (LPM on protocol + port). Constant work per packet whatever the number of rules.
use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie},
};
use netpol_common::*;

use crate::parse::Packet;

#[map(name = "ENDPOINTS_ARRAY")]
static ENDPOINTS_ARRAY: Array<EndpointInfo> = Array::pinned(ENDPOINTS_ARRAY_SIZE, 0);

#[map(name = "ENDPOINTS")]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(ENDPOINTS_MAX, 0);

#[map(name = "IDENTITIES")]
static IDENTITIES: LpmTrie<IdKey, u32> = LpmTrie::pinned(IDENTITIES_MAX, 0);

#[map(name = "POLICY2")]
static POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(POLICY_MAX, 0);

#[map(name = "POLICY_PORTS")]
static POLICY_PORTS: LpmTrie<PortKey, PortValue> = LpmTrie::pinned(POLICY_PORTS_MAX, 0);

#[map(name = "NODE_ADDRS")]
static NODE_ADDRS: HashMap<AddrKey, u8> = HashMap::pinned(NODE_ADDRS_MAX, 0);

/// The addresses each endpoint owns (its pod's status.podIPs): the sources it may send from.
#[map(name = "ENDPOINT_ADDRS")]
static ENDPOINT_ADDRS: HashMap<EpAddrKey, u8> = HashMap::pinned(ENDPOINT_ADDRS_MAX, 0);

#[inline(always)]
pub fn endpoint(ifindex: u32) -> Option<EndpointInfo> {
    let e =
        if ifindex < ENDPOINTS_ARRAY_SIZE { ENDPOINTS_ARRAY.get(ifindex).copied() } else { unsafe { ENDPOINTS.get(&ifindex) }.copied() };
    e.filter(|e| e.flags & EP_PRESENT != 0)
}

#[inline(always)]
pub fn is_node_addr(family: u8, addr: &[u8; 16]) -> bool {
    let k = AddrKey { family, _pad: [0; 3], addr: *addr };
    unsafe { NODE_ADDRS.get(&k) }.is_some()
}

/// Anti-spoofing: may the endpoint's pod send this packet, by its source address? One of the
/// pod's own addresses (IPv4: first compared with the one in `EndpointInfo`, already loaded);
/// a link-local (fe80::/10) or the unspecified address (::, duplicate address detection) only
/// for neighbour discovery (ICMPv6 133-136), which is how a pod finds its gateway before and
/// besides its global address, and for link-scoped multicast listener discovery. An interface whose pod's address is not known yet owns
/// nothing: it sends nothing but ARP and neighbour discovery until the daemon programs it
/// (fail closed; the CNI reports the IP within moments).
#[inline(always)]
pub fn source_owned(ep: &EndpointInfo, p: &Packet) -> bool {
    if p.family == FAMILY_V4 {
        let own = u32::from_ne_bytes(ep.v4);
        let src = u32::from_ne_bytes([p.src[0], p.src[1], p.src[2], p.src[3]]);
        if own != 0 && src == own {
            return true;
        }
    } else {
        let link_local = p.src[0] == 0xfe && p.src[1] & 0xc0 == 0x80;
        let unspecified = p.src == [0; 16];
        if link_local || unspecified {
            // Multicast listener discovery (MLD queries/reports/done, 130-132 and 143) is
            // sent from there too, by every IPv6 stack when a link comes up: owned when it
            // stays on the link (to ff02::/16); policy still judges it like any ICMPv6.
            let mld = matches!(p.icmp_type, 130..=132 | 143) && p.dst[0] == 0xff && p.dst[1] == 0x02;
            return p.proto == PROTO_ICMPV6 && ((133..=136).contains(&p.icmp_type) || mld);
        }
    }
    let k = EpAddrKey { endpoint: ep.id, family: p.family, _pad: [0; 3], addr: p.src };
    unsafe { ENDPOINT_ADDRS.get(&k) }.is_some()
}

/// Does the union of the endpoint's policies allow this packet in direction `dir`? `Ok`: the
/// slot of a policy that allows it; `Err`: the slot of the cluster policy that denied it, or
/// `SLOT_NONE` (a default deny).
#[inline(always)]
pub fn allowed(endpoint: u32, dir: u8, p: &Packet) -> Result<u32, u32> {
    let peer = if dir == DIR_INGRESS { p.src } else { p.dst };
    let bits = if p.family == FAMILY_V4 { 32 } else { 128 };
    let id_key = Key::new(ID_KEY_FIXED_BITS + bits, IdKey { family: p.family, _pad: [0; 3], addr: peer });
    let identity = IDENTITIES.get(&id_key).copied().unwrap_or(0);
    let key = PolicyKey { endpoint, identity, dir, _pad: [0; 3] };
    // A class without an entry of its own gets what the endpoint's rules without peer
    // restriction allow: the entry of identity 0.
    let v = match unsafe { POLICY.get(&key) } {
        Some(v) => v,
        None if identity != 0 => {
            let key0 = PolicyKey { endpoint, identity: 0, dir, _pad: [0; 3] };
            unsafe { POLICY.get(&key0) }.ok_or(SLOT_NONE)?
        }
        None => return Err(SLOT_NONE),
    };
    if v.flags & POLICY_ALLOW_ALL != 0 {
        return Ok((v.flags >> POLICY_SLOT_SHIFT) & 0xff);
    }
    // Only port-carrying protocols can match a port rule; other protocols (ICMP...) need an
    // "all traffic" rule or the other-protocols flag, non-first fragments an "all traffic" rule.
    if !matches!(p.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        if v.flags & POLICY_ALLOW_OTHER != 0 {
            return Ok((v.flags >> POLICY_SLOT_SHIFT) & 0xff);
        }
        if v.flags & POLICY_DENY_OTHER != 0 {
            return Err((v.flags >> POLICY_DENY_SLOT_SHIFT) & 0xff);
        }
        return Err(SLOT_NONE);
    }
    if !p.has_ports {
        return Err(SLOT_NONE);
    }
    // The one port of the class, inline in the value: a compare, not a walk of the trie (no
    // denied ports go with it: see POLICY_ONE_PORT).
    if v.flags & POLICY_ONE_PORT != 0 {
        if v.portset == one_port_portset(p.proto, p.dport) {
            return Ok(v.flags >> POLICY_ONE_PORT_SLOT_SHIFT);
        }
        return Err(SLOT_NONE);
    }
    let port = p.dport.to_be_bytes();
    let pkey = Key::new(PORT_KEY_FIXED_BITS + 16, PortKey { portset: v.portset, proto: p.proto, _pad: 0, port });
    if let Some(a) = POLICY_PORTS.get(&pkey) {
        return Ok(a.slot);
    }
    // Which cluster policy denied it: looked up only where one denies some ports.
    if v.flags & POLICY_HAS_DENIES == 0 {
        return Err(SLOT_NONE);
    }
    let dkey = Key::new(PORT_KEY_FIXED_BITS + 16, PortKey { portset: v.portset | PORTSET_DENIED, proto: p.proto, _pad: 0, port });
    Err(POLICY_PORTS.get(&dkey).map_or(SLOT_NONE, |d| d.slot))
}

//! Map keys, values and constants shared by the TC programs (`netpol-ebpf`) and userspace
//! (`netpol-daemon`). Everything here is `#[repr(C)]`, padding is explicit and must be zero.
//!
//! # Datapath design
//!
//! Every pod interface the daemon manages has an entry in [`ENDPOINTS`](map names below), keyed
//! by the host-side ifindex, giving the pod's endpoint id and which directions are isolated.
//!
//! Policy lookup is one longest-prefix match and two exact/prefix lookups, never a loop over
//! rules:
//!
//! 1. `IDENTITIES`: node-wide LPM trie from address ([`IdKey`]) to an *identity*: a class of
//!    addresses that every rule enforced on this node treats the same (replicas of a deployment
//!    share one; an ipBlock except splits its cidr into classes). Addresses in no class are
//!    identity 0. This is what keeps the per-endpoint tables small: a rule that allows "every
//!    pod of every namespace" is one entry per endpoint, not one per pod.
//! 2. `POLICY`: hash from ([`PolicyKey`]: endpoint, identity, direction) to [`PolicyValue`]: an
//!    interned port set, or "all traffic", or the one (protocol, port) allowed, inline
//!    ([`POLICY_ONE_PORT`]: the third look-up is not made). A missing identity falls back to
//!    the endpoint's identity-0 entry (what its rules without peer restriction allow); missing
//!    too: denied.
//! 3. `POLICY_PORTS`: LPM trie keyed by ([`PortKey`]: port set id, protocol, port). A port range
//!    is stored as at most 30 port prefixes, so `endPort` ranges of any width cost O(log) entries.
//!
//! Packets of tracked flows skip the policy lookup: `CONNTRACK` (LRU hash of [`CtKey`]) holds
//! every allowed flow, and in front of it the per-CPU `FLOW_CACHE` ([`FlowCacheEntry`])
//! lets an established flow's packets pass with array lookups only (no kernel function call),
//! for at most [`Config::flow_cache_ticks`] at a time and under the endpoint's `FLOW_EPOCH`.
//!
#![cfg_attr(not(test), no_std)]

/// Traffic entering the pod (enforced at TC egress of the host-side veth).
pub const DIR_INGRESS: u8 = 0;
/// Traffic leaving the pod (enforced at TC ingress of the host-side veth).
pub const DIR_EGRESS: u8 = 1;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// [`EndpointInfo::flags`]: the pod is isolated for ingress.
pub const EP_ISOLATE_INGRESS: u32 = 1;
/// [`EndpointInfo::flags`]: the pod is isolated for egress.
pub const EP_ISOLATE_EGRESS: u32 = 2;
/// [`EndpointInfo::flags`]: the entry is in use (array slots of unmanaged interfaces are 0).
pub const EP_PRESENT: u32 = 4;
/// [`EndpointInfo::flags`]: only audit-mode policies isolate the pod for ingress / egress:
/// what the policy tables deny passes, counted and reported as `VERDICT_AUDIT`.
pub const EP_AUDIT_INGRESS: u32 = 8;
pub const EP_AUDIT_EGRESS: u32 = 16;
/// [`EndpointInfo::flags`]: the pod's entries do not fit the maps, its isolated directions
/// deny everything; what the policy tables deny then counts as [`DROP_FAIL_CLOSED`].
pub const EP_FAIL_CLOSED: u32 = 32;
/// [`EndpointInfo::flags`]: [`EndpointInfo::v4`] is the only IPv4 address the pod owns (none
/// when it is 0.0.0.0): an IPv4 source other than it was never sent by the pod (anti-spoofing),
/// which spares new flows a conntrack look-up (see netpol-ebpf/src/conntrack.rs `create`).
/// Without it (several IPv4 addresses) the programs look.
pub const EP_SOLE_V4: u32 = 64;

/// Interfaces with an ifindex below this are looked up in the `ENDPOINTS_ARRAY` (an array
/// lookup the verifier inlines); larger ifindexes (nodes with much churn) in `ENDPOINTS`.
pub const ENDPOINTS_ARRAY_SIZE: u32 = 65_536;

/// [`PolicyValue::flags`]: every protocol and port is allowed.
pub const POLICY_ALLOW_ALL: u32 = 1;
/// [`PolicyValue::flags`]: besides the port set's ports, every packet of a protocol other than
/// TCP, UDP and SCTP (ICMP...) is allowed. What a ClusterNetworkPolicy that denies some ports
/// leaves open. (Not port-less TCP/UDP/SCTP packets: a fragment without its first fragment's
/// verdict needs [`POLICY_ALLOW_ALL`].) The slot is in the same bits as for `POLICY_ALLOW_ALL`.
pub const POLICY_ALLOW_OTHER: u32 = 2;
/// [`PolicyValue::flags`]: a cluster policy denies the other protocols (than TCP, UDP, SCTP),
/// its slot in bits 16-23 (for the deny counters).
pub const POLICY_DENY_OTHER: u32 = 4;
/// [`PolicyValue::flags`]: cluster policies deny some ports: a port the port set does not
/// allow is looked up again under `portset | PORTSET_DENIED` for the slot that denied it.
pub const POLICY_HAS_DENIES: u32 = 8;
/// Where [`POLICY_DENY_OTHER`]'s slot is in [`PolicyValue::flags`].
pub const POLICY_DENY_SLOT_SHIFT: u32 = 16;
/// [`PolicyValue::flags`]: the port set is one port of one protocol (the common "this peer on
/// port P" rule), held in [`PolicyValue::portset`] itself ([`one_port_portset`]) with its slot
/// in bits 24-31, so that a new flow's verdict takes no `POLICY_PORTS` walk. Never with
/// [`POLICY_HAS_DENIES`] (whose look-up needs a port set id) nor [`POLICY_ALLOW_ALL`].
pub const POLICY_ONE_PORT: u32 = 16;
/// Where [`POLICY_ONE_PORT`]'s slot is in [`PolicyValue::flags`].
pub const POLICY_ONE_PORT_SLOT_SHIFT: u32 = 24;
/// The bit that marks a [`POLICY_ONE_PORT`] value's `portset` (never an interned port set id,
/// so that no `POLICY_PORTS` entry can ever match it).
pub const PORTSET_ONE_PORT: u32 = 1 << 30;

/// A [`POLICY_ONE_PORT`] value's `portset`: the marker bit, the protocol in bits 16-23, the
/// port (host order) in bits 0-15: what the programs compare with the packet's.
#[inline(always)]
pub const fn one_port_portset(proto: u8, port: u16) -> u32 {
    PORTSET_ONE_PORT | (proto as u32) << 16 | port as u32
}
/// The port set id bit under which a port set's denied ports are (`POLICY_PORTS` entries whose
/// slot is the denying policy's).
pub const PORTSET_DENIED: u32 = 1 << 31;

/// Upper bound on endpoint ids (pods with programs on this node); sizes the counter array.
pub const MAX_ENDPOINTS: u32 = 4096;
/// Counter slots per endpoint: direction (2) x outcome ([`OUTCOMES`]).
pub const COUNTER_SLOTS: u32 = 2 * OUTCOMES;
/// Outcomes per direction in `COUNTERS`: the verdict and, for a dropped packet, why (a
/// [`Count`] each). Which verdict an outcome counts as is [`verdict_of`].
pub const OUTCOMES: u32 = 8;
pub const VERDICT_ALLOW: u32 = 0;
/// Denied by the policy tables (no policy isolating the pod allows it). As an outcome: drop
/// reason `policy`.
pub const VERDICT_DENY: u32 = 1;
/// Denied by an audit-mode policy, let through.
pub const VERDICT_AUDIT: u32 = 2;
/// Sent by a pod with a source address that is not one of its own (anti-spoofing, in
/// `netpol_from_pod`, whatever the policies): dropped.
pub const VERDICT_SPOOFED: u32 = 3;
/// Outcome: denied because the pod fails closed (its entries do not fit the maps:
/// [`EP_FAIL_CLOSED`]); verdict deny.
pub const DROP_FAIL_CLOSED: u32 = 4;
/// Outcome: a truncated or malformed IP packet; verdict deny into a pod, spoofed out of one
/// (its source could not be checked).
pub const DROP_MALFORMED: u32 = 5;
/// Outcome: a frame the programs do not judge (another ethertype, VLAN-tagged) through an
/// isolated direction; verdict deny.
pub const DROP_UNSUPPORTED: u32 = 6;
/// Outcome: a TCP RST of a tracked flow outside the receiver's window; verdict deny.
pub const DROP_TCP_RST: u32 = 7;

/// The verdict (`VERDICT_*`) an outcome of `COUNTERS` counts as, in direction `dir`.
pub const fn verdict_of(outcome: u32, dir: u8) -> u32 {
    match outcome {
        VERDICT_ALLOW | VERDICT_AUDIT | VERDICT_SPOOFED => outcome,
        DROP_MALFORMED if dir == DIR_EGRESS => VERDICT_SPOOFED,
        _ => VERDICT_DENY,
    }
}

/// A `COUNTERS` value: packets and their bytes (the frame's length as TC sees it, `skb->len`,
/// link-layer header included).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// Policies per endpoint and direction that allowed packets are attributed to: the slot is
/// the policy's index in the pod's sorted list of policies isolating it in that direction; the
/// last slot also stands for every later policy.
pub const POLICY_SLOTS: u32 = 16;
/// No policy decided (the direction is not isolated, a node address, an audit pass).
pub const SLOT_NONE: u32 = u32::MAX;
/// [`PolicyValue::flags`] bits 8..16: the slot of the policy allowing everything.
pub const POLICY_SLOT_SHIFT: u32 = 8;

/// Index in `POLICY_COUNTERS` (packets of flows a policy allowed) for an endpoint, the
/// direction of the policy and its slot.
#[inline(always)]
pub const fn policy_counter_index(endpoint: u32, dir: u8, slot: u32) -> u32 {
    (endpoint * 2 + dir as u32) * POLICY_SLOTS + slot
}

/// Index of a counter in `COUNTERS` for an endpoint, direction and outcome.
#[inline(always)]
pub const fn counter_index(endpoint: u32, dir: u8, outcome: u32) -> u32 {
    endpoint * COUNTER_SLOTS + (dir as u32) * OUTCOMES + outcome
}

/// Map names, shared so userspace and the programs cannot drift apart.
pub mod maps;

/// Program names (the function names in netpol-ebpf).
pub mod programs {
    /// Attached at TC ingress of the host veth: enforces the pod's egress.
    pub const FROM_POD: &str = "netpol_from_pod";
    /// Attached at TC egress of the host veth: enforces the pod's ingress.
    pub const TO_POD: &str = "netpol_to_pod";
    /// Returns TC_ACT_OK; used to measure the cost of the test harness itself.
    pub const NOOP: &str = "netpol_noop";
}

pub const ENDPOINTS_MAX: u32 = MAX_ENDPOINTS;
pub const IDENTITIES_MAX: u32 = 262_144;
pub const POLICY_MAX: u32 = 524_288;
pub const POLICY_PORTS_MAX: u32 = 262_144;
pub const CONNTRACK_MAX: u32 = 262_144;
pub const NODE_ADDRS_MAX: u32 = 256;
/// `ENDPOINT_ADDRS`: a pod has one address per family (status.podIPs); room for four each.
pub const ENDPOINT_ADDRS_MAX: u32 = MAX_ENDPOINTS * 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EndpointInfo {
    pub id: u32,
    pub flags: u32,
    /// The pod's IPv4 address (network order; 0.0.0.0: none known). Anti-spoofing compares
    /// an IPv4 packet's source with it first, on data the endpoint lookup already loaded;
    /// every address of the pod (this one too) is also in `ENDPOINT_ADDRS`.
    pub v4: [u8; 4],
}

/// Bytes of [`PodName::bytes`]: a namespace (at most 63) and a pod name (at most 253).
pub const POD_NAME_BYTES: usize = 316;
/// Bytes of [`EndpointName::ifname`] (the kernel's `IFNAMSIZ`).
pub const IFNAME_BYTES: usize = 16;

/// A pod's namespace and name, as the names tables hold them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodName {
    /// Length of the namespace at the start of `bytes`, then of the name after it.
    pub namespace_len: u16,
    pub name_len: u16,
    /// The namespace, then the name, unseparated.
    pub bytes: [u8; POD_NAME_BYTES],
}

/// A value of `ENDPOINT_NAMES` (keyed by ifindex, as `ENDPOINTS`): which pod an endpoint is.
/// Written by the daemon at each sync, read by `netpol-daemon status`; no program reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointName {
    /// The endpoint id the entry was written for (as in `ENDPOINTS`).
    pub id: u32,
    /// The host-side interface's name when the daemon programmed it (NUL-padded).
    pub ifname: [u8; IFNAME_BYTES],
    pub pod: PodName,
}

/// Key of `ENDPOINT_ADDRS`: an address a pod owns (status.podIPs), the sources its packets
/// may carry. A pod's interface with no entry (an interface attached before its pod's IP is
/// known) may send nothing but ARP and IPv6 neighbour discovery.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct EpAddrKey {
    pub endpoint: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network byte order; IPv4 uses the first 4 bytes, the rest is zero.
    pub addr: [u8; 16],
}

/// Data part of the `IDENTITIES` LPM key. The prefix length counts [`ID_KEY_FIXED_BITS`] plus
/// the address prefix bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct IdKey {
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network byte order; IPv4 uses the first 4 bytes, the rest is zero.
    pub addr: [u8; 16],
}
pub const ID_KEY_FIXED_BITS: u32 = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint: u32,
    pub identity: u32,
    pub dir: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyValue {
    pub portset: u32,
    pub flags: u32,
}

impl PolicyValue {
    /// Whether the value refers to an interned port set (its `POLICY_PORTS` entries).
    pub const fn uses_port_set(&self) -> bool {
        self.flags & (POLICY_ALLOW_ALL | POLICY_ONE_PORT) == 0
    }

    /// The inline port of a [`POLICY_ONE_PORT`] value: (protocol, port, slot).
    pub const fn one_port(&self) -> Option<(u8, u16, u32)> {
        if self.flags & POLICY_ONE_PORT == 0 {
            return None;
        }
        Some(((self.portset >> 16) as u8, self.portset as u16, self.flags >> POLICY_ONE_PORT_SLOT_SHIFT))
    }
}

/// Data part of the `POLICY_PORTS` LPM key. The prefix length counts [`PORT_KEY_FIXED_BITS`]
/// plus the port prefix bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PortKey {
    pub portset: u32,
    pub proto: u8,
    pub _pad: u8,
    /// Network byte order.
    pub port: [u8; 2],
}
pub const PORT_KEY_FIXED_BITS: u32 = 48;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortValue {
    /// Slot of the policy that allows these ports (see [`POLICY_SLOTS`]).
    pub slot: u32,
}

/// Conntrack key: the packet's own tuple as seen by `endpoint` in direction `dir`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub endpoint: u32,
    pub dir: u8,
    pub proto: u8,
    pub family: u8,
    pub _pad: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

pub const CT_TCP_FIN_SEEN: u32 = 1;
/// The entry was created at ingress by a frame the endpoint itself had just sent (an entry of
/// the same tuple in the egress direction existed: a hairpin). Such an entry never vouches
/// for the endpoint's packets the other way as replies (unless source and destination address
/// are the same, the pod talking to itself): otherwise a pod could forge a "reply"
/// `X:80 -> itself:P` that its open ingress tracks, and then send `P -> X:80` through its
/// isolated egress as a reply.
pub const CT_HAIRPIN: u32 = 2;
/// [`CtValue::seq`] / [`CtValue::ack`] of side 0 (the side whose packet created the entry)
/// and side 1 hold a value (side 1's bit is side 0's shifted left by one: the programs rely on it).
pub const CT_SEQ0: u32 = 4;
pub const CT_SEQ1: u32 = 8;
pub const CT_ACK0: u32 = 16;
pub const CT_ACK1: u32 = 32;

/// RSTs are honoured (the entry deleted) only when their sequence number lies within this
/// many bytes after the receiver's last seen acknowledgement (or before it by
/// [`CT_RST_WINDOW_BEHIND`]); see netpol-ebpf/src/conntrack.rs.
pub const CT_RST_WINDOW_AHEAD: u32 = 1 << 20;
pub const CT_RST_WINDOW_BEHIND: u32 = 1 << 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    pub last_seen_ns: u64,
    pub flags: u32,
    /// Slot of the policy (of the entry's endpoint, in the entry's direction) that allowed the
    /// flow, or [`SLOT_NONE`]: the flow's packets, both ways, count in `POLICY_COUNTERS`.
    pub policy: u32,
    /// TCP: the last sequence number seen from side 0 (the entry key's source) and side 1,
    /// on the conntrack path (the flow cache sends a packet of each flow there at least once
    /// per `flow_cache_ticks`).
    pub seq: [u32; 2],
    /// TCP: the last acknowledgement number seen from each side (packets with ACK).
    pub ack: [u32; 2],
}

/// The [`CtValue`] layout before the TCP sequence state (pinned as `CONNTRACK`), read once
/// to migrate its entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValueV1 {
    pub last_seen_ns: u64,
    pub flags: u32,
    pub policy: u32,
}

/// A fragmented datagram whose first fragment was judged: its later fragments (which carry no
/// L4 header) follow its verdict ([`FRAG_ALLOWED`], [`FRAG_DENIED`]). Keyed by the IP
/// identification.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub endpoint: u32,
    pub id: u32,
    pub dir: u8,
    pub proto: u8,
    pub family: u8,
    pub _pad: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

pub const FRAGS_MAX: u32 = 16_384;
/// `FRAGS` values: the datagram's first fragment was allowed / denied.
pub const FRAG_ALLOWED: u32 = 1;
pub const FRAG_DENIED: u32 = 2;

/// Key of `NODE_ADDRS`: the node's own addresses, always allowed into local pods.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct AddrKey {
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// Runtime settings written by the daemon into `CONFIG[0]`. Zero fields mean the defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Config {
    pub ct_tcp_ns: u64,
    pub ct_tcp_closing_ns: u64,
    pub ct_udp_ns: u64,
    pub ct_other_ns: u64,
    /// Unused: was the deny-event rate, which now lives in `EVENT_CONFIG` ([`EventConfig`],
    /// changed at run time by the daemon alone). Kept so that a pinned `CONFIG` keeps its layout.
    pub _reserved: u32,
    /// How long (in kernel ticks, `jiffies`) a flow-cache entry vouches for its flow before
    /// the packet goes to the conntrack table again; 0: the flow cache is off. The daemon sets
    /// it (see `flow_cache_ticks`), never the user: at most the shortest timeout / 20 ms
    /// ticks, so with HZ >= 100 it never outlives half the shortest conntrack timeout.
    pub flow_cache_ticks: u32,
}

/// `flow_cache_ticks` for conntrack timeouts `c` (0 fields: the defaults): at most 100 ticks
/// (0.1 s at HZ=1000, 1 s at HZ=100), and never more ticks than the shortest timeout has
/// 20 ms periods, so that a cached flow is looked up in the conntrack table again well before
/// its entry could have expired there (with HZ >= 100: within half the timeout; the coarse
/// clocks on both sides are a tick apart at most). Below 20 ms the cache is off.
pub fn flow_cache_ticks(c: &Config) -> u32 {
    let or = |v: u64, d: u64| if v == 0 { d } else { v };
    let shortest = or(c.ct_tcp_ns, CT_TIMEOUT_TCP_NS)
        .min(or(c.ct_tcp_closing_ns, CT_TIMEOUT_TCP_CLOSING_NS))
        .min(or(c.ct_udp_ns, CT_TIMEOUT_UDP_NS))
        .min(or(c.ct_other_ns, CT_TIMEOUT_OTHER_NS));
    (shortest / 20_000_000).min(100) as u32
}

/// A per-CPU flow-cache slot (`FLOW_CACHE`, direct-mapped by a hash of the key): a packet
/// whose own conntrack key is here, stored less than `flow_cache_ticks` ago under the
/// endpoint's current `FLOW_EPOCH`, continues its flow without a conntrack lookup. Written
/// after a conntrack hit and when an entry is created; anything that ends flows of an endpoint (a TCP RST, a port
/// re-used after FIN, the daemon cutting flows) bumps the endpoint's epoch, which voids its
/// slots on every CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowCacheEntry {
    pub key: CtKey,
    pub epoch: u32,
    /// `jiffies` when the conntrack table last confirmed the flow.
    pub at: u64,
    /// The tracked flow: the policy slot and direction it was allowed in.
    pub slot: u32,
    pub dir: u8,
    /// 1 once written (a zeroed slot matches nothing).
    pub live: u8,
    pub _pad: [u8; 2],
}

/// `BPF_F_MMAPABLE`: the daemon maps `FLOW_EPOCH` into its memory to increment it atomically.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Slots of `FLOW_CACHE` per CPU (a power of two; 64 bytes each: 256 KiB per CPU).
pub const FLOW_CACHE_SLOTS: u32 = 4096;

/// `EVENT_CONFIG[0]`: which flow events the programs send through `EVENTS`, and how many. The
/// daemon writes it at run time (`--log-denied`, and what `observe` clients ask for); all zero
/// (the state before the daemon writes it): none.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EventConfig {
    /// Events per second and CPU (one token bucket per CPU for every kind); 0: none.
    pub per_sec: u32,
    /// Which verdicts are sent: `EVENTS_*` bits.
    pub verdicts: u32,
}

/// [`EventConfig::verdicts`]: dropped packets, whatever the reason (policy, spoofed, ...).
pub const EVENTS_DENIED: u32 = 1;
/// Packets an audit-mode policy would have dropped (they pass).
pub const EVENTS_AUDIT: u32 = 2;
/// The first packet of every newly tracked flow (where conntrack creates the entry), never
/// the packets of established flows.
pub const EVENTS_ALLOWED: u32 = 4;

/// The `EVENTS_*` bit an outcome (`VERDICT_*` or `DROP_*`) is sent under.
pub const fn event_kind(outcome: u32) -> u32 {
    match outcome {
        VERDICT_ALLOW => EVENTS_ALLOWED,
        VERDICT_AUDIT => EVENTS_AUDIT,
        _ => EVENTS_DENIED,
    }
}

/// [`FlowEvent::flags`]: the direction was isolated when the packet was decided.
pub const FLOW_ISOLATED: u8 = 1;
/// [`FlowEvent::flags`]: the packet was not read as IP (another ethertype, a VLAN tag, or
/// truncated): no addresses.
pub const FLOW_NOT_IP: u8 = 2;

/// One decided packet, sent through the `EVENTS` ring buffer: a dropped or audited packet, or
/// the first packet of a newly allowed flow. Written in place in the ring buffer (no copy on
/// the programs' stack).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowEvent {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) when the packet was decided.
    pub ktime_ns: u64,
    pub endpoint: u32,
    /// The slot of the policy (of `endpoint`, in `dir`) that allowed the flow, or
    /// [`SLOT_NONE`] (as `POLICY_COUNTERS` counts it).
    pub slot: u32,
    pub dir: u8,
    pub proto: u8,
    /// `FAMILY_V4`, `FAMILY_V6`, or 0 with [`FLOW_NOT_IP`].
    pub family: u8,
    /// What happened: a `COUNTERS` outcome (`VERDICT_ALLOW`, `VERDICT_AUDIT`, or a drop's
    /// reason: `VERDICT_DENY`, `VERDICT_SPOOFED`, `DROP_*`).
    pub outcome: u8,
    /// `FLOW_*` bits.
    pub flags: u8,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub _pad: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// The frame's length at TC (`skb->len`).
    pub len: u32,
}

/// Per-CPU token bucket for flow events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RateState {
    pub window_start_ns: u64,
    pub sent: u32,
    pub _pad: u32,
}

pub const EVENTS_BYTES: u32 = 256 * 1024;

/// `EVENT_DROPS` indexes: flow events held back by the per-CPU rate limit, and those the ring
/// buffer had no room for (the daemon reading too slowly).
pub const EVENT_DROP_RATE: u32 = 0;
pub const EVENT_DROP_FULL: u32 = 1;

/// Conntrack idle timeouts (nanoseconds).
pub const CT_TIMEOUT_TCP_NS: u64 = 7_200 * 1_000_000_000;
pub const CT_TIMEOUT_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_TIMEOUT_UDP_NS: u64 = 120 * 1_000_000_000;
pub const CT_TIMEOUT_OTHER_NS: u64 = 60 * 1_000_000_000;

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for IdKey {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PortValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for CtValueV1 {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for EpAddrKey {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for EventConfig {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for Count {}
    unsafe impl aya::Pod for EndpointName {}
    unsafe impl aya::Pod for PodName {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_cache_lifetime_stays_within_half_the_shortest_timeout() {
        // Defaults: the shortest is 10 s (TCP after FIN): capped at 100 ticks (<= 1 s).
        assert_eq!(flow_cache_ticks(&Config::default()), 100);
        // 400 ms: 20 ticks, 200 ms at HZ=100 (the slowest tick there is).
        assert_eq!(flow_cache_ticks(&Config { ct_udp_ns: 400_000_000, ..Default::default() }), 20);
        // Any timeout shorter than 20 ms turns the cache off.
        assert_eq!(flow_cache_ticks(&Config { ct_other_ns: 19_999_999, ..Default::default() }), 0);
        assert_eq!(flow_cache_ticks(&Config { ct_tcp_closing_ns: 1, ..Default::default() }), 0);
        for ns in [20_000_000u64, 33_000_000, 1_000_000_000, 1_999_999_999] {
            let t = flow_cache_ticks(&Config { ct_tcp_ns: ns, ..Default::default() }) as u64;
            assert!(t * 10_000_000 * 2 <= ns, "{t} ticks for {ns} ns");
        }
    }

    #[test]
    fn shared_layouts_have_no_implicit_padding() {
        // The flow cache compares keys word by word and the programs read them as words.
        assert_eq!(core::mem::size_of::<CtKey>(), 44);
        assert_eq!(core::mem::size_of::<FlowCacheEntry>(), 64);
        assert_eq!(core::mem::align_of::<FlowCacheEntry>(), 8);
        assert_eq!(core::mem::size_of::<Config>(), 40);
        assert_eq!(core::mem::size_of::<CtValue>(), 32);
        assert_eq!(core::mem::size_of::<CtValueV1>(), 16);

        assert_eq!(core::mem::size_of::<EndpointInfo>(), 12);
        assert_eq!(core::mem::size_of::<EpAddrKey>(), 24);
        assert_eq!(core::mem::size_of::<Count>(), 16);
        assert_eq!(core::mem::size_of::<PodName>(), 320);
        assert_eq!(core::mem::size_of::<EndpointName>(), 340);
        // Reserved in the ring buffer as is (8-aligned records).
        assert_eq!(core::mem::size_of::<FlowEvent>(), 64);
        assert_eq!(core::mem::align_of::<FlowEvent>(), 8);
        assert_eq!(core::mem::size_of::<EventConfig>(), 8);
    }

    #[test]
    fn every_outcome_has_one_verdict_and_malformed_egress_counts_as_spoofed() {
        assert_eq!(verdict_of(VERDICT_ALLOW, DIR_EGRESS), VERDICT_ALLOW);
        assert_eq!(verdict_of(VERDICT_AUDIT, DIR_INGRESS), VERDICT_AUDIT);
        assert_eq!(verdict_of(VERDICT_SPOOFED, DIR_EGRESS), VERDICT_SPOOFED);
        assert_eq!(verdict_of(DROP_MALFORMED, DIR_EGRESS), VERDICT_SPOOFED);
        assert_eq!(verdict_of(DROP_MALFORMED, DIR_INGRESS), VERDICT_DENY);
        for o in [VERDICT_DENY, DROP_FAIL_CLOSED, DROP_UNSUPPORTED, DROP_TCP_RST] {
            assert_eq!(verdict_of(o, DIR_INGRESS), VERDICT_DENY);
            assert_eq!(verdict_of(o, DIR_EGRESS), VERDICT_DENY);
        }
        // The outcomes of both directions of every endpoint fit its slots, without overlap.
        assert_eq!(counter_index(1, DIR_INGRESS, 0), COUNTER_SLOTS);
        assert_eq!(counter_index(0, DIR_EGRESS, OUTCOMES - 1), COUNTER_SLOTS - 1);
        // Flow events: every drop reason is sent as a denial.
        assert_eq!(event_kind(VERDICT_ALLOW), EVENTS_ALLOWED);
        assert_eq!(event_kind(VERDICT_AUDIT), EVENTS_AUDIT);
        for o in [VERDICT_DENY, VERDICT_SPOOFED, DROP_FAIL_CLOSED, DROP_MALFORMED, DROP_UNSUPPORTED, DROP_TCP_RST] {
            assert_eq!(event_kind(o), EVENTS_DENIED);
        }
    }
}

//! Map names, shared so userspace and the programs cannot drift apart (the pins carry them).

pub const ENDPOINTS: &str = "ENDPOINTS";
pub const ENDPOINTS_ARRAY: &str = "ENDPOINTS_ARRAY";
pub const IDENTITIES: &str = "IDENTITIES";
/// Renamed from `POLICY` when its values gained [`POLICY_ONE_PORT`](crate::POLICY_ONE_PORT)
/// (same layout, a new meaning): a program of an older daemon, still attached until the
/// first sync replaces it, keeps reading the old map, which this daemon copies here at
/// load and never writes ([`POLICY_V1`]), so it never reads a value it misunderstands.
pub const POLICY: &str = "POLICY2";
/// The pin of the previous encoding, copied and removed at load.
pub const POLICY_V1: &str = "POLICY";
pub const POLICY_PORTS: &str = "POLICY_PORTS";
/// Renamed from `CONNTRACK` when [`CtValue`](crate::CtValue) grew the TCP sequence
/// state: a pinned map keeps its layout, so a restarted daemon gets a new map under the
/// new name and migrates the entries of the old one ([`CONNTRACK_V1`]).
pub const CONNTRACK: &str = "CONNTRACK2";
/// The pin of the previous layout (`CtValue` of 16 bytes), migrated and removed at load.
pub const CONNTRACK_V1: &str = "CONNTRACK";
pub const NODE_ADDRS: &str = "NODE_ADDRS";
pub const FRAGS: &str = "FRAGS";
/// Per endpoint and direction (`endpoint * 2 + dir`): later fragments dropped because
/// their first fragment had not been seen.
pub const FRAG_EARLY: &str = "FRAG_EARLY";
pub const CONFIG: &str = "CONFIG";
pub const EVENTS: &str = "EVENTS";
/// [`EventConfig`](crate::EventConfig): which flow events are sent, how many.
pub const EVENT_CONFIG: &str = "EVENT_CONFIG";
pub const EVENT_RATE: &str = "EVENT_RATE";
/// Per CPU: flow events not sent, [`EVENT_DROP_RATE`](crate::EVENT_DROP_RATE) over the
/// rate limit and [`EVENT_DROP_FULL`](crate::EVENT_DROP_FULL) with the ring buffer full.
pub const EVENT_DROPS: &str = "EVENT_DROPS";
pub const COUNTERS: &str = "COUNTERS";
pub const POLICY_COUNTERS: &str = "POLICY_COUNTERS";
/// Per CPU, per endpoint, direction and policy slot: packets a cluster policy's rule
/// denied (indexed as `POLICY_COUNTERS`).
pub const POLICY_DENY_COUNTERS: &str = "POLICY_DENY_COUNTERS";
pub const FLOW_CACHE: &str = "FLOW_CACHE";
pub const FLOW_EPOCH: &str = "FLOW_EPOCH";
pub const ENDPOINT_ADDRS: &str = "ENDPOINT_ADDRS";
/// Userspace only (the programs never read it; the daemon creates it beside the others):
/// per ifindex in `ENDPOINTS`, the pod and interface the daemon programmed it for
/// ([`EndpointName`](crate::EndpointName)), so that `netpol-daemon status` can name the
/// endpoints from the pins alone.
pub const ENDPOINT_NAMES: &str = "ENDPOINT_NAMES";
/// Userspace only, as `ENDPOINT_NAMES`: per address that is a class of its own in
/// `IDENTITIES` (a host prefix) and a pod's, which pod ([`PodName`](crate::PodName),
/// keyed by [`AddrKey`](crate::AddrKey)), so that `status` names the peers of the rules.
pub const PEER_NAMES: &str = "PEER_NAMES";

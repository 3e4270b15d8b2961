//! Flow events, as `netpol-daemon observe` and the deny log see them. The programs send a
//! [`FlowEvent`] for every dropped or audited packet and for the first packet of every newly
//! tracked flow, as far as `EVENT_CONFIG` asks for them ([`hub`] sets it: `--log-denied`, and
//! the verdicts and rate the connected clients ask for); the [`reader`] thread (always running)
//! turns each into a [`Flow`]: the local pod and the peer named (the peer from the cluster's pod
//! addresses, the [`directory`], kept while a client watches), the deciding policy named from
//! the pod's policy slots (as `netpol_policy_allowed_packets_total` counts them), then logs
//! denials (`--log-denied`) and hands it to the [`hub`], which streams it to every client whose
//! filter matches (`GET /v1/flows`, [`stream`]). [`render`] writes a flow as text or JSON.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use netpol_common::*;
use serde::{Deserialize, Serialize};

use super::status::Status;
use crate::model::cidr::addr_from_bytes;
use crate::model::{ObjKey, Protocol};

pub mod directory;
pub mod hub;
pub mod reader;
pub mod render;
pub mod stream;

pub use directory::Directory;
pub use hub::{Filter, FlowHub};

/// What happened to a flow's packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowVerdict {
    /// The first packet of a newly tracked flow: allowed.
    Allowed,
    /// Dropped (`reason` says why).
    Denied,
    /// An audit-mode policy would have dropped it; it passed.
    Audit,
}

impl FlowVerdict {
    pub const ALL: [FlowVerdict; 3] = [FlowVerdict::Allowed, FlowVerdict::Denied, FlowVerdict::Audit];

    pub fn as_str(self) -> &'static str {
        match self {
            FlowVerdict::Allowed => "allowed",
            FlowVerdict::Denied => "denied",
            FlowVerdict::Audit => "audit",
        }
    }

    pub fn parse(s: &str) -> Option<FlowVerdict> {
        FlowVerdict::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The `EVENTS_*` bit the programs send it under.
    pub fn event_bit(self) -> u32 {
        match self {
            FlowVerdict::Allowed => EVENTS_ALLOWED,
            FlowVerdict::Denied => EVENTS_DENIED,
            FlowVerdict::Audit => EVENTS_AUDIT,
        }
    }
}

/// Why an allowed packet needed no policy: its direction is not isolated.
pub const REASON_NOT_ISOLATED: &str = "not-isolated";
/// Why an allowed packet needed no policy: it came into the pod from one of the node's
/// addresses (kubelet's probes).
pub const REASON_NODE: &str = "node-address";
/// Allowed by a policy, or (denied, audit) by the policies' default deny.
pub const REASON_POLICY: &str = "policy";

/// One decided packet, named. Its JSON form (one object per line on `/v1/flows` and from
/// `observe -o json`) has exactly these fields, always present (`null` where unknown).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// When the packet was decided: RFC 3339, UTC, microseconds.
    pub time: String,
    pub node: String,
    /// The local pod (NS/POD) whose interface decided it.
    pub pod: String,
    /// `ingress` (into the pod) or `egress` (out of it).
    pub direction: String,
    pub verdict: FlowVerdict,
    /// Denied: `policy`, `fail-closed`, `spoofed`, `malformed`, `unsupported`, `tcp-rst-window`
    /// (the `reason` of `netpol_dropped_packets_total`); audit: `policy`; allowed: `policy`,
    /// `not-isolated`, `node-address`.
    pub reason: String,
    /// The policy (NS/NAME) that allowed the flow, when one had to.
    pub policy: Option<String>,
    /// Denied or audited by the default deny: the policies that isolate the pod.
    pub isolated_by: Vec<String>,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, another IP protocol's number, or `null` for a
    /// frame that is not IP.
    pub protocol: Option<String>,
    pub src: Option<String>,
    pub src_port: Option<u16>,
    pub dst: Option<String>,
    pub dst_port: Option<u16>,
    /// The other end (the source into the pod, the destination out of it) as NS/POD, when it
    /// is a pod's address.
    pub peer: Option<String>,
    /// TCP: the packet's flags (`SYN`, `SYN|ACK`, ...).
    pub tcp_flags: Option<String>,
    /// ICMP, ICMPv6: the message type.
    pub icmp_type: Option<u8>,
    /// The frame's length at TC.
    pub bytes: u32,
}

/// What names an event's endpoint and policy slot: the last sync's status, indexed.
#[derive(Default)]
pub struct Names {
    pub node: String,
    endpoints: BTreeMap<u32, ObjKey>,
    /// Per endpoint and direction: the labels of its policy slots.
    slots: BTreeMap<(u32, u8), Vec<String>>,
    /// Per pod and direction: the policies isolating it.
    isolated_by: BTreeMap<(ObjKey, u8), Vec<ObjKey>>,
}

impl Names {
    pub fn new(node: &str, s: &Status) -> Names {
        let dir = |d: &str| if d == "ingress" { DIR_INGRESS } else { DIR_EGRESS };
        Names {
            node: node.to_string(),
            endpoints: s.endpoints.iter().cloned().collect(),
            slots: s.policy_slots.iter().map(|(id, _, d, labels)| ((*id, *d), labels.clone())).collect(),
            isolated_by: s.isolated_by.iter().map(|(k, d, p)| ((k.clone(), dir(d)), p.clone())).collect(),
        }
    }
}

/// `FIN|SYN|RST|PSH|ACK|URG` as set in `flags`.
fn tcp_flag_names(flags: u8) -> String {
    let names = [(0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"), (0x20, "URG")];
    let set: Vec<&str> = names.iter().filter(|(b, _)| flags & b != 0).map(|(_, n)| *n).collect();
    if set.is_empty() {
        "none".to_string()
    } else {
        set.join("|")
    }
}

/// The reason label of a drop outcome, as `netpol_dropped_packets_total` has it.
fn drop_reason(outcome: u32) -> &'static str {
    super::DROP_REASONS.iter().find(|(o, _)| *o == outcome).map_or("policy", |(_, r)| *r)
}

impl Flow {
    /// The event `ev`, decided at `time`, named: its pod and policy from `names`, the peer
    /// through `peer_of` (an address to NS/POD).
    pub fn from_event(ev: &FlowEvent, time: SystemTime, names: &Names, peer_of: impl Fn(IpAddr) -> Option<String>) -> Flow {
        let outcome = ev.outcome as u32;
        let key = names.endpoints.get(&ev.endpoint);
        let dir = ev.dir & 1;
        let verdict = match outcome {
            VERDICT_ALLOW => FlowVerdict::Allowed,
            VERDICT_AUDIT => FlowVerdict::Audit,
            _ => FlowVerdict::Denied,
        };
        let policy = key.and_then(|k| {
            let labels = names.slots.get(&(ev.endpoint, dir))?;
            // A cluster policy (`Admin:NAME`) is no namespace's.
            labels.get(ev.slot as usize).map(|l| if l.contains(':') { l.clone() } else { format!("{}/{l}", k.namespace) })
        });
        let reason = match verdict {
            FlowVerdict::Denied => drop_reason(outcome),
            FlowVerdict::Audit => REASON_POLICY,
            FlowVerdict::Allowed if ev.slot != SLOT_NONE => REASON_POLICY,
            FlowVerdict::Allowed if ev.flags & FLOW_ISOLATED != 0 => REASON_NODE,
            FlowVerdict::Allowed => REASON_NOT_ISOLATED,
        };
        // What a default deny comes from (also a pod failing closed).
        let by_default_deny = verdict != FlowVerdict::Allowed && matches!(reason, REASON_POLICY | "fail-closed");
        let isolated_by = match (key, by_default_deny) {
            (Some(k), true) => names.isolated_by.get(&(k.clone(), dir)).map(|ps| ps.iter().map(|p| p.to_string()).collect()),
            _ => None,
        };
        let ip = ev.flags & FLOW_NOT_IP == 0;
        let ports = ip && matches!(ev.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP);
        let (src, dst) = (addr_from_bytes(ev.family, ev.src), addr_from_bytes(ev.family, ev.dst));
        let peer = if !ip {
            None
        } else if dir == DIR_INGRESS {
            peer_of(src)
        } else {
            peer_of(dst)
        };
        Flow {
            time: render::rfc3339(time),
            node: names.node.clone(),
            pod: key.map_or_else(|| format!("endpoint-{}", ev.endpoint), |k| k.to_string()),
            direction: if dir == DIR_INGRESS { "ingress" } else { "egress" }.to_string(),
            verdict,
            reason: reason.to_string(),
            policy,
            isolated_by: isolated_by.unwrap_or_default(),
            protocol: ip.then(|| Protocol::ip_name(ev.proto).map_or_else(|| ev.proto.to_string(), str::to_string)),
            src: ip.then(|| src.to_string()),
            src_port: ports.then_some(ev.sport),
            dst: ip.then(|| dst.to_string()),
            dst_port: ports.then_some(ev.dport),
            peer,
            tcp_flags: (ip && ev.proto == PROTO_TCP).then(|| tcp_flag_names(ev.tcp_flags)),
            icmp_type: (ip && matches!(ev.proto, PROTO_ICMP | PROTO_ICMPV6)).then_some(ev.icmp_type),
            bytes: ev.len,
        }
    }
}

#[cfg(test)]
mod tests;

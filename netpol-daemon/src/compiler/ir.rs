//! What the compiler produces: one node's compiled policy ([`NodePolicy`]): the address
//! classes, the longest-prefix table from address to class, and per pod and direction the
//! ports each class may use ([`DirPolicy`]). Also the lookups over it that mirror the
//! datapath's (class of an address, verdict of a packet), used by tests, `explain` and the
//! map translation in `entries`.
use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::model::*;
use ipnet::IpNet;

/// Slot of the policy that allowed a port or class: its index in the pod's
/// [`DirPolicy::policies`] for that direction, capped at `POLICY_SLOTS - 1` (which then stands
/// for "that policy or a later one"). Used only to attribute allowed packets in the counters.
pub type Slot = u8;

/// The slot a policy at `index` in a pod's policy list gets.
pub fn slot_of(index: usize) -> Slot {
    index.min(netpol_common::POLICY_SLOTS as usize - 1) as Slot
}

/// One run of allowed ports and the slot of a policy that allows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
    pub slot: Slot,
}

/// Allowed ports: per protocol, sorted disjoint inclusive ranges, each attributed to the
/// lowest slot of the policies whose rules allow it (adjacent ranges merge when their slots
/// agree).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSet {
    ranges: BTreeMap<Protocol, Vec<PortRange>>,
    /// Every packet of another protocol than TCP, UDP and SCTP (ICMP...) too, by the policy in
    /// the slot. Only the cluster tiers leave that open beside ports (a NetworkPolicy rule
    /// allows all traffic or ports).
    other: Option<Slot>,
    /// Ports a cluster policy rule denies, with that policy's slot; and the other protocols,
    /// when one denies them. For the deny counters only: what `ranges` does not allow is
    /// denied whether it is here or not.
    denied: BTreeMap<Protocol, Vec<PortRange>>,
    denied_other: Option<Slot>,
}

impl PortSet {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && self.other.is_none()
    }

    /// The slot allowing other protocols than TCP, UDP and SCTP, if they are allowed.
    pub fn other(&self) -> Option<Slot> {
        self.other
    }

    /// Allows other protocols than TCP, UDP and SCTP by the policy in `slot` (the lower slot
    /// keeps them).
    pub fn add_other(&mut self, slot: Slot) {
        self.other = Some(self.other.map_or(slot, |s| s.min(slot)));
    }

    /// The same ports without the other protocols (what the POLICY_PORTS entries hold, under
    /// the set's id and, for the denied ports, its id with `PORTSET_DENIED`).
    pub fn ports_only(&self) -> PortSet {
        PortSet { ranges: self.ranges.clone(), other: None, denied: self.denied.clone(), denied_other: None }
    }

    /// Notes `lo..=hi` as denied by the cluster policy in `slot` (the lower slot keeps them).
    pub fn add_denied(&mut self, proto: Protocol, lo: u16, hi: u16, slot: Slot) {
        add_range(self.denied.entry(proto).or_default(), lo, hi, slot);
    }

    /// Notes the other protocols as denied by the cluster policy in `slot`.
    pub fn add_denied_other(&mut self, slot: Slot) {
        self.denied_other = Some(self.denied_other.map_or(slot, |s| s.min(slot)));
    }

    /// The slot of the cluster policy that denies `port`, if one does.
    pub fn denied_slot(&self, proto: Protocol, port: u16) -> Option<Slot> {
        let rs = self.denied.get(&proto)?;
        let i = rs.partition_point(|r| r.hi < port);
        (i < rs.len() && rs[i].lo <= port).then(|| rs[i].slot)
    }

    pub fn denied_other(&self) -> Option<Slot> {
        self.denied_other
    }

    /// Does a cluster policy deny some ports (their drops are attributed by a second lookup)?
    pub fn has_denies(&self) -> bool {
        !self.denied.is_empty()
    }

    pub fn iter_denied(&self) -> impl Iterator<Item = (Protocol, &[PortRange])> {
        self.denied.iter().map(|(p, r)| (*p, r.as_slice()))
    }

    /// Adds `lo..=hi` attributed to slot 0.
    pub fn add(&mut self, proto: Protocol, lo: u16, hi: u16) {
        self.add_from(proto, lo, hi, 0);
    }

    /// Adds `lo..=hi` allowed by the policy in `slot`; where the set already has ports, the
    /// lower slot keeps them.
    pub fn add_from(&mut self, proto: Protocol, lo: u16, hi: u16, slot: Slot) {
        add_range(self.ranges.entry(proto).or_default(), lo, hi, slot);
    }

    pub fn union(&mut self, other: &PortSet) {
        for (p, rs) in &other.denied {
            for r in rs {
                self.add_denied(*p, r.lo, r.hi, r.slot);
            }
        }
        if let Some(s) = other.denied_other {
            self.add_denied_other(s);
        }
        for (p, rs) in &other.ranges {
            for r in rs {
                self.add_from(*p, r.lo, r.hi, r.slot);
            }
        }
        if let Some(s) = other.other {
            self.add_other(s);
        }
    }

    /// The slot of the policy allowing `port`, if allowed.
    pub fn slot(&self, proto: Protocol, port: u16) -> Option<Slot> {
        let rs = self.ranges.get(&proto)?;
        let i = rs.partition_point(|r| r.hi < port);
        (i < rs.len() && rs[i].lo <= port).then(|| rs[i].slot)
    }

    pub fn contains(&self, proto: Protocol, port: u16) -> bool {
        self.slot(proto, port).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Protocol, &[PortRange])> {
        self.ranges.iter().map(|(p, r)| (*p, r.as_slice()))
    }
}

/// Adds `lo..=hi` with `slot` to sorted disjoint ranges; where they already have ports, the
/// lower slot keeps them (adjacent ranges of one slot merge).
fn add_range(v: &mut Vec<PortRange>, lo: u16, hi: u16, slot: Slot) {
    let (lo32, hi32) = (lo as u32, hi as u32);
    let mut out: Vec<PortRange> = Vec::with_capacity(v.len() + 3);
    // Next port of lo..=hi not yet emitted.
    let mut next = lo32;
    for r in v.iter() {
        let (a, b) = (r.lo as u32, r.hi as u32);
        if b < lo32 || a > hi32 {
            out.push(*r);
            continue;
        }
        if a < lo32 {
            out.push(PortRange { lo: r.lo, hi: lo - 1, slot: r.slot });
        }
        if next < a {
            out.push(PortRange { lo: next as u16, hi: (a - 1) as u16, slot });
        }
        let (s, e) = (a.max(lo32), b.min(hi32));
        out.push(PortRange { lo: s as u16, hi: e as u16, slot: r.slot.min(slot) });
        if b > hi32 {
            out.push(PortRange { lo: hi + 1, hi: r.hi, slot: r.slot });
        }
        next = e + 1;
    }
    if next <= hi32 {
        out.push(PortRange { lo: next as u16, hi, slot });
    }
    out.sort_unstable();
    let mut merged: Vec<PortRange> = Vec::with_capacity(out.len());
    for r in out {
        match merged.last_mut() {
            Some(last) if last.slot == r.slot && r.lo as u32 == last.hi as u32 + 1 => last.hi = r.hi,
            _ => merged.push(r),
        }
    }
    *v = merged;
}

/// What a prefix allows.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Allow {
    /// Every protocol and port (a rule without `ports`), by the policy in the slot.
    All(Slot),
    Ports(PortSet),
}

impl Allow {
    pub fn nothing() -> Allow {
        Allow::Ports(PortSet::default())
    }

    pub fn is_nothing(&self) -> bool {
        matches!(self, Allow::Ports(p) if p.is_empty())
    }

    pub fn is_all(&self) -> bool {
        matches!(self, Allow::All(_))
    }

    pub(super) fn union(&mut self, other: &Allow) {
        match (&mut *self, other) {
            (Allow::All(a), Allow::All(b)) => *a = (*a).min(*b),
            (Allow::All(_), _) => {}
            (_, Allow::All(b)) => *self = Allow::All(*b),
            (Allow::Ports(a), Allow::Ports(b)) => a.union(b),
        }
    }

    /// The slot of a policy that allows the packet, if one does. `proto` is an IP protocol
    /// number, `port` the destination port when the packet has one.
    pub fn decides(&self, proto: u8, port: Option<u16>) -> Option<Slot> {
        match self {
            Allow::All(s) => Some(*s),
            Allow::Ports(ps) => match Protocol::from_number(proto) {
                Some(p) => port.and_then(|port| ps.slot(p, port)),
                None => ps.other,
            },
        }
    }

    pub fn permits(&self, proto: u8, port: Option<u16>) -> bool {
        self.decides(proto, port).is_some()
    }

    /// The slot of the cluster policy that denies the packet, if it is denied by one.
    pub fn denied_by(&self, proto: u8, port: Option<u16>) -> Option<Slot> {
        match self {
            Allow::All(_) => None,
            Allow::Ports(ps) => match Protocol::from_number(proto) {
                Some(p) => port.and_then(|port| ps.denied_slot(p, port)),
                None => ps.denied_other(),
            },
        }
    }
}

/// Identifies one rule: policy, direction, index in the policy's rule list.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub policy: ObjKey,
    pub dir: Direction,
    pub index: usize,
}

/// Identifies one ClusterNetworkPolicy rule: policy name, direction, index in its list.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterRuleRef {
    pub policy: String,
    pub dir: Direction,
    pub index: usize,
}

/// What all addresses of a class have in common. The empty key is the class of addresses no
/// rule names (identity 0 in the datapath).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassKey {
    /// Rules with explicit peers whose peers contain the addresses.
    pub rules: Vec<RuleRef>,
    /// ClusterNetworkPolicy rules whose peers contain the addresses, sorted.
    pub cluster_rules: Vec<ClusterRuleRef>,
    /// The container ports of the pod owning the address, when an egress rule with a named
    /// port covers it: (name, protocol, port), sorted.
    pub ports: Vec<(String, Protocol, u16)>,
    /// The service whose cluster IP this is. Egress to it is decided by its backends (what
    /// kube-proxy will DNAT it to), not by rules naming the cluster IP as an address; as a
    /// source (ingress) it is matched like any address.
    pub service: Option<ObjKey>,
}

/// The compiled policy of one pod in one direction in which it is isolated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirPolicy {
    /// Class index -> what it may send/receive. A class without an entry gets class 0's
    /// entry (what the rules without peer restriction allow), or nothing.
    pub allows: BTreeMap<usize, Allow>,
    /// The policies that isolate the pod in this direction.
    pub policies: Vec<ObjKey>,
    /// Only audit-mode policies isolate the pod in this direction: what `allows` denies
    /// passes, counted and logged as audit. (Rules only ever add allows, so where an enforcing
    /// policy isolates the pod too, the full union denies nothing the enforcing policies alone
    /// would allow: audit policies can only add drops by isolating a direction.)
    pub audit: bool,
}

impl DirPolicy {
    pub fn allow_for(&self, class: usize) -> Option<&Allow> {
        self.allows.get(&class).or_else(|| self.allows.get(&0))
    }

    /// The cluster policy that the datapath counts a denied packet against, if one denied it.
    pub fn denied_by(&self, class: usize, proto: u8, port: Option<u16>) -> Option<&ObjKey> {
        let a = self.allow_for(class)?;
        if a.permits(proto, port) {
            return None;
        }
        self.policies.get(a.denied_by(proto, port)? as usize)
    }

    /// The policy that the datapath counts an allowed packet against (some policy whose
    /// rules allow it), or `None` when the packet is not allowed.
    pub fn allowed_by(&self, class: usize, proto: u8, port: Option<u16>) -> Option<&ObjKey> {
        let slot = self.allow_for(class)?.decides(proto, port)?;
        self.policies.get(slot as usize)
    }

    pub fn verdict(&self, class: usize, proto: u8, port: Option<u16>) -> Verdict {
        if self.allow_for(class).is_some_and(|a| a.permits(proto, port)) {
            return Verdict::Allow;
        }
        if self.audit {
            Verdict::Audit
        } else {
            Verdict::Deny
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPod {
    pub key: ObjKey,
    pub ips: Vec<IpAddr>,
    /// `None`: not isolated for ingress, everything is allowed in.
    pub ingress: Option<DirPolicy>,
    pub egress: Option<DirPolicy>,
    /// `Some(ifindex)`: not a pod but a pod interface no known pod claims yet
    /// ([`PendingIface`]), held default-deny where the node's pending pods are isolated.
    pub pending: Option<u32>,
}

impl CompiledPod {
    pub fn dir(&self, d: Direction) -> Option<&DirPolicy> {
        match d {
            Direction::Ingress => self.ingress.as_ref(),
            Direction::Egress => self.egress.as_ref(),
        }
    }

    pub fn dir_mut(&mut self, d: Direction) -> Option<&mut DirPolicy> {
        match d {
            Direction::Ingress => self.ingress.as_mut(),
            Direction::Egress => self.egress.as_mut(),
        }
    }
}

/// Everything one node enforces.
#[derive(Clone, Debug, Default)]
pub struct NodePolicy {
    /// Which compilation numbered the classes: unique per full compile, kept by incremental
    /// updates (which only append classes), so that consumers may reuse what they derived per
    /// class index. 0: unknown. Not part of equality.
    pub epoch: u64,
    /// Address classes; index 0 is always the empty class.
    pub classes: Vec<ClassKey>,
    /// Longest-prefix-match table from address to class index. Addresses under no prefix are
    /// in class 0.
    pub prefixes: BTreeMap<IpNet, usize>,
    /// The node's pods that get programs.
    pub pods: BTreeMap<ObjKey, CompiledPod>,
    /// Incremental updates since the last full compile (same `epoch`): each bumps
    /// `prefix_gen` and notes here, per prefix it added, changed or removed, the generation
    /// that last touched it; a consumer that saw generation g looks again only at the
    /// prefixes noted after g. Not part of equality.
    pub prefix_gen: u64,
    pub touched_prefixes: BTreeMap<IpNet, u64>,
}

impl PartialEq for NodePolicy {
    fn eq(&self, o: &Self) -> bool {
        self.classes == o.classes && self.prefixes == o.prefixes && self.pods == o.pods
    }
}
impl Eq for NodePolicy {}

impl NodePolicy {
    /// The class of `addr`: its longest matching prefix's, class 0 under none.
    pub fn class_of(&self, addr: IpAddr) -> usize {
        class_in(&self.prefixes, addr)
    }

    /// Would `pod` let the packet through in direction `d`, looked up as the datapath does
    /// (policy only: without the always-allowed node addresses and conntrack)? `proto` is the
    /// IP protocol number, `port` the destination port when the packet has one.
    pub fn permits(&self, pod: &ObjKey, d: Direction, peer: IpAddr, proto: u8, port: Option<u16>) -> bool {
        self.verdict(pod, d, peer, proto, port).passes()
    }

    /// [`NodePolicy::permits`], telling an allow from an audit-mode pass.
    pub fn verdict(&self, pod: &ObjKey, d: Direction, peer: IpAddr, proto: u8, port: Option<u16>) -> Verdict {
        let Some(p) = self.pods.get(pod) else { return Verdict::Allow };
        match p.dir(d) {
            None => Verdict::Allow,
            Some(dp) => dp.verdict(self.class_of(peer), proto, port),
        }
    }
}

/// The class of `addr` in a prefix table: its longest matching prefix's, class 0 if none.
pub(super) fn class_in(prefixes: &BTreeMap<IpNet, usize>, addr: IpAddr) -> usize {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (0..=max).rev().find_map(|len| prefixes.get(&cidr::prefix(addr, len))).copied().unwrap_or(0)
}

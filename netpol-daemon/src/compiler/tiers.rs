//! ClusterNetworkPolicy tiers, resolved at compile time into the same per-class allows the
//! NetworkPolicies compile to, so that the datapath keeps its two lookups and walks no rule
//! list and no priority.
//!
//! Per pod, direction and address class, the traffic (per protocol its ports, and the other
//! protocols) is walked through the tiers as docs/cluster-network-policy.md states them:
//! the Admin tier's rules of the policies selecting the pod, lowest priority first and rules
//! in order, take what they match out of the traffic still open (Accept: allowed, Deny:
//! dropped, Pass: handed to the next tier). What is left goes to the NetworkPolicies when
//! one isolates the pod in that direction (they allow what their union allows, the rest is
//! dropped), else to the Baseline tier, walked as the Admin tier, where what no rule takes
//! and what a rule passes is allowed. The allowed parts, each with the slot of the policy
//! that decided, are the pod's entry for the class.
use std::collections::BTreeMap;

use super::*;

/// The slot of traffic no policy decided (allowed by default): not counted against a policy.
pub const SLOT_DEFAULT: Slot = u8::MAX;

/// The ClusterNetworkPolicies selecting a pod that have rules in one direction, per tier in
/// evaluation order.
#[derive(Clone, Debug, Default)]
pub(super) struct Tiers<'a> {
    pub(super) admin: Vec<&'a ClusterPolicy>,
    pub(super) baseline: Vec<&'a ClusterPolicy>,
}

impl Tiers<'_> {
    pub(super) fn is_empty(&self) -> bool {
        self.admin.is_empty() && self.baseline.is_empty()
    }
}

/// Per direction (ingress, egress), the cluster policies selecting `pod`. A host-network pod
/// or one without an address is never a subject.
pub(super) fn selecting_tiers<'a>(cluster: &'a Cluster, pod: &Pod) -> [Tiers<'a>; 2] {
    let mut out: [Tiers; 2] = Default::default();
    if !pod.selectable() || cluster.cluster_policies.is_empty() {
        return out;
    }
    let ns = cluster.namespace_labels(&pod.key.namespace);
    let mut selecting: Vec<&ClusterPolicy> = cluster
        .cluster_policies
        .values()
        .filter(|p| p.subject.pods.matches(&pod.labels) && p.subject.namespaces.matches(ns.as_ref()))
        .collect();
    selecting.sort_by(|a, b| a.order().cmp(&b.order()));
    for dir in Direction::BOTH {
        let t = &mut out[dir as usize];
        for p in selecting.iter().copied().filter(|p| !p.rules(dir).is_empty()) {
            match p.tier {
                Tier::Admin => t.admin.push(p),
                Tier::Baseline => t.baseline.push(p),
            }
        }
    }
    out
}

/// The key a cluster policy has in a pod's policy list ([`DirPolicy::policies`]) and so in
/// the metrics: no namespace, `Admin:NAME` or `Baseline:NAME` (a NetworkPolicy's name has no
/// colon).
pub fn cluster_policy_key(tier: Tier, name: &str) -> ObjKey {
    ObjKey::new("", format!("{tier:?}:{name}"))
}

/// The cluster policy a key of [`cluster_policy_key`] stands for.
pub fn cluster_policy_of(key: &ObjKey) -> Option<(Tier, &str)> {
    if !key.namespace.is_empty() {
        return None;
    }
    let (tier, name) = key.name.split_once(':')?;
    Some((Tier::parse(tier)?, name))
}

/// A set of packets as the datapath tells them apart: per protocol, sorted disjoint
/// inclusive port ranges; and every packet of the other protocols.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Traffic {
    ports: BTreeMap<Protocol, Vec<(u16, u16)>>,
    other: bool,
}

impl Traffic {
    pub(super) fn everything() -> Traffic {
        Traffic { ports: Protocol::ALL.into_iter().map(|p| (p, vec![(0, u16::MAX)])).collect(), other: true }
    }

    pub(super) fn is_empty(&self) -> bool {
        !self.other && self.ports.is_empty()
    }

    fn add(&mut self, proto: Protocol, lo: u16, hi: u16) {
        let v = self.ports.entry(proto).or_default();
        v.push((lo, hi));
        *v = normalize(std::mem::take(v));
    }

    /// Moves the part of `self` inside `t` out of `self`; returns it.
    pub(super) fn take(&mut self, t: &Traffic) -> Traffic {
        let mut taken = Traffic { ports: BTreeMap::new(), other: self.other && t.other };
        if t.other {
            self.other = false;
        }
        for (proto, theirs) in &t.ports {
            let Some(mine) = self.ports.get_mut(proto) else { continue };
            let inside = intersect(mine, theirs);
            if !inside.is_empty() {
                *mine = subtract(mine, &inside);
                taken.ports.insert(*proto, inside);
            }
        }
        self.ports.retain(|_, v| !v.is_empty());
        taken
    }

    pub(super) fn union(&mut self, t: Traffic) {
        self.other |= t.other;
        for (proto, ranges) in t.ports {
            for (lo, hi) in ranges {
                self.add(proto, lo, hi);
            }
        }
    }

    /// Adds the traffic to `ps` as allowed by the policy in `slot`.
    fn allow_into(&self, ps: &mut PortSet, slot: Slot) {
        self.add_to(ps, slot, false);
    }

    /// Notes the traffic in `ps` as denied by the cluster policy in `slot`.
    fn deny_into(&self, ps: &mut PortSet, slot: Slot) {
        self.add_to(ps, slot, true);
    }

    /// The traffic into `ps`'s allowed ports or (`denied`) its denied ports, with `slot`.
    fn add_to(&self, ps: &mut PortSet, slot: Slot, denied: bool) {
        for (proto, ranges) in &self.ports {
            for &(lo, hi) in ranges {
                if denied {
                    ps.add_denied(*proto, lo, hi, slot);
                } else {
                    ps.add_from(*proto, lo, hi, slot);
                }
            }
        }
        match (self.other, denied) {
            (true, false) => ps.add_other(slot),
            (true, true) => ps.add_denied_other(slot),
            _ => {}
        }
    }

    /// The part of `self` that a NetworkPolicy allow permits, with the allowing slots
    /// (shifted by `offset`: the cluster policies ahead in the pod's list), into `ps`.
    fn allow_where(&self, allow: &Allow, offset: usize, ps: &mut PortSet) {
        let shift = |s: Slot| slot_of(s as usize + offset);
        match allow {
            Allow::All(s) => self.allow_into(ps, shift(*s)),
            Allow::Ports(np) => {
                for (proto, ranges) in np.iter() {
                    let Some(mine) = self.ports.get(&proto) else { continue };
                    for r in ranges {
                        for (lo, hi) in intersect(mine, &[(r.lo, r.hi)]) {
                            ps.add_from(proto, lo, hi, shift(r.slot));
                        }
                    }
                }
                if let (true, Some(s)) = (self.other, np.other()) {
                    ps.add_other(shift(s));
                }
            }
        }
    }

    /// Does the packet (IP protocol number, destination port if it has one) belong here?
    pub(super) fn holds(&self, proto: u8, port: Option<u16>) -> bool {
        match Protocol::from_number(proto) {
            None => self.other,
            Some(p) => port.is_some_and(|n| self.ports.get(&p).is_some_and(|v| v.iter().any(|(a, b)| *a <= n && n <= *b))),
        }
    }
}

/// Sorted, merged ranges.
fn normalize(mut v: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    v.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if lo as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn intersect(a: &[(u16, u16)], b: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for (alo, ahi) in a {
        for (blo, bhi) in b {
            let (lo, hi) = ((*alo).max(*blo), (*ahi).min(*bhi));
            if lo <= hi {
                out.push((lo, hi));
            }
        }
    }
    normalize(out)
}

/// `a` without `b` (`b` inside `a`'s ranges or not).
fn subtract(a: &[(u16, u16)], b: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for (alo, ahi) in a {
        let mut lo = *alo as u32;
        let hi = *ahi as u32;
        for (blo, bhi) in b {
            let (blo, bhi) = (*blo as u32, *bhi as u32);
            if bhi < lo || blo > hi {
                continue;
            }
            if blo > lo {
                out.push((lo as u16, (blo - 1) as u16));
            }
            lo = bhi + 1;
        }
        if lo <= hi {
            out.push((lo as u16, hi as u16));
        }
    }
    out
}

/// The traffic a cluster rule's `protocols` match, at a pod (the subject) in `dir` towards a
/// peer of `class`: named ports are the destination pod's container ports of that name with
/// their own protocol (ingress: the subject's; egress: the peer's, carried by the class).
pub(super) fn rule_traffic(rule: &ClusterRule, pod: &Pod, dir: Direction, class: &ClassKey) -> Traffic {
    let Some(ports) = &rule.ports else { return Traffic::everything() };
    let mut t = Traffic::default();
    for p in ports {
        match p {
            ClusterPort::Range(proto, lo, hi) => t.add(*proto, *lo, *hi),
            ClusterPort::Named(name) => match dir {
                Direction::Ingress => {
                    for cp in pod.ports.iter().filter(|cp| cp.name.as_deref() == Some(name.as_str())) {
                        t.add(cp.protocol, cp.port, cp.port);
                    }
                }
                Direction::Egress => {
                    for (n, proto, port) in class.ports.iter().filter(|(n, _, _)| n == name) {
                        let _ = n;
                        t.add(*proto, *port, *port);
                    }
                }
            },
        }
    }
    t
}

/// One cluster policy rule as a tier walk sees it: its policy's slot in the pod's list and
/// whether its peers hold the class.
pub(super) struct TierRule<'r> {
    pub(super) policy: &'r ClusterPolicy,
    pub(super) index: usize,
    pub(super) slot: Slot,
    pub(super) peers_hold_class: bool,
}

/// What a tier walk did with one part of the traffic: which rule took it and its action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierStep {
    pub tier: Tier,
    pub policy: String,
    /// The rule's index in the policy's `ingress`/`egress` list, and its `name`.
    pub index: usize,
    pub rule_name: Option<String>,
    pub action: Action,
}

/// Walks `rules` (in evaluation order) over `open`: each matching rule takes what it matches
/// from what is still open. Accepted parts go into `allowed`, denied parts into its denied
/// ports (for the deny counters); passed parts are returned. `on_take` sees each (rule, part taken).
pub(super) fn walk(
    rules: &[TierRule],
    dir: Direction,
    pod: &Pod,
    class: &ClassKey,
    open: &mut Traffic,
    allowed: &mut PortSet,
    mut on_take: impl FnMut(&TierRule, &Traffic),
) -> Traffic {
    let mut passed = Traffic::default();
    for r in rules {
        if open.is_empty() {
            break;
        }
        if !r.peers_hold_class {
            continue;
        }
        let rule = &r.policy.rules(dir)[r.index];
        let taken = open.take(&rule_traffic(rule, pod, dir, class));
        if taken.is_empty() {
            continue;
        }
        on_take(r, &taken);
        match rule.action {
            Action::Accept => taken.allow_into(allowed, r.slot),
            Action::Deny => taken.deny_into(allowed, r.slot),
            Action::Pass => passed.union(taken),
        }
    }
    passed
}

/// The allow of a pod's class in one direction through the tiers: `admin` and `baseline`
/// rules in evaluation order, `np`: the NetworkPolicies' allow for the class when they
/// isolate the pod in this direction (their slots come after the `np_offset` admin
/// policies').
pub(super) fn tiered_allow(
    admin: &[TierRule],
    np: Option<&Allow>,
    np_offset: usize,
    baseline: &[TierRule],
    dir: Direction,
    pod: &Pod,
    class: &ClassKey,
) -> Allow {
    let mut allowed = PortSet::default();
    let mut open = Traffic::everything();
    let passed = walk(admin, dir, pod, class, &mut open, &mut allowed, |_, _| {});
    open.union(passed);
    match np {
        Some(np) => open.allow_where(np, np_offset, &mut allowed),
        None => {
            let passed = walk(baseline, dir, pod, class, &mut open, &mut allowed, |_, _| {});
            open.union(passed);
            open.allow_into(&mut allowed, SLOT_DEFAULT);
        }
    }
    as_allow(allowed)
}

/// A port set allowing every port of every protocol and the other protocols, all by one
/// policy, is that policy allowing all traffic (port-less fragments included).
fn as_allow(ps: PortSet) -> Allow {
    let mut all = Traffic::everything();
    let mut slots = ps.other().into_iter().collect::<Vec<_>>();
    for (proto, ranges) in ps.iter() {
        for r in ranges {
            slots.push(r.slot);
            all.take(&Traffic { ports: [(proto, vec![(r.lo, r.hi)])].into(), other: false });
        }
    }
    if ps.other().is_some() {
        all.other = false;
    }
    slots.sort_unstable();
    slots.dedup();
    match slots.as_slice() {
        [s] if all.is_empty() => Allow::All(*s),
        _ => Allow::Ports(ps),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_take_splits_ranges_and_other_protocols() {
        let mut open = Traffic::everything();
        let mut t = Traffic::default();
        t.add(Protocol::Tcp, 80, 80);
        t.add(Protocol::Tcp, 8080, 8090);
        let taken = open.take(&t);
        assert_eq!(taken, t);
        assert_eq!(open.ports[&Protocol::Tcp], vec![(0, 79), (81, 8079), (8091, u16::MAX)]);
        assert!(open.other && open.holds(1, None) && !open.holds(6, Some(80)) && open.holds(6, Some(81)));
        let rest = open.take(&Traffic::everything());
        assert!(open.is_empty());
        assert!(rest.holds(17, Some(53)) && rest.holds(1, None) && !rest.holds(6, Some(8085)));
    }

    #[test]
    fn a_full_set_by_one_policy_is_all_traffic() {
        let mut ps = PortSet::default();
        Traffic::everything().allow_into(&mut ps, 3);
        assert_eq!(as_allow(ps), Allow::All(3));
        let mut ps = PortSet::default();
        let mut t = Traffic::everything();
        let low = t.take(&Traffic { ports: [(Protocol::Udp, vec![(0, 100)])].into(), other: false });
        low.allow_into(&mut ps, 1);
        t.allow_into(&mut ps, 2);
        assert!(matches!(as_allow(ps), Allow::Ports(p) if p.slot(Protocol::Udp, 50) == Some(1) && p.other() == Some(2)));
    }

    #[test]
    fn cluster_policy_keys_read_back() {
        let k = cluster_policy_key(Tier::Baseline, "default-deny");
        assert_eq!(k.name, "Baseline:default-deny");
        assert_eq!(cluster_policy_of(&k), Some((Tier::Baseline, "default-deny")));
        assert_eq!(cluster_policy_of(&ObjKey::new("ns", "Admin:x")), None);
    }
}

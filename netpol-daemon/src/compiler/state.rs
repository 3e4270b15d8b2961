//! What a compilation keeps so that pod changes can be applied without starting over
//! ([`State`]): the rules in use and their distinct peer sets ("groups"), the classes and
//! the groups holding each, and the addresses of every selectable pod. And what is derived
//! from it, by the full compile and by incremental updates alike: a pod's tables per
//! direction and class, the class of an address, and egress to cluster IPs (decided by the
//! service's backends).
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::index::PeerSet;
use super::ir::class_in;
use super::tiers::{self, cluster_policy_key, TierRule, Tiers};
use super::*;
use ipnet::IpNet;

/// One rule in use on the node (owned: kept for incremental updates).
pub(super) struct RuleState {
    pub(super) rref: RuleRef,
    pub(super) rule: Rule,
    /// Index of its peer set in the node's distinct peer sets.
    pub(super) group: u32,
    pub(super) any: bool,
    pub(super) named_egress: bool,
}

/// A distinct peer set, kept to re-evaluate which sets hold an address whose pods changed.
pub(super) struct GroupState {
    any: bool,
    blocks: Vec<IpBlock>,
    /// Pod peers: (namespace selector, pod selector, the policy's namespace).
    pods: Vec<(Option<Selector>, Selector, String)>,
}

impl GroupState {
    /// The state of `set`, the peers of `rule` of `policy`.
    pub(super) fn new(set: &PeerSet, rule: &Rule, policy: &Policy) -> GroupState {
        let PeerSet::Some { blocks, .. } = set else { return GroupState { any: true, blocks: Vec::new(), pods: Vec::new() } };
        let pods = rule.peers.iter().flatten().filter_map(|p| match p {
            Peer::Pods { namespaces, pods } => Some((namespaces.clone(), pods.clone(), policy.key.namespace.clone())),
            Peer::IpBlock(_) => None,
        });
        GroupState { any: false, blocks: blocks.iter().map(|b| b.as_ref().clone()).collect(), pods: pods.collect() }
    }

    /// The state of `set`, the peers of a ClusterNetworkPolicy rule (its pod sets select
    /// across namespaces; networks and node addresses are its blocks).
    pub(super) fn cluster(set: &PeerSet, rule: &ClusterRule) -> GroupState {
        let blocks = match set {
            PeerSet::Some { blocks, .. } => blocks.iter().map(|b| b.as_ref().clone()).collect(),
            PeerSet::Any => Vec::new(),
        };
        let pods = rule.peers.iter().filter_map(|p| match p {
            ClusterPeer::Pods(set) => Some((Some(set.namespaces.clone()), set.pods.clone(), String::new())),
            _ => None,
        });
        GroupState { any: false, blocks, pods: pods.collect() }
    }

    /// Does the set (not every peer) hold `addr`, whose selectable pods are `owners`?
    fn holds(&self, cluster: &Cluster, addr: IpAddr, owners: &[&Pod]) -> bool {
        !self.any && (self.blocks.iter().any(|b| b.contains(addr)) || owners.iter().any(|p| self.selects(cluster, p)))
    }

    /// Does one of the set's pod peers select `pod`?
    fn selects(&self, cluster: &Cluster, pod: &Pod) -> bool {
        self.pods.iter().any(|(nss, sel, own)| {
            sel.matches(&pod.labels)
                && match nss {
                    None => pod.key.namespace == *own,
                    Some(s) => s.matches(cluster.namespace_labels(&pod.key.namespace).as_ref()),
                }
        })
    }
}

/// A class's identity: the peer sets holding its addresses, its pod ports, its service.
pub(super) type ClassId = (Vec<u32>, Vec<(String, Protocol, u16)>, Option<ObjKey>);

/// What a compilation leaves behind so that pod changes can be applied without starting over.
pub(super) struct State {
    pub(super) rules: Vec<RuleState>,
    /// Policy in use -> per direction (ingress, egress), its rules' range in `rules`.
    pub(super) rule_range: HashMap<ObjKey, [Option<(usize, usize)>; 2]>,
    pub(super) groups: Vec<GroupState>,
    pub(super) named_groups: BTreeSet<u32>,
    pub(super) any_named: bool,
    pub(super) class_ids: HashMap<ClassId, usize>,
    pub(super) class_groups: Vec<Vec<u32>>,
    pub(super) group_classes: Vec<Vec<usize>>,
    pub(super) with_ports: Vec<usize>,
    pub(super) service_of: HashMap<IpAddr, ObjKey>,
    /// The node's pods: their isolating policies per direction (ingress, egress).
    pub(super) local: BTreeMap<ObjKey, [Vec<ObjKey>; 2]>,
    /// ClusterNetworkPolicy rules in use on the node: per (policy, direction), per rule its
    /// peer set (`None`: no peers, the rule matches nothing).
    pub(super) cluster_groups: HashMap<(String, Direction), Vec<Option<u32>>>,
    /// Addresses of every selectable pod (what a changed pod had before).
    pub(super) pod_ips: HashMap<ObjKey, Vec<IpAddr>>,
    /// The other way: per address, the selectable pods holding it, in key order. A changed
    /// address finds its owners here instead of scanning every pod (a change of many pods
    /// would otherwise cost changed x all pods).
    pub(super) ip_owners: HashMap<IpAddr, BTreeSet<ObjKey>>,
}

impl State {
    /// The rules (and their slots) of the given isolating policies, in policy order.
    pub(super) fn pod_rules(&self, policies: &[ObjKey], dir: Direction) -> Vec<(&RuleState, Slot)> {
        policies
            .iter()
            .enumerate()
            .flat_map(|(i, k)| {
                let (a, b) = self.rule_range[k][dir as usize].expect("policy in use");
                self.rules[a..b].iter().map(move |r| (r, slot_of(i)))
            })
            .collect()
    }

    /// Is the policy's `dir` part compiled (its rules resolved)?
    pub(super) fn in_use(&self, policy: &ObjKey, dir: Direction) -> bool {
        self.rule_range.get(policy).is_some_and(|r| r[dir as usize].is_some())
    }

    /// Notes local pod `key` and the keys of its isolating policies per direction.
    pub(super) fn set_local(&mut self, key: &ObjKey, iso: &[Vec<&Policy>; 2]) {
        self.local.insert(key.clone(), iso.each_ref().map(|v| v.iter().map(|p| p.key.clone()).collect()));
    }

    /// Notes the addresses of selectable pod `p`.
    pub(super) fn add_owner(&mut self, p: &Pod) {
        self.pod_ips.insert(p.key.clone(), p.ips.clone());
        for ip in &p.ips {
            self.ip_owners.entry(*ip).or_default().insert(p.key.clone());
        }
    }

    /// Forgets the addresses of pod `key`; returns them.
    pub(super) fn remove_owner(&mut self, key: &ObjKey) -> Option<Vec<IpAddr>> {
        let ips = self.pod_ips.remove(key)?;
        for ip in &ips {
            if let Some(set) = self.ip_owners.get_mut(ip) {
                set.remove(key);
                if set.is_empty() {
                    self.ip_owners.remove(ip);
                }
            }
        }
        Some(ips)
    }

    /// Do addresses in the groups `members` carry their pod's container ports (some egress
    /// rule with a named port covers them)?
    pub(super) fn wants_ports(&self, members: &[u32]) -> bool {
        !self.named_groups.is_empty() && (self.any_named || members.iter().any(|g| self.named_groups.contains(g)))
    }

    /// A pod's tables (cluster IPs aside) under its isolating policies and the cluster
    /// policies selecting it, per direction.
    pub(super) fn compile_pod(&self, classes: &[ClassKey], pod: &Pod, iso: &[Vec<&Policy>; 2], tiers: &[Tiers; 2]) -> CompiledPod {
        let dir_policy = |dir: Direction| {
            let policies = &iso[dir as usize];
            let tiers = &tiers[dir as usize];
            if !tiers.is_empty() {
                return Some(self.tiered_dir(classes, pod, dir, policies, tiers));
            }
            if policies.is_empty() {
                return None;
            }
            let keys: Vec<ObjKey> = policies.iter().map(|p| p.key.clone()).collect();
            let allows = self.dir_allows(classes, pod, dir, &self.pod_rules(&keys, dir));
            Some(DirPolicy { allows, policies: keys, audit: policies.iter().all(|p| p.audit) })
        };
        let (ingress, egress) = (dir_policy(Direction::Ingress), dir_policy(Direction::Egress));
        CompiledPod { key: pod.key.clone(), ips: pod.ips.clone(), ingress, egress, pending: None }
    }

    /// A pod's table in a direction where cluster policies select it: per class, what the
    /// tiers let through ([`tiers::tiered_allow`]). Its policy list: the Admin tier's, the
    /// isolating NetworkPolicies, the Baseline tier's.
    fn tiered_dir(&self, classes: &[ClassKey], pod: &Pod, dir: Direction, policies: &[&Policy], tiers: &Tiers) -> DirPolicy {
        let np_keys: Vec<ObjKey> = policies.iter().map(|p| p.key.clone()).collect();
        let np = (!np_keys.is_empty()).then(|| self.dir_allows(classes, pod, dir, &self.pod_rules(&np_keys, dir)));
        let admin_keys = tiers.admin.iter().map(|p| cluster_policy_key(Tier::Admin, &p.name));
        let baseline_keys = tiers.baseline.iter().map(|p| cluster_policy_key(Tier::Baseline, &p.name));
        let keys: Vec<ObjKey> = admin_keys.chain(np_keys.iter().cloned()).chain(baseline_keys).collect();
        // The classes some rule draws a line around; every other class is treated as class 0.
        let mut relevant: BTreeSet<usize> = np.iter().flat_map(|a| a.keys().copied()).collect();
        relevant.insert(0);
        let baseline_offset = tiers.admin.len() + np_keys.len();
        let tier_groups = |list: &[&ClusterPolicy], offset: usize| -> Vec<(usize, usize, Slot, Option<u32>)> {
            let mut out = Vec::new();
            for (i, p) in list.iter().enumerate() {
                let groups = &self.cluster_groups[&(p.name.clone(), dir)];
                out.extend(groups.iter().enumerate().map(|(r, g)| (i, r, slot_of(offset + i), *g)));
            }
            out
        };
        let admin = tier_groups(&tiers.admin, 0);
        let baseline = tier_groups(&tiers.baseline, baseline_offset);
        for (_, _, _, g) in admin.iter().chain(&baseline) {
            if let Some(g) = g {
                relevant.extend(self.group_classes[*g as usize].iter().copied());
            }
        }

        let mut allows = BTreeMap::new();
        let mut base: Option<Allow> = None;
        for ci in relevant {
            let np_allow = np.as_ref().map(|m| m.get(&ci).or_else(|| m.get(&0)).cloned().unwrap_or_else(Allow::nothing));
            let a = tiers::tiered_allow(
                &tier_rules(&tiers.admin, &admin, &self.class_groups[ci]),
                np_allow.as_ref(),
                tiers.admin.len(),
                &tier_rules(&tiers.baseline, &baseline, &self.class_groups[ci]),
                dir,
                pod,
                &classes[ci],
            );
            match &base {
                None => {
                    base = Some(a.clone());
                    // (An entry that allows nothing still names the policies that deny.)
                    if a != Allow::nothing() {
                        allows.insert(ci, a);
                    }
                }
                Some(b) if *b != a => {
                    allows.insert(ci, a);
                }
                Some(_) => {}
            }
        }
        DirPolicy { allows, policies: keys, audit: false }
    }

    /// Registers a new class; returns its index.
    pub(super) fn add_class(&mut self, classes: &mut Vec<ClassKey>, key: ClassId) -> usize {
        let id = classes.len();
        let mut cluster_rules: Vec<ClusterRuleRef> = Vec::new();
        for ((policy, dir), groups) in &self.cluster_groups {
            for (index, g) in groups.iter().enumerate() {
                if g.is_some_and(|g| key.0.binary_search(&g).is_ok()) {
                    cluster_rules.push(ClusterRuleRef { policy: policy.clone(), dir: *dir, index });
                }
            }
        }
        cluster_rules.sort();
        classes.push(ClassKey {
            cluster_rules,
            rules: self.rules.iter().filter(|r| !r.any && key.0.binary_search(&r.group).is_ok()).map(|r| r.rref.clone()).collect(),
            ports: key.1.clone(),
            service: key.2.clone(),
        });
        for g in &key.0 {
            self.group_classes[*g as usize].push(id);
        }
        if !key.1.is_empty() {
            self.with_ports.push(id);
        }
        self.class_groups.push(key.0.clone());
        self.class_ids.insert(key, id);
        id
    }

    /// The index of the class `key`, registered if new.
    pub(super) fn class_for(&mut self, classes: &mut Vec<ClassKey>, key: ClassId) -> usize {
        match self.class_ids.get(&key) {
            Some(id) => *id,
            None => self.add_class(classes, key),
        }
    }

    /// What `pod` may send/receive per class under its rules (cluster IPs aside). Class 0
    /// is the fallback for classes without an entry: the rules without peer restriction.
    /// Only classes where the verdict differs from class 0's get an entry.
    fn dir_allows(&self, classes: &[ClassKey], pod: &Pod, dir: Direction, pod_rules: &[(&RuleState, Slot)]) -> BTreeMap<usize, Allow> {
        let mut base = Allow::nothing();
        for (r, slot) in pod_rules.iter().filter(|(r, _)| r.any) {
            base.union(&rule_allow(pod, dir, &r.rule, &classes[0], *slot));
        }
        let mut relevant: BTreeSet<usize> = BTreeSet::new();
        for (r, _) in pod_rules {
            if r.any {
                if r.named_egress {
                    relevant.extend(self.with_ports.iter().copied());
                }
            } else {
                relevant.extend(self.group_classes[r.group as usize].iter().copied());
            }
        }
        let mut allows = BTreeMap::new();
        if !base.is_nothing() {
            allows.insert(0, base.clone());
        }
        for ci in relevant {
            if let Some(a) = self.class_allow(classes, ci, &base, pod, dir, pod_rules) {
                allows.insert(ci, a);
            }
        }
        allows
    }

    /// The entry of class `ci` for a pod whose class-0 allow is `base`, if it differs.
    pub(super) fn class_allow(
        &self,
        classes: &[ClassKey],
        ci: usize,
        base: &Allow,
        pod: &Pod,
        dir: Direction,
        pod_rules: &[(&RuleState, Slot)],
    ) -> Option<Allow> {
        let class = &classes[ci];
        let mut allow = base.clone();
        for (r, slot) in pod_rules {
            if allow.is_all() {
                break;
            }
            if (r.any && r.named_egress) || (!r.any && self.class_groups[ci].binary_search(&r.group).is_ok()) {
                allow.union(&rule_allow(pod, dir, &r.rule, class, *slot));
            }
        }
        (allow != *base).then_some(allow)
    }

    /// The identity of the class of address `addr` as a host prefix, from the current pods.
    pub(super) fn class_key(&self, cluster: &Cluster, addr: IpAddr) -> ClassId {
        // The selectable pods owning the address, in key order (from the index by address).
        let owners: Vec<&Pod> = self
            .ip_owners
            .get(&addr)
            .into_iter()
            .flatten()
            .filter_map(|k| cluster.pods.get(k))
            .filter(|p| p.ips.contains(&addr) && p.selectable())
            .collect();
        let members: Vec<u32> = (0..self.groups.len() as u32).filter(|g| self.groups[*g as usize].holds(cluster, addr, &owners)).collect();
        // The pod an address stands for: the last owner in key order (as the index has it).
        let ports = match owners.last() {
            Some(q) if self.wants_ports(&members) => class_ports(q),
            _ => Vec::new(),
        };
        (members, ports, self.service_of.get(&addr).cloned())
    }
}

/// The rules of a tier's policies (`list`) as resolved (policy index, rule index, slot,
/// group), for a class whose groups are `class_groups`.
fn tier_rules<'r>(list: &[&'r ClusterPolicy], resolved: &[(usize, usize, Slot, Option<u32>)], class_groups: &[u32]) -> Vec<TierRule<'r>> {
    let held = |g: &Option<u32>| g.is_some_and(|g| class_groups.binary_search(&g).is_ok());
    resolved.iter().map(|(i, r, slot, g)| TierRule { policy: list[*i], index: *r, slot: *slot, peers_hold_class: held(g) }).collect()
}

/// The named container ports of `pod` as a class carries them: (name, protocol, port), sorted.
pub(super) fn class_ports(pod: &Pod) -> Vec<(String, Protocol, u16)> {
    let mut ports: Vec<_> = pod.ports.iter().filter_map(|p| p.name.clone().map(|n| (n, p.protocol, p.port))).collect();
    ports.sort();
    ports.dedup();
    ports
}

/// Ports a rule allows to the addresses of a class.
pub(super) fn rule_allow(pod: &Pod, dir: Direction, rule: &Rule, class: &ClassKey, slot: Slot) -> Allow {
    let Some(specs) = &rule.ports else {
        return Allow::All(slot);
    };
    let mut ps = PortSet::default();
    for spec in specs {
        match &spec.port {
            PortRef::Any => ps.add_from(spec.protocol, 0, u16::MAX, slot),
            PortRef::Range(a, b) => ps.add_from(spec.protocol, *a, *b, slot),
            // Ingress: the selected pod's own ports. Egress: the destination pod's, carried
            // by the class.
            PortRef::Named(name) => match dir {
                Direction::Ingress => {
                    for port in pod.named_ports(name, spec.protocol) {
                        ps.add_from(spec.protocol, port, port, slot);
                    }
                }
                Direction::Egress => {
                    for (n, proto, port) in &class.ports {
                        if n == name && *proto == spec.protocol {
                            ps.add_from(spec.protocol, *port, *port, slot);
                        }
                    }
                }
            },
        }
    }
    Allow::Ports(ps)
}

/// Where kube-proxy sends each port of each service that has a class: each backend as its
/// address's class and its target port.
pub(super) type Backends = HashMap<ObjKey, Vec<(ServicePort, Vec<(usize, u16)>)>>;

/// The backends of every service class, each backend's class looked up once here (not once
/// per local pod: a node's pods all read the same backends).
pub(super) fn backends_of(cluster: &Cluster, classes: &[ClassKey], prefixes: &BTreeMap<IpNet, usize>) -> Backends {
    let mut out = Backends::default();
    for sk in classes.iter().filter_map(|c| c.service.as_ref()) {
        if !out.contains_key(sk) {
            if let Some(svc) = cluster.services.get(sk) {
                let ports = cluster.service_backends(svc).into_iter();
                let classed = ports.map(|(sp, bs)| (sp, bs.into_iter().map(|(b, t)| (class_in(prefixes, b), t)).collect()));
                out.insert(sk.clone(), classed.collect());
            }
        }
    }
    out
}

/// Adds to an egress table its entries for cluster IPs: per service class, the service
/// ports whose backends the pod may reach (by its other entries) on their target ports,
/// attributed to the lowest allowing slot. Always explicit entries (no fallback to class 0).
pub(super) fn add_service_allows(dp: &mut DirPolicy, classes: &[ClassKey], backends: &Backends) {
    let allows = &dp.allows;
    let allow_at = |class: usize| -> Option<&Allow> { allows.get(&class).or_else(|| allows.get(&0)) };
    let mut out = Vec::new();
    for (ci, class) in classes.iter().enumerate() {
        let Some(sk) = &class.service else { continue };
        let Some(ports) = backends.get(sk) else { continue };
        let mut ps = PortSet::default();
        for (sp, backends) in ports {
            let slot = backends.iter().filter_map(|(b, t)| allow_at(*b)?.decides(sp.protocol.number(), Some(*t))).min();
            if let Some(slot) = slot {
                ps.add_from(sp.protocol, sp.port, sp.port, slot);
            }
        }
        out.push((ci, Allow::Ports(ps)));
    }
    dp.allows.extend(out);
}

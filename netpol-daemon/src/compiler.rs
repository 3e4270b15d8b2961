//! The policy compiler: pure functions from the cluster model to what the datapath needs on
//! one node. No I/O, no kernel, no clock.
//!
//! For every pod on the node and each direction in which some policy isolates it, the union of
//! the rules of the policies that select it decides. The compiler splits the address space into
//! *classes*: addresses that every one of those rules treats alike. The candidate prefixes are
//! every ipBlock cidr and except and every peer pod address; because prefixes are nested or
//! disjoint, the rules whose peers contain an address depend only on its longest matching
//! candidate, so one class per prefix is exact. (Pod addresses covered by an egress rule with a
//! named port also carry the pod's container ports in their class, since the port a name means
//! is the destination pod's.) Then each pod gets, per direction and class, the ports allowed.
//!
//! That is what the datapath looks up: address -> class (LPM), (pod, class, direction) ->
//! ports. No per-rule work per packet, overlapping rules are a true union (an `except` in one
//! rule never hides an address another rule allows), and a rule selecting every pod of the
//! cluster costs one entry per local pod, not one per cluster pod.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::cidr::Cidr;
use crate::model::*;
use crate::selector::Selector;

/// Allowed ports: per protocol, sorted disjoint non-adjacent inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSet {
    ranges: BTreeMap<Protocol, Vec<(u16, u16)>>,
}

impl PortSet {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn add(&mut self, proto: Protocol, lo: u16, hi: u16) {
        let v = self.ranges.entry(proto).or_default();
        v.push((lo, hi));
        v.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(v.len());
        for &(a, b) in v.iter() {
            match merged.last_mut() {
                Some(last) if a as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        *v = merged;
    }

    pub fn union(&mut self, other: &PortSet) {
        for (p, rs) in &other.ranges {
            for &(a, b) in rs {
                self.add(*p, a, b);
            }
        }
    }

    pub fn contains(&self, proto: Protocol, port: u16) -> bool {
        self.ranges.get(&proto).is_some_and(|rs| {
            let i = rs.partition_point(|&(_, hi)| hi < port);
            i < rs.len() && rs[i].0 <= port
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = (Protocol, &[(u16, u16)])> {
        self.ranges.iter().map(|(p, r)| (*p, r.as_slice()))
    }
}

/// What a prefix allows.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Allow {
    /// Every protocol and port (a rule without `ports`).
    All,
    Ports(PortSet),
}

impl Allow {
    pub fn nothing() -> Allow {
        Allow::Ports(PortSet::default())
    }

    pub fn is_nothing(&self) -> bool {
        matches!(self, Allow::Ports(p) if p.is_empty())
    }

    fn union(&mut self, other: &Allow) {
        match (&mut *self, other) {
            (Allow::All, _) => {}
            (_, Allow::All) => *self = Allow::All,
            (Allow::Ports(a), Allow::Ports(b)) => a.union(b),
        }
    }

    /// `proto` is an IP protocol number, `port` the destination port when the packet has one.
    pub fn permits(&self, proto: u8, port: Option<u16>) -> bool {
        match self {
            Allow::All => true,
            Allow::Ports(ps) => match (Protocol::from_number(proto), port) {
                (Some(p), Some(port)) => ps.contains(p, port),
                _ => false,
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

/// What all addresses of a class have in common. The empty key is the class of addresses no
/// rule names (identity 0 in the datapath).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassKey {
    /// Rules with explicit peers whose peers contain the addresses.
    pub rules: Vec<RuleRef>,
    /// The container ports of the pod owning the address, when an egress rule with a named
    /// port covers it: (name, protocol, port), sorted.
    pub ports: Vec<(String, Protocol, u16)>,
}

/// The compiled policy of one pod in one direction in which it is isolated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirPolicy {
    /// Class index -> what it may send/receive. Classes not present allow nothing.
    pub allows: BTreeMap<usize, Allow>,
    /// The policies that isolate the pod in this direction.
    pub policies: Vec<ObjKey>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPod {
    pub key: ObjKey,
    pub ips: Vec<IpAddr>,
    /// `None`: not isolated for ingress, everything is allowed in.
    pub ingress: Option<DirPolicy>,
    pub egress: Option<DirPolicy>,
}

impl CompiledPod {
    pub fn dir(&self, d: Direction) -> Option<&DirPolicy> {
        match d {
            Direction::Ingress => self.ingress.as_ref(),
            Direction::Egress => self.egress.as_ref(),
        }
    }
}

/// Everything one node enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePolicy {
    /// Address classes; index 0 is always the empty class.
    pub classes: Vec<ClassKey>,
    /// Longest-prefix-match table from address to class index. Addresses under no prefix are
    /// in class 0.
    pub prefixes: BTreeMap<Cidr, usize>,
    /// The node's pods that get programs.
    pub pods: BTreeMap<ObjKey, CompiledPod>,
}

impl NodePolicy {
    pub fn class_of(&self, addr: IpAddr) -> usize {
        self.prefixes
            .iter()
            .filter(|(c, _)| c.contains_addr(addr))
            .max_by_key(|(c, _)| c.len())
            .map_or(0, |(_, i)| *i)
    }

    /// Would `pod` let the packet through in direction `d`, looked up as the datapath does
    /// (policy only: without the always-allowed node addresses and conntrack)? `proto` is the
    /// IP protocol number, `port` the destination port when the packet has one.
    pub fn permits(&self, pod: &ObjKey, d: Direction, peer: IpAddr, proto: u8, port: Option<u16>) -> bool {
        let Some(p) = self.pods.get(pod) else { return true };
        match p.dir(d) {
            None => true,
            Some(dp) => dp.allows.get(&self.class_of(peer)).is_some_and(|a| a.permits(proto, port)),
        }
    }
}

/// The whole cluster state the compiler reads.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjKey, Pod>,
    pub policies: BTreeMap<ObjKey, Policy>,
}

impl Cluster {
    /// Namespace labels; namespaces known only through their pods or policies get the
    /// automatic `kubernetes.io/metadata.name` label.
    pub fn namespace(&self, name: &str) -> Namespace {
        self.namespaces.get(name).cloned().unwrap_or_else(|| Namespace::implicit(name))
    }

    fn namespace_names(&self) -> BTreeSet<&str> {
        let mut out: BTreeSet<&str> = self.namespaces.keys().map(|s| s.as_str()).collect();
        out.extend(self.pods.keys().map(|k| k.namespace.as_str()));
        out
    }
}

/// Cluster-wide lookups built once per compilation.
pub struct Index<'a> {
    cluster: &'a Cluster,
    pods_by_ns: HashMap<&'a str, Vec<&'a Pod>>,
    pod_by_ip: HashMap<IpAddr, &'a Pod>,
    ns_labels: HashMap<&'a str, Labels>,
}

impl<'a> Index<'a> {
    pub fn new(cluster: &'a Cluster) -> Index<'a> {
        let mut pods_by_ns: HashMap<&str, Vec<&Pod>> = HashMap::new();
        let mut pod_by_ip = HashMap::new();
        for p in cluster.pods.values().filter(|p| p.selectable()) {
            pods_by_ns.entry(p.key.namespace.as_str()).or_default().push(p);
            for ip in &p.ips {
                pod_by_ip.insert(*ip, p);
            }
        }
        let ns_labels = cluster
            .namespace_names()
            .into_iter()
            .map(|n| (n, cluster.namespace(n).labels))
            .collect();
        Index { cluster, pods_by_ns, pod_by_ip, ns_labels }
    }

    /// Policies that select `pod`.
    pub fn policies_for(&self, pod: &Pod) -> impl Iterator<Item = &'a Policy> + '_ {
        let labels = pod.labels.clone();
        let ns = pod.key.namespace.clone();
        self.cluster
            .policies
            .values()
            .filter(move |p| p.key.namespace == ns && p.pod_selector.matches(&labels))
    }

    fn peer_pods(&self, policy_ns: &str, namespaces: &Option<Selector>, pods: &Selector) -> Vec<&'a Pod> {
        let mut out = Vec::new();
        let mut add_ns = |ns: &str| {
            for p in self.pods_by_ns.get(ns).into_iter().flatten() {
                if pods.matches(&p.labels) {
                    out.push(*p);
                }
            }
        };
        match namespaces {
            None => add_ns(policy_ns),
            Some(sel) => {
                for (ns, labels) in &self.ns_labels {
                    if sel.matches(labels) {
                        add_ns(ns);
                    }
                }
            }
        }
        out
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&'a Pod> {
        self.pod_by_ip.get(&ip).copied()
    }
}

/// The peers of one rule, resolved against the cluster.
enum PeerSet<'a> {
    Any,
    Some { blocks: Vec<&'a IpBlock>, pod_ips: BTreeSet<IpAddr> },
}

impl PeerSet<'_> {
    /// Is the region of `prefix` (its addresses not under a longer candidate) in the set?
    fn contains_region(&self, prefix: &Cidr) -> bool {
        match self {
            PeerSet::Any => true,
            PeerSet::Some { blocks, pod_ips } => {
                (prefix.is_host() && pod_ips.contains(&prefix.addr()))
                    || blocks.iter().any(|b| {
                        b.cidr.contains(prefix) && !b.except.iter().any(|e| e.contains(prefix))
                    })
            }
        }
    }
}

fn has_named(rule: &Rule) -> bool {
    rule.ports.iter().flatten().any(|p| matches!(p.port, PortRef::Named(_)))
}

/// Compiles everything the pods of `node` (not host-network, with an address) need.
pub fn compile_node(cluster: &Cluster, node: &str) -> NodePolicy {
    let index = Index::new(cluster);
    let local: Vec<&Pod> =
        cluster.pods.values().filter(|p| p.node_name.as_deref() == Some(node) && p.selectable()).collect();
    compile_pods(&index, &local)
}

/// Compiles the given pods as the pods of one node.
pub fn compile_pods(index: &Index, local: &[&Pod]) -> NodePolicy {
    // Per pod and direction: the isolating policies.
    let mut isolating: Vec<[Vec<&Policy>; 2]> = Vec::with_capacity(local.len());
    let mut used: BTreeMap<(ObjKey, Direction), &Policy> = BTreeMap::new();
    for pod in local {
        let selecting: Vec<&Policy> = index.policies_for(pod).collect();
        let per_dir = Direction::BOTH.map(|d| {
            let v: Vec<&Policy> = selecting.iter().copied().filter(|p| p.isolates(d)).collect();
            for p in &v {
                used.insert((p.key.clone(), d), p);
            }
            v
        });
        isolating.push(per_dir);
    }

    // Resolve every rule in use once.
    let mut resolved: BTreeMap<RuleRef, (&Rule, PeerSet)> = BTreeMap::new();
    for ((_, dir), pol) in &used {
        for (i, rule) in pol.rules(*dir).iter().enumerate() {
            let set = match &rule.peers {
                None => PeerSet::Any,
                Some(peers) => {
                    let mut blocks = Vec::new();
                    let mut pod_ips = BTreeSet::new();
                    for peer in peers {
                        match peer {
                            Peer::IpBlock(b) => blocks.push(b),
                            Peer::Pods { namespaces, pods } => {
                                for p in index.peer_pods(&pol.key.namespace, namespaces, pods) {
                                    pod_ips.extend(p.ips.iter().copied());
                                }
                            }
                        }
                    }
                    PeerSet::Some { blocks, pod_ips }
                }
            };
            resolved.insert(RuleRef { policy: pol.key.clone(), dir: *dir, index: i }, (rule, set));
        }
    }

    // Candidate prefixes.
    let mut candidates: BTreeSet<Cidr> = BTreeSet::new();
    let mut named_egress: Vec<&PeerSet> = Vec::new();
    for (r, (rule, set)) in &resolved {
        if let PeerSet::Some { blocks, pod_ips } = set {
            for b in blocks {
                candidates.insert(b.cidr);
                candidates.extend(b.except.iter().copied());
            }
            candidates.extend(pod_ips.iter().map(|ip| Cidr::host(*ip)));
        }
        if r.dir == Direction::Egress && has_named(rule) {
            named_egress.push(set);
        }
    }
    // A named port in an egress rule resolves against each destination pod, so every pod
    // address such a rule covers needs a prefix (and a class) of its own.
    if !named_egress.is_empty() {
        for ip in index.pod_by_ip.keys() {
            let host = Cidr::host(*ip);
            if named_egress.iter().any(|s| s.contains_region(&host)) {
                candidates.insert(host);
            }
        }
    }

    // Classify each candidate's region.
    let mut classes: Vec<ClassKey> = vec![ClassKey::default()];
    let mut class_ids: HashMap<ClassKey, usize> = HashMap::from([(ClassKey::default(), 0)]);
    let mut table: BTreeMap<Cidr, usize> = BTreeMap::new();
    for prefix in &candidates {
        let rules: Vec<RuleRef> = resolved
            .iter()
            .filter(|(_, (_, set))| !matches!(set, PeerSet::Any) && set.contains_region(prefix))
            .map(|(r, _)| r.clone())
            .collect();
        let mut ports = Vec::new();
        if prefix.is_host() && named_egress.iter().any(|s| s.contains_region(prefix)) {
            if let Some(q) = index.pod_by_ip(prefix.addr()) {
                ports = q.ports.iter().filter_map(|p| p.name.clone().map(|n| (n, p.protocol, p.port))).collect();
                ports.sort();
                ports.dedup();
            }
        }
        let key = ClassKey { rules, ports };
        let id = *class_ids.entry(key.clone()).or_insert_with(|| {
            classes.push(key);
            classes.len() - 1
        });
        table.insert(*prefix, id);
    }
    let prefixes = prune(table);

    // Per pod, direction and class: the allowed ports.
    let mut pods = BTreeMap::new();
    for (pod, per_dir) in local.iter().zip(isolating) {
        let mut out = CompiledPod { key: pod.key.clone(), ips: pod.ips.clone(), ingress: None, egress: None };
        for (dir, policies) in Direction::BOTH.into_iter().zip(per_dir) {
            if policies.is_empty() {
                continue;
            }
            let rules: Vec<(&RuleRef, &Rule, bool)> = policies
                .iter()
                .flat_map(|p| {
                    (0..p.rules(dir).len()).map(move |i| RuleRef { policy: p.key.clone(), dir, index: i })
                })
                .map(|r| {
                    let (k, (rule, set)) = resolved.get_key_value(&r).expect("resolved above");
                    (k, *rule, matches!(set, PeerSet::Any))
                })
                .collect();
            let mut allows = BTreeMap::new();
            for (ci, class) in classes.iter().enumerate() {
                let mut allow = Allow::nothing();
                for (r, rule, any) in &rules {
                    if *any || class.rules.binary_search(r).is_ok() {
                        allow.union(&rule_allow(pod, dir, rule, class));
                        if allow == Allow::All {
                            break;
                        }
                    }
                }
                if !allow.is_nothing() {
                    allows.insert(ci, allow);
                }
            }
            let dp = DirPolicy { allows, policies: policies.iter().map(|p| p.key.clone()).collect() };
            match dir {
                Direction::Ingress => out.ingress = Some(dp),
                Direction::Egress => out.egress = Some(dp),
            }
        }
        pods.insert(pod.key.clone(), out);
    }
    NodePolicy { classes, prefixes, pods }
}

/// Ports a rule allows to the addresses of a class.
fn rule_allow(pod: &Pod, dir: Direction, rule: &Rule, class: &ClassKey) -> Allow {
    let Some(specs) = &rule.ports else {
        return Allow::All;
    };
    let mut ps = PortSet::default();
    for spec in specs {
        match &spec.port {
            PortRef::Any => ps.add(spec.protocol, 0, u16::MAX),
            PortRef::Range(a, b) => ps.add(spec.protocol, *a, *b),
            // Ingress: the selected pod's own ports. Egress: the destination pod's, carried
            // by the class.
            PortRef::Named(name) => match dir {
                Direction::Ingress => {
                    for port in pod.named_ports(name, spec.protocol) {
                        ps.add(spec.protocol, port, port);
                    }
                }
                Direction::Egress => {
                    for (n, proto, port) in &class.ports {
                        if n == name && *proto == spec.protocol {
                            ps.add(spec.protocol, *port, *port);
                        }
                    }
                }
            },
        }
    }
    Allow::Ports(ps)
}

/// Drops prefixes that change nothing: one whose class equals its nearest enclosing prefix's
/// (or is class 0 with no enclosing prefix).
fn prune(table: BTreeMap<Cidr, usize>) -> BTreeMap<Cidr, usize> {
    // BTreeMap order on Cidr is (address, length): an enclosing prefix sorts before the
    // prefixes inside it, so a stack of open ancestors suffices.
    let mut out = BTreeMap::new();
    let mut stack: Vec<(Cidr, usize)> = Vec::new();
    for (c, class) in table {
        while let Some((top, _)) = stack.last() {
            if top.contains(&c) {
                break;
            }
            stack.pop();
        }
        let inherited = stack.last().map_or(0, |(_, k)| *k);
        if class != inherited {
            out.insert(c, class);
        }
        stack.push((c, class));
    }
    out
}

#[cfg(test)]
mod tests;

//! The policy compiler: pure functions from the cluster model to what the datapath needs for
//! each local pod. No I/O, no kernel, no clock.
//!
//! For a pod and a direction, the union of the rules of every policy that selects the pod (and
//! isolates it in that direction) is turned into a set of address prefixes, each with the ports
//! allowed to the addresses for which that prefix is the *longest* match. The candidate prefixes
//! are every ipBlock cidr and except and every peer pod address; because prefixes are nested or
//! disjoint, the set of rules whose peers contain an address depends only on its longest
//! matching candidate, so one allowed-port set per prefix is exact. That is what the datapath's
//! LPM trie looks up: no per-rule work per packet, and overlapping rules are a true union (an
//! `except` in one rule never hides an address another rule allows).
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

/// The compiled policy of one pod in one direction in which it is isolated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirPolicy {
    /// Longest-prefix-match table. Prefixes not present (and not covered) allow nothing.
    pub entries: BTreeMap<Cidr, Allow>,
    /// The policies that isolate the pod in this direction.
    pub policies: Vec<ObjKey>,
}

impl DirPolicy {
    /// Looks a packet up exactly as the datapath does (longest prefix, then port).
    pub fn permits(&self, peer: IpAddr, proto: u8, port: Option<u16>) -> bool {
        self.longest_match(peer).is_some_and(|a| a.permits(proto, port))
    }

    pub fn longest_match(&self, peer: IpAddr) -> Option<&Allow> {
        self.entries
            .iter()
            .filter(|(c, _)| c.contains_addr(peer))
            .max_by_key(|(c, _)| c.len())
            .map(|(_, a)| a)
    }
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

    /// Would this pod let the packet through in direction `d` (policy only, without the
    /// datapath's always-allowed node addresses and conntrack)?
    pub fn permits(&self, d: Direction, peer: IpAddr, proto: u8, port: Option<u16>) -> bool {
        self.dir(d).is_none_or(|p| p.permits(peer, proto, port))
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

fn all_v4() -> Cidr {
    Cidr::parse("0.0.0.0/0").expect("static")
}
fn all_v6() -> Cidr {
    Cidr::parse("::/0").expect("static")
}

/// Compiles one pod. Pure: the same inputs always give the same output.
pub fn compile_pod(index: &Index, pod: &Pod) -> CompiledPod {
    let mut out = CompiledPod { key: pod.key.clone(), ips: pod.ips.clone(), ingress: None, egress: None };
    let selecting: Vec<&Policy> = index.policies_for(pod).collect();
    for dir in Direction::BOTH {
        let isolating: Vec<&Policy> = selecting.iter().copied().filter(|p| p.isolates(dir)).collect();
        if isolating.is_empty() {
            continue;
        }
        let compiled = compile_dir(index, pod, dir, &isolating);
        match dir {
            Direction::Ingress => out.ingress = Some(compiled),
            Direction::Egress => out.egress = Some(compiled),
        }
    }
    out
}

fn has_named(rule: &Rule) -> bool {
    rule.ports.iter().flatten().any(|p| matches!(p.port, PortRef::Named(_)))
}

fn compile_dir(index: &Index, pod: &Pod, dir: Direction, policies: &[&Policy]) -> DirPolicy {
    // Resolve each rule's peers once.
    let mut rules: Vec<(&Rule, PeerSet)> = Vec::new();
    let mut candidates: BTreeSet<Cidr> = BTreeSet::new();
    for pol in policies {
        for rule in pol.rules(dir) {
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
            match &set {
                PeerSet::Any => {
                    candidates.insert(all_v4());
                    candidates.insert(all_v6());
                }
                PeerSet::Some { blocks, pod_ips } => {
                    for b in blocks {
                        candidates.insert(b.cidr);
                        candidates.extend(b.except.iter().copied());
                    }
                    candidates.extend(pod_ips.iter().map(|ip| Cidr::host(*ip)));
                }
            }
            // A named port in an egress rule resolves against each destination pod, so every
            // pod address the rule's address ranges cover needs its own entry.
            if dir == Direction::Egress && has_named(rule) {
                for ip in index.pod_by_ip.keys() {
                    let host = Cidr::host(*ip);
                    if set.contains_region(&host) {
                        candidates.insert(host);
                    }
                }
            }
            rules.push((rule, set));
        }
    }

    let mut table: BTreeMap<Cidr, Allow> = BTreeMap::new();
    for prefix in &candidates {
        let mut allow = Allow::nothing();
        for (rule, set) in &rules {
            if !set.contains_region(prefix) {
                continue;
            }
            allow.union(&rule_allow(index, pod, dir, rule, prefix));
            if allow == Allow::All {
                break;
            }
        }
        table.insert(*prefix, allow);
    }

    DirPolicy {
        entries: prune(table),
        policies: policies.iter().map(|p| p.key.clone()).collect(),
    }
}

/// Ports a rule allows to the addresses of `prefix`'s region.
fn rule_allow(index: &Index, pod: &Pod, dir: Direction, rule: &Rule, prefix: &Cidr) -> Allow {
    let Some(specs) = &rule.ports else {
        return Allow::All;
    };
    let mut ps = PortSet::default();
    for spec in specs {
        match &spec.port {
            PortRef::Any => ps.add(spec.protocol, 0, u16::MAX),
            PortRef::Range(a, b) => ps.add(spec.protocol, *a, *b),
            PortRef::Named(name) => {
                // Ingress: the selected pod's own port. Egress: the destination pod's port.
                let target = match dir {
                    Direction::Ingress => Some(pod),
                    Direction::Egress if prefix.is_host() => index.pod_by_ip(prefix.addr()),
                    Direction::Egress => None,
                };
                for port in target.into_iter().flat_map(|t| t.named_ports(name, spec.protocol)) {
                    ps.add(spec.protocol, port, port);
                }
            }
        }
    }
    Allow::Ports(ps)
}

/// Drops entries that change nothing: an entry equal to what its nearest enclosing entry
/// gives (or allowing nothing where no enclosing entry exists).
fn prune(table: BTreeMap<Cidr, Allow>) -> BTreeMap<Cidr, Allow> {
    // BTreeMap order on Cidr is (address, length): an enclosing prefix sorts before the
    // prefixes inside it, so a stack of open ancestors suffices.
    let mut out = BTreeMap::new();
    let mut stack: Vec<(Cidr, Allow)> = Vec::new();
    for (c, a) in table {
        while let Some((top, _)) = stack.last() {
            if top.contains(&c) {
                break;
            }
            stack.pop();
        }
        let inherits_nothing = stack.last().is_none_or(|(_, pa)| pa.is_nothing());
        let redundant = match stack.last() {
            Some((_, pa)) => *pa == a,
            None => inherits_nothing && a.is_nothing(),
        };
        if !redundant {
            out.insert(c, a.clone());
        }
        stack.push((c, a));
    }
    out
}

/// Compiles every pod on `node` that gets programs (not host-network, with an address).
pub fn compile_node(cluster: &Cluster, node: &str) -> BTreeMap<ObjKey, CompiledPod> {
    let index = Index::new(cluster);
    cluster
        .pods
        .values()
        .filter(|p| p.node_name.as_deref() == Some(node) && p.selectable())
        .map(|p| (p.key.clone(), compile_pod(&index, p)))
        .collect()
}

#[cfg(test)]
mod tests;

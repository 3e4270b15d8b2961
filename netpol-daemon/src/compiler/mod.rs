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
use std::collections::{BTreeMap, BTreeSet};

/// Hash maps keyed by our own values: a fast non-cryptographic hasher (no untrusted keys).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::net::IpAddr;
use std::rc::Rc;

use crate::model::cidr::Cidr;
use crate::model::*;

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
}

impl PortSet {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Adds `lo..=hi` attributed to slot 0.
    pub fn add(&mut self, proto: Protocol, lo: u16, hi: u16) {
        self.add_from(proto, lo, hi, 0);
    }

    /// Adds `lo..=hi` allowed by the policy in `slot`; where the set already has ports, the
    /// lower slot keeps them.
    pub fn add_from(&mut self, proto: Protocol, lo: u16, hi: u16, slot: Slot) {
        let v = self.ranges.entry(proto).or_default();
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

    pub fn union(&mut self, other: &PortSet) {
        for (p, rs) in &other.ranges {
            for r in rs {
                self.add_from(*p, r.lo, r.hi, r.slot);
            }
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

    fn union(&mut self, other: &Allow) {
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
            Allow::Ports(ps) => match (Protocol::from_number(proto), port) {
                (Some(p), Some(port)) => ps.slot(p, port),
                _ => None,
            },
        }
    }

    pub fn permits(&self, proto: u8, port: Option<u16>) -> bool {
        self.decides(proto, port).is_some()
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
    pub prefixes: BTreeMap<Cidr, usize>,
    /// The node's pods that get programs.
    pub pods: BTreeMap<ObjKey, CompiledPod>,
    /// Incremental updates since the last full compile (same `epoch`): each bumps
    /// `prefix_gen` and notes here, per prefix it added, changed or removed, the generation
    /// that last touched it; a consumer that saw generation g looks again only at the
    /// prefixes noted after g. Not part of equality.
    pub prefix_gen: u64,
    pub touched_prefixes: BTreeMap<Cidr, u64>,
}

impl PartialEq for NodePolicy {
    fn eq(&self, o: &Self) -> bool {
        self.classes == o.classes && self.prefixes == o.prefixes && self.pods == o.pods
    }
}
impl Eq for NodePolicy {}

static EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

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

/// Cluster-wide lookups built once per compilation.
pub struct Index<'a> {
    cluster: &'a Cluster,
    pods_by_ns: HashMap<&'a str, Vec<&'a Pod>>,
    pod_by_ip: HashMap<IpAddr, &'a Pod>,
    /// Labels of every namespace that exists or has pods (implicit ones carry only the
    /// automatic name label).
    ns_labels: Vec<(&'a str, std::borrow::Cow<'a, Labels>)>,
}

impl<'a> Index<'a> {
    pub fn new(cluster: &'a Cluster) -> Index<'a> {
        let mut pods_by_ns: HashMap<&str, Vec<&Pod>> = HashMap::default();
        let mut pod_by_ip = HashMap::with_capacity_and_hasher(cluster.pods.len(), Default::default());
        for p in cluster.pods.values().filter(|p| p.selectable()) {
            pods_by_ns.entry(p.key.namespace.as_str()).or_default().push(p);
            for ip in &p.ips {
                pod_by_ip.insert(*ip, p);
            }
        }
        let mut ns_labels: Vec<(&str, std::borrow::Cow<Labels>)> =
            cluster.namespaces.iter().map(|(n, ns)| (n.as_str(), std::borrow::Cow::Borrowed(&ns.labels))).collect();
        for n in pods_by_ns.keys() {
            if !cluster.namespaces.contains_key(*n) {
                ns_labels.push((n, std::borrow::Cow::Owned(Namespace::implicit(n).labels)));
            }
        }
        Index { cluster, pods_by_ns, pod_by_ip, ns_labels }
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
                    if sel.matches(labels.as_ref()) {
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

/// The addresses of the pods a peer selects: sorted, shared by every rule with the same
/// selectors, compared by identity (equal selectors give the same list).
#[derive(Clone)]
struct PodIps(Rc<Vec<IpAddr>>);

impl PartialEq for PodIps {
    fn eq(&self, o: &Self) -> bool {
        Rc::ptr_eq(&self.0, &o.0)
    }
}
impl Eq for PodIps {}
impl std::hash::Hash for PodIps {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        Rc::as_ptr(&self.0).hash(h)
    }
}
impl std::ops::Deref for PodIps {
    type Target = Vec<IpAddr>;
    fn deref(&self) -> &Vec<IpAddr> {
        &self.0
    }
}

/// The peers of one rule, resolved against the cluster.
#[derive(Clone, PartialEq, Eq, Hash)]
enum PeerSet<'a> {
    Any,
    /// Address blocks, and the addresses of the selected pods.
    Some { blocks: Vec<&'a IpBlock>, pod_ips: PodIps },
}

impl PeerSet<'_> {
    /// Is the region of `prefix` (its addresses not under a longer candidate) in the set?
    fn contains_region(&self, prefix: &Cidr) -> bool {
        match self {
            PeerSet::Any => true,
            PeerSet::Some { blocks, pod_ips } => {
                (prefix.is_host() && pod_ips.binary_search(&prefix.addr()).is_ok())
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

/// The namespace under which not-yet-identified pod interfaces are programmed.
/// The namespace of a pending interface's key (no Kubernetes namespace can be named so).
const PENDING_NAMESPACE: &str = "<pending>";

/// A pod interface (a veth host route) that no known pod address claims yet: a pod the CNI
/// is wiring whose address the API has not reported. An input of the compiler like the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingIface {
    pub ifindex: u32,
    pub ifname: String,
}

/// Pods scheduled on `node` that have no address yet (the CNI is wiring them). Returns, per
/// direction (ingress, egress), whether *every* such pod will be isolated in that direction;
/// `None` when there is no such pod. A new pod interface that no known pod address claims yet
/// is denied in those directions until its pod is programmed: no window where an isolated pod
/// is open, and a pod without policies is never blocked (when pending pods disagree, the
/// direction stays open).
pub fn pending_isolation(cluster: &Cluster, node: &str) -> Option<[bool; 2]> {
    let mut out: Option<[bool; 2]> = None;
    for pod in cluster.pods.values().filter(|p| p.node_name.as_deref() == Some(node) && !p.host_network && p.ips.is_empty()) {
        let iso = isolating(cluster, pod).map(|v| !v.is_empty());
        out = Some(match out {
            None => iso,
            Some(o) => [o[0] && iso[0], o[1] && iso[1]],
        });
    }
    out
}

/// A compiled entry for a pending interface: isolated directions allow nothing.
pub fn pending_pod(iface: &PendingIface, iso: [bool; 2]) -> CompiledPod {
    CompiledPod {
        key: ObjKey::new(PENDING_NAMESPACE, &iface.ifname),
        ips: Vec::new(),
        ingress: iso[0].then(DirPolicy::default),
        egress: iso[1].then(DirPolicy::default),
        pending: Some(iface.ifindex),
    }
}

/// One rule in use on the node (owned: kept for incremental updates).
struct RuleState {
    rref: RuleRef,
    rule: Rule,
    /// Index of its peer set in the node's distinct peer sets.
    group: u32,
    any: bool,
    named_egress: bool,
}

/// A distinct peer set, kept to re-evaluate which sets hold an address whose pods changed.
struct GroupState {
    any: bool,
    blocks: Vec<IpBlock>,
    /// Pod peers: (namespace selector, pod selector, the policy's namespace).
    pods: Vec<(Option<Selector>, Selector, String)>,
}

/// A class's identity: the peer sets holding its addresses, its pod ports, its service.
type ClassId = (Vec<u32>, Vec<(String, Protocol, u16)>, Option<ObjKey>);

/// What a compilation leaves behind so that pod changes can be applied without starting over.
struct State {
    rules: Vec<RuleState>,
    /// Policy in use -> per direction (ingress, egress), its rules' range in `rules`.
    rule_range: HashMap<ObjKey, [Option<(usize, usize)>; 2]>,
    groups: Vec<GroupState>,
    named_groups: BTreeSet<u32>,
    any_named: bool,
    class_ids: HashMap<ClassId, usize>,
    class_groups: Vec<Vec<u32>>,
    group_classes: Vec<Vec<usize>>,
    with_ports: Vec<usize>,
    service_of: HashMap<IpAddr, ObjKey>,
    /// The node's pods: their isolating policies per direction (ingress, egress).
    local: BTreeMap<ObjKey, [Vec<ObjKey>; 2]>,
    /// Addresses of every selectable pod (what a changed pod had before).
    pod_ips: HashMap<ObjKey, Vec<IpAddr>>,
    /// The other way: per address, the selectable pods holding it, in key order. A changed
    /// address finds its owners here instead of scanning every pod (a change of many pods
    /// would otherwise cost changed x all pods).
    ip_owners: HashMap<IpAddr, BTreeSet<ObjKey>>,
}

impl State {
    /// The rules (and their slots) of the given isolating policies, in policy order.
    fn pod_rules(&self, policies: &[ObjKey], dir: Direction) -> Vec<(&RuleState, Slot)> {
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
    fn in_use(&self, policy: &ObjKey, dir: Direction) -> bool {
        self.rule_range.get(policy).is_some_and(|r| r[dir as usize].is_some())
    }

    /// A pod's tables (cluster IPs aside) under its isolating policies per direction.
    fn compile_pod(&self, classes: &[ClassKey], pod: &Pod, iso: &[Vec<&Policy>; 2]) -> CompiledPod {
        let mut out = CompiledPod { key: pod.key.clone(), ips: pod.ips.clone(), ingress: None, egress: None, pending: None };
        for dir in Direction::BOTH {
            let policies = &iso[dir as usize];
            if policies.is_empty() {
                continue;
            }
            let keys: Vec<ObjKey> = policies.iter().map(|p| p.key.clone()).collect();
            let allows = self.dir_allows(classes, pod, dir, &self.pod_rules(&keys, dir));
            let dp = DirPolicy { allows, policies: keys, audit: policies.iter().all(|p| p.audit) };
            match dir {
                Direction::Ingress => out.ingress = Some(dp),
                Direction::Egress => out.egress = Some(dp),
            }
        }
        out
    }

    /// Registers a new class; returns its index.
    fn add_class(&mut self, classes: &mut Vec<ClassKey>, key: ClassId) -> usize {
        let id = classes.len();
        classes.push(ClassKey {
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
    fn class_allow(&self, classes: &[ClassKey], ci: usize, base: &Allow, pod: &Pod, dir: Direction, pod_rules: &[(&RuleState, Slot)]) -> Option<Allow> {
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
    fn class_key(&self, cluster: &Cluster, addr: IpAddr) -> ClassId {
        // The selectable pods owning the address, in key order (from the index by address).
        let owners: Vec<&Pod> = self
            .ip_owners
            .get(&addr)
            .into_iter()
            .flatten()
            .filter_map(|k| cluster.pods.get(k))
            .filter(|p| p.ips.contains(&addr) && p.selectable())
            .collect();
        let ns_labels = |ns: &str| -> std::borrow::Cow<Labels> {
            match cluster.namespaces.get(ns) {
                Some(n) => std::borrow::Cow::Borrowed(&n.labels),
                None => std::borrow::Cow::Owned(Namespace::implicit(ns).labels),
            }
        };
        let mut members = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            if g.any {
                continue;
            }
            let by_block = g.blocks.iter().any(|b| b.cidr.contains_addr(addr) && !b.except.iter().any(|e| e.contains_addr(addr)));
            let by_pod = by_block
                || owners.iter().any(|p| {
                    g.pods.iter().any(|(nss, sel, own)| {
                        sel.matches(&p.labels)
                            && match nss {
                                None => p.key.namespace == *own,
                                Some(s) => s.matches(ns_labels(&p.key.namespace).as_ref()),
                            }
                    })
                });
            if by_pod {
                members.push(gi as u32);
            }
        }
        let mut ports = Vec::new();
        if !self.named_groups.is_empty() && (self.any_named || members.iter().any(|g| self.named_groups.contains(g))) {
            // The pod an address stands for: the last owner in key order (as the index has it).
            if let Some(q) = owners.last() {
                ports = q.ports.iter().filter_map(|p| p.name.clone().map(|n| (n, p.protocol, p.port))).collect();
                ports.sort();
                ports.dedup();
            }
        }
        (members, ports, self.service_of.get(&addr).cloned())
    }
}

/// Where kube-proxy sends each port of each service that has a class.
type Backends = HashMap<ObjKey, Vec<(ServicePort, Vec<(IpAddr, u16)>)>>;

fn backends_of(cluster: &Cluster, classes: &[ClassKey]) -> Backends {
    let mut out = Backends::default();
    for sk in classes.iter().filter_map(|c| c.service.as_ref()) {
        if !out.contains_key(sk) {
            if let Some(svc) = cluster.services.get(sk) {
                out.insert(sk.clone(), cluster.service_backends(svc));
            }
        }
    }
    out
}

/// Egress to cluster IPs: per service class, the service ports whose backends the pod may
/// reach (by its other entries) on their target ports, attributed to the lowest allowing
/// slot. Always explicit entries (no fallback to class 0).
fn service_allows(prefixes: &BTreeMap<Cidr, usize>, classes: &[ClassKey], backends: &Backends, allows: &BTreeMap<usize, Allow>) -> Vec<(usize, Allow)> {
    let allow_at = |addr: IpAddr| -> Option<&Allow> {
        let class = lpm_class(prefixes, addr);
        allows.get(&class).or_else(|| allows.get(&0))
    };
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
    out
}

/// Compiles the given pods as the pods of one node.
pub fn compile_pods(index: &Index, local: &[&Pod]) -> NodePolicy {
    build(index, local).0
}

/// The policies of `pod`'s namespace that select it and isolate it, per direction (ingress,
/// egress), in key order.
fn isolating<'a>(cluster: &'a Cluster, pod: &Pod) -> [Vec<&'a Policy>; 2] {
    let ns = pod.key.namespace.as_str();
    let selecting: Vec<&Policy> = cluster
        .policies
        .range(ObjKey::new(ns, "")..)
        .take_while(|(k, _)| k.namespace == ns)
        .map(|(_, p)| p)
        .filter(|p| p.pod_selector.matches(&pod.labels))
        .collect();
    Direction::BOTH.map(|d| selecting.iter().copied().filter(|p| p.isolates(d)).collect())
}

fn build(index: &Index, local: &[&Pod]) -> (NodePolicy, State) {
    // Per pod and direction: the isolating policies; every (policy, direction) in use once.
    let mut isolating_of: Vec<[Vec<&Policy>; 2]> = Vec::with_capacity(local.len());
    let mut used: BTreeMap<(&ObjKey, Direction), &Policy> = BTreeMap::new();
    for pod in local {
        let per_dir = isolating(index.cluster, pod);
        for (d, v) in Direction::BOTH.into_iter().zip(&per_dir) {
            for p in v {
                used.insert((&p.key, d), p);
            }
        }
        isolating_of.push(per_dir);
    }

    // Resolve every rule in use once; rules are numbered in RuleRef order. Rules with the same
    // peers share one peer set ("group"): classes are computed over groups.
    type PodPeerKey<'s> = (Option<&'s Selector>, &'s Selector, Option<&'s str>);
    let mut pod_peer_cache: HashMap<PodPeerKey, PodIps> = HashMap::default();
    let empty = PodIps(Rc::new(Vec::new()));
    let mut groups: Vec<PeerSet> = Vec::new();
    let mut group_states: Vec<GroupState> = Vec::new();
    let mut group_ids: HashMap<PeerSet, u32> = HashMap::default();
    let mut rules: Vec<RuleState> = Vec::new();
    let mut rule_range: HashMap<ObjKey, [Option<(usize, usize)>; 2]> = HashMap::default();
    for ((key, dir), pol) in &used {
        let first = rules.len();
        for (i, rule) in pol.rules(*dir).iter().enumerate() {
            let set = match &rule.peers {
                None => PeerSet::Any,
                Some(peers) => {
                    let mut blocks = Vec::new();
                    let mut lists: Vec<PodIps> = Vec::new();
                    for peer in peers {
                        match peer {
                            Peer::IpBlock(b) => blocks.push(b),
                            Peer::Pods { namespaces, pods } => {
                                let own = namespaces.is_none().then_some(pol.key.namespace.as_str());
                                let list = pod_peer_cache
                                    .entry((namespaces.as_ref(), pods, own))
                                    .or_insert_with(|| {
                                        let mut v: Vec<IpAddr> = index
                                            .peer_pods(&pol.key.namespace, namespaces, pods)
                                            .iter()
                                            .flat_map(|p| p.ips.iter().copied())
                                            .collect();
                                        v.sort_unstable();
                                        v.dedup();
                                        PodIps(Rc::new(v))
                                    })
                                    .clone();
                                lists.push(list);
                            }
                        }
                    }
                    blocks.sort_by_key(|b| (b.cidr, b.except.clone()));
                    blocks.dedup();
                    lists.dedup();
                    let pod_ips = match lists.len() {
                        0 => empty.clone(),
                        1 => lists.pop().unwrap(),
                        _ => {
                            let mut v: Vec<IpAddr> = lists.iter().flat_map(|l| l.iter().copied()).collect();
                            v.sort_unstable();
                            v.dedup();
                            PodIps(Rc::new(v))
                        }
                    };
                    PeerSet::Some { blocks, pod_ips }
                }
            };
            let any = matches!(set, PeerSet::Any);
            let group = match group_ids.get(&set) {
                Some(g) => *g,
                None => {
                    let g = groups.len() as u32;
                    let state = match &set {
                        PeerSet::Any => GroupState { any: true, blocks: Vec::new(), pods: Vec::new() },
                        PeerSet::Some { blocks, .. } => GroupState {
                            any: false,
                            blocks: blocks.iter().map(|b| (*b).clone()).collect(),
                            pods: rule
                                .peers
                                .iter()
                                .flatten()
                                .filter_map(|p| match p {
                                    Peer::Pods { namespaces, pods } => {
                                        Some((namespaces.clone(), pods.clone(), pol.key.namespace.clone()))
                                    }
                                    Peer::IpBlock(_) => None,
                                })
                                .collect(),
                        },
                    };
                    group_states.push(state);
                    groups.push(set.clone());
                    group_ids.insert(set, g);
                    g
                }
            };
            rules.push(RuleState {
                rref: RuleRef { policy: pol.key.clone(), dir: *dir, index: i },
                rule: rule.clone(),
                group,
                any,
                named_egress: *dir == Direction::Egress && has_named(rule),
            });
        }
        rule_range.entry((*key).clone()).or_default()[*dir as usize] = Some((first, rules.len()));
    }

    // Candidate prefixes: every cidr and except, every peer pod address, and (for egress rules
    // with named ports, which resolve against each destination pod) every pod address such a
    // rule covers.
    let named_groups: BTreeSet<u32> = rules.iter().filter(|r| r.named_egress).map(|r| r.group).collect();
    let any_named = named_groups.iter().any(|g| matches!(groups[*g as usize], PeerSet::Any));
    let mut cands: Vec<Cidr> = Vec::new();
    let mut seen_lists: BTreeSet<*const Vec<IpAddr>> = BTreeSet::new();
    for g in &groups {
        if let PeerSet::Some { blocks, pod_ips } = g {
            for b in blocks {
                cands.push(b.cidr);
                cands.extend(b.except.iter().copied());
            }
            if seen_lists.insert(Rc::as_ptr(&pod_ips.0)) {
                cands.extend(pod_ips.iter().map(|ip| Cidr::host(*ip)));
            }
        }
    }
    if !named_groups.is_empty() {
        for ip in index.pod_by_ip.keys() {
            let host = Cidr::host(*ip);
            if any_named || named_groups.iter().any(|g| groups[*g as usize].contains_region(&host)) {
                cands.push(host);
            }
        }
    }
    // Every service cluster IP is a class of its own.
    let mut service_of: HashMap<IpAddr, ObjKey> = HashMap::default();
    for svc in index.cluster.services.values() {
        for ip in &svc.cluster_ips {
            service_of.insert(*ip, svc.key.clone());
            cands.push(Cidr::host(*ip));
        }
    }
    cands.sort_unstable();
    cands.dedup();
    let host_idx: HashMap<IpAddr, usize> =
        cands.iter().enumerate().filter(|(_, c)| c.is_host()).map(|(i, c)| (c.addr(), i)).collect();

    // Membership: each peer set marks the candidates whose region it contains.
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); cands.len()];
    let mut list_hits: HashMap<*const Vec<IpAddr>, Rc<Vec<usize>>> = HashMap::default();
    for (gi, g) in groups.iter().enumerate() {
        let PeerSet::Some { blocks, pod_ips } = g else { continue };
        let mut hits: Vec<usize> = Vec::new();
        for b in blocks {
            // Candidates inside the cidr are a contiguous run in (address, length) order.
            let lo = cands.partition_point(|c| *c < b.cidr);
            for (i, c) in cands.iter().enumerate().skip(lo) {
                if !b.cidr.contains_addr(c.addr()) {
                    break;
                }
                if c.len() >= b.cidr.len() && !b.except.iter().any(|e| e.contains(c)) {
                    hits.push(i);
                }
            }
        }
        let from_pods = list_hits
            .entry(Rc::as_ptr(&pod_ips.0))
            .or_insert_with(|| Rc::new(pod_ips.iter().filter_map(|ip| host_idx.get(ip).copied()).collect()))
            .clone();
        // Groups are visited in order, so each candidate's list stays sorted; a candidate hit
        // twice by one group is marked once.
        for i in hits.into_iter().chain(from_pods.iter().copied()) {
            if members[i].last() != Some(&(gi as u32)) {
                members[i].push(gi as u32);
            }
        }
    }
    drop(groups);

    let mut pod_ips: HashMap<ObjKey, Vec<IpAddr>> = HashMap::with_capacity_and_hasher(index.cluster.pods.len(), Default::default());
    let mut ip_owners: HashMap<IpAddr, BTreeSet<ObjKey>> = HashMap::with_capacity_and_hasher(index.cluster.pods.len(), Default::default());
    for p in index.cluster.pods.values().filter(|p| p.selectable()) {
        pod_ips.insert(p.key.clone(), p.ips.clone());
        for ip in &p.ips {
            ip_owners.entry(*ip).or_default().insert(p.key.clone());
        }
    }
    let mut st = State {
        group_classes: vec![Vec::new(); group_states.len()],
        rules,
        rule_range,
        groups: group_states,
        named_groups,
        any_named,
        class_ids: HashMap::default(),
        class_groups: vec![Vec::new()],
        with_ports: Vec::new(),
        service_of,
        local: BTreeMap::new(),
        pod_ips,
        ip_owners,
    };

    // Classes: candidates in the same peer sets (and, under named egress rules, with the same
    // pod ports) are one class. A cluster IP is a class of its own: egress to it is decided by
    // its backends (below); as a source address it is an address like any other.
    let mut classes: Vec<ClassKey> = vec![ClassKey::default()];
    st.class_ids.insert((Vec::new(), Vec::new(), None), 0);
    let mut table: BTreeMap<Cidr, usize> = BTreeMap::new();
    for (i, prefix) in cands.iter().enumerate() {
        let mut ports = Vec::new();
        if prefix.is_host()
            && !st.named_groups.is_empty()
            && (st.any_named || members[i].iter().any(|g| st.named_groups.contains(g)))
        {
            if let Some(q) = index.pod_by_ip(prefix.addr()) {
                ports = q.ports.iter().filter_map(|p| p.name.clone().map(|n| (n, p.protocol, p.port))).collect();
                ports.sort();
                ports.dedup();
            }
        }
        let service = if prefix.is_host() { st.service_of.get(&prefix.addr()).cloned() } else { None };
        let key = (std::mem::take(&mut members[i]), ports, service);
        let id = match st.class_ids.get(&key) {
            Some(id) => *id,
            None => st.add_class(&mut classes, key),
        };
        table.insert(*prefix, id);
    }
    let prefixes = prune(table);
    let backends = backends_of(index.cluster, &classes);

    // Per pod, direction and class: the allowed ports.
    let mut pods = BTreeMap::new();
    for (pod, per_dir) in local.iter().zip(isolating_of) {
        let mut out = st.compile_pod(&classes, pod, &per_dir);
        if let Some(dp) = out.egress.as_mut() {
            let svc = service_allows(&prefixes, &classes, &backends, &dp.allows);
            dp.allows.extend(svc);
        }
        st.local.insert(pod.key.clone(), per_dir.map(|v| v.iter().map(|p| p.key.clone()).collect()));
        pods.insert(pod.key.clone(), out);
    }
    let epoch = EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (NodePolicy { epoch, classes, prefixes, pods, prefix_gen: 0, touched_prefixes: BTreeMap::new() }, st)
}

/// Why a packet is allowed or denied in one direction at one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub dir: Direction,
    /// Some policy isolates the pod in this direction.
    pub isolated: bool,
    /// The policies that isolate it.
    pub policies: Vec<ObjKey>,
    /// The rules whose peers and ports match the packet.
    pub allowing_rules: Vec<RuleRef>,
    /// The compiled verdict passes the packet (what the datapath does).
    pub allowed: bool,
    /// Allow, or Audit (an audit-mode policy would drop it; it passes), or Deny.
    pub verdict: Verdict,
}

/// Explains the compiled verdict for `pod` (compiled in `node`) in direction `dir`.
pub fn explain(cluster: &Cluster, node: &NodePolicy, pod: &ObjKey, dir: Direction, peer: IpAddr, proto: u8, port: Option<u16>) -> Explanation {
    let verdict = node.verdict(pod, dir, peer, proto, port);
    let mut out = Explanation { dir, isolated: false, policies: Vec::new(), allowing_rules: Vec::new(), allowed: verdict.passes(), verdict };
    let (Some(compiled), Some(p)) = (node.pods.get(pod), cluster.pods.get(pod)) else { return out };
    let Some(dp) = compiled.dir(dir) else { return out };
    out.isolated = true;
    out.policies = dp.policies.clone();
    let class = &node.classes[node.class_of(peer)];
    // For a cluster IP, the rules that let the pod reach a backend on its target port for a
    // service port matching the packet.
    let targets: Vec<(IpAddr, u8, Option<u16>)> = match class.service.as_ref().and_then(|k| cluster.services.get(k)) {
        Some(svc) if dir == Direction::Egress => cluster
            .service_backends(svc)
            .into_iter()
            .filter(|(sp, _)| sp.protocol.number() == proto && Some(sp.port) == port)
            .flat_map(|(_, b)| b.into_iter().map(|(a, t)| (a, proto, Some(t))))
            .collect(),
        _ => vec![(peer, proto, port)],
    };
    for pk in &dp.policies {
        let Some(pol) = cluster.policies.get(pk) else { continue };
        for (i, rule) in pol.rules(dir).iter().enumerate() {
            let r = RuleRef { policy: pk.clone(), dir, index: i };
            let matches = targets.iter().any(|(addr, proto, port)| {
                let class = if class.service.is_some() && dir == Direction::Egress { &node.classes[node.class_of(*addr)] } else { class };
                debug_assert!(class.service.is_none() || dir == Direction::Ingress);
                let peer_ok = rule.peers.is_none() || class.rules.binary_search(&r).is_ok();
                peer_ok && rule_allow(p, dir, rule, class, 0).permits(*proto, *port)
            });
            if matches {
                out.allowing_rules.push(r);
            }
        }
    }
    out
}

/// Ports a rule allows to the addresses of a class.
fn rule_allow(pod: &Pod, dir: Direction, rule: &Rule, class: &ClassKey, slot: Slot) -> Allow {
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

/// The class of `addr` in a pruned prefix table (longest match, class 0 if none).
fn lpm_class(prefixes: &BTreeMap<Cidr, usize>, addr: IpAddr) -> usize {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    for len in (0..=max).rev() {
        if let Some(c) = prefixes.get(&Cidr::new(addr, len)) {
            return *c;
        }
    }
    0
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

mod incremental;
pub use incremental::{full_is_cheaper, NodeCompiler, UpdateKind, FULL_FRACTION, INCREMENTAL_MAX_ALWAYS};

#[cfg(test)]
mod tests;

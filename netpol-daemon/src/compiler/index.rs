//! Cluster-wide lookups a compilation builds once: pods by namespace and by address, the
//! labels of every namespace pods live in ([`Index`]); the policies isolating a pod; and the
//! peers of a rule resolved against the cluster ([`PeerSet`]), with the addresses of the pods
//! a selector pair picks computed once for every rule that names the same selectors.
use std::borrow::Cow;
use std::net::IpAddr;
use std::rc::Rc;

use super::HashMap;
use ipnet::IpNet;

use crate::model::cidr;
use crate::model::*;

/// Cluster-wide lookups built once per compilation.
pub struct Index<'a> {
    pub(super) cluster: &'a Cluster,
    pods_by_ns: HashMap<&'a str, Vec<&'a Pod>>,
    pub(super) pod_by_ip: HashMap<IpAddr, &'a Pod>,
    /// Labels of every namespace that exists or has pods (implicit ones carry only the
    /// automatic name label).
    ns_labels: Vec<(&'a str, Cow<'a, Labels>)>,
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
        let implicit: Vec<&str> = pods_by_ns.keys().filter(|n| !cluster.namespaces.contains_key(**n)).copied().collect();
        let ns_labels = cluster.namespaces.keys().map(|n| n.as_str()).chain(implicit).map(|n| (n, cluster.namespace_labels(n))).collect();
        Index { cluster, pods_by_ns, pod_by_ip, ns_labels }
    }

    /// The selectable pods a pod peer picks: in `namespaces` (`None`: the policy's own
    /// namespace, `policy_ns`), matching `pods`.
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

/// The policies of `pod`'s namespace that select it and isolate it, per direction (ingress,
/// egress), in key order.
pub(super) fn isolating<'a>(cluster: &'a Cluster, pod: &Pod) -> [Vec<&'a Policy>; 2] {
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

/// Does the rule name a port by name (resolved against each peer pod's container ports)?
pub(super) fn has_named(rule: &Rule) -> bool {
    rule.ports.iter().flatten().any(|p| matches!(p.port, PortRef::Named(_)))
}

/// Is all of `prefix` in the block (inside its cidr, under none of its excepts)? For
/// candidate prefixes, which are nested or disjoint with every cidr and except.
pub(super) fn block_holds(block: &IpBlock, prefix: &IpNet) -> bool {
    block.cidr.contains(prefix) && !block.except.iter().any(|e| e.contains(prefix))
}

/// The addresses of the pods a peer selects: sorted, shared by every rule with the same
/// selectors, compared by identity (equal selectors give the same list).
#[derive(Clone)]
pub(super) struct PodIps(pub(super) Rc<Vec<IpAddr>>);

impl PodIps {
    /// The sorted distinct addresses of `ips`.
    fn of(ips: impl Iterator<Item = IpAddr>) -> PodIps {
        let mut v: Vec<IpAddr> = ips.collect();
        v.sort_unstable();
        v.dedup();
        PodIps(Rc::new(v))
    }
}

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
pub(super) enum PeerSet<'a> {
    Any,
    /// Address blocks, and the addresses of the selected pods.
    Some {
        blocks: Vec<Cow<'a, IpBlock>>,
        pod_ips: PodIps,
    },
}

impl PeerSet<'_> {
    /// Is the region of `prefix` (its addresses not under a longer candidate) in the set?
    pub(super) fn contains_region(&self, prefix: &IpNet) -> bool {
        match self {
            PeerSet::Any => true,
            PeerSet::Some { blocks, pod_ips } => {
                (cidr::is_host(prefix) && pod_ips.binary_search(&prefix.addr()).is_ok()) || blocks.iter().any(|b| block_holds(b, prefix))
            }
        }
    }
}

/// Selectors of a pod peer and the namespace they stand for when the namespace selector is
/// absent: peers with the same key select the same pods.
type PodPeerKey<'a> = (Option<&'a Selector>, &'a Selector, Option<&'a str>);

/// Resolves rules' peers, each distinct pod peer once.
pub(super) struct PeerResolver<'i, 'a> {
    index: &'i Index<'a>,
    pod_peers: HashMap<PodPeerKey<'a>, PodIps>,
    /// The one empty list (peer sets without pod peers compare equal).
    empty: PodIps,
}

impl<'i, 'a> PeerResolver<'i, 'a> {
    pub(super) fn new(index: &'i Index<'a>) -> Self {
        PeerResolver { index, pod_peers: HashMap::default(), empty: PodIps(Rc::new(Vec::new())) }
    }

    /// The peers of `rule`, a rule of `policy`.
    pub(super) fn peer_set(&mut self, policy: &'a Policy, rule: &'a Rule) -> PeerSet<'a> {
        let Some(peers) = &rule.peers else { return PeerSet::Any };
        let mut blocks = Vec::new();
        let mut lists: Vec<PodIps> = Vec::new();
        for peer in peers {
            match peer {
                Peer::IpBlock(b) => blocks.push(Cow::Borrowed(b)),
                Peer::Pods { namespaces, pods } => lists.push(self.pod_ips(&policy.key.namespace, namespaces, pods)),
            }
        }
        self.assemble(blocks, lists)
    }

    /// The peers of a ClusterNetworkPolicy rule: its pods (never host-network ones), its
    /// networks and the addresses of its nodes.
    pub(super) fn cluster_peer_set(&mut self, rule: &'a ClusterRule) -> PeerSet<'a> {
        let mut blocks: Vec<Cow<'a, IpBlock>> = Vec::new();
        let mut lists: Vec<PodIps> = Vec::new();
        for peer in &rule.peers {
            match peer {
                ClusterPeer::Pods(set) => lists.push(self.pod_set_ips(set)),
                ClusterPeer::Networks(nets) => {
                    blocks.extend(nets.iter().map(|n| Cow::Owned(IpBlock { cidr: n.trunc(), except: Vec::new() })))
                }
                ClusterPeer::Nodes(sel) => {
                    let nodes = self.index.cluster.nodes.values().filter(|n| sel.matches(&n.labels));
                    let hosts =
                        nodes.flat_map(|n| n.addresses.iter().map(|a| Cow::Owned(IpBlock { cidr: IpNet::from(*a), except: Vec::new() })));
                    blocks.extend(hosts);
                }
            }
        }
        self.assemble(blocks, lists)
    }

    /// A peer set from a rule's blocks and its pod peers' address lists (sorted, distinct; one
    /// list shared as it is, several merged).
    fn assemble(&self, mut blocks: Vec<Cow<'a, IpBlock>>, mut lists: Vec<PodIps>) -> PeerSet<'a> {
        blocks.sort_by_key(|b| (b.cidr, b.except.clone()));
        blocks.dedup();
        lists.dedup();
        let pod_ips = match lists.len() {
            0 => self.empty.clone(),
            1 => lists.pop().unwrap(),
            _ => PodIps::of(lists.iter().flat_map(|l| l.iter().copied())),
        };
        PeerSet::Some { blocks, pod_ips }
    }

    /// The addresses of the pods of a ClusterNetworkPolicy pod set (as a NetworkPolicy peer
    /// with both selectors: the same key, the same list).
    fn pod_set_ips(&mut self, set: &'a PodSet) -> PodIps {
        let index = self.index;
        let nss = Some(set.namespaces.clone());
        let pick = || PodIps::of(index.peer_pods("", &nss, &set.pods).iter().flat_map(|p| p.ips.iter().copied()));
        self.pod_peers.entry((Some(&set.namespaces), &set.pods, None)).or_insert_with(pick).clone()
    }

    /// The addresses of the pods one pod peer of a policy in `policy_ns` selects.
    fn pod_ips(&mut self, policy_ns: &'a str, namespaces: &'a Option<Selector>, pods: &'a Selector) -> PodIps {
        let index = self.index;
        let own = namespaces.is_none().then_some(policy_ns);
        let pick = || PodIps::of(index.peer_pods(policy_ns, namespaces, pods).iter().flat_map(|p| p.ips.iter().copied()));
        self.pod_peers.entry((namespaces.as_ref(), pods, own)).or_insert_with(pick).clone()
    }
}

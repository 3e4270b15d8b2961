//! The cluster aggregate: every object the compiler reads, keyed, and what changed between two
//! states of it.
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::*;

/// The whole cluster state the compiler reads.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjKey, Pod>,
    pub policies: BTreeMap<ObjKey, Policy>,
    pub services: BTreeMap<ObjKey, Service>,
    pub endpoint_slices: BTreeMap<ObjKey, EndpointSlice>,
    /// ClusterNetworkPolicies by name. Not enforced yet (issue 22): the compiler does not read
    /// them; the manifests source loads them and the reference evaluator decides with them.
    pub cluster_policies: BTreeMap<String, ClusterPolicy>,
    /// Nodes by name: what ClusterNetworkPolicy `nodes` peers select.
    pub nodes: BTreeMap<String, Node>,
}

impl Cluster {
    /// Where kube-proxy sends each service port: (backend address, target port) pairs. From
    /// the service's EndpointSlices when it has any, else from its selector and the pods'
    /// container ports (named target ports resolved per pod).
    pub fn service_backends(&self, svc: &Service) -> Vec<(ServicePort, Vec<(IpAddr, u16)>)> {
        let slices: Vec<&EndpointSlice> =
            self.endpoint_slices.values().filter(|s| s.key.namespace == svc.key.namespace && s.service == svc.key.name).collect();
        svc.ports
            .iter()
            .map(|sp| {
                let mut backends = Vec::new();
                if !slices.is_empty() {
                    for sl in &slices {
                        for (name, proto, port) in &sl.ports {
                            if *name == sp.name && *proto == sp.protocol {
                                backends.extend(sl.addresses.iter().map(|a| (*a, *port)));
                            }
                        }
                    }
                } else if let Some(sel) = &svc.selector {
                    for p in self.pods.values().filter(|p| {
                        p.selectable() && p.key.namespace == svc.key.namespace && sel.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                    }) {
                        let ports: Vec<u16> = match &sp.target {
                            TargetPort::Number(n) => vec![*n],
                            TargetPort::Named(n) => p.named_ports(n, sp.protocol).collect(),
                        };
                        for ip in &p.ips {
                            backends.extend(ports.iter().map(|t| (*ip, *t)));
                        }
                    }
                }
                backends.sort_unstable();
                backends.dedup();
                (sp.clone(), backends)
            })
            .collect()
    }

    /// The pod-network pod holding `ip` (host-network pods share their node's addresses).
    pub fn pod_with_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods.values().find(|p| !p.host_network && p.ips.contains(&ip))
    }

    /// The service whose cluster IP is `ip`.
    pub fn service_with_ip(&self, ip: IpAddr) -> Option<&Service> {
        self.services.values().find(|s| s.cluster_ips.contains(&ip))
    }

    /// Namespace labels; namespaces known only through their pods or policies get the
    /// automatic `kubernetes.io/metadata.name` label.
    pub fn namespace(&self, name: &str) -> Namespace {
        self.namespaces.get(name).cloned().unwrap_or_else(|| Namespace::implicit(name))
    }

    /// The labels of [`Cluster::namespace`], borrowed where the namespace is known.
    pub fn namespace_labels(&self, name: &str) -> Cow<'_, Labels> {
        match self.namespaces.get(name) {
            Some(ns) => Cow::Borrowed(&ns.labels),
            None => Cow::Owned(Namespace::implicit(name).labels),
        }
    }

    /// Every pod scheduled on `node` ([`Pod::is_on`]).
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.values().filter(move |p| p.is_on(node))
    }

    /// The pods `node` enforces policy for: on it and [`Pod::selectable`] (not host-network,
    /// with an address).
    pub fn local_pods<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods_on(node).filter(|p| p.selectable())
    }

    /// The pods on `node` still waiting for an address ([`Pod::awaits_address`]).
    pub fn unaddressed_pods<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods_on(node).filter(|p| p.awaits_address())
    }

    /// Adds `obj`, replacing the object of its kind with its key.
    pub fn insert(&mut self, obj: Object) {
        match obj {
            Object::Namespace(ns) => {
                self.namespaces.insert(ns.name.clone(), ns);
            }
            Object::Pod(p) => {
                self.pods.insert(p.key.clone(), p);
            }
            Object::Policy(p) => {
                self.policies.insert(p.key.clone(), p);
            }
            Object::Service(s) => {
                self.services.insert(s.key.clone(), s);
            }
            Object::EndpointSlice(s) => {
                self.endpoint_slices.insert(s.key.clone(), s);
            }
            Object::ClusterPolicy(p) => {
                self.cluster_policies.insert(p.name.clone(), p);
            }
            Object::Node(n) => {
                self.nodes.insert(n.name.clone(), n);
            }
        }
    }
}

/// The kinds of object the model holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    Policy,
    Service,
    EndpointSlice,
    ClusterPolicy,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 7] =
        [Kind::Namespace, Kind::Pod, Kind::Policy, Kind::Service, Kind::EndpointSlice, Kind::ClusterPolicy, Kind::Node];

    /// Cluster-scoped: its objects' keys have no namespace.
    pub fn cluster_scoped(self) -> bool {
        matches!(self, Kind::Namespace | Kind::ClusterPolicy | Kind::Node)
    }
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Policy(_) => Kind::Policy,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::ClusterPolicy(_) => Kind::ClusterPolicy,
            Object::Node(_) => Kind::Node,
        }
    }

    /// The object's key (a namespace's, a ClusterNetworkPolicy's or a node's: no namespace, its
    /// name).
    pub fn key(&self) -> ObjKey {
        match self {
            Object::Namespace(ns) => ObjKey::new("", ns.name.clone()),
            Object::Pod(p) => p.key.clone(),
            Object::Policy(p) => p.key.clone(),
            Object::Service(s) => s.key.clone(),
            Object::EndpointSlice(s) => s.key.clone(),
            Object::ClusterPolicy(p) => ObjKey::new("", p.name.clone()),
            Object::Node(n) => ObjKey::new("", n.name.clone()),
        }
    }
}

/// Puts `v` at `k` unless the same value is there; whether anything changed.
fn put_one<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, k: K, v: V) -> bool {
    match map.get_mut(&k) {
        Some(old) if *old == v => false,
        Some(old) => {
            *old = v;
            true
        }
        None => {
            map.insert(k, v);
            true
        }
    }
}

impl Cluster {
    /// Adds or replaces `obj`, noting in `ch` what that changed (nothing when it is already
    /// there as it is).
    pub fn put(&mut self, obj: Object, ch: &mut ChangeSet) {
        match obj {
            Object::Namespace(ns) => ch.namespaces |= put_one(&mut self.namespaces, ns.name.clone(), ns),
            Object::Pod(p) => {
                let key = p.key.clone();
                if put_one(&mut self.pods, key.clone(), p) {
                    ch.pods.insert(key);
                }
            }
            Object::Policy(p) => ch.policies |= put_one(&mut self.policies, p.key.clone(), p),
            Object::Service(s) => ch.services |= put_one(&mut self.services, s.key.clone(), s),
            Object::EndpointSlice(s) => ch.endpoint_slices |= put_one(&mut self.endpoint_slices, s.key.clone(), s),
            Object::ClusterPolicy(p) => ch.cluster_policies |= put_one(&mut self.cluster_policies, p.name.clone(), p),
            Object::Node(n) => ch.nodes |= put_one(&mut self.nodes, n.name.clone(), n),
        }
    }

    /// Removes the object of `kind` at `key` (if any), noting it in `ch`.
    pub fn remove(&mut self, kind: Kind, key: &ObjKey, ch: &mut ChangeSet) {
        match kind {
            Kind::Namespace => ch.namespaces |= self.namespaces.remove(&key.name).is_some(),
            Kind::Pod => {
                if self.pods.remove(key).is_some() {
                    ch.pods.insert(key.clone());
                }
            }
            Kind::Policy => ch.policies |= self.policies.remove(key).is_some(),
            Kind::Service => ch.services |= self.services.remove(key).is_some(),
            Kind::EndpointSlice => ch.endpoint_slices |= self.endpoint_slices.remove(key).is_some(),
            Kind::ClusterPolicy => ch.cluster_policies |= self.cluster_policies.remove(&key.name).is_some(),
            Kind::Node => ch.nodes |= self.nodes.remove(&key.name).is_some(),
        }
    }

    /// The keys of every object of `kind` (namespaces as [`Object::key`] makes them).
    pub fn keys(&self, kind: Kind) -> Vec<ObjKey> {
        match kind {
            Kind::Namespace => self.namespaces.keys().map(|n| ObjKey::new("", n.clone())).collect(),
            Kind::Pod => self.pods.keys().cloned().collect(),
            Kind::Policy => self.policies.keys().cloned().collect(),
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.endpoint_slices.keys().cloned().collect(),
            Kind::ClusterPolicy => self.cluster_policies.keys().map(|n| ObjKey::new("", n.clone())).collect(),
            Kind::Node => self.nodes.keys().map(|n| ObjKey::new("", n.clone())).collect(),
        }
    }
}

/// What changed in the cluster since the last update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// Anything may have changed (first load, a resync).
    pub all: bool,
    pub namespaces: bool,
    pub policies: bool,
    pub services: bool,
    pub endpoint_slices: bool,
    /// ClusterNetworkPolicies (the compiler does not read them yet: no recompilation needed).
    pub cluster_policies: bool,
    /// Nodes (what ClusterNetworkPolicy `nodes` peers select).
    pub nodes: bool,
    /// Pods added, removed or changed.
    pub pods: BTreeSet<ObjKey>,
}

impl ChangeSet {
    pub fn everything() -> ChangeSet {
        ChangeSet { all: true, ..Default::default() }
    }

    pub fn is_empty(&self) -> bool {
        !self.all
            && !self.namespaces
            && !self.policies
            && !self.services
            && !self.endpoint_slices
            && !self.cluster_policies
            && !self.nodes
            && self.pods.is_empty()
    }

    pub fn merge(&mut self, o: ChangeSet) {
        self.all |= o.all;
        self.namespaces |= o.namespaces;
        self.policies |= o.policies;
        self.services |= o.services;
        self.endpoint_slices |= o.endpoint_slices;
        self.cluster_policies |= o.cluster_policies;
        self.nodes |= o.nodes;
        self.pods.extend(o.pods);
    }
}

impl Cluster {
    /// Replaces the whole state with `new` (a fresh snapshot); returns what differs.
    pub fn replace(&mut self, new: Cluster) -> ChangeSet {
        fn differ<K: Ord + Clone, V: PartialEq>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> Vec<K> {
            let mut out: Vec<K> = a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).map(|(k, _)| k.clone()).collect();
            out.extend(b.keys().filter(|k| !a.contains_key(*k)).cloned());
            out
        }
        let ch = ChangeSet {
            all: false,
            namespaces: !differ(&self.namespaces, &new.namespaces).is_empty(),
            policies: !differ(&self.policies, &new.policies).is_empty(),
            services: !differ(&self.services, &new.services).is_empty(),
            endpoint_slices: !differ(&self.endpoint_slices, &new.endpoint_slices).is_empty(),
            cluster_policies: !differ(&self.cluster_policies, &new.cluster_policies).is_empty(),
            nodes: !differ(&self.nodes, &new.nodes).is_empty(),
            pods: differ(&self.pods, &new.pods).into_iter().collect(),
        };
        *self = new;
        ch
    }
}

/// What happens to a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Allow,
    /// Denied by an audit-mode policy: counted, logged, let through.
    Audit,
    Deny,
}

impl Verdict {
    pub fn passes(self) -> bool {
        self != Verdict::Deny
    }
}

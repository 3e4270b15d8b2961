//! Interface resolution: where each of this node's pods sits on the host (its veth, or the
//! bridge port it is behind), which new pod interfaces no known pod claims yet (pending: held
//! default-deny by the compiler until their pod is known), and the node's own addresses. All
//! of it is looked up through netlink ([`super::netlink`]), on the daemon's schedule: pods whose
//! interface is not there yet every second, every pod every [`FULL_RESOLVE_EVERY`].
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::netlink;
use crate::compiler::{NodePolicy, PendingIface};
use crate::datapath::Iface;
use crate::model::{Cluster, ObjKey, Pod};

/// How long an interface nobody claims is held default-deny (a host route through a veth that
/// is not a pod's after all is released).
const PENDING_MAX: Duration = Duration::from_secs(60);

/// How often every pod's interface is looked up again (a pod sandbox recreated behind the same
/// address gets a new veth).
pub const FULL_RESOLVE_EVERY: Duration = Duration::from_secs(2);

/// How often pods whose interface is not there yet are looked up again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

pub struct Interfaces {
    /// Where each pod was found, for its addresses then: looked up again when they change, when
    /// the interface is gone, and every few seconds. A bridge port whose forwarding entry aged
    /// out (a quiet pod) stays the pod's as long as the interface exists under the same name.
    known: BTreeMap<ObjKey, (Vec<IpAddr>, Iface)>,
    /// Pod interfaces (veth host routes) no known pod address claims yet: first seen.
    unclaimed: BTreeMap<u32, (IpAddr, Instant)>,
    last_pending: Vec<u32>,
    /// This node's pods in the current cluster state, and their addresses (recomputed on a
    /// load that changes one of them).
    local_pods: BTreeSet<ObjKey>,
    local_ips: BTreeSet<IpAddr>,
    /// Some pod of this node has no address yet: only then are host routes watched.
    awaiting_ip: bool,
    /// Some pod's interface was not found on the last look-up.
    unresolved: bool,
    last_resolve: Instant,
    last_full_resolve: Instant,
    /// The node's addresses kubelet reaches pods from (`None`: not looked up yet; a node may
    /// have none, and that is not looked up again on every pass).
    node_addrs: Option<Vec<IpAddr>>,
}

/// Where the pods were found by one look-up.
pub struct Resolved {
    pub ifaces: BTreeMap<ObjKey, Iface>,
    /// The pods whose interface is not there (yet).
    pub errors: Vec<String>,
    /// Every pod where it was on the previous look-up.
    pub same: bool,
}

impl Default for Interfaces {
    fn default() -> Interfaces {
        Interfaces {
            known: BTreeMap::new(),
            unclaimed: BTreeMap::new(),
            last_pending: Vec::new(),
            local_pods: BTreeSet::new(),
            local_ips: BTreeSet::new(),
            awaiting_ip: false,
            unresolved: false,
            last_resolve: Instant::now() - Duration::from_secs(3600),
            last_full_resolve: Instant::now(),
            node_addrs: None,
        }
    }
}

impl Interfaces {
    /// Pods whose interface was not there are due for another look.
    pub fn retry_due(&self) -> bool {
        self.unresolved && self.last_resolve.elapsed() >= RETRY_EVERY
    }

    /// Every pod's interface (and the node's addresses) is due for another look.
    pub fn full_due(&self) -> bool {
        self.last_full_resolve.elapsed() >= FULL_RESOLVE_EVERY
    }

    /// The full look-up may still be put off (it is not overdue).
    pub fn full_may_wait(&self) -> bool {
        self.last_full_resolve.elapsed() < 2 * FULL_RESOLVE_EVERY
    }

    /// A look-up starts (`full`: every pod afresh); returns whether it looks every pod up
    /// (periodically, or on the first pass).
    pub fn begin(&mut self, full: bool) -> bool {
        self.last_resolve = Instant::now();
        full || self.known.is_empty()
    }

    /// The look-up of every pod is done.
    pub fn full_done(&mut self) {
        self.last_full_resolve = Instant::now();
    }

    /// The cluster's pods `changed` (every one when `everything`): which addresses are this
    /// node's pods', and whether one of them has none yet. Only a pod that is or was on this
    /// node can change either: the others' changes (a node hears every pod of the cluster)
    /// cost a look at their node name, not a walk over the cluster.
    pub fn pods_changed(&mut self, cluster: &Cluster, node_name: &str, changed: &BTreeSet<ObjKey>, everything: bool) {
        let ours = |k: &ObjKey| self.local_pods.contains(k) || cluster.pods.get(k).is_some_and(|p| p.is_on(node_name));
        if !everything && !changed.iter().any(ours) {
            return;
        }
        let pods: Vec<&Pod> = cluster.pods_on(node_name).collect();
        self.local_pods = pods.iter().map(|p| p.key.clone()).collect();
        self.local_ips = pods.iter().flat_map(|p| p.ips.iter().copied()).collect();
        self.awaiting_ip = pods.iter().any(|p| p.awaits_address());
    }

    /// New pod interfaces that no known pod claims: programmed default-deny (for the
    /// directions every pending pod's policies isolate) until their pod is known. Returns
    /// those held now and whether that changed.
    pub fn track_unclaimed(&mut self) -> (Vec<u32>, bool) {
        let routes = if self.awaiting_ip { netlink::veth_host_routes().unwrap_or_default() } else { Vec::new() };
        let local_ips = &self.local_ips;
        self.unclaimed.retain(|ifindex, (ip, _)| routes.iter().any(|(a, i)| a == ip && i == ifindex) && !local_ips.contains(ip));
        for (ip, ifindex) in &routes {
            if !local_ips.contains(ip) {
                self.unclaimed.entry(*ifindex).or_insert((*ip, Instant::now()));
            }
        }
        let pending: Vec<u32> = self.unclaimed.iter().filter(|(_, (_, t))| t.elapsed() < PENDING_MAX).map(|(i, _)| *i).collect();
        let changed = pending != self.last_pending;
        self.last_pending = pending.clone();
        (pending, changed)
    }

    /// Looks up the interface of every pod of `node` (not the pending interfaces): from the
    /// last look-up unless `full` or the pod's addresses changed, else through netlink.
    pub fn resolve(&mut self, node: &NodePolicy, full: bool) -> Resolved {
        let mut ifaces = BTreeMap::new();
        let mut resolver = netlink::Resolver::default();
        let mut missing = Vec::new();
        for (k, c) in node.pods.iter().filter(|(_, c)| c.pending.is_none()) {
            let cached = self.known.get(k).filter(|(ips, _)| !full && *ips == c.ips).map(|(_, i)| (i.ifindex, i.ifname.clone()));
            match cached.or_else(|| c.ips.iter().find_map(|ip| resolver.pod_interface(*ip).ok())) {
                Some((ifindex, ifname)) => {
                    ifaces.insert(k.clone(), Iface { ifindex, ifname });
                }
                None => missing.push((k, &c.ips)),
            }
        }
        wake_silent(&mut resolver, &mut missing, &mut ifaces);
        let errors = self.keep_or_report(missing, &mut ifaces);
        let same = ifaces.len() == self.known.len() && ifaces.iter().all(|(k, i)| self.known.get(k).is_some_and(|(_, o)| o == i));
        if !same {
            tracing::debug!("pod interfaces: {:?}", ifaces.iter().map(|(k, i)| format!("{k}={}", i.ifname)).collect::<Vec<_>>());
        }
        self.known = ifaces.iter().map(|(k, i)| (k.clone(), (node.pods[k].ips.clone(), i.clone()))).collect();
        Resolved { ifaces, errors, same }
    }

    /// Pods not found now keep the interface they had, while it is still there; the others
    /// are reported (and looked up again in a second).
    fn keep_or_report(&mut self, missing: Vec<(&ObjKey, &Vec<IpAddr>)>, ifaces: &mut BTreeMap<ObjKey, Iface>) -> Vec<String> {
        let mut errors = Vec::new();
        for (k, ips) in missing {
            let kept = self.known.get(k).map(|(_, i)| i).filter(|i| netlink::ifname(i.ifindex).is_ok_and(|n| n == i.ifname));
            match kept {
                Some(i) => {
                    ifaces.insert(k.clone(), i.clone());
                }
                None => errors.push(format!("{k}: no host interface for {ips:?} yet")),
            }
        }
        self.unresolved = !errors.is_empty();
        errors
    }

    /// The node's addresses kubelet reaches pods from, looked up again when `full`.
    pub fn node_addrs(&mut self, full: bool) -> &[IpAddr] {
        if full || self.node_addrs.is_none() {
            // Only the addresses kubelet reaches pods from (see node_addr_for_pods).
            let mut addrs = netlink::local_addresses().unwrap_or_default();
            addrs.retain(|a| crate::datapath::node_addr_for_pods(*a));
            self.node_addrs = Some(addrs);
        }
        self.node_addrs.as_deref().unwrap_or_default()
    }
}

/// Bridged pods that have not talked yet: woken all at once, one short wait.
fn wake_silent(resolver: &mut netlink::Resolver, missing: &mut Vec<(&ObjKey, &Vec<IpAddr>)>, ifaces: &mut BTreeMap<ObjKey, Iface>) {
    if !resolver.wake_silent() {
        return;
    }
    resolver.settle(|r| {
        missing.retain(|(k, ips)| match ips.iter().find_map(|ip| r.pod_interface(*ip).ok()) {
            Some((ifindex, ifname)) => {
                ifaces.insert((*k).clone(), Iface { ifindex, ifname });
                false
            }
            None => true,
        });
        missing.is_empty()
    });
}

/// The interfaces pods sit behind by their host routes (a veth with a route to one address),
/// as found before the cluster is known: where the programs can be attached ahead.
pub fn routed_pod_interfaces() -> Vec<Iface> {
    let mut ifindexes: Vec<u32> = netlink::veth_host_routes().unwrap_or_default().into_iter().map(|(_, i)| i).collect();
    ifindexes.sort_unstable();
    ifindexes.dedup();
    ifindexes.into_iter().filter_map(|ifindex| netlink::ifname(ifindex).ok().map(|ifname| Iface { ifindex, ifname })).collect()
}

/// The pending interfaces the compiler holds default-deny (those whose name can be read).
pub fn pending_ifaces(pending: &[u32]) -> Vec<PendingIface> {
    pending.iter().filter_map(|i| netlink::ifname(*i).ok().map(|ifname| PendingIface { ifindex: *i, ifname })).collect()
}

/// The interfaces to program: the pods' and, for each pending interface, its own entry.
pub fn with_pending(node: &NodePolicy, mut ifaces: BTreeMap<ObjKey, Iface>) -> BTreeMap<ObjKey, Iface> {
    for c in node.pods.values() {
        if let Some(ifindex) = c.pending {
            ifaces.insert(c.key.clone(), Iface { ifindex, ifname: c.key.name.clone() });
        }
    }
    ifaces
}

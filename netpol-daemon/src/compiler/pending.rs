//! Pending interfaces: pod interfaces (veth host routes) that no known pod address claims
//! yet, a compiler input like the cluster ([`NodeCompiler::set_pending`]). Each gets an entry
//! of its own in [`NodePolicy::pods`], default-deny in the directions in which every pod the
//! node is still waiting for will be isolated.
use super::*;

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
    for pod in cluster.unaddressed_pods(node) {
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

/// The entries of `pending` on `node`, when the node's pending pods isolate some direction.
pub(super) fn pending_pods<'a>(cluster: &Cluster, node: &str, pending: &'a [PendingIface]) -> impl Iterator<Item = CompiledPod> + 'a {
    // Without pending interfaces the cluster's pods are not scanned (every update calls this).
    let iso = if pending.is_empty() { None } else { pending_isolation(cluster, node).filter(|i| i[0] || i[1]) };
    iso.into_iter().flat_map(move |iso| pending.iter().map(move |iface| pending_pod(iface, iso)))
}

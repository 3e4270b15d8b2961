//! A deliberately naive reference evaluator of NetworkPolicy v1, written straight from the API
//! documentation and sharing nothing with the compiler but the model types. It answers one
//! question for one packet by walking every policy and rule. Tests compare the compiler's
//! tables (looked up the way the datapath looks them up) against it.
//!
//! [`tiered_connection_allowed`] adds the ClusterNetworkPolicy tiers around it (Admin, then
//! NetworkPolicy, then Baseline, then allow), as docs/cluster-network-policy.md states them.
use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::model::*;
use crate::model::{Cluster, Verdict};

/// A packet's destination port as the datapath sees it (`None` for ICMP and other
/// port-less protocols). `proto` is the IP protocol number.
#[derive(Clone, Copy, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub port: Option<u16>,
}

/// "The pod is isolated for <dir> if any NetworkPolicy selects it and has <dir> in its
/// policyTypes"; then the union of those policies' <dir> rules decides.
///
/// Egress to a Service cluster IP is what kube-proxy makes of it: allowed on a service port
/// when the pod may reach one of the backends on its target port.
pub fn allowed(c: &Cluster, pod: &Pod, dir: Direction, peer: IpAddr, proto: u8, port: Option<u16>) -> bool {
    verdict(c, pod, dir, peer, proto, port).passes()
}

/// Audit mode: audit policies are evaluated as if enforced; what that denies passes anyway
/// (verdict `Audit`) when the enforcing policies alone (the audit ones ignored) allow it.
pub fn verdict(c: &Cluster, pod: &Pod, dir: Direction, peer: IpAddr, proto: u8, port: Option<u16>) -> Verdict {
    if allowed_by(c, &|_| true, pod, dir, peer, proto, port) {
        Verdict::Allow
    } else if allowed_by(c, &|p: &Policy| !p.audit, pod, dir, peer, proto, port) {
        Verdict::Audit
    } else {
        Verdict::Deny
    }
}

/// [`allowed`] for a cluster holding only the policies `counts` accepts.
fn allowed_by(
    c: &Cluster,
    counts: &dyn Fn(&Policy) -> bool,
    pod: &Pod,
    dir: Direction,
    peer: IpAddr,
    proto: u8,
    port: Option<u16>,
) -> bool {
    allowing(c, counts, pod, dir, peer, proto, port).is_none_or(|s| !s.is_empty())
}

/// The policies with a rule allowing the packet; `None` when no policy isolates the pod in
/// `dir` (everything is allowed, no policy had to).
pub fn allowing_policies(c: &Cluster, pod: &Pod, dir: Direction, peer: IpAddr, proto: u8, port: Option<u16>) -> Option<BTreeSet<ObjKey>> {
    allowing(c, &|_| true, pod, dir, peer, proto, port)
}

fn allowing(
    c: &Cluster,
    counts: &dyn Fn(&Policy) -> bool,
    pod: &Pod,
    dir: Direction,
    peer: IpAddr,
    proto: u8,
    port: Option<u16>,
) -> Option<BTreeSet<ObjKey>> {
    if dir == Direction::Egress {
        if let Some(svc) = c.service_with_ip(peer) {
            let isolated = c
                .policies
                .values()
                .filter(|p| counts(p))
                .any(|p| p.key.namespace == pod.key.namespace && p.pod_selector.matches(&pod.labels) && p.isolates(dir));
            if !isolated {
                return None;
            }
            let mut out = BTreeSet::new();
            for (sp, backends) in c.service_backends(svc) {
                if sp.protocol.number() == proto && Some(sp.port) == port {
                    for (b, t) in backends {
                        out.extend(allowing(c, counts, pod, dir, b, proto, Some(t)).into_iter().flatten());
                    }
                }
            }
            return Some(out);
        }
    }
    let selecting: Vec<&Policy> = c
        .policies
        .values()
        .filter(|p| counts(p))
        .filter(|p| p.key.namespace == pod.key.namespace && p.pod_selector.matches(&pod.labels))
        .filter(|p| p.isolates(dir))
        .collect();
    if selecting.is_empty() {
        return None;
    }
    let allows = |pol: &&&Policy| {
        pol.rules(dir).iter().any(|rule| {
            let peer_ok = match &rule.peers {
                None => true,
                Some(peers) => peers.iter().any(|p| peer_matches(c, pol, p, peer)),
            };
            let port_ok = match &rule.ports {
                None => true,
                Some(specs) => specs.iter().any(|s| {
                    // Named ports are looked up on the destination pod: the selected pod for
                    // ingress, the peer for egress.
                    let target = match dir {
                        Direction::Ingress => Some(pod),
                        Direction::Egress => c.pod_with_ip(peer),
                    };
                    port_matches(s, target, proto, port)
                }),
            };
            peer_ok && port_ok
        })
    };
    Some(selecting.iter().filter(allows).map(|p| p.key.clone()).collect())
}

fn peer_matches(c: &Cluster, pol: &Policy, p: &Peer, ip: IpAddr) -> bool {
    match p {
        Peer::IpBlock(b) => b.contains(ip),
        Peer::Pods { namespaces, pods } => c.pods.values().any(|q| {
            !q.host_network
                && q.ips.contains(&ip)
                && pods.matches(&q.labels)
                && match namespaces {
                    None => q.key.namespace == pol.key.namespace,
                    Some(sel) => sel.matches(&c.namespace(&q.key.namespace).labels),
                }
        }),
    }
}

fn port_matches(s: &PortSpec, target: Option<&Pod>, proto: u8, port: Option<u16>) -> bool {
    if s.protocol.number() != proto {
        return false;
    }
    let Some(port) = port else { return false };
    match &s.port {
        PortRef::Any => true,
        PortRef::Range(a, b) => *a <= port && port <= *b,
        PortRef::Named(n) => {
            target.is_some_and(|t| t.ports.iter().any(|cp| cp.name.as_deref() == Some(n) && cp.protocol == s.protocol && cp.port == port))
        }
    }
}

/// Both ends must allow: the source pod's egress (if the source is a pod) and the destination
/// pod's ingress (if the destination is a pod). Traffic from `node_addrs` into a pod on that
/// node is always allowed.
pub fn connection_allowed(c: &Cluster, pkt: Packet, node_addrs: &[IpAddr]) -> bool {
    let src_ok = match c.pod_with_ip(pkt.src) {
        Some(p) => allowed(c, p, Direction::Egress, pkt.dst, pkt.proto, pkt.port),
        None => true,
    };
    let dst_ok = match c.pod_with_ip(pkt.dst) {
        Some(p) => node_addrs.contains(&pkt.src) || allowed(c, p, Direction::Ingress, pkt.src, pkt.proto, pkt.port),
        None => true,
    };
    src_ok && dst_ok
}

/// A connection as the tiers decide it: each end (the source pod's egress, the destination
/// pod's ingress) by [`tiered_allowed`]. To a Service cluster IP: allowed when one of the
/// backends on its target port is (what kube-proxy makes of it). Traffic from `node_addrs`
/// into a pod on that node is always allowed, as for NetworkPolicy.
pub fn tiered_connection_allowed(c: &Cluster, pkt: Packet, node_addrs: &[IpAddr]) -> bool {
    let Some(svc) = c.service_with_ip(pkt.dst) else { return tiered_after_nat(c, pkt, node_addrs, false) };
    c.service_backends(svc)
        .into_iter()
        .filter(|(sp, _)| sp.protocol.number() == pkt.proto && Some(sp.port) == pkt.port)
        .flat_map(|(_, backends)| backends)
        .any(|(ip, target)| tiered_after_nat(c, Packet { dst: ip, port: Some(target), ..pkt }, node_addrs, true))
}

/// `pkt` with its final destination. A pod reaching itself at its own pod IP is not subject
/// to ClusterNetworkPolicy (it is enforced outside the pod's network namespace); reaching
/// itself through a Service it is.
fn tiered_after_nat(c: &Cluster, pkt: Packet, node_addrs: &[IpAddr], via_service: bool) -> bool {
    let (src, dst) = (c.pod_with_ip(pkt.src), c.pod_with_ip(pkt.dst));
    let hairpin = !via_service && src.is_some() && src.map(|p| &p.key) == dst.map(|p| &p.key);
    let src_ok = src.is_none_or(|p| tiered_allowed(c, p, Direction::Egress, pkt.dst, pkt.proto, pkt.port, !hairpin));
    let dst_ok = dst
        .is_none_or(|p| node_addrs.contains(&pkt.src) || tiered_allowed(c, p, Direction::Ingress, pkt.src, pkt.proto, pkt.port, !hairpin));
    src_ok && dst_ok
}

/// One end: the Admin tier's first matching rule (policies by priority, then name; rules in
/// order) decides when it accepts or denies; else (no match, or Pass) the NetworkPolicies
/// decide when one isolates the pod in `dir`; else the Baseline tier's first matching rule
/// (a Pass there: on to the default); else allow. `cnp`: whether the tiers apply at all.
pub fn tiered_allowed(c: &Cluster, pod: &Pod, dir: Direction, peer: IpAddr, proto: u8, port: Option<u16>, cnp: bool) -> bool {
    let tier = |t| if cnp { tier_action(c, t, pod, dir, peer, proto, port).map(|(a, _, _)| a) } else { None };
    match tier(Tier::Admin) {
        Some(Action::Accept) => return true,
        Some(Action::Deny) => return false,
        Some(Action::Pass) | None => {}
    }
    if allowing_policies(c, pod, dir, peer, proto, port).is_some() {
        return allowed(c, pod, dir, peer, proto, port);
    }
    tier(Tier::Baseline) != Some(Action::Deny)
}

/// The first rule of `tier` matching the traffic of `pod` in `dir` with `peer` (an address
/// after any service translation): its action, its policy and its index.
pub fn tier_action<'a>(
    c: &'a Cluster,
    tier: Tier,
    pod: &Pod,
    dir: Direction,
    peer: IpAddr,
    proto: u8,
    port: Option<u16>,
) -> Option<(Action, &'a ClusterPolicy, usize)> {
    let mut policies: Vec<&ClusterPolicy> =
        c.cluster_policies.values().filter(|p| p.tier == tier && in_pod_set(c, &p.subject, pod)).collect();
    policies.sort_by(|a, b| a.order().cmp(&b.order()));
    policies.into_iter().find_map(|p| {
        let i = p.rules(dir).iter().position(|r| cluster_rule_matches(c, r, pod, dir, peer, proto, port))?;
        Some((p.rules(dir)[i].action, p, i))
    })
}

/// Host-network pods are in no pod set.
fn in_pod_set(c: &Cluster, set: &PodSet, pod: &Pod) -> bool {
    !pod.host_network && set.pods.matches(&pod.labels) && set.namespaces.matches(&c.namespace_labels(&pod.key.namespace))
}

fn cluster_rule_matches(c: &Cluster, r: &ClusterRule, pod: &Pod, dir: Direction, peer: IpAddr, proto: u8, port: Option<u16>) -> bool {
    let peer_ok = r.peers.iter().any(|p| match p {
        ClusterPeer::Networks(nets) => nets.iter().any(|n| n.contains(&peer)),
        ClusterPeer::Pods(set) => c.pod_with_ip(peer).is_some_and(|q| in_pod_set(c, set, q)),
    });
    let port_ok = r.ports.as_ref().is_none_or(|ports| {
        ports.iter().any(|cp| match cp {
            ClusterPort::Range(p, first, last) => p.number() == proto && port.is_some_and(|n| *first <= n && n <= *last),
            ClusterPort::Named(name) => {
                // The destination pod's container port of that name, of its own protocol.
                let target = match dir {
                    Direction::Ingress => Some(pod),
                    Direction::Egress => c.pod_with_ip(peer),
                };
                target.is_some_and(|t| {
                    t.ports.iter().any(|p| p.name.as_deref() == Some(name) && p.protocol.number() == proto && Some(p.port) == port)
                })
            }
        })
    });
    peer_ok && port_ok
}

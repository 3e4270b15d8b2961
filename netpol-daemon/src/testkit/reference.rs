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
        ClusterPeer::Nodes(sel) => c.nodes.values().any(|n| sel.matches(&n.labels) && n.addresses.contains(&peer)),
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

#[cfg(test)]
mod tests {
    //! The tiers on a small copy of the conformance suite's world (network-policy-api
    //! conformance/base/manifests.yaml): one namespace per house, pods labelled with their
    //! house, container ports `web` (80/TCP) and `dns` (53/UDP). Policies are YAML, read by
    //! the same conversion as a manifest's.
    use super::*;
    use crate::model::{from_json, Namespace, Protocol, Service, ServicePort, TargetPort};

    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const HP_SERVICE: &str = "10.96.0.1";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn house(h: &str) -> Labels {
        Labels::from([("conformance-house".to_string(), h.to_string())])
    }

    fn world() -> Cluster {
        let mut c = Cluster::default();
        let pods = [("gryffindor", "harry-potter-0", "10.0.1.1"), ("gryffindor", "harry-potter-1", "10.0.1.2")]
            .into_iter()
            .chain([("slytherin", "draco-malfoy-0", "10.0.2.1"), ("hufflepuff", "cedric-diggory-0", "10.0.3.1")])
            .chain([("ravenclaw", "luna-lovegood-0", "10.0.4.1")]);
        for (h, name, addr) in pods {
            let ns = format!("network-policy-conformance-{h}");
            c.insert(Object::Namespace(Namespace::new(ns.clone(), house(h))));
            let ports = vec![
                ContainerPort { name: Some("web".into()), port: 80, protocol: Protocol::Tcp },
                ContainerPort { name: Some("dns".into()), port: 53, protocol: Protocol::Udp },
            ];
            let key = ObjKey::new(ns, name);
            c.insert(Object::Pod(Pod { key, labels: house(h), node_name: None, ips: vec![ip(addr)], ports, host_network: false }));
        }
        let ports = vec![ServicePort { name: None, protocol: Protocol::Tcp, port: 8080, target: TargetPort::Number(80) }];
        let key = ObjKey::new("network-policy-conformance-gryffindor", "hp");
        c.insert(Object::Service(Service { key, cluster_ips: vec![ip(HP_SERVICE)], ports, selector: Some(house("gryffindor")) }));
        c
    }

    /// Adds the objects of `yaml` (documents of policies) to `c`; they must be valid.
    fn apply(c: &mut Cluster, yaml: &str) {
        for doc in yaml.split("\n---\n") {
            let conv = from_json(serde_norway::from_str(doc).unwrap()).unwrap();
            assert!(conv.errors.is_empty(), "{doc}: {:?}", conv.errors);
            c.insert(conv.object.unwrap());
        }
    }

    /// A ClusterNetworkPolicy in YAML flow style: `rules` are its `ingress:`/`egress:` lines.
    fn cnp(name: &str, tier: &str, priority: u16, subject: &str, rules: &str) -> String {
        format!("apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n  subject: {{namespaces: {{matchLabels: {{conformance-house: {subject}}}}}}}\n{rules}")
    }

    fn from_house(h: &str) -> String {
        format!("[{{namespaces: {{matchLabels: {{conformance-house: {h}}}}}}}]")
    }

    /// Whether `from` (a pod name) may open a connection to `to` (an address) on `proto`/`port`.
    fn conn(c: &Cluster, from: &str, to: &str, proto: u8, port: u16) -> bool {
        let src = c.pods.values().find(|p| p.key.name == from).unwrap().ips[0];
        tiered_connection_allowed(c, Packet { src, dst: ip(to), proto, port: Some(port) }, &[])
    }

    const HARRY: &str = "10.0.1.1";
    const DRACO: &str = "10.0.2.1";
    const CEDRIC: &str = "10.0.3.1";
    const LUNA: &str = "10.0.4.1";

    /// conformance/base/api_integration/standard-anp-np-banp.yaml, actions as the test sets them.
    fn integration(admin: &str, with_np: bool) -> Cluster {
        let mut c = world();
        let deny_both = |a: &str| {
            format!("  ingress: [{{action: {a}, from: {f}}}]\n  egress: [{{action: {a}, to: {f}}}]\n", f = from_house("slytherin"))
        };
        apply(&mut c, &cnp("pass-example", "Admin", 10, "gryffindor", &deny_both(admin)));
        apply(&mut c, &cnp("default", "Baseline", 10, "gryffindor", &deny_both("Deny")));
        if with_np {
            let sel = "[{namespaceSelector: {matchLabels: {conformance-house: slytherin}}}]";
            apply(&mut c, &format!("kind: NetworkPolicy\nmetadata: {{name: np, namespace: network-policy-conformance-gryffindor}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress, Egress], ingress: [{{from: {sel}}}], egress: [{{to: {sel}}}]}}"));
        }
        c
    }

    #[test]
    fn admin_deny_beats_a_networkpolicy_allow() {
        let c = integration("Deny", true);
        assert!(!conn(&c, "draco-malfoy-0", HARRY, TCP, 80));
        assert!(!conn(&c, "harry-potter-0", DRACO, TCP, 80));
        // Not matched by the admin tier: the NetworkPolicy isolating gryffindor decides.
        assert!(!conn(&c, "cedric-diggory-0", HARRY, TCP, 80));
        assert!(conn(&c, "cedric-diggory-0", DRACO, TCP, 80));
    }

    #[test]
    fn admin_pass_hands_over_to_the_networkpolicy_then_to_the_baseline() {
        let c = integration("Pass", true);
        assert!(conn(&c, "draco-malfoy-0", HARRY, TCP, 80), "the NetworkPolicy allows slytherin");
        assert!(conn(&c, "harry-potter-0", DRACO, UDP, 53));
        let c = integration("Pass", false);
        assert!(!conn(&c, "draco-malfoy-0", HARRY, TCP, 80), "no NetworkPolicy: the baseline denies");
        assert!(!conn(&c, "harry-potter-0", DRACO, TCP, 80));
        assert!(conn(&c, "cedric-diggory-0", HARRY, TCP, 80), "nothing matches: allowed");
    }

    #[test]
    fn the_baseline_applies_only_where_no_networkpolicy_isolates() {
        let mut c = world();
        apply(
            &mut c,
            &cnp("default", "Baseline", 10, "gryffindor", &format!("  ingress: [{{action: Deny, from: {}}}]\n", from_house("slytherin"))),
        );
        assert!(!conn(&c, "draco-malfoy-0", HARRY, TCP, 80));
        // A NetworkPolicy isolating only egress leaves ingress to the baseline.
        apply(&mut c, "kind: NetworkPolicy\nmetadata: {name: eg, namespace: network-policy-conformance-gryffindor}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{}]}");
        assert!(!conn(&c, "draco-malfoy-0", HARRY, TCP, 80));
        apply(&mut c, "kind: NetworkPolicy\nmetadata: {name: in, namespace: network-policy-conformance-gryffindor}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {}}]}]}");
        assert!(conn(&c, "draco-malfoy-0", HARRY, TCP, 80), "the NetworkPolicy overrides the baseline");
    }

    /// conformance/base/admin_tier/standard-priority-field.yaml.
    #[test]
    fn a_lower_priority_value_is_evaluated_first() {
        let rules = |a: &str| {
            format!("  ingress: [{{action: {a}, from: {f}}}]\n  egress: [{{action: {a}, to: {f}}}]\n", f = from_house("slytherin"))
        };
        for (pass_priority, allowed) in [(60, false), (40, true)] {
            let mut c = world();
            apply(&mut c, &cnp("priority-50-example", "Admin", 50, "gryffindor", &rules("Deny")));
            apply(&mut c, &cnp("old-priority-60", "Admin", pass_priority, "gryffindor", &rules("Pass")));
            apply(&mut c, &cnp("default", "Baseline", 10, "gryffindor", &rules("Accept")));
            apply(&mut c, &cnp("deny-rest", "Baseline", 20, "gryffindor", &rules("Deny")));
            assert_eq!(conn(&c, "draco-malfoy-0", HARRY, TCP, 80), allowed, "pass at {pass_priority}");
            assert_eq!(conn(&c, "harry-potter-1", DRACO, TCP, 8080), allowed, "pass at {pass_priority}");
        }
    }

    /// conformance/base/admin_tier/standard-ingress-tcp-rules.yaml and the swaps its tests make.
    #[test]
    fn the_first_matching_rule_of_a_policy_decides() {
        let (rc, sl, hp) = (from_house("ravenclaw"), from_house("slytherin"), from_house("hufflepuff"));
        let p80 = "protocols: [{tcp: {destinationPort: {number: 80}}}]";
        let mut rules = vec![
            format!("{{action: Accept, from: {rc}}}"),
            format!("{{action: Deny, from: {rc}}}"),
            format!("{{action: Pass, from: {rc}}}"),
            format!("{{action: Deny, from: {sl}, {p80}}}"),
            format!("{{action: Pass, from: {sl}, {p80}}}"),
            format!("{{action: Accept, from: {hp}, {p80}}}"),
            format!("{{action: Deny, from: {hp}}}"),
        ];
        let build = |rules: &[String]| {
            let mut c = world();
            apply(&mut c, &cnp("ingress-tcp", "Admin", 3, "gryffindor", &format!("  ingress: [{}]\n", rules.join(", "))));
            c
        };
        let c = build(&rules);
        assert!(conn(&c, "luna-lovegood-0", HARRY, TCP, 80));
        assert!(conn(&c, "cedric-diggory-0", HARRY, TCP, 80) && !conn(&c, "cedric-diggory-0", HARRY, TCP, 8080));
        assert!(!conn(&c, "draco-malfoy-0", HARRY, TCP, 80) && conn(&c, "draco-malfoy-0", HARRY, TCP, 8080));
        rules.swap(0, 1);
        assert!(!conn(&build(&rules), "luna-lovegood-0", HARRY, TCP, 80), "deny first");
        rules.swap(0, 2);
        rules.swap(3, 4);
        let c = build(&rules);
        assert!(conn(&c, "luna-lovegood-0", HARRY, TCP, 80), "pass first: nothing else decides");
        assert!(conn(&c, "draco-malfoy-0", HARRY, TCP, 80), "pass before deny");
        // The rules hold for ingress only: gryffindor's egress is not matched.
        assert!(conn(&c, "harry-potter-0", LUNA, TCP, 80));
    }

    /// conformance/base/admin_tier/standard-egress-inline-cidr-rules.yaml.
    #[test]
    fn networks_match_any_address_pods_included() {
        let rules = |extra: &str| {
            format!(
                "  egress: [{extra}{{action: Accept, to: {}}}, {{action: Deny, to: [{{networks: [0.0.0.0/0, '::/0']}}]}}]\n",
                from_house("slytherin")
            )
        };
        let mut c = world();
        apply(&mut c, &cnp("inline-cidr", "Admin", 85, "gryffindor", &rules("")));
        assert!(conn(&c, "harry-potter-0", DRACO, TCP, 80));
        assert!(!conn(&c, "harry-potter-0", CEDRIC, TCP, 80));
        assert!(!conn(&c, "harry-potter-0", "192.0.2.7", UDP, 53));
        assert!(!conn(&c, "harry-potter-0", "2001:db8::7", TCP, 443));
        apply(
            &mut c,
            &cnp("inline-cidr", "Admin", 85, "gryffindor", &rules(&format!("{{action: Accept, to: [{{networks: [{CEDRIC}/32]}}]}}, "))),
        );
        assert!(conn(&c, "harry-potter-0", CEDRIC, TCP, 80));
        assert!(!conn(&c, "harry-potter-0", LUNA, TCP, 80));
    }

    #[test]
    fn named_ports_are_the_destination_pods_with_their_own_protocol() {
        let mut c = world();
        let ingress = format!(
            "  ingress: [{{action: Accept, from: {rc}, protocols: [{{destinationNamedPort: dns}}]}}, {{action: Deny, from: {rc}}}]\n",
            rc = from_house("ravenclaw")
        );
        let egress = format!(
            "  egress: [{{action: Accept, to: {sl}, protocols: [{{destinationNamedPort: web}}]}}, {{action: Deny, to: {sl}}}]\n",
            sl = from_house("slytherin")
        );
        apply(&mut c, &cnp("named", "Admin", 1, "gryffindor", &format!("{ingress}{egress}")));
        assert!(conn(&c, "luna-lovegood-0", HARRY, UDP, 53));
        assert!(!conn(&c, "luna-lovegood-0", HARRY, TCP, 53), "dns is a UDP port");
        assert!(!conn(&c, "luna-lovegood-0", HARRY, UDP, 5353));
        assert!(conn(&c, "harry-potter-0", DRACO, TCP, 80));
        assert!(!conn(&c, "harry-potter-0", DRACO, TCP, 8080));
    }

    #[test]
    fn port_ranges_are_inclusive() {
        let mut c = world();
        let rules = format!(
            "  ingress: [{{action: Deny, from: {}, protocols: [{{tcp: {{destinationPort: {{range: {{start: 8000, end: 9000}}}}}}}}]}}]\n",
            from_house("slytherin")
        );
        apply(&mut c, &cnp("range", "Baseline", 1, "gryffindor", &rules));
        for (port, allowed) in [(80, true), (7999, true), (8000, false), (8080, false), (9000, false), (9001, true)] {
            assert_eq!(conn(&c, "draco-malfoy-0", HARRY, TCP, port), allowed, "port {port}");
        }
        assert!(conn(&c, "draco-malfoy-0", HARRY, UDP, 8080), "tcp only");
    }

    #[test]
    fn an_egress_accept_leaves_the_destinations_ingress_to_decide() {
        let mut c = world();
        apply(&mut c, &cnp("out", "Admin", 1, "gryffindor", &format!("  egress: [{{action: Accept, to: {}}}]\n", from_house("slytherin"))));
        apply(
            &mut c,
            "kind: NetworkPolicy\nmetadata: {name: closed, namespace: network-policy-conformance-slytherin}\nspec: {podSelector: {}}",
        );
        assert!(!conn(&c, "harry-potter-0", DRACO, TCP, 80));
        apply(
            &mut c,
            &cnp("in", "Admin", 2, "slytherin", &format!("  ingress: [{{action: Accept, from: {}}}]\n", from_house("gryffindor"))),
        );
        assert!(conn(&c, "harry-potter-0", DRACO, TCP, 80));
    }

    /// The API's fail-closed rule, through the conversion: an Accept rule with a peer netpol
    /// cannot enforce matches nothing; a Pass rule with one denies everything.
    #[test]
    fn unsupported_fields_fail_closed() {
        let mut c = world();
        let text = cnp("dns", "Admin", 1, "gryffindor", "  egress: [{action: Accept, to: [{domainNames: [example.com]}]}]\n");
        let conv = from_json(serde_norway::from_str(&text).unwrap()).unwrap();
        assert_eq!(conv.errors.len(), 1, "{conv:?}");
        c.insert(conv.object.unwrap());
        apply(&mut c, &cnp("rest", "Baseline", 1, "gryffindor", "  egress: [{action: Deny, to: [{networks: [0.0.0.0/0]}]}]\n"));
        assert!(!conn(&c, "harry-potter-0", "192.0.2.7", TCP, 443), "the accept matches nothing: the baseline denies");
        let text = cnp("dns-pass", "Admin", 2, "slytherin", "  egress: [{action: Pass, to: [{domainNames: [example.com]}]}]\n");
        c.insert(from_json(serde_norway::from_str(&text).unwrap()).unwrap().object.unwrap());
        apply(&mut c, "kind: NetworkPolicy\nmetadata: {name: open, namespace: network-policy-conformance-slytherin}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{}]}");
        assert!(!conn(&c, "draco-malfoy-0", LUNA, TCP, 80), "the pass denies all, whatever the NetworkPolicy allows");
        assert!(conn(&c, "luna-lovegood-0", DRACO, TCP, 80));
    }

    /// `nodes` peers, through the conversion of Node and policy manifests: the addresses of the
    /// nodes the selector selects (CNPAdminTierEgressNodePeers' deny-then-allow).
    #[test]
    fn node_peers_select_the_addresses_of_the_nodes_by_label() {
        let mut c = world();
        let node = |name: &str, role: &str, addr: &str| {
            format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{role: {role}}}}}\nstatus: {{addresses: [{{type: InternalIP, address: {addr}}}]}}")
        };
        apply(&mut c, &format!("{}\n---\n{}", node("cp", "control-plane", "172.18.0.2"), node("w1", "worker", "172.18.0.3")));
        let rules = "  egress: [{action: Accept, to: [{nodes: {matchLabels: {role: control-plane}}}], protocols: [{tcp: {destinationPort: {number: 6443}}}]}, \
                     {action: Deny, to: [{nodes: {}}]}]\n";
        apply(&mut c, &cnp("api-only", "Admin", 1, "gryffindor", rules));
        assert!(conn(&c, "harry-potter-0", "172.18.0.2", TCP, 6443), "the control plane's API port");
        assert!(!conn(&c, "harry-potter-0", "172.18.0.2", TCP, 22));
        assert!(!conn(&c, "harry-potter-0", "172.18.0.3", TCP, 6443), "a worker: only the deny selects it");
        assert!(conn(&c, "harry-potter-0", "172.18.0.4", TCP, 22), "no node has that address");
        assert!(conn(&c, "draco-malfoy-0", "172.18.0.3", TCP, 22), "slytherin is not a subject");
    }

    /// A pod reaching its own pod IP is not subject to ClusterNetworkPolicy; through a
    /// Service that sends it back to itself it is.
    #[test]
    fn hairpin_by_pod_ip_skips_the_tiers_but_not_through_a_service() {
        let mut c = world();
        let all = "[{networks: [0.0.0.0/0]}]";
        apply(&mut c, &cnp("lockdown", "Admin", 1, "gryffindor", &format!("  egress: [{{action: Deny, to: {all}}}]\n")));
        assert!(conn(&c, "harry-potter-0", HARRY, TCP, 80));
        assert!(!conn(&c, "harry-potter-0", "10.0.1.2", TCP, 80));
        assert!(!conn(&c, "harry-potter-0", HP_SERVICE, TCP, 8080));
        assert!(conn(&c, "luna-lovegood-0", HP_SERVICE, TCP, 8080), "ravenclaw is not a subject");
        assert!(!conn(&c, "luna-lovegood-0", HP_SERVICE, TCP, 80), "not a service port");
    }

    /// Equal priorities: the API leaves the order to the implementation; netpol's is by name.
    #[test]
    fn equal_priorities_are_ordered_by_name() {
        let mut c = world();
        let rules = |a: &str| format!("  ingress: [{{action: {a}, from: {}}}]\n", from_house("slytherin"));
        apply(&mut c, &cnp("b-deny", "Admin", 5, "gryffindor", &rules("Deny")));
        apply(&mut c, &cnp("a-accept", "Admin", 5, "gryffindor", &rules("Accept")));
        let harry = c.pods.values().find(|p| p.key.name == "harry-potter-0").unwrap();
        let (action, policy, rule) = tier_action(&c, Tier::Admin, harry, Direction::Ingress, ip(DRACO), TCP, Some(80)).unwrap();
        assert_eq!((action, policy.name.as_str(), rule), (Action::Accept, "a-accept", 0));
        assert!(tier_action(&c, Tier::Baseline, harry, Direction::Ingress, ip(DRACO), TCP, Some(80)).is_none());
    }
}

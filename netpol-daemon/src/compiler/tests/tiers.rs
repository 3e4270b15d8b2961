//! ClusterNetworkPolicy tiers: the compiled tables (looked up directly and through the map
//! entries) against the reference evaluator's tiers, over random clusters mixing cluster
//! policies with NetworkPolicies, and named cases.
use super::*;
use crate::model::{Action, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, Node, PodSet, Tier};

const NODE_ADDRS: &[&str] = &["10.9.9.9", "192.168.1.1", "fd00::9"];

fn pod_set(g: &mut Gen) -> PodSet {
    let namespaces = if g.chance(30) { Selector::everything() } else { selector(g) };
    let pods = if g.chance(30) { Selector::everything() } else { selector(g) };
    PodSet { namespaces, pods }
}

fn cluster_rule(g: &mut Gen, dir: Direction) -> ClusterRule {
    let action = g.pick(&[Action::Accept, Action::Deny, Action::Pass]);
    let mut named = false;
    let ports = if g.chance(30) {
        None
    } else {
        Some(
            (0..1 + g.below(3))
                .map(|_| match g.below(4) {
                    0 => {
                        named = true;
                        ClusterPort::Named(g.pick(PORT_NAMES).to_string())
                    }
                    1 => {
                        let (a, b) = (g.pick(PORTS), g.pick(PORTS));
                        ClusterPort::Range(g.pick(&Protocol::ALL), a.min(b), a.max(b))
                    }
                    _ => {
                        let p = g.pick(PORTS);
                        ClusterPort::Range(g.pick(&Protocol::ALL), p, p)
                    }
                })
                .collect(),
        )
    };
    // Networks and nodes only as egress peers, and never with a named port (the API's rule).
    let peers = (0..1 + g.below(2))
        .map(|_| match g.below(4) {
            0 | 1 => ClusterPeer::Pods(pod_set(g)),
            2 if dir == Direction::Egress && !named => {
                ClusterPeer::Networks((0..1 + g.below(2)).map(|_| cidr::parse(g.pick(CIDRS)).unwrap()).collect())
            }
            3 if dir == Direction::Egress && !named => ClusterPeer::Nodes(selector(g)),
            _ => ClusterPeer::Pods(pod_set(g)),
        })
        .collect();
    if g.chance(5) {
        return ClusterRule::fail_closed(None, Some(action));
    }
    ClusterRule { name: None, action, peers, ports }
}

/// A random cluster (as the NetworkPolicy property test makes them, enforcing policies only:
/// audit mode has no meaning across tiers) with nodes and cluster policies.
fn random_tiered_cluster(seed: u64) -> Cluster {
    let mut c = random_cluster(seed);
    let mut g = Gen(seed.rotate_left(17) | 1);
    for p in c.policies.values_mut() {
        p.audit = false;
    }
    for (i, addr) in NODE_ADDRS.iter().enumerate() {
        let name = format!("node{i}");
        c.nodes.insert(name.clone(), Node { name, labels: labels(&mut g), addresses: vec![ip(addr)] });
    }
    for i in 0..(1 + g.below(4)) {
        let ingress = (0..g.below(4)).map(|_| cluster_rule(&mut g, Direction::Ingress)).collect();
        let egress = (0..g.below(4)).map(|_| cluster_rule(&mut g, Direction::Egress)).collect();
        let name = format!("cnp{i}");
        let tier = if g.chance(50) { Tier::Admin } else { Tier::Baseline };
        let priority = g.pick(&[1u16, 5, 5, 10]);
        c.cluster_policies
            .insert(name.clone(), ClusterPolicy { name, tier, priority, subject: pod_set(&mut g), ingress, egress, invalid: None });
    }
    c
}

/// The reference verdict at one end: egress to a cluster IP by its backends (on their target
/// ports), as kube-proxy translates it before the tiers see it.
/// A pod that nothing selects in `dir` is not enforced there at all (also for cluster IP
/// ports no service has, which lead nowhere).
fn tiered_end(c: &Cluster, pod: &Pod, dir: Direction, peer: IpAddr, proto: u8, port: Option<u16>) -> bool {
    let ns = c.namespace_labels(&pod.key.namespace);
    let cnp = c
        .cluster_policies
        .values()
        .any(|p| !p.rules(dir).is_empty() && p.subject.pods.matches(&pod.labels) && p.subject.namespaces.matches(ns.as_ref()));
    if !cnp && reference::allowing_policies(c, pod, dir, peer, proto, port).is_none() {
        return true;
    }
    match c.service_with_ip(peer) {
        Some(svc) if dir == Direction::Egress => c
            .service_backends(svc)
            .into_iter()
            .filter(|(sp, _)| sp.protocol.number() == proto && Some(sp.port) == port)
            .flat_map(|(_, b)| b)
            .any(|(b, t)| reference::tiered_allowed(c, pod, dir, b, proto, Some(t), true)),
        _ => reference::tiered_allowed(c, pod, dir, peer, proto, port, true),
    }
}

/// Is `by` (the policy an allowed packet is counted against) the one that decided: the Admin
/// policy whose Accept rule matched first, else one of the isolating NetworkPolicies that
/// allow it, else the Baseline policy whose Accept rule matched first, else none (allowed by
/// default)?
fn decided_by(c: &Cluster, pod: &Pod, dir: Direction, peer: IpAddr, proto: u8, port: Option<u16>, by: Option<&ObjKey>) -> bool {
    let accepted = |tier| match reference::tier_action(c, tier, pod, dir, peer, proto, port) {
        Some((Action::Accept, p, _)) => Some(Some(cluster_policy_key(tier, &p.name))),
        Some((Action::Deny, _, _)) => Some(None),
        _ => None,
    };
    if let Some(want) = accepted(Tier::Admin) {
        return by == want.as_ref();
    }
    if let Some(allowing) = reference::allowing_policies(c, pod, dir, peer, proto, port) {
        return by.is_some_and(|k| allowing.contains(k));
    }
    match accepted(Tier::Baseline) {
        Some(want) => by == want.as_ref(),
        None => by.is_none(),
    }
}

/// The cluster policy a denied packet is counted against: the Admin policy whose Deny rule
/// matched first, else (no NetworkPolicy isolating the pod) the Baseline one; none for a
/// NetworkPolicy's default deny.
fn denied_by(c: &Cluster, pod: &Pod, dir: Direction, peer: IpAddr, proto: u8, port: Option<u16>) -> Option<ObjKey> {
    let denied = |tier| match reference::tier_action(c, tier, pod, dir, peer, proto, port) {
        Some((Action::Deny, p, _)) => Some(Some(cluster_policy_key(tier, &p.name))),
        Some((Action::Accept, _, _)) => Some(None),
        _ => None,
    };
    if let Some(by) = denied(Tier::Admin) {
        return by;
    }
    if reference::allowing_policies(c, pod, dir, peer, proto, port).is_some() {
        return None;
    }
    denied(Tier::Baseline).flatten()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(400), ..ProptestConfig::default() })]

    /// For random clusters with cluster policies, every local pod, direction, peer, protocol
    /// and port: the compiled verdict, looked up directly and through the map entries, is the
    /// reference evaluator's; an allowed packet is counted against a policy whose rule (or,
    /// past the tiers, whose default) allows it.
    #[test]
    fn tiers_agree_with_reference(seed in any::<u64>()) {
        let c = random_tiered_cluster(seed);
        let node = compile_node(&c, "n");
        let ids: BTreeMap<ObjKey, u32> = node.pods.keys().enumerate().map(|(i, k)| (k.clone(), i as u32 + 1)).collect();
        let d = entries::desired(&node, &ids, &mut ClassInterner::default(), &mut PortSetInterner::default());
        for pod in c.pods.values().filter(|p| p.selectable()) {
            for dir in Direction::BOTH {
                for peer in PEERS {
                    let peer = ip(peer);
                    for proto in [TCP, UDP, SCTP, ICMP] {
                        let ports: &[Option<u16>] = if proto == ICMP { &[None] } else { &[Some(53), Some(80), Some(81), Some(443), Some(444), Some(8080), Some(9999)] };
                        for &port in ports {
                            let want = if tiered_end(&c, pod, dir, peer, proto, port) { Verdict::Allow } else { Verdict::Deny };
                            let got = node.verdict(&pod.key, dir, peer, proto, port);
                            prop_assert_eq!(got, want, "seed {} pod {} {:?} peer {} proto {} port {:?}\ncluster: {:?}\ncompiled: {:?}", seed, pod.key, dir, peer, proto, port, c, node.pods.get(&pod.key));
                            let via_maps = entries::verdict(&d, ids[&pod.key], entries::endpoint_flags(&node.pods[&pod.key]), dir, peer, proto, port);
                            prop_assert_eq!(via_maps, want, "map entries: seed {} pod {} {:?} peer {} proto {} port {:?}", seed, pod.key, dir, peer, proto, port);
                            let e = explain(&c, &node, &pod.key, dir, peer, proto, port);
                            prop_assert_eq!(e.verdict, want);
                            if c.service_with_ip(peer).is_none() {
                                let ends_allowed = match e.chain.last() {
                                    Some(ChainStep::Rule(s)) => s.action == Action::Accept,
                                    Some(ChainStep::NetworkPolicy { allowed }) => *allowed,
                                    Some(ChainStep::Default) => true,
                                    None => want == Verdict::Allow,
                                };
                                prop_assert_eq!(ends_allowed, want == Verdict::Allow, "chain: seed {} pod {} {:?} peer {} proto {} port {:?}: {:?}", seed, pod.key, dir, peer, proto, port, e.chain);
                            }
                            if let (Some(dp), Verdict::Deny, None) = (node.pods[&pod.key].dir(dir), want, c.service_with_ip(peer)) {
                                let slot = entries::lookup_result(&d, ids[&pod.key], dir, peer, proto, port).expect_err("denied");
                                let by = dp.policies.get(slot as usize);
                                prop_assert_eq!(dp.denied_by(node.class_of(peer), proto, port), by);
                                prop_assert_eq!(by.cloned(), denied_by(&c, pod, dir, peer, proto, port), "deny attribution: seed {} pod {} {:?} peer {} proto {} port {:?}: slot {} of {:?}", seed, pod.key, dir, peer, proto, port, slot, dp.policies);
                            }
                            if let (Some(dp), Verdict::Allow, None) = (node.pods[&pod.key].dir(dir), want, c.service_with_ip(peer)) {
                                let slot = entries::lookup_slot(&d, ids[&pod.key], dir, peer, proto, port);
                                let by = slot.and_then(|s| dp.policies.get(s as usize));
                                prop_assert_eq!(dp.allowed_by(node.class_of(peer), proto, port), by);
                                prop_assert!(decided_by(&c, pod, dir, peer, proto, port, by), "attribution: seed {} pod {} {:?} peer {} proto {} port {:?}: slot {:?} of {:?}", seed, pod.key, dir, peer, proto, port, slot, dp.policies);
                            }
                        }
                    }
                }
            }
        }
    }
}

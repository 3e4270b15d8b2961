//! Why a packet is allowed or denied at a pod: the compiled verdict (what the datapath
//! does) with the policies that isolate the pod and the rules that match the packet, for
//! `netpol explain` and the tests' cross-checks.
use std::net::IpAddr;

use super::state::rule_allow;
use super::tiers::{cluster_policy_of, rule_traffic, TierStep};
use super::*;

/// One step of the walk through the tiers for a packet, in the order taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainStep {
    /// A cluster policy rule matched first in its tier: Accept and Deny decide, Pass goes on
    /// to the next tier.
    Rule(TierStep),
    /// The NetworkPolicies isolating the pod decided: allowed, or not.
    NetworkPolicy { allowed: bool },
    /// No tier decided: allowed by default.
    Default,
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
    /// Where cluster policies select the pod in this direction: the walk through the tiers
    /// (e.g. Admin pass, then the NetworkPolicies allow). Empty otherwise.
    pub chain: Vec<ChainStep>,
}

/// Explains the compiled verdict for `pod` (compiled in `node`) in direction `dir`.
pub fn explain(
    cluster: &Cluster,
    node: &NodePolicy,
    pod: &ObjKey,
    dir: Direction,
    peer: IpAddr,
    proto: u8,
    port: Option<u16>,
) -> Explanation {
    let verdict = node.verdict(pod, dir, peer, proto, port);
    let mut out = Explanation {
        dir,
        isolated: false,
        policies: Vec::new(),
        allowing_rules: Vec::new(),
        allowed: verdict.passes(),
        verdict,
        chain: Vec::new(),
    };
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
    if dp.policies.iter().any(|k| cluster_policy_of(k).is_some()) {
        // The chain of the first target the pod may reach (or of the first target).
        let chains: Vec<Vec<ChainStep>> = targets
            .iter()
            .map(|(addr, proto, port)| {
                let class = if class.service.is_some() && dir == Direction::Egress { &node.classes[node.class_of(*addr)] } else { class };
                let np_allows = out.allowing_rules.iter().any(|r| {
                    let rule = &cluster.policies[&r.policy].rules(dir)[r.index];
                    (rule.peers.is_none() || class.rules.binary_search(r).is_ok())
                        && rule_allow(p, dir, rule, class, 0).permits(*proto, *port)
                });
                chain(cluster, &dp.policies, p, dir, class, *proto, *port, np_allows)
            })
            .collect();
        let allows = |c: &Vec<ChainStep>| match c.last() {
            Some(ChainStep::Rule(s)) => s.action == Action::Accept,
            Some(ChainStep::NetworkPolicy { allowed }) => *allowed,
            Some(ChainStep::Default) | None => true,
        };
        out.chain = chains.iter().find(|c| allows(c)).or(chains.first()).cloned().unwrap_or_default();
    }
    out
}

/// The walk through the tiers of a packet to a peer of `class` at `pod` in `dir`, whose
/// policy list is `policies` (Admin, NetworkPolicy, Baseline); `np_allows`: some rule of the
/// isolating NetworkPolicies allows the packet.
#[allow(clippy::too_many_arguments)]
fn chain(
    cluster: &Cluster,
    policies: &[ObjKey],
    pod: &Pod,
    dir: Direction,
    class: &ClassKey,
    proto: u8,
    port: Option<u16>,
    np_allows: bool,
) -> Vec<ChainStep> {
    let mut out = Vec::new();
    let tier_walk = |tier: Tier, out: &mut Vec<ChainStep>| -> Option<Action> {
        for (t, name) in policies.iter().filter_map(cluster_policy_of) {
            let Some(pol) = cluster.cluster_policies.get(name).filter(|_| t == tier) else { continue };
            for (index, rule) in pol.rules(dir).iter().enumerate() {
                let r = ClusterRuleRef { policy: name.to_string(), dir, index };
                if class.cluster_rules.binary_search(&r).is_ok() && rule_traffic(rule, pod, dir, class).holds(proto, port) {
                    let step = TierStep { tier, policy: name.to_string(), index, rule_name: rule.name.clone(), action: rule.action };
                    out.push(ChainStep::Rule(step));
                    return Some(rule.action);
                }
            }
        }
        None
    };
    if matches!(tier_walk(Tier::Admin, &mut out), Some(Action::Accept | Action::Deny)) {
        return out;
    }
    if policies.iter().any(|k| cluster_policy_of(k).is_none()) {
        out.push(ChainStep::NetworkPolicy { allowed: np_allows });
        return out;
    }
    if !matches!(tier_walk(Tier::Baseline, &mut out), Some(Action::Accept | Action::Deny)) {
        out.push(ChainStep::Default);
    }
    out
}

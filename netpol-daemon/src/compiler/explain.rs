//! Why a packet is allowed or denied at a pod: the compiled verdict (what the datapath
//! does) with the policies that isolate the pod and the rules that match the packet, for
//! `netpol explain` and the tests' cross-checks.
use std::net::IpAddr;

use super::state::rule_allow;
use super::*;

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
    let mut out =
        Explanation { dir, isolated: false, policies: Vec::new(), allowing_rules: Vec::new(), allowed: verdict.passes(), verdict };
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

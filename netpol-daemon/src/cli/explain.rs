//! `explain`: the verdict of both ends of one connection and the policies and rules that
//! decided, from the same compiler tables the datapath gets. An [`ExplainReport`] holds the
//! facts; [`ExplainReport::text`] writes them for people, `-o json` as one JSON document.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Result};
use serde::Serialize;

use super::{load, resolve, End, Output};
use crate::compiler::{self, ChainStep, Explanation};
use crate::model::{self, Cluster, Direction, PortRef, Protocol};

/// One end of the connection as given and as resolved.
#[derive(Clone, Debug, Serialize)]
pub struct EndRef {
    /// As given: NS/POD or an address.
    pub name: String,
    pub ip: String,
    /// The pod (NS/POD) holding the address, if any.
    pub pod: Option<String>,
}

/// A policy isolating an end.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyRef {
    /// NS/NAME.
    pub name: String,
    /// Why it is invalid (enforced fail-closed), if it is.
    pub invalid: Option<String>,
}

/// A rule that matches the connection at an end.
#[derive(Clone, Debug, Serialize)]
pub struct RuleRef {
    pub policy: String,
    /// `spec.ingress[0]`, `spec.egress[2]`.
    pub field: String,
    /// Its peers (`from`/`to` entries); `null`: any peer.
    pub peers: Option<usize>,
    /// Its ports (`TCP/5432`, `UDP/*`, `TCP/8000-9000`, `TCP/http`); `null`: all ports and
    /// protocols.
    pub ports: Option<Vec<String>>,
}

/// One step of the walk through the ClusterNetworkPolicy tiers.
#[derive(Clone, Debug, Serialize)]
pub struct TierStepRef {
    /// `Admin`, `NetworkPolicy`, `Baseline`, or `default`.
    pub tier: String,
    /// The cluster policy (none for the NetworkPolicy tier and the default).
    pub policy: Option<String>,
    /// `spec.ingress[0]`, with the rule's name when it has one.
    pub rule: Option<String>,
    /// `Accept`, `Deny`, `Pass`; for the NetworkPolicies `allow` or `deny`; `allow` by default.
    pub action: String,
}

impl TierStepRef {
    fn of(s: &ChainStep, dir: Direction) -> TierStepRef {
        match s {
            ChainStep::Rule(r) => {
                let name = r.rule_name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default();
                TierStepRef {
                    tier: format!("{:?}", r.tier),
                    policy: Some(r.policy.clone()),
                    rule: Some(format!("spec.{}[{}]{name}", dir.as_str(), r.index)),
                    action: format!("{:?}", r.action),
                }
            }
            ChainStep::NetworkPolicy { allowed } => TierStepRef {
                tier: "NetworkPolicy".into(),
                policy: None,
                rule: None,
                action: if *allowed { "allow" } else { "deny" }.into(),
            },
            ChainStep::Default => TierStepRef { tier: "default".into(), policy: None, rule: None, action: "allow".into() },
        }
    }

    /// `Admin pass (POLICY spec.egress[1])`, `NetworkPolicy allow`.
    fn text(&self) -> String {
        let at = match (&self.policy, &self.rule) {
            (Some(p), Some(r)) => format!(" ({p} {r})"),
            _ => String::new(),
        };
        format!("{} {}{at}", self.tier, self.action.to_lowercase())
    }
}

/// The verdict at one end: the source's egress, the destination's ingress.
#[derive(Clone, Debug, Serialize)]
pub struct EndVerdict {
    pub direction: &'static str,
    /// NS/POD, or the address of an end that is not a pod.
    pub at: String,
    /// A pod: enforced here (false: not a pod, nothing to enforce).
    pub enforced: bool,
    pub isolated: bool,
    /// `allowed`, `denied`, or `audit` (an audit-mode policy would deny it; it passes).
    pub verdict: &'static str,
    pub policies: Vec<PolicyRef>,
    pub rules: Vec<RuleRef>,
    /// Where ClusterNetworkPolicies select the pod in this direction: the tiers' steps, in
    /// order (empty otherwise).
    pub tiers: Vec<TierStepRef>,
}

/// What `explain` finds.
#[derive(Clone, Debug, Serialize)]
pub struct ExplainReport {
    pub from: EndRef,
    pub to: EndRef,
    pub protocol: String,
    pub port: Option<u16>,
    pub ends: Vec<EndVerdict>,
    /// Both ends let the connection through.
    pub allowed: bool,
    /// Objects skipped or enforced fail-closed as invalid.
    pub warnings: Vec<String>,
}

fn end_ref(name: &str, e: &End) -> EndRef {
    EndRef { name: name.to_string(), ip: e.ip.to_string(), pod: e.pod.as_ref().map(|k| k.to_string()) }
}

fn verdict_name(v: model::Verdict) -> &'static str {
    match v {
        model::Verdict::Allow => "allowed",
        model::Verdict::Audit => "audit",
        model::Verdict::Deny => "denied",
    }
}

fn port_text(p: &model::PortSpec) -> String {
    match &p.port {
        PortRef::Any => format!("{}/*", p.protocol),
        PortRef::Range(a, b) if a == b => format!("{}/{a}", p.protocol),
        PortRef::Range(a, b) => format!("{}/{a}-{b}", p.protocol),
        PortRef::Named(n) => format!("{}/{n}", p.protocol),
    }
}

/// The verdict at `who` as the report has it.
fn end_verdict(e: &Explanation, cluster: &Cluster, who: String) -> EndVerdict {
    let policies = e
        .policies
        .iter()
        .map(|p| match compiler::cluster_policy_of(p) {
            Some((tier, name)) => PolicyRef {
                name: format!("ClusterNetworkPolicy {name} ({tier:?} tier)"),
                invalid: cluster.cluster_policies.get(name).and_then(|p| p.invalid.clone()),
            },
            None => PolicyRef { name: p.to_string(), invalid: cluster.policies.get(p).and_then(|p| p.invalid.clone()) },
        })
        .collect();
    let rules = e
        .allowing_rules
        .iter()
        .map(|r| {
            let rule = cluster.policies.get(&r.policy).map(|p| &p.rules(e.dir)[r.index]);
            RuleRef {
                policy: r.policy.to_string(),
                field: format!("spec.{}[{}]", e.dir.as_str(), r.index),
                peers: rule.and_then(|r| r.peers.as_ref().map(Vec::len)),
                ports: rule.and_then(|r| r.ports.as_ref().map(|ps| ps.iter().map(port_text).collect())),
            }
        })
        .collect();
    let verdict = if e.isolated { verdict_name(e.verdict) } else { "allowed" };
    let tiers = e.chain.iter().map(|s| TierStepRef::of(s, e.dir)).collect();
    EndVerdict { direction: e.dir.as_str(), at: who, enforced: true, isolated: e.isolated, verdict, policies, rules, tiers }
}

/// What `explain` finds for one connection.
pub fn explain_report(dir: Option<&Path>, from: &str, to: &str, port: Option<u16>, protocol: &str) -> Result<ExplainReport> {
    let (cluster, errors) = load(dir)?;
    let c = &cluster;
    let proto = Protocol::ip_number(protocol).ok_or_else(|| anyhow!("unknown protocol {protocol:?} (TCP, UDP, SCTP, ICMP)"))?;
    // Only the policy protocols have ports (ICMP has none).
    let port = match Protocol::from_number(proto) {
        Some(_) => Some(port.ok_or_else(|| anyhow!("--port is required for {protocol}"))?),
        None => None,
    };
    let (src, dst) = (resolve(c, from)?, resolve(c, to)?);
    let mut ends = Vec::new();
    for (end, dirn, peer) in [(&src, Direction::Egress, dst.ip), (&dst, Direction::Ingress, src.ip)] {
        match &end.pod {
            None => ends.push(EndVerdict {
                direction: dirn.as_str(),
                at: end.ip.to_string(),
                enforced: false,
                isolated: false,
                verdict: "allowed",
                policies: Vec::new(),
                rules: Vec::new(),
                tiers: Vec::new(),
            }),
            Some(key) => {
                let index = compiler::Index::new(c);
                let node = compiler::compile_pods(&index, &[&c.pods[key]]);
                let e = compiler::explain(c, &node, key, dirn, peer, proto, port);
                ends.push(end_verdict(&e, c, key.to_string()));
            }
        }
    }
    Ok(ExplainReport {
        from: end_ref(from, &src),
        to: end_ref(to, &dst),
        protocol: Protocol::ip_name(proto).unwrap_or(protocol).to_string(),
        port,
        allowed: ends.iter().all(|e| e.verdict != "denied"),
        ends,
        warnings: errors,
    })
}

/// Prints the verdict of both ends for one connection: whether it is allowed, and the text or
/// JSON document.
pub fn explain(dir: Option<&Path>, from: &str, to: &str, port: Option<u16>, protocol: &str, output: Output) -> Result<(bool, String)> {
    let report = explain_report(dir, from, to, port, protocol)?;
    Ok((report.allowed, output.render(&report, ExplainReport::text)))
}

impl ExplainReport {
    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for e in &self.warnings {
            let _ = writeln!(out, "warning: invalid {e}");
        }
        let port = self.port.map(|p| format!("/{p}")).unwrap_or_default();
        let _ = writeln!(out, "{} ({}) -> {} ({}) {}{port}", self.from.name, self.from.ip, self.to.name, self.to.ip, self.protocol);
        for e in &self.ends {
            describe(e, &mut out);
        }
        let _ = writeln!(out, "verdict: {}", if self.allowed { "ALLOWED" } else { "DENIED" });
        out
    }
}

fn describe(e: &EndVerdict, out: &mut String) {
    let (d, who) = (e.direction, &e.at);
    if !e.enforced {
        let _ = writeln!(out, "  {d} at {who}: not a pod, not enforced here");
        return;
    }
    if !e.isolated {
        let _ = writeln!(out, "  {d} at {who}: ALLOWED (no policy isolates {who} for {d})");
        return;
    }
    let verdict = match e.verdict {
        "allowed" => "ALLOWED",
        "audit" => "AUDIT (an audit-mode policy would deny it; it passes)",
        _ => "DENIED",
    };
    let pols: Vec<String> = e
        .policies
        .iter()
        .map(|p| match &p.invalid {
            Some(why) => format!("{} [invalid, fail-closed: {why}]", p.name),
            None => p.name.clone(),
        })
        .collect();
    let by = if e.tiers.is_empty() { "isolated by" } else { "selected by" };
    let _ = writeln!(out, "  {d} at {who}: {verdict} ({by} {})", pols.join(", "));
    if !e.tiers.is_empty() {
        let steps: Vec<String> = e.tiers.iter().map(TierStepRef::text).collect();
        let _ = writeln!(out, "    tiers: {}", steps.join(" -> "));
    }
    // The NetworkPolicies' rules matter where they decided (always, without cluster policies).
    let np_decided = e.tiers.is_empty() || e.tiers.iter().any(|s| s.tier == "NetworkPolicy");
    if np_decided && e.rules.is_empty() {
        let _ = writeln!(out, "    no {d} rule of those policies matches this peer, port and protocol");
    }
    for r in e.rules.iter().filter(|_| np_decided) {
        let peers = r.peers.map_or_else(|| "any peer".to_string(), |n| format!("{n} peer(s)"));
        let ports = r.ports.as_ref().map_or_else(|| "all ports and protocols".to_string(), |p| p.join(", "));
        let _ = writeln!(out, "    allowed by {}: {} ({peers}; {ports})", r.policy, r.field);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's worked example (deploy/examples/cluster-network-policy): each guardrail
    /// holds against what the namespace's NetworkPolicies say, and the tier chain says why.
    #[test]
    fn the_guardrail_example_decides_as_the_readme_says() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/cluster-network-policy");
        let cases = [
            ("shop/api", "169.254.169.254", 80, false, "Admin deny (no-cloud-metadata spec.egress[0] (instance-metadata))"),
            ("monitoring/prometheus", "shop/mysql", 9104, true, "Admin accept (monitoring-scrapes spec.ingress[0] (prometheus))"),
            ("shop/api", "shop/mysql", 3306, true, "NetworkPolicy allow"),
            ("blog/wordpress", "shop/mysql", 3306, false, "NetworkPolicy deny"),
            ("blog/wordpress", "shop/api", 8080, false, "Baseline deny (tenant-isolation spec.ingress[0] (other-tenants))"),
            ("monitoring/prometheus", "blog/wordpress", 8080, true, "default allow"),
        ];
        for (from, to, port, allowed, ingress_or_egress) in cases {
            let r = explain_report(Some(&dir), from, to, Some(port), "TCP").unwrap();
            assert!(r.warnings.is_empty(), "{:?}", r.warnings);
            assert_eq!(r.allowed, allowed, "{from} -> {to}:{port}\n{}", r.text());
            let chains: Vec<String> =
                r.ends.iter().map(|e| e.tiers.iter().map(TierStepRef::text).collect::<Vec<_>>().join(" -> ")).collect();
            assert!(chains.iter().any(|c| c == ingress_or_egress), "{from} -> {to}:{port}: {chains:?}");
        }
    }
}

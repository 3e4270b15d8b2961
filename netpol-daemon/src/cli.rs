//! `explain` and `check`: the compiler's answers for people, from a manifests directory;
//! `status`: what the node's pinned maps enforce ([`status`]).
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, bail, Result};

use crate::compiler::{self, Explanation};
use crate::entries::{self, ClassInterner, PortSetInterner};
use crate::model::{self, Cluster};
use crate::model::{Direction, ObjKey, PortRef, Protocol};
use crate::source::{manifests, Source};

mod status;
pub use status::{select as status_select, status};

/// An end of a connection: a pod (NS/POD) or an address (a pod's, or outside the cluster).
#[derive(Clone, Debug)]
pub struct End {
    pub ip: IpAddr,
    pub pod: Option<ObjKey>,
}

pub fn resolve(cluster: &Cluster, s: &str) -> Result<End> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        let pod = cluster.pod_with_ip(ip).map(|p| p.key.clone());
        return Ok(End { ip, pod });
    }
    let (ns, name) = s.split_once('/').ok_or_else(|| anyhow!("{s:?}: want NAMESPACE/POD or an IP address"))?;
    let key = ObjKey::new(ns, name);
    let pod = cluster.pods.get(&key).ok_or_else(|| anyhow!("no pod {key} in the manifests"))?;
    if pod.host_network {
        bail!("{key} uses the host network: NetworkPolicy does not apply to it");
    }
    let ip = *pod.ips.first().ok_or_else(|| anyhow!("{key} has no IP address (status.podIP)"))?;
    Ok(End { ip, pod: Some(key) })
}

fn describe(e: &Explanation, cluster: &Cluster, who: &ObjKey, out: &mut String) {
    let d = e.dir.as_str();
    if !e.isolated {
        let _ = writeln!(out, "  {d} at {who}: ALLOWED (no policy isolates {who} for {d})");
        return;
    }
    let verdict = match e.verdict {
        model::Verdict::Allow => "ALLOWED",
        model::Verdict::Audit => "AUDIT (an audit-mode policy would deny it; it passes)",
        model::Verdict::Deny => "DENIED",
    };
    let pols: Vec<String> = e
        .policies
        .iter()
        .map(|p| match cluster.policies.get(p).and_then(|p| p.invalid.as_ref()) {
            Some(why) => format!("{p} [invalid, fail-closed: {why}]"),
            None => p.to_string(),
        })
        .collect();
    let _ = writeln!(out, "  {d} at {who}: {verdict} (isolated by {})", pols.join(", "));
    if e.allowing_rules.is_empty() {
        let _ = writeln!(out, "    no {d} rule of those policies matches this peer, port and protocol");
    }
    for r in &e.allowing_rules {
        let field = if e.dir == Direction::Ingress { "ingress" } else { "egress" };
        let rule = cluster.policies.get(&r.policy).map(|p| &p.rules(e.dir)[r.index]);
        let peers = match rule.map(|r| &r.peers) {
            Some(None) => "any peer".to_string(),
            Some(Some(p)) => format!("{} peer(s)", p.len()),
            None => String::new(),
        };
        let ports = match rule.map(|r| &r.ports) {
            Some(None) => "all ports and protocols".to_string(),
            Some(Some(ps)) => ps
                .iter()
                .map(|p| match &p.port {
                    PortRef::Any => format!("{}/*", p.protocol),
                    PortRef::Range(a, b) if a == b => format!("{}/{a}", p.protocol),
                    PortRef::Range(a, b) => format!("{}/{a}-{b}", p.protocol),
                    PortRef::Named(n) => format!("{}/{n}", p.protocol),
                })
                .collect::<Vec<_>>()
                .join(", "),
            None => String::new(),
        };
        let _ = writeln!(out, "    allowed by {}: spec.{field}[{}] ({peers}; {ports})", r.policy, r.index);
    }
}

/// The cluster from a manifests directory, or (`None`) from the live cluster's API
/// (in-cluster config or KUBECONFIG), with the objects skipped as invalid.
pub fn load(dir: Option<&Path>) -> Result<(Cluster, Vec<String>)> {
    match dir {
        Some(dir) => {
            let loaded = anyhow::Context::with_context(manifests::load_dir(dir), || format!("reading {}", dir.display()))?;
            Ok((loaded.cluster, loaded.errors.iter().map(|e| e.to_string()).collect()))
        }
        None => {
            // No node of its own: every pod is kept in the slim form, which holds all that
            // rules match on (labels, addresses, named ports), for `explain` and `check`.
            let mut src = crate::source::kube::KubeSource::start("")?;
            let t0 = std::time::Instant::now();
            while !src.ready() {
                if t0.elapsed() > std::time::Duration::from_secs(60) {
                    bail!("the Kubernetes API did not list every watched resource within 60 s");
                }
                src.wait(std::time::Duration::from_millis(100));
            }
            let mut cluster = Cluster::default();
            let (_, errors) = src.refresh(&mut cluster, false)?.unwrap_or_default();
            Ok((cluster, errors))
        }
    }
}

/// Prints the verdict of both ends for one connection.
pub fn explain(dir: Option<&Path>, from: &str, to: &str, port: Option<u16>, protocol: &str) -> Result<(bool, String)> {
    let (cluster, errors) = load(dir)?;
    let mut out = String::new();
    for e in &errors {
        let _ = writeln!(out, "warning: invalid {e}");
    }
    let c = &cluster;
    let proto = Protocol::ip_number(protocol).ok_or_else(|| anyhow!("unknown protocol {protocol:?} (TCP, UDP, SCTP, ICMP)"))?;
    // Only the policy protocols have ports (ICMP has none).
    let port = match Protocol::from_number(proto) {
        Some(_) => Some(port.ok_or_else(|| anyhow!("--port is required for {protocol}"))?),
        None => None,
    };
    let (src, dst) = (resolve(c, from)?, resolve(c, to)?);
    let _ = writeln!(out, "{from} ({}) -> {to} ({}) {protocol}{}", src.ip, dst.ip, port.map(|p| format!("/{p}")).unwrap_or_default());
    let mut allowed = true;
    for (end, dirn, peer) in [(&src, Direction::Egress, dst.ip), (&dst, Direction::Ingress, src.ip)] {
        match &end.pod {
            None => {
                let _ = writeln!(out, "  {} at {}: not a pod, not enforced here", dirn.as_str(), end.ip);
            }
            Some(key) => {
                let pod = &c.pods[key];
                let index = compiler::Index::new(c);
                let node = compiler::compile_pods(&index, &[pod]);
                let e = compiler::explain(c, &node, key, dirn, peer, proto, port);
                allowed &= e.allowed;
                describe(&e, c, key, &mut out);
            }
        }
    }
    let _ = writeln!(out, "verdict: {}", if allowed { "ALLOWED" } else { "DENIED" });
    Ok((allowed, out))
}

/// Validates a manifests directory: invalid objects, and problems the compiler can see.
/// Returns (number of errors, report).
pub fn check(dir: Option<&Path>) -> Result<(usize, String)> {
    let (cluster, load_errors) = load(dir)?;
    let c = &cluster;
    let mut out = String::new();
    let mut errors = 0;
    for e in &load_errors {
        errors += 1;
        let _ = writeln!(out, "error: {e}");
    }
    for pol in c.policies.values() {
        if pol.invalid.is_some() {
            let dirs: Vec<&str> = Direction::BOTH.into_iter().filter(|d| pol.isolates(*d)).map(|d| d.as_str()).collect();
            let selected = c
                .pods
                .values()
                .filter(|p| p.selectable() && p.key.namespace == pol.key.namespace && pol.pod_selector.matches(&p.labels))
                .count();
            let _ = writeln!(
                out,
                "note: {}: invalid, enforced fail-closed: isolates {selected} pod(s) for {} and allows nothing",
                pol.key,
                dirs.join(" and ")
            );
            continue;
        }
        let selected = c
            .pods
            .values()
            .filter(|p| p.selectable() && p.key.namespace == pol.key.namespace && pol.pod_selector.matches(&p.labels))
            .count();
        if selected == 0 {
            let _ = writeln!(out, "warning: {}: spec.podSelector selects no pod", pol.key);
        }
        for dir in Direction::BOTH {
            for (i, rule) in pol.rules(dir).iter().enumerate() {
                for (j, spec) in rule.ports.iter().flatten().enumerate() {
                    if let PortRef::Named(n) = &spec.port {
                        let anywhere = c.pods.values().any(|p| p.named_ports(n, spec.protocol).next().is_some());
                        if !anywhere {
                            let _ = writeln!(
                                out,
                                "warning: {}: spec.{}[{i}].ports[{j}]: no pod has a {} port named {n:?}",
                                pol.key,
                                dir.as_str(),
                                spec.protocol
                            );
                        }
                    }
                }
            }
        }
    }
    // Map capacity per node.
    let nodes: BTreeSet<&str> = c.pods.values().filter_map(|p| p.node_name.as_deref()).collect();
    for n in nodes {
        let node = compiler::compile_node(c, n);
        let ids: BTreeMap<ObjKey, u32> = node.pods.keys().enumerate().map(|(i, k)| (k.clone(), i as u32)).collect();
        let d = entries::desired(&node, &ids, &mut ClassInterner::default(), &mut PortSetInterner::default());
        use netpol_common::*;
        for (map, need, have) in [
            ("IDENTITIES", d.identities.len(), IDENTITIES_MAX as usize),
            ("POLICY", d.policy.len(), POLICY_MAX as usize),
            ("POLICY_PORTS", d.ports.len(), POLICY_PORTS_MAX as usize),
            ("ENDPOINTS", ids.len(), MAX_ENDPOINTS as usize),
        ] {
            if need > have {
                errors += 1;
                let _ = writeln!(out, "error: node {n}: needs {need} {map} entries, the map holds {have}");
            }
        }
        let _ = writeln!(
            out,
            "node {n}: {} pods, {} address classes; {} IDENTITIES, {} POLICY, {} POLICY_PORTS entries",
            node.pods.len(),
            node.classes.len(),
            d.identities.len(),
            d.policy.len(),
            d.ports.len()
        );
    }
    let _ = writeln!(out, "{} namespaces, {} pods, {} policies; {errors} error(s)", c.namespaces.len(), c.pods.len(), c.policies.len());
    Ok((errors, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(files: &[(&str, &str)]) -> tempdir::Dir {
        tempdir::Dir::new(files)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new(files: &[(&str, &str)]) -> Dir {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "netpol-cli-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&p).unwrap();
                for (n, t) in files {
                    std::fs::write(p.join(n), t).unwrap();
                }
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: apps, labels: {app: api}}
spec: {nodeName: n1, containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: data, labels: {app: db}}
spec: {nodeName: n2, containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-in, namespace: data}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: apps}}}]
    ports: [{port: 5432}]
  - from: [{ipBlock: {cidr: 10.0.0.0/8}}]
    ports: [{port: 5432}, {port: 9187}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-out, namespace: apps}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{ports: [{port: 5432}]}]
"#;

    #[test]
    fn explain_names_the_deciding_rules_for_both_ends() {
        let d = dir(&[("c.yaml", CLUSTER)]);
        let (ok, text) = explain(Some(&d.0), "apps/api", "data/db", Some(5432), "TCP").unwrap();
        assert!(ok, "{text}");
        assert!(text.contains("egress at apps/api: ALLOWED (isolated by apps/api-out)"), "{text}");
        assert!(text.contains("allowed by apps/api-out: spec.egress[0] (any peer; TCP/5432)"), "{text}");
        assert!(text.contains("allowed by data/db-in: spec.ingress[0]"), "{text}");
        assert!(text.contains("allowed by data/db-in: spec.ingress[1]"), "{text}");
        let (ok, text) = explain(Some(&d.0), "apps/api", "data/db", Some(9187), "TCP").unwrap();
        assert!(!ok, "{text}");
        assert!(text.contains("egress at apps/api: DENIED"), "{text}");
        assert!(text.contains("ingress at data/db: ALLOWED"), "{text}");
        let (ok, text) = explain(Some(&d.0), "192.168.1.1", "data/db", Some(5432), "UDP").unwrap();
        assert!(!ok);
        assert!(text.contains("egress at 192.168.1.1: not a pod"), "{text}");
        assert!(text.contains("no ingress rule of those policies matches"), "{text}");
        assert!(explain(Some(&d.0), "apps/nope", "data/db", Some(1), "TCP").is_err());
        assert!(explain(Some(&d.0), "apps/api", "data/db", Some(1), "GRE").is_err());
    }

    #[test]
    fn check_reports_invalid_objects_and_suspicious_policies() {
        let bad = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: apps}\nspec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: lonely, namespace: apps}\nspec: {podSelector: {matchLabels: {app: nothing}}, ingress: [{ports: [{port: web}]}]}\n";
        let d = dir(&[("c.yaml", CLUSTER), ("bad.yaml", bad)]);
        let (errors, text) = check(Some(&d.0)).unwrap();
        assert_eq!(errors, 1, "{text}");
        assert!(text.contains("apps/bad: spec.ingress[0].ports[0].port: 0 is not in 1-65535"), "{text}");
        // The invalid policy is shown as enforced: fail-closed, isolating apps' pods.
        assert!(text.contains("note: apps/bad: invalid, enforced fail-closed: isolates 1 pod(s) for ingress and allows nothing"), "{text}");
        let (ok, why) = explain(Some(&d.0), "data/db", "apps/api", Some(80), "TCP").unwrap();
        assert!(!ok, "{why}");
        assert!(why.contains("ingress at apps/api: DENIED (isolated by apps/bad [invalid, fail-closed: apps/bad: spec.ingress[0].ports[0].port: 0 is not in 1-65535])"), "{why}");
        assert!(text.contains("warning: apps/lonely: spec.podSelector selects no pod"), "{text}");
        assert!(text.contains("no pod has a TCP port named \"web\""), "{text}");
        assert!(text.contains("node n2: 1 pods"), "{text}");
        let d = dir(&[("c.yaml", CLUSTER)]);
        assert_eq!(check(Some(&d.0)).unwrap().0, 0);
    }
}

//! The commands that answer people: `explain` and `check` (the compiler's answers, from a
//! manifests directory or the live cluster), `observe` (the node's flow stream) and `status`
//! (what the node's pinned maps enforce, read back from the pins). Each writes text or one
//! JSON document ([`Output`]): the same facts either way.
use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, bail, Result};

use crate::model::{Cluster, ObjKey};
use crate::source::{manifests, Source};

mod check;
mod explain;
pub mod observe;
mod status;

pub use check::{check, check_report, CheckReport, Problem, Severity};
pub use explain::{explain, explain_report, ExplainReport};
pub use status::{select as status_select, status};

/// How a command writes its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// One JSON document (`observe`: one JSON object per line).
    Json,
}

impl Output {
    /// `text` or `json`.
    pub fn parse(s: &str) -> Option<Output> {
        match s {
            "text" => Some(Output::Text),
            "json" => Some(Output::Json),
            _ => None,
        }
    }

    /// `report` as this output: its text, or its JSON document (pretty, with a newline).
    fn render<T: serde::Serialize>(self, report: &T, text: impl FnOnce(&T) -> String) -> String {
        match self {
            Output::Text => text(report),
            Output::Json => {
                let mut s = serde_json::to_string_pretty(report).expect("a report serializes");
                s.push('\n');
                s
            }
        }
    }
}

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
            let mut src = crate::source::kube::KubeSource::start("", Default::default())?;
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
        let (ok, text) = explain(Some(&d.0), "apps/api", "data/db", Some(5432), "TCP", Output::Text).unwrap();
        assert!(ok, "{text}");
        assert!(text.contains("egress at apps/api: ALLOWED (isolated by apps/api-out)"), "{text}");
        assert!(text.contains("allowed by apps/api-out: spec.egress[0] (any peer; TCP/5432)"), "{text}");
        assert!(text.contains("allowed by data/db-in: spec.ingress[0]"), "{text}");
        assert!(text.contains("allowed by data/db-in: spec.ingress[1]"), "{text}");
        let (ok, text) = explain(Some(&d.0), "apps/api", "data/db", Some(9187), "TCP", Output::Text).unwrap();
        assert!(!ok, "{text}");
        assert!(text.contains("egress at apps/api: DENIED"), "{text}");
        assert!(text.contains("ingress at data/db: ALLOWED"), "{text}");
        let (ok, text) = explain(Some(&d.0), "192.168.1.1", "data/db", Some(5432), "UDP", Output::Text).unwrap();
        assert!(!ok);
        assert!(text.contains("egress at 192.168.1.1: not a pod"), "{text}");
        assert!(text.contains("no ingress rule of those policies matches"), "{text}");
        assert!(explain(Some(&d.0), "apps/nope", "data/db", Some(1), "TCP", Output::Text).is_err());
        assert!(explain(Some(&d.0), "apps/api", "data/db", Some(1), "GRE", Output::Text).is_err());
    }

    #[test]
    fn check_reports_invalid_objects_and_suspicious_policies() {
        let bad = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: apps}\nspec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: lonely, namespace: apps}\nspec: {podSelector: {matchLabels: {app: nothing}}, ingress: [{ports: [{port: web}]}]}\n";
        let d = dir(&[("c.yaml", CLUSTER), ("bad.yaml", bad)]);
        let (errors, text) = check(Some(&d.0), Output::Text).unwrap();
        assert_eq!(errors, 1, "{text}");
        assert!(text.contains("apps/bad: spec.ingress[0].ports[0].port: 0 is not in 1-65535"), "{text}");
        // The invalid policy is shown as enforced: fail-closed, isolating apps' pods.
        assert!(text.contains("note: apps/bad: invalid, enforced fail-closed: isolates 1 pod(s) for ingress and allows nothing"), "{text}");
        let (ok, why) = explain(Some(&d.0), "data/db", "apps/api", Some(80), "TCP", Output::Text).unwrap();
        assert!(!ok, "{why}");
        assert!(why.contains("ingress at apps/api: DENIED (isolated by apps/bad [invalid, fail-closed: apps/bad: spec.ingress[0].ports[0].port: 0 is not in 1-65535])"), "{why}");
        assert!(text.contains("warning: apps/lonely: spec.podSelector selects no pod"), "{text}");
        assert!(text.contains("no pod has a TCP port named \"web\""), "{text}");
        assert!(text.contains("node n2: 1 pods"), "{text}");
        let d = dir(&[("c.yaml", CLUSTER)]);
        assert_eq!(check(Some(&d.0), Output::Text).unwrap().0, 0);
    }

    #[test]
    fn explain_writes_the_same_facts_as_one_json_document() {
        let d = dir(&[("c.yaml", CLUSTER)]);
        let (ok, json) = explain(Some(&d.0), "apps/api", "data/db", Some(9187), "tcp", Output::Json).unwrap();
        assert!(!ok, "the exit status follows the verdict as with text");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!((v["allowed"].as_bool(), v["protocol"].as_str(), v["port"].as_u64()), (Some(false), Some("TCP"), Some(9187)));
        assert_eq!(
            (v["from"]["name"].as_str(), v["from"]["ip"].as_str(), v["to"]["pod"].as_str()),
            (Some("apps/api"), Some("10.0.0.1"), Some("data/db"))
        );
        let (eg, ig) = (&v["ends"][0], &v["ends"][1]);
        assert_eq!(
            (eg["direction"].as_str(), eg["at"].as_str(), eg["verdict"].as_str()),
            (Some("egress"), Some("apps/api"), Some("denied"))
        );
        assert_eq!(eg["policies"], serde_json::json!([{"name": "apps/api-out", "invalid": null}]));
        assert_eq!(eg["rules"], serde_json::json!([]));
        assert_eq!((ig["verdict"].as_str(), ig["isolated"].as_bool()), (Some("allowed"), Some(true)));
        assert_eq!(
            ig["rules"],
            serde_json::json!([{"policy": "data/db-in", "field": "spec.ingress[1]", "peers": 1, "ports": ["TCP/5432", "TCP/9187"]}])
        );
        // The text says the same.
        let (_, text) = explain(Some(&d.0), "apps/api", "data/db", Some(9187), "tcp", Output::Text).unwrap();
        assert!(text.contains("allowed by data/db-in: spec.ingress[1] (1 peer(s); TCP/5432, TCP/9187)"), "{text}");
        // An end that is not a pod; a rule of any peer and port.
        let (ok, json) = explain(Some(&d.0), "192.168.1.1", "apps/api", Some(80), "TCP", Output::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(ok);
        assert_eq!((v["ends"][0]["enforced"].as_bool(), v["ends"][0]["at"].as_str()), (Some(false), Some("192.168.1.1")));
        assert_eq!((v["ends"][1]["isolated"].as_bool(), v["ends"][1]["verdict"].as_str()), (Some(false), Some("allowed")));
    }

    #[test]
    fn check_writes_its_problems_with_severity_object_and_field_as_json() {
        let bad = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: apps}\nspec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: lonely, namespace: apps}\nspec: {podSelector: {matchLabels: {app: nothing}}, ingress: [{ports: [{port: web}]}]}\n";
        let d = dir(&[("c.yaml", CLUSTER), ("bad.yaml", bad)]);
        let (errors, json) = check(Some(&d.0), Output::Json).unwrap();
        assert_eq!(errors, 1, "the exit status follows the errors as with text");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        let problems = v["problems"].as_array().unwrap();
        let find = |sev: &str, field: Option<&str>| {
            problems
                .iter()
                .find(|p| p["severity"] == sev && p["field"].as_str() == field)
                .unwrap_or_else(|| panic!("{sev} {field:?}: {json}"))
        };
        let e = find("error", Some("spec.ingress[0].ports[0].port"));
        assert_eq!((e["kind"].as_str(), e["object"].as_str(), e["document"].as_u64()), (Some("NetworkPolicy"), Some("apps/bad"), Some(1)));
        assert!(e["message"].as_str().unwrap().starts_with("0 is not in 1-65535"), "{e}");
        assert!(e["file"].as_str().unwrap().ends_with("bad.yaml"), "{e}");
        let n = find("note", None);
        assert_eq!(n["object"].as_str(), Some("apps/bad"));
        let w = find("warning", Some("spec.podSelector"));
        assert_eq!((w["object"].as_str(), w["message"].as_str()), (Some("apps/lonely"), Some("selects no pod")));
        assert_eq!(find("warning", Some("spec.ingress[0].ports[0]"))["message"].as_str(), Some("no pod has a TCP port named \"web\""));
        assert_eq!((v["errors"].as_u64(), v["pods"].as_u64(), v["policies"].as_u64()), (Some(1), Some(2), Some(4)));
        let n2 = v["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "n2").unwrap();
        assert_eq!(n2["pods"].as_u64(), Some(1));
        // The text is the same report, line by line.
        let (_, text) = check(Some(&d.0), Output::Text).unwrap();
        for p in problems {
            assert!(text.contains(&format!("{}: {}", p["severity"].as_str().unwrap(), p["text"].as_str().unwrap())), "{p}\n{text}");
        }
    }

    #[test]
    fn problems_are_read_from_the_sources_wording() {
        let p = Problem::parse(Severity::Error, "NetworkPolicy a/b: spec.egress[0].to[1].ipBlock.cidr: bad CIDR \"x\"");
        assert_eq!(
            (p.kind.as_deref(), p.object.as_deref(), p.field.as_deref()),
            (Some("NetworkPolicy"), Some("a/b"), Some("spec.egress[0].to[1].ipBlock.cidr"))
        );
        assert_eq!((p.message.as_str(), p.file.as_deref()), ("bad CIDR \"x\"", None));
        let p = Problem::parse(Severity::Error, "/m/x.yaml (document 0): cannot read: denied");
        assert_eq!((p.file.as_deref(), p.document, p.kind.as_deref(), p.field.as_deref()), (Some("/m/x.yaml"), Some(0), None, None));
        assert_eq!(p.message, "cannot read: denied");
        let p =
            Problem::parse(Severity::Error, "ClusterNetworkPolicy c: spec.egress[0].to[0].nodes: node peers are not supported by netpol");
        assert_eq!(
            (p.kind.as_deref(), p.object.as_deref(), p.field.as_deref()),
            (Some("ClusterNetworkPolicy"), Some("c"), Some("spec.egress[0].to[0].nodes"))
        );
        let p = Problem::parse(Severity::Error, "Pod t/web: no name given: really");
        assert_eq!((p.object.as_deref(), p.field.as_deref(), p.message.as_str()), (Some("t/web"), None, "no name given: really"));
    }
}

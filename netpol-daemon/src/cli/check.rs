//! `check`: the invalid objects of a manifests directory (or the live cluster), the problems the
//! compiler can see (policies selecting nothing, named ports no pod has) and each node's map
//! capacity. A [`CheckReport`] holds them; [`CheckReport::text`] writes them for people,
//! `-o json` as one JSON document.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::{load, Output};
use crate::compiler;
use crate::entries::{self, ClassInterner, PortSetInterner};
use crate::model::{Cluster, Direction, ObjKey, PortRef};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Makes `check` fail (exit status 1).
    Error,
    Warning,
    /// How an invalid policy is enforced.
    Note,
}

/// One problem: what is at fault, where, and what is wrong.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub severity: Severity,
    /// `NetworkPolicy`, `Pod`, ..., or `Node` for map capacity; `null` where the problem is a
    /// file's (it cannot be read or parsed).
    pub kind: Option<String>,
    /// NS/NAME, or the node's name.
    pub object: Option<String>,
    /// The field at fault (`spec.ingress[0].ports[1].protocol`), where one is.
    pub field: Option<String>,
    pub message: String,
    /// The manifest file and (1-based) document, for a problem read from a directory.
    pub file: Option<String>,
    pub document: Option<usize>,
    /// The whole line as the text output has it (after the severity).
    pub text: String,
}

/// A node's needs in the maps.
#[derive(Clone, Debug, Serialize)]
pub struct NodeEntries {
    pub name: String,
    pub pods: usize,
    pub address_classes: usize,
    pub identities: usize,
    pub policy: usize,
    pub policy_ports: usize,
}

/// What `check` finds.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub problems: Vec<Problem>,
    pub nodes: Vec<NodeEntries>,
    pub namespaces: usize,
    pub pods: usize,
    pub policies: usize,
    /// Problems of severity `error`.
    pub errors: usize,
}

/// The kinds a problem's text may begin with.
const KINDS: [&str; 6] = ["Namespace", "Pod", "NetworkPolicy", "Service", "EndpointSlice", "ClusterNetworkPolicy"];

impl Problem {
    fn new(severity: Severity, kind: &str, object: &str, field: Option<String>, message: String, text: String) -> Problem {
        Problem { severity, kind: Some(kind.into()), object: Some(object.into()), field, message, file: None, document: None, text }
    }

    /// A load problem as the sources word it: `[FILE (document N): ][KIND NS/NAME: ][FIELD: ]MESSAGE`.
    pub fn parse(severity: Severity, text: &str) -> Problem {
        let mut p = Problem {
            severity,
            kind: None,
            object: None,
            field: None,
            message: String::new(),
            file: None,
            document: None,
            text: text.into(),
        };
        let mut rest = text;
        if let Some((head, tail)) = rest.split_once("): ") {
            if let Some((file, doc)) = head.rsplit_once(" (document ") {
                if let Ok(n) = doc.parse() {
                    (p.file, p.document, rest) = (Some(file.to_string()), Some(n), tail);
                }
            }
        }
        if let Some((kind, tail)) = rest.split_once(' ').filter(|(k, _)| KINDS.contains(k)) {
            if let Some((object, tail)) = tail.split_once(": ") {
                (p.kind, p.object, rest) = (Some(kind.to_string()), Some(object.to_string()), tail);
            }
        }
        let is_field = |f: &str| !f.contains(' ') && ["spec", "metadata", "status"].iter().any(|r| f.starts_with(r));
        if let Some((field, tail)) = rest.split_once(": ").filter(|(f, _)| is_field(f)) {
            (p.field, rest) = (Some(field.to_string()), tail);
        }
        p.message = rest.to_string();
        p
    }
}

/// The pods of `pol`'s namespace it selects.
fn selected(c: &Cluster, pol: &crate::model::Policy) -> usize {
    c.pods.values().filter(|p| p.selectable() && p.key.namespace == pol.key.namespace && pol.pod_selector.matches(&p.labels)).count()
}

/// What the compiler sees wrong with the policies.
fn policy_problems(c: &Cluster, out: &mut Vec<Problem>) {
    for pol in c.policies.values() {
        let key = pol.key.to_string();
        if pol.invalid.is_some() {
            let dirs: Vec<&str> = Direction::BOTH.into_iter().filter(|d| pol.isolates(*d)).map(|d| d.as_str()).collect();
            let msg = format!(
                "invalid, enforced fail-closed: isolates {} pod(s) for {} and allows nothing",
                selected(c, pol),
                dirs.join(" and ")
            );
            out.push(Problem::new(Severity::Note, "NetworkPolicy", &key, None, msg.clone(), format!("{key}: {msg}")));
            continue;
        }
        if selected(c, pol) == 0 {
            let (field, msg) = ("spec.podSelector".to_string(), "selects no pod".to_string());
            out.push(Problem::new(
                Severity::Warning,
                "NetworkPolicy",
                &key,
                Some(field.clone()),
                msg.clone(),
                format!("{key}: {field} {msg}"),
            ));
        }
        for dir in Direction::BOTH {
            for (i, rule) in pol.rules(dir).iter().enumerate() {
                for (j, spec) in rule.ports.iter().flatten().enumerate() {
                    let PortRef::Named(n) = &spec.port else { continue };
                    if c.pods.values().any(|p| p.named_ports(n, spec.protocol).next().is_some()) {
                        continue;
                    }
                    let field = format!("spec.{}[{i}].ports[{j}]", dir.as_str());
                    let msg = format!("no pod has a {} port named {n:?}", spec.protocol);
                    out.push(Problem::new(
                        Severity::Warning,
                        "NetworkPolicy",
                        &key,
                        Some(field.clone()),
                        msg.clone(),
                        format!("{key}: {field}: {msg}"),
                    ));
                }
            }
        }
    }
}

/// Each node's needs in the maps, and the maps a node would overflow.
fn capacity(c: &Cluster, problems: &mut Vec<Problem>) -> Vec<NodeEntries> {
    use netpol_common::*;
    let nodes: BTreeSet<&str> = c.pods.values().filter_map(|p| p.node_name.as_deref()).collect();
    let mut out = Vec::new();
    for n in nodes {
        let node = compiler::compile_node(c, n);
        let ids: BTreeMap<ObjKey, u32> = node.pods.keys().enumerate().map(|(i, k)| (k.clone(), i as u32)).collect();
        let d = entries::desired(&node, &ids, &mut ClassInterner::default(), &mut PortSetInterner::default());
        for (map, need, have) in [
            ("IDENTITIES", d.identities.len(), IDENTITIES_MAX as usize),
            ("POLICY", d.policy.len(), POLICY_MAX as usize),
            ("POLICY_PORTS", d.ports.len(), POLICY_PORTS_MAX as usize),
            ("ENDPOINTS", ids.len(), MAX_ENDPOINTS as usize),
        ] {
            if need > have {
                let msg = format!("needs {need} {map} entries, the map holds {have}");
                problems.push(Problem::new(Severity::Error, "Node", n, None, msg.clone(), format!("node {n}: {msg}")));
            }
        }
        out.push(NodeEntries {
            name: n.to_string(),
            pods: node.pods.len(),
            address_classes: node.classes.len(),
            identities: d.identities.len(),
            policy: d.policy.len(),
            policy_ports: d.ports.len(),
        });
    }
    out
}

/// What `check` finds in a manifests directory (or the live cluster).
pub fn check_report(dir: Option<&Path>) -> Result<CheckReport> {
    let (cluster, load_errors) = load(dir)?;
    let c = &cluster;
    let mut problems: Vec<Problem> = load_errors.iter().map(|e| Problem::parse(Severity::Error, e)).collect();
    policy_problems(c, &mut problems);
    let nodes = capacity(c, &mut problems);
    let errors = problems.iter().filter(|p| p.severity == Severity::Error).count();
    Ok(CheckReport { problems, nodes, namespaces: c.namespaces.len(), pods: c.pods.len(), policies: c.policies.len(), errors })
}

/// Validates a manifests directory (or the live cluster): the number of errors, and the text
/// or JSON document.
pub fn check(dir: Option<&Path>, output: Output) -> Result<(usize, String)> {
    let report = check_report(dir)?;
    Ok((report.errors, output.render(&report, CheckReport::text)))
}

impl CheckReport {
    /// The report for people: the problems, then per node its capacity errors and needs, then
    /// the counts.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let line = |p: &Problem, out: &mut String| {
            let sev = match p.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
                Severity::Note => "note",
            };
            let _ = writeln!(out, "{sev}: {}", p.text);
        };
        let of_node = |p: &Problem, n: &str| p.kind.as_deref() == Some("Node") && p.object.as_deref() == Some(n);
        for p in self.problems.iter().filter(|p| p.kind.as_deref() != Some("Node")) {
            line(p, &mut out);
        }
        for n in &self.nodes {
            for p in self.problems.iter().filter(|p| of_node(p, &n.name)) {
                line(p, &mut out);
            }
            let _ = writeln!(
                out,
                "node {}: {} pods, {} address classes; {} IDENTITIES, {} POLICY, {} POLICY_PORTS entries",
                n.name, n.pods, n.address_classes, n.identities, n.policy, n.policy_ports
            );
        }
        let _ = writeln!(out, "{} namespaces, {} pods, {} policies; {} error(s)", self.namespaces, self.pods, self.policies, self.errors);
        out
    }
}

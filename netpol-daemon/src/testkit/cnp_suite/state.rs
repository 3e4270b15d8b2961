//! The objects of a suite run at one step: the world's (namespaces, pods, nodes) and the test's
//! (its policies), changed as the Go test changes them, and the model cluster they make.
use std::net::IpAddr;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::{Mutation, Probe};
use crate::model::{from_json, Cluster, Node};
use crate::testkit::reference::{tiered_connection_allowed, Packet};

/// What the cluster's API would hold.
#[derive(Clone, Debug)]
pub struct State {
    pub world: Vec<Value>,
    pub objects: Vec<Value>,
}

impl State {
    pub fn new(world: Vec<Value>, objects: Vec<Value>) -> State {
        State { world, objects }
    }

    /// Applies one change as the Go test makes it (the API's merge patch of the changed copy
    /// replaces the lists it touches: the same as writing the whole changed object).
    pub fn apply(&mut self, m: &Mutation) -> Result<()> {
        match m {
            Mutation::Swap { policy, a, b } => {
                let obj = self.cluster_policy(policy)?;
                let va = at(obj, a)?.clone();
                let vb = std::mem::replace(at(obj, b)?, va);
                *at(obj, a)? = vb;
            }
            Mutation::Set { policy, path, value } => {
                let value = self.substitute(value)?;
                let (parent, last) = split_last(path)?;
                match (at(self.cluster_policy(policy)?, &parent)?, last) {
                    (Value::Object(map), Seg::Key(k)) => {
                        map.insert(k, value);
                    }
                    (Value::Array(list), Seg::Index(i)) if i < list.len() => list[i] = value,
                    _ => bail!("{path}: cannot be set in ClusterNetworkPolicy {policy}"),
                }
            }
            Mutation::Insert { policy, path, value } => {
                let value = self.substitute(value)?;
                let (parent, last) = split_last(path)?;
                match (at(self.cluster_policy(policy)?, &parent)?, last) {
                    (Value::Array(list), Seg::Index(i)) if i <= list.len() => list.insert(i, value),
                    _ => bail!("{path}: not an array index of ClusterNetworkPolicy {policy}"),
                }
            }
            Mutation::NamespaceLabels { namespace, labels } => {
                let ns = self
                    .world
                    .iter_mut()
                    .find(|v| v["kind"] == "Namespace" && v["metadata"]["name"] == namespace.as_str())
                    .ok_or_else(|| anyhow!("no namespace {namespace} in the world"))?;
                ns["metadata"]["labels"] = serde_json::to_value(labels)?;
            }
            Mutation::Delete { kind, namespace, name } => {
                let before = self.objects.len();
                self.objects.retain(|v| {
                    !(v["kind"] == kind.as_str()
                        && v["metadata"]["name"] == name.as_str()
                        && v["metadata"]["namespace"].as_str() == namespace.as_deref())
                });
                if self.objects.len() == before {
                    bail!("no {kind} {}{name} to delete", namespace.as_ref().map(|n| format!("{n}/")).unwrap_or_default());
                }
            }
        }
        Ok(())
    }

    fn cluster_policy(&mut self, name: &str) -> Result<&mut Value> {
        self.objects
            .iter_mut()
            .find(|v| v["kind"] == "ClusterNetworkPolicy" && v["metadata"]["name"] == name)
            .ok_or_else(|| anyhow!("no ClusterNetworkPolicy {name} in the test's objects"))
    }

    /// `value` with every `{{ podIP NAME }}` replaced by that world pod's address (what the Go
    /// test reads from `Status.PodIP`).
    fn substitute(&self, value: &Value) -> Result<Value> {
        Ok(match value {
            Value::String(s) => Value::String(self.substitute_str(s)?),
            Value::Array(list) => Value::Array(list.iter().map(|v| self.substitute(v)).collect::<Result<_>>()?),
            Value::Object(map) => Value::Object(map.iter().map(|(k, v)| Ok((k.clone(), self.substitute(v)?))).collect::<Result<_>>()?),
            other => other.clone(),
        })
    }

    fn substitute_str(&self, s: &str) -> Result<String> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(at) = rest.find("{{") {
            let end = rest[at..].find("}}").ok_or_else(|| anyhow!("{s:?}: unclosed {{{{"))? + at;
            let words: Vec<&str> = rest[at + 2..end].split_whitespace().collect();
            let ["podIP", pod] = words[..] else { bail!("{s:?}: only {{{{ podIP NAME }}}} is understood") };
            out.push_str(&rest[..at]);
            out.push_str(&self.pod_ip(pod)?.to_string());
            rest = &rest[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The `status.podIP` of a world pod.
    pub fn pod_ip(&self, name: &str) -> Result<IpAddr> {
        let pod = self
            .world
            .iter()
            .find(|v| v["kind"] == "Pod" && v["metadata"]["name"] == name)
            .ok_or_else(|| anyhow!("no pod {name} in the world"))?;
        let ip = pod["status"]["podIP"].as_str().ok_or_else(|| anyhow!("pod {name}: no status.podIP"))?;
        ip.parse().with_context(|| format!("pod {name}: status.podIP"))
    }

    /// The model cluster of every object, and the problems their conversion reported. Nodes
    /// are read here: the model's conversion does not take them (yet).
    pub fn cluster(&self) -> Result<(Cluster, Vec<String>)> {
        let mut c = Cluster::default();
        let mut errors = Vec::new();
        for v in self.world.iter().chain(&self.objects) {
            if v["kind"] == "Node" {
                let n = node(v)?;
                c.nodes.insert(n.name.clone(), n);
                continue;
            }
            let conv = from_json(v.clone()).ok_or_else(|| anyhow!("kind {} is not read by the model", v["kind"]))?;
            errors.extend(conv.errors);
            if let Some(obj) = conv.object {
                c.insert(obj);
            }
        }
        Ok((c, errors))
    }

    /// What the reference evaluator decides for `probe` in `c` (both ends, all tiers).
    pub fn reference(&self, c: &Cluster, probe: &Probe) -> Result<bool> {
        let (src, dst) = (self.pod_ip(&probe.from)?, self.pod_ip(&probe.to)?);
        Ok(tiered_connection_allowed(c, Packet { src, dst, proto: probe.proto.number(), port: Some(probe.port) }, &[]))
    }

    /// The world's objects as one multi-document YAML (what the daemon reads).
    pub fn world_yaml(&self) -> String {
        documents(&self.world)
    }

    /// The test's objects as one multi-document YAML.
    pub fn objects_yaml(&self) -> String {
        documents(&self.objects)
    }

    /// Whether an object of `kind` is among the test's objects.
    pub fn has_kind(&self, kind: &str) -> bool {
        self.objects.iter().any(|v| v["kind"] == kind)
    }

    /// A ClusterNetworkPolicy of the test's objects, as it stands.
    pub fn policy(&self, name: &str) -> Option<&Value> {
        self.objects.iter().find(|v| v["kind"] == "ClusterNetworkPolicy" && v["metadata"]["name"] == name)
    }
}

fn documents(objects: &[Value]) -> String {
    objects.iter().map(|v| format!("---\n{}", serde_norway::to_string(v).expect("JSON values serialize"))).collect()
}

/// A Node: its labels and its `status.addresses` of type InternalIP or ExternalIP.
fn node(v: &Value) -> Result<Node> {
    let name = v["metadata"]["name"].as_str().ok_or_else(|| anyhow!("a Node has no metadata.name"))?.to_string();
    let labels = serde_json::from_value(v["metadata"]["labels"].clone()).with_context(|| format!("Node {name}: metadata.labels"))?;
    let mut addresses = Vec::new();
    for a in v["status"]["addresses"].as_array().into_iter().flatten() {
        if matches!(a["type"].as_str(), Some("InternalIP" | "ExternalIP")) {
            let ip = a["address"].as_str().unwrap_or_default();
            addresses.push(ip.parse().with_context(|| format!("Node {name}: address {ip:?}"))?);
        }
    }
    Ok(Node { name, labels, addresses })
}

#[derive(Clone, Debug, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// `spec.egress[0].action` -> [spec, egress, 0, action].
fn segments(path: &str) -> Result<Vec<Seg>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut idx) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if key.is_empty() {
            bail!("path {path:?}: empty key");
        }
        out.push(Seg::Key(key.to_string()));
        while let Some(rest) = idx.strip_prefix('[') {
            let close = rest.find(']').ok_or_else(|| anyhow!("path {path:?}: unclosed ["))?;
            out.push(Seg::Index(rest[..close].parse().with_context(|| format!("path {path:?}: index"))?));
            idx = &rest[close + 1..];
        }
        if !idx.is_empty() {
            bail!("path {path:?}: {idx:?} after an index");
        }
    }
    Ok(out)
}

fn split_last(path: &str) -> Result<(String, Seg)> {
    let segs = segments(path)?;
    let last = segs.last().cloned().ok_or_else(|| anyhow!("empty path"))?;
    let cut = path.rfind(['.', '[']).ok_or_else(|| anyhow!("path {path:?}: nothing to change at the top"))?;
    Ok((path[..cut].to_string(), last))
}

/// The value at `path`, which must exist.
fn at<'a>(v: &'a mut Value, path: &str) -> Result<&'a mut Value> {
    let mut cur = v;
    for s in segments(path)? {
        cur = match s {
            Seg::Key(k) => cur.get_mut(&k),
            Seg::Index(i) => cur.get_mut(i),
        }
        .ok_or_else(|| anyhow!("{path}: not found"))?;
    }
    Ok(cur)
}

//! The lab's cluster as manifests: the Namespaces, Pods and Nodes it declared, written where
//! the daemon reads them.
use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::Result;

use super::{Lab, LabPod, NODE_NAME};

impl Lab {
    /// Declares a Node object (with `write_cluster_manifest`): what ClusterNetworkPolicy
    /// `nodes` peers select, by `labels`, and match, by `addresses` (InternalIP). The lab's own
    /// node is `add_node(NODE_NAME, labels, &[NODE_IP.into()])`; other names stand for nodes
    /// the lab has no namespace for (addresses of its external hosts, say).
    pub fn add_node(&mut self, name: &str, labels: &[(&str, &str)], addresses: &[IpAddr]) {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.nodes.push(node_manifest(name, &labels, addresses));
    }

    /// Writes the Namespace and Pod manifests of every declared pod (file `00-cluster.yaml`).
    pub fn write_cluster_manifest(&self) -> Result<()> {
        self.write_manifest("00-cluster.yaml", &self.cluster_manifest())
    }

    /// The Namespaces, Pods (and emulated Services) of the lab as one multi-document YAML: what
    /// the manifests mode reads, and what a test applies on the stand-in API server.
    pub fn cluster_manifest(&self) -> String {
        let mut y = String::new();
        let mut nss: BTreeMap<String, BTreeMap<String, String>> = self.namespaces.clone();
        for p in self.pods.iter().filter(|p| p.declared) {
            nss.entry(p.namespace.clone()).or_default();
        }
        for (ns, labels) in &nss {
            y.push_str(&format!("---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels: {}\n", json_map(labels)));
        }
        for p in self.pods.iter().filter(|p| p.declared) {
            let ports: Vec<String> = [("TCP", &p.tcp), ("UDP", &p.udp)]
                .into_iter()
                .flat_map(|(proto, ports)| ports.iter().map(move |port| container_port(p, *port, proto)))
                .collect();
            let status = if p.ip_reported {
                let v6 = p.ip6.map(|a| format!(", {{\"ip\": \"{a}\"}}")).unwrap_or_default();
                format!("status:\n  phase: Running\n  podIP: {}\n  podIPs: [{{\"ip\": \"{}\"}}{v6}]\n", p.ip, p.ip)
            } else {
                "status:\n  phase: Pending\n".to_string()
            };
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  labels: {}\nspec:\n  nodeName: {NODE_NAME}\n  containers:\n  - name: app\n    image: lab\n    ports: [{}]\n{status}",
                p.name,
                p.namespace,
                json_map(&p.labels),
                ports.join(", "),
            ));
        }
        for svc in &self.services {
            y.push_str(svc);
        }
        for node in &self.nodes {
            y.push_str(node);
        }
        y
    }
}

/// A Node document: its labels, and each address as an InternalIP.
fn node_manifest(name: &str, labels: &BTreeMap<String, String>, addresses: &[IpAddr]) -> String {
    let addrs: Vec<String> = addresses.iter().map(|a| format!("{{\"type\": \"InternalIP\", \"address\": \"{a}\"}}")).collect();
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {}\nstatus:\n  addresses: [{}]\n",
        json_map(labels),
        addrs.join(", ")
    )
}

/// A container port of the pod's manifest, with its name when the lab named it.
fn container_port(p: &LabPod, port: u16, protocol: &str) -> String {
    let name = p
        .named
        .iter()
        .find(|n| n.port == port && n.protocol == protocol)
        .map(|n| format!(", \"name\": \"{}\"", n.name))
        .unwrap_or_default();
    format!("{{\"containerPort\": {port}, \"protocol\": \"{protocol}\"{name}}}")
}

pub(super) fn json_map(m: &BTreeMap<String, String>) -> String {
    let inner: Vec<String> = m.iter().map(|(k, v)| format!("{k:?}: {v:?}")).collect();
    format!("{{{}}}", inner.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{from_json, Object};

    #[test]
    fn a_declared_node_loads_with_its_labels_and_addresses() {
        let labels = BTreeMap::from([("kubernetes.io/hostname".to_string(), NODE_NAME.to_string())]);
        let addrs: [IpAddr; 2] = [super::super::NODE_IP.into(), "fd00::1".parse().unwrap()];
        let text = node_manifest(NODE_NAME, &labels, &addrs);
        let conv = from_json(serde_norway::from_str(text.trim_start_matches("---\n")).unwrap()).unwrap();
        let Some(Object::Node(n)) = conv.object else { panic!("{conv:?}") };
        assert!(conv.errors.is_empty(), "{:?}", conv.errors);
        assert_eq!((n.name.as_str(), n.labels, n.addresses.as_slice()), (NODE_NAME, labels, &addrs[..]));
    }
}

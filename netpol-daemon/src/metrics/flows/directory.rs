//! Which pod holds an address, for naming a flow's peer: every pod-network pod of the cluster
//! by its addresses. Kept only while a flow client watches (the daemon builds it from its
//! cluster model when one connects, updates it with each change of pods, and drops it when the
//! last one leaves), so a node nobody observes holds nothing more per pod.
use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::model::{ChangeSet, Cluster, ObjKey};

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
pub struct Directory {
    built: bool,
    by_ip: HashMap<IpAddr, ObjKey>,
    /// The addresses each pod was entered under (to take them out when it changes).
    by_pod: HashMap<ObjKey, Vec<IpAddr>>,
}

impl Directory {
    /// Whether it holds the cluster's pods (else every look-up misses).
    pub fn is_built(&self) -> bool {
        self.built
    }

    /// Every pod of `cluster`.
    pub fn build(&mut self, cluster: &Cluster) {
        self.clear();
        for k in cluster.pods.keys() {
            self.enter(cluster, k);
        }
        self.built = true;
    }

    /// Forgets everything (nobody watches).
    pub fn clear(&mut self) {
        *self = Directory::default();
    }

    /// Brings a built directory up to date with the changes `ch` made to `cluster`.
    pub fn update(&mut self, cluster: &Cluster, ch: &ChangeSet) {
        if !self.built {
            return;
        }
        if ch.all {
            return self.build(cluster);
        }
        self.update_pods(cluster, &ch.pods);
    }

    fn update_pods(&mut self, cluster: &Cluster, changed: &BTreeSet<ObjKey>) {
        for k in changed {
            for ip in self.by_pod.remove(k).unwrap_or_default() {
                if self.by_ip.get(&ip) == Some(k) {
                    self.by_ip.remove(&ip);
                }
            }
            self.enter(cluster, k);
        }
    }

    /// Enters pod `k` of `cluster` (if it is there, on the pod network) under its addresses.
    fn enter(&mut self, cluster: &Cluster, k: &ObjKey) {
        let Some(p) = cluster.pods.get(k).filter(|p| !p.host_network && !p.ips.is_empty()) else { return };
        for ip in &p.ips {
            self.by_ip.insert(*ip, k.clone());
        }
        self.by_pod.insert(k.clone(), p.ips.clone());
    }

    /// The pod holding `ip`.
    pub fn pod_at(&self, ip: IpAddr) -> Option<&ObjKey> {
        self.by_ip.get(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifests::{load_text, Loaded};

    fn cluster(yaml: &str) -> Cluster {
        let mut l = Loaded::default();
        load_text(std::path::Path::new("c.yaml"), yaml, &mut l);
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        l.cluster
    }

    const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: t}\nspec: {nodeName: n, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: h, namespace: t}\nspec: {nodeName: n, hostNetwork: true, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.250.0.1}\n";

    #[test]
    fn names_pod_network_pods_and_follows_their_changes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut c = cluster(PODS);
        let mut d = Directory::default();
        // Not built: nothing is named (nobody watches).
        d.update(&c, &ChangeSet::everything());
        assert_eq!(d.pod_at(ip("10.0.0.1")), None);
        d.build(&c);
        assert_eq!(d.pod_at(ip("10.0.0.1")), Some(&ObjKey::new("t", "a")));
        assert_eq!(d.pod_at(ip("10.250.0.1")), None, "a host-network pod holds the node's address");
        // a moves to another address, b takes its old one.
        let moved = cluster(&PODS.replace("10.0.0.1", "10.0.0.9"));
        let mut ch = c.replace(moved);
        c.put(cluster("apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: t}\nspec: {nodeName: m, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.0.1}\n").pods.into_values().next().map(crate::model::Object::Pod).unwrap(), &mut ch);
        d.update(&c, &ch);
        assert_eq!(d.pod_at(ip("10.0.0.9")), Some(&ObjKey::new("t", "a")));
        assert_eq!(d.pod_at(ip("10.0.0.1")), Some(&ObjKey::new("t", "b")));
        // b goes away: its address names nobody.
        let mut ch = ChangeSet::default();
        c.remove(crate::model::Kind::Pod, &ObjKey::new("t", "b"), &mut ch);
        d.update(&c, &ch);
        assert_eq!(d.pod_at(ip("10.0.0.1")), None);
        d.clear();
        assert!(!d.is_built() && d.pod_at(ip("10.0.0.9")).is_none());
    }
}

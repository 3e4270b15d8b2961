//! Deterministic synthetic clusters for benchmarks and scale tests: namespaces of deployments
//! whose pods carry app/tier labels and named container ports, spread over nodes, with a
//! realistic mix of policies per namespace (default deny, same-app access on a named port,
//! access from a monitoring namespace, namespaceSelector + podSelector peers, ipBlocks with
//! excepts, DNS egress with `to:` null, port ranges).
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use crate::cidr::Cidr;
use crate::compiler::Cluster;
use crate::model::*;
use crate::selector::{Op, Requirement, Selector};

pub struct Shape {
    pub pods: usize,
    pub policies: usize,
    pub nodes: usize,
    pub pods_per_namespace: usize,
    pub pods_per_app: usize,
}

impl Shape {
    pub fn new(pods: usize, policies: usize) -> Shape {
        Shape { pods, policies, nodes: pods.div_ceil(110).max(1), pods_per_namespace: 50, pods_per_app: 5 }
    }
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn sel(pairs: &[(&str, String)]) -> Selector {
    Selector { requirements: pairs.iter().map(|(k, v)| Requirement { key: k.to_string(), op: Op::In(vec![v.clone()]) }).collect() }
}

pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

fn pod_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + 2 + i as u32))
}

/// Builds the cluster. Pod i lives on node i % nodes.
pub fn cluster(s: &Shape) -> Cluster {
    let mut c = Cluster::default();
    let namespaces = s.pods.div_ceil(s.pods_per_namespace).max(1);
    for n in 0..namespaces {
        let name = format!("ns-{n}");
        let mut l = labels(&[("team", format!("team-{}", n % 17)), ("env", if n % 3 == 0 { "prod".into() } else { "dev".into() })]);
        l.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
        c.namespaces.insert(name.clone(), Namespace { name, labels: l });
    }
    c.namespaces.insert("monitoring".into(), Namespace::implicit("monitoring"));
    for i in 0..s.pods {
        let ns = format!("ns-{}", i / s.pods_per_namespace);
        let app = (i % s.pods_per_namespace) / s.pods_per_app;
        let key = ObjKey::new(ns, format!("app-{app}-{i}"));
        c.pods.insert(
            key.clone(),
            Pod {
                key,
                labels: labels(&[("app", format!("app-{app}")), ("tier", ["web", "api", "db"][app % 3].into())]),
                node_name: Some(node_name(i % s.nodes)),
                ips: vec![pod_ip(i)],
                ports: vec![
                    ContainerPort { name: Some("http".into()), port: 8000 + (app % 5) as u16, protocol: Protocol::Tcp },
                    ContainerPort { name: Some("metrics".into()), port: 9100, protocol: Protocol::Tcp },
                ],
                host_network: false,
            },
        );
    }
    // Monitoring pods (scrape every namespace).
    for m in 0..4 {
        let key = ObjKey::new("monitoring", format!("prometheus-{m}"));
        c.pods.insert(
            key.clone(),
            Pod { key, labels: labels(&[("app", "prometheus".into())]), node_name: Some(node_name(m % s.nodes)), ips: vec![IpAddr::V4(Ipv4Addr::new(10, 200, 0, m as u8 + 1))], ports: vec![], host_network: false },
        );
    }
    for p in 0..s.policies {
        let n = p % namespaces;
        let ns = format!("ns-{n}");
        let kind = p / namespaces;
        let app = format!("app-{}", kind % (s.pods_per_namespace / s.pods_per_app).max(1));
        let key = ObjKey::new(ns.clone(), format!("np-{p}"));
        let port = |proto, port| PortSpec { protocol: proto, port };
        let pol = match kind % 6 {
            0 => Policy { key, pod_selector: Selector::everything(), ingress: vec![], egress: vec![], isolates_ingress: true, isolates_egress: false, audit: false },
            1 => Policy {
                key,
                pod_selector: sel(&[("app", app.clone())]),
                ingress: vec![
                    Rule { peers: Some(vec![Peer::Pods { namespaces: None, pods: sel(&[("app", app.clone())]) }]), ports: Some(vec![port(Protocol::Tcp, PortRef::Named("http".into()))]) },
                    Rule {
                        peers: Some(vec![Peer::Pods { namespaces: Some(sel(&[(NAMESPACE_NAME_LABEL, "monitoring".into())])), pods: sel(&[("app", "prometheus".into())]) }]),
                        ports: Some(vec![port(Protocol::Tcp, PortRef::Named("metrics".into()))]),
                    },
                ],
                egress: vec![],
                isolates_ingress: true,
                isolates_egress: false,
                audit: false,
            },
            2 => Policy {
                key,
                pod_selector: sel(&[("tier", "db".into())]),
                ingress: vec![Rule {
                    peers: Some(vec![Peer::Pods { namespaces: Some(sel(&[("team", format!("team-{}", n % 17))])), pods: sel(&[("tier", "api".into())]) }]),
                    ports: Some(vec![port(Protocol::Tcp, PortRef::Range(5432, 5432)), port(Protocol::Tcp, PortRef::Range(6000, 6100))]),
                }],
                egress: vec![],
                isolates_ingress: true,
                isolates_egress: false,
                audit: false,
            },
            3 => Policy {
                key,
                pod_selector: sel(&[("app", app.clone())]),
                ingress: vec![],
                egress: vec![
                    Rule { peers: None, ports: Some(vec![port(Protocol::Udp, PortRef::Range(53, 53)), port(Protocol::Tcp, PortRef::Range(53, 53))]) },
                    Rule {
                        peers: Some(vec![Peer::IpBlock(IpBlock {
                            cidr: Cidr::parse("0.0.0.0/0").unwrap(),
                            except: vec![Cidr::parse("10.0.0.0/8").unwrap(), Cidr::parse("172.16.0.0/12").unwrap(), Cidr::parse("192.168.0.0/16").unwrap()],
                        })]),
                        ports: Some(vec![port(Protocol::Tcp, PortRef::Range(443, 443))]),
                    },
                    Rule { peers: Some(vec![Peer::Pods { namespaces: None, pods: Selector::everything() }]), ports: None },
                ],
                isolates_ingress: false,
                isolates_egress: true,
                audit: false,
            },
            4 => Policy {
                key,
                pod_selector: sel(&[("tier", "web".into())]),
                ingress: vec![Rule {
                    peers: Some(vec![
                        Peer::IpBlock(IpBlock { cidr: Cidr::parse(&format!("192.168.{}.0/24", n % 256)).unwrap(), except: vec![Cidr::parse(&format!("192.168.{}.128/25", n % 256)).unwrap()] }),
                        Peer::Pods { namespaces: Some(Selector::everything()), pods: Selector::everything() },
                    ]),
                    ports: Some(vec![port(Protocol::Tcp, PortRef::Range(8000, 8099))]),
                }],
                egress: vec![],
                isolates_ingress: true,
                isolates_egress: false,
                audit: false,
            },
            _ => Policy {
                key,
                pod_selector: sel(&[("app", app)]),
                ingress: vec![Rule { peers: Some(vec![Peer::Pods { namespaces: Some(sel(&[("env", "prod".into())])), pods: Selector::everything() }]), ports: Some(vec![port(Protocol::Udp, PortRef::Range(10000, 20000))]) }],
                egress: vec![],
                isolates_ingress: true,
                isolates_egress: false,
                audit: false,
            },
        };
        c.policies.insert(pol.key.clone(), pol);
    }
    c
}

/// The pod keys on a node, for picking one to relabel.
pub fn pods_on(c: &Cluster, node: &str) -> Vec<ObjKey> {
    c.pods.values().filter(|p| p.node_name.as_deref() == Some(node)).map(|p| p.key.clone()).collect()
}

/// Labels of every pod, to restore after a relabel.
pub fn labels_of(c: &Cluster) -> BTreeMap<ObjKey, Labels> {
    c.pods.iter().map(|(k, p)| (k.clone(), p.labels.clone())).collect()
}

//! Deterministic synthetic clusters for benchmarks and scale tests: namespaces of deployments
//! whose pods carry app/tier labels and named container ports, spread over nodes, with a
//! realistic mix of policies per namespace (default deny, same-app access on a named port,
//! access from a monitoring namespace, namespaceSelector + podSelector peers, ipBlocks with
//! excepts, DNS egress with `to:` null, port ranges), and optionally services with an
//! EndpointSlice each.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use crate::model::cidr;
use crate::model::labels::{Op, Requirement, Selector};
use crate::model::Cluster;
use crate::model::*;

pub struct Shape {
    pub pods: usize,
    pub policies: usize,
    pub nodes: usize,
    pub pods_per_namespace: usize,
    pub pods_per_app: usize,
    /// Services (with one EndpointSlice each), spread over the namespaces; none by default.
    pub services: usize,
}

impl Shape {
    pub fn new(pods: usize, policies: usize) -> Shape {
        Shape { pods, policies, nodes: pods.div_ceil(110).max(1), pods_per_namespace: 50, pods_per_app: 5, services: 0 }
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
    let namespaces = add_namespaces(&mut c, s);
    add_pods(&mut c, s);
    add_monitoring(&mut c, s);
    for p in 0..s.policies {
        let pol = policy(s, p, namespaces);
        c.policies.insert(pol.key.clone(), pol);
    }
    add_services(&mut c, s, namespaces);
    c
}

/// The namespaces of the deployments, and the monitoring namespace; returns how many of the first.
fn add_namespaces(c: &mut Cluster, s: &Shape) -> usize {
    let namespaces = s.pods.div_ceil(s.pods_per_namespace).max(1);
    for n in 0..namespaces {
        let name = format!("ns-{n}");
        let l = labels(&[("team", format!("team-{}", n % 17)), ("env", if n % 3 == 0 { "prod".into() } else { "dev".into() })]);
        c.namespaces.insert(name.clone(), Namespace::new(name, l));
    }
    c.namespaces.insert("monitoring".into(), Namespace::implicit("monitoring"));
    namespaces
}

fn add_pods(c: &mut Cluster, s: &Shape) {
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
}

/// Monitoring pods (they scrape every namespace).
fn add_monitoring(c: &mut Cluster, s: &Shape) {
    for m in 0..4 {
        let key = ObjKey::new("monitoring", format!("prometheus-{m}"));
        c.pods.insert(
            key.clone(),
            Pod {
                key,
                labels: labels(&[("app", "prometheus".into())]),
                node_name: Some(node_name(m % s.nodes)),
                ips: vec![IpAddr::V4(Ipv4Addr::new(10, 200, 0, m as u8 + 1))],
                ports: vec![],
                host_network: false,
            },
        );
    }
}

/// Service `i` in namespace `i * namespaces / services` selects one app there on its named
/// port `http`; its EndpointSlice lists the addresses of those pods.
fn add_services(c: &mut Cluster, s: &Shape, namespaces: usize) {
    let apps = (s.pods_per_namespace / s.pods_per_app).max(1);
    for i in 0..s.services {
        let ns = format!("ns-{}", i * namespaces / s.services);
        let app = i % apps;
        let selector = labels(&[("app", format!("app-{app}"))]);
        let key = ObjKey::new(ns.clone(), format!("svc-{i}"));
        let addresses: Vec<IpAddr> = c
            .pods
            .values()
            .filter(|p| p.key.namespace == ns && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        let slice = EndpointSlice {
            key: ObjKey::new(ns.clone(), format!("svc-{i}-1")),
            service: key.name.clone(),
            addresses,
            ports: vec![(Some("http".into()), Protocol::Tcp, 8000 + (app % 5) as u16)],
        };
        c.endpoint_slices.insert(slice.key.clone(), slice);
        let ip = IpAddr::V4(Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250) as u8 + 1));
        let port = ServicePort { name: Some("http".into()), protocol: Protocol::Tcp, port: 80, target: TargetPort::Named("http".into()) };
        c.services.insert(key.clone(), Service { key, cluster_ips: vec![ip], ports: vec![port], selector: Some(selector) });
    }
}

/// Policy `p`: the kinds (p / namespaces) % 6 take turns, one namespace after the other.
fn policy(s: &Shape, p: usize, namespaces: usize) -> Policy {
    let n = p % namespaces;
    let ns = format!("ns-{n}");
    let kind = p / namespaces;
    let app = format!("app-{}", kind % (s.pods_per_namespace / s.pods_per_app).max(1));
    let key = ObjKey::new(ns.clone(), format!("np-{p}"));
    let port = |proto, port| PortSpec { protocol: proto, port };
    match kind % 6 {
        0 => Policy {
            key,
            pod_selector: Selector::everything(),
            ingress: vec![],
            egress: vec![],
            isolates_ingress: true,
            isolates_egress: false,
            audit: false,
            invalid: None,
        },
        1 => Policy {
            key,
            pod_selector: sel(&[("app", app.clone())]),
            ingress: vec![
                Rule {
                    peers: Some(vec![Peer::Pods { namespaces: None, pods: sel(&[("app", app.clone())]) }]),
                    ports: Some(vec![port(Protocol::Tcp, PortRef::Named("http".into()))]),
                },
                Rule {
                    peers: Some(vec![Peer::Pods {
                        namespaces: Some(sel(&[(NAMESPACE_NAME_LABEL, "monitoring".into())])),
                        pods: sel(&[("app", "prometheus".into())]),
                    }]),
                    ports: Some(vec![port(Protocol::Tcp, PortRef::Named("metrics".into()))]),
                },
            ],
            egress: vec![],
            isolates_ingress: true,
            isolates_egress: false,
            audit: false,
            invalid: None,
        },
        2 => Policy {
            key,
            pod_selector: sel(&[("tier", "db".into())]),
            ingress: vec![Rule {
                peers: Some(vec![Peer::Pods {
                    namespaces: Some(sel(&[("team", format!("team-{}", n % 17))])),
                    pods: sel(&[("tier", "api".into())]),
                }]),
                ports: Some(vec![port(Protocol::Tcp, PortRef::Range(5432, 5432)), port(Protocol::Tcp, PortRef::Range(6000, 6100))]),
            }],
            egress: vec![],
            isolates_ingress: true,
            isolates_egress: false,
            audit: false,
            invalid: None,
        },
        3 => Policy {
            key,
            pod_selector: sel(&[("app", app.clone())]),
            ingress: vec![],
            egress: vec![
                Rule {
                    peers: None,
                    ports: Some(vec![port(Protocol::Udp, PortRef::Range(53, 53)), port(Protocol::Tcp, PortRef::Range(53, 53))]),
                },
                Rule {
                    peers: Some(vec![Peer::IpBlock(IpBlock {
                        cidr: cidr::parse("0.0.0.0/0").unwrap(),
                        except: vec![
                            cidr::parse("10.0.0.0/8").unwrap(),
                            cidr::parse("172.16.0.0/12").unwrap(),
                            cidr::parse("192.168.0.0/16").unwrap(),
                        ],
                    })]),
                    ports: Some(vec![port(Protocol::Tcp, PortRef::Range(443, 443))]),
                },
                Rule { peers: Some(vec![Peer::Pods { namespaces: None, pods: Selector::everything() }]), ports: None },
            ],
            isolates_ingress: false,
            isolates_egress: true,
            audit: false,
            invalid: None,
        },
        4 => Policy {
            key,
            pod_selector: sel(&[("tier", "web".into())]),
            ingress: vec![Rule {
                peers: Some(vec![
                    Peer::IpBlock(IpBlock {
                        cidr: cidr::parse(&format!("192.168.{}.0/24", n % 256)).unwrap(),
                        except: vec![cidr::parse(&format!("192.168.{}.128/25", n % 256)).unwrap()],
                    }),
                    Peer::Pods { namespaces: Some(Selector::everything()), pods: Selector::everything() },
                ]),
                ports: Some(vec![port(Protocol::Tcp, PortRef::Range(8000, 8099))]),
            }],
            egress: vec![],
            isolates_ingress: true,
            isolates_egress: false,
            audit: false,
            invalid: None,
        },
        _ => Policy {
            key,
            pod_selector: sel(&[("app", app)]),
            ingress: vec![Rule {
                peers: Some(vec![Peer::Pods { namespaces: Some(sel(&[("env", "prod".into())])), pods: Selector::everything() }]),
                ports: Some(vec![port(Protocol::Udp, PortRef::Range(10000, 20000))]),
            }],
            egress: vec![],
            isolates_ingress: true,
            isolates_egress: false,
            audit: false,
            invalid: None,
        },
    }
}

/// The pod keys on a node, for picking one to relabel.
pub fn pods_on(c: &Cluster, node: &str) -> Vec<ObjKey> {
    c.pods_on(node).map(|p| p.key.clone()).collect()
}

/// Labels of every pod, to restore after a relabel.
pub fn labels_of(c: &Cluster) -> BTreeMap<ObjKey, Labels> {
    c.pods.iter().map(|(k, p)| (k.clone(), p.labels.clone())).collect()
}

fn selector_json(s: &Selector) -> serde_json::Value {
    let exprs: Vec<serde_json::Value> = s
        .requirements
        .iter()
        .map(|r| match &r.op {
            Op::In(v) => serde_json::json!({"key": r.key, "operator": "In", "values": v}),
            Op::NotIn(v) => serde_json::json!({"key": r.key, "operator": "NotIn", "values": v}),
            Op::Exists => serde_json::json!({"key": r.key, "operator": "Exists"}),
            Op::DoesNotExist => serde_json::json!({"key": r.key, "operator": "DoesNotExist"}),
        })
        .collect();
    if exprs.is_empty() {
        serde_json::json!({})
    } else {
        serde_json::json!({"matchExpressions": exprs})
    }
}

fn rule_json(r: &Rule, dir: Direction) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    if let Some(peers) = &r.peers {
        let peers: Vec<serde_json::Value> = peers
            .iter()
            .map(|p| match p {
                Peer::IpBlock(b) => serde_json::json!({"ipBlock": {"cidr": b.cidr.to_string(), "except": b.except.iter().map(|c| c.to_string()).collect::<Vec<_>>()}}),
                Peer::Pods { namespaces: None, pods } => serde_json::json!({"podSelector": selector_json(pods)}),
                Peer::Pods { namespaces: Some(n), pods } => serde_json::json!({"namespaceSelector": selector_json(n), "podSelector": selector_json(pods)}),
            })
            .collect();
        o.insert(if dir == Direction::Ingress { "from" } else { "to" }.into(), peers.into());
    }
    if let Some(ports) = &r.ports {
        let ports: Vec<serde_json::Value> = ports
            .iter()
            .map(|p| match &p.port {
                PortRef::Any => serde_json::json!({"protocol": p.protocol.as_str()}),
                PortRef::Range(a, b) if a == b => serde_json::json!({"protocol": p.protocol.as_str(), "port": a}),
                PortRef::Range(a, b) => serde_json::json!({"protocol": p.protocol.as_str(), "port": a, "endPort": b}),
                PortRef::Named(n) => serde_json::json!({"protocol": p.protocol.as_str(), "port": n}),
            })
            .collect();
        o.insert("ports".into(), ports.into());
    }
    o.into()
}

/// The cluster as manifests a user would write (JSON documents, one file per namespace:
/// its Namespace, Pods, NetworkPolicies, Services and EndpointSlices), for running the real
/// daemon on it.
pub fn manifests(c: &Cluster) -> BTreeMap<String, String> {
    manifests_of(c, |_| true)
}

/// The manifest file of one namespace (see [`manifests`]).
pub fn namespace_manifest(c: &Cluster, namespace: &str) -> String {
    manifests_of(c, |ns| ns == namespace).remove(namespace).unwrap_or_default()
}

/// Every object of the cluster as a Kubernetes API object (JSON, with apiVersion and kind), in
/// the order of [`manifests`]: for serving it from an API server.
pub fn objects(c: &Cluster) -> Vec<serde_json::Value> {
    documents_of(c, |_| true).into_values().flatten().collect()
}

fn manifests_of(c: &Cluster, want: impl Fn(&str) -> bool) -> BTreeMap<String, String> {
    // One JSON `List` per namespace, as `kubectl get -o json` writes it.
    let list = |docs: Vec<serde_json::Value>| serde_json::json!({"apiVersion": "v1", "kind": "List", "items": docs}).to_string() + "\n";
    documents_of(c, want).into_iter().map(|(ns, docs)| (ns, list(docs))).collect()
}

/// A pod as the API serves it (Running, with its addresses).
pub fn pod_json(p: &Pod) -> serde_json::Value {
    let ports: Vec<serde_json::Value> = p
        .ports
        .iter()
        .map(|cp| match &cp.name {
            Some(n) => serde_json::json!({"name": n, "containerPort": cp.port, "protocol": cp.protocol.as_str()}),
            None => serde_json::json!({"containerPort": cp.port, "protocol": cp.protocol.as_str()}),
        })
        .collect();
    let ips: Vec<serde_json::Value> = p.ips.iter().map(|ip| serde_json::json!({"ip": ip.to_string()})).collect();
    let mut status = serde_json::json!({"phase": "Running", "podIPs": ips});
    if let Some(ip) = p.ips.first() {
        status["podIP"] = ip.to_string().into();
    }
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": p.key.name, "namespace": p.key.namespace, "labels": p.labels},
        "spec": {"nodeName": p.node_name, "hostNetwork": p.host_network, "containers": [{"name": "app", "image": "app", "ports": ports}]},
        "status": status,
    })
}

fn policy_json(pol: &Policy) -> serde_json::Value {
    let mut types = Vec::new();
    if pol.isolates_ingress {
        types.push("Ingress");
    }
    if pol.isolates_egress {
        types.push("Egress");
    }
    let mut meta = serde_json::json!({"name": pol.key.name, "namespace": pol.key.namespace});
    if pol.audit {
        meta["annotations"] = serde_json::json!({AUDIT_ANNOTATION: "true"});
    }
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
        "spec": {
            "podSelector": selector_json(&pol.pod_selector),
            "policyTypes": types,
            "ingress": pol.ingress.iter().map(|r| rule_json(r, Direction::Ingress)).collect::<Vec<_>>(),
            "egress": pol.egress.iter().map(|r| rule_json(r, Direction::Egress)).collect::<Vec<_>>(),
        },
    })
}

fn service_json(svc: &Service) -> serde_json::Value {
    let ports: Vec<serde_json::Value> = svc
        .ports
        .iter()
        .map(|sp| {
            let target = match &sp.target {
                TargetPort::Number(n) => serde_json::json!(n),
                TargetPort::Named(n) => serde_json::json!(n),
            };
            serde_json::json!({"name": sp.name, "protocol": sp.protocol.as_str(), "port": sp.port, "targetPort": target})
        })
        .collect();
    let ips: Vec<String> = svc.cluster_ips.iter().map(|ip| ip.to_string()).collect();
    let mut spec = serde_json::json!({"clusterIP": ips.first(), "clusterIPs": ips, "ports": ports});
    if let Some(sel) = &svc.selector {
        spec["selector"] = serde_json::json!(sel);
    }
    serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc.key.name, "namespace": svc.key.namespace}, "spec": spec})
}

fn slice_json(sl: &EndpointSlice) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> =
        sl.addresses.iter().map(|a| serde_json::json!({"addresses": [a.to_string()], "conditions": {"ready": true}})).collect();
    let ports: Vec<serde_json::Value> =
        sl.ports.iter().map(|(name, proto, port)| serde_json::json!({"name": name, "protocol": proto.as_str(), "port": port})).collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": sl.key.name, "namespace": sl.key.namespace, "labels": {"kubernetes.io/service-name": sl.service}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
    })
}

/// The objects of the namespaces `want` accepts, per namespace: its Namespace, Pods,
/// NetworkPolicies, Services and EndpointSlices.
fn documents_of(c: &Cluster, want: impl Fn(&str) -> bool) -> BTreeMap<String, Vec<serde_json::Value>> {
    let mut files: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    let mut add = |ns: &str, doc| files.entry(ns.to_string()).or_default().push(doc);
    for ns in c.namespaces.values().filter(|n| want(&n.name)) {
        let mut labels = ns.labels.clone();
        labels.remove(NAMESPACE_NAME_LABEL);
        add(&ns.name, serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns.name, "labels": labels}}));
    }
    c.pods.values().filter(|p| want(&p.key.namespace)).for_each(|p| add(&p.key.namespace, pod_json(p)));
    c.policies.values().filter(|p| want(&p.key.namespace)).for_each(|p| add(&p.key.namespace, policy_json(p)));
    c.services.values().filter(|s| want(&s.key.namespace)).for_each(|s| add(&s.key.namespace, service_json(s)));
    c.endpoint_slices.values().filter(|s| want(&s.key.namespace)).for_each(|s| add(&s.key.namespace, slice_json(s)));
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_load_back_into_the_same_cluster() {
        let c = cluster(&Shape { services: 12, ..Shape::new(300, 60) });
        let mut loaded = crate::source::manifests::Loaded::default();
        for (ns, text) in manifests(&c) {
            crate::source::manifests::load_text(std::path::Path::new(&format!("{ns}.yaml")), &text, &mut loaded);
        }
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors.iter().take(3).map(|e| e.to_string()).collect::<Vec<_>>());
        let l = &loaded.cluster;
        assert_eq!(l.namespaces, c.namespaces);
        assert_eq!(l.pods, c.pods);
        assert_eq!((l.services.len(), l.endpoint_slices.len()), (12, 12));
        assert_eq!((&l.services, &l.endpoint_slices), (&c.services, &c.endpoint_slices));
        assert_eq!(l.policies.len(), c.policies.len());
        for (k, p) in &c.policies {
            assert_eq!(&l.policies[k], p, "{k}");
        }
        assert_eq!(namespace_manifest(&c, "ns-1"), manifests(&c)["ns-1"]);
        let all = c.namespaces.len() + c.pods.len() + c.policies.len() + c.services.len() + c.endpoint_slices.len();
        assert_eq!(objects(&c).len(), all);
        // And they compile to the same node.
        assert_eq!(crate::compiler::compile_node(l, &node_name(0)), crate::compiler::compile_node(&c, &node_name(0)));
    }
}

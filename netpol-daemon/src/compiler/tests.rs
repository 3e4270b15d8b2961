//! Compiler tests: named semantics cases, then a differential property test against the
//! reference evaluator over random clusters and packets.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::entries::{self, ClassInterner, PortSetInterner};
use crate::model::labels::{Op, Requirement};
use crate::source::manifests::{load_text, Loaded};
use crate::testkit::reference;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMP: u8 = 1;

fn cluster(yaml: &str) -> Cluster {
    let mut out = Loaded::default();
    load_text(Path::new("test.yaml"), yaml, &mut out);
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    out.cluster
}

fn errors(yaml: &str) -> Vec<String> {
    let mut out = Loaded::default();
    load_text(Path::new("bad.yaml"), yaml, &mut out);
    out.errors.iter().map(|e| e.to_string()).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Pods: a (ns1, app=a, 10.0.0.1, http=80/TCP, dns=53/UDP), b (ns1, app=b, 10.0.0.2,
/// http=8080/TCP), c (ns2, app=a, 10.0.0.3), d (ns3 unlabelled, 10.0.0.4, fd00::4).
const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ns1, labels: {team: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ns2, labels: {team: y, env: prod}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: ns1, labels: {app: a}}
spec:
  nodeName: n1
  containers: [{name: c, image: i, ports: [{name: http, containerPort: 80}, {name: dns, containerPort: 53, protocol: UDP}]}]
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: ns1, labels: {app: b}}
spec:
  nodeName: n1
  containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: ns2, labels: {app: a}}
spec: {nodeName: n2, containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: ns3}
spec: {nodeName: n2, containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.4, podIPs: [{ip: 10.0.0.4}, {ip: "fd00::4"}]}
"#;

fn with(policies: &str) -> Cluster {
    cluster(&format!("{PODS}\n---\n{policies}"))
}

/// Compiled verdict for `pod` in `dir`, cross-checked against the reference and against the
/// map entries the datapath would get.
fn verdict(c: &Cluster, pod: &str, dir: Direction, peer: &str, proto: u8, port: Option<u16>) -> bool {
    let (ns, name) = pod.split_once('/').unwrap();
    let key = ObjKey::new(ns, name);
    let p = &c.pods[&key];
    let node = compile_node(c, p.node_name.as_deref().unwrap());
    let got = node.permits(&key, dir, ip(peer), proto, port);
    let want = reference::allowed(c, p, dir, ip(peer), proto, port);
    assert_eq!(got, want, "compiler and reference disagree: {pod} {dir:?} peer {peer} proto {proto} port {port:?}\n{node:#?}");
    assert_eq!(got, via_maps(&node, &key, dir, ip(peer), proto, port), "map entries disagree: {pod} {dir:?} {peer} {proto} {port:?}");
    got
}

/// The verdict looked up in the map contents the datapath would be given.
fn via_maps(node: &NodePolicy, key: &ObjKey, dir: Direction, peer: IpAddr, proto: u8, port: Option<u16>) -> bool {
    let ids: BTreeMap<ObjKey, u32> = node.pods.keys().enumerate().map(|(i, k)| (k.clone(), i as u32 + 3)).collect();
    let d = entries::desired(node, &ids, &mut ClassInterner::default(), &mut PortSetInterner::default());
    entries::verdict(&d, ids[key], entries::endpoint_flags(&node.pods[key]), dir, peer, proto, port).passes()
}

use Direction::{Egress, Ingress};

#[test]
fn no_policy_means_no_isolation() {
    let c = with("");
    assert!(verdict(&c, "ns1/a", Ingress, "1.2.3.4", TCP, Some(1)));
    assert!(verdict(&c, "ns1/a", Egress, "1.2.3.4", ICMP, None));
    assert!(compile_node(&c, "n1").pods.values().all(|p| p.ingress.is_none() && p.egress.is_none()));
}

#[test]
fn policy_types_default_and_empty_rule_lists() {
    // No policyTypes, no egress: Ingress only, deny all ingress.
    let c = with("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ns1}\nspec: {podSelector: {}}\n");
    assert!(!verdict(&c, "ns1/a", Ingress, "10.0.0.2", TCP, Some(80)));
    assert!(verdict(&c, "ns1/a", Egress, "10.0.0.2", TCP, Some(80)));
    // egress: [] without policyTypes does not isolate egress.
    let c = with(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ns1}\nspec: {podSelector: {}, egress: []}\n",
    );
    assert!(verdict(&c, "ns1/a", Egress, "10.0.0.2", TCP, Some(80)));
    // A non-empty egress list adds Egress.
    let c = with("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ns1}\nspec: {podSelector: {}, egress: [{ports: [{port: 53, protocol: UDP}]}]}\n");
    assert!(!verdict(&c, "ns1/a", Egress, "10.0.0.2", TCP, Some(80)));
    assert!(verdict(&c, "ns1/a", Egress, "9.9.9.9", UDP, Some(53)));
    assert!(!verdict(&c, "ns1/a", Egress, "9.9.9.9", TCP, Some(53)));
    assert!(!verdict(&c, "ns1/a", Ingress, "9.9.9.9", UDP, Some(53)));
    // policyTypes [Egress] with ingress rules: the ingress rules are ignored.
    let c = with("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ns1}\nspec: {podSelector: {}, policyTypes: [Egress], ingress: [{}]}\n");
    assert!(!verdict(&c, "ns1/a", Egress, "10.0.0.2", TCP, Some(80)));
    assert!(verdict(&c, "ns1/a", Ingress, "10.0.0.2", TCP, Some(80)));
    // ingress: [{}] allows everything (all peers, all ports, all protocols).
    let c = with("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ns1}\nspec: {podSelector: {}, ingress: [{}]}\n");
    assert!(verdict(&c, "ns1/a", Ingress, "8.8.8.8", ICMP, None));
    assert!(verdict(&c, "ns1/a", Ingress, "fd00::9", SCTP, Some(9)));
}

#[test]
fn peers_pod_and_namespace_selectors() {
    let c = with(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: ns1}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
  - from: [{namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchExpressions: [{key: app, operator: In, values: [a]}]}}]
    ports: [{port: 81}]
  - from: [{namespaceSelector: {matchExpressions: [{key: team, operator: NotIn, values: [x, y]}]}}]
    ports: [{port: 82}]
"#,
    );
    // podSelector alone: policy's namespace only (a is in ns1, c is app=a in ns2).
    assert!(verdict(&c, "ns1/b", Ingress, "10.0.0.1", TCP, Some(1)));
    assert!(!verdict(&c, "ns1/b", Ingress, "10.0.0.3", TCP, Some(1)));
    // AND of namespaceSelector and podSelector in one peer.
    assert!(verdict(&c, "ns1/b", Ingress, "10.0.0.3", TCP, Some(81)));
    assert!(!verdict(&c, "ns1/b", Ingress, "10.0.0.4", TCP, Some(81)));
    // NotIn matches namespaces without the key (ns3 has only its name label).
    assert!(verdict(&c, "ns1/b", Ingress, "10.0.0.4", TCP, Some(82)));
    assert!(verdict(&c, "ns1/b", Ingress, "fd00::4", TCP, Some(82)));
    assert!(!verdict(&c, "ns1/b", Ingress, "10.0.0.3", TCP, Some(82)));
    // Not a pod at all.
    assert!(!verdict(&c, "ns1/b", Ingress, "10.0.0.9", TCP, Some(82)));
    // The automatic namespace name label works.
    let c = with("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ns1}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ns3}}}]}]\n");
    assert!(verdict(&c, "ns1/a", Ingress, "10.0.0.4", UDP, Some(5)));
    assert!(!verdict(&c, "ns1/a", Ingress, "10.0.0.2", UDP, Some(5)));
}

#[test]
fn ip_block_except_and_union_across_rules() {
    let c = with(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: ns1}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.0.0.0/29]}}]
    ports: [{port: 80}]
  - from: [{ipBlock: {cidr: 10.1.2.0/24}}]
    ports: [{port: 443}]
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{port: 8443}]
"#,
    );
    let v = |peer, port| verdict(&c, "ns1/a", Ingress, peer, TCP, Some(port));
    assert!(v("10.200.0.1", 80));
    assert!(!v("10.1.0.1", 80));
    // The except of rule 0 covers 10.1.2.5, which rule 1 allows on 443: the union wins.
    assert!(v("10.1.2.5", 443));
    assert!(!v("10.1.2.5", 80));
    // Pod b (10.0.0.2) is inside the except of rule 0 but allowed on 8443 as a pod peer.
    assert!(v("10.0.0.2", 8443));
    assert!(!v("10.0.0.2", 80));
    // ipBlock matches pod IPs too (10.0.0.9 is outside the except /29).
    assert!(v("10.0.0.9", 80));
    assert!(!v("11.0.0.1", 80));
    // IPv4 blocks never match IPv6.
    assert!(!v("fd00::4", 80));
}

#[test]
fn ports_named_ranges_and_protocols() {
    let c = with(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: in, namespace: ns1}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: http}, {port: dns, protocol: UDP}, {port: 1000, endPort: 2000, protocol: SCTP}, {protocol: UDP, port: 5000, endPort: 65535}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: out, namespace: ns1}
spec:
  podSelector: {matchLabels: {app: a}}
  egress:
  - to: [{namespaceSelector: {}}]
    ports: [{port: http}]
  - to: [{ipBlock: {cidr: 0.0.0.0/0}}]
    ports: [{protocol: UDP}]
"#,
    );
    // Ingress named ports resolve against the selected pod: a has http=80, b has http=8080.
    assert!(verdict(&c, "ns1/a", Ingress, "1.1.1.1", TCP, Some(80)));
    assert!(!verdict(&c, "ns1/a", Ingress, "1.1.1.1", TCP, Some(8080)));
    assert!(verdict(&c, "ns1/b", Ingress, "1.1.1.1", TCP, Some(8080)));
    assert!(!verdict(&c, "ns1/b", Ingress, "1.1.1.1", TCP, Some(80)));
    // dns is UDP on a: a TCP 53 packet does not match it.
    assert!(verdict(&c, "ns1/a", Ingress, "1.1.1.1", UDP, Some(53)));
    assert!(!verdict(&c, "ns1/a", Ingress, "1.1.1.1", TCP, Some(53)));
    // SCTP range inclusive at both ends; UDP/SCTP rules never open TCP.
    for (port, want) in [(999, false), (1000, true), (1500, true), (2000, true), (2001, false)] {
        assert_eq!(verdict(&c, "ns1/a", Ingress, "1.1.1.1", SCTP, Some(port)), want, "sctp {port}");
        assert!(!verdict(&c, "ns1/a", Ingress, "1.1.1.1", TCP, Some(port)) || port == 80);
    }
    assert!(verdict(&c, "ns1/a", Ingress, "1.1.1.1", UDP, Some(65535)));
    assert!(!verdict(&c, "ns1/a", Ingress, "1.1.1.1", UDP, Some(4999)));
    assert!(!verdict(&c, "ns1/a", Ingress, "1.1.1.1", ICMP, None));
    // Egress named ports resolve against each destination pod.
    assert!(verdict(&c, "ns1/a", Egress, "10.0.0.2", TCP, Some(8080)));
    assert!(!verdict(&c, "ns1/a", Egress, "10.0.0.2", TCP, Some(80)));
    assert!(!verdict(&c, "ns1/a", Egress, "10.0.0.3", TCP, Some(80)), "pod c has no http port");
    assert!(!verdict(&c, "ns1/a", Egress, "8.8.8.8", TCP, Some(80)), "not a pod: named port cannot match");
    assert!(verdict(&c, "ns1/a", Egress, "8.8.8.8", UDP, Some(53)));
}

#[test]
fn invalid_objects_are_rejected_with_their_field() {
    let np = |spec: &str| {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: ns}}\nspec: {spec}\n")
    };
    let cases = [
        (
            np("{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}"),
            "ns/bad: spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR",
        ),
        (
            np("{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]}"),
            "spec.ingress[0].from[0].ipBlock.except[0]: \"11.0.0.0/16\" is not a strict subset",
        ),
        (np("{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]}"), "is not a strict subset"),
        (
            np("{podSelector: {}, egress: [{ports: [{port: 80}, {protocol: ICMP, port: 1}]}]}"),
            "ns/bad: spec.egress[0].ports[1].protocol: unknown protocol \"ICMP\"",
        ),
        (
            np("{podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}"),
            "spec.ingress[0].ports[0].endPort: 80 is less than port 90",
        ),
        (np("{podSelector: {}, ingress: [{ports: [{port: 0}]}]}"), "spec.ingress[0].ports[0].port: 0 is not in 1-65535"),
        (np("{podSelector: {}, ingress: [{ports: [{port: http, endPort: 90}]}]}"), "endPort: cannot be used with a named port"),
        (np("{podSelector: {}, ingress: [{ports: [{port: Not_A_Name}]}]}"), "is not a valid port name"),
        (
            np("{podSelector: {matchExpressions: [{key: app, operator: Maybe, values: [x]}]}}"),
            "spec.podSelector.matchExpressions[0].operator: unknown operator \"Maybe\"",
        ),
        (
            np("{podSelector: {matchExpressions: [{key: app, operator: In}]}}"),
            "spec.podSelector.matchExpressions[0].values: must be non-empty",
        ),
        (np("{podSelector: {matchExpressions: [{key: app, operator: Exists, values: [x]}]}}"), "must be empty for operator Exists"),
        (
            np("{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}"),
            "spec.ingress[0].from[0]: ipBlock cannot be combined",
        ),
        (np("{podSelector: {}, ingress: [{from: [{}]}]}"), "spec.ingress[0].from[0]: must set one of"),
        (np("{podSelector: {}, policyTypes: [Sideways]}"), "spec.policyTypes[0]: unknown policy type"),
        (np("{podSelector: {matchLabels: {\"bad key!\": x}}}"), "invalid label key"),
        (
            "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: x}\nspec: {podSelector: 5}\n".to_string(),
            "NetworkPolicy default/x:",
        ),
        ("key: [unclosed\n".to_string(), "unparsable YAML"),
    ];
    for (yaml, want) in cases {
        let errs = errors(&yaml);
        assert!(errs.iter().any(|e| e.contains(want)), "want {want:?} in {errs:?}\nfor {yaml}");
        assert!(errs.iter().all(|e| e.starts_with("bad.yaml (document 1)")), "{errs:?}");
    }
    // A bad object does not take the good ones in the same file with it.
    let mut out = Loaded::default();
    load_text(Path::new("m.yaml"), &format!("{}\n---\n{}", np("{podSelector: {}, ingress: [{ports: [{port: 0}]}]}"), PODS), &mut out);
    assert_eq!(out.errors.len(), 1);
    assert_eq!(out.cluster.pods.len(), 4);
    assert!(out.cluster.policies.values().all(|p| p.invalid.is_some()), "only the fail-closed stand-in");
}

#[test]
fn host_network_and_finished_pods_are_never_peers_or_endpoints() {
    let c = cluster(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: h, namespace: ns1, labels: {app: a}}
spec: {nodeName: n1, hostNetwork: true, containers: [{name: c, image: i}]}
status: {podIP: 10.9.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: ns1, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Succeeded, podIP: 10.9.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: t, namespace: ns1, labels: {app: t}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: 10.9.0.3}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: ns1}
spec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {app: a}}}]}]}
"#,
    );
    let node = compile_node(&c, "n1");
    assert_eq!(node.pods.keys().map(|k| k.name.as_str()).collect::<Vec<_>>(), vec!["t"]);
    let t = ObjKey::new("ns1", "t");
    assert!(!node.permits(&t, Ingress, ip("10.9.0.1"), TCP, Some(1)));
    assert!(!node.permits(&t, Ingress, ip("10.9.0.2"), TCP, Some(1)));
}

#[test]
fn prune_keeps_shadowing_entries_only() {
    let c = with("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ns1}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}, {ipBlock: {cidr: 10.2.0.0/16}}]\n");
    let node = compile_node(&c, "n1");
    let prefixes: Vec<String> = node.prefixes.keys().map(|c| c.to_string()).collect();
    // 10.2.0.0/16 is in the same class as 10.0.0.0/8 and is dropped; the except (class 0
    // under a non-zero class) must stay.
    assert_eq!(prefixes, vec!["10.0.0.0/8", "10.1.0.0/16"]);
    assert_eq!(node.prefixes.values().copied().collect::<Vec<_>>()[1], 0);
}

#[test]
fn a_rule_selecting_every_pod_is_one_class_not_one_entry_per_pod() {
    // The seed's "namespaceSelector: {} + podSelector: {}" on a cluster of many pods.
    let mut y = String::from("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ns1}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {}}], ports: [{port: 8080}]}]\n");
    for i in 0..500 {
        y.push_str(&format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: ns{}}}\nspec: {{nodeName: n{}, containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: 10.1.{}.{}}}\n", i % 7, i % 2, i / 250, i % 250 + 1));
    }
    let c = with(&y);
    let node = compile_node(&c, "n1");
    assert_eq!(node.classes.len(), 2, "class 0 and the all-pods class");
    for p in node.pods.values().filter(|p| p.key.namespace == "ns1") {
        assert_eq!(p.ingress.as_ref().unwrap().allows.len(), 1);
    }
    let ids: BTreeMap<ObjKey, u32> = node.pods.keys().enumerate().map(|(i, k)| (k.clone(), i as u32 + 1)).collect();
    let d = entries::desired(&node, &ids, &mut ClassInterner::default(), &mut PortSetInterner::default());
    let isolated = node.pods.values().filter(|p| p.ingress.is_some()).count();
    assert_eq!(d.policy.len(), isolated);
    assert!(verdict(&c, "ns1/a", Ingress, "10.1.1.7", TCP, Some(8080)));
    assert!(!verdict(&c, "ns1/a", Ingress, "10.1.1.7", TCP, Some(8081)));
    assert!(!verdict(&c, "ns1/a", Ingress, "10.9.1.7", TCP, Some(8080)));
}

#[test]
fn egress_to_a_cluster_ip_is_decided_by_its_backends() {
    let c = cluster(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec: {nodeName: n1, containers: [{name: c, image: i, ports: [{name: dns, containerPort: 5353, protocol: UDP}, {name: dns-tcp, containerPort: 5353}]}]}
status: {podIP: 10.0.0.53}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  selector: {k8s-app: kube-dns}
  ports: [{name: dns, port: 53, protocol: UDP, targetPort: dns}, {name: dns-tcp, port: 53, targetPort: dns-tcp}, {name: metrics, port: 9153, targetPort: 9153}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 443, targetPort: 8443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.80]}, {addresses: [10.0.0.81], conditions: {ready: false}}]
ports: [{port: 8443}]
---
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: default, labels: {app: app}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.1}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns-only, namespace: default}
spec:
  podSelector: {matchLabels: {app: app}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}]
    ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}, {port: 5353, protocol: UDP}, {port: 5353, protocol: TCP}]
  - ports: [{port: 443}]
"#,
    );
    let e = |peer, proto, port| verdict(&c, "default/app", Egress, peer, proto, Some(port));
    // kube-dns through its cluster IP: the backends are allowed on the target ports.
    assert!(e("10.96.0.10", UDP, 53));
    assert!(e("10.96.0.10", TCP, 53));
    // Service port 9153 maps to a backend port the policy does not allow.
    assert!(!e("10.96.0.10", TCP, 9153));
    assert!(!e("10.96.0.10", UDP, 54));
    // The pod directly, on its real port.
    assert!(e("10.0.0.53", UDP, 5353));
    // web:443 goes to 8443 on the backend: "any peer on 443" does not cover it.
    assert!(!e("10.96.0.20", TCP, 443));
    // ...while 443 to an outside address is allowed.
    assert!(e("203.0.113.9", TCP, 443));
}

// ---------------------------------------------------------------------------------------
// Differential property test.

/// A small deterministic generator: the test case is the seed; failures print the cluster.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
}

const LABEL_KEYS: &[&str] = &["app", "tier", "team"];
const LABEL_VALUES: &[&str] = &["a", "b", "c"];
const NAMESPACES: &[&str] = &["n1", "n2", "n3"];
const PORT_NAMES: &[&str] = &["http", "dns", "metrics"];
const PORTS: &[u16] = &[53, 80, 81, 443, 8080];

fn labels(g: &mut Gen) -> Labels {
    let mut l = Labels::new();
    for k in LABEL_KEYS {
        if g.chance(50) {
            l.insert(k.to_string(), g.pick(LABEL_VALUES).to_string());
        }
    }
    l
}

fn selector(g: &mut Gen) -> Selector {
    let mut reqs = Vec::new();
    for _ in 0..g.below(3) {
        let key = g.pick(LABEL_KEYS).to_string();
        let vals = |g: &mut Gen| (0..1 + g.below(2)).map(|_| g.pick(LABEL_VALUES).to_string()).collect::<Vec<_>>();
        let op = match g.below(4) {
            0 => Op::In(vals(g)),
            1 => Op::NotIn(vals(g)),
            2 => Op::Exists,
            _ => Op::DoesNotExist,
        };
        reqs.push(Requirement { key, op });
    }
    Selector { requirements: reqs }
}

const CIDRS: &[&str] = &[
    "10.0.0.0/8",
    "10.0.0.0/29",
    "10.0.0.0/30",
    "10.0.0.4/30",
    "10.0.0.2/31",
    "10.0.0.5/32",
    "0.0.0.0/0",
    "192.168.0.0/16",
    "fd00::/64",
    "fd00::/126",
    "::/0",
];

fn ip_block(g: &mut Gen) -> IpBlock {
    let cidr = cidr::parse(g.pick(CIDRS)).unwrap();
    let inside: Vec<IpNet> = CIDRS.iter().map(|c| cidr::parse(c).unwrap()).filter(|c| cidr::strictly_contains(&cidr, c)).collect();
    let mut except = Vec::new();
    if !inside.is_empty() {
        for _ in 0..g.below(3) {
            except.push(g.pick(&inside));
        }
    }
    IpBlock { cidr, except }
}

fn rule(g: &mut Gen) -> Rule {
    let peers = if g.chance(25) {
        None
    } else {
        Some(
            (0..1 + g.below(3))
                .map(|_| match g.below(4) {
                    0 => Peer::IpBlock(ip_block(g)),
                    1 => Peer::Pods { namespaces: None, pods: selector(g) },
                    2 => Peer::Pods { namespaces: Some(selector(g)), pods: Selector::everything() },
                    _ => Peer::Pods { namespaces: Some(selector(g)), pods: selector(g) },
                })
                .collect(),
        )
    };
    let ports = if g.chance(30) {
        None
    } else {
        Some(
            (0..1 + g.below(3))
                .map(|_| {
                    let protocol = g.pick(&Protocol::ALL);
                    let port = match g.below(4) {
                        0 => PortRef::Any,
                        1 => {
                            let p = g.pick(PORTS);
                            PortRef::Range(p, p)
                        }
                        2 => {
                            let a = g.pick(PORTS);
                            let b = g.pick(PORTS);
                            PortRef::Range(a.min(b), a.max(b))
                        }
                        _ => PortRef::Named(g.pick(PORT_NAMES).to_string()),
                    };
                    PortSpec { protocol, port }
                })
                .collect(),
        )
    };
    Rule { peers, ports }
}

fn random_cluster(seed: u64) -> Cluster {
    let mut g = Gen(seed | 1);
    let mut c = Cluster::default();
    for ns in NAMESPACES {
        if g.chance(70) {
            let mut l = labels(&mut g);
            l.insert(NAMESPACE_NAME_LABEL.into(), ns.to_string());
            c.namespaces.insert(ns.to_string(), Namespace { name: ns.to_string(), labels: l });
        }
    }
    for i in 0..(2 + g.below(6)) {
        let mut ips = vec![IpAddr::from([10, 0, 0, (i + 1) as u8])];
        if g.chance(20) {
            ips.push(format!("fd00::{}", i + 1).parse().unwrap());
        }
        let ports = (0..g.below(4))
            .map(|_| ContainerPort { name: Some(g.pick(PORT_NAMES).to_string()), port: g.pick(PORTS), protocol: g.pick(&Protocol::ALL) })
            .collect();
        let key = ObjKey::new(g.pick(NAMESPACES), format!("p{i}"));
        c.pods.insert(key.clone(), Pod { key, labels: labels(&mut g), node_name: Some("n".into()), ips, ports, host_network: g.chance(5) });
    }
    let pod_ips: Vec<IpAddr> = c.pods.values().flat_map(|p| p.ips.clone()).collect();
    for i in 0..g.below(3) {
        let key = ObjKey::new(g.pick(NAMESPACES), format!("svc{i}"));
        let ports = (0..1 + g.below(2))
            .map(|j| ServicePort {
                name: Some(format!("p{j}")),
                protocol: g.pick(&Protocol::ALL),
                port: g.pick(PORTS),
                target: if g.chance(50) { TargetPort::Number(g.pick(PORTS)) } else { TargetPort::Named(g.pick(PORT_NAMES).to_string()) },
            })
            .collect::<Vec<_>>();
        if g.chance(30) {
            // Backends from an EndpointSlice only.
            let addresses = (0..g.below(3)).map(|_| g.pick(&pod_ips)).collect();
            let sports = ports.iter().map(|p: &ServicePort| (p.name.clone(), p.protocol, g.pick(PORTS))).collect();
            let es = ObjKey::new(key.namespace.clone(), format!("{}-x", key.name));
            c.endpoint_slices.insert(es.clone(), EndpointSlice { key: es, service: key.name.clone(), addresses, ports: sports });
            c.services
                .insert(key.clone(), Service { key, cluster_ips: vec![IpAddr::from([10, 96, 0, i as u8 + 1])], ports, selector: None });
        } else {
            let sel = labels(&mut g);
            c.services.insert(
                key.clone(),
                Service { key, cluster_ips: vec![IpAddr::from([10, 96, 0, i as u8 + 1])], ports, selector: Some(sel) },
            );
        }
    }
    for i in 0..(1 + g.below(4)) {
        let ingress: Vec<Rule> = (0..g.below(3)).map(|_| rule(&mut g)).collect();
        let egress: Vec<Rule> = (0..g.below(3)).map(|_| rule(&mut g)).collect();
        let (isolates_ingress, isolates_egress) = match g.below(4) {
            0 => (true, !egress.is_empty()),
            1 => (true, false),
            2 => (false, true),
            _ => (true, true),
        };
        let key = ObjKey::new(g.pick(NAMESPACES), format!("np{i}"));
        let audit = g.chance(20);
        c.policies.insert(
            key.clone(),
            Policy { key, pod_selector: selector(&mut g), ingress, egress, isolates_ingress, isolates_egress, audit, invalid: None },
        );
    }
    c
}

const PEERS: &[&str] = &[
    "10.96.0.1",
    "10.96.0.2",
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.3",
    "10.0.0.4",
    "10.0.0.5",
    "10.0.0.6",
    "10.0.0.7",
    "10.0.0.9",
    "10.9.9.9",
    "192.168.1.1",
    "8.8.8.8",
    "fd00::1",
    "fd00::2",
    "fd00::9",
    "2001:db8::1",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000), ..ProptestConfig::default() })]

    /// For random clusters and every local pod, direction, peer, protocol and port, the
    /// compiled table (looked up as the datapath does, through the map entries) agrees with
    /// the reference evaluator.
    #[test]
    fn compiler_agrees_with_reference(seed in any::<u64>()) {
        let c = random_cluster(seed);
        let node = compile_node(&c, "n");
        let ids: BTreeMap<ObjKey, u32> = node.pods.keys().enumerate().map(|(i, k)| (k.clone(), i as u32 + 1)).collect();
        let d = entries::desired(&node, &ids, &mut ClassInterner::default(), &mut PortSetInterner::default());
        for pod in c.pods.values().filter(|p| p.selectable()) {
            for dir in Direction::BOTH {
                for peer in PEERS {
                    let peer = ip(peer);
                    for proto in [TCP, UDP, SCTP, ICMP] {
                        let ports: &[Option<u16>] = if proto == ICMP { &[None] } else { &[Some(53), Some(80), Some(81), Some(443), Some(444), Some(8080), Some(9999)] };
                        for &port in ports {
                            let want = reference::verdict(&c, pod, dir, peer, proto, port);
                            let got = node.verdict(&pod.key, dir, peer, proto, port);
                            let via_maps = entries::verdict(&d, ids[&pod.key], entries::endpoint_flags(&node.pods[&pod.key]), dir, peer, proto, port);
                            prop_assert_eq!(got, want, "seed {} pod {} {:?} peer {} proto {} port {:?}\ncluster: {:?}\ncompiled: {:?}", seed, pod.key, dir, peer, proto, port, c, node);
                            prop_assert_eq!(via_maps, want, "map entries: seed {} pod {} {:?} peer {} proto {} port {:?}", seed, pod.key, dir, peer, proto, port);
                            let e = explain(&c, &node, &pod.key, dir, peer, proto, port);
                            prop_assert_eq!(e.verdict, want);
                            prop_assert_eq!(!e.isolated || !e.allowing_rules.is_empty(), want == Verdict::Allow, "explain: seed {} pod {} {:?} peer {} {:?}", seed, pod.key, dir, peer, e);
                            // The policy the counters attribute an allow to is one whose rules allow it.
                            if let (Some(dp), Verdict::Allow) = (node.pods[&pod.key].dir(dir), want) {
                                let allowing = reference::allowing_policies(&c, pod, dir, peer, proto, port).unwrap_or_default();
                                let slot = entries::lookup_slot(&d, ids[&pod.key], dir, peer, proto, port);
                                let by = slot.and_then(|s| dp.policies.get(s as usize));
                                prop_assert!(by.is_some_and(|k| allowing.contains(k)), "attribution: seed {} pod {} {:?} peer {} proto {} port {:?}: slot {:?} of {:?}, allowing {:?}", seed, pod.key, dir, peer, proto, port, slot, dp.policies, allowing);
                                prop_assert_eq!(dp.allowed_by(node.class_of(peer), proto, port), by);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Verdict (allow / audit / deny) checked three ways, like `verdict`.
fn verdict3(c: &Cluster, pod: &str, dir: Direction, peer: &str, proto: u8, port: Option<u16>) -> Verdict {
    let (ns, name) = pod.split_once('/').unwrap();
    let key = ObjKey::new(ns, name);
    let p = &c.pods[&key];
    let node = compile_node(c, p.node_name.as_deref().unwrap());
    let got = node.verdict(&key, dir, ip(peer), proto, port);
    assert_eq!(got, reference::verdict(c, p, dir, ip(peer), proto, port), "reference: {pod} {dir:?} {peer} {port:?}");
    let ids: BTreeMap<ObjKey, u32> = node.pods.keys().enumerate().map(|(i, k)| (k.clone(), i as u32 + 3)).collect();
    let d = entries::desired(&node, &ids, &mut ClassInterner::default(), &mut PortSetInterner::default());
    assert_eq!(got, entries::verdict(&d, ids[&key], entries::endpoint_flags(&node.pods[&key]), dir, ip(peer), proto, port), "maps");
    got
}

#[test]
fn audit_mode_policies_count_their_drops_and_let_traffic_through() {
    const AUDIT: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: trial, namespace: ns1, annotations: {netpol.io/audit: \"true\"}}\nspec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 80}]}]}\n";
    const ENFORCED: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: live, namespace: ns1}\nspec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24}}]}]}\n";
    // Audit policy alone: what it allows is allowed, what it would drop passes as audit.
    let c = with(AUDIT);
    assert_eq!(verdict3(&c, "ns1/a", Ingress, "10.0.0.2", TCP, Some(80)), Verdict::Allow);
    assert_eq!(verdict3(&c, "ns1/a", Ingress, "10.0.0.2", TCP, Some(81)), Verdict::Audit);
    assert_eq!(verdict3(&c, "ns1/a", Ingress, "9.9.9.9", UDP, Some(53)), Verdict::Audit);
    assert_eq!(verdict3(&c, "ns1/a", Egress, "9.9.9.9", UDP, Some(53)), Verdict::Allow, "egress not isolated");
    // Beside an enforcing policy: drops the enforcing policy makes stay drops.
    let c = with(&format!("{AUDIT}---\n{ENFORCED}"));
    assert_eq!(verdict3(&c, "ns1/a", Ingress, "10.0.0.2", TCP, Some(80)), Verdict::Allow);
    assert_eq!(verdict3(&c, "ns1/a", Ingress, "10.0.0.3", TCP, Some(80)), Verdict::Allow, "the enforced ipBlock allows: union");
    assert_eq!(verdict3(&c, "ns1/a", Ingress, "9.9.9.9", TCP, Some(80)), Verdict::Deny, "the enforcing policy drops it");
    // An annotation value netpol does not understand is ignored (a warning): the policy is
    // enforced as written, not audited.
    for v in ["yes", "\"yes\"", "\"True\"", "\"1\""] {
        let yaml = AUDIT.replace("\"true\"", v);
        assert!(errors(&yaml).is_empty(), "{v}: {:?}", errors(&yaml));
        let c = with(&yaml);
        assert!(!c.policies[&ObjKey::new("ns1", "trial")].audit, "{v}");
        assert_eq!(verdict3(&c, "ns1/a", Ingress, "10.0.0.2", TCP, Some(80)), Verdict::Allow, "{v}");
        assert_eq!(verdict3(&c, "ns1/a", Ingress, "10.0.0.2", TCP, Some(81)), Verdict::Deny, "{v}: enforced, not audit");
        assert_eq!(verdict3(&c, "ns1/a", Ingress, "9.9.9.9", UDP, Some(53)), Verdict::Deny, "{v}");
    }
    let np: k8s_openapi::api::networking::v1::NetworkPolicy = serde_norway::from_str(&AUDIT.replace("\"true\"", "\"yes\"")).unwrap();
    let conv = crate::model::policy_from_k8s(&np).unwrap();
    assert!(conv.errors.is_empty() && conv.policy.invalid.is_none());
    assert_eq!(conv.warnings.len(), 1);
    assert!(conv.warnings[0].to_string().starts_with("ns1/trial: metadata.annotations[netpol.io/audit]: \"yes\""), "{:?}", conv.warnings);
}

/// Loads manifests that may hold invalid objects: the cluster and the errors.
fn loaded(yaml: &str) -> (Cluster, Vec<String>) {
    let mut out = Loaded::default();
    load_text(Path::new("bad.yaml"), &format!("{PODS}\n---\n{yaml}"), &mut out);
    (out.cluster, out.errors.iter().map(|e| e.to_string()).collect())
}

#[test]
fn an_invalid_policy_isolates_what_it_selects_and_allows_nothing() {
    let np = |spec: &str| {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: ns1}}\nspec: {spec}\n")
    };
    // A bad port beside a valid rule that would allow everything: no allows at all, in the
    // policy's own direction only, for the pods it selects only.
    let (c, errs) = loaded(&np("{podSelector: {matchLabels: {app: a}}, ingress: [{}, {ports: [{port: 80}, {port: 0}]}]}"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("NetworkPolicy ns1/bad: spec.ingress[1].ports[1].port: 0 is not in 1-65535 (enforced fail-closed"),
        "{errs:?}"
    );
    let pol = &c.policies[&ObjKey::new("ns1", "bad")];
    assert!(pol.invalid.is_some() && pol.ingress.is_empty() && pol.egress.is_empty());
    assert!(!verdict(&c, "ns1/a", Ingress, "8.8.8.8", TCP, Some(80)));
    assert!(!verdict(&c, "ns1/a", Ingress, "10.0.0.2", UDP, Some(53)));
    assert!(verdict(&c, "ns1/a", Egress, "8.8.8.8", TCP, Some(80)), "egress is not its direction");
    assert!(verdict(&c, "ns1/b", Ingress, "8.8.8.8", TCP, Some(80)), "b is not selected");
    // A bad CIDR (the API server's parser rejects it) in an egress-only policy.
    let (c, errs) = loaded(&np("{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}"));
    assert!(errs[0].contains("ns1/bad: spec.egress[0].to[0].ipBlock.cidr: invalid CIDR"), "{errs:?}");
    assert!(!verdict(&c, "ns1/a", Egress, "10.0.0.3", TCP, Some(80)));
    assert!(!verdict(&c, "ns1/b", Egress, "8.8.8.8", UDP, Some(53)));
    assert!(verdict(&c, "ns1/a", Ingress, "10.0.0.3", TCP, Some(80)));
    // Default policy types: egress counts as a direction when egress rules are written, even
    // invalid ones.
    let (c, _) = loaded(&np("{podSelector: {}, egress: [{ports: [{protocol: ICMP}]}]}"));
    assert!(!verdict(&c, "ns1/a", Egress, "10.0.0.3", TCP, Some(80)));
    assert!(!verdict(&c, "ns1/a", Ingress, "10.0.0.3", TCP, Some(80)));
    // Unreadable policyTypes: both directions.
    let (c, errs) = loaded(&np("{podSelector: {matchLabels: {app: a}}, policyTypes: [Ingress, Sideways], ingress: [{}]}"));
    assert!(errs[0].contains("ns1/bad: spec.policyTypes[1]: unknown policy type"), "{errs:?}");
    assert!(!verdict(&c, "ns1/a", Ingress, "10.0.0.2", TCP, Some(80)));
    assert!(!verdict(&c, "ns1/a", Egress, "10.0.0.2", TCP, Some(80)));
    assert!(verdict(&c, "ns1/b", Egress, "10.0.0.1", TCP, Some(80)));
    // Unreadable pod selector: every pod of the namespace, and only of that namespace.
    let (c, errs) = loaded(&np(
        "{podSelector: {matchExpressions: [{key: app, operator: Maybe, values: [x]}]}, policyTypes: [Ingress, Egress], ingress: [{}]}",
    ));
    assert!(errs[0].contains("ns1/bad: spec.podSelector.matchExpressions[0].operator: unknown operator"), "{errs:?}");
    for pod in ["ns1/a", "ns1/b"] {
        assert!(!verdict(&c, pod, Ingress, "10.0.0.3", TCP, Some(80)), "{pod}");
        assert!(!verdict(&c, pod, Egress, "10.0.0.3", TCP, Some(80)), "{pod}");
    }
    assert!(verdict(&c, "ns2/c", Ingress, "10.0.0.1", TCP, Some(80)), "another namespace");
    // Beside a valid policy: the valid policy's allows still hold (a union), the invalid
    // one adds none.
    let good = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: good, namespace: ns1}\nspec: {podSelector: {}, ingress: [{ports: [{port: 443}]}]}\n";
    let (c, _) = loaded(&format!(
        "{good}---\n{}",
        np("{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]}")
    ));
    assert!(verdict(&c, "ns1/a", Ingress, "10.0.0.3", TCP, Some(443)));
    assert!(!verdict(&c, "ns1/a", Ingress, "10.0.0.3", TCP, Some(80)));
    // Not even of the API's shape (a field of the wrong type): still fail closed, from what
    // can be read of it.
    let (c, errs) = loaded(&np("{podSelector: {matchLabels: {app: a}}, ingress: [{ports: [{port: {x: 1}}]}]}"));
    assert!(errs.iter().any(|e| e.contains("NetworkPolicy ns1/bad:") && e.contains("fail-closed")), "{errs:?}");
    assert!(!verdict(&c, "ns1/a", Ingress, "10.0.0.3", TCP, Some(80)));
    assert!(verdict(&c, "ns1/b", Ingress, "10.0.0.3", TCP, Some(80)));
    assert!(verdict(&c, "ns1/a", Egress, "10.0.0.3", TCP, Some(80)));
    let (c, _) = loaded(&np("{podSelector: 5, policyTypes: Egress}"));
    for pod in ["ns1/a", "ns1/b"] {
        assert!(!verdict(&c, pod, Ingress, "10.0.0.3", TCP, Some(80)), "{pod}");
        assert!(!verdict(&c, pod, Egress, "10.0.0.3", TCP, Some(80)), "{pod}");
    }
    // A policy without a name cannot stand in for anything: an error, no policy.
    let (c, errs) = loaded("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: ns1}\nspec: {podSelector: {}}\n");
    assert!(c.policies.is_empty() && errs.iter().any(|e| e.contains("metadata.name")), "{errs:?}");
}

#[test]
fn ip_blocks_read_as_the_api_server_reads_them() {
    let np = |block: &str| {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: ns1}}\nspec: {{podSelector: {{matchLabels: {{app: a}}}}, ingress: [{{from: [{{ipBlock: {block}}}]}}]}}\n")
    };
    // Leading zeros are decimal: 010.0.0.9 is 10.0.0.9, not 8.0.0.9.
    let c = with(&np("{cidr: 010.000.000.009/32}"));
    assert!(verdict(&c, "ns1/a", Ingress, "10.0.0.9", TCP, Some(80)));
    assert!(!verdict(&c, "ns1/a", Ingress, "8.0.0.9", TCP, Some(80)));
    // Host bits set, and IPv4-mapped IPv6 forms, for the cidr and the except.
    let c = with(&np("{cidr: \"::ffff:10.0.0.0/104\", except: [\"::ffff:10.1.2.3/112\", \"::ffff:10.2.0.0/112\"]}"));
    assert!(verdict(&c, "ns1/a", Ingress, "10.9.0.1", TCP, Some(80)));
    assert!(!verdict(&c, "ns1/a", Ingress, "10.1.0.1", TCP, Some(80)));
    assert!(!verdict(&c, "ns1/a", Ingress, "10.2.0.1", TCP, Some(80)));
    assert!(!verdict(&c, "ns1/a", Ingress, "fd00::1", TCP, Some(80)));
    let c = with(&np("{cidr: 10.7.7.7/8, except: [10.1.2.3/16, \"::ffff:10.2.0.0/112\"]}"));
    assert!(verdict(&c, "ns1/a", Ingress, "10.9.0.1", TCP, Some(80)));
    assert!(!verdict(&c, "ns1/a", Ingress, "10.1.0.1", TCP, Some(80)));
    assert!(!verdict(&c, "ns1/a", Ingress, "10.2.0.1", TCP, Some(80)));
    // The API server compares the lengths as written: a /104 mapped cidr, a /16 except is
    // not a strict subset for it (and so fails closed here too).
    let (c, errs) = loaded(&np("{cidr: \"::ffff:10.0.0.0/104\", except: [10.1.0.0/16]}"));
    assert!(errs.iter().any(|e| e.contains("ipBlock.except[0]")), "{errs:?}");
    assert!(!verdict(&c, "ns1/a", Ingress, "10.9.0.1", TCP, Some(80)));
}

// ---------------------------------------------------------------------------------------
// Incremental updates.

/// Every verdict of `node` (compiled for node "n" of `c`), looked up directly and through the
/// map entries, agrees with the reference evaluator.
fn agrees_with_reference(c: &Cluster, node: &NodePolicy, what: &str) {
    let ids: BTreeMap<ObjKey, u32> = node.pods.keys().enumerate().map(|(i, k)| (k.clone(), i as u32 + 1)).collect();
    let d = entries::desired(node, &ids, &mut ClassInterner::default(), &mut PortSetInterner::default());
    let local: Vec<&Pod> = c.pods.values().filter(|p| p.selectable() && p.node_name.as_deref() == Some("n")).collect();
    assert_eq!(node.pods.keys().collect::<Vec<_>>(), local.iter().map(|p| &p.key).collect::<Vec<_>>(), "{what}: local pods");
    for pod in local {
        assert_eq!(node.pods[&pod.key].ips, pod.ips, "{what}: {} addresses", pod.key);
        for dir in Direction::BOTH {
            for peer in PEERS.iter().chain(&["10.0.0.8", "10.0.0.10", "fd00::3", "fd00::7"]) {
                let peer = ip(peer);
                for proto in [TCP, UDP, SCTP, ICMP] {
                    let ports: &[Option<u16>] =
                        if proto == ICMP { &[None] } else { &[Some(53), Some(80), Some(81), Some(443), Some(8080), Some(9999)] };
                    for &port in ports {
                        let want = reference::verdict(c, pod, dir, peer, proto, port);
                        let got = node.verdict(&pod.key, dir, peer, proto, port);
                        assert_eq!(
                            got, want,
                            "{what}: pod {} {dir:?} peer {peer} proto {proto} port {port:?}\ncluster: {c:?}\ncompiled: {node:?}",
                            pod.key
                        );
                        let via_maps =
                            entries::verdict(&d, ids[&pod.key], entries::endpoint_flags(&node.pods[&pod.key]), dir, peer, proto, port);
                        assert_eq!(via_maps, want, "{what}: map entries: pod {} {dir:?} peer {peer} proto {proto} port {port:?}", pod.key);
                        if let (Some(dp), Verdict::Allow) = (node.pods[&pod.key].dir(dir), want) {
                            let allowing = reference::allowing_policies(c, pod, dir, peer, proto, port).unwrap_or_default();
                            let by =
                                entries::lookup_slot(&d, ids[&pod.key], dir, peer, proto, port).and_then(|s| dp.policies.get(s as usize));
                            assert!(
                                by.is_some_and(|k| allowing.contains(k)),
                                "{what}: attribution: pod {} {dir:?} peer {peer}: {by:?} of {allowing:?}",
                                pod.key
                            );
                        }
                    }
                }
            }
        }
    }
}

/// An address (10.0.0.1-10 or fd00::1-8) no pod has, if one is left.
fn free(g: &mut Gen, c: &Cluster, v6: bool) -> Option<IpAddr> {
    let all: Vec<IpAddr> = if v6 {
        (1..=8).map(|i| format!("fd00::{i}").parse().unwrap()).collect()
    } else {
        (1..=10).map(|i| IpAddr::from([10, 0, 0, i])).collect()
    };
    let free: Vec<IpAddr> = all.into_iter().filter(|a| !c.pods.values().any(|p| p.ips.contains(a))).collect();
    (!free.is_empty()).then(|| g.pick(&free))
}

/// One random change to the pods (or EndpointSlices) of `c`.
fn mutate(g: &mut Gen, c: &mut Cluster) -> ChangeSet {
    let mut ch = ChangeSet::default();
    let keys: Vec<ObjKey> = c.pods.keys().cloned().collect();
    let some = |g: &mut Gen| g.pick(&keys);
    match g.below(10) {
        // Relabel (the common case), three times as likely as the others.
        0..=2 => {
            let k = some(g);
            c.pods.get_mut(&k).unwrap().labels = labels(g);
            ch.pods.insert(k);
        }
        3 => {
            // New addresses (one a removed pod had, or none: not yet started). Addresses stay
            // unique among pods, as the API keeps them.
            let k = some(g);
            let (v4, v6) = (free(g, c, false), free(g, c, true));
            let p = c.pods.get_mut(&k).unwrap();
            p.ips = match g.below(4) {
                0 => vec![],
                1 => v4.into_iter().chain(v6).collect(),
                _ => v4.into_iter().collect(),
            };
            ch.pods.insert(k);
        }
        4 => {
            let k = some(g);
            c.pods.remove(&k);
            ch.pods.insert(k);
        }
        5 => {
            let key = ObjKey::new(g.pick(NAMESPACES), format!("q{}", g.below(1000)));
            let ports = (0..g.below(3))
                .map(|_| ContainerPort {
                    name: Some(g.pick(PORT_NAMES).to_string()),
                    port: g.pick(PORTS),
                    protocol: g.pick(&Protocol::ALL),
                })
                .collect();
            let node = if g.chance(60) { "n" } else { "other" };
            let ips = free(g, c, false).into_iter().collect();
            let pod = Pod { key: key.clone(), labels: labels(g), node_name: Some(node.into()), ips, ports, host_network: g.chance(10) };
            c.pods.insert(key.clone(), pod);
            ch.pods.insert(key);
        }
        6 => {
            // Moves to or from this node.
            let k = some(g);
            let p = c.pods.get_mut(&k).unwrap();
            p.node_name = Some(if p.node_name.as_deref() == Some("n") { "other" } else { "n" }.into());
            ch.pods.insert(k);
        }
        7 => {
            let k = some(g);
            c.pods.get_mut(&k).unwrap().ports = (0..g.below(4))
                .map(|_| ContainerPort {
                    name: Some(g.pick(PORT_NAMES).to_string()),
                    port: g.pick(PORTS),
                    protocol: g.pick(&Protocol::ALL),
                })
                .collect();
            ch.pods.insert(k);
        }
        8 => {
            let k = some(g);
            let p = c.pods.get_mut(&k).unwrap();
            p.host_network = !p.host_network;
            ch.pods.insert(k);
        }
        _ => {
            // EndpointSlices change their backends.
            let ips: Vec<IpAddr> = c.pods.values().flat_map(|p| p.ips.clone()).collect();
            for es in c.endpoint_slices.values_mut() {
                es.addresses = if ips.is_empty() { vec![] } else { (0..g.below(3)).map(|_| g.pick(&ips)).collect() };
            }
            ch.endpoint_slices = true;
        }
    }
    ch
}

/// After random sequences of pod changes, the incrementally updated node agrees with the
/// reference evaluator (directly and through the map entries), and most updates were
/// incremental.
#[test]
fn incremental_updates_agree_with_the_reference() {
    let cases: u64 = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000) / 4;
    let (mut incremental, mut full, mut in_place_updates) = (0, 0, 0);
    for seed in 1..=cases.max(50) {
        let mut c = random_cluster(seed.wrapping_mul(0x9e3779b97f4a7c15));
        let mut nc = NodeCompiler::new("n");
        assert_eq!(nc.update(&c, &ChangeSet::everything()), UpdateKind::Full);
        // The map contents, kept up to date in place as the daemon's datapath does.
        let (mut classes, mut portsets) = (ClassInterner::default(), PortSetInterner::default());
        let mut cache = entries::EntryCache::default();
        let ids = |n: &NodePolicy| -> BTreeMap<ObjKey, u32> { n.pods.keys().enumerate().map(|(i, k)| (k.clone(), i as u32 + 1)).collect() };
        assert!(
            cache.refresh(nc.policy(), &ids(nc.policy()), &mut classes, &mut portsets).is_none(),
            "the first refresh derives everything"
        );
        let mut g = Gen(seed ^ 0x5555);
        for step in 0..6 {
            if c.pods.is_empty() {
                break;
            }
            let mut ch = mutate(&mut g, &mut c);
            // Now and then several changes at once (as a file of many pods, or a relist).
            if g.chance(25) {
                for _ in 0..1 + g.below(4) {
                    if !c.pods.is_empty() {
                        ch.merge(mutate(&mut g, &mut c));
                    }
                }
            }
            match nc.update(&c, &ch) {
                UpdateKind::Incremental => incremental += 1,
                UpdateKind::Full => full += 1,
                UpdateKind::Unchanged => panic!("a change reported as none: {ch:?}"),
            }
            let what = format!("seed {seed} step {step} after {ch:?}");
            agrees_with_reference(&c, nc.policy(), &what);
            // In place: the same contents as derived afresh (same interners), and the keys
            // reported changed are exactly the ones whose value differs.
            let before = cache.cur.clone();
            let changed = cache.refresh(nc.policy(), &ids(nc.policy()), &mut classes, &mut portsets);
            let mut fresh = entries::EntryCache::default();
            fresh.refresh(nc.policy(), &ids(nc.policy()), &mut classes.clone(), &mut portsets.clone());
            assert_eq!(cache.cur, fresh.cur, "{what}");
            if let Some(changed) = changed {
                in_place_updates += 1;
                fn differing<K: std::hash::Hash + Eq + Ord + Copy, V: PartialEq, S: std::hash::BuildHasher>(
                    a: &std::collections::HashMap<K, V, S>,
                    b: &std::collections::HashMap<K, V, S>,
                ) -> BTreeSet<K> {
                    a.iter()
                        .filter(|(k, v)| b.get(*k) != Some(*v))
                        .map(|(k, _)| *k)
                        .chain(b.keys().filter(|k| !a.contains_key(*k)).copied())
                        .collect()
                }
                fn set<K: Ord + Copy>(v: &[K]) -> BTreeSet<K> {
                    v.iter().copied().collect()
                }
                assert_eq!(set(&changed.identities), differing(&before.identities, &cache.cur.identities), "{what}");
                assert_eq!(set(&changed.policy), differing(&before.policy, &cache.cur.policy), "{what}");
                assert_eq!(set(&changed.ports), differing(&before.ports, &cache.cur.ports), "{what}");
            }
        }
    }
    assert!(incremental > 3 * full, "{incremental} incremental, {full} full updates");
    assert!(in_place_updates * 2 > incremental, "{in_place_updates} map updates in place of {incremental} incremental compiles");
}

/// A label change that moves a peer pod between classes touches only that pod's prefix and
/// the entries of a new class, without compiling the node again.
#[test]
fn a_peer_label_change_is_applied_incrementally() {
    let mut c = with(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ns1}\nspec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{podSelector: {matchLabels: {role: client}}}], ports: [{port: 80}]}]}\n",
    );
    let mut nc = NodeCompiler::new("n1");
    nc.update(&c, &ChangeSet::everything());
    let a = ObjKey::new("ns1", "a");
    let b = ObjKey::new("ns1", "b");
    assert!(!nc.policy().permits(&a, Ingress, ip("10.0.0.2"), TCP, Some(80)));
    c.pods.get_mut(&b).unwrap().labels.insert("role".into(), "client".into());
    let ch = ChangeSet { pods: [b.clone()].into(), ..Default::default() };
    assert_eq!(nc.update(&c, &ch), UpdateKind::Incremental);
    assert!(nc.policy().permits(&a, Ingress, ip("10.0.0.2"), TCP, Some(80)));
    assert!(!nc.policy().permits(&a, Ingress, ip("10.0.0.2"), TCP, Some(81)));
    assert_eq!(nc.policy().pods, compile_node(&c, "n1").pods, "same tables as a full compile");
    // And back.
    c.pods.get_mut(&b).unwrap().labels.remove("role");
    assert_eq!(nc.update(&c, &ch), UpdateKind::Incremental);
    assert!(!nc.policy().permits(&a, Ingress, ip("10.0.0.2"), TCP, Some(80)));
    assert_eq!(nc.update(&c, &ChangeSet::default()), UpdateKind::Unchanged);
    // A policy change compiles the node again.
    assert_eq!(nc.update(&c, &ChangeSet { policies: true, ..Default::default() }), UpdateKind::Full);
}

/// The verdicts of every local pod of `node` towards a sample of the cluster's addresses.
fn verdict_table(c: &Cluster, node: &NodePolicy) -> Vec<(ObjKey, Direction, IpAddr, u8, u16, Verdict)> {
    let mut peers: Vec<IpAddr> = c.pods.values().step_by(7).flat_map(|p| p.ips.clone()).collect();
    peers.extend(["8.8.8.8", "10.200.0.9", "172.16.0.1"].map(ip));
    let mut out = Vec::new();
    for key in node.pods.keys() {
        for dir in Direction::BOTH {
            for &peer in &peers {
                for (proto, port) in [(TCP, 53), (UDP, 53), (TCP, 80), (TCP, 8080), (TCP, 9090), (TCP, 5432)] {
                    out.push((key.clone(), dir, peer, proto, port, node.verdict(key, dir, peer, proto, Some(port))));
                }
            }
        }
    }
    out
}

/// A change of most of the cluster's pods at once (relabelled, re-addressed, removed):
/// the incremental path gives the verdicts of a full compile, and the node compiler takes
/// the full compile for it, while a small change stays incremental.
#[test]
fn a_change_of_most_pods_falls_back_to_a_full_compile_with_the_same_result() {
    let shape = crate::testkit::synth::Shape::new(1200, 120);
    let mut c = crate::testkit::synth::cluster(&shape);
    let node = crate::testkit::synth::node_name(0);
    let (mut forced, mut auto) = (NodeCompiler::new(&node), NodeCompiler::new(&node));
    forced.fallback = false;
    forced.update(&c, &ChangeSet::everything());
    auto.update(&c, &ChangeSet::everything());
    let remote: Vec<ObjKey> = c.pods.values().filter(|p| p.node_name.as_deref() != Some(node.as_str())).map(|p| p.key.clone()).collect();
    let mut ch = ChangeSet::default();
    for (i, k) in remote.iter().enumerate().filter(|(i, _)| i % 10 != 0) {
        match i % 5 {
            3 => {
                c.pods.remove(k);
            }
            4 => c.pods.get_mut(k).unwrap().ips = vec![IpAddr::from([10, 200, (i >> 8) as u8, i as u8])],
            _ => {
                let p = c.pods.get_mut(k).unwrap();
                let app = p.labels.get("app").cloned().unwrap_or_default();
                p.labels.insert("app".into(), format!("{app}-x{}", i % 3));
            }
        }
        ch.pods.insert(k.clone());
    }
    assert!(full_is_cheaper(ch.pods.len(), c.pods.len()), "{} of {}", ch.pods.len(), c.pods.len());
    assert_eq!(forced.update(&c, &ch), UpdateKind::Incremental);
    assert_eq!(auto.update(&c, &ch), UpdateKind::Full, "the fallback");
    let full = compile_node(&c, &node);
    assert_eq!(auto.policy().pods, full.pods);
    assert!(verdict_table(&c, forced.policy()) == verdict_table(&c, &full), "incremental and full compile disagree");
    // A small change stays incremental.
    let k = remote[0].clone();
    c.pods.get_mut(&k).unwrap().labels.insert("app".into(), "other".into());
    let small = ChangeSet { pods: [k].into(), ..Default::default() };
    assert_eq!(auto.update(&c, &small), UpdateKind::Incremental);
    assert!(verdict_table(&c, auto.policy()) == verdict_table(&c, &compile_node(&c, &node)));
    assert!(!full_is_cheaper(INCREMENTAL_MAX_ALWAYS, 100), "small changes are never a full compile");
}

mod tiers;

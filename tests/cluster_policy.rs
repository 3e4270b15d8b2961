//! ClusterNetworkPolicy tiers enforced by the real daemon and programs: real connections
//! between lab pods, and frames a pod crafts (ICMP, fragments) where a tier leaves other
//! protocols open beside ports. (The conformance suite's cases are in tests/cnp_conformance.rs.)
use std::path::Path;

use netpol_daemon::metrics::sample;
use netpol_daemon::testkit::lab::Lab;

mod common;
use common::*;

/// Namespace `t` (tenant a) with pods a and b (b serves TCP 8080, 8081 and UDP 4321), and
/// namespace `o` (tenant b) with pod c; the daemon running, no policy.
fn world() -> Option<Lab> {
    let mut lab = lab()?;
    lab.add_namespace("t", &[("tenant", "a")]);
    lab.add_namespace("o", &[("tenant", "b")]);
    lab.add_pod("t", "a", ip("10.244.0.50"), &[("app", "a")], &[], &[]).unwrap();
    lab.add_pod("t", "b", ip("10.244.0.51"), &[("app", "b")], &[8080, 8081], &[4321]).unwrap();
    lab.add_pod("o", "c", ip("10.244.0.52"), &[("app", "c")], &[], &[]).unwrap();
    lab.write_cluster_manifest().unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    Some(lab)
}

fn cnp(name: &str, tier: &str, priority: u16, subject: &str, rules: &str) -> String {
    format!("apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n  subject: {subject}\n{rules}")
}

/// ICMP echo requests from `from` to b's address that arrive at b.
fn pings_arriving(lab: &Lab, from: &str, marker: &str) -> usize {
    let at_b = lab.capture("b", marker).unwrap();
    lab.scapy(from, &format!("tx(IP(src=MY_IP, dst='10.244.0.51')/ICMP(type=8, id=7)/Raw(b'{marker}'), count=3)\n")).unwrap();
    at_b.count()
}

/// A UDP datagram to b in three fragments, sent in `order`; how many of its fragments reach b.
fn fragments_arriving(lab: &Lab, port: u16, id: u16, order: &str, marker: &str) -> usize {
    let at_b = lab.capture("b", marker).unwrap();
    let code = format!(
        "fr = fragment(IP(src=MY_IP, dst='10.244.0.51', id={id})/UDP(sport=1234, dport={port})/Raw(b'{marker}-' * 250), fragsize=1000)\n\
         assert len(fr) == 3\n\
         for f in {order}:\n    tx(f)\n"
    );
    lab.scapy("a", &code).unwrap();
    at_b.count()
}

/// An Admin Deny on some ports leaves the rest open, other protocols included: real
/// connections on the other ports, crafted ICMP, and fragments (in order they follow their
/// first fragment; a later fragment ahead of its first is not let through on "other
/// protocols"; a denied datagram's fragments do not pass).
#[test]
fn an_admin_deny_of_some_ports_leaves_other_ports_and_protocols_open() {
    let Some(lab) = world() else { return };
    assert!(pings_arriving(&lab, "a", "MARK-PING0") >= 3, "no policy: pings arrive");
    lab.apply(
        "deny.yaml",
        &cnp(
            "deny-8081",
            "Admin",
            10,
            "{namespaces: {matchLabels: {tenant: a}}}",
            "  ingress:\n  - name: no-8081\n    action: Deny\n    from: [{namespaces: {}}]\n    protocols: [{tcp: {destinationPort: {number: 8081}}}, {udp: {destinationPort: {range: {start: 5000, end: 6000}}}}]\n",
        ),
    )
    .unwrap();
    check(
        &lab,
        &[("a", "b", "tcp", 8081, false), ("c", "b", "tcp", 8081, false), ("a", "b", "tcp", 8080, true), ("c", "b", "udp", 4321, true)],
    );
    assert!(pings_arriving(&lab, "a", "MARK-PING1") >= 3, "ICMP is not a denied protocol: it arrives");
    assert!(fragments_arriving(&lab, 4321, 2001, "fr", "MARK-FRAG1") >= 1, "an allowed fragmented datagram arrives");
    assert_eq!(fragments_arriving(&lab, 5353, 2002, "fr", "MARK-FRAG2"), 0, "a denied datagram's fragments do not arrive");
    assert_eq!(
        fragments_arriving(&lab, 5353, 2003, "[fr[2], fr[1]]", "MARK-FRAG3"),
        0,
        "later fragments without their first do not arrive"
    );
    let denied = packets(&lab, "t", "b", "ingress", "deny");
    assert!(denied >= 5.0, "b's ingress drops are counted: {denied}");
    // ...and the ones its rule judged (the SYNs to 8081, the denied datagram's first fragment;
    // not the later fragments, which follow their first's verdict, nor those without a first)
    // are counted against the cluster policy.
    let m = lab.metrics().unwrap();
    let by = sample(&m, "netpol_policy_denied_packets_total{namespace=\"t\",pod=\"b\",direction=\"ingress\",policy=\"Admin:deny-8081\"}");
    assert!(by.is_some_and(|n| n >= 3.0 && n <= denied - 4.0), "denies counted against Admin:deny-8081: {by:?} of {denied}\n{m}");
}

/// Tier order with real connections: an Admin Accept beats a NetworkPolicy's default deny
/// (and is counted against the cluster policy); an Admin Pass hands over to the
/// NetworkPolicy; a Baseline Deny applies only where no NetworkPolicy isolates the pod.
#[test]
fn admin_then_networkpolicy_then_baseline() {
    let Some(lab) = world() else { return };
    let deny_all = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Ingress]\n";
    lab.apply("np.yaml", deny_all).unwrap();
    let admin = cnp(
        "platform",
        "Admin",
        5,
        "{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: b}}}}",
        "  ingress:\n  - name: monitoring\n    action: Accept\n    from: [{namespaces: {matchLabels: {tenant: b}}}]\n    protocols: [{tcp: {destinationPort: {number: 8080}}}]\n  - name: rest-to-the-namespace\n    action: Pass\n    from: [{namespaces: {}}]\n",
    );
    lab.apply("admin.yaml", &admin).unwrap();
    check(&lab, &[("c", "b", "tcp", 8080, true), ("c", "b", "tcp", 8081, false), ("a", "b", "tcp", 8080, false)]);
    let m = lab.metrics().unwrap();
    let by_admin =
        sample(&m, "netpol_policy_allowed_packets_total{namespace=\"t\",pod=\"b\",direction=\"ingress\",policy=\"Admin:platform\"}");
    assert!(by_admin.is_some_and(|n| n >= 1.0), "the Admin policy's allows are counted against it: {by_admin:?}\n{m}");

    // Baseline: deny tenant b; without the NetworkPolicy it applies (the Admin Pass hands
    // over to it), with one that allows c it does not.
    let baseline = cnp(
        "tenants",
        "Baseline",
        10,
        "{namespaces: {matchLabels: {tenant: a}}}",
        "  ingress:\n  - name: no-other-tenant\n    action: Deny\n    from: [{namespaces: {matchLabels: {tenant: b}}}]\n",
    );
    lab.apply("baseline.yaml", &baseline).unwrap();
    lab.delete("np.yaml").unwrap();
    check(
        &lab,
        &[("c", "b", "tcp", 8080, true), ("c", "b", "tcp", 8081, false), ("c", "b", "udp", 4321, false), ("a", "b", "tcp", 8081, true)],
    );
    let allow_c = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-c, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {tenant: b}}}], ports: [{port: 8081}]}]\n";
    lab.apply("np.yaml", allow_c).unwrap();
    check(&lab, &[("c", "b", "tcp", 8081, true), ("c", "b", "udp", 4321, false), ("a", "b", "tcp", 8081, false)]);

    // Removing the cluster policies leaves the NetworkPolicy alone in charge.
    lab.delete("admin.yaml").unwrap();
    lab.delete("baseline.yaml").unwrap();
    check(&lab, &[("c", "b", "tcp", 8080, false), ("c", "b", "tcp", 8081, true), ("a", "b", "tcp", 8081, false)]);
}

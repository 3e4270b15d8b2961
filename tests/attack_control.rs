//! Attacks on the control plane through what it is given to read: policies that fail
//! validation, annotation values netpol does not know, and CIDR spellings the API server
//! accepts. The real daemon, real TC programs, real connections between network namespaces.
//! Nothing may fail open: a policy netpol cannot read isolates what it selects, and every
//! such drop is counted.
use std::path::Path;

use netpol_daemon::metrics::sample;

mod common;
use common::*;

fn deny_count(m: &str, ns: &str, pod: &str) -> f64 {
    sample(m, &format!("netpol_packets_total{{namespace=\"{ns}\",pod=\"{pod}\",direction=\"ingress\",verdict=\"deny\"}}")).unwrap_or(0.0)
}

/// Row 6 of the security issue: a policy that fails validation used to be skipped whole, so
/// the pods it would isolate stayed open; an unknown `netpol.io/audit` value made the whole
/// policy invalid (skipped) instead of being ignored.
#[test]
fn invalid_policies_fail_closed_and_unknown_annotation_values_are_enforced() {
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("shop", &[("team", "shop")]);
    lab.add_namespace("batch", &[("team", "batch")]);
    lab.add_namespace("ops", &[("team", "ops")]);
    lab.add_pod("shop", "web", ip("10.244.0.60"), &[("app", "web")], &[80], &[]).unwrap();
    lab.add_pod("shop", "db", ip("10.244.0.61"), &[("app", "db")], &[5432], &[5432]).unwrap();
    lab.add_pod("shop", "cache", ip("10.244.0.64"), &[("app", "cache")], &[6379], &[]).unwrap();
    lab.add_pod("batch", "job", ip("10.244.0.63"), &[("app", "job")], &[8080], &[]).unwrap();
    lab.add_pod("ops", "client", ip("10.244.0.62"), &[("app", "client")], &[8080], &[]).unwrap();
    lab.write_cluster_manifest().unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    // No policy yet: everything flows.
    check(
        &lab,
        &[
            ("client", "web", "tcp", 80, true),
            ("client", "db", "tcp", 5432, true),
            ("client", "job", "tcp", 8080, true),
            ("web", "cache", "tcp", 6379, true),
        ],
    );

    // Default deny for web, with an audit value netpol does not understand: enforced.
    lab.apply(
        "audit-yes.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-deny, namespace: shop, annotations: {netpol.io/audit: \"yes\"}}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n",
    )
    .unwrap();
    // A policy for db with a field the API server would reject (an ICMP port) beside a rule
    // that would allow everything: it isolates db and allows nothing.
    lab.apply(
        "bad-field.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-bad, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - {}\n  - ports: [{protocol: ICMP}]\n",
    )
    .unwrap();
    // An unreadable pod selector: every pod of batch fails closed.
    lab.apply(
        "bad-selector.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: sel-bad, namespace: batch}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: Maybe, values: [job]}]}\n  ingress: [{}]\n",
    )
    .unwrap();
    // A CIDR spelled with leading zeros, as the API server accepts it: decimal, 10.244.0.62.
    lab.apply(
        "cache.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: cache-in, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: cache}}\n  ingress:\n  - from: [{ipBlock: {cidr: 010.244.000.062/32}}]\n    ports: [{port: 6379}]\n",
    )
    .unwrap();

    let before = lab.metrics().unwrap();
    check(
        &lab,
        &[
            // Enforced, not audited.
            ("client", "web", "tcp", 80, false),
            ("db", "web", "tcp", 80, false),
            // Fail closed: nothing reaches db, though one of its rules allowed everything.
            ("client", "db", "tcp", 5432, false),
            ("web", "db", "tcp", 5432, false),
            ("client", "db", "udp", 5432, false),
            // Fail closed for the whole namespace of the unreadable selector.
            ("client", "job", "tcp", 8080, false),
            // 010.244.000.062/32 is the client.
            ("client", "cache", "tcp", 6379, true),
            ("web", "cache", "tcp", 6379, false),
            // Egress of the isolated pods and other namespaces are untouched.
            ("web", "client", "tcp", 8080, true),
            ("job", "client", "tcp", 8080, true),
        ],
    );

    let m = lab.metrics().unwrap();
    for (ns, pod) in [("shop", "web"), ("shop", "db"), ("batch", "job")] {
        assert!(deny_count(&m, ns, pod) > deny_count(&before, ns, pod), "{ns}/{pod}: no deny counted\n{m}");
        assert!(
            sample(&m, &format!("netpol_packets_total{{namespace=\"{ns}\",pod=\"{pod}\",direction=\"ingress\",verdict=\"audit\"}}"))
                .is_none_or(|v| v == 0.0),
            "{ns}/{pod}: passed as audit\n{m}"
        );
    }
    // The two invalid policies are counted (the unknown annotation value is a warning only).
    assert_eq!(sample(&m, "netpol_manifest_errors"), Some(2.0), "{m}");
    let log = lab.daemon_log();
    assert!(log.contains("shop/db-bad: spec.ingress[1].ports[0].protocol: unknown protocol \"ICMP\""), "{log}");
    assert!(log.contains("batch/sel-bad: spec.podSelector.matchExpressions[0].operator"), "{log}");
    assert!(log.contains("enforced fail-closed"), "{log}");
    assert!(log.contains("shop/web-deny: metadata.annotations[netpol.io/audit]: \"yes\""), "{log}");

    // Fixed, the policy is enforced as written: db's first rule allows everything again.
    lab.apply(
        "bad-field.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-bad, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - {}\n",
    )
    .unwrap();
    check(&lab, &[("client", "db", "tcp", 5432, true)]);
    assert_eq!(sample(&lab.metrics().unwrap(), "netpol_manifest_errors"), Some(1.0));
}

/// Row 9 of the security issue: a change of tens of thousands of remote pods used to stall
/// the daemon for minutes in a quadratic incremental compile, and an allow removed meanwhile
/// stayed in force all that time. 20,000 remote pods that a rule on this node selects are
/// relabelled out of it in one manifest write, while the policy letting the client in is
/// deleted: the client is denied as soon as that change is programmed (a full compile, the
/// fallback for a change this big), and the daemon says which path it took.
#[test]
fn an_allow_removed_during_a_huge_pod_change_applies_at_once() {
    const REMOTE: usize = 20_000;
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("t", &[]);
    lab.add_pod("t", "srv", ip("10.244.0.70"), &[("app", "srv")], &[8080, 9090], &[]).unwrap();
    lab.add_pod("t", "cli", ip("10.244.0.71"), &[("app", "cli")], &[], &[]).unwrap();
    lab.write_cluster_manifest().unwrap();
    let policies = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: remote-gen1, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: srv}}\n  ingress:\n  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {gen: '1'}}}]\n    ports: [{port: 9090}]\n";
    lab.write_manifest("10-remote-rule.yaml", policies).unwrap();
    let allow = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-cli, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: srv}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: cli}}}]\n    ports: [{port: 8080}]\n";
    lab.write_manifest("20-allow-cli.yaml", allow).unwrap();
    let remote = |gen: u32| {
        let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: remote}\n");
        for n in 0..REMOTE {
            let a = format!("10.100.{}.{}", n / 250, n % 250 + 1);
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: r{n}, namespace: remote, labels: {{app: remote, gen: '{gen}'}}}}\nspec: {{nodeName: other-node, containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIP: {a}, podIPs: [{{ip: {a}}}]}}\n"
            ));
        }
        y
    };
    lab.write_manifest("30-remote.yaml", &remote(1)).unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    wait_endpoints(&lab, 2, 120, "lab pods");
    let t0 = std::time::Instant::now();
    while sample(&lab.metrics().unwrap(), "netpol_policies") != Some(2.0) || !lab.tcp("cli", "srv", 8080) {
        assert!(t0.elapsed().as_secs() < 120, "the allow never took effect\n{}", lab.daemon_log());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let syncs = lab.syncs();
    let full_before = lab.daemon_log().matches("synced (Full compile").count();
    // The big change, and while the daemon is at it (it wakes on the write), the removed
    // allow: before the fix the first took minutes and held the second back.
    let t0 = std::time::Instant::now();
    lab.write_manifest("30-remote.yaml", &remote(2)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    lab.remove_manifest("20-allow-cli.yaml").unwrap();
    while lab.tcp("cli", "srv", 8080) {
        assert!(t0.elapsed().as_secs() < 60, "the removed allow still applies after 60 s\n{}", lab.daemon_log());
    }
    let took = t0.elapsed();
    eprintln!("allow removed during a change of {REMOTE} remote pods: denied after {took:?}");
    lab.wait_synced(syncs).unwrap();
    let log = lab.daemon_log();
    assert!(log.matches("synced (Full compile").count() > full_before, "no full compile for the change:\n{log}");
    assert!(packets(&lab, "t", "srv", "ingress", "deny") >= 1.0, "the denied connection is counted");
}

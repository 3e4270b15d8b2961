//! Integration tests: the real daemon binary, real TC programs, real connections between
//! network namespaces. Each test builds its own lab (unique names) and removes it.
use std::net::Ipv4Addr;
use std::path::Path;

use netpol_daemon::metrics::sample;
use netpol_daemon::testkit::lab::Lab;

mod common;
use common::*;

/// Three namespaces like the seeds' products: a Kafka-like namespace, a client namespace, and
/// an outside host.
fn standard(lab: &mut Lab) {
    lab.add_namespace("kafka", &[("team", "streams")]);
    lab.add_namespace("clients", &[("team", "apps")]);
    lab.add_namespace("other", &[("team", "other")]);
    lab.add_pod("kafka", "broker", ip("10.244.0.10"), &[("app", "kafka")], &[9092, 9093, 8091], &[5353]).unwrap();
    lab.add_pod("kafka", "exporter", ip("10.244.0.11"), &[("app", "exporter")], &[8080], &[]).unwrap();
    lab.add_pod("clients", "api", ip("10.244.0.20"), &[("app", "api")], &[8080], &[53]).unwrap();
    lab.add_pod("other", "stranger", ip("10.244.0.30"), &[("app", "stranger")], &[8080], &[]).unwrap();
    lab.add_external("outside", ip("192.168.77.5")).unwrap();
    lab.write_cluster_manifest().unwrap();
}

#[test]
fn default_deny_ingress_then_allow_labelled_pods_and_live_edit() {
    let Some(mut lab) = lab() else { return };
    standard(&mut lab);
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    // No policy: everything flows.
    check(&lab, &[("api", "broker", "tcp", 9092, true), ("stranger", "broker", "tcp", 9093, true), ("api", "broker", "udp", 5353, true)]);

    lab.apply(
        "deny.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: default-deny, namespace: kafka}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n",
    )
    .unwrap();
    check(
        &lab,
        &[
            ("api", "broker", "tcp", 9092, false),
            ("exporter", "broker", "tcp", 9092, false),
            ("api", "broker", "udp", 5353, false),
            // The node always reaches its pods (kubelet probes).
            ("node", "broker", "tcp", 9092, true),
            // Other namespaces are untouched, and the isolated pod's own egress still works.
            ("broker", "api", "tcp", 8080, true),
            ("api", "stranger", "tcp", 8080, true),
        ],
    );

    // Allow TCP 9092 from pods labelled app=api in namespaces labelled team=apps.
    let allow = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-api, namespace: kafka}\nspec:\n  podSelector: {matchLabels: {app: kafka}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: apps}}\n      podSelector: {matchLabels: {app: api}}\n    ports: [{port: 9092}]\n";
    lab.apply("allow.yaml", allow).unwrap();
    check(
        &lab,
        &[
            ("api", "broker", "tcp", 9092, true),
            ("api", "broker", "tcp", 9093, false),
            ("api", "broker", "udp", 5353, false),
            ("stranger", "broker", "tcp", 9092, false),
            ("exporter", "broker", "tcp", 9092, false),
        ],
    );

    // Live edit: switch the port to 9093.
    lab.apply("allow.yaml", &allow.replace("port: 9092", "port: 9093")).unwrap();
    check(&lab, &[("api", "broker", "tcp", 9092, false), ("api", "broker", "tcp", 9093, true)]);

    // Removing the files removes the isolation.
    lab.delete("allow.yaml").unwrap();
    lab.delete("deny.yaml").unwrap();
    check(&lab, &[("api", "broker", "tcp", 9092, true), ("stranger", "broker", "udp", 5353, true)]);

    // Counters: allowed and denied packets were counted for the broker.
    let m = lab.metrics().unwrap();
    let denied = sample(&m, "netpol_packets_total{namespace=\"kafka\",pod=\"broker\",direction=\"ingress\",verdict=\"deny\"}").unwrap();
    let allowed = sample(&m, "netpol_packets_total{namespace=\"kafka\",pod=\"broker\",direction=\"ingress\",verdict=\"allow\"}").unwrap();
    assert!(denied >= 5.0, "denied counter {denied}\n{m}");
    assert!(allowed >= 5.0, "allowed counter {allowed}\n{m}");
    // The whole exposition is valid text format; drops are counted by reason (every
    // ingress drop here is one the policies made), bytes beside packets.
    let all = netpol_daemon::testkit::exposition::parse(&m).unwrap_or_else(|e| panic!("{e}\n{m}"));
    let v = |name: &str, labels: &[(&str, &str)]| netpol_daemon::testkit::exposition::value(&all, name, labels);
    let broker =
        |dir: &'static str, k: &'static str, val: &'static str| [("namespace", "kafka"), ("pod", "broker"), ("direction", dir), (k, val)];
    let by_reason: f64 = netpol_daemon::metrics::DROP_REASONS
        .iter()
        .filter(|(_, r)| *r != "spoofed")
        .map(|(_, r)| v("netpol_dropped_packets_total", &broker("ingress", "reason", r)).unwrap())
        .sum();
    assert_eq!(by_reason, denied, "{m}");
    assert_eq!(v("netpol_dropped_packets_total", &broker("ingress", "reason", "policy")), Some(denied));
    let allowed_bytes = v("netpol_bytes_total", &broker("ingress", "verdict", "allow")).unwrap();
    assert!(allowed_bytes >= 42.0 * allowed, "{allowed_bytes} bytes in {allowed} packets");
    let denied_bytes = v("netpol_dropped_bytes_total", &broker("ingress", "reason", "policy")).unwrap();
    assert!(denied_bytes >= 42.0 * denied && denied_bytes == v("netpol_bytes_total", &broker("ingress", "verdict", "deny")).unwrap());
    // Map pressure: the allowed connections are tracked flows; the policies are gone by now.
    assert!(v("netpol_bpf_map_entries", &[("map", "CONNTRACK2")]).is_some_and(|n| n >= 1.0), "{m}");
    assert_eq!(v("netpol_bpf_map_entries", &[("map", "POLICY2")]), Some(0.0), "{m}");
    assert_eq!(v("netpol_bpf_map_capacity", &[("map", "CONNTRACK2")]), Some(netpol_common::CONNTRACK_MAX as f64));
    assert!(v("process_resident_memory_bytes", &[]).is_some_and(|b| b > 1e6), "{m}");
    assert_eq!(lab.http_get("/healthz").unwrap().0, 200);
    // The allowed connections are counted against the policy that allowed them (kept after
    // the policy went away), never against the default-deny one.
    let by_policy =
        sample(&m, "netpol_policy_allowed_packets_total{namespace=\"kafka\",pod=\"broker\",direction=\"ingress\",policy=\"allow-api\"}");
    assert!(by_policy.is_some_and(|v| v >= 4.0), "allowed by allow-api: {by_policy:?}\n{m}");
    assert!(
        sample(&m, "netpol_policy_allowed_packets_total{namespace=\"kafka\",pod=\"broker\",direction=\"ingress\",policy=\"default-deny\"}")
            .is_none_or(|v| v == 0.0),
        "{m}"
    );
    assert_eq!(sample(&m, "netpol_ready"), Some(1.0));
}

#[test]
fn ip_block_except_namespace_selector_deny_all_egress_replies_and_bad_input() {
    let Some(mut lab) = lab() else { return };
    standard(&mut lab);
    lab.add_external("outside2", ip("192.168.77.6")).unwrap();
    lab.write_manifest(
        "broker.yaml",
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broker-in, namespace: kafka}
spec:
  podSelector: {matchLabels: {app: kafka}}
  ingress:
  - from: [{ipBlock: {cidr: 192.168.77.0/24, except: [192.168.77.5/32]}}]
    ports: [{port: 9092}]
  - from: [{namespaceSelector: {matchLabels: {team: apps}}}]
    ports: [{port: 9093}, {port: 5353, protocol: UDP}]
"#,
    )
    .unwrap();
    // Deny all egress from the api pod; its ingress stays open.
    lab.write_manifest(
        "api.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: api-no-egress, namespace: clients}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  policyTypes: [Egress]\n",
    )
    .unwrap();
    // Invalid objects next to valid ones: reported and enforced fail-closed, the rest as written.
    lab.write_manifest(
        "broken.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: other}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{protocol: ICMP, port: 1}]}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad-cidr, namespace: other}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/40}}]}]\n",
    )
    .unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    check(
        &lab,
        &[
            // ipBlock with except.
            ("outside2", "broker", "tcp", 9092, true),
            ("outside", "broker", "tcp", 9092, false),
            ("outside2", "broker", "tcp", 9093, false),
            // namespaceSelector team=apps: the namespace "other" (team=other) is not selected.
            ("stranger", "broker", "tcp", 9093, false),
            ("stranger", "broker", "udp", 5353, false),
            // Deny-all egress on api.
            ("api", "broker", "tcp", 9093, false),
            ("api", "stranger", "tcp", 8080, false),
            ("api", "outside", "tcp", 8080, false),
            // Replies of connections into api pass its isolated egress (conntrack).
            ("stranger", "api", "tcp", 8080, true),
            ("broker", "api", "udp", 53, true),
            // The broken policies in namespace other fail closed: they isolate what they
            // select (every pod of other, for ingress) and allow nothing.
            ("broker", "stranger", "tcp", 8080, false),
        ],
    );
    let m = lab.metrics().unwrap();
    assert_eq!(sample(&m, "netpol_manifest_errors"), Some(2.0), "{m}");
    let log = lab.daemon_log();
    assert!(log.contains("other/broken: spec.ingress[0].ports[0].protocol: unknown protocol \"ICMP\""), "{log}");
    assert!(log.contains("other/bad-cidr: spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR"), "{log}");
    assert!(log.contains("broken.yaml (document 2)"), "{log}");

    // A namespace label change moves a pod into the allowed set, live.
    lab.namespaces.insert("other".into(), [("team".to_string(), "apps".to_string())].into());
    let before = lab.syncs();
    lab.write_cluster_manifest().unwrap();
    lab.wait_synced(before).unwrap();
    check(
        &lab,
        &[("stranger", "broker", "tcp", 9093, true), ("stranger", "broker", "udp", 5353, true), ("stranger", "broker", "tcp", 9092, false)],
    );

    // The deny drops were counted on the api pod's egress.
    let m = lab.metrics().unwrap();
    let denied = sample(&m, "netpol_packets_total{namespace=\"clients\",pod=\"api\",direction=\"egress\",verdict=\"deny\"}").unwrap();
    assert!(denied >= 3.0, "{m}");
}

#[test]
fn readyz_metrics_and_node_name_filtering() {
    let Some(mut lab) = lab() else { return };
    lab.add_pod("web", "here", ip("10.244.0.50"), &[("app", "web")], &[80], &[]).unwrap();
    lab.add_pod("web", "client", ip("10.244.0.51"), &[("app", "client")], &[80], &[]).unwrap();
    lab.write_cluster_manifest().unwrap();
    // A pod of another node with a selected label: not attached here, not counted.
    lab.write_manifest(
        "remote.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: remote, namespace: web, labels: {app: web}}\nspec: {nodeName: other-node, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.244.9.9}\n",
    )
    .unwrap();
    lab.write_manifest(
        "deny.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: web}\nspec: {podSelector: {matchLabels: {app: web}}}\n",
    )
    .unwrap();
    lab.daemon_args = vec!["--log-format".into(), "json".into()];
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    let (code, _) = lab.http_get("/readyz").unwrap();
    assert_eq!(code, 200);
    let (code, _) = lab.http_get("/nope").unwrap();
    assert_eq!(code, 404);
    let m = lab.metrics().unwrap();
    assert_eq!(sample(&m, "netpol_endpoints"), Some(2.0), "{m}");
    assert!(!m.contains("pod=\"remote\""), "{m}");
    // The loop passes (every --poll-ms at least): alive, and /healthz says so.
    let age = sample(&m, "netpol_last_pass_age_seconds").unwrap();
    assert!((0.0..2.0).contains(&age), "last pass {age} s ago");
    assert_eq!(lab.http_get("/healthz").unwrap(), (200, "ok\n".to_string()));
    assert!(m.contains("# TYPE netpol_packets_total counter"));
    check(&lab, &[("client", "here", "tcp", 80, false), ("here", "client", "tcp", 80, true)]);
    json_log_has_the_sync_spans(&lab.daemon_log());
}

/// Every line of a `--log-format json` log is one JSON object; the sync is logged inside the
/// pass span, which carries the steps' durations.
fn json_log_has_the_sync_spans(log: &str) {
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{log}"))).collect();
    let synced = lines
        .iter()
        .find(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with("synced")))
        .unwrap_or_else(|| panic!("no sync logged:\n{log}"));
    assert_eq!(synced["level"], "INFO", "{synced}");
    assert_eq!(synced["fields"]["local_pods"], 2, "{synced}");
    let span = &synced["span"];
    assert_eq!(span["name"], "pass", "{synced}");
    assert_eq!(span["kind"], "Full", "{synced}");
    for step in ["compile_ms", "resolve_ms", "maps_ms"] {
        assert!(span[step].as_f64().is_some_and(|v| v >= 0.0), "{step} in {synced}");
    }
    let loaded = lines
        .iter()
        .find(|l| l["span"]["name"] == "load_datapath" && l["fields"]["message"].as_str().is_some_and(|m| m.starts_with("datapath loaded")))
        .unwrap_or_else(|| panic!("no load span:\n{log}"));
    assert!(loaded["fields"]["ms"].as_f64().is_some(), "{loaded}");
}

/// kill -9 under continuous allowed and denied traffic, then restart: enforcement never stops
/// (the pinned TCX links keep the programs attached while no daemon runs), no allowed
/// connection breaks, no denied packet passes.
#[test]
fn kill_9_and_restart_is_hitless() {
    use std::time::{Duration, Instant};

    let Some(mut lab) = server_client_intruder(60) else { return };
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    check(&lab, &[("client", "server", "tcp", 8080, true), ("intruder", "server", "tcp", 8080, false)]);

    let server = std::net::SocketAddr::from(([10, 244, 0, 60], 8080));
    let traffic = Traffic::start(&lab, "client", "intruder", server, 3);
    std::thread::sleep(Duration::from_millis(300));
    lab.kill_daemon();
    let t_dead = Instant::now();
    // No daemon at all for a while: the pinned programs keep enforcing.
    std::thread::sleep(Duration::from_millis(800));
    let denied_while_dead = traffic.denied_tries();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    let downtime = t_dead.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let Seen { long_fail: lf, new_ok: ok, new_fail: nf, denied_passed: dp, denied_tries: dt, .. } = traffic.finish();
    eprintln!("restart: daemon down {downtime:?}; allowed new connections ok {ok} failed {nf}; long-lived failures {lf}; denied attempts {dt} ({denied_while_dead} before restart) passed {dp}");
    assert_eq!(lf, 0, "the long-lived allowed connection broke\n{}", lab.daemon_log());
    assert_eq!(nf, 0, "{nf} new allowed connections failed\n{}", lab.daemon_log());
    assert!(ok > 50, "too little allowed traffic measured: {ok}");
    assert_eq!(dp, 0, "{dp} denied connections got through\n{}", lab.daemon_log());
    assert!(dt > 10, "too few denied attempts: {dt}");
    // The restarted daemon adopted the links: still exactly one program per hook.
    check(&lab, &[("client", "server", "tcp", 8080, true), ("intruder", "server", "tcp", 8080, false)]);
}

/// DNS through the kube-dns ClusterIP, with kube-proxy emulated by a real nftables DNAT and a
/// real dnsmasq as the DNS pod: the egress program sees the ClusterIP before the DNAT and
/// allows it because the policy allows the backends on their target ports.
#[test]
fn dns_through_the_cluster_ip_with_selector_and_ports_only_policies() {
    use std::net::SocketAddr;
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("kube-system", &[]);
    let dns = lab.add_pod("kube-system", "coredns", ip("10.244.0.53"), &[("k8s-app", "kube-dns")], &[], &[]).unwrap();
    lab.name_port(dns, "dns", 53, "UDP");
    lab.name_port(dns, "dns-tcp", 53, "TCP");
    // The lab writes named container ports only for served ports: declare them by hand.
    lab.pods[dns].udp.push(53);
    lab.pods[dns].tcp.push(53);
    lab.add_pod("app", "client", ip("10.244.0.70"), &[("app", "client")], &[], &[]).unwrap();
    lab.add_pod("app", "web", ip("10.244.0.71"), &[("app", "web")], &[8080], &[]).unwrap();
    lab.spawn_in(
        "coredns",
        "dnsmasq",
        &[
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=10.244.0.53",
            "--address=/svc.netpol.test/192.0.2.44",
            "--user=root",
            "--pid-file=",
        ],
    )
    .unwrap();
    lab.add_cluster_ip(
        "kube-system",
        "kube-dns",
        ip("10.96.0.10"),
        "coredns",
        &[("k8s-app", "kube-dns")],
        &[("udp", 53, 53, "dns"), ("tcp", 53, 53, "dns-tcp")],
    )
    .unwrap();
    lab.write_cluster_manifest().unwrap();
    // The DNS pod only takes DNS, from anywhere in the cluster.
    lab.write_manifest(
        "kube-system.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: dns-in, namespace: kube-system}\nspec:\n  podSelector: {matchLabels: {k8s-app: kube-dns}}\n  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]}]\n",
    )
    .unwrap();
    let selector_policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-out, namespace: app}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}]\n    ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]\n";
    lab.write_manifest("client.yaml", selector_policy).unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    let svc = SocketAddr::from(([10, 96, 0, 10], 53));
    let want = Some(ip("192.0.2.44"));
    // dnsmasq may take a moment to bind.
    let t0 = std::time::Instant::now();
    while lab.dns("web", svc, "svc.netpol.test", false).is_none() && t0.elapsed() < std::time::Duration::from_secs(5) {}
    assert_eq!(lab.dns("web", svc, "svc.netpol.test", false), want, "unrestricted pod resolves\n{}", lab.daemon_log());
    assert_eq!(lab.dns("client", svc, "svc.netpol.test", false), want, "UDP via the ClusterIP\n{}", lab.daemon_log());
    assert_eq!(lab.dns("client", svc, "svc.netpol.test", true), want, "TCP via the ClusterIP");
    check(&lab, &[("client", "web", "tcp", 8080, false), ("web", "coredns", "tcp", 8080, false)]);

    // Ports-only egress, `to:` left null: DNS to anywhere on 53.
    lab.apply("client.yaml", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-out, namespace: app}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]\n").unwrap();
    assert_eq!(lab.dns("client", svc, "svc.netpol.test", false), want);
    assert_eq!(lab.dns("client", svc, "svc.netpol.test", true), want);
    check(&lab, &[("client", "web", "tcp", 8080, false)]);

    // Egress only to the web pods: the ClusterIP's backend is not allowed, DNS fails.
    lab.apply("client.yaml", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-out, namespace: app}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: web}}}]}]\n").unwrap();
    assert_eq!(lab.dns("client", svc, "svc.netpol.test", false), None);
    assert_eq!(lab.dns("client", svc, "svc.netpol.test", true), None);
    check(&lab, &[("client", "web", "tcp", 8080, true)]);
}

/// BPF objects a process holds open, by kind ("bpf-prog", "bpf-map", "bpf-link").
fn bpf_fds(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        if let Ok(target) = std::fs::read_link(e.path()) {
            let t = target.to_string_lossy().to_string();
            if let Some(kind) = t.strip_prefix("anon_inode:") {
                if kind.starts_with("bpf") {
                    *out.entry(kind.to_string()).or_default() += 1;
                }
            }
        }
    }
    out
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Create and delete 500 pods under a live daemon: every one gets its programs, and afterwards
/// nothing is left: no pinned links, no endpoint or policy entries, no open BPF objects
/// beyond the daemon's own, no interfaces.
#[test]
fn five_hundred_pods_come_and_go_without_leaks() {
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("churn", &[]);
    lab.add_pod("churn", "anchor", ip("10.244.9.1"), &[("app", "anchor")], &[8080], &[]).unwrap();
    lab.write_cluster_manifest().unwrap();
    lab.write_manifest(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: isolate, namespace: churn}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{podSelector: {matchLabels: {app: anchor}}}], ports: [{port: 8080}]}]\n  egress: [{to: [{podSelector: {}}]}]\n",
    )
    .unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    let pid = lab.daemon_pid().unwrap();
    let links_dir = lab.pin_dir.join("links");
    let ifaces_before = lab.node_interfaces().unwrap();
    let gauge = |lab: &Lab, name: &str| sample(&lab.metrics().unwrap(), name).unwrap_or(-1.0);
    // (After a first scrape: it opens the pinned maps it reads, once.)
    let policy_before = gauge(&lab, "netpol_policy_map_entries");
    wait_tcx(&lab, 1, 10, "the anchor moved to TCX");
    let fds_before = bpf_fds(pid);
    let links_before = count_files(&links_dir);
    assert_eq!(gauge(&lab, "netpol_endpoints"), 1.0);

    const N: usize = 500;
    let keys: Vec<String> = (0..N).map(|i| format!("churn/p{i}")).collect();
    for i in 0..N {
        let addr = Ipv4Addr::new(10, 245, (i / 250) as u8, (i % 250) as u8 + 2);
        lab.add_pod("churn", &format!("p{i}"), addr, &[("app", "churn")], &[], &[]).unwrap();
    }
    lab.write_cluster_manifest().unwrap();
    wait_endpoints(&lab, N + 1, 120, "not all pods attached");
    wait_tcx(&lab, N + 1, 120, "not all pods moved to TCX");
    assert_eq!(count_files(&links_dir), links_before + 2 * N, "two pinned links per pod");
    // Enforced: the anchor admits only the anchor on 8080, so a churn pod is refused.
    assert!(!lab.tcp("churn/p7", "churn/anchor", 8080));

    for k in &keys {
        lab.remove_pod(k).unwrap();
    }
    lab.write_cluster_manifest().unwrap();
    wait_endpoints(&lab, 1, 120, "pods not detached");
    assert_eq!(count_files(&links_dir), links_before, "pinned links left behind");
    assert_eq!(gauge(&lab, "netpol_policy_map_entries"), policy_before, "policy entries left behind");
    assert_eq!(bpf_fds(pid), fds_before, "BPF objects held by the daemon");
    assert_eq!(lab.node_interfaces().unwrap(), ifaces_before, "interfaces left behind");
    assert!(lab.daemon_log().lines().all(|l| !l.contains("panicked")));
}

/// A pod the CNI has wired but whose address the API does not report yet is default-deny in
/// the directions its policies will isolate, until it is programmed; then its policies apply
/// without a gap. A starting pod without policies is never blocked.
#[test]
fn a_starting_pod_is_closed_until_programmed_and_an_unisolated_one_is_never_blocked() {
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("locked", &[]);
    lab.add_namespace("open", &[]);
    lab.add_pod("locked", "client", ip("10.244.6.2"), &[("app", "client")], &[], &[]).unwrap();
    lab.write_cluster_manifest().unwrap();
    lab.write_manifest(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: locked}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]\n",
    )
    .unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();

    // The pod is scheduled and wired, its IP not reported: nothing may reach it yet.
    lab.add_pod("locked", "web", ip("10.244.6.3"), &[("app", "web")], &[8080, 9090], &[]).unwrap();
    lab.set_ip_reported("locked/web", false);
    lab.write_cluster_manifest().unwrap();
    let t0 = std::time::Instant::now();
    while sample(&lab.metrics().unwrap(), "netpol_endpoints") != Some(2.0) {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "pending interface not programmed:\n{}", lab.daemon_log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!lab.tcp("locked/client", "locked/web", 8080), "open before its policies are programmed");
    assert!(!lab.tcp("locked/client", "locked/web", 9090));

    // The IP is reported: the policy applies (the client on 8080, nothing else).
    lab.set_ip_reported("locked/web", true);
    let syncs = lab.syncs();
    lab.write_cluster_manifest().unwrap();
    lab.wait_synced(syncs).unwrap();
    check(&lab, &[("locked/client", "locked/web", "tcp", 8080, true), ("locked/client", "locked/web", "tcp", 9090, false)]);
    let m = lab.metrics().unwrap();
    assert_eq!(sample(&m, "netpol_endpoints"), Some(2.0), "the pending entry became the pod's");
    assert_eq!(
        sample(&m, "netpol_pod_isolated_by{namespace=\"locked\",pod=\"web\",direction=\"ingress\",policy=\"web\"}"),
        Some(1.0),
        "{m}"
    );
    assert!(
        sample(&m, "netpol_packets_total{namespace=\"locked\",pod=\"web\",direction=\"ingress\",verdict=\"deny\"}")
            .is_some_and(|v| v >= 1.0),
        "{m}"
    );

    // A starting pod in a namespace without policies is reachable all along.
    lab.add_pod("open", "free", ip("10.244.6.4"), &[("app", "free")], &[8080], &[]).unwrap();
    lab.set_ip_reported("open/free", false);
    lab.write_cluster_manifest().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert!(lab.tcp("locked/client", "open/free", 8080), "a pod without policies was blocked while starting");
}

#[test]
fn dual_stack_pods_are_enforced_on_both_families() {
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("shop", &[("team", "shop")]);
    lab.add_namespace("other", &[("team", "other")]);
    lab.add_pod("shop", "db", ip("10.244.0.40"), &[("app", "db")], &[5432, 5433], &[53]).unwrap();
    lab.add_pod("shop", "api", ip("10.244.0.41"), &[("app", "api")], &[8080], &[]).unwrap();
    lab.add_pod("other", "stranger", ip("10.244.0.42"), &[("app", "api")], &[8080], &[]).unwrap();
    lab.add_pod("shop", "cache", ip("10.244.0.43"), &[("app", "cache")], &[8080], &[]).unwrap();
    for (pod, addr) in [("db", "fd00:244::40"), ("api", "fd00:244::41"), ("stranger", "fd00:244::42"), ("cache", "fd00:244::43")] {
        lab.add_ipv6(pod, addr.parse().unwrap()).unwrap();
    }
    lab.write_cluster_manifest().unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    assert!(lab.tcp6("stranger", "db", 5432), "no policy yet: IPv6 flows");

    // Ingress from the api pods (matched by both their addresses); egress only to an IPv6
    // block with an except.
    lab.apply(
        "db.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: api}}}]\n    ports: [{port: 5432}, {port: 53, protocol: UDP}]\n  egress:\n  - to: [{ipBlock: {cidr: 'fd00:244::/64', except: ['fd00:244::43/128']}}]\n    ports: [{port: 8080}]\n",
    )
    .unwrap();
    let cases: [(&str, bool, bool); 10] = [
        ("v6 api -> db tcp/5432", lab.tcp6("api", "db", 5432), true),
        ("v6 api -> db tcp/5433", lab.tcp6("api", "db", 5433), false),
        ("v6 api -> db udp/53", lab.udp6("api", "db", 53), true),
        ("v6 stranger (other namespace) -> db tcp/5432", lab.tcp6("stranger", "db", 5432), false),
        ("v4 api -> db tcp/5432", lab.tcp("api", "db", 5432), true),
        ("v4 stranger -> db tcp/5432", lab.tcp("stranger", "db", 5432), false),
        ("v6 db -> api tcp/8080", lab.tcp6("db", "api", 8080), true),
        ("v6 db -> cache tcp/8080 (except)", lab.tcp6("db", "cache", 8080), false),
        ("v4 db -> api tcp/8080 (the block is IPv6)", lab.tcp("db", "api", 8080), false),
        ("v6 api -> cache tcp/8080 (not isolated)", lab.tcp6("api", "cache", 8080), true),
    ];
    let wrong: Vec<String> = cases
        .iter()
        .filter(|(_, got, want)| got != want)
        .map(|(what, got, _)| format!("{what}: got {}", if *got { "allowed" } else { "denied" }))
        .collect();
    assert!(wrong.is_empty(), "{}\n--- daemon log ---\n{}", wrong.join("\n"), lab.daemon_log());
    let m = lab.metrics().unwrap();
    let denied = sample(&m, "netpol_packets_total{namespace=\"shop\",pod=\"db\",direction=\"ingress\",verdict=\"deny\"}").unwrap_or(0.0);
    assert!(denied >= 2.0, "{m}");
}

#[test]
fn bridge_cni_pods_are_found_through_neighbour_and_forwarding_tables() {
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("web", &[("team", "web")]);
    // Three pods on the node's bridge (none has sent a packet yet: the daemon has to make the
    // node resolve them) and one ptp pod routed to the bridge.
    lab.add_bridge_pod("web", "client", ip("10.245.0.10"), &[("app", "client")], &[8080], &[]).unwrap();
    lab.add_bridge_pod("web", "server", ip("10.245.0.11"), &[("app", "server")], &[8080, 8081], &[53]).unwrap();
    lab.add_bridge_pod("web", "other", ip("10.245.0.12"), &[("app", "other")], &[8080], &[]).unwrap();
    lab.add_pod("web", "routed", ip("10.244.0.50"), &[("app", "client")], &[8080], &[]).unwrap();
    lab.write_cluster_manifest().unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    // Every pod found (a bridge port is only known once the pod answered ARP).
    wait_endpoints(&lab, 4, 15, "not every pod found");
    lab.apply(
        "server.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server, namespace: web}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 8080}]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: client}}}]\n",
    )
    .unwrap();
    // Bridged (same L2, never routed) and routed traffic alike.
    check(
        &lab,
        &[
            ("client", "server", "tcp", 8080, true),
            ("client", "server", "tcp", 8081, false),
            ("client", "server", "udp", 53, false),
            ("other", "server", "tcp", 8080, false),
            ("routed", "server", "tcp", 8080, true),
            ("server", "client", "tcp", 8080, true),
            ("server", "other", "tcp", 8080, false),
            ("server", "routed", "tcp", 8080, true),
            ("other", "client", "tcp", 8080, true),
        ],
    );
    let m = lab.metrics().unwrap();
    let denied = sample(&m, "netpol_packets_total{namespace=\"web\",pod=\"server\",direction=\"ingress\",verdict=\"deny\"}").unwrap_or(0.0);
    assert!(denied >= 3.0, "the server's bridge port carries its programs\n{m}");
}

/// The attack tests' own instrument: a frame crafted in one pod (scapy) is seen by the
/// sniffer of the pod it is addressed to, and one to another address is not.
#[test]
fn crafted_frames_arrive_where_they_are_sent() {
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("t", &[]);
    lab.add_pod("t", "a", ip("10.244.0.40"), &[], &[], &[]).unwrap();
    // b answers on 4321 (no ICMP error quoting the marker back through the node).
    lab.add_pod("t", "b", ip("10.244.0.41"), &[], &[], &[4321]).unwrap();
    lab.add_pod("t", "c", ip("10.244.0.42"), &[], &[], &[]).unwrap();
    let to_b = lab.capture("b", "MARK-TO-B").unwrap();
    let to_c = lab.capture("c", "MARK-TO-B").unwrap();
    let at_node = lab.capture_node("MARK-TO-B").unwrap();
    lab.scapy("a", "tx(IP(src=MY_IP, dst='10.244.0.41')/UDP(sport=1234, dport=4321)/Raw(b'MARK-TO-B'), count=3)").unwrap();
    assert_eq!(to_b.count(), 3, "b receives the three crafted frames");
    assert_eq!(to_c.count(), 0, "c receives none");
    assert_eq!(at_node.count(), 3, "the node sees each frame arrive once (not again as it forwards it)");
}

/// `--version` names the crate's version and the commit it was built from; the metric says
/// the same.
#[test]
fn version_names_the_build() {
    let out = std::process::Command::new(DAEMON).arg("--version").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert_eq!(text.trim(), format!("netpol-daemon {}", netpol_daemon::metrics::build_info::long_version()));
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    // Built from a git checkout here: the commit is HEAD's (or the build predates it).
    if let Some(c) = netpol_daemon::metrics::build_info::COMMIT {
        assert!(c.len() == 12 && c.chars().all(|ch| ch.is_ascii_hexdigit()), "{c}");
        assert!(text.contains(c), "{text}");
    }
}

/// `--bpf-debug`: the programs themselves log a denied packet, with its reason, into the
/// daemon's log (and a crafted frame they cannot parse); without it nothing reads their log,
/// the programs loaded have no log at all, and no program line appears. The setting is the
/// loading daemon's: each restart's programs replace the previous daemon's on every
/// interface, whichever way the setting changed.
#[test]
fn bpf_debug_logs_the_programs_decisions_and_follows_each_restart() {
    let Some(mut lab) = server_client_intruder(90) else { return };
    for bpf_debug in [false, true, false] {
        lab.kill_daemon();
        lab.daemon_args = if bpf_debug { vec!["--bpf-debug".into()] } else { Vec::new() };
        lab.start_daemon(Path::new(DAEMON)).unwrap();
        wait_programs_log(&lab, bpf_debug);
        check(&lab, &SERVER_CASES);
        lab.scapy("intruder", "tx(IP(src=MY_IP, dst='10.244.0.90', ihl=4)/UDP(sport=5555, dport=8080))").unwrap();
        let line = |log: &str, what: &[&str]| log.lines().find(|l| what.iter().all(|w| l.contains(w))).map(str::to_string);
        // (Text format: the level and target between colour codes.)
        let denied = ["INFO", "netpol_bpf", " drop: policy ep ", " ingress proto 6 10.244.0.92:", " -> 10.244.0.90:8080"];
        let crafted = ["INFO", "netpol_bpf", " drop: malformed ep ", " egress frame not read as IP"];
        let threads = lab.daemon_threads();
        if bpf_debug {
            let t0 = std::time::Instant::now();
            while line(&lab.daemon_log(), &denied).is_none() || line(&lab.daemon_log(), &crafted).is_none() {
                assert!(t0.elapsed().as_secs() < 5, "no program log of the drops:\n{}", lab.daemon_log());
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            assert!(threads.iter().any(|t| t == "bpf-log"), "{threads:?}");
        } else {
            // (Time for a reader, were there one, to have written what it read.)
            std::thread::sleep(std::time::Duration::from_millis(500));
            let log = lab.daemon_log();
            assert!(!log.contains("netpol_bpf") && !log.contains("--bpf-debug"), "{log}");
            assert!(!threads.iter().any(|t| t == "bpf-log"), "a log reader without --bpf-debug: {threads:?}");
        }
    }
}

/// Waits until the only programs on the lab's maps are the current daemon's kind: with the
/// log ring buffer (AYA_LOGS) when it runs with `--bpf-debug`, without it otherwise (the
/// previous daemon's are freed once the first sync swapped them out everywhere).
fn wait_programs_log(lab: &Lab, bpf_debug: bool) {
    let t0 = std::time::Instant::now();
    loop {
        let programs = lab.programs_maps().unwrap();
        let logging = |maps: &Vec<String>| maps.iter().any(|m| m == "AYA_LOGS");
        // (At least the two the daemon loaded, which every interface runs.)
        if programs.len() >= 2 && programs.iter().all(|p| logging(p) == bpf_debug) {
            return;
        }
        assert!(
            t0.elapsed().as_secs() < 10,
            "want programs logging: {bpf_debug}; maps of those on the lab's: {programs:?}\n{}",
            lab.daemon_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

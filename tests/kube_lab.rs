//! The daemon in Kubernetes mode in the netns lab, with real packets: what the stand-in API
//! server (`testkit::apiserver`, the real list/watch protocol) holds is enforced; while the
//! server is away and its history is compacted, the node keeps enforcing the last state and
//! never opens; when it returns, the watches are answered `410 Gone`, relist, and the node
//! converges to the server's state.
mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::ip;
use netpol_daemon::metrics::sample;
use netpol_daemon::testkit::apiserver::ApiServer;
use netpol_daemon::testkit::lab::Lab;
use serde_json::Value;

const POLICY: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}]
";

fn wait_until(lab: &Lab, what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}\n{}", lab.daemon_log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Gives pod `shop/name` the label app=`app` on the server.
fn relabel(server: &ApiServer, name: &str, app: &str) {
    let mut pod: Value = server.get("pods", "shop", name).expect("the pod is on the server");
    pod["metadata"]["labels"]["app"] = app.into();
    server.apply("pods", pod);
}

#[test]
fn an_api_server_outage_with_compaction_never_opens_and_the_relist_converges() {
    let Some(mut lab) = common::lab() else { return };
    lab.add_namespace("shop", &[]);
    lab.add_pod("shop", "db", ip("10.244.0.10"), &[("app", "db")], &[5432], &[]).unwrap();
    lab.add_pod("shop", "web", ip("10.244.0.11"), &[("app", "web")], &[], &[]).unwrap();
    lab.add_pod("shop", "api", ip("10.244.0.12"), &[("app", "api")], &[], &[]).unwrap();
    lab.add_pod("shop", "evil", ip("10.244.0.13"), &[("app", "evil")], &[], &[]).unwrap();
    let server = ApiServer::start_in_netns(&lab.node_netns, "127.0.0.1:16443".parse().unwrap()).unwrap();
    server.apply_yaml(&lab.cluster_manifest()).unwrap();
    server.apply_yaml(POLICY).unwrap();
    let kubeconfig = lab.dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    lab.start_daemon_kube(Path::new(common::DAEMON), &kubeconfig).unwrap();
    common::wait_endpoints(&lab, 4, 30, "every pod attached");
    common::check(&lab, &[("web", "db", "tcp", 5432, true), ("api", "db", "tcp", 5432, false), ("evil", "db", "tcp", 5432, false)]);
    assert_eq!(sample(&lab.metrics().unwrap(), "netpol_source_errors_total"), Some(0.0));

    // evil -> db is denied before, during and after the fault: probed without pause throughout.
    let (stop, probes, opened) = (AtomicBool::new(false), AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                probes.fetch_add(1, Ordering::SeqCst);
                if lab.tcp("evil", "db", 5432) {
                    opened.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        // The API server goes away; meanwhile web leaves the peer selector (its access must
        // close) and api joins it (must open), and the history is compacted past what the
        // watches have seen.
        server.refuse_connections_for(Duration::from_secs(600));
        server.drop_connections();
        relabel(&server, "web", "web-retired");
        relabel(&server, "api", "web");
        server.compact();
        wait_until(&lab, "the daemon to notice the outage", Duration::from_secs(30), || {
            lab.metrics().is_ok_and(|m| sample(&m, "netpol_source_up") == Some(0.0))
        });
        // The node enforces the last state it knew.
        common::check(&lab, &[("web", "db", "tcp", 5432, true), ("api", "db", "tcp", 5432, false)]);
        server.clear_requests();
        server.refuse_connections_for(Duration::ZERO);
        wait_until(&lab, "the relisted state enforced", Duration::from_secs(60), || {
            lab.tcp("api", "db", 5432) && !lab.tcp("web", "db", 5432)
        });
        stop.store(true, Ordering::SeqCst);
    });
    assert!(probes.load(Ordering::SeqCst) > 3, "evil -> db was probed throughout");
    assert_eq!(opened.load(Ordering::SeqCst), 0, "evil -> db got through during the fault\n{}", lab.daemon_log());
    common::check(&lab, &[("api", "db", "tcp", 5432, true), ("web", "db", "tcp", 5432, false), ("evil", "db", "tcp", 5432, false)]);
    // The watches resumed from a compacted version: answered 410 Gone, then a fresh list.
    let pods: Vec<_> = server.requests().into_iter().filter(|r| r.path == "/api/v1/pods").collect();
    let gone = pods.iter().position(|r| r.is_watch() && r.gone).unwrap_or_else(|| panic!("no watch was answered 410 Gone: {pods:#?}"));
    assert!(pods[gone..].iter().any(|r| !r.is_watch() && r.param("continue").is_none()), "a fresh list followed: {pods:#?}");
    // Every watch resumes (each on its own backoff) and the source is up again.
    wait_until(&lab, "every watch to resume", Duration::from_secs(60), || {
        lab.metrics().is_ok_and(|m| sample(&m, "netpol_source_up") == Some(1.0))
    });
    let m = lab.metrics().unwrap();
    assert!(sample(&m, "netpol_source_errors_total").is_some_and(|e| e >= 1.0), "the failed watches are counted: {m}");
}

/// A ClusterNetworkPolicy that arrives with its CRD, installed after the daemon started, is
/// enforced (an Admin Deny over what no NetworkPolicy restricts), and removing the CRD lifts
/// it: the daemon started without the CRD, found it on its own (--crd-recheck-ms), and never
/// counted the missing CRD as a source error.
#[test]
fn a_cluster_network_policy_is_enforced_once_its_crd_is_installed_and_lifted_with_it() {
    let Some(mut lab) = common::lab() else { return };
    lab.add_namespace("shop", &[("team", "shop")]);
    lab.add_pod("shop", "db", ip("10.244.0.30"), &[("app", "db")], &[5432], &[]).unwrap();
    lab.add_pod("shop", "web", ip("10.244.0.31"), &[("app", "web")], &[], &[]).unwrap();
    let server = ApiServer::start_in_netns(&lab.node_netns, "127.0.0.1:16445".parse().unwrap()).unwrap();
    server.apply_yaml(&lab.cluster_manifest()).unwrap();
    let kubeconfig = lab.dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    lab.daemon_args.push("--crd-recheck-ms=200".into());
    lab.start_daemon_kube(Path::new(common::DAEMON), &kubeconfig).unwrap();
    common::wait_endpoints(&lab, 2, 30, "both pods attached");
    assert!(lab.tcp("web", "db", 5432), "no policy yet");

    server.install_crd("clusternetworkpolicies");
    server
        .apply_yaml(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: no-db}\n\
             spec: {tier: Admin, priority: 1, subject: {namespaces: {matchLabels: {team: shop}}},\n\
             egress: [{action: Deny, to: [{networks: [10.244.0.30/32]}], protocols: [{tcp: {destinationPort: {number: 5432}}}]}]}\n",
        )
        .unwrap();
    wait_until(&lab, "the Admin deny enforced", Duration::from_secs(30), || !lab.tcp("web", "db", 5432));
    server.remove_crd("clusternetworkpolicies");
    wait_until(&lab, "the deny lifted with the CRD", Duration::from_secs(30), || lab.tcp("web", "db", 5432));
    let m = lab.metrics().unwrap();
    assert_eq!((sample(&m, "netpol_source_up"), sample(&m, "netpol_source_errors_total")), (Some(1.0), Some(0.0)), "{}", lab.daemon_log());
    assert_eq!(sample(&m, "netpol_manifest_errors"), Some(0.0), "{}", lab.daemon_log());
}

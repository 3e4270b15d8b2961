//! Kubernetes Events on the policies a node cannot enforce as written, written through the real
//! kube client to the stand-in API server (`testkit::apiserver`, which records every Event
//! POSTed and PATCHed): one Event per problem with the log line's message, regarding the
//! policy; a problem seen again is a series patch at most, never a new Event; a burst is held to
//! the rate limit and what was held back is counted; a fixed policy gets no more Events. The last
//! test runs the daemon binary in Kubernetes mode against the server and waits for the Event.
mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netpol_daemon::metrics::kube_events::{self, Counters, KubeEvents, Limits, Problem, Reason, REPORTING_CONTROLLER};
use netpol_daemon::model::{self, Cluster, Kind, ObjKey, Object};
use netpol_daemon::testkit::apiserver::{ApiServer, LoggedRequest};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/";

/// A policy of namespace `shop` whose rule has a port out of range (`port`: 70000) or not.
fn policy(name: &str, port: u32) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"namespace": "shop", "name": name},
           "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"ports": [{"port": port}]}]}})
}

/// What the daemon's load makes of `policies` as the server stores them: the model and the
/// load errors (what it logs).
fn load(server: &ApiServer) -> (Cluster, Vec<String>) {
    let mut cluster = Cluster::default();
    let mut errors = Vec::new();
    for obj in server.objects("networkpolicies") {
        let conv = model::from_json(obj).unwrap();
        errors.extend(conv.errors);
        if let Some(Object::Policy(p)) = conv.object {
            cluster.insert(Object::Policy(p));
        }
    }
    (cluster, errors)
}

/// A reporter writing to `server` as node `node-1`, on a runtime of its own.
fn reporter(server: &ApiServer, limits: Limits) -> (KubeEvents, Arc<Counters>, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let counters = Arc::new(Counters::default());
    let events = KubeEvents::spawn(rt.handle(), server.client(&rt), "node-1", limits, counters.clone());
    (events, counters, rt)
}

/// The POSTs and PATCHes on Events so far.
fn writes(server: &ApiServer) -> Vec<LoggedRequest> {
    server.requests().into_iter().filter(|r| r.path.starts_with(EVENTS) && (r.method == "POST" || r.method == "PATCH")).collect()
}

fn count(server: &ApiServer, method: &str) -> usize {
    writes(server).iter().filter(|r| r.method == method).count()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < T, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_invalid_policy_gets_one_event_with_the_log_lines_message_until_it_is_fixed() {
    let server = ApiServer::start();
    server.apply("networkpolicies", policy("db", 70000));
    server.apply("networkpolicies", policy("web", 80));
    let (cluster, errors) = load(&server);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let refresh = Duration::from_millis(300);
    let (mut events, counters, _rt) = reporter(&server, Limits { refresh, ..Limits::default() });
    // Every load and sync hands the same problem over again.
    for _ in 0..50 {
        events.loaded(kube_events::invalid_policies(&cluster));
        events.synced(Vec::new());
    }
    wait_until("an Event", || count(&server, "POST") == 1);
    let stored = server.objects("events");
    assert_eq!(stored.len(), 1, "{stored:#?}");
    let ev = &stored[0];
    let uid = server.get("networkpolicies", "shop", "db").unwrap()["metadata"]["uid"].clone();
    assert_eq!(ev["note"].as_str(), Some(errors[0].as_str()), "the log line's message");
    assert_eq!(
        ev["regarding"],
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "namespace": "shop", "name": "db", "uid": uid})
    );
    assert_eq!(ev["metadata"]["namespace"], "shop");
    let fields = ["type", "reason", "action", "reportingController", "reportingInstance"].map(|f| ev[f].as_str().unwrap_or("").to_string());
    assert_eq!(fields, ["Warning", "InvalidPolicy", "EnforceFailClosed", REPORTING_CONTROLLER, "node-1"]);
    // Still there a refresh later: the same Event's series, no new Event.
    wait_until("a series patch", || count(&server, "PATCH") >= 2);
    assert_eq!(count(&server, "POST"), 1);
    let ev = &server.objects("events")[0];
    assert!(ev["series"]["count"].as_i64().unwrap() >= 3, "{ev:#}");
    assert_eq!((counters.created.load(Ordering::SeqCst), counters.rate_limited.load(Ordering::SeqCst)), (1, 0));
    // Fixed: no more Events.
    server.apply("networkpolicies", policy("db", 7000));
    let (cluster, errors) = load(&server);
    assert!(errors.is_empty());
    events.loaded(kube_events::invalid_policies(&cluster));
    std::thread::sleep(refresh / 2);
    let after_fix = writes(&server).len();
    std::thread::sleep(refresh * 4);
    assert_eq!(writes(&server).len(), after_fix, "no Event after the fix");
    assert_eq!(server.objects("events").len(), 1);
}

#[test]
fn a_new_message_is_a_new_event_and_a_policy_not_enforced_gets_its_own() {
    let server = ApiServer::start();
    server.apply("networkpolicies", policy("db", 70000));
    let (mut events, counters, _rt) = reporter(&server, Limits::default());
    let db = ObjKey::new("shop", "db");
    let problem = |reason, message: &str| Problem { kind: Kind::Policy, policy: db.clone(), reason, message: message.into() };
    events.loaded(vec![problem(Reason::InvalidPolicy, "NetworkPolicy shop/db: one")]);
    wait_until("the first Event", || count(&server, "POST") == 1);
    events.loaded(vec![problem(Reason::InvalidPolicy, "NetworkPolicy shop/db: two")]);
    events.synced(vec![problem(Reason::NotEnforced, "shop/db-0: failing closed (policies: shop/db)")]);
    wait_until("two more Events", || count(&server, "POST") == 3);
    let mut notes: Vec<(String, String)> =
        server.objects("events").iter().map(|e| (e["reason"].as_str().unwrap().into(), e["note"].as_str().unwrap().into())).collect();
    notes.sort();
    assert_eq!(
        notes,
        [
            ("InvalidPolicy".into(), "NetworkPolicy shop/db: one".into()),
            ("InvalidPolicy".into(), "NetworkPolicy shop/db: two".into()),
            ("NotEnforced".into(), "shop/db-0: failing closed (policies: shop/db)".into())
        ]
    );
    assert_eq!((count(&server, "PATCH"), counters.created.load(Ordering::SeqCst)), (0, 3));
}

#[test]
fn a_burst_of_invalid_policies_is_held_to_the_rate_limit_and_counted() {
    let server = ApiServer::start();
    server.apply_all("networkpolicies", (0..200).map(|i| policy(&format!("p{i:03}"), 70000 + i)));
    let (cluster, errors) = load(&server);
    assert_eq!(errors.len(), 200);
    let limits = Limits { burst: 20, per_minute: 60, refresh: Duration::from_secs(600) };
    let (mut events, counters, _rt) = reporter(&server, limits);
    let t0 = Instant::now();
    events.loaded(kube_events::invalid_policies(&cluster));
    let handled = || counters.created.load(Ordering::SeqCst) + counters.rate_limited.load(Ordering::SeqCst);
    wait_until("every problem written or held back", || handled() == 200);
    let elapsed = t0.elapsed();
    let posts = count(&server, "POST");
    // The burst, and one a second after it.
    let bound = 20 + elapsed.as_secs() as usize + 1;
    assert!((20..=bound).contains(&posts), "{posts} Events in {elapsed:?}");
    assert_eq!(counters.created.load(Ordering::SeqCst) as usize, posts);
    assert_eq!(counters.rate_limited.load(Ordering::SeqCst) as usize, 200 - posts, "what was held back is counted");
    // Nothing more until the refresh.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&server, "POST"), posts);
    let notes: std::collections::BTreeSet<String> =
        server.objects("events").iter().map(|e| e["note"].as_str().unwrap().to_string()).collect();
    assert!(notes.iter().all(|n| errors.contains(n)) && notes.len() == posts);
}

/// The daemon in Kubernetes mode (KUBECONFIG naming the stand-in server, in a lab's node
/// namespace) writes the Event for an invalid policy, with the message it logs, and counts it.
#[test]
fn the_daemon_writes_an_event_for_an_invalid_policy() {
    let Some(lab) = common::lab() else { return };
    let addr: std::net::SocketAddr = "127.0.0.1:16443".parse().unwrap();
    let server = ApiServer::start_in_netns(&lab.node_netns, addr).unwrap();
    server.apply("namespaces", json!({"metadata": {"name": "shop"}}));
    server.apply("networkpolicies", policy("db", 70000));
    let kubeconfig = lab.dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let log = lab.dir.join("daemon-kube.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", lab.node_netns))
        .arg(common::DAEMON)
        .args(["run", "--node-name", netpol_daemon::testkit::lab::NODE_NAME, "--bpffs"])
        .arg(&lab.pin_dir)
        .args(["--metrics-addr", &format!("127.0.0.1:{}", netpol_daemon::testkit::lab::METRICS_PORT)])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "info")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let _daemon = Killed(child);
    let daemon_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let t0 = Instant::now();
    while server.objects("events").is_empty() {
        assert!(t0.elapsed() < T, "no Event:\n{}", daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let ev = &server.objects("events")[0];
    let note = ev["note"].as_str().unwrap();
    assert!(daemon_log().contains(&format!("invalid: {note}")), "the Event says what the log says: {note}\n{}", daemon_log());
    assert_eq!(
        (ev["regarding"]["name"].as_str(), ev["reportingInstance"].as_str()),
        (Some("db"), Some(netpol_daemon::testkit::lab::NODE_NAME))
    );
    let created = || {
        let m = lab.metrics().unwrap_or_default();
        netpol_daemon::metrics::sample(&m, "netpol_kube_events_total{verb=\"create\"}")
    };
    wait_until("the Event counted", || created() == Some(1.0));
    // Fixed: the daemon takes the change and writes nothing more.
    let syncs = lab.syncs();
    server.apply("networkpolicies", policy("db", 7000));
    lab.wait_synced(syncs).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&server, "POST"), 1, "{}", daemon_log());
    assert_eq!(server.objects("events").len(), 1);
}

/// A ClusterNetworkPolicy `name` whose egress rule has a domainNames peer (unsupported: the
/// rule fails closed), or a networks peer.
fn cluster_policy(name: &str, domain_names: bool) -> Value {
    let peer = if domain_names { json!({"domainNames": ["example.com"]}) } else { json!({"networks": ["192.0.2.0/24"]}) };
    json!({"apiVersion": model::CLUSTER_POLICY_API_VERSION, "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
           "spec": {"tier": "Admin", "priority": 5, "subject": {"namespaces": {}}, "egress": [{"action": "Accept", "to": [peer]}]}})
}

const DOMAIN_NAMES_ERROR: &str = "spec.egress[0].to[0].domainNames: domain name peers are not supported by netpol";

/// An invalid ClusterNetworkPolicy (cluster-scoped) gets its Event too: regarding it (no
/// namespace, its uid), in namespace `default`, with the load error as its note.
#[test]
fn an_invalid_cluster_network_policy_gets_an_event_regarding_it() {
    let server = ApiServer::start();
    server.install_crd("clusternetworkpolicies");
    server.apply("clusternetworkpolicies", cluster_policy("dns", true));
    server.apply("clusternetworkpolicies", cluster_policy("nets", false));
    let mut cluster = Cluster::default();
    let mut errors = Vec::new();
    for obj in server.objects("clusternetworkpolicies") {
        let conv = model::from_json(obj).unwrap();
        errors.extend(conv.errors);
        cluster.insert(conv.object.unwrap());
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with(&format!("ClusterNetworkPolicy dns: {DOMAIN_NAMES_ERROR}")), "{errors:?}");
    let problems = kube_events::invalid_policies(&cluster);
    assert_eq!(
        problems.iter().map(|p| (p.kind, p.policy_name())).collect::<Vec<_>>(),
        [(Kind::ClusterPolicy, "ClusterNetworkPolicy dns".into())]
    );
    let (mut events, counters, _rt) = reporter(&server, Limits::default());
    events.loaded(problems);
    wait_until("an Event", || count(&server, "POST") == 1);
    let ev = &server.objects("events")[0];
    let uid = server.get("clusternetworkpolicies", "", "dns").unwrap()["metadata"]["uid"].clone();
    assert_eq!(
        ev["regarding"],
        json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "name": "dns", "uid": uid})
    );
    assert_eq!((ev["metadata"]["namespace"].as_str(), ev["note"].as_str()), (Some("default"), Some(errors[0].as_str())));
    assert_eq!((ev["reason"].as_str(), ev["action"].as_str()), (Some("InvalidPolicy"), Some("EnforceFailClosed")));
    assert_eq!(counters.created.load(Ordering::SeqCst), 1);
}

/// The daemon in Kubernetes mode starts, becomes ready and stays up without the
/// ClusterNetworkPolicy CRD; installed later, an invalid ClusterNetworkPolicy is logged,
/// counted and given an Event naming the object and field; deleted, its error goes; the CRD's
/// removal leaves the daemon up and healthy.
#[test]
fn the_daemon_runs_without_the_crd_and_reports_an_invalid_cluster_network_policy() {
    let Some(mut lab) = common::lab() else { return };
    let addr: std::net::SocketAddr = "127.0.0.1:16444".parse().unwrap();
    let server = ApiServer::start_in_netns(&lab.node_netns, addr).unwrap();
    let kubeconfig = lab.dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    lab.daemon_args.push("--crd-recheck-ms=200".into());
    // start_daemon_kube waits for /readyz: ready without the CRD.
    lab.start_daemon_kube(std::path::Path::new(common::DAEMON), &kubeconfig).unwrap();
    let metric = |name: &str| netpol_daemon::metrics::sample(&lab.metrics().unwrap_or_default(), name);
    wait_until("the CRD looked for", || lab.daemon_log().contains("the CRD is not installed"));
    assert_eq!((metric("netpol_source_up"), metric("netpol_source_errors_total")), (Some(1.0), Some(0.0)), "{}", lab.daemon_log());

    server.install_crd("clusternetworkpolicies");
    server.apply("clusternetworkpolicies", cluster_policy("dns", true));
    wait_until("an Event on the ClusterNetworkPolicy", || !server.objects("events").is_empty());
    let ev = &server.objects("events")[0];
    let note = ev["note"].as_str().unwrap().to_string();
    assert!(note.starts_with(&format!("ClusterNetworkPolicy dns: {DOMAIN_NAMES_ERROR}")), "{note}");
    assert_eq!((ev["regarding"]["kind"].as_str(), ev["regarding"]["name"].as_str()), (Some("ClusterNetworkPolicy"), Some("dns")));
    let log = lab.daemon_log();
    assert!(log.contains(&format!("invalid: {note}")), "the log line says what the Event says:\n{log}");
    wait_until("the load error counted", || metric("netpol_manifest_errors") == Some(1.0));
    server.delete("clusternetworkpolicies", "", "dns");
    wait_until("the error gone with the object", || metric("netpol_manifest_errors") == Some(0.0));
    // Invalid again, then the CRD removed: the error goes with it; the daemon stays up.
    server.apply("clusternetworkpolicies", cluster_policy("dns", true));
    wait_until("the load error counted again", || metric("netpol_manifest_errors") == Some(1.0));
    server.remove_crd("clusternetworkpolicies");
    wait_until("every ClusterNetworkPolicy dropped", || metric("netpol_manifest_errors") == Some(0.0));
    wait_until("the removal logged", || lab.daemon_log().contains("the CRD was removed"));
    assert_eq!((metric("netpol_source_up"), metric("netpol_source_errors_total")), (Some(1.0), Some(0.0)), "{}", lab.daemon_log());
    assert!(matches!(lab.http_get("/readyz"), Ok((200, _))), "{}", lab.daemon_log());
}

/// Kills and reaps the daemon on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

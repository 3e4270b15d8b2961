//! The Kubernetes source against a fake API server speaking the list + watch protocol:
//! initial lists reach the cluster model, a watch event updates it, a failing watch is counted
//! and the last state is kept.
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netpol_daemon::model::{Cluster, ObjKey};
use netpol_daemon::source::kube::{Intervals, KubeSource};
use netpol_daemon::source::Source;
use serde_json::{json, Value};

/// How often the source looks for the ClusterNetworkPolicy CRD while it is not installed.
const CRD_RECHECK: Duration = Duration::from_millis(200);

/// Every request target the fake API server was sent (path and query).
static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// path -> (list items, watch events)
type Routes = HashMap<&'static str, (Vec<Value>, Vec<Value>)>;

/// `down`: while set, every connection is dropped at once (an API server outage).
fn fake_api(routes: Routes, down: Arc<AtomicBool>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let routes = Arc::new(routes);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let routes = routes.clone();
            let down = down.clone();
            if down.load(Ordering::SeqCst) {
                continue;
            }
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut s = s;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut h = String::new();
                    while r.read_line(&mut h).is_ok_and(|n| n > 2) {
                        h.clear();
                    }
                    if down.load(Ordering::SeqCst) {
                        return;
                    }
                    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    SEEN.lock().unwrap().push(target.clone());
                    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                    if path == "/version" {
                        let body = r#"{"major":"1","minor":"31","gitVersion":"v1.31.0","gitCommit":"x","gitTreeState":"clean","buildDate":"2024-01-01T00:00:00Z","goVersion":"go1.22","compiler":"gc","platform":"linux/amd64"}"#;
                        let _ =
                            write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                        continue;
                    }
                    let Some((items, events)) = routes.get(path) else {
                        let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
                        let _ = write!(
                            s,
                            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        continue;
                    };
                    if query.contains("watch=true") {
                        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
                        for ev in events {
                            let line = format!("{ev}\n");
                            let _ = write!(s, "{:x}\r\n{line}\r\n", line.len());
                        }
                        let _ = s.flush();
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_secs(60) && !down.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        return;
                    }
                    let kind = match path {
                        "/api/v1/namespaces" => "NamespaceList",
                        "/api/v1/pods" => "PodList",
                        "/api/v1/services" => "ServiceList",
                        "/apis/discovery.k8s.io/v1/endpointslices" => "EndpointSliceList",
                        "/api/v1/nodes" => "NodeList",
                        _ => "NetworkPolicyList",
                    };
                    let body = json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "10"}, "items": items}).to_string();
                    let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                }
            });
        }
    });
    format!("http://{addr}")
}

fn pod(name: &str, ip: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop", "resourceVersion": "5", "labels": {"app": app}, "managedFields": [{"manager": "kubectl"}]},
           "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": 8080}]}]},
           "status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"}})
}

fn shop_routes() -> Routes {
    let mut routes = Routes::new();
    routes.insert("/api/v1/namespaces", (vec![json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}, "resourceVersion": "1"}})], vec![]));
    routes.insert(
        "/api/v1/pods",
        (
            vec![pod("web-1", "10.244.1.5", "web"), pod("db-1", "10.244.1.6", "db")],
            vec![json!({"type": "ADDED", "object": pod("web-2", "10.244.1.7", "web")})],
        ),
    );
    routes.insert(
        "/apis/networking.k8s.io/v1/networkpolicies",
        (
            vec![
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "db", "namespace": "shop", "resourceVersion": "3"},
                       "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 5432}]}]}}),
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "broken", "namespace": "shop", "resourceVersion": "4"},
                       "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}}),
            ],
            vec![],
        ),
    );
    routes.insert(
        "/api/v1/services",
        (vec![json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "shop", "resourceVersion": "6"}, "spec": {"clusterIP": "10.96.3.3", "selector": {"app": "db"}, "ports": [{"port": 5432}]}})], vec![]),
    );
    routes.insert("/apis/discovery.k8s.io/v1/endpointslices", (vec![], vec![]));
    routes.insert(
        "/api/v1/nodes",
        (
            vec![
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "labels": {"zone": "a"}, "resourceVersion": "7"},
                     "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}}),
            ],
            vec![],
        ),
    );
    // No route for ClusterNetworkPolicies: their CRD is not installed (404), which is no failure.
    routes
}

#[test]
fn lists_and_watch_events_reach_the_cluster_model() {
    let routes = shop_routes();
    let down = Arc::new(AtomicBool::new(false));
    let url = fake_api(routes, down.clone());

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let client = {
        let _g = rt.enter();
        let cfg = kube::Config::new(url.parse().unwrap());
        kube::Client::try_from(cfg).unwrap()
    };
    let mut src = KubeSource::with_client(rt, client, "node-1", Intervals { probe: Duration::from_millis(500), crd_recheck: CRD_RECHECK });
    // Taken as the daemon loop takes it: wait for a change, refresh the model.
    let (mut c, mut errors) = (Cluster::default(), Vec::new());
    let t0 = Instant::now();
    let mut first = None;
    while !(src.ready() && c.pods.len() == 3) {
        assert!(t0.elapsed() < Duration::from_secs(20), "not ready: {} pods, ready={}", c.pods.len(), src.ready());
        src.wait(Duration::from_millis(50));
        if src.ready() {
            if let Some((ch, e)) = src.refresh(&mut c, false).unwrap() {
                errors = e;
                first.get_or_insert(ch);
                assert!(src.take_change_age().is_some(), "changes are stamped for the latency histogram");
            }
        }
    }
    let first = first.unwrap();
    assert!(first.namespaces && first.policies && first.services && first.pods.contains(&ObjKey::new("shop", "db-1")), "{first:?}");
    assert!(c.pods.contains_key(&ObjKey::new("shop", "web-2")), "the watch event was applied");
    assert_eq!(c.namespaces["shop"].labels.get("team").map(|s| s.as_str()), Some("a"));
    assert_eq!(c.nodes["node-1"].addresses, ["172.18.0.2".parse::<std::net::IpAddr>().unwrap()]);
    assert!(c.cluster_policies.is_empty() && src.watch_errors() == 0, "the CRD is not installed: no ClusterNetworkPolicy, no error");
    assert!(c.policies.contains_key(&ObjKey::new("shop", "db")));
    assert_eq!(c.services[&ObjKey::new("shop", "db")].cluster_ips, vec!["10.96.3.3".parse::<std::net::IpAddr>().unwrap()]);
    // The invalid policy is reported with its field and enforced fail-closed (isolating
    // what it selects, allowing nothing), as from manifests.
    let broken = &c.policies[&ObjKey::new("shop", "broken")];
    assert!(
        broken.invalid.is_some() && broken.isolates_ingress && broken.ingress.is_empty() && broken.pod_selector.is_everything(),
        "{broken:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("shop/broken: spec.ingress[0].ports[0].port: 70000 is not in 1-65535 (enforced fail-closed")),
        "{errors:?}"
    );
    // The model compiles like any other source.
    let node = netpol_daemon::compiler::compile_node(&c, "node-1");
    let db = ObjKey::new("shop", "db-1");
    assert!(node.permits(&db, netpol_daemon::model::Direction::Ingress, "10.244.1.7".parse().unwrap(), 6, Some(5432)));
    assert!(!node.permits(&db, netpol_daemon::model::Direction::Ingress, "10.244.1.7".parse().unwrap(), 6, Some(5433)));
    assert!(src.healthy());
    // Pods are listed and watched without the finished ones; the other kinds unfiltered.
    let seen = SEEN.lock().unwrap().clone();
    let pod_requests: Vec<_> = seen.iter().filter(|t| t.starts_with("/api/v1/pods?")).collect();
    assert!(!pod_requests.is_empty(), "{seen:?}");
    for t in &pod_requests {
        assert!(t.contains("fieldSelector=status.phase%21%3DSucceeded%2Cstatus.phase%21%3DFailed"), "{t}");
    }
    assert!(seen.iter().filter(|t| t.starts_with("/api/v1/namespaces?")).all(|t| !t.contains("fieldSelector")), "{seen:?}");

    // The API server goes away: the source says so and keeps the last state.
    down.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    while src.healthy() {
        assert!(t0.elapsed() < Duration::from_secs(20), "outage not noticed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(src.watch_errors() > 0);
    // Nothing arrives while it is away: the model keeps the last state.
    assert!(src.refresh(&mut c, false).unwrap().is_none_or(|(ch, _)| ch.is_empty()));
    assert_eq!(c.pods.len(), 3, "last state kept");
    // It comes back: the watchers relist (with backoff) and the source is healthy again.
    down.store(false, Ordering::SeqCst);
    let t0 = Instant::now();
    while !src.healthy() {
        assert!(t0.elapsed() < Duration::from_secs(20), "no recovery");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The relist after the outage finds what the model holds: it changes nothing.
    src.wait(Duration::from_secs(2));
    if let Some((ch, _)) = src.refresh(&mut c, false).unwrap() {
        assert!(ch.is_empty(), "a relist of the same state changes nothing: {ch:?}");
    }
    assert_eq!(c.pods.len(), 3);
}

/// `explain` and `check` without --manifests read the live cluster (KUBECONFIG).
#[test]
fn explain_and_check_work_against_a_live_cluster() {
    let url = fake_api(shop_routes(), Arc::new(AtomicBool::new(false)));
    let dir = std::env::temp_dir().join(format!("netpol-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("config");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{url}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\ncurrent-context: c\n"),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_netpol-daemon"))
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, text) = run(&["explain", "--from", "shop/web-1", "--to", "shop/db-1", "--port", "5432"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("allowed by shop/db: spec.ingress[0]"), "{text}");
    let (code, text) = run(&["explain", "--from", "shop/web-1", "--to", "shop/db-1", "--port", "5433"]);
    assert_eq!(code, Some(3), "{text}");
    // The invalid policy shows as what it is enforced as: fail-closed.
    assert!(text.contains("shop/broken [invalid, fail-closed: shop/broken: spec.ingress[0].ports[0].port"), "{text}");
    let (code, text) = run(&["check"]);
    assert_eq!(code, Some(1), "the invalid policy is an error: {text}");
    assert!(text.contains("shop/broken: spec.ingress[0].ports[0].port"), "{text}");
    assert!(text.contains("note: shop/broken: invalid, enforced fail-closed: isolates"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

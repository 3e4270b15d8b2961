//! The Kubernetes source against the stand-in API server (`testkit::apiserver`), which speaks
//! the real list/watch protocol: a paged initial list, live changes through the watch,
//! bookmarks, 410 Gone after a compaction (on a watch and on a continued list), connections
//! cut mid-stream, a slow server. After each fault the model must converge to the server's
//! state; the assertions are about the model and about what the server was asked, not about
//! the source's internals: the model is brought up to date through the `Source` interface, as
//! the daemon does ([`Watched::sync`]).
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use netpol_daemon::model::{ChangeSet, Cluster, Labels, ObjKey};
use netpol_daemon::source::kube::{Intervals, KubeSource, COALESCE};
use netpol_daemon::source::Source;
use netpol_daemon::testkit::apiserver::{ApiServer, LoggedRequest};
use serde_json::{json, Value};

/// How often the source looks for the ClusterNetworkPolicy CRD while it is not installed.
const CRD_RECHECK: Duration = Duration::from_millis(200);

const T: Duration = Duration::from_secs(30);
const NAMESPACES: usize = 5;
const PODS: &str = "/api/v1/pods";

fn namespace(name: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {"team": name}}})
}

/// Pod `i` of namespace `ns-(i % 5)`: app "web" or "db", on one of 10 nodes, Running.
fn pod(i: usize, app: &str) -> Value {
    let ip = format!("10.244.{}.{}", i / 250, i % 250 + 1);
    json!({"metadata": {"namespace": format!("ns-{}", i % NAMESPACES), "name": format!("pod-{i}"), "labels": {"app": app}},
           "spec": {"nodeName": format!("node-{}", i % 10),
                    "containers": [{"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": 8080}]}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn app(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        "web"
    } else {
        "db"
    }
}

/// Pods app=db accept app=web on 8080.
fn policy(ns: &str, name: &str) -> Value {
    json!({"metadata": {"namespace": ns, "name": name},
           "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 8080}]}]}})
}

/// Five namespaces with a policy, a service and an endpoint slice each, and `pods` pods.
fn populate(server: &ApiServer, pods: usize) {
    for n in 0..NAMESPACES {
        let ns = format!("ns-{n}");
        server.apply("namespaces", namespace(&ns));
        server.apply("networkpolicies", policy(&ns, "db"));
        let spec = json!({"clusterIP": format!("10.96.0.{}", n + 1), "selector": {"app": "db"}, "ports": [{"port": 8080}]});
        server.apply("services", json!({"metadata": {"namespace": ns, "name": "db"}, "spec": spec}));
        server.apply(
            "endpointslices",
            json!({"metadata": {"namespace": ns, "name": "db-1", "labels": {"kubernetes.io/service-name": "db"}}, "addressType": "IPv4",
                   "endpoints": [{"addresses": ["10.244.0.2"]}], "ports": [{"port": 8080, "protocol": "TCP"}]}),
        );
    }
    server.apply_all("pods", (0..pods).map(|i| pod(i, app(i))));
}

/// A Kubernetes source watching `server` (on a runtime of its own) and the model the daemon
/// would build from it.
struct Watched {
    src: KubeSource,
    model: Cluster,
    /// The problems of the last refresh.
    errors: Vec<String>,
    /// What the refreshes changed, merged (a test clears it), and how many refreshes took
    /// changes.
    changed: ChangeSet,
    refreshes: usize,
}

impl Watched {
    /// One pass of the daemon loop's source side: wait for a change, take what is queued.
    fn sync(&mut self, wait: Duration) {
        self.src.wait(wait);
        if self.src.ready() {
            if let Some((ch, errors)) = self.src.refresh(&mut self.model, false).unwrap() {
                self.errors = errors;
                self.changed.merge(ch);
                self.refreshes += 1;
            }
        }
    }
}

fn source(server: &ApiServer) -> Watched {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let client = server.client(&rt);
    Watched {
        src: KubeSource::with_client(rt, client, "node-1", Intervals { probe: Duration::from_millis(500), crd_recheck: CRD_RECHECK }),
        model: Cluster::default(),
        errors: vec![],
        changed: ChangeSet::default(),
        refreshes: 0,
    }
}

/// What is compared between the server and the model: every object by key, and the labels of
/// namespaces and pods (what policies select on).
#[derive(Debug, PartialEq)]
struct View {
    namespaces: BTreeMap<String, Labels>,
    pods: BTreeMap<ObjKey, Labels>,
    policies: BTreeSet<ObjKey>,
    services: BTreeSet<ObjKey>,
    slices: BTreeSet<ObjKey>,
}

fn labels(obj: &Value) -> Labels {
    serde_json::from_value(obj["metadata"]["labels"].clone()).unwrap_or_default()
}

fn key(obj: &Value) -> ObjKey {
    let meta = &obj["metadata"];
    ObjKey::new(meta["namespace"].as_str().unwrap_or(""), meta["name"].as_str().unwrap())
}

/// The server's objects, without the pods that finished (the source does not ask for them).
fn server_view(server: &ApiServer) -> View {
    let keys = |res| server.objects(res).iter().map(key).collect();
    let running = |p: &&Value| !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
    View {
        namespaces: server.objects("namespaces").iter().map(|n| (n["metadata"]["name"].as_str().unwrap().to_string(), labels(n))).collect(),
        pods: server.objects("pods").iter().filter(running).map(|p| (key(p), labels(p))).collect(),
        policies: keys("networkpolicies"),
        services: keys("services"),
        slices: keys("endpointslices"),
    }
}

fn model_view(c: &Cluster) -> View {
    View {
        namespaces: c.namespaces.values().map(|n| (n.name.clone(), n.labels.clone())).collect(),
        pods: c.pods.values().map(|p| (p.key.clone(), p.labels.clone())).collect(),
        policies: c.policies.keys().cloned().collect(),
        services: c.services.keys().cloned().collect(),
        slices: c.endpoint_slices.keys().cloned().collect(),
    }
}

/// "The model holds exactly what the server holds now."
fn mirrors(server: &ApiServer) -> impl Fn(&Cluster) -> bool {
    let want = server_view(server);
    move |c| model_view(c) == want
}

/// Waits until the source is ready and its model satisfies `want`; returns that model.
/// Panics after `timeout`, describing the last model.
fn converges(w: &mut Watched, timeout: Duration, want: impl Fn(&Cluster) -> bool) -> Cluster {
    let t0 = Instant::now();
    loop {
        w.sync(Duration::from_millis(20));
        if w.src.ready() && want(&w.model) {
            return w.model.clone();
        }
        if t0.elapsed() > timeout {
            let v = model_view(&w.model);
            panic!(
                "the model did not converge in {timeout:?}: ready={}, \
                 {} namespaces, {} pods, {} policies, {} services, {} slices, {} watch errors",
                w.src.ready(),
                v.namespaces.len(),
                v.pods.len(),
                v.policies.len(),
                v.services.len(),
                v.slices.len(),
                w.src.watch_errors()
            );
        }
    }
}

/// A server holding [`populate`]'s cluster with `pods` pods, prepared by `prepare` (latency,
/// bookmarks), and a source whose model has converged to it.
fn converged(pods: usize, prepare: impl FnOnce(&ApiServer)) -> (ApiServer, Watched) {
    let server = ApiServer::start();
    prepare(&server);
    populate(&server, pods);
    let mut w = source(&server);
    converges(&mut w, T, mirrors(&server));
    (server, w)
}

/// The pod list requests (pages), in order.
fn pod_lists(server: &ApiServer) -> Vec<LoggedRequest> {
    server.requests().into_iter().filter(|r| r.is_list_of(PODS)).collect()
}

/// Every list of any watched resource (a relist, when made after the initial sync). A list
/// answered 404 is not one: it is the source looking for a CRD not installed.
fn lists(server: &ApiServer) -> Vec<LoggedRequest> {
    server.requests().into_iter().filter(|r| r.method == "GET" && !r.is_watch() && r.path != "/version" && r.status != 404).collect()
}

fn wait_for(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_paged_initial_list_reaches_the_model() {
    let (server, w) = converged(2_500, |_| {});
    let rv = server.resource_version().to_string();
    assert_eq!(w.model.pods.len(), 2_500);
    // kube's page size is 500: five pages, each after the first continuing the one before.
    let pages = pod_lists(&server);
    assert_eq!(pages.len(), 5, "{pages:#?}");
    assert!(pages.iter().all(|p| p.param("limit") == Some("500") && p.status == 200), "{pages:#?}");
    assert!(pages[0].param("continue").is_none() && pages[1..].iter().all(|p| p.param("continue").is_some()), "{pages:#?}");
    // The watch starts where the list's snapshot is; pods are asked for without the finished.
    let pod_requests: Vec<_> = server.requests().into_iter().filter(|r| r.path == PODS).collect();
    assert!(pod_requests.iter().any(|r| r.is_watch() && r.param("resourceVersion") == Some(&*rv)), "{pod_requests:#?}");
    assert!(pod_requests.iter().all(|r| r.param("fieldSelector") == Some("status.phase!=Succeeded,status.phase!=Failed")));
}

#[test]
fn live_changes_reach_the_model_through_the_watch() {
    let (server, mut w) = converged(50, |_| {});
    let lists_before = lists(&server).len();

    server.apply("pods", pod(0, "db"));
    server.apply("pods", pod(100, "web"));
    server.delete("pods", "ns-1", "pod-1");
    // A pod that finished leaves the selection: its watch event is a deletion.
    let mut finished = pod(2, app(2));
    finished["status"]["phase"] = "Succeeded".into();
    server.apply("pods", finished);
    server.apply("namespaces", namespace("ns-new"));
    server.delete("networkpolicies", "ns-3", "db");
    server.delete("services", "ns-4", "db");
    let c = converges(&mut w, T, mirrors(&server));
    assert_eq!(c.pods[&ObjKey::new("ns-0", "pod-0")].labels["app"], "db");
    assert!(!c.pods.contains_key(&ObjKey::new("ns-2", "pod-2")) && !c.pods.contains_key(&ObjKey::new("ns-1", "pod-1")));
    assert_eq!(lists(&server).len(), lists_before, "the watch carried every change: no relist");
}

#[test]
fn bookmarks_let_a_quiet_watch_resume_after_a_compaction() {
    let (server, mut w) = converged(20, |s| s.set_bookmark_interval(Duration::from_millis(100)));
    // Changes elsewhere move the resourceVersion past what the pods watch has seen; only
    // its bookmarks carry the new version to it.
    server.apply("namespaces", namespace("ns-quiet"));
    let rv = server.apply("networkpolicies", policy("ns-quiet", "db")).to_string();
    std::thread::sleep(Duration::from_secs(1));
    server.compact();
    server.clear_requests();
    server.drop_connections();
    server.apply("pods", pod(20, "web"));
    converges(&mut w, T, mirrors(&server));
    assert!(lists(&server).is_empty(), "every watch resumed, none relisted: {:#?}", server.requests());
    let pod_watches: Vec<_> = server.requests().into_iter().filter(|r| r.path == PODS && r.is_watch()).collect();
    assert!(
        pod_watches.iter().any(|r| r.param("resourceVersion") == Some(&*rv)) && pod_watches.iter().all(|r| !r.gone),
        "{pod_watches:#?}"
    );
}

#[test]
fn a_compaction_while_the_watchers_are_away_forces_a_relist_that_converges() {
    let (server, mut w) = converged(100, |_| {});
    // An outage; meanwhile the cluster changes and the old versions are compacted away.
    server.refuse_connections_for(Duration::from_secs(60));
    server.drop_connections();
    for i in 0..10 {
        server.delete("pods", &format!("ns-{}", i % NAMESPACES), &format!("pod-{i}"));
        server.apply("pods", pod(200 + i, "web"));
    }
    server.apply("pods", pod(50, "canary"));
    server.delete("networkpolicies", "ns-0", "db");
    server.apply("namespaces", namespace("ns-new"));
    server.compact();
    server.clear_requests();
    w.changed = ChangeSet::default();
    server.refuse_connections_for(Duration::ZERO);

    let c = converges(&mut w, T, mirrors(&server));
    // The relist was diffed against the model: only what changed is reported changed.
    let touched: BTreeSet<ObjKey> =
        (0..10).flat_map(|i| [i, 200 + i]).chain([50]).map(|i| ObjKey::new(format!("ns-{}", i % NAMESPACES), format!("pod-{i}"))).collect();
    assert_eq!(w.changed.pods, touched);
    assert!(w.changed.policies && w.changed.namespaces && !w.changed.services && !w.changed.endpoint_slices && !w.changed.all);
    assert!(
        (0..10).all(|i| !c.pods.contains_key(&ObjKey::new(format!("ns-{}", i % NAMESPACES), format!("pod-{i}")))),
        "deleted pods are gone"
    );
    let pods: Vec<_> = server.requests().into_iter().filter(|r| r.path == PODS).collect();
    let gone = pods.iter().position(|r| r.is_watch() && r.gone).unwrap_or_else(|| panic!("no watch was answered 410 Gone: {pods:#?}"));
    assert!(pods[gone..].iter().any(|r| !r.is_watch() && r.param("continue").is_none()), "a fresh list followed: {pods:#?}");
}

#[test]
fn continuing_a_list_from_a_compacted_snapshot_is_gone_and_the_list_restarts() {
    let server = ApiServer::start();
    populate(&server, 2_500);
    server.set_latency(Duration::from_millis(200));
    let mut w = source(&server);
    // The second page has arrived and waits out the latency: the snapshot it continues is
    // compacted away under it.
    wait_for("a continued pod list", T, || pod_lists(&server).iter().any(|r| r.param("continue").is_some()));
    server.delete("pods", "ns-0", "pod-0");
    server.apply("pods", pod(5_000, "web"));
    server.compact();

    let c = converges(&mut w, Duration::from_secs(60), mirrors(&server));
    assert!(c.pods.contains_key(&ObjKey::new("ns-0", "pod-5000")) && !c.pods.contains_key(&ObjKey::new("ns-0", "pod-0")));
    let pages = pod_lists(&server);
    let gone = pages.iter().position(|r| r.gone).unwrap_or_else(|| panic!("no page was answered 410: {pages:#?}"));
    assert_eq!((pages[gone].status, pages[gone].param("continue").is_some()), (410, true));
    assert!(pages[gone..].iter().any(|r| r.param("continue").is_none() && r.status == 200), "the list restarted: {pages:#?}");
}

#[test]
fn watches_cut_mid_stream_resume_and_converge() {
    let (server, mut w) = converged(100, |_| {});
    for round in 0..3 {
        server.clear_requests();
        server.drop_connections();
        server.apply("pods", pod(1_000 + round, "web"));
        server.delete("pods", &format!("ns-{}", round % NAMESPACES), &format!("pod-{round}"));
        converges(&mut w, T, mirrors(&server));
        assert!(lists(&server).is_empty(), "round {round}: resumed from the last resourceVersion, no relist: {:#?}", server.requests());
        assert!(server.requests().iter().any(|r| r.path == PODS && r.is_watch() && r.param("resourceVersion").is_some_and(|v| v != "0")));
    }
}

/// 1,000 pod events, sent one by one as fast as the server takes them, are taken at most one
/// refresh per `COALESCE` while they keep coming (the daemon loop's source side coalesces a
/// stream), and every one of them reaches the model.
#[test]
fn a_burst_of_events_is_taken_in_few_refreshes() {
    let (server, mut w) = converged(1_000, |_| {});
    let before = w.refreshes;
    let t0 = Instant::now();
    let (sent_in, taken_in) = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            for i in 0..1_000 {
                let mut p = pod(i, app(i));
                p["metadata"]["labels"]["rev"] = "2".into();
                server.apply("pods", p);
            }
            t0.elapsed()
        });
        std::thread::sleep(Duration::from_millis(5));
        let t0 = Instant::now();
        while !w.model.pods.values().all(|p| p.labels.get("rev").is_some_and(|r| r == "2")) {
            assert!(t0.elapsed() < T, "the burst did not arrive");
            w.sync(Duration::from_millis(100));
        }
        (sender.join().unwrap(), t0.elapsed())
    });
    let refreshes = w.refreshes - before;
    let most = taken_in.as_millis() / COALESCE.as_millis() + 2;
    assert!(
        refreshes as u128 <= most,
        "1,000 events sent in {sent_in:?}, all taken {taken_in:?} after the first was sent, in {refreshes} refreshes (at most {most})"
    );
    assert!(mirrors(&server)(&w.model));
}

#[test]
fn a_slow_server_still_converges() {
    let (server, mut w) = converged(1_200, |s| s.set_latency(Duration::from_millis(200)));
    assert_eq!(pod_lists(&server).len(), 3, "1,200 pods in pages of 500");
    server.apply("pods", pod(7, "web"));
    server.delete("pods", "ns-3", "pod-8");
    converges(&mut w, T, mirrors(&server));
    assert!(w.src.healthy());
}

/// kube-runtime's event Recorder (what the daemon's Kubernetes Events will use): the first
/// event is created, its repetition patched into a series.
#[test]
fn events_are_created_and_patched() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let server = ApiServer::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = server.client(&rt);
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("networking.k8s.io/v1".into()),
        kind: Some("NetworkPolicy".into()),
        namespace: Some("shop".into()),
        name: Some("db".into()),
        ..Default::default()
    };
    let ev = Event {
        type_: EventType::Warning,
        reason: "Invalid".into(),
        note: Some("spec.ingress[0].ports[0].port: 70000".into()),
        action: "Enforce".into(),
        secondary: None,
    };
    rt.block_on(async {
        let recorder = Recorder::new(client, Reporter { controller: "netpol".into(), instance: Some("node-1".into()) });
        recorder.publish(&ev, &reference).await.unwrap();
        recorder.publish(&ev, &reference).await.unwrap();
    });
    let events = server.objects("events");
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!((events[0]["note"].as_str(), events[0]["regarding"]["name"].as_str()), (ev.note.as_deref(), Some("db")));
    assert_eq!(events[0]["series"]["count"], 2);
    let calls: Vec<_> = server.requests().iter().map(|r| (r.method.clone(), r.path.clone(), r.status)).collect();
    let name = events[0]["metadata"]["name"].as_str().unwrap();
    let base = "/apis/events.k8s.io/v1/namespaces/shop/events";
    assert_eq!(calls, [("POST".into(), base.into(), 201), ("PATCH".into(), format!("{base}/{name}"), 200)]);
}

/// A process reads the server through a kubeconfig: `explain` against the live cluster.
#[test]
fn the_daemon_binary_reads_the_server_through_a_kubeconfig() {
    let server = ApiServer::start();
    populate(&server, 10);
    let dir = std::env::temp_dir().join(format!("netpol-apiserver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("config");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let explain = |port: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_netpol-daemon"))
            .args(["explain", "--from", "ns-0/pod-0", "--to", "ns-0/pod-5", "--port", port])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, text) = explain("8080");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("allowed by ns-0/db: spec.ingress[0]"), "{text}");
    assert_eq!(explain("8081").0, Some(3));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A server bound inside a network namespace answers there (as a lab node's daemon needs).
#[test]
fn a_server_in_a_network_namespace_answers_there() {
    use std::io::{Read, Write};
    let netns = format!("npapi-{}", std::process::id());
    let ip = |args: &[&str]| assert!(std::process::Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    ip(&["netns", "add", &netns]);
    ip(&["-n", &netns, "link", "set", "lo", "up"]);
    let server = ApiServer::start_in_netns(&netns, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.addr();
    let answer = netpol_daemon::testkit::lab::in_netns(&netns, move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    })
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK") && answer.contains("\"gitVersion\":\"v1.31.0\""), "{answer}");
    assert!(std::net::TcpStream::connect(addr).is_err(), "not reachable from outside the namespace");
    drop(server);
    ip(&["netns", "del", &netns]);
}

/// kube's streaming lists (`sendInitialEvents=true`): the initial state arrives as ADDED
/// events on the watch, ended by a bookmark, then live changes follow on the same stream.
#[test]
fn streaming_lists_send_the_initial_state_on_the_watch() {
    use futures::StreamExt;
    use kube::runtime::watcher::{self, Event};
    let server = ApiServer::start();
    populate(&server, 30);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pods = kube::Api::<k8s_openapi::api::core::v1::Pod>::all(server.client(&rt));
    let (initial, live) = rt.block_on(async {
        let mut events = std::pin::pin!(watcher::watcher(pods, watcher::Config::default().streaming_lists()));
        let mut initial = 0;
        while let Some(ev) = events.next().await {
            match ev.unwrap() {
                Event::InitApply(_) => initial += 1,
                Event::InitDone => break,
                _ => {}
            }
        }
        server.apply("pods", pod(99, "web"));
        let live = loop {
            if let Event::Apply(p) = events.next().await.unwrap().unwrap() {
                break p.metadata.name.unwrap();
            }
        };
        (initial, live)
    });
    assert_eq!((initial, live.as_str()), (30, "pod-99"));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1, "one watch, no list: {reqs:#?}");
    assert_eq!((reqs[0].param("sendInitialEvents"), reqs[0].param("resourceVersionMatch")), (Some("true"), Some("NotOlderThan")));
}

const CNPS: &str = "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies";

/// A ClusterNetworkPolicy denying egress to `peer` (a JSON peer) from every pod.
fn cluster_policy(name: &str, peer: Value) -> Value {
    json!({"metadata": {"name": name},
           "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}}, "egress": [{"action": "Deny", "to": [peer]}]}})
}

/// The ClusterNetworkPolicy CRD may be installed after the daemon started, or never: without
/// it the source is ready and healthy (a 404 is "not installed", no watch error), and looks
/// again every CRD_RECHECK; once installed its objects reach the model (an invalid one
/// reported at its field, enforced fail-closed), and removing the CRD drops them all.
#[test]
fn cluster_network_policies_are_watched_while_their_crd_is_installed() {
    let server = ApiServer::start();
    populate(&server, 5);
    let mut w = source(&server);
    converges(&mut w, T, mirrors(&server));
    assert!(w.model.cluster_policies.is_empty());
    // Looked for, answered 404, and again CRD_RECHECK later; no failure for it.
    wait_for("two looks for the CRD", T, || server.requests().iter().filter(|r| r.path == CNPS && r.status == 404).count() >= 2);
    assert!(w.src.healthy() && w.src.watch_errors() == 0, "{} watch errors", w.src.watch_errors());

    server.install_crd("clusternetworkpolicies");
    server.apply("clusternetworkpolicies", cluster_policy("metadata", json!({"networks": ["169.254.169.254/32"]})));
    server.apply("clusternetworkpolicies", cluster_policy("dns-names", json!({"domainNames": ["example.com"]})));
    let c = converges(&mut w, T, |c| c.cluster_policies.len() == 2);
    assert_eq!(c.cluster_policies["metadata"].invalid, None);
    assert!(c.cluster_policies["dns-names"].invalid.is_some(), "kept, fail-closed");
    let problem = "ClusterNetworkPolicy dns-names: spec.egress[0].to[0].domainNames: domain name peers are not supported";
    assert!(w.errors.iter().any(|e| e.starts_with(problem)), "{:?}", w.errors);
    // Deleted: gone from the model, its problem with it.
    server.delete("clusternetworkpolicies", "", "dns-names");
    converges(&mut w, T, |c| c.cluster_policies.len() == 1);
    assert!(!w.errors.iter().any(|e| e.contains("dns-names")), "{:?}", w.errors);

    // The CRD removed: every ClusterNetworkPolicy goes; still healthy, nothing counted failed.
    server.remove_crd("clusternetworkpolicies");
    converges(&mut w, T, |c| c.cluster_policies.is_empty());
    assert!(w.src.healthy() && w.src.watch_errors() == 0, "{} watch errors", w.src.watch_errors());
    // Installed again: watched again.
    server.install_crd("clusternetworkpolicies");
    server.apply("clusternetworkpolicies", cluster_policy("again", json!({"nodes": {}})));
    let c = converges(&mut w, T, |c| c.cluster_policies.contains_key("again"));
    assert_eq!(c.cluster_policies["again"].egress[0].peers, [netpol_daemon::model::ClusterPeer::Nodes(Default::default())]);
    assert!(converges(&mut w, T, mirrors(&server)).pods.len() == 5, "the rest of the model untouched");
}

/// Nodes (what ClusterNetworkPolicy `nodes` peers select): their labels and IP addresses reach
/// the model, and changes and deletions follow.
#[test]
fn nodes_reach_the_model_with_their_labels_and_addresses() {
    let node = |name: &str, zone: &str, ip: &str| {
        json!({"metadata": {"name": name, "labels": {"zone": zone}},
               "status": {"addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}]}})
    };
    let server = ApiServer::start();
    populate(&server, 5);
    server.apply("nodes", node("node-1", "a", "172.18.0.2"));
    server.apply("nodes", node("node-2", "b", "172.18.0.3"));
    let mut w = source(&server);
    let c = converges(&mut w, T, |c| c.nodes.len() == 2);
    assert_eq!(c.nodes["node-2"].addresses, ["172.18.0.3".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(c.nodes["node-1"].labels["zone"], "a");
    w.changed = ChangeSet::default();
    server.apply("nodes", node("node-2", "c", "172.18.0.9"));
    server.delete("nodes", "", "node-1");
    let c = converges(&mut w, T, |c| c.nodes.len() == 1 && c.nodes["node-2"].labels["zone"] == "c");
    assert_eq!(c.nodes["node-2"].addresses, ["172.18.0.9".parse::<std::net::IpAddr>().unwrap()]);
    assert!(w.changed.nodes && !w.changed.policies && w.changed.pods.is_empty(), "{:?}", w.changed);
}

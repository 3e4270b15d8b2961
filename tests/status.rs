//! `netpol-daemon status` against a real daemon's pins, run in the lab's node namespace: what
//! it reads back from the maps matches what the compiler intended (`explain`'s verdict for
//! every peer, port and protocol tried, for an isolated and a non-isolated pod), the rules'
//! peers are named as pods (local ones and one on another node), it keeps reading the pins
//! once the daemon is killed, map entries and endpoint flags changed by hand show up in it
//! (and in the traffic) while the compiler still says otherwise, and without pins it says so.
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use netpol_daemon::cli::Output;
use netpol_daemon::testkit::lab::{Lab, GATEWAY_IP, NODE_IP};
use serde_json::Value;

mod common;
use common::*;

/// Runs `netpol-daemon status --bpffs PIN_DIR ARGS` in the node namespace: (success, stdout,
/// stderr).
fn status(lab: &Lab, pin_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", lab.node_netns))
        .arg(DAEMON)
        .arg("status")
        .arg("--bpffs")
        .arg(pin_dir)
        .args(args)
        .output()
        .expect("running netpol-daemon status");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn status_json(lab: &Lab, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (ok, out, err) = status(lab, &lab.pin_dir, &all);
    assert!(ok, "status {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status {args:?}: not JSON ({e}):\n{out}"))
}

/// Is `ip` in the peer prefix `p` (a CIDR or an address, less its excepts)?
fn in_prefix(p: &Value, ip: IpAddr) -> bool {
    let net = |s: &str| -> IpNet { s.parse().or_else(|_| s.parse::<IpAddr>().map(IpNet::from)).unwrap() };
    net(p["cidr"].as_str().unwrap()).contains(&ip)
        && !p["except"].as_array().unwrap().iter().any(|e| net(e.as_str().unwrap()).contains(&ip))
}

fn allows(a: &Value, proto: &str, port: u16) -> bool {
    match a["kind"].as_str().unwrap() {
        "all" => true,
        "ports" => a["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["protocol"] == proto && r["from"].as_u64().unwrap() <= port as u64 && port as u64 <= r["to"].as_u64().unwrap()),
        k => panic!("unknown kind {k}"),
    }
}

/// The verdict the rules `status` printed for one direction give a peer, port and protocol,
/// evaluated as the programs do: not isolated passes, nor does anything where only audit-mode
/// policies isolate; a node address passes into the pod; then the class of the peer (at most
/// one rule's prefixes hold it) or else every other address. (Failing closed changes only
/// what a drop is counted as: the daemon then writes no entries.)
fn status_verdict(d: &Value, peer: IpAddr, proto: &str, port: u16) -> bool {
    if !d["isolated"].as_bool().unwrap() || d["audit"].as_bool().unwrap() {
        return true;
    }
    if d["node_addresses"].as_array().unwrap().iter().any(|a| a.as_str() == Some(&peer.to_string())) {
        return true;
    }
    let rules = d["rules"].as_array().unwrap();
    let hits: Vec<&Value> = rules.iter().filter(|r| r["peers"].as_array().unwrap().iter().any(|p| in_prefix(p, peer))).collect();
    assert!(hits.len() <= 1, "{peer} is in {} classes: {d}", hits.len());
    match hits.first() {
        Some(r) => allows(&r["allowed"], proto, port),
        None => d["any_other"].as_object().is_some() && allows(&d["any_other"], proto, port),
    }
}

/// `explain`'s verdict at `pod` for `direction` (its `ingress at POD: ...` line).
fn explain_verdict(lab: &Lab, from: &str, to: &str, pod: &str, direction: &str, proto: &str, port: u16) -> bool {
    let (_, text) = netpol_daemon::cli::explain(Some(&lab.manifests_dir()), from, to, Some(port), proto, Output::Text).unwrap();
    let line = text.lines().find(|l| l.trim_start().starts_with(&format!("{direction} at {pod}:"))).unwrap_or_else(|| panic!("{text}"));
    line.contains("ALLOWED")
}

const POLICIES: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broker-in, namespace: kafka}
spec:
  podSelector: {matchLabels: {app: kafka}}
  ingress:
  - from: [{ipBlock: {cidr: 192.168.77.0/24, except: [192.168.77.5/32]}}]
    ports: [{port: 9092}]
  - from: [{namespaceSelector: {matchLabels: {team: apps}}}]
    ports: [{port: 9093}, {port: 5353, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-out, namespace: clients}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {}, namespaceSelector: {matchLabels: {team: streams}}}]
    ports: [{port: 9090, endPort: 9095}]
"#;

/// A pod of another node: no interface here, only an address the broker's rules name.
const REMOTE: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: clients, labels: {app: remote}}
spec: {nodeName: other-node, containers: [{name: c, image: i}]}
status: {podIP: 10.244.1.7}
"#;

fn lab_with_policies() -> Option<Lab> {
    let mut lab = lab()?;
    lab.add_namespace("kafka", &[("team", "streams")]);
    lab.add_namespace("clients", &[("team", "apps")]);
    lab.add_namespace("other", &[("team", "other")]);
    lab.add_pod("kafka", "broker", ip("10.244.0.10"), &[("app", "kafka")], &[9092, 9093, 7777], &[5353]).unwrap();
    lab.add_pod("kafka", "exporter", ip("10.244.0.11"), &[("app", "exporter")], &[8080], &[]).unwrap();
    lab.add_pod("clients", "api", ip("10.244.0.20"), &[("app", "api")], &[8080], &[]).unwrap();
    lab.add_pod("other", "stranger", ip("10.244.0.30"), &[("app", "stranger")], &[8080], &[]).unwrap();
    lab.add_external("outside", ip("192.168.77.5")).unwrap();
    lab.add_external("outside2", ip("192.168.77.6")).unwrap();
    lab.write_cluster_manifest().unwrap();
    lab.write_manifest("p.yaml", POLICIES).unwrap();
    lab.write_manifest("remote.yaml", REMOTE).unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    wait_endpoints(&lab, 4, 20, "four pods programmed");
    wait_peer_named(&lab, "10.244.1.7");
    Some(lab)
}

/// Waits until `PEER_NAMES` names `addr` (the daemon writes it at most once a second).
fn wait_peer_named(lab: &Lab, addr: &str) {
    let t0 = Instant::now();
    loop {
        let (_, out, _) = status(lab, &lab.pin_dir, &["--pod", "kafka/broker"]);
        if out.contains(&format!("({addr})")) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{addr} not named within 10 s:\n{out}\n{}", lab.daemon_log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The rule of direction `d` whose peers hold `addr`, and that peer prefix.
fn rule_holding<'a>(d: &'a Value, addr: &str) -> (&'a Value, &'a Value) {
    let ip: IpAddr = addr.parse().unwrap();
    d["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|r| r["peers"].as_array().unwrap().iter().find(|p| in_prefix(p, ip)).map(|p| (r, p)))
        .unwrap_or_else(|| panic!("no rule holds {addr}: {d:#}"))
}

/// Peers and ports every comparison tries.
const PEERS: [&str; 8] =
    ["10.244.0.10", "10.244.0.11", "10.244.0.20", "10.244.0.30", "10.244.1.7", "192.168.77.5", "192.168.77.6", "8.8.8.8"];
const PORTS: [(&str, u16); 6] = [("TCP", 9092), ("TCP", 9093), ("TCP", 9095), ("TCP", 9096), ("UDP", 5353), ("TCP", 8080)];

/// Every peer, port and protocol: what `status --pod POD` reads from the maps gives the
/// verdict `explain` gives, in both directions. Returns the document.
fn compare_with_explain(lab: &Lab, pod: &str) -> Value {
    let doc = status_json(lab, &["--pod", pod]);
    assert_eq!(doc["endpoint"]["pod"], pod, "{doc}");
    let own = lab.pod(pod).ip.to_string();
    let mut mismatches = Vec::new();
    for peer in PEERS.iter().filter(|p| **p != own) {
        for (proto, port) in PORTS {
            let ip: IpAddr = peer.parse().unwrap();
            for (dir, from, to) in [("ingress", *peer, pod), ("egress", pod, *peer)] {
                let want = explain_verdict(lab, from, to, pod, dir, proto, port);
                let got = status_verdict(&doc[dir], ip, proto, port);
                if want != got {
                    mismatches.push(format!("{dir} {from} -> {to} {proto}/{port}: explain {want}, status {got}"));
                }
            }
        }
    }
    assert!(mismatches.is_empty(), "status disagrees with explain for {pod}:\n{}\n{doc:#}", mismatches.join("\n"));
    doc
}

#[test]
fn status_reads_what_the_compiler_intended_from_the_maps_and_keeps_reading_them_without_the_daemon() {
    let Some(mut lab) = lab_with_policies() else { return };
    // The whole node: every pod, its interface and isolation as the policies make it.
    let node = status_json(&lab, &[]);
    let eps = node["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 4, "{node:#}");
    for (pod, ingress, egress) in
        [("kafka/broker", true, false), ("clients/api", false, true), ("kafka/exporter", false, false), ("other/stranger", false, false)]
    {
        let e = eps.iter().find(|e| e["pod"] == pod).unwrap_or_else(|| panic!("no {pod}: {node:#}"));
        assert_eq!((e["isolated_ingress"].as_bool(), e["isolated_egress"].as_bool()), (Some(ingress), Some(egress)), "{pod}: {e}");
        assert_eq!(e["ifname"], lab.pod(pod).host_if.as_str(), "{e}");
        assert_eq!(e["addresses"], serde_json::json!([lab.pod(pod).ip.to_string()]), "{e}");
        assert_eq!(e["attach"], "tcx", "{e}");
        assert_eq!(e["fail_closed"], false);
    }
    // The node's own addresses: its loopback one and the pods' gateway on the veths.
    assert_eq!(node["node_addresses"], serde_json::json!([GATEWAY_IP.to_string(), NODE_IP.to_string()]));
    let fill = |doc: &Value, map: &str| doc["maps"].as_array().unwrap().iter().find(|m| m["map"] == map).cloned().unwrap();
    assert_eq!(fill(&node, "ENDPOINTS")["entries"], 4);
    assert_eq!(fill(&node, "POLICY2")["capacity"], netpol_common::POLICY_MAX);
    let policy_entries: u64 = eps.iter().map(|e| e["policy_entries"].as_u64().unwrap()).sum();
    assert_eq!(fill(&node, "POLICY2")["entries"], policy_entries, "every POLICY entry belongs to an endpoint");

    // Traffic is counted and tracked: an allowed connection into the broker.
    check(
        &lab,
        &[("api", "broker", "tcp", 9093, true), ("outside2", "broker", "tcp", 9092, true), ("outside", "broker", "tcp", 9092, false)],
    );
    let node = status_json(&lab, &[]);
    let broker = node["endpoints"].as_array().unwrap().iter().find(|e| e["pod"] == "kafka/broker").unwrap().clone();
    assert!(broker["conntrack"].as_u64().unwrap() >= 1, "{broker}");
    assert!(broker["ingress_packets"]["deny"].as_u64().unwrap() >= 1, "{broker}");
    assert!(node["conntrack"].as_u64().unwrap() >= broker["conntrack"].as_u64().unwrap());

    // Per pod, both directions: the isolated broker (ingress) and api (egress), the open stranger.
    let broker = compare_with_explain(&lab, "kafka/broker");
    compare_with_explain(&lab, "clients/api");
    let stranger = compare_with_explain(&lab, "other/stranger");
    assert_eq!(stranger["ingress"]["isolated"], false);
    assert_eq!(stranger["ingress"]["rules"], serde_json::json!([]), "a pod no policy isolates has no entries");
    // The peers are named: the local api pod (its endpoint's name) and the pod of another
    // node (PEER_NAMES), both in the class the namespace selector of the second rule makes.
    let (apps, api) = rule_holding(&broker["ingress"], "10.244.0.20");
    assert_eq!(api["pod"], "clients/api", "{apps}");
    let (same, remote) = rule_holding(&broker["ingress"], "10.244.1.7");
    assert_eq!((remote["pod"].as_str(), remote["cidr"].as_str()), (Some("clients/remote"), Some("10.244.1.7")), "{same}");
    assert_eq!(apps["identity"], same["identity"], "one class for the namespace's pods");
    let api_doc = status_json(&lab, &["--pod", "clients/api"]);
    let (_, broker_peer) = rule_holding(&api_doc["egress"], "10.244.0.10");
    assert_eq!(broker_peer["pod"], "kafka/broker");
    let (_, outside) = rule_holding(&broker["ingress"], "192.168.77.6");
    assert_eq!(outside["pod"], Value::Null, "a CIDR is no pod");
    // The except of the ipBlock is shown as the longest-prefix match decides it.
    let text = status(&lab, &lab.pin_dir, &["--pod", "kafka/broker"]).1;
    assert!(text.contains("from 192.168.77.0/24 except 192.168.77.5 (class "), "{text}");
    assert!(text.contains("): TCP 9092\n"), "{text}");
    assert!(text.contains("clients/remote (10.244.1.7)") && text.contains("clients/api (10.244.0.20)"), "{text}");
    assert!(text.contains("TCP 9093; UDP 5353"), "{text}");
    assert!(text.contains(&format!("from the node ({GATEWAY_IP}, {NODE_IP}): everything")), "{text}");
    assert!(text.contains("egress: not isolated: everything passes"), "{text}");
    let api = status(&lab, &lab.pin_dir, &["--ip", "10.244.0.20"]).1;
    assert!(api.contains("endpoint clients/api") && api.contains("TCP 9090-9095"), "{api}");
    let by_if = status_json(&lab, &["--ifname", &lab.pod("kafka/broker").host_if.clone()]);
    assert_eq!(by_if["ingress"], broker["ingress"]);
    let all = status(&lab, &lab.pin_dir, &[]).1;
    assert!(all.lines().any(|l| l.contains("kafka/broker") && l.contains("isolated") && l.contains("tcx")), "{all}");

    // A pod gone: its address leaves the class and its name the names table.
    lab.delete("remote.yaml").unwrap();
    let t0 = Instant::now();
    while fill(&status_json(&lab, &[]), "PEER_NAMES")["entries"] != 3 {
        assert!(t0.elapsed() < Duration::from_secs(10), "PEER_NAMES keeps the removed pod: {:#}", status_json(&lab, &[]));
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = status(&lab, &lab.pin_dir, &["--pod", "kafka/broker"]).1;
    assert!(text.contains("from clients/api (10.244.0.20) (class ") && !text.contains("10.244.1.7"), "{text}");
    let broker = status_json(&lab, &["--pod", "kafka/broker"]);

    // The pins outlive the daemon, and so does what status reads from them.
    lab.kill_daemon();
    let after = status_json(&lab, &["--pod", "kafka/broker"]);
    assert_eq!((&after["ingress"], &after["egress"]), (&broker["ingress"], &broker["egress"]), "after kill -9");
    assert_eq!(status_json(&lab, &[])["endpoints"].as_array().unwrap().len(), 4);

    // Selections that name nothing, and no pins at all, say so.
    let (ok, _, err) = status(&lab, &lab.pin_dir, &["--pod", "kafka/nobody"]);
    assert!(!ok && err.contains("no endpoint for pod kafka/nobody"), "{err}");
    let none = lab.pin_dir.with_file_name(format!("netpol-status-none-{}", std::process::id()));
    let (ok, out, err) = status(&lab, &none, &[]);
    assert!(!ok && out.is_empty() && err.contains("no netpol pins under"), "{out}{err}");
}

#[test]
fn status_shows_a_map_entry_changed_by_hand() {
    use aya::maps::lpm_trie::{Key, LpmTrie};
    use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
    use netpol_common::*;

    let Some(mut lab) = lab_with_policies() else { return };
    // No daemon to put the entries back.
    lab.kill_daemon();
    let doc = status_json(&lab, &["--pod", "kafka/broker"]);
    let rules = doc["ingress"]["rules"].as_array().unwrap().clone();
    let id = doc["endpoint"]["id"].as_u64().unwrap() as u32;
    let rule_with = |port: u64| {
        rules.iter().find(|r| r["allowed"]["ports"].as_array().is_some_and(|p| p.iter().any(|p| p["from"] == port))).unwrap().clone()
    };
    let outside = rule_with(9092);
    let apps = rule_with(9093);
    assert!(!allows(&outside["allowed"], "TCP", 7777));
    check(&lab, &[("outside2", "broker", "tcp", 7777, false)]);

    // Port 7777 added to the outside class's ports, and the apps class's entry deleted. The
    // outside class allows one port, held inline in its entry: the entry becomes a reference to
    // a port set of its own (no id the daemon interns) holding that port and 7777.
    let md = MapData::from_pin(lab.pin_dir.join(maps::POLICY)).unwrap();
    let mut policy: BpfHashMap<MapData, PolicyKey, PolicyValue> = BpfHashMap::try_from(Map::from_map_data(md).unwrap()).unwrap();
    let outside_key = PolicyKey { endpoint: id, identity: outside["identity"].as_u64().unwrap() as u32, dir: DIR_INGRESS, _pad: [0; 3] };
    let inline = policy.get(&outside_key, 0).unwrap();
    let (proto, port, slot) = inline.one_port().expect("the outside class allows one port, inline");
    assert_eq!((proto, port), (PROTO_TCP, 9092));
    let portset = 0x00ff_fff0;
    let md = MapData::from_pin(lab.pin_dir.join(maps::POLICY_PORTS)).unwrap();
    let mut ports: LpmTrie<MapData, PortKey, PortValue> = LpmTrie::try_from(Map::from_map_data(md).unwrap()).unwrap();
    for port in [port, 7777] {
        let key = PortKey { portset, proto: PROTO_TCP, _pad: 0, port: port.to_be_bytes() };
        ports.insert(&Key::new(PORT_KEY_FIXED_BITS + 16, key), PortValue { slot }, 0).unwrap();
    }
    let flags = inline.flags & !(POLICY_ONE_PORT | 0xff << POLICY_ONE_PORT_SLOT_SHIFT);
    policy.insert(outside_key, PolicyValue { portset, flags }, 0).unwrap();
    let identity = apps["identity"].as_u64().unwrap() as u32;
    policy.remove(&PolicyKey { endpoint: id, identity, dir: DIR_INGRESS, _pad: [0; 3] }).unwrap();

    let after = status_json(&lab, &["--pod", "kafka/broker"]);
    let rules = after["ingress"]["rules"].as_array().unwrap();
    let changed = rules.iter().find(|r| r["identity"] == outside["identity"]).unwrap();
    assert!(allows(&changed["allowed"], "TCP", 7777), "the hand-written port shows: {after:#}");
    assert!(rules.iter().all(|r| r["identity"] != apps["identity"]), "the deleted entry is gone: {after:#}");
    // The compiler never allowed either; status now disagrees with it, and the programs agree
    // with status: the api pod (apps class) falls to "any other address", which allows nothing.
    assert!(!explain_verdict(&lab, "192.168.77.6", "kafka/broker", "kafka/broker", "ingress", "TCP", 7777));
    assert!(!status_verdict(&after["ingress"], "10.244.0.20".parse().unwrap(), "TCP", 9093));
    check(
        &lab,
        &[("api", "broker", "tcp", 9093, false), ("outside2", "broker", "tcp", 9092, true), ("outside2", "broker", "tcp", 7777, true)],
    );

    // The endpoint's flags as the programs read them: audit mode by hand (what the entries
    // deny passes), then failing closed.
    let ifindex = doc["endpoint"]["ifindex"].as_u64().unwrap() as u32;
    let set_flags = |f: &dyn Fn(u32) -> u32| {
        let md = MapData::from_pin(lab.pin_dir.join(maps::ENDPOINTS_ARRAY)).unwrap();
        let mut array: Array<MapData, EndpointInfo> = Array::try_from(Map::from_map_data(md).unwrap()).unwrap();
        let mut info = array.get(&ifindex, 0).unwrap();
        assert_eq!(info.id, id, "the broker's entry is in the array");
        info.flags = f(info.flags);
        array.set(ifindex, info, 0).unwrap();
    };
    set_flags(&|f| f | EP_AUDIT_INGRESS);
    let audit = status_json(&lab, &["--pod", "kafka/broker"]);
    assert_eq!((audit["endpoint"]["audit_ingress"].as_bool(), audit["ingress"]["audit"].as_bool()), (Some(true), Some(true)), "{audit:#}");
    let text = status(&lab, &lab.pin_dir, &["--pod", "kafka/broker"]).1;
    assert!(text.contains("ingress: isolated by audit-mode policies only"), "{text}");
    assert!(status(&lab, &lab.pin_dir, &[]).1.lines().any(|l| l.contains("kafka/broker") && l.contains(" audit ")));
    check(&lab, &[("outside", "broker", "tcp", 9092, true)]);
    set_flags(&|f| (f & !EP_AUDIT_INGRESS) | EP_FAIL_CLOSED);
    let closed = status_json(&lab, &["--pod", "kafka/broker"]);
    assert_eq!((closed["endpoint"]["fail_closed"].as_bool(), closed["ingress"]["audit"].as_bool()), (Some(true), Some(false)));
    let text = status(&lab, &lab.pin_dir, &["--pod", "kafka/broker"]).1;
    assert!(text.contains("ingress: isolated, failing closed") && text.contains("fail-closed: yes"), "{text}");
    check(&lab, &[("outside", "broker", "tcp", 9092, false)]);
}

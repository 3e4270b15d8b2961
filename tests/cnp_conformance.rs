//! The ClusterNetworkPolicy conformance suite of kubernetes-sigs/network-policy-api (its 24
//! tests with all features, as data in tests/cnp-conformance, read by
//! `netpol_daemon::testkit::cnp_suite`) against the real daemon in a lab: the suite's
//! namespaces and pods (network namespaces at their world addresses, serving what the suite's
//! agnhost containers serve), centaur-1 as another node (an outside host at the node's
//! address), the daemon in manifests mode. Per upstream test: its policy files are applied,
//! its subtests run in order (each change the Go test makes is written and awaited, each
//! `PokeServer` is a real connection: TCP and UDP from sockets, SCTP as crafted INIT/INIT-ACK
//! on raw sockets), and its objects removed again. A probe must connect when the Go test
//! expects it to and time out when it does not (a refusal is a failure, as in the suite).
//!
//! Each group of tests is one #[test] with its own lab and daemon (groups run in parallel);
//! each prints a table of its tests and subtests, written also to
//! `$CARGO_TARGET_TMPDIR/cnp-conformance/GROUP.md`.
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use netpol_daemon::metrics::sample;
use netpol_daemon::testkit::cnp_suite::{data_dir, load_tests, read_documents, world_pods, Mutation, Probe, Proto, State, Step, SuiteTest};
use netpol_daemon::testkit::lab::{Lab, Reach, NODE_NAME};
use serde_json::Value;

mod common;
use common::DAEMON;

/// The suite waits 3 s for a connection (`RequestTimeout`); the lab answers in milliseconds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// As the suite's `PokeServer`: retried until it matches (the suite: 10 s, every 500 ms), then
/// once more to rule out a transient result.
const POKE_TIMEOUT: Duration = Duration::from_secs(3);
const POKE_INTERVAL: Duration = Duration::from_millis(250);

const WORLD_FILE: &str = "00-world.yaml";
const TEST_FILE: &str = "10-test.yaml";

/// The #[test]s below and the upstream tests each runs, in order.
const GROUPS: [(&str, &[&str]); 7] = [
    (
        "admin_tier_ingress",
        &["CNPAdminTierIngressTCP", "CNPAdminTierIngressUDP", "CNPAdminTierIngressSCTP", "CNPAdminTierIngressNamedPort"],
    ),
    (
        "admin_tier_egress",
        &[
            "CNPAdminTierEgressTCP",
            "CNPAdminTierEgressUDP",
            "CNPAdminTierEgressSCTP",
            "CNPAdminTierEgressNamedPort",
            "CNPAdminTierEgressNodePeers",
        ],
    ),
    ("admin_tier_gress_and_cidr_peers", &["CNPAdminTierGress", "CNPAdminTierEgressInlineCIDRPeers"]),
    ("admin_tier_priority_and_integration", &["CNPAdminTierPriorityField", "CNPAdminTierIntegration"]),
    (
        "baseline_tier_ingress",
        &["CNPBaselineTierIngressTCP", "CNPBaselineTierIngressUDP", "CNPBaselineTierIngressSCTP", "CNPBaselineTierIngressNamedPort"],
    ),
    (
        "baseline_tier_egress",
        &[
            "CNPBaselineTierEgressTCP",
            "CNPBaselineTierEgressUDP",
            "CNPBaselineTierEgressSCTP",
            "CNPBaselineTierEgressNamedPort",
            "CNPBaselineTierEgressNodePeers",
        ],
    ),
    ("baseline_tier_gress_and_cidr_peers", &["CNPBaselineTierGress", "CNPBaselineTierEgressInlineCIDRPeers"]),
];

#[test]
fn admin_tier_ingress() {
    run_group("admin_tier_ingress");
}

#[test]
fn admin_tier_egress() {
    run_group("admin_tier_egress");
}

#[test]
fn admin_tier_gress_and_cidr_peers() {
    run_group("admin_tier_gress_and_cidr_peers");
}

#[test]
fn admin_tier_priority_and_integration() {
    run_group("admin_tier_priority_and_integration");
}

#[test]
fn baseline_tier_ingress() {
    run_group("baseline_tier_ingress");
}

#[test]
fn baseline_tier_egress() {
    run_group("baseline_tier_egress");
}

#[test]
fn baseline_tier_gress_and_cidr_peers() {
    run_group("baseline_tier_gress_and_cidr_peers");
}

/// Every upstream test runs in exactly one group (no root needed).
#[test]
fn the_groups_run_every_test_of_the_suite_once() {
    let mut grouped: Vec<&str> = GROUPS.iter().flat_map(|(_, tests)| tests.iter().copied()).collect();
    grouped.sort();
    let all: Vec<String> = load_tests(&data_dir()).unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(grouped, all);
}

/// The crafted SCTP probes see what the datapath decides (with a NetworkPolicy, which this
/// daemon enforces whatever the state of ClusterNetworkPolicy): answered where allowed, no
/// answer where denied; TCP and UDP likewise, and the reference evaluator agrees.
#[test]
fn the_probes_see_networkpolicy_verdicts() {
    let world = read_documents(&data_dir().join("world.yaml")).unwrap();
    let Some(lab) = world_lab(&world) else { return };
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: sctp-9003-from-gryffindor, namespace: network-policy-conformance-ravenclaw}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {conformance-house: gryffindor}}}]\n    ports: [{protocol: SCTP, port: 9003}, {protocol: UDP, port: 53}]\n";
    lab.apply(TEST_FILE, policy).unwrap();
    let state = State::new(world.clone(), vec![serde_norway::from_str(policy).unwrap()]);
    let (cluster, errors) = state.cluster().unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let probes = [
        "harry-potter-0 -> luna-lovegood-0 sctp/9003 allow",
        "harry-potter-1 -> luna-lovegood-1 sctp/9005 deny",
        "draco-malfoy-0 -> luna-lovegood-0 sctp/9003 deny",
        "harry-potter-0 -> luna-lovegood-1 udp/53 allow",
        "harry-potter-0 -> luna-lovegood-1 tcp/80 deny",
        "luna-lovegood-0 -> draco-malfoy-1 sctp/9005 allow",
        "harry-potter-1 -> centaur-1 sctp/34351 allow",
    ];
    let mut failures = Vec::new();
    for line in probes {
        let p = Probe::parse(line).unwrap();
        assert_eq!(state.reference(&cluster, &p).unwrap(), p.allow, "reference: {line}");
        let row = poke_all(&lab, &state, 0, vec![&p]).pop().unwrap();
        if !row.passed() {
            failures.push(format!("{line}: observed {}", row.got));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", lab.daemon_log());
}

/// One probe's outcome.
struct Row {
    subtest: usize,
    probe: Probe,
    got: Reach,
}

impl Row {
    fn passed(&self) -> bool {
        passes(self.probe.allow, &self.got)
    }
}

fn passes(allow: bool, got: &Reach) -> bool {
    if allow {
        *got == Reach::Connected
    } else {
        *got == Reach::Timeout
    }
}

/// One upstream test's run: its rows, and the manifest errors the daemon reported with its
/// objects applied.
struct Outcome {
    test: SuiteTest,
    rows: Vec<Row>,
    manifest_errors: f64,
}

fn run_group(group: &str) {
    let names = GROUPS.iter().find(|(g, _)| *g == group).expect("a group").1;
    let tests = load_tests(&data_dir()).unwrap();
    let world = read_documents(&data_dir().join("world.yaml")).unwrap();
    let Some(lab) = world_lab(&world) else { return };
    let t0 = Instant::now();
    let outcomes: Vec<Outcome> = names
        .iter()
        .map(|n| {
            let t = tests.iter().find(|t| t.name == *n).unwrap_or_else(|| panic!("no test {n} in the suite's data"));
            run_test(&lab, &world, t)
        })
        .collect();
    let table = table(group, &outcomes, t0.elapsed());
    println!("{table}");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cnp-conformance");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{group}.md")), &table).unwrap();
    let failed: usize = outcomes.iter().map(|o| o.rows.iter().filter(|r| !r.passed()).count()).sum();
    if failed > 0 {
        let log = lab.daemon_log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "{failed} probes of {group} failed:\n{table}\n--- daemon log (last lines) ---\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

/// The lab of the suite's world with the daemon running on it; None (said why) without root.
fn world_lab(world: &[Value]) -> Option<Lab> {
    let mut lab = common::lab()?;
    for p in world_pods(world).unwrap() {
        let labels: Vec<(&str, &str)> = p.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (tcp, udp, sctp) = (p.ports(Proto::Tcp), p.ports(Proto::Udp), p.ports(Proto::Sctp));
        if !p.host_network {
            assert_eq!(p.node, NODE_NAME, "world pod {} must run on the lab's node", p.name);
            lab.add_pod(&p.namespace, &p.name, p.ip, &labels, &tcp, &udp).unwrap();
        } else if p.serves.is_empty() {
            // A host-network pod the tests do not probe (centaur-0 on the lab's node).
            continue;
        } else {
            // A host-network server on another node: that node, as an outside host.
            assert_ne!(p.node, NODE_NAME, "{}: a probed host-network pod is on another node", p.name);
            lab.add_external_serving(&p.name, p.ip, &tcp, &udp).unwrap();
        }
        if !sctp.is_empty() {
            lab.serve_sctp(&p.name, &sctp).unwrap();
        }
    }
    lab.write_manifest(WORLD_FILE, &State::new(world.to_vec(), vec![]).world_yaml()).unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    Some(lab)
}

/// Applies the test's manifests, runs its subtests in order, removes its objects (and any
/// change to the world) again.
fn run_test(lab: &Lab, world: &[Value], t: &SuiteTest) -> Outcome {
    let mut state = State::new(world.to_vec(), t.objects(&data_dir()).unwrap());
    lab.apply(TEST_FILE, &state.objects_yaml()).unwrap();
    let manifest_errors = lab.metrics().ok().and_then(|m| sample(&m, "netpol_manifest_errors")).unwrap_or(-1.0);
    let mut rows = Vec::new();
    for (i, st) in t.subtests.iter().enumerate() {
        let mut batch: Vec<&Probe> = Vec::new();
        for step in &st.steps {
            match step {
                Step::Probe(p) => batch.push(p),
                Step::Mutate(m) => {
                    rows.extend(poke_all(lab, &state, i, std::mem::take(&mut batch)));
                    state.apply(m).unwrap_or_else(|e| panic!("{} / {}: {e:#}", t.name, st.name));
                    write_change(lab, &state, m);
                }
            }
        }
        rows.extend(poke_all(lab, &state, i, batch));
    }
    lab.delete(TEST_FILE).unwrap();
    if state.world != world {
        lab.apply(WORLD_FILE, &State::new(world.to_vec(), vec![]).world_yaml()).unwrap();
    }
    Outcome { test: t.clone(), rows, manifest_errors }
}

/// Writes what a change touched and waits until the daemon has applied it.
fn write_change(lab: &Lab, state: &State, m: &Mutation) {
    match m {
        Mutation::NamespaceLabels { .. } => lab.apply(WORLD_FILE, &state.world_yaml()).unwrap(),
        _ => lab.apply(TEST_FILE, &state.objects_yaml()).unwrap(),
    }
}

/// Runs consecutive probes at once (each is its own connection; the Go test makes them one
/// after the other, with nothing changing in between).
fn poke_all(lab: &Lab, state: &State, subtest: usize, probes: Vec<&Probe>) -> Vec<Row> {
    std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .into_iter()
            .map(|p| {
                let dst = match state.pod_ip(&p.to).unwrap() {
                    IpAddr::V4(a) => a,
                    IpAddr::V6(a) => panic!("{p}: the lab probes IPv4 ({a})"),
                };
                s.spawn(move || Row { subtest, probe: p.clone(), got: poke(lab, p, dst) })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// `PokeServer`: until the expected outcome (or [`POKE_TIMEOUT`]), then once more.
fn poke(lab: &Lab, p: &Probe, dst: Ipv4Addr) -> Reach {
    let deadline = Instant::now() + POKE_TIMEOUT;
    loop {
        let got = connect(lab, p, dst);
        if passes(p.allow, &got) {
            return connect(lab, p, dst);
        }
        if Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(POKE_INTERVAL);
    }
}

fn connect(lab: &Lab, p: &Probe, dst: Ipv4Addr) -> Reach {
    match p.proto {
        Proto::Tcp => lab.reach(&p.from, false, dst, p.port, REQUEST_TIMEOUT),
        Proto::Udp => lab.reach(&p.from, true, dst, p.port, REQUEST_TIMEOUT),
        Proto::Sctp => lab.sctp_reach(&p.from, dst, p.port, REQUEST_TIMEOUT),
    }
}

/// A Markdown table: one line per subtest (its probes passed), then every failed probe.
fn table(group: &str, outcomes: &[Outcome], took: Duration) -> String {
    let mut out =
        format!("## cnp_conformance {group} ({:.0} s)\n\n| Test | Subtest | Probes | Result |\n|---|---|---|---|\n", took.as_secs_f64());
    let mut failures = String::new();
    for o in outcomes {
        for (i, st) in o.test.subtests.iter().enumerate() {
            let rows: Vec<&Row> = o.rows.iter().filter(|r| r.subtest == i).collect();
            let ok = rows.iter().filter(|r| r.passed()).count();
            let result = if ok == rows.len() { "pass" } else { "FAIL" };
            let _ = writeln!(out, "| {} | {} | {ok}/{} | {result} |", o.test.name, st.name, rows.len());
            for r in rows.iter().filter(|r| !r.passed()) {
                let want = if r.probe.allow { "allow (connected)" } else { "deny (timeout)" };
                let _ = writeln!(failures, "- {} / {}: {}: expected {want}, observed {}", o.test.name, st.name, r.probe, r.got);
            }
        }
        if o.manifest_errors != 0.0 {
            let _ = writeln!(failures, "- {}: the daemon reported {} manifest errors with its objects", o.test.name, o.manifest_errors);
        }
    }
    if !failures.is_empty() {
        out.push_str("\nFailed:\n\n");
        out.push_str(&failures);
    }
    out
}

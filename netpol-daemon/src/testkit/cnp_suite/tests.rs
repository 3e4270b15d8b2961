//! The suite's data checked without root: complete (24 tests, 92 subtests, as upstream at
//! 0eec1b0), consistent with the world, and every probe's expectation (the Go test's) what the
//! reference evaluator decides at that step.
use serde_json::json;

use super::*;

fn world() -> Vec<Value> {
    read_documents(&data_dir().join("world.yaml")).unwrap()
}

fn tests() -> Vec<SuiteTest> {
    load_tests(&data_dir()).unwrap()
}

/// The suite's ConformanceTests at 0eec1b0 (conformance/tests/*.go) and their t.Run counts.
const UPSTREAM: [(&str, usize); 24] = [
    ("CNPAdminTierEgressInlineCIDRPeers", 2),
    ("CNPAdminTierEgressNamedPort", 1),
    ("CNPAdminTierEgressNodePeers", 3),
    ("CNPAdminTierEgressSCTP", 6),
    ("CNPAdminTierEgressTCP", 6),
    ("CNPAdminTierEgressUDP", 6),
    ("CNPAdminTierGress", 6),
    ("CNPAdminTierIngressNamedPort", 1),
    ("CNPAdminTierIngressSCTP", 6),
    ("CNPAdminTierIngressTCP", 6),
    ("CNPAdminTierIngressUDP", 6),
    ("CNPAdminTierIntegration", 6),
    ("CNPAdminTierPriorityField", 3),
    ("CNPBaselineTierEgressInlineCIDRPeers", 2),
    ("CNPBaselineTierEgressNamedPort", 1),
    ("CNPBaselineTierEgressNodePeers", 2),
    ("CNPBaselineTierEgressSCTP", 4),
    ("CNPBaselineTierEgressTCP", 4),
    ("CNPBaselineTierEgressUDP", 4),
    ("CNPBaselineTierGress", 4),
    ("CNPBaselineTierIngressNamedPort", 1),
    ("CNPBaselineTierIngressSCTP", 4),
    ("CNPBaselineTierIngressTCP", 4),
    ("CNPBaselineTierIngressUDP", 4),
];

#[test]
fn every_upstream_test_and_subtest_is_transcribed() {
    let got: Vec<(String, usize)> = tests().iter().map(|t| (t.name.clone(), t.subtests.len())).collect();
    let want: Vec<(String, usize)> = UPSTREAM.iter().map(|(n, s)| (n.to_string(), *s)).collect();
    assert_eq!(got, want);
    assert_eq!(got.iter().map(|(_, n)| n).sum::<usize>(), 92);
}

/// Probes go from a pod-network pod to a port its target serves; mutations name objects that
/// exist; every manifest converts without a problem.
#[test]
fn the_data_is_consistent_with_the_world() {
    let world = world();
    let pods = world_pods(&world).unwrap();
    let pod = |n: &str| pods.iter().find(|p| p.name == n).unwrap_or_else(|| panic!("no world pod {n}"));
    for t in tests() {
        assert!(t.features.contains(&"ClusterNetworkPolicy".to_string()), "{}", t.name);
        let mut state = State::new(world.clone(), t.objects(&data_dir()).unwrap());
        for st in &t.subtests {
            for step in &st.steps {
                match step {
                    Step::Probe(p) => {
                        assert!(!pod(&p.from).host_network, "{}: {p}: the client is a pod", t.name);
                        assert!(pod(&p.to).serves.contains(&(p.proto, p.port)), "{}: {p}: not served", t.name);
                    }
                    Step::Mutate(m) => state.apply(m).unwrap_or_else(|e| panic!("{} / {}: {e:#}", t.name, st.name)),
                }
            }
        }
    }
}

#[test]
fn the_reference_evaluator_agrees_with_every_probe() {
    let world = world();
    let mut failures = Vec::new();
    let mut probes = 0;
    for t in tests() {
        let mut state = State::new(world.clone(), t.objects(&data_dir()).unwrap());
        for st in &t.subtests {
            for step in &st.steps {
                let p = match step {
                    Step::Mutate(m) => {
                        state.apply(m).unwrap();
                        continue;
                    }
                    Step::Probe(p) => p,
                };
                let (c, errors) = state.cluster().unwrap();
                assert!(errors.is_empty(), "{} / {}: {errors:#?}", t.name, st.name);
                probes += 1;
                if state.reference(&c, p).unwrap() != p.allow {
                    failures.push(format!("{} / {}: {p}: the test expects {}", t.name, st.name, verdict(p.allow)));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {probes} probes disagree:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(probes, 301);
}

fn verdict(allow: bool) -> &'static str {
    if allow {
        "allow"
    } else {
        "deny"
    }
}

fn cnp() -> Value {
    json!({"kind": "ClusterNetworkPolicy", "metadata": {"name": "p"}, "spec": {"priority": 1, "egress": [{"name": "a"}, {"name": "b"}]}})
}

#[test]
fn mutations_edit_the_named_object_at_the_path() {
    let ns = json!({"kind": "Namespace", "metadata": {"name": "n", "labels": {"a": "1", "b": "2"}}});
    let pod = json!({"kind": "Pod", "metadata": {"name": "x"}, "status": {"podIP": "10.0.0.9"}});
    let np = json!({"kind": "NetworkPolicy", "metadata": {"name": "np", "namespace": "n"}});
    let mut s = State::new(vec![ns, pod], vec![cnp(), np]);
    let step = |s: &mut State, yaml: &str| {
        let Step::Mutate(m) = parse_step(&serde_norway::from_str(yaml).unwrap()).unwrap() else { panic!("{yaml}") };
        s.apply(&m)
    };
    step(&mut s, "{policy: p, swap: ['spec.egress[0]', 'spec.egress[1]']}").unwrap();
    assert_eq!(s.policy("p").unwrap()["spec"]["egress"], json!([{"name": "b"}, {"name": "a"}]));
    step(&mut s, "{policy: p, set: spec.priority, value: 40}").unwrap();
    step(&mut s, "{policy: p, set: 'spec.egress[1].action', value: Pass}").unwrap();
    step(&mut s, "{policy: p, insert: 'spec.egress[0]', value: {to: ['{{ podIP x }}/32']}}").unwrap();
    assert_eq!(
        s.policy("p").unwrap()["spec"],
        json!({"priority": 40, "egress": [{"to": ["10.0.0.9/32"]}, {"name": "b"}, {"name": "a", "action": "Pass"}]})
    );
    step(&mut s, "{namespace: n, labels: {c: '3'}}").unwrap();
    assert_eq!(s.world[0]["metadata"]["labels"], json!({"c": "3"}));
    step(&mut s, "{delete: NetworkPolicy, namespace: n, name: np}").unwrap();
    assert!(!s.has_kind("NetworkPolicy"));
    for (bad, why) in [
        ("{delete: NetworkPolicy, namespace: n, name: np}", "no NetworkPolicy n/np"),
        ("{policy: q, set: spec.priority, value: 1}", "no ClusterNetworkPolicy q"),
        ("{policy: p, swap: ['spec.egress[0]', 'spec.egress[7]']}", "spec.egress[7]: not found"),
        ("{policy: p, insert: 'spec.egress[9]', value: 1}", "not an array index"),
        ("{policy: p, insert: 'spec.egress[0]', value: '{{ podIP nobody }}'}", "no pod nobody"),
    ] {
        let e = format!("{:#}", step(&mut s, bad).unwrap_err());
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn steps_and_probes_are_read_strictly() {
    let p = Probe::parse("luna-lovegood-0 -> harry-potter-0 sctp/9003 deny").unwrap();
    assert_eq!(p, Probe { from: "luna-lovegood-0".into(), to: "harry-potter-0".into(), proto: Proto::Sctp, port: 9003, allow: false });
    assert_eq!(p.to_string(), "luna-lovegood-0 -> harry-potter-0 sctp/9003");
    for bad in ["a -> b tcp/80", "a b tcp/80 allow", "a -> b icmp/1 allow", "a -> b tcp/x allow", "a -> b tcp/80 maybe"] {
        assert!(Probe::parse(bad).is_err(), "{bad}");
    }
    let map = |y: &str| -> BTreeMap<String, Value> { serde_norway::from_str(y).unwrap() };
    assert!(parse_step(&map("{policy: p, swap: [a]}")).is_err());
    assert!(parse_step(&map("{policy: p, frobnicate: a}")).is_err());
    assert!(parse_test("test: x\nsource: y\nfeatures: []\nmanifests: []\nsubtests: []\nextra: 1\n").is_err());
}

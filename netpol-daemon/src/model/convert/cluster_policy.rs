//! ClusterNetworkPolicies (policy.networking.k8s.io/v1alpha2) from their JSON: there is no
//! typed API object for them, so the few serde structs of the v1alpha2 schema are here, each
//! field read on its own so that a problem is reported at its path. Unknown fields are
//! ignored, as the API server prunes them from a custom resource; a peer left with no field
//! (one of a newer API version, pruned) fails closed, as the API asks of implementations, and
//! so does a `domainNames` peer, which netpol does not support.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::Errs;
use crate::model::{cidr, Action, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, FieldError, PodSet, Protocol, Selector, Tier};

pub const CLUSTER_POLICY_KIND: &str = "ClusterNetworkPolicy";
pub const CLUSTER_POLICY_API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";
/// Where the API server serves them once their CRD (optional: deploy/crds) is installed:
/// group, version and resource (cluster-scoped).
pub const CLUSTER_POLICY_GROUP: &str = "policy.networking.k8s.io";
pub const CLUSTER_POLICY_VERSION: &str = "v1alpha2";
pub const CLUSTER_POLICY_PLURAL: &str = "clusternetworkpolicies";

/// Appended to a ClusterNetworkPolicy's validation errors where they are reported.
pub const CLUSTER_FAIL_CLOSED_NOTE: &str =
    " (enforced fail-closed: the rule at fault, or every rule for a problem of the policy itself, matches nothing if it accepts, and denies all traffic if it denies or passes)";

/// The most items of each list the API allows (rules, peers, protocols, networks).
const MAX_ITEMS: usize = 25;
const MAX_RULE_NAME: usize = 100;
const MAX_PRIORITY: i64 = 1000;

/// A ClusterNetworkPolicy as enforced, with what was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvertedClusterPolicy {
    pub policy: ClusterPolicy,
    /// Validation errors (each names the object and field); each made the rule at fault, or
    /// all the rules, fail closed.
    pub errors: Vec<FieldError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiSubject {
    namespaces: Option<LabelSelector>,
    pods: Option<ApiNamespacedPod>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiNamespacedPod {
    namespace_selector: Option<LabelSelector>,
    pod_selector: Option<LabelSelector>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiRule {
    name: Option<String>,
    action: Option<String>,
    from: Option<Vec<Value>>,
    to: Option<Vec<Value>>,
    protocols: Option<Vec<Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiPeer {
    namespaces: Option<LabelSelector>,
    pods: Option<ApiNamespacedPod>,
    networks: Option<Vec<String>>,
    nodes: Option<LabelSelector>,
    domain_names: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiProtocol {
    tcp: Option<ApiProtocolPort>,
    udp: Option<ApiProtocolPort>,
    sctp: Option<ApiProtocolPort>,
    destination_named_port: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiProtocolPort {
    destination_port: Option<ApiPort>,
}

#[derive(Deserialize)]
struct ApiPort {
    number: Option<i64>,
    range: Option<ApiRange>,
}

#[derive(Deserialize)]
struct ApiRange {
    start: Option<i64>,
    end: Option<i64>,
}

/// Reads `v` at `path` as a `T`, reporting a value of the wrong shape there.
fn read<T: DeserializeOwned>(errs: &mut Errs, path: &str, v: &Value) -> Option<T> {
    serde_json::from_value(v.clone()).map_err(|e| errs.push(path, e.to_string())).ok()
}

/// The `metadata.name` of a cluster-scoped object; `None` when absent or empty.
fn object_name(value: &Value) -> Option<&str> {
    value.get("metadata")?.get("name")?.as_str().filter(|n| !n.is_empty())
}

/// Validates and converts a ClusterNetworkPolicy's JSON. Every problem is reported.
///
/// The policy is never dropped for a problem (that would leave open what it was meant to
/// deny: fail open). A rule at fault, or one netpol cannot enforce (a `domainNames` peer),
/// takes its fail-closed form ([`ClusterRule::fail_closed`]); a problem
/// of the policy itself (tier, priority, subject, spec) puts every rule in that form, with
/// an unreadable tier taken as Admin, an unreadable priority as 0 (first) and an unreadable
/// subject as every pod. Only a policy without a name (which cannot be keyed) is an error
/// without a policy.
pub fn cluster_policy_from_json(value: &Value) -> Result<ConvertedClusterPolicy, Vec<FieldError>> {
    let Some(name) = object_name(value) else {
        let field = "metadata.name".to_string();
        return Err(vec![FieldError { object: "<unnamed>".into(), field, message: "is required".into() }]);
    };
    let mut errs = Errs { object: name, list: vec![] };
    match value.get("apiVersion").and_then(|v| v.as_str()) {
        None | Some(CLUSTER_POLICY_API_VERSION) => {}
        Some(other) => errs.push("apiVersion", format!("{other:?} is not {CLUSTER_POLICY_API_VERSION:?}, the version netpol reads")),
    }
    let null = Value::Null;
    let spec = value.get("spec").unwrap_or(&null);
    if !spec.is_object() {
        errs.push("spec", "is required (an object)");
    }
    let tier = tier(&mut errs, spec.get("tier"));
    let priority = priority(&mut errs, spec.get("priority"));
    let subject = subject(&mut errs, spec.get("subject"));
    let ingress = rules(&mut errs, spec.get("ingress"), "spec.ingress", "from");
    let egress = rules(&mut errs, spec.get("egress"), "spec.egress", "to");
    // A problem outside the rules (whose paths hold `ingress[`/`egress[`) is one of the policy.
    let of_object = errs.list.iter().any(|e| !e.field.contains("gress["));
    let fail_all = |rules: Vec<(ClusterRule, Option<Action>)>| -> Vec<ClusterRule> {
        rules.into_iter().map(|(r, action)| if of_object { ClusterRule::fail_closed(r.name, action) } else { r }).collect()
    };
    let policy = ClusterPolicy {
        name: name.to_string(),
        tier: tier.unwrap_or(Tier::Admin),
        priority: priority.unwrap_or(0),
        subject: subject.unwrap_or(PodSet { namespaces: Selector::everything(), pods: Selector::everything() }),
        ingress: fail_all(ingress),
        egress: fail_all(egress),
        invalid: errs.list.first().map(|e| e.to_string()),
    };
    Ok(ConvertedClusterPolicy { policy, errors: errs.list })
}

fn tier(errs: &mut Errs, v: Option<&Value>) -> Option<Tier> {
    let Some(v) = v else {
        errs.push("spec.tier", "is required (Admin or Baseline)");
        return None;
    };
    let s: String = read(errs, "spec.tier", v)?;
    let t = Tier::parse(&s);
    if t.is_none() {
        errs.push("spec.tier", format!("unknown tier {s:?} (want Admin or Baseline)"));
    }
    t
}

fn priority(errs: &mut Errs, v: Option<&Value>) -> Option<u16> {
    let Some(v) = v else {
        errs.push("spec.priority", "is required (0-1000)");
        return None;
    };
    let n: i64 = read(errs, "spec.priority", v)?;
    if !(0..=MAX_PRIORITY).contains(&n) {
        errs.push("spec.priority", format!("{n} is not in 0-{MAX_PRIORITY}"));
        return None;
    }
    Some(n as u16)
}

fn selector(errs: &mut Errs, path: &str, sel: Option<&LabelSelector>) -> Option<Selector> {
    match sel {
        None => Some(Selector::everything()),
        Some(s) => Selector::from_k8s(s).map_err(|(sub, msg)| errs.push(format!("{path}{sub}"), msg)).ok(),
    }
}

/// `pods`: a namespace selector (absent or empty: every namespace) and a required pod selector.
fn namespaced_pods(errs: &mut Errs, path: &str, p: &ApiNamespacedPod) -> Option<PodSet> {
    let namespaces = selector(errs, &format!("{path}.namespaceSelector"), p.namespace_selector.as_ref());
    let pods = match &p.pod_selector {
        None => {
            errs.push(format!("{path}.podSelector"), "is required");
            None
        }
        Some(s) => selector(errs, &format!("{path}.podSelector"), Some(s)),
    };
    Some(PodSet { namespaces: namespaces?, pods: pods? })
}

fn subject(errs: &mut Errs, v: Option<&Value>) -> Option<PodSet> {
    let path = "spec.subject";
    let Some(v) = v else {
        errs.push(path, "is required (namespaces or pods)");
        return None;
    };
    let s: ApiSubject = read(errs, path, v)?;
    match (&s.namespaces, &s.pods) {
        (Some(ns), None) => {
            let namespaces = selector(errs, &format!("{path}.namespaces"), Some(ns))?;
            Some(PodSet { namespaces, pods: Selector::everything() })
        }
        (None, Some(p)) => namespaced_pods(errs, &format!("{path}.pods"), p),
        (Some(_), Some(_)) => {
            errs.push(path, "must set exactly one of namespaces or pods, not both");
            None
        }
        (None, None) => {
            errs.push(path, "must set one of namespaces or pods");
            None
        }
    }
}

/// A list field of at most [`MAX_ITEMS`] items, at least one when `required`.
fn list<'a, T>(errs: &mut Errs, path: &str, items: Option<&'a [T]>, required: bool) -> &'a [T] {
    let items = items.unwrap_or_default();
    if items.is_empty() && required {
        errs.push(path, "must have at least one item");
    } else if items.len() > MAX_ITEMS {
        errs.push(path, format!("has {} items; at most {MAX_ITEMS} are allowed", items.len()));
    }
    items
}

/// The rules of `spec.ingress` or `spec.egress`, each with the action it was written with
/// (for the fail-closed form of every rule when the policy itself is at fault).
fn rules(errs: &mut Errs, v: Option<&Value>, path: &str, peer_field: &str) -> Vec<(ClusterRule, Option<Action>)> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return vec![] };
    // An unreadable list: one rule of unknown action, denying all traffic of the direction.
    let Some(items) = read::<Vec<Value>>(errs, path, v) else { return vec![(ClusterRule::fail_closed(None, None), None)] };
    if items.len() > MAX_ITEMS {
        errs.push(path, format!("has {} rules; at most {MAX_ITEMS} are allowed", items.len()));
    }
    items.iter().enumerate().map(|(i, r)| rule(errs, &format!("{path}[{i}]"), r, peer_field)).collect()
}

/// One rule: as written when valid, else in its fail-closed form.
fn rule(errs: &mut Errs, path: &str, v: &Value, peer_field: &str) -> (ClusterRule, Option<Action>) {
    let before = errs.list.len();
    // The action alone first: a rule of the wrong shape still fails closed as its action says.
    let written = v.get("action").and_then(|a| a.as_str()).and_then(Action::parse);
    let Some(r) = read::<ApiRule>(errs, path, v) else { return (ClusterRule::fail_closed(None, written), written) };
    if r.name.as_ref().is_some_and(|n| n.chars().count() > MAX_RULE_NAME) {
        errs.push(format!("{path}.name"), format!("is longer than {MAX_RULE_NAME} characters"));
    }
    let action = match r.action.as_deref() {
        None => {
            errs.push(format!("{path}.action"), "is required (Accept, Deny or Pass)");
            None
        }
        Some(a) => Action::parse(a).or_else(|| {
            errs.push(format!("{path}.action"), format!("unknown action {a:?} (want Accept, Deny or Pass)"));
            None
        }),
    };
    let egress = peer_field == "to";
    let raw_peers = if egress { r.to.as_deref() } else { r.from.as_deref() };
    let peers_path = format!("{path}.{peer_field}");
    let raw_peers = list(errs, &peers_path, raw_peers, true);
    let peers: Vec<Option<ClusterPeer>> =
        raw_peers.iter().enumerate().map(|(i, p)| peer(errs, &format!("{peers_path}[{i}]"), p, egress)).collect();
    let ports = r.protocols.as_deref().map(|ps| {
        let ps = list(errs, &format!("{path}.protocols"), Some(ps), true);
        ps.iter().enumerate().filter_map(|(i, p)| port(errs, &format!("{path}.protocols[{i}]"), p)).collect::<Vec<_>>()
    });
    let named = ports.iter().flatten().any(|p| matches!(p, ClusterPort::Named(_)));
    let not_pods = raw_peers.iter().any(|p| ["networks", "nodes", "domainNames"].iter().any(|f| p.get(*f).is_some()));
    if egress && named && not_pods {
        errs.push(
            path,
            "networks/nodes/domainNames peer cannot be set with namedPorts since there are no namedPorts for networks/nodes/domainNames",
        );
    }
    let name = r.name;
    match action {
        Some(a) if errs.list.len() == before => {
            (ClusterRule { name, action: a, peers: peers.into_iter().flatten().collect(), ports }, action)
        }
        _ => (ClusterRule::fail_closed(name, action), action),
    }
}

/// One peer. Ingress peers have only `namespaces` and `pods` (any other field of a manifest
/// is one the API server would prune); `domainNames` is not supported by netpol.
fn peer(errs: &mut Errs, path: &str, v: &Value, egress: bool) -> Option<ClusterPeer> {
    let mut p: ApiPeer = read(errs, path, v)?;
    if !egress {
        (p.networks, p.nodes, p.domain_names) = (None, None, None);
    }
    let set = [p.namespaces.is_some(), p.pods.is_some(), p.networks.is_some(), p.nodes.is_some(), p.domain_names.is_some()];
    let fields = if egress { "namespaces, pods, networks, nodes or domainNames" } else { "namespaces or pods" };
    match set.iter().filter(|s| **s).count() {
        0 => {
            errs.push(path, format!("sets none of {fields} (a field of another API version?)"));
            return None;
        }
        1 => {}
        _ => {
            errs.push(path, format!("must set exactly one of {fields}"));
            return None;
        }
    }
    if p.domain_names.is_some() {
        errs.push(format!("{path}.domainNames"), "domain name peers are not supported by netpol");
        return None;
    }
    if let Some(ns) = &p.namespaces {
        let namespaces = selector(errs, &format!("{path}.namespaces"), Some(ns))?;
        return Some(ClusterPeer::Pods(PodSet { namespaces, pods: Selector::everything() }));
    }
    if let Some(pods) = &p.pods {
        return namespaced_pods(errs, &format!("{path}.pods"), pods).map(ClusterPeer::Pods);
    }
    if let Some(nodes) = &p.nodes {
        return selector(errs, &format!("{path}.nodes"), Some(nodes)).map(ClusterPeer::Nodes);
    }
    let path = format!("{path}.networks");
    let networks = list(errs, &path, p.networks.as_deref(), true);
    let before = errs.list.len();
    let nets: Vec<_> = networks
        .iter()
        .enumerate()
        .filter_map(|(i, n)| cidr::parse_api(n).map(|(c, _)| c).map_err(|e| errs.push(format!("{path}[{i}]"), e)).ok())
        .collect();
    (errs.list.len() == before && !nets.is_empty()).then_some(ClusterPeer::Networks(nets))
}

/// One entry of `protocols`: exactly one of `tcp`, `udp`, `sctp` (each with its
/// `destinationPort`) or `destinationNamedPort`.
fn port(errs: &mut Errs, path: &str, v: &Value) -> Option<ClusterPort> {
    let p: ApiProtocol = read(errs, path, v)?;
    let mut set: Vec<(&str, Option<Protocol>, &ApiProtocolPort)> = Vec::new();
    for (field, proto, pp) in [("tcp", Protocol::Tcp, &p.tcp), ("udp", Protocol::Udp, &p.udp), ("sctp", Protocol::Sctp, &p.sctp)] {
        if let Some(pp) = pp {
            set.push((field, Some(proto), pp));
        }
    }
    let named = p.destination_named_port.as_deref();
    match (set.len() + usize::from(named.is_some()), named) {
        (1, Some("")) => {
            errs.push(format!("{path}.destinationNamedPort"), "must not be empty");
            None
        }
        (1, Some(n)) => Some(ClusterPort::Named(n.to_string())),
        (1, None) => {
            let (field, proto, pp) = set[0];
            port_range(errs, &format!("{path}.{field}"), proto?, pp)
        }
        (0, _) => {
            errs.push(path, "sets none of tcp, udp, sctp or destinationNamedPort");
            None
        }
        _ => {
            errs.push(path, "must set exactly one of tcp, udp, sctp or destinationNamedPort");
            None
        }
    }
}

fn port_number(errs: &mut Errs, path: &str, n: Option<i64>) -> Option<u16> {
    match n {
        None => {
            errs.push(path, "is required");
            None
        }
        Some(n) if (1..=65535).contains(&n) => Some(n as u16),
        Some(n) => {
            errs.push(path, format!("{n} is not in 1-65535"));
            None
        }
    }
}

fn port_range(errs: &mut Errs, path: &str, proto: Protocol, pp: &ApiProtocolPort) -> Option<ClusterPort> {
    let Some(dp) = &pp.destination_port else {
        errs.push(format!("{path}.destinationPort"), "is required");
        return None;
    };
    let path = format!("{path}.destinationPort");
    match (dp.number, &dp.range) {
        (Some(n), None) => port_number(errs, &format!("{path}.number"), Some(n)).map(|n| ClusterPort::Range(proto, n, n)),
        (None, Some(r)) => {
            let start = port_number(errs, &format!("{path}.range.start"), r.start);
            let end = port_number(errs, &format!("{path}.range.end"), r.end);
            let (start, end) = (start?, end?);
            if start >= end {
                errs.push(format!("{path}.range"), format!("start {start} must be less than end {end}"));
                return None;
            }
            Some(ClusterPort::Range(proto, start, end))
        }
        _ => {
            errs.push(path, "must set exactly one of number or range");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{every_address, from_json, Converted, Object};

    use super::*;

    #[test]
    fn the_api_version_is_the_group_and_version_served() {
        assert_eq!(CLUSTER_POLICY_API_VERSION, format!("{CLUSTER_POLICY_GROUP}/{CLUSTER_POLICY_VERSION}"));
    }

    /// A ClusterNetworkPolicy `p` with `spec` (YAML flow text) converted as a manifest's.
    fn convert(spec: &str) -> Converted {
        let text = format!("apiVersion: {CLUSTER_POLICY_API_VERSION}\nkind: ClusterNetworkPolicy\nmetadata: {{name: p}}\nspec: {spec}\n");
        from_json(serde_norway::from_str(&text).unwrap()).unwrap()
    }

    fn policy(conv: &Converted) -> &ClusterPolicy {
        match &conv.object {
            Some(Object::ClusterPolicy(p)) => p,
            other => panic!("no ClusterNetworkPolicy: {other:?} {conv:?}"),
        }
    }

    const SUBJECT: &str = "tier: Admin, priority: 3, subject: {namespaces: {matchLabels: {house: g}}}";

    #[test]
    fn a_valid_policy_converts_as_written() {
        let conv = convert(&format!(
            "{{{SUBJECT}, ingress: [{{name: a, action: Accept, from: [{{namespaces: {{}}}}], protocols: [{{tcp: {{destinationPort: {{number: 80}}}}}}, {{udp: {{destinationPort: {{range: {{start: 50, end: 60}}}}}}}}, {{destinationNamedPort: web}}]}}], \
             egress: [{{action: Pass, to: [{{networks: [10.0.0.0/8, 'fd00::/8']}}, {{pods: {{podSelector: {{matchLabels: {{app: x}}}}}}}}]}}]}}"
        ));
        assert!(conv.errors.is_empty(), "{conv:?}");
        let p = policy(&conv);
        assert_eq!((p.name.as_str(), p.tier, p.priority, p.invalid.as_ref()), ("p", Tier::Admin, 3, None));
        assert!(p.subject.pods.is_everything() && !p.subject.namespaces.is_everything());
        let ports = p.ingress[0].ports.as_ref().unwrap();
        assert_eq!(
            ports,
            &[ClusterPort::Range(Protocol::Tcp, 80, 80), ClusterPort::Range(Protocol::Udp, 50, 60), ClusterPort::Named("web".into())]
        );
        assert_eq!((p.ingress[0].action, p.ingress[0].name.as_deref()), (Action::Accept, Some("a")));
        let e = &p.egress[0];
        assert_eq!((e.action, e.ports.as_ref(), e.peers.len()), (Action::Pass, None, 2));
        assert_eq!(e.peers[0], ClusterPeer::Networks(vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()]));
        let ClusterPeer::Pods(set) = &e.peers[1] else { panic!("{e:?}") };
        assert!(set.namespaces.is_everything() && !set.pods.is_everything());
    }

    /// `nodes` (experimental) selects Nodes by their labels: an empty selector every node.
    #[test]
    fn node_peers_convert_to_their_selector() {
        let conv = convert(&format!(
            "{{{SUBJECT}, egress: [{{action: Deny, to: [{{nodes: {{matchLabels: {{node-role.kubernetes.io/control-plane: ''}}}}}}, {{nodes: {{}}}}], \
             protocols: [{{tcp: {{destinationPort: {{number: 6443}}}}}}]}}]}}"
        ));
        assert!(conv.errors.is_empty(), "{conv:?}");
        let e = &policy(&conv).egress[0];
        let [ClusterPeer::Nodes(control_plane), ClusterPeer::Nodes(every)] = e.peers.as_slice() else { panic!("{e:?}") };
        let labels = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<crate::model::Labels>();
        assert!(control_plane.matches(&labels(&[("node-role.kubernetes.io/control-plane", "")])));
        assert!(!control_plane.matches(&labels(&[("kubernetes.io/hostname", "worker")])));
        assert!(every.is_everything());
        assert_eq!((e.action, e.ports.as_deref()), (Action::Deny, Some(&[ClusterPort::Range(Protocol::Tcp, 6443, 6443)][..])));
    }

    /// Each problem is reported at its field, as `ClusterNetworkPolicy p: FIELD: WHAT`.
    #[test]
    fn each_error_names_its_field() {
        let rule = |r: &str| format!("{{{SUBJECT}, ingress: [{r}]}}");
        let egress = |r: &str| format!("{{{SUBJECT}, egress: [{r}]}}");
        let cases = [
            ("{tier: Admin, priority: 1001, subject: {namespaces: {}}}".to_string(), "spec.priority: 1001 is not in 0-1000"),
            ("{tier: Admin, priority: x, subject: {namespaces: {}}}".to_string(), "spec.priority: invalid type"),
            ("{priority: 1, subject: {namespaces: {}}}".to_string(), "spec.tier: is required"),
            ("{tier: Middle, priority: 1, subject: {namespaces: {}}}".to_string(), "spec.tier: unknown tier \"Middle\""),
            ("{tier: Admin, priority: 1, subject: {namespaces: {}, pods: {podSelector: {}}}}".to_string(), "spec.subject: must set exactly one"),
            ("{tier: Admin, priority: 1, subject: {pods: {namespaceSelector: {}}}}".to_string(), "spec.subject.pods.podSelector: is required"),
            (
                "{tier: Admin, priority: 1, subject: {namespaces: {matchExpressions: [{key: k, operator: Near}]}}}".to_string(),
                "spec.subject.namespaces.matchExpressions[0]",
            ),
            (rule("{from: [{namespaces: {}}]}"), "spec.ingress[0].action: is required"),
            (rule("{action: Allow, from: [{namespaces: {}}]}"), "spec.ingress[0].action: unknown action \"Allow\""),
            (rule("{action: Deny, from: []}"), "spec.ingress[0].from: must have at least one item"),
            (rule("{action: Deny, from: [{networks: [10.0.0.0/8]}]}"), "spec.ingress[0].from[0]: sets none of namespaces or pods"),
            (rule("{action: Deny, from: [{namespaces: {}, pods: {podSelector: {}}}]}"), "spec.ingress[0].from[0]: must set exactly one"),
            (rule("{action: Deny, from: [{namespaces: {}}], protocols: []}"), "spec.ingress[0].protocols: must have at least one item"),
            (rule("{action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {}}]}"), "spec.ingress[0].protocols[0].tcp.destinationPort: is required"),
            (
                "{tier: Admin, priority: 1, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}], protocols: [{udp: {destinationPort: {number: 53}}}, {udp: {destinationPort: {range: {start: 90, end: 80}}}}]}]}".to_string(),
                "spec.ingress[0].protocols[1].udp.destinationPort.range: start 90 must be less than end 80",
            ),
            (rule("{action: Deny, from: [{namespaces: {}}], protocols: [{sctp: {destinationPort: {number: 0}}}]}"), "spec.ingress[0].protocols[0].sctp.destinationPort.number: 0 is not in 1-65535"),
            (rule("{action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 80}}, destinationNamedPort: web}]}"), "spec.ingress[0].protocols[0]: must set exactly one"),
            (rule(&format!("{{name: {}, action: Deny, from: [{{namespaces: {{}}}}]}}", "n".repeat(101))), "spec.ingress[0].name: is longer than 100"),
            (egress("{action: Deny, to: [{networks: [10.0.0.0/8, 10.0.0.300/32]}]}"), "spec.egress[0].to[0].networks[1]: invalid CIDR"),
            (egress("{action: Accept, to: [{domainNames: [example.com]}]}"), "spec.egress[0].to[0].domainNames: domain name peers are not supported"),
            (egress("{action: Deny, to: [{nodes: {matchExpressions: [{key: k, operator: Near}]}}]}"), "spec.egress[0].to[0].nodes.matchExpressions[0]"),
            (egress("{action: Deny, to: [{nodes: {}, networks: [10.0.0.0/8]}]}"), "spec.egress[0].to[0]: must set exactly one"),
            (egress("{action: Deny, to: [{nodes: {}}], protocols: [{destinationNamedPort: web}]}"), "spec.egress[0]: networks/nodes/domainNames peer cannot be set with namedPorts"),
            (rule("{action: Deny, from: [{nodes: {}}]}"), "spec.ingress[0].from[0]: sets none of namespaces or pods"),
            (egress("{action: Deny, to: [{networks: [10.0.0.0/8]}], protocols: [{destinationNamedPort: web}]}"), "spec.egress[0]: networks/nodes/domainNames peer cannot be set with namedPorts"),
            (egress("{action: Deny, to: [{pods: {podSelector: {}}}], protocols: [{destinationNamedPort: ''}]}"), "spec.egress[0].protocols[0].destinationNamedPort: must not be empty"),
            (egress("{action: Deny, to: 7}"), "spec.egress[0]: invalid type"),
            (format!("{{{SUBJECT}, egress: {{action: Accept}}}}"), "spec.egress: invalid type"),
        ];
        for (spec, want) in cases {
            let conv = convert(&spec);
            let want = format!("ClusterNetworkPolicy p: {want}");
            assert!(conv.errors.len() == 1 && conv.errors[0].starts_with(&want), "{spec}: want {want:?}, got {:?}", conv.errors);
            assert!(conv.errors[0].ends_with(CLUSTER_FAIL_CLOSED_NOTE), "{:?}", conv.errors);
            // Never dropped: the policy is kept, marked invalid.
            assert_eq!(
                policy(&conv).invalid.as_ref().map(|i| format!("ClusterNetworkPolicy {i}")).as_deref(),
                conv.errors[0].strip_suffix(CLUSTER_FAIL_CLOSED_NOTE)
            );
            // What an Event on it says is the load error.
            assert_eq!(crate::model::invalid_cluster_policy_message(policy(&conv)).as_ref(), Some(&conv.errors[0]));
        }
    }

    #[test]
    fn a_policy_without_a_name_is_an_error_without_a_policy() {
        let conv = from_json(serde_norway::from_str("kind: ClusterNetworkPolicy\nmetadata: {}\nspec: {}\n").unwrap()).unwrap();
        assert_eq!(
            (conv.object, conv.errors.as_slice()),
            (None, &["ClusterNetworkPolicy <unnamed>: metadata.name: is required".to_string()][..])
        );
        let conv = from_json(serde_norway::from_str("apiVersion: policy.networking.k8s.io/v1alpha1\nkind: ClusterNetworkPolicy\nmetadata: {name: p}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}}\n").unwrap()).unwrap();
        assert!(conv.errors[0].starts_with("ClusterNetworkPolicy p: apiVersion: "), "{conv:?}");
    }

    /// The API's fail-closed rule: a rule netpol cannot enforce matches nothing if it accepts
    /// and denies everything if it denies or passes; the other rules stay as written, unless
    /// the policy itself is at fault.
    #[test]
    fn unsupported_or_invalid_rules_fail_closed() {
        let conv = convert(&format!(
            "{{{SUBJECT}, egress: [{{action: Accept, to: [{{domainNames: [example.com]}}]}}, {{action: Pass, to: [{{domainNames: [example.com]}}], protocols: [{{tcp: {{destinationPort: {{number: 80}}}}}}]}}, \
             {{action: Accept, to: [{{networks: [10.0.0.0/8]}}]}}, {{action: Bogus, to: [{{namespaces: {{}}}}]}}]}}"
        ));
        assert_eq!(conv.errors.len(), 3, "{conv:?}");
        let p = policy(&conv);
        let deny_all = ClusterRule { name: None, action: Action::Deny, peers: vec![ClusterPeer::Networks(every_address())], ports: None };
        assert_eq!(p.egress[0], ClusterRule { name: None, action: Action::Accept, peers: vec![], ports: None });
        assert_eq!(p.egress[1], deny_all);
        assert_eq!((p.egress[2].action, p.egress[2].peers.len()), (Action::Accept, 1));
        assert_eq!(p.egress[3], deny_all);
        // A problem of the policy itself: every rule fails closed; the tier stays as written.
        let conv = convert(
            "{tier: Baseline, priority: 5000, subject: {namespaces: {}}, ingress: [{action: Accept, from: [{namespaces: {}}]}, {action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}]}",
        );
        let p = policy(&conv);
        assert_eq!((p.tier, p.priority, conv.errors.len()), (Tier::Baseline, 0, 1));
        assert!(p.ingress[0].peers.is_empty() && p.ingress[0].action == Action::Accept);
        assert_eq!(p.ingress[1], deny_all);
        // An unreadable subject and tier: every pod, in the Admin tier.
        let p = policy(&convert("{tier: 7, priority: 1, subject: {}, ingress: [{action: Pass, from: [{namespaces: {}}]}]}")).clone();
        assert!(p.tier == Tier::Admin && p.subject.namespaces.is_everything() && p.subject.pods.is_everything());
        assert_eq!(p.ingress[0], deny_all);
        // An unreadable list of rules: all traffic of the direction denied.
        let p = policy(&convert(&format!("{{{SUBJECT}, ingress: 7}}"))).clone();
        assert_eq!((p.ingress.as_slice(), p.egress.len()), (&[deny_all][..], 0));
    }
}

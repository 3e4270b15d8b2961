//! From the Kubernetes API's objects to the model: validation and conversion, and the one entry
//! point both sources call ([`from_k8s`] for typed objects, [`from_json`] for manifest text), so
//! that a manifest and the API server's copy of an object become the same model object and the
//! same reported problems. Errors name the kind, the object and the field at fault.
use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Node as K8sNode, Pod as K8sPod, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice as K8sEndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Resource;

use super::{ClusterPolicy, EndpointSlice, FieldError, Namespace, Node, ObjKey, Pod, Policy, Protocol, Service};

mod cluster_policy;
mod policy;
mod resources;

pub use cluster_policy::{
    cluster_policy_from_json, ConvertedClusterPolicy, CLUSTER_FAIL_CLOSED_NOTE, CLUSTER_POLICY_API_VERSION, CLUSTER_POLICY_GROUP,
    CLUSTER_POLICY_KIND, CLUSTER_POLICY_PLURAL, CLUSTER_POLICY_VERSION,
};
pub use policy::{invalid_policy_message, policy_from_k8s, policy_stand_in, ConvertedPolicy, FAIL_CLOSED_NOTE};
pub use resources::{endpoint_slice_from_k8s, namespace_from_k8s, node_from_k8s, pod_from_k8s, service_from_k8s};

/// One object of the model, of any kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Policy(Policy),
    Service(Service),
    EndpointSlice(EndpointSlice),
    /// A ClusterNetworkPolicy (cluster-scoped: its key has no namespace).
    ClusterPolicy(ClusterPolicy),
    /// A Node (cluster-scoped), for ClusterNetworkPolicy `nodes` peers.
    Node(Node),
}

/// One API object converted: what the model keeps of it and what to report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Converted {
    /// `None`: nothing to keep (the object is invalid and not a NetworkPolicy, a pod that
    /// finished, a service without cluster IPs, a slice of no service).
    pub object: Option<Object>,
    /// Each problem as reported: kind, object, field, what is wrong. An invalid NetworkPolicy's
    /// end with [`FAIL_CLOSED_NOTE`] (its fail-closed stand-in is the `object`).
    pub errors: Vec<String>,
    /// Problems that change nothing in enforcement (an annotation value netpol ignores).
    pub warnings: Vec<String>,
}

impl Converted {
    fn failed(error: String) -> Converted {
        Converted { object: None, errors: vec![error], warnings: vec![] }
    }

    /// From a kind's conversion: its object (if kept), or its field errors.
    fn of(kind: &str, result: Result<Option<Object>, Vec<FieldError>>) -> Converted {
        match result {
            Ok(object) => Converted { object, ..Default::default() },
            Err(errs) => Converted { errors: errs.iter().map(|e| format!("{kind} {e}")).collect(), ..Default::default() },
        }
    }
}

/// An API object of a kind the model takes in.
pub trait ApiObject: k8s_openapi::Resource + serde::de::DeserializeOwned {
    fn convert(&self) -> Converted;
}

/// Converts and validates one API object.
pub fn from_k8s<K: ApiObject>(obj: &K) -> Converted {
    obj.convert()
}

/// Converts one object of a manifest (any kind the model takes; `None` for other kinds). A text
/// that does not have the API's shape is an error, except that a NetworkPolicy that can be
/// keyed still fails closed ([`policy_stand_in`]).
pub fn from_json(value: serde_json::Value) -> Option<Converted> {
    Some(match value.get("kind").and_then(|k| k.as_str())? {
        K8sNamespace::KIND => typed_from_json::<K8sNamespace>(value),
        K8sPod::KIND => typed_from_json::<K8sPod>(value),
        NetworkPolicy::KIND => policy_from_json(value),
        K8sService::KIND => typed_from_json::<K8sService>(value),
        K8sEndpointSlice::KIND => typed_from_json::<K8sEndpointSlice>(value),
        CLUSTER_POLICY_KIND => cluster_policy_converted(&value),
        K8sNode::KIND => typed_from_json::<K8sNode>(value),
        _ => return None,
    })
}

/// The key a manifest object names, for messages: namespace `default` and name `<unnamed>`
/// where absent.
pub fn json_key(value: &serde_json::Value) -> ObjKey {
    let meta = |field: &str| value.get("metadata").and_then(|m| m.get(field)).and_then(|n| n.as_str());
    ObjKey::new(meta("namespace").unwrap_or("default"), meta("name").unwrap_or("<unnamed>"))
}

fn typed_from_json<K: ApiObject>(value: serde_json::Value) -> Converted {
    let key = json_key(&value);
    match serde_json::from_value::<K>(value) {
        Ok(obj) => obj.convert(),
        Err(e) => Converted::failed(format!("{} {key}: {e}", K::KIND)),
    }
}

fn policy_from_json(value: serde_json::Value) -> Converted {
    let e = match serde_json::from_value::<NetworkPolicy>(value.clone()) {
        Ok(np) => return np.convert(),
        Err(e) => e,
    };
    let key = json_key(&value);
    match policy_stand_in(&value, &e.to_string()) {
        // Not even of the API's shape: still fail closed where it can be keyed.
        Some(p) => Converted {
            object: Some(Object::Policy(p)),
            errors: vec![policy::fail_closed_message(&format_args!("{key}: {e}"))],
            warnings: vec![],
        },
        None => Converted::failed(format!("{} {key}: {e}", NetworkPolicy::KIND)),
    }
}

/// A ClusterNetworkPolicy's JSON (a manifest's, or the API server's copy: there is no typed
/// object) converted: it is kept (its faulty rules fail closed) and its problems reported.
pub fn cluster_policy_converted(value: &serde_json::Value) -> Converted {
    match cluster_policy_from_json(value) {
        Ok(conv) => Converted {
            object: Some(Object::ClusterPolicy(conv.policy)),
            errors: conv.errors.iter().map(cluster_fail_closed_message).collect(),
            warnings: vec![],
        },
        Err(errs) => Converted::of(CLUSTER_POLICY_KIND, Err(errs)),
    }
}

fn cluster_fail_closed_message(problem: &impl std::fmt::Display) -> String {
    format!("{CLUSTER_POLICY_KIND} {problem}{CLUSTER_FAIL_CLOSED_NOTE}")
}

/// The reported message of a ClusterNetworkPolicy's first validation problem (`None` for a
/// valid one): its first load error's text, for what else reports it (a Kubernetes Event).
pub fn invalid_cluster_policy_message(policy: &ClusterPolicy) -> Option<String> {
    policy.invalid.as_ref().map(cluster_fail_closed_message)
}

impl ApiObject for K8sNamespace {
    fn convert(&self) -> Converted {
        Converted::of(Self::KIND, namespace_from_k8s(self).map(|n| Some(Object::Namespace(n))).map_err(|e| vec![e]))
    }
}

/// A node is kept with the addresses that parse; the others are reported.
impl ApiObject for K8sNode {
    fn convert(&self) -> Converted {
        match node_from_k8s(self) {
            Ok((node, errs)) => Converted {
                object: Some(Object::Node(node)),
                errors: errs.iter().map(|e| format!("{} {e}", Self::KIND)).collect(),
                warnings: vec![],
            },
            Err(e) => Converted::of(Self::KIND, Err(vec![e])),
        }
    }
}

impl ApiObject for K8sPod {
    fn convert(&self) -> Converted {
        Converted::of(Self::KIND, pod_from_k8s(self).map(|p| p.map(Object::Pod)))
    }
}

impl ApiObject for K8sService {
    fn convert(&self) -> Converted {
        Converted::of(Self::KIND, service_from_k8s(self).map(|s| s.map(Object::Service)))
    }
}

impl ApiObject for K8sEndpointSlice {
    fn convert(&self) -> Converted {
        Converted::of(Self::KIND, endpoint_slice_from_k8s(self).map(|s| s.map(Object::EndpointSlice)))
    }
}

/// An invalid policy is kept as its fail-closed stand-in, and reported.
impl ApiObject for NetworkPolicy {
    fn convert(&self) -> Converted {
        match policy_from_k8s(self) {
            Ok(conv) => Converted {
                object: Some(Object::Policy(conv.policy)),
                errors: conv.errors.iter().map(|e| policy::fail_closed_message(e)).collect(),
                warnings: conv.warnings.iter().map(|w| format!("{} {w}", Self::KIND)).collect(),
            },
            Err(errs) => Converted::of(Self::KIND, Err(errs)),
        }
    }
}

/// Collects field errors for one object.
struct Errs<'a> {
    object: &'a str,
    list: Vec<FieldError>,
}

impl Errs<'_> {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.list.push(FieldError { object: self.object.to_string(), field: field.into(), message: message.into() });
    }
}

/// The object's key (`namespaced`: in its namespace, `default` when unset); a name is required.
fn meta_key(kind: &str, meta: &ObjectMeta, namespaced: bool) -> Result<ObjKey, FieldError> {
    let name = meta.name.clone().unwrap_or_default();
    let namespace = if namespaced { meta.namespace.clone().unwrap_or_else(|| "default".to_string()) } else { String::new() };
    if name.is_empty() {
        return Err(FieldError {
            object: format!("{kind} {namespace}/<unnamed>"),
            field: "metadata.name".into(),
            message: "is required".into(),
        });
    }
    Ok(ObjKey { namespace, name })
}

/// A `protocol` field of `path`: absent means TCP; an unknown one is an error.
fn protocol(errs: &mut Errs, path: &str, value: Option<&str>) -> Option<Protocol> {
    match value {
        None => Some(Protocol::Tcp),
        Some(s) => {
            let p = Protocol::parse(s);
            if p.is_none() {
                errs.push(format!("{path}.protocol"), format!("unknown protocol {s:?} (want TCP, UDP or SCTP)"));
            }
            p
        }
    }
}

/// IANA_SVC_NAME as validated by the API server.
pub fn valid_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> serde_json::Value {
        serde_norway::from_str(text).unwrap()
    }

    #[test]
    fn a_manifest_and_the_api_servers_copy_convert_alike() {
        let pod =
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: a}\nspec: {containers: [{name: c, ports: [{containerPort: 0}]}]}\n";
        let typed: K8sPod = serde_json::from_value(json(pod)).unwrap();
        let conv = from_json(json(pod)).unwrap();
        assert_eq!(conv, from_k8s(&typed));
        assert_eq!(conv.errors, ["Pod a/x: spec.containers[0].ports[0].containerPort: 0 is not in 1-65535"]);
        assert!(conv.object.is_none());
        assert!(from_json(json("kind: ConfigMap\nmetadata: {name: x}\n")).is_none());
    }

    /// A Node keeps its labels and its InternalIP and ExternalIP addresses (not its names); an
    /// address that does not parse is reported at its field, the node kept without it.
    #[test]
    fn a_node_keeps_its_labels_and_ip_addresses() {
        let text = "apiVersion: v1\nkind: Node\nmetadata: {name: w1, labels: {role: worker}}\nstatus: {addresses: [\
                    {type: Hostname, address: w1}, {type: InternalIP, address: 172.18.0.3}, {type: ExternalIP, address: 'fd00::3'}, \
                    {type: InternalIP, address: 172.18.0.3}, {type: InternalDNS, address: w1.local}, {type: ExternalIP, address: 300.1.1.1}]}\n";
        let typed: K8sNode = serde_json::from_value(json(text)).unwrap();
        let conv = from_json(json(text)).unwrap();
        assert_eq!(conv, from_k8s(&typed));
        let Some(Object::Node(n)) = &conv.object else { panic!("{conv:?}") };
        assert_eq!(n.name, "w1");
        assert_eq!(n.labels.get("role").map(String::as_str), Some("worker"));
        assert_eq!(n.addresses, ["172.18.0.3".parse::<std::net::IpAddr>().unwrap(), "fd00::3".parse().unwrap()]);
        assert_eq!(conv.errors, ["Node w1: status.addresses[5].address: invalid IP address \"300.1.1.1\" (type ExternalIP)"]);
        assert_eq!(conv.object.as_ref().map(|o| (o.kind(), o.key())), Some((crate::model::Kind::Node, ObjKey::new("", "w1"))));
        let unnamed = from_json(json("kind: Node\nmetadata: {}\n")).unwrap();
        assert_eq!((unnamed.object, unnamed.errors.as_slice()), (None, &["Node <unnamed>: metadata.name: is required".to_string()][..]));
    }

    #[test]
    fn a_policy_not_of_the_apis_shape_fails_closed() {
        let conv =
            from_json(json("kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: 7}\n")).unwrap();
        let Some(Object::Policy(p)) = &conv.object else { panic!("{conv:?}") };
        assert!(p.invalid.is_some() && p.isolates_ingress && p.ingress.is_empty());
        assert!(conv.errors.len() == 1 && conv.errors[0].starts_with("NetworkPolicy a/p: ") && conv.errors[0].ends_with(FAIL_CLOSED_NOTE));
        assert_eq!(invalid_policy_message(p).as_ref(), conv.errors.first());
        let conv = from_json(json("kind: Service\nmetadata: {name: s}\nspec: {ports: 7}\n")).unwrap();
        assert!(conv.object.is_none() && conv.errors[0].starts_with("Service default/s: "), "{conv:?}");
    }

    #[test]
    fn an_invalid_policys_message_is_its_first_load_error() {
        let text = "kind: NetworkPolicy\nmetadata: {name: p, namespace: a}\n\
                    spec: {podSelector: {}, ingress: [{ports: [{port: 70000}, {protocol: ICMP}]}]}\n";
        let conv = from_json(json(text)).unwrap();
        let Some(Object::Policy(p)) = &conv.object else { panic!("{conv:?}") };
        assert_eq!(conv.errors.len(), 2, "{conv:?}");
        assert_eq!(invalid_policy_message(p).as_ref(), Some(&conv.errors[0]));
        assert!(conv.errors[0].starts_with("NetworkPolicy a/p: spec.ingress[0].ports[0].port: "), "{conv:?}");
        assert!(conv.errors[0].ends_with(FAIL_CLOSED_NOTE));
        let valid = from_json(json("kind: NetworkPolicy\nmetadata: {name: q, namespace: a}\nspec: {podSelector: {}}\n")).unwrap();
        let Some(Object::Policy(q)) = &valid.object else { panic!("{valid:?}") };
        assert_eq!(invalid_policy_message(q), None);
    }
}

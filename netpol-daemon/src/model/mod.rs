//! The cluster model: validated, typed namespaces, pods and network policies. Everything the
//! compiler sees has been checked here; errors name the object and the field at fault.
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub mod cidr;
mod cluster;
pub mod labels;

pub use cidr::Cidr;
pub use cluster::{ChangeSet, Cluster, Verdict};
pub use labels::Selector;

pub type Labels = BTreeMap<String, String>;

/// Label every namespace carries (set by the API server since Kubernetes 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// `namespace/name`
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjKey { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A validation error: which object, which field, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub object: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{}: {}: {}", self.object, self.field, self.message)
        }
    }
}

impl std::error::Error for FieldError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// IANA protocol number, as in the IP header.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => netpol_common::PROTO_TCP,
            Protocol::Udp => netpol_common::PROTO_UDP,
            Protocol::Sctp => netpol_common::PROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }

    /// Parses the API spelling (case-sensitive, as the API server validates it).
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

impl Namespace {
    /// A namespace with only the automatic name label (for namespaces known only by reference).
    pub fn implicit(name: &str) -> Namespace {
        let mut labels = Labels::new();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
        Namespace { name: name.to_string(), labels }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub key: ObjKey,
    pub labels: Labels,
    pub node_name: Option<String>,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
    pub host_network: bool,
}

impl Pod {
    /// Resolves a named port against this pod's containers (name and protocol must match).
    /// Every container port with that name counts (names may repeat across containers).
    pub fn named_ports<'a>(&'a self, name: &'a str, protocol: Protocol) -> impl Iterator<Item = u16> + 'a {
        self.ports
            .iter()
            .filter(move |p| p.protocol == protocol && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }

    /// Pods that policies can select: not host-network, and with an address.
    pub fn selectable(&self) -> bool {
        !self.host_network && !self.ips.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    /// `port` omitted: every port of the protocol.
    Any,
    /// `port` (and `endPort`), inclusive.
    Range(u16, u16),
    /// A named container port.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: PortRef,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IpBlock {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains_addr(ip) && !self.except.iter().any(|e| e.contains_addr(ip))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods selected by `pods` in the namespaces selected by `namespaces` (`None`: the
    /// policy's own namespace).
    Pods { namespaces: Option<Selector>, pods: Selector },
    IpBlock(IpBlock),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `None`: `from`/`to` empty or absent, every peer.
    pub peers: Option<Vec<Peer>>,
    /// `None`: `ports` empty or absent, every port and protocol.
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub key: ObjKey,
    pub pod_selector: Selector,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    /// The policy isolates the pods it selects for ingress (policyTypes, defaulted).
    pub isolates_ingress: bool,
    pub isolates_egress: bool,
    /// Audit mode (annotation [`AUDIT_ANNOTATION`]: "true"): the drops this policy would add
    /// are counted and logged as `verdict="audit"` and let through.
    pub audit: bool,
    /// The policy failed validation (the first problem found): it is enforced fail-closed,
    /// isolating what it selects with no allows (see [`policy_from_k8s`]).
    pub invalid: Option<String>,
}

/// The NetworkPolicy annotation that puts one policy in audit mode.
pub const AUDIT_ANNOTATION: &str = "netpol.io/audit";

/// A Service port: `port` on the cluster IPs, forwarded to `target` on the backends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePort {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
    pub target: TargetPort,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TargetPort {
    Number(u16),
    /// A named container port, resolved on each backend pod.
    Named(String),
}

/// A Service with cluster IPs (headless and ExternalName services have none and are not
/// kept: traffic to them goes straight to pod or outside addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ObjKey,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `spec.selector` (None: backends come only from EndpointSlices).
    pub selector: Option<Labels>,
}

/// One EndpointSlice's backends of a service: addresses (ready ones) and named ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub key: ObjKey,
    pub service: String,
    pub addresses: Vec<IpAddr>,
    /// (port name, protocol, port number) as in the slice.
    pub ports: Vec<(Option<String>, Protocol, u16)>,
}

/// The direction of traffic relative to a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    pub fn datapath(self) -> u8 {
        match self {
            Direction::Ingress => netpol_common::DIR_INGRESS,
            Direction::Egress => netpol_common::DIR_EGRESS,
        }
    }
}

impl Policy {
    pub fn rules(&self, dir: Direction) -> &[Rule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    pub fn isolates(&self, dir: Direction) -> bool {
        match dir {
            Direction::Ingress => self.isolates_ingress,
            Direction::Egress => self.isolates_egress,
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
        self.list.push(FieldError {
            object: self.object.to_string(),
            field: field.into(),
            message: message.into(),
        });
    }
}

fn meta_key(
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    namespaced: bool,
) -> Result<ObjKey, FieldError> {
    let name = meta.name.clone().unwrap_or_default();
    let namespace = if namespaced {
        meta.namespace.clone().unwrap_or_else(|| "default".to_string())
    } else {
        String::new()
    };
    if name.is_empty() {
        return Err(FieldError {
            object: format!("{kind} {namespace}/<unnamed>"),
            field: "metadata.name".into(),
            message: "is required".into(),
        });
    }
    Ok(ObjKey { namespace, name })
}

pub fn namespace_from_k8s(ns: &K8sNamespace) -> Result<Namespace, FieldError> {
    let key = meta_key("Namespace", &ns.metadata, false)?;
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), key.name.clone());
    Ok(Namespace { name: key.name, labels })
}

/// Converts an API pod. Returns `Ok(None)` for pods that no longer hold an address
/// (phase Succeeded or Failed).
pub fn pod_from_k8s(pod: &K8sPod) -> Result<Option<Pod>, Vec<FieldError>> {
    let key = meta_key("Pod", &pod.metadata, true).map_err(|e| vec![e])?;
    let object = key.to_string();
    let mut errs = Errs { object: &object, list: vec![] };
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if let Some(phase) = status.and_then(|s| s.phase.as_deref()) {
        if phase == "Succeeded" || phase == "Failed" {
            return Ok(None);
        }
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Some(st) = status {
        if let Some(list) = &st.pod_ips {
            for (i, p) in list.iter().enumerate() {
                match p.ip.parse::<IpAddr>() {
                    Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                    Ok(_) => {}
                    Err(_) => errs.push(format!("status.podIPs[{i}].ip"), format!("invalid IP address {:?}", p.ip)),
                }
            }
        }
        if let Some(ip) = &st.pod_ip {
            match ip.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip) => ips.insert(0, ip),
                Ok(_) => {}
                Err(_) => errs.push("status.podIP", format!("invalid IP address {ip:?}")),
            }
        }
    }
    let mut ports = Vec::new();
    if let Some(spec) = spec {
        let containers = spec.containers.iter().map(|c| ("containers", c));
        let inits = spec.init_containers.iter().flatten().map(|c| ("initContainers", c));
        let mut idx: BTreeMap<&str, usize> = BTreeMap::new();
        for (field, c) in containers.chain(inits) {
            let ci = idx.entry(field).or_default();
            for (pi, p) in c.ports.iter().flatten().enumerate() {
                let path = format!("spec.{field}[{}].ports[{pi}]", *ci);
                let Some(protocol) = protocol(&mut errs, &path, p.protocol.as_deref()) else { continue };
                if !(1..=65535).contains(&p.container_port) {
                    errs.push(format!("{path}.containerPort"), format!("{} is not in 1-65535", p.container_port));
                    continue;
                }
                ports.push(ContainerPort { name: p.name.clone(), port: p.container_port as u16, protocol });
            }
            *ci += 1;
        }
    }
    if !errs.list.is_empty() {
        return Err(errs.list);
    }
    Ok(Some(Pod {
        key,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        node_name: spec.and_then(|s| s.node_name.clone()),
        ips,
        ports,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    }))
}

pub fn service_from_k8s(svc: &k8s_openapi::api::core::v1::Service) -> Result<Option<Service>, Vec<FieldError>> {
    let key = meta_key("Service", &svc.metadata, true).map_err(|e| vec![e])?;
    let object = key.to_string();
    let mut errs = Errs { object: &object, list: vec![] };
    let Some(spec) = &svc.spec else { return Ok(None) };
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if let Some(ip) = &spec.cluster_ip {
        if !ips.contains(ip) {
            ips.insert(0, ip.clone());
        }
    }
    let mut cluster_ips = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        if ip == "None" || ip.is_empty() {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(a) => cluster_ips.push(a),
            Err(_) => errs.push(format!("spec.clusterIPs[{i}]"), format!("invalid IP address {ip:?}")),
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let path = format!("spec.ports[{i}]");
        let Some(protocol) = protocol(&mut errs, &path, p.protocol.as_deref()) else { continue };
        if !(1..=65535).contains(&p.port) {
            errs.push(format!("{path}.port"), format!("{} is not in 1-65535", p.port));
            continue;
        }
        let target = match &p.target_port {
            None => TargetPort::Number(p.port as u16),
            Some(IntOrString::Int(n)) if (1..=65535).contains(n) => TargetPort::Number(*n as u16),
            Some(IntOrString::Int(n)) => {
                errs.push(format!("{path}.targetPort"), format!("{n} is not in 1-65535"));
                continue;
            }
            Some(IntOrString::String(s)) => match s.parse::<u16>() {
                Ok(n) if n > 0 => TargetPort::Number(n),
                _ if valid_port_name(s) => TargetPort::Named(s.clone()),
                _ => {
                    errs.push(format!("{path}.targetPort"), format!("{s:?} is not a valid port name"));
                    continue;
                }
            },
        };
        ports.push(ServicePort { name: p.name.clone(), protocol, port: p.port as u16, target });
    }
    if !errs.list.is_empty() {
        return Err(errs.list);
    }
    if cluster_ips.is_empty() {
        return Ok(None);
    }
    Ok(Some(Service { key, cluster_ips, ports, selector: spec.selector.clone().map(|m| m.into_iter().collect()) }))
}

pub fn endpoint_slice_from_k8s(es: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Result<Option<EndpointSlice>, Vec<FieldError>> {
    let key = meta_key("EndpointSlice", &es.metadata, true).map_err(|e| vec![e])?;
    let object = key.to_string();
    let mut errs = Errs { object: &object, list: vec![] };
    let Some(service) = es.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/service-name")).cloned() else {
        return Ok(None);
    };
    let mut addresses = Vec::new();
    for (i, ep) in es.endpoints.iter().flatten().enumerate() {
        // Endpoints that are not ready get no traffic from kube-proxy.
        if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        for (j, a) in ep.addresses.iter().enumerate() {
            match a.parse::<IpAddr>() {
                Ok(ip) => addresses.push(ip),
                Err(_) => errs.push(format!("endpoints[{i}].addresses[{j}]"), format!("invalid IP address {a:?}")),
            }
        }
    }
    let mut ports = Vec::new();
    for (i, p) in es.ports.iter().flatten().enumerate() {
        let protocol = match p.protocol.as_deref().map(Protocol::parse) {
            None => Protocol::Tcp,
            Some(Some(pr)) => pr,
            Some(None) => {
                errs.push(format!("ports[{i}].protocol"), format!("unknown protocol {:?}", p.protocol));
                continue;
            }
        };
        match p.port {
            Some(n) if (1..=65535).contains(&n) => ports.push((p.name.clone().filter(|n| !n.is_empty()), protocol, n as u16)),
            Some(n) => errs.push(format!("ports[{i}].port"), format!("{n} is not in 1-65535")),
            None => {}
        }
    }
    if !errs.list.is_empty() {
        return Err(errs.list);
    }
    Ok(Some(EndpointSlice { key, service, addresses, ports }))
}

/// Appended to a NetworkPolicy's validation errors where they are reported.
pub const FAIL_CLOSED_NOTE: &str = " (enforced fail-closed: the policy isolates the pods it selects and allows nothing)";

/// A NetworkPolicy as it is enforced, with what was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvertedPolicy {
    /// The policy as written, or, when `errors` is not empty, its fail-closed stand-in.
    pub policy: Policy,
    /// Validation errors (each names the object and field); not empty: fail closed.
    pub errors: Vec<FieldError>,
    /// Problems that change nothing in enforcement (an annotation value netpol ignores).
    pub warnings: Vec<FieldError>,
}

/// Validates and converts a NetworkPolicy. Every problem is reported, not just the first.
///
/// A policy that fails validation is not skipped (skipping it would leave open the pods it
/// was meant to isolate: fail open). It becomes a stand-in that isolates what it selects in
/// its policy types and allows nothing: its valid rules are dropped as well, as one
/// invalid rule may have been meant to narrow what the others allow. Where `policyTypes`
/// itself is unreadable, both directions are isolated; where `podSelector` is unreadable,
/// every pod of the namespace is. Only a policy without a name (which cannot be keyed) is
/// an error without a policy.
pub fn policy_from_k8s(np: &NetworkPolicy) -> Result<ConvertedPolicy, Vec<FieldError>> {
    let key = meta_key("NetworkPolicy", &np.metadata, true).map_err(|e| vec![e])?;
    let object = key.to_string();
    let mut errs = Errs { object: &object, list: vec![] };
    let mut warnings = Errs { object: &object, list: vec![] };
    let default_spec = NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    let pod_selector = selector(&mut errs, "spec.podSelector", spec.pod_selector.as_ref());
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let base = format!("spec.ingress[{i}]");
        ingress.push(rule(&mut errs, &base, "from", r.from.as_deref(), r.ports.as_deref()));
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let base = format!("spec.egress[{i}]");
        egress.push(rule(&mut errs, &base, "to", r.to.as_deref(), r.ports.as_deref()));
    }
    let mut types_unreadable = false;
    let (isolates_ingress, isolates_egress) = match &spec.policy_types {
        None => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        Some(types) => {
            let (mut i, mut e) = (false, false);
            for (n, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => i = true,
                    "Egress" => e = true,
                    other => {
                        types_unreadable = true;
                        errs.push(format!("spec.policyTypes[{n}]"), format!("unknown policy type {other:?} (want Ingress or Egress)"))
                    }
                }
            }
            if types.is_empty() {
                // An explicitly empty list behaves as if it were not set.
                (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))
            } else {
                (i, e)
            }
        }
    };
    // Only "true" puts a policy in audit mode: any other value (a typo, "yes") is reported
    // and the policy enforced as written, never silently relaxed.
    let audit = match np.metadata.annotations.as_ref().and_then(|a| a.get(AUDIT_ANNOTATION)).map(|v| v.as_str()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            warnings.push(
                format!("metadata.annotations[{AUDIT_ANNOTATION}]"),
                format!("{other:?} is not \"true\" or \"false\"; ignored: the policy is enforced"),
            );
            false
        }
    };
    let policy = if errs.list.is_empty() {
        Policy { key, pod_selector: pod_selector.unwrap_or_default(), ingress, egress, isolates_ingress, isolates_egress, audit, invalid: None }
    } else {
        let (isolates_ingress, isolates_egress) = if types_unreadable { (true, true) } else { (isolates_ingress, isolates_egress) };
        Policy {
            key,
            // An unreadable selector: every pod of the namespace.
            pod_selector: pod_selector.unwrap_or_else(Selector::everything),
            ingress: vec![],
            egress: vec![],
            isolates_ingress,
            isolates_egress,
            audit,
            invalid: Some(errs.list[0].to_string()),
        }
    };
    Ok(ConvertedPolicy { policy, errors: errs.list, warnings: warnings.list })
}

/// The fail-closed stand-in of a NetworkPolicy whose text does not have the API's shape (a
/// field of the wrong type: the typed conversion cannot even start), read from what can be
/// read: its pod selector (else every pod of the namespace) and its policy types (else both
/// directions; defaulted as usual when absent). `None` without a name.
pub fn policy_stand_in(value: &serde_json::Value, why: &str) -> Option<Policy> {
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let namespace = meta.get("namespace").and_then(|n| n.as_str()).unwrap_or("default");
    let spec = value.get("spec");
    let pod_selector = spec
        .and_then(|s| s.get("podSelector"))
        .and_then(|v| serde_json::from_value::<LabelSelector>(v.clone()).ok())
        .and_then(|sel| Selector::from_k8s(&sel).ok())
        .unwrap_or_else(Selector::everything);
    let (isolates_ingress, isolates_egress) = match spec.and_then(|s| s.get("policyTypes")) {
        None | Some(serde_json::Value::Null) => {
            let egress = spec.and_then(|s| s.get("egress"));
            (true, egress.is_some_and(|e| !e.is_null() && e.as_array().is_none_or(|a| !a.is_empty())))
        }
        Some(v) => match serde_json::from_value::<Vec<String>>(v.clone()) {
            Ok(types) if !types.is_empty() && types.iter().all(|t| t == "Ingress" || t == "Egress") => {
                (types.iter().any(|t| t == "Ingress"), types.iter().any(|t| t == "Egress"))
            }
            _ => (true, true),
        },
    };
    let audit = meta.get("annotations").and_then(|a| a.get(AUDIT_ANNOTATION)).and_then(|v| v.as_str()) == Some("true");
    Some(Policy {
        key: ObjKey::new(namespace, name),
        pod_selector,
        ingress: vec![],
        egress: vec![],
        isolates_ingress,
        isolates_egress,
        audit,
        invalid: Some(format!("{namespace}/{name}: {why}")),
    })
}

fn selector(errs: &mut Errs, field: &str, sel: Option<&LabelSelector>) -> Option<Selector> {
    match sel {
        None => Some(Selector::everything()),
        Some(s) => match Selector::from_k8s(s) {
            Ok(s) => Some(s),
            Err((sub, msg)) => {
                errs.push(format!("{field}{sub}"), msg);
                None
            }
        },
    }
}

fn rule(
    errs: &mut Errs,
    base: &str,
    peer_field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Rule {
    let peers = match peers {
        None | Some([]) => None,
        Some(list) => {
            let mut out = Vec::new();
            for (i, p) in list.iter().enumerate() {
                let path = format!("{base}.{peer_field}[{i}]");
                if let Some(peer) = peer(errs, &path, p) {
                    out.push(peer);
                }
            }
            Some(out)
        }
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(list) => {
            let mut out = Vec::new();
            for (i, p) in list.iter().enumerate() {
                let path = format!("{base}.ports[{i}]");
                if let Some(spec) = port(errs, &path, p) {
                    out.push(spec);
                }
            }
            Some(out)
        }
    };
    Rule { peers, ports }
}

fn peer(errs: &mut Errs, path: &str, p: &NetworkPolicyPeer) -> Option<Peer> {
    match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            errs.push(path, "ipBlock cannot be combined with podSelector or namespaceSelector");
            None
        }
        (None, None, None) => {
            errs.push(path, "must set one of podSelector, namespaceSelector or ipBlock");
            None
        }
        (Some(b), None, None) => {
            let (cidr, cidr_len) = match Cidr::parse_api(&b.cidr) {
                Ok(c) => c,
                Err(e) => {
                    errs.push(format!("{path}.ipBlock.cidr"), e);
                    return None;
                }
            };
            let mut except = Vec::new();
            let mut ok = true;
            for (i, e) in b.except.iter().flatten().enumerate() {
                let field = format!("{path}.ipBlock.except[{i}]");
                // As the API server checks it: the except's address inside cidr, its prefix
                // length (as written) longer than cidr's.
                match Cidr::parse_api(e) {
                    Ok((c, len)) if cidr.contains_addr(c.addr()) && len > cidr_len => except.push(c),
                    Ok(_) => {
                        errs.push(field, format!("{e:?} is not a strict subset of cidr {:?}", b.cidr));
                        ok = false;
                    }
                    Err(m) => {
                        errs.push(field, m);
                        ok = false;
                    }
                }
            }
            ok.then_some(Peer::IpBlock(IpBlock { cidr, except }))
        }
        (None, pods, nss) => {
            let pods_sel = match pods {
                None => Some(Selector::everything()),
                Some(s) => selector(errs, &format!("{path}.podSelector"), Some(s)),
            };
            let ns_sel = match nss {
                None => Some(None),
                Some(s) => selector(errs, &format!("{path}.namespaceSelector"), Some(s)).map(Some),
            };
            Some(Peer::Pods { namespaces: ns_sel?, pods: pods_sel? })
        }
    }
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

fn port(errs: &mut Errs, path: &str, p: &NetworkPolicyPort) -> Option<PortSpec> {
    let protocol = protocol(errs, path, p.protocol.as_deref())?;
    let port = match (&p.port, p.end_port) {
        (None, None) => PortRef::Any,
        (None, Some(_)) => {
            errs.push(format!("{path}.endPort"), "requires port to be set");
            return None;
        }
        (Some(IntOrString::Int(n)), end) => {
            let n = *n;
            if !(1..=65535).contains(&n) {
                errs.push(format!("{path}.port"), format!("{n} is not in 1-65535"));
                return None;
            }
            let end = end.unwrap_or(n);
            if !(1..=65535).contains(&end) {
                errs.push(format!("{path}.endPort"), format!("{end} is not in 1-65535"));
                return None;
            }
            if end < n {
                errs.push(format!("{path}.endPort"), format!("{end} is less than port {n}"));
                return None;
            }
            PortRef::Range(n as u16, end as u16)
        }
        (Some(IntOrString::String(s)), end) => {
            if end.is_some() {
                errs.push(format!("{path}.endPort"), "cannot be used with a named port");
                return None;
            }
            // A numeric string is treated as a number by the API server's int-or-string.
            if let Ok(n) = s.parse::<i64>() {
                if !(1..=65535).contains(&n) {
                    errs.push(format!("{path}.port"), format!("{n} is not in 1-65535"));
                    return None;
                }
                PortRef::Range(n as u16, n as u16)
            } else if valid_port_name(s) {
                PortRef::Named(s.clone())
            } else {
                errs.push(
                    format!("{path}.port"),
                    format!("{s:?} is not a valid port name (at most 15 lowercase letters, digits or '-', with a letter)"),
                );
                return None;
            }
        }
    };
    Some(PortSpec { protocol, port })
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

//! The model's object types: keys, validation errors, and the typed, validated namespaces,
//! pods, network policies, services and EndpointSlices the compiler reads. Nothing here
//! knows the API's shapes (that is [`super::convert`]).
use std::fmt;
use std::net::IpAddr;

use super::{IpNet, Labels, Selector};

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

    /// The name of an IP protocol number as netpol logs it: the policy protocols, ICMP and
    /// ICMPv6; `None` for any other number.
    pub fn ip_name(n: u8) -> Option<&'static str> {
        match n {
            netpol_common::PROTO_ICMP => Some("ICMP"),
            netpol_common::PROTO_ICMPV6 => Some("ICMPv6"),
            n => Protocol::from_number(n).map(Protocol::as_str),
        }
    }

    /// The IP protocol number of a name [`Protocol::ip_name`] gives, in any case.
    pub fn ip_number(name: &str) -> Option<u8> {
        match name.to_ascii_uppercase().as_str() {
            "ICMP" => Some(netpol_common::PROTO_ICMP),
            "ICMPV6" => Some(netpol_common::PROTO_ICMPV6),
            p => Protocol::parse(p).map(Protocol::number),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    /// `status.addresses` of type InternalIP or ExternalIP.
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

impl Namespace {
    /// A namespace with `labels` and the automatic name label [`NAMESPACE_NAME_LABEL`] (set
    /// as the API server sets it: it replaces a label of that key written in the object).
    pub fn new(name: impl Into<String>, mut labels: Labels) -> Namespace {
        let name = name.into();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
        Namespace { name, labels }
    }

    /// A namespace with only the automatic name label (for namespaces known only by reference).
    pub fn implicit(name: &str) -> Namespace {
        Namespace::new(name, Labels::new())
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
        self.ports.iter().filter(move |p| p.protocol == protocol && p.name.as_deref() == Some(name)).map(|p| p.port)
    }

    /// Pods that policies can select: not host-network, and with an address.
    pub fn selectable(&self) -> bool {
        !self.host_network && !self.ips.is_empty()
    }

    /// Scheduled on `node` (any pod there, host-network or not, with an address or not).
    pub fn is_on(&self, node: &str) -> bool {
        self.node_name.as_deref() == Some(node)
    }

    /// A pod-network pod with no address yet (the CNI is wiring it).
    pub fn awaits_address(&self) -> bool {
        !self.host_network && self.ips.is_empty()
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
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods selected by `pods` in the namespaces selected by `namespaces` (`None`: the
    /// policy's own namespace).
    Pods {
        namespaces: Option<Selector>,
        pods: Selector,
    },
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
    /// isolating what it selects with no allows (see [`super::policy_from_k8s`]).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_protocol_names_and_numbers_agree() {
        for (n, name) in [(6, "TCP"), (17, "UDP"), (132, "SCTP"), (1, "ICMP"), (58, "ICMPv6")] {
            assert_eq!(Protocol::ip_name(n), Some(name));
            assert_eq!(Protocol::ip_number(name), Some(n));
            assert_eq!(Protocol::ip_number(&name.to_ascii_lowercase()), Some(n));
        }
        assert_eq!((Protocol::ip_name(47), Protocol::ip_number("GRE")), (None, None));
    }
}

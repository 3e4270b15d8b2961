//! Namespaces, pods, services, EndpointSlices and nodes from their API objects: the fields the
//! compiler reads, checked.
use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Node as K8sNode, Pod as K8sPod, PodSpec, PodStatus, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice as K8sEndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{meta_key, protocol, valid_port_name, Errs};
use crate::model::{ContainerPort, EndpointSlice, FieldError, Namespace, Node, Pod, Protocol, Service, ServicePort, TargetPort};

pub fn namespace_from_k8s(ns: &K8sNamespace) -> Result<Namespace, FieldError> {
    let key = meta_key("Namespace", &ns.metadata, false)?;
    Ok(Namespace::new(key.name, ns.metadata.labels.clone().unwrap_or_default()))
}

/// The `status.addresses` types that are IP addresses of the node (`Hostname` and the DNS
/// types are names): what a ClusterNetworkPolicy `nodes` peer matches.
const NODE_IP_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// Converts an API node: its labels and its InternalIP and ExternalIP addresses (each once).
/// An address of those types that does not parse is reported (second of the pair) and left
/// out; the node is kept with the others, since dropping it would leave every one of its
/// addresses unmatched by the peers selecting it.
pub fn node_from_k8s(node: &K8sNode) -> Result<(Node, Vec<FieldError>), FieldError> {
    let Some(name) = node.metadata.name.clone().filter(|n| !n.is_empty()) else {
        return Err(FieldError { object: "<unnamed>".into(), field: "metadata.name".into(), message: "is required".into() });
    };
    let object = name.clone();
    let mut errs = Errs { object: &object, list: vec![] };
    let mut addresses: Vec<IpAddr> = Vec::new();
    let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in listed.into_iter().flatten().enumerate() {
        if !NODE_IP_TYPES.contains(&a.type_.as_str()) {
            continue;
        }
        match a.address.parse::<IpAddr>() {
            Ok(ip) if !addresses.contains(&ip) => addresses.push(ip),
            Ok(_) => {}
            Err(_) => errs.push(format!("status.addresses[{i}].address"), format!("invalid IP address {:?} (type {})", a.address, a.type_)),
        }
    }
    let labels = node.metadata.labels.clone().unwrap_or_default();
    Ok((Node { name, labels, addresses }, errs.list))
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
    let ips = status.map(|st| pod_ips(&mut errs, st)).unwrap_or_default();
    let ports = spec.map(|spec| container_ports(&mut errs, spec)).unwrap_or_default();
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

/// `status.podIPs` and `status.podIP` (first), each address once.
fn pod_ips(errs: &mut Errs, st: &PodStatus) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = Vec::new();
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
    ips
}

/// The ports of every container and init container.
fn container_ports(errs: &mut Errs, spec: &PodSpec) -> Vec<ContainerPort> {
    let mut ports = Vec::new();
    let containers = spec.containers.iter().map(|c| ("containers", c));
    let inits = spec.init_containers.iter().flatten().map(|c| ("initContainers", c));
    let mut idx: BTreeMap<&str, usize> = BTreeMap::new();
    for (field, c) in containers.chain(inits) {
        let ci = idx.entry(field).or_default();
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let path = format!("spec.{field}[{}].ports[{pi}]", *ci);
            let Some(protocol) = protocol(errs, &path, p.protocol.as_deref()) else { continue };
            if !(1..=65535).contains(&p.container_port) {
                errs.push(format!("{path}.containerPort"), format!("{} is not in 1-65535", p.container_port));
                continue;
            }
            ports.push(ContainerPort { name: p.name.clone(), port: p.container_port as u16, protocol });
        }
        *ci += 1;
    }
    ports
}

pub fn service_from_k8s(svc: &K8sService) -> Result<Option<Service>, Vec<FieldError>> {
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

pub fn endpoint_slice_from_k8s(es: &K8sEndpointSlice) -> Result<Option<EndpointSlice>, Vec<FieldError>> {
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

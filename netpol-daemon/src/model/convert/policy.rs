//! NetworkPolicies from their API objects: every field validated as the API server validates
//! it, and the fail-closed stand-in of a policy that fails validation.
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{meta_key, protocol, valid_port_name, Errs};
use crate::model::{cidr, FieldError, IpBlock, ObjKey, Peer, Policy, PortRef, PortSpec, Rule, Selector, AUDIT_ANNOTATION};

/// Appended to a NetworkPolicy's validation errors where they are reported.
pub const FAIL_CLOSED_NOTE: &str = " (enforced fail-closed: the policy isolates the pods it selects and allows nothing)";

/// How a validation problem of a NetworkPolicy is reported: `NetworkPolicy NS/NAME: FIELD: WHAT`
/// and [`FAIL_CLOSED_NOTE`] (the load error the daemon logs).
pub(super) fn fail_closed_message(problem: &dyn std::fmt::Display) -> String {
    format!("NetworkPolicy {problem}{FAIL_CLOSED_NOTE}")
}

/// The reported message of a policy's first validation problem (`None` for a valid policy):
/// the same text as its first load error, so that what is said about the policy elsewhere
/// (a Kubernetes Event on it) reads as the log line does.
pub fn invalid_policy_message(policy: &Policy) -> Option<String> {
    policy.invalid.as_ref().map(|first| fail_closed_message(first))
}

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
    let (isolates_ingress, isolates_egress, types_unreadable) = policy_types(&mut errs, spec);
    let audit = audit_mode(&mut warnings, np);
    let policy = if errs.list.is_empty() {
        Policy {
            key,
            pod_selector: pod_selector.unwrap_or_default(),
            ingress,
            egress,
            isolates_ingress,
            isolates_egress,
            audit,
            invalid: None,
        }
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

/// Which directions the policy isolates (`policyTypes`, defaulted from the rules when absent
/// or empty), and whether `policyTypes` held a value that is not a policy type.
fn policy_types(errs: &mut Errs, spec: &NetworkPolicySpec) -> (bool, bool, bool) {
    let defaulted = (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()), false);
    let Some(types) = &spec.policy_types else { return defaulted };
    if types.is_empty() {
        // An explicitly empty list behaves as if it were not set.
        return defaulted;
    }
    let (mut i, mut e, mut unreadable) = (false, false, false);
    for (n, t) in types.iter().enumerate() {
        match t.as_str() {
            "Ingress" => i = true,
            "Egress" => e = true,
            other => {
                unreadable = true;
                errs.push(format!("spec.policyTypes[{n}]"), format!("unknown policy type {other:?} (want Ingress or Egress)"))
            }
        }
    }
    (i, e, unreadable)
}

/// The audit annotation. Only "true" puts a policy in audit mode: any other value (a typo,
/// "yes") is reported and the policy enforced as written, never silently relaxed.
fn audit_mode(warnings: &mut Errs, np: &NetworkPolicy) -> bool {
    match np.metadata.annotations.as_ref().and_then(|a| a.get(AUDIT_ANNOTATION)).map(|v| v.as_str()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            warnings.push(
                format!("metadata.annotations[{AUDIT_ANNOTATION}]"),
                format!("{other:?} is not \"true\" or \"false\"; ignored: the policy is enforced"),
            );
            false
        }
    }
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

fn rule(errs: &mut Errs, base: &str, peer_field: &str, peers: Option<&[NetworkPolicyPeer]>, ports: Option<&[NetworkPolicyPort]>) -> Rule {
    let peers = valid_items(errs, peers, |i| format!("{base}.{peer_field}[{i}]"), peer);
    let ports = valid_items(errs, ports, |i| format!("{base}.ports[{i}]"), port);
    Rule { peers, ports }
}

/// The valid items of a rule's `from`/`to` or `ports` list, each checked at its path (`None`:
/// the list is empty or absent, which means every peer or every port).
fn valid_items<T, U>(
    errs: &mut Errs,
    list: Option<&[T]>,
    path: impl Fn(usize) -> String,
    one: fn(&mut Errs, &str, &T) -> Option<U>,
) -> Option<Vec<U>> {
    match list {
        None | Some([]) => None,
        Some(list) => Some(list.iter().enumerate().filter_map(|(i, x)| one(errs, &path(i), x)).collect()),
    }
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
            let (cidr, cidr_len) = match cidr::parse_api(&b.cidr) {
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
                match cidr::parse_api(e) {
                    Ok((c, len)) if cidr.contains(&c.addr()) && len > cidr_len => except.push(c),
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

//! `netpol-daemon status` (alias `inspect`): what this node's pinned maps enforce, read back
//! from the pins ([`crate::datapath::inspect`]), as text for people or as one JSON document.
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::Output;
use crate::datapath::inspect::{Allowed, DirectionRules, Endpoint, MapFill, Packets, Rule, Select, Snapshot};

/// The report for `pin_dir`: every endpoint, or with `select` one endpoint and what it
/// allows.
pub fn status(pin_dir: &Path, select: Option<&Select>, output: Output) -> Result<String> {
    let snap = Snapshot::read(pin_dir)?;
    let Some(sel) = select else {
        let report = NodeReport {
            pin_dir: &snap.pin_dir,
            names_table: snap.names_table,
            maps: &snap.maps,
            node_addresses: &snap.node_addrs,
            conntrack: snap.conntrack,
            endpoints: &snap.endpoints,
        };
        return Ok(output.render(&report, |_| node_text(&snap)));
    };
    let endpoint = snap.find(sel)?;
    let [ingress, egress] = snap.rules(endpoint);
    let report = PodReport { pin_dir: &snap.pin_dir, endpoint, ingress, egress };
    Ok(output.render(&report, pod_text))
}

/// The node's endpoints and maps, as the JSON document has them.
#[derive(Serialize)]
struct NodeReport<'a> {
    pin_dir: &'a Path,
    names_table: bool,
    maps: &'a [MapFill],
    node_addresses: &'a [IpAddr],
    conntrack: u64,
    endpoints: &'a [Endpoint],
}

/// One endpoint and what its entries allow each way.
#[derive(Serialize)]
struct PodReport<'a> {
    pin_dir: &'a Path,
    endpoint: &'a Endpoint,
    ingress: DirectionRules,
    egress: DirectionRules,
}

fn pod_text(r: &PodReport) -> String {
    let mut out = String::new();
    endpoint_text(r.endpoint, &mut out);
    for d in [&r.ingress, &r.egress] {
        direction_text(d, &mut out);
    }
    out
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(", ")
}

fn isolation(isolated: bool, audit: bool, fail_closed: bool) -> &'static str {
    match (isolated, audit, fail_closed) {
        (false, _, _) => "open",
        (true, _, true) => "fail-closed",
        (true, true, false) => "audit",
        (true, false, false) => "isolated",
    }
}

fn node_text(snap: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "pins: {} (what the maps hold now, read from the pins)", snap.pin_dir.display());
    let maps: Vec<String> = snap
        .maps
        .iter()
        .map(|m| format!("{} {}/{} ({:.1}%)", m.map, m.entries, m.capacity, 100.0 * m.entries as f64 / m.capacity.max(1) as f64))
        .collect();
    let _ = writeln!(out, "maps: {}", maps.join(", "));
    let _ = writeln!(
        out,
        "node addresses (always let in): {}",
        if snap.node_addrs.is_empty() { "none".into() } else { join(&snap.node_addrs) }
    );
    let _ = writeln!(out, "tracked flows: {}", snap.conntrack);
    if !snap.names_table {
        let _ = writeln!(out, "(no ENDPOINT_NAMES table: pods are not named; select endpoints with --ip or --ifname)");
    }
    let _ = writeln!(out, "endpoints: {}", snap.endpoints.len());
    let mut rows =
        vec![["IFINDEX", "INTERFACE", "POD", "ID", "ADDRESSES", "INGRESS", "EGRESS", "ATTACH", "POLICY", "FLOWS", "ALLOWED", "DENIED"]
            .map(String::from)
            .to_vec()];
    for e in &snap.endpoints {
        let sum = |f: fn(&Packets) -> u64| f(&e.ingress_packets) + f(&e.egress_packets);
        rows.push(vec![
            e.ifindex.to_string(),
            e.ifname.clone().unwrap_or_else(|| format!("({}?)", e.programmed_ifname.as_deref().unwrap_or("gone"))),
            e.pod.clone().unwrap_or_else(|| "-".into()),
            e.id.to_string(),
            if e.addresses.is_empty() { "none".into() } else { join(&e.addresses) },
            isolation(e.isolated_ingress, e.audit_ingress, e.fail_closed).into(),
            isolation(e.isolated_egress, e.audit_egress, e.fail_closed).into(),
            serde_json::to_value(e.attach).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            e.policy_entries.to_string(),
            e.conntrack.to_string(),
            sum(|p| p.allow + p.audit).to_string(),
            sum(|p| p.deny + p.spoofed).to_string(),
        ]);
    }
    table(&rows, &mut out);
    out
}

/// Rows as columns padded to their widest cell.
fn table(rows: &[Vec<String>], out: &mut String) {
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for r in rows {
        let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
}

fn endpoint_text(e: &Endpoint, out: &mut String) {
    let _ = writeln!(out, "endpoint {}", e.label());
    let ifname = match (&e.ifname, &e.programmed_ifname) {
        (Some(n), _) => n.clone(),
        (None, Some(p)) => format!("{p} (no such interface in this network namespace)"),
        (None, None) => "(no such interface in this network namespace)".into(),
    };
    let attach = serde_json::to_value(e.attach).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    let _ = writeln!(out, "  interface {ifname} (ifindex {}), endpoint id {}, attached: {attach}", e.ifindex, e.id);
    let _ = writeln!(
        out,
        "  addresses: {}",
        if e.addresses.is_empty() { "none (sends nothing but ARP and neighbour discovery)".into() } else { join(&e.addresses) }
    );
    let _ =
        writeln!(out, "  fail-closed: {}", if e.fail_closed { "yes (the daemon could not fit its entries into the maps)" } else { "no" });
    let p = |p: &Packets| format!("{} allowed, {} denied, {} audit, {} spoofed", p.allow, p.deny, p.audit, p.spoofed);
    let _ = writeln!(out, "  packets: ingress {}; egress {}", p(&e.ingress_packets), p(&e.egress_packets));
    let _ = writeln!(out, "  tracked flows: {}, POLICY entries: {}", e.conntrack, e.policy_entries);
}

fn direction_text(d: &DirectionRules, out: &mut String) {
    let (from, dir) = if d.direction == "ingress" { ("from", "ingress") } else { ("to", "egress") };
    if !d.isolated {
        let _ = writeln!(out, "{dir}: not isolated: everything passes");
        for r in &d.rules {
            let _ = writeln!(out, "  (entry not consulted) {from} {}: {}", peers(r), allowed(&r.allowed));
        }
        return;
    }
    // Failing closed, the daemon wrote no entries for the endpoint (the maps could not hold
    // them): what is listed below is what the maps hold all the same.
    let how = match (d.fail_closed, d.audit) {
        (true, _) => "isolated, failing closed (the maps could not hold its entries; its drops count as fail_closed)",
        (false, true) => "isolated by audit-mode policies only: what no entry below allows passes, counted as audit",
        (false, false) => "isolated",
    };
    let _ = writeln!(out, "{dir}: {how}");
    if !d.node_addresses.is_empty() {
        let _ = writeln!(out, "  {from} the node ({}): everything", join(&d.node_addresses));
    }
    for r in &d.rules {
        let _ = writeln!(out, "  {from} {}: {}", peers(r), allowed(&r.allowed));
    }
    let other = d.any_other.as_ref().map(allowed).unwrap_or_else(|| "nothing".into());
    let _ = writeln!(out, "  {from} any other address: {other}");
}

/// A rule's peer class: its pods (by address) and prefixes (and excepts), and the class id.
fn peers(r: &Rule) -> String {
    if r.peers.is_empty() {
        return format!("class {} (no address maps to it)", r.identity);
    }
    let list: Vec<String> = r
        .peers
        .iter()
        .map(|p| match (&p.pod, p.except.is_empty()) {
            (Some(pod), _) => format!("{pod} ({})", p.cidr),
            (None, true) => p.cidr.clone(),
            (None, false) => format!("{} except {}", p.cidr, p.except.join(", ")),
        })
        .collect();
    format!("{} (class {})", list.join(", "), r.identity)
}

/// What an entry allows: "everything", or its ports per protocol.
fn allowed(a: &Allowed) -> String {
    match a {
        Allowed::All { .. } => "everything".into(),
        Allowed::Ports { portset, ports, other_slot: None } if ports.is_empty() => format!("nothing (port set {portset} has no entries)"),
        Allowed::Ports { ports, other_slot, .. } => {
            let mut by_proto: Vec<(String, Vec<String>)> = Vec::new();
            for r in ports {
                let text = match (r.from, r.to) {
                    (0, 65535) => "all ports".to_string(),
                    (a, b) if a == b => a.to_string(),
                    (a, b) => format!("{a}-{b}"),
                };
                match by_proto.iter_mut().find(|(p, _)| *p == r.protocol) {
                    Some((_, v)) => v.push(text),
                    None => by_proto.push((r.protocol.clone(), vec![text])),
                }
            }
            let mut parts: Vec<String> = by_proto.iter().map(|(p, v)| format!("{p} {}", v.join(", "))).collect();
            if other_slot.is_some() {
                parts.push("other protocols (ICMP...)".into());
            }
            parts.join("; ")
        }
    }
}

/// `--pod NS/POD`, `--ip ADDR` or `--ifname NAME` (at most one) as a selection.
pub fn select(pod: Option<&str>, ip: Option<IpAddr>, ifname: Option<&str>) -> Result<Option<Select>> {
    Ok(match (pod, ip, ifname) {
        (Some(p), None, None) => {
            let (ns, name) = p.split_once('/').ok_or_else(|| anyhow::anyhow!("--pod {p:?}: want NAMESPACE/POD"))?;
            Some(Select::Pod(crate::model::ObjKey::new(ns, name)))
        }
        (None, Some(ip), None) => Some(Select::Ip(ip)),
        (None, None, Some(n)) => Some(Select::Ifname(n.to_string())),
        (None, None, None) => None,
        _ => anyhow::bail!("--pod, --ip and --ifname choose one endpoint: give at most one"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::inspect::{PeerPrefix, PortRange};

    #[test]
    fn rules_read_as_peers_and_ports() {
        let r = |p: &str, from, to| PortRange { protocol: p.into(), from, to, slot: 0 };
        let a =
            Allowed::Ports { portset: 3, ports: vec![r("TCP", 8000, 8100), r("TCP", 9092, 9092), r("UDP", 0, 65535)], other_slot: None };
        assert_eq!(allowed(&a), "TCP 8000-8100, 9092; UDP all ports");
        assert_eq!(allowed(&Allowed::Ports { portset: 4, ports: vec![], other_slot: None }), "nothing (port set 4 has no entries)");
        assert_eq!(allowed(&Allowed::All { slot: 1 }), "everything");
        let rule = Rule {
            identity: 5,
            peers: vec![
                PeerPrefix { cidr: "192.168.77.0/24".into(), except: vec!["192.168.77.5".into()], pod: None },
                PeerPrefix { cidr: "10.0.0.1".into(), except: vec![], pod: None },
                PeerPrefix { cidr: "10.0.0.2".into(), except: vec![], pod: Some("apps/api".into()) },
            ],
            allowed: a,
        };
        assert_eq!(peers(&rule), "192.168.77.0/24 except 192.168.77.5, 10.0.0.1, apps/api (10.0.0.2) (class 5)");
        assert!(select(Some("a/b"), Some("10.0.0.1".parse().unwrap()), None).is_err());
        assert!(select(Some("nope"), None, None).is_err());
    }
}

//! The policy tables read back (`IDENTITIES`, `POLICY`, `POLICY_PORTS`) and turned into what
//! an endpoint allows per direction: for each peer class with an entry, the class as the
//! prefixes that map to it (less the longer prefixes inside them that map elsewhere, as the
//! longest-prefix match decides), and the protocol and port ranges of its port set (the
//! port prefixes merged back into ranges, each with the policy slot the longest prefix
//! carries); then what the endpoint's identity-0 entry gives every other address.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;

use anyhow::Result;
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Map, MapData};
use ipnet::IpNet;
use netpol_common::*;
use serde::Serialize;

use super::{capacity, from_bytes, net, open_pin, MapFill};
use crate::datapath::pressure;

/// A prefix of a peer class, less the longer prefixes inside it that belong to other classes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerPrefix {
    pub cidr: String,
    pub except: Vec<String>,
    /// A single address that is a pod's: the pod (`NS/POD`, from `PEER_NAMES`, or from
    /// `ENDPOINT_NAMES` for a local pod's address).
    pub pod: Option<String>,
}

/// A protocol's port range of a port set, and the policy slot that allows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortRange {
    pub protocol: String,
    pub from: u16,
    pub to: u16,
    pub slot: u32,
}

/// What a `POLICY` entry allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Allowed {
    /// Every protocol and port (`POLICY_ALLOW_ALL`).
    All { slot: u32 },
    /// The ports of set `portset` (empty: the set has no `POLICY_PORTS` entry, nothing passes;
    /// `portset` 0: one port, held in the entry itself, `POLICY_ONE_PORT`),
    /// and with `other_slot`, every protocol other than TCP, UDP and SCTP (`POLICY_ALLOW_OTHER`).
    Ports {
        portset: u32,
        ports: Vec<PortRange>,
        #[serde(skip_serializing_if = "Option::is_none")]
        other_slot: Option<u32>,
    },
}

/// One `POLICY` entry of an endpoint and direction: the peer class and what it may do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub identity: u32,
    /// The addresses of the class (no prefix maps to it: empty, the entry matches nothing).
    pub peers: Vec<PeerPrefix>,
    pub allowed: Allowed,
}

/// What an endpoint's entries allow in one direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectionRules {
    pub direction: &'static str,
    pub isolated: bool,
    /// Only audit-mode policies isolate it: what they deny passes (counted as audit).
    pub audit: bool,
    /// The endpoint fails closed (`EP_FAIL_CLOSED`): the daemon could not fit its entries
    /// into the maps and wrote none (the entries listed are what the maps hold all the same);
    /// its drops count as fail_closed.
    pub fail_closed: bool,
    /// Ingress: the node's addresses, always let in.
    pub node_addresses: Vec<IpAddr>,
    pub rules: Vec<Rule>,
    /// Every address in no class with an entry of its own: the identity-0 entry (`None`:
    /// nothing).
    pub any_other: Option<Allowed>,
}

/// How an endpoint is isolated in one direction (its `ENDPOINTS` flags).
#[derive(Clone, Copy, Debug)]
pub struct Isolation {
    pub isolated: bool,
    /// Only by audit-mode policies.
    pub audit: bool,
    pub fail_closed: bool,
}

/// The three policy tables as read.
pub(super) struct Tables {
    /// `IDENTITIES`: prefix -> class.
    identities: Vec<(IpNet, u32)>,
    policy: Vec<(PolicyKey, PolicyValue)>,
    /// `POLICY_PORTS` by port set: (protocol, first port, prefix bits of the port, slot).
    ports: BTreeMap<u32, Vec<(u8, u16, u32, u32)>>,
}

impl Tables {
    pub fn read(pin_dir: &Path, fill: &mut Vec<MapFill>) -> Result<Tables> {
        let md = open_pin(pin_dir, maps::IDENTITIES)?;
        let cap = capacity(&md);
        let trie: LpmTrie<MapData, IdKey, u32> = LpmTrie::try_from(Map::from_map_data(md)?)?;
        let mut identities = Vec::new();
        for item in trie.iter() {
            let (k, id) = item?;
            let d = k.data();
            if let Some(n) = net(d.family, d.addr, k.prefix_len().saturating_sub(ID_KEY_FIXED_BITS)) {
                identities.push((n, id));
            }
        }
        fill.push(MapFill { map: maps::IDENTITIES, entries: identities.len() as u64, capacity: cap });

        let md = open_pin(pin_dir, maps::POLICY)?;
        let mut policy = Vec::new();
        let n = pressure::for_each_entry(&md, POLICY_MAX, |k, v| policy.push((from_bytes::<PolicyKey>(k), from_bytes::<PolicyValue>(v))))?;
        fill.push(MapFill { map: maps::POLICY, entries: n, capacity: capacity(&md) });

        let md = open_pin(pin_dir, maps::POLICY_PORTS)?;
        let cap = capacity(&md);
        let trie: LpmTrie<MapData, PortKey, PortValue> = LpmTrie::try_from(Map::from_map_data(md)?)?;
        let (mut ports, mut n): (BTreeMap<u32, Vec<_>>, u64) = (BTreeMap::new(), 0);
        for item in trie.iter() {
            let (k, v) = item?;
            let d = k.data();
            let bits = k.prefix_len().saturating_sub(PORT_KEY_FIXED_BITS).min(16);
            ports.entry(d.portset).or_default().push((d.proto, u16::from_be_bytes(d.port), bits, v.slot));
            n += 1;
        }
        fill.push(MapFill { map: maps::POLICY_PORTS, entries: n, capacity: cap });
        Ok(Tables { identities, policy, ports })
    }

    /// `POLICY` entries per endpoint id.
    pub fn entries_per_endpoint(&self) -> BTreeMap<u32, usize> {
        let mut out = BTreeMap::new();
        for (k, _) in &self.policy {
            *out.entry(k.endpoint).or_default() += 1;
        }
        out
    }

    /// What endpoint `id`'s entries allow in direction `dir`, the peers' addresses named by
    /// `pods`.
    pub fn direction(&self, id: u32, dir: u8, how: Isolation, node: Vec<IpAddr>, pods: &BTreeMap<IpAddr, String>) -> DirectionRules {
        let Isolation { isolated, audit, fail_closed } = how;
        let direction = if dir == DIR_INGRESS { "ingress" } else { "egress" };
        let mut entries: Vec<&(PolicyKey, PolicyValue)> = self.policy.iter().filter(|(k, _)| k.endpoint == id && k.dir == dir).collect();
        entries.sort_by_key(|(k, _)| k.identity);
        let classes = Classes::new(&self.identities);
        let mut rules = Vec::new();
        let mut any_other = None;
        for (k, v) in entries {
            let allowed = self.allowed(v);
            if k.identity == 0 {
                any_other = Some(allowed);
            } else {
                let mut peers = classes.prefixes_of(k.identity);
                for p in &mut peers {
                    p.pod = p.cidr.parse::<IpAddr>().ok().and_then(|ip| pods.get(&ip).cloned());
                }
                rules.push(Rule { identity: k.identity, peers, allowed });
            }
        }
        DirectionRules { direction, isolated, audit, fail_closed, node_addresses: node, rules, any_other }
    }

    fn allowed(&self, v: &PolicyValue) -> Allowed {
        if v.flags & POLICY_ALLOW_ALL != 0 {
            return Allowed::All { slot: (v.flags >> POLICY_SLOT_SHIFT) & 0xff };
        }
        let other_slot = (v.flags & POLICY_ALLOW_OTHER != 0).then_some((v.flags >> POLICY_SLOT_SHIFT) & 0xff);
        if let Some((proto, port, slot)) = v.one_port() {
            return Allowed::Ports { portset: 0, ports: vec![range(proto, port as u32, port as u32, slot)], other_slot };
        }
        let entries = self.ports.get(&v.portset).map(Vec::as_slice).unwrap_or(&[]);
        Allowed::Ports { portset: v.portset, ports: port_ranges(entries), other_slot }
    }
}

/// The name of an IP protocol number.
pub fn protocol_name(p: u8) -> String {
    match p {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_SCTP => "SCTP".into(),
        n => format!("protocol {n}"),
    }
}

/// Port prefixes (protocol, first port, prefix bits, slot) as the ranges a lookup matches:
/// per protocol, the ports some prefix covers, each with the slot of the longest covering
/// prefix, adjacent ports of the same slot merged.
fn port_ranges(entries: &[(u8, u16, u32, u32)]) -> Vec<PortRange> {
    let mut by_proto: BTreeMap<u8, Vec<(u32, u32, u32, u32)>> = BTreeMap::new();
    for &(proto, first, bits, slot) in entries {
        let size = 1u32 << (16 - bits);
        let lo = first as u32 & !(size - 1);
        by_proto.entry(proto).or_default().push((lo, lo + size - 1, bits, slot));
    }
    let mut out = Vec::new();
    for (proto, prefixes) in by_proto {
        // Elementary intervals between every prefix's ends.
        let mut cuts: Vec<u32> = prefixes.iter().flat_map(|(lo, hi, _, _)| [*lo, hi + 1]).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut cur: Option<(u32, u32, u32)> = None;
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1] - 1);
            let best = prefixes.iter().filter(|(lo, hi, _, _)| *lo <= a && *hi >= b).max_by_key(|(_, _, bits, _)| *bits);
            let Some(&(_, _, _, slot)) = best else {
                out.extend(cur.take().map(|(lo, hi, slot)| range(proto, lo, hi, slot)));
                continue;
            };
            cur = match cur {
                Some((lo, hi, s)) if s == slot && hi + 1 == a => Some((lo, b, s)),
                other => {
                    out.extend(other.map(|(lo, hi, slot)| range(proto, lo, hi, slot)));
                    Some((a, b, slot))
                }
            };
        }
        out.extend(cur.map(|(lo, hi, slot)| range(proto, lo, hi, slot)));
    }
    out
}

fn range(proto: u8, lo: u32, hi: u32, slot: u32) -> PortRange {
    PortRange { protocol: protocol_name(proto), from: lo as u16, to: hi as u16, slot }
}

/// The prefixes of `IDENTITIES` as a tree: each prefix's class and the prefixes directly
/// inside it.
struct Classes<'a> {
    class: HashMap<IpNet, u32>,
    children: HashMap<IpNet, Vec<IpNet>>,
    all: &'a [(IpNet, u32)],
}

impl<'a> Classes<'a> {
    fn new(all: &'a [(IpNet, u32)]) -> Classes<'a> {
        let class: HashMap<IpNet, u32> = all.iter().copied().collect();
        let mut children: HashMap<IpNet, Vec<IpNet>> = HashMap::new();
        for (p, _) in all {
            if let Some(parent) = parent_of(&class, p) {
                children.entry(parent).or_default().push(*p);
            }
        }
        Classes { class, children, all }
    }

    /// Class `id` as its outermost prefixes (those not inside a prefix of the same class),
    /// each less the prefixes inside it of other classes.
    fn prefixes_of(&self, id: u32) -> Vec<PeerPrefix> {
        let mut out: Vec<(IpNet, Vec<IpNet>)> = self
            .all
            .iter()
            .filter(|(p, c)| *c == id && parent_of(&self.class, p).is_none_or(|q| self.class[&q] != id))
            .map(|(p, _)| {
                let mut except = Vec::new();
                self.excepts(p, id, &mut except);
                except.sort();
                (*p, except)
            })
            .collect();
        out.sort();
        out.into_iter().map(|(p, ex)| PeerPrefix { cidr: show(&p), except: ex.iter().map(show).collect(), pod: None }).collect()
    }

    /// The outermost prefixes inside `p` (through prefixes of class `id`) of another class.
    fn excepts(&self, p: &IpNet, id: u32, out: &mut Vec<IpNet>) {
        for c in self.children.get(p).into_iter().flatten() {
            if self.class[c] == id {
                self.excepts(c, id, out);
            } else {
                out.push(*c);
            }
        }
    }
}

/// The longest prefix of the table strictly containing `p`.
fn parent_of(class: &HashMap<IpNet, u32>, p: &IpNet) -> Option<IpNet> {
    (0..p.prefix_len()).rev().map(|len| IpNet::new(p.addr(), len).expect("shorter prefix").trunc()).find(|q| class.contains_key(q))
}

/// A host prefix as its address, others as CIDRs.
fn show(p: &IpNet) -> String {
    if p.prefix_len() == p.max_prefix_len() {
        p.addr().to_string()
    } else {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn classes_read_back_as_prefixes_less_what_longer_prefixes_take() {
        // 10.0.0.0/8 except 10.1.0.0/16 (class 2), inside which 10.1.2.0/24 is class 1 again;
        // a /32 of its own class; an IPv6 prefix of class 1 too.
        let t = [(n("10.0.0.0/8"), 1), (n("10.1.0.0/16"), 2), (n("10.1.2.0/24"), 1), (n("10.9.0.5/32"), 3), (n("fd00::/64"), 1)];
        let c = Classes::new(&t);
        let p = |cidr: &str, except: &[&str]| PeerPrefix {
            cidr: cidr.into(),
            except: except.iter().map(|s| s.to_string()).collect(),
            pod: None,
        };
        assert_eq!(c.prefixes_of(1), vec![p("10.0.0.0/8", &["10.1.0.0/16", "10.9.0.5"]), p("10.1.2.0/24", &[]), p("fd00::/64", &[])]);
        assert_eq!(c.prefixes_of(2), vec![p("10.1.0.0/16", &["10.1.2.0/24"])]);
        assert_eq!(c.prefixes_of(3), vec![p("10.9.0.5", &[])]);
        assert_eq!(c.prefixes_of(4), vec![]);
    }

    #[test]
    fn port_prefixes_merge_back_into_the_ranges_they_came_from() {
        let mut entries = Vec::new();
        let mut add = |proto: u8, lo: u16, hi: u16, slot: u32| {
            for (v, bits) in crate::entries::port_prefixes(lo, hi) {
                entries.push((proto, v, bits as u32, slot));
            }
        };
        add(PROTO_TCP, 8000, 8100, 0);
        add(PROTO_TCP, 9092, 9092, 1);
        add(PROTO_UDP, 0, 65535, 2);
        let got = port_ranges(&entries);
        let r = |p: &str, from, to, slot| PortRange { protocol: p.into(), from, to, slot };
        assert_eq!(got, vec![r("TCP", 8000, 8100, 0), r("TCP", 9092, 9092, 1), r("UDP", 0, 65535, 2)]);
        // Overlapping prefixes (as a hand-edited map may hold): the longest decides the slot.
        let got = port_ranges(&[(PROTO_TCP, 0, 0, 5), (PROTO_TCP, 80, 16, 6)]);
        assert_eq!(got, vec![r("TCP", 0, 79, 5), r("TCP", 80, 80, 6), r("TCP", 81, 65535, 5)]);
    }
}

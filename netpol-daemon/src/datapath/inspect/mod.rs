//! What this node's maps actually enforce, read back from the pins (`netpol-daemon status`):
//! every endpoint of `ENDPOINTS` with its addresses, isolation, fail-closed state, attachment
//! (a pinned TCX link or netpol's tc filter) and entry counts, each map's fill against its
//! capacity, and per endpoint and direction the peer classes and ports its `POLICY` entries
//! allow ([`rules`]). Nothing here comes from the compiler or the daemon: it opens the pinned
//! maps read-only, so it works while no daemon runs, and shows a hand-edited entry as the
//! programs see it. Pod names come from `ENDPOINT_NAMES`, the table the daemon writes beside
//! the maps for this ([`super::names`]).
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use ipnet::IpNet;
use netpol_common::*;
use serde::Serialize;

use super::counters::CounterReader;
use super::{names, pressure, tc};
use crate::model::cidr::addr_from_bytes;
use crate::model::ObjKey;

mod rules;
pub use rules::{Allowed, DirectionRules, Isolation, PeerPrefix, PortRange, Rule};

/// How an endpoint's programs are attached, as found now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attach {
    /// Both pinned TCX links (`<pin dir>/links/<ifindex>-from`, `-to`).
    Tcx,
    /// netpol's clsact filters on both hooks of the interface.
    Tc,
    /// Only some of them (a daemon attaching or detaching).
    Partial,
    /// None found: in this network namespace the interface has no netpol filter and no
    /// pinned link names it (run `status` in the node's network namespace).
    None,
}

/// Packets per verdict of one direction (the `COUNTERS` of the endpoint, summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Packets {
    pub allow: u64,
    pub deny: u64,
    pub audit: u64,
    pub spoofed: u64,
}

/// One entry of `ENDPOINTS` and what the other maps hold for it.
#[derive(Clone, Debug, Serialize)]
pub struct Endpoint {
    pub ifindex: u32,
    /// The interface's name in this network namespace now (`None`: no interface there has
    /// this ifindex).
    pub ifname: Option<String>,
    /// The pod, from `ENDPOINT_NAMES` (`None`: not in that table).
    pub pod: Option<String>,
    /// The interface's name when the daemon programmed it (from `ENDPOINT_NAMES`).
    pub programmed_ifname: Option<String>,
    pub id: u32,
    pub isolated_ingress: bool,
    pub isolated_egress: bool,
    pub audit_ingress: bool,
    pub audit_egress: bool,
    pub fail_closed: bool,
    /// Its own addresses (`ENDPOINT_ADDRS`: the sources it may send from).
    pub addresses: Vec<IpAddr>,
    pub attach: Attach,
    /// Its `POLICY` entries (both directions).
    pub policy_entries: usize,
    /// Tracked flows of the endpoint (`CONNTRACK2`, both directions).
    pub conntrack: u64,
    pub ingress_packets: Packets,
    pub egress_packets: Packets,
}

impl Endpoint {
    /// `NS/POD` if the names table has it, else the interface.
    pub fn label(&self) -> String {
        self.pod.clone().or_else(|| self.ifname.clone()).unwrap_or_else(|| format!("ifindex {}", self.ifindex))
    }
}

/// A map's entries against its capacity.
#[derive(Clone, Debug, Serialize)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// Which endpoint `status` describes.
#[derive(Clone, Debug)]
pub enum Select {
    /// By pod, through `ENDPOINT_NAMES`.
    Pod(ObjKey),
    /// By one of its addresses (`ENDPOINT_ADDRS`, or the IPv4 address in its entry).
    Ip(IpAddr),
    /// By its interface's name in this network namespace (or as the daemon programmed it).
    Ifname(String),
}

/// Everything read from the pins at one moment.
pub struct Snapshot {
    pub pin_dir: PathBuf,
    pub endpoints: Vec<Endpoint>,
    pub maps: Vec<MapFill>,
    /// `NODE_ADDRS`: sources always let into local pods.
    pub node_addrs: Vec<IpAddr>,
    /// Tracked flows of the node.
    pub conntrack: u64,
    /// `ENDPOINT_NAMES` is pinned (a daemon of this version has synced here).
    pub names_table: bool,
    /// The pods of the addresses the tables name: `PEER_NAMES`, and the local endpoints'
    /// own addresses with their `ENDPOINT_NAMES` entry.
    pub pods_by_addr: BTreeMap<IpAddr, String>,
    tables: rules::Tables,
}

/// Opens the pin `name` under `dir`.
fn open_pin(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

fn capacity(md: &MapData) -> u64 {
    md.info().map(|i| i.max_entries() as u64).unwrap_or(0)
}

/// A `#[repr(C)]` value from the bytes a batched read gave.
fn from_bytes<T: aya::Pod>(b: &[u8]) -> T {
    assert_eq!(b.len(), std::mem::size_of::<T>(), "entry size");
    unsafe { std::ptr::read_unaligned(b.as_ptr() as *const T) }
}

/// The name of `ifindex` in this network namespace.
fn ifname_of(ifindex: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr() as *mut libc::c_char) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

fn ifindex_of(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

impl Snapshot {
    /// Reads every map under `pin_dir`. Fails, saying so, when there are no netpol pins there.
    pub fn read(pin_dir: &Path) -> Result<Snapshot> {
        if !pin_dir.join(maps::ENDPOINTS_ARRAY).exists() {
            bail!(
                "no netpol pins under {} (no {}): netpol has not run on this node with this --bpffs, or `netpol-daemon uninstall` removed them",
                pin_dir.display(),
                maps::ENDPOINTS_ARRAY
            );
        }
        let mut maps_fill = Vec::new();
        let entries = read_endpoint_table(pin_dir)?;
        maps_fill.push(MapFill { map: maps::ENDPOINTS, entries: entries.len() as u64, capacity: MAX_ENDPOINTS as u64 });
        let addrs = read_endpoint_addrs(pin_dir, &mut maps_fill)?;
        let node_addrs = read_node_addrs(pin_dir, &mut maps_fill)?;
        let tables = rules::Tables::read(pin_dir, &mut maps_fill)?;
        let (conntrack, flows) = read_conntrack(pin_dir, &mut maps_fill)?;
        let frags = open_pin(pin_dir, maps::FRAGS)?;
        maps_fill.push(MapFill { map: maps::FRAGS, entries: pressure::count_entries(&frags, FRAGS_MAX)?, capacity: capacity(&frags) });
        let names = read_names(pin_dir, &mut maps_fill)?;
        let mut pods_by_addr = read_peer_names(pin_dir, &mut maps_fill)?;
        let counters = CounterReader::open(pin_dir).ok();
        let links_dir = pin_dir.join("links");
        let policy_counts = tables.entries_per_endpoint();
        let endpoints: Vec<Endpoint> = entries
            .into_iter()
            .map(|(ifindex, info)| {
                let named = names.as_ref().and_then(|n| n.get(&ifindex)).filter(|n| n.id == info.id).map(names::decode);
                let mut addresses: Vec<IpAddr> = addrs.get(&info.id).cloned().unwrap_or_default();
                addresses.sort();
                let packets = |dir: u8| match &counters {
                    Some(c) => Packets {
                        allow: c.read(info.id, dir, VERDICT_ALLOW),
                        deny: c.read(info.id, dir, VERDICT_DENY),
                        audit: c.read(info.id, dir, VERDICT_AUDIT),
                        spoofed: c.read(info.id, dir, VERDICT_SPOOFED),
                    },
                    None => Packets::default(),
                };
                Endpoint {
                    ifindex,
                    ifname: ifname_of(ifindex),
                    pod: named.as_ref().map(|(k, _)| k.to_string()),
                    programmed_ifname: named.map(|(_, i)| i),
                    id: info.id,
                    isolated_ingress: info.flags & EP_ISOLATE_INGRESS != 0,
                    isolated_egress: info.flags & EP_ISOLATE_EGRESS != 0,
                    audit_ingress: info.flags & EP_AUDIT_INGRESS != 0,
                    audit_egress: info.flags & EP_AUDIT_EGRESS != 0,
                    fail_closed: info.flags & EP_FAIL_CLOSED != 0,
                    addresses,
                    attach: attachment(&links_dir, ifindex),
                    policy_entries: policy_counts.get(&info.id).copied().unwrap_or(0),
                    conntrack: flows.get(&info.id).copied().unwrap_or(0),
                    ingress_packets: packets(DIR_INGRESS),
                    egress_packets: packets(DIR_EGRESS),
                }
            })
            .collect();
        // A local pod's own entry is written with each sync; PEER_NAMES may lag by a second.
        for e in &endpoints {
            for a in e.pod.iter().flat_map(|p| e.addresses.iter().map(move |a| (*a, p))) {
                pods_by_addr.insert(a.0, a.1.clone());
            }
        }
        Ok(Snapshot {
            pin_dir: pin_dir.to_path_buf(),
            endpoints,
            maps: maps_fill,
            node_addrs,
            conntrack,
            names_table: names.is_some(),
            pods_by_addr,
            tables,
        })
    }

    /// The endpoint `sel` names, or why there is none.
    pub fn find(&self, sel: &Select) -> Result<&Endpoint> {
        let found = match sel {
            Select::Pod(k) => {
                if !self.names_table {
                    bail!(
                        "{} has no {} table (no daemon of this version has synced here): select the endpoint with --ip or --ifname",
                        self.pin_dir.display(),
                        maps::ENDPOINT_NAMES
                    );
                }
                let want = k.to_string();
                self.endpoints.iter().find(|e| e.pod.as_deref() == Some(want.as_str()))
            }
            Select::Ip(ip) => self.endpoints.iter().find(|e| e.addresses.contains(ip)),
            Select::Ifname(n) => {
                let here = ifindex_of(n);
                self.endpoints
                    .iter()
                    .find(|e| Some(e.ifindex) == here)
                    .or_else(|| self.endpoints.iter().find(|e| e.ifname.is_none() && e.programmed_ifname.as_deref() == Some(n.as_str())))
            }
        };
        found.ok_or_else(|| {
            let what = match sel {
                Select::Pod(k) => format!("pod {k}"),
                Select::Ip(ip) => format!("address {ip}"),
                Select::Ifname(n) => format!("interface {n}"),
            };
            anyhow!(
                "no endpoint for {what} in the maps under {} ({} endpoint(s): {})",
                self.pin_dir.display(),
                self.endpoints.len(),
                self.endpoints.iter().map(Endpoint::label).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// What `ep`'s entries allow in each direction, ingress then egress.
    pub fn rules(&self, ep: &Endpoint) -> [DirectionRules; 2] {
        let dir = |d: u8, isolated: bool, audit: bool| {
            let node = if d == DIR_INGRESS { self.node_addrs.clone() } else { Vec::new() };
            let how = Isolation { isolated, audit, fail_closed: ep.fail_closed };
            self.tables.direction(ep.id, d, how, node, &self.pods_by_addr)
        };
        [dir(DIR_INGRESS, ep.isolated_ingress, ep.audit_ingress), dir(DIR_EGRESS, ep.isolated_egress, ep.audit_egress)]
    }
}

/// The entries of `ENDPOINTS_ARRAY` in use and of `ENDPOINTS`, by ifindex.
fn read_endpoint_table(pin_dir: &Path) -> Result<Vec<(u32, EndpointInfo)>> {
    let array: Array<MapData, EndpointInfo> = Array::try_from(Map::from_map_data(open_pin(pin_dir, maps::ENDPOINTS_ARRAY)?)?)?;
    let mut out = Vec::new();
    for (i, e) in array.iter().enumerate() {
        let e = e?;
        if e.flags & EP_PRESENT != 0 {
            out.push((i as u32, e));
        }
    }
    let hash: BpfHashMap<MapData, u32, EndpointInfo> = BpfHashMap::try_from(Map::from_map_data(open_pin(pin_dir, maps::ENDPOINTS)?)?)?;
    for item in hash.iter() {
        let (k, v) = item?;
        if v.flags & EP_PRESENT != 0 {
            out.push((k, v));
        }
    }
    out.sort_by_key(|(ifindex, _)| *ifindex);
    Ok(out)
}

/// Every endpoint's own addresses, by endpoint id.
fn read_endpoint_addrs(pin_dir: &Path, fill: &mut Vec<MapFill>) -> Result<BTreeMap<u32, Vec<IpAddr>>> {
    let md = open_pin(pin_dir, maps::ENDPOINT_ADDRS)?;
    let mut out: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
    let n = pressure::for_each_entry(&md, ENDPOINT_ADDRS_MAX, |k, _| {
        let k: EpAddrKey = from_bytes(k);
        out.entry(k.endpoint).or_default().push(addr_from_bytes(k.family, k.addr));
    })?;
    fill.push(MapFill { map: maps::ENDPOINT_ADDRS, entries: n, capacity: capacity(&md) });
    Ok(out)
}

fn read_node_addrs(pin_dir: &Path, fill: &mut Vec<MapFill>) -> Result<Vec<IpAddr>> {
    let md = open_pin(pin_dir, maps::NODE_ADDRS)?;
    let mut out = Vec::new();
    let n = pressure::for_each_entry(&md, NODE_ADDRS_MAX, |k, _| {
        let k: AddrKey = from_bytes(k);
        out.push(addr_from_bytes(k.family, k.addr));
    })?;
    fill.push(MapFill { map: maps::NODE_ADDRS, entries: n, capacity: capacity(&md) });
    out.sort();
    Ok(out)
}

/// Tracked flows: in all, and per endpoint id.
fn read_conntrack(pin_dir: &Path, fill: &mut Vec<MapFill>) -> Result<(u64, BTreeMap<u32, u64>)> {
    let md = open_pin(pin_dir, maps::CONNTRACK)?;
    let mut per: BTreeMap<u32, u64> = BTreeMap::new();
    let n = pressure::for_each_entry(&md, CONNTRACK_MAX, |k, _| {
        let k: CtKey = from_bytes(k);
        *per.entry(k.endpoint).or_default() += 1;
    })?;
    fill.push(MapFill { map: maps::CONNTRACK, entries: n, capacity: capacity(&md) });
    Ok((n, per))
}

/// `ENDPOINT_NAMES` by ifindex, when pinned.
fn read_names(pin_dir: &Path, fill: &mut Vec<MapFill>) -> Result<Option<BTreeMap<u32, EndpointName>>> {
    if !pin_dir.join(maps::ENDPOINT_NAMES).exists() {
        return Ok(None);
    }
    let md = open_pin(pin_dir, maps::ENDPOINT_NAMES)?;
    let mut out = BTreeMap::new();
    let n = pressure::for_each_entry(&md, ENDPOINTS_MAX, |k, v| {
        if v.len() == std::mem::size_of::<EndpointName>() {
            out.insert(from_bytes::<u32>(k), from_bytes::<EndpointName>(v));
        }
    })?;
    fill.push(MapFill { map: maps::ENDPOINT_NAMES, entries: n, capacity: capacity(&md) });
    Ok(Some(out))
}

/// `PEER_NAMES` as addresses and pods, when pinned (an older daemon's pins have none).
fn read_peer_names(pin_dir: &Path, fill: &mut Vec<MapFill>) -> Result<BTreeMap<IpAddr, String>> {
    let mut out = BTreeMap::new();
    if !pin_dir.join(maps::PEER_NAMES).exists() {
        return Ok(out);
    }
    let md = open_pin(pin_dir, maps::PEER_NAMES)?;
    let n = pressure::for_each_entry(&md, IDENTITIES_MAX, |k, v| {
        if v.len() == std::mem::size_of::<PodName>() {
            let k: AddrKey = from_bytes(k);
            out.insert(addr_from_bytes(k.family, k.addr), names::decode_pod(&from_bytes::<PodName>(v)).to_string());
        }
    })?;
    fill.push(MapFill { map: maps::PEER_NAMES, entries: n, capacity: capacity(&md) });
    Ok(out)
}

/// How `ifindex` has the programs: pinned TCX links, netpol's tc filters (looked for in this
/// network namespace), or not (all found).
fn attachment(links_dir: &Path, ifindex: u32) -> Attach {
    let links = ["from", "to"].iter().filter(|p| links_dir.join(format!("{ifindex}-{p}")).exists()).count();
    let filters = tc::ours_on(ifindex).map(|h| h.len()).unwrap_or(0);
    match (links, filters) {
        (2, _) => Attach::Tcx,
        (0, 2) => Attach::Tc,
        (0, 0) => Attach::None,
        _ => Attach::Partial,
    }
}

/// A prefix of the address maps, as a network.
fn net(family: u8, addr: [u8; 16], len: u32) -> Option<IpNet> {
    IpNet::new(addr_from_bytes(family, addr), len as u8).ok()
}

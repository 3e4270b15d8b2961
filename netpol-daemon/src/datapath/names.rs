//! The names tables, for people (`netpol-daemon status`): the maps the programs read know
//! interfaces, endpoint ids and addresses, never names. `ENDPOINT_NAMES` says which pod, and
//! which interface, each endpoint of `ENDPOINTS` was programmed for; `PEER_NAMES` which pod
//! each address is that has a class of its own in `IDENTITIES` (a host prefix: the pods that
//! rules name as peers), so that `status` shows a rule's peers as pods. Both live beside the
//! other maps under the pin directory, so that they outlive the daemon as those do (a bpffs
//! holds only BPF objects: they are BPF hash maps the daemon creates and pins itself).
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use aya::Pod;
use netpol_common::{maps, AddrKey, EndpointName, PodName, ENDPOINTS_MAX, IDENTITIES_MAX, IFNAME_BYTES, POD_NAME_BYTES};

use super::HashMap;
use crate::compiler::NodePolicy;
use crate::model::cidr::{addr_bytes, addr_family};
use crate::model::ObjKey;

/// `BPF_F_NO_PREALLOC`: entries are allocated as they are inserted (most nodes use few).
const BPF_F_NO_PREALLOC: u32 = 1;

pub(super) type NamesMap = BpfHashMap<MapData, u32, EndpointName>;
type PeerNamesMap = BpfHashMap<MapData, AddrKey, PodName>;

/// Opens the pinned table `name` under `pin_dir`, creating and pinning it (room for `max`)
/// when there is none, or one of another layout, which is replaced.
fn open_or_create<K: Pod, V: Pod>(pin_dir: &Path, name: &str, max: u32) -> Result<BpfHashMap<MapData, K, V>> {
    let path = pin_dir.join(name);
    if path.exists() {
        match open(pin_dir, name) {
            Ok(m) => return Ok(m),
            Err(e) => {
                tracing::warn!("pinned {} is unusable ({e:#}): replacing it", path.display());
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let m = BpfHashMap::<MapData, K, V>::create(max, BPF_F_NO_PREALLOC).with_context(|| format!("creating the {name} map"))?;
    m.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
    open(pin_dir, name)
}

/// Opens the pinned table `name` under `pin_dir`.
fn open<K: Pod, V: Pod>(pin_dir: &Path, name: &str) -> Result<BpfHashMap<MapData, K, V>> {
    let path = pin_dir.join(name);
    let md = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    BpfHashMap::try_from(Map::HashMap(md)).with_context(|| format!("map {}", path.display()))
}

/// The endpoints' table under `pin_dir`, created when missing.
pub(super) fn open_endpoint_names(pin_dir: &Path) -> Result<NamesMap> {
    open_or_create(pin_dir, maps::ENDPOINT_NAMES, ENDPOINTS_MAX)
}

/// `pod` as the tables hold it (cut to the field's size, which Kubernetes names fit).
pub fn pod_name(pod: &ObjKey) -> PodName {
    let mut n = PodName { namespace_len: 0, name_len: 0, bytes: [0; POD_NAME_BYTES] };
    let ns = &pod.namespace.as_bytes()[..pod.namespace.len().min(POD_NAME_BYTES)];
    let name = &pod.name.as_bytes()[..pod.name.len().min(POD_NAME_BYTES - ns.len())];
    n.bytes[..ns.len()].copy_from_slice(ns);
    n.bytes[ns.len()..ns.len() + name.len()].copy_from_slice(name);
    (n.namespace_len, n.name_len) = (ns.len() as u16, name.len() as u16);
    n
}

/// The pod a [`PodName`] names.
pub fn decode_pod(n: &PodName) -> ObjKey {
    let ns_len = (n.namespace_len as usize).min(POD_NAME_BYTES);
    let name_end = (ns_len + n.name_len as usize).min(POD_NAME_BYTES);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    ObjKey::new(text(&n.bytes[..ns_len]), text(&n.bytes[ns_len..name_end]))
}

/// The entry of endpoint `id`, programmed for `pod` on interface `ifname`.
pub(super) fn entry(id: u32, pod: &ObjKey, ifname: &str) -> EndpointName {
    let mut e = EndpointName { id, ifname: [0; IFNAME_BYTES], pod: pod_name(pod) };
    let ifname = &ifname.as_bytes()[..ifname.len().min(IFNAME_BYTES - 1)];
    e.ifname[..ifname.len()].copy_from_slice(ifname);
    e
}

/// What an entry says: the pod and the interface's name.
pub fn decode(e: &EndpointName) -> (ObjKey, String) {
    let ifname = e.ifname.split(|b| *b == 0).next().unwrap_or(&[]);
    (decode_pod(&e.pod), String::from_utf8_lossy(ifname).into_owned())
}

/// The key of `ip` in `PEER_NAMES`.
pub fn addr_key(ip: IpAddr) -> AddrKey {
    AddrKey { family: addr_family(ip), _pad: [0; 3], addr: addr_bytes(ip) }
}

/// `PEER_NAMES` and what the daemon wrote into it: per key only a digest of the name (the
/// names themselves would cost the daemon 320 bytes per peer to remember).
pub(super) struct PeerNames {
    map: PeerNamesMap,
    written: HashMap<AddrKey, u64>,
}

fn digest(pod: &ObjKey) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    pod.hash(&mut h);
    h.finish()
}

impl PeerNames {
    /// Opens (or creates) the table under `pin_dir`, adopting what it holds (its entries are
    /// rewritten at the first [`PeerNames::set`]: nothing is known of them but their keys).
    pub fn adopt(pin_dir: &Path) -> Result<PeerNames> {
        let map: PeerNamesMap = open_or_create(pin_dir, maps::PEER_NAMES, IDENTITIES_MAX)?;
        let written = map.keys().filter_map(|k| k.ok()).map(|k| (k, 0)).collect();
        Ok(PeerNames { map, written })
    }

    /// Makes the table hold exactly `wanted`, writing only differences. Failures are
    /// returned as one message per entry (the table is for people: nothing else depends on it).
    pub fn set(&mut self, wanted: &BTreeMap<IpAddr, &ObjKey>) -> Vec<String> {
        let mut errors = Vec::new();
        let keys: HashMap<AddrKey, &ObjKey> = wanted.iter().map(|(ip, pod)| (addr_key(*ip), *pod)).collect();
        for (k, pod) in &keys {
            let d = digest(pod);
            if self.written.get(k) == Some(&d) {
                continue;
            }
            match self.map.insert(k, pod_name(pod), 0) {
                Ok(()) => {
                    self.written.insert(*k, d);
                }
                Err(e) => errors.push(format!("{pod}: PEER_NAMES insert: {e}")),
            }
        }
        let stale: Vec<AddrKey> = self.written.keys().filter(|k| !keys.contains_key(*k)).copied().collect();
        for k in stale {
            let _ = self.map.remove(&k);
            self.written.remove(&k);
        }
        errors
    }
}

/// The addresses `node` gives a class of their own (its host prefixes), each with the pod
/// `pod_at` says holds it (addresses of no pod are left out).
pub fn peers_of<'a>(node: &NodePolicy, pod_at: impl Fn(IpAddr) -> Option<&'a ObjKey>) -> BTreeMap<IpAddr, &'a ObjKey> {
    node.prefixes.keys().filter(|p| p.prefix_len() == p.max_prefix_len()).filter_map(|p| pod_at(p.addr()).map(|k| (p.addr(), k))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_as_written() {
        let pod = ObjKey::new("kafka", "broker-0");
        let e = entry(7, &pod, "veth1234");
        assert_eq!(e.id, 7);
        assert_eq!(decode(&e), (pod.clone(), "veth1234".to_string()));
        assert_eq!(decode_pod(&pod_name(&pod)), pod);
        // The longest names Kubernetes allows fit.
        let long = ObjKey::new("n".repeat(63), "p".repeat(253));
        assert_eq!(decode(&entry(1, &long, "abcdefghijklmnop")), (long, "abcdefghijklmno".to_string()));
    }

    #[test]
    fn peers_are_the_host_prefixes_that_are_pods() {
        let mut node = NodePolicy::default();
        for (p, c) in [("10.0.0.0/8", 1), ("10.1.2.3/32", 2), ("10.1.2.4/32", 2), ("fd00::5/128", 3)] {
            node.prefixes.insert(p.parse().unwrap(), c);
        }
        let (a, b) = (ObjKey::new("x", "a"), ObjKey::new("y", "b"));
        let pods: BTreeMap<IpAddr, &ObjKey> = [("10.1.2.3".parse().unwrap(), &a), ("fd00::5".parse().unwrap(), &b)].into();
        let got = peers_of(&node, |ip| pods.get(&ip).copied());
        let want: BTreeMap<IpAddr, &ObjKey> = [("10.1.2.3".parse().unwrap(), &a), ("fd00::5".parse().unwrap(), &b)].into();
        assert_eq!(got, want, "the /8 is no pod, 10.1.2.4 no known one");
    }
}

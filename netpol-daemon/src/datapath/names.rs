//! The names table (`ENDPOINT_NAMES`): which pod, and which interface, each endpoint of
//! `ENDPOINTS` was programmed for. The maps the programs read know interfaces, endpoint ids and
//! addresses, never names; this one is for people (`netpol-daemon status --pod NS/POD`) and
//! lives beside the others under the pin directory, so that it outlives the daemon as they do
//! (a bpffs holds only BPF objects: the table is a BPF hash map the daemon creates and pins
//! itself, keyed by ifindex like `ENDPOINTS`, written at each sync where it changed).
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use netpol_common::{maps, EndpointName, ENDPOINTS_MAX, ENDPOINT_NAME_BYTES, IFNAME_BYTES};

use crate::model::ObjKey;

/// `BPF_F_NO_PREALLOC`: entries are allocated as they are inserted (a node has few pods).
const BPF_F_NO_PREALLOC: u32 = 1;

pub(super) type NamesMap = BpfHashMap<MapData, u32, EndpointName>;

/// Opens the pinned names table under `pin_dir`, creating and pinning it when there is none
/// (or one of another layout, which is replaced).
pub(super) fn open_or_create(pin_dir: &Path) -> Result<NamesMap> {
    let path = pin_dir.join(maps::ENDPOINT_NAMES);
    if path.exists() {
        match open(pin_dir) {
            Ok(m) => return Ok(m),
            Err(e) => {
                tracing::warn!("pinned {} is unusable ({e:#}): replacing it", path.display());
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let m = NamesMap::create(ENDPOINTS_MAX, BPF_F_NO_PREALLOC).context("creating the ENDPOINT_NAMES map")?;
    m.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
    open(pin_dir)
}

/// Opens the pinned names table under `pin_dir` (read by `status`).
pub fn open(pin_dir: &Path) -> Result<NamesMap> {
    let path = pin_dir.join(maps::ENDPOINT_NAMES);
    let md = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    NamesMap::try_from(Map::HashMap(md)).with_context(|| format!("map {}", path.display()))
}

/// The entry of endpoint `id`, programmed for `pod` on interface `ifname` (cut to the field
/// sizes, which Kubernetes names and interface names fit).
pub(super) fn entry(id: u32, pod: &ObjKey, ifname: &str) -> EndpointName {
    let mut e = EndpointName { id, namespace_len: 0, name_len: 0, ifname: [0; IFNAME_BYTES], pod: [0; ENDPOINT_NAME_BYTES] };
    let ns = &pod.namespace.as_bytes()[..pod.namespace.len().min(ENDPOINT_NAME_BYTES)];
    let name = &pod.name.as_bytes()[..pod.name.len().min(ENDPOINT_NAME_BYTES - ns.len())];
    e.pod[..ns.len()].copy_from_slice(ns);
    e.pod[ns.len()..ns.len() + name.len()].copy_from_slice(name);
    (e.namespace_len, e.name_len) = (ns.len() as u16, name.len() as u16);
    let ifname = &ifname.as_bytes()[..ifname.len().min(IFNAME_BYTES - 1)];
    e.ifname[..ifname.len()].copy_from_slice(ifname);
    e
}

/// What an entry says: the pod and the interface's name.
pub fn decode(e: &EndpointName) -> (ObjKey, String) {
    let ns_len = (e.namespace_len as usize).min(ENDPOINT_NAME_BYTES);
    let name_end = (ns_len + e.name_len as usize).min(ENDPOINT_NAME_BYTES);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let ifname = e.ifname.split(|b| *b == 0).next().unwrap_or(&[]);
    (ObjKey::new(text(&e.pod[..ns_len]), text(&e.pod[ns_len..name_end])), text(ifname))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_as_written() {
        let pod = ObjKey::new("kafka", "broker-0");
        let e = entry(7, &pod, "veth1234");
        assert_eq!(e.id, 7);
        assert_eq!(decode(&e), (pod, "veth1234".to_string()));
        // The longest names Kubernetes allows fit.
        let long = ObjKey::new("n".repeat(63), "p".repeat(253));
        assert_eq!(decode(&entry(1, &long, "abcdefghijklmnop")), (long, "abcdefghijklmno".to_string()));
    }
}

//! The endpoint table (which interfaces the programs enforce on, and as which endpoint id) and
//! the ids themselves. The programs key every per-pod map (POLICY, ENDPOINT_ADDRS, the counters,
//! the flow cache) by a small endpoint id rather than by ifindex, so ids are handed out densely
//! below `MAX_ENDPOINTS`, re-used once freed, and kept across a restart: a daemon adopts the
//! ids the pinned table holds, so the entries of a previous daemon stay valid until replaced.
use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::{anyhow, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError};
use aya::Ebpf;
use netpol_common::*;

use super::maps::take;
use super::mirror::{BpfMap, MapMirror};
use super::names::{self, NamesMap};
use super::HashMap;
use crate::compiler::CompiledPod;
use crate::model::ObjKey;

/// The endpoint table as the programs read it: an array indexed by ifindex, a hash for large
/// ifindexes.
pub(super) struct EndpointTable {
    array: Array<MapData, EndpointInfo>,
    hash: BpfHashMap<MapData, u32, EndpointInfo>,
}

impl BpfMap for EndpointTable {
    type Key = u32;
    type Value = EndpointInfo;

    fn write(&mut self, ifindex: &u32, info: EndpointInfo) -> Result<(), MapError> {
        if *ifindex < ENDPOINTS_ARRAY_SIZE {
            self.array.set(*ifindex, info, 0)
        } else {
            self.hash.insert(ifindex, info, 0)
        }
    }

    fn delete(&mut self, ifindex: &u32) {
        if *ifindex < ENDPOINTS_ARRAY_SIZE {
            let _ = self.array.set(*ifindex, EndpointInfo::default(), 0);
        } else {
            let _ = self.hash.remove(ifindex);
        }
    }

    fn entries(&self) -> Result<Vec<(u32, EndpointInfo)>, MapError> {
        let mut out = Vec::new();
        for (i, e) in self.array.iter().enumerate() {
            let e = e?;
            if e.flags & EP_PRESENT != 0 {
                out.push((i as u32, e));
            }
        }
        for item in self.hash.iter() {
            out.push(item?);
        }
        Ok(out)
    }
}

pub(super) struct Endpoints {
    table: MapMirror<EndpointTable>,
    /// Which pod and interface each entry of `table` is (`ENDPOINT_NAMES`, for `status`).
    names: MapMirror<NamesMap>,
    /// Endpoint ids found in the pinned table at start, by ifindex (adopted on restart).
    adopted: HashMap<u32, u32>,
    free: Vec<u32>,
    next: u32,
}

impl Endpoints {
    /// Takes the table, adopting the ids it holds: new ids start above them. The names table
    /// is opened (or created) under `pin_dir`.
    pub fn adopt(ebpf: &mut Ebpf, pin_dir: &std::path::Path) -> Result<Endpoints> {
        let table = EndpointTable { array: take(ebpf, maps::ENDPOINTS_ARRAY)?, hash: take(ebpf, maps::ENDPOINTS)? };
        let table = MapMirror::adopt(table)?;
        let names = MapMirror::adopt(names::open_endpoint_names(pin_dir)?)?;
        let adopted: HashMap<u32, u32> = table.installed().iter().map(|(ifindex, info)| (*ifindex, info.id)).collect();
        let next = adopted.values().max().map_or(0, |m| m + 1);
        Ok(Endpoints { table, names, adopted, free: Vec::new(), next })
    }

    /// An id for the pod on `ifindex`: the one the pinned table gave it, else a freed one or
    /// the next, none of `in_use`. `true` with an id not adopted: its counts and flow-cache
    /// slots are a previous pod's, to be reset.
    pub fn alloc(&mut self, ifindex: u32, in_use: impl Iterator<Item = u32>) -> Result<(u32, bool)> {
        if let Some(id) = self.adopted.remove(&ifindex) {
            return Ok((id, false));
        }
        let used: BTreeSet<u32> = in_use.chain(self.adopted.values().copied()).collect();
        while let Some(id) = self.free.pop() {
            if !used.contains(&id) {
                return Ok((id, true));
            }
        }
        while used.contains(&self.next) {
            self.next += 1;
        }
        if self.next >= MAX_ENDPOINTS {
            return Err(anyhow!("more than {MAX_ENDPOINTS} endpoints on this node"));
        }
        self.next += 1;
        Ok((self.next - 1, true))
    }

    pub fn free(&mut self, id: u32) {
        self.free.push(id);
    }

    /// Writes the entry of `ifindex` unless it holds `info` already, and its name (the pod
    /// `pod` on interface `ifname`). The name is for people only: failing to write it is
    /// logged, never an error of the sync.
    pub fn set(&mut self, ifindex: u32, info: EndpointInfo, pod: &ObjKey, ifname: &str) -> Result<(), MapError> {
        self.table.set(ifindex, info)?;
        if let Err(e) = self.names.set(ifindex, names::entry(info.id, pod, ifname)) {
            tracing::warn!("{pod}: ENDPOINT_NAMES insert: {e}");
        }
        Ok(())
    }

    pub fn remove(&mut self, ifindex: u32) {
        self.table.remove(&ifindex);
        self.names.remove(&ifindex);
    }

    /// After a sync: the entries of interfaces not among `live` go (interfaces gone or no
    /// longer ours, those a previous daemon left), and so do the adopted ids no pod claimed.
    pub fn retain_live(&mut self, live: &BTreeSet<u32>) {
        self.table.retain(|ifindex| live.contains(ifindex));
        self.names.retain(|ifindex| live.contains(ifindex));
        self.adopted.clear();
    }
}

/// The endpoint entry of a pod: its id, flags and first IPv4 address (`EP_SOLE_V4` when it
/// has no other: Kubernetes gives a pod at most one address per family).
pub(super) fn endpoint_info(id: u32, flags: u32, pod: Option<&CompiledPod>) -> EndpointInfo {
    let v4s: Vec<[u8; 4]> = pod
        .map(|c| {
            c.ips
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V4(a) => Some(a.octets()),
                    IpAddr::V6(_) => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let sole = if v4s.len() <= 1 { EP_SOLE_V4 } else { 0 };
    EndpointInfo { id, flags: flags | sole, v4: v4s.first().copied().unwrap_or([0; 4]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `EP_SOLE_V4` spares new flows a conntrack look-up for every IPv4 source other than
    /// `v4`: only where the pod owns no other IPv4 address.
    #[test]
    fn the_sole_v4_flag_is_set_only_where_the_pod_has_no_other_ipv4_address() {
        let pod = |ips: &[&str]| CompiledPod { ips: ips.iter().map(|a| a.parse().unwrap()).collect(), ..Default::default() };
        let info = |p: Option<&CompiledPod>| endpoint_info(7, EP_PRESENT, p);
        let one = info(Some(&pod(&["10.1.0.10", "fd00::10"])));
        assert_eq!((one.v4, one.flags), ([10, 1, 0, 10], EP_PRESENT | EP_SOLE_V4));
        let two = info(Some(&pod(&["10.1.0.10", "10.1.0.11"])));
        assert_eq!((two.v4, two.flags), ([10, 1, 0, 10], EP_PRESENT));
        for none in [info(Some(&pod(&["fd00::10"]))), info(None)] {
            assert_eq!((none.v4, none.flags), ([0; 4], EP_PRESENT | EP_SOLE_V4), "no IPv4 address: it owns none");
        }
    }
}

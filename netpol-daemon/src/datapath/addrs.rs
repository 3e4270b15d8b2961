//! The addresses the programs judge by source rather than by policy: the node's own (NODE_ADDRS:
//! always let into local pods, for kubelet probes) and each pod's own (ENDPOINT_ADDRS: the only
//! sources its packets may carry, anti-spoofing). Both are mirrors, set as a whole.
use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::Ebpf;
use netpol_common::*;

use super::maps::take;
use super::mirror::{MapMirror, Scope};
use super::{HashMap, Iface, SyncReport};
use crate::compiler::NodePolicy;
use crate::model::cidr::{addr_bytes, addr_family};
use crate::model::ObjKey;

pub(super) struct Addrs {
    node: MapMirror<BpfHashMap<MapData, AddrKey, u8>>,
    /// Per endpoint: the addresses its pod may send from.
    endpoints: MapMirror<BpfHashMap<MapData, EpAddrKey, u8>>,
}

impl Addrs {
    pub fn adopt(ebpf: &mut Ebpf) -> Result<Addrs> {
        Ok(Addrs {
            node: MapMirror::adopt(take(ebpf, maps::NODE_ADDRS)?)?,
            endpoints: MapMirror::adopt(take(ebpf, maps::ENDPOINT_ADDRS)?)?,
        })
    }

    /// The node's own addresses (those [`node_addr_for_pods`] keeps); the first error stops
    /// before anything is removed.
    pub fn set_node_addrs(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let want: HashMap<AddrKey, u8> = addrs
            .iter()
            .filter(|a| node_addr_for_pods(**a))
            .map(|a| (AddrKey { family: addr_family(*a), _pad: [0; 3], addr: addr_bytes(*a) }, 1))
            .collect();
        let mut error = None;
        let written = self.node.insert_wanted(Scope::All, &want, |_, e| {
            error.get_or_insert(e);
        });
        if let Some(e) = error {
            return Err(e.into());
        }
        self.node.remove_stale(written, &want);
        Ok(())
    }

    /// The addresses each programmed pod may send from, before its endpoint entry: a stale
    /// address of an id's previous pod goes first, a new pod's own ones are in place when its
    /// programs start to enforce.
    pub fn set_endpoint_addrs(
        &mut self,
        node: &NodePolicy,
        pods: &BTreeMap<&ObjKey, (&Iface, u32)>,
        ids: &BTreeMap<ObjKey, u32>,
        report: &mut SyncReport,
    ) {
        let want: HashMap<EpAddrKey, u8> = pods
            .keys()
            .filter_map(|k| Some((*ids.get(*k)?, node.pods.get(*k)?)))
            .flat_map(|(id, c)| c.ips.iter().map(move |a| (endpoint_addr_key(id, *a), 1)))
            .collect();
        self.endpoints.retain(|k| want.contains_key(k));
        let _ = self
            .endpoints
            .insert_wanted(Scope::All, &want, |k, e| report.errors.push(format!("ENDPOINT_ADDRS insert (endpoint {}): {e}", k.endpoint)));
    }
}

/// Is this node address one the node reaches its pods from (the sources `NODE_ADDRS` lets
/// into every pod)? Never loopback (127/8, ::1: no packet from a pod's interface comes from
/// there, and a pod's own loopback traffic never reaches it) nor link-local (169.254/16,
/// fe80::/10: pods send from their own fe80:: addresses, kubelet does not reach pods that
/// way) nor unspecified.
pub fn node_addr_for_pods(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local() && !a.is_unspecified(),
        IpAddr::V6(a) => !a.is_loopback() && !a.is_unspecified() && a.segments()[0] & 0xffc0 != 0xfe80,
    }
}

fn endpoint_addr_key(endpoint: u32, a: IpAddr) -> EpAddrKey {
    EpAddrKey { endpoint, family: addr_family(a), _pad: [0; 3], addr: addr_bytes(a) }
}

//! Tracked flows and what decides how long a verdict lasts: the CONNTRACK table (revalidated
//! against a new policy with `--established=revalidate`), the runtime settings of the programs
//! (CONFIG: conntrack timeouts) and the flow cache's per-endpoint epochs
//! (FLOW_EPOCH). A cached verdict counts only under its endpoint's current epoch, so bumping it
//! voids every CPU's slots at once: done when flows are cut, when an id goes to a new pod and
//! when the settings change (no cached flow outlives a timeout that just got shorter).
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use aya::Ebpf;
use netpol_common::*;

use super::maps::{migrate_conntrack_v1, take};
use super::HashMap;
use crate::compiler::NodePolicy;
use crate::model::cidr::addr_from_bytes;
use crate::model::{Direction, ObjKey};

pub(super) struct Conntrack {
    table: BpfHashMap<MapData, CtKey, CtValue>,
    /// Per endpoint id: the epoch of its flow-cache slots (bumped to void them).
    epochs: FlowEpochs,
    config: Array<MapData, Config>,
    /// The settings last given to `set_config`, and whether the flow cache is used.
    settings: Config,
    flow_cache: bool,
}

impl Conntrack {
    /// Takes the maps (migrating the flows of an older table) with the settings a previous
    /// daemon left (zero: the defaults) until `set_config`, the flow cache on for them.
    pub fn take(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Conntrack> {
        let config: Array<MapData, Config> = take(ebpf, maps::CONFIG)?;
        let mut table = take(ebpf, maps::CONNTRACK)?;
        migrate_conntrack_v1(pin_dir, &mut table);
        let epochs = FlowEpochs::map(ebpf.take_map(maps::FLOW_EPOCH).ok_or_else(|| anyhow!("eBPF object has no map FLOW_EPOCH"))?)?;
        let kept = config.get(&0, 0).unwrap_or_default();
        let mut ct = Conntrack { table, epochs, config, settings: Config::default(), flow_cache: !preempt_rt() };
        ct.set_config(&kept)?;
        Ok(ct)
    }

    /// Runtime settings for the programs (conntrack timeouts). The flow cache's
    /// lifetime follows from the timeouts (`flow_cache_ticks`); the given one is ignored.
    /// Every cached flow is voided, so none outlives a timeout that just got shorter.
    pub fn set_config(&mut self, c: &Config) -> Result<()> {
        self.settings = *c;
        let ticks = if self.flow_cache { flow_cache_ticks(c) } else { 0 };
        self.config.set(0, Config { flow_cache_ticks: ticks, ..*c }, 0)?;
        for id in 0..MAX_ENDPOINTS {
            self.epochs.bump(id);
        }
        Ok(())
    }

    /// Turns the flow cache on or off; stays off on PREEMPT_RT kernels: there two programs can
    /// interleave on one CPU, and a slot half-written by one must never be read by the other.
    pub fn set_flow_cache(&mut self, on: bool) -> Result<()> {
        let rt = preempt_rt();
        if on && rt {
            tracing::warn!("PREEMPT_RT kernel: the flow cache stays off (every packet looks the conntrack table up)");
        }
        self.flow_cache = on && !rt;
        let c = self.settings;
        self.set_config(&c)
    }

    /// Voids the flow-cache slots of endpoint `id` on every CPU: its packets go through the
    /// conntrack table again (after flows were cut, or when the id goes to a new pod).
    pub fn void_flow_cache(&mut self, id: u32) {
        self.epochs.bump(id);
    }

    /// Removes the tracked flows of the pods in `pod_of` (by endpoint id) that `node` no longer
    /// allows; flows from the node's own addresses into pods always stay. Returns how many
    /// were cut.
    pub fn revalidate(&mut self, node: &NodePolicy, node_addrs: &[IpAddr], pod_of: &HashMap<u32, ObjKey>) -> usize {
        let mut cut = Vec::new();
        for k in self.table.keys().flatten() {
            let Some(pod) = pod_of.get(&k.endpoint) else { continue };
            let (dir, peer) = if k.dir == DIR_INGRESS {
                (Direction::Ingress, addr_from_bytes(k.family, k.src))
            } else {
                (Direction::Egress, addr_from_bytes(k.family, k.dst))
            };
            if dir == Direction::Ingress && node_addrs.contains(&peer) {
                continue;
            }
            let port = matches!(k.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP).then_some(k.dport);
            if !node.permits(pod, dir, peer, k.proto, port) {
                cut.push(k);
            }
        }
        for k in &cut {
            let _ = self.table.remove(k);
        }
        let ids: BTreeSet<u32> = cut.iter().map(|k| k.endpoint).collect();
        for id in ids {
            self.void_flow_cache(id);
        }
        cut.len()
    }
}

/// A PREEMPT_RT kernel (BPF programs preemptible, so two can interleave on one CPU).
pub(super) fn preempt_rt() -> bool {
    std::fs::read_to_string("/sys/kernel/realtime").is_ok_and(|s| s.trim() == "1")
}

/// `FLOW_EPOCH` mapped into this process (the array is BPF_F_MMAPABLE), so that the daemon
/// increments an endpoint's epoch atomically, as the programs do on a TCP RST: a read and a
/// write through the map syscalls could undo one of their increments and revive voided slots.
struct FlowEpochs {
    ptr: *mut AtomicU64,
    len: usize,
    bytes: usize,
    _map: Map,
}

// The mapping is shared memory of the kernel's array, used only through atomics.
unsafe impl Send for FlowEpochs {}
unsafe impl Sync for FlowEpochs {}

impl FlowEpochs {
    fn map(map: Map) -> Result<FlowEpochs> {
        use std::os::fd::{AsFd, AsRawFd};
        let Map::Array(data) = &map else { return Err(anyhow!("map FLOW_EPOCH: not an array")) };
        let fd = data.fd().as_fd().as_raw_fd();
        let len = MAX_ENDPOINTS as usize;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let bytes = (len * 8).div_ceil(page) * page;
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(anyhow!("mapping FLOW_EPOCH: {}", std::io::Error::last_os_error()));
        }
        Ok(FlowEpochs { ptr: ptr.cast(), len, bytes, _map: map })
    }

    fn bump(&self, id: u32) {
        if (id as usize) < self.len {
            unsafe { &*self.ptr.add(id as usize) }.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for FlowEpochs {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

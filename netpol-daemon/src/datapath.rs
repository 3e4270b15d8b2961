//! The kernel side: loads the TC programs with maps pinned under the bpffs path, attaches them
//! to pod interfaces (TCX where the kernel has it, clsact + cls_bpf otherwise) and keeps the maps
//! equal to the compiled state by applying only differences.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use aya::programs::tc::{self, NlOptions, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use netpol_common::*;

use crate::cidr::addr_bytes;
use crate::compiler::CompiledPod;
use crate::entries::{self, Desired, Lpm, PortSetInterner};
use crate::model::ObjKey;

/// The compiled eBPF object, built by build.rs from netpol-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));

/// A local pod ready to be programmed.
#[derive(Clone, Debug)]
pub struct LocalPod {
    pub ifindex: u32,
    pub ifname: String,
    pub compiled: CompiledPod,
}

struct Attached {
    ifindex: u32,
    id: u32,
    links: Vec<(&'static str, aya::programs::tc::SchedClassifierLinkId)>,
}

/// Problems met while programming, per pod; the rest of the node stays programmed.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub errors: Vec<String>,
    pub peers: usize,
    pub ports: usize,
    pub endpoints: usize,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    endpoints: BpfHashMap<MapData, u32, EndpointInfo>,
    peers: LpmTrie<MapData, PeerKey, PeerValue>,
    ports: LpmTrie<MapData, PortKey, PortValue>,
    node_addrs: BpfHashMap<MapData, AddrKey, u8>,
    counters: PerCpuArray<MapData, u64>,
    installed_peers: HashMap<Lpm<PeerKey>, PeerValue>,
    installed_ports: BTreeSet<Lpm<PortKey>>,
    installed_node_addrs: BTreeSet<AddrKey>,
    interner: PortSetInterner,
    attached: BTreeMap<ObjKey, Attached>,
    /// Endpoint ids found in the pinned ENDPOINTS map at start, by ifindex (adopted on restart).
    adopted_ids: HashMap<u32, u32>,
    free_ids: Vec<u32>,
    next_id: u32,
    pub use_tcx: bool,
}

fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let m = ebpf.take_map(name).ok_or_else(|| anyhow!("eBPF object has no map {name}"))?;
    T::try_from(m).with_context(|| format!("map {name}"))
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs(path: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("bpf") && Path::new(l.split_whitespace().nth(1).unwrap_or("")) == Path::new("/sys/fs/bpf")) {
        return Ok(());
    }
    if !path.starts_with("/sys/fs/bpf") {
        return Ok(());
    }
    let target = std::ffi::CString::new("/sys/fs/bpf").unwrap();
    let fstype = std::ffi::CString::new("bpf").unwrap();
    let r = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
    }
    Ok(())
}

impl Datapath {
    /// Loads the programs, creating or re-using the pinned maps in `pin_dir`.
    pub fn load(pin_dir: &Path) -> Result<Datapath> {
        ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (is this root, with bpffs mounted?)")?;
        for name in [programs::FROM_POD, programs::TO_POD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("eBPF object has no program {name}"))?
                .try_into()?;
            prog.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        let endpoints: BpfHashMap<MapData, u32, EndpointInfo> = take(&mut ebpf, maps::ENDPOINTS)?;
        let peers: LpmTrie<MapData, PeerKey, PeerValue> = take(&mut ebpf, maps::POLICY_PEERS)?;
        let ports: LpmTrie<MapData, PortKey, PortValue> = take(&mut ebpf, maps::POLICY_PORTS)?;
        let node_addrs: BpfHashMap<MapData, AddrKey, u8> = take(&mut ebpf, maps::NODE_ADDRS)?;
        let counters: PerCpuArray<MapData, u64> = take(&mut ebpf, maps::COUNTERS)?;

        // Adopt what a previous daemon left in the pinned maps.
        let mut installed_peers = HashMap::new();
        for item in peers.iter() {
            let (k, v) = item?;
            installed_peers.insert((k.prefix_len(), k.data()), v);
        }
        let mut installed_ports = BTreeSet::new();
        let mut max_set = 0;
        for k in ports.keys() {
            let k = k?;
            max_set = max_set.max(k.data().portset);
            installed_ports.insert((k.prefix_len(), k.data()));
        }
        let mut adopted_ids = HashMap::new();
        for item in endpoints.iter() {
            let (ifindex, info) = item?;
            adopted_ids.insert(ifindex, info.id);
        }
        let mut installed_node_addrs = BTreeSet::new();
        for k in node_addrs.keys() {
            installed_node_addrs.insert(k?);
        }
        let next_id = adopted_ids.values().max().map_or(0, |m| m + 1);
        Ok(Datapath {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            endpoints,
            peers,
            ports,
            node_addrs,
            counters,
            installed_peers,
            installed_ports,
            installed_node_addrs,
            interner: PortSetInterner::starting_at(max_set + 1),
            attached: BTreeMap::new(),
            adopted_ids,
            free_ids: Vec::new(),
            next_id,
            use_tcx: true,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The node's own addresses: always allowed into local pods.
    pub fn set_node_addrs(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let want: BTreeSet<AddrKey> = addrs
            .iter()
            .map(|a| AddrKey { family: if a.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }, _pad: [0; 3], addr: addr_bytes(*a) })
            .collect();
        for k in want.difference(&self.installed_node_addrs) {
            self.node_addrs.insert(k, 1, 0)?;
        }
        for k in self.installed_node_addrs.difference(&want) {
            let _ = self.node_addrs.remove(k);
        }
        self.installed_node_addrs = want;
        Ok(())
    }

    fn alloc_id(&mut self, ifindex: u32) -> Result<u32> {
        if let Some(id) = self.adopted_ids.remove(&ifindex) {
            return Ok(id);
        }
        let used: BTreeSet<u32> = self.attached.values().map(|a| a.id).chain(self.adopted_ids.values().copied()).collect();
        while let Some(id) = self.free_ids.pop() {
            if !used.contains(&id) {
                self.reset_counters(id);
                return Ok(id);
            }
        }
        while used.contains(&self.next_id) {
            self.next_id += 1;
        }
        if self.next_id >= MAX_ENDPOINTS {
            return Err(anyhow!("more than {MAX_ENDPOINTS} endpoints on this node"));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.reset_counters(id);
        Ok(id)
    }

    fn reset_counters(&mut self, id: u32) {
        let ncpu = aya::util::nr_cpus().unwrap_or(1);
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for verdict in [VERDICT_ALLOW, VERDICT_DENY] {
                if let Ok(zero) = PerCpuValues::try_from(vec![0u64; ncpu]) {
                    let _ = self.counters.set(counter_index(id, dir, verdict), zero, 0);
                }
            }
        }
    }

    fn attach(&mut self, ifname: &str) -> Result<Vec<(&'static str, tc::SchedClassifierLinkId)>> {
        let mut links = Vec::new();
        for (name, ty) in [(programs::FROM_POD, TcAttachType::Ingress), (programs::TO_POD, TcAttachType::Egress)] {
            let prog: &mut SchedClassifier = self.ebpf.program_mut(name).expect("loaded").try_into()?;
            let id = if self.use_tcx {
                match prog.attach(ifname, ty) {
                    Ok(id) => id,
                    Err(e) => {
                        log::warn!("TCX attach of {name} to {ifname} failed ({e}); falling back to clsact");
                        self.use_tcx = false;
                        let _ = tc::qdisc_add_clsact(ifname);
                        prog.attach_with_options(ifname, ty, TcAttachOptions::Netlink(NlOptions::default()))?
                    }
                }
            } else {
                let _ = tc::qdisc_add_clsact(ifname);
                prog.attach_with_options(ifname, ty, TcAttachOptions::Netlink(NlOptions::default()))?
            };
            links.push((name, id));
        }
        Ok(links)
    }

    fn detach(&mut self, a: Attached) {
        for (name, link) in a.links {
            if let Some(p) = self.ebpf.program_mut(name) {
                let p: Result<&mut SchedClassifier, _> = p.try_into();
                if let Ok(p) = p {
                    // The interface may already be gone with its pod; nothing to undo then.
                    let _ = p.detach(link);
                }
            }
        }
    }

    /// Endpoint id and pod of every attached interface (for metrics).
    pub fn endpoint_ids(&self) -> Vec<(u32, ObjKey)> {
        self.attached.iter().map(|(k, a)| (a.id, k.clone())).collect()
    }

    /// Programs the maps and attachments to be exactly `pods`.
    pub fn sync(&mut self, pods: &BTreeMap<ObjKey, LocalPod>) -> SyncReport {
        let mut report = SyncReport::default();

        // Interfaces that disappeared or changed: detach first (the ids are freed below).
        let stale: Vec<ObjKey> = self
            .attached
            .iter()
            .filter(|(k, a)| pods.get(*k).is_none_or(|p| p.ifindex != a.ifindex))
            .map(|(k, _)| k.clone())
            .collect();
        let mut removed_ifindexes = Vec::new();
        for k in stale {
            let a = self.attached.remove(&k).expect("present");
            removed_ifindexes.push(a.ifindex);
            self.free_ids.push(a.id);
            self.detach(a);
        }

        // Ids for new pods.
        let mut ids: BTreeMap<ObjKey, u32> = self.attached.iter().map(|(k, a)| (k.clone(), a.id)).collect();
        for (k, p) in pods {
            if !ids.contains_key(k) {
                match self.alloc_id(p.ifindex) {
                    Ok(id) => {
                        ids.insert(k.clone(), id);
                    }
                    Err(e) => report.errors.push(format!("{k}: {e}")),
                }
            }
        }

        // Desired map contents.
        let mut desired = Desired::default();
        for (k, p) in pods {
            if let Some(id) = ids.get(k) {
                entries::add_pod(*id, &p.compiled, &mut self.interner, &mut desired);
            }
        }

        // Port sets first, then peers that reference them, then endpoints that enable them.
        for (k, v) in &desired.ports {
            if !self.installed_ports.contains(k) {
                match self.ports.insert(&Key::new(k.0, k.1), *v, 0) {
                    Ok(()) => {
                        self.installed_ports.insert(*k);
                    }
                    Err(e) => report.errors.push(format!("POLICY_PORTS insert (set {}): {e}", k.1.portset)),
                }
            }
        }
        let owner: HashMap<u32, &ObjKey> = ids.iter().map(|(k, id)| (*id, k)).collect();
        for (k, v) in &desired.peers {
            if self.installed_peers.get(k) != Some(v) {
                match self.peers.insert(&Key::new(k.0, k.1), *v, 0) {
                    Ok(()) => {
                        self.installed_peers.insert(*k, *v);
                    }
                    Err(e) => {
                        let pod = owner.get(&k.1.endpoint).map(|p| p.to_string()).unwrap_or_default();
                        report.errors.push(format!("{pod}: POLICY_PEERS insert: {e}"));
                    }
                }
            }
        }
        for (k, p) in pods {
            let Some(&id) = ids.get(k) else { continue };
            let info = EndpointInfo { id, flags: entries::endpoint_flags(&p.compiled) };
            if self.endpoints.get(&p.ifindex, 0).ok() != Some(info) {
                if let Err(e) = self.endpoints.insert(p.ifindex, info, 0) {
                    report.errors.push(format!("{k}: ENDPOINTS insert: {e}"));
                    continue;
                }
            }
            if !self.attached.contains_key(k) {
                match self.attach(&p.ifname) {
                    Ok(links) => {
                        self.attached.insert(k.clone(), Attached { ifindex: p.ifindex, id, links });
                    }
                    Err(e) => {
                        report.errors.push(format!("{k}: attaching to {}: {e:#}", p.ifname));
                        let _ = self.endpoints.remove(&p.ifindex);
                        self.free_ids.push(id);
                    }
                }
            }
        }

        // Remove what is no longer wanted.
        let live_ifindexes: BTreeSet<u32> = pods.values().map(|p| p.ifindex).collect();
        for ifindex in removed_ifindexes {
            if !live_ifindexes.contains(&ifindex) {
                let _ = self.endpoints.remove(&ifindex);
            }
        }
        let adopted: Vec<u32> = self.adopted_ids.drain().map(|(ifindex, _)| ifindex).collect();
        for ifindex in adopted {
            if !live_ifindexes.contains(&ifindex) {
                let _ = self.endpoints.remove(&ifindex);
            }
        }
        let stale_peers: Vec<Lpm<PeerKey>> =
            self.installed_peers.keys().filter(|k| !desired.peers.contains_key(k)).copied().collect();
        for k in stale_peers {
            let _ = self.peers.remove(&Key::new(k.0, k.1));
            self.installed_peers.remove(&k);
        }
        let stale_ports: Vec<Lpm<PortKey>> =
            self.installed_ports.iter().filter(|k| !desired.ports.contains_key(k)).copied().collect();
        for k in stale_ports {
            let _ = self.ports.remove(&Key::new(k.0, k.1));
            self.installed_ports.remove(&k);
        }
        let used_sets: BTreeSet<u32> = desired.peers.values().map(|v| v.portset).collect();
        self.interner.retain(&used_sets);

        report.peers = self.installed_peers.len();
        report.ports = self.installed_ports.len();
        report.endpoints = self.attached.len();
        report
    }
}

/// Reads the packet counters from the pinned COUNTERS map (usable from any thread).
pub struct CounterReader {
    map: PerCpuArray<MapData, u64>,
}

impl CounterReader {
    pub fn open(pin_dir: &Path) -> Result<CounterReader> {
        let path = pin_dir.join(maps::COUNTERS);
        let md = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let map = PerCpuArray::try_from(Map::from_map_data(md)?)?;
        Ok(CounterReader { map })
    }

    pub fn read(&self, endpoint: u32, dir: u8, verdict: u32) -> u64 {
        self.map
            .get(&counter_index(endpoint, dir, verdict), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}

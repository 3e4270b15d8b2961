//! The kernel side: loads the TC programs with maps pinned under the bpffs path, attaches them
//! to pod interfaces (TCX where the kernel has it, clsact + cls_bpf otherwise) and keeps the maps
//! equal to the compiled state by applying only differences.
use std::collections::{BTreeMap, BTreeSet};

/// Hash maps keyed by our own values: a fast non-cryptographic hasher (no untrusted keys).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use aya::programs::tc::{self, NlOptions, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use netpol_common::*;

use crate::model::cidr::addr_bytes;
use crate::compiler::NodePolicy;
use crate::entries::{self, ClassInterner, Desired, Lpm, PortSetInterner};
use crate::model::ObjKey;

/// The compiled eBPF object, built by build.rs from netpol-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));

/// A local pod's host-side interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub ifindex: u32,
    pub ifname: String,
}

/// One program attached to one interface.
enum AttachedLink {
    /// A TCX link pinned at `path`: it outlives the daemon, which re-adopts it on restart.
    Pinned { link: aya::programs::links::FdLink, path: PathBuf },
    /// A clsact/cls_bpf filter (kernels without TCX), owned by the program.
    Netlink { prog: &'static str, id: tc::SchedClassifierLinkId },
}

struct Attached {
    ifindex: u32,
    /// Attached for a pending interface ([`crate::compiler::CompiledPod::pending`]).
    pending: bool,
    id: u32,
    links: Vec<AttachedLink>,
}

/// Problems met while programming, per pod; the rest of the node stays programmed.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub errors: Vec<String>,
    pub identities: usize,
    pub policy: usize,
    pub ports: usize,
    pub endpoints: usize,
    /// Local pods whose entries did not fit: their isolated directions deny everything.
    pub fail_closed: Vec<ObjKey>,
}

/// How many entries the daemon lets each map hold (the map sizes; smaller in tests).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub identities: usize,
    pub policy: usize,
    pub ports: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { identities: IDENTITIES_MAX as usize, policy: POLICY_MAX as usize, ports: POLICY_PORTS_MAX as usize }
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    endpoints: Endpoints,
    identities: LpmTrie<MapData, IdKey, u32>,
    policy: BpfHashMap<MapData, PolicyKey, PolicyValue>,
    ports: LpmTrie<MapData, PortKey, PortValue>,
    node_addrs: BpfHashMap<MapData, AddrKey, u8>,
    /// Per endpoint: the addresses its pod may send from (anti-spoofing).
    endpoint_addrs: BpfHashMap<MapData, EpAddrKey, u8>,
    installed_endpoint_addrs: BTreeSet<EpAddrKey>,
    counters: PerCpuArray<MapData, u64>,
    policy_counters: PerCpuArray<MapData, u64>,
    /// Per endpoint id and direction: later fragments dropped before their first fragment.
    frag_early: PerCpuArray<MapData, u64>,
    /// Per endpoint id and direction: the policies whose slots its POLICY_COUNTERS hold.
    slot_policies: HashMap<(u32, u8), Vec<ObjKey>>,
    /// Counts folded out of the map when a pod's policy list (the meaning of its slots)
    /// changed: (pod, direction, policy label) -> packets.
    retired_counts: BTreeMap<(ObjKey, u8, String), u64>,
    config: aya::maps::Array<MapData, Config>,
    conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    /// Per endpoint id: the epoch of its flow-cache slots (bumped to void them).
    flow_epoch: FlowEpochs,
    /// The settings last given to `set_config`, and whether the flow cache is used.
    settings: Config,
    flow_cache: bool,
    events: Option<aya::maps::RingBuf<MapData>>,
    limits: Limits,
    installed_identities: HashMap<Lpm<IdKey>, u32>,
    installed_policy: HashMap<PolicyKey, PolicyValue>,
    installed_ports: BTreeSet<Lpm<PortKey>>,
    installed_node_addrs: BTreeSet<AddrKey>,
    portsets: PortSetInterner,
    /// The map contents of the last sync, updated in place for what changed.
    entry_cache: entries::EntryCache,
    /// The last sync left something unwritten (an error, entries cut to fit): the next one
    /// compares every entry.
    compare_all: bool,
    classes: ClassInterner,
    attached: BTreeMap<ObjKey, Attached>,
    /// Endpoint ids found in the pinned ENDPOINTS map at start, by ifindex (adopted on restart).
    adopted_ids: HashMap<u32, u32>,
    /// Pinned links a previous daemon left, by (ifindex, program): re-used, not re-created.
    adopted_links: HashMap<(u32, &'static str), PathBuf>,
    free_ids: Vec<u32>,
    next_id: u32,
    pub use_tcx: bool,
    /// Attach programs to interfaces (false: maps only, for BPF_PROG_TEST_RUN and benches).
    attach_programs: bool,
}

/// A PREEMPT_RT kernel (BPF programs preemptible, so two can interleave on one CPU).
fn preempt_rt() -> bool {
    std::fs::read_to_string("/sys/kernel/realtime").is_ok_and(|s| s.trim() == "1")
}

/// `FLOW_EPOCH` mapped into this process (the array is BPF_F_MMAPABLE), so that the daemon
/// increments an endpoint's epoch atomically, as the programs do on a TCP RST: a read and a
/// write through the map syscalls could undo one of their increments and revive voided slots.
struct FlowEpochs {
    ptr: *mut std::sync::atomic::AtomicU64,
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
            unsafe { &*self.ptr.add(id as usize) }.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for FlowEpochs {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

/// The endpoint table: an array indexed by ifindex, a hash for large ifindexes.
struct Endpoints {
    array: aya::maps::Array<MapData, EndpointInfo>,
    hash: BpfHashMap<MapData, u32, EndpointInfo>,
}

impl Endpoints {
    fn get(&self, ifindex: u32) -> Option<EndpointInfo> {
        let e = if ifindex < ENDPOINTS_ARRAY_SIZE { self.array.get(&ifindex, 0).ok() } else { self.hash.get(&ifindex, 0).ok() };
        e.filter(|e| e.flags & EP_PRESENT != 0)
    }

    fn insert(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), aya::maps::MapError> {
        if ifindex < ENDPOINTS_ARRAY_SIZE {
            self.array.set(ifindex, info, 0)
        } else {
            self.hash.insert(ifindex, info, 0)
        }
    }

    fn remove(&mut self, ifindex: u32) {
        if ifindex < ENDPOINTS_ARRAY_SIZE {
            let _ = self.array.set(ifindex, EndpointInfo::default(), 0);
        } else {
            let _ = self.hash.remove(&ifindex);
        }
    }

    fn all(&self) -> Result<Vec<(u32, EndpointInfo)>> {
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

fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let m = ebpf.take_map(name).ok_or_else(|| anyhow!("eBPF object has no map {name}"))?;
    T::try_from(m).with_context(|| format!("map {name}"))
}

/// A pinned map keeps the layout it was created with, and aya adopts a pin without comparing
/// layouts: so when `CtValue` grew the TCP sequence state the map was renamed (`CONNTRACK2`),
/// and a daemon started over the pins of an older one copies the tracked flows of the old
/// `CONNTRACK` (16-byte values) into the new map, then removes the old pin (the old programs
/// hold it until their links are swapped to this daemon's programs). Migrated entries carry
/// no sequence state: an RST ends them as before, and their next packets fill it in. Errors
/// only cost the old entries (those flows are judged afresh), never the start.
fn migrate_conntrack_v1(pin_dir: &Path, new: &mut BpfHashMap<MapData, CtKey, CtValue>) {
    let path = pin_dir.join(maps::CONNTRACK_V1);
    if !path.exists() {
        return;
    }
    let migrated = (|| -> Result<usize> {
        let md = MapData::from_pin(&path)?;
        let old: BpfHashMap<MapData, CtKey, CtValueV1> = BpfHashMap::try_from(Map::LruHashMap(md))?;
        let mut n = 0;
        for item in old.iter() {
            let (k, v) = item?;
            // Only the FIN bit existed then.
            let flags = v.flags & CT_TCP_FIN_SEEN;
            if new.insert(k, CtValue { last_seen_ns: v.last_seen_ns, flags, policy: v.policy, seq: [0; 2], ack: [0; 2] }, 0).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    })();
    match migrated {
        Ok(n) => log::info!("migrated {n} tracked flow(s) from the old {} map", maps::CONNTRACK_V1),
        Err(e) => log::warn!("old {} map not migrated ({e:#}); its flows will be judged afresh", maps::CONNTRACK_V1),
    }
    let _ = std::fs::remove_file(&path);
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
    EpAddrKey { endpoint, family: if a.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }, _pad: [0; 3], addr: addr_bytes(a) }
}

/// Pinned maps whose layout differs from this build's (a daemon of an older version left
/// them: e.g. `EndpointInfo` grew, `COUNTERS` got a verdict more) cannot be re-used: the
/// verifier would reject programs reading past their values. They are unpinned, so that new
/// ones are created; the old programs keep theirs (and enforce) until their links get the new
/// programs. What they held is programmed again by the first sync (counts restart).
fn drop_pins_of_other_layouts(pin_dir: &Path) {
    let want: [(&str, u32, u32); 4] = [
        (maps::ENDPOINTS_ARRAY, std::mem::size_of::<EndpointInfo>() as u32, ENDPOINTS_ARRAY_SIZE),
        (maps::ENDPOINTS, std::mem::size_of::<EndpointInfo>() as u32, ENDPOINTS_MAX),
        (maps::COUNTERS, 8, MAX_ENDPOINTS * COUNTER_SLOTS),
        (maps::ENDPOINT_ADDRS, 1, ENDPOINT_ADDRS_MAX),
    ];
    for (name, value_size, max_entries) in want {
        let path = pin_dir.join(name);
        let Ok(md) = MapData::from_pin(&path) else { continue };
        let Ok(info) = md.info() else { continue };
        if info.value_size() != value_size || info.max_entries() != max_entries {
            log::warn!(
                "pinned map {} has another layout (value {} bytes, {} entries; this version: {value_size}, {max_entries}): replacing it",
                path.display(),
                info.value_size(),
                info.max_entries()
            );
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Refuses a `--bpffs` whose pins would not outlive the daemon: enforcement must not depend
/// on the process (README). That is the case when the daemon runs in a mount namespace of its
/// own (`ip netns exec`, `unshare --mount`) and the bpffs holding `path` is not the one PID 1
/// sees at the same place: its pins (maps, TCX links) go with the namespace when the daemon
/// exits, and the programs detach. Without any bpffs there, `ensure_bpffs` would mount a
/// private one. In a container, PID 1 shares the daemon's mount namespace (the host's bpffs
/// is mounted into it): nothing to check. `allow` (`--allow-private-bpffs`) forces it.
pub fn check_bpffs_outlives_daemon(path: &Path, allow: bool) -> Result<()> {
    let ns = |p: &str| std::fs::read_link(p).ok();
    let (own, init) = (ns("/proc/self/ns/mnt"), ns("/proc/1/ns/mnt"));
    if own.is_some() && own == init {
        return Ok(());
    }
    let problem = match bpffs_mount_of(path) {
        None => format!("no bpffs is mounted at {} in this mount namespace (one mounted here would be private to it)", path.display()),
        Some(mnt) => {
            use std::os::unix::fs::MetadataExt;
            let here = std::fs::metadata(&mnt).map(|m| m.dev()).ok();
            let init_path = Path::new("/proc/1/root").join(mnt.strip_prefix("/").unwrap_or(&mnt));
            let there = std::fs::metadata(&init_path).map(|m| m.dev()).ok();
            if here.is_some() && here == there {
                return Ok(());
            }
            if there.is_none() {
                // PID 1 is not ours to look at (a sandbox; no CAP_SYS_PTRACE): a bpffs is
                // mounted here, which is what a host bind mount looks like too.
                log::warn!("--bpffs {}: cannot compare the bpffs at {} with PID 1's; assuming it is the host's", path.display(), mnt.display());
                return Ok(());
            }
            format!("the bpffs at {} is not the one PID 1 sees there (a private mount)", mnt.display())
        }
    };
    let msg = format!(
        "--bpffs {}: the daemon runs in a mount namespace of its own ({}) and {problem}: the pinned maps and links would vanish when the daemon exits and enforcement would stop. Run it in the host's mount namespace (not under `ip netns exec`/`unshare --mount`) or mount the host's bpffs there; --allow-private-bpffs starts anyway",
        path.display(),
        own.map(|p| p.display().to_string()).unwrap_or_else(|| "unknown".into())
    );
    if allow {
        log::warn!("{msg} (allowed by --allow-private-bpffs)");
        return Ok(());
    }
    Err(anyhow!(msg))
}

/// The mount point of the bpffs holding `path` in this mount namespace (the longest bpf mount
/// point `path` is under), if any.
fn bpffs_mount_of(path: &Path) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| {
            // "id parent maj:min root mountpoint opts [optional...] - fstype source superopts"
            let (pre, post) = l.split_once(" - ")?;
            let mnt = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "bpf").then(|| PathBuf::from(mnt.replace("\\040", " ")))
        })
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.components().count())
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

/// The keys among which entries no longer desired are looked for: the keys that changed
/// (an incremental sync), every installed key (comparing everything, where the counts say
/// something differs, or after a failure), or none.
fn stale_keys<K>(changed: Option<Vec<K>>, compare_installed: bool, installed: impl Iterator<Item = K>) -> Vec<K> {
    match changed {
        Some(keys) => keys,
        None if compare_installed => installed.collect(),
        None => Vec::new(),
    }
}

impl Datapath {
    /// Loads the programs, creating or re-using the pinned maps in `pin_dir`.
    pub fn load(pin_dir: &Path) -> Result<Datapath> {
        ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
        drop_pins_of_other_layouts(pin_dir);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (is this root, with bpffs mounted?)")?;
        for name in [programs::FROM_POD, programs::TO_POD, programs::NOOP] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("eBPF object has no program {name}"))?
                .try_into()?;
            prog.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        let endpoints = Endpoints { array: take(&mut ebpf, maps::ENDPOINTS_ARRAY)?, hash: take(&mut ebpf, maps::ENDPOINTS)? };
        let identities: LpmTrie<MapData, IdKey, u32> = take(&mut ebpf, maps::IDENTITIES)?;
        let policy: BpfHashMap<MapData, PolicyKey, PolicyValue> = take(&mut ebpf, maps::POLICY)?;
        let ports: LpmTrie<MapData, PortKey, PortValue> = take(&mut ebpf, maps::POLICY_PORTS)?;
        let node_addrs: BpfHashMap<MapData, AddrKey, u8> = take(&mut ebpf, maps::NODE_ADDRS)?;
        let endpoint_addrs: BpfHashMap<MapData, EpAddrKey, u8> = take(&mut ebpf, maps::ENDPOINT_ADDRS)?;
        let counters: PerCpuArray<MapData, u64> = take(&mut ebpf, maps::COUNTERS)?;
        let policy_counters: PerCpuArray<MapData, u64> = take(&mut ebpf, maps::POLICY_COUNTERS)?;
        let frag_early: PerCpuArray<MapData, u64> = take(&mut ebpf, maps::FRAG_EARLY)?;
        let config: aya::maps::Array<MapData, Config> = take(&mut ebpf, maps::CONFIG)?;
        let mut conntrack: BpfHashMap<MapData, CtKey, CtValue> = take(&mut ebpf, maps::CONNTRACK)?;
        migrate_conntrack_v1(pin_dir, &mut conntrack);
        let flow_epoch = FlowEpochs::map(ebpf.take_map(maps::FLOW_EPOCH).ok_or_else(|| anyhow!("eBPF object has no map FLOW_EPOCH"))?)?;
        let events: aya::maps::RingBuf<MapData> = take(&mut ebpf, maps::EVENTS)?;

        // Adopt what a previous daemon left in the pinned maps: it keeps enforcing until the
        // first sync replaces it entry by entry. New ids start above the adopted ones.
        let mut installed_identities = HashMap::default();
        let mut max_class = 0;
        for item in identities.iter() {
            let (k, v) = item?;
            max_class = max_class.max(v);
            installed_identities.insert((k.prefix_len(), k.data()), v);
        }
        let mut installed_policy = HashMap::default();
        for item in policy.iter() {
            let (k, v) = item?;
            max_class = max_class.max(k.identity);
            installed_policy.insert(k, v);
        }
        let mut installed_ports = BTreeSet::new();
        let mut max_set = 0;
        for k in ports.keys() {
            let k = k?;
            max_set = max_set.max(k.data().portset);
            installed_ports.insert((k.prefix_len(), k.data()));
        }
        let mut adopted_ids = HashMap::default();
        for (ifindex, info) in endpoints.all()? {
            adopted_ids.insert(ifindex, info.id);
        }
        let mut installed_node_addrs = BTreeSet::new();
        for k in node_addrs.keys() {
            installed_node_addrs.insert(k?);
        }
        let mut installed_endpoint_addrs = BTreeSet::new();
        for k in endpoint_addrs.keys() {
            installed_endpoint_addrs.insert(k?);
        }
        let next_id = adopted_ids.values().max().map_or(0, |m| m + 1);
        let mut adopted_links = HashMap::default();
        if let Ok(rd) = std::fs::read_dir(pin_dir.join("links")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let Some((ifindex, prog)) = name.split_once('-') else { continue };
                let Ok(ifindex) = ifindex.parse::<u32>() else { continue };
                let prog = match prog {
                    "from" => programs::FROM_POD,
                    "to" => programs::TO_POD,
                    _ => continue,
                };
                adopted_links.insert((ifindex, prog), e.path());
            }
        }
        let mut dp = Datapath {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            endpoints,
            identities,
            policy,
            ports,
            node_addrs,
            endpoint_addrs,
            installed_endpoint_addrs,
            counters,
            policy_counters,
            frag_early,
            slot_policies: HashMap::default(),
            retired_counts: BTreeMap::new(),
            config,
            conntrack,
            flow_epoch,
            settings: Config::default(),
            flow_cache: !preempt_rt(),
            events: Some(events),
            limits: Limits::default(),
            installed_identities,
            installed_policy,
            installed_ports,
            installed_node_addrs,
            portsets: PortSetInterner::starting_at(max_set + 1),
            entry_cache: Default::default(),
            compare_all: true,
            classes: ClassInterner::starting_at(max_class + 1),
            attached: BTreeMap::new(),
            adopted_ids,
            adopted_links,
            free_ids: Vec::new(),
            next_id,
            use_tcx: true,
            attach_programs: true,
        };
        // The settings a previous daemon left (zero: the defaults) until `set_config`, with
        // the flow cache on for them.
        let kept = dp.config.get(&0, 0).unwrap_or_default();
        dp.set_config(&kept)?;
        Ok(dp)
    }

    /// Loads the programs and maps without ever attaching to an interface: the maps are
    /// programmed as usual and the programs are run with [`Datapath::test_run`]. A test run
    /// sees the loopback device's ifindex (1 in a fresh namespace) unless told otherwise.
    pub fn load_detached(pin_dir: &Path) -> Result<Datapath> {
        let mut dp = Datapath::load(pin_dir)?;
        dp.attach_programs = false;
        Ok(dp)
    }

    /// Runs the program of direction `dir` on `frame` (starting at the Ethernet header)
    /// `repeat` times with BPF_PROG_TEST_RUN: its verdict (TC_ACT_*) and the kernel-measured
    /// mean duration of one run.
    pub fn test_run(&mut self, dir: crate::model::Direction, frame: &[u8], repeat: u32) -> Result<(i32, std::time::Duration)> {
        let name = match dir {
            crate::model::Direction::Egress => programs::FROM_POD,
            crate::model::Direction::Ingress => programs::TO_POD,
        };
        self.test_run_program(name, frame, repeat)
    }

    /// [`Datapath::test_run`] of a frame that entered the node through `ingress_ifindex` (the
    /// `__sk_buff` field; 0 in a plain test run), on the endpoint of ifindex 1.
    pub fn test_run_from(&mut self, dir: crate::model::Direction, frame: &[u8], ingress_ifindex: u32) -> Result<i32> {
        use aya::programs::{TestRun, TestRunOptions};
        let name = match dir {
            crate::model::Direction::Egress => programs::FROM_POD,
            crate::model::Direction::Ingress => programs::TO_POD,
        };
        let prog: &mut SchedClassifier = self.ebpf.program_mut(name).expect("loaded").try_into()?;
        // struct __sk_buff up to tc_index: ingress_ifindex at 36, ifindex at 40.
        let mut ctx = [0u8; 48];
        ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&1u32.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(&ctx), repeat: 1, ..TestRunOptions::new() })?;
        Ok(r.return_value as i32)
    }

    /// [`Datapath::test_run`] for any program of the object by name.
    pub fn test_run_program(&mut self, name: &str, frame: &[u8], repeat: u32) -> Result<(i32, std::time::Duration)> {
        use aya::programs::{TestRun, TestRunOptions};
        let prog: &mut SchedClassifier = self.ebpf.program_mut(name).expect("loaded").try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat: repeat.max(1), ..TestRunOptions::new() })?;
        Ok((r.return_value as i32, r.duration))
    }

    /// Lowers the entry budgets below the map sizes (to exercise the fail-closed path).
    pub fn set_limits(&mut self, l: Limits) {
        let d = Limits::default();
        self.limits = Limits { identities: l.identities.min(d.identities), policy: l.policy.min(d.policy), ports: l.ports.min(d.ports) };
    }

    /// Per program: (name, instructions the verifier processed, translated bytes / 8 = BPF
    /// instructions after verification, JIT-compiled bytes), as the kernel reports them.
    pub fn program_stats(&self) -> Vec<(String, Option<u32>, Option<u32>, Option<u32>)> {
        let mut out = Vec::new();
        for name in [programs::FROM_POD, programs::TO_POD] {
            let Some(p) = self.ebpf.program(name) else { continue };
            let Ok(p): Result<&SchedClassifier, _> = p.try_into() else { continue };
            if let Ok(info) = p.info() {
                out.push((name.to_string(), info.verified_instruction_count(), info.size_translated().map(|b| b / 8), Some(info.size_jitted())));
            }
        }
        out
    }

    /// Runtime settings for the programs (conntrack timeouts, deny events). The flow cache's
    /// lifetime follows from the timeouts (`flow_cache_ticks`); the given one is ignored.
    /// Every cached flow is voided, so none outlives a timeout that just got shorter.
    pub fn set_config(&mut self, c: &Config) -> Result<()> {
        self.settings = *c;
        let ticks = if self.flow_cache { flow_cache_ticks(c) } else { 0 };
        self.config.set(0, Config { flow_cache_ticks: ticks, ..*c }, 0)?;
        for id in 0..MAX_ENDPOINTS {
            self.flow_epoch.bump(id);
        }
        Ok(())
    }

    /// Turns the flow cache on (the default) or off (`--flow-cache off`: every packet of an
    /// established flow looks the conntrack table up).
    /// Stays off on PREEMPT_RT kernels: there two programs can interleave on one CPU, and a
    /// slot half-written by one must never be read by the other.
    pub fn set_flow_cache(&mut self, on: bool) -> Result<()> {
        let rt = preempt_rt();
        if on && rt {
            log::warn!("PREEMPT_RT kernel: the flow cache stays off (every packet looks the conntrack table up)");
        }
        self.flow_cache = on && !rt;
        let c = self.settings;
        self.set_config(&c)
    }

    /// Voids the flow-cache slots of endpoint `id` on every CPU: its packets go through the
    /// conntrack table again (after flows were cut, or when the id goes to a new pod).
    fn void_flow_cache(&mut self, id: u32) {
        self.flow_epoch.bump(id);
    }

    /// The deny-event ring buffer, for a reader thread.
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.events.take()
    }

    /// Removes tracked flows the compiled policy no longer allows (`--established=revalidate`).
    /// Returns how many were cut.
    pub fn revalidate(&mut self, node: &NodePolicy, node_addrs: &[IpAddr]) -> usize {
        let pod_of: HashMap<u32, ObjKey> = self.attached.iter().map(|(k, a)| (a.id, k.clone())).collect();
        let to_ip = |family: u8, b: [u8; 16]| -> IpAddr {
            if family == FAMILY_V4 {
                IpAddr::from([b[0], b[1], b[2], b[3]])
            } else {
                IpAddr::from(b)
            }
        };
        let mut cut = Vec::new();
        for k in self.conntrack.keys().flatten() {
            let Some(pod) = pod_of.get(&k.endpoint) else { continue };
            let (dir, peer) = if k.dir == DIR_INGRESS {
                (crate::model::Direction::Ingress, to_ip(k.family, k.src))
            } else {
                (crate::model::Direction::Egress, to_ip(k.family, k.dst))
            };
            if dir == crate::model::Direction::Ingress && node_addrs.contains(&peer) {
                continue;
            }
            let port = matches!(k.proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP).then_some(k.dport);
            if !node.permits(pod, dir, peer, k.proto, port) {
                cut.push(k);
            }
        }
        for k in &cut {
            let _ = self.conntrack.remove(k);
        }
        let ids: BTreeSet<u32> = cut.iter().map(|k| k.endpoint).collect();
        for id in ids {
            self.void_flow_cache(id);
        }
        cut.len()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The node's own addresses: always allowed into local pods (kubelet probes). Only those
    /// [`node_addr_for_pods`] keeps.
    pub fn set_node_addrs(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let want: BTreeSet<AddrKey> = addrs
            .iter()
            .filter(|a| node_addr_for_pods(**a))
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
                self.void_flow_cache(id);
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
        self.void_flow_cache(id);
        Ok(id)
    }

    fn reset_counters(&mut self, id: u32) {
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for verdict in [VERDICT_ALLOW, VERDICT_DENY, VERDICT_AUDIT, VERDICT_SPOOFED] {
                zero(&mut self.counters, counter_index(id, dir, verdict));
            }
            zero(&mut self.frag_early, id * 2 + dir as u32);
            for slot in 0..POLICY_SLOTS {
                zero(&mut self.policy_counters, policy_counter_index(id, dir, slot));
            }
            self.slot_policies.remove(&(id, dir));
        }
    }

    /// Keeps the per-policy counters meaningful when the policies of a pod change: the slots
    /// of an endpoint whose policy list changed are folded into `retired_counts` under their
    /// old meaning and zeroed. (The first list seen for an endpoint, e.g. after a restart,
    /// adopts what the pinned map holds.)
    fn remap_policy_slots(&mut self, node: &NodePolicy, ids: &BTreeMap<ObjKey, u32>) {
        for (k, id) in ids {
            for dir in crate::model::Direction::BOTH {
                let d = dir.datapath();
                let want: &[ObjKey] = node.pods.get(k).and_then(|c| c.dir(dir)).map_or(&[], |dp| &dp.policies);
                let Some(old) = self.slot_policies.get(&(*id, d)) else {
                    self.slot_policies.insert((*id, d), want.to_vec());
                    continue;
                };
                if old == want {
                    continue;
                }
                let old = self.slot_policies.insert((*id, d), want.to_vec()).expect("present");
                for slot in 0..(old.len() as u32).min(POLICY_SLOTS) {
                    let idx = policy_counter_index(*id, d, slot);
                    let n: u64 = self.policy_counters.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0);
                    if n > 0 {
                        *self.retired_counts.entry((k.clone(), d, slot_label(&old, slot))).or_default() += n;
                    }
                    zero(&mut self.policy_counters, idx);
                }
            }
        }
        self.retired_counts.retain(|(k, _, _), _| ids.contains_key(k));
    }

    /// For the metrics: per programmed pod and direction, its endpoint id and slot labels,
    /// and the counts folded out of the map.
    pub fn policy_slots(&self) -> (Vec<(u32, ObjKey, u8, Vec<String>)>, BTreeMap<(ObjKey, u8, String), u64>) {
        let mut out = Vec::new();
        for (k, a) in &self.attached {
            for d in [DIR_INGRESS, DIR_EGRESS] {
                if let Some(list) = self.slot_policies.get(&(a.id, d)).filter(|l| !l.is_empty()) {
                    let labels = (0..(list.len() as u32).min(POLICY_SLOTS)).map(|s| slot_label(list, s)).collect();
                    out.push((a.id, k.clone(), d, labels));
                }
            }
        }
        (out, self.retired_counts.clone())
    }

fn link_path(&self, ifindex: u32, prog: &str) -> PathBuf {
        let short = if prog == programs::FROM_POD { "from" } else { "to" };
        self.pin_dir.join("links").join(format!("{ifindex}-{short}"))
    }

    /// Attaches both programs to an interface: adopts the pinned links of a previous daemon
    /// (atomically swapping in this daemon's program), else creates and pins TCX links, else
    /// (no TCX) adds clsact filters.
    fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<Vec<AttachedLink>> {
        use aya::programs::links::{FdLink, PinnedLink};
        let mut links = Vec::new();
        for (name, ty) in [(programs::FROM_POD, TcAttachType::Ingress), (programs::TO_POD, TcAttachType::Egress)] {
            let path = self.link_path(ifindex, name);
            if let Some(old) = self.adopted_links.remove(&(ifindex, name)) {
                let prog: &mut SchedClassifier = self.ebpf.program_mut(name).expect("loaded").try_into()?;
                let adopted = PinnedLink::from_pin(&old)
                    .map_err(anyhow::Error::from)
                    .and_then(|p| Ok(tc::SchedClassifierLink::try_from(FdLink::from(p))?))
                    .and_then(|l| Ok(prog.attach_to_link(l)?))
                    .and_then(|id| Ok(FdLink::try_from(prog.take_link(id)?)?));
                match adopted {
                    Ok(link) => {
                        links.push(AttachedLink::Pinned { link, path: old });
                        continue;
                    }
                    Err(e) => {
                        log::info!("pinned link {} not re-usable ({e:#}); attaching anew", old.display());
                        let _ = std::fs::remove_file(&old);
                    }
                }
            }
            let prog: &mut SchedClassifier = self.ebpf.program_mut(name).expect("loaded").try_into()?;
            if self.use_tcx {
                match prog.attach(ifname, ty) {
                    Ok(id) => {
                        let link = FdLink::try_from(prog.take_link(id)?)?;
                        std::fs::create_dir_all(path.parent().unwrap())?;
                        let _ = std::fs::remove_file(&path);
                        let pinned = link.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
                        links.push(AttachedLink::Pinned { link: FdLink::from(pinned), path });
                        continue;
                    }
                    Err(e) => {
                        log::warn!("TCX attach of {name} to {ifname} failed ({e}); falling back to clsact");
                        self.use_tcx = false;
                    }
                }
            }
            let _ = tc::qdisc_add_clsact(ifname);
            let id = prog.attach_with_options(ifname, ty, TcAttachOptions::Netlink(NlOptions::default()))?;
            links.push(AttachedLink::Netlink { prog: name, id });
        }
        Ok(links)
    }

    fn detach(&mut self, a: Attached) {
        for l in a.links {
            match l {
                AttachedLink::Pinned { link, path } => {
                    // Unpinned and closed: the kernel detaches it (or it is gone with its
                    // interface already).
                    let _ = std::fs::remove_file(&path);
                    drop(link);
                }
                AttachedLink::Netlink { prog, id } => {
                    if let Some(p) = self.ebpf.program_mut(prog) {
                        let p: Result<&mut SchedClassifier, _> = p.try_into();
                        if let Ok(p) = p {
                            let _ = p.detach(id);
                        }
                    }
                }
            }
        }
    }

    /// Removes every pinned link and map of this daemon: enforcement stops. (`netpol-daemon
    /// uninstall`; a normal exit keeps enforcing.)
    pub fn uninstall(pin_dir: &Path) -> Result<()> {
        if pin_dir.exists() {
            std::fs::remove_dir_all(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
        }
        Ok(())
    }

    /// Endpoint id and pod of every attached interface (for metrics).
    pub fn endpoint_ids(&self) -> Vec<(u32, ObjKey)> {
        self.attached.iter().map(|(k, a)| (a.id, k.clone())).collect()
    }

    /// Programs the maps and attachments to be exactly what `node` says for the pods in
    /// `ifaces` (pods without an interface are not programmed). Only differences are written;
    /// new entries go in before the entries that refer to them, stale ones go last.
    pub fn sync(&mut self, node: &NodePolicy, ifaces: &BTreeMap<ObjKey, Iface>) -> SyncReport {
        let mut report = SyncReport::default();
        let pods: BTreeMap<&ObjKey, (&Iface, u32)> = node
            .pods
            .iter()
            .filter_map(|(k, c)| ifaces.get(k).map(|i| (k, (i, entries::endpoint_flags(c)))))
            .collect();

        // A pending interface claimed by its pod keeps its programs and id (no detach, no
        // window): only its entries and flags change below.
        let claimed: Vec<(ObjKey, ObjKey)> = self
            .attached
            .iter()
            .filter(|(k, a)| a.pending && !pods.contains_key(*k))
            .filter_map(|(k, a)| {
                pods.iter()
                    .find(|(pk, (i, _))| node.pods[**pk].pending.is_none() && i.ifindex == a.ifindex && !self.attached.contains_key(**pk))
                    .map(|(pk, _)| (k.clone(), (*pk).clone()))
            })
            .collect();
        for (old, new) in claimed {
            let mut a = self.attached.remove(&old).expect("present");
            a.pending = false;
            self.attached.insert(new, a);
        }

        // Interfaces that disappeared or changed: detach first (the ids are freed below).
        let stale: Vec<ObjKey> = self
            .attached
            .iter()
            .filter(|(k, a)| pods.get(*k).is_none_or(|(i, _)| i.ifindex != a.ifindex))
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
        for (k, (iface, _)) in &pods {
            if !ids.contains_key(*k) {
                match self.alloc_id(iface.ifindex) {
                    Ok(id) => {
                        ids.insert((*k).clone(), id);
                    }
                    Err(e) => report.errors.push(format!("{k}: {e}")),
                }
            }
        }

        self.remap_policy_slots(node, &ids);
        let mut cache = std::mem::take(&mut self.entry_cache);
        let changed = cache.refresh(node, &ids, &mut self.classes, &mut self.portsets);
        // Entries cut to fit a map: on a copy, compared in full.
        let fitted = self.fit_maps(node, &cache.cur, &ids, &mut report);
        let desired = fitted.as_ref().unwrap_or(&cache.cur);
        // The keys to compare: only those that changed, when the last sync left everything
        // written; else every desired key (and, below, every installed one).
        let (port_keys, policy_keys, identity_keys, incremental) = match changed.filter(|_| fitted.is_none() && !self.compare_all) {
            Some(c) => (c.ports, c.policy, c.identities, true),
            None => (
                desired.ports.keys().copied().collect(),
                desired.policy.keys().copied().collect(),
                desired.identities.keys().copied().collect(),
                false,
            ),
        };

        // Port sets, then per-endpoint policy, then address classes, then endpoints.
        for k in &port_keys {
            let Some(v) = desired.ports.get(k) else { continue };
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
        for k in &policy_keys {
            let Some(v) = desired.policy.get(k) else { continue };
            if self.installed_policy.get(k) != Some(v) {
                match self.policy.insert(k, *v, 0) {
                    Ok(()) => {
                        self.installed_policy.insert(*k, *v);
                    }
                    Err(e) => {
                        let pod = owner.get(&k.endpoint).map(|p| p.to_string()).unwrap_or_default();
                        report.errors.push(format!("{pod}: POLICY insert: {e}"));
                    }
                }
            }
        }
        for k in &identity_keys {
            let Some(v) = desired.identities.get(k) else { continue };
            if self.installed_identities.get(k) != Some(v) {
                match self.identities.insert(&Key::new(k.0, k.1), *v, 0) {
                    Ok(()) => {
                        self.installed_identities.insert(*k, *v);
                    }
                    Err(e) => report.errors.push(format!("IDENTITIES insert: {e}")),
                }
            }
        }
        // The addresses each pod may send from, before its endpoint entry: a stale address of
        // an id's previous pod goes first, a new pod's own ones are in place when its programs
        // start to enforce.
        let want_addrs: BTreeSet<EpAddrKey> = pods
            .keys()
            .filter_map(|k| Some((*ids.get(*k)?, node.pods.get(*k)?)))
            .flat_map(|(id, c)| c.ips.iter().map(move |a| endpoint_addr_key(id, *a)))
            .collect();
        for k in self.installed_endpoint_addrs.difference(&want_addrs) {
            let _ = self.endpoint_addrs.remove(k);
        }
        self.installed_endpoint_addrs.retain(|k| want_addrs.contains(k));
        for k in &want_addrs {
            if !self.installed_endpoint_addrs.contains(k) {
                match self.endpoint_addrs.insert(k, 1, 0) {
                    Ok(()) => {
                        self.installed_endpoint_addrs.insert(*k);
                    }
                    Err(e) => report.errors.push(format!("ENDPOINT_ADDRS insert (endpoint {}): {e}", k.endpoint)),
                }
            }
        }
        for (k, (iface, flags)) in &pods {
            let Some(&id) = ids.get(*k) else { continue };
            let v4 = node.pods.get(*k).and_then(|c| c.ips.iter().find_map(|a| match a {
                IpAddr::V4(a) => Some(a.octets()),
                IpAddr::V6(_) => None,
            }));
            let info = EndpointInfo { id, flags: *flags, v4: v4.unwrap_or([0; 4]) };
            if self.endpoints.get(iface.ifindex) != Some(info) {
                if let Err(e) = self.endpoints.insert(iface.ifindex, info) {
                    report.errors.push(format!("{k}: ENDPOINTS insert: {e}"));
                    continue;
                }
            }
            if !self.attached.contains_key(*k) {
                let attached = if self.attach_programs { self.attach(&iface.ifname, iface.ifindex) } else { Ok(Vec::new()) };
                match attached {
                    Ok(links) => {
                        self.attached.insert((*k).clone(), Attached { ifindex: iface.ifindex, pending: node.pods[*k].pending.is_some(), id, links });
                    }
                    Err(e) => {
                        report.errors.push(format!("{k}: attaching to {}: {e:#}", iface.ifname));
                        self.endpoints.remove(iface.ifindex);
                        self.free_ids.push(id);
                    }
                }
            }
        }

        // Remove what is no longer wanted.
        let live_ifindexes: BTreeSet<u32> = pods.values().map(|(i, _)| i.ifindex).collect();
        // Pinned links of interfaces that are gone or no longer ours.
        for (_, path) in self.adopted_links.drain() {
            let _ = std::fs::remove_file(path);
        }
        let adopted: Vec<u32> = self.adopted_ids.drain().map(|(ifindex, _)| ifindex).collect();
        for ifindex in removed_ifindexes.into_iter().chain(adopted) {
            if !live_ifindexes.contains(&ifindex) {
                self.endpoints.remove(ifindex);
            }
        }
        // Entries no longer desired: among the changed keys, or (comparing everything) any
        // installed entry not desired, where the counts say there is one.
        let failed = !report.errors.is_empty();
        let stale_identities = stale_keys(
            incremental.then_some(identity_keys),
            failed || self.installed_identities.len() != desired.identities.len(),
            self.installed_identities.keys().copied(),
        );
        for k in stale_identities.iter().filter(|k| !desired.identities.contains_key(*k)) {
            if self.installed_identities.remove(k).is_some() {
                let _ = self.identities.remove(&Key::new(k.0, k.1));
            }
        }
        let stale_policy = stale_keys(
            incremental.then_some(policy_keys),
            failed || self.installed_policy.len() != desired.policy.len(),
            self.installed_policy.keys().copied(),
        );
        for k in stale_policy.iter().filter(|k| !desired.policy.contains_key(*k)) {
            if self.installed_policy.remove(k).is_some() {
                let _ = self.policy.remove(k);
            }
        }
        let stale_ports = stale_keys(
            incremental.then_some(port_keys),
            failed || self.installed_ports.len() != desired.ports.len(),
            self.installed_ports.iter().copied(),
        );
        for k in stale_ports.iter().filter(|k| !desired.ports.contains_key(*k)) {
            if self.installed_ports.remove(k) {
                let _ = self.ports.remove(&Key::new(k.0, k.1));
            }
        }
        self.portsets.retain(&cache.port_set_ids());
        self.classes.retain(&desired.classes);
        self.compare_all = failed || fitted.is_some();
        self.entry_cache = cache;

        report.identities = self.installed_identities.len();
        report.policy = self.installed_policy.len();
        report.ports = self.installed_ports.len();
        report.endpoints = self.attached.len();
        report
    }

    /// Never truncates silently: when the node needs more entries than a map holds, the pods
    /// with the most entries lose theirs (their isolated directions then deny everything) and
    /// each is reported with the policies that isolate it. Returns the entries cut to fit, or
    /// `None` when everything fits.
    fn fit_maps(&self, node: &NodePolicy, d: &Desired, ids: &BTreeMap<ObjKey, u32>, report: &mut SyncReport) -> Option<Desired> {
        let policies_of = |k: &ObjKey| -> String {
            let Some(p) = node.pods.get(k) else { return String::new() };
            let mut v: Vec<String> = p.ingress.iter().chain(p.egress.iter()).flat_map(|d| d.policies.iter().map(|k| k.to_string())).collect();
            v.sort();
            v.dedup();
            v.join(", ")
        };
        let global_overflow = d.identities.len() > self.limits.identities || d.ports.len() > self.limits.ports;
        if global_overflow {
            report.errors.push(format!(
                "node needs {} IDENTITIES and {} POLICY_PORTS entries, the maps hold {} and {}: every isolated pod fails closed",
                d.identities.len(),
                d.ports.len(),
                self.limits.identities,
                self.limits.ports
            ));
            for k in ids.keys() {
                let isolated = node.pods.get(k).is_some_and(|p| p.ingress.is_some() || p.egress.is_some());
                if isolated {
                    report.errors.push(format!("{k}: failing closed (policies: {})", policies_of(k)));
                    report.fail_closed.push(k.clone());
                }
            }
            return Some(Desired { classes: d.classes.clone(), policy_entries: d.policy_entries.clone(), ..Default::default() });
        }
        if d.policy.len() <= self.limits.policy {
            return None;
        }
        let mut by_size: Vec<(usize, &ObjKey)> = d.policy_entries.iter().map(|(k, n)| (*n, k)).collect();
        by_size.sort_by(|a, b| b.cmp(a));
        let mut total = d.policy.len();
        let mut dropped = BTreeSet::new();
        for (n, k) in by_size {
            if total <= self.limits.policy {
                break;
            }
            total -= n;
            if let Some(id) = ids.get(k) {
                dropped.insert(*id);
            }
            report.fail_closed.push(k.clone());
            report.errors.push(format!(
                "{k}: needs {n} POLICY entries (policies: {}); the node needs {} and the map holds {}: failing closed",
                policies_of(k),
                d.policy.len(),
                self.limits.policy
            ));
        }
        let mut fitted = d.clone();
        fitted.policy.retain(|k, _| !dropped.contains(&k.endpoint));
        Some(fitted)
    }
}

/// Sets a per-CPU counter to 0 on every CPU.
fn zero(map: &mut PerCpuArray<MapData, u64>, index: u32) {
    let ncpu = aya::util::nr_cpus().unwrap_or(1);
    if let Ok(z) = PerCpuValues::try_from(vec![0u64; ncpu]) {
        let _ = map.set(index, z, 0);
    }
}

/// The label of a policy slot: the policy's name, or for the last slot of a pod with more
/// policies than slots, every policy from that one on.
pub fn slot_label(policies: &[ObjKey], slot: u32) -> String {
    let i = slot as usize;
    if slot + 1 == POLICY_SLOTS && policies.len() > POLICY_SLOTS as usize {
        format!("{} (and {} more)", policies[i].name, policies.len() - i - 1)
    } else {
        policies.get(i).map(|p| p.name.clone()).unwrap_or_default()
    }
}

/// Reads the packet counters from the pinned COUNTERS and POLICY_COUNTERS maps (usable from
/// any thread).
pub struct CounterReader {
    map: PerCpuArray<MapData, u64>,
    policy: PerCpuArray<MapData, u64>,
    frag_early: PerCpuArray<MapData, u64>,
}

impl CounterReader {
    pub fn open(pin_dir: &Path) -> Result<CounterReader> {
        let open = |name: &str| -> Result<PerCpuArray<MapData, u64>> {
            let path = pin_dir.join(name);
            let md = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            Ok(PerCpuArray::try_from(Map::from_map_data(md)?)?)
        };
        Ok(CounterReader { map: open(maps::COUNTERS)?, policy: open(maps::POLICY_COUNTERS)?, frag_early: open(maps::FRAG_EARLY)? })
    }

    /// Packets of flows that the policy in `slot` of `endpoint` allowed in `dir`.
    pub fn read_policy(&self, endpoint: u32, dir: u8, slot: u32) -> u64 {
        self.policy.get(&policy_counter_index(endpoint, dir, slot), 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Later fragments of `endpoint` in `dir` dropped because their first fragment had not
    /// been seen (counted among the denies too).
    pub fn read_frag_early(&self, endpoint: u32, dir: u8) -> u64 {
        self.frag_early.get(&(endpoint * 2 + (dir & 1) as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    pub fn read(&self, endpoint: u32, dir: u8, verdict: u32) -> u64 {
        self.map
            .get(&counter_index(endpoint, dir, verdict), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

    /// The programs never call an out-of-line memset/memcpy: those are byte-at-a-time loops
    /// exported by bpf-linker, which cost more per packet than every map lookup together. They
    /// appear when the eBPF crate is linked with `--bpf-expand-memcpy-in-order` (bpf-linker's
    /// default, turned off in netpol-ebpf/.cargo/config.toml) or when code copies an object
    /// too large for LLVM to expand into stores.
    #[test]
    fn programs_call_no_out_of_line_memory_builtins() {
        let file = object::File::parse(super::EBPF_OBJECT).expect("the embedded eBPF object is ELF");
        let mut programs = 0;
        let mut calls = Vec::new();
        for section in file.sections() {
            let name = section.name().unwrap_or("");
            if !name.starts_with("classifier") {
                continue;
            }
            programs += 1;
            for (offset, rel) in section.relocations() {
                let RelocationTarget::Symbol(i) = rel.target() else { continue };
                let target = file.symbol_by_index(i).and_then(|s| s.name().map(str::to_string)).unwrap_or_default();
                if matches!(target.as_str(), "memset" | "memcpy" | "memmove" | "memcmp" | "bcmp") {
                    calls.push(format!("{name}+{offset:#x}: {target}"));
                }
            }
        }
        assert!(programs > 0, "no classifier section in the eBPF object");
        assert!(calls.is_empty(), "{} calls to memory builtins, e.g. {:?}", calls.len(), &calls[..calls.len().min(5)]);
    }
}

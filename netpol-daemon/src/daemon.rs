//! The run loop: source (manifests directory) -> cluster model -> compiler -> datapath.
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::compiler;
use crate::datapath::{Datapath, Iface};
use crate::manifests;
use crate::metrics::{self, Shared};
use crate::model::ObjKey;
use crate::netlink;

pub struct RunConfig {
    pub node_name: String,
    /// A manifests directory; `None`: the Kubernetes API (in-cluster config or KUBECONFIG).
    pub manifests: Option<PathBuf>,
    pub metrics_addr: SocketAddr,
    pub bpffs: PathBuf,
    pub poll_interval: Duration,
    /// Re-check tracked flows against each new policy and cut those no longer allowed.
    pub revalidate_established: bool,
    /// Every policy in audit mode.
    pub audit_all: bool,
    /// Conntrack timeouts and deny events.
    pub datapath_config: netpol_common::Config,
}

/// How long an interface nobody claims is held default-deny (a host route through a veth that
/// is not a pod's after all is released).
const PENDING_MAX: Duration = Duration::from_secs(60);

/// Logs deny events from the ring buffer as structured lines.
fn log_deny_events(mut rb: aya::maps::RingBuf<aya::maps::MapData>, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    use netpol_common::{DenyEvent, DIR_INGRESS, FAMILY_V4};
    let ip = |f: u8, b: [u8; 16]| -> std::net::IpAddr {
        if f == FAMILY_V4 {
            std::net::IpAddr::from([b[0], b[1], b[2], b[3]])
        } else {
            std::net::IpAddr::from(b)
        }
    };
    while !stop.load(Ordering::SeqCst) {
        let mut any = false;
        while let Some(item) = rb.next() {
            any = true;
            if item.len() < std::mem::size_of::<DenyEvent>() {
                continue;
            }
            let ev: DenyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DenyEvent) };
            let pod = shared
                .status
                .lock()
                .unwrap()
                .endpoints
                .iter()
                .find(|(id, _)| *id == ev.endpoint)
                .map(|(_, k)| k.to_string())
                .unwrap_or_else(|| format!("endpoint-{}", ev.endpoint));
            let proto = match ev.proto {
                6 => "TCP".to_string(),
                17 => "UDP".to_string(),
                132 => "SCTP".to_string(),
                1 => "ICMP".to_string(),
                58 => "ICMPv6".to_string(),
                n => n.to_string(),
            };
            let (src, dst) = (ip(ev.family, ev.src), ip(ev.family, ev.dst));
            log::info!(
                target: "netpol::denied",
                "{} pod={pod} direction={} proto={proto} src={} dst={}",
                if ev.verdict as u32 == netpol_common::VERDICT_AUDIT { "audit" } else { "denied" },
                if ev.dir == DIR_INGRESS { "ingress" } else { "egress" },
                std::net::SocketAddr::new(src, ev.sport),
                std::net::SocketAddr::new(dst, ev.dport),
            );
        }
        if !any {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A fingerprint of the directory: names, sizes, mtimes and contents of the manifest files.
/// Changes when a manifest file is added, removed, replaced (rename) or written: its name,
/// inode, size and modification time (nanoseconds). No file is read.
fn fingerprint(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Ok(files) = manifests::manifest_files(dir) {
        for f in files {
            f.hash(&mut h);
            if let Ok(m) = std::fs::metadata(&f) {
                (m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()).hash(&mut h);
            }
        }
    }
    h.finish()
}

/// Where the cluster state comes from.
enum Source {
    Manifests(PathBuf, std::sync::Mutex<manifests::DirReader>),
    Kube(crate::kube_source::KubeSource),
}

impl Source {
    /// A number that changes when the cluster state may have changed.
    fn fingerprint(&self) -> u64 {
        match self {
            Source::Manifests(dir, _) => fingerprint(dir),
            Source::Kube(k) => k.generation.load(Ordering::SeqCst),
        }
    }

    /// The state is complete enough to program (the first lists are done).
    fn ready(&self) -> bool {
        match self {
            Source::Manifests(..) => true,
            Source::Kube(k) => k.synced.load(Ordering::SeqCst),
        }
    }

    fn load(&self) -> Result<(compiler::Cluster, Vec<String>)> {
        match self {
            Source::Manifests(dir, reader) => {
                let loaded = reader.lock().unwrap().load(dir).with_context(|| format!("reading {}", dir.display()))?;
                Ok((loaded.cluster, loaded.errors.iter().map(|e| e.to_string()).collect()))
            }
            Source::Kube(k) => Ok(k.snapshot()),
        }
    }

    /// How long ago the change about to be loaded happened: the newest manifest write, or the
    /// oldest watch event not yet taken.
    fn take_change_age(&self) -> Option<Duration> {
        match self {
            Source::Manifests(dir, _) => {
                let mut newest = std::fs::metadata(dir).and_then(|m| m.modified()).ok()?;
                for f in manifests::manifest_files(dir).ok()? {
                    if let Ok(t) = std::fs::metadata(&f).and_then(|m| m.modified()) {
                        newest = newest.max(t);
                    }
                }
                std::time::SystemTime::now().duration_since(newest).ok()
            }
            Source::Kube(k) => k.pending_since.lock().unwrap().take().map(|t| t.elapsed()),
        }
    }

    /// False while the Kubernetes API is unreachable.
    fn healthy(&self) -> bool {
        match self {
            Source::Manifests(..) => true,
            Source::Kube(k) => k.healthy.load(Ordering::SeqCst),
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Manifests(dir, _) => format!("manifests {}", dir.display()),
            Source::Kube(_) => "the Kubernetes API".to_string(),
        }
    }
}

pub fn run(cfg: RunConfig, stop: Arc<AtomicBool>) -> Result<()> {
    let shared = Arc::new(Shared::default());
    let mut dp = Datapath::load(&cfg.bpffs)?;
    dp.set_config(&cfg.datapath_config)?;
    if cfg.datapath_config.deny_events_per_sec > 0 {
        if let Some(rb) = dp.take_events() {
            let (sh, st) = (shared.clone(), stop.clone());
            std::thread::Builder::new().name("deny-events".into()).spawn(move || log_deny_events(rb, sh, st))?;
        }
    }
    metrics::serve(cfg.metrics_addr, shared.clone(), cfg.bpffs.clone())
        .with_context(|| format!("listening on {}", cfg.metrics_addr))?;
    let source = match &cfg.manifests {
        Some(dir) => Source::Manifests(dir.clone(), Default::default()),
        None => Source::Kube(crate::kube_source::KubeSource::start()?),
    };
    log::info!(
        "netpol-daemon: node {}, source {}, metrics on {}, maps pinned in {}",
        cfg.node_name,
        source.describe(),
        cfg.metrics_addr,
        cfg.bpffs.display()
    );

    let mut last_fp = None;
    let mut last_errors: Vec<String> = Vec::new();
    let mut cluster = compiler::Cluster::default();
    let mut manifest_errors = 0;
    let mut last_resolve = Instant::now() - Duration::from_secs(3600);
    let mut unresolved = false;
    let mut change_age: Option<(Duration, Instant)> = None;
    // Pod interfaces (veth host routes) no known pod address claims yet: first seen.
    let mut unclaimed: BTreeMap<u32, (IpAddr, Instant)> = BTreeMap::new();
    let mut last_pending: Vec<u32> = Vec::new();
    // Addresses of this node's pods in the current cluster state (recomputed on each load).
    let mut local_ips: std::collections::BTreeSet<IpAddr> = Default::default();
    // Some pod of this node has no address yet: only then are host routes watched.
    let mut awaiting_ip = false;
    // Where each pod was last found: a bridge port whose forwarding entry aged out (a quiet
    // pod) is still the pod's as long as the interface exists under the same name.
    let mut known_ifaces: BTreeMap<ObjKey, Iface> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        let down = !source.healthy();
        let was_down = std::mem::replace(&mut shared.status.lock().unwrap().source_down, down);
        if was_down != down {
            if down {
                log::warn!("the Kubernetes API is unreachable; enforcing the last known state");
            }
        }
        if !source.ready() {
            // Until every watch has listed once, the pinned state of a previous run (if any)
            // keeps enforcing; nothing is programmed from a partial view.
            std::thread::sleep(cfg.poll_interval);
            continue;
        }
        let fp = source.fingerprint();
        let changed = last_fp != Some(fp);
        // Pods whose interface is not there yet are retried every second.
        let retry = unresolved && last_resolve.elapsed() >= Duration::from_secs(1);
        if changed {
            let first = last_fp.is_none();
            last_fp = Some(fp);
            let age = source.take_change_age();
            change_age = if first { None } else { age.map(|a| (a, Instant::now())) };
            let t_load = Instant::now();
            let loaded = source.load();
            log::debug!("state loaded in {:?}", t_load.elapsed());
            match loaded {
                Ok((c, errors)) => {
                    for e in &errors {
                        log::error!("skipped: {e}");
                    }
                    manifest_errors = errors.len();
                    cluster = c;
                    if cfg.audit_all {
                        for p in cluster.policies.values_mut() {
                            p.audit = true;
                        }
                    }
                    local_ips = cluster
                        .pods
                        .values()
                        .filter(|p| p.node_name.as_deref() == Some(cfg.node_name.as_str()))
                        .flat_map(|p| p.ips.iter().copied())
                        .collect();
                    awaiting_ip = cluster
                        .pods
                        .values()
                        .any(|p| p.node_name.as_deref() == Some(cfg.node_name.as_str()) && !p.host_network && p.ips.is_empty());
                }
                Err(e) => {
                    log::error!("{e:#}; keeping the last state");
                    std::thread::sleep(cfg.poll_interval);
                    continue;
                }
            }
        }
        // New pod interfaces that no known pod claims: programmed default-deny (for the
        // directions every pending pod's policies isolate) until their pod is known.
        let routes = if awaiting_ip { netlink::veth_host_routes().unwrap_or_default() } else { Vec::new() };
        unclaimed.retain(|ifindex, (ip, _)| routes.iter().any(|(a, i)| a == ip && i == ifindex) && !local_ips.contains(ip));
        for (ip, ifindex) in &routes {
            if !local_ips.contains(ip) {
                unclaimed.entry(*ifindex).or_insert((*ip, Instant::now()));
            }
        }
        let pending: Vec<u32> = unclaimed.iter().filter(|(_, (_, t))| t.elapsed() < PENDING_MAX).map(|(i, _)| *i).collect();
        let pending_changed = pending != last_pending;
        last_pending = pending.clone();
        if changed || retry || pending_changed {
            let t0 = Instant::now();
            last_resolve = Instant::now();
            let node = compiler::compile_node(&cluster, &cfg.node_name);
            let mut ifaces: BTreeMap<ObjKey, Iface> = BTreeMap::new();
            let mut errors = Vec::new();
            unresolved = false;
            for (k, c) in &node.pods {
                let found = c.ips.iter().find_map(|ip| netlink::pod_interface(*ip).ok()).or_else(|| {
                    known_ifaces
                        .get(k)
                        .filter(|i| netlink::ifname(i.ifindex).is_ok_and(|n| n == i.ifname))
                        .map(|i| (i.ifindex, i.ifname.clone()))
                });
                match found {
                    Some((ifindex, ifname)) => {
                        ifaces.insert(k.clone(), Iface { ifindex, ifname });
                    }
                    None => {
                        unresolved = true;
                        errors.push(format!("{k}: no host interface for {:?} yet", c.ips));
                    }
                }
            }
            known_ifaces = ifaces.clone();
            let mut node = node;
            if !pending.is_empty() {
                if let Some(iso) = compiler::pending_isolation(&cluster, &cfg.node_name).filter(|i| i[0] || i[1]) {
                    for ifindex in &pending {
                        let Ok(ifname) = netlink::ifname(*ifindex) else { continue };
                        let c = compiler::pending_pod(&ifname, iso);
                        ifaces.insert(c.key.clone(), Iface { ifindex: *ifindex, ifname });
                        node.pods.insert(c.key.clone(), c);
                    }
                }
            }
            let node_addrs = netlink::local_addresses().unwrap_or_default();
            if let Err(e) = dp.set_node_addrs(&node_addrs) {
                errors.push(format!("NODE_ADDRS: {e}"));
            }
            let report = dp.sync(&node, &ifaces);
            if changed && cfg.revalidate_established {
                let cut = dp.revalidate(&node, &node_addrs);
                if cut > 0 {
                    log::info!("revalidated tracked flows: {cut} no longer allowed, cut");
                }
            }
            errors.extend(report.errors.iter().cloned());
            if errors != last_errors {
                for e in &errors {
                    log::warn!("{e}");
                }
                last_errors = errors.clone();
            }
            {
                let mut st = shared.status.lock().unwrap();
                st.endpoints = dp.endpoint_ids();
                st.manifest_errors = manifest_errors;
                st.sync_errors = report.errors.len();
                st.syncs += 1;
                st.identity_entries = report.identities;
                st.policy_entries = report.policy;
                st.port_entries = report.ports;
                st.policies = cluster.policies.len();
                st.last_sync_seconds = t0.elapsed().as_secs_f64();
                st.fail_closed = report.fail_closed.clone();
                (st.policy_slots, st.policy_retired) = dp.policy_slots();
                st.isolated_by = node
                    .pods
                    .iter()
                    .filter(|(k, _)| ifaces.contains_key(*k))
                    .flat_map(|(k, c)| {
                        [("ingress", &c.ingress), ("egress", &c.egress)]
                            .into_iter()
                            .filter_map(move |(d, dp)| dp.as_ref().map(|dp| (k.clone(), d, dp.policies.clone())))
                    })
                    .collect();
                if let Some((age, at)) = change_age.take() {
                    st.programming_latency.observe((age + at.elapsed()).as_secs_f64());
                }
            }
            if changed {
                log::info!(
                    "synced: {} local pods, {} identity, {} policy and {} port entries in {:?}",
                    report.endpoints,
                    report.identities,
                    report.policy,
                    report.ports,
                    t0.elapsed()
                );
            }
            shared.ready.store(true, Ordering::SeqCst);
        }
        std::thread::sleep(cfg.poll_interval);
    }
    log::info!("stopping; maps stay pinned in {}", dp.pin_dir().display());
    Ok(())
}

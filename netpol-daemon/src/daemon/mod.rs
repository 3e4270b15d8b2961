//! The run loop: source (manifests directory) -> cluster model -> compiler -> datapath.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

pub mod netlink;

use crate::compiler;
use crate::datapath::{Datapath, Iface};
use crate::source::{DirWatch, Source};
use crate::metrics::{self, Shared};
use crate::model::{self, ObjKey};

pub struct RunConfig {
    pub node_name: String,
    /// A manifests directory; `None`: the Kubernetes API (in-cluster config or KUBECONFIG).
    pub manifests: Option<PathBuf>,
    pub metrics_addr: SocketAddr,
    pub bpffs: PathBuf,
    /// Start even when the pins under `bpffs` would vanish with the daemon's mount namespace.
    pub allow_private_bpffs: bool,
    pub poll_interval: Duration,
    /// Re-check tracked flows against each new policy and cut those no longer allowed.
    pub revalidate_established: bool,
    /// Every policy in audit mode.
    pub audit_all: bool,
    /// Conntrack timeouts and deny events.
    pub datapath_config: netpol_common::Config,
    /// Established flows' packets pass through the per-CPU flow cache (else every one looks
    /// the conntrack table up).
    pub flow_cache: bool,
}

/// How long an interface nobody claims is held default-deny (a host route through a veth that
/// is not a pod's after all is released).
const PENDING_MAX: Duration = Duration::from_secs(60);

/// How often every pod's interface is looked up again (a pod sandbox recreated behind the same
/// address gets a new veth).
const FULL_RESOLVE_EVERY: Duration = Duration::from_secs(2);

/// With inotify naming the files that change, how often every manifest file is still checked.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(2);

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

pub fn run(cfg: RunConfig, stop: Arc<AtomicBool>) -> Result<()> {
    let shared = Arc::new(Shared::default());
    crate::datapath::check_bpffs_outlives_daemon(&cfg.bpffs, cfg.allow_private_bpffs)?;
    let mut dp = Datapath::load(&cfg.bpffs)?;
    dp.set_config(&cfg.datapath_config)?;
    dp.set_flow_cache(cfg.flow_cache)?;
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
        None => Source::Kube(crate::source::kube::KubeSource::start()?),
    };
    log::info!(
        "netpol-daemon: node {}, source {}, metrics on {}, maps pinned in {}",
        cfg.node_name,
        source.describe(),
        cfg.metrics_addr,
        cfg.bpffs.display()
    );

    let watch = match &cfg.manifests {
        Some(dir) => DirWatch::new(dir).map_err(|e| log::warn!("no inotify on {}: {e}; polling only", dir.display())).ok(),
        None => None,
    };
    let mut last_fp = None;
    let mut last_errors: Vec<String> = Vec::new();
    let mut cluster = model::Cluster::default();
    let mut compiler = compiler::NodeCompiler::new(&cfg.node_name);
    // Changes loaded but not yet compiled.
    let mut pending_changes = model::ChangeSet::everything();
    let mut manifest_errors = 0;
    let mut last_resolve = Instant::now() - Duration::from_secs(3600);
    let mut last_full_resolve = Instant::now();
    let mut unresolved = false;
    let mut change_age: Option<(Duration, Instant)> = None;
    // Pod interfaces (veth host routes) no known pod address claims yet: first seen.
    let mut unclaimed: BTreeMap<u32, (IpAddr, Instant)> = BTreeMap::new();
    let mut last_pending: Vec<u32> = Vec::new();
    // Addresses of this node's pods in the current cluster state (recomputed on each load).
    let mut local_ips: std::collections::BTreeSet<IpAddr> = Default::default();
    // Some pod of this node has no address yet: only then are host routes watched.
    let mut awaiting_ip = false;
    // Where each pod was found, for its addresses then: looked up again when they change, when
    // the interface is gone, and every few seconds. A bridge port whose forwarding entry aged
    // out (a quiet pod) stays the pod's as long as the interface exists under the same name.
    let mut known_ifaces: BTreeMap<ObjKey, (Vec<IpAddr>, Iface)> = BTreeMap::new();
    let mut first_wait = true;
    let mut last_full_scan = Instant::now();
    let mut loaded_once = false;
    let mut last_load_errors: Vec<String> = Vec::new();
    // Something to report even when the maps need nothing (new load errors).
    let mut status_changed = false;
    let mut node_addrs: Vec<IpAddr> = Vec::new();
    let mut put_off = false;
    while !stop.load(Ordering::SeqCst) {
        // Which manifest files to look at: those inotify named; every file on the first pass,
        // after an event overflow, without inotify, and every FULL_SCAN_EVERY as a safety net.
        let waiting = Instant::now();
        // Periodic work put off by a change runs on the next pass, without waiting.
        let timeout = if std::mem::take(&mut put_off) { Duration::ZERO } else { cfg.poll_interval };
        let mut hint = if std::mem::take(&mut first_wait) { None } else { source.wait(watch.as_ref(), timeout) };
        // An inotify event that woke the loop from its wait was sent as the write ended: the
        // change's age starts there (a file's mtime is the kernel's coarse clock, up to a tick
        // or more early). Events queued while the loop was busy keep the mtime.
        let woke = (hint.as_ref().is_some_and(|h| !h.is_empty()) && waiting.elapsed() >= Duration::from_millis(1)).then(Instant::now);
        if watch.is_some() && last_full_scan.elapsed() >= FULL_SCAN_EVERY {
            // The files inotify named first (a change is programmed without stat-ing every
            // file); the whole directory on the next pass.
            if woke.is_some() && last_full_scan.elapsed() < 2 * FULL_SCAN_EVERY {
                put_off = true;
            } else {
                hint = None;
            }
        }
        if hint.is_none() {
            last_full_scan = Instant::now();
        }
        let down = !source.healthy();
        let was_down = std::mem::replace(&mut shared.status.lock().unwrap().source_down, down);
        if was_down != down && down {
            log::warn!("the Kubernetes API is unreachable; enforcing the last known state");
        }
        if !source.ready() {
            // Until every watch has listed once, the pinned state of a previous run (if any)
            // keeps enforcing; nothing is programmed from a partial view.
            continue;
        }
        let fp = source.fingerprint();
        let check = fp.is_none() || last_fp != fp;
        // Pods whose interface is not there yet are retried every second; every pod's
        // interface (and the node's addresses) is looked up again every few seconds.
        let retry = unresolved && last_resolve.elapsed() >= Duration::from_secs(1);
        let mut full_resolve = last_full_resolve.elapsed() >= FULL_RESOLVE_EVERY;
        if check {
            let first = !loaded_once;
            last_fp = fp;
            let t_load = Instant::now();
            match source.refresh(&mut cluster, cfg.audit_all, hint.as_deref()) {
                Ok((ch, errors)) => {
                    // How long ago the change was made, as of now.
                    let (age, now) = (source.take_change_age(), Instant::now());
                    let age = woke.map(|w| w.elapsed()).or(age);
                    if !ch.is_empty() || first || errors != last_load_errors {
                        log::debug!("state loaded in {:?} (change made {age:?} before): {ch:?}", t_load.elapsed());
                        loaded_once = true;
                        change_age = if first { None } else { age.map(|a| (a, now)) };
                        for e in &errors {
                            if !last_load_errors.contains(e) {
                                // Invalid policies are enforced fail-closed (their message says so); other
                                // invalid objects are skipped.
                                let what = if e.contains(crate::model::FAIL_CLOSED_NOTE) { "invalid" } else { "skipped" };
                                log::error!("{what}: {e}");
                            }
                        }
                        manifest_errors = errors.len();
                        last_load_errors = errors;
                        if !ch.pods.is_empty() || first {
                            local_ips = cluster
                                .pods
                                .values()
                                .filter(|p| p.node_name.as_deref() == Some(cfg.node_name.as_str()))
                                .flat_map(|p| p.ips.iter().copied())
                                .collect();
                            awaiting_ip = cluster.pods.values().any(|p| {
                                p.node_name.as_deref() == Some(cfg.node_name.as_str()) && !p.host_network && p.ips.is_empty()
                            });
                        }
                        status_changed = true;
                        pending_changes.merge(ch);
                    }
                }
                Err(e) => {
                    log::error!("{e:#}; keeping the last state");
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
        let have_changes = std::mem::take(&mut status_changed) | !pending_changes.is_empty();
        // A change is programmed first; the periodic look-up of every interface (a few ms of
        // netlink) runs on the next pass (unless changes kept putting it off).
        if have_changes && full_resolve && last_full_resolve.elapsed() < 2 * FULL_RESOLVE_EVERY {
            full_resolve = false;
            put_off = true;
        }
        if have_changes || retry || pending_changed || full_resolve {
            let t0 = Instant::now();
            last_resolve = Instant::now();
            // Every pod looked up afresh (periodically, or on the first pass).
            let resolving_all = full_resolve || known_ifaces.is_empty();
            let pending_ifaces: Vec<compiler::PendingIface> = pending
                .iter()
                .filter_map(|i| netlink::ifname(*i).ok().map(|ifname| compiler::PendingIface { ifindex: *i, ifname }))
                .collect();
            compiler.set_pending(&pending_ifaces);
            let kind = compiler.update(&cluster, &std::mem::take(&mut pending_changes));
            let t_compiled = t0.elapsed();
            let mut ifaces: BTreeMap<ObjKey, Iface> = BTreeMap::new();
            let mut errors = Vec::new();
            unresolved = false;
            let mut resolver = netlink::Resolver::default();
            let mut missing = Vec::new();
            for (k, c) in compiler.policy().pods.iter().filter(|(_, c)| c.pending.is_none()) {
                let cached = known_ifaces
                    .get(k)
                    .filter(|(ips, _)| !full_resolve && *ips == c.ips)
                    .map(|(_, i)| (i.ifindex, i.ifname.clone()));
                match cached.or_else(|| c.ips.iter().find_map(|ip| resolver.pod_interface(*ip).ok())) {
                    Some((ifindex, ifname)) => {
                        ifaces.insert(k.clone(), Iface { ifindex, ifname });
                    }
                    None => missing.push((k, &c.ips)),
                }
            }
            // Bridged pods that have not talked yet: woken all at once, one short wait.
            if resolver.wake_silent() {
                resolver.settle(|r| {
                    missing.retain(|(k, ips)| match ips.iter().find_map(|ip| r.pod_interface(*ip).ok()) {
                        Some((ifindex, ifname)) => {
                            ifaces.insert((*k).clone(), Iface { ifindex, ifname });
                            false
                        }
                        None => true,
                    });
                    missing.is_empty()
                });
            }
            for (k, ips) in missing {
                // Not found now: the interface it had, while it is still there.
                let kept = known_ifaces.get(k).map(|(_, i)| i).filter(|i| netlink::ifname(i.ifindex).is_ok_and(|n| n == i.ifname));
                match kept {
                    Some(i) => {
                        ifaces.insert(k.clone(), i.clone());
                    }
                    None => {
                        unresolved = true;
                        errors.push(format!("{k}: no host interface for {ips:?} yet"));
                    }
                }
            }
            let resolved_same = ifaces.len() == known_ifaces.len()
                && ifaces.iter().all(|(k, i)| known_ifaces.get(k).is_some_and(|(_, o)| o == i));
            if !resolved_same {
                log::debug!("pod interfaces: {:?}", ifaces.iter().map(|(k, i)| format!("{k}={}", i.ifname)).collect::<Vec<_>>());
            }
            known_ifaces = ifaces.iter().map(|(k, i)| (k.clone(), (compiler.policy().pods[k].ips.clone(), i.clone()))).collect();
            if !have_changes && !retry && !pending_changed && resolved_same {
                if resolving_all {
                    last_full_resolve = Instant::now();
                }
                // A periodic look-up that found every interface where it was.
                continue;
            }
            for c in compiler.policy().pods.values() {
                if let Some(ifindex) = c.pending {
                    ifaces.insert(c.key.clone(), Iface { ifindex, ifname: c.key.name.clone() });
                }
            }
            let node = compiler.policy();
            if full_resolve || node_addrs.is_empty() {
                // Only the addresses kubelet reaches pods from (see node_addr_for_pods).
                node_addrs = netlink::local_addresses().unwrap_or_default();
                node_addrs.retain(|a| crate::datapath::node_addr_for_pods(*a));
            }
            if let Err(e) = dp.set_node_addrs(&node_addrs) {
                errors.push(format!("NODE_ADDRS: {e}"));
            }
            let t_resolved = t0.elapsed() - t_compiled;
            let t_sync = Instant::now();
            let report = dp.sync(node, &ifaces);
            let t_synced = t_sync.elapsed();
            if let Some((age, at)) = change_age.take() {
                let latency = age + at.elapsed();
                let done = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let mut st = shared.status.lock().unwrap();
                st.programming_latency.observe(latency.as_secs_f64());
                st.last_programmed_unix = done.as_secs_f64();
                log::debug!("change programmed {latency:?} after it was made (resolve {t_resolved:?}, maps {t_synced:?})");
            }
            if have_changes && cfg.revalidate_established {
                let cut = dp.revalidate(node, &node_addrs);
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
            }
            if have_changes {
                log::info!(
                    "synced ({kind:?} compile in {t_compiled:?}, maps in {t_synced:?}): {} local pods, {} identity, {} policy and {} port entries in {:?}",
                    report.endpoints,
                    report.identities,
                    report.policy,
                    report.ports,
                    t0.elapsed()
                );
            }
            // (After the maps: the first pass attaches every pod, which can take seconds.)
            if resolving_all {
                last_full_resolve = Instant::now();
            }
            shared.ready.store(true, Ordering::SeqCst);
        }
    }
    log::info!("stopping; maps stay pinned in {}", dp.pin_dir().display());
    Ok(())
}

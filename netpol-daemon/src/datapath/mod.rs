//! The kernel side: loads the TC programs with their maps pinned under the bpffs path,
//! attaches them to pod interfaces (TCX where the kernel has it, clsact + cls_bpf otherwise)
//! and keeps the maps equal to the compiled state by applying only differences.
//!
//! [`Datapath`] is a composition of parts, each owning its maps and living in its module:
//! - `maps`: the bpffs and pin directory, loading the object, pins of older layouts;
//! - `mirror`: one generic mirror of a BPF map (its installed entries, inserts and removals);
//! - `sync`: the diff sync in its order, and the policy tables (IDENTITIES, POLICY, POLICY_PORTS);
//! - `endpoints`: the ENDPOINTS table and endpoint ids;
//! - `addrs`: the node's addresses and each pod's own (anti-spoofing);
//! - `attach`: which pod has the programs on which interface, TCX links or clsact filters;
//! - `counters`: packet counters and what the policy slots mean;
//! - `events`: the flow events' ring buffer and the settings of what the programs send into it;
//! - `conntrack`: tracked flows, their revalidation, the flow-cache epochs and the settings;
//! - `names`: which pod each endpoint is (`ENDPOINT_NAMES`, for people);
//! - `inspect`: what the pinned maps enforce, read back (`netpol-daemon status`);
//! - `test_run`: running the programs on crafted frames (BPF_PROG_TEST_RUN);
//! - `program_log`: the programs' debug log (`--bpf-debug`), set at load, and its reader.
//!
//! The parts hold no reference to one another: where one needs another's answer (the
//! attached pods for conntrack revalidation, a new endpoint id for the counters), a `Datapath`
//! method here or in `sync` passes it, so that each part reads alone. The daemon is the only
//! writer of these maps; the datapath reads the compiler's output and the entries derived from
//! it (`entries`), nothing further up the flow.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::Ebpf;
use netpol_common::{Config, IDENTITIES_MAX, POLICY_MAX, POLICY_PORTS_MAX};

use crate::compiler::NodePolicy;
use crate::model::ObjKey;

mod addrs;
mod attach;
mod conntrack;
mod counters;
mod endpoints;
mod events;
pub mod inspect;
mod maps;
mod mirror;
mod names;
mod pressure;
mod program_log;
pub mod rtnl;
mod sync;
mod tc;
mod test_run;

pub use addrs::node_addr_for_pods;
pub use attach::{AttachCounts, AttachMode};
pub use counters::{slot_label, CounterReader, RetiredCounts, SlotLabels, RETIRED_DENIED};
pub use events::{read_event, EventControl, FlowEvents};
pub use maps::{check_bpffs_outlives_daemon, ensure_bpffs, EBPF_OBJECT};
pub use program_log::ProgramLog;
pub use test_run::ProgramStats;

/// Hash maps keyed by our own values: a fast non-cryptographic hasher (no untrusted keys).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A local pod's host-side interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub ifindex: u32,
    pub ifname: String,
}

/// The pods a sync programs: each with its interface and endpoint flags.
type Pods<'a> = BTreeMap<&'a ObjKey, (&'a Iface, u32)>;

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
    /// The loaded object: its programs (attached, test-run).
    ebpf: Ebpf,
    pin_dir: PathBuf,
    tables: sync::Tables,
    addrs: addrs::Addrs,
    endpoints: endpoints::Endpoints,
    links: attach::Links,
    counters: counters::Counters,
    conntrack: conntrack::Conntrack,
    events: Option<FlowEvents>,
    peer_names: names::PeerNames,
    /// The programs were loaded to log their decisions (`--bpf-debug`).
    bpf_debug: bool,
}

impl Datapath {
    /// Loads the programs, creating or re-using the pinned maps in `pin_dir` and adopting
    /// what a previous daemon left in them (it keeps enforcing until the first sync).
    /// `bpf_debug`: the programs log their decisions ([`Datapath::take_program_log`]).
    pub fn load(pin_dir: &Path, bpf_debug: bool) -> Result<Datapath> {
        if bpf_debug && conntrack::preempt_rt() {
            // (The logging programs keep the packet's conntrack key in a per-CPU slot.)
            anyhow::bail!("--bpf-debug: not on a PREEMPT_RT kernel (two programs can interleave on a CPU there)");
        }
        let mut ebpf = maps::load_object(pin_dir, bpf_debug)?;
        let endpoints = endpoints::Endpoints::adopt(&mut ebpf, pin_dir)?;
        let tables = sync::Tables::adopt(&mut ebpf, pin_dir)?;
        let addrs = addrs::Addrs::adopt(&mut ebpf)?;
        let counters = counters::Counters::take(&mut ebpf)?;
        let conntrack = conntrack::Conntrack::take(&mut ebpf, pin_dir)?;
        let events = Some(FlowEvents::take(&mut ebpf)?);
        let links = attach::Links::adopt(pin_dir);
        let peer_names = names::PeerNames::adopt(pin_dir)?;
        Ok(Datapath {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            tables,
            addrs,
            endpoints,
            links,
            counters,
            conntrack,
            events,
            peer_names,
            bpf_debug,
        })
    }

    /// Names the peers of `node`'s rules for `status`: `PEER_NAMES` holds, for each address
    /// `node` gives a class of its own, the pod `pod_at` says holds it. Only differences are
    /// written; failures are returned (nothing enforced depends on the table).
    pub fn set_peer_names<'a>(&mut self, node: &NodePolicy, pod_at: impl Fn(IpAddr) -> Option<&'a ObjKey>) -> Vec<String> {
        self.peer_names.set(&names::peers_of(node, pod_at))
    }

    /// Loads the programs and maps without ever attaching to an interface: the maps are
    /// programmed as usual and the programs are run with [`Datapath::test_run`]. A test run
    /// sees the loopback device's ifindex (1 in a fresh namespace) unless told otherwise.
    pub fn load_detached(pin_dir: &Path) -> Result<Datapath> {
        Datapath::load_detached_with(pin_dir, false)
    }

    /// [`Datapath::load_detached`], the programs loaded to log their decisions or not.
    pub fn load_detached_with(pin_dir: &Path, bpf_debug: bool) -> Result<Datapath> {
        let mut dp = Datapath::load(pin_dir, bpf_debug)?;
        dp.links.attach_programs = false;
        Ok(dp)
    }

    /// Starts attaching the programs to `ifaces` (the node's pod interfaces as found before
    /// the cluster is known) in the background; the first [`Datapath::sync`] adopts what
    /// belongs to a pod and removes the rest ([`attach::Links::preattach`]).
    pub fn preattach(&mut self, ifaces: Vec<Iface>) {
        self.links.preattach(&mut self.ebpf, ifaces);
    }

    /// Removes netpol's tc filters from every interface of this network namespace, then
    /// every pinned link and map of this daemon: enforcement stops. (`netpol-daemon
    /// uninstall`; a normal exit keeps enforcing.) Returns how many tc filters there were.
    pub fn uninstall(pin_dir: &Path) -> Result<usize> {
        let filters = tc::delete_all().context("deleting netpol's tc filters")?;
        maps::remove_pins(pin_dir)?;
        Ok(filters)
    }

    /// Takes the interfaces the background move to TCX finished (`--attach auto`); whether
    /// any attachment changed.
    pub fn collect_upgrades(&mut self) -> bool {
        self.links.collect_upgrades()
    }

    /// How many attached interfaces run the programs from TCX links, and how many from tc.
    pub fn attach_counts(&self) -> AttachCounts {
        self.links.counts()
    }

    /// How programs are attached to interfaces from now on (`--attach`).
    pub fn set_attach_mode(&mut self, mode: AttachMode) {
        self.links.set_mode(mode);
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Lowers the entry budgets below the map sizes (to exercise the fail-closed path).
    pub fn set_limits(&mut self, l: Limits) {
        let d = Limits::default();
        self.tables.limits =
            Limits { identities: l.identities.min(d.identities), policy: l.policy.min(d.policy), ports: l.ports.min(d.ports) };
    }

    /// Runtime settings for the programs (conntrack timeouts). The flow cache's
    /// lifetime follows from the timeouts (`flow_cache_ticks`); the given one is ignored.
    /// Every cached flow is voided, so none outlives a timeout that just got shorter.
    pub fn set_config(&mut self, c: &Config) -> Result<()> {
        self.conntrack.set_config(c)
    }

    /// Turns the flow cache on (the default) or off (`--flow-cache off`: every packet of an
    /// established flow looks the conntrack table up).
    /// Stays off on PREEMPT_RT kernels: there two programs can interleave on one CPU, and a
    /// slot half-written by one must never be read by the other.
    pub fn set_flow_cache(&mut self, on: bool) -> Result<()> {
        self.conntrack.set_flow_cache(on)
    }

    /// What the programs log, read into the `log` crate's logger, for a reader thread (once):
    /// `None` unless they were loaded to log (nothing is made then).
    pub fn take_program_log(&mut self) -> Result<Option<ProgramLog>> {
        self.take_program_log_into(log::logger())
    }

    /// [`Datapath::take_program_log`] into `logger`.
    pub fn take_program_log_into<T: log::Log>(&mut self, logger: T) -> Result<Option<ProgramLog<T>>> {
        if !self.bpf_debug {
            return Ok(None);
        }
        ProgramLog::take(&mut self.ebpf, logger).map(Some)
    }

    /// The flow events' ring buffer and settings, for a reader thread (once).
    pub fn take_events(&mut self) -> Option<FlowEvents> {
        self.events.take()
    }

    /// Removes tracked flows the compiled policy no longer allows (`--established=revalidate`).
    /// Returns how many were cut.
    pub fn revalidate(&mut self, node: &NodePolicy, node_addrs: &[IpAddr]) -> usize {
        let pod_of: HashMap<u32, ObjKey> = self.links.endpoints().map(|(id, k)| (id, k.clone())).collect();
        self.conntrack.revalidate(node, node_addrs, &pod_of)
    }

    /// The node's own addresses: always allowed into local pods (kubelet probes). Only those
    /// [`node_addr_for_pods`] keeps.
    pub fn set_node_addrs(&mut self, addrs: &[IpAddr]) -> Result<()> {
        self.addrs.set_node_addrs(addrs)
    }

    /// Endpoint id and pod of every attached interface (for metrics).
    pub fn endpoint_ids(&self) -> Vec<(u32, ObjKey)> {
        self.links.endpoints().map(|(id, k)| (id, k.clone())).collect()
    }

    /// For the metrics: per programmed pod and direction, its endpoint id and slot labels,
    /// and the counts folded out of the map.
    pub fn policy_slots(&self) -> (SlotLabels, RetiredCounts) {
        self.counters.policy_slots(self.links.endpoints())
    }
}

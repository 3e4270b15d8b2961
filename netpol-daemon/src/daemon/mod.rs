//! The daemon: drives the pipeline, one pass at a time. A pass ([`Daemon::step`]) waits for the
//! source, takes its changes into the cluster model, holds the new pod interfaces no known pod
//! claims as pending, compiles the node's policy, finds each pod's interface (`interfaces`),
//! programs the maps and reports the status ([`crate::metrics`]). What the passes share and
//! never change is the [`Context`]; what they carry from one to the next is the [`State`].
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use netpol_common::{EventConfig, EVENTS_AUDIT, EVENTS_DENIED};

mod interfaces;
pub mod netlink;
mod pass;

use crate::compiler::NodeCompiler;
use crate::datapath::{Datapath, FlowEvents};
use crate::metrics::kube_events::{self, KubeEvents};
use crate::metrics::{self, Shared};
use crate::model::{ChangeSet, Cluster};
use crate::source::directory::ManifestsDir;
use crate::source::kube::{Intervals, KubeSource};
use crate::source::Source;
use interfaces::Interfaces;
use pass::Pass;

pub struct RunConfig {
    pub node_name: String,
    /// A manifests directory; `None`: the Kubernetes API (in-cluster config or KUBECONFIG).
    pub manifests: Option<PathBuf>,
    pub metrics_addr: SocketAddr,
    /// `/healthz` fails once the loop's last pass began longer ago than this.
    pub max_pass_age: Duration,
    pub bpffs: PathBuf,
    /// Start even when the pins under `bpffs` would vanish with the daemon's mount namespace.
    pub allow_private_bpffs: bool,
    pub poll_interval: Duration,
    /// Kubernetes mode: how often the ClusterNetworkPolicy CRD is looked for while it is not
    /// installed.
    pub crd_recheck: Duration,
    /// Re-check tracked flows against each new policy and cut those no longer allowed.
    pub revalidate_established: bool,
    /// Every policy in audit mode.
    pub audit_all: bool,
    /// Conntrack timeouts.
    pub datapath_config: netpol_common::Config,
    /// Denials and audits sent to the log, per second and CPU (`--log-denied`; 0: none).
    pub log_denied: u32,
    /// Established flows' packets pass through the per-CPU flow cache (else every one looks
    /// the conntrack table up).
    pub flow_cache: bool,
    /// TCX links, clsact + cls_bpf filters, or TCX where the kernel has it (`--attach`).
    pub attach: crate::datapath::AttachMode,
    /// The programs log their decisions into the daemon's log (`--bpf-debug`).
    pub bpf_debug: bool,
}

/// What every pass works with: the configuration, the status shared with the metrics thread,
/// the datapath it programs and the source it reads.
pub struct Context {
    cfg: RunConfig,
    shared: Arc<Shared>,
    datapath: Datapath,
    source: Box<dyn Source>,
    /// Kubernetes Events on the policies not enforced as written (Kubernetes mode only).
    events: KubeEvents,
}

/// What one pass leaves to the next.
pub struct State {
    cluster: Cluster,
    compiler: NodeCompiler,
    /// Changes loaded but not yet compiled.
    changes: ChangeSet,
    /// Something to report even when the maps need nothing (new load errors).
    status_changed: bool,
    loaded_once: bool,
    /// The first pass does not wait for the source.
    first_wait: bool,
    /// The problems of the last load (each logged once) and of the last sync (logged when
    /// they change).
    load_errors: Vec<String>,
    sync_errors: Vec<String>,
    /// How long before it was loaded the change not yet programmed was made, and when.
    change_age: Option<(Duration, Instant)>,
    interfaces: Interfaces,
    /// Periodic work put off by a change runs on the next pass, without waiting.
    put_off: bool,
    /// A programming pass changed something since the rules' peers were last named
    /// (`PEER_NAMES`), and when they were.
    peers_stale: bool,
    peers_named: Option<Instant>,
}

/// How often at most the rules' peers are named again ([`Daemon::name_peers`]).
const PEER_NAMES_EVERY: Duration = Duration::from_secs(1);

pub struct Daemon {
    ctx: Context,
    state: State,
}

/// Enforces until `stop`: the maps stay pinned (and enforcing) after.
pub fn run(cfg: RunConfig, stop: Arc<AtomicBool>) -> Result<()> {
    let mut daemon = Daemon::start(cfg, &stop)?;
    while !stop.load(Ordering::SeqCst) {
        daemon.step();
    }
    tracing::info!("stopping; maps stay pinned in {}", daemon.ctx.datapath.pin_dir().display());
    Ok(())
}

impl Daemon {
    /// Loads (or adopts) the datapath, starts the flow-event reader and the metrics endpoint,
    /// and connects the source.
    pub fn start(cfg: RunConfig, stop: &Arc<AtomicBool>) -> Result<Daemon> {
        let shared = Arc::new(Shared::default());
        shared.heartbeat.set_max_age(cfg.max_pass_age);
        // The source first: the cluster is listed while the datapath loads and the programs
        // are attached ahead to the interfaces already there.
        let source: Box<dyn Source> = match &cfg.manifests {
            Some(dir) => Box::new(ManifestsDir::new(dir.clone())),
            None => {
                let intervals = Intervals { crd_recheck: cfg.crd_recheck, ..Intervals::default() };
                Box::new(KubeSource::start(&cfg.node_name, intervals)?)
            }
        };
        let mut datapath = load_datapath(&cfg)?;
        start_program_log(&mut datapath, stop)?;
        datapath.preattach(interfaces::routed_pod_interfaces());
        if let Some(FlowEvents { ring, mut control }) = datapath.take_events() {
            let verdicts = if cfg.log_denied > 0 { EVENTS_DENIED | EVENTS_AUDIT } else { 0 };
            let base = EventConfig { per_sec: cfg.log_denied, verdicts };
            shared.flows.start(&cfg.node_name, Box::new(move |c| control.set(c)), base);
            metrics::flows::reader::spawn(ring, shared.clone(), stop.clone())?;
        }
        metrics::serve(cfg.metrics_addr, shared.clone(), cfg.bpffs.clone())
            .with_context(|| format!("listening on {}", cfg.metrics_addr))?;
        let events = match &cfg.manifests {
            Some(_) => KubeEvents::disabled(),
            None => KubeEvents::start(&cfg.node_name, shared.kube_events.clone()).unwrap_or_else(|e| {
                tracing::warn!("{e:#}: no Kubernetes Events");
                KubeEvents::disabled()
            }),
        };
        tracing::info!(
            "netpol-daemon: node {}, source {}, metrics on {}, maps pinned in {}",
            cfg.node_name,
            source.describe(),
            cfg.metrics_addr,
            cfg.bpffs.display()
        );
        let state = State {
            cluster: Cluster::default(),
            compiler: NodeCompiler::new(&cfg.node_name),
            changes: ChangeSet::everything(),
            status_changed: false,
            loaded_once: false,
            first_wait: true,
            load_errors: Vec::new(),
            sync_errors: Vec::new(),
            change_age: None,
            interfaces: Interfaces::default(),
            put_off: false,
            peers_stale: false,
            peers_named: None,
        };
        Ok(Daemon { ctx: Context { cfg, shared, datapath, source, events }, state })
    }

    /// One pass of the pipeline: wait for the source, take its changes, track the pending
    /// interfaces, then (when something is due) compile, resolve, program and report.
    pub fn step(&mut self) {
        // Liveness: every pass begins within the poll interval of the end of the last one.
        self.ctx.shared.heartbeat.beat();
        self.wait_for_source();
        self.take_tcx_upgrades();
        if !self.source_ready() {
            return;
        }
        // Pods whose interface is not there yet are retried every second; every pod's
        // interface (and the node's addresses) is looked up again every few seconds.
        let (retry, full_resolve) = (self.state.interfaces.retry_due(), self.state.interfaces.full_due());
        let taken = self.take_changes();
        // Flow clients get the peers of their flows named.
        self.ctx.shared.flows.keep_directory(&self.state.cluster);
        if !taken {
            return;
        }
        let pass = self.plan(retry, full_resolve);
        if pass.is_due() {
            self.program(pass);
        }
        self.name_peers();
    }

    /// Names the rules' peers for `status` (`PEER_NAMES`: which pod each address with a class
    /// of its own is) after passes that changed something, at most once per
    /// [`PEER_NAMES_EVERY`]: the names are for people and may lag a change by that much,
    /// while naming them after every change of a busy cluster would look up every pod's
    /// addresses each time.
    fn name_peers(&mut self) {
        let st = &mut self.state;
        if !st.peers_stale || st.peers_named.is_some_and(|t| t.elapsed() < PEER_NAMES_EVERY) {
            return;
        }
        (st.peers_stale, st.peers_named) = (false, Some(Instant::now()));
        let by_ip: std::collections::HashMap<std::net::IpAddr, &crate::model::ObjKey> =
            st.cluster.pods.values().filter(|p| !p.host_network).flat_map(|p| p.ips.iter().map(move |ip| (*ip, &p.key))).collect();
        let errors = self.ctx.datapath.set_peer_names(st.compiler.policy(), |ip| by_ip.get(&ip).copied());
        if let Some(e) = errors.first() {
            tracing::warn!("{} peer name(s) not written for status, first: {e}", errors.len());
        }
    }

    /// Interfaces moved from tc filters to TCX links in the background since the last pass.
    fn take_tcx_upgrades(&mut self) {
        if self.ctx.datapath.collect_upgrades() {
            self.ctx.shared.status.lock().unwrap().attached = self.ctx.datapath.attach_counts();
        }
    }

    fn wait_for_source(&mut self) {
        // Periodic work put off by a change runs on the next pass, without waiting.
        let timeout = if std::mem::take(&mut self.state.put_off) { Duration::ZERO } else { self.ctx.cfg.poll_interval };
        if !std::mem::take(&mut self.state.first_wait) {
            self.ctx.source.wait(timeout);
        }
    }

    /// Reports the source's health; whether the source can be programmed from.
    fn source_ready(&self) -> bool {
        let down = !self.ctx.source.healthy();
        let went_down = {
            let mut status = self.ctx.shared.status.lock().unwrap();
            status.source_errors = self.ctx.source.errors();
            status.set_source_down(down)
        };
        if went_down {
            tracing::warn!("the Kubernetes API is unreachable; enforcing the last known state");
        }
        // Until every watch has listed once, the pinned state of a previous run (if any)
        // keeps enforcing; nothing is programmed from a partial view.
        self.ctx.source.ready()
    }

    /// Brings the cluster model up to date with the source and keeps what changed for the
    /// compiler; false when the source could not be read (the last state is kept).
    fn take_changes(&mut self) -> bool {
        let (ctx, st) = (&mut self.ctx, &mut self.state);
        let first = !st.loaded_once;
        let t_load = Instant::now();
        let span = tracing::info_span!("load", ms = tracing::field::Empty);
        let _load = span.enter();
        let (ch, errors) = match ctx.source.refresh(&mut st.cluster, ctx.cfg.audit_all) {
            Ok(Some(loaded)) => loaded,
            Ok(None) => return true,
            Err(e) => {
                tracing::error!("{e:#}; keeping the last state");
                return false;
            }
        };
        // How long ago the change was made, as of now.
        let (age, now) = (ctx.source.take_change_age(), Instant::now());
        ctx.shared.flows.pods_changed(&st.cluster, &ch);
        if ch.is_empty() && !first && errors == st.load_errors {
            return true;
        }
        span.record("ms", pass::ms(t_load.elapsed()));
        tracing::debug!("state loaded in {:?} (change made {age:?} before): {ch:?}", t_load.elapsed());
        st.loaded_once = true;
        st.change_age = if first { None } else { age.map(|a| (a, now)) };
        if errors != st.load_errors {
            ctx.events.loaded(kube_events::invalid_policies(&st.cluster));
        }
        log_new_load_errors(&errors, &st.load_errors);
        st.load_errors = errors;
        if !ch.pods.is_empty() || first || ch.all {
            st.interfaces.pods_changed(&st.cluster, &ctx.cfg.node_name, &ch.pods, first || ch.all);
        }
        st.status_changed = true;
        st.changes.merge(ch);
        true
    }

    /// What this pass has to do: the pending interfaces now, whether anything changed, and
    /// whether the full look-up runs now or on the next pass.
    fn plan(&mut self, retry: bool, mut full_resolve: bool) -> Pass {
        let st = &mut self.state;
        let (pending, pending_changed) = st.interfaces.track_unclaimed();
        let have_changes = std::mem::take(&mut st.status_changed) | !st.changes.is_empty();
        // A change is programmed first; the periodic look-up of every interface (a few ms of
        // netlink) runs on the next pass (unless changes kept putting it off).
        if have_changes && full_resolve && st.interfaces.full_may_wait() {
            full_resolve = false;
            st.put_off = true;
        }
        Pass { have_changes, retry, pending_changed, full_resolve, pending }
    }
}

/// Refuses a bpffs that dies with the daemon (unless allowed), then loads or adopts the maps
/// and programs pinned there and configures them.
#[tracing::instrument(name = "load_datapath", skip_all, fields(bpffs = %cfg.bpffs.display()))]
fn load_datapath(cfg: &RunConfig) -> Result<Datapath> {
    let t0 = Instant::now();
    crate::datapath::check_bpffs_outlives_daemon(&cfg.bpffs, cfg.allow_private_bpffs)?;
    let mut dp = Datapath::load(&cfg.bpffs, cfg.bpf_debug)?;
    dp.set_config(&cfg.datapath_config)?;
    dp.set_flow_cache(cfg.flow_cache)?;
    dp.set_attach_mode(cfg.attach);
    tracing::info!(ms = pass::ms(t0.elapsed()), "datapath loaded in {:?}", t0.elapsed());
    Ok(dp)
}

/// With `--bpf-debug`, starts reading what the programs log into the daemon's log (nothing is
/// made without it). The setting is baked into the programs this daemon loaded: they take over
/// every interface at the first sync, until when a previous daemon's keep theirs.
fn start_program_log(datapath: &mut Datapath, stop: &Arc<AtomicBool>) -> Result<()> {
    let Some(log) = datapath.take_program_log()? else { return Ok(()) };
    log.spawn(stop.clone()).context("starting the programs' log reader")?;
    tracing::info!(
        "--bpf-debug: the programs log each drop, audit, new flow and frame not read as IP (target netpol_bpf); this daemon's programs replace those running now at its first sync"
    );
    Ok(())
}

/// Logs the load problems not logged before.
fn log_new_load_errors(errors: &[String], logged: &[String]) {
    for e in errors {
        if !logged.contains(e) {
            // Invalid policies are enforced fail-closed (their message says so); other
            // invalid objects are skipped.
            let fail_closed = [crate::model::FAIL_CLOSED_NOTE, crate::model::CLUSTER_FAIL_CLOSED_NOTE];
            let what = if fail_closed.iter().any(|note| e.contains(note)) { "invalid" } else { "skipped" };
            tracing::error!("{what}: {e}");
        }
    }
}

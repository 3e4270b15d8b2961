//! The programming half of a pass: compile the node's policy (with the pending interfaces),
//! find each pod's interface, program the maps, then report: the change's latency, the sync's
//! errors, the status behind `/metrics`, the log line.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::field::Empty;

use super::interfaces::{self, Resolved};
use super::Daemon;
use crate::compiler::UpdateKind;
use crate::datapath::{Iface, SyncReport};
use crate::metrics::{kube_events, Synced};
use crate::model::ObjKey;

/// What a pass has to do, and why.
pub struct Pass {
    /// The cluster (or its load errors) changed since the last programming.
    pub have_changes: bool,
    /// Pods whose interface was not there are looked up again.
    pub retry: bool,
    /// The pending interfaces changed.
    pub pending_changed: bool,
    /// Every pod's interface (and the node's addresses) is looked up afresh.
    pub full_resolve: bool,
    /// The pending interfaces (ifindex), held default-deny by the compiler.
    pub pending: Vec<u32>,
}

impl Pass {
    /// Something to compile, look up or program.
    pub fn is_due(&self) -> bool {
        self.have_changes || self.retry || self.pending_changed || self.full_resolve
    }

    /// Only the periodic look-up: the maps need nothing unless an interface moved.
    fn lookup_only(&self) -> bool {
        !self.have_changes && !self.retry && !self.pending_changed
    }
}

/// How long the parts of a programming pass took.
struct Timings {
    started: Instant,
    compiled: Duration,
    resolved: Duration,
    synced: Duration,
}

impl Daemon {
    /// Compiles, resolves the interfaces, programs the maps and reports.
    pub(super) fn program(&mut self, pass: Pass) {
        // The pass's span carries each step's duration (in ms) to every line logged in it; the
        // steps' own spans (compile, sync) name what a line logged inside them was about.
        let span = tracing::info_span!("pass", kind = Empty, compile_ms = Empty, resolve_ms = Empty, maps_ms = Empty);
        let _pass = span.enter();
        let started = Instant::now();
        let resolving_all = self.state.interfaces.begin(pass.full_resolve);
        let kind = tracing::info_span!("compile").in_scope(|| self.compile(&pass.pending));
        let compiled = started.elapsed();
        span.record("kind", tracing::field::debug(kind));
        span.record("compile_ms", ms(compiled));
        let resolved = self.state.interfaces.resolve(self.state.compiler.policy(), pass.full_resolve);
        if pass.lookup_only() && resolved.same {
            // A periodic look-up that found every interface where it was.
            if resolving_all {
                self.state.interfaces.full_done();
            }
            return;
        }
        let (ifaces, mut errors, node_addrs) = self.interfaces_to_program(resolved, pass.full_resolve);
        let resolved = started.elapsed() - compiled;
        span.record("resolve_ms", ms(resolved));
        let t_sync = Instant::now();
        let report = tracing::info_span!("sync", interfaces = ifaces.len())
            .in_scope(|| self.ctx.datapath.sync(self.state.compiler.policy(), &ifaces));
        let t = Timings { started, compiled, resolved, synced: t_sync.elapsed() };
        span.record("maps_ms", ms(t.synced));
        self.observe_latency(&t);
        if pass.have_changes && self.ctx.cfg.revalidate_established {
            let cut = self.ctx.datapath.revalidate(self.state.compiler.policy(), &node_addrs);
            if cut > 0 {
                tracing::info!("revalidated tracked flows: {cut} no longer allowed, cut");
            }
        }
        self.ctx.events.synced(kube_events::not_enforced(self.state.compiler.policy(), &report.errors));
        errors.extend(report.errors.iter().cloned());
        self.log_sync_errors(errors);
        self.report_status(&report, &ifaces, started);
        if pass.have_changes {
            log_synced(kind, &report, &t);
            self.state.peers_stale = true;
        }
        // (After the maps: the first pass attaches every pod, which can take seconds.)
        if resolving_all {
            self.state.interfaces.full_done();
        }
        self.ctx.shared.ready.store(true, Ordering::SeqCst);
    }

    /// The node's policy, brought up to date with the changes taken and `pending`.
    fn compile(&mut self, pending: &[u32]) -> UpdateKind {
        let st = &mut self.state;
        st.compiler.set_pending(&interfaces::pending_ifaces(pending));
        st.compiler.update(&st.cluster, &std::mem::take(&mut st.changes))
    }

    /// The interfaces to program (the pods' and the pending ones), the problems found, and the
    /// node's addresses (programmed too).
    fn interfaces_to_program(&mut self, resolved: Resolved, full: bool) -> (BTreeMap<ObjKey, Iface>, Vec<String>, Vec<IpAddr>) {
        let ifaces = interfaces::with_pending(self.state.compiler.policy(), resolved.ifaces);
        let mut errors = resolved.errors;
        let node_addrs = self.state.interfaces.node_addrs(full).to_vec();
        if let Err(e) = self.ctx.datapath.set_node_addrs(&node_addrs) {
            errors.push(format!("NODE_ADDRS: {e}"));
        }
        (ifaces, errors, node_addrs)
    }

    /// The change just programmed: how long after it was made.
    fn observe_latency(&mut self, t: &Timings) {
        if let Some((age, at)) = self.state.change_age.take() {
            let latency = age + at.elapsed();
            self.ctx.shared.status.lock().unwrap().record_programmed(latency);
            tracing::debug!(
                latency_ms = ms(latency),
                "change programmed {latency:?} after it was made (resolve {:?}, maps {:?})",
                t.resolved,
                t.synced
            );
        }
    }

    /// Logs the pass's problems when they differ from the last pass's.
    fn log_sync_errors(&mut self, errors: Vec<String>) {
        if errors != self.state.sync_errors {
            for e in &errors {
                tracing::warn!("{e}");
            }
            self.state.sync_errors = errors;
        }
    }

    fn report_status(&self, report: &SyncReport, ifaces: &BTreeMap<ObjKey, Iface>, started: Instant) {
        let synced = Synced {
            report,
            node: self.state.compiler.policy(),
            ifaces,
            policies: self.state.cluster.policies.len(),
            manifest_errors: self.state.load_errors.len(),
            started,
        };
        self.ctx.shared.status.lock().unwrap().record_sync(&self.ctx.datapath, synced);
    }
}

fn log_synced(kind: UpdateKind, report: &SyncReport, t: &Timings) {
    let total = t.started.elapsed();
    tracing::info!(
        local_pods = report.endpoints,
        identity_entries = report.identities,
        policy_entries = report.policy,
        port_entries = report.ports,
        total_ms = ms(total),
        "synced ({kind:?} compile in {:?}, maps in {:?}): {} local pods, {} identity, {} policy and {} port entries in {total:?}",
        t.compiled,
        t.synced,
        report.endpoints,
        report.identities,
        report.policy,
        report.ports,
    );
}

/// A duration as a span or event field: milliseconds, to the microsecond.
pub(super) fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

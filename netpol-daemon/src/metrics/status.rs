//! What the daemon reports about itself: the [`Status`] behind `/metrics` and `/readyz`, and
//! how a pass fills it in (a sync's report and the datapath's endpoints and counter slots, a
//! change programmed, the source going away).
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::compiler::NodePolicy;
use crate::datapath::{AttachCounts, Datapath, Iface, SyncReport};
use crate::model::ObjKey;

#[derive(Debug, Default, Clone)]
pub struct Status {
    pub endpoints: Vec<(u32, ObjKey)>,
    /// How the endpoints' interfaces run the programs (TCX links or tc filters).
    pub attached: AttachCounts,
    pub manifest_errors: usize,
    pub sync_errors: usize,
    pub syncs: u64,
    pub identity_entries: usize,
    pub policy_entries: usize,
    pub port_entries: usize,
    pub policies: usize,
    pub last_sync_seconds: f64,
    /// Per programmed pod and direction: the policies that isolate it (what its default-deny
    /// drops are attributed to).
    pub isolated_by: Vec<(ObjKey, &'static str, Vec<ObjKey>)>,
    /// Per programmed pod and direction: endpoint id, pod, direction and the label of each
    /// policy slot of its POLICY_COUNTERS.
    pub policy_slots: Vec<(u32, ObjKey, u8, Vec<String>)>,
    /// Per-policy counts folded out of the map when a pod's policies changed.
    pub policy_retired: BTreeMap<(ObjKey, u8, String), u64>,
    /// Local pods failing closed because their entries do not fit the maps.
    pub fail_closed: Vec<ObjKey>,
    /// The source (Kubernetes API) is unreachable; the last state is enforced.
    pub source_down: bool,
    /// Errors of the source so far ([`crate::source`]'s watch errors; 0 for manifests).
    pub source_errors: u64,
    /// Change observed (file written, watch event received) → maps updated.
    pub programming_latency: Histogram,
    /// When the last observed change was in the maps (Unix time, seconds); 0: none yet.
    pub last_programmed_unix: f64,
}

/// Upper bounds (seconds) of the programming-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Default, Clone)]
pub struct Histogram {
    /// Per bucket (not cumulative); observations above the last bound only count in `count`.
    pub buckets: [u64; LATENCY_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// One datapath sync, as the status reports it.
pub struct Synced<'a> {
    pub report: &'a SyncReport,
    /// What was programmed, and where each pod was found.
    pub node: &'a NodePolicy,
    pub ifaces: &'a BTreeMap<ObjKey, Iface>,
    /// NetworkPolicies in the cluster model and the objects the source found invalid.
    pub policies: usize,
    pub manifest_errors: usize,
    /// When the pass began (compile, interfaces and maps).
    pub started: Instant,
}

impl Status {
    /// The source's health; true when it just became unreachable.
    pub fn set_source_down(&mut self, down: bool) -> bool {
        let was_down = std::mem::replace(&mut self.source_down, down);
        was_down != down && down
    }

    /// A change made `latency` ago is in the maps now.
    pub fn record_programmed(&mut self, latency: Duration) {
        let done = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.programming_latency.observe(latency.as_secs_f64());
        self.last_programmed_unix = done.as_secs_f64();
    }

    /// After a sync: the endpoints and their counter slots, the entries programmed, and what
    /// isolates each pod that has an interface.
    pub fn record_sync(&mut self, dp: &Datapath, s: Synced) {
        self.endpoints = dp.endpoint_ids();
        self.attached = dp.attach_counts();
        self.manifest_errors = s.manifest_errors;
        self.sync_errors = s.report.errors.len();
        self.syncs += 1;
        self.identity_entries = s.report.identities;
        self.policy_entries = s.report.policy;
        self.port_entries = s.report.ports;
        self.policies = s.policies;
        self.last_sync_seconds = s.started.elapsed().as_secs_f64();
        self.fail_closed = s.report.fail_closed.clone();
        (self.policy_slots, self.policy_retired) = dp.policy_slots();
        self.isolated_by = isolated_by(s.node, s.ifaces);
    }
}

/// Per pod with an interface and isolated direction: the policies that isolate it.
fn isolated_by(node: &NodePolicy, ifaces: &BTreeMap<ObjKey, Iface>) -> Vec<(ObjKey, &'static str, Vec<ObjKey>)> {
    node.pods
        .iter()
        .filter(|(k, _)| ifaces.contains_key(*k))
        .flat_map(|(k, c)| {
            [("ingress", &c.ingress), ("egress", &c.egress)]
                .into_iter()
                .filter_map(move |(d, dp)| dp.as_ref().map(|dp| (k.clone(), d, dp.policies.clone())))
        })
        .collect()
}

//! The Kubernetes source, event-driven: one watcher per kind (Namespaces, Pods,
//! NetworkPolicies, Services, EndpointSlices, Nodes, and ClusterNetworkPolicies when their CRD
//! is installed) on a tokio runtime of its own converts each object as it arrives ([`watch`])
//! and queues the change; the daemon loop sleeps on that queue
//! ([`Source::wait`] wakes at the first event) and applies exactly the queued changes to its
//! model ([`apply`]), a relist diffed once. The model is the only copy of the cluster: no
//! reflector store of API objects beside it. While the API server is unreachable nothing
//! arrives, and the node keeps enforcing the last state.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher;
use kube::{Api, Client};

use super::Source;
use crate::model::{self, ChangeSet, Cluster, Kind};

mod apply;
mod watch;

use apply::{Apply, Problems};
use watch::{Health, Inbox, Sink};

/// The resources watched, as (API group, resource): what the ClusterRole must grant
/// get/list/watch on (checked against deploy/ by a test).
pub const WATCHED: &[(&str, &str)] = &[
    ("", "namespaces"),
    ("", "pods"),
    ("", "services"),
    ("", "nodes"),
    ("discovery.k8s.io", "endpointslices"),
    ("networking.k8s.io", "networkpolicies"),
    (model::CLUSTER_POLICY_GROUP, model::CLUSTER_POLICY_PLURAL),
];

/// How often the source looks at the API server on its own (besides the watches' events).
#[derive(Clone, Copy, Debug)]
pub struct Intervals {
    /// The API server is asked for its version (see [`watch::probe`]).
    pub probe: Duration,
    /// While the ClusterNetworkPolicy CRD is not installed, whether it is now.
    pub crd_recheck: Duration,
}

impl Default for Intervals {
    fn default() -> Self {
        Intervals { probe: Duration::from_secs(10), crd_recheck: DEFAULT_CRD_RECHECK }
    }
}

/// `--crd-recheck-ms`'s default: a CRD installed after the daemon started is watched within
/// this (the check is one list request per node that the API server answers 404).
pub const DEFAULT_CRD_RECHECK: Duration = Duration::from_secs(10);

/// The pods the API server sends: every node's (peers are matched by address), but not those
/// that finished (phase Succeeded or Failed: their address may already belong to a new pod; the
/// model skips them too, the filter only spares the traffic and the memory).
pub const POD_FIELD_SELECTOR: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// Changes are taken at most every `COALESCE` while they keep coming: a change that arrives
/// after a quiet spell (no refresh for `COALESCE`) alone is taken at once; one that finds a
/// refresh less than `COALESCE` ago, or others queued with it (a stream, a burst), waits until
/// `COALESCE` after the oldest queued. So 1,000 events in 100 ms are about ten syncs, each
/// event's latency grows by at most `COALESCE`, and a lone event is not delayed.
pub const COALESCE: Duration = Duration::from_millis(10);

pub struct KubeSource {
    inbox: Arc<Inbox>,
    health: Arc<Health>,
    problems: Problems,
    /// When the oldest change of the last refresh arrived (for the latency histogram).
    oldest: Option<Instant>,
    /// When a refresh last took changes.
    last_taken: Option<Instant>,
    _rt: tokio::runtime::Runtime,
}

impl KubeSource {
    /// Connects with in-cluster config or KUBECONFIG and starts the watchers; `node`: the node
    /// enforced (pods of other nodes are kept slimmer).
    pub fn start(node: &str, intervals: Intervals) -> Result<KubeSource> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("kube").build()?;
        let client = rt.block_on(Client::try_default()).context("Kubernetes client (in-cluster config or KUBECONFIG)")?;
        Ok(KubeSource::with_client(rt, client, node, intervals))
    }

    pub fn with_client(rt: tokio::runtime::Runtime, client: Client, node: &str, intervals: Intervals) -> KubeSource {
        let sink = Sink { inbox: Arc::default(), health: Arc::new(Health::new()), node: node.into() };
        let all = watcher::Config::default;
        watch::spawn(&rt, Api::<Namespace>::all(client.clone()), all(), Kind::Namespace, sink.clone());
        watch::spawn(&rt, Api::<Pod>::all(client.clone()), all().fields(POD_FIELD_SELECTOR), Kind::Pod, sink.clone());
        watch::spawn(&rt, Api::<NetworkPolicy>::all(client.clone()), all(), Kind::Policy, sink.clone());
        watch::spawn(&rt, Api::<Service>::all(client.clone()), all(), Kind::Service, sink.clone());
        watch::spawn(&rt, Api::<EndpointSlice>::all(client.clone()), all(), Kind::EndpointSlice, sink.clone());
        watch::spawn(&rt, Api::<Node>::all(client.clone()), all(), Kind::Node, sink.clone());
        let cnps = Api::<DynamicObject>::all_with(client.clone(), &cluster_policy_resource());
        let (kind, convert) = (Kind::ClusterPolicy, model::cluster_policy_converted);
        watch::spawn_optional(&rt, cnps, kind, model::CLUSTER_POLICY_KIND, convert, sink.clone(), intervals.crd_recheck);
        watch::probe(&rt, client, sink.health.clone(), intervals.probe);
        KubeSource { inbox: sink.inbox, health: sink.health, problems: Problems::default(), oldest: None, last_taken: None, _rt: rt }
    }

    /// Watch errors so far (each followed by a relist with backoff; a resource whose CRD is not
    /// installed is none).
    pub fn watch_errors(&self) -> u64 {
        self.health.errors.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` (from `t0`) for the queue to hold something the daemon can take:
    /// a change once every kind is listed. Whether it does.
    fn wait_for_change(&self, t0: Instant, timeout: Duration) -> bool {
        let mut q = self.inbox.queue.lock().unwrap();
        while q.changes.is_empty() || !q.complete() {
            let Some(left) = timeout.checked_sub(t0.elapsed()).filter(|l| !l.is_zero()) else { return false };
            q = self.inbox.arrived.wait_timeout(q, left).unwrap().0;
        }
        true
    }

    /// Holds a stream or a burst back until [`COALESCE`] after its oldest change.
    fn coalesce(&self) {
        let q = self.inbox.queue.lock().unwrap();
        let Some(oldest) = q.changes.front().map(|(t, _)| *t) else { return };
        let streaming = self.last_taken.is_some_and(|t| t.elapsed() < COALESCE);
        if !streaming && q.changes.len() == 1 {
            return;
        }
        drop(q);
        if let Some(left) = COALESCE.checked_sub(oldest.elapsed()) {
            std::thread::sleep(left);
        }
    }
}

/// The daemon's view: waits on the watchers' queue, and a refresh applies what is queued.
impl Source for KubeSource {
    fn describe(&self) -> String {
        "the Kubernetes API".to_string()
    }

    fn wait(&mut self, timeout: Duration) {
        if self.wait_for_change(Instant::now(), timeout) {
            self.coalesce();
        }
    }

    fn healthy(&self) -> bool {
        self.health.healthy()
    }

    fn errors(&self) -> u64 {
        self.watch_errors()
    }

    /// Every kind has been listed once (until then the pinned state of a previous run, if any,
    /// keeps enforcing: nothing is programmed from a partial view).
    fn ready(&self) -> bool {
        self.inbox.queue.lock().unwrap().complete()
    }

    fn refresh(&mut self, cluster: &mut Cluster, audit_all: bool) -> Result<Option<(ChangeSet, Vec<String>)>> {
        let changes = std::mem::take(&mut self.inbox.queue.lock().unwrap().changes);
        let Some((oldest, _)) = changes.front() else { return Ok(None) };
        self.oldest = Some(*oldest);
        self.last_taken = Some(Instant::now());
        let mut apply = Apply { cluster, problems: &mut self.problems, audit_all, changed: ChangeSet::default() };
        for (_, change) in changes {
            apply.change(change);
        }
        let changed = apply.changed;
        Ok(Some((changed, self.problems.all())))
    }

    fn take_change_age(&mut self) -> Option<Duration> {
        self.oldest.take().map(|t| t.elapsed())
    }
}

/// The ClusterNetworkPolicy resource, for kube's dynamic API (there is no typed object).
pub fn cluster_policy_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(model::CLUSTER_POLICY_GROUP, model::CLUSTER_POLICY_VERSION, model::CLUSTER_POLICY_KIND);
    ApiResource::from_gvk_with_plural(&gvk, model::CLUSTER_POLICY_PLURAL)
}

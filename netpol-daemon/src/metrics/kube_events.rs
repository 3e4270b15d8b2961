//! Kubernetes Events (events.k8s.io/v1) on the policies this node cannot enforce as written:
//! a NetworkPolicy or ClusterNetworkPolicy that is invalid (enforced fail-closed; reason
//! `InvalidPolicy`) and a policy isolating a local pod the node could not program (its entries
//! do not fit the maps, an attach failed; reason `NotEnforced`). Each Event's note is the
//! daemon's log line about the problem. An Event on a ClusterNetworkPolicy (cluster-scoped) is
//! in namespace `default`, as kube's Recorder puts Events on cluster-scoped objects.
//!
//! The daemon hands the current problems over after each load ([`KubeEvents::loaded`]) and each
//! sync ([`KubeEvents::synced`]); that never blocks its loop: a task on a runtime of its own reads
//! the latest set from a watch channel (a set it had no time for is superseded, not queued) and
//! writes the Events through kube's [`Recorder`], one recorder per problem (same policy, reason and
//! message): one Event when the problem appears, its series patched every [`Limits::refresh`]
//! while it stays, nothing once it is gone. A token bucket bounds the Events written per node;
//! what it holds back is counted (`netpol_kube_events_dropped_total`) and tried again a refresh
//! later. Manifests mode has no API server: [`KubeEvents::disabled`] does nothing.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::compiler::NodePolicy;
use crate::model::{self, invalid_cluster_policy_message, invalid_policy_message, Cluster, Kind, ObjKey};

/// What the ClusterRole grants the reporter, as (API group, resource, verbs): nothing else
/// (checked against deploy/ by a test).
pub const EVENTS_RULE: (&str, &str, &[&str]) = ("events.k8s.io", "events", &["create", "patch"]);

/// The Events' `reportingController` (the instance is the node's name).
pub const REPORTING_CONTROLLER: &str = "netpol.io/netpol-daemon";

/// The API server refuses an Event note longer than this (bytes).
const NOTE_MAX: usize = 1024;

/// How long kube's [`Recorder`] remembers an Event it wrote: publishing the same event again
/// within it patches the Event's series, later it creates a new Event.
const RECORDER_CACHE: Duration = Duration::from_secs(6 * 60);

/// Why a policy is not enforced as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// It failed validation: enforced fail-closed (it isolates what it selects, allows nothing).
    InvalidPolicy,
    /// A pod it isolates could not be programmed on this node (maps full: the pod fails closed).
    NotEnforced,
}

impl Reason {
    /// The Event's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidPolicy => "InvalidPolicy",
            Reason::NotEnforced => "NotEnforced",
        }
    }

    /// The Event's `action`: what the daemon did about it.
    pub fn action(self) -> &'static str {
        match self {
            Reason::InvalidPolicy => "EnforceFailClosed",
            Reason::NotEnforced => "Program",
        }
    }
}

/// One problem with one policy, as an Event reports it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Problem {
    /// [`Kind::Policy`] (a NetworkPolicy) or [`Kind::ClusterPolicy`] (its `policy` key has no
    /// namespace).
    pub kind: Kind,
    pub policy: ObjKey,
    pub reason: Reason,
    /// The log line's message (the Event's note).
    pub message: String,
}

impl Problem {
    /// The policy, as the log names it: `NetworkPolicy NS/NAME`, `ClusterNetworkPolicy NAME`.
    pub fn policy_name(&self) -> String {
        match self.kind {
            Kind::ClusterPolicy => format!("{} {}", model::CLUSTER_POLICY_KIND, self.policy.name),
            _ => format!("NetworkPolicy {}", self.policy),
        }
    }
}

/// The invalid NetworkPolicies and ClusterNetworkPolicies of the model, each with its first
/// load error.
pub fn invalid_policies(cluster: &Cluster) -> Vec<Problem> {
    let invalid =
        |kind, policy: ObjKey, message: Option<String>| Some(Problem { kind, policy, reason: Reason::InvalidPolicy, message: message? });
    let policies = cluster.policies.values().filter_map(|p| invalid(Kind::Policy, p.key.clone(), invalid_policy_message(p)));
    let cluster_policies = cluster
        .cluster_policies
        .values()
        .filter_map(|p| invalid(Kind::ClusterPolicy, ObjKey::new("", p.name.clone()), invalid_cluster_policy_message(p)));
    policies.chain(cluster_policies).collect()
}

/// The policies a sync could not enforce: each policy isolating a local pod that one of the
/// sync's `errors` names (`NS/POD: ...`: its entries do not fit the maps, it could not be
/// attached), with the error of the first such pod (by key).
pub fn not_enforced(node: &NodePolicy, errors: &[String]) -> Vec<Problem> {
    if errors.is_empty() {
        return Vec::new();
    }
    let mut first: BTreeMap<&ObjKey, &String> = BTreeMap::new();
    for (pod, compiled) in node.pods.iter().filter(|(_, c)| c.pending.is_none()) {
        let prefix = format!("{pod}: ");
        let Some(line) = errors.iter().find(|e| e.starts_with(&prefix)) else { continue };
        for dir in [&compiled.ingress, &compiled.egress].into_iter().flatten() {
            for policy in &dir.policies {
                first.entry(policy).or_insert(line);
            }
        }
    }
    first
        .into_iter()
        .map(|(p, m)| Problem { kind: Kind::Policy, policy: p.clone(), reason: Reason::NotEnforced, message: m.clone() })
        .collect()
}

/// How many Events a node writes, and how often a problem that stays is said again.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Events (creations and series patches) written at once before the rate applies.
    pub burst: u32,
    /// Events written per minute after the burst.
    pub per_minute: u32,
    /// A problem still there after this long is published again (its Event's series patched
    /// while under the Recorder's six minutes).
    pub refresh: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { burst: 25, per_minute: 10, refresh: Duration::from_secs(5 * 60) }
    }
}

/// What the reporter did, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub created: AtomicU64,
    pub patched: AtomicU64,
    /// Held back by the rate limit.
    pub rate_limited: AtomicU64,
    /// Refused by the API server (or it was unreachable).
    pub failed: AtomicU64,
}

impl Counters {
    pub fn families(&self, out: &mut super::render::Families) {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        out.counter(
            "netpol_kube_events_total",
            "Kubernetes Events written on policies (NetworkPolicies, ClusterNetworkPolicies) this node cannot enforce as written: created, or an Event's series patched (the problem still there).",
        )
        .sample(&[("verb", "create")], n(&self.created))
        .sample(&[("verb", "patch")], n(&self.patched));
        out.counter(
            "netpol_kube_events_dropped_total",
            "Kubernetes Events not written: over the rate limit (tried again later), or failed (refused by the API server, or it was unreachable).",
        )
        .sample(&[("reason", "rate_limited")], n(&self.rate_limited))
        .sample(&[("reason", "failed")], n(&self.failed));
    }
}

/// The daemon's handle on the reporter.
pub struct KubeEvents {
    /// `None`: disabled.
    tx: Option<watch::Sender<Vec<Problem>>>,
    /// The problems of the last load and of the last sync.
    loaded: Vec<Problem>,
    synced: Vec<Problem>,
    _rt: Option<tokio::runtime::Runtime>,
}

impl KubeEvents {
    /// Reports nothing (manifests mode).
    pub fn disabled() -> KubeEvents {
        KubeEvents { tx: None, loaded: Vec::new(), synced: Vec::new(), _rt: None }
    }

    /// Connects with in-cluster config or KUBECONFIG, on a runtime of its own (one thread).
    pub fn start(node: &str, counters: Arc<Counters>) -> Result<KubeEvents> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().thread_name("kube-events").build()?;
        let client = rt.block_on(Client::try_default()).context("Kubernetes client for Events (in-cluster config or KUBECONFIG)")?;
        let mut events = KubeEvents::spawn(rt.handle(), client, node, Limits::default(), counters);
        events._rt = Some(rt);
        Ok(events)
    }

    /// Starts the reporting task on `rt`, writing through `client` as node `node`.
    pub fn spawn(rt: &tokio::runtime::Handle, client: Client, node: &str, limits: Limits, counters: Arc<Counters>) -> KubeEvents {
        let (tx, rx) = watch::channel(Vec::new());
        let reporter = Reporter { controller: REPORTING_CONTROLLER.into(), instance: Some(node.to_string()) };
        let task = Task { client, reporter, limits, counters, bucket: Bucket::new(limits), tracked: BTreeMap::new(), failing: false };
        rt.spawn(task.run(rx));
        KubeEvents { tx: Some(tx), loaded: Vec::new(), synced: Vec::new(), _rt: None }
    }

    /// The problems the last load found (replacing those of the load before).
    pub fn loaded(&mut self, problems: Vec<Problem>) {
        if self.tx.is_some() && problems != self.loaded {
            self.loaded = problems;
            self.send();
        }
    }

    /// The problems the last sync found (replacing those of the sync before).
    pub fn synced(&mut self, problems: Vec<Problem>) {
        if self.tx.is_some() && problems != self.synced {
            self.synced = problems;
            self.send();
        }
    }

    fn send(&self) {
        if let Some(tx) = &self.tx {
            tx.send_replace(self.loaded.iter().chain(&self.synced).cloned().collect());
        }
    }
}

/// A token bucket: `burst` tokens, refilled at `per_minute`.
struct Bucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    at: Instant,
}

impl Bucket {
    fn new(l: Limits) -> Bucket {
        Bucket { tokens: l.burst as f64, burst: l.burst as f64, per_sec: l.per_minute as f64 / 60.0, at: Instant::now() }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_sec).min(self.burst);
        self.at = now;
        let ok = self.tokens >= 1.0;
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }
}

/// A problem being reported.
struct Tracked {
    /// Its own recorder: kube's dedups on the object, reason and action but not the note, and
    /// would patch an older Event of the policy (with its old note) for a new message.
    recorder: Recorder,
    /// The policy as the Events regard it (with its uid, looked up once).
    regarding: Option<ObjectReference>,
    /// When it is published (again).
    next: Instant,
    /// When an Event on it was last written.
    written: Option<Instant>,
}

/// The reporting task: the problems reported now, and what was written about them.
struct Task {
    client: Client,
    reporter: Reporter,
    limits: Limits,
    counters: Arc<Counters>,
    bucket: Bucket,
    tracked: BTreeMap<Problem, Tracked>,
    /// The last write failed (logged once until one succeeds).
    failing: bool,
}

impl Task {
    /// Until the daemon's handle is dropped: takes each new set of problems, writes what is due.
    async fn run(mut self, mut rx: watch::Receiver<Vec<Problem>>) {
        loop {
            let wake = self.tracked.values().map(|t| t.next).min();
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let problems = rx.borrow_and_update().clone();
                    self.track(problems);
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
            }
            self.publish_due().await;
        }
    }

    /// Follows exactly `problems`: new ones are due now, those gone are forgotten.
    fn track(&mut self, problems: Vec<Problem>) {
        let now = Instant::now();
        let problems: BTreeSet<Problem> = problems.into_iter().collect();
        self.tracked.retain(|p, _| problems.contains(p));
        for p in problems {
            let recorder = || Recorder::new(self.client.clone(), self.reporter.clone());
            self.tracked.entry(p).or_insert_with(|| Tracked { recorder: recorder(), regarding: None, next: now, written: None });
        }
    }

    /// Publishes every problem due, those never written first, as far as the rate allows; the
    /// rest wait for the next refresh.
    async fn publish_due(&mut self) {
        let now = Instant::now();
        let mut due: Vec<(bool, Problem)> =
            self.tracked.iter().filter(|(_, t)| t.next <= now).map(|(p, t)| (t.written.is_some(), p.clone())).collect();
        due.sort_by_key(|(written, _)| *written);
        for (_, p) in due {
            let Some(t) = self.tracked.get_mut(&p) else { continue };
            t.next = now + self.limits.refresh;
            if !self.bucket.take() {
                self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.publish(&p).await;
        }
    }

    /// Writes one Event (or patches its series).
    async fn publish(&mut self, p: &Problem) {
        let Some(regarding) = self.regarding(p).await else { return };
        let Some(t) = self.tracked.get_mut(p) else { return };
        let ev = Event {
            type_: EventType::Warning,
            reason: p.reason.as_str().into(),
            note: Some(truncated(&p.message, NOTE_MAX).to_string()),
            action: p.reason.action().into(),
            secondary: None,
        };
        let repeat = t.written.is_some_and(|at| at.elapsed() < RECORDER_CACHE);
        match t.recorder.publish(&ev, &regarding).await {
            Ok(()) => {
                t.written = Some(Instant::now());
                let counter = if repeat { &self.counters.patched } else { &self.counters.created };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("Kubernetes Event {} on {}: {}", p.reason.as_str(), p.policy_name(), p.message);
                self.failing = false;
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!("writing a Kubernetes Event on {}: {e} (further failures are counted, not logged)", p.policy_name());
                }
            }
        }
    }

    /// The policy as its Events regard it; its uid is looked up once (what `kubectl describe`
    /// matches Events on). `None`: the policy is gone.
    async fn regarding(&mut self, p: &Problem) -> Option<ObjectReference> {
        if let Some(r) = self.tracked.get(p).and_then(|t| t.regarding.clone()) {
            return Some(r);
        }
        let uid = match self.policy_uid(p).await {
            Ok(Some(uid)) => uid,
            Ok(None) => return None,
            // Unreachable, say: the Event without the uid.
            Err(_) => None,
        };
        let (api_version, kind, namespace) = match p.kind {
            Kind::ClusterPolicy => (model::CLUSTER_POLICY_API_VERSION, model::CLUSTER_POLICY_KIND, None),
            _ => ("networking.k8s.io/v1", "NetworkPolicy", Some(p.policy.namespace.clone())),
        };
        let r = ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            namespace,
            name: Some(p.policy.name.clone()),
            uid: uid.clone(),
            ..Default::default()
        };
        if uid.is_some() {
            self.tracked.get_mut(p)?.regarding = Some(r.clone());
        }
        Some(r)
    }
}

impl Task {
    /// The uid of the policy `p` is about (`Ok(None)`: it is gone).
    async fn policy_uid(&self, p: &Problem) -> kube::Result<Option<Option<String>>> {
        let name = &p.policy.name;
        Ok(match p.kind {
            Kind::ClusterPolicy => {
                let gvk = GroupVersionKind::gvk(model::CLUSTER_POLICY_GROUP, model::CLUSTER_POLICY_VERSION, model::CLUSTER_POLICY_KIND);
                let resource = ApiResource::from_gvk_with_plural(&gvk, model::CLUSTER_POLICY_PLURAL);
                let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
                api.get_opt(name).await?.map(|o| o.metadata.uid)
            }
            _ => {
                let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &p.policy.namespace);
                api.get_opt(name).await?.map(|np| np.metadata.uid)
            }
        })
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_errors_name_the_policies_isolating_the_pods() {
        use crate::compiler::{CompiledPod, DirPolicy};
        let key = |n: &str| ObjKey::new("a", n);
        let dir = |ps: &[&str]| Some(DirPolicy { policies: ps.iter().map(|p| key(p)).collect(), ..Default::default() });
        let mut node = NodePolicy::default();
        node.pods.insert(
            key("web"),
            CompiledPod { key: key("web"), ingress: dir(&["deny", "api"]), egress: dir(&["out"]), ..Default::default() },
        );
        node.pods.insert(key("db"), CompiledPod { key: key("db"), ingress: dir(&["deny"]), ..Default::default() });
        node.pods.insert(key("open"), CompiledPod { key: key("open"), ..Default::default() });
        let errors = [
            "a/web: needs 9 POLICY entries (policies: a/api, a/deny, a/out); failing closed",
            "a/open: ENDPOINTS insert: E2BIG",
            "IDENTITIES insert: x",
        ]
        .map(String::from);
        let got: Vec<(String, String)> = not_enforced(&node, &errors).into_iter().map(|p| (p.policy.name, p.message)).collect();
        let web = errors[0].clone();
        assert_eq!(got, [("api".into(), web.clone()), ("deny".into(), web.clone()), ("out".into(), web)]);
        // a/db first by key: deny's message is db's once db fails too.
        let errors = [errors[0].clone(), "a/db: failing closed (policies: a/deny)".into()];
        let deny = not_enforced(&node, &errors).into_iter().find(|p| p.policy.name == "deny").unwrap();
        assert_eq!((deny.reason, deny.message.as_str()), (Reason::NotEnforced, errors[1].as_str()));
        assert!(not_enforced(&node, &[]).is_empty());
    }

    #[test]
    fn the_bucket_holds_a_burst_then_refills() {
        let mut b = Bucket::new(Limits { burst: 3, per_minute: 60, refresh: Duration::from_secs(1) });
        assert_eq!((0..5).filter(|_| b.take()).count(), 3);
        b.at -= Duration::from_millis(2100);
        assert_eq!((0..5).filter(|_| b.take()).count(), 2);
    }

    #[test]
    fn notes_are_cut_at_a_character_boundary() {
        assert_eq!(truncated("abc", 10), "abc");
        assert_eq!(truncated("aé", 2), "a");
        assert_eq!(truncated(&"x".repeat(2000), NOTE_MAX).len(), NOTE_MAX);
    }
}

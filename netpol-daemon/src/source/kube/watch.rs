//! One watcher per kind (kube-rs `watcher`: list, then watch, relisting with backoff after an
//! error or a `410 Gone`), each turning what it hears into [`Change`]s on the [`Inbox`] the
//! daemon waits on. Objects are converted to the model's slim form here, as they arrive, and
//! the API's copy is dropped: nothing else keeps them.
//!
//! A resource of a CRD that may not be installed (ClusterNetworkPolicy) is watched by
//! [`spawn_optional`]: a `404 Not Found` is "not installed" (an empty list, not a failure),
//! checked again every so often, and the CRD's removal drops every object of it.
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use kube::api::DynamicObject;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource};

use crate::model::{self, ApiObject, Converted, Kind, ObjKey, Object};

/// One object as the API server now has it, converted (its `object` is `None` when the model
/// keeps nothing of it: a finished pod, an invalid object other than a policy, ...).
pub struct Record {
    pub kind: Kind,
    pub key: ObjKey,
    pub converted: Converted,
}

/// What a watcher heard.
pub enum Change {
    /// An object added or modified.
    Put(Box<Record>),
    /// An object deleted.
    Gone(Kind, ObjKey),
    /// A complete list of `kind` (the first one, or a relist after an error or a `410 Gone`):
    /// what it does not hold is gone.
    Listed(Kind, Vec<Record>),
}

/// The changes not yet taken by the daemon, each with its arrival time.
#[derive(Default)]
pub struct Queue {
    pub changes: VecDeque<(Instant, Change)>,
    /// The kinds whose first list is in `changes` (or taken).
    pub listed: HashSet<Kind>,
}

impl Queue {
    /// Every kind has been listed once: the model can be programmed from.
    pub fn complete(&self) -> bool {
        self.listed.len() == WATCHED
    }
}

/// The queue and the condition variable the daemon loop sleeps on.
#[derive(Default)]
pub struct Inbox {
    pub queue: Mutex<Queue>,
    pub arrived: Condvar,
}

impl Inbox {
    fn push(&self, change: Change) {
        let mut q = self.queue.lock().unwrap();
        if let Change::Listed(kind, _) = &change {
            q.listed.insert(*kind);
        }
        q.changes.push_back((Instant::now(), change));
        self.arrived.notify_one();
    }
}

/// Whether the API server answers, and how many times a watch failed.
#[derive(Default)]
pub struct Health {
    /// One bit per watcher whose last outcome was an error, and one for the version probe:
    /// the source is healthy only when every watch works (one watch still backing off after
    /// an outage while the others resumed is not "up").
    failing: AtomicU32,
    /// Watch errors so far (each followed by a relist with backoff).
    pub errors: AtomicU64,
}

/// How many kinds are watched: all of them.
const WATCHED: usize = Kind::ALL.len();

/// The version probe's bit in [`Health::failing`], past the watchers' (one per [`Kind`]).
const PROBE: u32 = 1 << Kind::ALL.len();

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    pub fn healthy(&self) -> bool {
        self.failing.load(Ordering::SeqCst) == 0
    }

    /// Records the last outcome of `kind`'s watch; an event also shows the server answers.
    fn watch(&self, kind: Kind, ok: bool) {
        self.set(1 << kind as u32 | if ok { PROBE } else { 0 }, ok);
    }

    /// Records the outcome of a version probe; whether the source's health changed. A watch
    /// that resumes quietly after an outage shows nothing, so an answer clears every bit (a
    /// watch still failing sets its bit again at its next try, and counts an error).
    fn probe(&self, ok: bool) -> bool {
        let before = self.healthy();
        self.set(if ok { u32::MAX } else { PROBE }, ok);
        before != self.healthy()
    }

    fn set(&self, bit: u32, ok: bool) {
        if ok {
            self.failing.fetch_and(!bit, Ordering::SeqCst);
        } else {
            self.failing.fetch_or(bit, Ordering::SeqCst);
        }
    }
}

/// What a watcher needs besides its API: where changes go, health, and the node (pods of
/// other nodes are kept slimmer).
#[derive(Clone)]
pub struct Sink {
    pub inbox: Arc<Inbox>,
    pub health: Arc<Health>,
    pub node: Arc<str>,
}

/// One object as converted; a pod of another node keeps only what rules match on (labels,
/// namespace, addresses, named container ports). Warnings are logged once per text.
fn record(kind: Kind, key: ObjKey, mut converted: Converted, node: &str, warned: &mut HashSet<String>) -> Record {
    for w in std::mem::take(&mut converted.warnings) {
        if warned.insert(w.clone()) {
            tracing::warn!("{w}");
        }
    }
    if let Some(Object::Pod(p)) = &mut converted.object {
        if !p.is_on(node) {
            p.ports.retain(|cp| cp.name.is_some());
            p.ports.shrink_to_fit();
        }
    }
    Record { kind, key, converted }
}

/// The key the model gives `obj` ([`Object::key`]: a cluster-scoped object's has no namespace).
fn key_of<K: Resource>(kind: Kind, obj: &K) -> ObjKey {
    let meta = obj.meta();
    let name = meta.name.clone().unwrap_or_default();
    match kind.cluster_scoped() {
        true => ObjKey::new("", name),
        false => ObjKey::new(meta.namespace.clone().unwrap_or_default(), name),
    }
}

/// Starts watching `api` as `kind` on `rt`: every event becomes a [`Change`] on the sink's
/// inbox; an initial list (or relist) is one [`Change::Listed`], delivered once complete.
pub fn spawn<K>(rt: &tokio::runtime::Runtime, api: Api<K>, cfg: watcher::Config, kind: Kind, sink: Sink)
where
    K: ApiObject + Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let stream = watcher(api, cfg).default_backoff();
    let what = K::plural(&Default::default()).to_string();
    rt.spawn(async move {
        follow(stream, Watch { kind, what: &what, sink: &sink, optional: false }, |o: &K| model::from_k8s(o)).await;
    });
}

/// A resource of a CRD, watched whether or not the CRD is installed: `api`'s resource, read
/// as `kind` by `convert` (from the object's JSON: there is no typed object), `what` naming it
/// in the log. While the API server answers `404 Not Found` (the CRD is not installed, or was
/// removed) the kind is listed empty: none of its objects is in the model, the source stays
/// healthy and ready; every `recheck` the watch is tried again.
pub fn spawn_optional(
    rt: &tokio::runtime::Runtime,
    api: Api<DynamicObject>,
    kind: Kind,
    what: &'static str,
    convert: fn(&serde_json::Value) -> Converted,
    sink: Sink,
    recheck: Duration,
) {
    rt.spawn(async move {
        let convert = |o: &DynamicObject| match serde_json::to_value(o) {
            Ok(v) => convert(&v),
            Err(e) => Converted { errors: vec![format!("{what} {}: {e}", key_of(kind, o))], ..Default::default() },
        };
        let mut first = true;
        loop {
            let stream = watcher(api.clone(), watcher::Config::default()).default_backoff();
            let listed = follow(stream, Watch { kind, what, sink: &sink, optional: true }, convert).await;
            // Not found: nothing of it is in the cluster (any more). Said once, until a list
            // shows the CRD installed again.
            sink.health.watch(kind, true);
            if listed || first {
                sink.inbox.push(Change::Listed(kind, Vec::new()));
                if listed {
                    tracing::warn!("{what}: the CRD was removed: none is enforced any more (checking again every {recheck:?})");
                } else {
                    tracing::info!("{what}: the CRD is not installed: none is enforced (checking again every {recheck:?})");
                }
            }
            first = false;
            tokio::time::sleep(recheck).await;
        }
    });
}

/// What [`follow`] follows: the kind, its name for the log, where changes go, and whether a
/// `404 Not Found` ends it (an optional resource, [`spawn_optional`]).
struct Watch<'a> {
    kind: Kind,
    what: &'a str,
    sink: &'a Sink,
    optional: bool,
}

/// A `404 Not Found` from the API server: the resource is not served (a CRD not installed).
fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// Turns the watcher's events into changes on the inbox until the stream ends (it does not:
/// the watcher retries with backoff) or, for an optional resource, the API server answers
/// `404 Not Found`; then returns whether a list of it was delivered.
async fn follow<K: Resource>(
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    w: Watch<'_>,
    convert: impl Fn(&K) -> Converted,
) -> bool {
    let (kind, sink) = (w.kind, w.sink);
    let mut stream = std::pin::pin!(stream);
    let mut warned = HashSet::new();
    let mut listing: Option<Vec<Record>> = None;
    let mut listed = false;
    let mut rec = |o: &K| record(kind, key_of(kind, o), convert(o), &sink.node, &mut warned);
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) if w.optional && not_found(&e) => return listed,
            Err(e) => {
                sink.health.errors.fetch_add(1, Ordering::SeqCst);
                sink.health.watch(kind, false);
                tracing::warn!("watch {}: {e}; keeping the last state, relisting with backoff", w.what);
                continue;
            }
        };
        sink.health.watch(kind, true);
        match ev {
            Event::Apply(o) => sink.inbox.push(Change::Put(Box::new(rec(&o)))),
            Event::Delete(o) => sink.inbox.push(Change::Gone(kind, key_of(kind, &o))),
            Event::Init => listing = Some(Vec::new()),
            Event::InitApply(o) => listing.get_or_insert_with(Vec::new).push(rec(&o)),
            Event::InitDone => {
                if w.optional && !listed {
                    tracing::info!("{}: the CRD is installed: watching", w.what);
                }
                listed = true;
                sink.inbox.push(Change::Listed(kind, listing.take().unwrap_or_default()))
            }
        }
    }
    listed
}

/// Asks the API server for its version every `every`: a watch that resumes quietly after an
/// outage produces no event, so reachability is probed apart.
pub fn probe(rt: &tokio::runtime::Runtime, client: kube::Client, health: Arc<Health>, every: Duration) {
    rt.spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let ok = client.apiserver_version().await.is_ok();
            if health.probe(ok) {
                tracing::info!("Kubernetes API {}", if health.healthy() { "reachable again" } else { "unreachable" });
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_up_only_while_every_watch_and_the_probe_work() {
        let h = Health::new();
        assert!(h.healthy());
        h.watch(Kind::Pod, false);
        h.watch(Kind::Service, false);
        // Pods resumed; services still back off: not up yet.
        h.watch(Kind::Pod, true);
        assert!(!h.healthy(), "one watch's event does not hide another's failure");
        h.watch(Kind::Service, true);
        assert!(h.healthy());
        assert!(h.probe(false), "a failed probe takes the source down");
        assert!(!h.probe(false), "and reports no change while it stays down");
        h.watch(Kind::Namespace, true);
        assert!(h.healthy(), "an event shows the server answers, as a probe would");
        // A watch that resumed quietly is cleared by the next probe that is answered.
        h.watch(Kind::Policy, false);
        assert!(h.probe(true));
        assert!(h.healthy());
    }
}

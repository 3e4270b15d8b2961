//! One watcher per kind (kube-rs `watcher`: list, then watch, relisting with backoff after an
//! error or a `410 Gone`), each turning what it hears into [`Change`]s on the [`Inbox`] the
//! daemon waits on. Objects are converted to the model's slim form here, as they arrive, and
//! the API's copy is dropped: nothing else keeps them.
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
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

/// How many kinds are watched: all but ClusterNetworkPolicy, not enforced yet (issue 22).
const WATCHED: usize = Kind::ALL.len() - 1;

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

/// Converts one API object; a pod of another node keeps only what rules match on (labels,
/// namespace, addresses, named container ports). Warnings are logged once per text.
fn record<K: ApiObject + Resource>(kind: Kind, obj: &K, node: &str, warned: &mut HashSet<String>) -> Record {
    let mut converted = model::from_k8s(obj);
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
    Record { kind, key: key_of(kind, obj), converted }
}

/// The key the model gives `obj` ([`Object::key`]: a namespace's has no namespace).
fn key_of<K: Resource>(kind: Kind, obj: &K) -> ObjKey {
    let meta = obj.meta();
    let name = meta.name.clone().unwrap_or_default();
    match kind {
        Kind::Namespace => ObjKey::new("", name),
        _ => ObjKey::new(meta.namespace.clone().unwrap_or_default(), name),
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
    rt.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut warned = HashSet::new();
        let mut listing: Option<Vec<Record>> = None;
        while let Some(ev) = stream.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    sink.health.errors.fetch_add(1, Ordering::SeqCst);
                    sink.health.watch(kind, false);
                    tracing::warn!("watch {}: {e}; keeping the last state, relisting with backoff", K::plural(&Default::default()));
                    continue;
                }
            };
            sink.health.watch(kind, true);
            match ev {
                Event::Apply(o) => sink.inbox.push(Change::Put(Box::new(record(kind, &o, &sink.node, &mut warned)))),
                Event::Delete(o) => sink.inbox.push(Change::Gone(kind, key_of(kind, &o))),
                Event::Init => listing = Some(Vec::new()),
                Event::InitApply(o) => listing.get_or_insert_with(Vec::new).push(record(kind, &o, &sink.node, &mut warned)),
                Event::InitDone => sink.inbox.push(Change::Listed(kind, listing.take().unwrap_or_default())),
            }
        }
    });
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

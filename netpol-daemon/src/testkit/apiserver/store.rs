//! The stand-in API server's storage, modelled on etcd behind the real one: one global
//! resourceVersion counter bumped by every change, the current objects of each resource and,
//! per resource, the log of changes since the last compaction. The log is what makes a
//! consistent paged list possible (a page at an older resourceVersion is the current state
//! with the later changes undone) and what a watch resumes from; compaction forgets it, so
//! both then answer 410 Gone, as etcd does once a revision is compacted away.
//!
//! Every open watch stream has a queue here that each change is pushed onto while the store is
//! locked, so a stream that caught up from the log never misses or repeats a change, and a
//! compaction never affects a stream that is already following.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use serde_json::{json, Value};

/// A resource type served: where it lives in the API and what its objects are called.
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    /// The URL segment: `pods`, `networkpolicies`, ...
    pub plural: &'static str,
    /// API group, empty for the core group (`/api/v1`).
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Defined by a CRD: served only once installed ([`Store::install`]); until then (and once
    /// the CRD is removed) the API server answers 404, as for any path it does not serve.
    pub crd: bool,
}

const fn builtin(plural: &'static str, group: &'static str, kind: &'static str, namespaced: bool) -> Resource {
    Resource { plural, group, version: "v1", kind, namespaced, crd: false }
}

/// Everything the server serves: what netpol watches, plus events.k8s.io Events (recorded for
/// tests of the daemon's Kubernetes Events).
pub const RESOURCES: &[Resource] = &[
    builtin("namespaces", "", "Namespace", false),
    builtin("pods", "", "Pod", true),
    builtin("services", "", "Service", true),
    builtin("nodes", "", "Node", false),
    builtin("endpointslices", "discovery.k8s.io", "EndpointSlice", true),
    builtin("networkpolicies", "networking.k8s.io", "NetworkPolicy", true),
    builtin("events", "events.k8s.io", "Event", true),
    Resource {
        plural: "clusternetworkpolicies",
        group: "policy.networking.k8s.io",
        version: "v1alpha2",
        kind: "ClusterNetworkPolicy",
        namespaced: false,
        crd: true,
    },
];

impl Resource {
    /// The resource with this plural name (`pods`), if served.
    pub fn named(plural: &str) -> Option<&'static Resource> {
        RESOURCES.iter().find(|r| r.plural == plural)
    }

    /// The resource whose objects have this `kind` (`Pod`), if served.
    pub fn of_kind(kind: &str) -> Option<&'static Resource> {
        RESOURCES.iter().find(|r| r.kind == kind)
    }

    /// `v1` or `group/version`, as in an object's `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The store key: `namespace/name`, or `name` for a cluster-scoped resource (etcd's order).
    pub fn key(&self, namespace: &str, name: &str) -> String {
        if self.namespaced {
            format!("{namespace}/{name}")
        } else {
            name.to_string()
        }
    }
}

/// Why a request cannot be served: the API server's `Status` object.
#[derive(Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    /// 410 Gone, reason Expired: the resourceVersion asked for is older than the compaction.
    pub fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    /// The message the real server gives for a watch or an exact list from a compacted version.
    pub fn too_old(rv: u64, compacted: u64) -> ApiError {
        ApiError::expired(format!("too old resource version: {rv} ({compacted})"))
    }

    pub fn not_found(res: &Resource, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("{}.{} \"{name}\" not found", res.plural, res.group))
    }

    /// The `Status` object sent as a response body or in a watch ERROR event.
    pub fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One entry of a resource's change log.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub kind: ChangeType,
    pub key: String,
    /// The object after the change; for a deletion its last state, stamped with the deletion's
    /// resourceVersion (what a DELETED watch event carries).
    pub object: Arc<Value>,
    /// The object before the change (None when it was added).
    pub prev: Option<Arc<Value>>,
}

/// One page of a list: the objects at `rv` and, when more follow, the key of the last one.
pub struct Page {
    pub rv: u64,
    pub items: Vec<Arc<Value>>,
    pub last_key: Option<String>,
}

#[derive(Default)]
struct Table {
    objects: BTreeMap<String, Arc<Value>>,
    log: VecDeque<Change>,
}

impl Table {
    /// What the later changes overwrote: key -> its state at `rv` (None: it did not exist).
    fn undo_after(&self, rv: u64) -> BTreeMap<String, Option<Arc<Value>>> {
        let first = self.log.partition_point(|c| c.rv <= rv);
        let mut undo = BTreeMap::new();
        // Backwards, so the earliest change after `rv` has the last word: its `prev`.
        for c in self.log.range(first..).rev() {
            undo.insert(c.key.clone(), c.prev.clone());
        }
        undo
    }
}

/// The queue of an open watch stream.
struct WatchQueue {
    resource: &'static str,
    epoch: u64,
    pending: Vec<Change>,
    /// The stream is to end (cleanly) once its pending changes are sent: its resource's CRD
    /// was removed.
    ended: bool,
}

/// What an open watch stream is to send: the changes queued for it, the resourceVersion all
/// changes up to which have been queued, and whether it ends after them.
pub struct Pending {
    pub changes: Vec<Change>,
    pub rv: u64,
    pub ended: bool,
}

pub struct Store {
    rv: u64,
    /// Changes up to this resourceVersion are forgotten.
    compacted: u64,
    /// Bumped when the server cuts every connection: streams of an older epoch end.
    epoch: u64,
    tables: HashMap<&'static str, Table>,
    watchers: HashMap<u64, WatchQueue>,
    next_watcher: u64,
    /// The CRD resources installed (by plural).
    installed: std::collections::HashSet<&'static str>,
}

impl Store {
    pub fn new() -> Store {
        let tables = RESOURCES.iter().map(|r| (r.plural, Table::default())).collect();
        // Starts above 0: "0" means "any version" to the API.
        Store { rv: 1, compacted: 0, epoch: 0, tables, watchers: HashMap::new(), next_watcher: 0, installed: Default::default() }
    }

    /// `res` is served: built in, or its CRD installed.
    pub fn served(&self, res: &Resource) -> bool {
        !res.crd || self.installed.contains(res.plural)
    }

    /// Installs the CRD of `res`: it is served from now on.
    pub fn install(&mut self, res: &'static Resource) {
        assert!(res.crd, "{} is built in, not defined by a CRD", res.plural);
        self.installed.insert(res.plural);
    }

    /// Removes the CRD of `res`, as the real server does: every object of it is deleted (a
    /// DELETED event each), then the open watch streams on it end and it is no longer served.
    pub fn uninstall(&mut self, res: &'static Resource) {
        let keys: Vec<String> = self.table(res).objects.keys().cloned().collect();
        for key in keys {
            self.delete(res, &key);
        }
        for w in self.watchers.values_mut().filter(|w| w.resource == res.plural) {
            w.ended = true;
        }
        self.installed.remove(res.plural);
    }

    /// The current (latest) resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Every resourceVersion below this one is expired.
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    fn table(&self, res: &Resource) -> &Table {
        &self.tables[res.plural]
    }

    pub fn get(&self, res: &Resource, key: &str) -> Option<Arc<Value>> {
        self.table(res).objects.get(key).cloned()
    }

    pub fn objects(&self, res: &Resource) -> Vec<Arc<Value>> {
        self.table(res).objects.values().cloned().collect()
    }

    /// Creates or replaces `obj` (its metadata says which); an identical replacement is no
    /// change, as on the real server. The stored object carries its new resourceVersion, a uid,
    /// and `apiVersion`/`kind`.
    pub fn put(&mut self, res: &'static Resource, mut obj: Value) -> Result<Arc<Value>, ApiError> {
        if !self.served(res) {
            return Err(ApiError::new(404, "NotFound", format!("{}.{}: the CRD is not installed", res.plural, res.group)));
        }
        let key = object_key(res, &obj)?;
        let prev = self.table(res).objects.get(&key).cloned();
        obj["apiVersion"] = res.api_version().into();
        obj["kind"] = res.kind.into();
        if res.plural == "namespaces" {
            // The label every namespace carries (set by the real server since 1.21).
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = obj["metadata"]["name"].clone();
        }
        let meta = &mut obj["metadata"];
        match &prev {
            Some(p) => {
                meta["uid"] = p["metadata"]["uid"].clone();
                meta["resourceVersion"] = p["metadata"]["resourceVersion"].clone();
                if **p == obj {
                    return Ok(p.clone());
                }
            }
            None => meta["uid"] = format!("uid-{}-{}", res.plural, self.rv + 1).into(),
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = self.rv.to_string().into();
        let obj = Arc::new(obj);
        self.tables.get_mut(res.plural).unwrap().objects.insert(key.clone(), obj.clone());
        let kind = if prev.is_some() { ChangeType::Modified } else { ChangeType::Added };
        self.record(res, Change { rv: self.rv, kind, key, object: obj.clone(), prev });
        Ok(obj)
    }

    /// Deletes the object at `key`; returns its last state, stamped with the deletion's
    /// resourceVersion.
    pub fn delete(&mut self, res: &'static Resource, key: &str) -> Option<Arc<Value>> {
        let prev = self.tables.get_mut(res.plural).unwrap().objects.remove(key)?;
        self.rv += 1;
        let mut last = (*prev).clone();
        last["metadata"]["resourceVersion"] = self.rv.to_string().into();
        let last = Arc::new(last);
        self.record(res, Change { rv: self.rv, kind: ChangeType::Deleted, key: key.to_string(), object: last.clone(), prev: Some(prev) });
        Some(last)
    }

    fn record(&mut self, res: &Resource, change: Change) {
        for w in self.watchers.values_mut().filter(|w| w.resource == res.plural) {
            w.pending.push(change.clone());
        }
        self.tables.get_mut(res.plural).unwrap().log.push_back(change);
    }

    /// Forgets every change so far: a watch or a list continued from an older resourceVersion
    /// gets 410 Gone. Open watch streams are not affected.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        for t in self.tables.values_mut() {
            t.log.clear();
        }
    }

    /// Up to `limit` objects (all without one) that `keep` accepts, after `after` in key
    /// order, as they were at `at` (the latest state when None). None when `at` is compacted.
    pub fn page(
        &self,
        res: &Resource,
        at: Option<u64>,
        after: Option<&str>,
        limit: Option<usize>,
        keep: &dyn Fn(&Value) -> bool,
    ) -> Option<Page> {
        let rv = at.unwrap_or(self.rv);
        if rv < self.compacted {
            return None;
        }
        let table = self.table(res);
        let undo = table.undo_after(rv);
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let current = table.objects.range::<str, _>((lower, Bound::Unbounded)).map(|(k, v)| (k.as_str(), Some(v)));
        let older = undo.range::<str, _>((lower, Bound::Unbounded)).map(|(k, v)| (k.as_str(), v.as_ref()));
        let mut page = Page { rv, items: Vec::new(), last_key: None };
        let mut last = None;
        for (key, obj) in overlay(current, older) {
            let Some(obj) = obj.filter(|o| keep(o)) else { continue };
            if limit.is_some_and(|l| page.items.len() == l) {
                page.last_key = last.map(str::to_string);
                break;
            }
            last = Some(key);
            page.items.push(obj.clone());
        }
        Some(page)
    }

    /// Opens a watch stream on `res` that has seen everything up to `since`: its id and the
    /// changes after `since`. None when `since` is compacted.
    pub fn watch_from(&mut self, res: &'static Resource, since: u64) -> Option<(u64, Vec<Change>)> {
        if since < self.compacted {
            return None;
        }
        let log = &self.table(res).log;
        let missed = log.range(log.partition_point(|c| c.rv <= since)..).cloned().collect();
        Some((self.open_queue(res), missed))
    }

    /// Opens a watch stream on `res` starting now: its id, the current objects and the
    /// resourceVersion they are at.
    pub fn watch_now(&mut self, res: &'static Resource) -> (u64, Vec<Arc<Value>>, u64) {
        (self.open_queue(res), self.objects(res), self.rv)
    }

    fn open_queue(&mut self, res: &'static Resource) -> u64 {
        self.next_watcher += 1;
        let queue = WatchQueue { resource: res.plural, epoch: self.epoch, pending: Vec::new(), ended: false };
        self.watchers.insert(self.next_watcher, queue);
        self.next_watcher
    }

    /// What stream `id` is to send now; None once the stream is to be cut.
    pub fn take_pending(&mut self, id: u64) -> Option<Pending> {
        let epoch = self.epoch;
        let w = self.watchers.get_mut(&id).filter(|w| w.epoch == epoch)?;
        Some(Pending { changes: std::mem::take(&mut w.pending), rv: self.rv, ended: w.ended })
    }

    pub fn close_watch(&mut self, id: u64) {
        self.watchers.remove(&id);
    }

    /// Marks every open watch stream to be cut; returns the new epoch.
    pub fn cut_watches(&mut self) -> u64 {
        self.epoch += 1;
        self.epoch
    }

    /// Some stream opened before `epoch` is still open.
    pub fn has_watches_before(&self, epoch: u64) -> bool {
        self.watchers.values().any(|w| w.epoch < epoch)
    }
}

/// `current` (key order) with the entries of `older` (key order) taking precedence, keys of
/// both merged.
fn overlay<'a, T: 'a>(
    current: impl Iterator<Item = (&'a str, Option<T>)>,
    older: impl Iterator<Item = (&'a str, Option<T>)>,
) -> impl Iterator<Item = (&'a str, Option<T>)> {
    let (mut a, mut b) = (current.peekable(), older.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some((ka, _)), Some((kb, _))) if ka < kb => a.next(),
        (Some((ka, _)), Some((kb, _))) if ka == kb => {
            a.next();
            b.next()
        }
        (Some(_), None) => a.next(),
        _ => b.next(),
    })
}

/// The store key of `obj`, from its metadata.
pub fn object_key(res: &Resource, obj: &Value) -> Result<String, ApiError> {
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().filter(|n| !n.is_empty()).ok_or_else(|| ApiError::bad_request("metadata.name: Required value"))?;
    let namespace = meta["namespace"].as_str().unwrap_or("");
    if res.namespaced && namespace.is_empty() {
        return Err(ApiError::bad_request(format!("{} {name}: metadata.namespace: Required value", res.kind)));
    }
    Ok(res.key(namespace, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(page: &Page) -> Vec<&str> {
        page.items.iter().map(|o| o["metadata"]["name"].as_str().unwrap()).collect()
    }

    #[test]
    fn pages_read_a_consistent_snapshot_until_compacted() {
        let (mut s, pods, all) = (Store::new(), Resource::named("pods").unwrap(), |_: &Value| true);
        let pod = |name: &str, v: u32| json!({"metadata": {"namespace": "a", "name": name}, "spec": {"v": v}});
        for n in ["p1", "p2", "p3", "p4"] {
            s.put(pods, pod(n, 0)).unwrap();
        }
        let rv = s.rv();
        assert_eq!(s.put(pods, pod("p1", 0)).unwrap()["metadata"]["resourceVersion"], "2", "the same object again is no change");
        assert_eq!(s.rv(), rv);
        let first = s.page(pods, None, None, Some(2), &all).unwrap();
        assert_eq!((names(&first), first.last_key.as_deref()), (vec!["p1", "p2"], Some("a/p2")));
        // Between the pages: p3 deleted, p2b added, p4 modified.
        s.delete(pods, "a/p3").unwrap();
        s.put(pods, pod("p2b", 0)).unwrap();
        s.put(pods, pod("p4", 1)).unwrap();
        let rest = s.page(pods, Some(first.rv), first.last_key.as_deref(), Some(2), &all).unwrap();
        assert_eq!((names(&rest), rest.last_key.as_deref()), (vec!["p3", "p4"], None));
        assert_eq!(rest.items[1]["spec"]["v"], 0, "p4 as it was at the first page");
        assert_eq!(names(&s.page(pods, None, None, None, &all).unwrap()), ["p1", "p2", "p2b", "p4"]);
        s.compact();
        assert!(s.page(pods, Some(first.rv), first.last_key.as_deref(), Some(2), &all).is_none());
        assert!(s.watch_from(pods, first.rv).is_none() && s.watch_from(pods, s.rv()).is_some());
    }
}

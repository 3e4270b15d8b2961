//! Watch streams (`?watch=true`), as the API server sends them: a chunked response with one
//! JSON event per line, `{"type":"ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR","object":..}`.
//!
//! - From `resourceVersion=R`: every change after R, then live changes. R older than the last
//!   compaction: a single ERROR event carrying a 410 Expired Status ("too old resource
//!   version"), then the end of the stream; the client must list again.
//! - From `""` or `"0"`, or with `sendInitialEvents=true`: an ADDED event per current object
//!   first (with sendInitialEvents, then a BOOKMARK annotated `k8s.io/initial-events-end`).
//! - `allowWatchBookmarks=true`: a BOOKMARK with the current resourceVersion every bookmark
//!   interval, so a quiet watcher can resume from a recent version.
//! - `timeoutSeconds`: the stream ends cleanly then (the connection stays usable).
//! - A selector is applied to each change's before and after: an object that stops matching
//!   is DELETED for this watcher, one that starts matching is ADDED.
//! - When the server cuts its connections the stream breaks off in the middle of an event.
//! - When a CRD is removed the streams on its resource end (after the DELETED events of its
//!   objects), as the real server ends them.
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http::{Chunked, Request};
use super::select::Filter;
use super::store::{ApiError, Change, ChangeType, Pending, Resource};
use super::{Answer, Shared};

/// What a watch request asks for.
#[derive(Debug)]
pub struct Params {
    /// Resume after this resourceVersion; None: start with the current objects.
    since: Option<u64>,
    initial_events: bool,
    bookmarks: bool,
    timeout: Duration,
}

/// The real server's default when no timeoutSeconds is given is 30 to 60 minutes.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// Validates the query of a watch request as the API server does.
pub fn params(req: &Request) -> Result<Params, ApiError> {
    let initial_events = req.flag("sendInitialEvents");
    let bookmarks = req.flag("allowWatchBookmarks");
    let matching = req.param("resourceVersionMatch").unwrap_or("");
    if initial_events && matching != "NotOlderThan" {
        return Err(ApiError::bad_request("sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan"));
    }
    if initial_events && !bookmarks {
        return Err(ApiError::bad_request("sendInitialEvents requires setting allowWatchBookmarks to true"));
    }
    if !initial_events && !matching.is_empty() {
        return Err(ApiError::bad_request("resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided"));
    }
    let since = match req.param("resourceVersion").unwrap_or("") {
        _ if initial_events => None,
        "" | "0" => None,
        rv => Some(rv.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?),
    };
    let timeout = match req.param("timeoutSeconds") {
        Some(t) => Duration::from_secs(t.parse().map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?),
        None => DEFAULT_TIMEOUT,
    };
    Ok(Params { since, initial_events, bookmarks, timeout })
}

/// Where a stream starts: its queue id, the objects or changes to send first, and the
/// resourceVersion they bring the watcher to.
struct Start {
    id: u64,
    objects: Vec<Arc<Value>>,
    changes: Vec<Change>,
    rv: u64,
}

/// Unregisters the stream's queue when the stream ends, however it ends.
struct Registered<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.store.lock().unwrap().close_watch(self.id);
        self.shared.changed.notify_all();
    }
}

fn open(shared: &Shared, res: &'static Resource, p: &Params) -> Result<Start, ApiError> {
    let mut store = shared.store.lock().unwrap();
    match p.since {
        None => {
            let (id, objects, rv) = store.watch_now(res);
            Ok(Start { id, objects, changes: vec![], rv })
        }
        Some(since) => {
            let compacted = store.compacted();
            let (id, changes) = store.watch_from(res, since).ok_or_else(|| ApiError::too_old(since, compacted))?;
            Ok(Start { id, objects: vec![], changes, rv: since })
        }
    }
}

/// Serves a watch stream on `out` until its timeout, a cut or a write error.
/// `logged` is told the status (and whether the watch is gone) before anything is written.
pub fn stream(
    shared: &Shared,
    res: &'static Resource,
    filter: &Filter,
    p: &Params,
    out: &mut impl Write,
    logged: &mut dyn FnMut(u16, bool),
) -> io::Result<Answer> {
    let deadline = Instant::now() + p.timeout;
    let opened = open(shared, res, p);
    logged(200, opened.is_err());
    let mut body = Chunked::start(out)?;
    let start = match opened {
        Ok(start) => start,
        Err(e) => {
            body.send(&event_line("ERROR", &e.status()))?;
            body.finish()?;
            return Ok(Answer { keep_alive: true });
        }
    };
    let _registered = Registered { shared, id: start.id };
    for obj in start.objects.iter().filter(|o| filter.matches(o)) {
        body.send(&event_line("ADDED", obj))?;
    }
    let mut cursor = send_changes(&mut body, &start.changes, filter, start.rv)?;
    if p.initial_events {
        body.send(&bookmark(res, cursor, true))?;
    }
    let mut last_bookmark = Instant::now();
    loop {
        let next_bookmark = last_bookmark + shared.controls.lock().unwrap().bookmark_every;
        let wake = if p.bookmarks { next_bookmark.min(deadline) } else { deadline };
        let Some(Pending { changes, rv, ended }) = wait_for_changes(shared, start.id, wake) else {
            body.cut();
            return Ok(Answer { keep_alive: false });
        };
        cursor = send_changes(&mut body, &changes, filter, cursor)?;
        let now = Instant::now();
        if now >= deadline || ended {
            body.finish()?;
            return Ok(Answer { keep_alive: true });
        }
        if p.bookmarks && now >= next_bookmark {
            // Every change up to `rv` has been queued for this stream, and sent.
            cursor = cursor.max(rv);
            body.send(&bookmark(res, cursor, false))?;
            last_bookmark = now;
        }
    }
}

/// The changes queued for stream `id`, waiting until there are some, the stream ends or
/// `wake`; None when the stream is to be cut.
fn wait_for_changes(shared: &Shared, id: u64, wake: Instant) -> Option<Pending> {
    let mut store = shared.store.lock().unwrap();
    loop {
        let pending = store.take_pending(id)?;
        let now = Instant::now();
        if !pending.changes.is_empty() || pending.ended || now >= wake {
            return Some(pending);
        }
        store = shared.changed.wait_timeout(store, wake - now).unwrap().0;
    }
}

/// Sends the events for the changes after `cursor`; returns the new cursor.
fn send_changes(body: &mut Chunked<impl Write>, changes: &[Change], filter: &Filter, mut cursor: u64) -> io::Result<u64> {
    for c in changes {
        if c.rv <= cursor {
            continue;
        }
        if let Some(kind) = event_type(c, filter) {
            body.send(&event_line(kind, &c.object))?;
        }
        cursor = c.rv;
    }
    Ok(cursor)
}

/// The event a change is for a watcher selecting with `filter`, if any.
fn event_type(c: &Change, filter: &Filter) -> Option<&'static str> {
    let before = c.prev.as_ref().is_some_and(|p| filter.matches(p));
    let after = c.kind != ChangeType::Deleted && filter.matches(&c.object);
    match (before, after) {
        (false, true) => Some("ADDED"),
        (true, true) => Some("MODIFIED"),
        (true, false) => Some("DELETED"),
        (false, false) => None,
    }
}

fn event_line(kind: &str, obj: &Value) -> Vec<u8> {
    let mut line = format!("{{\"type\":\"{kind}\",\"object\":").into_bytes();
    serde_json::to_writer(&mut line, obj).expect("a JSON value serializes");
    line.extend_from_slice(b"}\n");
    line
}

fn bookmark(res: &Resource, rv: u64, initial_events_end: bool) -> Vec<u8> {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line("BOOKMARK", &json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": meta}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_entering_or_leaving_the_selection_are_added_or_deleted() {
        let running = Filter::new(None, Some("status.phase!=Succeeded,status.phase!=Failed"), None).unwrap();
        let pod = |phase: &str| Arc::new(json!({"metadata": {"name": "p"}, "status": {"phase": phase}}));
        let change = |kind, prev: Option<&str>, now: &str| Change { rv: 9, kind, key: "a/p".into(), object: pod(now), prev: prev.map(pod) };
        assert_eq!(event_type(&change(ChangeType::Added, None, "Pending"), &running), Some("ADDED"));
        assert_eq!(event_type(&change(ChangeType::Modified, Some("Pending"), "Running"), &running), Some("MODIFIED"));
        assert_eq!(event_type(&change(ChangeType::Modified, Some("Running"), "Succeeded"), &running), Some("DELETED"));
        assert_eq!(event_type(&change(ChangeType::Modified, Some("Failed"), "Running"), &running), Some("ADDED"));
        assert_eq!(event_type(&change(ChangeType::Deleted, Some("Failed"), "Failed"), &running), None);
        assert_eq!(event_type(&change(ChangeType::Deleted, Some("Running"), "Running"), &running), Some("DELETED"));
        let line = bookmark(Resource::named("pods").unwrap(), 42, true);
        assert_eq!(line.last(), Some(&b'\n'), "one event per line");
        let meta = json!({"annotations": {"k8s.io/initial-events-end": "true"}, "resourceVersion": "42"});
        let want = json!({"type": "BOOKMARK", "object": {"apiVersion": "v1", "kind": "Pod", "metadata": meta}});
        assert_eq!(serde_json::from_slice::<Value>(&line).unwrap(), want);
    }
}

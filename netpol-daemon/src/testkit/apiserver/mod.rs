//! A stand-in Kubernetes API server for tests and benchmarks. Not a mock of netpol: an HTTP/1.1
//! server speaking the list/watch protocol kube-rs (and client-go) talk to, so the daemon's
//! real Kubernetes source runs against it unchanged, through a `kube::Client` or KUBECONFIG.
//!
//! It serves namespaces, pods, services, nodes, endpointslices (discovery.k8s.io/v1),
//! networkpolicies (networking.k8s.io/v1) and events (events.k8s.io/v1, created and patched
//! by clients and recorded), plus `/version` and discovery; and clusternetworkpolicies
//! (policy.networking.k8s.io/v1alpha2) once their CRD is installed ([`ApiServer::install_crd`]:
//! before that, and after [`ApiServer::remove_crd`], a 404 as from a real server without it). Objects are `serde_json::Value`s
//! stamped with one global resourceVersion counter; see `store` for the storage, `api` for
//! lists (paging with `limit`/`continue`, `resourceVersion`/`resourceVersionMatch`,
//! selectors) and `watch` for watch streams (chunked events, bookmarks, 410 Gone).
//!
//! Tests change the cluster with [`ApiServer::apply`] / [`ApiServer::delete`] and inject the
//! faults a real control plane has: [`ApiServer::compact`] (older resourceVersions expire: a
//! watch or a continued list from before gets 410 Gone and the client must relist),
//! [`ApiServer::drop_connections`] (every watch stream is cut mid-event),
//! [`ApiServer::refuse_connections_for`] (an outage), [`ApiServer::set_latency`] (a slow
//! server). [`ApiServer::requests`] logs every request for assertions.
mod api;
mod http;
mod select;
mod store;
mod watch;

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use store::Store;
pub use store::{Resource, RESOURCES};

/// One request the server received, for assertions.
#[derive(Clone, Debug)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
    /// The request body (empty for GET).
    pub body: String,
    /// The HTTP status answered (0 while the answer is still being made: a slow or open watch).
    pub status: u16,
    /// Answered 410 Gone: as the HTTP status, or as the ERROR event ending a watch stream.
    pub gone: bool,
}

impl LoggedRequest {
    /// The value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A `watch=true` request.
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }

    /// A GET on the collection at `path` that is not a watch: a list (or a page of one).
    pub fn is_list_of(&self, path: &str) -> bool {
        self.method == "GET" && self.path == path && !self.is_watch()
    }
}

/// How the server misbehaves, set by the tests.
struct Controls {
    latency: Duration,
    bookmark_every: Duration,
    refuse_until: Option<Instant>,
}

/// How a request was answered.
struct Answer {
    /// The connection can carry another request.
    keep_alive: bool,
}

/// The requests received since the last clear; `cleared` counts those cleared before.
#[derive(Default)]
struct RequestLog {
    cleared: usize,
    entries: Vec<LoggedRequest>,
}

/// What the listener thread, the connection threads and the [`ApiServer`] handle share.
struct Shared {
    store: Mutex<Store>,
    /// Notified on every change of the store (watch streams wait on it).
    changed: Condvar,
    controls: Mutex<Controls>,
    log: Mutex<RequestLog>,
    /// Open connections, to be shut down by drop_connections.
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    stopped: AtomicBool,
}

impl Shared {
    /// Runs `f` on the store, then wakes the watch streams.
    fn modify<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let out = f(&mut self.store.lock().unwrap());
        self.changed.notify_all();
        out
    }

    fn refusing(&self) -> bool {
        self.controls.lock().unwrap().refuse_until.is_some_and(|t| Instant::now() < t)
    }
}

/// The bookmark interval of the real API server (about a minute); tests shorten it.
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

/// A running stand-in API server; it stops (cutting its connections) when dropped.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The listening socket, kept to wake the accepting thread on drop.
    listener: TcpListener,
}

impl ApiServer {
    /// Serves on an ephemeral port of 127.0.0.1.
    pub fn start() -> ApiServer {
        ApiServer::serve(TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0"))
    }

    /// Serves on a socket bound inside network namespace `netns` (a lab's node namespace,
    /// say), so that a daemon running there reaches it at `addr`.
    pub fn start_in_netns(netns: &str, addr: SocketAddr) -> Result<ApiServer> {
        let listener =
            crate::testkit::lab::in_netns(netns, move || TcpListener::bind(addr))?.with_context(|| format!("binding {addr} in {netns}"))?;
        Ok(ApiServer::serve(listener))
    }

    /// Serves on `listener`, from a thread of its own (and one per connection).
    pub fn serve(listener: TcpListener) -> ApiServer {
        let controls = Controls { latency: Duration::ZERO, bookmark_every: DEFAULT_BOOKMARK_INTERVAL, refuse_until: None };
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            changed: Condvar::new(),
            controls: Mutex::new(controls),
            log: Mutex::default(),
            conns: Mutex::default(),
            next_conn: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        });
        let addr = listener.local_addr().expect("a bound socket has an address");
        let accepting = listener.try_clone().expect("cloning the listening socket");
        let s = shared.clone();
        std::thread::Builder::new().name("apiserver".into()).spawn(move || accept_loop(s, accepting)).expect("spawning the API server");
        ApiServer { shared, addr, listener }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server; `rt` is the runtime it will run on.
    pub fn client(&self, rt: &tokio::runtime::Runtime) -> kube::Client {
        let _in_rt = rt.enter();
        let cfg = kube::Config::new(self.url().parse().expect("the server's URL parses"));
        kube::Client::try_from(cfg).expect("a kube client for the stand-in API server")
    }

    /// Writes a kubeconfig naming this server (for a process run with KUBECONFIG=path).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        let url = self.url();
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: stand-in, cluster: {{server: \"{url}\"}}}}]\n\
                 users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: stand-in, user: u}}}}]\ncurrent-context: c\n"
            ),
        )
    }

    /// Creates or replaces an object of `resource` (a plural: "pods"); returns the
    /// resourceVersion it has now. Panics on an object without a name (or namespace).
    pub fn apply(&self, resource: &str, obj: Value) -> u64 {
        self.apply_all(resource, [obj])
    }

    /// [`ApiServer::apply`] for many objects at once (each one change, one resourceVersion
    /// each); returns the resourceVersion after the last.
    pub fn apply_all(&self, resource: &str, objs: impl IntoIterator<Item = Value>) -> u64 {
        let res = resource_named(resource);
        self.shared.modify(|store| {
            for obj in objs {
                store.put(res, obj).unwrap_or_else(|e| panic!("apply {resource}: {}", e.message));
            }
            store.rv()
        })
    }

    /// Applies every document of a multi-document YAML manifest, by its `kind`.
    pub fn apply_yaml(&self, yaml: &str) -> Result<u64> {
        let mut rv = self.resource_version();
        for doc in serde_norway::Deserializer::from_str(yaml) {
            let obj = Value::deserialize(doc).context("parsing a manifest")?;
            if obj.is_null() {
                continue;
            }
            let kind = obj["kind"].as_str().unwrap_or("").to_string();
            let res = Resource::of_kind(&kind).ok_or_else(|| anyhow!("the stand-in API server does not serve kind {kind:?}"))?;
            rv = self.shared.modify(|store| store.put(res, obj)).map_err(|e| anyhow!("{kind}: {}", e.message))?.metadata_rv();
        }
        Ok(rv)
    }

    /// Installs the CRD of `resource` (a plural: "clusternetworkpolicies"): until then, and
    /// after [`ApiServer::remove_crd`], every request on it is answered 404 and it is not in
    /// discovery, as on a real server without the CRD.
    pub fn install_crd(&self, resource: &str) {
        let res = resource_named(resource);
        self.shared.modify(|store| store.install(res));
    }

    /// Removes the CRD of `resource`: its objects are deleted (DELETED events), the watch
    /// streams on it end, and it is answered 404 from then on.
    pub fn remove_crd(&self, resource: &str) {
        let res = resource_named(resource);
        self.shared.modify(|store| store.uninstall(res));
    }

    /// Deletes an object (namespace "" for a cluster-scoped one); returns the deletion's
    /// resourceVersion, None when there was no such object.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> Option<u64> {
        let res = resource_named(resource);
        self.shared.modify(|store| store.delete(res, &res.key(namespace, name))).map(|last| last.metadata_rv())
    }

    /// The object as stored now.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = resource_named(resource);
        self.shared.store.lock().unwrap().get(res, &res.key(namespace, name)).map(|o| (*o).clone())
    }

    /// Every object of `resource` as stored now, in key order (events posted by clients too).
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        self.shared.store.lock().unwrap().objects(resource_named(resource)).iter().map(|o| (**o).clone()).collect()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().rv()
    }

    /// Expires every resourceVersion before the current one: a watch from an older version
    /// gets an ERROR event with a 410 Expired Status, continuing a list started before gets
    /// HTTP 410. Open watch streams carry on (they are past it).
    pub fn compact(&self) {
        self.shared.modify(Store::compact);
    }

    /// Cuts every open connection: watch streams break off in the middle of an event, idle
    /// keep-alive connections close. Returns once every watch stream open before has ended,
    /// so no change made after this call reaches a client through an old stream.
    pub fn drop_connections(&self) {
        let mut store = self.shared.store.lock().unwrap();
        let epoch = store.cut_watches();
        self.shared.changed.notify_all();
        let give_up = Instant::now() + Duration::from_secs(5);
        while store.has_watches_before(epoch) && Instant::now() < give_up {
            store = self.shared.changed.wait_timeout(store, Duration::from_millis(50)).unwrap().0;
        }
        drop(store);
        for conn in self.shared.conns.lock().unwrap().values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }

    /// For `d` from now, every new connection (and every request on an open one) is closed
    /// at once, as during an API server outage. `Duration::ZERO` ends a refusal.
    pub fn refuse_connections_for(&self, d: Duration) {
        self.shared.controls.lock().unwrap().refuse_until = Some(Instant::now() + d);
    }

    /// Delays every response by `d` (a slow or overloaded API server).
    pub fn set_latency(&self, d: Duration) {
        self.shared.controls.lock().unwrap().latency = d;
    }

    /// How often watch streams that allow bookmarks get one (60 s by default, as the real
    /// server's about-a-minute).
    pub fn set_bookmark_interval(&self, d: Duration) {
        self.shared.controls.lock().unwrap().bookmark_every = d;
        self.shared.changed.notify_all();
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.shared.log.lock().unwrap().entries.clone()
    }

    /// Forgets the requests so far.
    pub fn clear_requests(&self) {
        let log = &mut *self.shared.log.lock().unwrap();
        log.cleared += log.entries.len();
        log.entries.clear();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        // Wakes the accepting thread (shutdown on a listening socket fails its accept).
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        self.drop_connections();
    }
}

/// The resourceVersion in an object's metadata.
trait MetadataRv {
    fn metadata_rv(&self) -> u64;
}

impl MetadataRv for Value {
    fn metadata_rv(&self) -> u64 {
        self["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

fn resource_named(plural: &str) -> &'static Resource {
    Resource::named(plural).unwrap_or_else(|| panic!("the stand-in API server does not serve {plural:?}"))
}

fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    for conn in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        if shared.refusing() {
            continue;
        }
        let s = shared.clone();
        std::thread::spawn(move || serve_connection(&s, conn));
    }
}

/// Answers the requests of one connection until it closes.
fn serve_connection(shared: &Shared, conn: TcpStream) {
    let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    let _ = conn.set_nodelay(true);
    let _ = conn.set_write_timeout(Some(Duration::from_secs(30)));
    let (Ok(reading), Ok(registered)) = (conn.try_clone(), conn.try_clone()) else { return };
    shared.conns.lock().unwrap().insert(id, registered);
    let mut reader = BufReader::new(reading);
    let mut out = conn;
    while let Ok(Some(req)) = http::read_request(&mut reader) {
        if shared.refusing() || shared.stopped.load(Ordering::SeqCst) {
            break;
        }
        let entry = log_request(shared, &req);
        let latency = shared.controls.lock().unwrap().latency;
        std::thread::sleep(latency);
        // The status is logged before the answer is written: a client that has read it finds
        // it in the log.
        let mut record = |status, gone| {
            let log = &mut *shared.log.lock().unwrap();
            if let Some(logged) = entry.checked_sub(log.cleared).and_then(|i| log.entries.get_mut(i)) {
                (logged.status, logged.gone) = (status, gone);
            }
        };
        let Ok(answer) = api::handle(shared, &req, &mut out, &mut record) else { break };
        if req.close || !answer.keep_alive {
            break;
        }
    }
    shared.conns.lock().unwrap().remove(&id);
}

/// Logs a request as it arrives; returns its number.
fn log_request(shared: &Shared, req: &http::Request) -> usize {
    let log = &mut *shared.log.lock().unwrap();
    log.entries.push(LoggedRequest {
        method: req.method.clone(),
        path: req.path.clone(),
        query: req.query.clone(),
        body: String::from_utf8_lossy(&req.body).into_owned(),
        status: 0,
        gone: false,
    });
    log.cleared + log.entries.len() - 1
}

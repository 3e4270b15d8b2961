//! The Kubernetes source: reflectors (list + watch, relisting with backoff on errors) for
//! Namespaces, Pods, NetworkPolicies, Services and EndpointSlices, on a tokio runtime of their
//! own. The daemon loop polls [`KubeSource::generation`] and takes a [`KubeSource::snapshot`]
//! when it moved, exactly as it re-reads a manifests directory: same model, same compiler.
//! While the API server is unreachable the stores keep the last state, and so does the node.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};

use crate::model;
use crate::model::Cluster;

/// The resources watched, as (API group, resource): what the ClusterRole must grant
/// get/list/watch on (checked against deploy/ by a test).
pub const WATCHED: &[(&str, &str)] =
    &[("", "namespaces"), ("", "pods"), ("", "services"), ("discovery.k8s.io", "endpointslices"), ("networking.k8s.io", "networkpolicies")];

pub struct KubeSource {
    /// Bumped on every change seen by any watcher.
    pub generation: Arc<AtomicU64>,
    /// Watch errors so far (each followed by a relist with backoff).
    pub errors: Arc<AtomicU64>,
    /// Every store has completed its first list.
    pub synced: Arc<AtomicBool>,
    /// The last thing each watcher saw was not an error (false while the API server is away).
    pub healthy: Arc<AtomicBool>,
    /// When the oldest change not yet taken by the daemon arrived (for the latency histogram).
    pub pending_since: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    policies: Store<NetworkPolicy>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    /// Warnings already logged (snapshots convert every object again).
    warned: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The generation the daemon's last refresh read ([`super::Source::refresh`]).
    refreshed: Option<u64>,
    _rt: tokio::runtime::Runtime,
}

/// What every watcher reports into.
#[derive(Clone)]
struct Signals {
    generation: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    pending_since: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// The pods the API server sends: every node's (peers are matched by address), but not those
/// that finished (phase Succeeded or Failed: their address may already belong to a new pod; the
/// model skips them too, the filter only spares the traffic and the memory).
pub const POD_FIELD_SELECTOR: &str = "status.phase!=Succeeded,status.phase!=Failed";

fn watch<K>(rt: &tokio::runtime::Runtime, api: Api<K>, cfg: watcher::Config, sig: Signals, slim: fn(&mut K)) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, cfg).default_backoff().modify(slim).reflect(writer);
    rt.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    sig.pending_since.lock().unwrap().get_or_insert_with(std::time::Instant::now);
                    sig.generation.fetch_add(1, Ordering::SeqCst);
                    sig.healthy.store(true, Ordering::SeqCst);
                }
                Err(e) => {
                    sig.errors.fetch_add(1, Ordering::SeqCst);
                    sig.healthy.store(false, Ordering::SeqCst);
                    log::warn!("watch {}: {e}; keeping the last state, relisting with backoff", K::plural(&Default::default()));
                }
            }
        }
    });
    reader
}

impl KubeSource {
    /// Connects with in-cluster config or KUBECONFIG and starts the watchers.
    pub fn start() -> Result<KubeSource> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("kube").build()?;
        let client = rt.block_on(Client::try_default()).context("Kubernetes client (in-cluster config or KUBECONFIG)")?;
        Ok(KubeSource::with_client(rt, client, std::time::Duration::from_secs(10)))
    }

    /// `probe_every`: how often the API server is asked for its version; a watch stream that
    /// resumes quietly after an outage produces no event, so reachability is probed apart.
    pub fn with_client(rt: tokio::runtime::Runtime, client: Client, probe_every: std::time::Duration) -> KubeSource {
        let generation = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let pending_since = Arc::new(std::sync::Mutex::new(None));
        let sig = Signals {
            generation: generation.clone(),
            errors: errors.clone(),
            healthy: healthy.clone(),
            pending_since: pending_since.clone(),
        };
        let g = || sig.clone();
        // Only the fields the model reads are kept in memory.
        let namespaces = watch(&rt, Api::<Namespace>::all(client.clone()), watcher::Config::default(), g(), |n| {
            n.metadata.managed_fields = None;
            n.metadata.annotations = None;
        });
        let pods = watch(&rt, Api::<Pod>::all(client.clone()), watcher::Config::default().fields(POD_FIELD_SELECTOR), g(), |p| {
            p.metadata.managed_fields = None;
            p.metadata.annotations = None;
            if let Some(st) = p.status.as_mut() {
                st.conditions = None;
                st.container_statuses = None;
                st.init_container_statuses = None;
            }
        });
        let policies =
            watch(&rt, Api::<NetworkPolicy>::all(client.clone()), watcher::Config::default(), g(), |n| n.metadata.managed_fields = None);
        let services = watch(&rt, Api::<Service>::all(client.clone()), watcher::Config::default(), g(), |s| {
            s.metadata.managed_fields = None;
            s.metadata.annotations = None;
        });
        let slices = watch(&rt, Api::<EndpointSlice>::all(client.clone()), watcher::Config::default(), g(), |s| {
            s.metadata.managed_fields = None;
            s.metadata.annotations = None;
        });
        {
            let (client, healthy) = (client.clone(), healthy.clone());
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(probe_every).await;
                    let ok = client.apiserver_version().await.is_ok();
                    if healthy.swap(ok, Ordering::SeqCst) != ok {
                        log::info!("Kubernetes API {}", if ok { "reachable again" } else { "unreachable" });
                    }
                }
            });
        }
        let synced = Arc::new(AtomicBool::new(false));
        {
            let (a, b, c, d, f, s) = (namespaces.clone(), pods.clone(), policies.clone(), services.clone(), slices.clone(), synced.clone());
            let generation = generation.clone();
            rt.spawn(async move {
                let _ = a.wait_until_ready().await;
                let _ = b.wait_until_ready().await;
                let _ = c.wait_until_ready().await;
                let _ = d.wait_until_ready().await;
                let _ = f.wait_until_ready().await;
                s.store(true, Ordering::SeqCst);
                generation.fetch_add(1, Ordering::SeqCst);
            });
        }
        KubeSource {
            generation,
            errors,
            synced,
            healthy,
            pending_since,
            namespaces,
            pods,
            policies,
            services,
            slices,
            warned: Default::default(),
            refreshed: None,
            _rt: rt,
        }
    }

    /// The cluster model from the stores; invalid objects are skipped and reported (an invalid
    /// policy is enforced as its fail-closed stand-in, as in the manifests source).
    pub fn snapshot(&self) -> (Cluster, Vec<String>) {
        let mut c = Cluster::default();
        let mut errors = Vec::new();
        let mut take = |conv: model::Converted| {
            for w in conv.warnings {
                if self.warned.lock().unwrap().insert(w.clone()) {
                    log::warn!("{w}");
                }
            }
            if let Some(obj) = conv.object {
                c.insert(obj);
            }
            errors.extend(conv.errors);
        };
        self.namespaces.state().iter().for_each(|o| take(model::from_k8s(&**o)));
        self.pods.state().iter().for_each(|o| take(model::from_k8s(&**o)));
        self.policies.state().iter().for_each(|o| take(model::from_k8s(&**o)));
        self.services.state().iter().for_each(|o| take(model::from_k8s(&**o)));
        self.slices.state().iter().for_each(|o| take(model::from_k8s(&**o)));
        (c, errors)
    }
}

/// The daemon's view: a refresh takes a snapshot when [`KubeSource::generation`] moved.
impl super::Source for KubeSource {
    fn describe(&self) -> String {
        "the Kubernetes API".to_string()
    }

    fn wait(&mut self, timeout: std::time::Duration) {
        std::thread::sleep(timeout);
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    fn ready(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    fn refresh(&mut self, cluster: &mut Cluster, audit_all: bool) -> Result<Option<(model::ChangeSet, Vec<String>)>> {
        let generation = self.generation.load(Ordering::SeqCst);
        if self.refreshed.replace(generation) == Some(generation) {
            return Ok(None);
        }
        let (mut c, errors) = self.snapshot();
        if audit_all {
            for p in c.policies.values_mut() {
                p.audit = true;
            }
        }
        Ok(Some((cluster.replace(c), errors)))
    }

    fn take_change_age(&mut self) -> Option<std::time::Duration> {
        self.pending_since.lock().unwrap().take().map(|t| t.elapsed())
    }
}

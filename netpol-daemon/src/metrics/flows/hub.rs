//! The flow clients and what the programs send for them. Each client (`GET /v1/flows`) has a
//! [`Filter`] and a bounded queue of JSON lines: the reader thread only ever tries to put a
//! line in it, so a slow client never holds up the reader or the others; what does not fit is
//! dropped and counted (`netpol_flow_events_dropped_total{reason="slow_client"}`), and a client
//! that takes nothing for [`STALL`] is disconnected. The programs' settings (`EVENT_CONFIG`)
//! are the base (`--log-denied`: denials and audits at N a second and CPU, or nothing) widened
//! to every verdict a client asks for at the highest rate one asks for, written when a client
//! comes or goes: back to the base when the last one leaves.
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use netpol_common::EventConfig;
use tokio::sync::{mpsc, Notify};

use super::{Directory, Flow, FlowVerdict};
use crate::model::{ChangeSet, Cluster};

/// Flow clients at once (each holds one of the endpoint's connections).
pub const MAX_CLIENTS: usize = 64;
/// Lines a client's queue holds.
pub const QUEUE: usize = 4096;
/// Events per second and CPU a client gets unless it asks for another rate (`observe --rate`).
pub const DEFAULT_RATE: u32 = 1000;
/// The most events per second and CPU a client may ask for (what one reader thread keeps up
/// with on a node of many CPUs, and a bound on what a client of the endpoint can make the
/// programs do).
pub const MAX_RATE: u32 = 10_000;
/// A client whose queue stays full this long is disconnected.
pub const STALL: Duration = Duration::from_secs(30);

/// Writes the programs' event settings (EVENT_CONFIG), given by the daemon.
pub type EventSink = Box<dyn FnMut(EventConfig) -> anyhow::Result<()> + Send>;

/// What a client wants: the flows of one pod (local, or the peer), of some verdicts, and how
/// many per second and CPU the programs may send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// NS/POD: flows of this pod, on its own interface or as the peer.
    pub pod: Option<String>,
    /// Never empty.
    pub verdicts: Vec<FlowVerdict>,
    pub rate: u32,
}

impl Default for Filter {
    fn default() -> Self {
        Filter { pod: None, verdicts: FlowVerdict::ALL.to_vec(), rate: DEFAULT_RATE }
    }
}

impl Filter {
    /// From the query of `/v1/flows`: `pod=NS/POD`, `verdict=denied|allowed|audit` (repeated,
    /// or comma-separated; none: all), `rate=N` (1 to [`MAX_RATE`]).
    pub fn from_query(query: &str) -> Result<Filter, String> {
        let mut f = Filter { verdicts: Vec::new(), ..Filter::default() };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| format!("{k}: bad percent-encoding in {v:?}"))?;
            match k {
                "pod" => match v.split_once('/') {
                    Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => f.pod = Some(v.clone()),
                    _ => return Err(format!("pod: want NAMESPACE/POD, got {v:?}")),
                },
                "verdict" => {
                    for one in v.split(',') {
                        let verdict = FlowVerdict::parse(one).ok_or_else(|| format!("verdict: {one:?} is not denied, allowed or audit"))?;
                        if !f.verdicts.contains(&verdict) {
                            f.verdicts.push(verdict);
                        }
                    }
                }
                "rate" => {
                    f.rate = v
                        .parse()
                        .ok()
                        .filter(|r| (1..=MAX_RATE).contains(r))
                        .ok_or_else(|| format!("rate: {v:?} is not a number from 1 to {MAX_RATE}"))?
                }
                _ => return Err(format!("unknown parameter {k:?} (pod, verdict, rate)")),
            }
        }
        if f.verdicts.is_empty() {
            f.verdicts = FlowVerdict::ALL.to_vec();
        }
        Ok(f)
    }

    /// The query [`Filter::from_query`] reads back.
    pub fn to_query(&self) -> String {
        let mut q = vec![format!("rate={}", self.rate)];
        if let Some(p) = &self.pod {
            q.push(format!("pod={}", p.replace('%', "%25").replace('&', "%26")));
        }
        q.extend(self.verdicts.iter().map(|v| format!("verdict={}", v.as_str())));
        q.join("&")
    }

    pub fn matches(&self, f: &Flow) -> bool {
        self.verdicts.contains(&f.verdict) && self.pod.as_ref().is_none_or(|p| *p == f.pod || f.peer.as_ref() == Some(p))
    }

    fn bits(&self) -> u32 {
        self.verdicts.iter().fold(0, |b, v| b | v.event_bit())
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

struct Client {
    id: u64,
    filter: Filter,
    tx: mpsc::Sender<Bytes>,
    /// Since when its queue has been full.
    full_since: Option<Instant>,
    /// Ends its connection (the client stalled).
    cancel: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    clients: Vec<Client>,
    base: EventConfig,
    /// What the programs were last given.
    applied: Option<EventConfig>,
    sink: Option<EventSink>,
}

impl Inner {
    /// The base widened to what every client asks for.
    fn wanted(&self) -> EventConfig {
        self.clients
            .iter()
            .fold(self.base, |c, cl| EventConfig { per_sec: c.per_sec.max(cl.filter.rate), verdicts: c.verdicts | cl.filter.bits() })
    }

    /// Gives the programs what is wanted now, if that changed.
    fn apply(&mut self) {
        let want = self.wanted();
        if self.applied == Some(want) {
            return;
        }
        let Some(sink) = self.sink.as_mut() else { return };
        match sink(want) {
            Ok(()) => self.applied = Some(want),
            Err(e) => tracing::warn!("flow events: {e:#}"),
        }
    }
}

/// The clients, the settings given to the programs, the pod directory and the counts.
#[derive(Default)]
pub struct FlowHub {
    inner: Mutex<Inner>,
    node: OnceLock<String>,
    directory: RwLock<Directory>,
    /// Clients connected or connecting (they want the directory).
    watchers: AtomicUsize,
    /// Events read, per [`FlowVerdict::ALL`] index.
    read: [AtomicU64; 3],
    slow_dropped: AtomicU64,
}

/// A client's place in the hub; leaving it (dropping this) takes the client out.
pub struct Subscription {
    hub: Arc<FlowHub>,
    id: u64,
    _watching: Watching,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut inner = self.hub.inner.lock().unwrap();
        inner.clients.retain(|c| c.id != self.id);
        inner.apply();
    }
}

/// A client that wants the peers named (the directory built) while this lives.
pub struct Watching(Arc<FlowHub>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FlowHub {
    /// The daemon's part: this node's name, what writes the programs' settings, and the base
    /// (`--log-denied`), which is written at once.
    pub fn start(&self, node: &str, sink: EventSink, base: EventConfig) {
        let _ = self.node.set(node.to_string());
        let mut inner = self.inner.lock().unwrap();
        inner.sink = Some(sink);
        inner.base = base;
        inner.applied = None;
        inner.apply();
    }

    pub fn node(&self) -> &str {
        self.node.get().map_or("", |n| n.as_str())
    }

    /// The base settings (`--log-denied`).
    pub fn base(&self) -> EventConfig {
        self.inner.lock().unwrap().base
    }

    /// What the programs send now.
    pub fn settings(&self) -> EventConfig {
        let inner = self.inner.lock().unwrap();
        inner.applied.unwrap_or(inner.base)
    }

    pub fn clients(&self) -> usize {
        self.inner.lock().unwrap().clients.len()
    }

    /// Marks a client coming: the directory is built for it (by the daemon loop).
    pub fn watch(self: &Arc<Self>) -> Watching {
        self.watchers.fetch_add(1, Ordering::SeqCst);
        Watching(self.clone())
    }

    /// Whether the peers of flows are named now.
    pub fn directory_ready(&self) -> bool {
        self.directory.read().unwrap().is_built()
    }

    /// The daemon loop, each pass: builds the directory from `cluster` when a client wants it,
    /// drops it when none does.
    pub fn keep_directory(&self, cluster: &Cluster) {
        let wanted = self.watchers.load(Ordering::SeqCst) > 0;
        if wanted != self.directory_ready() {
            let mut d = self.directory.write().unwrap();
            if wanted {
                d.build(cluster);
            } else {
                d.clear();
            }
        }
    }

    /// The daemon loop: `ch` changed `cluster`.
    pub fn pods_changed(&self, cluster: &Cluster, ch: &ChangeSet) {
        if self.directory_ready() {
            self.directory.write().unwrap().update(cluster, ch);
        }
    }

    /// The pod holding `ip`, if the directory is built.
    pub fn pod_at(&self, ip: IpAddr) -> Option<String> {
        self.directory.read().unwrap().pod_at(ip).map(|k| k.to_string())
    }

    /// A new client with `filter`: its queue and its place (at most [`MAX_CLIENTS`]).
    /// `cancel` is notified when the client stalls.
    pub fn subscribe(self: &Arc<Self>, filter: Filter, cancel: Arc<Notify>) -> Option<(mpsc::Receiver<Bytes>, Subscription)> {
        let mut inner = self.inner.lock().unwrap();
        if inner.clients.len() >= MAX_CLIENTS {
            return None;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        inner.next_id += 1;
        let id = inner.next_id;
        inner.clients.push(Client { id, filter, tx, full_since: None, cancel });
        inner.apply();
        Some((rx, Subscription { hub: self.clone(), id, _watching: self.watch() }))
    }

    /// Hands `flow` to every client whose filter matches (never waits).
    pub fn publish(&self, flow: &Flow) {
        let i = FlowVerdict::ALL.iter().position(|v| *v == flow.verdict).unwrap_or(0);
        self.read[i].fetch_add(1, Ordering::Relaxed);
        let mut inner = self.inner.lock().unwrap();
        if inner.clients.is_empty() {
            return;
        }
        let line = Bytes::from(super::render::json_line(flow));
        let mut stalled = false;
        for c in inner.clients.iter_mut().filter(|c| c.filter.matches(flow)) {
            match c.tx.try_send(line.clone()) {
                Ok(()) => c.full_since = None,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.slow_dropped.fetch_add(1, Ordering::Relaxed);
                    let since = *c.full_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > STALL {
                        c.cancel.notify_one();
                        stalled = true;
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        if stalled {
            inner.clients.retain(|c| c.full_since.is_none_or(|t| t.elapsed() <= STALL));
            inner.apply();
        }
    }

    /// The flow stream's metrics.
    pub fn families(&self, out: &mut crate::metrics::Families) {
        out.gauge("netpol_flow_clients", "Clients of the flow stream (GET /v1/flows, netpol-daemon observe) connected now.")
            .sample(&[], self.clients() as f64);
        let s = self.settings();
        out.gauge(
            "netpol_flow_events_rate",
            "Flow events the programs may send per second and CPU now (--log-denied, raised while observe clients ask for more; 0: none).",
        )
        .sample(&[], s.per_sec as f64);
        let mut f = out.gauge("netpol_flow_events_enabled", "Whether the programs send flow events of this verdict now (1) or not (0).");
        for v in FlowVerdict::ALL {
            f.sample(&[("verdict", v.as_str())], f64::from(u8::from(s.per_sec > 0 && s.verdicts & v.event_bit() != 0)));
        }
        let mut f = out.counter("netpol_flow_events_total", "Flow events the daemon received from the programs, by verdict.");
        for (i, v) in FlowVerdict::ALL.into_iter().enumerate() {
            f.sample(&[("verdict", v.as_str())], self.read[i].load(Ordering::Relaxed) as f64);
        }
        out.counter("netpol_flow_events_dropped_total", "Flow events not streamed: a client's queue was full (slow_client).")
            .sample(&[("reason", "slow_client")], self.slow_dropped.load(Ordering::Relaxed) as f64);
    }
}

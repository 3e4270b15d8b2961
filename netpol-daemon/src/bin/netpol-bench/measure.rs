//! What the daemon benches measure, the same way whatever the daemon reads (a manifests
//! directory or the Kubernetes API, each a [`Feed`]): single pod changes from the write to the
//! maps programmed, and bursts and steady streams of pod events until all are programmed (how
//! many syncs, how much of the daemon's CPU). Only the daemon's CLI, its metrics and /proc are used, so the figures
//! compare across daemon versions.
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netpol_daemon::compiler::compile_node;
use netpol_daemon::model::labels::Op;
use netpol_daemon::model::{Cluster, Labels, ObjKey, Peer, Pod, Selector};

use crate::lab::DaemonLab;

/// How pod changes reach the daemon.
pub trait Feed {
    /// A change of pod `key` (already made in `cluster`; a new pod or new labels), rendered
    /// ahead so that sending it costs only the write.
    type Event;
    fn render(&self, cluster: &Cluster, key: &ObjKey) -> Self::Event;
    fn send(&self, ev: Self::Event) -> anyhow::Result<()>;
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// One pod change at a time (`change` makes change i in the cluster and names the pod), each
/// timed on two clocks: the bench's own (read just before the write, to the daemon's
/// netpol_last_programmed_timestamp_seconds), and the daemon's histogram, which starts when the
/// daemon observed the change.
pub fn single_changes<F: Feed>(
    lab: &mut DaemonLab,
    feed: &F,
    cluster: &mut Cluster,
    changes: usize,
    mut change: impl FnMut(&mut Cluster, usize) -> ObjKey,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let (mut runs, mut runs_daemon) = (Vec::new(), Vec::new());
    for i in 0..changes {
        let (count, sum) = lab.latency_histogram();
        let key = change(cluster, i);
        let ev = feed.render(cluster, &key);
        let t = Instant::now();
        let written = unix_now();
        feed.send(ev)?;
        loop {
            // One scrape after the change is programmed (a scrape reads every pod's counters:
            // scraping while the daemon works would compete with it).
            std::thread::sleep(Duration::from_millis(150));
            let (c, s) = lab.latency_histogram();
            if c > count {
                anyhow::ensure!(c == count + 1.0, "one change was programmed {} times", c - count);
                runs_daemon.push(Duration::from_secs_f64(s - sum));
                let done = lab.metric("netpol_last_programmed_timestamp_seconds").unwrap_or(0.0);
                anyhow::ensure!(done >= written, "the daemon's programmed timestamp {done} precedes the write at {written}");
                runs.push(Duration::from_secs_f64(done - written));
                break;
            }
            lab.check_alive()?;
            anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "no sync within 30 s of a change of pod {key}");
        }
    }
    Ok((runs, runs_daemon))
}

/// How much to measure.
pub struct Plan {
    /// Single changes (remote pods moved into a peer selector).
    pub changes: usize,
    /// Bursts of each kind.
    pub bursts: usize,
    /// Events per burst.
    pub burst_events: usize,
    /// The rate of the steady stream of events that follows the bursts (as many events as a
    /// burst, of each kind), per second.
    pub steady_rate: u32,
}

/// What [`measure_all`] found.
pub struct Figures {
    pub ready: Duration,
    pub endpoints: f64,
    pub policies: f64,
    /// Peak RSS (MiB) once ready, and at the end.
    pub ready_hwm: f64,
    pub hwm: f64,
    /// Single changes on the bench's clock and on the daemon's.
    pub runs: Vec<Duration>,
    pub runs_daemon: Vec<Duration>,
    /// Bursts of remote pods moved into (or out of) peer selectors, and of a label no
    /// selector reads.
    pub moved: Vec<Burst>,
    pub churned: Vec<Burst>,
    /// The same events at a steady rate, one run of each kind.
    pub steady: [Burst; 2],
}

/// Everything, on a daemon that became ready after `ready`: single changes of `moves`, then
/// bursts of moves and of label churn in turn, then the peak memory.
pub fn measure_all<F: Feed>(
    lab: &mut DaemonLab,
    feed: &F,
    (cluster, node): (&mut Cluster, &str),
    ready: Duration,
    plan: &Plan,
    moves: &mut Moves,
) -> anyhow::Result<Figures> {
    anyhow::ensure!(!moves.is_empty(), "no remote pod of the cluster can be moved into a peer selector of a policy of {node}");
    let m = lab.metrics();
    let gauge = |name| netpol_daemon::metrics::sample(&m, name).unwrap_or(0.0);
    let (endpoints, policies) = (gauge("netpol_endpoints"), gauge("netpol_policies"));
    let ready_hwm = lab.memory_mib()?.0;
    let (runs, runs_daemon) = single_changes(lab, feed, cluster, plan.changes, |c, _| moves.apply(c))?;
    let mut churn = Churn::new(cluster, node);
    let (mut moved, mut churned) = (Vec::new(), Vec::new());
    let n = plan.burst_events;
    for b in 0..plan.bursts {
        std::thread::sleep(Duration::from_millis(500));
        moved.push(burst(lab, feed, (cluster, node), (2 * b, n, Duration::ZERO), |c, _| moves.apply(c))?);
        std::thread::sleep(Duration::from_millis(500));
        churned.push(burst(lab, feed, (cluster, node), (2 * b + 1, n, Duration::ZERO), |c, _| churn.apply(c))?);
    }
    let every = Duration::from_secs(1) / plan.steady_rate.max(1);
    let k = 2 * plan.bursts;
    std::thread::sleep(Duration::from_millis(500));
    let steady = [
        burst(lab, feed, (cluster, node), (k, n, every), |c, _| moves.apply(c))?,
        burst(lab, feed, (cluster, node), (k + 1, n, every), |c, _| churn.apply(c))?,
    ];
    let hwm = lab.memory_mib()?.0;
    Ok(Figures { ready, endpoints, policies, ready_hwm, hwm, runs, runs_daemon, moved, churned, steady })
}

/// A burst of pod events, measured.
pub struct Burst {
    /// Events sent, the closing new pod included.
    pub events: usize,
    /// From the first send to the last sent.
    pub sent_in: Duration,
    /// From the first send (bench clock) to the daemon's programmed timestamp once the last
    /// event is in the maps.
    pub programmed: Duration,
    /// From the last send to that timestamp.
    pub last: Duration,
    pub syncs: f64,
    /// The daemon's CPU time from before the first send to the last event programmed.
    pub cpu: Duration,
}

impl Burst {
    /// The daemon's CPU time per 1,000 events.
    pub fn cpu_per_1000(&self) -> Duration {
        self.cpu.mul_f64(1000.0 / self.events as f64)
    }
}

/// `events` pod changes (`change` as for [`single_changes`]), rendered first, then sent one
/// `every` (ZERO: as fast as they go), closed by a new remote pod (number `k`): once the last
/// event is programmed the
/// daemon's IDENTITIES count has the one more entry of its address (events of one kind arrive
/// in order, whichever the feed; checked here that nothing else moves the count).
pub fn burst<F: Feed>(
    lab: &mut DaemonLab,
    feed: &F,
    (cluster, node): (&mut Cluster, &str),
    (k, events, every): (usize, usize, Duration),
    mut change: impl FnMut(&mut Cluster, usize) -> ObjKey,
) -> anyhow::Result<Burst> {
    let prefixes = compile_node(cluster, node).prefixes.len();
    let mut evs: Vec<F::Event> = (0..events)
        .map(|i| {
            let key = change(cluster, i);
            feed.render(cluster, &key)
        })
        .collect();
    let closing = add_closing_pod(cluster, k, node);
    evs.push(feed.render(cluster, &closing));
    let added = compile_node(cluster, node).prefixes.len() as f64 - prefixes as f64;
    anyhow::ensure!(added == 1.0, "the burst changes the node's address prefixes by {added}, not by the closing pod's one");
    let m = lab.metrics();
    let sample = |m: &str, name| netpol_daemon::metrics::sample(m, name).unwrap_or(0.0);
    let (identities, syncs) = (sample(&m, "netpol_identity_map_entries"), sample(&m, "netpol_syncs_total"));
    let cpu = lab.cpu_time()?;
    let (t, first) = (Instant::now(), unix_now());
    let n = evs.len();
    for (i, ev) in evs.into_iter().enumerate() {
        if let Some(wait) = (every * i as u32).checked_sub(t.elapsed()) {
            std::thread::sleep(wait);
        }
        feed.send(ev)?;
    }
    let sent_in = t.elapsed();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let m = lab.metrics();
        if sample(&m, "netpol_identity_map_entries") == identities + 1.0 {
            let done = sample(&m, "netpol_last_programmed_timestamp_seconds");
            let cpu = lab.cpu_time()? - cpu;
            let syncs = sample(&m, "netpol_syncs_total") - syncs;
            anyhow::ensure!(done >= first, "the daemon's programmed timestamp {done} precedes the burst at {first}");
            let programmed = Duration::from_secs_f64(done - first);
            return Ok(Burst { events: n, sent_in, programmed, last: programmed.saturating_sub(sent_in), syncs, cpu });
        }
        lab.check_alive()?;
        anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "a burst of {n} pod events not programmed within 120 s");
    }
}

/// The labels that put a pod in `sel`, when it only asks for label values.
fn labels_for(sel: &Selector) -> Option<Labels> {
    if sel.requirements.is_empty() {
        return None;
    }
    sel.requirements
        .iter()
        .map(|r| match &r.op {
            Op::In(v) => Some((r.key.clone(), v.first()?.clone())),
            _ => None,
        })
        .collect()
}

/// Remote pods a relabel moves into a peer selector of a policy that selects a pod of `node`:
/// (pod, the labels that move it in), one per pod, policy after policy.
pub fn peer_moves(c: &Cluster, node: &str) -> Vec<(ObjKey, Labels)> {
    let local: Vec<&Pod> = c.pods_on(node).collect();
    let (mut seen, mut out) = (BTreeSet::new(), Vec::new());
    for pol in c.policies.values() {
        if !local.iter().any(|p| p.key.namespace == pol.key.namespace && pol.pod_selector.matches(&p.labels)) {
            continue;
        }
        for peer in pol.ingress.iter().chain(&pol.egress).flat_map(|r| r.peers.iter().flatten()) {
            let Peer::Pods { namespaces, pods } = peer else { continue };
            let Some(want) = labels_for(pods) else { continue };
            for p in c.pods.values() {
                let in_ns = match namespaces {
                    None => p.key.namespace == pol.key.namespace,
                    Some(ns) => ns.matches(&c.namespace_labels(&p.key.namespace)),
                };
                if in_ns && !p.is_on(node) && !pods.matches(&p.labels) && seen.insert(p.key.clone()) {
                    let mut moved = p.labels.clone();
                    moved.extend(want.clone());
                    out.push((p.key.clone(), moved));
                }
            }
        }
    }
    out
}

/// Change i of a series over `moves`: the next pod moved into its peer selector, or, once every
/// one has been, back to the labels it had (and in again on the next round).
pub struct Moves {
    moves: Vec<(ObjKey, Labels, Labels)>,
    next: usize,
}

impl Moves {
    /// The [`peer_moves`] of `node`.
    pub fn new(c: &Cluster, node: &str) -> Moves {
        let moves = peer_moves(c, node).into_iter().map(|(k, to)| (k.clone(), c.pods[&k].labels.clone(), to)).collect();
        Moves { moves, next: 0 }
    }

    pub fn len(&self) -> usize {
        self.moves.len()
    }

    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    pub fn apply(&mut self, c: &mut Cluster) -> ObjKey {
        let (key, from, to) = &self.moves[self.next % self.moves.len()];
        self.next += 1;
        let pod = c.pods.get_mut(key).expect("a pod of the cluster");
        pod.labels = if pod.labels == *to { from.clone() } else { to.clone() };
        key.clone()
    }
}

/// Label changes of remote pods that no selector reads (label `bench-churn`), pod after pod.
pub struct Churn {
    remote: Vec<ObjKey>,
    next: usize,
}

impl Churn {
    pub fn new(c: &Cluster, node: &str) -> Churn {
        Churn { remote: c.pods.values().filter(|p| !p.is_on(node)).map(|p| p.key.clone()).collect(), next: 0 }
    }

    pub fn apply(&mut self, c: &mut Cluster) -> ObjKey {
        let key = self.remote[self.next % self.remote.len()].clone();
        self.next += 1;
        c.pods.get_mut(&key).expect("a pod of the cluster").labels.insert("bench-churn".into(), self.next.to_string());
        key
    }
}

/// Adds the pod closing burst `k`: a new pod of another node in the namespace of a pod of
/// `node`, at an address of its own (10.128.0.0/16).
fn add_closing_pod(c: &mut Cluster, k: usize, node: &str) -> ObjKey {
    let namespace = c.pods_on(node).next().map(|p| p.key.namespace.clone()).unwrap_or_default();
    let remote_node = c.pods.values().find_map(|p| p.node_name.clone().filter(|n| n != node)).unwrap_or_default();
    let key = ObjKey::new(namespace, format!("bench-closing-{k}"));
    let ip = IpAddr::V4(Ipv4Addr::new(10, 128, (k / 250) as u8, (k % 250) as u8 + 1));
    let labels = Labels::from([("app".to_string(), "bench-closing".to_string())]);
    let pod = Pod { key: key.clone(), labels, node_name: Some(remote_node), ips: vec![ip], ports: vec![], host_network: false };
    c.pods.insert(key.clone(), pod);
    key
}

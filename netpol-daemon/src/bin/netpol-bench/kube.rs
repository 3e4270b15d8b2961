//! The real daemon binary in Kubernetes mode: `netpol-daemon run` without `--manifests`,
//! reading the stand-in API server (`testkit::apiserver`, the real list/watch protocol) through
//! a KUBECONFIG, served from inside the daemon's network namespace, on the synthetic cluster
//! with services and EndpointSlices. Then the same daemon on the same cluster as manifests,
//! with the same changes, for the side-by-side table.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use netpol_daemon::compiler::compile_node;
use netpol_daemon::model::{Cluster, ObjKey};
use netpol_daemon::testkit::apiserver::{ApiServer, Resource};
use netpol_daemon::testkit::synth::{self, Shape};
use serde_json::Value;

use crate::daemon::manifests_mode;
use crate::lab::DaemonLab;
use crate::measure::{measure_all, Burst, Feed, Figures, Moves, Plan};
use crate::stats::{median, ms, p99};

/// Pod changes as API objects applied on the server (each one watch event).
struct KubeFeed<'a> {
    server: &'a ApiServer,
}

impl Feed for KubeFeed<'_> {
    type Event = Value;

    fn render(&self, cluster: &Cluster, key: &ObjKey) -> Value {
        synth::pod_json(&cluster.pods[key])
    }

    fn send(&self, pod: Value) -> anyhow::Result<()> {
        self.server.apply("pods", pod);
        Ok(())
    }
}

/// How the daemon's start went on the server's side, and how long a restart took.
struct Start {
    lists: usize,
    watches: usize,
    /// Killed (SIGKILL) after the measurements and started again over its pins: to ready.
    restart: Duration,
    /// Process start to every interface on TCX links (None: some stayed on tc filters).
    all_tcx: Option<Duration>,
}

/// The daemon reading `cluster` from the stand-in API server, measured as `plan` says.
fn kube_mode(daemon: &str, cluster: &Cluster, node: &str, plan: &Plan) -> anyhow::Result<(Figures, Start)> {
    let mut cluster = cluster.clone();
    let local = synth::pods_on(&cluster, node);
    let mut lab = DaemonLab::new(&cluster, &local)?;
    let server = ApiServer::start_in_netns(&lab.netns, "127.0.0.1:0".parse()?)?;
    let mut by_kind: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for obj in synth::objects(&cluster) {
        by_kind.entry(obj["kind"].as_str().unwrap_or_default().to_string()).or_default().push(obj);
    }
    for (kind, objs) in by_kind {
        let res = Resource::of_kind(&kind).ok_or_else(|| anyhow::anyhow!("the stand-in API server does not serve {kind}"))?;
        server.apply_all(res.plural, objs);
    }
    let kubeconfig = lab.path("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let t0 = Instant::now();
    lab.start(daemon, node, &[], &[("KUBECONFIG", kubeconfig.clone().into())])?;
    let ready = lab.wait_ready(t0)?;
    // (The changes are measured once the move to TCX is done: it holds the rtnl lock.)
    let all_tcx = lab.wait_all_tcx(t0)?;
    let requests = server.requests();
    let (lists, watches) =
        (requests.iter().filter(|r| r.method == "GET" && !r.is_watch()).count(), requests.iter().filter(|r| r.is_watch()).count());
    let feed = KubeFeed { server: &server };
    let mut moves = Moves::new(&cluster, node);
    let figures = measure_all(&mut lab, &feed, (&mut cluster, node), ready, plan, &mut moves)?;
    // A crash or an upgrade: the new daemon lists again and adopts the pinned maps and links.
    lab.kill();
    let t1 = Instant::now();
    lab.start(daemon, node, &[], &[("KUBECONFIG", kubeconfig.into())])?;
    let start = Start { lists, watches, restart: lab.wait_ready(t1)?, all_tcx };
    anyhow::ensure!(
        figures.policies == cluster.policies.len() as f64,
        "the daemon was ready with {} of the {} policies",
        figures.policies,
        cluster.policies.len()
    );
    Ok((figures, start))
}

/// Checks that the changes measured change what the node enforces: moving the first remote pod
/// into its peer selector changes the node's compiled policy.
fn check_moves(cluster: &Cluster, node: &str) -> anyhow::Result<usize> {
    let mut moves = Moves::new(cluster, node);
    anyhow::ensure!(!moves.is_empty(), "no remote pod can be moved into a peer selector of a policy of {node}");
    let mut moved = cluster.clone();
    let key = moves.apply(&mut moved);
    anyhow::ensure!(
        compile_node(cluster, node) != compile_node(&moved, node),
        "moving {key} into a peer selector changes nothing on {node}"
    );
    Ok(moves.len())
}

/// `netpol-bench kube DAEMON PODS POLICIES SERVICES CHANGES BURSTS`: the Kubernetes-mode
/// section, and both modes side by side.
pub fn kube_bench(daemon: &str, shape: Shape, plan: Plan) -> anyhow::Result<()> {
    anyhow::ensure!(
        Path::new(daemon).is_file(),
        "usage: netpol-bench kube PATH-TO-netpol-daemon [PODS POLICIES SERVICES CHANGES BURSTS] (no daemon binary at {daemon:?})"
    );
    let cluster = synth::cluster(&shape);
    let node = synth::node_name(0);
    let candidates = check_moves(&cluster, &node)?;
    let (kube, start) = kube_mode(daemon, &cluster, &node, &plan)?;
    let manifests = manifests_mode(daemon, &cluster, &node, &plan)?;
    let local = synth::pods_on(&cluster, &node).len();
    println!(
        "## Kubernetes mode: {} pods on {} nodes, {} policies, {} services + EndpointSlices from the stand-in API server (real daemon process, node of {local} pods)\n",
        shape.pods, shape.nodes, shape.policies, shape.services
    );
    println!("{}", kube_table(&kube, &start, &plan, candidates));
    println!("## Both modes side by side (the same cluster, node and changes; both measured in this run)\n");
    println!("{}", side_by_side(&kube, &manifests, &plan));
    println!(
        "A pod event is one object applied on the API server in Kubernetes mode (one watch event), one namespace file rewritten in \
         manifests mode (written aside, renamed in). Syncs: netpol_syncs_total over the burst.\n"
    );
    Ok(())
}

fn durations(bursts: &[Burst], f: impl Fn(&Burst) -> Duration) -> Vec<Duration> {
    bursts.iter().map(f).collect()
}

fn max(v: &[Duration]) -> Duration {
    v.iter().copied().max().unwrap_or_default()
}

/// The median number of syncs of the bursts.
fn syncs(bursts: &[Burst]) -> f64 {
    let mut v: Vec<f64> = bursts.iter().map(|b| b.syncs).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One table row per burst kind: all programmed (median, max), sent in, syncs, CPU per 1,000.
fn burst_row(what: &str, bursts: &[Burst], goal: &str) -> String {
    let programmed = durations(bursts, |b| b.programmed);
    let sent = durations(bursts, |b| b.sent_in);
    let cpu = durations(bursts, Burst::cpu_per_1000);
    format!(
        "| {what}: first event sent to the last one programmed | {} | | {} | {goal} | sent in {}; {} syncs; daemon CPU {} per 1,000 events; {} burst(s) of {} events and the closing pod |\n",
        ms(median(programmed.clone())),
        ms(max(&programmed)),
        ms(median(sent)),
        syncs(bursts),
        ms(median(cpu)),
        bursts.len(),
        bursts.first().map_or(0, |b| b.events - 1)
    )
}

fn kube_table(k: &Figures, start: &Start, plan: &Plan, candidates: usize) -> String {
    let mut t = String::from("| what | median | p99 | max | goal | detail |\n| --- | --- | --- | --- | --- | --- |\n");
    t += &format!(
        "| start to ready: process start to /readyz 200 (list every resource, compile, program the maps, attach: tc filters, `--attach auto`) | {} | (one run) | | < 3 s | {} endpoints attached, {} policies; {} list requests (pages), {} watches |\n",
        ms(k.ready),
        k.endpoints,
        k.policies,
        start.lists,
        start.watches
    );
    t += &format!(
        "| start to every interface on TCX links (moved from the tc filters in the background after ready; enforced all along) | {} | (one run) | | | netpol_attached_interfaces{{mode=\"tc\"}} 0 |\n",
        start.all_tcx.map_or_else(|| "not all (some stay on tc)".to_string(), ms)
    );
    t += &format!(
        "| restart to ready: the daemon killed (SIGKILL) and started again over its pins (lists again, adopts the maps and the TCX links: no attach) | {} | (one run) | | | |\n",
        ms(start.restart)
    );
    t += &format!(
        "| watch event -> maps programmed: a remote pod relabelled into a peer selector of a local pod's policy (bench clock before ApiServer::apply to the daemon's netpol_last_programmed_timestamp_seconds) | {} | {} | {} | median < 5 ms, p99 < 10 ms | {} changes, {candidates} pods to move |\n",
        ms(median(k.runs.clone())),
        ms(p99(k.runs.clone())),
        ms(max(&k.runs)),
        plan.changes
    );
    t += &format!(
        "| the same, as the daemon's own netpol_programming_latency_seconds (from the watch event's arrival) | {} | {} | {} | | |\n",
        ms(median(k.runs_daemon.clone())),
        ms(p99(k.runs_daemon.clone())),
        ms(max(&k.runs_daemon))
    );
    t += &burst_row("burst of remote pods relabelled into (or out of) peer selectors", &k.moved, "few syncs");
    t += &burst_row("burst of remote pod label changes no selector reads", &k.churned, "few syncs");
    for (what, b) in [("relabelled into (or out of) peer selectors", &k.steady[0]), ("label changes no selector reads", &k.steady[1])] {
        t += &format!(
            "| steady stream of remote pod events at {}/s ({what}): the last one sent to programmed | {} | | | | {} syncs for {} events and the closing pod; daemon CPU {} per 1,000 events |\n",
            plan.steady_rate,
            ms(b.last),
            b.syncs,
            b.events - 1,
            ms(b.cpu_per_1000())
        );
    }
    t += &format!("| peak RSS of the daemon (VmHWM) | {:.1} MiB | | | < 64 MiB | {:.1} MiB once ready |\n", k.hwm, k.ready_hwm);
    t
}

fn side_by_side(k: &Figures, m: &Figures, plan: &Plan) -> String {
    let mut t = String::from("| figure | Kubernetes mode | manifests mode | goal |\n| --- | --- | --- | --- |\n");
    let mut row = |what: &str, kv: String, mv: String, goal: &str| t.push_str(&format!("| {what} | {kv} | {mv} | {goal} |\n"));
    row("start to ready", ms(k.ready), ms(m.ready), "< 3 s");
    row("peak RSS (VmHWM)", format!("{:.1} MiB", k.hwm), format!("{:.1} MiB", m.hwm), "< 64 MiB");
    let changes = format!("remote pod relabelled into a peer selector -> maps programmed ({} changes)", plan.changes);
    row(&format!("{changes}, median"), ms(median(k.runs.clone())), ms(median(m.runs.clone())), "< 5 ms");
    row(&format!("{changes}, p99"), ms(p99(k.runs.clone())), ms(p99(m.runs.clone())), "< 10 ms");
    row(&format!("{changes}, max"), ms(max(&k.runs)), ms(max(&m.runs)), "");
    let n = plan.burst_events;
    for (what, kb, mb) in [("relabelled into peer selectors", &k.moved, &m.moved), ("a label no selector reads", &k.churned, &m.churned)] {
        let p = |b: &[Burst]| format!("{} ({} syncs)", ms(median(durations(b, |b| b.programmed))), syncs(b));
        row(&format!("burst of {n} remote pod events ({what}) -> all programmed"), p(kb), p(mb), "few syncs");
        let c = |b: &[Burst]| ms(median(durations(b, Burst::cpu_per_1000)));
        row(&format!("daemon CPU time per 1,000 remote pod events in a burst ({what})"), c(kb), c(mb), "");
    }
    let steady = |b: &Burst| format!("{} ({} syncs)", ms(b.cpu_per_1000()), b.syncs);
    for (i, what) in ["relabelled into peer selectors", "a label no selector reads"].iter().enumerate() {
        let what = format!("daemon CPU time per 1,000 remote pod events at a steady {}/s ({what})", plan.steady_rate);
        row(&what, steady(&k.steady[i]), steady(&m.steady[i]), "");
    }
    t
}

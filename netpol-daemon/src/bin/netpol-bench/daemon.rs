//! The real daemon binary on the synthetic cluster, as manifests (one file per namespace), in
//! a network namespace of its own where each local pod has an interface ([`DaemonLab`]): start
//! to ready, pod label changes from the file write to the maps updated, and the daemon's peak
//! RSS. [`manifests_mode`] runs the same daemon for the side-by-side with the Kubernetes mode.
use std::path::Path;
use std::time::Instant;

use netpol_daemon::model::{Cluster, ObjKey};
use netpol_daemon::testkit::synth::{self, Shape};

use crate::lab::DaemonLab;
use crate::measure::{measure_all, single_changes, Feed, Figures, Moves, Plan};
use crate::stats::{median, ms, p99};

/// Pod changes as rewritten namespace files (written aside, renamed in: the file changes at
/// once, as a ConfigMap update does).
pub struct ManifestsFeed {
    dir: std::path::PathBuf,
}

impl ManifestsFeed {
    /// Writes every namespace's file into `lab`'s manifests directory.
    pub fn new(lab: &DaemonLab, cluster: &Cluster) -> anyhow::Result<(ManifestsFeed, usize)> {
        let feed = ManifestsFeed { dir: lab.path("manifests") };
        std::fs::create_dir_all(&feed.dir)?;
        let files = synth::manifests(cluster);
        for (ns, text) in &files {
            feed.write(ns, text)?;
        }
        Ok((feed, files.len()))
    }

    fn write(&self, ns: &str, text: &str) -> anyhow::Result<()> {
        let tmp = self.dir.join(format!(".{ns}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.dir.join(format!("{ns}.json")))?;
        Ok(())
    }

    /// The daemon arguments that read this directory.
    fn args(&self) -> Vec<std::ffi::OsString> {
        vec!["--manifests".into(), self.dir.clone().into()]
    }
}

impl Feed for ManifestsFeed {
    type Event = (String, String);

    fn render(&self, cluster: &Cluster, key: &ObjKey) -> (String, String) {
        (key.namespace.clone(), synth::namespace_manifest(cluster, &key.namespace))
    }

    fn send(&self, (ns, text): (String, String)) -> anyhow::Result<()> {
        self.write(&ns, &text)
    }
}

pub fn daemon_bench(daemon: &str, pods: usize, policies: usize, changes: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        Path::new(daemon).is_file(),
        "usage: netpol-bench daemon PATH-TO-netpol-daemon [PODS] [POLICIES] [CHANGES] (no daemon binary at {daemon:?})"
    );
    let mut cluster = synth::cluster(&Shape::new(pods, policies));
    let node = synth::node_name(0);
    let local = synth::pods_on(&cluster, &node);
    let mut lab = DaemonLab::new(&cluster, &local)?;
    let (feed, files) = ManifestsFeed::new(&lab, &cluster)?;
    let t0 = Instant::now();
    lab.start(daemon, &node, &feed.args(), &[])?;
    let ready = lab.wait_ready(t0)?;
    // (The changes are measured once the move to TCX is done, as in Kubernetes mode: it holds
    // the rtnl lock.)
    lab.wait_all_tcx(t0)?;
    let endpoints = lab.metric("netpol_endpoints").unwrap_or(0.0);
    println!(
        "## Daemon: {pods} pods, {policies} policies as manifests, node of {} pods (real daemon process, programs attached)\n",
        local.len()
    );
    println!("| what | median | p99 | detail |\n| --- | --- | --- | --- |");
    println!(
        "| start to ready (parse {files} files, compile, program maps, attach) | {} | (one run) | {endpoints} endpoints attached |",
        ms(ready)
    );
    // Local pods relabelled one at a time.
    let relabel = |c: &mut Cluster, i: usize| {
        let key = local[i % local.len()].clone();
        c.pods.get_mut(&key).unwrap().labels.insert("app".into(), format!("relabelled-{i}"));
        key
    };
    let (runs, runs_daemon) = single_changes(&mut lab, &feed, &mut cluster, changes, relabel)?;
    println!(
        "| one pod label change: file written to maps updated (bench clock before the write to the daemon's netpol_last_programmed_timestamp_seconds; the daemon wakes on inotify, reads only that file, updates incrementally) | {} | {} | {changes} changes |",
        ms(median(runs.clone())),
        ms(p99(runs))
    );
    println!(
        "| the same, as the daemon's own netpol_programming_latency_seconds (from the inotify wake-up) | {} | {} | {changes} changes |",
        ms(median(runs_daemon.clone())),
        ms(p99(runs_daemon))
    );
    let (hwm, rss) = lab.memory_mib()?;
    println!("\nPeak RSS of the daemon process: {hwm:.1} MiB (VmHWM; {rss:.1} MiB resident now).\n");
    Ok(())
}

/// The daemon reading `cluster` as manifests, measured as `plan` says (for the side-by-side).
pub fn manifests_mode(daemon: &str, cluster: &Cluster, node: &str, plan: &Plan) -> anyhow::Result<Figures> {
    let mut cluster = cluster.clone();
    let local = synth::pods_on(&cluster, node);
    let mut lab = DaemonLab::new(&cluster, &local)?;
    let (feed, _) = ManifestsFeed::new(&lab, &cluster)?;
    let t0 = Instant::now();
    lab.start(daemon, node, &feed.args(), &[])?;
    let ready = lab.wait_ready(t0)?;
    lab.wait_all_tcx(t0)?;
    let mut moves = Moves::new(&cluster, node);
    measure_all(&mut lab, &feed, (&mut cluster, node), ready, plan, &mut moves)
}

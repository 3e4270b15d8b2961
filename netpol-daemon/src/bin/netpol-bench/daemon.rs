//! The real daemon binary on the synthetic cluster, as manifests (one file per namespace), in
//! a network namespace of its own where each local pod has an interface (a veth device with
//! a /32 route, which is all the daemon looks for): start to ready, pod label changes from the
//! file write to the maps updated, and the daemon's peak RSS.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netpol_daemon::metrics::{http_get, sample};
use netpol_daemon::model::{Cluster, ObjKey};
use netpol_daemon::testkit::synth::{self, Shape};

use crate::stats::{median, ms, p99, sh};

/// Where the daemon's metrics are served inside its network namespace.
const METRICS: &str = "127.0.0.1:9090";

/// The bench's network namespace, manifests directory and pin directory; all removed on drop
/// (also when a measurement fails half-way), the daemon stopped first.
struct DaemonLab {
    netns: String,
    dir: PathBuf,
    pin: String,
    daemon: Option<Child>,
}

impl DaemonLab {
    /// A namespace with one veth and /32 route per local pod, and an empty manifests directory.
    fn new(cluster: &Cluster, local: &[ObjKey]) -> anyhow::Result<DaemonLab> {
        let id = std::process::id();
        // On tmpfs where there is one (as a ConfigMap or projected volume is): the figure is
        // the daemon's, not the disk's.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() }.join(format!("npbench-{id}"));
        let lab = DaemonLab { netns: format!("npbench-{id}"), dir, pin: format!("/sys/fs/bpf/npbench-{id}"), daemon: None };
        let _ = std::fs::remove_dir_all(&lab.dir);
        std::fs::create_dir_all(lab.manifests())?;
        sh("ip", &["netns", "add", &lab.netns])?;
        let mut batch = String::from("link set lo up\n");
        for (i, k) in local.iter().enumerate() {
            let ip = cluster.pods[k].ips[0];
            batch.push_str(&format!("link add bd{i} type veth peer name bp{i}\nlink set bd{i} up\nroute add {ip}/32 dev bd{i}\n"));
        }
        let bf = lab.dir.join("batch");
        std::fs::write(&bf, batch)?;
        sh("ip", &["-n", &lab.netns, "-batch", &bf.to_string_lossy()])?;
        Ok(lab)
    }

    fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Replaces a namespace's manifest file at once (written aside, renamed in).
    fn write(&self, ns: &str, text: &str) -> anyhow::Result<()> {
        let tmp = self.dir.join(format!(".{ns}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.manifests().join(format!("{ns}.json")))?;
        Ok(())
    }

    fn start(&mut self, daemon: &str, node: &str) -> anyhow::Result<u32> {
        let log = std::fs::File::create(std::env::temp_dir().join(format!("npbench-{}.log", std::process::id())))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.netns))
            .arg(daemon)
            .args(["run", "--node-name", node, "--manifests"])
            .arg(self.manifests())
            .args(["--metrics-addr", METRICS, "--bpffs", &self.pin])
            .env("RUST_LOG", std::env::var("NETPOL_BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let pid = child.id();
        self.daemon = Some(child);
        Ok(pid)
    }

    fn get(&self, path: &'static str) -> Option<(u16, String)> {
        let addr: SocketAddr = METRICS.parse().expect("valid");
        netpol_daemon::testkit::lab::in_netns(&self.netns, move || http_get(addr, path)).ok().and_then(|r| r.ok())
    }

    fn metric(&self, name: &str) -> Option<f64> {
        self.get("/metrics").and_then(|(_, m)| sample(&m, name))
    }

    fn wait_ready(&self, since: Instant) -> anyhow::Result<Duration> {
        while !matches!(self.get("/readyz"), Some((200, _))) {
            anyhow::ensure!(since.elapsed() < Duration::from_secs(120), "daemon not ready after 120 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(since.elapsed())
    }

    /// The daemon's own programming-latency histogram (file mtime or inotify wake-up to maps
    /// updated): count and sum.
    fn latency_histogram(&self) -> (f64, f64) {
        let m = self.get("/metrics").map(|(_, b)| b).unwrap_or_default();
        (
            sample(&m, "netpol_programming_latency_seconds_count").unwrap_or(0.0),
            sample(&m, "netpol_programming_latency_seconds_sum").unwrap_or(0.0),
        )
    }
}

impl Drop for DaemonLab {
    fn drop(&mut self) {
        if let Some(c) = self.daemon.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "delete", &self.netns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

pub fn daemon_bench(daemon: &str, pods: usize, policies: usize, changes: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        Path::new(daemon).is_file(),
        "usage: netpol-bench daemon PATH-TO-netpol-daemon [PODS] [POLICIES] [CHANGES] (no daemon binary at {daemon:?})"
    );
    let shape = Shape::new(pods, policies);
    let mut cluster = synth::cluster(&shape);
    let node = synth::node_name(0);
    let local = synth::pods_on(&cluster, &node);
    let mut lab = DaemonLab::new(&cluster, &local)?;
    let files = synth::manifests(&cluster);
    for (ns, text) in &files {
        lab.write(ns, text)?;
    }
    let t0 = Instant::now();
    let pid = lab.start(daemon, &node)?;
    let ready = lab.wait_ready(t0)?;
    let endpoints = lab.metric("netpol_endpoints").unwrap_or(0.0);
    println!(
        "## Daemon: {pods} pods, {policies} policies as manifests, node of {} pods (real daemon process, programs attached)\n",
        local.len()
    );
    println!("| what | median | p99 | detail |\n| --- | --- | --- | --- |");
    println!(
        "| start to ready (parse {} files, compile, program maps, attach) | {} | (one run) | {endpoints} endpoints attached |",
        files.len(),
        ms(ready)
    );
    let (runs, runs_daemon) = label_changes(&lab, &mut cluster, &local, changes)?;
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib =
        |k: &str| status.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).unwrap_or(0);
    println!(
        "\nPeak RSS of the daemon process: {:.1} MiB (VmHWM; {:.1} MiB resident now).\n",
        kib("VmHWM:") as f64 / 1024.0,
        kib("VmRSS:") as f64 / 1024.0
    );
    Ok(())
}

/// Relabels local pods one at a time, each a rewritten namespace file, and times every change
/// on two clocks: the bench's own (read just before the write, to the daemon's
/// netpol_last_programmed_timestamp_seconds), and the daemon's histogram, which starts when
/// the inotify event woke it (or at the file's mtime, a coarse timestamp, when the event waited
/// for a busy loop).
fn label_changes(
    lab: &DaemonLab,
    cluster: &mut Cluster,
    local: &[ObjKey],
    changes: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let (mut runs, mut runs_daemon) = (Vec::new(), Vec::new());
    for i in 0..changes {
        let key = local[i % local.len()].clone();
        let (count, sum) = lab.latency_histogram();
        cluster.pods.get_mut(&key).unwrap().labels.insert("app".into(), format!("relabelled-{i}"));
        let text = synth::namespace_manifest(cluster, &key.namespace);
        let t = Instant::now();
        let written = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
        lab.write(&key.namespace, &text)?;
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
            anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "no sync after a label change");
        }
    }
    Ok((runs, runs_daemon))
}

//! The real daemon binary in a network namespace of its own where each local pod has an
//! interface (a veth device with a /32 route, which is all the daemon looks for), shared by the
//! manifests-mode and Kubernetes-mode benches: starting it, reading its /metrics and /readyz,
//! its memory and CPU time. Everything is removed on drop (also when a measurement fails
//! half-way), on Ctrl-C ([`cleanup_all`]), and by the next bench when this process died.
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use netpol_daemon::metrics::{http_get, sample};
use netpol_daemon::model::{Cluster, ObjKey};

use crate::stats::sh;

/// Where the daemon's metrics are served inside its network namespace.
const METRICS: &str = "127.0.0.1:9977";
const PREFIX: &str = "npbench-";

static LABS: AtomicU32 = AtomicU32::new(0);

/// What a Ctrl-C must remove of a live lab.
struct Live {
    netns: String,
    dirs: Vec<PathBuf>,
    daemon: Option<u32>,
}

static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

/// Stops every daemon and removes every lab of this process (for a Ctrl-C handler).
pub fn cleanup_all() {
    for live in LIVE.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        if let Some(pid) = live.daemon {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        remove(&live.netns, &live.dirs);
    }
}

fn remove(netns: &str, dirs: &[PathBuf]) {
    let _ = Command::new("ip").args(["netns", "delete", netns]).stderr(Stdio::null()).status();
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Removes the labs of bench processes that no longer exist (killed before they could).
fn reap_stale() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove(&name, &[scratch_root().join(&name), PathBuf::from(format!("/sys/fs/bpf/{name}"))]);
        }
    }
}

/// On tmpfs where there is one (as a ConfigMap or projected volume is): the figures are the
/// daemon's, not the disk's.
fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// The bench's network namespace, scratch directory and pin directory, and the daemon.
pub struct DaemonLab {
    pub netns: String,
    dir: PathBuf,
    pin: PathBuf,
    log: PathBuf,
    daemon: Option<Child>,
}

impl DaemonLab {
    /// A namespace with one veth and /32 route per local pod, and an empty scratch directory.
    pub fn new(cluster: &Cluster, local: &[ObjKey]) -> anyhow::Result<DaemonLab> {
        reap_stale();
        let name = format!("{PREFIX}{}-{}", std::process::id(), LABS.fetch_add(1, Ordering::SeqCst));
        let lab = DaemonLab {
            dir: scratch_root().join(&name),
            pin: PathBuf::from(format!("/sys/fs/bpf/{name}")),
            log: std::env::temp_dir().join(format!("{name}.log")),
            netns: name,
            daemon: None,
        };
        LIVE.lock().unwrap().push(Live { netns: lab.netns.clone(), dirs: vec![lab.dir.clone(), lab.pin.clone()], daemon: None });
        let _ = std::fs::remove_dir_all(&lab.dir);
        let _ = std::fs::remove_dir_all(&lab.pin);
        std::fs::create_dir_all(&lab.dir)?;
        sh("ip", &["netns", "add", &lab.netns])?;
        let mut batch = String::from("link set lo up\n");
        for (i, k) in local.iter().enumerate() {
            let ip = cluster.pods[k].ips[0];
            batch.push_str(&format!("link add bd{i} type veth peer name bp{i}\nlink set bd{i} up\nroute add {ip}/32 dev bd{i}\n"));
        }
        let bf = lab.path("batch");
        std::fs::write(&bf, batch)?;
        sh("ip", &["-n", &lab.netns, "-batch", &bf.to_string_lossy()])?;
        Ok(lab)
    }

    /// A path in the lab's scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Starts `netpol-daemon run --node-name NODE` in the namespace, with `source` (the
    /// arguments naming where it reads the cluster) and `env` set; returns its pid. Its log
    /// goes to a file named in errors; it dies with this process.
    pub fn start(&mut self, daemon: &str, node: &str, source: &[OsString], env: &[(&str, OsString)]) -> anyhow::Result<u32> {
        // Appended: a restarted daemon's log follows the first one's.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.netns))
            .arg(daemon)
            .args(["run", "--node-name", node])
            .args(source)
            .args(["--metrics-addr", METRICS, "--bpffs"])
            .arg(&self.pin)
            // Extra daemon flags for an experiment (`--attach tc`); none in `cargo xtask bench`.
            .args(std::env::var("NETPOL_BENCH_DAEMON_ARGS").unwrap_or_default().split_whitespace())
            .env("RUST_LOG", std::env::var("NETPOL_BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log);
        // nsenter execs the daemon (no fork for --net): the signal reaches the daemon itself.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        let child = cmd.spawn()?;
        let pid = child.id();
        self.daemon = Some(child);
        if let Some(live) = LIVE.lock().unwrap().iter_mut().find(|l| l.netns == self.netns) {
            live.daemon = Some(pid);
        }
        Ok(pid)
    }

    /// Kills the daemon (SIGKILL, as a crash or an OOM kill would) and reaps it; its pins stay.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// An error when the daemon is no longer running, with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.daemon.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
            anyhow::bail!("the daemon exited ({st}); the end of its log {}:\n{}", self.log.display(), tail.join("\n"));
        }
        Ok(())
    }

    pub fn get(&self, path: &'static str) -> Option<(u16, String)> {
        let addr: SocketAddr = METRICS.parse().expect("valid");
        netpol_daemon::testkit::lab::in_netns(&self.netns, move || http_get(addr, path)).ok().and_then(|r| r.ok())
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        sample(&self.metrics(), name)
    }

    pub fn wait_ready(&mut self, since: Instant) -> anyhow::Result<Duration> {
        while !matches!(self.get("/readyz"), Some((200, _))) {
            self.check_alive()?;
            anyhow::ensure!(since.elapsed() < Duration::from_secs(180), "daemon not ready after 180 s (log: {})", self.log.display());
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(since.elapsed())
    }

    /// Waits (after ready) until every attached interface runs the programs from TCX links
    /// (`--attach auto` attaches by tc first and moves them in the background); the time since
    /// `since`, or None when some stay on tc (no TCX, or `--attach tc`) for 60 s.
    pub fn wait_all_tcx(&mut self, since: Instant) -> anyhow::Result<Option<Duration>> {
        let t0 = Instant::now();
        loop {
            let m = self.metrics();
            let tc = sample(&m, "netpol_attached_interfaces{mode=\"tc\"}");
            if tc == Some(0.0) {
                return Ok(Some(since.elapsed()));
            }
            self.check_alive()?;
            if t0.elapsed() > Duration::from_secs(60) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The daemon's own programming-latency histogram (from the change being observed to the
    /// maps updated): count and sum.
    pub fn latency_histogram(&self) -> (f64, f64) {
        let m = self.metrics();
        (
            sample(&m, "netpol_programming_latency_seconds_count").unwrap_or(0.0),
            sample(&m, "netpol_programming_latency_seconds_sum").unwrap_or(0.0),
        )
    }

    /// The daemon's peak and current resident memory (VmHWM, VmRSS), MiB.
    pub fn memory_mib(&self) -> anyhow::Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kib =
            |k: &str| status.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).unwrap_or(0);
        Ok((kib("VmHWM:") as f64 / 1024.0, kib("VmRSS:") as f64 / 1024.0))
    }

    /// The CPU time the daemon has used so far, all threads (utime + stime of /proc/PID/stat,
    /// in clock ticks: 10 ms on most kernels).
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the command name (which may hold spaces): state is field 3, utime 14.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
        anyhow::ensure!(f.len() == 2, "/proc/{}/stat: no utime and stime", self.pid());
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Ok(Duration::from_secs_f64((f[0] + f[1]) as f64 / hz))
    }
}

impl Drop for DaemonLab {
    fn drop(&mut self) {
        if let Some(c) = self.daemon.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).retain(|l| l.netns != self.netns);
        remove(&self.netns, &[self.dir.clone(), self.pin.clone()]);
    }
}

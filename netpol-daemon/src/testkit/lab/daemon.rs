//! The daemon under test in a lab: started in the node namespace (on the lab's manifests or in
//! Kubernetes mode), its log, its metrics endpoint, and waiting for it to sync.
use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{in_netns, Lab, METRICS_PORT, NODE_NAME, REGISTRY};

impl Lab {
    /// Starts `netpol-daemon run` on the lab's manifests inside the node namespace and waits
    /// for /readyz.
    pub fn start_daemon(&mut self, daemon_bin: &Path) -> Result<()> {
        let mut cmd = self.daemon_command(daemon_bin);
        cmd.arg("--manifests").arg(self.manifests_dir());
        self.spawn_daemon(cmd)
    }

    /// Starts `netpol-daemon run` in Kubernetes mode, reading the API server `kubeconfig`
    /// names (the stand-in server, serving in the node namespace), and waits for /readyz.
    pub fn start_daemon_kube(&mut self, daemon_bin: &Path, kubeconfig: &Path) -> Result<()> {
        let mut cmd = self.daemon_command(daemon_bin);
        cmd.env("KUBECONFIG", kubeconfig).env_remove("KUBERNETES_SERVICE_HOST");
        self.spawn_daemon(cmd)
    }

    /// `netpol-daemon run` for the lab's node, its metrics address and its pin directory.
    fn daemon_command(&self, daemon_bin: &Path) -> Command {
        // nsenter switches only the network namespace: the daemon sees the host's bpffs, as a
        // DaemonSet with a /sys/fs/bpf hostPath does (`ip netns exec` would remount /sys, and
        // pins would die with the daemon's private mount namespace).
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.node_netns))
            .arg(daemon_bin)
            .args(["run", "--node-name", NODE_NAME])
            .args(["--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}"), "--bpffs"])
            .arg(&self.pin_dir)
            .args(&self.daemon_args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        cmd
    }

    fn spawn_daemon(&mut self, mut cmd: Command) -> Result<()> {
        let log = File::create(self.dir.join("daemon.log"))?;
        let child = cmd.stdout(log.try_clone()?).stderr(log).spawn().context("starting netpol-daemon")?;
        REGISTRY.lock().unwrap().children.push(child.id());
        self.daemon = Some(child);
        let t0 = Instant::now();
        loop {
            if let Some(c) = self.daemon.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("netpol-daemon exited with {st}:\n{}", self.daemon_log());
                }
            }
            if matches!(self.http_get("/readyz"), Ok((200, _))) {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("netpol-daemon not ready after 30 s:\n{}", self.daemon_log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the daemon (SIGKILL) and reaps it.
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The maps (by name) of each BPF program loaded on this machine that uses this lab's
    /// pinned `ENDPOINTS_ARRAY`: the programs enforcing here, a previous daemon's until the
    /// kernel frees them (they may still run until the current daemon swapped its own in).
    pub fn programs_maps(&self) -> Result<Vec<Vec<String>>> {
        use aya::maps::{MapData, MapInfo};
        let pinned = self.pin_dir.join(netpol_common::maps::ENDPOINTS_ARRAY);
        let ours = MapData::from_pin(&pinned).with_context(|| format!("opening {}", pinned.display()))?.info()?.id();
        let mut out = Vec::new();
        for p in aya::programs::loaded_programs().flatten() {
            let ids = p.map_ids()?.unwrap_or_default();
            if ids.contains(&ours) {
                out.push(ids.iter().filter_map(|id| MapInfo::from_id(*id).ok()?.name_as_str().map(str::to_string)).collect());
            }
        }
        Ok(out)
    }

    /// The names of the daemon's threads.
    pub fn daemon_threads(&self) -> Vec<String> {
        let Some(pid) = self.daemon_pid() else { return Vec::new() };
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
        tasks.filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok()).map(|c| c.trim().to_string()).collect()
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        let path = path.to_string();
        let addr = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
        Ok(in_netns(&self.node_netns, move || crate::metrics::http_get(addr, &path))??)
    }

    pub fn metrics(&self) -> Result<String> {
        let (code, body) = self.http_get("/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(body)
    }

    /// Waits until the daemon has applied the current manifests (a sync after `since_syncs`).
    pub fn wait_synced(&self, since_syncs: f64) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let m = self.metrics()?;
            if crate::metrics::sample(&m, "netpol_syncs_total").is_some_and(|v| v > since_syncs) {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(15) {
                bail!("daemon did not resync:\n{}", self.daemon_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn syncs(&self) -> f64 {
        self.metrics().ok().and_then(|m| crate::metrics::sample(&m, "netpol_syncs_total")).unwrap_or(0.0)
    }

    /// Writes a manifest and waits until the daemon has programmed it.
    pub fn apply(&self, name: &str, text: &str) -> Result<()> {
        let before = self.syncs();
        self.write_manifest(name, text)?;
        self.wait_synced(before)
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let before = self.syncs();
        self.remove_manifest(name)?;
        self.wait_synced(before)
    }
}

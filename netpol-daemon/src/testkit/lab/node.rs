//! What the node's kernel holds for the lab's daemon, read with the tools an operator would
//! use (`tc`), and `netpol-daemon uninstall` run on the node.
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::Lab;

impl Lab {
    /// Stops the daemon as a rollout does (SIGTERM), waits for it to exit; returns its exit
    /// status' success.
    pub fn stop_daemon(&mut self) -> Result<bool> {
        let Some(mut c) = self.daemon.take() else { bail!("no daemon running") };
        // SAFETY: signalling our own child, which has not been reaped yet.
        if unsafe { libc::kill(c.id() as i32, libc::SIGTERM) } != 0 {
            bail!("SIGTERM to the daemon: {}", std::io::Error::last_os_error());
        }
        Ok(c.wait()?.success())
    }

    /// The filters on `hook` (`ingress` or `egress`) of the node-side interface `ifname`, one
    /// line each (`tc filter show`'s lines that carry a handle, i.e. filters, not chains).
    pub fn tc_filters(&self, ifname: &str, hook: &str) -> Result<Vec<String>> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.node_netns))
            .args(["tc", "filter", "show", "dev", ifname, hook])
            .output()
            .context("running tc filter show")?;
        if !out.status.success() {
            bail!("tc filter show dev {ifname} {hook}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(" handle ")).map(str::to_string).collect())
    }

    /// Runs `netpol-daemon uninstall` for the lab's pins inside the node namespace (as the
    /// uninstall Job does on a node); returns what it printed.
    pub fn uninstall(&self, daemon_bin: &Path) -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.node_netns))
            .arg(daemon_bin)
            .args(["uninstall", "--bpffs"])
            .arg(&self.pin_dir)
            .output()
            .context("running netpol-daemon uninstall")?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("netpol-daemon uninstall failed ({}): {text}", out.status);
        }
        Ok(text)
    }
}

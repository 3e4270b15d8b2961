//! Shared measuring helpers: medians, percentiles, peak memory, scratch bpffs directories.
use std::time::Duration;

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

pub fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(cmd).args(args).output()?;
    anyhow::ensure!(out.status.success(), "{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// A bpffs directory of the benchmark's own maps, removed when dropped (also when a
/// benchmark fails half-way).
pub struct PinDir(pub std::path::PathBuf);

impl PinDir {
    pub fn new(path: String) -> PinDir {
        let p = std::path::PathBuf::from(path);
        let _ = std::fs::remove_dir_all(&p);
        PinDir(p)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

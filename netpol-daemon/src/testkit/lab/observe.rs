//! `netpol-daemon observe` run as a child process in the lab's node namespace (where the
//! daemon's endpoint listens), its output lines collected by a thread as they come.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{Lab, METRICS_PORT, REGISTRY};

/// A running `observe`: its stdout lines (keep-alives are not among them) and its stderr.
pub struct Observer {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    pub args: Vec<String>,
}

impl Lab {
    /// Starts `netpol-daemon observe ARGS --addr 127.0.0.1:METRICS_PORT` in the node namespace
    /// and waits until it says it is observing (the daemon sends every flow decided from then).
    pub fn observe(&self, daemon_bin: &Path, args: &[&str]) -> Result<Observer> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.node_netns))
            .arg(daemon_bin)
            .arg("observe")
            .args(args)
            .args(["--addr", &format!("127.0.0.1:{METRICS_PORT}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting netpol-daemon observe")?;
        REGISTRY.lock().unwrap().children.push(child.id());
        let lines = forward(child.stdout.take().expect("piped"));
        let stderr = forward(child.stderr.take().expect("piped"));
        let mut o = Observer { child, lines, stderr, args: args.iter().map(|a| a.to_string()).collect() };
        let t0 = Instant::now();
        loop {
            match o.stderr.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.contains("observing node") => return Ok(o),
                Ok(l) => bail!("observe {args:?}: {l}"),
                Err(_) if t0.elapsed() > Duration::from_secs(10) => bail!("observe {args:?} did not start in 10 s"),
                Err(_) => {}
            }
            if let Some(st) = o.child.try_wait()? {
                bail!("observe {args:?} exited with {st}");
            }
        }
    }
}

/// Lines of `r`, sent as they are read.
fn forward(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

impl Observer {
    /// The lines printed so far and within `wait` from now, until `done` holds for all of them.
    pub fn lines_until(&self, wait: Duration, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let t0 = Instant::now();
        let mut got = Vec::new();
        while t0.elapsed() < wait {
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(l) => got.push(l),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if done(&got) {
                break;
            }
        }
        got
    }

    /// Every line printed within `wait` from now.
    pub fn lines_for(&self, wait: Duration) -> Vec<String> {
        self.lines_until(wait, |_| false)
    }

    /// Stops it (SIGTERM, as Ctrl-C would) and waits for it.
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        let pid = self.child.id();
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).children.retain(|p| *p != pid);
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.end();
        }
    }
}

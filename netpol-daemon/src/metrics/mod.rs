//! The metrics and health endpoint: `GET /metrics` (Prometheus text format), `GET /readyz`
//! (200 once the first full sync is programmed), `GET /healthz` (200 while the daemon loop
//! passes, [`health`]). An HTTP server on a tokio runtime of its own ([`http`]); counters are
//! read straight from the pinned BPF maps at each scrape. The daemon fills the [`Status`] in
//! ([`status`]), [`render`] writes it out through the `prometheus` crate (with the process
//! metrics and [`build_info`]), and [`flows`] names the flow events the programs send, logs
//! the denials and streams them to `observe` clients: the end of the flow, reading the
//! datapath and writing nothing of it but (through the daemon's [`flows::hub::EventSink`])
//! which flow events the programs send.
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::core::Collector;

use crate::datapath::CounterReader;

pub mod build_info;
pub mod flows;
pub mod health;
pub mod http;
pub mod kube_events;
mod render;
pub mod status;

pub use health::{Heartbeat, Liveness};
pub use render::{render, Families, DROP_REASONS};
pub use status::{Histogram, Status, Synced, LATENCY_BUCKETS};

/// What the daemon loop and the metrics thread share.
#[derive(Default)]
pub struct Shared {
    pub ready: AtomicBool,
    pub status: Mutex<Status>,
    /// What the Kubernetes Events reporter wrote and dropped ([`kube_events`]).
    pub kube_events: Arc<kube_events::Counters>,
    /// Stamped by the daemon loop as each pass begins (`/healthz`).
    pub heartbeat: Heartbeat,
    /// The flow stream's clients and what the programs send for them.
    pub flows: Arc<flows::FlowHub>,
}

impl Shared {
    /// `/readyz`: the status code and body.
    pub fn readiness(&self) -> (u16, &'static str) {
        if !self.ready.load(Ordering::SeqCst) {
            (503, "not synced yet\n")
        } else if self.status.lock().unwrap().source_down {
            (503, "Kubernetes API unreachable; enforcing the last known state\n")
        } else {
            (200, "ready\n")
        }
    }

    /// `/healthz`: the status code and body.
    pub fn liveness(&self) -> (u16, String) {
        match self.heartbeat.check(Instant::now()) {
            Liveness::Alive(_) => (200, "ok\n".to_string()),
            Liveness::Stuck(age) => (503, format!("the daemon loop's last pass began {:.1} s ago\n", age.as_secs_f64())),
        }
    }
}

/// What a scrape reads: the shared status, the pinned maps (opened once the datapath is
/// loaded and synced) and the process.
pub struct Scraper {
    pub shared: Arc<Shared>,
    pin_dir: PathBuf,
    counters: Mutex<Option<CounterReader>>,
    process: prometheus::process_collector::ProcessCollector,
}

impl Scraper {
    pub fn new(shared: Arc<Shared>, pin_dir: PathBuf) -> Scraper {
        Scraper { shared, pin_dir, counters: Mutex::new(None), process: prometheus::process_collector::ProcessCollector::for_self() }
    }

    /// The text of `/metrics`.
    pub fn scrape(&self) -> String {
        let ready = self.shared.ready.load(Ordering::SeqCst);
        let mut counters = self.counters.lock().unwrap();
        if counters.is_none() && ready {
            *counters = CounterReader::open(&self.pin_dir).map_err(|e| tracing::debug!("metrics: {e:#}")).ok();
        }
        let status = self.shared.status.lock().unwrap().clone();
        let mut out = Families::default();
        render::families(&status, ready, counters.as_ref(), &mut out);
        self.shared.kube_events.families(&mut out);
        self.shared.flows.families(&mut out);
        out.gauge(
            "netpol_last_pass_age_seconds",
            "Seconds since the daemon loop's last pass began (/healthz fails above --liveness-timeout).",
        )
        .sample(&[], self.shared.heartbeat.age(Instant::now()).as_secs_f64());
        build_info::family(&mut out);
        out.extend(self.process.collect());
        out.encode()
    }
}

/// Serves until the process exits. `counters` are opened lazily (the maps exist once loaded).
pub fn serve(addr: SocketAddr, shared: Arc<Shared>, pin_dir: PathBuf) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    http::spawn(listener, Arc::new(Scraper::new(shared, pin_dir)))
}

/// A minimal HTTP GET for tests and tools (status code and body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// Value of one sample in Prometheus text (exact label set match).
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests;

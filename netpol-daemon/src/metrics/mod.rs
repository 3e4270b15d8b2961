//! The metrics and health endpoint: `GET /metrics` (Prometheus text format), `GET /readyz`
//! (200 once the first full sync is programmed), `GET /healthz`. A tiny HTTP/1.1 server on a
//! thread of its own; counters are read straight from the pinned BPF map. The daemon fills the
//! [`Status`] in ([`status`]), [`render`] writes it out, and [`events`] logs the deny events the
//! programs send: the end of the flow, reading the datapath and never writing it.
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::datapath::CounterReader;

pub mod events;
pub mod kube_events;
mod render;
pub mod status;

pub use render::render;
pub use status::{Histogram, Status, Synced, LATENCY_BUCKETS};

/// What the daemon loop and the metrics thread share.
#[derive(Default)]
pub struct Shared {
    pub ready: AtomicBool,
    pub status: Mutex<Status>,
    /// What the Kubernetes Events reporter wrote and dropped ([`kube_events`]).
    pub kube_events: Arc<kube_events::Counters>,
}

fn respond(mut s: TcpStream, code: u16, reason: &str, ctype: &str, body: &str) {
    let _ =
        write!(s, "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
}

fn handle(s: TcpStream, shared: &Shared, counters: &Option<CounterReader>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut r = BufReader::new(match s.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    if r.read_line(&mut line).is_err() {
        return;
    }
    // Drain headers.
    let mut h = String::new();
    while r.read_line(&mut h).is_ok_and(|n| n > 2) {
        h.clear();
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let ready = shared.ready.load(Ordering::SeqCst);
    match (method, path) {
        ("GET", "/metrics") => {
            let status = shared.status.lock().unwrap().clone();
            let mut text = render(&status, ready, counters.as_ref());
            shared.kube_events.render(&mut text);
            respond(s, 200, "OK", "text/plain; version=0.0.4", &text)
        }
        ("GET", "/readyz") if ready && shared.status.lock().unwrap().source_down => {
            respond(s, 503, "Service Unavailable", "text/plain", "Kubernetes API unreachable; enforcing the last known state\n")
        }
        ("GET", "/readyz") if ready => respond(s, 200, "OK", "text/plain", "ready\n"),
        ("GET", "/readyz") => respond(s, 503, "Service Unavailable", "text/plain", "not synced yet\n"),
        ("GET", "/healthz") => respond(s, 200, "OK", "text/plain", "ok\n"),
        _ => respond(s, 404, "Not Found", "text/plain", "not found\n"),
    }
}

/// Serves until the process exits. `counters` is opened lazily (the map exists once loaded).
pub fn serve(addr: SocketAddr, shared: Arc<Shared>, pin_dir: std::path::PathBuf) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        let mut counters: Option<CounterReader> = None;
        for s in listener.incoming().flatten() {
            if counters.is_none() && shared.ready.load(Ordering::SeqCst) {
                counters = CounterReader::open(&pin_dir).ok();
            }
            handle(s, &shared, &counters);
        }
    })?;
    Ok(())
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
mod tests {
    use super::*;

    #[test]
    fn readyz_is_503_until_the_first_sync_then_200() {
        let shared = Arc::new(Shared::default());
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        serve(addr, shared.clone(), std::path::PathBuf::from("/nonexistent")).unwrap();
        let (code, _) = http_get(addr, "/readyz").unwrap();
        assert_eq!(code, 503);
        let (code, body) = http_get(addr, "/metrics").unwrap();
        assert_eq!(code, 200);
        assert_eq!(sample(&body, "netpol_ready"), Some(0.0));
        shared.ready.store(true, Ordering::SeqCst);
        let (code, _) = http_get(addr, "/readyz").unwrap();
        assert_eq!(code, 200);
        assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
        // The API server goes away: not ready (still healthy), the metric says why.
        shared.status.lock().unwrap().source_down = true;
        let (code, body) = http_get(addr, "/readyz").unwrap();
        assert_eq!((code, body.contains("last known state")), (503, true));
        assert_eq!(sample(&http_get(addr, "/metrics").unwrap().1, "netpol_source_up"), Some(0.0));
        assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
        shared.status.lock().unwrap().source_down = false;
        assert_eq!(http_get(addr, "/readyz").unwrap().0, 200);
    }
}

//! The ring buffer's reader: a thread of its own, always running, that wakes when the programs
//! write (epoll on the ring buffer, at most 100 ms apart to see `stop`), names each event
//! ([`Flow::from_event`]), logs denials and audits when `--log-denied` is on, and hands every
//! flow to the [`FlowHub`](super::FlowHub). It never waits on a client.
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aya::maps::{MapData, RingBuf};
use netpol_common::{FlowEvent, EVENTS_AUDIT, EVENTS_DENIED};

use super::{Flow, FlowVerdict, Names};
use crate::datapath::read_event;
use crate::metrics::Shared;

/// Starts [`read_events`] on a thread of its own.
pub fn spawn(ring: RingBuf<MapData>, shared: Arc<Shared>, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    std::thread::Builder::new().name("flow-events".into()).spawn(move || read_events(ring, shared, stop))?;
    Ok(())
}

/// Reads flow events until `stop`.
pub fn read_events(mut ring: RingBuf<MapData>, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let mut names = Names::default();
    let mut names_of_sync = None;
    let mut log = LogLimit::default();
    let mut batch: Vec<FlowEvent> = Vec::with_capacity(256);
    while !stop.load(Ordering::SeqCst) {
        wait_readable(&ring, Duration::from_millis(100));
        while let Some(item) = ring.next() {
            if let Some(ev) = read_event(&item) {
                batch.push(ev);
            }
            if batch.len() == batch.capacity() {
                break;
            }
        }
        if batch.is_empty() {
            continue;
        }
        // The names of the last sync (rebuilt only after a new one).
        {
            let status = shared.status.lock().unwrap();
            if names_of_sync != Some(status.syncs) {
                names = Names::new(shared.flows.node(), &status);
                names_of_sync = Some(status.syncs);
            }
        }
        let (wall, mono) = (SystemTime::now(), monotonic_coarse_ns());
        for ev in batch.drain(..) {
            let at = wall.checked_sub(Duration::from_nanos(mono.saturating_sub(ev.ktime_ns))).unwrap_or(wall);
            let flow = Flow::from_event(&ev, at, &names, |ip| shared.flows.pod_at(ip));
            log.log(&flow, shared.flows.base());
            shared.flows.publish(&flow);
        }
    }
}

/// Waits until the ring buffer has data, or `timeout`.
fn wait_readable(ring: &RingBuf<MapData>, timeout: Duration) {
    let mut pfd = libc::pollfd { fd: ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
}

/// CLOCK_MONOTONIC_COARSE, the programs' `bpf_ktime_get_coarse_ns`.
fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The deny log: denials and audits while `--log-denied N` is on, at most N a second per CPU
/// (what the programs send for the log alone; more arrive while observe clients ask for more).
#[derive(Default)]
struct LogLimit {
    window: Option<Instant>,
    logged: u64,
}

impl LogLimit {
    fn log(&mut self, f: &Flow, base: netpol_common::EventConfig) {
        let bit = match f.verdict {
            FlowVerdict::Denied => EVENTS_DENIED,
            FlowVerdict::Audit => EVENTS_AUDIT,
            FlowVerdict::Allowed => return,
        };
        if base.per_sec == 0 || base.verdicts & bit == 0 {
            return;
        }
        let now = Instant::now();
        if self.window.is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1)) {
            self.window = Some(now);
            self.logged = 0;
        }
        let cpus = aya::util::nr_cpus().unwrap_or(1) as u64;
        if self.logged >= u64::from(base.per_sec) * cpus {
            return;
        }
        self.logged += 1;
        log_flow(f);
    }
}

/// `denied pod=NS/POD direction=ingress proto=TCP src=IP:PORT dst=IP:PORT reason=policy`.
fn log_flow(f: &Flow) {
    let at = |addr: &Option<String>, port: Option<u16>| match (addr, port) {
        (Some(a), Some(p)) => match a.parse::<std::net::IpAddr>() {
            Ok(ip) => std::net::SocketAddr::new(ip, p).to_string(),
            Err(_) => a.clone(),
        },
        (Some(a), None) => a.clone(),
        (None, _) => "-".to_string(),
    };
    tracing::info!(
        target: "netpol::denied",
        "{} pod={} direction={} proto={} src={} dst={} reason={}",
        f.verdict.as_str(),
        f.pod,
        f.direction,
        f.protocol.as_deref().unwrap_or("-"),
        at(&f.src, f.src_port),
        at(&f.dst, f.dst_port),
        f.reason,
    );
}

//! Deny events: what the programs send through the ring buffer when `--log-denied` is on (at
//! most so many per second and CPU), logged as structured lines under `netpol::denied`, with the
//! pod named from the endpoint ids of the last sync.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use netpol_common::{DenyEvent, DIR_INGRESS};

use super::Shared;
use crate::model::cidr::addr_from_bytes;
use crate::model::Protocol;

/// Logs deny events from the ring buffer as structured lines until `stop`.
pub fn log_deny_events(mut rb: RingBuf<MapData>, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let mut any = false;
        while let Some(item) = rb.next() {
            any = true;
            if item.len() < std::mem::size_of::<DenyEvent>() {
                continue;
            }
            let ev: DenyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DenyEvent) };
            log_event(&ev, &shared);
        }
        if !any {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Starts [`log_deny_events`] on a thread of its own.
pub fn spawn(rb: RingBuf<MapData>, shared: Arc<Shared>, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    std::thread::Builder::new().name("deny-events".into()).spawn(move || log_deny_events(rb, shared, stop))?;
    Ok(())
}

fn log_event(ev: &DenyEvent, shared: &Shared) {
    let pod = shared
        .status
        .lock()
        .unwrap()
        .endpoints
        .iter()
        .find(|(id, _)| *id == ev.endpoint)
        .map(|(_, k)| k.to_string())
        .unwrap_or_else(|| format!("endpoint-{}", ev.endpoint));
    let proto = Protocol::ip_name(ev.proto).map_or_else(|| ev.proto.to_string(), str::to_string);
    let (src, dst) = (addr_from_bytes(ev.family, ev.src), addr_from_bytes(ev.family, ev.dst));
    tracing::info!(
        target: "netpol::denied",
        "{} pod={pod} direction={} proto={proto} src={} dst={}",
        if ev.verdict as u32 == netpol_common::VERDICT_AUDIT { "audit" } else { "denied" },
        if ev.dir == DIR_INGRESS { "ingress" } else { "egress" },
        SocketAddr::new(src, ev.sport),
        SocketAddr::new(dst, ev.dport),
    );
}

//! `netpol-lab churn`: a paced stream of new TCP connections through netpol for a while, with
//! no program beside it: the achieved rate, conntrack fill, evictions, drops of the allowed
//! flows, connect latency. Client and server as in `connrate`.
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use netpol_daemon::testkit::lab::Lab;

use crate::connrate::{crr_once, enter, pin, Server, TIMEOUT};
use crate::throughput::{pair_lab, policies, PORT, SERVER_IP};

/// Idle tracked flows made before a churn: UDP exchanges from these source ports, never
/// repeated. The LRU table evicts its least recently used entries first, so if the churn
/// made it evict anything, these go.
const CANARY_PORTS: std::ops::Range<u16> = 20000..20064;

/// What a paced churn did.
struct Churn {
    case: String,
    offered: f64,
    achieved: f64,
    failed: u64,
    connect_us: Vec<u32>,
    exchange_us: Vec<u32>,
}

/// `workers` threads in the client pod, pinned to CPU 0, open a connection each at its turn
/// of a schedule of `rate` a second for `secs` (connection i at i / rate s; a worker behind
/// schedule goes at once): each connection as TCP_CRR makes it.
fn paced(lab: &Lab, case: &str, rate: f64, secs: f64, workers: usize) -> Result<Churn> {
    let netns = lab.pod("bench/client").netns.clone();
    let dst = SocketAddr::from((SERVER_IP, PORT));
    let total = (rate * secs) as u64;
    let t0 = Instant::now() + Duration::from_millis(50);
    let handles: Vec<_> = (0..workers as u64)
        .map(|w| {
            let netns = netns.clone();
            std::thread::spawn(move || -> Result<(u64, Vec<u32>, Vec<u32>)> {
                enter(&netns)?;
                pin(0);
                let (mut failed, mut connect, mut exchange) = (0, Vec::new(), Vec::new());
                let mut i = w;
                while i < total {
                    let at = t0 + Duration::from_secs_f64(i as f64 / rate);
                    if let Some(wait) = at.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let t = Instant::now();
                    match crr_once(dst) {
                        Ok(c) => {
                            connect.push(c.as_micros() as u32);
                            exchange.push(t.elapsed().as_micros() as u32);
                        }
                        Err(_) => failed += 1,
                    }
                    i += workers as u64;
                }
                Ok((failed, connect, exchange))
            })
        })
        .collect();
    let mut c = Churn { case: case.to_string(), offered: rate, achieved: 0.0, failed: 0, connect_us: vec![], exchange_us: vec![] };
    for h in handles {
        let (f, cu, eu) = h.join().map_err(|_| anyhow!("churn worker panicked"))??;
        c.failed += f;
        c.connect_us.extend(cu);
        c.exchange_us.extend(eu);
    }
    c.achieved = c.connect_us.len() as f64 / t0.elapsed().as_secs_f64();
    c.connect_us.sort_unstable();
    c.exchange_us.sort_unstable();
    Ok(c)
}

/// Sum of the daemon's drop counters for the bench pods.
fn drops(lab: &Lab) -> Result<f64> {
    let m = lab.metrics()?;
    Ok(m.lines()
        .filter(|l| l.starts_with("netpol_dropped_packets_total{") && l.contains("namespace=\"bench\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

fn conntrack_entries(lab: &Lab) -> Result<(f64, f64)> {
    let m = lab.metrics()?;
    let get = |name: &str| netpol_daemon::metrics::sample(&m, &format!("{name}{{map=\"CONNTRACK2\"}}")).unwrap_or(f64::NAN);
    Ok((get("netpol_bpf_map_entries"), get("netpol_bpf_map_capacity")))
}

/// Entries of the canary flows still in the lab's pinned conntrack table.
fn canaries_tracked(lab: &Lab) -> Result<usize> {
    use aya::maps::{HashMap, Map, MapData};
    use netpol_common::{CtKey, CtValue, PROTO_UDP};
    let md = MapData::from_pin(lab.pin_dir.join(netpol_common::maps::CONNTRACK))?;
    let table: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(md))?;
    Ok(table.keys().flatten().filter(|k| k.proto == PROTO_UDP && CANARY_PORTS.contains(&k.sport)).count())
}

/// The canary flows: one UDP exchange from each of [`CANARY_PORTS`].
fn make_canaries(lab: &Lab) -> Result<()> {
    let netns = lab.pod("bench/client").netns.clone();
    let dst = SocketAddr::from((SERVER_IP, PORT));
    std::thread::spawn(move || -> Result<()> {
        enter(&netns)?;
        for port in CANARY_PORTS {
            let s = UdpSocket::bind(("0.0.0.0", port))?;
            s.set_read_timeout(Some(TIMEOUT))?;
            s.send_to(&[1], dst)?;
            let mut b = [0u8; 8];
            s.recv_from(&mut b).with_context(|| format!("canary flow from port {port}"))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow!("canary thread panicked"))?
}

fn pct_of(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)] as f64
}

/// `netpol-lab churn`: TCP connections paced at `rate` a second for `secs` between the two
/// lab pods, with no program and through netpol enforcing `n` policies.
pub fn churn(daemon: &Path, rate: f64, secs: f64, n: usize) -> Result<()> {
    let plain = pair_lab()?;
    let mut prog = pair_lab()?;
    prog.write_manifest("policies.yaml", &policies(n))?;
    prog.start_daemon(daemon)?;
    let _servers = [Server::start(&plain, 4)?, Server::start(&prog, 4)?];
    let workers = 16;
    // Warm-up: the servers, the caches, the tables.
    paced(&plain, "warm-up", rate, 1.0, workers)?;
    paced(&prog, "warm-up", rate, 1.0, workers)?;
    let a = paced(&plain, "(a) no program", rate, secs, workers)?;
    make_canaries(&prog)?;
    let canaries_before = canaries_tracked(&prog)?;
    let drops0 = drops(&prog)?;
    // Sample the table's fill while the churn runs.
    let stop = AtomicBool::new(false);
    let sampler = {
        std::thread::scope(|s| -> Result<(Churn, f64, f64)> {
            let h = s.spawn(|| -> Result<(f64, f64)> {
                let (mut peak, mut cap) = (0.0f64, f64::NAN);
                while !stop.load(Ordering::Relaxed) {
                    let (e, c) = conntrack_entries(&prog)?;
                    peak = peak.max(e);
                    cap = c;
                    for _ in 0..20 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                Ok((peak, cap))
            });
            let b = paced(&prog, &format!("(b) netpol, {n} policies"), rate, secs, workers);
            stop.store(true, Ordering::Relaxed);
            let (peak, cap) = h.join().map_err(|_| anyhow!("sampler panicked"))??;
            let (end, _) = conntrack_entries(&prog)?;
            Ok((b?, peak.max(end), cap))
        })?
    };
    let (b, peak, cap) = sampler;
    let drops1 = drops(&prog)?;
    let canaries_after = canaries_tracked(&prog)?;
    if prog.tcp("bench/client", "bench/server", PORT + 1) {
        bail!("a port no policy allows was reachable: the programs are not enforcing");
    }
    println!("## Connection churn (TCP connections paced at {rate:.0}/s for {secs:.0} s, {n} policies)\n");
    println!(
        "The connection rate section's labs, client and server: {workers} client threads pinned to CPU 0 open connections \
         on a fixed schedule (connection i at i / rate seconds; a thread behind schedule goes at once, so the achieved rate \
         is what the machine sustained), each as TCP_CRR makes it; 4 server threads on CPU 1. Connect latency: the \
         connect() call (the handshake); exchange: connect to the server's close seen. (b): conntrack entries \
         (`netpol_bpf_map_entries{{map=\"CONNTRACK2\"}}`, sampled every 2 s, peak) against the table's capacity; \
         evictions: {} idle UDP flows tracked just before the churn, still tracked after it or not (the LRU table \
         evicts the least recently used entries first, so these would go first); drops: \
         `netpol_dropped_packets_total` of the two pods over the churn (every connection is allowed: must be 0) and the \
         client's failed connections.\n",
        CANARY_PORTS.len()
    );
    println!("| case | offered conn/s | achieved conn/s | failed connections | connect p50 | connect p99 | exchange p99 | conntrack entries, peak (capacity) | idle flows' entries kept | drops of allowed flows |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (c, extra) in [
        (&a, "| | | |".to_string()),
        (&b, format!("| {peak:.0} ({cap:.0}) | {canaries_after} of {canaries_before} | {:.0} |", drops1 - drops0)),
    ] {
        println!(
            "| {} | {:.0} | {:.0} | {} | {:.0} us | {:.0} us | {:.0} us {extra}",
            c.case,
            c.offered,
            c.achieved,
            c.failed,
            pct_of(&c.connect_us, 0.5),
            pct_of(&c.connect_us, 0.99),
            pct_of(&c.exchange_us, 0.99)
        );
    }
    println!();
    if b.achieved < 0.95 * rate {
        println!(
            "The client could not sustain {rate:.0} connections/s on this machine: {:.0}/s without a program, {:.0}/s through \
             netpol (the highest rate sustained, both measured in this run).\n",
            a.achieved, b.achieved
        );
    }
    Ok(())
}

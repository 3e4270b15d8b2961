//! What the lab and attack test files share: the root check, the lab, waiting for the
//! daemon's endpoints and reading its packet counters.
#![allow(dead_code)]
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netpol_daemon::metrics::sample;
use netpol_daemon::testkit::lab::Lab;

mod traffic;
#[allow(unused_imports)] // Only the restart tests use it.
pub use traffic::{Seen, Traffic};

pub const DAEMON: &str = env!("CARGO_BIN_EXE_netpol-daemon");

/// Root is needed (network namespaces, veth, BPF). Where it is missing the test says why; in
/// CI (CI set) that is a failure.
pub fn root() -> bool {
    if unsafe { libc::geteuid() } != 0 {
        let msg = "lab tests need root (network namespaces, veth, BPF); run `cargo xtask test` as root";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return false;
    }
    true
}

/// A new lab, or None (said why) without root.
pub fn lab() -> Option<Lab> {
    root().then(|| Lab::new().expect("creating the lab"))
}

/// The restart tests' lab: pods `app/server` (TCP 8080), `app/client` and `app/intruder` at
/// 10.244.0.`first`, +1 and +2, and a policy that lets only the client reach the server on
/// 8080 ([`SERVER_CASES`]). None (said why) without root.
pub fn server_client_intruder(first: u8) -> Option<Lab> {
    let mut lab = lab()?;
    for (i, name) in ["server", "client", "intruder"].into_iter().enumerate() {
        let tcp: &[u16] = if name == "server" { &[8080] } else { &[] };
        lab.add_pod("app", name, Ipv4Addr::new(10, 244, 0, first + i as u8), &[("app", name)], tcp, &[]).unwrap();
    }
    lab.write_cluster_manifest().unwrap();
    lab.write_manifest(
        "p.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server, namespace: app}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]\n",
    )
    .unwrap();
    Some(lab)
}

/// What [`server_client_intruder`]'s policy allows: the client, not the intruder.
pub const SERVER_CASES: [(&str, &str, &str, u16, bool); 2] =
    [("client", "server", "tcp", 8080, true), ("intruder", "server", "tcp", 8080, false)];

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Waits until the daemon has programs on `n` pod interfaces.
pub fn wait_endpoints(lab: &Lab, n: usize, secs: u64, what: &str) {
    let t0 = Instant::now();
    loop {
        let m = lab.metrics().unwrap();
        if sample(&m, "netpol_endpoints") == Some(n as f64) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(secs), "{what}: want {n} endpoints\n{m}\n{}", lab.daemon_log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How many attached interfaces run the programs from TCX links and from tc filters
/// (`netpol_attached_interfaces`).
pub fn attached(lab: &Lab) -> (usize, usize) {
    let m = lab.metrics().unwrap();
    let mode = |m: &str, mode: &str| sample(m, &format!("netpol_attached_interfaces{{mode=\"{mode}\"}}")).unwrap_or(-1.0) as usize;
    (mode(&m, "tcx"), mode(&m, "tc"))
}

/// Waits until `n` interfaces run the programs from TCX links and none from tc filters
/// (`--attach auto` attaches by tc first and moves each interface to TCX in the background).
pub fn wait_tcx(lab: &Lab, n: usize, secs: u64, what: &str) {
    let t0 = Instant::now();
    while attached(lab) != (n, 0) {
        assert!(t0.elapsed() < Duration::from_secs(secs), "{what}: want {n} on TCX, none on tc: {:?}\n{}", attached(lab), lab.daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `netpol_packets_total` of pod `namespace/pod`, direction and verdict (0 before any).
pub fn packets(lab: &Lab, namespace: &str, pod: &str, direction: &str, verdict: &str) -> f64 {
    let m = lab.metrics().unwrap();
    sample(&m, &format!("netpol_packets_total{{namespace=\"{namespace}\",pod=\"{pod}\",direction=\"{direction}\",verdict=\"{verdict}\"}}"))
        .unwrap_or(0.0)
}

/// Probes every `(from, to, "tcp"|"udp", port, allowed?)` at once and panics with every mismatch
/// and the daemon's log.
pub fn check(lab: &Lab, cases: &[(&str, &str, &str, u16, bool)]) {
    let mut failures = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|&(from, to, proto, port, want)| {
                s.spawn(move || {
                    let got = match proto {
                        "tcp" => lab.tcp(from, to, port),
                        "udp" => lab.udp(from, to, port),
                        _ => unreachable!(),
                    };
                    (from, to, proto, port, want, got)
                })
            })
            .collect();
        for h in handles {
            let (from, to, proto, port, want, got) = h.join().unwrap();
            if want != got {
                failures.push(format!(
                    "{from} -> {to} {proto}/{port}: expected {}, got {}",
                    if want { "allowed" } else { "denied" },
                    if got { "allowed" } else { "denied" }
                ));
            }
        }
    });
    if !failures.is_empty() {
        panic!("connectivity mismatches:\n{}\n--- daemon log ---\n{}", failures.join("\n"), lab.daemon_log());
    }
}

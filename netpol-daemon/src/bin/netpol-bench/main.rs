//! `netpol-bench`: measurements reported by `cargo xtask bench` (which writes BENCHMARKS.md).
//! Each figure is the median of repeated runs, measured in one process, side by side.
mod compile;
mod control;
mod daemon;
mod kube;
mod lab;
mod measure;
mod packet;
mod stats;

use compile::{bulk_bench, compile_bench};
use control::control_bench;
use daemon::daemon_bench;
use kube::kube_bench;
use netpol_daemon::testkit::synth;
use packet::packet_bench;

fn main() {
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: stopping the daemon, removing the bench's network namespace and pins");
        lab::cleanup_all();
        std::process::exit(130);
    })
    .expect("installing the Ctrl-C handler");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map(|s| s.as_str()).unwrap_or("compile");
    match what {
        "compile" => {
            let pods = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10_000);
            let policies = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2_000);
            let repeats = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(21);
            compile_bench(pods, policies, repeats);
        }
        "bulk" => {
            let pods = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60_000);
            let policies = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2_000);
            let changed = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(50_000);
            let forced = args.get(4).is_some_and(|s| s == "forced");
            bulk_bench(pods, policies, changed, forced);
        }
        "packet" => {
            let repeat = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
            if let Err(e) = packet_bench(&[10, 100, 1000, 10_000], repeat) {
                eprintln!("netpol-bench packet: {e:#}");
                std::process::exit(1);
            }
        }
        "control" => {
            let pods = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10_000);
            let policies = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2_000);
            let changes = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100);
            if let Err(e) = control_bench(pods, policies, changes) {
                eprintln!("netpol-bench control: {e:#}");
                std::process::exit(1);
            }
        }
        "daemon" => {
            let daemon = args.get(1).cloned().unwrap_or_default();
            let pods = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10_000);
            let policies = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2_000);
            let changes = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(50);
            if let Err(e) = daemon_bench(&daemon, pods, policies, changes) {
                eprintln!("netpol-bench daemon: {e:#}");
                std::process::exit(1);
            }
        }
        "kube" => {
            let daemon = args.get(1).cloned().unwrap_or_default();
            let arg = |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
            let shape = synth::Shape { services: arg(4, 100), ..synth::Shape::new(arg(2, 10_000), arg(3, 2_000)) };
            let plan = measure::Plan { changes: arg(5, 100), bursts: arg(6, 3), burst_events: 1_000, steady_rate: 100 };
            if let Err(e) = kube_bench(&daemon, shape, plan) {
                eprintln!("netpol-bench kube: {e:#}");
                std::process::exit(1);
            }
        }
        other => {
            eprintln!("usage: netpol-bench compile [PODS POLICIES REPEATS] | bulk [PODS POLICIES CHANGED [forced]] | packet [REPEAT] | control [PODS POLICIES CHANGES] | daemon DAEMON_BIN [PODS POLICIES CHANGES] | kube DAEMON_BIN [PODS POLICIES SERVICES CHANGES BURSTS]   (unknown {other})");
            std::process::exit(2);
        }
    }
}

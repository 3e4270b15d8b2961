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

use clap::{Parser, Subcommand};
use compile::{bulk_bench, compile_bench};
use control::control_bench;
use daemon::daemon_bench;
use kube::kube_bench;
use netpol_daemon::testkit::synth;
use packet::packet_bench;

/// Measurements for BENCHMARKS.md (`cargo xtask bench` runs each; root for the BPF ones).
#[derive(Parser)]
#[command(name = "netpol-bench")]
struct Cli {
    /// Without one: `compile` with its defaults.
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Full compile of a synthetic cluster, repeated.
    Compile {
        #[arg(default_value_t = 10_000)]
        pods: usize,
        #[arg(default_value_t = 2_000)]
        policies: usize,
        #[arg(default_value_t = 21)]
        repeats: usize,
    },
    /// Many pods relabelled at once, incrementally (`forced`: the full compile beside it).
    Bulk {
        #[arg(default_value_t = 60_000)]
        pods: usize,
        #[arg(default_value_t = 2_000)]
        policies: usize,
        #[arg(default_value_t = 50_000)]
        changed: usize,
        #[arg(value_parser = ["forced"])]
        forced: Option<String>,
    },
    /// Per-packet cost of the programs (BPF_PROG_TEST_RUN), at 10 to 10,000 rules.
    Packet {
        #[arg(default_value_t = 1_000_000)]
        repeat: u32,
        /// One more column: 1,000 rules with this many ClusterNetworkPolicies beside them (0:
        /// none).
        #[arg(long, default_value_t = 100)]
        cluster_policies: usize,
    },
    /// Control-plane latency: a change to maps programmed, in process.
    Control {
        #[arg(default_value_t = 10_000)]
        pods: usize,
        #[arg(default_value_t = 2_000)]
        policies: usize,
        #[arg(default_value_t = 100)]
        changes: usize,
    },
    /// The daemon binary on a manifests directory: start to ready, change to programmed, RSS.
    Daemon {
        /// The netpol-daemon binary to measure.
        daemon: String,
        #[arg(default_value_t = 10_000)]
        pods: usize,
        #[arg(default_value_t = 2_000)]
        policies: usize,
        #[arg(default_value_t = 50)]
        changes: usize,
    },
    /// The daemon binary on the stand-in API server: watch event to programmed, bursts.
    Kube {
        /// The netpol-daemon binary to measure.
        daemon: String,
        #[arg(default_value_t = 10_000)]
        pods: usize,
        #[arg(default_value_t = 2_000)]
        policies: usize,
        #[arg(default_value_t = 100)]
        services: usize,
        #[arg(default_value_t = 100)]
        changes: usize,
        #[arg(default_value_t = 3)]
        bursts: usize,
    },
}

fn main() {
    let cmd = Cli::parse().cmd.unwrap_or(Cmd::Compile { pods: 10_000, policies: 2_000, repeats: 21 });
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: stopping the daemon, removing the bench's network namespace and pins");
        lab::cleanup_all();
        std::process::exit(130);
    })
    .expect("installing the Ctrl-C handler");
    let (what, r) = match cmd {
        Cmd::Compile { pods, policies, repeats } => {
            compile_bench(pods, policies, repeats);
            ("compile", Ok(()))
        }
        Cmd::Bulk { pods, policies, changed, forced } => {
            bulk_bench(pods, policies, changed, forced.is_some());
            ("bulk", Ok(()))
        }
        Cmd::Packet { repeat, cluster_policies } => ("packet", packet_bench(&[10, 100, 1000, 10_000], cluster_policies, repeat)),
        Cmd::Control { pods, policies, changes } => ("control", control_bench(pods, policies, changes)),
        Cmd::Daemon { daemon, pods, policies, changes } => ("daemon", daemon_bench(&daemon, pods, policies, changes)),
        Cmd::Kube { daemon, pods, policies, services, changes, bursts } => {
            let shape = synth::Shape { services, ..synth::Shape::new(pods, policies) };
            let plan = measure::Plan { changes, bursts, burst_events: 1_000, steady_rate: 100 };
            ("kube", kube_bench(&daemon, shape, plan))
        }
    };
    if let Err(e) = r {
        eprintln!("netpol-bench {what}: {e:#}");
        std::process::exit(1);
    }
}

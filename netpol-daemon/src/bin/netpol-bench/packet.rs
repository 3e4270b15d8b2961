//! Per-packet cost of the real programs: crafted frames through BPF_PROG_TEST_RUN, every case
//! at every rule count in turn, round after round, so that the machine's drift weighs on all alike.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use netpol_daemon::compiler;
use netpol_daemon::datapath::{Datapath, Iface};
use netpol_daemon::model::{Direction, ObjKey};
use netpol_daemon::testkit::testpkt::*;

use crate::stats::PinDir;

const ROUNDS: usize = 7;

const CASES: [&str; 6] = [
    "allowed, established (flow cache hit)",
    "allowed, established, flow cache off (conntrack lookup)",
    "allowed, first packet (policy lookup + conntrack insert)",
    "denied (policy lookup, drop)",
    "allowed, established, egress",
    "harness only (a classifier returning OK)",
];
/// The row of [`CASES`] measured by single runs of new flows, not by rounds.
const FIRST_PACKET: usize = 2;
const HARNESS: usize = 5;

fn web() -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 10)
}

/// The programs and maps loaded for one rule count, and the frames that hit its last rule.
struct Setup {
    dp: Datapath,
    _pin: PinDir,
    est: Vec<u8>,
    src: Ipv4Addr,
    port: u16,
}

/// A pod with `n` ingress rules, each allowing one /24 on its own port, plus egress to 10.2/16.
fn rules_policy(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: t, labels: {app: web}}\nspec: {nodeName: n, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.1.0.10}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: many, namespace: t}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.2.0.0/16}}], ports: [{port: 443}]}]\n  ingress:\n",
    );
    for i in 0..n {
        y.push_str(&format!(
            "  - from: [{{ipBlock: {{cidr: 10.{}.{}.0/24}}}}]\n    ports: [{{port: {}}}]\n",
            100 + i / 256,
            i % 256,
            1000 + i % 50000
        ));
    }
    y
}

pub fn packet_bench(counts: &[usize], repeat: u32) -> anyhow::Result<()> {
    println!("## Per-packet cost (BPF_PROG_TEST_RUN, kernel-measured ns per run)\n");
    println!(
        "Every rule count has its programs and maps loaded at once; {ROUNDS} rounds each measure every case at every rule count in turn \
         (repeat count {repeat} per figure), so the machine's drift weighs on all alike. Cells: median over the rounds; \
         the last column: median of the per-round ratios. First packet: median of 2,000 single runs per rule count, each a new \
         flow, interleaved in blocks of 100.\n"
    );
    let mut setups = Vec::new();
    for &n in counts {
        setups.push(setup(n, n == counts[0])?);
    }
    let samples = rounds(&mut setups, repeat)?;
    let firsts = first_packets(&mut setups)?;
    print_table(counts, &samples, &firsts);
    Ok(())
}

/// Loads the programs with maps of their own and programs a pod with `n` ingress rules.
fn setup(n: usize, show_stats: bool) -> anyhow::Result<Setup> {
    let pin = PinDir::new(format!("/sys/fs/bpf/netpol-bench-{}-{n}", std::process::id()));
    let mut dp = Datapath::load_detached(&pin.0)?;
    if show_stats {
        println!("Programs as loaded by this kernel (verifier-processed instructions; BPF instructions after verification; JIT bytes):\n");
        for (name, verified, insns, jited) in dp.program_stats() {
            let f = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into());
            println!("- `{name}`: {} verified, {} instructions, {} JIT bytes", f(verified), f(insns), f(jited));
        }
        println!();
    }
    let mut loaded = netpol_daemon::source::manifests::Loaded::default();
    netpol_daemon::source::manifests::load_text(std::path::Path::new("bench.yaml"), &rules_policy(n), &mut loaded);
    anyhow::ensure!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let node = compiler::compile_node(&loaded.cluster, "n");
    let ifaces: BTreeMap<ObjKey, Iface> = [(ObjKey::new("t", "web"), Iface { ifindex: 1, ifname: "lo".into() })].into();
    let rep = dp.sync(&node, &ifaces);
    anyhow::ensure!(rep.errors.is_empty(), "{:?}", rep.errors);
    // The source is in the last rule's block, on its port.
    let last = n - 1;
    let src = Ipv4Addr::new(10, (100 + last / 256) as u8, (last % 256) as u8, 7);
    let port = (1000 + last % 50000) as u16;
    let est = tcp4(src, web(), 40000, port, TCP_ACK);
    Ok(Setup { dp, _pin: pin, est, src, port })
}

fn one(dp: &mut Datapath, dir: Direction, frame: &[u8], want: i32, repeat: u32) -> anyhow::Result<f64> {
    let (rc, d) = dp.test_run(dir, frame, repeat)?;
    anyhow::ensure!(rc == want, "verdict {rc}, expected {want}");
    Ok(d.as_nanos() as f64)
}

/// samples[case][rule count][round] for every case but the first packet.
fn rounds(setups: &mut [Setup], repeat: u32) -> anyhow::Result<Vec<Vec<Vec<f64>>>> {
    let out = tcp4(web(), Ipv4Addr::new(10, 2, 0, 1), 40000, 443, TCP_ACK);
    let mut samples = vec![vec![Vec::new(); setups.len()]; CASES.len()];
    for round in 0..=ROUNDS {
        for (j, s) in setups.iter_mut().enumerate() {
            let dp = &mut s.dp;
            let denied = tcp4(Ipv4Addr::new(11, 0, 0, 1), web(), 40000, s.port, TCP_SYN);
            let v = [
                one(dp, Direction::Ingress, &s.est, 0, repeat)?,
                {
                    dp.set_flow_cache(false)?;
                    let v = one(dp, Direction::Ingress, &s.est, 0, repeat)?;
                    dp.set_flow_cache(true)?;
                    v
                },
                0.0,
                one(dp, Direction::Ingress, &denied, 2, repeat)?,
                one(dp, Direction::Egress, &out, 0, repeat)?,
                dp.test_run_program(netpol_common::programs::NOOP, &s.est, repeat)?.1.as_nanos() as f64,
            ];
            // Round 0 warms up (caches, branch predictors, the CPU's clock) and is not kept.
            if round > 0 {
                for (c, x) in v.into_iter().enumerate() {
                    samples[c][j].push(x);
                }
            }
        }
    }
    Ok(samples)
}

/// 2,000 single runs per rule count, each a new flow, interleaved in blocks of 100.
fn first_packets(setups: &mut [Setup]) -> anyhow::Result<Vec<Vec<f64>>> {
    let mut firsts = vec![Vec::new(); setups.len()];
    for block in 0..20u16 {
        for (j, s) in setups.iter_mut().enumerate() {
            for k in 0..100u16 {
                let frame = tcp4(s.src, web(), 10000 + block * 100 + k, s.port, TCP_SYN);
                let (rc, d) = s.dp.test_run(Direction::Ingress, &frame, 1)?;
                anyhow::ensure!(rc == 0, "first packet verdict {rc}");
                firsts[j].push(d.as_nanos() as f64);
            }
        }
    }
    Ok(firsts)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn print_table(counts: &[usize], samples: &[Vec<Vec<f64>>], firsts: &[Vec<f64>]) {
    let last = counts.len() - 1;
    print!("| case |");
    for n in counts {
        print!(" {n} rules |");
    }
    println!(" {}/{} (per round) |", counts[last], counts[0]);
    print!("| --- |");
    for _ in 0..=counts.len() {
        print!(" --- |");
    }
    println!();
    for (c, name) in CASES.iter().enumerate() {
        print!("| {name} |");
        if c == FIRST_PACKET {
            for f in firsts {
                print!(" {:.0} ns |", median(f));
            }
            println!(" {:.2}x |", median(&firsts[last]) / median(&firsts[0]));
            continue;
        }
        for cell in &samples[c] {
            print!(" {:.0} ns |", median(cell));
        }
        let ratios: Vec<f64> = samples[c][last].iter().zip(&samples[c][0]).map(|(a, b)| a / b).collect();
        println!(" {:.2}x |", median(&ratios));
    }
    // Net of the harness, round by round.
    for (c, name) in [
        (0usize, "allowed, established (flow cache hit), minus the harness"),
        (1, "allowed, established, flow cache off, minus the harness"),
    ] {
        print!("| {name} |");
        let net: Vec<Vec<f64>> =
            (0..counts.len()).map(|j| samples[c][j].iter().zip(&samples[HARNESS][j]).map(|(a, h)| a - h).collect()).collect();
        for cell in &net {
            print!(" {:.0} ns |", median(cell));
        }
        println!(" |");
    }
    println!();
}

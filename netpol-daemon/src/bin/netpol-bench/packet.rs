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

/// `cluster_policies` cluster policies (half Admin, half Baseline, by priority) selecting the
/// pod, each with rules in both directions that split address classes (CIDRs, pod sets) but,
/// as in a cluster where they guard other traffic, decide none of the bench's packets.
fn cluster_policies(k: usize) -> String {
    let mut y = String::new();
    for i in 0..k {
        let tier = if i < k / 2 { "Admin" } else { "Baseline" };
        y.push_str(&format!(
            "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: guard-{i}}}\nspec:\n  tier: {tier}\n  priority: {i}\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - {{action: Deny, from: [{{namespaces: {{matchLabels: {{tenant: t{i}}}}}}}]}}\n  - {{action: Pass, from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: r{i}}}}}}}}}], protocols: [{{tcp: {{destinationPort: {{number: {}}}}}}}]}}\n  egress:\n  - {{action: Deny, to: [{{networks: [172.{}.{}.0/24]}}]}}\n  - {{action: Pass, to: [{{networks: [10.0.0.0/8]}}], protocols: [{{tcp: {{destinationPort: {{range: {{start: 1, end: 1023}}}}}}}}]}}\n",
            2000 + i,
            16 + i / 256,
            i % 256
        ));
    }
    y
}

/// One column of the tables: `rules` ingress rules, and `cnps` cluster policies beside them.
#[derive(Clone, Copy)]
struct Column {
    rules: usize,
    cnps: usize,
}

impl Column {
    fn label(&self) -> String {
        match self.cnps {
            0 => format!("{} rules", self.rules),
            k => format!("{} rules + {k} ClusterNetworkPolicies", self.rules),
        }
    }
}

/// `counts`: the rule counts; with `cnps` > 0, one more column: 1,000 rules and that many
/// cluster policies (compared with the 1,000-rule column round by round).
pub fn packet_bench(counts: &[usize], cnps: usize, repeat: u32) -> anyhow::Result<()> {
    println!("## Per-packet cost (BPF_PROG_TEST_RUN, kernel-measured ns per run)\n");
    println!(
        "Every rule count has its programs and maps loaded at once; {ROUNDS} rounds each measure every case at every rule count in turn \
         (repeat count {repeat} per figure), so the machine's drift weighs on all alike. Cells: median over the rounds; \
         the last column: median of the per-round ratios. First packet: median of 2,000 single runs (repeat count 1) per rule \
         count, each a new flow. A single run carries a fixed cost of its own that a repeated one spreads over its runs (the \
         kernel's clock read around one run, the program's code and data cold in the CPU's caches after the system call): \
         so the no-op classifier, a denied packet and an established one are measured in single runs too, run by run \
         interleaved with the first packets (blocks of 100 per rule count), and the first packet is also given minus the \
         single-run harness (medians).\n"
    );
    let mut columns: Vec<Column> = counts.iter().map(|&rules| Column { rules, cnps: 0 }).collect();
    if cnps > 0 {
        columns.push(Column { rules: 1000, cnps });
    }
    let mut setups = Vec::new();
    for (j, c) in columns.iter().enumerate() {
        setups.push(setup(*c, j == 0)?);
    }
    let samples = rounds(&mut setups, repeat)?;
    let singles = single_runs(&mut setups)?;
    print_table(&columns, counts.len(), &samples, &singles);
    Ok(())
}

/// Loads the programs with maps of their own and programs a pod with the column's ingress
/// rules (and cluster policies).
fn setup(col: Column, show_stats: bool) -> anyhow::Result<Setup> {
    let n = col.rules;
    let pin = PinDir::new(format!("/sys/fs/bpf/netpol-bench-{}-{n}-{}", std::process::id(), col.cnps));
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
    let text = rules_policy(n) + &cluster_policies(col.cnps);
    netpol_daemon::source::manifests::load_text(std::path::Path::new("bench.yaml"), &text, &mut loaded);
    anyhow::ensure!(loaded.cluster.cluster_policies.len() == col.cnps, "{} cluster policies loaded", loaded.cluster.cluster_policies.len());
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

/// What single runs (repeat 1) measure, run by run interleaved: the first packet of a new flow
/// and, beside it, the single-run harness (the no-op classifier), a denied packet and an
/// established one (flow cache hit), each in single runs too.
#[derive(Clone, Default)]
struct Singles {
    first: Vec<f64>,
    harness: Vec<f64>,
    denied: Vec<f64>,
    established: Vec<f64>,
    /// Denied: the rule's own peer on a port no rule allows (every policy lookup made), the
    /// same flow each time and a new one (a new source port) each time.
    other_port: Vec<f64>,
    other_port_new: Vec<f64>,
    /// The server side of one short connection (the packets of [`CONNECTION`] through the
    /// pod's two programs, a new flow each time): the sum of its single runs.
    connection: Vec<f64>,
}

/// A short TCP connection as the server pod's programs see it (TCP_CRR with the server
/// closing first): (into the pod?, TCP flags) of each packet.
const CONNECTION: [(bool, u8); 8] = [
    (true, TCP_SYN),
    (false, TCP_SYN | TCP_ACK),
    (true, TCP_ACK),
    (true, TCP_ACK | 0x08),
    (false, TCP_ACK | 0x08),
    (false, TCP_FIN | TCP_ACK),
    (true, TCP_FIN | TCP_ACK),
    (false, TCP_ACK),
];

/// The packets of one [`CONNECTION`] from `peer:sport` to the pod's `port`, each a single run:
/// the sum of their kernel-measured durations.
fn connection(dp: &mut Datapath, peer: Ipv4Addr, sport: u16, port: u16) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for (inward, flags) in CONNECTION {
        let (dir, frame) = if inward {
            (Direction::Ingress, tcp4(peer, web(), sport, port, flags))
        } else {
            (Direction::Egress, tcp4(web(), peer, port, sport, flags))
        };
        total += one(dp, dir, &frame, 0, 1)?;
    }
    Ok(total)
}

/// Single runs per rule count: 2,000 of each kind (each first packet a new flow), run by run
/// interleaved, in blocks of 100 per rule count.
fn single_runs(setups: &mut [Setup]) -> anyhow::Result<Vec<Singles>> {
    let mut out = vec![Singles::default(); setups.len()];
    let single = |dp: &mut Datapath, dir, frame: &[u8], want| one(dp, dir, frame, want, 1);
    for block in 0..20u16 {
        for (j, s) in setups.iter_mut().enumerate() {
            let denied = tcp4(Ipv4Addr::new(11, 0, 0, 1), web(), 40000, s.port, TCP_SYN);
            let other_port = tcp4(s.src, web(), 40000, s.port + 1, TCP_SYN);
            for k in 0..100u16 {
                let sport = 10000 + block * 100 + k;
                let frame = tcp4(s.src, web(), sport, s.port, TCP_SYN);
                let o = &mut out[j];
                o.first.push(single(&mut s.dp, Direction::Ingress, &frame, 0)?);
                o.harness.push(s.dp.test_run_program(netpol_common::programs::NOOP, &s.est, 1)?.1.as_nanos() as f64);
                o.denied.push(single(&mut s.dp, Direction::Ingress, &denied, 2)?);
                o.established.push(single(&mut s.dp, Direction::Ingress, &s.est, 0)?);
                o.other_port.push(single(&mut s.dp, Direction::Ingress, &other_port, 2)?);
                let new_flow = tcp4(s.src, web(), sport, s.port + 1, TCP_SYN);
                o.other_port_new.push(single(&mut s.dp, Direction::Ingress, &new_flow, 2)?);
                o.connection.push(connection(&mut s.dp, s.src, sport + 20000, s.port)?);
            }
        }
    }
    Ok(out)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// `rule_columns`: how many of `columns` are plain rule counts (the ratio column compares the
/// last of them with the first); a column after them (cluster policies) gets a ratio column of
/// its own against the 1,000-rule column.
fn print_table(columns: &[Column], rule_columns: usize, samples: &[Vec<Vec<f64>>], singles: &[Singles]) {
    let last = rule_columns - 1;
    let with_cnps = (columns.len() > rule_columns).then(|| {
        let base = columns.iter().position(|c| c.cnps == 0 && c.rules == 1000).expect("a 1,000-rule column");
        (base, rule_columns)
    });
    print!("| case |");
    for c in columns {
        print!(" {} |", c.label());
    }
    print!(" {}/{} (per round) |", columns[last].rules, columns[0].rules);
    if let Some((_, j)) = with_cnps {
        print!(" with {} ClusterNetworkPolicies / without, at 1,000 rules (per round) |", columns[j].cnps);
    }
    println!();
    print!("| --- |");
    for _ in 0..=columns.len() + with_cnps.is_some() as usize {
        print!(" --- |");
    }
    println!();
    for (c, name) in CASES.iter().enumerate() {
        print!("| {name} |");
        if c == FIRST_PACKET {
            let firsts: Vec<&[f64]> = singles.iter().map(|s| s.first.as_slice()).collect();
            single_row(&firsts);
            continue;
        }
        for cell in &samples[c] {
            print!(" {:.0} ns |", median(cell));
        }
        let ratios: Vec<f64> = samples[c][last].iter().zip(&samples[c][0]).map(|(a, b)| a / b).collect();
        print!(" {:.2}x |", median(&ratios));
        if let Some((base, j)) = with_cnps {
            let ratios: Vec<f64> = samples[c][j].iter().zip(&samples[c][base]).map(|(a, b)| a / b).collect();
            print!(" {:.2}x |", median(&ratios));
        }
        println!();
    }
    // Net of the harness, round by round.
    for (c, name) in [
        (0usize, "allowed, established (flow cache hit), minus the harness"),
        (1, "allowed, established, flow cache off, minus the harness"),
    ] {
        print!("| {name} |");
        let net: Vec<Vec<f64>> =
            (0..columns.len()).map(|j| samples[c][j].iter().zip(&samples[HARNESS][j]).map(|(a, h)| a - h).collect()).collect();
        for cell in &net {
            print!(" {:.0} ns |", median(cell));
        }
        println!(" |");
    }
    // Single runs: the harness, the other cases beside the first packet, and each net of the
    // single-run harness (median minus median).
    type Pick = fn(&Singles) -> &[f64];
    let rows: [(&str, Pick); 3] = [
        ("harness only, single runs (the no-op classifier, repeat count 1)", |s| &s.harness),
        ("denied, single runs", |s| &s.denied),
        ("allowed, established (flow cache hit), single runs", |s| &s.established),
    ];
    for (name, pick) in rows {
        print!("| {name} |");
        single_row(&singles.iter().map(pick).collect::<Vec<_>>());
    }
    let net: [(&str, Pick); 3] = [
        ("allowed, first packet, minus the single-run harness", |s| &s.first),
        ("denied, single runs, minus the single-run harness", |s| &s.denied),
        ("allowed, established (flow cache hit), single runs, minus the single-run harness", |s| &s.established),
    ];
    for (name, pick) in net {
        print!("| {name} |");
        for s in singles {
            print!(" {:.0} ns |", median(pick(s)) - median(&s.harness));
        }
        println!(" |");
    }
    println!();
    print_stages(columns, singles);
}

/// Where a first packet's time goes: single runs of packets that stop at each stage of its
/// path, each row net of the single-run harness.
fn print_stages(columns: &[Column], singles: &[Singles]) {
    println!(
        "Where the first packet's time goes: single runs of SYNs that stop at each stage of its path (interleaved with the \
         rows above; medians minus the single-run harness): denied for a peer no rule names (the endpoint, the parse, the \
         policy's address lookup); denied for the rule's own peer on a port no rule allows (every policy lookup), the same \
         flow every time, then a new flow (source port) every time; the first packet (allowed: the conntrack entry written).\n"
    );
    print!("| stage |");
    for c in columns {
        print!(" {} |", c.label());
    }
    println!();
    print!("| --- |");
    for _ in columns {
        print!(" --- |");
    }
    println!();
    type Pick = fn(&Singles) -> &[f64];
    let rows: [(&str, Pick); 4] = [
        ("denied, a peer no rule names", |s| &s.denied),
        ("denied, the rule's peer on another port, the same flow each time", |s| &s.other_port),
        ("denied, the rule's peer on another port, a new flow each time", |s| &s.other_port_new),
        ("allowed, first packet of a new flow", |s| &s.first),
    ];
    for (name, pick) in rows {
        print!("| {name} |");
        for s in singles {
            print!(" {:.0} ns |", median(pick(s)) - median(&s.harness));
        }
        println!();
    }
    print!(
        "| a whole short connection at the server pod ({} packets through its two programs, TCP_CRR's, the server closing first), summed |",
        CONNECTION.len()
    );
    for s in singles {
        print!(" {:.0} ns |", median(&s.connection) - CONNECTION.len() as f64 * median(&s.harness));
    }
    println!();
    println!();
}

/// One cell per rule count (the median of its single runs) and the ratio of the last to the
/// first.
fn single_row(cells: &[&[f64]]) {
    for c in cells {
        print!(" {:.0} ns |", median(c));
    }
    println!(" {:.2}x |", median(cells[cells.len() - 1]) / median(cells[0]));
}

//! `netpol-lab throughput`: iperf3 TCP and UDP between two lab pods with (a) no program,
//! (b) netpol enforcing a policy set that allows the flow, (c) the same policies as iptables
//! rules in the node namespace, at 10 and 1,000 policies. Each case has a lab of its own and
//! the runs of a round interleave. Prints a Markdown section and writes an SVG chart.
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netpol_daemon::testkit::lab::Lab;

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
pub const PORT: u16 = 5201;

/// `n` policies selecting the server: n-1 decoys (a /24 and a port each), then the one that
/// allows the client; the client's egress allows the server and DNS.
pub fn policies(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n.saturating_sub(1) {
        let _ = write!(
            s,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: decoy-{i}, namespace: bench}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: 10.{}.{}.0/24}}}}]\n    ports: [{{port: {}}}]\n---\n",
            100 + i / 250,
            i % 250,
            10000 + i
        );
    }
    s.push_str("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-client, namespace: bench}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 5201, protocol: TCP}, {port: 5201, protocol: UDP}]\n---\n");
    s.push_str("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-egress, namespace: bench}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: server}}}]\n    ports: [{port: 5201, protocol: TCP}, {port: 5201, protocol: UDP}]\n  - ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]\n");
    s
}

/// The same policies as iptables rules in the node's FORWARD chain, as iptables-based agents
/// write them: established flows first, then the sender's egress chain (its allows return,
/// anything else is dropped) and the receiver's ingress chain (one rule per (peer, port),
/// then drop), so that a new flow walks both: the client's egress before the server's ingress
/// decoys, as a policy allowing the client out never lets it past the server's ingress.
pub fn iptables_rules(n: usize) -> String {
    let mut s = String::from("*filter\n");
    for chain in IPT_CHAINS {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    s.push_str("-A FORWARD -j NETPOL-BENCH\n");
    s.push_str("-A NETPOL-BENCH -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
    let _ = writeln!(s, "-A NETPOL-BENCH -s {CLIENT_IP}/32 -j NETPOL-BENCH-EGRESS");
    let _ = writeln!(s, "-A NETPOL-BENCH -d {SERVER_IP}/32 -j NETPOL-BENCH-INGRESS");
    // Client egress.
    for proto in ["tcp", "udp"] {
        let _ = writeln!(s, "-A NETPOL-BENCH-EGRESS -d {SERVER_IP}/32 -p {proto} --dport {PORT} -j RETURN");
        let _ = writeln!(s, "-A NETPOL-BENCH-EGRESS -p {proto} --dport 53 -j RETURN");
    }
    s.push_str("-A NETPOL-BENCH-EGRESS -j DROP\n");
    // Server ingress.
    for i in 0..n.saturating_sub(1) {
        let _ = writeln!(s, "-A NETPOL-BENCH-INGRESS -s 10.{}.{}.0/24 -p tcp --dport {} -j ACCEPT", 100 + i / 250, i % 250, 10000 + i);
    }
    for proto in ["tcp", "udp"] {
        let _ = writeln!(s, "-A NETPOL-BENCH-INGRESS -s {CLIENT_IP}/32 -p {proto} --dport {PORT} -j ACCEPT");
    }
    s.push_str("-A NETPOL-BENCH-INGRESS -j DROP\nCOMMIT\n");
    s
}

/// The chains of [`iptables_rules`].
const IPT_CHAINS: [&str; 3] = ["NETPOL-BENCH", "NETPOL-BENCH-EGRESS", "NETPOL-BENCH-INGRESS"];

pub fn iptables_restore(netns: &str, rules: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "iptables-restore", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("iptables-restore")?;
    child.stdin.take().unwrap().write_all(rules.as_bytes())?;
    if !child.wait()?.success() {
        bail!("iptables-restore failed");
    }
    Ok(())
}

pub fn iptables_clear(netns: &str) {
    let mut steps = vec![vec!["-D", "FORWARD", "-j", "NETPOL-BENCH"]];
    steps.extend(IPT_CHAINS.iter().map(|c| vec!["-F", c]));
    steps.extend(IPT_CHAINS.iter().map(|c| vec!["-X", c]));
    for args in steps {
        // Quiet: the chains are not there before the first round.
        let _ = Command::new("ip")
            .args(["netns", "exec", netns, "iptables"])
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// One iperf3 run from the client pod; received Gbit/s.
fn iperf(lab: &Lab, udp: bool, secs: u32) -> Result<f64> {
    let ns = lab.pod("bench/client").netns.clone();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{ns}")).args([
        "iperf3",
        "-c",
        &SERVER_IP.to_string(),
        "-p",
        &PORT.to_string(),
        "-t",
        &secs.to_string(),
        "-J",
    ]);
    if udp {
        cmd.args(["-u", "-b", "0", "-l", "1400"]);
    }
    // Client on CPU 0, server on CPU 1: unpinned, the scheduler's placement of the two
    // processes (and of the softirqs that follow the sender) swung UDP runs by +-20% on this
    // machine, more than any datapath difference; pinned, repeats agree within a few percent.
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        cmd.args(["-A", "0,1"]);
    }
    let out = cmd.output().context("iperf3")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    let end = &v["end"];
    let bps = if udp {
        let sum = &end["sum"];
        let lost = sum["lost_percent"].as_f64().unwrap_or(0.0);
        end["sum_received"]["bits_per_second"].as_f64().unwrap_or(sum["bits_per_second"].as_f64().unwrap_or(0.0) * (1.0 - lost / 100.0))
    } else {
        end["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0)
    };
    if bps <= 0.0 {
        bail!("iperf3 measured nothing: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(bps / 1e9)
}

/// Run time and run count summed over the loaded programs named `names` (kernel BPF statistics,
/// counted while [`aya::sys::enable_stats`] is held).
pub fn stats_of(names: &[&str]) -> Result<(u64, u64)> {
    let (mut ns, mut runs) = (0u64, 0u64);
    for p in aya::programs::loaded_programs() {
        let p = p?;
        if p.name_as_str().is_some_and(|n| names.contains(&n)) {
            ns += p.run_time().as_nanos() as u64;
            runs += p.run_count();
        }
    }
    Ok((ns, runs))
}

/// What the BPF run-time statistics charge a program that returns at once: the clock reads
/// around a run (on this VM's clock they are most of what a netpol run is charged). Measured
/// on netpol's no-op classifier with BPF_PROG_TEST_RUN, which runs it through the same
/// accounting.
pub fn accounting_floor() -> Result<f64> {
    use netpol_common::programs::NOOP;
    let pin = PathBuf::from(format!("/sys/fs/bpf/netpol-lab-floor-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin);
    let floor = (|| {
        let mut dp = netpol_daemon::datapath::Datapath::load_detached(&pin)?;
        let frame = netpol_daemon::testkit::testpkt::tcp4(CLIENT_IP, SERVER_IP, 40000, PORT, netpol_daemon::testkit::testpkt::TCP_ACK);
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
        let mut per_run = Vec::new();
        for _ in 0..5 {
            let (ns0, runs0) = stats_of(&[NOOP])?;
            dp.test_run_program(NOOP, &frame, 200_000)?;
            let (ns1, runs1) = stats_of(&[NOOP])?;
            if runs1 <= runs0 {
                bail!("the no-op classifier's run count did not move: the statistics are not counting");
            }
            per_run.push((ns1 - ns0) as f64 / (runs1 - runs0) as f64);
        }
        Ok(median(per_run))
    })();
    let _ = std::fs::remove_dir_all(&pin);
    floor
}

/// Busy time of each CPU so far, in nanoseconds (/proc/stat: user, nice, system, irq, softirq).
pub fn cpu_busy_ns() -> Result<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(|c| c.is_ascii_digit()))
        .map(|l| {
            let f: Vec<u64> = l.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
            [0, 1, 2, 5, 6].iter().map(|&i| f.get(i).copied().unwrap_or(0)).sum::<u64>() * 1_000_000_000 / hz
        })
        .collect())
}

/// The CPU time the programs took in (b)'s real traffic, measured by the kernel.
struct Accounting {
    case: String,
    udp: bool,
    gbps: f64,
    runs_per_s: f64,
    ns_per_run: f64,
    /// Program time over the busy time of the busiest CPU.
    share: f64,
    /// The busiest CPU's busy time over the run's wall time.
    busiest: f64,
}

/// `repeats` iperf3 runs of each protocol in the netpol lab with the kernel's BPF run-time
/// statistics on (they cost clock reads per program run, so the throughput runs go without).
fn account(lab: &Lab, case: &str, secs: u32, repeats: usize, out: &mut Vec<Accounting>) -> Result<()> {
    use netpol_common::programs::{FROM_POD, TO_POD};
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    for udp in [false, true] {
        let mut rows = Vec::new();
        for _ in 0..repeats {
            let (ns0, runs0) = stats_of(&[FROM_POD, TO_POD])?;
            let cpu0 = cpu_busy_ns()?;
            let t = std::time::Instant::now();
            let gbps = iperf(lab, udp, secs)?;
            let wall = t.elapsed().as_nanos() as f64;
            let cpu1 = cpu_busy_ns()?;
            let (ns1, runs1) = stats_of(&[FROM_POD, TO_POD])?;
            if runs1 == runs0 {
                bail!("{case}: no netpol program ran during the iperf3 run: the statistics are not counting");
            }
            let busiest = cpu1.iter().zip(&cpu0).map(|(b, a)| b.saturating_sub(*a)).max().unwrap_or(0).max(1) as f64;
            let (ns, runs) = ((ns1 - ns0) as f64, (runs1 - runs0) as f64);
            rows.push(Accounting {
                case: case.to_string(),
                udp,
                gbps,
                runs_per_s: runs / (wall / 1e9),
                ns_per_run: ns / runs,
                share: ns / busiest,
                busiest: busiest / wall,
            });
        }
        // The run with the median share stands for the case.
        rows.sort_by(|a, b| a.share.partial_cmp(&b.share).unwrap());
        let m = rows.swap_remove(rows.len() / 2);
        eprintln!(
            "accounting: {case} {}: {:.1} ns per run, {:.2}% of the busiest CPU",
            if udp { "UDP" } else { "TCP" },
            m.ns_per_run,
            m.share * 100.0
        );
        out.push(m);
    }
    Ok(())
}

/// Ratios of `runs` to `base` run by run (each pair ran back to back): the median and the
/// range.
pub fn paired(runs: &[f64], base: &[f64]) -> (f64, f64, f64) {
    let r: Vec<f64> = runs.iter().zip(base).map(|(x, b)| x / b).collect();
    let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = r.iter().copied().fold(0.0, f64::max);
    (median(r), lo, hi)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Row {
    case: String,
    tcp: f64,
    udp: f64,
    /// Every run, in repeat order (the base row's run of the same repeat ran next to it).
    tcp_runs: Vec<f64>,
    udp_runs: Vec<f64>,
    /// Index of the row of the same round without a program, which ratios are taken to.
    base: usize,
}

/// Runs the cases of one round interleaved (a TCP and a UDP run of each case in turn, `repeats`
/// times) so that the machine's drift over time weighs on all of them alike; the first case
/// is the round's base.
fn round(cases: &[(&Lab, String)], secs: u32, repeats: usize, rows: &mut Vec<Row>) -> Result<()> {
    let mut t = vec![Vec::new(); cases.len()];
    let mut u = vec![Vec::new(); cases.len()];
    for _ in 0..repeats {
        for (i, (lab, _)) in cases.iter().enumerate() {
            t[i].push(iperf(lab, false, secs)?);
            u[i].push(iperf(lab, true, secs)?);
        }
    }
    let base = rows.len();
    for (i, (_, case)) in cases.iter().enumerate() {
        let (tcp, udp) = (median(t[i].clone()), median(u[i].clone()));
        eprintln!("throughput: {case}: TCP {tcp:.2} Gbit/s, UDP {udp:.2} Gbit/s");
        rows.push(Row { case: case.clone(), tcp, udp, tcp_runs: t[i].clone(), udp_runs: u[i].clone(), base });
    }
    Ok(())
}

fn svg(rows: &[Row]) -> String {
    let max = rows.iter().flat_map(|r| [r.tcp, r.udp]).fold(0.0f64, f64::max).max(0.001);
    // Room for the longest case name (about 6.6 px per character at 12 px).
    let left = 20.0 + rows.iter().map(|r| r.case.len()).max().unwrap_or(0) as f64 * 6.6;
    let (width, bar, gap) = (420.0, 14.0, 10.0);
    let height = 40.0 + rows.len() as f64 * (2.0 * bar + gap) + 30.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n",
        left + width + 90.0
    );
    let _ = writeln!(s, "<text x=\"10\" y=\"20\" font-size=\"14\">iperf3 between two lab pods, Gbit/s (median)</text>");
    let _ = writeln!(s, "<rect x=\"{}\" y=\"28\" width=\"12\" height=\"10\" fill=\"#3b6fb6\"/><text x=\"{}\" y=\"37\">TCP</text><rect x=\"{}\" y=\"28\" width=\"12\" height=\"10\" fill=\"#e08a2c\"/><text x=\"{}\" y=\"37\">UDP</text>", left, left + 16.0, left + 60.0, left + 76.0);
    let mut y = 50.0;
    for r in rows {
        let _ = writeln!(s, "<text x=\"10\" y=\"{}\">{}</text>", y + bar + 4.0, r.case);
        for (v, color) in [(r.tcp, "#3b6fb6"), (r.udp, "#e08a2c")] {
            let w = v / max * width;
            let _ = writeln!(
                s,
                "<rect x=\"{left}\" y=\"{y}\" width=\"{w:.1}\" height=\"{bar}\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{}\">{v:.2}</text>",
                left + w + 4.0,
                y + bar - 3.0
            );
            y += bar;
        }
        y += gap;
    }
    s.push_str("</svg>\n");
    s
}

/// A lab of its own with the client and server pods (nothing listening yet).
pub fn pair_lab() -> Result<Lab> {
    let mut lab = Lab::new()?;
    lab.add_namespace("bench", &[]);
    lab.add_pod("bench", "client", CLIENT_IP, &[("app", "client")], &[], &[])?;
    lab.add_pod("bench", "server", SERVER_IP, &[("app", "server")], &[], &[])?;
    lab.write_cluster_manifest()?;
    Ok(lab)
}

/// [`pair_lab`] with iperf3 listening in the server.
fn bench_lab() -> Result<Lab> {
    let mut lab = pair_lab()?;
    lab.spawn_in("bench/server", "iperf3", &["-s", "-p", &PORT.to_string()])?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(lab)
}

pub fn run(daemon: PathBuf, secs: u32, repeats: usize, svg_path: Option<&Path>) -> Result<()> {
    let floor = accounting_floor()?;
    let (rows, acct) = measure(&daemon, secs, repeats)?;
    print_rates(&rows, secs, repeats);
    print_accounting(&acct, floor, secs, repeats);
    if let Some(p) = svg_path {
        std::fs::write(p, svg(&rows))?;
        println!("\n![throughput]({})", p.file_name().unwrap().to_string_lossy());
    }
    println!();
    Ok(())
}

/// Runs every case, round after round: the rates of each, and the programs' own CPU share in
/// extra runs of (b).
fn measure(daemon: &Path, secs: u32, repeats: usize) -> Result<(Vec<Row>, Vec<Accounting>)> {
    // Three labs side by side, each a node namespace with the two pods: (a) without any
    // program, (b) with the netpol daemon, (c) with iptables rules in its node namespace.
    // iptables gets a namespace of its own because the filter table and conntrack hooks it
    // registers stay after its rules are deleted (about 9% of the UDP rate when measured).
    let plain = bench_lab()?;
    let mut prog = bench_lab()?;
    let ipt = bench_lab()?;
    let ipt_node = ipt.node_netns.clone();
    let mut rows = Vec::new();
    let mut acct = Vec::new();
    for n in [10, 1000] {
        let syncs = prog.syncs();
        prog.write_manifest("policies.yaml", &policies(n))?;
        if n == 10 {
            prog.start_daemon(daemon)?;
        } else {
            prog.wait_synced(syncs)?;
        }
        let m = prog.metrics()?;
        let policies_now = netpol_daemon::metrics::sample(&m, "netpol_policies").unwrap_or(0.0);
        if policies_now < n as f64 {
            bail!("the daemon has {policies_now} policies, expected {}", n + 1);
        }
        iptables_clear(&ipt_node);
        iptables_restore(&ipt_node, &iptables_rules(n))?;
        let cases = [
            (&plain, format!("(a) no program ({n}-policy round)")),
            (&prog, format!("(b) netpol, {n} policies")),
            (&ipt, format!("(c) iptables, {n} policies")),
        ];
        round(&cases, secs, repeats, &mut rows)?;
        account(&prog, &format!("(b) netpol, {n} policies"), secs, repeats.min(5), &mut acct)?;
        // The flow really was enforced: a port outside the policies is refused.
        if prog.tcp("bench/client", "bench/server", 5202) {
            bail!("a port no policy allows was reachable: the programs are not enforcing");
        }
    }
    // The same datapath with the daemon stopped (programs and maps stay pinned and attached):
    // on a 2-CPU machine, separates the programs' per-packet cost from the daemon's own use of
    // a CPU that iperf3's client, server and softirqs compete for.
    prog.kill_daemon();
    std::thread::sleep(Duration::from_millis(300));
    if prog.tcp("bench/client", "bench/server", 5202) {
        bail!("with the daemon stopped, a port no policy allows was reachable: the programs were detached");
    }
    // The method's noise floor: a second lab without any program, measured like the others.
    let twin = bench_lab()?;
    let cases = [
        (&plain, "(a) no program (daemon-stopped round)".to_string()),
        (&prog, "(b) netpol, 1000 policies, daemon stopped (programs attached)".to_string()),
        (&twin, "(a') no program, a second identical lab (noise floor: (a') vs (a))".to_string()),
    ];
    round(&cases, secs, repeats, &mut rows)?;
    account(&prog, "(b) netpol, 1000 policies, daemon stopped", secs, repeats.min(5), &mut acct)?;
    iptables_clear(&ipt_node);
    Ok((rows, acct))
}

fn print_rates(rows: &[Row], secs: u32, repeats: usize) {
    let find = |c: &str| rows.iter().find(|r| r.case == c).unwrap();
    println!("## Throughput (iperf3, {secs} s per run, median of {repeats})\n");
    println!("Two lab pods on one node namespace (veth, /32 routes); TCP single stream, UDP unlimited rate with 1400-byte datagrams (received rate); iperf3 client pinned to CPU 0, server to CPU 1. Each case has a lab of its own (three node namespaces side by side); the cases of a round run interleaved, and ratios are to the same round's (a).\n");
    println!("Ratios are taken run by run: each run of a case over the run of (a) just before it in the same repeat; the table gives the median of those paired ratios and their range over the repeats (the spread is the machine's noise).\n");
    println!("| case | TCP Gbit/s | UDP Gbit/s | TCP vs (a), paired | UDP vs (a), paired |\n| --- | --- | --- | --- | --- |");
    let pct = |(m, lo, hi): (f64, f64, f64)| format!("{:.1}% ({:.0}-{:.0}%)", m * 100.0, lo * 100.0, hi * 100.0);
    for r in rows {
        let base = &rows[r.base];
        println!(
            "| {} | {:.2} | {:.2} | {} | {} |",
            r.case,
            r.tcp,
            r.udp,
            pct(paired(&r.tcp_runs, &base.tcp_runs)),
            pct(paired(&r.udp_runs, &base.udp_runs))
        );
    }
    println!();
    for n in [10, 1000] {
        let b = find(&format!("(b) netpol, {n} policies"));
        let c = find(&format!("(c) iptables, {n} policies"));
        let a = &rows[b.base];
        println!(
            "- {n} policies: (b)/(a) TCP {:.1}%, UDP {:.1}% (paired medians; target >= 97%); (b)/(c) TCP {:.2}x, UDP {:.2}x",
            paired(&b.tcp_runs, &a.tcp_runs).0 * 100.0,
            paired(&b.udp_runs, &a.udp_runs).0 * 100.0,
            paired(&b.tcp_runs, &c.tcp_runs).0,
            paired(&b.udp_runs, &c.udp_runs).0
        );
    }
    let twin = rows.last().unwrap();
    let (t, u) = (paired(&twin.tcp_runs, &rows[twin.base].tcp_runs), paired(&twin.udp_runs, &rows[twin.base].udp_runs));
    println!(
        "- Noise floor: two identical labs without any program differ by TCP {:.1}% ({:.0}-{:.0}%), UDP {:.1}% ({:.0}-{:.0}%) (paired median and range \
         over the repeats), with no program on either",
        t.0 * 100.0,
        t.1 * 100.0,
        t.2 * 100.0,
        u.0 * 100.0,
        u.1 * 100.0,
        u.2 * 100.0
    );
}

/// The programs' own CPU share in (b)'s traffic, by the kernel's BPF run-time statistics.
fn print_accounting(acct: &[Accounting], floor: f64, secs: u32, repeats: usize) {
    println!("\n### Where (b)'s CPU time goes: the programs' own share, measured by the kernel\n");
    println!(
        "The paired ratios above carry the machine's noise (see the noise floor). The kernel's BPF run-time statistics \
         (`BPF_ENABLE_STATS`, on only for these extra runs of (b): they add clock reads to every program run) give the time \
         the attached classifiers took in the same traffic: every program run of `netpol_from_pod` and `netpol_to_pod` \
         (each packet passes one on the sender's interface and one on the receiver's), over the busy time \
         (/proc/stat) of the busiest CPU in the run, as if every program ran on it. Where the flow is bound by that CPU, \
         removing the programs could speed it up by at most that share: (b)/(a) >= 1 - share (what the programs cost \
         other code indirectly, e.g. through the CPU caches, is not in it). Median of {} runs of {secs} s.\n\n\
         The statistics charge each run the clock reads around it: {floor:.1} ns per run here, measured on a classifier that \
         returns at once (BPF_PROG_TEST_RUN of netpol's no-op program through the same accounting; with the statistics off \
         the kernel does not read the clock and the programs do not pay it). \"net\" is the charge per run less that floor; \
         \"as charged\" keeps the floor in (an upper bound).\n",
        repeats.min(5)
    );
    println!("| case | protocol | Gbit/s | program runs/s | ns per run, as charged | ns per run, net | busiest CPU busy | programs' share of it, net (as charged) | (b)/(a) bound, net (as charged) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for a in acct {
        let net = (a.ns_per_run - floor).max(0.0);
        let net_share = a.share * net / a.ns_per_run.max(1e-9);
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.1} | {:.1} | {:.0}% | {:.2}% ({:.2}%) | >= {:.1}% ({:.1}%) |",
            a.case,
            if a.udp { "UDP" } else { "TCP" },
            a.gbps,
            a.runs_per_s,
            a.ns_per_run,
            net,
            a.busiest * 100.0,
            net_share * 100.0,
            a.share * 100.0,
            (1.0 - net_share) * 100.0,
            (1.0 - a.share) * 100.0
        );
    }
    println!();
}

//! `netpol-lab connrate`: new connections between two lab pods, as netperf's TCP_CRR does
//! them (connect, a 1-byte request, a 1-byte response, close; one after the other), and UDP
//! request/response on one socket (netperf's UDP_RR), with (a) no program, (b) netpol, (c) the
//! same policies as iptables rules, at 10, 1,000 and 10,000 policies: the throughput bench's
//! labs, policies and interleaving (`throughput`), and the programs' own CPU time per
//! connection from the kernel's BPF run-time statistics. (`churn` paces such connections.)
//!
//! netperf itself is not in Debian's main archive: client and server are threads of this
//! process in the pods' network namespaces, the client pinned to CPU 0 and the server to the
//! last CPU, as the throughput bench pins iperf3.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use netpol_daemon::testkit::lab::Lab;

use crate::throughput::{
    accounting_floor, cpu_busy_ns, iptables_clear, iptables_restore, iptables_rules, median, pair_lab, paired, policies, stats_of, PORT,
    SERVER_IP,
};

/// How long a client waits for an answer before it counts the exchange as failed.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Moves the calling thread into network namespace `netns`.
pub fn enter(netns: &str) -> Result<()> {
    let path = format!("/var/run/netns/{netns}");
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns {path}"));
    }
    Ok(())
}

/// Pins the calling thread to `cpu` (where the machine has it).
pub fn pin(cpu: usize) {
    if cpu >= ncpus() {
        return;
    }
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn ncpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPU the servers run on: the last one (the clients run on CPU 0).
fn server_cpu() -> usize {
    ncpus().saturating_sub(1)
}

/// Waits until `fd` is readable or `ms` have passed.
fn poll_in(fd: i32, ms: i32) {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// The server pod's responders: `tcp_threads` threads accepting on one listener (each takes a
/// connection, reads the 1-byte request, writes the 1-byte response and closes: the server
/// closes first, as an HTTP/1.0 server does, so the client ends without TIME_WAIT and never
/// runs out of ports), and one UDP thread answering every datagram. All pinned to the server
/// CPU; stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn start(lab: &Lab, tcp_threads: usize) -> Result<Server> {
        let netns = lab.pod("bench/server").netns.clone();
        let addr = SocketAddr::from((SERVER_IP, PORT));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = netns.clone();
        // Bound inside the pod's namespace by a thread that entered it.
        std::thread::spawn(move || {
            let r = (|| -> Result<(TcpListener, UdpSocket)> {
                enter(&ns)?;
                let l = TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                let u = UdpSocket::bind(addr)?;
                u.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok((l, u))
            })();
            let _ = tx.send(r);
        });
        let (listener, udp) = rx.recv().map_err(|_| anyhow!("binding the servers"))??;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..tcp_threads {
            let (l, stop) = (listener.try_clone()?, stop.clone());
            threads.push(std::thread::spawn(move || {
                pin(server_cpu());
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => answer(s),
                        Err(_) => poll_in(l.as_raw_fd(), 20),
                    }
                }
            }));
        }
        let stop2 = stop.clone();
        threads.push(std::thread::spawn(move || {
            pin(server_cpu());
            let mut b = [0u8; 64];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut b) {
                    let _ = udp.send_to(&b[..n.min(1)], from);
                }
            }
        }));
        Ok(Server { stop, threads })
    }
}

/// One TCP exchange on the server side: the request byte back, then close.
fn answer(mut s: TcpStream) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let mut b = [0u8; 1];
    if s.read_exact(&mut b).is_ok() {
        let _ = s.write_all(&b);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One connection as TCP_CRR makes it: connect, a byte each way, the server's close seen,
/// close. The time connect() took (the handshake).
pub fn crr_once(dst: SocketAddr) -> Result<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect(dst)?;
    let connect = t.elapsed();
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(&[1])?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    if s.read(&mut b)? != 0 {
        bail!("the server sent more than one byte");
    }
    Ok(connect)
}

/// What a run of one client did.
#[derive(Default)]
struct Run {
    done: u64,
    failed: u64,
    secs: f64,
    /// CPU busy time of every CPU together over the run, nanoseconds.
    cpu_ns: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.done as f64 / self.secs.max(1e-9)
    }

    /// CPU time (all CPUs) per exchange, microseconds.
    fn cpu_us(&self) -> f64 {
        self.cpu_ns as f64 / 1e3 / (self.done.max(1) as f64)
    }
}

/// Runs `f` for `secs` on a thread in the client pod pinned to CPU 0, counting what succeeds.
fn client_run(lab: &Lab, secs: f64, f: impl Fn(SocketAddr, &mut State) -> Result<()> + Send + 'static) -> Result<Run> {
    let netns = lab.pod("bench/client").netns.clone();
    let dst = SocketAddr::from((SERVER_IP, PORT));
    let h = std::thread::spawn(move || -> Result<Run> {
        enter(&netns)?;
        pin(0);
        let mut st = State::default();
        let cpu0: u64 = cpu_busy_ns()?.iter().sum();
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(secs);
        let mut run = Run::default();
        while Instant::now() < end {
            match f(dst, &mut st) {
                Ok(()) => run.done += 1,
                Err(_) => run.failed += 1,
            }
        }
        run.secs = t0.elapsed().as_secs_f64();
        run.cpu_ns = cpu_busy_ns()?.iter().sum::<u64>() - cpu0;
        Ok(run)
    });
    h.join().map_err(|_| anyhow!("client thread panicked"))?
}

/// A client's state between exchanges: the UDP socket of UDP_RR.
#[derive(Default)]
struct State {
    udp: Option<UdpSocket>,
}

fn tcp_crr(lab: &Lab, secs: f64) -> Result<Run> {
    client_run(lab, secs, |dst, _| crr_once(dst).map(|_| ()))
}

/// UDP_RR: one socket, a byte out, the byte back.
fn udp_rr(lab: &Lab, secs: f64) -> Result<Run> {
    client_run(lab, secs, |dst, st| {
        if st.udp.is_none() {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(dst)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            st.udp = Some(s);
        }
        let s = st.udp.as_ref().unwrap();
        s.send(&[1])?;
        let mut b = [0u8; 8];
        s.recv(&mut b)?;
        Ok(())
    })
}

/// Programs `n` policies into the netpol lab (its daemon started on the first call) and the
/// same as iptables rules into the iptables lab's node namespace.
fn program(prog: &mut Lab, ipt_node: &str, daemon: &Path, n: usize) -> Result<()> {
    prog.write_manifest("policies.yaml", &policies(n))?;
    if prog.daemon_pid().is_none() {
        prog.start_daemon(daemon)?;
    }
    let t0 = Instant::now();
    loop {
        let m = prog.metrics()?;
        if netpol_daemon::metrics::sample(&m, "netpol_policies").unwrap_or(0.0) >= n as f64 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the daemon did not program {n} policies within 60 s:\n{}", prog.daemon_log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    iptables_clear(ipt_node);
    iptables_restore(ipt_node, &iptables_rules(n))
}

/// Every run of one case (`tcp`, `udp`: in repeat order) at one rule count.
struct Row {
    case: String,
    policies: usize,
    tcp: Vec<Run>,
    udp: Vec<Run>,
}

impl Row {
    fn rates(&self, udp: bool) -> Vec<f64> {
        (if udp { &self.udp } else { &self.tcp }).iter().map(Run::rate).collect()
    }
}

/// The programs' own time in (b)'s traffic (kernel BPF run-time statistics).
struct Accounting {
    policies: usize,
    udp: bool,
    rate: f64,
    runs_per_exchange: f64,
    ns_per_run: f64,
    /// Program time over the busy time of the busiest CPU.
    share: f64,
}

pub fn run(daemon: &Path, secs: f64, repeats: usize, counts: &[usize]) -> Result<()> {
    let floor = accounting_floor()?;
    // Three labs side by side, as the throughput bench has them (iptables in a node namespace
    // of its own: its hooks stay registered after its rules are gone).
    let plain = pair_lab()?;
    let mut prog = pair_lab()?;
    let ipt = pair_lab()?;
    let ipt_node = ipt.node_netns.clone();
    let servers = [Server::start(&plain, 1)?, Server::start(&prog, 1)?, Server::start(&ipt, 1)?];
    let mut rows = Vec::new();
    let mut acct = Vec::new();
    for &n in counts {
        program(&mut prog, &ipt_node, daemon, n)?;
        let labs = [(&plain, "(a) no program"), (&prog, "(b) netpol"), (&ipt, "(c) iptables")];
        let mut runs: Vec<Row> = labs.iter().map(|(_, c)| Row { case: c.to_string(), policies: n, tcp: vec![], udp: vec![] }).collect();
        // Round 0 warms up (the caches, the daemon's first scrape, conntrack tables) and is
        // not kept.
        for repeat in 0..=repeats {
            for (i, (lab, _)) in labs.iter().enumerate() {
                let (t, u) = (tcp_crr(lab, secs)?, udp_rr(lab, secs)?);
                if repeat > 0 {
                    runs[i].tcp.push(t);
                    runs[i].udp.push(u);
                }
            }
        }
        for r in &runs {
            eprintln!("connrate: {} {n}: TCP {:.0} conn/s, UDP {:.0} trans/s", r.case, median(r.rates(false)), median(r.rates(true)));
        }
        rows.extend(runs);
        account(&prog, n, secs, repeats.clamp(1, 3), &mut acct)?;
        // The flow really was enforced: a port outside the policies is refused.
        if prog.tcp("bench/client", "bench/server", PORT + 1) {
            bail!("a port no policy allows was reachable: the programs are not enforcing");
        }
    }
    drop(servers);
    iptables_clear(&ipt_node);
    print_rates(&rows, counts, secs, repeats);
    print_accounting(&acct, floor, secs);
    Ok(())
}

/// Extra runs of (b) with the kernel's BPF run-time statistics on.
fn account(lab: &Lab, n: usize, secs: f64, repeats: usize, out: &mut Vec<Accounting>) -> Result<()> {
    use netpol_common::programs::{FROM_POD, TO_POD};
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    for udp in [false, true] {
        let mut rows = Vec::new();
        for _ in 0..repeats {
            let (ns0, runs0) = stats_of(&[FROM_POD, TO_POD])?;
            let cpu0 = cpu_busy_ns()?;
            let r = if udp { udp_rr(lab, secs)? } else { tcp_crr(lab, secs)? };
            let cpu1 = cpu_busy_ns()?;
            let (ns1, runs1) = stats_of(&[FROM_POD, TO_POD])?;
            if runs1 == runs0 || r.done == 0 {
                bail!("no netpol program ran during the run: the statistics are not counting");
            }
            let busiest = cpu1.iter().zip(&cpu0).map(|(b, a)| b.saturating_sub(*a)).max().unwrap_or(0).max(1) as f64;
            let (ns, runs) = ((ns1 - ns0) as f64, (runs1 - runs0) as f64);
            rows.push(Accounting {
                policies: n,
                udp,
                rate: r.rate(),
                runs_per_exchange: runs / r.done as f64,
                ns_per_run: ns / runs,
                share: ns / busiest,
            });
        }
        rows.sort_by(|a, b| a.share.partial_cmp(&b.share).unwrap());
        out.push(rows.swap_remove(rows.len() / 2));
    }
    Ok(())
}

fn print_rates(rows: &[Row], counts: &[usize], secs: f64, repeats: usize) {
    println!("## Connection rate (TCP connect/request/response/close and UDP request/response, {secs} s per run, median of {repeats})\n");
    println!(
        "The throughput bench's labs and policies (two lab pods, veth, /32 routes; (c): the same policies as iptables rules in \
         the node's FORWARD chain, established first, then one rule per peer and port). TCP: one connection after the other, \
         as netperf's TCP_CRR (connect, 1-byte request, 1-byte response, the server closes, the client closes): connections \
         per second; each is a new flow, whose first packet takes the policy lookup and the conntrack insert in (b) and walks \
         the rules in (c). UDP: 1-byte request and response on one socket, as netperf's UDP_RR: transactions per second on \
         one established flow. The client is pinned to CPU 0, the server to CPU 1 (netperf is not in Debian's main \
         archive: both are threads of the bench). The cases of a rule count run interleaved (a, b, c, a, b, c, ...); \
         ratios are paired, each run over the run of the same repeat of the other case, median and range. CPU per \
         exchange: the busy time of both CPUs (/proc/stat) over the run, per connection or transaction.\n"
    );
    println!("| case | policies | TCP conn/s | UDP trans/s | TCP vs (a), paired | UDP vs (a), paired | CPU per TCP connection | CPU per UDP transaction |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let pct = |(m, lo, hi): (f64, f64, f64)| format!("{:.1}% ({:.0}-{:.0}%)", m * 100.0, lo * 100.0, hi * 100.0);
    let find = |case: &str, n: usize| rows.iter().find(|r| r.case.starts_with(case) && r.policies == n).unwrap();
    for r in rows {
        let a = find("(a)", r.policies);
        let cpu = |v: &[Run]| median(v.iter().map(Run::cpu_us).collect());
        println!(
            "| {} | {} | {:.0} | {:.0} | {} | {} | {:.1} us | {:.1} us |",
            r.case,
            r.policies,
            median(r.rates(false)),
            median(r.rates(true)),
            pct(paired(&r.rates(false), &a.rates(false))),
            pct(paired(&r.rates(true), &a.rates(true))),
            cpu(&r.tcp),
            cpu(&r.udp)
        );
    }
    println!();
    for &n in counts {
        let (a, b, c) = (find("(a)", n), find("(b)", n), find("(c)", n));
        let failed: u64 = [a, b, c].iter().flat_map(|r| r.tcp.iter().chain(&r.udp)).map(|r| r.failed).sum();
        println!(
            "- {n} policies: (b)/(c) TCP {:.2}x, UDP {:.2}x; (b)/(a) TCP {:.1}%, UDP {:.1}% (paired medians); failed exchanges: {failed}",
            paired(&b.rates(false), &c.rates(false)).0,
            paired(&b.rates(true), &c.rates(true)).0,
            paired(&b.rates(false), &a.rates(false)).0 * 100.0,
            paired(&b.rates(true), &a.rates(true)).0 * 100.0,
        );
    }
}

fn print_accounting(acct: &[Accounting], floor: f64, secs: f64) {
    println!("\n### (b)'s programs in that traffic, measured by the kernel\n");
    println!(
        "Extra runs of (b) with the kernel's BPF run-time statistics on (as in the throughput section; median of up to 3 runs of \
         {secs} s): every run of `netpol_from_pod` and `netpol_to_pod` in the traffic (each packet passes one on the \
         sender's interface and one on the receiver's), net of the statistics' own charge per run ({floor:.1} ns here, \
         measured on the no-op classifier), per connection or transaction and as a share of the busiest CPU's busy time.\n"
    );
    println!("| policies | protocol | conn or trans/s | program runs per exchange | ns per run, net | program time per exchange, net | share of the busiest CPU, net |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for a in acct {
        let net = (a.ns_per_run - floor).max(0.0);
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.2} us | {:.2}% |",
            a.policies,
            if a.udp { "UDP" } else { "TCP" },
            a.rate,
            a.runs_per_exchange,
            net,
            net * a.runs_per_exchange / 1e3,
            a.share * net / a.ns_per_run.max(1e-9) * 100.0
        );
    }
    println!();
}

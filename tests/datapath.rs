//! The TC programs on crafted packets, through BPF_PROG_TEST_RUN: real kernel, real verifier,
//! real maps programmed by the daemon's own sync, no interface attached. Protocols the kernel
//! here cannot open sockets for (SCTP) and packets no socket would send (fragments, extension
//! headers) are covered here.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use netpol_daemon::compiler::compile_node;
use netpol_daemon::datapath::{CounterReader, Datapath, Iface};
use netpol_daemon::model::{Direction, ObjKey};
use netpol_daemon::source::manifests::{load_text, Loaded};
use netpol_daemon::testkit::testpkt::*;

const OK: i32 = 0;
const SHOT: i32 = 2;

static N: AtomicU32 = AtomicU32::new(0);

struct Fixture {
    dp: Datapath,
    pin: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

/// Loads the programs with maps of their own and programs `yaml` for pod t/web as the endpoint
/// on ifindex 1 (the loopback device a test run sees).
fn fixture(yaml: &str) -> Option<Fixture> {
    fixture_logging(yaml, false)
}

/// [`fixture`] with the programs loaded to log their decisions (`--bpf-debug`) or not.
fn fixture_logging(yaml: &str, bpf_debug: bool) -> Option<Fixture> {
    if unsafe { libc::geteuid() } != 0 {
        let msg = "datapath tests need root (BPF_PROG_TEST_RUN)";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return None;
    }
    let pin = PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    let _ = std::fs::remove_dir_all(&pin);
    Some(fixture_at(pin, yaml, bpf_debug))
}

/// [`fixture_logging`] over whatever `pin` already holds.
fn fixture_at(pin: PathBuf, yaml: &str, bpf_debug: bool) -> Fixture {
    let mut dp = Datapath::load_detached_with(&pin, bpf_debug).expect("loading the programs");
    let mut loaded = Loaded::default();
    load_text(Path::new("t.yaml"), &format!("{POD}\n---\n{yaml}"), &mut loaded);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let node = compile_node(&loaded.cluster, "n");
    let ifaces: BTreeMap<ObjKey, Iface> = [(ObjKey::new("t", "web"), Iface { ifindex: 1, ifname: "lo".into() })].into();
    let report = dp.sync(&node, &ifaces);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    dp.set_node_addrs(&["10.250.0.1".parse().unwrap()]).unwrap();
    Fixture { dp, pin }
}

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: t, labels: {app: web}}\nspec: {nodeName: n, containers: [{name: c, image: i, ports: [{name: diameter, containerPort: 3868, protocol: SCTP}]}]}\nstatus: {podIP: 10.1.0.10, podIPs: [{ip: 10.1.0.10}, {ip: 'fd00::10'}]}\n";

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: t}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.9.0.0/16]}}]
    ports: [{port: 80}]
  - ports: [{port: 53, protocol: UDP}, {port: 3000, endPort: 3100, protocol: SCTP}, {port: diameter, protocol: SCTP}]
  - from: [{ipBlock: {cidr: "fd00::/64"}}]
    ports: [{port: 8000, endPort: 9000}]
  egress:
  - to: [{ipBlock: {cidr: 10.2.0.0/16}}]
    ports: [{port: 443}]
"#;

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn run(f: &mut Fixture, dir: Direction, frame: &[u8]) -> i32 {
    f.dp.test_run(dir, frame, 1).expect("test run").0
}

/// Runs every `(what, direction, frame, verdict)` case and fails with every mismatch at once.
fn run_cases(f: &mut Fixture, cases: &[(&str, Direction, Vec<u8>, i32)]) {
    let mut bad = Vec::new();
    for (what, dir, frame, want) in cases {
        let got = run(f, *dir, frame);
        if got != *want {
            bad.push(format!("{what} ({dir:?}): want {want}, got {got}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn ports_protocols_ranges_and_address_classes() {
    let Some(mut f) = fixture(POLICY) else { return };
    let web = v4("10.1.0.10");
    let i = Direction::Ingress;
    let cases: Vec<(&str, Vec<u8>, i32)> = vec![
        ("tcp 80 from 10/8", tcp4(v4("10.1.1.1"), web, 40000, 80, TCP_SYN), OK),
        ("tcp 80 from the except", tcp4(v4("10.9.1.1"), web, 40000, 80, TCP_SYN), SHOT),
        ("tcp 81", tcp4(v4("10.1.1.1"), web, 40000, 81, TCP_SYN), SHOT),
        // (The class's one port, held in its POLICY entry: the protocol is compared too.)
        ("udp 80 from 10/8: the one TCP port opens no UDP", udp4(v4("10.1.1.1"), web, 40000, 80), SHOT),
        ("sctp 80 from 10/8", ipv4(v4("10.1.1.1"), web, 132, 5000, 80, 0, 0), SHOT),
        ("tcp 80 from outside 10/8", tcp4(v4("11.1.1.1"), web, 40000, 80, TCP_SYN), SHOT),
        ("udp 53 from anywhere", udp4(v4("192.0.2.1"), web, 5353, 53), OK),
        ("tcp 53: the UDP rule does not open TCP", tcp4(v4("192.0.2.1"), web, 5353, 53, TCP_SYN), SHOT),
        ("sctp 2999", ipv4(v4("192.0.2.1"), web, 132, 5000, 2999, 0, 0), SHOT),
        ("sctp 3000 (range start)", ipv4(v4("192.0.2.1"), web, 132, 5000, 3000, 0, 0), OK),
        ("sctp 3100 (range end)", ipv4(v4("192.0.2.1"), web, 132, 5000, 3100, 0, 0), OK),
        ("sctp 3101", ipv4(v4("192.0.2.1"), web, 132, 5000, 3101, 0, 0), SHOT),
        ("sctp named port diameter=3868", ipv4(v4("192.0.2.1"), web, 132, 5000, 3868, 0, 0), OK),
        ("sctp 3867", ipv4(v4("192.0.2.1"), web, 132, 5000, 3867, 0, 0), SHOT),
        ("icmp echo: port rules only", ipv4(v4("10.1.1.1"), web, 1, 7, 0, 8, 0), SHOT),
        ("non-first fragment cannot ride a port rule", ipv4(v4("10.1.1.1"), web, 6, 0, 0, 0, 100), SHOT),
        ("arp is not IP", arp(), OK),
        ("from the node's own address", tcp4(v4("10.250.0.1"), web, 40000, 9999, TCP_SYN), OK),
        ("ipv6 tcp 8500 from fd00::/64", ipv6(v6("fd00::1"), v6("fd00::10"), 6, 40000, 8500, TCP_SYN, &[]), OK),
        ("ipv6 tcp 9001", ipv6(v6("fd00::1"), v6("fd00::10"), 6, 40000, 9001, TCP_SYN, &[]), SHOT),
        ("ipv6 tcp from fd01::", ipv6(v6("fd01::1"), v6("fd00::10"), 6, 40000, 8500, TCP_SYN, &[]), SHOT),
        (
            "ipv6 behind hop-by-hop + dest opts + fragment(0)",
            ipv6(v6("fd00::1"), v6("fd00::10"), 6, 40000, 8500, TCP_SYN, &[0, 60, 44]),
            OK,
        ),
        ("ipv6 behind extension headers, wrong port", ipv6(v6("fd00::1"), v6("fd00::10"), 6, 40000, 7999, TCP_SYN, &[0, 60]), SHOT),
        ("ipv6 udp 53", ipv6(v6("2001:db8::1"), v6("fd00::10"), 17, 5353, 53, 0, &[]), OK),
        ("ipv6 neighbour solicitation", nd6(v6("fe80::1"), v6("ff02::1:ff00:10"), 135, 0, 255, &nd_lladdr_option(1), &[]), OK),
        (
            "ipv6 neighbour solicitation that crossed a router (hop limit 64)",
            ipv6(v6("fe80::1"), v6("ff02::1:ff00:10"), 58, 0, 0, 135, &[]),
            SHOT,
        ),
        ("ipv6 echo: port rules only", ipv6(v6("fd00::1"), v6("fd00::10"), 58, 9, 0, 128, &[]), SHOT),
    ];
    let mut bad = Vec::new();
    for (what, frame, want) in &cases {
        let got = run(&mut f, i, frame);
        if got != *want {
            bad.push(format!("{what}: want {want}, got {got}"));
        }
    }
    // Egress: only TCP 443 to 10.2/16.
    let e = Direction::Egress;
    for (what, frame, want) in [
        ("egress 443 to 10.2/16", tcp4(web, v4("10.2.3.4"), 40001, 443, TCP_SYN), OK),
        ("egress 80 to 10.2/16", tcp4(web, v4("10.2.3.4"), 40002, 80, TCP_SYN), SHOT),
        ("egress 443 elsewhere", tcp4(web, v4("10.3.3.4"), 40003, 443, TCP_SYN), SHOT),
        ("egress udp 443", udp4(web, v4("10.2.3.4"), 40004, 443), SHOT),
    ] {
        let got = run(&mut f, e, &frame);
        if got != want {
            bad.push(format!("{what}: want {want}, got {got}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn conntrack_lets_replies_through_and_follows_teardown() {
    let Some(mut f) = fixture(POLICY) else { return };
    // One CPU: packets after the flow cache has a flow find it (the cache is per CPU).
    assert!(on_cpu(0));
    let web = v4("10.1.0.10");
    let srv = v4("10.2.0.5");
    let (i, e) = (Direction::Ingress, Direction::Egress);
    // The reply direction alone is denied: ingress allows port 80 from 10/8 only.
    let synack = tcp4(srv, web, 443, 41000, TCP_SYN | TCP_ACK);
    assert_eq!(run(&mut f, i, &synack), SHOT, "no flow yet");
    // The pod opens an allowed connection; its replies pass the isolated ingress.
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 41000, 443, TCP_SYN)), OK);
    assert_eq!(run(&mut f, i, &synack), OK, "reply of a tracked flow");
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 41000, 443, TCP_ACK)), OK);
    // A different source port is a different flow.
    assert_eq!(run(&mut f, i, &tcp4(srv, web, 443, 41001, TCP_ACK)), SHOT);
    // RST passes and ends the flow.
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 41000, 443, TCP_RST)), OK);
    assert_eq!(run(&mut f, i, &tcp4(srv, web, 443, 41000, TCP_ACK)), SHOT, "flow torn down by RST");
    // UDP: a DNS-like exchange the other way round (allowed in, reply out through the
    // isolated egress).
    assert_eq!(run(&mut f, e, &udp4(web, v4("192.0.2.9"), 53, 5353)), SHOT, "no flow yet");
    assert_eq!(run(&mut f, i, &udp4(v4("192.0.2.9"), web, 5353, 53)), OK);
    assert_eq!(run(&mut f, e, &udp4(web, v4("192.0.2.9"), 53, 5353)), OK, "reply of a tracked flow");
    // Denied traffic creates no state.
    assert_eq!(run(&mut f, i, &tcp4(v4("10.9.0.1"), web, 40000, 80, TCP_SYN)), SHOT);
    assert_eq!(run(&mut f, e, &tcp4(web, v4("10.9.0.1"), 80, 40000, TCP_SYN | TCP_ACK)), SHOT);

    // Counters were kept per direction and verdict for endpoint 0.
    let c = CounterReader::open(&f.pin).unwrap();
    assert!(c.read(0, 0, 0) >= 2, "ingress allowed");
    assert!(c.read(0, 0, 1) >= 3, "ingress denied");
    assert!(c.read(0, 1, 0) >= 3, "egress allowed");
    assert!(c.read(0, 1, 1) >= 2, "egress denied");
}

#[test]
fn pod_without_policy_is_never_blocked_and_all_traffic_rules_allow_icmp() {
    let Some(mut f) = fixture("") else { return };
    let web = v4("10.1.0.10");
    // (From the pod, its own address as the source: anti-spoofing applies without policies.)
    for (dir, src, dst) in [(Direction::Ingress, v4("10.9.1.1"), web), (Direction::Egress, web, v4("10.9.1.1"))] {
        assert_eq!(run(&mut f, dir, &tcp4(src, dst, 1, 2, TCP_SYN)), OK);
        assert_eq!(run(&mut f, dir, &ipv4(src, dst, 1, 7, 0, 8, 0)), OK);
    }
    let Some(mut f) = fixture("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: t}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}]}]}\n") else { return };
    assert_eq!(run(&mut f, Direction::Ingress, &ipv4(v4("10.9.1.1"), web, 1, 7, 0, 8, 0)), OK, "icmp under a rule without ports");
    assert_eq!(run(&mut f, Direction::Ingress, &ipv4(v4("10.9.1.1"), web, 6, 0, 0, 0, 100),), OK, "fragment under a rule without ports");
    assert_eq!(run(&mut f, Direction::Ingress, &ipv4(v4("11.9.1.1"), web, 1, 7, 0, 8, 0)), SHOT);
}

#[test]
fn later_fragments_follow_their_first_fragment() {
    let Some(mut f) = fixture(POLICY) else { return };
    let web = v4("10.1.0.10");
    let src = v4("192.0.2.1");
    let i = Direction::Ingress;
    // An allowed UDP 53 datagram in three fragments.
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 5353, 53, 77, 0, true)), OK);
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 0, 0, 77, 185, true)), OK, "middle fragment");
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 0, 0, 77, 370, false)), OK, "last fragment");
    // Fragments of other datagrams, or from elsewhere, do not ride along.
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 0, 0, 78, 185, false)), SHOT, "unknown id");
    assert_eq!(run(&mut f, i, &ipv4_frag(v4("192.0.2.2"), web, 17, 0, 0, 77, 185, false)), SHOT, "other source");
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 6, 0, 0, 77, 185, false)), SHOT, "other protocol");
    // A denied first fragment opens nothing for the rest.
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 5353, 54, 90, 0, true)), SHOT);
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 0, 0, 90, 185, false)), SHOT);
}

#[test]
fn icmp_errors_about_tracked_flows_pass() {
    let Some(mut f) = fixture(POLICY) else { return };
    let web = v4("10.1.0.10");
    let srv = v4("10.2.0.5");
    let (i, e) = (Direction::Ingress, Direction::Egress);
    let syn = tcp4(web, srv, 41000, 443, TCP_SYN);
    let unreachable = icmp4_error(v4("10.2.0.1"), web, 3, 4, &syn);
    assert_eq!(run(&mut f, i, &unreachable), SHOT, "no flow yet: ICMP is not allowed in");
    assert_eq!(run(&mut f, e, &syn), OK);
    assert_eq!(run(&mut f, i, &unreachable), OK, "fragmentation needed for an allowed flow");
    assert_eq!(run(&mut f, i, &icmp4_error(v4("10.2.0.1"), web, 11, 0, &syn)), OK, "time exceeded");
    let other = tcp4(web, srv, 41001, 443, TCP_SYN);
    assert_eq!(run(&mut f, i, &icmp4_error(v4("10.2.0.1"), web, 3, 3, &other)), SHOT, "about a flow that does not exist");
    // An error the pod sends about a flow that came in (UDP 53 from outside).
    let q = udp4(v4("192.0.2.7"), web, 5353, 53);
    assert_eq!(run(&mut f, i, &q), OK);
    assert_eq!(run(&mut f, e, &icmp4_error(web, v4("192.0.2.7"), 3, 3, &q)), OK, "port unreachable back to the client");
}

#[test]
fn policy_change_keeps_or_revalidates_tracked_flows() {
    let Some(mut f) = fixture(POLICY) else { return };
    // One CPU: packets after the flow cache has a flow find it (the cache is per CPU).
    assert!(on_cpu(0));
    let web = v4("10.1.0.10");
    let srv = v4("10.2.0.5");
    let e = Direction::Egress;
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 42000, 443, TCP_SYN)), OK);
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 42001, 443, TCP_SYN)), OK);
    // The egress allow goes away.
    let mut loaded = Loaded::default();
    let narrower = POLICY.replace("cidr: 10.2.0.0/16", "cidr: 10.3.0.0/16");
    load_text(Path::new("t.yaml"), &format!("{POD}\n---\n{narrower}"), &mut loaded);
    let node = compile_node(&loaded.cluster, "n");
    let ifaces: BTreeMap<ObjKey, Iface> = [(ObjKey::new("t", "web"), Iface { ifindex: 1, ifname: "lo".into() })].into();
    assert!(f.dp.sync(&node, &ifaces).errors.is_empty());
    // New connections follow the new policy at once; tracked ones continue (--established=keep).
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 42002, 443, TCP_SYN)), SHOT, "new connection");
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 42000, 443, TCP_ACK)), OK, "tracked flow kept");
    // --established=revalidate: the daemon re-checks the tracked flows and cuts both.
    let cut = f.dp.revalidate(&node, &["10.250.0.1".parse().unwrap()]);
    assert_eq!(cut, 2, "two flows no longer allowed");
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 42000, 443, TCP_ACK)), SHOT, "flow cut");
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 42001, 443, TCP_ACK)), SHOT, "flow cut");
    // Flows the new policy still allows survive revalidation.
    assert_eq!(run(&mut f, e, &tcp4(web, v4("10.3.0.1"), 42003, 443, TCP_SYN)), OK);
    assert_eq!(f.dp.revalidate(&node, &[]), 0);
    assert_eq!(run(&mut f, e, &tcp4(web, v4("10.3.0.1"), 42003, 443, TCP_ACK)), OK);
}

#[test]
fn conntrack_timeouts_come_from_the_config() {
    let Some(mut f) = fixture(POLICY) else { return };
    let web = v4("10.1.0.10");
    let (i, e) = (Direction::Ingress, Direction::Egress);
    // UDP flows idle out after 1 ns: the reply finds the entry expired.
    f.dp.set_config(&netpol_common::Config { ct_udp_ns: 1, ..Default::default() }).unwrap();
    assert_eq!(run(&mut f, i, &udp4(v4("192.0.2.9"), web, 5353, 53)), OK);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(run(&mut f, e, &udp4(web, v4("192.0.2.9"), 53, 5353)), SHOT, "expired");
    // Back to the default (120 s): the reply passes.
    f.dp.set_config(&netpol_common::Config::default()).unwrap();
    assert_eq!(run(&mut f, i, &udp4(v4("192.0.2.9"), web, 5354, 53)), OK);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(run(&mut f, e, &udp4(web, v4("192.0.2.9"), 53, 5354)), OK, "within the default timeout");
}

/// Every event in the ring buffer now.
fn drain(rb: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<netpol_common::FlowEvent> {
    let mut events = Vec::new();
    while let Some(item) = rb.next() {
        events.push(netpol_daemon::datapath::read_event(&item).expect("a FlowEvent"));
    }
    events
}

#[test]
fn deny_events_are_rate_limited_and_off_by_default() {
    use netpol_common::*;
    let Some(mut f) = fixture(POLICY) else { return };
    let web = v4("10.1.0.10");
    let i = Direction::Ingress;
    let mut ev = f.dp.take_events().expect("ring buffer");
    let denied = tcp4(v4("10.9.1.1"), web, 40000, 80, TCP_SYN);
    assert_eq!(run(&mut f, i, &denied), SHOT);
    assert!(ev.ring.next().is_none(), "off by default");
    ev.control.set(EventConfig { per_sec: 3, verdicts: EVENTS_DENIED | EVENTS_AUDIT }).unwrap();
    // Test runs execute on whichever CPU; pin to one so the per-CPU budget is one budget.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    for _ in 0..10 {
        assert_eq!(run(&mut f, i, &denied), SHOT);
    }
    assert_eq!(run(&mut f, i, &tcp4(v4("10.1.1.1"), web, 40000, 80, TCP_SYN)), OK, "allowed: no event (not asked for)");
    let events = drain(&mut ev.ring);
    assert_eq!(events.len(), 3, "rate limit of 3 per second: {events:?}");
    let e = events[0];
    assert_eq!((e.dir, e.proto, e.family), (DIR_INGRESS, 6, FAMILY_V4));
    assert_eq!((e.outcome as u32, e.slot, e.flags), (VERDICT_DENY, SLOT_NONE, FLOW_ISOLATED));
    assert_eq!(&e.src[..4], &[10, 9, 1, 1]);
    assert_eq!(&e.dst[..4], &[10, 1, 0, 10]);
    assert_eq!((e.sport, e.dport, e.tcp_flags), (40000, 80, TCP_SYN));
    assert_eq!(e.len as usize, denied.len());
    assert_eq!(ev.control.get(), EventConfig { per_sec: 3, verdicts: EVENTS_DENIED | EVENTS_AUDIT });
}

/// Allowed flows are reported once, by the packet that created their conntrack entry (with the
/// slot of the policy that allowed them), never by their established packets or replies; each
/// kind is sent only while asked for; drops of every reason are reported.
#[test]
fn flow_events_report_new_flows_once_and_every_drop() {
    use netpol_common::*;
    let Some(mut f) = fixture(POLICY) else { return };
    let web = v4("10.1.0.10");
    let (i, e) = (Direction::Ingress, Direction::Egress);
    let mut ev = f.dp.take_events().expect("ring buffer");
    ev.control.set(EventConfig { per_sec: 1000, verdicts: EVENTS_ALLOWED | EVENTS_DENIED | EVENTS_AUDIT }).unwrap();
    let peer = v4("10.1.1.1");
    assert_eq!(run(&mut f, i, &tcp4(peer, web, 40000, 80, TCP_SYN)), OK);
    assert_eq!(run(&mut f, e, &tcp4(web, peer, 80, 40000, TCP_SYN | TCP_ACK)), OK, "the reply");
    for _ in 0..5 {
        assert_eq!(run(&mut f, i, &tcp4(peer, web, 40000, 80, TCP_ACK)), OK, "established");
    }
    let got = drain(&mut ev.ring);
    assert_eq!(got.len(), 1, "one event for the new flow: {got:?}");
    assert_eq!((got[0].outcome as u32, got[0].slot, got[0].dir, got[0].dport), (VERDICT_ALLOW, 0, DIR_INGRESS, 80));
    // A second flow (new source port): its own event. UDP too.
    assert_eq!(run(&mut f, i, &tcp4(peer, web, 40001, 80, TCP_SYN)), OK);
    assert_eq!(run(&mut f, i, &udp4(peer, web, 5353, 53)), OK);
    assert_eq!(run(&mut f, i, &udp4(peer, web, 5353, 53)), OK);
    let got: Vec<(u16, u8)> = drain(&mut ev.ring).iter().map(|e| (e.sport, e.proto)).collect();
    assert_eq!(got, vec![(40001, PROTO_TCP), (5353, PROTO_UDP)]);
    // Drops: the policy's, a spoofed source out of the pod, an RST outside the window.
    assert_eq!(run(&mut f, i, &tcp4(v4("10.9.0.1"), web, 40002, 80, TCP_SYN)), SHOT);
    assert_eq!(run(&mut f, e, &tcp4(v4("10.1.0.99"), v4("10.2.0.1"), 40003, 443, TCP_SYN)), SHOT);
    assert_eq!(run(&mut f, i, &with_seq(tcp4(peer, web, 40000, 80, TCP_RST), 0x8000_0000, 0)), SHOT);
    let got: Vec<u32> = drain(&mut ev.ring).iter().map(|e| e.outcome as u32).collect();
    assert_eq!(got, vec![VERDICT_DENY, VERDICT_SPOOFED, DROP_TCP_RST]);
    // Only denials asked for: a new allowed flow sends nothing.
    ev.control.set(EventConfig { per_sec: 1000, verdicts: EVENTS_DENIED }).unwrap();
    assert_eq!(run(&mut f, i, &tcp4(peer, web, 40004, 80, TCP_SYN)), OK);
    assert!(drain(&mut ev.ring).is_empty());
    // Nothing asked for (a rate of 0 is nothing too).
    ev.control.set(EventConfig { per_sec: 0, verdicts: EVENTS_DENIED }).unwrap();
    assert_eq!(run(&mut f, i, &tcp4(v4("10.9.0.1"), web, 40005, 80, TCP_SYN)), SHOT);
    assert!(drain(&mut ev.ring).is_empty());
}

#[test]
fn a_pod_whose_entries_do_not_fit_fails_closed_and_is_named() {
    let Some(mut f) = fixture("") else { return };
    // Twenty rules, each its own address class: twenty POLICY entries for web.
    let rules: Vec<String> =
        (1..=20).map(|i| format!("{{from: [{{ipBlock: {{cidr: 10.7.{i}.0/24}}}}], ports: [{{port: {}}}]}}", 75 + i)).collect();
    let yaml = format!(
        "{POD}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: db, namespace: t, labels: {{app: db}}}}\nspec: {{nodeName: n, containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: 10.1.0.11}}\n---\n\
apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: wide, namespace: t}}\nspec: {{podSelector: {{matchLabels: {{app: web}}}}, ingress: [{}]}}\n---\n\
apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: narrow, namespace: t}}\nspec: {{podSelector: {{matchLabels: {{app: db}}}}, ingress: [{{from: [{{ipBlock: {{cidr: 10.7.1.0/24}}}}]}}]}}\n",
        rules.join(", ")
    );
    let mut loaded = Loaded::default();
    load_text(Path::new("t.yaml"), &yaml, &mut loaded);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let node = compile_node(&loaded.cluster, "n");
    let ifaces: BTreeMap<ObjKey, Iface> = [
        (ObjKey::new("t", "web"), Iface { ifindex: 1, ifname: "lo".into() }),
        (ObjKey::new("t", "db"), Iface { ifindex: 2, ifname: "fake".into() }),
    ]
    .into();
    let allowed = |sport| tcp4(v4("10.7.5.1"), v4("10.1.0.10"), sport, 80, TCP_SYN);
    let r = f.dp.sync(&node, &ifaces);
    assert!(r.errors.is_empty() && r.fail_closed.is_empty(), "{:?}", r.errors);
    assert_eq!(run(&mut f, Direction::Ingress, &allowed(40000)), OK);

    // A POLICY budget of 10 entries: web needs 20, db 1. web fails closed, named with its policy.
    f.dp.set_limits(netpol_daemon::datapath::Limits { policy: 10, ..Default::default() });
    let r = f.dp.sync(&node, &ifaces);
    assert_eq!(r.fail_closed, vec![ObjKey::new("t", "web")]);
    assert!(r.errors.iter().any(|e| e.contains("t/web") && e.contains("t/wide") && e.contains("failing closed")), "{:?}", r.errors);
    assert_eq!(run(&mut f, Direction::Ingress, &allowed(40001)), SHOT, "fails closed, never open");
    assert!(r.policy >= 1 && r.policy <= 10, "db keeps its entries: {}", r.policy);

    // Room again: web is enforced as written.
    f.dp.set_limits(netpol_daemon::datapath::Limits::default());
    let r = f.dp.sync(&node, &ifaces);
    assert!(r.fail_closed.is_empty());
    assert_eq!(run(&mut f, Direction::Ingress, &allowed(40002)), OK);
}

#[test]
fn audit_mode_passes_would_be_drops_and_counts_them() {
    // An audit policy (port 80 only) beside an enforcing one (10.0.0.0/8 on any port).
    let audit = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: trial, namespace: t, annotations: {netpol.io/audit: \"true\"}}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress], ingress: [{ports: [{port: 80}]}], egress: [{ports: [{port: 53, protocol: UDP}]}]}\n";
    let enforcing = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: live, namespace: t}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}]}]}\n";
    let Some(mut f) = fixture(&format!("{audit}---\n{enforcing}")) else { return };
    let web = v4("10.1.0.10");
    let (i, e) = (Direction::Ingress, Direction::Egress);
    let mut ev = f.dp.take_events().unwrap();
    let verdicts = netpol_common::EVENTS_DENIED | netpol_common::EVENTS_AUDIT;
    ev.control.set(netpol_common::EventConfig { per_sec: 100, verdicts }).unwrap();
    assert_eq!(run(&mut f, i, &tcp4(v4("192.0.2.1"), web, 40000, 80, TCP_SYN)), OK, "allowed by the audit policy's rule");
    assert_eq!(run(&mut f, i, &tcp4(v4("10.5.0.1"), web, 40000, 22, TCP_SYN)), OK, "allowed by the enforcing policy");
    assert_eq!(run(&mut f, i, &tcp4(v4("192.0.2.1"), web, 40000, 22, TCP_SYN)), SHOT, "the enforcing policy isolates ingress: a real drop");
    // Egress is isolated by the audit policy alone: nothing is dropped.
    assert_eq!(run(&mut f, e, &tcp4(web, v4("192.0.2.1"), 40000, 443, TCP_SYN)), OK, "audit");
    assert_eq!(run(&mut f, e, &udp4(web, v4("192.0.2.1"), 40000, 53)), OK, "allowed");
    let c = CounterReader::open(&f.pin).unwrap();
    let (ig, eg) = (netpol_common::DIR_INGRESS, netpol_common::DIR_EGRESS);
    use netpol_common::{VERDICT_ALLOW as A, VERDICT_AUDIT as AU, VERDICT_DENY as D};
    assert_eq!((c.read(0, ig, A), c.read(0, ig, AU), c.read(0, ig, D)), (2, 0, 1));
    assert_eq!((c.read(0, eg, A), c.read(0, eg, AU), c.read(0, eg, D)), (1, 1, 0));
    let mut verdicts: Vec<(u8, u32, u16)> = drain(&mut ev.ring).iter().map(|e| (e.dir, e.outcome as u32, e.dport)).collect();
    verdicts.sort();
    assert_eq!(verdicts, vec![(ig, D, 22), (eg, AU, 443)]);
}

#[test]
fn programs_pass_the_verifier_well_below_its_limits() {
    let Some(f) = fixture("") else { return };
    let stats = f.dp.program_stats();
    assert_eq!(stats.len(), 2, "{stats:?}");
    for (name, verified, insns, jited) in stats {
        let verified = verified.expect("kernel reports verified_insns (5.16+)");
        let insns = insns.expect("translated size");
        eprintln!("{name}: {verified} instructions processed by the verifier, {insns} instructions, {jited:?} bytes JIT-compiled");
        // The verifier's complexity limit is 1,000,000 processed instructions, and so is the
        // size limit of privileged programs (4,096 is unprivileged programs', which netpol's,
        // loaded with CAP_BPF, are not: the conntrack path's two look-ups in either order took
        // it past 4,096). Stay far from both.
        assert!(verified < 200_000, "{name}: {verified} processed instructions");
        assert!(insns < 8192, "{name}: {insns} instructions");
    }
}

#[test]
fn allowed_packets_are_counted_against_the_policy_that_allowed_them() {
    let pol = |name: &str, ingress: &str| {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: t}}\nspec: {{podSelector: {{}}, ingress: [{ingress}]}}\n")
    };
    let a = pol("a-internal", "{from: [{ipBlock: {cidr: 10.0.0.0/8}}], ports: [{port: 80}]}");
    let b = pol("b-public", "{ports: [{port: 80}, {port: 443}]}");
    let Some(mut f) = fixture(&format!("{a}---\n{b}")) else { return };
    let web = v4("10.1.0.10");
    let (i, e) = (Direction::Ingress, Direction::Egress);
    // Port 80 from 10/8: both allow, counted once, against the first (slot 0); its reply
    // (egress is not isolated) belongs to the same flow.
    assert_eq!(run(&mut f, i, &tcp4(v4("10.7.0.1"), web, 40000, 80, TCP_SYN)), OK);
    assert_eq!(run(&mut f, e, &tcp4(web, v4("10.7.0.1"), 80, 40000, TCP_SYN | TCP_ACK)), OK);
    assert_eq!(run(&mut f, i, &tcp4(v4("10.7.0.1"), web, 40000, 80, TCP_ACK)), OK);
    // 443 from anywhere: only b-public.
    assert_eq!(run(&mut f, i, &tcp4(v4("192.0.2.1"), web, 40001, 443, TCP_SYN)), OK);
    // Denied, and egress that no policy had to allow: not counted against any policy.
    assert_eq!(run(&mut f, i, &tcp4(v4("192.0.2.1"), web, 40002, 22, TCP_SYN)), SHOT);
    assert_eq!(run(&mut f, e, &tcp4(web, v4("192.0.2.9"), 40003, 443, TCP_SYN)), OK);
    let c = CounterReader::open(&f.pin).unwrap();
    let (ig, eg) = (netpol_common::DIR_INGRESS, netpol_common::DIR_EGRESS);
    let slots = |c: &CounterReader, d| (0..4).map(|s| c.read_policy(0, d, s)).collect::<Vec<_>>();
    assert_eq!(slots(&c, ig), vec![3, 1, 0, 0]);
    assert_eq!(slots(&c, eg), vec![0, 0, 0, 0]);
    let (labels, retired) = f.dp.policy_slots();
    assert_eq!(labels, vec![(0, ObjKey::new("t", "web"), ig, vec!["a-internal".to_string(), "b-public".to_string()])]);
    assert!(retired.is_empty());

    // A policy sorting first shifts the slots: the old counts are kept under their policies
    // and the slots start again from zero with their new meaning.
    let z = pol("0-ssh", "{ports: [{port: 22}]}");
    let mut loaded = Loaded::default();
    load_text(Path::new("t.yaml"), &format!("{POD}\n---\n{z}---\n{a}---\n{b}"), &mut loaded);
    let node = compile_node(&loaded.cluster, "n");
    let ifaces: BTreeMap<ObjKey, Iface> = [(ObjKey::new("t", "web"), Iface { ifindex: 1, ifname: "lo".into() })].into();
    assert!(f.dp.sync(&node, &ifaces).errors.is_empty());
    assert_eq!(run(&mut f, i, &tcp4(v4("192.0.2.1"), web, 40004, 22, TCP_SYN)), OK);
    assert_eq!(slots(&c, ig), vec![1, 0, 0, 0]);
    let (labels, retired) = f.dp.policy_slots();
    assert_eq!(labels[0].3, vec!["0-ssh".to_string(), "a-internal".to_string(), "b-public".to_string()]);
    let web_key = ObjKey::new("t", "web");
    assert_eq!(retired.get(&(web_key.clone(), ig, "a-internal".to_string())), Some(&3));
    assert_eq!(retired.get(&(web_key, ig, "b-public".to_string())), Some(&1));
}

/// Moves this test's thread to `cpu` (test runs execute on the calling CPU, and the flow
/// cache is per CPU). False if the machine has no such CPU.
fn on_cpu(cpu: usize) -> bool {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Deletes every conntrack entry behind the daemon's back (no flow-cache epoch bumped): what
/// passes afterwards passes through the flow cache alone.
fn drop_conntrack_entries(pin: &Path) -> usize {
    use aya::maps::{HashMap, Map, MapData};
    let md = MapData::from_pin(pin.join(netpol_common::maps::CONNTRACK)).expect("pinned CONNTRACK");
    let mut ct: HashMap<MapData, netpol_common::CtKey, netpol_common::CtValue> =
        HashMap::try_from(Map::from_map_data(md).unwrap()).unwrap();
    let keys: Vec<_> = ct.keys().flatten().collect();
    for k in &keys {
        ct.remove(k).unwrap();
    }
    keys.len()
}

#[test]
fn flow_cache_vouches_for_a_flow_only_under_its_epoch_and_lifetime() {
    let Some(mut f) = fixture(POLICY) else { return };
    assert!(on_cpu(0));
    let web = v4("10.1.0.10");
    let (i, e) = (Direction::Ingress, Direction::Egress);
    // A DNS query comes in (allowed); its reply goes out through the isolated egress only as
    // a tracked flow.
    let query = udp4(v4("192.0.2.9"), web, 5353, 53);
    let reply = udp4(web, v4("192.0.2.9"), 53, 5353);
    assert_eq!(run(&mut f, i, &query), OK);
    assert_eq!(run(&mut f, e, &reply), OK, "conntrack hit, now cached");
    assert!(drop_conntrack_entries(&f.pin) >= 1);
    assert_eq!(run(&mut f, e, &reply), OK, "the flow cache alone vouches for the flow");
    // Voided (new settings void every slot): the table no longer has the flow.
    f.dp.set_config(&netpol_common::Config::default()).unwrap();
    assert_eq!(run(&mut f, e, &reply), SHOT, "voided slot, no conntrack entry");

    // IPv6 takes the general parser, and the same cache: a connection in from fd00::/64 on
    // 8080, the pod's packets back out through the isolated egress.
    let (peer, me) = (v6("fd00::7"), v6("fd00::10"));
    assert_eq!(run(&mut f, i, &ipv6(peer, me, 6, 40000, 8080, TCP_SYN, &[])), OK);
    let back = ipv6(me, peer, 6, 8080, 40000, TCP_ACK, &[]);
    assert_eq!(run(&mut f, e, &back), OK, "conntrack hit, now cached");
    drop_conntrack_entries(&f.pin);
    assert_eq!(run(&mut f, e, &back), OK, "IPv6: the flow cache alone vouches for the flow");
    f.dp.set_config(&netpol_common::Config::default()).unwrap();
    assert_eq!(run(&mut f, e, &back), SHOT, "IPv6: voided slot, no conntrack entry");

    // Off: every packet asks the table.
    assert_eq!(run(&mut f, i, &query), OK);
    f.dp.set_flow_cache(false).unwrap();
    assert_eq!(run(&mut f, e, &reply), OK);
    drop_conntrack_entries(&f.pin);
    assert_eq!(run(&mut f, e, &reply), SHOT, "flow cache off");
    f.dp.set_flow_cache(true).unwrap();

    // A slot lives for at most 100 ticks (<= 1 s): then the table is asked again.
    assert_eq!(run(&mut f, i, &query), OK);
    assert_eq!(run(&mut f, e, &reply), OK);
    drop_conntrack_entries(&f.pin);
    assert_eq!(run(&mut f, e, &reply), OK);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(run(&mut f, e, &reply), SHOT, "slot expired, no conntrack entry");
}

#[test]
fn a_reset_on_one_cpu_voids_the_flow_cache_of_every_cpu() {
    let Some(mut f) = fixture(POLICY) else { return };
    if !on_cpu(1) {
        panic!("this test needs two CPUs");
    }
    assert!(on_cpu(0));
    let web = v4("10.1.0.10");
    let srv = v4("10.2.0.5");
    let (i, e) = (Direction::Ingress, Direction::Egress);
    // The pod connects out; the server's packets come back through the isolated ingress.
    let back = tcp4(srv, web, 443, 41000, TCP_ACK);
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 41000, 443, TCP_SYN)), OK);
    assert_eq!(run(&mut f, i, &back), OK, "reply: conntrack hit, cached on CPU 0");
    assert_eq!(run(&mut f, i, &back), OK, "reply: flow cache hit");
    // The pod resets the connection from CPU 1.
    assert!(on_cpu(1));
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 41000, 443, TCP_RST)), OK);
    // CPU 0's slot is void: the late packet is judged afresh and denied.
    assert!(on_cpu(0));
    assert_eq!(run(&mut f, i, &back), SHOT, "flow torn down by RST on another CPU");
}

#[test]
fn active_flows_outlive_their_idle_timeout_through_the_flow_cache_and_idle_ones_expire() {
    let Some(mut f) = fixture(POLICY) else { return };
    assert!(on_cpu(0));
    let web = v4("10.1.0.10");
    let (i, e) = (Direction::Ingress, Direction::Egress);
    // UDP idles out after 400 ms: the cache vouches for at most 20 ticks at a time.
    f.dp.set_config(&netpol_common::Config { ct_udp_ns: 400_000_000, ..Default::default() }).unwrap();
    let query = udp4(v4("192.0.2.9"), web, 5353, 53);
    let reply = udp4(web, v4("192.0.2.9"), 53, 5353);
    assert_eq!(run(&mut f, i, &query), OK);
    // Replies every 50 ms for 1.5 s (almost four timeouts): the flow stays alive, so the
    // cache's trips to the table refresh the entry.
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_millis(1500) {
        assert_eq!(run(&mut f, e, &reply), OK, "active flow at {:?}", start.elapsed());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Idle past the timeout: gone, cache or not.
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert_eq!(run(&mut f, e, &reply), SHOT, "idle flow expired");
}

/// Egress isolated, allowed only to the pod's own addresses; ingress not isolated. The
/// frames a pod forges to itself pass both of its hooks.
const SELF_ONLY_EGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: self-only, namespace: t}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.1.0.10/32}}, {ipBlock: {cidr: "fd00::10/128"}}]
"#;

#[test]
fn a_forged_hairpin_reply_does_not_open_the_isolated_egress() {
    let Some(mut f) = fixture(SELF_ONLY_EGRESS) else { return };
    f.dp.set_flow_cache(false).unwrap();
    let (i, e) = (Direction::Ingress, Direction::Egress);
    let mut bad = Vec::new();
    let mut check = |f: &mut Fixture, what: &str, dir: Direction, frame: &[u8], want: i32| {
        let got = run(f, dir, frame);
        if got != want {
            bad.push(format!("{what}: want {want}, got {got}"));
        }
    };
    for (fam, me, x, y) in [
        ("v4", IpAddr::from(v4("10.1.0.10")), IpAddr::from(v4("10.2.0.5")), IpAddr::from(v4("192.0.2.9"))),
        ("v6", IpAddr::from(v6("fd00::10")), IpAddr::from(v6("fd00::5")), IpAddr::from(v6("2001:db8::9"))),
    ] {
        let udp = |s: IpAddr, d: IpAddr, sp: u16, dp: u16| frame(s, d, 17, sp, dp, 0);
        let tcp = |s: IpAddr, d: IpAddr, sp: u16, dp: u16, fl: u8| frame(s, d, 6, sp, dp, fl);
        check(&mut f, &format!("{fam} udp to X:80 denied"), e, &udp(me, x, 5000, 80), SHOT);
        // The pod forges X's "reply" to itself: anti-spoofing drops it on its way out (a pod
        // sends only from its own addresses), so it never reaches the open ingress where it
        // would have made an entry; the pod's flow to X:80 stays denied.
        let forged = udp(x, me, 80, 5000);
        check(&mut f, &format!("{fam} forged udp dropped at egress (spoofed)"), e, &forged, SHOT);
        check(&mut f, &format!("{fam} udp to X:80 after the forged reply"), e, &udp(me, x, 5000, 80), SHOT);
        // TCP: a forged SYN-ACK, then the pod's SYN and ACK to X:80.
        let forged = tcp(x, me, 80, 5001, TCP_SYN | TCP_ACK);
        check(&mut f, &format!("{fam} forged syn-ack dropped at egress (spoofed)"), e, &forged, SHOT);
        check(&mut f, &format!("{fam} tcp syn to X:80 after the forged reply"), e, &tcp(me, x, 5001, 80, TCP_SYN), SHOT);
        check(&mut f, &format!("{fam} tcp ack to X:80 after the forged reply"), e, &tcp(me, x, 5001, 80, TCP_ACK), SHOT);
        // (Behind anti-spoofing, conntrack itself refuses such hairpin entries as replies: the
        // looped-back case is the next test; a bare SYN is never a reply, below.)
        // A SYN from outside (or spoofed by someone else) through the open ingress: the pod's
        // SYN-ACK is a reply, a bare SYN back is a new connection and denied.
        check(&mut f, &format!("{fam} syn from X:80 in"), i, &tcp(x, me, 80, 5002, TCP_SYN), OK);
        check(&mut f, &format!("{fam} bare syn back to X:80"), e, &tcp(me, x, 5002, 80, TCP_SYN), SHOT);
        check(&mut f, &format!("{fam} syn-ack back to X:80 (a reply)"), e, &tcp(me, x, 5002, 80, TCP_SYN | TCP_ACK), OK);
        // Genuine flows in through the open ingress still get their replies out.
        check(&mut f, &format!("{fam} udp in from Y"), i, &udp(y, me, 5353, 6000), OK);
        check(&mut f, &format!("{fam} udp reply to Y"), e, &udp(me, y, 6000, 5353), OK);
        // The pod talking to itself through its address: both ways pass.
        check(&mut f, &format!("{fam} self out"), e, &udp(me, me, 7000, 7001), OK);
        check(&mut f, &format!("{fam} self in"), i, &udp(me, me, 7000, 7001), OK);
        check(&mut f, &format!("{fam} self reply out"), e, &udp(me, me, 7001, 7000), OK);
        check(&mut f, &format!("{fam} self reply in"), i, &udp(me, me, 7001, 7000), OK);
    }
    // IPv4: an ICMP error about the forged flow does not get out to X either.
    let (me, x) = (v4("10.1.0.10"), v4("10.2.0.5"));
    let forged = udp4(x, me, 80, 5100);
    check(&mut f, "forged udp (for icmp) egress (spoofed)", e, &forged, SHOT);
    check(&mut f, "icmp error to X about the forged flow", e, &icmp4_error(me, x, 3, 3, &forged), SHOT);
    // With the flow cache on, the same (the cache only repeats what the table said).
    f.dp.set_flow_cache(true).unwrap();
    assert!(on_cpu(0));
    let forged = udp4(x, me, 80, 5200);
    check(&mut f, "cache: forged egress (spoofed)", e, &forged, SHOT);
    check(&mut f, "cache: forged egress again (spoofed)", e, &forged, SHOT);
    check(&mut f, "cache: udp to X:80", e, &udp4(me, x, 5200, 80), SHOT);
    check(&mut f, "cache: udp to X:80 again", e, &udp4(me, x, 5200, 80), SHOT);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn a_forged_reply_routed_back_through_nat_does_not_open_the_isolated_egress() {
    let Some(mut f) = fixture(SELF_ONLY_EGRESS) else { return };
    f.dp.set_flow_cache(false).unwrap();
    let (i, e) = (Direction::Ingress, Direction::Egress);
    let (me, x, node) = (v4("10.1.0.10"), v4("10.2.0.5"), v4("10.250.0.1"));
    // What a forged `X:80 -> service IP` becomes after the node's DNAT: egress saw another
    // tuple, but the frame comes back in through the pod's own interface (ifindex 1).
    let looped = |f: &mut Fixture, frame: &[u8]| f.dp.test_run_from(i, frame, 1).unwrap();
    assert_eq!(looped(&mut f, &udp4(x, me, 80, 5300)), OK, "the open ingress passes it");
    assert_eq!(run(&mut f, e, &udp4(me, x, 5300, 80)), SHOT, "no reply vouched for");
    assert_eq!(looped(&mut f, &tcp4(x, me, 80, 5301, TCP_SYN | TCP_ACK)), OK);
    assert_eq!(run(&mut f, e, &tcp4(me, x, 5301, 80, TCP_ACK)), SHOT, "tcp: no reply vouched for");
    // The same frame from another interface is a genuine flow in: its replies pass.
    assert_eq!(f.dp.test_run_from(i, &udp4(x, me, 80, 5302), 7).unwrap(), OK);
    assert_eq!(run(&mut f, e, &udp4(me, x, 5302, 80)), OK, "a reply");
    // The pod reaching itself through its service: without masquerade (its own source), and
    // masqueraded by the node (the node's source): replies pass.
    assert_eq!(looped(&mut f, &udp4(me, me, 5303, 8080)), OK);
    assert_eq!(run(&mut f, e, &udp4(me, me, 8080, 5303)), OK, "self through a service");
    assert_eq!(looped(&mut f, &udp4(node, me, 5304, 8080)), OK);
    assert_eq!(run(&mut f, e, &udp4(me, node, 8080, 5304)), OK, "masqueraded self through a service");
    // With the flow cache on, the same: the slot the looped frame's new entry writes holds
    // that frame's own key, never its replies'.
    f.dp.set_flow_cache(true).unwrap();
    assert!(on_cpu(0));
    assert_eq!(looped(&mut f, &udp4(x, me, 80, 5310)), OK);
    assert_eq!(run(&mut f, e, &udp4(me, x, 5310, 80)), SHOT, "cache on: no reply vouched for");
    assert_eq!(run(&mut f, e, &udp4(me, x, 5310, 80)), SHOT, "cache on: nor the second time");
}

/// A new connection's next packets pass from the flow cache: the SYN-ACK's conntrack hit
/// writes the reply key's slot (the server's data) and the flow's own key's (the handshake's
/// ACK); the bare SYN that creates the entry writes none. A bare SYN is never passed from a
/// slot.
#[test]
fn a_new_connection_is_cached_from_its_syn_ack() {
    let Some(mut f) = fixture(POLICY) else { return };
    assert!(on_cpu(0));
    let (web, srv) = (v4("10.1.0.10"), v4("10.2.0.5"));
    let (i, e) = (Direction::Ingress, Direction::Egress);
    // (Egress to srv:443 is allowed: whether a packet passed from a slot shows in the table,
    // where the policy's allow would have written a new entry.)
    // A SYN without an answer: its entry, no slot.
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 42900, 443, TCP_SYN)), OK, "allowed: an entry");
    assert!(drop_conntrack_entries(&f.pin) >= 1);
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 42900, 443, TCP_ACK)), OK, "allowed by the policy");
    assert_eq!(drop_conntrack_entries(&f.pin), 1, "judged by the policy again: no slot from a bare SYN");
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 43000, 443, TCP_SYN)), OK, "allowed: an entry");
    assert_eq!(run(&mut f, i, &tcp4(srv, web, 443, 43000, TCP_SYN | TCP_ACK)), OK, "its reply");
    assert!(drop_conntrack_entries(&f.pin) >= 1);
    assert_eq!(run(&mut f, e, &tcp4(web, srv, 43000, 443, TCP_ACK)), OK, "the ACK");
    assert_eq!(drop_conntrack_entries(&f.pin), 0, "the ACK passed from the slot the SYN-ACK wrote");
    assert_eq!(run(&mut f, i, &tcp4(srv, web, 443, 43000, TCP_ACK | 0x08)), OK, "data back from the slot the SYN-ACK wrote");
    // Not a bare SYN: the ingress policy (port 80 only) judges one on the same key.
    assert_eq!(run(&mut f, i, &tcp4(srv, web, 443, 43000, TCP_SYN)), SHOT, "a SYN is judged afresh");
    // Voided (new settings): the table no longer has the flow.
    f.dp.set_config(&netpol_common::Config::default()).unwrap();
    assert_eq!(run(&mut f, i, &tcp4(srv, web, 443, 43000, TCP_ACK)), SHOT, "voided, no entry");
}

/// Crafted frames around a new connection whose SYN wrote a flow-cache slot: every one gets
/// the verdict it gets with the cache off (the table alone), and the ones conntrack drops are
/// dropped. The slot holds the SYN's own key (its tuple, endpoint and direction): no reply, no
/// other port or peer, no frame of the same tuple the other way, no bare SYN is passed from
/// it; a refused attempt (an RST|ACK acknowledging the SYN) voids it.
#[test]
fn a_slot_written_at_syn_passes_nothing_the_table_would_drop() {
    let Some(mut f) = fixture(POLICY) else { return };
    assert!(on_cpu(0));
    let (web, srv) = (v4("10.1.0.10"), v4("10.2.0.5"));
    let (i, e) = (Direction::Ingress, Direction::Egress);
    for (cache, sport) in [(false, 44000u16), (true, 44100)] {
        f.dp.set_flow_cache(cache).unwrap();
        let out = |fl: u8, seq: u32, ack: u32| with_seq(tcp4(web, srv, sport, 443, fl), seq, ack);
        let back = |fl: u8, seq: u32, ack: u32| with_seq(tcp4(srv, web, 443, sport, fl), seq, ack);
        let c = if cache { "cache on" } else { "cache off" };
        assert_eq!(run(&mut f, e, &out(TCP_SYN, 5000, 0)), OK, "{c}: the SYN, allowed");
        let cases = [
            ("a bare SYN back on the reply tuple", back(TCP_SYN, 9000, 0)),
            ("a reply to another source port", with_seq(tcp4(srv, web, 443, sport + 1, TCP_ACK), 9001, 5001)),
            ("a reply from another port", with_seq(tcp4(srv, web, 444, sport, TCP_ACK), 9001, 5001)),
            ("a reply from another peer", with_seq(tcp4(v4("10.2.0.6"), web, 443, sport, TCP_ACK), 9001, 5001)),
            ("the SYN's own tuple coming in", with_seq(tcp4(web, srv, sport, 443, TCP_ACK), 5001, 9001)),
            ("a blind RST back", back(TCP_RST, 0x7000_0000, 0)),
        ];
        for (what, frame) in &cases {
            assert_eq!(run(&mut f, i, frame), SHOT, "{c}: {what}");
        }
        // The attempt refused: the entry is gone, and so is what the slot vouched for.
        assert_eq!(run(&mut f, i, &back(TCP_RST | TCP_ACK, 0, 5001)), OK, "{c}: refused");
        assert!(drop_conntrack_entries(&f.pin) == 0, "{c}: the refusal removed the entry");
        assert_eq!(run(&mut f, i, &back(TCP_SYN | TCP_ACK, 9000, 5001)), SHOT, "{c}: no SYN-ACK after the refusal");
        assert_eq!(run(&mut f, i, &back(TCP_ACK, 9001, 5001)), SHOT, "{c}: no reply after the refusal");
        // A connection set up (its SYN-ACK's hit writes the reply key's slot), then reset by
        // the pod: the server's next packet is judged by policy again, and dropped.
        let out = |fl: u8, seq: u32, ack: u32| with_seq(tcp4(web, srv, sport + 50, 443, fl), seq, ack);
        let back = |fl: u8, seq: u32, ack: u32| with_seq(tcp4(srv, web, 443, sport + 50, fl), seq, ack);
        assert_eq!(run(&mut f, e, &out(TCP_SYN, 5000, 0)), OK, "{c}");
        assert_eq!(run(&mut f, i, &back(TCP_SYN | TCP_ACK, 9000, 5001)), OK, "{c}: the SYN-ACK");
        assert_eq!(run(&mut f, i, &back(TCP_ACK, 9001, 5001)), OK, "{c}: the server's data");
        assert_eq!(run(&mut f, e, &out(TCP_RST, 5001, 0)), OK, "{c}: reset by the pod");
        assert_eq!(run(&mut f, i, &back(TCP_ACK, 9002, 5001)), SHOT, "{c}: nothing back after the reset");
    }
}

fn frame(s: IpAddr, d: IpAddr, proto: u8, sp: u16, dp: u16, flags: u8) -> Vec<u8> {
    match (s, d) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, proto, sp, dp, flags, 0),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, proto, sp, dp, flags, &[]),
        _ => unreachable!(),
    }
}

#[test]
fn icmp_errors_pass_only_toward_the_quoted_packets_sender() {
    let Some(mut f) = fixture(POLICY) else { return };
    let web = v4("10.1.0.10");
    let (i, e) = (Direction::Ingress, Direction::Egress);
    // A flow in (UDP 53 from anywhere): the pod may report on it to the client only.
    let q = udp4(v4("192.0.2.7"), web, 5353, 53);
    assert_eq!(run(&mut f, i, &q), OK);
    assert_eq!(run(&mut f, e, &icmp4_error(web, v4("192.0.2.7"), 3, 3, &q)), OK, "to the client");
    assert_eq!(run(&mut f, e, &icmp4_error(web, v4("10.3.3.3"), 3, 3, &q)), SHOT, "quoting the flow, to a denied address");
    assert_eq!(run(&mut f, e, &icmp4_error(v4("10.1.0.99"), v4("192.0.2.7"), 3, 3, &q)), SHOT, "from another source");
    // A flow out: errors from any router reach the pod, addressed to the pod only.
    let syn = tcp4(web, v4("10.2.0.5"), 41000, 443, TCP_SYN);
    assert_eq!(run(&mut f, e, &syn), OK);
    assert_eq!(run(&mut f, i, &icmp4_error(v4("10.77.0.1"), web, 3, 4, &syn)), OK, "from a router on the path");
    assert_eq!(run(&mut f, i, &icmp4_error(v4("10.77.0.1"), v4("10.1.0.11"), 3, 4, &syn)), SHOT, "to another address");
    // Fragmentation needed about the pod's reply of a flow that came in.
    let reply = udp4(web, v4("192.0.2.7"), 53, 5353);
    assert_eq!(run(&mut f, i, &icmp4_error(v4("10.77.0.1"), web, 3, 4, &reply)), OK, "about a reply packet");
    // IPv6: a connection in from fd00::/64 on 8080.
    let (peer, me) = (v6("fd00::7"), v6("fd00::10"));
    let syn = ipv6(peer, me, 6, 40000, 8080, TCP_SYN, &[]);
    assert_eq!(run(&mut f, i, &syn), OK);
    assert_eq!(run(&mut f, e, &icmp6_error(me, peer, 1, 4, &syn)), OK, "v6: back to the client");
    assert_eq!(run(&mut f, e, &icmp6_error(me, v6("2001:db8::66"), 1, 4, &syn)), SHOT, "v6: quoting the flow, to a denied address");
    let back = ipv6(me, peer, 6, 8080, 40000, TCP_SYN | TCP_ACK, &[]);
    assert_eq!(
        run(&mut f, i, &icmp6_error(v6("2001:db8::1"), me, 2, 0, &back)),
        OK,
        "v6: packet too big for the pod's reply, from a router"
    );
    assert_eq!(run(&mut f, i, &icmp6_error(v6("2001:db8::1"), v6("fd00::11"), 2, 0, &back)), SHOT, "v6: to another address");
}

#[test]
fn only_an_in_window_reset_ends_a_tracked_flow() {
    let Some(mut f) = fixture(POLICY) else { return };
    // The table decides every packet (a flow cache slot would hide whether the entry is gone).
    f.dp.set_flow_cache(false).unwrap();
    let (i, e) = (Direction::Ingress, Direction::Egress);
    let web = v4("10.1.0.10");
    let srv = v4("10.2.0.5");
    let out = |fl: u8, seq: u32, ack: u32| with_seq(tcp4(web, srv, 41000, 443, fl), seq, ack);
    let back = |fl: u8, seq: u32, ack: u32| with_seq(tcp4(srv, web, 443, 41000, fl), seq, ack);
    assert_eq!(run(&mut f, e, &out(TCP_SYN, 1000, 0)), OK);
    assert_eq!(run(&mut f, i, &back(TCP_SYN | TCP_ACK, 0x8000_0000, 1001)), OK);
    assert_eq!(run(&mut f, e, &out(TCP_ACK, 1001, 0x8000_0001)), OK);
    // Blind resets from the server's side: far ahead, behind.
    for seq in [0x8000_0001u32.wrapping_add(1 << 24), 0x8000_0001 - (1 << 20), 0x1234_5678] {
        assert_eq!(run(&mut f, i, &back(TCP_RST, seq, 0)), SHOT, "out-of-window RST seq {seq:#x}");
    }
    assert_eq!(run(&mut f, i, &back(TCP_ACK, 0x8000_0001, 1001)), OK, "the flow survives");
    // ... and from the pod's side.
    assert_eq!(run(&mut f, e, &out(TCP_RST, 1001 + (1 << 21), 0)), SHOT);
    assert_eq!(run(&mut f, i, &back(TCP_ACK, 0x8000_0001, 1001)), OK, "the flow survives");
    let c = CounterReader::open(&f.pin).unwrap();
    assert!(c.read(0, 0, 1) >= 3 && c.read(0, 1, 1) >= 1, "counted as deny");
    let rst = netpol_common::DROP_TCP_RST;
    assert_eq!((c.read_outcome(0, 0, rst).packets, c.read_outcome(0, 1, rst).packets), (3, 1), "with their reason");
    // In the window (after some data): honoured.
    assert_eq!(run(&mut f, i, &back(TCP_ACK, 0x8000_0001 + 5000, 1001)), OK);
    assert_eq!(run(&mut f, i, &back(TCP_RST, 0x8000_0001 + 6000, 0)), OK);
    assert_eq!(run(&mut f, i, &back(TCP_ACK, 0x8000_0001 + 6000, 1001)), SHOT, "flow torn down by RST");
    // RST|ACK answering a SYN (connection refused) ends the attempt.
    assert_eq!(run(&mut f, e, &with_seq(tcp4(web, srv, 41001, 443, TCP_SYN), 7000, 0)), OK);
    assert_eq!(run(&mut f, i, &with_seq(tcp4(srv, web, 443, 41001, TCP_RST | TCP_ACK), 0, 9999)), SHOT, "not acknowledging the SYN");
    assert_eq!(run(&mut f, i, &with_seq(tcp4(srv, web, 443, 41001, TCP_RST | TCP_ACK), 0, 7001)), OK);
    assert_eq!(run(&mut f, i, &with_seq(tcp4(srv, web, 443, 41001, TCP_SYN | TCP_ACK), 0, 7001)), SHOT, "attempt ended");
    // IPv6, a connection in from fd00::/64 on 8080; the pod's packets go back out through the
    // isolated egress as replies only while the flow is tracked.
    let (peer, me) = (v6("fd00::7"), v6("fd00::10"));
    let inb = |fl: u8, seq: u32, ack: u32| with_seq(ipv6(peer, me, 6, 40000, 8080, fl, &[]), seq, ack);
    let outb = |fl: u8, seq: u32, ack: u32| with_seq(ipv6(me, peer, 6, 8080, 40000, fl, &[]), seq, ack);
    assert_eq!(run(&mut f, i, &inb(TCP_SYN, 100, 0)), OK);
    assert_eq!(run(&mut f, e, &outb(TCP_SYN | TCP_ACK, 900, 101)), OK);
    assert_eq!(run(&mut f, i, &inb(TCP_ACK, 101, 901)), OK);
    assert_eq!(run(&mut f, i, &inb(TCP_RST, 101 + (1 << 22), 0)), SHOT, "v6 blind RST");
    assert_eq!(run(&mut f, e, &outb(TCP_ACK, 901, 101)), OK, "v6 flow survives");
    assert_eq!(run(&mut f, i, &inb(TCP_RST, 101, 0)), OK, "v6 exact RST");
    assert_eq!(run(&mut f, e, &outb(TCP_ACK, 901, 101)), SHOT, "v6 flow torn down");
}

/// `bpf(2)` with an attribute block of 128 bytes.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) }
}

#[test]
fn tracked_flows_of_the_older_conntrack_layout_are_migrated_at_load() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root");
        return;
    }
    use netpol_common::{maps, CtKey, CtValue, CtValueV1};
    let pin = PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-migrate", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin);
    std::fs::create_dir_all(&pin).unwrap();
    // What a daemon of the previous layout left pinned: CONNTRACK with 16-byte values, holding
    // the pod's connection out to 10.2.0.5:443.
    let web = v4("10.1.0.10");
    let srv = v4("10.2.0.5");
    let mut key = CtKey { endpoint: 0, dir: 1, proto: 6, family: 4, ..Default::default() };
    key.src[..4].copy_from_slice(&web.octets());
    key.dst[..4].copy_from_slice(&srv.octets());
    key.sport = 41000;
    key.dport = 443;
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    let old = CtValueV1 { last_seen_ns: now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64, flags: 0, policy: u32::MAX };
    let mut a = [0u64; 16];
    // BPF_MAP_CREATE: BPF_MAP_TYPE_LRU_HASH (9), key 44, value 16, 1024 entries.
    a[0] = 9 | (44u64 << 32);
    a[1] = 16 | (1024u64 << 32);
    let fd = bpf(0, &mut a);
    assert!(fd >= 0, "creating the old map: {}", std::io::Error::last_os_error());
    let mut a = [0u64; 16];
    a[0] = fd as u64;
    a[1] = &key as *const CtKey as u64;
    a[2] = &old as *const CtValueV1 as u64;
    assert_eq!(bpf(2, &mut a), 0, "BPF_MAP_UPDATE_ELEM: {}", std::io::Error::last_os_error());
    let path = std::ffi::CString::new(pin.join(maps::CONNTRACK_V1).to_str().unwrap()).unwrap();
    let mut a = [0u64; 16];
    a[0] = path.as_ptr() as u64;
    a[1] = fd as u64;
    assert_eq!(bpf(6, &mut a), 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    unsafe { libc::close(fd as i32) };

    let mut f = fixture_at(pin.clone(), POLICY, false);
    assert!(!pin.join(maps::CONNTRACK_V1).exists(), "the old pin is gone");
    {
        use aya::maps::{HashMap, Map, MapData};
        let md = MapData::from_pin(pin.join(maps::CONNTRACK)).unwrap();
        let ct: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(Map::from_map_data(md).unwrap()).unwrap();
        let v = ct.get(&key, 0).expect("migrated entry");
        assert_eq!((v.last_seen_ns, v.policy), (old.last_seen_ns, old.policy));
    }
    // The migrated flow carries on: the server's packets come in through the isolated ingress.
    f.dp.set_flow_cache(false).unwrap();
    assert_eq!(run(&mut f, Direction::Ingress, &tcp4(srv, web, 443, 41000, TCP_ACK)), OK, "the migrated flow's reply");
    assert_eq!(run(&mut f, Direction::Ingress, &tcp4(srv, web, 443, 41001, TCP_ACK)), SHOT, "an untracked one");
}

#[test]
fn policy_entries_of_the_older_map_are_copied_at_load_and_it_is_never_written_again() {
    if unsafe { libc::geteuid() } != 0 {
        let msg = "datapath tests need root (BPF_PROG_TEST_RUN)";
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return;
    }
    use aya::maps::{HashMap, Map, MapData};
    use netpol_common::{maps, PolicyKey, PolicyValue, POLICY_ALLOW_ALL};
    let pin = PathBuf::from(format!("/sys/fs/bpf/netpol-test-{}-policy-v1", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin);
    std::fs::create_dir_all(&pin).unwrap();
    // What an older daemon left pinned: POLICY (hash, 12-byte keys, 8-byte values) with one
    // entry: endpoint 7 lets everything in.
    let key = PolicyKey { endpoint: 7, identity: 0, dir: 0, _pad: [0; 3] };
    let old = PolicyValue { portset: 0, flags: POLICY_ALLOW_ALL };
    let mut a = [0u64; 16];
    // BPF_MAP_CREATE: BPF_MAP_TYPE_HASH (1), key 12, value 8, 1024 entries.
    a[0] = 1 | (12u64 << 32);
    a[1] = 8 | (1024u64 << 32);
    let fd = bpf(0, &mut a);
    assert!(fd >= 0, "creating the old map: {}", std::io::Error::last_os_error());
    let mut a = [0u64; 16];
    a[0] = fd as u64;
    a[1] = &key as *const PolicyKey as u64;
    a[2] = &old as *const PolicyValue as u64;
    assert_eq!(bpf(2, &mut a), 0, "BPF_MAP_UPDATE_ELEM: {}", std::io::Error::last_os_error());
    let path = std::ffi::CString::new(pin.join(maps::POLICY_V1).to_str().unwrap()).unwrap();
    let mut a = [0u64; 16];
    a[0] = path.as_ptr() as u64;
    a[1] = fd as u64;
    assert_eq!(bpf(6, &mut a), 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // (The fd stays open: the old programs' hold on the map, read after the sync below.)
    let old_map = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };

    let read = |md: MapData| -> Vec<(PolicyKey, PolicyValue)> {
        let m: HashMap<MapData, PolicyKey, PolicyValue> = HashMap::try_from(Map::HashMap(md)).unwrap();
        m.iter().map(Result::unwrap).collect()
    };
    // Loaded: the entry is in the new map, the old pin gone.
    let dp = Datapath::load_detached_with(&pin, false).expect("loading the programs");
    assert!(!pin.join(maps::POLICY_V1).exists(), "the old pin is gone");
    assert_eq!(read(MapData::from_pin(pin.join(maps::POLICY)).unwrap()), vec![(key, old)], "copied");
    drop(dp);
    // A sync (after a restart over the same pins) writes the new map only: one-port entries
    // (egress to 10.2/16: TCP 443), endpoint 7 (no pod of this sync) gone; the old map, which the
    // programs of the older daemon still read, stays as it was.
    let f = fixture_at(pin.clone(), POLICY, false);
    let new = read(MapData::from_pin(pin.join(maps::POLICY)).unwrap());
    assert!(new.iter().any(|(k, v)| k.dir == 1 && v.one_port() == Some((6, 443, 0))), "{new:?}");
    assert!(!new.iter().any(|(k, _)| k.endpoint == 7), "{new:?}");
    assert_eq!(read(MapData::from_fd(old_map).unwrap()), vec![(key, old)], "the old map is never written");
    drop(f);
}

/// Neighbour discovery passes unchecked only as the link uses it (RFC 4861): hop limit 255, no
/// bytes past its options, on-link addresses; anything else of its types is ICMPv6 under policy.
#[test]
fn neighbour_discovery_passes_only_as_the_link_uses_it() {
    let Some(mut f) = fixture(POLICY) else { return };
    f.dp.set_node_addrs(&["10.250.0.1".parse().unwrap(), "fd00::1".parse().unwrap()]).unwrap();
    let (i, e) = (Direction::Ingress, Direction::Egress);
    let (ll, me, node, mcast) = (v6("fe80::10"), v6("fd00::10"), v6("fd00::1"), v6("ff02::1:ff00:1"));
    let sll = nd_lladdr_option(1);
    let tll = nd_lladdr_option(2);
    let mut redirected = vec![4u8, 6, 0, 0, 0, 0, 0, 0];
    redirected.extend_from_slice(&[0x60; 40]);
    let cases: Vec<(&str, Direction, Vec<u8>, i32)> = vec![
        ("NS from link-local to solicited-node multicast", e, nd6(ll, mcast, 135, 0, 255, &sll, &[]), OK),
        ("NS from the pod's global address (Linux solicits with the trigger's source)", e, nd6(me, mcast, 135, 0, 255, &sll, &[]), OK),
        ("DAD NS from ::", e, nd6(Ipv6Addr::UNSPECIFIED, mcast, 135, 0, 255, &[], &[]), OK),
        ("NUD NS to the node's (gateway's) own address", e, nd6(me, node, 135, 0, 255, &sll, &[]), OK),
        ("NA to a link-local address", e, nd6(me, v6("fe80::1"), 136, 0, 255, &tll, &[]), OK),
        ("RS to all-routers", e, nd6(ll, v6("ff02::2"), 133, 0, 255, &sll, &[]), OK),
        ("NS to a global address off the link", e, nd6(me, v6("2001:db8::1"), 135, 0, 255, &sll, &[]), SHOT),
        ("NA to another pod's global address (routed by the node)", e, nd6(me, v6("fd00::20"), 136, 0, 255, &tll, &[]), SHOT),
        ("NS to global multicast ff0e::", e, nd6(ll, v6("ff0e::1"), 135, 0, 255, &sll, &[]), SHOT),
        ("NS with hop limit 254", e, nd6(ll, mcast, 135, 0, 254, &sll, &[]), SHOT),
        ("NS with code 1", e, nd6(ll, mcast, 135, 1, 255, &sll, &[]), SHOT),
        (
            "NS carrying 200 bytes of payload as an option",
            e,
            nd6(ll, mcast, 135, 0, 255, &[&[1u8, 26][..], &[0x41; 206]].concat(), &[]),
            SHOT,
        ),
        ("NS with bytes past its IPv6 payload length", e, nd6(ll, mcast, 135, 0, 255, &sll, &[0x41; 64]), SHOT),
        ("NS with a zero-length option", e, nd6(ll, mcast, 135, 0, 255, &[1, 0, 0, 0, 0, 0, 0, 0], &[]), SHOT),
        ("NS whose option runs past the message", e, nd6(ll, mcast, 135, 0, 255, &[1, 2, 0, 0, 0, 0, 0, 0], &[]), SHOT),
        ("NA from :: (only NS and RS may)", e, nd6(Ipv6Addr::UNSPECIFIED, mcast, 136, 0, 255, &tll, &[]), SHOT),
        ("NS from a multicast source", e, nd6(v6("ff02::1"), mcast, 135, 0, 255, &sll, &[]), SHOT),
        ("redirect quoting a packet", e, nd6(ll, v6("fe80::1"), 137, 0, 255, &[&tll[..], &redirected[..]].concat(), &[]), SHOT),
        ("redirect with a target link-layer address, in", i, nd6(ll, v6("fe80::1"), 137, 0, 255, &tll, &[]), OK),
        // A pod is no router: a redirect from its link-local address is not neighbour
        // discovery it needs, and anti-spoofing drops it.
        ("redirect with a target link-layer address, out", e, nd6(ll, v6("fe80::1"), 137, 0, 255, &tll, &[]), SHOT),
        ("RA from a link-local address to all-nodes", i, nd6(v6("fe80::1"), v6("ff02::1"), 134, 0, 255, &sll, &[]), OK),
        ("NA from the link to the pod's global address", i, nd6(v6("fd00::99"), me, 136, 0, 255, &tll, &[]), OK),
        ("NS into the pod that crossed a router", i, nd6(v6("fd00::99"), me, 135, 0, 254, &sll, &[]), SHOT),
        ("NA into the pod with trailing bytes", i, nd6(v6("fe80::1"), me, 136, 0, 255, &tll, &[0x41; 8]), SHOT),
    ];
    run_cases(&mut f, &cases);
    // Every ND frame has a verdict and is counted.
    let c = CounterReader::open(&f.pin).unwrap();
    let (ig, eg) = (netpol_common::DIR_INGRESS, netpol_common::DIR_EGRESS);
    let spoofed = c.read(0, eg, netpol_common::VERDICT_SPOOFED);
    assert_eq!(c.read(0, eg, 0) + c.read(0, eg, 1) + spoofed, 19, "every egress frame counted");
    assert_eq!(c.read(0, ig, 1), 2, "ingress denies counted");

    // An all-traffic rule lets the rest through like any ICMPv6; without isolation it passes.
    let all = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: t}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: '2001:db8::/32'}}]}]}\n";
    let Some(mut f) = fixture(all) else { return };
    assert_eq!(run(&mut f, e, &nd6(me, v6("2001:db8::1"), 135, 0, 255, &sll, &[])), OK, "an all-traffic rule to the peer");
    assert_eq!(run(&mut f, e, &nd6(me, v6("2001:db9::1"), 135, 0, 255, &sll, &[])), SHOT);
    assert_eq!(run(&mut f, i, &nd6(v6("fd00::99"), me, 135, 0, 64, &sll, &[0x41; 100])), OK, "ingress is not isolated");
}

/// Frames that are not plain IPv4/IPv6/ARP (VLAN tags, other ethertypes) are denied where the
/// direction is isolated: the kernel would untag a double-tagged VID 0 frame and route its
/// inner packet, which this program never judged. ARP always passes; nothing is blocked for a
/// pod without policies.
#[test]
fn vlan_tagged_and_other_frames_are_denied_where_isolated() {
    let Some(mut f) = fixture(POLICY) else { return };
    let web = v4("10.1.0.10");
    let (i, e) = (Direction::Ingress, Direction::Egress);
    let dns_in = udp4(v4("192.0.2.1"), web, 5353, 53);
    let https_out = tcp4(web, v4("10.2.3.4"), 40001, 443, TCP_SYN);
    let lldp = ethertype_frame(0x88cc, 46);
    let cases: Vec<(&str, Direction, Vec<u8>, i32)> = vec![
        ("untagged allowed udp 53", i, dns_in.clone(), OK),
        ("802.1ad + 802.1Q, VID 0, allowed udp 53 inside", i, vlan_tagged(&dns_in, &[(0x88a8, 0), (0x8100, 0)]), SHOT),
        ("802.1Q VID 0 (priority tag), allowed tcp 443 inside", e, vlan_tagged(&https_out, &[(0x8100, 0)]), SHOT),
        ("802.1Q VID 5", e, vlan_tagged(&https_out, &[(0x8100, 5)]), SHOT),
        ("802.1ad + 802.1Q, egress", e, vlan_tagged(&https_out, &[(0x88a8, 0), (0x8100, 0)]), SHOT),
        ("LLDP", e, lldp.clone(), SHOT),
        ("802.3 length frame", i, ethertype_frame(0x0040, 64), SHOT),
        ("ARP in", i, arp(), OK),
        ("ARP out", e, arp(), OK),
    ];
    run_cases(&mut f, &cases);
    let c = CounterReader::open(&f.pin).unwrap();
    let (ig, eg) = (netpol_common::DIR_INGRESS, netpol_common::DIR_EGRESS);
    assert_eq!((c.read(0, ig, 0), c.read(0, ig, 1)), (2, 2), "ingress: udp 53 + ARP allowed, two denied");
    assert_eq!((c.read(0, eg, 0), c.read(0, eg, 1)), (1, 4), "egress: ARP allowed, four denied");

    let Some(mut f) = fixture("") else { return };
    for dir in [i, e] {
        assert_eq!(run(&mut f, dir, &vlan_tagged(&dns_in, &[(0x88a8, 0), (0x8100, 0)])), OK, "not isolated: passes");
        assert_eq!(run(&mut f, dir, &lldp), OK, "not isolated: passes");
    }
    let c = CounterReader::open(&f.pin).unwrap();
    assert_eq!(c.read(0, ig, 0), 2, "passes are counted");
}

fn frag_early(pin: &Path, dir: u8) -> u64 {
    use aya::maps::{Map, MapData, PerCpuArray};
    let md = MapData::from_pin(pin.join(netpol_common::maps::FRAG_EARLY)).expect("pinned FRAG_EARLY");
    let a: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::from_map_data(md).unwrap()).unwrap();
    a.get(&(dir as u32), 0).unwrap().iter().sum()
}

/// Later fragments follow the recorded verdict of their datagram's first fragment; one that
/// arrives before its first fragment is dropped where a port rule would have to decide, and
/// counted apart.
#[test]
fn fragments_follow_their_first_fragments_verdict_and_early_ones_are_counted() {
    let Some(mut f) = fixture(POLICY) else { return };
    let web = v4("10.1.0.10");
    let src = v4("192.0.2.1");
    let i = Direction::Ingress;
    let ig = netpol_common::DIR_INGRESS;
    // Reordered: the last fragment of an allowed UDP 53 datagram arrives first.
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 0, 0, 200, 185, false)), SHOT, "first fragment not seen yet");
    assert_eq!(frag_early(&f.pin, ig), 1, "counted as an early fragment");
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 5353, 53, 200, 0, true)), OK);
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 0, 0, 200, 185, false)), OK, "after its first fragment");
    // An identification re-used: a denied datagram's fragments do not ride on the record an
    // earlier allowed datagram left.
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 5353, 53, 201, 0, true)), OK);
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 0, 0, 201, 185, false)), OK);
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 5353, 54, 201, 0, true)), SHOT, "denied first fragment, same id");
    assert_eq!(run(&mut f, i, &ipv4_frag(src, web, 17, 0, 0, 201, 185, false)), SHOT, "its later fragment");
    assert_eq!(frag_early(&f.pin, ig), 1, "a fragment of a denied datagram is no early fragment");
    // IPv6: the same, and a later fragment's payload is never walked as headers (its fragment
    // header names the first header of the fragmentable part, here destination options).
    let (p6, me6) = (v6("2001:db8::7"), v6("fd00::10"));
    assert_eq!(run(&mut f, i, &ipv6_frag(p6, me6, 60, 17, 0, 0, 7000, 100, false)), SHOT, "IPv6 early fragment");
    assert_eq!(frag_early(&f.pin, ig), 2);
    assert_eq!(run(&mut f, i, &ipv6_frag(p6, me6, 17, 17, 5353, 53, 7000, 0, true)), OK, "IPv6 first fragment, udp 53");
    assert_eq!(run(&mut f, i, &ipv6_frag(p6, me6, 17, 17, 0, 0, 7000, 3, true)), OK, "IPv6 middle fragment");
    assert_eq!(run(&mut f, i, &ipv6_frag(p6, me6, 60, 17, 0, 0, 7000, 100, false)), OK, "IPv6 last fragment, dest opts first");
    assert_eq!(run(&mut f, i, &ipv6_frag(p6, me6, 17, 17, 5353, 54, 7001, 0, true)), SHOT);
    assert_eq!(run(&mut f, i, &ipv6_frag(p6, me6, 17, 17, 0, 0, 7001, 3, false)), SHOT);
    assert_eq!(frag_early(&f.pin, ig), 2);
    // An all-traffic rule for the peer decides without the first fragment.
    let Some(mut f) = fixture("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: t}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}]}]}\n") else { return };
    assert_eq!(run(&mut f, i, &ipv4_frag(v4("10.3.0.1"), web, 17, 0, 0, 300, 185, false)), OK, "all traffic from 10/8");
    assert_eq!(run(&mut f, i, &ipv4_frag(v4("11.3.0.1"), web, 17, 0, 0, 300, 185, false)), SHOT);
    assert_eq!(frag_early(&f.pin, ig), 1);
}

/// Up to 8 IPv6 extension headers are walked to the upper-layer header; a packet with more
/// is unparseable: denied where the direction is isolated, even under an all-traffic rule.
#[test]
fn ipv6_extension_headers_up_to_the_limit_pass_and_more_are_denied() {
    let Some(mut f) = fixture(POLICY) else { return };
    let (peer, me) = (v6("fd00::1"), v6("fd00::10"));
    let i = Direction::Ingress;
    let exts = |n: usize| vec![60u8; n];
    for n in [5, 6, 7, 8] {
        assert_eq!(run(&mut f, i, &ipv6(peer, me, 6, 40000 + n as u16, 8500, TCP_SYN, &exts(n))), OK, "{n} extension headers");
    }
    assert_eq!(
        run(&mut f, i, &ipv6(peer, me, 6, 40000, 8500, TCP_SYN, &[0, 60, 43, 44, 60, 60, 60, 60])),
        OK,
        "8 mixed, with a fragment header"
    );
    assert_eq!(run(&mut f, i, &ipv6(peer, me, 6, 40009, 8500, TCP_SYN, &exts(9))), SHOT, "9 extension headers");
    let all = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: t}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 'fd00::/64'}}]}]}\n";
    let Some(mut f) = fixture(all) else { return };
    assert_eq!(run(&mut f, i, &ipv6(peer, me, 6, 40000, 8500, TCP_SYN, &exts(8))), OK);
    assert_eq!(run(&mut f, i, &ipv6(peer, me, 6, 40000, 8500, TCP_SYN, &exts(9))), SHOT, "9: unparseable, not a portless packet");
    assert_eq!(run(&mut f, i, &ipv6(peer, me, 17, 40000, 53, 0, &exts(12))), SHOT);
    let Some(mut f) = fixture("") else { return };
    assert_eq!(run(&mut f, i, &ipv6(peer, me, 6, 40000, 8500, TCP_SYN, &exts(9))), OK, "not isolated: passes");
}

/// Egress frames of t/web (10.1.0.10, fd00::10) with the spoofed counter they should move.
fn spoofed(f: &Fixture) -> u64 {
    let c = CounterReader::open(&f.pin).unwrap();
    c.read(0, netpol_common::DIR_EGRESS, netpol_common::VERDICT_SPOOFED)
}

#[test]
fn a_pod_sends_only_from_its_own_addresses() {
    // Not isolated (no policy) and isolated: anti-spoofing holds either way.
    for yaml in ["", POLICY] {
        let Some(mut f) = fixture(yaml) else { return };
        let e = Direction::Egress;
        let web = v4("10.1.0.10");
        let dst = v4("10.2.3.4");
        let mut bad = Vec::new();
        let cases: Vec<(&str, Vec<u8>, i32, bool)> = vec![
            ("own ipv4", tcp4(web, dst, 40001, 443, TCP_SYN), OK, false),
            ("another pod's ipv4", tcp4(v4("10.1.0.11"), dst, 40001, 443, TCP_SYN), SHOT, true),
            ("the node's ipv4", udp4(v4("10.250.0.1"), dst, 40001, 443), SHOT, true),
            ("0.0.0.0", udp4(v4("0.0.0.0"), dst, 68, 67), SHOT, true),
            ("another pod's ipv4, icmp", ipv4(v4("10.1.0.11"), dst, 1, 7, 0, 8, 0), SHOT, true),
            ("another pod's ipv4, later fragment", ipv4(v4("10.1.0.11"), dst, 6, 0, 0, 0, 100), SHOT, true),
            ("own ipv6", ipv6(v6("fd00::10"), v6("fd00::20"), 17, 5353, 53, 0, &[]), if yaml.is_empty() { OK } else { SHOT }, false),
            ("another pod's ipv6", ipv6(v6("fd00::11"), v6("fd00::20"), 17, 5353, 53, 0, &[]), SHOT, true),
            ("link-local ipv6, udp", ipv6(v6("fe80::1"), v6("fd00::20"), 17, 5353, 53, 0, &[]), SHOT, true),
            ("link-local ipv6, echo", ipv6(v6("fe80::1"), v6("ff02::1"), 58, 9, 0, 128, &[]), SHOT, true),
            ("link-local ipv6, redirect (137)", ipv6(v6("fe80::1"), v6("ff02::1"), 58, 0, 0, 137, &[]), SHOT, true),
            ("link-local neighbour solicitation", nd6(v6("fe80::1"), v6("ff02::1:ff00:10"), 135, 0, 255, &[], &[]), OK, false),
            ("link-local router solicitation", nd6(v6("fe80::1"), v6("ff02::2"), 133, 0, 255, &[], &[]), OK, false),
            ("unspecified source, DAD solicitation", nd6(v6("::"), v6("ff02::1:ff00:10"), 135, 0, 255, &[], &[]), OK, false),
            ("unspecified source, udp", ipv6(v6("::"), v6("fd00::20"), 17, 5353, 53, 0, &[]), SHOT, true),
            // MLDv2 reports (every IPv6 stack sends them as a link comes up): not spoofed on
            // the link; policy judges them as ICMPv6 (the policy has no all-traffic egress).
            (
                "link-local MLDv2 report",
                ipv6(v6("fe80::1"), v6("ff02::16"), 58, 0, 0, 143, &[]),
                if yaml.is_empty() { OK } else { SHOT },
                false,
            ),
            (
                "unspecified source, MLDv2 report",
                ipv6(v6("::"), v6("ff02::16"), 58, 0, 0, 143, &[]),
                if yaml.is_empty() { OK } else { SHOT },
                false,
            ),
            ("link-local MLD report off the link", ipv6(v6("fe80::1"), v6("fd00::20"), 58, 0, 0, 143, &[]), SHOT, true),
            ("arp", arp(), OK, false),
        ];
        for (what, frame, want, counted) in &cases {
            let before = spoofed(&f);
            let got = run(&mut f, e, frame);
            let rose = spoofed(&f) - before;
            if got != *want || rose != *counted as u64 {
                bad.push(format!("{what} (policy: {}): want {want}, got {got}; spoofed counter +{rose}", !yaml.is_empty()));
            }
        }
        // Ingress is not checked for the pod's addresses (that is the peer's source).
        assert_eq!(run(&mut f, Direction::Ingress, &udp4(v4("10.1.0.11"), web, 5353, 53)), OK);
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }
}

#[test]
fn the_flow_cache_never_passes_a_spoofed_source() {
    let Some(mut f) = fixture("") else { return };
    // An established flow of web's, through conntrack and into the flow cache.
    let web = v4("10.1.0.10");
    let peer = v4("10.2.3.4");
    assert_eq!(run(&mut f, Direction::Egress, &udp4(web, peer, 40000, 53)), OK);
    for _ in 0..3 {
        assert_eq!(run(&mut f, Direction::Egress, &udp4(web, peer, 40000, 53)), OK);
    }
    // The same flow's tuple with another source is not the pod's to send.
    let before = spoofed(&f);
    assert_eq!(run(&mut f, Direction::Egress, &udp4(v4("10.1.0.11"), peer, 40000, 53)), SHOT);
    assert_eq!(spoofed(&f), before + 1);
}

#[test]
fn a_pod_address_change_moves_what_it_may_send_from() {
    let Some(mut f) = fixture("") else { return };
    let mut loaded = Loaded::default();
    let pod = POD.replace("10.1.0.10", "10.1.0.99");
    load_text(Path::new("t.yaml"), &pod, &mut loaded);
    let node = compile_node(&loaded.cluster, "n");
    let ifaces: BTreeMap<ObjKey, Iface> = [(ObjKey::new("t", "web"), Iface { ifindex: 1, ifname: "lo".into() })].into();
    assert!(f.dp.sync(&node, &ifaces).errors.is_empty());
    assert_eq!(run(&mut f, Direction::Egress, &udp4(v4("10.1.0.99"), v4("10.2.3.4"), 1, 53)), OK);
    assert_eq!(run(&mut f, Direction::Egress, &udp4(v4("10.1.0.10"), v4("10.2.3.4"), 1, 53)), SHOT);
    assert_eq!(run(&mut f, Direction::Egress, &udp4(v4("10.1.0.99"), v4("10.2.3.4"), 1, 53)), OK);
}

#[test]
fn node_addresses_let_into_pods_are_never_loopback_or_link_local() {
    let Some(mut f) = fixture(POLICY) else { return };
    let web = v4("10.1.0.10");
    f.dp.set_node_addrs(&[
        "10.250.0.1".parse().unwrap(),
        "127.0.0.1".parse().unwrap(),
        "169.254.1.1".parse().unwrap(),
        "::1".parse().unwrap(),
        "fe80::1".parse().unwrap(),
        "fd00:250::1".parse().unwrap(),
    ])
    .unwrap();
    let i = Direction::Ingress;
    assert_eq!(run(&mut f, i, &tcp4(v4("10.250.0.1"), web, 40000, 9999, TCP_SYN)), OK, "the node's address");
    assert_eq!(run(&mut f, i, &tcp4(v4("127.0.0.1"), web, 40000, 9999, TCP_SYN)), SHOT, "loopback");
    assert_eq!(run(&mut f, i, &tcp4(v4("169.254.1.1"), web, 40000, 9999, TCP_SYN)), SHOT, "169.254/16");
    assert_eq!(run(&mut f, i, &ipv6(v6("::1"), v6("fd00::10"), 6, 40000, 9999, TCP_SYN, &[])), SHOT, "::1");
    assert_eq!(run(&mut f, i, &ipv6(v6("fe80::1"), v6("fd00::10"), 6, 40000, 9999, TCP_SYN, &[])), SHOT, "fe80::");
    assert_eq!(run(&mut f, i, &ipv6(v6("fd00:250::1"), v6("fd00::10"), 6, 40000, 9999, TCP_SYN, &[])), OK, "the node's ipv6");
    assert!(!netpol_daemon::datapath::node_addr_for_pods("127.3.0.1".parse().unwrap()));
    assert!(!netpol_daemon::datapath::node_addr_for_pods("fe80::1:2".parse().unwrap()));
}

#[test]
fn pinned_maps_of_an_older_layout_are_replaced() {
    if unsafe { libc::geteuid() } != 0 || std::process::Command::new("bpftool").arg("version").output().is_err() {
        eprintln!("SKIPPED: needs root and bpftool");
        return;
    }
    let pin = PathBuf::from(format!("/sys/fs/bpf/netpol-test-old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin);
    std::fs::create_dir_all(&pin).unwrap();
    // What a version before anti-spoofing pinned: 8-byte endpoint entries, 6 counters each.
    let ok = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(pin.join("ENDPOINTS_ARRAY"))
        .args(["type", "array", "key", "4", "value", "8", "entries", "65536", "name", "ENDPOINTS_ARRAY"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "bpftool map create");
    let dp = Datapath::load_detached(&pin);
    let _ = std::fs::remove_dir_all(&pin);
    assert!(dp.is_ok(), "{:#}", dp.err().unwrap());
}

/// Every drop is counted under its reason, with its bytes (the frame's length), and the
/// verdict counters are their sums: what `netpol_dropped_*_total{reason}` and
/// `netpol_bytes_total` export.
#[test]
fn drops_are_counted_per_reason_with_their_bytes() {
    use netpol_common::*;
    let Some(mut f) = fixture(POLICY) else { return };
    let web = v4("10.1.0.10");
    let (i, e) = (Direction::Ingress, Direction::Egress);
    let (ig, eg) = (DIR_INGRESS, DIR_EGRESS);
    let allowed = udp4(v4("192.0.2.1"), web, 5353, 53);
    let denied = udp4(v4("192.0.2.1"), web, 5353, 54);
    let spoofed = tcp4(v4("10.1.0.99"), v4("10.2.0.1"), 40000, 443, TCP_SYN);
    let lldp = ethertype_frame(0x88cc, 46);
    // An IPv4 header length below 20 bytes.
    let mut truncated = allowed.clone();
    truncated[14] = 0x44;
    let cases: Vec<(&str, Direction, Vec<u8>, i32)> = vec![
        ("allowed udp 53", i, allowed.clone(), OK),
        ("denied udp 54", i, denied.clone(), SHOT),
        ("denied udp 54 again", i, denied.clone(), SHOT),
        ("spoofed source", e, spoofed.clone(), SHOT),
        ("LLDP out", e, lldp.clone(), SHOT),
        ("malformed IPv4 in", i, truncated.clone(), SHOT),
        ("malformed IPv4 out", e, truncated.clone(), SHOT),
    ];
    run_cases(&mut f, &cases);
    let c = CounterReader::open(&f.pin).unwrap();
    let got = |dir, o| c.read_outcome(0, dir, o);
    let n = |frame: &[u8], k: u64| Count { packets: k, bytes: k * frame.len() as u64 };
    assert_eq!(got(ig, VERDICT_ALLOW), n(&allowed, 1));
    assert_eq!(got(ig, VERDICT_DENY), n(&denied, 2), "reason policy");
    assert_eq!(got(eg, VERDICT_SPOOFED), n(&spoofed, 1));
    assert_eq!(got(eg, DROP_UNSUPPORTED), n(&lldp, 1));
    assert_eq!(got(ig, DROP_MALFORMED), n(&truncated, 1));
    assert_eq!(got(eg, DROP_MALFORMED), n(&truncated, 1));
    assert_eq!(got(ig, DROP_FAIL_CLOSED), Count::default());
    // The verdicts: a malformed packet out of the pod counts as spoofed, into it as denied.
    assert_eq!((c.read(0, ig, VERDICT_DENY), c.read(0, ig, VERDICT_ALLOW)), (3, 1));
    assert_eq!((c.read(0, eg, VERDICT_DENY), c.read(0, eg, VERDICT_SPOOFED)), (1, 2));

    // The pod failing closed (its entries do not fit): the same denied packet counts as
    // fail-closed, no longer as the policies'.
    let mut loaded = Loaded::default();
    load_text(Path::new("t.yaml"), &format!("{POD}\n---\n{POLICY}"), &mut loaded);
    let node = compile_node(&loaded.cluster, "n");
    let ifaces: BTreeMap<ObjKey, Iface> = [(ObjKey::new("t", "web"), Iface { ifindex: 1, ifname: "lo".into() })].into();
    f.dp.set_limits(netpol_daemon::datapath::Limits { policy: 1, ..Default::default() });
    assert_eq!(f.dp.sync(&node, &ifaces).fail_closed, vec![ObjKey::new("t", "web")]);
    // (A new flow: the first one is tracked and goes on.)
    let allowed = udp4(v4("192.0.2.1"), web, 5354, 53);
    assert_eq!(run(&mut f, i, &allowed), SHOT, "fails closed");
    assert_eq!(got(ig, DROP_FAIL_CLOSED), n(&allowed, 1));
    assert_eq!(got(ig, VERDICT_DENY), n(&denied, 2), "unchanged");
    f.dp.set_limits(netpol_daemon::datapath::Limits::default());
    assert!(f.dp.sync(&node, &ifaces).fail_closed.is_empty());
    assert_eq!(run(&mut f, i, &denied), SHOT);
    assert_eq!(got(ig, VERDICT_DENY), n(&denied, 3), "the policies' again");
    assert_eq!(got(ig, DROP_FAIL_CLOSED), n(&allowed, 1));
}

/// Deny events over the per-CPU rate limit, and those the ring buffer has no room for, are
/// counted (EVENT_DROPS: `netpol_deny_events_dropped_total`).
#[test]
fn deny_events_not_sent_are_counted() {
    use netpol_common::*;
    let Some(mut f) = fixture(POLICY) else { return };
    let i = Direction::Ingress;
    let denied = udp4(v4("192.0.2.1"), v4("10.1.0.10"), 5353, 54);
    // Nobody reads the ring buffer here.
    let mut ev = f.dp.take_events().expect("ring buffer");
    ev.control.set(EventConfig { per_sec: 2, verdicts: EVENTS_DENIED }).unwrap();
    let c = CounterReader::open(&f.pin).unwrap();
    // One syscall, 10 runs on one CPU (well within a second): 2 sent, 8 over the limit.
    f.dp.test_run(i, &denied, 10).unwrap();
    assert_eq!((c.read_event_drops(EVENT_DROP_RATE), c.read_event_drops(EVENT_DROP_FULL)), (8, 0));
    // No limit to speak of: the 256 KiB ring fills up (64-byte events plus headers), then
    // every further event is counted as not sent.
    ev.control.set(EventConfig { per_sec: u32::MAX, verdicts: EVENTS_DENIED }).unwrap();
    f.dp.test_run(i, &denied, 20_000).unwrap();
    let full = c.read_event_drops(EVENT_DROP_FULL);
    let room = EVENTS_BYTES as u64 / std::mem::size_of::<FlowEvent>() as u64;
    assert!(full > 20_000 - room - 2 && full < 20_000, "{full} not sent with the ring full");
    assert_eq!(c.read_event_drops(EVENT_DROP_RATE), 8);
}

/// The conntrack table's fill is counted by batched look-ups (several batches here), as each
/// scrape does for `netpol_bpf_map_entries{map="CONNTRACK2"}`.
#[test]
fn tracked_flows_are_counted() {
    let Some(mut f) = fixture(POLICY) else { return };
    let c = CounterReader::open(&f.pin).unwrap();
    assert_eq!(c.count_conntrack().unwrap(), 0);
    for sport in 0..5000u16 {
        assert_eq!(run(&mut f, Direction::Ingress, &udp4(v4("192.0.2.1"), v4("10.1.0.10"), 10_000 + sport, 53)), OK);
    }
    assert_eq!(c.count_conntrack().unwrap(), 5000);
}

/// A `log` logger that keeps the records' target, level and text.
#[derive(Clone, Default)]
struct Records(std::sync::Arc<std::sync::Mutex<Vec<(String, log::Level, String)>>>);

impl log::Log for Records {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        self.0.lock().unwrap().push((r.target().to_string(), r.level(), r.args().to_string()));
    }
    fn flush(&self) {}
}

impl Records {
    fn take(&self) -> Vec<(String, log::Level, String)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Loaded with `--bpf-debug`, the programs log each drop with its reason, audit, new flow and
/// frame not read as IP (one record each, target netpol_bpf); loaded without (the default
/// build, which has no logging code: `only_the_debug_object_has_the_log`), there is no log.
#[test]
fn programs_loaded_to_debug_log_their_decisions_and_cost_nothing_otherwise() {
    let Some(mut off) = fixture(POLICY) else { return };
    assert!(off.dp.take_program_log().unwrap().is_none(), "no log without --bpf-debug");
    let mut on = fixture_logging(POLICY, true).unwrap();
    let records = Records::default();
    let mut log = on.dp.take_program_log_into(records.clone()).unwrap().expect("the programs' log");
    let (web, i, e) = (v4("10.1.0.10"), Direction::Ingress, Direction::Egress);
    let mut run_logged = |f: &mut Fixture, frame: &[u8], dir, want| {
        assert_eq!(run(f, dir, frame), want);
        log.read(std::time::Duration::from_millis(100));
        records.take()
    };
    let info = |text: &str| vec![("netpol_bpf".to_string(), log::Level::Info, text.to_string())];
    assert_eq!(
        run_logged(&mut on, &tcp4(v4("192.0.2.1"), web, 40000, 22, TCP_SYN), i, SHOT),
        info("drop: policy ep 0 ingress proto 6 192.0.2.1:40000 -> 10.1.0.10:22")
    );
    assert_eq!(
        run_logged(&mut on, &udp4(v4("10.9.9.9"), v4("10.2.0.1"), 5000, 443), e, SHOT),
        info("drop: spoofed ep 0 egress proto 17 10.9.9.9:5000 -> 10.2.0.1:443")
    );
    assert_eq!(
        run_logged(&mut on, &ipv6(v6("fd00::1"), v6("fd00::10"), 6, 40000, 22, TCP_SYN, &[]), i, SHOT),
        info("drop: policy ep 0 ingress proto 6 [fd00::1]:40000 -> [fd00::10]:22")
    );
    // (An IPv4 header length of 16 bytes.)
    let mut malformed = tcp4(v4("192.0.2.1"), web, 40000, 80, TCP_SYN);
    malformed[14] = 0x44;
    let text = format!("drop: malformed ep 0 ingress frame not read as IP ({} bytes)", malformed.len());
    assert_eq!(run_logged(&mut on, &malformed, i, SHOT), info(&text));
    let new_flow = run_logged(&mut on, &tcp4(v4("10.7.0.1"), web, 40000, 80, TCP_SYN), i, OK);
    assert_eq!(
        new_flow,
        vec![(
            "netpol_bpf".into(),
            log::Level::Debug,
            "new flow: ep 0 ingress proto 6 10.7.0.1:40000 -> 10.1.0.10:80 policy slot 0".into()
        )]
    );
    // The flow's next packets log nothing.
    assert_eq!(run_logged(&mut on, &tcp4(v4("10.7.0.1"), web, 40000, 80, TCP_ACK), i, OK), vec![]);
    // The pod failing closed (its entries do not fit): that is the reason logged.
    let mut loaded = Loaded::default();
    load_text(Path::new("t.yaml"), &format!("{POD}\n---\n{POLICY}"), &mut loaded);
    let node = compile_node(&loaded.cluster, "n");
    let ifaces: BTreeMap<ObjKey, Iface> = [(ObjKey::new("t", "web"), Iface { ifindex: 1, ifname: "lo".into() })].into();
    on.dp.set_limits(netpol_daemon::datapath::Limits { policy: 1, ..Default::default() });
    assert_eq!(on.dp.sync(&node, &ifaces).fail_closed, vec![ObjKey::new("t", "web")]);
    assert_eq!(
        run_logged(&mut on, &udp4(v4("192.0.2.1"), web, 5354, 53), i, SHOT),
        info("drop: fail-closed ep 0 ingress proto 17 192.0.2.1:5354 -> 10.1.0.10:53")
    );
    // Off, the default programs make the same drop, with a fraction of the instructions.
    assert_eq!(run(&mut off, i, &tcp4(v4("192.0.2.1"), web, 40000, 22, TCP_SYN)), SHOT);
    let (off_stats, on_stats) = (off.dp.program_stats(), on.dp.program_stats());
    for ((name, _, off_insns, off_jited), (_, _, on_insns, on_jited)) in off_stats.iter().zip(&on_stats) {
        eprintln!("{name}: --bpf-debug off {off_insns:?} instructions, {off_jited:?} bytes JIT-compiled; on {on_insns:?}, {on_jited:?}");
        let (off_insns, on_insns) = (off_insns.unwrap(), on_insns.unwrap());
        // (The bound: see `programs_pass_the_verifier_well_below_its_limits`.)
        assert!(off_insns < 8192 && on_insns > off_insns + 2000, "{name}: {off_insns} instructions off, {on_insns} on");
    }
}

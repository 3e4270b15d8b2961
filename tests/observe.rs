//! `netpol-daemon observe` against the real daemon in a netns lab: real connections and
//! crafted frames, the flows named as they are decided, the filters, the rate limit, and
//! observe turning the programs' events on and off while the daemon runs.
use std::path::Path;
use std::time::{Duration, Instant};

use netpol_daemon::metrics::flows::Flow;
use netpol_daemon::metrics::sample;
use netpol_daemon::testkit::lab::Lab;

mod common;
use common::*;

const ALLOW_API: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-api, namespace: kafka}\nspec:\n  podSelector: {matchLabels: {app: kafka}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: apps}}, podSelector: {matchLabels: {app: api}}}]\n    ports: [{port: 9092}]\n";

/// kafka/broker (TCP 9092, UDP 5353) lets in only clients/api on 9092; other/stranger is
/// nobody it knows.
fn lab_with_policy(daemon_args: &[&str]) -> Option<Lab> {
    let mut lab = lab()?;
    lab.daemon_args = daemon_args.iter().map(|a| a.to_string()).collect();
    lab.add_namespace("kafka", &[("team", "streams")]);
    lab.add_namespace("clients", &[("team", "apps")]);
    lab.add_namespace("other", &[("team", "other")]);
    lab.add_pod("kafka", "broker", ip("10.244.0.10"), &[("app", "kafka")], &[9092], &[5353]).unwrap();
    lab.add_pod("clients", "api", ip("10.244.0.20"), &[("app", "api")], &[], &[]).unwrap();
    lab.add_pod("other", "stranger", ip("10.244.0.30"), &[("app", "stranger")], &[], &[]).unwrap();
    lab.write_cluster_manifest().unwrap();
    lab.write_manifest("allow.yaml", ALLOW_API).unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    wait_endpoints(&lab, 3, 15, "lab");
    Some(lab)
}

fn flows(lines: &[String]) -> Vec<Flow> {
    lines.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

fn metric(lab: &Lab, name: &str) -> f64 {
    sample(&lab.metrics().unwrap(), name).unwrap_or(0.0)
}

/// Waits until the metric `name` is `want`.
fn wait_metric(lab: &Lab, name: &str, want: f64) {
    let t0 = Instant::now();
    while metric(lab, name) != want {
        assert!(t0.elapsed() < Duration::from_secs(10), "{name} is not {want}:\n{}", lab.metrics().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The response head (and, for an error, body) of a plain HTTP/1.1 GET of `path` from the
/// daemon's endpoint.
fn raw_get(lab: &Lab, path: &str) -> String {
    use std::io::{Read, Write};
    let path = path.to_string();
    netpol_daemon::testkit::lab::in_netns(&lab.node_netns, move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", netpol_daemon::testkit::lab::METRICS_PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = vec![0; 4096];
        let mut got = Vec::new();
        // A stream never ends: its head is enough. An error's body ends with the connection.
        let stream_head = |g: &[u8]| g.starts_with(b"HTTP/1.1 200") && String::from_utf8_lossy(g).contains("\r\n\r\n");
        while !stream_head(&got) {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).to_lowercase().replace("http/1.1", "HTTP/1.1")
    })
    .unwrap()
}

fn is(f: &Flow, pod: &str, direction: &str, verdict: &str) -> bool {
    f.pod == pod && f.direction == direction && f.verdict.as_str() == verdict
}

/// An allowed connection, a denied one and a spoofed frame each show up once, named (pod, peer,
/// verdict, reason, policy), in every client whose filter takes them and in no other; the
/// established packets of the allowed connection show up not at all.
#[test]
fn observe_names_allowed_denied_and_spoofed_flows_and_filters_them() {
    let Some(lab) = lab_with_policy(&[]) else { return };
    assert_eq!(metric(&lab, "netpol_flow_events_rate"), 0.0, "off without observe (--log-denied 0)");
    let all = lab.observe(Path::new(DAEMON), &["-o", "json"]).unwrap();
    let stranger = lab.observe(Path::new(DAEMON), &["-o", "json", "--pod", "other/stranger", "--verdict", "denied"]).unwrap();
    let allowed_text = lab.observe(Path::new(DAEMON), &["--verdict", "allowed"]).unwrap();
    wait_metric(&lab, "netpol_flow_clients", 3.0);
    assert!(metric(&lab, "netpol_flow_events_enabled{verdict=\"allowed\"}") == 1.0);

    assert!(lab.tcp("api", "broker", 9092), "allowed\n{}", lab.daemon_log());
    assert!(!lab.tcp("stranger", "broker", 9092), "denied");
    // api sends as stranger: dropped at api's own interface.
    lab.scapy("api", "tx(IP(src='10.244.0.30', dst='10.244.0.10')/UDP(sport=7777, dport=5353)/Raw(b'SPOOF'))").unwrap();

    let want = |fs: &[Flow]| {
        fs.iter().any(|f| is(f, "kafka/broker", "ingress", "allowed"))
            && fs.iter().any(|f| is(f, "kafka/broker", "ingress", "denied") && f.peer.as_deref() == Some("other/stranger"))
            && fs.iter().any(|f| is(f, "clients/api", "egress", "denied"))
    };
    let got = flows(&all.lines_until(Duration::from_secs(5), |l| want(&flows(l))));
    let show = || got.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join("\n");
    // The allowed connection: once at each end, by the first packet (the SYN).
    let into_broker: Vec<&Flow> = got.iter().filter(|f| is(f, "kafka/broker", "ingress", "allowed")).collect();
    assert_eq!(into_broker.len(), 1, "only the new flow's first packet:\n{}", show());
    let f = into_broker[0];
    assert_eq!(
        (f.reason.as_str(), f.policy.as_deref(), f.peer.as_deref()),
        ("policy", Some("kafka/allow-api"), Some("clients/api")),
        "{f:?}"
    );
    assert_eq!(
        (f.protocol.as_deref(), f.dst.as_deref(), f.dst_port, f.tcp_flags.as_deref()),
        (Some("TCP"), Some("10.244.0.10"), Some(9092), Some("SYN"))
    );
    assert_eq!((f.src.as_deref(), f.node.as_str()), (Some("10.244.0.20"), "lab-node"));
    let out_of_api: Vec<&Flow> = got.iter().filter(|f| is(f, "clients/api", "egress", "allowed")).collect();
    assert_eq!(out_of_api.len(), 1, "{}", show());
    assert_eq!((out_of_api[0].reason.as_str(), out_of_api[0].peer.as_deref()), ("not-isolated", Some("kafka/broker")));
    // The denied connection: the broker's default deny, the stranger named as the peer. (The
    // node's own multicast listener reports to the broker are denied too, without a peer.)
    let denied = got.iter().find(|f| is(f, "kafka/broker", "ingress", "denied") && f.src.as_deref() == Some("10.244.0.30")).unwrap();
    assert_eq!((denied.reason.as_str(), denied.policy.as_deref(), denied.peer.as_deref()), ("policy", None, Some("other/stranger")));
    assert_eq!((denied.tcp_flags.as_deref(), denied.dst_port), (Some("SYN"), Some(9092)));
    assert_eq!(denied.isolated_by, vec!["kafka/allow-api"]);
    // The spoofed frame: at api's interface, its forged source as given.
    let spoofed = got.iter().find(|f| is(f, "clients/api", "egress", "denied")).unwrap();
    assert_eq!((spoofed.reason.as_str(), spoofed.src.as_deref(), spoofed.dst_port), ("spoofed", Some("10.244.0.30"), Some(5353)));
    // No flow of broker's egress (its replies are tracked flows) and nothing else allowed.
    assert!(!got.iter().any(|f| is(f, "kafka/broker", "egress", "allowed")), "{}", show());

    // The filters: the stranger's denials only (as the peer here); allowed flows only, as text.
    let s = flows(&stranger.lines_until(Duration::from_secs(3), |l| !l.is_empty()));
    assert!(
        !s.is_empty()
            && s.iter()
                .all(|f| f.verdict.as_str() == "denied" && (f.peer.as_deref() == Some("other/stranger") || f.pod == "other/stranger")),
        "{s:?}"
    );
    let t = allowed_text.lines_until(Duration::from_secs(3), |l| l.len() >= 2);
    assert!(t.len() >= 2 && t.iter().all(|l| l.contains(" ALLOWED ")), "{t:?}");
    assert!(
        t.iter().any(|l| l.contains(" ALLOWED ingress kafka/broker: 10.244.0.20:")
            && l.contains(" (clients/api) -> 10.244.0.10:9092 TCP SYN: by kafka/allow-api")),
        "{t:?}"
    );
    // Any HTTP/1.1 client gets chunked NDJSON; a bad query is refused, naming the parameter.
    let head = raw_get(&lab, "/v1/flows?verdict=denied");
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("transfer-encoding: chunked") && head.contains("application/x-ndjson"),
        "{head}"
    );
    let refused = raw_get(&lab, "/v1/flows?verdict=dropped");
    assert!(refused.starts_with("HTTP/1.1 400") && refused.contains("verdict: \"dropped\""), "{refused}");
    // Nothing more arrives for the filtered clients (no stray flow of other pods or verdicts).
    std::thread::sleep(Duration::from_millis(300));
    let more = flows(&stranger.lines_for(Duration::from_millis(300)));
    assert!(more.iter().all(|f| f.verdict.as_str() == "denied"), "{more:?}");
}

/// Observe turns the programs' flow events on while it runs and off after, with no restart; a
/// flood of denials yields at most the asked-for rate, the rest counted as rate limited.
#[test]
fn observe_turns_events_on_and_off_and_the_rate_limit_holds() {
    let Some(lab) = lab_with_policy(&[]) else { return };
    let pid = lab.daemon_pid();
    let received = |lab: &Lab| {
        metric(lab, "netpol_flow_events_total{verdict=\"allowed\"}") + metric(lab, "netpol_flow_events_total{verdict=\"denied\"}")
    };
    // Off: connections send nothing.
    assert!(lab.tcp("api", "broker", 9092) && !lab.tcp("stranger", "broker", 9092));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(received(&lab), 0.0);

    // On for a client, then off once it is gone.
    let o = lab.observe(Path::new(DAEMON), &["-o", "json"]).unwrap();
    assert!(lab.tcp("api", "broker", 9092));
    assert!(!o.lines_until(Duration::from_secs(5), |l| !l.is_empty()).is_empty(), "events while observing");
    o.stop();
    wait_metric(&lab, "netpol_flow_clients", 0.0);
    wait_metric(&lab, "netpol_flow_events_rate", 0.0);
    assert_eq!(metric(&lab, "netpol_flow_events_enabled{verdict=\"denied\"}"), 0.0);
    let before = received(&lab);
    assert!(lab.tcp("api", "broker", 9092) && !lab.tcp("stranger", "broker", 9092));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(received(&lab), before, "off again once the client left");
    assert_eq!(lab.daemon_pid(), pid, "no restart");

    // The rate limit: a flood of denials at 5 a second and CPU.
    let o = lab.observe(Path::new(DAEMON), &["-o", "json", "--verdict", "denied", "--rate", "5"]).unwrap();
    assert_eq!(metric(&lab, "netpol_flow_events_rate"), 5.0);
    let drops = |lab: &Lab| {
        let m = lab.metrics().unwrap();
        let s = |n: &str| sample(&m, n).unwrap_or(0.0);
        (
            s("netpol_dropped_packets_total{namespace=\"kafka\",pod=\"broker\",direction=\"ingress\",reason=\"policy\"}"),
            s("netpol_deny_events_dropped_total{reason=\"rate_limited\"}") + s("netpol_deny_events_dropped_total{reason=\"ring_full\"}"),
            s("netpol_flow_events_total{verdict=\"denied\"}"),
        )
    };
    let (denied0, limited0, sent0) = drops(&lab);
    let t0 = Instant::now();
    lab.scapy("stranger", "tx(IP(src=MY_IP, dst='10.244.0.10')/UDP(sport=6000, dport=5353)/Raw(b'FLOOD'), count=2000)").unwrap();
    let lines = o.lines_for(Duration::from_millis(800));
    let secs = t0.elapsed().as_secs_f64().ceil();
    let (denied1, limited1, sent1) = drops(&lab);
    let flood = denied1 - denied0;
    assert!(flood >= 2000.0, "the flood was denied: {flood}");
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let most = 5.0 * cpus * (secs + 1.0);
    assert!(!lines.is_empty() && lines.len() as f64 <= most, "{} events for {flood} denials in {secs} s (at most {most})", lines.len());
    assert_eq!(lines.len() as f64, sent1 - sent0, "the client got what the programs sent");
    // Every denial was either sent or counted as not sent (other pods' denials, such as a
    // stray neighbour solicitation, count too).
    assert!(limited1 - limited0 >= flood - (sent1 - sent0), "{}", lab.metrics().unwrap());
}

/// `--log-denied N` logs denials (the reader always runs) at N a second and CPU; an observe
/// client widens what the programs send and leaves the log's base as it was.
#[test]
fn log_denied_logs_denials_with_their_reason_and_observe_returns_to_it() {
    let Some(lab) = lab_with_policy(&["--log-denied", "10"]) else { return };
    assert_eq!(metric(&lab, "netpol_flow_events_rate"), 10.0);
    assert_eq!(metric(&lab, "netpol_flow_events_enabled{verdict=\"allowed\"}"), 0.0);
    assert!(!lab.tcp("stranger", "broker", 9092));
    let t0 = Instant::now();
    let logged = "denied pod=kafka/broker direction=ingress proto=TCP src=10.244.0.30:";
    while !lab.daemon_log().lines().any(|l| l.contains(logged) && l.contains("dst=10.244.0.10:9092 reason=policy")) {
        assert!(t0.elapsed() < Duration::from_secs(5), "no deny log line:\n{}", lab.daemon_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = lab.observe(Path::new(DAEMON), &["-o", "json", "--verdict", "allowed", "--rate", "200"]).unwrap();
    assert_eq!(metric(&lab, "netpol_flow_events_rate"), 200.0);
    assert_eq!(metric(&lab, "netpol_flow_events_enabled{verdict=\"allowed\"}"), 1.0);
    assert!(lab.tcp("api", "broker", 9092));
    assert!(!o.lines_until(Duration::from_secs(5), |l| !l.is_empty()).is_empty());
    // Allowed flows are streamed, never logged.
    assert!(!lab.daemon_log().contains("allowed pod="), "{}", lab.daemon_log());
    o.stop();
    wait_metric(&lab, "netpol_flow_clients", 0.0);
    assert_eq!(metric(&lab, "netpol_flow_events_rate"), 10.0, "back to --log-denied");
    assert_eq!(metric(&lab, "netpol_flow_events_enabled{verdict=\"allowed\"}"), 0.0);
    assert_eq!(metric(&lab, "netpol_flow_events_enabled{verdict=\"denied\"}"), 1.0);
}

/// A client that connects to the stream and never reads loses what its queue cannot hold,
/// counted; the reader, the other clients and the endpoint go on as if it were not there.
#[test]
fn a_client_that_does_not_read_holds_up_no_one() {
    let Some(lab) = lab_with_policy(&[]) else { return };
    let quick = lab.observe(Path::new(DAEMON), &["-o", "json", "--verdict", "denied", "--rate", "10000"]).unwrap();
    // Connected, never read (the stream's head included).
    let slow = netpol_daemon::testkit::lab::in_netns(&lab.node_netns, || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", netpol_daemon::testkit::lab::METRICS_PORT)).unwrap();
        write!(s, "GET /v1/flows?verdict=denied&rate=10000 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        s
    })
    .unwrap();
    wait_metric(&lab, "netpol_flow_clients", 2.0);
    let total = |lab: &Lab| metric(lab, "netpol_flow_events_total{verdict=\"denied\"}");
    let before = total(&lab);
    // 60,000 denied datagrams from the stranger in bursts, over a few seconds (so that the
    // ring buffer keeps up: the point is the client's queue).
    let dst = std::net::SocketAddr::from((lab.address("broker"), 5353));
    netpol_daemon::testkit::lab::in_netns(&lab.pod("stranger").netns.clone(), move || {
        let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..300 {
            for _ in 0..200 {
                let _ = u.send_to(b"FLOOD", dst);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })
    .unwrap();
    // The endpoint answers meanwhile.
    let t0 = Instant::now();
    assert_eq!(lab.http_get("/healthz").unwrap().0, 200);
    assert!(t0.elapsed() < Duration::from_secs(1), "/healthz took {:?}", t0.elapsed());
    // Wait until the daemon has read everything the programs sent.
    let mut sent = total(&lab) - before;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = total(&lab) - before;
        if now == sent {
            break;
        }
        sent = now;
    }
    let got = quick.lines_until(Duration::from_secs(20), |l| l.len() as f64 >= sent);
    assert!(got.len() as f64 >= 0.9 * sent, "the reading client got {} of {sent}", got.len());
    let m = lab.metrics().unwrap();
    let lost = sample(&m, "netpol_flow_events_dropped_total{reason=\"slow_client\"}").unwrap_or(0.0);
    assert!(lost > 0.0 && lost <= sent, "the client that does not read lost {lost} of {sent}\n{m}");
    drop(slow);
}

//! `netpol-lab demo`: builds a small cluster in network namespaces, modelled on the product
//! documents users start from (an event-streaming namespace with default-deny ingress and the
//! listed ports and peers; an API pod whose egress is ports-only with `to:` null), runs the
//! real daemon, and prints the connectivity measured with real connections before and after
//! the policies apply, with the counters from /metrics. Cleans up on exit and on Ctrl-C.
//! `netpol-lab dashboard` runs the same lab with traffic for the dashboard's picture.
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use netpol_daemon::metrics::sample;
use netpol_daemon::testkit::lab::{self, Lab};

mod churn;
mod connrate;
mod dashboard;
mod throughput;

const POLICIES: &str = r#"# Event streams namespace: isolate every pod for ingress.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: es}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
# Kafka pod: broker port from Kafka and the cluster operator, REST port from the REST pods,
# the plain listener from anywhere.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: kafka-access, namespace: es}
spec:
  podSelector: {matchLabels: {app: kafka}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: kafka}}
    - namespaceSelector: {matchLabels: {role: operators}}
      podSelector: {matchLabels: {app: cluster-operator}}
    ports: [{protocol: TCP, port: 9091}]
  - from:
    - podSelector: {matchLabels: {app: rest}}
    ports: [{protocol: TCP, port: 8091}]
  - ports: [{protocol: TCP, port: 9092}]
---
# UI pod: port 3000 from anywhere outside 192.168.50.0/24 except the admin host.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ui-access, namespace: es}
spec:
  podSelector: {matchLabels: {app: ui}}
  ingress:
  - from:
    - ipBlock: {cidr: 0.0.0.0/0, except: [192.168.50.0/24]}
    - ipBlock: {cidr: 192.168.50.10/32}
    ports: [{protocol: TCP, port: 3000}]
---
# API pod behind its sidecar: 8080 in from any pod of any namespace; out only to the listed
# ports, to anywhere (`to:` left null), DNS over TCP and UDP included.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: proxy-allow, namespace: apps}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from:
    - namespaceSelector: {}
      podSelector: {}
    ports: [{protocol: TCP, port: 8080}]
  egress:
  - to:
    ports:
    - {protocol: TCP, port: 8438}
    - {protocol: TCP, port: 443}
    - {protocol: TCP, port: 8443}
    - {protocol: TCP, port: 53}
    - {protocol: UDP, port: 53}
  policyTypes: [Ingress, Egress]
"#;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn build(lab: &mut Lab) -> Result<()> {
    lab.add_namespace("es", &[("role", "streaming")]);
    lab.add_namespace("operators", &[("role", "operators")]);
    lab.add_namespace("apps", &[("role", "apps")]);
    lab.add_namespace("infra", &[("role", "infra")]);
    lab.add_pod("es", "kafka-0", ip("10.244.0.10"), &[("app", "kafka")], &[9091, 9092, 8091], &[])?;
    lab.add_pod("es", "kafka-1", ip("10.244.0.11"), &[("app", "kafka")], &[9091, 9092, 8091], &[])?;
    lab.add_pod("es", "rest", ip("10.244.0.12"), &[("app", "rest")], &[8080], &[])?;
    lab.add_pod("es", "ui", ip("10.244.0.13"), &[("app", "ui")], &[3000], &[])?;
    lab.add_pod("operators", "cluster-operator", ip("10.244.0.20"), &[("app", "cluster-operator")], &[8443], &[])?;
    lab.add_pod("apps", "api", ip("10.244.0.30"), &[("app", "api")], &[8080], &[])?;
    lab.add_pod("infra", "dns", ip("10.244.0.40"), &[("app", "dns")], &[53, 443, 5432], &[53])?;
    lab.add_external("admin", ip("192.168.50.10"))?;
    lab.add_external("laptop", ip("192.168.50.20"))?;
    lab.add_external("internet", ip("203.0.113.7"))?;
    lab.write_cluster_manifest()
}

/// (from, to, protocol, port, why); the expected verdict after the policies is in EXPECTED.
const PROBES: &[(&str, &str, &str, u16, &str)] = &[
    ("kafka-1", "kafka-0", "tcp", 9091, "kafka peer on broker port"),
    ("cluster-operator", "kafka-0", "tcp", 9091, "operator ns + pod on broker port"),
    ("rest", "kafka-0", "tcp", 9091, "REST pod not allowed on 9091"),
    ("rest", "kafka-0", "tcp", 8091, "REST pod on REST port"),
    ("api", "kafka-0", "tcp", 8091, "api pod not allowed on 8091"),
    ("api", "kafka-0", "tcp", 9092, "open on kafka, but api egress lacks 9092"),
    ("internet", "kafka-0", "tcp", 9092, "plain listener open to all"),
    ("kafka-0", "rest", "tcp", 8080, "default deny in es"),
    ("node", "rest", "tcp", 8080, "node always reaches its pods"),
    ("internet", "ui", "tcp", 3000, "ipBlock 0.0.0.0/0"),
    ("laptop", "ui", "tcp", 3000, "in the except range"),
    ("admin", "ui", "tcp", 3000, "except, but allowed by a /32"),
    ("rest", "api", "tcp", 8080, "any pod of any namespace"),
    ("internet", "api", "tcp", 8080, "not a pod"),
    ("api", "dns", "udp", 53, "egress DNS over UDP, to: null"),
    ("api", "dns", "tcp", 53, "egress DNS over TCP"),
    ("api", "dns", "tcp", 443, "egress HTTPS"),
    ("api", "dns", "tcp", 5432, "egress port not listed"),
    ("api", "rest", "tcp", 8080, "api egress 8080 not listed"),
];

const EXPECTED: &[bool] =
    &[true, true, false, true, false, false, true, false, true, true, false, true, true, false, true, true, true, false, false];

fn measure(lab: &Lab) -> Vec<bool> {
    std::thread::scope(|s| {
        let hs: Vec<_> = PROBES
            .iter()
            .map(|&(from, to, proto, port, _)| {
                s.spawn(move || if proto == "tcp" { lab.tcp(from, to, port) } else { lab.udp(from, to, port) })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(false)).collect()
    })
}

fn verdict(b: bool) -> &'static str {
    if b {
        "ALLOW"
    } else {
        "deny "
    }
}

fn demo(daemon: PathBuf) -> Result<()> {
    let mut lab = Lab::new()?;
    println!("netpol lab {}: node namespace {}", lab.id, lab.node_netns);
    build(&mut lab)?;
    println!("{} pods and hosts wired with veth pairs and /32 routes; servers listening.", lab.pods.len());
    lab.start_daemon(&daemon)?;
    println!("netpol-daemon running in the node namespace, ready.\n");
    let before = measure(&lab);
    println!("applying policies (4 NetworkPolicies, see below)...");
    lab.apply("policies.yaml", POLICIES)?;
    let after = measure(&lab);

    println!("\n{:<17} {:<19} {:<9} {:<6} {:<6} {:<8} WHY", "FROM", "TO", "PORT", "BEFORE", "AFTER", "EXPECTED");
    println!("{}", "-".repeat(110));
    let mut mismatches = 0;
    for (i, (from, to, proto, port, why)) in PROBES.iter().enumerate() {
        let tgt = lab.pods.iter().find(|p| p.name == *to).map(|p| p.key()).unwrap_or(to.to_string());
        let ok = after[i] == EXPECTED[i];
        mismatches += usize::from(!ok);
        let mark = if ok { "ok" } else { "MISMATCH" };
        println!(
            "{:<17} {:<19} {:<9} {:<6} {:<6} {:<8} {}",
            from,
            tgt,
            format!("{proto}/{port}"),
            verdict(before[i]),
            verdict(after[i]),
            mark,
            why
        );
    }
    let m = lab.metrics()?;
    println!("\ncounters from /metrics (netpol_packets_total, non-zero):");
    for l in m.lines().filter(|l| l.starts_with("netpol_packets_total{") && !l.ends_with(" 0")) {
        println!("  {l}");
    }
    for g in [
        "netpol_endpoints",
        "netpol_policies",
        "netpol_identity_map_entries",
        "netpol_policy_map_entries",
        "netpol_port_map_entries",
        "netpol_manifest_errors",
    ] {
        println!("  {g} {}", sample(&m, g).unwrap_or(f64::NAN));
    }
    let open_before = before.iter().filter(|b| **b).count();
    if open_before != PROBES.len() {
        bail!("before any policy {open_before} of {} probes connected; the lab is broken", PROBES.len());
    }
    if mismatches > 0 {
        bail!("{mismatches} probes disagree with the expected verdicts");
    }
    println!("\nall {} probes match the expected verdicts; policies applied were:\n{POLICIES}", PROBES.len());
    Ok(())
}

/// A small cluster in network namespaces with the real daemon (root).
#[derive(Parser)]
#[command(name = "netpol-lab")]
struct Cli {
    /// Without one: `demo`.
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connectivity before and after the policies apply, with the counters.
    Demo,
    /// iperf3 throughput through the programs, against no program and iptables.
    Throughput {
        /// Seconds per iperf3 run.
        #[arg(default_value_t = 3)]
        seconds: u32,
        /// Interleaved rounds.
        #[arg(default_value_t = 3)]
        repeats: usize,
        /// Where to write the chart (SVG); none: no chart.
        svg: Option<PathBuf>,
    },
    /// The demo's lab with traffic running, scraped by Prometheus, and the Grafana
    /// dashboard's preview page screenshotted by headless Chromium (`cargo xtask dashboard`).
    Dashboard(dashboard::Args),
    /// New TCP connections (TCP_CRR) and UDP request/response through the programs, against
    /// no program and iptables, at 10, 1,000 and 10,000 policies.
    Connrate {
        /// Seconds per run.
        #[arg(default_value_t = 2.0)]
        seconds: f64,
        /// Interleaved rounds.
        #[arg(default_value_t = 3)]
        repeats: usize,
        /// Policy counts (default: 10, 1,000 and 10,000).
        policies: Vec<usize>,
    },
    /// TCP connections paced at a rate through netpol: conntrack fill, evictions, drops,
    /// connect latency.
    Churn {
        /// Connections per second offered.
        #[arg(default_value_t = 10_000.0)]
        rate: f64,
        /// Seconds.
        #[arg(default_value_t = 30.0)]
        seconds: f64,
        /// Policies selecting the server.
        #[arg(default_value_t = 1_000)]
        policies: usize,
    },
}

fn main() {
    let cmd = Cli::parse().cmd.unwrap_or(Cmd::Demo);
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: removing the lab");
        lab::cleanup_all();
        std::process::exit(130);
    })
    .expect("installing the Ctrl-C handler");
    let daemon = std::env::current_exe().unwrap().with_file_name("netpol-daemon");
    let r = match cmd {
        Cmd::Demo => demo(daemon),
        Cmd::Throughput { seconds, repeats, svg } => throughput::run(daemon, seconds, repeats, svg.as_deref()),
        Cmd::Dashboard(args) => dashboard::run(daemon, args),
        Cmd::Connrate { seconds, repeats, policies } => {
            let counts = if policies.is_empty() { vec![10, 1_000, 10_000] } else { policies };
            connrate::run(&daemon, seconds, repeats, &counts)
        }
        Cmd::Churn { rate, seconds, policies } => churn::churn(&daemon, rate, seconds, policies),
    };
    if let Err(e) = r {
        eprintln!("netpol-lab: {e:#}");
        lab::cleanup_all();
        std::process::exit(1);
    }
}

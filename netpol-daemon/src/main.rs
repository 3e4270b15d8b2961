//! `netpol-daemon`: the command line (run, explain, check, observe, status, uninstall) over the
//! library.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "netpol-daemon", about = "Kubernetes NetworkPolicy enforcement with eBPF", version = version())]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// How log lines are written to stderr: text for people, json (one object per line, with
    /// the spans and their fields) for log collectors. What is logged is chosen by RUST_LOG
    /// (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "NETPOL_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logging through tracing: the daemon's spans (load, compile, sync) and events, kube-rs'
/// own, and aya's `log` records (bridged by tracing-subscriber: the programs' own too, with
/// `--bpf-debug`), to stderr. Without RUST_LOG: `info`, and `netpol_bpf=debug` with
/// `--bpf-debug` (the programs log new flows at debug).
fn init_logging(format: LogFormat, bpf_debug: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if bpf_debug { "info,netpol_bpf=debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().with_current_span(true).with_span_list(false).init(),
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Enforce the policies of this node's pods.
    Run(RunArgs),
    /// Explain whether a connection is allowed, for both ends, and by which rules.
    Explain {
        /// A manifests directory; without it, the live cluster (in-cluster config or KUBECONFIG).
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// NAMESPACE/POD or an IP address.
        #[arg(long)]
        from: String,
        /// NAMESPACE/POD or an IP address.
        #[arg(long)]
        to: String,
        #[arg(long)]
        port: Option<u16>,
        /// TCP, UDP, SCTP or ICMP.
        #[arg(long, default_value = "TCP")]
        protocol: String,
        /// text, or json: one JSON document with the same facts.
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Validate a manifests directory (or the live cluster) and list the problems (exit
    /// status 1 if any error).
    Check {
        /// A manifests directory; without it, the live cluster (in-cluster config or KUBECONFIG).
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// text, or json: one JSON document with the same facts.
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Watch this node's flows as the programs decide them (like `hubble observe`): dropped
    /// and audited packets, and the first packet of every newly allowed flow, from the
    /// daemon's endpoint (GET /v1/flows). Runs until interrupted.
    Observe(ObserveArgs),
    /// Stop enforcing on this node: delete netpol's tc filters (every interface of this
    /// network namespace), remove the pinned links (programs detach) and maps.
    /// A daemon that exits normally keeps enforcing until its successor takes over.
    Uninstall {
        #[arg(long, default_value = "/sys/fs/bpf/netpol")]
        bpffs: PathBuf,
    },
    /// What this node's maps enforce now, read from the pinned maps (not from the compiler;
    /// no daemon needed): every endpoint, or one endpoint and, per direction, the peers
    /// (the CIDRs and addresses of each class) and ports its entries allow. Run it in the
    /// node's network namespace (interface names, tc filters).
    #[command(visible_alias = "inspect")]
    Status {
        #[arg(long, default_value = "/sys/fs/bpf/netpol")]
        bpffs: PathBuf,
        /// One endpoint by pod (NAMESPACE/POD), through the names table the daemon pins
        /// beside the maps (ENDPOINT_NAMES).
        #[arg(long)]
        pod: Option<String>,
        /// One endpoint by one of its addresses.
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        /// One endpoint by its host-side interface.
        #[arg(long)]
        ifname: Option<String>,
        /// text, or json: one JSON document with the same facts.
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
}

#[derive(Args)]
struct ObserveArgs {
    /// Only the flows of this pod (NAMESPACE/POD), on its own interface or as the peer.
    #[arg(long)]
    pod: Option<String>,
    /// Only flows of this verdict (repeat for several; default: all).
    #[arg(long, value_parser = ["denied", "allowed", "audit"])]
    verdict: Vec<String>,
    /// text (one line per flow), or json (one JSON object per line).
    #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
    /// The daemon's endpoint (its --metrics-addr).
    #[arg(long, default_value = "127.0.0.1:9977")]
    addr: String,
    /// Flow events the programs may send per second and CPU while this runs, 1 to 10000 (the
    /// highest any client, or --log-denied, asks for applies).
    #[arg(long, default_value_t = netpol_daemon::metrics::flows::hub::DEFAULT_RATE, value_parser = clap::value_parser!(u32).range(1..=netpol_daemon::metrics::flows::hub::MAX_RATE as i64))]
    rate: u32,
}

impl ObserveArgs {
    fn run(self) -> anyhow::Result<netpol_daemon::cli::observe::Ended> {
        use netpol_daemon::metrics::flows::{Filter, FlowVerdict};
        let verdicts = self.verdict.iter().filter_map(|v| FlowVerdict::parse(v)).collect::<Vec<_>>();
        let filter =
            Filter { pod: self.pod, verdicts: if verdicts.is_empty() { FlowVerdict::ALL.to_vec() } else { verdicts }, rate: self.rate };
        let output = netpol_daemon::cli::Output::parse(&self.output).expect("clap checked the value");
        let mut stdout = std::io::stdout().lock();
        netpol_daemon::cli::observe::observe(&self.addr, &filter, output, &mut stdout, |what| eprintln!("netpol-daemon observe: {what}"))
    }
}

// `netpol-daemon run`: what the daemon enforces, from where, and how (a plain comment: the
// subcommand's help is its variant's).
#[derive(Args)]
struct RunArgs {
    /// This node's name: pods with spec.nodeName equal to it are enforced here.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Read Namespaces, Pods, NetworkPolicies, Services and EndpointSlices from
    /// *.yaml/*.yml/*.json files in this directory (watched for changes) instead of the
    /// Kubernetes API. Without it: the API (in-cluster config or KUBECONFIG).
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Address of the /metrics, /readyz and /healthz endpoint.
    #[arg(long, default_value = "0.0.0.0:9977")]
    metrics_addr: SocketAddr,
    /// /healthz fails (503) once the daemon loop's last pass began more than this many
    /// seconds ago. A pass begins at least every --poll-ms after the last one ended, so this
    /// only has to cover the longest sync.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    liveness_timeout: u64,
    /// Directory on a bpffs where the maps are pinned (re-used across restarts).
    #[arg(long, default_value = "/sys/fs/bpf/netpol")]
    bpffs: PathBuf,
    /// Start even when the daemon runs in a mount namespace of its own whose bpffs at
    /// --bpffs is not the host's (`ip netns exec`): the pins, and enforcement, then end
    /// with the daemon. Refused without it.
    #[arg(long)]
    allow_private_bpffs: bool,
    /// The longest the daemon sleeps between passes, in milliseconds, when nothing wakes it
    /// (a change wakes it at once: inotify on the manifests directory, a watch event from the
    /// Kubernetes API); the periodic work (interface look-ups, full rescans) runs on these.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// While the ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) is not
    /// installed, how often (milliseconds) the daemon looks whether it is now: a CRD installed
    /// later is watched within this. The daemon runs without it (no ClusterNetworkPolicies).
    #[arg(long, default_value_t = netpol_daemon::source::kube::DEFAULT_CRD_RECHECK.as_millis() as u64, value_parser = clap::value_parser!(u64).range(100..))]
    crd_recheck_ms: u64,
    /// What a policy change does to flows already tracked: `keep` lets them run until
    /// they end or idle out (new connections follow the new policy at once); `revalidate`
    /// re-checks every tracked flow after each change and cuts those no longer allowed.
    #[arg(long, default_value = "keep", value_parser = ["keep", "revalidate"])]
    established: String,
    /// Idle timeout of tracked TCP and SCTP flows, seconds.
    #[arg(long, default_value_t = 7200)]
    ct_tcp_timeout: u64,
    /// Idle timeout of tracked UDP flows, seconds.
    #[arg(long, default_value_t = 120)]
    ct_udp_timeout: u64,
    /// Idle timeout of other tracked flows (ICMP echo), seconds.
    #[arg(long, default_value_t = 60)]
    ct_other_timeout: u64,
    /// The per-CPU flow cache in front of the conntrack table: packets of established
    /// flows pass with array lookups only, the table confirming each flow again at least
    /// every second (`off`: every packet looks the table up).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    flow_cache: String,
    /// Log denied packets (source, destination, ports, protocol, pod, direction), at most
    /// this many per second and CPU. 0: off.
    #[arg(long, default_value_t = 0)]
    log_denied: u32,
    /// Audit mode for every policy: what policies would drop is counted and logged as
    /// verdict="audit" and let through (one policy: annotation netpol.io/audit: "true").
    #[arg(long)]
    audit: bool,
    /// How the programs attach to pod interfaces: `tcx` (kernel 6.6 and later: pinned
    /// links), `tc` (clsact + cls_bpf filters, what older kernels have), or `auto` (a new
    /// interface gets a tc filter at once and is moved to a TCX link in the background where
    /// the kernel has TCX). Both survive a restart or a crash of the daemon.
    #[arg(long, default_value = "auto", value_parser = ["auto", "tcx", "tc"])]
    attach: String,
    /// Load the programs that log their decisions into this log (target netpol_bpf): each
    /// drop with its reason, audit, newly tracked flow and frame not read as IP, with the
    /// pod's endpoint id, direction and addresses. For debugging: each such packet writes a
    /// record. Off (the default), the programs loaded have no logging code at all. Applies to
    /// the programs this daemon loads, which take over every interface at its first sync.
    #[arg(long, env = "NETPOL_BPF_DEBUG")]
    bpf_debug: bool,
}

impl RunArgs {
    fn config(self) -> netpol_daemon::daemon::RunConfig {
        netpol_daemon::daemon::RunConfig {
            node_name: self.node_name,
            manifests: self.manifests,
            metrics_addr: self.metrics_addr,
            max_pass_age: Duration::from_secs(self.liveness_timeout),
            bpffs: self.bpffs,
            allow_private_bpffs: self.allow_private_bpffs,
            poll_interval: Duration::from_millis(self.poll_ms),
            crd_recheck: Duration::from_millis(self.crd_recheck_ms),
            revalidate_established: self.established == "revalidate",
            audit_all: self.audit,
            datapath_config: netpol_common::Config {
                ct_tcp_ns: self.ct_tcp_timeout.saturating_mul(1_000_000_000),
                ct_tcp_closing_ns: 0,
                ct_udp_ns: self.ct_udp_timeout.saturating_mul(1_000_000_000),
                ct_other_ns: self.ct_other_timeout.saturating_mul(1_000_000_000),
                _reserved: 0,
                flow_cache_ticks: 0,
            },
            log_denied: self.log_denied,
            flow_cache: self.flow_cache == "on",
            attach: self.attach.parse().expect("clap checked the value"),
            bpf_debug: self.bpf_debug,
        }
    }
}

/// `--version`: the crate's version and, when built from a git checkout, the commit.
fn version() -> &'static str {
    Box::leak(netpol_daemon::metrics::build_info::long_version().into_boxed_str())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Set on SIGTERM or SIGINT (the handler only stores; a thread passes it on).
fn stop_on_signal() -> Arc<AtomicBool> {
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::SeqCst) {
            s2.store(true, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    });
    stop
}

/// glibc gives each thread that allocates an arena of its own (up to 8 per core), and memory
/// freed in one is not reused by another: the watchers, the metrics server and the main loop
/// each kept several MiB of their own. One arena is plenty for a daemon whose allocations are
/// not contended (measured with `netpol-bench kube` at 10,000 pods and 2,000 policies, peak
/// RSS: 65-69 MiB with glibc's default, 62-65 MiB with 2 arenas, 57 MiB with 1; the latency of
/// a change the same). `MALLOC_ARENA_MAX` in the environment still decides when set.
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
}

fn main() {
    limit_malloc_arenas();
    let cli = Cli::parse();
    init_logging(cli.log_format, matches!(&cli.cmd, Cmd::Run(args) if args.bpf_debug));
    match cli.cmd {
        Cmd::Explain { manifests, from, to, port, protocol, output } => {
            let output = netpol_daemon::cli::Output::parse(&output).expect("clap checked the value");
            match netpol_daemon::cli::explain(manifests.as_deref(), &from, &to, port, &protocol, output) {
                Ok((allowed, text)) => {
                    print!("{text}");
                    std::process::exit(if allowed { 0 } else { 3 });
                }
                Err(e) => {
                    eprintln!("netpol-daemon explain: {e:#}");
                    std::process::exit(2);
                }
            }
        }
        Cmd::Check { manifests, output } => {
            let output = netpol_daemon::cli::Output::parse(&output).expect("clap checked the value");
            match netpol_daemon::cli::check(manifests.as_deref(), output) {
                Ok((errors, text)) => {
                    print!("{text}");
                    std::process::exit(if errors == 0 { 0 } else { 1 });
                }
                Err(e) => {
                    eprintln!("netpol-daemon check: {e:#}");
                    std::process::exit(2);
                }
            }
        }
        Cmd::Observe(args) => match args.run() {
            Ok(netpol_daemon::cli::observe::Ended::OutputClosed) => {}
            Ok(netpol_daemon::cli::observe::Ended::ByDaemon) => {
                eprintln!("netpol-daemon observe: the daemon closed the stream");
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("netpol-daemon observe: {e:#}");
                std::process::exit(2);
            }
        },
        Cmd::Uninstall { bpffs } => match netpol_daemon::datapath::Datapath::uninstall(&bpffs) {
            Ok(filters) => println!("netpol-daemon uninstall: pins under {} removed, {filters} tc filters deleted", bpffs.display()),
            Err(e) => {
                eprintln!("netpol-daemon: {e:#}");
                std::process::exit(1);
            }
        },
        Cmd::Status { bpffs, pod, ip, ifname, output } => {
            let report = netpol_daemon::cli::status_select(pod.as_deref(), ip, ifname.as_deref()).and_then(|sel| {
                netpol_daemon::cli::status(
                    &bpffs,
                    sel.as_ref(),
                    netpol_daemon::cli::Output::parse(&output).expect("clap checked the value"),
                )
            });
            match report {
                Ok(text) => print!("{text}"),
                Err(e) => {
                    eprintln!("netpol-daemon status: {e:#}");
                    std::process::exit(1);
                }
            }
        }
        Cmd::Run(args) => {
            let stop = stop_on_signal();
            if let Err(e) = netpol_daemon::daemon::run(args.config(), stop) {
                eprintln!("netpol-daemon: {e:#}");
                std::process::exit(1);
            }
        }
    }
}

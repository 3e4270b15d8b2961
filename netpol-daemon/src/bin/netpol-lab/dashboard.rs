//! `netpol-lab dashboard`: the demo's lab with its policies and traffic running (the demo's
//! allowed and denied probes, over and over, and a policy edited now and then so that the
//! daemon programs changes), Prometheus scraping the lab's daemon every 2 s (inside the node
//! namespace, on loopback, with a temporary data directory), and the dashboard preview page
//! (deploy/grafana/preview, served by Prometheus itself as its user assets, so that the page
//! and the query API share one origin) screenshotted by headless Chromium in the same
//! namespace. `cargo xtask dashboard` installs the tools and runs it. Prometheus and Chromium
//! are stopped, and the lab removed, on every way out.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netpol_daemon::testkit::lab::{in_netns, Lab};

/// Prometheus' address in the node namespace.
const PROMETHEUS: &str = "127.0.0.1:9090";
/// The scrape interval, and the preview's step.
const SCRAPE_SECONDS: u64 = 2;

#[derive(clap::Args)]
pub struct Args {
    /// The prometheus binary.
    #[arg(long)]
    prometheus: PathBuf,
    /// The chromium binary.
    #[arg(long, default_value = "/usr/bin/chromium")]
    chromium: PathBuf,
    /// The preview page's files: index.html, preview.mjs, chart.umd.js, netpol-dashboard.json.
    #[arg(long)]
    assets: PathBuf,
    /// Where to write the screenshot (PNG).
    #[arg(long)]
    out: PathBuf,
    /// How long the traffic runs, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The page's width in pixels.
    #[arg(long, default_value_t = 1400)]
    width: u32,
}

/// A process started in the node namespace, killed and reaped when dropped.
struct Started(Child, &'static str);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        eprintln!("{} stopped", self.1);
    }
}

fn in_node(lab: &Lab, program: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/var/run/netns/{}", lab.node_netns)).arg(program);
    c
}

/// GET `path` from Prometheus in the node namespace: (status, body). As HTTP/1.0, which
/// Prometheus answers unchunked.
fn prometheus_get(lab: &Lab, path: &str) -> Result<(u16, String)> {
    let addr: SocketAddr = PROMETHEUS.parse()?;
    let path = path.to_string();
    Ok(in_netns(&lab.node_netns, move || http10_get(addr, &path))??)
}

fn http10_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// Starts Prometheus scraping the lab's daemon; waits until it is ready.
fn start_prometheus(lab: &Lab, args: &Args, data: &Path) -> Result<Started> {
    let config = data.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: {SCRAPE_SECONDS}s, evaluation_interval: {SCRAPE_SECONDS}s}}\nscrape_configs:\n  - job_name: netpol\n    honor_labels: true\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n        labels: {{node: {}}}\n",
            netpol_daemon::testkit::lab::METRICS_PORT,
            netpol_daemon::testkit::lab::NODE_NAME
        ),
    )?;
    let log = std::fs::File::create(data.join("prometheus.log"))?;
    let child = in_node(lab, &args.prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data.join("tsdb").display()))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .arg(format!("--web.user-assets={}", args.assets.display()))
        .arg("--log.level=warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting prometheus")?;
    let started = Started(child, "prometheus");
    let t0 = Instant::now();
    while !matches!(prometheus_get(lab, "/-/ready"), Ok((200, _))) {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("prometheus not ready after 30 s:\n{}", std::fs::read_to_string(data.join("prometheus.log")).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(started)
}

/// The demo's probes, round after round for `seconds`, and every 15 s a policy edited (a
/// port added to the UI's rule, then taken out again): the daemon programs a change.
fn traffic(lab: &Lab, seconds: u64) -> Result<usize> {
    let t0 = Instant::now();
    let (mut rounds, mut edits) = (0, 0);
    while t0.elapsed() < Duration::from_secs(seconds) {
        super::measure(lab);
        rounds += 1;
        if t0.elapsed() > Duration::from_secs(15 * (edits + 1)) {
            edits += 1;
            let policies = if edits % 2 == 1 {
                super::POLICIES.replace("port: 3000}", "port: 3000}, {protocol: TCP, port: 3001}")
            } else {
                super::POLICIES.to_string()
            };
            lab.apply("policies.yaml", &policies)?;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("traffic: {rounds} rounds of {} probes, {edits} policy edits", super::PROBES.len());
    Ok(rounds)
}

/// A Prometheus query's result count (the data is really there before the picture is taken).
fn series(lab: &Lab, query: &str) -> Result<usize> {
    let q: String = query.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
    let (code, body) = prometheus_get(lab, &format!("/api/v1/query?query={q}"))?;
    let v: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("{code}: {body}"))?;
    Ok(v["data"]["result"].as_array().map_or(0, Vec::len))
}

/// The page's height for the dashboard's grid (30 px rows, 8 px margins) and its header.
fn page_height(assets: &Path) -> Result<u32> {
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(assets.join("netpol-dashboard.json"))?)?;
    let bottom = d["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["gridPos"]["y"].as_u64().unwrap_or(0) + p["gridPos"]["h"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0);
    Ok((bottom * 38 + 8 + 44) as u32)
}

/// Runs headless Chromium on the page in the node namespace, with `extra` arguments; its
/// standard output. Killed after 90 s.
fn chromium(lab: &Lab, args: &Args, url: &str, height: u32, extra: &[String], profile: &Path) -> Result<String> {
    let mut child = in_node(lab, &args.chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--disable-extensions"])
        .arg("--disable-background-networking")
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--window-size={},{height}", args.width))
        .arg("--virtual-time-budget=30000")
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting chromium")?;
    let t0 = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().expect("piped"), &mut out)?;
    Ok(out)
}

pub fn run(daemon: PathBuf, args: Args) -> Result<()> {
    let mut lab = Lab::new()?;
    super::build(&mut lab)?;
    // Denials and audits reported as flow events too (the dashboard's flow events panel).
    lab.daemon_args.extend(["--log-denied".to_string(), "100".to_string()]);
    lab.start_daemon(&daemon)?;
    lab.apply("policies.yaml", super::POLICIES)?;
    let data = lab.dir.join("dashboard");
    std::fs::create_dir_all(&data)?;
    let prom = start_prometheus(&lab, &args, &data)?;
    eprintln!("prometheus scraping the lab's daemon every {SCRAPE_SECONDS} s; traffic for {} s", args.seconds);
    let start = now() - 2 * SCRAPE_SECONDS;
    traffic(&lab, args.seconds)?;
    // Two more scrapes, so that the last rates are in.
    std::thread::sleep(Duration::from_secs(2 * SCRAPE_SECONDS + 1));
    let end = now();
    for q in [
        "rate(netpol_packets_total{verdict=\"allow\"}[10s]) > 0",
        "rate(netpol_packets_total{verdict=\"deny\"}[10s]) > 0",
        "netpol_programming_latency_seconds_count > 0",
    ] {
        let n = series(&lab, q)?;
        if n == 0 {
            bail!("prometheus has no data for {q}");
        }
        eprintln!("prometheus: {n} series for {q}");
    }
    let url = format!("http://{PROMETHEUS}/user/index.html?from={start}&to={end}&step={SCRAPE_SECONDS}&rate={}s", 4 * SCRAPE_SECONDS);
    let height = page_height(&args.assets)?;
    let profile = data.join("chromium");
    // First the document, to see that every panel was drawn without an error.
    let dom = chromium(&lab, &args, &url, height, &["--dump-dom".into()], &profile)?;
    if !dom.contains("<title>rendered</title>") {
        let failures = dom.split("data-failures=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("");
        bail!("the preview page did not render: {failures}\n{}", &dom[..dom.len().min(2000)]);
    }
    let out = std::path::absolute(&args.out)?;
    chromium(&lab, &args, &url, height, &[format!("--screenshot={}", out.display())], &profile)?;
    drop(prom);
    let size = std::fs::metadata(&out).with_context(|| format!("chromium wrote no {}", out.display()))?.len();
    eprintln!("wrote {} ({} KB, {}x{height})", out.display(), size / 1024, args.width);
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

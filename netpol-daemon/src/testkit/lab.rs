//! A network-namespace lab: one "node" namespace and, per pod, a namespace joined to it by a
//! veth pair with a /32 host route on the node side and, on the pod side, a default route via
//! the gateway address held by the host-side veth (the ptp CNI plugin's wiring, as in kind). Servers
//! and probes run in-process on threads that enter the namespaces. Everything created is named
//! after this process and lab number, registered for cleanup, and removed on drop, on
//! [`cleanup_all`] (Ctrl-C) and by the next lab if this process died.
use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

mod craft;
mod daemon;
mod manifest;
use manifest::json_map;
mod node;
mod observe;
mod probe;
mod sctp;
mod serve;
pub use craft::Capture;
pub use observe::Observer;
pub use probe::{probe_tcp, probe_udp, reach_tcp, reach_udp, resolve, Reach};

pub const NODE_NAME: &str = "lab-node";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
pub const METRICS_PORT: u16 = 9977;
/// Address of every host-side veth (the pods' gateway), as the ptp CNI plugin does.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// Bridge-mode pods (the bridge plugin, flannel): one /24 on a Linux bridge in the node
/// namespace holding this gateway address; their veths are its ports.
pub const BRIDGE_GW: Ipv4Addr = Ipv4Addr::new(10, 245, 0, 1);
/// The IPv6 gateway on every host-side veth of a dual-stack pod.
pub const GATEWAY_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 1);
const NETNS_PREFIX: &str = "netpol-lab-";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// What must be removed if the process is interrupted.
#[derive(Default)]
struct Registry {
    netns: Vec<String>,
    dirs: Vec<PathBuf>,
    children: Vec<u32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { netns: Vec::new(), dirs: Vec::new(), children: Vec::new() });

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn delete_netns(name: &str) {
    let _ = Command::new("ip").args(["netns", "delete", name]).stderr(Stdio::null()).status();
}

/// Removes everything every live lab of this process created (for a Ctrl-C handler).
pub fn cleanup_all() {
    let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    for pid in reg.children.drain(..) {
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    for ns in reg.netns.drain(..) {
        delete_netns(&ns);
    }
    for d in reg.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// Removes labs left behind by processes that no longer exist.
fn reap_stale() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            delete_netns(&name);
            let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/{NETNS_PREFIX}{rest}"));
        }
    }
}

/// Runs `f` on a thread inside network namespace `netns`.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || -> Result<T> {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("thread in {netns} panicked"))?
}

#[derive(Clone, Debug)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: &'static str,
}

#[derive(Clone, Debug)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    pub netns: String,
    pub host_if: String,
    pub ip: Ipv4Addr,
    /// Second address of a dual-stack pod.
    pub ip6: Option<Ipv6Addr>,
    pub labels: BTreeMap<String, String>,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
    pub named: Vec<NamedPort>,
    /// Written into the manifests as a Pod (false: a host outside the cluster).
    pub declared: bool,
    /// Its address is in the Pod's status (false: scheduled and wired, IP not reported yet).
    pub ip_reported: bool,
}

impl LabPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

pub struct Lab {
    pub id: String,
    pub node_netns: String,
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    pub pods: Vec<LabPod>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    daemon: Option<Child>,
    /// Other processes started in the lab (DNS servers), killed on drop.
    children: Vec<Child>,
    /// Service manifests (ClusterIP services emulated with nftables DNAT).
    services: Vec<String>,
    /// Node manifests ([`Lab::add_node`]), for ClusterNetworkPolicy `nodes` peers.
    nodes: Vec<String>,
    next_if: u32,
    has_bridge: bool,
    /// Added to `netpol-daemon run`'s arguments (`--attach tc`).
    pub daemon_args: Vec<String>,
}

impl Lab {
    /// Creates the node namespace. Needs root.
    pub fn new() -> Result<Lab> {
        if unsafe { libc::geteuid() } != 0 {
            bail!("the netns lab needs root (network namespaces, veth, BPF)");
        }
        reap_stale();
        let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let node_netns = format!("{NETNS_PREFIX}{id}-node");
        let dir = std::env::temp_dir().join(format!("{NETNS_PREFIX}{id}"));
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{NETNS_PREFIX}{id}"));
        {
            let mut reg = REGISTRY.lock().unwrap();
            reg.netns.push(node_netns.clone());
            reg.dirs.push(dir.clone());
            reg.dirs.push(pin_dir.clone());
        }
        let lab = Lab {
            id,
            node_netns: node_netns.clone(),
            dir: dir.clone(),
            pin_dir,
            pods: Vec::new(),
            namespaces: BTreeMap::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            daemon: None,
            children: Vec::new(),
            services: Vec::new(),
            nodes: Vec::new(),
            next_if: 0,
            has_bridge: false,
            daemon_args: Vec::new(),
        };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("manifests"))?;
        run("ip", &["netns", "add", &node_netns])?;
        let n = node_netns.as_str();
        run("ip", &["-n", n, "link", "set", "lo", "up"])?;
        // The node's own address (what kubelet probes come from).
        run("ip", &["-n", n, "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        run("ip", &["netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        Ok(lab)
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    pub fn add_namespace(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.namespaces.insert(name.to_string(), labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    }

    /// Adds a pod (or, with `declared` false, an outside host) wired like a CNI would.
    pub fn add_pod(
        &mut self,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
        labels: &[(&str, &str)],
        tcp: &[u16],
        udp: &[u16],
    ) -> Result<usize> {
        self.add_endpoint(namespace, name, ip, labels, tcp, udp, true, false)
    }

    /// Adds a pod wired like the bridge CNI plugin: its veth is a port of the node's bridge,
    /// its address in the bridge's 10.245.0.0/24 (no host route of its own).
    pub fn add_bridge_pod(
        &mut self,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
        labels: &[(&str, &str)],
        tcp: &[u16],
        udp: &[u16],
    ) -> Result<usize> {
        self.add_endpoint(namespace, name, ip, labels, tcp, udp, true, true)
    }

    pub fn add_external(&mut self, name: &str, ip: Ipv4Addr) -> Result<usize> {
        self.add_external_serving(name, ip, &[], &[])
    }

    /// An outside host (not in the manifests) with TCP and UDP servers, e.g. another node
    /// whose host-network pods serve there.
    pub fn add_external_serving(&mut self, name: &str, ip: Ipv4Addr, tcp: &[u16], udp: &[u16]) -> Result<usize> {
        self.add_endpoint("external", name, ip, &[], tcp, udp, false, false)
    }

    /// The node's bridge (created on first use).
    fn bridge(&mut self) -> Result<String> {
        let (pid, lab) = self.id.split_once('-').unwrap_or((&self.id, "0"));
        let br = format!("nb{:x}{lab}", pid.parse::<u32>().unwrap_or(0));
        if !self.has_bridge {
            let n = self.node_netns.as_str();
            run("ip", &["-n", n, "link", "add", &br, "type", "bridge"])?;
            run("ip", &["-n", n, "addr", "add", &format!("{BRIDGE_GW}/24"), "dev", &br])?;
            run("ip", &["-n", n, "link", "set", &br, "up"])?;
            self.has_bridge = true;
        }
        Ok(br)
    }

    #[allow(clippy::too_many_arguments)]
    fn add_endpoint(
        &mut self,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
        labels: &[(&str, &str)],
        tcp: &[u16],
        udp: &[u16],
        declared: bool,
        bridged: bool,
    ) -> Result<usize> {
        let idx = self.next_if;
        self.next_if += 1;
        let netns = format!("{NETNS_PREFIX}{}-p{idx}", self.id);
        // Interface names are at most 15 bytes: "np" + pid (hex) + lab + index.
        let (pid, lab) = self.id.split_once('-').unwrap_or((&self.id, "0"));
        let host_if = format!("np{:x}{lab}x{idx}", pid.parse::<u32>().unwrap_or(0));
        if host_if.len() > 15 {
            bail!("interface name {host_if} too long");
        }
        REGISTRY.lock().unwrap().netns.push(netns.clone());
        let node = self.node_netns.as_str();
        run("ip", &["netns", "add", &netns])?;
        run("ip", &["-n", node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        let p = netns.as_str();
        run("ip", &["-n", p, "link", "set", "lo", "up"])?;
        if bridged {
            // Bridge wiring: the pod is on the bridge's subnet, the bridge is its gateway.
            let br = self.bridge()?;
            let node = self.node_netns.as_str();
            run("ip", &["-n", p, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            run("ip", &["-n", p, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", p, "route", "add", "default", "via", &BRIDGE_GW.to_string(), "dev", "eth0"])?;
            run("ip", &["-n", node, "link", "set", &host_if, "master", &br])?;
            run("ip", &["-n", node, "link", "set", &host_if, "up"])?;
        } else {
            run("ip", &["-n", p, "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            run("ip", &["-n", p, "link", "set", "eth0", "up"])?;
            // ptp wiring: the host side holds the gateway address, the pod routes everything to it.
            let gw = GATEWAY_IP.to_string();
            run("ip", &["-n", p, "route", "add", &gw, "dev", "eth0", "scope", "link"])?;
            run("ip", &["-n", p, "route", "add", "default", "via", &gw, "dev", "eth0"])?;
            run("ip", &["-n", node, "addr", "add", &format!("{gw}/32"), "dev", &host_if])?;
            run("ip", &["-n", node, "link", "set", &host_if, "up"])?;
            run("ip", &["-n", node, "route", "add", &format!("{ip}/32"), "dev", &host_if, "src", &gw])?;
        }
        self.pods.push(LabPod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            netns,
            host_if,
            ip,
            ip6: None,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            tcp: tcp.to_vec(),
            udp: udp.to_vec(),
            named: Vec::new(),
            declared,
            ip_reported: true,
        });
        let i = self.pods.len() - 1;
        self.serve(i, IpAddr::V4(ip))?;
        Ok(i)
    }

    /// Makes a pod dual-stack: an IPv6 address on its eth0, a /128 host route to it through
    /// its veth (as ptp and Calico do), its servers listening on it too.
    pub fn add_ipv6(&mut self, key: &str, ip6: Ipv6Addr) -> Result<()> {
        let i = self.pods.iter().position(|p| p.key() == key || p.name == key).ok_or_else(|| anyhow!("no pod {key}"))?;
        let (node, p, host_if) = (self.node_netns.clone(), self.pods[i].netns.clone(), self.pods[i].host_if.clone());
        let (node, p) = (node.as_str(), p.as_str());
        let gw = GATEWAY_IP6.to_string();
        run("ip", &["netns", "exec", node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        run("ip", &["-n", p, "-6", "addr", "add", &format!("{ip6}/128"), "dev", "eth0", "nodad"])?;
        run("ip", &["-n", p, "-6", "route", "add", &gw, "dev", "eth0"])?;
        run("ip", &["-n", p, "-6", "route", "add", "default", "via", &gw, "dev", "eth0"])?;
        run("ip", &["-n", node, "-6", "addr", "add", &format!("{gw}/128"), "dev", &host_if, "nodad"])?;
        run("ip", &["-n", node, "-6", "route", "add", &format!("{ip6}/128"), "dev", &host_if])?;
        self.pods[i].ip6 = Some(ip6);
        // Link-local addresses finish duplicate address detection (about a second) before
        // neighbour discovery on the link is reliable.
        let deadline = Instant::now() + Duration::from_secs(5);
        for ns in [node, p] {
            while Instant::now() < deadline {
                let out = Command::new("ip").args(["-n", ns, "-6", "addr", "show", "tentative"]).output()?;
                if out.stdout.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.serve(i, IpAddr::V6(ip6))
    }

    /// Removes a pod as the kubelet and CNI would: its network namespace and veth pair go away
    /// (call `write_cluster_manifest` to drop it from the manifests).
    pub fn remove_pod(&mut self, key: &str) -> Result<()> {
        let i = self.pods.iter().position(|p| p.key() == key).ok_or_else(|| anyhow::anyhow!("no pod {key}"))?;
        let pod = self.pods.remove(i);
        run("ip", &["netns", "delete", &pod.netns])?;
        REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).netns.retain(|n| *n != pod.netns);
        Ok(())
    }

    /// Sets whether a pod's address is reported in its status (call `write_cluster_manifest`).
    pub fn set_ip_reported(&mut self, key: &str, reported: bool) {
        if let Some(p) = self.pods.iter_mut().find(|p| p.key() == key) {
            p.ip_reported = reported;
        }
    }

    /// The interfaces of the node namespace.
    pub fn node_interfaces(&self) -> Result<Vec<String>> {
        let out = Command::new("ip").args(["-n", &self.node_netns, "-o", "link", "show"]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n).to_string()))
            .collect())
    }

    /// The daemon's process id.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    /// Adds a named container port to a pod's manifest (the server must be one of its ports).
    pub fn name_port(&mut self, pod: usize, name: &str, port: u16, protocol: &'static str) {
        self.pods[pod].named.push(NamedPort { name: name.to_string(), port, protocol });
    }

    pub fn pod(&self, key: &str) -> &LabPod {
        self.pods.iter().find(|p| p.key() == key || p.name == key).unwrap_or_else(|| panic!("no lab pod {key}"))
    }

    /// Starts a program inside a pod's network namespace (killed when the lab goes).
    pub fn spawn_in(&mut self, pod: &str, program: &str, args: &[&str]) -> Result<()> {
        let ns = self.pod(pod).netns.clone();
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{ns}"))
            .arg(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program} in {pod}"))?;
        REGISTRY.lock().unwrap().children.push(child.id());
        self.children.push(child);
        Ok(())
    }

    /// A ClusterIP service as kube-proxy makes it: nftables DNAT in the node namespace from
    /// `cluster_ip:port` to the backend pod's `target` port, and the Service manifest (written
    /// with the cluster manifest). `ports` are (protocol "tcp"/"udp", port, target, port name).
    pub fn add_cluster_ip(
        &mut self,
        namespace: &str,
        name: &str,
        cluster_ip: Ipv4Addr,
        backend: &str,
        selector: &[(&str, &str)],
        ports: &[(&str, u16, u16, &str)],
    ) -> Result<()> {
        let b = self.pod(backend).ip;
        let node = self.node_netns.clone();
        let mut script = String::from("add table ip netpol_lab\nadd chain ip netpol_lab pre { type nat hook prerouting priority -100; }\n");
        for (proto, port, target, _) in ports {
            script.push_str(&format!("add rule ip netpol_lab pre ip daddr {cluster_ip} {proto} dport {port} dnat to {b}:{target}\n"));
        }
        let f = self.dir.join(format!("nft-{name}.nft"));
        std::fs::write(&f, script)?;
        run("ip", &["netns", "exec", &node, "nft", "-f", &f.to_string_lossy()])?;
        let sel: BTreeMap<String, String> = selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let ps: Vec<String> = ports
            .iter()
            .map(|(proto, port, _, pname)| {
                format!(
                    "{{\"name\": \"{pname}\", \"protocol\": \"{}\", \"port\": {port}, \"targetPort\": \"{pname}\"}}",
                    proto.to_uppercase()
                )
            })
            .collect();
        self.services.push(format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  clusterIP: {cluster_ip}\n  selector: {}\n  ports: [{}]\n",
            json_map(&sel),
            ps.join(", ")
        ));
        Ok(())
    }

    /// Writes (atomically, by rename) a manifest file into the daemon's directory.
    pub fn write_manifest(&self, name: &str, text: &str) -> Result<()> {
        let dir = self.manifests_dir();
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(())
    }

    pub fn remove_manifest(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.manifests_dir().join(name))?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = &self.daemon {
            let pid = c.id();
            REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).children.retain(|p| *p != pid);
        }
        self.kill_daemon();
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in self.servers.drain(..) {
            let _ = h.join();
        }
        let mut names: Vec<String> = self.pods.iter().map(|p| p.netns.clone()).collect();
        names.push(self.node_netns.clone());
        for ns in &names {
            delete_netns(ns);
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if std::env::var_os("NETPOL_KEEP_LAB_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        reg.netns.retain(|n| !names.contains(n));
        reg.dirs.retain(|d| *d != self.dir && *d != self.pin_dir);
    }
}

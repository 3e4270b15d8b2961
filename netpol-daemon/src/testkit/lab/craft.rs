//! Crafted frames for the attack tests: a pod that does not cooperate writes its own frames
//! (any source, any tag, any flags) with scapy, and a sniffer on the far side reports what
//! arrived. Both run as Python processes entered into the lab's network namespaces with
//! `nsenter --net=` (not `ip netns exec`, whose private mount namespace would hide nothing
//! here but costs a mount per call). Debian's python3 with its python3-scapy package, so that
//! another python3 earlier on PATH cannot lack it.
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::{Lab, GATEWAY_IP, GATEWAY_IP6, NODE_IP};

/// Imports scapy quietly (its import warns about missing optional tools).
const PRELUDE: &str = "import sys, logging\nlogging.getLogger('scapy').setLevel(logging.ERROR)\nfrom scapy.all import *\nconf.verb = 0\n";

/// A sniffer on one interface of one namespace, counting frames that carry a marker.
pub struct Capture {
    child: Child,
    stdout: BufReader<ChildStdout>,
    what: String,
}

impl Capture {
    /// Waits a moment for frames in flight, stops the sniffer and returns how many frames
    /// containing the marker it saw.
    pub fn count(mut self) -> usize {
        std::thread::sleep(Duration::from_millis(300));
        // Closing stdin tells the sniffer to stop and print its count.
        drop(self.child.stdin.take());
        let mut out = String::new();
        let _ = self.stdout.read_to_string(&mut out);
        let _ = self.child.wait();
        out.trim()
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("capture on {}: no count in {out:?}", self.what))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python_in(netns: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/var/run/netns/{netns}")).args(["/usr/bin/python3", "-c"]);
    c
}

/// The MAC address of `ifname` in `netns`.
fn mac_of(netns: &str, ifname: &str) -> Result<String> {
    let out = Command::new("ip").args(["-n", netns, "-o", "link", "show", "dev", ifname]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .ok_or_else(|| anyhow!("no MAC for {ifname} in {netns}: {text}"))?;
    Ok(mac.to_string())
}

impl Lab {
    /// Runs scapy code in a pod's namespace and returns what it printed. Defined for the code:
    /// `IFACE` (the pod's eth0), `MAC` (its MAC), `GW_MAC` (the node side of its link),
    /// `MY_IP`/`MY_IP6` (its addresses; `MY_IP6` is None on a single-stack pod), `GW_IP`,
    /// `GW_IP6`, `NODE_IP`, and `tx(pkt, count=1)`, which sends `Ether(src=MAC,
    /// dst=GW_MAC)/pkt` on the pod's interface.
    pub fn scapy(&self, pod: &str, code: &str) -> Result<String> {
        let p = self.pod(pod).clone();
        let gw_mac = self.gateway_mac(pod)?;
        let my6 = p.ip6.map(|a| format!("'{a}'")).unwrap_or_else(|| "None".into());
        let script = format!(
            "{PRELUDE}IFACE = 'eth0'\nMAC = get_if_hwaddr(IFACE)\nGW_MAC = '{gw_mac}'\nMY_IP = '{}'\nMY_IP6 = {my6}\nGW_IP = '{GATEWAY_IP}'\nGW_IP6 = '{GATEWAY_IP6}'\nNODE_IP = '{NODE_IP}'\ndef tx(pkt, count=1):\n    sendp(Ether(src=MAC, dst=GW_MAC)/pkt, iface=IFACE, count=count)\n{code}\n",
            p.ip
        );
        let out = python_in(&p.netns)
            .arg(&script)
            .output()
            .context("running /usr/bin/python3 (python3-scapy is installed by `cargo xtask setup`)")?;
        if !out.status.success() {
            bail!("scapy in {pod} failed: {}\n--- script ---\n{script}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts sniffing on a pod's eth0 for frames whose bytes contain `marker`; returns once
    /// the sniffer is running.
    pub fn capture(&self, pod: &str, marker: &str) -> Result<Capture> {
        let netns = self.pod(pod).netns.clone();
        capture_in(&netns, Some("eth0"), marker, pod)
    }

    /// Sniffs every interface of the node namespace (what got past a pod's host-side veth).
    pub fn capture_node(&self, marker: &str) -> Result<Capture> {
        capture_in(&self.node_netns, None, marker, "node")
    }

    /// The destination MAC a pod's frames to its gateway carry: the host side of its veth (or
    /// the bridge, for bridge-mode pods).
    fn gateway_mac(&self, pod: &str) -> Result<String> {
        let p = self.pod(pod);
        let master = Command::new("ip").args(["-n", &self.node_netns, "-o", "link", "show", "dev", &p.host_if]).output()?;
        let text = String::from_utf8_lossy(&master.stdout).to_string();
        match text.split_whitespace().skip_while(|w| *w != "master").nth(1) {
            Some(br) => mac_of(&self.node_netns, br),
            None => mac_of(&self.node_netns, &p.host_if),
        }
    }
}

fn capture_in(netns: &str, iface: Option<&str>, marker: &str, what: &str) -> Result<Capture> {
    if marker.contains('\'') || marker.contains('\\') {
        bail!("marker {marker:?}: no quotes or backslashes");
    }
    let iface = iface.map(|i| format!("'{i}'")).unwrap_or_else(|| "[i for i in get_if_list() if i != 'lo']".into());
    // Counts in the callback (no packet list kept) the frames that arrive: not sent from one of
    // the namespace's own MACs (a pod's ICMP error quoting the frame carries the marker too).
    // Prints READY once the socket is open, the count when stdin closes.
    let script = format!(
        "{PRELUDE}n = [0]\nm = b'{marker}'\nown = set(get_if_hwaddr(i) for i in get_if_list())\ndef cb(p):\n    if m in bytes(p) and not (p.haslayer(Ether) and p[Ether].src in own):\n        n[0] += 1\nready = []\ns = AsyncSniffer(iface={iface}, prn=cb, store=False, started_callback=lambda: ready.append(1))\ns.start()\nimport time\nwhile not ready:\n    time.sleep(0.01)\nprint('READY', flush=True)\nsys.stdin.read()\ns.stop()\nprint(n[0], flush=True)\n"
    );
    let mut child = python_in(netns)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the sniffer (python3 with scapy)")?;
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    if line.trim() != "READY" {
        let _ = child.kill();
        bail!("sniffer in {what} did not start: {line:?}");
    }
    let _ = child.stdin.as_mut().map(|s| s.flush());
    Ok(Capture { child, stdout, what: what.to_string() })
}

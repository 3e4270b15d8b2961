//! Attacks on anti-spoofing, with crafted frames from a pod that does not cooperate (scapy in
//! its namespace) against the real daemon and programs; and the daemon refusing a bpffs whose
//! pins would die with it.
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netpol_daemon::testkit::lab::Lab;

mod common;
use common::*;

fn spoofed(lab: &Lab, pod: &str) -> f64 {
    packets(lab, "t", pod, "egress", "spoofed")
}

/// Sends `pkt` (scapy, from `from`) and returns how many frames carrying `marker` reached `to`.
fn arrives(lab: &Lab, from: &str, to: &str, marker: &str, pkt: &str) -> usize {
    let cap = lab.capture(to, marker).unwrap();
    lab.scapy(from, &format!("tx({pkt}/Raw(b'{marker}'), count=2)")).unwrap();
    cap.count()
}

/// Victim c lets in only b (UDP 4321). Attacker a, itself isolated by nothing, sends to c
/// with b's addresses and with the node's (which every ingress policy lets in, for kubelet's
/// probes): nothing arrives, and a's spoofed counter rises. Frames from a's own addresses
/// still go where policy allows (to d, which no policy isolates), spoofed ones to d do not.
#[test]
fn a_pod_cannot_pose_as_another_pod_or_the_node() {
    if !root() {
        return;
    }
    let mut lab = Lab::new().expect("creating the lab");
    lab.add_namespace("t", &[]);
    lab.add_pod("t", "a", ip("10.244.0.40"), &[("app", "a")], &[], &[]).unwrap();
    lab.add_pod("t", "b", ip("10.244.0.41"), &[("app", "b")], &[], &[]).unwrap();
    // c and d answer on 4321 (no ICMP error quoting the marker back).
    lab.add_pod("t", "c", ip("10.244.0.42"), &[("app", "c")], &[], &[4321]).unwrap();
    lab.add_pod("t", "d", ip("10.244.0.43"), &[("app", "d")], &[], &[4321]).unwrap();
    for (pod, addr) in [("a", "fd00:244::40"), ("b", "fd00:244::41"), ("c", "fd00:244::42"), ("d", "fd00:244::43")] {
        lab.add_ipv6(pod, addr.parse().unwrap()).unwrap();
    }
    lab.write_cluster_manifest().unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    lab.apply(
        "c.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: c, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: c}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: b}}}]\n    ports: [{port: 4321, protocol: UDP}]\n",
    )
    .unwrap();
    let udp = "UDP(sport=5555, dport=4321)";
    // The instrument: b's own frames reach c, a's own frames do not (policy).
    assert_eq!(arrives(&lab, "b", "c", "FROM-B-4", &format!("IP(src=MY_IP, dst='10.244.0.42')/{udp}")), 2, "b is allowed into c");
    assert_eq!(
        arrives(&lab, "b", "c", "FROM-B-6", &format!("IPv6(src=MY_IP6, dst='fd00:244::42')/{udp}")),
        2,
        "b is allowed into c (IPv6)"
    );
    assert_eq!(arrives(&lab, "a", "c", "FROM-A-4", &format!("IP(src=MY_IP, dst='10.244.0.42')/{udp}")), 0, "a is not allowed into c");

    let before = spoofed(&lab, "a");
    let mut got = Vec::new();
    for (what, pkt) in [
        ("b's IPv4", format!("IP(src='10.244.0.41', dst='10.244.0.42')/{udp}")),
        ("b's IPv6", format!("IPv6(src='fd00:244::41', dst='fd00:244::42')/{udp}")),
        // (The node's kernel itself drops IPv4 arriving with one of its local addresses as
        // source; IPv6 from the node's address got through before anti-spoofing.)
        ("the node's IPv4", format!("IP(src=NODE_IP, dst='10.244.0.42')/{udp}")),
        ("the node's IPv4 on the pod's link", format!("IP(src=GW_IP, dst='10.244.0.42')/{udp}")),
        ("the node's IPv6", format!("IPv6(src=GW_IP6, dst='fd00:244::42')/{udp}")),
        ("a TCP SYN from b's IPv4", "IP(src='10.244.0.41', dst='10.244.0.42')/TCP(sport=5555, dport=4321, flags='S')".to_string()),
    ] {
        let n = arrives(&lab, "a", "c", "SPOOFED-TO-C", &pkt);
        if n != 0 {
            got.push(format!("{what}: {n} frames reached c"));
        }
    }
    assert!(got.is_empty(), "{}\n{}", got.join("\n"), lab.daemon_log());
    // Two frames each, counted on a's side (a is not isolated).
    let rose = spoofed(&lab, "a") - before;
    assert!(rose >= 12.0, "a's spoofed counter rose by {rose}\n{}", lab.metrics().unwrap());

    // An ordinary pod no policy isolates, to a pod no policy isolates: its own addresses
    // pass, any other does not.
    assert_eq!(arrives(&lab, "a", "d", "OWN-TO-D", &format!("IP(src=MY_IP, dst='10.244.0.43')/{udp}")), 2);
    assert_eq!(arrives(&lab, "a", "d", "OWN6-TO-D", &format!("IPv6(src=MY_IP6, dst='fd00:244::43')/{udp}")), 2);
    assert_eq!(arrives(&lab, "a", "d", "SPOOF-TO-D", &format!("IP(src='10.244.0.99', dst='10.244.0.43')/{udp}")), 0);
    assert_eq!(arrives(&lab, "a", "d", "SPOOF6-TO-D", &format!("IPv6(src='fd00:244::99', dst='fd00:244::43')/{udp}")), 0);
    assert_eq!(
        arrives(&lab, "a", "d", "LL-TO-D", &format!("IPv6(src='fe80::1234', dst='fd00:244::43')/{udp}")),
        0,
        "link-local source, not neighbour discovery"
    );
    // Neighbour discovery still works (real IPv6 traffic resolves the gateway through it).
    assert!(lab.udp6("a", "d", 4321), "IPv6 from a's own address (ND included) flows");
    assert!(lab.udp("a", "d", 4321), "IPv4 from a's own address flows");
}

/// Waits for `child` to exit within `secs`; `None` if it still runs.
fn wait_exit(child: &mut std::process::Child, secs: u64) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn stderr_of(child: &mut std::process::Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// `ip netns exec` gives the daemon a private mount namespace whose /sys has no bpffs: the
/// pins it would make there vanish with it. It refuses, naming the way out; with
/// `--allow-private-bpffs` it starts. A private bpffs mounted under `unshare --mount` is
/// refused too; the host's, seen through `unshare --mount`, is not private.
#[test]
fn the_daemon_refuses_a_bpffs_private_to_its_mount_namespace() {
    if !root() {
        return;
    }
    let id = std::process::id();
    let ns = format!("npspoof{id}");
    let manifests = std::env::temp_dir().join(format!("npspoof-manifests-{id}"));
    std::fs::create_dir_all(&manifests).unwrap();
    let pin = format!("/sys/fs/bpf/netpol-spoof-test-{id}");
    assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
    struct Cleanup(String, std::path::PathBuf, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            let _ = std::fs::remove_dir_all(&self.1);
            let _ = std::fs::remove_dir_all(&self.2);
        }
    }
    let _cleanup = Cleanup(ns.clone(), manifests.clone(), pin.clone());
    let daemon_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> =
            vec![DAEMON.into(), "run".into(), "--node-name".into(), "n".into(), "--manifests".into(), manifests.display().to_string()];
        v.extend(["--metrics-addr".into(), "0.0.0.0:0".into(), "--bpffs".into(), pin.clone()]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let spawn = |prefix: &[&str], extra: &[&str]| {
        Command::new(prefix[0])
            .args(&prefix[1..])
            .args(daemon_args(extra))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // ip netns exec: refused.
    let mut c = spawn(&["ip", "netns", "exec", &ns], &[]);
    let st = wait_exit(&mut c, 20).unwrap_or_else(|| {
        let _ = c.kill();
        panic!("the daemon under `ip netns exec` did not exit")
    });
    let err = stderr_of(&mut c);
    assert!(!st.success(), "exit status {st}: {err}");
    assert!(err.contains("mount namespace of its own") && err.contains("--allow-private-bpffs"), "{err}");

    // A bpffs mounted privately under unshare --mount: refused (where PID 1's view can be
    // compared with: not in a sandbox that hides PID 1).
    let script = "mount -t bpf bpf /sys/fs/bpf && exec \"$@\"";
    if std::fs::metadata("/proc/1/root/sys").is_ok() {
        let mut c = spawn(&["unshare", "--mount", "sh", "-c", script, "sh"], &[]);
        let st = wait_exit(&mut c, 20).unwrap_or_else(|| {
            let _ = c.kill();
            panic!("the daemon under `unshare --mount` with a private bpffs did not exit")
        });
        let err = stderr_of(&mut c);
        assert!(!st.success() && err.contains("not the one PID 1 sees"), "exit status {st}: {err}");
    } else {
        eprintln!("PID 1's mounts are hidden here: the private-bpffs-under-unshare case is not checked");
    }

    // With the flag, it starts (and says what it allowed).
    let mut c = spawn(&["ip", "netns", "exec", &ns], &["--allow-private-bpffs"]);
    let still = wait_exit(&mut c, 4);
    let _ = c.kill();
    let _ = c.wait();
    let err = stderr_of(&mut c);
    assert!(still.is_none(), "the daemon with --allow-private-bpffs exited: {err}");
    assert!(err.contains("allowed by --allow-private-bpffs"), "{err}");
}

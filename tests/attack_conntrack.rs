//! Attacks on connection tracking from a pod that writes its own frames (scapy in its network
//! namespace), against the real daemon and programs: forged hairpin "replies" (TCP and UDP,
//! IPv4 and IPv6), ICMP errors quoting a tracked flow sent to someone else, and a blind RST
//! against a flow that `--established keep` keeps. Each asserts that the attack frame does
//! not arrive (or the flow survives) and that the deny counter saw the drop.
use std::path::Path;

use netpol_daemon::testkit::lab::Lab;

mod common;
use common::*;

fn denied(lab: &Lab, pod: &str, dir: &str) -> f64 {
    packets(lab, "t", pod, dir, "deny")
}

/// Pod a may send only to its own addresses; its ingress is open. It forges the victim's
/// "reply" to itself (which passes its egress, to its own address, and its open ingress),
/// then sends to the victim as if answering: nothing may arrive at the victim.
#[test]
fn forged_hairpin_replies_do_not_open_an_isolated_egress() {
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("t", &[]);
    lab.add_pod("t", "a", ip("10.244.0.50"), &[("app", "a")], &[], &[]).unwrap();
    lab.add_pod("t", "v", ip("10.244.0.51"), &[("app", "v")], &[80], &[80]).unwrap();
    lab.add_ipv6("a", "fd00:244::50".parse().unwrap()).unwrap();
    lab.add_ipv6("v", "fd00:244::51".parse().unwrap()).unwrap();
    lab.write_cluster_manifest().unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    wait_endpoints(&lab, 2, 20, "attack lab");
    lab.apply(
        "self-only.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: self-only, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.244.0.50/32}}, {ipBlock: {cidr: 'fd00:244::50/128'}}]\n",
    )
    .unwrap();
    assert!(!lab.udp("a", "v", 80), "a's egress to v is denied");
    let before = denied(&lab, "a", "egress");
    let cases = [
        (
            "udp4",
            "IP(src='10.244.0.51', dst=MY_IP)/UDP(sport=80, dport=5000)",
            "IP(src=MY_IP, dst='10.244.0.51')/UDP(sport=5000, dport=80)",
        ),
        (
            "tcp4",
            "IP(src='10.244.0.51', dst=MY_IP)/TCP(sport=80, dport=5001, flags='SA', seq=1000, ack=2000)",
            "IP(src=MY_IP, dst='10.244.0.51')/TCP(sport=5001, dport=80, flags='S', seq=1999)",
        ),
        (
            "tcp4-ack",
            "IP(src='10.244.0.51', dst=MY_IP)/TCP(sport=80, dport=5002, flags='A', seq=1000, ack=2000)",
            "IP(src=MY_IP, dst='10.244.0.51')/TCP(sport=5002, dport=80, flags='A', seq=2000, ack=1000)",
        ),
        (
            "udp6",
            "IPv6(src='fd00:244::51', dst=MY_IP6)/UDP(sport=80, dport=5003)",
            "IPv6(src=MY_IP6, dst='fd00:244::51')/UDP(sport=5003, dport=80)",
        ),
        (
            "tcp6",
            "IPv6(src='fd00:244::51', dst=MY_IP6)/TCP(sport=80, dport=5004, flags='SA', seq=1000, ack=2000)",
            "IPv6(src=MY_IP6, dst='fd00:244::51')/TCP(sport=5004, dport=80, flags='S', seq=1999)",
        ),
    ];
    // The attacker keeps its own kernel from answering the forged TCP "replies" with RSTs
    // (which would end the forged flow before the attack): its own netns, its own firewall.
    lab.scapy("a", "import os\nassert os.system(\"nft 'add table inet atk; add chain inet atk out { type filter hook output priority 0; }; add rule inet atk out tcp flags rst drop'\") == 0").unwrap();
    let mut arrived = Vec::new();
    for (what, forged, attack) in cases {
        let marker = format!("MARK-HAIRPIN-{what}");
        let cap = lab.capture("v", &marker).unwrap();
        let code = format!("import time\ntx({forged}/Raw(b'forged'))\ntime.sleep(0.2)\ntx({attack}/Raw(b'{marker}'), count=2)\n");
        lab.scapy("a", &code).unwrap();
        let n = cap.count();
        if n != 0 {
            arrived.push(format!("{what}: {n} frame(s) reached the victim"));
        }
    }
    assert!(arrived.is_empty(), "{}\n{}", arrived.join("\n"), lab.daemon_log());
    let after = denied(&lab, "a", "egress");
    assert!(after >= before + 10.0, "the attack frames were counted as denied: {before} -> {after}");
}

/// Pod a takes a query in from b (its ingress is open) but may send nothing (egress isolated,
/// no rule): an ICMP error quoting that flow may go back to b only, not to the victim.
#[test]
fn icmp_errors_quoting_a_tracked_flow_go_to_its_peer_only() {
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("t", &[]);
    lab.add_pod("t", "a", ip("10.244.0.60"), &[("app", "a")], &[], &[53]).unwrap();
    lab.add_pod("t", "b", ip("10.244.0.61"), &[("app", "b")], &[], &[]).unwrap();
    lab.add_pod("t", "v", ip("10.244.0.62"), &[("app", "v")], &[], &[]).unwrap();
    lab.write_cluster_manifest().unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    wait_endpoints(&lab, 3, 20, "attack lab");
    lab.apply(
        "no-egress.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: no-egress, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n",
    )
    .unwrap();
    // The flow in: b -> a:53 (a's answer passes as a reply).
    assert!(lab.udp("b", "a", 53), "b's query and a's reply");
    let before = denied(&lab, "a", "egress");
    let to_v = lab.capture("v", "MARK-ICMP-V").unwrap();
    let to_b = lab.capture("b", "MARK-ICMP-B").unwrap();
    // The quoted packet: the flow's own tuple as b sent it (the probe's port is unknown, so
    // send it from a fixed port first).
    lab.scapy("b", "tx(IP(src=MY_IP, dst='10.244.0.60')/UDP(sport=4444, dport=53)/Raw(b'q'))").unwrap();
    let quote = "IP(src='10.244.0.61', dst=MY_IP)/UDP(sport=4444, dport=53)";
    lab.scapy("a", &format!("tx(IP(src=MY_IP, dst='10.244.0.62')/ICMP(type=3, code=3)/{quote}/Raw(b'MARK-ICMP-V'), count=2)\ntx(IP(src=MY_IP, dst='10.244.0.61')/ICMP(type=3, code=3)/{quote}/Raw(b'MARK-ICMP-B'))")).unwrap();
    assert_eq!(to_v.count(), 0, "the error quoting b's flow reached the victim\n{}", lab.daemon_log());
    assert_eq!(to_b.count(), 1, "the error reaches the flow's peer");
    let after = denied(&lab, "a", "egress");
    assert!(after >= before + 2.0, "counted as denied: {before} -> {after}");
}

/// A flow allowed when it started and kept (`--established keep`) after the policy stopped
/// allowing new ones: a reset with a sequence number far from the connection's does not end
/// its tracking (the connection keeps working), and the drop is counted.
#[test]
fn a_blind_reset_does_not_end_a_kept_flow() {
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("t", &[]);
    lab.add_pod("t", "c", ip("10.244.0.70"), &[("app", "c")], &[], &[]).unwrap();
    lab.add_pod("t", "s", ip("10.244.0.71"), &[("app", "s")], &[8080], &[]).unwrap();
    lab.write_cluster_manifest().unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    wait_endpoints(&lab, 2, 20, "attack lab");
    let policy = |egress: &str| {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: c, namespace: t}}\nspec:\n  podSelector: {{matchLabels: {{app: c}}}}\n  policyTypes: [Ingress, Egress]\n{egress}")
    };
    lab.apply("c.yaml", &policy("  egress:\n  - to: [{ipBlock: {cidr: 10.244.0.71/32}}]\n    ports: [{port: 8080}]\n")).unwrap();
    let flag = std::env::temp_dir().join(format!("netpol-rst-go-{}", std::process::id()));
    let up = flag.with_extension("up");
    let _ = std::fs::remove_file(&flag);
    let _ = std::fs::remove_file(&up);
    // c connects and talks, waits for the policy change, resets blindly (its own tuple, a
    // sequence number 2^30 away), then talks again on the same connection.
    let code = format!(
        "import socket, time, os\ns = socket.create_connection(('10.244.0.71', 8080), timeout=3)\ns.sendall(b'one\\n')\nprint('first', s.recv(100))\nport = s.getsockname()[1]\nopen('{up}', 'w').close()\nwhile not os.path.exists('{}'):\n    time.sleep(0.05)\ntx(IP(src=MY_IP, dst='10.244.0.71')/TCP(sport=port, dport=8080, flags='R', seq=0x40000000), count=3)\ntime.sleep(0.3)\ntry:\n    s.sendall(b'two\\n')\n    print('second', s.recv(100))\nexcept Exception as e:\n    print('second failed', e)\n",
        flag.display(),
        up = up.display()
    );
    let out = std::thread::scope(|sc| {
        let h = sc.spawn(|| lab.scapy("c", &code));
        let t0 = std::time::Instant::now();
        while !up.exists() && t0.elapsed() < std::time::Duration::from_secs(15) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // No new connections to s any more; the tracked one is kept.
        lab.apply("c.yaml", &policy("")).unwrap();
        assert!(!lab.tcp("c", "s", 8080), "new connections are denied now");
        std::fs::write(&flag, b"go").unwrap();
        h.join().unwrap()
    });
    let _ = std::fs::remove_file(&flag);
    let _ = std::fs::remove_file(&up);
    let before_rst = out.unwrap();
    assert!(before_rst.contains("first b'"), "{before_rst}");
    assert!(before_rst.contains("second b'"), "the kept connection survives the blind RST: {before_rst}\n{}", lab.daemon_log());
    assert!(denied(&lab, "c", "egress") >= 3.0 + 1.0, "the resets (and the denied new connection) were counted");
}

/// The same forgery through a service: pod a is the backend of a ClusterIP service and may
/// reach itself (so its egress allows the service's address too). It forges
/// `victim:80 -> service IP`, which the node DNATs to `victim:80 -> a:5300` and routes back to
/// a: egress saw another tuple than ingress, but the frame came back through a's own
/// interface. a's "reply" to the victim must not get out.
#[test]
fn a_forged_reply_through_the_pods_own_service_does_not_open_its_egress() {
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("t", &[]);
    let a = lab.add_pod("t", "a", ip("10.244.0.80"), &[("app", "a")], &[], &[5300]).unwrap();
    lab.name_port(a, "p", 5300, "UDP");
    lab.add_pod("t", "v", ip("10.244.0.81"), &[("app", "v")], &[], &[80]).unwrap();
    lab.add_cluster_ip("t", "svc-a", ip("10.96.0.80"), "a", &[("app", "a")], &[("udp", 53, 5300, "p")]).unwrap();
    lab.write_cluster_manifest().unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    wait_endpoints(&lab, 2, 20, "attack lab");
    lab.apply(
        "self-only.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: self-only, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: a}}}]\n",
    )
    .unwrap();
    assert!(!lab.udp("a", "v", 80), "a's egress to v is denied");
    let before = denied(&lab, "a", "egress");
    let cap = lab.capture("v", "MARK-SVC").unwrap();
    lab.scapy(
        "a",
        "import time\ntx(IP(src='10.244.0.81', dst='10.96.0.80')/UDP(sport=80, dport=53)/Raw(b'forged'))\ntime.sleep(0.2)\ntx(IP(src=MY_IP, dst='10.244.0.81')/UDP(sport=5300, dport=80)/Raw(b'MARK-SVC'), count=2)\n",
    )
    .unwrap();
    assert_eq!(cap.count(), 0, "the forged flow's 'reply' reached the victim\n{}", lab.daemon_log());
    let after = denied(&lab, "a", "egress");
    assert!(after >= before + 2.0, "counted as denied: {before} -> {after}");
}

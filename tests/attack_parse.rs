//! Attack tests, parsing (rows 4, 5, 8 of the crafted-frames issue): a pod writes its own
//! frames with scapy (`Lab::scapy`) and a sniffer in the target pod counts what arrives.
//! Each test checks that the attack frame does not arrive (or that allowed traffic still
//! does) and that the daemon's counters saw the verdict.
use std::path::Path;

use netpol_daemon::metrics::sample;
use netpol_daemon::testkit::lab::Lab;

mod common;
use common::*;

fn early(lab: &Lab, pod: &str, direction: &str) -> f64 {
    let m = lab.metrics().unwrap();
    sample(&m, &format!("netpol_fragments_early_dropped_total{{namespace=\"t\",pod=\"{pod}\",direction=\"{direction}\"}}")).unwrap_or(-1.0)
}

/// Pods a (egress isolated: TCP 8080 and UDP 4321 to b only) and b (serving both), optionally
/// dual-stack; the daemon running.
fn two_pods(dual_stack: bool) -> Option<Lab> {
    let mut lab = lab()?;
    lab.add_namespace("t", &[]);
    lab.add_pod("t", "a", ip("10.244.0.40"), &[("app", "a")], &[], &[]).unwrap();
    lab.add_pod("t", "b", ip("10.244.0.41"), &[("app", "b")], &[8080, 8081], &[4321]).unwrap();
    if dual_stack {
        lab.add_ipv6("a", "fd00:244::40".parse().unwrap()).unwrap();
        lab.add_ipv6("b", "fd00:244::41".parse().unwrap()).unwrap();
    }
    lab.write_cluster_manifest().unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    lab.apply(
        "a.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: b}}}]\n    ports: [{port: 8080}, {port: 4321, protocol: UDP}]\n",
    )
    .unwrap();
    Some(lab)
}

/// Row 5: a double-tagged (802.1ad + 802.1Q, VID 0) frame is untagged by the kernel after TC
/// and its inner packet routed; the program must not pass it as "not IP". ARP (and so the
/// allowed connection) keeps working.
#[test]
fn vlan_tagged_frames_do_not_carry_packets_past_an_isolated_egress() {
    let Some(lab) = two_pods(false) else { return };
    assert!(lab.tcp("a", "b", 8080), "allowed traffic (and ARP) works");
    assert!(!lab.tcp("a", "b", 8081));
    let denied = packets(&lab, "t", "a", "egress", "deny");
    let at_b = lab.capture("b", "MARK-VLAN").unwrap();
    // UDP 9999 is not allowed; the same datagram untagged is denied too.
    lab.scapy(
        "a",
        "inner = IP(src=MY_IP, dst='10.244.0.41')/UDP(sport=1234, dport=9999)/Raw(b'MARK-VLAN')\n\
         tx(Dot1AD(vlan=0)/Dot1Q(vlan=0)/inner, count=3)\n\
         tx(Dot1Q(vlan=0)/inner, count=3)\n\
         tx(Dot1AD(vlan=0)/Dot1Q(vlan=0)/IP(src=MY_IP, dst='10.244.0.41')/UDP(sport=1234, dport=4321)/Raw(b'MARK-VLAN'), count=3)\n",
    )
    .unwrap();
    assert_eq!(at_b.count(), 0, "no tagged frame's packet reaches b");
    let now = packets(&lab, "t", "a", "egress", "deny");
    assert!(now - denied >= 9.0, "the tagged frames are counted as denied: {denied} -> {now}");
    assert!(lab.tcp("a", "b", 8080), "allowed traffic still works");
}

/// Row 4: ICMPv6 neighbour discovery types are no tunnel: an NS with hop limit 255 addressed
/// to another pod's global address (routed by the node), with or without well-formed options
/// carrying data, is judged by policy. Real neighbour discovery through isolated directions
/// keeps IPv6 working.
#[test]
fn neighbour_discovery_messages_carry_nothing_off_the_link() {
    let Some(lab) = two_pods(true) else { return };
    lab.apply(
        "b.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: a}}}]\n    ports: [{port: 8080}]\n",
    )
    .unwrap();
    // Neighbour caches flushed: resolution happens again through the isolated directions.
    for ns in ["a", "b"] {
        lab.scapy(ns, "import subprocess\nsubprocess.run(['ip', '-6', 'neigh', 'flush', 'all'], check=True)\n").unwrap();
    }
    let flushed = std::process::Command::new("ip").args(["-n", &lab.node_netns, "-6", "neigh", "flush", "all"]).status().unwrap();
    assert!(flushed.success());
    assert!(lab.tcp6("a", "b", 8080), "IPv6 between isolated pods works (neighbour discovery passes)");
    assert!(!lab.tcp6("a", "b", 8081));
    let denied = packets(&lab, "t", "a", "egress", "deny");
    let at_b = lab.capture("b", "MARK-ND").unwrap();
    lab.scapy(
        "a",
        "B6 = 'fd00:244::41'\n\
         tx(IPv6(src=MY_IP6, dst=B6, hlim=255)/ICMPv6ND_NS(tgt=B6)/Raw(b'MARK-ND-' * 8), count=2)\n\
         tx(IPv6(src=MY_IP6, dst=B6, hlim=255)/ICMPv6ND_NS(tgt=B6)/Raw(bytes([200, 2]) + b'MARK-ND-OPTION'), count=2)\n\
         tx(IPv6(src=MY_IP6, dst=B6, hlim=255)/ICMPv6ND_NA(tgt=MY_IP6, R=0, S=1, O=1)/Raw(bytes([200, 2]) + b'MARK-ND-OPTION'), count=2)\n\
         tx(IPv6(src=MY_IP6, dst=B6, hlim=255)/ICMPv6ND_RA()/Raw(bytes([200, 2]) + b'MARK-ND-OPTION'), count=2)\n",
    )
    .unwrap();
    assert_eq!(at_b.count(), 0, "no ND-typed payload reaches b");
    let now = packets(&lab, "t", "a", "egress", "deny");
    assert!(now - denied >= 8.0, "counted as denied: {denied} -> {now}");
    assert!(lab.tcp6("a", "b", 8080), "allowed IPv6 traffic still works");
}

/// Row 8a: later fragments follow their first fragment's verdict; one arriving before its
/// first fragment is dropped (fail closed) and counted; a denied datagram's fragments do not
/// pass.
#[test]
fn fragments_follow_the_first_fragment_and_early_ones_are_dropped_and_counted() {
    let Some(lab) = two_pods(false) else { return };
    let frags = |port: u16, id: u16, order: &str| {
        format!(
            "fr = fragment(IP(src=MY_IP, dst='10.244.0.41', id={id})/UDP(sport=1234, dport={port})/Raw(b'MARK-FRAG-' * 250), fragsize=1000)\n\
             assert len(fr) == 3\n\
             for f in {order}:\n    tx(f)\n"
        )
    };
    // In order, to the allowed port: the whole datagram arrives.
    let at_b = lab.capture("b", "MARK-FRAG").unwrap();
    lab.scapy("a", &frags(4321, 1001, "fr")).unwrap();
    let in_order = at_b.count();
    assert!(in_order >= 1, "an allowed fragmented datagram arrives");
    // A denied datagram's fragments: none arrives.
    let denied = packets(&lab, "t", "a", "egress", "deny");
    let at_b = lab.capture("b", "MARK-FRAG").unwrap();
    lab.scapy("a", &frags(9999, 1002, "fr")).unwrap();
    assert_eq!(at_b.count(), 0, "no fragment of a denied datagram arrives");
    let now = packets(&lab, "t", "a", "egress", "deny");
    assert!(now - denied >= 3.0, "all three denied and counted: {denied} -> {now}");
    // An identification re-used: an allowed datagram, then a denied one with the same id. The
    // denied one's later fragments do not ride on the record the allowed one left.
    let at_b = lab.capture("b", "MARK-FRAG").unwrap();
    lab.scapy("a", &frags(4321, 1004, "fr")).unwrap();
    assert_eq!(at_b.count(), in_order, "allowed datagram");
    let at_b = lab.capture("b", "MARK-FRAG").unwrap();
    lab.scapy("a", &frags(9999, 1004, "fr")).unwrap();
    assert_eq!(at_b.count(), 0, "no fragment of the denied datagram with a re-used id arrives");
    // Reordered, allowed: the last fragment comes first and cannot be judged (dropped, counted);
    // the two after it follow the first fragment.
    let denied = packets(&lab, "t", "a", "egress", "deny");
    let early_before = early(&lab, "a", "egress");
    let at_b = lab.capture("b", "MARK-FRAG").unwrap();
    lab.scapy("a", &frags(4321, 1003, "[fr[2], fr[0], fr[1]]")).unwrap();
    let reordered = at_b.count();
    let now = packets(&lab, "t", "a", "egress", "deny");
    eprintln!("fragments arriving at b: in order {in_order}, last-first {reordered}");
    assert_eq!(now - denied, 1.0, "only the early fragment is dropped and counted");
    assert_eq!(early(&lab, "a", "egress") - early_before, 1.0, "counted apart as an early fragment");
    assert!(reordered < in_order || in_order > 3, "the early fragment did not arrive");
}

/// Row 8b: an IPv6 packet with 8 extension headers (the documented limit) is judged on its
/// ports and arrives; with 9 it is unparseable and dropped (leaving a pod: as spoofed).
#[test]
fn ipv6_extension_headers_at_the_limit_pass_and_one_more_is_denied() {
    let Some(lab) = two_pods(true) else { return };
    let send = |n: usize, marker: &str| {
        format!(
            "p = IPv6(src=MY_IP6, dst='fd00:244::41')\nfor _ in range({n}):\n    p = p/IPv6ExtHdrDestOpt()\n\
             tx(p/UDP(sport=1234, dport=4321)/Raw(b'{marker}'), count=2)\n"
        )
    };
    let at_b = lab.capture("b", "MARK-EXT8").unwrap();
    lab.scapy("a", &send(8, "MARK-EXT8")).unwrap();
    assert_eq!(at_b.count(), 2, "8 extension headers, allowed port: arrives");
    // Leaving a pod, a packet whose source cannot be vouched for by a full parse is dropped
    // as spoofed (isolated or not), which is how it is counted here.
    let denied = packets(&lab, "t", "a", "egress", "spoofed");
    let at_b = lab.capture("b", "MARK-EXT9").unwrap();
    lab.scapy("a", &send(9, "MARK-EXT9")).unwrap();
    assert_eq!(at_b.count(), 0, "9 extension headers: denied");
    let now = packets(&lab, "t", "a", "egress", "spoofed");
    assert!(now - denied >= 2.0, "counted as dropped (spoofed): {denied} -> {now}");
}

//! The clsact + cls_bpf fallback (kernels without TCX), forced with `--attach tc` on this
//! kernel: the real daemon, real filters, real connections between network namespaces.
//! Enforcement outlives a kill -9 and a graceful exit, a restarted daemon adopts the filters (swaps its programs
//! into the same ones: never two per hook), and `netpol-daemon uninstall` removes them.
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use netpol_daemon::testkit::lab::Lab;

mod common;
use common::*;

/// netpol's filter priority as `tc` prints it (`pref`).
const PREF: &str = "pref 20048 ";

/// netpol's filters on both hooks of `pod`'s node-side interface: (ingress, egress) lines.
fn filters(lab: &Lab, pod: &str) -> (Vec<String>, Vec<String>) {
    let ifname = lab.pod(pod).host_if.clone();
    let ours = |hook| lab.tc_filters(&ifname, hook).unwrap().into_iter().filter(|l| l.contains(PREF)).collect::<Vec<_>>();
    (ours("ingress"), ours("egress"))
}

/// The program id a `tc filter show` line names (`... id 42 tag ...`).
fn prog_id(line: &str) -> u32 {
    let mut words = line.split_whitespace();
    words
        .find(|w| *w == "id")
        .and_then(|_| words.next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no program id in {line:?}"))
}

/// Exactly one filter of netpol's per hook of `pod`, running the from-pod program on ingress
/// and the to-pod one on egress; returns their program ids.
fn one_filter_per_hook(lab: &Lab, pod: &str, when: &str) -> (u32, u32) {
    let (ingress, egress) = filters(lab, pod);
    assert_eq!(ingress.len(), 1, "{when}: {pod}'s ingress filters: {ingress:?}\n{}", lab.daemon_log());
    assert_eq!(egress.len(), 1, "{when}: {pod}'s egress filters: {egress:?}\n{}", lab.daemon_log());
    assert!(ingress[0].contains("from_pod") && ingress[0].contains("direct-action"), "{when}: {ingress:?}");
    assert!(egress[0].contains("to_pod") && egress[0].contains("direct-action"), "{when}: {egress:?}");
    (prog_id(&ingress[0]), prog_id(&egress[0]))
}

#[test]
fn tc_fallback_survives_kill_9_is_adopted_on_restart_and_uninstalled() {
    let Some(mut lab) = server_client_intruder(70) else { return };
    let cases = SERVER_CASES;
    lab.daemon_args = vec!["--attach".into(), "tc".into()];
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    wait_endpoints(&lab, 3, 10, "three pods attached");
    check(&lab, &cases);
    let first = one_filter_per_hook(&lab, "server", "first start");
    one_filter_per_hook(&lab, "intruder", "first start");
    let links = lab.pin_dir.join("links");
    assert_eq!(std::fs::read_dir(&links).map(|d| d.count()).unwrap_or(0), 0, "--attach tc pinned TCX links in {}", links.display());

    // kill -9 under traffic: nothing detaches the filters, so nothing stops enforcing.
    let server: SocketAddr = ([10, 244, 0, 70], 8080).into();
    let traffic = Traffic::start(&lab, "client", "intruder", server, 1);
    std::thread::sleep(Duration::from_millis(300));
    lab.kill_daemon();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(one_filter_per_hook(&lab, "server", "daemon killed"), first, "the filters changed with no daemon running");
    check(&lab, &cases);

    // The restarted daemon swaps its programs into the same filters: one per hook, new ids.
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    wait_endpoints(&lab, 3, 10, "three pods re-attached");
    std::thread::sleep(Duration::from_millis(300));
    let Seen { long_fail, exchanges, denied_passed, denied_tries, .. } = traffic.finish();
    eprintln!("tc fallback: {exchanges} exchanges on the long-lived connection, {long_fail} failures; {denied_tries} denied attempts, {denied_passed} passed");
    assert_eq!(long_fail, 0, "the long-lived allowed connection broke\n{}", lab.daemon_log());
    assert!(exchanges > 50, "too little allowed traffic measured: {exchanges}");
    assert_eq!(denied_passed, 0, "{denied_passed} denied connections got through\n{}", lab.daemon_log());
    assert!(denied_tries > 10, "too few denied attempts: {denied_tries}");
    let second = one_filter_per_hook(&lab, "server", "after restart");
    assert!(
        second.0 != first.0 && second.1 != first.1,
        "the restarted daemon's programs are not the ones attached: {first:?} then {second:?}"
    );
    check(&lab, &cases);

    // A graceful stop (SIGTERM, as a rollout does) leaves the filters too: the process owns
    // no attachment that its exit would undo.
    assert!(lab.stop_daemon().unwrap(), "the daemon's exit on SIGTERM failed\n{}", lab.daemon_log());
    assert_eq!(one_filter_per_hook(&lab, "server", "daemon stopped"), second, "the filters changed with the daemon's exit");
    check(&lab, &cases);

    // uninstall (with no daemon running, as the uninstall Job runs after the DaemonSet is
    // gone): no filter of netpol's left, and the denied connection now passes.
    let said = lab.uninstall(Path::new(DAEMON)).unwrap();
    assert!(said.contains("6 tc filters deleted"), "three pods, two hooks each: {said}");
    for pod in ["server", "client", "intruder"] {
        assert_eq!(filters(&lab, pod), (vec![], vec![]), "{pod}'s filters after uninstall");
    }
    check(&lab, &[("client", "server", "tcp", 8080, true), ("intruder", "server", "tcp", 8080, true)]);
}

/// Switching `--attach` across a restart moves every hook to the new kind and removes the old
/// one once the new is in place: tc filters -> pinned TCX links -> tc filters again.
#[test]
fn switching_attach_mode_across_restarts_leaves_one_kind() {
    let Some(mut lab) = server_client_intruder(75) else { return };
    let cases = SERVER_CASES;
    let links = lab.pin_dir.join("links");
    let pinned = || std::fs::read_dir(&links).map(|d| d.count()).unwrap_or(0);
    for (mode, want_filters, want_pins) in [("tc", 1, 0), ("tcx", 0, 6), ("tc", 1, 0), ("auto", 0, 6)] {
        lab.daemon_args = vec!["--attach".into(), mode.into()];
        lab.start_daemon(Path::new(DAEMON)).unwrap();
        wait_endpoints(&lab, 3, 10, "three pods attached");
        if mode == "tc" {
            assert_eq!(attached(&lab), (0, 3), "--attach tc");
        } else {
            wait_tcx(&lab, 3, 10, "three pods on TCX");
        }
        check(&lab, &cases);
        for pod in ["server", "client", "intruder"] {
            let (ingress, egress) = filters(&lab, pod);
            assert_eq!(
                (ingress.len(), egress.len()),
                (want_filters, want_filters),
                "--attach {mode}: {pod}'s filters {ingress:?} {egress:?}"
            );
        }
        assert_eq!(pinned(), want_pins, "--attach {mode}: pinned TCX links in {}", links.display());
        lab.kill_daemon();
    }
}

/// `--attach auto` (the default) on a kernel with TCX: a fresh start enforces at once from tc
/// filters, then moves each interface to TCX links in the background. Under traffic, with a
/// kill -9 in the middle of the move and a restart: no allowed connection breaks, no denied
/// one passes, and the end state is one kind per hook (pinned TCX links, no filter left).
#[test]
fn auto_enforces_from_tc_at_once_and_moves_to_tcx_without_a_gap() {
    let Some(mut lab) = server_client_intruder(80) else { return };
    // Enough idle pods that the move (one RCU grace period per hook) takes a while.
    const IDLE: usize = 60;
    for i in 0..IDLE {
        lab.add_pod("app", &format!("idle{i}"), std::net::Ipv4Addr::new(10, 244, 0, 100 + i as u8), &[("app", "idle")], &[], &[]).unwrap();
    }
    lab.write_cluster_manifest().unwrap();
    let all = IDLE + 3;
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    let (tcx, tc) = attached(&lab);
    assert_eq!(tcx + tc, all, "every pod enforced once ready");
    assert!(tc > 0, "ready before the move to TCX was done ({tcx} on TCX already)");
    check(&lab, &SERVER_CASES);

    let server: SocketAddr = ([10, 244, 0, 80], 8080).into();
    let traffic = Traffic::start(&lab, "client", "intruder", server, 1);
    // kill -9 half-way through the move.
    let t0 = std::time::Instant::now();
    while attached(&lab).0 < 10 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the move to TCX does not progress: {:?}\n{}", attached(&lab), lab.daemon_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let at_kill = attached(&lab);
    lab.kill_daemon();
    assert!(at_kill.1 > 0, "the move finished before the kill: {at_kill:?}");
    std::thread::sleep(Duration::from_millis(300));
    check(&lab, &SERVER_CASES);

    // The restarted daemon adopts both kinds and finishes the move.
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    wait_tcx(&lab, all, 30, "every pod on TCX after the restart");
    std::thread::sleep(Duration::from_millis(300));
    let Seen { long_fail, exchanges, new_ok, new_fail, denied_passed, denied_tries } = traffic.finish();
    eprintln!("auto: killed at {at_kill:?} (tcx, tc); {exchanges} exchanges, {new_ok} new connections ({new_fail} failed), {denied_tries} denied attempts ({denied_passed} passed)");
    assert_eq!(long_fail, 0, "the long-lived allowed connection broke\n{}", lab.daemon_log());
    assert_eq!(new_fail, 0, "{new_fail} new allowed connections failed\n{}", lab.daemon_log());
    assert!(exchanges > 50 && new_ok > 10, "too little allowed traffic measured: {exchanges}, {new_ok}");
    assert_eq!(denied_passed, 0, "{denied_passed} denied connections got through\n{}", lab.daemon_log());
    assert!(denied_tries > 10, "too few denied attempts: {denied_tries}");
    for pod in ["server", "client", "intruder", "idle0", "idle59"] {
        assert_eq!(filters(&lab, pod), (vec![], vec![]), "{pod} still has tc filters once on TCX");
    }
    let links = lab.pin_dir.join("links");
    assert_eq!(std::fs::read_dir(&links).map(|d| d.count()).unwrap_or(0), 2 * all, "two pinned links per pod");
    check(&lab, &SERVER_CASES);
}

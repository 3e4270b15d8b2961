use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::model::ObjKey;

fn names() -> Names {
    let status = Status {
        endpoints: vec![(3, ObjKey::new("kafka", "broker")), (4, ObjKey::new("clients", "api"))],
        policy_slots: vec![(3, ObjKey::new("kafka", "broker"), DIR_INGRESS, vec!["allow-api".into(), "metrics".into()])],
        isolated_by: vec![(
            ObjKey::new("kafka", "broker"),
            "ingress",
            vec![ObjKey::new("kafka", "allow-api"), ObjKey::new("kafka", "metrics")],
        )],
        ..Default::default()
    };
    Names::new("node-1", &status)
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut b = [0; 16];
    b[..4].copy_from_slice(&a);
    b
}

/// A TCP SYN from clients/api (10.244.0.20:41000) into kafka/broker (10.244.0.10:9092).
fn event(outcome: u32, slot: u32) -> FlowEvent {
    FlowEvent {
        ktime_ns: 0,
        endpoint: 3,
        slot,
        dir: DIR_INGRESS,
        proto: PROTO_TCP,
        family: FAMILY_V4,
        outcome: outcome as u8,
        flags: FLOW_ISOLATED,
        tcp_flags: 0x02,
        icmp_type: 0,
        _pad: 0,
        src: v4([10, 244, 0, 20]),
        dst: v4([10, 244, 0, 10]),
        sport: 41000,
        dport: 9092,
        len: 74,
    }
}

fn at() -> SystemTime {
    // 2025-06-01T12:00:00.123456Z
    UNIX_EPOCH + Duration::from_micros(1_748_779_200_123_456)
}

fn flow(ev: &FlowEvent) -> Flow {
    let peers = |ip: IpAddr| (ip.to_string() == "10.244.0.20").then(|| "clients/api".to_string());
    Flow::from_event(ev, at(), &names(), peers)
}

#[test]
fn an_allowed_flow_names_its_pod_peer_and_policy_in_text_and_json() {
    let f = flow(&event(VERDICT_ALLOW, 1));
    assert_eq!(
        render::text_line(&f),
        "2025-06-01T12:00:00.123456Z ALLOWED ingress kafka/broker: 10.244.0.20:41000 (clients/api) -> 10.244.0.10:9092 TCP SYN: by kafka/metrics"
    );
    let json = render::json_line(&f);
    assert!(json.ends_with("}\n") && !json[..json.len() - 1].contains('\n'), "one line: {json}");
    assert_eq!(
        json.trim_end(),
        r#"{"time":"2025-06-01T12:00:00.123456Z","node":"node-1","pod":"kafka/broker","direction":"ingress","verdict":"allowed","reason":"policy","policy":"kafka/metrics","isolated_by":[],"protocol":"TCP","src":"10.244.0.20","src_port":41000,"dst":"10.244.0.10","dst_port":9092,"peer":"clients/api","tcp_flags":"SYN","icmp_type":null,"bytes":74}"#
    );
    // What the stream sends, `observe` reads back.
    let back: Flow = serde_json::from_str(&json).unwrap();
    assert_eq!(back, f);
}

#[test]
fn denials_say_why_and_what_isolates_the_pod() {
    let f = flow(&event(VERDICT_DENY, SLOT_NONE));
    assert_eq!((f.verdict, f.reason.as_str(), f.policy.as_deref()), (FlowVerdict::Denied, "policy", None));
    assert_eq!(f.isolated_by, vec!["kafka/allow-api", "kafka/metrics"]);
    assert!(
        render::text_line(&f).ends_with("TCP SYN: default deny (isolated by kafka/allow-api, kafka/metrics)"),
        "{}",
        render::text_line(&f)
    );
    let audit = flow(&event(VERDICT_AUDIT, SLOT_NONE));
    assert_eq!((audit.verdict, audit.reason.as_str()), (FlowVerdict::Audit, "policy"));
    assert!(render::text_line(&audit).contains(" AUDIT ingress ") && render::text_line(&audit).contains("in audit mode"));
    // Every drop reason is the metric's label.
    for (outcome, reason) in crate::metrics::DROP_REASONS {
        let f = flow(&event(outcome, SLOT_NONE));
        assert_eq!((f.verdict, f.reason.as_str()), (FlowVerdict::Denied, reason));
    }
    let rst = flow(&FlowEvent { tcp_flags: 0x14, ..event(DROP_TCP_RST, SLOT_NONE) });
    assert!(render::text_line(&rst).ends_with("TCP ACK|RST: tcp-rst-window"), "{}", render::text_line(&rst));
    // A frame that was not IP: no addresses, no protocol.
    let other = flow(&FlowEvent { flags: FLOW_ISOLATED | FLOW_NOT_IP, family: 0, proto: 0, ..event(DROP_UNSUPPORTED, SLOT_NONE) });
    assert_eq!((other.src.as_deref(), other.protocol.as_deref(), other.peer.as_deref()), (None, None, None));
    assert_eq!(render::text_line(&other), "2025-06-01T12:00:00.123456Z DENIED ingress kafka/broker: frame not read as IP: unsupported");
}

#[test]
fn flows_without_a_policy_say_so() {
    // Out of clients/api (not isolated) to an address no pod holds, over UDP.
    let ev = FlowEvent { endpoint: 4, dir: DIR_EGRESS, proto: PROTO_UDP, flags: 0, tcp_flags: 0, ..event(VERDICT_ALLOW, SLOT_NONE) };
    let f = flow(&FlowEvent { src: v4([10, 244, 0, 20]), dst: v4([192, 168, 1, 1]), ..ev });
    assert_eq!((f.pod.as_str(), f.reason.as_str(), f.peer.as_deref(), f.tcp_flags.as_deref()), ("clients/api", "not-isolated", None, None));
    assert!(
        render::text_line(&f).ends_with("egress clients/api: 10.244.0.20:41000 -> 192.168.1.1:9092 UDP: not isolated"),
        "{}",
        render::text_line(&f)
    );
    // Into an isolated pod from a node address (kubelet's probe).
    let node = flow(&event(VERDICT_ALLOW, SLOT_NONE));
    assert_eq!(node.reason, "node-address");
    assert!(render::text_line(&node).ends_with(": from a node address"));
    // An endpoint the last sync did not name; IPv6 with ICMPv6 (no ports).
    let mut v6 = FlowEvent { endpoint: 9, family: FAMILY_V6, proto: PROTO_ICMPV6, icmp_type: 128, ..event(VERDICT_DENY, SLOT_NONE) };
    v6.src = "fd00::20".parse::<std::net::Ipv6Addr>().unwrap().octets();
    v6.dst = "fd00::10".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let f = flow(&v6);
    assert_eq!((f.pod.as_str(), f.src.as_deref(), f.src_port, f.icmp_type), ("endpoint-9", Some("fd00::20"), None, Some(128)));
    assert!(render::text_line(&f).contains(": fd00::20 -> fd00::10 ICMPv6 type 128: default deny"), "{}", render::text_line(&f));
}

#[test]
fn times_are_rfc3339_utc() {
    assert_eq!(render::rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
    assert_eq!(render::rfc3339(at()), "2025-06-01T12:00:00.123456Z");
    // A leap day and the end of a year.
    assert_eq!(render::rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000000Z");
    assert_eq!(render::rfc3339(UNIX_EPOCH + Duration::from_secs(1_767_225_599)), "2025-12-31T23:59:59.000000Z");
}

#[test]
fn filters_read_the_query_and_select_by_pod_and_verdict() {
    let f = Filter::from_query("pod=kafka%2Fbroker&verdict=denied,audit&rate=5").unwrap();
    assert_eq!(f, Filter { pod: Some("kafka/broker".into()), verdicts: vec![FlowVerdict::Denied, FlowVerdict::Audit], rate: 5 });
    assert_eq!(Filter::from_query(&f.to_query()).unwrap(), f);
    assert_eq!(Filter::from_query("").unwrap(), Filter::default());
    for bad in ["pod=broker", "verdict=dropped", "rate=0", "rate=10001", "rate=x", "colour=red", "pod=%zz"] {
        assert!(Filter::from_query(bad).is_err(), "{bad}");
    }
    let denied = flow(&event(VERDICT_DENY, SLOT_NONE));
    let allowed = flow(&event(VERDICT_ALLOW, 0));
    assert!(f.matches(&denied) && !f.matches(&allowed));
    // The pod on its own interface, or as the peer; no other.
    let by_peer = Filter { pod: Some("clients/api".into()), ..Filter::default() };
    assert!(by_peer.matches(&denied) && by_peer.matches(&allowed));
    assert!(!Filter { pod: Some("other/x".into()), ..Filter::default() }.matches(&denied));
}

#[test]
fn the_hub_widens_the_programs_settings_for_its_clients_and_restores_them() {
    let hub = Arc::new(FlowHub::default());
    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let w = written.clone();
    let base = EventConfig { per_sec: 10, verdicts: EVENTS_DENIED | EVENTS_AUDIT };
    hub.start(
        "n",
        Box::new(move |c| {
            w.lock().unwrap().push(c);
            Ok(())
        }),
        base,
    );
    let allowed_only = Filter { verdicts: vec![FlowVerdict::Allowed], rate: 50, pod: None };
    let (mut rx, sub) = hub.subscribe(allowed_only, Default::default()).unwrap();
    let (_rx2, sub2) = hub.subscribe(Filter { rate: 5, ..Filter::default() }, Default::default()).unwrap();
    assert_eq!(hub.settings(), EventConfig { per_sec: 50, verdicts: EVENTS_DENIED | EVENTS_AUDIT | EVENTS_ALLOWED });
    hub.publish(&flow(&event(VERDICT_ALLOW, 0)));
    hub.publish(&flow(&event(VERDICT_DENY, SLOT_NONE)));
    let line = rx.try_recv().unwrap();
    assert!(std::str::from_utf8(&line).unwrap().contains(r#""verdict":"allowed""#));
    assert!(rx.try_recv().is_err(), "the denial is not this client's");
    drop(sub);
    assert_eq!(hub.settings(), EventConfig { per_sec: 10, verdicts: EVENTS_DENIED | EVENTS_AUDIT | EVENTS_ALLOWED });
    drop(sub2);
    assert_eq!(hub.settings(), base, "the last client left: back to --log-denied");
    let w = written.lock().unwrap();
    assert_eq!(w.first(), Some(&base));
    assert_eq!(w.last(), Some(&base));
}

#[test]
fn a_slow_client_loses_what_its_queue_cannot_hold_and_no_one_waits() {
    let hub = Arc::new(FlowHub::default());
    hub.start("n", Box::new(|_| Ok(())), EventConfig::default());
    let (mut slow, _s1) = hub.subscribe(Filter::default(), Default::default()).unwrap();
    let (mut quick, _s2) = hub.subscribe(Filter::default(), Default::default()).unwrap();
    let f = flow(&event(VERDICT_DENY, SLOT_NONE));
    let mut got = 0;
    for _ in 0..hub::QUEUE + 10 {
        hub.publish(&f);
        while quick.try_recv().is_ok() {
            got += 1;
        }
    }
    assert_eq!(got, hub::QUEUE + 10, "the reading client gets everything");
    let mut kept = 0;
    while slow.try_recv().is_ok() {
        kept += 1;
    }
    assert_eq!(kept, hub::QUEUE);
    let mut out = crate::metrics::Families::default();
    hub.families(&mut out);
    let text = out.encode();
    assert_eq!(crate::metrics::sample(&text, "netpol_flow_events_dropped_total{reason=\"slow_client\"}"), Some(10.0), "{text}");
    assert_eq!(crate::metrics::sample(&text, "netpol_flow_clients"), Some(2.0));
    assert_eq!(crate::metrics::sample(&text, "netpol_flow_events_total{verdict=\"denied\"}"), Some((hub::QUEUE + 10) as f64));
}

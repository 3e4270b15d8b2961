//! The endpoint over HTTP: readiness, liveness with a stuck loop, many clients at once and a
//! slow one, and the exposition checked by a strict parser.
use super::*;

#[test]
fn readyz_is_503_until_the_first_sync_then_200() {
    let shared = Arc::new(Shared::default());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    serve(addr, shared.clone(), std::path::PathBuf::from("/nonexistent")).unwrap();
    let (code, _) = http_get(addr, "/readyz").unwrap();
    assert_eq!(code, 503);
    let (code, body) = http_get(addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert_eq!(sample(&body, "netpol_ready"), Some(0.0));
    shared.ready.store(true, Ordering::SeqCst);
    let (code, _) = http_get(addr, "/readyz").unwrap();
    assert_eq!(code, 200);
    assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
    // The API server goes away: not ready (still healthy), the metric says why.
    shared.status.lock().unwrap().source_down = true;
    let (code, body) = http_get(addr, "/readyz").unwrap();
    assert_eq!((code, body.contains("last known state")), (503, true));
    assert_eq!(sample(&http_get(addr, "/metrics").unwrap().1, "netpol_source_up"), Some(0.0));
    assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
    shared.status.lock().unwrap().source_down = false;
    assert_eq!(http_get(addr, "/readyz").unwrap().0, 200);
}

/// An endpoint on a free loopback port.
fn endpoint() -> (SocketAddr, Arc<Shared>) {
    let shared = Arc::new(Shared::default());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    http::spawn(l, Arc::new(Scraper::new(shared.clone(), PathBuf::from("/nonexistent")))).unwrap();
    (addr, shared)
}

#[test]
fn healthz_fails_while_the_loop_is_stuck_and_recovers_with_its_next_pass() {
    let (addr, shared) = endpoint();
    shared.heartbeat.set_max_age(Duration::from_secs(30));
    shared.heartbeat.beat();
    assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
    // The last pass began a minute ago: the loop is stuck (liveness fails, readiness is its own).
    shared.heartbeat.beat_at(Instant::now() - Duration::from_secs(60));
    let (code, body) = http_get(addr, "/healthz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("last pass began 60"), "{body}");
    let age = sample(&http_get(addr, "/metrics").unwrap().1, "netpol_last_pass_age_seconds").unwrap();
    assert!((60.0..70.0).contains(&age), "{age}");
    shared.heartbeat.beat();
    assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
}

#[test]
fn a_slow_client_holds_up_no_one_and_is_dropped() {
    use std::io::Read;
    let (addr, shared) = endpoint();
    shared.ready.store(true, Ordering::SeqCst);
    // One byte every 2 s: a request that would take over a minute to arrive.
    let slow = TcpStream::connect(addr).unwrap();
    let connected = Instant::now();
    let mut w = slow.try_clone().unwrap();
    std::thread::spawn(move || {
        for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" {
            if w.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    // When (and with what) the server closes it.
    let reader = {
        let mut r = slow.try_clone().unwrap();
        r.set_read_timeout(Some(http::HEADER_READ_TIMEOUT + Duration::from_secs(10))).unwrap();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            (connected.elapsed(), String::from_utf8_lossy(&buf).to_string())
        })
    };
    for _ in 0..3 {
        for path in ["/readyz", "/healthz", "/metrics"] {
            let t = Instant::now();
            assert_eq!(http_get(addr, path).unwrap().0, 200, "{path}");
            assert!(t.elapsed() < Duration::from_millis(500), "{path} took {:?} beside a slow client", t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1500));
    }
    // The slow client is cut off once its headers are late, without an answer.
    let (cut_after, got) = reader.join().unwrap();
    assert!(cut_after < http::HEADER_READ_TIMEOUT + Duration::from_secs(2), "the slow client was kept {cut_after:?}");
    assert!(cut_after >= http::HEADER_READ_TIMEOUT - Duration::from_millis(100), "cut after {cut_after:?}");
    assert!(!got.contains("200 OK"), "{got}");
    drop(slow);
}

#[test]
fn two_hundred_clients_at_once_are_all_answered() {
    use std::io::Read;
    let (addr, shared) = endpoint();
    shared.ready.store(true, Ordering::SeqCst);
    // 200 clients, each half-way through its request: all open at once.
    let mut clients: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let path = ["/readyz", "/healthz", "/metrics"][i % 3];
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n").unwrap();
    }
    // Someone else is answered at once meanwhile.
    let t = Instant::now();
    assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
    assert!(t.elapsed() < Duration::from_millis(500), "{:?}", t.elapsed());
    let t = Instant::now();
    for c in &mut clients {
        c.write_all(b"\r\n").unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = String::new();
        c.read_to_string(&mut buf).unwrap();
        assert!(buf.starts_with("HTTP/1.1 200 OK"), "client {i}: {buf}");
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn the_exposition_is_valid_text_format_with_process_and_build_metrics() {
    let shared = Arc::new(Shared::default());
    {
        let mut st = shared.status.lock().unwrap();
        for v in [0.0005, 0.2, 30.0] {
            st.programming_latency.observe(v);
        }
        st.fail_closed = vec![crate::model::ObjKey::new("a\"b", "x\\y")];
        st.isolated_by = vec![(crate::model::ObjKey::new("a", "web"), "ingress", vec![crate::model::ObjKey::new("a", "deny-all")])];
        st.policy_entries = 5;
        st.syncs = 2;
    }
    shared.kube_events.created.store(4, Ordering::Relaxed);
    let text = Scraper::new(shared, PathBuf::from("/nonexistent")).scrape();
    let samples = crate::testkit::exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let v = |name: &str, labels: &[(&str, &str)]| crate::testkit::exposition::value(&samples, name, labels);
    assert_eq!(v("netpol_programming_latency_seconds_count", &[]), Some(3.0));
    assert_eq!(v("netpol_programming_latency_seconds_bucket", &[("le", "0.25")]), Some(2.0));
    assert_eq!(v("netpol_pod_fail_closed", &[("namespace", "a\"b"), ("pod", "x\\y")]), Some(1.0));
    assert_eq!(v("netpol_kube_events_total", &[("verb", "create")]), Some(4.0));
    assert_eq!(v("netpol_bpf_map_entries", &[("map", "POLICY2")]), Some(5.0));
    assert_eq!(v("netpol_syncs_total", &[]), Some(2.0));
    let commit = build_info::COMMIT.unwrap_or("unknown");
    assert_eq!(v("netpol_build_info", &[("version", build_info::VERSION), ("commit", commit), ("rustc", build_info::RUSTC)]), Some(1.0));
    assert!(build_info::RUSTC.starts_with("rustc "), "{}", build_info::RUSTC);
    // The process metrics, from /proc.
    assert!(v("process_resident_memory_bytes", &[]).is_some_and(|b| b > 1e6), "{text}");
    assert!(v("process_open_fds", &[]).is_some_and(|n| n >= 3.0));
    assert!(v("process_cpu_seconds_total", &[]).is_some());
    assert!(v("process_start_time_seconds", &[]).is_some_and(|t| t > 1.7e9));
    // A second, independent parser reads the same values.
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    // (It folds a histogram's series into one sample: the others are compared one by one.)
    let mut scalars = 0;
    for s in &scrape.samples {
        let n = match s.value {
            prometheus_parse::Value::Counter(n) | prometheus_parse::Value::Gauge(n) | prometheus_parse::Value::Untyped(n) => n,
            _ => continue,
        };
        let labels: Vec<(&str, &str)> = s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        // (It leaves escapes in label values as written.)
        if labels.iter().any(|(_, v)| v.contains('\\')) {
            continue;
        }
        assert_eq!(v(&s.metric, &labels), Some(n), "{} {labels:?}", s.metric);
        scalars += 1;
    }
    assert!(scalars >= 30, "{scalars} samples read");
}

//! The metrics and health endpoint: `GET /metrics` (Prometheus text format), `GET /readyz`
//! (200 once the first full sync is programmed), `GET /healthz`. A tiny HTTP/1.1 server on a
//! thread of its own; counters are read straight from the pinned BPF map.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netpol_common::{DIR_EGRESS, DIR_INGRESS, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY, VERDICT_SPOOFED};

use crate::datapath::CounterReader;
use crate::model::ObjKey;

#[derive(Debug, Default, Clone)]
pub struct Status {
    pub endpoints: Vec<(u32, ObjKey)>,
    pub manifest_errors: usize,
    pub sync_errors: usize,
    pub syncs: u64,
    pub identity_entries: usize,
    pub policy_entries: usize,
    pub port_entries: usize,
    pub policies: usize,
    pub last_sync_seconds: f64,
    /// Per programmed pod and direction: the policies that isolate it (what its default-deny
    /// drops are attributed to).
    pub isolated_by: Vec<(ObjKey, &'static str, Vec<ObjKey>)>,
    /// Per programmed pod and direction: endpoint id, pod, direction and the label of each
    /// policy slot of its POLICY_COUNTERS.
    pub policy_slots: Vec<(u32, ObjKey, u8, Vec<String>)>,
    /// Per-policy counts folded out of the map when a pod's policies changed.
    pub policy_retired: BTreeMap<(ObjKey, u8, String), u64>,
    /// Local pods failing closed because their entries do not fit the maps.
    pub fail_closed: Vec<ObjKey>,
    /// The source (Kubernetes API) is unreachable; the last state is enforced.
    pub source_down: bool,
    /// Change observed (file written, watch event received) → maps updated.
    pub programming_latency: Histogram,
    /// When the last observed change was in the maps (Unix time, seconds); 0: none yet.
    pub last_programmed_unix: f64,
}

/// Upper bounds (seconds) of the programming-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Default, Clone)]
pub struct Histogram {
    /// Per bucket (not cumulative); observations above the last bound only count in `count`.
    pub buckets: [u64; LATENCY_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        let mut cum = 0;
        for (b, n) in LATENCY_BUCKETS.iter().zip(self.buckets) {
            cum += n;
            out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {cum}\n"));
        }
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n", self.count, self.sum, self.count));
    }
}

#[derive(Default)]
pub struct Shared {
    pub ready: AtomicBool,
    pub status: Mutex<Status>,
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(status: &Status, ready: bool, counters: Option<&CounterReader>) -> String {
    let mut out = String::new();
    out.push_str("# HELP netpol_packets_total Packets seen by netpol per pod, direction and verdict.\n");
    out.push_str("# TYPE netpol_packets_total counter\n");
    if let Some(c) = counters {
        for (id, pod) in &status.endpoints {
            for (dir, dname) in [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")] {
                for (verdict, vname) in [(VERDICT_ALLOW, "allow"), (VERDICT_DENY, "deny"), (VERDICT_AUDIT, "audit"), (VERDICT_SPOOFED, "spoofed")] {
                    out.push_str(&format!(
                        "netpol_packets_total{{namespace=\"{}\",pod=\"{}\",direction=\"{dname}\",verdict=\"{vname}\"}} {}\n",
                        escape(&pod.namespace),
                        escape(&pod.name),
                        c.read(*id, dir, verdict)
                    ));
                }
            }
        }
    }
    out.push_str("# HELP netpol_fragments_early_dropped_total Later IP fragments dropped because their datagram's first fragment had not been seen (reordered on the way; also counted as denied).\n# TYPE netpol_fragments_early_dropped_total counter\n");
    if let Some(c) = counters {
        for (id, pod) in &status.endpoints {
            for (dir, dname) in [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")] {
                out.push_str(&format!(
                    "netpol_fragments_early_dropped_total{{namespace=\"{}\",pod=\"{}\",direction=\"{dname}\"}} {}\n",
                    escape(&pod.namespace),
                    escape(&pod.name),
                    c.read_frag_early(*id, dir)
                ));
            }
        }
    }
    out.push_str("# HELP netpol_policy_allowed_packets_total Packets of connections that a policy allowed, per pod and the policy's direction (the allowed packet and the rest of its flow, both ways; when several policies allow, one of them).\n# TYPE netpol_policy_allowed_packets_total counter\n");
    let mut policy_counts: BTreeMap<(ObjKey, u8, String), u64> = status.policy_retired.clone();
    if let Some(c) = counters {
        for (id, pod, dir, labels) in &status.policy_slots {
            for (slot, label) in labels.iter().enumerate() {
                *policy_counts.entry((pod.clone(), *dir, label.clone())).or_default() += c.read_policy(*id, *dir, slot as u32);
            }
        }
    }
    for ((pod, dir, policy), n) in &policy_counts {
        out.push_str(&format!(
            "netpol_policy_allowed_packets_total{{namespace=\"{}\",pod=\"{}\",direction=\"{}\",policy=\"{}\"}} {n}\n",
            escape(&pod.namespace),
            escape(&pod.name),
            if *dir == DIR_INGRESS { "ingress" } else { "egress" },
            escape(policy)
        ));
    }
    out.push_str("# HELP netpol_pod_isolated_by 1 for each policy isolating a pod in a direction: the policies its default-deny drops (verdict=\"deny\") come from.\n# TYPE netpol_pod_isolated_by gauge\n");
    for (pod, dir, policies) in &status.isolated_by {
        for p in policies {
            out.push_str(&format!(
                "netpol_pod_isolated_by{{namespace=\"{}\",pod=\"{}\",direction=\"{dir}\",policy=\"{}\"}} 1\n",
                escape(&pod.namespace),
                escape(&pod.name),
                escape(&p.name)
            ));
        }
    }
    out.push_str("# HELP netpol_pod_fail_closed 1 for a local pod whose map entries do not fit: its isolated directions deny everything.\n# TYPE netpol_pod_fail_closed gauge\n");
    for pod in &status.fail_closed {
        out.push_str(&format!("netpol_pod_fail_closed{{namespace=\"{}\",pod=\"{}\"}} 1\n", escape(&pod.namespace), escape(&pod.name)));
    }
    status.programming_latency.render(
        "netpol_programming_latency_seconds",
        "From a change being observed (manifest written, watch event received) to the maps updated.",
        &mut out,
    );
    let gauges: [(&str, &str, f64); 12] = [
        ("netpol_ready", "1 once the first full sync is programmed.", if ready { 1.0 } else { 0.0 }),
        ("netpol_endpoints", "Pod interfaces with programs attached.", status.endpoints.len() as f64),
        ("netpol_policies", "NetworkPolicies in the cluster model.", status.policies as f64),
        ("netpol_manifest_errors", "Invalid objects (skipped; an invalid NetworkPolicy is enforced fail-closed: it isolates what it selects and allows nothing).", status.manifest_errors as f64),
        ("netpol_sync_errors", "Errors of the last datapath sync.", status.sync_errors as f64),
        ("netpol_identity_map_entries", "Entries in the IDENTITIES map (address classes).", status.identity_entries as f64),
        ("netpol_policy_map_entries", "Entries in the POLICY map.", status.policy_entries as f64),
        ("netpol_port_map_entries", "Entries in the POLICY_PORTS map.", status.port_entries as f64),
        ("netpol_fail_closed_pods", "Local pods failing closed because the maps are full.", status.fail_closed.len() as f64),
        ("netpol_source_up", "0 while the Kubernetes API is unreachable (the last state stays enforced).", if status.source_down { 0.0 } else { 1.0 }),
        ("netpol_last_sync_duration_seconds", "Compile and program time of the last sync.", status.last_sync_seconds),
        ("netpol_last_programmed_timestamp_seconds", "Unix time at which the last observed change was in the maps.", status.last_programmed_unix),
    ];
    for (name, help, v) in gauges {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"));
    }
    out.push_str(&format!(
        "# HELP netpol_syncs_total Datapath syncs done.\n# TYPE netpol_syncs_total counter\nnetpol_syncs_total {}\n",
        status.syncs
    ));
    out
}

fn respond(mut s: TcpStream, code: u16, reason: &str, ctype: &str, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn handle(s: TcpStream, shared: &Shared, counters: &Option<CounterReader>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut r = BufReader::new(match s.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    if r.read_line(&mut line).is_err() {
        return;
    }
    // Drain headers.
    let mut h = String::new();
    while r.read_line(&mut h).is_ok_and(|n| n > 2) {
        h.clear();
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let ready = shared.ready.load(Ordering::SeqCst);
    match (method, path) {
        ("GET", "/metrics") => {
            let status = shared.status.lock().unwrap().clone();
            respond(s, 200, "OK", "text/plain; version=0.0.4", &render(&status, ready, counters.as_ref()))
        }
        ("GET", "/readyz") if ready && shared.status.lock().unwrap().source_down => {
            respond(s, 503, "Service Unavailable", "text/plain", "Kubernetes API unreachable; enforcing the last known state\n")
        }
        ("GET", "/readyz") if ready => respond(s, 200, "OK", "text/plain", "ready\n"),
        ("GET", "/readyz") => respond(s, 503, "Service Unavailable", "text/plain", "not synced yet\n"),
        ("GET", "/healthz") => respond(s, 200, "OK", "text/plain", "ok\n"),
        _ => respond(s, 404, "Not Found", "text/plain", "not found\n"),
    }
}

/// Serves until the process exits. `counters` is opened lazily (the map exists once loaded).
pub fn serve(addr: SocketAddr, shared: Arc<Shared>, pin_dir: std::path::PathBuf) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        let mut counters: Option<CounterReader> = None;
        for s in listener.incoming().flatten() {
            if counters.is_none() && shared.ready.load(Ordering::SeqCst) {
                counters = CounterReader::open(&pin_dir).ok();
            }
            handle(s, &shared, &counters);
        }
    })?;
    Ok(())
}

/// A minimal HTTP GET for tests and tools (status code and body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// Value of one sample in Prometheus text (exact label set match).
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn latency_histogram_is_cumulative_and_fail_closed_pods_are_listed() {
        let mut st = Status::default();
        for v in [0.0005, 0.003, 0.003, 0.2, 30.0] {
            st.programming_latency.observe(v);
        }
        st.fail_closed = vec![ObjKey::new("a", "big")];
        st.isolated_by = vec![(ObjKey::new("a", "web"), "ingress", vec![ObjKey::new("a", "deny-all"), ObjKey::new("a", "allow-api")])];
        let text = render(&st, true, None);
        let b = |le: &str| sample(&text, &format!("netpol_programming_latency_seconds_bucket{{le=\"{le}\"}}"));
        assert_eq!(b("0.001"), Some(1.0));
        assert_eq!(b("0.005"), Some(3.0));
        assert_eq!(b("0.25"), Some(4.0));
        assert_eq!(b("10"), Some(4.0));
        assert_eq!(b("+Inf"), Some(5.0));
        assert_eq!(sample(&text, "netpol_programming_latency_seconds_count"), Some(5.0));
        assert_eq!(sample(&text, "netpol_last_programmed_timestamp_seconds"), Some(0.0));
        assert_eq!(sample(&text, "netpol_pod_fail_closed{namespace=\"a\",pod=\"big\"}"), Some(1.0));
        assert_eq!(sample(&text, "netpol_fail_closed_pods"), Some(1.0));
        assert_eq!(sample(&text, "netpol_pod_isolated_by{namespace=\"a\",pod=\"web\",direction=\"ingress\",policy=\"allow-api\"}"), Some(1.0));
    }

    #[test]
    fn render_escapes_labels() {
        let st = Status { endpoints: vec![], syncs: 3, ..Default::default() };
        let text = render(&st, true, None);
        assert_eq!(sample(&text, "netpol_syncs_total"), Some(3.0));
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
    }
}

//! The Prometheus text of `/metrics`, through the `prometheus` crate's data model and text
//! encoder: per-pod packet and byte counters (per verdict, and per drop reason) read from the
//! pinned BPF maps, per-policy counts, what isolates each pod, the programming-latency
//! histogram, map pressure and the daemon's gauges, from a [`Status`] snapshot. Families are
//! built here (labels in the order given) and written by [`Families::encode`]; families with
//! no sample are left out (the text format has no empty family).
use std::collections::BTreeMap;

use netpol_common::*;
use prometheus::proto::{Bucket, Counter, Gauge, Histogram as HistogramProto, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::Encoder;

use super::status::{Histogram, Status, LATENCY_BUCKETS};
use crate::datapath::{CounterReader, RETIRED_DENIED};
use crate::model::ObjKey;

/// A counter family: name, help and the field of a [`Count`] it exports.
type CountFamily = (&'static str, &'static str, fn(Count) -> u64);

const DIRECTIONS: [(u8, &str); 2] = [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")];
const VERDICT_NAMES: [(u32, &str); 4] =
    [(VERDICT_ALLOW, "allow"), (VERDICT_DENY, "deny"), (VERDICT_AUDIT, "audit"), (VERDICT_SPOOFED, "spoofed")];
/// Drop reasons: the outcomes of `COUNTERS` that drop the packet, and their `reason` label.
pub const DROP_REASONS: [(u32, &str); 6] = [
    (VERDICT_DENY, "policy"),
    (DROP_FAIL_CLOSED, "fail-closed"),
    (VERDICT_SPOOFED, "spoofed"),
    (DROP_MALFORMED, "malformed"),
    (DROP_UNSUPPORTED, "unsupported"),
    (DROP_TCP_RST, "tcp-rst-window"),
];

/// The metric families of one scrape, in the order they are written.
#[derive(Default)]
pub struct Families(Vec<MetricFamily>);

/// One family being filled in.
pub struct Family<'a>(&'a mut MetricFamily);

impl Families {
    pub fn counter(&mut self, name: &str, help: &str) -> Family<'_> {
        self.family(name, help, MetricType::COUNTER)
    }

    pub fn gauge(&mut self, name: &str, help: &str) -> Family<'_> {
        self.family(name, help, MetricType::GAUGE)
    }

    fn family(&mut self, name: &str, help: &str, t: MetricType) -> Family<'_> {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(t);
        self.0.push(mf);
        Family(self.0.last_mut().expect("just pushed"))
    }

    /// Families collected elsewhere (the process metrics).
    pub fn extend(&mut self, families: Vec<MetricFamily>) {
        self.0.extend(families);
    }

    /// The text exposition format (version 0.0.4).
    pub fn encode(self) -> String {
        let families: Vec<MetricFamily> = self.0.into_iter().filter(|f| !f.get_metric().is_empty()).collect();
        let mut out = Vec::new();
        // Only an empty family or name fails, and neither is left here.
        if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut out) {
            tracing::error!("encoding the metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Family<'_> {
    /// A sample with these labels (in this order): a counter's or a gauge's value.
    pub fn sample(&mut self, labels: &[(&str, &str)], v: f64) -> &mut Self {
        let mut m = Metric::from_label(labels.iter().map(|(k, v)| label(k, v)).collect());
        if self.0.get_field_type() == MetricType::COUNTER {
            let mut c = Counter::default();
            c.set_value(v);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        }
        self.0.mut_metric().push(m);
        self
    }
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

/// `namespace`, `pod` and the labels after them.
fn pod_labels<'a>(pod: &'a ObjKey, rest: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![("namespace", pod.namespace.as_str()), ("pod", pod.name.as_str())];
    v.extend_from_slice(rest);
    v
}

/// The families a status snapshot (and the pinned counters, once they can be read) gives.
pub fn families(status: &Status, ready: bool, counters: Option<&CounterReader>, out: &mut Families) {
    packets(status, counters, out);
    fragments_early_dropped(status, counters, out);
    policy_allowed(status, counters, out);
    policy_denied(status, counters, out);
    isolation(status, out);
    status.programming_latency.family(
        "netpol_programming_latency_seconds",
        "From a change being observed (manifest written, watch event received) to the maps updated.",
        out,
    );
    gauges(status, ready, out);
    map_pressure(status, counters, out);
}

/// The families of a status snapshot, as text.
pub fn render(status: &Status, ready: bool, counters: Option<&CounterReader>) -> String {
    let mut out = Families::default();
    families(status, ready, counters, &mut out);
    out.encode()
}

/// Packets and bytes per pod, direction and verdict, and the dropped ones per reason.
fn packets(status: &Status, counters: Option<&CounterReader>, out: &mut Families) {
    // Per pod and direction: packets and bytes per outcome.
    let mut read: Vec<(&ObjKey, u8, &str, [Count; OUTCOMES as usize])> = Vec::new();
    if let Some(c) = counters {
        for (id, pod) in &status.endpoints {
            for (dir, dname) in DIRECTIONS {
                read.push((pod, dir, dname, std::array::from_fn(|o| c.read_outcome(*id, dir, o as u32))));
            }
        }
    }
    let by_verdict = |verdict: u32, dir: u8, counts: &[Count; OUTCOMES as usize]| {
        (0..OUTCOMES).filter(|o| verdict_of(*o, dir) == verdict).fold(Count::default(), |a, o| {
            let c = counts[o as usize];
            Count { packets: a.packets + c.packets, bytes: a.bytes + c.bytes }
        })
    };
    let kinds: [CountFamily; 2] = [
        ("netpol_packets_total", "Packets seen by netpol per pod, direction and verdict.", |c| c.packets),
        ("netpol_bytes_total", "Bytes (frame length at TC) seen by netpol per pod, direction and verdict.", |c| c.bytes),
    ];
    for (name, help, field) in kinds {
        let mut f = out.counter(name, help);
        for (pod, dir, dname, counts) in &read {
            for (verdict, vname) in VERDICT_NAMES {
                let n = field(by_verdict(verdict, *dir, counts));
                f.sample(&pod_labels(pod, &[("direction", dname), ("verdict", vname)]), n as f64);
            }
        }
    }
    let kinds: [CountFamily; 2] = [
        ("netpol_dropped_packets_total", "Packets dropped per pod, direction and reason (policy: no policy allows it; fail-closed: the pod's entries do not fit the maps; spoofed: a source the pod does not own; malformed: truncated or malformed IP; unsupported: another ethertype or VLAN through an isolated direction; tcp-rst-window: an RST outside the receiver's window).", |c| c.packets),
        ("netpol_dropped_bytes_total", "Bytes (frame length at TC) dropped per pod, direction and reason (the reasons of netpol_dropped_packets_total).", |c| c.bytes),
    ];
    for (name, help, field) in kinds {
        let mut f = out.counter(name, help);
        for (pod, _, dname, counts) in &read {
            for (outcome, reason) in DROP_REASONS {
                f.sample(&pod_labels(pod, &[("direction", dname), ("reason", reason)]), field(counts[outcome as usize]) as f64);
            }
        }
    }
}

fn fragments_early_dropped(status: &Status, counters: Option<&CounterReader>, out: &mut Families) {
    let mut f = out.counter("netpol_fragments_early_dropped_total", "Later IP fragments dropped because their datagram's first fragment had not been seen (reordered on the way; also counted as denied).");
    let Some(c) = counters else { return };
    for (id, pod) in &status.endpoints {
        for (dir, dname) in DIRECTIONS {
            f.sample(&pod_labels(pod, &[("direction", dname)]), c.read_frag_early(*id, dir) as f64);
        }
    }
}

/// Packets a cluster policy's rule denied, per pod, direction and policy (`Admin:NAME`,
/// `Baseline:NAME`; a NetworkPolicy's default deny is counted per pod in
/// `netpol_packets_total`).
fn policy_denied(status: &Status, counters: Option<&CounterReader>, out: &mut Families) {
    let mut counts: BTreeMap<(ObjKey, u8, String), u64> = BTreeMap::new();
    for ((pod, dir, label), n) in &status.policy_retired {
        if dir & RETIRED_DENIED != 0 {
            *counts.entry((pod.clone(), dir & 1, label.clone())).or_default() += n;
        }
    }
    if let Some(c) = counters {
        for (id, pod, dir, labels) in &status.policy_slots {
            for (slot, label) in labels.iter().enumerate().filter(|(_, l)| l.contains(':')) {
                *counts.entry((pod.clone(), *dir, label.clone())).or_default() += c.read_policy_denied(*id, *dir, slot as u32);
            }
        }
    }
    let mut f = out.counter(
        "netpol_policy_denied_packets_total",
        "Packets a ClusterNetworkPolicy rule denied, per pod, direction and policy (Admin:NAME or Baseline:NAME).",
    );
    for ((pod, dir, policy), n) in &counts {
        let d = if *dir == DIR_INGRESS { "ingress" } else { "egress" };
        f.sample(&pod_labels(pod, &[("direction", d), ("policy", policy)]), *n as f64);
    }
}

fn policy_allowed(status: &Status, counters: Option<&CounterReader>, out: &mut Families) {
    let mut policy_counts: BTreeMap<(ObjKey, u8, String), u64> =
        status.policy_retired.iter().filter(|((_, d, _), _)| d & RETIRED_DENIED == 0).map(|(k, n)| (k.clone(), *n)).collect();
    if let Some(c) = counters {
        for (id, pod, dir, labels) in &status.policy_slots {
            for (slot, label) in labels.iter().enumerate() {
                *policy_counts.entry((pod.clone(), *dir, label.clone())).or_default() += c.read_policy(*id, *dir, slot as u32);
            }
        }
    }
    let mut f = out.counter("netpol_policy_allowed_packets_total", "Packets of connections that a policy allowed, per pod and the policy's direction (the allowed packet and the rest of its flow, both ways; when several policies allow, one of them).");
    for ((pod, dir, policy), n) in &policy_counts {
        let d = if *dir == DIR_INGRESS { "ingress" } else { "egress" };
        f.sample(&pod_labels(pod, &[("direction", d), ("policy", policy)]), *n as f64);
    }
}

/// What isolates each pod, and the pods failing closed.
fn isolation(status: &Status, out: &mut Families) {
    let mut f = out.gauge(
        "netpol_pod_isolated_by",
        "1 for each policy isolating a pod in a direction: the policies its default-deny drops (verdict=\"deny\") come from.",
    );
    for (pod, dir, policies) in &status.isolated_by {
        for p in policies {
            f.sample(&pod_labels(pod, &[("direction", dir), ("policy", &p.name)]), 1.0);
        }
    }
    let mut f =
        out.gauge("netpol_pod_fail_closed", "1 for a local pod whose map entries do not fit: its isolated directions deny everything.");
    for pod in &status.fail_closed {
        f.sample(&pod_labels(pod, &[]), 1.0);
    }
}

fn gauges(status: &Status, ready: bool, out: &mut Families) {
    let gauges: [(&str, &str, f64); 12] = [
        ("netpol_ready", "1 once the first full sync is programmed.", if ready { 1.0 } else { 0.0 }),
        ("netpol_endpoints", "Pod interfaces with programs attached.", status.endpoints.len() as f64),
        ("netpol_policies", "NetworkPolicies in the cluster model.", status.policies as f64),
        (
            "netpol_manifest_errors",
            "Invalid objects (skipped; an invalid NetworkPolicy is enforced fail-closed: it isolates what it selects and allows nothing).",
            status.manifest_errors as f64,
        ),
        ("netpol_sync_errors", "Errors of the last datapath sync.", status.sync_errors as f64),
        ("netpol_identity_map_entries", "Entries in the IDENTITIES map (address classes).", status.identity_entries as f64),
        ("netpol_policy_map_entries", "Entries in the POLICY map.", status.policy_entries as f64),
        ("netpol_port_map_entries", "Entries in the POLICY_PORTS map.", status.port_entries as f64),
        ("netpol_fail_closed_pods", "Local pods failing closed because the maps are full.", status.fail_closed.len() as f64),
        (
            "netpol_source_up",
            "0 while the Kubernetes API is unreachable (the last state stays enforced).",
            if status.source_down { 0.0 } else { 1.0 },
        ),
        ("netpol_last_sync_duration_seconds", "Compile and program time of the last sync.", status.last_sync_seconds),
        (
            "netpol_last_programmed_timestamp_seconds",
            "Unix time at which the last observed change was in the maps.",
            status.last_programmed_unix,
        ),
    ];
    for (name, help, v) in gauges {
        out.gauge(name, help).sample(&[], v);
    }
    let mut attached = out.gauge(
        "netpol_attached_interfaces",
        "Pod interfaces by how the programs run there: mode=\"tcx\" (TCX links) or \"tc\" (clsact + cls_bpf filters; with --attach auto, a new interface starts there and is moved to TCX in the background).",
    );
    attached.sample(&[("mode", "tcx")], status.attached.tcx as f64);
    attached.sample(&[("mode", "tc")], status.attached.tc as f64);
    out.counter("netpol_syncs_total", "Datapath syncs done.").sample(&[], status.syncs as f64);
    out.counter(
        "netpol_source_errors_total",
        "Errors reading the source: failed Kubernetes API watches and lists (each followed by a relist with backoff).",
    )
    .sample(&[], status.source_errors as f64);
}

/// How full the maps are (entries and capacity per map, by its pinned name), and the deny
/// events the programs could not send.
fn map_pressure(status: &Status, counters: Option<&CounterReader>, out: &mut Families) {
    let conntrack = counters.and_then(|c| c.count_conntrack().map_err(|e| tracing::debug!("counting {}: {e:#}", maps::CONNTRACK)).ok());
    let rows: [(&str, Option<u64>, u32); 5] = [
        (maps::ENDPOINTS, Some(status.endpoints.len() as u64), ENDPOINTS_MAX),
        (maps::IDENTITIES, Some(status.identity_entries as u64), IDENTITIES_MAX),
        (maps::POLICY, Some(status.policy_entries as u64), POLICY_MAX),
        (maps::POLICY_PORTS, Some(status.port_entries as u64), POLICY_PORTS_MAX),
        (maps::CONNTRACK, conntrack, CONNTRACK_MAX),
    ];
    let mut f = out.gauge(
        "netpol_bpf_map_entries",
        "Entries in each BPF map (by pinned name; ENDPOINTS: endpoint ids in use; CONNTRACK2: tracked flows, counted at each scrape).",
    );
    for (map, n, _) in rows {
        if let Some(n) = n {
            f.sample(&[("map", map)], n as f64);
        }
    }
    let mut f = out.gauge("netpol_bpf_map_capacity", "Entries each BPF map holds at most (an LRU map such as CONNTRACK2 evicts its oldest flows when full; the others fail the pods that do not fit closed).");
    for (map, _, cap) in rows {
        f.sample(&[("map", map)], cap as f64);
    }
    let mut f = out.counter("netpol_deny_events_dropped_total", "Flow events (--log-denied, observe) the programs did not send: over the per-CPU rate limit (rate_limited) or with the ring buffer full (ring_full).");
    if let Some(c) = counters {
        for (i, reason) in [(EVENT_DROP_RATE, "rate_limited"), (EVENT_DROP_FULL, "ring_full")] {
            f.sample(&[("reason", reason)], c.read_event_drops(i) as f64);
        }
    }
}

impl Histogram {
    fn family(&self, name: &str, help: &str, out: &mut Families) {
        let mut cum = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(self.buckets)
            .map(|(b, n)| {
                cum += n;
                let mut bucket = Bucket::default();
                bucket.set_upper_bound(*b);
                bucket.set_cumulative_count(cum);
                bucket
            })
            .collect();
        let mut h = HistogramProto::default();
        h.set_bucket(buckets);
        h.set_sample_count(self.count);
        h.set_sample_sum(self.sum);
        let mut m = Metric::default();
        m.set_histogram(h);
        let f = out.family(name, help, MetricType::HISTOGRAM);
        f.0.mut_metric().push(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::sample;

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
        assert_eq!(
            sample(&text, "netpol_pod_isolated_by{namespace=\"a\",pod=\"web\",direction=\"ingress\",policy=\"allow-api\"}"),
            Some(1.0)
        );
    }

    #[test]
    fn render_escapes_labels() {
        let st = Status { endpoints: vec![], syncs: 3, fail_closed: vec![ObjKey::new("a\"b\\c", "x\ny")], ..Default::default() };
        let text = render(&st, true, None);
        assert_eq!(sample(&text, "netpol_syncs_total"), Some(3.0));
        assert_eq!(sample(&text, "netpol_pod_fail_closed{namespace=\"a\\\"b\\\\c\",pod=\"x\\ny\"}"), Some(1.0), "{text}");
    }

    #[test]
    fn map_capacity_is_exported_for_every_map_and_entries_for_those_known() {
        let st = Status { identity_entries: 7, policy_entries: 11, port_entries: 3, ..Default::default() };
        let text = render(&st, true, None);
        assert_eq!(sample(&text, "netpol_bpf_map_entries{map=\"POLICY2\"}"), Some(11.0));
        assert_eq!(sample(&text, "netpol_bpf_map_entries{map=\"IDENTITIES\"}"), Some(7.0));
        assert_eq!(sample(&text, "netpol_bpf_map_entries{map=\"POLICY_PORTS\"}"), Some(3.0));
        assert_eq!(sample(&text, "netpol_bpf_map_entries{map=\"ENDPOINTS\"}"), Some(0.0));
        assert_eq!(sample(&text, "netpol_bpf_map_capacity{map=\"POLICY2\"}"), Some(POLICY_MAX as f64));
        assert_eq!(sample(&text, "netpol_bpf_map_capacity{map=\"CONNTRACK2\"}"), Some(CONNTRACK_MAX as f64));
        // Without the pinned maps there is no conntrack count (rather than a false 0).
        assert_eq!(sample(&text, "netpol_bpf_map_entries{map=\"CONNTRACK2\"}"), None);
    }
}

//! The Prometheus text of `/metrics`: per-pod packet counters read from the pinned BPF maps,
//! per-policy counts, what isolates each pod, the programming-latency histogram and the
//! daemon's gauges, from a [`Status`] snapshot.
use std::collections::BTreeMap;

use netpol_common::{DIR_EGRESS, DIR_INGRESS, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY, VERDICT_SPOOFED};

use super::status::{Histogram, Status, LATENCY_BUCKETS};
use crate::datapath::CounterReader;
use crate::model::ObjKey;

const DIRECTIONS: [(u8, &str); 2] = [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")];

pub(super) fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `namespace="..",pod=".."`, escaped.
fn pod_labels(pod: &ObjKey) -> String {
    format!("namespace=\"{}\",pod=\"{}\"", escape(&pod.namespace), escape(&pod.name))
}

pub fn render(status: &Status, ready: bool, counters: Option<&CounterReader>) -> String {
    let mut out = String::new();
    packets(status, counters, &mut out);
    fragments_early_dropped(status, counters, &mut out);
    policy_allowed(status, counters, &mut out);
    isolation(status, &mut out);
    status.programming_latency.render(
        "netpol_programming_latency_seconds",
        "From a change being observed (manifest written, watch event received) to the maps updated.",
        &mut out,
    );
    gauges(status, ready, &mut out);
    out
}

fn packets(status: &Status, counters: Option<&CounterReader>, out: &mut String) {
    out.push_str("# HELP netpol_packets_total Packets seen by netpol per pod, direction and verdict.\n");
    out.push_str("# TYPE netpol_packets_total counter\n");
    let Some(c) = counters else { return };
    for (id, pod) in &status.endpoints {
        for (dir, dname) in DIRECTIONS {
            for (verdict, vname) in
                [(VERDICT_ALLOW, "allow"), (VERDICT_DENY, "deny"), (VERDICT_AUDIT, "audit"), (VERDICT_SPOOFED, "spoofed")]
            {
                let n = c.read(*id, dir, verdict);
                out.push_str(&format!("netpol_packets_total{{{},direction=\"{dname}\",verdict=\"{vname}\"}} {n}\n", pod_labels(pod)));
            }
        }
    }
}

fn fragments_early_dropped(status: &Status, counters: Option<&CounterReader>, out: &mut String) {
    out.push_str("# HELP netpol_fragments_early_dropped_total Later IP fragments dropped because their datagram's first fragment had not been seen (reordered on the way; also counted as denied).\n# TYPE netpol_fragments_early_dropped_total counter\n");
    let Some(c) = counters else { return };
    for (id, pod) in &status.endpoints {
        for (dir, dname) in DIRECTIONS {
            let n = c.read_frag_early(*id, dir);
            out.push_str(&format!("netpol_fragments_early_dropped_total{{{},direction=\"{dname}\"}} {n}\n", pod_labels(pod)));
        }
    }
}

fn policy_allowed(status: &Status, counters: Option<&CounterReader>, out: &mut String) {
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
            "netpol_policy_allowed_packets_total{{{},direction=\"{}\",policy=\"{}\"}} {n}\n",
            pod_labels(pod),
            if *dir == DIR_INGRESS { "ingress" } else { "egress" },
            escape(policy)
        ));
    }
}

/// What isolates each pod, and the pods failing closed.
fn isolation(status: &Status, out: &mut String) {
    out.push_str("# HELP netpol_pod_isolated_by 1 for each policy isolating a pod in a direction: the policies its default-deny drops (verdict=\"deny\") come from.\n# TYPE netpol_pod_isolated_by gauge\n");
    for (pod, dir, policies) in &status.isolated_by {
        for p in policies {
            out.push_str(&format!("netpol_pod_isolated_by{{{},direction=\"{dir}\",policy=\"{}\"}} 1\n", pod_labels(pod), escape(&p.name)));
        }
    }
    out.push_str("# HELP netpol_pod_fail_closed 1 for a local pod whose map entries do not fit: its isolated directions deny everything.\n# TYPE netpol_pod_fail_closed gauge\n");
    for pod in &status.fail_closed {
        out.push_str(&format!("netpol_pod_fail_closed{{{}}} 1\n", pod_labels(pod)));
    }
}

fn gauges(status: &Status, ready: bool, out: &mut String) {
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
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"));
    }
    out.push_str(&format!(
        "# HELP netpol_syncs_total Datapath syncs done.\n# TYPE netpol_syncs_total counter\nnetpol_syncs_total {}\n",
        status.syncs
    ));
}

impl Histogram {
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
        let st = Status { endpoints: vec![], syncs: 3, ..Default::default() };
        let text = render(&st, true, None);
        assert_eq!(sample(&text, "netpol_syncs_total"), Some(3.0));
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
    }
}

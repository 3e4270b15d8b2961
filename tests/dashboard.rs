//! The Grafana dashboard (deploy/grafana/netpol-dashboard.json): it has what Grafana needs to
//! import it (panels with a grid position and unique ids, targets with expressions, the
//! `${DS_PROMETHEUS}` input, the node/namespace/pod variables), and every PromQL expression in
//! it names only metrics and labels a live lab daemon's /metrics really exports (no browser or
//! Grafana needed). The preview page's own JavaScript is tested by node's test runner when node
//! is on the machine (deploy/grafana/preview/preview.test.mjs).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use netpol_daemon::testkit::exposition;
use serde_json::Value;

mod common;
use common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn dashboard() -> Value {
    let path = repo().join("deploy/grafana/netpol-dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Every PromQL expression: the targets' and the query variables' (`label_values(SELECTOR,
/// LABEL)` read as the selector), each with where it is.
fn expressions(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((format!("panel {:?} target {}", p["title"], t["refId"]), t["expr"].as_str().unwrap_or_default().to_string()));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or_default();
            out.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    out
}

#[test]
fn the_dashboard_has_what_grafana_needs_to_import_it() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 30), "schemaVersion");
    assert_eq!(d["uid"], "netpol-overview");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    // The data source is an input chosen at import, and a variable of the same name for
    // provisioning (the Helm chart's ConfigMap), where inputs are not asked for.
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS" && i["type"] == "datasource" && i["pluginId"] == "prometheus"));
    let vars: BTreeMap<&str, &Value> =
        d["templating"]["list"].as_array().unwrap().iter().map(|v| (v["name"].as_str().unwrap(), v)).collect();
    assert_eq!(vars["DS_PROMETHEUS"]["type"], "datasource");
    for v in ["node", "namespace", "pod"] {
        assert_eq!(vars[v]["type"], "query", "variable {v}");
        assert_eq!(vars[v]["allValue"], ".*", "variable {v}: All matches series without the label too");
    }
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: id"));
        assert!(ids.insert(id), "{title}: id {id} twice");
        let g = &p["gridPos"];
        let [h, w, x, y] = ["h", "w", "x", "y"].map(|k| g[k].as_u64().unwrap_or_else(|| panic!("{title}: gridPos.{k}")));
        assert!(h > 0 && w > 0 && x + w <= 24, "{title}: gridPos {g}");
        // No two panels share a grid cell.
        for cy in y..y + h {
            for cx in x..x + w {
                if let Some(other) = cells.insert((cx, cy), title.clone()) {
                    panic!("{title} overlaps {other} at ({cx}, {cy})");
                }
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}: datasource");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: targets"));
        assert!(!targets.is_empty(), "{title}: no target");
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()), "{title}: target without expr");
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}: target datasource");
        }
    }
    assert!(ids.len() >= 20, "{} panels", ids.len());
}

/// What one expression uses: each metric with its matchers, and the labels its
/// `by`/`on`/`without`/`group_*` lists name.
#[derive(Debug, Default, PartialEq)]
struct Uses {
    metrics: Vec<(String, Vec<Matcher>)>,
    grouping: Vec<String>,
}

/// `label op "value"` in a selector.
#[derive(Debug, PartialEq)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

impl Matcher {
    /// The values it names literally: `=` and `=~` of plain alternatives (`deny|spoofed`),
    /// none for variables, other regexes and negations.
    fn literals(&self) -> Vec<&str> {
        let plain = |v: &str| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        match self.op.as_str() {
            "=" if plain(&self.value) => vec![self.value.as_str()],
            "=~" if self.value.split('|').all(plain) => self.value.split('|').collect(),
            _ => Vec::new(),
        }
    }
}

/// The matchers of a selector's body (`a="x", b=~"y|z"`).
fn matchers(body: &str) -> Vec<Matcher> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(q) = rest.find('"') {
        let head = rest[..q].trim_start_matches([',', ' ']);
        let op_at = head.find(['=', '!', '~']).unwrap_or(head.len());
        let (label, op) = (head[..op_at].trim().to_string(), head[op_at..].trim().to_string());
        let tail = &rest[q + 1..];
        let end = tail.find('"').expect("closing quote");
        out.push(Matcher { label, op, value: tail[..end].to_string() });
        rest = &tail[end + 1..];
    }
    out
}

/// PromQL's keywords: the binary operators' and modifiers', and the aggregation operators
/// (`sum by (x) (...)`: the operator is not followed by its parenthesis).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// A small PromQL reader: enough to find metric names, matchers and grouping labels.
fn uses(expr: &str) -> Uses {
    let mut u = Uses::default();
    // label_values(SELECTOR, LABEL): the selector, and the label as a grouping label.
    let expr = match expr.trim().strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
        Some(inner) => {
            let (sel, label) = inner.rsplit_once(',').unwrap_or((inner, ""));
            u.grouping.push(label.trim().to_string());
            sel.to_string()
        }
        None => expr.to_string(),
    };
    let c: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let ident = |i: &mut usize| {
        let s = *i;
        while *i < c.len() && (c[*i].is_ascii_alphanumeric() || c[*i] == '_' || c[*i] == ':') {
            *i += 1;
        }
        c[s..*i].iter().collect::<String>()
    };
    let skip_ws = |i: &mut usize| {
        while *i < c.len() && c[*i].is_whitespace() {
            *i += 1;
        }
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ch == '[' {
            while i < c.len() && c[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if ch.is_ascii_digit() || ch == '.' {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' {
            let name = ident(&mut i);
            let mut j = i;
            skip_ws(&mut j);
            let list = matches!(name.as_str(), "by" | "without" | "on" | "ignoring" | "group_left" | "group_right");
            if list && j < c.len() && c[j] == '(' {
                let end = j + c[j..].iter().position(|x| *x == ')').expect("closing )");
                let labels: String = c[j + 1..end].iter().collect();
                u.grouping.extend(labels.split(',').map(|l| l.trim().to_string()).filter(|l| !l.is_empty()));
                i = end + 1;
            } else if j < c.len() && c[j] == '(' || KEYWORDS.contains(&name.as_str()) {
                // A function or an operator.
            } else {
                let mut labels = Vec::new();
                if j < c.len() && c[j] == '{' {
                    let end = j + c[j..].iter().position(|x| *x == '}').expect("closing }");
                    labels = matchers(&c[j + 1..end].iter().collect::<String>());
                    i = end + 1;
                }
                u.metrics.push((name, labels));
            }
        } else {
            i += 1;
        }
    }
    u
}

#[test]
fn the_promql_reader_finds_metrics_matchers_and_grouping_labels() {
    let m = |label: &str, op: &str, value: &str| Matcher { label: label.into(), op: op.into(), value: value.into() };
    let u = uses(
        r#"histogram_quantile(0.9, sum by (le) (rate(a_bucket{node=~"$node", x!="1,2", verdict=~"deny|spoofed"}[$__rate_interval]))) and on (instance, job) b"#,
    );
    assert_eq!(
        u.metrics,
        vec![
            ("a_bucket".into(), vec![m("node", "=~", "$node"), m("x", "!=", "1,2"), m("verdict", "=~", "deny|spoofed")]),
            ("b".into(), vec![])
        ]
    );
    assert_eq!(u.grouping, vec!["le", "instance", "job"]);
    let literals: Vec<Vec<&str>> = u.metrics[0].1.iter().map(Matcher::literals).collect();
    assert_eq!(literals, vec![vec![], vec![], vec!["deny", "spoofed"]], "variables and negations name no value");
    assert_eq!(m("map", "=", "CONNTRACK2").literals(), vec!["CONNTRACK2"]);
    let u = uses(r#"label_values(m{node=~"$node"}, pod)"#);
    assert_eq!((u.metrics, u.grouping), (vec![("m".into(), vec![m("node", "=~", "$node")])], vec!["pod".to_string()]));
    assert_eq!(uses("time() - t > 0").metrics, vec![("t".to_string(), vec![])]);
}

/// The labels Prometheus adds to every scraped series: the target's (`instance`, `job`) and
/// `node`, which the chart's monitors (and the preview's scrape configuration) add.
const TARGET_LABELS: &[&str] = &["instance", "job", "node"];

#[test]
fn every_expression_names_only_metrics_and_labels_a_live_daemon_exports() {
    let Some(mut lab) = lab() else { return };
    lab.add_namespace("app", &[]);
    lab.add_pod("app", "server", ip("10.244.0.10"), &[("app", "server")], &[8080], &[]).unwrap();
    lab.add_pod("app", "client", ip("10.244.0.11"), &[("app", "client")], &[], &[]).unwrap();
    lab.add_pod("app", "intruder", ip("10.244.0.12"), &[("app", "intruder")], &[], &[]).unwrap();
    lab.write_cluster_manifest().unwrap();
    lab.write_manifest(
        "p.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server, namespace: app}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]\n",
    )
    .unwrap();
    lab.start_daemon(Path::new(DAEMON)).unwrap();
    // Allowed and denied traffic, so that the per-pod and per-policy families have samples.
    check(&lab, &SERVER_CASES);
    let text = lab.metrics().unwrap();
    let samples = exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    // Per metric, each label with the values it has.
    let mut exported: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (name, labels, _) in &samples {
        let m = exported.entry(name.clone()).or_default();
        for (k, v) in labels {
            m.entry(k.clone()).or_default().insert(v.clone());
        }
    }
    let d = dashboard();
    let mut faults = Vec::new();
    let mut used = BTreeSet::new();
    for (at, expr) in expressions(&d) {
        let u = uses(&expr);
        if u.metrics.is_empty() {
            faults.push(format!("{at}: no metric in {expr:?}"));
        }
        let mut known: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
        for (m, labels) in &u.metrics {
            used.insert(m.clone());
            let Some(have) = exported.get(m) else {
                faults.push(format!("{at}: metric {m} is not exported"));
                continue;
            };
            known.extend(have.keys().cloned());
            for l in labels.iter().filter(|l| !TARGET_LABELS.contains(&l.label.as_str())) {
                let Some(values) = have.get(&l.label) else {
                    faults.push(format!("{at}: {m} has no label {} (it has {:?})", l.label, have.keys()));
                    continue;
                };
                // A value the daemon never exports would leave the panel empty.
                for v in l.literals().into_iter().filter(|v| !values.contains(*v)) {
                    faults.push(format!("{at}: {m}{{{}}} is never {v:?} (it is one of {values:?})", l.label));
                }
            }
        }
        for l in u.grouping.iter().filter(|l| !known.contains(*l)) {
            faults.push(format!("{at}: groups by {l}, which none of {:?} has", u.metrics.iter().map(|m| &m.0).collect::<Vec<_>>()));
        }
    }
    // The legends name labels the series have after their aggregation.
    for p in panels(&d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let legend = t["legendFormat"].as_str().unwrap_or_default();
            let u = uses(t["expr"].as_str().unwrap_or_default());
            for l in legend.split("{{").skip(1).filter_map(|s| s.split_once("}}")).map(|(l, _)| l.trim()) {
                if !u.grouping.iter().any(|g| g == l) {
                    faults.push(format!("panel {:?}: legend {{{{{l}}}}} is not among the labels kept ({:?})", p["title"], u.grouping));
                }
            }
        }
    }
    assert!(faults.is_empty(), "the dashboard against /metrics:\n{}\n--- /metrics ---\n{text}", faults.join("\n"));
    // What the dashboard is for: each of these is on it.
    for m in [
        "netpol_packets_total",
        "netpol_bytes_total",
        "netpol_dropped_packets_total",
        "netpol_policy_allowed_packets_total",
        "netpol_programming_latency_seconds_bucket",
        "netpol_last_sync_duration_seconds",
        "netpol_bpf_map_entries",
        "netpol_bpf_map_capacity",
        "netpol_source_up",
        "netpol_source_errors_total",
        "netpol_kube_events_dropped_total",
        "netpol_deny_events_dropped_total",
        "netpol_flow_events_total",
        "netpol_flow_events_dropped_total",
        "netpol_attached_interfaces",
        "netpol_build_info",
        "netpol_ready",
    ] {
        assert!(used.contains(m), "the dashboard does not show {m}");
    }
}

#[test]
fn the_preview_pages_javascript_passes_its_tests() {
    let Ok(out) = Command::new("node").arg("--version").output() else {
        assert!(std::env::var_os("CI").is_none(), "node is needed for the preview page's tests");
        eprintln!("SKIPPED: no node on this machine");
        return;
    };
    assert!(out.status.success());
    let test = repo().join("deploy/grafana/preview/preview.test.mjs");
    let out = Command::new("node").arg("--test").arg(&test).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

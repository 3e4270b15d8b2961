//! Every manifest in deploy/ parses into typed Kubernetes objects and agrees with the code:
//! RBAC grants exactly get/list/watch on what the daemon watches, the DaemonSet's flags,
//! ports and probes match the daemon's, and the kind e2e script is valid shell.
#[path = "common/manifests.rs"]
mod manifests;

use std::collections::BTreeSet;
use std::process::Command;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use manifests::*;
use netpol_daemon::model;
use serde_json::Value;

/// The objects of the files kustomization.yaml lists (each typed), checking it lists every
/// manifest in deploy/.
fn load() -> (Objects, Vec<String>) {
    let dir = root().join("deploy");
    let kust = documents(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap()).remove(0);
    let resources: Vec<String> = kust["resources"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    on_disk.sort();
    let mut listed = resources.clone();
    listed.sort();
    assert_eq!(listed, on_disk, "kustomization.yaml must list every manifest in deploy/");
    let mut docs = Vec::new();
    for f in &resources {
        docs.extend(documents(&std::fs::read_to_string(dir.join(f)).unwrap()));
    }
    (Objects::of(&docs, "deploy"), resources)
}

#[test]
fn rbac_grants_read_access_to_exactly_the_watched_resources_and_writes_only_events() {
    let (o, _) = load();
    assert_eq!(o.cluster_roles.len(), 1);
    let role = &o.cluster_roles[0];
    let read = BTreeSet::from(["get", "list", "watch"]);
    let (events_group, events, event_verbs) = netpol_daemon::metrics::kube_events::EVENTS_RULE;
    let write = BTreeSet::from_iter(event_verbs.iter().copied());
    let (mut granted, mut written) = (BTreeSet::new(), BTreeSet::new());
    for rule in role.rules.iter().flatten() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(|s| s.as_str()).collect();
        assert!(verbs == read || verbs == write, "read access, or create/patch on Events only: {rule:?}");
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{rule:?}");
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                let into = if verbs == read { &mut granted } else { &mut written };
                into.insert((g.clone(), r.clone()));
            }
        }
    }
    let watched: BTreeSet<(String, String)> =
        netpol_daemon::source::kube::WATCHED.iter().map(|(g, r)| (g.to_string(), r.to_string())).collect();
    assert_eq!(granted, watched, "the ClusterRole must cover exactly the watched resources");
    assert_eq!(written, BTreeSet::from([(events_group.to_string(), events.to_string())]), "writes: events.k8s.io Events only");
    let b = &o.cluster_bindings[0];
    assert_eq!(b.role_ref.name, role.metadata.name.clone().unwrap());
    let sa = &o.accounts[0];
    let subj = &b.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subj.kind.as_str(), Some(&subj.name), subj.namespace.as_ref()),
        ("ServiceAccount", sa.metadata.name.as_ref(), sa.metadata.namespace.as_ref())
    );
    assert_eq!(sa.metadata.namespace, o.namespaces[0].metadata.name);
}

#[test]
fn daemonset_agrees_with_the_daemon() {
    let (o, _) = load();
    let ds = &o.daemonsets[0];
    let spec = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(spec.host_network, Some(true), "the daemon needs the node's network namespace");
    assert_eq!(spec.service_account_name.as_deref(), o.accounts[0].metadata.name.as_deref());
    let c = &spec.containers[0];
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "run");
    assert!(!args.iter().any(|a| a.starts_with("--manifests")), "in a cluster the daemon watches the API");
    let flag = |name: &str| args.iter().find_map(|a| a.strip_prefix(&format!("--{name}=")).map(|s| s.to_string()));
    let metrics: std::net::SocketAddr = flag("metrics-addr").unwrap().parse().unwrap();
    let port = c.ports.as_ref().unwrap().iter().find(|p| p.name.as_deref() == Some("metrics")).unwrap();
    assert_eq!(port.container_port as u16, metrics.port());
    for (probe, path) in [(c.readiness_probe.as_ref().unwrap(), "/readyz"), (c.liveness_probe.as_ref().unwrap(), "/healthz")] {
        let h = probe.http_get.as_ref().unwrap();
        assert_eq!(h.path.as_deref(), Some(path));
        assert_eq!(h.port, IntOrString::Int(metrics.port() as i32));
    }
    // The pin directory lives on the host's bpffs mount.
    let bpffs = flag("bpffs").unwrap();
    let mount = c.volume_mounts.as_ref().unwrap().iter().find(|m| bpffs.starts_with(&m.mount_path)).expect("bpffs mount");
    let vol = spec.volumes.as_ref().unwrap().iter().find(|v| v.name == mount.name).unwrap();
    assert_eq!(vol.host_path.as_ref().unwrap().path, "/sys/fs/bpf");
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"), "the host's bpffs, as mounted by the init container");
    // NODE_NAME from the downward API (the daemon reads it for --node-name).
    let env = c.env.as_ref().unwrap().iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(env.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "spec.nodeName");
    // The smallest capability set: no privileged mode, everything dropped but what loading
    // and attaching BPF programs needs.
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.clone().unwrap(), vec!["ALL"]);
    let add: BTreeSet<String> = caps.add.clone().unwrap().into_iter().collect();
    assert_eq!(add, BTreeSet::from(["BPF".into(), "NET_ADMIN".into(), "PERFMON".into()]));
    // The daemon accepts exactly these arguments.
    let out = Command::new(env!("CARGO_BIN_EXE_netpol-daemon")).args(&args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn kind_file(name: &str) -> String {
    std::fs::read_to_string(root().join("tests/kind").join(name)).unwrap_or_else(|e| panic!("tests/kind/{name}: {e}"))
}

/// Runs `snippet` in bash with tests/kind/run.sh's functions defined (sourced: main does not
/// run), returning its status and standard output.
fn with_script(snippet: &str, stdin: &str) -> (bool, String) {
    with_script_on_path(snippet, stdin, None)
}

/// The same with `bin` first on PATH (stand-ins for docker, kind, kubectl).
fn with_script_on_path(snippet: &str, stdin: &str, bin: Option<&std::path::Path>) -> (bool, String) {
    use std::io::Write;
    let path = match bin {
        Some(b) => format!("{}:{}", b.display(), std::env::var("PATH").unwrap_or_default()),
        None => std::env::var("PATH").unwrap_or_default(),
    };
    let mut child = Command::new("bash")
        .env("PATH", path)
        .arg("-c")
        .arg(format!("set -euo pipefail; source '{}'; {snippet}", root().join("tests/kind/run.sh").display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
}

#[test]
fn kind_script_is_valid_shell_and_passes_shellcheck() {
    let script = root().join("tests/kind/run.sh");
    let st = Command::new("bash").arg("-n").arg(&script).status().unwrap();
    assert!(st.success());
    // `cargo xtask setup` installs shellcheck (Debian's).
    let out = Command::new("shellcheck").arg(&script).output().expect("shellcheck: run `cargo xtask setup`");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn kind_cluster_has_no_default_cni() {
    let cfg = documents(&kind_file("kind-config.yaml")).remove(0);
    assert_eq!((cfg["kind"].as_str(), cfg["apiVersion"].as_str()), (Some("Cluster"), Some("kind.x-k8s.io/v1alpha4")));
    // kindnet enforces NetworkPolicy itself: it must not be installed.
    assert_eq!(cfg["networking"]["disableDefaultCNI"], Value::Bool(true), "kind-config.yaml: networking.disableDefaultCNI");
    let roles: Vec<&str> = cfg["nodes"].as_array().unwrap().iter().map(|n| n["role"].as_str().unwrap()).collect();
    assert_eq!(roles.iter().filter(|r| **r == "control-plane").count(), 1);
    assert!(roles.iter().filter(|r| **r == "worker").count() >= 2, "two workers: the probe's pods on two nodes");
    let script = kind_file("run.sh");
    assert!(script.contains(r#"--config "$KIND_DIR/kind-config.yaml""#), "run.sh creates the cluster from kind-config.yaml");
    // The masquerade rule spares traffic inside the pod subnet (policies match pod sources).
    let pods = cfg["networking"]["podSubnet"].as_str().unwrap();
    assert!(script.contains(&format!("-s {pods} ! -d {pods} -j MASQUERADE")), "run.sh masquerades only what leaves {pods}");
}

#[test]
fn kind_cni_is_the_reference_plugins_and_enforces_nothing() {
    let (ok, text) = with_script("render_cni_conflist 10.244.2.0/24", "");
    assert!(ok);
    let conf: Value = serde_json::from_str(&text).expect("the rendered conflist is JSON");
    let plugins = conf["plugins"].as_array().unwrap();
    let types: Vec<&str> = plugins.iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["ptp", "portmap"], "reference plugins only (the kind node image ships them)");
    let ptp = &plugins[0];
    assert_eq!(ptp["ipam"]["type"], "host-local");
    assert_eq!(ptp["ipam"]["ranges"][0][0]["subnet"], "10.244.2.0/24", "the node's podCIDR");
    // No masquerade between pods: a peer's address is what policies match.
    assert_eq!(ptp["ipMasq"], Value::Bool(false));
    assert!(!text.contains("@POD_CIDR@"));
}

#[test]
fn kind_script_finds_other_enforcers_and_counts_passes() {
    let pods = "kube-system/kube-proxy-x2 registry.k8s.io/kube-proxy:v1.35.0 \n\
                kube-system/coredns-1 registry.k8s.io/coredns/coredns:v1.12.0 \n\
                netpol-system/netpol-abcde netpol:0.1.0 \n";
    let (ok, found) = with_script("other_enforcers", pods);
    assert!(ok && found.is_empty(), "nothing of these enforces: {found}");
    for enforcer in [
        "kube-system/kindnet-7xk2p docker.io/kindest/kindnetd:v20250512",
        "kube-system/kube-network-policies-a registry.k8s.io/networking/kube-network-policies:v0.9",
        "calico-system/calico-node-1 quay.io/calico/node:v3.30",
        "kube-system/cilium-9 quay.io/cilium/cilium:v1.18",
    ] {
        let (_, found) = with_script("other_enforcers", &format!("{pods}{enforcer}\n"));
        assert_eq!(found.trim(), enforcer, "run.sh must refuse to test with {enforcer} present");
    }
    let log = std::env::temp_dir().join(format!("netpol-kind-e2e-{}.log", std::process::id()));
    std::fs::write(&log, "Ran 78 of 7205 Specs in 1634.2 seconds\nFAIL! -- 76 Passed | 2 Failed | 0 Pending | 7127 Skipped\n").unwrap();
    let (ok, count) = with_script(&format!("pass_count '{}'", log.display()), "");
    std::fs::write(&log, "panic before any spec ran\n").unwrap();
    let (none_ok, _) = with_script(&format!("pass_count '{}'", log.display()), "");
    std::fs::remove_file(&log).unwrap();
    assert!(ok);
    assert_eq!(count.trim(), "76 passed, 2 failed");
    assert!(!none_ok, "no summary: pass_count fails");
    let (ok, version) = with_script("app_version", "");
    assert!(ok);
    assert_eq!(version.trim(), workspace_package("version"), "the image tag run.sh builds is the chart's appVersion");
}

#[test]
fn kind_probe_is_a_deny_all_policy_between_two_nodes() {
    let docs = documents(&kind_file("probe.yaml"));
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Namespace", "Pod", "Pod", "NetworkPolicy"]);
    let server: Pod = typed(&docs[1], "probe.yaml: Pod server");
    let client: Pod = typed(&docs[2], "probe.yaml: Pod client");
    let policy: NetworkPolicy = typed(&docs[3], "probe.yaml: NetworkPolicy");
    let ps = policy.spec.unwrap();
    assert_eq!(ps.pod_selector.unwrap().match_labels, server.metadata.labels, "the policy isolates the server");
    assert_eq!(ps.policy_types.unwrap(), vec!["Ingress"]);
    assert!(ps.ingress.is_none(), "no ingress rule: everything to the server is denied");
    let anti = client.spec.unwrap().affinity.unwrap().pod_anti_affinity.unwrap();
    let term = &anti.required_during_scheduling_ignored_during_execution.unwrap()[0];
    assert_eq!(term.topology_key, "kubernetes.io/hostname");
    assert_eq!(term.label_selector.as_ref().unwrap().match_labels, server.metadata.labels);
    let port = server.spec.unwrap().containers[0].ports.clone().unwrap()[0].container_port;
    assert!(kind_file("run.sh").contains(&format!(r#""$ip:{port}""#)), "run.sh probes the server's port {port}");
}

#[test]
fn license_files_match_cargo_toml() {
    let license = workspace_package("license");
    let ids: Vec<&str> = license.split(" OR ").flat_map(|s| s.split(" AND ")).map(|s| s.trim_matches(|c| c == '(' || c == ')')).collect();
    // One license: LICENSE; several: LICENSE-<NAME> each (the Rust convention).
    for id in &ids {
        let (suffix, marker) = match *id {
            "Apache-2.0" => ("APACHE", "Apache License\n                           Version 2.0, January 2004"),
            "MIT" => ("MIT", "Permission is hereby granted, free of charge"),
            other => panic!("Cargo.toml: license {other}: no known text (add its LICENSE file and a marker here)"),
        };
        let file = if ids.len() == 1 { "LICENSE".to_string() } else { format!("LICENSE-{suffix}") };
        let text = std::fs::read_to_string(root().join(&file)).unwrap_or_else(|e| panic!("{file} for Cargo.toml's license {license}: {e}"));
        assert!(text.contains(marker), "{file} is not the {id} text");
    }
    let docker = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(docker.contains(&format!("org.opencontainers.image.licenses=\"{license}\"")), "deploy/Dockerfile: the image's license label");
    let chart = std::fs::read_to_string(root().join("deploy/chart/Chart.yaml")).unwrap();
    assert!(chart.contains(&format!("artifacthub.io/license: {license}")), "Chart.yaml: the license annotation");
}

/// install_cni against stand-ins for kind, kubectl and docker (three nodes): each node gets
/// the conflist with its own podCIDR, a route to each other node's pods via that node, and
/// the masquerade rule; a node image without the plugins is refused.
#[test]
fn kind_script_wires_every_node_to_every_other() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("netpol-kind-stubs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stub = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    let log = dir.join("calls.log");
    stub("kind", "printf 'n1\\nn2\\nn3\\n'");
    stub(
        "kubectl",
        r#"[[ $1 == wait ]] && exit 0
n="${3#n}"
case "$5" in
  *podCIDR*) echo "10.244.$n.0/24" ;;
  *InternalIP*) echo "172.18.0.1$n" ;;
esac"#,
    );
    stub(
        "docker",
        &format!(
            r#"shift; if [[ $1 == -i ]]; then shift; node="$1"; cat >"{d}/$node.conflist"; exit 0; fi
node="$1"; shift
if [[ $1 == test ]]; then [[ ! -e "{d}/no-plugins-$node" ]]; exit; fi
echo "$node: $*" >>"{l}""#,
            d = dir.display(),
            l = log.display()
        ),
    );
    let (ok, _) = with_script_on_path("install_cni", "", Some(&dir));
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    let confs: Vec<String> = (1..=3).map(|n| std::fs::read_to_string(dir.join(format!("n{n}.conflist"))).unwrap_or_default()).collect();
    std::fs::write(dir.join("no-plugins-n2"), "").unwrap();
    let (refused_ok, _) = with_script_on_path("install_cni 2>/dev/null", "", Some(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(ok, "install_cni failed: {calls}");
    for n in 1..=3 {
        let conf: Value = serde_json::from_str(&confs[n - 1]).unwrap_or_else(|e| panic!("n{n}.conflist: {e}"));
        assert_eq!(conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], format!("10.244.{n}.0/24"), "n{n}: its own podCIDR");
        assert!(calls.contains(&format!("n{n}: iptables -t nat -A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE")));
        for m in (1..=3).filter(|m| *m != n) {
            assert!(calls.contains(&format!("n{n}: ip route replace 10.244.{m}.0/24 via 172.18.0.1{m}")), "n{n} -> n{m}: {calls}");
        }
    }
    assert_eq!(calls.lines().filter(|l| l.contains("ip route")).count(), 6, "{calls}");
    assert!(!refused_ok, "a node without the CNI plugins must stop the script");
}

/// deploy/crds: upstream's experimental ClusterNetworkPolicy CRD as vendored (its header names
/// where from, and the license), installed by its own kustomization, serving exactly the
/// resource the daemon watches; the kind e2e installs it.
#[test]
fn the_vendored_crd_is_upstreams_and_serves_what_the_daemon_watches() {
    let text = std::fs::read_to_string(root().join(CNP_CRD)).unwrap();
    for says in [
        "https://github.com/kubernetes-sigs/network-policy-api",
        "config/crd/experimental/policy.networking.k8s.io_clusternetworkpolicies.yaml",
        "0eec1b0e5fa92715b4c0f4c48d3c8d2913ed2159",
        "Apache-2.0",
    ] {
        assert!(text.lines().take_while(|l| l.starts_with('#')).any(|l| l.contains(says)), "{CNP_CRD}: its header must name {says}");
    }
    let rendered = kustomize("deploy/crds");
    assert_eq!(rendered, documents(&text), "deploy/crds installs the file as vendored");
    let o = Objects::of(&rendered, "deploy/crds");
    let spec = &o.crds[0].spec;
    assert_eq!(
        (spec.group.as_str(), spec.names.plural.as_str(), spec.names.kind.as_str()),
        (model::CLUSTER_POLICY_GROUP, model::CLUSTER_POLICY_PLURAL, model::CLUSTER_POLICY_KIND)
    );
    assert_eq!(spec.scope, "Cluster");
    assert!(netpol_daemon::source::kube::WATCHED.contains(&(model::CLUSTER_POLICY_GROUP, model::CLUSTER_POLICY_PLURAL)));
    let version = spec.versions.iter().find(|v| v.name == model::CLUSTER_POLICY_VERSION).expect("the version netpol reads");
    assert!(version.served && version.storage);
    // The experimental channel: egress peers have nodes (and domainNames) fields.
    let schema = serde_json::to_value(&version.schema).unwrap();
    let peer = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["egress"]["items"]["properties"]["to"]["items"]["properties"];
    assert!(peer.get("nodes").is_some() && peer.get("domainNames").is_some(), "not the experimental CRD: {peer}");
    let script = kind_file("run.sh");
    assert!(script.contains(r#"kubectl apply -k "$ROOT/deploy/crds""#), "run.sh installs the CRD (kustomize)");
    assert!(script.contains("clusterNetworkPolicy.installCRD=true"), "run.sh installs the CRD (helm)");
}

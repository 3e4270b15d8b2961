//! Every manifest in deploy/ parses into typed Kubernetes objects and agrees with the code:
//! RBAC grants exactly get/list/watch on what the daemon watches, the DaemonSet's flags,
//! ports and probes match the daemon's, and the kind e2e script is valid shell.
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemonsets: Vec<DaemonSet>,
}

fn load() -> (Objects, Vec<String>) {
    let dir = root().join("deploy");
    let kust: serde_norway::Value = serde_norway::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap()).unwrap();
    let resources: Vec<String> = kust["resources"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
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
    let mut o = Objects::default();
    for f in &resources {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = serde_norway::Value::deserialize(doc).unwrap();
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            let ctx = format!("{f}: {kind}");
            match kind.as_str() {
                "Namespace" => o.namespaces.push(serde_norway::from_value(v).expect(&ctx)),
                "ServiceAccount" => o.accounts.push(serde_norway::from_value(v).expect(&ctx)),
                "ClusterRole" => o.roles.push(serde_norway::from_value(v).expect(&ctx)),
                "ClusterRoleBinding" => o.bindings.push(serde_norway::from_value(v).expect(&ctx)),
                "DaemonSet" => o.daemonsets.push(serde_norway::from_value(v).expect(&ctx)),
                other => panic!("{f}: unexpected kind {other:?}"),
            }
        }
    }
    (o, resources)
}

#[test]
fn rbac_grants_read_access_to_exactly_the_watched_resources_and_writes_only_events() {
    let (o, _) = load();
    assert_eq!(o.roles.len(), 1);
    let role = &o.roles[0];
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
    let b = &o.bindings[0];
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

#[test]
fn kind_script_is_valid_shell() {
    let script = root().join("tests/kind/run.sh");
    let st = Command::new("bash").arg("-n").arg(&script).status().unwrap();
    assert!(st.success());
    match Command::new("shellcheck").arg(&script).output() {
        Ok(out) => assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout)),
        Err(e) => {
            // `cargo xtask setup` installs shellcheck; CI must have it.
            assert!(std::env::var_os("CI").is_none(), "shellcheck missing in CI: {e}");
            eprintln!("SKIPPED shellcheck: {e}");
        }
    }
}

//! The Helm chart in deploy/chart, rendered by the real `helm template` and checked by
//! `helm lint` (both installed by `cargo xtask setup`): its version is the workspace's, every
//! `netpol-daemon run` flag has a value the daemon accepts, its defaults are the daemon's, the
//! kustomize manifests in deploy/ are its default rendering, the daemon needs no CAP_SYS_ADMIN
//! and pins on the host's bpffs, and `helm uninstall` runs `netpol-daemon uninstall` on every
//! node first.
#[path = "common/manifests.rs"]
mod manifests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use manifests::*;
use serde_json::Value;

const DAEMON: &str = env!("CARGO_BIN_EXE_netpol-daemon");

fn chart_yaml() -> Value {
    documents(&std::fs::read_to_string(root().join(CHART).join("Chart.yaml")).unwrap()).remove(0)
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.template.spec.as_ref().unwrap()
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"))
}

fn daemon_args(o: &Objects) -> Vec<String> {
    container(pod_spec(o.daemonset(RELEASE)), "netpol").args.clone().unwrap()
}

#[test]
fn chart_version_app_version_and_image_tag_are_the_workspace_version() {
    let version = workspace_package("version");
    let chart = chart_yaml();
    assert_eq!(chart["version"], version.as_str(), "Chart.yaml: version");
    assert_eq!(chart["appVersion"], version.as_str(), "Chart.yaml: appVersion");
    for (source, o) in [("chart", Objects::of(&helm_template(&[]), "chart")), ("kustomize", Objects::of(&kustomize("deploy"), "deploy"))] {
        let spec = pod_spec(o.daemonset(RELEASE));
        for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
            assert_eq!(c.image.as_deref(), Some(format!("netpol:{version}").as_str()), "{source}: container {}: image", c.name);
            assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"), "{source}: container {}: imagePullPolicy", c.name);
        }
    }
    // The tag follows a set value.
    let o = Objects::of(&helm_template(&["image.repository=registry.example/netpol", "image.tag=9.9.9"]), "chart");
    assert_eq!(container(pod_spec(o.daemonset(RELEASE)), "netpol").image.as_deref(), Some("registry.example/netpol:9.9.9"));
}

#[test]
fn helm_lint_passes_at_the_defaults_and_with_every_option_on() {
    let helm = tool("helm");
    run(Command::new(&helm).current_dir(root()).args(["lint", "--strict", CHART]));
    run(Command::new(&helm).current_dir(root()).args(["lint", "--strict", CHART]).args([
        "--set",
        "metrics.podMonitor.enabled=true,metrics.serviceMonitor.enabled=true,daemon.manifestsHostPath=/var/lib/netpol,daemon.audit=true,grafana.dashboard.enabled=true,clusterNetworkPolicy.installCRD=true",
    ]));
}

#[test]
fn values_are_typed_by_the_schema() {
    for (set, says) in [
        ("daemon.flowCache=off", "/daemon/flowCache"),
        ("daemon.established=sometimes", "/daemon/established"),
        ("daemon.logDenied=-1", "/daemon/logDenied"),
        ("image.tag=dev", "/image/tag"),
        ("metrics.port=99999", "/metrics/port"),
        ("bpffs.pinDir=/var/run/netpol", "/bpffs/pinDir"),
        ("daemon.flowcache=true", "flowcache"),
    ] {
        let err = helm_template_error(&[set]);
        assert!(err.contains(says), "--set {set}: helm must name {says}: {err}");
    }
}

/// Each `netpol-daemon run` flag, the value that sets it, and what that renders.
const FLAG_VALUES: &[(&str, &str, &str)] = &[
    ("metrics-addr", "metrics.address=127.0.0.1,metrics.port=9988", "--metrics-addr=127.0.0.1:9988"),
    ("bpffs", "bpffs.pinDir=/sys/fs/bpf/netpol-b", "--bpffs=/sys/fs/bpf/netpol-b"),
    ("manifests", "daemon.manifestsHostPath=/var/lib/netpol", "--manifests=/etc/netpol/manifests"),
    ("allow-private-bpffs", "daemon.allowPrivateBpffs=true", "--allow-private-bpffs"),
    ("poll-ms", "daemon.pollMs=50", "--poll-ms=50"),
    ("crd-recheck-ms", "clusterNetworkPolicy.crdRecheckMs=500", "--crd-recheck-ms=500"),
    ("liveness-timeout", "daemon.livenessTimeoutSeconds=45", "--liveness-timeout=45"),
    ("attach", "daemon.attach=tc", "--attach=tc"),
    ("established", "daemon.established=revalidate", "--established=revalidate"),
    ("ct-tcp-timeout", "daemon.conntrack.tcpTimeoutSeconds=100", "--ct-tcp-timeout=100"),
    ("ct-udp-timeout", "daemon.conntrack.udpTimeoutSeconds=101", "--ct-udp-timeout=101"),
    ("ct-other-timeout", "daemon.conntrack.otherTimeoutSeconds=102", "--ct-other-timeout=102"),
    ("flow-cache", "daemon.flowCache=false", "--flow-cache=off"),
    ("log-denied", "daemon.logDenied=7", "--log-denied=7"),
    ("audit", "daemon.audit=true", "--audit"),
    ("bpf-debug", "daemon.bpfDebug=true", "--bpf-debug"),
    ("log-format", "daemon.logFormat=json", "--log-format=json"),
];

#[test]
fn every_run_flag_has_a_value_and_the_daemon_accepts_what_the_chart_renders() {
    let flags: BTreeSet<String> = flags_of(Path::new(DAEMON), "run").into_iter().map(|(n, _)| n).collect();
    // --node-name is each node's own: the downward API sets NODE_NAME (checked below).
    let mut covered: BTreeSet<String> = FLAG_VALUES.iter().map(|(f, _, _)| f.to_string()).collect();
    covered.insert("node-name".into());
    assert_eq!(flags, covered, "netpol-daemon run's flags vs the chart's values (add a value to deploy/chart and FLAG_VALUES)");
    let sets: Vec<&str> = FLAG_VALUES.iter().map(|(_, s, _)| *s).collect();
    let o = Objects::of(&helm_template(&sets), "chart");
    let args = daemon_args(&o);
    for (flag, set, expect) in FLAG_VALUES {
        assert!(args.iter().any(|a| a == expect), "--set {set}: expected {expect} in {args:?} (--{flag})");
    }
    let spec = pod_spec(o.daemonset(RELEASE));
    let c = container(spec, "netpol");
    // The manifests directory is the node's, mounted read-only where --manifests points.
    let m = c.volume_mounts.iter().flatten().find(|m| m.mount_path == "/etc/netpol/manifests").expect("manifests mount");
    assert_eq!(m.read_only, Some(true));
    let v = spec.volumes.iter().flatten().find(|v| v.name == m.name).unwrap();
    assert_eq!(v.host_path.as_ref().unwrap().path, "/var/lib/netpol");
    let port = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some("metrics")).unwrap();
    assert_eq!(port.container_port, 9988);
    for args in [args, daemon_args(&Objects::of(&helm_template(&[]), "chart"))] {
        let out = Command::new(DAEMON).args(&args).arg("--help").output().unwrap();
        assert!(out.status.success(), "the daemon refuses {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn chart_defaults_are_the_daemons_defaults() {
    let args = daemon_args(&Objects::of(&helm_template(&[]), "chart"));
    for (flag, default) in flags_of(Path::new(DAEMON), "run") {
        let rendered = arg(&args, &flag);
        match (flag.as_str(), default) {
            // Set explicitly: the chart's port is 9977 (9090 is Prometheus' own).
            ("metrics-addr", _) => assert_eq!(rendered, Some("0.0.0.0:9977")),
            ("node-name", _) => assert_eq!(rendered, None, "NODE_NAME comes from the downward API"),
            (_, Some(d)) => assert_eq!(rendered, Some(d.as_str()), "--{flag}: the chart's default differs from the daemon's"),
            // Switches and optional flags stay off.
            (_, None) => assert_eq!(rendered, None, "--{flag} is set by default"),
        }
    }
}

fn json<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap()
}

#[test]
fn kustomize_manifests_are_the_charts_default_rendering() {
    let (chart, kust) = (Objects::of(&helm_template(&[]), "chart"), Objects::of(&kustomize("deploy"), "deploy"));
    let (c, k) = (chart.daemonset(RELEASE), kust.daemonset(RELEASE));
    assert_eq!(json(pod_spec(c)), json(pod_spec(k)), "DaemonSet netpol: spec.template.spec (args, capabilities, volumes, probes)");
    let (cs, ks) = (&c.spec, &k.spec);
    assert_eq!(json(&cs.selector), json(&ks.selector), "DaemonSet netpol: spec.selector");
    assert_eq!(json(&cs.update_strategy), json(&ks.update_strategy), "DaemonSet netpol: spec.updateStrategy");
    assert_eq!(json(&cs.template.metadata.as_ref().unwrap().labels), json(&ks.template.metadata.as_ref().unwrap().labels));
    assert_eq!(c.metadata.namespace, k.metadata.namespace);
    assert_eq!(json(&chart.cluster_roles[0].rules), json(&kust.cluster_roles[0].rules), "ClusterRole netpol: rules");
    assert_eq!(json(&chart.cluster_bindings[0].subjects), json(&kust.cluster_bindings[0].subjects), "ClusterRoleBinding netpol: subjects");
    assert_eq!(json(&chart.cluster_bindings[0].role_ref), json(&kust.cluster_bindings[0].role_ref));
    let names = |o: &Objects| o.accounts.iter().map(|a| a.metadata.name.clone().unwrap()).collect::<BTreeSet<_>>();
    assert_eq!(names(&chart), BTreeSet::from(["netpol".to_string(), "netpol-uninstall".to_string()]));
    assert_eq!(names(&kust), BTreeSet::from(["netpol".to_string()]));
    // The uninstall: the hook's Job, Role and DaemonSet are deploy/uninstall's.
    let ku = Objects::of(&kustomize("deploy/uninstall"), "deploy/uninstall");
    assert_eq!(json(&chart.jobs[0].spec), json(&ku.jobs[0].spec), "Job netpol-uninstall: spec");
    assert_eq!(json(&chart.roles[0].rules), json(&ku.roles[0].rules), "Role netpol-uninstall: rules");
    assert_eq!(json(&chart.bindings[0].subjects), json(&ku.bindings[0].subjects), "RoleBinding netpol-uninstall: subjects");
    assert_eq!(json(&chart.uninstall_daemonset()), json(&ku.uninstall_daemonset()), "the uninstall DaemonSet");
    assert_eq!(ku.jobs[0].metadata.namespace.as_deref(), Some(NAMESPACE));
}

/// The daemon's pod (chart or kustomize): pins on the host's bpffs, no CAP_SYS_ADMIN in the
/// daemon, the init container the only privileged one.
fn check_bpffs_and_privileges(ds: &DaemonSet, source: &str) {
    let spec = pod_spec(ds);
    let c = container(spec, "netpol");
    let pin = arg(c.args.as_ref().unwrap(), "bpffs").unwrap();
    let mount = c.volume_mounts.iter().flatten().find(|m| Path::new(pin).starts_with(&m.mount_path)).expect("a mount holding --bpffs");
    assert_eq!(mount.mount_path, "/sys/fs/bpf", "{source}: the pins are on the bpffs mount");
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"), "{source}: the daemon sees the host's later mounts");
    let vol = spec.volumes.iter().flatten().find(|v| v.name == mount.name).unwrap();
    let hp = vol.host_path.as_ref().expect("bpffs is a hostPath");
    assert_eq!((hp.path.as_str(), hp.type_.as_deref()), ("/sys/fs/bpf", Some("DirectoryOrCreate")), "{source}");
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false), "{source}");
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{source}");
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.clone().unwrap(), vec!["ALL"], "{source}");
    let add: BTreeSet<String> = caps.add.clone().unwrap().into_iter().collect();
    assert_eq!(add, BTreeSet::from(["BPF".into(), "NET_ADMIN".into(), "PERFMON".into()]), "{source}: no SYS_ADMIN");
    // The init container mounts bpffs where the node has none, and the mount reaches the host.
    let inits = spec.init_containers.as_ref().expect("the mount-bpffs init container");
    assert_eq!(inits.len(), 1);
    let init = &inits[0];
    assert_eq!(init.security_context.as_ref().unwrap().privileged, Some(true), "{source}: Bidirectional needs privileged");
    let im = init.volume_mounts.iter().flatten().find(|m| m.name == mount.name).unwrap();
    assert_eq!((im.mount_path.as_str(), im.mount_propagation.as_deref()), ("/sys/fs/bpf", Some("Bidirectional")), "{source}");
    let script = init.args.as_ref().unwrap().join(" ");
    assert!(script.contains("mount -t bpf bpf /sys/fs/bpf") && script.contains("/proc/mounts"), "{source}: {script}");
    // A node agent: every Linux node, tainted or not, never evicted first.
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"), "{source}");
    assert_eq!(spec.node_selector.clone().unwrap(), BTreeMap::from([("kubernetes.io/os".into(), "linux".into())]), "{source}");
    let tol = spec.tolerations.as_ref().unwrap();
    assert!(tol.iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()), "{source}: tolerate all");
}

#[test]
fn daemon_has_no_sys_admin_and_pins_on_the_hosts_bpffs() {
    check_bpffs_and_privileges(Objects::of(&helm_template(&[]), "chart").daemonset(RELEASE), "chart");
    check_bpffs_and_privileges(Objects::of(&kustomize("deploy"), "deploy").daemonset(RELEASE), "kustomize");
    // Without the init container (nodes that mount bpffs themselves) nothing is privileged.
    let o = Objects::of(&helm_template(&["bpffs.mountInitContainer=false"]), "chart");
    assert!(pod_spec(o.daemonset(RELEASE)).init_containers.is_none());
}

#[test]
fn monitors_are_off_by_default_and_select_the_daemons_metrics_port() {
    let o = Objects::of(&helm_template(&[]), "chart");
    assert!(o.monitors.is_empty() && o.services.is_empty(), "no PodMonitor, ServiceMonitor or Service by default");
    let o = Objects::of(
        &helm_template(&[
            "metrics.podMonitor.enabled=true",
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.labels.release=prom",
        ]),
        "chart",
    );
    let ds = o.daemonset(RELEASE);
    let pod_labels = ds.spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    let port = container(pod_spec(ds), "netpol").ports.clone().unwrap().into_iter().find(|p| p.name.as_deref() == Some("metrics")).unwrap();
    let selects = |sel: &Value, labels: &BTreeMap<String, String>| {
        let sel = sel["matchLabels"].as_object().expect("matchLabels");
        !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k).map(|s| s.as_str()) == v.as_str())
    };
    let pm = o.monitors.iter().find(|m| m["kind"] == "PodMonitor").expect("PodMonitor");
    assert!(selects(&pm["spec"]["selector"], &pod_labels), "PodMonitor selects the daemon pods: {pm}");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");
    let sm = o.monitors.iter().find(|m| m["kind"] == "ServiceMonitor").expect("ServiceMonitor");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom", "ServiceMonitor: labels for Prometheus' selector");
    let svc = &o.services[0];
    let svc_labels = svc.metadata.labels.clone().unwrap();
    assert!(selects(&sm["spec"]["selector"], &svc_labels), "ServiceMonitor selects the Service");
    let ss = svc.spec.as_ref().unwrap();
    assert!(ss.selector.as_ref().unwrap().iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "the Service selects the daemon pods");
    let sp = &ss.ports.as_ref().unwrap()[0];
    assert_eq!((sp.name.as_deref(), sp.port), (Some("metrics"), port.container_port));
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    // Both keep the daemon's own namespace/pod labels (the pod a count is about, not the
    // daemon's pod) and label each series with its node, as the dashboard expects.
    for ep in [&pm["spec"]["podMetricsEndpoints"][0], &sm["spec"]["endpoints"][0]] {
        assert_eq!(ep["honorLabels"], true, "{ep}");
        let r = &ep["relabelings"][0];
        assert_eq!(
            (r["sourceLabels"][0].as_str(), r["targetLabel"].as_str()),
            (Some("__meta_kubernetes_pod_node_name"), Some("node")),
            "{ep}"
        );
    }
}

#[test]
fn the_grafana_dashboard_is_an_optional_configmap_for_grafanas_sidecar() {
    let is_dashboard = |c: &&k8s_openapi::api::core::v1::ConfigMap| {
        c.metadata.labels.as_ref().and_then(|l| l.get("grafana_dashboard")).map(String::as_str) == Some("1")
    };
    let o = Objects::of(&helm_template(&[]), "chart");
    assert!(!o.config_maps.iter().any(|c| is_dashboard(&c)), "no dashboard ConfigMap by default");
    let o = Objects::of(
        &helm_template(&[
            "grafana.dashboard.enabled=true",
            "grafana.dashboard.namespace=monitoring",
            "grafana.dashboard.annotations.grafana_folder=netpol",
        ]),
        "chart",
    );
    let cm = o.config_maps.iter().find(is_dashboard).expect("a ConfigMap labelled grafana_dashboard: \"1\"");
    assert_eq!(cm.metadata.namespace.as_deref(), Some("monitoring"));
    assert_eq!(cm.metadata.annotations.as_ref().unwrap()["grafana_folder"], "netpol");
    let data = cm.data.as_ref().expect("data");
    assert_eq!(data.len(), 1, "one dashboard");
    // The chart ships deploy/grafana's dashboard as it is (through the symlink in the chart).
    let shipped = std::fs::read_to_string(root().join("deploy/grafana/netpol-dashboard.json")).unwrap();
    assert_eq!(data["netpol-dashboard.json"].trim_end(), shipped.trim_end());
    let dash: Value = serde_json::from_str(&data["netpol-dashboard.json"]).expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "netpol-overview");
    assert!(helm_template_error(&["grafana.dashboard.enabled=yes"]).contains("/grafana/dashboard/enabled"));
}

#[test]
fn helm_uninstall_runs_netpol_daemon_uninstall_on_every_node_first() {
    let o = Objects::of(&helm_template(&[]), "chart");
    // Every uninstall object is a pre-delete hook, created before the Job (lower weight).
    let weight = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        let a = m.annotations.clone().unwrap_or_default();
        assert_eq!(a.get("helm.sh/hook").map(|s| s.as_str()), Some("pre-delete"), "{:?}", m.name);
        assert!(a["helm.sh/hook-delete-policy"].contains("hook-succeeded"), "{:?}", m.name);
        a["helm.sh/hook-weight"].parse::<i32>().unwrap()
    };
    let job = &o.jobs[0];
    let job_weight = weight(&job.metadata);
    let account =
        o.accounts.iter().find(|a| a.metadata.name.as_deref() == Some("netpol-uninstall")).expect("ServiceAccount netpol-uninstall");
    for m in [&account.metadata, &o.roles[0].metadata, &o.bindings[0].metadata, &o.config_maps[0].metadata] {
        assert!(weight(m) < job_weight, "{:?} must exist before the Job", m.name);
    }
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let steps: Vec<&Container> = pod.init_containers.iter().flatten().chain(&pod.containers).collect();
    let commands: Vec<Vec<String>> = steps.iter().map(|c| c.command.clone().unwrap()).collect();
    let verbs: Vec<String> =
        commands.iter().map(|c| c[1..].iter().filter(|a| !a.starts_with("--")).cloned().collect::<Vec<_>>().join(" ")).collect();
    let ud = o.uninstall_daemonset();
    let uname = ud.metadata.name.clone().unwrap();
    assert_eq!(
        verbs,
        [
            format!("delete daemonset/{RELEASE}"),
            "apply".to_string(),
            format!("rollout status daemonset/{uname}"),
            format!("delete daemonset/{uname}")
        ],
        "the steps, in order"
    );
    assert!(
        commands[0].contains(&"--cascade=foreground".to_string()) && commands[0].contains(&"--wait".to_string()),
        "the daemon's pods end first"
    );
    // The real kubectl (the version of the Job's image) accepts each step's flags.
    let kubectl_tag = steps[0].image.as_deref().unwrap().rsplit(':').next().unwrap().to_string();
    let client = run(Command::new(tool("kubectl")).args(["version", "--client"]));
    assert!(client.contains(&kubectl_tag), "the Job's kubectl {kubectl_tag} is the tested one: {client}");
    for c in &commands {
        assert_eq!(c[0], "kubectl");
        run(Command::new(tool("kubectl")).args(&c[1..]).arg("--help"));
    }
    // The applied file is the ConfigMap's, mounted where `apply` reads it.
    let file = arg(&commands[1], "filename").unwrap();
    let mount = steps[1].volume_mounts.iter().flatten().find(|m| Path::new(file).starts_with(&m.mount_path)).expect("the ConfigMap mount");
    let vol = pod.volumes.iter().flatten().find(|v| v.name == mount.name).unwrap();
    assert_eq!(vol.config_map.as_ref().unwrap().name, o.config_maps[0].metadata.name.clone().unwrap());
    assert!(o.config_maps[0].data.as_ref().unwrap().contains_key(Path::new(file).file_name().unwrap().to_str().unwrap()));
    // The Role grants what the steps do, on DaemonSets only; the Job runs as its account.
    let rules = o.roles[0].rules.clone().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        (rules[0].api_groups.clone().unwrap(), rules[0].resources.clone().unwrap()),
        (vec!["apps".into()], vec!["daemonsets".into()])
    );
    let verbs: BTreeSet<String> = rules[0].verbs.iter().cloned().collect();
    for v in ["get", "watch", "create", "patch", "delete"] {
        assert!(verbs.contains(v), "the Role lacks {v}");
    }
    assert_eq!(pod.service_account_name, o.roles[0].metadata.name);
    // The uninstall DaemonSet reaches every node the daemon runs on and pins where it pins.
    let (dspec, uspec) = (pod_spec(o.daemonset(RELEASE)), pod_spec(&ud));
    assert_eq!(json(&dspec.tolerations), json(&uspec.tolerations));
    assert_eq!(json(&dspec.node_selector), json(&uspec.node_selector));
    assert_eq!(json(&dspec.affinity), json(&uspec.affinity));
    let un = &uspec.init_containers.as_ref().unwrap()[0];
    let uargs = un.args.clone().unwrap();
    assert_eq!(uargs[0], "uninstall");
    assert_eq!(arg(&uargs, "bpffs"), arg(&daemon_args(&o), "bpffs"), "uninstall removes the daemon's pins");
    assert_eq!(json(&un.volume_mounts), json(&container(dspec, "netpol").volume_mounts));
    assert_eq!(json(&uspec.volumes), json(&dspec.volumes));
    // And the daemon does what those arguments say: the pin directory goes.
    let dir = std::env::temp_dir().join(format!("netpol-chart-uninstall-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("links")).unwrap();
    std::fs::write(dir.join("links/eth0-ingress"), b"").unwrap();
    let mut replaced: Vec<String> =
        uargs.iter().map(|a| if a.starts_with("--bpffs=") { format!("--bpffs={}", dir.display()) } else { a.clone() }).collect();
    let out = Command::new(DAEMON).args(replaced.drain(..)).output().unwrap();
    let gone = !dir.exists();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success() && gone, "netpol-daemon {uargs:?}: {}", String::from_utf8_lossy(&out.stderr));
    // Off: no hook at all.
    let o = Objects::of(&helm_template(&["uninstall.enabled=false"]), "chart");
    assert!(o.jobs.is_empty() && o.roles.is_empty() && o.config_maps.is_empty());
}

/// The init container's script, run here in a mount namespace of its own: it mounts bpffs at
/// /sys/fs/bpf where there is none, and stacks nothing where there is one (root needed).
#[test]
fn mount_bpffs_init_container_mounts_only_where_none_is() {
    if unsafe { libc::geteuid() } != 0 {
        let msg = "mounting bpffs needs root; run `cargo xtask test` as root";
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return;
    }
    let o = Objects::of(&helm_template(&[]), "chart");
    let init = &pod_spec(o.daemonset(RELEASE)).init_containers.as_ref().unwrap()[0];
    let command = init.command.clone().unwrap();
    assert_eq!(command, ["/bin/sh", "-c"]);
    let script = &init.args.as_ref().unwrap()[0];
    let count = "grep -c ' /sys/fs/bpf bpf ' /proc/mounts";
    for (case, before) in [
        ("a bpffs is mounted", "grep -q ' /sys/fs/bpf bpf ' /proc/mounts"),
        ("none is", "while grep -q ' /sys/fs/bpf bpf ' /proc/mounts; do umount /sys/fs/bpf; done"),
    ] {
        // A private mount namespace: nothing done here reaches this machine's mounts.
        let out = run(Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("{before} && {script} && {count}")));
        assert_eq!(out.trim(), "1", "{case}: exactly one bpffs at /sys/fs/bpf afterwards");
    }
}

/// The ClusterNetworkPolicy CRD: not installed by default (the daemon runs without it); with
/// clusterNetworkPolicy.installCRD it is deploy/crds' file as vendored, kept on uninstall (its
/// removal would delete every ClusterNetworkPolicy of the cluster).
#[test]
fn the_cluster_network_policy_crd_is_optional_and_kept_on_uninstall() {
    assert!(Objects::of(&helm_template(&[]), "chart").crds.is_empty(), "no CRD by default");
    let o = Objects::of(&helm_template(&["clusterNetworkPolicy.installCRD=true"]), "chart");
    assert_eq!(o.crds.len(), 1);
    let rendered = &o.crds[0];
    let vendored = Objects::of(&documents(&std::fs::read_to_string(root().join(CNP_CRD)).unwrap()), CNP_CRD).crds.remove(0);
    assert_eq!(rendered.metadata.name, vendored.metadata.name);
    // Compared typed: helm's toYaml writes whole numbers of the schema (maximum: 65535) alike.
    assert!(rendered.spec == vendored.spec, "the chart's CRD spec differs from {CNP_CRD}");
    let annotations = rendered.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get("helm.sh/resource-policy").map(String::as_str), Some("keep"));
    assert_eq!(annotations.get("policy.networking.k8s.io/channel").map(String::as_str), Some("experimental"));
    // The chart reads the very file deploy/crds holds (a link, not a copy that could drift).
    let link = root().join(CHART).join("crds-optional/policy.networking.k8s.io_clusternetworkpolicies.yaml");
    assert_eq!(std::fs::canonicalize(link).unwrap(), std::fs::canonicalize(root().join(CNP_CRD)).unwrap());
}

//! What the deploy tests share: the repository's paths and version, the Kubernetes tools that
//! `cargo xtask setup` installs (helm, kubectl), rendering the chart and the kustomizations,
//! and reading what they render into typed Kubernetes objects.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A `key = "value"` of the workspace Cargo.toml's [workspace.package].
pub fn workspace_package(key: &str) -> String {
    let text = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let section = text.split("[workspace.package]").nth(1).expect("Cargo.toml: no [workspace.package]");
    section
        .lines()
        .take_while(|l| !l.starts_with('['))
        .find_map(|l| l.strip_prefix(&format!("{key} = ")))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("Cargo.toml: [workspace.package] has no {key}"))
}

/// helm or kubectl: the copy `cargo xtask setup` put in target/tools, else one on PATH.
/// Missing is a failure: the chart and the kustomizations must be rendered to be tested.
pub fn tool(name: &str) -> PathBuf {
    let local = root().join("target/tools").join(name);
    if local.exists() {
        return local;
    }
    if Command::new(name).arg("version").output().is_ok() {
        return PathBuf::from(name);
    }
    panic!("{name} not found in target/tools or on PATH: run `cargo xtask setup` (it installs helm and kubectl there)");
}

/// Runs a tool, returning its standard output; a failure panics with its standard error.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stdout).unwrap()
}

/// The documents of a multi-document YAML stream, as JSON values (empty documents dropped).
pub fn documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| serde_norway::Value::deserialize(doc).expect("YAML document"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).expect("YAML as JSON"))
        .collect()
}

pub const CHART: &str = "deploy/chart";
/// The vendored ClusterNetworkPolicy CRD (optional).
pub const CNP_CRD: &str = "deploy/crds/policy.networking.k8s.io_clusternetworkpolicies.yaml";
pub const RELEASE: &str = "netpol";
pub const NAMESPACE: &str = "netpol-system";

/// `helm template` of the chart as release `netpol` in `netpol-system`, with `--set` values.
pub fn helm_template(sets: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new(tool("helm"));
    cmd.current_dir(root()).args(["template", RELEASE, CHART, "--namespace", NAMESPACE]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    documents(&run(&mut cmd))
}

/// What `helm template` says when it refuses the values (it must).
pub fn helm_template_error(sets: &[&str]) -> String {
    let mut cmd = Command::new(tool("helm"));
    cmd.current_dir(root()).args(["template", RELEASE, CHART, "--namespace", NAMESPACE]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "helm template accepted {sets:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `kubectl kustomize DIR` (DIR relative to the repository).
pub fn kustomize(dir: &str) -> Vec<Value> {
    documents(&run(Command::new(tool("kubectl")).current_dir(root()).args(["kustomize", dir])))
}

/// Reads `v` as a `T`, and checks that nothing was lost: a misspelt or misplaced field, which
/// the API server would drop or refuse, makes the typed object's JSON differ from the text's.
pub fn typed<T: DeserializeOwned + Serialize>(v: &Value, what: &str) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&t).unwrap();
    if let Some(path) = first_difference(v, &back, String::new()) {
        panic!("{what}: field {path} is not part of the typed object (misspelt or misplaced?)");
    }
    t
}

/// The first path where `a` has something `b` has not (or different).
fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x.iter().find_map(|(k, va)| match y.get(k) {
            None if va.is_null() => None,
            None => Some(format!("{path}.{k}")),
            Some(vb) => first_difference(va, vb, format!("{path}.{k}")),
        }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).enumerate().find_map(|(i, (va, vb))| first_difference(va, vb, format!("{path}[{i}]")))
        }
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => None,
        _ if a == b => None,
        _ => Some(path),
    }
}

/// Every object a rendering holds, typed by kind. Kinds outside k8s-openapi (the Prometheus
/// Operator's) are kept as JSON.
#[derive(Default)]
pub struct Objects {
    pub namespaces: Vec<Namespace>,
    pub accounts: Vec<ServiceAccount>,
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_bindings: Vec<ClusterRoleBinding>,
    pub roles: Vec<Role>,
    pub bindings: Vec<RoleBinding>,
    pub daemonsets: Vec<DaemonSet>,
    pub config_maps: Vec<ConfigMap>,
    pub jobs: Vec<Job>,
    pub services: Vec<Service>,
    pub monitors: Vec<Value>,
    pub crds: Vec<CustomResourceDefinition>,
}

impl Objects {
    pub fn of(docs: &[Value], source: &str) -> Objects {
        let mut o = Objects::default();
        for v in docs {
            let kind = v["kind"].as_str().unwrap_or_default();
            let what = format!("{source}: {kind} {}", v["metadata"]["name"].as_str().unwrap_or("?"));
            match kind {
                "Namespace" => o.namespaces.push(typed(v, &what)),
                "ServiceAccount" => o.accounts.push(typed(v, &what)),
                "ClusterRole" => o.cluster_roles.push(typed(v, &what)),
                "ClusterRoleBinding" => o.cluster_bindings.push(typed(v, &what)),
                "Role" => o.roles.push(typed(v, &what)),
                "RoleBinding" => o.bindings.push(typed(v, &what)),
                "DaemonSet" => o.daemonsets.push(typed(v, &what)),
                "ConfigMap" => o.config_maps.push(typed(v, &what)),
                "Job" => o.jobs.push(typed(v, &what)),
                "Service" => o.services.push(typed(v, &what)),
                "CustomResourceDefinition" => o.crds.push(typed(v, &what)),
                "PodMonitor" | "ServiceMonitor" => {
                    assert_eq!(v["apiVersion"], "monitoring.coreos.com/v1", "{what}");
                    o.monitors.push(v.clone())
                }
                other => panic!("{source}: unexpected kind {other:?}"),
            }
        }
        o
    }

    pub fn daemonset(&self, name: &str) -> &DaemonSet {
        self.daemonsets.iter().find(|d| d.metadata.name.as_deref() == Some(name)).unwrap_or_else(|| panic!("no DaemonSet {name}"))
    }

    /// The DaemonSet the uninstall Job applies, read from its ConfigMap.
    pub fn uninstall_daemonset(&self) -> DaemonSet {
        let cm =
            self.config_maps.iter().find(|c| c.metadata.name.as_deref() == Some("netpol-uninstall")).expect("ConfigMap netpol-uninstall");
        let text = &cm.data.as_ref().expect("ConfigMap netpol-uninstall: data")["daemonset.yaml"];
        let docs = documents(text);
        assert_eq!(docs.len(), 1, "ConfigMap netpol-uninstall: data.daemonset.yaml holds one object");
        typed(&docs[0], "ConfigMap netpol-uninstall: data.daemonset.yaml")
    }
}

/// `--help` of a `netpol-daemon` subcommand: each long flag with its `[default: ...]`.
pub fn flags_of(daemon: &Path, subcommand: &str) -> Vec<(String, Option<String>)> {
    let help = run(Command::new(daemon).args([subcommand, "--help"]));
    let mut flags: Vec<(String, Option<String>)> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        // "-x, --name" (a short form first) or "--name".
        let b = t.as_bytes();
        let long = if b.len() > 4 && b[0] == b'-' && b[1] != b'-' && &t[2..4] == ", " { &t[4..] } else { t };
        if let Some(rest) = long.strip_prefix("--") {
            let name = rest.split([' ', '=', '<']).next().unwrap().to_string();
            flags.push((name, None));
        } else if let (Some(last), Some((_, d))) = (flags.last_mut(), t.split_once("[default: ")) {
            last.1 = Some(d.split(']').next().unwrap().to_string());
        }
    }
    flags.retain(|(n, _)| n != "help" && n != "version");
    flags
}

/// `--name=value` (or a bare `--name`) in a container's args.
pub fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().find_map(|a| {
        let rest = a.strip_prefix("--")?.strip_prefix(name)?;
        if rest.is_empty() {
            Some("")
        } else {
            rest.strip_prefix('=')
        }
    })
}

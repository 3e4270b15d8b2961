//! The manifests source: every *.yaml, *.yml and *.json file of a directory (multi-document
//! YAML and `kind: List` allowed) read into the cluster model. Bad objects are reported with
//! file, object and field, and skipped; everything else is kept.
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;

use crate::compiler::Cluster;
use crate::model::{self, FieldError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    /// 1-based document index in the file.
    pub document: usize,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {}): {}", self.file.display(), self.document, self.message)
    }
}

#[derive(Debug, Default)]
pub struct Loaded {
    pub cluster: Cluster,
    pub errors: Vec<LoadError>,
    /// Objects of kinds this source does not use (yet), by kind.
    pub ignored: BTreeMap<String, usize>,
}

/// The manifest files of `dir`, sorted by name.
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
                && !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads and validates every manifest in `dir`.
pub fn load_dir(dir: &Path) -> std::io::Result<Loaded> {
    let mut out = Loaded::default();
    for file in manifest_files(dir)? {
        match std::fs::read_to_string(&file) {
            Ok(text) => load_text(&file, &text, &mut out),
            Err(e) => out.errors.push(LoadError { file, document: 0, message: format!("cannot read: {e}") }),
        }
    }
    Ok(out)
}

/// Adds the objects of one file's text to `out`.
pub fn load_text(file: &Path, text: &str, out: &mut Loaded) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let err = |message: String| LoadError { file: file.to_path_buf(), document, message };
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                out.errors.push(err(format!("unparsable YAML/JSON: {e}")));
                // The rest of the stream cannot be trusted to be split correctly.
                return;
            }
        };
        if value.is_null() {
            continue;
        }
        if let Err(msgs) = add_object(value, out) {
            out.errors.extend(msgs.into_iter().map(&err));
        }
    }
}

fn add_object(value: serde_yaml::Value, out: &mut Loaded) -> Result<(), Vec<String>> {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_string();
    let ns = value
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .unwrap_or("default")
        .to_string();
    let typed_err = |e: serde_yaml::Error| vec![format!("{kind} {ns}/{name}: {e}")];
    let fields = |errs: Vec<FieldError>| -> Vec<String> {
        errs.into_iter().map(|e| format!("{kind} {e}")).collect()
    };
    match kind.as_str() {
        "List" => {
            let items = value.get("items").and_then(|i| i.as_sequence()).cloned().unwrap_or_default();
            let mut errs = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                if let Err(e) = add_object(item, out) {
                    errs.extend(e.into_iter().map(|m| format!("items[{i}]: {m}")));
                }
            }
            if errs.is_empty() {
                Ok(())
            } else {
                Err(errs)
            }
        }
        "Namespace" => {
            let ns: K8sNamespace = serde_yaml::from_value(value).map_err(typed_err)?;
            let ns = model::namespace_from_k8s(&ns).map_err(|e| fields(vec![e]))?;
            out.cluster.namespaces.insert(ns.name.clone(), ns);
            Ok(())
        }
        "Pod" => {
            let pod: K8sPod = serde_yaml::from_value(value).map_err(typed_err)?;
            if let Some(pod) = model::pod_from_k8s(&pod).map_err(fields)? {
                out.cluster.pods.insert(pod.key.clone(), pod);
            }
            Ok(())
        }
        "NetworkPolicy" => {
            let np: NetworkPolicy = serde_yaml::from_value(value).map_err(typed_err)?;
            let pol = model::policy_from_k8s(&np).map_err(fields)?;
            out.cluster.policies.insert(pol.key.clone(), pol);
            Ok(())
        }
        "Service" => {
            let svc: k8s_openapi::api::core::v1::Service = serde_yaml::from_value(value).map_err(typed_err)?;
            if let Some(svc) = model::service_from_k8s(&svc).map_err(fields)? {
                out.cluster.services.insert(svc.key.clone(), svc);
            }
            Ok(())
        }
        "EndpointSlice" => {
            let es: k8s_openapi::api::discovery::v1::EndpointSlice = serde_yaml::from_value(value).map_err(typed_err)?;
            if let Some(es) = model::endpoint_slice_from_k8s(&es).map_err(fields)? {
                out.cluster.endpoint_slices.insert(es.key.clone(), es);
            }
            Ok(())
        }
        "" => Err(vec![format!("object {ns}/{name} has no kind")]),
        other => {
            *out.ignored.entry(other.to_string()).or_default() += 1;
            Ok(())
        }
    }
}

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

#[derive(Clone, Debug, Default)]
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

/// Reads a directory again and again, remembering what each file last contributed: when a file
/// is unparsable or holds an invalid object (a partial write, a typo), the objects it had
/// before that are not validly present now keep their previous version until a valid one
/// arrives. A removed file removes its objects.
#[derive(Debug, Default)]
pub struct DirReader {
    /// Per file: its content hash and what it stands for (its objects, plus the previous
    /// versions a bad write lost). A file whose content is unchanged is not parsed again.
    files: BTreeMap<PathBuf, (u64, Loaded)>,
}

impl DirReader {
    pub fn load(&mut self, dir: &Path) -> std::io::Result<Loaded> {
        let mut out = Loaded::default();
        let mut files = BTreeMap::new();
        for file in manifest_files(dir)? {
            let prev = self.files.remove(&file);
            let entry = match std::fs::read_to_string(&file) {
                Ok(text) => {
                    let hash = {
                        use std::hash::{Hash, Hasher};
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        text.hash(&mut h);
                        h.finish()
                    };
                    match prev {
                        Some((h, l)) if h == hash => (h, l),
                        prev => {
                            let mut one = Loaded::default();
                            load_text(&file, &text, &mut one);
                            keep_previous(&file, &mut one, prev.as_ref().map(|(_, l)| &l.cluster));
                            (hash, one)
                        }
                    }
                }
                Err(e) => {
                    let mut one = Loaded::default();
                    one.errors.push(LoadError { file: file.clone(), document: 0, message: format!("cannot read: {e}") });
                    keep_previous(&file, &mut one, prev.as_ref().map(|(_, l)| &l.cluster));
                    // Hash 0: read and parsed again next time.
                    (0, one)
                }
            };
            merge(&mut out.cluster, &entry.1.cluster);
            out.errors.extend(entry.1.errors.iter().cloned());
            for (k, n) in &entry.1.ignored {
                *out.ignored.entry(k.clone()).or_default() += n;
            }
            files.insert(file, entry);
        }
        self.files = files;
        Ok(out)
    }
}

/// A file that did not load cleanly keeps the previous version of the objects it lost.
fn keep_previous(file: &Path, one: &mut Loaded, prev: Option<&Cluster>) {
    let Some(prev) = prev.filter(|_| !one.errors.is_empty()) else { return };
    let kept = keep_missing(&mut one.cluster, prev);
    if kept > 0 {
        one.errors.push(LoadError {
            file: file.to_path_buf(),
            document: 0,
            message: format!("keeping the previous version of {kept} object(s) of this file until it is valid again"),
        });
    }
}

fn merge(into: &mut Cluster, from: &Cluster) {
    into.namespaces.extend(from.namespaces.iter().map(|(k, v)| (k.clone(), v.clone())));
    into.pods.extend(from.pods.iter().map(|(k, v)| (k.clone(), v.clone())));
    into.policies.extend(from.policies.iter().map(|(k, v)| (k.clone(), v.clone())));
    into.services.extend(from.services.iter().map(|(k, v)| (k.clone(), v.clone())));
    into.endpoint_slices.extend(from.endpoint_slices.iter().map(|(k, v)| (k.clone(), v.clone())));
}

/// Adds to `now` the objects of `prev` it lacks; returns how many.
fn keep_missing(now: &mut Cluster, prev: &Cluster) -> usize {
    fn fill<K: Ord + Clone, V: Clone>(now: &mut BTreeMap<K, V>, prev: &BTreeMap<K, V>) -> usize {
        let mut n = 0;
        for (k, v) in prev {
            if !now.contains_key(k) {
                now.insert(k.clone(), v.clone());
                n += 1;
            }
        }
        n
    }
    fill(&mut now.namespaces, &prev.namespaces)
        + fill(&mut now.pods, &prev.pods)
        + fill(&mut now.policies, &prev.policies)
        + fill(&mut now.services, &prev.services)
        + fill(&mut now.endpoint_slices, &prev.endpoint_slices)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjKey;

    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: PORT}]}]\n";
    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";

    fn port(l: &Loaded) -> Option<String> {
        l.cluster.policies.get(&ObjKey::new("a", "p")).map(|p| format!("{:?}", p.ingress[0].ports))
    }

    #[test]
    fn a_bad_write_keeps_the_previous_version_until_a_valid_one_arrives() {
        let dir = std::env::temp_dir().join(format!("netpol-dirreader-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.yaml");
        let write = |s: &str| std::fs::write(&f, s).unwrap();
        let mut r = DirReader::default();

        write(&format!("{NS}---\n{}", POLICY.replace("PORT", "80")));
        let l = r.load(&dir).unwrap();
        assert!(l.errors.is_empty());
        let v80 = port(&l).expect("policy loaded");
        assert!(v80.contains("80"), "{v80}");

        // A partial write: the YAML breaks off inside the policy.
        let full = format!("{NS}---\n{}", POLICY.replace("PORT", "81"));
        write(&full[..full.len() - 12]);
        let l = r.load(&dir).unwrap();
        assert!(!l.errors.is_empty());
        assert_eq!(port(&l).as_deref(), Some(v80.as_str()), "previous version kept");
        assert!(l.cluster.namespaces.contains_key("a"));
        assert!(l.errors.iter().any(|e| e.message.contains("keeping the previous version")), "{:?}", l.errors);

        // A complete but invalid object: still the previous version.
        write(&format!("{NS}---\n{}", POLICY.replace("PORT", "70000")));
        let l = r.load(&dir).unwrap();
        assert!(l.errors.iter().any(|e| e.message.contains("spec.ingress[0].ports[0]")), "{:?}", l.errors);
        assert_eq!(port(&l).as_deref(), Some(v80.as_str()));

        // A valid version replaces it.
        write(&format!("{NS}---\n{}", POLICY.replace("PORT", "8443")));
        let l = r.load(&dir).unwrap();
        assert!(l.errors.is_empty());
        assert!(port(&l).unwrap().contains("8443"));

        // A valid file without the policy removes it; so does removing the file.
        write(NS);
        assert!(port(&r.load(&dir).unwrap()).is_none());
        write(&format!("{NS}---\n{}", POLICY.replace("PORT", "80")));
        assert!(port(&r.load(&dir).unwrap()).is_some());
        std::fs::remove_file(&f).unwrap();
        let l = r.load(&dir).unwrap();
        assert!(port(&l).is_none() && l.cluster.namespaces.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

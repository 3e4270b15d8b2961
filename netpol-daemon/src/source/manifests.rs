//! The manifests source: every *.yaml, *.yml and *.json file of a directory (multi-document
//! YAML and `kind: List` allowed) read into the cluster model. Bad objects are reported with
//! file, object and field, and skipped; everything else is kept.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::{self, ObjKey};
use crate::model::{ChangeSet, Cluster};

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
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| is_manifest_name(p) && p.is_file()).collect();
    files.sort();
    Ok(files)
}

/// A name the manifests source reads: *.yaml, *.yml or *.json, not hidden (editors' and
/// writers' temporary files are).
pub fn is_manifest_name(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
        && !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
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
/// arrives. A removed file removes its objects. Only files whose metadata changed are read
/// again, and only those whose content changed are parsed again.
#[derive(Debug, Default)]
pub struct DirReader {
    /// Per file: what it stands for (its objects, plus the previous versions a bad write lost).
    files: BTreeMap<PathBuf, FileState>,
    /// Every policy in audit mode (applied as files are parsed).
    pub audit_all: bool,
    /// The newest modification among the files read again (or removed) since this was last
    /// taken: when the change now loaded was made.
    pub last_modified: Option<std::time::SystemTime>,
    /// Per object, the files holding it (the last one wins): a change looks at its own
    /// objects' holders, not at every file.
    owners: Owners,
}

type Holders<K> = std::collections::HashMap<K, BTreeSet<PathBuf>, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct Owners {
    namespaces: Holders<String>,
    pods: Holders<ObjKey>,
    policies: Holders<ObjKey>,
    services: Holders<ObjKey>,
    endpoint_slices: Holders<ObjKey>,
    cluster_policies: Holders<String>,
    nodes: Holders<String>,
}

impl Owners {
    fn note(&mut self, file: &Path, c: &Cluster, holds: bool) {
        fn one<K: std::hash::Hash + Eq + Clone, V>(m: &mut Holders<K>, objs: &BTreeMap<K, V>, file: &Path, holds: bool) {
            for k in objs.keys() {
                if holds {
                    m.entry(k.clone()).or_default().insert(file.to_path_buf());
                } else if let Some(set) = m.get_mut(k) {
                    set.remove(file);
                    if set.is_empty() {
                        m.remove(k);
                    }
                }
            }
        }
        one(&mut self.namespaces, &c.namespaces, file, holds);
        one(&mut self.pods, &c.pods, file, holds);
        one(&mut self.policies, &c.policies, file, holds);
        one(&mut self.services, &c.services, file, holds);
        one(&mut self.endpoint_slices, &c.endpoint_slices, file, holds);
        one(&mut self.cluster_policies, &c.cluster_policies, file, holds);
        one(&mut self.nodes, &c.nodes, file, holds);
    }
}

#[derive(Debug)]
struct FileState {
    /// (inode, size, mtime, ctime) when last read; `None`: read again next time.
    meta: Option<(u64, u64, i64, i64, i64, i64)>,
    hash: u64,
    loaded: Loaded,
    /// Per document (text hash): what it held, for the next version of the file to reuse
    /// where a document did not change (a file of 50 pods where one label changed is
    /// parsed as one document).
    docs: Docs,
}

/// Per document (its text's hash): the objects it held, by kind and key (their values are in
/// the file's `loaded`), and the kinds it held that are not used.
type Docs = std::collections::HashMap<u64, (Vec<ObjRef>, Vec<String>), foldhash::fast::RandomState>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ObjRef {
    Namespace(String),
    Pod(ObjKey),
    Policy(ObjKey),
    Service(ObjKey),
    EndpointSlice(ObjKey),
    ClusterPolicy(String),
    Node(String),
}

impl ObjRef {
    fn all(c: &Cluster) -> Vec<ObjRef> {
        let mut v: Vec<ObjRef> = c.namespaces.keys().map(|k| ObjRef::Namespace(k.clone())).collect();
        v.extend(c.pods.keys().map(|k| ObjRef::Pod(k.clone())));
        v.extend(c.policies.keys().map(|k| ObjRef::Policy(k.clone())));
        v.extend(c.services.keys().map(|k| ObjRef::Service(k.clone())));
        v.extend(c.endpoint_slices.keys().map(|k| ObjRef::EndpointSlice(k.clone())));
        v.extend(c.cluster_policies.keys().map(|k| ObjRef::ClusterPolicy(k.clone())));
        v.extend(c.nodes.keys().map(|k| ObjRef::Node(k.clone())));
        v
    }

    /// Copies the object from `from` into `into`; false when `from` lacks it.
    fn copy(&self, from: &Cluster, into: &mut Cluster) -> bool {
        fn one<K: Ord + Clone, V: Clone>(k: &K, from: &BTreeMap<K, V>, into: &mut BTreeMap<K, V>) -> bool {
            from.get(k).map(|v| into.insert(k.clone(), v.clone())).is_some()
        }
        match self {
            ObjRef::Namespace(k) => one(k, &from.namespaces, &mut into.namespaces),
            ObjRef::Pod(k) => one(k, &from.pods, &mut into.pods),
            ObjRef::Policy(k) => one(k, &from.policies, &mut into.policies),
            ObjRef::Service(k) => one(k, &from.services, &mut into.services),
            ObjRef::EndpointSlice(k) => one(k, &from.endpoint_slices, &mut into.endpoint_slices),
            ObjRef::ClusterPolicy(k) => one(k, &from.cluster_policies, &mut into.cluster_policies),
            ObjRef::Node(k) => one(k, &from.nodes, &mut into.nodes),
        }
    }
}

fn text_hash(text: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = foldhash::quality::FixedState::with_seed(0x6e65_7470_6f6c).build_hasher();
    h.write(text.as_bytes());
    h.finish()
}

/// The documents of a manifest text, or `None` when it does not split plainly (then it is
/// parsed whole). JSON: the values of the stream; YAML: the text between `---` lines (a
/// marker at the start of a line ends any scalar). Texts with directives or `...` markers
/// are parsed whole.
fn split_documents<'a>(file: &Path, text: &'a str) -> Option<Vec<&'a str>> {
    let mut out = Vec::new();
    if is_json_text(file, text) {
        let mut it = serde_json::Deserializer::from_str(text).into_iter::<serde::de::IgnoredAny>();
        let mut start = 0;
        while let Some(v) = it.next() {
            v.ok()?;
            let end = it.byte_offset();
            out.push(&text[start..end]);
            start = end;
        }
        return Some(out);
    }
    let mut start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let l = line.trim_end_matches(['\n', '\r']);
        if l.starts_with('%') || l == "..." || l.starts_with("... ") {
            return None;
        }
        if (l == "---" || l.starts_with("--- ") || l.starts_with("---\t")) && pos > start {
            out.push(&text[start..pos]);
            start = pos;
        }
        pos += line.len();
    }
    out.push(&text[start..]);
    Some(out)
}

/// The items of a JSON `List` document, as text.
fn list_items<'a>(file: &Path, doc: &'a str) -> Option<Vec<&'a str>> {
    #[derive(Deserialize)]
    struct List<'a> {
        kind: Option<String>,
        #[serde(borrow)]
        items: Option<Vec<&'a serde_json::value::RawValue>>,
    }
    if !is_json_text(file, doc) {
        return None;
    }
    let l: List = serde_json::from_str(doc).ok()?;
    if l.kind.as_deref() != Some("List") {
        return None;
    }
    Some(l.items?.into_iter().map(|r| r.get()).collect())
}

/// Parses `text` into `out`, reusing the documents of `prev` whose text did not change.
/// Returns the documents for the next time. Any problem: the whole text is parsed as one
/// (problems name their document by its place in the whole file).
fn load_reusing(file: &Path, text: &str, prev: Option<&FileState>, out: &mut Loaded) -> Docs {
    let mut docs = Docs::default();
    if let Some(parts) = split_documents(file, text) {
        // The items of a JSON `List` (as `kubectl get -o json` writes) count as documents.
        let parts: Vec<&str> = parts.into_iter().flat_map(|p| list_items(file, p).unwrap_or_else(|| vec![p])).collect();
        let mut all = Loaded::default();
        let mut seen: std::collections::HashSet<ObjRef, foldhash::fast::RandomState> = Default::default();
        let mut clean = true;
        for part in parts {
            let h = text_hash(part);
            // The previous version of this very text: its objects, copied from the file's
            // previous objects.
            // (A document's objects are all in the file's previous objects: it was cached only
            // when the whole file loaded cleanly without duplicates.)
            let reused = prev.and_then(|p| p.docs.get(&h).map(|(refs, ignored)| (p, refs, ignored)));
            let (refs, ignored) = match reused {
                Some((p, refs, ignored)) if refs.iter().all(|r| r.copy(&p.loaded.cluster, &mut all.cluster)) => {
                    (refs.clone(), ignored.clone())
                }
                _ => {
                    let mut d = Loaded::default();
                    load_text(file, part, &mut d);
                    if !d.errors.is_empty() {
                        clean = false;
                        break;
                    }
                    let refs = ObjRef::all(&d.cluster);
                    let ignored = d.ignored.iter().flat_map(|(k, n)| std::iter::repeat_n(k.clone(), *n)).collect();
                    merge(&mut all.cluster, &d.cluster);
                    (refs, ignored)
                }
            };
            // An object in two documents: the later wins, and the file is not cached by
            // document (a reused earlier document would copy the later one's version).
            for r in &refs {
                if !seen.insert(r.clone()) {
                    clean = false;
                }
            }
            for k in &ignored {
                *all.ignored.entry(k.clone()).or_default() += 1;
            }
            docs.insert(h, (refs, ignored));
        }
        if clean {
            *out = all;
            return docs;
        }
        docs.clear();
    }
    load_text(file, text, out);
    docs
}

fn file_meta(file: &Path) -> Option<(u64, u64, i64, i64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
}

impl DirReader {
    /// The whole directory's objects (every file merged; a later file wins on a duplicate).
    pub fn load(&mut self, dir: &Path) -> std::io::Result<Loaded> {
        self.refresh(dir, None)?;
        let mut out = Loaded::default();
        for f in self.files.values() {
            merge(&mut out.cluster, &f.loaded.cluster);
            for (k, n) in &f.loaded.ignored {
                *out.ignored.entry(k.clone()).or_default() += n;
            }
        }
        out.errors = self.errors();
        Ok(out)
    }

    /// Brings `into` (what the previous calls produced, or empty) up to date with the
    /// directory, touching only the objects of files that changed; returns what changed.
    pub fn update(&mut self, dir: &Path, into: &mut Cluster) -> std::io::Result<ChangeSet> {
        self.update_some(dir, None, into)
    }

    /// [`DirReader::update`], looking only at the files named in `hint` (when given: the
    /// names an inotify watch reported) instead of every file of the directory.
    pub fn update_some(&mut self, dir: &Path, hint: Option<&[PathBuf]>, into: &mut Cluster) -> std::io::Result<ChangeSet> {
        let (old, read) = self.refresh(dir, hint)?;
        let now: Vec<&Cluster> = read.iter().filter_map(|f| self.files.get(f)).map(|f| &f.loaded.cluster).collect();
        let sources: Vec<&Cluster> = old.iter().chain(now).collect();
        let (files, owners) = (&self.files, &self.owners);
        /// The objects of `sources` (old and new versions of the files read again) take their
        /// value from the last file holding them now.
        fn reconcile<K: Ord + Clone + std::hash::Hash, V: Clone + PartialEq>(
            sources: &[&Cluster],
            files: &BTreeMap<PathBuf, FileState>,
            holders: &Holders<K>,
            get: fn(&Cluster) -> &BTreeMap<K, V>,
            into: &mut BTreeMap<K, V>,
        ) -> Vec<K> {
            let keys: BTreeSet<&K> = sources.iter().flat_map(|c| get(c).keys()).collect();
            let mut changed = Vec::new();
            for k in keys {
                let now = holders.get(k).and_then(|h| h.last()).and_then(|f| get(&files.get(f)?.loaded.cluster).get(k));
                if into.get(k) != now {
                    match now {
                        Some(v) => into.insert(k.clone(), v.clone()),
                        None => into.remove(k),
                    };
                    changed.push(k.clone());
                }
            }
            changed
        }
        Ok(ChangeSet {
            all: false,
            namespaces: !reconcile(&sources, files, &owners.namespaces, |c| &c.namespaces, &mut into.namespaces).is_empty(),
            pods: reconcile(&sources, files, &owners.pods, |c| &c.pods, &mut into.pods).into_iter().collect(),
            policies: !reconcile(&sources, files, &owners.policies, |c| &c.policies, &mut into.policies).is_empty(),
            services: !reconcile(&sources, files, &owners.services, |c| &c.services, &mut into.services).is_empty(),
            endpoint_slices: !reconcile(&sources, files, &owners.endpoint_slices, |c| &c.endpoint_slices, &mut into.endpoint_slices)
                .is_empty(),
            cluster_policies: !reconcile(&sources, files, &owners.cluster_policies, |c| &c.cluster_policies, &mut into.cluster_policies)
                .is_empty(),
            nodes: !reconcile(&sources, files, &owners.nodes, |c| &c.nodes, &mut into.nodes).is_empty(),
        })
    }

    /// Every file's problems, in file order.
    pub fn errors(&self) -> Vec<LoadError> {
        self.files.values().flat_map(|f| f.loaded.errors.iter().cloned()).collect()
    }

    /// Reads the files that changed; returns the previous objects of the files read again
    /// or removed, and the files parsed again.
    fn refresh(&mut self, dir: &Path, hint: Option<&[PathBuf]>) -> std::io::Result<(Vec<Cluster>, Vec<PathBuf>)> {
        let (names, gone): (Vec<PathBuf>, Vec<PathBuf>) = match hint {
            None => {
                let names = manifest_files(dir)?;
                let gone = self.files.keys().filter(|f| names.binary_search(f).is_err()).cloned().collect();
                (names, gone)
            }
            Some(hint) => {
                let mut hint: Vec<PathBuf> = hint.iter().filter(|p| is_manifest_name(p)).cloned().collect();
                hint.sort();
                hint.dedup();
                hint.into_iter().partition(|p| p.is_file())
            }
        };
        let gone: Vec<PathBuf> = gone.into_iter().filter(|f| self.files.contains_key(f)).collect();
        let mut touched = Vec::new();
        let mut read = Vec::new();
        let mut newest = |t: Option<std::time::SystemTime>| {
            if let Some(t) = t {
                self.last_modified = Some(self.last_modified.map_or(t, |l| l.max(t)));
            }
        };
        if !gone.is_empty() {
            newest(std::fs::metadata(dir).and_then(|m| m.modified()).ok());
        }
        for f in gone {
            if let Some(st) = self.take_file(&f) {
                touched.push(st.loaded.cluster);
            }
        }
        for file in names {
            let meta = file_meta(&file);
            if let Some(st) = self.files.get(&file) {
                if st.meta.is_some() && st.meta == meta {
                    continue;
                }
            }
            if let Some((_, _, secs, nsecs, _, _)) = meta {
                let t = std::time::UNIX_EPOCH + Duration::new(secs.max(0) as u64, nsecs.clamp(0, 999_999_999) as u32);
                self.last_modified = Some(self.last_modified.map_or(t, |l| l.max(t)));
            }
            let prev = self.take_file(&file);
            let state = match std::fs::read_to_string(&file) {
                Ok(text) => {
                    let hash = text_hash(&text);
                    match prev {
                        Some(st) if st.hash == hash && st.meta.is_some() => FileState { meta, ..st },
                        prev => {
                            let mut one = Loaded::default();
                            let docs = load_reusing(&file, &text, prev.as_ref(), &mut one);
                            if self.audit_all {
                                for p in one.cluster.policies.values_mut() {
                                    p.audit = true;
                                }
                            }
                            keep_previous(&file, &mut one, prev.as_ref().map(|st| &st.loaded.cluster));
                            if let Some(p) = prev {
                                touched.push(p.loaded.cluster);
                            }
                            read.push(file.clone());
                            FileState { meta, hash, loaded: one, docs }
                        }
                    }
                }
                Err(e) => {
                    let mut one = Loaded::default();
                    one.errors.push(LoadError { file: file.clone(), document: 0, message: format!("cannot read: {e}") });
                    keep_previous(&file, &mut one, prev.as_ref().map(|st| &st.loaded.cluster));
                    if let Some(p) = prev {
                        touched.push(p.loaded.cluster);
                    }
                    read.push(file.clone());
                    // No metadata: read and parsed again next time.
                    FileState { meta: None, hash: 0, loaded: one, docs: Default::default() }
                }
            };
            self.owners.note(&file, &state.loaded.cluster, true);
            self.files.insert(file, state);
        }
        Ok((touched, read))
    }

    fn take_file(&mut self, file: &Path) -> Option<FileState> {
        let st = self.files.remove(file)?;
        self.owners.note(file, &st.loaded.cluster, false);
        Some(st)
    }
}

/// A file that did not load cleanly keeps the previous version of the objects it lost.
fn keep_previous(file: &Path, one: &mut Loaded, prev: Option<&Cluster>) {
    let Some(prev) = prev.filter(|_| !one.errors.is_empty()) else { return };
    let mut kept = keep_missing(&mut one.cluster, prev);
    // A policy made invalid by an edit keeps its previous valid version (as the API server
    // keeps the stored object when it rejects an update); only a policy that never was
    // valid stays fail-closed.
    for (k, pol) in one.cluster.policies.iter_mut() {
        if let Some(old) = prev.policies.get(k).filter(|old| pol.invalid.is_some() && old.invalid.is_none()) {
            *pol = old.clone();
            kept += 1;
        }
    }
    for (k, pol) in one.cluster.cluster_policies.iter_mut() {
        if let Some(old) = prev.cluster_policies.get(k).filter(|old| pol.invalid.is_some() && old.invalid.is_none()) {
            *pol = old.clone();
            kept += 1;
        }
    }
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
    into.cluster_policies.extend(from.cluster_policies.iter().map(|(k, v)| (k.clone(), v.clone())));
    into.nodes.extend(from.nodes.iter().map(|(k, v)| (k.clone(), v.clone())));
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
        + fill(&mut now.cluster_policies, &prev.cluster_policies)
        + fill(&mut now.nodes, &prev.nodes)
}

/// Adds the objects of one file's text to `out`. JSON files (one or more JSON values) are
/// read with a JSON parser; everything else as YAML (multi-document).
fn is_json_text(file: &Path, text: &str) -> bool {
    file.extension().and_then(|e| e.to_str()) == Some("json") && text.trim_start().starts_with(['{', '['])
}

pub fn load_text(file: &Path, text: &str, out: &mut Loaded) {
    let is_json = is_json_text(file, text);
    let add = |document: usize, value: Result<serde_json::Value, String>, out: &mut Loaded| -> bool {
        let err = |message: String| LoadError { file: file.to_path_buf(), document, message };
        match value {
            Ok(v) if v.is_null() => true,
            Ok(v) => {
                if let Err(msgs) = add_object(v, out) {
                    out.errors.extend(msgs.into_iter().map(&err));
                }
                true
            }
            Err(e) => {
                out.errors.push(err(format!("unparsable {}: {e}", if is_json { "JSON" } else { "YAML/JSON" })));
                // The rest of the stream cannot be trusted to be split correctly.
                false
            }
        }
    };
    if is_json {
        for (i, v) in serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>().enumerate() {
            if !add(i + 1, v.map_err(|e| e.to_string()), out) {
                return;
            }
        }
    } else {
        for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
            if !add(i + 1, serde_json::Value::deserialize(doc).map_err(|e| e.to_string()), out) {
                return;
            }
        }
    }
}

/// Adds one object of a manifest to `out` (a `List`'s items one by one); returns its problems.
fn add_object(value: serde_json::Value, out: &mut Loaded) -> Result<(), Vec<String>> {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
    match kind.as_str() {
        "List" => {
            let items = value.get("items").and_then(|i| i.as_array()).cloned().unwrap_or_default();
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
        "" => Err(vec![format!("object {} has no kind", model::json_key(&value))]),
        _ => {
            let Some(conv) = model::from_json(value) else {
                *out.ignored.entry(kind).or_default() += 1;
                return Ok(());
            };
            for w in &conv.warnings {
                tracing::warn!("{w}");
            }
            if let Some(obj) = conv.object {
                out.cluster.insert(obj);
            }
            if conv.errors.is_empty() {
                Ok(())
            } else {
                Err(conv.errors)
            }
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

    #[test]
    fn cluster_network_policies_load_and_an_invalid_edit_keeps_the_valid_version() {
        let dir = std::env::temp_dir().join(format!("netpol-dircnp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cnp.yaml");
        let cnp = |priority: &str| {
            format!("apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: c}}\nspec: {{tier: Admin, priority: {priority}, subject: {{namespaces: {{}}}}, egress: [{{action: Deny, to: [{{networks: [10.0.0.0/8]}}]}}]}}\n")
        };
        let mut r = DirReader::default();
        std::fs::write(&f, cnp("7")).unwrap();
        let mut into = Cluster::default();
        let ch = r.update(&dir, &mut into).unwrap();
        assert!(ch.cluster_policies && !ch.policies, "{ch:?}");
        assert_eq!((into.cluster_policies["c"].priority, into.cluster_policies["c"].egress.len()), (7, 1));
        // An invalid edit: reported at its field, the valid version kept.
        std::fs::write(&f, cnp("1001")).unwrap();
        let ch = r.update(&dir, &mut into).unwrap();
        let errors = r.errors();
        assert!(errors.iter().any(|e| e.message.contains("ClusterNetworkPolicy c: spec.priority: 1001")), "{errors:?}");
        assert!(!ch.cluster_policies && into.cluster_policies["c"].invalid.is_none(), "{ch:?}");
        std::fs::remove_file(&f).unwrap();
        assert!(r.update(&dir, &mut into).unwrap().cluster_policies && into.cluster_policies.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nodes_load_and_go_with_their_file() {
        let dir = std::env::temp_dir().join(format!("netpol-dirnodes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("nodes.yaml");
        let node = |name: &str, ip: &str| {
            format!("---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{zone: a}}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n")
        };
        let mut r = DirReader::default();
        let mut into = Cluster::default();
        std::fs::write(&f, node("n1", "172.18.0.2") + &node("n2", "172.18.0.3")).unwrap();
        let ch = r.update(&dir, &mut into).unwrap();
        assert!(ch.nodes && !ch.policies && r.errors().is_empty(), "{ch:?} {:?}", r.errors());
        assert_eq!(into.nodes["n2"].addresses, ["172.18.0.3".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(into.nodes["n1"].labels.get("zone").map(String::as_str), Some("a"));
        // One node's address changes: only nodes changed.
        std::fs::write(&f, node("n1", "172.18.0.2") + &node("n2", "172.18.0.9")).unwrap();
        let ch = r.update(&dir, &mut into).unwrap();
        assert_eq!(ch, ChangeSet { nodes: true, ..Default::default() });
        assert_eq!(into.nodes["n2"].addresses, ["172.18.0.9".parse::<std::net::IpAddr>().unwrap()]);
        std::fs::remove_file(&f).unwrap();
        assert!(r.update(&dir, &mut into).unwrap().nodes && into.nodes.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_new_invalid_policy_fails_closed_and_an_invalid_edit_keeps_the_valid_version() {
        let dir = std::env::temp_dir().join(format!("netpol-dirfailclosed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.yaml");
        let key = ObjKey::new("a", "p");
        let mut r = DirReader::default();
        // Never valid: its fail-closed stand-in (no allows), reported with object and field.
        std::fs::write(&f, format!("{NS}---\n{}", POLICY.replace("PORT", "70000"))).unwrap();
        let l = r.load(&dir).unwrap();
        let p = &l.cluster.policies[&key];
        assert!(p.invalid.as_deref().is_some_and(|m| m.contains("a/p: spec.ingress[0].ports[0].port: 70000")), "{p:?}");
        assert!(p.ingress.is_empty() && p.isolates_ingress && !p.isolates_egress);
        assert!(
            l.errors
                .iter()
                .any(|e| e.message.contains("NetworkPolicy a/p: spec.ingress[0].ports[0].port") && e.message.contains("fail-closed")),
            "{:?}",
            l.errors
        );
        // Valid: as written.
        std::fs::write(&f, format!("{NS}---\n{}", POLICY.replace("PORT", "80"))).unwrap();
        let l = r.load(&dir).unwrap();
        assert!(l.errors.is_empty() && l.cluster.policies[&key].invalid.is_none());
        assert!(port(&l).unwrap().contains("80"));
        // An invalid edit: the valid version stays (as the API server keeps the stored one).
        std::fs::write(&f, format!("{NS}---\n{}", POLICY.replace("PORT", "0"))).unwrap();
        let l = r.load(&dir).unwrap();
        assert!(!l.errors.is_empty());
        assert!(l.cluster.policies[&key].invalid.is_none() && port(&l).unwrap().contains("80"), "{:?}", l.cluster.policies[&key]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: a, labels: {app: LABEL}}\nspec: {nodeName: n, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: y, namespace: a}\nspec: {nodeName: n, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.0.0.2}\n";

    #[test]
    fn a_file_parsed_document_by_document_loads_as_when_parsed_whole() {
        let pod = |name: &str, app: &str| {
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: a, labels: {{app: {app}}}}}\nspec: {{nodeName: n, containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: 10.0.0.1}}\n")
        };
        let json_pod = |name: &str, app: &str| {
            format!("{{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"a\",\"labels\":{{\"app\":\"{app}\"}}}},\"spec\":{{\"containers\":[]}}}}\n")
        };
        let y = Path::new("m.yaml");
        let j = Path::new("m.json");
        let cases: Vec<(&Path, String, String)> = vec![
            // One document changed among several: the others are reused.
            (
                y,
                format!("{}---\n{}---\n{NS}", pod("p1", "x"), pod("p2", "y")),
                format!("{}---\n{}---\n{NS}", pod("p1", "x"), pod("p2", "z")),
            ),
            // Markers with content, a leading marker, a duplicate (the later one wins), a null document.
            (
                y,
                format!("---\n{}--- \n{}---\n", pod("p1", "x"), pod("p1", "y")),
                format!("--- {{}}\n---\n{}---\n{}", pod("p1", "y"), pod("p1", "x")),
            ),
            // A bad document: parsed whole, its problems numbered as in the whole file.
            (y, format!("{}---\n{NS}", pod("p1", "x")), format!("{}---\nkind: Pod\nmetadata: {{name: [}}\n---\n{NS}", pod("p1", "x"))),
            (
                y,
                format!("{}---\n{}", pod("p1", "x"), POLICY.replace("PORT", "80")),
                format!("{}---\n{}", pod("p1", "x"), POLICY.replace("PORT", "0")),
            ),
            // Directives and document ends: parsed whole.
            (y, format!("%YAML 1.2\n---\n{}...\n", pod("p1", "x")), format!("%YAML 1.2\n---\n{}...\n", pod("p1", "y"))),
            // A JSON List (its items are documents), a stream, and one cut short.
            (
                j,
                format!("{{\"kind\":\"List\",\"items\":[{},{}]}}", json_pod("p1", "x"), json_pod("p2", "y")),
                format!("{{\"kind\":\"List\",\"items\":[{},{}]}}", json_pod("p1", "x"), json_pod("p1", "z")),
            ),
            (
                j,
                format!("{{\"kind\":\"List\",\"items\":[{}]}}", json_pod("p1", "x")),
                format!("{{\"kind\":\"List\",\"items\":[{},{{\"kind\":\"Pod\"}}]}}", json_pod("p1", "x")),
            ),
            (j, format!("{}{}", json_pod("p1", "x"), json_pod("p2", "y")), format!("{}  {}", json_pod("p1", "x"), json_pod("p2", "z"))),
            (j, format!("{}{}", json_pod("p1", "x"), json_pod("p2", "y")), format!("{}{{\"kind\": ", json_pod("p1", "x"))),
        ];
        for (file, before, after) in cases {
            let mut first = Loaded::default();
            let docs = load_reusing(file, &before, None, &mut first);
            let mut whole = Loaded::default();
            load_text(file, &before, &mut whole);
            assert_eq!(format!("{first:?}"), format!("{whole:?}"), "{before}");
            let prev = FileState { meta: None, hash: 0, loaded: first, docs };
            let mut second = Loaded::default();
            load_reusing(file, &after, Some(&prev), &mut second);
            let mut whole = Loaded::default();
            load_text(file, &after, &mut whole);
            assert_eq!(format!("{second:?}"), format!("{whole:?}"), "{after}");
        }
        // The unchanged documents really are reused: a document the cache claims for a
        // text stands in for that text.
        let text = format!("{}---\n{}", pod("p1", "x"), pod("p2", "y"));
        let parts = split_documents(y, &text).unwrap();
        assert_eq!(parts.len(), 2);
        let mut planted = Loaded::default();
        load_text(y, &pod("p9", "x"), &mut planted);
        let p9 = vec![ObjRef::Pod(ObjKey::new("a", "p9"))];
        let prev =
            FileState { meta: None, hash: 0, loaded: planted, docs: [(text_hash(parts[0]), (p9, Vec::new()))].into_iter().collect() };
        let mut out = Loaded::default();
        load_reusing(y, &text, Some(&prev), &mut out);
        let names: Vec<&str> = out.cluster.pods.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["p2", "p9"]);
    }

    #[test]
    fn updates_report_only_what_changed() {
        let dir = std::env::temp_dir().join(format!("netpol-dirupdate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let write = |f: &str, s: &str| {
            // As editors and kubectl-like tools do: a new file renamed over the old one.
            let tmp = dir.join(format!(".{f}.tmp"));
            std::fs::write(&tmp, s).unwrap();
            std::fs::rename(&tmp, dir.join(f)).unwrap();
        };
        write("1-pods.yaml", &PODS.replace("LABEL", "one"));
        write("2-policy.yaml", &format!("{NS}---\n{}", POLICY.replace("PORT", "80")));
        let mut r = DirReader::default();
        let mut c = Cluster::default();
        let ch = r.update(&dir, &mut c).unwrap();
        assert!(ch.namespaces && ch.policies && ch.pods.len() == 2, "{ch:?}");
        assert_eq!(c.pods.len(), 2);
        // Nothing written: nothing changed.
        assert!(r.update(&dir, &mut c).unwrap().is_empty());
        // One label in one file: that pod only.
        write("1-pods.yaml", &PODS.replace("LABEL", "two"));
        let ch = r.update(&dir, &mut c).unwrap();
        assert_eq!(ch, ChangeSet { pods: [ObjKey::new("a", "x")].into(), ..Default::default() });
        assert_eq!(c.pods[&ObjKey::new("a", "x")].labels["app"], "two");
        // The same content written again: no change.
        write("1-pods.yaml", &PODS.replace("LABEL", "two"));
        assert!(r.update(&dir, &mut c).unwrap().is_empty());
        // A later file defining the same pod wins; removing it brings the first one back.
        write("3-more.yaml", PODS.replace("LABEL", "three").split("---").next().unwrap());
        let ch = r.update(&dir, &mut c).unwrap();
        assert_eq!(ch.pods, [ObjKey::new("a", "x")].into());
        assert_eq!(c.pods[&ObjKey::new("a", "x")].labels["app"], "three");
        std::fs::remove_file(dir.join("3-more.yaml")).unwrap();
        let ch = r.update(&dir, &mut c).unwrap();
        assert_eq!(ch.pods, [ObjKey::new("a", "x")].into());
        assert_eq!(c.pods[&ObjKey::new("a", "x")].labels["app"], "two");
        // A broken write keeps the previous objects: no change; the policy file removed: the
        // policy and namespace go.
        write("1-pods.yaml", &PODS.replace("LABEL", "two")[..40]);
        assert!(r.update(&dir, &mut c).unwrap().is_empty());
        assert!(!r.errors().is_empty());
        std::fs::remove_file(dir.join("2-policy.yaml")).unwrap();
        let ch = r.update(&dir, &mut c).unwrap();
        assert!(ch.policies && ch.namespaces && ch.pods.is_empty(), "{ch:?}");
        assert!(c.policies.is_empty() && c.namespaces.is_empty() && c.pods.len() == 2);
        // The whole directory, merged, is what the updates built.
        let all = r.load(&dir).unwrap();
        assert_eq!(all.cluster.pods, c.pods);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

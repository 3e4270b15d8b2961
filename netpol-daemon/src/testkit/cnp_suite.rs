//! The ClusterNetworkPolicy conformance suite (kubernetes-sigs/network-policy-api
//! conformance/tests) as data, read from tests/cnp-conformance: the suite's world (`world.yaml`:
//! namespaces, pods, nodes), its policy files (`base/`) and one file per upstream test
//! (`suite/`) listing its subtests in order, each a list of steps: a change the Go code makes
//! (a [`Mutation`]) or one `PokeServer` call (a [`Probe`]).
//!
//! [`State`] holds the objects a cluster would hold at each step (the world's and the test's),
//! applies the mutations to them and builds the model cluster the reference evaluator reads;
//! the lab runner (tests/cnp_conformance.rs) writes the same objects for the daemon.
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

mod state;
pub use state::State;

/// The annotation of a world pod listing what its containers serve (`tcp/80 udp/53 ...`).
pub const SERVES_ANNOTATION: &str = "lab.netpol/serves";

/// tests/cnp-conformance in this repository.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/cnp-conformance")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    fn parse(s: &str) -> Result<Proto> {
        Ok(match s {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "sctp" => Proto::Sctp,
            _ => bail!("unknown protocol {s:?} (tcp, udp or sctp)"),
        })
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => netpol_common::PROTO_TCP,
            Proto::Udp => netpol_common::PROTO_UDP,
            Proto::Sctp => netpol_common::PROTO_SCTP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        })
    }
}

/// One `PokeServer` call: from pod `from` to the pod IP of `to` (a host-network pod's is its
/// node's address), and whether it must connect (`allow`) or time out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub proto: Proto,
    pub port: u16,
    pub allow: bool,
}

impl Probe {
    /// `FROM -> TO PROTO/PORT allow|deny`.
    pub fn parse(s: &str) -> Result<Probe> {
        let bad = || anyhow!("probe {s:?}: expected `FROM -> TO PROTO/PORT allow|deny`");
        let w: Vec<&str> = s.split_whitespace().collect();
        let [from, "->", to, target, verdict] = w[..] else { return Err(bad()) };
        let (proto, port) = target.split_once('/').ok_or_else(bad)?;
        let allow = match verdict {
            "allow" => true,
            "deny" => false,
            _ => return Err(bad()),
        };
        let port = port.parse().with_context(|| format!("probe {s:?}: port"))?;
        Ok(Probe { from: from.into(), to: to.into(), proto: Proto::parse(proto)?, port, allow })
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} -> {} {}/{}", self.from, self.to, self.proto, self.port)
    }
}

/// A change the Go test makes between probes. Paths are `spec.egress[0].action` style (object
/// keys and array indices).
#[derive(Clone, Debug, PartialEq)]
pub enum Mutation {
    /// Exchange two values of a ClusterNetworkPolicy (two rules).
    Swap { policy: String, a: String, b: String },
    /// Replace (or add) one value of a ClusterNetworkPolicy.
    Set { policy: String, path: String, value: Value },
    /// Insert a value into a ClusterNetworkPolicy's array at the path's index.
    Insert { policy: String, path: String, value: Value },
    /// Set a namespace's labels (replacing all of them, as `SetLabels` does; the API server
    /// keeps `kubernetes.io/metadata.name`).
    NamespaceLabels { namespace: String, labels: BTreeMap<String, String> },
    /// Delete an object of the test's manifests.
    Delete { kind: String, namespace: Option<String>, name: String },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Probe(Probe),
    Mutate(Mutation),
}

/// One `t.Run` of an upstream test, named by its string.
#[derive(Clone, Debug)]
pub struct Subtest {
    pub name: String,
    pub steps: Vec<Step>,
}

/// One upstream ConformanceTest: its short name, Go file, features, the policy files it
/// applies (paths under `base/`) and its subtests in order. Each starts from the world and its
/// manifests as written (the suite cleans a test's objects up after it).
#[derive(Clone, Debug)]
pub struct SuiteTest {
    pub name: String,
    pub source: String,
    pub features: Vec<String>,
    pub manifests: Vec<String>,
    pub subtests: Vec<Subtest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    test: String,
    source: String,
    features: Vec<String>,
    manifests: Vec<String>,
    subtests: Vec<RawSubtest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubtest {
    name: String,
    steps: Vec<BTreeMap<String, Value>>,
}

impl SuiteTest {
    /// The objects of its manifests (with their file), in order.
    pub fn objects(&self, dir: &Path) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        for m in &self.manifests {
            out.extend(read_documents(&dir.join("base").join(m))?);
        }
        Ok(out)
    }

    /// How many probes its subtests make.
    pub fn probes(&self) -> usize {
        self.subtests.iter().flat_map(|s| &s.steps).filter(|s| matches!(s, Step::Probe(_))).count()
    }
}

/// Every test of `dir/suite`, by name.
pub fn load_tests(dir: &Path) -> Result<Vec<SuiteTest>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("suite"))
        .with_context(|| format!("reading {}/suite", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut tests = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let t = parse_test(&text).with_context(|| format!("{}", f.display()))?;
        if f.file_stem().and_then(|s| s.to_str()) != Some(t.name.as_str()) {
            bail!("{}: the file of test {} must be named after it", f.display(), t.name);
        }
        tests.push(t);
    }
    Ok(tests)
}

/// One test's data file.
pub fn parse_test(text: &str) -> Result<SuiteTest> {
    let raw: RawTest = serde_norway::from_str(text)?;
    let mut subtests = Vec::new();
    for (i, st) in raw.subtests.into_iter().enumerate() {
        let steps = st
            .steps
            .iter()
            .enumerate()
            .map(|(j, s)| parse_step(s).with_context(|| format!("subtests[{i}].steps[{j}]")))
            .collect::<Result<_>>()?;
        subtests.push(Subtest { name: st.name, steps });
    }
    Ok(SuiteTest { name: raw.test, source: raw.source, features: raw.features, manifests: raw.manifests, subtests })
}

fn parse_step(s: &BTreeMap<String, Value>) -> Result<Step> {
    let str_of = |k: &str| -> Result<String> {
        s.get(k).and_then(Value::as_str).map(str::to_string).ok_or_else(|| anyhow!("{k}: a string is required"))
    };
    let value = || s.get("value").cloned().ok_or_else(|| anyhow!("value: required"));
    let keys: Vec<&str> = s.keys().map(String::as_str).collect();
    let step = match keys[..] {
        ["probe"] => Step::Probe(Probe::parse(&str_of("probe")?)?),
        ["policy", "swap"] => {
            let pair: [String; 2] = serde_json::from_value(s["swap"].clone()).context("swap: two paths")?;
            let [a, b] = pair;
            Step::Mutate(Mutation::Swap { policy: str_of("policy")?, a, b })
        }
        ["policy", "set", "value"] => Step::Mutate(Mutation::Set { policy: str_of("policy")?, path: str_of("set")?, value: value()? }),
        ["insert", "policy", "value"] => {
            Step::Mutate(Mutation::Insert { policy: str_of("policy")?, path: str_of("insert")?, value: value()? })
        }
        ["labels", "namespace"] => {
            let labels = serde_json::from_value(s["labels"].clone()).context("labels: a map of strings")?;
            Step::Mutate(Mutation::NamespaceLabels { namespace: str_of("namespace")?, labels })
        }
        ["delete", "name", "namespace"] | ["delete", "name"] => Step::Mutate(Mutation::Delete {
            kind: str_of("delete")?,
            namespace: s.get("namespace").map(|_| str_of("namespace")).transpose()?,
            name: str_of("name")?,
        }),
        _ => bail!("unknown step with keys {keys:?}"),
    };
    Ok(step)
}

/// The documents of a YAML file, as JSON (comments and empty documents dropped).
pub fn read_documents(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let v = Value::deserialize(doc).with_context(|| format!("{} (document {})", path.display(), i + 1))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// A pod of the world, as the lab builds it.
#[derive(Clone, Debug)]
pub struct WorldPod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    pub host_network: bool,
    /// What its containers serve ([`SERVES_ANNOTATION`]).
    pub serves: Vec<(Proto, u16)>,
}

impl WorldPod {
    pub fn ports(&self, proto: Proto) -> Vec<u16> {
        self.serves.iter().filter(|(p, _)| *p == proto).map(|(_, port)| *port).collect()
    }
}

/// The world's pods (from its Pod objects).
pub fn world_pods(world: &[Value]) -> Result<Vec<WorldPod>> {
    world.iter().filter(|v| v["kind"] == "Pod").map(world_pod).collect()
}

fn world_pod(v: &Value) -> Result<WorldPod> {
    let name = v["metadata"]["name"].as_str().ok_or_else(|| anyhow!("a world pod has no metadata.name"))?.to_string();
    let ctx = || format!("world pod {name}");
    let ip = v["status"]["podIP"].as_str().ok_or_else(|| anyhow!("status.podIP: required")).with_context(ctx)?;
    let serves = match v["metadata"]["annotations"][SERVES_ANNOTATION].as_str() {
        None => Vec::new(),
        Some(s) => s.split_whitespace().map(parse_served).collect::<Result<_>>().with_context(ctx)?,
    };
    Ok(WorldPod {
        namespace: v["metadata"]["namespace"].as_str().unwrap_or("default").to_string(),
        ip: ip.parse().with_context(ctx)?,
        labels: serde_json::from_value(v["metadata"]["labels"].clone()).with_context(ctx)?,
        node: v["spec"]["nodeName"].as_str().unwrap_or_default().to_string(),
        host_network: v["spec"]["hostNetwork"].as_bool().unwrap_or(false),
        serves,
        name,
    })
}

/// `tcp/80`.
fn parse_served(s: &str) -> Result<(Proto, u16)> {
    let (p, port) = s.split_once('/').ok_or_else(|| anyhow!("{SERVES_ANNOTATION}: {s:?} is not PROTO/PORT"))?;
    Ok((Proto::parse(p)?, port.parse().with_context(|| format!("{SERVES_ANNOTATION}: {s:?}"))?))
}

#[cfg(test)]
mod tests;

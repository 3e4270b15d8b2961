//! Incremental compilation: a node's compiled policy kept up to date as pods come, go and
//! change, without compiling the node again.
//!
//! What a pod change can alter, and how each part is brought up to date:
//! - The classes of its addresses (old and new): each is re-derived as a host prefix from the
//!   peer sets that now hold it (ipBlocks, and pod selectors evaluated against the pods that
//!   own the address), its pod ports and its service; it gets the matching class (a new class
//!   gets its entries in every local pod's tables), and its prefix entry is set, or removed
//!   when it agrees with the enclosing prefix (the table is kept pruned as a full compile
//!   prunes it).
//! - When the pod is on this node: its own tables, compiled from the policies selecting it.
//! - Egress to cluster IPs: decided by the backends' entries, re-derived for every local pod.
//!
//! The owners of a changed address come from an index by address kept with the compiled
//! state, so a change costs what it touches, not changed x all pods.
//!
//! Everything else (namespaces, policies, services, a pod needing a policy no local pod
//! used so far, or a change of so many pods that a full compile is as cheap:
//! [`full_is_cheaper`]) compiles the node again. The result is the same policy as a full compile
//! (the property tests check verdicts and map lookups against both the full compile and the
//! reference evaluator after random sequences of pod changes).
use std::collections::BTreeSet;
use std::net::IpAddr;

use super::build::build;
use super::ir::class_in;
use super::pending::pending_pods;
use super::state::{add_service_allows, backends_of, State};
use super::*;
use ipnet::IpNet;

/// How an update was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateKind {
    Unchanged,
    Full,
    Incremental,
}

/// Keeps one node's compiled policy, updating it incrementally where it can.
pub struct NodeCompiler {
    node: String,
    state: Option<State>,
    policy: NodePolicy,
    /// Classes right after the last full compile (new classes accumulate with incremental
    /// updates; past a bound the node is compiled again to shed the unused ones).
    classes_at_full: usize,
    /// Compile the node again for changes where that is cheaper ([`full_is_cheaper`]); off
    /// only to test and measure the incremental path on big changes.
    pub fallback: bool,
    /// The node's pending interfaces ([`set_pending`](Self::set_pending)).
    pending: Vec<PendingIface>,
    pending_changed: bool,
}

impl NodeCompiler {
    pub fn new(node: &str) -> NodeCompiler {
        NodeCompiler {
            node: node.to_string(),
            state: None,
            policy: NodePolicy::default(),
            classes_at_full: 0,
            fallback: true,
            pending: Vec::new(),
            pending_changed: false,
        }
    }

    pub fn policy(&self) -> &NodePolicy {
        &self.policy
    }

    /// The node's pending interfaces, compiled on the next [`update`](Self::update) into
    /// entries of their own in [`NodePolicy::pods`] ([`CompiledPod::pending`]).
    pub fn set_pending(&mut self, pending: &[PendingIface]) {
        if pending != self.pending.as_slice() {
            self.pending = pending.to_vec();
            self.pending_changed = true;
        }
    }

    /// Brings the compiled policy up to date with `cluster`, given what changed since the
    /// last update, and with the pending interfaces last set.
    pub fn update(&mut self, cluster: &Cluster, changes: &ChangeSet) -> UpdateKind {
        let pending_changed = std::mem::take(&mut self.pending_changed);
        // Pending interfaces are not compiled from the cluster: out before the update, back
        // in after it (their isolation follows the cluster's pending pods).
        self.policy.pods.retain(|_, c| c.pending.is_none());
        let kind = self.update_cluster(cluster, changes);
        for c in pending_pods(cluster, &self.node, &self.pending) {
            self.policy.pods.insert(c.key.clone(), c);
        }
        match kind {
            UpdateKind::Unchanged if pending_changed => UpdateKind::Incremental,
            k => k,
        }
    }

    fn update_cluster(&mut self, cluster: &Cluster, changes: &ChangeSet) -> UpdateKind {
        if self.state.is_some() && changes.is_empty() {
            return UpdateKind::Unchanged;
        }
        // Cluster policies are compiled in full compiles only (their tiers are walked per
        // pod and class; the incremental path does not follow them yet).
        let tiers = changes.cluster_policies || !cluster.cluster_policies.is_empty();
        let structural = changes.all || changes.namespaces || changes.policies || changes.services || tiers;
        let grown = self.policy.classes.len() > 2 * self.classes_at_full + 64;
        let big = self.fallback && full_is_cheaper(changes.pods.len(), cluster.pods.len());
        if !structural && !grown && !big {
            if let Some(st) = self.state.as_mut() {
                if apply_pods(st, &mut self.policy, cluster, &self.node, changes) {
                    return UpdateKind::Incremental;
                }
            }
        }
        self.full(cluster);
        UpdateKind::Full
    }

    fn full(&mut self, cluster: &Cluster) {
        let index = Index::new(cluster);
        let local: Vec<&Pod> = cluster.local_pods(&self.node).collect();
        let (policy, state) = build(&index, &local);
        self.classes_at_full = policy.classes.len();
        self.policy = policy;
        self.state = Some(state);
    }
}

/// Changes of at most this many pods are always applied incrementally.
pub const INCREMENTAL_MAX_ALWAYS: usize = 64;
/// Past [`INCREMENTAL_MAX_ALWAYS`], a change of more than 1/`FULL_FRACTION` of the cluster's
/// pods compiles the node again instead. Both paths are linear: a full compile costs about
/// 2.5-3 us per pod of the cluster, the incremental path about 2.5-10 us per changed pod,
/// growing with the node's peer sets (each changed address is re-evaluated against every
/// one of them, where a full compile resolves each set once for all pods). Measured with
/// `netpol-bench bulk` on 60,000 pods: with 2,000 policies (8 classes on the node) the
/// incremental path is cheaper up to about all pods changed, with 20,000 policies (164
/// classes) up to about a third. A quarter keeps the slower choice within about 2x of the
/// faster on both, and bounds any change to about one full compile.
pub const FULL_FRACTION: usize = 4;

/// Is compiling the node again cheaper than applying `changed` pod changes one by one?
pub fn full_is_cheaper(changed: usize, pods: usize) -> bool {
    changed > INCREMENTAL_MAX_ALWAYS && changed.saturating_mul(FULL_FRACTION) > pods
}

/// Applies pod changes (and EndpointSlice changes) to a compiled node. Returns false, having
/// changed nothing, when the node must be compiled again (a local pod needs rules not in use).
fn apply_pods(st: &mut State, out: &mut NodePolicy, cluster: &Cluster, node: &str, ch: &ChangeSet) -> bool {
    let Some((local_now, local_gone)) = local_changes(st, cluster, node, ch) else { return false };
    let affected = update_owners(st, cluster, ch);
    let new_classes = reclassify(st, out, cluster, &affected);
    // Pods that left the node; pods of the node that changed are compiled again below.
    for key in local_gone {
        st.local.remove(key);
        out.pods.remove(key);
    }
    let changed_local: BTreeSet<&ObjKey> = local_now.iter().map(|(p, _)| &p.key).collect();
    add_new_classes(st, out, cluster, &new_classes, &changed_local);
    // The node's changed pods, compiled from their policies.
    for (pod, iso) in &local_now {
        let c = st.compile_pod(&out.classes, pod, iso, &Default::default());
        st.set_local(&pod.key, iso);
        out.pods.insert(pod.key.clone(), c);
    }
    refresh_service_allows(out, cluster);
    true
}

/// The changed pods now on the node with their isolating policies, and the node's pods that
/// are gone; `None` when one of them needs a policy (direction) not in use.
fn local_changes<'a>(st: &State, cluster: &'a Cluster, node: &str, ch: &'a ChangeSet) -> Option<LocalChanges<'a>> {
    let mut now = Vec::new();
    let mut gone = Vec::new();
    for key in &ch.pods {
        match cluster.pods.get(key).filter(|p| p.is_on(node) && p.selectable()) {
            Some(p) => {
                let iso = isolating(cluster, p);
                for (d, pols) in Direction::BOTH.into_iter().zip(&iso) {
                    if pols.iter().any(|p| !st.in_use(&p.key, d)) {
                        return None;
                    }
                }
                now.push((p, iso));
            }
            None if st.local.contains_key(key) => gone.push(key),
            None => {}
        }
    }
    Some((now, gone))
}

/// Changed pods on the node (with their isolating policies), and the node's pods gone.
type LocalChanges<'a> = (Vec<(&'a Pod, [Vec<&'a Policy>; 2])>, Vec<&'a ObjKey>);

/// The index by address brought up to date with the changed pods; returns their addresses,
/// before and after.
fn update_owners(st: &mut State, cluster: &Cluster, ch: &ChangeSet) -> BTreeSet<IpAddr> {
    let mut affected: BTreeSet<IpAddr> = BTreeSet::new();
    for key in &ch.pods {
        if let Some(ips) = st.remove_owner(key) {
            affected.extend(ips);
        }
        if let Some(p) = cluster.pods.get(key).filter(|p| p.selectable()) {
            st.add_owner(p);
            affected.extend(p.ips.iter().copied());
        }
    }
    affected
}

/// The class and prefix entry of every affected address, derived again (the table kept
/// pruned); returns the classes that are new.
fn reclassify(st: &mut State, out: &mut NodePolicy, cluster: &Cluster, affected: &BTreeSet<IpAddr>) -> Vec<usize> {
    let mut new_classes = Vec::new();
    out.prefix_gen += 1;
    for addr in affected {
        let key = st.class_key(cluster, *addr);
        let known = out.classes.len();
        let class = st.class_for(&mut out.classes, key);
        if class == known {
            new_classes.push(class);
        }
        let host = IpNet::from(*addr);
        let before = out.prefixes.remove(&host);
        if class_in(&out.prefixes, *addr) != class {
            out.prefixes.insert(host, class);
        }
        if out.prefixes.get(&host) != before.as_ref() {
            out.touched_prefixes.insert(host, out.prefix_gen);
        }
    }
    new_classes
}

/// New classes: an entry in the tables of the node's unchanged pods where their rules treat
/// the class differently from class 0.
fn add_new_classes(st: &State, out: &mut NodePolicy, cluster: &Cluster, new_classes: &[usize], changed_local: &BTreeSet<&ObjKey>) {
    if new_classes.is_empty() {
        return;
    }
    for (key, compiled) in out.pods.iter_mut() {
        if changed_local.contains(key) {
            continue;
        }
        let (Some(pod), Some(iso)) = (cluster.pods.get(key), st.local.get(key)) else { continue };
        for dir in Direction::BOTH {
            let Some(dp) = compiled.dir_mut(dir) else { continue };
            let rules = st.pod_rules(&iso[dir as usize], dir);
            let base = dp.allows.get(&0).cloned().unwrap_or_else(Allow::nothing);
            for ci in new_classes {
                if let Some(a) = st.class_allow(&out.classes, *ci, &base, pod, dir, &rules) {
                    dp.allows.insert(*ci, a);
                }
            }
        }
    }
}

/// Egress to cluster IPs follows the backends' entries: derived again for every pod.
fn refresh_service_allows(out: &mut NodePolicy, cluster: &Cluster) {
    if !out.classes.iter().any(|c| c.service.is_some()) {
        return;
    }
    let backends = backends_of(cluster, &out.classes, &out.prefixes);
    for compiled in out.pods.values_mut() {
        let Some(dp) = compiled.egress.as_mut() else { continue };
        dp.allows.retain(|c, _| out.classes[*c].service.is_none());
        add_service_allows(dp, &out.classes, &backends);
    }
}

//! The policy compiler: pure functions from the cluster model to what the datapath needs on
//! one node. No I/O, no kernel, no clock.
//!
//! For every pod on the node and each direction in which some policy isolates it, the union of
//! the rules of the policies that select it decides. The compiler splits the address space into
//! *classes*: addresses that every one of those rules treats alike. The candidate prefixes are
//! every ipBlock cidr and except and every peer pod address; because prefixes are nested or
//! disjoint, the rules whose peers contain an address depend only on its longest matching
//! candidate, so one class per prefix is exact. (Pod addresses covered by an egress rule with a
//! named port also carry the pod's container ports in their class, since the port a name means
//! is the destination pod's.) Then each pod gets, per direction and class, the ports allowed.
//!
//! That is what the datapath looks up: address -> class (LPM), (pod, class, direction) ->
//! ports. No per-rule work per packet, overlapping rules are a true union (an `except` in one
//! rule never hides an address another rule allows), and a rule selecting every pod of the
//! cluster costs one entry per local pod, not one per cluster pod.
//!
//! The rooms, in the order a compilation runs through them: [`index`] (cluster-wide lookups,
//! rules' peers resolved), [`build`] (the full compile in its phases), [`state`] (what a
//! compile keeps, and the per-pod tables derived from it), [`incremental`] (pod changes
//! applied to a compiled node), [`pending`] (interfaces no pod claims yet), [`ir`] (what the
//! compiler produces) and [`explain`] (why a packet passes or not).

/// Hash maps keyed by our own values: a fast non-cryptographic hasher (no untrusted keys).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

mod build;
mod explain;
mod incremental;
mod index;
mod ir;
mod pending;
mod state;
mod tiers;

pub use explain::{explain, ChainStep, Explanation};
pub use incremental::{full_is_cheaper, NodeCompiler, UpdateKind, FULL_FRACTION, INCREMENTAL_MAX_ALWAYS};
pub use index::Index;
pub use ir::{slot_of, Allow, ClassKey, ClusterRuleRef, CompiledPod, DirPolicy, NodePolicy, PortRange, PortSet, RuleRef, Slot};
pub use pending::{pending_isolation, pending_pod, PendingIface};
pub use tiers::{cluster_policy_key, cluster_policy_of, TierStep, SLOT_DEFAULT};

use crate::model::*;
use index::isolating;

/// Compiles everything the pods of `node` (not host-network, with an address) need.
pub fn compile_node(cluster: &Cluster, node: &str) -> NodePolicy {
    let index = Index::new(cluster);
    let local: Vec<&Pod> = cluster.local_pods(node).collect();
    compile_pods(&index, &local)
}

/// Compiles the given pods as the pods of one node.
pub fn compile_pods(index: &Index, local: &[&Pod]) -> NodePolicy {
    build::build(index, local).0
}

#[cfg(test)]
mod tests;

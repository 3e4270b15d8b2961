//! The cluster model: validated, typed namespaces, pods, network policies, services and
//! EndpointSlices, the vocabulary every other part of the daemon speaks. Everything the
//! compiler sees has been checked here; errors name the object and the field at fault.
//!
//! - [`objects`]: the object types (keys, pods, policies, rules, peers, services, nodes, ...).
//! - [`cluster_policy`]: ClusterNetworkPolicies (tiers, priorities, ordered Accept/Deny/Pass
//!   rules).
//! - [`labels`]: label sets and the selectors that match them.
//! - [`cidr`]: address prefixes and address bytes as the datapath keys them.
//! - [`convert`]: the API's objects (typed, or a manifest's JSON) into the model, validated:
//!   the one entry point both sources call.
//! - [`cluster`]: the whole state the compiler reads, and what changed in it.
//!
//! The model imports nothing else of the crate: sources, compiler and tests all build on it.

pub mod cidr;
mod cluster;
mod cluster_policy;
pub mod convert;
pub mod labels;
mod objects;

pub use cluster::{ChangeSet, Cluster, Kind, Verdict};
pub use cluster_policy::{every_address, Action, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, PodSet, Tier};
pub use convert::{
    cluster_policy_converted, cluster_policy_from_json, endpoint_slice_from_k8s, from_json, from_k8s, invalid_cluster_policy_message,
    invalid_policy_message, json_key, namespace_from_k8s, node_from_k8s, pod_from_k8s, policy_from_k8s, policy_stand_in, service_from_k8s,
    valid_port_name, ApiObject, Converted, ConvertedClusterPolicy, ConvertedPolicy, Object, CLUSTER_FAIL_CLOSED_NOTE,
    CLUSTER_POLICY_API_VERSION, CLUSTER_POLICY_GROUP, CLUSTER_POLICY_KIND, CLUSTER_POLICY_PLURAL, CLUSTER_POLICY_VERSION, FAIL_CLOSED_NOTE,
};
pub use ipnet::IpNet;
pub use labels::{Labels, Selector};
pub use objects::*;

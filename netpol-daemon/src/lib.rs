//! netpol: Kubernetes NetworkPolicy enforcement with eBPF TC programs.
//!
//! Data flows one way: [`manifests`] (source) -> [`model`] (validated cluster model) ->
//! [`compiler`] (pure) -> [`entries`] (pure map contents) -> [`datapath`] (aya maps, TC attach)
//! -> [`metrics`]. [`reference`] is an independent evaluator the compiler is tested against;
//! [`lab`] builds network-namespace labs for tests and the demo.
pub mod cidr;
pub mod cli;
pub mod compiler;
pub mod daemon;
pub mod datapath;
pub mod entries;
pub mod kube_source;
pub mod lab;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod reference;
pub mod selector;
pub mod synth;
pub mod testpkt;

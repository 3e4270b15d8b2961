//! netpol: Kubernetes NetworkPolicy enforcement with eBPF TC programs.
//!
//! Data flows one way: [`source`] (manifests directory or Kubernetes watchers) -> [`model`]
//! (validated cluster model) -> [`compiler`] (pure) -> [`entries`] (pure map contents) ->
//! [`datapath`] (aya maps, TC attach) -> [`metrics`]; [`daemon`] drives the pipeline.
//! `testkit` holds test-only helpers (labs, crafted frames, the reference evaluator): built for
//! the tests and with the `testkit` feature (the lab and bench tools), not in the daemon.
pub mod cli;
pub mod compiler;
pub mod daemon;
pub mod datapath;
pub mod entries;
pub mod metrics;
pub mod model;
pub mod source;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

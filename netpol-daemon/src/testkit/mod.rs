//! Test-only helpers: network-namespace labs, crafted frames, synthetic clusters, a stand-in
//! Kubernetes API server and the independent reference evaluator the compiler is checked against.
//!
//! Compiled only for tests and with the `testkit` feature (`#[cfg(any(test, feature = "testkit"))]`
//! in lib.rs), so the daemon binary and the library users link carry none of it. The integration
//! tests get it through netpol-daemon's dev-dependency on itself with the feature on; the
//! `netpol-lab` and `netpol-bench` tools require the feature (`cargo xtask build` passes it).
pub mod apiserver;
pub mod cnp_suite;
pub mod exposition;
pub mod lab;
pub mod reference;
pub mod synth;
pub mod testpkt;

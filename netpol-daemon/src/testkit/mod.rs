//! Test-only helpers: network-namespace labs, crafted frames, synthetic clusters and the
//! independent reference evaluator the compiler is checked against.
pub mod apiserver;
pub mod lab;
pub mod reference;
pub mod synth;
pub mod testpkt;

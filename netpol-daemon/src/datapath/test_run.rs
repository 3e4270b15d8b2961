//! The loaded programs outside any interface: BPF_PROG_TEST_RUN on crafted frames (the datapath
//! tests, the per-packet benchmark) and what the verifier and JIT made of them. With
//! [`Datapath::load_detached`] the maps are programmed by the usual sync and no interface is
//! touched.
use std::time::Duration;

use anyhow::Result;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use netpol_common::programs;

use super::maps::classifier;
use super::Datapath;
use crate::model::Direction;

/// The program that judges packets of `dir` (leaving a pod: its egress).
fn program_of(dir: Direction) -> &'static str {
    match dir {
        Direction::Egress => programs::FROM_POD,
        Direction::Ingress => programs::TO_POD,
    }
}

/// Of one program: (name, instructions the verifier processed, BPF instructions after
/// verification, JIT-compiled bytes).
pub type ProgramStats = (String, Option<u32>, Option<u32>, Option<u32>);

impl Datapath {
    /// Runs the program of direction `dir` on `frame` (starting at the Ethernet header)
    /// `repeat` times with BPF_PROG_TEST_RUN: its verdict (TC_ACT_*) and the kernel-measured
    /// mean duration of one run.
    pub fn test_run(&mut self, dir: Direction, frame: &[u8], repeat: u32) -> Result<(i32, Duration)> {
        self.test_run_program(program_of(dir), frame, repeat)
    }

    /// [`Datapath::test_run`] of a frame that entered the node through `ingress_ifindex` (the
    /// `__sk_buff` field; 0 in a plain test run), on the endpoint of ifindex 1.
    pub fn test_run_from(&mut self, dir: Direction, frame: &[u8], ingress_ifindex: u32) -> Result<i32> {
        let prog = classifier(&mut self.ebpf, program_of(dir))?;
        // struct __sk_buff up to tc_index: ingress_ifindex at 36, ifindex at 40.
        let mut ctx = [0u8; 48];
        ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&1u32.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..TestRunOptions::new()
        })?;
        Ok(r.return_value as i32)
    }

    /// [`Datapath::test_run`] for any program of the object by name.
    pub fn test_run_program(&mut self, name: &str, frame: &[u8], repeat: u32) -> Result<(i32, Duration)> {
        let prog = classifier(&mut self.ebpf, name)?;
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: repeat.max(1),
            ..TestRunOptions::new()
        })?;
        Ok((r.return_value as i32, r.duration))
    }

    /// Per program: (name, instructions the verifier processed, translated bytes / 8 = BPF
    /// instructions after verification, JIT-compiled bytes), as the kernel reports them.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        let mut out = Vec::new();
        for name in [programs::FROM_POD, programs::TO_POD] {
            let Some(p) = self.ebpf.program(name) else { continue };
            let Ok(p): Result<&SchedClassifier, _> = p.try_into() else { continue };
            if let Ok(info) = p.info() {
                out.push((
                    name.to_string(),
                    info.verified_instruction_count(),
                    info.size_translated().map(|b| b / 8),
                    Some(info.size_jitted()),
                ));
            }
        }
        out
    }
}

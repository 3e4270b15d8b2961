//! Compile + program the real BPF maps (programs loaded, not attached).
use std::collections::BTreeMap;
use std::time::Instant;

use netpol_daemon::compiler;
use netpol_daemon::model::{self, ObjKey};
use netpol_daemon::testkit::synth::{self, Shape};

use crate::stats::{median, ms, p99, vm_hwm_kib, PinDir};

/// What a node's daemon does, end to end minus the file/API source: compile the node and
/// program the real BPF maps (loaded, not attached), first in full, then after each single
/// pod label change (only differing entries are rewritten).
pub fn control_bench(pods: usize, policies: usize, changes: usize) -> anyhow::Result<()> {
    use netpol_daemon::datapath::{Datapath, Iface};
    let shape = Shape::new(pods, policies);
    let mut cluster = synth::cluster(&shape);
    let node = synth::node_name(0);
    let pin = PinDir::new(format!("/sys/fs/bpf/netpol-bench-ctl-{}", std::process::id()));
    let mut dp = Datapath::load_detached(&pin.0)?;
    let local = synth::pods_on(&cluster, &node);
    let ifaces: BTreeMap<ObjKey, Iface> =
        local.iter().enumerate().map(|(i, k)| (k.clone(), Iface { ifindex: 1000 + i as u32, ifname: format!("fake{i}") })).collect();
    println!(
        "## Control plane: {pods} pods, {policies} policies, node of {} pods (real BPF maps, programs loaded, not attached)\n",
        local.len()
    );
    println!("| what | median | p99 | detail |\n| --- | --- | --- | --- |");
    let t = Instant::now();
    let n = compiler::compile_node(&cluster, &node);
    let rep = dp.sync(&n, &ifaces);
    let full = t.elapsed();
    anyhow::ensure!(rep.errors.is_empty(), "{:?}", rep.errors);
    println!(
        "| full compile + map programming, empty maps | {} | (one run) | {} IDENTITIES, {} POLICY, {} POLICY_PORTS entries written |",
        ms(full),
        rep.identities,
        rep.policy,
        rep.ports
    );
    let mut runs = Vec::new();
    let mut compile_runs = Vec::new();
    let mut nc = compiler::NodeCompiler::new(&node);
    nc.update(&cluster, &model::ChangeSet::everything());
    dp.sync(nc.policy(), &ifaces);
    for i in 0..changes {
        let key = &local[i % local.len()];
        let ch = model::ChangeSet { pods: [key.clone()].into(), ..Default::default() };
        let pod = cluster.pods.get_mut(key).unwrap();
        let old = pod.labels.insert("app".into(), format!("relabelled-{}", i % 3));
        let t = Instant::now();
        nc.update(&cluster, &ch);
        compile_runs.push(t.elapsed());
        let rep = dp.sync(nc.policy(), &ifaces);
        runs.push(t.elapsed());
        anyhow::ensure!(rep.errors.is_empty(), "{:?}", rep.errors);
        let pod = cluster.pods.get_mut(key).unwrap();
        match old {
            Some(v) => pod.labels.insert("app".into(), v),
            None => pod.labels.remove("app"),
        };
        // And back, so every change starts from the same state.
        nc.update(&cluster, &ch);
        dp.sync(nc.policy(), &ifaces);
    }
    println!(
        "| one pod label change: incremental compile + rewrite the differing map entries | {} | {} | {changes} changes |",
        ms(median(runs.clone())),
        ms(p99(runs))
    );
    println!("| of which the incremental compile | {} | {} | |", ms(median(compile_runs.clone())), ms(p99(compile_runs)));
    println!("\nPeak RSS of this process (cluster model of {pods} pods and {policies} policies, compiled node, map shadows): {:.1} MiB (VmHWM).\n", vm_hwm_kib() as f64 / 1024.0);
    drop(dp);
    drop(pin);
    Ok(())
}

//! `netpol-bench`: measurements reported by `cargo xtask bench` (which writes BENCHMARKS.md).
//! Each figure is the median of repeated runs, measured in one process, side by side.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use netpol_daemon::compiler::{self, Index};
use netpol_daemon::entries::{self, ClassInterner, PortSetInterner};
use netpol_daemon::model::ObjKey;
use netpol_daemon::synth::{self, Shape};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn compile_bench(pods: usize, policies: usize, repeats: usize) {
    let shape = Shape::new(pods, policies);
    let t = Instant::now();
    let mut cluster = synth::cluster(&shape);
    println!("## Compiler: {pods} pods, {policies} policies, {} nodes (cluster built in {})\n", shape.nodes, ms(t.elapsed()));
    println!("| what | median | p99 | detail |\n| --- | --- | --- | --- |");

    let node = synth::node_name(0);
    let mut runs = Vec::new();
    let mut last = None;
    for _ in 0..repeats {
        let t = Instant::now();
        let n = compiler::compile_node(&cluster, &node);
        runs.push(t.elapsed());
        last = Some(n);
    }
    let n = last.unwrap();
    let ids: BTreeMap<ObjKey, u32> = n.pods.keys().enumerate().map(|(i, k)| (k.clone(), i as u32 + 1)).collect();
    let d = entries::desired(&n, &ids, &mut ClassInterner::default(), &mut PortSetInterner::default());
    println!(
        "| full compile of one node (index + all its pods) | {} | {} | {} local pods, {} classes, {} prefixes; maps: {} IDENTITIES, {} POLICY, {} POLICY_PORTS entries |",
        ms(median(runs.clone())),
        ms(p99(runs)),
        n.pods.len(),
        n.classes.len(),
        n.prefixes.len(),
        d.identities.len(),
        d.policy.len(),
        d.ports.len()
    );

    // Every pod of the cluster compiled as if local (the whole cluster's work).
    let mut runs = Vec::new();
    let mut total_pods = 0;
    for _ in 0..repeats.min(5) {
        let t = Instant::now();
        let index = Index::new(&cluster);
        let all: Vec<_> = cluster.pods.values().filter(|p| p.selectable()).collect();
        let n = compiler::compile_pods(&index, &all);
        runs.push(t.elapsed());
        total_pods = n.pods.len();
    }
    println!("| full compile of every pod of the cluster at once | {} | {} | {total_pods} pods, one table |", ms(median(runs.clone())), ms(p99(runs)));

    // One pod label change on this node, recompiled and translated to map contents.
    let local = synth::pods_on(&cluster, &node);
    let mut runs = Vec::new();
    let mut classes = ClassInterner::default();
    let mut portsets = PortSetInterner::default();
    for i in 0..repeats {
        let key = &local[i % local.len()];
        let pod = cluster.pods.get_mut(key).unwrap();
        let old = pod.labels.insert("app".into(), format!("relabelled-{}", i % 3));
        let t = Instant::now();
        let n = compiler::compile_node(&cluster, &node);
        let _ = entries::desired(&n, &ids, &mut classes, &mut portsets);
        runs.push(t.elapsed());
        let pod = cluster.pods.get_mut(key).unwrap();
        match old {
            Some(v) => pod.labels.insert("app".into(), v),
            None => pod.labels.remove("app"),
        };
    }
    println!("| one pod label change: recompile node + map contents | {} | {} | {repeats} changes |\n", ms(median(runs.clone())), ms(p99(runs)));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map(|s| s.as_str()).unwrap_or("compile");
    match what {
        "compile" => {
            let pods = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10_000);
            let policies = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2_000);
            let repeats = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(21);
            compile_bench(pods, policies, repeats);
        }
        other => {
            eprintln!("usage: netpol-bench compile [PODS POLICIES REPEATS]   (unknown {other})");
            std::process::exit(2);
        }
    }
}

//! The compiler alone: full and incremental compiles of a synthetic cluster, and bulk changes.
use std::collections::BTreeMap;
use std::time::Instant;

use netpol_daemon::compiler::{self, Index};
use netpol_daemon::entries::{self, ClassInterner, PortSetInterner};
use netpol_daemon::model::{self, ObjKey};
use netpol_daemon::testkit::synth::{self, Shape};

use crate::stats::{median, ms, p99};

pub fn compile_bench(pods: usize, policies: usize, repeats: usize) {
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
    println!(
        "| full compile of every pod of the cluster at once | {} | {} | {total_pods} pods, one table |",
        ms(median(runs.clone())),
        ms(p99(runs))
    );

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
    println!(
        "| one pod label change: full recompile of the node + map contents | {} | {} | {repeats} changes |",
        ms(median(runs.clone())),
        ms(p99(runs))
    );

    // The same changes applied incrementally (what the daemon does), for a pod of this node
    // and for a pod of another node (a peer), each translated to map contents with the
    // per-pod entry cache.
    let elsewhere: Vec<ObjKey> = cluster.pods.values().filter(|p| !p.is_on(&node)).map(|p| p.key.clone()).collect();
    for (what, keys) in [("of this node", &local), ("of another node (a peer)", &elsewhere)] {
        let mut nc = compiler::NodeCompiler::new(&node);
        nc.update(&cluster, &model::ChangeSet::everything());
        let mut classes = ClassInterner::default();
        let mut portsets = PortSetInterner::default();
        let mut cache = entries::EntryCache::default();
        let _ = cache.refresh(nc.policy(), &ids, &mut classes, &mut portsets);
        let (mut runs, mut compile_runs, mut full) = (Vec::new(), Vec::new(), 0);
        for i in 0..repeats {
            let key = &keys[(i * 7919) % keys.len()];
            for back in [false, true] {
                // Relabel, then back, so every change starts from the same state.
                let pod = cluster.pods.get_mut(key).unwrap();
                pod.labels.insert(
                    "app".into(),
                    if back {
                        pod.labels["app"].trim_end_matches("-relabelled").to_string()
                    } else {
                        format!("{}-relabelled", pod.labels.get("app").cloned().unwrap_or_default())
                    },
                );
                let ch = model::ChangeSet { pods: [key.clone()].into(), ..Default::default() };
                let t = Instant::now();
                if nc.update(&cluster, &ch) == compiler::UpdateKind::Full {
                    full += 1;
                }
                let tc = t.elapsed();
                let _ = cache.refresh(nc.policy(), &ids, &mut classes, &mut portsets);
                if !back {
                    compile_runs.push(tc);
                    runs.push(t.elapsed());
                }
            }
        }
        println!("| one pod label change {what}: incremental update + map contents | {} | {} | {repeats} changes ({full} needed a full compile) |", ms(median(runs.clone())), ms(p99(runs)));
        println!("| of which the incremental compile | {} | {} | |", ms(median(compile_runs.clone())), ms(p99(compile_runs)));
    }
    println!();
}

/// A change of many remote pods at once (a manifest or relist changing `changed` pods of
/// other nodes): the node compiler's update as the daemon runs it, then the map contents,
/// beside a full compile of the same state (and, when it finishes in time, the incremental
/// path forced on for the whole change).
pub fn bulk_bench(pods: usize, policies: usize, changed: usize, forced: bool) {
    let shape = Shape::new(pods, policies);
    let mut cluster = synth::cluster(&shape);
    let node = synth::node_name(0);
    println!("## Compiler: a change of {changed} remote pods at once ({pods} pods, {policies} policies, {} nodes)\n", shape.nodes);
    println!("| what | time | detail |\n| --- | --- | --- |");
    let remote: Vec<ObjKey> = cluster.pods.values().filter(|p| !p.is_on(&node)).map(|p| p.key.clone()).take(changed).collect();
    let mut ncs = vec![("NodeCompiler update (as the daemon runs it)", compiler::NodeCompiler::new(&node))];
    if forced {
        let mut nc = compiler::NodeCompiler::new(&node);
        nc.fallback = false;
        ncs.push(("the incremental path forced on for the whole change", nc));
    }
    for (_, nc) in ncs.iter_mut() {
        nc.update(&cluster, &model::ChangeSet::everything());
    }
    let ids: BTreeMap<ObjKey, u32> = ncs[0].1.policy().pods.keys().enumerate().map(|(i, k)| (k.clone(), i as u32 + 1)).collect();
    let mut caches: Vec<_> = ncs
        .iter()
        .map(|(_, nc)| {
            let (mut classes, mut portsets, mut cache) =
                (ClassInterner::default(), PortSetInterner::default(), entries::EntryCache::default());
            let _ = cache.refresh(nc.policy(), &ids, &mut classes, &mut portsets);
            (classes, portsets, cache)
        })
        .collect();
    // Every changed pod relabelled (its app label), as a rollout rewriting the manifests would.
    let mut ch = model::ChangeSet::default();
    for k in &remote {
        let p = cluster.pods.get_mut(k).unwrap();
        let app = p.labels.get("app").cloned().unwrap_or_default();
        p.labels.insert("app".into(), format!("{app}-v2"));
        ch.pods.insert(k.clone());
    }
    for ((what, nc), (classes, portsets, cache)) in ncs.iter_mut().zip(caches.iter_mut()) {
        let t = Instant::now();
        let kind = nc.update(&cluster, &ch);
        let tc = t.elapsed();
        let _ = cache.refresh(nc.policy(), &ids, classes, portsets);
        let tm = t.elapsed();
        println!("| {what}: compiled | {} | {kind:?} ({} changed pods of {}) |", ms(tc), ch.pods.len(), cluster.pods.len());
        println!("| {what}: compiled + map contents | {} | |", ms(tm));
    }
    let t = Instant::now();
    let n = compiler::compile_node(&cluster, &node);
    println!(
        "| full compile of the same state (compile_node) | {} | {} local pods, {} classes |",
        ms(t.elapsed()),
        n.pods.len(),
        n.classes.len()
    );
    println!();
}

//! `netpol-bench`: measurements reported by `cargo xtask bench` (which writes BENCHMARKS.md).
//! Each figure is the median of repeated runs, measured in one process, side by side.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use netpol_daemon::compiler::{self, Index};
use netpol_daemon::entries::{self, ClassInterner, PortSetInterner};
use netpol_daemon::model::{self, ObjKey};
use netpol_daemon::testkit::synth::{self, Shape};

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
    println!("| one pod label change: full recompile of the node + map contents | {} | {} | {repeats} changes |", ms(median(runs.clone())), ms(p99(runs)));

    // The same changes applied incrementally (what the daemon does), for a pod of this node
    // and for a pod of another node (a peer), each translated to map contents with the
    // per-pod entry cache.
    let elsewhere: Vec<ObjKey> = cluster.pods.values().filter(|p| p.node_name.as_deref() != Some(node.as_str())).map(|p| p.key.clone()).collect();
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
                pod.labels.insert("app".into(), if back { pod.labels["app"].trim_end_matches("-relabelled").to_string() } else { format!("{}-relabelled", pod.labels.get("app").cloned().unwrap_or_default()) });
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
fn bulk_bench(pods: usize, policies: usize, changed: usize, forced: bool) {
    let shape = Shape::new(pods, policies);
    let mut cluster = synth::cluster(&shape);
    let node = synth::node_name(0);
    println!("## Compiler: a change of {changed} remote pods at once ({pods} pods, {policies} policies, {} nodes)\n", shape.nodes);
    println!("| what | time | detail |\n| --- | --- | --- |");
    let remote: Vec<ObjKey> = cluster.pods.values().filter(|p| p.node_name.as_deref() != Some(node.as_str())).map(|p| p.key.clone()).take(changed).collect();
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
            let (mut classes, mut portsets, mut cache) = (ClassInterner::default(), PortSetInterner::default(), entries::EntryCache::default());
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
    println!("| full compile of the same state (compile_node) | {} | {} local pods, {} classes |", ms(t.elapsed()), n.pods.len(), n.classes.len());
    println!();
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// What a node's daemon does, end to end minus the file/API source: compile the node and
/// program the real BPF maps (loaded, not attached), first in full, then after each single
/// pod label change (only differing entries are rewritten).
fn control_bench(pods: usize, policies: usize, changes: usize) -> anyhow::Result<()> {
    use netpol_daemon::datapath::{Datapath, Iface};
    let shape = Shape::new(pods, policies);
    let mut cluster = synth::cluster(&shape);
    let node = synth::node_name(0);
    let pin = PinDir::new(format!("/sys/fs/bpf/netpol-bench-ctl-{}", std::process::id()));
    let mut dp = Datapath::load_detached(&pin.0)?;
    let local = synth::pods_on(&cluster, &node);
    let ifaces: BTreeMap<ObjKey, Iface> =
        local.iter().enumerate().map(|(i, k)| (k.clone(), Iface { ifindex: 1000 + i as u32, ifname: format!("fake{i}") })).collect();
    println!("## Control plane: {pods} pods, {policies} policies, node of {} pods (real BPF maps, programs loaded, not attached)\n", local.len());
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
    println!("| one pod label change: incremental compile + rewrite the differing map entries | {} | {} | {changes} changes |", ms(median(runs.clone())), ms(p99(runs)));
    println!("| of which the incremental compile | {} | {} | |", ms(median(compile_runs.clone())), ms(p99(compile_runs)));
    println!("\nPeak RSS of this process (cluster model of {pods} pods and {policies} policies, compiled node, map shadows): {:.1} MiB (VmHWM).\n", vm_hwm_kib() as f64 / 1024.0);
    drop(dp);
    drop(pin);
    Ok(())
}

fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(cmd).args(args).output()?;
    anyhow::ensure!(out.status.success(), "{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// The real daemon binary on the synthetic cluster, as manifests (one file per namespace), in
/// a network namespace of its own where each local pod has an interface (a veth device with
/// a /32 route, which is all the daemon looks for): start to ready, pod label changes from the
/// file write to the maps updated (netpol_syncs_total moving), and the daemon's peak RSS.
fn daemon_bench(daemon: &str, pods: usize, policies: usize, changes: usize) -> anyhow::Result<()> {
    use netpol_daemon::metrics::{http_get, sample};
    anyhow::ensure!(std::path::Path::new(daemon).is_file(), "usage: netpol-bench daemon PATH-TO-netpol-daemon [PODS] [POLICIES] [CHANGES] (no daemon binary at {daemon:?})");
    let shape = Shape::new(pods, policies);
    let mut cluster = synth::cluster(&shape);
    let node = synth::node_name(0);
    let local = synth::pods_on(&cluster, &node);
    let id = std::process::id();
    let netns = format!("npbench-{id}");
    // On tmpfs where there is one (as a ConfigMap or projected volume is): the figure is the
    // daemon's, not the disk's.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() }.join(format!("npbench-{id}"));
    let pin = format!("/sys/fs/bpf/npbench-{id}");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cleanup = |child: Option<&mut std::process::Child>| {
        if let Some(c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::process::Command::new("ip").args(["netns", "delete", &netns]).status();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&pin);
    };
    let result = (|| -> anyhow::Result<()> {
        sh("ip", &["netns", "add", &netns])?;
        let mut batch = String::from("link set lo up\n");
        for (i, k) in local.iter().enumerate() {
            let ip = cluster.pods[k].ips[0];
            batch.push_str(&format!("link add bd{i} type veth peer name bp{i}\nlink set bd{i} up\nroute add {ip}/32 dev bd{i}\n"));
        }
        let bf = dir.join("batch");
        std::fs::write(&bf, batch)?;
        sh("ip", &["-n", &netns, "-batch", &bf.to_string_lossy()])?;
        let mdir = dir.join("manifests");
        std::fs::create_dir_all(&mdir)?;
        let write = |ns: &str, text: &str| -> anyhow::Result<()> {
            let tmp = dir.join(format!(".{ns}.tmp"));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, mdir.join(format!("{ns}.json")))?;
            Ok(())
        };
        let files = synth::manifests(&cluster);
        for (ns, text) in &files {
            write(ns, text)?;
        }
        let addr: std::net::SocketAddr = "127.0.0.1:9090".parse()?;
        let t0 = Instant::now();
        let mut child = std::process::Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{netns}"))
            .arg(daemon)
            .args(["run", "--node-name", &node, "--manifests"])
            .arg(&mdir)
            .args(["--metrics-addr", &addr.to_string(), "--bpffs", &pin])
            .env("RUST_LOG", std::env::var("NETPOL_BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(std::env::temp_dir().join(format!("npbench-{id}.log")))?)
            .spawn()?;
        let pid = child.id();
        let get = |path: &'static str| netpol_daemon::testkit::lab::in_netns(&netns, move || http_get(addr, path)).ok().and_then(|r| r.ok());
        let r = (|| -> anyhow::Result<()> {
            loop {
                if matches!(get("/readyz"), Some((200, _))) {
                    break;
                }
                anyhow::ensure!(t0.elapsed() < Duration::from_secs(120), "daemon not ready after 120 s");
                std::thread::sleep(Duration::from_millis(2));
            }
            let ready = t0.elapsed();
            let m = get("/metrics").map(|(_, b)| b).unwrap_or_default();
            let endpoints = sample(&m, "netpol_endpoints").unwrap_or(0.0);
            println!("## Daemon: {pods} pods, {policies} policies as manifests, node of {} pods (real daemon process, programs attached)\n", local.len());
            println!("| what | median | p99 | detail |\n| --- | --- | --- | --- |");
            println!("| start to ready (parse {} files, compile, program maps, attach) | {} | (one run) | {endpoints} endpoints attached |", files.len(), ms(ready));
            // The daemon's own programming-latency histogram (file mtime to maps updated): the
            // bench reads it after each change without loading the daemon while it works.
            let hist = || {
                let m = get("/metrics").map(|(_, b)| b).unwrap_or_default();
                (sample(&m, "netpol_programming_latency_seconds_count").unwrap_or(0.0), sample(&m, "netpol_programming_latency_seconds_sum").unwrap_or(0.0))
            };
            let done_at = || get("/metrics").map(|(_, b)| b).and_then(|m| sample(&m, "netpol_last_programmed_timestamp_seconds")).unwrap_or(0.0);
            // Two clocks per change: the bench's own (read just before the write, to the
            // daemon's netpol_last_programmed_timestamp_seconds), and the daemon's histogram,
            // which starts when the inotify event woke it (or at the file's mtime, a coarse
            // timestamp, when the event waited for a busy loop).
            let (mut runs, mut runs_mtime) = (Vec::new(), Vec::new());
            for i in 0..changes {
                let key = local[i % local.len()].clone();
                let (count, sum) = hist();
                cluster.pods.get_mut(&key).unwrap().labels.insert("app".into(), format!("relabelled-{i}"));
                let text = synth::namespace_manifest(&cluster, &key.namespace);
                let t = Instant::now();
                let written = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
                write(&key.namespace, &text)?;
                loop {
                    // One scrape after the change is programmed (a scrape reads every pod's
                    // counters: scraping while the daemon works would compete with it).
                    std::thread::sleep(Duration::from_millis(150));
                    let (c, s) = hist();
                    if c > count {
                        anyhow::ensure!(c == count + 1.0, "one change was programmed {} times", c - count);
                        runs_mtime.push(Duration::from_secs_f64(s - sum));
                        let done = done_at();
                        anyhow::ensure!(done >= written, "the daemon's programmed timestamp {done} precedes the write at {written}");
                        runs.push(Duration::from_secs_f64(done - written));
                        break;
                    }
                    anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "no sync after a label change");
                }
            }
            println!("| one pod label change: file written to maps updated (bench clock before the write to the daemon's netpol_last_programmed_timestamp_seconds; the daemon wakes on inotify, reads only that file, updates incrementally) | {} | {} | {changes} changes |", ms(median(runs.clone())), ms(p99(runs)));
            println!("| the same, as the daemon's own netpol_programming_latency_seconds (from the inotify wake-up) | {} | {} | {changes} changes |", ms(median(runs_mtime.clone())), ms(p99(runs_mtime)));
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let kib = |k: &str| status.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).unwrap_or(0);
            println!("\nPeak RSS of the daemon process: {:.1} MiB (VmHWM; {:.1} MiB resident now).\n", kib("VmHWM:") as f64 / 1024.0, kib("VmRSS:") as f64 / 1024.0);
            Ok(())
        })();
        cleanup(Some(&mut child));
        r
    })();
    if result.is_err() {
        cleanup(None);
    }
    result
}

/// A pod with `n` ingress rules, each allowing one /24 on its own port, plus egress to 10.2/16.
fn rules_policy(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: t, labels: {app: web}}\nspec: {nodeName: n, containers: [{name: c, image: i}]}\nstatus: {podIP: 10.1.0.10}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: many, namespace: t}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.2.0.0/16}}], ports: [{port: 443}]}]\n  ingress:\n",
    );
    for i in 0..n {
        y.push_str(&format!("  - from: [{{ipBlock: {{cidr: 10.{}.{}.0/24}}}}]\n    ports: [{{port: {}}}]\n", 100 + i / 256, i % 256, 1000 + i % 50000));
    }
    y
}

fn packet_bench(counts: &[usize], repeat: u32) -> anyhow::Result<()> {
    use netpol_daemon::datapath::{Datapath, Iface};
    use netpol_daemon::model::Direction;
    use netpol_daemon::testkit::testpkt::*;
    use std::net::Ipv4Addr;
    const ROUNDS: usize = 7;
    let web = Ipv4Addr::new(10, 1, 0, 10);
    println!("## Per-packet cost (BPF_PROG_TEST_RUN, kernel-measured ns per run)\n");
    println!(
        "Every rule count has its programs and maps loaded at once; {ROUNDS} rounds each measure every case at every rule count in turn \
         (repeat count {repeat} per figure), so the machine's drift weighs on all alike. Cells: median over the rounds; \
         the last column: median of the per-round ratios. First packet: median of 2,000 single runs per rule count, each a new \
         flow, interleaved in blocks of 100.\n"
    );
    let cases = [
        "allowed, established (flow cache hit)",
        "allowed, established, flow cache off (conntrack lookup)",
        "allowed, first packet (policy lookup + conntrack insert)",
        "denied (policy lookup, drop)",
        "allowed, established, egress",
        "harness only (a classifier returning OK)",
    ];
    struct Setup {
        dp: Datapath,
        _pin: PinDir,
        est: Vec<u8>,
        src: Ipv4Addr,
        port: u16,
    }
    let mut setups = Vec::new();
    for &n in counts {
        let pin = PinDir::new(format!("/sys/fs/bpf/netpol-bench-{}-{n}", std::process::id()));
        let mut dp = Datapath::load_detached(&pin.0)?;
        if n == counts[0] {
            println!("Programs as loaded by this kernel (verifier-processed instructions; BPF instructions after verification; JIT bytes):\n");
            for (name, verified, insns, jited) in dp.program_stats() {
                let f = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into());
                println!("- `{name}`: {} verified, {} instructions, {} JIT bytes", f(verified), f(insns), f(jited));
            }
            println!();
        }
        let mut loaded = netpol_daemon::source::manifests::Loaded::default();
        netpol_daemon::source::manifests::load_text(std::path::Path::new("bench.yaml"), &rules_policy(n), &mut loaded);
        anyhow::ensure!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let node = compiler::compile_node(&loaded.cluster, "n");
        let ifaces: BTreeMap<ObjKey, Iface> = [(ObjKey::new("t", "web"), Iface { ifindex: 1, ifname: "lo".into() })].into();
        let rep = dp.sync(&node, &ifaces);
        anyhow::ensure!(rep.errors.is_empty(), "{:?}", rep.errors);
        // The source is in the last rule's block, on its port.
        let last = n - 1;
        let src = Ipv4Addr::new(10, (100 + last / 256) as u8, (last % 256) as u8, 7);
        let port = (1000 + last % 50000) as u16;
        let est = tcp4(src, web, 40000, port, TCP_ACK);
        setups.push(Setup { dp, _pin: pin, est, src, port });
    }
    let out = tcp4(web, Ipv4Addr::new(10, 2, 0, 1), 40000, 443, TCP_ACK);
    let one = |dp: &mut Datapath, dir, frame: &[u8], want: i32| -> anyhow::Result<f64> {
        let (rc, d) = dp.test_run(dir, frame, repeat)?;
        anyhow::ensure!(rc == want, "verdict {rc}, expected {want}");
        Ok(d.as_nanos() as f64)
    };
    // samples[case][rule count][round]
    let mut samples = vec![vec![Vec::new(); counts.len()]; cases.len()];
    for round in 0..=ROUNDS {
        for (j, s) in setups.iter_mut().enumerate() {
            let dp = &mut s.dp;
            let denied = tcp4(Ipv4Addr::new(11, 0, 0, 1), web, 40000, s.port, TCP_SYN);
            let v = [
                one(dp, Direction::Ingress, &s.est, 0)?,
                {
                    dp.set_flow_cache(false)?;
                    let v = one(dp, Direction::Ingress, &s.est, 0)?;
                    dp.set_flow_cache(true)?;
                    v
                },
                0.0,
                one(dp, Direction::Ingress, &denied, 2)?,
                one(dp, Direction::Egress, &out, 0)?,
                dp.test_run_program(netpol_common::programs::NOOP, &s.est, repeat)?.1.as_nanos() as f64,
            ];
            // Round 0 warms up (caches, branch predictors, the CPU's clock) and is not kept.
            if round > 0 {
                for (c, x) in v.into_iter().enumerate() {
                    samples[c][j].push(x);
                }
            }
        }
    }
    let mut firsts = vec![Vec::new(); counts.len()];
    for block in 0..20u16 {
        for (j, s) in setups.iter_mut().enumerate() {
            for k in 0..100u16 {
                let frame = tcp4(s.src, web, 10000 + block * 100 + k, s.port, TCP_SYN);
                let (rc, d) = s.dp.test_run(Direction::Ingress, &frame, 1)?;
                anyhow::ensure!(rc == 0, "first packet verdict {rc}");
                firsts[j].push(d.as_nanos() as f64);
            }
        }
    }
    let median = |v: &[f64]| -> f64 {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let last = counts.len() - 1;
    print!("| case |");
    for n in counts {
        print!(" {n} rules |");
    }
    println!(" {}/{} (per round) |", counts[last], counts[0]);
    print!("| --- |");
    for _ in 0..=counts.len() {
        print!(" --- |");
    }
    println!();
    for (c, name) in cases.iter().enumerate() {
        print!("| {name} |");
        if c == 2 {
            for f in &firsts {
                print!(" {:.0} ns |", median(f));
            }
            println!(" {:.2}x |", median(&firsts[last]) / median(&firsts[0]));
            continue;
        }
        for cell in &samples[c] {
            print!(" {:.0} ns |", median(cell));
        }
        let ratios: Vec<f64> = samples[c][last].iter().zip(&samples[c][0]).map(|(a, b)| a / b).collect();
        println!(" {:.2}x |", median(&ratios));
    }
    // Net of the harness, round by round.
    for (c, name) in [(0usize, "allowed, established (flow cache hit), minus the harness"), (1, "allowed, established, flow cache off, minus the harness")] {
        print!("| {name} |");
        let net: Vec<Vec<f64>> = (0..counts.len()).map(|j| samples[c][j].iter().zip(&samples[5][j]).map(|(a, h)| a - h).collect()).collect();
        for cell in &net {
            print!(" {:.0} ns |", median(cell));
        }
        println!(" |");
    }
    println!();
    Ok(())
}

/// A bpffs directory of the benchmark's own maps, removed when dropped (also when a
/// benchmark fails half-way).
struct PinDir(std::path::PathBuf);

impl PinDir {
    fn new(path: String) -> PinDir {
        let p = std::path::PathBuf::from(path);
        let _ = std::fs::remove_dir_all(&p);
        PinDir(p)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
        "bulk" => {
            let pods = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60_000);
            let policies = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2_000);
            let changed = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(50_000);
            let forced = args.get(4).is_some_and(|s| s == "forced");
            bulk_bench(pods, policies, changed, forced);
        }
        "packet" => {
            let repeat = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
            if let Err(e) = packet_bench(&[10, 100, 1000, 10_000], repeat) {
                eprintln!("netpol-bench packet: {e:#}");
                std::process::exit(1);
            }
        }
        "control" => {
            let pods = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10_000);
            let policies = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2_000);
            let changes = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100);
            if let Err(e) = control_bench(pods, policies, changes) {
                eprintln!("netpol-bench control: {e:#}");
                std::process::exit(1);
            }
        }
        "daemon" => {
            let daemon = args.get(1).cloned().unwrap_or_default();
            let pods = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10_000);
            let policies = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2_000);
            let changes = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(50);
            if let Err(e) = daemon_bench(&daemon, pods, policies, changes) {
                eprintln!("netpol-bench daemon: {e:#}");
                std::process::exit(1);
            }
        }
        other => {
            eprintln!("usage: netpol-bench compile [PODS POLICIES REPEATS] | bulk [PODS POLICIES CHANGED [forced]] | packet [REPEAT] | control [PODS POLICIES CHANGES] | daemon DAEMON_BIN [PODS POLICIES CHANGES]   (unknown {other})");
            std::process::exit(2);
        }
    }
}

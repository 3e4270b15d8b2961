//! The full compile of one node, in the phases the module doc describes: the rules in use,
//! resolved to distinct peer sets; the candidate prefixes; which peer sets hold each
//! candidate; the classes and the pruned prefix table; each local pod's tables, with its
//! egress to cluster IPs. It leaves behind the [`State`] incremental updates start from.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::index::{block_holds, has_named, isolating, PeerResolver, PeerSet};
use super::state::{add_service_allows, backends_of, class_ports, GroupState, RuleState, State};
use super::tiers::{selecting_tiers, Tiers};
use super::*;
use ipnet::IpNet;

use crate::model::cidr;

/// Numbers the full compiles ([`NodePolicy::epoch`]).
static EPOCH: AtomicU64 = AtomicU64::new(1);

/// Compiles `local` as the pods of one node; returns the policy and the state incremental
/// updates start from.
pub(super) fn build(index: &Index, local: &[&Pod]) -> (NodePolicy, State) {
    let isolating_of: Vec<[Vec<&Policy>; 2]> = local.iter().map(|pod| isolating(index.cluster, pod)).collect();
    let tiers_of: Vec<[Tiers; 2]> = local.iter().map(|pod| selecting_tiers(index.cluster, pod)).collect();
    let rules = resolve_rules(index, &isolating_of, &tiers_of);
    let (named_groups, any_named) = rules.named_groups();
    let cands = candidates(index, &rules.groups, &named_groups, any_named);
    let members = membership(&rules.groups, &cands.prefixes);
    let mut st = rules.into_state(index.cluster, named_groups, any_named, cands.service_of);
    let (classes, table) = classify(&mut st, index, &cands.prefixes, members);
    let prefixes = prune(table);
    let pods = compile_local(&mut st, index.cluster, &classes, &prefixes, local, isolating_of, tiers_of);
    let epoch = EPOCH.fetch_add(1, Ordering::Relaxed);
    (NodePolicy { epoch, classes, prefixes, pods, prefix_gen: 0, touched_prefixes: BTreeMap::new() }, st)
}

/// Every rule in use on the node, resolved once and numbered in [`RuleRef`] order. Rules
/// with the same peers share one peer set ("group"): classes are computed over groups.
#[derive(Default)]
struct Rules<'a> {
    rules: Vec<RuleState>,
    /// Policy in use -> per direction, its rules' range in `rules`.
    rule_range: HashMap<ObjKey, [Option<(usize, usize)>; 2]>,
    groups: Vec<PeerSet<'a>>,
    group_states: Vec<GroupState>,
    group_ids: HashMap<PeerSet<'a>, u32>,
    /// ClusterNetworkPolicy rules: per (policy, direction), per rule its group.
    cluster_groups: HashMap<(String, Direction), Vec<Option<u32>>>,
    /// Groups of cluster egress rules with named ports.
    cluster_named: BTreeSet<u32>,
}

/// Resolves the rules of every (policy, direction) isolating some local pod, and of every
/// (cluster policy, direction) selecting one, once each.
fn resolve_rules<'a>(index: &Index<'a>, isolating_of: &[[Vec<&'a Policy>; 2]], tiers_of: &[[Tiers<'a>; 2]]) -> Rules<'a> {
    let mut used: BTreeMap<(&ObjKey, Direction), &'a Policy> = BTreeMap::new();
    for per_dir in isolating_of {
        for (d, v) in Direction::BOTH.into_iter().zip(per_dir) {
            for p in v {
                used.insert((&p.key, d), *p);
            }
        }
    }
    let mut peers = PeerResolver::new(index);
    let mut out = Rules::default();
    for ((key, dir), pol) in used {
        let first = out.rules.len();
        for (i, rule) in pol.rules(dir).iter().enumerate() {
            let set = peers.peer_set(pol, rule);
            let any = matches!(set, PeerSet::Any);
            let group = out.group_of(set, |set| GroupState::new(set, rule, pol));
            let rref = RuleRef { policy: pol.key.clone(), dir, index: i };
            out.rules.push(RuleState { rref, rule: rule.clone(), group, any, named_egress: dir == Direction::Egress && has_named(rule) });
        }
        out.rule_range.entry(key.clone()).or_default()[dir as usize] = Some((first, out.rules.len()));
    }
    let mut used_cluster: BTreeMap<(&str, Direction), &'a ClusterPolicy> = BTreeMap::new();
    for per_dir in tiers_of {
        for (d, t) in Direction::BOTH.into_iter().zip(per_dir) {
            for p in t.admin.iter().chain(&t.baseline) {
                used_cluster.insert((&p.name, d), *p);
            }
        }
    }
    for ((name, dir), pol) in used_cluster {
        let groups = pol.rules(dir).iter().map(|rule| out.cluster_group(&mut peers, rule, dir)).collect();
        out.cluster_groups.insert((name.to_string(), dir), groups);
    }
    out
}

impl<'a> Rules<'a> {
    /// The group of a cluster policy rule's peers (`None`: it has none, it matches nothing).
    fn cluster_group(&mut self, peers: &mut PeerResolver<'_, 'a>, rule: &'a ClusterRule, dir: Direction) -> Option<u32> {
        if rule.peers.is_empty() {
            return None;
        }
        let set = peers.cluster_peer_set(rule);
        let g = self.group_of(set, |set| GroupState::cluster(set, rule));
        let named = rule.ports.iter().flatten().any(|p| matches!(p, ClusterPort::Named(_)));
        if dir == Direction::Egress && named {
            self.cluster_named.insert(g);
        }
        Some(g)
    }

    /// The group of peer set `set`, registered (its state made by `state`) if new.
    fn group_of(&mut self, set: PeerSet<'a>, state: impl FnOnce(&PeerSet<'a>) -> GroupState) -> u32 {
        if let Some(g) = self.group_ids.get(&set) {
            return *g;
        }
        let g = self.groups.len() as u32;
        self.group_states.push(state(&set));
        self.groups.push(set.clone());
        self.group_ids.insert(set, g);
        g
    }

    /// The groups of egress rules with named ports, and whether one of them is every peer.
    fn named_groups(&self) -> (BTreeSet<u32>, bool) {
        let mut named: BTreeSet<u32> = self.rules.iter().filter(|r| r.named_egress).map(|r| r.group).collect();
        named.extend(self.cluster_named.iter().copied());
        let any = named.iter().any(|g| matches!(self.groups[*g as usize], PeerSet::Any));
        (named, any)
    }

    /// The state kept for incremental updates, with the addresses of every selectable pod.
    fn into_state(self, cluster: &Cluster, named_groups: BTreeSet<u32>, any_named: bool, service_of: HashMap<IpAddr, ObjKey>) -> State {
        let pods = cluster.pods.len();
        let mut st = State {
            group_classes: vec![Vec::new(); self.group_states.len()],
            rules: self.rules,
            rule_range: self.rule_range,
            cluster_groups: self.cluster_groups,
            groups: self.group_states,
            named_groups,
            any_named,
            class_ids: HashMap::default(),
            class_groups: vec![Vec::new()],
            with_ports: Vec::new(),
            service_of,
            local: BTreeMap::new(),
            pod_ips: HashMap::with_capacity_and_hasher(pods, Default::default()),
            ip_owners: HashMap::with_capacity_and_hasher(pods, Default::default()),
        };
        for p in cluster.pods.values().filter(|p| p.selectable()) {
            st.add_owner(p);
        }
        st
    }
}

/// The candidate prefixes, sorted and distinct, and the service of each cluster IP.
struct Candidates {
    prefixes: Vec<IpNet>,
    service_of: HashMap<IpAddr, ObjKey>,
}

/// Candidate prefixes: every cidr and except, every peer pod address, (for egress rules with
/// named ports, which resolve against each destination pod) every pod address such a rule
/// covers, and every service cluster IP (a class of its own).
fn candidates(index: &Index, groups: &[PeerSet], named_groups: &BTreeSet<u32>, any_named: bool) -> Candidates {
    let mut prefixes: Vec<IpNet> = Vec::new();
    let mut seen_lists: BTreeSet<*const Vec<IpAddr>> = BTreeSet::new();
    for g in groups {
        if let PeerSet::Some { blocks, pod_ips } = g {
            for b in blocks {
                prefixes.push(b.cidr);
                prefixes.extend(b.except.iter().copied());
            }
            if seen_lists.insert(Rc::as_ptr(&pod_ips.0)) {
                prefixes.extend(pod_ips.iter().map(|ip| IpNet::from(*ip)));
            }
        }
    }
    if !named_groups.is_empty() {
        for ip in index.pod_by_ip.keys() {
            let host = IpNet::from(*ip);
            if any_named || named_groups.iter().any(|g| groups[*g as usize].contains_region(&host)) {
                prefixes.push(host);
            }
        }
    }
    let mut service_of: HashMap<IpAddr, ObjKey> = HashMap::default();
    for svc in index.cluster.services.values() {
        for ip in &svc.cluster_ips {
            service_of.insert(*ip, svc.key.clone());
            prefixes.push(IpNet::from(*ip));
        }
    }
    prefixes.sort_unstable();
    prefixes.dedup();
    Candidates { prefixes, service_of }
}

/// Per candidate, the groups whose peer set contains its region, in group order.
fn membership(groups: &[PeerSet], cands: &[IpNet]) -> Vec<Vec<u32>> {
    let host_idx: HashMap<IpAddr, usize> = cands.iter().enumerate().filter(|(_, c)| cidr::is_host(c)).map(|(i, c)| (c.addr(), i)).collect();
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); cands.len()];
    let mut list_hits: HashMap<*const Vec<IpAddr>, Rc<Vec<usize>>> = HashMap::default();
    for (gi, g) in groups.iter().enumerate() {
        let PeerSet::Some { blocks, pod_ips } = g else { continue };
        let mut hits: Vec<usize> = Vec::new();
        for b in blocks {
            // Candidates inside the cidr are a contiguous run in (address, length) order.
            let lo = cands.partition_point(|c| *c < b.cidr);
            let inside = cands.iter().enumerate().skip(lo).take_while(|(_, c)| b.cidr.contains(&c.addr()));
            hits.extend(inside.filter(|(_, c)| block_holds(b, c)).map(|(i, _)| i));
        }
        let from_pods = list_hits
            .entry(Rc::as_ptr(&pod_ips.0))
            .or_insert_with(|| Rc::new(pod_ips.iter().filter_map(|ip| host_idx.get(ip).copied()).collect()))
            .clone();
        // Groups are visited in order, so each candidate's list stays sorted; a candidate hit
        // twice by one group is marked once.
        for i in hits.into_iter().chain(from_pods.iter().copied()) {
            if members[i].last() != Some(&(gi as u32)) {
                members[i].push(gi as u32);
            }
        }
    }
    members
}

/// Classes: candidates in the same peer sets (and, under named egress rules, with the same
/// pod ports) are one class. A cluster IP is a class of its own: egress to it is decided by
/// its backends ([`add_service_allows`]); as a source address it is an address like any
/// other. Returns the classes and every candidate's class.
fn classify(st: &mut State, index: &Index, cands: &[IpNet], members: Vec<Vec<u32>>) -> (Vec<ClassKey>, BTreeMap<IpNet, usize>) {
    let mut classes: Vec<ClassKey> = vec![ClassKey::default()];
    st.class_ids.insert((Vec::new(), Vec::new(), None), 0);
    let mut table: BTreeMap<IpNet, usize> = BTreeMap::new();
    for (prefix, groups) in cands.iter().zip(members) {
        let host = cidr::is_host(prefix).then(|| prefix.addr());
        let ports = match host {
            Some(addr) if st.wants_ports(&groups) => index.pod_by_ip(addr).map(class_ports).unwrap_or_default(),
            _ => Vec::new(),
        };
        let service = host.and_then(|addr| st.service_of.get(&addr).cloned());
        table.insert(*prefix, st.class_for(&mut classes, (groups, ports, service)));
    }
    (classes, table)
}

/// Drops prefixes that change nothing: one whose class equals its nearest enclosing prefix's
/// (or is class 0 with no enclosing prefix).
fn prune(table: BTreeMap<IpNet, usize>) -> BTreeMap<IpNet, usize> {
    // BTreeMap order on IpNet is (address, length): an enclosing prefix sorts before the
    // prefixes inside it, so a stack of open ancestors suffices.
    let mut out = BTreeMap::new();
    let mut stack: Vec<(IpNet, usize)> = Vec::new();
    for (c, class) in table {
        while let Some((top, _)) = stack.last() {
            if top.contains(&c) {
                break;
            }
            stack.pop();
        }
        let inherited = stack.last().map_or(0, |(_, k)| *k);
        if class != inherited {
            out.insert(c, class);
        }
        stack.push((c, class));
    }
    out
}

/// Per local pod, direction and class: the allowed ports, and egress to cluster IPs by
/// their backends.
fn compile_local(
    st: &mut State,
    cluster: &Cluster,
    classes: &[ClassKey],
    prefixes: &BTreeMap<IpNet, usize>,
    local: &[&Pod],
    isolating_of: Vec<[Vec<&Policy>; 2]>,
    tiers_of: Vec<[Tiers; 2]>,
) -> BTreeMap<ObjKey, CompiledPod> {
    let backends = backends_of(cluster, classes, prefixes);
    let mut pods = BTreeMap::new();
    for ((pod, per_dir), tiers) in local.iter().zip(isolating_of).zip(tiers_of) {
        let mut out = st.compile_pod(classes, pod, &per_dir, &tiers);
        if let Some(dp) = out.egress.as_mut() {
            add_service_allows(dp, classes, &backends);
        }
        st.set_local(&pod.key, &per_dir);
        pods.insert(pod.key.clone(), out);
    }
    pods
}

//! A sync: makes the maps and attachments exactly what a compiled node says for the pods that
//! have an interface, writing only differences (each map through its [`MapMirror`]). The order
//! is what keeps every packet judged by a consistent state: entries go in before the entries
//! that refer to them (port sets, then per-endpoint policy, then address classes, then each
//! pod's own addresses, then its endpoint entry, then its programs), and what is no longer
//! wanted goes last, once nothing refers to it. Errors are reported per pod; the rest of the
//! node stays programmed, and the next sync compares everything again.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::Ebpf;
use netpol_common::*;

use super::endpoints::endpoint_info;
use super::maps::{migrate_policy_v1, take};
use super::mirror::{MapMirror, Scope, Written};
use super::{Datapath, HashMap, Iface, Limits, Pods, SyncReport};
use crate::compiler::NodePolicy;
use crate::entries::{self, ClassInterner, Desired, EntryCache, Lpm, PortSetInterner};
use crate::model::ObjKey;

impl Datapath {
    /// Programs the maps and attachments to be exactly what `node` says for the pods in
    /// `ifaces` (pods without an interface are not programmed). Only differences are written;
    /// new entries go in before the entries that refer to them, stale ones go last.
    pub fn sync(&mut self, node: &NodePolicy, ifaces: &BTreeMap<ObjKey, Iface>) -> SyncReport {
        let mut report = SyncReport::default();
        let pods: Pods = node.pods.iter().filter_map(|(k, c)| ifaces.get(k).map(|i| (k, (i, entries::endpoint_flags(c))))).collect();
        self.links.hand_over_claimed(node, &pods);
        // Interfaces that disappeared or changed: detach first (their entries go below).
        for id in self.links.detach_stale(&pods) {
            self.endpoints.free(id);
        }
        let ids = self.assign_ids(&pods, &mut report);
        self.counters.remap_policy_slots(node, &ids);
        let pass = self.tables.insert(node, &ids, &mut report);
        self.addrs.set_endpoint_addrs(node, &pods, &ids, &mut report);
        self.program_endpoints(node, &pods, &ids, &mut report);

        // Remove what is no longer wanted: endpoints first, then what they referred to.
        self.links.drop_unadopted();
        self.endpoints.retain_live(&pods.values().map(|(i, _)| i.ifindex).collect());
        let failed = !report.errors.is_empty();
        self.tables.remove_stale(pass, failed);

        (report.identities, report.policy, report.ports) = self.tables.counts();
        report.endpoints = self.links.len();
        self.links.release_upgrades(&mut self.ebpf);
        report
    }

    /// Endpoint ids: an attached pod keeps its own, the others get one.
    fn assign_ids(&mut self, pods: &Pods, report: &mut SyncReport) -> BTreeMap<ObjKey, u32> {
        let mut ids: BTreeMap<ObjKey, u32> = self.links.endpoints().map(|(id, k)| (k.clone(), id)).collect();
        for (k, (iface, _)) in pods {
            if ids.contains_key(*k) {
                continue;
            }
            match self.new_endpoint_id(iface.ifindex) {
                Ok(id) => {
                    ids.insert((*k).clone(), id);
                }
                Err(e) => report.errors.push(format!("{k}: {e}")),
            }
        }
        ids
    }

    /// An id for the pod on `ifindex`; one not adopted starts with no counts and no cached flows.
    fn new_endpoint_id(&mut self, ifindex: u32) -> Result<u32> {
        let (id, fresh) = self.endpoints.alloc(ifindex, self.links.endpoints().map(|(id, _)| id))?;
        if fresh {
            self.counters.reset(id);
            self.conntrack.void_flow_cache(id);
        }
        Ok(id)
    }

    /// Each pod's endpoint entry, then its programs where the interface has none yet. A pod
    /// whose interface cannot be attached loses its entry and id.
    fn program_endpoints(&mut self, node: &NodePolicy, pods: &Pods, ids: &BTreeMap<ObjKey, u32>, report: &mut SyncReport) {
        self.links.finish_preattach();
        for (k, (iface, flags)) in pods {
            let Some(&id) = ids.get(*k) else { continue };
            // (Its drops then count as fail-closed, not as the policies'.)
            let flags = if report.fail_closed.contains(k) { flags | EP_FAIL_CLOSED } else { *flags };
            if let Err(e) = self.endpoints.set(iface.ifindex, endpoint_info(id, flags, node.pods.get(*k)), k, &iface.ifname) {
                report.errors.push(format!("{k}: ENDPOINTS insert: {e}"));
                continue;
            }
            if self.links.contains(k) {
                continue;
            }
            if let Err(e) = self.links.attach(&mut self.ebpf, k, iface, node.pods[*k].pending.is_some(), id) {
                report.errors.push(format!("{k}: attaching to {}: {e:#}", iface.ifname));
                self.endpoints.remove(iface.ifindex);
                self.endpoints.free(id);
            }
        }
    }
}

type Identities = MapMirror<LpmTrie<MapData, IdKey, u32>>;
type Policy = MapMirror<BpfHashMap<MapData, PolicyKey, PolicyValue>>;
type Ports = MapMirror<LpmTrie<MapData, PortKey, PortValue>>;

/// The policy tables (IDENTITIES, POLICY, POLICY_PORTS) and what their entries derive from:
/// the entries of the last sync, updated in place for what changed, and the ids of address
/// classes and port sets.
pub(super) struct Tables {
    identities: Identities,
    policy: Policy,
    ports: Ports,
    cache: EntryCache,
    classes: ClassInterner,
    portsets: PortSetInterner,
    /// The last sync left something unwritten (an error, entries cut to fit): the next one
    /// compares every entry.
    compare_all: bool,
    pub limits: Limits,
}

/// What [`Tables::insert`] wrote, for [`Tables::remove_stale`] to finish.
pub(super) struct Pass {
    /// The entries cut to fit the maps, when they did not.
    fitted: Option<Desired>,
    identities: Written<Lpm<IdKey>>,
    policy: Written<PolicyKey>,
    ports: Written<Lpm<PortKey>>,
}

impl Tables {
    /// Takes the maps with what a previous daemon left: it keeps enforcing until the first sync
    /// replaces it entry by entry. New class and port-set ids start above the adopted ones.
    pub fn adopt(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Tables> {
        let identities: Identities = MapMirror::adopt(take(ebpf, maps::IDENTITIES)?)?;
        let mut policy = take(ebpf, maps::POLICY)?;
        migrate_policy_v1(pin_dir, &mut policy);
        let policy: Policy = MapMirror::adopt(policy)?;
        let ports: Ports = MapMirror::adopt(take(ebpf, maps::POLICY_PORTS)?)?;
        let classes = identities.installed().values().copied().chain(policy.installed().keys().map(|k| k.identity));
        let max_class = classes.max().unwrap_or(0);
        let max_set = ports.installed().keys().map(|k| k.1.portset).max().unwrap_or(0);
        Ok(Tables {
            identities,
            policy,
            ports,
            cache: EntryCache::default(),
            classes: ClassInterner::starting_at(max_class + 1),
            portsets: PortSetInterner::starting_at(max_set + 1),
            compare_all: true,
            limits: Limits::default(),
        })
    }

    /// Entries installed: (identities, policy, ports).
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.identities.len(), self.policy.len(), self.ports.len())
    }

    /// Writes the entries `node` needs (with endpoint ids `ids`) that the maps lack: port sets,
    /// then per-endpoint policy, then address classes.
    pub fn insert(&mut self, node: &NodePolicy, ids: &BTreeMap<ObjKey, u32>, report: &mut SyncReport) -> Pass {
        let changed = self.cache.refresh(node, ids, &mut self.classes, &mut self.portsets);
        // Entries cut to fit a map: on a copy, compared in full.
        let fitted = fit_maps(&self.limits, node, &self.cache.cur, ids, report);
        let desired = fitted.as_ref().unwrap_or(&self.cache.cur);
        // The keys to compare: only those that changed, when the last sync left everything
        // written; else every one.
        let (ports, policy, identities) = match changed.filter(|_| fitted.is_none() && !self.compare_all) {
            Some(c) => (Scope::Changed(c.ports), Scope::Changed(c.policy), Scope::Changed(c.identities)),
            None => (Scope::All, Scope::All, Scope::All),
        };
        let errors = &mut report.errors;
        let ports =
            self.ports.insert_wanted(ports, &desired.ports, |k, e| errors.push(format!("POLICY_PORTS insert (set {}): {e}", k.1.portset)));
        let mut owner: Option<HashMap<u32, &ObjKey>> = None;
        let policy = self.policy.insert_wanted(policy, &desired.policy, |k, e| {
            let owner = owner.get_or_insert_with(|| ids.iter().map(|(k, id)| (*id, k)).collect());
            let pod = owner.get(&k.endpoint).map(|p| p.to_string()).unwrap_or_default();
            errors.push(format!("{pod}: POLICY insert: {e}"));
        });
        let identities =
            self.identities.insert_wanted(identities, &desired.identities, |_, e| errors.push(format!("IDENTITIES insert: {e}")));
        Pass { fitted, identities, policy, ports }
    }

    /// Removes the entries no longer desired (nothing refers to them any more), forgets the
    /// ids of classes and port sets no longer used, and notes whether the next sync must
    /// compare everything (`failed`: the sync reported an error).
    pub fn remove_stale(&mut self, pass: Pass, failed: bool) {
        let desired = pass.fitted.as_ref().unwrap_or(&self.cache.cur);
        self.identities.remove_stale(pass.identities, &desired.identities);
        self.policy.remove_stale(pass.policy, &desired.policy);
        self.ports.remove_stale(pass.ports, &desired.ports);
        self.portsets.retain(&self.cache.port_set_ids());
        self.classes.retain(&desired.classes);
        self.compare_all = failed || pass.fitted.is_some();
    }
}

/// Never truncates silently: when the node needs more entries than a map holds, the pods
/// with the most entries lose theirs (their isolated directions then deny everything) and
/// each is reported with the policies that isolate it. Returns the entries cut to fit, or
/// `None` when everything fits.
fn fit_maps(limits: &Limits, node: &NodePolicy, d: &Desired, ids: &BTreeMap<ObjKey, u32>, report: &mut SyncReport) -> Option<Desired> {
    if d.identities.len() > limits.identities || d.ports.len() > limits.ports {
        report.errors.push(format!(
            "node needs {} IDENTITIES and {} POLICY_PORTS entries, the maps hold {} and {}: every isolated pod fails closed",
            d.identities.len(),
            d.ports.len(),
            limits.identities,
            limits.ports
        ));
        for k in ids.keys() {
            let isolated = node.pods.get(k).is_some_and(|p| p.ingress.is_some() || p.egress.is_some());
            if isolated {
                report.errors.push(format!("{k}: failing closed (policies: {})", policies_of(node, k)));
                report.fail_closed.push(k.clone());
            }
        }
        return Some(Desired { classes: d.classes.clone(), policy_entries: d.policy_entries.clone(), ..Default::default() });
    }
    if d.policy.len() <= limits.policy {
        return None;
    }
    let mut by_size: Vec<(usize, &ObjKey)> = d.policy_entries.iter().map(|(k, n)| (*n, k)).collect();
    by_size.sort_by(|a, b| b.cmp(a));
    let mut total = d.policy.len();
    let mut dropped = BTreeSet::new();
    for (n, k) in by_size {
        if total <= limits.policy {
            break;
        }
        total -= n;
        if let Some(id) = ids.get(k) {
            dropped.insert(*id);
        }
        report.fail_closed.push(k.clone());
        report.errors.push(format!(
            "{k}: needs {n} POLICY entries (policies: {}); the node needs {} and the map holds {}: failing closed",
            policies_of(node, k),
            d.policy.len(),
            limits.policy
        ));
    }
    let mut fitted = d.clone();
    fitted.policy.retain(|k, _| !dropped.contains(&k.endpoint));
    Some(fitted)
}

/// The policies that isolate pod `k`, for an error message.
fn policies_of(node: &NodePolicy, k: &ObjKey) -> String {
    let Some(p) = node.pods.get(k) else { return String::new() };
    let mut v: Vec<String> = p.ingress.iter().chain(p.egress.iter()).flat_map(|d| d.policies.iter().map(|k| k.to_string())).collect();
    v.sort();
    v.dedup();
    v.join(", ")
}

//! Pure translation of a compiled node into datapath map contents (keys and values of
//! netpol-common), and an emulation of the BPF lookup over them. No I/O.
use std::collections::{BTreeMap, BTreeSet};

/// Hash maps keyed by our own values: a fast non-cryptographic hasher (no untrusted keys).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use netpol_common::*;

use crate::compiler::{Allow, ClassKey, CompiledPod, NodePolicy, PortSet, Slot};
use crate::model::cidr::{self, addr_bytes, addr_family};
use crate::model::{Direction, ObjKey, Protocol};
use ipnet::IpNet;

/// An LPM key: prefix length and data.
pub type Lpm<K> = (u32, K);

/// Decomposes an inclusive port range into (value, prefix length) blocks: at most 30 for any
/// range of the 16-bit space.
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (lo as u32, hi as u32);
    while lo <= hi {
        // Largest aligned block starting at lo that does not pass hi.
        let mut size = if lo == 0 { 1u32 << 16 } else { 1u32 << lo.trailing_zeros().min(16) };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros() as u8));
        lo += size;
    }
    out
}

/// Gives values stable small ids while they are in use: port sets (shared by every pod and
/// class allowing the same ports) and address classes. Id 0 is never handed out.
#[derive(Clone, Debug)]
pub struct Interner<K> {
    ids: HashMap<K, u32>,
    next: u32,
}

impl<K> Default for Interner<K> {
    fn default() -> Self {
        Interner { ids: HashMap::default(), next: 1 }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Interner<K> {
    /// Starts handing out ids at `next` (ids below may be in use in adopted maps).
    pub fn starting_at(next: u32) -> Self {
        Interner { ids: HashMap::default(), next: next.max(1) }
    }

    pub fn id(&mut self, k: &K) -> u32 {
        if let Some(id) = self.ids.get(k) {
            return *id;
        }
        let id = self.next;
        self.next += 1;
        self.ids.insert(k.clone(), id);
        id
    }

    /// Forgets values whose ids are not in `used`.
    pub fn retain(&mut self, used: &BTreeSet<u32>) {
        self.ids.retain(|_, id| used.contains(id));
    }
}

pub type PortSetInterner = Interner<PortSet>;
pub type ClassInterner = Interner<ClassKey>;

/// Everything the datapath needs, as map contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub identities: HashMap<Lpm<IdKey>, u32>,
    pub policy: HashMap<PolicyKey, PolicyValue>,
    pub ports: HashMap<Lpm<PortKey>, PortValue>,
    /// The ids of the classes in use (the values of `identities`).
    pub classes: BTreeSet<u32>,
    /// Number of POLICY entries per pod (to name the pods when a map is too small).
    pub policy_entries: BTreeMap<ObjKey, usize>,
}

pub fn endpoint_flags(c: &CompiledPod) -> u32 {
    let mut f = EP_PRESENT;
    if c.ingress.is_some() {
        f |= EP_ISOLATE_INGRESS;
    }
    if c.egress.is_some() {
        f |= EP_ISOLATE_EGRESS;
    }
    if c.ingress.as_ref().is_some_and(|d| d.audit) {
        f |= EP_AUDIT_INGRESS;
    }
    if c.egress.as_ref().is_some_and(|d| d.audit) {
        f |= EP_AUDIT_EGRESS;
    }
    f
}

pub fn id_key(cidr: &IpNet) -> Lpm<IdKey> {
    (ID_KEY_FIXED_BITS + cidr.prefix_len() as u32, IdKey { family: addr_family(cidr.addr()), _pad: [0; 3], addr: addr_bytes(cidr.addr()) })
}

/// The POLICY_PORTS entries of port set `id`: its allowed ports under `id`, the ports a
/// cluster policy denies under `id | PORTSET_DENIED` (each with its policy's slot).
pub fn portset_entries(id: u32, ps: &PortSet, out: &mut HashMap<Lpm<PortKey>, PortValue>) {
    for (set, list) in [(id, ps.iter().collect::<Vec<_>>()), (id | PORTSET_DENIED, ps.iter_denied().collect())] {
        for (proto, ranges) in list {
            for r in ranges {
                for (value, len) in port_prefixes(r.lo, r.hi) {
                    out.insert(
                        (
                            PORT_KEY_FIXED_BITS + len as u32,
                            PortKey { portset: set, proto: proto.number(), _pad: 0, port: value.to_be_bytes() },
                        ),
                        PortValue { slot: r.slot as u32 },
                    );
                }
            }
        }
    }
}

/// A port set that is one port of one protocol, none denied: (protocol, port, slot), what a
/// [`POLICY_ONE_PORT`] value holds instead of a port set id.
fn one_port(ps: &PortSet) -> Option<(u8, u16, Slot)> {
    if ps.has_denies() {
        return None;
    }
    let mut ranges = ps.iter().flat_map(|(proto, ranges)| ranges.iter().map(move |r| (proto, r)));
    let (proto, r) = ranges.next()?;
    (ranges.next().is_none() && r.lo == r.hi).then_some((proto.number(), r.lo, r.slot))
}

/// The map contents for a compiled node, given each programmed pod's endpoint id.
pub fn desired(
    node: &NodePolicy,
    endpoints: &BTreeMap<ObjKey, u32>,
    classes: &mut ClassInterner,
    portsets: &mut PortSetInterner,
) -> Desired {
    let mut cache = EntryCache::default();
    cache.refresh(node, endpoints, classes, portsets);
    cache.cur
}

/// The keys whose desired value changed (or that are no longer desired) in one
/// [`EntryCache::refresh`].
#[derive(Debug, Default)]
pub struct Changed {
    pub identities: Vec<Lpm<IdKey>>,
    pub policy: Vec<PolicyKey>,
    pub ports: Vec<Lpm<PortKey>>,
}

/// The map contents of the last [`EntryCache::refresh`] and what they were derived from, so
/// that the next refresh after an incremental compile (same epoch) touches only what
/// changed: the prefixes the compiler noted, the pods whose compiled tables or endpoint
/// changed, and the port sets they gained or lost.
#[derive(Debug, Default)]
pub struct EntryCache {
    /// What the datapath should hold now.
    pub cur: Desired,
    valid: bool,
    epoch: u64,
    prefix_gen: u64,
    /// Class index of every prefix, and how many prefixes map to each class (a class no
    /// prefix maps to gets no id and no entries).
    prefix_class: HashMap<IpNet, usize>,
    refs: Vec<u32>,
    class_ids: Vec<Option<u32>>,
    pods: HashMap<ObjKey, Programmed>,
    /// Per port set in use: its POLICY_PORTS entries and users.
    port_sets: HashMap<u32, PortSetUse>,
}

/// A programmed pod: its endpoint id, the compiled tables its entries come from, its POLICY
/// entries.
type Programmed = (u32, CompiledPod, Vec<(PolicyKey, PolicyValue)>);

impl EntryCache {
    /// Brings `cur` up to date with `node`. `Some`: what changed, when the update was
    /// incremental; `None`: derived afresh (compare everything).
    pub fn refresh(
        &mut self,
        node: &NodePolicy,
        endpoints: &BTreeMap<ObjKey, u32>,
        classes: &mut ClassInterner,
        portsets: &mut PortSetInterner,
    ) -> Option<Changed> {
        let inc = self.valid && node.epoch != 0 && node.epoch == self.epoch && node.prefix_gen >= self.prefix_gen;
        let prefix_moves = if inc {
            self.move_prefixes(node)
        } else {
            self.count_prefixes(node);
            Vec::new()
        };
        let class_ids = self.class_ids_of(node, classes);
        // A class that gained or lost its id changes the entries of every pod: afresh.
        let classes_kept = class_ids.len() >= self.class_ids.len() && class_ids[..self.class_ids.len()] == self.class_ids[..];
        self.epoch = node.epoch;
        self.prefix_gen = node.prefix_gen;
        self.class_ids = class_ids;
        if !(inc && classes_kept) {
            self.rebuild(node, endpoints, portsets);
            return None;
        }
        let mut ch = Changed::default();
        self.move_identities(&prefix_moves, &mut ch);
        self.redo_pods(node, endpoints, portsets, &mut ch);
        Some(ch)
    }

    /// The prefixes the compiler touched since the last refresh whose class changed: their
    /// classes and the classes' prefix counts brought up to date. Returns them.
    fn move_prefixes(&mut self, node: &NodePolicy) -> Vec<IpNet> {
        let mut moves = Vec::new();
        self.refs.resize(node.classes.len(), 0);
        for (c, _) in node.touched_prefixes.iter().filter(|(_, g)| **g > self.prefix_gen) {
            let (old, new) = (self.prefix_class.get(c).copied(), node.prefixes.get(c).copied());
            if old == new {
                continue;
            }
            if let Some(o) = old {
                self.refs[o] -= 1;
            }
            match new {
                Some(n) => {
                    self.refs[n] += 1;
                    self.prefix_class.insert(*c, n);
                }
                None => {
                    self.prefix_class.remove(c);
                }
            }
            moves.push(*c);
        }
        moves
    }

    /// Every prefix's class and the classes' prefix counts, afresh.
    fn count_prefixes(&mut self, node: &NodePolicy) {
        self.refs = vec![0; node.classes.len()];
        self.prefix_class = node.prefixes.iter().map(|(c, k)| (*c, *k)).collect();
        for k in node.prefixes.values() {
            self.refs[*k] += 1;
        }
    }

    /// The id of every class of `node` some prefix maps to (kept from the last refresh within
    /// one epoch), `None` for the others; class 0 is id 0.
    fn class_ids_of(&self, node: &NodePolicy, classes: &mut ClassInterner) -> Vec<Option<u32>> {
        let same_epoch = node.epoch != 0 && node.epoch == self.epoch;
        let kept = |i: usize| self.class_ids.get(i).copied().flatten().filter(|_| same_epoch);
        node.classes
            .iter()
            .enumerate()
            .map(|(i, k)| match i {
                0 => Some(0),
                _ if self.refs[i] > 0 => Some(kept(i).unwrap_or_else(|| classes.id(k))),
                _ => None,
            })
            .collect()
    }

    /// The IDENTITIES entries of the moved prefixes, and the class ids in use.
    fn move_identities(&mut self, prefix_moves: &[IpNet], ch: &mut Changed) {
        for c in prefix_moves {
            let key = id_key(c);
            match self.prefix_class.get(c) {
                Some(k) => {
                    let id = self.class_ids[*k].expect("referenced");
                    if self.cur.identities.insert(key, id) != Some(id) {
                        ch.identities.push(key);
                    }
                }
                None => {
                    if self.cur.identities.remove(&key).is_some() {
                        ch.identities.push(key);
                    }
                }
            }
        }
        self.cur.classes = self.classes_in_use();
    }

    /// The ids of the classes some prefix maps to (class 0 aside).
    fn classes_in_use(&self) -> BTreeSet<u32> {
        self.class_ids.iter().flatten().copied().filter(|c| *c != 0).collect()
    }

    /// The POLICY entries of the pods whose compiled tables or endpoint changed, and of the
    /// pods gone: every old entry out first, then the new ones in (an endpoint id freed by one
    /// pod may be another's now).
    fn redo_pods(&mut self, node: &NodePolicy, endpoints: &BTreeMap<ObjKey, u32>, portsets: &mut PortSetInterner, ch: &mut Changed) {
        let mut redo: Vec<(ObjKey, u32)> = Vec::new();
        for (key, pod) in &node.pods {
            let Some(&endpoint) = endpoints.get(key) else { continue };
            if !self.pods.get(key).is_some_and(|(e, c, _)| *e == endpoint && c == pod) {
                redo.push((key.clone(), endpoint));
            }
        }
        let gone: Vec<ObjKey> = self.pods.keys().filter(|k| !node.pods.contains_key(*k) || !endpoints.contains_key(*k)).cloned().collect();
        let mut edit = Edit::default();
        for k in redo.iter().map(|(k, _)| k).chain(&gone) {
            if let Some((_, _, old)) = self.pods.remove(k) {
                self.remove_entries(&old, &mut edit);
            }
            self.cur.policy_entries.remove(k);
        }
        for (key, endpoint) in redo {
            let pod = &node.pods[&key];
            self.install(key, endpoint, pod, portsets, &mut edit);
        }
        self.settle(edit, ch);
    }

    /// Everything derived again from `node` (pods' entries included).
    fn rebuild(&mut self, node: &NodePolicy, endpoints: &BTreeMap<ObjKey, u32>, portsets: &mut PortSetInterner) {
        self.valid = true;
        self.cur = Desired::default();
        self.pods.clear();
        self.port_sets.clear();
        self.cur.identities.reserve(node.prefixes.len());
        for (cidr, class) in &node.prefixes {
            self.cur.identities.insert(id_key(cidr), self.class_ids[*class].expect("referenced"));
        }
        self.cur.classes = self.classes_in_use();
        let mut edit = Edit::default();
        for (key, pod) in &node.pods {
            let Some(&endpoint) = endpoints.get(key) else { continue };
            self.install(key.clone(), endpoint, pod, portsets, &mut edit);
        }
        self.settle(edit, &mut Changed::default());
    }

    /// Puts the POLICY entries of `pod`, programmed as `endpoint`, into `cur`.
    fn install(&mut self, key: ObjKey, endpoint: u32, pod: &CompiledPod, portsets: &mut PortSetInterner, edit: &mut Edit) {
        let entries = self.pod_entries(endpoint, pod, portsets);
        self.add_entries(&entries, edit);
        self.cur.policy_entries.insert(key.clone(), entries.len());
        self.pods.insert(key, (endpoint, pod.clone(), entries));
    }

    /// A pod's POLICY entries (port sets interned, their POLICY_PORTS entries derived once).
    fn pod_entries(&mut self, endpoint: u32, pod: &CompiledPod, portsets: &mut PortSetInterner) -> Vec<(PolicyKey, PolicyValue)> {
        let mut entries = Vec::new();
        for dir in Direction::BOTH {
            let Some(dp) = pod.dir(dir) else { continue };
            for (class, allow) in &dp.allows {
                // A class no address maps to needs no entry.
                let Some(identity) = self.class_ids[*class] else { continue };
                let value = match allow {
                    Allow::All(slot) => PolicyValue { portset: 0, flags: POLICY_ALLOW_ALL | (*slot as u32) << POLICY_SLOT_SHIFT },
                    Allow::Ports(with_other) => {
                        // Other protocols are a flag of the entry.
                        let ps = &with_other.ports_only();
                        let mut flags = with_other.other().map_or(0, |s| POLICY_ALLOW_OTHER | (s as u32) << POLICY_SLOT_SHIFT);
                        if let Some(s) = with_other.denied_other() {
                            flags |= POLICY_DENY_OTHER | (s as u32) << POLICY_DENY_SLOT_SHIFT;
                        }
                        if let Some((proto, port, slot)) = one_port(ps) {
                            PolicyValue {
                                portset: one_port_portset(proto, port),
                                flags: flags | POLICY_ONE_PORT | (slot as u32) << POLICY_ONE_PORT_SLOT_SHIFT,
                            }
                        } else {
                            // Port sets are shared by their ports.
                            let id = portsets.id(ps);
                            self.port_sets.entry(id).or_insert_with(|| {
                                let mut m = HashMap::default();
                                portset_entries(id, ps, &mut m);
                                PortSetUse { entries: m.into_iter().collect(), users: 0, live: false }
                            });
                            if ps.has_denies() {
                                flags |= POLICY_HAS_DENIES;
                            }
                            PolicyValue { portset: id, flags }
                        }
                    }
                };
                entries.push((PolicyKey { endpoint, identity, dir: dir.datapath(), _pad: [0; 3] }, value));
            }
        }
        entries
    }

    /// Takes a pod's POLICY entries out of `cur`.
    fn remove_entries(&mut self, old: &[(PolicyKey, PolicyValue)], edit: &mut Edit) {
        for (k, v) in old {
            let was = self.cur.policy.remove(k);
            edit.policy.entry(*k).or_insert(was);
            if v.uses_port_set() {
                if let Some(u) = self.port_sets.get_mut(&v.portset) {
                    u.users -= 1;
                    edit.port_sets.insert(v.portset);
                }
            }
        }
    }

    /// Puts a pod's POLICY entries into `cur`.
    fn add_entries(&mut self, new: &[(PolicyKey, PolicyValue)], edit: &mut Edit) {
        for (k, v) in new {
            let was = self.cur.policy.insert(*k, *v);
            edit.policy.entry(*k).or_insert(was);
            if v.uses_port_set() {
                self.port_sets.get_mut(&v.portset).expect("derived with the entry").users += 1;
                edit.port_sets.insert(v.portset);
            }
        }
    }

    /// Port sets that lost their last user or gained their first: their POLICY_PORTS entries
    /// out of or into `cur`. Then the keys whose value differs from before the edit.
    fn settle(&mut self, edit: Edit, ch: &mut Changed) {
        let mut ports: HashMap<Lpm<PortKey>, Option<PortValue>> = HashMap::default();
        for id in edit.port_sets {
            let Some(u) = self.port_sets.get_mut(&id) else { continue };
            if u.users == 0 {
                for (k, v) in &u.entries {
                    if u.live {
                        self.cur.ports.remove(k);
                        ports.entry(*k).or_insert(Some(*v));
                    }
                }
                self.port_sets.remove(&id);
            } else if !u.live {
                u.live = true;
                for (k, v) in &u.entries {
                    let was = self.cur.ports.insert(*k, *v);
                    ports.entry(*k).or_insert(was);
                }
            }
        }
        ch.policy.extend(edit.policy.into_iter().filter(|(k, was)| self.cur.policy.get(k) != was.as_ref()).map(|(k, _)| k));
        ch.ports.extend(ports.into_iter().filter(|(k, was)| self.cur.ports.get(k) != was.as_ref()).map(|(k, _)| k));
    }

    /// The port set ids in use.
    pub fn port_set_ids(&self) -> BTreeSet<u32> {
        self.port_sets.keys().copied().collect()
    }
}

/// The POLICY keys touched by one refresh with their values before it, and the port sets
/// whose users changed.
#[derive(Default)]
struct Edit {
    policy: HashMap<PolicyKey, Option<PolicyValue>>,
    port_sets: BTreeSet<u32>,
}

/// A port set's POLICY_PORTS entries, how many POLICY values use it, and whether its entries
/// are in `cur`.
#[derive(Debug)]
struct PortSetUse {
    entries: Vec<(Lpm<PortKey>, PortValue)>,
    users: usize,
    live: bool,
}

/// Emulates the whole BPF decision on map contents for an endpoint with `flags` (conntrack
/// and node addresses aside): isolation, policy tables, audit.
pub fn verdict(
    d: &Desired,
    endpoint: u32,
    flags: u32,
    dir: Direction,
    peer: std::net::IpAddr,
    proto: u8,
    port: Option<u16>,
) -> crate::model::Verdict {
    use crate::model::Verdict;
    let (isolate, audit) = match dir {
        Direction::Ingress => (EP_ISOLATE_INGRESS, EP_AUDIT_INGRESS),
        Direction::Egress => (EP_ISOLATE_EGRESS, EP_AUDIT_EGRESS),
    };
    if flags & isolate == 0 || lookup(d, endpoint, dir, peer, proto, port) {
        Verdict::Allow
    } else if flags & audit != 0 {
        Verdict::Audit
    } else {
        Verdict::Deny
    }
}

/// Emulates the BPF policy lookup on map contents.
pub fn lookup(d: &Desired, endpoint: u32, dir: Direction, peer: std::net::IpAddr, proto: u8, port: Option<u16>) -> bool {
    lookup_slot(d, endpoint, dir, peer, proto, port).is_some()
}

/// Emulates the BPF policy lookup on map contents: the slot of the allowing policy.
pub fn lookup_slot(d: &Desired, endpoint: u32, dir: Direction, peer: std::net::IpAddr, proto: u8, port: Option<u16>) -> Option<u32> {
    lookup_result(d, endpoint, dir, peer, proto, port).ok()
}

/// Emulates the BPF policy lookup on map contents: `Ok(allowing slot)`, or `Err(denying
/// cluster policy's slot, or SLOT_NONE)`.
pub fn lookup_result(d: &Desired, endpoint: u32, dir: Direction, peer: std::net::IpAddr, proto: u8, port: Option<u16>) -> Result<u32, u32> {
    let full = id_key(&IpNet::from(peer));
    let identity = d
        .identities
        .iter()
        .filter(|((len, k), _)| {
            k.family == full.1.family && addr_bytes(cidr::prefix(peer, (*len - ID_KEY_FIXED_BITS) as u8).addr()) == k.addr
        })
        .max_by_key(|((len, _), _)| *len)
        .map_or(0, |(_, id)| *id);
    let key = |identity| PolicyKey { endpoint, identity, dir: dir.datapath(), _pad: [0; 3] };
    let v = d.policy.get(&key(identity)).or_else(|| d.policy.get(&key(0))).ok_or(SLOT_NONE)?;
    if v.flags & POLICY_ALLOW_ALL != 0 {
        return Ok((v.flags >> POLICY_SLOT_SHIFT) & 0xff);
    }
    if Protocol::from_number(proto).is_none() {
        if v.flags & POLICY_ALLOW_OTHER != 0 {
            return Ok((v.flags >> POLICY_SLOT_SHIFT) & 0xff);
        }
        return Err(if v.flags & POLICY_DENY_OTHER != 0 { (v.flags >> POLICY_DENY_SLOT_SHIFT) & 0xff } else { SLOT_NONE });
    }
    let port = port.ok_or(SLOT_NONE)?;
    if let Some((one_proto, one, slot)) = v.one_port() {
        return if (one_proto, one) == (proto, port) { Ok(slot) } else { Err(SLOT_NONE) };
    }
    // The longest matching prefix decides, as in the LPM trie.
    let in_set = |set: u32| {
        d.ports
            .iter()
            .filter(|((len, k), _)| k.portset == set && k.proto == proto && covers_port(*len, k, port))
            .max_by_key(|((len, _), _)| *len)
            .map(|(_, v)| v.slot)
    };
    match in_set(v.portset) {
        Some(slot) => Ok(slot),
        None if v.flags & POLICY_HAS_DENIES != 0 => Err(in_set(v.portset | PORTSET_DENIED).unwrap_or(SLOT_NONE)),
        None => Err(SLOT_NONE),
    }
}

/// Does the POLICY_PORTS key `(len, k)` cover `port` (its port set and protocol aside)?
fn covers_port(len: u32, k: &PortKey, port: u16) -> bool {
    let bits = len - PORT_KEY_FIXED_BITS;
    let mask: u16 = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
    (port & mask) == u16::from_be_bytes(k.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(p: &[(u16, u8)]) -> Vec<u32> {
        let mut v: Vec<u32> = p
            .iter()
            .flat_map(|&(val, len)| {
                let size = 1u32 << (16 - len);
                (val as u32)..(val as u32 + size)
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn port_prefixes_cover_exactly_the_range() {
        for (lo, hi) in [(1u16, 65535u16), (0, 65535), (80, 80), (8000, 9000), (1, 1), (65535, 65535), (1024, 2047), (3, 60000)] {
            let p = port_prefixes(lo, hi);
            assert!(p.len() <= 32, "{lo}-{hi}: {} prefixes", p.len());
            assert_eq!(covered(&p), (lo as u32..=hi as u32).collect::<Vec<_>>(), "{lo}-{hi}");
        }
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(1, 65535).len(), 16);
    }

    #[test]
    fn port_sets_attribute_overlaps_to_the_lower_slot() {
        let mut a = PortSet::default();
        a.add_from(Protocol::Tcp, 100, 200, 3);
        a.add_from(Protocol::Tcp, 150, 250, 1);
        a.add_from(Protocol::Tcp, 90, 95, 3);
        a.add_from(Protocol::Tcp, 96, 99, 3);
        a.add_from(Protocol::Tcp, 0, 65535, 7);
        let got: Vec<_> = a.iter().flat_map(|(_, r)| r.iter().map(|r| (r.lo, r.hi, r.slot))).collect();
        assert_eq!(got, vec![(0, 89, 7), (90, 149, 3), (150, 250, 1), (251, 65535, 7)]);
        assert_eq!(a.slot(Protocol::Tcp, 149), Some(3));
        assert_eq!(a.slot(Protocol::Udp, 149), None);
        // Map entries carry the slot, and the LPM lookup finds it.
        let mut out = HashMap::default();
        portset_entries(9, &a, &mut out);
        for (port, slot) in [(0u16, 7u32), (89, 7), (90, 3), (149, 3), (150, 1), (250, 1), (251, 7), (65535, 7)] {
            let hit = out.iter().filter(|((len, k), _)| covers_port(*len, k, port)).max_by_key(|((len, _), _)| *len).map(|(_, v)| v.slot);
            assert_eq!(hit, Some(slot), "port {port}");
        }
    }

    #[test]
    fn interner_shares_equal_sets() {
        let mut i = PortSetInterner::default();
        let mut a = PortSet::default();
        a.add(Protocol::Tcp, 80, 80);
        let mut b = PortSet::default();
        b.add(Protocol::Tcp, 80, 80);
        let mut c = PortSet::default();
        c.add(Protocol::Udp, 80, 80);
        assert_eq!(i.id(&a), i.id(&b));
        assert_ne!(i.id(&a), i.id(&c));
        assert_ne!(i.id(&a), 0);
    }
}

//! Pure translation of a compiled node into datapath map contents (keys and values of
//! netpol-common), and an emulation of the BPF lookup over them. No I/O.
use std::collections::{BTreeMap, BTreeSet};

/// Hash maps keyed by our own values: a fast non-cryptographic hasher (no untrusted keys).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use netpol_common::*;

use crate::cidr::Cidr;
use crate::compiler::{Allow, ClassKey, CompiledPod, NodePolicy, PortSet};
use crate::model::{Direction, ObjKey, Protocol};

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
#[derive(Debug)]
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
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// In prefix order.
    pub identities: Vec<(Lpm<IdKey>, u32)>,
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

pub fn id_key(cidr: &Cidr) -> Lpm<IdKey> {
    (
        ID_KEY_FIXED_BITS + cidr.len() as u32,
        IdKey { family: if cidr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }, _pad: [0; 3], addr: cidr.addr_bytes() },
    )
}

pub fn portset_entries(id: u32, ps: &PortSet, out: &mut HashMap<Lpm<PortKey>, PortValue>) {
    for (proto, ranges) in ps.iter() {
        for r in ranges {
            for (value, len) in port_prefixes(r.lo, r.hi) {
                out.insert(
                    (
                        PORT_KEY_FIXED_BITS + len as u32,
                        PortKey { portset: id, proto: proto.number(), _pad: 0, port: value.to_be_bytes() },
                    ),
                    PortValue { slot: r.slot as u32 },
                );
            }
        }
    }
}

/// The map contents for a compiled node, given each programmed pod's endpoint id.
pub fn desired(
    node: &NodePolicy,
    endpoints: &BTreeMap<ObjKey, u32>,
    classes: &mut ClassInterner,
    portsets: &mut PortSetInterner,
) -> Desired {
    desired_cached(node, endpoints, classes, portsets, &mut EntryCache::default())
}

/// What the last [`desired_cached`] derived per pod, reused for pods whose compiled tables,
/// endpoint and class ids are unchanged.
#[derive(Debug, Default)]
pub struct EntryCache {
    epoch: u64,
    class_ids: Vec<Option<u32>>,
    pods: HashMap<ObjKey, (u32, CompiledPod, Vec<(PolicyKey, PolicyValue)>)>,
    port_entries: HashMap<u32, Vec<(Lpm<PortKey>, PortValue)>>,
}

/// [`desired`], reusing the entries of pods that did not change since the last call.
pub fn desired_cached(
    node: &NodePolicy,
    endpoints: &BTreeMap<ObjKey, u32>,
    classes: &mut ClassInterner,
    portsets: &mut PortSetInterner,
    cache: &mut EntryCache,
) -> Desired {
    let mut out = Desired::default();
    // Only classes some address maps to need entries (an incrementally updated node keeps
    // classes no address has any more until it is compiled again).
    let mut referenced = vec![false; node.classes.len()];
    referenced[0] = true;
    for c in node.prefixes.values() {
        referenced[*c] = true;
    }
    // Ids of the classes of the same compilation are reused by index (interning a class key
    // hashes its whole rule list).
    let same = node.epoch != 0 && node.epoch == cache.epoch;
    let class_ids: Vec<Option<u32>> = node
        .classes
        .iter()
        .enumerate()
        .map(|(i, k)| match i {
            0 => Some(0),
            _ if referenced[i] => Some(cache.class_ids.get(i).copied().flatten().filter(|_| same).unwrap_or_else(|| classes.id(k))),
            _ => None,
        })
        .collect();
    cache.epoch = node.epoch;
    // Entries of unchanged pods stay valid while the classes they name keep their ids (new
    // classes only append; a pod with entries for them has changed tables anyway).
    if class_ids.len() < cache.class_ids.len() || class_ids[..cache.class_ids.len()] != cache.class_ids[..] {
        cache.pods.clear();
    }
    cache.class_ids = class_ids.clone();
    out.identities.reserve(node.prefixes.len());
    for (cidr, class) in &node.prefixes {
        out.identities.push((id_key(cidr), class_ids[*class].expect("referenced")));
    }
    out.classes = class_ids.iter().flatten().copied().filter(|c| *c != 0).collect();
    out.policy.reserve(cache.pods.values().map(|(_, _, e)| e.len()).sum());
    let mut sets: std::collections::HashSet<u32, foldhash::fast::RandomState> = Default::default();
    for (key, pod) in &node.pods {
        let Some(&endpoint) = endpoints.get(key) else { continue };
        let fresh = match cache.pods.get(key) {
            Some((e, c, _)) => *e != endpoint || c != pod,
            None => true,
        };
        if fresh {
            let mut entries = Vec::new();
            for dir in Direction::BOTH {
                let Some(dp) = pod.dir(dir) else { continue };
                for (class, allow) in &dp.allows {
                    let Some(identity) = class_ids[*class] else { continue };
                    let value = match allow {
                        Allow::All(slot) => PolicyValue { portset: 0, flags: POLICY_ALLOW_ALL | (*slot as u32) << POLICY_SLOT_SHIFT },
                        Allow::Ports(ps) => {
                            let id = portsets.id(ps);
                            cache.port_entries.entry(id).or_insert_with(|| {
                                let mut m = HashMap::default();
                                portset_entries(id, ps, &mut m);
                                m.into_iter().collect()
                            });
                            PolicyValue { portset: id, flags: 0 }
                        }
                    };
                    entries.push((PolicyKey { endpoint, identity, dir: dir.datapath(), _pad: [0; 3] }, value));
                }
            }
            cache.pods.insert(key.clone(), (endpoint, pod.clone(), entries));
        }
        let entries = &cache.pods[key].2;
        for (k, v) in entries {
            out.policy.insert(*k, *v);
            if v.flags & POLICY_ALLOW_ALL == 0 && sets.insert(v.portset) {
                out.ports.extend(cache.port_entries[&v.portset].iter().copied());
            }
        }
        out.policy_entries.insert(key.clone(), entries.len());
    }
    cache.pods.retain(|k, _| node.pods.contains_key(k) && endpoints.contains_key(k));
    cache.port_entries.retain(|id, _| sets.contains(id));
    out
}

/// Emulates the whole BPF decision on map contents for an endpoint with `flags` (conntrack
/// and node addresses aside): isolation, policy tables, audit.
pub fn verdict(d: &Desired, endpoint: u32, flags: u32, dir: Direction, peer: std::net::IpAddr, proto: u8, port: Option<u16>) -> crate::compiler::Verdict {
    use crate::compiler::Verdict;
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
    let full = id_key(&Cidr::host(peer));
    let identity = d
        .identities
        .iter()
        .filter(|((len, k), _)| {
            k.family == full.1.family && Cidr::new(peer, (*len - ID_KEY_FIXED_BITS) as u8).addr_bytes() == k.addr
        })
        .max_by_key(|((len, _), _)| *len)
        .map_or(0, |(_, id)| *id);
    let key = |identity| PolicyKey { endpoint, identity, dir: dir.datapath(), _pad: [0; 3] };
    let v = d.policy.get(&key(identity)).or_else(|| d.policy.get(&key(0)))?;
    if v.flags & POLICY_ALLOW_ALL != 0 {
        return Some((v.flags >> POLICY_SLOT_SHIFT) & 0xff);
    }
    let (Some(_), Some(port)) = (Protocol::from_number(proto), port) else { return None };
    // The longest matching prefix decides, as in the LPM trie.
    d.ports
        .iter()
        .filter(|((len, k), _)| {
            let bits = len - PORT_KEY_FIXED_BITS;
            let mask: u16 = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
            k.portset == v.portset && k.proto == proto && (port & mask) == u16::from_be_bytes(k.port)
        })
        .max_by_key(|((len, _), _)| *len)
        .map(|(_, v)| v.slot)
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
            let hit = out
                .iter()
                .filter(|((len, k), _)| {
                    let bits = len - PORT_KEY_FIXED_BITS;
                    let mask: u16 = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
                    (port & mask) == u16::from_be_bytes(k.port)
                })
                .max_by_key(|((len, _), _)| *len)
                .map(|(_, v)| v.slot);
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

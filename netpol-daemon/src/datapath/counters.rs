//! Packet counters: packets and bytes per endpoint, direction and outcome (the verdict and a
//! drop's reason: COUNTERS), per policy slot
//! (POLICY_COUNTERS: the packets each of a pod's policies allowed) and early fragments
//! (FRAG_EARLY). The programs count by endpoint id and slot number only; what a slot means
//! (which policy) is known here, so when a pod's policy list changes its slots are folded into
//! `retired_counts` under their old labels and zeroed, and a new endpoint id starts at zero:
//! the metrics never give one policy's packets to another. [`CounterReader`] reads the pinned
//! maps from any thread, and the flow events the programs could not send (EVENT_DROPS).
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use aya::Ebpf;
use netpol_common::*;

use super::maps::take;
use super::HashMap;
use crate::compiler::NodePolicy;
use crate::model::{Direction, ObjKey};

/// Per programmed pod and direction: its endpoint id and the labels of its policy slots.
pub type SlotLabels = Vec<(u32, ObjKey, u8, Vec<String>)>;

/// Counts folded out of POLICY_COUNTERS (and POLICY_DENY_COUNTERS: direction with
/// [`RETIRED_DENIED`]) when the meaning of slots changed: (pod, direction, policy label) ->
/// packets.
pub type RetiredCounts = BTreeMap<(ObjKey, u8, String), u64>;

/// Marks a [`RetiredCounts`] direction as denied packets (POLICY_DENY_COUNTERS).
pub const RETIRED_DENIED: u8 = 2;

/// The counter maps, and what the policy slots of each endpoint mean.
pub(super) struct Counters {
    counters: PerCpuArray<MapData, Count>,
    policy_counters: PerCpuArray<MapData, u64>,
    policy_deny_counters: PerCpuArray<MapData, u64>,
    /// Per endpoint id and direction: later fragments dropped before their first fragment.
    frag_early: PerCpuArray<MapData, u64>,
    /// Per endpoint id and direction: the policies whose slots its POLICY_COUNTERS hold.
    slot_policies: HashMap<(u32, u8), Vec<ObjKey>>,
    /// Counts folded out of the map when a pod's policy list (the meaning of its slots) changed.
    retired_counts: RetiredCounts,
}

impl Counters {
    pub fn take(ebpf: &mut Ebpf) -> Result<Counters> {
        Ok(Counters {
            counters: take(ebpf, maps::COUNTERS)?,
            policy_counters: take(ebpf, maps::POLICY_COUNTERS)?,
            policy_deny_counters: take(ebpf, maps::POLICY_DENY_COUNTERS)?,
            frag_early: take(ebpf, maps::FRAG_EARLY)?,
            slot_policies: HashMap::default(),
            retired_counts: BTreeMap::new(),
        })
    }

    /// Zeroes every count of endpoint `id` (handed to a new pod).
    pub fn reset(&mut self, id: u32) {
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for outcome in 0..OUTCOMES {
                zero(&mut self.counters, counter_index(id, dir, outcome));
            }
            zero(&mut self.frag_early, id * 2 + dir as u32);
            for slot in 0..POLICY_SLOTS {
                zero(&mut self.policy_counters, policy_counter_index(id, dir, slot));
                zero(&mut self.policy_deny_counters, policy_counter_index(id, dir, slot));
            }
            self.slot_policies.remove(&(id, dir));
        }
    }

    /// Keeps the per-policy counters meaningful when the policies of a pod change: the slots
    /// of an endpoint whose policy list changed are folded into `retired_counts` under their
    /// old meaning and zeroed. (The first list seen for an endpoint, e.g. after a restart,
    /// adopts what the pinned map holds.)
    pub fn remap_policy_slots(&mut self, node: &NodePolicy, ids: &BTreeMap<ObjKey, u32>) {
        for (k, id) in ids {
            for dir in Direction::BOTH {
                let d = dir.datapath();
                let want: &[ObjKey] = node.pods.get(k).and_then(|c| c.dir(dir)).map_or(&[], |dp| &dp.policies);
                let Some(old) = self.slot_policies.get(&(*id, d)) else {
                    self.slot_policies.insert((*id, d), want.to_vec());
                    continue;
                };
                if old != want {
                    let old = self.slot_policies.insert((*id, d), want.to_vec()).expect("present");
                    self.retire_slots(k, *id, d, &old);
                }
            }
        }
        self.retired_counts.retain(|(k, _, _), _| ids.contains_key(k));
    }

    /// Folds the slots of `id` in direction `d`, which meant the policies `old`, into
    /// `retired_counts` and zeroes them.
    fn retire_slots(&mut self, pod: &ObjKey, id: u32, d: u8, old: &[ObjKey]) {
        for slot in 0..(old.len() as u32).min(POLICY_SLOTS) {
            let idx = policy_counter_index(id, d, slot);
            for (map, dir) in [(&mut self.policy_counters, d), (&mut self.policy_deny_counters, d | RETIRED_DENIED)] {
                let n: u64 = map.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0);
                if n > 0 {
                    *self.retired_counts.entry((pod.clone(), dir, slot_label(old, slot))).or_default() += n;
                }
                zero(map, idx);
            }
        }
    }

    /// For the metrics: per programmed pod (`endpoints`: its id and key) and direction, its
    /// endpoint id and slot labels, and the counts folded out of the map.
    pub fn policy_slots<'a>(&self, endpoints: impl Iterator<Item = (u32, &'a ObjKey)>) -> (SlotLabels, RetiredCounts) {
        let mut out = Vec::new();
        for (id, k) in endpoints {
            for d in [DIR_INGRESS, DIR_EGRESS] {
                if let Some(list) = self.slot_policies.get(&(id, d)).filter(|l| !l.is_empty()) {
                    let labels = (0..(list.len() as u32).min(POLICY_SLOTS)).map(|s| slot_label(list, s)).collect();
                    out.push((id, k.clone(), d, labels));
                }
            }
        }
        (out, self.retired_counts.clone())
    }
}

/// Sets a per-CPU counter to 0 on every CPU.
fn zero<T: aya::Pod + Default>(map: &mut PerCpuArray<MapData, T>, index: u32) {
    let ncpu = aya::util::nr_cpus().unwrap_or(1);
    if let Ok(z) = PerCpuValues::try_from((0..ncpu).map(|_| T::default()).collect::<Vec<T>>()) {
        let _ = map.set(index, z, 0);
    }
}

/// The label of a policy slot: the policy's name, or for the last slot of a pod with more
/// policies than slots, every policy from that one on.
pub fn slot_label(policies: &[ObjKey], slot: u32) -> String {
    let i = slot as usize;
    if slot + 1 == POLICY_SLOTS && policies.len() > POLICY_SLOTS as usize {
        format!("{} (and {} more)", policies[i].name, policies.len() - i - 1)
    } else {
        policies.get(i).map(|p| p.name.clone()).unwrap_or_default()
    }
}

/// Reads the packet counters from the pinned COUNTERS, POLICY_COUNTERS, FRAG_EARLY and
/// EVENT_DROPS maps (usable from any thread).
pub struct CounterReader {
    map: PerCpuArray<MapData, Count>,
    policy: PerCpuArray<MapData, u64>,
    policy_denied: PerCpuArray<MapData, u64>,
    frag_early: PerCpuArray<MapData, u64>,
    event_drops: PerCpuArray<MapData, u64>,
    conntrack: MapData,
}

/// Opens the pinned per-CPU array `name` under `pin_dir`.
fn open_array<T: aya::Pod>(pin_dir: &Path, name: &str) -> Result<PerCpuArray<MapData, T>> {
    let path = pin_dir.join(name);
    let md = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    PerCpuArray::try_from(Map::from_map_data(md)?).with_context(|| format!("map {}", path.display()))
}

impl CounterReader {
    pub fn open(pin_dir: &Path) -> Result<CounterReader> {
        Ok(CounterReader {
            map: open_array(pin_dir, maps::COUNTERS)?,
            policy: open_array(pin_dir, maps::POLICY_COUNTERS)?,
            policy_denied: open_array(pin_dir, maps::POLICY_DENY_COUNTERS)?,
            frag_early: open_array(pin_dir, maps::FRAG_EARLY)?,
            event_drops: open_array(pin_dir, maps::EVENT_DROPS)?,
            conntrack: MapData::from_pin(pin_dir.join(maps::CONNTRACK)).with_context(|| format!("opening {}", maps::CONNTRACK))?,
        })
    }

    /// Packets and bytes of `endpoint` in `dir` with `outcome` (a `VERDICT_*` or `DROP_*`),
    /// summed over CPUs.
    pub fn read_outcome(&self, endpoint: u32, dir: u8, outcome: u32) -> Count {
        let v = self.map.get(&counter_index(endpoint, dir, outcome), 0);
        v.map(|v| v.iter().fold(Count::default(), |a, c| Count { packets: a.packets + c.packets, bytes: a.bytes + c.bytes }))
            .unwrap_or_default()
    }

    /// Flows in the conntrack table (read out in batches: see `pressure`).
    pub fn count_conntrack(&self) -> Result<u64> {
        super::pressure::count_entries(&self.conntrack, CONNTRACK_MAX)
    }

    /// Flow events the programs did not send, at `EVENT_DROP_RATE` (over the rate limit) or
    /// `EVENT_DROP_FULL` (the ring buffer full).
    pub fn read_event_drops(&self, index: u32) -> u64 {
        self.event_drops.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Packets of flows that the policy in `slot` of `endpoint` allowed in `dir`.
    pub fn read_policy(&self, endpoint: u32, dir: u8, slot: u32) -> u64 {
        self.policy.get(&policy_counter_index(endpoint, dir, slot), 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Packets that the cluster policy in `slot` of `endpoint` denied in `dir`.
    pub fn read_policy_denied(&self, endpoint: u32, dir: u8, slot: u32) -> u64 {
        self.policy_denied.get(&policy_counter_index(endpoint, dir, slot), 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Later fragments of `endpoint` in `dir` dropped because their first fragment had not
    /// been seen (counted among the denies too).
    pub fn read_frag_early(&self, endpoint: u32, dir: u8) -> u64 {
        self.frag_early.get(&(endpoint * 2 + (dir & 1) as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Packets of `endpoint` in `dir` with `verdict` (a `VERDICT_*`: every outcome that counts
    /// as it, see `verdict_of`).
    pub fn read(&self, endpoint: u32, dir: u8, verdict: u32) -> u64 {
        (0..OUTCOMES).filter(|o| verdict_of(*o, dir) == verdict).map(|o| self.read_outcome(endpoint, dir, o).packets).sum()
    }
}

//! One mirror per BPF map the daemon writes: the map and the entries installed in it. The
//! programs only read these maps and the daemon is their one writer, so what it installed is
//! what the map holds: a sync compares the wanted entries with the mirror (never reading the
//! kernel map back) and writes only differences.
//!
//! Every map goes through the same two steps, written once here: [`MapMirror::insert_wanted`]
//! writes what is missing or changed, [`MapMirror::remove_stale`] takes out what is no longer
//! wanted. Keeping them apart lets the caller (`sync`) order them across maps: new entries go
//! in before the entries that refer to them, stale ones go last.
use std::hash::Hash;

use anyhow::Result;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use aya::Pod;

use super::HashMap;
use crate::entries::Lpm;

/// One entry of map `M`.
pub(super) type Entry<M> = (<M as BpfMap>::Key, <M as BpfMap>::Value);

/// A BPF map as a mirror writes it: one entry at a time, by key.
pub(super) trait BpfMap {
    type Key: Copy + Eq + Hash;
    type Value: Copy + PartialEq;
    fn write(&mut self, k: &Self::Key, v: Self::Value) -> Result<(), MapError>;
    /// Errors are not reported: the entry is no longer wanted either way (an interface gone
    /// with its entry, a key already absent).
    fn delete(&mut self, k: &Self::Key);
    /// Every entry the map holds (at start: what a previous daemon left).
    fn entries(&self) -> Result<Vec<Entry<Self>>, MapError>;
}

impl<K: Pod + Eq + Hash, V: Pod + PartialEq> BpfMap for BpfHashMap<MapData, K, V> {
    type Key = K;
    type Value = V;
    fn write(&mut self, k: &K, v: V) -> Result<(), MapError> {
        self.insert(k, v, 0)
    }
    fn delete(&mut self, k: &K) {
        let _ = self.remove(k);
    }
    fn entries(&self) -> Result<Vec<(K, V)>, MapError> {
        self.iter().collect()
    }
}

impl<K: Pod + Eq + Hash, V: Pod + PartialEq> BpfMap for LpmTrie<MapData, K, V> {
    type Key = Lpm<K>;
    type Value = V;
    fn write(&mut self, k: &Lpm<K>, v: V) -> Result<(), MapError> {
        self.insert(&Key::new(k.0, k.1), v, 0)
    }
    fn delete(&mut self, k: &Lpm<K>) {
        let _ = self.remove(&Key::new(k.0, k.1));
    }
    fn entries(&self) -> Result<Vec<(Lpm<K>, V)>, MapError> {
        self.iter().map(|e| e.map(|(k, v)| ((k.prefix_len(), k.data()), v))).collect()
    }
}

/// The keys one sync compares.
pub(super) enum Scope<K> {
    /// Only these may differ from what is installed (an incremental sync).
    Changed(Vec<K>),
    /// Any key may (the first sync, a full compile, after a failure).
    All,
}

/// What [`MapMirror::insert_wanted`] did, for [`MapMirror::remove_stale`] to finish.
#[must_use]
pub(super) struct Written<K> {
    scope: Scope<K>,
    /// Every wanted entry of the scope is installed (no insert failed).
    complete: bool,
}

/// A BPF map and the entries installed in it.
pub(super) struct MapMirror<M: BpfMap> {
    map: M,
    installed: HashMap<M::Key, M::Value>,
}

impl<M: BpfMap> MapMirror<M> {
    /// Mirrors `map` with what it holds: a previous daemon's entries keep enforcing until a
    /// sync replaces them entry by entry.
    pub fn adopt(map: M) -> Result<Self> {
        let installed = map.entries()?.into_iter().collect();
        Ok(MapMirror { map, installed })
    }

    pub fn installed(&self) -> &HashMap<M::Key, M::Value> {
        &self.installed
    }

    pub fn len(&self) -> usize {
        self.installed.len()
    }

    /// Writes `k` unless it holds `v` already.
    pub fn set(&mut self, k: M::Key, v: M::Value) -> Result<(), MapError> {
        if self.installed.get(&k) != Some(&v) {
            self.map.write(&k, v)?;
            self.installed.insert(k, v);
        }
        Ok(())
    }

    pub fn remove(&mut self, k: &M::Key) {
        if self.installed.remove(k).is_some() {
            self.map.delete(k);
        }
    }

    /// Removes every installed entry `keep` refuses.
    pub fn retain(&mut self, mut keep: impl FnMut(&M::Key) -> bool) {
        let map = &mut self.map;
        self.installed.retain(|k, _| {
            keep(k) || {
                map.delete(k);
                false
            }
        });
    }

    /// Writes the entries of `wanted` among the keys of `scope` that are missing or hold
    /// another value; `failed` is told each one that could not be written.
    pub fn insert_wanted(
        &mut self,
        scope: Scope<M::Key>,
        wanted: &HashMap<M::Key, M::Value>,
        mut failed: impl FnMut(&M::Key, MapError),
    ) -> Written<M::Key> {
        let mut complete = true;
        for k in scope_keys(&scope, wanted) {
            let Some(v) = wanted.get(k) else { continue };
            if let Err(e) = self.set(*k, *v) {
                complete = false;
                failed(k, e);
            }
        }
        Written { scope, complete }
    }

    /// Removes the installed entries `wanted` (the same as given to `insert_wanted`) no longer
    /// has: among the changed keys, or (comparing everything) any installed one, unless the
    /// counts say there is none.
    pub fn remove_stale(&mut self, written: Written<M::Key>, wanted: &HashMap<M::Key, M::Value>) {
        match written.scope {
            Scope::Changed(keys) => {
                for k in keys.iter().filter(|k| !wanted.contains_key(*k)) {
                    self.remove(k);
                }
            }
            // Every wanted entry in and as many installed: they are the same.
            Scope::All if written.complete && self.installed.len() == wanted.len() => {}
            Scope::All => self.retain(|k| wanted.contains_key(k)),
        }
    }
}

/// The keys of `scope`: the changed ones, or every wanted one.
fn scope_keys<'a, K, V>(scope: &'a Scope<K>, wanted: &'a HashMap<K, V>) -> impl Iterator<Item = &'a K> {
    let (changed, all) = match scope {
        Scope::Changed(keys) => (Some(keys), None),
        Scope::All => (None, Some(wanted)),
    };
    changed.into_iter().flatten().chain(all.into_iter().flat_map(|w| w.keys()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map in memory whose writes of `refuse` fail (a full map).
    #[derive(Default)]
    struct Fake {
        held: HashMap<u32, u32>,
        refuse: Option<u32>,
        writes: usize,
    }

    impl BpfMap for Fake {
        type Key = u32;
        type Value = u32;
        fn write(&mut self, k: &u32, v: u32) -> Result<(), MapError> {
            if self.refuse == Some(*k) {
                return Err(MapError::KeyNotFound);
            }
            self.writes += 1;
            self.held.insert(*k, v);
            Ok(())
        }
        fn delete(&mut self, k: &u32) {
            self.held.remove(k);
        }
        fn entries(&self) -> Result<Vec<(u32, u32)>, MapError> {
            Ok(self.held.iter().map(|(k, v)| (*k, *v)).collect())
        }
    }

    fn wanted(entries: &[(u32, u32)]) -> HashMap<u32, u32> {
        entries.iter().copied().collect()
    }

    #[test]
    fn a_full_pass_writes_only_differences_and_removes_what_is_not_wanted() {
        let mut m = MapMirror::adopt(Fake { held: wanted(&[(1, 10), (2, 20), (3, 30)]), ..Default::default() }).unwrap();
        let want = wanted(&[(1, 10), (2, 21), (4, 40)]);
        let w = m.insert_wanted(Scope::All, &want, |k, e| panic!("{k}: {e}"));
        assert_eq!(m.map.writes, 2, "only the changed and the new entry are written");
        assert_eq!(m.map.held.len(), 4, "stale entries stay until remove_stale");
        m.remove_stale(w, &want);
        assert_eq!(m.map.held, want);
        assert_eq!(m.installed, want);
    }

    #[test]
    fn a_failed_insert_is_reported_and_stale_entries_still_go() {
        let mut m = MapMirror::adopt(Fake { held: wanted(&[(1, 10), (2, 20)]), refuse: Some(3), ..Default::default() }).unwrap();
        // As many wanted as installed, but one could not be written: the counts alone would
        // say nothing is stale.
        let want = wanted(&[(1, 10), (3, 30)]);
        let mut failed = Vec::new();
        let w = m.insert_wanted(Scope::All, &want, |k, _| failed.push(*k));
        assert_eq!(failed, [3]);
        m.remove_stale(w, &want);
        assert_eq!(m.map.held, wanted(&[(1, 10)]));
        assert_eq!(m.installed, m.map.held);
    }

    #[test]
    fn an_incremental_pass_touches_only_the_changed_keys() {
        let mut m = MapMirror::adopt(Fake { held: wanted(&[(1, 10), (2, 20), (9, 90)]), ..Default::default() }).unwrap();
        let want = wanted(&[(1, 11), (3, 30)]);
        let w = m.insert_wanted(Scope::Changed(vec![1, 2]), &want, |k, e| panic!("{k}: {e}"));
        m.remove_stale(w, &want);
        // 3 and 9 were not among the changed keys: left as they are.
        assert_eq!(m.map.held, wanted(&[(1, 11), (9, 90)]));
        assert_eq!(m.installed, m.map.held);
    }
}

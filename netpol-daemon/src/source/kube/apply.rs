//! The watchers' [`Change`]s applied to the cluster model: each names exactly the objects it
//! touches, and a relist is diffed against the model once, so only what differs is changed
//! (and reported in the [`ChangeSet`]).
use std::collections::{BTreeMap, BTreeSet};

use super::watch::{Change, Record};
use crate::model::{ChangeSet, Cluster, Kind, ObjKey, Object};

/// The problems of the objects as they now are on the API server, by object (an object's
/// problems go when it is fixed or deleted).
#[derive(Default)]
pub struct Problems(BTreeMap<(Kind, ObjKey), Vec<String>>);

impl Problems {
    fn set(&mut self, kind: Kind, key: &ObjKey, errors: Vec<String>) {
        if errors.is_empty() {
            self.0.remove(&(kind, key.clone()));
        } else {
            self.0.insert((kind, key.clone()), errors);
        }
    }

    /// Every problem, in object order.
    pub fn all(&self) -> Vec<String> {
        self.0.values().flatten().cloned().collect()
    }
}

/// How changes are applied: into which model, keeping which problems.
pub struct Apply<'a> {
    pub cluster: &'a mut Cluster,
    pub problems: &'a mut Problems,
    /// Every policy in audit mode (`--audit`).
    pub audit_all: bool,
    pub changed: ChangeSet,
}

impl Apply<'_> {
    pub fn change(&mut self, change: Change) {
        match change {
            Change::Put(rec) => self.put(*rec),
            Change::Gone(kind, key) => {
                self.problems.set(kind, &key, Vec::new());
                self.cluster.remove(kind, &key, &mut self.changed);
            }
            Change::Listed(kind, records) => self.listed(kind, records),
        }
    }

    /// The object as it now is; one the model keeps nothing of replaces what was there.
    fn put(&mut self, rec: Record) {
        self.problems.set(rec.kind, &rec.key, rec.converted.errors);
        match rec.converted.object {
            Some(mut obj) => {
                if let Object::Policy(p) = &mut obj {
                    p.audit |= self.audit_all;
                }
                self.cluster.put(obj, &mut self.changed);
            }
            None => self.cluster.remove(rec.kind, &rec.key, &mut self.changed),
        }
    }

    /// A complete list of `kind`: every object listed is put, every other one of the kind is
    /// gone (deleted while the watch was away).
    fn listed(&mut self, kind: Kind, records: Vec<Record>) {
        let listed: BTreeSet<ObjKey> = records.iter().map(|r| r.key.clone()).collect();
        for rec in records {
            self.put(rec);
        }
        for key in self.cluster.keys(kind) {
            if !listed.contains(&key) {
                self.problems.set(kind, &key, Vec::new());
                self.cluster.remove(kind, &key, &mut self.changed);
            }
        }
        let stale: Vec<ObjKey> =
            self.problems.0.keys().filter(|(k, key)| *k == kind && !listed.contains(key)).map(|(_, key)| key.clone()).collect();
        for key in stale {
            self.problems.set(kind, &key, Vec::new());
        }
    }
}

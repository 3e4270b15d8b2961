//! Where the cluster state comes from: a directory of manifests ([`directory`], read by
//! [`manifests`] and woken by [`inotify`]) or the Kubernetes API ([`kube`]). Both are a
//! [`Source`]: the daemon waits on it, asks whether it can be programmed from, and has it bring
//! the cluster model up to date; the model and compiler downstream are the same for both.
use std::time::Duration;

use anyhow::Result;

use crate::model::{ChangeSet, Cluster};

pub mod directory;
pub mod inotify;
pub mod kube;
pub mod manifests;

/// What the daemon loop drives, once per pass: [`Source::wait`], [`Source::healthy`],
/// [`Source::ready`], [`Source::refresh`], then [`Source::take_change_age`] after a load.
pub trait Source {
    /// Where the state comes from, for the log.
    fn describe(&self) -> String;

    /// Waits up to `timeout` for a change (manifests: inotify on the directory, so that a write
    /// is taken at once; what [`Source::refresh`] finds stays the ground truth).
    fn wait(&mut self, timeout: Duration);

    /// False while the Kubernetes API is unreachable (the last state stays enforced).
    fn healthy(&self) -> bool;

    /// Errors reading the source so far (failed watches and lists; none for a directory,
    /// whose problems are per object).
    fn errors(&self) -> u64 {
        0
    }

    /// The state is complete enough to program (the first lists are done).
    fn ready(&self) -> bool;

    /// Brings `cluster` up to date; returns what changed and the problems found, `None` when
    /// nothing can have changed since the last refresh (nothing was read).
    fn refresh(&mut self, cluster: &mut Cluster, audit_all: bool) -> Result<Option<(ChangeSet, Vec<String>)>>;

    /// How long ago the change just loaded was made: the newest manifest write among the files
    /// read again (or the inotify event that woke the wait), or the oldest watch event not yet
    /// taken.
    fn take_change_age(&mut self) -> Option<Duration>;
}

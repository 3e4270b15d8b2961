//! The manifests-directory source: a [`DirReader`] brought up to date on each pass, woken by
//! an inotify [`DirWatch`] that names the files written, with a full scan of every file every
//! [`FULL_SCAN_EVERY`] as the safety net (and polling alone where inotify is not available).
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::inotify::DirWatch;
use super::manifests::DirReader;
use super::Source;
use crate::model::{ChangeSet, Cluster};

/// With inotify naming the files that change, how often every manifest file is still checked.
pub const FULL_SCAN_EVERY: Duration = Duration::from_secs(2);

pub struct ManifestsDir {
    dir: PathBuf,
    reader: DirReader,
    watch: Option<DirWatch>,
    /// Which manifest files the next refresh looks at: those inotify named; `None`: every file
    /// (the first pass, after an event overflow, without inotify, and every FULL_SCAN_EVERY).
    hint: Option<Vec<PathBuf>>,
    /// When an inotify event woke the last wait (the change's age starts there).
    woke: Option<Instant>,
    last_full_scan: Instant,
    /// The full scan was put off by a change: the next wait does not wait.
    put_off: bool,
}

impl ManifestsDir {
    /// Watches `dir` with inotify where it can (else polls it).
    pub fn new(dir: PathBuf) -> ManifestsDir {
        let watch = DirWatch::new(&dir).map_err(|e| tracing::warn!("no inotify on {}: {e}; polling only", dir.display())).ok();
        let last_full_scan = Instant::now();
        ManifestsDir { dir, reader: DirReader::default(), watch, hint: None, woke: None, last_full_scan, put_off: false }
    }

    /// Whether this pass reads only the files inotify named or every file.
    fn plan_scan(&mut self) {
        if self.watch.is_some() && self.last_full_scan.elapsed() >= FULL_SCAN_EVERY {
            // The files inotify named first (a change is programmed without stat-ing every
            // file); the whole directory on the next pass.
            if self.woke.is_some() && self.last_full_scan.elapsed() < 2 * FULL_SCAN_EVERY {
                self.put_off = true;
            } else {
                self.hint = None;
            }
        }
        if self.hint.is_none() {
            self.last_full_scan = Instant::now();
        }
    }
}

impl Source for ManifestsDir {
    fn describe(&self) -> String {
        format!("manifests {}", self.dir.display())
    }

    fn wait(&mut self, timeout: Duration) {
        // The full scan put off by a change runs on the next pass, without waiting.
        let timeout = if std::mem::take(&mut self.put_off) { Duration::ZERO } else { timeout };
        let waiting = Instant::now();
        self.hint = match &mut self.watch {
            Some(w) => w.wait(&self.dir, timeout),
            None => {
                std::thread::sleep(timeout);
                None
            }
        };
        // An inotify event that woke the loop from its wait was sent as the write ended: the
        // change's age starts there (a file's mtime is the kernel's coarse clock, up to a tick
        // or more early). Events queued while the loop was busy keep the mtime.
        let named = self.hint.as_ref().is_some_and(|h| !h.is_empty());
        self.woke = (named && waiting.elapsed() >= Duration::from_millis(1)).then(Instant::now);
        self.plan_scan();
    }

    fn healthy(&self) -> bool {
        true
    }

    fn ready(&self) -> bool {
        true
    }

    /// Always reads (the reader stats each file once and reads only those whose metadata
    /// changed).
    fn refresh(&mut self, cluster: &mut Cluster, audit_all: bool) -> Result<Option<(ChangeSet, Vec<String>)>> {
        self.reader.audit_all = audit_all;
        let hint = self.hint.take();
        let ch = self.reader.update_some(&self.dir, hint.as_deref(), cluster).with_context(|| format!("reading {}", self.dir.display()))?;
        Ok(Some((ch, self.reader.errors().iter().map(|e| e.to_string()).collect())))
    }

    fn take_change_age(&mut self) -> Option<Duration> {
        let written = self.reader.last_modified.take().and_then(|t| std::time::SystemTime::now().duration_since(t).ok());
        self.woke.take().map(|w| w.elapsed()).or(written)
    }
}

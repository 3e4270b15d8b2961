//! Where the cluster state comes from: a directory of manifests, or the Kubernetes API.
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::model::{ChangeSet, Cluster};

pub mod kube;
pub mod manifests;

/// Wakes the loop when a manifest file is written, renamed, created or removed.
pub struct DirWatch {
    fd: std::os::fd::OwnedFd,
}

impl DirWatch {
    pub fn new(dir: &Path) -> std::io::Result<DirWatch> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        let mask = libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_MOVED_FROM | libc::IN_CREATE | libc::IN_DELETE | libc::IN_ATTRIB;
        if unsafe { libc::inotify_add_watch(std::os::fd::AsRawFd::as_raw_fd(&fd), path.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirWatch { fd })
    }

    /// Returns after events (the queue drained: the paths they name), `Some(empty)` after
    /// `timeout`, `None` when the event queue overflowed (look at every file).
    pub fn wait(&self, dir: &Path, timeout: Duration) -> Option<Vec<PathBuf>> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            return Some(Vec::new());
        }
        let mut names = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let head = std::mem::size_of::<libc::inotify_event>();
        loop {
            let got = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if got <= 0 {
                break;
            }
            let mut off = 0usize;
            while off + head <= got as usize {
                let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[off..].as_ptr() as *const libc::inotify_event) };
                if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                    return None;
                }
                let name = &buf[off + head..(off + head + ev.len as usize).min(got as usize)];
                let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
                if !name.is_empty() {
                    names.push(dir.join(std::ffi::OsStr::from_bytes(name)));
                }
                off += head + ev.len as usize;
            }
        }
        Some(names)
    }
}

/// Where the cluster state comes from.
pub enum Source {
    Manifests(PathBuf, std::sync::Mutex<manifests::DirReader>),
    Kube(kube::KubeSource),
}

impl Source {
    /// `None`: no cheap test; refresh and see (the manifests reader stats each file once and
    /// reads only those whose metadata changed).
    pub fn fingerprint(&self) -> Option<u64> {
        match self {
            Source::Manifests(..) => None,
            Source::Kube(k) => Some(k.generation.load(Ordering::SeqCst)),
        }
    }

    /// The state is complete enough to program (the first lists are done).
    pub fn ready(&self) -> bool {
        match self {
            Source::Manifests(..) => true,
            Source::Kube(k) => k.synced.load(Ordering::SeqCst),
        }
    }

    /// Brings `cluster` up to date; returns what changed and the problems found.
    pub fn refresh(&self, cluster: &mut Cluster, audit_all: bool, hint: Option<&[PathBuf]>) -> Result<(ChangeSet, Vec<String>)> {
        match self {
            Source::Manifests(dir, reader) => {
                let mut r = reader.lock().unwrap();
                r.audit_all = audit_all;
                let ch = r.update_some(dir, hint, cluster).with_context(|| format!("reading {}", dir.display()))?;
                Ok((ch, r.errors().iter().map(|e| e.to_string()).collect()))
            }
            Source::Kube(k) => {
                let (mut c, errors) = k.snapshot();
                if audit_all {
                    for p in c.policies.values_mut() {
                        p.audit = true;
                    }
                }
                Ok((cluster.replace(c), errors))
            }
        }
    }

    /// Waits up to `timeout` for a change (manifests: inotify on the directory, so that a
    /// write is taken at once; the fingerprint check stays the ground truth).
    /// Returns the manifest paths that changed, when the watch knows them.
    pub fn wait(&self, watch: Option<&DirWatch>, timeout: Duration) -> Option<Vec<PathBuf>> {
        match (self, watch) {
            (Source::Manifests(dir, _), Some(w)) => w.wait(dir, timeout),
            _ => {
                std::thread::sleep(timeout);
                None
            }
        }
    }

    /// How long ago the change just loaded happened: the newest manifest write among the
    /// files read again, or the oldest watch event not yet taken.
    pub fn take_change_age(&self) -> Option<Duration> {
        match self {
            Source::Manifests(_, reader) => {
                let t = reader.lock().unwrap().last_modified.take()?;
                std::time::SystemTime::now().duration_since(t).ok()
            }
            Source::Kube(k) => k.pending_since.lock().unwrap().take().map(|t| t.elapsed()),
        }
    }

    /// False while the Kubernetes API is unreachable.
    pub fn healthy(&self) -> bool {
        match self {
            Source::Manifests(..) => true,
            Source::Kube(k) => k.healthy.load(Ordering::SeqCst),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Manifests(dir, _) => format!("manifests {}", dir.display()),
            Source::Kube(_) => "the Kubernetes API".to_string(),
        }
    }
}


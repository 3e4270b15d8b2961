//! An inotify watch on a manifests directory (the `inotify` crate): it wakes the daemon as soon
//! as a file is written, renamed, created or removed, and names the files, so that a change is
//! read without looking at every file (the periodic full scan in [`super::directory`] stays the
//! safety net).
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchMask};

/// Wakes the loop when a manifest file is written, renamed, created or removed.
pub struct DirWatch {
    inotify: Inotify,
    buf: Vec<u8>,
}

impl DirWatch {
    pub fn new(dir: &Path) -> std::io::Result<DirWatch> {
        // Non-blocking and close-on-exec: the crate's defaults.
        let inotify = Inotify::init()?;
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::ATTRIB;
        inotify.watches().add(dir, mask)?;
        Ok(DirWatch { inotify, buf: vec![0u8; 64 * 1024] })
    }

    /// Returns after events (the queue drained: the paths they name), `Some(empty)` after
    /// `timeout`, `None` when the event queue overflowed (look at every file).
    pub fn wait(&mut self, dir: &Path, timeout: Duration) -> Option<Vec<PathBuf>> {
        // The crate reads without waiting (or blocks without a timeout): poll for the timeout.
        let mut pfd = libc::pollfd { fd: self.inotify.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            return Some(Vec::new());
        }
        let mut names = Vec::new();
        loop {
            let events = match self.inotify.read_events(&mut self.buf) {
                Ok(e) => e,
                // Drained (WouldBlock), or an error that a full scan covers as well.
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("reading inotify events of {}: {e}", dir.display());
                    break;
                }
            };
            for ev in events {
                if ev.mask.contains(EventMask::Q_OVERFLOW) {
                    return None;
                }
                if let Some(name) = ev.name.filter(|n| !n.is_empty()) {
                    names.push(dir.join(name));
                }
            }
        }
        Some(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_files_written_renamed_and_removed() {
        let dir = std::env::temp_dir().join(format!("netpol-inotify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = DirWatch::new(&dir).unwrap();
        assert_eq!(w.wait(&dir, Duration::from_millis(20)), Some(vec![]), "nothing happened yet");
        std::fs::write(dir.join("a.yaml"), "x").unwrap();
        std::fs::rename(dir.join("a.yaml"), dir.join("b.yaml")).unwrap();
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        let mut names = w.wait(&dir, Duration::from_secs(2)).unwrap();
        names.dedup();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(names, vec![dir.join("a.yaml"), dir.join("b.yaml")], "create/close-write of a, rename a -> b, delete b");
    }
}

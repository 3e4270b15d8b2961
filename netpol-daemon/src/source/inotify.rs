//! An inotify watch on a manifests directory: it wakes the daemon as soon as a file is written,
//! renamed, created or removed, and names the files, so that a change is read without looking
//! at every file (the periodic full scan in [`super::directory`] stays the safety net).
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Wakes the loop when a manifest file is written, renamed, created or removed.
pub struct DirWatch {
    fd: OwnedFd,
}

impl DirWatch {
    pub fn new(dir: &Path) -> std::io::Result<DirWatch> {
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        let mask = libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_MOVED_FROM | libc::IN_CREATE | libc::IN_DELETE | libc::IN_ATTRIB;
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirWatch { fd })
    }

    /// Returns after events (the queue drained: the paths they name), `Some(empty)` after
    /// `timeout`, `None` when the event queue overflowed (look at every file).
    pub fn wait(&self, dir: &Path, timeout: Duration) -> Option<Vec<PathBuf>> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            return Some(Vec::new());
        }
        let mut names = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let got = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if got <= 0 {
                break;
            }
            if !events(&buf[..got as usize], dir, &mut names) {
                return None;
            }
        }
        Some(names)
    }
}

/// Appends the paths the events in `buf` name; false when the queue overflowed.
fn events(buf: &[u8], dir: &Path, names: &mut Vec<PathBuf>) -> bool {
    let head = std::mem::size_of::<libc::inotify_event>();
    let mut off = 0usize;
    while off + head <= buf.len() {
        let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[off..].as_ptr() as *const libc::inotify_event) };
        if ev.mask & libc::IN_Q_OVERFLOW != 0 {
            return false;
        }
        let name = &buf[off + head..(off + head + ev.len as usize).min(buf.len())];
        let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
        if !name.is_empty() {
            names.push(dir.join(std::ffi::OsStr::from_bytes(name)));
        }
        off += head + ev.len as usize;
    }
    true
}

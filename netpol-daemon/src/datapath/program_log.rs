//! The programs' debug log (`--bpf-debug`): the programs that log their decisions, and the
//! reader of what they log.
//!
//! The setting is which eBPF object is loaded: the default one has no logging code at all
//! (nothing to pay for, not even a test of a setting), the other (`EBPF_OBJECT_DEBUG`, built
//! from the same sources with netpol-ebpf's `debug-log`) logs. So it changes only with a new
//! load: a daemon started with another setting loads its programs and swaps them in on every
//! interface at its first sync, as on any restart; until then the programs a previous daemon
//! left keep enforcing as they were loaded (logging into a ring buffer no one reads, if they
//! log).
//!
//! What they log goes through aya-log's AYA_LOGS ring buffer; [`ProgramLog`] reads it into
//! a `log` logger (the daemon's: the `log` crate's, which its tracing subscriber takes in),
//! target `netpol_bpf`. Without the setting there is none: nothing reads, nothing is made.
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use aya::Ebpf;
use aya_log::EbpfLogger;

/// What the programs log, read into a logger (by default the `log` crate's).
pub struct ProgramLog<T: log::Log = &'static dyn log::Log> {
    logger: EbpfLogger<T>,
}

impl<T: log::Log> ProgramLog<T> {
    /// Takes the programs' log ring buffer out of `ebpf`, read into `logger`.
    pub(super) fn take(ebpf: &mut Ebpf, logger: T) -> Result<ProgramLog<T>> {
        let logger = EbpfLogger::init_with_logger(ebpf, logger).context("the programs' log ring buffer (AYA_LOGS)")?;
        Ok(ProgramLog { logger })
    }

    /// Waits up to `timeout` for records, then writes every record there into the logger.
    pub fn read(&mut self, timeout: Duration) {
        let mut pfd = libc::pollfd { fd: self.logger.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        self.logger.flush();
    }
}

impl ProgramLog {
    /// Reads the programs' log into the daemon's until `stop`, on a thread of its own
    /// (`bpf-log`), waking when they write (at most 100 ms apart to see `stop`).
    pub fn spawn(mut self, stop: Arc<AtomicBool>) -> std::io::Result<()> {
        std::thread::Builder::new().name("bpf-log".into()).spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                self.read(Duration::from_millis(100));
            }
        })?;
        Ok(())
    }
}

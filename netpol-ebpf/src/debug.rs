//! Debug logs of the programs' decisions through aya-log (its AYA_LOGS ring buffer, which the
//! daemon's `--bpf-debug` reads into its own log): each drop with its reason, each audit, each
//! newly tracked flow and each frame not read as IP, with the endpoint, direction and tuple.
//!
//! Only in the object built with the `debug-log` feature, which the daemon loads for
//! `--bpf-debug`; the default object has none of this, not even a test of a setting. (A
//! gate in one object was tried: the logged copy beside the plain one changed how LLVM laid
//! out the plain one's frame, which is 8 bytes from the verifier's limit: it grew to 488
//! bytes and the programs were rejected with the logging off.)
//!
//! The programs' frame takes all but 32 of the 512 bytes the verifier allows a chain of calls,
//! and an aya-log record needs more than that. So the decision (`enforce_logged`) and the log
//! record ([`flush`]) are BPF functions of their own, side by side under a caller that keeps
//! nothing on the stack; the decision notes what to log in a per-CPU slot, the conntrack key
//! included ([`key`]: kept there, not on the decision's stack, it leaves the decision's frame
//! 48 bytes smaller than the default object's).
use aya_ebpf::{macros::map, maps::PerCpuArray};
use aya_log_ebpf::{debug, info};
use netpol_common::*;

/// The target of every record (what the daemon's log names, and RUST_LOG filters on).
const TARGET: &str = "netpol_bpf";

/// What the last packet of this CPU left to log: [`Note::kind`] `NOTE_*`.
const NOTE_NONE: u32 = 0;
const NOTE_JUDGED: u32 = 1;
const NOTE_FRAME: u32 = 2;

#[repr(C)]
struct Note {
    kind: u32,
    /// A `VERDICT_*` or `DROP_*`.
    outcome: u32,
    /// The allowing policy's slot (`SLOT_NONE`: none), for a new flow.
    slot: u32,
    /// A frame not read as IP: its length, and whether it passed.
    len: u32,
    allow: u32,
    /// The packet's endpoint, direction and (IP packets) tuple.
    key: CtKey,
}

/// One per CPU: a program runs to its end on the CPU it started on, and [`flush`] empties the
/// slot before that end. (Not pinned: holds nothing between runs.)
#[map(name = "DEBUG_NOTE")]
static DEBUG_NOTE: PerCpuArray<Note> = PerCpuArray::with_max_entries(1, 0);

/// The conntrack key `k` of the IP packet being decided, kept in this CPU's note, where the
/// decision goes on with it (and the log reads it). `None`: never (the one slot of an array).
#[inline(always)]
pub fn key(k: CtKey) -> Option<&'static mut CtKey> {
    let n = unsafe { &mut *DEBUG_NOTE.get_ptr_mut(0)? };
    n.key = k;
    Some(&mut n.key)
}

/// Notes that the IP packet whose key is noted ([`key`]) is reported: dropped or audited with
/// `outcome`, or the first packet of a newly tracked flow (`VERDICT_ALLOW`) allowed by the
/// policy in `slot`.
#[inline(always)]
pub fn judged(outcome: u32, slot: u32) {
    if let Some(n) = DEBUG_NOTE.get_ptr_mut(0) {
        let n = unsafe { &mut *n };
        n.kind = NOTE_JUDGED;
        n.outcome = outcome;
        n.slot = slot;
    }
}

/// Notes a frame of `endpoint` in `dir` not read as IP (`outcome` `DROP_MALFORMED`: a parse
/// failure; `DROP_UNSUPPORTED`: another ethertype or a VLAN tag) of `len` bytes, dropped or
/// passed (`allow`: the direction does not judge it).
#[inline(always)]
pub fn frame(endpoint: u32, dir: u8, outcome: u32, allow: bool, len: u32) {
    if let Some(n) = DEBUG_NOTE.get_ptr_mut(0) {
        let n = unsafe { &mut *n };
        n.kind = NOTE_FRAME;
        n.outcome = outcome;
        n.len = len;
        n.allow = allow as u32;
        n.key.endpoint = endpoint;
        n.key.dir = dir;
    }
}

/// Logs what the packet just decided left noted, if anything, and empties the slot.
#[inline(never)]
pub fn flush() {
    let Some(n) = DEBUG_NOTE.get_ptr_mut(0) else { return };
    let n = unsafe { &mut *n };
    match n.kind {
        NOTE_JUDGED => log_judged(&n.key, n.outcome, n.slot),
        NOTE_FRAME => log_frame(&n.key, n.outcome, n.allow != 0, n.len),
        _ => return,
    }
    n.kind = NOTE_NONE;
}

// (aya-log's macros take the program's context first, and do not read it: `()` here.)

/// A drop or audit at info, a new flow at debug (`slot` -1: no policy had to allow it).
#[inline(always)]
fn log_judged(k: &CtKey, outcome: u32, slot: u32) {
    let (what, why) = (verdict_word(outcome), reason(outcome));
    let (ep, dir, proto, sport, dport) = (k.endpoint, direction(k.dir), k.proto, k.sport, k.dport);
    let slot = slot as i32;
    if k.family == FAMILY_V4 {
        let (src, dst) = ([k.src[0], k.src[1], k.src[2], k.src[3]], [k.dst[0], k.dst[1], k.dst[2], k.dst[3]]);
        if outcome == VERDICT_ALLOW {
            debug!((), target: TARGET, "new flow: ep {} {} proto {} {:i}:{} -> {:i}:{} policy slot {}",
                ep, dir, proto, src, sport, dst, dport, slot);
        } else {
            info!((), target: TARGET, "{}: {} ep {} {} proto {} {:i}:{} -> {:i}:{}",
                what, why, ep, dir, proto, src, sport, dst, dport);
        }
    } else if outcome == VERDICT_ALLOW {
        debug!((), target: TARGET, "new flow: ep {} {} proto {} [{:i}]:{} -> [{:i}]:{} policy slot {}",
            ep, dir, proto, k.src, sport, k.dst, dport, slot);
    } else {
        info!((), target: TARGET, "{}: {} ep {} {} proto {} [{:i}]:{} -> [{:i}]:{}",
            what, why, ep, dir, proto, k.src, sport, k.dst, dport);
    }
}

/// A dropped frame at info, a passed one at debug.
#[inline(always)]
fn log_frame(k: &CtKey, outcome: u32, allow: bool, len: u32) {
    let (why, ep, dir) = (reason(outcome), k.endpoint, direction(k.dir));
    if allow {
        debug!((), target: TARGET, "pass: {} ep {} {} frame not read as IP ({} bytes), direction not isolated", why, ep, dir, len);
    } else {
        info!((), target: TARGET, "drop: {} ep {} {} frame not read as IP ({} bytes)", why, ep, dir, len);
    }
}

#[inline(always)]
fn direction(dir: u8) -> &'static str {
    if dir == DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// "drop", or "audit" for what passes only because the policy is in audit mode.
#[inline(always)]
fn verdict_word(outcome: u32) -> &'static str {
    if outcome == VERDICT_AUDIT {
        "audit"
    } else {
        "drop"
    }
}

/// The outcome's name, as the daemon's `reason` label has it ("policy" for an audit: what the
/// policy would have dropped).
#[inline(always)]
fn reason(outcome: u32) -> &'static str {
    match outcome {
        VERDICT_ALLOW => "allowed",
        VERDICT_DENY | VERDICT_AUDIT => "policy",
        VERDICT_SPOOFED => "spoofed",
        DROP_FAIL_CLOSED => "fail-closed",
        DROP_MALFORMED => "malformed",
        DROP_UNSUPPORTED => "unsupported",
        DROP_TCP_RST => "tcp-rst-window",
        _ => "unknown",
    }
}

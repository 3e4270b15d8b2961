//! The clsact + cls_bpf fallback for kernels without TCX (< 6.6), as netlink-packet-route tc
//! messages. Each program sits in one filter of a known priority and handle, so that:
//! - the filter outlives the daemon (the kernel holds the program; no process owns the
//!   attachment, unlike aya's netlink links, which detach when dropped);
//! - a restarted daemon replaces the program of that same filter in place (RTM_NEWTFILTER on
//!   an existing priority/handle swaps the program atomically: no window, never two filters);
//! - `netpol-daemon uninstall` finds them on every interface and deletes exactly those.
use std::io;
use std::os::fd::{AsFd, AsRawFd};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::tc::{TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption};
use netlink_packet_route::RouteNetlinkMessage;
use netpol_common::programs;

use super::rtnl;

/// The priority of netpol's filters on a pod interface's clsact hooks (one per direction).
/// Chosen away from the kernel's auto-assigned ones (49152 and down) and from 1, which other
/// agents' filters commonly take.
pub const PRIORITY: u16 = 0x4e50;
/// The handle of netpol's filter within its priority.
pub const HANDLE: u32 = 1;
const ETH_P_ALL: u16 = 0x0003;

/// The clsact hook a program runs on: `from-pod` on the host side's ingress (what the pod
/// sends), `to-pod` on its egress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn parent(self) -> TcHandle {
        let minor = match self {
            Hook::Ingress => TcHandle::MIN_INGRESS,
            Hook::Egress => TcHandle::MIN_EGRESS,
        };
        TcHandle { major: TcHandle::CLSACT.major, minor }
    }

    /// The program this hook carries.
    pub fn program(self) -> &'static str {
        match self {
            Hook::Ingress => programs::FROM_POD,
            Hook::Egress => programs::TO_POD,
        }
    }
}

fn filter(ifindex: u32, hook: Hook) -> TcMessage {
    let mut m = TcMessage::default();
    m.header.index = ifindex as i32;
    m.header.parent = hook.parent();
    m.header.handle = TcHandle::from(HANDLE);
    // tcm_info: priority in the upper half, protocol (network order) in the lower one.
    m.header.info = (u32::from(PRIORITY) << 16) | u32::from(ETH_P_ALL.to_be());
    m
}

/// Adds the clsact qdisc to `ifindex` unless it has one.
pub fn ensure_clsact(ifindex: u32) -> io::Result<()> {
    let mut m = TcMessage::default();
    m.header.index = ifindex as i32;
    m.header.parent = TcHandle::CLSACT;
    m.header.handle = TcHandle { major: TcHandle::CLSACT.major, minor: 0 };
    m.attributes.push(TcAttribute::Kind("clsact".into()));
    match rtnl::ack(RouteNetlinkMessage::NewQueueDiscipline(m), NLM_F_CREATE | NLM_F_EXCL) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other.map(drop),
    }
}

/// Puts `prog` in netpol's filter on `hook` of `ifindex`: creates the filter, or swaps the
/// program of the one a previous daemon left, atomically.
pub fn replace(ifindex: u32, hook: Hook, prog: &impl AsFd) -> io::Result<()> {
    let mut m = filter(ifindex, hook);
    m.attributes.push(TcAttribute::Kind("bpf".into()));
    m.attributes.push(TcAttribute::Options(vec![
        TcOption::Bpf(TcFilterBpfOption::ProgFd(prog.as_fd().as_raw_fd() as u32)),
        TcOption::Bpf(TcFilterBpfOption::ProgName(hook.program().into())),
        TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
    ]));
    rtnl::ack(RouteNetlinkMessage::NewTrafficFilter(m), NLM_F_CREATE | NLM_F_REPLACE).map(drop)
}

/// Deletes netpol's filter on `hook` of `ifindex` (gone already: not an error).
pub fn delete(ifindex: u32, hook: Hook) -> io::Result<()> {
    match rtnl::ack(RouteNetlinkMessage::DelTrafficFilter(filter(ifindex, hook)), 0) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)) => Ok(()),
        other => other.map(drop),
    }
}

/// netpol's filters on the clsact hooks of `ifindex`: a bpf filter at [`PRIORITY`] and
/// [`HANDLE`] running one of netpol's programs.
pub fn ours_on(ifindex: u32) -> io::Result<Vec<Hook>> {
    let mut out = Vec::new();
    for hook in [Hook::Ingress, Hook::Egress] {
        let mut m = TcMessage::default();
        m.header.index = ifindex as i32;
        m.header.parent = hook.parent();
        let dump = match rtnl::dump(RouteNetlinkMessage::GetTrafficFilter(m)) {
            // No clsact (or no such interface any more): no filter of ours.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)) => continue,
            other => other?,
        };
        if dump.iter().any(|f| is_ours(f, hook)) {
            out.push(hook);
        }
    }
    Ok(out)
}

fn is_ours(m: &RouteNetlinkMessage, hook: Hook) -> bool {
    let RouteNetlinkMessage::NewTrafficFilter(f) = m else { return false };
    let prio = (f.header.info >> 16) as u16;
    let named = f.attributes.iter().any(|a| match a {
        TcAttribute::Options(o) => o.iter().any(|o| matches!(o, TcOption::Bpf(TcFilterBpfOption::ProgName(n)) if n == hook.program())),
        _ => false,
    });
    prio == PRIORITY && u32::from(f.header.handle) == HANDLE && named
}

/// netpol's filters on every interface of the calling thread's network namespace.
pub fn ours() -> io::Result<Vec<(u32, Hook)>> {
    let mut out = Vec::new();
    for m in rtnl::dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
        let RouteNetlinkMessage::NewLink(link) = m else { continue };
        out.extend(ours_on(link.header.index)?.into_iter().map(|h| (link.header.index, h)));
    }
    Ok(out)
}

/// Deletes netpol's filters from every interface; returns how many there were.
pub fn delete_all() -> io::Result<usize> {
    let found = ours()?;
    for (ifindex, hook) in &found {
        delete(*ifindex, *hook)?;
    }
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_address_the_clsact_hooks_at_netpol_priority() {
        // What `tc filter add dev X ingress pref 20048 handle 1 protocol all bpf` sends:
        // parent ffff:fff2 (ingress) / ffff:fff3 (egress), tcm_info prio << 16 | htons(ETH_P_ALL).
        let i = filter(7, Hook::Ingress).header;
        assert_eq!((i.index, u32::from(i.parent), u32::from(i.handle)), (7, 0xffff_fff2, 1));
        assert_eq!(i.info, 0x4e50_0000 | u32::from(0x0003u16.to_be()));
        assert_eq!(u32::from(filter(7, Hook::Egress).header.parent), 0xffff_fff3);
        assert_eq!((Hook::Ingress.program(), Hook::Egress.program()), (programs::FROM_POD, programs::TO_POD));
    }
}

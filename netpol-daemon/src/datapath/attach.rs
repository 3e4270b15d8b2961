//! The programs on the pods' interfaces: TCX links where the kernel has them, pinned under
//! `<bpffs>/links` so that they outlive the daemon (enforcement must not depend on the process)
//! and are re-adopted on restart by swapping in the new daemon's programs atomically (no
//! window); on kernels without TCX, clsact + cls_bpf filters of a known priority and handle
//! ([`super::tc`]), which outlive the daemon too and whose program a restart swaps in place.
//!
//! In `auto` (the default) a new interface gets a tc filter first and is moved to TCX in the
//! background ([`Upgrader`]): each TCX attach waits out an RCU grace period under the rtnl
//! lock (10-20 ms here, one at a time), a tc filter does not, so a node of 100 pods is enforced
//! in a fraction of a second instead of seconds. The move has no window: once the TCX link is
//! there it runs first and its verdict (the programs return only TC_ACT_OK or TC_ACT_SHOT,
//! never TCX_NEXT) ends the hook, so the tc filter behind it no longer sees packets; it is
//! deleted once the link is adopted.
//! Which pod is attached where, with which endpoint id, is kept here too: it is what an
//! attachment is for.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc;

use anyhow::{Context, Result};
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{self as aya_tc, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;
use netpol_common::programs;

use super::maps::classifier;
use super::tc::{self, Hook};
use super::{HashMap, Iface};
use crate::compiler::NodePolicy;
use crate::model::ObjKey;

/// One program attached to one interface.
enum AttachedLink {
    /// A TCX link pinned at `path`: it outlives the daemon, which re-adopts it on restart.
    Pinned { link: FdLink, path: PathBuf },
    /// netpol's clsact/cls_bpf filter on `hook` of `ifindex` (kernels without TCX): no
    /// process owns it; the kernel keeps it until it is deleted or its interface goes.
    Tc { ifindex: u32, hook: Hook },
}

/// How programs are attached (`--attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX where the kernel has it (6.6 and later), else clsact + cls_bpf filters.
    #[default]
    Auto,
    /// TCX only: an attach that fails is an error.
    Tcx,
    /// clsact + cls_bpf filters only (what kernels before 6.6 get in `auto`).
    Tc,
}

impl FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<AttachMode, String> {
        match s {
            "auto" => Ok(AttachMode::Auto),
            "tcx" => Ok(AttachMode::Tcx),
            "tc" => Ok(AttachMode::Tc),
            _ => Err(format!("attach mode {s:?}: want auto, tcx or tc")),
        }
    }
}

struct Attached {
    ifindex: u32,
    /// Attached for a pending interface ([`crate::compiler::CompiledPod::pending`]).
    pending: bool,
    id: u32,
    links: Vec<AttachedLink>,
}

/// The pods whose interfaces have the programs, and the pinned links a previous daemon left.
pub(super) struct Links {
    links_dir: PathBuf,
    attached: BTreeMap<ObjKey, Attached>,
    /// Pinned links a previous daemon left, by (ifindex, program): re-used, not re-created.
    adopted: HashMap<(u32, &'static str), PathBuf>,
    /// netpol's tc filters a previous daemon left: their programs are replaced in place;
    /// those no pod re-used are deleted after the first sync.
    adopted_tc: BTreeSet<(u32, Hook)>,
    pub mode: AttachMode,
    /// TCX first (not in `tc` mode); false once a TCX attach failed in `auto` (tc from then
    /// on).
    use_tcx: bool,
    /// Attach programs to interfaces (false: maps only, for BPF_PROG_TEST_RUN and benches).
    pub attach_programs: bool,
    /// Links being made ahead ([`Links::preattach`], `--attach tcx`).
    preattaching: Option<std::thread::JoinHandle<Vec<PinnedAhead>>>,
    /// Moves tc-attached interfaces to TCX in the background (`auto`); started on first use.
    upgrader: Option<Upgrader>,
    /// Interfaces handed to the upgrader and not reported back yet.
    upgrading: BTreeSet<u32>,
    /// Interfaces put on tc filters by this sync, for the upgrader once the sync is done.
    to_upgrade: Vec<(Iface, Vec<Hook>)>,
}

/// How many interfaces run the programs from TCX links, and how many from tc filters (one
/// with a hook of each kind, while it is being moved, counts as tc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttachCounts {
    pub tcx: usize,
    pub tc: usize,
}

impl Links {
    /// Finds the links a previous daemon pinned under `pin_dir`.
    pub fn adopt(pin_dir: &Path) -> Links {
        let links_dir = pin_dir.join("links");
        let mut adopted = HashMap::default();
        for e in std::fs::read_dir(&links_dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some((ifindex, prog)) = name.split_once('-') else { continue };
            let Ok(ifindex) = ifindex.parse::<u32>() else { continue };
            let prog = match prog {
                "from" => programs::FROM_POD,
                "to" => programs::TO_POD,
                _ => continue,
            };
            adopted.insert((ifindex, prog), e.path());
        }
        let adopted_tc = match tc::ours() {
            Ok(found) => found.into_iter().collect(),
            Err(e) => {
                tracing::warn!("listing netpol's tc filters failed ({e}); a stale one would stay");
                BTreeSet::new()
            }
        };
        let mode = AttachMode::default();
        Links {
            links_dir,
            attached: BTreeMap::new(),
            adopted,
            adopted_tc,
            mode,
            use_tcx: true,
            attach_programs: true,
            preattaching: None,
            upgrader: None,
            upgrading: BTreeSet::new(),
            to_upgrade: Vec::new(),
        }
    }

    /// Sets how programs are attached from now on.
    pub fn set_mode(&mut self, mode: AttachMode) {
        self.mode = mode;
        self.use_tcx = mode != AttachMode::Tc;
    }

    /// Endpoint id and pod of every attached interface.
    pub fn endpoints(&self) -> impl Iterator<Item = (u32, &ObjKey)> {
        self.attached.iter().map(|(k, a)| (a.id, k))
    }

    pub fn contains(&self, pod: &ObjKey) -> bool {
        self.attached.contains_key(pod)
    }

    pub fn len(&self) -> usize {
        self.attached.len()
    }

    /// How the attached interfaces run the programs.
    pub fn counts(&self) -> AttachCounts {
        let mut c = AttachCounts::default();
        for a in self.attached.values().filter(|a| !a.links.is_empty()) {
            if a.links.iter().all(|l| matches!(l, AttachedLink::Pinned { .. })) {
                c.tcx += 1;
            } else {
                c.tc += 1;
            }
        }
        c
    }

    /// A pending interface claimed by its pod keeps its programs and id (no detach, no
    /// window): only its entries and flags change.
    pub fn hand_over_claimed(&mut self, node: &NodePolicy, pods: &BTreeMap<&ObjKey, (&Iface, u32)>) {
        let claimed: Vec<(ObjKey, ObjKey)> = self
            .attached
            .iter()
            .filter(|(k, a)| a.pending && !pods.contains_key(*k))
            .filter_map(|(k, a)| {
                pods.iter()
                    .find(|(pk, (i, _))| node.pods[**pk].pending.is_none() && i.ifindex == a.ifindex && !self.attached.contains_key(**pk))
                    .map(|(pk, _)| (k.clone(), (*pk).clone()))
            })
            .collect();
        for (old, new) in claimed {
            let mut a = self.attached.remove(&old).expect("present");
            a.pending = false;
            self.attached.insert(new, a);
        }
    }

    /// Detaches the pods whose interface disappeared or changed; returns their ids.
    pub fn detach_stale(&mut self, pods: &BTreeMap<&ObjKey, (&Iface, u32)>) -> Vec<u32> {
        let stale: Vec<ObjKey> = self
            .attached
            .iter()
            .filter(|(k, a)| pods.get(*k).is_none_or(|(i, _)| i.ifindex != a.ifindex))
            .map(|(k, _)| k.clone())
            .collect();
        let mut freed = Vec::new();
        for k in stale {
            let a = self.attached.remove(&k).expect("present");
            freed.push(a.id);
            detach(a);
        }
        freed
    }

    /// Attaches both programs to the interface of `pod` (none when `attach_programs` is off).
    pub fn attach(&mut self, ebpf: &mut Ebpf, pod: &ObjKey, iface: &Iface, pending: bool, id: u32) -> Result<()> {
        let links = if self.attach_programs { self.attach_both(ebpf, &iface.ifname, iface.ifindex)? } else { Vec::new() };
        self.attached.insert(pod.clone(), Attached { ifindex: iface.ifindex, pending, id, links });
        Ok(())
    }

    /// Removes the pins of adopted links and the tc filters no interface re-used (gone, no
    /// longer ours, or attached the other way now).
    pub fn drop_unadopted(&mut self) {
        for (_, path) in self.adopted.drain() {
            let _ = std::fs::remove_file(path);
        }
        for (ifindex, hook) in std::mem::take(&mut self.adopted_tc) {
            if let Err(e) = tc::delete(ifindex, hook) {
                tracing::warn!("deleting the stale tc filter of {} on interface {ifindex}: {e}", hook.program());
            }
        }
    }

    /// Attaches both programs to an interface: adopts the pinned links of a previous daemon
    /// (atomically swapping in this daemon's program), else creates and pins TCX links
    /// (`--attach tcx`), else puts them in netpol's tc filters (`--attach tc`, no TCX, or
    /// `auto`, which then moves the interface to TCX in the background).
    fn attach_both(&mut self, ebpf: &mut Ebpf, ifname: &str, ifindex: u32) -> Result<Vec<AttachedLink>> {
        let mut links = Vec::new();
        let mut to_upgrade = Vec::new();
        for (hook, ty) in [(Hook::Ingress, TcAttachType::Ingress), (Hook::Egress, TcAttachType::Egress)] {
            let name = hook.program();
            let prog = classifier(ebpf, name)?;
            if self.use_tcx {
                if let Some(link) = self.adopt_link(prog, ifindex, name) {
                    links.push(link);
                    continue;
                }
                if self.mode == AttachMode::Tcx {
                    let id = prog
                        .attach_with_options(ifname, ty, TcAttachOptions::TcxOrder(LinkOrder::default()))
                        .with_context(|| format!("TCX attach of {name} to {ifname} (--attach tcx)"))?;
                    links.push(self.pin(prog, id, ifindex, name)?);
                    continue;
                }
                to_upgrade.push(hook);
            }
            links.push(self.attach_tc(prog, ifname, ifindex, hook)?);
        }
        if !to_upgrade.is_empty() && !self.upgrading.contains(&ifindex) {
            self.to_upgrade.push((Iface { ifindex, ifname: ifname.to_string() }, to_upgrade));
        }
        Ok(links)
    }

    /// Hands the interfaces this sync put on tc filters to the upgrader (starting it if need
    /// be). Called once the sync is done: a TCX attach holds the rtnl lock for a grace period,
    /// and the sync's own netlink requests must not queue behind the upgrader's.
    pub fn release_upgrades(&mut self, ebpf: &mut Ebpf) {
        if self.to_upgrade.is_empty() {
            return;
        }
        if self.upgrader.is_none() {
            match Upgrader::start(ebpf, &self.links_dir) {
                Ok(u) => self.upgrader = Some(u),
                Err(e) => {
                    tracing::warn!("staying on clsact + cls_bpf: cannot start moving interfaces to TCX: {e:#}");
                    self.use_tcx = false;
                    self.to_upgrade.clear();
                    return;
                }
            }
        }
        let u = self.upgrader.as_ref().expect("started");
        for (iface, hooks) in self.to_upgrade.drain(..) {
            let ifindex = iface.ifindex;
            if u.jobs.send((iface, hooks)).is_ok() {
                self.upgrading.insert(ifindex);
            }
        }
    }

    /// Takes the TCX links the upgrader made: each replaces its interface's tc filter, which
    /// is then deleted; a link for an interface no longer attached (its pod went meanwhile)
    /// is unpinned, which detaches it. Whether any attachment changed.
    pub fn collect_upgrades(&mut self) -> bool {
        let Some(u) = &self.upgrader else { return false };
        let done: Vec<Upgraded> = u.done.try_iter().collect();
        let mut changed = false;
        for up in done {
            match up {
                Upgraded::Linked { ifindex, made } => {
                    self.upgrading.remove(&ifindex);
                    for (hook, path) in made {
                        changed |= self.take_upgrade(ifindex, hook, path);
                    }
                }
                Upgraded::NoTcx { ifindex, error } => {
                    self.upgrading.remove(&ifindex);
                    if self.use_tcx {
                        tracing::warn!("TCX attach failed ({error:#}); staying on clsact + cls_bpf");
                    }
                    self.use_tcx = false;
                }
            }
        }
        changed
    }

    fn take_upgrade(&mut self, ifindex: u32, hook: Hook, path: PathBuf) -> bool {
        let slot = self.attached.values_mut().filter(|a| a.ifindex == ifindex).find_map(|a| {
            a.links.iter_mut().find(|l| matches!(l, AttachedLink::Tc { ifindex: i, hook: h } if *i == ifindex && *h == hook))
        });
        let link = PinnedLink::from_pin(&path).map(FdLink::from);
        match (slot, link) {
            (Some(slot), Ok(link)) => {
                *slot = AttachedLink::Pinned { link, path };
                if let Err(e) = tc::delete(ifindex, hook) {
                    tracing::warn!("deleting the tc filter of {} on interface {ifindex} after moving it to TCX: {e}", hook.program());
                }
                true
            }
            (_, link) => {
                // Unpinned and closed: the kernel detaches it.
                let _ = std::fs::remove_file(&path);
                drop(link);
                false
            }
        }
    }

    /// Puts `prog` in netpol's filter on `hook` (replacing a previous daemon's program there).
    fn attach_tc(&mut self, prog: &SchedClassifier, ifname: &str, ifindex: u32, hook: Hook) -> Result<AttachedLink> {
        let name = hook.program();
        tc::ensure_clsact(ifindex).with_context(|| format!("adding the clsact qdisc to {ifname}"))?;
        let fd = prog.fd().with_context(|| format!("program {name}"))?;
        tc::replace(ifindex, hook, fd).with_context(|| format!("tc filter of {name} on {ifname}"))?;
        self.adopted_tc.remove(&(ifindex, hook));
        Ok(AttachedLink::Tc { ifindex, hook })
    }

    /// The pinned link a previous daemon left for program `name` on `ifindex`, now running
    /// `prog`; a link that is not re-usable is unpinned.
    fn adopt_link(&mut self, prog: &mut SchedClassifier, ifindex: u32, name: &'static str) -> Option<AttachedLink> {
        let old = self.adopted.remove(&(ifindex, name))?;
        let adopted = PinnedLink::from_pin(&old)
            .map_err(anyhow::Error::from)
            .and_then(|p| Ok(aya_tc::SchedClassifierLink::try_from(FdLink::from(p))?))
            .and_then(|l| Ok(prog.attach_to_link(l)?))
            .and_then(|id| Ok(FdLink::try_from(prog.take_link(id)?)?));
        match adopted {
            Ok(link) => Some(AttachedLink::Pinned { link, path: old }),
            Err(e) => {
                tracing::info!("pinned link {} not re-usable ({e:#}); attaching anew", old.display());
                let _ = std::fs::remove_file(&old);
                None
            }
        }
    }

    /// Pins the new TCX link `id` of program `name` on `ifindex`.
    fn pin(&self, prog: &mut SchedClassifier, id: SchedClassifierLinkId, ifindex: u32, name: &str) -> Result<AttachedLink> {
        let (link, path) = pin_link(&self.links_dir, prog, id, ifindex, name)?;
        Ok(AttachedLink::Pinned { link: FdLink::from(link), path })
    }

    /// Starts attaching the programs (TCX) to `ifaces` in the background, pinning the links
    /// where a previous daemon's would be, for [`Links::attach`] to adopt once
    /// [`Links::finish_preattach`] took them. Each TCX attach waits out an RCU grace period in
    /// the kernel under the rtnl lock (about 10-15 ms on a small VM, one at a time): for a node
    /// of 100 pods that is seconds, spent here while the cluster is listed and compiled rather
    /// than after. A program on an interface with no endpoint entry lets everything pass, as
    /// no program does, so attaching early changes nothing until the entries are written; the
    /// links no pod claims are removed by the first sync ([`Links::drop_unadopted`]).
    pub fn preattach(&mut self, ebpf: &mut Ebpf, ifaces: Vec<Iface>) {
        let todo: Vec<Iface> =
            ifaces.into_iter().filter(|i| PROGRAMS.iter().all(|(name, _)| !self.adopted.contains_key(&(i.ifindex, *name)))).collect();
        // (In `auto`, interfaces get tc filters first, which is fast: nothing to do ahead.)
        if !self.attach_programs || self.mode != AttachMode::Tcx || todo.is_empty() || self.preattaching.is_some() {
            return;
        }
        // The thread needs program objects of its own: opened from temporary pins.
        let progs_dir = self.links_dir.with_file_name("attaching");
        if let Err(e) = pin_programs(ebpf, &progs_dir) {
            tracing::warn!("not attaching ahead: pinning the programs in {}: {e:#}", progs_dir.display());
            let _ = std::fs::remove_dir_all(&progs_dir);
            return;
        }
        let links_dir = self.links_dir.clone();
        self.preattaching = Some(std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let made = attach_all(&progs_dir, &links_dir, &todo);
            tracing::debug!("attached ahead to {} of {} interfaces in {:?}", made.len() / 2, todo.len(), t0.elapsed());
            let _ = std::fs::remove_dir_all(&progs_dir);
            made
        }));
    }

    /// Waits for [`Links::preattach`] and takes the links it made for adoption.
    pub fn finish_preattach(&mut self) {
        if let Some(h) = self.preattaching.take() {
            self.adopted.extend(h.join().unwrap_or_default());
        }
    }
}

/// A link made ahead: (ifindex, program) and its pin.
type PinnedAhead = ((u32, &'static str), PathBuf);

/// What the upgrader did with one interface.
enum Upgraded {
    /// TCX links made and pinned, per hook (none when the interface had gone).
    Linked { ifindex: u32, made: Vec<(Hook, PathBuf)> },
    /// A TCX attach failed on an interface that is there: the kernel has no TCX (or refuses
    /// it); the interface stays on tc, and so do the next ones.
    NoTcx { ifindex: u32, error: anyhow::Error },
}

/// A thread that attaches the programs by TCX to interfaces running them from tc filters, and
/// pins the links where [`Links::adopt`] finds them; [`Links::collect_upgrades`] takes them.
/// It holds program objects of its own, opened from pins in `<bpffs>/upgrading`.
struct Upgrader {
    jobs: mpsc::Sender<(Iface, Vec<Hook>)>,
    done: mpsc::Receiver<Upgraded>,
}

impl Upgrader {
    fn start(ebpf: &mut Ebpf, links_dir: &Path) -> Result<Upgrader> {
        let progs_dir = links_dir.with_file_name("upgrading");
        pin_programs(ebpf, &progs_dir).with_context(|| format!("pinning the programs in {}", progs_dir.display()))?;
        let mut progs = Vec::new();
        for (name, _) in PROGRAMS {
            progs.push(SchedClassifier::from_pin(progs_dir.join(name)).with_context(|| format!("opening the pinned {name}"))?);
        }
        let _ = std::fs::remove_dir_all(&progs_dir);
        let (jobs, rx) = mpsc::channel::<(Iface, Vec<Hook>)>();
        let (tx, done) = mpsc::channel();
        let links_dir = links_dir.to_path_buf();
        std::thread::Builder::new().name("tcx-upgrade".into()).spawn(move || {
            let t0 = std::time::Instant::now();
            let mut moved = 0usize;
            for (iface, hooks) in rx {
                let up = upgrade(&mut progs, &links_dir, &iface, &hooks);
                moved += matches!(&up, Upgraded::Linked { made, .. } if !made.is_empty()) as usize;
                if tx.send(up).is_err() {
                    return;
                }
                tracing::debug!("{moved} interfaces moved to TCX, {:?} since the first", t0.elapsed());
            }
        })?;
        Ok(Upgrader { jobs, done })
    }
}

/// Attaches `hooks` of `iface` by TCX and pins the links (an interface gone, or whose name
/// now belongs to another interface, is skipped).
fn upgrade(progs: &mut [SchedClassifier], links_dir: &Path, iface: &Iface, hooks: &[Hook]) -> Upgraded {
    let ifindex = iface.ifindex;
    let mut made = Vec::new();
    for &hook in hooks {
        let (i, ty) = match hook {
            Hook::Ingress => (0, TcAttachType::Ingress),
            Hook::Egress => (1, TcAttachType::Egress),
        };
        if ifindex_of(&iface.ifname) != Some(ifindex) {
            break;
        }
        let prog = &mut progs[i];
        let pinned = prog
            .attach_with_options(&iface.ifname, ty, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .map_err(anyhow::Error::from)
            .and_then(|id| pin_link(links_dir, prog, id, ifindex, hook.program()));
        match pinned {
            Ok((_, path)) => made.push((hook, path)),
            Err(_) if ifindex_of(&iface.ifname) != Some(ifindex) => break,
            Err(error) => {
                // A link made for the other hook goes too: the interface stays on tc whole.
                for (_, path) in made {
                    let _ = std::fs::remove_file(path);
                }
                return Upgraded::NoTcx { ifindex, error: error.context(format!("{} on {}", hook.program(), iface.ifname)) };
            }
        }
    }
    Upgraded::Linked { ifindex, made }
}

/// The interface index of `ifname` in this network namespace, if it exists.
fn ifindex_of(ifname: &str) -> Option<u32> {
    let c = std::ffi::CString::new(ifname).ok()?;
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => None,
        i => Some(i),
    }
}

/// Both programs, and where they attach.
const PROGRAMS: [(&str, TcAttachType); 2] = [(programs::FROM_POD, TcAttachType::Ingress), (programs::TO_POD, TcAttachType::Egress)];

/// Pins both programs under `dir` (replacing what is there).
fn pin_programs(ebpf: &mut Ebpf, dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    for (name, _) in PROGRAMS {
        classifier(ebpf, name)?.pin(dir.join(name)).with_context(|| format!("pinning {name}"))?;
    }
    Ok(())
}

/// Attaches the programs pinned in `progs_dir` to each of `ifaces` by TCX and pins the links;
/// returns the pins made, by (ifindex, program).
fn attach_all(progs_dir: &Path, links_dir: &Path, ifaces: &[Iface]) -> Vec<PinnedAhead> {
    let mut made = Vec::new();
    for (name, ty) in PROGRAMS {
        let mut prog = match SchedClassifier::from_pin(progs_dir.join(name)) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("opening the pinned {name}: {e}");
                continue;
            }
        };
        for iface in ifaces {
            let pinned = prog
                .attach_with_options(&iface.ifname, ty, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(anyhow::Error::from)
                .and_then(|id| pin_link(links_dir, &mut prog, id, iface.ifindex, name));
            match pinned {
                Ok((_, path)) => made.push(((iface.ifindex, name), path)),
                Err(e) => tracing::debug!("attaching {name} to {} ahead: {e:#} (tried again when its pod is programmed)", iface.ifname),
            }
        }
    }
    made
}

/// Pins the TCX link `id` of `prog` (program `name`) on `ifindex` under `links_dir`.
fn pin_link(
    links_dir: &Path,
    prog: &mut SchedClassifier,
    id: SchedClassifierLinkId,
    ifindex: u32,
    name: &str,
) -> Result<(PinnedLink, PathBuf)> {
    let link = FdLink::try_from(prog.take_link(id)?)?;
    let short = if name == programs::FROM_POD { "from" } else { "to" };
    let path = links_dir.join(format!("{ifindex}-{short}"));
    std::fs::create_dir_all(links_dir)?;
    let _ = std::fs::remove_file(&path);
    let pinned = link.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
    Ok((pinned, path))
}

fn detach(a: Attached) {
    for l in a.links {
        match l {
            AttachedLink::Pinned { link, path } => {
                // Unpinned and closed: the kernel detaches it (or it is gone with its
                // interface already).
                let _ = std::fs::remove_file(&path);
                drop(link);
            }
            AttachedLink::Tc { ifindex, hook } => {
                if let Err(e) = tc::delete(ifindex, hook) {
                    tracing::warn!("deleting the tc filter of {} on interface {ifindex}: {e}", hook.program());
                }
            }
        }
    }
}

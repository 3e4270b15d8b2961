//! Where the maps live and how they are loaded: the bpffs (it must outlive the daemon, so that
//! enforcement does not depend on the process), the pin directory, loading the eBPF object with
//! its maps pinned there, and the pins a daemon of another version left: maps of another layout
//! are replaced, the older conntrack table is migrated. Adopting the entries of the maps that
//! are re-used is each part's own (`MapMirror::adopt`, the endpoint ids, the pinned links).
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use netpol_common::*;

/// The compiled eBPF object, built by build.rs from netpol-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol"));

/// The same programs, built to log their decisions (netpol-ebpf's `debug-log`: `--bpf-debug`).
/// Same maps, same program names: it replaces the default object's programs and is replaced by
/// them as any restart's programs are.
pub static EBPF_OBJECT_DEBUG: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netpol-debug"));

/// Loads the object (`bpf_debug`: the one that logs, see `program_log`) and its programs,
/// creating or re-using the pinned maps in `pin_dir`.
pub(super) fn load_object(pin_dir: &Path, bpf_debug: bool) -> Result<Ebpf> {
    ensure_bpffs(pin_dir)?;
    std::fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
    drop_pins_of_other_layouts(pin_dir);
    let object = if bpf_debug { EBPF_OBJECT_DEBUG } else { EBPF_OBJECT };
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(object)
        .context("loading the eBPF object (is this root, with bpffs mounted?)")?;
    for name in [programs::FROM_POD, programs::TO_POD, programs::NOOP] {
        classifier(&mut ebpf, name)?.load().with_context(|| format!("verifier rejected {name}"))?;
    }
    Ok(ebpf)
}

/// The program `name` of the object.
pub(super) fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    Ok(ebpf.program_mut(name).ok_or_else(|| anyhow!("eBPF object has no program {name}"))?.try_into()?)
}

/// Takes the map `name` out of the object, typed.
pub(super) fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let m = ebpf.take_map(name).ok_or_else(|| anyhow!("eBPF object has no map {name}"))?;
    T::try_from(m).with_context(|| format!("map {name}"))
}

/// Removes every pin (maps and links) under `pin_dir`.
pub(super) fn remove_pins(pin_dir: &Path) -> Result<()> {
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    Ok(())
}

/// A pinned map keeps the layout it was created with, and aya adopts a pin without comparing
/// layouts: so when `CtValue` grew the TCP sequence state the map was renamed (`CONNTRACK2`),
/// and a daemon started over the pins of an older one copies the tracked flows of the old
/// `CONNTRACK` (16-byte values) into the new map, then removes the old pin (the old programs
/// hold it until their links are swapped to this daemon's programs). Migrated entries carry
/// no sequence state: an RST ends them as before, and their next packets fill it in. Errors
/// only cost the old entries (those flows are judged afresh), never the start.
pub(super) fn migrate_conntrack_v1(pin_dir: &Path, new: &mut BpfHashMap<MapData, CtKey, CtValue>) {
    let path = pin_dir.join(maps::CONNTRACK_V1);
    if !path.exists() {
        return;
    }
    let migrated = (|| -> Result<usize> {
        let md = MapData::from_pin(&path)?;
        let old: BpfHashMap<MapData, CtKey, CtValueV1> = BpfHashMap::try_from(Map::LruHashMap(md))?;
        let mut n = 0;
        for item in old.iter() {
            let (k, v) = item?;
            // Only the FIN bit existed then.
            let flags = v.flags & CT_TCP_FIN_SEEN;
            if new.insert(k, CtValue { last_seen_ns: v.last_seen_ns, flags, policy: v.policy, seq: [0; 2], ack: [0; 2] }, 0).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    })();
    match migrated {
        Ok(n) => tracing::info!("migrated {n} tracked flow(s) from the old {} map", maps::CONNTRACK_V1),
        Err(e) => tracing::warn!("old {} map not migrated ({e:#}); its flows will be judged afresh", maps::CONNTRACK_V1),
    }
    let _ = std::fs::remove_file(&path);
}

/// When POLICY values gained `POLICY_ONE_PORT` (a port inline where there was a port set id,
/// same layout) the map was renamed (`POLICY2`): a daemon started over the pins of an older
/// one copies the old `POLICY` entries (each means there what it meant) into the new map, so
/// that its programs enforce the old state until the first sync, and removes the old pin. The
/// old programs, attached until that sync swaps them, keep the old map, which is never written
/// again: they never meet a value they would misread. Errors only cost the old entries (the new
/// programs deny in the meantime what those allowed), never the start.
pub(super) fn migrate_policy_v1(pin_dir: &Path, new: &mut BpfHashMap<MapData, PolicyKey, PolicyValue>) {
    let path = pin_dir.join(maps::POLICY_V1);
    if !path.exists() {
        return;
    }
    let copied = (|| -> Result<usize> {
        let old: BpfHashMap<MapData, PolicyKey, PolicyValue> = BpfHashMap::try_from(Map::HashMap(MapData::from_pin(&path)?))?;
        let mut n = 0;
        for item in old.iter() {
            let (k, v) = item?;
            new.insert(k, v, 0)?;
            n += 1;
        }
        Ok(n)
    })();
    match copied {
        Ok(n) => tracing::info!("copied {n} entries of the old {} map", maps::POLICY_V1),
        Err(e) => tracing::warn!("old {} map not copied ({e:#}); the first sync programs it afresh", maps::POLICY_V1),
    }
    let _ = std::fs::remove_file(&path);
}

/// Pinned maps whose layout differs from this build's (a daemon of an older version left
/// them: e.g. `EndpointInfo` grew, `COUNTERS` got bytes and drop reasons) cannot be re-used: the
/// verifier would reject programs reading past their values. They are unpinned, so that new
/// ones are created; the old programs keep theirs (and enforce) until their links get the new
/// programs. What they held is programmed again by the first sync (counts restart).
fn drop_pins_of_other_layouts(pin_dir: &Path) {
    let want: [(&str, u32, u32); 4] = [
        (maps::ENDPOINTS_ARRAY, std::mem::size_of::<EndpointInfo>() as u32, ENDPOINTS_ARRAY_SIZE),
        (maps::ENDPOINTS, std::mem::size_of::<EndpointInfo>() as u32, ENDPOINTS_MAX),
        (maps::COUNTERS, std::mem::size_of::<Count>() as u32, MAX_ENDPOINTS * COUNTER_SLOTS),
        (maps::ENDPOINT_ADDRS, 1, ENDPOINT_ADDRS_MAX),
    ];
    for (name, value_size, max_entries) in want {
        let path = pin_dir.join(name);
        let Ok(md) = MapData::from_pin(&path) else { continue };
        let Ok(info) = md.info() else { continue };
        if info.value_size() != value_size || info.max_entries() != max_entries {
            tracing::warn!(
                "pinned map {} has another layout (value {} bytes, {} entries; this version: {value_size}, {max_entries}): replacing it",
                path.display(),
                info.value_size(),
                info.max_entries()
            );
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Refuses a `--bpffs` whose pins would not outlive the daemon: enforcement must not depend
/// on the process (README). That is the case when the daemon runs in a mount namespace of its
/// own (`ip netns exec`, `unshare --mount`) and the bpffs holding `path` is not the one PID 1
/// sees at the same place: its pins (maps, TCX links) go with the namespace when the daemon
/// exits, and the programs detach. Without any bpffs there, `ensure_bpffs` would mount a
/// private one. In a container, PID 1 shares the daemon's mount namespace (the host's bpffs
/// is mounted into it): nothing to check. `allow` (`--allow-private-bpffs`) forces it.
pub fn check_bpffs_outlives_daemon(path: &Path, allow: bool) -> Result<()> {
    let ns = |p: &str| std::fs::read_link(p).ok();
    let (own, init) = (ns("/proc/self/ns/mnt"), ns("/proc/1/ns/mnt"));
    if own.is_some() && own == init {
        return Ok(());
    }
    let problem = match bpffs_mount_of(path) {
        None => format!("no bpffs is mounted at {} in this mount namespace (one mounted here would be private to it)", path.display()),
        Some(mnt) => match private_bpffs(path, &mnt) {
            None => return Ok(()),
            Some(problem) => problem,
        },
    };
    let msg = format!(
        "--bpffs {}: the daemon runs in a mount namespace of its own ({}) and {problem}: the pinned maps and links would vanish when the daemon exits and enforcement would stop. Run it in the host's mount namespace (not under `ip netns exec`/`unshare --mount`) or mount the host's bpffs there; --allow-private-bpffs starts anyway",
        path.display(),
        own.map(|p| p.display().to_string()).unwrap_or_else(|| "unknown".into())
    );
    if allow {
        tracing::warn!("{msg} (allowed by --allow-private-bpffs)");
        return Ok(());
    }
    Err(anyhow!(msg))
}

/// Why the bpffs mounted at `mnt` (holding `path`) is private to this mount namespace, or
/// `None` when it is the one PID 1 sees there.
fn private_bpffs(path: &Path, mnt: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let here = std::fs::metadata(mnt).map(|m| m.dev()).ok();
    let init_path = Path::new("/proc/1/root").join(mnt.strip_prefix("/").unwrap_or(mnt));
    let there = std::fs::metadata(&init_path).map(|m| m.dev()).ok();
    if here.is_some() && here == there {
        return None;
    }
    if there.is_none() {
        // PID 1 is not ours to look at (a sandbox; no CAP_SYS_PTRACE): a bpffs is
        // mounted here, which is what a host bind mount looks like too.
        tracing::warn!("--bpffs {}: cannot compare the bpffs at {} with PID 1's; assuming it is the host's", path.display(), mnt.display());
        return None;
    }
    Some(format!("the bpffs at {} is not the one PID 1 sees there (a private mount)", mnt.display()))
}

/// The mount point of the bpffs holding `path` in this mount namespace (the longest bpf mount
/// point `path` is under), if any.
fn bpffs_mount_of(path: &Path) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| {
            // "id parent maj:min root mountpoint opts [optional...] - fstype source superopts"
            let (pre, post) = l.split_once(" - ")?;
            let mnt = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "bpf").then(|| PathBuf::from(mnt.replace("\\040", " ")))
        })
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.components().count())
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs(path: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(2) == Some("bpf") && Path::new(l.split_whitespace().nth(1).unwrap_or("")) == Path::new("/sys/fs/bpf")
    }) {
        return Ok(());
    }
    if !path.starts_with("/sys/fs/bpf") {
        return Ok(());
    }
    let target = std::ffi::CString::new("/sys/fs/bpf").unwrap();
    let fstype = std::ffi::CString::new("bpf").unwrap();
    let r = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use netpol_common::{maps, programs};
    use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

    /// The programs never call an out-of-line memset/memcpy: those are byte-at-a-time loops
    /// exported by bpf-linker, which cost more per packet than every map lookup together. They
    /// appear when the eBPF crate is linked with `--bpf-expand-memcpy-in-order` (bpf-linker's
    /// default, turned off in netpol-ebpf/.cargo/config.toml) or when code copies an object
    /// too large for LLVM to expand into stores.
    #[test]
    fn programs_call_no_out_of_line_memory_builtins() {
        // (The object `--bpf-debug` loads is for debugging: its logging may copy as it likes.)
        let file = object::File::parse(super::EBPF_OBJECT).expect("the embedded eBPF object is ELF");
        let mut programs = 0;
        let mut calls = Vec::new();
        for section in file.sections() {
            let name = section.name().unwrap_or("");
            if !name.starts_with("classifier") {
                continue;
            }
            programs += 1;
            for (offset, rel) in section.relocations() {
                let RelocationTarget::Symbol(i) = rel.target() else { continue };
                let target = file.symbol_by_index(i).and_then(|s| s.name().map(str::to_string)).unwrap_or_default();
                if matches!(target.as_str(), "memset" | "memcpy" | "memmove" | "memcmp" | "bcmp") {
                    calls.push(format!("{name}+{offset:#x}: {target}"));
                }
            }
        }
        assert!(programs > 0, "no classifier section in the eBPF object");
        assert!(calls.is_empty(), "{} calls to memory builtins, e.g. {:?}", calls.len(), &calls[..calls.len().min(5)]);
    }

    /// The default object carries nothing of the debug log (`--bpf-debug` loads the other):
    /// no log ring buffer, no note, no log function; the other has them, and the same
    /// programs and maps besides.
    #[test]
    fn only_the_debug_object_has_the_log() {
        let symbols = |bytes: &[u8]| -> std::collections::BTreeSet<String> {
            let file = object::File::parse(bytes).expect("an embedded eBPF object is ELF");
            file.symbols().filter_map(|s| s.name().ok().map(str::to_string)).filter(|n| !n.is_empty()).collect()
        };
        let (plain, debug) = (symbols(super::EBPF_OBJECT), symbols(super::EBPF_OBJECT_DEBUG));
        let logging = |s: &String| s == "AYA_LOGS" || s == "DEBUG_NOTE" || s.contains("5debug5flush");
        assert!(!plain.iter().any(logging), "{plain:?}");
        assert_eq!(debug.iter().filter(|s| logging(s)).count(), 3, "{debug:?}");
        for name in [programs::FROM_POD, programs::TO_POD, programs::NOOP, maps::CONNTRACK, maps::ENDPOINTS, maps::EVENTS] {
            assert!(plain.contains(name) && debug.contains(name), "{name}");
        }
    }
}

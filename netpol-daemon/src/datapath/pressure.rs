//! How full a hash map is, counted cheaply enough for every scrape: the kernel keeps no entry
//! count a map's owner can read, so the entries are read out in batches of
//! [`BATCH`] (`BPF_MAP_LOOKUP_BATCH`, one syscall per batch: the full CONNTRACK table of
//! 262,144 flows in 64 calls) and counted. Kernels without batch look-ups (before 5.6) fall
//! back to walking the keys, one syscall each, at most `max` of them.
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{bail, Result};
use aya::maps::MapData;

/// Entries per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: u32 = 4096;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr`'s member for `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Entries in the hash (or LRU hash) map `md`, which holds at most `max`.
pub fn count_entries(md: &MapData, max: u32) -> Result<u64> {
    for_each_entry(md, max, |_, _| {})
}

/// Calls `f` with the key and value bytes of every entry of the hash (or LRU hash, not
/// per-CPU) map `md`, at most `max` of them, read in batches; returns how many there were.
/// (Without batch look-ups, key by key, each value looked up on its own.)
pub fn for_each_entry(md: &MapData, max: u32, mut f: impl FnMut(&[u8], &[u8])) -> Result<u64> {
    let info = md.info()?;
    let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
    let fd = md.fd().as_fd().as_raw_fd() as u32;
    let mut seen = 0u64;
    match walk_batched(fd, key_size, value_size, max, |k, v| {
        seen += 1;
        f(k, v)
    }) {
        Ok(n) => Ok(n),
        // Nothing was handed out before the kernel said it cannot batch.
        Err(e) if seen == 0 && matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(524)) => {
            walk_by_keys(fd, key_size, value_size, max, f)
        }
        Err(e) => bail!("BPF_MAP_LOOKUP_BATCH: {e}"),
    }
}

fn walk_batched(fd: u32, key_size: usize, value_size: usize, max: u32, mut f: impl FnMut(&[u8], &[u8])) -> std::io::Result<u64> {
    let mut keys = vec![0u8; key_size * BATCH as usize];
    let mut values = vec![0u8; value_size.next_multiple_of(8) * BATCH as usize];
    // The batch token (a bucket index for hash maps); room for a key, as the kernel allows.
    let (mut token_in, mut token_out) = (vec![0u8; key_size.max(8)], vec![0u8; key_size.max(8)]);
    let (mut total, mut first) = (0u64, true);
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_mut_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH,
            map_fd: fd,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = match &r {
            Ok(()) => attr.count,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => attr.count,
            Err(_) => 0,
        };
        for i in 0..(n as usize).min((max as u64).saturating_sub(total) as usize) {
            f(&keys[i * key_size..(i + 1) * key_size], &values[i * value_size..(i + 1) * value_size]);
        }
        total += n as u64;
        match r {
            Ok(()) => {}
            // Past the last bucket: done. (A batch ends on a bucket's end, so the first may
            // return fewer than `max` and the last one pass it: the bound holds here too.)
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(total.min(max as u64)),
            Err(e) => return Err(e),
        }
        // An LRU map being filled as it is read cannot hold more than `max`; stop there.
        if total >= max as u64 {
            return Ok(total.min(max as u64));
        }
        token_in.copy_from_slice(&token_out);
        first = false;
    }
}

/// `union bpf_attr`'s member for `BPF_MAP_LOOKUP_ELEM`.
#[repr(C)]
struct LookupAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn walk_by_keys(fd: u32, key_size: usize, value_size: usize, max: u32, mut f: impl FnMut(&[u8], &[u8])) -> Result<u64> {
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    let mut value = vec![0u8; value_size.next_multiple_of(8)];
    let mut n = 0u64;
    while n < max as u64 {
        let mut attr =
            NextKeyAttr { map_fd: fd, _pad: 0, key: if n == 0 { 0 } else { key.as_ptr() as u64 }, next_key: next.as_mut_ptr() as u64 };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => n += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => bail!("BPF_MAP_GET_NEXT_KEY: {e}"),
        }
        std::mem::swap(&mut key, &mut next);
        let mut look = LookupAttr { map_fd: fd, _pad: 0, key: key.as_ptr() as u64, value: value.as_mut_ptr() as u64, flags: 0 };
        // Gone since (an LRU eviction, an expired flow): skipped.
        if bpf(BPF_MAP_LOOKUP_ELEM, &mut look).is_ok() {
            f(&key, &value[..value_size]);
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `union bpf_attr` for `BPF_MAP_CREATE` (the fields used) and `BPF_MAP_UPDATE_ELEM`.
    #[repr(C)]
    #[derive(Default)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }

    #[repr(C)]
    struct UpdateAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    #[test]
    fn batched_and_key_by_key_counts_agree() {
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var_os("CI").is_none(), "creating BPF maps needs root");
            eprintln!("SKIPPED: creating BPF maps needs root");
            return;
        }
        // A hash map of 10,000 u32 keys, 5,000 of them in use: two batches and a part.
        let mut create = CreateAttr { map_type: 1, key_size: 4, value_size: 8, max_entries: 10_000, ..Default::default() };
        let fd =
            unsafe { libc::syscall(libc::SYS_bpf, 0 as libc::c_long, &mut create as *mut CreateAttr, std::mem::size_of::<CreateAttr>()) };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
        let fd = fd as u32;
        let count_batched = |fd, k, v, max| walk_batched(fd, k, v, max, |_, _| {});
        let count_by_keys = |fd, k, max| walk_by_keys(fd, k, 8, max, |_, _| {});
        assert_eq!(count_batched(fd, 4, 8, 10_000).unwrap(), 0);
        assert_eq!(count_by_keys(fd, 4, 10_000).unwrap(), 0);
        for k in 0..5000u32 {
            let v = k as u64;
            let mut up = UpdateAttr { map_fd: fd, _pad: 0, key: &k as *const u32 as u64, value: &v as *const u64 as u64, flags: 0 };
            bpf(2, &mut up).unwrap();
        }
        assert_eq!(count_batched(fd, 4, 8, 10_000).unwrap(), 5000);
        assert_eq!(count_by_keys(fd, 4, 10_000).unwrap(), 5000);
        // Bounded: never past `max`.
        assert_eq!(count_by_keys(fd, 4, 100).unwrap(), 100);
        assert_eq!(count_batched(fd, 4, 8, 4096).unwrap(), 4096);
        // Both walks hand out every entry once, its value with its key.
        for walk in [true, false] {
            let mut seen = std::collections::BTreeMap::new();
            let f = |k: &[u8], v: &[u8]| {
                let k = u32::from_ne_bytes(k.try_into().unwrap());
                assert!(seen.insert(k, u64::from_ne_bytes(v.try_into().unwrap())).is_none(), "key {k} twice");
            };
            if walk {
                walk_batched(fd, 4, 8, 10_000, f).unwrap();
            } else {
                walk_by_keys(fd, 4, 8, 10_000, f).unwrap();
            }
            assert_eq!(seen.len(), 5000);
            assert!(seen.iter().all(|(k, v)| *k as u64 == *v));
        }
        unsafe { libc::close(fd as i32) };
    }
}

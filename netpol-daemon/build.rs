//! Builds the eBPF programs (netpol-ebpf, target bpfel-unknown-none) and leaves the objects in
//! OUT_DIR for `include_bytes_aligned!`: the default one, and the one that logs its decisions
//! (feature `debug-log`, for `--bpf-debug`). The eBPF crate needs Debian's rustc-web (its library
//! source matches exactly) with RUSTC_BOOTSTRAP=1 for build-std, and bpf-linker: both installed
//! by `cargo xtask setup` (see netpol-ebpf/.cargo/config.toml).
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    build_info();
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let ebpf_dir = root.join("netpol-ebpf");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for p in [
        "netpol-ebpf/src",
        "netpol-ebpf/Cargo.toml",
        "netpol-ebpf/Cargo.lock",
        "netpol-ebpf/.cargo/config.toml",
        "netpol-common/src",
        "netpol-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    // A target dir of its own, stable across builds of the daemon, so rebuilds are incremental.
    let target_dir = std::env::var_os("NETPOL_EBPF_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target").join("ebpf"));

    // The default object, then the one `--bpf-debug` loads (netpol-ebpf's `debug-log`).
    build_ebpf(&ebpf_dir, &target_dir, &[], &out_dir.join("netpol"));
    build_ebpf(&ebpf_dir, &target_dir, &["--features", "debug-log"], &out_dir.join("netpol-debug"));
}

/// Builds netpol-ebpf with `args` and copies the object to `out`. (Both builds share the
/// target dir: each keeps its own artifacts there, so neither rebuilds the other's.)
fn build_ebpf(ebpf_dir: &Path, target_dir: &Path, args: &[&str], out: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(ebpf_dir).args(["build", "--release", "--target-dir"]).arg(target_dir).args(args).env("RUSTC_BOOTSTRAP", "1");
    // Do not leak the host build's settings into the BPF build.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME"
            || k == "RUSTC"
            || k == "RUSTC_WRAPPER"
            || k == "RUSTFLAGS"
            || k == "RUSTC_WORKSPACE_WRAPPER"
            || k == "RUSTDOC"
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd.status().expect("running cargo for netpol-ebpf");
    if !status.success() {
        panic!(
            "building netpol-ebpf {args:?} failed. The eBPF toolchain (Debian rustc-web + rust-web-src, \
             bpf-linker built against LLVM 22) is installed by `cargo xtask setup`."
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/netpol");
    std::fs::copy(&obj, out).unwrap_or_else(|e| panic!("copying {}: {e}", obj.display()));
}

/// `NETPOL_GIT_COMMIT` (HEAD's commit, when built from a git checkout) and `NETPOL_RUSTC_VERSION`, for `--version` and the
/// `netpol_build_info` metric. Re-run when HEAD (or the branch it names) moves.
fn build_info() {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !s.is_empty()).then_some(s)
    };
    if let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) {
        println!("cargo:rustc-env=NETPOL_GIT_COMMIT={commit}");
        // (A path that does not exist would make every build re-run this: only existing ones.)
        let branch = git(&["symbolic-ref", "-q", "HEAD"]);
        for r in ["HEAD", "packed-refs"].into_iter().map(String::from).chain(branch) {
            if let Some(p) = git(&["rev-parse", "--git-path", &r]).filter(|p| std::path::Path::new(p).exists()) {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc).arg("--version").output().ok().and_then(|o| String::from_utf8(o.stdout).ok());
    println!("cargo:rustc-env=NETPOL_RUSTC_VERSION={}", version.as_deref().map(str::trim).unwrap_or("unknown"));
}

//! What this binary is: its version, the git commit it was built from (when built from a git
//! checkout, see build.rs) and the compiler, for `netpol-daemon --version` and the
//! `netpol_build_info` metric.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// HEAD's commit at build time (12 hex digits), when built from a git checkout.
pub const COMMIT: Option<&str> = option_env!("NETPOL_GIT_COMMIT");
pub const RUSTC: &str = env!("NETPOL_RUSTC_VERSION");

/// `0.1.0 (commit 0123456789ab)`, or the version alone.
pub fn long_version() -> String {
    match COMMIT {
        Some(c) => format!("{VERSION} (commit {c})"),
        None => VERSION.to_string(),
    }
}

/// `netpol_build_info{version, commit, rustc} 1` (commit `unknown` when not known).
pub fn family(out: &mut super::render::Families) {
    out.gauge("netpol_build_info", "1, with the daemon's version, the git commit it was built from and the compiler as labels.")
        .sample(&[("version", VERSION), ("commit", COMMIT.unwrap_or("unknown")), ("rustc", RUSTC)], 1.0);
}

//! A [`Flow`] written out: one JSON object per line (the stream's and `observe -o json`'s
//! form), or one line of text for people (`observe`'s default):
//!
//! `TIME VERDICT DIRECTION POD: SRC -> DST PROTOCOL [TCP FLAGS]: WHY`
//!
//! where the peer's address carries its pod in parentheses, and WHY names the policy that
//! allowed the flow (`by NS/NAME`), `not isolated`, `from a node address`, the default deny with
//! the policies isolating the pod, or the drop's reason.
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Flow, FlowVerdict, REASON_NODE, REASON_NOT_ISOLATED, REASON_POLICY};

/// The flow as one JSON line (with its newline).
pub fn json_line(f: &Flow) -> String {
    let mut s = serde_json::to_string(f).expect("a flow serializes");
    s.push('\n');
    s
}

/// An address and port as `10.0.0.1:80` or `[fd00::1]:80` (the address alone without a port).
fn endpoint(addr: &str, port: Option<u16>) -> String {
    match (addr.parse::<IpAddr>(), port) {
        (Ok(ip), Some(p)) => SocketAddr::new(ip, p).to_string(),
        _ => addr.to_string(),
    }
}

/// Why: the deciding policy, or what decided without one.
fn why(f: &Flow) -> String {
    let isolated = || match f.isolated_by.is_empty() {
        true => String::new(),
        false => format!(" (isolated by {})", f.isolated_by.join(", ")),
    };
    match (f.verdict, f.reason.as_str()) {
        (FlowVerdict::Allowed, REASON_NOT_ISOLATED) => "not isolated".to_string(),
        (FlowVerdict::Allowed, REASON_NODE) => "from a node address".to_string(),
        (FlowVerdict::Allowed, _) => match &f.policy {
            Some(p) => format!("by {p}"),
            None => "by a policy".to_string(),
        },
        (FlowVerdict::Audit, _) => format!("passed, default deny{} in audit mode", isolated()),
        (FlowVerdict::Denied, REASON_POLICY) => format!("default deny{}", isolated()),
        (FlowVerdict::Denied, "fail-closed") => format!("fail-closed{}", isolated()),
        (FlowVerdict::Denied, r) => r.to_string(),
    }
}

/// The flow as one line of text (without a newline).
pub fn text_line(f: &Flow) -> String {
    let mut s = format!("{} {} {} {}: ", f.time, f.verdict.as_str().to_uppercase(), f.direction, f.pod);
    let peer = |side_is_peer: bool| match (&f.peer, side_is_peer) {
        (Some(p), true) => format!(" ({p})"),
        _ => String::new(),
    };
    match (&f.src, &f.dst) {
        (Some(src), Some(dst)) => {
            let ingress = f.direction == "ingress";
            let _ = write!(s, "{}{} -> {}{}", endpoint(src, f.src_port), peer(ingress), endpoint(dst, f.dst_port), peer(!ingress));
        }
        _ => s.push_str("frame not read as IP"),
    }
    if let Some(p) = &f.protocol {
        let _ = write!(s, " {p}");
    }
    if let Some(flags) = &f.tcp_flags {
        let _ = write!(s, " {flags}");
    }
    if let Some(t) = f.icmp_type {
        let _ = write!(s, " type {t}");
    }
    let _ = write!(s, ": {}", why(f));
    s
}

/// `t` as RFC 3339 in UTC with microseconds: `2025-06-01T12:00:00.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_micros())
}

/// Year, month, day of the `days`-th day since 1970-01-01 (proleptic Gregorian; Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

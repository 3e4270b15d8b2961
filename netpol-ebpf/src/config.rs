//! The runtime configuration the daemon writes into the one-entry CONFIG array (conntrack
//! timeouts, the flow cache's lifetime), read by every packet that needs a setting (as
//! Cilium's bpf/lib config_map.h). Until the daemon writes it, every field reads 0: flow cache
//! off. (Which flow events are sent is `EVENT_CONFIG`'s, in `events`.)
use aya_ebpf::{macros::map, maps::Array};
use netpol_common::Config;

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);

const ZERO: Config = Config { ct_tcp_ns: 0, ct_tcp_closing_ns: 0, ct_udp_ns: 0, ct_other_ns: 0, _reserved: 0, flow_cache_ticks: 0 };

/// The current configuration (all zero when the map has no entry).
#[inline(always)]
pub fn config() -> &'static Config {
    CONFIG.get(0).unwrap_or(&ZERO)
}

//! The flow events' maps: the EVENTS ring buffer the programs write a [`FlowEvent`] into for
//! each dropped or audited packet and each newly allowed flow, and EVENT_CONFIG, which says
//! which of those they send and how many per second and CPU. Both go to one owner (the daemon's
//! event reader and its flow stream, `crate::metrics::flows`), which changes the settings at
//! run time: no restart, no reload.
use anyhow::{Context, Result};
use aya::maps::{Array, MapData, RingBuf};
use aya::Ebpf;
use netpol_common::{maps, EventConfig, FlowEvent};

use super::maps::take;

/// The ring buffer and the settings of what is written into it.
pub struct FlowEvents {
    pub ring: RingBuf<MapData>,
    pub control: EventControl,
}

impl FlowEvents {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<FlowEvents> {
        Ok(FlowEvents { ring: take(ebpf, maps::EVENTS)?, control: EventControl { map: take(ebpf, maps::EVENT_CONFIG)? } })
    }
}

/// EVENT_CONFIG: which flow events the programs send (`EVENTS_*` bits) and at most how many
/// per second and CPU.
pub struct EventControl {
    map: Array<MapData, EventConfig>,
}

impl EventControl {
    pub fn set(&mut self, c: EventConfig) -> Result<()> {
        self.map.set(0, c, 0).context("writing EVENT_CONFIG")
    }

    /// What the programs send now.
    pub fn get(&self) -> EventConfig {
        self.map.get(&0, 0).unwrap_or_default()
    }
}

/// A record of the ring buffer as a [`FlowEvent`] (`None`: not one; a program of another
/// version wrote it).
pub fn read_event(item: &[u8]) -> Option<FlowEvent> {
    (item.len() == std::mem::size_of::<FlowEvent>()).then(|| unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) })
}

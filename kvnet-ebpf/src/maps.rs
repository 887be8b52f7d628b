//! The pinned maps the daemon owns (names in `kvnet_common::names`).
use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuHashMap},
};
use kvnet_common::{
    FdbEntry, FdbKey, FloodKey, FloodSet, PortConfig, PortStats, MAX_FDB_ENTRIES, MAX_NETWORKS,
    MAX_PORTS,
};

#[map(name = "ports")]
pub static PORTS: HashMap<u32, PortConfig> = HashMap::pinned(MAX_PORTS, 0);

#[map(name = "fdb")]
pub static FDB: HashMap<FdbKey, FdbEntry> = HashMap::pinned(MAX_FDB_ENTRIES, 0);

#[map(name = "flood")]
pub static FLOOD: HashMap<FloodKey, FloodSet> = HashMap::pinned(MAX_NETWORKS, 0);

#[map(name = "port_stats")]
pub static PORT_STATS: PerCpuHashMap<u32, PortStats> = PerCpuHashMap::pinned(MAX_PORTS, 0);

#[inline(always)]
pub fn port(ifindex: u32) -> Option<PortConfig> {
    unsafe { PORTS.get(&ifindex).copied() }
}

#[inline(always)]
pub fn flood_set(key: &FloodKey) -> Option<&'static FloodSet> {
    unsafe { FLOOD.get(key) }
}

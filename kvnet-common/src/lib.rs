//! Types shared by the eBPF datapath and the `kvnet` daemon.
//!
//! Every map key and value is `#[repr(C)]`, has explicit padding and no
//! `bool`, so both sides agree on the bytes and bytemuck can check them.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Names of the pinned maps and programs, as `bpftool` shows them
/// (the kernel keeps 15 characters of an object name).
pub mod names {
    pub const MAP_PORTS: &str = "ports";
    pub const MAP_FDB: &str = "fdb";
    pub const MAP_FLOOD: &str = "flood";
    pub const MAP_PORT_STATS: &str = "port_stats";
    pub const PROG_XDP: &str = "kvnet_xdp";
    pub const PROG_TC: &str = "kvnet_tc";
}

/// Largest number of ports one network (flood domain) can hold: the tc
/// flood loop is bounded by it.
pub const MAX_FLOOD_PORTS: usize = 64;
pub const MAX_PORTS: u32 = 4096;
pub const MAX_FDB_ENTRIES: u32 = 1 << 20;
pub const MAX_NETWORKS: u32 = 4096;

/// A learned entry is rewritten at most this often while it stays on the
/// same port, so the hot path does not bounce the entry's cache line.
pub const FDB_REFRESH_NS: u64 = 1_000_000_000;

/// Port flags ([`PortConfig::flags`]).
pub const PORT_F_HAIRPIN: u32 = 1 << 0;
/// The port's XDP program is attached and may redirect on its own.
pub const PORT_F_XDP: u32 = 1 << 1;
/// XDP may redirect frames into this port. Not set on veth ports: a frame
/// XDP-redirected into a veth is lost unless the far end runs NAPI, which
/// kvnet can neither see nor set for a guest; tc carries those instead.
pub const PORT_F_XDP_TX: u32 = 1 << 2;

/// Port configuration, map `ports`, keyed by ifindex (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortConfig {
    pub net_id: u32,
    pub flags: u32,
    /// VLAN mode (reserved for VLAN support): 0 = untagged only.
    pub vlan_mode: u16,
    pub pvid: u16,
    pub native_vid: u16,
    pub _pad: u16,
}

/// FDB key, map `fdb`: one MAC table per (network, VLAN).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FdbKey {
    pub net_id: u32,
    pub vid: u16,
    pub mac: [u8; 6],
}

/// FDB entry flags.
pub const FDB_F_STATIC: u32 = 1 << 0;

/// FDB value: where the MAC lives and when it was last seen
/// (`bpf_ktime_get_ns`, i.e. CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FdbEntry {
    pub ifindex: u32,
    pub flags: u32,
    pub last_seen_ns: u64,
}

/// Flood domain key, map `flood`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FloodKey {
    pub net_id: u32,
    pub vid: u16,
    pub _pad: u16,
}

/// The ports of one flood domain. Written whole by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FloodSet {
    pub count: u32,
    pub ifindex: [u32; MAX_FLOOD_PORTS],
}

impl Default for FloodSet {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

/// Why the datapath dropped a frame. The index into [`PortStats::drops`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Truncated or unparsable header.
    Malformed = 0,
    /// Source MAC is multicast/broadcast or zero.
    BadSrcMac = 1,
    /// Destination is the ingress port and hairpin is off.
    Hairpin = 2,
    /// Redirect to the egress port failed.
    RedirectFailed = 3,
    /// The FDB names a port that is not (any more) in this network.
    StalePort = 4,
}

pub const DROP_REASONS: usize = 8;
pub const DROP_REASON_NAMES: [&str; DROP_REASONS] = [
    "malformed",
    "bad_src_mac",
    "hairpin",
    "redirect_failed",
    "stale_port",
    "reserved5",
    "reserved6",
    "reserved7",
];

/// Per-port counters, per-CPU hash `port_stats` keyed by ifindex.
/// rx_* count frames a port received and kvnet handled; tx_* frames kvnet
/// sent out of the port. xdp_seen/tc_seen count what each hook saw.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub xdp_seen: u64,
    pub tc_seen: u64,
    pub flooded: u64,
    pub learned: u64,
    pub drops: [u64; DROP_REASONS],
}

impl PortStats {
    pub fn add(&mut self, o: &PortStats) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.xdp_seen += o.xdp_seen;
        self.tc_seen += o.tc_seen;
        self.flooded += o.flooded;
        self.learned += o.learned;
        for i in 0..DROP_REASONS {
            self.drops[i] += o.drops[i];
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for PortConfig {}
    unsafe impl aya::Pod for FdbKey {}
    unsafe impl aya::Pod for FdbEntry {}
    unsafe impl aya::Pod for FloodKey {}
    unsafe impl aya::Pod for FloodSet {}
    unsafe impl aya::Pod for PortStats {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<PortConfig>(), 16);
        assert_eq!(size_of::<FdbKey>(), 12);
        assert_eq!(size_of::<FdbEntry>(), 16);
        assert_eq!(size_of::<FloodKey>(), 8);
        assert_eq!(size_of::<FloodSet>(), 4 + 4 * MAX_FLOOD_PORTS);
        assert_eq!(size_of::<PortStats>(), 8 * (8 + DROP_REASONS));
    }
}
